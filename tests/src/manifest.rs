//! Kubernetes manifests for the agent's file source: builders for `Service`, `Pod` and `EndpointSlice` objects, a
//! small YAML writer, and [`SourceDir`], which writes files atomically.
//!
//! Objects are built as `serde_json::Value` in the standard Kubernetes shape and written as block-style YAML (all
//! strings double-quoted, so `"True"` or `"80"` never change type). Tests that need a malformed file write raw text
//! with [`SourceDir::write_raw`].

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use crate::topology::Pod;

/// A directory the agent reads with `--source-dir`.
#[derive(Debug, Clone)]
pub struct SourceDir {
    dir: PathBuf,
}

impl SourceDir {
    /// Uses (and creates) `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Result<SourceDir> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        Ok(SourceDir { dir })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Writes `objects` as one multi-document YAML file `<dir>/<file>`.
    pub fn write(&self, file: &str, objects: &[Value]) -> Result<PathBuf> {
        let text = objects
            .iter()
            .map(to_yaml)
            .collect::<Vec<_>>()
            .join("---\n");
        self.write_raw(file, &text)
    }

    /// Writes `text` to `<dir>/<file>` atomically: a hidden temporary file (not `*.yaml`, so the agent ignores it)
    /// is renamed over the target, so the agent never reads half a file.
    pub fn write_raw(&self, file: &str, text: &str) -> Result<PathBuf> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let target = self.dir.join(file);
        let tmp = self.dir.join(format!(
            ".{file}.{}.tmp",
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&tmp, text).with_context(|| format!("write {}", tmp.display()))?;
        std::fs::rename(&tmp, &target)
            .with_context(|| format!("rename to {}", target.display()))?;
        Ok(target)
    }

    /// Removes `<dir>/<file>` (no error if it is already gone).
    pub fn remove(&self, file: &str) -> Result<()> {
        match std::fs::remove_file(self.dir.join(file)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).context(format!("rm {file}"))
            }
            _ => Ok(()),
        }
    }
}

/// One port of a Service.
#[derive(Debug, Clone)]
pub struct ServicePort {
    /// Port name (also matches EndpointSlice port names).
    pub name: String,
    /// Service port. `u32` so tests can write invalid values such as 70000.
    pub port: u32,
    /// Backend port.
    pub target_port: u32,
    /// `TCP` or `UDP`.
    pub protocol: String,
}

impl ServicePort {
    /// A TCP port `port` -> `target_port`.
    pub fn tcp(name: &str, port: u32, target_port: u32) -> ServicePort {
        ServicePort {
            name: name.into(),
            port,
            target_port,
            protocol: "TCP".into(),
        }
    }

    /// A UDP port `port` -> `target_port`.
    pub fn udp(name: &str, port: u32, target_port: u32) -> ServicePort {
        ServicePort {
            name: name.into(),
            port,
            target_port,
            protocol: "UDP".into(),
        }
    }
}

/// A `v1 Service` of type ClusterIP.
#[derive(Debug, Clone)]
pub struct Service {
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `spec.clusterIP`, as text so tests can write invalid addresses.
    pub cluster_ip: String,
    /// `spec.ports`.
    pub ports: Vec<ServicePort>,
    /// `spec.selector`; empty means no selector (endpoints come from EndpointSlices only).
    pub selector: BTreeMap<String, String>,
}

impl Service {
    /// A Service in namespace `default` with no ports and no selector.
    pub fn new(name: &str, cluster_ip: &str) -> Service {
        Service {
            namespace: crate::topology::DEFAULT_NAMESPACE.into(),
            name: name.into(),
            cluster_ip: cluster_ip.into(),
            ports: Vec::new(),
            selector: BTreeMap::new(),
        }
    }

    /// Adds a port.
    pub fn port(mut self, p: ServicePort) -> Service {
        self.ports.push(p);
        self
    }

    /// Adds a selector label.
    pub fn selector(mut self, key: &str, value: &str) -> Service {
        self.selector.insert(key.into(), value.into());
        self
    }

    /// The object.
    pub fn to_value(&self) -> Value {
        let ports: Vec<Value> = self
            .ports
            .iter()
            .map(|p| json!({"name": p.name, "port": p.port, "targetPort": p.target_port, "protocol": p.protocol}))
            .collect();
        let mut spec = json!({
            "type": "ClusterIP",
            "clusterIP": self.cluster_ip,
            "clusterIPs": [self.cluster_ip],
            "ports": ports,
        });
        if !self.selector.is_empty() {
            spec["selector"] = json!(self.selector);
        }
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": spec,
        })
    }
}

/// A `v1 Pod` describing a harness pod.
#[derive(Debug, Clone)]
pub struct PodManifest {
    /// The pod it describes.
    pub pod: Pod,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
    /// Whether the `Ready` condition is `"True"`.
    pub ready: bool,
    /// `spec.serviceAccountName`.
    pub service_account: String,
    /// `spec.containers[0].ports[].containerPort` (TCP).
    pub container_ports: Vec<u16>,
}

impl PodManifest {
    /// A ready pod with no labels, service account `default`.
    pub fn new(pod: &Pod) -> PodManifest {
        PodManifest {
            pod: pod.clone(),
            labels: BTreeMap::new(),
            ready: true,
            service_account: "default".into(),
            container_ports: Vec::new(),
        }
    }

    /// Adds a label.
    pub fn label(mut self, key: &str, value: &str) -> PodManifest {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// Sets `spec.serviceAccountName` (the pod's identity is `<namespace>/<service account>`).
    pub fn service_account(mut self, sa: &str) -> PodManifest {
        self.service_account = sa.into();
        self
    }

    /// Sets readiness.
    pub fn ready(mut self, ready: bool) -> PodManifest {
        self.ready = ready;
        self
    }

    /// Declares a container port.
    pub fn container_port(mut self, port: u16) -> PodManifest {
        self.container_ports.push(port);
        self
    }

    /// The object, with `status.podIP(s)`, `status.hostIP`, `spec.nodeName`, the Ready condition and the
    /// `sinew.dev/netns` annotation.
    pub fn to_value(&self) -> Value {
        let p = &self.pod;
        let mut pod_ips = vec![json!({"ip": p.ip4.to_string()})];
        if let Some(ip6) = p.ip6 {
            pod_ips.push(json!({"ip": ip6.to_string()}));
        }
        let ports: Vec<Value> = self
            .container_ports
            .iter()
            .map(|port| json!({"containerPort": port, "protocol": "TCP"}))
            .collect();
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": p.name,
                "namespace": p.namespace,
                "labels": self.labels,
                "annotations": {"sinew.dev/netns": p.netns_path().display().to_string()},
            },
            "spec": {
                "nodeName": p.node,
                "serviceAccountName": self.service_account,
                "containers": [{"name": "app", "image": "sinew-testpod", "ports": ports}],
            },
            "status": {
                "phase": "Running",
                "podIP": p.ip4.to_string(),
                "podIPs": pod_ips,
                "hostIP": p.host_ip.to_string(),
                "conditions": [{"type": "Ready", "status": if self.ready { "True" } else { "False" }}],
            },
        })
    }
}

/// A `discovery.k8s.io/v1 EndpointSlice`.
#[derive(Debug, Clone)]
pub struct EndpointSlice {
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// The owning Service (label `kubernetes.io/service-name`).
    pub service: String,
    /// `IPv4` or `IPv6`.
    pub address_type: String,
    /// (address, ready) per endpoint.
    pub endpoints: Vec<(IpAddr, bool)>,
    /// (name, port, protocol) per port.
    pub ports: Vec<(String, u32, String)>,
}

impl EndpointSlice {
    /// An empty IPv4 slice for `service`, named `<service>-<suffix>`.
    pub fn new(service: &str, suffix: &str) -> EndpointSlice {
        EndpointSlice {
            namespace: crate::topology::DEFAULT_NAMESPACE.into(),
            name: format!("{service}-{suffix}"),
            service: service.into(),
            address_type: "IPv4".into(),
            endpoints: Vec::new(),
            ports: Vec::new(),
        }
    }

    /// Adds an endpoint.
    pub fn endpoint(mut self, addr: impl Into<IpAddr>, ready: bool) -> EndpointSlice {
        self.endpoints.push((addr.into(), ready));
        self
    }

    /// Adds a port (`name` must match the Service port's name).
    pub fn port(mut self, name: &str, port: u32, protocol: &str) -> EndpointSlice {
        self.ports.push((name.into(), port, protocol.into()));
        self
    }

    /// The object.
    pub fn to_value(&self) -> Value {
        let endpoints: Vec<Value> = self
            .endpoints
            .iter()
            .map(|(a, ready)| json!({"addresses": [a.to_string()], "conditions": {"ready": ready}}))
            .collect();
        let ports: Vec<Value> = self
            .ports
            .iter()
            .map(|(n, p, proto)| json!({"name": n, "port": p, "protocol": proto}))
            .collect();
        json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "labels": {"kubernetes.io/service-name": self.service},
            },
            "addressType": self.address_type,
            "endpoints": endpoints,
            "ports": ports,
        })
    }
}

/// The API version of `AuthorizationPolicy` objects.
pub const AUTHZ_API_VERSION: &str = "security.sinew.dev/v1alpha1";

/// A `security.sinew.dev/v1alpha1 AuthorizationPolicy` object with Istio's `spec`, given as JSON (so a test can
/// write any shape, also invalid ones): `authorization_policy("ns", "name", json!({"action": "DENY", ...}))`.
pub fn authorization_policy(namespace: &str, name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": AUTHZ_API_VERSION,
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    })
}

/// A `security.sinew.dev/v1alpha1 PeerAuthentication` object with Istio's `spec`, given as JSON:
/// `peer_authentication("default", "web-strict", json!({"selector": {"matchLabels": {"app": "web"}},
/// "mtls": {"mode": "STRICT"}, "portLevelMtls": {"8081": {"mode": "PERMISSIVE"}}}))`.
pub fn peer_authentication(namespace: &str, name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": AUTHZ_API_VERSION,
        "kind": "PeerAuthentication",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    })
}

/// A `v1 Namespace` object with `labels` (e.g. `[("sinew.dev/mesh", "enabled")]`).
pub fn namespace(name: &str, labels: &[(&str, &str)]) -> Value {
    let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": labels},
    })
}

/// Writes a JSON value as a block-style YAML document.
pub fn to_yaml(v: &Value) -> String {
    let mut out = String::new();
    match v {
        Value::Object(m) if !m.is_empty() => emit_map(&mut out, m, 0),
        Value::Array(a) if !a.is_empty() => emit_seq(&mut out, a, 0),
        other => {
            out.push_str(&scalar(other));
            out.push('\n');
        }
    }
    out
}

fn scalar(v: &Value) -> String {
    match v {
        // JSON string escapes are valid in YAML double-quoted scalars.
        Value::String(s) => serde_json::to_string(s).expect("string serializes"),
        Value::Object(_) => "{}".into(),
        Value::Array(_) => "[]".into(),
        other => other.to_string(),
    }
}

fn key(k: &str) -> String {
    let plain = !k.is_empty()
        && k.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._/-".contains(c));
    if plain {
        k.to_string()
    } else {
        serde_json::to_string(k).expect("string serializes")
    }
}

fn is_block(v: &Value) -> bool {
    matches!(v, Value::Object(m) if !m.is_empty()) || matches!(v, Value::Array(a) if !a.is_empty())
}

fn emit_map(out: &mut String, m: &serde_json::Map<String, Value>, indent: usize) {
    for (i, (k, v)) in m.iter().enumerate() {
        // The first key of a map inside a sequence item follows the "- " on the same line.
        if i > 0 || !out.ends_with("- ") {
            out.push_str(&" ".repeat(indent));
        }
        out.push_str(&key(k));
        out.push(':');
        match v {
            Value::Object(inner) if !inner.is_empty() => {
                out.push('\n');
                emit_map(out, inner, indent + 2);
            }
            Value::Array(a) if !a.is_empty() => {
                out.push('\n');
                emit_seq(out, a, indent + 2);
            }
            other => {
                out.push(' ');
                out.push_str(&scalar(other));
                out.push('\n');
            }
        }
    }
}

fn emit_seq(out: &mut String, a: &[Value], indent: usize) {
    for v in a {
        out.push_str(&" ".repeat(indent));
        out.push_str("- ");
        match v {
            Value::Object(m) if !m.is_empty() => emit_map(out, m, indent + 2),
            Value::Array(inner) if !inner.is_empty() => {
                out.push('\n');
                emit_seq(out, inner, indent + 2);
            }
            other => {
                debug_assert!(!is_block(other));
                out.push_str(&scalar(other));
                out.push('\n');
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_is_block_style_with_quoted_strings() {
        let v = json!({
            "apiVersion": "v1",
            "metadata": {"name": "web", "labels": {"kubernetes.io/service-name": "web"}, "annotations": {}},
            "spec": {"ports": [{"port": 80, "name": "http"}, {"port": 53}], "ips": ["10.96.0.10"], "x": []},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]},
        });
        let y = to_yaml(&v);
        let want = r#"apiVersion: "v1"
metadata:
  annotations: {}
  labels:
    kubernetes.io/service-name: "web"
  name: "web"
spec:
  ips:
    - "10.96.0.10"
  ports:
    - name: "http"
      port: 80
    - port: 53
  x: []
status:
  conditions:
    - status: "True"
      type: "Ready"
"#;
        assert_eq!(y, want);
    }

    #[test]
    fn odd_keys_are_quoted() {
        assert_eq!(key("a b"), "\"a b\"");
        assert_eq!(key("sinew.dev/netns"), "sinew.dev/netns");
        assert_eq!(key("1x"), "\"1x\"");
    }

    #[test]
    fn policy_yaml_keeps_empty_spec_and_empty_rule() {
        let v = authorization_policy("default", "deny-all", json!({}));
        assert!(to_yaml(&v).contains("spec: {}\n"), "{}", to_yaml(&v));
        let v = authorization_policy("default", "allow-all", json!({"rules": [{}]}));
        assert!(
            to_yaml(&v).contains("rules:\n    - {}\n"),
            "{}",
            to_yaml(&v)
        );
    }

    #[test]
    fn service_shape() {
        let s = Service::new("web", "10.96.0.10")
            .port(ServicePort::tcp("http", 80, 8080))
            .selector("app", "web");
        let v = s.to_value();
        assert_eq!(v["spec"]["clusterIP"], "10.96.0.10");
        assert_eq!(v["spec"]["ports"][0]["targetPort"], 8080);
        assert_eq!(v["spec"]["selector"]["app"], "web");
    }

    #[test]
    fn atomic_write_leaves_no_temp_files() {
        let dir = std::env::temp_dir().join(format!("sinew-manifest-test-{}", std::process::id()));
        let sd = SourceDir::new(&dir).unwrap();
        sd.write(
            "a.yaml",
            &[json!({"kind": "Service"}), json!({"kind": "Pod"})],
        )
        .unwrap();
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("a.yaml")]);
        let text = std::fs::read_to_string(dir.join("a.yaml")).unwrap();
        assert_eq!(text, "kind: \"Service\"\n---\nkind: \"Pod\"\n");
        sd.remove("a.yaml").unwrap();
        sd.remove("a.yaml").unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
