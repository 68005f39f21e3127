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

    /// The evaluator's identity (`None` for a stranger).
    pub fn identity(&self) -> Option<Identity> {
        self.service_account
            .as_ref()
            .map(|sa| Identity::new(TRUST_DOMAIN, &self.pod.namespace, sa))
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

/// The reference verdict for `src` connecting to `dst` on target port `port`.
pub fn expected(
    policies: &[AuthorizationPolicy],
    src: &Workload,
    dst: &Workload,
    port: u16,
    proto: Proto,
) -> Verdict {
    let req = Request {
        source: src.identity(),
        source_ip: IpAddr::V4(src.pod.ip4),
        dest_namespace: dst.namespace().to_string(),
        dest_labels: dst.labels.clone(),
        dest_port: port,
        protocol: proto.eval(),
    };
    evaluate_with_root(policies, &req, ROOT_NAMESPACE)
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
            "{src} [{sid}] -> {dst} [{dkey}] {proto}/{port}, {path}: expected {exp} ({verdict}), observed {obs} \
             after {ms:.1} ms",
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
}

impl Matrix<'_> {
    /// Probes everything: one `sinew-testpod probe` process per (source, path), all at the same time.
    pub fn run(&self) -> Result<Vec<Observation>> {
        let mut targets = Vec::new();
        let mut keys = Vec::new();
        for d in &self.destinations {
            for &port in &self.ports {
                for &proto in &self.protos {
                    targets.push(proto.target(IpAddr::V4(d.pod.ip4), port));
                    keys.push((d.name().to_string(), port, proto));
                }
            }
        }
        let jobs: Vec<(&Workload, ClientPath)> = self
            .sources
            .iter()
            .flat_map(|(s, paths)| paths.iter().map(move |p| (*s, *p)))
            .collect();
        let reports: Vec<Result<ProbeReport>> = std::thread::scope(|scope| {
            let handles: Vec<_> = jobs
                .iter()
                .map(|(src, path)| {
                    let targets = &targets;
                    let timeout = self.timeout_ms;
                    scope.spawn(move || match path {
                        ClientPath::Client => src.pod.probe(targets, timeout),
                        ClientPath::Server => src.pod.probe_unmanaged(targets, timeout),
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
            for (r, (dst, port, proto)) in report.results.iter().zip(&keys) {
                out.push(Observation {
                    src: src.name().to_string(),
                    dst: dst.clone(),
                    port: *port,
                    proto: *proto,
                    path: *path,
                    outcome: r.outcome.clone(),
                    elapsed_ms: r.elapsed_ms,
                });
            }
        }
        Ok(out)
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
                let v = expected(policies, src, dst, o.port, o.proto);
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
