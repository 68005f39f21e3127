//! `cargo xtask demo [--hold]`: Sinew balancing a Service VIP over three backend pods, then mTLS between two nodes,
//! live, in network namespaces.
//!
//! Two simulated nodes (netns + bridge + cgroup root + bpffs dir each, joined by an underlay, from the `sinew-tests`
//! harness): `node-a` with a `client` pod and backends `web-1`..`web-3`, `node-b` with the backend `api`, each
//! backend running `sinew-testpod serve` (which answers with its own name). The manifests come from
//! `examples/demo/`; only the `sinew.dev/netns` paths are rewritten to this run's namespaces. One CA is generated
//! for the run and both agents sign with it (`--ca-dir`). Then: 30 connects to the `web` VIP show the spread, one
//! backend pod is deleted from the source, 30 more connects show the spread over two, an AuthorizationPolicy
//! (`examples/policy/`) lets only the client call the web pods (a web pod calling another gets EACCES, explained by
//! `policy check` and `flows`), and the inspection commands for this run are printed and run. Last, mTLS between
//! the nodes: the client and `api` are enrolled (`sinew.dev/mesh: enabled`), a connect from the client to the `api`
//! VIP is captured on node-a's underlay (only port 15008, the payload never in clear text), its access-log records
//! and Istio metrics are shown, and a STRICT `PeerAuthentication` (`examples/demo/mesh/`) refuses an unenrolled
//! pod's plaintext while the client still gets through.
//!
//! Everything lives in namespaces and cgroups the harness creates and removes (on success, error and Ctrl-C): the
//! RAII guards are locals of [`demo`], so returning from it, with `Ok` or `Err`, tears the topology down.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mesh_agent::identity::Ca;
use sinew_tests::capture::{Capture, Captured, proto};
use sinew_tests::mesh::{Hold, HoldReport, TRUST_DOMAIN, TUNNEL_PORT, certs, spiffe};
use sinew_tests::testpod::ConnectReport;
use sinew_tests::{Agent, AgentOptions, Node, Pod, Proc, SourceDir, Topology, eventually, unix_ms};

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
/// The second node and its one pod, the backend of the mTLS step (addressed 10.244.1.10, the first of node-b's
/// subnet).
const NODE_B: &str = "node-b";
const PODS_B: [&str; 1] = [API];
const API: &str = "api";
/// The Service in `examples/demo/service-api.yaml` (TCP 80 -> `api`:8080).
const API_VIP: &str = "10.96.0.11";
/// The label that enrolls a pod in the mesh, as the mTLS step adds it to `metadata.labels`.
const MESH_LABEL_LINE: &str = "    sinew.dev/mesh: enabled\n";
/// `examples/demo/mesh/<this>`, written into the source by the mTLS step (the subdirectory is not copied at the
/// start).
const STRICT_FILE: &str = "peer-authentication-api-strict.yaml";
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
        .node(NODE_B, &PODS_B)
        .build()
        .context("building the demo topology")?;
    let node = topo.node(NODE);
    let node_b = topo.node(NODE_B);
    let client = topo.pod("client");
    let backends: Vec<Pod> = PODS[1..].iter().map(|n| topo.pod(n)).collect();
    let api = topo.pod(API);
    print_node(node, std::iter::once(&client).chain(&backends));
    print_node(node_b, std::iter::once(&api));
    println!(
        "underlay: ul0 {} ({NODE}) <-> ul0 {} ({NODE_B}), each node routes the other's pod subnet through it",
        node.host_ip(),
        node_b.host_ip()
    );
    check_interrupt()?;
    // The load-balancing steps use only the web-N servers; api's is last, for the mTLS step.
    let served: Vec<Pod> = backends.iter().chain([&api]).cloned().collect();
    let mut servers = start_servers(&served)?;
    println!(
        "each web-N runs `sinew-testpod serve --port {TARGET_PORT} --name web-N` (TCP: replies with its name, then echoes; UDP: replies with its name)"
    );
    println!("api runs the same with `--name api`");

    section("2. Manifests and agents");
    let source = topo.source_dir()?;
    copy_examples(&examples, &source, &topo)?;
    check_interrupt()?;
    // One CA for the cluster: both agents sign their SVIDs with it, so each node's proxy trusts the other's.
    let ca_dir = topo.work_dir().join("ca");
    Ca::generate(TRUST_DOMAIN)
        .context("generating the demo CA")?
        .write_to(&ca_dir)
        .context("writing the demo CA")?;
    println!(
        "CA for trust domain {TRUST_DOMAIN}: {}/ca.crt, ca.key (generated for this run; both agents get --ca-dir)",
        ca_dir.display()
    );
    let mut agent = start_agent(node, &source, &ca_dir)?;
    let mut agent_b = start_agent(node_b, &source, &ca_dir)?;
    agent
        .wait_ready(Duration::from_secs(20))
        .context("waiting for the agent's /readyz")?;
    agent_b
        .wait_ready(Duration::from_secs(20))
        .with_context(|| format!("waiting for {NODE_B}'s agent's /readyz"))?;
    let cli = agent.cli();
    for (n, a) in [(node, &agent), (node_b, &agent_b)] {
        println!(
            "mesh-agent run --node {} --source-dir {} --cgroup-root {} --bpffs-root {} --admin-addr {} --ca-dir {}",
            n.name(),
            source.path().display(),
            n.cgroup_root().display(),
            n.bpffs_root().display(),
            a.admin_addr(),
            ca_dir.display()
        );
        println!("  /readyz: ready (log: {})", a.log_path().display());
    }
    // The manifests' podIPs must be the pods' real addresses, or the demo would balance to nowhere; check what the
    // agent actually put into the maps.
    let want: Vec<String> = backends
        .iter()
        .map(|p| format!("{}:{TARGET_PORT}", p.ip4))
        .collect();
    wait_backends(&cli, VIP, &want, Duration::from_secs(5))
        .context("the example manifests do not match the demo topology")?;
    println!(
        "  services map: {VIP}:{TCP_PORT}/tcp -> {}",
        want.join(", ")
    );
    let want_api = [format!("{}:{TARGET_PORT}", api.ip4)];
    wait_backends(&cli, API_VIP, &want_api, Duration::from_secs(5))
        .context("the example manifests do not match the demo topology")?;
    println!(
        "  services map: {API_VIP}:{TCP_PORT}/tcp -> {} (api on {NODE_B})",
        want_api.join(", ")
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
    wait_backends(&cli, VIP, &left, Duration::from_secs(5))?;
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

    check_interrupt()?;

    section("7. mTLS between nodes");
    mesh_step(
        [&agent, &agent_b],
        agent_bin,
        &source,
        &examples,
        &topo,
        &client,
        &backends[0],
        &api,
    )?;

    if hold {
        section("8. Holding (Ctrl-C to clean up)");
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
        println!(
            "The same with --to {API_VIP}:{TCP_PORT} goes to api on {NODE_B} through the mTLS tunnel (STRICT stays in force)."
        );
        let mut agents = [agent, agent_b];
        hold_until_interrupted(&mut agents, &served, &mut servers)?;
        [agent, agent_b] = agents;
    }
    section("Cleaning up");
    // Explicit, in the harness's order (agents, processes, then the topology with its pins, cgroups, namespaces);
    // on an error return the same happens through the locals' drops.
    drop(agent);
    drop(agent_b);
    drop(servers);
    drop(topo);
    println!(
        "done: agents stopped, programs detached and unpinned, cgroups and namespaces removed"
    );
    Ok(())
}

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

/// Step 7: enrolls the client and `api` (the label added to their Pods in the source), shows an unenrolled pod's
/// plaintext on node-a's underlay as a control, then the client's connection to the `api` VIP on the same wire (only
/// the tunnel port, the payload never in clear text), its access-log records and Istio metrics on both nodes; then
/// `examples/demo/mesh/peer-authentication-api-strict.yaml` makes `api` STRICT: the unenrolled pod's connect is
/// refused with EACCES while the client still gets through. Fails (after printing what it saw) if the wire or the
/// answers are not what the step claims.
#[allow(clippy::too_many_arguments)]
fn mesh_step(
    agents: [&Agent; 2],
    agent_bin: &Path,
    source: &SourceDir,
    examples: &Path,
    topo: &Topology,
    client: &Pod,
    stranger: &Pod,
    api: &Pod,
) -> Result<()> {
    let [agent_a, agent_b] = agents;
    let (ip_a, ip_b) = (topo.node(NODE).host_ip(), topo.node(NODE_B).host_ip());
    let ul0 = topo.node(NODE).netns().path();
    let logs = || {
        agents
            .iter()
            .map(|a| format!("----- agent {} -----\n{}", a.options().node, a.log_tail(30)))
            .collect::<Vec<_>>()
            .join("\n")
    };

    // a. Enrollment: the label on both Pods; both agents must see both pods in their mesh view (the kernel redirects
    // from then on) and hold an SVID for each local one.
    let t0 = Instant::now();
    for p in [client, api] {
        let file = format!("pod-{}.yaml", p.name);
        let path = source.path().join(&file);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        source.write_raw(&file, &enroll(&text).with_context(|| file.clone())?)?;
        println!(
            "{}/{file}: metadata.labels += {}",
            source.path().display(),
            MESH_LABEL_LINE.trim()
        );
    }
    let keys = [client, api].map(|p| format!("{}/{}", p.namespace, p.name));
    wait_mesh(agents, "both pods enrolled", |mesh| {
        keys.iter().all(|k| mesh.get(k).is_some())
    })?;
    for (agent, pod) in [(agent_a, client), (agent_b, api)] {
        let id = spiffe(&pod.namespace, &pod.name);
        eventually(Duration::from_secs(10), Duration::from_millis(100), || {
            let list = certs(agent).map_err(|e| format!("{e:#}"))?;
            if list
                .iter()
                .any(|c| c.role == "workload" && c.spiffe_id == id)
            {
                Ok(())
            } else {
                Err(format!("no workload SVID for {id} yet: {list:?}"))
            }
        })
        .map_err(|e| anyhow::anyhow!("{}: {e}", agent.options().node))?;
    }
    let view = agent_a.get_json::<serde_json::Value>("/debug/policies")?["mesh"].clone();
    println!(
        "  both agents: enrolled after {} ms; /debug/policies .mesh = {view}",
        t0.elapsed().as_millis()
    );
    for (agent, pod) in [(agent_a, client), (agent_b, api)] {
        let id = spiffe(&pod.namespace, &pod.name);
        let list = certs(agent)?;
        if let Some(c) = list
            .iter()
            .find(|c| c.role == "workload" && c.spiffe_id == id)
        {
            println!(
                "  {}: workload SVID {id}, not after {}",
                agent.options().node,
                c.not_after
            );
        }
    }
    check_interrupt()?;

    // b. Control: an unenrolled pod's plaintext to api crosses the same wire in clear, so the capture would see the
    // marker if the mesh leaked it.
    let capture = || {
        Capture::start(&ul0, "ul0", 50_000, Duration::from_secs(30))
            .with_context(|| format!("capturing on {NODE}'s ul0"))
    };
    let api_pod = format!("{}:{TARGET_PORT}", api.ip4);
    let control = format!("SINEW-DEMO-PLAINTEXT-{}", unix_ms());
    let cap = capture()?;
    let r = Hold::once(&api_pod, &control).run(stranger)?;
    let seen = cap.stop()?;
    println!(
        "control: {} (not enrolled) -> api {api_pod} with payload {control:?}: {}",
        stranger.name,
        answer(&r)
    );
    println!(
        "  on {NODE}'s underlay (ul0): {}; the payload in clear text: {}",
        tcp_flows(&seen),
        if seen.payload_contains(control.as_bytes()) {
            "yes"
        } else {
            "no"
        }
    );
    check_interrupt()?;

    // c. The client through the mesh, captured on the same wire.
    let vip_api = format!("{API_VIP}:{TCP_PORT}");
    let marker = format!("SINEW-DEMO-SECRET-{}", unix_ms());
    let before = [
        access_lines(agent_a, api).len(),
        access_lines(agent_b, api).len(),
    ];
    let cap = capture()?;
    let r = Hold::once(&vip_api, &marker).run(client)?;
    let seen = cap.stop()?;
    println!(
        "client (enrolled) -> {vip_api} (Service api) with payload {marker:?}: {}",
        answer(&r)
    );
    let tcp: Vec<_> = seen
        .packets()
        .filter(|p| p.key.proto == proto::TCP)
        .collect();
    let nodes = [std::net::IpAddr::V4(ip_a), std::net::IpAddr::V4(ip_b)];
    let tunnel = |k: &sinew_tests::capture::FlowKey| {
        nodes.contains(&k.src)
            && nodes.contains(&k.dst)
            && (k.sport == TUNNEL_PORT || k.dport == TUNNEL_PORT)
    };
    let other = tcp.iter().filter(|p| !tunnel(&p.key)).count();
    let client_ports: std::collections::BTreeSet<u16> = tcp
        .iter()
        .filter(|p| tunnel(&p.key))
        .map(|p| {
            if p.key.dport == TUNNEL_PORT {
                p.key.sport
            } else {
                p.key.dport
            }
        })
        .collect();
    let tls_bytes: usize = tcp.iter().map(|p| p.payload.len()).sum();
    let leaked = seen.contains(marker.as_bytes());
    println!("  on {NODE}'s underlay (ul0): {}", tcp_flows(&seen));
    let client_ports: Vec<String> = client_ports.iter().map(u16::to_string).collect();
    println!(
        "  TCP ports on the wire: {TUNNEL_PORT} only (the tunnel listener of {NODE_B}; the other end is {NODE}'s proxy, \
         ephemeral port {}); TCP packets without {TUNNEL_PORT}: {other}",
        client_ports.join(", ")
    );
    println!(
        "  the payload in clear text: {} ({tls_bytes} bytes of TLS 1.3 between {ip_a} and {ip_b})",
        if leaked { "YES" } else { "no" }
    );
    let ok = r.connected && r.first_error.is_none() && r.name.as_deref() == Some(API);
    if !ok || leaked || other > 0 || tcp.is_empty() || seen.truncated {
        bail!(
            "the mTLS step did not show what it should (answer: {r:?}; wire: {}; payload seen: {leaked})\n{}",
            seen.summary(),
            logs()
        );
    }
    check_interrupt()?;

    // d. The access log: one record per proxy, written when the connection closes.
    println!("access log (target sinew::access, one record per proxied connection and proxy):");
    for (agent, n) in [agent_a, agent_b].into_iter().zip(before) {
        let mut lines = Vec::new();
        let _ = eventually(Duration::from_secs(3), Duration::from_millis(50), || {
            lines = access_lines(agent, api);
            if lines.len() > n {
                Ok(())
            } else {
                Err(String::new())
            }
        });
        println!(
            "  {} ({}):",
            agent.options().node,
            agent.log_path().display()
        );
        match lines.get(n..).and_then(<[String]>::last) {
            Some(l) => println!("    {l}"),
            None => println!("    (no record yet)"),
        }
    }

    // e. Istio's metrics on both sides, with the authenticated principals.
    for agent in [agent_a, agent_b] {
        println!(
            "$ curl -s http://{}/metrics | grep istio_tcp_connections_opened_total   # {}",
            agent.admin_addr(),
            agent.options().node
        );
        match agent.get("/metrics") {
            Ok(m) => {
                for l in m.body.lines().filter(|l| {
                    l.starts_with("istio_tcp_connections_opened_total{")
                        && l.contains("connection_security_policy=\"mutual_tls\"")
                }) {
                    println!("  {l}");
                }
            }
            Err(e) => println!("  GET /metrics failed: {e:#}"),
        }
    }
    check_interrupt()?;

    // f. STRICT: only the node proxy may reach api now.
    let file = examples.join("mesh").join(STRICT_FILE);
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let t0 = Instant::now();
    source.write_raw(STRICT_FILE, &text)?;
    let api_key = format!("{}/{}", api.namespace, api.name);
    wait_mesh(agents, "STRICT for api", |mesh| {
        mesh[&api_key]["mode"] == "STRICT"
    })?;
    println!(
        "\nexamples/demo/mesh/{STRICT_FILE} -> {}: api is STRICT on both agents after {} ms",
        source.path().display(),
        t0.elapsed().as_millis()
    );
    let strict_denied = |a: &Agent| {
        a.metrics()
            .map(|m| m.value("sinew_mtls_strict_denied_total", &[]))
            .unwrap_or(f64::NAN)
    };
    let denied_before = strict_denied(agent_a);
    let targets = [format!("tcp:{vip_api}"), format!("tcp:{api_pod}")];
    let probe = stranger.probe(&targets, 2000)?;
    for res in &probe.results {
        println!(
            "  {} (not enrolled, plaintext) -> {}: {}",
            stranger.name,
            res.target.trim_start_matches("tcp:"),
            if res.outcome == sinew_tests::testpod::PROBE_EACCES {
                "EACCES (refused in connect(), no packet sent)".to_string()
            } else {
                res.outcome.clone()
            }
        );
    }
    let r = Hold::once(&vip_api, "still-through-the-tunnel").run(client)?;
    println!("  client (enrolled) -> {vip_api}: {}", answer(&r));
    println!(
        "  sinew_mtls_strict_denied_total on {NODE}: {denied_before} -> {}",
        strict_denied(agent_a)
    );
    // The kernel reported both refusals; give the events a moment to reach the agent.
    std::thread::sleep(Duration::from_millis(300));
    match agent_a.cli_admin(&["flows"]) {
        Ok(out) => {
            println!("$ mesh-agent flows ({NODE}) | grep STRICT");
            for l in out.lines().filter(|l| l.contains("STRICT")) {
                println!("  {l}");
            }
        }
        Err(e) => println!("  mesh-agent flows failed: {e:#}"),
    }
    let refused = probe
        .results
        .iter()
        .all(|r| r.outcome == sinew_tests::testpod::PROBE_EACCES);
    if !refused || !r.connected || r.first_error.is_some() {
        bail!(
            "STRICT did not behave as shown above: {probe:?}, client {r:?}\n{}",
            logs()
        );
    }
    check_interrupt()?;

    // g. What an operator would run.
    let bin = agent_bin.display();
    let (a_admin, b_admin) = (agent_a.admin_addr(), agent_b.admin_addr());
    let status_args = |a: &Agent| -> Vec<String> {
        let o = a.options();
        vec![
            "status".into(),
            "--cgroup-root".into(),
            o.cgroup_root.display().to_string(),
            "--bpffs-root".into(),
            o.bpffs_root.display().to_string(),
            "--admin-addr".into(),
            o.admin_addr.to_string(),
        ]
    };
    println!("\nto look at the mesh of this run:");
    println!(
        "  {bin} {}   # {NODE_B}: programs, maps, certificates",
        status_args(agent_b).join(" ")
    );
    println!(
        "  {bin} policy status --admin-addr {b_admin}   # mesh: enrolled pods and their mTLS mode"
    );
    println!("  {bin} flows --admin-addr {a_admin}   # STRICT refusals");
    println!("  curl -s http://{a_admin}/metrics | grep istio_   # and {b_admin}");
    println!("  ls {}   # the shared CA", agent_ca_dir(agent_a));
    println!();
    show_section(
        &format!("$ mesh-agent status ... ({NODE_B}, its certificates)"),
        Command::new(agent_bin).args(status_args(agent_b)),
        "CERTIFICATE",
    );
    show(
        &format!("$ mesh-agent policy status ({NODE_B})"),
        Command::new(agent_bin).args(["policy", "status", "--admin-addr", &b_admin.to_string()]),
    );
    Ok(())
}

/// Adds the enrollment label to a Pod manifest's `metadata.labels`.
fn enroll(text: &str) -> Result<String> {
    const LABELS: &str = "\n  labels:\n";
    if text.contains(MESH_LABEL_LINE) {
        return Ok(text.to_string());
    }
    let at = text
        .find(LABELS)
        .context("no `  labels:` block under metadata")?
        + LABELS.len();
    Ok(format!("{}{MESH_LABEL_LINE}{}", &text[..at], &text[at..]))
}

/// Waits (10 s at most) until `pred` holds for the `mesh` map of both agents' `/debug/policies`.
fn wait_mesh(
    agents: [&Agent; 2],
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> Result<()> {
    for a in agents {
        eventually(Duration::from_secs(10), Duration::from_millis(50), || {
            if interrupted() {
                return Ok(());
            }
            let v: serde_json::Value = a
                .get_json("/debug/policies")
                .map_err(|e| format!("{e:#}"))?;
            if pred(&v["mesh"]) {
                Ok(())
            } else {
                Err(format!("mesh view: {}", v["mesh"]))
            }
        })
        .map_err(|e| anyhow::anyhow!("{}: waiting for {what}: {e}", a.options().node))?;
    }
    check_interrupt()
}

/// The `--ca-dir` an agent runs with.
fn agent_ca_dir(a: &Agent) -> String {
    let args = &a.options().extra_args;
    args.iter()
        .position(|x| x == "--ca-dir")
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_default()
}

/// `sinew::access` records in the agent's log about connections to `dst`'s port [`TARGET_PORT`].
fn access_lines(agent: &Agent, dst: &Pod) -> Vec<String> {
    let needle = format!("{}:{TARGET_PORT}", dst.ip4);
    std::fs::read_to_string(agent.log_path())
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("sinew::access") && l.contains(&needle))
        .map(str::to_string)
        .collect()
}

/// What a one-round-trip `hold` got.
fn answer(r: &HoldReport) -> String {
    match (&r.name, &r.first_error) {
        (Some(name), None) if r.round_trips > 0 => {
            format!("answered by {name}, payload echoed back")
        }
        _ => format!(
            "FAILED (connected {}, answer {:?}, error {:?})",
            r.connected, r.name, r.first_error
        ),
    }
}

/// The TCP connections in a capture, both directions merged: `a:p <-> b:q (n packets)`.
fn tcp_flows(c: &Captured) -> String {
    let mut conns: BTreeMap<String, usize> = BTreeMap::new();
    for p in c.packets().filter(|p| p.key.proto == proto::TCP) {
        let (a, b) = (
            format!("{}:{}", p.key.src, p.key.sport),
            format!("{}:{}", p.key.dst, p.key.dport),
        );
        // The side with the lower port is the server: list it second.
        let key = if p.key.sport < p.key.dport {
            format!("{b} <-> {a}")
        } else {
            format!("{a} <-> {b}")
        };
        *conns.entry(key).or_default() += 1;
    }
    if conns.is_empty() {
        return "no TCP".into();
    }
    conns
        .iter()
        .map(|(k, n)| format!("TCP {k} ({n} packets)"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The agent of `node` with the run's shared CA (`AgentOptions::for_node`: the proxy in the node's netns).
fn start_agent(node: &Node, source: &SourceDir, ca_dir: &Path) -> Result<Agent> {
    let mut o = AgentOptions::for_node(node, source.path(), None)?;
    o.extra_args
        .extend(["--ca-dir".to_string(), ca_dir.display().to_string()]);
    Agent::start_with(o).with_context(|| format!("starting the agent of {}", node.name()))
}

/// One node and its pods, for step 1.
fn print_node<'a>(node: &Node, pods: impl Iterator<Item = &'a Pod>) {
    println!(
        "node {}: netns {}, bridge br0 {}/24, cgroup root {}",
        node.name(),
        node.netns().name(),
        node.bridge_ip4(),
        node.cgroup_root().display()
    );
    for p in pods {
        println!(
            "  pod {:<7} {:<12} netns {:<24} cgroup {}",
            p.name,
            p.ip4.to_string(),
            p.netns_name(),
            p.cgroup_dir().display()
        );
    }
}

/// Checks that the demo/bench can run here and points the harness at `agent_bin` and the `sinew-testpod` built
/// next to it; returns the latter. Also removes leftovers of earlier runs that were killed with SIGKILL.
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
                .iter()
                .chain(&PODS_B)
                .any(|p| *p == pod)
                .then(|| topo.pod(pod))
                .with_context(|| format!("{}: no pod {pod:?} in the demo topology", f.display()))?;
            if !text.contains(&format!("podIP: {}\n", p.ip4)) {
                bail!(
                    "{}: podIP is not {}, the address the demo gives pod {pod}",
                    f.display(),
                    p.ip4
                );
            }
            if !text.contains(&format!("hostIP: {}\n", p.host_ip)) {
                bail!(
                    "{}: hostIP is not {}, the address of node {} (where other nodes' proxies tunnel to)",
                    f.display(),
                    p.host_ip,
                    p.node
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

/// Waits until `vip`'s TCP frontend (port 80) has exactly `want` (`ip:port`) as backends in `dump services`.
fn wait_backends(
    cli: &sinew_tests::AgentCli,
    vip: &str,
    want: &[String],
    timeout: Duration,
) -> Result<()> {
    let mut want: Vec<String> = want.to_vec();
    want.sort();
    eventually(timeout, Duration::from_millis(50), || {
        if interrupted() {
            return Ok(());
        }
        let dump = cli.dump_services().map_err(|e| format!("{e:#}"))?;
        let svc = dump
            .iter()
            .find(|s| s.vip == vip && s.port == TCP_PORT && s.proto == "tcp")
            .ok_or_else(|| format!("{vip}:{TCP_PORT}/tcp not in dump services: {dump:?}"))?;
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

/// Like [`show`], printing only the block of the output that starts with a line beginning with `header` (up to the
/// next blank line).
fn show_section(title: &str, cmd: &mut Command, header: &str) {
    println!("{title}");
    match sinew_tests::util::run_bounded(cmd, Duration::from_secs(10)) {
        Ok((status, out, err)) => {
            let block: Vec<&str> = out
                .lines()
                .skip_while(|l| !l.starts_with(header))
                .take_while(|l| !l.trim().is_empty())
                .collect();
            if block.is_empty() || !status.success() {
                for l in out.lines().chain(err.lines()) {
                    println!("  {l}");
                }
                println!("  (exited with {status}; no {header} block)");
            }
            for l in block {
                println!("  {l}");
            }
        }
        Err(e) => println!("  failed: {e:#}"),
    }
    println!();
}

/// Keeps the demo up until SIGINT/SIGTERM (or [`MAX_HOLD`]). Backend servers exit after 10 minutes by design
/// (`sinew-testpod` bounds every process's lifetime), so they are restarted when they do; the agent is not (if it
/// dies the programs stay attached and balancing goes on, which is worth seeing).
fn hold_until_interrupted(
    agents: &mut [Agent],
    backends: &[Pod],
    servers: &mut [Proc],
) -> Result<()> {
    let start = Instant::now();
    let mut agent_gone = vec![false; agents.len()];
    while start.elapsed() < MAX_HOLD {
        if interrupted() {
            println!("\nsignal received");
            return Ok(());
        }
        for (agent, gone) in agents.iter_mut().zip(agent_gone.iter_mut()) {
            if let Some(s) = agent.exited().filter(|_| !*gone) {
                *gone = true;
                println!(
                    "mesh-agent of {} exited ({s}); the pinned programs keep balancing, its proxy is gone. Log tail:\n{}",
                    agent.options().node,
                    agent.log_tail(10)
                );
            }
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
