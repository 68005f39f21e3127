//! The same-node group of `cargo xtask bench` (issue 6): a client and a server on the same node, without Sinew,
//! with Sinew and same-node socket acceleration off, and with it on, side by side in one run.
//!
//! Acceleration is an agent start-up setting (`--sockmap`), so each scenario is its own simulated node in the same
//! kernel (the `sinew-tests` harness: its own netns with a bridge, cgroup subtree and bpffs root), with the same
//! two pods:
//! - `node-plain`: no agent; nothing is attached to its cgroup root (`no-sinew`);
//! - `node-off`: an agent with `--sockmap false` (`sockmap-off`: connect4, the ingress policy and the proxy's
//!   sock_ops program run on every connection, nothing is redirected);
//! - `node-on`: an agent with `--sockmap true` (`sockmap-on`: `accel_sockops` puts both ends of the connection in
//!   the SockHash, `accel_msg` hands every send straight to the peer socket).
//!
//! On each node: pod `client-<x>` (namespace `bench-client`, sa `bench-client`) and pod `server-<x>` (`default`,
//! sa `bench-server`, `sinew-testpod echo-server --port 8080`). Clients run in their pod's cgroup and netns and
//! connect to their own server's pod IP (a Service VIP would not exist without an agent), so the three scenarios
//! differ only in what Sinew attaches. Clients and servers are pinned to one CPU (`--same-node-cpu`, default the
//! last): on a VM a cross-CPU wake-up costs ~80 µs, and whether the scheduler puts client and server on the same
//! CPU flips from run to run, which made request/response latency bimodal (25 vs 110 µs) in every scenario and
//! drowned the path's own cost.
//!
//! Kinds: `rr64` and `rr1k` (one connection, 64 B / 1 KiB request and response), `crr` (a new connection per 1 KiB
//! request: connect, name line, request, response, close) and `bulk` (one connection streaming 64 KiB writes to the
//! echo server; MB/s echoed back). Per repeat each kind runs the three scenarios back to back in the order of a
//! Williams design. Around every run: client CPU, the kernel's run count and time of the node agent's programs
//! (BPF statistics, on while the group runs), and the agent's acceleration counters, which prove that every
//! `sockmap-on` run was redirected and no `sockmap-off` run was. Reported: medians, ratios and a decision line.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde_json::{Value, json};
use sinew_tests::testpod::{ConnectReport, RrReport};
use sinew_tests::{Agent, AgentOptions, Pod, PodManifest, Proc, SourceDir, Topology};

use super::{
    BenchArgs, Better, CLIENT_NS, CLIENT_SA, Comparison, IO_TIMEOUT_MS, Metric, ORDERS3, ProgDelta,
    Row, SERVER_PORT, SERVER_SA, SIZE, WARMUP_MS, compare, crr_metrics, flush_time_wait_in,
    loadavg, m, medians_and_spreads, metrics_line, note_if_busy, prog_deltas, programs_line,
    ratio_cell, render_grid, spawn_client, tcp_tw_reuse, wait_all, wait_json,
};
use crate::os::{check_interrupt, children_cpu, proc_cpu};

const NONE: &str = "no-sinew";
const OFF: &str = "sockmap-off";
const ON: &str = "sockmap-on";

/// The small request/response size (the large one is [`SIZE`]).
const SMALL: usize = 64;
/// Bulk: bytes per write.
const BULK_CHUNK: usize = super::mesh::BULK_CHUNK;

/// The programs whose kernel statistics are read around every run (those the node's agent has loaded).
const PROGRAMS: [&str; 6] = [
    "connect4",
    "policy_ingress",
    "proxy_sockops",
    "accel_sockops",
    "accel_msg",
    "accel_verdict",
];
/// The acceleration counters (`status` → `sockmap.counters`; `/metrics` → `sinew_sockmap_<name>_total`).
const COUNTERS: [&str; 5] = [
    "inserts",
    "redirects",
    "misses",
    "redirected_bytes",
    "insert_errors",
];

/// The decision: sockmap-on must beat sockmap-off by at least this much in one of [`GAIN_METRICS`]...
const GAIN: f64 = 0.10;
/// ...and be worse by no more than this in any of [`GUARDED_METRICS`].
const MAX_LOSS: f64 = 0.03;
const GAIN_METRICS: [&str; 3] = ["rr64_p50_us", "rr1k_p50_us", "bulk_mbps"];
const GUARDED_METRICS: [&str; 6] = [
    "rr64_p50_us",
    "rr64_p99_us",
    "rr1k_p50_us",
    "rr1k_p99_us",
    "crr_cps",
    "bulk_mbps",
];

#[derive(Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Kind {
    Rr64,
    Rr1k,
    Crr,
    Bulk,
}

impl Kind {
    const ALL: [Kind; 4] = [Kind::Rr64, Kind::Rr1k, Kind::Crr, Kind::Bulk];

    fn name(self) -> &'static str {
        match self {
            Kind::Rr64 => "rr64",
            Kind::Rr1k => "rr1k",
            Kind::Crr => "crr",
            Kind::Bulk => "bulk",
        }
    }

    /// What the programs' time is divided by.
    fn unit(self) -> &'static str {
        match self {
            Kind::Rr64 | Kind::Rr1k => "request",
            Kind::Crr => "connection",
            Kind::Bulk => "MB",
        }
    }
}

/// First table: request/response latency on one connection.
const LATENCY: &[Metric] = &[
    m("rr64_p50_us", "rr64 p50", Better::Lower, true),
    m("rr64_p99_us", "rr64 p99", Better::Lower, false),
    m("rr64_rps", "rr64 req/s", Better::Higher, false),
    m("rr64_cpu_us", "rr64 CPU", Better::Lower, false),
    m("rr1k_p50_us", "rr1k p50", Better::Lower, true),
    m("rr1k_p99_us", "rr1k p99", Better::Lower, false),
    m("rr1k_rps", "rr1k req/s", Better::Higher, false),
    m("rr1k_cpu_us", "rr1k CPU", Better::Lower, false),
];

/// Second table: new connections and bulk throughput.
const RATES: &[Metric] = &[
    m("crr_cps", "crr conn/s", Better::Higher, true),
    m("crr_p50_us", "crr p50", Better::Lower, false),
    m("crr_cpu_us", "crr CPU", Better::Lower, false),
    m("bulk_mbps", "bulk MB/s", Better::Higher, true),
    m("bulk_gbps", "bulk Gbit/s", Better::Higher, false),
    m("bulk_sent_mbps", "bulk sent MB/s", Better::Higher, false),
    m("bulk_backlog_mb", "bulk backlog MB", Better::Lower, false),
    m("bulk_cpu_us", "bulk CPU", Better::Lower, false),
];

/// One side of the comparison: its node's pods and agent.
struct Scenario {
    name: &'static str,
    description: &'static str,
    node: &'static str,
    client: Pod,
    server: Pod,
    /// The server's pod IP:8080.
    target: String,
    /// Index into [`Ctx::agents`] (None: no agent on this node).
    agent: Option<usize>,
    /// The `--sockmap` value its agent was started with (None: no agent).
    sockmap: Option<bool>,
}

/// One measured run.
#[derive(Serialize)]
struct Run {
    repeat: u32,
    scenario: &'static str,
    kind: Kind,
    metrics: BTreeMap<&'static str, f64>,
    /// Requests, connections or MB (echoed back, drain included) the run carried.
    units: f64,
    client_cpu_us: f64,
    /// Connects the run made (failed or not).
    connects: u64,
    /// The node agent's programs over the run (empty without BPF statistics or without an agent).
    programs: BTreeMap<&'static str, ProgDelta>,
    /// Growth of the node agent's acceleration counters over the run (empty without an agent).
    sockmap: BTreeMap<&'static str, f64>,
    /// The node agent's CPU over the run, ms (clock-tick resolution).
    agent_cpu_ms: Option<f64>,
    problems: Vec<String>,
    raw: Vec<Value>,
}

measured!(Run);

/// What every run needs.
struct Ctx {
    testpod: PathBuf,
    log_dir: PathBuf,
    /// The agents of node-off and node-on.
    agents: Vec<Agent>,
    /// (scenario, program name, program id) of the watched programs (empty without BPF statistics).
    progs: Vec<(&'static str, &'static str, u64)>,
    /// The CPU every client and server runs on (None: wherever the scheduler puts them).
    cpu: Option<usize>,
}

impl Ctx {
    fn pids(&self) -> Vec<u32> {
        self.agents.iter().filter_map(Agent::pid).collect()
    }
}

/// The same-node group: builds its three nodes, checks the paths, measures, prints the tables, returns the JSON.
pub(super) fn run(a: &BenchArgs, testpod: &Path) -> Result<Value> {
    let load_start = loadavg();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpu = match a.same_node_cpu.as_deref() {
        None => Some(cpus - 1),
        Some("free") => None,
        Some(c) => match c.parse::<usize>() {
            Ok(c) if c < cpus => Some(c),
            _ => bail!("--same-node-cpu {c}: a CPU number below {cpus}, or `free`"),
        },
    };
    let nodes = [
        ("node-plain", "plain"),
        ("node-off", "off"),
        ("node-on", "on"),
    ];
    let mut builder = Topology::builder("bench-same").testpod_bin(testpod);
    for (node, x) in nodes {
        builder = builder
            .node(node, &[&format!("client-{x}"), &format!("server-{x}")])
            .pod_namespace(&format!("client-{x}"), CLIENT_NS);
    }
    let topo = builder.build().context("building the same-node topology")?;
    let mut servers = Vec::new();
    let mut agents = Vec::new();
    let mut scenarios = Vec::new();
    for (i, (node, x)) in nodes.into_iter().enumerate() {
        let client = topo.pod(&format!("client-{x}"));
        let server = topo.pod(&format!("server-{x}"));
        // crr piles up TIME_WAIT sockets; without reuse the runs stall on port allocation. Same for every scenario.
        for ns in [client.netns_name(), server.netns_name()] {
            tcp_tw_reuse(ns)?;
        }
        servers.push(start_server(&server, testpod, cpu)?);
        let sockmap = match i {
            0 => None,
            _ => {
                let on = i == 2;
                agents.push(start_agent(&topo, node, &client, &server, on)?);
                Some(on)
            }
        };
        let (name, description) = match i {
            0 => (
                NONE,
                "node without an agent: nothing attached to the pods' cgroups; client -> server pod IP:8080",
            ),
            1 => (
                OFF,
                "node agent with --sockmap false: connect4, policy_ingress, proxy_sockops on the path; client -> server pod IP:8080",
            ),
            _ => (
                ON,
                "node agent with --sockmap true: as sockmap-off, plus accel_sockops (SockHash) and accel_msg (sk_msg redirect to the peer socket)",
            ),
        };
        scenarios.push(Scenario {
            name,
            description,
            node,
            target: format!("{}:{SERVER_PORT}", server.ip4),
            client,
            server,
            agent: (i > 0).then(|| i - 1),
            sockmap,
        });
    }
    for ag in &mut agents {
        ag.wait_ready(Duration::from_secs(20))
            .context("waiting for an agent's /readyz")?;
    }
    check_interrupt()?;
    let mut ctx = Ctx {
        testpod: testpod.to_path_buf(),
        log_dir: topo.work_dir().join("bench-clients"),
        agents,
        progs: Vec::new(),
        cpu,
    };
    let sanity = sanity_checks(&ctx, &scenarios)?;

    // The kernel's per-program statistics, on for as long as the fd is open: the same switch as
    // `kernel.bpf_stats_enabled=1`, but the kernel turns it off again when the fd closes, also if xtask dies, so
    // there is nothing to restore (the sysctl keeps reading its own setting, 0, meanwhile).
    let stats_was = bpf_stats_sysctl();
    let stats_fd = match crate::os::enable_bpf_stats() {
        Ok(fd) => Some(fd),
        Err(e) => {
            eprintln!("  note: BPF_ENABLE_STATS failed ({e}); no per-program run times");
            None
        }
    };
    let stats_during = bpf_stats_sysctl();
    if stats_fd.is_some() {
        for s in &scenarios {
            if let Some(i) = s.agent {
                for (name, id) in agent_programs(&ctx.agents[i])? {
                    ctx.progs.push((s.name, name, id));
                }
            }
        }
    }

    let kinds = Kind::ALL;
    let order_text = format!(
        "per repeat, each kind runs the scenarios in the order of a Williams design over ({NONE}, {OFF}, {ON}): 012, 120, 201, 210, 021, 102 (repeat r uses r mod 6)"
    );
    let placement = match cpu {
        Some(c) => format!(
            "clients and servers on CPU {c} (taskset: a request/response never waits for a cross-CPU wake-up)"
        ),
        None => "clients and servers wherever the scheduler puts them".to_string(),
    };
    println!(
        "same-node bench: {} repeats x {} ms, rr at {SMALL} B and {SIZE} B, crr at {SIZE} B, bulk {} KiB writes; {placement}; {order_text}",
        a.repeats,
        a.duration_ms,
        BULK_CHUNK / 1024
    );
    note_if_busy(&load_start, "the group");
    let counters_start: Vec<BTreeMap<&str, f64>> = ctx
        .agents
        .iter()
        .map(sock_counters)
        .collect::<Result<_>>()?;
    // Warm-up: one unrecorded short run of every kind and scenario (ARP, page cache, CPU frequency).
    for s in scenarios.iter().rev() {
        for k in kinds {
            ensure_server(&ctx, &mut servers, &scenarios, s)?;
            let r = measure(&ctx, s, k, WARMUP_MS, 0)?;
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
    let mut runs: Vec<Run> = Vec::new();
    for rep in 0..a.repeats {
        let order: Vec<&Scenario> = ORDERS3[rep as usize % 6]
            .iter()
            .map(|&i| &scenarios[i])
            .collect();
        for k in kinds {
            for s in order.iter().copied() {
                ensure_server(&ctx, &mut servers, &scenarios, s)?;
                let r = measure(&ctx, s, k, a.duration_ms, rep)?;
                eprintln!(
                    "  repeat {} {:<11} {:<4} {}{}{}{}",
                    rep + 1,
                    s.name,
                    k.name(),
                    metrics_line(&r.metrics),
                    programs_line(&r.programs),
                    match r.sockmap.get("redirects") {
                        Some(x) if s.agent.is_some() => format!(" redirects=+{x}"),
                        _ => String::new(),
                    },
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
    drop(stats_fd);
    let stats_after = bpf_stats_sysctl();
    let counters_end: Vec<BTreeMap<&str, f64>> = ctx
        .agents
        .iter()
        .map(sock_counters)
        .collect::<Result<_>>()?;
    let load_end = loadavg();

    let names = [NONE, OFF, ON];
    let all: Vec<&Metric> = LATENCY.iter().chain(RATES).collect();
    let (medians, spreads) = medians_and_spreads(&names, &all, &runs);
    let comparisons = [
        ("on/off", OFF, ON),
        ("on/none", NONE, ON),
        ("off/none", NONE, OFF),
    ]
    .map(|(label, x, y)| compare(label, x, y, &all, &medians, &runs, a.repeats));
    let programs = program_summary(&ctx, &scenarios, &runs);
    let datapath = datapath_check(&scenarios, &runs, &counters_start, &counters_end);
    let decision = decide(
        &medians,
        &spreads,
        datapath["on_redirected_every_run"] == true,
    );

    let mut table = String::new();
    table.push_str(&render(&names, LATENCY, &medians, &comparisons, &spreads));
    table.push('\n');
    table.push_str(&render(&names, RATES, &medians, &comparisons, &spreads));
    table.push_str(&format!(
        "\nrr64 / rr1k: 1 connection, {SMALL} B / {SIZE} B request -> same-size response, latency in µs; crr: new \
         connection per request (connect, name line, {SIZE} B each way, close);\nbulk: one connection writing {} KiB \
         chunks to the echo server, MB/s (10^6 B) echoed back within the window; sent: MB/s the client wrote; \
         backlog: MB written but not yet echoed back when the window closed;\nCPU: client \
         utime+stime per request / connection / MB, µs;\nx/y ratio: median of x / median of y (on: {ON}, off: \
         {OFF}, none: {NONE}); paired: median over the repeats of x / y within the repeat; spread: (max - min) / \
         median over the repeats.\n",
        BULK_CHUNK / 1024
    ));
    table.push_str(&render_programs(&programs));
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
        table.push_str(&format!(
            "runs with problems ({}; their numbers still count):\n{}\n",
            problems.len(),
            problems.join("\n")
        ));
    }
    table.push_str(&format!(
        "{}\n",
        datapath["text"].as_str().unwrap_or_default()
    ));
    table.push_str(&format!(
        "{}\n",
        decision["text"].as_str().unwrap_or_default()
    ));
    println!("\n{table}");
    println!(
        "bpf stats: on for the measured runs through a BPF_ENABLE_STATS fd (the kernel turns them off when it closes, \
         even if xtask dies); kernel.bpf_stats_enabled, which shows only the sysctl's own setting, read {stats_was} \
         before, {stats_during} during and {stats_after} after"
    );
    println!(
        "load average at start: {load_start}; at end: {load_end} (2 shared vCPUs: compare ratios, not absolutes)"
    );

    let report = json!({
        "settings": {
            "repeats": a.repeats, "duration_ms": a.duration_ms, "sizes": [SMALL, SIZE], "bulk_chunk": BULK_CHUNK,
            "warmup_ms": WARMUP_MS, "io_timeout_ms": IO_TIMEOUT_MS, "order": order_text, "cpu": cpu,
            "decision_rule": format!("{ON} at least {:.0}% better than {OFF} in one of {GAIN_METRICS:?} and no more than {:.0}% worse in any of {GUARDED_METRICS:?} (medians)", GAIN * 100.0, MAX_LOSS * 100.0),
        },
        "machine": {
            "nproc": cpus,
            "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
            "loadavg_start": load_start, "loadavg_end": load_end,
            "bpf_stats_enabled": {"before": stats_was, "during": stats_during, "after": stats_after},
        },
        "scenarios": scenarios.iter().map(|s| json!({
            "name": s.name, "description": s.description, "node": s.node, "target": s.target,
            "client": {"pod": s.client.name, "ip": s.client.ip4.to_string(), "cgroup": s.client.cgroup_dir(), "netns": s.client.netns_name()},
            "server": {"pod": s.server.name, "ip": s.server.ip4.to_string(), "netns": s.server.netns_name()},
            "agent": s.agent.is_some(), "sockmap": s.sockmap,
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
        "bpf_programs": programs,
        "datapath_check": datapath,
        "decision": decision,
        "table": table,
    });
    drop(servers);
    // Agents (SIGTERM), then the topology: uninstall, cgroups, namespaces.
    drop(ctx);
    drop(topo);
    Ok(report)
}

/// `kernel.bpf_stats_enabled` as it reads now.
fn bpf_stats_sysctl() -> String {
    std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled")
        .map_or_else(|e| format!("? ({e})"), |s| s.trim().to_string())
}

/// Writes `node`'s two pods into a source directory of its own and starts its agent with `--sockmap <sockmap>`.
/// Does not wait for readiness.
fn start_agent(
    topo: &Topology,
    node: &str,
    client: &Pod,
    server: &Pod,
    sockmap: bool,
) -> Result<Agent> {
    let n = topo.node(node);
    let source = SourceDir::new(n.work_dir().join("manifests"))?;
    source.write(
        "pod-server.yaml",
        &[PodManifest::new(server)
            .label("app", "bench")
            .service_account(SERVER_SA)
            .container_port(SERVER_PORT)
            .to_value()],
    )?;
    source.write(
        "pod-client.yaml",
        &[PodManifest::new(client)
            .label("app", "client")
            .service_account(CLIENT_SA)
            .to_value()],
    )?;
    let mut opts = AgentOptions::for_node(n, source.path(), None)?;
    opts.extra_args
        .extend(["--sockmap".into(), sockmap.to_string()]);
    Agent::start_with(opts).with_context(|| format!("starting the agent of {node}"))
}

/// `sinew-testpod echo-server` ends after 10 minutes; a long bench restarts it between runs.
fn ensure_server(
    ctx: &Ctx,
    servers: &mut [Proc],
    scenarios: &[Scenario],
    s: &Scenario,
) -> Result<()> {
    let i = scenarios
        .iter()
        .position(|x| x.name == s.name)
        .context("unknown scenario")?;
    if servers[i].is_running() {
        return Ok(());
    }
    eprintln!("  {}: echo-server exited; restarting it", s.server.name);
    servers[i] = start_server(&s.server, &ctx.testpod, ctx.cpu)?;
    Ok(())
}

/// The acceleration counters of an agent, cumulative: from `status` (`sockmap.counters`, plus `connections`: sockets
/// in the SockHash now), else from `/metrics` (`sinew_sockmap_<name>_total`). Missing ones are left out.
fn sock_counters(agent: &Agent) -> Result<BTreeMap<&'static str, f64>> {
    let st = agent.cli().status_value()?;
    let sm = &st["sockmap"];
    let mut out = BTreeMap::new();
    if sm.is_object() {
        for c in COUNTERS {
            if let Some(v) = sm["counters"][c].as_f64() {
                out.insert(c, v);
            }
        }
        if let Some(v) = sm["connections"].as_f64() {
            out.insert("connections", v);
        }
        if let Some(e) = sm["enabled"].as_bool() {
            out.insert("enabled", f64::from(u8::from(e)));
        }
    }
    if out.keys().all(|k| !COUNTERS.contains(k)) {
        let m = agent.metrics()?;
        for c in COUNTERS {
            if let Some(v) = m.get(&format!("sinew_sockmap_{c}_total"), &[]) {
                out.insert(c, v);
            }
        }
    }
    Ok(out)
}

/// Growth of the cumulative counters from `a` to `b` (`connections` and `enabled` as they are at `b`).
fn counters_delta(
    a: &BTreeMap<&'static str, f64>,
    b: &BTreeMap<&'static str, f64>,
) -> BTreeMap<&'static str, f64> {
    b.iter()
        .map(|(k, v)| {
            if COUNTERS.contains(k) {
                (*k, v - a.get(k).copied().unwrap_or(0.0))
            } else {
                (*k, *v)
            }
        })
        .collect()
}

/// `sinew-testpod <args>` from scenario `s`'s client pod (its cgroup and netns), on [`Ctx::cpu`] if set.
fn spawn(ctx: &Ctx, s: &Scenario, label: &str, args: &[String]) -> Result<Proc> {
    let (program, args) = pinned(&ctx.testpod, ctx.cpu, args);
    spawn_client(
        &program,
        s.client.cgroup_dir(),
        &s.client.netns_path(),
        &ctx.log_dir,
        label,
        &args,
    )
}

/// `testpod args`, or `taskset -c <cpu> testpod args` (every thread of it on that CPU).
fn pinned(testpod: &Path, cpu: Option<usize>, args: &[String]) -> (PathBuf, Vec<String>) {
    match cpu {
        None => (testpod.to_path_buf(), args.to_vec()),
        Some(c) => {
            let mut v = vec![
                "-c".to_string(),
                c.to_string(),
                testpod.display().to_string(),
            ];
            v.extend_from_slice(args);
            (PathBuf::from("taskset"), v)
        }
    }
}

/// `sinew-testpod echo-server --port 8080` in `server`, on `cpu` if set; waits until it listens.
fn start_server(server: &Pod, testpod: &Path, cpu: Option<usize>) -> Result<Proc> {
    let args = ["echo-server", "--port", &SERVER_PORT.to_string()].map(String::from);
    let (program, args) = pinned(testpod, cpu, &args);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut p = server.spawn(&program, &args)?;
    p.wait_for_line(Duration::from_secs(5), |l| l.contains("\"listening\""))
        .with_context(|| format!("{}: echo-server did not start", server.name))?;
    Ok(p)
}

/// The arguments of one run of `kind` to `target` lasting `duration_ms` (each also bounded by its own cap).
fn args_of(kind: Kind, target: &str, duration_ms: u64) -> Vec<String> {
    let (sub, size_flag, size, cap_flag) = match kind {
        Kind::Rr64 => ("rr", "--size", SMALL, Some("--max-requests")),
        Kind::Rr1k => ("rr", "--size", SIZE, Some("--max-requests")),
        Kind::Crr => ("crr", "--size", SIZE, Some("--max")),
        Kind::Bulk => ("bulk", "--chunk", BULK_CHUNK, None),
    };
    let mut v: Vec<String> = [
        sub,
        "--to",
        target,
        size_flag,
        &size.to_string(),
        "--duration-ms",
        &duration_ms.to_string(),
        "--timeout-ms",
        &IO_TIMEOUT_MS.to_string(),
    ]
    .map(String::from)
    .to_vec();
    if let Some(cap) = cap_flag {
        // The tool's own hard cap: the run is bounded by the duration, this only bounds a runaway.
        v.extend([cap.to_string(), "1000000".to_string()]);
    }
    v
}

/// Before measuring: every client reaches its server; each agent says whether acceleration is on; a short `rr64`
/// run on each agent's node is redirected with `--sockmap true` and not with `--sockmap false`.
fn sanity_checks(ctx: &Ctx, scenarios: &[Scenario]) -> Result<Value> {
    let mut out = serde_json::Map::new();
    for s in scenarios {
        let args: Vec<String> = [
            "tcp-connect",
            "--to",
            &s.target,
            "--count",
            "1",
            "--timeout-ms",
            "1000",
        ]
        .map(String::from)
        .to_vec();
        let (_, v) = wait_json(
            spawn(ctx, s, &format!("probe-{}", s.name), &args)?,
            Duration::from_secs(10),
        )?;
        let r: ConnectReport = serde_json::from_value(v)?;
        if r.ok != 1 {
            bail!(
                "{}: the client cannot reach its server {}: {:?}",
                s.name,
                s.target,
                r.errors
            );
        }
        let Some(i) = s.agent else {
            println!(
                "check: {}: {} reached {:?}; no agent on {}",
                s.name, s.target, r.names, s.node
            );
            out.insert(s.name.into(), json!({"reached": r.names}));
            continue;
        };
        let agent = &ctx.agents[i];
        // The first accelerated connection may wait for the agent to have learned the pods.
        let want = s.sockmap == Some(true);
        let mut tries = 0;
        let (d, rr) = loop {
            tries += 1;
            let c0 = sock_counters(agent)?;
            let (_, v) = wait_json(
                spawn(
                    ctx,
                    s,
                    &format!("check-{}", s.name),
                    &args_of(Kind::Rr64, &s.target, 300),
                )?,
                Duration::from_secs(15),
            )?;
            let rr: RrReport = serde_json::from_value(v)?;
            let d = counters_delta(&c0, &sock_counters(agent)?);
            let redirected = d.get("redirects").copied().unwrap_or(0.0);
            if !want || redirected > 0.0 || tries >= 10 {
                break (d, rr);
            }
            crate::os::sleep_interruptible(Duration::from_millis(500))?;
        };
        let redirects = d.get("redirects").copied();
        let ok = match (want, redirects) {
            (true, Some(x)) => x > 0.0,
            (false, x) => x.unwrap_or(0.0) == 0.0,
            (true, None) => false,
        };
        println!(
            "check: {}: {} reached {:?}; agent sockmap enabled {}; a {SMALL} B rr run of {} requests: redirects {}, inserts {}{}",
            s.name,
            s.target,
            r.names,
            d.get("enabled")
                .map_or("not reported".into(), |e| (*e == 1.0).to_string()),
            rr.requests,
            redirects.map_or("not exported".into(), |x| format!("+{x}")),
            d.get("inserts").map_or("-".into(), |x| format!("+{x}")),
            if ok {
                String::new()
            } else if want {
                "  MISMATCH: acceleration is on, but nothing was redirected".into()
            } else {
                "  MISMATCH: acceleration is off, but sends were redirected".into()
            }
        );
        out.insert(
            s.name.into(),
            json!({"reached": r.names, "rr_requests": rr.requests, "counters": d, "ok": ok}),
        );
    }
    Ok(Value::Object(out))
}

/// One run of `kind` for scenario `s` lasting `duration_ms`.
fn measure(ctx: &Ctx, s: &Scenario, kind: Kind, duration_ms: u64, repeat: u32) -> Result<Run> {
    check_interrupt()?;
    let args = args_of(kind, &s.target, duration_ms);
    let bound = Duration::from_millis(duration_ms + 3 * IO_TIMEOUT_MS) + Duration::from_secs(10);
    // No run inherits another's TIME_WAIT sockets (`ss -K`, CONFIG_INET_DIAG_DESTROY).
    static WARNED: std::sync::Once = std::sync::Once::new();
    for ns in [s.client.netns_name(), s.server.netns_name()] {
        flush_time_wait_in(ns, &WARNED);
    }
    super::mesh::wait_agents_idle(&ctx.pids())?;
    let agent = s.agent.map(|i| &ctx.agents[i]);
    let c0 = agent.map(sock_counters).transpose()?;
    let progs: Vec<(&str, u64)> = ctx
        .progs
        .iter()
        .filter(|(sc, _, _)| *sc == s.name)
        .map(|(_, n, id)| (*n, *id))
        .collect();
    let p0 = prog_stats(&progs);
    let a0 = agent.and_then(Agent::pid).and_then(proc_cpu);
    let cpu0 = children_cpu();
    let p = spawn(
        ctx,
        s,
        &format!("{}-{}-{repeat}", s.name, kind.name()),
        &args,
    )?;
    let outs = wait_all(vec![p], bound)?;
    let client_cpu_us = (children_cpu() - cpu0).as_secs_f64() * 1e6;
    let a1 = agent.and_then(Agent::pid).and_then(proc_cpu);
    let p1 = prog_stats(&progs);
    let c1 = agent.map(sock_counters).transpose()?;
    let programs = prog_deltas(&p0, &p1);
    let sockmap = match (&c0, &c1) {
        (Some(a), Some(b)) => counters_delta(a, b),
        _ => BTreeMap::new(),
    };
    let mut metrics = BTreeMap::new();
    let mut problems = Vec::new();
    let out = &outs[0];
    let (units, connects) = match kind {
        Kind::Rr64 | Kind::Rr1k => {
            let r: RrReport = serde_json::from_value(out.clone())?;
            if let Some(e) = &r.error {
                problems.push(e.clone());
            }
            if r.requests > 0 {
                let keys = if kind == Kind::Rr64 {
                    ["rr64_p50_us", "rr64_p99_us", "rr64_rps", "rr64_cpu_us"]
                } else {
                    ["rr1k_p50_us", "rr1k_p99_us", "rr1k_rps", "rr1k_cpu_us"]
                };
                let rps = r.requests as f64 * 1000.0 / r.duration_ms;
                let cpu = client_cpu_us / r.requests as f64;
                for (k, v) in keys.into_iter().zip([r.p50_us, r.p99_us, rps, cpu]) {
                    metrics.insert(k, v);
                }
            }
            (r.requests as f64, 1)
        }
        Kind::Crr => {
            let r = crr_metrics(out, client_cpu_us, &mut metrics, &mut problems)?;
            (r.connections as f64, r.connections + r.failed)
        }
        Kind::Bulk => {
            if let Some(e) = out["error"].as_str() {
                problems.push(e.to_string());
            }
            let mb = out["total_received_bytes"].as_f64().unwrap_or(0.0) / 1e6;
            if let Some(rate) = out["mb_per_s"].as_f64().filter(|r| *r > 0.0) {
                metrics.insert("bulk_mbps", rate);
                metrics.insert("bulk_gbps", rate * 8.0 / 1000.0);
                if let Some(sent) = out["sent_mb_per_s"].as_f64() {
                    metrics.insert("bulk_sent_mbps", sent);
                }
                // Written but not yet echoed back when the window closed: what the path buffered (TCP bounds
                // it by the socket buffers; a redirect that does not push back on the sender does not).
                if let (Some(sent), Some(got)) =
                    (out["sent_bytes"].as_f64(), out["received_bytes"].as_f64())
                {
                    metrics.insert("bulk_backlog_mb", (sent - got).max(0.0) / 1e6);
                }
                metrics.insert("bulk_cpu_us", client_cpu_us / mb);
            }
            (mb, 1)
        }
    };
    // Which path did the run take? sockmap-on: some sends redirected; sockmap-off: none.
    let redirects = sockmap.get("redirects").copied();
    match (s.sockmap, redirects) {
        (Some(true), Some(x)) if x <= 0.0 => {
            problems.push("MISMATCH: acceleration on, no send redirected".into())
        }
        (Some(true), None) => {
            problems.push("MISMATCH: the agent reports no redirect counter".into())
        }
        (Some(false), Some(x)) if x > 0.0 => {
            problems.push(format!("MISMATCH: acceleration off, {x} sends redirected"))
        }
        _ => {}
    }
    Ok(Run {
        repeat,
        scenario: s.name,
        kind,
        metrics,
        units,
        client_cpu_us,
        connects,
        programs,
        sockmap,
        agent_cpu_ms: match (a0, a1) {
            (Some(x), Some(y)) => Some(y.saturating_sub(x).as_secs_f64() * 1000.0),
            _ => None,
        },
        problems,
        raw: outs,
    })
}

/// The ids of an agent's programs of [`PROGRAMS`]: from `status` (the program behind each pinned link), and for
/// those it gives no id (programs attached to a map rather than through a link, like sk_msg) the kernel's program
/// of that name that uses one of the maps pinned under this agent's bpffs root.
fn agent_programs(agent: &Agent) -> Result<Vec<(&'static str, u64)>> {
    let st = agent.cli().status_value()?;
    let mut out = Vec::new();
    let mut missing = Vec::new();
    for name in PROGRAMS {
        let id = st["programs"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == name)
            .and_then(|p| p["program_id"].as_u64().or(p["id"].as_u64()));
        match id {
            Some(id) => out.push((name, id)),
            None => missing.push(name),
        }
    }
    if missing.is_empty() {
        return Ok(out);
    }
    let root = agent.options().bpffs_root.display().to_string();
    let bpftool = |args: &[&str]| -> Option<Value> {
        let o = sinew_tests::util::run("bpftool", args).ok()?;
        serde_json::from_slice(&o.stdout).ok()
    };
    // `-f`: every map with the paths it is pinned at.
    let maps: BTreeSet<u64> = bpftool(&["-f", "map", "show", "-j"])
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter(|m| {
            m["pinned"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|p| p.as_str().is_some_and(|p| p.starts_with(&root)))
        })
        .filter_map(|m| m["id"].as_u64())
        .collect();
    let progs = bpftool(&["prog", "show", "-j"])
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default();
    for name in missing {
        let found = progs
            .iter()
            .filter(|p| p["name"] == name)
            .filter(|p| {
                p["map_ids"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|m| m.as_u64().is_some_and(|m| maps.contains(&m)))
            })
            .filter_map(|p| p["id"].as_u64())
            .max();
        if let Some(id) = found {
            out.push((name, id));
        }
    }
    Ok(out)
}

/// Cumulative `(run_time_ns, run_cnt)` of the programs `progs` (name, id), from one `bpftool prog show -j`.
fn prog_stats(progs: &[(&'static str, u64)]) -> BTreeMap<&'static str, (u64, u64)> {
    if progs.is_empty() {
        return BTreeMap::new();
    }
    let Ok(out) = sinew_tests::util::run("bpftool", &["prog", "show", "-j"]) else {
        return BTreeMap::new();
    };
    let all: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
    progs
        .iter()
        .filter_map(|(name, id)| {
            let p = all.iter().find(|p| p["id"].as_u64() == Some(*id))?;
            Some((
                *name,
                (
                    p["run_time_ns"].as_u64().unwrap_or(0),
                    p["run_cnt"].as_u64().unwrap_or(0),
                ),
            ))
        })
        .collect()
}

/// Per scenario with an agent and program found: runs and ns per run over the measured runs, and the program's time
/// per unit of each kind (per request, connection or MB: what that unit of work cost in that program).
fn program_summary(
    ctx: &Ctx,
    scenarios: &[Scenario],
    runs: &[Run],
) -> BTreeMap<&'static str, BTreeMap<&'static str, Value>> {
    let mut out: BTreeMap<&str, BTreeMap<&str, Value>> = BTreeMap::new();
    for s in scenarios {
        for (_, name, id) in ctx.progs.iter().filter(|(sc, _, _)| *sc == s.name) {
            let sum = |kind: Option<Kind>| {
                runs.iter()
                    .filter(|r| r.scenario == s.name && kind.is_none_or(|k| r.kind == k))
                    .fold((0u64, 0u64, 0.0f64), |(n, t, u), r| {
                        let p = r.programs.get(name).copied().unwrap_or_default();
                        (n + p.runs, t + p.run_time_ns, u + r.units)
                    })
            };
            let (n, t, _) = sum(None);
            let mut v = json!({
                "program_id": id,
                "runs": n,
                "run_time_ns": t,
                "avg_ns": (n > 0).then(|| t as f64 / n as f64),
            });
            for k in Kind::ALL {
                let (_, kt, units) = sum(Some(k));
                v[format!("ns_per_{}_{}", k.name(), k.unit().to_lowercase())] =
                    json!((units > 0.0).then(|| kt as f64 / units));
            }
            out.entry(s.name).or_default().insert(name, v);
        }
    }
    out
}

fn render_programs(programs: &BTreeMap<&str, BTreeMap<&str, Value>>) -> String {
    if programs.is_empty() {
        return "\nSinew's programs: no kernel BPF statistics (BPF_ENABLE_STATS failed or no program found)\n".into();
    }
    let ns = |v: &Value| v.as_f64().map_or("-".into(), |x| format!("{x:.0}"));
    let mut out = format!(
        "\nSinew's programs (kernel bpf stats, measured runs; {NONE} has none): ns per program run, runs, and the \
         program's ns per unit of work:\n  {:<11} {:<14} {:>7} {:>9}  {:>13} {:>13} {:>14} {:>9}\n",
        "scenario",
        "program",
        "ns/run",
        "runs",
        "rr64 ns/req",
        "rr1k ns/req",
        "crr ns/conn",
        "bulk ns/MB"
    );
    for s in [OFF, ON] {
        let Some(p) = programs.get(s) else {
            continue;
        };
        for name in PROGRAMS {
            let Some(v) = p.get(name) else {
                continue;
            };
            out.push_str(&format!(
                "  {s:<11} {name:<14} {:>7} {:>9}  {:>13} {:>13} {:>14} {:>9}\n",
                ns(&v["avg_ns"]),
                v["runs"],
                ns(&v["ns_per_rr64_request"]),
                ns(&v["ns_per_rr1k_request"]),
                ns(&v["ns_per_crr_connection"]),
                ns(&v["ns_per_bulk_mb"]),
            ));
        }
    }
    out
}

/// After the runs: every measured sockmap-on run redirected sends, no sockmap-off run did, and the SockHash is
/// empty again; with the totals.
fn datapath_check(
    scenarios: &[Scenario],
    runs: &[Run],
    start: &[BTreeMap<&'static str, f64>],
    end: &[BTreeMap<&'static str, f64>],
) -> Value {
    let idx = |name: &str| {
        scenarios
            .iter()
            .find(|s| s.name == name)
            .and_then(|s| s.agent)
    };
    let total =
        |name: &str| idx(name).map_or_else(BTreeMap::new, |i| counters_delta(&start[i], &end[i]));
    let (on, off) = (total(ON), total(OFF));
    let on_runs: Vec<&Run> = runs.iter().filter(|r| r.scenario == ON).collect();
    let not_redirected: Vec<String> = on_runs
        .iter()
        .filter(|r| r.sockmap.get("redirects").is_none_or(|x| *x <= 0.0))
        .map(|r| format!("repeat {} {}", r.repeat + 1, r.kind.name()))
        .collect();
    let on_connects: u64 = on_runs.iter().map(|r| r.connects).sum();
    let measured_inserts: f64 = on_runs
        .iter()
        .filter_map(|r| r.sockmap.get("inserts"))
        .sum();
    let measured_redirects: f64 = on_runs
        .iter()
        .filter_map(|r| r.sockmap.get("redirects"))
        .sum();
    let g = |m: &BTreeMap<&str, f64>, k: &str| m.get(k).map_or("-".into(), |v| format!("{v:.0}"));
    let every = !on_runs.is_empty() && not_redirected.is_empty();
    let off_redirects = off.get("redirects").copied().unwrap_or(0.0);
    let off_inserts = off.get("inserts").copied().unwrap_or(0.0);
    let mut text = if every {
        format!(
            "datapath check: {ON} redirected sends in every measured run ({} runs, {measured_redirects:.0} sends; {measured_inserts:.0} sockets added for {on_connects} connects = {:.2} per connect; over the group, warm-ups included: misses {}, insert errors {}, {} MB redirected, sockets in the map at the end {})",
            on_runs.len(),
            if on_connects > 0 {
                measured_inserts / on_connects as f64
            } else {
                0.0
            },
            g(&on, "misses"),
            g(&on, "insert_errors"),
            on.get("redirected_bytes")
                .map_or("-".into(), |b| format!("{:.0}", b / 1e6)),
            g(&on, "connections"),
        )
    } else {
        format!(
            "datapath check: MISMATCH: {ON} redirected nothing in {} of {} measured runs ({})",
            not_redirected.len(),
            on_runs.len(),
            not_redirected.join(", "),
        )
    };
    text.push_str(&if off_redirects == 0.0 && off_inserts == 0.0 {
        format!(
            "; {OFF} redirected none and added no socket ({}); {NONE} has no agent",
            if off.contains_key("redirects") {
                "its counters stayed at 0"
            } else {
                "its agent exports no counter"
            }
        )
    } else {
        format!(
            "; MISMATCH: {OFF} redirected {off_redirects} sends and added {off_inserts} sockets"
        )
    });
    json!({
        "on_redirected_every_run": every,
        "on_runs_without_redirects": not_redirected,
        "on_measured": {"connects": on_connects, "inserts": measured_inserts, "redirects": measured_redirects},
        "on_group_delta": on,
        "off_group_delta": off,
        "text": text,
    })
}

/// Improvement of `on` over `off` for a metric: positive is better (lower latency, higher rate), as a fraction.
fn improvement(better: Better, off: f64, on: f64) -> f64 {
    match better {
        Better::Lower => 1.0 - on / off,
        Better::Higher => on / off - 1.0,
    }
}

/// The decision line: is sockmap-on at least [`GAIN`] better than sockmap-off in one of [`GAIN_METRICS`], with
/// none of [`GUARDED_METRICS`] worse by more than [`MAX_LOSS`]? From the medians; names the metric that decides.
fn decide(
    medians: &BTreeMap<&str, BTreeMap<&'static str, f64>>,
    spreads: &BTreeMap<&str, BTreeMap<&'static str, f64>>,
    redirected: bool,
) -> Value {
    let metric = |k: &str| LATENCY.iter().chain(RATES).find(|m| m.key == k);
    let change = |k: &'static str| -> Option<(&'static str, &'static str, f64)> {
        let m = metric(k)?;
        let off = *medians.get(OFF)?.get(k)?;
        let on = *medians.get(ON)?.get(k)?;
        (off != 0.0).then(|| (k, m.column, improvement(m.better, off, on)))
    };
    let gains: Vec<_> = GAIN_METRICS.iter().filter_map(|k| change(k)).collect();
    let guarded: Vec<_> = GUARDED_METRICS.iter().filter_map(|k| change(k)).collect();
    let best = gains.iter().copied().max_by(|a, b| a.2.total_cmp(&b.2));
    let worst = guarded.iter().copied().min_by(|a, b| a.2.total_cmp(&b.2));
    let pct = |x: f64| {
        if x >= 0.0 {
            format!("{:.1}% better", x * 100.0)
        } else {
            format!("{:.1}% worse", -x * 100.0)
        }
    };
    let noise = |k: &str| {
        [OFF, ON]
            .iter()
            .filter_map(|s| spreads.get(s).and_then(|m| m.get(k)))
            .fold(0.0f64, |a, b| a.max(*b))
    };
    let (verdict, decides, text) = match (best, worst) {
        _ if !redirected => (
            None,
            None,
            format!(
                "decision: not decidable: {ON} did not redirect in every run (see the datapath check)"
            ),
        ),
        (Some(b), Some(w)) => {
            let gain_ok = b.2 >= GAIN;
            let loss_ok = w.2 >= -MAX_LOSS;
            let (yes, d) = if !loss_ok {
                (false, w)
            } else if !gain_ok {
                (false, b)
            } else {
                (true, b)
            };
            let others: Vec<String> = gains
                .iter()
                .filter(|g| g.0 != b.0)
                .map(|g| format!("{} {}", g.1, pct(g.2)))
                .collect();
            let least = if w.2 >= 0.0 {
                "least improved"
            } else {
                "worst"
            };
            let why = if yes {
                format!(
                    "{}, {} (>= {:.0}%; {}); nothing worse by more than {:.0}% ({least}: {}, {})",
                    b.1,
                    pct(b.2),
                    GAIN * 100.0,
                    others.join(", "),
                    MAX_LOSS * 100.0,
                    w.1,
                    pct(w.2)
                )
            } else if !loss_ok {
                format!(
                    "{}, {} (limit {:.0}%); best gain: {}, {}",
                    w.1,
                    pct(w.2),
                    MAX_LOSS * 100.0,
                    b.1,
                    pct(b.2)
                )
            } else {
                format!(
                    "{}, {}, the best gain (needs >= {:.0}%; {}); {least}: {}, {}",
                    b.1,
                    pct(b.2),
                    GAIN * 100.0,
                    others.join(", "),
                    w.1,
                    pct(w.2)
                )
            };
            // How far the deciding metric is from the threshold it was judged against, and how far its repeats
            // spread: a spread beyond that distance means a rerun may decide otherwise.
            let margin = if d.0 == w.0 && !loss_ok {
                (w.2 + MAX_LOSS).abs()
            } else {
                (d.2 - GAIN).abs()
            };
            let n = noise(d.0);
            (
                Some(yes),
                Some(d.0),
                format!(
                    "decision: {ON} vs {OFF} (medians): {} -- decided by {why}{}",
                    if yes { "YES" } else { "NO" },
                    if n > margin {
                        format!(
                            "  [its repeats spread up to {:.0}%, more than its {:.0}-point distance from the threshold: a rerun may decide otherwise]",
                            n * 100.0,
                            margin * 100.0
                        )
                    } else {
                        String::new()
                    }
                ),
            )
        }
        _ => (
            None,
            None,
            "decision: not decidable: metrics missing".to_string(),
        ),
    };
    json!({
        "rule": format!("{ON} >= {:.0}% better than {OFF} in one of {GAIN_METRICS:?}, and none of {GUARDED_METRICS:?} more than {:.0}% worse (medians)", GAIN * 100.0, MAX_LOSS * 100.0),
        "improvement_on_over_off": guarded.iter().chain(&gains).map(|(k, _, v)| (*k, *v)).collect::<BTreeMap<_, _>>(),
        "yes": verdict,
        "decided_by": decides,
        "text": text,
    })
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
    let mut rows: Vec<Row> = Vec::new();
    for c in comparisons {
        rows.push((
            format!("{} ratio", c.label),
            Box::new(move |m| ratio_cell(&c.ratios, m)),
        ));
        rows.push((
            format!("{} paired", c.label),
            Box::new(move |m| ratio_cell(&c.paired, m)),
        ));
    }
    render_grid(names, &cols, medians, spreads, &rows, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn medians(
        off: &[(&'static str, f64)],
        on: &[(&'static str, f64)],
    ) -> BTreeMap<&'static str, BTreeMap<&'static str, f64>> {
        BTreeMap::from([
            (OFF, off.iter().copied().collect()),
            (ON, on.iter().copied().collect()),
        ])
    }

    const BASE: [(&str, f64); 6] = [
        ("rr64_p50_us", 20.0),
        ("rr64_p99_us", 40.0),
        ("rr1k_p50_us", 22.0),
        ("rr1k_p99_us", 44.0),
        ("crr_cps", 5000.0),
        ("bulk_mbps", 1000.0),
    ];

    fn with(changes: &[(&'static str, f64)]) -> Vec<(&'static str, f64)> {
        BASE.iter()
            .map(|(k, v)| {
                (
                    *k,
                    changes.iter().find(|(c, _)| c == k).map_or(*v, |(_, x)| *x),
                )
            })
            .collect()
    }

    #[test]
    fn decision_needs_a_gain_and_no_loss() {
        let none = BTreeMap::new();
        // 15% lower p50 at 64 B, nothing else moved: yes, decided by rr64 p50.
        let d = decide(
            &medians(&BASE, &with(&[("rr64_p50_us", 17.0)])),
            &none,
            true,
        );
        assert_eq!(d["yes"], true);
        assert_eq!(d["decided_by"], "rr64_p50_us");
        assert!(
            d["text"]
                .as_str()
                .is_some_and(|t| t.contains("YES -- decided by rr64 p50, 15.0% better")),
            "{d}"
        );
        // The same gain, but 5% fewer connections per second: no, decided by crr.
        let d = decide(
            &medians(&BASE, &with(&[("rr64_p50_us", 17.0), ("crr_cps", 4750.0)])),
            &none,
            true,
        );
        assert_eq!(d["yes"], false);
        assert_eq!(d["decided_by"], "crr_cps");
        // 8% more bulk throughput only: no, decided by the best gain.
        let d = decide(
            &medians(&BASE, &with(&[("bulk_mbps", 1080.0)])),
            &none,
            true,
        );
        assert_eq!(d["yes"], false);
        assert_eq!(d["decided_by"], "bulk_mbps");
        // Without redirects there is nothing to decide.
        let d = decide(
            &medians(&BASE, &with(&[("bulk_mbps", 2000.0)])),
            &none,
            false,
        );
        assert!(d["yes"].is_null());
    }
}
