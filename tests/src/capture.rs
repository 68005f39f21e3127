//! Packet capture without tcpdump, and threads that live in another network namespace.
//!
//! [`Capture::start`] opens an `AF_PACKET`/`SOCK_RAW` socket for every protocol (`ETH_P_ALL`) bound to one interface
//! inside one network namespace (the socket is created on a dedicated thread that `setns`es into it first, so the
//! test's own threads never move), records whole frames, both directions, in the background until
//! [`Capture::stop`] (bounded in frames and in time), and [`Captured`] answers what the tests ask of it: every
//! (source, destination, protocol, ports) seen, and whether a byte pattern occurs anywhere in a frame.
//!
//! [`in_netns`] / [`spawn_in_netns`] run a closure on a thread inside a namespace (TLS probes and fake servers that
//! must be "on a node"). This module and [`crate::sys`] hold the crate's only unsafe code.
#![allow(unsafe_code)]

use std::collections::BTreeSet;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

/// Runs `f` on a new thread inside the network namespace at `netns` (e.g. a node's `/var/run/netns/<name>`) and
/// returns its result. Sockets `f` creates belong to that namespace. (The agent's own helper, so the tests enter
/// namespaces exactly as the agent does.)
pub fn in_netns<T: Send + 'static>(
    netns: &Path,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    mesh_agent::sys::in_netns(Some(netns), f).with_context(|| format!("in {}", netns.display()))
}

/// Starts `f` on a new thread (named `name`) inside the network namespace at `netns`. The thread exits when `f`
/// returns; the caller bounds `f` in time.
pub fn spawn_in_netns<T: Send + 'static>(
    netns: &Path,
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<JoinHandle<T>> {
    let ns = std::fs::File::open(netns).with_context(|| format!("open {}", netns.display()))?;
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            let entered = mesh_agent::sys::enter_netns(&ns);
            let ok = entered.is_ok();
            let _ = tx.send(entered);
            // Never run `f` in the wrong namespace (the caller already has the error).
            assert!(ok, "setns failed");
            f()
        })
        .context("spawning a thread")?;
    match rx.recv() {
        Ok(Ok(())) => Ok(h),
        Ok(Err(e)) => {
            let _ = h.join();
            Err(e).with_context(|| format!("setns into {}", netns.display()))
        }
        Err(_) => Err(anyhow!("netns thread ended before entering")),
    }
}

/// One captured frame (Ethernet header included).
#[derive(Clone)]
pub struct Frame {
    /// The frame's bytes, as far as they were captured.
    pub data: Vec<u8>,
    /// Sent by this host (else received).
    pub outgoing: bool,
}

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match Packet::parse(&self.data) {
            Some(p) => write!(f, "{} {p}", if self.outgoing { "out" } else { "in " }),
            None => write!(f, "non-IP frame of {} bytes", self.data.len()),
        }
    }
}

/// IP protocol numbers the tests name.
pub mod proto {
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// ICMP.
    pub const ICMP: u8 = 1;
}

/// The addresses and ports of one IP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FlowKey {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// IP protocol number ([`proto`]).
    pub proto: u8,
    /// Source port (TCP/UDP; 0 otherwise).
    pub sport: u16,
    /// Destination port (TCP/UDP; 0 otherwise).
    pub dport: u16,
}

impl fmt::Display for FlowKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = match self.proto {
            proto::TCP => "tcp".to_string(),
            proto::UDP => "udp".to_string(),
            proto::ICMP => "icmp".to_string(),
            n => format!("proto{n}"),
        };
        let at = |ip: &IpAddr, port: u16| match ip {
            IpAddr::V4(a) => format!("{a}:{port}"),
            IpAddr::V6(a) => format!("[{a}]:{port}"),
        };
        write!(
            f,
            "{p} {} -> {}",
            at(&self.src, self.sport),
            at(&self.dst, self.dport)
        )
    }
}

/// A parsed IP packet in a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet<'a> {
    /// Addresses, protocol and ports.
    pub key: FlowKey,
    /// The transport payload (after the TCP/UDP header; the whole IP payload for other protocols).
    pub payload: &'a [u8],
}

impl fmt::Display for Packet<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({} payload bytes)", self.key, self.payload.len())
    }
}

impl<'a> Packet<'a> {
    /// Parses an Ethernet frame carrying IPv4 or IPv6 (VLAN tags skipped); `None` for anything else.
    pub fn parse(frame: &'a [u8]) -> Option<Packet<'a>> {
        let mut off = 12;
        let mut ethertype = u16::from_be_bytes([*frame.get(off)?, *frame.get(off + 1)?]);
        off += 2;
        // 802.1Q / 802.1ad tags (at most two).
        for _ in 0..2 {
            if ethertype == 0x8100 || ethertype == 0x88a8 {
                ethertype = u16::from_be_bytes([*frame.get(off + 2)?, *frame.get(off + 3)?]);
                off += 4;
            }
        }
        let ip = frame.get(off..)?;
        let (src, dst, proto, l4) = match ethertype {
            0x0800 => {
                if ip.len() < 20 || ip[0] >> 4 != 4 {
                    return None;
                }
                let ihl = usize::from(ip[0] & 0x0f) * 4;
                let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
                // GSO frames may carry total length 0; trust the frame then.
                let end = if total >= ihl && total <= ip.len() {
                    total
                } else {
                    ip.len()
                };
                let src = IpAddr::V4(Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]));
                let dst = IpAddr::V4(Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]));
                (src, dst, ip[9], ip.get(ihl..end)?)
            }
            0x86dd => {
                if ip.len() < 40 || ip[0] >> 4 != 6 {
                    return None;
                }
                let mut a = [0u8; 16];
                a.copy_from_slice(&ip[8..24]);
                let src = IpAddr::V6(Ipv6Addr::from(a));
                a.copy_from_slice(&ip[24..40]);
                let dst = IpAddr::V6(Ipv6Addr::from(a));
                // Extension headers are not followed: the tests' traffic has none.
                (src, dst, ip[6], &ip[40..])
            }
            _ => return None,
        };
        let (sport, dport, payload) = match proto {
            proto::TCP if l4.len() >= 20 => {
                let hl = usize::from(l4[12] >> 4) * 4;
                (
                    u16::from_be_bytes([l4[0], l4[1]]),
                    u16::from_be_bytes([l4[2], l4[3]]),
                    l4.get(hl..).unwrap_or(&[]),
                )
            }
            proto::UDP if l4.len() >= 8 => (
                u16::from_be_bytes([l4[0], l4[1]]),
                u16::from_be_bytes([l4[2], l4[3]]),
                &l4[8..],
            ),
            _ => (0, 0, l4),
        };
        Some(Packet {
            key: FlowKey {
                src,
                dst,
                proto,
                sport,
                dport,
            },
            payload,
        })
    }
}

/// What a capture recorded.
#[derive(Debug, Clone, Default)]
pub struct Captured {
    /// Every frame, in order.
    pub frames: Vec<Frame>,
    /// The frame bound was reached (later frames were not recorded).
    pub truncated: bool,
    /// Frames longer than the receive buffer (their tails are missing).
    pub cut_frames: u64,
}

impl Captured {
    /// Every IP packet, parsed.
    pub fn packets(&self) -> impl Iterator<Item = Packet<'_>> {
        self.frames.iter().filter_map(|f| Packet::parse(&f.data))
    }

    /// Every distinct (source, destination, protocol, ports) seen.
    pub fn flows(&self) -> BTreeSet<FlowKey> {
        self.packets().map(|p| p.key).collect()
    }

    /// Whether `pattern` occurs in any frame (anywhere: headers or payload).
    pub fn contains(&self, pattern: &[u8]) -> bool {
        !pattern.is_empty()
            && self
                .frames
                .iter()
                .any(|f| f.data.windows(pattern.len()).any(|w| w == pattern))
    }

    /// Whether `pattern` occurs in any transport payload.
    pub fn payload_contains(&self, pattern: &[u8]) -> bool {
        !pattern.is_empty()
            && self
                .packets()
                .any(|p| p.payload.windows(pattern.len()).any(|w| w == pattern))
    }

    /// A short summary for failure messages: the distinct flows with their packet counts.
    pub fn summary(&self) -> String {
        let mut counts: std::collections::BTreeMap<FlowKey, usize> = Default::default();
        for p in self.packets() {
            *counts.entry(p.key).or_default() += 1;
        }
        let non_ip = self.frames.len() - counts.values().sum::<usize>();
        let mut s = format!(
            "{} frames ({non_ip} non-IP{}), {} flows:",
            self.frames.len(),
            if self.truncated { ", TRUNCATED" } else { "" },
            counts.len()
        );
        for (k, n) in counts {
            s.push_str(&format!("\n  {k} x{n}"));
        }
        s
    }
}

/// A capture running in the background; stopped by [`Capture::stop`] (or on drop, discarding the frames).
pub struct Capture {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<io::Result<Captured>>>,
    what: String,
}

impl fmt::Debug for Capture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Capture({})", self.what)
    }
}

/// The receive buffer per frame: big enough for a GSO/GRO super-packet on a veth.
const FRAME_BUF: usize = 256 * 1024;

impl Capture {
    /// Starts capturing on interface `ifname` of the network namespace at `netns`. Returns once the socket is
    /// bound, so traffic sent after this call is seen. Records at most `max_frames` frames, for at most
    /// `max_duration`.
    pub fn start(
        netns: &Path,
        ifname: &str,
        max_frames: usize,
        max_duration: Duration,
    ) -> Result<Capture> {
        let ifname_c = std::ffi::CString::new(ifname).context("interface name")?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let (tx, rx) = std::sync::mpsc::channel::<io::Result<()>>();
        let handle = spawn_in_netns(netns, "capture", move || {
            let sock = match open_packet_socket(&ifname_c) {
                Ok(s) => {
                    let _ = tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let kind = e.kind();
                    let msg = e.to_string();
                    let _ = tx.send(Err(e));
                    return Err(io::Error::new(kind, msg));
                }
            };
            record(&sock, &stop2, max_frames, max_duration)
        })?;
        let what = format!("{ifname} in {}", netns.display());
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(Ok(())) => Ok(Capture {
                stop,
                handle: Some(handle),
                what,
            }),
            Ok(Err(e)) => {
                let _ = handle.join();
                Err(e).with_context(|| format!("capture on {what}"))
            }
            Err(_) => {
                stop.store(true, Ordering::Relaxed);
                bail!("capture on {what}: the socket was not ready within 5 s")
            }
        }
    }

    /// Stops and returns what was recorded.
    pub fn stop(mut self) -> Result<Captured> {
        self.stop.store(true, Ordering::Relaxed);
        let h = self.handle.take().expect("not stopped yet");
        h.join()
            .map_err(|_| anyhow!("capture thread panicked"))?
            .with_context(|| format!("capture on {}", self.what))
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// An `AF_PACKET` socket receiving every frame of one interface (of the calling thread's namespace).
fn open_packet_socket(ifname: &std::ffi::CStr) -> io::Result<OwnedFd> {
    // SAFETY: plain syscalls on values owned here; the descriptor is wrapped in an OwnedFd at once.
    unsafe {
        let ifindex = libc::if_nametoindex(ifname.as_ptr());
        if ifindex == 0 {
            return Err(io::Error::last_os_error());
        }
        // Protocol 0: nothing is queued until bind() picks the interface, so no frame of another interface slips in.
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let sock = OwnedFd::from_raw_fd(fd);
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        sll.sll_ifindex = ifindex as i32;
        if libc::bind(
            sock.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
        // Wake up regularly to look at the stop flag.
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 50_000,
        };
        if libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
        // A roomy queue, so a burst is not dropped while the thread copies frames.
        let size: libc::c_int = 4 << 20;
        let _ = libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        Ok(sock)
    }
}

/// Reads frames until stopped, `max_frames` were kept, or `max_duration` passed.
fn record(
    sock: &OwnedFd,
    stop: &AtomicBool,
    max_frames: usize,
    max_duration: Duration,
) -> io::Result<Captured> {
    let deadline = Instant::now() + max_duration;
    let mut out = Captured::default();
    let mut buf = vec![0u8; FRAME_BUF];
    // Each iteration is a recv that returns within the 50 ms timeout, so the loop ends by the deadline at the latest.
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        // SAFETY: recvfrom into a buffer we own, with its length; `from` is a zeroed sockaddr_ll of the right size.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut from_len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        let n = unsafe {
            libc::recvfrom(
                sock.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_TRUNC,
                (&mut from as *mut libc::sockaddr_ll).cast(),
                &mut from_len,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock
                | io::ErrorKind::TimedOut
                | io::ErrorKind::Interrupted => {
                    continue;
                }
                _ => return Err(e),
            }
        }
        if out.frames.len() >= max_frames {
            out.truncated = true;
            continue;
        }
        let n = n as usize;
        if n > buf.len() {
            out.cut_frames += 1;
        }
        out.frames.push(Frame {
            data: buf[..n.min(buf.len())].to_vec(),
            outgoing: from.sll_pkttype == libc::PACKET_OUTGOING,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eth(ethertype: u16, ip: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(ip);
        f
    }

    #[test]
    fn parses_ipv4_tcp_and_finds_patterns() {
        let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, proto::TCP, 0, 0];
        ip.extend_from_slice(&[172, 30, 0, 1, 172, 30, 0, 2]);
        let mut tcp = vec![0u8; 20];
        tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&15008u16.to_be_bytes());
        tcp[12] = 5 << 4;
        ip.extend_from_slice(&tcp);
        ip.extend_from_slice(b"hello marker");
        let total = ip.len() as u16;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        let c = Captured {
            frames: vec![
                Frame {
                    data: eth(0x0800, &ip),
                    outgoing: true,
                },
                Frame {
                    data: eth(0x0806, &[0; 28]),
                    outgoing: false,
                },
            ],
            ..Default::default()
        };
        let flows: Vec<FlowKey> = c.flows().into_iter().collect();
        assert_eq!(flows.len(), 1);
        assert_eq!(flows[0].src, IpAddr::V4(Ipv4Addr::new(172, 30, 0, 1)));
        assert_eq!((flows[0].sport, flows[0].dport), (40000, 15008));
        assert_eq!(flows[0].proto, proto::TCP);
        assert!(c.contains(b"marker"));
        assert!(c.payload_contains(b"hello"));
        assert!(!c.contains(b"absent"));
        assert!(!c.contains(b""));
        assert!(
            c.summary()
                .contains("tcp 172.30.0.1:40000 -> 172.30.0.2:15008 x1")
        );
    }

    #[test]
    fn parses_ipv6_udp() {
        let mut ip = vec![0x60, 0, 0, 0, 0, 12, proto::UDP, 64];
        ip.extend_from_slice(&"fd00::1".parse::<Ipv6Addr>().unwrap().octets());
        ip.extend_from_slice(&"fd00::2".parse::<Ipv6Addr>().unwrap().octets());
        ip.extend_from_slice(&[0, 53, 0, 54, 0, 12, 0, 0, 1, 2, 3, 4]);
        let frame = eth(0x86dd, &ip);
        let p = Packet::parse(&frame).unwrap();
        assert_eq!(
            (p.key.sport, p.key.dport, p.key.proto),
            (53, 54, proto::UDP)
        );
        assert_eq!(p.payload, &[1, 2, 3, 4]);
    }
}
