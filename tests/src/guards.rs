//! RAII guards for every kernel object the harness creates: network namespaces, veth pairs, cgroups and bpffs
//! directories. Each one removes its object on drop, also while a test panics, and never fails in drop (errors are
//! printed, since there is nobody left to return them to).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::util::{eventually, ip, run};

/// Where `ip netns add` puts its bind mounts.
pub const NETNS_DIR: &str = "/var/run/netns";
/// The host's cgroup2 mount on these machines (design.md, kernel notes).
pub const CGROUP2_ROOT: &str = "/sys/fs/cgroup/unified";
/// The bpf filesystem mount point.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// A named network namespace (`ip netns add`), deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace and brings its `lo` up (a fresh namespace has it down, and servers bound to the
    /// wildcard address would otherwise be unreachable through 127.0.0.1).
    pub fn new(name: &str) -> Result<Netns> {
        ip(&["netns", "add", name])?;
        // Own it before anything else can fail, so it is deleted on error.
        let ns = Netns {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/var/run/netns/<name>`: what `setns` opens and what the `sinew.dev/netns` annotation names.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    /// Runs `ip -n <name> <args>`.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Waits until every veth in the namespace is operationally up.
    ///
    /// The carrier comes up at once, but the kernel's linkwatch work marks the device running (operstate UP) up to a
    /// second later; until then IPv6 neighbour discovery on it fails and the first IPv4 packets are dropped, which
    /// would show up as a mysterious first-connect timeout in tests.
    pub fn wait_veths_up(&self, timeout: Duration) -> Result<()> {
        eventually(timeout, Duration::from_millis(20), || {
            let out = run(
                "ip",
                &["-n", &self.name, "-j", "link", "show", "type", "veth"],
            )
            .map_err(|e| format!("{e:#}"))?;
            let links: Vec<serde_json::Value> =
                serde_json::from_slice(&out.stdout).map_err(|e| format!("ip -j link: {e}"))?;
            let down: Vec<String> = links
                .iter()
                .filter(|l| l["operstate"] != "UP")
                .map(|l| format!("{}={}", l["ifname"], l["operstate"]))
                .collect();
            if down.is_empty() {
                Ok(())
            } else {
                Err(format!("netns {}: not up yet: {down:?}", self.name))
            }
        })
        .map_err(|e| anyhow::anyhow!(e))
    }

    /// Sets a sysctl inside the namespace (`ip netns exec <ns> sysctl -w key=value`). Only for `net.*` keys, which
    /// are per namespace; the remount of /sys that `ip netns exec` does is harmless for sysctl.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        run(
            "ip",
            &[
                "netns",
                "exec",
                &self.name,
                "sysctl",
                "-q",
                "-w",
                &format!("{key}={value}"),
            ],
        )
        .map(drop)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("sinew-tests: cleanup: {e:#}");
        }
    }
}

/// One end of a veth pair, named inside a namespace. Deleting one end deletes the pair.
///
/// Pairs are created directly inside the namespaces (`ip -n A link add X type veth peer name Y netns B`), so no
/// interface ever appears in the root namespace and names only need to be unique per namespace.
#[derive(Debug)]
pub struct Veth {
    netns: String,
    name: String,
}

impl Veth {
    /// Creates `name` in namespace `netns` with its peer `peer_name` in `peer_netns`, both left down.
    pub fn new(netns: &Netns, name: &str, peer_netns: &Netns, peer_name: &str) -> Result<Veth> {
        // Linux limits interface names to 15 bytes (IFNAMSIZ - 1).
        if name.len() > 15 || peer_name.len() > 15 {
            bail!("interface names longer than 15 bytes: {name}, {peer_name}");
        }
        netns.ip(&[
            "link",
            "add",
            name,
            "type",
            "veth",
            "peer",
            "name",
            peer_name,
            "netns",
            peer_netns.name(),
        ])?;
        Ok(Veth {
            netns: netns.name().to_string(),
            name: name.to_string(),
        })
    }

    /// The name of this end.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        // The pair is already gone when either namespace was deleted first; that is fine.
        if Path::new(NETNS_DIR).join(&self.netns).exists() {
            let _ = ip(&["-n", &self.netns, "link", "del", &self.name]);
        }
    }
}

/// A cgroup2 directory under [`CGROUP2_ROOT`], removed on drop together with everything below it.
///
/// On drop, every process left in the subtree is killed through `cgroup.kill` (Linux 5.14+; otherwise each pid in
/// `cgroup.procs` gets SIGKILL), and the directories are removed children first.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Creates `<CGROUP2_ROOT>/<name>`.
    pub fn new(name: &str) -> Result<Cgroup> {
        let path = Path::new(CGROUP2_ROOT).join(name);
        std::fs::create_dir(&path).with_context(|| format!("mkdir {}", path.display()))?;
        Ok(Cgroup { path })
    }

    /// Takes ownership of an existing cgroup directory (for sweeping leftovers); it is removed on drop.
    pub fn adopt(path: PathBuf) -> Cgroup {
        Cgroup { path }
    }

    /// The cgroup's directory (what the agent gets as `--cgroup-root`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates a child cgroup (`<path>/<name>`) and returns its directory. It is removed with its parent.
    pub fn child(&self, name: &str) -> Result<PathBuf> {
        let p = self.path.join(name);
        std::fs::create_dir(&p).with_context(|| format!("mkdir {}", p.display()))?;
        Ok(p)
    }

    /// Kills every process in the subtree and waits (up to 5 s) until it is empty.
    pub fn kill_all(&self) -> Result<()> {
        if !self.path.exists() {
            return Ok(());
        }
        let kill = self.path.join("cgroup.kill");
        if kill.exists() {
            std::fs::write(&kill, "1").with_context(|| format!("write {}", kill.display()))?;
        } else {
            for dir in subtree(&self.path) {
                for pid in procs(&dir) {
                    let _ = crate::sys::signal(pid, libc::SIGKILL);
                }
            }
        }
        eventually(Duration::from_secs(5), Duration::from_millis(10), || {
            let left: Vec<u32> = subtree(&self.path).iter().flat_map(|d| procs(d)).collect();
            if left.is_empty() {
                Ok(())
            } else {
                Err(format!("processes left: {left:?}"))
            }
        })
        .map_err(|e| anyhow::anyhow!("cgroup {}: {e}", self.path.display()))
    }
}

/// `dir` and every cgroup directory below it, deepest first (the order rmdir needs).
fn subtree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    // Cgroup trees made by the harness are a few levels deep; 64 bounds a runaway walk anyway.
    fn walk(d: &Path, depth: usize, out: &mut Vec<PathBuf>) {
        if depth > 64 {
            return;
        }
        if let Ok(rd) = std::fs::read_dir(d) {
            for e in rd.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    walk(&e.path(), depth + 1, out);
                }
            }
        }
        out.push(d.to_path_buf());
    }
    walk(dir, 0, &mut out);
    out
}

fn procs(dir: &Path) -> Vec<u32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let Err(e) = self.kill_all() {
            eprintln!("sinew-tests: cleanup: {e:#}");
        }
        for dir in subtree(&self.path) {
            // A dying task can hold the cgroup for a moment after cgroup.procs is empty: retry briefly on EBUSY.
            let r = eventually(Duration::from_secs(2), Duration::from_millis(10), || {
                match std::fs::remove_dir(&dir) {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(e.to_string()),
                }
            });
            if let Err(e) = r {
                eprintln!("sinew-tests: cleanup: rmdir {}: {e}", dir.display());
            }
        }
    }
}

/// Serialises mounting bpffs within this process: two agents (or two tests) that each mounted it would stack two
/// mounts, and pins made in the lower one would vanish from view.
static BPFFS_MOUNT: Mutex<()> = Mutex::new(());

/// Whether `path` is exactly a mount point of a bpf filesystem (per /proc/self/mounts).
pub fn is_bpffs_mounted(path: &str) -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 2 && f[1] == path && f[2] == "bpf"
        })
}

/// Mounts bpffs at [`BPFFS_ROOT`] unless it already is one. The machines do not mount it at boot (kernel notes),
/// and tests must not depend on a mount left behind by an earlier run.
pub fn ensure_bpffs_mounted() -> Result<()> {
    let _g = BPFFS_MOUNT.lock().unwrap_or_else(|p| p.into_inner());
    if !is_bpffs_mounted(BPFFS_ROOT) {
        run("mount", &["-t", "bpf", "bpf", BPFFS_ROOT])?;
    }
    Ok(())
}

/// A directory `/sys/fs/bpf/<name>` that holds one simulated node's pins (the agent's `--bpffs-root` is
/// [`Bpffs::agent_root`], a subdirectory of it).
///
/// On drop: if it still has content and the agent binary exists, runs `mesh-agent uninstall` (so links are
/// detached the supported way and the cgroup root is left clean), then removes the directory recursively. Removing
/// a link's pin also detaches it once nothing else holds it, so the `rm -rf` alone is a sufficient backstop.
#[derive(Debug)]
pub struct Bpffs {
    dir: PathBuf,
    cgroup_root: Option<PathBuf>,
    agent_bin: Option<PathBuf>,
}

impl Bpffs {
    /// Mounts bpffs if needed and creates `/sys/fs/bpf/<name>`. `cgroup_root` is passed to `uninstall` on drop.
    pub fn new(name: &str, cgroup_root: Option<&Path>) -> Result<Bpffs> {
        ensure_bpffs_mounted()?;
        let dir = Path::new(BPFFS_ROOT).join(name);
        std::fs::create_dir(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        Ok(Bpffs {
            dir,
            cgroup_root: cgroup_root.map(Path::to_path_buf),
            agent_bin: Some(crate::agent::agent_bin()),
        })
    }

    /// The directory this guard owns.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `<dir>/sinew`: the agent's `--bpffs-root`.
    pub fn agent_root(&self) -> PathBuf {
        self.dir.join("sinew")
    }

    /// Every file (pin) below the directory, for "nothing is pinned any more" checks.
    pub fn pins(&self) -> Vec<PathBuf> {
        list_files(&self.dir)
    }
}

/// Every non-directory entry below `dir` (bounded depth).
pub fn list_files(dir: &Path) -> Vec<PathBuf> {
    fn walk(d: &Path, depth: usize, out: &mut Vec<PathBuf>) {
        if depth > 16 {
            return;
        }
        if let Ok(rd) = std::fs::read_dir(d) {
            for e in rd.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    walk(&e.path(), depth + 1, out);
                } else {
                    out.push(e.path());
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, 0, &mut out);
    out
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        if !self.dir.exists() {
            return;
        }
        let root = self.agent_root();
        if let (Some(bin), true) = (&self.agent_bin, root.exists()) {
            if bin.exists() {
                let cli = crate::agent::AgentCli {
                    bin: bin.clone(),
                    cgroup_root: self.cgroup_root.clone(),
                    bpffs_root: root,
                };
                if let Err(e) = cli.uninstall() {
                    eprintln!("sinew-tests: cleanup: {e:#}");
                }
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("sinew-tests: cleanup: rm -rf {}: {e}", self.dir.display());
        }
    }
}
