//! The policy compiler: `AuthorizationPolicy` objects and pods in, kernel tables out. Pure (no I/O).
//!
//! # Classes
//!
//! The kernel must answer "may this source open a connection to this workload on this port?" in O(1). Sources
//! and workloads are grouped into classes that no policy can tell apart:
//!
//! - A **source class** is an (identity, `ipBlocks` membership) pair. The identity is a pod's (namespace, service
//!   account), or none for everything unauthenticated (the world, nodes). Membership is which of the CIDRs named
//!   anywhere in `ipBlocks`/`notIpBlocks` contain the address. Class 0 is "no identity, in no block".
//! - A **destination class** is a set of policies that apply to a workload (by namespace, root namespace and
//!   selector). Class 0 is "no policy applies": allowed without a lookup.
//! - **Ports** of a destination class are the ports its policies name; every other port behaves the same.
//!
//! For every (destination class, source class, port) the verdict comes from the reference evaluator itself
//! ([`Evaluator::evaluate_among`]) applied to a representative source and workload of the classes, so the
//! kernel's table agrees with the reference by construction; only entries that differ from the fallbacks are
//! kept (port entry → any-port entry → the class's default).
//!
//! # The IP cache
//!
//! An LPM trie maps addresses to (identity, source class, destination class): one /32 (/128) per pod and node
//! address, one entry per policy CIDR, and a root for each family. A longest-prefix match finds the most specific
//! entry, and the CIDRs containing an address are exactly those containing that entry's prefix (every CIDR is
//! an entry), so one lookup gives the right membership. Each entry's class is evaluated at an address inside it
//! that no more specific entry covers.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use mesh_common::policy::{
    CLASS_SKIP, DST_DEFAULT_DENY, IpSlot, LOCAL_ENROLLED, LOCAL_POLICED, LocalSlot, MESH_DISABLE,
    MESH_ENROLLED, MESH_PORT_MODES, MESH_STRICT, MTLS_PORT_DISABLE, MTLS_PORT_PERMISSIVE,
    MTLS_PORT_STRICT, PolicyValue, VERDICT_ALLOW, VERDICT_DENY, VERDICT_FLAG_AUDIT, identity,
};
use serde::Serialize;

use super::eval::{Evaluator, Identity, Protocol, Request, Verdict};
use super::{Action, AuthorizationPolicy};
use crate::k8s::{Namespace, Pod};
use crate::peerauth::{MtlsMode, PeerAuthentication, workload_modes};

/// An IPv4 prefix length in the kernel's 128-bit keys is this plus the IPv4 length.
const V4_MAPPED_BITS: u8 = 96;

/// An address prefix as the kernel's LPM trie keys it: 16 bytes (IPv4 v4-mapped) and a length over 128 bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix {
    pub addr: [u8; 16],
    pub len: u8,
}

impl Prefix {
    /// The prefix of `addr/len`, `len` counted in the address's own family; host bits are cleared.
    pub fn new(addr: IpAddr, len: u8) -> Prefix {
        let (bytes, len) = match addr.to_canonical() {
            IpAddr::V4(a) => (a.to_ipv6_mapped().octets(), V4_MAPPED_BITS + len.min(32)),
            IpAddr::V6(a) => (a.octets(), len.min(128)),
        };
        Prefix {
            addr: mask(bytes, len),
            len,
        }
    }

    /// A single address.
    pub fn host(addr: IpAddr) -> Prefix {
        Prefix::new(
            addr,
            if addr.to_canonical().is_ipv4() {
                32
            } else {
                128
            },
        )
    }

    pub fn contains(&self, other: &Prefix) -> bool {
        self.len <= other.len && mask(other.addr, self.len) == self.addr
    }

    pub fn contains_addr(&self, addr: IpAddr) -> bool {
        self.contains(&Prefix::host(addr))
    }

    fn is_v4(&self) -> bool {
        self.len >= V4_MAPPED_BITS && Ipv6Addr::from(self.addr).to_ipv4_mapped().is_some()
    }

    /// The network address, in its own family.
    pub fn ip(&self) -> IpAddr {
        let a = Ipv6Addr::from(self.addr);
        match a.to_ipv4_mapped() {
            Some(v4) if self.len >= V4_MAPPED_BITS => IpAddr::V4(v4),
            _ => IpAddr::V6(a),
        }
    }

    /// The two halves one bit longer.
    fn halves(&self) -> Option<[Prefix; 2]> {
        if self.len >= 128 {
            return None;
        }
        let mut hi = self.addr;
        hi[(self.len / 8) as usize] |= 0x80 >> (self.len % 8);
        let len = self.len + 1;
        Some([
            Prefix {
                addr: self.addr,
                len,
            },
            Prefix { addr: hi, len },
        ])
    }
}

impl std::fmt::Display for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let len = if self.is_v4() {
            self.len - V4_MAPPED_BITS
        } else {
            self.len
        };
        write!(f, "{}/{len}", self.ip())
    }
}

fn mask(mut bytes: [u8; 16], len: u8) -> [u8; 16] {
    for (i, b) in bytes.iter_mut().enumerate() {
        let start = i as u32 * 8;
        let keep = (len as u32).saturating_sub(start).min(8);
        *b &= if keep == 0 { 0 } else { 0xffu8 << (8 - keep) };
    }
    bytes
}

/// The root entries: every IPv4 address (v4-mapped) and every IPv6 address.
fn roots() -> [Prefix; 2] {
    [
        Prefix::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        Prefix::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
    ]
}

/// What the compiler needs besides the policies.
#[derive(Clone, Debug)]
pub struct Inputs<'a> {
    pub policies: &'a [AuthorizationPolicy],
    /// Every known pod, on any node.
    pub pods: &'a [Pod],
    /// This node's name: its pods get client-side enforcement.
    pub node: &'a str,
    pub root_namespace: &'a str,
    pub trust_domain: &'a str,
    /// Netns cookies of this node's pods, by pod key (`namespace/name`). A local pod without one is only
    /// enforced at its destinations.
    pub netns_cookies: &'a BTreeMap<String, u64>,
    pub mesh: &'a MeshInputs,
}

/// What the mesh half of the tables is made from (issue 4): who is enrolled, the mTLS modes, the node proxy.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MeshInputs {
    /// For the namespace's enrollment label.
    pub namespaces: Vec<Namespace>,
    /// Valid `PeerAuthentication` objects.
    pub peer_authentications: Vec<PeerAuthentication>,
    /// The node proxy's addresses (where redirected connections go, and the source of its connections to local
    /// workloads): the kernel knows them as [`identity::NODE_PROXY`]. Empty: no proxy, nothing is redirected.
    pub proxy_addrs: Vec<IpAddr>,
}

/// An enrolled workload's mTLS modes, as compiled.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Enrolled {
    /// The mode of ports without their own.
    pub mode: MtlsMode,
    /// Ports whose mode differs.
    pub ports: BTreeMap<u16, MtlsMode>,
}

/// A source class: who (if anyone) and which policy CIDRs contain the address.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct SourceClass {
    pub id: u32,
    /// `namespace/serviceaccount`; `None`: unauthenticated.
    pub identity: Option<String>,
    /// The CIDRs (from any policy) that contain the class's addresses.
    pub cidrs: Vec<String>,
    /// An address of the class, used to evaluate it.
    pub example_ip: IpAddr,
}

/// A destination class: the policies that apply to its workloads.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DestClass {
    pub id: u32,
    /// `namespace/name`, in decider order.
    pub policies: Vec<String>,
    /// An ALLOW policy applies: what nothing allows is denied.
    pub default_deny: bool,
    /// Ports the policies name.
    pub ports: Vec<u16>,
    /// `namespace/name` of the pods in the class.
    pub pods: Vec<String>,
}

/// Everything the kernel's policy maps should hold, with what names it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    /// Some policy applies to some workload: the kernel checks connections at all.
    pub enabled: bool,
    pub ipcache: BTreeMap<Prefix, IpSlot>,
    /// By netns cookie.
    pub local_eps: BTreeMap<u64, LocalSlot>,
    /// (destination class, source class, port or 0 for any) -> verdict.
    pub verdicts: BTreeMap<(u32, u32, u16), PolicyValue>,
    /// Numeric identity -> `namespace/serviceaccount`.
    pub identities: BTreeMap<u32, String>,
    pub source_classes: Vec<SourceClass>,
    pub dest_classes: Vec<DestClass>,
    /// Policy key -> the pods (`namespace/name`) it applies to.
    pub selects: BTreeMap<String, Vec<String>>,
    /// (address, port) -> `MTLS_PORT_*`: ports of enrolled workloads whose mode differs from the workload's.
    pub mtls_ports: BTreeMap<([u8; 16], u16), u32>,
    /// Enrolled pods (`namespace/name`) and their modes.
    pub enrolled: BTreeMap<String, Enrolled>,
}

/// The numeric identity of `namespace/serviceaccount`: a hash, so that every node and every restart gives the
/// same number for the same service account without coordination. Collisions (rare among a few thousand
/// service accounts in a 32-bit space) are resolved by probing in name order, so they are deterministic too.
pub fn allocate_identities<'a>(names: impl IntoIterator<Item = &'a str>) -> BTreeMap<String, u32> {
    let names: BTreeSet<&str> = names.into_iter().collect();
    let mut taken = BTreeSet::new();
    let mut out = BTreeMap::new();
    let span = u32::MAX - identity::FIRST_WORKLOAD;
    for name in names {
        let mut id = identity::FIRST_WORKLOAD + fnv1a(name.as_bytes()) % span;
        while !taken.insert(id) {
            id = identity::FIRST_WORKLOAD + (id - identity::FIRST_WORKLOAD + 1) % span;
        }
        out.insert(name.to_string(), id);
    }
    out
}

fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |h, &b| {
        (h ^ b as u32).wrapping_mul(0x0100_0193)
    })
}

/// A pod as policy sees it.
struct Workload<'a> {
    key: String,
    pod: &'a Pod,
    ips: Vec<IpAddr>,
    identity: String,
}

/// Who an address is, before classes: a pod, a node, or a policy CIDR/root (the world).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Owner {
    /// Index into the workloads.
    Pod(usize),
    Host,
    /// The node proxy's own address.
    Proxy,
    World,
}

/// An error that keeps the compilation out of the kernel (the previous one stays in force).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CompileError {
    #[error(
        "the policies need {needed} kernel verdict entries, more than the {limit} one policy set may use"
    )]
    TooManyVerdicts { needed: usize, limit: usize },
    #[error("{needed} addresses and CIDRs exceed the IP cache's {limit} entries")]
    TooManyAddresses { needed: usize, limit: usize },
}

/// Compiles policies and pods into the kernel's tables.
pub fn compile(inputs: &Inputs<'_>) -> Result<Compiled, CompileError> {
    let eval = Evaluator::new(inputs.policies, inputs.root_namespace);

    // Workloads: pods that hold their addresses. An address two pods claim (host-network pods share the node's)
    // belongs to no single workload, so it is treated as the node's.
    let mut workloads: Vec<Workload<'_>> = Vec::new();
    for pod in inputs.pods {
        if pod.is_terminated() {
            continue;
        }
        let ips = pod.ips();
        if ips.is_empty() {
            continue;
        }
        workloads.push(Workload {
            key: pod.metadata.key(),
            pod,
            ips,
            identity: format!("{}/{}", pod.metadata.namespace, pod.service_account()),
        });
    }
    workloads.sort_by(|a, b| a.key.cmp(&b.key));
    let mut owners: BTreeMap<Prefix, Owner> = BTreeMap::new();
    let mut host_ips = BTreeSet::new();
    for pod in inputs.pods {
        if let Some(ip) = pod
            .status
            .host_ip
            .as_deref()
            .and_then(|s| s.parse::<IpAddr>().ok())
        {
            host_ips.insert(Prefix::host(ip));
        }
    }
    let mut claimed: BTreeMap<Prefix, Vec<usize>> = BTreeMap::new();
    for (i, w) in workloads.iter().enumerate() {
        for ip in &w.ips {
            claimed.entry(Prefix::host(*ip)).or_default().push(i);
        }
    }
    for (prefix, pods) in &claimed {
        let owner = match pods.as_slice() {
            [i] if !host_ips.contains(prefix) => Owner::Pod(*i),
            _ => Owner::Host,
        };
        owners.insert(*prefix, owner);
    }
    for prefix in &host_ips {
        owners.insert(*prefix, Owner::Host);
    }
    // The proxy's addresses are its own even if something else claims them: the kernel must know the proxy.
    for ip in &inputs.mesh.proxy_addrs {
        owners.insert(Prefix::host(*ip), Owner::Proxy);
    }
    let cidrs: Vec<Prefix> = eval
        .cidrs()
        .into_iter()
        .map(|(ip, len)| Prefix::new(ip, len))
        .collect();
    for prefix in cidrs.iter().chain(roots().iter()) {
        owners.entry(*prefix).or_insert(Owner::World);
    }
    if owners.len() > mesh_common::policy::MAX_IPCACHE as usize {
        return Err(CompileError::TooManyAddresses {
            needed: owners.len(),
            limit: mesh_common::policy::MAX_IPCACHE as usize,
        });
    }

    let identity_ids = allocate_identities(workloads.iter().map(|w| w.identity.as_str()));
    let identities: BTreeMap<u32, String> = identity_ids
        .iter()
        .map(|(name, id)| (*id, name.clone()))
        .collect();

    // Source classes, one per distinct (identity, membership). Class 0 is (none, no CIDR) even when no entry
    // has it, because that is what a lookup that finds nothing means.
    let all: Vec<Prefix> = owners.keys().copied().collect();
    let mut class_of_key: BTreeMap<(Option<String>, Vec<usize>), u32> = BTreeMap::new();
    let mut source_classes = vec![SourceClass {
        id: 0,
        identity: None,
        cidrs: Vec::new(),
        example_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    }];
    class_of_key.insert((None, Vec::new()), 0);
    let mut src_class_of: BTreeMap<Prefix, u32> = BTreeMap::new();
    for (prefix, owner) in &owners {
        // An entry that more specific entries cover entirely is never the answer of a lookup.
        let Some(example) = uncovered(prefix, &all) else {
            continue;
        };
        let membership: Vec<usize> = cidrs
            .iter()
            .enumerate()
            .filter(|(_, c)| same_family(c, prefix) && c.contains(prefix))
            .map(|(i, _)| i)
            .collect();
        let identity = match owner {
            Owner::Pod(i) => Some(workloads[*i].identity.clone()),
            Owner::Host | Owner::Proxy | Owner::World => None,
        };
        if identity.is_none() && membership.is_empty() && src_class_of.values().all(|&c| c != 0) {
            // Class 0's placeholder example may lie in a CIDR; a real unowned, uncovered address does not.
            source_classes[0].example_ip = example;
        }
        let key = (identity.clone(), membership.clone());
        let next = source_classes.len() as u32;
        let id = *class_of_key.entry(key).or_insert_with(|| {
            source_classes.push(SourceClass {
                id: next,
                identity,
                cidrs: membership.iter().map(|&i| cidrs[i].to_string()).collect(),
                example_ip: example,
            });
            next
        });
        src_class_of.insert(*prefix, id);
    }

    // Destination classes, one per distinct set of applicable policies.
    let mut dest_classes: Vec<DestClass> = Vec::new();
    let mut dest_applicable: Vec<(Vec<usize>, usize)> = Vec::new();
    let mut dst_class_of_workload: Vec<u32> = vec![0; workloads.len()];
    let mut selects: BTreeMap<String, Vec<String>> = inputs
        .policies
        .iter()
        .map(|p| (p.key(), Vec::new()))
        .collect();
    for (i, w) in workloads.iter().enumerate() {
        let applicable = eval.applicable(&w.pod.metadata.namespace, &w.pod.metadata.labels);
        for &p in &applicable {
            if let Some(pods) = selects.get_mut(&inputs.policies[p].key()) {
                pods.push(w.key.clone());
            }
        }
        if applicable.is_empty() {
            continue;
        }
        let id = match dest_applicable.iter().position(|(a, _)| *a == applicable) {
            Some(c) => {
                dest_classes[c].pods.push(w.key.clone());
                c as u32 + 1
            }
            None => {
                let policies: Vec<String> = applicable
                    .iter()
                    .map(|&p| inputs.policies[p].key())
                    .collect();
                let default_deny = applicable
                    .iter()
                    .any(|&p| inputs.policies[p].spec.action == Action::Allow);
                dest_classes.push(DestClass {
                    id: dest_classes.len() as u32 + 1,
                    policies,
                    default_deny,
                    ports: eval.ports(&applicable).into_iter().collect(),
                    pods: vec![w.key.clone()],
                });
                dest_applicable.push((applicable, i));
                dest_classes.len() as u32
            }
        };
        dst_class_of_workload[i] = id;
    }

    // The verdict table.
    let limit = mesh_common::policy::MAX_POLICY as usize / 2;
    let mut verdicts = BTreeMap::new();
    for (class, (applicable, example)) in dest_classes.iter().zip(&dest_applicable) {
        let pod = workloads[*example].pod;
        let default = value(!class.default_deny, false);
        // Ports no rule tells apart are judged once (a policy may name thousands of ports, even all of them).
        let groups = eval.port_groups(applicable);
        let named: usize = groups.iter().map(Vec::len).sum();
        let other_port = (1..=u16::MAX).find(|p| class.ports.binary_search(p).is_err());
        for src in &source_classes {
            let source = src.identity.as_deref().map(|name| {
                let (ns, sa) = name.split_once('/').expect("identity names are ns/sa");
                Identity::new(inputs.trust_domain, ns, sa)
            });
            let judge = |port: u16| -> PolicyValue {
                let req = Request {
                    source: source.clone(),
                    source_ip: src.example_ip,
                    dest_namespace: pod.metadata.namespace.clone(),
                    dest_labels: pod.metadata.labels.clone(),
                    dest_port: port,
                    protocol: Protocol::Tcp,
                };
                verdict_value(&eval.evaluate_among(applicable, &req))
            };
            // (verdict, how many ports have it): the commonest becomes the any-port entry, so that only the
            // ports that differ from it need entries of their own.
            let mut judged: Vec<(PolicyValue, &[u16])> =
                groups.iter().map(|g| (judge(g[0]), g.as_slice())).collect();
            let other = other_port.map(judge);
            let mut tally: Vec<(PolicyValue, usize)> = Vec::new();
            let mut add = |v: PolicyValue, n: usize| match tally.iter_mut().find(|(t, _)| *t == v) {
                Some((_, c)) => *c += n,
                None => tally.push((v, n)),
            };
            if let Some(v) = other {
                add(v, u16::MAX as usize - named);
            }
            for (v, ports) in &judged {
                add(*v, ports.len());
            }
            let any = tally
                .iter()
                .max_by_key(|(_, n)| *n)
                .map(|(v, _)| *v)
                .unwrap_or(default);
            if any != default {
                verdicts.insert((class.id, src.id, 0), any);
            }
            judged.retain(|(v, _)| *v != any);
            for (v, ports) in judged {
                for &port in ports {
                    verdicts.insert((class.id, src.id, port), v);
                }
            }
            // When most ports are named (say 1000-60000) the unnamed rest may be the exception.
            if let Some(v) = other.filter(|v| *v != any) {
                for port in (1..=u16::MAX).filter(|p| class.ports.binary_search(p).is_err()) {
                    verdicts.insert((class.id, src.id, port), v);
                }
            }
            if verdicts.len() > limit {
                return Err(CompileError::TooManyVerdicts {
                    needed: verdicts.len(),
                    limit,
                });
            }
        }
    }

    // The IP cache and local endpoints.
    let dst_bits = |class: u32| -> u32 {
        match class {
            0 => 0,
            c if dest_classes[c as usize - 1].default_deny => c | DST_DEFAULT_DENY,
            c => c,
        }
    };
    // Mesh: enrollment and mTLS modes of every workload (a remote one too: this node's clients redirect to it).
    let mut enrolled: BTreeMap<String, Enrolled> = BTreeMap::new();
    let mut mesh_bits = vec![0u32; workloads.len()];
    let mut mtls_ports = BTreeMap::new();
    let no_labels = BTreeMap::new();
    for (i, w) in workloads.iter().enumerate() {
        let ns = &w.pod.metadata.namespace;
        let ns_labels = inputs
            .mesh
            .namespaces
            .iter()
            .find(|n| n.metadata.name == *ns)
            .map_or(&no_labels, |n| &n.metadata.labels);
        if !crate::enrollment::enrolled(&w.pod.metadata.labels, ns_labels) {
            continue;
        }
        let (mode, ports) = workload_modes(
            &inputs.mesh.peer_authentications,
            inputs.root_namespace,
            ns,
            &w.pod.metadata.labels,
        );
        mesh_bits[i] = MESH_ENROLLED
            | match mode {
                MtlsMode::Strict => MESH_STRICT,
                MtlsMode::Disable => MESH_DISABLE,
                MtlsMode::Permissive => 0,
            }
            | if ports.is_empty() { 0 } else { MESH_PORT_MODES };
        for ip in &w.ips {
            for (&port, &m) in &ports {
                let v = match m {
                    MtlsMode::Strict => MTLS_PORT_STRICT,
                    MtlsMode::Disable => MTLS_PORT_DISABLE,
                    MtlsMode::Permissive => MTLS_PORT_PERMISSIVE,
                };
                mtls_ports.insert((Prefix::host(*ip).addr, port), v);
            }
        }
        enrolled.insert(w.key.clone(), Enrolled { mode, ports });
    }

    let mut ipcache = BTreeMap::new();
    for (prefix, owner) in &owners {
        let src_class = src_class_of.get(prefix).copied().unwrap_or(0);
        let slot = match owner {
            Owner::Pod(i) => IpSlot {
                identity: identity_ids[&workloads[*i].identity],
                src_class,
                dst_class: dst_bits(dst_class_of_workload[*i]),
                mesh: mesh_bits[*i],
            },
            Owner::Host => IpSlot {
                identity: identity::HOST,
                src_class,
                dst_class: 0,
                mesh: 0,
            },
            Owner::Proxy => IpSlot {
                identity: identity::NODE_PROXY,
                src_class,
                dst_class: 0,
                mesh: 0,
            },
            Owner::World => IpSlot {
                identity: identity::WORLD,
                src_class,
                dst_class: 0,
                mesh: 0,
            },
        };
        ipcache.insert(*prefix, slot);
    }
    let mut local_eps = BTreeMap::new();
    for (i, w) in workloads.iter().enumerate() {
        if w.pod.spec.node_name.as_deref() != Some(inputs.node) {
            continue;
        }
        let Some(&cookie) = inputs.netns_cookies.get(&w.key) else {
            continue;
        };
        // The class of the pod's own address in each family (its source address when it connects).
        let class_for = |v4: bool| -> u32 {
            w.ips
                .iter()
                .find(|ip| ip.to_canonical().is_ipv4() == v4)
                .map(|ip| Prefix::host(*ip))
                .filter(|p| matches!(owners.get(p), Some(Owner::Pod(_))))
                .and_then(|p| src_class_of.get(&p).copied())
                .unwrap_or(CLASS_SKIP)
        };
        let (c4, c6) = (class_for(true), class_for(false));
        let mut flags = 0;
        if dst_class_of_workload[i] != 0 {
            flags |= LOCAL_POLICED;
        }
        if mesh_bits[i] & MESH_ENROLLED != 0 {
            flags |= LOCAL_ENROLLED;
        }
        if c4 == CLASS_SKIP && c6 == CLASS_SKIP && flags == 0 {
            continue;
        }
        local_eps.insert(
            cookie,
            LocalSlot {
                identity: identity_ids[&w.identity],
                src_class4: c4,
                src_class6: c6,
                flags,
            },
        );
    }

    Ok(Compiled {
        // The mesh needs the connect hook (redirect, STRICT) even where no AuthorizationPolicy applies.
        enabled: !dest_classes.is_empty() || !enrolled.is_empty(),
        ipcache,
        local_eps,
        verdicts,
        identities,
        source_classes,
        dest_classes,
        selects,
        mtls_ports,
        enrolled,
    })
}

fn same_family(a: &Prefix, b: &Prefix) -> bool {
    a.is_v4() == b.is_v4()
}

/// An address inside `prefix` that no longer prefix in `all` covers, if there is one.
fn uncovered(prefix: &Prefix, all: &[Prefix]) -> Option<IpAddr> {
    // The IPv6 root must not answer for IPv4 addresses (the IPv4 root does), so it looks outside ::ffff:0:0/96.
    let inner: Vec<Prefix> = all
        .iter()
        .filter(|p| p.len > prefix.len && prefix.contains(p))
        .copied()
        .collect();
    fn walk(p: Prefix, inner: &[Prefix]) -> Option<Prefix> {
        if inner.iter().any(|q| q.contains(&p)) {
            return None;
        }
        if !inner.iter().any(|q| p.contains(q)) {
            return Some(p);
        }
        let [lo, hi] = p.halves()?;
        walk(lo, inner).or_else(|| walk(hi, inner))
    }
    walk(*prefix, &inner).map(|p| p.ip())
}

fn value(allowed: bool, audit: bool) -> PolicyValue {
    PolicyValue {
        verdict: if allowed { VERDICT_ALLOW } else { VERDICT_DENY },
        flags: if audit { VERDICT_FLAG_AUDIT } else { 0 },
        _pad: [0; 2],
    }
}

fn verdict_value(v: &Verdict) -> PolicyValue {
    value(v.allowed, !v.audit.is_empty())
}

impl Compiled {
    /// The slot a longest-prefix match for `ip` finds, as the kernel would.
    pub fn lookup(&self, ip: IpAddr) -> Option<(Prefix, IpSlot)> {
        let host = Prefix::host(ip);
        (0..=host.len).rev().find_map(|len| {
            let p = Prefix {
                addr: mask(host.addr, len),
                len,
            };
            self.ipcache.get(&p).map(|s| (p, *s))
        })
    }

    /// The kernel's verdict for a source class, a destination class (with its default bit) and a port, as the
    /// programs compute it.
    pub fn kernel_verdict(&self, dst_class: u32, src_class: u32, port: u16) -> PolicyValue {
        let id = dst_class & mesh_common::policy::CLASS_ID_MASK;
        if id == 0 {
            return value(true, false);
        }
        self.verdicts
            .get(&(id, src_class, port))
            .or_else(|| self.verdicts.get(&(id, src_class, 0)))
            .copied()
            .unwrap_or_else(|| value(dst_class & DST_DEFAULT_DENY == 0, false))
    }

    /// Whether the kernel would let the pod with netns cookie `client_cookie` at `client` open a plaintext TCP
    /// connection to `server` now: the client's connect hook (by its local endpoint, when it has one), STRICT mTLS
    /// and the destination's ingress check (by the client's address), as the programs decide them. An
    /// accelerated connection bypasses all three after setup, so this is how it is judged again.
    pub fn allows_tcp(&self, client_cookie: u64, client: IpAddr, server: SocketAddr) -> bool {
        let allow = |dst_class: u32, src_class: u32| {
            self.kernel_verdict(dst_class, src_class, server.port())
                .verdict
                == VERDICT_ALLOW
        };
        let d = self.lookup(server.ip()).map(|(_, s)| s).unwrap_or_default();
        if let Some(ep) = self.local_eps.get(&client_cookie) {
            let src_class = if client.to_canonical().is_ipv4() {
                ep.src_class4
            } else {
                ep.src_class6
            };
            if src_class != CLASS_SKIP && !allow(d.dst_class, src_class) {
                return false;
            }
        }
        let addr = Prefix::host(server.ip()).addr;
        let strict = match self.mtls_ports.get(&(addr, server.port())) {
            Some(mode) if d.mesh & MESH_PORT_MODES != 0 => *mode == MTLS_PORT_STRICT,
            _ => d.mesh & MESH_STRICT != 0,
        };
        if strict {
            return false;
        }
        let s = self.lookup(client).map(|(_, s)| s).unwrap_or_default();
        allow(d.dst_class, s.src_class)
    }

    pub fn source_class(&self, id: u32) -> Option<&SourceClass> {
        self.source_classes.get(id as usize)
    }

    pub fn dest_class(&self, id: u32) -> Option<&DestClass> {
        let id = id & mesh_common::policy::CLASS_ID_MASK;
        id.checked_sub(1)
            .and_then(|i| self.dest_classes.get(i as usize))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::eval::evaluate_with_root;
    use serde_json::json;

    const ROOT: &str = "sinew-system";
    const TD: &str = "cluster.local";

    fn pod(ns: &str, name: &str, sa: &str, app: &str, ip: &str, node: &str) -> Pod {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"namespace": ns, "name": name, "labels": {"app": app},
                         "annotations": {"sinew.dev/netns": format!("/run/netns/{name}")}},
            "spec": {"nodeName": node, "serviceAccountName": sa},
            "status": {"podIP": ip, "hostIP": if node == "n1" { "192.168.0.1" } else { "192.168.0.2" }, "phase": "Running"}
        }))
        .unwrap()
    }

    /// Compiles for node `n1` with no netns cookies.
    fn compile_n1(policies: &[AuthorizationPolicy], pods: &[Pod]) -> Compiled {
        compile(&Inputs {
            policies,
            pods,
            node: "n1",
            root_namespace: ROOT,
            trust_domain: TD,
            netns_cookies: &BTreeMap::new(),
            mesh: &MeshInputs::default(),
        })
        .unwrap()
    }

    fn policy(v: serde_json::Value) -> AuthorizationPolicy {
        serde_json::from_value(v).unwrap()
    }

    /// A small deterministic generator (xorshift), so failures reproduce.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
            &xs[(self.next() % xs.len() as u64) as usize]
        }
        fn chance(&mut self, percent: u64) -> bool {
            self.next() % 100 < percent
        }
    }

    /// How the agent judges an accelerated connection again after a change: as the connect hook and the
    /// destination's ingress check would judge it now.
    #[test]
    fn accelerated_connections_are_judged_like_new_ones() {
        let pods = universe();
        let deny = policy(json!({
            "apiVersion": "security.sinew.dev/v1alpha1", "kind": "AuthorizationPolicy",
            "metadata": {"namespace": "a", "name": "no-a-to-db"},
            "spec": {"action": "DENY", "selector": {"matchLabels": {"app": "db"}},
                     "rules": [{"from": [{"source": {"namespaces": ["a"]}}],
                                "to": [{"operation": {"ports": ["5432"]}}]}]},
        }));
        let cookies = BTreeMap::from([("a/a1".to_string(), 11u64), ("b/b2".to_string(), 12)]);
        let compile_with = |policies: &[AuthorizationPolicy]| {
            compile(&Inputs {
                policies,
                pods: &pods,
                node: "n1",
                root_namespace: ROOT,
                trust_domain: TD,
                netns_cookies: &cookies,
                mesh: &MeshInputs::default(),
            })
            .unwrap()
        };
        let a1: IpAddr = "10.0.1.1".parse().unwrap();
        let b2: IpAddr = "10.0.2.2".parse().unwrap();
        let db = |port| SocketAddr::new("10.0.1.2".parse().unwrap(), port);
        let open = compile_with(&[]);
        assert!(open.allows_tcp(11, a1, db(5432)));
        let c = compile_with(&[deny]);
        assert!(!c.allows_tcp(11, a1, db(5432)), "denied");
        assert!(c.allows_tcp(11, a1, db(80)), "another port");
        assert!(c.allows_tcp(12, b2, db(5432)), "another namespace");
        // A client the node has no local endpoint for is judged at the destination by its address alone.
        assert!(!c.allows_tcp(99, a1, db(5432)));
    }

    fn universe() -> Vec<Pod> {
        vec![
            pod("a", "a1", "web", "web", "10.0.1.1", "n1"),
            pod("a", "a2", "db", "db", "10.0.1.2", "n1"),
            pod("b", "b1", "web", "web", "10.0.2.1", "n2"),
            pod("b", "b2", "api", "api", "10.0.2.2", "n1"),
            pod("c", "c1", "default", "web", "fd00::5", "n2"),
        ]
    }

    fn random_source(r: &mut Rng) -> serde_json::Value {
        let mut src = serde_json::Map::new();
        let principals = [
            "spiffe://cluster.local/ns/a/sa/web",
            "cluster.local/ns/b/sa/web",
            "cluster.local/ns/a/sa/db",
            "*",
            "cluster.local/ns/b/*",
            "*/sa/web",
        ];
        let namespaces = ["a", "b", "c", "a*", "*"];
        let blocks = [
            "10.0.1.0/24",
            "10.0.1.1",
            "10.0.0.0/16",
            "10.0.2.2/32",
            "fd00::/64",
            "203.0.113.0/24",
            "0.0.0.0/0",
        ];
        for (field, values) in [
            ("principals", &principals[..]),
            ("notPrincipals", &principals[..]),
            ("namespaces", &namespaces[..]),
            ("notNamespaces", &namespaces[..]),
            ("ipBlocks", &blocks[..]),
            ("notIpBlocks", &blocks[..]),
        ] {
            if r.chance(25) {
                let n = 1 + r.next() % 2;
                let vals: Vec<&str> = (0..n).map(|_| *r.pick(values)).collect();
                src.insert(field.into(), json!(vals));
            }
        }
        if src.is_empty() {
            src.insert("namespaces".into(), json!([*r.pick(&namespaces)]));
        }
        json!({ "source": src })
    }

    fn random_policy(r: &mut Rng, i: usize) -> AuthorizationPolicy {
        let ns = *r.pick(&["a", "b", "c", ROOT]);
        let action = *r.pick(&["ALLOW", "ALLOW", "DENY", "DENY", "AUDIT"]);
        let mut spec = serde_json::Map::new();
        spec.insert("action".into(), json!(action));
        if r.chance(50) {
            spec.insert(
                "selector".into(),
                json!({"matchLabels": {"app": *r.pick(&["web", "db", "api"])}}),
            );
        }
        if !r.chance(10) {
            let mut rules = Vec::new();
            for _ in 0..(1 + r.next() % 2) {
                let mut rule = serde_json::Map::new();
                if r.chance(70) {
                    rule.insert("from".into(), json!([random_source(r)]));
                }
                if r.chance(60) {
                    let ports = [80, 443, 8080, 9090];
                    let mut op = serde_json::Map::new();
                    let field = if r.chance(70) { "ports" } else { "notPorts" };
                    op.insert(field.into(), json!([r.pick(&ports).to_string()]));
                    if r.chance(10) {
                        op.insert("methods".into(), json!(["GET"]));
                    }
                    rule.insert("to".into(), json!([{ "operation": op }]));
                }
                rules.push(serde_json::Value::Object(rule));
            }
            spec.insert("rules".into(), json!(rules));
        }
        policy(json!({
            "apiVersion": "security.sinew.dev/v1alpha1", "kind": "AuthorizationPolicy",
            "metadata": {"namespace": ns, "name": format!("p{i}")},
            "spec": spec,
        }))
    }

    /// The kernel's answer, emulated from the tables exactly as the programs look them up: server side by the
    /// source address, client side by the local endpoint of the source pod.
    fn kernel_allows(c: &Compiled, src_ip: IpAddr, dst_ip: IpAddr, port: u16) -> bool {
        let d = c.lookup(dst_ip).map(|(_, s)| s).unwrap_or_default();
        let s = c.lookup(src_ip).map(|(_, s)| s).unwrap_or_default();
        c.kernel_verdict(d.dst_class, s.src_class, port).verdict == VERDICT_ALLOW
    }

    #[test]
    fn kernel_tables_agree_with_the_reference_evaluator() {
        let pods = universe();
        let cookies: BTreeMap<String, u64> = pods
            .iter()
            .enumerate()
            .map(|(i, p)| (p.metadata.key(), 1000 + i as u64))
            .collect();
        let outsiders: [IpAddr; 4] = [
            "10.0.1.77".parse().unwrap(),
            "203.0.113.9".parse().unwrap(),
            "198.51.100.1".parse().unwrap(),
            "fd00::99".parse().unwrap(),
        ];
        let mut r = Rng(0x5eed_1234_abcd_0001);
        let mut checked = 0;
        for round in 0..150 {
            let n = 1 + (r.next() % 5) as usize;
            let policies: Vec<AuthorizationPolicy> =
                (0..n).map(|i| random_policy(&mut r, i)).collect();
            let c = compile(&Inputs {
                policies: &policies,
                pods: &pods,
                node: "n1",
                root_namespace: ROOT,
                trust_domain: TD,
                netns_cookies: &cookies,
                mesh: &MeshInputs::default(),
            })
            .unwrap();
            for dst in &pods {
                let dst_ip = dst.ips()[0];
                for port in [80u16, 443, 8080, 9090, 22] {
                    let mut sources: Vec<(Option<Identity>, IpAddr, Option<&Pod>)> = pods
                        .iter()
                        .map(|p| {
                            (
                                Some(Identity::new(
                                    TD,
                                    &p.metadata.namespace,
                                    p.service_account(),
                                )),
                                p.ips()[0],
                                Some(p),
                            )
                        })
                        .collect();
                    sources.extend(outsiders.iter().map(|ip| (None, *ip, None)));
                    // Node addresses are unauthenticated.
                    sources.push((None, "192.168.0.2".parse().unwrap(), None));
                    for (identity, src_ip, src_pod) in sources {
                        let req = Request {
                            source: identity,
                            source_ip: src_ip,
                            dest_namespace: dst.metadata.namespace.clone(),
                            dest_labels: dst.metadata.labels.clone(),
                            dest_port: port,
                            protocol: Protocol::Tcp,
                        };
                        let want = evaluate_with_root(&policies, &req, ROOT).allowed;
                        let server = kernel_allows(&c, src_ip, dst_ip, port);
                        assert_eq!(
                            server,
                            want,
                            "round {round}: server side {src_ip} -> {} port {port}\n{}",
                            dst.metadata.key(),
                            serde_json::to_string_pretty(&policies).unwrap()
                        );
                        // Client side: the local endpoint's class for the destination's family.
                        if let Some(p) =
                            src_pod.filter(|p| p.spec.node_name.as_deref() == Some("n1"))
                        {
                            let ep = c.local_eps[&cookies[&p.metadata.key()]];
                            let class = if dst_ip.is_ipv4() {
                                ep.src_class4
                            } else {
                                ep.src_class6
                            };
                            if class != CLASS_SKIP {
                                let d = c.lookup(dst_ip).unwrap().1;
                                let client = c.kernel_verdict(d.dst_class, class, port).verdict
                                    == VERDICT_ALLOW;
                                assert_eq!(
                                    client,
                                    want,
                                    "round {round}: client side {}",
                                    p.metadata.key()
                                );
                            }
                        }
                        checked += 1;
                    }
                }
            }
        }
        assert!(checked > 10_000, "checked {checked}");
    }

    #[test]
    fn thousands_of_named_ports_compile_small_and_exact() {
        let pods = universe();
        let every: Vec<String> = (1..=65535u32).map(|p| p.to_string()).collect();
        let most: Vec<String> = (1000..=60000u32).map(|p| p.to_string()).collect();
        for (name, ports, field) in [
            ("every-port", &every, "ports"),
            ("most-ports", &most, "ports"),
            ("not-most", &most, "notPorts"),
        ] {
            let policies = [policy(json!({
                "apiVersion": "security.sinew.dev/v1alpha1", "kind": "AuthorizationPolicy",
                "metadata": {"namespace": "a", "name": name},
                "spec": {"selector": {"matchLabels": {"app": "db"}},
                         "rules": [{"from": [{"source": {"namespaces": ["b"]}}], "to": [{"operation": {field: ports}}]}]}
            }))];
            let t0 = std::time::Instant::now();
            let c = compile_n1(&policies, &pods);
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(5),
                "{name}: {:?}",
                t0.elapsed()
            );
            // The commonest verdict is the any-port entry: only the exceptions get entries (here the ~6500 ports
            // outside 1000-60000 for the one source class that rules match), never one entry per named port.
            assert!(
                c.verdicts.len() < 2 * 6600,
                "{name}: {} entries",
                c.verdicts.len()
            );
            let dst: IpAddr = "10.0.1.2".parse().unwrap();
            for port in [1u16, 999, 1000, 30000, 60000, 60001, 65535] {
                for src in ["10.0.2.1", "10.0.1.1", "203.0.113.1"] {
                    let src: IpAddr = src.parse().unwrap();
                    let p = pods.iter().find(|p| p.ips()[0] == src);
                    let req = Request {
                        source: p
                            .map(|p| Identity::new(TD, &p.metadata.namespace, p.service_account())),
                        source_ip: src,
                        dest_namespace: "a".into(),
                        dest_labels: [("app".to_string(), "db".to_string())].into(),
                        dest_port: port,
                        protocol: Protocol::Tcp,
                    };
                    let want = evaluate_with_root(&policies, &req, ROOT).allowed;
                    assert_eq!(
                        kernel_allows(&c, src, dst, port),
                        want,
                        "{name}: {src} port {port}"
                    );
                }
            }
        }
    }

    #[test]
    fn no_policy_means_nothing_is_enforced() {
        let pods = universe();
        let c = compile(&Inputs {
            policies: &[],
            pods: &pods,
            node: "n1",
            root_namespace: ROOT,
            trust_domain: TD,
            netns_cookies: &BTreeMap::new(),
            mesh: &MeshInputs::default(),
        })
        .unwrap();
        assert!(!c.enabled);
        assert!(c.verdicts.is_empty());
        assert!(c.ipcache.values().all(|s| s.dst_class == 0));
    }

    #[test]
    fn identities_are_stable_and_distinct() {
        let a = allocate_identities(["a/web", "b/web", "a/db"]);
        let b = allocate_identities(["a/db", "a/web", "b/web", "z/new"]);
        assert_eq!(a["a/web"], b["a/web"]);
        assert_eq!(a["a/db"], b["a/db"]);
        assert!(a.values().all(|&id| id >= identity::FIRST_WORKLOAD));
        let set: BTreeSet<u32> = b.values().copied().collect();
        assert_eq!(set.len(), 4);
    }

    #[test]
    fn prefixes_in_both_families() {
        let p = Prefix::new("10.1.2.3".parse().unwrap(), 24);
        assert_eq!(p.to_string(), "10.1.2.0/24");
        assert_eq!(p.len, 120);
        assert!(p.contains_addr("10.1.2.200".parse().unwrap()));
        assert!(!p.contains_addr("10.1.3.1".parse().unwrap()));
        let v6 = Prefix::new("fd00::1".parse().unwrap(), 64);
        assert_eq!(v6.to_string(), "fd00::/64");
        assert!(!v6.contains_addr("10.1.2.3".parse().unwrap()));
        // The IPv6 root's uncovered address is outside the IPv4-mapped range that the IPv4 root answers for.
        let [r4, r6] = roots();
        let ex = uncovered(&r6, &[r4, r6]).unwrap();
        assert!(ex.is_ipv6() && ex.to_canonical().is_ipv6());
        // A prefix entirely covered by two halves is never a lookup's answer.
        let halves = [
            Prefix::new("10.0.0.0".parse().unwrap(), 25),
            Prefix::new("10.0.0.128".parse().unwrap(), 25),
        ];
        let whole = Prefix::new("10.0.0.0".parse().unwrap(), 24);
        assert_eq!(uncovered(&whole, &[whole, halves[0], halves[1]]), None);
    }

    #[test]
    fn shared_addresses_belong_to_the_node() {
        let mut pods = universe();
        // Two host-network pods on the node's address.
        pods.push(pod("a", "h1", "web", "web", "192.168.0.1", "n1"));
        pods.push(pod("b", "h2", "api", "api", "192.168.0.1", "n1"));
        let policies = [policy(json!({
            "apiVersion": "security.sinew.dev/v1alpha1", "kind": "AuthorizationPolicy",
            "metadata": {"namespace": "a", "name": "only-web"},
            "spec": {"rules": [{"from": [{"source": {"principals": ["cluster.local/ns/a/sa/web"]}}]}]}
        }))];
        let c = compile_n1(&policies, &pods);
        let (_, host) = c.lookup("192.168.0.1".parse().unwrap()).unwrap();
        assert_eq!(host.identity, identity::HOST);
        assert_eq!(host.dst_class, 0);
        // The node is not a/web, even though a host-network pod with that service account is on it.
        assert!(!kernel_allows(
            &c,
            "192.168.0.1".parse().unwrap(),
            "10.0.1.1".parse().unwrap(),
            80
        ));
        assert!(kernel_allows(
            &c,
            "10.0.1.1".parse().unwrap(),
            "10.0.1.2".parse().unwrap(),
            80
        ));
    }

    fn namespace(name: &str, labels: serde_json::Value) -> Namespace {
        serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}})).unwrap()
    }

    fn peer_auth(v: serde_json::Value) -> PeerAuthentication {
        serde_json::from_value(v).unwrap()
    }

    fn enrolled_pod(ns: &str, name: &str, ip: &str, node: &str) -> Pod {
        let mut p = pod(ns, name, name, name, ip, node);
        p.metadata
            .labels
            .insert("sinew.dev/mesh".into(), "enabled".into());
        p
    }

    fn slot_of(c: &Compiled, ip: &str) -> IpSlot {
        c.ipcache[&Prefix::host(ip.parse().unwrap())]
    }

    #[test]
    fn mesh_flags_follow_enrollment_and_peer_authentication_modes() {
        let pods = vec![
            enrolled_pod("a", "web", "10.0.1.1", "n1"),
            enrolled_pod("a", "api", "10.0.1.2", "n2"),
            pod("a", "plain", "plain", "plain", "10.0.1.3", "n1"),
            // Enrolled through its namespace.
            pod("m", "db", "db", "db", "10.0.2.1", "n2"),
            // Opted out of an enrolled namespace.
            {
                let mut p = pod("m", "out", "out", "out", "10.0.2.2", "n2");
                p.metadata
                    .labels
                    .insert("sinew.dev/mesh".into(), "disabled".into());
                p
            },
        ];
        let mesh = MeshInputs {
            namespaces: vec![namespace("m", json!({"sinew.dev/mesh": "enabled"}))],
            peer_authentications: vec![
                // Mesh-wide STRICT...
                peer_auth(json!({"metadata": {"namespace": ROOT, "name": "all"},
                                 "spec": {"mtls": {"mode": "STRICT"}}})),
                // ...namespace m PERMISSIVE...
                peer_auth(json!({"metadata": {"namespace": "m", "name": "ns"},
                                 "spec": {"mtls": {"mode": "PERMISSIVE"}}})),
                // ...and web: DISABLE on 9090, PERMISSIVE on 8081 (the rest inherits STRICT).
                peer_auth(json!({"metadata": {"namespace": "a", "name": "web"},
                                 "spec": {"selector": {"matchLabels": {"app": "web"}},
                                          "portLevelMtls": {"9090": {"mode": "DISABLE"},
                                                            "8081": {"mode": "PERMISSIVE"}}}})),
            ],
            proxy_addrs: vec!["169.254.7.1".parse().unwrap()],
        };
        let cookies = BTreeMap::from([("a/web".to_string(), 11u64), ("a/plain".to_string(), 12)]);
        let c = compile(&Inputs {
            policies: &[],
            pods: &pods,
            node: "n1",
            root_namespace: ROOT,
            trust_domain: TD,
            netns_cookies: &cookies,
            mesh: &mesh,
        })
        .unwrap();
        // No AuthorizationPolicy, but the mesh needs the hooks.
        assert!(c.enabled);
        assert_eq!(
            slot_of(&c, "10.0.1.1").mesh,
            MESH_ENROLLED | MESH_STRICT | MESH_PORT_MODES
        );
        assert_eq!(slot_of(&c, "10.0.1.2").mesh, MESH_ENROLLED | MESH_STRICT);
        assert_eq!(slot_of(&c, "10.0.1.3").mesh, 0, "not enrolled");
        assert_eq!(slot_of(&c, "10.0.2.1").mesh, MESH_ENROLLED, "PERMISSIVE");
        assert_eq!(slot_of(&c, "10.0.2.2").mesh, 0, "opted out");
        let web = Prefix::host("10.0.1.1".parse().unwrap()).addr;
        assert_eq!(
            c.mtls_ports,
            BTreeMap::from([
                ((web, 8081), MTLS_PORT_PERMISSIVE),
                ((web, 9090), MTLS_PORT_DISABLE),
            ])
        );
        // The proxy's address is the node proxy, whatever else claims it.
        let proxy = slot_of(&c, "169.254.7.1");
        assert_eq!(proxy.identity, identity::NODE_PROXY);
        assert_eq!(proxy.mesh, 0);
        assert_eq!(c.local_eps[&11].flags, LOCAL_ENROLLED);
        // STRICT ports accept only the proxy: a plaintext (accelerated) connection to one is no longer allowed.
        let plain: IpAddr = "10.0.1.3".parse().unwrap();
        let to = |ip: &str, port| SocketAddr::new(ip.parse().unwrap(), port);
        assert!(!c.allows_tcp(12, plain, to("10.0.1.2", 5432)), "STRICT");
        assert!(
            !c.allows_tcp(12, plain, to("10.0.1.1", 80)),
            "inherits STRICT"
        );
        assert!(
            c.allows_tcp(12, plain, to("10.0.1.1", 9090)),
            "DISABLE port"
        );
        assert!(
            c.allows_tcp(12, plain, to("10.0.1.1", 8081)),
            "PERMISSIVE port"
        );
        assert!(
            c.allows_tcp(12, plain, to("10.0.2.1", 80)),
            "PERMISSIVE workload"
        );
        assert_eq!(c.local_eps[&12].flags, 0);
        assert_eq!(c.enrolled["a/web"].mode, MtlsMode::Strict);
        assert_eq!(c.enrolled.len(), 3);
    }

    #[test]
    fn nothing_enrolled_and_no_policy_leaves_the_hooks_off() {
        let pods = vec![pod("a", "web", "web", "web", "10.0.1.1", "n1")];
        let mesh = MeshInputs {
            proxy_addrs: vec!["169.254.7.1".parse().unwrap()],
            ..Default::default()
        };
        let c = compile(&Inputs {
            policies: &[],
            pods: &pods,
            node: "n1",
            root_namespace: ROOT,
            trust_domain: TD,
            netns_cookies: &BTreeMap::new(),
            mesh: &mesh,
        })
        .unwrap();
        assert!(!c.enabled);
        assert!(c.mtls_ports.is_empty() && c.enrolled.is_empty());
    }
}
