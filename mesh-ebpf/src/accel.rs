//! Same-node socket acceleration (issue 6).
//!
//! `sock_ops` adds both ends of an established TCP connection between two local pods to `sk_conns`, each under
//! its own view of the 4-tuple plus its netns cookie. `msg` runs on every send of such a socket: it builds the
//! peer's key (the tuple swapped, the netns cookie of the pod that owns the peer address) and hands the bytes
//! straight to the peer socket's receive queue.
//!
//! Eligibility is decided here, once, at setup:
//! - both addresses belong to local pods (`sk_pods`), and the socket is in the netns of the pod that owns its
//!   local address (so a process in another netns that happens to hold the address is not a pod);
//! - the connection got established, so the connect hook and the destination's ingress check allowed it;
//! - connections to the node proxy are never eligible: the proxy's address is not a pod's, and the proxy's
//!   sockets live in the node's netns.
//!
//! Ordering: a send that finds no peer (the server's end is not in the map yet, or is gone) goes through the
//! stack, and the sender marks itself (socket storage `sk_state`) so that all its later sends take the stack too.
//! Were a later send to find the peer, its bytes would reach the peer's socket queue ahead of the earlier ones still
//! in the peer's TCP receive queue, and the reader would see them out of order. (sk_msg programs may not delete
//! from a SockHash, so the sender cannot simply leave the map.)

use core::ptr::{addr_of, read_volatile};

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_F_INGRESS, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        sk_action,
    },
    helpers::generated::{bpf_get_netns_cookie, bpf_sk_storage_get},
    programs::{SkMsgContext, SockOpsContext},
};
use mesh_common::{
    accel::{AccelConn, SockKey, counter},
    from_words, v4_mapped,
};

use crate::maps::{SK_CLIENTS, SK_CONNS, SK_COUNTERS, SK_PODS, SK_STATE};

/// `sk_state` flag: this socket sent through the stack once, so it always does.
const ON_STACK: u32 = 1;
/// `BPF_SK_STORAGE_GET_F_CREATE`.
const STORAGE_CREATE: u64 = 1;

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

// Context fields must be read 4 bytes at a time, straight from the context pointer (see redirect.rs).
#[inline(always)]
fn load(p: *const u32) -> u32 {
    unsafe { read_volatile(p) }
}

#[inline(always)]
fn bump(index: u32, by: u64) {
    if let Some(c) = SK_COUNTERS.get_ptr_mut(index) {
        unsafe { *c += by };
    }
}

/// A socket's addresses and ports as its context gives them.
struct Tuple {
    family: u32,
    local4: u32,
    remote4: u32,
    local6: [u32; 4],
    remote6: [u32; 4],
    local_port: u32,
    remote_port: u32,
}

/// Reads a [`Tuple`] from a `bpf_sock_ops` or `sk_msg_md` pointer: both name these fields alike, and each field must
/// be loaded straight from the context pointer.
macro_rules! tuple_of {
    ($ctx:expr) => {{
        let c = $ctx;
        Tuple {
            family: load(unsafe { addr_of!((*c).family) }),
            local4: load(unsafe { addr_of!((*c).local_ip4) }),
            remote4: load(unsafe { addr_of!((*c).remote_ip4) }),
            local6: [
                load(unsafe { addr_of!((*c).local_ip6[0]) }),
                load(unsafe { addr_of!((*c).local_ip6[1]) }),
                load(unsafe { addr_of!((*c).local_ip6[2]) }),
                load(unsafe { addr_of!((*c).local_ip6[3]) }),
            ],
            remote6: [
                load(unsafe { addr_of!((*c).remote_ip6[0]) }),
                load(unsafe { addr_of!((*c).remote_ip6[1]) }),
                load(unsafe { addr_of!((*c).remote_ip6[2]) }),
                load(unsafe { addr_of!((*c).remote_ip6[3]) }),
            ],
            local_port: load(unsafe { addr_of!((*c).local_port) }),
            remote_port: load(unsafe { addr_of!((*c).remote_port) }),
        }
    }};
}

/// The socket's key. Both contexts store `remote_port` in network order in the upper 16 bits of the u32 and
/// `local_port` in host order.
#[inline(always)]
fn key_of(netns_cookie: u64, t: &Tuple) -> Option<SockKey> {
    let (local_addr, remote_addr) = match t.family {
        AF_INET => (v4_mapped(t.local4), v4_mapped(t.remote4)),
        AF_INET6 => (from_words(t.local6), from_words(t.remote6)),
        _ => return None,
    };
    Some(SockKey {
        netns_cookie,
        local_addr,
        remote_addr,
        local_port: t.local_port as u16,
        remote_port: u16::from_be((t.remote_port >> 16) as u16),
        _pad: 0,
    })
}

pub fn sock_ops(ctx: &SockOpsContext) {
    let ops = ctx.ops;
    let op = load(unsafe { addr_of!((*ops).op) });
    let client = match op {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => true,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => false,
        _ => return,
    };
    let tuple = tuple_of!(ops);
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let Some(mut key) = key_of(cookie, &tuple) else {
        return;
    };
    // Only a pod's own socket, in the pod's own netns, talking to another local pod.
    let Some(owner) = (unsafe { SK_PODS.get(&key.local_addr) }) else {
        return;
    };
    if *owner != cookie {
        return;
    }
    let Some(peer) = (unsafe { SK_PODS.get(&key.remote_addr) }) else {
        return;
    };
    let peer = *peer;
    if SK_CONNS.update(&mut key, unsafe { &mut *ops }, 0).is_err() {
        bump(counter::INSERT_ERRORS, 1);
        return;
    }
    bump(counter::INSERTS, 1);
    if client {
        let conn = AccelConn {
            server_netns_cookie: peer,
        };
        let _ = SK_CLIENTS.insert(&key, &conn, 0);
    }
}

pub fn msg(ctx: &SkMsgContext) -> u32 {
    let md = ctx.msg;
    let tuple = tuple_of!(md);
    let size = load(unsafe { addr_of!((*md).size) });
    let sk = unsafe { read_volatile(addr_of!((*md).__bindgen_anon_3.sk)) };
    let state_map = core::ptr::from_ref(&SK_STATE).cast_mut().cast();
    let state = unsafe { bpf_sk_storage_get(state_map, sk.cast(), core::ptr::null_mut(), 0) };
    if !state.is_null() && unsafe { *state.cast::<u32>() } & ON_STACK != 0 {
        bump(counter::MISSES, 1);
        return sk_action::SK_PASS;
    }
    let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if let Some(own) = key_of(cookie, &tuple)
        && let Some(peer_cookie) = unsafe { SK_PODS.get(&own.remote_addr) }
    {
        let mut peer = own.peer(*peer_cookie);
        let verdict = SK_CONNS.redirect_msg(ctx, &mut peer, BPF_F_INGRESS as u64);
        if verdict == sk_action::SK_PASS as i64 {
            bump(counter::REDIRECTS, 1);
            bump(counter::REDIRECTED_BYTES, size as u64);
            return sk_action::SK_PASS;
        }
    }
    bump(counter::MISSES, 1);
    // These bytes take the stack: so do all later ones (see the module doc).
    let state =
        unsafe { bpf_sk_storage_get(state_map, sk.cast(), core::ptr::null_mut(), STORAGE_CREATE) };
    if !state.is_null() {
        unsafe { *state.cast::<u32>() |= ON_STACK };
    }
    sk_action::SK_PASS
}
