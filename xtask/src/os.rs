//! The few libc calls `demo` and `bench` need: a Ctrl-C flag and the CPU time of reaped children.
//!
//! Kept in one small module so the rest of xtask stays under the workspace's `unsafe_code = "deny"`.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_sig: libc::c_int) {
    // Only an atomic store: async-signal-safe. The demo and bench poll the flag and return normally, so every
    // harness guard (processes, pins, cgroups, namespaces) is dropped on the way out of `main`.
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Installs the SIGINT/SIGTERM handler that only sets the flag read by [`interrupted`].
pub fn install_interrupt_handler() -> anyhow::Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; the handler is an `extern "C" fn`
        // that only touches an atomic. SA_RESTART keeps blocking calls (pipe reads, waitpid) from failing with EINTR.
        let r = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if r != 0 {
            anyhow::bail!("sigaction({sig}): {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Whether SIGINT or SIGTERM arrived.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Fails with "interrupted" once a signal arrived, so `?` unwinds to `main` and the guards clean up.
pub fn check_interrupt() -> anyhow::Result<()> {
    if interrupted() {
        anyhow::bail!("signal received");
    }
    Ok(())
}

/// Replaces whatever error a Ctrl-C caused (a child killed by the same SIGINT, a failed wait) with a plain
/// "interrupted", keeping the original as context.
pub fn explain_interrupt(r: anyhow::Result<()>) -> anyhow::Result<()> {
    match r {
        Err(e) if interrupted() => {
            Err(e.context("interrupted (SIGINT/SIGTERM); everything was cleaned up"))
        }
        r => r,
    }
}

/// Sleeps up to `d` in short steps, returning early (with an error) when interrupted.
pub fn sleep_interruptible(d: Duration) -> anyhow::Result<()> {
    let step = Duration::from_millis(100);
    let deadline = std::time::Instant::now() + d;
    // Bounded by the deadline: every iteration sleeps at least a little or ends the loop.
    loop {
        check_interrupt()?;
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(step));
    }
}

/// User + system CPU time of every child this process has waited for so far (`getrusage(RUSAGE_CHILDREN)`).
///
/// The difference around one client's wait is that client's `utime + stime`, the same numbers as fields 14 and 15 of
/// `/proc/<pid>/stat`, but in microseconds instead of clock ticks and still readable after the child is reaped.
pub fn children_cpu() -> Duration {
    // SAFETY: getrusage only writes the struct we pass; a zeroed rusage is a valid value.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) != 0 {
            return Duration::ZERO;
        }
        ru
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// User + system CPU time of a running process from `/proc/<pid>/stat` (fields 14 and 15, in clock ticks).
pub fn proc_cpu(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces: count fields after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ')': field 3 is f[0], so utime (14) is f[11] and stime (15) is f[12].
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as u64 } else { 100 };
    Some(Duration::from_micros(ticks * 1_000_000 / hz))
}

/// Turns on the kernel's per-program run-time statistics (`run_time_ns`, `run_cnt` in `bpftool prog show`) for as
/// long as the returned fd is open (`BPF_ENABLE_STATS`). Unlike the `kernel.bpf_stats_enabled` sysctl this cannot
/// be left on by accident: the kernel turns it off when the last such fd closes, also if xtask is killed.
pub fn enable_bpf_stats() -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    const BPF_ENABLE_STATS: libc::c_long = 32;
    // union bpf_attr { struct { __u32 type; } enable_stats; ... } with type = BPF_STATS_RUN_TIME (0). The kernel
    // zero-fills the rest of the union when we pass a shorter size.
    let attr: u32 = 0;
    // SAFETY: the kernel reads `size_of::<u32>()` bytes from a valid u32 and writes nothing back.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_ENABLE_STATS,
            &attr as *const u32,
            std::mem::size_of::<u32>() as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a successful BPF_ENABLE_STATS returns a new fd that nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// Sets an environment variable for this process and the children it starts.
pub fn set_env(key: &str, value: &std::ffi::OsStr) {
    // SAFETY: called from xtask's main thread before demo/bench start any thread (the harness spawns its stdout
    // readers later), so nothing reads the environment concurrently.
    unsafe { std::env::set_var(key, value) }
}
