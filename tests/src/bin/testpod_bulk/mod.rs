//! `sinew-testpod bulk`: bulk throughput over one connection, and many idle connections held open (the
//! benchmark's `bulk` kind and its "proxy memory at 1,000 open connections" probe). Both talk to the `serve` /
//! `echo-server` wire protocol: the server's name line first, then every byte echoed.
//!
//! ```text
//! sinew-testpod bulk --to ADDR [--duration-ms D] [--chunk B] [--timeout-ms T]
//! sinew-testpod bulk --to ADDR --open N [--hold-ms H] [--stop-file PATH] [--timeout-ms T]
//! ```
//! - **Stream** (without `--open`): one connection. After the name line, one thread writes B-byte chunks (default
//!   65536) for D ms (default 1000) while another reads the echo back. The result counts the bytes echoed back
//!   within those D ms (`mb_per_s`, 1 MB = 10^6 bytes: each direction of the path carried that rate), then the
//!   client shuts its write side down and drains the rest of the echo (bounded by T, default 2000 ms per read).
//! - **Open** (`--open N`, at most 4096): opens N connections one after the other, each reading the name line
//!   (so each is known to have reached the server), prints `{"event":"open","opened":n,"failed":f}`, then holds
//!   them idle until H ms (default 10000) have passed or PATH exists. Before closing them, one byte is echoed on
//!   each (`alive`: the connection still carried data after the idle time). The caller measures while they are
//!   held.
//!
//! Both print one JSON result line (`BulkReport` / `OpenReport`) and exit 0 whatever happened to the connections.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{MAX_COUNT, Opts, err_key, print, read_name, usage};

/// Most connections `--open` holds.
const MAX_OPEN: u64 = 4096;
/// Largest chunk a stream writes.
const MAX_CHUNK: u64 = 1 << 20;

/// Result of a stream run.
#[derive(Debug, Default, Serialize)]
struct BulkReport {
    to: String,
    /// Which server answered.
    name: String,
    /// Bytes per write.
    chunk: usize,
    /// The measured window (from the first write until the writer stopped), ms.
    duration_ms: f64,
    /// Bytes written within the window.
    sent_bytes: u64,
    /// Bytes echoed back within the window.
    received_bytes: u64,
    /// `received_bytes` per second of the window, in MB (10^6 bytes).
    mb_per_s: f64,
    /// `sent_bytes` per second of the window, in MB.
    sent_mb_per_s: f64,
    /// Everything written came back before the connection ended (after the window).
    drained: bool,
    /// Bytes echoed back in all, drain included.
    total_received_bytes: u64,
    /// What ended the run early, or broke the drain.
    error: Option<String>,
}

/// Result of `--open`.
#[derive(Debug, Default, Serialize)]
struct OpenReport {
    to: String,
    requested: u64,
    /// Connections that connected and read the name line.
    opened: u64,
    failed: u64,
    /// `stage:errno` -> count.
    errors: BTreeMap<String, u64>,
    /// Time to open them all, ms.
    open_ms: f64,
    /// How long they were held after the last one opened, ms.
    held_ms: f64,
    /// The hold ended because the stop file appeared (else the hold time ran out).
    stopped_by_file: bool,
    /// Connections that echoed one byte after the hold.
    alive: u64,
}

/// `sinew-testpod bulk`: see the module documentation.
pub(super) fn bulk(opts: &Opts) -> io::Result<()> {
    if opts.str("open").is_some() {
        open(opts)
    } else {
        print(&stream(opts))
    }
}

fn timeout_of(opts: &Opts) -> Duration {
    opts.ms("timeout-ms", 2000).max(Duration::from_millis(1))
}

fn connect(
    opts: &Opts,
    timeout: Duration,
) -> Result<(TcpStream, String), (&'static str, io::Error)> {
    let mut s = TcpStream::connect_timeout(&opts.to(), timeout).map_err(|e| ("connect", e))?;
    s.set_nodelay(true).map_err(|e| ("connect", e))?;
    let name = read_name(&mut s, timeout).map_err(|e| ("name", e))?;
    Ok((s, name))
}

fn stream(opts: &Opts) -> BulkReport {
    let duration = opts.ms("duration-ms", 1000);
    let chunk = opts.num("chunk", 65536).clamp(1, MAX_CHUNK) as usize;
    let timeout = timeout_of(opts);
    let mut r = BulkReport {
        to: opts.to().to_string(),
        chunk,
        ..Default::default()
    };
    let mut s = match connect(opts, timeout) {
        Ok((s, name)) => {
            r.name = name;
            s
        }
        Err((stage, e)) => {
            r.error = Some(format!("{stage}:{}: {e}", err_key(&e)));
            return r;
        }
    };
    let received = Arc::new(AtomicU64::new(0));
    let reader = match s.try_clone().and_then(|rd| {
        rd.set_read_timeout(Some(timeout))?;
        Ok(rd)
    }) {
        Ok(rd) => {
            let received = received.clone();
            std::thread::spawn(move || drain(rd, &received))
        }
        Err(e) => {
            r.error = Some(format!("clone:{}: {e}", err_key(&e)));
            return r;
        }
    };
    let _ = s.set_write_timeout(Some(timeout));
    let buf = vec![0x5au8; chunk];
    let mut sent = 0u64;
    let start = Instant::now();
    // Bounded by the duration (each write either completes or times out) and by MAX_COUNT writes.
    for _ in 0..MAX_COUNT {
        if start.elapsed() >= duration {
            break;
        }
        if let Err(e) = s.write_all(&buf) {
            r.error = Some(format!("write:{}: {e}", err_key(&e)));
            break;
        }
        sent += chunk as u64;
    }
    let window = start.elapsed().as_secs_f64();
    r.received_bytes = received.load(Ordering::Relaxed);
    r.sent_bytes = sent;
    r.duration_ms = window * 1000.0;
    if window > 0.0 {
        r.mb_per_s = r.received_bytes as f64 / window / 1e6;
        r.sent_mb_per_s = sent as f64 / window / 1e6;
    }
    // The echo of what is still in flight comes back, then the server closes after our EOF.
    let _ = s.shutdown(Shutdown::Write);
    let end = reader
        .join()
        .unwrap_or_else(|_| Err("reader panicked".into()));
    r.total_received_bytes = received.load(Ordering::Relaxed);
    r.drained = end.is_ok() && r.total_received_bytes == sent;
    if let Err(e) = end
        && r.error.is_none()
    {
        r.error = Some(format!("drain: {e}"));
    }
    r
}

/// Reads until EOF, counting bytes; each read is bounded by the socket's read timeout.
fn drain(mut s: TcpStream, received: &AtomicU64) -> Result<(), String> {
    let mut buf = vec![0u8; 256 * 1024];
    // Each iteration reads at least one byte, ends, or fails within the read timeout.
    for _ in 0..MAX_COUNT * 64 {
        match s.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => {
                received.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("read:{}: {e}", err_key(&e))),
        }
    }
    Err("too many reads".into())
}

fn open(opts: &Opts) -> io::Result<()> {
    let n = opts.num("open", 0);
    if n == 0 || n > MAX_OPEN {
        usage(&format!("--open: 1 to {MAX_OPEN} connections"));
    }
    let hold = opts.ms("hold-ms", 10_000);
    let stop_file = opts.str("stop-file").map(Path::new);
    let timeout = timeout_of(opts);
    let mut r = OpenReport {
        to: opts.to().to_string(),
        requested: n,
        ..Default::default()
    };
    let t0 = Instant::now();
    let mut conns = Vec::new();
    for _ in 0..n {
        match connect(opts, timeout) {
            Ok((s, _)) => {
                conns.push(s);
                r.opened += 1;
            }
            Err((stage, e)) => {
                r.failed += 1;
                *r.errors
                    .entry(format!("{stage}:{}", err_key(&e)))
                    .or_default() += 1;
            }
        }
    }
    r.open_ms = t0.elapsed().as_secs_f64() * 1000.0;
    print(&serde_json::json!({"event": "open", "opened": r.opened, "failed": r.failed}))?;
    let held = Instant::now();
    // Bounded by the hold time (at most MAX_DURATION through `Opts::ms`).
    while held.elapsed() < hold {
        if stop_file.is_some_and(Path::exists) {
            r.stopped_by_file = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20).min(hold.saturating_sub(held.elapsed())));
    }
    r.held_ms = held.elapsed().as_secs_f64() * 1000.0;
    for s in &mut conns {
        let _ = s.set_read_timeout(Some(timeout));
        let mut b = [0u8; 1];
        if s.write_all(b"x").and_then(|_| s.read_exact(&mut b)).is_ok() && b == *b"x" {
            r.alive += 1;
        }
    }
    drop(conns);
    print(&r)
}
