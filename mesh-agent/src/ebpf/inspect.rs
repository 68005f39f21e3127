//! Read-only views of an install: `mesh-agent status` and `mesh-agent dump services`. They read the pins directly,
//! so they work while the agent is down (which is when an operator most needs them).

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use aya::{
    maps::{MapInfo, MapType},
    programs::links::{FdLink, PinnedLink},
};
use mesh_common::{ABI_HASH, ABI_VERSION, SlotKey, map_names};
use serde::Serialize;

use super::{
    Layout, Maps, PROGRAMS, pinned_abi,
    reconcile::{bytes_addr, proto_name},
};

#[derive(Debug, Serialize)]
pub struct Status {
    pub bpffs_root: String,
    /// The running agent's readiness, from its admin `/readyz`: `ready`, `not ready`, or why it was not reachable.
    pub agent: String,
    pub abi: Option<AbiStatus>,
    pub programs: Vec<ProgramStatus>,
    pub maps: Vec<MapStatus>,
    /// Same-node socket acceleration.
    pub sockmap: SockmapStatus,
    /// The node proxy's certificates (CA, proxy, one per local enrolled service account), from the running agent's
    /// `/debug/certs`; empty when the agent is down or its proxy is off.
    pub certificates: Vec<CertStatus>,
}

/// One certificate as `/debug/certs` lists it.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct CertStatus {
    pub role: String,
    pub spiffe_id: String,
    pub serial: String,
    pub not_after: String,
    #[serde(default)]
    pub renew_at: Option<String>,
    pub expires_in_secs: i64,
}

/// Same-node socket acceleration as the pins show it.
#[derive(Debug, Serialize)]
pub struct SockmapStatus {
    /// `--sockmap` is in force: the sock_ops program that accelerates new connections is attached.
    pub enabled: bool,
    /// Sockets in `sk_conns` now (two per accelerated connection).
    pub connections: Option<usize>,
    pub counters: Option<super::accel::AccelCounters>,
}

#[derive(Debug, Serialize)]
pub struct AbiStatus {
    pub version: u32,
    pub layout_hash: u32,
    /// Whether this binary can adopt the pinned maps.
    pub matches: bool,
}

#[derive(Debug, Serialize)]
pub struct ProgramStatus {
    pub name: String,
    pub attached: bool,
    pub link_pin: String,
    pub link_id: Option<u32>,
    pub program_id: Option<u32>,
}

#[derive(Debug, Serialize)]
pub struct MapStatus {
    pub name: String,
    pub pin: String,
    pub id: Option<u32>,
    pub kind: Option<String>,
    pub entries: Option<usize>,
    pub max_entries: Option<u32>,
}

/// Asks a running agent's admin endpoint whether it is ready. Plain blocking HTTP/1.0 with short timeouts: this is
/// a one-shot CLI, and the agent may well be down (which is a normal answer, not an error).
pub fn probe_ready(addr: SocketAddr) -> String {
    let timeout = Duration::from_millis(500);
    let attempt = || -> std::io::Result<String> {
        let mut s = TcpStream::connect_timeout(&addr, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        s.write_all(b"GET /readyz HTTP/1.0\r\nHost: sinew\r\n\r\n")?;
        let mut resp = String::new();
        s.take(4096).read_to_string(&mut resp)?;
        Ok(resp)
    };
    match attempt() {
        Ok(r) if r.starts_with("HTTP/1.1 200") || r.starts_with("HTTP/1.0 200") => "ready".into(),
        Ok(_) => "not ready".into(),
        Err(e) => format!("not reachable at {addr} ({e})"),
    }
}

pub fn status(layout: &Layout, admin: SocketAddr) -> anyhow::Result<Status> {
    let abi = pinned_abi(layout).ok().flatten().map(|r| AbiStatus {
        version: r.version,
        layout_hash: r.layout_hash,
        matches: r.version == ABI_VERSION && r.layout_hash == ABI_HASH,
    });
    let programs = PROGRAMS
        .iter()
        .chain(super::accel::PROGRAMS.iter())
        .map(|name| {
            let pin = layout.link(name);
            let info = PinnedLink::from_pin(&pin)
                .ok()
                .and_then(|l| FdLink::from(l).info().ok());
            ProgramStatus {
                name: name.to_string(),
                attached: info.is_some(),
                link_pin: pin.display().to_string(),
                link_id: info.as_ref().map(|i| i.id()),
                program_id: info.as_ref().map(|i| i.program_id()),
            }
        })
        .collect();
    // Entry counts come from the typed maps; arrays are always full, so they report their size.
    let maps_handle = abi
        .as_ref()
        .filter(|a| a.matches)
        .and_then(|_| Maps::open(layout).ok());
    let policy_handle = abi
        .as_ref()
        .filter(|a| a.matches)
        .and_then(|_| super::policy::PolicyMaps::open(layout).ok());
    // LRU maps the agent holds no handle on: counted through a typed view opened for the occasion.
    fn lru_entries<K: aya::Pod, V: aya::Pod>(layout: &Layout, name: &str) -> Option<usize> {
        let map: aya::maps::HashMap<_, K, V> =
            aya::maps::HashMap::try_from(super::open_map(layout, name).ok()?).ok()?;
        Some(map.keys().count())
    }
    let count = |name: &str| -> Option<usize> {
        let m = maps_handle.as_ref()?;
        let p = policy_handle.as_ref()?;
        Some(match name {
            map_names::SERVICES => m.services.keys().count(),
            map_names::SLOTS => m.slots.keys().count(),
            map_names::BACKENDS => m.backends.keys().count(),
            map_names::REV_NAT => m.rev_nat.keys().count(),
            map_names::IPCACHE => p.ipcache.keys().count(),
            map_names::IP_HOSTS => p.ip_hosts.keys().count(),
            map_names::LOCAL_EPS => p.local_eps.keys().count(),
            map_names::POLICY => p.policy.keys().count(),
            map_names::UDP_FLOWS => lru_entries::<
                mesh_common::policy::FlowKey,
                mesh_common::policy::FlowValue,
            >(layout, name)?,
            map_names::UDP_REPLIES => lru_entries::<
                mesh_common::policy::UdpReplyKey,
                mesh_common::policy::UdpPeer,
            >(layout, name)?,
            map_names::MTLS_PORTS => p.mtls_ports.keys().count(),
            map_names::SK_CONNS => p.accel.sockets(),
            map_names::SK_CLIENTS => p.accel.clients.keys().count(),
            map_names::SK_PODS => p.accel.pods.keys().count(),
            map_names::PROXY_PENDING => {
                lru_entries::<u64, mesh_common::policy::OrigDst>(layout, name)?
            }
            map_names::PROXY_ORIG => lru_entries::<
                mesh_common::policy::OrigKey,
                mesh_common::policy::OrigDst,
            >(layout, name)?,
            _ => return None,
        })
    };
    let maps = map_names::ALL
        .iter()
        .map(|name| {
            let pin = layout.map(name);
            let info: Option<MapInfo> = MapInfo::from_pin(&pin).ok();
            let kind = info
                .as_ref()
                .and_then(|i| i.map_type().ok())
                .map(|t| map_kind(t).to_string());
            let max = info.as_ref().map(|i| i.max_entries());
            let entries = count(name).or(match kind.as_deref() {
                Some("array") | Some("percpu_array") => max.map(|m| m as usize),
                _ => None,
            });
            MapStatus {
                name: name.to_string(),
                pin: pin.display().to_string(),
                id: info.as_ref().map(|i| i.id()),
                kind,
                entries,
                max_entries: max,
            }
        })
        .collect();
    let sockmap = SockmapStatus {
        enabled: super::accel::enabled(layout),
        connections: policy_handle.as_ref().map(|p| p.accel.sockets()),
        counters: policy_handle.as_ref().map(|p| p.accel.counters()),
    };
    let agent = probe_ready(admin);
    // Certificates live in the agent's memory, not in the pins: ask it (a down agent has none to show).
    let certificates = crate::client::get(admin, "/debug/certs")
        .ok()
        .and_then(|body| serde_json::from_str(&body).ok())
        .unwrap_or_default();
    Ok(Status {
        bpffs_root: layout.root.display().to_string(),
        agent,
        abi,
        programs,
        maps,
        sockmap,
        certificates,
    })
}

fn map_kind(t: MapType) -> &'static str {
    match t {
        MapType::Hash => "hash",
        MapType::LruHash => "lru_hash",
        MapType::Array => "array",
        MapType::PerCpuArray => "percpu_array",
        MapType::LpmTrie => "lpm_trie",
        MapType::RingBuf => "ringbuf",
        MapType::SockHash => "sockhash",
        MapType::SkStorage => "sk_storage",
        _ => "other",
    }
}

impl Status {
    pub fn render(&self) -> String {
        let mut out = format!("bpffs root: {}\nagent: {}\n", self.bpffs_root, self.agent);
        match &self.abi {
            Some(a) => {
                out += &format!(
                    "abi: version {} layout {:#010x} ({})\n",
                    a.version,
                    a.layout_hash,
                    if a.matches {
                        "matches this agent"
                    } else {
                        "DIFFERS from this agent"
                    }
                )
            }
            None => out += "abi: not installed\n",
        }
        out += "\nPROGRAM        ATTACHED  LINK ID  PROG ID  PIN\n";
        for p in &self.programs {
            out += &format!(
                "{:<14} {:<9} {:<8} {:<8} {}\n",
                p.name,
                if p.attached { "yes" } else { "no" },
                opt(p.link_id),
                opt(p.program_id),
                p.link_pin
            );
        }
        let s = &self.sockmap;
        out += &format!(
            "\nsockmap: {}",
            if s.enabled {
                "on (new same-node connections are accelerated)"
            } else {
                "off"
            }
        );
        if let Some(n) = s.connections {
            out += &format!("; {n} sockets accelerated now");
        }
        if let Some(c) = &s.counters {
            out += &format!(
                "\n  inserts {}  redirects {}  misses {}  redirected bytes {}  insert errors {}",
                c.inserts, c.redirects, c.misses, c.redirected_bytes, c.insert_errors
            );
        }
        out += "\n";
        if !self.certificates.is_empty() {
            out += "\nCERTIFICATE  EXPIRES IN  NOT AFTER             RENEW AT              SPIFFE ID\n";
            for c in &self.certificates {
                out += &format!(
                    "{:<12} {:<11} {:<21} {:<21} {}\n",
                    c.role,
                    crate::identity::manager::format_duration(std::time::Duration::from_secs(
                        c.expires_in_secs.max(0) as u64
                    )),
                    c.not_after,
                    c.renew_at.as_deref().unwrap_or("-"),
                    c.spiffe_id
                );
            }
        }
        out += "\nMAP            KIND          ENTRIES  MAX      ID      PIN\n";
        for m in &self.maps {
            out += &format!(
                "{:<14} {:<13} {:<8} {:<8} {:<7} {}\n",
                m.name,
                m.kind.as_deref().unwrap_or("-"),
                opt(m.entries),
                opt(m.max_entries),
                opt(m.id),
                m.pin
            );
        }
        out
    }
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

#[derive(Debug, Serialize)]
pub struct ServiceDump {
    pub vip: String,
    pub port: u16,
    pub proto: &'static str,
    pub id: u32,
    pub count: u32,
    pub balanced: u64,
    pub no_backend: u64,
    pub backends: Vec<SlotDump>,
}

#[derive(Debug, Serialize)]
pub struct SlotDump {
    pub slot: u32,
    pub id: u32,
    pub addr: String,
    pub port: u16,
}

/// Decodes services -> slots -> backends, in frontend order.
pub fn dump_services(maps: &Maps, counters: impl Fn(u32) -> (u64, u64)) -> Vec<ServiceDump> {
    let mut services: Vec<_> = maps.services.iter().filter_map(Result::ok).collect();
    services.sort_by_key(|(k, _)| (bytes_addr(&k.addr), k.port, k.proto));
    services
        .into_iter()
        .map(|(k, v)| {
            let backends = (0..v.count)
                .filter_map(|slot| {
                    let s = maps
                        .slots
                        .get(
                            &SlotKey {
                                service_id: v.id,
                                slot,
                            },
                            0,
                        )
                        .ok()?;
                    let b = maps.backends.get(&s.backend_id, 0).ok()?;
                    Some(SlotDump {
                        slot,
                        id: s.backend_id,
                        addr: bytes_addr(&b.addr).to_string(),
                        port: b.port,
                    })
                })
                .collect();
            let (balanced, no_backend) = counters(v.id);
            ServiceDump {
                vip: bytes_addr(&k.addr).to_string(),
                port: k.port,
                proto: proto_name(k.proto),
                id: v.id,
                count: v.count,
                balanced,
                no_backend,
                backends,
            }
        })
        .collect()
}

pub fn render_services(services: &[ServiceDump]) -> String {
    let mut out = String::new();
    for s in services {
        out += &format!(
            "{}:{}/{}  id={} slots={} balanced={} no_backend={}\n",
            s.vip, s.port, s.proto, s.id, s.count, s.balanced, s.no_backend
        );
        if s.backends.is_empty() {
            out += "  (no ready backend: connects are refused)\n";
        }
        for b in &s.backends {
            out += &format!(
                "  slot {:<3} backend {:<5} {}:{}\n",
                b.slot, b.id, b.addr, b.port
            );
        }
    }
    if services.is_empty() {
        out += "no services\n";
    }
    out
}
