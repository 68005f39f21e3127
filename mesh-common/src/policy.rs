//! The policy half of the kernel/user contract (issue 3): identities, the IP cache, local endpoints, the compiled
//! verdict table, the UDP flow cache, counters and the denial events.
//!
//! # How a verdict is found (O(1) per new connection)
//!
//! The agent compiles every `AuthorizationPolicy` into classes (see `mesh-agent/src/policy/compile.rs`):
//! - a **destination class** is a set of workloads the same policies apply to (class 0: none apply, allow all);
//! - a **source class** is a set of sources no policy can tell apart (same identity, same `ipBlocks` membership;
//!   class 0 is an unknown, unauthenticated address outside every block).
//!
//! The kernel then finds the source class (local pod: [`LocalEndpoint`] by netns cookie; anyone: [`IpInfo`] by
//! longest-prefix match on the address), the destination class ([`IpInfo`] of the destination address), and looks
//! up `policy[{dst, src, port}]`, then `policy[{dst, src, 0}]` (any port), then the destination's default
//! ([`DST_DEFAULT_DENY`]).
//!
//! # Atomic updates: two epochs
//!
//! Every class-carrying value has two slots and every verdict key an epoch. The agent writes the whole new
//! compilation into the inactive epoch, flips [`PolicyState::epoch`] with one array write, and only then deletes
//! what the old epoch used. A connection is judged entirely by the old policy set or entirely by the new one,
//! never by a mix.

/// Identities: `u32`s, one per (namespace, service account), plus reserved values below
/// [`identity::FIRST_WORKLOAD`].
pub mod identity {
    /// No identity known (an unknown local socket).
    pub const UNKNOWN: u32 = 0;
    /// Any address that is not a known pod or node: outside the mesh.
    pub const WORLD: u32 = 1;
    /// A node's own address (kubelet probes, host-network pods).
    pub const HOST: u32 = 2;
    /// The node proxy (issue 4).
    pub const NODE_PROXY: u32 = 3;
    /// Workload identities are at or above this value.
    pub const FIRST_WORKLOAD: u32 = 256;
}

/// Capacity of `ipcache`: pod IPs, node IPs and policy `ipBlocks`.
pub const MAX_IPCACHE: u32 = 131072;
/// Capacity of `local_eps`: pods on this node.
pub const MAX_LOCAL_EPS: u32 = 16384;
/// Capacity of `policy`. Both epochs share it, so one compilation may use at most half.
pub const MAX_POLICY: u32 = 262144;
/// Capacity of the UDP flow cache (LRU).
pub const MAX_UDP_FLOWS: u32 = 65536;
/// Size of the denial event ring buffer in bytes (a power of two, a multiple of the page size).
pub const EVENTS_RING_BYTES: u32 = 256 * 1024;

/// Class ids carry [`DST_DEFAULT_DENY`] in their top bit; the id is the rest.
pub const CLASS_ID_MASK: u32 = 0x7fff_ffff;
/// In a destination class: an ALLOW policy applies, so what no entry allows is denied.
pub const DST_DEFAULT_DENY: u32 = 1 << 31;
/// In a [`LocalEndpoint`] slot: not enforced on the client side in this epoch (a pod that is new since).
pub const CLASS_SKIP: u32 = u32::MAX;

/// Verdicts in [`PolicyValue::verdict`].
pub const VERDICT_ALLOW: u8 = 1;
pub const VERDICT_DENY: u8 = 2;
/// [`PolicyValue::flags`]: an AUDIT policy matched; report the connection.
pub const VERDICT_FLAG_AUDIT: u8 = 1;
/// [`PolicyEvent::flags`]: refused by STRICT mTLS (a plaintext connection to a port only the node proxy may
/// reach), not by an `AuthorizationPolicy`.
pub const VERDICT_FLAG_STRICT: u8 = 2;

/// Key data of the `ipcache` LPM trie (behind the kernel's `u32` prefix length, which counts over all 128 bits:
/// an IPv4 `/24` is stored as `::ffff:a.b.c.0/120`).
pub type IpCacheKey = [u8; 16];

/// One epoch's view of an address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IpSlot {
    /// Numeric identity (see [`identity`]).
    pub identity: u32,
    /// Source class of a connection from this address.
    pub src_class: u32,
    /// Destination class of a connection to this address, with [`DST_DEFAULT_DENY`]; 0: no policy applies.
    pub dst_class: u32,
    /// [`MESH_ENROLLED`], [`MESH_STRICT`], [`MESH_PORT_MODES`] (issue 4): how the node proxy is involved.
    pub mesh: u32,
}
const _: () = assert!(core::mem::size_of::<IpSlot>() == 16);

/// `ipcache` value: the address's identity and classes, per epoch.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IpInfo {
    pub slots: [IpSlot; 2],
}
const _: () = assert!(core::mem::size_of::<IpInfo>() == 32);

/// [`IpSlot::mesh`]: the address is an enrolled workload. An enrolled local client's TCP connection to it is
/// redirected to the node proxy, which carries it (over mTLS between nodes).
pub const MESH_ENROLLED: u32 = 1;
/// [`IpSlot::mesh`]: the workload's `PeerAuthentication` mode is STRICT on every TCP port without an entry in
/// `mtls_ports`: only the node proxy may connect.
pub const MESH_STRICT: u32 = 2;
/// [`IpSlot::mesh`]: some ports have their own mode (`portLevelMtls`): look the port up in `mtls_ports` first.
pub const MESH_PORT_MODES: u32 = 4;
/// [`IpSlot::mesh`]: the workload's mode is DISABLE on every TCP port without an entry in `mtls_ports`: no mTLS,
/// so connections to it are not redirected to the proxy.
pub const MESH_DISABLE: u32 = 8;

/// `mtls_ports` key: a port of an enrolled workload with its own mTLS mode, per epoch.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MtlsPortKey {
    pub addr: [u8; 16],
    /// Host order.
    pub port: u16,
    /// 0 or 1, see [`PolicyState::epoch`].
    pub epoch: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<MtlsPortKey>() == 20);

/// `mtls_ports` value, and the mode of a port as the kernel sees it: PERMISSIVE (proxy or plaintext).
pub const MTLS_PORT_PERMISSIVE: u32 = 0;
/// STRICT: only the node proxy may connect.
pub const MTLS_PORT_STRICT: u32 = 1;
/// DISABLE: plaintext; enrolled clients are not redirected to the proxy for this port.
pub const MTLS_PORT_DISABLE: u32 = 2;
/// Capacity of `mtls_ports` (both epochs).
pub const MAX_MTLS_PORTS: u32 = 16384;

/// The original destination of a connection redirected to the node proxy, and who made it: written by the
/// connect hook (`proxy_pending`, by socket cookie), moved by sock_ops when the connection is established
/// (`proxy_orig`, by the client's address and port as the proxy sees them). The proxy reads and deletes it.
/// Everything in it comes from the kernel: the client cannot forge its identity or the destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    pub addr: [u8; 16],
    /// Host order.
    pub port: u16,
    pub _pad: u16,
    /// The client's numeric identity.
    pub identity: u32,
    /// The client pod's netns cookie: the agent maps it back to the pod.
    pub netns_cookie: u64,
}
const _: () = assert!(core::mem::size_of::<OrigDst>() == 32);

/// `proxy_orig` key: the redirected client's address and port (as the proxy's accepted socket sees its peer).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct OrigKey {
    pub addr: [u8; 16],
    /// Host order.
    pub port: u16,
    pub _pad: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<OrigKey>() == 24);

/// Capacity of `proxy_pending` and `proxy_orig` (LRU: an entry whose connection never completes ages out).
pub const MAX_PROXY_CONNS: u32 = 65536;

/// One epoch's view of a local pod, as a client.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LocalSlot {
    pub identity: u32,
    /// Source class when the pod connects over IPv4, or [`CLASS_SKIP`].
    pub src_class4: u32,
    /// Source class when the pod connects over IPv6, or [`CLASS_SKIP`].
    pub src_class6: u32,
    /// [`LOCAL_POLICED`], [`LOCAL_ENROLLED`].
    pub flags: u32,
}

/// [`LocalSlot::flags`]: a policy applies to the pod itself (for operators reading the map; the programs record
/// every pod's UDP peers either way).
pub const LOCAL_POLICED: u32 = 1;
/// [`LocalSlot::flags`]: the pod is enrolled in the mesh: its TCP connections to enrolled workloads go through
/// the node proxy.
pub const LOCAL_ENROLLED: u32 = 2;
const _: () = assert!(core::mem::size_of::<LocalSlot>() == 16);

/// `local_eps` value, keyed by the pod's netns cookie (`u64`): who a local socket belongs to. The kernel tells
/// us the netns of the connecting socket, so a pod cannot claim another pod's identity.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LocalEndpoint {
    pub slots: [LocalSlot; 2],
}
const _: () = assert!(core::mem::size_of::<LocalEndpoint>() == 32);

/// `policy` key. `port` 0 is the entry for every port without its own entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    /// Destination class id (without [`DST_DEFAULT_DENY`]).
    pub dst_class: u32,
    pub src_class: u32,
    /// Destination (target) port, host order; 0: any.
    pub port: u16,
    /// 0 or 1, see [`PolicyState::epoch`].
    pub epoch: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<PolicyKey>() == 12);

/// `policy` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyValue {
    /// [`VERDICT_ALLOW`] or [`VERDICT_DENY`].
    pub verdict: u8,
    /// [`VERDICT_FLAG_AUDIT`].
    pub flags: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<PolicyValue>() == 4);

/// `pol_state[0]`: global policy switches, written by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyState {
    /// The epoch (0 or 1) the kernel reads.
    pub epoch: u32,
    /// 0: no policy applies anywhere, every check is skipped.
    pub enabled: u32,
    /// Bumped on every flip; UDP flows judged under an older generation are judged again.
    pub generation: u32,
    /// Denial events per second per CPU before events are dropped (and counted).
    pub events_per_sec: u32,
    /// How many events a CPU may send at once after being quiet.
    pub events_burst: u32,
    /// The node proxy's outbound port (host order); 0: no redirect (the proxy is off).
    pub proxy_port: u32,
    /// Where redirected IPv4 connections go (v4-mapped).
    pub proxy_addr4: [u8; 16],
    /// Where redirected IPv6 connections go; all zero: IPv6 is not redirected.
    pub proxy_addr6: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<PolicyState>() == 56);

/// `udp_flows` key: one UDP flow as it arrives at a local socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Host order.
    pub sport: u16,
    /// Host order.
    pub dport: u16,
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 36);

/// How long a UDP peer counts as answering (after the last datagram to it, or accepted from it), as conntrack's
/// UDP timeout.
pub const UDP_PEER_TIMEOUT_NS: u64 = 120_000_000_000;
/// [`UdpPeer::sent_ns`] of a connected UDP socket: its one peer answers for as long as the entry lives.
pub const UDP_PEER_CONNECTED: u64 = u64::MAX;

/// `udp_flows` value: an inbound flow judged and allowed at ingress.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    /// [`PolicyState::generation`] when judged; another generation judges the flow again.
    pub generation: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<FlowValue>() == 8);

/// Capacity of the UDP peer table (LRU).
pub const MAX_UDP_REPLIES: u32 = 65536;

/// `udp_replies` key: a local UDP socket and one of its peers. Datagrams between them in the direction opposite
/// to the one recorded are answers, which policy lets through as conntrack would:
/// - the socket sent to the peer (recorded at `connect()`/`sendmsg()`): the peer's datagrams back get in even if
///   the socket's own workload is under default deny;
/// - the socket accepted a datagram from a workload under policy: it may answer even if that workload's policy
///   would refuse a flow from it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct UdpReplyKey {
    /// Socket cookie of the receiving socket.
    pub cookie: u64,
    pub addr: [u8; 16],
    /// Host order.
    pub port: u16,
    pub _pad: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<UdpReplyKey>() == 32);

/// `udp_replies` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UdpPeer {
    /// `bpf_ktime_get_ns()` of the last datagram the socket sent to the peer; [`UDP_PEER_CONNECTED`] for a
    /// connected socket; 0: never.
    pub sent_ns: u64,
    /// `bpf_ktime_get_ns()` of the last datagram accepted from the peer; 0: never.
    pub accepted_ns: u64,
    /// Who started the exchange: [`UDP_PEER_SENT`] (the socket) or [`UDP_PEER_ACCEPTED`] (the peer). Only the
    /// other side's datagrams are answers; the starter's keep being judged, so a revocation reaches them.
    pub initiator: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<UdpPeer>() == 24);

/// [`UdpPeer::initiator`]: the local socket sent first.
pub const UDP_PEER_SENT: u32 = 1;
/// [`UdpPeer::initiator`]: the peer sent first and the local socket accepted it.
pub const UDP_PEER_ACCEPTED: u32 = 2;

/// Indexes into the per-CPU `pol_counters` array (one `u64` each).
pub mod counter {
    /// Connects/sends refused by the client-side check.
    pub const DENIED_EGRESS: u32 = 0;
    /// First packets dropped by the server-side check.
    pub const DENIED_INGRESS: u32 = 1;
    /// Connections an AUDIT policy matched.
    pub const AUDITED: u32 = 2;
    /// Events written to the ring buffer.
    pub const EVENTS_SENT: u32 = 3;
    /// Events not written: over the rate limit, or the ring buffer was full.
    pub const EVENTS_DROPPED: u32 = 4;
    /// Connections the client-side check allowed (policy applied to the destination).
    pub const ALLOWED_EGRESS: u32 = 5;
    /// First packets the server-side check allowed (policy applied to the destination).
    pub const ALLOWED_INGRESS: u32 = 6;
    /// UDP datagrams passed by the flow cache without a policy lookup.
    pub const UDP_FLOW_HITS: u32 = 7;
    /// UDP datagrams let through as answers to a peer (`udp_replies`), either way.
    pub const UDP_REPLIES: u32 = 8;
    /// TCP connections refused because the destination port is STRICT and the source is not the node proxy
    /// (client side: EACCES; server side: SYN dropped). Also counted in the denied counters.
    pub const STRICT_DENIED: u32 = 9;
    /// Connections redirected to the node proxy at `connect()`.
    pub const PROXY_REDIRECTED: u32 = 10;
    /// First packets from the node proxy to an enrolled workload, passed without a policy lookup (the proxy
    /// already applied policy with the authenticated identity).
    pub const PROXY_INGRESS: u32 = 11;
    /// Workload connects to the node proxy's own address, refused (loops, probing).
    pub const PROXY_REFUSED: u32 = 12;
    pub const COUNT: u32 = 13;
}

/// Per-CPU token bucket for events, `pol_ratelim[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimit {
    /// Tokens, scaled by 1e9 (one event = 1e9), so refills need no division.
    pub tokens: u64,
    pub last_ns: u64,
}
const _: () = assert!(core::mem::size_of::<RateLimit>() == 16);

/// [`PolicyEvent::direction`]: decided at the client's `connect()`/`sendmsg()`.
pub const DIR_EGRESS: u8 = 1;
/// [`PolicyEvent::direction`]: decided at the server's ingress (first packet).
pub const DIR_INGRESS: u8 = 2;

/// One verdict reported through `pol_events` (a ring buffer): every denial, and every connection an AUDIT policy
/// matched, until the rate limit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyEvent {
    pub ts_ns: u64,
    /// Egress: the netns cookie of the connecting pod (its address is not chosen yet); ingress: 0.
    pub netns_cookie: u64,
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    /// Host order; 0 when not known (client side: the source port is chosen after `connect()`).
    pub src_port: u16,
    pub dst_port: u16,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub src_class: u32,
    pub dst_class: u32,
    /// [`crate::PROTO_TCP`] or [`crate::PROTO_UDP`].
    pub proto: u8,
    /// [`DIR_EGRESS`] or [`DIR_INGRESS`].
    pub direction: u8,
    /// [`VERDICT_ALLOW`] or [`VERDICT_DENY`].
    pub verdict: u8,
    /// [`VERDICT_FLAG_AUDIT`], [`VERDICT_FLAG_STRICT`].
    pub flags: u8,
}
const _: () = assert!(core::mem::size_of::<PolicyEvent>() == 72);
