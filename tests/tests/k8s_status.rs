//! The policy status writer (`mesh_agent::policy::status`) against the in-process fake API server, at the HTTP
//! boundary: one of several agents is elected through the Lease and writes each policy's status once, hands over
//! when it stops or dies, skips unchanged statuses, and survives RBAC denials.
//!
//! No privileges needed: everything runs in-process over loopback.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::chrono::Utc;
use mesh_agent::policy::status::{
    CONDITION_ACCEPTED, CONDITION_ENFORCED, LeaseSettings, StatusStats, StatusWriter,
    desired_status,
};
use mesh_agent::policy::{API_VERSION, AuthorizationPolicy, KIND};
use serde_json::{Value, json};
use sinew_tests::fake_api::FakeApi;
use tokio::sync::watch;
use tokio::task::JoinHandle;

const NS: &str = "shop";
const LEASE_NS: &str = "sinew-system";
const LEASE_API: &str = "coordination.k8s.io/v1";
/// Short lease for the tests: 2 s, renewed (and statuses checked) every 300 ms.
const DURATION: Duration = Duration::from_secs(2);
const RENEW: Duration = Duration::from_millis(300);
/// The names every live source below looks up (missing ones are left out).
const NAMES: [&str; 4] = ["db", "web", "bad", "late"];

/// One agent's status writer, running as a task.
struct Agent {
    holder: &'static str,
    stats: Arc<StatusStats>,
    stop: watch::Sender<bool>,
    changed: watch::Sender<u64>,
    task: JoinHandle<()>,
}

impl Agent {
    fn start(
        api: &FakeApi,
        holder: &'static str,
        (duration, renew_every): (Duration, Duration),
        policies: impl Fn() -> Vec<AuthorizationPolicy> + Send + 'static,
    ) -> Agent {
        let client = kube::Client::try_from(kube::Config::new(api.url().parse().unwrap()))
            .expect("kube client");
        let mut settings = LeaseSettings::new(LEASE_NS, holder);
        settings.duration = duration;
        settings.renew_every = renew_every;
        let (changed, changed_rx) = watch::channel(0);
        let writer = StatusWriter::new(client, settings).with_changes(changed_rx);
        let stats = writer.stats();
        let (stop, stop_rx) = watch::channel(false);
        // `tokio::spawn` also proves the writer's future is `Send`.
        let task = tokio::spawn(writer.run(policies, stop_rx));
        Agent {
            holder,
            stats,
            stop,
            changed,
            task,
        }
    }

    fn leader(&self) -> bool {
        self.stats.leader.load(Ordering::Relaxed)
    }

    fn writes(&self) -> u64 {
        self.stats.writes.load(Ordering::Relaxed)
    }

    fn skipped(&self) -> u64 {
        self.stats.skipped.load(Ordering::Relaxed)
    }

    fn errors(&self) -> u64 {
        self.stats.errors.load(Ordering::Relaxed)
    }

    /// Signals stop and waits for the task (which releases the lease).
    async fn stop(self) {
        self.stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("the writer did not stop")
            .expect("the writer panicked");
    }
}

/// Runs a test body with an overall bound.
async fn bounded(body: impl Future<Output = ()>) {
    tokio::time::timeout(Duration::from_secs(60), body)
        .await
        .expect("the test took too long");
}

/// Polls `f` every 20 ms until it returns `Some`, for at most `bound`.
async fn until<T>(what: &str, bound: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < bound, "{what}: not after {bound:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `agent` has checked every one of `n` up-to-date policies at least twice more (two full passes).
async fn two_more_passes(agent: &Agent, n: u64) {
    let target = agent.skipped() + 2 * n;
    until("two more status passes", Duration::from_secs(10), || {
        (agent.skipped() >= target).then_some(())
    })
    .await;
}

fn policy_json(name: &str, rules: Value) -> Value {
    json!({
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"namespace": NS, "name": name},
        "spec": {"selector": {"matchLabels": {"app": name}}, "rules": rules},
    })
}

/// Three policies: all L4 (`db`), one rule needing the proxy (`web`), an invalid CIDR (`bad`).
fn apply_policies(api: &FakeApi) {
    api.apply(policy_json(
        "db",
        json!([{
            "from": [{"source": {"principals": ["cluster.local/ns/shop/sa/api"]}}],
            "to": [{"operation": {"ports": ["5432"]}}],
        }]),
    ));
    api.apply(policy_json(
        "web",
        json!([
            {"from": [{"source": {"namespaces": ["shop"]}}]},
            {"to": [{"operation": {"methods": ["GET"]}}]},
        ]),
    ));
    api.apply(policy_json(
        "bad",
        json!([{"from": [{"source": {"ipBlocks": ["10.0.0.0/33"]}}]}]),
    ));
}

fn stored(api: &FakeApi, name: &str) -> Option<AuthorizationPolicy> {
    api.get(API_VERSION, KIND, Some(NS), name)
        .map(|v| serde_json::from_value(v).expect("a stored AuthorizationPolicy"))
}

/// The policies as the kubernetes source would see them: the current objects.
fn live(api: &Arc<FakeApi>) -> impl Fn() -> Vec<AuthorizationPolicy> + Send + 'static {
    let api = api.clone();
    move || NAMES.iter().filter_map(|n| stored(&api, n)).collect()
}

/// A source that returns a snapshot the test controls (a watch that has not delivered yet).
fn snapshot(
    objects: &Arc<Mutex<Vec<AuthorizationPolicy>>>,
) -> impl Fn() -> Vec<AuthorizationPolicy> + Send + 'static {
    let objects = objects.clone();
    move || objects.lock().unwrap().clone()
}

/// Whether `name` has a status with conditions for its current generation.
fn has_status(api: &FakeApi, name: &str) -> bool {
    stored(api, name).is_some_and(|p| {
        p.status.as_ref().is_some_and(|s| {
            !s.conditions.is_empty() && s.observed_generation == p.metadata.generation
        })
    })
}

async fn wait_statuses(api: &FakeApi, names: &[&str]) {
    until(
        "every policy has its status",
        Duration::from_secs(10),
        || names.iter().all(|n| has_status(api, n)).then_some(()),
    )
    .await;
}

fn lease_holder(api: &FakeApi) -> Option<String> {
    api.get(LEASE_API, "Lease", Some(LEASE_NS), "sinew-policy-status")
        .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_string))
}

fn lease_transitions(api: &FakeApi) -> i64 {
    api.get(LEASE_API, "Lease", Some(LEASE_NS), "sinew-policy-status")
        .and_then(|l| l["spec"]["leaseTransitions"].as_i64())
        .unwrap_or(-1)
}

fn condition(p: &AuthorizationPolicy, type_: &str) -> (String, String, String) {
    let c = p
        .status
        .as_ref()
        .and_then(|s| s.condition(type_))
        .unwrap_or_else(|| panic!("{}: no {type_} condition", p.key()));
    (c.status.clone(), c.reason.clone(), c.message.clone())
}

fn patches(api: &FakeApi) -> usize {
    api.count("PATCH", "/status")
}

#[tokio::test]
async fn one_of_two_agents_writes_the_statuses_once() {
    bounded(async {
        let api = Arc::new(FakeApi::start().unwrap());
        apply_policies(&api);
        let a = Agent::start(&api, "agent-a", (DURATION, RENEW), live(&api));
        let b = Agent::start(&api, "agent-b", (DURATION, RENEW), live(&api));
        wait_statuses(&api, &["db", "web", "bad"]).await;
        let (leader, follower) = if a.leader() { (&a, &b) } else { (&b, &a) };
        two_more_passes(leader, 3).await;

        // Exactly one leader, which holds the lease and made every write.
        assert!(leader.leader() && !follower.leader());
        assert_eq!(lease_holder(&api).as_deref(), Some(leader.holder));
        assert_eq!((leader.writes(), follower.writes()), (3, 0));
        assert_eq!(follower.skipped(), 0, "the follower never looks at statuses");
        assert_eq!(leader.errors() + follower.errors(), 0);
        assert_eq!(patches(&api), 3);
        let patched: Vec<String> = api
            .requests()
            .into_iter()
            .filter(|r| r.method == "PATCH")
            .map(|r| r.path)
            .collect();
        for name in ["db", "web", "bad"] {
            let path = format!(
                "/apis/security.sinew.dev/v1alpha1/namespaces/shop/authorizationpolicies/{name}/status"
            );
            assert_eq!(patched.iter().filter(|p| **p == path).count(), 1, "{patched:?}");
        }

        // What was written is the desired status (the same, whatever the time, once written).
        for name in ["db", "web", "bad"] {
            let p = stored(&api, name).unwrap();
            assert_eq!(
                p.status.as_ref(),
                Some(&desired_status(&p, Time(Utc::now()))),
                "{name}"
            );
            assert_eq!(p.status.as_ref().unwrap().observed_generation, Some(1));
        }
        let db = stored(&api, "db").unwrap();
        assert_eq!(condition(&db, CONDITION_ACCEPTED).0, "True");
        assert_eq!(condition(&db, CONDITION_ENFORCED).1, "Kernel");
        let web = stored(&api, "web").unwrap();
        let (status, reason, message) = condition(&web, CONDITION_ENFORCED);
        assert_eq!((status.as_str(), reason.as_str()), ("True", "ProxyRequired"));
        assert!(message.starts_with("rule 1 needs the node proxy"), "{message}");
        let bad = stored(&api, "bad").unwrap();
        let (status, reason, message) = condition(&bad, CONDITION_ACCEPTED);
        assert_eq!((status.as_str(), reason.as_str()), ("False", "Invalid"));
        assert!(
            message.contains("spec.rules[0].from[0].source.ipBlocks[0]"),
            "{message}"
        );
        assert_eq!(condition(&bad, CONDITION_ENFORCED).1, "Rejected");

        // Unchanged policies: more passes, no PATCH.
        two_more_passes(leader, 3).await;
        assert_eq!(patches(&api), 3);
        assert_eq!(leader.writes(), 3);

        a.stop().await;
        b.stop().await;
    })
    .await;
}

#[tokio::test]
async fn an_edit_makes_exactly_one_write_and_keeps_transition_times() {
    bounded(async {
        let api = Arc::new(FakeApi::start().unwrap());
        apply_policies(&api);
        let a = Agent::start(&api, "agent-a", (DURATION, RENEW), live(&api));
        wait_statuses(&api, &["db", "web", "bad"]).await;
        two_more_passes(&a, 3).await;
        let before = patches(&api);
        let old = stored(&api, "db").unwrap();
        let accepted_at = old
            .status
            .as_ref()
            .and_then(|s| s.condition(CONDITION_ACCEPTED))
            .unwrap()
            .last_transition_time
            .clone();

        // A new spec (the status kept, as the API server keeps it): generation 2.
        let mut edited = api.get(API_VERSION, KIND, Some(NS), "db").unwrap();
        edited["spec"]["rules"][0]["to"][0]["operation"]["ports"] = json!(["5432", "5433"]);
        api.apply(edited);
        until("the edit's status", Duration::from_secs(5), || {
            let p = stored(&api, "db")?;
            (p.metadata.generation == Some(2) && has_status(&api, "db")).then_some(())
        })
        .await;
        two_more_passes(&a, 3).await;
        assert_eq!(patches(&api), before + 1);
        let new = stored(&api, "db").unwrap();
        let accepted = new
            .status
            .as_ref()
            .and_then(|s| s.condition(CONDITION_ACCEPTED))
            .unwrap();
        assert_eq!(accepted.observed_generation, Some(2));
        // Still True: the transition time is the first one.
        assert_eq!(accepted.last_transition_time, accepted_at);

        // Made invalid: Accepted flips to False, one more write.
        let mut broken = api.get(API_VERSION, KIND, Some(NS), "db").unwrap();
        broken["spec"]["action"] = json!("CUSTOM");
        api.apply(broken);
        until("the invalid edit's status", Duration::from_secs(5), || {
            let p = stored(&api, "db")?;
            (p.metadata.generation == Some(3) && has_status(&api, "db")).then_some(p)
        })
        .await;
        two_more_passes(&a, 3).await;
        assert_eq!(patches(&api), before + 2);
        let p = stored(&api, "db").unwrap();
        let (status, _, message) = condition(&p, CONDITION_ACCEPTED);
        assert_eq!(status, "False");
        assert!(message.contains("spec.action"), "{message}");
        assert_eq!(a.errors(), 0);
        a.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_change_signal_writes_a_new_status_at_once() {
    bounded(async {
        let api = Arc::new(FakeApi::start().unwrap());
        apply_policies(&api);
        // Ticks every 5 s: only the change signal can make the write fast.
        let a = Agent::start(
            &api,
            "agent-a",
            (Duration::from_secs(15), Duration::from_secs(5)),
            live(&api),
        );
        wait_statuses(&api, &["db", "web", "bad"]).await;
        assert!(a.leader());
        api.apply(policy_json(
            "late",
            json!([{"from": [{"source": {"namespaces": ["ops"]}}]}]),
        ));
        let start = Instant::now();
        a.changed.send_modify(|v| *v += 1);
        until("the new policy's status", Duration::from_secs(1), || {
            has_status(&api, "late").then_some(())
        })
        .await;
        eprintln!("status of a new policy written after {:?}", start.elapsed());
        assert_eq!(a.writes(), 4);
        a.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_write_is_not_repeated_before_the_watch_delivers_it() {
    bounded(async {
        let api = Arc::new(FakeApi::start().unwrap());
        apply_policies(&api);
        // The source keeps returning the objects as they were before the writes.
        let objects = Arc::new(Mutex::new(
            ["db", "web", "bad"]
                .iter()
                .map(|n| stored(&api, n).unwrap())
                .collect::<Vec<_>>(),
        ));
        let a = Agent::start(&api, "agent-a", (DURATION, RENEW), snapshot(&objects));
        wait_statuses(&api, &["db", "web", "bad"]).await;
        two_more_passes(&a, 3).await;
        assert_eq!((patches(&api), a.writes()), (3, 3));

        // The watch delivers the written objects: still nothing to write.
        *objects.lock().unwrap() = ["db", "web", "bad"]
            .iter()
            .map(|n| stored(&api, n).unwrap())
            .collect();
        two_more_passes(&a, 3).await;
        assert_eq!((patches(&api), a.writes()), (3, 3));

        // A policy deleted since the source saw it: a 404, not an error.
        assert!(api.delete(API_VERSION, KIND, Some(NS), "bad"));
        let mut gone = objects.lock().unwrap()[2].clone();
        gone.status = None;
        objects.lock().unwrap()[2] = gone;
        until(
            "a PATCH of the deleted policy",
            Duration::from_secs(5),
            || (api.count("PATCH", "/bad/status") >= 2).then_some(()),
        )
        .await;
        assert_eq!(a.errors(), 0);
        assert_eq!(a.writes(), 3);
        assert!(a.leader());
        a.stop().await;
    })
    .await;
}

/// The three policies applied; agent-a elected and their statuses written; agent-b started beside it.
async fn a_leads_b_follows(api: &Arc<FakeApi>) -> (Agent, Agent) {
    apply_policies(api);
    let a = Agent::start(api, "agent-a", (DURATION, RENEW), live(api));
    until("agent-a leads", Duration::from_secs(5), || {
        a.leader().then_some(())
    })
    .await;
    let b = Agent::start(api, "agent-b", (DURATION, RENEW), live(api));
    wait_statuses(api, &["db", "web", "bad"]).await;
    (a, b)
}

#[tokio::test]
async fn a_stopped_leader_hands_over_at_once() {
    bounded(async {
        let api = Arc::new(FakeApi::start().unwrap());
        let (a, b) = a_leads_b_follows(&api).await;
        // Two passes of agent-a's: agent-b has read the lease and follows.
        two_more_passes(&a, 3).await;
        assert!(!b.leader());
        assert_eq!(lease_transitions(&api), 0);

        let start = Instant::now();
        a.stop().await;
        // Released (agent-b may already hold it), not left to expire.
        let holder = lease_holder(&api);
        assert!(
            matches!(holder.as_deref(), Some("" | "agent-b")),
            "{holder:?}"
        );
        until("agent-b takes over", DURATION, || b.leader().then_some(())).await;
        let took = start.elapsed();
        eprintln!("agent-b took over {took:?} after agent-a stopped");
        assert!(took < DURATION, "{took:?}");
        assert_eq!(lease_holder(&api).as_deref(), Some("agent-b"));
        assert_eq!(lease_transitions(&api), 1);

        // The new leader writes: a new policy gets its status.
        api.apply(policy_json(
            "late",
            json!([{"from": [{"source": {"namespaces": ["ops"]}}]}]),
        ));
        wait_statuses(&api, &["late"]).await;
        two_more_passes(&b, 4).await;
        assert_eq!(b.writes(), 1, "agent-b only writes what agent-a had not");
        b.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_dead_leader_is_replaced_after_its_lease_expires() {
    bounded(async {
        let api = Arc::new(FakeApi::start().unwrap());
        let (a, b) = a_leads_b_follows(&api).await;

        // Killed: no release.
        a.task.abort();
        let start = Instant::now();
        until("agent-b takes over", DURATION + RENEW * 4, || {
            b.leader().then_some(())
        })
        .await;
        let took = start.elapsed();
        eprintln!("agent-b took over {took:?} after agent-a died");
        // Not before the lease (renewed at most RENEW before the kill) expired.
        assert!(took >= DURATION - RENEW * 2, "{took:?}");
        assert_eq!(lease_holder(&api).as_deref(), Some("agent-b"));
        assert_eq!(lease_transitions(&api), 1);
        b.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_forbidden_status_patch_is_counted_and_not_fatal() {
    bounded(async {
        let api = Arc::new(FakeApi::start().unwrap());
        apply_policies(&api);
        api.deny("authorizationpolicies/status", "patch");
        let a = Agent::start(&api, "agent-a", (DURATION, RENEW), live(&api));
        // Two passes of three refused patches.
        until("refused patches", Duration::from_secs(5), || {
            (a.errors() >= 6).then_some(())
        })
        .await;
        assert!(a.leader(), "a 403 does not cost the lease");
        assert_eq!(a.writes(), 0);
        assert!(!has_status(&api, "db"));

        api.allow("authorizationpolicies/status", "patch");
        wait_statuses(&api, &["db", "web", "bad"]).await;
        assert_eq!(a.writes(), 3);
        a.stop().await;
    })
    .await;
}
