//! Differential tests of identity policy (issue 3): what the kernel allows and denies must equal the reference
//! evaluator (`mesh_agent::policy::eval::evaluate_with_root`) for every combination, for randomly generated
//! policy sets; and policy changes under traffic are never a mix of the old and the new set.
//!
//! Universe: two nodes, five pods over three namespaces and three service accounts, each serving TCP and UDP on
//! four ports (8080-8082, and 9090, which no generated policy names, so it takes the "any other port" verdict;
//! policies also name 7000, which nobody serves), plus `x1`, a netns that is no known pod (outside the mesh):
//!
//! | pod | node | namespace | service account | labels |
//! |---|---|---|---|---|
//! | a1 | node-a | alpha | front | app=front, tier=web |
//! | a2 | node-a | beta | back | app=back, tier=web |
//! | a3 | node-a | alpha | back | app=back, tier=data |
//! | b1 | node-b | beta | front | app=front, tier=data |
//! | b2 | node-b | gamma | db | app=db, tier=data |
//! | x1 | node-a | (none) | (none) | |
//!
//! Every round probes every (source, destination, port, protocol) from each source in its cgroup (client side:
//! denied means `EACCES`) and outside it (server side: denied means a timeout), alternating IPv4 and IPv6 rounds,
//! plus each known pod's own Service VIP (ports 80-82 and 1090 to target ports 8080-8082 and 9090; client side only, since only
//! the source's connect hook translates a VIP).
//!
//! `SINEW_POLICY_DIFF_ROUNDS` sets the number of random sets (default [`DEFAULT_ROUNDS`]), `SINEW_POLICY_DIFF_SEED`
//! the seed (default: from the clock; always printed). `SINEW_POLICY_DIFF_TOLERATE=udp-reply` is a diagnostic aid
//! for hunting further bugs while a known one is open: it does not fail on mismatches whose only explanation is
//! that a UDP server's reply was judged as a new connection to the client (they are still printed and counted).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sinew_tests::manifest::{EndpointSlice, Service, ServicePort, authorization_policy as ap};
use sinew_tests::policy::{
    ClientPath, FixtureOptions, Matrix, Mismatch, POLICY_FILE, PodSpec, PolicyFixture, Proto,
    ROOT_NAMESPACE, Rng, Vip, Workload, expected, istio_principal, parse_policies, policies_yaml,
    policy_key, spiffe,
};
use sinew_tests::testpod::{PROBE_OK, ProbeLoopReport};
use sinew_tests::{require_privileged, testpod_bin};

/// Rounds when `SINEW_POLICY_DIFF_ROUNDS` is not set: a round (write, in force on both nodes, 480 probes) takes
/// about 0.85 s on a 2-core VM, so 150 rounds take a bit over 2 minutes, well inside the 4-minute CI budget.
const DEFAULT_ROUNDS: usize = 150;
/// Every pod serves these. 9090 is never named by a generated policy, so it is judged as "any other port".
const PORTS: [u16; 4] = [8080, 8081, 8082, 9090];
/// The ports generated policies name: 7000 is served by nobody (named but never reached).
const NAMED_PORTS: [u16; 4] = [8080, 8081, 8082, 7000];
const NAMESPACES: [&str; 3] = ["alpha", "beta", "gamma"];
const SERVICE_ACCOUNTS: [&str; 3] = ["front", "back", "db"];
const APPS: [&str; 3] = ["front", "back", "db"];
const TIERS: [&str; 2] = ["web", "data"];
/// Mismatches printed in full (all are counted).
const MAX_PRINTED: usize = 40;

fn universe() -> Vec<(&'static str, Vec<PodSpec>)> {
    vec![
        (
            "node-a",
            vec![
                PodSpec::new("a1", "alpha", "front", &[("app", "front"), ("tier", "web")]),
                PodSpec::new("a2", "beta", "back", &[("app", "back"), ("tier", "web")]),
                PodSpec::new("a3", "alpha", "back", &[("app", "back"), ("tier", "data")]),
                PodSpec::stranger("x1"),
            ],
        ),
        (
            "node-b",
            vec![
                PodSpec::new("b1", "beta", "front", &[("app", "front"), ("tier", "data")]),
                PodSpec::new("b2", "gamma", "db", &[("app", "db"), ("tier", "data")]),
            ],
        ),
    ]
}

fn env_u64(key: &str) -> Option<u64> {
    std::env::var(key).ok().and_then(|v| v.trim().parse().ok())
}

/// The ClusterIP of the `i`th known pod's Service.
fn vip_of(i: usize) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::new(10, 96, 1, 10 + i as u8)
}

/// One selector-less Service per known pod, in the pod's namespace, with that pod as its only endpoint: ports
/// 80, 81, 82 (TCP and UDP) to target ports 8080, 8081, 8082. The `i`th known pod's VIP is [`vip_of`]`(i)`.
fn services(known: &[&Workload]) -> Vec<Value> {
    let mut objects = Vec::new();
    for (i, w) in known.iter().enumerate() {
        let name = format!("svc-{}", w.name());
        let mut svc = Service::new(&name, &vip_of(i).to_string());
        svc.namespace = w.namespace().to_string();
        let mut es = EndpointSlice::new(&name, "manual").endpoint(IpAddr::V4(w.pod.ip4), true);
        es.namespace = w.namespace().to_string();
        for port in PORTS {
            let sp = u32::from(port - 8000);
            svc = svc
                .port(ServicePort::tcp(&format!("t{port}"), sp, port.into()))
                .port(ServicePort::udp(&format!("u{port}"), sp, port.into()));
            es = es.port(&format!("t{port}"), port.into(), "TCP").port(
                &format!("u{port}"),
                port.into(),
                "UDP",
            );
        }
        objects.push(svc.to_value());
        objects.push(es.to_value());
    }
    objects
}

/// A random policy set over the universe.
struct Generator<'a> {
    rng: Rng,
    workloads: &'a [Workload],
}

impl Generator<'_> {
    fn principal(&mut self) -> String {
        let r = &mut self.rng;
        match r.below(12) {
            0 => "*".into(),
            // Prefix and suffix wildcards, in both forms.
            1 => format!("spiffe://cluster.local/ns/{}/*", r.pick(&NAMESPACES)),
            2 => format!("cluster.local/ns/{}/sa/*", r.pick(&NAMESPACES)),
            3 => format!("*/sa/{}", r.pick(&SERVICE_ACCOUNTS)),
            // Another trust domain never matches.
            4 => format!(
                "spiffe://other.domain/ns/{}/sa/{}",
                r.pick(&NAMESPACES),
                r.pick(&SERVICE_ACCOUNTS)
            ),
            5..=8 => {
                let (ns, sa) = (*r.pick(&NAMESPACES), *r.pick(&SERVICE_ACCOUNTS));
                spiffe(ns, sa)
            }
            _ => {
                let (ns, sa) = (*r.pick(&NAMESPACES), *r.pick(&SERVICE_ACCOUNTS));
                istio_principal(ns, sa)
            }
        }
    }

    fn namespace(&mut self) -> String {
        let r = &mut self.rng;
        match r.below(8) {
            0 => "*".into(),
            1 => "al*".into(),
            2 => "*ta".into(),
            3 => ROOT_NAMESPACE.into(),
            _ => r.pick(&NAMESPACES).to_string(),
        }
    }

    fn ip_block(&mut self) -> String {
        let r = &mut self.rng;
        let w = r.pick(self.workloads);
        match r.below(16) {
            0 => "10.244.0.0/24".into(),
            1 => "10.244.1.0/24".into(),
            2 => "10.244.0.0/16".into(),
            3 => "fd00:244:0::/64".into(),
            4 => "fd00:244:1::/64".into(),
            5 => "fd00:244::/32".into(),
            // Whole families: each matches only its own family's sources. (IPv4 written as v4-mapped IPv6,
            // `::ffff:a.b.c.d/n`, is not generated: the file source rejects it and asks for the IPv4 form.)
            6 | 7 => r.pick(&["0.0.0.0/0", "::/0"]).to_string(),
            8..=11 => format!("{}/128", w.pod.ip6.expect("ipv6 universe")),
            _ => format!("{}/32", w.pod.ip4),
        }
    }

    fn list(&mut self, max: usize, mut f: impl FnMut(&mut Self) -> String) -> Value {
        let n = 1 + self.rng.below(max);
        let mut v: Vec<String> = (0..n).map(|_| f(self)).collect();
        v.dedup();
        json!(v)
    }

    fn source(&mut self) -> Value {
        const FIELDS: [&str; 6] = [
            "principals",
            "notPrincipals",
            "namespaces",
            "notNamespaces",
            "ipBlocks",
            "notIpBlocks",
        ];
        let fields = self.rng.subset(&FIELDS, 2);
        let mut s = serde_json::Map::new();
        for f in fields {
            let v = match f {
                "principals" | "notPrincipals" => self.list(2, |g| g.principal()),
                "namespaces" | "notNamespaces" => self.list(2, |g| g.namespace()),
                _ => self.list(2, |g| g.ip_block()),
            };
            s.insert(f.to_string(), v);
        }
        json!({"source": s})
    }

    fn ports(&mut self) -> Value {
        let ports = self.rng.subset(&NAMED_PORTS, 2);
        // Istio writes ports as strings; integers are accepted too.
        if self.rng.chance(30) {
            json!(ports)
        } else {
            json!(ports.iter().map(u16::to_string).collect::<Vec<_>>())
        }
    }

    fn operation(&mut self) -> Value {
        let mut o = serde_json::Map::new();
        match self.rng.below(10) {
            0..=4 => {
                o.insert("ports".into(), self.ports());
            }
            5..=7 => {
                o.insert("notPorts".into(), self.ports());
            }
            8 => {
                o.insert("ports".into(), self.ports());
                o.insert("notPorts".into(), self.ports());
            }
            _ => {}
        }
        // L7 fields: an ALLOW rule with them matches nothing, a DENY rule is enforced on its L4 part.
        if self.rng.chance(12) || o.is_empty() {
            let (k, v) = *self.rng.pick(&[
                ("methods", "GET"),
                ("paths", "/admin"),
                ("hosts", "example.com"),
                ("notMethods", "POST"),
            ]);
            o.insert(k.into(), json!([v]));
        }
        json!({"operation": o})
    }

    fn rule(&mut self) -> Value {
        let mut r = serde_json::Map::new();
        if self.rng.chance(70) {
            let n = 1 + self.rng.below(2);
            r.insert(
                "from".into(),
                json!((0..n).map(|_| self.source()).collect::<Vec<_>>()),
            );
        }
        if self.rng.chance(50) {
            let n = 1 + self.rng.below(2);
            r.insert(
                "to".into(),
                json!((0..n).map(|_| self.operation()).collect::<Vec<_>>()),
            );
        }
        Value::Object(r)
    }

    fn selector(&mut self) -> Option<Value> {
        match self.rng.below(10) {
            0..=3 => None,
            4..=6 => Some(json!({"matchLabels": {"app": self.rng.pick(&APPS)}})),
            7 => Some(json!({"matchLabels": {"tier": self.rng.pick(&TIERS)}})),
            8 => Some(
                json!({"matchLabels": {"app": self.rng.pick(&APPS), "tier": self.rng.pick(&TIERS)}}),
            ),
            _ => Some(json!({"matchLabels": {}})),
        }
    }

    fn policy(&mut self, name: &str) -> Value {
        let ns = if self.rng.chance(20) {
            ROOT_NAMESPACE
        } else {
            *self.rng.pick(&NAMESPACES)
        };
        let mut spec = serde_json::Map::new();
        if let Some(sel) = self.selector() {
            spec.insert("selector".into(), sel);
        }
        match self.rng.below(100) {
            // `spec: {}` (with or without a selector): matches nothing, denies everything it selects.
            0..=5 => return ap(ns, name, Value::Object(spec)),
            // `rules: [{}]`: matches everything.
            6..=12 => {
                spec.insert("rules".into(), json!([{}]));
            }
            _ => {
                let n = 1 + self.rng.below(3);
                spec.insert(
                    "rules".into(),
                    json!((0..n).map(|_| self.rule()).collect::<Vec<_>>()),
                );
            }
        }
        let action = match self.rng.below(100) {
            0..=44 => Some("ALLOW"),
            45..=84 => Some("DENY"),
            85..=94 => Some("AUDIT"),
            // Absent: ALLOW.
            _ => None,
        };
        if let Some(a) = action {
            spec.insert("action".into(), json!(a));
        }
        ap(ns, name, Value::Object(spec))
    }

    fn set(&mut self, round: usize) -> Vec<Value> {
        let n = 1 + self.rng.below(4);
        (0..n)
            .map(|i| self.policy(&format!("r{round}-p{i}")))
            .collect()
    }
}

/// `/debug/policies` must say what the reference says: which workloads each policy selects, and each rule's
/// status (kernel-enforced, proxy-required, rejected).
fn check_status(
    status: &sinew_tests::PolicyStatus,
    policies: &[mesh_agent::policy::AuthorizationPolicy],
    known: &[&Workload],
) -> Vec<String> {
    use mesh_agent::policy::eval::{Request, RuleStatus, applies_to, statuses};
    let mut problems = Vec::new();
    for p in policies {
        let Some(entry) = status.policy(&p.key()) else {
            problems.push(format!("{} is not in /debug/policies", p.key()));
            continue;
        };
        let want: BTreeSet<String> = known
            .iter()
            .filter(|w| {
                let req = Request {
                    source: None,
                    source_ip: IpAddr::V4(w.pod.ip4),
                    dest_namespace: w.namespace().to_string(),
                    dest_labels: w.labels.clone(),
                    dest_port: 8080,
                    protocol: mesh_agent::policy::eval::Protocol::Tcp,
                };
                applies_to(p, &req, ROOT_NAMESPACE)
            })
            .map(|w| w.key())
            .collect();
        let got: BTreeSet<String> = entry.selects.iter().cloned().collect();
        if got != want {
            problems.push(format!("{}: selects {got:?}, reference {want:?}", p.key()));
        }
        let want_rules: Vec<&str> = statuses(p)
            .iter()
            .map(|s| match s {
                RuleStatus::KernelEnforced => "kernel-enforced",
                RuleStatus::ProxyRequired { .. } => "proxy-required",
                RuleStatus::Rejected { .. } => "rejected",
            })
            .collect();
        let got_rules: Vec<&str> = entry.rules.iter().map(|r| r.status.as_str()).collect();
        if got_rules != want_rules {
            problems.push(format!(
                "{}: rule statuses {got_rules:?}, reference {want_rules:?}",
                p.key()
            ));
        }
    }
    problems
}

/// Whether a mismatch is explained by the known UDP-reply bug: a UDP probe that should have worked timed out, and
/// the server's reply (from its target port to the client's ephemeral port) would be denied if judged as a new
/// connection from the server to the client.
fn explained_by_udp_reply_bug(
    m: &Mismatch,
    policies: &[mesh_agent::policy::AuthorizationPolicy],
    f: &PolicyFixture,
) -> bool {
    let o = &m.observed;
    if o.proto != Proto::Udp || m.expected_outcome != PROBE_OK || o.outcome != "timeout" {
        return false;
    }
    let (src, dst) = (f.w(&o.src), f.w(&o.dst));
    if src.service_account.is_none() {
        return false;
    }
    // An ephemeral port no generated policy names.
    !expected(policies, dst, src, 40000, Proto::Udp).allowed
}

#[test]
fn kernel_verdicts_equal_the_reference_for_random_policy_sets() {
    if !require_privileged("kernel_verdicts_equal_the_reference_for_random_policy_sets") {
        return;
    }
    let rounds = env_u64("SINEW_POLICY_DIFF_ROUNDS").map_or(DEFAULT_ROUNDS, |n| n as usize);
    let seed = env_u64("SINEW_POLICY_DIFF_SEED").unwrap_or_else(sinew_tests::unix_ms);
    let tolerate_udp_reply = std::env::var("SINEW_POLICY_DIFF_TOLERATE")
        .is_ok_and(|v| v.split(',').any(|x| x.trim() == "udp-reply"));
    eprintln!(
        "policy differential test: seed {seed}, {rounds} rounds (reproduce with SINEW_POLICY_DIFF_SEED={seed} \
         SINEW_POLICY_DIFF_ROUNDS={rounds})"
    );
    let f = PolicyFixture::setup_with(
        "pol-diff",
        testpod_bin!(),
        &universe(),
        &PORTS,
        &[],
        &FixtureOptions {
            ipv6: true,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("setup: {e:#}"));
    let started = Instant::now();
    let mut generator = Generator {
        rng: Rng::new(seed),
        workloads: &f.workloads,
    };
    let known: Vec<&Workload> = f
        .workloads
        .iter()
        .filter(|w| w.service_account.is_some())
        .collect();
    let mut matrix = Matrix {
        sources: f
            .workloads
            .iter()
            .map(|w| {
                let paths = if w.service_account.is_some() {
                    ClientPath::BOTH.to_vec()
                } else {
                    vec![ClientPath::Server]
                };
                (w, paths)
            })
            .collect(),
        destinations: known.clone(),
        ports: PORTS.to_vec(),
        protos: Proto::BOTH.to_vec(),
        timeout_ms: 400,
        ipv6: false,
        vips: known
            .iter()
            .enumerate()
            .map(|(i, w)| Vip {
                dst: w.name().to_string(),
                ip: IpAddr::V4(vip_of(i)),
                ports: PORTS.iter().map(|&p| (p - 8000, p)).collect(),
            })
            .collect(),
    };
    f.source
        .write("services.yaml", &services(&known))
        .expect("write services");
    for a in &f.agents {
        sinew_tests::eventually(Duration::from_secs(10), Duration::from_millis(50), || {
            let d = a.cli().dump_services().map_err(|e| format!("{e:#}"))?;
            let ready = d.iter().filter(|s| s.count == 1).count();
            if ready == known.len() * PORTS.len() * 2 {
                Ok(())
            } else {
                Err(format!("{ready} service ports with their backend: {d:?}"))
            }
        })
        .unwrap_or_else(|e| panic!("services not in the maps: {e}"));
    }
    let mut failing_rounds = Vec::new();
    let mut total_probes = 0usize;
    let mut total_mismatches = 0usize;
    let mut tolerated = 0usize;
    let mut printed = 0usize;
    for round in 0..rounds {
        let t0 = Instant::now();
        // Every tenth round first races 8 other sets into the source, 15 ms apart: whatever the agent compiled in
        // between, the last set written must be what ends up in force.
        if round % 10 == 9 {
            for j in 0..8 {
                let burst: Vec<Value> = generator
                    .set(round)
                    .into_iter()
                    .map(|mut p| {
                        let name = p["metadata"]["name"].as_str().unwrap_or("").to_string();
                        p["metadata"]["name"] = json!(format!("{name}-burst{j}"));
                        p
                    })
                    .collect();
                f.source.write(POLICY_FILE, &burst).expect("write burst");
                std::thread::sleep(Duration::from_millis(15));
            }
        }
        let set = generator.set(round);
        let parsed = parse_policies(&set)
            .unwrap_or_else(|e| panic!("generated an unreadable policy: {e:#}"));
        let status = f.set_policies(&set).unwrap_or_else(|e| {
            panic!(
                "seed {seed} round {round}: policies not in force: {e:#}\n{}",
                policies_yaml(&set)
            )
        });
        let status_problems = check_status(&status, &parsed, &known);
        let in_force = t0.elapsed();
        // Odd rounds over IPv6 (connect6/sendmsg6, IPv6 ingress, IPv6 ipBlocks).
        matrix.ipv6 = round % 2 == 1;
        let obs = matrix
            .run()
            .unwrap_or_else(|e| panic!("seed {seed} round {round}: probing failed: {e:#}"));
        total_probes += obs.len();
        let mismatches = matrix.check(&parsed, &obs);
        let (known_bug, other): (Vec<&Mismatch>, Vec<&Mismatch>) = mismatches
            .iter()
            .partition(|m| explained_by_udp_reply_bug(m, &parsed, &f));
        let allowed = obs.iter().filter(|o| o.outcome == PROBE_OK).count();
        eprintln!(
            "round {round} ({}): {} policies, {} probes ({allowed} allowed), {} mismatches ({} UDP-reply), in force \
             after {in_force:?}, round {:?}",
            if matrix.ipv6 { "IPv6" } else { "IPv4" },
            set.len(),
            obs.len(),
            mismatches.len(),
            known_bug.len(),
            t0.elapsed()
        );
        total_mismatches += mismatches.len() + status_problems.len();
        if !status_problems.is_empty() {
            failing_rounds.push(round);
            eprintln!(
                "\n===== STATUS MISMATCH seed {seed} round {round} =====\npolicies:\n{}\n  {}\n",
                policies_yaml(&set),
                status_problems.join("\n  ")
            );
        }
        if !mismatches.is_empty() {
            let counted_as_failure = if tolerate_udp_reply {
                tolerated += known_bug.len();
                !other.is_empty()
            } else {
                true
            };
            if counted_as_failure {
                failing_rounds.push(round);
            }
            if printed < MAX_PRINTED {
                let mut text = format!(
                    "\n===== MISMATCH seed {seed} round {round} ({} mismatches) =====\npolicies:\n{}\n",
                    mismatches.len(),
                    policies_yaml(&set)
                );
                for m in other.iter().chain(known_bug.iter()) {
                    if printed >= MAX_PRINTED {
                        text.push_str("  ... (more not printed)\n");
                        break;
                    }
                    let tag = if known_bug.iter().any(|k| std::ptr::eq(*k, *m)) {
                        "[udp-reply] "
                    } else {
                        ""
                    };
                    text.push_str(&format!("  {tag}{m}\n"));
                    printed += 1;
                }
                eprintln!("{text}");
            }
        }
    }
    eprintln!(
        "policy differential test: seed {seed}, {rounds} rounds, {total_probes} probes, {total_mismatches} \
         mismatches ({tolerated} tolerated), {:?}",
        started.elapsed()
    );
    assert!(
        failing_rounds.is_empty(),
        "kernel and reference disagree in rounds {failing_rounds:?} (seed {seed}; see the MISMATCH blocks above; \
         reproduce with SINEW_POLICY_DIFF_SEED={seed} SINEW_POLICY_DIFF_ROUNDS={rounds})"
    );
}

/// The flip test's two sets, named uniquely per flip. Pairs (from `a1`): `a3:8080` allowed by both, `a3:8081`
/// denied by both, `b1:8080` allowed by A only, `b1:8081` allowed by B only. A and B reach the same verdicts by
/// different mechanisms (DENY vs. an ALLOW's default deny), so the classes and entries differ between them.
fn flip_set(b: bool, k: usize) -> Vec<Value> {
    let from_a1 = json!([{"source": {"principals": [spiffe("alpha", "front")]}}]);
    let sel = |app: &str, tier: &str| json!({"matchLabels": {"app": app, "tier": tier}});
    if !b {
        vec![
            ap(
                "alpha",
                &format!("flip{k}-a-deny-a3"),
                json!({"selector": sel("back", "data"), "action": "DENY",
                       "rules": [{"from": from_a1, "to": [{"operation": {"ports": ["8081"]}}]}]}),
            ),
            ap(
                "beta",
                &format!("flip{k}-a-allow-b1"),
                json!({"selector": sel("front", "data"), "action": "ALLOW",
                       "rules": [{"from": from_a1, "to": [{"operation": {"ports": ["8080"]}}]}]}),
            ),
        ]
    } else {
        vec![
            ap(
                "alpha",
                &format!("flip{k}-b-allow-a3"),
                json!({"selector": sel("back", "data"), "action": "ALLOW",
                       "rules": [{"to": [{"operation": {"notPorts": ["8081"]}}]}]}),
            ),
            ap(
                ROOT_NAMESPACE,
                &format!("flip{k}-b-deny-b1"),
                json!({"selector": sel("front", "data"), "action": "DENY",
                       "rules": [{"from": [{"source": {"namespaces": ["alpha"]}}], "to": [{"operation": {"notPorts": ["8081"]}}]}]}),
            ),
        ]
    }
}

#[test]
fn policy_flips_under_traffic_are_never_a_mix_and_apply_within_a_second() {
    if !require_privileged("policy_flips_under_traffic_are_never_a_mix_and_apply_within_a_second") {
        return;
    }
    const FLIPS: usize = 12;
    /// How long each set stays after it is in force on both nodes.
    const HOLD: Duration = Duration::from_millis(1600);
    const FOLLOW: u64 = 1000;
    let f = PolicyFixture::setup("pol-flip", testpod_bin!(), &universe(), &PORTS, &[])
        .unwrap_or_else(|e| panic!("setup: {e:#}"));
    let client = f.w("a1");
    let pairs: [(&str, u16); 4] = [("a3", 8080), ("a3", 8081), ("b1", 8080), ("b1", 8081)];
    let mut targets = Vec::new();
    let mut keys = Vec::new();
    for (dst, port) in pairs {
        for proto in Proto::BOTH {
            targets.push(proto.target(IpAddr::V4(f.w(dst).pod.ip4), port));
            keys.push((dst, port, proto));
        }
    }
    // Each pair's verdict under A and under B, from the reference; the test's design must hold.
    let verdicts: Vec<[bool; 2]> = keys
        .iter()
        .map(|(dst, port, proto)| {
            [false, true].map(|b| {
                let set = parse_policies(&flip_set(b, 0)).expect("parse");
                expected(&set, client, f.w(dst), *port, *proto).allowed
            })
        })
        .collect();
    for (k, v) in keys.iter().zip(&verdicts) {
        let want = match (k.0, k.1) {
            ("a3", 8080) => [true, true],
            ("a3", 8081) => [false, false],
            ("b1", 8080) => [true, false],
            _ => [false, true],
        };
        assert_eq!(
            *v, want,
            "flip sets do not mean what the test needs for {k:?}"
        );
    }

    let stop = f.topo.work_dir().join("stop-probe-loop");
    let duration_ms = (FLIPS as u64) * 6_000 + 20_000;
    let mut loops: Vec<(ClientPath, sinew_tests::Proc)> = ClientPath::BOTH
        .iter()
        .map(|&path| {
            let p = client
                .pod
                .spawn_probe_loop(
                    &targets,
                    300,
                    5,
                    duration_ms,
                    &stop,
                    path == ClientPath::Client,
                )
                .expect("probe loop");
            (path, p)
        })
        .collect();

    // (set is B, written at, in force on both nodes at), per flip.
    let mut phases: Vec<(bool, u64, u64)> = Vec::new();
    for k in 0..FLIPS {
        let b = k % 2 == 1;
        let set = flip_set(b, k);
        let written = sinew_tests::unix_ms();
        f.source.write(POLICY_FILE, &set).expect("write");
        let keys: BTreeSet<String> = set.iter().map(policy_key).collect();
        f.wait_in_force(&keys, &[])
            .unwrap_or_else(|e| panic!("flip {k}: {e:#}"));
        let in_force = sinew_tests::unix_ms();
        phases.push((b, written, in_force));
        std::thread::sleep(HOLD);
    }
    let ended = sinew_tests::unix_ms();
    std::fs::write(&stop, b"stop").expect("stop file");
    let mut reports: BTreeMap<ClientPath, ProbeLoopReport> = BTreeMap::new();
    for (path, p) in loops.drain(..) {
        let out = p.wait(Duration::from_secs(30)).expect("probe loop ends");
        reports.insert(path, out.json().expect("probe-loop report"));
    }

    let mut problems = Vec::new();
    for (path, report) in &reports {
        let mut checked_follow = 0usize;
        for round in &report.rounds {
            let t = round.start_unix_ms;
            if t < phases[0].2 || t >= ended {
                continue;
            }
            // The phase whose write came last before this round started.
            let i = phases
                .iter()
                .rposition(|p| p.1 <= t)
                .expect("after the first write");
            let (b, _, in_force) = phases[i];
            // A round that starts right before the next write may straddle it: only the "both" rules apply.
            let phase_end = phases.get(i + 1).map_or(ended, |p| p.1);
            let settled = t >= in_force + FOLLOW && t + 50 < phase_end;
            for ((key, v), outcome) in keys.iter().zip(&verdicts).zip(&round.outcomes) {
                let ok = outcome == PROBE_OK;
                let denied_ok = outcome == path.denied_outcome();
                let what = format!(
                    "{path}: a1 -> {}:{} {} at +{} ms into flip {i} (set {}), outcome {outcome}",
                    key.0,
                    key.1,
                    key.2.as_str(),
                    t.saturating_sub(phases[i].1),
                    if b { "B" } else { "A" }
                );
                match v {
                    [true, true] if !ok => {
                        problems.push(format!("allowed by both sets but failed: {what}"))
                    }
                    [false, false] if !denied_ok => {
                        problems.push(format!("denied by both sets but not denied: {what}"))
                    }
                    _ => {}
                }
                if v[0] != v[1] && settled {
                    checked_follow += 1;
                    let want_allowed = v[usize::from(b)];
                    if (want_allowed && !ok) || (!want_allowed && !denied_ok) {
                        problems.push(format!(
                            "does not follow the set in force for {} ms: {what}",
                            t - in_force
                        ));
                    }
                }
            }
        }
        eprintln!(
            "{path}: {} rounds of {} probes, {checked_follow} checked against the set in force",
            report.rounds.len(),
            report.targets.len()
        );
        assert!(
            checked_follow >= FLIPS * 4,
            "{path}: too few probes after the follow window to mean anything ({checked_follow})"
        );
    }
    let shown: Vec<&String> = problems.iter().take(60).collect();
    assert!(
        problems.is_empty(),
        "{} problem(s) during {FLIPS} flips (first 60):\n  {}\nphases (set B?, written, in force; unix ms): \
         {phases:?}",
        problems.len(),
        shown
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n  ")
    );
}
