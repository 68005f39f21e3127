//! The mesh group of `cargo xtask bench` (issue 4, item 10): the same client and server across two nodes without
//! Sinew, through Sinew's kernel-only path, and through both node proxies with mTLS, side by side in one run.
//!
//! Topology (`sinew_tests::mesh::MeshFixture`: two nodes joined by the underlay, one CA shared by both agents via
//! `--ca-dir`, each agent's proxy in its node's netns):
//! - node-a: pod `client` (namespace `bench-client`, sa `bench-client`, **not** enrolled) and pod `mclient` (same
//!   namespace, sa `bench-mclient`, enrolled: `sinew.dev/mesh: enabled`);
//! - node-b: pod `server` (namespace `default`, sa `bench-server`, enrolled, `app=bench`) running
//!   `sinew-testpod serve --ports 8080` (its name line, then an echo of every byte);
//! - Service `bench` (`10.96.0.20:80` -> 8080).
//!
//! Scenarios:
//! - `direct-2node`: `client`'s netns, outside node-a's cgroup root -> server pod IP:8080 (no Sinew on the client);
//! - `kernel-2node`: `client` in its pod cgroup -> VIP:80: balanced by `connect4`; the client is not enrolled, so
//!   nothing is redirected (PERMISSIVE, the default, lets the enrolled server take plain connections);
//! - `mtls-2node`: `mclient` in its pod cgroup -> VIP:80: balanced and redirected at `connect()` to node-a's proxy
//!   (169.254.7.1:15001), carried as an HTTP/2 CONNECT stream over a pooled mTLS connection to node-b's proxy
//!   (hostIP:15008), which connects to the server.
//!
//! Kinds: `rr` (1 connection), `rrN` (`--conns` connections, one process each), `crr` (a new connection per
//! request), `bulk` (one connection streaming 64 KiB writes to the echo server for the run; MB/s echoed back), all
//! with 1 KiB requests where they have requests. Around every run: client CPU (rusage of the reaped clients), both
//! agents' CPU per thread (`/proc/<pid>/task/*/schedstat`: ns; the proxy is the `sinew-proxy` thread), both agents'
//! VmRSS, and the agents' counters (redirects, mTLS connections) to prove which path every connection took. After the
//! repeats: 1,000 idle connections held open through the mTLS path, and both agents' VmRSS while they are open.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde_json::{Value, json};
use sinew_tests::mesh::{MeshFixture, MeshOptions, MeshPod};
use sinew_tests::testpod::{ConnectReport, RrReport};
use sinew_tests::{Metrics, Proc, Service, ServicePort};

use super::{
    BenchArgs, Better, CLIENT_NS, CLIENT_SA, Comparison, IDLE_TIMEOUT, IO_TIMEOUT_MS, Metric,
    ORDERS3, Row, SERVER_PORT, SERVER_SA, SIZE, VIP, VIP_PORT, WARMUP_MS, compare, crr_metrics,
    flush_time_wait_in, load_args, loadavg, m, median, medians_and_spreads, proc_status_kib,
    ratio_cell, render_grid, spawn_client, tcp_tw_reuse, value, wait_all, wait_json,
};
use crate::os::{check_interrupt, children_cpu, proc_cpu, sleep_interruptible};

const NODE_A: &str = "node-a";
const NODE_B: &str = "node-b";
const MCLIENT_SA: &str = "bench-mclient";

const DIRECT: &str = "direct-2node";
const KERNEL: &str = "kernel-2node";
const MTLS: &str = "mtls-2node";

/// Connections held open for the memory probe, and the client processes that hold them (each well under the
/// default 1,024 file descriptors).
const OPEN_CONNS: u64 = 1000;
const OPEN_PROCS: u64 = 4;
/// Bound for opening them all, and for the whole hold.
const OPEN_TIMEOUT: Duration = Duration::from_secs(120);
/// File descriptors the agents and the server need for the memory probe (1,000 sockets each, plus their own).
const NOFILE_WANTED: u64 = 8192;
/// Bulk: bytes per write.
pub(super) const BULK_CHUNK: usize = 64 * 1024;

/// The targets (printed as met / not met; the bench never fails on them).
const TARGET_ADDED_P50_US: f64 = 20.0;
const TARGET_PROXY_CPU_US: f64 = 25.0;
const TARGET_CONN_RATE: f64 = 0.5;
const TARGET_RSS_MIB: f64 = 20.0;

const REDIRECTED: &str = "sinew_proxy_redirected_total";
const OPENED: &str = "istio_tcp_connections_opened_total";
const HANDSHAKES: &str = "sinew_proxy_tunnel_handshakes_total";
const ACTIVE: &str = "sinew_proxy_active_connections";
/// The proxy's thread in the agent process.
const PROXY_THREAD: &str = "sinew-proxy";

#[derive(Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Kind {
    Rr,
    RrN,
    Crr,
    Bulk,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Rr => "rr",
            Kind::RrN => "rrN",
            Kind::Crr => "crr",
            Kind::Bulk => "bulk",
        }
    }

    /// What CPU is divided by.
    fn unit(self) -> &'static str {
        match self {
            Kind::Rr | Kind::RrN => "request",
            Kind::Crr => "connection",
            Kind::Bulk => "MB",
        }
    }

    /// The key of the agents' CPU per unit.
    fn agents_key(self) -> &'static str {
        match self {
            Kind::Rr => "rr_agents_us",
            Kind::RrN => "rrN_agents_us",
            Kind::Crr => "crr_agents_us",
            Kind::Bulk => "bulk_agents_us",
        }
    }
}

/// First table: request/response on one and on N connections.
const LATENCY: &[Metric] = &[
    m("rr_p50_us", "rr p50", Better::Lower, true),
    m("rr_p90_us", "rr p90", Better::Lower, false),
    m("rr_p99_us", "rr p99", Better::Lower, false),
    m("rr_rps", "rr req/s", Better::Higher, false),
    m("rr_cpu_us", "rr CPU", Better::Lower, false),
    m("rrN_p50_us", "rrN p50", Better::Lower, false),
    m("rrN_p90_us", "rrN p90", Better::Lower, false),
    m("rrN_p99_us", "rrN p99", Better::Lower, false),
    m("rrN_rps", "rrN req/s", Better::Higher, false),
    m("rrN_cpu_us", "rrN CPU", Better::Lower, false),
];

/// Second table: new connections, bulk, and both agents' CPU per unit of work.
const RATES: &[Metric] = &[
    m("crr_cps", "crr conn/s", Better::Higher, true),
    m("crr_p50_us", "crr p50", Better::Lower, false),
    m("crr_cpu_us", "crr CPU", Better::Lower, false),
    m("bulk_mbps", "bulk MB/s", Better::Higher, false),
    m("bulk_cpu_us", "bulk CPU", Better::Lower, false),
    m("rr_agents_us", "rr agents", Better::Lower, false),
    m("rrN_agents_us", "rrN agents", Better::Lower, false),
    m("crr_agents_us", "crr agents", Better::Lower, false),
    m("bulk_agents_us", "bulk agents", Better::Lower, false),
];

/// One side of the comparison: where the client runs and where it connects.
struct Scenario {
    name: &'static str,
    description: &'static str,
    netns: PathBuf,
    netns_name: String,
    cgroup: PathBuf,
    target: String,
    /// Through the proxies (its connects must be redirected and arrive as mTLS).
    mtls: bool,
}

/// The agents' counters that show which path connections took.
#[derive(Clone, Copy, Default, Serialize)]
struct Counters {
    /// node-a: `sinew_proxy_redirected_total` (None: the agent does not export it).
    redirected: Option<f64>,
    /// node-a: mTLS connections the outbound side established (`reporter="source"`).
    src_mtls: f64,
    /// node-b: mTLS connections the inbound side established (`reporter="destination"`).
    dst_mtls: f64,
    /// node-a: TLS handshakes for new tunnel connections.
    handshakes: f64,
    /// App connections open on each proxy now.
    active_a: f64,
    active_b: f64,
}

fn mtls_opened(m: &Metrics, reporter: &str) -> f64 {
    m.value(
        OPENED,
        &[
            ("reporter", reporter),
            ("connection_security_policy", "mutual_tls"),
        ],
    )
}

fn counters(f: &MeshFixture) -> Result<Counters> {
    let a = f.agent(NODE_A).metrics().context("node-a /metrics")?;
    let b = f.agent(NODE_B).metrics().context("node-b /metrics")?;
    Ok(Counters {
        redirected: a.get(REDIRECTED, &[]),
        src_mtls: mtls_opened(&a, "source"),
        dst_mtls: mtls_opened(&b, "destination"),
        handshakes: a.value(HANDSHAKES, &[]),
        active_a: a.value(ACTIVE, &[]),
        active_b: b.value(ACTIVE, &[]),
    })
}

/// The counters' growth over a run.
#[derive(Clone, Copy, Default, Serialize)]
struct CounterDelta {
    redirected: Option<f64>,
    src_mtls: f64,
    dst_mtls: f64,
    handshakes: f64,
}

fn delta(a: &Counters, b: &Counters) -> CounterDelta {
    CounterDelta {
        redirected: match (a.redirected, b.redirected) {
            (Some(x), Some(y)) => Some(y - x),
            _ => None,
        },
        src_mtls: b.src_mtls - a.src_mtls,
        dst_mtls: b.dst_mtls - a.dst_mtls,
        handshakes: b.handshakes - a.handshakes,
    }
}

/// CPU time per thread name of a process, ns: `sum_exec_runtime` from `/proc/<pid>/task/<tid>/schedstat` (the
/// same on-CPU time as utime + stime, in ns instead of clock ticks), or utime + stime where schedstat is missing.
fn threads_cpu_ns(pid: u32) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for e in dir.flatten() {
        let p = e.path();
        let comm = std::fs::read_to_string(p.join("comm"))
            .unwrap_or_default()
            .trim()
            .to_string();
        let ns = std::fs::read_to_string(p.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .or_else(|| {
                let tid: u32 = e.file_name().to_str()?.parse().ok()?;
                task_cpu_ticks(pid, tid).map(|d| d.as_nanos() as u64)
            });
        if let Some(ns) = ns {
            *out.entry(comm).or_default() += ns;
        }
    }
    out
}

/// utime + stime of one thread (clock-tick resolution), from its stat file.
fn task_cpu_ticks(pid: u32, tid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
    let f: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// Both agents' CPU per thread name at one moment.
type CpuSnap = [BTreeMap<String, u64>; 2];

fn cpu_snap(pids: [u32; 2]) -> CpuSnap {
    pids.map(threads_cpu_ns)
}

/// (whole agent, its proxy thread) CPU between two snapshots of one agent, µs. A thread that ended in between
/// loses its time (the agent's long-lived threads do not end).
fn cpu_between(a: &BTreeMap<String, u64>, b: &BTreeMap<String, u64>) -> (f64, f64) {
    let total = |m: &BTreeMap<String, u64>| m.values().sum::<u64>();
    let proxy = |m: &BTreeMap<String, u64>| m.get(PROXY_THREAD).copied().unwrap_or(0);
    (
        total(b).saturating_sub(total(a)) as f64 / 1000.0,
        proxy(b).saturating_sub(proxy(a)) as f64 / 1000.0,
    )
}

/// One measured run.
#[derive(Serialize)]
struct Run {
    repeat: u32,
    scenario: &'static str,
    kind: Kind,
    metrics: BTreeMap<&'static str, f64>,
    /// Wall time from the first client's start to the last one's exit, ms.
    wall_ms: f64,
    /// Requests, connections or MB (echoed back, drain included) the run carried: what CPU is divided by.
    units: f64,
    client_cpu_us: f64,
    /// Each agent's whole CPU over the run, µs: node-a, node-b.
    agent_cpu_us: [f64; 2],
    /// Each agent's `sinew-proxy` thread over the run, µs.
    proxy_thread_cpu_us: [f64; 2],
    /// Each agent's VmRSS right after the run, KiB.
    agent_rss_kib: [Option<u64>; 2],
    /// Connects made (failed or not) and connections that reached the server.
    connects: u64,
    reached: u64,
    counters: CounterDelta,
    problems: Vec<String>,
    raw: Vec<Value>,
}

measured!(Run);

/// What every run needs.
struct Ctx {
    testpod: PathBuf,
    log_dir: PathBuf,
    conns: u32,
    pids: [u32; 2],
    /// Network namespaces whose TIME_WAIT sockets are destroyed before every run.
    flush: Vec<String>,
}

impl Ctx {
    fn spawn(&self, label: &str, s: &Scenario, args: &[String]) -> Result<Proc> {
        spawn_client(
            &self.testpod,
            &s.cgroup,
            &s.netns,
            &self.log_dir,
            label,
            args,
        )
    }

    fn rss(&self) -> [Option<u64>; 2] {
        self.pids.map(|p| proc_status_kib(p, "VmRSS:"))
    }
}

/// Raises this process's soft `RLIMIT_NOFILE` (which the agents, servers and clients inherit) to `want` if lower.
#[allow(unsafe_code)]
fn raise_nofile(want: u64) -> Result<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        bail!("getrlimit: {}", std::io::Error::last_os_error());
    }
    if r.rlim_cur >= want {
        return Ok(r.rlim_cur);
    }
    let new = libc::rlimit {
        rlim_cur: want,
        rlim_max: r.rlim_max.max(want),
    };
    // SAFETY: setrlimit reads only the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } != 0 {
        bail!(
            "setrlimit(RLIMIT_NOFILE, {want}): {} (the 1,000-connection probe needs it)",
            std::io::Error::last_os_error()
        );
    }
    Ok(want)
}

/// The mesh group: builds its topology, checks the paths, measures, prints the tables, returns the JSON.
pub(super) fn run(a: &BenchArgs, testpod: &Path) -> Result<Value> {
    let nofile = raise_nofile(NOFILE_WANTED)?;
    let load_start = loadavg();
    let service = Service::new("bench", VIP)
        .port(ServicePort::tcp("tcp", VIP_PORT.into(), SERVER_PORT.into()))
        .selector("app", "bench");
    let nodes = [
        (
            NODE_A,
            vec![
                MeshPod::plain("client")
                    .namespace(CLIENT_NS)
                    .sa(CLIENT_SA)
                    .label("app", "client"),
                MeshPod::enrolled("mclient")
                    .namespace(CLIENT_NS)
                    .sa(MCLIENT_SA)
                    .label("app", "mclient"),
            ],
        ),
        (
            NODE_B,
            vec![
                MeshPod::enrolled("server")
                    .sa(SERVER_SA)
                    .label("app", "bench")
                    .serve(&[SERVER_PORT]),
            ],
        ),
    ];
    let mut f = MeshFixture::setup(
        "bench-mesh",
        testpod,
        &nodes,
        &MeshOptions {
            services: vec![service],
            ..Default::default()
        },
    )
    .context("building the two-node mesh topology")?;
    let client = f.pod("client");
    let mclient = f.pod("mclient");
    let server = f.pod("server");
    // New connection per request piles up TIME_WAIT sockets: on the clients, and on node-b, whose proxy closes its
    // side to the server first. Same setting for every scenario.
    let mut flush = Vec::new();
    for p in [&client, &mclient, &server] {
        flush.push(p.netns_name().to_string());
    }
    for n in [NODE_A, NODE_B] {
        flush.push(f.topo.node(n).netns().name().to_string());
    }
    for ns in &flush {
        tcp_tw_reuse(ns)?;
    }
    let pids = match (f.agent(NODE_A).pid(), f.agent(NODE_B).pid()) {
        (Some(x), Some(y)) => [x, y],
        _ => bail!("an agent is not running"),
    };
    let ctx = Ctx {
        testpod: testpod.to_path_buf(),
        log_dir: f.topo.work_dir().join("bench-clients"),
        conns: a.conns,
        pids,
        flush,
    };
    let vip = format!("{VIP}:{VIP_PORT}");
    let scenarios = [
        Scenario {
            name: DIRECT,
            description: "node-a pod netns, outside the node's cgroup root (no Sinew program) -> server pod IP:8080 on node-b",
            netns: client.netns_path(),
            netns_name: client.netns_name().to_string(),
            cgroup: client.unmanaged_cgroup_dir().to_path_buf(),
            target: format!("{}:{SERVER_PORT}", server.ip4),
            mtls: false,
        },
        Scenario {
            name: KERNEL,
            description: "unenrolled pod on node-a -> Service VIP:80, balanced by connect4 to the server on node-b (kernel only)",
            netns: client.netns_path(),
            netns_name: client.netns_name().to_string(),
            cgroup: client.cgroup_dir().to_path_buf(),
            target: vip.clone(),
            mtls: false,
        },
        Scenario {
            name: MTLS,
            description: "enrolled pod on node-a -> the same VIP: redirected to node-a's proxy, HBONE/mTLS to node-b's proxy, which connects to the enrolled server",
            netns: mclient.netns_path(),
            netns_name: mclient.netns_name().to_string(),
            cgroup: mclient.cgroup_dir().to_path_buf(),
            target: vip.clone(),
            mtls: true,
        },
    ];
    let sanity = sanity_checks(&ctx, &f, &scenarios)?;
    // The memory probe twice: with fresh agents (only the checks above went through them), and after all the runs
    // (what a proxy that has carried traffic holds: the allocator keeps pages the runs' buffers used).
    let open_fresh = open_connections(&ctx, &f, &scenarios[2])?;

    let kinds: Vec<Kind> = [Kind::Rr, Kind::RrN, Kind::Crr, Kind::Bulk]
        .into_iter()
        .filter(|k| *k != Kind::RrN || a.conns > 0)
        .collect();
    let order_text = format!(
        "per repeat, each kind runs the scenarios in the order of a Williams design over ({DIRECT}, {KERNEL}, {MTLS}): 012, 120, 201, 210, 021, 102 (repeat r uses r mod 6)"
    );
    println!(
        "mesh bench: {} repeats x {} ms, {SIZE} B request/response, {} parallel conns, bulk {} KiB writes; {order_text}",
        a.repeats,
        a.duration_ms,
        a.conns,
        BULK_CHUNK / 1024
    );
    let rss_start = ctx.rss();
    let counters_start = counters(&f)?;
    let mut runs: Vec<Run> = Vec::new();
    // Warm-up: one unrecorded short run of every kind and scenario (ARP, the tunnel pool, page cache).
    for s in scenarios.iter().rev() {
        for k in &kinds {
            ensure_server(&mut f)?;
            let r = measure(&ctx, &f, s, *k, WARMUP_MS, 0)?;
            if !r.problems.is_empty() {
                eprintln!(
                    "  warm-up {} {}: {}",
                    s.name,
                    k.name(),
                    r.problems.join("; ")
                );
            }
        }
    }
    for rep in 0..a.repeats {
        let order: Vec<&Scenario> = ORDERS3[rep as usize % 6]
            .iter()
            .map(|&i| &scenarios[i])
            .collect();
        for k in &kinds {
            for s in order.iter().copied() {
                ensure_server(&mut f)?;
                let r = measure(&ctx, &f, s, *k, a.duration_ms, rep)?;
                eprintln!(
                    "  repeat {} {:<12} {:<4} {} agents={:.0}+{:.0}us proxy-threads={:.0}+{:.0}us{}",
                    rep + 1,
                    s.name,
                    k.name(),
                    r.metrics
                        .iter()
                        .filter(|(k, _)| !k.ends_with("_agents_us"))
                        .map(|(k, v)| format!("{k}={v:.1}"))
                        .collect::<Vec<_>>()
                        .join(" "),
                    r.agent_cpu_us[0],
                    r.agent_cpu_us[1],
                    r.proxy_thread_cpu_us[0],
                    r.proxy_thread_cpu_us[1],
                    if r.problems.is_empty() {
                        String::new()
                    } else {
                        format!("  PROBLEMS: {}", r.problems.join("; "))
                    }
                );
                runs.push(r);
            }
        }
    }
    let counters_runs = counters(&f)?;
    ensure_server(&mut f)?;
    let open = open_connections(&ctx, &f, &scenarios[2])?;
    let counters_end = counters(&f)?;
    let load_end = loadavg();

    // Medians, spreads, comparisons.
    let names = [DIRECT, KERNEL, MTLS];
    let all: Vec<&Metric> = LATENCY.iter().chain(RATES).collect();
    let (medians, spreads) = medians_and_spreads(&names, &all, &runs);
    let comparisons = [
        ("mtls/direct", DIRECT, MTLS),
        ("mtls/kernel", KERNEL, MTLS),
        ("kernel/direct", DIRECT, KERNEL),
    ]
    .map(|(label, x, y)| compare(label, x, y, &all, &medians, &runs, a.repeats));
    let proxy = proxy_cost(&runs, &kinds, a.repeats);
    let baseline = idle_baseline(&runs);
    let targets = targets(
        &medians,
        &runs,
        &proxy,
        &[&open_fresh, &open],
        a.repeats,
        a.conns,
    );

    let mut table = String::new();
    table.push_str(&render(&names, LATENCY, &medians, &comparisons, &spreads));
    table.push('\n');
    table.push_str(&render(&names, RATES, &medians, &comparisons, &spreads));
    table.push_str(&format!(
        "\nrr: 1 connection, {SIZE} B request -> {SIZE} B response, latency in µs; rrN: {} connections at once (one \
         process each; p50/p90/p99 are the medians over the connections of each one's percentile), total req/s;\n\
         crr: new connection per request (connect, name line, 1 KiB each way, close); bulk: one connection writing \
         {} KiB chunks to the echo server for the run, MB/s (10^6 B) echoed back (each direction carried that rate);\n\
         CPU: client utime+stime per request / connection / MB, µs; agents: both agents' CPU (node-a + node-b, all \
         threads) per request / connection / MB, µs;\n\
         x/y ratio: median of x / median of y; paired: median over the repeats of x / y within the repeat; spread: \
         (max - min) / median over the repeats.\n",
        a.conns,
        BULK_CHUNK / 1024
    ));
    table.push_str(&render_proxy(&proxy, &baseline, &runs));
    table.push_str(&render_open("fresh agents", &open_fresh));
    table.push_str(&render_open("after the runs", &open));
    table.push_str(&render_targets(&targets));
    println!("\n{table}");

    let checks = path_checks(&runs, &counters_start, &counters_runs, &counters_end);
    for c in &checks {
        println!("{c}");
    }
    println!(
        "load average at start: {load_start}; at end: {load_end} (2 shared vCPUs: compare ratios, not absolutes)"
    );

    let report = json!({
        "settings": {
            "repeats": a.repeats, "duration_ms": a.duration_ms, "conns": a.conns, "size": SIZE,
            "bulk_chunk": BULK_CHUNK, "warmup_ms": WARMUP_MS, "io_timeout_ms": IO_TIMEOUT_MS, "order": order_text,
            "open_connections": OPEN_CONNS, "open_processes": OPEN_PROCS, "nofile": nofile,
            "rust_log": std::env::var("RUST_LOG").unwrap_or_else(|_| "info (the harness's default)".into()),
        },
        "machine": {
            "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
            "loadavg_start": load_start, "loadavg_end": load_end,
        },
        "topology": {
            "nodes": {NODE_A: f.node_ip(NODE_A).to_string(), NODE_B: f.node_ip(NODE_B).to_string()},
            "client": {"ip": client.ip4.to_string(), "identity": format!("{CLIENT_NS}/{CLIENT_SA}"), "enrolled": false},
            "mclient": {"ip": mclient.ip4.to_string(), "identity": format!("{CLIENT_NS}/{MCLIENT_SA}"), "enrolled": true},
            "server": {"ip": server.ip4.to_string(), "identity": format!("default/{SERVER_SA}"), "enrolled": true},
            "vip": vip,
        },
        "scenarios": scenarios.iter().map(|s| json!({
            "name": s.name, "description": s.description, "target": s.target, "cgroup": s.cgroup,
            "netns": s.netns_name, "mtls": s.mtls,
        })).collect::<Vec<_>>(),
        "metrics": all.iter().map(|m| json!({
            "key": m.key, "column": m.column,
            "better": if m.better == Better::Lower { "lower" } else { "higher" },
        })).collect::<Vec<_>>(),
        "sanity": sanity,
        "runs": runs,
        "medians": medians,
        "spreads": spreads,
        "comparisons": comparisons.iter().map(|c| json!({
            "label": c.label, "a": c.a, "b": c.b, "ratios": c.ratios, "paired": c.paired,
        })).collect::<Vec<_>>(),
        "proxy": proxy,
        "agents_idle_baseline": baseline,
        "agent_rss_kib": {"start": rss_start, "after_runs": ctx.rss()},
        "open_connections": {"fresh": open_fresh, "after_runs": open},
        "targets": targets,
        "counters": {"start": counters_start, "after_runs": counters_runs, "end": counters_end},
        "checks": checks,
        "table": table,
    });
    drop(ctx);
    // Agents (SIGTERM), servers, then the topology: uninstall, cgroups, namespaces.
    drop(f);
    Ok(report)
}

/// `sinew-testpod serve` ends after 10 minutes; a long bench restarts it between runs.
fn ensure_server(f: &mut MeshFixture) -> Result<()> {
    if f.servers.iter_mut().all(Proc::is_running) {
        return Ok(());
    }
    eprintln!("  server exited; restarting it");
    let p = f.pod("server").serve_ports(&[SERVER_PORT], "server")?;
    f.servers = vec![p];
    Ok(())
}

fn flush_time_wait(ctx: &Ctx) {
    static WARNED: std::sync::Once = std::sync::Once::new();
    for ns in &ctx.flush {
        flush_time_wait_in(ns, &WARNED);
    }
}

/// Waits until the agents `pids` used at most one clock tick of CPU each in a 250 ms window (bounded by
/// [`IDLE_TIMEOUT`]); the same-node group uses it too.
pub(super) fn wait_agents_idle(pids: &[u32]) -> Result<()> {
    let t0 = Instant::now();
    let cpu = || pids.iter().map(|p| proc_cpu(*p)).collect::<Vec<_>>();
    let mut last = cpu();
    while t0.elapsed() < IDLE_TIMEOUT {
        sleep_interruptible(Duration::from_millis(250))?;
        let now = cpu();
        let idle = last.iter().zip(&now).all(|(a, b)| match (a, b) {
            (Some(a), Some(b)) => b.saturating_sub(*a) <= Duration::from_millis(10),
            _ => true,
        });
        if idle {
            return Ok(());
        }
        last = now;
    }
    eprintln!("  note: the agents were still busy after {IDLE_TIMEOUT:?}; measuring anyway");
    Ok(())
}

/// `sinew-testpod tcp-connect` (`count` sequential connections, each reading the name line) from `s`.
fn connect_probe(ctx: &Ctx, s: &Scenario, to: &str, count: u32) -> Result<ConnectReport> {
    let args: Vec<String> = [
        "tcp-connect",
        "--to",
        to,
        "--count",
        &count.to_string(),
        "--timeout-ms",
        "1000",
    ]
    .map(String::from)
    .to_vec();
    let (_, v) = wait_json(
        ctx.spawn(&format!("probe-{}", s.name), s, &args)?,
        Duration::from_secs(10 + u64::from(count)),
    )?;
    Ok(serde_json::from_value(v)?)
}

/// Before measuring: the direct client reaches the server and bypasses Sinew (a VIP connect from its cgroup is not
/// balanced); the unenrolled client reaches the server through the VIP without the proxy; the enrolled client's
/// connections go through both proxies (redirected on node-a, arriving as mTLS on node-b). Fails loudly otherwise.
fn sanity_checks(ctx: &Ctx, f: &MeshFixture, sc: &[Scenario; 3]) -> Result<Value> {
    let [direct, kernel, mtls] = sc;
    let r = connect_probe(ctx, direct, &direct.target, 1)?;
    if r.ok != 1 {
        bail!(
            "{DIRECT}: cannot reach the server across the nodes: {:?}",
            r.errors
        );
    }
    let r = connect_probe(ctx, direct, &kernel.target, 1)?;
    if r.ok != 0 {
        bail!(
            "{DIRECT}: the client's cgroup reached the VIP ({:?}): Sinew runs for it, so it is no baseline",
            r.names
        );
    }
    println!(
        "check: {DIRECT}: {} reached; the VIP is not balanced from its cgroup ({:?})",
        direct.target, r.errors
    );
    let c0 = counters(f)?;
    let r = connect_probe(ctx, kernel, &kernel.target, 5)?;
    let c1 = counters(f)?;
    let d = delta(&c0, &c1);
    if r.ok != 5 {
        bail!(
            "{KERNEL}: the unenrolled client cannot reach the server through the VIP: {:?}\n{}",
            r.errors,
            f.logs(30)
        );
    }
    if d.redirected.unwrap_or(0.0) != 0.0 || d.dst_mtls != 0.0 || d.src_mtls != 0.0 {
        bail!(
            "{KERNEL}: the unenrolled client's connections went through the proxy (redirected +{:?}, mTLS +{} at node-b): it is no kernel-only baseline",
            d.redirected,
            d.dst_mtls
        );
    }
    println!(
        "check: {KERNEL}: 5 connects -> {:?}, getpeername {:?}; none redirected, none arrived as mTLS",
        r.names, r.peers
    );
    // The first connects may wait for the agents to learn the pods and for the SVIDs.
    let first =
        sinew_tests::eventually(Duration::from_secs(20), Duration::from_millis(200), || {
            let r = connect_probe(ctx, mtls, &mtls.target, 1).map_err(|e| format!("{e:#}"))?;
            if r.ok == 1 {
                Ok(r)
            } else {
                Err(format!("{:?}", r.errors))
            }
        });
    if let Err(e) = first {
        bail!(
            "{MTLS}: the enrolled client cannot reach the server through the VIP: {e}\n{}",
            f.logs(40)
        );
    }
    let c0 = counters(f)?;
    let r = connect_probe(ctx, mtls, &mtls.target, 5)?;
    // node-b counts a connection once connected to the server; give the scrape a moment to see the last one.
    let got = sinew_tests::eventually(Duration::from_secs(3), Duration::from_millis(50), || {
        let c1 = counters(f).map_err(|e| format!("{e:#}"))?;
        let d = delta(&c0, &c1);
        if d.dst_mtls >= 5.0 && d.redirected.is_none_or(|x| x >= 5.0) {
            Ok(d)
        } else {
            Err(format!(
                "redirected +{:?}, mTLS at node-b +{}",
                d.redirected, d.dst_mtls
            ))
        }
    });
    let d = match got {
        Ok(d) if r.ok == 5 => d,
        Ok(_) | Err(_) => bail!(
            "{MTLS}: the enrolled client's connections did not go through both proxies: {} of 5 reached {:?}; {}; agent logs:\n{}",
            r.ok,
            r.names,
            got.err()
                .unwrap_or_else(|| format!("errors {:?}", r.errors)),
            f.logs(40)
        ),
    };
    let via = match d.redirected {
        Some(x) => format!("{REDIRECTED} +{x} on {NODE_A}"),
        None => {
            if d.src_mtls < 5.0 {
                bail!(
                    "{MTLS}: node-a exports no {REDIRECTED}, and its outbound side counted {} mTLS connections for 5 connects",
                    d.src_mtls
                );
            }
            format!(
                "node-a exports no {REDIRECTED}; its outbound side counted +{} mTLS connections",
                d.src_mtls
            )
        }
    };
    println!(
        "check: {MTLS}: 5 connects -> {:?}, getpeername {:?}; {via}; +{} mutual_tls connections opened at {NODE_B}; tunnel handshakes +{}",
        r.names, r.peers, d.dst_mtls, d.handshakes
    );
    Ok(json!({
        "direct_reached": true,
        "kernel": {"names": r.names, "redirected": 0, "mtls": 0},
        "mtls": {"names": r.names, "peers": r.peers, "counters": d},
    }))
}

/// One run of `kind` for scenario `s` lasting `duration_ms`.
fn measure(
    ctx: &Ctx,
    f: &MeshFixture,
    s: &Scenario,
    kind: Kind,
    duration_ms: u64,
    repeat: u32,
) -> Result<Run> {
    check_interrupt()?;
    let args: Vec<String> = match kind {
        Kind::Rr | Kind::RrN => load_args("rr", "--max-requests", &s.target, duration_ms),
        Kind::Crr => load_args("crr", "--max", &s.target, duration_ms),
        Kind::Bulk => [
            "bulk",
            "--to",
            &s.target,
            "--chunk",
            &BULK_CHUNK.to_string(),
            "--duration-ms",
            &duration_ms.to_string(),
            "--timeout-ms",
            &IO_TIMEOUT_MS.to_string(),
        ]
        .map(String::from)
        .to_vec(),
    };
    let n = if kind == Kind::RrN {
        ctx.conns.max(1)
    } else {
        1
    };
    let bound = Duration::from_millis(duration_ms + 3 * IO_TIMEOUT_MS) + Duration::from_secs(10);
    flush_time_wait(ctx);
    wait_agents_idle(&ctx.pids)?;
    let c0 = counters(f)?;
    let cpu0 = cpu_snap(ctx.pids);
    let ch0 = children_cpu();
    let t0 = Instant::now();
    let procs = (0..n)
        .map(|i| {
            ctx.spawn(
                &format!("{}-{}-{repeat}-{i}", s.name, kind.name()),
                s,
                &args,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let outs = wait_all(procs, bound)?;
    let wall_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let client_cpu_us = (children_cpu() - ch0).as_secs_f64() * 1e6;
    let cpu1 = cpu_snap(ctx.pids);
    let agent_rss_kib = ctx.rss();
    let (a_cpu, a_proxy) = cpu_between(&cpu0[0], &cpu1[0]);
    let (b_cpu, b_proxy) = cpu_between(&cpu0[1], &cpu1[1]);
    let c1 = counters(f)?;
    let counters = delta(&c0, &c1);

    let mut metrics = BTreeMap::new();
    let mut problems = Vec::new();
    let (units, connects, reached) = match kind {
        Kind::Rr | Kind::RrN => {
            let mut reqs = 0u64;
            let mut rps = 0.0;
            let mut reached = 0;
            let mut pcts: [Vec<f64>; 3] = Default::default();
            for o in &outs {
                let r: RrReport = serde_json::from_value(o.clone())?;
                if let Some(e) = &r.error {
                    problems.push(e.clone());
                }
                if !r.name.is_empty() {
                    reached += 1;
                }
                if r.requests > 0 {
                    reqs += r.requests;
                    rps += r.requests as f64 * 1000.0 / r.duration_ms;
                    for (v, p) in pcts.iter_mut().zip([r.p50_us, r.p90_us, r.p99_us]) {
                        v.push(p);
                    }
                }
            }
            if reqs > 0 {
                let keys = if kind == Kind::Rr {
                    ["rr_p50_us", "rr_p90_us", "rr_p99_us", "rr_rps", "rr_cpu_us"]
                } else {
                    [
                        "rrN_p50_us",
                        "rrN_p90_us",
                        "rrN_p99_us",
                        "rrN_rps",
                        "rrN_cpu_us",
                    ]
                };
                for (k, v) in keys.iter().zip(&pcts) {
                    if let Some(m) = median(v) {
                        metrics.insert(*k, m);
                    }
                }
                metrics.insert(keys[3], rps);
                metrics.insert(keys[4], client_cpu_us / reqs as f64);
            }
            (reqs as f64, outs.len() as u64, reached)
        }
        Kind::Crr => {
            let r = crr_metrics(&outs[0], client_cpu_us, &mut metrics, &mut problems)?;
            (
                r.connections as f64,
                r.connections + r.failed,
                r.connections,
            )
        }
        Kind::Bulk => {
            let v = &outs[0];
            if let Some(e) = v["error"].as_str() {
                problems.push(e.to_string());
            }
            let mb = v["total_received_bytes"].as_f64().unwrap_or(0.0) / 1e6;
            if let Some(rate) = v["mb_per_s"].as_f64().filter(|r| *r > 0.0) {
                metrics.insert("bulk_mbps", rate);
                metrics.insert("bulk_cpu_us", client_cpu_us / mb);
            }
            let reached = u64::from(v["name"].as_str().is_some_and(|n| !n.is_empty()));
            (mb, 1, reached)
        }
    };
    if units > 0.0 {
        metrics.insert(kind.agents_key(), (a_cpu + b_cpu) / units);
    }
    // Which path did every connection take?
    let redirected = counters.redirected.unwrap_or(counters.src_mtls);
    if s.mtls {
        if redirected != connects as f64 {
            problems.push(format!(
                "MISMATCH: {connects} connects, node-a redirected {redirected}"
            ));
        }
        if counters.dst_mtls < reached as f64 || counters.dst_mtls > connects as f64 {
            problems.push(format!(
                "MISMATCH: {reached} connections reached the server, node-b opened {} mTLS connections",
                counters.dst_mtls
            ));
        }
    } else if redirected != 0.0 || counters.dst_mtls != 0.0 {
        problems.push(format!(
            "MISMATCH: a {} run went through the proxy: redirected {redirected}, mTLS at node-b {}",
            s.name, counters.dst_mtls
        ));
    }
    Ok(Run {
        repeat,
        scenario: s.name,
        kind,
        metrics,
        wall_ms,
        units,
        client_cpu_us,
        agent_cpu_us: [a_cpu, b_cpu],
        proxy_thread_cpu_us: [a_proxy, b_proxy],
        agent_rss_kib,
        connects,
        reached,
        counters,
        problems,
        raw: outs,
    })
}

/// The run of `kind` of scenario `s` in repeat `rep`.
fn run_of<'a>(runs: &'a [Run], rep: u32, s: &str, kind: Kind) -> Option<&'a Run> {
    runs.iter()
        .find(|r| r.repeat == rep && r.scenario == s && r.kind == kind)
}

/// The proxy's cost per kind: both agents' CPU in the mTLS run minus both agents' CPU in the kernel-only run of the
/// same repeat (same length), per request / connection / MB of the mTLS run; and the `sinew-proxy` threads' own CPU
/// per unit. Medians over the repeats, with the samples.
fn proxy_cost(runs: &[Run], kinds: &[Kind], repeats: u32) -> Value {
    let mut out = serde_json::Map::new();
    for k in kinds {
        let mut sub = Vec::new();
        let mut thread = Vec::new();
        let mut per_node = [Vec::new(), Vec::new()];
        for rep in 0..repeats {
            let (Some(m), Some(kr)) = (run_of(runs, rep, MTLS, *k), run_of(runs, rep, KERNEL, *k))
            else {
                continue;
            };
            if m.units <= 0.0 {
                continue;
            }
            let extra = |i: usize| m.agent_cpu_us[i] - kr.agent_cpu_us[i];
            sub.push((extra(0) + extra(1)) / m.units);
            for (i, v) in per_node.iter_mut().enumerate() {
                v.push(extra(i) / m.units);
            }
            thread.push((m.proxy_thread_cpu_us[0] + m.proxy_thread_cpu_us[1]) / m.units);
        }
        let rss = |i: usize| {
            median(
                &runs
                    .iter()
                    .filter(|r| r.scenario == MTLS && r.kind == *k)
                    .filter_map(|r| r.agent_rss_kib[i].map(|x| x as f64))
                    .collect::<Vec<_>>(),
            )
        };
        out.insert(
            k.name().to_string(),
            json!({
                "unit": k.unit(),
                "cpu_us_per_unit": median(&sub),
                "cpu_us_per_unit_node_a": median(&per_node[0]),
                "cpu_us_per_unit_node_b": median(&per_node[1]),
                "proxy_threads_cpu_us_per_unit": median(&thread),
                "samples": sub,
                "proxy_threads_samples": thread,
                "agent_rss_kib_after_mtls_runs": {NODE_A: rss(0), NODE_B: rss(1)},
            }),
        );
    }
    Value::Object(out)
}

/// Both agents' CPU per second of run while no connection went through the proxy (the direct and kernel-only runs),
/// ms/s: what the agents cost at rest (source polling, the idle-wait, metrics scrapes between runs are outside).
fn idle_baseline(runs: &[Run]) -> Value {
    let per = |s: &str, i: usize| {
        let (cpu, ms) = runs
            .iter()
            .filter(|r| r.scenario == s)
            .fold((0.0, 0.0), |(c, t), r| {
                (c + r.agent_cpu_us[i], t + r.wall_ms)
            });
        (ms > 0.0).then(|| cpu / ms)
    };
    json!({
        DIRECT: {NODE_A: per(DIRECT, 0), NODE_B: per(DIRECT, 1)},
        KERNEL: {NODE_A: per(KERNEL, 0), NODE_B: per(KERNEL, 1)},
        MTLS: {NODE_A: per(MTLS, 0), NODE_B: per(MTLS, 1)},
        "unit": "ms of agent CPU per second of run",
    })
}

/// Holds [`OPEN_CONNS`] idle connections through the mTLS path (in [`OPEN_PROCS`] client processes) and reads both
/// agents' VmRSS while they are open; then closes them.
fn open_connections(ctx: &Ctx, f: &MeshFixture, s: &Scenario) -> Result<Value> {
    wait_agents_idle(&ctx.pids)?;
    flush_time_wait(ctx);
    let rss0 = ctx.rss();
    let c0 = counters(f)?;
    let stop = ctx.log_dir.join("open-connections.stop");
    let _ = std::fs::remove_file(&stop);
    let per = OPEN_CONNS / OPEN_PROCS;
    let args: Vec<String> = [
        "bulk",
        "--to",
        &s.target,
        "--open",
        &per.to_string(),
        "--hold-ms",
        &OPEN_TIMEOUT.as_millis().to_string(),
        "--stop-file",
        &stop.display().to_string(),
        "--timeout-ms",
        "5000",
    ]
    .map(String::from)
    .to_vec();
    let t0 = Instant::now();
    let mut procs = (0..OPEN_PROCS)
        .map(|i| ctx.spawn(&format!("open-{i}"), s, &args))
        .collect::<Result<Vec<_>>>()?;
    let mut opened = 0u64;
    let mut failed = 0u64;
    for p in &mut procs {
        let left = OPEN_TIMEOUT.saturating_sub(t0.elapsed());
        let line = p.wait_for_line(left, |l| l.contains("\"event\":\"open\""))?;
        check_interrupt()?;
        let v: Value = serde_json::from_str(&line)?;
        opened += v["opened"].as_u64().unwrap_or(0);
        failed += v["failed"].as_u64().unwrap_or(0);
    }
    let open_ms = t0.elapsed().as_secs_f64() * 1000.0;
    // Let the agents settle, then measure while all are open and idle: memory, and CPU over one idle second.
    sleep_interruptible(Duration::from_millis(1000))?;
    let cpu0 = cpu_snap(ctx.pids);
    sleep_interruptible(Duration::from_millis(1000))?;
    let cpu1 = cpu_snap(ctx.pids);
    let rss1 = ctx.rss();
    let hwm1 = ctx.pids.map(|p| proc_status_kib(p, "VmHWM:"));
    let c1 = counters(f)?;
    std::fs::write(&stop, b"stop").with_context(|| format!("write {}", stop.display()))?;
    let mut alive = 0u64;
    let mut reports = Vec::new();
    for p in procs {
        let (_, v) = wait_json(p, Duration::from_secs(60))?;
        alive += v["alive"].as_u64().unwrap_or(0);
        reports.push(v);
    }
    // The proxies close their side once the clients are gone.
    let closed =
        sinew_tests::eventually(Duration::from_secs(10), Duration::from_millis(100), || {
            let c = counters(f).map_err(|e| format!("{e:#}"))?;
            if c.active_a <= c0.active_a && c.active_b <= c0.active_b {
                Ok(())
            } else {
                Err(format!("active {} / {}", c.active_a, c.active_b))
            }
        });
    if let Err(e) = &closed {
        eprintln!("  note: the proxies still hold connections after the clients closed: {e}");
    }
    let rss2 = ctx.rss();
    let idle_cpu: Vec<f64> = (0..2)
        .map(|i| cpu_between(&cpu0[i], &cpu1[i]).0 / 1000.0)
        .collect();
    let d = delta(&c0, &c1);
    Ok(json!({
        "requested": OPEN_CONNS, "processes": OPEN_PROCS, "opened": opened, "failed": failed,
        "alive_after_hold": alive, "open_ms": open_ms,
        "active_connections": {NODE_A: c1.active_a - c0.active_a, NODE_B: c1.active_b - c0.active_b},
        "redirected": d.redirected, "mtls_opened_node_b": d.dst_mtls, "tunnel_handshakes": d.handshakes,
        "agent_rss_kib": {
            "before": {NODE_A: rss0[0], NODE_B: rss0[1]},
            "open": {NODE_A: rss1[0], NODE_B: rss1[1]},
            "after_close": {NODE_A: rss2[0], NODE_B: rss2[1]},
            "peak_so_far": {NODE_A: hwm1[0], NODE_B: hwm1[1]},
        },
        "agent_cpu_ms_per_s_while_open_idle": {NODE_A: idle_cpu[0], NODE_B: idle_cpu[1]},
        "clients": reports,
    }))
}

/// The targets, each with its numbers and met / not met.
fn targets(
    medians: &BTreeMap<&str, BTreeMap<&str, f64>>,
    runs: &[Run],
    proxy: &Value,
    opens: &[&Value],
    repeats: u32,
    conns: u32,
) -> Value {
    let med = |s: &str, k: &str| medians.get(s).and_then(|m| m.get(k)).copied();
    let paired_diff = |a: &str, b: &str, k: &str| {
        median(
            &(0..repeats)
                .filter_map(|rep| Some(value(runs, rep, b, k)? - value(runs, rep, a, k)?))
                .collect::<Vec<_>>(),
        )
    };
    let added = |base: &str| {
        let v = match (med(MTLS, "rr_p50_us"), med(base, "rr_p50_us")) {
            (Some(x), Some(y)) => Some(x - y),
            _ => None,
        };
        json!({
            "what": format!("added p50 latency, 1 connection: {MTLS} - {base}, µs (difference of the medians; paired: median of the per-repeat differences)"),
            "value": v, "paired": paired_diff(base, MTLS, "rr_p50_us"), "limit": TARGET_ADDED_P50_US,
            "met": v.map(|v| v <= TARGET_ADDED_P50_US),
            "mtls_p50_us": med(MTLS, "rr_p50_us"), "base_p50_us": med(base, "rr_p50_us"),
        })
    };
    let cpu = |k: &str| proxy[k]["cpu_us_per_unit"].as_f64();
    let rate = match (med(MTLS, "crr_cps"), med(DIRECT, "crr_cps")) {
        (Some(x), Some(y)) if y > 0.0 => Some(x / y),
        _ => None,
    };
    let paired_rate = median(
        &(0..repeats)
            .filter_map(|rep| {
                let d = value(runs, rep, DIRECT, "crr_cps")?;
                (d > 0.0).then_some(value(runs, rep, MTLS, "crr_cps")? / d)
            })
            .collect::<Vec<_>>(),
    );
    let rss_mib = opens
        .iter()
        .flat_map(|o| [NODE_A, NODE_B].map(|n| o["agent_rss_kib"]["open"][n].as_f64()))
        .flatten()
        .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))))
        .map(|k| k / 1024.0);
    let opened: Vec<&Value> = opens.iter().map(|o| &o["opened"]).collect();
    json!([
        added(DIRECT),
        added(KERNEL),
        {
            "what": format!("proxy CPU per request at {conns} connections (rrN; the target is stated at 16): both agents' CPU in the mTLS run minus in the kernel-only run of the same repeat, per request, µs"),
            "conns": conns,
            "value": cpu("rrN"), "limit": TARGET_PROXY_CPU_US, "met": cpu("rrN").map(|v| v <= TARGET_PROXY_CPU_US),
            "at_1_connection": cpu("rr"), "proxy_threads_only": proxy["rrN"]["proxy_threads_cpu_us_per_unit"],
        },
        {
            "what": format!("new-connection rate (crr): {MTLS} / {DIRECT} (ratio of the medians; paired: median of per-repeat ratios)"),
            "value": rate, "paired": paired_rate, "limit": TARGET_CONN_RATE,
            "met": rate.map(|v| v >= TARGET_CONN_RATE),
        },
        {
            "what": format!("proxy RSS at {OPEN_CONNS} open connections: the largest agent VmRSS (node-a, node-b; fresh agents and after the runs) while they are open, MiB"),
            "value": rss_mib, "limit": TARGET_RSS_MIB, "met": rss_mib.map(|v| v <= TARGET_RSS_MIB),
            "opened": opened,
        },
    ])
}

/// The table of `cols`: scenario rows, then per comparison the ratio and paired rows, then the spreads.
fn render(
    names: &[&str],
    cols: &[Metric],
    medians: &BTreeMap<&str, BTreeMap<&str, f64>>,
    comparisons: &[Comparison],
    spreads: &BTreeMap<&str, BTreeMap<&str, f64>>,
) -> String {
    let cols: Vec<&Metric> = cols.iter().collect();
    // The agents' CPU per unit is near zero without the proxy: a ratio to it says nothing (the proxy's own cost is in
    // the proxy block below the tables).
    let r = |map: &BTreeMap<&str, f64>, m: &Metric| {
        if m.key.ends_with("_agents_us") {
            "-".into()
        } else {
            ratio_cell(map, m)
        }
    };
    let mut rows: Vec<Row> = Vec::new();
    for c in comparisons {
        rows.push((
            format!("{} ratio", c.label),
            Box::new(move |m| r(&c.ratios, m)),
        ));
        rows.push((
            format!("{} paired", c.label),
            Box::new(move |m| r(&c.paired, m)),
        ));
    }
    render_grid(names, &cols, medians, spreads, &rows, 0)
}

fn opt(v: &Value, digits: usize) -> String {
    v.as_f64().map_or("-".into(), |x| format!("{x:.digits$}"))
}

fn render_proxy(proxy: &Value, baseline: &Value, runs: &[Run]) -> String {
    let mut out = format!(
        "\nproxy cost ({MTLS}): both agents' CPU in the mTLS run minus in the {KERNEL} run of the same repeat, per unit \
         of the mTLS run (median over the repeats) [node-a + node-b]; the sinew-proxy threads' own CPU per unit:\n"
    );
    for k in [Kind::Rr, Kind::RrN, Kind::Crr, Kind::Bulk] {
        let p = &proxy[k.name()];
        if p.is_null() {
            continue;
        }
        out.push_str(&format!(
            "  {:<5} {:>8} µs per {:<10} [{} + {}]; proxy threads {} µs; agents' RSS after the mTLS runs {} / {} KiB\n",
            k.name(),
            opt(&p["cpu_us_per_unit"], 1),
            k.unit(),
            opt(&p["cpu_us_per_unit_node_a"], 1),
            opt(&p["cpu_us_per_unit_node_b"], 1),
            opt(&p["proxy_threads_cpu_us_per_unit"], 1),
            opt(&p["agent_rss_kib_after_mtls_runs"][NODE_A], 0),
            opt(&p["agent_rss_kib_after_mtls_runs"][NODE_B], 0),
        ));
    }
    out.push_str(&format!(
        "agents at rest (CPU per second of run, node-a / node-b): during {DIRECT} {} / {} ms/s, during {KERNEL} {} / {} ms/s; during {MTLS} {} / {} ms/s\n",
        opt(&baseline[DIRECT][NODE_A], 2),
        opt(&baseline[DIRECT][NODE_B], 2),
        opt(&baseline[KERNEL][NODE_A], 2),
        opt(&baseline[KERNEL][NODE_B], 2),
        opt(&baseline[MTLS][NODE_A], 1),
        opt(&baseline[MTLS][NODE_B], 1),
    ));
    let problems: Vec<String> = runs
        .iter()
        .filter(|r| !r.problems.is_empty())
        .map(|r| {
            format!(
                "  repeat {} {} {}: {}",
                r.repeat + 1,
                r.scenario,
                r.kind.name(),
                r.problems.join("; ")
            )
        })
        .collect();
    if !problems.is_empty() {
        out.push_str(&format!(
            "runs with problems ({}):\n{}\n",
            problems.len(),
            problems.join("\n")
        ));
    }
    out
}

fn render_open(when: &str, open: &Value) -> String {
    let r = &open["agent_rss_kib"];
    format!(
        "{} idle connections through the mTLS path, {when} ({} client processes): opened {} (failed {}) in {} ms, {} \
         still echoing after the hold; active on the proxies {} / {}; tunnel handshakes +{}\n  agents' VmRSS (node-a \
         / node-b): before {} / {} KiB, open {} / {} KiB, after closing {} / {} KiB; CPU while open and idle {} / {} \
         ms/s\n",
        open["requested"],
        open["processes"],
        open["opened"],
        open["failed"],
        opt(&open["open_ms"], 0),
        open["alive_after_hold"],
        opt(&open["active_connections"][NODE_A], 0),
        opt(&open["active_connections"][NODE_B], 0),
        opt(&open["tunnel_handshakes"], 0),
        opt(&r["before"][NODE_A], 0),
        opt(&r["before"][NODE_B], 0),
        opt(&r["open"][NODE_A], 0),
        opt(&r["open"][NODE_B], 0),
        opt(&r["after_close"][NODE_A], 0),
        opt(&r["after_close"][NODE_B], 0),
        opt(&open["agent_cpu_ms_per_s_while_open_idle"][NODE_A], 2),
        opt(&open["agent_cpu_ms_per_s_while_open_idle"][NODE_B], 2),
    )
}

fn render_targets(targets: &Value) -> String {
    let mut out = String::from("\ntargets (issue 4; reported, never asserted):\n");
    let t = |i: usize| &targets[i];
    let met = |v: &Value| match v["met"].as_bool() {
        Some(true) => "met",
        Some(false) => "NOT MET",
        None => "not measured",
    };
    for (i, base) in [(0, DIRECT), (1, KERNEL)] {
        let v = t(i);
        out.push_str(&format!(
            "  added p50 latency (rr, 1 connection), {MTLS} - {base}: {} µs ({} - {}; paired {}) <= {} µs: {}\n",
            opt(&v["value"], 1),
            opt(&v["mtls_p50_us"], 1),
            opt(&v["base_p50_us"], 1),
            opt(&v["paired"], 1),
            v["limit"],
            met(v)
        ));
    }
    let v = t(2);
    out.push_str(&format!(
        "  proxy CPU per request at {} connections: {} µs (at 1 connection: {} µs; sinew-proxy threads alone: {} µs) <= {} µs: {}\n",
        v["conns"],
        opt(&v["value"], 1),
        opt(&v["at_1_connection"], 1),
        opt(&v["proxy_threads_only"], 1),
        v["limit"],
        met(v)
    ));
    let v = t(3);
    out.push_str(&format!(
        "  new-connection rate, {MTLS} / {DIRECT}: {} (paired {}) >= {}: {}\n",
        opt(&v["value"], 3),
        opt(&v["paired"], 3),
        v["limit"],
        met(v)
    ));
    let v = t(4);
    out.push_str(&format!(
        "  proxy RSS at {OPEN_CONNS} open connections (largest agent VmRSS, fresh and after the runs): {} MiB (opened {}) <= {} MiB: {}\n",
        opt(&v["value"], 1),
        v["opened"]
            .as_array()
            .map(|a| a.iter().map(Value::to_string).collect::<Vec<_>>().join(" and "))
            .unwrap_or_default(),
        v["limit"],
        met(v)
    ));
    out
}

/// After the runs: every connection of every run took its scenario's path.
fn path_checks(runs: &[Run], start: &Counters, after: &Counters, end: &Counters) -> Vec<String> {
    let mtls_connects: u64 = runs
        .iter()
        .filter(|r| r.scenario == MTLS)
        .map(|r| r.connects)
        .sum();
    let mismatched: Vec<String> = runs
        .iter()
        .filter(|r| r.problems.iter().any(|p| p.starts_with("MISMATCH")))
        .map(|r| format!("repeat {} {} {}", r.repeat + 1, r.scenario, r.kind.name()))
        .collect();
    let d = delta(start, after);
    let mut out = vec![if mismatched.is_empty() {
        format!(
            "path check: every measured {MTLS} connection was redirected on {NODE_A} and arrived as mTLS on {NODE_B} ({mtls_connects} connects); no {DIRECT} or {KERNEL} connection touched a proxy"
        )
    } else {
        format!(
            "path check: MISMATCH in {} runs: {}",
            mismatched.len(),
            mismatched.join(", ")
        )
    }];
    out.push(format!(
        "pooling: {} tunnel handshakes on {NODE_A} for {} mTLS connections over the measured runs and warm-ups ({} for the 1,000-connection probe)",
        d.handshakes,
        d.dst_mtls,
        end.handshakes - after.handshakes
    ));
    out
}
