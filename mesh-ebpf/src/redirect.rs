//! The second half of the redirect to the node proxy: when a redirected connection is established, its record
//! moves from the socket cookie (all `connect()` knows) to the client's address and port (all the proxy's accepted
//! socket knows).
//!
//! The client's `ACTIVE_ESTABLISHED` callback runs when the SYN-ACK arrives, before the client sends the final
//! ACK, so the record is in `proxy_orig` before the proxy's `accept()` can return.

use core::ptr::{addr_of, read_volatile};

use aya_ebpf::{
    EbpfContext, bindings::BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
    helpers::generated::bpf_get_socket_cookie, programs::SockOpsContext,
};
use mesh_common::{from_words, policy::OrigKey, v4_mapped};

use crate::maps::{PROXY_ORIG, PROXY_PENDING};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

// sock_ops context fields must be read 4 bytes at a time, like the sock_addr ones.
#[inline(always)]
fn load(p: *const u32) -> u32 {
    unsafe { read_volatile(p) }
}

pub fn sock_ops(ctx: &SockOpsContext) {
    let ops = ctx.ops;
    // Every field is read up front, straight from the context: the verifier only accepts loads at a constant
    // offset from the unmodified context pointer, which a pointer kept across branches would not be.
    let op = load(unsafe { addr_of!((*ops).op) });
    if op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        return;
    }
    let family = load(unsafe { addr_of!((*ops).family) });
    let ip4 = load(unsafe { addr_of!((*ops).local_ip4) });
    let ip6 = [
        load(unsafe { addr_of!((*ops).local_ip6[0]) }),
        load(unsafe { addr_of!((*ops).local_ip6[1]) }),
        load(unsafe { addr_of!((*ops).local_ip6[2]) }),
        load(unsafe { addr_of!((*ops).local_ip6[3]) }),
    ];
    // `local_port` is in host order (unlike `remote_port`).
    let port = load(unsafe { addr_of!((*ops).local_port) }) as u16;
    let addr = match family {
        AF_INET => v4_mapped(ip4),
        AF_INET6 => from_words(ip6),
        _ => return,
    };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(orig) = PROXY_PENDING.get_ptr(&cookie) else {
        return;
    };
    let orig = unsafe { *orig };
    let key = OrigKey {
        addr,
        port,
        _pad: [0; 6],
    };
    let _ = PROXY_ORIG.insert(&key, &orig, 0);
    let _ = PROXY_PENDING.remove(&cookie);
}
