//! Writes a policy compilation into the pinned maps, switching epochs so that the kernel moves from the old
//! policy set to the new one in a single array write (see `mesh_common::policy`).
//!
//! Order of one apply, with `e` the active epoch and `n` the other:
//! 1. every `ipcache` and `local_eps` entry gets its slot `n` set to the new compilation's answer, and new entries
//!    get a slot `e` that repeats what epoch `e` answered for their addresses before they existed;
//! 2. the new verdicts go in under epoch `n` (after deleting leftovers of an older epoch `n`);
//! 3. `pol_state` flips to `n` (and bumps the generation, which re-judges UDP flows);
//! 4. what only epoch `e` used goes: entries not in the new compilation, and every epoch `e` verdict.
//!
//! Until step 3 the kernel reads only slot/epoch `e`, which steps 1–2 never change in meaning; after it, only `n`,
//! which step 4 never changes in meaning. An apply that fails half-way leaves epoch `e` in force and is retried.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context as _;
use aya::maps::{Array, HashMap, MapData, PerCpuArray, lpm_trie::Key, lpm_trie::LpmTrie};
use mesh_common::{
    map_names,
    policy::{
        CLASS_SKIP, IpInfo, IpSlot, LocalEndpoint, LocalSlot, MAX_POLICY, MtlsPortKey, PolicyKey,
        PolicyState, PolicyValue, counter, identity,
    },
};

use super::{Layout, open_map};
use crate::policy::compile::{Compiled, Prefix};

/// Handles to the policy maps.
pub struct PolicyMaps {
    pub ipcache: LpmTrie<MapData, [u8; 16], IpInfo>,
    /// The single-address entries of `ipcache`, again, in a hash (the kernel looks here first).
    pub ip_hosts: HashMap<MapData, [u8; 16], IpInfo>,
    pub local_eps: HashMap<MapData, u64, LocalEndpoint>,
    pub policy: HashMap<MapData, PolicyKey, PolicyValue>,
    pub state: Array<MapData, PolicyState>,
    pub counters: PerCpuArray<MapData, u64>,
    pub mtls_ports: HashMap<MapData, MtlsPortKey, u32>,
    /// Same-node acceleration: kept in step with the pods and policy in force.
    pub accel: super::accel::AccelMaps,
}

/// Event rate limit written into `pol_state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventLimits {
    pub per_sec: u32,
    pub burst: u32,
}

/// What one apply changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyChanges {
    pub epoch: u32,
    pub generation: u32,
    pub writes: usize,
    pub deletes: usize,
    /// False when the compilation equalled what was in force and nothing was written.
    pub flipped: bool,
}

/// Policy counters summed over CPUs, by [`counter`] index.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PolicyCounters {
    pub denied_egress: u64,
    pub denied_ingress: u64,
    pub audited: u64,
    pub events_sent: u64,
    pub events_dropped: u64,
    pub allowed_egress: u64,
    pub allowed_ingress: u64,
    pub udp_flow_hits: u64,
    pub udp_replies: u64,
    pub strict_denied: u64,
    pub proxy_redirected: u64,
    pub proxy_ingress: u64,
    pub proxy_refused: u64,
}

const WORLD_SLOT: IpSlot = IpSlot {
    identity: identity::WORLD,
    src_class: 0,
    dst_class: 0,
    mesh: 0,
};
const SKIP_SLOT: LocalSlot = LocalSlot {
    identity: identity::UNKNOWN,
    src_class4: CLASS_SKIP,
    src_class6: CLASS_SKIP,
    flags: 0,
};

/// Where the connect hook sends redirected connections (`pol_state`), fixed for the agent's lifetime.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProxyRedirect {
    /// The proxy's outbound port; 0: no redirect.
    pub port: u16,
    pub addr4: Option<std::net::Ipv4Addr>,
    pub addr6: Option<std::net::Ipv6Addr>,
}

impl ProxyRedirect {
    fn write(&self, st: &mut PolicyState) {
        st.proxy_port = self.port as u32;
        st.proxy_addr4 = self.addr4.map_or([0; 16], |a| a.to_ipv6_mapped().octets());
        st.proxy_addr6 = self.addr6.map_or([0; 16], |a| a.octets());
    }
}

fn key(p: &Prefix) -> Key<[u8; 16]> {
    Key::new(p.len as u32, p.addr)
}

/// The slot of the longest prefix in `table` containing `p` (what a kernel lookup of `p`'s addresses finds when
/// `p` itself is not an entry).
fn covering<V: Copy>(table: &BTreeMap<Prefix, V>, p: &Prefix) -> Option<V> {
    table
        .iter()
        .filter(|(q, _)| q.contains(p))
        .max_by_key(|(q, _)| q.len)
        .map(|(_, v)| *v)
}

/// A map's whole content, by key (`what` names the map in the error).
fn read<K: Ord, V>(
    entries: impl Iterator<Item = Result<(K, V), aya::maps::MapError>>,
    what: &str,
) -> anyhow::Result<BTreeMap<K, V>> {
    entries
        .map(|item| item.with_context(|| format!("reading {what}")))
        .collect()
}

impl PolicyMaps {
    pub fn open(layout: &Layout) -> anyhow::Result<Self> {
        let m = |name| open_map(layout, name);
        Ok(Self {
            ipcache: LpmTrie::try_from(m(map_names::IPCACHE)?)?,
            ip_hosts: HashMap::try_from(m(map_names::IP_HOSTS)?)?,
            local_eps: HashMap::try_from(m(map_names::LOCAL_EPS)?)?,
            policy: HashMap::try_from(m(map_names::POLICY)?)?,
            state: Array::try_from(m(map_names::POLICY_STATE)?)?,
            counters: PerCpuArray::try_from(m(map_names::POLICY_COUNTERS)?)?,
            mtls_ports: HashMap::try_from(m(map_names::MTLS_PORTS)?)?,
            accel: super::accel::AccelMaps::open(layout)?,
        })
    }

    pub fn state(&self) -> anyhow::Result<PolicyState> {
        Ok(self.state.get(&0, 0)?)
    }

    pub fn counters(&self) -> PolicyCounters {
        let get = |i: u32| -> u64 {
            self.counters
                .get(&i, 0)
                .map(|per_cpu| per_cpu.iter().sum())
                .unwrap_or(0)
        };
        PolicyCounters {
            denied_egress: get(counter::DENIED_EGRESS),
            denied_ingress: get(counter::DENIED_INGRESS),
            audited: get(counter::AUDITED),
            events_sent: get(counter::EVENTS_SENT),
            events_dropped: get(counter::EVENTS_DROPPED),
            allowed_egress: get(counter::ALLOWED_EGRESS),
            allowed_ingress: get(counter::ALLOWED_INGRESS),
            udp_flow_hits: get(counter::UDP_FLOW_HITS),
            udp_replies: get(counter::UDP_REPLIES),
            strict_denied: get(counter::STRICT_DENIED),
            proxy_redirected: get(counter::PROXY_REDIRECTED),
            proxy_ingress: get(counter::PROXY_INGRESS),
            proxy_refused: get(counter::PROXY_REFUSED),
        }
    }

    /// Puts `desired` in force. `unchanged` says the caller knows it equals what is already in force (then only
    /// the rate limits are refreshed).
    pub fn apply(
        &mut self,
        desired: &Compiled,
        limits: EventLimits,
        proxy: ProxyRedirect,
        unchanged: bool,
    ) -> anyhow::Result<PolicyChanges> {
        let st = self.state()?;
        if unchanged {
            let mut next = PolicyState {
                events_per_sec: limits.per_sec,
                events_burst: limits.burst,
                ..st
            };
            proxy.write(&mut next);
            if next != st {
                self.state.set(0, next, 0)?;
            }
            return Ok(PolicyChanges {
                epoch: st.epoch,
                generation: st.generation,
                ..Default::default()
            });
        }
        let e = (st.epoch & 1) as usize;
        let n = 1 - e;
        let mut changes = PolicyChanges::default();

        // 1. ipcache and its exact-address mirror.
        let prefixed = self.ipcache.iter().map(|item| {
            item.map(|(k, v)| {
                let p = Prefix {
                    addr: k.data(),
                    len: k.prefix_len() as u8,
                };
                (p, v)
            })
        });
        let existing = read(prefixed, "ipcache")?;
        let existing_hosts = read(self.ip_hosts.iter(), "ip_hosts")?;
        let existing_e: BTreeMap<Prefix, IpSlot> =
            existing.iter().map(|(p, v)| (*p, v.slots[e])).collect();
        let prefixes: BTreeSet<Prefix> = existing
            .keys()
            .chain(desired.ipcache.keys())
            .copied()
            .collect();
        for p in &prefixes {
            let mut info = match existing.get(p) {
                Some(info) => *info,
                None => {
                    let mut info = IpInfo::default();
                    info.slots[e] = covering(&existing_e, p).unwrap_or(WORLD_SLOT);
                    info
                }
            };
            info.slots[n] = desired
                .ipcache
                .get(p)
                .copied()
                .or_else(|| covering(&desired.ipcache, p))
                .unwrap_or(WORLD_SLOT);
            if existing.get(p) != Some(&info) {
                self.ipcache
                    .insert(&key(p), info, 0)
                    .with_context(|| format!("writing ipcache {p}"))?;
                changes.writes += 1;
            }
            // The hash mirrors the trie's single addresses, slot for slot, so either answers the same.
            if p.len == 128 && existing_hosts.get(&p.addr) != Some(&info) {
                self.ip_hosts
                    .insert(p.addr, info, 0)
                    .with_context(|| format!("writing ip_hosts {p}"))?;
                changes.writes += 1;
            }
        }
        for addr in existing_hosts.keys() {
            // Only ever a leftover: every single-address entry of the trie was mirrored above.
            if !prefixes.contains(&Prefix {
                addr: *addr,
                len: 128,
            }) {
                self.ip_hosts
                    .remove(addr)
                    .context("deleting a stray ip_hosts entry")?;
                changes.deletes += 1;
            }
        }

        // 1b. local endpoints.
        let existing_eps = read(self.local_eps.iter(), "local_eps")?;
        let cookies: BTreeSet<u64> = existing_eps
            .keys()
            .chain(desired.local_eps.keys())
            .copied()
            .collect();
        for cookie in &cookies {
            let mut ep = existing_eps.get(cookie).copied().unwrap_or(LocalEndpoint {
                slots: [SKIP_SLOT; 2],
            });
            ep.slots[n] = desired.local_eps.get(cookie).copied().unwrap_or(SKIP_SLOT);
            if existing_eps.get(cookie) != Some(&ep) {
                self.local_eps
                    .insert(cookie, ep, 0)
                    .with_context(|| format!("writing local_eps {cookie}"))?;
                changes.writes += 1;
            }
        }

        // 2. verdicts under epoch n.
        let existing_verdicts = read(self.policy.iter(), "policy")?;
        let want: BTreeMap<PolicyKey, PolicyValue> = desired
            .verdicts
            .iter()
            .map(|(&(dst_class, src_class, port), v)| {
                (
                    PolicyKey {
                        dst_class,
                        src_class,
                        port,
                        epoch: n as u8,
                        _pad: 0,
                    },
                    *v,
                )
            })
            .collect();
        let in_use = existing_verdicts
            .keys()
            .filter(|k| k.epoch as usize == e)
            .count();
        anyhow::ensure!(
            in_use + want.len() <= MAX_POLICY as usize,
            "{} verdict entries do not fit beside the {in_use} in force (capacity {MAX_POLICY})",
            want.len()
        );
        for k in existing_verdicts.keys() {
            if k.epoch as usize == n && !want.contains_key(k) {
                self.policy.remove(k).context("deleting a stale verdict")?;
                changes.deletes += 1;
            }
        }
        for (k, v) in &want {
            if existing_verdicts.get(k) != Some(v) {
                self.policy.insert(k, v, 0).context("writing a verdict")?;
                changes.writes += 1;
            }
        }

        // 2b. per-port mTLS modes under epoch n.
        let existing_modes = read(self.mtls_ports.iter(), "mtls_ports")?;
        let want_modes: BTreeMap<MtlsPortKey, u32> = desired
            .mtls_ports
            .iter()
            .map(|(&(addr, port), &m)| {
                (
                    MtlsPortKey {
                        addr,
                        port,
                        epoch: n as u8,
                        _pad: 0,
                    },
                    m,
                )
            })
            .collect();
        for k in existing_modes.keys() {
            if k.epoch as usize == n && !want_modes.contains_key(k) {
                self.mtls_ports
                    .remove(k)
                    .context("deleting a stale mtls_ports entry")?;
                changes.deletes += 1;
            }
        }
        for (k, v) in &want_modes {
            if existing_modes.get(k) != Some(v) {
                self.mtls_ports
                    .insert(k, v, 0)
                    .context("writing mtls_ports")?;
                changes.writes += 1;
            }
        }

        // 3. flip.
        let mut next = PolicyState {
            epoch: n as u32,
            enabled: desired.enabled as u32,
            generation: st.generation.wrapping_add(1),
            events_per_sec: limits.per_sec,
            events_burst: limits.burst,
            ..Default::default()
        };
        proxy.write(&mut next);
        self.state.set(0, next, 0).context("flipping the epoch")?;
        changes.flipped = true;
        changes.epoch = next.epoch;
        changes.generation = next.generation;

        // 4. what only the old epoch used.
        for p in existing.keys() {
            if !desired.ipcache.contains_key(p) {
                if p.len == 128 {
                    self.ip_hosts
                        .remove(&p.addr)
                        .with_context(|| format!("deleting ip_hosts {p}"))?;
                }
                self.ipcache
                    .remove(&key(p))
                    .with_context(|| format!("deleting ipcache {p}"))?;
                changes.deletes += 1;
            }
        }
        for cookie in existing_eps.keys() {
            if !desired.local_eps.contains_key(cookie) {
                self.local_eps
                    .remove(cookie)
                    .context("deleting a local endpoint")?;
                changes.deletes += 1;
            }
        }
        for k in existing_verdicts.keys() {
            if k.epoch as usize == e {
                self.policy.remove(k).context("deleting an old verdict")?;
                changes.deletes += 1;
            }
        }
        for k in existing_modes.keys() {
            if k.epoch as usize == e {
                self.mtls_ports
                    .remove(k)
                    .context("deleting an old mtls_ports entry")?;
                changes.deletes += 1;
            }
        }
        Ok(changes)
    }
}
