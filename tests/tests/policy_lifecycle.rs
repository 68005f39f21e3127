//! Policy across agent crashes and restarts: enforcement lives in the kernel and never depends on the agent
//! process. With the agent killed (`kill -9`) the last policy set stays enforced on both paths; a change made while
//! it is down is in force after it restarts; and the restart itself never opens a window where a denied pair gets
//! through (the new agent swaps programs in place and switches policy epochs once).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::json;
use sinew_tests::manifest::authorization_policy as ap;
use sinew_tests::policy::{POLICY_FILE, PodSpec, PolicyFixture, policy_key, spiffe, want};
use sinew_tests::{require_privileged, testpod_bin};

/// Kernel outcomes only (the agent may be down, so no `policy check`): each (source, destination, allowed) over TCP
/// 8080, from the source under its cgroup (client side: EACCES when denied) and outside it (server side: timeout).
fn kernel_verdicts(f: &PolicyFixture, what: &str, wants: &[(&str, &str, bool)]) {
    let mut problems = Vec::new();
    for (src, dst, allow) in wants {
        let pod = &f.w(src).pod;
        let target = format!("tcp:{}:8080", f.w(dst).pod.ip4);
        for (path, managed, denied) in [
            ("client side", true, "EACCES"),
            ("server side", false, "timeout"),
        ] {
            let r = if managed {
                pod.probe(std::slice::from_ref(&target), 400)
            } else {
                pod.probe_unmanaged(std::slice::from_ref(&target), 400)
            }
            .expect("probe");
            let got = r.results[0].outcome.clone();
            let want = if *allow { "ok" } else { denied };
            if got != want {
                problems.push(format!("{src} -> {dst} {path}: expected {want}, got {got}"));
            }
        }
    }
    assert!(problems.is_empty(), "{what}: {problems:#?}");
}

fn pods() -> Vec<PodSpec> {
    vec![
        PodSpec::new("web", "prod", "web", &[("app", "web")]),
        PodSpec::new("api", "prod", "api", &[("app", "api")]),
        PodSpec::new("cli", "dev", "cli", &[("app", "cli")]),
        // Denied by both policy sets: the pair that keeps trying during the restart.
        PodSpec::new("bad", "dev", "bad", &[("app", "bad")]),
    ]
}

#[test]
fn policy_stays_enforced_through_kill_and_restart() {
    if !require_privileged("policy_stays_enforced_through_kill_and_restart") {
        return;
    }
    let mut f = PolicyFixture::setup(
        "pol-life",
        testpod_bin!(),
        &[("node-a", pods())],
        &[8080],
        &[],
    )
    .unwrap_or_else(|e| panic!("setup failed: {e:#}"));
    let only_cli = [ap(
        "prod",
        "web-from-cli",
        json!({"selector": {"matchLabels": {"app": "web"}},
               "rules": [{"from": [{"source": {"principals": [spiffe("dev", "cli")]}}]}]}),
    )];
    f.set_policies(&only_cli).expect("policy in force");
    let before = [
        ("cli", "web", true),
        ("api", "web", false),
        ("cli", "api", true),
    ];
    let wants: Vec<_> = before
        .iter()
        .map(|(s, d, a)| want(s, d, 8080, *a))
        .collect();
    f.assert_wants("before the crash", &only_cli, &wants);

    // The agent dies: nothing changes in the kernel.
    f.agents[0].kill9().expect("kill -9");
    kernel_verdicts(&f, "agent down", &before);

    // A change written while it is down...
    let only_api = [ap(
        "prod",
        "web-from-api",
        json!({"selector": {"matchLabels": {"app": "web"}},
               "rules": [{"from": [{"source": {"principals": [spiffe("prod", "api")]}}]}]}),
    )];
    f.source
        .write(POLICY_FILE, &only_api)
        .expect("write policies");
    // ...is not in force yet (no agent), so the old verdicts still hold.
    kernel_verdicts(&f, "changed while down", &before);

    // Restart while a denied pair keeps trying: it must never get through, not even during the restart.
    // `bad` -> web: denied before and after. (api -> web flips to allowed, so it could pass as soon as the new
    // agent's pre-attach sync has run, before its status answers: that would prove nothing.)
    let bad = f.w("bad").pod.clone();
    let web_ip = f.w("web").pod.ip4;
    f.agents[0].restart().expect("restart");
    let t0 = Instant::now();
    let mut probes = 0;
    let mut leaks = Vec::new();
    // Until the new set is in force, cli -> web is allowed and api -> web denied (old set); the new set flips both.
    let keys: BTreeSet<String> = only_api.iter().map(policy_key).collect();
    loop {
        let status = f.agents[0].policy_status().ok();
        let in_force = status.is_some_and(|s| {
            s.policies
                .iter()
                .map(|p| format!("{}/{}", p.namespace, p.name))
                .collect::<BTreeSet<_>>()
                == keys
        });
        if in_force || t0.elapsed() > Duration::from_secs(15) {
            break;
        }
        // An unmanaged probe from bad's netns is judged by web's ingress only (the server side).
        let r = bad
            .probe_unmanaged(&[format!("tcp:{web_ip}:8080")], 300)
            .expect("probe");
        probes += 1;
        if r.results.iter().any(|x| x.outcome == "ok") {
            leaks.push(format!("{:?} after {:?}", r.results, t0.elapsed()));
        }
    }
    f.agents[0]
        .wait_ready(Duration::from_secs(20))
        .expect("ready after restart");
    f.wait_in_force(&keys, &[])
        .expect("the change made while down is in force");
    assert!(
        leaks.is_empty(),
        "a connection the old and the new policy both deny got through during the restart ({probes} probes): {leaks:?}"
    );
    let after = vec![
        want("api", "web", 8080, true),
        want("cli", "web", 8080, false),
        want("cli", "api", 8080, true),
    ];
    f.assert_wants("after restart", &only_api, &after);
}
