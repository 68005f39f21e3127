//! The BTF maps. Names match `mesh_common::map_names`; the agent pins each under `<bpffs-root>/maps/<name>`.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use mesh_common::{
    AbiRecord, Backend, MAX_BACKENDS, MAX_REV_NAT, MAX_SERVICES, MAX_SLOTS, RevNatKey, RevNatValue,
    ServiceCounters, ServiceKey, ServiceValue, SlotKey, SlotValue,
};

// Only the agent writes services, slots and backends; allocating on insert keeps an idle node's memory small.
const NO_PREALLOC: usize = BPF_F_NO_PREALLOC as usize;

#[btf_map(name = "services")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue, { MAX_SERVICES as usize }, NO_PREALLOC> =
    HashMap::new();

#[btf_map(name = "svc_slots")]
pub static SLOTS: HashMap<SlotKey, SlotValue, { MAX_SLOTS as usize }, NO_PREALLOC> = HashMap::new();

#[btf_map(name = "backends")]
pub static BACKENDS: HashMap<u32, Backend, { MAX_BACKENDS as usize }, NO_PREALLOC> = HashMap::new();

#[btf_map(name = "rev_nat")]
pub static REV_NAT: LruHashMap<RevNatKey, RevNatValue, { MAX_REV_NAT as usize }> =
    LruHashMap::new();

#[btf_map(name = "svc_counters")]
pub static COUNTERS: PerCpuArray<ServiceCounters, { MAX_SERVICES as usize }> = PerCpuArray::new();

/// Written by the agent only; present in the object so it is created and pinned with the rest.
#[btf_map(name = "abi")]
pub static ABI: Array<AbiRecord, 1> = Array::new();
