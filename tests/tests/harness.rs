//! Self-tests of the netns harness, without an agent: pods can talk through their node, processes land in the
//! right cgroup and netns, and every kernel object is gone after the topology drops (also after a panic).

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Mutex;

use sinew_tests::{Topology, require_privileged, testpod_bin};

/// Everything a topology created that must be gone after it drops.
fn leftovers(paths: &[PathBuf]) -> Vec<PathBuf> {
    paths.iter().filter(|p| p.exists()).cloned().collect()
}

fn object_paths(topo: &Topology) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for n in topo.nodes() {
        v.push(PathBuf::from("/var/run/netns").join(n.netns().name()));
        v.push(n.cgroup_root().to_path_buf());
        v.push(n.bpffs().dir().to_path_buf());
        for p in n.pods() {
            v.push(p.netns_path());
            v.push(p.cgroup_dir().to_path_buf());
            v.push(p.unmanaged_cgroup_dir().to_path_buf());
        }
    }
    v
}

#[test]
fn pods_talk_through_the_node_and_everything_is_removed() {
    if !require_privileged("pods_talk_through_the_node_and_everything_is_removed") {
        return;
    }
    let topo = Topology::builder("harness-basic")
        .testpod_bin(testpod_bin!())
        .ipv6(true)
        .node("node-a", &["client", "server"])
        .build()
        .expect("topology");
    let paths = object_paths(&topo);
    assert!(
        leftovers(&paths).len() == paths.len(),
        "every object exists while the topology lives"
    );
    let server = topo.pod("server");
    let client = topo.pod("client");
    let srv = server.serve(8080, "server").expect("server");

    // The server process is in the pod's cgroup (joined by path before setns) and in the pod's netns.
    let cg = std::fs::read_to_string(format!("/proc/{}/cgroup", srv.pid())).expect("read cgroup");
    let rel = server
        .cgroup_dir()
        .strip_prefix("/sys/fs/cgroup/unified")
        .expect("under cgroup2 root");
    assert!(
        cg.lines().any(|l| l == format!("0::/{}", rel.display())),
        "server not in {}: {cg}",
        rel.display()
    );
    let ns_of_proc = std::fs::metadata(format!("/proc/{}/ns/net", srv.pid()))
        .expect("ns")
        .ino();
    let ns_of_pod = std::fs::metadata(server.netns_path())
        .expect("netns file")
        .ino();
    assert_eq!(
        ns_of_proc, ns_of_pod,
        "server runs in the pod's network namespace"
    );

    // TCP over IPv4 and IPv6, and UDP, pod to pod through the node's bridge.
    let to4 = format!("{}:8080", server.ip4);
    let r = client
        .tcp_connect(&to4, 10, 0, 2000)
        .expect("tcp-connect v4");
    assert_eq!((r.ok, r.failed), (10, 0), "{r:#?}");
    assert_eq!(r.names.get("server"), Some(&10), "{r:#?}");
    assert_eq!(r.peers.get(&to4), Some(&10), "{r:#?}");
    let to6 = format!("[{}]:8080", server.ip6.expect("ipv6 on"));
    let r = client
        .tcp_connect(&to6, 3, 0, 2000)
        .expect("tcp-connect v6");
    assert_eq!((r.ok, r.failed), (3, 0), "{r:#?}");
    let u = client.udp_send(&to4, 5, 1000, false).expect("udp-send");
    assert_eq!((u.received, u.failed), (5, 0), "{u:#?}");
    assert_eq!(
        u.sources.get(&to4),
        Some(&5),
        "replies come from the server: {u:#?}"
    );

    // Without an agent a service address is not routed anywhere: connects fail fast (the node answers with ICMP
    // unreachable), which is the baseline the uninstall test compares against.
    let r = client
        .tcp_connect("10.96.0.10:80", 1, 0, 1000)
        .expect("tcp-connect vip");
    assert_eq!(r.failed, 1, "{r:#?}");
    eprintln!("unbalanced VIP connect: {:?}", r.failures);

    // rr and crr work against the same server.
    let rr = client.rr(&to4, 1024, 200, 500).expect("rr");
    assert!(rr.requests > 0 && rr.error.is_none(), "{rr:#?}");
    assert_eq!(rr.name, "server");
    let crr = client.crr(&to4, 64, 200, 200).expect("crr");
    assert!(crr.connections > 0 && crr.failed == 0, "{crr:#?}");

    drop(srv);
    drop(topo);
    assert_eq!(
        leftovers(&paths),
        Vec::<PathBuf>::new(),
        "objects left after drop"
    );
}

#[test]
fn a_panicking_test_still_cleans_up() {
    if !require_privileged("a_panicking_test_still_cleans_up") {
        return;
    }
    let recorded: Mutex<(Vec<PathBuf>, Option<PathBuf>)> = Mutex::new((Vec::new(), None));
    let result = std::panic::catch_unwind(|| {
        let topo = Topology::builder("harness-panic")
            .testpod_bin(testpod_bin!())
            .node("node-a", &["p1"])
            .build()
            .expect("topology");
        let _srv = topo.pod("p1").serve(9000, "p1").expect("server");
        *recorded.lock().unwrap() = (object_paths(&topo), Some(topo.work_dir().to_path_buf()));
        panic!("deliberate panic with a live topology and process");
    });
    assert!(result.is_err());
    let (paths, work_dir) = recorded.into_inner().unwrap();
    assert!(!paths.is_empty());
    assert_eq!(
        leftovers(&paths),
        Vec::<PathBuf>::new(),
        "objects left after a panic"
    );
    // The work dir is kept on panic for debugging; this one was deliberate.
    if let Some(d) = work_dir {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn two_nodes_route_pod_traffic_over_the_underlay() {
    if !require_privileged("two_nodes_route_pod_traffic_over_the_underlay") {
        return;
    }
    let topo = Topology::builder("harness-two-nodes")
        .testpod_bin(testpod_bin!())
        .ipv6(true)
        .node("node-a", &["a1"])
        .node("node-b", &["b1"])
        .build()
        .expect("topology");
    let b1 = topo.pod("b1");
    assert_eq!(b1.host_ip.to_string(), "172.30.0.2");
    let _srv = b1.serve(8080, "b1").expect("server");
    let a1 = topo.pod("a1");
    let r = a1
        .tcp_connect(&format!("{}:8080", b1.ip4), 5, 0, 2000)
        .expect("v4");
    assert_eq!((r.ok, r.failed), (5, 0), "{r:#?}");
    let r = a1
        .tcp_connect(&format!("[{}]:8080", b1.ip6.unwrap()), 5, 0, 2000)
        .expect("v6");
    assert_eq!((r.ok, r.failed), (5, 0), "{r:#?}");
}

#[test]
fn probe_reports_each_outcome_and_unmanaged_processes_stay_outside_the_node_cgroup() {
    if !require_privileged(
        "probe_reports_each_outcome_and_unmanaged_processes_stay_outside_the_node_cgroup",
    ) {
        return;
    }
    use sinew_tests::policy::Proto;
    let topo = Topology::builder("harness-probe")
        .testpod_bin(testpod_bin!())
        .node("node-a", &["client", "server"])
        .build()
        .expect("topology");
    let server = topo.pod("server");
    let client = topo.pod("client");
    let _srv = server
        .serve_ports(&[8080, 8081, 8082], "server")
        .expect("server");
    let ip = std::net::IpAddr::V4(server.ip4);
    let mut targets: Vec<String> = [8080, 8081, 8082]
        .iter()
        .flat_map(|&p| Proto::BOTH.map(|pr| pr.target(ip, p)))
        .collect();
    // Nothing listens on 9000 (TCP: refused); 10.244.0.250 does not exist (ARP fails: a timeout).
    targets.push(Proto::Tcp.target(ip, 9000));
    targets.push("tcp:10.244.0.250:8080".to_string());
    targets.push("udp:10.244.0.250:8080".to_string());
    for (managed, r) in [
        (true, client.probe(&targets, 400).expect("probe")),
        (false, client.probe_unmanaged(&targets, 400).expect("probe")),
    ] {
        let outcomes: Vec<&str> = r.results.iter().map(|x| x.outcome.as_str()).collect();
        assert_eq!(
            outcomes,
            vec![
                "ok",
                "ok",
                "ok",
                "ok",
                "ok",
                "ok",
                "ECONNREFUSED",
                "timeout",
                "timeout"
            ],
            "managed={managed}: {r:#?}"
        );
        assert!(
            r.results[..6]
                .iter()
                .all(|x| x.name.as_deref() == Some("server")),
            "{r:#?}"
        );
        assert!(
            r.duration_ms < 2000.0,
            "probes run concurrently: {} ms",
            r.duration_ms
        );
    }

    // An unmanaged process is in the pod's netns but in the harness's sibling cgroup, not below the node root.
    let mut p = client
        .spawn_unmanaged(
            topo.testpod_bin(),
            &["serve", "--port", "7000", "--name", "x"],
        )
        .expect("spawn");
    p.wait_for_line(std::time::Duration::from_secs(5), |l| {
        l.contains("listening")
    })
    .expect("listening");
    let cg = std::fs::read_to_string(format!("/proc/{}/cgroup", p.pid())).expect("read cgroup");
    let node_root = topo.node("node-a").cgroup_root();
    let rel = client
        .unmanaged_cgroup_dir()
        .strip_prefix("/sys/fs/cgroup/unified")
        .expect("under cgroup2 root");
    assert!(
        cg.lines().any(|l| l == format!("0::/{}", rel.display())),
        "not in {}: {cg}",
        rel.display()
    );
    assert!(
        !client.unmanaged_cgroup_dir().starts_with(node_root),
        "unmanaged cgroup is below the node root"
    );
    let ns_of_proc = std::fs::metadata(format!("/proc/{}/ns/net", p.pid()))
        .expect("stat ns")
        .ino();
    let ns_of_pod = std::fs::metadata(client.netns_path())
        .expect("stat netns")
        .ino();
    assert_eq!(
        ns_of_proc, ns_of_pod,
        "unmanaged process not in the pod netns"
    );
}
