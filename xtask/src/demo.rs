//! `cargo xtask demo [--hold]`: Sinew balancing a Service VIP over three backend pods, live, in network namespaces.
//!
//! One simulated node (netns + bridge + cgroup root + bpffs dir, from the `sinew-tests` harness) with a `client`
//! pod and backends `web-1`..`web-3`, each running `sinew-testpod serve` (which answers with its own name). The
//! manifests come from `examples/demo/`; only the `sinew.dev/netns` paths are rewritten to this run's namespaces.
//! Then: the agent starts, 30 connects to the VIP show the spread, one backend pod is deleted from the source, 30
//! more connects show the spread over two, an AuthorizationPolicy (`examples/policy/`) lets only the client call the
//! web pods (a web pod calling another gets EACCES, explained by `policy check` and `flows`), and the inspection
//! commands for this run are printed and run.
//!
//! Everything lives in namespaces and cgroups the harness creates and removes (on success, error and Ctrl-C): the
//! RAII guards are locals of [`demo`], so returning from it, with `Ok` or `Err`, tears the topology down.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use sinew_tests::testpod::ConnectReport;
use sinew_tests::{Agent, Pod, Proc, SourceDir, Topology, eventually};

use crate::os::{check_interrupt, interrupted, sleep_interruptible};

/// The Service in `examples/demo/service-web.yaml`.
const VIP: &str = "10.96.0.10";
const TCP_PORT: u16 = 80;
const UDP_PORT: u16 = 53;
const TARGET_PORT: u16 = 8080;
const NODE: &str = "node-a";
/// Pods in creation order: the harness numbers addresses 10.244.0.10, .11, ... in this order, which is what the
/// example manifests say.
const PODS: [&str; 4] = ["client", "web-1", "web-2", "web-3"];
/// The backend whose Pod is deleted from the source in step 3.
const REMOVED: &str = "web-3";
/// Connects per round.
const CONNECTS: u32 = 30;
/// Netns path prefix used in the example files; replaced by this run's `/var/run/netns/<id>-<pod>`.
const EXAMPLE_NETNS_PREFIX: &str = "/var/run/netns/sinew-demo-";
/// `--hold` gives up after this long, so even a forgotten demo ends (and cleans up) eventually.
const MAX_HOLD: Duration = Duration::from_secs(8 * 3600);

pub fn demo(agent_bin: &Path, hold: bool) -> Result<()> {
    crate::os::install_interrupt_handler()?;
    // The guards live in `run`, so by the time it returns everything is cleaned up. A Ctrl-C also reaches the
    // agent and the pod processes (same process group) and can surface as some other error; say what happened.
    crate::os::explain_interrupt(run(agent_bin, hold))
}

fn run(agent_bin: &Path, hold: bool) -> Result<()> {
    let testpod = preflight(agent_bin)?;
    let examples = crate::workspace().join("examples").join("demo");

    section("1. Topology");
    let topo = Topology::builder("demo")
        .testpod_bin(&testpod)
        .node(NODE, &PODS)
        .build()
        .context("building the demo topology")?;
    let node = topo.node(NODE);
    let client = topo.pod("client");
    let backends: Vec<Pod> = PODS[1..].iter().map(|n| topo.pod(n)).collect();
    println!(
        "node {NODE}: netns {}, bridge br0 {}/24, cgroup root {}",
        node.netns().name(),
        node.bridge_ip4(),
        node.cgroup_root().display()
    );
    for p in std::iter::once(&client).chain(&backends) {
        println!(
            "  pod {:<7} {:<12} netns {:<24} cgroup {}",
            p.name,
            p.ip4.to_string(),
            p.netns_name(),
            p.cgroup_dir().display()
        );
    }
    check_interrupt()?;
    let mut servers = start_servers(&backends)?;
    println!(
        "each web-N runs `sinew-testpod serve --port {TARGET_PORT} --name web-N` (TCP: replies with its name, then echoes; UDP: replies with its name)"
    );

    section("2. Manifests and agent");
    let source = topo.source_dir()?;
    copy_examples(&examples, &source, &topo)?;
    check_interrupt()?;
    let mut agent = Agent::start(node, source.path(), None)?;
    agent
        .wait_ready(Duration::from_secs(20))
        .context("waiting for the agent's /readyz")?;
    let cli = agent.cli();
    println!(
        "mesh-agent run --node {NODE} --source-dir {} --cgroup-root {} --bpffs-root {} --admin-addr {}",
        source.path().display(),
        node.cgroup_root().display(),
        node.bpffs_root().display(),
        agent.admin_addr()
    );
    println!("  /readyz: ready (log: {})", agent.log_path().display());
    // The manifests' podIPs must be the pods' real addresses, or the demo would balance to nowhere; check what the
    // agent actually put into the maps.
    let want: Vec<String> = backends
        .iter()
        .map(|p| format!("{}:{TARGET_PORT}", p.ip4))
        .collect();
    wait_backends(&cli, &want, Duration::from_secs(5))
        .context("the example manifests do not match the demo topology")?;
    println!(
        "  services map: {VIP}:{TCP_PORT}/tcp -> {}",
        want.join(", ")
    );

    section(&format!(
        "3. {CONNECTS} connects from pod client to {VIP}:{TCP_PORT}"
    ));
    let vip_tcp = format!("{VIP}:{TCP_PORT}");
    let report = client.tcp_connect(&vip_tcp, CONNECTS, 0, 1000)?;
    print_spread(&report, &backends);
    check_interrupt()?;
    let udp = client.udp_send(&format!("{VIP}:{UDP_PORT}"), 9, 1000, true)?;
    println!(
        "  UDP: {} datagrams to {VIP}:{UDP_PORT}, each from a new socket: {} replies {:?}, reply source as recvfrom() sees it: {:?}",
        udp.sent, udp.received, udp.names, udp.sources
    );
    check_interrupt()?;

    section(&format!("4. Delete pod {REMOVED} from the source"));
    let t0 = Instant::now();
    source.remove(&format!("pod-{REMOVED}.yaml"))?;
    let removed_ip = topo.pod(REMOVED).ip4;
    let left: Vec<String> = backends
        .iter()
        .filter(|p| p.name != REMOVED)
        .map(|p| format!("{}:{TARGET_PORT}", p.ip4))
        .collect();
    wait_backends(&cli, &left, Duration::from_secs(5))?;
    println!(
        "rm {}/pod-{REMOVED}.yaml: {removed_ip} left the services map after {} ms",
        source.path().display(),
        t0.elapsed().as_millis()
    );
    let report = client.tcp_connect(&vip_tcp, CONNECTS, 0, 1000)?;
    print_spread(&report, &backends);
    check_interrupt()?;

    section("5. Identity policy: only the client's service account may call the web pods");
    policy_step(&agent, agent_bin, &source, &client, &backends)?;
    check_interrupt()?;

    section("6. Inspect");
    let bin = agent_bin.display();
    let cg = node.cgroup_root().display().to_string();
    let bpffs = node.bpffs_root().display().to_string();
    let admin = agent.admin_addr();
    let status_cmd =
        format!("{bin} status --cgroup-root {cg} --bpffs-root {bpffs} --admin-addr {admin}");
    let dump_cmd = format!("{bin} dump services --bpffs-root {bpffs}");
    println!("  {status_cmd}");
    println!("  {dump_cmd}");
    println!("  bpftool cgroup tree {cg}");
    println!("  bpftool map dump pinned {bpffs}/maps/services");
    println!("  curl -s http://{admin}/metrics | grep sinew_");
    println!();
    show(
        "$ mesh-agent status ... (this run)",
        Command::new(agent_bin).args([
            "status",
            "--cgroup-root",
            &cg,
            "--bpffs-root",
            &bpffs,
            "--admin-addr",
            &admin.to_string(),
        ]),
    );
    show(
        "$ mesh-agent dump services ...",
        Command::new(agent_bin).args(["dump", "services", "--bpffs-root", &bpffs]),
    );
    show(
        &format!("$ bpftool cgroup tree {cg}"),
        Command::new("bpftool").args(["cgroup", "tree", &cg]),
    );
    match agent.get("/metrics") {
        Ok(r) => {
            println!("$ curl -s http://{admin}/metrics | grep sinew_");
            for l in r.body.lines().filter(|l| l.starts_with("sinew_")).take(40) {
                println!("  {l}");
            }
        }
        Err(e) => println!("GET /metrics failed: {e:#}"),
    }

    if hold {
        section("7. Holding (Ctrl-C to clean up)");
        println!(
            "Everything stays up; the commands above work as printed. To connect from the client pod yourself:"
        );
        println!(
            "  sh -c 'echo $$ > {}/cgroup.procs && exec ip netns exec {} {} tcp-connect --to {vip_tcp} --count 10'",
            client.cgroup_dir().display(),
            client.netns_name(),
            testpod.display()
        );
        println!(
            "(the pod's cgroup is what makes Sinew apply: the same command outside it gets no load balancing)"
        );
        hold_until_interrupted(&mut agent, &backends, &mut servers)?;
    }
    section("Cleaning up");
    // Explicit, in the harness's order (agent, processes, then the topology with its pins, cgroups, namespaces);
    // on an error return the same happens through the locals' drops.
    drop(agent);
    drop(servers);
    drop(topo);
    println!("done: agent stopped, programs detached and unpinned, cgroups and namespaces removed");
    Ok(())
}

/// Checks that the demo/bench can run here and points the harness at `agent_bin` and the `sinew-testpod` built
/// next to it; returns the latter. Also removes leftovers of earlier runs that were killed with SIGKILL.
/// Step 5: puts `examples/policy/web-from-client.yaml` in force, shows that the client still reaches the VIP and
/// that a web pod calling another one is refused before any packet leaves, explains both verdicts, shows the
/// reported denial, and takes the policy away again.
fn policy_step(
    agent: &Agent,
    agent_bin: &Path,
    source: &SourceDir,
    client: &Pod,
    backends: &[Pod],
) -> Result<()> {
    let file = crate::workspace().join("examples/policy/web-from-client.yaml");
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let revision = |agent: &Agent| -> u64 {
        agent
            .get("/debug/policies")
            .ok()
            .and_then(|r| serde_json::from_str::<serde_json::Value>(&r.body).ok())
            .and_then(|v| v["revision"].as_u64())
            .unwrap_or(0)
    };
    let wait_revision = |before: u64, what: &str| -> Result<()> {
        eventually(Duration::from_secs(5), Duration::from_millis(20), || {
            if revision(agent) > before {
                Ok(())
            } else {
                Err("policy revision unchanged".to_string())
            }
        })
        .map_err(|e| anyhow::anyhow!("{what}: {e}"))
    };
    let before = revision(agent);
    let t0 = Instant::now();
    source.write_raw("policy-web-from-client.yaml", &text)?;
    wait_revision(before, "the policy did not come into force")?;
    println!(
        "examples/policy/web-from-client.yaml -> {}: in force after {} ms",
        source.path().display(),
        t0.elapsed().as_millis()
    );
    let report = client.tcp_connect(&format!("{VIP}:{TCP_PORT}"), CONNECTS, 0, 1000)?;
    println!(
        "  client (sa client) -> {VIP}:{TCP_PORT}: {}/{} connected (allowed by rule 0)",
        report.ok, report.attempts
    );
    let (from, to) = (&backends[0], &backends[1]);
    let target = format!("{}:{TARGET_PORT}", to.ip4);
    let report = from.tcp_connect(&target, 3, 0, 1000)?;
    println!(
        "  {} (sa web) -> {} {target}: {}/{} connected, errors {:?} (refused in connect(), no packet sent)",
        from.name, to.name, report.ok, report.attempts, report.errors
    );
    let admin = agent.admin_addr().to_string();
    show(
        "$ mesh-agent policy check --from default/web --to default/web-2 --port 8080",
        Command::new(agent_bin).args([
            "policy",
            "check",
            "--from",
            "default/web",
            "--to",
            "default/web-2",
            "--port",
            "8080",
            "--admin-addr",
            &admin,
        ]),
    );
    show(
        "$ mesh-agent policy status",
        Command::new(agent_bin).args(["policy", "status", "--admin-addr", &admin]),
    );
    // The denial event reaches the agent asynchronously; give it a moment.
    std::thread::sleep(Duration::from_millis(300));
    show(
        "$ mesh-agent flows",
        Command::new(agent_bin).args(["flows", "--admin-addr", &admin]),
    );
    let before = revision(agent);
    source.remove("policy-web-from-client.yaml")?;
    wait_revision(before, "the policy was not removed")?;
    let report = from.tcp_connect(&target, 3, 0, 1000)?;
    println!(
        "policy removed: {} -> {} {target}: {}/{} connected",
        from.name, to.name, report.ok, report.attempts
    );
    Ok(())
}

pub(crate) fn preflight(agent_bin: &Path) -> Result<PathBuf> {
    if let Some(why) = sinew_tests::privileged::missing_privileges() {
        bail!("this needs root and cgroup2 at /sys/fs/cgroup/unified: {why}");
    }
    let testpod = agent_bin.with_file_name("sinew-testpod");
    for (what, p) in [
        ("mesh-agent", agent_bin),
        ("sinew-testpod", testpod.as_path()),
    ] {
        if !p.exists() {
            bail!("{what} not found at {}", p.display());
        }
    }
    // The harness's guards find the agent through SINEW_AGENT_BIN (the bpffs guard runs `mesh-agent uninstall` on
    // drop), and its default is the debug build: the bench runs the release build, so say which one.
    crate::os::set_env("SINEW_AGENT_BIN", agent_bin.as_os_str());
    crate::os::set_env("SINEW_TESTPOD_BIN", testpod.as_os_str());
    sinew_tests::sweep_stale();
    Ok(testpod)
}

fn section(title: &str) {
    println!("\n=== {title} ===");
}

fn start_servers(backends: &[Pod]) -> Result<Vec<Proc>> {
    backends
        .iter()
        .map(|p| {
            p.serve(TARGET_PORT, &p.name)
                .with_context(|| format!("starting the server in {}", p.name))
        })
        .collect()
}

/// Copies `examples/demo/*.yaml` into the agent's source directory, pointing each `sinew.dev/netns` annotation at
/// this run's namespace. Fails early (with the file name) if a Pod's podIP is not the address the topology gave it.
fn copy_examples(examples: &Path, source: &SourceDir, topo: &Topology) -> Result<()> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(examples)
        .with_context(|| format!("reading {}", examples.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("no *.yaml in {}", examples.display());
    }
    for f in &files {
        let mut text =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        let name = f.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if let Some(pod) = name
            .strip_prefix("pod-")
            .and_then(|n| n.strip_suffix(".yaml"))
        {
            let p = PODS
                .contains(&pod)
                .then(|| topo.pod(pod))
                .with_context(|| format!("{}: no pod {pod:?} in the demo topology", f.display()))?;
            if !text.contains(&format!("podIP: {}\n", p.ip4)) {
                bail!(
                    "{}: podIP is not {}, the address the demo gives pod {pod}",
                    f.display(),
                    p.ip4
                );
            }
            text = text.replace(
                &format!("{EXAMPLE_NETNS_PREFIX}{pod}"),
                &p.netns_path().display().to_string(),
            );
        }
        source.write_raw(name, &text)?;
        println!("examples/demo/{name} -> {}/{name}", source.path().display());
    }
    Ok(())
}

/// Waits until the VIP's TCP frontend has exactly `want` (`ip:port`) as backends in `dump services`.
fn wait_backends(cli: &sinew_tests::AgentCli, want: &[String], timeout: Duration) -> Result<()> {
    let mut want: Vec<String> = want.to_vec();
    want.sort();
    eventually(timeout, Duration::from_millis(50), || {
        if interrupted() {
            return Ok(());
        }
        let dump = cli.dump_services().map_err(|e| format!("{e:#}"))?;
        let svc = dump
            .iter()
            .find(|s| s.vip == VIP && s.port == TCP_PORT && s.proto == "tcp")
            .ok_or_else(|| format!("{VIP}:{TCP_PORT}/tcp not in dump services: {dump:?}"))?;
        let mut got: Vec<String> = svc
            .backends
            .iter()
            .filter(|b| b.slot < svc.count)
            .map(|b| format!("{}:{}", b.addr, b.port))
            .collect();
        got.sort();
        if got == want {
            Ok(())
        } else {
            Err(format!("backends are {got:?}, want {want:?}"))
        }
    })
    .map_err(|e| anyhow::anyhow!(e))?;
    check_interrupt()
}

/// Prints how many connects each backend got, with a bar, and what `getpeername()` returned.
fn print_spread(r: &ConnectReport, backends: &[Pod]) {
    println!("  {:<8} {:<14} {:>8}", "backend", "pod IP", "connects");
    for p in backends {
        let n = r.names.get(&p.name).copied().unwrap_or(0);
        println!(
            "  {:<8} {:<14} {:>8}  {}",
            p.name,
            p.ip4.to_string(),
            n,
            "#".repeat(n as usize)
        );
    }
    let other: u32 = r
        .names
        .iter()
        .filter(|(n, _)| !backends.iter().any(|p| &p.name == *n))
        .map(|(_, c)| c)
        .sum();
    if other > 0 {
        println!("  other answers: {:?}", r.names);
    }
    println!(
        "  {} of {} connected, {} failed{}",
        r.ok,
        r.attempts,
        r.failed,
        if r.errors.is_empty() {
            String::new()
        } else {
            format!(" {:?}", r.errors)
        }
    );
    let peers: BTreeMap<&String, &u32> = r.peers.iter().collect();
    println!("  getpeername() in the client saw: {peers:?} (the VIP, not the backend)");
}

/// Runs a command (bounded), printing its output indented; a failure is shown, not fatal.
fn show(title: &str, cmd: &mut Command) {
    println!("{title}");
    match sinew_tests::util::run_bounded(cmd, Duration::from_secs(10)) {
        Ok((status, out, err)) => {
            for l in out.lines().chain(err.lines()) {
                println!("  {l}");
            }
            if !status.success() {
                println!("  (exited with {status})");
            }
        }
        Err(e) => println!("  failed: {e:#}"),
    }
    println!();
}

/// Keeps the demo up until SIGINT/SIGTERM (or [`MAX_HOLD`]). Backend servers exit after 10 minutes by design
/// (`sinew-testpod` bounds every process's lifetime), so they are restarted when they do; the agent is not (if it
/// dies the programs stay attached and balancing goes on, which is worth seeing).
fn hold_until_interrupted(agent: &mut Agent, backends: &[Pod], servers: &mut [Proc]) -> Result<()> {
    let start = Instant::now();
    let mut agent_gone = false;
    while start.elapsed() < MAX_HOLD {
        if interrupted() {
            println!("\nsignal received");
            return Ok(());
        }
        if let Some(s) = agent.exited().filter(|_| !agent_gone) {
            agent_gone = true;
            println!(
                "mesh-agent exited ({s}); the pinned programs keep balancing. Log tail:\n{}",
                agent.log_tail(10)
            );
        }
        for (p, srv) in backends.iter().zip(servers.iter_mut()) {
            if !srv.is_running() && !interrupted() {
                *srv = p.serve(TARGET_PORT, &p.name)?;
            }
        }
        // Errors only on interrupt, which the loop head reports.
        let _ = sleep_interruptible(Duration::from_secs(1));
    }
    println!("held for {MAX_HOLD:?}; cleaning up");
    Ok(())
}
