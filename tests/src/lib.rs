//! Sinew's privileged end-to-end harness: simulated nodes and pods in network namespaces, each node with its own
//! cgroup root, bpffs directory and `mesh-agent`.
//!
//! Used by the integration tests in `tests/tests/` and by `cargo xtask demo` / `cargo xtask bench`.
//!
//! How the pieces fit:
//! - [`require_privileged`] gates every privileged test (loud skip locally, panic under `CI`).
//! - [`Topology`] builds nodes ([`Node`]: netns + bridge + cgroup root + bpffs dir) and pods ([`Pod`]: netns + veth
//!   into the node bridge + child cgroup). Everything is an RAII guard ([`Netns`], [`Veth`], [`Cgroup`], [`Bpffs`],
//!   [`Proc`]) and is removed on drop, also when a test panics.
//! - [`Pod::command`] / [`Pod::spawn`] run a process inside a pod (cgroup first, then netns); [`Pod::serve`],
//!   [`Pod::tcp_connect`], [`Pod::udp_send`] and [`Pod::run_json`] drive the `sinew-testpod` tool, whose reports
//!   are in [`testpod`].
//! - [`SourceDir`] and the builders in [`manifest`] write the Kubernetes objects the agent's file source reads.
//! - [`Agent`] runs `mesh-agent run` for a node and reads `/readyz` and `/metrics` ([`Metrics`]); [`AgentCli`] runs
//!   `status`, `dump services` and `uninstall`.
//! - [`eventually`] is the only way to wait for a condition.
//! - [`scenario::LbFixture`] is the standard "client + N backends + Service + agent" setup.
//! - [`policy`] (issue 3): workloads with identities, `AuthorizationPolicy` objects, reference verdicts from
//!   `mesh_agent::policy::eval`, and probe matrices run from a pod's cgroup ([`Pod::probe`]: the client side
//!   enforces) or from its netns outside every cgroup ([`Pod::probe_unmanaged`]: only the destination enforces).
//! - [`mesh`] (issue 4): enrolled pods, one CA shared by the agents, `PeerAuthentication`, `/debug/certs`, raw TLS
//!   and HBONE clients; [`capture`]: packet capture on an interface of a namespace (no tcpdump needed).
//! - Issue 5: [`fake_api`] is an in-process API server (list, watch, bookmarks, 410, 403, status, leases) that
//!   kube-rs runs against unchanged; [`kube::KubeMirror`] makes it hold a manifest directory's objects and gives the
//!   node's pods kubelet-style cgroups with a sandbox process ([`kubepods`]), so an agent's kubernetes source sees
//!   the same objects as a file source would; [`chart`] checks the Helm chart statically.
//! - Issue 6: [`sockmap`] has the pieces of the same-node acceleration matrix (byte patterns, the reports of the
//!   `stream`, `accel-rr` and `accel-crr` pod tools, the agent's `sockmap` status, a node with acceleration on or
//!   off).
//!
//! ```no_run
//! use std::time::Duration;
//! use sinew_tests::{Topology, require_privileged};
//! if require_privileged("example") {
//!     let topo = Topology::builder("example").node("node-a", &["client", "server"]).build().unwrap();
//!     let server = topo.pod("server");
//!     let _srv = server.serve(8080, "server").unwrap();
//!     let report = topo.pod("client").tcp_connect(&format!("{}:8080", server.ip4), 5, 0, 1000).unwrap();
//!     assert_eq!(report.ok, 5);
//! }
//! ```
#![deny(missing_docs)]

pub mod agent;
pub mod capture;
pub mod chart;
pub mod fake_api;
pub mod guards;
pub mod kube;
pub mod kubepods;
pub mod manifest;
pub mod mesh;
pub mod policy;
pub mod privileged;
pub mod process;
pub mod scenario;
pub mod sockmap;
pub mod sys;
pub mod testpod;
pub mod topology;
pub mod util;

pub use agent::{
    Agent, AgentCli, AgentOptions, AgentStatus, DumpedService, Flow, Flows, Metrics, PolicyCheck,
    PolicyStatus, agent_bin, default_testpod_bin, free_port, http_get,
};
pub use guards::{Bpffs, Cgroup, Netns, Veth, ensure_bpffs_mounted};
pub use manifest::{EndpointSlice, PodManifest, Service, ServicePort, SourceDir};
pub use privileged::{require_privileged, sweep_stale};
pub use process::{Proc, ProcOutput};
pub use topology::{Node, Pod, Topology, TopologyBuilder};
pub use util::{eventually, unix_ms, workspace_root};

/// Adds every node of `nodes` to `b` with its pods, each pod in the namespace `name_ns` gives for it (its name
/// first): the mesh and policy fixtures lay out their nodes alike.
pub(crate) fn add_nodes<P>(
    mut b: TopologyBuilder,
    nodes: &[(&str, Vec<P>)],
    name_ns: impl Fn(&P) -> (&str, &str),
) -> TopologyBuilder {
    for (node, pods) in nodes {
        let names: Vec<&str> = pods.iter().map(|p| name_ns(p).0).collect();
        b = b.node(node, &names);
        for p in pods {
            let (name, ns) = name_ns(p);
            b = b.pod_namespace(name, ns);
        }
    }
    b
}

/// The `sinew-testpod` binary built for this test crate. Only usable from integration tests, benches and binaries
/// of this package (Cargo sets `CARGO_BIN_EXE_*` there); other crates use [`default_testpod_bin`].
#[macro_export]
macro_rules! testpod_bin {
    () => {
        ::std::path::Path::new(env!("CARGO_BIN_EXE_sinew-testpod"))
    };
}
