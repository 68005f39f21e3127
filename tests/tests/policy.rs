//! Identity-based L4 authorization (issue 3) against a real `mesh-agent`: a policy matrix written from Istio's
//! documented semantics (not from the reference evaluator, which every case is also checked against), with real
//! kernel outcomes on both enforcement paths:
//! - client side: the source pod's `connect()`/`sendto()` fails with `EACCES` at once;
//! - server side: the same source running outside every cgroup (so its own node cannot stop it) times out,
//!   because the destination drops the first packet.
//!
//! Universe (one node unless said otherwise): `web` (ns `prod`, sa `web`, `app=web`), `api` (ns `prod`, sa
//! `api`, `app=api`), `cli` (ns `dev`, sa `cli`, `app=cli`), and `outsider`, a netns that is no known pod (outside
//! the mesh). Every known pod serves TCP and UDP on 8080 and 8081.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sinew_tests::manifest::{Service, ServicePort, authorization_policy as ap};
use sinew_tests::policy::{
    FixtureOptions, Mesh, PodSpec, PolicyFixture, Proto, Want, Workload, istio_principal,
    policy_key, spiffe, want,
};
use sinew_tests::testpod::{PROBE_EACCES, PROBE_OK};
use sinew_tests::{Metrics, eventually, require_privileged, testpod_bin};

mod common;
use common::series_like;

const PORTS: [u16; 2] = [8080, 8081];
const SRCS: [&str; 4] = ["web", "api", "cli", "outsider"];
const DSTS: [&str; 3] = ["web", "api", "cli"];

fn pods() -> Vec<PodSpec> {
    vec![
        PodSpec::new("web", "prod", "web", &[("app", "web")]),
        PodSpec::new("api", "prod", "api", &[("app", "api")]),
        PodSpec::new("cli", "dev", "cli", &[("app", "cli")]),
        PodSpec::stranger("outsider"),
    ]
}

fn fixture(name: &str) -> PolicyFixture {
    fixture_with(name, &[])
}

fn fixture_with(name: &str, extra: &[(&str, Vec<Value>)]) -> PolicyFixture {
    PolicyFixture::setup(name, testpod_bin!(), &[("node-a", pods())], &PORTS, extra)
        .unwrap_or_else(|e| panic!("{name}: setup failed: {e:#}"))
}

/// Writes the set and waits until it is in force, or panics.
fn set(f: &PolicyFixture, policies: &[Value]) {
    f.set_policies(policies).unwrap_or_else(|e| {
        panic!(
            "policies not in force: {e:#}\n{}",
            sinew_tests::policy::policies_yaml(policies)
        )
    });
}

fn sel(app: &str) -> Value {
    json!({"matchLabels": {"app": app}})
}

fn from_principals(p: &[String]) -> Value {
    json!([{"source": {"principals": p}}])
}

fn metrics(f: &PolicyFixture, i: usize) -> Metrics {
    f.agents[i]
        .metrics()
        .unwrap_or_else(|e| panic!("scraping /metrics: {e:#}"))
}

fn denials(m: &Metrics, direction: &str) -> f64 {
    m.value("sinew_policy_denials_total", &[("direction", direction)])
}

/// Every (src, dst) of the universe on `port` with the same verdict `allow`, except the given overrides.
fn all(port: u16, allow: bool, except: &[(&str, &str, bool)]) -> Vec<Want> {
    let mut v = Vec::new();
    for s in SRCS {
        for d in DSTS {
            let a = except
                .iter()
                .find(|(es, ed, _)| *es == s && *ed == d)
                .map_or(allow, |e| e.2);
            v.push(want(s, d, port, a));
        }
    }
    v
}

#[test]
fn no_policy_allows_everything() {
    if !require_privileged("no_policy_allows_everything") {
        return;
    }
    let f = fixture("pol-none");
    set(&f, &[]);
    let mut wants = all(8080, true, &[]);
    wants.extend(all(8081, true, &[]));
    f.assert_wants("no policy", &[], &wants);
}

#[test]
fn allow_by_principal_flips_the_workload_to_default_deny() {
    if !require_privileged("allow_by_principal_flips_the_workload_to_default_deny") {
        return;
    }
    let f = fixture("pol-principal");
    // SPIFFE form.
    let p1 = [ap(
        "prod",
        "allow-cli-spiffe",
        json!({"selector": sel("web"), "action": "ALLOW", "rules": [{"from": from_principals(&[spiffe("dev", "cli")])}]}),
    )];
    set(&f, &p1);
    let wants = vec![
        want("cli", "web", 8080, true),
        want("cli", "web", 8081, true),
        // Once an ALLOW selects web, everything it does not match is denied...
        want("api", "web", 8080, false),
        want("web", "web", 8080, false),
        want("outsider", "web", 8080, false),
        // ...and nothing changes for workloads it does not select.
        want("web", "api", 8080, true),
        want("cli", "api", 8081, true),
        want("outsider", "cli", 8080, true),
    ];
    f.assert_wants("ALLOW principal (spiffe://)", &p1, &wants);

    // Istio's form without the scheme names the same principal.
    let p2 = [ap(
        "prod",
        "allow-api-istio",
        json!({"selector": sel("web"), "rules": [{"from": from_principals(&[istio_principal("prod", "api")])}]}),
    )];
    set(&f, &p2);
    let wants = vec![
        want("api", "web", 8080, true),
        want("cli", "web", 8080, false),
        want("outsider", "web", 8081, false),
        want("cli", "api", 8080, true),
    ];
    f.assert_wants("ALLOW principal (Istio form)", &p2, &wants);

    // The CLI explains the same verdicts as the admin endpoint.
    let a = &f.agents[0];
    let c = a
        .cli_policy_check("prod/api", "prod/web", 8080, "tcp")
        .expect("policy check");
    assert!(c.allowed, "{c:?}");
    assert_eq!(c.policy.as_deref(), Some("prod/allow-api-istio"), "{c:?}");
    assert_eq!(c.rule, Some(0), "{c:?}");
    let c = a
        .cli_policy_check("dev/cli", "prod/web", 8080, "udp")
        .expect("policy check");
    assert!(!c.allowed, "{c:?}");
    assert_eq!(c.verdict, "deny", "{c:?}");
    assert_eq!(c.policy, None, "default deny has no deciding policy: {c:?}");
    let st = a.cli_policy_status().expect("policy status");
    let p = st.policy("prod/allow-api-istio").expect("in status");
    assert_eq!(p.selects, vec!["prod/web".to_string()], "{p:?}");
    assert_eq!(p.action, "ALLOW", "{p:?}");
    assert_eq!(p.rules.len(), 1, "{p:?}");
    assert_eq!(p.rules[0].status, "kernel-enforced", "{p:?}");
}

#[test]
fn allow_by_namespace_and_namespace_wildcards() {
    if !require_privileged("allow_by_namespace_and_namespace_wildcards") {
        return;
    }
    let f = fixture("pol-namespace");
    let p = [ap(
        "prod",
        "allow-dev-ns",
        json!({"selector": sel("web"), "action": "ALLOW", "rules": [{"from": [{"source": {"namespaces": ["dev"]}}]}]}),
    )];
    set(&f, &p);
    let wants = vec![
        want("cli", "web", 8080, true),
        want("api", "web", 8080, false),
        want("web", "web", 8081, false),
        // A namespace rule only matches sources with an identity.
        want("outsider", "web", 8080, false),
        want("api", "api", 8080, true),
    ];
    f.assert_wants("ALLOW namespaces [dev]", &p, &wants);

    let p = [ap(
        "prod",
        "allow-pr-prefix",
        json!({"selector": sel("web"), "rules": [{"from": [{"source": {"namespaces": ["pr*"]}}]}]}),
    )];
    set(&f, &p);
    let wants = vec![
        want("api", "web", 8080, true),
        want("web", "web", 8080, true),
        want("cli", "web", 8080, false),
        want("outsider", "web", 8080, false),
    ];
    f.assert_wants("ALLOW namespaces [pr*]", &p, &wants);
}

#[test]
fn deny_wins_over_allow() {
    if !require_privileged("deny_wins_over_allow") {
        return;
    }
    let f = fixture("pol-deny-wins");
    let p = [
        ap(
            "prod",
            "allow-all-web",
            json!({"selector": sel("web"), "action": "ALLOW", "rules": [{}]}),
        ),
        ap(
            "prod",
            "deny-cli-web",
            json!({"selector": sel("web"), "action": "DENY", "rules": [{"from": from_principals(&[spiffe("dev", "cli")])}]}),
        ),
        // An ALLOW naming cli exactly does not beat the DENY either.
        ap(
            "prod",
            "allow-cli-web",
            json!({"selector": sel("web"), "action": "ALLOW", "rules": [{"from": from_principals(&[spiffe("dev", "cli")])}]}),
        ),
    ];
    set(&f, &p);
    let wants = vec![
        want("cli", "web", 8080, false),
        want("cli", "web", 8081, false),
        want("api", "web", 8080, true),
        want("outsider", "web", 8080, true),
        want("cli", "api", 8080, true),
    ];
    f.assert_wants("DENY beats ALLOW", &p, &wants);
    let c = f.agents[0]
        .policy_check("dev/cli", "prod/web", 8080, "tcp")
        .expect("check");
    assert_eq!(c.policy.as_deref(), Some("prod/deny-cli-web"), "{c:?}");
}

#[test]
fn empty_spec_denies_all_and_empty_rule_allows_all() {
    if !require_privileged("empty_spec_denies_all_and_empty_rule_allows_all") {
        return;
    }
    let f = fixture("pol-empty");
    // `spec: {}`: an ALLOW without rules for the whole `prod` namespace.
    let p = [ap("prod", "deny-all-prod", json!({}))];
    set(&f, &p);
    let mut wants = all(
        8080,
        false,
        &[
            ("web", "cli", true),
            ("api", "cli", true),
            ("cli", "cli", true),
            ("outsider", "cli", true),
        ],
    );
    wants.push(want("cli", "api", 8081, false));
    f.assert_wants("spec: {}", &p, &wants);

    // `rules: [{}]` matches every request: with it, everything is allowed again.
    let p = [
        ap("prod", "deny-all-prod-2", json!({})),
        ap("prod", "allow-all-prod", json!({"rules": [{}]})),
    ];
    set(&f, &p);
    let mut wants = all(8080, true, &[]);
    wants.extend(all(8081, true, &[]));
    f.assert_wants("spec: {} and rules: [{}]", &p, &wants);
}

#[test]
fn not_principals_not_namespaces_not_ports_not_ip_blocks() {
    if !require_privileged("not_principals_not_namespaces_not_ports_not_ip_blocks") {
        return;
    }
    let f = fixture("pol-not");
    let p = [
        // Deny web to everyone but api (unauthenticated sources are "not api" too).
        ap(
            "prod",
            "deny-not-api",
            json!({"selector": sel("web"), "action": "DENY",
                   "rules": [{"from": [{"source": {"notPrincipals": [spiffe("prod", "api")]}}]}]}),
        ),
        // Deny cli to everything not from prod.
        ap(
            "dev",
            "deny-not-prod",
            json!({"selector": sel("cli"), "action": "DENY",
                   "rules": [{"from": [{"source": {"notNamespaces": ["prod"]}}]}]}),
        ),
        // api: any source, any port but 8081.
        ap(
            "prod",
            "allow-not-8081",
            json!({"selector": sel("api"), "action": "ALLOW",
                   "rules": [{"to": [{"operation": {"notPorts": ["8081"]}}]}]}),
        ),
    ];
    set(&f, &p);
    let wants = vec![
        want("api", "web", 8080, true),
        want("api", "web", 8081, true),
        want("cli", "web", 8080, false),
        want("web", "web", 8080, false),
        want("outsider", "web", 8080, false),
        want("web", "cli", 8080, true),
        want("api", "cli", 8081, true),
        want("cli", "cli", 8080, false),
        want("outsider", "cli", 8080, false),
        want("cli", "api", 8080, true),
        want("cli", "api", 8081, false),
        want("outsider", "api", 8080, true),
        want("outsider", "api", 8081, false),
    ];
    f.assert_wants("notPrincipals / notNamespaces / notPorts", &p, &wants);

    let cli_ip = format!("{}/32", f.w("cli").pod.ip4);
    let web_ip = f.w("web").pod.ip4.to_string();
    let p = [
        ap(
            "prod",
            "deny-not-cli-ip",
            json!({"selector": sel("web"), "action": "DENY",
                   "rules": [{"from": [{"source": {"notIpBlocks": [cli_ip]}}]}]}),
        ),
        ap(
            "prod",
            "allow-subnet-not-web",
            json!({"selector": sel("api"), "action": "ALLOW",
                   "rules": [{"from": [{"source": {"ipBlocks": ["10.244.0.0/24"], "notIpBlocks": [web_ip]}}]}]}),
        ),
    ];
    set(&f, &p);
    let wants = vec![
        want("cli", "web", 8080, true),
        want("api", "web", 8080, false),
        want("outsider", "web", 8081, false),
        want("cli", "api", 8080, true),
        want("outsider", "api", 8080, true),
        want("web", "api", 8080, false),
        want("api", "api", 8081, true),
    ];
    f.assert_wants("ipBlocks / notIpBlocks", &p, &wants);
}

#[test]
fn ports_are_target_ports_not_service_ports() {
    if !require_privileged("ports_are_target_ports_not_service_ports") {
        return;
    }
    const VIP: &str = "10.96.0.50";
    let svc = Service {
        namespace: "prod".into(),
        ..Service::new("web", VIP)
    }
    .port(ServicePort::tcp("http", 80, 8080))
    .port(ServicePort::udp("dns", 53, 8080))
    .selector("app", "web");
    let f = fixture_with(
        "pol-target-port",
        &[("service-web.yaml", vec![svc.to_value()])],
    );
    let vip: IpAddr = VIP.parse().expect("ip");
    let targets = vec![Proto::Tcp.target(vip, 80), Proto::Udp.target(vip, 53)];
    let outcomes = |pod: &str| -> Vec<String> {
        let r = f.w(pod).pod.probe(&targets, 400).expect("probe");
        r.results.into_iter().map(|x| x.outcome).collect()
    };
    let ok = vec![PROBE_OK.to_string(), PROBE_OK.to_string()];
    let denied = vec![PROBE_EACCES.to_string(), PROBE_EACCES.to_string()];
    assert_eq!(outcomes("cli"), ok, "no policy: the VIP works");

    let p = [ap(
        "prod",
        "allow-cli-8080",
        json!({"selector": sel("web"), "rules": [{"from": from_principals(&[spiffe("dev", "cli")]),
                                                   "to": [{"operation": {"ports": ["8080"]}}]}]}),
    )];
    set(&f, &p);
    assert_eq!(
        outcomes("cli"),
        ok,
        "VIP:80 -> 8080 and VIP:53 -> 8080 with a policy on target port 8080"
    );
    assert_eq!(
        outcomes("api"),
        denied,
        "api is not allowed whatever the port"
    );
    f.assert_wants(
        "target port 8080",
        &p,
        &[
            want("cli", "web", 8080, true),
            want("cli", "web", 8081, false),
        ],
    );

    let p = [ap(
        "prod",
        "allow-cli-80",
        json!({"selector": sel("web"), "rules": [{"from": from_principals(&[spiffe("dev", "cli")]),
                                                   "to": [{"operation": {"ports": [80, 53]}}]}]}),
    )];
    set(&f, &p);
    assert_eq!(
        outcomes("cli"),
        denied,
        "a policy naming the Service ports (80, 53) must not allow the target port 8080"
    );
    f.assert_wants(
        "service ports in policy",
        &p,
        &[want("cli", "web", 8080, false)],
    );
}

#[test]
fn root_namespace_policy_applies_to_every_namespace() {
    if !require_privileged("root_namespace_policy_applies_to_every_namespace") {
        return;
    }
    let f = fixture("pol-root-ns");
    let p = [
        ap(
            "sinew-system",
            "deny-cli-mesh-wide",
            json!({"action": "DENY", "rules": [{"from": from_principals(&[spiffe("dev", "cli")])}]}),
        ),
        // A namespace's policy without selector applies to that namespace only.
        ap(
            "prod",
            "deny-api-in-prod",
            json!({"action": "DENY", "rules": [{"from": from_principals(&[spiffe("prod", "api")])}]}),
        ),
        // A root-namespace ALLOW with a selector applies to matching workloads in any namespace (here dev/cli).
        ap(
            "sinew-system",
            "allow-web-to-cli",
            json!({"selector": sel("cli"), "rules": [{"from": [{"source": {"principals": [spiffe("prod", "web")]}}]}]}),
        ),
    ];
    set(&f, &p);
    let wants = vec![
        want("cli", "web", 8080, false),
        want("cli", "api", 8081, false),
        want("api", "web", 8080, false),
        want("api", "api", 8080, false),
        want("web", "api", 8080, true),
        want("outsider", "web", 8080, true),
        want("web", "cli", 8080, true),
        want("api", "cli", 8080, false),
        want("outsider", "cli", 8080, false),
    ];
    f.assert_wants("mesh root namespace", &p, &wants);
}

#[test]
fn source_outside_the_mesh_is_matched_by_ip_blocks_only() {
    if !require_privileged("source_outside_the_mesh_is_matched_by_ip_blocks_only") {
        return;
    }
    let f = fixture("pol-outsider");
    let outsider = format!("{}/32", f.w("outsider").pod.ip4);
    let p = [ap(
        "prod",
        "allow-outsider-ip",
        json!({"selector": sel("web"), "rules": [{"from": [{"source": {"ipBlocks": [outsider]}}]}]}),
    )];
    set(&f, &p);
    let wants = vec![
        want("outsider", "web", 8080, true),
        want("outsider", "web", 8081, true),
        want("cli", "web", 8080, false),
        want("api", "web", 8080, false),
    ];
    f.assert_wants("ALLOW ipBlocks [outsider/32]", &p, &wants);

    // principals ["*"] means "any authenticated peer": the outsider has no identity.
    let p = [ap(
        "prod",
        "allow-any-principal",
        json!({"selector": sel("web"), "rules": [{"from": from_principals(&["*".to_string()])}]}),
    )];
    set(&f, &p);
    let wants = vec![
        want("outsider", "web", 8080, false),
        want("cli", "web", 8080, true),
        want("api", "web", 8081, true),
    ];
    f.assert_wants("ALLOW principals [*]", &p, &wants);
    let c = f.agents[0]
        .policy_check(
            &f.w("outsider").pod.ip4.to_string(),
            "prod/web",
            8080,
            "tcp",
        )
        .expect("check by ip");
    assert!(!c.allowed, "{c:?}");
}

#[test]
fn client_side_refuses_at_once_and_the_server_side_drops_what_gets_past() {
    if !require_privileged("client_side_refuses_at_once_and_the_server_side_drops_what_gets_past") {
        return;
    }
    let f = fixture("pol-two-sides");
    let p = [ap(
        "prod",
        "deny-cli",
        json!({"selector": sel("web"), "action": "DENY", "rules": [{"from": from_principals(&[spiffe("dev", "cli")])}]}),
    )];
    set(&f, &p);
    let cli = &f.w("cli").pod;
    let to = format!("{}:8080", f.w("web").pod.ip4);
    let m0 = metrics(&f, 0);

    // Client side: EACCES from connect() and sendto(), at once, and no packet reaches the server.
    let r = cli.tcp_connect(&to, 5, 0, 2000).expect("tcp-connect");
    assert_eq!((r.ok, r.failed), (0, 5), "{r:#?}");
    for x in &r.failures {
        assert_eq!(
            (x.stage.as_str(), x.errno.as_str()),
            ("connect", "EACCES"),
            "{x:?}"
        );
        assert!(x.elapsed_ms < 50.0, "EACCES took {} ms", x.elapsed_ms);
    }
    let u = cli.udp_send(&to, 5, 500, true).expect("udp-send");
    assert_eq!(u.sent, 0, "{u:#?}");
    assert_eq!(u.errors.get("send:EACCES"), Some(&5), "{u:#?}");
    let m1 = eventually(Duration::from_secs(3), Duration::from_millis(50), || {
        let m = metrics(&f, 0);
        let d = denials(&m, "egress") - denials(&m0, "egress");
        if d >= 10.0 {
            Ok(m)
        } else {
            Err(format!(
                "egress denials grew by {d}; {}",
                series_like(&m, "denials")
            ))
        }
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        denials(&m1, "ingress"),
        denials(&m0, "ingress"),
        "an egress denial must never reach the server: {}",
        series_like(&m1, "denials")
    );

    // The same pair from outside the cgroup: the connect goes out and the server side drops the SYN.
    let r = f
        .w("cli")
        .pod
        .run_json_unmanaged::<sinew_tests::testpod::ConnectReport>(
            &[
                "tcp-connect",
                "--to",
                &to,
                "--count",
                "2",
                "--timeout-ms",
                "600",
            ],
            Duration::from_secs(15),
        )
        .expect("unmanaged tcp-connect");
    assert_eq!((r.ok, r.failed), (0, 2), "{r:#?}");
    assert_eq!(r.errors.get("connect:TIMEOUT"), Some(&2), "{r:#?}");
    eventually(Duration::from_secs(3), Duration::from_millis(50), || {
        let m = metrics(&f, 0);
        let d = denials(&m, "ingress") - denials(&m1, "ingress");
        if d >= 1.0 {
            Ok(())
        } else {
            Err(format!(
                "ingress denials grew by {d}; {}",
                series_like(&m, "denials")
            ))
        }
    })
    .unwrap_or_else(|e| panic!("{e}"));
    // Others are unaffected.
    f.assert_wants(
        "DENY cli -> web",
        &p,
        &[
            want("cli", "web", 8080, false),
            want("api", "web", 8080, true),
            want("cli", "api", 8080, true),
        ],
    );
}

#[test]
fn l7_rules_never_widen_access() {
    if !require_privileged("l7_rules_never_widen_access") {
        return;
    }
    let f = fixture("pol-l7");
    // An ALLOW rule with methods cannot be checked at L4: it matches nothing (and web is now default deny).
    let p = [ap(
        "prod",
        "allow-get",
        json!({"selector": sel("web"), "action": "ALLOW",
               "rules": [{"from": from_principals(&[spiffe("dev", "cli")]),
                          "to": [{"operation": {"methods": ["GET"]}}]}]}),
    )];
    let st = f.set_policies(&p).expect("in force");
    let e = st.policy("prod/allow-get").expect("listed");
    assert_eq!(e.rules.len(), 1, "{e:?}");
    assert_eq!(e.rules[0].status, "proxy-required", "{e:?}");
    assert!(
        e.rules[0]
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("methods")),
        "the reason names the field: {e:?}"
    );
    f.assert_wants(
        "ALLOW with methods",
        &p,
        &[
            want("cli", "web", 8080, false),
            want("api", "web", 8080, false),
            want("cli", "api", 8080, true),
        ],
    );

    // A DENY rule with methods is enforced on its L4 part: broader, never narrower.
    let p = [ap(
        "prod",
        "deny-post",
        json!({"selector": sel("web"), "action": "DENY",
               "rules": [{"from": from_principals(&[spiffe("dev", "cli")]),
                          "to": [{"operation": {"methods": ["POST"], "paths": ["/admin"], "ports": ["8080"]}}]}]}),
    )];
    let st = f.set_policies(&p).expect("in force");
    let e = st.policy("prod/deny-post").expect("listed");
    assert_eq!(e.rules[0].status, "proxy-required", "{e:?}");
    f.assert_wants(
        "DENY with methods",
        &p,
        &[
            want("cli", "web", 8080, false),
            want("cli", "web", 8081, true),
            want("api", "web", 8080, true),
        ],
    );
}

/// The bad objects of [`bad_input_is_rejected_naming_the_field_and_the_rest_stays_in_force`]: (file, name, the
/// field the error must name, spec). Each is an ALLOW selecting `api`: if any were taken in any form, api would
/// flip to default deny.
fn bad_policies() -> Vec<(&'static str, &'static str, &'static str, Value)> {
    let p = |rule: Value| json!({"selector": sel("api"), "action": "ALLOW", "rules": [rule]});
    vec![
        (
            "bad-action.yaml",
            "bad-action",
            "action",
            json!({"selector": sel("api"), "action": "PERMIT", "rules": [{}]}),
        ),
        (
            "bad-principal.yaml",
            "bad-principal",
            "principals",
            p(json!({"from": [{"source": {"principals": ["spiffe://cluster.local/ns/dev"]}}]})),
        ),
        (
            "bad-cidr.yaml",
            "bad-cidr",
            "ipBlocks",
            p(json!({"from": [{"source": {"ipBlocks": ["10.244.0.0/33"]}}]})),
        ),
        (
            "bad-port.yaml",
            "bad-port",
            "ports",
            p(json!({"to": [{"operation": {"ports": [70000]}}]})),
        ),
        (
            "bad-custom.yaml",
            "bad-custom",
            "action",
            json!({"selector": sel("api"), "action": "CUSTOM", "rules": [{}]}),
        ),
        (
            "bad-from-empty.yaml",
            "bad-from-empty",
            "from",
            p(json!({"from": []})),
        ),
        (
            "bad-typo.yaml",
            "bad-typo",
            "form",
            p(json!({"form": [{"source": {"principals": ["*"]}}]})),
        ),
        (
            "bad-namespace.yaml",
            "bad-namespace",
            "namespaces",
            p(json!({"from": [{"source": {"namespaces": ["Prod"]}}]})),
        ),
        (
            "bad-wildcard.yaml",
            "bad-wildcard",
            "principals",
            p(json!({"from": [{"source": {"principals": ["cluster.local/ns/*/sa/cli"]}}]})),
        ),
        (
            "bad-not-port.yaml",
            "bad-not-port",
            "notPorts",
            p(json!({"to": [{"operation": {"notPorts": ["0"]}}]})),
        ),
        (
            "bad-cidr-text.yaml",
            "bad-cidr-text",
            "notIpBlocks",
            p(json!({"from": [{"source": {"notIpBlocks": ["10.0.0.1/"]}}]})),
        ),
    ]
}

#[test]
fn bad_input_is_rejected_naming_the_field_and_the_rest_stays_in_force() {
    if !require_privileged("bad_input_is_rejected_naming_the_field_and_the_rest_stays_in_force") {
        return;
    }
    let f = fixture("pol-bad-input");
    let good = ap(
        "prod",
        "deny-cli",
        json!({"selector": sel("web"), "action": "DENY", "rules": [{"from": from_principals(&[spiffe("dev", "cli")])}]}),
    );
    f.source
        .write("good.yaml", std::slice::from_ref(&good))
        .expect("write");
    let bad = bad_policies();
    for (file, name, _, spec) in &bad {
        f.source
            .write(file, &[ap("prod", name, spec.clone())])
            .expect("write");
    }
    let names: Vec<&str> = bad.iter().map(|b| b.1).collect();
    let want_keys: BTreeSet<String> = [policy_key(&good)].into();
    let st = f
        .wait_in_force(&want_keys, &names)
        .unwrap_or_else(|e| panic!("{e:#}"));
    let st = eventually(Duration::from_secs(5), Duration::from_millis(50), || {
        let st = f.agents[0].policy_status().map_err(|e| format!("{e:#}"))?;
        let missing: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| {
                !st.rejected
                    .iter()
                    .any(|r| r.object.ends_with(&format!("/{n}")))
            })
            .collect();
        if missing.is_empty() {
            Ok(st)
        } else {
            Err(format!("not rejected yet: {missing:?}; {:#?}", st.rejected))
        }
    })
    .unwrap_or_else(|e| panic!("{e}; first status: {st:#?}"));
    for (_, name, field, _) in &bad {
        let r = st
            .rejected
            .iter()
            .find(|r| r.object.ends_with(&format!("/{name}")))
            .expect("rejected");
        assert!(
            r.reason.contains(field),
            "the error for {name} must name the field {field:?}: {r:?}"
        );
    }
    let m = metrics(&f, 0);
    for (file, name, _, _) in &bad {
        assert!(
            m.samples.iter().any(|s| s.name == "sinew_source_rejected"
                && s.value >= 1.0
                && s.labels
                    .values()
                    .any(|v| v.ends_with(&format!("/{name}")) || v.ends_with(&format!("/{file}")))),
            "sinew_source_rejected has nothing for {name}: {}",
            series_like(&m, "rejected")
        );
    }
    let wants = [
        want("cli", "web", 8080, false),
        want("api", "web", 8080, true),
        want("cli", "api", 8080, true),
        want("web", "api", 8081, true),
    ];
    f.assert_wants(
        "good policy beside rejected ones",
        std::slice::from_ref(&good),
        &wants,
    );

    // A good policy edited into a bad one: the old version stays in force, and the new one is reported.
    let broken = ap(
        "prod",
        "deny-cli",
        json!({"selector": sel("web"), "action": "DENY",
               "rules": [{"from": from_principals(&[spiffe("dev", "cli")]), "to": [{"operation": {"ports": ["80a"]}}]}]}),
    );
    f.source.write("good.yaml", &[broken]).expect("write");
    eventually(Duration::from_secs(5), Duration::from_millis(50), || {
        let st = f.agents[0].policy_status().map_err(|e| format!("{e:#}"))?;
        if st
            .rejected
            .iter()
            .any(|r| r.object.contains("deny-cli") && r.reason.contains("ports"))
        {
            Ok(())
        } else {
            Err(format!("edit not rejected: {:#?}", st.rejected))
        }
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let st = f.agents[0].policy_status().expect("status");
    assert!(
        st.policy("prod/deny-cli").is_some(),
        "the last good version stays listed: {st:#?}"
    );
    f.assert_wants("last good version after a bad edit", &[good], &wants);

    // Fixing it applies the fix (and clears the rejection).
    let fixed = ap(
        "prod",
        "deny-cli",
        json!({"selector": sel("web"), "action": "DENY", "rules": [{"from": from_principals(&[spiffe("prod", "api")])}]}),
    );
    f.source
        .write("good.yaml", std::slice::from_ref(&fixed))
        .expect("write");
    eventually(Duration::from_secs(5), Duration::from_millis(50), || {
        let st = f.agents[0].policy_status().map_err(|e| format!("{e:#}"))?;
        if st.rejected.iter().any(|r| r.object.contains("deny-cli")) {
            Err(format!("still rejected: {:#?}", st.rejected))
        } else {
            Ok(())
        }
    })
    .unwrap_or_else(|e| panic!("{e}"));
    eventually(Duration::from_secs(3), Duration::from_millis(50), || {
        let c = f.agents[0]
            .policy_check("prod/api", "prod/web", 8080, "tcp")
            .map_err(|e| format!("{e:#}"))?;
        if c.allowed {
            Err(format!("fix not applied: {c:?}"))
        } else {
            Ok(())
        }
    })
    .unwrap_or_else(|e| panic!("{e}"));
    f.assert_wants(
        "fixed policy",
        &[fixed],
        &[
            want("cli", "web", 8080, true),
            want("api", "web", 8080, false),
        ],
    );
}

#[test]
fn denials_show_up_in_flows_with_identities_and_the_deciding_policy() {
    if !require_privileged("denials_show_up_in_flows_with_identities_and_the_deciding_policy") {
        return;
    }
    let f = fixture("pol-flows");
    let p = [
        ap(
            "prod",
            "deny-cli",
            json!({"selector": sel("web"), "action": "DENY", "rules": [{"from": from_principals(&[spiffe("dev", "cli")])}]}),
        ),
        ap(
            "prod",
            "audit-api",
            json!({"selector": sel("web"), "action": "AUDIT", "rules": [{"from": from_principals(&[spiffe("prod", "api")])}]}),
        ),
    ];
    set(&f, &p);
    let a = &f.agents[0];
    let since = a.flows(0).expect("flows").next;
    let web = f.w("web").pod.ip4;
    let target = vec![Proto::Tcp.target(IpAddr::V4(web), 8080)];
    let r = f.w("cli").pod.probe(&target, 400).expect("probe");
    assert_eq!(r.results[0].outcome, PROBE_EACCES, "{r:?}");
    let find = |direction: &str, since: u64| {
        eventually(Duration::from_secs(3), Duration::from_millis(50), || {
            let fl = a.flows(since).map_err(|e| format!("{e:#}"))?;
            fl.flows
                .iter()
                .find(|x| x.direction == direction && x.dst == format!("{web}:8080"))
                .cloned()
                .ok_or_else(|| format!("no {direction} flow to {web}:8080 in {:#?}", fl.flows))
        })
        .unwrap_or_else(|e| panic!("{e}"))
    };
    let e = find("egress", since);
    assert_eq!(e.verdict, "deny", "{e:#?}");
    assert_eq!(e.proto, "tcp", "{e:#?}");
    assert_eq!(e.src_identity, "dev/cli", "{e:#?}");
    assert_eq!(e.dst_identity, "prod/web", "{e:#?}");
    assert_eq!(e.policy.as_deref(), Some("prod/deny-cli"), "{e:#?}");
    assert_eq!(e.rule, Some(0), "{e:#?}");
    assert!(
        e.src.starts_with(&format!("{}:", f.w("cli").pod.ip4)),
        "{e:#?}"
    );

    let since = a.flows(0).expect("flows").next;
    let r = f.w("cli").pod.probe_unmanaged(&target, 400).expect("probe");
    assert_eq!(r.results[0].outcome, "timeout", "{r:?}");
    let i = find("ingress", since);
    assert_eq!(i.verdict, "deny", "{i:#?}");
    assert_eq!(i.src_identity, "dev/cli", "{i:#?}");
    assert_eq!(i.dst_identity, "prod/web", "{i:#?}");
    assert_eq!(i.policy.as_deref(), Some("prod/deny-cli"), "{i:#?}");

    // An AUDIT match is reported and does not change the verdict.
    let since = a.flows(0).expect("flows").next;
    let r = f.w("api").pod.probe(&target, 400).expect("probe");
    assert_eq!(r.results[0].outcome, PROBE_OK, "AUDIT never denies: {r:?}");
    let audit = eventually(Duration::from_secs(3), Duration::from_millis(50), || {
        let fl = a.flows(since).map_err(|e| format!("{e:#}"))?;
        fl.flows
            .iter()
            .find(|x| x.audit)
            .cloned()
            .ok_or_else(|| format!("no audit flow in {:#?}", fl.flows))
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(audit.verdict, "allow", "{audit:#?}");
    assert_eq!(audit.src_identity, "prod/api", "{audit:#?}");
    assert_eq!(
        audit.policy.as_deref(),
        Some("prod/audit-api"),
        "{audit:#?}"
    );

    // The CLI shows the same.
    let cli = a.cli_flows().expect("mesh-agent flows -o json");
    assert!(
        cli.flows
            .iter()
            .any(|x| x.direction == "egress" && x.src_identity == "dev/cli" && x.verdict == "deny"),
        "{cli:#?}"
    );
    assert!(
        cli.flows
            .iter()
            .any(|x| x.direction == "ingress" && x.src_identity == "dev/cli"),
        "{cli:#?}"
    );

    // `flows --follow` streams new verdicts, one JSON object per line.
    let mut cmd = std::process::Command::new(&a.options().bin);
    cmd.args(["flows", "--follow", "-o", "json", "--admin-addr"])
        .arg(a.admin_addr().to_string());
    let follow =
        sinew_tests::Proc::spawn("flows-follow", cmd, f.topo.work_dir()).expect("spawn flows -f");
    // Everything already recorded comes first; wait until that is printed, then cause a new denial.
    std::thread::sleep(Duration::from_millis(800));
    let before = follow.lines().len();
    let r = f.w("cli").pod.probe(&target, 400).expect("probe");
    assert_eq!(r.results[0].outcome, PROBE_EACCES, "{r:?}");
    eventually(Duration::from_secs(5), Duration::from_millis(50), || {
        let lines = follow.lines();
        if lines[before.min(lines.len())..]
            .iter()
            .any(|l| l.contains("\"egress\"") && l.contains("dev/cli"))
        {
            Ok(())
        } else {
            Err(format!("no new egress line; all lines: {lines:#?}"))
        }
    })
    .unwrap_or_else(|e| panic!("flows --follow did not print the new denial: {e}"));
    eprintln!(
        "flows --follow: {before} lines before the new denial, {} after",
        follow.lines().len()
    );
    let last: Vec<sinew_tests::Flow> = follow
        .lines()
        .iter()
        .skip(before)
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    assert!(
        last.iter()
            .any(|x| x.direction == "egress" && x.policy.as_deref() == Some("prod/deny-cli")),
        "{last:#?}"
    );
}

#[test]
fn a_flood_of_denials_is_bounded_and_leaves_the_agent_healthy() {
    if !require_privileged("a_flood_of_denials_is_bounded_and_leaves_the_agent_healthy") {
        return;
    }
    let f = fixture("pol-flood");
    let p = [ap(
        "prod",
        "deny-cli",
        json!({"selector": sel("web"), "action": "DENY", "rules": [{"from": from_principals(&[spiffe("dev", "cli")])}]}),
    )];
    set(&f, &p);
    let to = format!("{}:8080", f.w("web").pod.ip4);
    let cli = &f.w("cli").pod;
    let started = Instant::now();
    let r = cli
        .udp_flood(&to, 20_000, 5_000, true)
        .expect("client-side flood");
    eprintln!(
        "client-side flood: {} attempts in {:.0} ms, {:?}",
        r.attempts, r.duration_ms, r.errors
    );
    assert_eq!(r.sent, 0, "every datagram is refused: {r:?}");
    assert_eq!(r.errors.get("EACCES"), Some(&r.attempts), "{r:?}");
    assert!(
        r.attempts >= 5_000,
        "flood too small to mean anything: {r:?}"
    );
    let r2 = cli
        .udp_flood(&to, 20_000, 5_000, false)
        .expect("server-side flood");
    eprintln!(
        "server-side flood: {} sent in {:.0} ms (total {:?})",
        r2.sent,
        r2.duration_ms,
        started.elapsed()
    );
    // The agent stays healthy and counts what it dropped.
    let m = eventually(Duration::from_secs(5), Duration::from_millis(100), || {
        let resp = f.agents[0].get("/readyz").map_err(|e| format!("{e:#}"))?;
        if resp.status != 200 {
            return Err(format!("/readyz {}", resp.status));
        }
        let m = f.agents[0].metrics().map_err(|e| format!("{e:#}"))?;
        if m.value("sinew_policy_events_dropped_total", &[]) > 0.0 {
            Ok(m)
        } else {
            Err(format!(
                "no dropped events counted; {}",
                series_like(&m, "events")
            ))
        }
    })
    .unwrap_or_else(|e| panic!("{e}"));
    // Nothing is lost uncounted: every refused datagram is a reported denial or a counted dropped event.
    let dropped = m.value("sinew_policy_events_dropped_total", &[]);
    let reported = denials(&m, "egress") + denials(&m, "ingress");
    eprintln!("after the floods: {reported} denials reported, {dropped} events dropped");
    assert!(
        reported + dropped >= r.attempts as f64,
        "{} refused sendto() calls but only {reported} denials reported and {dropped} events counted as \
         dropped: {}; {}",
        r.attempts,
        series_like(&m, "denials"),
        series_like(&m, "dropped")
    );
    assert!(
        m.invalid.is_empty(),
        "invalid metric lines: {:?}",
        m.invalid
    );
    // Still enforcing and still answering.
    f.assert_wants(
        "after the flood",
        &p,
        &[
            want("cli", "web", 8080, false),
            want("api", "web", 8080, true),
        ],
    );
    let fl = f.agents[0].flows(0).expect("flows after the flood");
    assert!(!fl.flows.is_empty(), "some denials were reported");
}

/// Probes `cli -> web:8080/tcp` (client side) every 20 ms until `pred(outcome)` holds; returns how long it took.
fn time_until(f: &PolicyFixture, pred: impl Fn(&str) -> bool, bound: Duration) -> Duration {
    let target = vec![Proto::Tcp.target(IpAddr::V4(f.w("web").pod.ip4), 8080)];
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < bound {
        let r = f.w("cli").pod.probe(&target, 300).expect("probe");
        last = r.results[0].outcome.clone();
        if pred(&last) {
            return start.elapsed();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("no change within {bound:?}; last outcome {last}");
}

#[test]
fn policy_changes_reach_new_connections_within_a_second() {
    if !require_privileged("policy_changes_reach_new_connections_within_a_second") {
        return;
    }
    let f = fixture("pol-latency");
    set(&f, &[]);
    let p = [ap(
        "prod",
        "deny-cli-latency",
        json!({"selector": sel("web"), "action": "DENY", "rules": [{"from": from_principals(&[spiffe("dev", "cli")])}]}),
    )];
    f.source.write("policies.yaml", &p).expect("write");
    let took = time_until(&f, |o| o == PROBE_EACCES, Duration::from_secs(5));
    eprintln!("deny applied to new connections after {took:?}");
    assert!(
        took < Duration::from_secs(1),
        "deny took {took:?} to reach new connections"
    );
    f.source.remove("policies.yaml").expect("rm");
    let took = time_until(&f, |o| o == PROBE_OK, Duration::from_secs(5));
    eprintln!("removal applied to new connections after {took:?}");
    assert!(
        took < Duration::from_secs(1),
        "removal took {took:?} to reach new connections"
    );
}

#[test]
fn two_nodes_client_and_server_side_both_enforce_across_nodes() {
    if !require_privileged("two_nodes_client_and_server_side_both_enforce_across_nodes") {
        return;
    }
    let nodes = vec![
        (
            "node-a",
            vec![
                PodSpec::new("cli", "dev", "cli", &[("app", "cli")]),
                PodSpec::stranger("outsider"),
            ],
        ),
        (
            "node-b",
            vec![
                PodSpec::new("web", "prod", "web", &[("app", "web")]),
                PodSpec::new("api", "prod", "api", &[("app", "api")]),
            ],
        ),
    ];
    let f = PolicyFixture::setup("pol-two-nodes", testpod_bin!(), &nodes, &PORTS, &[])
        .unwrap_or_else(|e| panic!("setup: {e:#}"));
    let p = [
        ap(
            "prod",
            "deny-cli",
            json!({"selector": sel("web"), "action": "DENY", "rules": [{"from": from_principals(&[spiffe("dev", "cli")])}]}),
        ),
        ap(
            "prod",
            "allow-dev-to-api",
            json!({"selector": sel("api"), "rules": [{"from": [{"source": {"namespaces": ["dev"]}}]}]}),
        ),
        ap(
            "dev",
            "allow-web-to-cli",
            json!({"selector": sel("cli"), "rules": [{"from": from_principals(&[spiffe("prod", "web")])}]}),
        ),
    ];
    set(&f, &p);
    let (ma0, mb0) = (metrics(&f, 0), metrics(&f, 1));
    let wants = vec![
        want("cli", "web", 8080, false),
        want("cli", "api", 8080, true),
        want("web", "api", 8080, false),
        want("api", "web", 8081, true),
        want("web", "cli", 8080, true),
        want("api", "cli", 8080, false),
        want("outsider", "web", 8080, true),
        want("outsider", "api", 8080, false),
    ];
    f.assert_wants("across two nodes", &p, &wants);
    // cli -> web (client side) was refused by node-a's agent; node-b saw nothing of it.
    let (ma, mb) = (metrics(&f, 0), metrics(&f, 1));
    assert!(
        denials(&ma, "egress") > denials(&ma0, "egress"),
        "node-a counted no egress denial: {}",
        series_like(&ma, "denials")
    );
    assert!(
        denials(&mb, "ingress") > denials(&mb0, "ingress"),
        "node-b counted no ingress denial (server-side probes): {}",
        series_like(&mb, "denials")
    );
}

/// Probes `src -> web:8080/tcp` (client side) every 20 ms until the outcome is `want`; panics after `bound`.
fn wait_outcome(f: &PolicyFixture, src: &str, dst: &str, want: &str, bound: Duration) -> Duration {
    let target = vec![Proto::Tcp.target(IpAddr::V4(f.w(dst).pod.ip4), 8080)];
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < bound {
        let r = f.w(src).pod.probe(&target, 300).expect("probe");
        last = r.results[0].outcome.clone();
        if last == want {
            return start.elapsed();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{src} -> {dst}: still {last} after {bound:?}, want {want}");
}

#[test]
fn pod_identity_label_and_membership_changes_reach_the_kernel() {
    if !require_privileged("pod_identity_label_and_membership_changes_reach_the_kernel") {
        return;
    }
    let mut f = fixture("pol-pod-churn");
    let p = [
        ap(
            "prod",
            "deny-cli",
            json!({"selector": sel("web"), "action": "DENY", "rules": [{"from": from_principals(&[spiffe("dev", "cli")])}]}),
        ),
        ap(
            "prod",
            "allow-known",
            json!({"selector": sel("api"), "rules": [{"from": from_principals(&["*".to_string()])}]}),
        ),
    ];
    set(&f, &p);
    f.assert_wants(
        "before any change",
        &p,
        &[
            want("cli", "web", 8080, false),
            want("api", "web", 8080, true),
            want("web", "api", 8080, true),
            want("outsider", "api", 8080, false),
        ],
    );

    // cli's service account changes: the DENY names the old identity, so cli may connect now.
    let i = f.workloads.iter().position(|w| w.name() == "cli").unwrap();
    f.workloads[i].service_account = Some("cli2".into());
    f.w("cli").write(&f.source).expect("write pod");
    let took = wait_outcome(&f, "cli", "web", PROBE_OK, Duration::from_secs(3));
    eprintln!("service account change applied after {took:?}");
    f.assert_wants(
        "cli runs as dev/cli2",
        &p,
        &[
            want("cli", "web", 8080, true),
            want("cli", "api", 8081, true),
        ],
    );

    // cli is back to dev/cli: denied again.
    f.workloads[i].service_account = Some("cli".into());
    f.w("cli").write(&f.source).expect("write pod");
    wait_outcome(&f, "cli", "web", PROBE_EACCES, Duration::from_secs(3));
    // web loses its app=web label: the DENY no longer selects it.
    let j = f.workloads.iter().position(|w| w.name() == "web").unwrap();
    f.workloads[j].labels = [("app".to_string(), "web-v2".to_string())].into();
    f.w("web").write(&f.source).expect("write pod");
    let took = wait_outcome(&f, "cli", "web", PROBE_OK, Duration::from_secs(3));
    eprintln!("label change applied after {took:?}");
    f.assert_wants(
        "web relabelled",
        &p,
        &[
            want("cli", "web", 8080, true),
            want("cli", "api", 8080, true),
        ],
    );

    // A pod added later, with cli's identity, is judged as cli on both paths.
    let late = f.topo.add_pod_in("node-a", "late", "dev").expect("add pod");
    f.servers
        .push(late.serve_ports(&PORTS, "late").expect("serve"));
    let w = Workload::new(&late, "cli", &[("app", "cli")]);
    w.write(&f.source).expect("write pod");
    f.workloads.push(w);
    // web back to app=web, so the DENY selects it again.
    f.workloads[j].labels = [("app".to_string(), "web".to_string())].into();
    f.w("web").write(&f.source).expect("write pod");
    let took = wait_outcome(&f, "late", "web", PROBE_EACCES, Duration::from_secs(3));
    eprintln!("new pod enforced after {took:?}");
    f.assert_wants(
        "a pod added later",
        &p,
        &[
            want("late", "web", 8080, false),
            want("late", "api", 8080, true),
            want("api", "late", 8081, true),
        ],
    );

    // api's Pod object is deleted: its address belongs to nobody now (the world), and no policy applies to it
    // as a destination any more, so the outsider that `allow-known` kept out gets in.
    let k = f.workloads.iter().position(|w| w.name() == "api").unwrap();
    f.source.remove("pod-api.yaml").expect("rm pod");
    f.workloads[k] = Workload::stranger(&f.workloads[k].pod.clone());
    let to_api: Vec<String> = Proto::BOTH
        .iter()
        .map(|p| p.target(IpAddr::V4(f.w("api").pod.ip4), 8080))
        .collect();
    let start = Instant::now();
    let mut last = Vec::new();
    while start.elapsed() < Duration::from_secs(3) {
        let r = f
            .w("outsider")
            .pod
            .probe_unmanaged(&to_api, 300)
            .expect("probe");
        last = r.results.iter().map(|x| x.outcome.clone()).collect();
        if last.iter().all(|o| o == PROBE_OK) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        last,
        vec![PROBE_OK, PROBE_OK],
        "outsider -> deleted api (no policy applies to an unknown address)"
    );
    eprintln!("pod deletion applied after {:?}", start.elapsed());
    f.assert_wants(
        "api deleted",
        &p,
        &[
            want("api", "web", 8080, true),
            want("cli", "web", 8080, false),
        ],
    );
}

#[test]
fn custom_trust_domain_and_mesh_root_namespace() {
    if !require_privileged("custom_trust_domain_and_mesh_root_namespace") {
        return;
    }
    let mesh = Mesh {
        trust_domain: "example.org".into(),
        root_namespace: "mesh-root".into(),
    };
    let f = PolicyFixture::setup_with(
        "pol-td",
        testpod_bin!(),
        &[("node-a", pods())],
        &PORTS,
        &[],
        &FixtureOptions {
            mesh: Some(mesh),
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("setup: {e:#}"));
    let p = [
        // The configured root namespace applies mesh-wide...
        ap(
            "mesh-root",
            "allow-cli-to-web",
            json!({"selector": sel("web"), "rules": [{"from": [{"source": {"principals": ["spiffe://example.org/ns/dev/sa/cli"]}}]}]}),
        ),
        // ...a principal in another trust domain never matches...
        ap(
            "prod",
            "allow-api-other-td",
            json!({"selector": sel("web"), "rules": [{"from": from_principals(&[istio_principal("prod", "api")])}]}),
        ),
        // ...and the default root namespace is an ordinary (empty) namespace now.
        ap(
            "sinew-system",
            "deny-cli-everywhere",
            json!({"action": "DENY", "rules": [{"from": [{"source": {"principals": ["example.org/ns/dev/sa/cli"]}}]}]}),
        ),
    ];
    set(&f, &p);
    f.assert_wants(
        "trust domain example.org, root namespace mesh-root",
        &p,
        &[
            want("cli", "web", 8080, true),
            want("api", "web", 8080, false),
            want("outsider", "web", 8081, false),
            want("cli", "api", 8080, true),
            want("cli", "cli", 8080, true),
        ],
    );
    let c = f.agents[0]
        .policy_check("dev/cli", "prod/web", 8080, "tcp")
        .expect("check");
    assert_eq!(
        c.policy.as_deref(),
        Some("mesh-root/allow-cli-to-web"),
        "{c:?}"
    );
}

#[test]
fn ipv6_and_v4_mapped_connections_are_judged_like_ipv4() {
    if !require_privileged("ipv6_and_v4_mapped_connections_are_judged_like_ipv4") {
        return;
    }
    let f = PolicyFixture::setup_with(
        "pol-ipv6",
        testpod_bin!(),
        &[("node-a", pods())],
        &PORTS,
        &[],
        &FixtureOptions {
            ipv6: true,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("setup: {e:#}"));
    let outsider6 = format!("{}/128", f.w("outsider").pod.ip6.expect("ipv6"));
    let p = [
        ap(
            "prod",
            "deny-cli",
            json!({"selector": sel("web"), "action": "DENY", "rules": [{"from": from_principals(&[spiffe("dev", "cli")])}]}),
        ),
        ap(
            "prod",
            "allow-api",
            json!({"selector": sel("api"), "rules": [
                {"from": [{"source": {"ipBlocks": [outsider6]}}]},
                {"from": from_principals(&[spiffe("dev", "cli")])},
            ]}),
        ),
    ];
    set(&f, &p);
    let wants = [
        want("cli", "web", 8080, false),
        want("api", "web", 8081, true),
        want("cli", "api", 8080, true),
        want("web", "api", 8080, false),
    ];
    f.assert_wants_on("over IPv6", &p, &wants, true);
    f.assert_wants("over IPv4", &p, &wants);
    // The outsider's IPv6 address is in the block, its IPv4 address is not.
    f.assert_wants_on(
        "outsider over IPv6",
        &p,
        &[want("outsider", "api", 8080, true)],
        true,
    );
    f.assert_wants(
        "outsider over IPv4",
        &p,
        &[want("outsider", "api", 8080, false)],
    );
    // An AF_INET6 socket connecting to a v4-mapped address goes through connect6/sendmsg6.
    let web4 = f.w("web").pod.ip4;
    let mapped = vec![
        format!("tcp:[::ffff:{web4}]:8080"),
        format!("udp:[::ffff:{web4}]:8080"),
    ];
    for (src, want_outcome) in [("cli", PROBE_EACCES), ("api", PROBE_OK)] {
        let r = f.w(src).pod.probe(&mapped, 400).expect("probe");
        let got: Vec<&str> = r.results.iter().map(|x| x.outcome.as_str()).collect();
        assert_eq!(
            got,
            vec![want_outcome, want_outcome],
            "{src} -> [::ffff:{web4}]:8080: {r:?}"
        );
    }
}

/// One socket each, a datagram every 50 ms for 8 s, from cli to web:8080: unconnected and connected from cli's
/// cgroup (the sendmsg hook sees only the unconnected one's datagrams), and unconnected from outside it (server
/// side only). `before` is in force first, `deny` (which denies cli -> web) from about 1.5 s for 2.5 s, then
/// `after`. Datagrams sent more than 1 s after a set is in force must follow it.
fn udp_sockets_follow_changes(
    f: &PolicyFixture,
    before: &[Value],
    deny: &[Value],
    after: &[Value],
) {
    set(f, before);
    let to = format!("{}:8080", f.w("web").pod.ip4);
    let cli = &f.w("cli").pod;
    let args = |cmd: &'static str| -> Vec<String> {
        [
            cmd,
            "--to",
            &to,
            "--count",
            "1000",
            "--interval-ms",
            "50",
            "--timeout-ms",
            "200",
            "--duration-ms",
            "8000",
            "--timeline",
        ]
        .map(String::from)
        .to_vec()
    };
    let spawn = |cmd: &'static str, managed: bool| {
        let a = args(cmd);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        if managed {
            cli.testpod(&a)
        } else {
            cli.spawn_unmanaged(f.topo.testpod_bin(), &a)
        }
        .expect("spawn udp sender")
    };
    let senders = [
        ("unconnected, client side", spawn("udp-send", true)),
        ("connected, client side", spawn("udp-connected", true)),
        ("unconnected, server side", spawn("udp-send", false)),
    ];
    std::thread::sleep(Duration::from_millis(1500));
    let denied_written = sinew_tests::unix_ms();
    set(f, deny);
    let denied_in_force = sinew_tests::unix_ms();
    std::thread::sleep(Duration::from_millis(2500));
    let allowed_written = sinew_tests::unix_ms();
    set(f, after);
    let allowed_in_force = sinew_tests::unix_ms();
    let mut problems = Vec::new();
    for (what, p) in senders {
        let out = p.wait(Duration::from_secs(20)).expect("sender ends");
        let r: sinew_tests::testpod::UdpReport = out.json().expect("udp report");
        let mut counts = [0usize; 3];
        let mut wrong = [0usize; 3];
        for (t, outcome) in &r.timeline {
            let ok = outcome == "ok";
            let phase = if *t < denied_written {
                Some((0, true))
            } else if *t >= denied_in_force + 1000 && *t + 250 < allowed_written {
                Some((1, false))
            } else if *t >= allowed_in_force + 1000 {
                Some((2, true))
            } else {
                None
            };
            if let Some((i, want_ok)) = phase {
                counts[i] += 1;
                if ok != want_ok {
                    wrong[i] += 1;
                    if wrong[i] <= 3 {
                        problems.push(format!(
                            "{what}: datagram at {t} (phase {i}, +{} ms after the set was in force) {outcome}, \
                             want {}",
                            t.saturating_sub([0, denied_in_force, allowed_in_force][i]),
                            if want_ok { "ok" } else { "denied" }
                        ));
                    }
                }
                if what == "unconnected, client side" && !ok && outcome != "send:EACCES" {
                    problems.push(format!("{what}: denied as {outcome}, not send:EACCES"));
                }
            }
        }
        eprintln!(
            "{what}: datagrams checked per phase {counts:?}, wrong {wrong:?}; errors {:?}",
            r.errors
        );
        if counts.iter().any(|&c| c < 3) {
            problems.push(format!("{what}: too few datagrams per phase {counts:?}"));
        }
    }
    assert!(
        problems.is_empty(),
        "{} problem(s) (deny written {denied_written}, in force {denied_in_force}; lifted {allowed_written}, \
         in force {allowed_in_force}):\n  {}\nbefore:\n{}\ndeny:\n{}",
        problems.len(),
        problems.join("\n  "),
        sinew_tests::policy::policies_yaml(before),
        sinew_tests::policy::policies_yaml(deny),
    );
}

#[test]
fn udp_flows_on_one_socket_are_judged_again_after_each_change() {
    if !require_privileged("udp_flows_on_one_socket_are_judged_again_after_each_change") {
        return;
    }
    let f = fixture("pol-udp-rejudge");
    let deny = [ap(
        "prod",
        "deny-cli-udp",
        json!({"selector": sel("web"), "action": "DENY", "rules": [{"from": from_principals(&[spiffe("dev", "cli")])}]}),
    )];
    udp_sockets_follow_changes(&f, &[], &deny, &[]);
}

#[test]
fn udp_flows_to_a_workload_already_under_policy_are_judged_again_after_a_revocation() {
    if !require_privileged(
        "udp_flows_to_a_workload_already_under_policy_are_judged_again_after_a_revocation",
    ) {
        return;
    }
    // web is under an ALLOW policy from the start, so its answers to cli are recorded as UDP peers; revoking cli
    // must still stop cli's datagrams on the same sockets within a second.
    let f = fixture("pol-udp-revoke");
    let allow = |name: &str, sa: (&str, &str)| {
        ap(
            "prod",
            name,
            json!({"selector": sel("web"), "rules": [{"from": from_principals(&[spiffe(sa.0, sa.1)])}]}),
        )
    };
    udp_sockets_follow_changes(
        &f,
        &[allow("allow-cli-1", ("dev", "cli"))],
        &[allow("allow-api-only", ("prod", "api"))],
        &[allow("allow-cli-2", ("dev", "cli"))],
    );
}

#[test]
fn the_node_itself_is_no_workload_identity_and_is_matched_by_ip_blocks() {
    if !require_privileged("the_node_itself_is_no_workload_identity_and_is_matched_by_ip_blocks") {
        return;
    }
    let f = fixture("pol-host");
    let node = f.topo.node("node-a");
    let host_ip = IpAddr::V4(node.bridge_ip4());
    // The node as a source: no workload identity, its bridge address.
    let mut host = Workload::stranger(&f.w("outsider").pod);
    host.pod.name = "node-a".into();
    let targets: Vec<String> = Proto::BOTH
        .iter()
        .map(|p| p.target(IpAddr::V4(f.w("web").pod.ip4), 8080))
        .collect();
    let cases = [
        (
            "ALLOW principals [*]",
            vec![ap(
                "prod",
                "host-allow-any-principal",
                json!({"selector": sel("web"), "rules": [{"from": from_principals(&["*".to_string()])}]}),
            )],
        ),
        (
            "ALLOW ipBlocks [node/32]",
            vec![ap(
                "prod",
                "host-allow-node-ip",
                json!({"selector": sel("web"), "rules": [{"from": [{"source": {"ipBlocks": [format!("{host_ip}/32")]}}]}]}),
            )],
        ),
        (
            "DENY notNamespaces [prod]",
            vec![ap(
                "prod",
                "host-deny-not-prod",
                json!({"selector": sel("web"), "action": "DENY", "rules": [{"from": [{"source": {"notNamespaces": ["prod"]}}]}]}),
            )],
        ),
    ];
    for (what, p) in cases {
        set(&f, &p);
        let parsed = sinew_tests::policy::parse_policies(&p).expect("parse");
        let r = node
            .probe_unmanaged(&targets, 400)
            .expect("probe from the node");
        for (proto, res) in Proto::BOTH.iter().zip(&r.results) {
            let v = sinew_tests::policy::expected_with(
                &parsed,
                &Mesh::default(),
                &host,
                host_ip,
                f.w("web"),
                8080,
                *proto,
            );
            let want = if v.allowed { PROBE_OK } else { "timeout" };
            assert_eq!(
                res.outcome,
                want,
                "{what}: node -> web {}/8080: reference says {v}\n{}",
                proto.as_str(),
                sinew_tests::policy::policies_yaml(&p)
            );
        }
        let c = f.agents[0]
            .policy_check(&host_ip.to_string(), "prod/web", 8080, "tcp")
            .expect("check");
        let v = sinew_tests::policy::expected_with(
            &parsed,
            &Mesh::default(),
            &host,
            host_ip,
            f.w("web"),
            8080,
            Proto::Tcp,
        );
        assert_eq!(
            c.allowed, v.allowed,
            "{what}: policy check from the node: {c:?}"
        );
    }
}

/// The agent must survive any policy set and never open what the previous set closed: a compilation that cannot
/// be used must leave the previous one in force.
fn assert_alive(f: &PolicyFixture, what: &str) {
    for a in &f.agents {
        let r = a.get("/readyz");
        assert!(
            matches!(&r, Ok(x) if x.status == 200),
            "{what}: agent {} not ready/alive ({:?}); log tail:\n{}",
            a.options().node,
            r.map(|x| x.status),
            a.log_tail(30)
        );
    }
}

#[test]
fn huge_policies_never_crash_the_agent_or_open_anything() {
    if !require_privileged("huge_policies_never_crash_the_agent_or_open_anything") {
        return;
    }
    let mut f = fixture("pol-huge");
    let good = ap(
        "prod",
        "deny-cli",
        json!({"selector": sel("web"), "action": "DENY", "rules": [{"from": from_principals(&[spiffe("dev", "cli")])}]}),
    );
    f.source
        .write("good.yaml", std::slice::from_ref(&good))
        .expect("write");
    f.wait_in_force(&[policy_key(&good)].into(), &[])
        .unwrap_or_else(|e| panic!("{e:#}"));
    let every_port: Vec<String> = (1..=65535u32).map(|p| p.to_string()).collect();
    let huge = [
        // Every port named: no port is left over as "any other port".
        ap(
            "prod",
            "allow-every-port",
            json!({"selector": sel("api"), "rules": [{"from": from_principals(&[spiffe("dev", "cli")]),
                                                      "to": [{"operation": {"ports": every_port}}]}]}),
        ),
        // Many distinct addresses times many ports: more verdict entries than one set may use.
        ap(
            "prod",
            "allow-many",
            json!({"selector": sel("api"), "rules": [{"from": [{"source": {"ipBlocks":
                    (0..300).map(|i| format!("10.99.{}.{}/32", i / 250, 1 + i % 250)).collect::<Vec<_>>()}}],
                "to": [{"operation": {"ports": (20000..20600).map(|p: u32| p.to_string()).collect::<Vec<_>>()}}]}]}),
        ),
    ];
    let mut problems = Vec::new();
    for h in &huge {
        let key = policy_key(h);
        let name = key.split('/').nth(1).unwrap_or("").to_string();
        f.source
            .write("huge.yaml", std::slice::from_ref(h))
            .expect("write");
        // Either it is compiled and in force, or it is reported and the previous set stays; give it time.
        let errors0 = metrics(&f, 0).value("sinew_policy_compile_errors_total", &[]);
        let outcome = eventually(Duration::from_secs(20), Duration::from_millis(200), || {
            if let Some(s) = f.agents[0].exited() {
                return Ok(format!("agent exited: {s}"));
            }
            let st = f.agents[0].policy_status().map_err(|e| format!("{e:#}"))?;
            if st.policy(&key).is_some() {
                return Ok("in force".to_string());
            }
            let m = f.agents[0].metrics().map_err(|e| format!("{e:#}"))?;
            if m.value("sinew_policy_compile_errors_total", &[]) > errors0 {
                return Ok("not compiled (sinew_policy_compile_errors_total)".to_string());
            }
            let extra = serde_json::to_string(&st.extra).unwrap_or_default();
            let reported = st
                .rejected
                .iter()
                .any(|r| r.object.ends_with(&format!("/{name}")))
                || extra.contains("verdict entries")
                || extra.contains(&name);
            if reported {
                return Ok(format!("reported: {extra}"));
            }
            Err(format!("{key}: neither in force nor reported yet"))
        })
        .unwrap_or_else(|e| format!("undecided: {e}"));
        eprintln!("{key}: {outcome}");
        if outcome.starts_with("agent exited") || outcome.starts_with("undecided") {
            problems.push(format!(
                "{key}: {outcome}; agent log tail:\n{}",
                f.agents[0].log_tail(12)
            ));
            // Keep going with the next case: without the file, a restarted agent must come back.
            f.source.remove("huge.yaml").expect("rm");
            let a = &mut f.agents[0];
            a.restart().expect("restart");
            a.wait_ready(Duration::from_secs(20))
                .expect("ready after restart");
            f.wait_in_force(&[policy_key(&good)].into(), &[])
                .unwrap_or_else(|e| panic!("{e:#}"));
            continue;
        }
        assert_alive(&f, &key);
        let in_force = outcome == "in force";
        let policies: Vec<Value> = if in_force {
            vec![good.clone(), h.clone()]
        } else {
            vec![good.clone()]
        };
        let p = f.verify(
            &policies,
            &[
                want("cli", "web", 8080, false),
                want("api", "web", 8080, true),
                want("cli", "api", 8081, !in_force || name == "allow-every-port"),
                want("web", "api", 8080, !in_force),
            ],
        );
        match p {
            Ok(p) if p.is_empty() => {}
            Ok(p) => problems.push(format!("{key} ({outcome}): {}", p.join("; "))),
            Err(e) => problems.push(format!("{key} ({outcome}): probing: {e:#}")),
        }
        if !in_force {
            // The operator must be able to see why it is not in force...
            let st = f.agents[0].policy_status().expect("status");
            if !st
                .rejected
                .iter()
                .any(|r| r.object.ends_with(&format!("/{name}")))
            {
                problems.push(format!(
                    "{key} ({outcome}) is neither in force nor listed in /debug/policies `rejected`: `policy \
                     status` does not say why"
                ));
            }
            // ...and an unrelated new DENY must still reach the kernel while it sits in the source.
            let urgent = ap(
                "prod",
                "urgent-deny-api",
                json!({"selector": sel("web"), "action": "DENY", "rules": [{"from": from_principals(&[spiffe("prod", "api")])}]}),
            );
            f.source
                .write("urgent.yaml", std::slice::from_ref(&urgent))
                .expect("write");
            let keys = [policy_key(&good), policy_key(&urgent)].into();
            if let Err(e) = f.agents[0].wait_policies(&keys, &[&name], Duration::from_secs(5)) {
                let check = f.agents[0].policy_check("prod/api", "prod/web", 8080, "tcp");
                problems.push(format!(
                    "{key} ({outcome}) blocks an unrelated new DENY policy (prod/urgent-deny-api): not in force \
                     after 5 s ({}); policy check api -> web: {check:?}",
                    e.to_string().lines().next().unwrap_or("")
                ));
            }
            f.source.remove("urgent.yaml").expect("rm");
        }
        f.source.remove("huge.yaml").expect("rm");
        f.wait_in_force(&[policy_key(&good)].into(), &[])
            .unwrap_or_else(|e| panic!("{e:#}"));
    }
    assert!(
        problems.is_empty(),
        "{} problem(s):\n{}",
        problems.len(),
        problems.join("\n")
    );
}

/// One datagram from cli to web:8081 from source port `src_port` (from cli's cgroup or outside it); the outcome.
fn udp_once(f: &PolicyFixture, managed: bool, src_port: u16) -> String {
    let to = format!("{}:8081", f.w("web").pod.ip4);
    let port = src_port.to_string();
    let args = [
        "udp-send",
        "--to",
        to.as_str(),
        "--count",
        "1",
        "--timeout-ms",
        "400",
        "--src-port",
        port.as_str(),
        "--timeline",
    ];
    let cli = &f.w("cli").pod;
    let r: sinew_tests::testpod::UdpReport = if managed {
        cli.run_json(&args, Duration::from_secs(10))
    } else {
        cli.run_json_unmanaged(&args, Duration::from_secs(10))
    }
    .expect("udp-send");
    r.timeline
        .first()
        .map(|t| t.1.clone())
        .unwrap_or_else(|| format!("no datagram: {r:?}"))
}

#[test]
fn a_reused_udp_source_port_neither_inherits_nor_loses_a_verdict() {
    if !require_privileged("a_reused_udp_source_port_neither_inherits_nor_loses_a_verdict") {
        return;
    }
    let f = fixture("pol-udp-reuse");
    let open_web = |name: &str| ap("prod", name, json!({"selector": sel("web"), "rules": [{}]}));
    let mut problems = Vec::new();
    let mut check = |what: &str, got: String, want: &str| {
        eprintln!("{what}: {got}");
        if got != want {
            problems.push(format!("{what}: got {got}, want {want}"));
        }
    };

    // 1. web is under policy (open to all) and answers cli from port 40001, while cli is under no policy.
    set(&f, &[open_web("open-web-1")]);
    check(
        "cli:40001 -> web, nobody restricted",
        udp_once(&f, true, 40001),
        "ok",
    );
    // cli comes under default deny (only api may reach it). Its own flows out are not restricted by that: a new
    // socket on the same port must still get web's answer, like a fresh port does.
    let cli_closed = ap(
        "dev",
        "cli-only-from-api",
        json!({"selector": sel("cli"), "rules": [{"from": from_principals(&[spiffe("prod", "api")])}]}),
    );
    set(&f, &[open_web("open-web-2"), cli_closed]);
    check(
        "cli under default deny, fresh port 40002 -> web",
        udp_once(&f, true, 40002),
        "ok",
    );
    check(
        "cli under default deny, reused port 40001 -> web",
        udp_once(&f, true, 40001),
        "ok",
    );

    // 2. cli talks to web from port 40003 (outside its cgroup: only web's side judges) while allowed; then cli is
    // no longer allowed. A new socket on the same port must be judged by the new set, like a fresh port.
    set(&f, &[open_web("open-web-3")]);
    check(
        "cli:40003 -> web, allowed",
        udp_once(&f, false, 40003),
        "ok",
    );
    let only_api = ap(
        "prod",
        "web-only-from-api",
        json!({"selector": sel("web"), "rules": [{"from": from_principals(&[spiffe("prod", "api")])}]}),
    );
    set(&f, &[only_api]);
    std::thread::sleep(Duration::from_millis(1000));
    check(
        "cli no longer allowed, fresh port 40004 -> web (server side)",
        udp_once(&f, false, 40004),
        "recv:EAGAIN",
    );
    check(
        "cli no longer allowed, reused port 40003 -> web (server side)",
        udp_once(&f, false, 40003),
        "recv:EAGAIN",
    );
    check(
        "cli no longer allowed, reused port 40003 -> web (client side)",
        udp_once(&f, true, 40003),
        "send:EACCES",
    );
    assert!(
        problems.is_empty(),
        "{} problem(s):\n  {}",
        problems.len(),
        problems.join("\n  ")
    );
}
