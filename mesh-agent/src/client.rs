//! The CLI's side of the admin endpoints: a minimal HTTP/1.0 GET, enough for `policy status`, `policy check`
//! and `flows` (no client dependency for three requests to loopback).

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{Context as _, bail};

/// GETs `path` (with its query) from the agent's admin address and returns the body of a 2xx response; other
/// statuses become an error carrying the body (the agent's message).
pub fn get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let timeout = Duration::from_secs(5);
    let mut s = TcpStream::connect_timeout(&addr, timeout).with_context(|| {
        format!("connecting to the agent's admin address {addr} (is `mesh-agent run` up? see --admin-addr)")
    })?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: sinew\r\n\r\n")?;
    let mut resp = Vec::new();
    s.take(64 << 20).read_to_end(&mut resp)?;
    let resp = String::from_utf8_lossy(&resp).into_owned();
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .context("malformed HTTP response from the agent")?;
    let code: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("malformed HTTP status line from the agent")?;
    if !(200..300).contains(&code) {
        let msg = serde_json::from_str::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
            .unwrap_or_else(|| body.trim().to_owned());
        bail!("{msg}");
    }
    Ok(body.to_owned())
}

/// Percent-encodes a query value.
pub fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            b => format!("%{b:02X}"),
        })
        .collect()
}
