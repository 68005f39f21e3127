//! The node proxy's view of the world (issue 4): the agent side of [`crate::proxy::Environment`].
//!
//! Everything the proxy trusts comes from here:
//! - who a redirected client is, and where it meant to go: the kernel's record in `proxy_orig` (written by the
//!   connect hook and sock_ops, keyed by the client's address and port), whose netns cookie names the pod;
//! - where a destination lives: the enrolled pod's `status.hostIP` (the tunnel goes to its node's port 15008);
//! - whether a connection is allowed: the `AuthorizationPolicy` reference evaluator, with the peer's
//!   authenticated identity;
//! - certificates: the [`CertManager`].
//!
//! [`MeshView`] is rebuilt (pure) after every sync and swapped in whole, so a proxy decision never sees half of
//! an update.

use std::collections::{BTreeMap, HashMap as StdHashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};

use aya::maps::{HashMap, MapData};
use mesh_common::policy::{OrigDst, OrigKey};

use crate::enrollment;
use crate::identity::{CertManager, SpiffeId};
use crate::k8s::Pod;
use crate::policy::AuthorizationPolicy;
use crate::policy::eval::{Evaluator, Identity, Protocol, Request};
use crate::proxy::{Authz, Destination, Environment, Redirected, Workload};
use crate::source::Snapshot;

/// The label Istio and Kubernetes dashboards use for a workload's name.
const APP_NAME_LABELS: [&str; 2] = ["app.kubernetes.io/name", "app"];

/// An enrolled pod as the proxy needs it.
#[derive(Clone, Debug)]
struct Entry {
    workload: Workload,
    labels: BTreeMap<String, String>,
    host_ip: Option<IpAddr>,
    local: bool,
    /// For a local pod: the policies that apply to it (the only ones its verdicts depend on), so that a
    /// connection's authorization compiles a handful of rules, not every policy in the cluster.
    policies: Vec<AuthorizationPolicy>,
}

/// A consistent picture of the mesh for the proxy, built from one snapshot.
#[derive(Clone, Debug, Default)]
pub struct MeshView {
    root_namespace: String,
    tunnel_port: u16,
    /// Enrolled pods by address.
    by_ip: StdHashMap<IpAddr, Arc<Entry>>,
    /// This node's pods (enrolled or not) by netns cookie.
    by_cookie: StdHashMap<u64, Arc<Entry>>,
}

fn workload_of(pod: &Pod, ip: IpAddr) -> Workload {
    let name = APP_NAME_LABELS
        .iter()
        .find_map(|l| pod.metadata.labels.get(*l))
        .cloned()
        .unwrap_or_else(|| pod.metadata.name.clone());
    Workload {
        namespace: pod.metadata.namespace.clone(),
        name: pod.metadata.name.clone(),
        workload: name,
        service_account: pod.service_account().to_string(),
        ip,
    }
}

impl MeshView {
    /// `cookies`: this node's pods (`namespace/name`) by netns cookie; `policies`: those in force.
    pub fn build(
        snapshot: &Snapshot,
        node: &str,
        root_namespace: &str,
        tunnel_port: u16,
        cookies: &BTreeMap<u64, String>,
        policies: Vec<AuthorizationPolicy>,
    ) -> MeshView {
        let no_labels = BTreeMap::new();
        let mut view = MeshView {
            root_namespace: root_namespace.to_string(),
            tunnel_port,
            ..Default::default()
        };
        let evaluator = Evaluator::new(&policies, root_namespace);
        let mut by_key = StdHashMap::new();
        for pod in &snapshot.pods {
            if pod.is_terminated() {
                continue;
            }
            let ips = pod.ips();
            let Some(&first) = ips.first() else { continue };
            let ns_labels = snapshot
                .namespaces
                .iter()
                .find(|n| n.metadata.name == pod.metadata.namespace)
                .map_or(&no_labels, |n| &n.metadata.labels);
            let local = pod.spec.node_name.as_deref() == Some(node);
            let enrolled = enrollment::enrolled(&pod.metadata.labels, ns_labels);
            // The proxy names redirected clients (this node's pods) and carries to enrolled pods: nothing else.
            if !local && !enrolled {
                continue;
            }
            // Only an enrolled local pod is ever authorized (see `authorize`).
            let applicable = if local && enrolled {
                evaluator
                    .applicable(&pod.metadata.namespace, &pod.metadata.labels)
                    .into_iter()
                    .map(|i| policies[i].clone())
                    .collect()
            } else {
                Vec::new()
            };
            let entry = Arc::new(Entry {
                workload: workload_of(pod, first),
                labels: pod.metadata.labels.clone(),
                host_ip: pod.status.host_ip.as_deref().and_then(|s| s.parse().ok()),
                local,
                policies: applicable,
            });
            if enrolled {
                for ip in ips {
                    view.by_ip.insert(ip.to_canonical(), entry.clone());
                }
            }
            if local {
                by_key.insert(pod.metadata.key(), entry);
            }
        }
        for (cookie, key) in cookies {
            if let Some(e) = by_key.get(key) {
                view.by_cookie.insert(*cookie, e.clone());
            }
        }
        view
    }

    /// `AuthorizationPolicy` for a connection from the authenticated `source` to `dst`, an enrolled workload on this
    /// node (anything else is refused: this proxy only delivers locally).
    pub fn authorize(&self, source: &Identity, source_ip: IpAddr, dst: SocketAddr) -> Authz {
        let Some(e) = self.by_ip.get(&dst.ip().to_canonical()).filter(|e| e.local) else {
            return Authz {
                allowed: false,
                reason: format!("{} is not an enrolled workload on this node", dst.ip()),
            };
        };
        let req = Request {
            source: Some(source.clone()),
            source_ip,
            dest_namespace: e.workload.namespace.clone(),
            dest_labels: e.labels.clone(),
            dest_port: dst.port(),
            protocol: Protocol::Tcp,
        };
        // Only the destination's applicable policies: the same verdict as over all of them (the others do not
        // apply), at the cost of compiling a few rules.
        let verdict = Evaluator::new(&e.policies, &self.root_namespace).evaluate(&req);
        Authz {
            allowed: verdict.allowed,
            reason: verdict.to_string(),
        }
    }

    /// The service accounts of this node's enrolled pods: the SVIDs the agent must hold.
    pub fn local_identities(&self, trust_domain: &str) -> Vec<SpiffeId> {
        let mut ids: Vec<SpiffeId> = self
            .by_ip
            .values()
            .filter(|e| e.local)
            .filter_map(|e| {
                SpiffeId::new(
                    trust_domain,
                    &e.workload.namespace,
                    &e.workload.service_account,
                )
                .ok()
            })
            .collect();
        ids.sort_by_key(|id| id.uri());
        ids.dedup();
        ids
    }
}

/// The agent's [`Environment`]: the kernel's records, the current [`MeshView`], and the certificates.
pub struct AgentEnv {
    view: RwLock<Arc<MeshView>>,
    orig: Mutex<HashMap<MapData, OrigKey, OrigDst>>,
    certs: Arc<CertManager>,
    trust_domain: String,
}

impl AgentEnv {
    pub fn new(
        orig: HashMap<MapData, OrigKey, OrigDst>,
        certs: Arc<CertManager>,
        trust_domain: &str,
    ) -> Self {
        AgentEnv {
            view: RwLock::new(Arc::new(MeshView::default())),
            orig: Mutex::new(orig),
            certs,
            trust_domain: trust_domain.to_string(),
        }
    }

    pub fn set_view(&self, view: MeshView) {
        *self.view.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(view);
    }

    fn view(&self) -> Arc<MeshView> {
        self.view.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

fn orig_key(peer: SocketAddr) -> OrigKey {
    let addr = match peer.ip().to_canonical() {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    };
    OrigKey {
        addr,
        port: peer.port(),
        _pad: [0; 6],
    }
}

impl Environment for AgentEnv {
    fn redirected(&self, peer: SocketAddr) -> Option<Redirected> {
        let key = orig_key(peer);
        let orig = {
            let mut map = self.orig.lock().unwrap_or_else(|e| e.into_inner());
            let orig = map.get(&key, 0).ok()?;
            // One use: a later connection from the same address and port gets its own record.
            let _ = map.remove(&key);
            orig
        };
        let view = self.view();
        let client = view.by_cookie.get(&orig.netns_cookie)?;
        let ip = std::net::Ipv6Addr::from(orig.addr).to_canonical();
        Some(Redirected {
            original_dst: SocketAddr::new(ip, orig.port),
            client: Workload {
                ip: peer.ip().to_canonical(),
                ..client.workload.clone()
            },
        })
    }

    fn destination(&self, ip: IpAddr) -> Option<Destination> {
        let view = self.view();
        let e = view.by_ip.get(&ip.to_canonical())?;
        Some(Destination {
            workload: Workload {
                ip: ip.to_canonical(),
                ..e.workload.clone()
            },
            tunnel: SocketAddr::new(e.host_ip?, view.tunnel_port),
            local: e.local,
        })
    }

    fn authorize(&self, source: &Identity, source_ip: IpAddr, dst: SocketAddr) -> Authz {
        self.view().authorize(source, source_ip, dst)
    }

    fn client_tls(&self, source: &SpiffeId) -> Result<Arc<rustls::ClientConfig>, String> {
        self.certs
            .client_config(source)
            .map_err(|e| format!("{}: {e}", source.uri()))
    }

    fn server_tls(&self) -> Result<Arc<rustls::ServerConfig>, String> {
        Ok(self.certs.server_config())
    }

    fn trust_domain(&self) -> &str {
        &self.trust_domain
    }
}

/// The running node proxy with what feeds it: started by `run` when the proxy is on.
pub struct MeshRuntime {
    pub env: Arc<AgentEnv>,
    pub certs: Arc<CertManager>,
    pub metrics: crate::proxy::ProxyMetrics,
    proxy: crate::proxy::ProxyThread,
    tunnel_port: u16,
}

impl MeshRuntime {
    /// Adds the proxy address to `lo`, loads (or generates) the CA, and starts the proxy thread.
    pub fn start(
        cfg: &crate::config::Config,
        settings: &crate::config::ProxySettings,
        layout: &crate::ebpf::Layout,
    ) -> anyhow::Result<MeshRuntime> {
        use anyhow::Context as _;
        let netns = settings.netns.as_deref();
        let in_netns = |what: &str| {
            format!(
                "{what} in network namespace {}",
                netns.map_or("(the agent's own)".into(), |p| p.display().to_string())
            )
        };
        for addr in std::iter::once(IpAddr::V4(settings.addr)).chain(settings.addr6.map(IpAddr::V6))
        {
            crate::sys::in_netns(netns, || crate::sys::ensure_loopback_addr(addr))
                .and_then(|r| r)
                .with_context(|| in_netns(&format!("adding the proxy address {addr} to lo")))?;
        }
        let ca = match &cfg.ca_dir {
            Some(dir) => crate::identity::Ca::load(dir, &cfg.trust_domain)
                .with_context(|| format!("loading the CA from --ca-dir {}", dir.display()))?,
            None => {
                let (ca, source) =
                    crate::identity::Ca::load_or_generate(&cfg.state_dir, &cfg.trust_domain)
                        .with_context(|| {
                            format!("the CA in --state-dir {}", cfg.state_dir.display())
                        })?;
                tracing::info!(state_dir = %cfg.state_dir.display(), ?source, "CA");
                ca
            }
        };
        let proxy_id = SpiffeId::new(
            &cfg.trust_domain,
            &cfg.mesh_root_namespace,
            &settings.service_account,
        )?;
        let certs = Arc::new(CertManager::new(
            ca,
            crate::identity::SvidOptions::with_lifetime(cfg.svid_lifetime),
            proxy_id,
        )?);
        let orig = HashMap::try_from(crate::ebpf::open_map(
            layout,
            mesh_common::map_names::PROXY_ORIG,
        )?)?;
        let env = Arc::new(AgentEnv::new(orig, certs.clone(), &cfg.trust_domain));
        let metrics = crate::proxy::ProxyMetrics::new();
        let mut outbound = vec![SocketAddr::new(
            IpAddr::V4(settings.addr),
            settings.outbound_port,
        )];
        if let Some(a6) = settings.addr6 {
            outbound.push(SocketAddr::new(IpAddr::V6(a6), settings.outbound_port));
        }
        let proxy_cfg = crate::proxy::ProxyConfig {
            outbound,
            inbound: SocketAddr::new(
                IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
                settings.inbound_port,
            ),
            local_source_v4: Some(settings.addr),
            local_source_v6: settings.addr6,
            max_connections: settings.max_connections,
            max_streams_per_tunnel: settings.max_streams,
            drain_timeout: settings.drain_timeout,
            ..Default::default()
        };
        // The proxy thread inherits the namespace of the thread that spawns it.
        let (env2, metrics2) = (env.clone(), metrics.clone());
        let proxy = crate::sys::in_netns(netns, move || {
            crate::proxy::Proxy::spawn_thread(proxy_cfg, env2, metrics2)
        })
        .and_then(|r| r)
        .with_context(|| in_netns("starting the node proxy"))?;
        Ok(MeshRuntime {
            env,
            certs,
            metrics,
            proxy,
            tunnel_port: settings.inbound_port,
        })
    }

    /// After a sync: the proxy's new view, and SVIDs for this node's enrolled service accounts.
    ///
    /// The plane's lock is held only to read what is in force, not while certificates are issued.
    pub fn update(
        &self,
        snapshot: &Snapshot,
        node: &str,
        root_namespace: &str,
        plane: &std::sync::Mutex<crate::policy::live::PolicyPlane>,
    ) {
        let (cookies, policies) = {
            let plane = plane.lock().unwrap_or_else(|e| e.into_inner());
            (plane.local_pods_by_cookie(), plane.policies_in_force())
        };
        let view = MeshView::build(
            snapshot,
            node,
            root_namespace,
            self.tunnel_port,
            &cookies,
            policies,
        );
        let ids = view.local_identities(self.certs.trust_domain());
        self.env.set_view(view);
        for (id, e) in self.certs.ensure(ids) {
            tracing::warn!(spiffe_id = %id.uri(), error = %e, "cannot issue a certificate");
        }
    }

    /// Renews certificates at half-life, forever (spawned by `run`).
    pub async fn renew_loop(certs: Arc<CertManager>) {
        loop {
            let now = std::time::SystemTime::now();
            let report = certs.renew_due(now);
            for id in &report.renewed {
                tracing::info!(spiffe_id = %id.uri(), "certificate renewed");
            }
            for (id, e) in &report.failed {
                tracing::warn!(spiffe_id = %id.uri(), error = %e, "certificate renewal failed; the old one stays");
            }
            // Wake at the next renewal, but at least every 30 s (new workloads, clock changes).
            let wait = certs
                .next_renewal()
                .and_then(|t| t.duration_since(std::time::SystemTime::now()).ok())
                .unwrap_or_default()
                .clamp(
                    std::time::Duration::from_millis(200),
                    std::time::Duration::from_secs(30),
                );
            tokio::time::sleep(wait).await;
        }
    }

    /// Stops accepting and lets open connections finish (up to the drain timeout). Blocking.
    pub fn drain(self) -> usize {
        match self.proxy.join() {
            Ok(cut) => cut,
            Err(e) => {
                tracing::error!(error = %e, "node proxy");
                0
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(ns: &str, name: &str, ip: &str, node: &str, mesh: bool) -> Pod {
        let mut labels = json!({"app": name});
        if mesh {
            labels["sinew.dev/mesh"] = json!("enabled");
        }
        serde_json::from_value(json!({
            "metadata": {"namespace": ns, "name": name, "labels": labels},
            "spec": {"nodeName": node, "serviceAccountName": name},
            "status": {"podIP": ip, "hostIP": if node == "n1" { "192.168.0.1" } else { "192.168.0.2" },
                       "phase": "Running"}
        }))
        .unwrap()
    }

    fn allow_from(ns: &str, name: &str, app: &str, principal: &str) -> AuthorizationPolicy {
        serde_json::from_value(json!({
            "apiVersion": "security.sinew.dev/v1alpha1", "kind": "AuthorizationPolicy",
            "metadata": {"namespace": ns, "name": name},
            "spec": {"selector": {"matchLabels": {"app": app}}, "action": "ALLOW",
                     "rules": [{"from": [{"source": {"principals": [principal]}}]}]}
        }))
        .unwrap()
    }

    fn view() -> MeshView {
        let snapshot = Snapshot {
            pods: vec![
                pod("a", "web", "10.0.0.1", "n1", true),
                pod("a", "db", "10.0.0.2", "n1", true),
                pod("a", "plain", "10.0.0.3", "n1", false),
                pod("a", "remote", "10.0.1.1", "n2", true),
            ],
            ..Default::default()
        };
        let mut policies = vec![allow_from(
            "a",
            "web-from-cli",
            "web",
            "cluster.local/ns/a/sa/cli",
        )];
        // Many policies that apply elsewhere must not change the verdicts (nor be compiled per connection).
        for i in 0..200 {
            policies.push(allow_from(
                "a",
                &format!("other-{i}"),
                &format!("x{i}"),
                "x/ns/y/sa/z",
            ));
        }
        let cookies = BTreeMap::from([(7u64, "a/web".to_string()), (8, "a/plain".to_string())]);
        MeshView::build(&snapshot, "n1", "sinew-system", 15008, &cookies, policies)
    }

    fn id(sa: &str) -> Identity {
        Identity::new("cluster.local", "a", sa)
    }

    #[test]
    fn authorizes_with_the_destinations_policies_only_and_only_locally() {
        let v = view();
        let ip: IpAddr = "10.0.9.9".parse().unwrap();
        let web = "10.0.0.1:8080".parse().unwrap();
        assert!(v.authorize(&id("cli"), ip, web).allowed);
        let denied = v.authorize(&id("other"), ip, web);
        assert!(!denied.allowed, "{denied:?}");
        // No policy applies to db: allowed.
        assert!(
            v.authorize(&id("other"), ip, "10.0.0.2:5432".parse().unwrap())
                .allowed
        );
        // Not enrolled, or on another node: this proxy never delivers there.
        for dst in ["10.0.0.3:80", "10.0.1.1:80", "10.9.9.9:80"] {
            let a = v.authorize(&id("cli"), ip, dst.parse().unwrap());
            assert!(!a.allowed, "{dst}: {a:?}");
        }
    }

    #[test]
    fn names_destinations_and_local_identities() {
        let v = view();
        assert!(v.by_ip.contains_key(&"10.0.1.1".parse::<IpAddr>().unwrap()));
        assert!(!v.by_ip.contains_key(&"10.0.0.3".parse::<IpAddr>().unwrap()));
        assert_eq!(v.by_cookie[&7].workload.name, "web");
        assert_eq!(v.by_cookie[&8].workload.name, "plain");
        let ids: Vec<String> = v
            .local_identities("cluster.local")
            .iter()
            .map(|i| i.uri())
            .collect();
        assert_eq!(
            ids,
            [
                "spiffe://cluster.local/ns/a/sa/db",
                "spiffe://cluster.local/ns/a/sa/web"
            ]
        );
    }
}
