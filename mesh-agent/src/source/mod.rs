//! Control inputs: where the Kubernetes objects come from, and the checks every object passes before it can
//! reach the desired state.
//!
//! A source produces a [`Snapshot`] (the accepted objects) and a list of [`SourceError`]s (what it rejected
//! and why). `state::compute` turns the snapshot into the desired maps. The only source so far is [`file`], a
//! directory of YAML that stands in for the API server on one machine; a Kubernetes source will produce the
//! same snapshot. Validation lives here, not in a source, so that both sources reject exactly the same
//! objects with the same messages.

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;

use serde::Serialize;

use crate::k8s::{
    EndpointSlice, IntOrString, Namespace, ObjectMeta, Pod, SERVICE_NAME_LABEL, Service,
};
use crate::peerauth::PeerAuthentication;
use crate::policy::AuthorizationPolicy;

pub mod file;
pub mod kubernetes;

/// Every accepted object, in a deterministic order (the file source: by file name, then position in the file).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Snapshot {
    pub services: Vec<Service>,
    pub endpoint_slices: Vec<EndpointSlice>,
    pub pods: Vec<Pod>,
    pub namespaces: Vec<Namespace>,
    /// `security.sinew.dev/v1alpha1` policies, each valid ([`crate::policy::validate`]).
    pub authorization_policies: Vec<AuthorizationPolicy>,
    /// `security.sinew.dev/v1alpha1` mTLS modes, each valid ([`crate::peerauth::validate`]).
    pub peer_authentications: Vec<PeerAuthentication>,
}

impl Snapshot {
    /// What the mesh half of the policy tables is compiled from (the node proxy's addresses are added by the
    /// policy plane, which knows them).
    pub fn mesh_inputs(&self) -> crate::policy::compile::MeshInputs {
        crate::policy::compile::MeshInputs {
            namespaces: self.namespaces.clone(),
            peer_authentications: self.peer_authentications.clone(),
            proxy_addrs: Vec::new(),
        }
    }
}

/// One rejected input. The admin endpoint exports these as `sinew_source_rejected{file,object,reason}`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}: {object}: {reason}", file.display())]
pub struct SourceError {
    /// The file (or directory) the input came from.
    pub file: PathBuf,
    /// What was rejected: `Service default/web`, `document 3`, or `file` when the whole file is unreadable.
    pub object: String,
    /// Why, naming the field where there is one.
    pub reason: String,
}

/// One object of a kind we read.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Service(Service),
    EndpointSlice(EndpointSlice),
    Pod(Pod),
    Namespace(Namespace),
    AuthorizationPolicy(AuthorizationPolicy),
    PeerAuthentication(PeerAuthentication),
}

/// What makes two objects "the same object": kind, namespace and name, as in the API server.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
}

impl Object {
    pub fn kind(&self) -> &'static str {
        match self {
            Object::Service(_) => "Service",
            Object::EndpointSlice(_) => "EndpointSlice",
            Object::Pod(_) => "Pod",
            Object::Namespace(_) => "Namespace",
            Object::AuthorizationPolicy(_) => crate::policy::KIND,
            Object::PeerAuthentication(_) => crate::peerauth::KIND,
        }
    }

    pub fn key(&self) -> ObjectKey {
        let (namespace, name) = match self {
            Object::Service(Service { metadata: m, .. })
            | Object::EndpointSlice(EndpointSlice { metadata: m, .. })
            | Object::Pod(Pod { metadata: m, .. }) => (m.namespace.clone(), m.name.clone()),
            // Namespaces are cluster-scoped: whatever metadata.namespace says is meaningless for them.
            Object::Namespace(n) => (String::new(), n.metadata.name.clone()),
            Object::AuthorizationPolicy(p) => (p.namespace().to_owned(), p.name().to_owned()),
            Object::PeerAuthentication(p) => (p.namespace().to_owned(), p.name().to_owned()),
        };
        ObjectKey {
            kind: self.kind(),
            namespace,
            name,
        }
    }

    /// Checks the object with the validator for its kind.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Object::Service(s) => validate_service(s),
            Object::EndpointSlice(s) => validate_endpoint_slice(s),
            Object::Pod(p) => validate_pod(p),
            Object::Namespace(n) if n.metadata.name.is_empty() => {
                Err("metadata.name: must not be empty".into())
            }
            Object::Namespace(_) => Ok(()),
            Object::AuthorizationPolicy(p) => crate::policy::validate(p),
            Object::PeerAuthentication(p) => crate::peerauth::validate(p),
        }
    }
}

impl fmt::Display for ObjectKey {
    /// `Service default/web`: how errors name an object.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

impl Snapshot {
    /// Adds an object to the list for its kind.
    pub fn push(&mut self, object: Object) {
        match object {
            Object::Service(s) => self.services.push(s),
            Object::EndpointSlice(s) => self.endpoint_slices.push(s),
            Object::Pod(p) => self.pods.push(p),
            Object::Namespace(n) => self.namespaces.push(n),
            Object::AuthorizationPolicy(p) => self.authorization_policies.push(p),
            Object::PeerAuthentication(p) => self.peer_authentications.push(p),
        }
    }
}

/// Checks a Service before it can program the kernel. An error names the field and says what is wrong.
///
/// Headless (`clusterIP: None`) and unallocated (empty) Services are valid: they simply have no frontend.
pub fn validate_service(svc: &Service) -> Result<(), String> {
    validate_meta(&svc.metadata)?;
    let spec = &svc.spec;
    let cluster_ip = spec.cluster_ip.as_deref().unwrap_or("");
    check_cluster_ip("spec.clusterIP", cluster_ip)?;
    let mut families = BTreeSet::new();
    for (i, ip) in spec.cluster_ips.iter().enumerate() {
        let field = format!("spec.clusterIPs[{i}]");
        if let Some(ip) = check_cluster_ip(&field, ip)? {
            // The kernel keys frontends by VIP, so a second VIP of the same family would be a second,
            // unrelated frontend; the API server refuses that too.
            if !families.insert(ip.is_ipv4()) {
                return Err(format!(
                    "{field}: second address of the same IP family ({ip})"
                ));
            }
        }
    }
    match spec.cluster_ips.first() {
        Some(first) if !cluster_ip.is_empty() && first != cluster_ip => {
            return Err(format!(
                "spec.clusterIPs[0] ({first}) must equal spec.clusterIP ({cluster_ip})"
            ));
        }
        _ => {}
    }
    let mut names = BTreeSet::new();
    let mut numbers = BTreeSet::new();
    for (i, port) in spec.ports.iter().enumerate() {
        let field = if port.name.is_empty() {
            format!("spec.ports[{i}]")
        } else {
            format!("spec.ports[{i}] ({})", port.name)
        };
        check_port(&field, "port", port.port)?;
        check_protocol(&field, &port.protocol)?;
        match &port.target_port {
            Some(IntOrString::Int(n)) => check_port(&field, "targetPort", *n)?,
            Some(IntOrString::String(name)) if !is_iana_svc_name(name) => {
                return Err(format!(
                    "{field}: targetPort {name:?} is neither a port number nor a port name \
                     (1-15 lowercase letters, digits and '-', with at least one letter)"
                ));
            }
            _ => {}
        }
        // Endpoints are matched to Service ports by name, so a repeated name (including two empty names)
        // would make that match ambiguous.
        if !names.insert(port.name.as_str()) {
            return Err(format!("{field}: duplicate port name {:?}", port.name));
        }
        if !numbers.insert((port.port, port.protocol.as_str())) {
            return Err(format!(
                "{field}: duplicate port {}/{}",
                port.port, port.protocol
            ));
        }
    }
    Ok(())
}

/// Checks an EndpointSlice: it must name its Service, and its addresses must be of its `addressType`.
pub fn validate_endpoint_slice(slice: &EndpointSlice) -> Result<(), String> {
    validate_meta(&slice.metadata)?;
    match slice.metadata.labels.get(SERVICE_NAME_LABEL) {
        Some(name) if !name.is_empty() => {}
        _ => return Err(format!("missing label {SERVICE_NAME_LABEL}")),
    }
    let want_v4 = match slice.address_type.as_str() {
        "IPv4" => Some(true),
        "IPv6" => Some(false),
        "FQDN" => None,
        other => {
            return Err(format!(
                "addressType {other:?} is not one of IPv4, IPv6, FQDN"
            ));
        }
    };
    for (i, ep) in slice.endpoints.iter().enumerate() {
        if ep.addresses.is_empty() {
            return Err(format!("endpoints[{i}]: no addresses"));
        }
        for (j, addr) in ep.addresses.iter().enumerate() {
            let field = format!("endpoints[{i}].addresses[{j}]");
            match want_v4 {
                None if addr.is_empty() => return Err(format!("{field}: empty")),
                None => {}
                Some(v4) => match addr.parse::<IpAddr>() {
                    Ok(ip) if ip.is_ipv4() == v4 => {}
                    Ok(ip) => {
                        return Err(format!(
                            "{field}: {ip} does not match addressType {}",
                            slice.address_type
                        ));
                    }
                    Err(_) => return Err(format!("{field}: {addr:?} is not an IP address")),
                },
            }
        }
    }
    let mut names = BTreeSet::new();
    for (i, port) in slice.ports.iter().enumerate() {
        let field = format!("ports[{i}]");
        if let Some(n) = port.port {
            check_port(&field, "port", n)?;
        }
        // SCTP is valid Kubernetes; it can never match a Service port we accept, so it is merely unused.
        if !matches!(port.protocol.as_str(), "TCP" | "UDP" | "SCTP") {
            return Err(format!("{field}: unknown protocol {:?}", port.protocol));
        }
        if !names.insert(port.name.as_str()) {
            return Err(format!("{field}: duplicate port name {:?}", port.name));
        }
    }
    Ok(())
}

/// Checks a Pod. Most of a pod is only read, so only what reaches the maps is checked: its IPs and ports.
pub fn validate_pod(pod: &Pod) -> Result<(), String> {
    validate_meta(&pod.metadata)?;
    let status = &pod.status;
    if let Some(ip) = status.pod_ip.as_deref().filter(|s| !s.is_empty()) {
        check_ip("status.podIP", ip)?;
    }
    for (i, ip) in status.pod_ips.iter().enumerate() {
        check_ip(&format!("status.podIPs[{i}].ip"), &ip.ip)?;
    }
    if let Some(ip) = status.host_ip.as_deref().filter(|s| !s.is_empty()) {
        check_ip("status.hostIP", ip)?;
    }
    for (i, c) in pod.spec.containers.iter().enumerate() {
        for (j, p) in c.ports.iter().enumerate() {
            let field = format!("spec.containers[{i}].ports[{j}]");
            check_port(&field, "containerPort", p.container_port)?;
            if !matches!(p.protocol.as_str(), "TCP" | "UDP" | "SCTP") {
                return Err(format!("{field}: unknown protocol {:?}", p.protocol));
            }
        }
    }
    Ok(())
}

fn validate_meta(meta: &ObjectMeta) -> Result<(), String> {
    if meta.name.is_empty() {
        return Err("metadata.name is empty".to_owned());
    }
    if meta.namespace.is_empty() {
        return Err("metadata.namespace is empty".to_owned());
    }
    Ok(())
}

/// An IP, or `None`/empty for a Service without a VIP. Returns the IP if there is one.
fn check_cluster_ip(field: &str, value: &str) -> Result<Option<IpAddr>, String> {
    match value {
        "" | "None" => Ok(None),
        _ => check_ip(field, value).map(Some),
    }
}

fn check_ip(field: &str, value: &str) -> Result<IpAddr, String> {
    value
        .parse()
        .map_err(|_| format!("{field}: {value:?} is not an IP address"))
}

fn check_port(field: &str, what: &str, port: i64) -> Result<(), String> {
    if (1..=65535).contains(&port) {
        Ok(())
    } else {
        Err(format!("{field}: {what} {port} is out of range 1..=65535"))
    }
}

fn check_protocol(field: &str, protocol: &str) -> Result<(), String> {
    match protocol {
        "TCP" | "UDP" => Ok(()),
        "SCTP" => Err(format!("{field}: unsupported protocol SCTP")),
        other => Err(format!(
            "{field}: unknown protocol {other:?} (expected TCP or UDP)"
        )),
    }
}

/// An IANA service name as Kubernetes validates a named port: 1-15 characters of `a-z`, `0-9` and `-`, at
/// least one letter, no leading, trailing or doubled `-`.
fn is_iana_svc_name(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.bytes().any(|b| b.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(yaml: &str) -> Service {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn service_error(spec: &str) -> String {
        validate_service(&service(&format!("metadata: {{name: web}}\nspec: {spec}"))).unwrap_err()
    }

    #[test]
    fn valid_services() {
        for spec in [
            "{clusterIP: 10.96.0.10, ports: [{name: http, port: 80, targetPort: 8080}]}",
            "{clusterIP: None, ports: [{port: 80}]}",
            "{clusterIP: '', ports: [{port: 80}]}",
            "{clusterIPs: [10.96.0.10, 'fd00::10'], ports: [{name: a, port: 80, targetPort: http-alt}]}",
            "{clusterIP: 10.96.0.10, ports: [{name: dns, port: 53, protocol: UDP}, {name: dns-tcp, port: 53}]}",
            "{}",
        ] {
            let svc = service(&format!("metadata: {{name: web}}\nspec: {spec}"));
            assert_eq!(validate_service(&svc), Ok(()), "{spec}");
        }
    }

    #[test]
    fn service_errors_name_the_field() {
        let cases = [
            (
                "{clusterIP: 10.96.0.300}",
                "spec.clusterIP: \"10.96.0.300\" is not an IP address",
            ),
            (
                "{clusterIPs: [10.96.0.1, nope]}",
                "spec.clusterIPs[1]: \"nope\" is not an IP address",
            ),
            (
                "{clusterIPs: [10.96.0.1, 10.96.0.2]}",
                "spec.clusterIPs[1]: second address of the same IP family",
            ),
            (
                "{clusterIP: 10.96.0.1, clusterIPs: [10.96.0.2]}",
                "spec.clusterIPs[0] (10.96.0.2) must equal",
            ),
            (
                "{ports: [{name: http, port: 0}]}",
                "spec.ports[0] (http): port 0 is out of range",
            ),
            (
                "{ports: [{port: 70000}]}",
                "spec.ports[0]: port 70000 is out of range",
            ),
            (
                "{ports: [{port: 80, targetPort: 65536}]}",
                "targetPort 65536 is out of range",
            ),
            (
                "{ports: [{port: 80, targetPort: ''}]}",
                "targetPort \"\" is neither",
            ),
            (
                "{ports: [{port: 80, targetPort: '8080'}]}",
                "targetPort \"8080\" is neither",
            ),
            (
                "{ports: [{port: 80, targetPort: Http}]}",
                "targetPort \"Http\" is neither",
            ),
            (
                "{ports: [{port: 80, protocol: SCTP}]}",
                "spec.ports[0]: unsupported protocol SCTP",
            ),
            (
                "{ports: [{port: 80, protocol: tcp}]}",
                "unknown protocol \"tcp\"",
            ),
            (
                "{ports: [{name: a, port: 80}, {name: a, port: 81}]}",
                "spec.ports[1] (a): duplicate port name \"a\"",
            ),
            (
                "{ports: [{port: 80}, {port: 81}]}",
                "spec.ports[1]: duplicate port name \"\"",
            ),
            (
                "{ports: [{name: a, port: 80}, {name: b, port: 80}]}",
                "duplicate port 80/TCP",
            ),
        ];
        for (spec, want) in cases {
            let err = service_error(spec);
            assert!(err.contains(want), "{spec}: got {err:?}, want {want:?}");
        }
    }

    #[test]
    fn metadata_must_be_named() {
        let err = validate_service(&service("metadata: {namespace: x}")).unwrap_err();
        assert_eq!(err, "metadata.name is empty");
        let err = validate_service(&service("metadata: {name: a, namespace: ''}")).unwrap_err();
        assert_eq!(err, "metadata.namespace is empty");
    }

    #[test]
    fn iana_names() {
        for ok in ["http", "h2c", "grpc-web", "a", "abcdefghijklmno"] {
            assert!(is_iana_svc_name(ok), "{ok}");
        }
        for bad in [
            "",
            "80",
            "-a",
            "a-",
            "a--b",
            "HTTP",
            "abcdefghijklmnop",
            "a_b",
        ] {
            assert!(!is_iana_svc_name(bad), "{bad}");
        }
    }

    fn slice_error(body: &str) -> String {
        let slice: EndpointSlice = serde_yaml::from_str(body).unwrap();
        validate_endpoint_slice(&slice).unwrap_err()
    }

    #[test]
    fn endpoint_slice_errors() {
        let label = "metadata: {name: s, labels: {kubernetes.io/service-name: web}}";
        assert_eq!(
            slice_error("metadata: {name: s}\naddressType: IPv4"),
            "missing label kubernetes.io/service-name"
        );
        let cases = [
            ("addressType: IPv5", "addressType \"IPv5\" is not one of"),
            (
                "addressType: FQDN\nendpoints: [{addresses: []}]",
                "endpoints[0]: no addresses",
            ),
            (
                "addressType: IPv4\nendpoints: [{addresses: ['fd00::1']}]",
                "endpoints[0].addresses[0]: fd00::1 does not match addressType IPv4",
            ),
            (
                "addressType: IPv6\nendpoints: [{addresses: [10.0.0.1]}]",
                "10.0.0.1 does not match addressType IPv6",
            ),
            (
                "addressType: IPv4\nendpoints: [{addresses: [10.0.0.1, x]}]",
                "endpoints[0].addresses[1]: \"x\" is not an IP address",
            ),
            (
                "addressType: IPv4\nports: [{port: 0}]",
                "ports[0]: port 0 is out of range",
            ),
            (
                "addressType: IPv4\nports: [{port: 1, protocol: ICMP}]",
                "unknown protocol",
            ),
            (
                "addressType: IPv4\nports: [{port: 1}, {port: 2}]",
                "ports[1]: duplicate port name",
            ),
        ];
        for (body, want) in cases {
            let err = slice_error(&format!("{label}\n{body}"));
            assert!(err.contains(want), "{body}: got {err:?}, want {want:?}");
        }
        let ok: EndpointSlice = serde_yaml::from_str(&format!(
            "{label}\naddressType: FQDN\nendpoints: [{{addresses: [db.example.com]}}]"
        ))
        .unwrap();
        assert_eq!(validate_endpoint_slice(&ok), Ok(()));
    }

    #[test]
    fn pod_errors() {
        let pod = |body: &str| -> Result<(), String> {
            validate_pod(&serde_yaml::from_str(&format!("metadata: {{name: p}}\n{body}")).unwrap())
        };
        assert_eq!(pod("status: {podIP: 10.0.0.1}"), Ok(()));
        assert_eq!(pod("status: {podIP: ''}"), Ok(()));
        assert_eq!(pod("status: {}"), Ok(()));
        assert_eq!(
            pod("status: {podIP: 10.0.0}").unwrap_err(),
            "status.podIP: \"10.0.0\" is not an IP address"
        );
        assert!(
            pod("status: {podIPs: [{ip: zz}]}")
                .unwrap_err()
                .starts_with("status.podIPs[0].ip:")
        );
        assert!(
            pod("spec: {containers: [{name: c, ports: [{containerPort: 0}]}]}")
                .unwrap_err()
                .contains("containerPort 0 is out of range")
        );
    }

    #[test]
    fn source_error_display() {
        let e = SourceError {
            file: PathBuf::from("/src/web.yaml"),
            object: "Service default/web".into(),
            reason: "spec.ports[0]: unsupported protocol SCTP".into(),
        };
        assert_eq!(
            e.to_string(),
            "/src/web.yaml: Service default/web: spec.ports[0]: unsupported protocol SCTP"
        );
    }
}
