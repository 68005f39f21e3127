//! The outbound side's pool of tunnel connections, keyed by (source identity, destination node proxy): a new app
//! connection becomes one more HTTP/2 stream on an open connection, so it costs no TCP or TLS handshake.
//!
//! Each pooled connection has a driver task (h2 needs one to run the connection's I/O) that also retires it: when
//! the connection fails or ends (the peer's GOAWAY, once its streams are done), and when it has had no stream for
//! [`IDLE_TIMEOUT`]. A connection that refuses a new stream (it got GOAWAY, or broke) is evicted by the caller, which
//! retries once on a fresh connection.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

use super::{Shared, tls_reason, tunnel};
use crate::identity::SpiffeId;

/// A tunnel connection with no stream for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The pool. Lives in the proxy's shared state.
#[derive(Default)]
pub(crate) struct Pool {
    inner: Mutex<HashMap<Key, KeyConns>>,
    next_id: AtomicU64,
}

/// Connections are never shared between identities: the TLS client certificate is the source workload's.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub(crate) struct Key {
    pub(crate) source: SpiffeId,
    pub(crate) tunnel: SocketAddr,
}

#[derive(Default)]
struct KeyConns {
    conns: Vec<Pooled>,
    /// Held while opening a connection for this key, so a burst of new app connections opens one tunnel, not one
    /// each.
    connecting: Arc<tokio::sync::Mutex<()>>,
    /// The last failure to open one, for those who waited on `connecting` meanwhile.
    failed: Option<(Instant, String)>,
}

struct Pooled {
    id: u64,
    send: SendRequest<Bytes>,
    load: Arc<Load>,
}

/// How busy a pooled connection is.
struct Load {
    streams: AtomicUsize,
    /// When `streams` last dropped to zero (or the connection opened).
    idle_since: Mutex<Instant>,
}

/// A stream's claim on a pooled connection's capacity; released when dropped.
pub(crate) struct Lease {
    load: Arc<Load>,
    pub(crate) id: u64,
}

/// A connection to open one stream on.
pub(crate) struct Checkout {
    pub(crate) send: SendRequest<Bytes>,
    pub(crate) lease: Lease,
    /// Opened just now for this request (so a failure is not a stale connection, and is not worth a retry).
    pub(crate) fresh: bool,
}

/// Why no tunnel connection could be had.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TunnelError {
    #[error("client TLS config for {0}: {1}")]
    Config(SpiffeId, String),
    #[error("connect to {0}: {1}")]
    Connect(SocketAddr, io::Error),
    #[error("TLS handshake with {addr} ({reason}): {error}")]
    Tls {
        addr: SocketAddr,
        reason: &'static str,
        error: io::Error,
    },
    #[error("HTTP/2 handshake with {0}: {1}")]
    H2(SocketAddr, h2::Error),
    #[error("tunnel to {0} failed just now: {1}")]
    Recent(SocketAddr, String),
}

impl Pool {
    fn lock(&self) -> MutexGuard<'_, HashMap<Key, KeyConns>> {
        // A panic while holding the lock cannot leave the map inconsistent (single inserts and removes).
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A connection with a free stream for `key`, opening one (TCP, TLS presenting the source's SVID, HTTP/2) if
    /// none has room.
    pub(crate) async fn checkout(
        &self,
        shared: &Arc<Shared>,
        key: &Key,
    ) -> Result<Checkout, TunnelError> {
        let max = shared.cfg.max_streams_per_tunnel as usize;
        if let Some(c) = self.pick(key, max) {
            return Ok(c);
        }
        let connecting = self
            .lock()
            .entry(key.clone())
            .or_default()
            .connecting
            .clone();
        let asked = Instant::now();
        let one_at_a_time = connecting.lock().await;
        // Someone else may have opened one while we waited.
        if let Some(c) = self.pick(key, max) {
            return Ok(c);
        }
        // Or failed to, after we asked: share that failure rather than queue up for one timeout each.
        if let Some(error) = self.failed_since(key, asked) {
            drop(one_at_a_time);
            drop(connecting);
            self.forget_if_unused(key);
            return Err(TunnelError::Recent(key.tunnel, error));
        }
        let (send, conn) = match connect(shared, key).await {
            Ok(opened) => opened,
            Err(e) => {
                if let Some(k) = self.lock().get_mut(key) {
                    k.failed = Some((Instant::now(), e.to_string()));
                }
                drop(one_at_a_time);
                drop(connecting);
                self.forget_if_unused(key);
                return Err(e);
            }
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let load = Arc::new(Load {
            // Leased right away, below.
            streams: AtomicUsize::new(1),
            idle_since: Mutex::new(Instant::now()),
        });
        self.lock()
            .entry(key.clone())
            .or_default()
            .conns
            .push(Pooled {
                id,
                send: send.clone(),
                load: load.clone(),
            });
        // After the insert, so the driver's final evict cannot come first and leave a dead entry behind.
        tokio::spawn(drive(shared.clone(), key.clone(), id, load.clone(), conn));
        Ok(Checkout {
            send,
            lease: Lease { load, id },
            fresh: true,
        })
    }

    fn failed_since(&self, key: &Key, since: Instant) -> Option<String> {
        let inner = self.lock();
        let (at, error) = inner.get(key)?.failed.as_ref()?;
        (*at >= since).then(|| error.clone())
    }

    /// Removes `key`'s entry if it has no connection and nobody is opening one.
    fn forget_if_unused(&self, key: &Key) {
        let mut inner = self.lock();
        if let Some(k) = inner.get(key) {
            if k.conns.is_empty() && Arc::strong_count(&k.connecting) == 1 {
                inner.remove(key);
            }
        }
    }

    /// The first connection with room for one more stream: fewer than our limit and the peer's
    /// `max_concurrent_streams`. Packing streams onto the first connections lets the others go idle and close.
    fn pick(&self, key: &Key, max: usize) -> Option<Checkout> {
        let inner = self.lock();
        let conns = inner.get(key)?;
        conns.conns.iter().find_map(|c| {
            let room = max.min(c.send.current_max_send_streams());
            // Checked and taken under the pool lock, so neither another pick nor the idle check (also under it) can
            // interleave; a concurrent `Lease` drop only lowers the count.
            (c.load.streams.load(Ordering::Relaxed) < room).then(|| {
                c.load.streams.fetch_add(1, Ordering::Relaxed);
                Checkout {
                    send: c.send.clone(),
                    lease: Lease {
                        load: c.load.clone(),
                        id: c.id,
                    },
                    fresh: false,
                }
            })
        })
    }

    /// Drops connection `id` from the pool (it keeps serving its open streams; it closes when they are done).
    pub(crate) fn evict(&self, key: &Key, id: u64) {
        evict_locked(&mut self.lock(), key, id);
    }

    /// Evicts connection `id` if it has had no stream for `idle`. Returns when to check again, or None if evicted.
    fn evict_if_idle(&self, key: &Key, id: u64, load: &Load, idle: Duration) -> Option<Instant> {
        // Under the pool lock, so no `pick` can lease it between the check and the eviction.
        let mut inner = self.lock();
        let now = Instant::now();
        if load.streams.load(Ordering::Relaxed) > 0 {
            return Some(now + idle);
        }
        let since = *load.idle_since.lock().unwrap_or_else(|e| e.into_inner());
        if now < since + idle {
            return Some(since + idle);
        }
        evict_locked(&mut inner, key, id);
        None
    }

    /// Empties the pool (drain): the connections close once their open streams are done.
    pub(crate) fn clear(&self) {
        self.lock().clear();
    }

    /// Pooled connections, for tests.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().values().map(|k| k.conns.len()).sum()
    }
}

fn evict_locked(inner: &mut HashMap<Key, KeyConns>, key: &Key, id: u64) {
    if let Some(k) = inner.get_mut(key) {
        k.conns.retain(|c| c.id != id);
        // Forget the key once nothing is pooled or being opened for it, so the map does not grow with every identity
        // ever seen.
        if k.conns.is_empty() && Arc::strong_count(&k.connecting) == 1 {
            inner.remove(key);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.load.streams.fetch_sub(1, Ordering::Relaxed) == 1 {
            *self
                .load
                .idle_since
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Instant::now();
        }
    }
}

type Connection = h2::client::Connection<tokio_rustls::client::TlsStream<TcpStream>, Bytes>;

/// Opens a tunnel connection: TCP, TLS presenting the source's SVID, HTTP/2.
async fn connect(
    shared: &Arc<Shared>,
    key: &Key,
) -> Result<(SendRequest<Bytes>, Connection), TunnelError> {
    let addr = key.tunnel;
    // Asked per connection, so a renewed SVID is used from the next connection on.
    let tls = shared
        .env
        .client_tls(&key.source)
        .map_err(|e| TunnelError::Config(key.source.clone(), e))?;
    let tls = super::with_h2_alpn_client(tls);
    let timeout = shared.cfg.connect_timeout;
    let tcp = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => return Err(TunnelError::Connect(addr, e)),
        Err(_) => {
            return Err(TunnelError::Connect(
                addr,
                io::Error::new(io::ErrorKind::TimedOut, "timed out"),
            ));
        }
    };
    let _ = tcp.set_nodelay(true);
    shared.metrics.handshake();
    // The verifier checks the SPIFFE ID, not this name; an IP name also means no SNI is sent.
    let name = ServerName::IpAddress(addr.ip().into());
    let tls = match tokio::time::timeout(timeout, TlsConnector::from(tls).connect(name, tcp)).await
    {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => {
            let reason = tls_reason(&error);
            shared.metrics.tls_rejected("outbound", reason);
            return Err(TunnelError::Tls {
                addr,
                reason,
                error,
            });
        }
        Err(_) => {
            shared.metrics.tls_rejected("outbound", "handshake");
            return Err(TunnelError::Tls {
                addr,
                reason: "handshake",
                error: io::Error::new(io::ErrorKind::TimedOut, "timed out"),
            });
        }
    };
    h2::client::Builder::new()
        .initial_window_size(tunnel::STREAM_WINDOW)
        .initial_connection_window_size(tunnel::CONNECTION_WINDOW)
        // Until the server's SETTINGS arrive, assume it allows what we would.
        .initial_max_send_streams(shared.cfg.max_streams_per_tunnel as usize)
        .enable_push(false)
        .handshake::<_, Bytes>(tls)
        .await
        .map_err(|e| TunnelError::H2(addr, e))
}

/// Runs a pooled connection's I/O until it ends, retiring it from the pool when idle for [`IDLE_TIMEOUT`] and when
/// it ends (error, or the peer's GOAWAY once the streams are done).
async fn drive(shared: Arc<Shared>, key: Key, id: u64, load: Arc<Load>, conn: Connection) {
    tokio::pin!(conn);
    let mut next_check = Some(Instant::now() + IDLE_TIMEOUT);
    loop {
        tokio::select! {
            r = &mut conn => {
                if let Err(e) = r {
                    tracing::debug!(tunnel = %key.tunnel, source = %key.source, error = %e, "tunnel connection failed");
                }
                break;
            }
            () = async {
                match next_check {
                    Some(at) => tokio::time::sleep_until(at).await,
                    // Retired: keep driving the open streams; h2 closes the connection after the last one.
                    None => std::future::pending().await,
                }
            } => {
                next_check = shared.pool.evict_if_idle(&key, id, &load, IDLE_TIMEOUT);
            }
        }
    }
    shared.pool.evict(&key, id);
}
