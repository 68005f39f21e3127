//! `cargo xtask bench`: the same client and server measured without Sinew, through a Sinew Service VIP, and
//! through the same VIP with 1,000 `AuthorizationPolicy` objects in force, side by side in one run (the
//! single-node group, this file); then, on a second topology, without Sinew, kernel-only and through both node
//! proxies with mTLS across two nodes (the mesh group, [`mesh`]); then, on a third, a client and a server on one
//! node without Sinew, with same-node socket acceleration off and with it on (the same-node group, [`sockmap`]).
//! `--only single-node|mesh|same-node` runs one group; the JSON report holds the single-node group's fields at the
//! top level, the mesh group's under `mesh` and the same-node group's under `same_node`.
//!
//! Topology (the `sinew-tests` harness): one node netns with a bridge, pod `client` (namespace `bench-client`,
//! service account `bench-client`) and pod `server` (running `sinew-testpod echo-server`), the agent attached at
//! the node's cgroup root, and a Service `bench` whose one backend is the server. The client runs in two cgroups:
//! - `meshed`: the client pod's own cgroup, under the agent's cgroup root, so Sinew's programs run on its connects;
//! - `plain`: a sibling of the node's cgroup root (`/sys/fs/cgroup/unified/<id>-plain`), so no Sinew program runs.
//!
//! Both run in the client pod's network namespace and reach the same server process over the same veths and
//! bridge. Scenarios:
//! - `direct`: plain client -> server pod IP:8080;
//! - `sinew-vip`: meshed client -> VIP:80, rewritten by Sinew at `connect()` to the server pod IP:8080;
//! - `sinew-vip-1k-policies` (unless `--policies 0`): the same as `sinew-vip`, with the policies in force: a
//!   handful that select the server (an ALLOW naming the client's principal and port 8080, DENYs that never match
//!   the bench), and the rest spread over ~100 namespaces of a synthetic cluster (pods on other nodes) without
//!   selecting a bench pod. So every connect of this scenario goes through the policy lookups on both ends.
//!
//! Policies are a property of the agent's source directory, so the policy scenario is measured with one policy
//! file written into it and the two others with that file removed; each switch waits until the agent's
//! `sinew_policy_revision` moved and `/debug/policies` shows the expected set, then until the agent is idle again.
//!
//! Per repeat every measurement runs every scenario back to back in a counterbalanced order; the report is the
//! median over the repeats, and ratios of medians and medians of per-repeat ratios. Nothing is asserted: the
//! numbers are printed and written as JSON.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde_json::{Value, json};
use sinew_tests::manifest::{authorization_policy, to_yaml};
use sinew_tests::testpod::{
    ConnectReport, CrrReport, PROBE_EACCES, PROBE_OK, ProbeReport, RrReport,
};
use sinew_tests::{
    Agent, Cgroup, PodManifest, Proc, ProcOutput, Service, ServicePort, SourceDir, Topology,
};

use crate::os::{check_interrupt, children_cpu, proc_cpu, sleep_interruptible};

/// [`Measured`] for a run type with `repeat`, `scenario` and `metrics` fields (both groups' `Run`).
macro_rules! measured {
    ($run:ty) => {
        impl $crate::bench::Measured for $run {
            fn repeat(&self) -> u32 {
                self.repeat
            }
            fn scenario(&self) -> &str {
                self.scenario
            }
            fn metrics(&self) -> &BTreeMap<&'static str, f64> {
                &self.metrics
            }
        }
    };
}

mod mesh;
mod sockmap;

#[derive(Clone, clap::Args)]
pub struct BenchArgs {
    /// Repeats of every measurement per scenario; medians over them are reported. Default: 3 in the single-node and
    /// mesh groups, 6 (one full cycle of the counterbalanced order) in the same-node group.
    #[arg(long = "repeats", value_name = "REPEATS", value_parser = clap::value_parser!(u32).range(1..=25))]
    repeats_arg: Option<u32>,
    /// The repeats of the group being run: `--repeats`, or the group's default (set by `run_groups`).
    #[arg(skip)]
    repeats: u32,
    /// Length of each measured run, in milliseconds.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(100..=30_000))]
    duration_ms: u64,
    /// Connections of the loaded request/response run (one client process each); 0 skips that run.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(0..=64))]
    conns: u32,
    /// AuthorizationPolicies in force in the policy scenario (at least 6: the ones that select the server); 0 skips
    /// that scenario.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(0..=5000))]
    policies: u32,
    /// Also write the JSON report here (it always goes to target/bench/bench-<unix-ts>.json and latest.json).
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Same-node group: the CPU every client and server runs on (`taskset`), so that a request/response never
    /// waits for a cross-CPU wake-up (on a VM that costs ~80 µs and flips run to run with the scheduler's
    /// placement); `free` lets the scheduler place them. Default: the last CPU.
    #[arg(long, value_name = "CPU|free")]
    same_node_cpu: Option<String>,
    /// Run only one group of scenarios: `single-node` (direct, sinew-vip, the policy scenario), `mesh` (direct,
    /// kernel-only and mTLS across two nodes) or `same-node` (no Sinew, Sinew with same-node socket acceleration
    /// off, and on). Default: all three, one after the other.
    #[arg(long, value_enum)]
    only: Option<Group>,
}

/// The groups of scenarios `--only` picks from; each builds its own topology.
#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
enum Group {
    SingleNode,
    Mesh,
    SameNode,
}

impl Group {
    const ALL: [Group; 3] = [Group::SingleNode, Group::Mesh, Group::SameNode];

    /// Repeats without `--repeats`. The same-node group's runs are short and its scenarios close: six repeats make
    /// one full cycle of [`ORDERS3`], and their median survives the one or two runs a burst of other work on the
    /// shared host slows down (it runs in about four minutes).
    fn default_repeats(self) -> u32 {
        match self {
            Group::SingleNode | Group::Mesh => 3,
            Group::SameNode => 6,
        }
    }

    /// The arguments for this group: `a` with its repeats resolved.
    fn args(self, a: &BenchArgs) -> BenchArgs {
        BenchArgs {
            repeats: a.repeats_arg.unwrap_or(self.default_repeats()),
            ..a.clone()
        }
    }

    fn name(self) -> &'static str {
        match self {
            Group::SingleNode => "single-node",
            Group::Mesh => "mesh",
            Group::SameNode => "same-node",
        }
    }
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
/// The target: sinew-vip within this fraction of direct (and the policy scenario within it of both).
const TARGET: f64 = 0.03;

const DIRECT: &str = "direct";
const SINEW_VIP: &str = "sinew-vip";
/// The client pod's identity, which the bench's ALLOW names: `cluster.local/ns/bench-client/sa/bench-client`.
const CLIENT_NS: &str = "bench-client";
const CLIENT_SA: &str = "bench-client";
const SERVER_SA: &str = "bench-server";
/// A third pod, in the namespace the bench's DENY names; only the sanity check uses it.
const INTRUDER_NS: &str = "bench-intruder";
const INTRUDER_SA: &str = "intruder";
/// The agent's mesh root namespace (its default): policies there apply to every namespace.
const ROOT_NS: &str = "sinew-system";
/// The file the policy scenario's policies live in (written for it, removed for the others).
const POLICY_FILE: &str = "policies-bench.yaml";
/// Pods of the synthetic cluster the other policies are about (on other nodes; always present).
const CLUSTER_FILE: &str = "pods-cluster.yaml";
/// Policies per namespace of the synthetic cluster, and replicas of each of its two workloads per namespace.
const POLICIES_PER_NS: usize = 10;
const REPLICAS: usize = 3;
/// How long the agent may take to put the policy set in force or take it out.
const POLICY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long to wait for the agent to go idle after a policy switch (and, in the mesh group, for both agents before a run).
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// The programs whose kernel run-time statistics are taken around every run.
const PROGRAMS: [&str; 2] = ["connect4", "policy_ingress"];
/// Orders of three scenarios, one per repeat in turn: a Williams design, so over six repeats every scenario runs
/// first, second and third equally often and right after each other scenario equally often, and over every three
/// repeats each runs first once (the first run of a kind follows the CPU-saturating `rrN` or `crr` run).
const ORDERS3: [[usize; 3]; 6] = [
    [0, 1, 2],
    [1, 2, 0],
    [2, 0, 1],
    [2, 1, 0],
    [0, 2, 1],
    [1, 0, 2],
];

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

/// One side of a comparison: which cgroup the client runs in, where it connects, and whether the policy set is in
/// force.
struct Scenario {
    name: &'static str,
    description: String,
    cgroup: PathBuf,
    target: String,
    /// The policy file is in the agent's source directory (and in force) while this scenario runs.
    policies: bool,
    /// Its connects go through the VIP (and so are counted by `sinew_service_balanced_total`).
    via_vip: bool,
}

/// A run's metrics for its progress line: `key=value ...`.
fn metrics_line(metrics: &BTreeMap<&'static str, f64>) -> String {
    metrics
        .iter()
        .map(|(k, v)| format!("{k}={v:.1}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A run's programs for its progress line: ` name=<ns per run>ns ...` (programs that ran).
fn programs_line(programs: &BTreeMap<&'static str, ProgDelta>) -> String {
    programs
        .iter()
        .filter(|(_, p)| p.runs > 0)
        .map(|(n, p)| format!(" {n}={:.0}ns", p.run_time_ns as f64 / p.runs as f64))
        .collect()
}

/// Each program's runs and run time between two readings of (run time ns, runs) by program name.
fn prog_deltas(
    before: &BTreeMap<&'static str, (u64, u64)>,
    after: &BTreeMap<&'static str, (u64, u64)>,
) -> BTreeMap<&'static str, ProgDelta> {
    after
        .iter()
        .filter_map(|(name, (t1, n1))| {
            let (t0, n0) = before.get(name)?;
            Some((
                *name,
                ProgDelta {
                    runs: n1.saturating_sub(*n0),
                    run_time_ns: t1.saturating_sub(*t0),
                },
            ))
        })
        .collect()
}

/// Kernel run-time statistics of one program over one run (`BPF_ENABLE_STATS`).
#[derive(Clone, Copy, Default, Serialize)]
struct ProgDelta {
    runs: u64,
    run_time_ns: u64,
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
    /// Connects the run made (each passes `connect4` once in the VIP scenarios, failed or not).
    connects: u64,
    /// Sinew's programs over the run, by name (empty without BPF statistics).
    programs: BTreeMap<&'static str, ProgDelta>,
    /// The agent's CPU over the run, milliseconds (clock-tick resolution).
    agent_cpu_ms: Option<f64>,
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
        spawn_client(
            &self.testpod,
            cgroup,
            &self.netns,
            &self.log_dir,
            label,
            args,
        )
    }
}

/// Starts `testpod <args>` in the pod netns `netns` and in `cgroup`, its output logged under `log_dir`.
fn spawn_client(
    testpod: &Path,
    cgroup: &Path,
    netns: &Path,
    log_dir: &Path,
    label: &str,
    args: &[String],
) -> Result<Proc> {
    let mut cmd = Command::new(testpod);
    cmd.args(args);
    sinew_tests::sys::enter_pod(&mut cmd, &cgroup.join("cgroup.procs"), netns)?;
    Proc::spawn(label, cmd, log_dir)
}

/// Waits for every client of a run, each bounded by `bound`, and returns what each printed.
fn wait_all(procs: Vec<Proc>, bound: Duration) -> Result<Vec<Value>> {
    let mut outs = Vec::new();
    for p in procs {
        // Only these children are reaped in between, so the rusage difference is exactly their CPU time.
        let r = wait_json(p, bound);
        check_interrupt()?;
        outs.push(r?.1);
    }
    Ok(outs)
}

/// The arguments of a `rr` or `crr` client run (`cap_flag`: its cap on requests or connections) to `target`.
fn load_args(sub: &str, cap_flag: &str, target: &str, duration_ms: u64) -> Vec<String> {
    [
        sub,
        "--to",
        target,
        "--size",
        &SIZE.to_string(),
        "--duration-ms",
        &duration_ms.to_string(),
        cap_flag,
        // The tool's own hard cap: the run is bounded by the duration, this only bounds a runaway.
        "1000000",
        "--timeout-ms",
        &IO_TIMEOUT_MS.to_string(),
    ]
    .map(String::from)
    .to_vec()
}

/// The `crr` metrics of a run whose clients used `cpu_us` of CPU; failed connections go to `problems`.
fn crr_metrics(
    out: &Value,
    cpu_us: f64,
    metrics: &mut BTreeMap<&'static str, f64>,
    problems: &mut Vec<String>,
) -> Result<CrrReport> {
    let r: CrrReport = serde_json::from_value(out.clone())?;
    if r.failed > 0 {
        problems.push(format!("{} failed connections: {:?}", r.failed, r.errors));
    }
    if r.connections > 0 {
        metrics.insert("crr_cps", r.conns_per_sec);
        metrics.insert("crr_p50_us", r.p50_us);
        metrics.insert("crr_cpu_us", cpu_us / r.connections as f64);
    }
    Ok(r)
}

/// `net.ipv4.tcp_tw_reuse=1` in the netns `ns`.
fn tcp_tw_reuse(ns: &str) -> Result<()> {
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
    Ok(())
}

/// Destroys the TIME_WAIT sockets in the netns `ns` (`ss -K`); the first failure `warned` sees is noted.
fn flush_time_wait_in(ns: &str, warned: &std::sync::Once) {
    let r = sinew_tests::util::run(
        "ip",
        &["netns", "exec", ns, "ss", "-K", "-t", "state", "time-wait"],
    );
    if let Err(e) = r {
        warned.call_once(|| {
            eprintln!("  note: could not flush TIME_WAIT sockets ({e:#}); runs continue without")
        });
    }
}

/// What is read around every run: the kernel statistics of Sinew's programs and the agent's CPU.
struct Watch {
    /// (name, program id) of the programs in [`PROGRAMS`] the agent reported.
    progs: Vec<(&'static str, u64)>,
    agent_pid: Option<u32>,
}

/// Cumulative program statistics `(run_time_ns, run_cnt)` by name, and the agent's CPU time.
type Snapshot = (BTreeMap<&'static str, (u64, u64)>, Option<Duration>);

impl Watch {
    fn snapshot(&self) -> Snapshot {
        let progs = self
            .progs
            .iter()
            .filter_map(|(name, id)| prog_stats(*id).map(|s| (*name, s)))
            .collect();
        (progs, self.agent_pid.and_then(proc_cpu))
    }
}

fn wait_json(p: Proc, bound: Duration) -> Result<(ProcOutput, Value)> {
    let out = p.wait(bound)?;
    let v: Value = out.json()?;
    Ok((out, v))
}

pub fn bench(agent_bin: &Path, a: &BenchArgs) -> Result<()> {
    crate::os::install_interrupt_handler()?;
    // As in the demo: the guards are locals of `run` and `bench_mesh::run`, so everything is cleaned up when they
    // return.
    crate::os::explain_interrupt(run_groups(agent_bin, a))
}

/// The single-node group, then the mesh group, then the same-node group (or the one `--only` names); one JSON report
/// for all: the single-node group's fields at the top level (as before the other groups existed), the mesh group's
/// under `mesh`, the same-node group's under `same_node`.
fn run_groups(agent_bin: &Path, a: &BenchArgs) -> Result<()> {
    let testpod = crate::demo::preflight(agent_bin)?;
    let started = sinew_tests::unix_ms() / 1000;
    let groups: Vec<Group> = Group::ALL
        .into_iter()
        .filter(|g| a.only.is_none_or(|o| o == *g))
        .collect();
    let mut report = if groups.contains(&Group::SingleNode) {
        run(&Group::SingleNode.args(a), &testpod)?
    } else {
        json!({})
    };
    report["version"] = json!(3);
    report["unix_ts"] = json!(started);
    report["groups"] = json!(groups.iter().map(|g| g.name()).collect::<Vec<_>>());
    if groups.contains(&Group::Mesh) {
        if a.only.is_none() {
            println!("\n=== mesh group: mTLS across two nodes ===\n");
        }
        report["mesh"] = mesh::run(&Group::Mesh.args(a), &testpod)?;
    }
    if groups.contains(&Group::SameNode) {
        if a.only.is_none() {
            println!("\n=== same-node group: socket acceleration off and on ===\n");
        }
        report["same_node"] = sockmap::run(&Group::SameNode.args(a), &testpod)?;
    }
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
    Ok(())
}

/// The single-node group; returns its JSON report.
fn run(a: &BenchArgs, testpod: &Path) -> Result<Value> {
    let testpod = testpod.to_path_buf();
    let n_policies = a.policies as usize;
    if n_policies > 0 && n_policies < BENCH_POLICIES {
        bail!(
            "--policies {n_policies}: at least {BENCH_POLICIES} (the ones that select the server), or 0 to skip that scenario"
        );
    }
    let with_policies = n_policies > 0;
    let started = sinew_tests::unix_ms() / 1000;
    let load_start = loadavg();

    let mut pods = vec!["client", "server"];
    if with_policies {
        pods.push("intruder");
    }
    let mut builder = Topology::builder("bench")
        .testpod_bin(&testpod)
        .node(NODE, &pods)
        .pod_namespace("client", CLIENT_NS);
    if with_policies {
        builder = builder.pod_namespace("intruder", INTRUDER_NS);
    }
    let topo = builder.build().context("building the bench topology")?;
    let node = topo.node(NODE);
    let client = topo.pod("client");
    let server = topo.pod("server");
    // The baseline's cgroup: a sibling of the agent's cgroup root, so no Sinew program is in its effective set.
    let plain = Cgroup::new(&format!("{}-plain", topo.id()))?;
    for ns in [client.netns_name(), server.netns_name()] {
        // New connection per request piles up TIME_WAIT sockets on the client; without reuse the crr runs stall
        // on port allocation and turn bimodal. Same setting for every scenario.
        tcp_tw_reuse(ns)?;
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
            .service_account(SERVER_SA)
            .container_port(SERVER_PORT)
            .to_value()],
    )?;
    source.write(
        "pod-client.yaml",
        &[PodManifest::new(&client)
            .label("app", "client")
            .service_account(CLIENT_SA)
            .to_value()],
    )?;
    // The policy scenario's world: the intruder pod and the synthetic cluster's pods are there in every scenario
    // (without policies they cost the kernel nothing: the check stops at `pol_state.enabled`); only the policies
    // come and go.
    let namespaces = n_policies
        .saturating_sub(BENCH_POLICIES)
        .div_ceil(POLICIES_PER_NS)
        .max(1);
    let intruder = with_policies.then(|| topo.pod("intruder"));
    if let Some(intruder) = &intruder {
        source.write(
            "pod-intruder.yaml",
            &[PodManifest::new(intruder)
                .label("app", "intruder")
                .service_account(INTRUDER_SA)
                .to_value()],
        )?;
        source.write(CLUSTER_FILE, &cluster_pods(namespaces))?;
    }
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
    let policy_name: &'static str = if n_policies == 1000 {
        "sinew-vip-1k-policies"
    } else {
        Box::leak(format!("sinew-vip-{n_policies}-policies").into_boxed_str())
    };
    let mut scenarios = vec![
        Scenario {
            name: DIRECT,
            description: "client in a cgroup outside the agent's root -> server pod IP:8080 (no Sinew)".into(),
            cgroup: plain.path().to_path_buf(),
            target: format!("{}:{SERVER_PORT}", server.ip4),
            policies: false,
            via_vip: false,
        },
        Scenario {
            name: SINEW_VIP,
            description: "client in a pod cgroup under the agent's root -> Service VIP:80, balanced by Sinew to the same server; no policy in force".into(),
            cgroup: client.cgroup_dir().to_path_buf(),
            target: format!("{VIP}:{VIP_PORT}"),
            policies: false,
            via_vip: true,
        },
    ];
    if with_policies {
        scenarios.push(Scenario {
            name: policy_name,
            description: format!(
                "as sinew-vip, with {n_policies} AuthorizationPolicies in force ({BENCH_POLICIES} select the server: the client's connect and the server's SYN are both judged)"
            ),
            cgroup: client.cgroup_dir().to_path_buf(),
            target: format!("{VIP}:{VIP_PORT}"),
            policies: true,
            via_vip: true,
        });
    }
    sanity_checks(&clients, &scenarios[0], &scenarios[1])?;

    let server_key = format!("{}/{}", server.namespace, server.name);
    let mut policy_objects = bench_policies(&server.namespace, server.host_ip);
    let n_selecting = policy_objects.len();
    policy_objects.extend(cluster_policies(
        n_policies.saturating_sub(BENCH_POLICIES),
        namespaces,
    ));
    let mut policy_set = PolicySet {
        source: &source,
        text: policy_objects
            .iter()
            .map(to_yaml)
            .collect::<Vec<_>>()
            .join("---\n"),
        count: policy_objects.len(),
        selecting: policy_objects[..n_selecting]
            .iter()
            .map(|p| {
                format!(
                    "{}/{}",
                    p["metadata"]["namespace"].as_str().unwrap_or_default(),
                    p["metadata"]["name"].as_str().unwrap_or_default()
                )
            })
            .collect(),
        server_key: server_key.clone(),
        in_force: false,
        on: Vec::new(),
        off: Vec::new(),
        rss_before_kib: None,
        status: None,
    };
    let mut policy_check = Value::Null;
    if let Some(intruder) = &intruder {
        println!(
            "policies: putting {} in force ({} KiB of YAML, {namespaces} namespaces of a synthetic cluster with {} pods on other nodes)",
            policy_set.count,
            policy_set.text.len() / 1024,
            namespaces * 2 * REPLICAS
        );
        policy_set.set(&agent, true)?;
        let t = &policy_set.on[0];
        println!(
            "policies: in force {:.0} ms after the file was written (agent idle again after {:.0} ms more): {}",
            t.ms,
            t.settle_ms,
            policy_set
                .status
                .as_ref()
                .map_or(String::new(), |s| s.to_string())
        );
        policy_check = policy_sanity(&agent, &clients, &scenarios[2], intruder, &server)?;
    }

    note_if_busy(&loadavg(), "the bench");
    let names: Vec<&str> = scenarios.iter().map(|s| s.name).collect();
    let order_text = if scenarios.len() == 3 {
        format!(
            "per repeat, each kind runs the scenarios in the order of a Williams design over ({}): 012, 120, 201, 210, 021, 102 (repeat r uses r mod 6)",
            names.join(", ")
        )
    } else {
        format!(
            "per repeat and kind: {}, {} in even repeats, reversed in odd ones",
            names[0], names[1]
        )
    };
    println!(
        "bench: {} repeats x {} ms, {SIZE} B request/response, {} parallel conns; {order_text}",
        a.repeats, a.duration_ms, a.conns
    );
    let kinds: Vec<Kind> = [Kind::Rr, Kind::RrN, Kind::Crr]
        .into_iter()
        .filter(|k| *k != Kind::RrN || a.conns > 0)
        .collect();
    // The exact cost of Sinew on this path: the kernel's own count and run time of its programs, read around every
    // run. Untyped, accepting `program_id` (what the agent prints) or `id` (what docs/agent-contract.md's example
    // still shows), so a rename on either side does not silently drop the measurement.
    let status = agent.cli().status_value()?;
    let prog_ids: Vec<(&'static str, u64)> = PROGRAMS
        .iter()
        .filter_map(|name| {
            status["programs"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|p| p["name"] == *name)
                .and_then(|p| p["program_id"].as_u64().or(p["id"].as_u64()))
                .map(|id| (*name, id))
        })
        .collect();
    let stats_fd = match crate::os::enable_bpf_stats() {
        Ok(fd) => Some(fd),
        Err(e) => {
            eprintln!("  note: BPF_ENABLE_STATS failed ({e}); no per-program run times");
            None
        }
    };
    let watch = Watch {
        progs: if stats_fd.is_some() {
            prog_ids
        } else {
            Vec::new()
        },
        agent_pid: agent.pid(),
    };
    let balanced_before = balanced(&agent)?;
    let verdicts_before = verdicts(&agent)?;
    let agent_cpu_before = agent.pid().and_then(proc_cpu);
    // Connects through the VIP (every one balanced) and, of those, the ones made with the policies in force (every
    // one judged at the client's connect and at the server's SYN), warm-ups included.
    let mut vip_connects = 0u64;
    let mut policy_connects = 0u64;
    let mut run_one = |s: &Scenario,
                       k: Kind,
                       ms: u64,
                       rep: u32,
                       srv: Proc,
                       policy_set: &mut PolicySet|
     -> Result<(Run, Proc)> {
        check_interrupt()?;
        // Every run starts after a 250 ms window in which the agent was idle: right after a policy switch (which
        // waits for that itself) as after any other run.
        if !(with_policies && policy_set.set(&agent, s.policies)?) {
            wait_agent_idle(&agent)?;
        }
        let srv = ensure_server(&server, srv)?;
        let r = measure(&clients, s, k, ms, a.conns, rep, &watch)?;
        if s.via_vip {
            vip_connects += r.connects;
        }
        if s.policies {
            policy_connects += r.connects;
        }
        Ok((r, srv))
    };
    // Warm-up: one short unrecorded run of each kind and scenario; the policy scenario first, while its policies
    // are still in force from the check above.
    for s in scenarios.iter().rev() {
        for k in &kinds {
            (_, srv) = run_one(s, *k, WARMUP_MS, 0, srv, &mut policy_set)?;
        }
    }
    let mut runs: Vec<Run> = Vec::new();
    for rep in 0..a.repeats {
        // Counterbalanced (see ORDERS3): a position effect (the run after a CPU-saturating one may find the shared
        // host's CPU budget spent; one early a,b-only run had sinew-vip, always second, lower in all three
        // 16-connection repeats) lands on every side alike.
        let order: Vec<&Scenario> = if scenarios.len() == 3 {
            ORDERS3[rep as usize % 6]
                .iter()
                .map(|&i| &scenarios[i])
                .collect()
        } else if rep % 2 == 0 {
            scenarios.iter().collect()
        } else {
            scenarios.iter().rev().collect()
        };
        for k in &kinds {
            for s in order.iter().copied() {
                let (r, next) = run_one(s, *k, a.duration_ms, rep, srv, &mut policy_set)?;
                srv = next;
                eprintln!(
                    "  repeat {} {:<w$} {:<4} {}{}{}",
                    rep + 1,
                    s.name,
                    kind_name(*k),
                    metrics_line(&r.metrics),
                    programs_line(&r.programs),
                    if r.problems.is_empty() {
                        String::new()
                    } else {
                        format!("  PROBLEMS: {}", r.problems.join("; "))
                    },
                    w = policy_name.len().max(SINEW_VIP.len())
                );
                runs.push(r);
            }
        }
    }
    let balanced_delta = balanced(&agent)? - balanced_before;
    let verdicts_after = verdicts(&agent)?;
    drop(stats_fd);
    let agent_cpu = match (agent_cpu_before, agent.pid().and_then(proc_cpu)) {
        (Some(b), Some(e)) => Some(e.saturating_sub(b)),
        _ => None,
    };
    // Steady-state RSS is what a node pays; the peak comes from parsing kernel BTF once at load time.
    let agent_rss = agent.pid().and_then(|p| proc_status_kib(p, "VmHWM:"));
    let agent_rss_now = agent.pid().and_then(|p| proc_status_kib(p, "VmRSS:"));
    // Leave the source directory as the agent started with it (the file is gone with the topology anyway).
    if with_policies {
        policy_set.set(&agent, false)?;
    }
    drop(srv);

    // Medians, spreads, ratios, target checks.
    let all: Vec<&Metric> = METRICS.iter().collect();
    let (medians, spreads) = medians_and_spreads(&names, &all, &runs);
    let mut pairs = vec![("vip/direct", DIRECT, SINEW_VIP)];
    if with_policies {
        pairs.push(("pol/vip", SINEW_VIP, policy_name));
        pairs.push(("pol/direct", DIRECT, policy_name));
    }
    let comparisons: Vec<Comparison> = pairs
        .into_iter()
        .map(|(label, x, y)| compare(label, x, y, &all, &medians, &runs, a.repeats))
        .collect();
    let summary = Summary {
        medians: &medians,
        comparisons: &comparisons,
        spreads: &spreads,
    };
    let table = render_table(&scenarios, &summary);
    println!("\n{table}");

    let mut checks = Vec::new();
    checks.push(if balanced_delta == vip_connects as f64 {
        format!(
            "datapath check: Sinew balanced {balanced_delta} connects = the VIP scenarios' connects; direct runs added none"
        )
    } else {
        format!(
            "datapath check: MISMATCH: sinew_service_balanced_total grew by {balanced_delta}, the VIP scenarios made {vip_connects} connects"
        )
    });
    let verdict_delta: BTreeMap<&str, f64> = VERDICTS
        .iter()
        .enumerate()
        .map(|(i, (key, _, _))| (*key, verdicts_after[i] - verdicts_before[i]))
        .collect();
    if with_policies {
        let (eg, ing) = (
            verdict_delta["egress/allow"],
            verdict_delta["ingress/allow"],
        );
        let denied = verdict_delta["egress/deny"] + verdict_delta["ingress/deny"];
        let pc = policy_connects as f64;
        checks.push(format!(
            "policy check: the kernel judged {eg} connects at the client (egress allow) and {ing} SYNs at the server (ingress allow) for the {pc} connects made with the policies in force{}; denied {denied}{}",
            if eg == pc && ing == pc {
                " (every one, on both ends)"
            } else if eg == pc && ing > pc {
                " (every one on both ends; the extra ingress verdicts are retransmitted SYNs)"
            } else {
                " (MISMATCH: not every connect went through the policy path)"
            },
            if denied == 0.0 {
                ""
            } else {
                " (MISMATCH: the bench itself was denied)"
            }
        ));
    }
    for c in &checks {
        println!("{c}");
    }
    let programs = program_summary(&scenarios, &runs, &watch);
    if !watch.progs.is_empty() {
        print!("{}", render_programs(&scenarios, &programs));
    }
    if let Some(c) = agent_cpu {
        println!(
            "agent: {} CPU during the measurements (it is not on the data path), RSS {} KiB (peak {} KiB, at load)",
            if c.is_zero() {
                "< 10 ms".to_string()
            } else {
                format!("{:.0} ms", c.as_secs_f64() * 1000.0)
            },
            agent_rss_now.map_or("?".into(), |k| k.to_string()),
            agent_rss.map_or("?".into(), |k| k.to_string())
        );
    }
    let policy_report = with_policies.then(|| policy_set.report(namespaces));
    if let Some(p) = &policy_report {
        println!(
            "policies: {} in force ({} select the server), {} kernel verdict entries, {} IP cache entries; in force {} after the file write (median of {}; first {}; agent CPU {}), out {} after its removal; agent RSS {} KiB before they were first put in force, {} KiB with them (median after each switch)",
            p["count"],
            p["selecting_server"].as_array().map_or(0, Vec::len),
            p["kernel"]["verdict_entries"],
            p["kernel"]["ipcache_entries"],
            fmt_ms(&p["time_to_force_ms"]["median"]),
            p["time_to_force_ms"]["samples"]
                .as_array()
                .map_or(0, Vec::len),
            fmt_ms(&p["time_to_force_ms"]["first"]),
            fmt_ms(&p["agent_cpu_to_force_ms"]["median"]),
            fmt_ms(&p["time_to_remove_ms"]["median"]),
            p["agent_rss_kib"]["before_first_policies"],
            p["agent_rss_kib"]["with_policies"]
                .as_f64()
                .map_or("?".into(), |k| format!("{k:.0}")),
        );
    }
    let load_end = loadavg();
    println!(
        "load average at start: {load_start}; at end: {load_end} (2 shared vCPUs: compare ratios, not absolutes)"
    );

    let vip_direct = &comparisons[0];
    let report = json!({
        "version": 2,
        "unix_ts": started,
        "settings": {
            "repeats": a.repeats, "duration_ms": a.duration_ms, "conns": a.conns, "size": SIZE,
            "policies": a.policies, "warmup_ms": WARMUP_MS, "io_timeout_ms": IO_TIMEOUT_MS, "order": order_text,
        },
        "machine": {
            "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
            "loadavg_start": load_start, "loadavg_end": load_end,
        },
        "topology": {
            "client": client.ip4.to_string(), "server": server.ip4.to_string(), "vip": format!("{VIP}:{VIP_PORT}"),
            "client_identity": format!("{CLIENT_NS}/{CLIENT_SA}"), "server_pod": server_key,
            "intruder": intruder.as_ref().map(|p| json!({"ip": p.ip4.to_string(), "identity": format!("{INTRUDER_NS}/{INTRUDER_SA}")})),
            "agent_cgroup_root": node.cgroup_root(), "plain_cgroup": plain.path(), "meshed_cgroup": client.cgroup_dir(),
        },
        "scenarios": scenarios.iter().map(|s| json!({
            "name": s.name, "description": s.description, "target": s.target, "cgroup": s.cgroup,
            "policies_in_force": s.policies,
        })).collect::<Vec<_>>(),
        "metrics": METRICS.iter().map(|m| json!({
            "key": m.key, "column": m.column, "target": m.target,
            "better": if m.better == Better::Lower { "lower" } else { "higher" },
        })).collect::<Vec<_>>(),
        "runs": runs,
        "medians": medians,
        "spreads": spreads,
        "ratios_b_over_a": vip_direct.ratios,
        "paired_ratios_b_over_a": vip_direct.paired,
        "within_3pct": vip_direct.within,
        "comparisons": comparisons.iter().map(|c| json!({
            "label": c.label, "a": c.a, "b": c.b, "ratios": c.ratios, "paired": c.paired, "within_3pct": c.within,
        })).collect::<Vec<_>>(),
        "datapath_check": {
            "balanced_delta": balanced_delta, "vip_connects": vip_connects, "policy_connects": policy_connects,
            "policy_verdicts_delta": verdict_delta,
        },
        "connect4_prog": programs.get(SINEW_VIP).and_then(|p| p.get("connect4")).cloned(),
        "bpf_programs": programs,
        "policy": policy_report.map(|mut p| {
            p["sanity"] = policy_check;
            p
        }),
        "agent": {
            "cpu_ms": agent_cpu.map(|c| c.as_secs_f64() * 1000.0),
            "rss_kib": agent_rss_now,
            "rss_peak_kib": agent_rss,
        },
        "checks": checks,
        "table": table,
    });
    // Agent first (SIGTERM), then the plain cgroup's leftovers, then the topology: uninstall, cgroups, namespaces.
    drop(agent);
    drop(plain);
    drop(topo);
    Ok(report)
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

/// One `sinew-testpod tcp-connect` from scenario `s`'s cgroup to `to`.
fn connect_probe(clients: &Clients, s: &Scenario, to: &str) -> Result<ConnectReport> {
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
}

/// Before measuring anything: the plain cgroup must really bypass Sinew (a VIP connect from it is not balanced), and
/// the meshed one must reach the server through the VIP.
fn sanity_checks(clients: &Clients, direct: &Scenario, vip: &Scenario) -> Result<()> {
    let r = connect_probe(clients, direct, &direct.target)?;
    if r.ok != 1 {
        bail!("direct: cannot reach the server: {:?}", r.errors);
    }
    let r = connect_probe(clients, direct, &vip.target)?;
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
    let r = connect_probe(clients, vip, &vip.target)?;
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

/// With the policy set in force, before measuring: the meshed client still reaches the server through the VIP (the
/// ALLOW), a pod of the namespace the DENY names is refused at its own connect (EACCES, client side) and, from
/// outside its pod cgroup, dropped at the server's ingress (server side); the agent explains both verdicts. That
/// nothing the bench does is denied is checked again after the runs, with the kernel's verdict counters.
fn policy_sanity(
    agent: &Agent,
    clients: &Clients,
    pol: &Scenario,
    intruder: &sinew_tests::Pod,
    server: &sinew_tests::Pod,
) -> Result<Value> {
    let server_key = format!("{}/{}", server.namespace, server.name);
    let before = verdicts(agent)?;
    let r = connect_probe(clients, pol, &pol.target)?;
    if r.ok != 1 {
        bail!(
            "{}: the meshed client cannot reach the server through the VIP with the policies in force: {:?}",
            pol.name,
            r.errors
        );
    }
    let vip = format!("tcp:{VIP}:{VIP_PORT}");
    let direct = format!("tcp:{}:{SERVER_PORT}", server.ip4);
    let outcome = |p: &ProbeReport| {
        p.results
            .first()
            .map_or(String::new(), |r| r.outcome.clone())
    };
    let client_side = outcome(&intruder.probe(std::slice::from_ref(&vip), 500)?);
    let server_side = outcome(&intruder.probe_unmanaged(std::slice::from_ref(&direct), 500)?);
    if client_side != PROBE_EACCES {
        bail!(
            "the DENY did not refuse the intruder's connect to {vip} at the client side: outcome {client_side}"
        );
    }
    if server_side == PROBE_OK {
        bail!("the DENY did not stop the intruder's SYN to {direct} at the server: it connected");
    }
    let after = verdicts(agent)?;
    let allow = agent.policy_check(
        &format!("{CLIENT_NS}/{CLIENT_SA}"),
        &server_key,
        SERVER_PORT,
        "tcp",
    )?;
    let deny = agent.policy_check(
        &format!("{INTRUDER_NS}/{INTRUDER_SA}"),
        &server_key,
        SERVER_PORT,
        "tcp",
    )?;
    if !allow.allowed || deny.allowed {
        bail!(
            "the agent explains the bench's verdicts wrongly: client {allow:?}, intruder {deny:?}"
        );
    }
    let delta: Vec<f64> = after.iter().zip(before).map(|(a, b)| a - b).collect();
    println!(
        "check: meshed client ({CLIENT_NS}/{CLIENT_SA}) -> {}: reached {:?} (allowed by {})",
        pol.target,
        r.names,
        allow.policy.as_deref().unwrap_or("-")
    );
    println!(
        "check: intruder ({INTRUDER_NS}/{INTRUDER_SA}) -> {vip}: {client_side} at its connect; from outside its pod cgroup -> {direct}: {server_side} (dropped at the server); denied by {}; kernel verdicts: egress deny +{}, ingress deny +{}",
        deny.policy.as_deref().unwrap_or("-"),
        delta[2],
        delta[3]
    );
    Ok(json!({
        "client_to_vip": {"ok": r.ok, "names": r.names, "policy": allow.policy, "reason": allow.reason},
        "intruder_to_vip_client_side": client_side,
        "intruder_unmanaged_to_server_server_side": server_side,
        "intruder_policy": deny.policy, "intruder_reason": deny.reason,
        "verdicts_delta": VERDICTS.iter().zip(&delta).map(|((k, _, _), d)| (*k, *d)).collect::<BTreeMap<_, _>>(),
    }))
}

/// One run of `kind` for scenario `s` lasting `duration_ms`.
fn measure(
    clients: &Clients,
    s: &Scenario,
    kind: Kind,
    duration_ms: u64,
    conns: u32,
    repeat: u32,
    watch: &Watch,
) -> Result<Run> {
    let bound = Duration::from_millis(duration_ms + 3 * IO_TIMEOUT_MS) + Duration::from_secs(10);
    let n = match kind {
        Kind::RrN => conns.max(1),
        _ => 1,
    };
    let args = match kind {
        Kind::Crr => load_args("crr", "--max", &s.target, duration_ms),
        _ => load_args("rr", "--max-requests", &s.target, duration_ms),
    };
    // Every run starts without the previous runs' TIME_WAIT sockets (tens of thousands after a few crr runs, all
    // to the same server ip:port in every scenario, since Sinew rewrites to exactly the direct destination), so
    // no scenario inherits another's port-allocation state. `ss -K` destroys them (CONFIG_INET_DIAG_DESTROY).
    flush_time_wait(clients);
    let (progs0, agent0) = watch.snapshot();
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
    let outs = wait_all(procs, bound)?;
    let cpu_us = (children_cpu() - cpu0).as_secs_f64() * 1e6;
    let (progs1, agent1) = watch.snapshot();
    let programs = prog_deltas(&progs0, &progs1);
    let agent_cpu_ms = match (agent0, agent1) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a).as_secs_f64() * 1000.0),
        _ => None,
    };
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
            crr_metrics(&outs[0], cpu_us, &mut metrics, &mut problems)?;
        }
    }
    let connects = connects_made(kind, &outs);
    Ok(Run {
        repeat,
        scenario: s.name,
        kind,
        metrics,
        client_cpu_us: cpu_us,
        connects,
        programs,
        agent_cpu_ms,
        problems,
        raw: outs,
    })
}

/// Per scenario and program: runs and average run time over the measured runs, and the programs' time per
/// connection of the crr runs and per request of the single-connection rr runs (what one connection cycle or one
/// request/response costs in that program, all packets included).
fn program_summary<'a>(
    scenarios: &'a [Scenario],
    runs: &[Run],
    watch: &Watch,
) -> BTreeMap<&'a str, BTreeMap<&'static str, Value>> {
    let mut out: BTreeMap<&str, BTreeMap<&str, Value>> = BTreeMap::new();
    for s in scenarios {
        for name in PROGRAMS {
            if watch.progs.iter().all(|(p, _)| *p != name) {
                continue;
            }
            // (program runs, run time, connects, rr requests) over the scenario's runs of `kind` (or all).
            let sum = |kind: Option<Kind>| {
                runs.iter()
                    .filter(|r| r.scenario == s.name && kind.is_none_or(|k| r.kind == k))
                    .fold((0u64, 0u64, 0u64, 0u64), |(n, t, c, q), r| {
                        let p = r.programs.get(name).copied().unwrap_or_default();
                        let reqs = r
                            .raw
                            .iter()
                            .map(|v| v["requests"].as_u64().unwrap_or(0))
                            .sum::<u64>();
                        (n + p.runs, t + p.run_time_ns, c + r.connects, q + reqs)
                    })
            };
            let per = |t: u64, d: u64| (d > 0).then(|| t as f64 / d as f64);
            let (n, t, _, _) = sum(None);
            let (_, crr_t, crr_c, _) = sum(Some(Kind::Crr));
            let (_, rr_t, _, rr_q) = sum(Some(Kind::Rr));
            out.entry(s.name).or_default().insert(
                name,
                json!({
                    "runs": n,
                    "avg_ns": per(t, n),
                    "crr_ns_per_connect": per(crr_t, crr_c),
                    "rr_ns_per_request": per(rr_t, rr_q),
                }),
            );
        }
    }
    out
}

fn render_programs(
    scenarios: &[Scenario],
    programs: &BTreeMap<&str, BTreeMap<&str, Value>>,
) -> String {
    let w = scenarios.iter().map(|s| s.name.len()).max().unwrap_or(0);
    let mut out = String::from(
        "Sinew's programs (kernel bpf stats, measured runs): ns per program run, x runs [ns per crr connection; ns \
         per rr request]:\n",
    );
    let ns = |v: &Value| v.as_f64().map_or("-".into(), |x| format!("{x:.0}"));
    for s in scenarios {
        let Some(p) = programs.get(s.name) else {
            continue;
        };
        let cols: Vec<String> = PROGRAMS
            .iter()
            .filter_map(|name| {
                let v = p.get(name)?;
                Some(format!(
                    "{name} {} x {} [{}; {}]",
                    ns(&v["avg_ns"]),
                    v["runs"],
                    ns(&v["crr_ns_per_connect"]),
                    ns(&v["rr_ns_per_request"])
                ))
            })
            .collect();
        out.push_str(&format!("  {:<w$}  {}\n", s.name, cols.join("; ")));
    }
    out
}

fn flush_time_wait(clients: &Clients) {
    static WARNED: std::sync::Once = std::sync::Once::new();
    flush_time_wait_in(&clients.netns_name, &WARNED);
}

/// Connects a run made (each one passes Sinew's connect4 once in the VIP scenarios, failed or not).
fn connects_made(kind: Kind, raw: &[Value]) -> u64 {
    raw.iter()
        .map(|v| match kind {
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

/// The kernel's policy verdict counters, as (key, direction, verdict) of `sinew_policy_kernel_verdicts_total`.
const VERDICTS: [(&str, &str, &str); 4] = [
    ("egress/allow", "egress", "allow"),
    ("ingress/allow", "ingress", "allow"),
    ("egress/deny", "egress", "deny"),
    ("ingress/deny", "ingress", "deny"),
];

fn verdicts(agent: &Agent) -> Result<[f64; 4]> {
    let m = agent.metrics()?;
    Ok(VERDICTS.map(|(_, direction, verdict)| {
        m.value(
            "sinew_policy_kernel_verdicts_total",
            &[("direction", direction), ("verdict", verdict)],
        )
    }))
}

fn revision(agent: &Agent) -> Result<f64> {
    agent
        .metrics()?
        .get("sinew_policy_revision", &[])
        .context("the agent exports no sinew_policy_revision")
}

/// Waits until the agent used at most one clock tick of CPU in a 250 ms window (bounded by [`IDLE_TIMEOUT`]), so
/// that no measured run shares the CPUs with the tail of a policy compilation. Returns how long that took, ms.
fn wait_agent_idle(agent: &Agent) -> Result<f64> {
    let t0 = Instant::now();
    let Some(pid) = agent.pid() else {
        return Ok(0.0);
    };
    let mut last = proc_cpu(pid);
    while t0.elapsed() < IDLE_TIMEOUT {
        sleep_interruptible(Duration::from_millis(250))?;
        let now = proc_cpu(pid);
        if let (Some(a), Some(b)) = (last, now)
            && b.saturating_sub(a) <= Duration::from_millis(10)
        {
            return Ok(t0.elapsed().as_secs_f64() * 1000.0);
        }
        last = now;
    }
    eprintln!(
        "  note: the agent was still busy {IDLE_TIMEOUT:?} after a policy switch; measuring anyway"
    );
    Ok(t0.elapsed().as_secs_f64() * 1000.0)
}

/// The policy scenario's policies: put in force by writing one file into the agent's source directory, taken out
/// by removing it. Every switch is timed and verified on the agent.
struct PolicySet<'a> {
    source: &'a SourceDir,
    /// The YAML, rendered once (so a switch times the agent's work, not ours).
    text: String,
    count: usize,
    /// `namespace/name` of the policies that must select the server.
    selecting: Vec<String>,
    /// `namespace/name` of the server pod.
    server_key: String,
    in_force: bool,
    on: Vec<Switch>,
    off: Vec<Switch>,
    /// The agent's RSS before the policies were put in force the first time.
    rss_before_kib: Option<u64>,
    /// What `/debug/policies` showed the first time the set was in force.
    status: Option<Value>,
}

/// One switch of the policy set.
#[derive(Clone, Copy, Serialize)]
struct Switch {
    /// From the file write (or removal) until `sinew_policy_revision` moved and `/debug/policies` showed the set.
    ms: f64,
    /// From then until the agent was idle again.
    settle_ms: f64,
    /// The agent's RSS once idle.
    rss_kib: Option<u64>,
    /// The agent's CPU from the write until idle (parse, compile, map writes), ms (clock-tick resolution).
    agent_cpu_ms: Option<f64>,
}

impl PolicySet<'_> {
    /// Puts the set in force (`on`) or takes it out, and waits until the agent has done so and is idle again.
    /// Returns whether it had to switch.
    fn set(&mut self, agent: &Agent, on: bool) -> Result<bool> {
        if self.in_force == on {
            return Ok(false);
        }
        if on && self.on.is_empty() {
            self.rss_before_kib = agent.pid().and_then(|p| proc_status_kib(p, "VmRSS:"));
        }
        let before = revision(agent)?;
        let cpu0 = agent.pid().and_then(proc_cpu);
        let t0 = Instant::now();
        if on {
            self.source.write_raw(POLICY_FILE, &self.text)?;
        } else {
            self.source.remove(POLICY_FILE)?;
        }
        let mut last = String::from("sinew_policy_revision did not move");
        // Bounded by POLICY_TIMEOUT. /metrics may stall (and time out) while the agent compiles under its policy
        // lock: that is just another "not yet".
        let (ms, st) = loop {
            check_interrupt()?;
            if t0.elapsed() > POLICY_TIMEOUT {
                bail!(
                    "the agent did not take the policy set {} within {POLICY_TIMEOUT:?}: {last}; agent log:\n{}",
                    if on { "in" } else { "out" },
                    agent.log_tail(20)
                );
            }
            if revision(agent).is_ok_and(|r| r > before) {
                let ms = t0.elapsed().as_secs_f64() * 1000.0;
                match agent.get_json::<Value>("/debug/policies") {
                    Ok(st) => match self.check(&st, on) {
                        Ok(()) => break (ms, st),
                        Err(e) => last = e,
                    },
                    Err(e) => last = format!("{e:#}"),
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        if on && self.status.is_none() {
            let k = &st["kernel"];
            let len = |v: &Value| v.as_array().map_or(0, Vec::len);
            let proxy_required = st["policies"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|p| p["rules"].as_array().into_iter().flatten())
                .filter(|r| r["status"] == "proxy-required")
                .count();
            self.status = Some(json!({
                "revision": st["revision"], "enforcing": st["enforcing"], "policies": len(&st["policies"]),
                "identities": len(&st["identities"]), "proxy_required_rules": proxy_required,
                "kernel": {
                    "verdict_entries": k["verdict_entries"], "ipcache_entries": k["ipcache_entries"],
                    "local_endpoints": k["local_endpoints"], "source_classes": len(&k["source_classes"]),
                    "destination_classes": len(&k["destination_classes"]),
                },
            }));
        }
        let settle_ms = wait_agent_idle(agent)?;
        let rss_kib = agent.pid().and_then(|p| proc_status_kib(p, "VmRSS:"));
        let agent_cpu_ms = match (cpu0, agent.pid().and_then(proc_cpu)) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a).as_secs_f64() * 1000.0),
            _ => None,
        };
        let sw = Switch {
            ms,
            settle_ms,
            rss_kib,
            agent_cpu_ms,
        };
        if on { &mut self.on } else { &mut self.off }.push(sw);
        self.in_force = on;
        Ok(true)
    }

    /// Whether `/debug/policies` shows the whole set in force, selecting the server where it must (`on`), or no
    /// policy and no enforcement (`!on`).
    fn check(&self, st: &Value, on: bool) -> std::result::Result<(), String> {
        let enforcing = st["enforcing"].as_bool() == Some(true);
        let policies = st["policies"].as_array().map_or(&[][..], Vec::as_slice);
        if !on {
            return if !enforcing && policies.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "still {} policies in force, enforcing {enforcing}",
                    policies.len()
                ))
            };
        }
        if let Some(r) = st["rejected"].as_array().filter(|r| !r.is_empty()) {
            return Err(format!("the agent rejected bench policies: {r:?}"));
        }
        if policies.len() != self.count || !enforcing {
            return Err(format!(
                "{} of {} policies in force, enforcing {enforcing}",
                policies.len(),
                self.count
            ));
        }
        for key in &self.selecting {
            let p = policies.iter().find(|p| {
                format!(
                    "{}/{}",
                    p["namespace"].as_str().unwrap_or(""),
                    p["name"].as_str().unwrap_or("")
                ) == *key
            });
            let selects = p.is_some_and(|p| {
                p["selects"]
                    .as_array()
                    .is_some_and(|s| s.iter().any(|x| *x == *self.server_key))
            });
            if !selects {
                return Err(format!("{key} does not select {}", self.server_key));
            }
        }
        Ok(())
    }

    /// The JSON report's `policy` section.
    fn report(&self, namespaces: usize) -> Value {
        let stats = |v: Vec<f64>| {
            let (lo, hi) = v
                .iter()
                .fold((f64::MAX, f64::MIN), |(l, h), x| (l.min(*x), h.max(*x)));
            json!({
                "first": v.first(), "median": median(&v),
                "min": (!v.is_empty()).then_some(lo), "max": (!v.is_empty()).then_some(hi), "samples": v,
            })
        };
        let rss = |v: &[Switch]| {
            median(
                &v.iter()
                    .filter_map(|s| s.rss_kib.map(|k| k as f64))
                    .collect::<Vec<_>>(),
            )
        };
        let status = self.status.clone().unwrap_or(Value::Null);
        json!({
            "count": self.count,
            "file": POLICY_FILE,
            "file_bytes": self.text.len(),
            "cluster": {"namespaces": namespaces, "pods_on_other_nodes": namespaces * 2 * REPLICAS},
            "selecting_server": self.selecting,
            "enforcing": status["enforcing"],
            "kernel": status["kernel"],
            "status": status,
            "time_to_force_ms": stats(self.on.iter().map(|s| s.ms).collect()),
            "time_to_remove_ms": stats(self.off.iter().map(|s| s.ms).collect()),
            "settle_after_force_ms": stats(self.on.iter().map(|s| s.settle_ms).collect()),
            "agent_cpu_to_force_ms": stats(self.on.iter().filter_map(|s| s.agent_cpu_ms).collect()),
            "agent_cpu_to_remove_ms": stats(self.off.iter().filter_map(|s| s.agent_cpu_ms).collect()),
            "agent_rss_kib": {
                "before_first_policies": self.rss_before_kib,
                "with_policies": rss(&self.on),
                "after_removal": rss(&self.off),
            },
            "switches": {"on": self.on, "off": self.off},
        })
    }
}

fn fmt_ms(v: &Value) -> String {
    v.as_f64().map_or("?".into(), |ms| format!("{ms:.0} ms"))
}

/// Istio's form of a principal (the trust domain is the agent's default).
fn principal(ns: &str, sa: &str) -> String {
    format!("cluster.local/ns/{ns}/sa/{sa}")
}

/// How many policies [`bench_policies`] returns.
const BENCH_POLICIES: usize = 6;

/// The policies that select the server pod (`app: bench`), in its namespace and in the mesh root namespace: the
/// ALLOW the bench's connects need, ALLOWs and DENYs a real service would carry that never match the bench, and no
/// AUDIT (it would emit an event per connect).
fn bench_policies(server_ns: &str, host_ip: Ipv4Addr) -> Vec<Value> {
    let bench = json!({"matchLabels": {"app": "bench"}});
    let v = vec![
        authorization_policy(
            server_ns,
            "bench-allow-client",
            json!({
                "selector": bench, "action": "ALLOW",
                "rules": [{
                    "from": [{"source": {"principals": [principal(CLIENT_NS, CLIENT_SA)]}}],
                    "to": [{"operation": {"ports": [SERVER_PORT.to_string()]}}],
                }],
            }),
        ),
        // The node's kubelet probes the server from the node's address.
        authorization_policy(
            server_ns,
            "bench-allow-kubelet",
            json!({
                "selector": bench, "action": "ALLOW",
                "rules": [{
                    "from": [{"source": {"ipBlocks": [format!("{host_ip}/32")]}}],
                    "to": [{"operation": {"ports": [SERVER_PORT.to_string()]}}],
                }],
            }),
        ),
        authorization_policy(
            server_ns,
            "bench-allow-monitoring",
            json!({
                "selector": bench, "action": "ALLOW",
                "rules": [{
                    "from": [{"source": {"namespaces": ["monitoring"]}}],
                    "to": [{"operation": {"ports": ["9090"]}}],
                }],
            }),
        ),
        authorization_policy(
            server_ns,
            "bench-deny-intruder",
            json!({
                "selector": bench, "action": "DENY",
                "rules": [{"from": [{"source": {"namespaces": [INTRUDER_NS]}}]}],
            }),
        ),
        // Mesh-wide (root namespace, no selector): they apply to every workload, the bench's included.
        authorization_policy(
            ROOT_NS,
            "mesh-deny-quarantine",
            json!({
                "action": "DENY",
                "rules": [{"from": [{"source": {"namespaces": ["quarantine"]}}]}],
            }),
        ),
        authorization_policy(
            ROOT_NS,
            "mesh-deny-external-admin",
            json!({
                "action": "DENY",
                "rules": [{
                    "from": [{"source": {"ipBlocks": ["198.51.100.0/24", "203.0.113.0/24"]}}],
                    "to": [{"operation": {"ports": ["22", "2379"]}}],
                }],
            }),
        ),
    ];
    debug_assert_eq!(v.len(), BENCH_POLICIES);
    v
}

fn team(i: usize) -> String {
    format!("team-{i:03}")
}

/// A /24 numbered `seq` from `a.b.0.0` on.
fn cidr(a: u8, b: u8, seq: usize) -> String {
    format!("{a}.{}.{}.0/24", b as usize + seq / 256, seq % 256)
}

/// `n` policies over `namespaces` namespaces `team-NNN` of a synthetic cluster, ten kinds in turn: ALLOWs by
/// principal, wildcard principal, namespace and ipBlock, DENYs by ipBlock and namespace, one for a workload that does
/// not exist, one with L7 fields (proxy-required). None selects a bench pod (none is in a team namespace), but they
/// select the cluster's pods, so the compiler builds hundreds of source and destination classes and the IP cache
/// holds hundreds of CIDRs besides the pods.
fn cluster_policies(n: usize, namespaces: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            let k = i % namespaces;
            let j = i / namespaces;
            let round = j / 10;
            let ns = team(k);
            let seq = k + namespaces * round;
            let port = |p: usize| (p + round).to_string();
            let sel = |app: &str| json!({"matchLabels": {"app": app}});
            let (name, spec) = match j % 10 {
                0 => (
                    "api-from-next-worker",
                    json!({"selector": sel("api"), "action": "ALLOW", "rules": [{
                        "from": [{"source": {"principals": [principal(&team((k + 1) % namespaces), "worker")]}}],
                        "to": [{"operation": {"ports": [port(8080)]}}],
                    }]}),
                ),
                1 => (
                    "api-from-namespaces",
                    json!({"selector": sel("api"), "action": "ALLOW", "rules": [{
                        "from": [{"source": {"namespaces": [ns.clone(), team((k + 7) % namespaces)]}}],
                        "to": [{"operation": {"ports": [port(8443), port(9090)]}}],
                    }]}),
                ),
                2 => (
                    "worker-deny-partner-net",
                    json!({"selector": sel("worker"), "action": "DENY", "rules": [{
                        "from": [{"source": {"ipBlocks": [cidr(172, 16, seq)]}}],
                    }]}),
                ),
                3 => (
                    "worker-from-api",
                    json!({"selector": sel("worker"), "action": "ALLOW", "rules": [{
                        "from": [{"source": {"principals": [principal(&ns, "api")]}}],
                        "to": [{"operation": {"ports": [port(7000)]}}],
                    }]}),
                ),
                4 => (
                    "deny-db-port-from-far-team",
                    json!({"action": "DENY", "rules": [{
                        "from": [{"source": {"namespaces": [team((k + namespaces / 2) % namespaces)]}}],
                        "to": [{"operation": {"ports": [port(5432)]}}],
                    }]}),
                ),
                5 => (
                    "db-from-api",
                    json!({"selector": sel("db"), "action": "ALLOW", "rules": [{
                        "from": [{"source": {"principals": [principal(&ns, "api")]}}],
                        "to": [{"operation": {"ports": [port(5432)]}}],
                    }]}),
                ),
                6 => (
                    "api-metrics-get",
                    json!({"selector": sel("api"), "action": "ALLOW", "rules": [{
                        "from": [{"source": {"principals": [principal("monitoring", "prometheus")]}}],
                        "to": [{"operation": {"methods": ["GET"], "paths": ["/metrics"]}}],
                    }]}),
                ),
                7 => (
                    "worker-deny-ssh-from-cgnat",
                    json!({"selector": sel("worker"), "action": "DENY", "rules": [{
                        "from": [{"source": {"ipBlocks": [cidr(100, 64, seq)]}}],
                        "to": [{"operation": {"ports": [port(22)]}}],
                    }]}),
                ),
                8 => (
                    "api-from-office",
                    json!({"selector": sel("api"), "action": "ALLOW", "rules": [{
                        "from": [{"source": {"ipBlocks": [cidr(10, 20, seq)]}}],
                        "to": [{"operation": {"ports": [port(443)]}}],
                    }]}),
                ),
                _ => (
                    "worker-from-own-team",
                    json!({"selector": sel("worker"), "action": "ALLOW", "rules": [{
                        "from": [{"source": {"principals": [format!("cluster.local/ns/{ns}/sa/*")]}}],
                    }]}),
                ),
            };
            let name = if round == 0 {
                name.to_string()
            } else {
                format!("{name}-{round}")
            };
            authorization_policy(&ns, &name, spec)
        })
        .collect()
}

/// The synthetic cluster's pods: per team namespace, [`REPLICAS`] of `api` and of `worker` (each with its own
/// service account), on two other nodes, with addresses from 10.250.0.10 on.
fn cluster_pods(namespaces: usize) -> Vec<Value> {
    let base = u32::from(Ipv4Addr::new(10, 250, 0, 10));
    let mut out = Vec::new();
    for k in 0..namespaces {
        for app in ["api", "worker"] {
            for r in 0..REPLICAS {
                let n = out.len() as u32;
                let ip = Ipv4Addr::from(base + n).to_string();
                let node = ["node-b", "node-c"][n as usize % 2];
                out.push(json!({
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": format!("{app}-{r}"), "namespace": team(k), "labels": {"app": app}},
                    "spec": {
                        "nodeName": node,
                        "serviceAccountName": app,
                        "containers": [{"name": app, "image": "registry.example/app:1",
                                        "ports": [{"containerPort": 8080, "protocol": "TCP"}]}],
                    },
                    "status": {
                        "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                        "hostIP": format!("10.240.0.{}", 2 + n % 2),
                        "conditions": [{"type": "Ready", "status": "True"}],
                    },
                }));
            }
        }
    }
    out
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

/// Says so when the 1-minute load average (the first field of `load`, as [`loadavg`] gives it) exceeds half the
/// CPUs before `what` starts: other work is running and the numbers will be noisy.
fn note_if_busy(load: &str, what: &str) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let load1: f64 = load
        .split_whitespace()
        .next()
        .and_then(|l| l.parse().ok())
        .unwrap_or(0.0);
    if load1 > cpus as f64 / 2.0 {
        println!(
            "note: load average {load1} on {cpus} CPUs before {what}: other work is running, expect noisy numbers"
        );
    }
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

/// Scenario `b` against scenario `a`.
struct Comparison {
    /// Short row label, e.g. `vip/direct`.
    label: &'static str,
    a: &'static str,
    b: &'static str,
    /// Median of `b` over median of `a`, by metric key.
    ratios: BTreeMap<&'static str, f64>,
    /// Median over the repeats of (`b` / `a` within the repeat), by metric key.
    paired: BTreeMap<&'static str, f64>,
    /// The target: the ratio of medians at most 3% worse.
    within: BTreeMap<&'static str, bool>,
}

/// Scenario `b` against scenario `a` over `metrics`: ratios of medians, medians of per-repeat ratios, and the 3%
/// verdicts.
fn compare<R: Measured>(
    label: &'static str,
    a: &'static str,
    b: &'static str,
    metrics: &[&Metric],
    medians: &BTreeMap<&str, BTreeMap<&str, f64>>,
    runs: &[R],
    repeats: u32,
) -> Comparison {
    let mut ratios = BTreeMap::new();
    let mut within = BTreeMap::new();
    let mut paired = BTreeMap::new();
    for mt in metrics {
        let ma = medians.get(a).and_then(|m| m.get(mt.key));
        let mb = medians.get(b).and_then(|m| m.get(mt.key));
        if let (Some(x), Some(y)) = (ma, mb)
            && *x != 0.0
        {
            let ratio = y / x;
            ratios.insert(mt.key, ratio);
            // "Within 3%" means not worse by more than 3%; being faster than the baseline is noise, not a miss.
            let ok = match mt.better {
                Better::Lower => ratio <= 1.0 + TARGET,
                Better::Higher => ratio >= 1.0 - TARGET,
            };
            within.insert(mt.key, ok);
        }
        // Per-repeat ratios, then their median: a load change on the shared machine between repeats then hits both
        // sides of a ratio instead of one side of the medians.
        let per_repeat: Vec<f64> = (0..repeats)
            .filter_map(
                |rep| match (value(runs, rep, a, mt.key), value(runs, rep, b, mt.key)) {
                    (Some(x), Some(y)) if x != 0.0 => Some(y / x),
                    _ => None,
                },
            )
            .collect();
        if let Some(m) = median(&per_repeat) {
            paired.insert(mt.key, m);
        }
    }
    Comparison {
        label,
        a,
        b,
        ratios,
        paired,
        within,
    }
}

/// What the statistics read of a measured run, in either group.
trait Measured {
    fn repeat(&self) -> u32;
    fn scenario(&self) -> &str;
    fn metrics(&self) -> &BTreeMap<&'static str, f64>;
}

measured!(Run);

/// Metric `key` of scenario `s` in repeat `rep`.
fn value<R: Measured>(runs: &[R], rep: u32, s: &str, key: &str) -> Option<f64> {
    runs.iter()
        .filter(|r| r.repeat() == rep && r.scenario() == s)
        .find_map(|r| r.metrics().get(key).copied())
}

/// Values by scenario and metric key.
type ByScenario<'a> = BTreeMap<&'a str, BTreeMap<&'static str, f64>>;

/// Per scenario of `names` and metric of `metrics`: the median over the runs, and the spread ((max - min) / median).
fn medians_and_spreads<'a, R: Measured>(
    names: &[&'a str],
    metrics: &[&Metric],
    runs: &[R],
) -> (ByScenario<'a>, ByScenario<'a>) {
    let mut medians: ByScenario = BTreeMap::new();
    let mut spreads: ByScenario = BTreeMap::new();
    for s in names {
        for mt in metrics {
            let vals: Vec<f64> = runs
                .iter()
                .filter(|r| r.scenario() == *s)
                .filter_map(|r| r.metrics().get(mt.key).copied())
                .collect();
            if let Some(med) = median(&vals) {
                medians.entry(s).or_default().insert(mt.key, med);
                let (lo, hi) = vals
                    .iter()
                    .fold((f64::MAX, f64::MIN), |(l, h), v| (l.min(*v), h.max(*v)));
                let spread = if med != 0.0 { (hi - lo) / med } else { 0.0 };
                spreads.entry(s).or_default().insert(mt.key, spread);
            }
        }
    }
    (medians, spreads)
}

/// One row of a table: its label and how it fills a metric's cell.
type Row<'a> = (String, Box<dyn Fn(&Metric) -> String + 'a>);

/// A table of `cols`: the median of every scenario of `names`, the `rows` given, then the spread of every
/// scenario; the label column as wide as the longest label, at least `min_label`.
fn render_grid(
    names: &[&str],
    cols: &[&Metric],
    medians: &BTreeMap<&str, BTreeMap<&str, f64>>,
    spreads: &BTreeMap<&str, BTreeMap<&str, f64>>,
    rows: &[Row],
    min_label: usize,
) -> String {
    let w0 = names
        .iter()
        .map(|s| "spread ".len() + s.len())
        .chain(rows.iter().map(|(label, _)| label.len()))
        .max()
        .unwrap_or(16)
        .max(min_label);
    let width = |m: &Metric| m.column.len().max(9);
    let mut out = String::new();
    let mut row = |label: &str, cell: &dyn Fn(&Metric) -> String| {
        out.push_str(&format!("{label:<w0$}"));
        for m in cols {
            out.push_str(&format!(" {:>w$}", cell(m), w = width(m)));
        }
        out.push('\n');
    };
    row("median", &|m| m.column.to_string());
    for s in names {
        row(s, &|m| {
            medians
                .get(s)
                .and_then(|x| x.get(m.key))
                .map_or("-".into(), |v| fmt_val(m.key, *v))
        });
    }
    for (label, cell) in rows {
        row(label, cell);
    }
    for s in names {
        row(&format!("spread {s}"), &|m| {
            spreads
                .get(s)
                .and_then(|x| x.get(m.key))
                .map_or("-".into(), |v| format!("{:.1}%", v * 100.0))
        });
    }
    out
}

/// A ratio's cell: three decimals, `-` where there is none.
fn ratio_cell(ratios: &BTreeMap<&str, f64>, m: &Metric) -> String {
    ratios.get(m.key).map_or("-".into(), |r| format!("{r:.3}"))
}

/// What the table shows.
struct Summary<'a> {
    medians: &'a BTreeMap<&'a str, BTreeMap<&'a str, f64>>,
    comparisons: &'a [Comparison],
    spreads: &'a BTreeMap<&'a str, BTreeMap<&'a str, f64>>,
}

/// The table: scenario rows, metric columns, then per comparison the ratio rows and the 3% verdicts, and the
/// repeat spread of every scenario.
fn render_table(scenarios: &[Scenario], sum: &Summary) -> String {
    let Summary {
        medians,
        comparisons,
        spreads,
    } = sum;
    let cols: Vec<&Metric> = METRICS
        .iter()
        .filter(|m| medians.values().any(|x| x.contains_key(m.key)))
        .collect();
    let names: Vec<&str> = scenarios.iter().map(|s| s.name).collect();
    let mut rows: Vec<Row> = Vec::new();
    for c in comparisons.iter() {
        rows.push((
            format!("{} ratio", c.label),
            Box::new(|m| ratio_cell(&c.ratios, m)),
        ));
        rows.push((
            format!("{} paired", c.label),
            Box::new(|m| ratio_cell(&c.paired, m)),
        ));
        rows.push((
            format!("{} within 3%", c.label),
            Box::new(|m| {
                c.within
                    .get(m.key)
                    .map_or("-", |ok| if *ok { "yes" } else { "no" })
                    .to_string()
            }),
        ));
    }
    let mut out = render_grid(&names, &cols, medians, spreads, &rows, 16);
    out.push_str(
        "\nrr: 1 connection, 1 KiB request -> 1 KiB response, latency in µs; rrN: N connections in parallel (one \
         client process each), total req/s;\ncrr: new connection per request (connect, 1 KiB each way, close); \
         CPU: client utime+stime per request or connection, µs;\nx/y ratio: median of x / median of y (vip: \
         sinew-vip, pol: the policy scenario); paired: median over the repeats of x / y within the repeat;\nwithin \
         3%: the ratio is at most 3% worse; spread: (max - min) / median over the repeats.\n",
    );
    for c in comparisons.iter() {
        for m in METRICS.iter().filter(|m| m.target) {
            let (Some(r), Some(ok)) = (c.ratios.get(m.key), c.within.get(m.key)) else {
                continue;
            };
            let what = if m.better == Better::Lower {
                "p50 latency (rr)"
            } else {
                "connect rate (crr)"
            };
            let noise = [c.a, c.b]
                .iter()
                .filter_map(|s| spreads.get(s).and_then(|x| x.get(m.key)))
                .fold(0.0f64, |a, b| a.max(*b));
            let p = c
                .paired
                .get(m.key)
                .map_or("-".into(), |p| format!("{p:.3}"));
            out.push_str(&format!(
                "target {what}: {}/{} = {r:.3} (paired {p}) -> within 3%: {}{}\n",
                c.b,
                c.a,
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
