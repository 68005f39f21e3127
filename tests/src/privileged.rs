//! The one gate in front of every privileged test, and the sweep of leftovers from killed test processes.

use std::io::Write;
use std::path::Path;
use std::sync::Once;

use crate::guards::{BPFFS_ROOT, CGROUP2_ROOT, NETNS_DIR, is_bpffs_mounted};
use crate::util::ip;

/// Why this process cannot run privileged tests, or `None` if it can.
pub fn missing_privileges() -> Option<String> {
    let euid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("Uid:")).and_then(|l| {
                l.split_whitespace()
                    .nth(2)
                    .and_then(|v| v.parse::<u32>().ok())
            })
        });
    if euid != Some(0) {
        return Some(format!("not running as root (euid {euid:?})"));
    }
    let cgroup2 = std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 2 && f[1] == CGROUP2_ROOT && f[2] == "cgroup2"
        });
    if !cgroup2 {
        return Some(format!("no cgroup2 filesystem mounted at {CGROUP2_ROOT}"));
    }
    if crate::util::run("ip", &["-V"]).is_err() {
        return Some("iproute2 (`ip`) is not installed".into());
    }
    None
}

/// Gate for privileged tests: `if !require_privileged("name") { return; }`.
///
/// Returns `true` when the test can run. Otherwise it prints a loud skip message and returns `false`, except when
/// the environment variable `CI` is set to anything non-empty: then it panics, so CI can never pass by skipping.
/// The first call in a process also removes leftovers of earlier test processes that died without cleaning up.
pub fn require_privileged(test_name: &str) -> bool {
    match missing_privileges() {
        None => {
            static SWEEP: Once = Once::new();
            SWEEP.call_once(sweep_stale);
            true
        }
        Some(why) => {
            if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
                panic!("{test_name}: privileged test cannot run under CI: {why}");
            }
            // Written to the stderr handle directly: libtest captures `eprintln!` of passing tests, and a skip must
            // be visible.
            let banner = format!(
                "\n{bar}\n## SKIPPED privileged test `{test_name}`: {why}\n## Run as root with cgroup2 at \
                 {CGROUP2_ROOT} (CI=true turns this skip into a failure).\n{bar}\n",
                bar = "#".repeat(80)
            );
            let _ = std::io::stderr().lock().write_all(banner.as_bytes());
            false
        }
    }
}

/// The pid in a harness name `snw<pid>-...`, if the name is one.
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("snw")?;
    let (pid, _) = rest.split_once('-')?;
    pid.parse().ok()
}

/// Whether a harness name belongs to a process that no longer exists.
fn is_stale(name: &str) -> bool {
    match owner_pid(name) {
        Some(pid) => pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists(),
        None => false,
    }
}

/// Removes netns, cgroups and bpffs directories named `snw<pid>-*` whose process is gone (a test binary killed by
/// SIGKILL never runs its destructors). Only names of this exact shape are touched; a pid that was reused by an
/// unrelated process keeps its leftovers until that process exits, which is harmless.
pub fn sweep_stale() {
    let entries = |dir: &str| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    if is_bpffs_mounted(BPFFS_ROOT) {
        for name in entries(BPFFS_ROOT).into_iter().filter(|n| is_stale(n)) {
            let dir = Path::new(BPFFS_ROOT).join(&name);
            eprintln!("sinew-tests: removing stale {}", dir.display());
            let agent_root = dir.join("sinew");
            let bin = crate::agent::agent_bin();
            if agent_root.exists() && bin.exists() {
                let cli = crate::agent::AgentCli {
                    bin,
                    cgroup_root: Some(Path::new(CGROUP2_ROOT).join(&name)),
                    bpffs_root: agent_root,
                };
                let _ = cli.uninstall();
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    for name in entries(CGROUP2_ROOT).into_iter().filter(|n| is_stale(n)) {
        eprintln!("sinew-tests: removing stale cgroup {name}");
        // Adopting the directory in a guard and dropping it kills its processes and removes it.
        drop(crate::guards::Cgroup::adopt(
            Path::new(CGROUP2_ROOT).join(&name),
        ));
    }
    for name in entries(NETNS_DIR).into_iter().filter(|n| is_stale(n)) {
        eprintln!("sinew-tests: removing stale netns {name}");
        let _ = ip(&["netns", "del", &name]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_parses_only_harness_names() {
        assert_eq!(owner_pid("snw123-4-node"), Some(123));
        assert_eq!(owner_pid("snw-4"), None);
        assert_eq!(owner_pid("sinew"), None);
        assert_eq!(owner_pid("snwx-1"), None);
        assert!(!is_stale(&format!("snw{}-0", std::process::id())));
    }
}
