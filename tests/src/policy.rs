//! Identity policy (issue 3) helpers: workloads with identities, `AuthorizationPolicy` objects, the reference
//! verdict (`mesh_agent::policy::eval`), and probe matrices that compare what the kernel does with it.
//!
//! A probe goes one of two ways ([`ClientPath`]):
//! - [`ClientPath::Client`]: from the source pod's own cgroup, so the source's node enforces at `connect()` /
//!   `sendto()`. A denied probe must fail with `EACCES` at once.
//! - [`ClientPath::Server`]: from the source pod's netns but outside every cgroup the agents attach to
//!   ([`crate::Pod::command_unmanaged`]), so only the destination's node enforces, on the first packet. A denied
//!   probe must time out (the SYN or the first datagram is dropped).
//!
//! Either way an allowed probe must complete its round trip (`ok`). The expected verdict is always the reference
//! evaluator's, for the destination workload, with the source pod's identity (or none for a source that is no
//! known pod) and the source pod's IP.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use anyhow::{Context, Result};
use mesh_agent::policy::AuthorizationPolicy;
use mesh_agent::policy::eval::{Identity, Protocol, Request, Verdict, evaluate_with_root};
use serde_json::Value;

use crate::manifest::{PodManifest, SourceDir};
use crate::testpod::{PROBE_EACCES, PROBE_OK, PROBE_TIMEOUT, ProbeReport};
use crate::topology::Pod;

/// The trust domain the agents run with (their default).
pub const TRUST_DOMAIN: &str = "cluster.local";
/// The mesh root namespace the agents run with (their default): a policy there applies to every namespace.
pub const ROOT_NAMESPACE: &str = "sinew-system";

/// `spiffe://cluster.local/ns/<ns>/sa/<sa>`.
pub fn spiffe(ns: &str, sa: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/{ns}/sa/{sa}")
}

/// Istio's form without the scheme: `cluster.local/ns/<ns>/sa/<sa>`.
pub fn istio_principal(ns: &str, sa: &str) -> String {
    format!("{TRUST_DOMAIN}/ns/{ns}/sa/{sa}")
}

/// Reads policy objects (as written to the source dir) into the agent's type, the way the agent reads them.
pub fn parse_policies(objects: &[Value]) -> Result<Vec<AuthorizationPolicy>> {
    objects
        .iter()
        .map(|v| {
            serde_json::from_value(v.clone())
                .with_context(|| format!("not an AuthorizationPolicy: {v}"))
        })
        .collect()
}

/// `namespace/name` of a policy object.
pub fn policy_key(v: &Value) -> String {
    format!(
        "{}/{}",
        v["metadata"]["namespace"].as_str().unwrap_or("default"),
        v["metadata"]["name"].as_str().unwrap_or("")
    )
}

/// The policy objects as one YAML text (for failure messages).
pub fn policies_yaml(objects: &[Value]) -> String {
    objects
        .iter()
        .map(crate::manifest::to_yaml)
        .collect::<Vec<_>>()
        .join("---\n")
}

/// A pod as the mesh knows it: namespace (the pod's), service account and labels; or a source that is no known
/// pod (`service_account: None`, no manifest is written for it).
#[derive(Debug, Clone)]
pub struct Workload {
    /// The harness pod.
    pub pod: Pod,
    /// `spec.serviceAccountName`; `None`: not a known pod (outside the mesh, no identity).
    pub service_account: Option<String>,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
}

impl Workload {
    /// A known pod with service account `sa` and `labels`.
    pub fn new(pod: &Pod, sa: &str, labels: &[(&str, &str)]) -> Workload {
        Workload {
            pod: pod.clone(),
            service_account: Some(sa.to_string()),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    /// A netns that is no known pod: no manifest, no identity.
    pub fn stranger(pod: &Pod) -> Workload {
        Workload {
            pod: pod.clone(),
            service_account: None,
            labels: BTreeMap::new(),
        }
    }

    /// Pod name.
    pub fn name(&self) -> &str {
        &self.pod.name
    }

    /// Kubernetes namespace.
    pub fn namespace(&self) -> &str {
        &self.pod.namespace
    }

    /// `ns/pod`, as `policy check --to` takes it.
    pub fn key(&self) -> String {
        format!("{}/{}", self.pod.namespace, self.pod.name)
    }

    /// `ns/sa`, as `policy check --from` and flows show it (`world` for a stranger).
    pub fn identity_key(&self) -> String {
        match &self.service_account {
            Some(sa) => format!("{}/{sa}", self.pod.namespace),
            None => "world".to_string(),
        }
    }

    /// The evaluator's identity (`None` for a stranger), in the default trust domain.
    pub fn identity(&self) -> Option<Identity> {
        self.identity_in(TRUST_DOMAIN)
    }

    /// The evaluator's identity in `trust_domain`.
    pub fn identity_in(&self, trust_domain: &str) -> Option<Identity> {
        self.service_account
            .as_ref()
            .map(|sa| Identity::new(trust_domain, &self.pod.namespace, sa))
    }

    /// The Pod object (`None` for a stranger).
    pub fn manifest(&self) -> Option<Value> {
        let sa = self.service_account.as_ref()?;
        let mut m = PodManifest::new(&self.pod).service_account(sa);
        for (k, v) in &self.labels {
            m = m.label(k, v);
        }
        Some(m.to_value())
    }

    /// Writes `pod-<name>.yaml` (nothing for a stranger).
    pub fn write(&self, source: &SourceDir) -> Result<()> {
        if let Some(m) = self.manifest() {
            source.write(&format!("pod-{}.yaml", self.pod.name), &[m])?;
        }
        Ok(())
    }
}

/// TCP or UDP, with the spellings the tools use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Proto {
    /// Both, TCP first.
    pub const BOTH: [Proto; 2] = [Proto::Tcp, Proto::Udp];

    /// `tcp` / `udp`.
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }

    /// The evaluator's protocol.
    pub fn eval(self) -> Protocol {
        match self {
            Proto::Tcp => Protocol::Tcp,
            Proto::Udp => Protocol::Udp,
        }
    }

    /// A `probe` target: `tcp:IP:PORT`.
    pub fn target(self, ip: IpAddr, port: u16) -> String {
        match ip {
            IpAddr::V4(a) => format!("{}:{a}:{port}", self.as_str()),
            IpAddr::V6(a) => format!("{}:[{a}]:{port}", self.as_str()),
        }
    }
}

/// Which side enforces a probe (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ClientPath {
    /// From the source pod's cgroup: refused at `connect()`/`sendto()` with `EACCES`.
    Client,
    /// From outside every cgroup: dropped at the destination (a timeout).
    Server,
}

impl ClientPath {
    /// Both paths.
    pub const BOTH: [ClientPath; 2] = [ClientPath::Client, ClientPath::Server];

    /// What a denied probe must show on this path.
    pub fn denied_outcome(self) -> &'static str {
        match self {
            ClientPath::Client => PROBE_EACCES,
            ClientPath::Server => PROBE_TIMEOUT,
        }
    }
}

impl fmt::Display for ClientPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ClientPath::Client => "client-side (source in its cgroup)",
            ClientPath::Server => "server-side (source outside any cgroup)",
        })
    }
}

/// The reference verdict for `src` connecting (over IPv4) to `dst` on target port `port`, with the default trust
/// domain and root namespace.
pub fn expected(
    policies: &[AuthorizationPolicy],
    src: &Workload,
    dst: &Workload,
    port: u16,
    proto: Proto,
) -> Verdict {
    expected_with(
        policies,
        &Mesh::default(),
        src,
        IpAddr::V4(src.pod.ip4),
        dst,
        port,
        proto,
    )
}

/// The mesh-wide settings the agents run with (`--trust-domain`, `--mesh-root-namespace`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mesh {
    /// The trust domain.
    pub trust_domain: String,
    /// The mesh root namespace.
    pub root_namespace: String,
}

impl Default for Mesh {
    fn default() -> Self {
        Mesh {
            trust_domain: TRUST_DOMAIN.into(),
            root_namespace: ROOT_NAMESPACE.into(),
        }
    }
}

/// The reference verdict for `src` (seen with source address `src_ip`) connecting to `dst` on target port
/// `port`, in `mesh`.
pub fn expected_with(
    policies: &[AuthorizationPolicy],
    mesh: &Mesh,
    src: &Workload,
    src_ip: IpAddr,
    dst: &Workload,
    port: u16,
    proto: Proto,
) -> Verdict {
    let req = Request {
        source: src.identity_in(&mesh.trust_domain),
        source_ip: src_ip,
        dest_namespace: dst.namespace().to_string(),
        dest_labels: dst.labels.clone(),
        dest_port: port,
        protocol: proto.eval(),
    };
    evaluate_with_root(policies, &req, &mesh.root_namespace)
}

/// One probe of a matrix and what happened.
#[derive(Debug, Clone)]
pub struct Observation {
    /// Source pod name.
    pub src: String,
    /// Destination pod name.
    pub dst: String,
    /// Destination (target) port.
    pub port: u16,
    /// Protocol.
    pub proto: Proto,
    /// Which side enforced.
    pub path: ClientPath,
    /// The probe's outcome word (`ok`, `EACCES`, `timeout`, ...).
    pub outcome: String,
    /// How long the probe took.
    pub elapsed_ms: f64,
    /// Over IPv6.
    pub ipv6: bool,
    /// Through this Service VIP (`ip:port`) rather than to the pod's address.
    pub via: Option<String>,
}

/// An observation that disagrees with the reference.
#[derive(Debug, Clone)]
pub struct Mismatch {
    /// What was observed.
    pub observed: Observation,
    /// The outcome the reference asks for.
    pub expected_outcome: String,
    /// The reference verdict, explained.
    pub verdict: String,
    /// Source identity (`ns/sa` or `world`).
    pub src_identity: String,
    /// Destination `ns/pod`.
    pub dst_key: String,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = &self.observed;
        write!(
            f,
            "{src} [{sid}] -> {dst} [{dkey}] {proto}/{port} over {family}{via}, {path}: expected {exp} \
             ({verdict}), observed {obs} after {ms:.1} ms",
            family = if o.ipv6 { "IPv6" } else { "IPv4" },
            via = o
                .via
                .as_ref()
                .map(|v| format!(" via Service VIP {v}"))
                .unwrap_or_default(),
            src = o.src,
            sid = self.src_identity,
            dst = o.dst,
            dkey = self.dst_key,
            proto = o.proto.as_str(),
            port = o.port,
            path = o.path,
            exp = self.expected_outcome,
            verdict = self.verdict,
            obs = o.outcome,
            ms = o.elapsed_ms,
        )
    }
}

/// A probe matrix: every source (over the given paths) to every destination, port and protocol.
#[derive(Debug, Clone)]
pub struct Matrix<'a> {
    /// Sources and the paths to probe each over.
    pub sources: Vec<(&'a Workload, Vec<ClientPath>)>,
    /// Destinations (known pods serving every port in `ports`).
    pub destinations: Vec<&'a Workload>,
    /// Target ports.
    pub ports: Vec<u16>,
    /// Protocols.
    pub protos: Vec<Proto>,
    /// Per-probe timeout.
    pub timeout_ms: u64,
    /// Probe the destinations' IPv6 addresses (the sources are then seen with theirs) instead of IPv4.
    pub ipv6: bool,
    /// Service VIPs to probe too (IPv4, client-side path only), each for every protocol in `protos`.
    pub vips: Vec<Vip>,
}

/// A Service VIP with exactly one backend, `dst`. Only the source's own connect hook translates a VIP, so VIPs are
/// probed on the client-side path only; the policy sees the target port.
#[derive(Debug, Clone)]
pub struct Vip {
    /// The backend pod.
    pub dst: String,
    /// The ClusterIP.
    pub ip: IpAddr,
    /// (Service port, target port), the same for TCP and UDP.
    pub ports: Vec<(u16, u16)>,
}

impl Matrix<'_> {
    /// Probes everything: one `sinew-testpod probe` process per (source, path), all at the same time.
    pub fn run(&self) -> Result<Vec<Observation>> {
        // (target, (destination, target port, protocol, via VIP)).
        type Key = (String, u16, Proto, Option<String>);
        let mut direct: Vec<(String, Key)> = Vec::new();
        for d in &self.destinations {
            let ip = self.ip(d)?;
            for &port in &self.ports {
                for &proto in &self.protos {
                    direct.push((
                        proto.target(ip, port),
                        (d.name().to_string(), port, proto, None),
                    ));
                }
            }
        }
        let mut via_vip: Vec<(String, Key)> = Vec::new();
        for v in &self.vips {
            for &(svc_port, target_port) in &v.ports {
                for &proto in &self.protos {
                    let t = proto.target(v.ip, svc_port);
                    let via = Some(format!("{}:{svc_port}", v.ip));
                    via_vip.push((t, (v.dst.clone(), target_port, proto, via)));
                }
            }
        }
        let list_for = |path: ClientPath| -> Vec<&(String, Key)> {
            match path {
                ClientPath::Client => direct.iter().chain(&via_vip).collect(),
                ClientPath::Server => direct.iter().collect(),
            }
        };
        let jobs: Vec<(&Workload, ClientPath)> = self
            .sources
            .iter()
            .flat_map(|(s, paths)| paths.iter().map(move |p| (*s, *p)))
            .collect();
        let reports: Vec<Result<ProbeReport>> = std::thread::scope(|scope| {
            let handles: Vec<_> = jobs
                .iter()
                .map(|(src, path)| {
                    let targets: Vec<String> = list_for(*path)
                        .into_iter()
                        .map(|(t, _)| t.clone())
                        .collect();
                    let timeout = self.timeout_ms;
                    scope.spawn(move || match path {
                        ClientPath::Client => src.pod.probe(&targets, timeout),
                        ClientPath::Server => src.pod.probe_unmanaged(&targets, timeout),
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("probe thread panicked")))
                })
                .collect()
        });
        let mut out = Vec::new();
        for ((src, path), report) in jobs.iter().zip(reports) {
            let report = report.with_context(|| format!("probing from {} ({path})", src.name()))?;
            for (r, (_, (dst, port, proto, via))) in report.results.iter().zip(list_for(*path)) {
                out.push(Observation {
                    src: src.name().to_string(),
                    dst: dst.clone(),
                    port: *port,
                    proto: *proto,
                    path: *path,
                    outcome: r.outcome.clone(),
                    elapsed_ms: r.elapsed_ms,
                    ipv6: self.ipv6 && via.is_none(),
                    via: via.clone(),
                });
            }
        }
        Ok(out)
    }

    /// The address of `w` this matrix uses.
    fn ip(&self, w: &Workload) -> Result<IpAddr> {
        address(w, self.ipv6)
    }

    /// Compares observations with the reference verdicts for `policies`.
    pub fn check(
        &self,
        policies: &[AuthorizationPolicy],
        observations: &[Observation],
    ) -> Vec<Mismatch> {
        let find = |name: &str| -> &Workload {
            self.sources
                .iter()
                .map(|(w, _)| *w)
                .chain(self.destinations.iter().copied())
                .find(|w| w.name() == name)
                .expect("observation of a known workload")
        };
        observations
            .iter()
            .filter_map(|o| {
                let src = find(&o.src);
                let dst = find(&o.dst);
                let src_ip = address(src, o.ipv6).expect("probed, so it has the address");
                let v = expected_with(
                    policies,
                    &Mesh::default(),
                    src,
                    src_ip,
                    dst,
                    o.port,
                    o.proto,
                );
                let want = if v.allowed {
                    PROBE_OK
                } else {
                    o.path.denied_outcome()
                };
                (o.outcome != want).then(|| Mismatch {
                    observed: o.clone(),
                    expected_outcome: want.to_string(),
                    verdict: v.to_string(),
                    src_identity: src.identity_key(),
                    dst_key: dst.key(),
                })
            })
            .collect()
    }
}

/// One pod of a [`PolicyFixture`].
#[derive(Debug, Clone)]
pub struct PodSpec {
    /// Pod name.
    pub name: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Service account; `None`: a stranger (no manifest, no server; a source outside the mesh).
    pub service_account: Option<String>,
    /// Labels.
    pub labels: Vec<(String, String)>,
}

impl PodSpec {
    /// A known pod `name` in `namespace` with service account `sa` and `labels`.
    pub fn new(name: &str, namespace: &str, sa: &str, labels: &[(&str, &str)]) -> PodSpec {
        PodSpec {
            name: name.into(),
            namespace: namespace.into(),
            service_account: Some(sa.into()),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    /// A netns that is no known pod.
    pub fn stranger(name: &str) -> PodSpec {
        PodSpec {
            name: name.into(),
            namespace: crate::topology::DEFAULT_NAMESPACE.into(),
            service_account: None,
            labels: Vec::new(),
        }
    }
}

/// What a test expects for one (source, destination, target port): allowed or denied, for TCP and UDP alike, on
/// both paths (strangers: the server-side path only).
#[derive(Debug, Clone)]
pub struct Want {
    /// Source pod.
    pub src: String,
    /// Destination pod.
    pub dst: String,
    /// Target port.
    pub port: u16,
    /// Allowed?
    pub allow: bool,
}

/// `Want` shorthand.
pub fn want(src: &str, dst: &str, port: u16, allow: bool) -> Want {
    Want {
        src: src.into(),
        dst: dst.into(),
        port,
        allow,
    }
}

/// How [`PolicyFixture::setup_with`] builds its nodes and agents.
#[derive(Debug, Clone, Default)]
pub struct FixtureOptions {
    /// Pods get IPv6 addresses too.
    pub ipv6: bool,
    /// The agents' `--trust-domain` and `--mesh-root-namespace` (default: the agents' defaults).
    pub mesh: Option<Mesh>,
    /// More `mesh-agent run` arguments.
    pub agent_args: Vec<String>,
}

/// The file [`PolicyFixture::set_policies`] writes.
pub const POLICY_FILE: &str = "policies.yaml";

/// Nodes with pods that have identities, each known pod serving TCP and UDP on every port of `ports`, and one
/// ready agent per node. Fields drop in order: agents, servers, topology.
#[derive(Debug)]
pub struct PolicyFixture {
    /// One agent per node, in node order.
    pub agents: Vec<crate::Agent>,
    /// The servers.
    pub servers: Vec<crate::Proc>,
    /// The manifest directory (shared by all agents).
    pub source: SourceDir,
    /// Every pod, strangers included, in declaration order.
    pub workloads: Vec<Workload>,
    /// The ports every known pod serves.
    pub ports: Vec<u16>,
    /// Per-probe timeout for checks (ms).
    pub probe_timeout_ms: u64,
    /// The trust domain and root namespace the agents run with.
    pub mesh: Mesh,
    /// The topology (dropped last).
    pub topo: crate::Topology,
}

impl PolicyFixture {
    /// Builds the nodes and pods, starts the servers, writes the Pod manifests (and `extra_files`, e.g. Services or
    /// policies that must be there from the first sync), starts one agent per node and waits until all are ready.
    pub fn setup(
        name: &str,
        testpod_bin: &std::path::Path,
        nodes: &[(&str, Vec<PodSpec>)],
        ports: &[u16],
        extra_files: &[(&str, Vec<Value>)],
    ) -> Result<PolicyFixture> {
        Self::setup_with(
            name,
            testpod_bin,
            nodes,
            ports,
            extra_files,
            &FixtureOptions::default(),
        )
    }

    /// [`PolicyFixture::setup`] with options.
    pub fn setup_with(
        name: &str,
        testpod_bin: &std::path::Path,
        nodes: &[(&str, Vec<PodSpec>)],
        ports: &[u16],
        extra_files: &[(&str, Vec<Value>)],
        opts: &FixtureOptions,
    ) -> Result<PolicyFixture> {
        let b = crate::add_nodes(
            crate::Topology::builder(name)
                .testpod_bin(testpod_bin)
                .ipv6(opts.ipv6),
            nodes,
            |p| (&p.name, &p.namespace),
        );
        let topo = b.build()?;
        let source = topo.source_dir()?;
        let mut workloads = Vec::new();
        let mut servers = Vec::new();
        for (_, pods) in nodes {
            for spec in pods {
                let pod = topo.pod(&spec.name);
                let w = match &spec.service_account {
                    Some(sa) => {
                        let labels: Vec<(&str, &str)> = spec
                            .labels
                            .iter()
                            .map(|(k, v)| (k.as_str(), v.as_str()))
                            .collect();
                        servers.push(pod.serve_ports(ports, &spec.name)?);
                        Workload::new(&pod, sa, &labels)
                    }
                    None => Workload::stranger(&pod),
                };
                w.write(&source)?;
                workloads.push(w);
            }
        }
        for (file, objects) in extra_files {
            source.write(file, objects)?;
        }
        let mut agent_args = opts.agent_args.clone();
        if let Some(m) = &opts.mesh {
            agent_args.extend([
                "--trust-domain".to_string(),
                m.trust_domain.clone(),
                "--mesh-root-namespace".to_string(),
                m.root_namespace.clone(),
            ]);
        }
        let mut agents = Vec::new();
        for (node, _) in nodes {
            let node = topo.node(node);
            let mut opts = crate::AgentOptions::for_node(node, source.path(), None)?;
            opts.extra_args.extend(agent_args.iter().cloned());
            agents.push(crate::Agent::start_with(opts)?);
        }
        for a in &mut agents {
            a.wait_ready(std::time::Duration::from_secs(20))?;
        }
        Ok(PolicyFixture {
            agents,
            servers,
            source,
            workloads,
            ports: ports.to_vec(),
            probe_timeout_ms: 400,
            mesh: opts.mesh.clone().unwrap_or_default(),
            topo,
        })
    }

    /// The workload named `name`. Panics if there is none.
    pub fn w(&self, name: &str) -> &Workload {
        self.workloads
            .iter()
            .find(|w| w.name() == name)
            .unwrap_or_else(|| panic!("no workload {name:?}"))
    }

    /// The agent of the node `pod` runs on.
    pub fn agent_of(&self, pod: &str) -> &crate::Agent {
        let node = &self.w(pod).pod.node;
        let i = self
            .topo
            .nodes()
            .iter()
            .position(|n| n.name() == node)
            .expect("pod's node exists");
        &self.agents[i]
    }

    /// Writes `objects` as [`POLICY_FILE`] (replacing the previous set) and waits until every agent has exactly
    /// these policies in force (and no rejection). Give every set unique names. Returns the first agent's status.
    pub fn set_policies(&self, objects: &[Value]) -> Result<crate::PolicyStatus> {
        if objects.is_empty() {
            self.source.remove(POLICY_FILE)?;
        } else {
            self.source.write(POLICY_FILE, objects)?;
        }
        let keys = objects.iter().map(policy_key).collect();
        self.wait_in_force(&keys, &[])
    }

    /// Waits (10 s at most) until every agent has exactly `keys` in force, with only rejections mentioning one of
    /// `rejected_ok`. Returns the first agent's status.
    pub fn wait_in_force(
        &self,
        keys: &std::collections::BTreeSet<String>,
        rejected_ok: &[&str],
    ) -> Result<crate::PolicyStatus> {
        let mut first = None;
        for a in &self.agents {
            let st = a
                .wait_policies(keys, rejected_ok, std::time::Duration::from_secs(10))
                .with_context(|| format!("agent {}", a.options().node))?;
            first.get_or_insert(st);
        }
        Ok(first.unwrap_or_default())
    }

    /// Probes every `Want` (TCP and UDP; client-side and server-side paths, strangers server-side only) and returns
    /// one line per disagreement: with the hand-written expectation, with the reference evaluator's verdict for
    /// `policies` (a disagreement there is reported too: the test's reading of Istio and the reference differ), and
    /// with `/debug/policy/check` of the destination's agent.
    pub fn verify(&self, policies: &[Value], wants: &[Want]) -> Result<Vec<String>> {
        self.verify_on(policies, wants, false)
    }

    /// [`PolicyFixture::verify`] over IPv4 (`v6` false) or IPv6 (`v6` true: to the destinations' IPv6 addresses,
    /// so the sources are seen with theirs; needs [`FixtureOptions::ipv6`]).
    pub fn verify_on(&self, policies: &[Value], wants: &[Want], v6: bool) -> Result<Vec<String>> {
        let parsed = parse_policies(policies)?;
        let ip_of = |w: &Workload| -> Result<IpAddr> {
            if v6 {
                w.pod
                    .ip6
                    .map(IpAddr::V6)
                    .ok_or_else(|| anyhow::anyhow!("pod {} has no IPv6 address", w.name()))
            } else {
                Ok(IpAddr::V4(w.pod.ip4))
            }
        };
        let mut problems = Vec::new();
        // Group the probes by (source, path): one probe process each.
        type Job<'w> = Vec<(String, &'w Want, Proto)>;
        let mut jobs: BTreeMap<(String, ClientPath), Job<'_>> = BTreeMap::new();
        for wnt in wants {
            let src = self.w(&wnt.src);
            let dst = self.w(&wnt.dst);
            let (src_ip, dst_ip) = (ip_of(src)?, ip_of(dst)?);
            for proto in Proto::BOTH {
                let v = expected_with(&parsed, &self.mesh, src, src_ip, dst, wnt.port, proto);
                if v.allowed != wnt.allow {
                    problems.push(format!(
                        "REFERENCE EVALUATOR DISAGREES with the test: {} -> {} {}/{}: test expects {}, reference \
                         says {v}",
                        wnt.src,
                        wnt.dst,
                        proto.as_str(),
                        wnt.port,
                        if wnt.allow { "allow" } else { "deny" },
                    ));
                }
                let paths: &[ClientPath] = if src.service_account.is_some() {
                    &ClientPath::BOTH
                } else {
                    &[ClientPath::Server]
                };
                for path in paths {
                    jobs.entry((wnt.src.clone(), *path)).or_default().push((
                        proto.target(dst_ip, wnt.port),
                        wnt,
                        proto,
                    ));
                }
            }
            // What the agent explains must agree too.
            let from = match &src.service_account {
                Some(_) => src.identity_key(),
                None => src_ip.to_string(),
            };
            match self
                .agent_of(&wnt.dst)
                .policy_check(&from, &dst.key(), wnt.port, "tcp")
            {
                Ok(c) if c.allowed == wnt.allow => {}
                Ok(c) => problems.push(format!(
                    "/debug/policy/check from={from} to={} port={}: allowed={} ({:?} rule {:?}: {}), want {}",
                    dst.key(),
                    wnt.port,
                    c.allowed,
                    c.policy,
                    c.rule,
                    c.reason,
                    wnt.allow
                )),
                Err(e) => problems.push(format!("/debug/policy/check from={from}: {e:#}")),
            }
        }
        let results: Vec<Result<ProbeReport>> = std::thread::scope(|scope| {
            let hs: Vec<_> = jobs
                .iter()
                .map(|((src, path), items)| {
                    let pod = &self.w(src).pod;
                    let targets: Vec<String> = items.iter().map(|(t, _, _)| t.clone()).collect();
                    let timeout = self.probe_timeout_ms;
                    let path = *path;
                    scope.spawn(move || match path {
                        ClientPath::Client => pod.probe(&targets, timeout),
                        ClientPath::Server => pod.probe_unmanaged(&targets, timeout),
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("panicked")))
                })
                .collect()
        });
        for (((src, path), items), report) in jobs.iter().zip(results) {
            let report = report?;
            for ((_, wnt, proto), r) in items.iter().zip(&report.results) {
                let want = if wnt.allow {
                    PROBE_OK
                } else {
                    path.denied_outcome()
                };
                if r.outcome != want {
                    problems.push(format!(
                        "{src} -> {} {}/{} {path}: expected {want}, observed {} after {:.1} ms",
                        wnt.dst,
                        proto.as_str(),
                        wnt.port,
                        r.outcome,
                        r.elapsed_ms
                    ));
                }
            }
        }
        Ok(problems)
    }

    /// [`PolicyFixture::verify`], panicking with the policies' YAML and every problem.
    pub fn assert_wants(&self, what: &str, policies: &[Value], wants: &[Want]) {
        self.assert_wants_on(what, policies, wants, false)
    }

    /// [`PolicyFixture::verify_on`], panicking with the policies' YAML and every problem.
    pub fn assert_wants_on(&self, what: &str, policies: &[Value], wants: &[Want], v6: bool) {
        let problems = self
            .verify_on(policies, wants, v6)
            .unwrap_or_else(|e| panic!("{what}: probing failed: {e:#}"));
        assert!(
            problems.is_empty(),
            "{what}: {} problem(s):\n  {}\npolicies:\n{}",
            problems.len(),
            problems.join("\n  "),
            policies_yaml(policies)
        );
    }
}

/// `w`'s IPv6 (`v6`) or IPv4 address.
fn address(w: &Workload, v6: bool) -> Result<IpAddr> {
    if v6 {
        w.pod
            .ip6
            .map(IpAddr::V6)
            .ok_or_else(|| anyhow::anyhow!("pod {} has no IPv6 address", w.name()))
    } else {
        Ok(IpAddr::V4(w.pod.ip4))
    }
}

/// A small deterministic PRNG (SplitMix64) for generated tests: the seed alone reproduces a run.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded generator.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u32) -> bool {
        self.below(100) < percent as usize
    }

    /// A uniformly chosen element.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    /// A random subset of `items` with `1..=max` elements (in the items' order).
    pub fn subset<T: Clone>(&mut self, items: &[T], max: usize) -> Vec<T> {
        let n = 1 + self.below(max.min(items.len()));
        let mut idx: Vec<usize> = (0..items.len()).collect();
        for i in 0..n {
            let j = i + self.below(items.len() - i);
            idx.swap(i, j);
        }
        let mut chosen: Vec<usize> = idx[..n].to_vec();
        chosen.sort_unstable();
        chosen.into_iter().map(|i| items[i].clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rng_is_deterministic_and_subsets_are_bounded() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
        let items = [1, 2, 3, 4, 5];
        for _ in 0..200 {
            let s = a.subset(&items, 3);
            assert!(!s.is_empty() && s.len() <= 3, "{s:?}");
            assert!(s.windows(2).all(|w| w[0] < w[1]), "{s:?}");
        }
    }

    #[test]
    fn policy_objects_parse_as_the_agent_reads_them() {
        let objs = vec![
            crate::manifest::authorization_policy(
                "prod",
                "p1",
                json!({"action": "DENY", "rules": [{"from": [{"source": {"principals": [spiffe("a", "b")]}}],
                        "to": [{"operation": {"ports": ["8080"]}}]}]}),
            ),
            crate::manifest::authorization_policy("prod", "p2", json!({})),
        ];
        let p = parse_policies(&objs).unwrap();
        assert_eq!(p[0].key(), "prod/p1");
        assert_eq!(policy_key(&objs[1]), "prod/p2");
        assert!(policies_yaml(&objs).contains("---\n"));
    }

    #[test]
    fn targets_are_spelled_for_the_probe_tool() {
        let ip: IpAddr = "10.244.0.10".parse().unwrap();
        assert_eq!(Proto::Udp.target(ip, 8080), "udp:10.244.0.10:8080");
        let ip6: IpAddr = "fd00::1".parse().unwrap();
        assert_eq!(Proto::Tcp.target(ip6, 80), "tcp:[fd00::1]:80");
    }
}
