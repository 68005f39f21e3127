//! The admin listener (default 127.0.0.1:15020): `/healthz`, `/readyz`, `/metrics` and `/debug/services`.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode, body::Incoming, server::conn::http1, service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{debug, info};

use crate::{datapath::Datapath, ebpf::inspect, metrics::Metrics};

/// What the admin endpoints read.
pub struct AdminState {
    /// True once the programs are attached and the first sync is in the maps.
    pub ready: AtomicBool,
    pub metrics: Metrics,
    pub datapath: Arc<Mutex<Datapath>>,
}

/// Binds the listener now (so a port clash fails start-up clearly) and serves it in the background.
pub async fn serve(addr: SocketAddr, state: Arc<AdminState>) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("admin-addr {addr}: {e}"))?;
    info!(%addr, "admin listening");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let state = state.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(route(&state, &req)) }
                });
                if let Err(e) = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await
                {
                    debug!(error = %e, "admin connection");
                }
            });
        }
    });
    Ok(())
}

fn text(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body.into()))
        .expect("static response parts are valid")
}

fn route(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, PLAIN, "GET only\n");
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, PLAIN, "ok\n"),
        "/readyz" => {
            if state.ready.load(Ordering::Acquire) {
                text(StatusCode::OK, PLAIN, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, PLAIN, "not ready\n")
            }
        }
        "/metrics" => text(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            state.metrics.encode(),
        ),
        "/debug/services" => {
            let dump = {
                let dp = state.datapath.lock().unwrap_or_else(|e| e.into_inner());
                let r = dp.reconciler();
                inspect::dump_services(&r.maps, |id| {
                    let c = r.counters(id);
                    (c.balanced, c.no_backend)
                })
            };
            let body = serde_json::to_string_pretty(&dump).unwrap_or_default();
            text(StatusCode::OK, "application/json", body)
        }
        _ => text(
            StatusCode::NOT_FOUND,
            PLAIN,
            "not found; try /healthz /readyz /metrics /debug/services\n",
        ),
    }
}
