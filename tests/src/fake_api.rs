//! An in-process fake Kubernetes API server: list and watch, for the kubernetes source's tests.
//!
//! [`FakeApi`] speaks the API server's HTTP protocol (plain HTTP/1.1 on loopback) well enough that kube-rs's
//! `Client`, `Api` and `kube::runtime::watcher` run against it unmodified, so tests exercise the agent's real
//! client code at the HTTP boundary only.
//!
//! How data flows:
//! - Tests change the cluster with [`FakeApi::apply`] / [`FakeApi::delete`]; clients change it through the API
//!   (create, replace, merge/JSON/apply patch, delete, the `status` subresource). Every write takes the next value
//!   of one global resource-version counter and appends an event to the history.
//! - A list returns the current objects and the current resource version. A watch replays the history after its
//!   resource version (or synthetic `ADDED` events for every object when it starts from `0`), then gets live
//!   events through a channel that feeds its chunked response body.
//! - [`FakeApi::compact`] forgets the history (open watches and later watches from an older version get a `410
//!   Expired` error event), [`FakeApi::bookmark`] sends bookmarks, [`FakeApi::close_watches`] ends the streams the
//!   way a server-side timeout does, and [`FakeApi::deny`] makes requests fail with RBAC's 403.
//! - Every request is logged ([`FakeApi::requests`]).
//!
//! The server runs on its own thread with a current-thread tokio runtime, so it works under any test runtime (or
//! none). All the API logic is synchronous, under one lock; only the connection handling is async.

use std::collections::{BTreeMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Map, Value, json};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

/// The user RBAC errors name, like a real API server names the agent's service account.
const USER: &str = "system:serviceaccount:sinew-system:sinew-agent";

/// How long a dropped server waits for its connections to finish their responses.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// A running fake API server. Dropping it ends every watch stream cleanly and stops the server thread.
pub struct FakeApi {
    shared: Arc<Mutex<State>>,
    addr: SocketAddr,
    shutdown: tokio::sync::watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
}

/// One request as the server received it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The path, e.g. `/api/v1/namespaces/default/pods`.
    pub path: String,
    /// The raw (percent-encoded) query string without `?`, empty when there is none.
    pub query: String,
    /// The request body (lossy UTF-8).
    pub body: String,
}

/// A resource type the server serves.
#[derive(Clone, Debug)]
struct ResType {
    group: String,
    version: String,
    plural: String,
    kind: String,
    namespaced: bool,
    /// A custom resource: its list items carry `apiVersion` and `kind` (built-in types' items do not).
    crd: bool,
    /// Has a `status` subresource: the main resource ignores status changes, `/status` ignores everything else.
    status: bool,
}

/// Where an object lives: type index, namespace (empty when cluster-scoped), name.
type Key = (usize, String, String);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EventKind {
    Added,
    Modified,
    Deleted,
}

/// One entry of the event history.
struct Event {
    rv: u64,
    ty: usize,
    kind: EventKind,
    obj: Value,
    /// The object before a modification, so that watches with selectors see objects enter and leave them.
    prev: Option<Value>,
}

/// An open watch stream.
struct Watch {
    ty: usize,
    namespace: Option<String>,
    labels: Vec<LabelReq>,
    fields: Vec<FieldReq>,
    bookmarks: bool,
    tx: UnboundedSender<Bytes>,
}

/// One requirement of a label selector.
#[derive(Clone, Debug)]
enum LabelReq {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// One requirement of a field selector: a dotted path, `=` or `!=`, a value.
#[derive(Clone, Debug)]
struct FieldReq {
    path: String,
    value: String,
    equal: bool,
}

/// What a request resolved to.
struct Target {
    ty: usize,
    namespace: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

/// A response before it becomes HTTP.
enum Reply {
    Json(StatusCode, Value),
    Watch(UnboundedReceiver<Bytes>, Option<Duration>),
}

/// The whole API state, behind one lock.
struct State {
    types: Vec<ResType>,
    objects: BTreeMap<Key, Value>,
    rv: u64,
    /// Watches from a version older than this get `410 Expired`.
    compacted: u64,
    history: Vec<Event>,
    watches: Vec<Watch>,
    denied: HashSet<(String, String)>,
    requests: Vec<Request>,
    uids: u64,
}

type Body = UnsyncBoxBody<Bytes, Infallible>;

impl FakeApi {
    /// Starts the server on `127.0.0.1:0` on a thread of its own.
    pub fn start() -> anyhow::Result<FakeApi> {
        let listener =
            std::net::TcpListener::bind("127.0.0.1:0").context("fake API: bind 127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Mutex::new(State::new()));
        let (shutdown, shutdown_rx) = tokio::sync::watch::channel(false);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("fake API: tokio runtime")?;
        let state = shared.clone();
        let thread = std::thread::Builder::new()
            .name("fake-api".into())
            .spawn(move || {
                rt.block_on(serve(listener, state, shutdown_rx));
            })
            .context("fake API: spawn server thread")?;
        Ok(FakeApi {
            shared,
            addr,
            shutdown,
            thread: Some(thread),
        })
    }

    /// The server's base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig whose current context points at this server with a bearer token, namespace `default`.
    pub fn write_kubeconfig(&self, path: &Path) -> anyhow::Result<()> {
        // JSON is YAML, which is what kube's `Kubeconfig::read_from` parses.
        let config = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url()}}],
            "users": [{"name": "sinew-agent", "user": {"token": "fake-token"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "sinew-agent", "namespace": "default"}}],
            "current-context": "fake",
            "preferences": {},
        });
        std::fs::write(path, serde_json::to_vec_pretty(&config)?)
            .with_context(|| format!("write kubeconfig {}", path.display()))
    }

    /// Creates or replaces the object identified by its `apiVersion`, `kind`, `metadata.namespace` (`default` for
    /// a namespaced kind without one) and `metadata.name`, and returns its new resource version.
    ///
    /// The server sets `resourceVersion`, `uid` (kept on replace), `generation` (bumped when anything but
    /// metadata and status changes) and `creationTimestamp`; open watches get `ADDED` or `MODIFIED`. A kind the
    /// server does not know becomes a new resource type, plural `<lowercase kind>s`.
    ///
    /// # Panics
    /// When `obj` has no `apiVersion`, `kind` or `metadata.name`.
    pub fn apply(&self, obj: Value) -> String {
        let mut st = self.lock();
        let api_version = obj["apiVersion"]
            .as_str()
            .expect("fake API apply: apiVersion")
            .to_string();
        let kind = obj["kind"]
            .as_str()
            .expect("fake API apply: kind")
            .to_string();
        let name = obj["metadata"]["name"]
            .as_str()
            .expect("fake API apply: metadata.name")
            .to_string();
        let ns_given = obj["metadata"]["namespace"].as_str().map(str::to_string);
        let ty = st.type_for(&api_version, &kind, ns_given.is_some());
        let namespace = match (st.types[ty].namespaced, ns_given) {
            (true, ns) => ns.unwrap_or_else(|| "default".into()),
            (false, _) => String::new(),
        };
        let stored = st.store(ty, &namespace, &name, obj);
        stored["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Deletes an object; open watches get `DELETED` with its last state at a new resource version. Returns
    /// whether it existed. `namespace` is ignored for cluster-scoped kinds and defaults to `default` otherwise.
    pub fn delete(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> bool {
        let mut st = self.lock();
        let Some(ty) = st.find_kind(api_version, kind) else {
            return false;
        };
        let ns = if st.types[ty].namespaced {
            namespace.unwrap_or("default")
        } else {
            ""
        };
        st.remove(ty, ns, name).is_some()
    }

    /// The stored object, with `apiVersion` and `kind` (`namespace` as for [`FakeApi::delete`]).
    pub fn get(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        let st = self.lock();
        let ty = st.find_kind(api_version, kind)?;
        let ns = if st.types[ty].namespaced {
            namespace.unwrap_or("default")
        } else {
            ""
        };
        st.objects
            .get(&(ty, ns.to_string(), name.to_string()))
            .cloned()
    }

    /// Forgets the event history: every open watch gets an `ERROR` event with a `410 Expired` status and is
    /// closed, and later watches from an older resource version get the same.
    pub fn compact(&self) {
        let mut st = self.lock();
        st.compacted = st.rv;
        st.history.clear();
        let rv = st.rv;
        for w in std::mem::take(&mut st.watches) {
            let _ = w.tx.send(expired_line(rv, rv));
        }
    }

    /// Sends a `BOOKMARK` at the current resource version on every open watch that allowed bookmarks.
    pub fn bookmark(&self) {
        let mut st = self.lock();
        let rv = st.rv.to_string();
        let State { types, watches, .. } = &mut *st;
        watches.retain(|w| {
            if !w.bookmarks {
                return !w.tx.is_closed();
            }
            let t = &types[w.ty];
            let obj = json!({"kind": t.kind, "apiVersion": t.api_version(), "metadata": {"resourceVersion": rv}});
            w.tx.send(event_line("BOOKMARK", &obj)).is_ok()
        });
    }

    /// Ends every open watch stream cleanly, as a real server's watch timeout does.
    pub fn close_watches(&self) {
        self.lock().watches.clear();
    }

    /// The number of open watch streams (whose clients are still there, as far as the server knows).
    pub fn open_watches(&self) -> usize {
        let mut st = self.lock();
        st.watches.retain(|w| !w.tx.is_closed());
        st.watches.len()
    }

    /// Makes requests for `resource` (a plural, or `plural/subresource` such as `authorizationpolicies/status`)
    /// with `verb` (`get`, `list`, `watch`, `create`, `update`, `patch`, `delete`, `deletecollection`) fail with
    /// RBAC's 403 Forbidden. Open watches are not affected.
    pub fn deny(&self, resource: &str, verb: &str) {
        self.lock()
            .denied
            .insert((resource.to_string(), verb.to_string()));
    }

    /// Undoes [`FakeApi::deny`].
    pub fn allow(&self, resource: &str, verb: &str) {
        self.lock()
            .denied
            .remove(&(resource.to_string(), verb.to_string()));
    }

    /// Every request so far, oldest first.
    pub fn requests(&self) -> Vec<Request> {
        self.lock().requests.clone()
    }

    /// How many requests had this method and contained `path_contains` in their target (`path?query`), so a
    /// test can count e.g. `("GET", "watch=true")` as well as `("GET", "/api/v1/pods")`.
    pub fn count(&self, method: &str, path_contains: &str) -> usize {
        self.lock()
            .requests
            .iter()
            .filter(|r| r.method.eq_ignore_ascii_case(method) && r.target().contains(path_contains))
            .count()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere under the lock must not hide the test's own failure behind a poison error.
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        // Ending the watch streams first lets the connections finish their chunked responses.
        self.lock().watches.clear();
        let _ = self.shutdown.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Request {
    /// `path?query`, or the path alone when there is no query.
    pub fn target(&self) -> String {
        if self.query.is_empty() {
            self.path.clone()
        } else {
            format!("{}?{}", self.path, self.query)
        }
    }
}

impl ResType {
    fn new(
        group: &str,
        version: &str,
        plural: &str,
        kind: &str,
        namespaced: bool,
        crd: bool,
        status: bool,
    ) -> Self {
        ResType {
            group: group.into(),
            version: version.into(),
            plural: plural.into(),
            kind: kind.into(),
            namespaced,
            crd,
            status,
        }
    }

    fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `pods`, `leases.coordination.k8s.io`: how API errors name the resource.
    fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }
}

impl Watch {
    fn selects(&self, obj: &Value) -> bool {
        if let Some(ns) = &self.namespace
            && obj["metadata"]["namespace"].as_str() != Some(ns.as_str())
        {
            return false;
        }
        self.labels.iter().all(|r| r.matches(obj)) && self.fields.iter().all(|r| r.matches(obj))
    }

    /// What this watch sees of `ev`: modifications become `ADDED`/`DELETED` when the object enters or leaves
    /// the selectors, as on a real server.
    fn translate<'a>(&self, ev: &'a Event) -> Option<(&'static str, &'a Value)> {
        if ev.ty != self.ty {
            return None;
        }
        let now = self.selects(&ev.obj);
        let kind = match ev.kind {
            EventKind::Added => now.then_some("ADDED")?,
            EventKind::Deleted => now.then_some("DELETED")?,
            EventKind::Modified => match (ev.prev.as_ref().is_some_and(|p| self.selects(p)), now) {
                (true, true) => "MODIFIED",
                (false, true) => "ADDED",
                (true, false) => "DELETED",
                (false, false) => return None,
            },
        };
        Some((kind, &ev.obj))
    }
}

impl LabelReq {
    /// Parses a label selector as kube-rs and kubectl write it: `a=b,c!=d,e in (x,y),f notin (z),g,!h`.
    fn parse(s: &str) -> Result<Vec<LabelReq>, String> {
        split_top_level(s)
            .into_iter()
            .map(|part| {
                let p = part.trim();
                if let Some(k) = p.strip_prefix('!') {
                    return Ok(LabelReq::NotExists(k.trim().into()));
                }
                let set = |rest: &str| -> Result<Vec<String>, String> {
                    let inner = rest
                        .trim()
                        .strip_prefix('(')
                        .and_then(|r| r.strip_suffix(')'));
                    let inner =
                        inner.ok_or_else(|| format!("invalid label selector requirement {p:?}"))?;
                    Ok(inner
                        .split(',')
                        .map(|v| v.trim().to_string())
                        .filter(|v| !v.is_empty())
                        .collect())
                };
                if let Some((k, rest)) = p.split_once(" notin ") {
                    return Ok(LabelReq::NotIn(k.trim().into(), set(rest)?));
                }
                if let Some((k, rest)) = p.split_once(" in ") {
                    return Ok(LabelReq::In(k.trim().into(), set(rest)?));
                }
                if let Some((k, v)) = p.split_once("!=") {
                    return Ok(LabelReq::NotEq(k.trim().into(), v.trim().into()));
                }
                if let Some((k, v)) = p.split_once("==").or_else(|| p.split_once('=')) {
                    return Ok(LabelReq::Eq(k.trim().into(), v.trim().into()));
                }
                if p.is_empty() || p.contains(['(', ')', ' ', '<', '>']) {
                    return Err(format!("invalid label selector requirement {p:?}"));
                }
                Ok(LabelReq::Exists(p.into()))
            })
            .collect()
    }

    fn matches(&self, obj: &Value) -> bool {
        let label = |k: &str| obj["metadata"]["labels"][k].as_str().map(str::to_string);
        match self {
            LabelReq::Eq(k, v) => label(k).as_deref() == Some(v.as_str()),
            LabelReq::NotEq(k, v) => label(k).as_deref() != Some(v.as_str()),
            LabelReq::In(k, vs) => label(k).is_some_and(|l| vs.contains(&l)),
            LabelReq::NotIn(k, vs) => !label(k).is_some_and(|l| vs.contains(&l)),
            LabelReq::Exists(k) => label(k).is_some(),
            LabelReq::NotExists(k) => label(k).is_none(),
        }
    }
}

impl FieldReq {
    /// Parses `metadata.name=x,spec.nodeName!=y` (`==` is `=`). Any dotted path works; a missing field reads as
    /// the empty string, like `spec.nodeName` of an unscheduled pod.
    fn parse(s: &str) -> Result<Vec<FieldReq>, String> {
        s.split(',')
            .filter(|p| !p.trim().is_empty())
            .map(|p| {
                let (path, value, equal) = if let Some((k, v)) = p.split_once("!=") {
                    (k, v, false)
                } else if let Some((k, v)) = p.split_once("==").or_else(|| p.split_once('=')) {
                    (k, v, true)
                } else {
                    return Err(format!("invalid field selector requirement {p:?}"));
                };
                Ok(FieldReq {
                    path: path.trim().into(),
                    value: value.trim().into(),
                    equal,
                })
            })
            .collect()
    }

    fn matches(&self, obj: &Value) -> bool {
        let mut v = obj;
        for part in self.path.split('.') {
            v = &v[part];
        }
        let actual = match v {
            Value::Null => String::new(),
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        (actual == self.value) == self.equal
    }
}

impl State {
    fn new() -> Self {
        let types = vec![
            ResType::new("", "v1", "pods", "Pod", true, false, true),
            ResType::new("", "v1", "services", "Service", true, false, true),
            ResType::new("", "v1", "namespaces", "Namespace", false, false, true),
            ResType::new("", "v1", "nodes", "Node", false, false, true),
            ResType::new("", "v1", "configmaps", "ConfigMap", true, false, false),
            ResType::new("", "v1", "events", "Event", true, false, false),
            ResType::new(
                "discovery.k8s.io",
                "v1",
                "endpointslices",
                "EndpointSlice",
                true,
                false,
                false,
            ),
            ResType::new(
                "coordination.k8s.io",
                "v1",
                "leases",
                "Lease",
                true,
                false,
                false,
            ),
            ResType::new("events.k8s.io", "v1", "events", "Event", true, false, false),
            ResType::new(
                "security.sinew.dev",
                "v1alpha1",
                "authorizationpolicies",
                "AuthorizationPolicy",
                true,
                true,
                true,
            ),
            ResType::new(
                "security.sinew.dev",
                "v1alpha1",
                "peerauthentications",
                "PeerAuthentication",
                true,
                true,
                false,
            ),
        ];
        State {
            types,
            objects: BTreeMap::new(),
            rv: 1,
            compacted: 0,
            history: Vec::new(),
            watches: Vec::new(),
            denied: HashSet::new(),
            requests: Vec::new(),
            uids: 0,
        }
    }

    fn find_kind(&self, api_version: &str, kind: &str) -> Option<usize> {
        self.types
            .iter()
            .position(|t| t.api_version() == api_version && t.kind == kind)
    }

    /// The type of `apiVersion`/`kind`, registered (served like a custom resource) when it is new.
    fn type_for(&mut self, api_version: &str, kind: &str, namespaced: bool) -> usize {
        if let Some(i) = self.find_kind(api_version, kind) {
            return i;
        }
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        let plural = format!("{}s", kind.to_ascii_lowercase());
        self.types.push(ResType::new(
            group, version, &plural, kind, namespaced, true, false,
        ));
        self.types.len() - 1
    }

    /// Stores `obj` as the object `ty`/`namespace`/`name` at the next resource version, filling in the fields the
    /// server owns, and emits the event. Returns the stored object.
    fn store(&mut self, ty: usize, namespace: &str, name: &str, mut obj: Value) -> Value {
        let key = (ty, namespace.to_string(), name.to_string());
        let prev = self.objects.get(&key).cloned();
        self.rv += 1;
        let t = &self.types[ty];
        if !obj.is_object() {
            obj = json!({});
        }
        obj["apiVersion"] = json!(t.api_version());
        obj["kind"] = json!(t.kind);
        if !obj["metadata"].is_object() {
            obj["metadata"] = json!({});
        }
        let generation = match &prev {
            None => 1,
            Some(p) => {
                let old = p["metadata"]["generation"].as_i64().unwrap_or(1);
                if content(p) == content(&obj) {
                    old
                } else {
                    old + 1
                }
            }
        };
        let (uid, created) = match &prev {
            Some(p) => (
                p["metadata"]["uid"].clone(),
                p["metadata"]["creationTimestamp"].clone(),
            ),
            None => {
                self.uids += 1;
                (
                    json!(format!("6d6f636b-0000-4000-8000-{:012x}", self.uids)),
                    json!(rfc3339_now()),
                )
            }
        };
        let meta = obj["metadata"]
            .as_object_mut()
            .expect("metadata is an object");
        meta.insert("name".into(), json!(name));
        if namespace.is_empty() {
            meta.remove("namespace");
        } else {
            meta.insert("namespace".into(), json!(namespace));
        }
        meta.insert("uid".into(), uid);
        meta.insert("creationTimestamp".into(), created);
        meta.insert("generation".into(), json!(generation));
        meta.insert("resourceVersion".into(), json!(self.rv.to_string()));
        self.objects.insert(key, obj.clone());
        let kind = if prev.is_some() {
            EventKind::Modified
        } else {
            EventKind::Added
        };
        self.record(Event {
            rv: self.rv,
            ty,
            kind,
            obj: obj.clone(),
            prev,
        });
        obj
    }

    /// Removes an object; its last state, at a new resource version, goes out as `DELETED`.
    fn remove(&mut self, ty: usize, namespace: &str, name: &str) -> Option<Value> {
        let mut obj = self
            .objects
            .remove(&(ty, namespace.to_string(), name.to_string()))?;
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.record(Event {
            rv: self.rv,
            ty,
            kind: EventKind::Deleted,
            obj: obj.clone(),
            prev: None,
        });
        Some(obj)
    }

    fn record(&mut self, ev: Event) {
        self.watches.retain(|w| match w.translate(&ev) {
            Some((kind, obj)) => w.tx.send(event_line(kind, obj)).is_ok(),
            None => !w.tx.is_closed(),
        });
        self.history.push(ev);
    }

    /// Serves one request. `content_type` is the request's, for PATCH.
    fn serve(
        &mut self,
        method: &Method,
        path: &str,
        query: &str,
        content_type: &str,
        body: &[u8],
    ) -> Reply {
        self.requests.push(Request {
            method: method.to_string(),
            path: path.to_string(),
            query: query.to_string(),
            body: String::from_utf8_lossy(body).into_owned(),
        });
        let q = parse_query(query);
        let flag = |k: &str| q.get(k).is_some_and(|v| v == "true" || v == "1");
        if path == "/version" && method == Method::GET {
            return Reply::Json(StatusCode::OK, version_info());
        }
        let Some(target) = self.route(path) else {
            return not_found_path();
        };
        let verb = match (method, target.name.is_some()) {
            (&Method::GET, false) if flag("watch") => "watch",
            (&Method::GET, false) => "list",
            (&Method::GET, true) => "get",
            (&Method::POST, false) => "create",
            (&Method::PUT, true) => "update",
            (&Method::PATCH, true) => "patch",
            (&Method::DELETE, true) => "delete",
            (&Method::DELETE, false) => "deletecollection",
            _ => {
                let msg =
                    "the server does not allow this method on the requested resource".to_string();
                return error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "MethodNotAllowed",
                    msg,
                    json!({}),
                );
            }
        };
        let t = self.types[target.ty].clone();
        let resource = match &target.sub {
            Some(sub) => format!("{}/{}", t.plural, sub),
            None => t.plural.clone(),
        };
        if self.denied.contains(&(resource.clone(), verb.to_string())) {
            return forbidden(&t, &resource, verb, &target);
        }
        if let Some(sub) = &target.sub
            && !(sub == "status" && t.status)
        {
            return not_found_path();
        }
        let (labels, fields) = match (
            LabelReq::parse(q.get("labelSelector").map_or("", String::as_str)),
            FieldReq::parse(q.get("fieldSelector").map_or("", String::as_str)),
        ) {
            (Ok(l), Ok(f)) => (l, f),
            (Err(e), _) | (_, Err(e)) => {
                return error(StatusCode::BAD_REQUEST, "BadRequest", e, json!({}));
            }
        };
        let body = if matches!(verb, "create" | "update" | "patch") {
            match serde_json::from_slice::<Value>(body) {
                Ok(v) => v,
                Err(e) => {
                    let msg = format!("the request body is not valid JSON: {e}");
                    return error(StatusCode::BAD_REQUEST, "BadRequest", msg, json!({}));
                }
            }
        } else {
            Value::Null
        };
        let selector = Watch {
            ty: target.ty,
            namespace: target.namespace.clone(),
            labels,
            fields,
            bookmarks: flag("allowWatchBookmarks"),
            tx: unbounded_channel().0,
        };
        match verb {
            "list" => self.list(&t, &selector),
            "watch" => self.watch(&t, selector, &q),
            "deletecollection" => self.delete_collection(&t, &selector),
            "get" => match self.objects.get(&self.key(&target)) {
                Some(obj) => Reply::Json(StatusCode::OK, obj.clone()),
                None => not_found(&t, &target),
            },
            "create" => self.create(&t, &target, body),
            "update" => self.update(&t, &target, body),
            "patch" => self.patch(&t, &target, content_type, body),
            _ => {
                let ns = target.namespace.clone().unwrap_or_default();
                let name = target.name.clone().unwrap_or_default();
                match self.remove(target.ty, &ns, &name) {
                    Some(obj) => Reply::Json(StatusCode::OK, obj),
                    None => not_found(&t, &target),
                }
            }
        }
    }

    /// Resolves `/api/v1/...` and `/apis/{group}/{version}/...` like the real server: collections cluster-wide
    /// and per namespace, objects, subresources.
    fn route(&self, path: &str) -> Option<Target> {
        let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let (group, version, rest) = match segs.as_slice() {
            ["api", v, rest @ ..] => ("", *v, rest),
            ["apis", g, v, rest @ ..] => (*g, *v, rest),
            _ => return None,
        };
        let find = |plural: &str| {
            self.types
                .iter()
                .position(|t| t.group == group && t.version == version && t.plural == plural)
        };
        let part = |s: Option<&&str>| s.map(|s| s.to_string());
        if let ["namespaces", ns, plural, tail @ ..] = rest
            && let Some(ty) = find(plural)
            && self.types[ty].namespaced
            && tail.len() <= 2
        {
            return Some(Target {
                ty,
                namespace: Some(ns.to_string()),
                name: part(tail.first()),
                sub: part(tail.get(1)),
            });
        }
        let [plural, tail @ ..] = rest else {
            return None;
        };
        let ty = find(plural)?;
        if tail.len() > 2 || (self.types[ty].namespaced && !tail.is_empty()) {
            return None;
        }
        Some(Target {
            ty,
            namespace: None,
            name: part(tail.first()),
            sub: part(tail.get(1)),
        })
    }

    fn key(&self, target: &Target) -> Key {
        let ns = if self.types[target.ty].namespaced {
            target.namespace.clone().unwrap_or_default()
        } else {
            String::new()
        };
        (target.ty, ns, target.name.clone().unwrap_or_default())
    }

    fn selected<'a>(&'a self, sel: &'a Watch) -> impl Iterator<Item = &'a Value> + 'a {
        self.objects
            .iter()
            .filter(move |((ty, _, _), obj)| *ty == sel.ty && sel.selects(obj))
            .map(|(_, obj)| obj)
    }

    fn list(&self, t: &ResType, sel: &Watch) -> Reply {
        let items: Vec<Value> = self.selected(sel).map(|obj| list_item(t, obj)).collect();
        self.list_reply(t, items)
    }

    /// A `<Kind>List` of `items` at the current resource version.
    fn list_reply(&self, t: &ResType, items: Vec<Value>) -> Reply {
        Reply::Json(
            StatusCode::OK,
            json!({
                "kind": format!("{}List", t.kind),
                "apiVersion": t.api_version(),
                "metadata": {"resourceVersion": self.rv.to_string()},
                "items": items,
            }),
        )
    }

    fn delete_collection(&mut self, t: &ResType, sel: &Watch) -> Reply {
        let keys: Vec<Key> = self
            .objects
            .iter()
            .filter(|((ty, _, _), obj)| *ty == sel.ty && sel.selects(obj))
            .map(|(k, _)| k.clone())
            .collect();
        let items: Vec<Value> = keys
            .into_iter()
            .filter_map(|(ty, ns, name)| self.remove(ty, &ns, &name))
            .map(|obj| list_item(t, &obj))
            .collect();
        self.list_reply(t, items)
    }

    /// Opens a watch: replays what happened after its resource version (all current objects as `ADDED` from
    /// `0`, as a real server does), then registers it for live events. All under the lock, so nothing is missed
    /// or sent twice.
    fn watch(&mut self, t: &ResType, mut w: Watch, q: &BTreeMap<String, String>) -> Reply {
        let (tx, rx) = unbounded_channel();
        w.tx = tx;
        let timeout = q
            .get("timeoutSeconds")
            .and_then(|s| s.parse::<u64>().ok())
            .map(Duration::from_secs);
        let rv = q.get("resourceVersion").map_or("", String::as_str);
        let initial = q.get("sendInitialEvents").is_some_and(|v| v == "true");
        if rv.is_empty() || rv == "0" || initial {
            for obj in self.selected(&w) {
                let _ = w.tx.send(event_line("ADDED", obj));
            }
            if initial && w.bookmarks {
                let bm = json!({
                    "kind": t.kind,
                    "apiVersion": t.api_version(),
                    "metadata": {
                        "resourceVersion": self.rv.to_string(),
                        "annotations": {"k8s.io/initial-events-end": "true"},
                    },
                });
                let _ = w.tx.send(event_line("BOOKMARK", &bm));
            }
        } else {
            let Ok(from) = rv.parse::<u64>() else {
                let msg = format!("invalid resource version {rv:?}");
                return error(StatusCode::BAD_REQUEST, "BadRequest", msg, json!({}));
            };
            if from < self.compacted {
                // A real server answers 200 and sends the error as the stream's only event.
                let _ = w.tx.send(expired_line(from, self.compacted));
                return Reply::Watch(rx, timeout);
            }
            for ev in self.history.iter().filter(|ev| ev.rv > from) {
                if let Some((kind, obj)) = w.translate(ev) {
                    let _ = w.tx.send(event_line(kind, obj));
                }
            }
        }
        self.watches.push(w);
        Reply::Watch(rx, timeout)
    }

    fn create(&mut self, t: &ResType, target: &Target, mut body: Value) -> Reply {
        if let Some(r) = check_type(t, &body) {
            return r;
        }
        let ns = target.namespace.clone().unwrap_or_default();
        if let Some(body_ns) = body["metadata"]["namespace"].as_str()
            && t.namespaced
            && body_ns != ns
        {
            let msg = "the namespace of the provided object does not match the namespace sent on the request";
            return error(StatusCode::BAD_REQUEST, "BadRequest", msg.into(), json!({}));
        }
        let name = match (
            body["metadata"]["name"].as_str(),
            body["metadata"]["generateName"].as_str(),
        ) {
            (Some(n), _) if !n.is_empty() => n.to_string(),
            (_, Some(prefix)) => format!("{prefix}{:05x}", self.rv),
            _ => {
                let msg = format!(
                    "{} \"\" is invalid: metadata.name: Required value: name or generateName is required",
                    t.kind
                );
                return error(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Invalid",
                    msg,
                    json!({"kind": t.kind}),
                );
            }
        };
        let target = Target {
            ty: target.ty,
            namespace: target.namespace.clone(),
            name: Some(name.clone()),
            sub: None,
        };
        if self.objects.contains_key(&self.key(&target)) {
            let msg = format!("{} \"{name}\" already exists", t.qualified());
            return error(
                StatusCode::CONFLICT,
                "AlreadyExists",
                msg,
                details(t, Some(&name)),
            );
        }
        if t.status
            && let Some(o) = body.as_object_mut()
        {
            // A status subresource makes creates ignore the status, as a real server does.
            o.remove("status");
        }
        let stored = self.store(target.ty, if t.namespaced { &ns } else { "" }, &name, body);
        Reply::Json(StatusCode::CREATED, stored)
    }

    fn update(&mut self, t: &ResType, target: &Target, body: Value) -> Reply {
        if let Some(r) = check_type(t, &body) {
            return r;
        }
        let key = self.key(target);
        let name = key.2.clone();
        if body["metadata"]["name"].as_str().is_some_and(|n| n != name) {
            let msg = "the name of the object does not match the name on the URL".to_string();
            return error(StatusCode::BAD_REQUEST, "BadRequest", msg, json!({}));
        }
        let Some(current) = self.objects.get(&key).cloned() else {
            return not_found(t, target);
        };
        if let Some(r) = precondition(t, &name, &current, &body) {
            return r;
        }
        let new = merge_for_write(t, target, &current, body);
        let stored = self.store(key.0, &key.1, &key.2, new);
        Reply::Json(StatusCode::OK, stored)
    }

    fn patch(&mut self, t: &ResType, target: &Target, content_type: &str, patch: Value) -> Reply {
        let key = self.key(target);
        let name = key.2.clone();
        let media = content_type.split(';').next().unwrap_or("").trim();
        let current = match self.objects.get(&key).cloned() {
            Some(c) => c,
            // Server-side apply creates what is missing.
            None if media == "application/apply-patch+yaml" && target.sub.is_none() => {
                let mut body = patch;
                if t.status
                    && let Some(o) = body.as_object_mut()
                {
                    o.remove("status");
                }
                let stored = self.store(key.0, &key.1, &key.2, body);
                return Reply::Json(StatusCode::CREATED, stored);
            }
            None => return not_found(t, target),
        };
        let mut patched = current.clone();
        match media {
            "application/merge-patch+json"
            | "application/strategic-merge-patch+json"
            | "application/apply-patch+yaml" => {
                if let Some(r) = precondition(t, &name, &current, &patch) {
                    return r;
                }
                merge_patch(&mut patched, &patch);
            }
            "application/json-patch+json" => {
                if let Err(msg) = json_patch(&mut patched, &patch) {
                    return error(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "Invalid",
                        msg,
                        details(t, Some(&name)),
                    );
                }
            }
            other => {
                let msg = format!(
                    "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml (got {other:?})"
                );
                return error(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "UnsupportedMediaType",
                    msg,
                    json!({}),
                );
            }
        }
        let new = merge_for_write(t, target, &current, patched);
        let stored = self.store(key.0, &key.1, &key.2, new);
        Reply::Json(StatusCode::OK, stored)
    }
}

/// Accepts connections until shutdown, then lets open connections finish for a moment.
async fn serve(
    listener: std::net::TcpListener,
    shared: Arc<Mutex<State>>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("fake API: listener: {e}");
            return;
        }
    };
    let mut conns = tokio::task::JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    eprintln!("fake API: accept: {e}");
                    continue;
                }
            },
            _ = async { drop(shutdown.wait_for(|stop| *stop).await) } => break,
        };
        let shared = shared.clone();
        let mut stop = shutdown.clone();
        conns.spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(&shared, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = async { drop(stop.wait_for(|stop| *stop).await) } => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
}

async fn handle(shared: &Mutex<State>, req: hyper::Request<Incoming>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let content_type = parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let reply = shared.lock().unwrap_or_else(|e| e.into_inner()).serve(
        &parts.method,
        parts.uri.path(),
        parts.uri.query().unwrap_or(""),
        &content_type,
        &body,
    );
    let (status, body) = match reply {
        Reply::Json(status, v) => {
            let bytes = serde_json::to_vec(&v).expect("JSON value serializes");
            (status, Full::new(Bytes::from(bytes)).boxed_unsync())
        }
        Reply::Watch(rx, timeout) => (StatusCode::OK, watch_body(rx, timeout)),
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// A chunked body that carries a watch's event lines until the server drops the sender (close, compaction,
/// shutdown) or `timeoutSeconds` passes.
fn watch_body(rx: UnboundedReceiver<Bytes>, timeout: Option<Duration>) -> Body {
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let stream = futures::stream::unfold(rx, move |mut rx| async move {
        let next = match deadline {
            Some(d) => tokio::select! {
                m = rx.recv() => m,
                _ = tokio::time::sleep_until(d) => None,
            },
            None => rx.recv().await,
        };
        next.map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    StreamBody::new(stream).boxed_unsync()
}

/// Everything but metadata and status: what a generation counts.
fn content(obj: &Value) -> Value {
    let mut c = obj.clone();
    if let Some(o) = c.as_object_mut() {
        o.remove("metadata");
        o.remove("status");
        o.remove("apiVersion");
        o.remove("kind");
    }
    c
}

/// The object a write through `target` stores: a status subresource write changes only the status, a main
/// resource write of a type with a status subresource keeps the old status.
fn merge_for_write(t: &ResType, target: &Target, current: &Value, written: Value) -> Value {
    if target.sub.is_some() {
        let mut new = current.clone();
        match written.get("status") {
            Some(s) if !s.is_null() => new["status"] = s.clone(),
            _ => {
                if let Some(o) = new.as_object_mut() {
                    o.remove("status");
                }
            }
        }
        return new;
    }
    let mut new = written;
    if !new.is_object() {
        new = json!({});
    }
    if t.status {
        match current.get("status") {
            Some(s) => new["status"] = s.clone(),
            None => {
                new.as_object_mut().map(|o| o.remove("status"));
            }
        }
    }
    new
}

/// `409 Conflict` when `body` names a resource version other than the current one.
fn precondition(t: &ResType, name: &str, current: &Value, body: &Value) -> Option<Reply> {
    let want = body["metadata"]["resourceVersion"]
        .as_str()
        .filter(|s| !s.is_empty())?;
    if Some(want) == current["metadata"]["resourceVersion"].as_str() {
        return None;
    }
    let msg = format!(
        "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
        t.qualified()
    );
    Some(error(
        StatusCode::CONFLICT,
        "Conflict",
        msg,
        details(t, Some(name)),
    ))
}

/// `400` when the body names another type.
fn check_type(t: &ResType, body: &Value) -> Option<Reply> {
    let av = body["apiVersion"].as_str();
    let kind = body["kind"].as_str();
    if av.is_some_and(|av| av != t.api_version()) || kind.is_some_and(|k| k != t.kind) {
        let msg = format!(
            "the API version in the data ({}) does not match the expected API version ({}) or kind {} is not {}",
            av.unwrap_or(""),
            t.api_version(),
            kind.unwrap_or(""),
            t.kind
        );
        return Some(error(StatusCode::BAD_REQUEST, "BadRequest", msg, json!({})));
    }
    None
}

/// A list item: built-in types' items have no `apiVersion`/`kind` in a real server's JSON lists; custom
/// resources' do.
fn list_item(t: &ResType, obj: &Value) -> Value {
    let mut item = obj.clone();
    if !t.crd
        && let Some(o) = item.as_object_mut()
    {
        o.remove("apiVersion");
        o.remove("kind");
    }
    item
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let t = target.as_object_mut().expect("just made an object");
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// RFC 6902 JSON patch: `add`, `remove`, `replace`, `test`.
fn json_patch(target: &mut Value, patch: &Value) -> Result<(), String> {
    let ops = patch.as_array().ok_or("a JSON patch must be an array")?;
    for op in ops {
        let path = op["path"]
            .as_str()
            .ok_or("JSON patch operation without path")?;
        match op["op"].as_str().unwrap_or("") {
            "test" => {
                if target.pointer(path) != Some(&op["value"]) {
                    return Err(format!("testing value {path} failed"));
                }
            }
            "replace" => {
                *target
                    .pointer_mut(path)
                    .ok_or_else(|| format!("replace {path}: missing"))? = op["value"].clone();
            }
            "add" | "remove" => {
                let (parent, last) = path
                    .rsplit_once('/')
                    .ok_or_else(|| format!("invalid path {path}"))?;
                let last = last.replace("~1", "/").replace("~0", "~");
                let p = target
                    .pointer_mut(parent)
                    .ok_or_else(|| format!("{path}: missing parent"))?;
                let add = op["op"] == "add";
                match p {
                    Value::Object(m) if add => {
                        m.insert(last, op["value"].clone());
                    }
                    Value::Object(m) => {
                        m.remove(&last)
                            .ok_or_else(|| format!("remove {path}: missing"))?;
                    }
                    Value::Array(a) => {
                        let i = if last == "-" {
                            a.len()
                        } else {
                            last.parse().map_err(|_| format!("{path}: bad index"))?
                        };
                        if add && i <= a.len() {
                            a.insert(i, op["value"].clone());
                        } else if !add && i < a.len() {
                            a.remove(i);
                        } else {
                            return Err(format!("{path}: index out of range"));
                        }
                    }
                    _ => return Err(format!("{path}: parent is not a container")),
                }
            }
            other => return Err(format!("unsupported JSON patch operation {other:?}")),
        }
    }
    Ok(())
}

fn event_line(kind: &str, obj: &Value) -> Bytes {
    let mut line =
        serde_json::to_vec(&json!({"type": kind, "object": obj})).expect("JSON value serializes");
    line.push(b'\n');
    Bytes::from(line)
}

/// The `ERROR` event a watch from a compacted resource version gets.
fn expired_line(from: u64, oldest: u64) -> Bytes {
    let status = status_body(
        410,
        "Expired",
        format!("too old resource version: {from} ({oldest})"),
        json!({}),
    );
    event_line("ERROR", &status)
}

fn status_body(code: u16, reason: &str, message: String, details: Value) -> Value {
    let mut s = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    });
    if details.as_object().is_some_and(|d| !d.is_empty()) {
        s["details"] = details;
    }
    s
}

fn error(code: StatusCode, reason: &str, message: String, details: Value) -> Reply {
    Reply::Json(code, status_body(code.as_u16(), reason, message, details))
}

/// `details` as a real server fills them: the object's name, the API group (omitted when empty), the plural.
fn details(t: &ResType, name: Option<&str>) -> Value {
    let mut d = Map::new();
    if let Some(n) = name {
        d.insert("name".into(), json!(n));
    }
    if !t.group.is_empty() {
        d.insert("group".into(), json!(t.group));
    }
    d.insert("kind".into(), json!(t.plural));
    Value::Object(d)
}

fn not_found(t: &ResType, target: &Target) -> Reply {
    let name = target.name.as_deref().unwrap_or("");
    let msg = format!("{} \"{name}\" not found", t.qualified());
    error(
        StatusCode::NOT_FOUND,
        "NotFound",
        msg,
        details(t, Some(name)),
    )
}

fn not_found_path() -> Reply {
    let msg = "the server could not find the requested resource".to_string();
    error(StatusCode::NOT_FOUND, "NotFound", msg, json!({}))
}

/// RBAC's 403, worded like the real authorizer's.
fn forbidden(t: &ResType, resource: &str, verb: &str, target: &Target) -> Reply {
    let what = match &target.name {
        Some(n) => format!("{} \"{n}\"", t.qualified()),
        None => t.qualified(),
    };
    let scope = match &target.namespace {
        Some(ns) => format!("in the namespace \"{ns}\""),
        None => "at the cluster scope".to_string(),
    };
    let msg = format!(
        "{what} is forbidden: User \"{USER}\" cannot {verb} resource \"{resource}\" in API group \"{}\" {scope}",
        t.group
    );
    error(
        StatusCode::FORBIDDEN,
        "Forbidden",
        msg,
        details(t, target.name.as_deref()),
    )
}

fn version_info() -> Value {
    json!({
        "major": "1",
        "minor": "34",
        "gitVersion": "v1.34.0-sinew-fake",
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-01-01T00:00:00Z",
        "goVersion": "go1.24",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

/// Splits at commas outside parentheses: `a in (x,y),b` is two requirements.
fn split_top_level(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts.into_iter().filter(|p| !p.trim().is_empty()).collect()
}

fn parse_query(q: &str) -> BTreeMap<String, String> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Now as RFC 3339 UTC (`2025-01-31T12:00:00Z`), like `metadata.creationTimestamp`.
fn rfc3339_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
