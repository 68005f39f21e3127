//! The kubernetes source end to end: an agent watching an in-process fake API server (list, watch, bookmarks,
//! `410 Gone`, RBAC `403`) programs the same kernel maps, balances and enforces exactly as the file source does
//! with the same objects, follows add, modify and delete events, converges after a re-list, and names the
//! resource and verb of a 403. Pods are found the way they are on a node: by UID, through a kubepods cgroup
//! holding a sandbox process in the pod's netns (the manifests' `sinew.dev/netns` annotations are ignored).

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{assert_all_ok, fixture};
use serde_json::json;
use sinew_tests::agent::{Agent, AgentOptions};
use sinew_tests::kube::KubeMirror;
use sinew_tests::manifest::authorization_policy;
use sinew_tests::require_privileged;
use sinew_tests::scenario::{LbFixture, LbOptions, NODE};

/// Services as a set: (vip, port, proto) → sorted backends. Slot order and ids are the reconciler's business.
type ServiceSet = BTreeMap<(String, u16, String), Vec<(String, u16)>>;

fn dumped(agent: &Agent) -> ServiceSet {
    agent
        .cli()
        .dump_services()
        .expect("dump services")
        .into_iter()
        .map(|s| {
            let mut b: Vec<(String, u16)> =
                s.backends.into_iter().map(|b| (b.addr, b.port)).collect();
            b.sort();
            ((s.vip, s.port, s.proto), b)
        })
        .collect()
}

/// What the file source makes of `dir`, through the agent's own pure path (source → desired state).
fn expected(dir: &Path) -> ServiceSet {
    let (snapshot, _) = mesh_agent::source::file::FileSource::new(dir).load();
    let desired = mesh_agent::state::compute(&snapshot, NODE);
    desired
        .services
        .iter()
        .map(|(f, e)| {
            let mut b: Vec<(String, u16)> = e
                .backends
                .iter()
                .map(|b| (b.ip.to_string(), b.port))
                .collect();
            b.sort();
            ((f.ip.to_string(), f.port, f.proto.to_string()), b)
        })
        .collect()
}

/// Policies in force, with how each rule is enforced.
fn policies(agent: &Agent) -> Vec<String> {
    let status = agent.policy_status().expect("policy status");
    let mut out: Vec<String> = status
        .policies
        .iter()
        .map(|p| format!("{} {:?}", p.key(), p.rules))
        .collect();
    out.sort();
    out
}

/// The fixture's agent, stopped, and a kubernetes-source agent started in its place on the same node.
fn kube_agent(f: &mut LbFixture, mirror: &KubeMirror) -> Agent {
    f.agent.stop().expect("stop the file-source agent");
    let mut opts: AgentOptions = f.agent.options().clone();
    opts.kubeconfig = Some(mirror.kubeconfig().to_path_buf());
    opts.log_path = opts.log_path.with_extension("kube.log");
    let mut agent = Agent::start_with(opts).expect("start the kubernetes-source agent");
    agent
        .wait_ready(Duration::from_secs(20))
        .unwrap_or_else(|e| {
            panic!(
                "kubernetes-source agent not ready: {e:#}\n{}",
                agent.log_tail(40)
            )
        });
    agent
}

fn mirror_for(f: &LbFixture) -> KubeMirror {
    let node = f.topo.node(NODE);
    let mut mirror =
        KubeMirror::start(NODE, node.cgroup_root(), node.work_dir()).expect("fake API server");
    mirror.sync(f.source.path()).expect("mirror the manifests");
    mirror
}

/// Waits until the kernel maps hold what the file source computes from the manifests now.
fn converge(agent: &Agent, dir: &Path, what: &str) {
    let want = expected(dir);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = dumped(agent);
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the maps never matched the file source's state\n got: {got:#?}\nwant: {want:#?}\n{}",
            agent.log_tail(30)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Polls `ok` every 100 ms until it holds, or panics with `what` after `timeout`.
fn eventually(timeout: Duration, what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn deny_from_default() -> serde_json::Value {
    authorization_policy(
        "default",
        "deny-default-to-web",
        json!({
            "selector": {"matchLabels": {"app": "web"}},
            "action": "DENY",
            "rules": [{"from": [{"source": {"namespaces": ["default"]}}]}]
        }),
    )
}

#[test]
fn kubernetes_source_programs_and_enforces_like_the_file_source() {
    if !require_privileged("kubernetes_source_programs_and_enforces_like_the_file_source") {
        return;
    }
    let allow_client = authorization_policy(
        "default",
        "allow-nothing-else",
        json!({
            "selector": {"matchLabels": {"app": "client"}},
            "action": "ALLOW",
            "rules": [{"to": [{"operation": {"ports": ["9"]}}]}]
        }),
    );
    let mut f = fixture(
        "kube-equal",
        LbOptions {
            spare: 1,
            extra_files: vec![("policy-client.yaml".into(), vec![allow_client])],
            ..Default::default()
        },
    );
    // The file source's verdict, from a real agent: maps, policies in force, traffic.
    let file_services = dumped(&f.agent);
    let file_policies = policies(&f.agent);
    assert_eq!(
        file_services,
        expected(f.source.path()),
        "the file agent's own maps"
    );
    assert!(
        !file_policies.is_empty(),
        "the file agent has a policy in force"
    );
    let before = f.connect(&f.vip_tcp(), 30, 0, 2000).expect("connect");
    assert_all_ok(&before, "file source: via the VIP");

    let mut mirror = mirror_for(&f);
    let agent = kube_agent(&mut f, &mirror);
    assert_eq!(
        dumped(&agent),
        file_services,
        "same services and backends as the file source"
    );
    assert_eq!(
        policies(&agent),
        file_policies,
        "same policies in force, rules enforced the same way"
    );
    let r = f.connect(&f.vip_tcp(), 30, 0, 2000).expect("connect");
    assert_all_ok(&r, "kubernetes source: via the VIP");
    // Every local pod's netns was found through its kubepods cgroup (not the manifests' annotation).
    let log = agent.log_tail(400);
    assert!(
        !log.contains("netns not found") && !log.contains("until its netns can be read"),
        "a pod's netns was not found:\n{log}"
    );
    assert_eq!(
        r.names.keys().collect::<Vec<_>>(),
        before.names.keys().collect::<Vec<_>>(),
        "the same backends serve"
    );

    // Modify: a backend turns unready; add: the spare joins; delete: a backend pod goes.
    let b1 = f.backends[0].clone();
    let spare = f.backends[f.backends.len() - 1].clone();
    f.write_backend(&b1, false).unwrap();
    mirror.sync(f.source.path()).unwrap();
    converge(&agent, f.source.path(), "backend b1 not ready (MODIFIED)");
    f.write_backend(&spare, true).unwrap();
    mirror.sync(f.source.path()).unwrap();
    converge(&agent, f.source.path(), "spare pod added (ADDED)");
    let b2 = f.backends[1].clone();
    f.remove_backend(&b2).unwrap();
    mirror.sync(f.source.path()).unwrap();
    converge(&agent, f.source.path(), "backend b2 deleted (DELETED)");
    let r = f.connect(&f.vip_tcp(), 30, 0, 2000).expect("connect");
    assert_all_ok(&r, "after the edits");
    assert!(
        !r.names.contains_key(&b1.name) && !r.names.contains_key(&b2.name),
        "an unready or deleted backend served: {:?}",
        r.names
    );

    // A policy added through the API denies the client at connect(), as from a file; deleting it restores.
    f.source
        .write("policy-deny.yaml", &[deny_from_default()])
        .unwrap();
    mirror.sync(f.source.path()).unwrap();
    eventually(
        Duration::from_secs(10),
        "the DENY policy is in force",
        || {
            policies(&agent)
                .iter()
                .any(|p| p.starts_with("default/deny-default-to-web"))
        },
    );
    let r = f.connect(&f.vip_tcp(), 10, 0, 2000).expect("connect");
    assert_eq!(r.ok, 0, "the DENY policy must refuse every connect: {r:#?}");
    // The agent won the status Lease (it is the only one) and wrote the policy's status.
    eventually(
        Duration::from_secs(10),
        "the policy's status is written",
        || {
            let Some(p) = mirror.api.get(
                "security.sinew.dev/v1alpha1",
                "AuthorizationPolicy",
                Some("default"),
                "deny-default-to-web",
            ) else {
                return false;
            };
            p["status"]["rules"][0]["status"] == "kernel-enforced"
                && p["status"]["conditions"].as_array().is_some_and(|c| {
                    c.iter()
                        .any(|c| c["type"] == "Accepted" && c["status"] == "True")
                })
        },
    );
    let m = agent.metrics().expect("metrics");
    assert_eq!(
        m.get("sinew_policy_status_leader", &[]),
        Some(1.0),
        "the only agent holds the Lease"
    );
    assert!(
        m.get("sinew_policy_status_writes_total", &[])
            .unwrap_or(0.0)
            >= 1.0,
        "status writes are counted"
    );
    f.source.remove("policy-deny.yaml").unwrap();
    mirror.sync(f.source.path()).unwrap();
    eventually(Duration::from_secs(10), "the DENY policy is gone", || {
        !policies(&agent)
            .iter()
            .any(|p| p.starts_with("default/deny-default-to-web"))
    });
    let r = f.connect(&f.vip_tcp(), 10, 0, 2000).expect("connect");
    assert_all_ok(&r, "after the DENY policy was deleted");
}

#[test]
fn kubernetes_source_relists_after_410_and_converges() {
    if !require_privileged("kubernetes_source_relists_after_410_and_converges") {
        return;
    }
    let mut f = fixture(
        "kube-410",
        LbOptions {
            spare: 1,
            ..Default::default()
        },
    );
    let mut mirror = mirror_for(&f);
    let agent = kube_agent(&mut f, &mirror);
    converge(&agent, f.source.path(), "first sync");
    let lists_before = mirror.api.count("GET", "/pods");
    // The history is compacted: every watch gets 410 Gone. The edits made meanwhile (a pod deleted, one added)
    // are only seen through the re-list.
    mirror.api.compact();
    let b1 = f.backends[0].clone();
    let spare = f.backends[f.backends.len() - 1].clone();
    f.remove_backend(&b1).unwrap();
    f.write_backend(&spare, true).unwrap();
    mirror.sync(f.source.path()).unwrap();
    mirror.api.bookmark();
    converge(&agent, f.source.path(), "after 410 Gone and a re-list");
    assert!(
        mirror.api.count("GET", "/pods") > lists_before,
        "the agent never listed pods again after 410"
    );
    let r = f.connect(&f.vip_tcp(), 30, 0, 2000).expect("connect");
    assert_all_ok(&r, "after the re-list");
    assert!(
        !r.names.contains_key(&b1.name),
        "a deleted backend served: {:?}",
        r.names
    );
}

#[test]
fn kubernetes_source_names_the_resource_and_verb_of_a_403() {
    if !require_privileged("kubernetes_source_names_the_resource_and_verb_of_a_403") {
        return;
    }
    let mut f = fixture("kube-403", LbOptions::default());
    let mirror = mirror_for(&f);
    mirror.api.deny("pods", "list");
    f.agent.stop().expect("stop the file-source agent");
    let mut opts: AgentOptions = f.agent.options().clone();
    opts.kubeconfig = Some(mirror.kubeconfig().to_path_buf());
    opts.log_path = opts.log_path.with_extension("kube.log");
    let mut agent = Agent::start_with(opts).expect("start the kubernetes-source agent");
    // Not ready while one kind cannot be listed: nothing half-synced reaches the maps.
    assert!(
        agent.wait_ready(Duration::from_secs(3)).is_err(),
        "ready although pods cannot be listed"
    );
    eventually(
        Duration::from_secs(10),
        "the 403 is logged with resource and verb",
        || {
            let log = agent.log_tail(200);
            log.contains("list pods") && log.contains("forbidden") && log.contains("403")
        },
    );
    mirror.api.allow("pods", "list");
    agent
        .wait_ready(Duration::from_secs(20))
        .unwrap_or_else(|e| {
            panic!(
                "not ready after RBAC was fixed: {e:#}\n{}",
                agent.log_tail(40)
            )
        });
    converge(&agent, f.source.path(), "after RBAC was fixed");
}
