//! Sinew's eBPF programs: connect-time L4 service load balancing.
//!
//! Data flow: the agent fills `services` -> `svc_slots` -> `backends`. At `connect()` (and `sendmsg()` for
//! unconnected UDP) a program looks the destination up in `services`, picks a slot, rewrites the destination to the
//! backend, and records the VIP in `rev_nat` under the socket cookie so that `getpeername()` and `recvmsg()` can show
//! the VIP again. Nothing runs per packet.
//!
//! Policy (`policy`): the same connect/sendmsg hooks refuse a denied connection with EACCES after choosing the
//! backend, and a cgroup_skb ingress program judges the first packet of every connection at the destination.
//! UDP peers are recorded at connect/sendmsg and at ingress, so answers pass both checks as conntrack would.
//!
//! Mesh (`redirect`, issue 4): the connect hook sends an enrolled pod's TCP connection to an enrolled workload to
//! the node proxy instead, recording the original destination; `proxy_sockops` makes the record findable by the
//! proxy. The ingress check lets the node proxy through and enforces STRICT mTLS.
//!
//! The entry points stay thin: each one parses its context and calls into [`lb`] or [`policy`].
#![no_std]
#![no_main]

mod accel;
mod lb;
mod maps;
mod policy;
mod redirect;

use aya_ebpf::{
    bindings::sk_action,
    macros::{cgroup_skb, cgroup_sock_addr, sk_msg, sock_ops, stream_verdict},
    programs::{SkBuffContext, SkMsgContext, SockAddrContext, SockOpsContext},
};

/// sock_addr programs return 1 to let the syscall proceed.
const ALLOW: i32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    lb::connect4(&ctx, lb::Pick::Random)
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    lb::connect6(&ctx, lb::Pick::Random)
}

/// Unconnected UDP: pick per socket, so one socket keeps talking to one backend while the slots are unchanged.
#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    lb::connect4(&ctx, lb::Pick::PerSocket)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    lb::connect6(&ctx, lb::Pick::PerSocket)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn recvmsg4(ctx: SockAddrContext) -> i32 {
    lb::reverse4(&ctx);
    ALLOW
}

#[cgroup_sock_addr(recvmsg6)]
pub fn recvmsg6(ctx: SockAddrContext) -> i32 {
    lb::reverse6(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn getpeername4(ctx: SockAddrContext) -> i32 {
    lb::reverse4(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn getpeername6(ctx: SockAddrContext) -> i32 {
    lb::reverse6(&ctx);
    ALLOW
}

/// Server-side policy: judges the first packet of each connection arriving at a socket under the cgroup root.
#[cgroup_skb(ingress)]
pub fn policy_ingress(ctx: SkBuffContext) -> i32 {
    policy::ingress(&ctx)
}

/// Redirect to the node proxy: moves a redirected connection's record to where the proxy finds it.
#[sock_ops]
pub fn proxy_sockops(ctx: SockOpsContext) -> u32 {
    redirect::sock_ops(&ctx);
    // sock_ops programs return 1 ("ok"); the value only matters for the callbacks that ask for a reply.
    1
}

/// Same-node acceleration: adds established connections between local pods to `sk_conns` (only attached when the
/// agent runs with `--sockmap`).
#[sock_ops]
pub fn accel_sockops(ctx: SockOpsContext) -> u32 {
    accel::sock_ops(&ctx);
    1
}

/// Same-node acceleration: hands each send of a socket in `sk_conns` to its peer socket.
#[sk_msg]
pub fn accel_msg(ctx: SkMsgContext) -> u32 {
    accel::msg(&ctx)
}

/// Same-node acceleration: a verdict program that passes every received packet to the socket. Attaching it to
/// `sk_conns` makes the kernel queue everything a socket in the map receives through the psock, which works around
/// lost wakeups with sk_msg-only sockets on some 6.18 kernels (docs/performance.md).
#[stream_verdict]
pub fn accel_verdict(_ctx: SkBuffContext) -> u32 {
    sk_action::SK_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
