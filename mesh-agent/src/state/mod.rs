//! Desired state: what the kernel's service maps should hold, computed from a [`Snapshot`] of objects.
//!
//! [`compute`] is a pure function (no I/O, no clock, no randomness): the same snapshot always gives the same
//! [`DesiredState`], in a deterministic order. The reconciler diffs it against the pinned maps and writes the
//! difference; nothing here knows about maps or their IDs.
//!
//! Endpoints follow Kubernetes: a Service with EndpointSlices takes its backends from them alone; a Service
//! without slices but with a selector gets them from its Ready pods (what the endpoints controller would
//! have written into a slice); a Service with neither has no backends, so connects to it fail at once.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use crate::k8s::{EndpointSlice, IntOrString, Pod, Service, ServicePort};
use crate::source::Snapshot;

/// Transport protocol of a frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

/// A Service VIP, port and protocol: what a client connects to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    pub ip: IpAddr,
    pub port: u16,
    pub proto: Proto,
}

/// Where a connection to a frontend may be sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendAddr {
    pub ip: IpAddr,
    pub port: u16,
}

/// The Service port behind a frontend and its backends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceEntry {
    pub namespace: String,
    pub name: String,
    pub port_name: String,
    /// Sorted and deduplicated; of the frontend's IP family. Empty means "refuse connects".
    pub backends: Vec<BackendAddr>,
}

/// Everything the service maps should hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub services: BTreeMap<Frontend, ServiceEntry>,
}

impl Proto {
    /// The protocol of a Kubernetes port (`TCP`, `UDP`); `None` for anything we do not balance.
    pub fn from_k8s(protocol: &str) -> Option<Proto> {
        match protocol {
            "TCP" => Some(Proto::Tcp),
            "UDP" => Some(Proto::Udp),
            _ => None,
        }
    }

    /// `tcp` or `udp`, as in `dump services` and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Frontend {
    /// `ip:port` (bracketed for IPv6), the `vip` of metrics.
    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.port)
    }
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.socket_addr(), self.proto)
    }
}

/// Computes the desired service maps from a snapshot of validated objects.
///
/// Every cluster IP of a Service, times every Service port, is one frontend. If two Services claim the same
/// frontend (the API server prevents this, a directory of files does not), the Service whose
/// `namespace/name` sorts first keeps it and the conflict is logged.
#[allow(
    unused_variables,
    reason = "`node` will drive locality preference (same node, then same zone)"
)]
pub fn compute(snapshot: &Snapshot, node: &str) -> DesiredState {
    let mut slices: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
    for slice in &snapshot.endpoint_slices {
        if let Some(service) = slice.service_name() {
            let key = (slice.metadata.namespace.as_str(), service);
            slices.entry(key).or_default().push(slice);
        }
    }
    let mut services: Vec<&Service> = snapshot.services.iter().collect();
    services.sort_by(|a, b| {
        let key = |s: &Service| (s.metadata.namespace.clone(), s.metadata.name.clone());
        key(a).cmp(&key(b))
    });

    let mut desired = DesiredState::default();
    for svc in services {
        let meta = &svc.metadata;
        let svc_slices = slices.get(&(meta.namespace.as_str(), meta.name.as_str()));
        for port in &svc.spec.ports {
            let (Some(proto), Ok(number)) =
                (Proto::from_k8s(&port.protocol), u16::try_from(port.port))
            else {
                continue;
            };
            for ip in svc.cluster_ips() {
                let ipv4 = ip.is_ipv4();
                let mut backends = match svc_slices {
                    Some(slices) => slice_backends(slices, port, ipv4),
                    None if !svc.spec.selector.is_empty() => {
                        pod_backends(svc, port, &snapshot.pods, ipv4)
                    }
                    None => Vec::new(),
                };
                backends.sort();
                backends.dedup();
                let frontend = Frontend {
                    ip,
                    port: number,
                    proto,
                };
                if let Some(owner) = desired.services.get(&frontend) {
                    tracing::warn!(
                        %frontend,
                        kept = %format_args!("{}/{}", owner.namespace, owner.name),
                        ignored = %meta.key(),
                        "two Services claim the same frontend"
                    );
                    continue;
                }
                let entry = ServiceEntry {
                    namespace: meta.namespace.clone(),
                    name: meta.name.clone(),
                    port_name: port.name.clone(),
                    backends,
                };
                desired.services.insert(frontend, entry);
            }
        }
    }
    desired
}

/// Backends from a Service's EndpointSlices: ready, not terminating endpoints of the right IP family, on
/// the slice port with the Service port's name and protocol.
fn slice_backends(slices: &[&EndpointSlice], port: &ServicePort, ipv4: bool) -> Vec<BackendAddr> {
    let mut backends = Vec::new();
    for slice in slices {
        let slice_port = slice
            .ports
            .iter()
            .find(|p| p.name == port.name && p.protocol == port.protocol)
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok())
            .filter(|&p| p != 0);
        let Some(slice_port) = slice_port else {
            continue;
        };
        for endpoint in slice.endpoints.iter().filter(|e| e.is_ready()) {
            // FQDN addresses do not parse and so are skipped: the kernel balances to IPs only.
            let ips = endpoint
                .addresses
                .iter()
                .filter_map(|a| a.parse::<IpAddr>().ok());
            for ip in ips.filter(|ip| ip.is_ipv4() == ipv4) {
                backends.push(BackendAddr {
                    ip,
                    port: slice_port,
                });
            }
        }
    }
    backends
}

/// Backends from the pods a Service selects, as the endpoints controller would compute them: Ready pods of
/// the Service's namespace that have not terminated and carry every selector label.
fn pod_backends(svc: &Service, port: &ServicePort, pods: &[Pod], ipv4: bool) -> Vec<BackendAddr> {
    let selected = pods.iter().filter(|pod| {
        pod.metadata.namespace == svc.metadata.namespace
            && svc
                .spec
                .selector
                .iter()
                .all(|(k, v)| pod.metadata.labels.get(k) == Some(v))
            && pod.is_ready()
            && !pod.is_terminated()
    });
    let mut backends = Vec::new();
    for pod in selected {
        let target = match &port.target_port {
            None => u16::try_from(port.port).ok(),
            Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
            // A pod without a port of that name is not an endpoint for this Service port.
            Some(IntOrString::String(name)) => pod.named_port(name, &port.protocol),
        };
        let Some(target) = target.filter(|&p| p != 0) else {
            continue;
        };
        for ip in pod.ips().into_iter().filter(|ip| ip.is_ipv4() == ipv4) {
            backends.push(BackendAddr { ip, port: target });
        }
    }
    backends
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(yaml: &str) -> Snapshot {
        let mut snapshot = Snapshot::default();
        for doc in serde_yaml::Deserializer::from_str(yaml) {
            let value = <serde_yaml::Value as serde::Deserialize>::deserialize(doc).unwrap();
            if value.is_null() {
                continue;
            }
            match value["kind"].as_str().unwrap() {
                "Service" => snapshot
                    .services
                    .push(serde_yaml::from_value(value).unwrap()),
                "EndpointSlice" => snapshot
                    .endpoint_slices
                    .push(serde_yaml::from_value(value).unwrap()),
                "Pod" => snapshot.pods.push(serde_yaml::from_value(value).unwrap()),
                other => panic!("kind {other}"),
            }
        }
        snapshot
    }

    fn fe(ip: &str, port: u16, proto: Proto) -> Frontend {
        Frontend {
            ip: ip.parse().unwrap(),
            port,
            proto,
        }
    }

    fn backends(state: &DesiredState, frontend: Frontend) -> Vec<String> {
        state.services[&frontend]
            .backends
            .iter()
            .map(|b| SocketAddr::new(b.ip, b.port).to_string())
            .collect()
    }

    fn pod(name: &str, labels: &str, ip: &str, ready: bool, extra: &str) -> String {
        let status = if ready { "True" } else { "False" };
        format!(
            "kind: Pod\nmetadata: {{name: {name}, labels: {labels}}}\n\
             spec: {{containers: [{{name: app, ports: [{{name: http, containerPort: 8080}}]}}]}}\n\
             status: {{podIP: '{ip}', conditions: [{{type: Ready, status: '{status}'}}]{extra}}}\n---\n"
        )
    }

    const WEB: &str = "kind: Service\nmetadata: {name: web}\nspec:\n  clusterIP: 10.96.0.10\n  selector: {app: web}\n  ports:\n    - {name: http, port: 80, targetPort: 8080}\n---\n";

    #[test]
    fn selector_endpoints_from_ready_pods() {
        let yaml = [
            WEB,
            &pod("a", "{app: web}", "10.244.0.2", true, ""),
            &pod("b", "{app: web, tier: x}", "10.244.0.1", true, ""),
            &pod("notready", "{app: web}", "10.244.0.3", false, ""),
            &pod("other", "{app: db}", "10.244.0.4", true, ""),
            &pod("noip", "{app: web}", "", true, ""),
            &pod("done", "{app: web}", "10.244.0.5", true, ", phase: Succeeded"),
            &pod("failed", "{app: web}", "10.244.0.6", true, ", phase: Failed"),
            "kind: Pod\nmetadata: {name: elsewhere, namespace: other, labels: {app: web}}\nstatus: {podIP: 10.244.0.7, conditions: [{type: Ready, status: 'True'}]}\n",
        ]
        .concat();
        let state = compute(&snapshot(&yaml), "node-a");
        assert_eq!(state.services.len(), 1);
        let frontend = fe("10.96.0.10", 80, Proto::Tcp);
        assert_eq!(
            backends(&state, frontend),
            ["10.244.0.1:8080", "10.244.0.2:8080"]
        );
        let entry = &state.services[&frontend];
        assert_eq!(
            (
                entry.namespace.as_str(),
                entry.name.as_str(),
                entry.port_name.as_str()
            ),
            ("default", "web", "http")
        );
    }

    #[test]
    fn named_and_absent_target_port() {
        let yaml = [
            "kind: Service\nmetadata: {name: web}\nspec:\n  clusterIP: 10.96.0.10\n  selector: {app: web}\n  ports:\n    - {name: http, port: 80, targetPort: http}\n    - {name: plain, port: 81}\n    - {name: dns, port: 53, protocol: UDP, targetPort: http}\n---\n",
            &pod("a", "{app: web}", "10.244.0.1", true, ""),
            "kind: Pod\nmetadata: {name: b, labels: {app: web}}\nspec: {containers: [{name: app, ports: [{name: other, containerPort: 9090}]}]}\nstatus: {podIP: 10.244.0.2, conditions: [{type: Ready, status: 'True'}]}\n",
        ]
        .concat();
        let state = compute(&snapshot(&yaml), "n");
        assert_eq!(
            backends(&state, fe("10.96.0.10", 80, Proto::Tcp)),
            ["10.244.0.1:8080"]
        );
        assert_eq!(
            backends(&state, fe("10.96.0.10", 81, Proto::Tcp)),
            ["10.244.0.1:81", "10.244.0.2:81"]
        );
        // The pod's `http` port is TCP, so the UDP Service port finds no backend.
        assert!(backends(&state, fe("10.96.0.10", 53, Proto::Udp)).is_empty());
    }

    const SLICE: &str = "kind: EndpointSlice\nmetadata: {name: web-1, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{name: http, port: 9000}, {name: http, port: 9001, protocol: UDP}, {name: other, port: 7000}]\nendpoints:\n  - addresses: [10.1.0.2]\n  - addresses: [10.1.0.1]\n    conditions: {ready: true}\n  - addresses: [10.1.0.3]\n    conditions: {ready: false}\n  - addresses: [10.1.0.4]\n    conditions: {ready: true, terminating: true}\n  - addresses: [10.1.0.2]\n---\n";

    #[test]
    fn slices_override_selector() {
        let yaml = [WEB, SLICE, &pod("a", "{app: web}", "10.244.0.1", true, "")].concat();
        let state = compute(&snapshot(&yaml), "n");
        assert_eq!(
            backends(&state, fe("10.96.0.10", 80, Proto::Tcp)),
            ["10.1.0.1:9000", "10.1.0.2:9000"]
        );
    }

    #[test]
    fn slices_of_another_namespace_do_not_count() {
        let other = SLICE.replace("name: web-1,", "name: web-1, namespace: other,");
        let yaml = [WEB, &other, &pod("a", "{app: web}", "10.244.0.1", true, "")].concat();
        let state = compute(&snapshot(&yaml), "n");
        assert_eq!(
            backends(&state, fe("10.96.0.10", 80, Proto::Tcp)),
            ["10.244.0.1:8080"]
        );
    }

    #[test]
    fn slice_port_must_match_name_and_protocol() {
        let svc = "kind: Service\nmetadata: {name: web}\nspec:\n  clusterIP: 10.96.0.10\n  ports:\n    - {name: http, port: 80, protocol: UDP}\n    - {name: missing, port: 81}\n---\n";
        let state = compute(&snapshot(&[svc, SLICE].concat()), "n");
        assert_eq!(
            backends(&state, fe("10.96.0.10", 80, Proto::Udp)),
            ["10.1.0.1:9001", "10.1.0.2:9001"]
        );
        assert!(backends(&state, fe("10.96.0.10", 81, Proto::Tcp)).is_empty());
    }

    #[test]
    fn unnamed_ports_match_unnamed_slice_ports() {
        let yaml = "kind: Service\nmetadata: {name: web}\nspec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}\n---\nkind: EndpointSlice\nmetadata: {name: web-1, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{port: 8080}]\nendpoints: [{addresses: [10.1.0.1]}]\n";
        let state = compute(&snapshot(yaml), "n");
        assert_eq!(
            backends(&state, fe("10.96.0.10", 80, Proto::Tcp)),
            ["10.1.0.1:8080"]
        );
    }

    #[test]
    fn no_selector_no_slices_means_no_backends() {
        let yaml = "kind: Service\nmetadata: {name: ext}\nspec: {clusterIP: 10.96.0.20, ports: [{port: 443}]}\n---\n";
        let yaml = [yaml, &pod("a", "{app: web}", "10.244.0.1", true, "")].concat();
        let state = compute(&snapshot(&yaml), "n");
        let entry = &state.services[&fe("10.96.0.20", 443, Proto::Tcp)];
        assert!(entry.backends.is_empty());
        assert_eq!(entry.port_name, "");
    }

    #[test]
    fn headless_services_have_no_frontend() {
        let yaml = "kind: Service\nmetadata: {name: h}\nspec: {clusterIP: None, selector: {app: web}, ports: [{port: 80}]}\n";
        let state = compute(&snapshot(yaml), "n");
        assert!(state.services.is_empty());
    }

    #[test]
    fn dual_stack_backends_match_the_frontend_family() {
        let yaml = [
            "kind: Service\nmetadata: {name: web}\nspec:\n  clusterIP: 10.96.0.10\n  clusterIPs: [10.96.0.10, 'fd00::10']\n  selector: {app: web}\n  ports: [{name: http, port: 80, targetPort: 8080}]\n---\n",
            "kind: Pod\nmetadata: {name: a, labels: {app: web}}\nstatus:\n  podIP: 10.244.0.1\n  podIPs: [{ip: 10.244.0.1}, {ip: 'fd00:244::1'}]\n  conditions: [{type: Ready, status: 'True'}]\n---\n",
            &pod("v4only", "{app: web}", "10.244.0.2", true, ""),
        ]
        .concat();
        let state = compute(&snapshot(&yaml), "n");
        assert_eq!(state.services.len(), 2);
        assert_eq!(
            backends(&state, fe("10.96.0.10", 80, Proto::Tcp)),
            ["10.244.0.1:8080", "10.244.0.2:8080"]
        );
        assert_eq!(
            backends(&state, fe("fd00::10", 80, Proto::Tcp)),
            ["[fd00:244::1]:8080"]
        );
    }

    #[test]
    fn ipv6_slices_serve_only_the_ipv6_frontend() {
        let yaml = [
            "kind: Service\nmetadata: {name: web}\nspec:\n  clusterIPs: [10.96.0.10, 'fd00::10']\n  ports: [{name: http, port: 80}]\n---\n",
            "kind: EndpointSlice\nmetadata: {name: web-v6, labels: {kubernetes.io/service-name: web}}\naddressType: IPv6\nports: [{name: http, port: 8080}]\nendpoints: [{addresses: ['fd00:244::1']}]\n",
        ]
        .concat();
        let state = compute(&snapshot(&yaml), "n");
        assert!(backends(&state, fe("10.96.0.10", 80, Proto::Tcp)).is_empty());
        assert_eq!(
            backends(&state, fe("fd00::10", 80, Proto::Tcp)),
            ["[fd00:244::1]:8080"]
        );
    }

    #[test]
    fn frontend_conflict_goes_to_first_service_by_name() {
        let yaml = "kind: Service\nmetadata: {name: zeta}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n---\nkind: Service\nmetadata: {name: alpha}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n";
        let state = compute(&snapshot(yaml), "n");
        assert_eq!(
            state.services[&fe("10.96.0.1", 80, Proto::Tcp)].name,
            "alpha"
        );
    }

    #[test]
    fn output_is_deterministic() {
        let yaml = [WEB, SLICE, &pod("a", "{app: web}", "10.244.0.1", true, "")].concat();
        let mut snap = snapshot(&yaml);
        let first = compute(&snap, "n");
        snap.services.reverse();
        snap.endpoint_slices.reverse();
        snap.pods.reverse();
        assert_eq!(compute(&snap, "n"), first);
        assert_eq!(
            fe("fd00::1", 53, Proto::Udp).to_string(),
            "[fd00::1]:53/udp"
        );
    }
}
