//! The outbound listener (15001): connections the kernel redirected from enrolled pods.
//!
//! Per accepted connection: the kernel's record (original destination, client identity) or refuse; refuse loops;
//! take a slot under `max_connections`; then, in one task per connection: find the destination, and either
//! authorize and connect directly (same node, no TLS), or open a `CONNECT` stream on a pooled tunnel connection to
//! the destination node's proxy. Never a plaintext fallback: an unknown destination is refused.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use h2::client::{ResponseFuture, SendRequest};
use h2::{Reason, SendStream};
use http::header::FORWARDED;
use http::{Method, Request, StatusCode};
use tokio::net::{TcpListener, TcpStream};

use super::metrics::{Access, Peer, TcpLabels};
use super::pool::{Checkout, Key, Lease};
use super::{Redirected, Shared, Slot, leaving, tunnel};
use crate::identity::SpiffeId;
use crate::policy::eval::Identity;

/// Accepts until the proxy drains (then the listener is dropped, which closes it).
pub(crate) async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    let mut phase = shared.phase.subscribe();
    loop {
        let (tcp, peer) = tokio::select! {
            biased;
            () = leaving(&mut phase) => return,
            r = listener.accept() => match r {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, usually: back off instead of spinning.
                    tracing::warn!(error = %e, "outbound accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        accept(&shared, tcp, peer);
    }
}

/// The checks that need no I/O, done in the accept loop so that a refused connection costs no task.
fn accept(shared: &Arc<Shared>, tcp: TcpStream, peer: SocketAddr) {
    let start = Instant::now();
    // Consumed first, whatever happens next, so refused connections leave no record behind in the kernel map.
    let Some(redirected) = shared.env.redirected(peer) else {
        // A workload connecting straight to the proxy port: a probe, or a loop. Nothing to proxy it to.
        let access = access(peer, None, start);
        refuse(shared, &tcp, &access, "not_redirected");
        return;
    };
    let mut access = access(peer, Some(&redirected), start);
    access.src = Peer::of(&redirected.client, shared.env.trust_domain());
    if shared.is_own_listener(redirected.original_dst) {
        refuse(shared, &tcp, &access, "loop");
        return;
    }
    let Some(slot) = shared.slot() else {
        refuse(shared, &tcp, &access, "connection_limit");
        return;
    };
    let _ = tcp.set_nodelay(true);
    tokio::spawn(handle(shared.clone(), slot, tcp, peer, redirected, access));
}

fn access(peer: SocketAddr, r: Option<&Redirected>, start: Instant) -> Access {
    Access {
        direction: "outbound",
        src_addr: peer.to_string(),
        src: Peer::unknown(),
        dst_addr: r.map_or(String::new(), |r| r.original_dst.to_string()),
        dst: Peer::unknown(),
        tunnel: String::new(),
        security: "none",
        start,
    }
}

/// Closes the app connection at once with a RST (like a refused connect, not like a server that answered and
/// left), counts and logs it.
fn refuse(shared: &Shared, tcp: &TcpStream, access: &Access, reason: &'static str) {
    let _ = tcp.set_zero_linger();
    shared.metrics.refused(reason);
    access.log(0, 0, &reason);
}

/// One redirected connection, start to end, in its own task.
async fn handle(
    shared: Arc<Shared>,
    _slot: Slot,
    mut tcp: TcpStream,
    peer: SocketAddr,
    redirected: Redirected,
    mut access: Access,
) {
    let td = shared.env.trust_domain().to_string();
    let dst = redirected.original_dst;
    let client = &redirected.client;
    let Some(dest) = shared.env.destination(dst.ip()) else {
        // Not an enrolled workload: the kernel should not have redirected it; never send it in plaintext.
        refuse(&shared, &tcp, &access, "unknown_destination");
        return;
    };
    access.dst = Peer::of(&dest.workload, &td);
    if dest.local {
        same_node(&shared, tcp, peer, &redirected, access).await;
        return;
    }
    let source = match SpiffeId::new(&td, &client.namespace, &client.service_account) {
        Ok(id) => id,
        Err(e) => {
            tracing::warn!(client = ?client, error = %e, "outbound: the client's identity is not a valid SPIFFE ID");
            refuse(&shared, &tcp, &access, "bad_source_identity");
            return;
        }
    };
    access.security = "mutual_tls";
    access.tunnel = dest.tunnel.to_string();
    let key = Key {
        source,
        tunnel: dest.tunnel,
    };
    let (_lease, response, mut send) = match open_stream(&shared, &key, dst, peer.ip()).await {
        Ok(opened) => opened,
        Err(e) => {
            tracing::debug!(tunnel = %dest.tunnel, error = %e, "outbound: no tunnel stream");
            refuse_with(&shared, &tcp, &access, "tunnel_failed", &e);
            return;
        }
    };
    // The peer answers once it has authorized and connected (or failed to), within its own connect timeout.
    let wait = shared.cfg.connect_timeout * 2;
    let response = match tokio::time::timeout(wait, response).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            refuse_with(&shared, &tcp, &access, "tunnel_failed", &e);
            return;
        }
        Err(_) => {
            send.send_reset(Reason::CANCEL);
            refuse_with(
                &shared,
                &tcp,
                &access,
                "tunnel_failed",
                &"no answer to CONNECT in time",
            );
            return;
        }
    };
    if response.status() != StatusCode::OK {
        send.send_reset(Reason::CANCEL);
        let reason = match response.status() {
            StatusCode::FORBIDDEN => "upstream_denied",
            StatusCode::NOT_FOUND => "upstream_not_local",
            StatusCode::SERVICE_UNAVAILABLE => "upstream_unavailable",
            _ => "upstream_error",
        };
        refuse_with(&shared, &tcp, &access, reason, &response.status());
        return;
    }
    let mut recv = response.into_body();
    tunnel::carry(
        &shared,
        &mut tcp,
        tunnel::TcpEnd::Client,
        &mut send,
        &mut recv,
        &access,
    )
    .await;
}

/// A `CONNECT` stream for `dst` on a pooled connection to `key`'s node proxy, or a new one. A pooled connection that
/// refuses the stream (it got GOAWAY, or broke) is evicted and the request retried on another.
async fn open_stream(
    shared: &Arc<Shared>,
    key: &Key,
    dst: SocketAddr,
    client_ip: IpAddr,
) -> Result<(Lease, ResponseFuture, SendStream<Bytes>), String> {
    loop {
        let Checkout { send, lease, fresh } = shared
            .pool
            .checkout(shared, key)
            .await
            .map_err(|e| e.to_string())?;
        match send_connect(send, dst, client_ip).await {
            Ok((response, stream)) => return Ok((lease, response, stream)),
            Err(e) => {
                shared.pool.evict(key, lease.id);
                // A fresh connection that fails is not stale: give up rather than loop.
                if fresh {
                    return Err(format!("tunnel {}: {e}", key.tunnel));
                }
                tracing::debug!(tunnel = %key.tunnel, error = %e, "pooled tunnel refused a stream; retrying");
            }
        }
    }
}

/// Sends the HBONE request: `CONNECT` with `:authority` = the original destination and `forwarded: for=<client>`.
async fn send_connect(
    send: SendRequest<Bytes>,
    dst: SocketAddr,
    client_ip: IpAddr,
) -> Result<(ResponseFuture, SendStream<Bytes>), h2::Error> {
    let mut send = send.ready().await?;
    let request = Request::builder()
        .method(Method::CONNECT)
        .uri(tunnel::authority(dst))
        .header(FORWARDED, tunnel::forwarded_for(client_ip))
        .body(())
        .expect("an IP authority and an IP forwarded value are valid");
    send.send_request(request, false)
}

/// A destination on this node: no TLS, but the same authorization as the inbound side, with the identity the kernel
/// attached to the client's socket. Reported by both sides (it is both the source's and the destination's proxy).
async fn same_node(
    shared: &Arc<Shared>,
    mut tcp: TcpStream,
    peer: SocketAddr,
    redirected: &Redirected,
    access: Access,
) {
    let dst = redirected.original_dst;
    let client = &redirected.client;
    let identity = Identity::new(
        shared.env.trust_domain(),
        &client.namespace,
        &client.service_account,
    );
    let authz = shared.env.authorize(&identity, peer.ip(), dst);
    if !authz.allowed {
        refuse_with(shared, &tcp, &access, "policy_denied", &authz.reason);
        return;
    }
    let mut server = match shared.connect_local(dst).await {
        Ok(s) => s,
        Err(e) => {
            refuse_with(shared, &tcp, &access, "connect_failed", &e);
            return;
        }
    };
    let labels =
        ["source", "destination"].map(|r| TcpLabels::new(r, &access.src, &access.dst, "none"));
    let mut meters = shared.metrics.connection(&labels);
    let result = tunnel::tcp_tcp(
        &mut tcp,
        &mut server,
        &mut meters.to_server,
        &mut meters.to_client,
        shared.cut(),
    )
    .await;
    access.finish(&meters, result);
}

/// As [`refuse`], with the detail in the access log.
fn refuse_with(
    shared: &Shared,
    tcp: &TcpStream,
    access: &Access,
    reason: &'static str,
    detail: &dyn std::fmt::Display,
) {
    let _ = tcp.set_zero_linger();
    shared.metrics.refused(reason);
    access.log(0, 0, &format_args!("{reason}: {detail}"));
}
