//! Prometheus metrics: the agent's own counters, plus a collector that reads the kernel's per-CPU service counters
//! at scrape time (so a scrape always sees the kernel's numbers, with no polling in between).

use std::sync::{Arc, Mutex, atomic::Ordering};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::Gauge,
        info::Info,
    },
    registry::Registry,
};

use crate::{
    datapath::Datapath, identity::CertManager, policy::live::PolicyPlane,
    policy::status::StatusStats, proxy::ProxyMetrics,
};

/// Labels of `sinew_policy_denials_total`: one series per direction, protocol and identity pair.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DenialLabels {
    pub direction: &'static str,
    pub proto: &'static str,
    pub source: String,
    pub destination: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectedLabels {
    pub file: String,
    pub object: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
    port: String,
    proto: &'static str,
    vip: String,
}

/// Makes a string safe as a label value. prometheus-client 0.23 writes label values verbatim, so a `"`, `\` or
/// newline (common in error reasons) would break the whole scrape; they become `'`, `/` and a space.
pub fn label_value(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '"' => '\'',
            '\\' => '/',
            '\n' | '\r' => ' ',
            c => c,
        })
        .collect()
}

/// The agent's metrics, registered into one registry.
pub struct Metrics {
    pub registry: Registry,
    pub reconcile: Family<ResultLabel, Counter>,
    pub source_errors: Counter,
    pub rejected: Family<RejectedLabels, Gauge>,
    pub services: Gauge,
    pub backends: Gauge,
    /// Reported denials (events that reached the agent), by direction, protocol and identities.
    pub policy_denials: Family<DenialLabels, Counter>,
    /// Policy compilations that could not be put in force (the previous one stayed).
    pub policy_errors: Counter,
    pub policy_revision: Gauge,
}

impl Metrics {
    /// `mesh`: the node proxy's metrics (Istio's names, so registered without the `sinew` prefix) and the
    /// certificate manager, when the proxy runs.
    pub fn new(
        node: &str,
        datapath: Arc<Mutex<Datapath>>,
        policy: Arc<Mutex<PolicyPlane>>,
        mesh: Option<(&ProxyMetrics, Arc<CertManager>)>,
        status: Option<Arc<StatusStats>>,
    ) -> Self {
        let mut root = Registry::default();
        if let Some((proxy, certs)) = mesh {
            proxy.register(&mut root);
            root.register_collector(Box::new(CertCollector { certs }));
        }
        if let Some(stats) = status {
            root.register_collector(Box::new(StatusCollector { stats }));
        }
        let registry = root.sub_registry_with_prefix("sinew");
        let info = Info::new(vec![
            ("version".to_string(), env!("CARGO_PKG_VERSION").to_string()),
            ("node".to_string(), node.to_string()),
        ]);
        registry.register("agent", "Agent build and node", info);
        let reconcile = Family::<ResultLabel, Counter>::default();
        registry.register("reconcile", "Reconcile passes by result", reconcile.clone());
        let source_errors = Counter::default();
        registry.register(
            "source_errors",
            "Rejected source files, counted on every load attempt",
            source_errors.clone(),
        );
        let rejected = Family::<RejectedLabels, Gauge>::default();
        registry.register(
            "source_rejected",
            "Source objects rejected right now (their file's last good content stays in force)",
            rejected.clone(),
        );
        let services = Gauge::default();
        registry.register(
            "services",
            "Service frontends in the kernel maps",
            services.clone(),
        );
        let backends = Gauge::default();
        registry.register("backends", "Backends in the kernel maps", backends.clone());
        registry.register_collector(Box::new(KernelCounters { datapath }));
        let policy_denials = Family::<DenialLabels, Counter>::default();
        registry.register(
            "policy_denials",
            "Policy denials reported by the kernel (the unreported rest: policy_events_dropped_total)",
            policy_denials.clone(),
        );
        let policy_errors = Counter::default();
        registry.register(
            "policy_compile_errors",
            "Policies left out of the kernel because the tables could not hold them (counted per sync), and policy sets that could not be applied at all (the previous one stayed)",
            policy_errors.clone(),
        );
        let policy_revision = Gauge::default();
        registry.register(
            "policy_revision",
            "Policy compilations put in force since start",
            policy_revision.clone(),
        );
        registry.register_collector(Box::new(PolicyKernelCounters { policy }));
        Self {
            registry: root,
            reconcile,
            source_errors,
            rejected,
            services,
            backends,
            policy_denials,
            policy_errors,
            policy_revision,
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Reads `svc_counters` for every known service at scrape time.
#[derive(Debug)]
struct KernelCounters {
    datapath: Arc<Mutex<Datapath>>,
}

impl Collector for KernelCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let rows: Vec<(ServiceLabels, u64, u64)> = {
            let dp = self.datapath.lock().unwrap_or_else(|e| e.into_inner());
            dp.service_counters()
                .into_iter()
                .map(|(f, entry, c)| {
                    (
                        ServiceLabels {
                            service: label_value(&format!("{}/{}", entry.namespace, entry.name)),
                            port: f.port.to_string(),
                            proto: crate::ebpf::reconcile::proto_name(
                                crate::ebpf::reconcile::proto_num(f.proto),
                            ),
                            vip: std::net::SocketAddr::new(f.ip, f.port).to_string(),
                        },
                        c.balanced,
                        c.no_backend,
                    )
                })
                .collect()
        };
        for (name, help, pick) in [
            (
                "service_balanced",
                "Connects and UDP sends the kernel sent to a backend",
                0usize,
            ),
            (
                "service_no_backend",
                "Connects and UDP sends the kernel refused because the service had no ready backend",
                1usize,
            ),
        ] {
            let mut family = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (labels, balanced, no_backend) in &rows {
                let v = if pick == 0 { *balanced } else { *no_backend };
                ConstCounter::new(v).encode(family.encode_family(labels)?)?;
            }
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabels {
    direction: &'static str,
    verdict: &'static str,
}

/// Reads `pol_counters` at scrape time: exact kernel verdict counts, whatever the event rate limit dropped.
#[derive(Debug)]
struct PolicyKernelCounters {
    policy: Arc<Mutex<PolicyPlane>>,
}

impl std::fmt::Debug for PolicyPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyPlane")
            .field("revision", &self.revision)
            .finish()
    }
}

impl Collector for PolicyKernelCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (c, (accel, sockets), sockmap) = {
            let plane = self.policy.lock().unwrap_or_else(|e| e.into_inner());
            (plane.counters(), plane.accel(), plane.settings().sockmap)
        };
        let mut family = encoder.encode_descriptor(
            "policy_kernel_verdicts",
            "Connections the kernel judged under policy (egress: at connect; ingress: first packet)",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (direction, verdict, v) in [
            ("egress", "deny", c.denied_egress),
            ("ingress", "deny", c.denied_ingress),
            ("egress", "allow", c.allowed_egress),
            ("ingress", "allow", c.allowed_ingress),
        ] {
            ConstCounter::new(v)
                .encode(family.encode_family(&VerdictLabels { direction, verdict })?)?;
        }
        for (name, help, v) in [
            (
                "policy_events_dropped",
                "Denial/audit events not reported: over the rate limit or the ring buffer was full",
                c.events_dropped,
            ),
            (
                "policy_events_sent",
                "Denial/audit events the kernel reported",
                c.events_sent,
            ),
            (
                "policy_audited",
                "Connections an AUDIT policy matched",
                c.audited,
            ),
            (
                "policy_udp_flow_hits",
                "UDP datagrams passed by the flow cache without a policy lookup",
                c.udp_flow_hits,
            ),
            (
                "policy_udp_replies",
                "UDP sends let through the client-side check as answers to an accepted datagram",
                c.udp_replies,
            ),
            (
                "mtls_strict_denied",
                "Plaintext TCP connections refused because the port is STRICT (client side: EACCES; server side: SYN dropped)",
                c.strict_denied,
            ),
            (
                "proxy_redirected",
                "Connections the kernel redirected to the node proxy at connect()",
                c.proxy_redirected,
            ),
            (
                "proxy_kernel_ingress",
                "Connections from the node proxy to enrolled workloads, passed by the kernel without a policy lookup",
                c.proxy_ingress,
            ),
            (
                "proxy_kernel_refused",
                "Workload connects to the node proxy's own address, refused by the kernel",
                c.proxy_refused,
            ),
            (
                "sockmap_inserts",
                "Sockets added to sk_conns for same-node acceleration (two per connection)",
                accel.inserts,
            ),
            (
                "sockmap_redirects",
                "Sends handed straight to the peer socket by the accel sk_msg program",
                accel.redirects,
            ),
            (
                "sockmap_misses",
                "Sends of accelerated sockets that went through the TCP/IP stack (no peer socket in sk_conns)",
                accel.misses,
            ),
            (
                "sockmap_redirected_bytes",
                "Bytes handed straight to the peer socket",
                accel.redirected_bytes,
            ),
            (
                "sockmap_insert_errors",
                "Eligible sockets the kernel refused to add to sk_conns",
                accel.insert_errors,
            ),
        ] {
            encode_counter(&mut encoder, name, help, v)?;
        }
        for (name, help, v) in [
            (
                "sockmap_enabled",
                "1 when new same-node connections are accelerated (--sockmap)",
                i64::from(sockmap),
            ),
            (
                "sockmap_sockets",
                "Sockets in sk_conns now (two per accelerated connection)",
                sockets as i64,
            ),
        ] {
            let family = encoder.encode_descriptor(
                name,
                help,
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            prometheus_client::metrics::gauge::ConstGauge::new(v).encode(family)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::label_value;

    #[test]
    fn label_values_never_break_the_exposition() {
        assert_eq!(
            label_value("spec.clusterIP: \"10.96.0.999\" is\nnot \\ an IP"),
            "spec.clusterIP: '10.96.0.999' is not / an IP"
        );
    }
}

/// The certificate manager's counters and each certificate's expiry, read at scrape time.
struct CertCollector {
    certs: Arc<CertManager>,
}

impl std::fmt::Debug for CertCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CertCollector")
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CertLabels {
    role: String,
    spiffe_id: String,
}

impl Collector for CertCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let c = self.certs.counters().get();
        for (name, help, v) in [
            (
                "sinew_svid_issued",
                "SVIDs issued for an identity not held before",
                c.issued,
            ),
            (
                "sinew_svid_renewed",
                "SVIDs replaced by renewal at half-life",
                c.renewed,
            ),
            (
                "sinew_svid_renewal_failures",
                "Renewals that failed (the old SVID stays)",
                c.renewal_failures,
            ),
            (
                "sinew_svid_issuance_failures",
                "First issuances that failed",
                c.issuance_failures,
            ),
        ] {
            encode_counter(&mut encoder, name, help, v)?;
        }
        let mut family = encoder.encode_descriptor(
            "sinew_certificate_expires_in_seconds",
            "Seconds until each held certificate (CA, proxy, workload SVIDs) expires",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for cert in self.certs.certificates() {
            let labels = CertLabels {
                role: format!("{:?}", cert.role).to_lowercase(),
                spiffe_id: label_value(&cert.spiffe_id),
            };
            prometheus_client::metrics::gauge::ConstGauge::new(cert.expires_in_secs)
                .encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// The policy status writer's counters (kubernetes source), read at scrape time.
#[derive(Debug)]
struct StatusCollector {
    stats: Arc<StatusStats>,
}

impl Collector for StatusCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.stats;
        for (name, help, v) in [
            (
                "sinew_policy_status_writes",
                "AuthorizationPolicy status patches written by this agent while it held the Lease",
                &s.writes,
            ),
            (
                "sinew_policy_status_skipped",
                "Status checks that found the status already as it should be (no write)",
                &s.skipped,
            ),
            (
                "sinew_policy_status_errors",
                "Failed status patches and Lease reads or writes",
                &s.errors,
            ),
        ] {
            encode_counter(&mut encoder, name, help, v.load(Ordering::Relaxed))?;
        }
        let family = encoder.encode_descriptor(
            "sinew_policy_status_leader",
            "1 while this agent holds the Lease and writes policy status",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        prometheus_client::metrics::gauge::ConstGauge::new(i64::from(
            s.leader.load(Ordering::Relaxed),
        ))
        .encode(family)
    }
}

/// One unlabelled counter read at scrape time.
fn encode_counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let family = encoder.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Counter,
    )?;
    ConstCounter::new(value).encode(family)
}
