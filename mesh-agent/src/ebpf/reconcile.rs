//! The reconciler: the only code that writes the service maps.
//!
//! It diffs the desired state against what is in the pinned maps and writes the minimum, in an order that keeps
//! every intermediate state valid for a connect that runs concurrently:
//! 1. new backends;
//! 2. per service: the slots `0..n` first, then the service entry with `count = n`, then the slots `n..old`;
//! 3. sweep: services that are no longer wanted, then slots of dead service ids, then unreferenced backends.
//!
//! It never flushes a map, so an agent restart keeps every working entry in place, and it is safe to re-run after a
//! partial failure (the next run finishes the job).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv6Addr},
};

use aya::maps::{MapError, PerCpuValues};
use mesh_common::{
    ALG_RANDOM, Backend, MAX_SERVICES, PROTO_TCP, PROTO_UDP, ServiceCounters, ServiceKey,
    ServiceValue, SlotKey, SlotValue,
};

use super::Maps;
use crate::state::{BackendAddr, DesiredState, Frontend, Proto};

/// A failed map operation, naming the map and the entry.
#[derive(Debug, thiserror::Error)]
#[error("{map}: {what}: {source}")]
pub struct ReconcileError {
    map: &'static str,
    what: String,
    #[source]
    source: MapError,
}

fn err(map: &'static str, what: impl Into<String>) -> impl FnOnce(MapError) -> ReconcileError {
    let what = what.into();
    move |source| ReconcileError { map, what, source }
}

/// What one pass changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Changes {
    pub upserts: usize,
    pub deletes: usize,
    pub services: usize,
    pub backends: usize,
}

/// Kernel address form: 16 bytes of IPv6, IPv4 v4-mapped.
pub fn addr_bytes(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// Inverse of [`addr_bytes`]; v4-mapped addresses come back as IPv4.
pub fn bytes_addr(b: &[u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(*b);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

pub fn proto_num(p: Proto) -> u8 {
    match p {
        Proto::Tcp => PROTO_TCP,
        Proto::Udp => PROTO_UDP,
    }
}

pub fn proto_name(p: u8) -> &'static str {
    match p {
        PROTO_TCP => "tcp",
        PROTO_UDP => "udp",
        _ => "other",
    }
}

pub fn service_key(f: &Frontend) -> ServiceKey {
    ServiceKey {
        addr: addr_bytes(f.ip),
        port: f.port,
        proto: proto_num(f.proto),
        _pad: 0,
    }
}

/// The kernel form of a backend of a frontend with protocol `proto`.
fn backend(b: &BackendAddr, proto: Proto) -> Backend {
    Backend {
        addr: addr_bytes(b.ip),
        port: b.port,
        proto: proto_num(proto),
        _pad: 0,
    }
}

/// Hands out the lowest free ids in `1..limit`, in one pass over the id space per reconcile (a fresh scan per
/// allocation would be quadratic in the number of new entries on a first sync).
struct Ids {
    used: BTreeSet<u32>,
    next: u32,
    limit: u32,
}

impl Ids {
    fn new(used: BTreeSet<u32>, limit: u32) -> Self {
        Self {
            used,
            next: 1,
            limit,
        }
    }

    fn take(&mut self) -> Option<u32> {
        while self.next < self.limit {
            let id = self.next;
            self.next += 1;
            if self.used.insert(id) {
                return Some(id);
            }
        }
        None
    }
}

/// Writes desired state into the maps.
pub struct Reconciler {
    pub maps: Maps,
    ncpus: usize,
}

impl Reconciler {
    pub fn new(maps: Maps) -> anyhow::Result<Self> {
        let ncpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?;
        Ok(Self { maps, ncpus })
    }

    /// Sums a service's per-CPU counters.
    pub fn counters(&self, id: u32) -> ServiceCounters {
        let mut total = ServiceCounters::default();
        if let Ok(values) = self.maps.counters.get(&id, 0) {
            for v in values.iter() {
                total.balanced += v.balanced;
                total.no_backend += v.no_backend;
            }
        }
        total
    }

    /// The service id currently assigned to a frontend, if any.
    pub fn service_id(&self, f: &Frontend) -> Option<u32> {
        self.maps
            .services
            .get(&service_key(f), 0)
            .ok()
            .map(|v| v.id)
    }

    pub fn apply(&mut self, desired: &DesiredState) -> Result<Changes, ReconcileError> {
        let mut ch = Changes::default();
        let maps = &mut self.maps;

        // Current kernel state. Iteration errors (an entry deleted under us) just skip that entry.
        let cur_services: BTreeMap<ServiceKey, ServiceValue> =
            maps.services.iter().filter_map(Result::ok).collect();
        let cur_slots: BTreeMap<SlotKey, SlotValue> =
            maps.slots.iter().filter_map(Result::ok).collect();
        let cur_backends: BTreeMap<u32, Backend> =
            maps.backends.iter().filter_map(Result::ok).collect();

        // 1. Backends: reuse ids by address, allocate the rest.
        let mut backend_ids: BTreeMap<Backend, u32> =
            cur_backends.iter().map(|(id, b)| (*b, *id)).collect();
        let mut backend_id_pool = Ids::new(cur_backends.keys().copied().collect(), u32::MAX);
        let mut wanted_backends = BTreeSet::new();
        for (f, entry) in &desired.services {
            for b in &entry.backends {
                let be = backend(b, f.proto);
                wanted_backends.insert(be);
                if backend_ids.contains_key(&be) {
                    continue;
                }
                let Some(id) = backend_id_pool.take() else {
                    return Err(ReconcileError {
                        map: "backends",
                        what: format!("no free backend id for {}:{}", b.ip, b.port),
                        source: MapError::OutOfBounds {
                            index: u32::MAX,
                            max_entries: u32::MAX,
                        },
                    });
                };
                maps.backends.insert(id, be, 0).map_err(err(
                    "backends",
                    format!("insert {} {}:{}", id, b.ip, b.port),
                ))?;
                backend_ids.insert(be, id);
                ch.upserts += 1;
            }
        }

        // 2. Services: slots first, then the count, then shrink.
        let mut service_id_pool =
            Ids::new(cur_services.values().map(|v| v.id).collect(), MAX_SERVICES);
        let mut live_ids = BTreeSet::new();
        let mut wanted_keys = BTreeSet::new();
        for (f, entry) in &desired.services {
            let key = service_key(f);
            wanted_keys.insert(key);
            let old = cur_services.get(&key).copied();
            let id = match old {
                Some(v) => v.id,
                None => {
                    let Some(id) = service_id_pool.take() else {
                        return Err(ReconcileError {
                            map: "services",
                            what: format!(
                                "no free service id for {}/{}",
                                entry.namespace, entry.name
                            ),
                            source: MapError::OutOfBounds {
                                index: MAX_SERVICES,
                                max_entries: MAX_SERVICES,
                            },
                        });
                    };
                    // A reused id must not inherit the counts of the service that had it before.
                    let zeros =
                        PerCpuValues::try_from(vec![ServiceCounters::default(); self.ncpus])
                            .expect("non-empty per-cpu values");
                    maps.counters
                        .set(id, zeros, 0)
                        .map_err(err("svc_counters", format!("reset {id}")))?;
                    id
                }
            };
            live_ids.insert(id);
            let ids: Vec<u32> = entry
                .backends
                .iter()
                .map(|b| backend_ids[&backend(b, f.proto)])
                .collect();
            for (slot, backend_id) in ids.iter().enumerate() {
                let sk = SlotKey {
                    service_id: id,
                    slot: slot as u32,
                };
                let sv = SlotValue {
                    backend_id: *backend_id,
                    _pad: 0,
                };
                if cur_slots.get(&sk) != Some(&sv) {
                    maps.slots
                        .insert(sk, sv, 0)
                        .map_err(err("svc_slots", format!("insert {id}/{slot}")))?;
                    ch.upserts += 1;
                }
            }
            let value = ServiceValue {
                id,
                count: ids.len() as u32,
                flags: 0,
                algorithm: ALG_RANDOM,
            };
            if old != Some(value) {
                maps.services.insert(key, value, 0).map_err(err(
                    "services",
                    format!(
                        "insert {}/{} {}:{}",
                        entry.namespace, entry.name, f.ip, f.port
                    ),
                ))?;
                ch.upserts += 1;
            }
            // Slots past the new count: the kernel no longer picks them.
            // SlotKey orders by (service_id, slot), so this service's tail is one range.
            let tail = SlotKey {
                service_id: id,
                slot: value.count,
            }..=SlotKey {
                service_id: id,
                slot: u32::MAX,
            };
            for sk in cur_slots.range(tail).map(|(k, _)| k) {
                remove(&mut maps.slots, sk, "svc_slots", &mut ch)?;
            }
        }

        // 3. Sweep.
        for key in cur_services.keys().filter(|k| !wanted_keys.contains(k)) {
            remove(&mut maps.services, key, "services", &mut ch)?;
        }
        for sk in cur_slots
            .keys()
            .filter(|k| !live_ids.contains(&k.service_id))
        {
            remove(&mut maps.slots, sk, "svc_slots", &mut ch)?;
        }
        for (id, b) in &cur_backends {
            if !wanted_backends.contains(b) {
                remove(&mut maps.backends, id, "backends", &mut ch)?;
            }
        }

        ch.services = desired.services.len();
        ch.backends = wanted_backends.len();
        Ok(ch)
    }
}

fn remove<K: aya::Pod + std::fmt::Debug, V: aya::Pod>(
    map: &mut aya::maps::HashMap<aya::maps::MapData, K, V>,
    key: &K,
    name: &'static str,
    ch: &mut Changes,
) -> Result<(), ReconcileError> {
    match map.remove(key) {
        Ok(()) => {
            ch.deletes += 1;
            Ok(())
        }
        // Already gone (for instance removed by a concurrent agent during a rolling restart): that is the goal.
        Err(MapError::KeyNotFound) => Ok(()),
        Err(e) => Err(err(name, format!("remove {key:?}"))(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip() {
        for s in ["10.96.0.10", "::1", "fd00::5", "255.255.255.255"] {
            let ip: IpAddr = s.parse().unwrap();
            assert_eq!(bytes_addr(&addr_bytes(ip)), ip, "{s}");
        }
    }

    #[test]
    fn ipv4_is_v4_mapped_in_network_order() {
        let b = addr_bytes("10.96.0.10".parse().unwrap());
        assert!(mesh_common::is_v4_mapped(&b));
        assert_eq!(&b[12..], [10, 96, 0, 10]);
        // The eBPF side builds the same bytes from user_ip4 (network order).
        assert_eq!(
            mesh_common::v4_mapped(u32::from_ne_bytes([10, 96, 0, 10])),
            b
        );
        assert_eq!(mesh_common::from_words(mesh_common::to_words(&b)), b);
    }

    #[test]
    fn allocation_takes_the_lowest_free_ids_in_order() {
        let mut ids = Ids::new([1, 2, 4].into_iter().collect(), 7);
        assert_eq!(ids.take(), Some(3));
        assert_eq!(ids.take(), Some(5));
        assert_eq!(ids.take(), Some(6));
        assert_eq!(ids.take(), None, "7 is the limit");
        assert_eq!(Ids::new((1..10).collect(), 10).take(), None);
    }

    #[test]
    fn slot_keys_order_by_service_then_slot() {
        // The reconciler's per-service range query over the slots relies on this order.
        let a = SlotKey {
            service_id: 1,
            slot: 9,
        };
        let b = SlotKey {
            service_id: 2,
            slot: 0,
        };
        assert!(a < b);
    }
}
