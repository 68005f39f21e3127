//! The proxy's metrics: Istio's standard TCP metrics (so existing dashboards work) and the proxy's own
//! `sinew_proxy_*` counters.
//!
//! Per-connection counters are resolved once when the connection is established (`ProxyMetrics::connection`), so
//! counting bytes as they flow is an atomic add, not a label-set lookup per chunk.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::metrics::label_value;

/// The labels of the `istio_tcp_*` metrics, as Istio names them.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    /// "source" on the outbound side, "destination" on the inbound side (a same-node connection counts both).
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    /// `spiffe://<td>/ns/<ns>/sa/<sa>`.
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    /// "mutual_tls" through the tunnel, "none" on the same node.
    pub connection_security_policy: &'static str,
    pub request_protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TlsLabels {
    pub side: &'static str,
    pub reason: &'static str,
}

/// The proxy's metrics. Cheap to clone (one `Arc`); register once with [`ProxyMetrics::register`].
#[derive(Clone, Debug, Default)]
pub struct ProxyMetrics(Arc<Inner>);

#[derive(Debug, Default)]
struct Inner {
    opened: Family<TcpLabels, Counter>,
    closed: Family<TcpLabels, Counter>,
    sent: Family<TcpLabels, Counter>,
    received: Family<TcpLabels, Counter>,
    refused: Family<ReasonLabel, Counter>,
    tls_rejections: Family<TlsLabels, Counter>,
    handshakes: Counter,
    active: Gauge,
}

/// One established connection's counters, for every reporter that counts it. Counts `closed` when dropped, so an
/// aborted connection is closed too.
pub(crate) struct ConnMeters {
    closed: Vec<Counter>,
    /// Client to server (`istio_tcp_received_bytes_total`).
    pub(crate) to_server: Meter,
    /// Server to client (`istio_tcp_sent_bytes_total`).
    pub(crate) to_client: Meter,
}

/// Bytes in one direction: the running total (for the access log) and the counters bumped as they flow.
pub(crate) struct Meter {
    counters: Vec<Counter>,
    pub(crate) total: u64,
}

impl ProxyMetrics {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers every metric under its full name (`istio_tcp_*`, `sinew_proxy_*`). Use a registry without a prefix:
    /// a prefixed one would rename the Istio metrics. prometheus-client appends `_total` to counters.
    pub fn register(&self, registry: &mut Registry) {
        let m = &self.0;
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections the node proxy established",
            m.opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections the node proxy closed (after being established)",
            m.closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent from the server to the client",
            m.sent.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received from the client for the server",
            m.received.clone(),
        );
        registry.register(
            "sinew_proxy_refused",
            "App connections the node proxy refused or could not carry, by reason",
            m.refused.clone(),
        );
        registry.register(
            "sinew_proxy_tls_rejections",
            "Failed tunnel TLS handshakes, by side and reason",
            m.tls_rejections.clone(),
        );
        registry.register(
            "sinew_proxy_tunnel_handshakes",
            "TLS handshakes started by the outbound side for new tunnel connections",
            m.handshakes.clone(),
        );
        registry.register(
            "sinew_proxy_active_connections",
            "App connections open now (outbound connections plus inbound streams)",
            m.active.clone(),
        );
    }

    pub(crate) fn refused(&self, reason: &'static str) {
        self.0.refused.get_or_create(&ReasonLabel { reason }).inc();
    }

    pub(crate) fn tls_rejected(&self, side: &'static str, reason: &'static str) {
        self.0
            .tls_rejections
            .get_or_create(&TlsLabels { side, reason })
            .inc();
    }

    pub(crate) fn handshake(&self) {
        self.0.handshakes.inc();
    }

    pub(crate) fn active_connections(&self) -> &Gauge {
        &self.0.active
    }

    /// Counts an established connection as opened for each label set (one per reporter) and returns its counters.
    pub(crate) fn connection(&self, reporters: &[TcpLabels]) -> ConnMeters {
        let m = &self.0;
        let get = |f: &Family<TcpLabels, Counter>| -> Vec<Counter> {
            reporters
                .iter()
                .map(|l| f.get_or_create(l).clone())
                .collect()
        };
        for c in get(&m.opened) {
            c.inc();
        }
        ConnMeters {
            closed: get(&m.closed),
            to_server: Meter {
                counters: get(&m.received),
                total: 0,
            },
            to_client: Meter {
                counters: get(&m.sent),
                total: 0,
            },
        }
    }
}

impl Drop for ConnMeters {
    fn drop(&mut self) {
        for c in &self.closed {
            c.inc();
        }
    }
}

impl Meter {
    pub(crate) fn add(&mut self, n: usize) {
        self.total += n as u64;
        for c in &self.counters {
            c.inc_by(n as u64);
        }
    }
}

impl TcpLabels {
    /// Labels with the label values made safe for the exposition.
    pub(crate) fn new(
        reporter: &'static str,
        source: &Peer,
        destination: &Peer,
        connection_security_policy: &'static str,
    ) -> Self {
        TcpLabels {
            reporter,
            source_workload: label_value(&source.workload),
            source_workload_namespace: label_value(&source.namespace),
            source_principal: label_value(&source.principal),
            destination_workload: label_value(&destination.workload),
            destination_workload_namespace: label_value(&destination.namespace),
            destination_principal: label_value(&destination.principal),
            connection_security_policy,
            request_protocol: "tcp",
        }
    }
}

/// One end of a proxied connection as metrics and the access log name it.
#[derive(Clone, Debug)]
pub(crate) struct Peer {
    /// The app name, or "unknown".
    pub(crate) workload: String,
    pub(crate) namespace: String,
    /// `spiffe://…`, or "unknown".
    pub(crate) principal: String,
}

/// One app connection's access log record, written once when it ends (proxied, refused or failed).
pub(crate) struct Access {
    /// "outbound" or "inbound".
    pub(crate) direction: &'static str,
    /// `ip:port` outbound; inbound only the IP is known (from `forwarded`).
    pub(crate) src_addr: String,
    pub(crate) src: Peer,
    pub(crate) dst_addr: String,
    pub(crate) dst: Peer,
    /// The other node proxy: where the tunnel goes (outbound) or comes from (inbound). Empty on the same node.
    pub(crate) tunnel: String,
    /// "mutual_tls" or "none".
    pub(crate) security: &'static str,
    pub(crate) start: std::time::Instant,
}

impl Access {
    /// Writes the record. `sent`: server to client bytes; `received`: client to server (as Istio counts them).
    pub(crate) fn log(&self, sent: u64, received: u64, result: &dyn std::fmt::Display) {
        tracing::info!(
            target: "sinew::access",
            direction = self.direction,
            src_addr = %self.src_addr,
            src_workload = %self.src.workload,
            src_namespace = %self.src.namespace,
            src_principal = %self.src.principal,
            dst_addr = %self.dst_addr,
            dst_workload = %self.dst.workload,
            dst_namespace = %self.dst.namespace,
            dst_principal = %self.dst.principal,
            tunnel = %self.tunnel,
            security = self.security,
            bytes_sent = sent,
            bytes_received = received,
            duration_ms = self.start.elapsed().as_millis() as u64,
            result = %result,
            "connection closed"
        );
    }
}

impl Access {
    /// The record of a connection that was established, with its byte counts and how the copy ended.
    pub(crate) fn finish(&self, meters: &ConnMeters, result: Result<(), super::tunnel::CopyError>) {
        let (sent, received) = (meters.to_client.total, meters.to_server.total);
        match result {
            Ok(()) => self.log(sent, received, &"ok"),
            Err(e) => self.log(sent, received, &e),
        }
    }
}

impl Peer {
    /// A workload's labels: its app name, namespace and the SPIFFE ID of its service account in `trust_domain`.
    pub(crate) fn of(w: &super::Workload, trust_domain: &str) -> Peer {
        Peer {
            workload: w.workload.clone(),
            namespace: w.namespace.clone(),
            principal: format!(
                "spiffe://{trust_domain}/ns/{}/sa/{}",
                w.namespace, w.service_account
            ),
        }
    }

    /// Nothing known yet.
    pub(crate) fn unknown() -> Peer {
        Peer {
            workload: "unknown".into(),
            namespace: "unknown".into(),
            principal: "unknown".into(),
        }
    }
}
