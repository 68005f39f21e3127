//! Same-node socket acceleration (issue 6): sock_ops puts both ends of an established TCP connection between two
//! local pods into `sk_conns`, and sk_msg hands each send straight to the peer socket.

/// `sk_conns` key (a SockHash): one socket, as seen from its own side. The netns cookie makes equal 4-tuples in
/// different pods different keys, so a send can only ever reach the socket of the pod that owns the peer address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SockKey {
    /// The socket's network namespace cookie.
    pub netns_cookie: u64,
    /// IPv6 bytes (network order); IPv4 v4-mapped.
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    /// Host order.
    pub local_port: u16,
    /// Host order.
    pub remote_port: u16,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<SockKey>() == 48);

impl SockKey {
    /// The key under which the other end of this connection is stored, given the peer's netns cookie.
    #[inline(always)]
    pub const fn peer(&self, peer_netns_cookie: u64) -> SockKey {
        SockKey {
            netns_cookie: peer_netns_cookie,
            local_addr: self.remote_addr,
            remote_addr: self.local_addr,
            local_port: self.remote_port,
            remote_port: self.local_port,
            _pad: 0,
        }
    }
}

/// `sk_clients` value, keyed by the client end's [`SockKey`]: which side connected, so that the agent can judge
/// an accelerated connection again (client -> server port) when policy changes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AccelConn {
    /// The server pod's netns cookie, as `sk_pods` gave it when the connection was set up.
    pub server_netns_cookie: u64,
}
const _: () = assert!(core::mem::size_of::<AccelConn>() == 8);

/// Capacity of `sk_conns` (sockets, two per connection) and `sk_clients` (LRU).
pub const MAX_SOCK_CONNS: u32 = 65536;
/// Capacity of `sk_pods` (local pod address -> netns cookie).
pub const MAX_SOCK_PODS: u32 = 16384;

/// Indexes of the `sk_counters` per-CPU array.
pub mod counter {
    /// Sockets added to `sk_conns` (two per accelerated connection).
    pub const INSERTS: u32 = 0;
    /// Sends handed straight to the peer socket.
    pub const REDIRECTS: u32 = 1;
    /// Sends that found no peer socket and went through the TCP/IP stack; the sender then leaves `sk_conns`, so
    /// that a connection whose bytes took the stack once keeps taking it (no reordering).
    pub const MISSES: u32 = 2;
    /// Bytes handed straight to the peer socket.
    pub const REDIRECTED_BYTES: u32 = 3;
    /// Eligible sockets the kernel refused to add (the map is full, or the socket is in another map).
    pub const INSERT_ERRORS: u32 = 4;
    pub const COUNT: u32 = 5;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peer_of_the_peer_is_the_socket() {
        let client = SockKey {
            netns_cookie: 7,
            local_addr: [1; 16],
            remote_addr: [2; 16],
            local_port: 40000,
            remote_port: 80,
            _pad: 0,
        };
        let server = client.peer(9);
        assert_eq!(server.netns_cookie, 9);
        assert_eq!(
            (server.local_addr, server.local_port),
            (client.remote_addr, 80)
        );
        assert_eq!(server.peer(7), client);
    }
}
