//! The node proxy with mTLS (issue 4), end to end: real namespaces, processes, eBPF and agents, two nodes joined by
//! the underlay unless said otherwise, one CA shared by every agent (`--ca-dir`).
//!
//! Universe: on `n1` the client `cli` (enrolled, sa `cli`) and `stranger` (a Pod object without the enrollment
//! label); on `n2` the server `web` (enrolled, sa `web`, `app=web`, echo server on 8080), behind the Service `web`
//! (`10.96.0.10:80` -> 8080). Tests add what they need on top.
//!
//! What each test proves is in its doc comment. Metric names used are collected in the constants below.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sinew_tests::capture::{Capture, FlowKey, proto};
use sinew_tests::manifest::{
    Service, ServicePort, authorization_policy as ap, namespace, peer_authentication as pa,
};
use sinew_tests::mesh::{
    FakeTunnel, Hold, HoldReport, MESH_LABEL, MeshFixture, MeshOptions, MeshPod, PROXY_ADDR,
    PROXY_ID, TUNNEL_PORT, cert, certs, hbone_connect, probe1, spiffe, tls_probe,
    tunnel_client_config, tunnel_server_config,
};
use sinew_tests::testpod::{PROBE_EACCES, PROBE_OK, PROBE_TIMEOUT};
use sinew_tests::{Metrics, eventually, require_privileged, testpod_bin, unix_ms};

mod common;
use common::series_like;

const VIP: &str = "10.96.0.10";

// Metric names (see mesh-agent/src/proxy/metrics.rs and mesh-agent/src/metrics.rs).
const OPENED: &str = "istio_tcp_connections_opened_total";
const RECEIVED_BYTES: &str = "istio_tcp_received_bytes_total";
const REDIRECTED: &str = "sinew_proxy_redirected_total";
const KERNEL_REFUSED: &str = "sinew_proxy_kernel_refused_total";
const STRICT_DENIED: &str = "sinew_mtls_strict_denied_total";
const PROXY_REFUSED: &str = "sinew_proxy_refused_total";
const TLS_REJECTIONS: &str = "sinew_proxy_tls_rejections_total";
const HANDSHAKES: &str = "sinew_proxy_tunnel_handshakes_total";
const SVID_RENEWED: &str = "sinew_svid_renewed_total";

fn web_service() -> Service {
    Service::new("web", VIP)
        .port(ServicePort::tcp("http", 80, 8080))
        .selector("app", "web")
}

/// Builds the fixture or panics with the reason.
fn setup(name: &str, nodes: &[(&str, Vec<MeshPod>)], opts: MeshOptions) -> MeshFixture {
    MeshFixture::setup(name, testpod_bin!(), nodes, &opts)
        .unwrap_or_else(|e| panic!("{name}: setup failed: {e:#}"))
}

/// The standard two-node universe plus `more_n1` / `more_n2`.
fn universe(
    name: &str,
    more_n1: Vec<MeshPod>,
    more_n2: Vec<MeshPod>,
    agent_args: &[&str],
) -> MeshFixture {
    let mut n1 = vec![MeshPod::enrolled("cli"), MeshPod::plain("stranger")];
    n1.extend(more_n1);
    let mut n2 = vec![MeshPod::enrolled("web").serve(&[8080])];
    n2.extend(more_n2);
    setup(
        name,
        &[("n1", n1), ("n2", n2)],
        MeshOptions {
            agent_args: agent_args.iter().map(|s| s.to_string()).collect(),
            services: vec![web_service()],
            files: Vec::new(),
        },
    )
}

fn tcp(ip: impl std::fmt::Display, port: u16) -> String {
    format!("tcp:{ip}:{port}")
}

/// One probe that must give `want` now.
fn expect_outcome(f: &MeshFixture, pod: &str, target: &str, managed: bool, want: &str) {
    let probe_ms = if want == PROBE_TIMEOUT { 800 } else { 2000 };
    let o = probe1(&f.pod(pod), target, managed, probe_ms)
        .unwrap_or_else(|e| panic!("probing {target} from {pod}: {e:#}"));
    assert_eq!(
        o,
        want,
        "{pod} -> {target} ({}): want {want}, got {o}\n{}",
        if managed { "managed" } else { "unmanaged" },
        f.logs(40)
    );
}

/// A probe that must be accepted by the proxy (the kernel let it through) and then closed without any data. The
/// proxy closes a refused connection with a RST, which can arrive before the client's `connect()` returns
/// (`ECONNRESET`) or after it (`echo:<why>`); a kernel refusal (`EACCES`), nobody listening (`ECONNREFUSED`), a
/// timeout or data (`ok`) are all failures.
fn expect_closed_without_data(f: &MeshFixture, pod: &str, target: &str, managed: bool) -> String {
    let o = probe1(&f.pod(pod), target, managed, 3000)
        .unwrap_or_else(|e| panic!("probing {target} from {pod}: {e:#}"));
    assert!(
        o == "ECONNRESET" || (o.starts_with("echo:") && o != "echo:timeout"),
        "{pod} -> {target}: want the connection accepted and then closed without data (ECONNRESET or \
         echo:<why>), got {o}\n{}",
        f.logs(40)
    );
    o
}

fn assert_hold_ok(r: &HoldReport, want_name: &str, what: &str) {
    assert!(
        r.connected && r.first_error.is_none() && r.name.as_deref() == Some(want_name),
        "{what}: {r:#?}"
    );
}

/// `sinew_proxy_tls_rejections_total{side, reason}`.
fn rejections(m: &Metrics, side: &str, reason: &str) -> f64 {
    m.value(TLS_REJECTIONS, &[("side", side), ("reason", reason)])
}

/// Cross-node traffic between enrolled pods is carried only by the mTLS tunnel: on n1's underlay interface there is
/// TCP between the node addresses with 15008 on one side and nothing else, and the app's bytes never appear in
/// clear. Both proxies report the connection with Istio's metrics and the authenticated principals. New
/// connections reuse the pooled tunnel.
#[test]
fn cross_node_traffic_is_mtls_on_15008_only() {
    if !require_privileged("cross_node_traffic_is_mtls_on_15008_only") {
        return;
    }
    let f = universe("mtls-wire", vec![], vec![], &[]);
    let cli = f.pod("cli");
    let (ip1, ip2) = (f.node_ip("n1"), f.node_ip("n2"));
    let n1_ns = f.topo.node("n1").netns().path();
    let capture = || {
        Capture::start(&n1_ns, "ul0", 50_000, Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("capture on n1/ul0: {e:#}"))
    };

    // Control: the unenrolled stranger's plaintext (no PeerAuthentication: allowed) is visible on the wire, so the
    // capture would see the marker if the mesh leaked it.
    let control = format!("SINEW-CONTROL-MARKER-{}-{}", std::process::id(), unix_ms());
    let cap = capture();
    let r = Hold::once(&format!("{}:8080", f.pod("web").ip4), &control)
        .run(&f.pod("stranger"))
        .expect("hold");
    assert_hold_ok(&r, "web", "stranger -> web in plaintext");
    let captured = cap.stop().expect("capture");
    assert!(
        captured.payload_contains(control.as_bytes()),
        "the control marker sent in plaintext was not captured: {}",
        captured.summary()
    );

    let cap = capture();

    let marker = format!(
        "SINEW-CLEARTEXT-MARKER-{}-{}",
        std::process::id(),
        unix_ms()
    );
    let r = Hold::once(&format!("{VIP}:80"), &marker)
        .run(&cli)
        .expect("hold");
    assert_hold_ok(&r, "web", "cli -> web VIP with the marker");
    assert_eq!(r.round_trips, 1, "{r:#?}");

    // Pooling: 20 more connections, one after the other.
    let c = cli
        .tcp_connect(&format!("{VIP}:80"), 20, 0, 2000)
        .expect("tcp-connect");
    assert!(c.ok == 20 && c.failed == 0, "20 connections: {c:#?}");
    let captured = cap.stop().expect("capture");

    // On the wire: TCP only between the node addresses, always with 15008 on one side; never the marker.
    let nodes = [IpAddr::V4(ip1), IpAddr::V4(ip2)];
    let tcp_flows: Vec<FlowKey> = captured
        .flows()
        .into_iter()
        .filter(|k| k.proto == proto::TCP)
        .collect();
    let tunnel_packets = captured
        .packets()
        .filter(|p| {
            p.key.proto == proto::TCP && (p.key.sport == TUNNEL_PORT || p.key.dport == TUNNEL_PORT)
        })
        .count();
    assert!(
        tunnel_packets > 0,
        "no tunnel packet on n1/ul0: {}",
        captured.summary()
    );
    let other: Vec<String> = tcp_flows
        .iter()
        .filter(|k| {
            !(nodes.contains(&k.src)
                && nodes.contains(&k.dst)
                && (k.sport == TUNNEL_PORT || k.dport == TUNNEL_PORT))
        })
        .map(ToString::to_string)
        .collect();
    assert!(
        other.is_empty(),
        "TCP on the underlay that is not the tunnel between the nodes: {other:#?}\n{}",
        captured.summary()
    );
    assert!(
        !captured.contains(marker.as_bytes()),
        "the marker crossed the underlay in clear text: {}",
        captured.summary()
    );
    assert!(
        !captured.truncated,
        "capture bound reached: {}",
        captured.summary()
    );

    // Metrics: 21 app connections reported by both sides with the authenticated principals, over mutual TLS.
    let (cli_id, web_id) = (f.principal("cli"), f.principal("web"));
    let labels = |reporter: &'static str| -> Vec<(&'static str, String)> {
        vec![
            ("reporter", reporter.to_string()),
            ("connection_security_policy", "mutual_tls".to_string()),
            ("source_principal", cli_id.clone()),
            ("destination_principal", web_id.clone()),
            ("source_workload", "cli".to_string()),
            ("destination_workload", "web".to_string()),
        ]
    };
    let get = |m: &Metrics, name: &str, l: &[(&'static str, String)]| -> f64 {
        let l: Vec<(&str, &str)> = l.iter().map(|(k, v)| (*k, v.as_str())).collect();
        m.value(name, &l)
    };
    // The destination side counts a connection when its stream is set up; give it a moment to settle.
    let m1 = f.metrics("n1");
    let mut m2 = f.metrics("n2");
    let _ = eventually(Duration::from_secs(3), Duration::from_millis(100), || {
        m2 = f.metrics("n2");
        if get(&m2, OPENED, &labels("destination")) >= 21.0 {
            Ok(())
        } else {
            Err(String::new())
        }
    });
    assert_eq!(
        get(&m1, OPENED, &labels("source")),
        21.0,
        "n1 (source reporter): {}",
        series_like(&m1, "istio_tcp_connections_opened")
    );
    assert_eq!(
        get(&m2, OPENED, &labels("destination")),
        21.0,
        "n2 (destination reporter): {}",
        series_like(&m2, "istio_tcp_connections_opened")
    );
    // The marker's bytes reached the server through n2's proxy.
    assert!(
        get(&m2, RECEIVED_BYTES, &labels("destination")) >= marker.len() as f64,
        "{}",
        series_like(&m2, "istio_tcp_received_bytes")
    );
    assert!(
        m1.value(REDIRECTED, &[]) >= 21.0,
        "n1 kernel redirects: {}",
        series_like(&m1, "redirected")
    );
    let hs = m1.value(HANDSHAKES, &[]);
    assert!(
        (1.0..=2.0).contains(&hs),
        "21 connections from one identity to one node must share a pooled tunnel (at most 2 handshakes), got \
         {hs}: {}",
        series_like(&m1, "handshakes")
    );
}

/// AuthorizationPolicy by principal across nodes: an ALLOW for cli admits only cli (another enrolled identity on the
/// same node is refused at its connect), and n2's proxy itself judges the tunnel's authenticated identity (a raw
/// HBONE stream with the other identity's SVID gets 403, with cli's it is carried). A DENY for cli flips both.
#[test]
fn policy_by_principal_across_nodes() {
    if !require_privileged("policy_by_principal_across_nodes") {
        return;
    }
    let f = universe("mtls-authz", vec![MeshPod::enrolled("other")], vec![], &[]);
    let web = f.pod("web");
    let (web_t, vip_t) = (tcp(web.ip4, 8080), tcp(VIP, 80));
    let authority = format!("{}:8080", web.ip4);
    let n1_ns = f.topo.node("n1").netns().path();
    let tunnel = SocketAddr::new(f.node_ip("n2").into(), TUNNEL_PORT);
    let raw = |as_pod: &str| {
        let cfg = tunnel_client_config(&f.svid_of(as_pod), &f.ca, Some(PROXY_ID)).expect("config");
        hbone_connect(
            &n1_ns,
            tunnel,
            cfg,
            &authority,
            b"ping",
            8,
            Duration::from_secs(5),
        )
        .expect("hbone")
    };
    for who in ["cli", "other"] {
        expect_outcome(&f, who, &web_t, true, PROBE_OK);
    }

    let cli_id = f.principal("cli");
    let allow = [ap(
        "default",
        "web-allow-cli",
        json!({"selector": {"matchLabels": {"app": "web"}}, "action": "ALLOW",
               "rules": [{"from": [{"source": {"principals": [cli_id]}}]}]}),
    )];
    f.set_policies(&allow).expect("policies in force");
    for t in [&web_t, &vip_t] {
        expect_outcome(&f, "cli", t, true, PROBE_OK);
        expect_outcome(&f, "other", t, true, PROBE_EACCES);
    }
    // The destination's proxy: the identity is the tunnel's client certificate (the connection comes from n1's
    // node address, which is no workload).
    let before = f
        .metrics("n2")
        .value(PROXY_REFUSED, &[("reason", "policy_denied")]);
    let o = raw("other");
    assert_eq!(
        o.status,
        Some(403),
        "other's SVID, ALLOW cli only: {o:?}\n{}",
        f.logs(30)
    );
    assert!(o.received.is_empty(), "{o:?}");
    let after = f
        .metrics("n2")
        .value(PROXY_REFUSED, &[("reason", "policy_denied")]);
    assert_eq!(
        after - before,
        1.0,
        "{}",
        series_like(&f.metrics("n2"), "refused")
    );
    let o = raw("cli");
    assert_eq!(
        o.status,
        Some(200),
        "cli's SVID, ALLOW cli: {o:?}\n{}",
        f.logs(30)
    );
    assert_eq!(o.text(), "web\nping", "{o:?}");

    let deny = [ap(
        "default",
        "web-deny-cli",
        json!({"selector": {"matchLabels": {"app": "web"}}, "action": "DENY",
               "rules": [{"from": [{"source": {"principals": [f.principal("cli")]}}]}]}),
    )];
    f.set_policies(&deny).expect("policies in force");
    for t in [&web_t, &vip_t] {
        expect_outcome(&f, "cli", t, true, PROBE_EACCES);
        expect_outcome(&f, "other", t, true, PROBE_OK);
    }
    let o = raw("cli");
    assert_eq!(
        o.status,
        Some(403),
        "cli's SVID, DENY cli: {o:?}\n{}",
        f.logs(30)
    );
    let o = raw("other");
    assert_eq!(
        o.status,
        Some(200),
        "other's SVID, DENY cli: {o:?}\n{}",
        f.logs(30)
    );
    assert_eq!(o.text(), "web\nping", "{o:?}");
    // The allowed connections of `other` reached web as `other`, over mutual TLS.
    let m2 = f.metrics("n2");
    let other_id = f.principal("other");
    assert!(
        m2.value(
            OPENED,
            &[
                ("reporter", "destination"),
                ("source_principal", other_id.as_str()),
                ("connection_security_policy", "mutual_tls"),
            ]
        ) >= 1.0,
        "{}",
        series_like(&m2, "opened")
    );
}

/// STRICT (namespace-wide, then per workload with a port-level exception) admits only the node proxy: an
/// unenrolled pod's connect fails with EACCES on its own node, its unmanaged plaintext SYN is dropped at n2 (and
/// counted), while the enrolled client still gets through by VIP and pod IP. PERMISSIVE on the workload (which
/// beats the namespace's STRICT) lets plaintext in again.
#[test]
fn strict_drops_plaintext_from_unenrolled() {
    if !require_privileged("strict_drops_plaintext_from_unenrolled") {
        return;
    }
    // web serves 8081 too, for the port-level exception.
    let f = setup(
        "mtls-strict",
        &[
            (
                "n1",
                vec![MeshPod::enrolled("cli"), MeshPod::plain("stranger")],
            ),
            ("n2", vec![MeshPod::enrolled("web").serve(&[8080, 8081])]),
        ],
        MeshOptions {
            services: vec![web_service()],
            ..Default::default()
        },
    );
    let web = f.pod("web");
    let (w80, w81, vip) = (tcp(web.ip4, 8080), tcp(web.ip4, 8081), tcp(VIP, 80));
    let in_force = |mode: &str, ports: &[(u16, &str)]| {
        f.wait_mtls("web", mode, ports, Duration::from_secs(10))
            .unwrap_or_else(|e| {
                panic!(
                    "mTLS {mode} {ports:?} for web not in force: {e:#}\n{}",
                    f.logs(30)
                )
            })
    };
    // No PeerAuthentication: PERMISSIVE, plaintext from the stranger is fine.
    in_force("PERMISSIVE", &[]);
    expect_outcome(&f, "stranger", &w80, true, PROBE_OK);
    expect_outcome(&f, "stranger", &w80, false, PROBE_OK);

    // 1. STRICT for the whole namespace.
    let ns_strict = pa(
        "default",
        "default-strict",
        json!({"mtls": {"mode": "STRICT"}}),
    );
    f.set_peer_authentications(std::slice::from_ref(&ns_strict))
        .expect("write");
    in_force("STRICT", &[]);
    let before = f.metrics("n2").value(STRICT_DENIED, &[]);
    expect_outcome(&f, "stranger", &w80, true, PROBE_EACCES);
    expect_outcome(&f, "stranger", &w81, true, PROBE_EACCES);
    expect_outcome(&f, "stranger", &w80, false, PROBE_TIMEOUT);
    let m2 = f.metrics("n2");
    assert!(
        m2.value(STRICT_DENIED, &[]) > before,
        "n2 must count the dropped plaintext SYN: {}",
        series_like(&m2, "strict")
    );
    for t in [&w80, &w81, &vip] {
        expect_outcome(&f, "cli", t, true, PROBE_OK);
    }
    // `policy check` explains the mesh's part: no policy denies, but STRICT refuses the stranger's plaintext, and
    // cli's connection is carried and judged by the proxies.
    let explain = |from: &str| -> String {
        let ip = f.pod(from).ip4.to_string();
        let c = f
            .agent("n2")
            .policy_check(&ip, "default/web", 8080, "tcp")
            .expect("policy check");
        assert!(
            c.allowed,
            "no AuthorizationPolicy: allowed by policy: {c:?}"
        );
        c.extra
            .get("mtls")
            .and_then(|v| v.as_str())
            .unwrap_or_else(|| panic!("no mesh explanation for {from}: {c:?}"))
            .to_string()
    };
    let stranger = explain("stranger");
    assert!(
        stranger.contains("STRICT") && stranger.contains("REFUSED"),
        "{stranger}"
    );
    let cli = explain("cli");
    assert!(
        cli.contains("STRICT") && cli.contains("node proxies") && !cli.contains("REFUSED"),
        "{cli}"
    );

    // 2. PERMISSIVE on the workload beats the namespace's STRICT.
    let web_permissive = pa(
        "default",
        "web-permissive",
        json!({"selector": {"matchLabels": {"app": "web"}}, "mtls": {"mode": "PERMISSIVE"}}),
    );
    f.set_peer_authentications(&[ns_strict.clone(), web_permissive])
        .expect("write");
    in_force("PERMISSIVE", &[]);
    expect_outcome(&f, "stranger", &w80, true, PROBE_OK);
    expect_outcome(&f, "stranger", &w80, false, PROBE_OK);
    expect_outcome(&f, "stranger", &w81, false, PROBE_OK);
    expect_outcome(&f, "cli", &vip, true, PROBE_OK);

    // 3. STRICT on the workload with 8081 PERMISSIVE: plaintext on 8081 only.
    let web_strict_but_8081 = pa(
        "default",
        "web-strict-8081-permissive",
        json!({"selector": {"matchLabels": {"app": "web"}}, "mtls": {"mode": "STRICT"},
               "portLevelMtls": {"8081": {"mode": "PERMISSIVE"}}}),
    );
    f.set_peer_authentications(&[ns_strict, web_strict_but_8081])
        .expect("write");
    in_force("STRICT", &[(8081, "PERMISSIVE")]);
    expect_outcome(&f, "stranger", &w80, true, PROBE_EACCES);
    expect_outcome(&f, "stranger", &w81, true, PROBE_OK);
    expect_outcome(&f, "stranger", &w81, false, PROBE_OK);
    expect_outcome(&f, "stranger", &w80, false, PROBE_TIMEOUT);
    for t in [&w80, &w81, &vip] {
        expect_outcome(&f, "cli", t, true, PROBE_OK);
    }
}

/// With 20 s SVIDs (renewed at half-life), one connection doing a round trip every 500 ms for 15 s never fails
/// while both nodes renew the proxy's and the workloads' certificates under it; new connections work afterwards.
#[test]
fn rotation_keeps_open_connections() {
    if !require_privileged("rotation_keeps_open_connections") {
        return;
    }
    let f = universe("mtls-rotate", vec![], vec![], &["--svid-lifetime", "20s"]);
    let web = f.pod("web");
    let watched = [
        ("n1", "proxy", PROXY_ID.to_string()),
        ("n1", "workload", f.principal("cli")),
        ("n2", "proxy", PROXY_ID.to_string()),
        ("n2", "workload", f.principal("web")),
    ];
    let snapshot = |node: &str| certs(f.agent(node)).expect("/debug/certs");
    let before = [("n1", snapshot("n1")), ("n2", snapshot("n2"))];
    let initial = |node: &str, role: &str, id: &str| {
        let list = &before.iter().find(|(n, _)| *n == node).expect("node").1;
        cert(list, role, id)
            .unwrap_or_else(|| panic!("{node}: no {role} certificate for {id}: {list:#?}"))
            .clone()
    };

    let hold = Hold::every(&format!("{}:8080", web.ip4), 500, 15_000);
    let started = Instant::now();
    let proc = hold.spawn(&f.pod("cli")).expect("spawn hold");
    // Watch the renewals happen while the connection is open.
    let mut renewed_at: Option<u64> = None;
    let mut last = String::new();
    while started.elapsed() < Duration::from_secs(16) && renewed_at.is_none() {
        std::thread::sleep(Duration::from_millis(250));
        let now = [("n1", snapshot("n1")), ("n2", snapshot("n2"))];
        let pending: Vec<String> = watched
            .iter()
            .filter(|(node, role, id)| {
                let list = &now.iter().find(|(n, _)| n == node).expect("node").1;
                cert(list, role, id).is_none_or(|c| c.serial == initial(node, role, id).serial)
            })
            .map(|(n, r, i)| format!("{n} {r} {i}"))
            .collect();
        if pending.is_empty() {
            renewed_at = Some(unix_ms());
        } else {
            last = format!("not renewed yet: {pending:?}");
        }
    }
    let report: HoldReport = proc
        .wait(hold.bound())
        .and_then(|o| o.json())
        .expect("hold report");
    assert_hold_ok(
        &report,
        "web",
        "the long-lived connection across the renewals",
    );
    assert!(report.round_trips >= 25, "{report:#?}");
    let renewed_at = renewed_at.unwrap_or_else(|| {
        panic!(
            "certificates not renewed within 16 s ({last})\n{}",
            f.logs(40)
        )
    });
    assert!(
        renewed_at + 1000 <= report.finished_unix_ms,
        "the renewals must happen while the connection is open: renewed at {renewed_at}, connection ended at \
         {}",
        report.finished_unix_ms
    );
    for (node, role, id) in &watched {
        let list = snapshot(node);
        let now = cert(&list, role, id).expect("listed");
        let was = initial(node, role, id);
        assert!(
            now.serial != was.serial && now.not_after > was.not_after,
            "{node} {role} {id}: before {was:?}, after {now:?}"
        );
    }
    for node in ["n1", "n2"] {
        let m = f.metrics(node);
        assert!(
            m.value(SVID_RENEWED, &[]) > 0.0,
            "{node}: {}",
            series_like(&m, "renew")
        );
    }
    // A new connection after the renewals (a new pooled tunnel may or may not be needed; either way it works).
    let r = Hold::once(&format!("{VIP}:80"), "after-renewal")
        .run(&f.pod("cli"))
        .expect("hold");
    assert_hold_ok(&r, "web", "a new connection after the renewals");
}

/// n2's tunnel port refuses client certificates that are not SVIDs of the mesh, each counted with its reason, and
/// takes a good one; n1's proxy refuses a tunnel server whose certificate (from the right CA) is not the node
/// proxy's identity, and the app connection gets no data.
#[test]
fn bad_certificates_are_refused() {
    if !require_privileged("bad_certificates_are_refused") {
        return;
    }
    // decoy's hostIP is the address of `impostor`, a netns no object describes, where the test runs a fake tunnel
    // server (n2's own 15008 is the real proxy's, on every address).
    let decoy = MeshPod::enrolled("decoy")
        .serve(&[8080])
        .host_ip_of_pod("impostor");
    let f = universe(
        "mtls-badcerts",
        vec![],
        vec![decoy, MeshPod::hidden("impostor")],
        &[],
    );
    let n1_ns = f.topo.node("n1").netns().path();
    let tunnel = SocketAddr::new(f.node_ip("n2").into(), TUNNEL_PORT);
    let ca = &f.ca;
    let good = f.principal("cli");
    let crafted = |uris: &[&str], nb: i64, na: i64, is_ca: bool| {
        mesh_agent::identity::testing::crafted(ca, uris, nb, na, is_ca).expect("crafting")
    };
    let other_ca = mesh_agent::identity::Ca::generate("cluster.local").expect("CA");
    let second = spiffe("default", "other");
    let cases = vec![
        (
            "unknown_ca",
            other_ca.issue("default", "cli").expect("issue"),
        ),
        (
            "wrong_trust_domain",
            crafted(
                &["spiffe://elsewhere.test/ns/default/sa/cli"],
                -60,
                3600,
                false,
            ),
        ),
        ("expired", crafted(&[&good], -7200, -3600, false)),
        ("not_yet_valid", crafted(&[&good], 3600, 7200, false)),
        (
            "multiple_uri_sans",
            crafted(&[&good, &second], -60, 3600, false),
        ),
        ("leaf_is_ca", crafted(&[&good], -60, 3600, true)),
        ("no_uri_san", crafted(&[], -60, 3600, false)),
        (
            "malformed_spiffe_id",
            crafted(&["spiffe://cluster.local/not/a/workload"], -60, 3600, false),
        ),
    ];
    let before = f.metrics("n2");
    let mut problems = Vec::new();
    for (reason, svid) in &cases {
        let cfg = tunnel_client_config(svid, ca, Some(PROXY_ID)).expect("client config");
        let p = tls_probe(&n1_ns, tunnel, cfg, Duration::from_secs(5)).expect("probe");
        if p.accepted() {
            problems.push(format!("{reason}: the tunnel server accepted it: {p:?}"));
        }
    }
    let after = f.metrics("n2");
    for (reason, _) in &cases {
        let d = rejections(&after, "inbound", reason) - rejections(&before, "inbound", reason);
        if d != 1.0 {
            problems.push(format!("{reason}: inbound rejections counted {d}, want 1"));
        }
    }
    assert!(
        problems.is_empty(),
        "{}\n{}\n{}",
        problems.join("\n"),
        series_like(&after, "tls_rejections"),
        f.logs(30)
    );
    // Control: a good SVID from the mesh CA is accepted, with h2.
    let cfg = tunnel_client_config(&f.svid_of("cli"), ca, Some(PROXY_ID)).expect("config");
    let p = tls_probe(&n1_ns, tunnel, cfg, Duration::from_secs(5)).expect("probe");
    assert!(p.accepted(), "a good SVID: {p:?}\n{}", f.logs(30));
    assert_eq!(p.alpn.as_deref(), Some("h2"), "{p:?}");

    // Outbound: decoy's hostIP leads n1's proxy to a server with a valid certificate for another identity.
    let impostor = f.pod("impostor");
    let fake = FakeTunnel::start(
        &impostor.netns_path(),
        SocketAddr::new(impostor.ip4.into(), TUNNEL_PORT),
        tunnel_server_config(&f.ca.issue("default", "impostor").expect("issue"), &f.ca)
            .expect("server config"),
        Duration::from_secs(30),
    )
    .expect("fake tunnel");
    let before = rejections(&f.metrics("n1"), "outbound", "spiffe_id_mismatch");
    expect_closed_without_data(&f, "cli", &tcp(f.pod("decoy").ip4, 8080), true);
    let report = fake.stop();
    assert!(
        report.accepted >= 1,
        "n1's proxy never dialled the impostor: {report:?}\n{}",
        f.logs(30)
    );
    let m1 = f.metrics("n1");
    assert!(
        rejections(&m1, "outbound", "spiffe_id_mismatch") > before,
        "{}\nfake tunnel: {report:?}\n{}",
        series_like(&m1, "tls_rejections"),
        f.logs(30)
    );
}

/// The proxy's outbound port is not a service: an enrolled workload's connect to it fails in the kernel with
/// EACCES (counted), and a process that bypasses the kernel check reaches it but is closed without data (counted
/// as not redirected).
#[test]
fn workloads_cannot_reach_the_proxy_ports_directly() {
    if !require_privileged("workloads_cannot_reach_the_proxy_ports_directly") {
        return;
    }
    let f = setup(
        "mtls-proxyports",
        &[(
            "n1",
            vec![
                MeshPod::enrolled("cli"),
                MeshPod::enrolled("web").serve(&[8080]),
            ],
        )],
        MeshOptions::default(),
    );
    let target = tcp(PROXY_ADDR, sinew_tests::mesh::OUTBOUND_PORT);
    let before = f.metrics("n1");
    expect_outcome(&f, "cli", &target, true, PROBE_EACCES);
    let mid = f.metrics("n1");
    assert!(
        mid.value(KERNEL_REFUSED, &[]) > before.value(KERNEL_REFUSED, &[]),
        "{}",
        series_like(&mid, "kernel_refused")
    );
    let nr = |m: &Metrics| m.value(PROXY_REFUSED, &[("reason", "not_redirected")]);
    expect_closed_without_data(&f, "cli", &target, false);
    let after = f.metrics("n1");
    assert_eq!(
        nr(&after) - nr(&mid),
        1.0,
        "{}",
        series_like(&after, "refused")
    );
}

/// Between two enrolled pods of one node the proxy carries the connection without TLS (no tunnel handshake,
/// security policy "none", both reporters on the node), a pod is enrolled by its Namespace's label unless its own
/// label says `disabled`, and a principal policy still applies.
#[test]
fn same_node_goes_through_the_proxy_without_tls() {
    if !require_privileged("same_node_goes_through_the_proxy_without_tls") {
        return;
    }
    let f = setup(
        "mtls-samenode",
        &[(
            "n1",
            vec![
                MeshPod::enrolled("cli"),
                MeshPod::enrolled("other"),
                MeshPod::enrolled("api").serve(&[8080]),
                // Enrolled by their Namespace's label, and opted out by its own.
                MeshPod::plain("shopper").namespace("shop"),
                MeshPod::plain("optout")
                    .namespace("shop")
                    .label(MESH_LABEL, "disabled"),
            ],
        )],
        MeshOptions {
            files: vec![(
                "namespaces.yaml".into(),
                vec![namespace("shop", &[(MESH_LABEL, "enabled")])],
            )],
            ..Default::default()
        },
    );
    let api = f.pod("api");
    let to = format!("{}:8080", api.ip4);
    let r = Hold::every(&to, 100, 1_000)
        .run(&f.pod("cli"))
        .expect("hold");
    assert_hold_ok(&r, "api", "cli -> api on one node");
    let r = Hold::once(&to, "same-node-bytes")
        .run(&f.pod("cli"))
        .expect("hold");
    assert_hold_ok(&r, "api", "cli -> api on one node");
    let m = f.metrics("n1");
    let (cli_id, api_id) = (f.principal("cli"), f.principal("api"));
    for reporter in ["source", "destination"] {
        let l = [
            ("reporter", reporter),
            ("connection_security_policy", "none"),
            ("source_principal", cli_id.as_str()),
            ("destination_principal", api_id.as_str()),
        ];
        assert_eq!(
            m.value(OPENED, &l),
            2.0,
            "reporter {reporter}: {}",
            series_like(&m, "opened")
        );
    }
    assert!(
        m.value(OPENED, &[("connection_security_policy", "mutual_tls")]) == 0.0
            && m.value(HANDSHAKES, &[]) == 0.0,
        "no TLS on one node: {}\n{}",
        series_like(&m, "opened"),
        series_like(&m, "handshakes")
    );
    assert!(
        m.value(REDIRECTED, &[]) >= 2.0,
        "{}",
        series_like(&m, "redirected")
    );
    assert!(
        m.value(RECEIVED_BYTES, &[("reporter", "destination")]) >= "same-node-bytes".len() as f64,
        "{}",
        series_like(&m, "received_bytes")
    );

    // Enrollment through the Namespace label: shopper's connection is carried by the proxy as shop/shopper;
    // optout's (pod label `disabled`) is not redirected at all.
    let redirected = |m: &Metrics| m.value(REDIRECTED, &[]);
    let before = f.metrics("n1");
    let r = Hold::once(&to, "from-shop")
        .run(&f.pod("shopper"))
        .expect("hold");
    assert_hold_ok(&r, "api", "shopper -> api");
    let mid = f.metrics("n1");
    let shopper_id = spiffe("shop", "shopper");
    assert_eq!(
        mid.value(
            OPENED,
            &[
                ("reporter", "destination"),
                ("source_principal", shopper_id.as_str()),
                ("connection_security_policy", "none"),
            ]
        ),
        1.0,
        "{}",
        series_like(&mid, "opened")
    );
    assert_eq!(redirected(&mid) - redirected(&before), 1.0);
    let r = Hold::once(&to, "opted-out")
        .run(&f.pod("optout"))
        .expect("hold");
    assert_hold_ok(&r, "api", "optout -> api");
    let after = f.metrics("n1");
    assert_eq!(
        redirected(&after) - redirected(&mid),
        0.0,
        "an opted-out pod must not be redirected: {}",
        series_like(&after, "redirected")
    );
    assert_eq!(
        after.value(OPENED, &[("source_principal", &spiffe("shop", "optout"))]),
        0.0,
        "{}",
        series_like(&after, "opened")
    );

    let policy: Vec<Value> = vec![ap(
        "default",
        "api-allow-other",
        json!({"selector": {"matchLabels": {"app": "api"}}, "action": "ALLOW",
               "rules": [{"from": [{"source": {"principals": [f.principal("other")]}}]}]}),
    )];
    f.set_policies(&policy).expect("policies in force");
    let t = tcp(api.ip4, 8080);
    expect_outcome(&f, "cli", &t, true, PROBE_EACCES);
    expect_outcome(&f, "other", &t, true, PROBE_OK);
}
