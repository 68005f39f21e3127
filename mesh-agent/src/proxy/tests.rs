//! In-process loopback tests: two proxies ("node A" and "node B") on 127.0.0.1 with OS-assigned ports, a fake
//! [`Environment`] per node backed by maps, a real CA and SVIDs, and echo/sink servers. Workload IPs are loopback
//! addresses (127.0.0.1 the backend, 127.0.0.2 the client, 127.0.0.3 a same-node server): Linux answers on all of
//! 127/8. Every test is bounded in time.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::registry::Registry;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;

use super::*;
use crate::identity::svid::{SvidOptions, issue};
use crate::identity::testing::crafted;
use crate::identity::{Ca, Svid, client_config, server_config};

const TD: &str = "cluster.local";
/// Bound on any single wait in a test.
const T: Duration = Duration::from_secs(10);

/// The CA and the node proxies' identity, shared by the nodes of one test.
struct Cluster {
    ca: Arc<Ca>,
    proxy_id: SpiffeId,
    proxy_svid: Svid,
}

impl Cluster {
    fn new() -> Self {
        let ca = Arc::new(Ca::generate(TD).unwrap());
        let proxy_id = SpiffeId::new(TD, "sinew-system", "sinew-proxy").unwrap();
        let proxy_svid = issue(&ca, &proxy_id, short()).unwrap();
        Cluster {
            ca,
            proxy_id,
            proxy_svid,
        }
    }

    /// A node's environment whose tunnel listener presents the node proxy SVID.
    fn env(&self) -> Arc<FakeEnv> {
        self.env_presenting(&self.proxy_svid)
    }

    /// A node's environment whose tunnel listener presents `svid` (an impostor, in one test).
    fn env_presenting(&self, svid: &Svid) -> Arc<FakeEnv> {
        let mut server = server_config(svid, &self.ca).unwrap();
        server.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(FakeEnv {
            ca: self.ca.clone(),
            proxy_id: self.proxy_id.clone(),
            server: Arc::new(server),
            redirects: Mutex::default(),
            destinations: Mutex::default(),
            deny: Mutex::new(false),
            authz_calls: Mutex::default(),
            clients: Mutex::default(),
        })
    }
}

fn short() -> SvidOptions {
    SvidOptions {
        lifetime: Duration::from_secs(3600),
        ..SvidOptions::default()
    }
}

/// The fake environment: the kernel's redirect records, workloads and their nodes, and a deny-all switch.
struct FakeEnv {
    ca: Arc<Ca>,
    proxy_id: SpiffeId,
    server: Arc<rustls::ServerConfig>,
    redirects: Mutex<HashMap<SocketAddr, Redirected>>,
    destinations: Mutex<HashMap<IpAddr, Destination>>,
    deny: Mutex<bool>,
    authz_calls: Mutex<Vec<(Identity, IpAddr, SocketAddr)>>,
    /// One client config per source identity, issued on first use.
    clients: Mutex<HashMap<SpiffeId, Arc<rustls::ClientConfig>>>,
}

impl Environment for FakeEnv {
    fn redirected(&self, peer: SocketAddr) -> Option<Redirected> {
        self.redirects.lock().unwrap().remove(&peer)
    }

    fn destination(&self, ip: IpAddr) -> Option<Destination> {
        self.destinations.lock().unwrap().get(&ip).cloned()
    }

    fn authorize(&self, source: &Identity, source_ip: IpAddr, dst: SocketAddr) -> Authz {
        self.authz_calls
            .lock()
            .unwrap()
            .push((source.clone(), source_ip, dst));
        let deny = *self.deny.lock().unwrap();
        Authz {
            allowed: !deny,
            reason: if deny { "deny-all" } else { "allow-all" }.into(),
        }
    }

    fn client_tls(&self, source: &SpiffeId) -> Result<Arc<rustls::ClientConfig>, String> {
        let mut clients = self.clients.lock().unwrap();
        if let Some(c) = clients.get(source) {
            return Ok(c.clone());
        }
        let svid = issue(&self.ca, source, short()).map_err(|e| e.to_string())?;
        let mut cfg = client_config(&svid, &self.ca, Some(self.proxy_id.clone()))
            .map_err(|e| e.to_string())?;
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        let cfg = Arc::new(cfg);
        clients.insert(source.clone(), cfg.clone());
        Ok(cfg)
    }

    fn server_tls(&self) -> Result<Arc<rustls::ServerConfig>, String> {
        Ok(self.server.clone())
    }

    fn trust_domain(&self) -> &str {
        TD
    }
}

impl FakeEnv {
    fn place(&self, workload: &Workload, tunnel: SocketAddr, local: bool) {
        self.destinations.lock().unwrap().insert(
            workload.ip,
            Destination {
                workload: workload.clone(),
                tunnel,
                local,
            },
        );
    }

    fn set_deny(&self, deny: bool) {
        *self.deny.lock().unwrap() = deny;
    }
}

fn workload(app: &str, ns: &str, sa: &str, ip: &str) -> Workload {
    Workload {
        namespace: ns.into(),
        name: format!("{app}-7d9f8-x2x4q"),
        workload: app.into(),
        service_account: sa.into(),
        ip: ip.parse().unwrap(),
    }
}

fn frontend() -> Workload {
    workload("frontend", "shop", "frontend", "127.0.0.2")
}

fn backend() -> Workload {
    workload("backend", "shop", "backend", "127.0.0.1")
}

/// One proxy with its environment and metrics registry. `handle` may be moved out (to drain).
struct Node {
    env: Arc<FakeEnv>,
    handle: ProxyHandle,
    registry: Registry,
    outbound: SocketAddr,
    inbound: SocketAddr,
}

fn test_config() -> ProxyConfig {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    ProxyConfig {
        outbound: vec![any],
        inbound: any,
        local_source_v4: None,
        local_source_v6: None,
        max_connections: 100,
        max_streams_per_tunnel: 100,
        connect_timeout: Duration::from_secs(2),
        drain_timeout: Duration::from_secs(5),
    }
}

fn start(env: Arc<FakeEnv>, tweak: impl FnOnce(&mut ProxyConfig)) -> Node {
    let mut cfg = test_config();
    tweak(&mut cfg);
    let metrics = ProxyMetrics::new();
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let handle = Proxy::start(cfg, env.clone(), metrics).unwrap();
    Node {
        outbound: handle.outbound_addrs()[0],
        inbound: handle.inbound_addr(),
        env,
        handle,
        registry,
    }
}

/// Node A (the client's) and node B (the backend's), with the backend on B.
fn pair(
    cluster: &Cluster,
    tweak_a: impl FnOnce(&mut ProxyConfig),
    tweak_b: impl FnOnce(&mut ProxyConfig),
) -> (Node, Node) {
    let a = start(cluster.env(), tweak_a);
    let b = start(cluster.env(), tweak_b);
    a.env.place(&backend(), b.inbound, false);
    b.env.place(&backend(), b.inbound, true);
    a.env.place(&frontend(), a.inbound, true);
    b.env.place(&frontend(), a.inbound, false);
    (a, b)
}

/// A cluster and its two nodes, both with the test configuration.
fn default_pair() -> (Cluster, Node, Node) {
    let cluster = Cluster::new();
    let (a, b) = pair(&cluster, |_| {}, |_| {});
    (cluster, a, b)
}

/// Waits until neither node has an app connection open.
async fn both_closed(what: &str, a: &Node, b: &Node) {
    eventually(what, || a.handle.active() == 0 && b.handle.active() == 0).await;
}

fn text(registry: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry).unwrap();
    out
}

/// The sum of the series of `name` whose labels include all of `labels`.
fn metric(registry: &Registry, name: &str, labels: &[(&str, &str)]) -> u64 {
    text(registry)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, lbl) = series.split_once('{').unwrap_or((series, ""));
            (n == name
                && labels
                    .iter()
                    .all(|(k, v)| lbl.contains(&format!("{k}=\"{v}\""))))
            .then(|| value.parse::<f64>().unwrap() as u64)
        })
        .sum()
}

fn refused(node: &Node, reason: &str) -> u64 {
    metric(
        &node.registry,
        "sinew_proxy_refused_total",
        &[("reason", reason)],
    )
}

fn handshakes(node: &Node) -> u64 {
    metric(&node.registry, "sinew_proxy_tunnel_handshakes_total", &[])
}

/// Polls `f` until it holds, for at most `T`.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + T;
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Log lines written while a [`capture_logs`] guard is alive on this thread (every task of a current-thread test
/// runtime runs on it).
use crate::testing::LogCapture as Capture;

impl Capture {
    /// The access log records so far, as JSON field maps.
    fn access_records(&self) -> Vec<serde_json::Value> {
        String::from_utf8(self.0.lock().unwrap().clone())
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|r| r["target"] == "sinew::access")
            .map(|r| r["fields"].clone())
            .collect()
    }
}

fn capture_logs() -> (Capture, tracing::subscriber::DefaultGuard) {
    let capture = Capture::default();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .with_writer(capture.clone())
        .with_max_level(tracing::Level::INFO)
        .finish();
    (capture, tracing::subscriber::set_default(subscriber))
}

/// Runs a test body with an overall bound.
async fn bounded<F: Future<Output = ()>>(body: F) {
    tokio::time::timeout(Duration::from_secs(60), body)
        .await
        .expect("the test took too long");
}

/// What the kernel does for an enrolled pod's connect: a socket from the workload's IP, a record of the original
/// destination under the socket's address, and the connection to the proxy's outbound listener.
async fn app_connect(node: &Node, client: &Workload, dst: SocketAddr) -> TcpStream {
    connect_via(&node.env, node.outbound, client, dst).await
}

/// [`app_connect`] to any outbound listener with its environment.
async fn connect_via(
    env: &FakeEnv,
    outbound: SocketAddr,
    client: &Workload,
    dst: SocketAddr,
) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(client.ip, 0)).unwrap();
    let local = socket.local_addr().unwrap();
    env.redirects.lock().unwrap().insert(
        local,
        Redirected {
            original_dst: dst,
            client: client.clone(),
        },
    );
    let s = tokio::time::timeout(T, socket.connect(outbound))
        .await
        .unwrap()
        .unwrap();
    s.set_nodelay(true).unwrap();
    s
}

async fn roundtrip(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).await.unwrap();
    let mut back = vec![0; msg.len()];
    tokio::time::timeout(T, s.read_exact(&mut back))
        .await
        .expect("echo in time")
        .expect("echo");
    assert_eq!(back, msg);
}

/// The proxy closed the app connection without passing any data.
async fn assert_closed(s: &mut TcpStream) {
    let mut buf = [0u8; 64];
    match tokio::time::timeout(T, s.read(&mut buf))
        .await
        .expect("closed in time")
    {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!("expected a closed connection, got {n} bytes"),
    }
}

/// A test server: its address, how many connections it accepted, and from where.
struct Server {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
}

/// Accepts on `ip` and runs `serve` per connection.
async fn server<F, Fut>(ip: &str, serve: F) -> Server
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind((ip.parse::<IpAddr>().unwrap(), 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let peers = Arc::new(Mutex::new(Vec::new()));
    let (count, from) = (accepted.clone(), peers.clone());
    tokio::spawn(async move {
        while let Ok((s, peer)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            from.lock().unwrap().push(peer);
            tokio::spawn(serve(s));
        }
    });
    Server {
        addr,
        accepted,
        peers,
    }
}

/// Echoes until EOF, then closes its write side.
async fn echo_server(ip: &str) -> Server {
    server(ip, |mut s| async move {
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    })
    .await
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

/// 1. Through the tunnel: bytes round-trip, 1 MiB each way intact, and half-close in both directions.
#[tokio::test]
async fn tunnel_carries_bytes_and_half_closes() {
    bounded(async {
        let cluster = Cluster::new();
        let (a, b) = pair(
            &cluster,
            |_| {},
            |c| c.local_source_v4 = Some("127.0.0.8".parse().unwrap()),
        );
        let echo = echo_server("127.0.0.1").await;

        let mut s = app_connect(&a, &frontend(), echo.addr).await;
        roundtrip(&mut s, b"hello through the tunnel").await;
        // Node B connects to its workload from its local source address.
        let from = echo.peers.lock().unwrap()[0];
        assert_eq!(from.ip(), "127.0.0.8".parse::<IpAddr>().unwrap());

        // 1 MiB each way, concurrently (the echo only keeps up if we read while we write), then the client's
        // half-close: it shuts down its write side and still reads everything the server sends after that.
        let data = pattern(1 << 20, 7);
        let (mut r, mut w) = s.into_split();
        let writer = async {
            w.write_all(&data).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let reader = async {
            let mut back = Vec::new();
            r.read_to_end(&mut back).await.unwrap();
            back
        };
        let ((), back) = tokio::join!(writer, reader);
        assert_eq!(back.len(), data.len());
        assert!(back == data, "the echoed bytes differ");

        // The server closes its write side first; the client sees EOF and can still send.
        let (got_tx, mut got_rx) = mpsc::unbounded_channel();
        let closer = server("127.0.0.1", move |mut s| {
            let got_tx = got_tx.clone();
            async move {
                s.write_all(b"server says bye first").await.unwrap();
                s.shutdown().await.unwrap();
                let mut rest = Vec::new();
                s.read_to_end(&mut rest).await.unwrap();
                let _ = got_tx.send(rest);
            }
        })
        .await;
        let mut s = app_connect(&a, &frontend(), closer.addr).await;
        let mut first = Vec::new();
        tokio::time::timeout(T, s.read_to_end(&mut first))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(first, b"server says bye first");
        let late = pattern(100_000, 3);
        s.write_all(&late).await.unwrap();
        s.shutdown().await.unwrap();
        let rest = tokio::time::timeout(T, got_rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(rest == late, "the server got {} bytes", rest.len());

        assert_eq!(echo.accepted.load(Ordering::SeqCst), 1);
        both_closed("both connections closed", &a, &b).await;
    })
    .await;
}

/// A reset on either end reaches the other end as a reset, not as an orderly EOF.
#[tokio::test]
async fn resets_propagate_through_the_tunnel() {
    bounded(async {
        let (_cluster, a, b) = default_pair();
        // Reports how its read ended: data, EOF, or an error kind.
        let (seen_tx, mut seen_rx) = mpsc::unbounded_channel();
        let observer = server("127.0.0.1", move |mut s| {
            let seen_tx = seen_tx.clone();
            async move {
                let mut buf = [0u8; 64];
                let n = s.read(&mut buf).await.unwrap();
                s.write_all(&buf[..n]).await.unwrap();
                let outcome = match s.read(&mut buf).await {
                    Ok(0) => "eof".to_string(),
                    Ok(n) => format!("{n} bytes"),
                    Err(e) => format!("{:?}", e.kind()),
                };
                let _ = seen_tx.send(outcome);
            }
        })
        .await;

        // The client resets: the server sees a reset.
        let mut s = app_connect(&a, &frontend(), observer.addr).await;
        roundtrip(&mut s, b"ping").await;
        s.set_zero_linger().unwrap();
        drop(s);
        let outcome = tokio::time::timeout(T, seen_rx.recv()).await.unwrap();
        assert_eq!(outcome.as_deref(), Some("ConnectionReset"));

        // The server resets: the client sees a reset. (Only once the echo is through: a RST discards unread data.)
        let resetter = server("127.0.0.1", |mut s| async move {
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf).await.unwrap();
            s.write_all(&buf[..n]).await.unwrap();
            // The client's go-ahead.
            let _ = s.read(&mut buf).await.unwrap();
            s.set_zero_linger().unwrap();
        })
        .await;
        let mut s = app_connect(&a, &frontend(), resetter.addr).await;
        roundtrip(&mut s, b"ping").await;
        s.write_all(b"reset now").await.unwrap();
        let mut buf = [0u8; 64];
        let outcome = tokio::time::timeout(T, s.read(&mut buf)).await.unwrap();
        assert_eq!(
            outcome.map_err(|e| e.kind()).err(),
            Some(std::io::ErrorKind::ConnectionReset)
        );
        both_closed("both sides closed", &a, &b).await;
    })
    .await;
}

/// 2. Pooling: one TLS handshake for 20 sequential connections of one source identity; another identity gets its
/// own tunnel connection.
#[tokio::test]
async fn tunnel_connections_are_pooled_per_source_identity() {
    bounded(async {
        let (_cluster, a, _b) = default_pair();
        let echo = echo_server("127.0.0.1").await;
        for i in 0..20u8 {
            let mut s = app_connect(&a, &frontend(), echo.addr).await;
            roundtrip(&mut s, &[i; 100]).await;
            s.shutdown().await.unwrap();
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).await.unwrap();
        }
        assert_eq!(handshakes(&a), 1);
        assert_eq!(a.handle.shared.pool.len(), 1);

        let other = workload("checkout", "shop", "checkout", "127.0.0.5");
        let mut s = app_connect(&a, &other, echo.addr).await;
        roundtrip(&mut s, b"another identity").await;
        assert_eq!(handshakes(&a), 2);
        assert_eq!(a.handle.shared.pool.len(), 2);
        // The first identity still reuses its own.
        let mut s = app_connect(&a, &frontend(), echo.addr).await;
        roundtrip(&mut s, b"again").await;
        assert_eq!(handshakes(&a), 2);
    })
    .await;
}

/// 3. Authorization on the inbound side: a denial is 403, the app connection closes without data, and the identity
/// authorized is the source's authenticated SPIFFE identity.
#[tokio::test]
async fn inbound_denial_is_403_with_the_authenticated_identity() {
    bounded(async {
        let (_cluster, a, b) = default_pair();
        let echo = echo_server("127.0.0.1").await;
        b.env.set_deny(true);

        let mut s = app_connect(&a, &frontend(), echo.addr).await;
        let _ = s.write_all(b"let me in").await;
        assert_closed(&mut s).await;

        eventually("the denial counted on both sides", || {
            refused(&b, "policy_denied") == 1 && refused(&a, "upstream_denied") == 1
        })
        .await;
        let calls = b.env.authz_calls.lock().unwrap().clone();
        assert_eq!(
            calls,
            vec![(
                Identity::new(TD, "shop", "frontend"),
                frontend().ip,
                echo.addr
            )]
        );
        assert_eq!(echo.accepted.load(Ordering::SeqCst), 0);
        // Node A does not authorize remote destinations itself.
        assert!(a.env.authz_calls.lock().unwrap().is_empty());
    })
    .await;
}

/// 4. Same node: no TLS, policy applied with the kernel's identity, bytes flow, both reporters count.
#[tokio::test]
async fn same_node_skips_tls_and_applies_policy() {
    bounded(async {
        let cluster = Cluster::new();
        // The kernel trusts this source address as the node proxy's.
        let a = start(cluster.env(), |c| {
            c.local_source_v4 = Some("127.0.0.7".parse().unwrap())
        });
        let local = workload("cache", "shop", "cache", "127.0.0.3");
        a.env.place(&local, a.inbound, true);
        let echo = echo_server("127.0.0.3").await;

        let mut s = app_connect(&a, &frontend(), echo.addr).await;
        roundtrip(&mut s, &pattern(50_000, 1)).await;
        s.shutdown().await.unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        assert_eq!(handshakes(&a), 0);
        let from = echo.peers.lock().unwrap()[0];
        assert_eq!(from.ip(), "127.0.0.7".parse::<IpAddr>().unwrap());
        assert_eq!(
            a.env.authz_calls.lock().unwrap().clone(),
            vec![(
                Identity::new(TD, "shop", "frontend"),
                frontend().ip,
                echo.addr
            )]
        );
        eventually("closed", || a.handle.active() == 0).await;
        for reporter in ["source", "destination"] {
            let labels = [
                ("reporter", reporter),
                ("connection_security_policy", "none"),
                ("destination_workload", "cache"),
            ];
            assert_eq!(
                metric(&a.registry, "istio_tcp_connections_opened_total", &labels),
                1
            );
            assert_eq!(
                metric(&a.registry, "istio_tcp_received_bytes_total", &labels),
                50_000
            );
        }

        a.env.set_deny(true);
        let mut s = app_connect(&a, &frontend(), echo.addr).await;
        assert_closed(&mut s).await;
        eventually("the denial counted", || refused(&a, "policy_denied") == 1).await;
        assert_eq!(echo.accepted.load(Ordering::SeqCst), 1);
        assert_eq!(handshakes(&a), 0);
    })
    .await;
}

/// 5. Connections that are not redirected, to unknown destinations, or to the proxy itself are closed and counted.
#[tokio::test]
async fn unredirected_unknown_and_looping_connections_are_refused() {
    bounded(async {
        let (_cluster, a, _b) = default_pair();

        // Straight to the proxy port: no kernel record.
        let mut s = TcpStream::connect(a.outbound).await.unwrap();
        assert_closed(&mut s).await;
        eventually("not_redirected", || refused(&a, "not_redirected") == 1).await;

        // A destination that is no enrolled workload: never plaintext.
        let unknown: SocketAddr = "127.0.0.9:9".parse().unwrap();
        let mut s = app_connect(&a, &frontend(), unknown).await;
        assert_closed(&mut s).await;
        eventually("unknown_destination", || {
            refused(&a, "unknown_destination") == 1
        })
        .await;

        // The proxy's own listeners.
        for own in [a.outbound, a.inbound] {
            let mut s = app_connect(&a, &frontend(), own).await;
            assert_closed(&mut s).await;
        }
        eventually("loop", || refused(&a, "loop") == 2).await;
        assert_eq!(handshakes(&a), 0);
        assert_eq!(a.handle.active(), 0);
    })
    .await;
}

/// A raw TLS client presenting `svid` (or nothing) to a tunnel listener; the handshake's outcome is not checked here
/// (with TLS 1.3 the client may finish before the server has refused it), only the server's count.
async fn present(cluster: &Cluster, addr: SocketAddr, svid: Option<&Svid>) {
    let cfg = match svid {
        Some(svid) => client_config(svid, &cluster.ca, None).unwrap(),
        None => rustls::ClientConfig::builder_with_provider(crate::identity::verify::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(
                crate::identity::verify::SpiffeServerVerifier::new(
                    crate::identity::TrustBundle::from_ca(&cluster.ca).unwrap(),
                    None,
                    &crate::identity::verify::provider(),
                ),
            ))
            .with_no_client_auth(),
    };
    let mut cfg = cfg;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("sinew.test").unwrap();
    if let Ok(Ok(mut tls)) =
        tokio::time::timeout(T, TlsConnector::from(Arc::new(cfg)).connect(name, tcp)).await
    {
        // Wait for the server's verdict (an alert, or the close).
        let mut buf = [0u8; 16];
        let _ = tokio::time::timeout(T, tls.read(&mut buf)).await;
    }
}

/// 6. Bad certificates are refused and counted with their reason: by the tunnel listener (client certificates), and
/// by the outbound side (a server that is not the node proxy identity).
#[tokio::test]
async fn bad_certificates_are_refused_with_their_reason() {
    bounded(async {
        let cluster = Cluster::new();
        let b = start(cluster.env(), |_| {});
        let ca = &cluster.ca;
        let uri = "spiffe://cluster.local/ns/shop/sa/frontend";
        let other_ca = Ca::generate(TD).unwrap();
        let cases: Vec<(&str, Option<Svid>)> = vec![
            (
                "unknown_ca",
                Some(other_ca.issue("shop", "frontend").unwrap()),
            ),
            (
                "wrong_trust_domain",
                Some(
                    crafted(
                        ca,
                        &["spiffe://evil.example/ns/shop/sa/frontend"],
                        -300,
                        3600,
                        false,
                    )
                    .unwrap(),
                ),
            ),
            (
                "expired",
                Some(crafted(ca, &[uri], -7200, -3600, false).unwrap()),
            ),
            (
                "not_yet_valid",
                Some(crafted(ca, &[uri], 3600, 7200, false).unwrap()),
            ),
            (
                "multiple_uri_sans",
                Some(
                    crafted(
                        ca,
                        &[uri, "spiffe://cluster.local/ns/kube-system/sa/admin"],
                        -300,
                        3600,
                        false,
                    )
                    .unwrap(),
                ),
            ),
            (
                "leaf_is_ca",
                Some(crafted(ca, &[uri], -300, 3600, true).unwrap()),
            ),
            // No client certificate at all: rustls refuses before our verifier runs.
            ("handshake", None),
        ];
        for (reason, svid) in &cases {
            present(&cluster, b.inbound, svid.as_ref()).await;
            eventually(&format!("inbound rejection {reason}"), || {
                metric(
                    &b.registry,
                    "sinew_proxy_tls_rejections_total",
                    &[("side", "inbound"), ("reason", reason)],
                ) == 1
            })
            .await;
        }
        assert_eq!(b.handle.active(), 0);

        // Outbound: node C's tunnel listener presents a workload SVID, not the node proxy's.
        let impostor = issue(ca, &SpiffeId::new(TD, "shop", "impostor").unwrap(), short()).unwrap();
        let c = start(cluster.env_presenting(&impostor), |_| {});
        let a = start(cluster.env(), |_| {});
        let victim = workload("payments", "shop", "payments", "127.0.0.4");
        a.env.place(&victim, c.inbound, false);
        c.env.place(&victim, c.inbound, true);
        let echo = echo_server("127.0.0.4").await;
        let mut s = app_connect(&a, &frontend(), echo.addr).await;
        assert_closed(&mut s).await;
        eventually("outbound spiffe_id_mismatch", || {
            metric(
                &a.registry,
                "sinew_proxy_tls_rejections_total",
                &[("side", "outbound"), ("reason", "spiffe_id_mismatch")],
            ) == 1
                && refused(&a, "tunnel_failed") == 1
        })
        .await;
        assert_eq!(echo.accepted.load(Ordering::SeqCst), 0);
    })
    .await;
}

/// Two app connections from node A to `dst` that carry data, then a third that a limit of 2 closes.
async fn two_and_a_refused_third(a: &Node, dst: SocketAddr) -> (TcpStream, TcpStream) {
    let mut one = app_connect(a, &frontend(), dst).await;
    let mut two = app_connect(a, &frontend(), dst).await;
    roundtrip(&mut one, b"one").await;
    roundtrip(&mut two, b"two").await;
    let mut three = app_connect(a, &frontend(), dst).await;
    assert_closed(&mut three).await;
    (one, two)
}

/// 7. `max_connections` on the outbound side (refused at accept) and on the inbound side (streams get 503).
#[tokio::test]
async fn connection_and_stream_limits() {
    bounded(async {
        let cluster = Cluster::new();
        let (a, _b) = pair(&cluster, |c| c.max_connections = 2, |_| {});
        let echo = echo_server("127.0.0.1").await;
        let (one, two) = two_and_a_refused_third(&a, echo.addr).await;
        eventually("connection_limit", || refused(&a, "connection_limit") == 1).await;
        assert_eq!(a.handle.active(), 2);
        // A slot frees when a connection ends.
        drop(one);
        eventually("a free slot", || a.handle.active() == 1).await;
        let mut four = app_connect(&a, &frontend(), echo.addr).await;
        roundtrip(&mut four, b"four").await;
        drop((two, four));

        // The inbound side counts streams against its own limit.
        let (a, b) = pair(&cluster, |_| {}, |c| c.max_connections = 2);
        let (_one, _two) = two_and_a_refused_third(&a, echo.addr).await;
        eventually("stream_limit", || {
            refused(&b, "stream_limit") == 1 && refused(&a, "upstream_unavailable") == 1
        })
        .await;
        assert_eq!(b.handle.active(), 2);
        // All three streams shared one tunnel connection.
        assert_eq!(handshakes(&a), 1);
    })
    .await;
}

/// 8a. Drain with one open connection: no new accepts, the open connection keeps working, and the drain returns
/// once it closes, having cut nothing.
#[tokio::test]
async fn drain_waits_for_open_connections() {
    bounded(async {
        let (logs, _guard) = capture_logs();
        let (cluster, a, b) = default_pair();
        let echo = echo_server("127.0.0.1").await;
        let mut s = app_connect(&a, &frontend(), echo.addr).await;
        roundtrip(&mut s, b"before the drain").await;

        let outbound = a.outbound;
        let drain = tokio::spawn(a.handle.drain());
        // The listener closes: connects are refused.
        let deadline = tokio::time::Instant::now() + T;
        loop {
            match TcpStream::connect(outbound).await {
                Err(_) => break,
                Ok(mut probe) => {
                    // Accepted just before the close: it gets closed.
                    assert_closed(&mut probe).await;
                }
            }
            assert!(tokio::time::Instant::now() < deadline, "still accepting");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        roundtrip(&mut s, b"during the drain").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !drain.is_finished(),
            "the drain must wait for the open connection"
        );
        s.shutdown().await.unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
        let cut = tokio::time::timeout(T, drain).await.unwrap().unwrap();
        assert_eq!(cut, 0);

        // Draining node B (the tunnel listener): GOAWAY; the open stream carries on, new ones fail over to a new
        // connection, which the closed listener refuses.
        let a = start(cluster.env(), |_| {});
        a.env.place(&backend(), b.inbound, false);
        let mut s = app_connect(&a, &frontend(), echo.addr).await;
        roundtrip(&mut s, b"before B drains").await;
        let drain = tokio::spawn(b.handle.drain());
        eventually("B's listener closed", || {
            std::net::TcpStream::connect(b.inbound).is_err()
        })
        .await;
        roundtrip(&mut s, b"while B drains").await;
        let mut late = app_connect(&a, &frontend(), echo.addr).await;
        assert_closed(&mut late).await;
        // The pooled connection refused the stream (GOAWAY); the retry on a new connection found the listener closed.
        let records = logs.access_records();
        assert!(
            records.iter().any(|r| r["direction"] == "outbound"
                && r["result"]
                    .as_str()
                    .unwrap()
                    .starts_with("tunnel_failed: connect to")),
            "{records:#?}"
        );
        assert!(!drain.is_finished());
        drop(s);
        let cut = tokio::time::timeout(T, drain).await.unwrap().unwrap();
        assert_eq!(cut, 0);
    })
    .await;
}

/// 8b. Drain with a stuck connection: it is cut after `drain_timeout`, and the drain reports it.
#[tokio::test]
async fn drain_cuts_stuck_connections_after_the_timeout() {
    bounded(async {
        let cluster = Cluster::new();
        let (a, b) = pair(
            &cluster,
            |c| c.drain_timeout = Duration::from_millis(300),
            |_| {},
        );
        let echo = echo_server("127.0.0.1").await;
        let mut s = app_connect(&a, &frontend(), echo.addr).await;
        roundtrip(&mut s, b"then silence").await;
        let started = std::time::Instant::now();
        let cut = tokio::time::timeout(T, a.handle.drain()).await.unwrap();
        assert_eq!(cut, 1);
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert_closed(&mut s).await;
        // The abort reached node B too (the stream was reset), and B closed its side.
        eventually("B's stream closed", || b.handle.active() == 0).await;
    })
    .await;
}

/// 9. The metrics exposition: Istio's TCP metrics from both reporters with mutual TLS, and byte counts equal to what
/// was sent each way.
#[tokio::test]
async fn istio_metrics_count_connections_and_bytes() {
    bounded(async {
        let (logs, _guard) = capture_logs();
        let (_cluster, a, b) = default_pair();
        // Reads the request to EOF, then answers 777 bytes.
        let sink = server("127.0.0.1", |mut s| async move {
            let mut request = Vec::new();
            s.read_to_end(&mut request).await.unwrap();
            assert_eq!(request.len(), 1234);
            s.write_all(&[b'r'; 777]).await.unwrap();
        })
        .await;
        let mut s = app_connect(&a, &frontend(), sink.addr).await;
        s.write_all(&[b'q'; 1234]).await.unwrap();
        s.shutdown().await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(T, s.read_to_end(&mut answer))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(answer.len(), 777);
        both_closed("both sides closed", &a, &b).await;

        for (node, reporter) in [(&a, "source"), (&b, "destination")] {
            let exposition = text(&node.registry);
            assert!(
                exposition.contains("istio_tcp_connections_opened_total{")
                    && exposition.contains(&format!("reporter=\"{reporter}\"")),
                "{exposition}"
            );
            let labels = [
                ("reporter", reporter),
                ("source_workload", "frontend"),
                ("source_workload_namespace", "shop"),
                (
                    "source_principal",
                    "spiffe://cluster.local/ns/shop/sa/frontend",
                ),
                ("destination_workload", "backend"),
                ("destination_workload_namespace", "shop"),
                (
                    "destination_principal",
                    "spiffe://cluster.local/ns/shop/sa/backend",
                ),
                ("connection_security_policy", "mutual_tls"),
                ("request_protocol", "tcp"),
            ];
            let m = |name| metric(&node.registry, name, &labels);
            assert_eq!(m("istio_tcp_connections_opened_total"), 1, "{exposition}");
            assert_eq!(m("istio_tcp_connections_closed_total"), 1, "{exposition}");
            assert_eq!(m("istio_tcp_received_bytes_total"), 1234, "{exposition}");
            assert_eq!(m("istio_tcp_sent_bytes_total"), 777, "{exposition}");
            assert!(exposition.contains("sinew_proxy_active_connections 0"));
        }

        // One access record per side, with the same numbers.
        let client_addr = s.local_addr().unwrap();
        let records = logs.access_records();
        assert_eq!(records.len(), 2, "{records:#?}");
        for (direction, src_addr, tunnel) in [
            ("outbound", client_addr.to_string(), b.inbound.to_string()),
            ("inbound", client_addr.ip().to_string(), String::new()),
        ] {
            let r = records
                .iter()
                .find(|r| r["direction"] == direction)
                .unwrap_or_else(|| panic!("no {direction} record: {records:#?}"));
            assert_eq!(r["src_addr"], src_addr.as_str(), "{r:#}");
            assert_eq!(r["src_workload"], "frontend", "{r:#}");
            assert_eq!(r["src_namespace"], "shop", "{r:#}");
            assert_eq!(
                r["src_principal"], "spiffe://cluster.local/ns/shop/sa/frontend",
                "{r:#}"
            );
            assert_eq!(r["dst_addr"], sink.addr.to_string().as_str(), "{r:#}");
            assert_eq!(r["dst_workload"], "backend", "{r:#}");
            assert_eq!(r["dst_namespace"], "shop", "{r:#}");
            assert_eq!(
                r["dst_principal"], "spiffe://cluster.local/ns/shop/sa/backend",
                "{r:#}"
            );
            assert_eq!(r["security"], "mutual_tls", "{r:#}");
            assert_eq!(r["bytes_sent"], 777, "{r:#}");
            assert_eq!(r["bytes_received"], 1234, "{r:#}");
            assert_eq!(r["result"], "ok", "{r:#}");
            assert!(r["duration_ms"].is_u64(), "{r:#}");
            if direction == "outbound" {
                assert_eq!(r["tunnel"], tunnel.as_str(), "{r:#}");
            }
        }
    })
    .await;
}

/// The proxy on its own thread: carries a connection, drains and joins.
#[tokio::test]
async fn proxy_thread_runs_drains_and_joins() {
    bounded(async {
        let cluster = Cluster::new();
        let env = cluster.env();
        let local = workload("cache", "shop", "cache", "127.0.0.3");
        let echo = echo_server("127.0.0.3").await;
        let mut thread =
            Proxy::spawn_thread(test_config(), env.clone(), ProxyMetrics::new()).unwrap();
        env.place(&local, thread.inbound_addr(), true);
        let mut s = connect_via(&env, thread.outbound_addrs()[0], &frontend(), echo.addr).await;
        roundtrip(&mut s, b"via the proxy thread").await;
        assert_eq!(thread.active(), 1);
        drop(s);
        eventually("closed", || thread.active() == 0).await;
        thread.request_drain();
        let cut = tokio::task::spawn_blocking(move || thread.join())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(cut, 0);
    })
    .await;
}

/// Binding a port another program holds fails with an error that names the address. (A second proxy may share
/// it: see the next test.)
#[tokio::test]
async fn bind_errors_name_the_address() {
    let cluster = Cluster::new();
    // A plain listener, without SO_REUSEPORT: nobody may join it.
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = other.local_addr().unwrap();
    let err = Proxy::start(
        ProxyConfig {
            inbound: taken,
            ..test_config()
        },
        cluster.env(),
        ProxyMetrics::new(),
    )
    .err()
    .expect("the port is taken");
    assert!(err.to_string().contains(&taken.to_string()), "{err}");
}

/// During a rolling update the new agent's proxy listens on the same ports as the old one's (SO_REUSEPORT), so
/// the node is never without a listener.
#[tokio::test]
async fn a_second_proxy_shares_the_ports_during_a_handover() {
    let cluster = Cluster::new();
    let a = start(cluster.env(), |_| {});
    let b = Proxy::start(
        ProxyConfig {
            inbound: a.inbound,
            ..test_config()
        },
        cluster.env(),
        ProxyMetrics::new(),
    );
    assert!(
        b.is_ok(),
        "a second proxy could not share {}: {:?}",
        a.inbound,
        b.err()
    );
}
