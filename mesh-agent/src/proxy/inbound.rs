//! The tunnel listener (15008): HBONE from other nodes' proxies.
//!
//! Per TCP connection: TLS 1.3 with a mandatory client SVID (the source workload's), then HTTP/2 with our
//! `max_concurrent_streams`. Per `CONNECT` stream, in its own task: the authority must be a workload on this node;
//! the authenticated identity (from the certificate, never from a header) and the source IP (from `forwarded`) go to
//! authorization; then connect to the workload from the proxy's source address, answer 200 and copy.
//!
//! Answers: 200 connected; 400 authority not `ip:port`; 403 denied by policy; 404 not a workload on this node;
//! 405 not `CONNECT`; 503 over the connection limit or the workload refused the connection.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::header::FORWARDED;
use http::{Method, Request, Response, StatusCode};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use super::metrics::{Access, Peer};
use super::{Shared, Slot, identity_of, leaving, tls_reason, tunnel};
use crate::identity::{SpiffeId, peer_spiffe_id};

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
                    tracing::warn!(error = %e, "inbound accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        tokio::spawn(serve_connection(shared.clone(), tcp, peer));
    }
}

/// One tunnel connection: TLS, then HTTP/2 until the peer closes it, or it breaks, or the drain's GOAWAY took
/// effect.
async fn serve_connection(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr) {
    let _ = tcp.set_nodelay(true);
    let tls = match shared.env.server_tls() {
        Ok(cfg) => super::with_h2_alpn_server(cfg),
        Err(e) => {
            tracing::warn!(error = %e, "inbound: no TLS server config; closing the tunnel connection");
            return;
        }
    };
    let timeout = shared.cfg.connect_timeout;
    let tls = match tokio::time::timeout(timeout, TlsAcceptor::from(tls).accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            let reason = tls_reason(&e);
            shared.metrics.tls_rejected("inbound", reason);
            tracing::debug!(%peer, reason, error = %e, "inbound TLS handshake failed");
            return;
        }
        Err(_) => {
            shared.metrics.tls_rejected("inbound", "handshake");
            tracing::debug!(%peer, "inbound TLS handshake timed out");
            return;
        }
    };
    // The verifier has already checked the chain and the ID; this only reads it back.
    let id = match peer_spiffe_id(tls.get_ref().1) {
        Ok(id) => Arc::new(id),
        Err(rejection) => {
            shared.metrics.tls_rejected("inbound", rejection.reason());
            return;
        }
    };
    let handshake = h2::server::Builder::new()
        .initial_window_size(tunnel::STREAM_WINDOW)
        .initial_connection_window_size(tunnel::CONNECTION_WINDOW)
        .max_concurrent_streams(shared.cfg.max_streams_per_tunnel)
        .handshake::<_, Bytes>(tls);
    let mut conn = match tokio::time::timeout(timeout, handshake).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "inbound HTTP/2 handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "inbound HTTP/2 handshake timed out");
            return;
        }
    };
    let mut phase = shared.phase.subscribe();
    let mut draining = false;
    loop {
        tokio::select! {
            next = conn.accept() => match next {
                Some(Ok((request, respond))) => stream(&shared, &id, peer, request, respond),
                Some(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "tunnel connection ended with an error");
                    break;
                }
                None => break,
            },
            // GOAWAY: the peer opens no new stream here and takes a new connection elsewhere; ours carry on.
            () = leaving(&mut phase), if !draining => {
                conn.graceful_shutdown();
                draining = true;
            }
        }
    }
}

/// Sorts out what needs no I/O, then hands the stream to its own task.
fn stream(
    shared: &Arc<Shared>,
    id: &Arc<SpiffeId>,
    peer: SocketAddr,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    if request.method() != Method::CONNECT {
        // Not an app connection: nothing to count or log beyond the answer.
        answer(&mut respond, StatusCode::METHOD_NOT_ALLOWED);
        return;
    }
    let Some(slot) = shared.slot() else {
        shared.metrics.refused("stream_limit");
        let (access, _) = access_of(shared, id, peer, &request);
        access.log(0, 0, &"stream_limit");
        answer(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
        return;
    };
    tokio::spawn(serve_stream(
        shared.clone(),
        slot,
        id.clone(),
        peer,
        request,
        respond,
    ));
}

/// The access record of a stream, and the source IP: `forwarded: for=` (the original client, as the source node's
/// proxy saw it), else the tunnel peer's IP.
fn access_of(
    shared: &Shared,
    id: &SpiffeId,
    peer: SocketAddr,
    request: &Request<RecvStream>,
) -> (Access, IpAddr) {
    let src_ip = request
        .headers()
        .get(FORWARDED)
        .and_then(|v| v.to_str().ok())
        .and_then(tunnel::parse_forwarded_for)
        .unwrap_or(peer.ip());
    // The workload name for metrics comes from the IP, but only if that workload runs as the authenticated
    // identity: a header must not be able to relabel traffic.
    let workload = shared
        .env
        .destination(src_ip)
        .map(|d| d.workload)
        .filter(|w| w.namespace == id.namespace() && w.service_account == id.service_account())
        .map_or_else(|| "unknown".to_string(), |w| w.workload);
    let access = Access {
        direction: "inbound",
        src_addr: src_ip.to_string(),
        src: Peer {
            workload,
            namespace: id.namespace().to_string(),
            principal: id.uri(),
        },
        dst_addr: request
            .uri()
            .authority()
            .map_or(String::new(), |a| a.to_string()),
        dst: Peer::unknown(),
        tunnel: peer.to_string(),
        security: "mutual_tls",
        start: Instant::now(),
    };
    (access, src_ip)
}

/// One `CONNECT` stream, start to end.
async fn serve_stream(
    shared: Arc<Shared>,
    _slot: Slot,
    id: Arc<SpiffeId>,
    peer: SocketAddr,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    let (mut access, src_ip) = access_of(&shared, &id, peer, &request);
    let refuse = |respond: &mut SendResponse<Bytes>,
                  access: &Access,
                  status: StatusCode,
                  reason: &'static str,
                  detail: &dyn std::fmt::Display| {
        answer(respond, status);
        shared.metrics.refused(reason);
        access.log(0, 0, &format_args!("{reason}: {detail}"));
    };
    let Some(dst) = request
        .uri()
        .authority()
        .and_then(|a| tunnel::parse_authority(a.as_str()))
    else {
        refuse(
            &mut respond,
            &access,
            StatusCode::BAD_REQUEST,
            "bad_authority",
            &"the authority is not ip:port",
        );
        return;
    };
    let td = shared.env.trust_domain().to_string();
    let dest = match shared.env.destination(dst.ip()) {
        Some(d) if d.local => d,
        other => {
            let detail = if other.is_some() {
                "the workload runs on another node"
            } else {
                "not an enrolled workload"
            };
            refuse(
                &mut respond,
                &access,
                StatusCode::NOT_FOUND,
                "not_local",
                &detail,
            );
            return;
        }
    };
    access.dst = Peer::of(&dest.workload, &td);
    let authz = shared.env.authorize(&identity_of(&id), src_ip, dst);
    if !authz.allowed {
        refuse(
            &mut respond,
            &access,
            StatusCode::FORBIDDEN,
            "policy_denied",
            &authz.reason,
        );
        return;
    }
    let mut server = match shared.connect_local(dst).await {
        Ok(s) => s,
        Err(e) => {
            refuse(
                &mut respond,
                &access,
                StatusCode::SERVICE_UNAVAILABLE,
                "connect_failed",
                &e,
            );
            return;
        }
    };
    let mut send = match respond.send_response(Response::new(()), false) {
        Ok(send) => send,
        Err(e) => {
            // The peer reset the stream while we connected.
            let _ = server.set_zero_linger();
            access.log(0, 0, &format_args!("tunnel stream: {e}"));
            return;
        }
    };
    let mut recv = request.into_body();
    tunnel::carry(
        &shared,
        &mut server,
        tunnel::TcpEnd::Server,
        &mut send,
        &mut recv,
        &access,
    )
    .await;
}

/// Answers a stream with `status` and no body.
fn answer(respond: &mut SendResponse<Bytes>, status: StatusCode) {
    let mut response = Response::new(());
    *response.status_mut() = status;
    // Fails only if the peer already reset the stream: nothing left to tell.
    let _ = respond.send_response(response, true);
}
