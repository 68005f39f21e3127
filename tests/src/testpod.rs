//! The result lines `sinew-testpod` prints, shared by the binary (which writes them) and the harness (which reads
//! them).
//!
//! ## Wire protocol of `sinew-testpod serve`
//! One port serves TCP and UDP.
//! - **TCP:** on accept the server writes its name and a newline (`"b1\n"`), then echoes every byte it reads until
//!   the peer closes. A name query (`tcp-connect`) reads that first line and closes. Request/response clients (`rr`,
//!   `crr`) read the name line first, then write SIZE bytes and read SIZE bytes back per request. So one server
//!   answers "who are you" and latency probes alike, and a client always knows which backend it reached.
//! - **UDP:** every datagram is answered with the server's name, sent from the same socket to the sender.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Printed once by `serve` when its sockets are bound: `{"event":"listening",...}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ServeReady {
    /// Always `"listening"`.
    pub event: String,
    /// The bound port.
    pub port: u16,
    /// The name the server answers with.
    pub name: String,
    /// Whether TCP is served.
    pub tcp: bool,
    /// Whether UDP is served.
    pub udp: bool,
    /// Every port served when started with `--ports` (`port` is then the first).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
}

/// One failed attempt.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Failure {
    /// 0-based attempt number.
    pub index: u32,
    /// `"connect"`, `"read"`, `"write"`, `"send"` or `"recv"`.
    pub stage: String,
    /// Symbolic errno (`ECONNREFUSED`, ...), or `TIMEOUT` when the tool's own timeout fired, or `EOF`.
    pub errno: String,
    /// The full error text.
    pub message: String,
    /// How long the failing step took, in milliseconds.
    pub elapsed_ms: f64,
}

/// Result of `tcp-connect`: N sequential connections, each reading the server's name.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ConnectReport {
    /// Target as given.
    pub to: String,
    /// Connections attempted.
    pub attempts: u32,
    /// Connections that connected and read a name.
    pub ok: u32,
    /// Connections that failed at any stage.
    pub failed: u32,
    /// Server name -> how many connections reached it.
    pub names: BTreeMap<String, u32>,
    /// `getpeername()` result (`ip:port`) -> count. With the mesh this is the VIP, not the backend.
    pub peers: BTreeMap<String, u32>,
    /// `stage:errno` -> count.
    pub errors: BTreeMap<String, u32>,
    /// Per attempt, in order: the server name, or `!<stage>:<errno>`.
    pub sequence: Vec<String>,
    /// The first failures (at most 50), with timings.
    pub failures: Vec<Failure>,
    /// Wall-clock start and end (ms since the epoch) to line the run up with events in the test.
    pub started_unix_ms: u64,
    /// See `started_unix_ms`.
    pub finished_unix_ms: u64,
    /// Connect latency percentiles over successful connects, microseconds.
    pub connect_p50_us: f64,
    /// See `connect_p50_us`.
    pub connect_max_us: f64,
}

impl ConnectReport {
    /// Names in `sequence` after attempt `from` (for "after the change, nothing reached X" checks).
    pub fn names_from(&self, from: usize) -> Vec<&str> {
        self.sequence
            .iter()
            .skip(from)
            .map(String::as_str)
            .collect()
    }
}

/// Result of `udp-send` / `udp-connected`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct UdpReport {
    /// Target as given.
    pub to: String,
    /// Datagrams sent.
    pub sent: u32,
    /// Replies received.
    pub received: u32,
    /// Attempts that failed (send error or no reply in time).
    pub failed: u32,
    /// Server name -> replies.
    pub names: BTreeMap<String, u32>,
    /// Reply source address as `recvfrom()` (or `getpeername()` for `udp-connected`) reports it -> count.
    pub sources: BTreeMap<String, u32>,
    /// `stage:errno` -> count.
    pub errors: BTreeMap<String, u32>,
    /// The first failures (at most 50).
    pub failures: Vec<Failure>,
    /// With `--timeline`: every datagram's wall-clock send time (ms since the epoch) and outcome (`ok`, or
    /// `<stage>:<errno>`), in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub timeline: Vec<(u64, String)>,
}

/// Result of `rr`: request/response over one connection.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RrReport {
    /// Target as given.
    pub to: String,
    /// Which server answered.
    pub name: String,
    /// Request and response size in bytes.
    pub size: usize,
    /// Completed request/response pairs.
    pub requests: u64,
    /// Error that ended the run early, if any.
    pub error: Option<String>,
    /// Wall time of the measured loop.
    pub duration_ms: f64,
    /// Latency percentiles, microseconds.
    pub p50_us: f64,
    /// See `p50_us`.
    pub p90_us: f64,
    /// See `p50_us`.
    pub p99_us: f64,
    /// See `p50_us`.
    pub max_us: f64,
    /// See `p50_us`.
    pub mean_us: f64,
}

/// Result of `crr`: a new connection per request/response.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CrrReport {
    /// Target as given.
    pub to: String,
    /// Request and response size in bytes.
    pub size: usize,
    /// Completed connect+request+response+close cycles.
    pub connections: u64,
    /// Failed cycles.
    pub failed: u64,
    /// `stage:errno` -> count.
    pub errors: BTreeMap<String, u32>,
    /// Wall time of the measured loop.
    pub duration_ms: f64,
    /// Completed cycles per second.
    pub conns_per_sec: f64,
    /// Cycle latency percentiles, microseconds.
    pub p50_us: f64,
    /// See `p50_us`.
    pub p90_us: f64,
    /// See `p50_us`.
    pub p99_us: f64,
    /// Server name -> cycles.
    pub names: BTreeMap<String, u32>,
}

/// Outcome of one `probe` target: the whole round trip worked.
pub const PROBE_OK: &str = "ok";
/// Outcome of one `probe` target: the tool's own per-probe timeout fired (connect, or no UDP reply).
pub const PROBE_TIMEOUT: &str = "timeout";
/// Outcome of one `probe` target: `connect()` or `sendto()` failed with `EACCES` (refused by policy in the kernel).
pub const PROBE_EACCES: &str = "EACCES";

/// One target of `probe`. `outcome` is [`PROBE_OK`], [`PROBE_TIMEOUT`], or the symbolic errno of the failing
/// `connect()`/`sendto()` (`EACCES`, `ECONNREFUSED`, ...); a failure after the connect (reading the name or the
/// echo) is `echo:<errno>` or `echo:timeout` / `echo:EOF`, so it can never be mistaken for a connect outcome.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ProbeResult {
    /// The target as given: `tcp:IP:PORT` or `udp:IP:PORT` (`[v6]:PORT` for IPv6).
    pub target: String,
    /// See the type's documentation.
    pub outcome: String,
    /// From the start of the probe to its outcome, milliseconds.
    pub elapsed_ms: f64,
    /// The name the server answered with, when it answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// Result of `probe`: every target probed once, concurrently, in the order given.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ProbeReport {
    /// The per-probe timeout used.
    pub timeout_ms: u64,
    /// One result per target, in the order given.
    pub results: Vec<ProbeResult>,
    /// Wall time of the whole batch, milliseconds.
    pub duration_ms: f64,
}

impl ProbeReport {
    /// The result for `target`, if it was probed.
    pub fn get(&self, target: &str) -> Option<&ProbeResult> {
        self.results.iter().find(|r| r.target == target)
    }
}

/// Result of `probe-loop`: the same targets probed again and again (each round concurrently), with the wall-clock
/// start of every round, so outcomes can be lined up with policy changes.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ProbeLoopReport {
    /// The targets, in the order of every round's `outcomes`.
    pub targets: Vec<String>,
    /// The per-probe timeout used.
    pub timeout_ms: u64,
    /// Every round, in order.
    pub rounds: Vec<ProbeRound>,
}

/// One round of `probe-loop`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ProbeRound {
    /// Wall-clock start (ms since the epoch).
    pub start_unix_ms: u64,
    /// Outcome per target (the words of [`ProbeResult::outcome`]).
    pub outcomes: Vec<String>,
}

/// Result of `udp-flood`: datagrams fired without waiting for replies.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct FloodReport {
    /// Target as given.
    pub to: String,
    /// `sendto()` calls made.
    pub attempts: u64,
    /// `sendto()` calls that succeeded.
    pub sent: u64,
    /// errno -> failed `sendto()` calls.
    pub errors: BTreeMap<String, u64>,
    /// Wall time, milliseconds.
    pub duration_ms: f64,
}

/// Percentile `q` (0..=1) of sorted samples (nearest rank); 0 for no samples.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Symbolic name of an errno value, for stable keys in reports.
pub fn errno_name(code: i32) -> String {
    let name = match code {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EINTR => "EINTR",
        libc::EAGAIN => "EAGAIN",
        libc::EACCES => "EACCES",
        libc::EINVAL => "EINVAL",
        libc::EPIPE => "EPIPE",
        libc::EADDRINUSE => "EADDRINUSE",
        libc::EADDRNOTAVAIL => "EADDRNOTAVAIL",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::ECONNABORTED => "ECONNABORTED",
        libc::ECONNRESET => "ECONNRESET",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::EHOSTUNREACH => "EHOSTUNREACH",
        libc::EINPROGRESS => "EINPROGRESS",
        libc::ENOTCONN => "ENOTCONN",
        libc::EAFNOSUPPORT => "EAFNOSUPPORT",
        _ => return format!("E#{code}"),
    };
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
        assert_eq!(percentile(&[7.0], 0.01), 7.0);
    }

    #[test]
    fn errno_names() {
        assert_eq!(errno_name(libc::ECONNREFUSED), "ECONNREFUSED");
        assert_eq!(errno_name(9999), "E#9999");
    }
}
