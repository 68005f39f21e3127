//! Same-node socket acceleration (issue 6): attaching its programs when `--sockmap` is on, keeping `sk_pods` equal
//! to the local pods, and taking connections out again when policy revokes them.
//!
//! Links (pinned under `links/`, so they outlive the agent like the cgroup ones):
//! - `accel_msg`: the sk_msg program on the `sk_conns` SockHash;
//! - `accel_verdict`: a pass-everything stream verdict program on `sk_conns` (the 6.18 wakeup workaround);
//! - `accel_sockops`: the sock_ops program at the cgroup root that fills `sk_conns`.
//!
//! The switch decides whether `accel_sockops` is attached, so it only changes which *new* connections are
//! accelerated. Turning it off leaves the connections already in `sk_conns` accelerated until they close: taking a
//! live socket out of the map would drop the bytes already handed to it and not yet read.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use aya::maps::{HashMap, MapData, PerCpuArray, SockHash};
use mesh_common::{
    accel::{AccelConn, SockKey, counter},
    map_names,
};
use serde::Serialize;
use tracing::{info, warn};

use super::{Layout, open_map};

/// The sockmap-attached programs, in attach order (the sk_msg program must be on the map before sock_ops puts
/// the first socket in it: a socket takes the map's programs when it is added).
pub const MAP_PROGRAMS: [(&str, u32); 2] = [
    ("accel_msg", crate::sys::ATTACH_SK_MSG_VERDICT),
    ("accel_verdict", crate::sys::ATTACH_SK_SKB_STREAM_VERDICT),
];
/// The cgroup sock_ops program that fills `sk_conns`.
pub const SOCKOPS: &str = "accel_sockops";
/// Every acceleration program (for status and uninstall).
pub const PROGRAMS: [&str; 3] = ["accel_msg", "accel_verdict", SOCKOPS];

/// How acceleration is set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct SockmapSettings {
    /// `--sockmap`: accelerate new same-node connections.
    pub enabled: bool,
    /// `--sockmap-stream-verdict`: also attach the pass-everything stream verdict program.
    pub stream_verdict: bool,
}

/// Kernel counters summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct AccelCounters {
    pub inserts: u64,
    pub redirects: u64,
    pub misses: u64,
    pub redirected_bytes: u64,
    pub insert_errors: u64,
}

/// Handles to the acceleration maps.
pub struct AccelMaps {
    pub conns: SockHash<MapData, SockKey>,
    pub clients: HashMap<MapData, SockKey, AccelConn>,
    pub pods: HashMap<MapData, [u8; 16], u64>,
    pub counters: PerCpuArray<MapData, u64>,
}

/// One accelerated connection, from its client end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct AccelConnection {
    pub client_netns_cookie: u64,
    pub server_netns_cookie: u64,
    pub client: SocketAddr,
    pub server: SocketAddr,
    /// Whether each end is in `sk_conns` now: the client's end leaves it when it closes; an end that sent
    /// through the stack once stays in it but is no longer redirected.
    pub client_in_map: bool,
    pub server_in_map: bool,
}

impl AccelConnection {
    fn client_key(&self) -> SockKey {
        SockKey {
            netns_cookie: self.client_netns_cookie,
            local_addr: addr_bytes(self.client.ip()),
            remote_addr: addr_bytes(self.server.ip()),
            local_port: self.client.port(),
            remote_port: self.server.port(),
            _pad: 0,
        }
    }
    fn server_key(&self) -> SockKey {
        self.client_key().peer(self.server_netns_cookie)
    }
}

/// What one revocation pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Revoked {
    /// Connections taken out of `sk_conns`.
    pub removed: usize,
    /// Sockets reset (both ends of each removed connection, where they still existed).
    pub reset: usize,
}

fn addr_bytes(ip: IpAddr) -> [u8; 16] {
    match ip.to_canonical() {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    }
}

fn addr_of(bytes: [u8; 16]) -> IpAddr {
    Ipv6Addr::from(bytes).to_canonical()
}

impl AccelMaps {
    pub fn open(layout: &Layout) -> anyhow::Result<Self> {
        let m = |name| open_map(layout, name);
        Ok(Self {
            conns: SockHash::try_from(m(map_names::SK_CONNS)?)?,
            clients: HashMap::try_from(m(map_names::SK_CLIENTS)?)?,
            pods: HashMap::try_from(m(map_names::SK_PODS)?)?,
            counters: PerCpuArray::try_from(m(map_names::SK_COUNTERS)?)?,
        })
    }

    pub fn counters(&self) -> AccelCounters {
        let get = |i: u32| -> u64 {
            self.counters
                .get(&i, 0)
                .map(|per_cpu| per_cpu.iter().sum())
                .unwrap_or(0)
        };
        AccelCounters {
            inserts: get(counter::INSERTS),
            redirects: get(counter::REDIRECTS),
            misses: get(counter::MISSES),
            redirected_bytes: get(counter::REDIRECTED_BYTES),
            insert_errors: get(counter::INSERT_ERRORS),
        }
    }

    /// Sockets in `sk_conns` now.
    pub fn sockets(&self) -> usize {
        self.conns.keys().filter(Result::is_ok).count()
    }

    /// Makes `sk_pods` hold exactly `desired` (local pod address -> netns cookie): new and changed entries first,
    /// then the stale ones. Returns (written, deleted).
    pub fn sync_pods(&mut self, desired: &BTreeMap<IpAddr, u64>) -> anyhow::Result<(usize, usize)> {
        let desired: BTreeMap<[u8; 16], u64> = desired
            .iter()
            .map(|(ip, c)| (addr_bytes(*ip), *c))
            .collect();
        let existing: BTreeMap<[u8; 16], u64> = self
            .pods
            .iter()
            .collect::<Result<_, _>>()
            .context("reading sk_pods")?;
        let mut written = 0;
        for (addr, cookie) in &desired {
            if existing.get(addr) != Some(cookie) {
                self.pods
                    .insert(addr, cookie, 0)
                    .with_context(|| format!("writing sk_pods {}", addr_of(*addr)))?;
                written += 1;
            }
        }
        let mut deleted = 0;
        for addr in existing.keys().filter(|a| !desired.contains_key(*a)) {
            self.pods
                .remove(addr)
                .with_context(|| format!("deleting sk_pods {}", addr_of(*addr)))?;
            deleted += 1;
        }
        Ok((written, deleted))
    }

    /// The accelerated connections, by their client ends (`sk_clients` entries with an end still in `sk_conns`),
    /// and the client records whose connection is gone (both ends closed).
    pub fn connections(&self) -> anyhow::Result<(Vec<AccelConnection>, Vec<SockKey>)> {
        let live: BTreeSet<SockKey> = self
            .conns
            .keys()
            .collect::<Result<_, _>>()
            .context("reading sk_conns")?;
        let clients: Vec<(SockKey, AccelConn)> = self
            .clients
            .iter()
            .collect::<Result<_, _>>()
            .context("reading sk_clients")?;
        let (mut out, mut gone) = (Vec::new(), Vec::new());
        for (key, conn) in clients {
            let c = AccelConnection {
                client_netns_cookie: key.netns_cookie,
                server_netns_cookie: conn.server_netns_cookie,
                client: SocketAddr::new(addr_of(key.local_addr), key.local_port),
                server: SocketAddr::new(addr_of(key.remote_addr), key.remote_port),
                client_in_map: live.contains(&key),
                server_in_map: false,
            };
            let c = AccelConnection {
                server_in_map: live.contains(&c.server_key()),
                ..c
            };
            if c.client_in_map || c.server_in_map {
                out.push(c);
            } else {
                gone.push(key);
            }
        }
        Ok((out, gone))
    }

    /// Takes every accelerated connection that `allowed` no longer allows out of `sk_conns` and resets both of
    /// its ends (in their pods' netns, found by `netns_of`): its bytes no longer pass any policy check, so it
    /// must not outlive the policy that allowed it.
    pub fn revoke(
        &mut self,
        allowed: impl Fn(&AccelConnection) -> bool,
        netns_of: impl Fn(u64) -> Option<PathBuf>,
    ) -> anyhow::Result<Revoked> {
        let mut done = Revoked::default();
        let (connections, gone) = self.connections()?;
        for key in gone {
            let _ = self.clients.remove(&key);
        }
        for c in connections {
            if allowed(&c) {
                continue;
            }
            for key in [c.client_key(), c.server_key()] {
                // Gone already if that end closed (the kernel unlinks closed sockets).
                let _ = self.conns.remove(&key);
            }
            let _ = self.clients.remove(&c.client_key());
            done.removed += 1;
            for (cookie, local, remote) in [
                (c.client_netns_cookie, c.client, c.server),
                (c.server_netns_cookie, c.server, c.client),
            ] {
                match reset(netns_of(cookie).as_deref(), local, remote) {
                    Ok(true) => done.reset += 1,
                    Ok(false) => {}
                    Err(e) => warn!(
                        %local, %remote, error = %e,
                        "could not reset a connection whose acceleration policy revoked"
                    ),
                }
            }
            info!(client = %c.client, server = %c.server, "policy revoked an accelerated connection: reset");
        }
        Ok(done)
    }
}

fn reset(netns: Option<&Path>, local: SocketAddr, remote: SocketAddr) -> anyhow::Result<bool> {
    let netns = netns.context("the pod's network namespace is not known")?;
    crate::sys::in_netns(Some(netns), || crate::sys::destroy_tcp(local, remote))
        .with_context(|| format!("entering {}", netns.display()))?
        .context("SOCK_DESTROY")
}

/// Whether `--sockmap` is in force: the sock_ops link is pinned.
pub fn enabled(layout: &Layout) -> bool {
    layout.link(SOCKOPS).exists()
}

/// `mesh-agent dump sockmap`, text form.
pub fn render_connections(conns: &[AccelConnection]) -> String {
    if conns.is_empty() {
        return "no accelerated connections\n".into();
    }
    let mut out = format!(
        "{:<46} {:<46} {:<8} {}\n",
        "CLIENT", "SERVER", "IN MAP", "NETNS COOKIES (client, server)"
    );
    for c in conns {
        let ends = match (c.client_in_map, c.server_in_map) {
            (true, true) => "both",
            (true, false) => "client",
            (false, true) => "server",
            (false, false) => "none",
        };
        out += &format!(
            "{:<46} {:<46} {:<8} {}, {}\n",
            c.client.to_string(),
            c.server.to_string(),
            ends,
            c.client_netns_cookie,
            c.server_netns_cookie
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> AccelConnection {
        AccelConnection {
            client_netns_cookie: 4097,
            server_netns_cookie: 4098,
            client: "10.244.0.10:40112".parse().unwrap(),
            server: "10.244.0.11:8080".parse().unwrap(),
            client_in_map: true,
            server_in_map: false,
        }
    }

    /// The two ends' keys are each other's peers, and an IPv4 connection is keyed v4-mapped, as the programs key it.
    #[test]
    fn keys_of_both_ends() {
        let c = conn();
        let k = c.client_key();
        assert_eq!(k.netns_cookie, 4097);
        assert_eq!(
            &k.local_addr[..12],
            &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 255, 255]
        );
        assert_eq!((k.local_port, k.remote_port), (40112, 8080));
        assert_eq!(c.server_key(), k.peer(4098));
        assert_eq!(c.server_key().peer(4097), k);
        assert_eq!(addr_of(k.remote_addr), c.server.ip());
    }

    #[test]
    fn dump_names_each_connection_and_its_ends() {
        assert_eq!(render_connections(&[]), "no accelerated connections\n");
        let text = render_connections(&[conn()]);
        let row = text.lines().nth(1).unwrap();
        assert!(
            row.contains("10.244.0.10:40112")
                && row.contains("10.244.0.11:8080")
                && row.contains("client")
                && row.contains("4097, 4098"),
            "{text}"
        );
    }
}
