//! The harness's only unsafe code: entering a pod between `fork` and `exec`, and sending signals.
//!
//! Kept in one small module so the rest of the crate stays under the workspace's `unsafe_code = "deny"`.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

/// Makes `cmd`'s child join the cgroup whose `cgroup.procs` is given, then the network namespace at `netns`.
///
/// Order matters: the cgroup is joined first, by path, while the child still sees the host's cgroup2 mount. Only
/// the network namespace is switched (not the mount namespace, unlike `ip netns exec`), so /sys/fs/cgroup and
/// /sys/fs/bpf stay visible to the child too. Children of the child inherit both.
pub fn enter_pod(cmd: &mut Command, cgroup_procs: &Path, netns: &Path) -> Result<()> {
    // Allocate before fork: the closure runs in the forked child, where only async-signal-safe calls are allowed.
    let cg = CString::new(cgroup_procs.as_os_str().as_bytes())
        .with_context(|| format!("path {}", cgroup_procs.display()))?;
    let ns = CString::new(netns.as_os_str().as_bytes())
        .with_context(|| format!("path {}", netns.display()))?;
    // SAFETY: the closure only calls open/write/setns/close on buffers allocated before the fork, and builds errors
    // from raw errno values (no allocation), so it is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(cg.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // "0" means "the writing process".
            let n = libc::write(fd, b"0".as_ptr().cast(), 1);
            let err = io::Error::last_os_error();
            libc::close(fd);
            if n != 1 {
                return Err(err);
            }
            let fd = libc::open(ns.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let r = libc::setns(fd, libc::CLONE_NEWNET);
            let err = io::Error::last_os_error();
            libc::close(fd);
            if r != 0 {
                return Err(err);
            }
            Ok(())
        });
    }
    Ok(())
}

/// Sends `sig` to `pid`.
pub fn signal(pid: u32, sig: libc::c_int) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: kill(2) has no memory-safety preconditions.
    if unsafe { libc::kill(pid, sig) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
