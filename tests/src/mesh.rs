//! Mesh (issue 4: the node proxy with mTLS) helpers: a fixture with enrolled and unenrolled pods on several nodes
//! sharing one CA, `PeerAuthentication` / `Namespace` objects, the long-lived client report, `/debug/certs`, and
//! raw TLS / HBONE clients and a fake tunnel server that run "on a node" (in its network namespace).
//!
//! - [`MeshFixture`]: nodes, pods ([`MeshPod`]: enrolled or not, service account, labels, served ports), Services,
//!   one CA written to `<work>/ca` and passed to every agent as `--ca-dir`, one ready agent per node.
//! - [`Hold`]: `sinew-testpod hold`, one connection kept open doing request/response every N ms
//!   ([`HoldReport`]).
//! - [`tls_probe`]: one TLS 1.3 (ALPN h2) handshake from inside a namespace with a chosen client certificate, then
//!   the first read: how the tunnel server treats that certificate.
//! - [`hbone_connect`]: a minimal HTTP/2 `CONNECT` client (just enough framing and HPACK for one stream), so a test
//!   can talk to a node proxy's tunnel port as another node proxy would, with any identity the test CA signs.
//! - [`FakeTunnel`]: a TLS server on a chosen address in a namespace, presenting a chosen certificate.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use mesh_agent::identity::{Ca, SpiffeId, Svid};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::capture::spawn_in_netns;
use crate::manifest::{PodManifest, Service, SourceDir};
use crate::testpod::ProbeReport;
use crate::topology::{DEFAULT_NAMESPACE, Node, Pod};
use crate::{Agent, AgentOptions, Metrics, Proc, Topology};

/// The enrollment label (pod or Namespace).
pub const MESH_LABEL: &str = "sinew.dev/mesh";
/// The trust domain of the test CA and the agents.
pub const TRUST_DOMAIN: &str = "cluster.local";
/// The node proxy's own SPIFFE ID (presented by the tunnel server).
pub const PROXY_ID: &str = "spiffe://cluster.local/ns/sinew-system/sa/sinew-agent";
/// The link-local address of the node proxy (on `lo` of the node namespace).
pub const PROXY_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 7, 1);
/// The outbound (redirect target) port.
pub const OUTBOUND_PORT: u16 = 15001;
/// The inbound tunnel port.
pub const TUNNEL_PORT: u16 = 15008;
/// The file [`MeshFixture::set_peer_authentications`] writes.
pub const PEER_AUTH_FILE: &str = "peer-authentications.yaml";
/// The file [`MeshFixture::set_policies`] writes.
pub const POLICY_FILE: &str = "policies.yaml";

/// `spiffe://cluster.local/ns/<ns>/sa/<sa>`.
pub fn spiffe(ns: &str, sa: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/{ns}/sa/{sa}")
}

/// One pod of a [`MeshFixture`].
#[derive(Debug, Clone)]
pub struct MeshPod {
    /// Pod name (also its `app` label).
    pub name: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// `spec.serviceAccountName`.
    pub service_account: String,
    /// Labels (`app=<name>` and, when enrolled, `sinew.dev/mesh=enabled` are added by the constructors).
    pub labels: BTreeMap<String, String>,
    /// Ports it serves (TCP and UDP) with `sinew-testpod serve --name <name>`.
    pub serve: Vec<u16>,
    /// Write a Pod object for it (false: a netns no object describes).
    pub manifest: bool,
    /// `status.hostIP` instead of its node's address.
    pub host_ip: Option<HostIp>,
}

impl MeshPod {
    /// An enrolled pod (`sinew.dev/mesh=enabled`), service account = its name, `app=<name>`.
    pub fn enrolled(name: &str) -> MeshPod {
        MeshPod::plain(name).label(MESH_LABEL, "enabled")
    }

    /// A known pod without the enrollment label (enrolled only if its namespace is), service account = its name.
    pub fn plain(name: &str) -> MeshPod {
        MeshPod {
            name: name.into(),
            namespace: DEFAULT_NAMESPACE.into(),
            service_account: name.into(),
            labels: BTreeMap::from([("app".to_string(), name.to_string())]),
            serve: Vec::new(),
            manifest: true,
            host_ip: None,
        }
    }

    /// Sets the service account.
    pub fn sa(mut self, sa: &str) -> MeshPod {
        self.service_account = sa.into();
        self
    }

    /// Sets the Kubernetes namespace.
    pub fn namespace(mut self, ns: &str) -> MeshPod {
        self.namespace = ns.into();
        self
    }

    /// Adds (or replaces) a label.
    pub fn label(mut self, k: &str, v: &str) -> MeshPod {
        self.labels.insert(k.into(), v.into());
        self
    }

    /// Serves these ports.
    pub fn serve(mut self, ports: &[u16]) -> MeshPod {
        self.serve = ports.to_vec();
        self
    }

    /// Overrides `status.hostIP` (where other nodes' proxies send its tunnel).
    pub fn host_ip(mut self, ip: Ipv4Addr) -> MeshPod {
        self.host_ip = Some(HostIp::Addr(ip));
        self
    }

    /// Sets `status.hostIP` to the address of the fixture's pod `pod` (e.g. a pod without an object whose netns
    /// runs a [`FakeTunnel`]).
    pub fn host_ip_of_pod(mut self, pod: &str) -> MeshPod {
        self.host_ip = Some(HostIp::OfPod(pod.into()));
        self
    }

    /// No Pod object: a netns no object describes (not a known pod).
    pub fn hidden(name: &str) -> MeshPod {
        MeshPod {
            manifest: false,
            ..MeshPod::plain(name)
        }
    }

    /// Its SPIFFE ID.
    pub fn principal(&self) -> String {
        spiffe(&self.namespace, &self.service_account)
    }

    fn manifest_for(&self, pod: &Pod, topo: &Topology) -> Value {
        let mut m = PodManifest::new(pod).service_account(&self.service_account);
        for (k, v) in &self.labels {
            m = m.label(k, v);
        }
        let mut v = m.to_value();
        let host_ip = match &self.host_ip {
            None => None,
            Some(HostIp::Addr(ip)) => Some(*ip),
            Some(HostIp::OfPod(p)) => Some(topo.pod(p).ip4),
        };
        if let Some(ip) = host_ip {
            v["status"]["hostIP"] = Value::String(ip.to_string());
        }
        v
    }
}

/// A pod's `status.hostIP` override.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostIp {
    /// This address.
    Addr(Ipv4Addr),
    /// The address of this pod of the fixture.
    OfPod(String),
}

/// How [`MeshFixture::setup`] builds the agents and what it writes first.
#[derive(Debug, Clone, Default)]
pub struct MeshOptions {
    /// More `mesh-agent run` arguments for every agent (e.g. `--svid-lifetime 20s`).
    pub agent_args: Vec<String>,
    /// Services written before the agents start (`services.yaml`).
    pub services: Vec<Service>,
    /// More objects written before the agents start: (file, objects).
    pub files: Vec<(String, Vec<Value>)>,
}

/// Nodes with mesh pods, one CA shared by every agent, one ready agent per node. Fields drop in order: agents,
/// servers, topology.
#[derive(Debug)]
pub struct MeshFixture {
    /// One agent per node, in node order.
    pub agents: Vec<Agent>,
    /// The servers of the pods that serve.
    pub servers: Vec<Proc>,
    /// The manifest directory.
    pub source: SourceDir,
    /// The CA every agent signs with (`--ca-dir`); the tests sign their own certificates with it too.
    pub ca: Ca,
    /// Where the CA is written.
    pub ca_dir: PathBuf,
    /// Every pod, in declaration order.
    pub pods: Vec<MeshPod>,
    /// The labels of the Namespace objects written at setup (from [`MeshOptions::files`]).
    pub namespace_labels: BTreeMap<String, BTreeMap<String, String>>,
    /// The topology (dropped last).
    pub topo: Topology,
}

/// `mesh-agent run` options for `node` ([`AgentOptions::for_node`]: the proxy in the node's netns, a state dir)
/// with `--ca-dir`, then `extra`.
pub fn agent_options(
    node: &Node,
    source: &Path,
    ca_dir: &Path,
    extra: &[String],
) -> Result<AgentOptions> {
    let mut o = AgentOptions::for_node(node, source, None)?;
    o.extra_args
        .extend(["--ca-dir".to_string(), ca_dir.display().to_string()]);
    o.extra_args.extend(extra.iter().cloned());
    Ok(o)
}

impl MeshFixture {
    /// Builds the nodes and pods, generates the CA, starts the servers, writes the Pod objects, Services and
    /// `opts.files`, starts one agent per node and waits until every agent is ready and holds an SVID for each of
    /// its node's enrolled service accounts.
    pub fn setup(
        name: &str,
        testpod_bin: &Path,
        nodes: &[(&str, Vec<MeshPod>)],
        opts: &MeshOptions,
    ) -> Result<MeshFixture> {
        let b = crate::add_nodes(
            Topology::builder(name).testpod_bin(testpod_bin),
            nodes,
            |p| (&p.name, &p.namespace),
        );
        let topo = b.build()?;
        let source = topo.source_dir()?;
        let ca_dir = topo.work_dir().join("ca");
        let ca = Ca::generate(TRUST_DOMAIN).context("generating the test CA")?;
        ca.write_to(&ca_dir).context("writing the test CA")?;
        let mut servers = Vec::new();
        let mut pods = Vec::new();
        for (_, specs) in nodes {
            for spec in specs {
                let pod = topo.pod(&spec.name);
                if !spec.serve.is_empty() {
                    servers.push(pod.serve_ports(&spec.serve, &spec.name)?);
                }
                if spec.manifest {
                    source.write(
                        &format!("pod-{}.yaml", spec.name),
                        &[spec.manifest_for(&pod, &topo)],
                    )?;
                }
                pods.push(spec.clone());
            }
        }
        if !opts.services.is_empty() {
            let svcs: Vec<Value> = opts.services.iter().map(Service::to_value).collect();
            source.write("services.yaml", &svcs)?;
        }
        let mut namespace_labels = BTreeMap::new();
        for (file, objects) in &opts.files {
            source.write(file, objects)?;
            for o in objects.iter().filter(|o| o["kind"] == "Namespace") {
                let labels =
                    serde_json::from_value(o["metadata"]["labels"].clone()).unwrap_or_default();
                namespace_labels.insert(
                    o["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    labels,
                );
            }
        }
        let mut agents = Vec::new();
        for (node, _) in nodes {
            let node = topo.node(node);
            agents.push(Agent::start_with(agent_options(
                node,
                source.path(),
                &ca_dir,
                &opts.agent_args,
            )?)?);
        }
        for a in &mut agents {
            a.wait_ready(Duration::from_secs(20))?;
        }
        let f = MeshFixture {
            agents,
            servers,
            source,
            ca,
            ca_dir,
            pods,
            namespace_labels,
            topo,
        };
        f.wait_svids(Duration::from_secs(10))?;
        f.wait_mesh_view(Duration::from_secs(10))?;
        Ok(f)
    }

    /// Whether pod `p` is enrolled: its own `sinew.dev/mesh` label, else its Namespace's (the agent's rule,
    /// `mesh_agent::enrollment::enrolled`). Pods without an object are not.
    pub fn enrolled(&self, p: &MeshPod) -> bool {
        let none = BTreeMap::new();
        p.manifest
            && mesh_agent::enrollment::enrolled(
                &p.labels,
                self.namespace_labels.get(&p.namespace).unwrap_or(&none),
            )
    }

    /// Waits until every agent lists a workload certificate for each enrolled local pod's identity.
    pub fn wait_svids(&self, timeout: Duration) -> Result<()> {
        for (i, node) in self.topo.nodes().iter().enumerate() {
            let want: Vec<String> = self
                .pods
                .iter()
                .filter(|p| self.enrolled(p) && self.node_of(&p.name) == node.name())
                .map(MeshPod::principal)
                .collect();
            let agent = &self.agents[i];
            crate::eventually(timeout, Duration::from_millis(100), || {
                let certs = certs(agent).map_err(|e| format!("{e:#}"))?;
                let missing: Vec<&String> = want
                    .iter()
                    .filter(|id| {
                        !certs
                            .iter()
                            .any(|c| c.role == "workload" && &c.spiffe_id == *id)
                    })
                    .collect();
                if missing.is_empty() {
                    Ok(())
                } else {
                    Err(format!(
                        "node {}: no workload SVID yet for {missing:?}; /debug/certs: {certs:?}",
                        node.name()
                    ))
                }
            })
            .map_err(|e| anyhow!("{e}; agent log tail:\n{}", agent.log_tail(30)))?;
        }
        Ok(())
    }

    /// Waits until every agent's `/debug/policies` lists every enrolled pod (on any node) in its
    /// `mesh` view, so the kernel redirects connections to them from the first probe on.
    pub fn wait_mesh_view(&self, timeout: Duration) -> Result<()> {
        let want: Vec<String> = self
            .pods
            .iter()
            .filter(|p| self.enrolled(p))
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .collect();
        for a in &self.agents {
            crate::eventually(timeout, Duration::from_millis(50), || {
                let v: Value = a
                    .get_json("/debug/policies")
                    .map_err(|e| format!("{e:#}"))?;
                let missing: Vec<&String> = want
                    .iter()
                    .filter(|k| v["mesh"].get(k.as_str()).is_none())
                    .collect();
                if missing.is_empty() {
                    Ok(())
                } else {
                    Err(format!(
                        "not in the mesh view yet: {missing:?}; mesh: {}",
                        v["mesh"]
                    ))
                }
            })
            .map_err(|e| anyhow!("agent {}: {e}", a.options().node))?;
        }
        Ok(())
    }

    /// The pod named `name`.
    pub fn pod(&self, name: &str) -> Pod {
        self.topo.pod(name)
    }

    /// The spec of the pod named `name`.
    pub fn spec(&self, name: &str) -> &MeshPod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no mesh pod {name:?}"))
    }

    /// The SPIFFE ID of pod `name`.
    pub fn principal(&self, name: &str) -> String {
        self.spec(name).principal()
    }

    fn node_of(&self, pod: &str) -> String {
        self.topo.pod(pod).node
    }

    fn node_index(&self, node: &str) -> usize {
        self.topo
            .nodes()
            .iter()
            .position(|n| n.name() == node)
            .unwrap_or_else(|| panic!("no node {node:?}"))
    }

    /// The agent of node `node`.
    pub fn agent(&self, node: &str) -> &Agent {
        &self.agents[self.node_index(node)]
    }

    /// The agent of the node pod `pod` runs on.
    pub fn agent_of(&self, pod: &str) -> &Agent {
        self.agent(&self.node_of(pod))
    }

    /// `/metrics` of node `node`, or a panic.
    pub fn metrics(&self, node: &str) -> Metrics {
        self.agent(node)
            .metrics()
            .unwrap_or_else(|e| panic!("node {node}: scraping /metrics: {e:#}"))
    }

    /// The node's underlay address (its pods' `status.hostIP`).
    pub fn node_ip(&self, node: &str) -> Ipv4Addr {
        self.topo.node(node).host_ip()
    }

    /// Writes `objects` as [`PEER_AUTH_FILE`] (replacing the previous set; none: the file is removed). Nothing
    /// shows when they are in force: callers wait for the effect.
    pub fn set_peer_authentications(&self, objects: &[Value]) -> Result<()> {
        if objects.is_empty() {
            self.source.remove(PEER_AUTH_FILE)
        } else {
            self.source.write(PEER_AUTH_FILE, objects).map(drop)
        }
    }

    /// Waits (at most `timeout`) until every agent's `/debug/policies` shows pod `pod` enrolled with mTLS `mode`
    /// (`STRICT`, `PERMISSIVE`, `DISABLE`) and exactly the per-port `ports` that differ from it (the `mesh` entry
    /// is what is in force in the kernel).
    pub fn wait_mtls(
        &self,
        pod: &str,
        mode: &str,
        ports: &[(u16, &str)],
        timeout: Duration,
    ) -> Result<()> {
        let key = format!("{}/{pod}", self.spec(pod).namespace);
        let want = serde_json::json!({
            "mode": mode,
            "ports": ports.iter().map(|(p, m)| (p.to_string(), Value::String(m.to_string())))
                .collect::<serde_json::Map<String, Value>>(),
        });
        for a in &self.agents {
            crate::eventually(timeout, Duration::from_millis(50), || {
                let v: Value = a
                    .get_json("/debug/policies")
                    .map_err(|e| format!("{e:#}"))?;
                let got = &v["mesh"][&key];
                if *got == want {
                    Ok(())
                } else {
                    Err(format!("mesh[{key:?}] is {got}, want {want}"))
                }
            })
            .map_err(|e| anyhow!("agent {}: {e}", a.options().node))?;
        }
        Ok(())
    }

    /// Writes `objects` as [`POLICY_FILE`] and waits until every agent has exactly these policies in force.
    pub fn set_policies(&self, objects: &[Value]) -> Result<()> {
        if objects.is_empty() {
            self.source.remove(POLICY_FILE)?;
        } else {
            self.source.write(POLICY_FILE, objects)?;
        }
        let keys = objects.iter().map(crate::policy::policy_key).collect();
        for a in &self.agents {
            a.wait_policies(&keys, &[], Duration::from_secs(10))
                .with_context(|| format!("agent {}", a.options().node))?;
        }
        Ok(())
    }

    /// An SVID for pod `name`'s identity, signed by the fixture's CA (what that pod's node would present for it).
    pub fn svid_of(&self, name: &str) -> Svid {
        let p = self.spec(name);
        self.ca
            .issue(&p.namespace, &p.service_account)
            .expect("issuing a test SVID")
    }

    /// The log tails of every agent, for failure messages.
    pub fn logs(&self, n: usize) -> String {
        self.agents
            .iter()
            .map(|a| format!("----- agent {} -----\n{}", a.options().node, a.log_tail(n)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// One probe target (`tcp:IP:PORT`) from `pod`, in its cgroup (`managed`) or outside it; returns the outcome word.
pub fn probe1(pod: &Pod, target: &str, managed: bool, timeout_ms: u64) -> Result<String> {
    let t = [target.to_string()];
    let r: ProbeReport = if managed {
        pod.probe(&t, timeout_ms)?
    } else {
        pod.probe_unmanaged(&t, timeout_ms)?
    };
    Ok(r.results[0].outcome.clone())
}

// ---------------------------------------------------------------------------------------------------------------
// /debug/certs

/// One entry of `/debug/certs`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CertEntry {
    /// `ca`, `proxy` or `workload`.
    #[serde(default)]
    pub role: String,
    /// The SPIFFE ID (the CA: `spiffe://<td>`).
    #[serde(default)]
    pub spiffe_id: String,
    /// Serial number (hex).
    #[serde(default)]
    pub serial: String,
    /// RFC 3339.
    #[serde(default)]
    pub not_before: String,
    /// RFC 3339.
    #[serde(default)]
    pub not_after: String,
    /// RFC 3339; none for the CA.
    #[serde(default)]
    pub renew_at: Option<String>,
    /// Seconds until not-after.
    #[serde(default)]
    pub expires_in_secs: i64,
}

/// `GET /debug/certs`: a JSON list, or an object with the list under `certificates` / `certs`.
pub fn certs(agent: &Agent) -> Result<Vec<CertEntry>> {
    let v: Value = agent.get_json("/debug/certs")?;
    let list = match &v {
        Value::Array(_) => v.clone(),
        Value::Object(m) => m
            .get("certificates")
            .or_else(|| m.get("certs"))
            .cloned()
            .ok_or_else(|| anyhow!("/debug/certs: no list in {v}"))?,
        _ => bail!("/debug/certs: unexpected {v}"),
    };
    serde_json::from_value(list).with_context(|| format!("/debug/certs: {v}"))
}

/// The entry with `role` and `spiffe_id`, if listed.
pub fn cert<'a>(list: &'a [CertEntry], role: &str, spiffe_id: &str) -> Option<&'a CertEntry> {
    list.iter()
        .find(|c| c.role == role && c.spiffe_id == spiffe_id)
}

// ---------------------------------------------------------------------------------------------------------------
// sinew-testpod hold

/// Result of `sinew-testpod hold`: one connection, the server's name line, then request/response rounds (the
/// payload written, the same bytes read back) every interval until the count or the duration is reached, or the
/// first error.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct HoldReport {
    /// Target as given.
    pub to: String,
    /// The connect and the name line succeeded.
    pub connected: bool,
    /// The server's name line.
    #[serde(default)]
    pub name: Option<String>,
    /// Completed round trips (payload echoed back intact).
    pub round_trips: u64,
    /// The error that ended the run early: `<stage>:<errno>: <text>` (stages `connect`, `name`, `write`, `read`,
    /// `echo`).
    #[serde(default)]
    pub first_error: Option<String>,
    /// When that error happened (ms since the epoch).
    #[serde(default)]
    pub first_error_unix_ms: Option<u64>,
    /// Wall-clock start (ms since the epoch).
    pub started_unix_ms: u64,
    /// Wall-clock end (ms since the epoch).
    pub finished_unix_ms: u64,
    /// Slowest round trip, milliseconds.
    pub max_rtt_ms: f64,
}

/// `sinew-testpod hold` arguments.
#[derive(Debug, Clone)]
pub struct Hold {
    /// `ip:port`.
    pub to: String,
    /// Bytes written (and expected back) per round trip.
    pub payload: String,
    /// At most this many round trips.
    pub count: u64,
    /// Pause between round trips.
    pub interval_ms: u64,
    /// At most this long.
    pub duration_ms: u64,
    /// Per-step timeout (connect, name, each read).
    pub timeout_ms: u64,
}

impl Hold {
    /// One round trip of `payload` to `to`.
    pub fn once(to: &str, payload: &str) -> Hold {
        Hold {
            to: to.into(),
            payload: payload.into(),
            count: 1,
            interval_ms: 0,
            duration_ms: 5_000,
            timeout_ms: 2_000,
        }
    }

    /// A round trip every `interval_ms` for `duration_ms`.
    pub fn every(to: &str, interval_ms: u64, duration_ms: u64) -> Hold {
        Hold {
            to: to.into(),
            payload: "hold-ping".into(),
            count: 1_000_000,
            interval_ms,
            duration_ms,
            timeout_ms: 2_000,
        }
    }

    fn args(&self) -> Vec<String> {
        vec![
            "hold".into(),
            "--to".into(),
            self.to.clone(),
            "--payload".into(),
            self.payload.clone(),
            "--count".into(),
            self.count.to_string(),
            "--interval-ms".into(),
            self.interval_ms.to_string(),
            "--duration-ms".into(),
            self.duration_ms.to_string(),
            "--timeout-ms".into(),
            self.timeout_ms.to_string(),
        ]
    }

    /// The harness's bound for the run.
    pub fn bound(&self) -> Duration {
        Duration::from_millis(self.duration_ms + 3 * self.timeout_ms + 10_000)
    }

    /// Runs it in `pod` to completion.
    pub fn run(&self, pod: &Pod) -> Result<HoldReport> {
        let a = self.args();
        let args: Vec<&str> = a.iter().map(String::as_str).collect();
        pod.run_json(&args, self.bound())
    }

    /// Starts it in `pod`; collect with `proc.wait(hold.bound())?.json::<HoldReport>()`.
    pub fn spawn(&self, pod: &Pod) -> Result<Proc> {
        let a = self.args();
        let args: Vec<&str> = a.iter().map(String::as_str).collect();
        pod.testpod(&args)
    }
}

// ---------------------------------------------------------------------------------------------------------------
// TLS: client configs, a handshake probe, a minimal HBONE client, a fake tunnel server

/// A TLS 1.3 client config with ALPN h2 that presents `svid` and accepts a server certificate from `ca` whose
/// SPIFFE ID is `expect` (any ID of the trust domain if `None`).
pub fn tunnel_client_config(
    svid: &Svid,
    ca: &Ca,
    expect: Option<&str>,
) -> Result<Arc<rustls::ClientConfig>> {
    let expect = expect.map(SpiffeId::parse).transpose()?;
    let mut cfg = mesh_agent::identity::client_config(svid, ca, expect)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// A TLS 1.3 server config with ALPN h2 presenting `svid` and requiring a client certificate from `ca`.
pub fn tunnel_server_config(svid: &Svid, ca: &Ca) -> Result<Arc<rustls::ServerConfig>> {
    let mut cfg = mesh_agent::identity::server_config(svid, ca)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// What [`tls_probe`] saw.
#[derive(Debug, Clone)]
pub struct TlsProbe {
    /// The client's view of the handshake (in TLS 1.3 the server judges the client certificate after the client
    /// has finished, so a refused certificate usually shows in `first_read`).
    pub handshake: Result<(), String>,
    /// The negotiated ALPN protocol.
    pub alpn: Option<String>,
    /// After sending the HTTP/2 preface and SETTINGS: the first read (bytes, i.e. the server's SETTINGS), or the
    /// error (an alert, a reset, EOF).
    pub first_read: Result<usize, String>,
}

impl TlsProbe {
    /// The server took the certificate: the handshake completed and it answered with data.
    pub fn accepted(&self) -> bool {
        self.handshake.is_ok() && matches!(self.first_read, Ok(n) if n > 0)
    }
}

/// The HTTP/2 client preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// Connects and completes the TLS handshake (client side) within `deadline`.
fn tls_connect(
    to: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
    deadline: Instant,
) -> Result<TlsStream, String> {
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    let tcp = TcpStream::connect_timeout(&to, left()).map_err(|e| format!("connect {to}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    // Writes are small; the bound only keeps a stuck peer from hanging the test.
    tcp.set_write_timeout(Some(left()))
        .map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::IpAddress(to.ip().into());
    let conn = rustls::ClientConnection::new(cfg, name).map_err(|e| format!("tls client: {e}"))?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    // Each complete_io reads or writes at least once or fails; the read timeout bounds each read.
    for _ in 0..1000 {
        if !s.conn.is_handshaking() {
            return Ok(s);
        }
        if Instant::now() >= deadline {
            return Err("handshake: timed out".into());
        }
        s.sock
            .set_read_timeout(Some(left()))
            .map_err(|e| e.to_string())?;
        s.conn
            .complete_io(&mut s.sock)
            .map_err(|e| format!("handshake: {e}"))?;
    }
    Err("handshake: did not finish".into())
}

/// From a thread inside the namespace at `netns`: a TLS handshake with `to` using `cfg`, then the HTTP/2 preface
/// and an empty SETTINGS frame, then one read. Bounded by `timeout`.
pub fn tls_probe(
    netns: &Path,
    to: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
    timeout: Duration,
) -> Result<TlsProbe> {
    crate::capture::in_netns(netns, move || {
        let deadline = Instant::now() + timeout;
        let mut s = match tls_connect(to, cfg, deadline) {
            Ok(s) => s,
            Err(e) => {
                return TlsProbe {
                    handshake: Err(e),
                    alpn: None,
                    first_read: Err("no handshake".into()),
                };
            }
        };
        let alpn = s
            .conn
            .alpn_protocol()
            .map(|p| String::from_utf8_lossy(p).into_owned());
        let first_read = (|| -> io::Result<usize> {
            let mut hello = H2_PREFACE.to_vec();
            hello.extend_from_slice(&frame(FRAME_SETTINGS, 0, 0, &[]));
            s.write_all(&hello)?;
            s.flush()?;
            s.sock.set_read_timeout(Some(
                deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1)),
            ))?;
            let mut buf = [0u8; 4096];
            s.read(&mut buf)
        })()
        .map_err(|e| format!("{e}"));
        TlsProbe {
            handshake: Ok(()),
            alpn,
            first_read,
        }
    })
}

const FRAME_DATA: u8 = 0;
const FRAME_HEADERS: u8 = 1;
const FRAME_RST_STREAM: u8 = 3;
const FRAME_SETTINGS: u8 = 4;
const FRAME_PING: u8 = 6;
const FRAME_GOAWAY: u8 = 7;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_ACK: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;

/// One HTTP/2 frame.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK header block for `CONNECT <authority>`: literals without indexing, names from the static table, no
/// Huffman coding.
fn connect_headers(authority: &str) -> Vec<u8> {
    let mut b = Vec::new();
    for (index, value) in [(2u8, "CONNECT"), (1u8, authority)] {
        // 0000xxxx: literal without indexing, indexed name (:method = 2, :authority = 1).
        b.push(index);
        assert!(value.len() < 127, "short values only");
        b.push(value.len() as u8);
        b.extend_from_slice(value.as_bytes());
    }
    b
}

/// Decodes an HPACK integer with an `n`-bit prefix from `b[*i..]`.
fn hpack_int(b: &[u8], i: &mut usize, n: u8) -> Option<usize> {
    let max = (1usize << n) - 1;
    let mut v = usize::from(*b.get(*i)?) & max;
    *i += 1;
    if v < max {
        return Some(v);
    }
    let mut shift = 0;
    for _ in 0..4 {
        let byte = *b.get(*i)?;
        *i += 1;
        v += usize::from(byte & 0x7f) << shift;
        shift += 7;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// Decodes a Huffman-coded string of decimal digits (all a `:status` needs; RFC 7541 appendix B).
fn huffman_digits(b: &[u8]) -> Option<String> {
    let bits: Vec<u8> = b
        .iter()
        .flat_map(|byte| (0..8).rev().map(move |k| (byte >> k) & 1))
        .collect();
    let mut out = String::new();
    let mut i = 0;
    let take = |i: usize, n: usize| -> Option<u32> {
        bits.get(i..i + n)
            .map(|s| s.iter().fold(0u32, |a, &x| (a << 1) | u32::from(x)))
    };
    while i < bits.len() {
        // The rest is padding if it is all ones and shorter than 8 bits.
        if bits.len() - i < 8 && bits[i..].iter().all(|&x| x == 1) {
            break;
        }
        if let Some(c @ 0..=2) = take(i, 5) {
            out.push(char::from(b'0' + c as u8));
            i += 5;
            continue;
        }
        match take(i, 6) {
            Some(c @ 0b011001..=0b011111) => {
                out.push(char::from(b'3' + (c - 0b011001) as u8));
                i += 6;
            }
            _ => return None,
        }
    }
    Some(out)
}

/// The `:status` of a response header block (it is the first field an HTTP/2 server writes).
fn response_status(block: &[u8]) -> Result<u16, String> {
    const STATIC: [(usize, u16); 7] = [
        (8, 200),
        (9, 204),
        (10, 206),
        (11, 304),
        (12, 400),
        (13, 404),
        (14, 500),
    ];
    let hex = || block.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let first = *block.first().ok_or("empty header block")?;
    let mut i = 0;
    let name_index = if first & 0x80 != 0 {
        let idx = hpack_int(block, &mut i, 7).ok_or("bad index")?;
        return STATIC
            .iter()
            .find(|(n, _)| *n == idx)
            .map(|(_, s)| *s)
            .ok_or_else(|| format!("indexed field {idx} is no static :status ({})", hex()));
    } else if first & 0xc0 == 0x40 {
        hpack_int(block, &mut i, 6)
    } else if first & 0xe0 == 0x20 {
        return Err(format!("dynamic table size update first ({})", hex()));
    } else {
        hpack_int(block, &mut i, 4)
    }
    .ok_or("bad index")?;
    if !(8..=14).contains(&name_index) {
        return Err(format!("first field is not :status ({})", hex()));
    }
    let huffman = block.get(i).ok_or("truncated")? & 0x80 != 0;
    let len = hpack_int(block, &mut i, 7).ok_or("bad length")?;
    let raw = block.get(i..i + len).ok_or("truncated value")?;
    let text = if huffman {
        huffman_digits(raw).ok_or_else(|| format!("undecodable status ({})", hex()))?
    } else {
        String::from_utf8_lossy(raw).into_owned()
    };
    text.parse().map_err(|_| format!("status {text:?}"))
}

/// What [`hbone_connect`] saw.
#[derive(Debug, Clone, Default)]
pub struct HboneOutcome {
    /// TLS handshake error, if it failed.
    pub handshake_error: Option<String>,
    /// The response's `:status`.
    pub status: Option<u16>,
    /// The stream's response bytes (DATA), in order.
    pub received: Vec<u8>,
    /// RST_STREAM error code, if the stream was reset.
    pub reset: Option<u32>,
    /// GOAWAY error code, if the connection was closed.
    pub goaway: Option<u32>,
    /// The response ended the stream (END_STREAM).
    pub ended: bool,
    /// Anything else that went wrong (I/O error, undecodable status, timeout).
    pub error: Option<String>,
}

impl HboneOutcome {
    /// The received bytes as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.received).into_owned()
    }
}

/// From a thread inside the namespace at `netns`, like a node proxy: a TLS connection to the tunnel port `to` with
/// `cfg`, one `CONNECT <authority>` stream; after a 200 it sends `payload` and reads until `want_bytes` response
/// bytes have arrived, the stream ends, or `timeout` passes.
pub fn hbone_connect(
    netns: &Path,
    to: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
    authority: &str,
    payload: &[u8],
    want_bytes: usize,
    timeout: Duration,
) -> Result<HboneOutcome> {
    let authority = authority.to_string();
    let payload = payload.to_vec();
    crate::capture::in_netns(netns, move || {
        let deadline = Instant::now() + timeout;
        let mut out = HboneOutcome::default();
        let mut s = match tls_connect(to, cfg, deadline) {
            Ok(s) => s,
            Err(e) => {
                out.handshake_error = Some(e);
                return out;
            }
        };
        if let Err(e) = hbone_stream(&mut s, &authority, &payload, want_bytes, deadline, &mut out) {
            out.error = Some(e);
        }
        s.conn.send_close_notify();
        let _ = s.flush();
        out
    })
}

fn hbone_stream(
    s: &mut TlsStream,
    authority: &str,
    payload: &[u8],
    want_bytes: usize,
    deadline: Instant,
    out: &mut HboneOutcome,
) -> Result<(), String> {
    let io = |e: io::Error| e.to_string();
    let mut hello = H2_PREFACE.to_vec();
    hello.extend_from_slice(&frame(FRAME_SETTINGS, 0, 0, &[]));
    hello.extend_from_slice(&frame(
        FRAME_HEADERS,
        FLAG_END_HEADERS,
        1,
        &connect_headers(authority),
    ));
    s.write_all(&hello).map_err(io)?;
    s.flush().map_err(io)?;
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    let mut sent_payload = false;
    // Each iteration reads at least one byte or fails (the read timeout is the time left), so the loop is bounded by
    // the deadline; the count bound is belt and braces.
    for _ in 0..10_000 {
        // Handle every complete frame in the buffer.
        while buf.len() >= 9 {
            let len =
                (usize::from(buf[0]) << 16) | (usize::from(buf[1]) << 8) | usize::from(buf[2]);
            if buf.len() < 9 + len {
                break;
            }
            let (kind, flags) = (buf[3], buf[4]);
            let stream = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff;
            let body: Vec<u8> = buf[9..9 + len].to_vec();
            buf.drain(..9 + len);
            match (kind, stream) {
                (FRAME_SETTINGS, 0) if flags & FLAG_ACK == 0 => {
                    s.write_all(&frame(FRAME_SETTINGS, FLAG_ACK, 0, &[]))
                        .map_err(io)?;
                }
                (FRAME_PING, 0) if flags & FLAG_ACK == 0 => {
                    s.write_all(&frame(FRAME_PING, FLAG_ACK, 0, &body))
                        .map_err(io)?;
                }
                (FRAME_GOAWAY, 0) => {
                    out.goaway = body
                        .get(4..8)
                        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
                    return Ok(());
                }
                (FRAME_RST_STREAM, 1) => {
                    out.reset = body
                        .get(0..4)
                        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
                    return Ok(());
                }
                (FRAME_HEADERS, 1) => {
                    let mut b = &body[..];
                    let mut pad = 0;
                    if flags & FLAG_PADDED != 0 {
                        pad = usize::from(*b.first().ok_or("bad HEADERS")?);
                        b = &b[1..];
                    }
                    if flags & FLAG_PRIORITY != 0 {
                        b = b.get(5..).ok_or("bad HEADERS")?;
                    }
                    let b = b.get(..b.len().saturating_sub(pad)).unwrap_or(&[]);
                    if out.status.is_none() {
                        out.status = Some(response_status(b)?);
                    }
                    if flags & FLAG_END_STREAM != 0 {
                        out.ended = true;
                        return Ok(());
                    }
                    if out.status == Some(200) && !sent_payload && !payload.is_empty() {
                        s.write_all(&frame(FRAME_DATA, 0, 1, payload)).map_err(io)?;
                        sent_payload = true;
                    }
                }
                (FRAME_DATA, 1) => {
                    let mut b = &body[..];
                    if flags & FLAG_PADDED != 0 {
                        let pad = usize::from(*b.first().ok_or("bad DATA")?);
                        b = b.get(1..b.len().saturating_sub(pad)).unwrap_or(&[]);
                    }
                    out.received.extend_from_slice(b);
                    if flags & FLAG_END_STREAM != 0 {
                        out.ended = true;
                        return Ok(());
                    }
                    if out.received.len() >= want_bytes {
                        return Ok(());
                    }
                }
                _ => {}
            }
        }
        s.flush().map_err(io)?;
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "timed out (status {:?}, {} bytes received)",
                out.status,
                out.received.len()
            ));
        }
        s.sock.set_read_timeout(Some(left)).map_err(io)?;
        match s.read(&mut chunk) {
            Ok(0) => return Err("EOF".into()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    Err("too many reads".into())
}

/// What a [`FakeTunnel`] saw.
#[derive(Debug, Clone, Default)]
pub struct FakeTunnelReport {
    /// TCP connections accepted.
    pub accepted: u32,
    /// Handshakes that completed on the server side.
    pub handshakes_ok: u32,
    /// Handshake errors, as text.
    pub errors: Vec<String>,
}

/// A TLS server on `addr` inside a namespace, presenting whatever certificate its config has. Each connection gets
/// a handshake and is then closed.
pub struct FakeTunnel {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<FakeTunnelReport>>,
}

impl std::fmt::Debug for FakeTunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FakeTunnel")
    }
}

impl FakeTunnel {
    /// Binds `addr` in the namespace at `netns` (returns once it listens) and serves for at most `lifetime`.
    pub fn start(
        netns: &Path,
        addr: SocketAddr,
        cfg: Arc<rustls::ServerConfig>,
        lifetime: Duration,
    ) -> Result<FakeTunnel> {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let (tx, rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let handle = spawn_in_netns(netns, "fake-tunnel", move || {
            let mut report = FakeTunnelReport::default();
            let listener = match TcpListener::bind(addr).and_then(|l| {
                l.set_nonblocking(true)?;
                Ok(l)
            }) {
                Ok(l) => {
                    let _ = tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = tx.send(Err(format!("bind {addr}: {e}")));
                    return report;
                }
            };
            let deadline = Instant::now() + lifetime;
            while !stop2.load(Ordering::Relaxed) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((tcp, _)) => {
                        report.accepted += 1;
                        match fake_handshake(tcp, cfg.clone()) {
                            Ok(()) => report.handshakes_ok += 1,
                            Err(e) => report.errors.push(e),
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => {
                        report.errors.push(format!("accept: {e}"));
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
            report
        })?;
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => Ok(FakeTunnel {
                stop,
                handle: Some(handle),
            }),
            Ok(Err(e)) => {
                let _ = handle.join();
                Err(anyhow!(e))
            }
            Err(_) => {
                stop.store(true, Ordering::Relaxed);
                Err(anyhow!("fake tunnel on {addr} did not start"))
            }
        }
    }

    /// Stops it and returns what it saw.
    pub fn stop(mut self) -> FakeTunnelReport {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for FakeTunnel {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn fake_handshake(tcp: TcpStream, cfg: Arc<rustls::ServerConfig>) -> Result<(), String> {
    tcp.set_nonblocking(false).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    tcp.set_write_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    let conn = rustls::ServerConnection::new(cfg).map_err(|e| e.to_string())?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    for _ in 0..100 {
        if !s.conn.is_handshaking() {
            // Give the client a moment to judge our certificate and answer (its alert, or the h2 preface).
            let mut buf = [0u8; 64];
            return match s.read(&mut buf) {
                Ok(_) => Ok(()),
                Err(e) => Err(format!("after the handshake: {e}")),
            };
        }
        s.conn
            .complete_io(&mut s.sock)
            .map_err(|e| format!("handshake: {e}"))?;
    }
    Err("handshake did not finish".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_of_indexed_and_huffman_literals() {
        assert_eq!(response_status(&[0x88]), Ok(200));
        assert_eq!(response_status(&[0x8d]), Ok(404));
        // "403" Huffman-coded: 011010 00000 011001 + 1111111 padding = 68 0c ff.
        assert_eq!(response_status(&[0x48, 0x83, 0x68, 0x0c, 0xff]), Ok(403));
        assert_eq!(response_status(&[0x08, 0x03, b'5', b'0', b'3']), Ok(503));
        assert!(response_status(&[0x41, 0x01, b'x']).is_err());
    }

    #[test]
    fn huffman_digits_roundtrip_examples() {
        // "200" = 00010 00000 00000 + 1 padding bit = 00010000 00000001.
        assert_eq!(huffman_digits(&[0x10, 0x01]).as_deref(), Some("200"));
        // "405" = 011010 00000 011011 + 1111111 = 68 0d ff.
        assert_eq!(huffman_digits(&[0x68, 0x0d, 0xff]).as_deref(), Some("405"));
    }

    #[test]
    fn connect_header_block_is_literal() {
        let b = connect_headers("10.244.1.10:8080");
        assert_eq!(&b[..9], b"\x02\x07CONNECT");
        assert_eq!(b[9], 0x01);
        assert_eq!(usize::from(b[10]), "10.244.1.10:8080".len());
    }

    #[test]
    fn frames_have_the_9_byte_header() {
        let f = frame(FRAME_SETTINGS, FLAG_ACK, 0, &[]);
        assert_eq!(f, vec![0, 0, 0, 4, 1, 0, 0, 0, 0]);
        let f = frame(FRAME_DATA, 0, 1, b"ab");
        assert_eq!(f, vec![0, 0, 2, 0, 0, 0, 0, 0, 1, b'a', b'b']);
    }
}
