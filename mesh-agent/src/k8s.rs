//! Trimmed Kubernetes object types: `Service`, `EndpointSlice` and `Pod`.
//!
//! These carry only the fields the agent uses, with the API's camelCase names. Unknown fields are ignored, so
//! the same types read full objects from `kubectl get -o yaml`, hand-written files and (later) the API server.
//! Both sources deserialize into these types, `source` validates them and `state` computes the desired maps
//! from them. Fields the API may send as `null` deserialize like absent ones.
//!
//! The types also implement `Serialize`, so debug endpoints can show the snapshot that is in force.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Deserializer, Serialize};

/// Label that ties an EndpointSlice to its Service (in the slice's namespace).
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Pod annotation with the path of the pod's network namespace (file source only: the kubelet knows it in a
/// cluster, but on one machine the harness that created the namespace has to tell us).
pub const NETNS_ANNOTATION: &str = "sinew.dev/netns";

/// `metadata` of any object we read.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    #[serde(default, deserialize_with = "null_default")]
    pub name: String,
    /// `default` when absent, as `kubectl apply` would do. An explicit empty string stays empty and fails
    /// validation, because it is more likely a templating mistake than a request for the default namespace.
    #[serde(default = "default_namespace", deserialize_with = "null_namespace")]
    pub namespace: String,
    #[serde(default, deserialize_with = "null_default")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "null_default")]
    pub annotations: BTreeMap<String, String>,
    /// Set by the API server; the kubernetes source finds a pod's cgroup (and so its netns) by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

impl Default for ObjectMeta {
    fn default() -> Self {
        ObjectMeta {
            name: String::new(),
            namespace: default_namespace(),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
            uid: None,
        }
    }
}

/// A port given as a number or as the name of a container port (`targetPort`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum IntOrString {
    Int(i64),
    String(String),
}

/// `v1 Service`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    #[serde(default, deserialize_with = "null_default")]
    pub metadata: ObjectMeta,
    #[serde(default, deserialize_with = "null_default")]
    pub spec: ServiceSpec,
}

/// `Service.spec`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// `ClusterIP`, `NodePort`, `LoadBalancer` or `ExternalName`; only the cluster IPs matter to us.
    #[serde(default, rename = "type")]
    pub type_: Option<String>,
    /// An IP, `None` (headless) or empty (not allocated yet).
    #[serde(default, rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    /// Dual-stack form: one IP per family, the first equal to `clusterIP`.
    #[serde(default, rename = "clusterIPs", deserialize_with = "null_default")]
    pub cluster_ips: Vec<String>,
    #[serde(default, deserialize_with = "null_default")]
    pub ports: Vec<ServicePort>,
    #[serde(default, deserialize_with = "null_default")]
    pub selector: BTreeMap<String, String>,
}

/// `Service.spec.ports[]`. Numbers are wide so that out-of-range values reach validation, which names the
/// port, instead of failing inside serde with a less helpful message.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    #[serde(default, deserialize_with = "null_default")]
    pub name: String,
    pub port: i64,
    #[serde(default)]
    pub target_port: Option<IntOrString>,
    #[serde(default = "default_protocol", deserialize_with = "null_protocol")]
    pub protocol: String,
}

/// `discovery.k8s.io/v1 EndpointSlice`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSlice {
    #[serde(default, deserialize_with = "null_default")]
    pub metadata: ObjectMeta,
    /// `IPv4`, `IPv6` or `FQDN`.
    #[serde(default, deserialize_with = "null_default")]
    pub address_type: String,
    #[serde(default, deserialize_with = "null_default")]
    pub endpoints: Vec<Endpoint>,
    #[serde(default, deserialize_with = "null_default")]
    pub ports: Vec<EndpointPort>,
}

/// `EndpointSlice.endpoints[]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    #[serde(default, deserialize_with = "null_default")]
    pub addresses: Vec<String>,
    #[serde(default, deserialize_with = "null_default")]
    pub conditions: EndpointConditions,
    #[serde(default)]
    pub node_name: Option<String>,
    #[serde(default)]
    pub zone: Option<String>,
    #[serde(default)]
    pub target_ref: Option<ObjectReference>,
}

/// `EndpointSlice.endpoints[].conditions`. Kubernetes says an absent condition is "unknown" and consumers
/// should treat an absent `ready` as ready, so these stay `Option`s.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointConditions {
    #[serde(default)]
    pub ready: Option<bool>,
    #[serde(default)]
    pub serving: Option<bool>,
    #[serde(default)]
    pub terminating: Option<bool>,
}

/// A reference to another object (`targetRef`), usually the Pod behind an endpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectReference {
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub uid: Option<String>,
}

/// `EndpointSlice.ports[]`. A missing `port` means "unrestricted" in the API; we cannot map a Service port
/// onto that, so such a port never matches.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointPort {
    #[serde(default, deserialize_with = "null_default")]
    pub name: String,
    #[serde(default)]
    pub port: Option<i64>,
    #[serde(default = "default_protocol", deserialize_with = "null_protocol")]
    pub protocol: String,
}

/// `v1 Namespace`. Cluster-scoped; only its labels matter (enrollment, later), so only metadata is read.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Namespace {
    #[serde(default, deserialize_with = "null_default")]
    pub metadata: ObjectMeta,
}

/// `v1 Pod`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Pod {
    #[serde(default, deserialize_with = "null_default")]
    pub metadata: ObjectMeta,
    #[serde(default, deserialize_with = "null_default")]
    pub spec: PodSpec,
    #[serde(default, deserialize_with = "null_default")]
    pub status: PodStatus,
}

/// `Pod.spec`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    #[serde(default)]
    pub node_name: Option<String>,
    #[serde(default)]
    pub service_account_name: Option<String>,
    #[serde(default, deserialize_with = "null_default")]
    pub containers: Vec<Container>,
    /// A host-network pod shares the node's netns and address: it is not a mesh workload and gets no identity.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub host_network: bool,
}

/// `Pod.spec.containers[]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    #[serde(default, deserialize_with = "null_default")]
    pub name: String,
    #[serde(default, deserialize_with = "null_default")]
    pub ports: Vec<ContainerPort>,
}

/// `Pod.spec.containers[].ports[]`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPort {
    #[serde(default, deserialize_with = "null_default")]
    pub name: String,
    pub container_port: i64,
    #[serde(default = "default_protocol", deserialize_with = "null_protocol")]
    pub protocol: String,
}

/// `Pod.status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    #[serde(default, rename = "podIP")]
    pub pod_ip: Option<String>,
    #[serde(default, rename = "podIPs", deserialize_with = "null_default")]
    pub pod_ips: Vec<PodIp>,
    #[serde(default, rename = "hostIP")]
    pub host_ip: Option<String>,
    /// `Pending`, `Running`, `Succeeded`, `Failed` or `Unknown`.
    #[serde(default)]
    pub phase: Option<String>,
    #[serde(default, deserialize_with = "null_default")]
    pub conditions: Vec<PodCondition>,
}

/// `Pod.status.podIPs[]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct PodIp {
    #[serde(default, deserialize_with = "null_default")]
    pub ip: String,
}

/// `Pod.status.conditions[]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct PodCondition {
    #[serde(rename = "type", default, deserialize_with = "null_default")]
    pub type_: String,
    /// `"True"`, `"False"` or `"Unknown"`: a string in the API, not a bool.
    #[serde(default, deserialize_with = "null_default")]
    pub status: String,
}

impl ObjectMeta {
    /// `namespace/name`, the way kubectl and our errors name an object.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

impl Service {
    /// The Service's cluster IPs that carry traffic, from `clusterIP` and `clusterIPs`, without duplicates.
    /// Headless (`None`), unallocated (empty) and unparsable entries yield nothing; validation reports the
    /// unparsable ones before a Service gets here.
    pub fn cluster_ips(&self) -> Vec<IpAddr> {
        let mut ips = Vec::new();
        let all = self.spec.cluster_ip.iter().chain(&self.spec.cluster_ips);
        for ip in all.filter_map(|s| s.parse::<IpAddr>().ok()) {
            if !ips.contains(&ip) {
                ips.push(ip);
            }
        }
        ips
    }
}

impl EndpointSlice {
    /// The name of the Service this slice belongs to (label `kubernetes.io/service-name`).
    pub fn service_name(&self) -> Option<&str> {
        self.metadata
            .labels
            .get(SERVICE_NAME_LABEL)
            .map(String::as_str)
    }
}

impl Endpoint {
    /// Whether traffic may go to this endpoint: `ready` true or absent (absent means ready, as in
    /// Kubernetes), and not terminating.
    pub fn is_ready(&self) -> bool {
        self.conditions.ready != Some(false) && self.conditions.terminating != Some(true)
    }
}

impl Pod {
    /// Condition `Ready` has status `"True"`. A Pod that lists no `Ready` condition at all counts as ready when
    /// its phase is `Running` or not given: in a cluster the kubelet always reports the condition, so this only
    /// matters for hand-written file-source manifests, where `status: {podIP: ...}` is meant as a running pod.
    /// An explicit `Ready: "False"` always wins.
    pub fn is_ready(&self) -> bool {
        match self.status.conditions.iter().find(|c| c.type_ == "Ready") {
            Some(c) => c.status == "True",
            None => matches!(self.status.phase.as_deref(), None | Some("Running")),
        }
    }

    /// Phase `Succeeded` or `Failed`: the pod's containers are gone for good, whatever its conditions say.
    pub fn is_terminated(&self) -> bool {
        matches!(self.status.phase.as_deref(), Some("Succeeded" | "Failed"))
    }

    /// Path of the pod's network namespace (annotation `sinew.dev/netns`).
    #[allow(dead_code, reason = "for workload identity, which is built next")]
    pub fn netns(&self) -> Option<&str> {
        self.metadata
            .annotations
            .get(NETNS_ANNOTATION)
            .map(String::as_str)
    }

    /// The pod's service account; Kubernetes fills in `default` when the spec names none.
    #[allow(dead_code, reason = "for workload identity, which is built next")]
    pub fn service_account(&self) -> &str {
        match self.spec.service_account_name.as_deref() {
            Some(sa) if !sa.is_empty() => sa,
            _ => "default",
        }
    }

    /// The pod's IPs from `podIP` and `podIPs` (one per family when dual-stack), without duplicates.
    /// Unparsable entries are skipped; validation reports them.
    pub fn ips(&self) -> Vec<IpAddr> {
        let mut ips = Vec::new();
        let all = self
            .status
            .pod_ip
            .iter()
            .chain(self.status.pod_ips.iter().map(|p| &p.ip));
        for ip in all.filter_map(|s| s.parse::<IpAddr>().ok()) {
            if !ips.contains(&ip) {
                ips.push(ip);
            }
        }
        ips
    }

    /// The number of the container port called `name` with this protocol, as the endpoints controller
    /// resolves a named `targetPort`.
    pub fn named_port(&self, name: &str, protocol: &str) -> Option<u16> {
        self.spec
            .containers
            .iter()
            .flat_map(|c| &c.ports)
            .find(|p| p.name == name && p.protocol == protocol)
            .and_then(|p| u16::try_from(p.container_port).ok())
            .filter(|&p| p != 0)
    }
}

fn default_namespace() -> String {
    "default".to_owned()
}

fn default_protocol() -> String {
    "TCP".to_owned()
}

/// Reads `null` like an absent field, which serde's `default` alone does not do.
fn null_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

fn null_namespace<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?.unwrap_or_else(default_namespace))
}

fn null_protocol<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?.unwrap_or_else(default_protocol))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_defaults_and_target_port_forms() {
        let svc: Service = serde_yaml::from_str(
            r#"
metadata: {name: web}
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10, "fd00::10"]
  ports:
    - {name: http, port: 80, targetPort: 8080}
    - {name: admin, port: 9000, targetPort: admin, protocol: UDP}
    - {port: 443}
  selector: {app: web}
  unknownField: ignored
"#,
        )
        .unwrap();
        assert_eq!(svc.metadata.namespace, "default");
        assert_eq!(svc.metadata.key(), "default/web");
        assert_eq!(svc.spec.ports[0].target_port, Some(IntOrString::Int(8080)));
        assert_eq!(
            svc.spec.ports[1].target_port,
            Some(IntOrString::String("admin".into()))
        );
        assert_eq!(svc.spec.ports[1].protocol, "UDP");
        assert_eq!(svc.spec.ports[2].protocol, "TCP");
        assert_eq!(svc.spec.ports[2].name, "");
        assert_eq!(svc.spec.ports[2].target_port, None);
        assert_eq!(
            svc.cluster_ips(),
            vec![
                "10.96.0.10".parse::<IpAddr>().unwrap(),
                "fd00::10".parse().unwrap()
            ]
        );
    }

    #[test]
    fn nulls_read_like_absent_fields() {
        let svc: Service = serde_yaml::from_str(
            "metadata: {name: web, namespace: null, labels: null}\nspec: {ports: [{port: 80, protocol: null}], selector: null}",
        )
        .unwrap();
        assert_eq!(svc.metadata.namespace, "default");
        assert_eq!(svc.spec.ports[0].protocol, "TCP");
        assert!(svc.spec.selector.is_empty());
    }

    #[test]
    fn headless_service_has_no_cluster_ips() {
        let svc: Service =
            serde_yaml::from_str("metadata: {name: h}\nspec: {clusterIP: None}").unwrap();
        assert!(svc.cluster_ips().is_empty());
    }

    #[test]
    fn pod_helpers() {
        let pod: Pod = serde_yaml::from_str(
            r#"
metadata:
  name: web-1
  namespace: shop
  labels: {app: web}
  annotations: {sinew.dev/netns: /run/netns/web-1}
spec:
  nodeName: node-a
  containers:
    - name: app
      ports: [{name: http, containerPort: 8080}, {name: dns, containerPort: 53, protocol: UDP}]
status:
  phase: Running
  podIP: 10.244.0.11
  podIPs: [{ip: 10.244.0.11}, {ip: "fd00::11"}]
  hostIP: 192.168.0.2
  conditions: [{type: Initialized, status: "True"}, {type: Ready, status: "True"}]
"#,
        )
        .unwrap();
        assert!(pod.is_ready());
        assert!(!pod.is_terminated());
        assert_eq!(pod.netns(), Some("/run/netns/web-1"));
        assert_eq!(pod.service_account(), "default");
        assert_eq!(pod.ips().len(), 2);
        assert_eq!(pod.named_port("http", "TCP"), Some(8080));
        assert_eq!(pod.named_port("dns", "TCP"), None);
        assert_eq!(pod.named_port("dns", "UDP"), Some(53));
    }

    #[test]
    fn pod_ready_needs_true_string() {
        let pod: Pod =
            serde_yaml::from_str("status: {conditions: [{type: Ready, status: \"False\"}]}")
                .unwrap();
        assert!(!pod.is_ready());
    }

    #[test]
    fn pod_without_ready_condition_is_ready_only_when_running() {
        let ready = |status: &str| {
            let pod: Pod = serde_yaml::from_str(&format!("status: {status}")).unwrap();
            pod.is_ready()
        };
        assert!(ready("{podIP: 10.0.0.1}"));
        assert!(ready("{podIP: 10.0.0.1, phase: Running}"));
        assert!(!ready("{podIP: 10.0.0.1, phase: Pending}"));
        assert!(!ready(
            "{podIP: 10.0.0.1, phase: Running, conditions: [{type: Ready, status: \"False\"}]}"
        ));
        assert!(ready(
            "{phase: Pending, conditions: [{type: Ready, status: \"True\"}]}"
        ));
    }

    #[test]
    fn endpoint_readiness() {
        let slice: EndpointSlice = serde_yaml::from_str(
            r#"
metadata: {name: web-abc, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints:
  - addresses: [10.0.0.1]
  - addresses: [10.0.0.2]
    conditions: {ready: false}
  - addresses: [10.0.0.3]
    conditions: {ready: true, terminating: true}
  - addresses: [10.0.0.4]
    conditions: {ready: true}
ports: [{name: http, port: 8080}]
"#,
        )
        .unwrap();
        assert_eq!(slice.service_name(), Some("web"));
        let ready: Vec<bool> = slice.endpoints.iter().map(Endpoint::is_ready).collect();
        assert_eq!(ready, [true, false, false, true]);
        assert_eq!(slice.ports[0].protocol, "TCP");
    }
}
