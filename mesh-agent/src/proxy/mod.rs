//! The node proxy's data plane (issue 4): one proxy per node carries the connections the kernel redirects to it,
//! through an HBONE-compatible mTLS tunnel (HTTP/2 `CONNECT` over TLS 1.3) to the destination node's proxy, or
//! straight to the workload when it is on this node.
//!
//! Data flow:
//! - `outbound`: the kernel redirects an enrolled pod's `connect()` to the outbound listener (15001) and records the
//!   original destination and the client's identity; the proxy reads that record through [`Environment::redirected`].
//!   A destination on this node is authorized and connected directly (no TLS); a remote one gets a `CONNECT` stream
//!   on a pooled tunnel connection ([`pool`]) presenting the source workload's SVID.
//! - `inbound`: the tunnel listener (15008) verifies the peer's SVID, serves HTTP/2, and for each `CONNECT`
//!   authorizes the authenticated identity and connects to the local workload.
//! - `tunnel`: the byte copy (TCP to HTTP/2 stream, TCP to TCP) with half-close, resets and flow control, and the
//!   HBONE header helpers.
//!
//! Everything cluster-specific (the kernel's redirect records, workload lookup, policy, certificates) comes in through
//! the [`Environment`] trait, so the proxy runs in-process over loopback in tests with a fake one. `docs/proxy.md` is
//! the operator's view (ports, headers, limits, metrics, access log).

mod inbound;
pub mod metrics;
mod outbound;
pub mod pool;
mod tunnel;

#[cfg(test)]
mod tests;

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, oneshot, watch};
use tokio::task::JoinHandle;

use crate::identity::SpiffeId;
use crate::policy::eval::Identity;

pub use metrics::ProxyMetrics;

/// The only application protocol of the tunnel.
const ALPN_H2: &[u8] = b"h2";

/// An enrolled workload (a pod), as the proxy labels and authorizes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    pub namespace: String,
    /// The pod name.
    pub name: String,
    /// The application name, for metrics (`app.kubernetes.io/name`, `app`, or the owner's name).
    pub workload: String,
    pub service_account: String,
    pub ip: IpAddr,
}

/// The kernel's record of a redirected connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redirected {
    /// Where the workload meant to connect (after service load balancing).
    pub original_dst: SocketAddr,
    /// The connecting workload, as the kernel identified it (from the socket's context, which the pod cannot forge).
    pub client: Workload,
}

/// Where a destination workload lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Destination {
    pub workload: Workload,
    /// The node proxy's tunnel address (hostIP:15008).
    pub tunnel: SocketAddr,
    /// True: on this node (no TLS; deliver directly).
    pub local: bool,
}

/// An authorization verdict. `reason` is for logs (which policy matched, or why none did).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authz {
    pub allowed: bool,
    pub reason: String,
}

/// What the proxy needs from the rest of the agent. Called on the proxy's thread, on the connection's path: keep the
/// methods quick (a map lookup), never blocking on I/O.
pub trait Environment: Send + Sync + 'static {
    /// The kernel's record of a connection accepted on the outbound listener, by the accepted socket's peer address.
    /// Consumes it (one use).
    fn redirected(&self, peer: SocketAddr) -> Option<Redirected>;
    /// The enrolled workload that owns `ip`, and its node. None: unknown or not enrolled.
    fn destination(&self, ip: IpAddr) -> Option<Destination>;
    /// AuthorizationPolicy for a connection arriving for local `dst` from `source` (authenticated identity) at
    /// `source_ip`.
    fn authorize(&self, source: &Identity, source_ip: IpAddr, dst: SocketAddr) -> Authz;
    /// TLS client config that presents `source`'s SVID and verifies the server is a node proxy. Called per new
    /// tunnel connection (so renewed certificates are picked up).
    fn client_tls(&self, source: &SpiffeId) -> Result<Arc<rustls::ClientConfig>, String>;
    /// TLS server config for the tunnel listener (client certs required and verified).
    fn server_tls(&self) -> Result<Arc<rustls::ServerConfig>, String>;
    fn trust_domain(&self) -> &str;
}

/// The proxy's settings. Tests use port 0 everywhere and read the bound addresses from the handle.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// Listeners for redirected connections (15001 on the link-local proxy address).
    pub outbound: Vec<SocketAddr>,
    /// The tunnel listener (15008), e.g. `0.0.0.0:15008`.
    pub inbound: SocketAddr,
    /// `bind()` source for connections to local workloads: the kernel trusts this address as "the node proxy"
    /// (STRICT ports accept only it). None: no bind, the kernel picks.
    pub local_source_v4: Option<Ipv4Addr>,
    pub local_source_v6: Option<Ipv6Addr>,
    /// App connections handled at once (outbound accepts plus inbound streams). Over it: refused and counted.
    pub max_connections: usize,
    /// The HTTP/2 `max_concurrent_streams` the tunnel listener advertises; the client pool also opens another tunnel
    /// connection once this many streams are open on each.
    pub max_streams_per_tunnel: u32,
    /// Bounds each of: the TCP connect to a workload or a peer proxy, a TLS handshake (both sides), and the wait for
    /// the peer proxy's answer to `CONNECT` (twice this: the peer connects within its own timeout first).
    pub connect_timeout: Duration,
    /// How long [`ProxyHandle::drain`] waits for open app connections before cutting them.
    pub drain_timeout: Duration,
}

impl Default for ProxyConfig {
    /// The production ports on the link-local proxy address and all addresses; no local source bind.
    fn default() -> Self {
        ProxyConfig {
            outbound: vec![SocketAddr::new(Ipv4Addr::new(169, 254, 7, 1).into(), 15001)],
            inbound: SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 15008),
            local_source_v4: None,
            local_source_v6: None,
            max_connections: 10_000,
            max_streams_per_tunnel: 100,
            connect_timeout: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(20),
        }
    }
}

/// The node proxy's constructors: [`Proxy::start`] on the caller's runtime, or [`Proxy::spawn_thread`] on its own
/// thread.
pub struct Proxy;

/// A running proxy on the caller's runtime. Dropping it stops accepting (open connections carry on);
/// [`ProxyHandle::drain`] also waits for them.
pub struct ProxyHandle {
    shared: Arc<Shared>,
    accept_loops: Vec<JoinHandle<()>>,
}

/// A proxy running on its own OS thread ("sinew-proxy") with a current-thread runtime, so that it never shares a
/// thread with the agent's blocking map syscalls. Dropping it requests a drain without waiting.
pub struct ProxyThread {
    shared: Arc<Shared>,
    drain: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<usize>>,
}

/// The proxy's life cycle, watched by every accept loop, tunnel connection and app connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    Running,
    /// Listeners closed, GOAWAY sent on tunnel connections; open app connections carry on.
    Draining,
    /// The drain timed out: every app connection aborts now.
    Cut,
}

/// State shared by every task of one proxy.
pub(crate) struct Shared {
    pub(crate) cfg: ProxyConfig,
    pub(crate) env: Arc<dyn Environment>,
    pub(crate) metrics: ProxyMetrics,
    pub(crate) pool: pool::Pool,
    /// The bound listener addresses (for loop detection, and for the handle).
    pub(crate) outbound_addrs: Vec<SocketAddr>,
    pub(crate) inbound_addr: SocketAddr,
    limit: Arc<Semaphore>,
    active: AtomicUsize,
    /// Notified when `active` drops to zero (drain waits on it).
    idle: Notify,
    pub(crate) phase: watch::Sender<Phase>,
}

/// One app connection's place under `max_connections`: counted in `active` while alive.
pub(crate) struct Slot {
    shared: Arc<Shared>,
    _permit: OwnedSemaphorePermit,
}

impl Proxy {
    /// Binds the listeners (errors name the address) and starts accepting on the current tokio runtime. Must be
    /// called from inside a runtime.
    pub fn start(
        cfg: ProxyConfig,
        env: Arc<dyn Environment>,
        metrics: ProxyMetrics,
    ) -> io::Result<ProxyHandle> {
        let mut outbound = Vec::with_capacity(cfg.outbound.len());
        for addr in &cfg.outbound {
            outbound.push(bind(*addr)?);
        }
        let inbound = bind(cfg.inbound)?;
        let outbound_addrs = outbound
            .iter()
            .map(|l| l.local_addr())
            .collect::<io::Result<Vec<_>>>()?;
        let inbound_addr = inbound.local_addr()?;
        let (phase, _) = watch::channel(Phase::Running);
        let shared = Arc::new(Shared {
            limit: Arc::new(Semaphore::new(cfg.max_connections)),
            cfg,
            env,
            metrics,
            pool: pool::Pool::default(),
            outbound_addrs,
            inbound_addr,
            active: AtomicUsize::new(0),
            idle: Notify::new(),
            phase,
        });
        let mut accept_loops = Vec::new();
        for listener in outbound {
            accept_loops.push(tokio::spawn(outbound::accept_loop(
                shared.clone(),
                listener,
            )));
        }
        accept_loops.push(tokio::spawn(inbound::accept_loop(shared.clone(), inbound)));
        tracing::info!(
            outbound = ?shared.outbound_addrs,
            inbound = %shared.inbound_addr,
            max_connections = shared.cfg.max_connections,
            max_streams_per_tunnel = shared.cfg.max_streams_per_tunnel,
            "node proxy listening"
        );
        Ok(ProxyHandle {
            shared,
            accept_loops,
        })
    }

    /// Runs the proxy on a new OS thread named "sinew-proxy" with its own current-thread runtime. Returns once the
    /// listeners are bound (or failed to bind).
    pub fn spawn_thread(
        cfg: ProxyConfig,
        env: Arc<dyn Environment>,
        metrics: ProxyMetrics,
    ) -> io::Result<ProxyThread> {
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (drain_tx, drain_rx) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("sinew-proxy".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = started_tx.send(Err(e));
                        return 0;
                    }
                };
                rt.block_on(async move {
                    let handle = match Proxy::start(cfg, env, metrics) {
                        Ok(h) => h,
                        Err(e) => {
                            let _ = started_tx.send(Err(e));
                            return 0;
                        }
                    };
                    let _ = started_tx.send(Ok(handle.shared.clone()));
                    // A dropped sender (the ProxyThread dropped) also means drain.
                    let _ = drain_rx.await;
                    handle.drain().await
                })
            })?;
        match started_rx.recv() {
            Ok(Ok(shared)) => Ok(ProxyThread {
                shared,
                drain: Some(drain_tx),
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(io::Error::other("the proxy thread exited before starting"))
            }
        }
    }
}

/// Binds a listener with a deep backlog (bursts of new connections are normal for a node proxy).
fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let named = |e: io::Error| io::Error::new(e.kind(), format!("bind {addr}: {e}"));
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(named)?;
    socket.set_reuseaddr(true).map_err(named)?;
    // During a rolling update the new agent's proxy listens next to the old one's until the old one drains,
    // so the node always has a listener (both run as root, which SO_REUSEPORT requires of a group).
    socket.set_reuseport(true).map_err(named)?;
    socket.bind(addr).map_err(named)?;
    socket.listen(1024).map_err(named)
}

/// The accessors [`ProxyHandle`] and [`ProxyThread`] share: both read the proxy's [`Shared`] state.
macro_rules! shared_accessors {
    () => {
        /// The bound outbound listener addresses, in the order configured.
        pub fn outbound_addrs(&self) -> &[SocketAddr] {
            &self.shared.outbound_addrs
        }

        /// The bound tunnel listener address.
        pub fn inbound_addr(&self) -> SocketAddr {
            self.shared.inbound_addr
        }

        /// App connections open right now (outbound connections plus inbound streams).
        pub fn active(&self) -> usize {
            self.shared.active()
        }
    };
}

impl ProxyHandle {
    shared_accessors!();

    /// Stops accepting (closes the listeners), sends GOAWAY on tunnel connections, waits up to `drain_timeout` for
    /// open app connections to finish, then aborts the rest. Returns how many were cut.
    pub async fn drain(mut self) -> usize {
        let shared = self.shared.clone();
        shared.phase.send_replace(Phase::Draining);
        // The accept loops return on the phase change; once joined, their listeners are closed.
        for task in std::mem::take(&mut self.accept_loops) {
            let _ = task.await;
        }
        tracing::info!(active = shared.active(), "node proxy draining");
        let deadline = tokio::time::Instant::now() + shared.cfg.drain_timeout;
        let cut = if shared.wait_idle(deadline).await {
            0
        } else {
            let cut = shared.active();
            shared.phase.send_replace(Phase::Cut);
            // Cut connections reset their sockets and streams and return at once; bound the wait anyway.
            let _ = shared
                .wait_idle(tokio::time::Instant::now() + Duration::from_secs(1))
                .await;
            cut
        };
        // Idle pooled tunnels close once their handles are gone.
        shared.pool.clear();
        tracing::info!(cut, "node proxy drained");
        cut
    }
}

impl Drop for ProxyHandle {
    fn drop(&mut self) {
        for task in &self.accept_loops {
            task.abort();
        }
    }
}

impl ProxyThread {
    shared_accessors!();

    /// Starts the drain ([`ProxyHandle::drain`]) without waiting for it.
    pub fn request_drain(&mut self) {
        if let Some(tx) = self.drain.take() {
            let _ = tx.send(());
        }
    }

    /// Requests the drain if not done yet and blocks until the thread exits. Returns how many connections were cut,
    /// or an error if the proxy thread panicked. Blocking: call it from a plain thread or `spawn_blocking`.
    pub fn join(mut self) -> io::Result<usize> {
        self.request_drain();
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(cut)) => Ok(cut),
            Some(Err(_)) => Err(io::Error::other("the proxy thread panicked")),
            None => Ok(0),
        }
    }
}

impl Drop for ProxyThread {
    fn drop(&mut self) {
        self.request_drain();
    }
}

impl Shared {
    fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// A slot for one app connection, or None over `max_connections`. (Still granted while draining: a stream the
    /// peer opened before it saw our GOAWAY is served.)
    pub(crate) fn slot(self: &Arc<Self>) -> Option<Slot> {
        let permit = self.limit.clone().try_acquire_owned().ok()?;
        self.active.fetch_add(1, Ordering::Relaxed);
        self.metrics.active_connections().inc();
        Some(Slot {
            shared: self.clone(),
            _permit: permit,
        })
    }

    /// Waits until no app connection is open, or `deadline`. True if idle.
    async fn wait_idle(&self, deadline: tokio::time::Instant) -> bool {
        loop {
            // Registered before the check, so a drop to zero in between is not missed.
            let notified = self.idle.notified();
            if self.active() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.active() == 0;
            }
        }
    }

    /// Whether `dst` is one of this proxy's own listeners: a workload connecting to it through a redirect would loop.
    pub(crate) fn is_own_listener(&self, dst: SocketAddr) -> bool {
        let local_ip = |ip: IpAddr| {
            ip.is_loopback()
                || ip.is_unspecified()
                || self
                    .outbound_addrs
                    .iter()
                    .chain(std::iter::once(&self.inbound_addr))
                    .any(|l| l.ip() == ip)
                || Some(ip) == self.cfg.local_source_v4.map(IpAddr::V4)
                || Some(ip) == self.cfg.local_source_v6.map(IpAddr::V6)
        };
        self.outbound_addrs.contains(&dst)
            || dst == self.inbound_addr
            || (dst.port() == self.inbound_addr.port() && local_ip(dst.ip()))
            || self
                .outbound_addrs
                .iter()
                .any(|l| l.port() == dst.port() && l.ip().is_unspecified() && local_ip(dst.ip()))
    }

    /// Connects to a workload on this node, from `local_source_v4`/`_v6` when set (the address STRICT ports
    /// accept), within `connect_timeout`.
    pub(crate) async fn connect_local(&self, dst: SocketAddr) -> io::Result<TcpStream> {
        let (socket, source) = match dst {
            SocketAddr::V4(_) => (
                TcpSocket::new_v4()?,
                self.cfg.local_source_v4.map(IpAddr::V4),
            ),
            SocketAddr::V6(_) => (
                TcpSocket::new_v6()?,
                self.cfg.local_source_v6.map(IpAddr::V6),
            ),
        };
        if let Some(ip) = source {
            // The port is chosen at connect(), per destination: see `bind_address_no_port`.
            crate::sys::bind_address_no_port(&socket)?;
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        socket.set_nodelay(true)?;
        match tokio::time::timeout(self.cfg.connect_timeout, socket.connect(dst)).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect timed out after {:?}", self.cfg.connect_timeout),
            )),
        }
    }

    /// Resolves when the proxy enters `Cut`.
    pub(crate) fn cut(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.phase.subscribe();
        async move {
            let _ = rx.wait_for(|p| *p == Phase::Cut).await;
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.shared.metrics.active_connections().dec();
        if self.shared.active.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.shared.idle.notify_waiters();
        }
    }
}

/// The SPIFFE ID of a workload's service account, as a policy [`Identity`].
pub(crate) fn identity_of(id: &SpiffeId) -> Identity {
    Identity::new(id.trust_domain(), id.namespace(), id.service_account())
}

/// Resolves once the proxy leaves `Running` (drain started). (The guard `wait_for` returns is not `Send`; it is
/// dropped here rather than held in a caller's `select!`.)
pub(crate) async fn leaving(phase: &mut watch::Receiver<Phase>) {
    let _ = phase.wait_for(|p| *p != Phase::Running).await;
}

/// The metrics reason for a failed TLS handshake: the verifier's [`Rejection`](crate::identity::Rejection) reason
/// when it refused the peer's certificate, otherwise "handshake" (a protocol error, an alert from the peer, a
/// timeout, a connection closed mid-handshake).
pub(crate) fn tls_reason(err: &io::Error) -> &'static str {
    err.get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
        .and_then(crate::identity::rejection_of)
        .map_or("handshake", |r| r.reason())
}

/// The tunnel speaks HTTP/2 only: make sure ALPN says so, whatever config the environment built.
pub(crate) fn with_h2_alpn_client(cfg: Arc<rustls::ClientConfig>) -> Arc<rustls::ClientConfig> {
    if cfg.alpn_protocols == [ALPN_H2] {
        return cfg;
    }
    let mut cfg = (*cfg).clone();
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    Arc::new(cfg)
}

/// As [`with_h2_alpn_client`], for the tunnel listener.
pub(crate) fn with_h2_alpn_server(cfg: Arc<rustls::ServerConfig>) -> Arc<rustls::ServerConfig> {
    if cfg.alpn_protocols == [ALPN_H2] {
        return cfg;
    }
    let mut cfg = (*cfg).clone();
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    Arc::new(cfg)
}
