//! The agent's few raw system calls that neither std nor aya 0.14 wrap: filesystem magic checks, mounting bpffs,
//! `BPF_LINK_UPDATE` (swapping the program behind a pinned cgroup link without detaching it), sockmap links, and
//! `SOCK_DESTROY` (resetting a connection whose acceleration policy revoked).
#![allow(unsafe_code)]

use std::{
    ffi::CString,
    io,
    os::fd::{AsFd, AsRawFd, FromRawFd},
    path::Path,
};

/// `BPF_FS_MAGIC` from linux/magic.h.
pub const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// `CGROUP2_SUPER_MAGIC` from linux/magic.h.
pub const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

fn cstr(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// The filesystem magic number of `path` (`statfs(2)`).
pub fn fs_magic(path: &Path) -> io::Result<i64> {
    let c = cstr(path)?;
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid NUL-terminated string and st a valid out-pointer.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as i64)
}

/// `mount -t bpf bpf <path>`.
pub fn mount_bpffs(path: &Path) -> io::Result<()> {
    let target = cstr(path)?;
    let fstype = c"bpf";
    // SAFETY: all pointers are valid NUL-terminated strings; data is null.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `union bpf_attr` as used by `BPF_LINK_UPDATE`.
#[repr(C)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

const BPF_LINK_UPDATE: libc::c_long = 29;

/// Atomically replaces the program behind a bpf_link. The attachment never goes away, so no connect can slip
/// through unbalanced (or, later, unenforced) while the agent upgrades itself.
pub fn link_update(link: impl AsFd, new_prog: impl AsFd) -> io::Result<()> {
    let attr = LinkUpdateAttr {
        link_fd: link.as_fd().as_raw_fd() as u32,
        new_prog_fd: new_prog.as_fd().as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    bpf(BPF_LINK_UPDATE, &attr).map(drop)
}

/// `bpf(cmd, attr, sizeof attr)`. Every `attr` here is a `#[repr(C)]` prefix of `union bpf_attr` with no implicit
/// padding, fully initialised; the kernel zero-extends what it does not get.
fn bpf<T>(cmd: libc::c_long, attr: &T) -> io::Result<i64> {
    // SAFETY: attr is valid for reads of size_of::<T>() bytes for the duration of the call, and any pointer
    // inside it points at memory that outlives the call (the callers' locals).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *const T,
            std::mem::size_of::<T>() as u32,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

/// `union bpf_attr` as used by `BPF_LINK_CREATE` for a sockmap target.
#[repr(C)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

const BPF_LINK_CREATE: libc::c_long = 28;
/// `BPF_SK_MSG_VERDICT`.
pub const ATTACH_SK_MSG_VERDICT: u32 = 7;
/// `BPF_SK_SKB_STREAM_VERDICT`.
pub const ATTACH_SK_SKB_STREAM_VERDICT: u32 = 5;

/// Attaches `prog` to the sockmap or sockhash `map` through a bpf_link (Linux 6.10+), which aya 0.14 does not
/// wrap: unlike the older `BPF_PROG_ATTACH`, the link can be pinned, listed by `bpftool link` and updated in place.
pub fn sockmap_link_create(
    prog: impl AsFd,
    map: impl AsFd,
    attach_type: u32,
) -> io::Result<std::os::fd::OwnedFd> {
    let attr = LinkCreateAttr {
        prog_fd: prog.as_fd().as_raw_fd() as u32,
        target_fd: map.as_fd().as_raw_fd() as u32,
        attach_type,
        flags: 0,
    };
    let fd = bpf(BPF_LINK_CREATE, &attr)?;
    // SAFETY: the kernel returned a fresh fd that we now own.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

const BPF_OBJ_PIN: libc::c_long = 6;

/// Pins a bpf object (here: a link) at `path`.
pub fn obj_pin(obj: impl AsFd, path: &Path) -> io::Result<()> {
    let c = cstr(path)?;
    let attr = ObjGetAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: obj.as_fd().as_raw_fd() as u32,
        file_flags: 0,
    };
    bpf(BPF_OBJ_PIN, &attr).map(drop)
}

/// `union bpf_attr` as used by `BPF_OBJ_GET` and `BPF_OBJ_PIN`.
#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

const BPF_OBJ_GET: libc::c_long = 7;

/// Opens a pinned bpf object (here: a link) and returns an owned fd, which aya 0.14's `PinnedLink` does not expose.
pub fn obj_get(path: &Path) -> io::Result<std::os::fd::OwnedFd> {
    let c = cstr(path)?;
    let attr = ObjGetAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    let rc = bpf(BPF_OBJ_GET, &attr)?;
    // SAFETY: the kernel returned a fresh fd that we now own.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(rc as i32) })
}

/// `umount <path>`.
pub fn umount(path: &Path) -> io::Result<()> {
    let c = cstr(path)?;
    // SAFETY: c is a valid NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Takes an exclusive `flock` on `file` without blocking. `Ok(false)` means another process holds it. The lock goes
/// away with the fd, including when the process is killed.
pub fn try_lock_exclusive(file: &std::fs::File) -> io::Result<bool> {
    // SAFETY: the fd is valid for the duration of the call.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// `SO_NETNS_COOKIE` (Linux 5.14+): the cookie of the socket's network namespace, the same value
/// `bpf_get_netns_cookie()` returns to the programs.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The netns cookie of the network namespace at `path` (a `/proc/<pid>/ns/net` or `ip netns` bind mount).
///
/// A throwaway thread enters the namespace and asks a socket created there; the agent's own threads never move.
pub fn netns_cookie(path: &Path) -> io::Result<u64> {
    in_netns(Some(path), || -> io::Result<u64> {
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let sock = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        let mut cookie: u64 = 0;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        let rc = unsafe {
            libc::getsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_NETNS_COOKIE,
                (&mut cookie as *mut u64).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(cookie)
    })?
}

/// Runs `f` on a throwaway thread that first enters the network namespace at `path` (`None`: the agent's own), so
/// the agent's other threads never move. Sockets `f` creates, and threads it spawns, belong to that namespace (a
/// new thread inherits its creator's namespaces).
pub fn in_netns<T: Send>(path: Option<&Path>, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    let ns = path.map(std::fs::File::open).transpose()?;
    std::thread::scope(|scope| {
        scope
            .spawn(move || -> io::Result<T> {
                if let Some(ns) = ns {
                    enter_netns(&ns)?;
                }
                Ok(f())
            })
            .join()
            .map_err(|_| io::Error::other("netns thread panicked"))?
    })
}

/// Moves the calling thread into the network namespace `ns` (an open `/proc/<pid>/ns/net` or `ip netns` file).
/// Only for threads made for it: the agent's own threads never move.
pub fn enter_netns(ns: &std::fs::File) -> io::Result<()> {
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads a `T` from the start of `bytes` (a ring buffer record), if there are enough of them.
pub fn read_record<T: aya::Pod>(bytes: &[u8]) -> Option<T> {
    if bytes.len() < std::mem::size_of::<T>() {
        return None;
    }
    // SAFETY: `T: Pod` is plain data valid for any bit pattern, and the length was checked; the record may be
    // unaligned, hence read_unaligned.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// Adds `addr` (a /32 or /128) to the loopback device of the current network namespace, unless it is there
/// already. The node proxy's link-local address lives there: pods reach it through their default route, and the
/// kernel drops packets from outside that claim it as their source (a local address arriving on another device is
/// a martian), so no pod can impersonate the proxy.
pub fn ensure_loopback_addr(addr: std::net::IpAddr) -> io::Result<()> {
    const LOOPBACK_IFINDEX: u32 = 1;
    let (family, bytes, prefix): (u8, Vec<u8>, u8) = match addr {
        std::net::IpAddr::V4(a) => (libc::AF_INET as u8, a.octets().to_vec(), 32),
        std::net::IpAddr::V6(a) => (libc::AF_INET6 as u8, a.octets().to_vec(), 128),
    };
    // nlmsghdr (16) + ifaddrmsg (8) + IFA_LOCAL and IFA_ADDRESS attributes (4 + len each, 4-aligned).
    let attr_len = 4 + bytes.len();
    let total = 16 + 8 + 2 * attr_len;
    let mut msg = Vec::with_capacity(total);
    msg.extend_from_slice(&(total as u32).to_ne_bytes());
    msg.extend_from_slice(&libc::RTM_NEWADDR.to_ne_bytes());
    let flags =
        (libc::NLM_F_REQUEST | libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_EXCL) as u16;
    msg.extend_from_slice(&flags.to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    msg.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel
    msg.extend_from_slice(&[family, prefix, 0, libc::RT_SCOPE_HOST]);
    msg.extend_from_slice(&LOOPBACK_IFINDEX.to_ne_bytes());
    for kind in [libc::IFA_LOCAL, libc::IFA_ADDRESS] {
        msg.extend_from_slice(&(attr_len as u16).to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&bytes);
    }
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let sent = unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut reply = [0u8; 512];
    let n = unsafe { libc::recv(fd.as_raw_fd(), reply.as_mut_ptr().cast(), reply.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // The ack is an NLMSG_ERROR whose error field is 0 on success, or a negative errno.
    if n as usize >= 20 && u16::from_ne_bytes([reply[4], reply[5]]) == libc::NLMSG_ERROR as u16 {
        let err = i32::from_ne_bytes([reply[16], reply[17], reply[18], reply[19]]);
        if err != 0 && -err != libc::EEXIST {
            return Err(io::Error::from_raw_os_error(-err));
        }
    }
    Ok(())
}

/// Sets `IP_BIND_ADDRESS_NO_PORT` on a socket that is about to `bind()` to an address with port 0 and then
/// `connect()`: the port is then chosen at connect time for the whole 4-tuple, so the same port can serve many
/// destinations. Without it, bind picks a port no other socket on that address holds, TIME_WAIT ones included,
/// and a busy proxy runs out of ports after about 28,000 recent connections.
pub fn bind_address_no_port(socket: &impl AsRawFd) -> io::Result<()> {
    let one: libc::c_int = 1;
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Returns the allocator's free memory to the system (`malloc_trim(0)`, every arena). The proxy's buffers come and
/// go with traffic; glibc keeps freed memory for reuse, so after a burst the agent would otherwise keep its peak
/// RSS indefinitely.
pub fn trim_heap() {
    unsafe {
        libc::malloc_trim(0);
    }
}

/// `struct inet_diag_req_v2` behind its `nlmsghdr`, as `SOCK_DESTROY` takes it.
#[repr(C)]
struct SockDestroyMsg {
    // struct nlmsghdr
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
    // struct inet_diag_req_v2
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    // struct inet_diag_sockid (ports and addresses in network order)
    sport: [u8; 2],
    dport: [u8; 2],
    src: [u8; 16],
    dst: [u8; 16],
    ifindex: u32,
    cookie: [u32; 2],
}

const NETLINK_INET_DIAG: libc::c_int = 4;
const SOCK_DESTROY: u16 = 21;

/// Aborts the TCP socket `local` -> `remote` of the calling thread's network namespace, as `ss -K` does: the
/// kernel sends a RST to the peer and the owner's next call fails with ECONNABORTED. Both addresses are as the
/// socket sees them; an IPv4 connection is looked up as an IPv4 socket first, then as a v4-mapped IPv6 one.
/// `Ok(false)`: no such socket.
pub fn destroy_tcp(local: std::net::SocketAddr, remote: std::net::SocketAddr) -> io::Result<bool> {
    use std::net::IpAddr;
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_INET_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd that we now own.
    let sock = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let bytes = |ip: IpAddr| match ip {
        IpAddr::V4(a) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&a.octets());
            b
        }
        IpAddr::V6(a) => a.octets(),
    };
    let mapped = |ip: IpAddr| match ip {
        IpAddr::V4(a) => IpAddr::V6(a.to_ipv6_mapped()),
        v6 => v6,
    };
    let (l, r) = (local.ip().to_canonical(), remote.ip().to_canonical());
    let mut tries = vec![(l, r)];
    if l.is_ipv4() {
        tries.push((mapped(l), mapped(r)));
    }
    for (seq, (lip, rip)) in tries.into_iter().enumerate() {
        let msg = SockDestroyMsg {
            len: std::mem::size_of::<SockDestroyMsg>() as u32,
            kind: SOCK_DESTROY,
            flags: (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16,
            seq: seq as u32 + 1,
            pid: 0,
            family: if lip.is_ipv4() {
                libc::AF_INET
            } else {
                libc::AF_INET6
            } as u8,
            protocol: libc::IPPROTO_TCP as u8,
            ext: 0,
            pad: 0,
            states: u32::MAX,
            sport: local.port().to_be_bytes(),
            dport: remote.port().to_be_bytes(),
            src: bytes(lip),
            dst: bytes(rip),
            ifindex: 0,
            // INET_DIAG_NOCOOKIE: match by tuple only.
            cookie: [u32::MAX; 2],
        };
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: msg and kernel are valid for their sizes during the call.
        let rc = unsafe {
            libc::sendto(
                sock.as_raw_fd(),
                (&msg as *const SockDestroyMsg).cast(),
                std::mem::size_of::<SockDestroyMsg>(),
                0,
                (&kernel as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // The ACK: an nlmsghdr followed by struct nlmsgerr, whose first field is the (negative) errno.
        let mut buf = [0u8; 512];
        // SAFETY: buf is valid for writes of its length.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n < 20 {
            return Err(io::Error::other("short netlink answer to SOCK_DESTROY"));
        }
        let errno = -i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
        match errno {
            0 => return Ok(true),
            libc::ENOENT => continue,
            e => return Err(io::Error::from_raw_os_error(e)),
        }
    }
    Ok(false)
}
