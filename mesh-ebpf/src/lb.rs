//! Service lookup, backend selection and reverse NAT, shared by every sock_addr entry point.

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    EbpfContext,
    bindings::bpf_sock_addr,
    helpers::generated::{bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
};
use mesh_common::{
    Backend, PROTO_TCP, PROTO_UDP, RevNatKey, RevNatValue, SERVICE_ID_NONE, ServiceKey, SlotKey,
    from_words, is_v4_mapped, policy::OrigDst, to_words, v4_mapped, v4_of,
};

use crate::{
    maps::{BACKENDS, COUNTERS, PROXY_PENDING, REV_NAT, SERVICES, SLOTS},
    policy::{self, Egress},
};

/// Returned to let the syscall go on (possibly with a rewritten address).
const ALLOW: i32 = 1;
/// Returned to fail the syscall; the errno is set with `bpf_set_retval` first.
const REJECT: i32 = 0;
/// A service with no ready backend refuses at once, as kube-proxy's REJECT rule does, instead of letting a SYN
/// disappear into a black hole.
const ECONNREFUSED: i32 = 111;
/// Policy denied the connection: refused before any packet leaves.
const EACCES: i32 = 13;

/// How to choose among a service's slots.
#[derive(Clone, Copy)]
pub enum Pick {
    /// A fresh random slot per connect (TCP has no source port yet to hash on).
    Random,
    /// Hash of the socket cookie: one unconnected UDP socket keeps one backend while the slots are unchanged.
    PerSocket,
}

impl Pick {
    /// `connect()` (TCP or a connected UDP socket), as opposed to an unconnected `sendmsg()`.
    #[inline(always)]
    pub fn connects(self) -> bool {
        matches!(self, Pick::Random)
    }
}

enum Outcome {
    /// Not a service: leave the address alone.
    Pass,
    /// Rewrite to this backend of this service id.
    To(Backend, u32),
    /// A service with no backend.
    Refuse,
}

// The context fields must be read and written 4 bytes at a time (the verifier rejects wider accesses), so every
// access goes through a volatile u32 load or store.
#[inline(always)]
fn load(p: *const u32) -> u32 {
    unsafe { read_volatile(p) }
}

#[inline(always)]
fn store(p: *mut u32, v: u32) {
    unsafe { write_volatile(p, v) }
}

#[inline(always)]
fn sa(ctx: &SockAddrContext) -> *mut bpf_sock_addr {
    ctx.sock_addr
}

#[inline(always)]
fn proto_of(ctx: &SockAddrContext) -> Option<u8> {
    let p = load(unsafe { addr_of!((*sa(ctx)).protocol) }) as u8;
    (p == PROTO_TCP || p == PROTO_UDP).then_some(p)
}

/// The destination port in host byte order (the maps keep host order, so bpftool shows `80`).
#[inline(always)]
fn user_port(ctx: &SockAddrContext) -> u16 {
    // The low 16 bits hold the port in network byte order.
    u16::from_be(load(unsafe { addr_of!((*sa(ctx)).user_port) }) as u16)
}

#[inline(always)]
fn user_ip6(ctx: &SockAddrContext) -> [u32; 4] {
    let p = unsafe { addr_of!((*sa(ctx)).user_ip6) } as *const u32;
    [
        load(p),
        load(p.wrapping_add(1)),
        load(p.wrapping_add(2)),
        load(p.wrapping_add(3)),
    ]
}

#[inline(always)]
fn set_user_ip6(ctx: &SockAddrContext, addr: &[u8; 16]) {
    let addr = to_words(addr);
    let p = unsafe { addr_of_mut!((*sa(ctx)).user_ip6) } as *mut u32;
    store(p, addr[0]);
    store(p.wrapping_add(1), addr[1]);
    store(p.wrapping_add(2), addr[2]);
    store(p.wrapping_add(3), addr[3]);
}

/// Sets the port, given in host byte order.
#[inline(always)]
fn set_user_port(ctx: &SockAddrContext, port: u16) {
    store(
        unsafe { addr_of_mut!((*sa(ctx)).user_port) },
        port.to_be() as u32,
    );
}

#[inline(always)]
fn cookie(ctx: &SockAddrContext) -> u64 {
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

fn count(service_id: u32, no_backend: bool) {
    if let Some(c) = COUNTERS.get_ptr_mut(service_id) {
        // Per-CPU slot: no other CPU writes it, so a plain increment is exact.
        unsafe {
            if no_backend {
                (*c).no_backend += 1;
            } else {
                (*c).balanced += 1;
            }
        }
    }
}

/// Looks the frontend up and chooses a backend.
fn balance(ctx: &SockAddrContext, key: &ServiceKey, pick: Pick) -> Outcome {
    let Some(svc) = SERVICES.get_ptr(key) else {
        return Outcome::Pass;
    };
    let svc = unsafe { *svc };
    if svc.count == 0 {
        count(svc.id, true);
        return Outcome::Refuse;
    }
    let r = match pick {
        Pick::Random => unsafe { bpf_get_prandom_u32() },
        Pick::PerSocket => {
            let c = cookie(ctx);
            // Fold and mix the cookie so consecutive cookies spread over the slots.
            let x = (c ^ (c >> 32)) as u32;
            x.wrapping_mul(0x9e37_79b1)
        }
    };
    let slot = SlotKey {
        service_id: svc.id,
        slot: r % svc.count,
    };
    // A slot or backend can be missing for an instant while the agent compacts a shrinking service; treat that as
    // "not a service" rather than refusing a connect that the next lookup would have served.
    let Some(s) = SLOTS.get_ptr(&slot) else {
        return Outcome::Pass;
    };
    let backend_id = unsafe { (*s).backend_id };
    let Some(b) = BACKENDS.get_ptr(&backend_id) else {
        return Outcome::Pass;
    };
    count(svc.id, false);
    Outcome::To(unsafe { *b }, svc.id)
}

/// Records what the socket asked for (`key`: a VIP, or the destination itself when redirected) under the
/// address it really goes to, so that `getpeername()`/`recvmsg()` show the former.
fn remember(
    ctx: &SockAddrContext,
    key: &ServiceKey,
    target: &([u8; 16], u16),
    service_id: u32,
    pick: Pick,
) {
    let rk = RevNatKey {
        cookie: cookie(ctx),
        addr: target.0,
        port: target.1,
        _pad: [0; 6],
    };
    let rv = RevNatValue {
        addr: key.addr,
        port: key.port,
        _pad: 0,
        service_id,
    };
    // Unconnected UDP calls this per datagram: skip the write when the entry is already there. A connect is
    // the socket's first and only one, so there is nothing to find and the lookup is skipped.
    if let Pick::PerSocket = pick
        && let Some(old) = REV_NAT.get_ptr(&rk)
    {
        let old = unsafe { *old };
        if old.addr == rv.addr && old.port == rv.port {
            return;
        }
    }
    let _ = REV_NAT.insert(&rk, &rv, 0);
}

fn refuse() -> i32 {
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    REJECT
}

fn deny() -> i32 {
    unsafe { bpf_set_retval(-EACCES) };
    REJECT
}

pub fn connect4(ctx: &SockAddrContext, pick: Pick) -> i32 {
    let Some(proto) = proto_of(ctx) else {
        return ALLOW;
    };
    let ip4 = load(unsafe { addr_of!((*sa(ctx)).user_ip4) });
    let key = ServiceKey {
        addr: v4_mapped(ip4),
        port: user_port(ctx),
        proto,
        _pad: 0,
    };
    match balance(ctx, &key, pick) {
        Outcome::Pass => finish(ctx, &key, (key.addr, key.port), None, pick, true),
        Outcome::Refuse => refuse(),
        // An IPv4 socket cannot reach an IPv6 backend; the agent never pairs them, so just leave it alone.
        Outcome::To(b, _) if !is_v4_mapped(&b.addr) => ALLOW,
        Outcome::To(b, id) => finish(ctx, &key, (b.addr, b.port), Some(id), pick, true),
    }
}

/// IPv6 sockets, including v4-mapped destinations (`::ffff:a.b.c.d`), which share the IPv4 service keys.
pub fn connect6(ctx: &SockAddrContext, pick: Pick) -> i32 {
    let Some(proto) = proto_of(ctx) else {
        return ALLOW;
    };
    let key = ServiceKey {
        addr: from_words(user_ip6(ctx)),
        port: user_port(ctx),
        proto,
        _pad: 0,
    };
    match balance(ctx, &key, pick) {
        Outcome::Pass => finish(ctx, &key, (key.addr, key.port), None, pick, false),
        Outcome::Refuse => refuse(),
        Outcome::To(b, id) => finish(ctx, &key, (b.addr, b.port), Some(id), pick, false),
    }
}

/// After load balancing chose `target` (the destination itself when `service` is `None`): the policy check, then
/// the rewrite to the backend or to the node proxy.
#[inline(always)]
fn finish(
    ctx: &SockAddrContext,
    key: &ServiceKey,
    target: ([u8; 16], u16),
    service: Option<u32>,
    pick: Pick,
    v4: bool,
) -> i32 {
    // Policy sees the backend's target port, never the service port.
    match policy::egress(ctx, &target.0, target.1, key.proto, pick.connects()) {
        Egress::Deny => deny(),
        Egress::Allow => {
            if let Some(id) = service {
                remember(ctx, key, &target, id, pick);
                rewrite(ctx, &target, v4);
            }
            ALLOW
        }
        Egress::Redirect {
            proxy,
            identity,
            netns_cookie,
        } => {
            let orig = OrigDst {
                addr: target.0,
                port: target.1,
                _pad: 0,
                identity,
                netns_cookie,
            };
            // sock_ops moves this to `proxy_orig` once the connection is established (the source port is not
            // chosen yet), where the proxy finds it by the address it accepts from.
            if PROXY_PENDING.insert(&cookie(ctx), &orig, 0).is_err() {
                return deny();
            }
            // The application keeps seeing what it connected to (the VIP, or the pod), not the proxy.
            remember(ctx, key, &proxy, service.unwrap_or(SERVICE_ID_NONE), pick);
            rewrite(ctx, &proxy, v4);
            ALLOW
        }
    }
}

#[inline(always)]
fn rewrite(ctx: &SockAddrContext, to: &([u8; 16], u16), v4: bool) {
    if v4 {
        store(unsafe { addr_of_mut!((*sa(ctx)).user_ip4) }, v4_of(&to.0));
    } else {
        set_user_ip6(ctx, &to.0);
    }
    set_user_port(ctx, to.1);
}

fn lookup_rev(ctx: &SockAddrContext, addr: [u8; 16]) -> Option<RevNatValue> {
    let rk = RevNatKey {
        cookie: cookie(ctx),
        addr,
        port: user_port(ctx),
        _pad: [0; 6],
    };
    REV_NAT.get_ptr(&rk).map(|v| unsafe { *v })
}

/// `getpeername`/`recvmsg` on an IPv4 socket: show the VIP instead of the backend.
pub fn reverse4(ctx: &SockAddrContext) {
    let ip4 = load(unsafe { addr_of!((*sa(ctx)).user_ip4) });
    if let Some(v) = lookup_rev(ctx, v4_mapped(ip4)) {
        store(unsafe { addr_of_mut!((*sa(ctx)).user_ip4) }, v4_of(&v.addr));
        set_user_port(ctx, v.port);
    }
}

pub fn reverse6(ctx: &SockAddrContext) {
    if let Some(v) = lookup_rev(ctx, from_words(user_ip6(ctx))) {
        set_user_ip6(ctx, &v.addr);
        set_user_port(ctx, v.port);
    }
}
