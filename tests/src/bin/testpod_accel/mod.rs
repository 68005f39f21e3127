//! The same-node acceleration matrix's pod tools (issue 6, `tests/sockmap.rs`): byte-exact streams with scripted
//! half-closes, peeks, `FIONREAD` and `sendfile`, verified echoes over one or many connections, and a tokio echo
//! server (edge-triggered epoll). The byte streams are `sinew_tests::sockmap::Pattern`s, so every received byte is
//! checked against its offset.
//!
//! ```text
//! sinew-testpod stream     (--listen PORT | --to ADDR) --script STEP,STEP,.. [--timeout-ms T] [--deadline-ms D]
//!                          [--accept-timeout-ms A] [--rcvtimeo-ms R]
//! sinew-testpod accel-rr   --to ADDR --count N [--max-size S] [--window W] [--interval-ms I] [--timeout-ms T]
//!                          [--progress-every K] [--duration-ms D] [--stop-file PATH]
//! sinew-testpod accel-crr  --to ADDR --count N [--max-size S] [--timeout-ms T] [--duration-ms D]
//!                          [--eagain-retries K]
//! sinew-testpod echo-tokio --port P [--name NAME] [--lifetime-ms L]
//! ```
//! - **stream**: one connection (the server accepts exactly one, within A ms, default 30000), then the script's
//!   steps in order, stopping at the first that fails. It prints `{"event":"step",..}` after each step and one
//!   `StreamReport` at the end. The client sends the client pattern and checks what it reads against the server
//!   pattern, the server the other way round; offsets run on across steps. Steps:
//!   - `send:N[:SIZES]`: N bytes in writes of SIZES: `small` (1-64 bytes each), `large` (1-4 MiB each) or a byte
//!     count (default 65536). Records when the bytes were accepted (the report's `timeline`).
//!   - `sendfile:N`: N bytes written to a temporary file first, then sent with `sendfile(2)`.
//!   - `recv:N[:PACE]` (exactly N bytes), `recv-all[:PACE]` (until EOF): PACE is `fast` (64 KiB reads, the
//!     default), `slow` (reads of 1 B-64 KiB, 2 ms pause every 8 reads) or `crawl` (64 KiB reads, 10 ms apart).
//!   - `recv-eof`: one read that must return 0 (the peer's FIN after all its data).
//!   - `peek:N`: `recv(MSG_PEEK)` until N bytes are visible (they stay queued).
//!   - `fionread`: `ioctl(FIONREAD)`. `poll-in:MS`: `poll(POLLIN)` for at most MS.
//!   - `shut-wr`: `shutdown(SHUT_WR)`. `close`: close the socket. `sleep:MS`.
//!   - `eagain-retries:K`: from here on, a blocking read or peek that returns `EAGAIN-early` (below) is made again,
//!     at most K times in a row (K <= 16, default 0), as an application looping on `EAGAIN` would. Each such read
//!     is counted in its step's `early_eagain` (with the stream offset in `early_eagain_at`): it is known divergence
//!     A of the accelerated path (`sinew_tests::sockmap::KnownDivergence`). Only a read that still gets
//!     `EAGAIN-early` after K retries fails the step.
//!
//!   Every call is bounded by T (default 10000 ms; `SO_RCVTIMEO`/`SO_SNDTIMEO`; R overrides the receive timeout, 0
//!   for none), the whole script by D (default 120000 ms). A read that fails with `EAGAIN` well before its timeout
//!   (a blocking read that returned without waiting) reports `EAGAIN-early`. Each step's `calls` counts the
//!   system calls it made (for reads and peeks also those that returned 0 or failed).
//! - **accel-rr**: one connection to a `serve` or `echo-tokio` server (name line first), then N messages of 1..S bytes
//!   (default 4096; sizes from a fixed sequence) echoed back and checked, at most W (default 1) in flight (a writer
//!   and a reader thread), I ms between writes. A read waiting T ms (default 10000) for its echo is a failure (a
//!   lost wakeup shows up here). Ends after N rounds, the first error, D ms (default 600000) or when PATH exists.
//!   Prints `{"event":"progress","rounds":n}` every K rounds (default 0: never) and one `AccelRrReport`.
//! - **accel-crr**: N connections one after the other, each: connect, name line, one message of 1..S bytes (default
//!   4096) echoed back and checked, `shutdown(SHUT_WR)`, then the server's EOF. One `AccelCrrReport` (errors by
//!   stage; `read-early` / `eof-early` is an `EAGAIN` of the blocking read for the echo / the EOF long before its
//!   timeout). With K > 0 (default 0) such a read is made again, at most K times in a row, and counted
//!   (`early_eagain`, `early_eagain_connections`, `early_eagain_connections_ok`), like the stream step above.
//! - **echo-tokio**: `serve`'s TCP protocol (name line, then echo) on a current-thread tokio runtime, whose reads
//!   wait for edge-triggered epoll readiness.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use sinew_tests::sockmap::{
    AccelCrrReport, AccelRrReport, CLIENT_SEED, EAGAIN_EARLY, Pattern, SERVER_SEED, StepReport,
    StreamHash, StreamReport, splitmix,
};
use sinew_tests::testpod::ServeReady;
use sinew_tests::unix_ms;

use super::{MAX_COUNT, Opts, bind_port, err_key, print, read_name, usage};

/// Largest single write of `send:N:large`.
const LARGE_MAX: usize = 4 << 20;
/// Smallest single write of `send:N:large`.
const LARGE_MIN: usize = 1 << 20;
/// Largest echo message of `accel-rr` / `accel-crr`.
const MAX_MESSAGE: u64 = 1 << 20;
/// Most messages `accel-rr` keeps in flight.
const MAX_WINDOW: u64 = 64;
/// A timeline point at least this often while bytes are accepted, and after every call blocked this long.
const TIMELINE_STEP: Duration = Duration::from_millis(10);
/// Most `EAGAIN-early` retries in a row `eagain-retries:K` / `--eagain-retries K` may ask for.
const MAX_EAGAIN_RETRIES: u64 = 16;

// ---------------------------------------------------------------------------------------------------------------
// stream

#[derive(Debug, Clone, Copy)]
enum Sizes {
    Fixed(usize),
    Small,
    Large,
}

#[derive(Debug, Clone, Copy)]
enum Pace {
    Fast,
    Slow,
    Crawl,
}

#[derive(Debug, Clone, Copy)]
enum Step {
    Send(u64, Sizes),
    SendFile(u64),
    Recv(Option<u64>, Pace),
    RecvEof,
    Peek(u64),
    Fionread,
    PollIn(u64),
    ShutWr,
    Close,
    Sleep(u64),
    EagainRetries(u64),
}

fn parse_step(text: &str) -> Step {
    let parts: Vec<&str> = text.split(':').collect();
    let num = |i: usize| -> u64 {
        parts
            .get(i)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| {
                usage(&format!(
                    "--script: step {text:?}: field {i} is not a number"
                ))
            })
    };
    let pace = |i: usize| match parts.get(i).copied() {
        None | Some("fast") => Pace::Fast,
        Some("slow") => Pace::Slow,
        Some("crawl") => Pace::Crawl,
        Some(p) => usage(&format!("--script: step {text:?}: unknown pace {p:?}")),
    };
    let n_max = MAX_COUNT * 1024; // 1 GiB
    match parts[0] {
        "send" => {
            let sizes = match parts.get(2).copied() {
                None => Sizes::Fixed(65536),
                Some("small") => Sizes::Small,
                Some("large") => Sizes::Large,
                Some(_) => Sizes::Fixed(num(2).clamp(1, LARGE_MAX as u64) as usize),
            };
            Step::Send(num(1).min(n_max), sizes)
        }
        "sendfile" => Step::SendFile(num(1).min(n_max)),
        "recv" => Step::Recv(Some(num(1).min(n_max)), pace(2)),
        "recv-all" => Step::Recv(None, pace(1)),
        "recv-eof" => Step::RecvEof,
        "peek" => Step::Peek(num(1).clamp(1, 1 << 20)),
        "fionread" => Step::Fionread,
        "poll-in" => Step::PollIn(num(1).min(600_000)),
        "shut-wr" => Step::ShutWr,
        "close" => Step::Close,
        "sleep" => Step::Sleep(num(1).min(600_000)),
        "eagain-retries" => Step::EagainRetries(num(1).min(MAX_EAGAIN_RETRIES)),
        other => usage(&format!("--script: unknown step {other:?}")),
    }
}

/// One connection and where each direction's stream stands.
struct Conn {
    sock: Option<TcpStream>,
    send_pattern: Pattern,
    recv_pattern: Pattern,
    send_off: u64,
    recv_off: u64,
    rng: u64,
    deadline: Instant,
    /// `eagain-retries:K`.
    eagain_retries: u64,
}

impl Conn {
    fn next_rand(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(1);
        splitmix(self.rng)
    }

    fn past_deadline(&self) -> bool {
        Instant::now() >= self.deadline
    }
}

/// `sinew-testpod stream`: see the module documentation.
pub(super) fn stream(opts: &Opts) -> io::Result<()> {
    let script = opts
        .str("script")
        .unwrap_or_else(|| usage("--script STEP,.. is required"));
    let steps: Vec<(String, Step)> = script
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| (s.to_string(), parse_step(s)))
        .collect();
    if steps.is_empty() || steps.len() > 256 {
        usage("--script: 1 to 256 steps");
    }
    let timeout = opts.ms("timeout-ms", 10_000).max(Duration::from_millis(1));
    let deadline = Instant::now() + opts.ms("deadline-ms", 120_000);
    let server = opts.str("listen").is_some();
    let mut report = StreamReport {
        role: if server { "server" } else { "client" }.into(),
        ..Default::default()
    };
    let sock = if server {
        let port =
            u16::try_from(opts.num("listen", 0)).unwrap_or_else(|_| usage("--listen: not a port"));
        let (listener, _, port) = bind_port(port, true, false, false)?;
        let listener = listener.expect("TCP was asked for");
        print(&ServeReady {
            event: "listening".into(),
            port,
            name: "stream".into(),
            tcp: true,
            udp: false,
            ports: Vec::new(),
        })?;
        accept_one(&listener, opts.ms("accept-timeout-ms", 30_000))
    } else {
        TcpStream::connect_timeout(&opts.to(), timeout)
    };
    let sock = match sock.and_then(|s| {
        s.set_nodelay(true)?;
        // `--rcvtimeo-ms 0`: no SO_RCVTIMEO (reads block like most programs'); the caller bounds the process.
        let rcvtimeo = opts.ms("rcvtimeo-ms", timeout.as_millis() as u64);
        s.set_read_timeout((!rcvtimeo.is_zero()).then_some(rcvtimeo))?;
        s.set_write_timeout(Some(timeout))?;
        Ok(s)
    }) {
        Ok(s) => s,
        Err(e) => {
            report.error = Some(err_key(&e));
            return print(&report);
        }
    };
    report.connected = true;
    report.local = sock.local_addr().map(|a| a.to_string()).unwrap_or_default();
    report.peer = sock.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let (mine, theirs) = if server {
        (SERVER_SEED, CLIENT_SEED)
    } else {
        (CLIENT_SEED, SERVER_SEED)
    };
    let mut conn = Conn {
        sock: Some(sock),
        send_pattern: Pattern::new(mine),
        recv_pattern: Pattern::new(theirs),
        send_off: 0,
        recv_off: 0,
        rng: mine,
        deadline,
        eagain_retries: 0,
    };
    for (i, (text, step)) in steps.iter().enumerate() {
        let started = Instant::now();
        let mut r = StepReport {
            step: text.clone(),
            started_unix_ms: unix_ms(),
            ..Default::default()
        };
        run_step(&mut conn, *step, &mut r);
        r.elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
        let ok = r.ok;
        print(&serde_json::json!({"event": "step", "index": i, "step": text, "ok": ok}))?;
        report.steps.push(r);
        if !ok {
            break;
        }
    }
    print(&report)
}

/// Accepts one connection within `timeout` (the listener is polled, non-blocking).
fn accept_one(listener: &TcpListener, timeout: Duration) -> io::Result<TcpStream> {
    listener.set_nonblocking(true)?;
    let start = Instant::now();
    // Bounded by the timeout (each round sleeps 2 ms).
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                return Ok(s);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if start.elapsed() >= timeout {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "nobody connected"));
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

fn run_step(c: &mut Conn, step: Step, r: &mut StepReport) {
    match step {
        Step::Sleep(ms) => {
            std::thread::sleep(Duration::from_millis(ms));
            r.ok = true;
            return;
        }
        Step::EagainRetries(k) => {
            c.eagain_retries = k;
            r.value = Some(k as i64);
            r.ok = true;
            return;
        }
        _ => {}
    }
    let Some(sock) = c.sock.take() else {
        r.error = Some("closed".into());
        return;
    };
    let mut keep = true;
    match step {
        Step::Send(n, sizes) => send(c, &sock, n, sizes, r),
        Step::SendFile(n) => send_file(c, &sock, n, r),
        Step::Recv(n, pace) => recv(c, &sock, n, pace, r),
        Step::RecvEof => recv_eof(c, &sock, r),
        Step::Peek(n) => peek(c, &sock, n, r),
        Step::Fionread => match sys::fionread(sock.as_raw_fd()) {
            Ok(v) => {
                r.value = Some(v);
                r.ok = true;
            }
            Err(e) => r.error = Some(err_key(&e)),
        },
        Step::PollIn(ms) => match sys::poll_in(sock.as_raw_fd(), ms) {
            Ok(revents) => {
                r.value = Some(revents.into());
                r.ok = revents & libc::POLLIN != 0;
                if !r.ok {
                    r.error = Some("not-readable".into());
                }
            }
            Err(e) => r.error = Some(err_key(&e)),
        },
        Step::ShutWr => match sock.shutdown(Shutdown::Write) {
            Ok(()) => r.ok = true,
            Err(e) => r.error = Some(err_key(&e)),
        },
        Step::Close => {
            keep = false;
            r.ok = true;
        }
        Step::Sleep(_) | Step::EagainRetries(_) => unreachable!("handled above"),
    }
    if keep {
        c.sock = Some(sock);
    }
}

fn send(c: &mut Conn, mut sock: &TcpStream, n: u64, sizes: Sizes, r: &mut StepReport) {
    let cap = match sizes {
        Sizes::Fixed(k) => k,
        Sizes::Small => 64,
        Sizes::Large => LARGE_MAX,
    };
    let mut buf = vec![0u8; cap];
    let mut last_point = Instant::now();
    r.timeline.push((unix_ms(), 0));
    'outer: while r.bytes < n {
        if c.past_deadline() {
            r.error = Some("DEADLINE".into());
            break;
        }
        let size = match sizes {
            Sizes::Fixed(k) => k,
            Sizes::Small => 1 + (c.next_rand() % 64) as usize,
            Sizes::Large => {
                LARGE_MIN + (c.next_rand() % (LARGE_MAX - LARGE_MIN + 1) as u64) as usize
            }
        };
        let want = (size as u64).min(n - r.bytes) as usize;
        c.send_pattern.fill(c.send_off, &mut buf[..want]);
        let mut off = 0;
        // Each write accepts at least one byte or fails (SO_SNDTIMEO bounds a blocked one).
        while off < want {
            let t0 = Instant::now();
            match sock.write(&buf[off..want]) {
                Ok(0) => {
                    r.error = Some("write-returned-0".into());
                    break 'outer;
                }
                Ok(k) => {
                    accepted(c, r, k, want - off, t0, &mut last_point);
                    off += k;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    r.error = Some(err_key(&e));
                    break 'outer;
                }
            }
        }
    }
    r.timeline.push((unix_ms(), r.bytes));
    r.ok = r.error.is_none();
}

/// Accounts for a write or sendfile call, started at `t0`, that accepted `k` of the `asked` bytes.
fn accepted(
    c: &mut Conn,
    r: &mut StepReport,
    k: usize,
    asked: usize,
    t0: Instant,
    last_point: &mut Instant,
) {
    r.calls += 1;
    if k < asked {
        r.partial += 1;
    }
    r.bytes += k as u64;
    c.send_off += k as u64;
    mark(&mut r.timeline, t0, last_point, r.bytes - k as u64, r.bytes);
}

/// Adds timeline points after a call that started at `t0` with `before` bytes accepted and now has `after`: when
/// it blocked, one at its start (nothing more was accepted until then) and one now; else one now if the last
/// point is older than [`TIMELINE_STEP`].
fn mark(
    timeline: &mut Vec<(u64, u64)>,
    t0: Instant,
    last_point: &mut Instant,
    before: u64,
    after: u64,
) {
    let blocked = t0.elapsed();
    if blocked >= TIMELINE_STEP {
        let now = unix_ms();
        timeline.push((now.saturating_sub(blocked.as_millis() as u64), before));
        timeline.push((now, after));
        *last_point = Instant::now();
    } else if last_point.elapsed() >= TIMELINE_STEP {
        timeline.push((unix_ms(), after));
        *last_point = Instant::now();
    }
}

fn send_file(c: &mut Conn, sock: &TcpStream, n: u64, r: &mut StepReport) {
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let path: PathBuf = std::env::temp_dir().join(format!(
        "sinew-testpod-sendfile-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let res = (|| -> io::Result<()> {
        let mut f = std::fs::File::create(&path)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut written = 0u64;
        while written < n {
            let k = (n - written).min(buf.len() as u64) as usize;
            c.send_pattern.fill(c.send_off + written, &mut buf[..k]);
            f.write_all(&buf[..k])?;
            written += k as u64;
        }
        drop(f);
        let f = std::fs::File::open(&path)?;
        let mut offset: i64 = 0;
        let mut last_point = Instant::now();
        r.timeline.push((unix_ms(), 0));
        // Each call sends at least one byte or fails (SO_SNDTIMEO bounds a blocked one).
        while r.bytes < n {
            if c.past_deadline() {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "deadline"));
            }
            let t0 = Instant::now();
            let want = (n - r.bytes).min(1 << 30) as usize;
            match sys::sendfile(sock.as_raw_fd(), f.as_raw_fd(), &mut offset, want) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "sendfile returned 0",
                    ));
                }
                Ok(k) => accepted(c, r, k, want, t0, &mut last_point),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        r.timeline.push((unix_ms(), r.bytes));
        Ok(())
    })();
    let _ = std::fs::remove_file(&path);
    match res {
        Ok(()) => r.ok = true,
        Err(e) => r.error = Some(err_key(&e)),
    }
}

/// One blocking read (`peek`: `recv(MSG_PEEK)`) into `buf`, made again when interrupted (at most 100 times). A
/// read that returns `EAGAIN-early` is made again at most `c.eagain_retries` times in a row, each one counted in
/// `r.early_eagain` with the stream offset in `r.early_eagain_at` (known divergence A). Every call is counted in
/// `r.calls`. The error is the word of [`read_error`].
fn read_retrying(
    c: &Conn,
    mut sock: &TcpStream,
    buf: &mut [u8],
    peek: bool,
    r: &mut StepReport,
) -> Result<usize, String> {
    let mut retries = 0;
    let mut interrupted = 0;
    // Bounded: each round returns, or uses up one of 100 interruptions or one of the retries.
    loop {
        let t0 = Instant::now();
        let res = if peek { sock.peek(buf) } else { sock.read(buf) };
        r.calls += 1;
        match res {
            Ok(k) => return Ok(k),
            Err(e) if e.kind() == io::ErrorKind::Interrupted && interrupted < 100 => {
                interrupted += 1;
            }
            Err(e) => {
                let word = read_error(&e, t0.elapsed(), sock);
                if word == EAGAIN_EARLY && retries < c.eagain_retries {
                    retries += 1;
                    r.early_eagain += 1;
                    r.early_eagain_at.push(c.recv_off);
                    continue;
                }
                return Err(word);
            }
        }
    }
}

/// Reads exactly `n` bytes (`None`: until EOF), checking each against the peer's pattern.
fn recv(c: &mut Conn, sock: &TcpStream, n: Option<u64>, pace: Pace, r: &mut StepReport) {
    let mut buf = vec![0u8; 65536];
    let mut hash = StreamHash::default();
    let mut verified = true;
    r.fionread_at_start = sys::fionread(sock.as_raw_fd()).ok();
    // Each read returns at least one byte, ends the loop or fails (SO_RCVTIMEO bounds a blocked one).
    loop {
        if n.is_some_and(|n| r.bytes >= n) {
            r.ok = true;
            break;
        }
        if c.past_deadline() {
            r.error = Some("DEADLINE".into());
            break;
        }
        let mut want = match pace {
            Pace::Fast | Pace::Crawl => buf.len(),
            Pace::Slow => 1 + (c.next_rand() % buf.len() as u64) as usize,
        };
        if let Some(n) = n {
            want = want.min((n - r.bytes) as usize);
        }
        match read_retrying(c, sock, &mut buf[..want], false, r) {
            Ok(0) => {
                if n.is_some() {
                    r.error = Some("EOF".into());
                } else {
                    r.ok = true;
                }
                break;
            }
            Ok(k) => {
                if verified && !c.recv_pattern.matches(c.recv_off, &buf[..k]) {
                    verified = false;
                    // Where the stream first differs, for the failure message.
                    let first = (0..k)
                        .find(|&i| !c.recv_pattern.matches(c.recv_off + i as u64, &buf[i..=i]))
                        .unwrap_or(0);
                    r.value = Some((c.recv_off + first as u64) as i64);
                }
                hash.update(&buf[..k]);
                r.bytes += k as u64;
                c.recv_off += k as u64;
                match pace {
                    Pace::Fast => {}
                    Pace::Slow if r.calls.is_multiple_of(8) => {
                        std::thread::sleep(Duration::from_millis(2))
                    }
                    Pace::Slow => {}
                    Pace::Crawl => std::thread::sleep(Duration::from_millis(10)),
                }
            }
            Err(word) => {
                r.error = Some(word);
                break;
            }
        }
    }
    r.hash = hash.finish();
    r.verified = Some(verified);
    if !verified {
        r.ok = false;
    }
}

/// The error word of a failed read: its errno name, except that `EAGAIN` long before the socket's receive timeout
/// (a blocking read that gave up without data, without waiting) is `EAGAIN-early`.
fn read_error(e: &io::Error, waited: Duration, sock: &TcpStream) -> String {
    let key = err_key(e);
    let timeout = sock.read_timeout().ok().flatten();
    if key == "EAGAIN" && timeout.is_none_or(|t| waited < t.mul_f64(0.9)) {
        return EAGAIN_EARLY.into();
    }
    key
}

fn recv_eof(c: &mut Conn, sock: &TcpStream, r: &mut StepReport) {
    let mut buf = vec![0u8; 65536];
    // One read (see `read_retrying` for when it is made again).
    match read_retrying(c, sock, &mut buf, false, r) {
        Ok(0) => {
            r.value = Some(0);
            r.ok = true;
        }
        Ok(k) => {
            r.value = Some(k as i64);
            r.bytes = k as u64;
            r.verified = Some(c.recv_pattern.matches(c.recv_off, &buf[..k]));
            r.hash = sinew_tests::sockmap::stream_hash(&buf[..k]);
            c.recv_off += k as u64;
            r.error = Some("data".into());
        }
        Err(word) => r.error = Some(word),
    }
}

fn peek(c: &mut Conn, sock: &TcpStream, n: u64, r: &mut StepReport) {
    let n = n as usize;
    let mut buf = vec![0u8; n];
    let start = Instant::now();
    let timeout = sock
        .read_timeout()
        .ok()
        .flatten()
        .unwrap_or(Duration::from_secs(10));
    // Bounded by the read timeout (a peek that sees fewer than n bytes sleeps 2 ms and tries again).
    loop {
        match read_retrying(c, sock, &mut buf, true, r) {
            Ok(0) => {
                r.error = Some("EOF".into());
                break;
            }
            Ok(k) => {
                r.value = Some(k as i64);
                if k >= n {
                    r.bytes = k as u64;
                    r.hash = sinew_tests::sockmap::stream_hash(&buf[..k]);
                    let ok = c.recv_pattern.matches(c.recv_off, &buf[..k]);
                    r.verified = Some(ok);
                    r.ok = ok;
                    break;
                }
                if start.elapsed() >= timeout {
                    r.error = Some("EAGAIN".into());
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(word) => {
                r.error = Some(word);
                break;
            }
        }
    }
}

/// The few calls std has no safe wrapper for.
#[allow(unsafe_code)]
mod sys {
    use std::io;
    use std::os::fd::RawFd;

    /// `ioctl(fd, FIONREAD)`: bytes waiting to be read.
    pub fn fionread(fd: RawFd) -> io::Result<i64> {
        let mut v: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int through the pointer, which points to a live local.
        if unsafe { libc::ioctl(fd, libc::FIONREAD, &mut v as *mut libc::c_int) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(v.into())
    }

    /// `poll(fd, POLLIN, ms)`: the `revents` (0 when it timed out).
    pub fn poll_in(fd: RawFd, ms: u64) -> io::Result<i16> {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd, count 1.
        let n = unsafe { libc::poll(&mut p, 1, ms) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(p.revents)
    }

    /// `sendfile(out, in, &offset, count)`.
    pub fn sendfile(out: RawFd, input: RawFd, offset: &mut i64, count: usize) -> io::Result<usize> {
        let mut off: libc::off_t = *offset;
        // SAFETY: `off` is a live local the kernel updates; the descriptors are owned by the caller.
        let n = unsafe { libc::sendfile(out, input, &mut off, count) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        *offset = off;
        Ok(n as usize)
    }
}

// ---------------------------------------------------------------------------------------------------------------
// accel-rr

/// The size of message `i` of a run with messages up to `max` bytes.
fn message_size(i: u64, max: u64) -> usize {
    (1 + splitmix(i ^ 0xA5A5) % max) as usize
}

#[derive(Default)]
struct RrShared {
    sent: u64,
    acked: u64,
    writer_done: bool,
    stop: bool,
    first_error: Option<(String, String, u64)>,
}

impl RrShared {
    fn fail(&mut self, stage: &str, e: &io::Error) {
        if self.first_error.is_none() {
            self.first_error = Some((
                format!("{stage}:{}: {e}", err_key(e)),
                err_key(e),
                unix_ms(),
            ));
        }
        self.stop = true;
    }
}

/// `sinew-testpod accel-rr`: see the module documentation.
pub(super) fn accel_rr(opts: &Opts) -> io::Result<()> {
    print(&rr_run(opts))
}

fn rr_run(opts: &Opts) -> AccelRrReport {
    let to = opts.to();
    let count = opts.count("count", 1000);
    let max = opts.num("max-size", 4096).clamp(1, MAX_MESSAGE);
    let window = opts.num("window", 1).clamp(1, MAX_WINDOW);
    let interval = opts.ms("interval-ms", 0);
    let timeout = opts.ms("timeout-ms", 10_000).max(Duration::from_millis(1));
    let progress = opts.num("progress-every", 0);
    let duration = opts.ms("duration-ms", 600_000);
    let stop_file = opts.str("stop-file").map(PathBuf::from);
    let mut r = AccelRrReport {
        to: to.to_string(),
        ..Default::default()
    };
    let sock = match TcpStream::connect_timeout(&to, timeout).and_then(|mut s| {
        s.set_nodelay(true)?;
        let name = read_name(&mut s, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        Ok((s, name))
    }) {
        Ok((s, name)) => {
            r.name = name;
            s
        }
        Err(e) => {
            r.error = Some(format!("connect:{}: {e}", err_key(&e)));
            r.error_kind = Some(err_key(&e));
            r.error_unix_ms = Some(unix_ms());
            return r;
        }
    };
    let reader_sock = match sock.try_clone() {
        Ok(s) => s,
        Err(e) => {
            r.error = Some(format!("clone:{}: {e}", err_key(&e)));
            return r;
        }
    };
    r.started_unix_ms = unix_ms();
    let pattern = Arc::new(Pattern::new(CLIENT_SEED));
    let shared = Arc::new((Mutex::new(RrShared::default()), Condvar::new()));
    let start = Instant::now();
    let writer = {
        let shared = shared.clone();
        let pattern = pattern.clone();
        std::thread::spawn(move || {
            rr_writer(
                sock,
                &shared,
                &pattern,
                count,
                max,
                window,
                interval,
                duration,
                start,
                stop_file.as_deref(),
            )
        })
    };
    let (verified, bytes, hash, max_wait) =
        rr_reader(reader_sock, &shared, &pattern, max, progress, timeout);
    let stopped = writer.join().unwrap_or(false);
    let (lock, _) = &*shared;
    let st = lock.lock().unwrap_or_else(|p| p.into_inner());
    r.rounds = st.acked;
    r.sent_rounds = st.sent;
    r.bytes = bytes;
    r.hash = hash;
    r.verified = verified;
    r.stopped = stopped;
    r.max_wait_ms = max_wait;
    if let Some((text, kind, at)) = &st.first_error {
        r.error = Some(text.clone());
        r.error_kind = Some(kind.clone());
        r.error_unix_ms = Some(*at);
    }
    r.finished_unix_ms = unix_ms();
    r
}

/// Writes the messages, at most `window` ahead of the reader; returns whether the stop file ended the run.
#[allow(clippy::too_many_arguments)]
fn rr_writer(
    mut sock: TcpStream,
    shared: &(Mutex<RrShared>, Condvar),
    pattern: &Pattern,
    count: u64,
    max: u64,
    window: u64,
    interval: Duration,
    duration: Duration,
    start: Instant,
    stop_file: Option<&Path>,
) -> bool {
    let (lock, cv) = shared;
    let mut buf = vec![0u8; max as usize];
    let mut offset = 0u64;
    let mut stopped = false;
    for i in 0..count {
        if i > 0 && !interval.is_zero() {
            std::thread::sleep(interval);
        }
        if start.elapsed() >= duration {
            break;
        }
        if stop_file.is_some_and(Path::exists) {
            stopped = true;
            break;
        }
        {
            let mut st = lock.lock().unwrap_or_else(|p| p.into_inner());
            // Bounded: the reader acks or fails (its reads time out), and either wakes us.
            while !st.stop && i - st.acked >= window {
                st = cv
                    .wait_timeout(st, Duration::from_millis(100))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
                if start.elapsed() >= duration {
                    break;
                }
            }
            if st.stop || start.elapsed() >= duration {
                break;
            }
        }
        let size = message_size(i, max);
        pattern.fill(offset, &mut buf[..size]);
        offset += size as u64;
        if let Err(e) = sock.write_all(&buf[..size]) {
            lock.lock()
                .unwrap_or_else(|p| p.into_inner())
                .fail("write", &e);
            cv.notify_all();
            break;
        }
        lock.lock().unwrap_or_else(|p| p.into_inner()).sent = i + 1;
        cv.notify_all();
    }
    lock.lock().unwrap_or_else(|p| p.into_inner()).writer_done = true;
    cv.notify_all();
    stopped
}

/// Reads the echo of every message written, in order; returns (all verified, bytes, hash, longest wait ms).
fn rr_reader(
    mut sock: TcpStream,
    shared: &(Mutex<RrShared>, Condvar),
    pattern: &Pattern,
    max: u64,
    progress: u64,
    timeout: Duration,
) -> (bool, u64, String, f64) {
    let (lock, cv) = shared;
    let mut buf = vec![0u8; max as usize];
    let mut hash = StreamHash::default();
    let mut offset = 0u64;
    let mut verified = true;
    let mut max_wait = 0f64;
    for i in 0..MAX_COUNT {
        {
            let mut st = lock.lock().unwrap_or_else(|p| p.into_inner());
            // Bounded: the writer sends, finishes or fails within its own bounds, and wakes us.
            while st.sent <= i && !st.writer_done && !st.stop {
                st = cv
                    .wait_timeout(st, Duration::from_millis(100))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            if st.sent <= i {
                break;
            }
        }
        let size = message_size(i, max);
        let t0 = Instant::now();
        let res = sock.read_exact(&mut buf[..size]);
        max_wait = max_wait.max(t0.elapsed().as_secs_f64() * 1000.0);
        if let Err(e) = res {
            let e = if e.kind() == io::ErrorKind::UnexpectedEof {
                io::Error::new(io::ErrorKind::UnexpectedEof, "EOF before the whole echo")
            } else {
                e
            };
            let stage = if t0.elapsed() >= timeout {
                "read-timeout"
            } else {
                "read"
            };
            lock.lock()
                .unwrap_or_else(|p| p.into_inner())
                .fail(stage, &e);
            cv.notify_all();
            break;
        }
        if !pattern.matches(offset, &buf[..size]) {
            verified = false;
            let e = io::Error::new(io::ErrorKind::InvalidData, "the echo differs");
            lock.lock()
                .unwrap_or_else(|p| p.into_inner())
                .fail("echo", &e);
            cv.notify_all();
            break;
        }
        hash.update(&buf[..size]);
        offset += size as u64;
        let acked = i + 1;
        lock.lock().unwrap_or_else(|p| p.into_inner()).acked = acked;
        cv.notify_all();
        if progress > 0 && acked.is_multiple_of(progress) {
            let _ = print(&serde_json::json!({"event": "progress", "rounds": acked}));
        }
    }
    (verified, offset, hash.finish(), max_wait)
}

// ---------------------------------------------------------------------------------------------------------------
// accel-crr

/// `sinew-testpod accel-crr`: see the module documentation.
pub(super) fn accel_crr(opts: &Opts) -> io::Result<()> {
    let to = opts.to();
    let count = opts.count("count", 1000);
    let max = opts.num("max-size", 4096).clamp(1, MAX_MESSAGE);
    let timeout = opts.ms("timeout-ms", 5000).max(Duration::from_millis(1));
    let duration = opts.ms("duration-ms", 120_000);
    let retries = opts.num("eagain-retries", 0).min(MAX_EAGAIN_RETRIES);
    let pattern = Pattern::new(CLIENT_SEED);
    let mut r = AccelCrrReport {
        to: to.to_string(),
        ..Default::default()
    };
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut hash = StreamHash::default();
    let mut buf = vec![0u8; max as usize];
    let mut back = vec![0u8; max as usize];
    let mut offset = 0u64;
    let start = Instant::now();
    for i in 0..count {
        if start.elapsed() >= duration {
            break;
        }
        r.attempts += 1;
        let size = message_size(i, max);
        pattern.fill(offset, &mut buf[..size]);
        offset += size as u64;
        let mut reads = CrrReads {
            retries,
            ..Default::default()
        };
        let res = crr_one(to, timeout, &buf[..size], &mut back[..size], &mut reads);
        r.reads += reads.calls;
        r.early_eagain += reads.early;
        if reads.early > 0 {
            r.early_eagain_connections += 1;
        }
        match res {
            Ok(()) if back[..size] == buf[..size] => {
                r.ok += 1;
                r.bytes += size as u64;
                hash.update(&back[..size]);
                if reads.early > 0 {
                    r.early_eagain_connections_ok += 1;
                }
            }
            Ok(()) => {
                r.failed += 1;
                r.mismatches += 1;
            }
            Err((stage, e)) => {
                r.failed += 1;
                *errors
                    .entry(format!("{stage}:{}", err_key(&e)))
                    .or_default() += 1;
            }
        }
    }
    r.errors = errors;
    r.hash = hash.finish();
    r.duration_ms = start.elapsed().as_secs_f64() * 1000.0;
    print(&r)
}

/// The blocking reads of one `accel-crr` connection (echo and EOF).
#[derive(Default)]
struct CrrReads {
    /// `--eagain-retries`.
    retries: u64,
    /// Read calls made.
    calls: u64,
    /// Of those, `EAGAIN-early` ones that were made again.
    early: u64,
}

impl CrrReads {
    /// One blocking read, made again when interrupted (at most 100 times) and, up to `retries` times in a row, when
    /// it returned `EAGAIN-early`. Errors: `Err((true, e))` for `EAGAIN-early` after the retries, else
    /// `Err((false, e))`.
    fn read(&mut self, mut s: &TcpStream, buf: &mut [u8]) -> Result<usize, (bool, io::Error)> {
        let mut retries = 0;
        let mut interrupted = 0;
        // Bounded: each round returns, or uses up one of 100 interruptions or one of the retries.
        loop {
            let t0 = Instant::now();
            let res = s.read(buf);
            self.calls += 1;
            match res {
                Ok(k) => return Ok(k),
                Err(e) if e.kind() == io::ErrorKind::Interrupted && interrupted < 100 => {
                    interrupted += 1;
                }
                Err(e) if read_error(&e, t0.elapsed(), s) == EAGAIN_EARLY => {
                    if retries < self.retries {
                        retries += 1;
                        self.early += 1;
                    } else {
                        return Err((true, e));
                    }
                }
                Err(e) => return Err((false, e)),
            }
        }
    }
}

fn crr_one(
    to: SocketAddr,
    timeout: Duration,
    msg: &[u8],
    back: &mut [u8],
    reads: &mut CrrReads,
) -> Result<(), (&'static str, io::Error)> {
    let mut s = TcpStream::connect_timeout(&to, timeout).map_err(|e| ("connect", e))?;
    s.set_nodelay(true).map_err(|e| ("connect", e))?;
    read_name(&mut s, timeout).map_err(|e| ("name", e))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| ("connect", e))?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| ("connect", e))?;
    s.write_all(msg).map_err(|e| ("write", e))?;
    let mut got = 0;
    // Each read returns at least one byte or ends the loop.
    while got < back.len() {
        match reads.read(&s, &mut back[got..]) {
            Ok(0) => {
                return Err((
                    "read",
                    io::Error::new(io::ErrorKind::UnexpectedEof, "EOF before the whole echo"),
                ));
            }
            Ok(k) => got += k,
            Err((true, e)) => return Err(("read-early", e)),
            Err((false, e)) => return Err(("read", e)),
        }
    }
    s.shutdown(Shutdown::Write).map_err(|e| ("shutdown", e))?;
    let mut one = [0u8; 1];
    match reads.read(&s, &mut one) {
        Ok(0) => Ok(()),
        Ok(_) => Err((
            "eof",
            io::Error::new(io::ErrorKind::InvalidData, "data after the echo"),
        )),
        Err((true, e)) => Err(("eof-early", e)),
        Err((false, e)) => Err(("eof", e)),
    }
}

// ---------------------------------------------------------------------------------------------------------------
// echo-tokio

/// `sinew-testpod echo-tokio`: see the module documentation.
pub(super) fn echo_tokio(opts: &Opts) -> io::Result<()> {
    let port = u16::try_from(opts.num("port", 0)).unwrap_or_else(|_| usage("--port out of range"));
    let name = opts.str("name").unwrap_or("echo").to_string();
    // A server normally dies with its guard; the lifetime only bounds a leaked one.
    let lifetime = opts.ms("lifetime-ms", 600_000);
    std::thread::spawn(move || {
        std::thread::sleep(lifetime);
        std::process::exit(0);
    });
    let (listener, _, port) = bind_port(port, true, false, false)?;
    let listener = listener.expect("TCP was asked for");
    listener.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        print(&ServeReady {
            event: "listening".into(),
            port,
            name: name.clone(),
            tcp: true,
            udp: false,
            ports: Vec::new(),
        })?;
        let hello: Arc<[u8]> = format!("{name}\n").into_bytes().into();
        // Bounded by the process lifetime; the count bound is belt and braces.
        for _ in 0..MAX_COUNT * 10 {
            match listener.accept().await {
                Ok((s, _)) => {
                    let hello = hello.clone();
                    tokio::spawn(async move {
                        if let Err(e) = tokio_echo(s, &hello).await {
                            eprintln!("echo-tokio: {e}");
                        }
                    });
                }
                Err(e) => {
                    eprintln!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
        Ok(())
    })
}

async fn tokio_echo(mut s: tokio::net::TcpStream, hello: &[u8]) -> io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.set_nodelay(true)?;
    s.write_all(hello).await?;
    let mut buf = vec![0u8; 65536];
    // Ends at EOF or error; an idle connection ends after a minute, so a stuck client cannot pin it forever.
    loop {
        let n = match tokio::time::timeout(Duration::from_secs(60), s.read(&mut buf)).await {
            Ok(r) => r?,
            Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "idle for 60 s")),
        };
        if n == 0 {
            return Ok(());
        }
        s.write_all(&buf[..n]).await?;
    }
}
