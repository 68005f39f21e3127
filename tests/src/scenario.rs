//! Ready-made scenarios shared by the tests, `cargo xtask demo` and `cargo xtask bench`.
//!
//! [`LbFixture`]: one node, a `client` pod and N backend pods (`b1`..`bN`) each running
//! `sinew-testpod serve --port 8080 --name bK`, a Service `default/web` with ClusterIP [`VIP`] (TCP 80 and UDP 53,
//! both to 8080), and a running, ready agent.
//!
//! Manifest files: `service-web.yaml`, `pod-<name>.yaml` per pod (so adding or removing a backend is adding or
//! removing one file), and `endpointslice-web.yaml` in the EndpointSlice variant.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::agent::Agent;
use crate::manifest::{EndpointSlice, PodManifest, Service, ServicePort, SourceDir};
use crate::process::Proc;
use crate::testpod::ConnectReport;
use crate::topology::{Pod, Topology};

/// The Service's ClusterIP.
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The Service's TCP port.
pub const TCP_PORT: u16 = 80;
/// The Service's UDP port.
pub const UDP_PORT: u16 = 53;
/// The port every backend serves (TCP and UDP).
pub const TARGET_PORT: u16 = 8080;
/// The Service's name (namespace `default`).
pub const SERVICE: &str = "web";
/// The node's name.
pub const NODE: &str = "node-a";

/// What [`LbFixture::setup`] builds.
#[derive(Debug, Clone)]
pub struct LbOptions {
    /// Backends in the Service from the start (`b1`..).
    pub backends: usize,
    /// Extra backend pods that serve but are not in any manifest yet (named after the others).
    pub spare: usize,
    /// Use a selector-less Service plus an explicit EndpointSlice instead of the selector.
    pub endpoint_slice: bool,
    /// Give pods IPv6 addresses too.
    pub ipv6: bool,
    /// More manifest files (name, objects) to write before the agent starts, so they are in its first sync.
    pub extra_files: Vec<(String, Vec<serde_json::Value>)>,
}

impl Default for LbOptions {
    fn default() -> Self {
        LbOptions {
            backends: 3,
            spare: 0,
            endpoint_slice: false,
            ipv6: false,
            extra_files: Vec::new(),
        }
    }
}

/// A load-balancing scenario with a running agent. Fields drop in order: agent, servers, topology.
#[derive(Debug)]
pub struct LbFixture {
    /// The node's agent (ready when `setup` returns).
    pub agent: Agent,
    /// The backend servers, in the order of `backends`.
    pub servers: Vec<Proc>,
    /// The manifest directory.
    pub source: SourceDir,
    /// The client pod.
    pub client: Pod,
    /// Every backend pod, the ones in the Service first, then the spares.
    pub backends: Vec<Pod>,
    /// Whether the Service uses an explicit EndpointSlice.
    pub endpoint_slice: bool,
    /// The topology (dropped last).
    pub topo: Topology,
}

impl LbFixture {
    /// Builds the topology, starts the backends, writes the manifests and starts the agent (waiting for
    /// `/readyz`, at most 20 s).
    pub fn setup(name: &str, testpod_bin: &Path, opts: &LbOptions) -> Result<LbFixture> {
        let total = opts.backends + opts.spare;
        let names: Vec<String> = (1..=total).map(|i| format!("b{i}")).collect();
        let mut pods: Vec<&str> = vec!["client"];
        pods.extend(names.iter().map(String::as_str));
        let topo = Topology::builder(name)
            .testpod_bin(testpod_bin)
            .ipv6(opts.ipv6)
            .node(NODE, &pods)
            .build()?;
        let backends: Vec<Pod> = names.iter().map(|n| topo.pod(n)).collect();
        let servers = backends
            .iter()
            .map(|p| p.serve(TARGET_PORT, &p.name))
            .collect::<Result<Vec<_>>>()
            .context("starting backend servers")?;
        let source = topo.source_dir()?;
        let client = topo.pod("client");
        source.write(
            "pod-client.yaml",
            &[PodManifest::new(&client).label("app", "client").to_value()],
        )?;
        let in_service = &backends[..opts.backends];
        for p in in_service {
            write_backend(&source, p, true)?;
        }
        source.write(
            "service-web.yaml",
            &[service(!opts.endpoint_slice).to_value()],
        )?;
        if opts.endpoint_slice {
            let refs: Vec<&Pod> = in_service.iter().collect();
            source.write(
                "endpointslice-web.yaml",
                &[endpoint_slice(&refs).to_value()],
            )?;
        }
        for (file, objects) in &opts.extra_files {
            source.write(file, objects)?;
        }
        let mut agent = Agent::start(topo.node(NODE), source.path(), None)?;
        agent.wait_ready(Duration::from_secs(20))?;
        Ok(LbFixture {
            agent,
            servers,
            source,
            client,
            backends,
            endpoint_slice: opts.endpoint_slice,
            topo,
        })
    }

    /// `10.96.0.10:80`.
    pub fn vip_tcp(&self) -> String {
        format!("{VIP}:{TCP_PORT}")
    }

    /// `10.96.0.10:53`.
    pub fn vip_udp(&self) -> String {
        format!("{VIP}:{UDP_PORT}")
    }

    /// The backend pod named `name`.
    pub fn backend(&self, name: &str) -> &Pod {
        self.backends
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no backend {name}"))
    }

    /// Writes (or rewrites) `pod-<name>.yaml` for a backend.
    pub fn write_backend(&self, pod: &Pod, ready: bool) -> Result<()> {
        write_backend(&self.source, pod, ready)
    }

    /// Removes `pod-<name>.yaml`.
    pub fn remove_backend(&self, pod: &Pod) -> Result<()> {
        self.source.remove(&format!("pod-{}.yaml", pod.name))
    }

    /// Rewrites `endpointslice-web.yaml` with exactly these ready endpoints.
    pub fn write_endpoint_slice(&self, pods: &[&Pod]) -> Result<()> {
        self.source
            .write("endpointslice-web.yaml", &[endpoint_slice(pods).to_value()])
            .map(drop)
    }

    /// `count` TCP connects from the client pod to `to`.
    pub fn connect(
        &self,
        to: &str,
        count: u32,
        interval_ms: u64,
        timeout_ms: u64,
    ) -> Result<ConnectReport> {
        self.client.tcp_connect(to, count, interval_ms, timeout_ms)
    }
}

/// The scenario's Service (with or without the `app=web` selector).
pub fn service(with_selector: bool) -> Service {
    let s = Service::new(SERVICE, &VIP.to_string())
        .port(ServicePort::tcp(
            "http",
            TCP_PORT.into(),
            TARGET_PORT.into(),
        ))
        .port(ServicePort::udp("dns", UDP_PORT.into(), TARGET_PORT.into()));
    if with_selector {
        s.selector("app", "web")
    } else {
        s
    }
}

/// An EndpointSlice for the scenario's Service with these pods as ready endpoints.
pub fn endpoint_slice(pods: &[&Pod]) -> EndpointSlice {
    let mut es = EndpointSlice::new(SERVICE, "manual")
        .port("http", TARGET_PORT.into(), "TCP")
        .port("dns", TARGET_PORT.into(), "UDP");
    for p in pods {
        es = es.endpoint(IpAddr::V4(p.ip4), true);
    }
    es
}

fn write_backend(source: &SourceDir, pod: &Pod, ready: bool) -> Result<()> {
    let m = PodManifest::new(pod)
        .label("app", "web")
        .ready(ready)
        .container_port(TARGET_PORT);
    source
        .write(&format!("pod-{}.yaml", pod.name), &[m.to_value()])
        .map(drop)
}
