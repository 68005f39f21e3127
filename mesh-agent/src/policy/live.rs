//! The agent's live policy state: what is in force in the kernel, explained.
//!
//! [`PolicyPlane`] compiles each snapshot, writes it through the epoch protocol, and keeps the policies, pods and
//! compilation that are in force, so that `/debug/policies`, `/debug/policy/check` and the denial events can be
//! answered from exactly what the kernel enforces.

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;

use mesh_common::policy::{
    DIR_EGRESS, PolicyEvent, VERDICT_DENY, VERDICT_FLAG_AUDIT, VERDICT_FLAG_STRICT, identity,
};
use serde::Serialize;
use tracing::{info, warn};

use super::compile::{self, Compiled, Inputs, MeshInputs};
use super::eval::{self, Evaluator, Identity, Protocol, Request, RuleStatus};
use super::{AuthorizationPolicy, validate};
use crate::ebpf::policy::{EventLimits, PolicyChanges, PolicyCounters, PolicyMaps, ProxyRedirect};
use crate::ebpf::reconcile::{bytes_addr, proto_name};
use crate::k8s::Pod;
use crate::peerauth::MtlsMode;
use crate::source::SourceError;

/// How many recent verdicts `/debug/flows` keeps.
const FLOWS_KEPT: usize = 4096;

/// Settings that do not come from the source.
#[derive(Clone, Debug)]
pub struct PolicySettings {
    pub node: String,
    pub root_namespace: String,
    pub trust_domain: String,
    pub limits: EventLimits,
    /// Where the kernel redirects enrolled connections (and the addresses it knows as the node proxy).
    pub proxy: ProxyRedirect,
    /// `--sockmap`: new same-node connections are accelerated (for the metrics; the install decides).
    pub sockmap: bool,
}

/// What a compilation is made from: the valid policies, the pods, and the netns cookies by pod.
type CompileInputs = (
    Vec<AuthorizationPolicy>,
    Vec<Pod>,
    BTreeMap<String, u64>,
    MeshInputs,
);

/// What is in force.
#[derive(Clone, Debug, Default)]
struct InForce {
    policies: Vec<AuthorizationPolicy>,
    pods: Vec<Pod>,
    compiled: Compiled,
    /// Local pods (`namespace/name`) by netns cookie, to name the source of an egress event.
    cookie_pods: BTreeMap<u64, String>,
    /// What this was compiled from (valid policies, pods, netns cookies by pod).
    inputs: Option<CompileInputs>,
    /// Policies left out of this compilation because they did not fit.
    too_large: Vec<SourceError>,
}

pub struct PolicyPlane {
    maps: PolicyMaps,
    settings: PolicySettings,
    /// Netns cookies by netns path. A path that is bound to a new namespace later gives a new cookie only after
    /// the pod is gone from the source once; pods get new netns paths in practice.
    cookies: BTreeMap<PathBuf, u64>,
    in_force: Option<InForce>,
    /// Bumped each time a new compilation reaches the kernel.
    pub revision: u64,
    /// Rejected AuthorizationPolicy objects, from the last load.
    rejected: Vec<SourceError>,
    flows: VecDeque<Flow>,
    next_seq: u64,
}

/// One reported verdict, explained.
#[derive(Clone, Debug, Serialize)]
pub struct Flow {
    pub seq: u64,
    /// Kernel monotonic time of the verdict, in nanoseconds.
    pub ts_ns: u64,
    /// `egress`: decided at the client's connect()/sendmsg(); `ingress`: at the server's first packet.
    pub direction: &'static str,
    /// Where the verdict was enforced: `client` or `server`.
    pub side: &'static str,
    pub verdict: &'static str,
    pub audit: bool,
    /// Refused by STRICT mTLS (plaintext to a port only the node proxy may reach), not by a policy.
    pub strict: bool,
    pub proto: &'static str,
    /// `ip:port`; at egress the source port is not chosen yet (0) and the address is the local pod's.
    pub src: String,
    pub dst: String,
    pub src_identity: String,
    pub dst_identity: String,
    /// `namespace/name` of the source and destination pods, when known.
    pub src_workload: Option<String>,
    pub dst_workload: Option<String>,
    /// The deciding policy and rule, from the reference evaluator over the policies in force.
    pub policy: Option<String>,
    pub rule: Option<usize>,
    pub reason: String,
}

/// What [`PolicyPlane::apply`] did.
#[derive(Debug)]
pub struct Applied {
    pub changes: PolicyChanges,
    /// Local pods whose netns could not be read (enforced only at their destinations for now).
    pub warnings: Vec<String>,
    /// Policies left out because the kernel tables could not hold them (also listed in `rejected`).
    pub too_large: Vec<SourceError>,
}

/// `/debug/policies`.
#[derive(Debug, Serialize)]
pub struct PolicyStatus {
    pub revision: u64,
    pub epoch: u32,
    pub generation: u32,
    /// Some policy applies to some workload, so the kernel checks connections.
    pub enforcing: bool,
    pub root_namespace: String,
    pub trust_domain: String,
    pub policies: Vec<PolicyView>,
    pub rejected: Vec<RejectedView>,
    pub identities: Vec<IdentityView>,
    pub kernel: KernelView,
    pub counters: PolicyCounters,
    /// Enrolled pods (`namespace/name`) and the mTLS mode of their TCP ports, as in force.
    pub mesh: BTreeMap<String, compile::Enrolled>,
}

#[derive(Debug, Serialize)]
pub struct PolicyView {
    pub namespace: String,
    pub name: String,
    pub action: String,
    /// Pods (`namespace/name`) the policy applies to.
    pub selects: Vec<String>,
    pub rules: Vec<RuleView>,
}

#[derive(Debug, Serialize)]
pub struct RuleView {
    pub index: usize,
    /// `kernel-enforced`, `proxy-required` or `rejected`.
    pub status: &'static str,
    pub reason: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct RejectedView {
    pub file: String,
    pub object: String,
    pub reason: String,
}

#[derive(Debug, Serialize)]
pub struct IdentityView {
    pub id: u32,
    pub name: String,
    pub spiffe: String,
}

#[derive(Debug, Serialize)]
pub struct KernelView {
    pub ipcache_entries: usize,
    pub local_endpoints: usize,
    pub verdict_entries: usize,
    pub source_classes: Vec<compile::SourceClass>,
    pub destination_classes: Vec<compile::DestClass>,
}

/// `/debug/policy/check`.
#[derive(Debug, Serialize)]
pub struct CheckResult {
    pub allowed: bool,
    pub verdict: &'static str,
    pub policy: Option<String>,
    pub rule: Option<usize>,
    pub action: Option<String>,
    pub reason: String,
    /// Matching AUDIT policies (`namespace/name rule N`).
    pub audit: Vec<String>,
    pub source: String,
    pub source_ip: Option<IpAddr>,
    pub destination: String,
    pub destination_ip: Option<IpAddr>,
    pub port: u16,
    pub proto: &'static str,
    /// What the kernel tables in force answer for the same connection (should always equal `verdict`).
    pub kernel_verdict: &'static str,
    /// How the deciding rule is enforced.
    pub enforcement: Option<String>,
    /// The mesh's part, when the destination is enrolled (TCP): the port's mTLS mode and what it means for this
    /// source.
    pub mtls: Option<String>,
}

pub fn status_word(s: &RuleStatus) -> (&'static str, Option<String>) {
    match s {
        RuleStatus::KernelEnforced => ("kernel-enforced", None),
        RuleStatus::ProxyRequired { reason } => ("proxy-required", Some(reason.clone())),
        RuleStatus::Rejected { reason } => ("rejected", Some(reason.clone())),
    }
}

impl PolicyPlane {
    pub fn new(maps: PolicyMaps, settings: PolicySettings) -> Self {
        Self {
            maps,
            settings,
            cookies: BTreeMap::new(),
            in_force: None,
            revision: 0,
            rejected: Vec::new(),
            flows: VecDeque::new(),
            next_seq: 1,
        }
    }

    pub fn settings(&self) -> &PolicySettings {
        &self.settings
    }

    /// This node's pods (`namespace/name`) by netns cookie, as in force: the node proxy names the client of a
    /// redirected connection by the cookie the kernel recorded.
    pub fn local_pods_by_cookie(&self) -> BTreeMap<u64, String> {
        self.in_force
            .as_ref()
            .map(|f| f.cookie_pods.clone())
            .unwrap_or_default()
    }

    /// The policies in force (valid, and not left out for size).
    pub fn policies_in_force(&self) -> Vec<AuthorizationPolicy> {
        self.in_force
            .as_ref()
            .map(|f| f.policies.clone())
            .unwrap_or_default()
    }

    /// Enrolled pods and their mTLS modes, as in force.
    pub fn enrolled(&self) -> BTreeMap<String, compile::Enrolled> {
        self.in_force
            .as_ref()
            .map(|f| f.compiled.enrolled.clone())
            .unwrap_or_default()
    }

    /// Netns cookies of this node's pods; a pod whose netns cannot be read yet is left out (it is still
    /// enforced at its destinations, and picked up on the next pass).
    fn resolve_cookies(&mut self, pods: &[Pod]) -> (BTreeMap<String, u64>, Vec<String>) {
        let mut out = BTreeMap::new();
        let mut problems = Vec::new();
        let mut seen = BTreeMap::new();
        for pod in pods {
            if pod.spec.node_name.as_deref() != Some(self.settings.node.as_str()) {
                continue;
            }
            let Some(path) = pod.netns() else { continue };
            let path = PathBuf::from(path);
            let cookie = match self.cookies.get(&path) {
                Some(c) => *c,
                None => match crate::sys::netns_cookie(&path) {
                    Ok(c) => c,
                    Err(e) => {
                        problems.push(format!(
                            "Pod {}: netns {}: {e}",
                            pod.metadata.key(),
                            path.display()
                        ));
                        continue;
                    }
                },
            };
            seen.insert(path, cookie);
            out.insert(pod.metadata.key(), cookie);
        }
        // Forget namespaces no pod names any more (their cookies die with them).
        self.cookies = seen;
        (out, problems)
    }

    /// Compiles and applies the policies and pods of a snapshot. Returns what changed, and warnings (pods whose
    /// netns could not be read). On error the previous compilation stays in force.
    pub fn apply(
        &mut self,
        policies: &[AuthorizationPolicy],
        pods: &[Pod],
        mesh: &MeshInputs,
        source_errors: &[SourceError],
    ) -> anyhow::Result<Applied> {
        let mut mesh = mesh.clone();
        mesh.proxy_addrs = [
            self.settings.proxy.addr4.map(IpAddr::V4),
            self.settings.proxy.addr6.map(IpAddr::V6),
        ]
        .into_iter()
        .flatten()
        .filter(|_| self.settings.proxy.port != 0)
        .collect();
        // The source's rejections of policies, for `policy status`.
        self.rejected = source_errors
            .iter()
            .filter(|e| e.object.starts_with(super::KIND))
            .cloned()
            .collect();
        // Defence in depth: the source already rejects invalid policies, and none may reach the kernel.
        let policies: Vec<AuthorizationPolicy> = policies
            .iter()
            .filter(|p| validate(p).is_ok())
            .cloned()
            .collect();
        let (cookies, warnings) = self.resolve_cookies(pods);
        // The same inputs compile to the same tables: skip the work (a 30 s resync of 1,000 policies would
        // otherwise cost about half a second of CPU each time).
        if let Some(f) = &self.in_force
            && f.inputs.as_ref().is_some_and(|(p, q, c, m)| {
                *p == policies && q.as_slice() == pods && *c == cookies && *m == mesh
            })
        {
            let changes =
                self.maps
                    .apply(&f.compiled, self.settings.limits, self.settings.proxy, true)?;
            self.rejected.extend(f.too_large.iter().cloned());
            return Ok(Applied {
                changes,
                warnings,
                too_large: f.too_large.clone(),
            });
        }
        let inputs = (
            policies.clone(),
            pods.to_vec(),
            cookies.clone(),
            mesh.clone(),
        );
        let settings = self.settings.clone();
        let compile_set = |set: &[AuthorizationPolicy]| {
            compile::compile(&Inputs {
                policies: set,
                pods,
                node: &settings.node,
                root_namespace: &settings.root_namespace,
                trust_domain: &settings.trust_domain,
                netns_cookies: &cookies,
                mesh: &mesh,
            })
        };
        let mut too_large = Vec::new();
        let (compiled, policies) = match compile_set(&policies) {
            Ok(c) => (c, policies),
            // One policy too large for the kernel tables must not hold every other change back: keep what is
            // in force unchanged, add the changed policies one by one, and leave out (at their previous version,
            // if any) those that do not fit.
            Err(_) => {
                let previous: BTreeMap<String, &AuthorizationPolicy> = self
                    .in_force
                    .iter()
                    .flat_map(|f| &f.policies)
                    .map(|p| (p.key(), p))
                    .collect();
                let unchanged = |p: &AuthorizationPolicy| previous.get(&p.key()) == Some(&p);
                let mut accepted: Vec<AuthorizationPolicy> =
                    policies.iter().filter(|p| unchanged(p)).cloned().collect();
                for p in policies.iter().filter(|p| !unchanged(p)) {
                    let mut trial = accepted.clone();
                    trial.push(p.clone());
                    match compile_set(&trial) {
                        Ok(_) => accepted = trial,
                        Err(e) => {
                            let old = previous.get(&p.key()).copied();
                            if let Some(old) = old {
                                accepted.push(old.clone());
                            }
                            too_large.push(SourceError {
                                file: PathBuf::from("(policy compiler)"),
                                object: format!("{} {}", super::KIND, p.key()),
                                reason: format!(
                                    "cannot be enforced: {e}; {}",
                                    if old.is_some() {
                                        "its previous version stays in force"
                                    } else {
                                        "it is not in force"
                                    }
                                ),
                            });
                        }
                    }
                }
                (compile_set(&accepted)?, accepted)
            }
        };
        self.rejected.extend(too_large.iter().cloned());
        let unchanged = self
            .in_force
            .as_ref()
            .is_some_and(|f| f.compiled == compiled);
        let changes = self.maps.apply(
            &compiled,
            self.settings.limits,
            self.settings.proxy,
            unchanged,
        )?;
        if !unchanged {
            self.revision += 1;
        }
        self.in_force = Some(InForce {
            policies,
            pods: pods.to_vec(),
            compiled,
            cookie_pods: cookies.into_iter().map(|(pod, c)| (c, pod)).collect(),
            inputs: Some(inputs),
            too_large: too_large.clone(),
        });
        self.sync_accel();
        Ok(Applied {
            changes,
            warnings,
            too_large,
        })
    }

    /// Same-node acceleration follows what is in force: `sk_pods` holds exactly this node's pods (by address),
    /// and an accelerated connection the policy no longer allows is taken out and reset. Failures are logged, not
    /// returned: the policy itself is in force by now, and the next pass tries again.
    fn sync_accel(&mut self) {
        let Self {
            maps,
            in_force,
            cookies,
            ..
        } = self;
        let Some(f) = in_force else { return };
        let by_pod: BTreeMap<&str, u64> = f
            .cookie_pods
            .iter()
            .map(|(c, pod)| (pod.as_str(), *c))
            .collect();
        let mut desired = BTreeMap::new();
        for pod in &f.pods {
            if let Some(cookie) = by_pod.get(pod.metadata.key().as_str()) {
                for ip in pod.ips() {
                    desired.insert(ip, *cookie);
                }
            }
        }
        if let Err(e) = maps.accel.sync_pods(&desired) {
            warn!(error = format!("{e:#}"), "could not update sk_pods");
        }
        let paths: BTreeMap<u64, PathBuf> = cookies.iter().map(|(p, c)| (*c, p.clone())).collect();
        let compiled = &f.compiled;
        match maps.accel.revoke(
            |c| compiled.allows_tcp(c.client_netns_cookie, c.client.ip(), c.server),
            |cookie| paths.get(&cookie).cloned(),
        ) {
            Ok(r) if r.removed > 0 => {
                info!(
                    connections = r.removed,
                    sockets_reset = r.reset,
                    "accelerated connections revoked by policy"
                )
            }
            Ok(_) => {}
            Err(e) => warn!(
                error = format!("{e:#}"),
                "could not check accelerated connections against the new policy"
            ),
        }
    }

    /// Same-node acceleration: kernel counters and the sockets in `sk_conns` now.
    pub fn accel(&self) -> (crate::ebpf::accel::AccelCounters, usize) {
        (self.maps.accel.counters(), self.maps.accel.sockets())
    }

    pub fn counters(&self) -> PolicyCounters {
        self.maps.counters()
    }

    pub fn status(&self) -> PolicyStatus {
        let f = self.in_force.clone().unwrap_or_default();
        let st = self.maps.state().unwrap_or_default();
        let mut policies: Vec<PolicyView> = f
            .policies
            .iter()
            .map(|p| PolicyView {
                namespace: p.namespace().to_string(),
                name: p.name().to_string(),
                action: p.spec.action.to_string(),
                selects: f
                    .compiled
                    .selects
                    .get(&p.key())
                    .cloned()
                    .unwrap_or_default(),
                rules: eval::statuses(p)
                    .iter()
                    .enumerate()
                    .map(|(index, s)| {
                        let (status, reason) = status_word(s);
                        RuleView {
                            index,
                            status,
                            reason,
                        }
                    })
                    .collect(),
            })
            .collect();
        policies.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        PolicyStatus {
            mesh: f.compiled.enrolled.clone(),
            revision: self.revision,
            epoch: st.epoch,
            generation: st.generation,
            enforcing: st.enabled != 0,
            root_namespace: self.settings.root_namespace.clone(),
            trust_domain: self.settings.trust_domain.clone(),
            policies,
            rejected: self
                .rejected
                .iter()
                .map(|e| RejectedView {
                    file: e.file.display().to_string(),
                    object: e.object.clone(),
                    reason: e.reason.clone(),
                })
                .collect(),
            identities: f
                .compiled
                .identities
                .iter()
                .map(|(id, name)| IdentityView {
                    id: *id,
                    name: name.clone(),
                    spiffe: self.spiffe(name),
                })
                .collect(),
            kernel: KernelView {
                ipcache_entries: f.compiled.ipcache.len(),
                local_endpoints: f.compiled.local_eps.len(),
                verdict_entries: f.compiled.verdicts.len(),
                source_classes: f.compiled.source_classes.clone(),
                destination_classes: f.compiled.dest_classes.clone(),
            },
            counters: self.maps.counters(),
        }
    }

    fn spiffe(&self, name: &str) -> String {
        let (ns, sa) = name.split_once('/').unwrap_or((name, ""));
        format!("spiffe://{}/ns/{ns}/sa/{sa}", self.settings.trust_domain)
    }

    fn identity_name(&self, id: u32) -> String {
        match id {
            identity::WORLD => "world".into(),
            identity::HOST => "host".into(),
            identity::NODE_PROXY => "node-proxy".into(),
            identity::UNKNOWN => "unknown".into(),
            id => self
                .in_force
                .as_ref()
                .and_then(|f| f.compiled.identities.get(&id).cloned())
                .unwrap_or_else(|| format!("identity-{id}")),
        }
    }

    fn pod_by_ip(&self, ip: IpAddr) -> Option<&Pod> {
        let f = self.in_force.as_ref()?;
        let ip = ip.to_canonical();
        let mut found = f
            .pods
            .iter()
            .filter(|p| !p.is_terminated() && p.ips().iter().any(|a| a.to_canonical() == ip));
        let first = found.next()?;
        found.next().is_none().then_some(first)
    }

    fn identity_of(&self, pod: &Pod) -> Identity {
        Identity::new(
            &self.settings.trust_domain,
            &pod.metadata.namespace,
            pod.service_account(),
        )
    }

    /// Explains a kernel event and keeps it in the recent-flows ring.
    pub fn record(&mut self, ev: &PolicyEvent) -> Flow {
        let egress = ev.direction == DIR_EGRESS;
        let dst_ip = bytes_addr(&ev.dst_addr);
        let dst_pod = self.pod_by_ip(dst_ip).cloned();
        let src_name = self.identity_name(ev.src_identity);
        // At egress the kernel knows the pod by its netns cookie, not its address (not chosen yet).
        let src_pod = if egress {
            self.in_force.as_ref().and_then(|f| {
                let key = f.cookie_pods.get(&ev.netns_cookie)?;
                f.pods.iter().find(|p| &p.metadata.key() == key).cloned()
            })
        } else {
            self.pod_by_ip(bytes_addr(&ev.src_addr)).cloned()
        };
        let src_ip = if egress {
            src_pod
                .as_ref()
                .and_then(|p| p.ips().first().copied())
                .unwrap_or(IpAddr::V6(Ipv6Addr::UNSPECIFIED))
        } else {
            bytes_addr(&ev.src_addr)
        };
        let strict = ev.flags & VERDICT_FLAG_STRICT != 0;
        let (policy, rule, reason) = match (&self.in_force, &dst_pod) {
            // Not an AuthorizationPolicy verdict: the port takes only the node proxy.
            (Some(f), Some(dst)) if strict => {
                let key = dst.metadata.key();
                let mode = f
                    .compiled
                    .enrolled
                    .get(&key)
                    .map(|e| e.ports.get(&ev.dst_port).copied().unwrap_or(e.mode));
                (
                    None,
                    None,
                    format!(
                        "STRICT mTLS: port {} of {key} takes only the node proxy ({}), and this connection did \
                         not come through it",
                        ev.dst_port,
                        mode.map_or("mode not known any more".into(), |m| format!("mode {m}"))
                    ),
                )
            }
            (Some(f), Some(dst)) => {
                let source = if ev.src_identity >= identity::FIRST_WORKLOAD {
                    src_name
                        .split_once('/')
                        .map(|(ns, sa)| Identity::new(&self.settings.trust_domain, ns, sa))
                } else {
                    None
                };
                let req = Request {
                    source,
                    source_ip: src_ip,
                    dest_namespace: dst.metadata.namespace.clone(),
                    dest_labels: dst.metadata.labels.clone(),
                    dest_port: ev.dst_port,
                    protocol: if ev.proto == mesh_common::PROTO_UDP {
                        Protocol::Udp
                    } else {
                        Protocol::Tcp
                    },
                };
                let v = Evaluator::new(&f.policies, &self.settings.root_namespace).evaluate(&req);
                let d = if ev.verdict == VERDICT_DENY {
                    v.deciding.clone()
                } else {
                    v.audit.first().cloned()
                };
                (
                    d.as_ref().map(|d| d.policy.clone()),
                    d.map(|d| d.rule_index),
                    v.reason,
                )
            }
            _ => (
                None,
                None,
                "destination not known to the agent any more".into(),
            ),
        };
        let flow = Flow {
            seq: self.next_seq,
            ts_ns: ev.ts_ns,
            direction: if egress { "egress" } else { "ingress" },
            side: if egress { "client" } else { "server" },
            verdict: if ev.verdict == VERDICT_DENY {
                "deny"
            } else {
                "allow"
            },
            audit: ev.flags & VERDICT_FLAG_AUDIT != 0,
            strict,
            proto: proto_name(ev.proto),
            // At egress the source port is not chosen yet: the kernel reports 0.
            src: SocketAddr::new(src_ip, ev.src_port).to_string(),
            dst: SocketAddr::new(dst_ip, ev.dst_port).to_string(),
            src_identity: src_name,
            dst_identity: self.identity_name(ev.dst_identity),
            src_workload: src_pod.map(|p| p.metadata.key()),
            dst_workload: dst_pod.map(|p| p.metadata.key()),
            policy,
            rule,
            reason,
        };
        self.next_seq += 1;
        if self.flows.len() == FLOWS_KEPT {
            self.flows.pop_front();
        }
        self.flows.push_back(flow.clone());
        flow
    }

    /// Flows with `seq >= since`, and the next sequence number to ask for.
    pub fn flows_since(&self, since: u64) -> (Vec<Flow>, u64) {
        (
            self.flows
                .iter()
                .filter(|f| f.seq >= since)
                .cloned()
                .collect(),
            self.next_seq,
        )
    }

    /// Explains the verdict for a connection from `from` (`namespace/serviceaccount` or an IP) to the pod `to`
    /// (`namespace/name`) on `port`, from the state in force.
    pub fn check(&self, from: &str, to: &str, port: u16, udp: bool) -> Result<CheckResult, String> {
        let f = self
            .in_force
            .as_ref()
            .ok_or("no policy state in force yet (the agent is starting)")?;
        let (ns, name) = to
            .split_once('/')
            .ok_or_else(|| format!("--to {to:?}: expected <namespace>/<pod>"))?;
        let dst = f
            .pods
            .iter()
            .find(|p| p.metadata.namespace == ns && p.metadata.name == name)
            .ok_or_else(|| format!("--to {to}: no such pod"))?;
        let dst_ip = dst.ips().first().copied();
        let (source, source_ip, source_desc) = if let Ok(ip) = from.parse::<IpAddr>() {
            let ip = ip.to_canonical();
            match self.pod_by_ip(ip) {
                Some(p) => (
                    Some(self.identity_of(p)),
                    ip,
                    format!(
                        "{ip} (pod {}, {})",
                        p.metadata.key(),
                        self.identity_of(p).principal()
                    ),
                ),
                None => {
                    let host = f.pods.iter().any(|p| {
                        p.status
                            .host_ip
                            .as_deref()
                            .and_then(|h| h.parse::<IpAddr>().ok())
                            == Some(ip)
                    });
                    let who = if host {
                        "a node: unauthenticated"
                    } else {
                        "outside the mesh: unauthenticated"
                    };
                    (None, ip, format!("{ip} ({who})"))
                }
            }
        } else {
            let (ns, sa) = from.split_once('/').ok_or_else(|| {
                format!("--from {from:?}: expected <namespace>/<serviceaccount> or an IP address")
            })?;
            if ns.is_empty() || sa.is_empty() || sa.contains('/') {
                return Err(format!(
                    "--from {from:?}: expected <namespace>/<serviceaccount> or an IP address"
                ));
            }
            let id = Identity::new(&self.settings.trust_domain, ns, sa);
            // ipBlocks need an address: take a pod of that service account (this node's first).
            let pod = f
                .pods
                .iter()
                .filter(|p| {
                    !p.is_terminated() && p.metadata.namespace == ns && p.service_account() == sa
                })
                .min_by_key(|p| {
                    (
                        p.spec.node_name.as_deref() != Some(self.settings.node.as_str()),
                        p.metadata.key(),
                    )
                });
            let ip = pod
                .and_then(|p| p.ips().first().copied())
                .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
            let desc = match pod {
                Some(p) => format!("{} (as pod {} at {ip})", id.principal(), p.metadata.key()),
                None => format!(
                    "{} (no pod has it; ipBlocks judged for 0.0.0.0)",
                    id.principal()
                ),
            };
            (Some(id), ip, desc)
        };
        let req = Request {
            source,
            source_ip,
            dest_namespace: dst.metadata.namespace.clone(),
            dest_labels: dst.metadata.labels.clone(),
            dest_port: port,
            protocol: if udp { Protocol::Udp } else { Protocol::Tcp },
        };
        let v = Evaluator::new(&f.policies, &self.settings.root_namespace).evaluate(&req);
        // The kernel's answer from the tables in force, as the programs compute it.
        let c = &f.compiled;
        let dst_slot = dst_ip.and_then(|ip| c.lookup(ip)).map(|(_, s)| s);
        let src_slot = c.lookup(source_ip).map(|(_, s)| s);
        let kernel = match (dst_slot, src_slot) {
            (Some(d), Some(s)) => c.kernel_verdict(d.dst_class, s.src_class, port),
            (Some(d), None) => c.kernel_verdict(d.dst_class, 0, port),
            _ => c.kernel_verdict(0, 0, port),
        };
        let mtls = f
            .compiled
            .enrolled
            .get(&dst.metadata.key())
            .filter(|_| !udp)
            .map(|e| {
                let mode = e.ports.get(&port).copied().unwrap_or(e.mode);
                // Whether the source is an enrolled pod: its connection then goes through the node proxies.
                let source_enrolled = self
                    .pod_by_ip(source_ip)
                    .is_some_and(|p| f.compiled.enrolled.contains_key(&p.metadata.key()));
                let meaning = match (mode, source_enrolled) {
                    (MtlsMode::Disable, _) => {
                        "not carried by the node proxies: plaintext, judged in the kernel by address"
                    }
                    (_, true) => {
                        "this source is enrolled: its connection goes through the node proxies (mTLS between \
                         nodes), and the destination's proxy applies this verdict with its SPIFFE identity"
                    }
                    (MtlsMode::Strict, false) => {
                        "REFUSED whatever the policy says: this source is not enrolled, so it would connect in \
                         plaintext, and a STRICT port takes only the node proxy"
                    }
                    (MtlsMode::Permissive, false) => {
                        "this source is not enrolled: plaintext, judged in the kernel by address"
                    }
                };
                format!("{} is enrolled, port {port} is {mode}: {meaning}", dst.metadata.key())
            });
        let enforcement = v.deciding.as_ref().and_then(|d| {
            let p = f.policies.iter().find(|p| p.key() == d.policy)?;
            let (word, reason) = status_word(&eval::rule_status(p, d.rule_index));
            Some(match reason {
                Some(r) => format!("{word}: {r}"),
                None => word.to_string(),
            })
        });
        Ok(CheckResult {
            allowed: v.allowed,
            verdict: if v.allowed { "allow" } else { "deny" },
            policy: v.deciding.as_ref().map(|d| d.policy.clone()),
            rule: v.deciding.as_ref().map(|d| d.rule_index),
            action: v.deciding.as_ref().map(|d| d.action.to_string()),
            reason: v.reason.clone(),
            audit: v
                .audit
                .iter()
                .map(|d| format!("{} rule {}", d.policy, d.rule_index))
                .collect(),
            source: source_desc,
            source_ip: Some(source_ip),
            destination: format!("{to} ({})", dst.metadata.namespace),
            destination_ip: dst_ip,
            port,
            proto: if udp { "udp" } else { "tcp" },
            kernel_verdict: if kernel.verdict == VERDICT_DENY {
                "deny"
            } else {
                "allow"
            },
            enforcement,
            mtls,
        })
    }
}
