//! Kubelet-style pod cgroups for a pod UID, with a stand-in sandbox ("pause") process in them: what
//! `mesh_agent::podns` finds a pod's network namespace from on a real node, rebuilt below a test's own cgroup.
//!
//! A [`PodCgroup`] creates the directories kubelet would (for its cgroup driver, the pod's QoS class, and
//! optionally nested below kubelet's own cgroup as kind does) plus one container scope, below a cgroup root the
//! test owns (a [`crate::Cgroup`] guard, or a node's cgroup root). [`PodCgroup::spawn_pause`] starts a process that
//! joins the container scope and then a network namespace, like a pod sandbox.
//!
//! ```no_run
//! use std::path::Path;
//! use sinew_tests::kubepods::{Driver, Layout, PodCgroup, Qos};
//! use sinew_tests::{Cgroup, Netns};
//! let root = Cgroup::new("snw-example").unwrap();
//! let ns = Netns::new("snw-example").unwrap();
//! let uid = "0b6d2d5c-3f0e-4f7b-9a51-1c2d3e4f5a6b";
//! let pod = PodCgroup::create(root.path(), uid, Layout::new(Driver::Systemd, Qos::BestEffort)).unwrap();
//! let pause = pod.spawn_pause(&ns.path()).unwrap();
//! let mut finder = mesh_agent::podns::PodNetns::new(root.path(), "/proc");
//! assert_eq!(finder.netns_path(uid).unwrap(), Path::new(&format!("/proc/{}/ns/net", pause.pid())));
//! ```

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::guards::Cgroup;

/// Kubelet's `--cgroup-driver`: how it names pod cgroups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    /// `kubepods/[burstable|besteffort/]pod<uid>/<container-id>`.
    Cgroupfs,
    /// `kubepods.slice/[kubepods-<qos>.slice/]kubepods[-<qos>]-pod<uid_>.slice/cri-containerd-<id>.scope`, with
    /// `uid_` the UID with `-` replaced by `_`.
    Systemd,
}

/// A pod's QoS class, which picks the level of the hierarchy its cgroup is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qos {
    /// Directly below `kubepods`.
    Guaranteed,
    /// Below `kubepods/burstable` (`kubepods-burstable.slice`).
    Burstable,
    /// Below `kubepods/besteffort` (`kubepods-besteffort.slice`).
    BestEffort,
}

/// Where kubelet puts a pod's cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// The cgroup driver.
    pub driver: Driver,
    /// The pod's QoS class.
    pub qos: Qos,
    /// Below kubelet's own cgroup, as in kind (`kubelet.slice/kubelet-kubepods.slice/...` with every slice
    /// name prefixed `kubelet-`) and some distros (`kubelet/kubepods/...`).
    pub nested: bool,
}

impl Layout {
    /// A layout directly below the cgroup root.
    pub fn new(driver: Driver, qos: Qos) -> Layout {
        Layout {
            driver,
            qos,
            nested: false,
        }
    }

    /// The same layout below kubelet's own cgroup (kind).
    pub fn nested(self) -> Layout {
        Layout {
            nested: true,
            ..self
        }
    }

    /// The pod's cgroup directory relative to the cgroup root, one path component per level.
    pub fn pod_dir(&self, uid: &str) -> PathBuf {
        let qos = match self.qos {
            Qos::Guaranteed => None,
            Qos::Burstable => Some("burstable"),
            Qos::BestEffort => Some("besteffort"),
        };
        let mut dir = PathBuf::new();
        match self.driver {
            Driver::Cgroupfs => {
                if self.nested {
                    dir.push("kubelet");
                }
                dir.push("kubepods");
                if let Some(q) = qos {
                    dir.push(q);
                }
                dir.push(format!("pod{uid}"));
            }
            Driver::Systemd => {
                // Each systemd slice is named after its whole path: `a.slice/a-b.slice/a-b-c.slice`.
                let mut name = String::new();
                if self.nested {
                    dir.push("kubelet.slice");
                    name.push_str("kubelet-");
                }
                name.push_str("kubepods");
                dir.push(format!("{name}.slice"));
                if let Some(q) = qos {
                    name.push_str(&format!("-{q}"));
                    dir.push(format!("{name}.slice"));
                }
                dir.push(format!("{name}-pod{}.slice", uid.replace('-', "_")));
            }
        }
        dir
    }

    /// The name of a container's cgroup below the pod's: `cri-containerd-<id>.scope` (systemd) or `<id>`
    /// (cgroupfs).
    pub fn container_name(&self, id: &str) -> String {
        match self.driver {
            Driver::Cgroupfs => id.to_string(),
            Driver::Systemd => format!("cri-containerd-{id}.scope"),
        }
    }
}

/// A pod's kubelet-style cgroup directory below a cgroup root, with one container scope (the sandbox's).
///
/// On drop, every process in the pod's subtree is killed and its directories are removed deepest first; then the
/// hierarchy levels above it (`kubepods.slice`, ...) are removed too once empty, so pods sharing them clean up in
/// any order. Only use it below a cgroup root the test owns.
#[derive(Debug)]
pub struct PodCgroup {
    root: PathBuf,
    pod_dir: PathBuf,
    scope_dir: PathBuf,
}

impl PodCgroup {
    /// Creates the pod's cgroup for `uid` in `layout` below `cgroup_root` (missing levels included), and its
    /// sandbox container's scope, named after the UID. Fails if the pod directory already exists.
    pub fn create(cgroup_root: &Path, uid: &str, layout: Layout) -> Result<PodCgroup> {
        if !cgroup_root.is_dir() {
            bail!("cgroup root {} is not a directory", cgroup_root.display());
        }
        let pod_dir = cgroup_root.join(layout.pod_dir(uid));
        let parent = pod_dir.parent().expect("the pod dir is below the root");
        std::fs::create_dir_all(parent)
            .with_context(|| format!("mkdir -p {}", parent.display()))?;
        std::fs::create_dir(&pod_dir).with_context(|| format!("mkdir {}", pod_dir.display()))?;
        // Own it before anything else can fail, so it is removed on error.
        let mut pod = PodCgroup {
            root: cgroup_root.to_path_buf(),
            scope_dir: pod_dir.clone(),
            pod_dir,
        };
        pod.scope_dir = pod.container(&layout.container_name(&uid.replace('-', "")))?;
        Ok(pod)
    }

    /// The pod's cgroup directory (`.../kubepods-besteffort-pod<uid_>.slice`, `.../pod<uid>`).
    pub fn pod_dir(&self) -> &Path {
        &self.pod_dir
    }

    /// The sandbox container's cgroup directory, where [`PodCgroup::spawn_pause`] puts its process.
    pub fn scope_dir(&self) -> &Path {
        &self.scope_dir
    }

    /// Creates another cgroup directly below the pod's (a container: pass [`Layout::container_name`]) and returns
    /// it. It is removed with the pod.
    pub fn container(&self, name: &str) -> Result<PathBuf> {
        let dir = self.pod_dir.join(name);
        std::fs::create_dir(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        Ok(dir)
    }

    /// A command whose child joins the sandbox scope's cgroup, then the network namespace at `netns` (an
    /// [`crate::Netns::path`], or `/proc/self/ns/net` for the caller's own, e.g. a hostNetwork pod).
    pub fn command(&self, netns: &Path, program: impl AsRef<OsStr>) -> Result<Command> {
        command_in(&self.scope_dir, netns, program)
    }

    /// Starts the pod's stand-in sandbox process (`sleep 3600`) in the sandbox scope and the network namespace at
    /// `netns`. When this returns the process is in both (they are joined before `exec`, which `spawn` waits for).
    pub fn spawn_pause(&self, netns: &Path) -> Result<Pause> {
        Pause::spawn(&self.scope_dir, netns)
    }

    /// Like [`PodCgroup::spawn_pause`], in another of the pod's cgroups (one made by [`PodCgroup::container`]):
    /// an app container, or a runtime helper such as CRI-O's `crio-conmon-<id>.scope` in the node's netns.
    pub fn spawn_pause_in(&self, cgroup: &Path, netns: &Path) -> Result<Pause> {
        if !cgroup.starts_with(&self.pod_dir) {
            bail!(
                "{} is not below the pod's cgroup {}",
                cgroup.display(),
                self.pod_dir.display()
            );
        }
        Pause::spawn(cgroup, netns)
    }
}

/// A command whose child joins `cgroup`, then the network namespace at `netns`.
fn command_in(cgroup: &Path, netns: &Path, program: impl AsRef<OsStr>) -> Result<Command> {
    let mut cmd = Command::new(program);
    crate::sys::enter_pod(&mut cmd, &cgroup.join("cgroup.procs"), netns)?;
    Ok(cmd)
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        // The harness's cgroup guard kills the subtree's processes and removes it deepest first.
        drop(Cgroup::adopt(self.pod_dir.clone()));
        // Then the now possibly empty hierarchy levels above it; the first still in use (another pod's) ends this.
        let mut dir = self.pod_dir.parent();
        while let Some(d) = dir {
            if d == self.root || !d.starts_with(&self.root) || std::fs::remove_dir(d).is_err() {
                break;
            }
            dir = d.parent();
        }
    }
}

/// A pod's stand-in sandbox process. Dropping it kills and reaps it.
#[derive(Debug)]
pub struct Pause {
    child: Option<Child>,
}

impl Pause {
    /// `sleep 3600` in `cgroup` and the network namespace at `netns`.
    fn spawn(cgroup: &Path, netns: &Path) -> Result<Pause> {
        let mut cmd = command_in(cgroup, netns, "sleep")?;
        cmd.arg("3600")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning a pause process in {}", cgroup.display()))?;
        Ok(Pause { child: Some(child) })
    }

    /// The process id (0 once killed).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// `/proc/<pid>/ns/net`: what `mesh_agent::podns::PodNetns::netns_path` should return for the pod.
    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/net", self.pid()))
    }

    /// Sends SIGKILL and reaps the process: once this returns it is in no cgroup any more.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Pause {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0b6d2d5c-3f0e-4f7b-9a51-1c2d3e4f5a6b";
    const U_: &str = "0b6d2d5c_3f0e_4f7b_9a51_1c2d3e4f5a6b";

    #[test]
    fn layouts_match_kubelet() {
        let cases = [
            (
                Layout::new(Driver::Cgroupfs, Qos::Guaranteed),
                format!("kubepods/pod{UID}"),
            ),
            (
                Layout::new(Driver::Cgroupfs, Qos::Burstable).nested(),
                format!("kubelet/kubepods/burstable/pod{UID}"),
            ),
            (
                Layout::new(Driver::Systemd, Qos::Guaranteed),
                format!("kubepods.slice/kubepods-pod{U_}.slice"),
            ),
            (
                Layout::new(Driver::Systemd, Qos::BestEffort),
                format!(
                    "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{U_}.slice"
                ),
            ),
            (
                Layout::new(Driver::Systemd, Qos::BestEffort).nested(),
                format!(
                    "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/\
                     kubelet-kubepods-besteffort-pod{U_}.slice"
                ),
            ),
        ];
        for (layout, want) in cases {
            assert_eq!(layout.pod_dir(UID), PathBuf::from(want), "{layout:?}");
        }
        let sys = Layout::new(Driver::Systemd, Qos::Burstable);
        assert_eq!(sys.container_name("abc"), "cri-containerd-abc.scope");
        assert_eq!(
            Layout::new(Driver::Cgroupfs, Qos::Burstable).container_name("abc"),
            "abc"
        );
    }
}
