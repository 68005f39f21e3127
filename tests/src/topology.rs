//! Simulated nodes and pods built from network namespaces, veth pairs, a bridge and cgroups.
//!
//! ```text
//!             node netns "<id>-<node>"  (ip_forward=1)
//!   ┌─────────────────────────────────────────────────────┐
//!   │ br0 10.244.<i>.1/24 [fd00:244:<i>::1/64]             │ ul0 172.30.0.<i+1>/24 ── underlay bridge
//!   │   ├ veth0 ── eth0 10.244.<i>.10  pod netns "<id>-<p>" │    (only with two or more nodes; routes to the
//!   │   └ veth1 ── eth0 10.244.<i>.11  ...                 │     other nodes' pod subnets go through it)
//!   └─────────────────────────────────────────────────────┘
//!   cgroup /sys/fs/cgroup/unified/<id>-<node>/pod-<p>   (the node's cgroup root is the agent's --cgroup-root)
//!   bpffs  /sys/fs/bpf/<id>-<node>/sinew                (the agent's --bpffs-root)
//! ```
//!
//! Every test builds its own topology. Addresses repeat between topologies on purpose: each lives in its own
//! namespaces and the agents' programs only see their own cgroup subtree, so parallel tests cannot collide. Nothing
//! is created in, attached to or routed through the root network namespace or the host's cgroup root.
//!
//! [`Pod`] is a cheap handle (names, addresses, paths); the kernel objects are owned by the [`Topology`] and
//! removed when it drops: processes are killed through the cgroups first, then pins are uninstalled, then cgroups,
//! pods and nodes are deleted.

use std::ffi::OsStr;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde::de::DeserializeOwned;

use crate::guards::{Bpffs, Cgroup, Netns, Veth};
use crate::manifest::SourceDir;
use crate::process::{Proc, ProcOutput};
use crate::testpod::{
    ConnectReport, CrrReport, FloodReport, ProbeReport, RrReport, ServeReady, UdpReport,
};
use crate::util::unique_id;

/// How long links may take to become operationally up (the kernel batches these updates about once a second).
const LINK_UP_TIMEOUT: Duration = Duration::from_secs(5);

/// Kubernetes namespace given to pods unless changed.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Builds a [`Topology`]. Nodes and their initial pods are declared up front; pods can be added later with
/// [`Topology::add_pod`].
#[derive(Debug, Clone)]
pub struct TopologyBuilder {
    name: String,
    testpod: Option<PathBuf>,
    ipv6: bool,
    nodes: Vec<(String, Vec<String>)>,
    namespaces: std::collections::BTreeMap<String, String>,
}

impl TopologyBuilder {
    /// Puts pod `pod` in Kubernetes namespace `namespace` (its [`Pod::namespace`]; default
    /// [`DEFAULT_NAMESPACE`]).
    pub fn pod_namespace(mut self, pod: &str, namespace: &str) -> Self {
        self.namespaces
            .insert(pod.to_string(), namespace.to_string());
        self
    }

    /// Adds a node with the given pods (pod names are unique across the whole topology).
    pub fn node(mut self, name: &str, pods: &[&str]) -> Self {
        self.nodes.push((
            name.to_string(),
            pods.iter().map(|p| p.to_string()).collect(),
        ));
        self
    }

    /// Also gives bridges and pods IPv6 addresses (`fd00:244:<node>::/64`). Off by default.
    pub fn ipv6(mut self, on: bool) -> Self {
        self.ipv6 = on;
        self
    }

    /// The `sinew-testpod` binary pods run. Integration tests pass `testpod_bin!()`; defaults to
    /// [`crate::default_testpod_bin`].
    pub fn testpod_bin(mut self, path: impl Into<PathBuf>) -> Self {
        self.testpod = Some(path.into());
        self
    }

    /// Creates every namespace, link, address, route, cgroup and bpffs directory.
    pub fn build(self) -> Result<Topology> {
        let testpod = self.testpod.unwrap_or_else(crate::default_testpod_bin);
        if !testpod.exists() {
            bail!(
                "test pod binary {} not found (build it with `cargo build -p sinew-tests --bin sinew-testpod` \
                 or set SINEW_TESTPOD_BIN)",
                testpod.display()
            );
        }
        if self.nodes.is_empty() {
            bail!("a topology needs at least one node");
        }
        let mut seen = std::collections::HashSet::new();
        for n in self
            .nodes
            .iter()
            .flat_map(|(n, pods)| std::iter::once(n).chain(pods))
        {
            check_name(n)?;
            if !seen.insert(n.clone()) {
                bail!("name {n:?} used twice (node and pod names share one namespace)");
            }
        }
        if self.nodes.len() > 200 {
            bail!("too many nodes");
        }
        let id = unique_id();
        let work_dir = std::env::temp_dir()
            .join("sinew-tests")
            .join(format!("{id}-{}", self.name));
        std::fs::create_dir_all(&work_dir)
            .with_context(|| format!("mkdir {}", work_dir.display()))?;
        let mut topo = Topology {
            id: id.clone(),
            name: self.name.clone(),
            work_dir: work_dir.clone(),
            testpod: testpod.clone(),
            ipv6: self.ipv6,
            nodes: Vec::new(),
            underlay: None,
            underlay_veths: Vec::new(),
        };
        for (i, (name, _)) in self.nodes.iter().enumerate() {
            let multi = self.nodes.len() > 1;
            let node = Node::new(&id, i, name, self.ipv6, multi, &work_dir, &testpod)
                .with_context(|| format!("creating node {name}"))?;
            topo.nodes.push(node);
        }
        if topo.nodes.len() > 1 {
            topo.connect_nodes().context("creating the underlay")?;
        }
        for (name, pods) in &self.nodes {
            for p in pods {
                let ns = self
                    .namespaces
                    .get(p)
                    .map_or(DEFAULT_NAMESPACE, String::as_str);
                topo.create_pod(name, p, ns)?;
            }
        }
        // Wait once for all links instead of once per pod: the kernel marks them up in batches.
        topo.wait_links_up()?;
        Ok(topo)
    }
}

fn check_name(n: &str) -> Result<()> {
    let ok = !n.is_empty()
        && n.len() <= 20
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !n.starts_with('-');
    if !ok {
        bail!(
            "name {n:?}: use 1-20 of [a-z0-9-] (it is part of netns, cgroup and Kubernetes names)"
        );
    }
    Ok(())
}

/// A set of simulated nodes and pods, removed on drop.
#[derive(Debug)]
pub struct Topology {
    id: String,
    name: String,
    work_dir: PathBuf,
    testpod: PathBuf,
    ipv6: bool,
    nodes: Vec<Node>,
    underlay: Option<Netns>,
    underlay_veths: Vec<Veth>,
}

impl Topology {
    /// Starts describing a topology. `name` (usually the test's name) only labels the work directory.
    pub fn builder(name: &str) -> TopologyBuilder {
        TopologyBuilder {
            name: name.to_string(),
            testpod: None,
            ipv6: false,
            nodes: Vec::new(),
            namespaces: Default::default(),
        }
    }

    /// The unique id `snw<pid>-<n>` that prefixes every kernel object name of this topology.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// A per-topology scratch directory (logs, manifests). Removed on drop unless the thread is panicking, so a
    /// failed test's logs stay for inspection.
    pub fn work_dir(&self) -> &Path {
        &self.work_dir
    }

    /// The manifest directory shared by all nodes' agents (`<work_dir>/manifests`), like one API server.
    pub fn source_dir(&self) -> Result<SourceDir> {
        SourceDir::new(self.work_dir.join("manifests"))
    }

    /// The `sinew-testpod` binary its pods run.
    pub fn testpod_bin(&self) -> &Path {
        &self.testpod
    }

    /// All nodes, in declaration order.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The node named `name`. Panics if there is none.
    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("topology {}: no node {name:?}", self.name))
    }

    /// The pod named `name` on any node. Panics if there is none.
    pub fn pod(&self, name: &str) -> Pod {
        self.nodes
            .iter()
            .find_map(|n| n.pod(name))
            .unwrap_or_else(|| panic!("topology {}: no pod {name:?}", self.name))
    }

    /// Creates a pod on `node` and returns its handle once its links are up.
    pub fn add_pod(&self, node: &str, name: &str) -> Result<Pod> {
        self.add_pod_in(node, name, DEFAULT_NAMESPACE)
    }

    /// Like [`Topology::add_pod`], in Kubernetes namespace `namespace`.
    pub fn add_pod_in(&self, node: &str, name: &str, namespace: &str) -> Result<Pod> {
        let pod = self.create_pod(node, name, namespace)?;
        self.wait_links_up()?;
        Ok(pod)
    }

    /// Waits until every veth of every namespace in the topology is operationally up.
    fn wait_links_up(&self) -> Result<()> {
        for n in &self.nodes {
            n.netns().wait_veths_up(LINK_UP_TIMEOUT)?;
            for p in n.pods() {
                n.pod_netns_wait(&p)?;
            }
        }
        if let Some(ul) = &self.underlay {
            ul.wait_veths_up(LINK_UP_TIMEOUT)?;
        }
        Ok(())
    }

    fn create_pod(&self, node: &str, name: &str, namespace: &str) -> Result<Pod> {
        check_name(name)?;
        if self
            .nodes
            .iter()
            .any(|n| n.name == name || n.pod(name).is_some())
        {
            bail!("pod name {name:?} already used");
        }
        self.node(node)
            .add_pod(name, namespace)
            .with_context(|| format!("creating pod {name} on {node}"))
    }

    /// Joins the nodes through an underlay bridge and routes each node's pod subnet via its node address.
    fn connect_nodes(&mut self) -> Result<()> {
        let ul = Netns::new(&format!("{}-ul", self.id))?;
        add_bridge(&ul)?;
        ul.ip(&["link", "set", "br0", "up"])?;
        self.underlay = Some(ul);
        let ul = self.underlay.as_ref().expect("just set");
        for node in &self.nodes {
            let ns = node.netns();
            let peer = format!("n{}", node.index);
            let v = Veth::new(ns, "ul0", ul, &peer)?;
            self.underlay_veths.push(v);
            ul.ip(&["link", "set", &peer, "master", "br0", "up"])?;
            ns.ip(&[
                "addr",
                "add",
                &format!("{}/24", node.node_ip4),
                "dev",
                "ul0",
            ])?;
            if self.ipv6 {
                ns.ip(&[
                    "-6",
                    "addr",
                    "add",
                    &format!("{}/64", node.underlay_ip6()),
                    "dev",
                    "ul0",
                    "nodad",
                ])?;
            }
            ns.ip(&["link", "set", "ul0", "up"])?;
        }
        for node in &self.nodes {
            for other in self.nodes.iter().filter(|o| o.index != node.index) {
                let via = other.node_ip4.to_string();
                node.netns()
                    .ip(&["route", "add", &other.pod_cidr4(), "via", &via])?;
                if self.ipv6 {
                    let via6 = other.underlay_ip6().to_string();
                    node.netns()
                        .ip(&["-6", "route", "add", &other.pod_cidr6(), "via", &via6])?;
                }
            }
        }
        Ok(())
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Nodes first (they kill their processes and uninstall), then the underlay they were plugged into.
        self.nodes.clear();
        self.underlay_veths.clear();
        self.underlay = None;
        if std::thread::panicking() {
            eprintln!(
                "sinew-tests: test failed; logs kept in {}",
                self.work_dir.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.work_dir);
        }
    }
}

struct PodGuards {
    // Field order is drop order: the veth before the namespace holding its peer.
    _veth: Veth,
    _netns: Netns,
}

impl std::fmt::Debug for PodGuards {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PodGuards")
    }
}

#[derive(Debug, Default)]
struct NodePods {
    pods: Vec<Pod>,
    guards: Vec<PodGuards>,
}

/// One simulated node: a network namespace with a bridge for its pods, a cgroup root and a bpffs directory.
#[derive(Debug)]
pub struct Node {
    id: String,
    name: String,
    index: usize,
    multi: bool,
    ipv6: bool,
    node_ip4: Ipv4Addr,
    work_dir: PathBuf,
    testpod: PathBuf,
    pods: Mutex<NodePods>,
    // Taken apart in a fixed order in Drop; `Option` only so that Drop can move them out.
    bpffs: Option<Bpffs>,
    cgroup: Option<Cgroup>,
    /// A sibling of the node's cgroup root (`<id>-<node>-out`), NOT below it: processes there are in a pod's
    /// netns but outside every program the agent attaches ([`Pod::command_unmanaged`]).
    outside: Option<Cgroup>,
    netns: Option<Netns>,
}

impl Node {
    fn new(
        id: &str,
        index: usize,
        name: &str,
        ipv6: bool,
        multi: bool,
        work_dir: &Path,
        testpod: &Path,
    ) -> Result<Node> {
        let netns = Netns::new(&format!("{id}-{name}"))?;
        let cgroup = Cgroup::new(&format!("{id}-{name}"))?;
        let outside = Cgroup::new(&format!("{id}-{name}-out"))?;
        // Processes of the node itself (not of a pod), outside the node's cgroup root: see `Node::command_unmanaged`.
        outside.child("node")?;
        let bpffs = Bpffs::new(&format!("{id}-{name}"), Some(cgroup.path()))?;
        let node = Node {
            id: id.to_string(),
            name: name.to_string(),
            index,
            multi,
            ipv6,
            node_ip4: Ipv4Addr::new(172, 30, 0, index as u8 + 1),
            work_dir: work_dir.join(name),
            testpod: testpod.to_path_buf(),
            pods: Mutex::new(NodePods::default()),
            bpffs: Some(bpffs),
            cgroup: Some(cgroup),
            outside: Some(outside),
            netns: Some(netns),
        };
        std::fs::create_dir_all(&node.work_dir)?;
        let ns = node.netns();
        if ipv6 {
            no_dad(ns)?;
        }
        add_bridge(ns)?;
        ns.ip(&[
            "addr",
            "add",
            &format!("{}/24", node.bridge_ip4()),
            "dev",
            "br0",
        ])?;
        if ipv6 {
            // nodad: duplicate address detection would keep the address unusable for a second or two.
            ns.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{}/64", node.bridge_ip6()),
                "dev",
                "br0",
                "nodad",
            ])?;
        }
        ns.ip(&["link", "set", "br0", "up"])?;
        // New namespaces start with forwarding off here (kernel notes); the node routes between pods and nodes.
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        if ipv6 {
            ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        }
        Ok(node)
    }

    fn add_pod(&self, name: &str, namespace: &str) -> Result<Pod> {
        let mut pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
        let k = pods.pods.len();
        if k >= 240 {
            bail!("node {}: at most 240 pods", self.name);
        }
        let netns = Netns::new(&format!("{}-{name}", self.id))?;
        if self.ipv6 {
            // Before eth0 is created in it, so eth0 inherits the default.
            no_dad(&netns)?;
        }
        let host_if = format!("veth{k}");
        let veth = Veth::new(self.netns(), &host_if, &netns, "eth0")?;
        let guards = PodGuards {
            _veth: veth,
            _netns: netns,
        };
        let ns = &guards._netns;
        self.netns()
            .ip(&["link", "set", &host_if, "master", "br0", "up"])?;
        let ip4 = Ipv4Addr::new(10, 244, self.index as u8, 10 + k as u8);
        ns.ip(&["addr", "add", &format!("{ip4}/24"), "dev", "eth0"])?;
        let ip6 = if self.ipv6 {
            let a: Ipv6Addr = format!("fd00:244:{}::{}", self.index, 10 + k).parse()?;
            ns.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{a}/64"),
                "dev",
                "eth0",
                "nodad",
            ])?;
            Some(a)
        } else {
            None
        };
        ns.ip(&["link", "set", "eth0", "up"])?;
        ns.ip(&[
            "route",
            "add",
            "default",
            "via",
            &self.bridge_ip4().to_string(),
        ])?;
        if self.ipv6 {
            ns.ip(&[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &self.bridge_ip6().to_string(),
            ])?;
        }
        let cgroup = self.cgroup().child(&format!("pod-{name}"))?;
        let outside_cgroup = self
            .outside
            .as_ref()
            .expect("node alive")
            .child(&format!("pod-{name}"))?;
        let pod = Pod {
            name: name.to_string(),
            namespace: namespace.to_string(),
            node: self.name.clone(),
            ip4,
            ip6,
            host_ip: self.host_ip(),
            netns_name: ns.name().to_string(),
            cgroup,
            outside_cgroup,
            testpod: self.testpod.clone(),
            log_dir: self.work_dir.join("pods"),
        };
        pods.guards.push(guards);
        pods.pods.push(pod.clone());
        Ok(pod)
    }

    fn pod_netns_wait(&self, pod: &Pod) -> Result<()> {
        let pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
        match pods
            .guards
            .iter()
            .find(|g| g._netns.name() == pod.netns_name)
        {
            Some(g) => g._netns.wait_veths_up(LINK_UP_TIMEOUT),
            None => Ok(()),
        }
    }

    /// The node's name (the agent's `--node`, the pods' `spec.nodeName`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The node's network namespace.
    pub fn netns(&self) -> &Netns {
        self.netns.as_ref().expect("node alive")
    }

    /// A command that runs `program` in the node's network namespace (a host process: kubelet probes,
    /// host-network pods), outside the node's cgroup root (in the harness's sibling cgroup).
    pub fn command_unmanaged(&self, program: impl AsRef<OsStr>) -> Result<Command> {
        let mut cmd = Command::new(program);
        let cg = self
            .outside
            .as_ref()
            .expect("node alive")
            .path()
            .join("node")
            .join("cgroup.procs");
        crate::sys::enter_pod(&mut cmd, &cg, &self.netns().path())?;
        Ok(cmd)
    }

    /// `sinew-testpod probe` from the node's network namespace ([`Node::command_unmanaged`]).
    pub fn probe_unmanaged(&self, targets: &[String], timeout_ms: u64) -> Result<ProbeReport> {
        let mut cmd = self.command_unmanaged(&self.testpod)?;
        let list = targets.join(",");
        cmd.args([
            "probe",
            "--targets",
            &list,
            "--timeout-ms",
            &timeout_ms.to_string(),
        ]);
        let label = format!(
            "node-{}-probe-{}",
            self.name,
            PROC_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let bound = Duration::from_millis(
            targets.len().div_ceil(128).max(1) as u64 * (timeout_ms + 500) + 10_000,
        );
        let out = Proc::spawn(&label, cmd, &self.work_dir.join("pods"))?.wait(bound)?;
        out.json()
            .with_context(|| format!("node {}: sinew-testpod probe", self.name))
    }

    /// The node's cgroup root (the agent's `--cgroup-root`); pods are its children `pod-<name>`.
    pub fn cgroup_root(&self) -> &Path {
        self.cgroup().path()
    }

    fn cgroup(&self) -> &Cgroup {
        self.cgroup.as_ref().expect("node alive")
    }

    /// The bpffs directory guard (`/sys/fs/bpf/<id>-<node>`).
    pub fn bpffs(&self) -> &Bpffs {
        self.bpffs.as_ref().expect("node alive")
    }

    /// The agent's `--bpffs-root`: `/sys/fs/bpf/<id>-<node>/sinew`.
    pub fn bpffs_root(&self) -> PathBuf {
        self.bpffs().agent_root()
    }

    /// This node's scratch directory (agent log, pod logs).
    pub fn work_dir(&self) -> &Path {
        &self.work_dir
    }

    /// The bridge (pods' gateway) address `10.244.<i>.1`.
    pub fn bridge_ip4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, self.index as u8, 1)
    }

    /// The bridge's IPv6 address `fd00:244:<i>::1` (only configured with IPv6 on).
    pub fn bridge_ip6(&self) -> Ipv6Addr {
        format!("fd00:244:{}::1", self.index)
            .parse()
            .expect("valid literal")
    }

    fn underlay_ip6(&self) -> Ipv6Addr {
        format!("fd00:30::{}", self.index + 1)
            .parse()
            .expect("valid literal")
    }

    /// The pod subnet, `10.244.<i>.0/24`.
    pub fn pod_cidr4(&self) -> String {
        format!("10.244.{}.0/24", self.index)
    }

    /// The IPv6 pod subnet, `fd00:244:<i>::/64`.
    pub fn pod_cidr6(&self) -> String {
        format!("fd00:244:{}::/64", self.index)
    }

    /// The node's address as pods' `status.hostIP`: its underlay address `172.30.0.<i+1>` when there are several
    /// nodes, else the bridge address.
    pub fn host_ip(&self) -> Ipv4Addr {
        if self.multi {
            self.node_ip4
        } else {
            self.bridge_ip4()
        }
    }

    /// Handles of this node's pods.
    pub fn pods(&self) -> Vec<Pod> {
        self.pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pods
            .clone()
    }

    /// The pod named `name` on this node.
    pub fn pod(&self, name: &str) -> Option<Pod> {
        self.pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pods
            .iter()
            .find(|p| p.name == name)
            .cloned()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // 1. No process may outlive the test, and none may hold a pod netns open.
        for cg in [&self.cgroup, &self.outside].into_iter().flatten() {
            if let Err(e) = cg.kill_all() {
                eprintln!("sinew-tests: cleanup: {e:#}");
            }
        }
        // 2. Uninstall while the cgroup root still exists (uninstall detaches from it), then remove the pins.
        self.bpffs = None;
        // 3. Cgroups, then pods (veth + netns), then the node namespace.
        self.cgroup = None;
        self.outside = None;
        self.pods
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .guards
            .clear();
        self.netns = None;
    }
}

/// Turns off IPv6 duplicate address detection for interfaces created later in `ns`.
///
/// `nodad` on our addresses is not enough: a router sends the neighbour solicitation for a *forwarded* packet from
/// its link-local address, and while that is still tentative (DAD takes a second or two) no solicitation goes out at
/// all, so the first connections across nodes would time out.
fn no_dad(ns: &Netns) -> Result<()> {
    ns.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
    ns.sysctl("net.ipv6.conf.default.accept_dad", "0")
}

/// A handle to a pod: where it is and how to run processes in it. Cheap to clone; the namespace and cgroup belong
/// to the [`Topology`].
#[derive(Debug, Clone)]
pub struct Pod {
    /// Pod name (also the Kubernetes `metadata.name`).
    pub name: String,
    /// Kubernetes namespace used in manifests.
    pub namespace: String,
    /// The node it runs on.
    pub node: String,
    /// Its IPv4 address (`status.podIP`).
    pub ip4: Ipv4Addr,
    /// Its IPv6 address, if the topology has IPv6.
    pub ip6: Option<Ipv6Addr>,
    /// Its node's address (`status.hostIP`).
    pub host_ip: Ipv4Addr,
    netns_name: String,
    cgroup: PathBuf,
    outside_cgroup: PathBuf,
    testpod: PathBuf,
    log_dir: PathBuf,
}

/// Numbers process names so every process of a test has its own stderr log.
static PROC_SEQ: AtomicU32 = AtomicU32::new(0);

impl Pod {
    /// `/var/run/netns/<netns>`: the `sinew.dev/netns` annotation value.
    pub fn netns_path(&self) -> PathBuf {
        Path::new(crate::guards::NETNS_DIR).join(&self.netns_name)
    }

    /// The namespace name as `ip netns` knows it.
    pub fn netns_name(&self) -> &str {
        &self.netns_name
    }

    /// The pod's cgroup directory (a child of its node's cgroup root).
    pub fn cgroup_dir(&self) -> &Path {
        &self.cgroup
    }

    /// A command that runs `program` inside the pod: its child first joins the pod's cgroup, then its network
    /// namespace (see [`crate::sys::enter_pod`] for why in that order).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Result<Command> {
        self.command_in(&self.cgroup, program)
    }

    /// `program` in the pod's network namespace, in `cgroup`.
    fn command_in(&self, cgroup: &Path, program: impl AsRef<OsStr>) -> Result<Command> {
        let mut cmd = Command::new(program);
        crate::sys::enter_pod(&mut cmd, &cgroup.join("cgroup.procs"), &self.netns_path())?;
        Ok(cmd)
    }

    /// A command that runs `program` in the pod's network namespace but OUTSIDE its node's cgroup root (in a
    /// sibling cgroup the harness owns and cleans up). The agent's programs do not see its sockets: its `connect()`
    /// is not checked, so what it meets is the destination side's enforcement only. Its address is still the
    /// pod's, so a destination judges it by the pod's identity.
    pub fn command_unmanaged(&self, program: impl AsRef<OsStr>) -> Result<Command> {
        self.command_in(&self.outside_cgroup, program)
    }

    /// The cgroup [`Pod::command_unmanaged`] puts processes in (not below the node's cgroup root).
    pub fn unmanaged_cgroup_dir(&self) -> &Path {
        &self.outside_cgroup
    }

    /// Spawns `program args` in the pod as a guarded process.
    pub fn spawn(&self, program: impl AsRef<OsStr>, args: &[&str]) -> Result<Proc> {
        self.spawn_in(program, args, true)
    }

    /// Spawns `program args` in the pod's netns outside its cgroup ([`Pod::command_unmanaged`]).
    pub fn spawn_unmanaged(&self, program: impl AsRef<OsStr>, args: &[&str]) -> Result<Proc> {
        self.spawn_in(program, args, false)
    }

    fn spawn_in(&self, program: impl AsRef<OsStr>, args: &[&str], managed: bool) -> Result<Proc> {
        let mut cmd = if managed {
            self.command(program)?
        } else {
            self.command_unmanaged(program)?
        };
        cmd.args(args);
        let label = format!(
            "{}{}-{}-{}",
            self.name,
            if managed { "" } else { "-unmanaged" },
            args.first().copied().unwrap_or("proc"),
            PROC_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        Proc::spawn(&label, cmd, &self.log_dir)
    }

    /// Spawns `sinew-testpod <args>` in the pod.
    pub fn testpod(&self, args: &[&str]) -> Result<Proc> {
        self.spawn(&self.testpod, args)
    }

    /// Runs `sinew-testpod <args>` to completion (at most `timeout`) and parses its JSON result line.
    pub fn run_json<T: DeserializeOwned>(&self, args: &[&str], timeout: Duration) -> Result<T> {
        let out: ProcOutput = self.testpod(args)?.wait(timeout)?;
        out.json()
            .with_context(|| format!("pod {}: sinew-testpod {}", self.name, args.join(" ")))
    }

    /// [`Pod::run_json`] in the pod's netns but outside its cgroup ([`Pod::command_unmanaged`]).
    pub fn run_json_unmanaged<T: DeserializeOwned>(
        &self,
        args: &[&str],
        timeout: Duration,
    ) -> Result<T> {
        let out: ProcOutput = self.spawn_unmanaged(&self.testpod, args)?.wait(timeout)?;
        out.json().with_context(|| {
            format!(
                "pod {} (unmanaged): sinew-testpod {}",
                self.name,
                args.join(" ")
            )
        })
    }

    /// Starts `sinew-testpod serve --ports <ports> --name <name>` (TCP and UDP on each port) and waits until it
    /// listens on all of them.
    pub fn serve_ports(&self, ports: &[u16], name: &str) -> Result<Proc> {
        let list = ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let mut p = self.testpod(&["serve", "--ports", &list, "--name", name])?;
        let line = p
            .wait_for_line(Duration::from_secs(5), |l| l.contains("\"listening\""))
            .with_context(|| format!("pod {}: server did not start", self.name))?;
        let ready: ServeReady = serde_json::from_str(&line).map_err(|e| anyhow!("{line}: {e}"))?;
        if ready.ports != ports {
            bail!(
                "server reports ports {:?} instead of {ports:?}",
                ready.ports
            );
        }
        Ok(p)
    }

    /// Probes every target once, concurrently (`sinew-testpod probe`): `targets` are `tcp:IP:PORT` /
    /// `udp:IP:PORT`, each bounded by `timeout_ms`. Runs in the pod (under its cgroup: the client-side path).
    pub fn probe(&self, targets: &[String], timeout_ms: u64) -> Result<ProbeReport> {
        self.probe_in(targets, timeout_ms, true)
    }

    /// [`Pod::probe`] from the pod's netns but outside its cgroup: only the destination side enforces.
    pub fn probe_unmanaged(&self, targets: &[String], timeout_ms: u64) -> Result<ProbeReport> {
        self.probe_in(targets, timeout_ms, false)
    }

    fn probe_in(&self, targets: &[String], timeout_ms: u64, managed: bool) -> Result<ProbeReport> {
        let list = targets.join(",");
        let t = timeout_ms.to_string();
        let args = [
            "probe",
            "--targets",
            list.as_str(),
            "--timeout-ms",
            t.as_str(),
        ];
        // Waves of 128 concurrent probes, each at most the timeout, plus process start-up.
        let waves = targets.len().div_ceil(128).max(1) as u64;
        let bound = Duration::from_millis(waves * (timeout_ms + 500) + 10_000);
        let r: ProbeReport = if managed {
            self.run_json(&args, bound)?
        } else {
            self.run_json_unmanaged(&args, bound)?
        };
        if r.results.len() != targets.len() {
            bail!(
                "probe returned {} results for {} targets",
                r.results.len(),
                targets.len()
            );
        }
        Ok(r)
    }

    /// Starts `sinew-testpod probe-loop` in the background: the targets probed round after round (each round
    /// concurrently, `interval_ms` apart) until `duration_ms` has passed or `stop_file` exists. `managed`: from the
    /// pod's cgroup (else outside it). Collect the [`crate::testpod::ProbeLoopReport`] with
    /// `proc.wait(..)?.json()`.
    pub fn spawn_probe_loop(
        &self,
        targets: &[String],
        timeout_ms: u64,
        interval_ms: u64,
        duration_ms: u64,
        stop_file: &Path,
        managed: bool,
    ) -> Result<Proc> {
        let list = targets.join(",");
        let (t, i, d) = (
            timeout_ms.to_string(),
            interval_ms.to_string(),
            duration_ms.to_string(),
        );
        let stop = stop_file.display().to_string();
        let args = [
            "probe-loop",
            "--targets",
            list.as_str(),
            "--timeout-ms",
            t.as_str(),
            "--interval-ms",
            i.as_str(),
            "--duration-ms",
            d.as_str(),
            "--stop-file",
            stop.as_str(),
        ];
        self.spawn_in(&self.testpod, &args, managed)
    }

    /// Fires up to `count` UDP datagrams at `to` for at most `duration_ms`, without waiting for replies
    /// (`sinew-testpod udp-flood`). `managed`: from the pod's cgroup (else outside it).
    pub fn udp_flood(
        &self,
        to: &str,
        count: u64,
        duration_ms: u64,
        managed: bool,
    ) -> Result<FloodReport> {
        let c = count.to_string();
        let d = duration_ms.to_string();
        let args = [
            "udp-flood",
            "--to",
            to,
            "--count",
            c.as_str(),
            "--duration-ms",
            d.as_str(),
        ];
        let bound = Duration::from_millis(duration_ms + 10_000);
        if managed {
            self.run_json(&args, bound)
        } else {
            self.run_json_unmanaged(&args, bound)
        }
    }

    /// Starts `sinew-testpod serve --port <port> --name <name>` (TCP and UDP) and waits until it listens.
    pub fn serve(&self, port: u16, name: &str) -> Result<Proc> {
        let mut p = self.testpod(&["serve", "--port", &port.to_string(), "--name", name])?;
        let line = p
            .wait_for_line(Duration::from_secs(5), |l| l.contains("\"listening\""))
            .with_context(|| format!("pod {}: server did not start", self.name))?;
        let ready: ServeReady = serde_json::from_str(&line).map_err(|e| anyhow!("{line}: {e}"))?;
        if ready.port != port {
            bail!("server reports port {} instead of {port}", ready.port);
        }
        Ok(p)
    }

    /// `count` sequential TCP connections to `to` (`ip:port` or `[v6]:port`), each reading the server's name.
    pub fn tcp_connect(
        &self,
        to: &str,
        count: u32,
        interval_ms: u64,
        timeout_ms: u64,
    ) -> Result<ConnectReport> {
        let bound = client_bound(count, interval_ms, timeout_ms);
        self.run_json(
            &[
                "tcp-connect",
                "--to",
                to,
                "--count",
                &count.to_string(),
                "--interval-ms",
                &interval_ms.to_string(),
                "--timeout-ms",
                &timeout_ms.to_string(),
            ],
            bound,
        )
    }

    /// `count` datagrams from one unconnected UDP socket to `to` (sendto + recvfrom).
    pub fn udp_send(
        &self,
        to: &str,
        count: u32,
        timeout_ms: u64,
        new_socket_each: bool,
    ) -> Result<UdpReport> {
        let bound = client_bound(count, 0, timeout_ms);
        let count_s = count.to_string();
        let timeout_s = timeout_ms.to_string();
        let mut args = vec![
            "udp-send",
            "--to",
            to,
            "--count",
            &count_s,
            "--timeout-ms",
            &timeout_s,
        ];
        if new_socket_each {
            args.push("--new-socket-each");
        }
        self.run_json(&args, bound)
    }
}

impl Pod {
    /// Request/response over one connection to `to`: `size`-byte requests echoed back, for at most `duration_ms`
    /// or `max_requests` requests (latency percentiles in microseconds).
    pub fn rr(
        &self,
        to: &str,
        size: usize,
        duration_ms: u64,
        max_requests: u64,
    ) -> Result<RrReport> {
        let bound = Duration::from_millis(duration_ms + 15_000);
        self.run_json(
            &[
                "rr",
                "--to",
                to,
                "--size",
                &size.to_string(),
                "--duration-ms",
                &duration_ms.to_string(),
                "--max-requests",
                &max_requests.to_string(),
            ],
            bound,
        )
    }

    /// A new connection per `size`-byte request/response to `to`, for at most `duration_ms` or `max` cycles
    /// (connections per second and cycle latency).
    pub fn crr(&self, to: &str, size: usize, duration_ms: u64, max: u64) -> Result<CrrReport> {
        let bound = Duration::from_millis(duration_ms + 15_000);
        self.run_json(
            &[
                "crr",
                "--to",
                to,
                "--size",
                &size.to_string(),
                "--duration-ms",
                &duration_ms.to_string(),
                "--max",
                &max.to_string(),
            ],
            bound,
        )
    }
}

/// How long a client run may take before the harness gives up on it: the client's own bounds plus slack.
pub fn client_bound(count: u32, interval_ms: u64, timeout_ms: u64) -> Duration {
    Duration::from_millis(count as u64 * (interval_ms + 2 * timeout_ms) + 10_000)
}

/// Adds the bridge `br0` to a namespace. Multicast snooping is off so IPv6 neighbour discovery reaches every port
/// at once (with snooping on, a new port may miss solicitations until it has joined the group).
fn add_bridge(ns: &Netns) -> Result<()> {
    ns.ip(&[
        "link",
        "add",
        "br0",
        "type",
        "bridge",
        "mcast_snooping",
        "0",
    ])
}
