//! `sinew-testpod`: the one program the end-to-end tests and benchmarks run inside pods.
//!
//! Servers print one `{"event":"listening",...}` line once bound; clients print exactly one JSON result line (the
//! types in `sinew_tests::testpod`) and exit 0 even when connections failed, so the caller sees every failure in
//! the report. Exit status 2 means bad arguments. Every loop is bounded both in iterations and in time.
//!
//! ```text
//! sinew-testpod serve       (--port P | --ports P1,P2,..) --name NAME [--tcp-only|--udp-only] [--v4-only]
//!                           [--lifetime-ms L]
//! sinew-testpod tcp-echo    --port P --name NAME            (serve, TCP only)
//! sinew-testpod udp-echo    --port P --name NAME            (serve, UDP only)
//! sinew-testpod echo-server --port P [--name NAME]          (serve; name defaults to "echo")
//! sinew-testpod tcp-connect --to ADDR --count N [--interval-ms M] [--timeout-ms T] [--progress-every K]
//! sinew-testpod udp-send    --to ADDR --count N [--interval-ms M] [--timeout-ms T] [--new-socket-each] [--timeline]
//!                           [--duration-ms D] [--src-port P]
//! sinew-testpod udp-connected --to ADDR --count N [--interval-ms M] [--timeout-ms T] [--timeline] [--duration-ms D]
//! sinew-testpod rr          --to ADDR [--size S] [--duration-ms D] [--max-requests N] [--timeout-ms T]
//! sinew-testpod crr         --to ADDR [--size S] [--duration-ms D] [--max N] [--timeout-ms T]
//! sinew-testpod probe       --targets PROTO:ADDR,PROTO:ADDR,.. [--timeout-ms T]      (PROTO: tcp | udp)
//! sinew-testpod udp-flood   --to ADDR --count N [--duration-ms D]
//! sinew-testpod probe-loop  --targets .. --duration-ms D [--interval-ms I] [--timeout-ms T] [--max-rounds N]
//!                           [--stop-file PATH]
//! sinew-testpod hold        --to ADDR [--payload P] [--count N] [--interval-ms M] [--duration-ms D] [--timeout-ms T]
//! sinew-testpod stream | accel-rr | accel-crr | echo-tokio ..     (same-node acceleration: `testpod_accel/mod.rs`)
//! ```
//! `hold` keeps ONE connection: it reads the name line, then writes P (default `hold-ping`) and reads the same bytes
//! back, every M ms, until N round trips or D ms, stopping at the first error; it prints one
//! `sinew_tests::mesh::HoldReport` (round trips done, the first error and when it happened).
//! `probe` tries every target once, concurrently, each bounded by `--timeout-ms` (default 400): TCP connects,
//! reads the name line and has 4 bytes echoed; UDP sends one datagram from a fresh unconnected socket (`sendto`)
//! and waits for the reply. It prints one [`ProbeReport`] line; see `ProbeResult` for the outcome words.
//! `probe-loop` repeats such a batch (each round concurrently, one round after the other, `--interval-ms` apart)
//! until D ms have passed, N rounds were made (default 100000) or PATH exists, and prints one `ProbeLoopReport`
//! with each round's wall-clock start.
//! `udp-flood` fires datagrams from one unconnected socket without waiting for replies (at most N, at most D ms).
//! `--progress-every K` prints `{"event":"progress","attempts":n,"ok":k,"failed":f}` after every K attempts, so a
//! caller can tell that a long run is under way; the result is still the last line.
//!
//! ADDR is `ip:port` or `[ipv6]:port`; `[::ffff:10.96.0.10]:80` makes an IPv6 socket connect to a v4-mapped
//! address (the agent's `connect6` path).

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sinew_tests::testpod::{
    ConnectReport, CrrReport, Failure, FloodReport, PROBE_OK, PROBE_TIMEOUT, ProbeLoopReport,
    ProbeReport, ProbeResult, ProbeRound, RrReport, ServeReady, UdpReport, errno_name, percentile,
};

#[path = "testpod_accel/mod.rs"]
mod accel;
#[path = "testpod_bulk/mod.rs"]
mod bulk;

/// Hard caps, whatever the arguments say.
const MAX_COUNT: u64 = 1_000_000;
const MAX_DURATION: Duration = Duration::from_secs(600);
/// Concurrent TCP connections a server handles; more are closed at once.
const MAX_CONNS: usize = 4096;
/// Longest name line a client accepts.
const MAX_NAME: usize = 256;
/// Failures kept with details in a report.
const MAX_FAILURES: usize = 50;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, rest)) = args.split_first() else {
        usage("missing subcommand");
    };
    let opts = Opts::parse(rest);
    let result = match cmd.as_str() {
        "serve" => serve(&opts, !opts.flag("udp-only"), !opts.flag("tcp-only"), None),
        "tcp-echo" => serve(&opts, true, false, None),
        "udp-echo" => serve(&opts, false, true, None),
        "echo-server" => serve(&opts, true, true, Some("echo")),
        "tcp-connect" => print(&tcp_connect(&opts)),
        "udp-send" => print(&udp_send(&opts, false)),
        "udp-connected" => print(&udp_send(&opts, true)),
        "rr" => print(&rr(&opts)),
        "crr" => print(&crr(&opts)),
        "probe" => print(&probe(&opts)),
        "probe-loop" => print(&probe_loop(&opts)),
        "udp-flood" => print(&udp_flood(&opts)),
        "hold" => print(&hold(&opts)),
        "bulk" => bulk::bulk(&opts),
        "stream" => accel::stream(&opts),
        "accel-rr" => accel::accel_rr(&opts),
        "accel-crr" => accel::accel_crr(&opts),
        "echo-tokio" => accel::echo_tokio(&opts),
        other => usage(&format!("unknown subcommand {other:?}")),
    };
    if let Err(e) = result {
        eprintln!("sinew-testpod {cmd}: {e}");
        std::process::exit(1);
    }
}

fn usage(msg: &str) -> ! {
    eprintln!("sinew-testpod: {msg}\nsee the module docs of src/bin/sinew-testpod.rs for usage");
    std::process::exit(2);
}

/// `--key value` and `--flag` arguments.
struct Opts {
    values: HashMap<String, String>,
    flags: Vec<String>,
}

impl Opts {
    fn parse(args: &[String]) -> Opts {
        const FLAGS: [&str; 5] = [
            "tcp-only",
            "udp-only",
            "new-socket-each",
            "v4-only",
            "timeline",
        ];
        let mut values = HashMap::new();
        let mut flags = Vec::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let Some(key) = a.strip_prefix("--") else {
                usage(&format!("unexpected argument {a:?}"));
            };
            if FLAGS.contains(&key) {
                flags.push(key.to_string());
            } else {
                let Some(v) = it.next() else {
                    usage(&format!("--{key} needs a value"));
                };
                values.insert(key.to_string(), v.clone());
            }
        }
        Opts { values, flags }
    }

    fn flag(&self, key: &str) -> bool {
        self.flags.iter().any(|f| f == key)
    }

    fn str(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    fn num(&self, key: &str, default: u64) -> u64 {
        match self.str(key) {
            None => default,
            Some(v) => v
                .parse()
                .unwrap_or_else(|_| usage(&format!("--{key}: not a number: {v:?}"))),
        }
    }

    fn ms(&self, key: &str, default: u64) -> Duration {
        Duration::from_millis(self.num(key, default)).min(MAX_DURATION)
    }

    fn count(&self, key: &str, default: u64) -> u64 {
        self.num(key, default).min(MAX_COUNT)
    }

    fn to(&self) -> SocketAddr {
        let v = self
            .str("to")
            .unwrap_or_else(|| usage("--to ADDR is required"));
        v.parse()
            .unwrap_or_else(|_| usage(&format!("--to: not ip:port or [ipv6]:port: {v:?}")))
    }
}

fn print<T: serde::Serialize>(v: &T) -> io::Result<()> {
    let mut out = io::stdout().lock();
    serde_json::to_writer(&mut out, v)?;
    out.write_all(b"\n")?;
    out.flush()
}

fn err_key(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => errno_name(code),
        None if e.kind() == io::ErrorKind::TimedOut || e.kind() == io::ErrorKind::WouldBlock => {
            "TIMEOUT".into()
        }
        None if e.kind() == io::ErrorKind::UnexpectedEof => "EOF".into(),
        None => format!("{:?}", e.kind()),
    }
}

fn failure(index: u64, stage: &str, e: &io::Error, started: Instant) -> Failure {
    Failure {
        index: index as u32,
        stage: stage.to_string(),
        errno: err_key(e),
        message: e.to_string(),
        elapsed_ms: started.elapsed().as_secs_f64() * 1000.0,
    }
}

/// Formats an address the way `SocketAddr` does, so v4-mapped peers show as `[::ffff:a.b.c.d]:p`.
fn addr_key(a: &SocketAddr) -> String {
    a.to_string()
}

// ---------------------------------------------------------------------------------------------------------------
// Servers

fn serve(opts: &Opts, tcp: bool, udp: bool, default_name: Option<&str>) -> io::Result<()> {
    let ports: Vec<u16> = match opts.str("ports") {
        Some(list) => list
            .split(',')
            .map(|p| {
                p.trim()
                    .parse::<u16>()
                    .ok()
                    .filter(|&p| p != 0)
                    .unwrap_or_else(|| usage(&format!("--ports: not a port: {p:?}")))
            })
            .collect(),
        None => vec![
            u16::try_from(opts.num("port", 0)).unwrap_or_else(|_| usage("--port out of range")),
        ],
    };
    if ports.is_empty() || ports.len() > 64 {
        usage("--ports: 1 to 64 ports");
    }
    let name = opts
        .str("name")
        .or(default_name)
        .unwrap_or_else(|| usage("--name NAME is required"))
        .to_string();
    // A server normally dies with its guard; the lifetime only bounds a leaked one.
    let lifetime = opts.ms("lifetime-ms", 600_000);
    std::thread::spawn(move || {
        std::thread::sleep(lifetime);
        std::process::exit(0);
    });
    let mut bound = Vec::new();
    let mut sockets = Vec::new();
    for &port in &ports {
        let (listener, udp_sock, p) = bind_port(port, tcp, udp, opts.flag("v4-only"))?;
        bound.push(p);
        sockets.push((listener, udp_sock));
    }
    print(&ServeReady {
        event: "listening".into(),
        port: bound[0],
        name: name.clone(),
        tcp,
        udp,
        ports: if opts.str("ports").is_some() {
            bound
        } else {
            Vec::new()
        },
    })?;

    let mut handles = Vec::new();
    for (listener, udp_sock) in sockets {
        if let Some(sock) = udp_sock {
            let name = name.clone();
            handles.push(std::thread::spawn(move || serve_udp(sock, &name)));
        }
        if let Some(l) = listener {
            let name = name.clone();
            handles.push(std::thread::spawn(move || serve_tcp(l, name)));
        }
    }
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

/// Binds the TCP listener and/or UDP socket of one port (0: an ephemeral one, the same for both); returns them
/// with the bound port.
fn bind_port(
    port: u16,
    tcp: bool,
    udp: bool,
    v4_only: bool,
) -> io::Result<(Option<TcpListener>, Option<UdpSocket>, u16)> {
    // Dual-stack wildcard sockets serve IPv4, v4-mapped and IPv6 clients alike; fall back to IPv4-only where IPv6
    // is disabled. `--v4-only`: AF_INET sockets (what a server that never heard of IPv6 binds).
    let v4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    let v6 = if v4_only {
        v4
    } else {
        SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))
    };
    let listener = if tcp {
        Some(TcpListener::bind(v6).or_else(|_| TcpListener::bind(v4))?)
    } else {
        None
    };
    let bound_port = match &listener {
        Some(l) => l.local_addr()?.port(),
        None => port,
    };
    let udp_sock = if udp {
        let p = if bound_port != 0 { bound_port } else { port };
        let v4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, p));
        let v6 = if v4_only {
            v4
        } else {
            SocketAddr::from((Ipv6Addr::UNSPECIFIED, p))
        };
        Some(UdpSocket::bind(v6).or_else(|_| UdpSocket::bind(v4))?)
    } else {
        None
    };
    let bound_port = match (&listener, &udp_sock) {
        (Some(l), _) => l.local_addr()?.port(),
        (None, Some(u)) => u.local_addr()?.port(),
        (None, None) => usage("nothing to serve"),
    };
    Ok((listener, udp_sock, bound_port))
}

fn serve_udp(sock: UdpSocket, name: &str) {
    let mut buf = vec![0u8; 65536];
    // Bounded by the process lifetime; the count bound is belt and braces.
    for _ in 0..MAX_COUNT * 10 {
        match sock.recv_from(&mut buf) {
            Ok((_, from)) => {
                let _ = sock.send_to(name.as_bytes(), from);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                eprintln!("udp recv: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn serve_tcp(listener: TcpListener, name: String) {
    let active = Arc::new(AtomicUsize::new(0));
    let hello: Arc<[u8]> = format!("{name}\n").into_bytes().into();
    for _ in 0..MAX_COUNT * 10 {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) => {
                eprintln!("accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if active.load(Ordering::Relaxed) >= MAX_CONNS {
            continue; // dropped: closes the connection
        }
        active.fetch_add(1, Ordering::Relaxed);
        let active = active.clone();
        let hello = hello.clone();
        std::thread::spawn(move || {
            let _ = echo(stream, &hello);
            active.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

fn echo(mut s: TcpStream, hello: &[u8]) -> io::Result<()> {
    s.set_nodelay(true)?;
    // An idle connection ends after a minute, so a stuck client cannot pin a thread forever.
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    s.write_all(hello)?;
    let mut buf = vec![0u8; 65536];
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        s.write_all(&buf[..n])?;
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Clients

/// Reads the server's name line with one deadline for the whole line.
fn read_name(s: &mut TcpStream, timeout: Duration) -> io::Result<String> {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; MAX_NAME];
    let mut len = 0;
    // At most MAX_NAME reads (each returns at least one byte or ends the loop).
    while len < MAX_NAME {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "timed out reading the name",
            ));
        }
        s.set_read_timeout(Some(left))?;
        let n = s.read(&mut buf[len..])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed before sending a name",
            ));
        }
        len += n;
        if let Some(i) = buf[..len].iter().position(|&b| b == b'\n') {
            return Ok(String::from_utf8_lossy(&buf[..i]).into_owned());
        }
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        "name line too long",
    ))
}

fn tcp_connect(opts: &Opts) -> ConnectReport {
    let to = opts.to();
    let count = opts.count("count", 1);
    let interval = opts.ms("interval-ms", 0);
    let timeout = opts.ms("timeout-ms", 2000).max(Duration::from_millis(1));
    let progress_every = opts.num("progress-every", 0);
    let mut r = ConnectReport {
        to: to.to_string(),
        started_unix_ms: sinew_tests::unix_ms(),
        ..Default::default()
    };
    let run_deadline = Instant::now() + MAX_DURATION;
    let mut connect_us = Vec::new();
    for i in 0..count {
        if Instant::now() >= run_deadline {
            break;
        }
        if i > 0 && !interval.is_zero() {
            std::thread::sleep(interval);
        }
        r.attempts += 1;
        let t0 = Instant::now();
        let outcome = TcpStream::connect_timeout(&to, timeout)
            .map_err(|e| ("connect", e))
            .and_then(|mut s| {
                connect_us.push(t0.elapsed().as_secs_f64() * 1e6);
                let peer = s.peer_addr().map_err(|e| ("getpeername", e))?;
                let name = read_name(&mut s, timeout).map_err(|e| ("read", e))?;
                Ok((peer, name))
            });
        match outcome {
            Ok((peer, name)) => {
                r.ok += 1;
                *r.peers.entry(addr_key(&peer)).or_default() += 1;
                *r.names.entry(name.clone()).or_default() += 1;
                r.sequence.push(name);
            }
            Err((stage, e)) => {
                r.failed += 1;
                let key = format!("{stage}:{}", err_key(&e));
                *r.errors.entry(key.clone()).or_default() += 1;
                r.sequence.push(format!("!{key}"));
                if r.failures.len() < MAX_FAILURES {
                    r.failures.push(failure(i, stage, &e, t0));
                }
            }
        }
        if progress_every > 0 && u64::from(r.attempts) % progress_every == 0 {
            let line = serde_json::json!({
                "event": "progress", "attempts": r.attempts, "ok": r.ok, "failed": r.failed,
            });
            let _ = print(&line);
        }
    }
    connect_us.sort_by(f64::total_cmp);
    r.connect_p50_us = percentile(&connect_us, 0.5);
    r.connect_max_us = connect_us.last().copied().unwrap_or(0.0);
    r.finished_unix_ms = sinew_tests::unix_ms();
    r
}

/// A UDP socket of `to`'s family bound to `port` (0: ephemeral).
fn udp_socket_from(to: &SocketAddr, port: u16) -> io::Result<UdpSocket> {
    match to {
        SocketAddr::V4(_) => UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)),
        SocketAddr::V6(_) => UdpSocket::bind((Ipv6Addr::UNSPECIFIED, port)),
    }
}

fn udp_socket_for(to: &SocketAddr) -> io::Result<UdpSocket> {
    match to {
        SocketAddr::V4(_) => UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)),
        SocketAddr::V6(_) => UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0)),
    }
}

fn udp_send(opts: &Opts, connected: bool) -> UdpReport {
    let to = opts.to();
    let count = opts.count("count", 1);
    let interval = opts.ms("interval-ms", 0);
    let timeout = opts.ms("timeout-ms", 1000).max(Duration::from_millis(1));
    let new_each = opts.flag("new-socket-each");
    let timeline = opts.flag("timeline");
    // A fixed source port (default: an ephemeral one), to reuse a 5-tuple on purpose.
    let src_port =
        u16::try_from(opts.num("src-port", 0)).unwrap_or_else(|_| usage("--src-port out of range"));
    let mut r = UdpReport {
        to: to.to_string(),
        ..Default::default()
    };
    let run_deadline = Instant::now() + opts.ms("duration-ms", MAX_DURATION.as_millis() as u64);
    let mut sock: Option<UdpSocket> = None;
    let mut buf = [0u8; 2048];
    for i in 0..count {
        if Instant::now() >= run_deadline {
            break;
        }
        if i > 0 && !interval.is_zero() {
            std::thread::sleep(interval);
        }
        let t0 = Instant::now();
        let sent_unix_ms = sinew_tests::unix_ms();
        let fail = |r: &mut UdpReport, stage: &str, e: io::Error| -> String {
            r.failed += 1;
            let key = format!("{stage}:{}", err_key(&e));
            *r.errors.entry(key.clone()).or_default() += 1;
            if r.failures.len() < MAX_FAILURES {
                r.failures.push(failure(i, stage, &e, t0));
            }
            key
        };
        let outcome: String = 'one: {
            if sock.is_none() || new_each {
                match udp_socket_from(&to, src_port).and_then(|s| {
                    s.set_read_timeout(Some(timeout))?;
                    if connected {
                        s.connect(to)?;
                    }
                    Ok(s)
                }) {
                    Ok(s) => sock = Some(s),
                    Err(e) => break 'one fail(&mut r, "socket", e),
                }
            }
            let s = sock.as_ref().expect("socket just made");
            let payload = format!("ping {i}");
            let sent = if connected {
                s.send(payload.as_bytes())
            } else {
                s.send_to(payload.as_bytes(), to)
            };
            if let Err(e) = sent {
                break 'one fail(&mut r, "send", e);
            }
            r.sent += 1;
            // Stray replies (e.g. a late answer to an earlier datagram) are skipped; 8 reads bound the loop.
            let mut got = None;
            for _ in 0..8 {
                let res = if connected {
                    s.recv(&mut buf).and_then(|n| Ok((n, s.peer_addr()?)))
                } else {
                    s.recv_from(&mut buf)
                };
                match res {
                    Ok((n, from)) => {
                        got = Some(Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from)));
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        got = Some(Err(e));
                        break;
                    }
                }
            }
            match got {
                Some(Ok((name, from))) => {
                    r.received += 1;
                    *r.names.entry(name).or_default() += 1;
                    *r.sources.entry(addr_key(&from)).or_default() += 1;
                    "ok".to_string()
                }
                Some(Err(e)) => fail(&mut r, "recv", e),
                None => fail(
                    &mut r,
                    "recv",
                    io::Error::new(io::ErrorKind::TimedOut, "no reply"),
                ),
            }
        };
        if timeline {
            r.timeline.push((sent_unix_ms, outcome));
        }
    }
    r
}

/// The options `rr` and `crr` share; `max_key` names the iteration cap (`max-requests` or `max`).
struct Load {
    to: SocketAddr,
    size: usize,
    duration: Duration,
    max: u64,
    timeout: Duration,
}

impl Load {
    fn parse(opts: &Opts, max_key: &str) -> Load {
        Load {
            to: opts.to(),
            size: opts.count("size", 1024).clamp(1, 1 << 20) as usize,
            duration: opts.ms("duration-ms", 1000),
            max: opts.count(max_key, 100_000),
            timeout: opts.ms("timeout-ms", 2000).max(Duration::from_millis(1)),
        }
    }
}

fn rr(opts: &Opts) -> RrReport {
    let Load {
        to,
        size,
        duration,
        max,
        timeout,
    } = Load::parse(opts, "max-requests");
    let mut r = RrReport {
        to: to.to_string(),
        size,
        ..Default::default()
    };
    let mut s = match TcpStream::connect_timeout(&to, timeout).and_then(|mut s| {
        s.set_nodelay(true)?;
        let name = read_name(&mut s, timeout)?;
        Ok((s, name))
    }) {
        Ok((s, name)) => {
            r.name = name;
            s
        }
        Err(e) => {
            r.error = Some(format!("connect:{}: {e}", err_key(&e)));
            return r;
        }
    };
    let _ = s.set_read_timeout(Some(timeout));
    let req = vec![0x5au8; size];
    let mut resp = vec![0u8; size];
    let mut samples = Vec::new();
    let start = Instant::now();
    while r.requests < max && start.elapsed() < duration {
        let t0 = Instant::now();
        if let Err(e) = s.write_all(&req).and_then(|_| s.read_exact(&mut resp)) {
            r.error = Some(format!("io:{}: {e}", err_key(&e)));
            break;
        }
        samples.push(t0.elapsed().as_secs_f64() * 1e6);
        r.requests += 1;
    }
    r.duration_ms = start.elapsed().as_secs_f64() * 1000.0;
    samples.sort_by(f64::total_cmp);
    r.p50_us = percentile(&samples, 0.5);
    r.p90_us = percentile(&samples, 0.9);
    r.p99_us = percentile(&samples, 0.99);
    r.max_us = samples.last().copied().unwrap_or(0.0);
    r.mean_us = if samples.is_empty() {
        0.0
    } else {
        samples.iter().sum::<f64>() / samples.len() as f64
    };
    r
}

fn crr(opts: &Opts) -> CrrReport {
    let Load {
        to,
        size,
        duration,
        max,
        timeout,
    } = Load::parse(opts, "max");
    let mut r = CrrReport {
        to: to.to_string(),
        size,
        ..Default::default()
    };
    let req = vec![0x5au8; size];
    let mut resp = vec![0u8; size];
    let mut samples = Vec::new();
    let mut names: BTreeMap<String, u32> = BTreeMap::new();
    let start = Instant::now();
    while r.connections + r.failed < max && start.elapsed() < duration {
        let t0 = Instant::now();
        let res = TcpStream::connect_timeout(&to, timeout)
            .map_err(|e| ("connect", e))
            .and_then(|mut s| {
                s.set_nodelay(true).map_err(|e| ("connect", e))?;
                let name = read_name(&mut s, timeout).map_err(|e| ("read", e))?;
                s.write_all(&req).map_err(|e| ("write", e))?;
                s.read_exact(&mut resp).map_err(|e| ("read", e))?;
                Ok(name)
            });
        match res {
            Ok(name) => {
                samples.push(t0.elapsed().as_secs_f64() * 1e6);
                r.connections += 1;
                *names.entry(name).or_default() += 1;
            }
            Err((stage, e)) => {
                r.failed += 1;
                *r.errors
                    .entry(format!("{stage}:{}", err_key(&e)))
                    .or_default() += 1;
            }
        }
    }
    r.duration_ms = start.elapsed().as_secs_f64() * 1000.0;
    r.conns_per_sec = if r.duration_ms > 0.0 {
        r.connections as f64 * 1000.0 / r.duration_ms
    } else {
        0.0
    };
    samples.sort_by(f64::total_cmp);
    r.p50_us = percentile(&samples, 0.5);
    r.p90_us = percentile(&samples, 0.9);
    r.p99_us = percentile(&samples, 0.99);
    r.names = names;
    r
}

// ---------------------------------------------------------------------------------------------------------------
// Batch probes

/// Most targets one `probe` accepts (each gets a thread for at most the per-probe timeout).
const MAX_PROBE_TARGETS: usize = 1024;
/// Probes run at the same time; more targets run in waves.
const PROBE_WAVE: usize = 128;

type Target = (String, bool, SocketAddr);

fn probe_timeout(opts: &Opts) -> Duration {
    opts.ms("timeout-ms", 400)
        .clamp(Duration::from_millis(1), Duration::from_secs(30))
}

fn probe(opts: &Opts) -> ProbeReport {
    let timeout = probe_timeout(opts);
    let targets = probe_targets(opts);
    let start = Instant::now();
    let results = probe_batch(&targets, timeout);
    ProbeReport {
        timeout_ms: timeout.as_millis() as u64,
        results,
        duration_ms: start.elapsed().as_secs_f64() * 1000.0,
    }
}

fn probe_loop(opts: &Opts) -> ProbeLoopReport {
    let timeout = probe_timeout(opts);
    let targets = probe_targets(opts);
    let duration = opts.ms("duration-ms", 10_000);
    let interval = opts.ms("interval-ms", 10);
    let max_rounds = opts.count("max-rounds", 100_000);
    let stop = opts.str("stop-file").map(std::path::PathBuf::from);
    let start = Instant::now();
    let mut report = ProbeLoopReport {
        targets: targets.iter().map(|t| t.0.clone()).collect(),
        timeout_ms: timeout.as_millis() as u64,
        rounds: Vec::new(),
    };
    for _ in 0..max_rounds {
        if start.elapsed() >= duration || stop.as_ref().is_some_and(|p| p.exists()) {
            break;
        }
        let start_unix_ms = sinew_tests::unix_ms();
        let outcomes = probe_batch(&targets, timeout)
            .into_iter()
            .map(|r| r.outcome)
            .collect();
        report.rounds.push(ProbeRound {
            start_unix_ms,
            outcomes,
        });
        std::thread::sleep(interval);
    }
    report
}

fn probe_targets(opts: &Opts) -> Vec<Target> {
    let list = opts
        .str("targets")
        .unwrap_or_else(|| usage("--targets PROTO:ADDR,.. is required"));
    let targets: Vec<(String, bool, SocketAddr)> = list
        .split(',')
        .filter(|t| !t.is_empty())
        .map(|t| {
            let (proto, addr) = t
                .split_once(':')
                .unwrap_or_else(|| usage(&format!("--targets: {t:?} is not PROTO:ADDR")));
            let tcp = match proto {
                "tcp" => true,
                "udp" => false,
                _ => usage(&format!("--targets: {t:?}: PROTO is tcp or udp")),
            };
            let addr: SocketAddr = addr
                .parse()
                .unwrap_or_else(|_| usage(&format!("--targets: {t:?}: not ip:port")));
            (t.to_string(), tcp, addr)
        })
        .collect();
    if targets.is_empty() || targets.len() > MAX_PROBE_TARGETS {
        usage(&format!("--targets: 1 to {MAX_PROBE_TARGETS} targets"));
    }
    targets
}

/// Probes every target once, concurrently (in waves of [`PROBE_WAVE`]), results in the targets' order.
fn probe_batch(targets: &[Target], timeout: Duration) -> Vec<ProbeResult> {
    let mut results = Vec::with_capacity(targets.len());
    for wave in targets.chunks(PROBE_WAVE) {
        let handles: Vec<_> = wave
            .iter()
            .cloned()
            .map(|(target, tcp, addr)| {
                std::thread::spawn(move || {
                    let t0 = Instant::now();
                    let (outcome, name) = if tcp {
                        probe_tcp(addr, timeout)
                    } else {
                        probe_udp(addr, timeout)
                    };
                    ProbeResult {
                        target,
                        outcome,
                        elapsed_ms: t0.elapsed().as_secs_f64() * 1000.0,
                        name,
                    }
                })
            })
            .collect();
        for (h, (target, _, _)) in handles.into_iter().zip(wave) {
            results.push(h.join().unwrap_or_else(|_| ProbeResult {
                target: target.clone(),
                outcome: "panic".into(),
                ..Default::default()
            }));
        }
    }
    results
}

/// The outcome word of a failed step: the errno name, `timeout` for the tool's own timeouts.
fn outcome_of(e: &io::Error) -> String {
    match err_key(e).as_str() {
        "TIMEOUT" | "EAGAIN" => PROBE_TIMEOUT.to_string(),
        k => k.to_string(),
    }
}

fn probe_tcp(to: SocketAddr, timeout: Duration) -> (String, Option<String>) {
    let deadline = Instant::now() + timeout;
    let mut s = match TcpStream::connect_timeout(&to, timeout) {
        Ok(s) => s,
        Err(e) => return (outcome_of(&e), None),
    };
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    let name = match read_name(&mut s, left()) {
        Ok(n) => n,
        Err(e) => return (format!("echo:{}", outcome_of(&e)), None),
    };
    let echoed = s
        .set_write_timeout(Some(left()))
        .and_then(|_| s.write_all(b"ping"))
        .and_then(|_| s.set_read_timeout(Some(left())))
        .and_then(|_| {
            let mut back = [0u8; 4];
            s.read_exact(&mut back)?;
            if &back == b"ping" {
                Ok(())
            } else {
                Err(io::Error::new(io::ErrorKind::InvalidData, "echo differs"))
            }
        });
    match echoed {
        Ok(()) => (PROBE_OK.to_string(), Some(name)),
        Err(e) => (format!("echo:{}", outcome_of(&e)), Some(name)),
    }
}

fn probe_udp(to: SocketAddr, timeout: Duration) -> (String, Option<String>) {
    let deadline = Instant::now() + timeout;
    let s = match udp_socket_for(&to) {
        Ok(s) => s,
        Err(e) => return (format!("socket:{}", outcome_of(&e)), None),
    };
    if let Err(e) = s.send_to(b"probe", to) {
        return (outcome_of(&e), None);
    }
    let mut buf = [0u8; 2048];
    // Only a reply from the target counts; 16 reads bound the loop (each waits at most the time left).
    for _ in 0..16 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        if let Err(e) = s.set_read_timeout(Some(left)) {
            return (format!("recv:{}", outcome_of(&e)), None);
        }
        match s.recv_from(&mut buf) {
            Ok((n, from)) if from == to => {
                return (
                    PROBE_OK.to_string(),
                    Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
                );
            }
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let o = outcome_of(&e);
                // An ICMP error (port unreachable) shows up here as ECONNREFUSED.
                return (o, None);
            }
        }
    }
    (PROBE_TIMEOUT.to_string(), None)
}

fn udp_flood(opts: &Opts) -> FloodReport {
    let to = opts.to();
    let count = opts.count("count", 1000);
    let duration = opts.ms("duration-ms", 5000);
    let mut r = FloodReport {
        to: to.to_string(),
        ..Default::default()
    };
    let start = Instant::now();
    let sock = match udp_socket_for(&to) {
        Ok(s) => s,
        Err(e) => {
            *r.errors
                .entry(format!("socket:{}", err_key(&e)))
                .or_default() += 1;
            return r;
        }
    };
    while r.attempts < count && start.elapsed() < duration {
        r.attempts += 1;
        match sock.send_to(b"flood", to) {
            Ok(_) => r.sent += 1,
            Err(e) => *r.errors.entry(err_key(&e)).or_default() += 1,
        }
    }
    r.duration_ms = start.elapsed().as_secs_f64() * 1000.0;
    r
}

// ---------------------------------------------------------------------------------------------------------------
// One long-lived connection

fn hold(opts: &Opts) -> sinew_tests::mesh::HoldReport {
    let to = opts.to();
    let payload = opts
        .str("payload")
        .unwrap_or("hold-ping")
        .as_bytes()
        .to_vec();
    if payload.is_empty() {
        usage("--payload must not be empty");
    }
    let count = opts.count("count", 1_000_000);
    let interval = opts.ms("interval-ms", 0);
    let duration = opts.ms("duration-ms", 1000);
    let timeout = opts.ms("timeout-ms", 2000).max(Duration::from_millis(1));
    let mut r = sinew_tests::mesh::HoldReport {
        to: to.to_string(),
        started_unix_ms: sinew_tests::unix_ms(),
        ..Default::default()
    };
    let fail = |r: &mut sinew_tests::mesh::HoldReport, stage: &str, e: &io::Error| {
        r.first_error = Some(format!("{stage}:{}: {e}", err_key(e)));
        r.first_error_unix_ms = Some(sinew_tests::unix_ms());
        r.finished_unix_ms = sinew_tests::unix_ms();
    };
    let mut s = match TcpStream::connect_timeout(&to, timeout) {
        Ok(s) => s,
        Err(e) => {
            fail(&mut r, "connect", &e);
            return r;
        }
    };
    let _ = s.set_nodelay(true);
    match read_name(&mut s, timeout) {
        Ok(n) => r.name = Some(n),
        Err(e) => {
            fail(&mut r, "name", &e);
            return r;
        }
    }
    r.connected = true;
    let _ = s.set_read_timeout(Some(timeout));
    let _ = s.set_write_timeout(Some(timeout));
    let mut back = vec![0u8; payload.len()];
    let start = Instant::now();
    while r.round_trips < count && start.elapsed() < duration {
        if r.round_trips > 0 && !interval.is_zero() {
            std::thread::sleep(interval.min(duration.saturating_sub(start.elapsed())));
            if start.elapsed() >= duration {
                break;
            }
        }
        let t0 = Instant::now();
        if let Err(e) = s.write_all(&payload) {
            fail(&mut r, "write", &e);
            return r;
        }
        if let Err(e) = s.read_exact(&mut back) {
            fail(&mut r, "read", &e);
            return r;
        }
        if back != payload {
            let e = io::Error::new(
                io::ErrorKind::InvalidData,
                "the echo differs from the payload",
            );
            fail(&mut r, "echo", &e);
            return r;
        }
        r.max_rtt_ms = r.max_rtt_ms.max(t0.elapsed().as_secs_f64() * 1000.0);
        r.round_trips += 1;
    }
    r.finished_unix_ms = sinew_tests::unix_ms();
    r
}
