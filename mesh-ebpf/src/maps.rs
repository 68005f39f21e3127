//! The BTF maps. Names match `mesh_common::map_names`; the agent pins each under `<bpffs-root>/maps/<name>`.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, SkStorage, SockHash},
    macros::btf_map,
};
use mesh_common::{
    AbiRecord, Backend, MAX_BACKENDS, MAX_REV_NAT, MAX_SERVICES, MAX_SLOTS, RevNatKey, RevNatValue,
    ServiceCounters, ServiceKey, ServiceValue, SlotKey, SlotValue,
    accel::{AccelConn, MAX_SOCK_CONNS, MAX_SOCK_PODS, SockKey, counter as accel_counter},
    policy::{
        EVENTS_RING_BYTES, FlowKey, FlowValue, IpInfo, LocalEndpoint, MAX_IPCACHE, MAX_LOCAL_EPS,
        MAX_MTLS_PORTS, MAX_POLICY, MAX_PROXY_CONNS, MAX_UDP_FLOWS, MAX_UDP_REPLIES, MtlsPortKey,
        OrigDst, OrigKey, PolicyEvent, PolicyKey, PolicyState, PolicyValue, RateLimit, UdpPeer,
        UdpReplyKey, counter,
    },
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

#[btf_map(name = "ipcache")]
pub static IPCACHE: LpmTrie<[u8; 16], IpInfo, { MAX_IPCACHE as usize }> = LpmTrie::new();

#[btf_map(name = "ip_hosts")]
pub static IP_HOSTS: HashMap<[u8; 16], IpInfo, { MAX_IPCACHE as usize }, NO_PREALLOC> =
    HashMap::new();

#[btf_map(name = "local_eps")]
pub static LOCAL_EPS: HashMap<u64, LocalEndpoint, { MAX_LOCAL_EPS as usize }, NO_PREALLOC> =
    HashMap::new();

#[btf_map(name = "policy")]
pub static POLICY: HashMap<PolicyKey, PolicyValue, { MAX_POLICY as usize }, NO_PREALLOC> =
    HashMap::new();

#[btf_map(name = "pol_state")]
pub static POLICY_STATE: Array<PolicyState, 1> = Array::new();

#[btf_map(name = "pol_counters")]
pub static POLICY_COUNTERS: PerCpuArray<u64, { counter::COUNT as usize }> = PerCpuArray::new();

#[btf_map(name = "pol_ratelim")]
pub static POLICY_RATELIMIT: PerCpuArray<RateLimit, 1> = PerCpuArray::new();

#[btf_map(name = "udp_flows")]
pub static UDP_FLOWS: LruHashMap<FlowKey, FlowValue, { MAX_UDP_FLOWS as usize }> =
    LruHashMap::new();

#[btf_map(name = "udp_replies")]
pub static UDP_REPLIES: LruHashMap<UdpReplyKey, UdpPeer, { MAX_UDP_REPLIES as usize }> =
    LruHashMap::new();

#[btf_map(name = "pol_events")]
pub static POLICY_EVENTS: RingBuf<PolicyEvent, { EVENTS_RING_BYTES as usize }> = RingBuf::new();

#[btf_map(name = "mtls_ports")]
pub static MTLS_PORTS: HashMap<MtlsPortKey, u32, { MAX_MTLS_PORTS as usize }, NO_PREALLOC> =
    HashMap::new();

#[btf_map(name = "proxy_pending")]
pub static PROXY_PENDING: LruHashMap<u64, OrigDst, { MAX_PROXY_CONNS as usize }> =
    LruHashMap::new();

#[btf_map(name = "proxy_orig")]
pub static PROXY_ORIG: LruHashMap<OrigKey, OrigDst, { MAX_PROXY_CONNS as usize }> =
    LruHashMap::new();

/// Accelerated same-node sockets (issue 6); the accel sk_msg program is attached to this map.
#[btf_map(name = "sk_conns")]
pub static SK_CONNS: SockHash<SockKey, { MAX_SOCK_CONNS as usize }> = SockHash::new();

#[btf_map(name = "sk_clients")]
pub static SK_CLIENTS: LruHashMap<SockKey, AccelConn, { MAX_SOCK_CONNS as usize }> =
    LruHashMap::new();

#[btf_map(name = "sk_pods")]
pub static SK_PODS: HashMap<[u8; 16], u64, { MAX_SOCK_PODS as usize }, NO_PREALLOC> =
    HashMap::new();

#[btf_map(name = "sk_counters")]
pub static SK_COUNTERS: PerCpuArray<u64, { accel_counter::COUNT as usize }> = PerCpuArray::new();

/// Per-socket acceleration state (flags), freed with the socket.
#[btf_map(name = "sk_state")]
pub static SK_STATE: SkStorage<u32> = SkStorage::new();
