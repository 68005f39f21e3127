//! Small building blocks shared by the guards: unique names, bounded waiting, running host commands.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Prefix of every netns, cgroup and bpffs directory this harness creates: `snw<pid>-`.
///
/// The pid makes names unique between test binaries running at the same time, and lets
/// [`crate::sweep_stale`] recognise leftovers of processes that died without running their destructors.
pub fn prefix() -> String {
    format!("snw{}-", std::process::id())
}

/// A fresh process-unique id, `snw<pid>-<n>`. Short on purpose: it ends up in paths and netns names.
pub fn unique_id() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!("{}{}", prefix(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Polls `f` every `interval` until it returns `Ok` or `timeout` has passed.
///
/// This is the only way the harness and the tests wait for a condition: a bare sleep either wastes time or is too
/// short on a loaded machine. The error carries the last failure, so a timeout explains itself. Bounded in time and
/// also in attempts (at most 100 000), in case `interval` is zero.
pub fn eventually<T>(
    timeout: Duration,
    interval: Duration,
    mut f: impl FnMut() -> Result<T, String>,
) -> Result<T, String> {
    let start = Instant::now();
    let deadline = start + timeout;
    let mut last = String::from("never tried");
    for attempt in 1..=100_000u32 {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) => last = e,
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(format!(
                "condition not met after {:?} ({attempt} attempts); last error: {last}",
                start.elapsed()
            ));
        }
        std::thread::sleep(interval.min(deadline.saturating_duration_since(now)));
    }
    Err(format!(
        "condition not met after 100000 attempts; last error: {last}"
    ))
}

/// Runs a host command to completion and fails with its stderr when it exits non-zero.
pub fn run(program: &str, args: &[&str]) -> Result<Output> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawning {program} {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// Runs `ip <args>`.
pub fn ip(args: &[&str]) -> Result<()> {
    run("ip", args).map(drop)
}

/// The workspace root, as seen when this crate was compiled (`CARGO_MANIFEST_DIR/..`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate has a parent directory")
        .to_path_buf()
}

/// Cargo's target directory: `CARGO_TARGET_DIR` if set at run time, else `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => workspace_root().join("target"),
    }
}

/// The last `n` lines of a text file, or a note saying why there are none.
pub fn tail_file(path: &Path, n: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

/// Milliseconds since the Unix epoch (to line up events of different processes).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Runs a command to completion with a time bound; returns (status, stdout, stderr).
pub fn run_bounded(cmd: &mut Command, timeout: Duration) -> Result<(ExitStatus, String, String)> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))?;
    // Read both pipes on threads so a chatty child cannot block on a full pipe while we wait.
    let mut so = child.stdout.take().expect("piped");
    let mut se = child.stderr.take().expect("piped");
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = so.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = se.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} timed out after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Ok((
        status,
        t_out.join().unwrap_or_default(),
        t_err.join().unwrap_or_default(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eventually_returns_first_success() {
        let mut n = 0;
        let v = eventually(Duration::from_secs(1), Duration::from_millis(1), || {
            n += 1;
            if n < 3 { Err(format!("n={n}")) } else { Ok(n) }
        });
        assert_eq!(v, Ok(3));
    }

    #[test]
    fn eventually_times_out_with_last_error() {
        let start = Instant::now();
        let e = eventually::<()>(Duration::from_millis(50), Duration::from_millis(10), || {
            Err("nope".into())
        })
        .unwrap_err();
        assert!(e.contains("nope"), "{e}");
        assert!(start.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn unique_ids_are_short_and_distinct() {
        let a = unique_id();
        let b = unique_id();
        assert_ne!(a, b);
        assert!(a.starts_with(&prefix()));
        assert!(a.len() <= 16, "{a}");
    }
}
