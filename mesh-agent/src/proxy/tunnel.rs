//! Moving bytes: TCP to an HTTP/2 stream (both tunnel ends) and TCP to TCP (same node), plus the HBONE header
//! helpers.
//!
//! Both copies run the two directions as two futures joined in the connection's own task (no extra task, no
//! channel), and keep no buffer while idle: each direction waits for `readable()` and only then allocates a fresh
//! chunk, which is frozen and handed on (to h2, which sends it without copying, or to the other socket). Half-close
//! is preserved: EOF on one side becomes END_STREAM (or `shutdown(SHUT_WR)`) on the other, and the other direction
//! carries on. An error anywhere aborts both: the stream is reset and the TCP socket closed with RST (zero linger),
//! so a reset propagates end to end.

use std::fmt;
use std::future::{Future, poll_fn};
use std::io;
use std::net::{IpAddr, SocketAddr};

use bytes::{Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::Shared;
use super::metrics::{Access, Meter, TcpLabels};

/// How much one read takes off a socket. Allocated per read, only once the socket is readable.
pub(crate) const CHUNK: usize = 16 * 1024;
/// The HTTP/2 stream receive window: large, so one stream can fill a fast link without waiting for WINDOW_UPDATEs.
/// It is credit, not a buffer: memory is used only while the receiving app is slower than the sender.
pub(crate) const STREAM_WINDOW: u32 = 4 << 20;
/// The HTTP/2 connection receive window, shared by the streams of one tunnel connection.
pub(crate) const CONNECTION_WINDOW: u32 = 16 << 20;

/// Why a copy ended early. The copy has already aborted both sides when it returns one.
#[derive(Debug)]
pub(crate) enum CopyError {
    /// The TCP side named by the string ("client", "server") failed (a reset, usually).
    Tcp(&'static str, io::Error),
    /// The tunnel stream failed: reset by the peer, or the tunnel connection broke.
    Stream(h2::Error),
    /// The stream was closed while data was waiting for send capacity.
    StreamClosed,
    /// The proxy's drain timed out.
    Cut,
}

impl fmt::Display for CopyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CopyError::Tcp(side, e) => write!(f, "{side} connection: {e}"),
            CopyError::Stream(e) => write!(f, "tunnel stream: {e}"),
            CopyError::StreamClosed => f.write_str("tunnel stream closed"),
            CopyError::Cut => f.write_str("cut by drain"),
        }
    }
}

/// Which end of the app connection the TCP side of a tunnel copy is.
#[derive(Clone, Copy, Debug)]
pub(crate) enum TcpEnd {
    /// The outbound side: the TCP peer is the client, and this proxy reports as the Istio `source`.
    Client,
    /// The inbound side: the TCP peer is the server, and this proxy reports as the Istio `destination`.
    Server,
}

/// Carries one app connection over an open tunnel stream: counts it under the mTLS Istio metrics as its end's
/// reporter, copies until it ends, and writes its access record.
pub(crate) async fn carry(
    shared: &Shared,
    tcp: &mut TcpStream,
    end: TcpEnd,
    send: &mut SendStream<Bytes>,
    recv: &mut RecvStream,
    access: &Access,
) {
    let (side, reporter) = match end {
        TcpEnd::Client => ("client", "source"),
        TcpEnd::Server => ("server", "destination"),
    };
    let labels = [TcpLabels::new(
        reporter,
        &access.src,
        &access.dst,
        "mutual_tls",
    )];
    let mut meters = shared.metrics.connection(&labels);
    let result = {
        // What the TCP side sends goes towards the other end.
        let (from_tcp, to_tcp) = match end {
            TcpEnd::Client => (&mut meters.to_server, &mut meters.to_client),
            TcpEnd::Server => (&mut meters.to_client, &mut meters.to_server),
        };
        tcp_h2(tcp, side, send, recv, from_tcp, to_tcp, shared.cut()).await
    };
    access.finish(&meters, result);
}

/// Copies between `tcp` and a tunnel stream until both directions have ended, or one fails, or `cut` resolves.
/// `tcp_side` names the TCP peer for errors ("client" on the outbound side, "server" inbound); `from_tcp` and
/// `to_tcp` count the bytes each way as they flow.
pub(crate) async fn tcp_h2(
    tcp: &mut TcpStream,
    tcp_side: &'static str,
    send: &mut SendStream<Bytes>,
    recv: &mut RecvStream,
    from_tcp: &mut Meter,
    to_tcp: &mut Meter,
    cut: impl Future<Output = ()>,
) -> Result<(), CopyError> {
    let result = {
        let (rd, mut wr) = tcp.split();
        let up = async {
            while let Some(data) = read_chunk(rd.as_ref())
                .await
                .map_err(|e| CopyError::Tcp(tcp_side, e))?
            {
                let n = data.len();
                send_all(send, data).await?;
                from_tcp.add(n);
            }
            // EOF: END_STREAM, and the peer shuts down its TCP write side. An empty DATA frame needs no capacity.
            send.send_data(Bytes::new(), true)
                .map_err(CopyError::Stream)
        };
        let down = async {
            while let Some(data) = recv.data().await {
                let data = data.map_err(CopyError::Stream)?;
                let n = data.len();
                wr.write_all(&data)
                    .await
                    .map_err(|e| CopyError::Tcp(tcp_side, e))?;
                to_tcp.add(n);
                // Only now give the window back: a slow reader slows the sender instead of growing our memory.
                // (Cannot fail: `n` bytes were received and not yet released.)
                let _ = recv.flow_control().release_capacity(n);
            }
            // END_STREAM from the peer.
            wr.shutdown().await.map_err(|e| CopyError::Tcp(tcp_side, e))
        };
        tokio::select! {
            r = async { tokio::try_join!(up, down) } => r.map(|_| ()),
            () = cut => Err(CopyError::Cut),
        }
    };
    if result.is_err() {
        // Propagate the abort both ways. Resetting an already closed stream is a no-op.
        send.send_reset(Reason::CANCEL);
        let _ = tcp.set_zero_linger();
    }
    result
}

/// Copies between two TCP connections (same node: client and server) until both directions have ended, or one
/// fails (both are then closed with RST), or `cut` resolves.
pub(crate) async fn tcp_tcp(
    client: &mut TcpStream,
    server: &mut TcpStream,
    to_server: &mut Meter,
    to_client: &mut Meter,
    cut: impl Future<Output = ()>,
) -> Result<(), CopyError> {
    let result = {
        let (crd, mut cwr) = client.split();
        let (srd, mut swr) = server.split();
        let up = async {
            while let Some(data) = read_chunk(crd.as_ref())
                .await
                .map_err(|e| CopyError::Tcp("client", e))?
            {
                swr.write_all(&data)
                    .await
                    .map_err(|e| CopyError::Tcp("server", e))?;
                to_server.add(data.len());
            }
            swr.shutdown()
                .await
                .map_err(|e| CopyError::Tcp("server", e))
        };
        let down = async {
            while let Some(data) = read_chunk(srd.as_ref())
                .await
                .map_err(|e| CopyError::Tcp("server", e))?
            {
                cwr.write_all(&data)
                    .await
                    .map_err(|e| CopyError::Tcp("client", e))?;
                to_client.add(data.len());
            }
            cwr.shutdown()
                .await
                .map_err(|e| CopyError::Tcp("client", e))
        };
        tokio::select! {
            r = async { tokio::try_join!(up, down) } => r.map(|_| ()),
            () = cut => Err(CopyError::Cut),
        }
    };
    if result.is_err() {
        let _ = client.set_zero_linger();
        let _ = server.set_zero_linger();
    }
    result
}

/// The next chunk from `tcp`, or None at EOF. Waits for readability first, so an idle connection holds no buffer.
async fn read_chunk(tcp: &TcpStream) -> io::Result<Option<Bytes>> {
    loop {
        tcp.readable().await?;
        let mut buf = BytesMut::with_capacity(CHUNK);
        match tcp.try_read_buf(&mut buf) {
            Ok(0) => return Ok(None),
            Ok(_) => return Ok(Some(buf.freeze())),
            // A spurious wake-up: the readiness was cleared, wait again.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Sends `data` on the stream within its flow-control window: reserves capacity, waits until some is assigned, sends
/// that much, and repeats. (Sending without capacity would make h2 buffer without bound.)
async fn send_all(send: &mut SendStream<Bytes>, mut data: Bytes) -> Result<(), CopyError> {
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let mut cap = send.capacity();
        while cap == 0 {
            cap = match poll_fn(|cx| send.poll_capacity(cx)).await {
                Some(Ok(n)) => n,
                Some(Err(e)) => return Err(CopyError::Stream(e)),
                None => return Err(CopyError::StreamClosed),
            };
        }
        let chunk = data.split_to(cap.min(data.len()));
        send.send_data(chunk, false).map_err(CopyError::Stream)?;
    }
    Ok(())
}

/// The `:authority` of a CONNECT to `dst`: `ip:port`, IPv6 in brackets (without a zone, which has no meaning on
/// another node).
pub(crate) fn authority(dst: SocketAddr) -> String {
    match dst {
        SocketAddr::V4(a) => format!("{}:{}", a.ip(), a.port()),
        SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
    }
}

/// Parses a CONNECT authority: an IP literal and a port, nothing else (the proxy never resolves names).
pub(crate) fn parse_authority(authority: &str) -> Option<SocketAddr> {
    authority.parse().ok()
}

/// The `forwarded` header value naming the original client (RFC 7239: an IPv6 address is bracketed and quoted).
pub(crate) fn forwarded_for(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("for={v4}"),
        IpAddr::V6(v6) => format!("for=\"[{v6}]\""),
    }
}

/// The client IP in a `forwarded` header: the `for=` of the first element (the original client), with or without
/// quotes, brackets and a port. None if absent or not an IP (e.g. `for=unknown`, an obfuscated name).
pub(crate) fn parse_forwarded_for(value: &str) -> Option<IpAddr> {
    let first = value.split(',').next()?;
    let v = first.split(';').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        k.trim().eq_ignore_ascii_case("for").then_some(v.trim())
    })?;
    let v = v.trim_matches('"');
    if let Some(rest) = v.strip_prefix('[') {
        // "[v6]" or "[v6]:port"
        return rest.split_once(']')?.0.parse().ok();
    }
    v.parse::<IpAddr>()
        .ok()
        .or_else(|| v.parse::<SocketAddr>().ok().map(|s| s.ip()))
}

#[cfg(test)]
mod header_tests {
    use super::*;

    #[test]
    fn authority_and_forwarded_round_trip() {
        let v4: SocketAddr = "10.1.2.3:8080".parse().unwrap();
        let v6: SocketAddr = "[fd00::1]:443".parse().unwrap();
        assert_eq!(authority(v4), "10.1.2.3:8080");
        assert_eq!(authority(v6), "[fd00::1]:443");
        assert_eq!(parse_authority(&authority(v6)), Some(v6));
        assert_eq!(parse_authority("example.com:80"), None);
        assert_eq!(parse_authority("10.1.2.3"), None);

        assert_eq!(forwarded_for(v4.ip()), "for=10.1.2.3");
        assert_eq!(forwarded_for(v6.ip()), "for=\"[fd00::1]\"");
        for ip in [v4.ip(), v6.ip()] {
            assert_eq!(parse_forwarded_for(&forwarded_for(ip)), Some(ip));
        }
        assert_eq!(
            parse_forwarded_for("For=\"[fd00::1]:4711\";proto=http, for=10.9.9.9"),
            Some(v6.ip())
        );
        assert_eq!(
            parse_forwarded_for("proto=https;for=\"10.1.2.3:5\""),
            Some(v4.ip())
        );
        assert_eq!(parse_forwarded_for("for=unknown"), None);
        assert_eq!(parse_forwarded_for("by=10.0.0.1"), None);
    }
}
