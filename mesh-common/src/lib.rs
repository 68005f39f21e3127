//! The kernel/user contract of Sinew: every map key and value the eBPF programs and the agent share.
//!
//! Rules (design.md, "Kernel/user contract"):
//! - every type is `#[repr(C)]` with explicit, zeroed padding, so the byte layout is the same on both sides and
//!   `bpftool map dump` prints every field by name (the maps are BTF maps);
//! - each type has a size assertion, and [`ABI_HASH`] folds all sizes into one number that the agent pins, so a new
//!   agent never reuses pinned maps whose layout it does not understand;
//! - addresses are 16 bytes of IPv6 in network order; IPv4 is stored v4-mapped (`::ffff:a.b.c.d`), so one map
//!   serves `connect4` and `connect6` (including v4-mapped destinations on IPv6 sockets); ports are in host order.
//!   Both choices are for operators: `bpftool map dump` then shows `[..,255,255,10,96,0,10]` and `80`.
#![no_std]

pub mod accel;
pub mod policy;

/// Bumped by hand whenever the meaning (not only the size) of a map changes.
pub const ABI_VERSION: u32 = 8;

/// `IPPROTO_TCP`.
pub const PROTO_TCP: u8 = 6;
/// `IPPROTO_UDP`.
pub const PROTO_UDP: u8 = 17;

/// Capacity of the services map (one entry per VIP, port and protocol).
pub const MAX_SERVICES: u32 = 16384;
/// Capacity of the backend slot map (sum of slots over all services).
pub const MAX_SLOTS: u32 = 131072;
/// Capacity of the backends map.
pub const MAX_BACKENDS: u32 = 65536;
/// Capacity of the reverse-NAT LRU (one entry per live socket that went through a VIP).
pub const MAX_REV_NAT: u32 = 65536;

/// Service ids index the per-CPU counter array, so they live in `1..MAX_SERVICES`; 0 is never used.
pub const SERVICE_ID_NONE: u32 = 0;

/// Map names as the kernel and `bpftool` show them (at most 15 characters) and as pinned under `<bpffs>/maps/`.
pub mod map_names {
    /// [`crate::ServiceKey`] -> [`crate::ServiceValue`].
    pub const SERVICES: &str = "services";
    /// [`crate::SlotKey`] -> [`crate::SlotValue`].
    pub const SLOTS: &str = "svc_slots";
    /// backend id (`u32`) -> [`crate::Backend`].
    pub const BACKENDS: &str = "backends";
    /// [`crate::RevNatKey`] -> [`crate::RevNatValue`] (LRU).
    pub const REV_NAT: &str = "rev_nat";
    /// service id (`u32`, array index) -> per-CPU [`crate::ServiceCounters`].
    pub const COUNTERS: &str = "svc_counters";
    /// index 0 -> [`crate::AbiRecord`].
    pub const ABI: &str = "abi";
    /// LPM trie: address -> [`crate::policy::IpInfo`].
    pub const IPCACHE: &str = "ipcache";
    /// Exact address (16 bytes) -> [`crate::policy::IpInfo`]: the single-address entries of `ipcache` again, in
    /// a hash, so that pods and nodes (nearly every lookup) cost one hash lookup instead of a trie walk.
    pub const IP_HOSTS: &str = "ip_hosts";
    /// netns cookie (`u64`) -> [`crate::policy::LocalEndpoint`].
    pub const LOCAL_EPS: &str = "local_eps";
    /// [`crate::policy::PolicyKey`] -> [`crate::policy::PolicyValue`].
    pub const POLICY: &str = "policy";
    /// index 0 -> [`crate::policy::PolicyState`].
    pub const POLICY_STATE: &str = "pol_state";
    /// [`crate::policy::counter`] index -> per-CPU `u64`.
    pub const POLICY_COUNTERS: &str = "pol_counters";
    /// index 0 -> per-CPU [`crate::policy::RateLimit`].
    pub const POLICY_RATELIMIT: &str = "pol_ratelim";
    /// [`crate::policy::FlowKey`] -> [`crate::policy::FlowValue`] (LRU).
    pub const UDP_FLOWS: &str = "udp_flows";
    /// Ring buffer of [`crate::policy::PolicyEvent`].
    pub const POLICY_EVENTS: &str = "pol_events";
    /// [`crate::policy::UdpReplyKey`] -> [`crate::policy::UdpPeer`] (LRU).
    pub const UDP_REPLIES: &str = "udp_replies";
    /// [`crate::policy::MtlsPortKey`] -> `u32` mode: ports of enrolled workloads with their own mTLS mode.
    pub const MTLS_PORTS: &str = "mtls_ports";
    /// socket cookie (`u64`) -> [`crate::policy::OrigDst`] (LRU): redirected connects not yet established.
    pub const PROXY_PENDING: &str = "proxy_pending";
    /// [`crate::policy::OrigKey`] -> [`crate::policy::OrigDst`] (LRU): redirected connections waiting for the
    /// node proxy to accept them.
    pub const PROXY_ORIG: &str = "proxy_orig";
    /// SockHash of accelerated same-node sockets (issue 6), by [`crate::accel::SockKey`].
    pub const SK_CONNS: &str = "sk_conns";
    /// The client end of each accelerated connection (LRU), for re-judging it when policy changes.
    pub const SK_CLIENTS: &str = "sk_clients";
    /// Local pod address -> the pod's netns cookie: who may be accelerated, and the peer half of the key.
    pub const SK_PODS: &str = "sk_pods";
    /// Per-CPU acceleration counters, by [`crate::accel::counter`] index.
    pub const SK_COUNTERS: &str = "sk_counters";
    /// Per-socket acceleration state (socket storage): whether the socket fell back to the stack for good.
    pub const SK_STATE: &str = "sk_state";
    /// Every map, in the order the agent creates and pins them.
    pub const ALL: [&str; 24] = [
        SERVICES,
        SLOTS,
        BACKENDS,
        REV_NAT,
        COUNTERS,
        IPCACHE,
        IP_HOSTS,
        LOCAL_EPS,
        POLICY,
        POLICY_STATE,
        POLICY_COUNTERS,
        POLICY_RATELIMIT,
        UDP_FLOWS,
        UDP_REPLIES,
        POLICY_EVENTS,
        MTLS_PORTS,
        PROXY_PENDING,
        PROXY_ORIG,
        SK_CONNS,
        SK_CLIENTS,
        SK_PODS,
        SK_COUNTERS,
        SK_STATE,
        ABI,
    ];
}

/// A service frontend: VIP, port and protocol. Slot 0 of the classic Cilium layout is this map's value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// IPv6 address bytes (network order); IPv4 is v4-mapped.
    pub addr: [u8; 16],
    /// Port, host byte order.
    pub port: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 20);

/// Service flags (bit set in [`ServiceValue::flags`]).
pub mod service_flags {
    /// Reserved for client affinity (later issue).
    pub const AFFINITY: u32 = 1 << 0;
}

/// What a service frontend resolves to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    /// Stable id, chosen by the agent; keys the slots and indexes the counters.
    pub id: u32,
    /// Number of slots `0..count` in the slot map. 0 means "no ready backend": connect fails at once.
    pub count: u32,
    /// [`service_flags`].
    pub flags: u32,
    /// Selection algorithm; only [`ALG_RANDOM`] for now. Weighted backends repeat slots, Maglev fills a table of
    /// slots, so neither needs a new layout.
    pub algorithm: u32,
}
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 16);

/// Pick a slot uniformly at random (per connect; per socket for unconnected UDP).
pub const ALG_RANDOM: u32 = 0;

/// One slot of a service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotKey {
    pub service_id: u32,
    /// `0..ServiceValue::count`.
    pub slot: u32,
}
const _: () = assert!(core::mem::size_of::<SlotKey>() == 8);

/// The backend a slot points at.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotValue {
    pub backend_id: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<SlotValue>() == 8);

/// A backend address (keyed by a `u32` backend id chosen by the agent).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    /// IPv6 address bytes (network order); IPv4 is v4-mapped.
    pub addr: [u8; 16],
    /// Port, host byte order.
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<Backend>() == 20);

/// Reverse NAT for one socket and the backend it was sent to, so `getpeername` and `recvmsg` show the VIP.
/// Keyed by the socket cookie (unique per boot) and the backend address, because one unconnected UDP socket can
/// talk to several services.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RevNatKey {
    pub cookie: u64,
    pub addr: [u8; 16],
    pub port: u16,
    pub _pad: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<RevNatKey>() == 32);

/// The VIP frontend a reverse-NAT entry restores.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RevNatValue {
    pub addr: [u8; 16],
    pub port: u16,
    pub _pad: u16,
    pub service_id: u32,
}
const _: () = assert!(core::mem::size_of::<RevNatValue>() == 24);

/// Per-service, per-CPU counters.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceCounters {
    /// Connects (and first UDP sends per socket) rewritten to a backend.
    pub balanced: u64,
    /// Connects and sends refused because the service had no ready backend.
    pub no_backend: u64,
}
const _: () = assert!(core::mem::size_of::<ServiceCounters>() == 16);

/// The record pinned as `abi[0]`: which layout the pinned maps have.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AbiRecord {
    pub version: u32,
    pub layout_hash: u32,
}
const _: () = assert!(core::mem::size_of::<AbiRecord>() == 8);

/// A hash of every shared layout; changes whenever a size or [`ABI_VERSION`] changes.
pub const ABI_HASH: u32 = {
    let parts = [
        ABI_VERSION as usize,
        core::mem::size_of::<ServiceKey>(),
        core::mem::size_of::<ServiceValue>(),
        core::mem::size_of::<SlotKey>(),
        core::mem::size_of::<SlotValue>(),
        core::mem::size_of::<Backend>(),
        core::mem::size_of::<RevNatKey>(),
        core::mem::size_of::<RevNatValue>(),
        core::mem::size_of::<ServiceCounters>(),
        MAX_SERVICES as usize,
        MAX_SLOTS as usize,
        MAX_BACKENDS as usize,
        MAX_REV_NAT as usize,
        core::mem::size_of::<policy::IpInfo>(),
        core::mem::size_of::<policy::LocalEndpoint>(),
        core::mem::size_of::<policy::PolicyKey>(),
        core::mem::size_of::<policy::PolicyValue>(),
        core::mem::size_of::<policy::PolicyState>(),
        core::mem::size_of::<policy::FlowKey>(),
        core::mem::size_of::<policy::FlowValue>(),
        core::mem::size_of::<policy::RateLimit>(),
        core::mem::size_of::<policy::PolicyEvent>(),
        policy::MAX_IPCACHE as usize,
        policy::MAX_LOCAL_EPS as usize,
        policy::MAX_POLICY as usize,
        policy::MAX_UDP_FLOWS as usize,
        core::mem::size_of::<policy::UdpReplyKey>(),
        core::mem::size_of::<policy::UdpPeer>(),
        policy::MAX_UDP_REPLIES as usize,
        policy::EVENTS_RING_BYTES as usize,
        policy::counter::COUNT as usize,
        core::mem::size_of::<policy::MtlsPortKey>(),
        core::mem::size_of::<policy::OrigDst>(),
        core::mem::size_of::<policy::OrigKey>(),
        policy::MAX_MTLS_PORTS as usize,
        policy::MAX_PROXY_CONNS as usize,
        core::mem::size_of::<accel::SockKey>(),
        core::mem::size_of::<accel::AccelConn>(),
        accel::MAX_SOCK_CONNS as usize,
        accel::MAX_SOCK_PODS as usize,
        accel::counter::COUNT as usize,
    ];
    // FNV-1a over the parts: const-evaluable and stable across builds.
    let mut h: u32 = 0x811c_9dc5;
    let mut i = 0;
    while i < parts.len() {
        h ^= parts[i] as u32;
        h = h.wrapping_mul(0x0100_0193);
        i += 1;
    }
    h
};

/// The v4-mapped form (`::ffff:a.b.c.d`) of an IPv4 address given in network byte order, as
/// `bpf_sock_addr.user_ip4` holds it.
#[inline(always)]
pub const fn v4_mapped(ip4_be: u32) -> [u8; 16] {
    let b = ip4_be.to_ne_bytes();
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, b[0], b[1], b[2], b[3],
    ]
}

/// Whether an address is v4-mapped (`::ffff:a.b.c.d`).
#[inline(always)]
pub const fn is_v4_mapped(a: &[u8; 16]) -> bool {
    a[0] == 0
        && a[1] == 0
        && a[2] == 0
        && a[3] == 0
        && a[4] == 0
        && a[5] == 0
        && a[6] == 0
        && a[7] == 0
        && a[8] == 0
        && a[9] == 0
        && a[10] == 0xff
        && a[11] == 0xff
}

/// The IPv4 part of a v4-mapped address, in network byte order (for `user_ip4`).
#[inline(always)]
pub const fn v4_of(a: &[u8; 16]) -> u32 {
    u32::from_ne_bytes([a[12], a[13], a[14], a[15]])
}

/// 16 address bytes from the four network-order words of `bpf_sock_addr.user_ip6`.
#[inline(always)]
pub const fn from_words(w: [u32; 4]) -> [u8; 16] {
    let (a, b, c, d) = (
        w[0].to_ne_bytes(),
        w[1].to_ne_bytes(),
        w[2].to_ne_bytes(),
        w[3].to_ne_bytes(),
    );
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}

/// The four network-order words of `bpf_sock_addr.user_ip6` from 16 address bytes.
#[inline(always)]
pub const fn to_words(a: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}

#[cfg(feature = "user")]
mod user {
    //! `aya::Pod` lets the agent read and write these types through aya's typed maps.
    #![allow(unsafe_code)]
    use super::*;
    // SAFETY: all of these are repr(C), contain only integers, and have no implicit padding (sizes are asserted).
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for SlotKey {}
    unsafe impl aya::Pod for SlotValue {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for RevNatKey {}
    unsafe impl aya::Pod for RevNatValue {}
    unsafe impl aya::Pod for ServiceCounters {}
    unsafe impl aya::Pod for AbiRecord {}
    unsafe impl aya::Pod for policy::IpInfo {}
    unsafe impl aya::Pod for policy::LocalEndpoint {}
    unsafe impl aya::Pod for policy::PolicyKey {}
    unsafe impl aya::Pod for policy::PolicyValue {}
    unsafe impl aya::Pod for policy::PolicyState {}
    unsafe impl aya::Pod for policy::FlowKey {}
    unsafe impl aya::Pod for policy::FlowValue {}
    unsafe impl aya::Pod for policy::RateLimit {}
    unsafe impl aya::Pod for policy::PolicyEvent {}
    unsafe impl aya::Pod for policy::UdpReplyKey {}
    unsafe impl aya::Pod for policy::MtlsPortKey {}
    unsafe impl aya::Pod for policy::OrigDst {}
    unsafe impl aya::Pod for policy::OrigKey {}
    unsafe impl aya::Pod for policy::UdpPeer {}
    unsafe impl aya::Pod for accel::SockKey {}
    unsafe impl aya::Pod for accel::AccelConn {}
}
