//! Connect-time load balancing through a real `mesh-agent`: TCP and UDP via the VIP, `getpeername`, connect6 with a
//! v4-mapped VIP, fail-fast for a service without endpoints, and the per-service counters.

mod common;

use std::time::{Duration, Instant};

use common::{assert_all_ok, balanced, fixture, metrics};
use sinew_tests::manifest::{Service, ServicePort};
use sinew_tests::scenario::{LbOptions, TCP_PORT, VIP};
use sinew_tests::{eventually, require_privileged};

/// Every backend reached at least once, nothing else reached.
fn assert_spread(r: &sinew_tests::testpod::ConnectReport, backends: &[&str]) {
    for b in backends {
        assert!(
            r.names.get(*b).copied().unwrap_or(0) > 0,
            "backend {b} got no connection: {:?}",
            r.names
        );
    }
    for n in r.names.keys() {
        assert!(
            backends.contains(&n.as_str()),
            "unexpected server {n}: {:?}",
            r.names
        );
    }
}

/// 60 connects to `to`: none fails, all three backends serve, and getpeername() shows `to` (the VIP), never the
/// backend the kernel connected the socket to.
fn assert_balanced_via(f: &sinew_tests::scenario::LbFixture, to: &str, what: &str) {
    let r = f.connect(to, 60, 0, 2000).expect("tcp-connect");
    assert_all_ok(&r, what);
    assert_spread(&r, &["b1", "b2", "b3"]);
    assert_eq!(
        r.peers.keys().collect::<Vec<_>>(),
        vec![to],
        "getpeername: {:?}",
        r.peers
    );
}

#[test]
fn tcp_via_vip_spreads_over_selector_backends() {
    if !require_privileged("tcp_via_vip_spreads_over_selector_backends") {
        return;
    }
    let f = fixture("lb-selector", LbOptions::default());
    assert_balanced_via(&f, &f.vip_tcp(), "60 connects via the VIP");
}

#[test]
fn tcp_via_vip_spreads_over_endpoint_slice_backends() {
    if !require_privileged("tcp_via_vip_spreads_over_endpoint_slice_backends") {
        return;
    }
    let f = fixture(
        "lb-endpointslice",
        LbOptions {
            endpoint_slice: true,
            ..Default::default()
        },
    );
    assert_balanced_via(&f, &f.vip_tcp(), "60 connects via the VIP (EndpointSlice)");
}

#[test]
fn connect6_to_v4_mapped_vip_is_balanced() {
    if !require_privileged("connect6_to_v4_mapped_vip_is_balanced") {
        return;
    }
    let f = fixture("lb-connect6", LbOptions::default());
    // An AF_INET6 socket connecting to ::ffff:VIP goes through connect6, not connect4.
    let to = format!("[::ffff:{VIP}]:{TCP_PORT}");
    assert_balanced_via(&f, &to, "60 connects to the v4-mapped VIP");
}

#[test]
fn udp_unconnected_replies_come_from_the_vip() {
    if !require_privileged("udp_unconnected_replies_come_from_the_vip") {
        return;
    }
    let f = fixture("lb-udp", LbOptions::default());
    let vip = f.vip_udp();
    // One unconnected socket: sendto(VIP) is rewritten per datagram, recvfrom() must report the VIP as the source.
    let u = f.client.udp_send(&vip, 20, 1000, false).expect("udp-send");
    assert_eq!((u.sent, u.received, u.failed), (20, 20, 0), "{u:#?}");
    assert_eq!(
        u.sources.keys().collect::<Vec<_>>(),
        vec![&vip],
        "recvfrom source: {u:#?}"
    );
    // A socket keeps its backend while the backends are unchanged.
    assert_eq!(
        u.names.len(),
        1,
        "one socket should stick to one backend: {u:#?}"
    );
    // Fresh sockets spread.
    let u = f
        .client
        .udp_send(&vip, 60, 1000, true)
        .expect("udp-send, new socket each");
    assert_eq!((u.received, u.failed), (60, 0), "{u:#?}");
    assert_eq!(
        u.sources.keys().collect::<Vec<_>>(),
        vec![&vip],
        "recvfrom source: {u:#?}"
    );
    assert!(
        u.names.len() >= 2,
        "60 sockets all went to one backend: {u:#?}"
    );
}

#[test]
fn service_without_endpoints_refuses_at_once() {
    if !require_privileged("service_without_endpoints_refuses_at_once") {
        return;
    }
    // Written before the agent starts, so the first connect already meets the agent's answer (an address the agent
    // does not know yet is merely unrouted, and ICMP rate limits can turn that into a timeout).
    let empty = Service::new("empty", "10.96.0.20")
        .port(ServicePort::tcp("http", 80, 8080))
        .selector("app", "nothing");
    let f = fixture(
        "lb-no-endpoints",
        LbOptions {
            backends: 1,
            extra_files: vec![("service-empty.yaml".into(), vec![empty.to_value()])],
            ..Default::default()
        },
    );
    let to = "10.96.0.20:80";
    let m0 = metrics(&f);
    let timeout_ms = 3000.0;
    let started = Instant::now();
    let r = f.connect(to, 5, 0, timeout_ms as u64).expect("tcp-connect");
    eprintln!(
        "no-endpoint connects took {:?} ms (whole run {:?})",
        r.failures.iter().map(|x| x.elapsed_ms).collect::<Vec<_>>(),
        started.elapsed()
    );
    assert_eq!((r.ok, r.failed), (0, 5), "{r:#?}");
    for fail in &r.failures {
        assert_eq!(
            fail.errno, "ECONNREFUSED",
            "an error from connect(), not a timeout: {fail:?}"
        );
        assert!(
            fail.elapsed_ms < timeout_ms,
            "failed by our own timeout, not by the agent: {fail:?}"
        );
    }
    let svc = [("service", "default/empty"), ("port", "80")];
    let d = eventually(Duration::from_secs(2), Duration::from_millis(50), || {
        let m = metrics(&f);
        let d = m.value("sinew_service_no_backend_total", &svc)
            - m0.value("sinew_service_no_backend_total", &svc);
        if d >= 5.0 {
            Ok(d)
        } else {
            Err(format!(
                "sinew_service_no_backend_total{{service=\"default/empty\"}} grew by {d}; {}",
                common::series_like(&m, "no_backend")
            ))
        }
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(d, 5.0, "one no-backend count per refused connect");
}

#[test]
fn balanced_counter_counts_every_connect() {
    if !require_privileged("balanced_counter_counts_every_connect") {
        return;
    }
    let f = fixture("lb-metrics", LbOptions::default());
    let m0 = metrics(&f);
    let info = m0.get("sinew_agent_info", &[("node", "node-a")]);
    assert_eq!(
        info,
        Some(1.0),
        "sinew_agent_info{{node=\"node-a\"}}: {:?}",
        m0.samples
    );
    assert!(
        m0.value("sinew_services", &[]) >= 2.0,
        "sinew_services (tcp and udp frontends)"
    );
    assert!(m0.value("sinew_backends", &[]) >= 3.0, "sinew_backends");
    assert!(
        m0.value("sinew_reconcile_total", &[("result", "ok")]) >= 1.0,
        "sinew_reconcile_total{{result=ok}}"
    );
    let r = f.connect(&f.vip_tcp(), 25, 0, 2000).expect("tcp-connect");
    assert_all_ok(&r, "25 connects");
    let d = eventually(Duration::from_secs(2), Duration::from_millis(50), || {
        let m = metrics(&f);
        let d = balanced(&m) - balanced(&m0);
        if d >= 25.0 {
            Ok(d)
        } else {
            Err(format!(
                "sinew_service_balanced_total{{service=\"default/web\",port=\"80\"}} grew by {d}; {}",
                common::series_like(&m, "balanced")
            ))
        }
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(d, 25.0, "exactly one count per connect");
    // The labels the contract promises.
    let m = metrics(&f);
    let s = m
        .find(
            "sinew_service_balanced_total",
            &[("service", "default/web"), ("port", "80")],
        )
        .next()
        .expect("sample");
    assert_eq!(
        s.labels.get("proto").map(String::as_str),
        Some("tcp"),
        "{s:?}"
    );
    assert_eq!(
        s.labels.get("vip").map(String::as_str),
        Some("10.96.0.10:80"),
        "{s:?}"
    );
}

#[test]
fn ipv6_vip_balances_tcp_and_udp_to_ipv6_backends() {
    if !require_privileged("ipv6_vip_balances_tcp_and_udp_to_ipv6_backends") {
        return;
    }
    // A single-stack IPv6 Service beside the scenario's IPv4 one: connect6/sendmsg6/recvmsg6/getpeername6 with
    // real IPv6 addresses, and only the pods' IPv6 addresses as backends.
    const VIP6: &str = "fd00:96::10";
    let web6 = Service::new("web6", VIP6)
        .port(ServicePort::tcp("http", 80, 8080))
        .port(ServicePort::udp("dns", 53, 8080))
        .selector("app", "web");
    let f = fixture(
        "lb-ipv6",
        LbOptions {
            ipv6: true,
            extra_files: vec![("service-web6.yaml".into(), vec![web6.to_value()])],
            ..Default::default()
        },
    );
    let dump = f.agent.cli().dump_services().expect("dump services");
    let svc = dump
        .iter()
        .find(|s| s.vip == VIP6 && s.port == 80)
        .unwrap_or_else(|| panic!("no [{VIP6}]:80 in {dump:#?}"));
    assert_eq!(svc.count, 3, "{svc:#?}");
    for b in &svc.backends {
        assert!(
            b.addr.contains(':'),
            "IPv4 backend {b:?} behind an IPv6 VIP"
        );
    }

    assert_balanced_via(&f, &format!("[{VIP6}]:80"), "60 connects to the IPv6 VIP");

    let udp = format!("[{VIP6}]:53");
    let u = f
        .client
        .udp_send(&udp, 20, 1000, true)
        .expect("udp-send v6");
    assert_eq!((u.received, u.failed), (20, 0), "{u:#?}");
    assert_eq!(
        u.sources.keys().collect::<Vec<_>>(),
        vec![&udp],
        "recvfrom source: {u:#?}"
    );
}

#[test]
fn two_nodes_each_agent_balances_its_own_clients_across_nodes() {
    if !require_privileged("two_nodes_each_agent_balances_its_own_clients_across_nodes") {
        return;
    }
    use sinew_tests::manifest::PodManifest;
    use sinew_tests::scenario::{TARGET_PORT, service};
    use sinew_tests::{Agent, Topology, testpod_bin};
    // Two simulated nodes on one kernel, each with its own agent, cgroup root and bpffs root, reading the same
    // manifests; the backends are spread over both nodes.
    let topo = Topology::builder("lb-two-nodes")
        .testpod_bin(testpod_bin!())
        .node("node-a", &["client-a", "b1"])
        .node("node-b", &["client-b", "b2", "b3"])
        .build()
        .expect("topology");
    let backends = ["b1", "b2", "b3"].map(|n| topo.pod(n));
    let _servers: Vec<_> = backends
        .iter()
        .map(|p| p.serve(TARGET_PORT, &p.name).expect("server"))
        .collect();
    let source = topo.source_dir().expect("source dir");
    for p in &backends {
        let m = PodManifest::new(p)
            .label("app", "web")
            .container_port(TARGET_PORT);
        source
            .write(&format!("pod-{}.yaml", p.name), &[m.to_value()])
            .expect("write pod");
    }
    source
        .write("service-web.yaml", &[service(true).to_value()])
        .expect("write service");
    let mut agents: Vec<Agent> = ["node-a", "node-b"]
        .iter()
        .map(|n| Agent::start(topo.node(n), source.path(), None).expect("start agent"))
        .collect();
    for a in &mut agents {
        a.wait_ready(Duration::from_secs(20)).expect("ready");
    }
    let vip = format!("{VIP}:{TCP_PORT}");
    for client in ["client-a", "client-b"] {
        let r = topo
            .pod(client)
            .tcp_connect(&vip, 60, 0, 2000)
            .expect("tcp-connect");
        assert_all_ok(&r, &format!("60 connects from {client}"));
        assert_spread(&r, &["b1", "b2", "b3"]);
    }
    // Each node's kernel counted only its own clients' connects.
    for a in &agents {
        let dump = a.cli().dump_services().expect("dump");
        let web = dump
            .iter()
            .find(|s| s.port == TCP_PORT && s.proto == "tcp")
            .unwrap_or_else(|| panic!("{dump:#?}"));
        assert_eq!(web.count, 3, "{web:#?}");
    }
    let counted: Vec<f64> = agents
        .iter()
        .map(|a| balanced(&a.metrics().expect("metrics")))
        .collect();
    assert_eq!(counted, vec![60.0, 60.0], "per-node balanced counters");
}
