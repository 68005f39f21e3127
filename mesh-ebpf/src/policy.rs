//! Identity policy: the client-side check at `connect()`/`sendmsg()`, the server-side check of the first packet
//! at the destination socket's cgroup ingress, the UDP flow cache, and denial events.
//!
//! See `mesh_common::policy` for the lookup scheme and the two-epoch update protocol.

use aya_ebpf::{
    EbpfContext,
    btf_maps::lpm_trie::Key,
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns},
    programs::{SkBuffContext, SockAddrContext},
};
use mesh_common::{
    PROTO_TCP, PROTO_UDP, is_v4_mapped,
    policy::{
        CLASS_ID_MASK, CLASS_SKIP, DIR_EGRESS, DIR_INGRESS, DST_DEFAULT_DENY, FlowKey, FlowValue,
        IpSlot, LOCAL_ENROLLED, MESH_DISABLE, MESH_ENROLLED, MESH_PORT_MODES, MESH_STRICT,
        MTLS_PORT_DISABLE, MTLS_PORT_PERMISSIVE, MTLS_PORT_STRICT, MtlsPortKey, PolicyEvent,
        PolicyKey, PolicyState, PolicyValue, UDP_PEER_ACCEPTED, UDP_PEER_CONNECTED, UDP_PEER_SENT,
        UDP_PEER_TIMEOUT_NS, UdpPeer, UdpReplyKey, VERDICT_ALLOW, VERDICT_DENY, VERDICT_FLAG_AUDIT,
        VERDICT_FLAG_STRICT, counter, identity,
    },
    v4_mapped,
};

use crate::maps::{
    IP_HOSTS, IPCACHE, LOCAL_EPS, MTLS_PORTS, POLICY, POLICY_COUNTERS, POLICY_EVENTS,
    POLICY_RATELIMIT, POLICY_STATE, UDP_FLOWS, UDP_REPLIES,
};

/// cgroup_skb: let the packet through.
pub const SKB_PASS: i32 = 1;
/// cgroup_skb: drop the packet.
pub const SKB_DROP: i32 = 0;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
/// One event's worth of tokens (tokens are scaled by 1e9 so that the refill is `elapsed_ns * rate`).
const TOKEN: u64 = 1_000_000_000;

#[inline(always)]
fn state() -> Option<PolicyState> {
    POLICY_STATE.get_ptr(0).map(|s| unsafe { *s })
}

#[inline(always)]
fn bump(index: u32) {
    if let Some(c) = POLICY_COUNTERS.get_ptr_mut(index) {
        // Per-CPU slot: a plain increment is exact.
        unsafe { *c += 1 };
    }
}

/// The epoch's slot of an address: its identity and classes. A miss is the world: class 0, no policy.
#[inline(always)]
fn ip_slot(addr: &[u8; 16], epoch: u32) -> IpSlot {
    // Pods and nodes are in the exact-address hash; only other addresses walk the trie.
    let info = match IP_HOSTS.get_ptr(addr) {
        Some(p) => Some(unsafe { &*p }),
        None => IPCACHE.get(&Key::new(128, *addr)),
    };
    match info {
        Some(info) if epoch == 0 => info.slots[0],
        Some(info) => info.slots[1],
        None => IpSlot {
            identity: identity::WORLD,
            src_class: 0,
            dst_class: 0,
            mesh: 0,
        },
    }
}

/// The verdict for a connection from `src_class` to `dst_class` (with its default bit) on `port`.
#[inline(always)]
fn decide(dst_class: u32, src_class: u32, port: u16, epoch: u32) -> PolicyValue {
    let mut key = PolicyKey {
        dst_class: dst_class & CLASS_ID_MASK,
        src_class,
        port,
        epoch: epoch as u8,
        _pad: 0,
    };
    if let Some(v) = POLICY.get_ptr(&key) {
        return unsafe { *v };
    }
    key.port = 0;
    if let Some(v) = POLICY.get_ptr(&key) {
        return unsafe { *v };
    }
    PolicyValue {
        verdict: if dst_class & DST_DEFAULT_DENY != 0 {
            VERDICT_DENY
        } else {
            VERDICT_ALLOW
        },
        flags: 0,
        _pad: [0; 2],
    }
}

/// Token bucket per CPU: at most `events_per_sec` events per second after a burst of `events_burst`.
#[inline(always)]
fn take_token(st: &PolicyState) -> bool {
    let Some(rl) = POLICY_RATELIMIT.get_ptr_mut(0) else {
        return false;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    let rl = unsafe { &mut *rl };
    // Clamped so that `elapsed * rate` cannot overflow.
    let elapsed = core::cmp::min(now.wrapping_sub(rl.last_ns), 10_000_000_000);
    let burst = st.events_burst as u64 * TOKEN;
    let mut tokens = rl.tokens + elapsed * st.events_per_sec as u64;
    if tokens > burst {
        tokens = burst;
    }
    rl.last_ns = now;
    if tokens >= TOKEN {
        rl.tokens = tokens - TOKEN;
        true
    } else {
        rl.tokens = tokens;
        false
    }
}

/// Sends `ev` to userspace unless over the rate limit or the ring is full; either way it is counted.
#[inline(always)]
fn report(st: &PolicyState, ev: &PolicyEvent) {
    if take_token(st) && POLICY_EVENTS.output(ev, 0).is_ok() {
        bump(counter::EVENTS_SENT);
    } else {
        bump(counter::EVENTS_DROPPED);
    }
}

/// What a check concluded, with what the event needs.
struct Judged {
    verdict: PolicyValue,
    src: IpSlot,
    dst: IpSlot,
}

/// Counts a verdict and reports denials and audited connections. Returns whether it is allowed.
#[inline(always)]
fn conclude(
    st: &PolicyState,
    j: &Judged,
    direction: u8,
    proto: u8,
    src: ([u8; 16], u16),
    dst: ([u8; 16], u16),
    netns_cookie: u64,
) -> bool {
    let allowed = j.verdict.verdict != VERDICT_DENY;
    let audit = j.verdict.flags & VERDICT_FLAG_AUDIT != 0;
    bump(match (allowed, direction == DIR_EGRESS) {
        (true, true) => counter::ALLOWED_EGRESS,
        (true, false) => counter::ALLOWED_INGRESS,
        (false, true) => counter::DENIED_EGRESS,
        (false, false) => counter::DENIED_INGRESS,
    });
    if audit {
        bump(counter::AUDITED);
    }
    if !allowed || audit {
        let ev = PolicyEvent {
            ts_ns: unsafe { bpf_ktime_get_ns() },
            netns_cookie,
            src_addr: src.0,
            dst_addr: dst.0,
            src_port: src.1,
            dst_port: dst.1,
            src_identity: j.src.identity,
            dst_identity: j.dst.identity,
            src_class: j.src.src_class,
            dst_class: j.dst.dst_class,
            proto,
            direction,
            verdict: j.verdict.verdict,
            flags: j.verdict.flags,
        };
        report(st, &ev);
    }
    allowed
}

/// What the client-side check decided.
pub enum Egress {
    /// Refuse the connect with EACCES.
    Deny,
    /// Let it go where it was going.
    Allow,
    /// Send it to the node proxy: an enrolled pod's TCP connection to an enrolled workload.
    Redirect {
        /// The proxy's address for the destination's family, and its outbound port.
        proxy: ([u8; 16], u16),
        identity: u32,
        netns_cookie: u64,
    },
}

/// The client-side check, after load balancing chose `dst`:`port`.
///
/// Only sockets of known local pods are checked here (by netns cookie, which the pod cannot choose); every
/// other socket is left to the destination's ingress check.
#[inline(always)]
pub fn egress(
    ctx: &SockAddrContext,
    dst: &[u8; 16],
    port: u16,
    proto: u8,
    connected: bool,
) -> Egress {
    let Some(st) = state() else {
        return Egress::Allow;
    };
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if st.enabled == 0 {
        // UDP peers of pods are recorded even when no policy applies anywhere: a policy set that arrives in the
        // middle of an exchange must know who started it (see `accepted`).
        if proto == PROTO_UDP && LOCAL_EPS.get_ptr(&cookie).is_some() {
            sent_to(ctx, dst, port, connected);
        }
        return Egress::Allow;
    }
    let epoch = st.epoch & 1;
    let Some(ep) = LOCAL_EPS.get_ptr(&cookie) else {
        return Egress::Allow;
    };
    let slot = unsafe {
        if epoch == 0 {
            (*ep).slots[0]
        } else {
            (*ep).slots[1]
        }
    };
    let d = ip_slot(dst, epoch);
    // Workloads never reach the node proxy's own address themselves: only the redirect below sends connections
    // there, and only with a record the proxy trusts (no loops, no probing of its ports).
    if d.identity == identity::NODE_PROXY {
        bump(counter::PROXY_REFUSED);
        return Egress::Deny;
    }
    // Every UDP peer of a pod is recorded: a pod under policy needs the answers of its peers to get past its own
    // ingress check, a peer under policy must not take this socket's later datagrams for answers to an exchange it
    // started, and a policy that arrives later must know who started.
    if proto == PROTO_UDP {
        sent_to(ctx, dst, port, connected);
    }
    let src_class = if is_v4_mapped(dst) {
        slot.src_class4
    } else {
        slot.src_class6
    };
    if src_class != CLASS_SKIP && d.dst_class & CLASS_ID_MASK != 0 {
        let verdict = decide(d.dst_class, src_class, port, epoch);
        // A UDP socket answering a peer it accepted a datagram from is replying, not opening a flow: a server
        // with no policy of its own must be able to answer a client that sits under default deny.
        if verdict.verdict == VERDICT_DENY && proto == PROTO_UDP && is_reply(ctx, dst, port) {
            bump(counter::UDP_REPLIES);
            return Egress::Allow;
        }
        let client = (slot.identity, src_class, cookie);
        if !conclude_egress(&st, verdict, client, &d, proto, (*dst, port)) {
            return Egress::Deny;
        }
    }
    if proto != PROTO_TCP || d.mesh & MESH_ENROLLED == 0 {
        return Egress::Allow;
    }
    let proxy_addr = if is_v4_mapped(dst) {
        st.proxy_addr4
    } else {
        st.proxy_addr6
    };
    let mode = port_mode(&d, dst, port, epoch);
    if slot.flags & LOCAL_ENROLLED != 0
        && connected
        && st.proxy_port != 0
        && proxy_addr != [0; 16]
        && mode != MTLS_PORT_DISABLE
    {
        bump(counter::PROXY_REDIRECTED);
        return Egress::Redirect {
            proxy: (proxy_addr, st.proxy_port as u16),
            identity: slot.identity,
            netns_cookie: cookie,
        };
    }
    if mode == MTLS_PORT_STRICT {
        // Plaintext to a STRICT port would be dropped at the destination: refuse it now, before any SYN.
        bump(counter::STRICT_DENIED);
        let client = (slot.identity, src_class, cookie);
        conclude_egress(&st, STRICT_VERDICT, client, &d, proto, (*dst, port));
        return Egress::Deny;
    }
    Egress::Allow
}

/// [`conclude`] for the client side: `client` is the pod's (identity, source class, netns cookie). The source
/// address is not chosen yet at connect(), so the event carries the pod's identity instead.
#[inline(always)]
fn conclude_egress(
    st: &PolicyState,
    verdict: PolicyValue,
    client: (u32, u32, u64),
    d: &IpSlot,
    proto: u8,
    dst: ([u8; 16], u16),
) -> bool {
    let j = Judged {
        verdict,
        src: IpSlot {
            identity: client.0,
            src_class: client.1,
            dst_class: 0,
            mesh: 0,
        },
        dst: *d,
    };
    conclude(st, &j, DIR_EGRESS, proto, ([0; 16], 0), dst, client.2)
}

/// [`conclude`] for the server side: the packet carries both addresses and ports.
#[inline(always)]
fn conclude_ingress(
    st: &PolicyState,
    verdict: PolicyValue,
    s: &IpSlot,
    d: &IpSlot,
    p: &Packet,
) -> bool {
    let j = Judged {
        verdict,
        src: *s,
        dst: *d,
    };
    conclude(
        st,
        &j,
        DIR_INGRESS,
        p.proto,
        (p.saddr, p.sport),
        (p.daddr, p.dport),
        0,
    )
}

/// The verdict STRICT gives a connection that did not come through the node proxy.
const STRICT_VERDICT: PolicyValue = PolicyValue {
    verdict: VERDICT_DENY,
    flags: VERDICT_FLAG_STRICT,
    _pad: [0; 2],
};

/// The mTLS mode of `port` of the enrolled workload at `addr` (slot `d`): `MTLS_PORT_*`.
#[inline(always)]
fn port_mode(d: &IpSlot, addr: &[u8; 16], port: u16, epoch: u32) -> u32 {
    if d.mesh & MESH_PORT_MODES != 0 {
        let key = MtlsPortKey {
            addr: *addr,
            port,
            epoch: epoch as u8,
            _pad: 0,
        };
        if let Some(m) = MTLS_PORTS.get_ptr(&key) {
            return unsafe { *m };
        }
    }
    if d.mesh & MESH_STRICT != 0 {
        MTLS_PORT_STRICT
    } else if d.mesh & MESH_DISABLE != 0 {
        MTLS_PORT_DISABLE
    } else {
        MTLS_PORT_PERMISSIVE
    }
}

#[inline(always)]
fn peer_key(cookie: u64, addr: &[u8; 16], port: u16) -> UdpReplyKey {
    UdpReplyKey {
        cookie,
        addr: *addr,
        port,
        _pad: [0; 6],
    }
}

#[inline(always)]
fn fresh(t: u64) -> bool {
    t == UDP_PEER_CONNECTED
        || (t != 0 && unsafe { bpf_ktime_get_ns() }.wrapping_sub(t) < UDP_PEER_TIMEOUT_NS)
}

/// Records that a local UDP socket sends to `addr`:`port` (a connected socket: for as long as the entry lives).
#[inline(always)]
fn sent_to(ctx: &SockAddrContext, addr: &[u8; 16], port: u16, connected: bool) {
    let key = peer_key(unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }, addr, port);
    let now = if connected {
        UDP_PEER_CONNECTED
    } else {
        unsafe { bpf_ktime_get_ns() }
    };
    match UDP_REPLIES.get_ptr_mut(&key) {
        Some(p) => unsafe { (*p).sent_ns = now },
        None => {
            let v = UdpPeer {
                sent_ns: now,
                accepted_ns: 0,
                initiator: UDP_PEER_SENT,
                _pad: 0,
            };
            let _ = UDP_REPLIES.insert(&key, &v, 0);
        }
    }
}

/// The client-side check meets a UDP send the peer's policy would refuse: is it an answer to an exchange the
/// peer started (and the socket accepted)?
#[inline(always)]
fn is_reply(ctx: &SockAddrContext, dst: &[u8; 16], port: u16) -> bool {
    let key = peer_key(unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }, dst, port);
    UDP_REPLIES
        .get_ptr(&key)
        .is_some_and(|p| unsafe { (*p).initiator == UDP_PEER_ACCEPTED && fresh((*p).accepted_ns) })
}

/// The ingress check meets a UDP datagram its policy would refuse: is it an answer to an exchange the receiving
/// socket started?
#[inline(always)]
fn is_answer(ctx: &SkBuffContext, p: &Packet) -> bool {
    let key = peer_key(
        unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        &p.saddr,
        p.sport,
    );
    UDP_REPLIES
        .get_ptr(&key)
        .is_some_and(|v| unsafe { (*v).initiator == UDP_PEER_SENT && fresh((*v).sent_ns) })
}

/// Records that the receiving socket (a pod's) accepted a datagram, so that its answers are let through by the
/// client-side check (see [`is_reply`]), and so that the entry says who started before the receiver answers.
///
/// Recorded for every datagram a pod accepts, with or without policy: if only exchanges under policy were
/// recorded, a policy applied in the middle of an exchange would take whoever sent first after it for the
/// starter, and the answer to a datagram sent just before the switch would make the real starter's later datagrams
/// look like answers, letting a denied flow through for as long as it lasts.
#[inline(always)]
fn accepted(ctx: &SkBuffContext, p: &Packet) {
    let key = peer_key(
        unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        &p.saddr,
        p.sport,
    );
    let now = unsafe { bpf_ktime_get_ns() };
    match UDP_REPLIES.get_ptr_mut(&key) {
        Some(v) => unsafe { (*v).accepted_ns = now },
        None => {
            let v = UdpPeer {
                sent_ns: 0,
                accepted_ns: now,
                initiator: UDP_PEER_ACCEPTED,
                _pad: 0,
            };
            let _ = UDP_REPLIES.insert(&key, &v, 0);
        }
    }
}

/// Reads a `T` at `off` bytes into the packet: straight from the linear data when it is there (the usual case
/// at a socket, where the headers have been pulled), else with `bpf_skb_load_bytes`. The direct read costs no
/// helper call, which matters because every packet of a policed pod passes here. `off` must be a constant
/// after inlining: the verifier does not follow a variable offset through this bounds check.
#[inline(always)]
fn read<T: Copy>(ctx: &SkBuffContext, off: usize) -> Option<T> {
    let skb = ctx.skb.skb;
    let data = unsafe { (*skb).data } as usize;
    let end = unsafe { (*skb).data_end } as usize;
    if data + off + core::mem::size_of::<T>() > end {
        return ctx.load(off).ok();
    }
    Some(unsafe { core::ptr::read_unaligned((data + off) as *const T) })
}

/// Where the transport header is: protocol, offset and IP version. `None`: not IP; an IPv6 packet with extension
/// headers before the transport header reports protocol [`EXT_HEADERS`]. Two small loads, so that every packet
/// that is not a TCP SYN or UDP datagram leaves after them.
#[inline(always)]
fn transport(ctx: &SkBuffContext) -> Option<(u8, usize, bool)> {
    let eth = u16::from_be(ctx.skb.protocol() as u16);
    if eth == ETH_P_IP {
        // Whole words: the verifier gives no range to a one-byte check at the very start of the packet.
        let w0: [u8; 4] = read(ctx, 0)?;
        let w2: [u8; 4] = read(ctx, 8)?;
        Some((w2[1], ((w0[0] & 0x0f) as usize) * 4, false))
    } else if eth == ETH_P_IPV6 {
        let w1: [u8; 4] = read(ctx, 4)?;
        let next = w1[2];
        if matches!(next, 0 | 43 | 44 | 50 | 51 | 60 | 135 | 139 | 140) {
            return Some((EXT_HEADERS, 40, true));
        }
        Some((next, 40, true))
    } else {
        None
    }
}

/// Protocol marker for IPv6 extension headers (not a real protocol number we could see otherwise).
const EXT_HEADERS: u8 = 255;

/// Source and destination addresses.
#[inline(always)]
fn addresses(ctx: &SkBuffContext, v6: bool) -> Option<([u8; 16], [u8; 16])> {
    if v6 {
        Some((ctx.load(8).ok()?, ctx.load(24).ok()?))
    } else {
        let s: u32 = ctx.load(12).ok()?;
        let d: u32 = ctx.load(16).ok()?;
        Some((v4_mapped(s), v4_mapped(d)))
    }
}

/// A TCP SYN or UDP datagram as policy sees it.
struct Packet {
    saddr: [u8; 16],
    daddr: [u8; 16],
    proto: u8,
    sport: u16,
    dport: u16,
}

#[inline(always)]
fn packet(ctx: &SkBuffContext, proto: u8, l4: usize, v6: bool) -> Option<Packet> {
    let (saddr, daddr) = addresses(ctx, v6)?;
    let ports: u32 = ctx.load(l4).ok()?;
    // Two big-endian u16s as read from the wire.
    let b = ports.to_ne_bytes();
    Some(Packet {
        saddr,
        daddr,
        proto,
        sport: u16::from_be_bytes([b[0], b[1]]),
        dport: u16::from_be_bytes([b[2], b[3]]),
    })
}

/// The server-side check (cgroup_skb ingress, at the receiving socket). TCP: only a SYN is judged, every other
/// segment passes at once. UDP: the first datagram of a flow is judged, then the flow cache answers until the
/// policy generation changes.
#[inline(always)]
pub fn ingress(ctx: &SkBuffContext) -> i32 {
    let Some(st) = state() else {
        return SKB_PASS;
    };
    let Some((proto, l4, v6)) = transport(ctx) else {
        return SKB_PASS;
    };
    if st.enabled == 0 {
        // No policy anywhere: only record UDP peers (see `accepted`).
        if proto == PROTO_UDP
            && let Some(p) = packet(ctx, proto, l4, v6)
            && ip_slot(&p.daddr, st.epoch & 1).identity >= identity::FIRST_WORKLOAD
        {
            accepted(ctx, &p);
        }
        return SKB_PASS;
    }
    if proto == EXT_HEADERS {
        // Fail closed: a workload under policy does not take IPv6 packets whose ports we cannot see.
        let Some((_, daddr)) = addresses(ctx, v6) else {
            return SKB_PASS;
        };
        let d = ip_slot(&daddr, st.epoch & 1);
        return if d.dst_class & CLASS_ID_MASK == 0 {
            SKB_PASS
        } else {
            bump(counter::DENIED_INGRESS);
            SKB_DROP
        };
    }
    if proto == PROTO_TCP {
        // Only a connection's first segment is judged: everything else passes after this one load.
        // Constant offsets for the usual headers (IPv4 without options, IPv6), which the verifier accepts for a
        // direct read; anything else goes through the helper.
        let flags = match (v6, l4) {
            (false, 20) => read::<[u8; 4]>(ctx, 32).map(|w| w[1]),
            (true, _) => read::<[u8; 4]>(ctx, 52).map(|w| w[1]),
            _ => ctx.load::<u8>(l4 + 13).ok(),
        };
        let Some(flags) = flags else {
            return SKB_PASS;
        };
        if flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
            return SKB_PASS;
        }
    } else if proto != PROTO_UDP {
        return SKB_PASS;
    }
    let Some(p) = packet(ctx, proto, l4, v6) else {
        return SKB_PASS;
    };
    let epoch = st.epoch & 1;
    let d = ip_slot(&p.daddr, epoch);
    if p.proto == PROTO_TCP && d.mesh & MESH_ENROLLED != 0 {
        let s = ip_slot(&p.saddr, epoch);
        if s.identity == identity::NODE_PROXY {
            // The node proxy already applied policy with the peer's authenticated identity.
            bump(counter::PROXY_INGRESS);
            return SKB_PASS;
        }
        if port_mode(&d, &p.daddr, p.dport, epoch) == MTLS_PORT_STRICT {
            bump(counter::STRICT_DENIED);
            conclude_ingress(&st, STRICT_VERDICT, &s, &d, &p);
            return SKB_DROP;
        }
    }
    if d.dst_class & CLASS_ID_MASK == 0 {
        if proto == PROTO_UDP && d.identity >= identity::FIRST_WORKLOAD {
            accepted(ctx, &p);
        }
        return SKB_PASS;
    }
    let flow = FlowKey {
        saddr: p.saddr,
        daddr: p.daddr,
        sport: p.sport,
        dport: p.dport,
    };
    if p.proto == PROTO_UDP {
        if UDP_FLOWS
            .get_ptr(&flow)
            .is_some_and(|f| unsafe { (*f).generation } == st.generation)
        {
            bump(counter::UDP_FLOW_HITS);
            accepted(ctx, &p);
            return SKB_PASS;
        }
    }
    let s = ip_slot(&p.saddr, epoch);
    let verdict = decide(d.dst_class, s.src_class, p.dport, epoch);
    if verdict.verdict == VERDICT_DENY && p.proto == PROTO_UDP && is_answer(ctx, &p) {
        bump(counter::UDP_REPLIES);
        return SKB_PASS;
    }
    if !conclude_ingress(&st, verdict, &s, &d, &p) {
        return SKB_DROP;
    }
    if p.proto == PROTO_UDP {
        accepted(ctx, &p);
        let v = FlowValue {
            generation: st.generation,
            _pad: 0,
        };
        let _ = UDP_FLOWS.insert(&flow, &v, 0);
    }
    SKB_PASS
}
