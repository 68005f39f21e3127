//! The `kubernetes` source: the same objects as the file source, from the API server.
//!
//! One kube-rs [`watcher`] per kind (Namespaces, Services, EndpointSlices, Pods, AuthorizationPolicies,
//! PeerAuthentications), cluster-wide. Each runs an initial list, then a watch from the list's resourceVersion; a
//! `410 Gone` (or any broken watch) makes it list again, and errors back off (200 ms doubling to 10 s). Every
//! object is converted into the agent's own trimmed types ([`crate::k8s`]) and checked by the same validators as
//! the file source ([`Object::validate`]): a rejected version keeps the object's last accepted one in force, as
//! a bad edit of a file does. [`KubeSource::load`] then builds the same [`Snapshot`] the file source does, so
//! the desired state, the reconciler and the policy compiler cannot tell the two apart.
//!
//! What differs from the file source:
//! - A re-list replaces a kind's objects as a whole at its end (`InitDone`), so an object deleted while the
//!   watch was broken does not survive it, and a half-done list never reaches the maps.
//! - Nothing is in force before every kind has completed its first list ([`KubeSource::synced`]): a snapshot
//!   without pods would compile policies that deny everyone.
//! - Pods: this node's pods are kept with what the datapath needs; other nodes' pods are trimmed to what
//!   identity needs (IP, namespace, service account, labels, readiness). Host-network pods are left out: they
//!   share the node's netns and address, so they are not workloads with an identity of their own.
//! - A local pod's netns is found from its UID ([`PodNetns`]: kubepods cgroup, a process, `/proc/<pid>/ns/net`).
//!   A `sinew.dev/netns` annotation written by a user is ignored: in a cluster it would let a pod claim
//!   another pod's netns, and with it its identity.
//! - Watch errors (an RBAC `403` above all) are reported as source errors that name the resource and the verb.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use kube::runtime::utils::Backoff;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::{info, warn};

use super::{Object, ObjectKey, Snapshot, SourceError};
use crate::k8s::{self, NETNS_ANNOTATION};
use crate::peerauth::PeerAuthentication;
use crate::podns::PodNetns;
use crate::policy::AuthorizationPolicy;

/// What [`SourceError::file`] says for objects from the API server.
pub const ORIGIN: &str = "kubernetes";

/// The kinds watched, in the order a snapshot lists them: (plural resource, kind).
const KINDS: [(&str, &str); 6] = [
    ("namespaces", "Namespace"),
    ("services", "Service"),
    ("endpointslices", "EndpointSlice"),
    ("pods", "Pod"),
    ("authorizationpolicies", crate::policy::KIND),
    ("peerauthentications", crate::peerauth::KIND),
];

/// The agent's client: `kubeconfig` if given, else `KUBECONFIG`, `~/.kube/config`, then the in-cluster
/// service account (kube's `Config::infer`).
pub async fn client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<Client> {
    use anyhow::Context;
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .with_context(|| format!("kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer().await.context(
            "no kubeconfig and not in a cluster (KUBECONFIG, ~/.kube/config, in-cluster)",
        )?,
    };
    Client::try_from(config).context("building the Kubernetes client")
}

/// One object as the source holds it.
#[derive(Clone, Debug, Default)]
struct Entry {
    /// The last version that passed validation: what is in force.
    accepted: Option<Object>,
    /// Why the newest version was rejected, if it was.
    rejected: Option<String>,
}

/// One kind's objects.
#[derive(Debug, Default)]
struct KindStore {
    /// Has completed a list at least once.
    synced: bool,
    objects: BTreeMap<ObjectKey, Entry>,
    /// During a (re-)list: the objects seen so far; swapped in at its end.
    listing: Option<BTreeMap<ObjectKey, Entry>>,
    /// The watch's current error (cleared by the next event).
    error: Option<String>,
}

#[derive(Debug, Default)]
struct Store {
    kinds: BTreeMap<&'static str, KindStore>,
    /// The AuthorizationPolicies as the API server has them (valid or not, with their status): what the status
    /// writer compares against.
    policies: BTreeMap<ObjectKey, AuthorizationPolicy>,
}

/// What the watcher tasks and the source share.
#[derive(Debug, Default)]
pub struct Shared {
    store: Mutex<Store>,
    /// Bumped on every change; the run loop loads when it moved.
    revision: AtomicU64,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn changed(&self) {
        self.revision.fetch_add(1, Ordering::AcqRel);
    }

    /// The current revision (moves on every change).
    pub fn revision(&self) -> u64 {
        self.revision.load(Ordering::Acquire)
    }

    /// Every AuthorizationPolicy as the API server has it, including rejected ones.
    pub fn policies(&self) -> Vec<AuthorizationPolicy> {
        self.lock().policies.values().cloned().collect()
    }
}

/// The kubernetes source.
pub struct KubeSource {
    shared: Arc<Shared>,
    node: String,
    netns: PodNetns,
    seen: u64,
    netns_pending: bool,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl KubeSource {
    /// Starts one watcher per kind on the current tokio runtime.
    pub fn start(client: Client, node: &str, cgroup_root: PathBuf, proc_root: PathBuf) -> Self {
        let shared = Arc::new(Shared::default());
        {
            let mut store = shared.lock();
            for (plural, _) in KINDS {
                store.kinds.insert(plural, KindStore::default());
            }
        }
        let node_name = node.to_string();
        let tasks = vec![
            spawn::<k8s_openapi::api::core::v1::Namespace>(
                &shared,
                Api::all(client.clone()),
                "namespaces",
                |n| convert(n).map(Object::Namespace),
            ),
            spawn::<k8s_openapi::api::core::v1::Service>(
                &shared,
                Api::all(client.clone()),
                "services",
                |s| convert(s).map(Object::Service),
            ),
            spawn::<k8s_openapi::api::discovery::v1::EndpointSlice>(
                &shared,
                Api::all(client.clone()),
                "endpointslices",
                |s| convert(s).map(Object::EndpointSlice),
            ),
            spawn::<k8s_openapi::api::core::v1::Pod>(
                &shared,
                Api::all(client.clone()),
                "pods",
                move |p| convert(p).map(|p| Object::Pod(trim_pod(p, &node_name))),
            ),
            spawn::<AuthorizationPolicy>(
                &shared,
                Api::all(client.clone()),
                "authorizationpolicies",
                |p| Ok(Object::AuthorizationPolicy(p.clone())),
            ),
            spawn::<PeerAuthentication>(&shared, Api::all(client), "peerauthentications", |p| {
                Ok(Object::PeerAuthentication(p.clone()))
            }),
        ];
        KubeSource {
            shared,
            node: node.to_string(),
            netns: PodNetns::new(cgroup_root, proc_root),
            seen: 0,
            netns_pending: false,
            tasks,
        }
    }

    /// What the status writer reads.
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Every kind has completed its first list.
    pub fn synced(&self) -> bool {
        self.shared.lock().kinds.values().all(|k| k.synced)
    }

    /// The kinds that have not completed their first list, with the error that holds them back if any.
    pub fn unsynced(&self) -> Vec<String> {
        self.shared
            .lock()
            .kinds
            .iter()
            .filter(|(_, k)| !k.synced)
            .map(|(plural, k)| match &k.error {
                Some(e) => format!("{plural} ({e})"),
                None => plural.to_string(),
            })
            .collect()
    }

    /// Something changed since the last [`load`](Self::load).
    pub fn changed(&self) -> bool {
        self.shared.revision() != self.seen
    }

    /// A local pod's netns could not be found at the last load (its sandbox may still be starting).
    pub fn netns_pending(&self) -> bool {
        self.netns_pending
    }

    /// The accepted objects, and what was rejected and why (objects and watch errors).
    pub fn load(&mut self) -> (Snapshot, Vec<SourceError>) {
        self.seen = self.shared.revision();
        let mut snapshot = Snapshot::default();
        let mut errors = Vec::new();
        {
            let store = self.shared.lock();
            for (plural, _) in KINDS {
                let Some(kind) = store.kinds.get(plural) else {
                    continue;
                };
                if let Some(e) = &kind.error {
                    errors.push(SourceError {
                        file: ORIGIN.into(),
                        object: plural.to_string(),
                        reason: e.clone(),
                    });
                }
                for (key, entry) in &kind.objects {
                    if let Some(reason) = &entry.rejected {
                        errors.push(SourceError {
                            file: ORIGIN.into(),
                            object: key.to_string(),
                            reason: reason.clone(),
                        });
                    }
                    if let Some(object) = &entry.accepted {
                        snapshot.push(object.clone());
                    }
                }
            }
        }
        self.netns_pending = self.attach_netns(&mut snapshot.pods, &mut errors);
        (snapshot, errors)
    }

    /// Leaves host-network pods out, and names each local pod's netns (found from its UID). Returns whether a
    /// local pod's netns is still unknown.
    fn attach_netns(&mut self, pods: &mut Vec<k8s::Pod>, errors: &mut Vec<SourceError>) -> bool {
        pods.retain(|p| !p.spec.host_network);
        let mut pending = false;
        let mut uids = BTreeSet::new();
        for pod in pods.iter_mut() {
            // Only this source says where a pod's netns is; see the module docs.
            pod.metadata.annotations.remove(NETNS_ANNOTATION);
            if pod.spec.node_name.as_deref() != Some(self.node.as_str()) || pod.is_terminated() {
                continue;
            }
            let Some(uid) = pod.metadata.uid.clone() else {
                continue;
            };
            match self.netns.netns_path(&uid) {
                Ok(path) => {
                    pod.metadata
                        .annotations
                        .insert(NETNS_ANNOTATION.into(), path.display().to_string());
                }
                // A pod without an IP has no sandbox yet: nothing to find, nothing to report.
                Err(_) if pod.status.pod_ip.is_none() => pending = true,
                Err(e) => {
                    pending = true;
                    errors.push(SourceError {
                        file: ORIGIN.into(),
                        object: format!("Pod {}", pod.metadata.key()),
                        reason: format!(
                            "netns not found yet, enforced at its destinations only: {e}"
                        ),
                    });
                }
            }
            uids.insert(uid);
        }
        self.netns.retain(&uids);
        pending
    }
}

/// Reads an API object into the agent's own type for it (through JSON: the types share field names).
fn convert<K: Serialize, T: DeserializeOwned>(obj: &K) -> Result<T, String> {
    serde_json::to_value(obj)
        .and_then(serde_json::from_value)
        .map_err(|e| format!("cannot be read: {e}"))
}

/// Keeps of another node's pod only what identity needs; this node's pods are kept whole.
fn trim_pod(mut pod: k8s::Pod, node: &str) -> k8s::Pod {
    if pod.spec.node_name.as_deref() != Some(node) {
        pod.metadata.annotations.clear();
        pod.status.conditions.retain(|c| c.type_ == "Ready");
    }
    pod
}

/// The key an API object is stored under (the same as [`Object::key`] gives for it).
fn key_of<K: Resource>(kind: &'static str, obj: &K) -> ObjectKey {
    let meta = obj.meta();
    ObjectKey {
        kind,
        namespace: if kind == "Namespace" {
            String::new()
        } else {
            meta.namespace.clone().unwrap_or_else(|| "default".into())
        },
        name: meta.name.clone().unwrap_or_default(),
    }
}

/// Validates a new version of an object; a rejected one keeps the previous accepted version.
fn entry_for(previous: Option<&Entry>, converted: Result<Object, String>) -> Entry {
    let result = converted.and_then(|o| o.validate().map(|()| o));
    match result {
        Ok(object) => Entry {
            accepted: Some(object),
            rejected: None,
        },
        Err(reason) => Entry {
            accepted: previous.and_then(|p| p.accepted.clone()),
            rejected: Some(reason),
        },
    }
}

/// Backoff between failed list/watch attempts: 200 ms doubling to 10 s, reset once events flow again.
struct Retry(Duration);

impl Iterator for Retry {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let d = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(10));
        Some(d)
    }
}

impl Backoff for Retry {
    fn reset(&mut self) {
        self.0 = Duration::from_millis(200);
    }
}

/// Names a watch error the way an operator looks for it: resource, verb, status code, the server's message.
fn describe(plural: &str, e: &watcher::Error) -> String {
    let (verb, inner) = match e {
        watcher::Error::InitialListFailed(e) => ("list", Some(e)),
        watcher::Error::WatchStartFailed(e) | watcher::Error::WatchFailed(e) => ("watch", Some(e)),
        watcher::Error::WatchError(r) => {
            return format!("watch {plural}: {} ({} {})", r.message, r.code, r.reason);
        }
        watcher::Error::NoResourceVersion => ("list", None),
    };
    match inner {
        Some(kube::Error::Api(r)) => {
            format!("{verb} {plural}: {} ({} {})", r.message, r.code, r.reason)
        }
        Some(e) => format!("{verb} {plural}: {e}"),
        None => format!("{verb} {plural}: {e}"),
    }
}

/// Runs the watcher of one kind, folding its events into the store.
fn spawn<K>(
    shared: &Arc<Shared>,
    api: Api<K>,
    plural: &'static str,
    to_object: impl Fn(&K) -> Result<Object, String> + Send + 'static,
) -> tokio::task::JoinHandle<()>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default,
{
    let shared = shared.clone();
    let kind = KINDS
        .iter()
        .find(|(p, _)| *p == plural)
        .map(|(_, k)| *k)
        .unwrap_or("Unknown");
    tokio::spawn(async move {
        let mut stream = watcher(api, watcher::Config::default())
            .backoff(Retry(Duration::from_millis(200)))
            .boxed();
        while let Some(item) = stream.next().await {
            let event = match item {
                Ok(ev) => ev,
                Err(e) => {
                    let text = describe(plural, &e);
                    let mut store = shared.lock();
                    let k = store.kinds.entry(plural).or_default();
                    if k.error.as_deref() != Some(text.as_str()) {
                        warn!(resource = plural, error = %text, "kubernetes source: retrying with backoff");
                        k.error = Some(text);
                        drop(store);
                        shared.changed();
                    }
                    continue;
                }
            };
            let mut store = shared.lock();
            let store = &mut *store;
            let k = store.kinds.entry(plural).or_default();
            if k.error.take().is_some() {
                info!(resource = plural, "kubernetes source: watch recovered");
            }
            match event {
                watcher::Event::Init => {
                    k.listing = Some(BTreeMap::new());
                    continue;
                }
                watcher::Event::InitApply(obj) => {
                    record(store, plural, key_of(kind, &obj), to_object(&obj), true);
                    continue;
                }
                watcher::Event::InitDone => {
                    let listed = k.listing.take().unwrap_or_default();
                    if kind == crate::policy::KIND {
                        store.policies.retain(|key, _| listed.contains_key(key));
                    }
                    k.objects = listed;
                    if !std::mem::replace(&mut k.synced, true) {
                        info!(
                            resource = plural,
                            objects = k.objects.len(),
                            "kubernetes source: listed"
                        );
                    }
                }
                watcher::Event::Apply(obj) => {
                    record(store, plural, key_of(kind, &obj), to_object(&obj), false);
                }
                watcher::Event::Delete(obj) => {
                    let key = key_of(kind, &obj);
                    k.objects.remove(&key);
                    store.policies.remove(&key);
                }
            }
            shared.changed();
        }
    })
}

/// Records a new version of an object: into the listing during a (re-)list, else into the objects in force. An
/// AuthorizationPolicy is also kept as it is, valid or not, for the status writer.
fn record(
    store: &mut Store,
    plural: &'static str,
    key: ObjectKey,
    converted: Result<Object, String>,
    listing: bool,
) {
    if let Ok(Object::AuthorizationPolicy(p)) = &converted {
        store.policies.insert(key.clone(), p.clone());
    }
    let k = store.kinds.entry(plural).or_default();
    let entry = entry_for(k.objects.get(&key), converted);
    let into = if listing {
        k.listing.get_or_insert_default()
    } else {
        &mut k.objects
    };
    into.insert(key, entry);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(node: &str) -> k8s::Pod {
        serde_yaml::from_str(&format!(
            "metadata: {{name: p, namespace: ns, uid: u-1, labels: {{app: a}}, annotations: {{x: y}}}}\n\
             spec: {{nodeName: {node}, serviceAccountName: sa}}\n\
             status: {{podIP: 10.0.0.1, conditions: [{{type: Ready, status: 'True'}}, {{type: PodScheduled, status: 'True'}}]}}\n"
        ))
        .unwrap()
    }

    #[test]
    fn other_nodes_pods_keep_what_identity_needs() {
        let remote = trim_pod(pod("n2"), "n1");
        assert!(remote.metadata.annotations.is_empty());
        assert_eq!(
            remote.metadata.labels.get("app").map(String::as_str),
            Some("a")
        );
        assert_eq!(remote.service_account(), "sa");
        assert_eq!(remote.status.pod_ip.as_deref(), Some("10.0.0.1"));
        assert_eq!(remote.status.conditions.len(), 1);
        assert!(remote.is_ready());
        let local = trim_pod(pod("n1"), "n1");
        assert_eq!(local, pod("n1"));
    }

    #[test]
    fn api_objects_read_into_the_agent_types() {
        let api: k8s_openapi::api::core::v1::Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": "u-1", "managedFields": [{"manager": "kubelet"}]},
            "spec": {"nodeName": "n1", "hostNetwork": true, "containers": [{"name": "c", "image": "i",
                     "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"podIP": "10.0.0.1"}
        }))
        .unwrap();
        let ours: k8s::Pod = convert(&api).unwrap();
        assert_eq!(ours.metadata.uid.as_deref(), Some("u-1"));
        assert!(ours.spec.host_network);
        assert_eq!(ours.named_port("http", "TCP"), Some(8080));
        assert_eq!(key_of("Pod", &api).to_string(), "Pod ns/p");
    }

    #[test]
    fn a_rejected_version_keeps_the_last_accepted_one() {
        let good = Object::Pod(pod("n1"));
        let first = entry_for(None, Ok(good.clone()));
        assert_eq!(first.accepted.as_ref(), Some(&good));
        assert!(first.rejected.is_none());
        let mut bad = pod("n1");
        bad.status.pod_ip = Some("not-an-ip".into());
        let second = entry_for(Some(&first), Ok(Object::Pod(bad)));
        assert_eq!(second.accepted.as_ref(), Some(&good));
        assert!(
            second.rejected.as_deref().unwrap().contains("podIP"),
            "{second:?}"
        );
        let unreadable = entry_for(None, Err("cannot be read: x".into()));
        assert!(unreadable.accepted.is_none());
    }

    #[test]
    fn backoff_doubles_to_ten_seconds_and_resets() {
        let mut r = Retry(Duration::from_millis(200));
        let first: Vec<_> = r.by_ref().take(3).collect();
        assert_eq!(first, [200, 400, 800].map(Duration::from_millis));
        assert_eq!(r.nth(10), Some(Duration::from_secs(10)));
        r.reset();
        assert_eq!(r.next(), Some(Duration::from_millis(200)));
    }
}
