//! The admin listener (default 127.0.0.1:15020): `/healthz`, `/readyz`, `/metrics`, `/debug/services`,
//! `/debug/policies`, `/debug/policy/check` and `/debug/flows`.

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

use crate::{datapath::Datapath, ebpf::inspect, metrics::Metrics, policy::live::PolicyPlane};

/// What the admin endpoints read.
pub struct AdminState {
    /// True once the programs are attached and the first sync is in the maps.
    pub ready: AtomicBool,
    pub metrics: Metrics,
    pub datapath: Arc<Mutex<Datapath>>,
    pub policy: Arc<Mutex<PolicyPlane>>,
    /// The certificate manager, when the node proxy runs.
    pub certs: Option<Arc<crate::identity::CertManager>>,
}

/// SO_REUSEPORT: during a rolling update the agent that handed the node over keeps answering (`/healthz` ok,
/// `/readyz` not ready) until it is stopped, next to the new one, so neither is restarted by its liveness probe.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(128)
}

/// Binds the listener now (so a port clash fails start-up clearly) and serves it in the background.
pub async fn serve(addr: SocketAddr, state: Arc<AdminState>) -> anyhow::Result<()> {
    let listener = listen(addr).map_err(|e| anyhow::anyhow!("admin-addr {addr}: {e}"))?;
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

fn json(status: StatusCode, value: &impl serde::Serialize) -> Response<Full<Bytes>> {
    let body = serde_json::to_string_pretty(value).unwrap_or_default();
    text(status, "application/json", body)
}

/// The query string's `key=value` pairs, percent-decoded (`%2F` and `+` included).
fn query(req: &Request<Incoming>) -> Vec<(String, String)> {
    parse_query(req.uri().query().unwrap_or(""))
}

fn parse_query(q: &str) -> Vec<(String, String)> {
    let decode = |s: &str| -> String {
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            match (bytes[i], hex) {
                (b'+', _) => out.push(b' '),
                (b'%', Some(b)) => {
                    out.push(b);
                    i += 2;
                }
                (b, _) => out.push(b),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    q.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (decode(k), decode(v))
        })
        .collect()
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
        "/debug/certs" => match &state.certs {
            Some(c) => json(StatusCode::OK, &c.certificates()),
            None => text(
                StatusCode::NOT_FOUND,
                PLAIN,
                "the node proxy is off (--proxy=false): no certificates\n",
            ),
        },
        "/debug/policies" => {
            let status = state
                .policy
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .status();
            json(StatusCode::OK, &status)
        }
        "/debug/policy/check" => {
            let q = query(req);
            let get = |k: &str| q.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
            let port = get("port").map(str::parse::<u16>);
            let result = match (get("from"), get("to"), port, get("proto").unwrap_or("tcp")) {
                (Some(from), Some(to), Some(Ok(port)), proto @ ("tcp" | "udp")) if port != 0 => {
                    state
                        .policy
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .check(from, to, port, proto == "udp")
                }
                _ => Err(
                    "expected ?from=<ns/sa or ip>&to=<ns/pod>&port=<1-65535>[&proto=tcp|udp]"
                        .into(),
                ),
            };
            match result {
                Ok(r) => json(StatusCode::OK, &r),
                Err(e) => json(StatusCode::BAD_REQUEST, &serde_json::json!({ "error": e })),
            }
        }
        "/debug/flows" => {
            let q = query(req);
            let since = q
                .iter()
                .find(|(n, _)| n == "since")
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(0);
            let (flows, next) = state
                .policy
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .flows_since(since);
            json(
                StatusCode::OK,
                &serde_json::json!({ "next": next, "flows": flows }),
            )
        }
        _ => text(
            StatusCode::NOT_FOUND,
            PLAIN,
            "not found; try /healthz /readyz /metrics /debug/services /debug/policies /debug/policy/check /debug/flows\n",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_query;

    #[test]
    fn query_strings_are_decoded() {
        let q = parse_query("from=prod%2Fweb&to=dev/cli&port=8080&x=a+b&bad=%zz&empty=&flag");
        let get = |k: &str| q.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("from"), Some("prod/web"));
        assert_eq!(get("to"), Some("dev/cli"));
        assert_eq!(get("port"), Some("8080"));
        assert_eq!(get("x"), Some("a b"));
        assert_eq!(get("bad"), Some("%zz"));
        assert_eq!(get("empty"), Some(""));
        assert_eq!(get("flag"), Some(""));
        assert_eq!(parse_query("a=%4"), vec![("a".into(), "%4".into())]);
    }
}
