//! The file source: a directory of Kubernetes YAML standing in for the API server on one machine.
//!
//! Every `*.yaml` / `*.yml` file directly in the directory is a multi-document YAML stream of `v1 Service`,
//! `discovery.k8s.io/v1 EndpointSlice`, `v1 Pod`, `v1 Namespace`, and `security.sinew.dev/v1alpha1
//! AuthorizationPolicy` and `PeerAuthentication` objects (a `v1 List` of them also works, as printed by `kubectl get -o yaml`).
//!
//! An object is the unit of acceptance, as with `kubectl apply -f`: [`FileSource::load`] applies every object
//! of a file that parses and validates, and rejects a bad one alone, keeping that object's last accepted version
//! from the same file in force (a new bad object contributes nothing). A file that cannot be read or split into
//! YAML documents at all keeps all its last accepted content, since nothing in it can be told apart. Objects
//! defined in two files are resolved in favour of the file that already held them, so adding a conflicting
//! file never disturbs what is running. [`Watcher`] tells the agent's poll loop when to call `load` again.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::hash::{Hash, Hasher};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_yaml::Value;

use super::{Object, ObjectKey, Snapshot, SourceError};
use crate::k8s::{EndpointSlice, Pod, Service};
use crate::peerauth::{self, PeerAuthentication};
use crate::policy::{self, AuthorizationPolicy};

/// What one file yields: its documents, or, when it cannot be read or split into YAML documents at all, every
/// error found in it (then the file's last accepted content stays in force as a whole).
pub type FileResult = Result<ParsedFile, Vec<SourceError>>;

/// A file that could be split into documents: what each object became, in file order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ParsedFile {
    pub entries: Vec<Entry>,
    /// Every object that was rejected, each naming the object (or its document) and the field.
    pub errors: Vec<SourceError>,
}

/// One object of a file.
#[derive(Clone, Debug, PartialEq)]
pub enum Entry {
    /// Parsed and valid.
    Accepted(Box<Object>),
    /// Rejected, but its kind, namespace and name could be read: its last accepted version (from this file)
    /// stays in force.
    Rejected(ObjectKey),
    /// Rejected, of a kind this source does not read (a `Deployment`): it cannot be any object that was
    /// accepted, so it keeps nothing in force.
    Unsupported,
    /// Rejected, and not even its identity could be read (no kind or name, a broken `List`): it could be any
    /// object, so every object the file held before and does not define now stays in force.
    Unidentified,
}

impl ParsedFile {
    /// The objects that were accepted, in file order.
    pub fn objects(&self) -> impl Iterator<Item = &Object> {
        self.entries.iter().filter_map(|e| match e {
            Entry::Accepted(object) => Some(&**object),
            _ => None,
        })
    }

    /// What the file contributes now, given what it contributed before (`previous`): the accepted objects, and
    /// for each rejected one its previous version, at its place in the file. An object that is accepted once
    /// is not brought back by a rejected duplicate of it.
    fn merge(self, previous: &[Object]) -> Vec<Object> {
        let accepted: BTreeSet<ObjectKey> = self.objects().map(Object::key).collect();
        let unidentified = self.entries.contains(&Entry::Unidentified);
        let mut restored = BTreeSet::new();
        let mut objects = Vec::new();
        let mut mentioned = accepted.clone();
        for entry in self.entries {
            match entry {
                Entry::Accepted(object) => objects.push(*object),
                Entry::Rejected(key) => {
                    let old = previous.iter().find(|o| o.key() == key);
                    if let Some(old) = old.filter(|_| !accepted.contains(&key)) {
                        if restored.insert(key.clone()) {
                            objects.push(old.clone());
                        }
                    }
                    mentioned.insert(key);
                }
                Entry::Unsupported | Entry::Unidentified => {}
            }
        }
        if unidentified {
            objects.extend(
                previous
                    .iter()
                    .filter(|o| !mentioned.contains(&o.key()))
                    .cloned(),
            );
        }
        objects
    }
}

/// The file source. It remembers the last accepted content of every file between loads.
#[derive(Debug)]
pub struct FileSource {
    dir: PathBuf,
    /// The accepted state: for each file, the objects it contributes. Never holds the same object twice.
    last_good: BTreeMap<PathBuf, Vec<Object>>,
}

/// Polls a directory for changes to its YAML files, without an inotify dependency.
#[derive(Debug)]
pub struct Watcher {
    dir: PathBuf,
    last: Option<u64>,
}

impl FileSource {
    /// A source with nothing accepted yet; the first [`load`](Self::load) reads the directory.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        FileSource {
            dir: dir.into(),
            last_good: BTreeMap::new(),
        }
    }

    /// The accepted objects, in file order.
    pub fn snapshot(&self) -> Snapshot {
        let mut snapshot = Snapshot::default();
        for object in self.last_good.values().flatten() {
            snapshot.push(object.clone());
        }
        snapshot
    }

    /// Reads the directory again and returns the objects now in force, with everything that is rejected.
    ///
    /// Each object that parses and validates replaces its previous version; one that fails keeps its last
    /// version accepted from the same file (a new bad object contributes nothing); an object no longer in its
    /// file goes away, and so do a deleted file's objects. A file that cannot be read or split into YAML
    /// documents keeps all its last accepted content. An object in two files stays with the file that held it
    /// before, or else with the file whose name sorts first; the other file's copy is rejected (alone). Errors
    /// are returned on every call for as long as the input is bad. If the directory itself cannot be read,
    /// everything accepted so far stays in force.
    pub fn load(&mut self) -> (Snapshot, Vec<SourceError>) {
        let files = match read_dir(&self.dir) {
            Ok(files) => files,
            Err(e) => return (self.snapshot(), vec![e]),
        };
        let mut errors = Vec::new();
        let mut current = BTreeMap::new();
        for (path, result) in files {
            let previous = self.last_good.get(&path).map_or(&[][..], Vec::as_slice);
            let objects = match result {
                Ok(parsed) => {
                    errors.extend(parsed.errors.iter().cloned());
                    parsed.merge(previous)
                }
                Err(file_errors) => {
                    errors.extend(file_errors);
                    previous.to_vec()
                }
            };
            if !objects.is_empty() {
                current.insert(path, objects);
            }
        }
        self.resolve_duplicates(&mut current, &mut errors);
        // Stable sort: a file's errors stay in document order.
        errors.sort_by(|a, b| a.file.cmp(&b.file));
        self.last_good = current;
        (self.snapshot(), errors)
    }

    /// Keeps each object defined in several files in one of them: the file that held it before, or else the
    /// file whose name sorts first. The other copies are rejected, one object at a time.
    ///
    /// One pass is enough: a losing copy never had an accepted version in its file (the accepted state has no
    /// duplicates, and a file that held the object before wins), so rejecting it restores nothing that could
    /// conflict again.
    fn resolve_duplicates(
        &self,
        current: &mut BTreeMap<PathBuf, Vec<Object>>,
        errors: &mut Vec<SourceError>,
    ) {
        let mut holders: BTreeMap<ObjectKey, Vec<&PathBuf>> = BTreeMap::new();
        for (path, objects) in current.iter() {
            for object in objects {
                holders.entry(object.key()).or_default().push(path);
            }
        }
        // loser file -> (object, winner file)
        let mut losers: BTreeMap<PathBuf, Vec<(ObjectKey, PathBuf)>> = BTreeMap::new();
        for (key, files) in holders.into_iter().filter(|(_, f)| f.len() > 1) {
            let held_before = |path: &PathBuf| {
                self.last_good
                    .get(path)
                    .is_some_and(|objects| objects.iter().any(|o| o.key() == key))
            };
            // `files` is in name order, so the fallback is the file that sorts first.
            let winner = files
                .iter()
                .copied()
                .find(|p| held_before(p))
                .unwrap_or(files[0]);
            for file in files.iter().copied().filter(|&f| f != winner) {
                losers
                    .entry(file.clone())
                    .or_default()
                    .push((key.clone(), winner.clone()));
            }
        }
        for (path, duplicates) in losers {
            for (key, winner) in &duplicates {
                let winner = winner.file_name().map_or_else(
                    || winner.display().to_string(),
                    |n| n.to_string_lossy().into_owned(),
                );
                errors.push(SourceError {
                    file: path.clone(),
                    object: key.to_string(),
                    reason: format!("duplicate (also in {winner})"),
                });
            }
            if let Some(objects) = current.get_mut(&path) {
                objects.retain(|o| !duplicates.iter().any(|(key, _)| *key == o.key()));
                if objects.is_empty() {
                    current.remove(&path);
                }
            }
        }
    }
}

impl Watcher {
    /// A watcher that has seen nothing yet, so its first [`changed`](Self::changed) is true.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Watcher {
            dir: dir.into(),
            last: None,
        }
    }

    /// Whether the directory's YAML files differ from the last call (always true on the first call).
    pub fn changed(&mut self) -> bool {
        let now = fingerprint(&self.dir);
        let changed = self.last != Some(now);
        self.last = Some(now);
        changed
    }
}

/// Reads every YAML file directly in `dir`, in name order. A file that vanishes between listing and reading
/// is left out, as if it had been deleted before. The error is for a directory that cannot be listed.
pub fn read_dir(dir: &Path) -> Result<BTreeMap<PathBuf, FileResult>, SourceError> {
    let paths = yaml_files(dir).map_err(|e| SourceError {
        file: dir.to_owned(),
        object: "directory".to_owned(),
        reason: e.to_string(),
    })?;
    let mut files = BTreeMap::new();
    for path in paths {
        if let Some(result) = read_file(&path) {
            files.insert(path, result);
        }
    }
    Ok(files)
}

/// Reads and parses one file; `None` if it does not exist (any more).
pub fn read_file(path: &Path) -> Option<FileResult> {
    match fs::read_to_string(path) {
        Ok(text) => Some(parse_file(path, &text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => Some(Err(vec![SourceError {
            file: path.to_owned(),
            object: "file".to_owned(),
            reason: e.to_string(),
        }])),
    }
}

/// Parses a file's text: a stream of YAML documents, each an object or a `v1 List` of objects. Empty
/// documents are skipped. `path` is only used to name the file in errors.
///
/// Every object is converted and validated on its own, and every rejection is reported. A YAML syntax error
/// ends the stream (the parser cannot resynchronise after one), so then the file as a whole is an error.
pub fn parse_file(path: &Path, text: &str) -> FileResult {
    let mut parsed = ParsedFile::default();
    let mut error = |object: String, reason: String| {
        parsed.errors.push(SourceError {
            file: path.to_owned(),
            object,
            reason,
        })
    };
    let mut entries = Vec::new();
    // Where each object was first seen, to name it in a duplicate error.
    let mut seen: HashMap<ObjectKey, String> = HashMap::new();
    for (i, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let place = format!("document {}", i + 1);
        let mut value = match Value::deserialize(document) {
            Ok(value) => value,
            Err(e) => {
                error(place, e.to_string());
                return Err(parsed.errors);
            }
        };
        if let Err(e) = value.apply_merge() {
            let name = describe(&value).unwrap_or_else(|| place.clone());
            error(name, e.to_string());
            entries.push(identify(&value));
            continue;
        }
        let items = match split_list(value) {
            Ok(items) => items,
            Err(reason) => {
                error(place, reason);
                entries.push(Entry::Unidentified);
                continue;
            }
        };
        for (item, value) in items {
            let place = match item {
                Some(j) => format!("{place} items[{j}]"),
                None => place.clone(),
            };
            let name = describe(&value).unwrap_or_else(|| place.clone());
            let identity = identify(&value);
            if item.is_some() && value.get("kind").and_then(Value::as_str) == Some("List") {
                error(name, "a List inside a List is not supported".to_owned());
                entries.push(Entry::Unidentified);
                continue;
            }
            let origin = item.is_none().then_some((text, i));
            let object = match to_object(value, origin) {
                Ok(object) => object,
                Err(reason) => {
                    error(name, reason);
                    entries.push(identity);
                    continue;
                }
            };
            if let Err(reason) = object.validate() {
                error(name, reason);
                // From the document, not the object: a missing name must not read as the name "".
                entries.push(identity);
                continue;
            }
            let key = object.key();
            if let Some(first) = seen.get(&key) {
                error(name, format!("duplicate (also {first} of this file)"));
                entries.push(Entry::Rejected(key));
                continue;
            }
            seen.insert(key, place);
            entries.push(Entry::Accepted(Box::new(object)));
        }
    }
    parsed.entries = entries;
    Ok(parsed)
}

/// A hash of the names, metadata and contents of the YAML files in `dir`. It changes when any of them is
/// created, deleted, renamed or rewritten, even within the same second at the same size, because the contents
/// are hashed too (the files are small, so that is cheap at our poll rate).
///
/// Metadata follows symlinks, so an atomic swap of a ConfigMap mount's `..data` link is seen as well.
pub fn fingerprint(dir: &Path) -> u64 {
    // DefaultHasher::new() uses fixed keys, so fingerprints compare equal across calls.
    let mut hasher = DefaultHasher::new();
    match yaml_files(dir) {
        Err(e) => e.kind().hash(&mut hasher),
        Ok(paths) => {
            for path in paths {
                path.hash(&mut hasher);
                match fs::metadata(&path) {
                    Ok(meta) => {
                        (meta.dev(), meta.ino(), meta.len()).hash(&mut hasher);
                        (meta.mtime(), meta.mtime_nsec()).hash(&mut hasher);
                    }
                    Err(e) => e.kind().hash(&mut hasher),
                }
                match fs::read(&path) {
                    Ok(bytes) => bytes.hash(&mut hasher),
                    Err(e) => e.kind().hash(&mut hasher),
                }
            }
        }
    }
    hasher.finish()
}

/// The `*.yaml` / `*.yml` regular files (or symlinks to them) directly in `dir`, sorted by name.
fn yaml_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut paths = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let is_yaml = path
            .extension()
            .is_some_and(|ext| ext == "yaml" || ext == "yml");
        // fs::metadata follows symlinks; a dangling one (such as an editor's lock link) is not a file.
        if is_yaml && fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            paths.push(path);
        }
    }
    paths.sort();
    Ok(paths)
}

/// One document's objects, each with its index in `items` when the document is a `v1 List`. An empty
/// document has none.
fn split_list(value: Value) -> Result<Vec<(Option<usize>, Value)>, String> {
    if value.is_null() {
        return Ok(Vec::new());
    }
    if value.get("kind").and_then(Value::as_str) != Some("List") {
        return Ok(vec![(None, value)]);
    }
    if value.get("apiVersion").and_then(Value::as_str) != Some("v1") {
        return Err("kind List needs apiVersion v1".to_owned());
    }
    let items = match value.get("items") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Sequence(items)) => items.clone(),
        Some(_) => return Err("items is not a list".to_owned()),
    };
    Ok(items
        .into_iter()
        .enumerate()
        .map(|(j, v)| (Some(j), v))
        .collect())
}

/// The kind, namespace and name a document says it has, even when it does not convert; the namespace as the
/// object's [`ObjectKey`] would have it (`default` when absent, none for a cluster-scoped Namespace).
fn claimed_identity(value: &Value) -> Option<(&str, String, &str)> {
    let kind = value.get("kind")?.as_str()?;
    let meta = value.get("metadata")?;
    let name = meta.get("name")?.as_str().filter(|n| !n.is_empty())?;
    let namespace = match meta.get("namespace") {
        None | Some(Value::Null) => "default",
        Some(ns) => ns.as_str()?,
    };
    let namespace = match kind {
        "Namespace" => "",
        // The policy type reads an empty namespace as `default` too.
        policy::KIND | peerauth::KIND if namespace.is_empty() => "default",
        _ => namespace,
    };
    Some((kind, namespace.to_owned(), name))
}

/// `Service default/web` for a document that says what it is, even when it does not convert.
fn describe(value: &Value) -> Option<String> {
    let (kind, namespace, name) = claimed_identity(value)?;
    Some(if namespace.is_empty() {
        format!("{kind} {name}")
    } else {
        format!("{kind} {namespace}/{name}")
    })
}

/// What a rejected document stands for: the object it says it is, if that can be read.
fn identify(value: &Value) -> Entry {
    let Some((kind, namespace, name)) = claimed_identity(value) else {
        return Entry::Unidentified;
    };
    let kind = match kind {
        "Service" => "Service",
        "EndpointSlice" => "EndpointSlice",
        "Pod" => "Pod",
        "Namespace" => "Namespace",
        policy::KIND => policy::KIND,
        peerauth::KIND => peerauth::KIND,
        _ => return Entry::Unsupported,
    };
    Entry::Rejected(ObjectKey {
        kind,
        namespace,
        name: name.to_owned(),
    })
}

/// Converts a document to the object its `apiVersion` and `kind` say it is. `origin` is the file's text and
/// the document's index in it, when the object is a whole document (not an item of a List).
fn to_object(value: Value, origin: Option<(&str, usize)>) -> Result<Object, String> {
    if !value.is_mapping() {
        return Err("not a YAML mapping (expected a Kubernetes object)".to_owned());
    }
    let api_version = value
        .get("apiVersion")
        .and_then(Value::as_str)
        .ok_or("missing apiVersion")?
        .to_owned();
    let kind = value
        .get("kind")
        .and_then(Value::as_str)
        .ok_or("missing kind")?
        .to_owned();
    let expected = match kind.as_str() {
        "Service" | "Pod" | "Namespace" => "v1",
        "EndpointSlice" => "discovery.k8s.io/v1",
        policy::KIND => policy::API_VERSION,
        peerauth::KIND => peerauth::API_VERSION,
        _ => return Err(format!("unsupported kind {kind} ({api_version})")),
    };
    if api_version != expected {
        return Err(format!(
            "unsupported apiVersion {api_version} for {kind} (expected {expected})"
        ));
    }
    let object = match kind.as_str() {
        "Service" => serde_yaml::from_value(value).map(Object::Service),
        "Pod" => serde_yaml::from_value(value).map(Object::Pod),
        "Namespace" => serde_yaml::from_value(value).map(Object::Namespace),
        policy::KIND => serde_yaml::from_value(value).map(Object::AuthorizationPolicy),
        peerauth::KIND => serde_yaml::from_value(value).map(Object::PeerAuthentication),
        _ => serde_yaml::from_value(value).map(Object::EndpointSlice),
    };
    object.map_err(|e| {
        origin
            .and_then(|(text, index)| error_in_text(text, index, &kind))
            .unwrap_or_else(|| e.to_string())
    })
}

/// serde_yaml names the field (`spec.ports[0].port: ...`) and the line only when it deserializes from text,
/// not from a `Value`. So when a document fails to convert, it is read again from the text for the message.
fn error_in_text(text: &str, index: usize, kind: &str) -> Option<String> {
    let document = serde_yaml::Deserializer::from_str(text).nth(index)?;
    let result = match kind {
        "Service" => Service::deserialize(document).map(drop),
        "Pod" => Pod::deserialize(document).map(drop),
        "EndpointSlice" => EndpointSlice::deserialize(document).map(drop),
        "Namespace" => crate::k8s::Namespace::deserialize(document).map(drop),
        policy::KIND => AuthorizationPolicy::deserialize(document).map(drop),
        peerauth::KIND => PeerAuthentication::deserialize(document).map(drop),
        _ => return None,
    };
    result.err().map(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A scratch directory under the system temp dir, removed when the test ends, pass or fail.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path =
                std::env::temp_dir().join(format!("sinew-file-source-{}-{n}", std::process::id()));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(&path).unwrap();
            TempDir(path)
        }

        fn write(&self, name: &str, text: &str) {
            fs::write(self.0.join(name), text).unwrap();
        }

        fn remove(&self, name: &str) {
            fs::remove_file(self.0.join(name)).unwrap();
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn svc(name: &str, ip: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{clusterIP: {ip}, ports: [{{port: 80}}]}}\n---\n"
        )
    }

    fn names(snapshot: &Snapshot) -> Vec<String> {
        snapshot
            .services
            .iter()
            .map(|s| {
                format!(
                    "{}={}",
                    s.metadata.name,
                    s.spec.cluster_ip.as_deref().unwrap_or("")
                )
            })
            .collect()
    }

    fn messages(errors: &[SourceError]) -> Vec<String> {
        errors
            .iter()
            .map(|e| {
                let file = e.file.file_name().unwrap().to_string_lossy();
                format!("{file}: {}: {}", e.object, e.reason)
            })
            .collect()
    }

    const REALISTIC: &str = r#"
# The demo's web service, as kubectl would print it (extra fields included).
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
  labels: {app: web}
  resourceVersion: "123"
  uid: 6f1c
spec:
  type: ClusterIP
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10]
  internalTrafficPolicy: Cluster
  ipFamilies: [IPv4]
  ports:
    - name: http
      port: 80
      targetPort: http
      protocol: TCP
  selector:
    app: web
status:
  loadBalancer: {}
---
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abcde
  namespace: shop
  labels:
    kubernetes.io/service-name: web
    endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io
addressType: IPv4
endpoints:
  - addresses: [10.244.0.11]
    conditions: {ready: true, serving: true, terminating: false}
    nodeName: node-a
    zone: zone-1
    targetRef: {kind: Pod, namespace: shop, name: web-1, uid: 0d2c-41f6}
ports:
  - {name: http, port: 8080, protocol: TCP}
---
apiVersion: v1
kind: Pod
metadata:
  name: web-1
  namespace: shop
  labels: {app: web}
  annotations: {sinew.dev/netns: /run/netns/web-1}
spec:
  nodeName: node-a
  serviceAccountName: web
  containers:
    - name: app
      image: nginx
      ports: [{name: http, containerPort: 8080}]
status:
  phase: Running
  hostIP: 192.168.1.2
  podIP: 10.244.0.11
  podIPs: [{ip: 10.244.0.11}]
  conditions: [{type: Ready, status: "True"}]
"#;

    #[test]
    fn parses_a_realistic_stream() {
        let objects = parse_ok(Path::new("demo.yaml"), REALISTIC);
        let keys: Vec<String> = objects.iter().map(|o| o.key().to_string()).collect();
        assert_eq!(
            keys,
            [
                "Service shop/web",
                "EndpointSlice shop/web-abcde",
                "Pod shop/web-1"
            ]
        );
        let Object::EndpointSlice(slice) = &objects[1] else {
            panic!("not a slice")
        };
        let endpoint = &slice.endpoints[0];
        assert_eq!(endpoint.conditions.serving, Some(true));
        assert_eq!(endpoint.zone.as_deref(), Some("zone-1"));
        assert_eq!(
            endpoint.target_ref.as_ref().unwrap().name.as_deref(),
            Some("web-1")
        );
        let Object::Pod(pod) = &objects[2] else {
            panic!("not a pod")
        };
        assert_eq!(pod.service_account(), "web");
        assert_eq!(pod.spec.node_name.as_deref(), Some("node-a"));
    }

    #[test]
    fn namespaces_are_read_and_cluster_scoped() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  labels: {sinew.dev/mesh: enabled}\n";
        let objects = parse_ok(Path::new("ns.yaml"), text);
        assert_eq!(objects[0].key().to_string(), "Namespace shop");
        let mut snapshot = Snapshot::default();
        snapshot.push(objects[0].clone());
        assert_eq!(
            snapshot.namespaces[0].metadata.labels["sinew.dev/mesh"],
            "enabled"
        );
    }

    fn policy(name: &str, spec: &str) -> String {
        format!(
            "apiVersion: security.sinew.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: shop}}\nspec: {spec}\n---\n"
        )
    }

    fn policies(snapshot: &Snapshot) -> Vec<String> {
        snapshot
            .authorization_policies
            .iter()
            .map(|p| format!("{}={}", p.key(), serde_json::to_string(&p.spec).unwrap()))
            .collect()
    }

    #[test]
    fn reads_authorization_policies() {
        let text = [
            policy(
                "allow-web",
                "{selector: {matchLabels: {app: web}}, rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}], to: [{operation: {ports: ['8080']}}]}]}",
            ),
            policy("deny-all", "{}"),
            svc("web", "10.96.0.10"),
        ]
        .concat();
        let objects = parse_ok(Path::new("p.yaml"), &text);
        let keys: Vec<String> = objects.iter().map(|o| o.key().to_string()).collect();
        assert_eq!(
            keys,
            [
                "AuthorizationPolicy shop/allow-web",
                "AuthorizationPolicy shop/deny-all",
                "Service default/web"
            ]
        );
        let mut snapshot = Snapshot::default();
        for object in objects {
            snapshot.push(object);
        }
        assert_eq!(snapshot.authorization_policies.len(), 2);
        let p = &snapshot.authorization_policies[0];
        assert_eq!(p.spec.rules.len(), 1);
        assert_eq!(
            crate::policy::eval::statuses(p),
            [crate::policy::eval::RuleStatus::KernelEnforced]
        );
        assert_eq!(snapshot.services.len(), 1);
    }

    #[test]
    fn rejects_bad_authorization_policies_naming_the_field() {
        let text = [
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: istio, namespace: shop}\nspec: {}\n---\n".to_string(),
            policy("cidr", "{rules: [{from: [{source: {ipBlocks: [10.0.0.0/8, 10.0.0.0/33]}}]}]}"),
            policy("action", "{action: ALOW}"),
            "apiVersion: security.sinew.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: typed, namespace: shop}\nspec:\n  rules: 5\n---\n".to_string(),
            "apiVersion: security.sinew.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {namespace: shop}\nspec: {}\n---\n".to_string(),
            policy("l7-is-fine", "{rules: [{to: [{operation: {methods: [GET]}}]}]}"),
        ]
        .concat();
        let errors = parse_errors(&text);
        assert_eq!(errors.len(), 5, "{errors:#?}");
        assert_eq!(
            errors[0],
            "f.yaml: AuthorizationPolicy shop/istio: unsupported apiVersion security.istio.io/v1 for \
             AuthorizationPolicy (expected security.sinew.dev/v1alpha1)"
        );
        assert_eq!(
            errors[1],
            "f.yaml: AuthorizationPolicy shop/cidr: spec.rules[0].from[0].source.ipBlocks[1]: \"10.0.0.0/33\" is not a CIDR"
        );
        assert_eq!(
            errors[2],
            "f.yaml: AuthorizationPolicy shop/action: spec.action: \"ALOW\" is not one of ALLOW, DENY, AUDIT"
        );
        assert!(
            errors[3]
                .starts_with("f.yaml: AuthorizationPolicy shop/typed: spec.rules: invalid type"),
            "{}",
            errors[3]
        );
        assert!(errors[3].ends_with("at line 20 column 10"), "{}", errors[3]);
        assert_eq!(
            errors[4],
            "f.yaml: document 5: metadata.name: must not be empty"
        );
    }

    #[test]
    fn empty_and_comment_only_files_are_valid() {
        for text in ["", "# nothing\n", "---\n---\n", "---\n# c\n...\n"] {
            assert_eq!(
                parse_file(Path::new("e.yaml"), text),
                Ok(ParsedFile::default()),
                "{text:?}"
            );
        }
    }

    /// The objects of a file that must have no error.
    fn parse_ok(path: &Path, text: &str) -> Vec<Object> {
        let parsed = parse_file(path, text).unwrap();
        assert_eq!(parsed.errors, []);
        parsed.objects().cloned().collect()
    }

    /// The errors of `/d/f.yaml` with this text, whether the file splits into documents or not.
    fn parse_errors(text: &str) -> Vec<String> {
        match parse_file(Path::new("/d/f.yaml"), text) {
            Ok(parsed) => messages(&parsed.errors),
            Err(errors) => messages(&errors),
        }
    }

    #[test]
    fn rejects_bad_yaml_naming_the_document() {
        let errors = parse_errors(&format!(
            "{}apiVersion: v1\nkind: [unclosed\n",
            svc("a", "10.96.0.1")
        ));
        assert_eq!(errors.len(), 1);
        assert!(errors[0].starts_with("f.yaml: document 2: "), "{errors:?}");
    }

    #[test]
    fn rejects_unknown_kinds_and_versions() {
        let errors = parse_errors(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\n---\n\
             apiVersion: discovery.k8s.io/v1beta1\nkind: EndpointSlice\nmetadata: {name: s}\n---\n\
             kind: Service\nmetadata: {name: nov}\n---\n\
             apiVersion: v1\nmetadata: {name: nokind}\n---\n\
             - just a list\n",
        );
        assert_eq!(
            errors,
            [
                "f.yaml: Deployment default/web: unsupported kind Deployment (apps/v1)",
                "f.yaml: EndpointSlice default/s: unsupported apiVersion discovery.k8s.io/v1beta1 for EndpointSlice (expected discovery.k8s.io/v1)",
                "f.yaml: Service default/nov: missing apiVersion",
                "f.yaml: document 4: missing kind",
                "f.yaml: document 5: not a YAML mapping (expected a Kubernetes object)",
            ]
        );
    }

    #[test]
    fn reports_every_invalid_object_by_name() {
        let text = [
            svc("ok", "10.96.0.1"),
            svc("bad", "10.96.0.999"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: sctp, namespace: x}\nspec: {ports: [{port: 80, protocol: SCTP}]}\n---\n".into(),
            "apiVersion: v1\nkind: Service\nmetadata: {name: noport}\nspec: {ports: [{name: a}]}\n---\n".into(),
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s}\naddressType: IPv4\n---\n".into(),
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nstatus: {podIP: nope}\n".into(),
        ]
        .concat();
        let errors = parse_errors(&text);
        assert_eq!(errors.len(), 5, "{errors:?}");
        assert_eq!(
            errors[0],
            "f.yaml: Service default/bad: spec.clusterIP: \"10.96.0.999\" is not an IP address"
        );
        assert_eq!(
            errors[1],
            "f.yaml: Service x/sctp: spec.ports[0]: unsupported protocol SCTP"
        );
        assert!(
            errors[2].starts_with("f.yaml: Service default/noport: "),
            "{}",
            errors[2]
        );
        assert!(errors[2].contains("missing field `port`"), "{}", errors[2]);
        assert_eq!(
            errors[3],
            "f.yaml: EndpointSlice default/s: missing label kubernetes.io/service-name"
        );
        assert_eq!(
            errors[4],
            "f.yaml: Pod default/p: status.podIP: \"nope\" is not an IP address"
        );
    }

    #[test]
    fn type_errors_name_the_field_and_line() {
        let text = [
            svc("a", "10.96.0.1"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: b}\nspec:\n  ports:\n    - port: eighty\n".into(),
        ]
        .concat();
        let errors = parse_errors(&text);
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].starts_with("f.yaml: Service default/b: spec.ports[0].port: invalid type"),
            "{errors:?}"
        );
        assert!(errors[0].ends_with("at line 11 column 13"), "{errors:?}");
    }

    #[test]
    fn rejects_duplicates_inside_one_file() {
        let errors = parse_errors(
            &[
                svc("a", "10.96.0.1"),
                svc("b", "10.96.0.2"),
                svc("a", "10.96.0.3"),
            ]
            .concat(),
        );
        assert_eq!(
            errors,
            ["f.yaml: Service default/a: duplicate (also document 1 of this file)"]
        );
        // Same name, different kind or namespace: different objects.
        let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\n---\n";
        let other_ns = "apiVersion: v1\nkind: Service\nmetadata: {name: a, namespace: b}\n";
        let text = [svc("a", "10.96.0.1"), pod.into(), other_ns.into()].concat();
        assert_eq!(parse_ok(Path::new("f.yaml"), &text).len(), 3);
    }

    #[test]
    fn list_kind_is_flattened() {
        let text = "apiVersion: v1\nkind: List\nitems:\n  - apiVersion: v1\n    kind: Service\n    metadata: {name: a}\n  - apiVersion: v1\n    kind: Pod\n    metadata: {name: p}\n---\napiVersion: v1\nkind: List\nitems: []\n";
        let objects = parse_ok(Path::new("l.yaml"), text);
        assert_eq!(objects.len(), 2);
        let errors = parse_errors(
            "apiVersion: v1\nkind: List\nitems:\n  - apiVersion: v1\n    kind: Service\n    metadata: {name: a}\n  - {apiVersion: v1, kind: Service, spec: {}}\n",
        );
        assert_eq!(
            errors,
            ["f.yaml: document 1 items[1]: metadata.name is empty"]
        );
        let errors =
            parse_errors("apiVersion: v1\nkind: List\nitems: [{apiVersion: v1, kind: List}]\n");
        assert_eq!(
            errors,
            ["f.yaml: document 1 items[0]: a List inside a List is not supported"]
        );
    }

    #[test]
    fn yaml_merge_keys_are_applied() {
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec:\n  ports:\n    - &base {port: 80, protocol: UDP}\n    - <<: *base\n      name: b\n      port: 81\n";
        let objects = parse_ok(Path::new("m.yaml"), text);
        let Object::Service(s) = &objects[0] else {
            panic!()
        };
        assert_eq!(s.spec.ports[1].protocol, "UDP");
    }

    #[test]
    fn reads_only_yaml_files_in_name_order() {
        let dir = TempDir::new();
        dir.write("b.yml", &svc("b", "10.96.0.2"));
        dir.write("a.yaml", &svc("a", "10.96.0.1"));
        dir.write("c.json", "{}");
        dir.write("README", "not yaml");
        fs::create_dir(dir.0.join("sub.yaml")).unwrap();
        fs::write(dir.0.join("sub.yaml/x.yaml"), svc("x", "10.96.0.9")).unwrap();
        let mut source = FileSource::new(&dir.0);
        let (snapshot, errors) = source.load();
        assert_eq!(errors, []);
        assert_eq!(names(&snapshot), ["a=10.96.0.1", "b=10.96.0.2"]);
    }

    #[test]
    fn a_bad_object_is_rejected_alone() {
        let dir = TempDir::new();
        let mut source = FileSource::new(&dir.0);
        dir.write(
            "a.yaml",
            &[svc("a", "10.96.0.1"), svc("c", "10.96.0.3")].concat(),
        );
        dir.write("b.yaml", &svc("b", "10.96.0.2"));
        let (snapshot, errors) = source.load();
        assert_eq!((names(&snapshot).len(), errors.len()), (3, 0));

        // In a.yaml, `a`'s good edit is applied, `c` goes bad and keeps its last accepted version, and the
        // new `a2` is bad and contributes nothing; b.yaml changes normally.
        dir.write(
            "a.yaml",
            &[
                svc("a", "10.96.0.11"),
                svc("a2", "bad"),
                svc("c", "10.96.0.333"),
            ]
            .concat(),
        );
        dir.write("b.yaml", &svc("b", "10.96.0.22"));
        let (snapshot, errors) = source.load();
        assert_eq!(
            names(&snapshot),
            ["a=10.96.0.11", "c=10.96.0.3", "b=10.96.0.22"]
        );
        assert_eq!(
            messages(&errors),
            [
                "a.yaml: Service default/a2: spec.clusterIP: \"bad\" is not an IP address",
                "a.yaml: Service default/c: spec.clusterIP: \"10.96.0.333\" is not an IP address",
            ]
        );

        // Rejected again on every load while it stays bad, still with the old version in force.
        let (snapshot, errors) = source.load();
        assert_eq!(
            names(&snapshot),
            ["a=10.96.0.11", "c=10.96.0.3", "b=10.96.0.22"]
        );
        assert_eq!(errors.len(), 2);

        // Fixed: accepted. An object no longer in the file goes away.
        dir.write(
            "a.yaml",
            &[svc("a", "10.96.0.111"), svc("c", "10.96.0.33")].concat(),
        );
        let (snapshot, errors) = source.load();
        assert_eq!(
            names(&snapshot),
            ["a=10.96.0.111", "c=10.96.0.33", "b=10.96.0.22"]
        );
        assert_eq!(errors, []);
        dir.write("a.yaml", &svc("c", "10.96.0.33"));
        assert_eq!(names(&source.load().0), ["c=10.96.0.33", "b=10.96.0.22"]);
    }

    #[test]
    fn a_duplicate_inside_a_file_does_not_bring_back_the_old_version() {
        let dir = TempDir::new();
        let mut source = FileSource::new(&dir.0);
        dir.write("a.yaml", &svc("a", "10.96.0.1"));
        source.load();
        dir.write(
            "a.yaml",
            &[svc("a", "10.96.0.2"), svc("a", "10.96.0.3")].concat(),
        );
        let (snapshot, errors) = source.load();
        assert_eq!(names(&snapshot), ["a=10.96.0.2"]);
        assert_eq!(
            messages(&errors),
            ["a.yaml: Service default/a: duplicate (also document 1 of this file)"]
        );
    }

    #[test]
    fn a_file_that_does_not_split_into_documents_keeps_all_its_content() {
        let dir = TempDir::new();
        let mut source = FileSource::new(&dir.0);
        dir.write(
            "a.yaml",
            &[svc("a", "10.96.0.1"), svc("b", "10.96.0.2")].concat(),
        );
        source.load();
        // A syntax error: not even the good edit before it is applied, and `b` is not deleted.
        dir.write(
            "a.yaml",
            &[svc("a", "10.96.0.11"), "kind: [\n".into()].concat(),
        );
        let (snapshot, errors) = source.load();
        assert_eq!(names(&snapshot), ["a=10.96.0.1", "b=10.96.0.2"]);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].object, "document 2");
    }

    #[test]
    fn an_unidentifiable_bad_document_keeps_what_it_could_have_been() {
        let dir = TempDir::new();
        let mut source = FileSource::new(&dir.0);
        dir.write(
            "a.yaml",
            &[
                svc("a", "10.96.0.1"),
                svc("b", "10.96.0.2"),
                svc("c", "10.96.0.3"),
            ]
            .concat(),
        );
        source.load();
        // `b` lost its name: it could be any object, so objects of a.yaml that are not in it any more stay.
        dir.write(
            "a.yaml",
            &[
                svc("a", "10.96.0.11"),
                "apiVersion: v1\nkind: Service\nmetadata: {namespace: default}\n---\n".into(),
            ]
            .concat(),
        );
        let (snapshot, errors) = source.load();
        assert_eq!(
            names(&snapshot),
            ["a=10.96.0.11", "b=10.96.0.2", "c=10.96.0.3"]
        );
        assert_eq!(
            messages(&errors),
            ["a.yaml: document 2: metadata.name is empty"]
        );
        // A bad object of a kind we do not read cannot be any of ours: deletions go through beside it.
        dir.write(
            "a.yaml",
            &[
                svc("a", "10.96.0.11"),
                "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\n".into(),
            ]
            .concat(),
        );
        let (snapshot, errors) = source.load();
        assert_eq!(names(&snapshot), ["a=10.96.0.11"]);
        assert_eq!(
            messages(&errors),
            ["a.yaml: Deployment default/web: unsupported kind Deployment (apps/v1)"]
        );
    }

    #[test]
    fn a_rejected_object_keeps_its_version_from_the_same_file_only() {
        let dir = TempDir::new();
        let mut source = FileSource::new(&dir.0);
        dir.write("a.yaml", &svc("web", "10.96.0.1"));
        source.load();
        // web moves to b.yaml, broken: its old version was in a.yaml, not b.yaml, so nothing stays.
        dir.write("a.yaml", "");
        dir.write("b.yaml", &svc("web", "bad"));
        let (snapshot, errors) = source.load();
        assert_eq!(names(&snapshot), Vec::<String>::new());
        assert_eq!(errors.len(), 1);
    }

    #[test]
    fn a_bad_item_of_a_list_keeps_its_last_version() {
        let dir = TempDir::new();
        let mut source = FileSource::new(&dir.0);
        let list = |a: &str, b: &str| {
            format!(
                "apiVersion: v1\nkind: List\nitems:\n- {{apiVersion: v1, kind: Service, metadata: {{name: a}}, spec: {{clusterIP: {a}}}}}\n- {{apiVersion: v1, kind: Service, metadata: {{name: b}}, spec: {{clusterIP: {b}}}}}\n- {{apiVersion: v1, kind: List}}\n"
            )
        };
        dir.write(
            "l.yaml",
            &list("10.96.0.1", "10.96.0.2").replace("- {apiVersion: v1, kind: List}\n", ""),
        );
        source.load();
        dir.write("l.yaml", &list("10.96.0.11", "x"));
        let (snapshot, errors) = source.load();
        assert_eq!(names(&snapshot), ["a=10.96.0.11", "b=10.96.0.2"]);
        assert_eq!(
            messages(&errors),
            [
                "l.yaml: Service default/b: spec.clusterIP: \"x\" is not an IP address",
                "l.yaml: document 1 items[2]: a List inside a List is not supported",
            ]
        );
    }

    #[test]
    fn a_bad_policy_beside_a_good_one_is_rejected_alone() {
        let dir = TempDir::new();
        let mut source = FileSource::new(&dir.0);
        dir.write(
            "policies.yaml",
            &[
                policy(
                    "good",
                    "{action: DENY, rules: [{to: [{operation: {ports: ['22']}}]}]}",
                ),
                policy(
                    "bad",
                    "{rules: [{from: [{source: {ipBlocks: [10.0.0.0/8, 10.0.0.0/33]}}]}]}",
                ),
                svc("web", "10.96.0.10"),
            ]
            .concat(),
        );
        let (snapshot, errors) = source.load();
        assert_eq!(
            policies(&snapshot),
            [r#"shop/good={"action":"DENY","rules":[{"to":[{"operation":{"ports":["22"]}}]}]}"#]
        );
        assert_eq!(names(&snapshot), ["web=10.96.0.10"]);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].file, dir.0.join("policies.yaml"));
        assert_eq!(errors[0].object, "AuthorizationPolicy shop/bad");
        assert_eq!(
            errors[0].reason,
            "spec.rules[0].from[0].source.ipBlocks[1]: \"10.0.0.0/33\" is not a CIDR"
        );
    }

    #[test]
    fn a_policy_edited_into_a_bad_one_keeps_its_old_version() {
        let dir = TempDir::new();
        let mut source = FileSource::new(&dir.0);
        let good = policy("p", "{rules: [{from: [{source: {namespaces: [foo]}}]}]}");
        dir.write("p.yaml", &[good.clone(), policy("other", "{}")].concat());
        source.load();
        let before = policies(&source.snapshot());
        assert_eq!(before.len(), 2);

        // The edit has a typo in the action and a bad port: the old `p` stays in force, `other` is edited.
        dir.write(
            "p.yaml",
            &[
                policy(
                    "p",
                    "{action: DENNY, rules: [{to: [{operation: {ports: [70000]}}]}]}",
                ),
                policy("other", "{action: DENY, rules: [{}]}"),
            ]
            .concat(),
        );
        let (snapshot, errors) = source.load();
        assert_eq!(
            policies(&snapshot),
            [
                before[0].clone(),
                r#"shop/other={"action":"DENY","rules":[{}]}"#.to_string()
            ]
        );
        assert_eq!(
            messages(&errors),
            [
                "p.yaml: AuthorizationPolicy shop/p: spec.action: \"DENNY\" is not one of ALLOW, DENY, AUDIT; \
                 spec.rules[0].to[0].operation.ports[0]: \"70000\" is not a port (1-65535)"
            ]
        );
        // A wrong apiVersion is a bad version of the same object too.
        dir.write(
            "p.yaml",
            &[
                good.replace("security.sinew.dev/v1alpha1", "security.istio.io/v1"),
                policy("other", "{action: DENY, rules: [{}]}"),
            ]
            .concat(),
        );
        let (snapshot, errors) = source.load();
        assert_eq!(policies(&snapshot)[0], before[0]);
        assert_eq!(
            messages(&errors),
            [
                "p.yaml: AuthorizationPolicy shop/p: unsupported apiVersion security.istio.io/v1 for \
                 AuthorizationPolicy (expected security.sinew.dev/v1alpha1)"
            ]
        );
        // Fixed: the new version is applied.
        dir.write("p.yaml", &policy("p", "{action: DENY, rules: [{}]}"));
        let (snapshot, errors) = source.load();
        assert_eq!(errors, []);
        assert_eq!(
            policies(&snapshot),
            [r#"shop/p={"action":"DENY","rules":[{}]}"#]
        );
    }

    fn peer_auth(name: &str, spec: &str) -> String {
        format!(
            "apiVersion: security.sinew.dev/v1alpha1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: shop}}\nspec: {spec}\n---\n"
        )
    }

    fn peer_auths(snapshot: &Snapshot) -> Vec<String> {
        snapshot
            .peer_authentications
            .iter()
            .map(|p| format!("{}={}", p.key(), serde_json::to_string(&p.spec).unwrap()))
            .collect()
    }

    #[test]
    fn reads_peer_authentications() {
        let text = [
            "apiVersion: security.sinew.dev/v1alpha1\nkind: PeerAuthentication\nmetadata: {name: mesh, namespace: sinew-system}\nspec: {mtls: {mode: STRICT}}\n---\n".to_string(),
            peer_auth(
                "web",
                "\n  selector:\n    matchLabels: {app: web}\n  mtls: {mode: STRICT}\n  portLevelMtls:\n    8080: {mode: DISABLE}\n    '9090': {mode: PERMISSIVE}",
            ),
            peer_auth("ns", "{mtls: null}"),
            // No namespace: `default`, as for the other kinds.
            "apiVersion: security.sinew.dev/v1alpha1\nkind: PeerAuthentication\nmetadata: {name: d}\n---\n".to_string(),
            policy("deny-all", "{}"),
        ]
        .concat();
        let objects = parse_ok(Path::new("pa.yaml"), &text);
        let keys: Vec<String> = objects.iter().map(|o| o.key().to_string()).collect();
        assert_eq!(
            keys,
            [
                "PeerAuthentication sinew-system/mesh",
                "PeerAuthentication shop/web",
                "PeerAuthentication shop/ns",
                "PeerAuthentication default/d",
                "AuthorizationPolicy shop/deny-all",
            ]
        );
        let mut snapshot = Snapshot::default();
        for object in objects {
            snapshot.push(object);
        }
        assert_eq!(snapshot.authorization_policies.len(), 1);
        assert_eq!(snapshot.peer_authentications.len(), 4);
        let web = BTreeMap::from([("app".to_owned(), "web".to_owned())]);
        let mode = |port| {
            crate::peerauth::effective_mode(
                &snapshot.peer_authentications,
                policy::DEFAULT_ROOT_NAMESPACE,
                "shop",
                &web,
                port,
            )
        };
        use crate::peerauth::MtlsMode;
        assert_eq!(mode(8080).mode, MtlsMode::Disable);
        assert_eq!(mode(9090).mode, MtlsMode::Permissive);
        assert_eq!(mode(80).mode, MtlsMode::Strict);
        assert_eq!(mode(80).from.as_deref(), Some("shop/web"));
    }

    #[test]
    fn rejects_bad_peer_authentications_naming_the_field() {
        let text = [
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: istio, namespace: shop}\nspec: {}\n---\n".to_string(),
            peer_auth("mode", "{mtls: {mode: STRICTT}}"),
            peer_auth("no-selector", "{mtls: {mode: STRICT}, portLevelMtls: {8080: {mode: DISABLE}}}"),
            peer_auth("port", "{selector: {matchLabels: {app: web}}, portLevelMtls: {8080a: {mode: DISABLE}, 0: {}}}"),
            peer_auth("typo", "{selector: {matchLabel: {app: web}}, mtls: {mode: DISABLE}}"),
            peer_auth("twice", "{selector: {matchLabels: {app: web}}, portLevelMtls: {8080: {}, '8080': {}}}"),
            "apiVersion: security.sinew.dev/v1alpha1\nkind: PeerAuthentication\nmetadata: {namespace: shop}\nspec: {}\n---\n".to_string(),
            peer_auth("fine", "{mtls: {mode: UNSET}}"),
        ]
        .concat();
        let errors = parse_errors(&text);
        assert_eq!(errors.len(), 7, "{errors:#?}");
        assert_eq!(
            errors[0],
            "f.yaml: PeerAuthentication shop/istio: unsupported apiVersion security.istio.io/v1 for \
             PeerAuthentication (expected security.sinew.dev/v1alpha1)"
        );
        assert_eq!(
            errors[1],
            "f.yaml: PeerAuthentication shop/mode: spec.mtls.mode: \"STRICTT\" is not one of UNSET, DISABLE, \
             PERMISSIVE, STRICT"
        );
        assert_eq!(
            errors[2],
            "f.yaml: PeerAuthentication shop/no-selector: spec.portLevelMtls: only valid with a spec.selector \
             that has matchLabels (a workload policy), as in Istio"
        );
        assert_eq!(
            errors[3],
            "f.yaml: PeerAuthentication shop/port: spec.portLevelMtls[\"0\"]: port out of range 1-65535; \
             spec.portLevelMtls[\"8080a\"]: not a port number"
        );
        assert_eq!(
            errors[4],
            "f.yaml: PeerAuthentication shop/typo: spec.selector.matchLabel: unknown field"
        );
        assert!(
            errors[5].starts_with("f.yaml: PeerAuthentication shop/twice: ")
                && errors[5].contains("port \"8080\" is given twice"),
            "{}",
            errors[5]
        );
        assert_eq!(
            errors[6],
            "f.yaml: document 7: metadata.name: must not be empty"
        );
    }

    #[test]
    fn a_peer_authentication_edited_into_a_bad_one_keeps_its_old_version() {
        let dir = TempDir::new();
        let mut source = FileSource::new(&dir.0);
        dir.write(
            "pa.yaml",
            &[
                peer_auth("strict", "{mtls: {mode: STRICT}}"),
                peer_auth("other", "{}"),
            ]
            .concat(),
        );
        let (snapshot, errors) = source.load();
        assert_eq!(errors, []);
        let before = peer_auths(&snapshot);
        assert_eq!(
            before,
            [
                r#"shop/strict={"mtls":{"mode":"STRICT"}}"#,
                r#"shop/other={}"#
            ]
        );
        // A typo in the mode must not drop the STRICT object (which would fall back to PERMISSIVE): the old
        // version stays in force, and `other` is edited. A new bad object contributes nothing.
        dir.write(
            "pa.yaml",
            &[
                peer_auth("strict", "{mtls: {mode: DISABLED}}"),
                peer_auth("other", "{mtls: {mode: PERMISSIVE}}"),
                peer_auth("new", "{portLevelMtls: {80: {mode: DISABLE}}}"),
            ]
            .concat(),
        );
        let (snapshot, errors) = source.load();
        assert_eq!(
            peer_auths(&snapshot),
            [
                before[0].clone(),
                r#"shop/other={"mtls":{"mode":"PERMISSIVE"}}"#.to_string()
            ]
        );
        assert_eq!(
            messages(&errors),
            [
                "pa.yaml: PeerAuthentication shop/strict: spec.mtls.mode: \"DISABLED\" is not one of UNSET, \
                 DISABLE, PERMISSIVE, STRICT",
                "pa.yaml: PeerAuthentication shop/new: spec.portLevelMtls: only valid with a spec.selector that \
                 has matchLabels (a workload policy), as in Istio",
            ]
        );
        // Fixed: the new version is applied; removed: gone.
        dir.write("pa.yaml", &peer_auth("strict", "{mtls: {mode: DISABLE}}"));
        let (snapshot, errors) = source.load();
        assert_eq!(errors, []);
        assert_eq!(
            peer_auths(&snapshot),
            [r#"shop/strict={"mtls":{"mode":"DISABLE"}}"#]
        );
    }

    #[test]
    fn a_new_bad_policy_contributes_nothing() {
        let dir = TempDir::new();
        let mut source = FileSource::new(&dir.0);
        dir.write("a.yaml", &policy("kept", "{}"));
        source.load();
        dir.write(
            "a.yaml",
            &[policy("kept", "{}"), policy("new", "{rules: [{from: []}]}")].concat(),
        );
        dir.write(
            "b.yaml",
            &policy(
                "also-new",
                "{selector: {matchLabels: {app: web}}, extra: 1}",
            ),
        );
        let (snapshot, errors) = source.load();
        assert_eq!(
            policies(&snapshot),
            ["shop/kept={\"action\":\"ALLOW\",\"rules\":[]}"]
        );
        assert_eq!(
            messages(&errors),
            [
                "a.yaml: AuthorizationPolicy shop/new: spec.rules[0].from: must not be empty (omit it to match every source)",
                "b.yaml: AuthorizationPolicy shop/also-new: spec.extra: unknown field",
            ]
        );
    }

    #[test]
    fn a_new_bad_file_contributes_nothing() {
        let dir = TempDir::new();
        let mut source = FileSource::new(&dir.0);
        dir.write("a.yaml", &svc("a", "10.96.0.1"));
        dir.write(
            "new.yaml",
            &[svc("n", "10.96.0.5"), "kind: [".into()].concat(),
        );
        let (snapshot, errors) = source.load();
        assert_eq!(names(&snapshot), ["a=10.96.0.1"]);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].file, dir.0.join("new.yaml"));
    }

    #[test]
    fn deleted_files_take_their_objects_away() {
        let dir = TempDir::new();
        let mut source = FileSource::new(&dir.0);
        dir.write("a.yaml", &svc("a", "10.96.0.1"));
        dir.write("b.yaml", &svc("b", "10.96.0.2"));
        source.load();
        dir.remove("a.yaml");
        let (snapshot, errors) = source.load();
        assert_eq!(names(&snapshot), ["b=10.96.0.2"]);
        assert_eq!(errors, []);
        // A deleted file that was bad when it went leaves nothing behind either.
        dir.write("b.yaml", "kind: [");
        assert_eq!(names(&source.load().0), ["b=10.96.0.2"]);
        dir.remove("b.yaml");
        let (snapshot, errors) = source.load();
        assert_eq!(snapshot, Snapshot::default());
        assert_eq!(errors, []);
    }

    #[test]
    fn duplicate_across_files_first_name_wins_when_both_are_new() {
        let dir = TempDir::new();
        let mut source = FileSource::new(&dir.0);
        dir.write("a.yaml", &svc("web", "10.96.0.1"));
        dir.write(
            "b.yaml",
            &[svc("web", "10.96.0.2"), svc("other", "10.96.0.3")].concat(),
        );
        let (snapshot, errors) = source.load();
        // Only b.yaml's copy of web is rejected: `other` is in force.
        assert_eq!(names(&snapshot), ["web=10.96.0.1", "other=10.96.0.3"]);
        assert_eq!(
            messages(&errors),
            ["b.yaml: Service default/web: duplicate (also in a.yaml)"]
        );
    }

    #[test]
    fn duplicate_across_files_the_previous_holder_wins() {
        let dir = TempDir::new();
        let mut source = FileSource::new(&dir.0);
        dir.write("b.yaml", &svc("web", "10.96.0.2"));
        source.load();
        // a.yaml sorts first, but b.yaml already holds web: a.yaml's copy is the one rejected.
        dir.write(
            "a.yaml",
            &[svc("web", "10.96.0.1"), svc("extra", "10.96.0.4")].concat(),
        );
        let (snapshot, errors) = source.load();
        assert_eq!(names(&snapshot), ["extra=10.96.0.4", "web=10.96.0.2"]);
        assert_eq!(
            messages(&errors),
            ["a.yaml: Service default/web: duplicate (also in b.yaml)"]
        );
        // Moving the object: remove it from b.yaml and a.yaml takes over.
        dir.write("b.yaml", "");
        let (snapshot, errors) = source.load();
        assert_eq!(names(&snapshot), ["web=10.96.0.1", "extra=10.96.0.4"]);
        assert_eq!(errors, []);
    }

    #[test]
    fn duplicate_against_a_rejected_files_last_good_content() {
        let dir = TempDir::new();
        let mut source = FileSource::new(&dir.0);
        dir.write("b.yaml", &svc("web", "10.96.0.2"));
        source.load();
        // b.yaml goes bad, so its old `web` stays in force, and a.yaml's copy of web loses to it.
        dir.write("b.yaml", "kind: [");
        dir.write("a.yaml", &svc("web", "10.96.0.1"));
        let (snapshot, errors) = source.load();
        assert_eq!(names(&snapshot), ["web=10.96.0.2"]);
        let errors = messages(&errors);
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert_eq!(
            errors[0],
            "a.yaml: Service default/web: duplicate (also in b.yaml)"
        );
        assert!(errors[1].starts_with("b.yaml: document 1: "));
    }

    #[test]
    fn duplicates_across_files_are_rejected_one_object_at_a_time() {
        let dir = TempDir::new();
        let mut source = FileSource::new(&dir.0);
        dir.write("b.yaml", &svc("x", "10.96.0.1"));
        source.load();
        // b.yaml now also defines y, which a.yaml (sorting first) defines too: b.yaml's y loses, its x (held
        // before) stays and beats c.yaml's new copy of x.
        dir.write("a.yaml", &svc("y", "10.96.0.2"));
        dir.write(
            "b.yaml",
            &[svc("x", "10.96.0.1"), svc("y", "10.96.0.3")].concat(),
        );
        dir.write("c.yaml", &svc("x", "10.96.0.4"));
        let (snapshot, errors) = source.load();
        assert_eq!(names(&snapshot), ["y=10.96.0.2", "x=10.96.0.1"]);
        assert_eq!(
            messages(&errors),
            [
                "b.yaml: Service default/y: duplicate (also in a.yaml)",
                "c.yaml: Service default/x: duplicate (also in b.yaml)",
            ]
        );
    }

    #[test]
    fn unreadable_directory_keeps_everything() {
        let dir = TempDir::new();
        let mut source = FileSource::new(dir.0.join("src"));
        fs::create_dir(dir.0.join("src")).unwrap();
        dir.write("src/a.yaml", &svc("a", "10.96.0.1"));
        source.load();
        fs::rename(dir.0.join("src"), dir.0.join("moved")).unwrap();
        let (snapshot, errors) = source.load();
        assert_eq!(names(&snapshot), ["a=10.96.0.1"]);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].object, "directory");
    }

    #[test]
    fn watcher_sees_every_kind_of_change() {
        let dir = TempDir::new();
        let mut watcher = Watcher::new(&dir.0);
        assert!(watcher.changed(), "first poll always loads");
        assert!(!watcher.changed());
        dir.write("a.yaml", "x: 1\n");
        assert!(watcher.changed(), "created");
        assert!(!watcher.changed());
        // Same size, written at once: only the contents tell.
        dir.write("a.yaml", "x: 2\n");
        assert!(watcher.changed(), "rewritten, same size");
        dir.write("notes.txt", "ignored");
        assert!(!watcher.changed(), "non-YAML files are ignored");
        fs::rename(dir.0.join("a.yaml"), dir.0.join("b.yaml")).unwrap();
        assert!(watcher.changed(), "renamed");
        dir.remove("b.yaml");
        assert!(watcher.changed(), "deleted");
        assert!(!watcher.changed());
        assert_eq!(fingerprint(&dir.0), fingerprint(&dir.0));
    }
}
