//! Finding a pod's network namespace on a node from its UID: kubepods cgroup, then a process, then its netns.
//!
//! No CNI plugin, container runtime socket or kubelet API is involved; only two filesystems the agent already sees
//! with `hostPID: true` and the host's cgroup2 mount:
//!
//! 1. **Pod cgroup.** The kubelet puts every pod in a cgroup named after its UID, below a `kubepods` hierarchy whose
//!    shape depends on its cgroup driver and the pod's QoS class:
//!    - cgroupfs: `kubepods/pod<uid>`, `kubepods/burstable/pod<uid>`, `kubepods/besteffort/pod<uid>`;
//!    - systemd: `kubepods.slice/kubepods-pod<uid_>.slice`,
//!      `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice`, and the same for
//!      `besteffort` (`uid_` is the UID with `-` replaced by `_`, since `-` separates systemd slice levels).
//!
//!    The hierarchy may sit below another cgroup (kind: `kubelet.slice/kubelet-kubepods.slice/...`, some distros:
//!    `kubelet/kubepods/...`), so [`PodNetns`] walks down from the cgroup root, at most [`MAX_DEPTH`] levels and
//!    only into directories named like kubelet's (`*kubepods*`, `*kubelet*`, `burstable`, `besteffort`). It never
//!    enters a pod's own directory while searching, so a node with thousands of cgroups costs a handful of
//!    `readdir`s. Every pod directory seen on the way is cached (UID → directory); a cached directory is re-checked
//!    on each lookup and searched for again when it is gone.
//! 2. **Its processes.** `cgroup.procs` of the pod directory and its descendants (container scopes such as
//!    `cri-containerd-<id>.scope`, `crio-<id>.scope`, `docker-<id>.scope`, or cgroupfs `<container-id>/`), level
//!    by level, shallowest first, and within a level oldest first (`/proc/<pid>/stat` field 22). Under cgroup v2
//!    only leaves hold processes, so the sandbox ("pause") process sits one level below the pod directory next to
//!    the app containers, and it started first: its netns *is* the pod's, even if a container later made network
//!    namespaces of its own (Chromium's sandbox, or nested runtimes in deeper cgroups).
//! 3. **The first netns that is not the node's.** `<proc_root>/<pid>/ns/net` of the first candidate whose netns
//!    opens and differs (`st_dev`/`st_ino`) from the node's: `<proc_root>/1/ns/net`, and the agent's own
//!    `<proc_root>/self/ns/net` (the node's for a `hostNetwork` agent; it still stands in for pid 1's where that
//!    cannot be read, as in a sandbox that hides its init); [`PodNetns::with_host_netns`] adds more.
//!    Processes in the node's netns are skipped because runtime helpers live in the pod's cgroup but not in its
//!    netns (CRI-O's `crio-conmon-<id>.scope` by default on OpenShift). When every process is in the node's netns
//!    the pod is a `hostNetwork` pod: [`NetnsError::HostNetwork`], so the node's own traffic never gets a pod
//!    identity.
//!
//! Nothing is cached negatively: a pod whose cgroup or process is not there yet (it starts after the agent) gives an
//! error, and the caller simply asks again on its next pass. Directories and processes that vanish while being
//! looked at are skipped, never a panic.
//!
//! Static pods: the kubelet names their cgroup after the config hash, which is what the mirror pod's
//! `kubernetes.io/config.mirror` annotation holds, not the mirror pod's API UID; callers pass that hash instead.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// How many directory levels below the cgroup root the search for a pod directory goes (the pod directory itself
/// included). The deepest known layout, kind's, has its pod directories four levels down.
pub const MAX_DEPTH: usize = 6;

/// How many directory levels below the pod directory the search for a process goes. Container scopes are one
/// level down; deeper levels only matter for runtimes that nest their own cgroups.
const MAX_PROC_DEPTH: usize = 8;

/// How many pids of one level are considered (a pod with thousands of processes must not cost thousands of `stat`
/// reads; the sandbox process is among the first listed in practice anyway).
const MAX_PIDS_PER_LEVEL: usize = 256;

/// A namespace's identity: `(st_dev, st_ino)` of its nsfs file, the same for every path that names it.
type NsId = (u64, u64);

/// Finds pods' network namespaces from their UIDs, and caches where their cgroups are.
#[derive(Debug)]
pub struct PodNetns {
    cgroup_root: PathBuf,
    proc_root: PathBuf,
    /// More network namespaces no pod may claim, besides the defaults (see [`PodNetns::with_host_netns`]).
    extra_host_netns: Vec<PathBuf>,
    /// UID → pod cgroup directory, for every pod directory a search came across.
    dirs: HashMap<String, PathBuf>,
}

/// Why a pod's network namespace could not be found. Each message names the UID and the paths looked at.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// No pod cgroup with this UID below the cgroup root: the pod is not (yet) running on this node.
    #[error(
        "pod {uid}: no pod cgroup below {} (looked for pod{uid} and *-pod{}.slice in directories named \
         *kubepods*/*kubelet*, up to {MAX_DEPTH} levels deep); the pod is not running on this node yet",
        root.display(), uid.replace('-', "_")
    )]
    NoCgroup {
        /// The pod UID.
        uid: String,
        /// The cgroup root that was searched.
        root: PathBuf,
    },
    /// The pod cgroup exists but no usable process is in it or below it.
    #[error("pod {uid}: no process in {} or below: {detail}", cgroup.display())]
    NoProcess {
        /// The pod UID.
        uid: String,
        /// The pod's cgroup directory.
        cgroup: PathBuf,
        /// What was found instead (nothing yet, processes that exited, or pids hidden from this pid namespace).
        detail: String,
    },
    /// Every process of the pod is in the node's own network namespace: a `hostNetwork` pod.
    #[error(
        "pod {uid}: {} is the host network namespace (same as {}): a hostNetwork pod, which never gets a pod \
         identity", path.display(), host.display()
    )]
    HostNetwork {
        /// The pod UID.
        uid: String,
        /// The netns of the pod's first process.
        path: PathBuf,
        /// The node's netns it is the same as (`<proc_root>/1/ns/net`, `<proc_root>/self/ns/net`, or one added
        /// with [`PodNetns::with_host_netns`]).
        host: PathBuf,
    },
    /// A filesystem error other than "it is gone": unreadable cgroup root, no permission to open a netns, ...
    #[error("pod {uid}: {}: {source}", path.display())]
    Io {
        /// The pod UID.
        uid: String,
        /// The path that failed.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// What a directory name says about kubelet's hierarchy.
#[derive(Debug, PartialEq, Eq)]
enum Entry {
    /// A pod directory, with the pod's UID (dashes restored).
    Pod(String),
    /// A directory of kubelet's hierarchy to search below (`kubepods.slice`, `burstable`, `kubelet.slice`, ...).
    Descend,
    /// Anything else (`system.slice`, `user.slice`, `init.scope`, ...): not searched.
    Skip,
}

impl PodNetns {
    /// A finder over the cgroup2 mount (or a subtree of it) at `cgroup_root` and the proc filesystem at
    /// `proc_root` (`/proc` for an agent with `hostPID: true`).
    pub fn new(cgroup_root: impl Into<PathBuf>, proc_root: impl Into<PathBuf>) -> Self {
        PodNetns {
            cgroup_root: cgroup_root.into(),
            proc_root: proc_root.into(),
            extra_host_netns: Vec::new(),
            dirs: HashMap::new(),
        }
    }

    /// Adds network namespaces a pod is refused in ([`NetnsError::HostNetwork`]); each must be readable.
    ///
    /// Always refused: `<proc_root>/1/ns/net` (the node's, seen through `hostPID`) and `<proc_root>/self/ns/net`
    /// (the agent's own: the node's too for a `hostNetwork` agent, and never a workload's otherwise), of which
    /// those that can be read are used, and at least one must be. Tests that simulate a node in a network
    /// namespace add the node's namespace here.
    pub fn with_host_netns(mut self, paths: impl IntoIterator<Item = impl Into<PathBuf>>) -> Self {
        self.extra_host_netns
            .extend(paths.into_iter().map(Into::into));
        self
    }

    /// `<proc_root>/<pid>/ns/net` of a process of the pod with this UID.
    ///
    /// The path is checked to open just before it is returned; the caller opens it again, and if the process has
    /// exited in between, that fails and the next call finds another one. Never a host network namespace (see
    /// [`PodNetns::with_host_netns`]).
    pub fn netns_path(&mut self, uid: &str) -> Result<PathBuf, NetnsError> {
        let cgroup = self.pod_cgroup(uid)?;
        let hosts = self.host_ids(uid)?;
        let mut hidden = 0;
        let mut exited = Vec::new();
        let mut in_host = None;
        let mut failed = None;
        let mut level = vec![cgroup.clone()];
        for _ in 0..=MAX_PROC_DEPTH {
            let (pids, next) = self.level_pids(&level, &mut hidden);
            for pid in pids {
                let path = self.proc_root.join(pid.to_string()).join("ns/net");
                match fs::File::open(&path).and_then(|f| f.metadata()) {
                    Ok(m) => match hosts.iter().find(|(id, _)| *id == (m.dev(), m.ino())) {
                        // A runtime helper (CRI-O's conmon, a shim) or a hostNetwork pod: look further.
                        Some((_, host)) => {
                            in_host.get_or_insert((path, host.clone()));
                        }
                        None => return Ok(path),
                    },
                    Err(e) if is_gone(&e) => exited.push(pid),
                    Err(source) => {
                        failed.get_or_insert((path, source));
                    }
                }
            }
            if next.is_empty() {
                break;
            }
            level = next;
        }
        let uid = uid.to_string();
        if let Some((path, source)) = failed {
            return Err(NetnsError::Io { uid, path, source });
        }
        if let Some((path, host)) = in_host {
            return Err(NetnsError::HostNetwork { uid, path, host });
        }
        let detail = if !exited.is_empty() {
            format!(
                "its processes {exited:?} exited while being looked at (a container restarting?)"
            )
        } else if hidden > 0 {
            format!(
                "its {hidden} process(es) are outside this agent's pid namespace (cgroup.procs lists them as 0); \
                 the agent needs hostPID: true"
            )
        } else {
            "no process yet (the pod sandbox is still starting) or none left (it is terminating)"
                .to_string()
        };
        Err(NetnsError::NoProcess {
            uid,
            cgroup,
            detail,
        })
    }

    /// `(st_dev, st_ino)` of each network namespace no pod may have, with its path.
    fn host_ids(&self, uid: &str) -> Result<Vec<(NsId, PathBuf)>, NetnsError> {
        let io = |path: &Path, source| NetnsError::Io {
            uid: uid.to_string(),
            path: path.to_path_buf(),
            source,
        };
        let mut ids = Vec::new();
        let mut first_err = None;
        for path in [
            self.proc_root.join("1/ns/net"),
            self.proc_root.join("self/ns/net"),
        ] {
            match fs::metadata(&path) {
                Ok(m) => ids.push(((m.dev(), m.ino()), path)),
                Err(e) => {
                    first_err.get_or_insert_with(|| io(&path, e));
                }
            }
        }
        if let (true, Some(e)) = (ids.is_empty(), first_err) {
            return Err(e);
        }
        for path in &self.extra_host_netns {
            let m = fs::metadata(path).map_err(|e| io(path, e))?;
            ids.push(((m.dev(), m.ino()), path.clone()));
        }
        Ok(ids)
    }

    /// The pod's cgroup directory: the cached one if it still exists, otherwise a fresh search.
    pub fn pod_cgroup(&mut self, uid: &str) -> Result<PathBuf, NetnsError> {
        if let Some(dir) = self.dirs.get(uid) {
            if dir.is_dir() {
                return Ok(dir.clone());
            }
            self.dirs.remove(uid);
        }
        self.search().map_err(|source| NetnsError::Io {
            uid: uid.to_string(),
            path: self.cgroup_root.clone(),
            source,
        })?;
        self.dirs
            .get(uid)
            .cloned()
            .ok_or_else(|| NetnsError::NoCgroup {
                uid: uid.to_string(),
                root: self.cgroup_root.clone(),
            })
    }

    /// Drops cached cgroup dirs of pods not in `uids` (pods that are gone).
    pub fn retain(&mut self, uids: &BTreeSet<String>) {
        self.dirs.retain(|uid, _| uids.contains(uid));
    }

    /// How many pod directories are cached.
    pub fn cached(&self) -> usize {
        self.dirs.len()
    }

    /// Walks kubelet's hierarchy below the cgroup root and caches every pod directory in it. Only an unreadable
    /// cgroup root is an error; subdirectories that vanish or cannot be read are skipped.
    fn search(&mut self) -> io::Result<()> {
        let mut level = vec![self.cgroup_root.clone()];
        for depth in 1..=MAX_DEPTH {
            let mut next = Vec::new();
            for dir in &level {
                let rd = match fs::read_dir(dir) {
                    Ok(rd) => rd,
                    Err(e) if depth == 1 => return Err(e),
                    Err(_) => continue,
                };
                for e in rd.flatten() {
                    if !e.file_type().is_ok_and(|t| t.is_dir()) {
                        continue;
                    }
                    let Some(name) = e.file_name().to_str().map(classify) else {
                        continue;
                    };
                    match name {
                        Entry::Pod(uid) => {
                            self.dirs.insert(uid, e.path());
                        }
                        Entry::Descend if depth < MAX_DEPTH => next.push(e.path()),
                        Entry::Descend | Entry::Skip => {}
                    }
                }
            }
            if next.is_empty() {
                break;
            }
            level = next;
        }
        Ok(())
    }

    /// The processes in the cgroups `level` (one level of a pod's subtree), oldest first, and the cgroups of the
    /// next level. Entries that read as 0 are counted in `hidden`.
    fn level_pids(&self, level: &[PathBuf], hidden: &mut usize) -> (Vec<u32>, Vec<PathBuf>) {
        let mut pids = Vec::new();
        let mut next = Vec::new();
        for d in level {
            if let Ok(text) = fs::read_to_string(d.join("cgroup.procs")) {
                for pid in text.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
                    if pid == 0 {
                        *hidden += 1;
                    } else if pids.len() < MAX_PIDS_PER_LEVEL {
                        pids.push(pid);
                    }
                }
            }
            if let Ok(rd) = fs::read_dir(d) {
                next.extend(
                    rd.flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.path()),
                );
            }
        }
        // Unreadable start times (the process just exited) sort last; ties keep cgroup.procs order.
        pids.sort_by_cached_key(|&pid| self.start_time(pid).unwrap_or(u64::MAX));
        (pids, next)
    }

    /// Field 22 of `<proc_root>/<pid>/stat`: when the process started, in clock ticks since boot.
    fn start_time(&self, pid: u32) -> Option<u64> {
        let stat = fs::read_to_string(self.proc_root.join(pid.to_string()).join("stat")).ok()?;
        // The command name (field 2) is in parentheses and may contain spaces or ')': fields 3.. follow the last ')'.
        let (_, rest) = stat.rsplit_once(')')?;
        rest.split_whitespace().nth(19)?.parse().ok()
    }
}

/// Whether an error opening `/proc/<pid>/...` means the process is gone.
fn is_gone(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH)
}

/// What a cgroup directory name means for the search.
fn classify(name: &str) -> Entry {
    // cgroupfs driver: `pod<uid>` with the UID as the API server spells it.
    if let Some(uid) = name.strip_prefix("pod") {
        if is_uid(uid, '-') {
            return Entry::Pod(uid.to_string());
        }
    }
    // systemd driver: `<parent slices>-pod<uid_>.slice`.
    if let Some((parent, uid)) = name
        .strip_suffix(".slice")
        .and_then(|stem| stem.rsplit_once("-pod"))
    {
        if parent.contains("kubepods") && is_uid(uid, '_') {
            return Entry::Pod(uid.replace('_', "-"));
        }
    }
    if name.contains("kubepods")
        || name.contains("kubelet")
        || name == "burstable"
        || name == "besteffort"
    {
        Entry::Descend
    } else {
        Entry::Skip
    }
}

/// Whether `s` looks like a pod UID with `sep` between its groups (a UUID, or the hex hash of a static pod).
fn is_uid(s: &str, sep: char) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == sep)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use std::sync::atomic::{AtomicU32, Ordering};

    const UID: &str = "0b6d2d5c-3f0e-4f7b-9a51-1c2d3e4f5a6b";
    const OTHER: &str = "11111111-2222-3333-4444-555555555555";

    /// A scratch tree imitating a node: `cg/` as the cgroup2 mount, `proc/` as the proc filesystem. Removed on drop.
    struct Node {
        dir: PathBuf,
    }

    impl Node {
        /// `proc/1/ns/net` is a plain file: the "host" netns, distinct from the pods' (`/proc/self/ns/net`).
        fn new() -> Node {
            static N: AtomicU32 = AtomicU32::new(0);
            let dir = std::env::temp_dir().join(format!(
                "sinew-podns-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(dir.join("cg/system.slice/containerd.service")).unwrap();
            fs::create_dir_all(dir.join("proc/1/ns")).unwrap();
            fs::write(dir.join("proc/1/ns/net"), "host").unwrap();
            Node { dir }
        }

        fn cg(&self) -> PathBuf {
            self.dir.join("cg")
        }

        fn finder(&self) -> PodNetns {
            PodNetns::new(self.cg(), self.dir.join("proc"))
        }

        /// Creates `cg/<rel>` with a `cgroup.procs` listing `pids`.
        fn cgroup(&self, rel: &str, pids: &[u32]) -> PathBuf {
            let d = self.cg().join(rel);
            fs::create_dir_all(&d).unwrap();
            let text: String = pids.iter().map(|p| format!("{p}\n")).collect();
            fs::write(d.join("cgroup.procs"), text).unwrap();
            d
        }

        /// A process `pid` whose netns is `/proc/self/ns/net` (not the fake host's), started at `start` ticks.
        fn process(&self, pid: u32, start: u64) {
            self.process_in(pid, start, Path::new("/proc/self/ns/net"));
        }

        fn process_in(&self, pid: u32, start: u64, netns: &Path) {
            let d = self.dir.join(format!("proc/{pid}"));
            fs::create_dir_all(d.join("ns")).unwrap();
            symlink(netns, d.join("ns/net")).unwrap();
            // Fields 3..=22 after the command name, which has a space and a ')' to trip naive parsers.
            let mut fields = vec!["S".to_string()];
            fields.extend((4..=21).map(|i| i.to_string()));
            fields.push(start.to_string());
            fs::write(
                d.join("stat"),
                format!("{pid} (pau) se) {} 0 0\n", fields.join(" ")),
            )
            .unwrap();
        }

        fn netns(&self, pid: u32) -> PathBuf {
            self.dir.join(format!("proc/{pid}/ns/net"))
        }
    }

    impl Drop for Node {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }

    fn us(uid: &str) -> String {
        uid.replace('-', "_")
    }

    /// Every layout kubelet makes, relative to the cgroup root.
    fn layouts(uid: &str) -> Vec<String> {
        let u = us(uid);
        vec![
            format!("kubepods/pod{uid}"),
            format!("kubepods/burstable/pod{uid}"),
            format!("kubepods/besteffort/pod{uid}"),
            format!("kubepods.slice/kubepods-pod{u}.slice"),
            format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice"),
            format!("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice"),
            format!(
                "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/\
                 kubelet-kubepods-besteffort-pod{u}.slice"
            ),
            format!("kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod{u}.slice"),
            format!("kubelet/kubepods/burstable/pod{uid}"),
        ]
    }

    #[test]
    fn classifies_directory_names() {
        let u = us(UID);
        assert_eq!(classify(&format!("pod{UID}")), Entry::Pod(UID.into()));
        for name in [
            format!("kubepods-pod{u}.slice"),
            format!("kubepods-burstable-pod{u}.slice"),
            format!("kubelet-kubepods-besteffort-pod{u}.slice"),
        ] {
            assert_eq!(classify(&name), Entry::Pod(UID.into()), "{name}");
        }
        for name in [
            "kubepods",
            "kubepods.slice",
            "kubepods-besteffort.slice",
            "kubelet.slice",
            "kubelet",
            "burstable",
            "besteffort",
        ] {
            assert_eq!(classify(name), Entry::Descend, "{name}");
        }
        for name in [
            "system.slice",
            "user.slice",
            "init.scope",
            "pod",
            "pod.slice",
            "cri-containerd-abc.scope",
            "podman-pod1.slice",
        ] {
            assert_eq!(classify(name), Entry::Skip, "{name}");
        }
    }

    #[test]
    fn finds_the_pod_in_every_layout() {
        for rel in layouts(UID) {
            let node = Node::new();
            // Another pod next to it, to make sure the right one is picked.
            let other = rel.replace(UID, OTHER).replace(&us(UID), &us(OTHER));
            node.cgroup(&format!("{other}/cri-containerd-b.scope"), &[200]);
            node.process(200, 1);
            node.cgroup(&format!("{rel}/cri-containerd-a.scope"), &[100]);
            node.process(100, 1);
            let mut f = node.finder();
            assert_eq!(f.netns_path(UID).unwrap(), node.netns(100), "{rel}");
            assert_eq!(f.pod_cgroup(UID).unwrap(), node.cg().join(&rel), "{rel}");
            assert_eq!(f.netns_path(OTHER).unwrap(), node.netns(200), "{rel}");
        }
    }

    #[test]
    fn unknown_uid_is_no_cgroup_and_names_what_was_searched() {
        let node = Node::new();
        node.cgroup(&format!("kubepods/pod{OTHER}/c"), &[100]);
        node.process(100, 1);
        let err = node.finder().netns_path(UID).unwrap_err();
        assert!(matches!(err, NetnsError::NoCgroup { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains(UID) && msg.contains(&us(UID)), "{msg}");
        assert!(msg.contains(&node.cg().display().to_string()), "{msg}");
    }

    #[test]
    fn search_is_bounded_to_kubelet_directories_and_depth() {
        let node = Node::new();
        // Outside kubelet's hierarchy: not searched.
        node.cgroup(&format!("system.slice/pod{UID}/c"), &[100]);
        node.process(100, 1);
        // Too deep: the pod directory would be level MAX_DEPTH + 1.
        node.cgroup(
            &format!("kubelet/kubelet/kubelet/kubelet/kubelet/kubepods/pod{OTHER}/c"),
            &[100],
        );
        let mut f = node.finder();
        assert!(matches!(
            f.netns_path(UID),
            Err(NetnsError::NoCgroup { .. })
        ));
        assert!(matches!(
            f.netns_path(OTHER),
            Err(NetnsError::NoCgroup { .. })
        ));
        // At exactly MAX_DEPTH it is found.
        node.cgroup(
            &format!("kubelet/kubelet/kubelet/kubelet/kubepods/pod{OTHER}/c"),
            &[100],
        );
        assert_eq!(f.netns_path(OTHER).unwrap(), node.netns(100));
    }

    #[test]
    fn missing_cgroup_root_is_an_io_error() {
        let node = Node::new();
        let mut f = PodNetns::new(node.dir.join("nope"), node.dir.join("proc"));
        let err = f.netns_path(UID).unwrap_err();
        assert!(matches!(err, NetnsError::Io { .. }), "{err}");
        assert!(err.to_string().contains("nope"), "{err}");
    }

    #[test]
    fn process_only_in_a_container_child() {
        let node = Node::new();
        let pod = format!("kubepods.slice/kubepods-pod{}.slice", us(UID));
        node.cgroup(&pod, &[]);
        node.cgroup(&format!("{pod}/crio-0123.scope"), &[]);
        node.cgroup(&format!("{pod}/crio-4567.scope"), &[300]);
        node.process(300, 5);
        assert_eq!(node.finder().netns_path(UID).unwrap(), node.netns(300));
    }

    #[test]
    fn shallowest_then_oldest_process_wins() {
        let node = Node::new();
        let pod = format!("kubepods/pod{UID}");
        // An app container started later, and deeper, a nested runtime's container in a netns of its own.
        node.cgroup(&format!("{pod}/app"), &[50]);
        node.process_in(50, 900, Path::new("/proc/1/ns/net"));
        node.cgroup(&format!("{pod}/app/docker/inner"), &[60]);
        node.process(60, 10);
        // The sandbox: oldest at the shallowest level, listed after the app container.
        node.cgroup(&format!("{pod}/pause"), &[70]);
        node.process(70, 100);
        assert_eq!(node.finder().netns_path(UID).unwrap(), node.netns(70));
    }

    #[test]
    fn exited_processes_are_skipped() {
        let node = Node::new();
        let pod = format!("kubepods/besteffort/pod{UID}");
        // 400 is listed but has no /proc entry any more (exited between the two reads).
        node.cgroup(&format!("{pod}/a"), &[400, 401]);
        node.process(401, 7);
        assert_eq!(node.finder().netns_path(UID).unwrap(), node.netns(401));

        let node = Node::new();
        node.cgroup(&format!("{pod}/a"), &[400]);
        let err = node.finder().netns_path(UID).unwrap_err();
        assert!(matches!(err, NetnsError::NoProcess { .. }), "{err}");
        assert!(err.to_string().contains("[400]"), "{err}");
    }

    #[test]
    fn unreadable_netns_is_an_io_error_unless_another_process_works() {
        let node = Node::new();
        node.cgroup(&format!("kubepods/pod{UID}/c"), &[600]);
        // A symlink to itself: ELOOP, neither "gone" nor a namespace.
        fs::create_dir_all(node.dir.join("proc/600/ns")).unwrap();
        symlink(node.netns(600), node.netns(600)).unwrap();
        let err = node.finder().netns_path(UID).unwrap_err();
        assert!(matches!(err, NetnsError::Io { .. }), "{err}");
        assert!(err.to_string().contains("600/ns/net"), "{err}");
        node.cgroup(&format!("kubepods/pod{UID}/c"), &[600, 601]);
        node.process(601, 1);
        assert_eq!(node.finder().netns_path(UID).unwrap(), node.netns(601));
    }

    #[test]
    fn empty_pod_cgroup_is_no_process() {
        let node = Node::new();
        let pod = node.cgroup(&format!("kubepods/pod{UID}"), &[]);
        let err = node.finder().netns_path(UID).unwrap_err();
        match &err {
            NetnsError::NoProcess { cgroup, .. } => assert_eq!(cgroup, &pod),
            _ => panic!("{err}"),
        }
        assert!(err.to_string().contains(UID), "{err}");
    }

    #[test]
    fn only_pid_zero_entries_ask_for_host_pid() {
        let node = Node::new();
        node.cgroup(&format!("kubepods/pod{UID}/c"), &[0, 0]);
        let err = node.finder().netns_path(UID).unwrap_err();
        assert!(matches!(err, NetnsError::NoProcess { .. }), "{err}");
        assert!(err.to_string().contains("hostPID"), "{err}");
    }

    #[test]
    fn host_network_pod_is_refused() {
        let node = Node::new();
        let host = node.dir.join("proc/1/ns/net");
        // Every process of the pod shares the "host" netns file.
        node.cgroup(&format!("kubepods/pod{UID}/pause"), &[500]);
        node.process_in(500, 1, &host);
        node.cgroup(&format!("kubepods/pod{UID}/app"), &[501, 502]);
        node.process_in(501, 2, &host);
        node.process_in(502, 3, &host);
        let err = node.finder().netns_path(UID).unwrap_err();
        match &err {
            NetnsError::HostNetwork { path, host: h, .. } => {
                // The first (oldest) process is named.
                assert_eq!(path, &node.netns(500));
                assert_eq!(h, &host);
            }
            _ => panic!("{err}"),
        }
        assert!(err.to_string().contains(UID), "{err}");
    }

    #[test]
    fn runtime_helpers_in_the_host_netns_are_skipped() {
        let node = Node::new();
        let host = node.dir.join("proc/1/ns/net");
        let pod = format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
            us(UID)
        );
        // CRI-O's conmon starts before the sandbox, in the pod's cgroup and the node's netns.
        node.cgroup(&format!("{pod}/crio-conmon-aaa.scope"), &[10]);
        node.process_in(10, 1, &host);
        node.cgroup(&format!("{pod}/crio-aaa.scope"), &[11]);
        node.process(11, 2);
        assert_eq!(node.finder().netns_path(UID).unwrap(), node.netns(11));
    }

    #[test]
    fn deeper_levels_are_tried_when_the_shallower_are_all_host() {
        let node = Node::new();
        let host = node.dir.join("proc/1/ns/net");
        // A shim in the pod directory itself (cgroup v1 style), the sandbox one level down.
        node.cgroup(&format!("kubepods/pod{UID}"), &[10]);
        node.process_in(10, 1, &host);
        node.cgroup(&format!("kubepods/pod{UID}/sandbox"), &[11]);
        node.process(11, 2);
        assert_eq!(node.finder().netns_path(UID).unwrap(), node.netns(11));
    }

    #[test]
    fn agents_own_netns_is_refused_too() {
        let node = Node::new();
        fs::create_dir_all(node.dir.join("proc/self/ns")).unwrap();
        symlink("/proc/self/ns/net", node.dir.join("proc/self/ns/net")).unwrap();
        node.cgroup(&format!("kubepods/pod{UID}/c"), &[500]);
        node.process(500, 1);
        match node.finder().netns_path(UID) {
            Err(NetnsError::HostNetwork { host, .. }) => {
                assert_eq!(host, node.dir.join("proc/self/ns/net"))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unreadable_pid_one_falls_back_to_the_agents_netns() {
        let node = Node::new();
        fs::remove_file(node.dir.join("proc/1/ns/net")).unwrap();
        node.cgroup(&format!("kubepods/pod{UID}/c"), &[500]);
        node.process(500, 1);
        // Neither readable: no way to tell a hostNetwork pod, so nothing is returned.
        let err = node.finder().netns_path(UID).unwrap_err();
        assert!(matches!(err, NetnsError::Io { .. }), "{err}");
        assert!(err.to_string().contains("1/ns/net"), "{err}");
        // The agent's own (here: a file standing for another netns) is enough.
        fs::create_dir_all(node.dir.join("proc/self/ns")).unwrap();
        fs::write(node.dir.join("proc/self/ns/net"), "agent").unwrap();
        assert_eq!(node.finder().netns_path(UID).unwrap(), node.netns(500));
    }

    #[test]
    fn host_netns_can_be_added() {
        let node = Node::new();
        node.cgroup(&format!("kubepods/pod{UID}/c"), &[500]);
        node.process(500, 1);
        let mut f = node.finder().with_host_netns(["/proc/self/ns/net"]);
        match f.netns_path(UID) {
            Err(NetnsError::HostNetwork { host, .. }) => {
                assert_eq!(host, Path::new("/proc/self/ns/net"))
            }
            other => panic!("{other:?}"),
        }
        // The defaults still apply.
        let mut f = node
            .finder()
            .with_host_netns([node.dir.join("proc/1/ns/net")]);
        assert_eq!(f.netns_path(UID).unwrap(), node.netns(500));
        node.cgroup(&format!("kubepods/pod{OTHER}/c"), &[501]);
        node.process_in(501, 1, &node.dir.join("proc/1/ns/net"));
        let mut f = node.finder().with_host_netns(["/proc/self/ns/net"]);
        assert!(matches!(
            f.netns_path(OTHER),
            Err(NetnsError::HostNetwork { .. })
        ));
        // Every one added must be readable.
        let mut f = node.finder().with_host_netns([node.dir.join("missing")]);
        let err = f.netns_path(UID).unwrap_err();
        assert!(matches!(err, NetnsError::Io { .. }), "{err}");
        assert!(err.to_string().contains("missing"), "{err}");
    }

    #[test]
    fn stale_cache_is_searched_again() {
        let node = Node::new();
        let old = node.cgroup(&format!("kubepods/burstable/pod{UID}/c"), &[100]);
        node.process(100, 1);
        let mut f = node.finder();
        assert_eq!(f.netns_path(UID).unwrap(), node.netns(100));
        fs::remove_dir_all(old.parent().unwrap()).unwrap();
        assert!(matches!(
            f.netns_path(UID),
            Err(NetnsError::NoCgroup { .. })
        ));
        assert_eq!(f.cached(), 0);
        // Back under another layout (a different node setup in the same tree): found there.
        node.cgroup(
            &format!("kubepods.slice/kubepods-pod{}.slice/c", us(UID)),
            &[100],
        );
        assert_eq!(f.netns_path(UID).unwrap(), node.netns(100));
    }

    #[test]
    fn pods_starting_later_are_found_on_the_next_call() {
        let node = Node::new();
        let mut f = node.finder();
        assert!(matches!(
            f.netns_path(UID),
            Err(NetnsError::NoCgroup { .. })
        ));
        let pod = node.cgroup(&format!("kubepods/pod{UID}"), &[]);
        assert!(matches!(
            f.netns_path(UID),
            Err(NetnsError::NoProcess { .. })
        ));
        node.cgroup(&format!("kubepods/pod{UID}/c"), &[100]);
        node.process(100, 1);
        assert_eq!(f.netns_path(UID).unwrap(), node.netns(100));
        assert_eq!(f.pod_cgroup(UID).unwrap(), pod);
    }

    #[test]
    fn retain_drops_pods_that_are_gone() {
        let node = Node::new();
        node.cgroup(&format!("kubepods/pod{UID}/c"), &[100]);
        node.cgroup(&format!("kubepods/pod{OTHER}/c"), &[100]);
        node.process(100, 1);
        let mut f = node.finder();
        f.netns_path(UID).unwrap();
        // One search caches every pod directory it came across.
        assert_eq!(f.cached(), 2);
        f.retain(&BTreeSet::from([UID.to_string()]));
        assert_eq!(f.cached(), 1);
        assert!(f.dirs.contains_key(UID));
        f.retain(&BTreeSet::new());
        assert_eq!(f.cached(), 0);
    }

    #[test]
    fn start_time_parses_names_with_spaces_and_parens() {
        let node = Node::new();
        node.process(42, 12345);
        assert_eq!(node.finder().start_time(42), Some(12345));
        assert_eq!(node.finder().start_time(43), None);
        // And the real thing, for the field index.
        let me = PodNetns::new("/nonexistent", "/proc");
        assert!(me.start_time(std::process::id()).is_some());
    }
}
