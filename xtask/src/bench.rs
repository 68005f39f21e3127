//! `cargo xtask bench`: the same client and server measured without Sinew and through a Sinew Service VIP, side by
//! side in one run.
//!
//! Topology (the `sinew-tests` harness): one node netns with a bridge, pod `client` and pod `server` (running
//! `sinew-testpod echo-server`), the agent attached at the node's cgroup root, and a Service `bench` whose one
//! backend is the server. The client runs in two cgroups:
//! - `meshed`: the client pod's own cgroup, under the agent's cgroup root, so Sinew's programs run on its connects;
//! - `plain`: a sibling of the node's cgroup root (`/sys/fs/cgroup/unified/<id>-plain`), so no Sinew program runs.
//!
//! Both run in the client pod's network namespace and reach the same server process over the same veths and
//! bridge. Scenarios:
//! - `direct`: plain client -> server pod IP:8080;
//! - `sinew-vip`: meshed client -> VIP:80, rewritten by Sinew at `connect()` to the server pod IP:8080.
//!
//! So the only difference is Sinew's datapath. Per repeat every measurement alternates direct, sinew-vip; the
//! report is the median over the repeats. Nothing is asserted: the numbers are printed and written as JSON.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde_json::{Value, json};
use sinew_tests::testpod::{ConnectReport, CrrReport, RrReport};
use sinew_tests::{Agent, Cgroup, PodManifest, Proc, ProcOutput, Service, ServicePort, Topology};

use crate::os::{check_interrupt, children_cpu, proc_cpu};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Repeats of every measurement per scenario; medians over them are reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=25))]
    repeats: u32,
    /// Length of each measured run, in milliseconds.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(100..=30_000))]
    duration_ms: u64,
    /// Connections of the loaded request/response run (one client process each); 0 skips that run.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(0..=64))]
    conns: u32,
    /// Also write the JSON report here (it always goes to target/bench/bench-<unix-ts>.json and latest.json).
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

const NODE: &str = "node-a";
const VIP: &str = "10.96.0.20";
const VIP_PORT: u16 = 80;
const SERVER_PORT: u16 = 8080;
/// Request and response size: the 1 KiB of Istio's benchmark and of the ztunnel reference numbers.
const SIZE: usize = 1024;
/// Per-connection I/O timeout of the clients.
const IO_TIMEOUT_MS: u64 = 2000;
/// Unrecorded run per scenario and kind before the repeats (ARP, page cache, CPU frequency).
const WARMUP_MS: u64 = 300;
/// The target: sinew-vip within this fraction of direct.
const TARGET: f64 = 0.03;

#[derive(Clone, Copy, PartialEq)]
enum Better {
    Lower,
    Higher,
}

/// A reported number: JSON key, table column, which way is better, and whether it is one of the targets.
struct Metric {
    key: &'static str,
    column: &'static str,
    better: Better,
    target: bool,
}

const METRICS: &[Metric] = &[
    m("rr_p50_us", "rr p50", Better::Lower, true),
    m("rr_p90_us", "rr p90", Better::Lower, false),
    m("rr_p99_us", "rr p99", Better::Lower, false),
    m("rr_rps", "rr req/s", Better::Higher, false),
    m("rr_cpu_us", "rr CPU", Better::Lower, false),
    m("rrN_rps", "rrN req/s", Better::Higher, false),
    m("rrN_cpu_us", "rrN CPU", Better::Lower, false),
    m("crr_cps", "crr conn/s", Better::Higher, true),
    m("crr_p50_us", "crr p50", Better::Lower, false),
    m("crr_cpu_us", "crr CPU", Better::Lower, false),
];

const fn m(key: &'static str, column: &'static str, better: Better, target: bool) -> Metric {
    Metric {
        key,
        column,
        better,
        target,
    }
}

#[derive(Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Kind {
    Rr,
    RrN,
    Crr,
}

/// One side of the comparison: which cgroup the client runs in and where it connects.
struct Scenario {
    name: &'static str,
    description: &'static str,
    cgroup: PathBuf,
    target: String,
}

/// One measured run.
#[derive(Serialize)]
struct Run {
    repeat: u32,
    scenario: &'static str,
    kind: Kind,
    /// The metrics this run yields (keys of [`METRICS`]).
    metrics: BTreeMap<&'static str, f64>,
    /// Client CPU (utime + stime) over the run, microseconds.
    client_cpu_us: f64,
    /// Anything that went wrong (failed connections, early errors); the run still counts.
    problems: Vec<String>,
    /// What the client(s) printed.
    raw: Vec<Value>,
}

/// Everything a client run needs: the binary, the pod netns and a place for logs.
struct Clients {
    testpod: PathBuf,
    netns: PathBuf,
    netns_name: String,
    log_dir: PathBuf,
}

impl Clients {
    /// Starts `sinew-testpod <args>` in the client pod's netns and in `cgroup`.
    fn spawn(&self, label: &str, cgroup: &Path, args: &[String]) -> Result<Proc> {
        let mut cmd = Command::new(&self.testpod);
        cmd.args(args);
        sinew_tests::sys::enter_pod(&mut cmd, &cgroup.join("cgroup.procs"), &self.netns)?;
        Proc::spawn(label, cmd, &self.log_dir)
    }
}

fn wait_json(p: Proc, bound: Duration) -> Result<(ProcOutput, Value)> {
    let out = p.wait(bound)?;
    let v: Value = out.json()?;
    Ok((out, v))
}

pub fn bench(agent_bin: &Path, a: &BenchArgs) -> Result<()> {
    crate::os::install_interrupt_handler()?;
    // As in the demo: the guards are locals of `run`, so everything is cleaned up when it returns.
    crate::os::explain_interrupt(run(agent_bin, a))
}

fn run(agent_bin: &Path, a: &BenchArgs) -> Result<()> {
    let testpod = crate::demo::preflight(agent_bin)?;
    let started = sinew_tests::unix_ms() / 1000;
    let load_start = loadavg();

    let topo = Topology::builder("bench")
        .testpod_bin(&testpod)
        .node(NODE, &["client", "server"])
        .build()
        .context("building the bench topology")?;
    let node = topo.node(NODE);
    let client = topo.pod("client");
    let server = topo.pod("server");
    // The baseline's cgroup: a sibling of the agent's cgroup root, so no Sinew program is in its effective set.
    let plain = Cgroup::new(&format!("{}-plain", topo.id()))?;
    for ns in [client.netns_name(), server.netns_name()] {
        // New connection per request piles up TIME_WAIT sockets on the client; without reuse the crr runs stall
        // on port allocation and turn bimodal. Same setting for both scenarios.
        sinew_tests::util::run(
            "ip",
            &[
                "netns",
                "exec",
                ns,
                "sysctl",
                "-q",
                "-w",
                "net.ipv4.tcp_tw_reuse=1",
            ],
        )?;
    }
    let mut srv = start_server(&server)?;

    let source = topo.source_dir()?;
    source.write(
        "service-bench.yaml",
        &[Service::new("bench", VIP)
            .port(ServicePort::tcp("tcp", VIP_PORT.into(), SERVER_PORT.into()))
            .selector("app", "bench")
            .to_value()],
    )?;
    source.write(
        "pod-server.yaml",
        &[PodManifest::new(&server)
            .label("app", "bench")
            .container_port(SERVER_PORT)
            .to_value()],
    )?;
    source.write(
        "pod-client.yaml",
        &[PodManifest::new(&client).label("app", "client").to_value()],
    )?;
    let mut agent = Agent::start(node, source.path(), None)?;
    agent
        .wait_ready(Duration::from_secs(20))
        .context("waiting for the agent's /readyz")?;
    check_interrupt()?;

    let clients = Clients {
        testpod: testpod.clone(),
        netns: client.netns_path(),
        netns_name: client.netns_name().to_string(),
        log_dir: topo.work_dir().join("bench-clients"),
    };
    let scenarios = [
        Scenario {
            name: "direct",
            description: "client in a cgroup outside the agent's root -> server pod IP:8080 (no Sinew)",
            cgroup: plain.path().to_path_buf(),
            target: format!("{}:{SERVER_PORT}", server.ip4),
        },
        Scenario {
            name: "sinew-vip",
            description: "client in a pod cgroup under the agent's root -> Service VIP:80, balanced by Sinew to the same server",
            cgroup: client.cgroup_dir().to_path_buf(),
            target: format!("{VIP}:{VIP_PORT}"),
        },
    ];
    sanity_checks(&clients, &scenarios)?;

    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let load1: f64 = loadavg()
        .split_whitespace()
        .next()
        .and_then(|l| l.parse().ok())
        .unwrap_or(0.0);
    if load1 > cpus as f64 / 2.0 {
        println!(
            "note: load average {load1} on {cpus} CPUs before the bench: other work is running, expect noisy numbers"
        );
    }
    println!(
        "bench: {} repeats x {} ms, {SIZE} B request/response, {} parallel conns; order: direct, sinew-vip in even repeats, reversed in odd ones",
        a.repeats, a.duration_ms, a.conns
    );
    let kinds: Vec<Kind> = [Kind::Rr, Kind::RrN, Kind::Crr]
        .into_iter()
        .filter(|k| *k != Kind::RrN || a.conns > 0)
        .collect();
    // The exact cost of Sinew on this path: the kernel's own count and run time of the connect4 program.
    // Untyped, accepting `program_id` (what the agent prints) or `id` (what docs/agent-contract.md's example still
    // shows), so a rename on either side does not silently drop the measurement.
    let status = agent.cli().status_value()?;
    let connect4_id = status["programs"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "connect4")
        .and_then(|p| p["program_id"].as_u64().or(p["id"].as_u64()));
    let stats_fd = match crate::os::enable_bpf_stats() {
        Ok(fd) => Some(fd),
        Err(e) => {
            eprintln!("  note: BPF_ENABLE_STATS failed ({e}); no per-program run times");
            None
        }
    };
    let prog_before = connect4_id.and_then(prog_stats);
    let balanced_before = balanced(&agent)?;
    let agent_cpu_before = agent.pid().and_then(proc_cpu);
    let mut vip_connects = 0u64;
    let mut count = |r: &Run| {
        if r.scenario == "sinew-vip" {
            vip_connects += connects_made(r);
        }
    };
    // Warm-up: one short unrecorded run of each kind and scenario.
    for k in &kinds {
        for s in &scenarios {
            srv = ensure_server(&server, srv)?;
            let r = measure(&clients, s, *k, WARMUP_MS, a.conns, 0)?;
            count(&r);
        }
    }
    let mut runs: Vec<Run> = Vec::new();
    for rep in 0..a.repeats {
        // Counterbalanced: direct first in even repeats, sinew-vip first in odd ones, so a position effect (the
        // run after a CPU-saturating one may find the shared host's CPU budget spent; one early a,b-only run had
        // sinew-vip, always second, lower in all three 16-connection repeats) lands on both sides alike.
        let order: Vec<&Scenario> = if rep % 2 == 0 {
            scenarios.iter().collect()
        } else {
            scenarios.iter().rev().collect()
        };
        for k in &kinds {
            for s in order.iter().copied() {
                check_interrupt()?;
                srv = ensure_server(&server, srv)?;
                let r = measure(&clients, s, *k, a.duration_ms, a.conns, rep)?;
                count(&r);
                eprintln!(
                    "  repeat {} {:<9} {:<4} {}{}",
                    rep + 1,
                    s.name,
                    kind_name(*k),
                    r.metrics
                        .iter()
                        .map(|(k, v)| format!("{k}={v:.1}"))
                        .collect::<Vec<_>>()
                        .join(" "),
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
    let balanced_delta = balanced(&agent)? - balanced_before;
    let prog_after = connect4_id.and_then(prog_stats);
    drop(stats_fd);
    let connect4 = match (prog_before, prog_after) {
        (Some((t0, n0)), Some((t1, n1))) if n1 > n0 => {
            Some((n1 - n0, (t1 - t0) as f64 / (n1 - n0) as f64))
        }
        _ => None,
    };
    let agent_cpu = match (agent_cpu_before, agent.pid().and_then(proc_cpu)) {
        (Some(b), Some(e)) => Some(e.saturating_sub(b)),
        _ => None,
    };
    // Steady-state RSS is what a node pays; the peak comes from parsing kernel BTF once at load time.
    let agent_rss = agent.pid().map(|p| proc_status_kib(p, "VmHWM:"));
    let agent_rss_now = agent.pid().map(|p| proc_status_kib(p, "VmRSS:"));
    drop(srv);

    // Medians, ratios, target check.
    let mut medians: BTreeMap<&str, BTreeMap<&str, f64>> = BTreeMap::new();
    let mut spreads: BTreeMap<&str, BTreeMap<&str, f64>> = BTreeMap::new();
    for s in &scenarios {
        for mt in METRICS {
            let vals: Vec<f64> = runs
                .iter()
                .filter(|r| r.scenario == s.name)
                .filter_map(|r| r.metrics.get(mt.key).copied())
                .collect();
            if let Some(med) = median(&vals) {
                medians.entry(s.name).or_default().insert(mt.key, med);
                let (lo, hi) = vals
                    .iter()
                    .fold((f64::MAX, f64::MIN), |(l, h), v| (l.min(*v), h.max(*v)));
                let spread = if med != 0.0 { (hi - lo) / med } else { 0.0 };
                spreads.entry(s.name).or_default().insert(mt.key, spread);
            }
        }
    }
    let (da, db) = (&medians["direct"], &medians["sinew-vip"]);
    let mut ratios: BTreeMap<&str, f64> = BTreeMap::new();
    let mut within: BTreeMap<&str, bool> = BTreeMap::new();
    for mt in METRICS {
        if let (Some(x), Some(y)) = (da.get(mt.key), db.get(mt.key)) {
            if *x != 0.0 {
                let ratio = y / x;
                ratios.insert(mt.key, ratio);
                // "Within 3%" means not worse by more than 3%; being faster than the baseline is noise, not a miss.
                let ok = match mt.better {
                    Better::Lower => ratio <= 1.0 + TARGET,
                    Better::Higher => ratio >= 1.0 - TARGET,
                };
                within.insert(mt.key, ok);
            }
        }
    }

    // Per-repeat ratios (each sinew-vip run over the direct run just before it), then their median: a load change
    // on the shared machine between repeats then hits both sides of a ratio instead of one side of the medians.
    let mut paired: BTreeMap<&str, f64> = BTreeMap::new();
    for mt in METRICS {
        let ratios: Vec<f64> = (0..a.repeats)
            .filter_map(|rep| {
                let get = |name: &str| {
                    runs.iter()
                        .filter(|r| r.repeat == rep && r.scenario == name)
                        .find_map(|r| r.metrics.get(mt.key).copied())
                };
                match (get("direct"), get("sinew-vip")) {
                    (Some(x), Some(y)) if x != 0.0 => Some(y / x),
                    _ => None,
                }
            })
            .collect();
        if let Some(m) = median(&ratios) {
            paired.insert(mt.key, m);
        }
    }
    let summary = Summary {
        medians: &medians,
        ratios: &ratios,
        paired: &paired,
        within: &within,
        spreads: &spreads,
    };
    let table = render_table(&scenarios, &summary);
    println!("\n{table}");
    let check = if balanced_delta == vip_connects as f64 {
        format!(
            "datapath check: Sinew balanced {balanced_delta} connects = the sinew-vip runs' connects; direct runs added none"
        )
    } else {
        format!(
            "datapath check: MISMATCH: sinew_service_balanced_total grew by {balanced_delta}, the sinew-vip runs made {vip_connects} connects"
        )
    };
    println!("{check}");
    if let Some((runs, ns)) = connect4 {
        println!(
            "Sinew's connect4 program (kernel bpf stats): {runs} runs, {ns:.0} ns per connect on average"
        );
    }
    if let Some(c) = agent_cpu {
        println!(
            "agent: {} CPU during the measurements (it is not on the data path), RSS {} KiB (peak {} KiB, at load)",
            if c.is_zero() {
                "< 10 ms".to_string()
            } else {
                format!("{:.0} ms", c.as_secs_f64() * 1000.0)
            },
            agent_rss_now
                .flatten()
                .map_or("?".into(), |k| k.to_string()),
            agent_rss.flatten().map_or("?".into(), |k| k.to_string())
        );
    }
    let load_end = loadavg();
    println!(
        "load average at start: {load_start}; at end: {load_end} (2 shared vCPUs: compare ratios, not absolutes)"
    );

    let report = json!({
        "version": 1,
        "unix_ts": started,
        "settings": {
            "repeats": a.repeats, "duration_ms": a.duration_ms, "conns": a.conns, "size": SIZE,
            "warmup_ms": WARMUP_MS, "io_timeout_ms": IO_TIMEOUT_MS, "order": "per repeat and kind: direct, sinew-vip in even repeats (0, 2, ...), sinew-vip, direct in odd ones",
        },
        "machine": {
            "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
            "loadavg_start": load_start, "loadavg_end": load_end,
        },
        "topology": {
            "client": client.ip4.to_string(), "server": server.ip4.to_string(), "vip": format!("{VIP}:{VIP_PORT}"),
            "agent_cgroup_root": node.cgroup_root(), "plain_cgroup": plain.path(), "meshed_cgroup": client.cgroup_dir(),
        },
        "scenarios": scenarios.iter().map(|s| json!({
            "name": s.name, "description": s.description, "target": s.target, "cgroup": s.cgroup,
        })).collect::<Vec<_>>(),
        "metrics": METRICS.iter().map(|m| json!({
            "key": m.key, "column": m.column, "target": m.target,
            "better": if m.better == Better::Lower { "lower" } else { "higher" },
        })).collect::<Vec<_>>(),
        "runs": runs,
        "medians": medians,
        "spreads": spreads,
        "ratios_b_over_a": ratios,
        "paired_ratios_b_over_a": paired,
        "within_3pct": within,
        "datapath_check": {"balanced_delta": balanced_delta, "sinew_vip_connects": vip_connects},
        "connect4_prog": connect4.map(|(runs, ns)| json!({"runs": runs, "avg_ns": ns})),
        "agent": {
            "cpu_ms": agent_cpu.map(|c| c.as_secs_f64() * 1000.0),
            "rss_kib": agent_rss_now.flatten(),
            "rss_peak_kib": agent_rss.flatten(),
        },
        "table": table,
    });
    let dir = crate::workspace().join("target").join("bench");
    std::fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
    let text = serde_json::to_string_pretty(&report)?;
    let mut written = vec![
        dir.join(format!("bench-{started}.json")),
        dir.join("latest.json"),
    ];
    written.extend(a.out.clone());
    for p in &written {
        std::fs::write(p, &text).with_context(|| format!("write {}", p.display()))?;
    }
    println!(
        "JSON: {}",
        written
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    // Agent first (SIGTERM), then the plain cgroup's leftovers, then the topology: uninstall, cgroups, namespaces.
    drop(agent);
    drop(plain);
    drop(topo);
    Ok(())
}

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::Rr => "rr",
        Kind::RrN => "rrN",
        Kind::Crr => "crr",
    }
}

fn start_server(server: &sinew_tests::Pod) -> Result<Proc> {
    let mut p = server.testpod(&["echo-server", "--port", &SERVER_PORT.to_string()])?;
    p.wait_for_line(Duration::from_secs(5), |l| l.contains("\"listening\""))
        .context("echo-server did not start")?;
    Ok(p)
}

/// `sinew-testpod` ends every server after 10 minutes; a long bench restarts it between runs.
fn ensure_server(server: &sinew_tests::Pod, mut p: Proc) -> Result<Proc> {
    if p.is_running() {
        return Ok(p);
    }
    eprintln!("  echo-server exited; restarting it");
    start_server(server)
}

/// Before measuring anything: the plain cgroup must really bypass Sinew (a VIP connect from it is not balanced), and
/// the meshed one must reach the server through the VIP.
fn sanity_checks(clients: &Clients, scenarios: &[Scenario]) -> Result<()> {
    let [direct, vip] = scenarios else {
        bail!("two scenarios expected")
    };
    let probe = |s: &Scenario, to: &str| -> Result<ConnectReport> {
        let args: Vec<String> = [
            "tcp-connect",
            "--to",
            to,
            "--count",
            "1",
            "--timeout-ms",
            "500",
        ]
        .map(String::from)
        .to_vec();
        let (_, v) = wait_json(
            clients.spawn(&format!("probe-{}", s.name), &s.cgroup, &args)?,
            Duration::from_secs(10),
        )?;
        Ok(serde_json::from_value(v)?)
    };
    let r = probe(direct, &direct.target)?;
    if r.ok != 1 {
        bail!("direct: cannot reach the server: {:?}", r.errors);
    }
    let r = probe(direct, &vip.target)?;
    if r.ok != 0 {
        bail!(
            "the plain cgroup reached the VIP ({:?}): Sinew runs for it, so it is no baseline",
            r.names
        );
    }
    println!(
        "check: plain cgroup -> {}: not balanced ({:?}), as it must be for the baseline",
        vip.target, r.errors
    );
    let r = probe(vip, &vip.target)?;
    if r.ok != 1 {
        bail!(
            "sinew-vip: cannot reach the server through the VIP: {:?}",
            r.errors
        );
    }
    println!(
        "check: meshed cgroup -> {}: reached {:?}, getpeername {:?}",
        vip.target, r.names, r.peers
    );
    Ok(())
}

/// One run of `kind` for scenario `s` lasting `duration_ms`.
fn measure(
    clients: &Clients,
    s: &Scenario,
    kind: Kind,
    duration_ms: u64,
    conns: u32,
    repeat: u32,
) -> Result<Run> {
    let d = duration_ms.to_string();
    let base = |sub: &str, cap_flag: &str| -> Vec<String> {
        [
            sub,
            "--to",
            &s.target,
            "--size",
            &SIZE.to_string(),
            "--duration-ms",
            &d,
            cap_flag,
            // The tool's own hard cap: the run is bounded by the duration, this only bounds a runaway.
            "1000000",
            "--timeout-ms",
            &IO_TIMEOUT_MS.to_string(),
        ]
        .map(String::from)
        .to_vec()
    };
    let bound = Duration::from_millis(duration_ms + 3 * IO_TIMEOUT_MS) + Duration::from_secs(10);
    let n = match kind {
        Kind::RrN => conns.max(1),
        _ => 1,
    };
    let args = match kind {
        Kind::Crr => base("crr", "--max"),
        _ => base("rr", "--max-requests"),
    };
    // Every run starts without the previous runs' TIME_WAIT sockets (tens of thousands after a few crr runs, all
    // to the same server ip:port in both scenarios, since Sinew rewrites to exactly the direct destination), so
    // neither scenario inherits the other's port-allocation state. `ss -K` destroys them (CONFIG_INET_DIAG_DESTROY).
    flush_time_wait(clients);
    let cpu0 = children_cpu();
    let procs = (0..n)
        .map(|i| {
            clients.spawn(
                &format!("{}-{}-{repeat}-{i}", s.name, kind_name(kind)),
                &s.cgroup,
                &args,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let mut outs = Vec::new();
    for p in procs {
        // Only these children are reaped in between, so the rusage difference is exactly their CPU time.
        let r = wait_json(p, bound);
        check_interrupt()?;
        outs.push(r?.1);
    }
    let cpu_us = (children_cpu() - cpu0).as_secs_f64() * 1e6;
    let mut metrics = BTreeMap::new();
    let mut problems = Vec::new();
    match kind {
        Kind::Rr => {
            let r: RrReport = serde_json::from_value(outs[0].clone())?;
            if let Some(e) = &r.error {
                problems.push(e.clone());
            }
            if r.requests > 0 {
                metrics.insert("rr_p50_us", r.p50_us);
                metrics.insert("rr_p90_us", r.p90_us);
                metrics.insert("rr_p99_us", r.p99_us);
                metrics.insert("rr_rps", r.requests as f64 * 1000.0 / r.duration_ms);
                metrics.insert("rr_cpu_us", cpu_us / r.requests as f64);
            }
        }
        Kind::RrN => {
            let mut rps = 0.0;
            let mut reqs = 0u64;
            for o in &outs {
                let r: RrReport = serde_json::from_value(o.clone())?;
                if let Some(e) = &r.error {
                    problems.push(e.clone());
                }
                if r.duration_ms > 0.0 {
                    rps += r.requests as f64 * 1000.0 / r.duration_ms;
                }
                reqs += r.requests;
            }
            if reqs > 0 {
                metrics.insert("rrN_rps", rps);
                metrics.insert("rrN_cpu_us", cpu_us / reqs as f64);
            }
        }
        Kind::Crr => {
            let r: CrrReport = serde_json::from_value(outs[0].clone())?;
            if r.failed > 0 {
                problems.push(format!("{} failed connections: {:?}", r.failed, r.errors));
            }
            if r.connections > 0 {
                metrics.insert("crr_cps", r.conns_per_sec);
                metrics.insert("crr_p50_us", r.p50_us);
                metrics.insert("crr_cpu_us", cpu_us / r.connections as f64);
            }
        }
    }
    Ok(Run {
        repeat,
        scenario: s.name,
        kind,
        metrics,
        client_cpu_us: cpu_us,
        problems,
        raw: outs,
    })
}

fn flush_time_wait(clients: &Clients) {
    let r = sinew_tests::util::run(
        "ip",
        &[
            "netns",
            "exec",
            &clients.netns_name,
            "ss",
            "-K",
            "-t",
            "state",
            "time-wait",
        ],
    );
    if let Err(e) = r {
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(|| {
            eprintln!("  note: could not flush TIME_WAIT sockets ({e:#}); runs continue without")
        });
    }
}

/// Connects a run made (each one passes Sinew's connect4 once for the VIP scenario, failed or not).
fn connects_made(r: &Run) -> u64 {
    r.raw
        .iter()
        .map(|v| match r.kind {
            Kind::Crr => v["connections"].as_u64().unwrap_or(0) + v["failed"].as_u64().unwrap_or(0),
            _ => 1,
        })
        .sum()
}

/// `(run_time_ns, run_cnt)` of a program, from `bpftool prog show id <id> -j` (present while stats are on).
fn prog_stats(id: u64) -> Option<(u64, u64)> {
    let out =
        sinew_tests::util::run("bpftool", &["prog", "show", "id", &id.to_string(), "-j"]).ok()?;
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    Some((
        v["run_time_ns"].as_u64().unwrap_or(0),
        v["run_cnt"].as_u64().unwrap_or(0),
    ))
}

fn balanced(agent: &Agent) -> Result<f64> {
    let m = agent.metrics()?;
    Ok(m.value(
        "sinew_service_balanced_total",
        &[("vip", &format!("{VIP}:{VIP_PORT}"))],
    ))
}

fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    })
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn fmt_val(key: &str, v: f64) -> String {
    if key.ends_with("_rps") || key.ends_with("_cps") {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// What the table shows, by metric key.
struct Summary<'a> {
    medians: &'a BTreeMap<&'a str, BTreeMap<&'a str, f64>>,
    ratios: &'a BTreeMap<&'a str, f64>,
    paired: &'a BTreeMap<&'a str, f64>,
    within: &'a BTreeMap<&'a str, bool>,
    spreads: &'a BTreeMap<&'a str, BTreeMap<&'a str, f64>>,
}

/// The table: scenario rows, metric columns, then the b/a ratio rows, the 3% verdicts and the repeat spread.
fn render_table(scenarios: &[Scenario], sum: &Summary) -> String {
    let Summary {
        medians,
        ratios,
        paired,
        within,
        spreads,
    } = sum;
    let cols: Vec<&Metric> = METRICS
        .iter()
        .filter(|m| medians.values().any(|x| x.contains_key(m.key)))
        .collect();
    let w0 = 16;
    let width = |m: &Metric| m.column.len().max(9);
    let mut out = String::new();
    out.push_str(&format!("{:<w0$}", "median"));
    for m in &cols {
        out.push_str(&format!(" {:>w$}", m.column, w = width(m)));
    }
    out.push('\n');
    for s in scenarios {
        out.push_str(&format!("{:<w0$}", s.name));
        for m in &cols {
            let v = medians
                .get(s.name)
                .and_then(|x| x.get(m.key))
                .map_or("-".into(), |v| fmt_val(m.key, *v));
            out.push_str(&format!(" {:>w$}", v, w = width(m)));
        }
        out.push('\n');
    }
    out.push_str(&format!("{:<w0$}", "ratio b/a"));
    for m in &cols {
        let v = ratios.get(m.key).map_or("-".into(), |r| format!("{r:.3}"));
        out.push_str(&format!(" {:>w$}", v, w = width(m)));
    }
    out.push('\n');
    out.push_str(&format!("{:<w0$}", "paired b/a"));
    for m in &cols {
        let v = paired.get(m.key).map_or("-".into(), |r| format!("{r:.3}"));
        out.push_str(&format!(" {:>w$}", v, w = width(m)));
    }
    out.push('\n');
    out.push_str(&format!("{:<w0$}", "within 3%"));
    for m in &cols {
        let v = within
            .get(m.key)
            .map_or("-", |ok| if *ok { "yes" } else { "no" });
        out.push_str(&format!(" {:>w$}", v, w = width(m)));
    }
    out.push('\n');
    for s in scenarios {
        out.push_str(&format!("{:<w0$}", format!("spread {}", s.name)));
        for m in &cols {
            let v = spreads
                .get(s.name)
                .and_then(|x| x.get(m.key))
                .map_or("-".into(), |v| format!("{:.1}%", v * 100.0));
            out.push_str(&format!(" {:>w$}", v, w = width(m)));
        }
        out.push('\n');
    }
    out.push_str(
        "\nrr: 1 connection, 1 KiB request -> 1 KiB response, latency in µs; rrN: N connections in parallel (one \
         client process each), total req/s;\ncrr: new connection per request (connect, 1 KiB each way, close); \
         CPU: client utime+stime per request or connection, µs;\nratio: sinew-vip median / direct median; paired: median \
         over the repeats of sinew-vip / direct within the repeat;\nwithin 3%: the ratio is at most 3% worse; \
         spread: (max - min) / median over the repeats.\n",
    );
    for m in METRICS.iter().filter(|m| m.target) {
        if let (Some(r), Some(ok)) = (ratios.get(m.key), within.get(m.key)) {
            let what = if m.better == Better::Lower {
                "p50 latency (rr)"
            } else {
                "connect rate (crr)"
            };
            let noise = spreads
                .values()
                .filter_map(|x| x.get(m.key))
                .fold(0.0f64, |a, b| a.max(*b));
            let p = paired.get(m.key).map_or("-".into(), |p| format!("{p:.3}"));
            out.push_str(&format!(
                "target {what}: sinew-vip/direct = {r:.3} (paired {p}) -> within 3%: {}{}\n",
                if *ok { "yes" } else { "no" },
                if noise > 2.0 * TARGET {
                    format!(
                        "  [the repeats themselves spread up to {:.0}%: noise, not Sinew, decides this verdict]",
                        noise * 100.0
                    )
                } else {
                    String::new()
                }
            ));
        }
    }
    out
}
