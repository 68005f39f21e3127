//! The fake API server (`sinew_tests::fake_api`) against kube-rs's real `Client`, `Api` and `watcher`: lists,
//! gets, watches with re-lists after compaction, bookmarks, RBAC denials, the status subresource and leases.
//! Unprivileged and fast: loopback only, every test bounded by a timeout.

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::future::Future;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher::Event;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Client, ResourceExt};
use mesh_agent::policy::AuthorizationPolicy;
use serde_json::{Value, json};
use sinew_tests::fake_api::FakeApi;

/// Bound for a whole test.
const TEST_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound for one expected watcher event.
const EVENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs a test body under [`TEST_TIMEOUT`], so a hang fails instead of blocking CI.
async fn bounded<F: Future<Output = ()>>(what: &str, f: F) {
    tokio::time::timeout(TEST_TIMEOUT, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: timed out after {TEST_TIMEOUT:?}"));
}

/// A client configured the way the agent is outside a cluster: through a kubeconfig file.
async fn client(api: &FakeApi) -> Client {
    let path = std::env::temp_dir().join(format!(
        "sinew-fake-api-{}-{}.kubeconfig",
        std::process::id(),
        api.url().rsplit(':').next().unwrap_or("0")
    ));
    api.write_kubeconfig(&path).expect("write kubeconfig");
    let kubeconfig = Kubeconfig::read_from(&path).expect("read kubeconfig");
    let _ = std::fs::remove_file(&path);
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig accepted");
    assert_eq!(config.default_namespace, "default");
    Client::try_from(config).expect("client")
}

fn pod(ns: &str, name: &str, labels: Value, node: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"namespace": ns, "name": name, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]},
        "status": {"phase": "Running", "podIP": "10.0.0.1"},
    })
}

fn policy(ns: &str, name: &str, action: &str) -> Value {
    json!({
        "apiVersion": "security.sinew.dev/v1alpha1",
        "kind": "AuthorizationPolicy",
        "metadata": {"namespace": ns, "name": name},
        "spec": {"action": action, "rules": [{}]},
    })
}

/// The next item of a watcher stream, within [`EVENT_TIMEOUT`].
async fn next<S, T>(s: &mut S, what: &str) -> T
where
    S: Stream<Item = T> + Unpin,
{
    tokio::time::timeout(EVENT_TIMEOUT, s.next())
        .await
        .unwrap_or_else(|_| panic!("{what}: no event within {EVENT_TIMEOUT:?}"))
        .unwrap_or_else(|| panic!("{what}: stream ended"))
}

/// Polls `s` (whose watcher sends its watch request only when polled) until the server has `n` open watches;
/// panics if `s` yields anything meanwhile.
async fn until_watches<S>(api: &FakeApi, n: usize, s: &mut S)
where
    S: Stream + Unpin,
    S::Item: Debug,
{
    let open = async {
        while api.open_watches() < n {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::select! {
        item = s.next() => panic!("unexpected item while waiting for the watch: {item:?}"),
        r = tokio::time::timeout(EVENT_TIMEOUT, open) => r.expect("the watch did not open"),
    }
}

/// The next watcher event, which must not be an error.
async fn next_ok<S>(s: &mut S, what: &str) -> Event<Pod>
where
    S: Stream<Item = Result<Event<Pod>, watcher::Error>> + Unpin,
{
    next(s, what)
        .await
        .unwrap_or_else(|e| panic!("{what}: watcher error {e}"))
}

/// Consumes `Init`, the `InitApply`s and `InitDone`; returns the names listed.
async fn init_cycle<S>(s: &mut S, what: &str) -> BTreeSet<String>
where
    S: Stream<Item = Result<Event<Pod>, watcher::Error>> + Unpin,
{
    let ev = next_ok(s, what).await;
    assert!(
        matches!(ev, Event::Init),
        "{what}: expected Init, got {}",
        describe(&ev)
    );
    let mut names = BTreeSet::new();
    loop {
        match next_ok(s, what).await {
            Event::InitApply(p) => {
                names.insert(p.name_any());
            }
            Event::InitDone => return names,
            other => panic!(
                "{what}: expected InitApply/InitDone, got {}",
                describe(&other)
            ),
        }
    }
}

fn describe(ev: &Event<Pod>) -> String {
    match ev {
        Event::Apply(p) => format!("Apply({})", p.name_any()),
        Event::Delete(p) => format!("Delete({})", p.name_any()),
        Event::Init => "Init".into(),
        Event::InitApply(p) => format!("InitApply({})", p.name_any()),
        Event::InitDone => "InitDone".into(),
    }
}

fn names<K: kube::Resource>(items: &[K]) -> Vec<String> {
    items
        .iter()
        .map(|o| o.meta().name.clone().unwrap_or_default())
        .collect()
}

fn api_error(e: kube::Error) -> kube::core::ErrorResponse {
    match e {
        kube::Error::Api(r) => r,
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn list_get_and_not_found() {
    let api = FakeApi::start().unwrap();
    bounded("list_get_and_not_found", async {
        let c = client(&api).await;
        api.apply(pod("a", "web-1", json!({"app": "web"}), "node-a"));
        api.apply(pod(
            "b",
            "web-2",
            json!({"app": "web", "tier": "x"}),
            "node-b",
        ));
        api.apply(pod("b", "db-1", json!({"app": "db"}), "node-a"));
        api.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "a"}}));

        let all = Api::<Pod>::all(c.clone())
            .list(&ListParams::default())
            .await
            .unwrap();
        assert_eq!(names(&all.items), ["web-1", "db-1", "web-2"]);
        assert!(all.metadata.resource_version.is_some());
        let in_b = Api::<Pod>::namespaced(c.clone(), "b")
            .list(&ListParams::default())
            .await
            .unwrap();
        assert_eq!(names(&in_b.items), ["db-1", "web-2"]);
        let web = ListParams::default().labels("app=web");
        let web = Api::<Pod>::all(c.clone()).list(&web).await.unwrap();
        assert_eq!(names(&web.items), ["web-1", "web-2"]);
        let set = ListParams::default().labels("app in (web,db),!tier");
        let set = Api::<Pod>::all(c.clone()).list(&set).await.unwrap();
        assert_eq!(names(&set.items), ["web-1", "db-1"]);
        let on_a = ListParams::default().fields("spec.nodeName=node-a");
        let on_a = Api::<Pod>::all(c.clone()).list(&on_a).await.unwrap();
        assert_eq!(names(&on_a.items), ["web-1", "db-1"]);

        let got = Api::<Pod>::namespaced(c.clone(), "a")
            .get("web-1")
            .await
            .unwrap();
        assert_eq!(got.spec.unwrap().node_name.as_deref(), Some("node-a"));
        assert_eq!(got.metadata.generation, Some(1));
        assert!(got.metadata.uid.is_some() && got.metadata.creation_timestamp.is_some());
        let ns = Api::<Namespace>::all(c.clone()).get("a").await.unwrap();
        assert_eq!(ns.name_any(), "a");

        let e = api_error(
            Api::<Pod>::namespaced(c.clone(), "a")
                .get("nope")
                .await
                .unwrap_err(),
        );
        assert_eq!((e.code, e.reason.as_str()), (404, "NotFound"));
        assert_eq!(e.message, r#"pods "nope" not found"#);
        let slices = Api::<EndpointSlice>::all(c.clone())
            .list(&ListParams::default())
            .await
            .unwrap();
        assert!(slices.items.is_empty());

        // A path no API serves.
        let req = hyper::Request::get("/apis/example.com/v1/widgets")
            .body(vec![])
            .unwrap();
        let e = api_error(c.request_text(req).await.unwrap_err());
        assert_eq!((e.code, e.reason.as_str()), (404, "NotFound"));

        assert!(api.count("GET", "/api/v1/pods") >= 4);
        for r in api.requests() {
            eprintln!("{} {}", r.method, r.target());
        }
    })
    .await;
}

#[tokio::test]
async fn watcher_sees_init_apply_delete() {
    let api = FakeApi::start().unwrap();
    bounded("watcher_sees_init_apply_delete", async {
        let c = client(&api).await;
        api.apply(pod("a", "p1", json!({}), "n"));
        let mut w = watcher(Api::<Pod>::all(c), watcher::Config::default()).boxed();
        assert_eq!(
            init_cycle(&mut w, "initial list").await,
            BTreeSet::from(["p1".to_string()])
        );

        api.apply(pod("a", "p2", json!({}), "n"));
        match next_ok(&mut w, "p2 added").await {
            Event::Apply(p) => assert_eq!(p.name_any(), "p2"),
            other => panic!("expected Apply(p2), got {}", describe(&other)),
        }
        let rv = api.apply(pod("a", "p1", json!({"changed": "yes"}), "n"));
        match next_ok(&mut w, "p1 modified").await {
            Event::Apply(p) => {
                assert_eq!(p.name_any(), "p1");
                assert_eq!(p.resource_version(), Some(rv));
                assert_eq!(p.labels().get("changed").map(String::as_str), Some("yes"));
            }
            other => panic!("expected Apply(p1), got {}", describe(&other)),
        }
        assert!(api.delete("v1", "Pod", Some("a"), "p1"));
        match next_ok(&mut w, "p1 deleted").await {
            Event::Delete(p) => assert_eq!(p.name_any(), "p1"),
            other => panic!("expected Delete(p1), got {}", describe(&other)),
        }
        assert!(!api.delete("v1", "Pod", Some("a"), "p1"));

        let list = api
            .requests()
            .into_iter()
            .find(|r| r.path == "/api/v1/pods" && !r.query.contains("watch"));
        let watch = api
            .requests()
            .into_iter()
            .find(|r| r.query.contains("watch=true"));
        eprintln!("list:  {}", list.expect("a list request").target());
        eprintln!("watch: {}", watch.expect("a watch request").target());
    })
    .await;
}

#[tokio::test]
async fn compact_forces_a_relist_that_converges() {
    let api = FakeApi::start().unwrap();
    bounded("compact_forces_a_relist_that_converges", async {
        let c = client(&api).await;
        let old_rv = api.apply(pod("a", "p1", json!({}), "n"));
        api.apply(pod("a", "p2", json!({}), "n"));
        let (reader, writer) = reflector::store::<Pod>();
        let stream = watcher(Api::<Pod>::all(c.clone()), watcher::Config::default());
        let mut w = reflector(writer, stream).boxed();
        let first = init_cycle(&mut w, "first list").await;
        assert_eq!(first, BTreeSet::from(["p1".to_string(), "p2".to_string()]));
        // Make sure the watch is open, so that compaction breaks it rather than its start.
        until_watches(&api, 1, &mut w).await;

        api.compact();
        // Changes while the watch is broken: p2 must not survive the re-list.
        assert!(api.delete("v1", "Pod", Some("a"), "p2"));
        api.apply(pod("a", "p3", json!({}), "n"));

        let err = next(&mut w, "410 after compaction")
            .await
            .expect_err("the watch reports the expiry");
        let text = err.to_string();
        assert!(
            text.contains("too old resource version") && text.contains("Expired"),
            "{text}"
        );
        let second = init_cycle(&mut w, "re-list").await;
        assert_eq!(second, BTreeSet::from(["p1".to_string(), "p3".to_string()]));
        let mut stored: Vec<String> = reader.state().iter().map(|p| p.name_any()).collect();
        stored.sort();
        assert_eq!(stored, ["p1", "p3"]);
        assert_eq!(
            api.count("GET", "/api/v1/pods?&limit"),
            2,
            "one list before and one after compaction"
        );

        // A watch from before the compaction gets the same 410, as the stream's only event.
        let pods = Api::<Pod>::all(c);
        let mut old = pods
            .watch(&WatchParams::default(), &old_rv)
            .await
            .unwrap()
            .boxed();
        match next(&mut old, "old watch").await {
            Ok(WatchEvent::Error(e)) => assert_eq!((e.code, e.reason.as_str()), (410, "Expired")),
            other => panic!("expected a 410 error event, got {other:?}"),
        }
        assert!(
            tokio::time::timeout(EVENT_TIMEOUT, old.next())
                .await
                .unwrap()
                .is_none()
        );
    })
    .await;
}

#[tokio::test]
async fn bookmarks_keep_the_watch_healthy() {
    let api = FakeApi::start().unwrap();
    bounded("bookmarks_keep_the_watch_healthy", async {
        let c = client(&api).await;
        api.apply(pod("a", "p1", json!({}), "n"));
        let pods = Api::<Pod>::all(c.clone());
        let mut w = watcher(pods.clone(), watcher::Config::default()).boxed();
        init_cycle(&mut w, "list").await;
        until_watches(&api, 1, &mut w).await;
        api.bookmark();
        api.bookmark();
        api.apply(pod("a", "p2", json!({}), "n"));
        // Bookmarks produce no watcher events and no errors: the next event is p2's.
        match next_ok(&mut w, "after bookmarks").await {
            Event::Apply(p) => assert_eq!(p.name_any(), "p2"),
            other => panic!("expected Apply(p2), got {}", describe(&other)),
        }
        assert_eq!(
            api.count("GET", "watch=true"),
            1,
            "the watch was not restarted"
        );

        // On a raw watch the bookmark arrives with the current resource version.
        let rv = api.apply(pod("a", "p3", json!({}), "n"));
        let mut raw = pods
            .watch(&WatchParams::default(), &rv)
            .await
            .unwrap()
            .boxed();
        assert_eq!(
            api.open_watches(),
            2,
            "a watch is registered before its response starts"
        );
        api.bookmark();
        match next(&mut raw, "raw bookmark").await {
            Ok(WatchEvent::Bookmark(b)) => {
                assert_eq!(b.metadata.resource_version, rv);
                assert_eq!(
                    (b.types.api_version.as_str(), b.types.kind.as_str()),
                    ("v1", "Pod")
                );
            }
            other => panic!("expected a bookmark, got {other:?}"),
        }
    })
    .await;
}

#[tokio::test]
async fn denied_list_fails_then_recovers() {
    let api = FakeApi::start().unwrap();
    bounded("denied_list_fails_then_recovers", async {
        let c = client(&api).await;
        api.apply(pod("a", "p1", json!({}), "n"));
        api.deny("pods", "list");
        let mut w = watcher(Api::<Pod>::all(c.clone()), watcher::Config::default())
            .default_backoff()
            .boxed();
        assert!(matches!(next_ok(&mut w, "init").await, Event::Init));
        let err = next(&mut w, "denied list").await.expect_err("the list is forbidden");
        let text = err.to_string();
        assert!(
            text.contains("pods is forbidden") && text.contains("cannot list resource"),
            "{text}"
        );
        assert!(
            text.contains(r#"User "system:serviceaccount:sinew-system:sinew-agent" cannot list resource "pods" in API group "" at the cluster scope"#),
            "{text}"
        );
        api.allow("pods", "list");
        // The backoff retries; the watcher starts over with a fresh Init.
        assert_eq!(init_cycle(&mut w, "after allow").await, BTreeSet::from(["p1".to_string()]));
        // A denied watch: the 403 Status arrives as the watch response's body and surfaces as a watch error.
        until_watches(&api, 1, &mut w).await;
        api.deny("pods", "watch");
        api.close_watches();
        let err = next(&mut w, "denied watch").await.expect_err("the watch is forbidden");
        assert!(err.to_string().contains("cannot watch resource \"pods\""), "{err}");
        api.allow("pods", "watch");
        api.apply(pod("a", "p2", json!({}), "n"));
        loop {
            // Further retries may fail until the backoff lets one through after `allow`.
            match next(&mut w, "watch after allow").await {
                Ok(ev) => {
                    assert_eq!(describe(&ev), "Apply(p2)");
                    break;
                }
                Err(e) => assert!(e.to_string().contains("forbidden"), "{e}"),
            }
        }

        // A namespaced, named denial is worded with the group, the name and the namespace.
        api.deny("leases", "get");
        let leases = Api::<Lease>::namespaced(c.clone(), "sinew-system");
        let e = api_error(leases.get("leader").await.unwrap_err());
        assert_eq!((e.code, e.reason.as_str()), (403, "Forbidden"));
        assert_eq!(
            e.message,
            r#"leases.coordination.k8s.io "leader" is forbidden: User "system:serviceaccount:sinew-system:sinew-agent" cannot get resource "leases" in API group "coordination.k8s.io" in the namespace "sinew-system""#
        );
        api.deny("authorizationpolicies/status", "patch");
        api.apply(policy("ns", "p", "ALLOW"));
        let aps = Api::<AuthorizationPolicy>::namespaced(c, "ns");
        let patch = Patch::Merge(json!({"status": {"rules": []}}));
        let e = api_error(aps.patch_status("p", &PatchParams::default(), &patch).await.unwrap_err());
        assert_eq!(e.code, 403);
        assert!(e.message.contains(r#"cannot patch resource "authorizationpolicies/status" in API group "security.sinew.dev""#), "{}", e.message);
    })
    .await;
}

#[tokio::test]
async fn status_patch_changes_only_status() {
    let api = FakeApi::start().unwrap();
    bounded("status_patch_changes_only_status", async {
        let c = client(&api).await;
        let rv1 = api.apply(policy("ns", "p", "ALLOW"));
        let aps = Api::<AuthorizationPolicy>::namespaced(c.clone(), "ns");
        let before = aps.get("p").await.unwrap();
        assert_eq!(before.metadata.generation, Some(1));
        assert_eq!(before.resource_version(), Some(rv1.clone()));

        let mut events = aps
            .watch(&WatchParams::default(), &rv1)
            .await
            .unwrap()
            .boxed();
        let patch = Patch::Merge(json!({
            "spec": {"action": "DENY"},
            "status": {"observedGeneration": 1, "rules": []},
        }));
        let after = aps
            .patch_status("p", &PatchParams::default(), &patch)
            .await
            .unwrap();
        assert_eq!(after.spec, before.spec, "a status write ignores the spec");
        assert_eq!(
            after.metadata.generation,
            Some(1),
            "a status write does not bump the generation"
        );
        let rv2 = after.resource_version().unwrap();
        assert!(rv2.parse::<u64>().unwrap() > rv1.parse::<u64>().unwrap());
        assert_eq!(
            after.status.as_ref().and_then(|s| s.observed_generation),
            Some(1)
        );
        let stored = api
            .get(
                "security.sinew.dev/v1alpha1",
                "AuthorizationPolicy",
                Some("ns"),
                "p",
            )
            .unwrap();
        assert_eq!(stored["spec"]["action"], "ALLOW");
        assert_eq!(stored["status"]["observedGeneration"], 1);
        match next(&mut events, "status MODIFIED").await {
            Ok(WatchEvent::Modified(p)) => assert_eq!(p.resource_version(), Some(rv2)),
            other => panic!("expected MODIFIED, got {other:?}"),
        }
        let req = api
            .requests()
            .into_iter()
            .find(|r| r.method == "PATCH")
            .unwrap();
        assert_eq!(
            req.path,
            "/apis/security.sinew.dev/v1alpha1/namespaces/ns/authorizationpolicies/p/status"
        );

        // A spec change bumps the generation and keeps the status (the main resource ignores status).
        api.apply(policy("ns", "p", "DENY"));
        let changed = aps.get("p").await.unwrap();
        assert_eq!(changed.metadata.generation, Some(2));
        let patch =
            Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}, "status": {"rules": null}}));
        let labelled = aps
            .patch("p", &PatchParams::default(), &patch)
            .await
            .unwrap();
        assert_eq!(
            labelled.metadata.generation,
            Some(2),
            "metadata does not count"
        );
        assert_eq!(labelled.labels().get("x").map(String::as_str), Some("y"));

        // Server-side apply of the status, as `Patch::Apply` sends it, and a full PUT of the status.
        let ssa = Patch::Apply(json!({
            "apiVersion": "security.sinew.dev/v1alpha1",
            "kind": "AuthorizationPolicy",
            "status": {"observedGeneration": 2, "rules": []},
        }));
        let applied = aps
            .patch_status("p", &PatchParams::apply("sinew").force(), &ssa)
            .await
            .unwrap();
        assert_eq!(
            applied.status.as_ref().and_then(|s| s.observed_generation),
            Some(2)
        );
        let mut whole = applied.clone();
        whole.status.as_mut().unwrap().observed_generation = Some(3);
        let data = serde_json::to_vec(&whole).unwrap();
        let put = aps
            .replace_status("p", &PostParams::default(), data)
            .await
            .unwrap();
        assert_eq!(put.status.and_then(|s| s.observed_generation), Some(3));
        assert_eq!(put.metadata.generation, Some(2));
    })
    .await;
}

#[tokio::test]
async fn leases_create_conflict_get() {
    let api = FakeApi::start().unwrap();
    bounded("leases_create_conflict_get", async {
        let c = client(&api).await;
        let leases = Api::<Lease>::namespaced(c, "sinew-system");
        let e = api_error(leases.get("leader").await.unwrap_err());
        assert_eq!(e.code, 404);
        let mut lease: Lease = serde_json::from_value(json!({
            "metadata": {"name": "leader", "namespace": "sinew-system"},
            "spec": {"holderIdentity": "node-a", "leaseDurationSeconds": 15},
        }))
        .unwrap();
        let created = leases.create(&PostParams::default(), &lease).await.unwrap();
        let rv = created.resource_version().unwrap();
        let e = api_error(
            leases
                .create(&PostParams::default(), &lease)
                .await
                .unwrap_err(),
        );
        assert_eq!((e.code, e.reason.as_str()), (409, "AlreadyExists"));

        // Replace with the current version wins; replace with a stale one is a conflict.
        let mut mine = created.clone();
        mine.spec.as_mut().unwrap().holder_identity = Some("node-b".into());
        let replaced = leases
            .replace("leader", &PostParams::default(), &mine)
            .await
            .unwrap();
        assert_ne!(replaced.resource_version().unwrap(), rv);
        lease.metadata.resource_version = Some(rv);
        lease.spec.as_mut().unwrap().holder_identity = Some("node-c".into());
        let e = api_error(
            leases
                .replace("leader", &PostParams::default(), &lease)
                .await
                .unwrap_err(),
        );
        assert_eq!((e.code, e.reason.as_str()), (409, "Conflict"));
        assert!(
            e.message.contains("the object has been modified"),
            "{}",
            e.message
        );

        let patch = Patch::Merge(json!({"spec": {"leaseTransitions": 4}}));
        leases
            .patch("leader", &PatchParams::default(), &patch)
            .await
            .unwrap();
        let got = leases.get("leader").await.unwrap();
        let spec = got.spec.unwrap();
        assert_eq!(spec.holder_identity.as_deref(), Some("node-b"));
        assert_eq!(spec.lease_transitions, Some(4));
        assert_eq!(api.count("PUT", "/leases/leader"), 2);
    })
    .await;
}

#[tokio::test]
async fn watch_timeout_close_and_drop_end_streams_cleanly() {
    let api = FakeApi::start().unwrap();
    let c = client(&api).await;
    let pods = Api::<Pod>::all(c);
    bounded("watch timeout, close, drop", async {
        // `timeoutSeconds` ends the stream.
        let mut timed = pods
            .watch(&WatchParams::default().timeout(1), "0")
            .await
            .unwrap()
            .boxed();
        assert!(next_or_end(&mut timed).await.is_none());
        // A watch from "0" starts with synthetic ADDED events for what exists.
        api.apply(pod("a", "p1", json!({}), "n"));
        let mut from_zero = pods
            .watch(&WatchParams::default(), "0")
            .await
            .unwrap()
            .boxed();
        assert!(matches!(
            next(&mut from_zero, "from 0").await,
            Ok(WatchEvent::Added(_))
        ));
        api.close_watches();
        assert!(next_or_end(&mut from_zero).await.is_none());

        let mut live = pods
            .watch(&WatchParams::default(), "0")
            .await
            .unwrap()
            .boxed();
        assert!(matches!(
            next(&mut live, "from 0").await,
            Ok(WatchEvent::Added(_))
        ));
        let dropper = std::thread::spawn(move || drop(api));
        assert!(
            next_or_end(&mut live).await.is_none(),
            "the stream ends when the server is dropped"
        );
        dropper.join().unwrap();
    })
    .await;
}

/// The next item, or `None` when the stream ended; panics on neither within [`EVENT_TIMEOUT`].
async fn next_or_end<S: Stream + Unpin>(s: &mut S) -> Option<S::Item> {
    tokio::time::timeout(EVENT_TIMEOUT, s.next())
        .await
        .expect("stream neither ended nor yielded")
}

#[tokio::test]
async fn selector_watch_sees_objects_enter_and_leave() {
    let api = FakeApi::start().unwrap();
    bounded("selector_watch_sees_objects_enter_and_leave", async {
        let c = client(&api).await;
        api.apply(pod("a", "p1", json!({"app": "web"}), "n"));
        api.apply(pod("a", "p2", json!({"app": "db"}), "n"));
        let config = watcher::Config::default().labels("app=web");
        let mut w = watcher(Api::<Pod>::namespaced(c, "a"), config).boxed();
        assert_eq!(
            init_cycle(&mut w, "list").await,
            BTreeSet::from(["p1".to_string()])
        );
        // p2 enters the selector (ADDED), p1 leaves it (DELETED), a pod elsewhere is not seen.
        api.apply(pod("b", "p3", json!({"app": "web"}), "n"));
        api.apply(pod("a", "p2", json!({"app": "web"}), "n"));
        api.apply(pod("a", "p1", json!({"app": "db"}), "n"));
        let seen = [
            describe(&next_ok(&mut w, "p2 enters").await),
            describe(&next_ok(&mut w, "p1 leaves").await),
        ];
        assert_eq!(seen, ["Apply(p2)", "Delete(p1)"]);
        assert!(api.count("GET", "labelSelector=app%3Dweb") >= 2);
    })
    .await;
}

#[tokio::test]
async fn streaming_list_ends_with_the_initial_events_bookmark() {
    let api = FakeApi::start().unwrap();
    bounded(
        "streaming_list_ends_with_the_initial_events_bookmark",
        async {
            let c = client(&api).await;
            api.apply(pod("a", "p1", json!({}), "n"));
            api.apply(pod("a", "p2", json!({}), "n"));
            let config = watcher::Config::default().streaming_lists();
            let mut w = watcher(Api::<Pod>::all(c), config).boxed();
            // kube 2.0.1 emits no `Init` for a streaming list: `InitApply`s straight away, then `InitDone` on the
            // bookmark that carries the `k8s.io/initial-events-end` annotation.
            let seen = [
                describe(&next_ok(&mut w, "first").await),
                describe(&next_ok(&mut w, "second").await),
                describe(&next_ok(&mut w, "done").await),
            ];
            assert_eq!(seen, ["InitApply(p1)", "InitApply(p2)", "InitDone"]);
            api.apply(pod("a", "p3", json!({}), "n"));
            assert_eq!(describe(&next_ok(&mut w, "p3").await), "Apply(p3)");
            let watch = api
                .requests()
                .into_iter()
                .find(|r| r.query.contains("watch=true"))
                .unwrap();
            eprintln!("streaming list: {}", watch.target());
            assert!(watch.query.contains("sendInitialEvents=true"));
            assert_eq!(api.count("GET", "limit="), 0, "no list request");
        },
    )
    .await;
}

#[tokio::test]
async fn other_kinds_route_like_the_real_api() {
    let api = FakeApi::start().unwrap();
    bounded("other_kinds_route_like_the_real_api", async {
        let c = client(&api).await;
        api.apply(json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {"namespace": "a", "name": "web-abc", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.0.0.1"]}],
        }));
        api.apply(json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"namespace": "a", "name": "web"},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]},
        }));
        api.apply(json!({
            "apiVersion": "security.sinew.dev/v1alpha1",
            "kind": "PeerAuthentication",
            "metadata": {"namespace": "sinew-system", "name": "default"},
            "spec": {"mtls": {"mode": "STRICT"}},
        }));
        api.apply(policy("a", "allow-web", "ALLOW"));

        let sel = ListParams::default().labels("kubernetes.io/service-name=web");
        let slices = Api::<EndpointSlice>::namespaced(c.clone(), "a").list(&sel).await.unwrap();
        assert_eq!(names(&slices.items), ["web-abc"]);
        let svcs = Api::<k8s_openapi::api::core::v1::Service>::all(c.clone());
        let svc = svcs.list(&ListParams::default()).await.unwrap();
        assert_eq!(names(&svc.items), ["web"]);
        let pas = Api::<mesh_agent::peerauth::PeerAuthentication>::all(c.clone());
        assert_eq!(names(&pas.list(&ListParams::default()).await.unwrap().items), ["default"]);
        let aps = Api::<AuthorizationPolicy>::all(c.clone());
        let (reader, writer) = reflector::store::<AuthorizationPolicy>();
        let mut w = reflector(writer, watcher(aps, watcher::Config::default())).boxed();
        loop {
            match next(&mut w, "policy list").await.unwrap() {
                Event::InitDone => break,
                Event::Init | Event::InitApply(_) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(reader.state().len(), 1);

        // Server-side apply creates a missing object; delete removes it.
        let ssa = Patch::Apply(json!({
            "apiVersion": "security.sinew.dev/v1alpha1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "new"},
            "spec": {"action": "DENY"},
        }));
        let in_a = Api::<AuthorizationPolicy>::namespaced(c.clone(), "a");
        in_a.patch("new", &PatchParams::apply("sinew"), &ssa).await.unwrap();
        assert!(matches!(next(&mut w, "ssa").await, Ok(Event::Apply(_))));
        in_a.delete("new", &Default::default()).await.unwrap();
        assert!(matches!(next(&mut w, "delete").await, Ok(Event::Delete(_))));
        let got = api.get("security.sinew.dev/v1alpha1", "AuthorizationPolicy", Some("a"), "new");
        assert!(got.is_none());

        // A JSON patch on the main resource.
        let jp = serde_json::from_value(json!([{"op": "add", "path": "/metadata/labels", "value": {"k": "v"}}]));
        let patched = in_a.patch("allow-web", &PatchParams::default(), &Patch::Json::<()>(jp.unwrap())).await;
        assert_eq!(patched.unwrap().labels().get("k").map(String::as_str), Some("v"));
    })
    .await;
}

// Tests may share the server between tasks and threads.
const _: fn() = || {
    fn shareable<T: Send + Sync>() {}
    shareable::<FakeApi>();
};
