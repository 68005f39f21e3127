//! The agent's configuration: one typed tree, built from `--config FILE` (YAML) overlaid with command-line flags,
//! validated in one place. Every error names the field it is about.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use clap::Args;
use serde::{Deserialize, Serialize};

/// The effective configuration of `mesh-agent run`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Config {
    pub node: String,
    /// Where the objects come from: a directory of YAML, or the Kubernetes API (the default).
    pub source: SourceSettings,
    pub cgroup_root: PathBuf,
    pub bpffs_root: PathBuf,
    pub admin_addr: SocketAddr,
    pub log_format: LogFormat,
    /// A policy in this namespace applies to every namespace.
    pub mesh_root_namespace: String,
    /// SPIFFE trust domain of workload identities.
    pub trust_domain: String,
    /// Denial events each CPU may report per second; the rest are counted as dropped.
    pub policy_events_per_sec: u32,
    /// The node proxy (issue 4); `None`: off (nothing is redirected, STRICT ports take no one).
    pub proxy: Option<ProxySettings>,
    /// Where the CA is loaded from (`ca.crt`, `ca.key`). `None`: generated into (or reloaded from) `state-dir`.
    pub ca_dir: Option<PathBuf>,
    /// The agent's own files (a generated CA).
    pub state_dir: PathBuf,
    /// Lifetime of the workload certificates (renewed at half-life).
    pub svid_lifetime: Duration,
    /// Same-node socket acceleration (sockops + sk_msg).
    pub sockmap: crate::ebpf::accel::SockmapSettings,
}

/// The source of Kubernetes objects.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SourceSettings {
    /// `--source-dir`: a directory of YAML stands in for the API server (one machine, tests, the demo).
    Dir(PathBuf),
    /// The API server, through kube-rs watchers.
    Kubernetes(KubeSettings),
}

impl SourceSettings {
    /// The file source's directory, if that is the source.
    pub fn dir(&self) -> Option<&Path> {
        match self {
            SourceSettings::Dir(d) => Some(d),
            SourceSettings::Kubernetes(_) => None,
        }
    }
}

/// The kubernetes source's settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct KubeSettings {
    /// A kubeconfig file; `None`: `KUBECONFIG`, then `~/.kube/config`, then the in-cluster service account.
    pub kubeconfig: Option<PathBuf>,
    /// The host's `/proc` as the agent sees it: where a pod process's `ns/net` is opened.
    pub proc_root: PathBuf,
    /// Whether this agent takes part in the election of the one that writes AuthorizationPolicy status.
    pub policy_status: bool,
    /// The status writers' Lease: namespace, name, and this agent's identity in it (its pod name).
    pub lease_namespace: String,
    pub lease_name: String,
    pub lease_holder: String,
}

/// The node proxy's settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ProxySettings {
    /// The proxy's link-local address: the redirect target, and the source of its connections to local
    /// workloads (the kernel knows it as the node proxy).
    pub addr: Ipv4Addr,
    /// The same for IPv6; `None`: IPv6 connections are not redirected.
    pub addr6: Option<Ipv6Addr>,
    pub outbound_port: u16,
    /// The HBONE tunnel port on every node.
    pub inbound_port: u16,
    pub max_connections: usize,
    pub max_streams: u32,
    pub drain_timeout: Duration,
    /// The proxy's own service account (in the mesh root namespace): its SPIFFE ID is what tunnel clients expect.
    pub service_account: String,
    /// The network namespace the proxy listens in (its address goes on that namespace's `lo`); `None`: the
    /// agent's own (a hostNetwork DaemonSet: the node's). Several simulated nodes on one machine use this.
    pub netns: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

pub const DEFAULT_CGROUP_ROOT: &str = "/sys/fs/cgroup";
pub const DEFAULT_BPFFS_ROOT: &str = "/sys/fs/bpf/sinew";
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:15020";
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
pub const DEFAULT_POLICY_EVENTS_PER_SEC: u32 = 200;
pub const DEFAULT_PROXY_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 7, 1);
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;
pub const DEFAULT_INBOUND_PORT: u16 = 15008;
pub const DEFAULT_PROXY_MAX_CONNECTIONS: usize = 16384;
pub const DEFAULT_PROXY_MAX_STREAMS: u32 = 100;
pub const DEFAULT_DRAIN_TIMEOUT: &str = "10s";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/sinew";
pub const DEFAULT_PROC_ROOT: &str = "/proc";
pub const DEFAULT_LEASE_NAME: &str = "sinew-policy-status";
pub const DEFAULT_SVID_LIFETIME: &str = "24h";
pub const DEFAULT_PROXY_SERVICE_ACCOUNT: &str = "sinew-agent";

/// Flags of `mesh-agent run`. Every one is optional here so that the config file can supply it.
#[derive(Args, Debug, Default, Clone)]
pub struct RunArgs {
    /// YAML file with the same keys as these flags (node, source-dir, cgroup-root, ...). Flags win.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// This node's name (as in a Pod's spec.nodeName). Default: the hostname.
    #[arg(long)]
    pub node: Option<String>,
    /// Directory of Kubernetes YAML (Service, EndpointSlice, Pod) to watch: the file source.
    #[arg(long, value_name = "DIR")]
    pub source_dir: Option<PathBuf>,
    /// cgroup v2 directory the programs attach at (default /sys/fs/cgroup).
    #[arg(long, value_name = "PATH")]
    pub cgroup_root: Option<PathBuf>,
    /// Directory on bpffs where maps and links are pinned (default /sys/fs/bpf/sinew).
    #[arg(long, value_name = "PATH")]
    pub bpffs_root: Option<PathBuf>,
    /// Admin listener: /healthz, /readyz, /metrics (default 127.0.0.1:15020).
    #[arg(long, value_name = "ADDR")]
    pub admin_addr: Option<String>,
    /// Log format.
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Namespace whose AuthorizationPolicies apply mesh-wide (default sinew-system).
    #[arg(long, value_name = "NAMESPACE")]
    pub mesh_root_namespace: Option<String>,
    /// SPIFFE trust domain (default cluster.local).
    #[arg(long, value_name = "DOMAIN")]
    pub trust_domain: Option<String>,
    /// Policy denial events each CPU may report per second; more are counted, not reported (default 200).
    #[arg(long, value_name = "N")]
    pub policy_events_per_sec: Option<u32>,
    /// Run the node proxy and redirect enrolled workloads' connections to it (default true).
    #[arg(long, value_name = "BOOL")]
    pub proxy: Option<bool>,
    /// The proxy's link-local IPv4 address, added to `lo` (default 169.254.7.1).
    #[arg(long, value_name = "IP")]
    pub proxy_addr: Option<Ipv4Addr>,
    /// The proxy's IPv6 address, added to `lo`; without it IPv6 connections are not redirected.
    #[arg(long, value_name = "IP")]
    pub proxy_addr6: Option<Ipv6Addr>,
    /// Port redirected connections go to (default 15001).
    #[arg(long, value_name = "PORT")]
    pub proxy_outbound_port: Option<u16>,
    /// HBONE tunnel port, the same on every node (default 15008).
    #[arg(long, value_name = "PORT")]
    pub proxy_inbound_port: Option<u16>,
    /// Connections the proxy handles at once; more are refused and counted (default 16384).
    #[arg(long, value_name = "N")]
    pub proxy_max_connections: Option<usize>,
    /// Streams per tunnel connection (default 100); the pool opens another connection beyond.
    #[arg(long, value_name = "N")]
    pub proxy_max_streams: Option<u32>,
    /// On SIGTERM, how long open connections may finish (default 10s).
    #[arg(long, value_name = "DURATION")]
    pub proxy_drain_timeout: Option<String>,
    /// The proxy's service account in the mesh root namespace (default sinew-agent).
    #[arg(long, value_name = "NAME")]
    pub proxy_service_account: Option<String>,
    /// Network namespace (a path such as /var/run/netns/node1) the proxy runs in. Default: the agent's own.
    #[arg(long, value_name = "PATH")]
    pub proxy_netns: Option<PathBuf>,
    /// Directory with the CA (`ca.crt`, `ca.key`). Default: generate one into --state-dir.
    #[arg(long, value_name = "DIR")]
    pub ca_dir: Option<PathBuf>,
    /// The agent's state directory (default /var/lib/sinew).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Workload certificate lifetime, e.g. 24h, 90m (default 24h; renewed at half-life).
    #[arg(long, value_name = "DURATION")]
    pub svid_lifetime: Option<String>,
    /// Kubernetes source: a kubeconfig file (default: KUBECONFIG, ~/.kube/config, then in-cluster).
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// The host's /proc, where pod processes' network namespaces are opened (default /proc).
    #[arg(long, value_name = "PATH")]
    pub proc_root: Option<PathBuf>,
    /// Same-node socket acceleration: hand the bytes of TCP connections between two pods of this node straight
    /// from socket to socket (sockops + sk_msg) where policy needs no proxy (default false; docs/performance.md).
    #[arg(long, value_name = "BOOL")]
    pub sockmap: Option<bool>,
    /// With --sockmap: also attach the pass-everything stream verdict program that works around lost epoll
    /// wakeups on Linux 6.18.14+ (default true; docs/performance.md).
    #[arg(long, value_name = "BOOL")]
    pub sockmap_stream_verdict: Option<bool>,
    /// Kubernetes source: take part in electing the agent that writes AuthorizationPolicy status (default true).
    #[arg(long, value_name = "BOOL")]
    pub policy_status: Option<bool>,
    /// Namespace of the status writers' Lease (default: the mesh root namespace).
    #[arg(long, value_name = "NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// Name of the status writers' Lease (default sinew-policy-status).
    #[arg(long, value_name = "NAME")]
    pub lease_name: Option<String>,
    /// This agent's identity in the Lease, normally its pod name (default: the node name).
    #[arg(long, value_name = "NAME")]
    pub lease_holder: Option<String>,
}

/// The config file: the same keys as the flags. Unknown keys are errors, so a typo never goes unnoticed.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    node: Option<String>,
    source_dir: Option<PathBuf>,
    cgroup_root: Option<PathBuf>,
    bpffs_root: Option<PathBuf>,
    admin_addr: Option<String>,
    log_format: Option<LogFormat>,
    mesh_root_namespace: Option<String>,
    trust_domain: Option<String>,
    policy_events_per_sec: Option<u32>,
    proxy: Option<bool>,
    proxy_addr: Option<Ipv4Addr>,
    proxy_addr6: Option<Ipv6Addr>,
    proxy_outbound_port: Option<u16>,
    proxy_inbound_port: Option<u16>,
    proxy_max_connections: Option<usize>,
    proxy_max_streams: Option<u32>,
    proxy_drain_timeout: Option<String>,
    proxy_service_account: Option<String>,
    proxy_netns: Option<PathBuf>,
    ca_dir: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    svid_lifetime: Option<String>,
    kubeconfig: Option<PathBuf>,
    proc_root: Option<PathBuf>,
    policy_status: Option<bool>,
    lease_namespace: Option<String>,
    lease_name: Option<String>,
    lease_holder: Option<String>,
    sockmap: Option<bool>,
    sockmap_stream_verdict: Option<bool>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_yaml::Error,
    },
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        reason: reason.into(),
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

impl RunArgs {
    /// Reads the config file (if any), overlays the flags, applies defaults and validates.
    pub fn resolve(&self) -> Result<Config, ConfigError> {
        let file = match &self.config {
            Some(path) => parse_file(path)?,
            None => FileConfig::default(),
        };
        let node = self.node.clone().or(file.node).unwrap_or_else(hostname);
        if node.is_empty() {
            return Err(invalid("node", "must not be empty"));
        }
        let source_dir = self.source_dir.clone().or(file.source_dir);
        let admin = self
            .admin_addr
            .clone()
            .or(file.admin_addr)
            .unwrap_or_else(|| DEFAULT_ADMIN_ADDR.into());
        let admin_addr = admin.parse().map_err(|e| {
            invalid(
                "admin-addr",
                format!("{admin:?} is not an ip:port socket address ({e})"),
            )
        })?;
        let cgroup_root = self
            .cgroup_root
            .clone()
            .or(file.cgroup_root)
            .unwrap_or_else(|| DEFAULT_CGROUP_ROOT.into());
        let bpffs_root = self
            .bpffs_root
            .clone()
            .or(file.bpffs_root)
            .unwrap_or_else(|| DEFAULT_BPFFS_ROOT.into());
        let proc_root = self
            .proc_root
            .clone()
            .or(file.proc_root)
            .unwrap_or_else(|| DEFAULT_PROC_ROOT.into());
        for (field, p) in [
            ("cgroup-root", &cgroup_root),
            ("bpffs-root", &bpffs_root),
            ("proc-root", &proc_root),
        ] {
            if !p.is_absolute() {
                return Err(invalid(
                    field,
                    format!("{} must be an absolute path", p.display()),
                ));
            }
        }
        let mesh_root_namespace = self
            .mesh_root_namespace
            .clone()
            .or(file.mesh_root_namespace)
            .unwrap_or_else(|| crate::policy::DEFAULT_ROOT_NAMESPACE.into());
        if !is_dns_label(&mesh_root_namespace) {
            return Err(invalid(
                "mesh-root-namespace",
                format!("{mesh_root_namespace:?} is not a namespace name"),
            ));
        }
        let trust_domain = self
            .trust_domain
            .clone()
            .or(file.trust_domain)
            .unwrap_or_else(|| DEFAULT_TRUST_DOMAIN.into());
        let td_ok = !trust_domain.is_empty()
            && trust_domain
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b".-_".contains(&b));
        if !td_ok {
            return Err(invalid(
                "trust-domain",
                format!(
                    "{trust_domain:?} is not a trust domain (lowercase letters, digits, '.', '-', '_')"
                ),
            ));
        }
        let policy_events_per_sec = self
            .policy_events_per_sec
            .or(file.policy_events_per_sec)
            .unwrap_or(DEFAULT_POLICY_EVENTS_PER_SEC);
        if policy_events_per_sec > 1_000_000 {
            return Err(invalid(
                "policy-events-per-sec",
                format!("{policy_events_per_sec} is more than 1000000"),
            ));
        }
        let duration = |field: &'static str, v: Option<String>, default: &str| {
            let v = v.unwrap_or_else(|| default.to_string());
            crate::identity::manager::parse_duration(&v).map_err(|e| invalid(field, e))
        };
        let svid_lifetime = duration(
            "svid-lifetime",
            self.svid_lifetime.clone().or(file.svid_lifetime),
            DEFAULT_SVID_LIFETIME,
        )?;
        if svid_lifetime < Duration::from_secs(10) {
            return Err(invalid("svid-lifetime", "must be at least 10s"));
        }
        let proxy = if self.proxy.or(file.proxy).unwrap_or(true) {
            let outbound_port = self
                .proxy_outbound_port
                .or(file.proxy_outbound_port)
                .unwrap_or(DEFAULT_OUTBOUND_PORT);
            let inbound_port = self
                .proxy_inbound_port
                .or(file.proxy_inbound_port)
                .unwrap_or(DEFAULT_INBOUND_PORT);
            for (field, port) in [
                ("proxy-outbound-port", outbound_port),
                ("proxy-inbound-port", inbound_port),
            ] {
                if port == 0 {
                    return Err(invalid(field, "must be a port number, not 0"));
                }
            }
            if outbound_port == inbound_port {
                return Err(invalid(
                    "proxy-inbound-port",
                    format!("{inbound_port} is also the outbound port"),
                ));
            }
            let max_connections = self
                .proxy_max_connections
                .or(file.proxy_max_connections)
                .unwrap_or(DEFAULT_PROXY_MAX_CONNECTIONS);
            if max_connections == 0 {
                return Err(invalid("proxy-max-connections", "must be at least 1"));
            }
            let max_streams = self
                .proxy_max_streams
                .or(file.proxy_max_streams)
                .unwrap_or(DEFAULT_PROXY_MAX_STREAMS);
            if max_streams == 0 {
                return Err(invalid("proxy-max-streams", "must be at least 1"));
            }
            let service_account = self
                .proxy_service_account
                .clone()
                .or(file.proxy_service_account)
                .unwrap_or_else(|| DEFAULT_PROXY_SERVICE_ACCOUNT.into());
            crate::identity::spiffe::validate_service_account(&service_account)
                .map_err(|e| invalid("proxy-service-account", e.to_string()))?;
            let addr = self
                .proxy_addr
                .or(file.proxy_addr)
                .unwrap_or(DEFAULT_PROXY_ADDR);
            if addr.is_unspecified() || addr.is_multicast() || addr.is_broadcast() {
                return Err(invalid(
                    "proxy-addr",
                    format!("{addr} is not a unicast address"),
                ));
            }
            Some(ProxySettings {
                addr,
                addr6: self.proxy_addr6.or(file.proxy_addr6),
                outbound_port,
                inbound_port,
                max_connections,
                max_streams,
                drain_timeout: duration(
                    "proxy-drain-timeout",
                    self.proxy_drain_timeout
                        .clone()
                        .or(file.proxy_drain_timeout),
                    DEFAULT_DRAIN_TIMEOUT,
                )?,
                service_account,
                netns: self.proxy_netns.clone().or(file.proxy_netns),
            })
        } else {
            None
        };
        let state_dir = self
            .state_dir
            .clone()
            .or(file.state_dir)
            .unwrap_or_else(|| DEFAULT_STATE_DIR.into());
        let source = match source_dir {
            Some(dir) => SourceSettings::Dir(dir),
            None => {
                let lease_namespace = self
                    .lease_namespace
                    .clone()
                    .or(file.lease_namespace)
                    .unwrap_or_else(|| mesh_root_namespace.clone());
                if !is_dns_label(&lease_namespace) {
                    return Err(invalid(
                        "lease-namespace",
                        format!("{lease_namespace:?} is not a namespace name"),
                    ));
                }
                let lease_name = self
                    .lease_name
                    .clone()
                    .or(file.lease_name)
                    .unwrap_or_else(|| DEFAULT_LEASE_NAME.into());
                if lease_name.is_empty() || lease_name.len() > 253 {
                    return Err(invalid("lease-name", "must be 1 to 253 characters"));
                }
                let lease_holder = self
                    .lease_holder
                    .clone()
                    .or(file.lease_holder)
                    .unwrap_or_else(|| node.clone());
                if lease_holder.is_empty() {
                    return Err(invalid("lease-holder", "must not be empty"));
                }
                SourceSettings::Kubernetes(KubeSettings {
                    kubeconfig: self.kubeconfig.clone().or(file.kubeconfig),
                    proc_root,
                    policy_status: self.policy_status.or(file.policy_status).unwrap_or(true),
                    lease_namespace,
                    lease_name,
                    lease_holder,
                })
            }
        };
        Ok(Config {
            proxy,
            ca_dir: self.ca_dir.clone().or(file.ca_dir),
            state_dir,
            svid_lifetime,
            sockmap: crate::ebpf::accel::SockmapSettings {
                enabled: self.sockmap.or(file.sockmap).unwrap_or(false),
                stream_verdict: self
                    .sockmap_stream_verdict
                    .or(file.sockmap_stream_verdict)
                    .unwrap_or(true),
            },
            mesh_root_namespace,
            trust_domain,
            policy_events_per_sec,
            node,
            source,
            cgroup_root,
            bpffs_root,
            admin_addr,
            log_format: self
                .log_format
                .or(file.log_format)
                .unwrap_or(LogFormat::Text),
        })
    }
}

/// A DNS-1123 label, as namespace names are.
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn parse_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.into(),
        source,
    })?;
    if text.trim().is_empty() {
        return Ok(FileConfig::default());
    }
    serde_yaml::from_str(&text).map_err(|source| ConfigError::Parse {
        path: path.into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> RunArgs {
        RunArgs {
            node: Some("n1".into()),
            source_dir: Some("/tmp/x".into()),
            ..Default::default()
        }
    }

    fn write(name: &str, text: &str) -> PathBuf {
        let p =
            std::env::temp_dir().join(format!("sinew-config-{}-{name}.yaml", std::process::id()));
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn defaults_apply() {
        let c = args().resolve().unwrap();
        assert_eq!(c.admin_addr, DEFAULT_ADMIN_ADDR.parse().unwrap());
        assert_eq!(c.cgroup_root, PathBuf::from(DEFAULT_CGROUP_ROOT));
        assert_eq!(c.bpffs_root, PathBuf::from(DEFAULT_BPFFS_ROOT));
        assert_eq!(c.log_format, LogFormat::Text);
    }

    #[test]
    fn file_supplies_keys_and_flags_win() {
        let p = write(
            "keys",
            "node: from-file\nsource-dir: /srv/m\ncgroup-root: /sys/fs/cgroup/unified/x\nadmin-addr: 127.0.0.1:9\nlog-format: json\n",
        );
        let a = RunArgs {
            config: Some(p.clone()),
            node: Some("from-flag".into()),
            ..Default::default()
        };
        let c = a.resolve().unwrap();
        std::fs::remove_file(p).ok();
        assert_eq!(c.node, "from-flag");
        assert_eq!(c.source, SourceSettings::Dir(PathBuf::from("/srv/m")));
        assert_eq!(c.cgroup_root, PathBuf::from("/sys/fs/cgroup/unified/x"));
        assert_eq!(c.admin_addr.port(), 9);
        assert_eq!(c.log_format, LogFormat::Json);
    }

    #[test]
    fn sockmap_is_off_unless_asked_for() {
        let c = args().resolve().unwrap();
        assert!(!c.sockmap.enabled);
        assert!(c.sockmap.stream_verdict);
        let p = write("sockmap", "sockmap: true\nsockmap-stream-verdict: false\n");
        let c = RunArgs {
            config: Some(p.clone()),
            ..args()
        }
        .resolve()
        .unwrap();
        assert!(c.sockmap.enabled);
        assert!(!c.sockmap.stream_verdict);
        let c = RunArgs {
            config: Some(p.clone()),
            sockmap: Some(false),
            ..args()
        }
        .resolve()
        .unwrap();
        std::fs::remove_file(p).ok();
        assert!(!c.sockmap.enabled, "the flag wins");
        let p = write("sockmap-bad", "sockmap: yes please\n");
        let e = RunArgs {
            config: Some(p.clone()),
            ..args()
        }
        .resolve()
        .unwrap_err()
        .to_string();
        std::fs::remove_file(p).ok();
        assert!(e.contains("sockmap"), "{e}");
    }

    #[test]
    fn unknown_key_is_named() {
        let p = write("unknown", "nodee: x\n");
        let e = RunArgs {
            config: Some(p.clone()),
            ..args()
        }
        .resolve()
        .unwrap_err()
        .to_string();
        std::fs::remove_file(p).ok();
        assert!(e.contains("nodee"), "{e}");
    }

    #[test]
    fn policy_keys_from_file_and_their_errors() {
        let p = write(
            "policy",
            "mesh-root-namespace: mesh-root\ntrust-domain: example.org\npolicy-events-per-sec: 50\n",
        );
        let c = RunArgs {
            config: Some(p.clone()),
            ..args()
        }
        .resolve()
        .unwrap();
        std::fs::remove_file(p).ok();
        assert_eq!(c.mesh_root_namespace, "mesh-root");
        assert_eq!(c.trust_domain, "example.org");
        assert_eq!(c.policy_events_per_sec, 50);
        let d = args().resolve().unwrap();
        assert_eq!(d.mesh_root_namespace, "sinew-system");
        assert_eq!(d.trust_domain, "cluster.local");
        for (a, field) in [
            (
                RunArgs {
                    mesh_root_namespace: Some("Sinew_System".into()),
                    ..args()
                },
                "mesh-root-namespace:",
            ),
            (
                RunArgs {
                    trust_domain: Some("spiffe://x".into()),
                    ..args()
                },
                "trust-domain:",
            ),
            (
                RunArgs {
                    policy_events_per_sec: Some(5_000_000),
                    ..args()
                },
                "policy-events-per-sec:",
            ),
        ] {
            let e = a.resolve().unwrap_err().to_string();
            assert!(e.starts_with(field), "{e}");
        }
    }

    #[test]
    fn bad_admin_addr_is_named() {
        let e = RunArgs {
            admin_addr: Some("localhost".into()),
            ..args()
        }
        .resolve()
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("admin-addr:"), "{e}");
    }

    #[test]
    fn relative_roots_are_rejected() {
        let e = RunArgs {
            bpffs_root: Some("sinew".into()),
            ..args()
        }
        .resolve()
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("bpffs-root:"), "{e}");
    }

    #[test]
    fn without_source_dir_the_source_is_kubernetes() {
        let c = RunArgs {
            node: Some("n1".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        let SourceSettings::Kubernetes(k) = c.source else {
            panic!("expected the kubernetes source, got {:?}", c.source);
        };
        assert_eq!(k.kubeconfig, None);
        assert_eq!(k.proc_root, PathBuf::from("/proc"));
        assert!(k.policy_status);
        assert_eq!(k.lease_namespace, "sinew-system");
        assert_eq!(k.lease_name, "sinew-policy-status");
        assert_eq!(k.lease_holder, "n1");
        let p = write(
            "kube.yaml",
            "kubeconfig: /etc/kc\nproc-root: /host/proc\npolicy-status: false\n\
             lease-namespace: mesh\nlease-name: l\nlease-holder: pod-1\n",
        );
        let c = RunArgs {
            config: Some(p.clone()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        std::fs::remove_file(p).ok();
        let SourceSettings::Kubernetes(k) = c.source else {
            panic!("expected the kubernetes source");
        };
        assert_eq!(k.kubeconfig, Some(PathBuf::from("/etc/kc")));
        assert_eq!(k.proc_root, PathBuf::from("/host/proc"));
        assert!(!k.policy_status);
        assert_eq!(
            (k.lease_namespace.as_str(), k.lease_name.as_str()),
            ("mesh", "l")
        );
        assert_eq!(k.lease_holder, "pod-1");
        let e = RunArgs {
            lease_namespace: Some("Bad_NS".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("lease-namespace:"), "{e}");
        let e = RunArgs {
            proc_root: Some("host/proc".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("proc-root:"), "{e}");
    }

    #[test]
    fn proxy_defaults_and_keys() {
        let c = args().resolve().unwrap();
        let p = c.proxy.expect("the proxy is on by default");
        assert_eq!(p.addr, DEFAULT_PROXY_ADDR);
        assert_eq!((p.outbound_port, p.inbound_port), (15001, 15008));
        assert_eq!(p.addr6, None);
        assert_eq!(c.svid_lifetime, Duration::from_secs(24 * 3600));
        assert_eq!(c.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        let f = write(
            "proxy",
            "proxy-addr: 169.254.9.9\nproxy-addr6: fd16::1\nsvid-lifetime: 1h30m\nproxy-drain-timeout: 3s\nca-dir: /etc/ca\n",
        );
        let c = RunArgs {
            config: Some(f.clone()),
            ..args()
        }
        .resolve()
        .unwrap();
        std::fs::remove_file(f).ok();
        let p = c.proxy.unwrap();
        assert_eq!(p.addr, Ipv4Addr::new(169, 254, 9, 9));
        assert_eq!(p.addr6, Some("fd16::1".parse().unwrap()));
        assert_eq!(p.drain_timeout, Duration::from_secs(3));
        assert_eq!(c.svid_lifetime, Duration::from_secs(5400));
        assert_eq!(c.ca_dir, Some(PathBuf::from("/etc/ca")));
        let off = RunArgs {
            proxy: Some(false),
            ..args()
        }
        .resolve()
        .unwrap();
        assert_eq!(off.proxy, None);
    }

    #[test]
    fn bad_proxy_values_name_the_field() {
        let cases: [(RunArgs, &str); 5] = [
            (
                RunArgs {
                    svid_lifetime: Some("1 day".into()),
                    ..args()
                },
                "svid-lifetime",
            ),
            (
                RunArgs {
                    svid_lifetime: Some("5s".into()),
                    ..args()
                },
                "svid-lifetime",
            ),
            (
                RunArgs {
                    proxy_inbound_port: Some(15001),
                    ..args()
                },
                "proxy-inbound-port",
            ),
            (
                RunArgs {
                    proxy_max_streams: Some(0),
                    ..args()
                },
                "proxy-max-streams",
            ),
            (
                RunArgs {
                    proxy_service_account: Some("Not/An/SA".into()),
                    ..args()
                },
                "proxy-service-account",
            ),
        ];
        for (a, field) in cases {
            let e = a.resolve().unwrap_err().to_string();
            assert!(e.starts_with(field), "{field}: {e}");
        }
    }
}
