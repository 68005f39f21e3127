//! Same-node socket acceleration (issue 6): the pieces of the correctness matrix in `tests/sockmap.rs`.
//!
//! Every case runs the identical workload twice, once on a node whose agent runs with `--sockmap true` and once on
//! a node with the default (off), and the two runs must agree byte for byte. The pieces:
//! - [`Pattern`]: the bytes each direction carries, a pseudo-random block with a prime period (about 1 MiB), so a
//!   receiver can check every byte against its offset in the stream: a lost, duplicated or reordered range is seen
//!   at once. Client to server is [`CLIENT_SEED`], server to client [`SERVER_SEED`].
//! - [`stream_hash`]: a hash of a byte stream that is the same however it was cut into reads.
//! - The reports of `sinew-testpod stream` ([`StreamReport`], one [`StepReport`] per script step), `accel-rr`
//!   ([`AccelRrReport`]) and `accel-crr` ([`AccelCrrReport`]).
//! - [`SockmapStatus`]: the `sockmap` object of `mesh-agent status -o json` (`enabled`, `connections`, counters).
//! - [`AccelSide`]: one node with a `client` and a `server` pod (each a known workload with its own service
//!   account) and a ready agent, with acceleration on or off.
//! - [`KnownDivergence`]: the documented list of what may differ with the switch on (A: spurious `EAGAIN`,
//!   B: no backpressure), and [`EAGAIN_EARLY`], [`EAGAIN_RETRIES`], [`no_backpressure`] to account for them.

use std::collections::BTreeMap;
use std::hash::Hasher;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use crate::agent::{Agent, AgentCli, AgentOptions};
use crate::manifest::SourceDir;
use crate::policy::Workload;
use crate::process::Proc;
use crate::topology::{Pod, Topology};

/// The pattern period: a prime, so that no write or read size lines up with it.
pub const PATTERN_PERIOD: usize = 1_048_573;
/// The seed of the client-to-server direction.
pub const CLIENT_SEED: u64 = 0xC11E_u64;
/// The seed of the server-to-client direction.
pub const SERVER_SEED: u64 = 0x5E4E_u64;

/// The node of an [`AccelSide`].
pub const NODE: &str = "node-a";

/// The documented ways an accelerated connection differs from plain TCP on the kernel this was tested on (Linux
/// 6.18), and why `--sockmap` stays off by default: see docs/performance.md, section "Same-node acceleration
/// (issue 6)". The matrix in `tests/sockmap.rs` accepts exactly these, with the switch on only, counts them and
/// prints a `KNOWN DIVERGENCE ..` line for each ([`KnownDivergence::label`]); everything else must be identical
/// with the switch off and on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KnownDivergence {
    /// A, spurious EAGAIN: a BLOCKING read on an accelerated socket sometimes returns `EAGAIN` at once instead of
    /// waiting. The kernel's `tcp_bpf_recvmsg` returns `-EAGAIN` when `tcp_msg_wait_data` is woken with neither the
    /// psock queue nor the receive queue holding data, e.g. by the state change when our FIN is acknowledged or
    /// the peer's FIN arrives. Seen after `shutdown(SHUT_WR)` (the read for the peer's EOF, half-closed reads) and
    /// in a few of 1000 short connections. The pod tools report it as [`EAGAIN_EARLY`]; with `eagain-retries:K`
    /// (`stream`) or `--eagain-retries K` (`accel-crr`) they read again, as an application looping on `EAGAIN`
    /// would, and count it. Accepted only with the switch on, only where the plain run's same read returned data
    /// or the EOF, and only if the bytes before it and, after the retry, the rest and the EOF are exactly what the
    /// plain run got.
    SpuriousEagain,
    /// B, no backpressure: bytes redirected to a local peer are queued on it regardless of its receive buffer, so
    /// the writer is never held back: it hands a whole transfer to the kernel before the reader reads a byte, and
    /// when the reader dies mid-transfer its writes still succeed (the bytes are dropped) where plain TCP fails them
    /// with `ECONNRESET` / `EPIPE` after a few MiB. Asserted positively ([`no_backpressure`]): a kernel that fixes
    /// it fails the matrix, which is the moment to re-evaluate the default. What the readers got must still agree.
    NoBackpressure,
}

impl KnownDivergence {
    /// Both, in order.
    pub const ALL: [KnownDivergence; 2] = [
        KnownDivergence::SpuriousEagain,
        KnownDivergence::NoBackpressure,
    ];

    /// The prefix of the line the matrix prints for it.
    pub fn label(self) -> &'static str {
        match self {
            KnownDivergence::SpuriousEagain => "KNOWN DIVERGENCE A (spurious EAGAIN)",
            KnownDivergence::NoBackpressure => "KNOWN DIVERGENCE B (no backpressure)",
        }
    }
}

/// The pod tools' word for [`KnownDivergence::SpuriousEagain`]: a blocking read that failed with `EAGAIN` well
/// before its receive timeout (or with none set).
pub const EAGAIN_EARLY: &str = "EAGAIN-early";

/// How often in a row the matrix lets a read that got [`EAGAIN_EARLY`] be made again (`eagain-retries:K`). Two
/// state changes can each cause one (our FIN acknowledged, the peer's FIN); the third is a spare.
pub const EAGAIN_RETRIES: u64 = 3;

/// Whether [`KnownDivergence::NoBackpressure`] shows in a writer that completed `off` bytes of a `total`-byte
/// transfer without acceleration and `on` with it: `on` is strictly more, by at least a quarter of the transfer
/// (far more than a socket buffer's worth of chance).
pub fn no_backpressure(off: u64, on: u64, total: u64) -> bool {
    on > off && on - off >= (total / 4).max(1)
}

/// A deterministic byte stream: byte `o` is `block[o % PATTERN_PERIOD]`.
#[derive(Clone)]
pub struct Pattern {
    block: Vec<u8>,
}

impl std::fmt::Debug for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pattern")
    }
}

/// splitmix64: the pattern's generator and the tools' size sequences.
pub fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Pattern {
    /// The stream for `seed`.
    pub fn new(seed: u64) -> Pattern {
        let mut block = Vec::with_capacity(PATTERN_PERIOD + 8);
        let mut i = 0u64;
        while block.len() < PATTERN_PERIOD {
            block.extend_from_slice(&splitmix(seed.wrapping_mul(0x1_0000_0001) ^ i).to_le_bytes());
            i += 1;
        }
        block.truncate(PATTERN_PERIOD);
        Pattern { block }
    }

    /// Fills `buf` with the stream's bytes from `offset` on.
    pub fn fill(&self, offset: u64, buf: &mut [u8]) {
        let mut pos = (offset % PATTERN_PERIOD as u64) as usize;
        let mut i = 0;
        while i < buf.len() {
            let n = (PATTERN_PERIOD - pos).min(buf.len() - i);
            buf[i..i + n].copy_from_slice(&self.block[pos..pos + n]);
            i += n;
            pos = 0;
        }
    }

    /// Whether `data` is the stream's bytes from `offset` on.
    pub fn matches(&self, offset: u64, data: &[u8]) -> bool {
        let mut pos = (offset % PATTERN_PERIOD as u64) as usize;
        let mut i = 0;
        while i < data.len() {
            let n = (PATTERN_PERIOD - pos).min(data.len() - i);
            if data[i..i + n] != self.block[pos..pos + n] {
                return false;
            }
            i += n;
            pos = 0;
        }
        true
    }

    /// [`stream_hash`] of `len` bytes of the stream from `offset`: what a receiver of them must report.
    pub fn hash(&self, offset: u64, len: u64) -> String {
        let mut h = StreamHash::default();
        let mut buf = vec![0u8; 1 << 20];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(buf.len() as u64) as usize;
            self.fill(offset + done, &mut buf[..n]);
            h.update(&buf[..n]);
            done += n as u64;
        }
        h.finish()
    }
}

/// A hash of a byte stream, independent of how the stream was cut (std's SipHash with fixed keys: the test and
/// the pod tool are built by the same compiler, so they agree).
#[derive(Debug, Clone, Default)]
pub struct StreamHash(std::collections::hash_map::DefaultHasher);

impl StreamHash {
    /// Adds bytes.
    pub fn update(&mut self, data: &[u8]) {
        self.0.write(data);
    }

    /// The hash so far, as 16 hex digits.
    pub fn finish(&self) -> String {
        format!("{:016x}", self.0.finish())
    }
}

/// [`stream_hash`] of one buffer.
pub fn stream_hash(data: &[u8]) -> String {
    let mut h = StreamHash::default();
    h.update(data);
    h.finish()
}

/// Result of one step of a `sinew-testpod stream` script.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StepReport {
    /// The step as written (`send:1048576:large`).
    pub step: String,
    /// It did what it says.
    pub ok: bool,
    /// Bytes sent, received or peeked.
    pub bytes: u64,
    /// [`stream_hash`] of the bytes received or peeked (empty for other steps).
    #[serde(default)]
    pub hash: String,
    /// For received or peeked bytes: whether they are the peer's [`Pattern`] at their offset in the stream.
    #[serde(default)]
    pub verified: Option<bool>,
    /// Why it failed: an errno name (`EPIPE`, `ECONNRESET`), `EAGAIN` for the tool's own timeout, `EOF`, or
    /// `data` (`recv-eof` got bytes instead of the end).
    #[serde(default)]
    pub error: Option<String>,
    /// `fionread`: the value; `poll-in`: `revents` (0: timed out); `peek`: the last peek's return value;
    /// `recv-eof`: 0 for the end, else the byte count read.
    #[serde(default)]
    pub value: Option<i64>,
    /// System calls made (writes, reads, peeks, sendfiles).
    #[serde(default)]
    pub calls: u64,
    /// Writes that accepted less than asked.
    #[serde(default)]
    pub partial: u64,
    /// Wall clock at the start of the step, ms since the epoch.
    #[serde(default)]
    pub started_unix_ms: u64,
    /// Duration, ms.
    #[serde(default)]
    pub elapsed_ms: f64,
    /// `recv`/`recv-all`: `FIONREAD` just before the first read (bytes already waiting for the reader).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fionread_at_start: Option<i64>,
    /// `send`/`sendfile`: (ms since the epoch, bytes accepted so far), a point at least every 10 ms of progress
    /// and after every call that blocked for 10 ms or more.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub timeline: Vec<(u64, u64)>,
    /// Reads and peeks that returned [`EAGAIN_EARLY`] and were made again (`eagain-retries:K`): known divergence A.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub early_eagain: u64,
    /// For each of those, the bytes of the stream received before it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub early_eagain_at: Vec<u64>,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl StepReport {
    /// What two runs of the same script must agree on: the step, its success, bytes, hash, verification,
    /// error class and value. Counts of calls, [`EAGAIN_EARLY`] retries and timings may differ.
    pub fn canonical(&self) -> String {
        format!(
            "{} ok={} bytes={} hash={} verified={:?} error={} value={:?}",
            self.step,
            self.ok,
            self.bytes,
            self.hash,
            self.verified,
            error_class(self.error.as_deref()),
            self.value
        )
    }

    /// Whether the step reads or peeks (`recv:`, `recv-all`, `recv-eof`, `peek:`): its `calls` are reads.
    pub fn is_read(&self) -> bool {
        self.step.starts_with("recv") || self.step.starts_with("peek:")
    }

    /// Bytes the sender had handed to the kernel by `unix_ms` (the last timeline point at or before it).
    pub fn accepted_by(&self, unix_ms: u64) -> u64 {
        self.timeline
            .iter()
            .filter(|(t, _)| *t <= unix_ms)
            .map(|(_, b)| *b)
            .max()
            .unwrap_or(0)
    }
}

/// Groups errno names into the outcomes that must agree between the accelerated and the plain path: `ok`,
/// `eof`, `broken` (EPIPE, ECONNRESET, ECONNABORTED), `timeout` (the tool's own bounds), or the name itself.
pub fn error_class(e: Option<&str>) -> String {
    match e {
        None => "ok".into(),
        Some("EOF") => "eof".into(),
        Some("EPIPE" | "ECONNRESET" | "ECONNABORTED") => "broken".into(),
        Some("EAGAIN" | "TIMEOUT" | "ETIMEDOUT") => "timeout".into(),
        Some(other) => other.to_string(),
    }
}

/// Result of `sinew-testpod stream`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StreamReport {
    /// `client` or `server`.
    pub role: String,
    /// The connection was made (accepted).
    pub connected: bool,
    /// Why it was not.
    #[serde(default)]
    pub error: Option<String>,
    /// `ip:port` of each end.
    #[serde(default)]
    pub local: String,
    /// See `local`.
    #[serde(default)]
    pub peer: String,
    /// One per script step that ran (the script stops at the first failed step).
    #[serde(default)]
    pub steps: Vec<StepReport>,
}

impl StreamReport {
    /// [`StepReport::canonical`] of every step, with the connection outcome first.
    pub fn canonical(&self) -> Vec<String> {
        let mut v = vec![format!("{} connected={}", self.role, self.connected)];
        v.extend(self.steps.iter().map(StepReport::canonical));
        v
    }

    /// Read and peek calls made, and how many of them returned [`EAGAIN_EARLY`] and were made again.
    pub fn early_eagain(&self) -> (u64, u64) {
        self.steps
            .iter()
            .filter(|s| s.is_read())
            .fold((0, 0), |(n, m), s| (n + s.early_eagain, m + s.calls))
    }

    /// Bytes accepted by all `send`/`sendfile` steps.
    pub fn sent(&self) -> u64 {
        self.steps
            .iter()
            .filter(|s| s.step.starts_with("send"))
            .map(|s| s.bytes)
            .sum()
    }

    /// The first step whose text starts with `prefix`.
    pub fn step(&self, prefix: &str) -> &StepReport {
        self.steps
            .iter()
            .find(|s| s.step.starts_with(prefix))
            .unwrap_or_else(|| panic!("{} report has no step {prefix:?}: {self:#?}", self.role))
    }
}

/// Result of `sinew-testpod accel-rr`: one connection, rounds of pattern bytes echoed back and checked.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AccelRrReport {
    /// Target.
    pub to: String,
    /// The server's name line.
    #[serde(default)]
    pub name: String,
    /// Rounds whose echo came back complete and correct.
    pub rounds: u64,
    /// Rounds written.
    pub sent_rounds: u64,
    /// Bytes echoed back.
    pub bytes: u64,
    /// [`stream_hash`] of everything echoed back.
    #[serde(default)]
    pub hash: String,
    /// Every echoed byte was what was sent.
    pub verified: bool,
    /// `stage:ERRNO: text` of the first failure.
    #[serde(default)]
    pub error: Option<String>,
    /// The errno name of the first failure (see [`error_class`]).
    #[serde(default)]
    pub error_kind: Option<String>,
    /// When it failed, ms since the epoch.
    #[serde(default)]
    pub error_unix_ms: Option<u64>,
    /// Stopped because the stop file appeared.
    #[serde(default)]
    pub stopped: bool,
    /// Wall clock of the start (after connecting), ms since the epoch.
    #[serde(default)]
    pub started_unix_ms: u64,
    /// Wall clock of the end.
    #[serde(default)]
    pub finished_unix_ms: u64,
    /// Longest wait for one echo, ms.
    #[serde(default)]
    pub max_wait_ms: f64,
}

/// Result of `sinew-testpod accel-crr`: many short connections, each with one checked echo and a clean close.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AccelCrrReport {
    /// Target.
    pub to: String,
    /// Connections tried.
    pub attempts: u64,
    /// Connections that connected, got their echo back intact and then saw the server's EOF.
    pub ok: u64,
    /// The others.
    pub failed: u64,
    /// `stage:ERRNO` -> count.
    #[serde(default)]
    pub errors: BTreeMap<String, u64>,
    /// Echoes that came back with other bytes.
    pub mismatches: u64,
    /// Bytes echoed back.
    pub bytes: u64,
    /// [`stream_hash`] of everything echoed back, in order.
    #[serde(default)]
    pub hash: String,
    /// Duration, ms.
    pub duration_ms: f64,
    /// Blocking reads made for the echoes and the EOFs.
    #[serde(default)]
    pub reads: u64,
    /// Of those, reads that returned [`EAGAIN_EARLY`] and were made again (`--eagain-retries`): divergence A.
    #[serde(default)]
    pub early_eagain: u64,
    /// Connections with at least one such read.
    #[serde(default)]
    pub early_eagain_connections: u64,
    /// Of those, connections that then got their whole echo back intact and the server's EOF (counted in `ok`).
    #[serde(default)]
    pub early_eagain_connections_ok: u64,
}

/// The acceleration counters of `mesh-agent status` (`sockmap.counters`).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SockmapCounters {
    /// Sockets added to `sk_conns`.
    #[serde(default)]
    pub inserts: u64,
    /// Sends handed to the peer socket.
    #[serde(default)]
    pub redirects: u64,
    /// Sends that found no peer and took the stack.
    #[serde(default)]
    pub misses: u64,
    /// Bytes handed to the peer socket.
    #[serde(default)]
    pub redirected_bytes: u64,
    /// Eligible sockets the kernel refused.
    #[serde(default)]
    pub insert_errors: u64,
}

impl SockmapCounters {
    /// `self - before`, per counter (saturating).
    pub fn since(&self, before: &SockmapCounters) -> SockmapCounters {
        SockmapCounters {
            inserts: self.inserts.saturating_sub(before.inserts),
            redirects: self.redirects.saturating_sub(before.redirects),
            misses: self.misses.saturating_sub(before.misses),
            redirected_bytes: self
                .redirected_bytes
                .saturating_sub(before.redirected_bytes),
            insert_errors: self.insert_errors.saturating_sub(before.insert_errors),
        }
    }
}

/// `sockmap` in `mesh-agent status -o json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SockmapStatus {
    /// The switch.
    #[serde(default)]
    pub enabled: bool,
    /// Entries in `sk_conns` (`None` when the map is not there).
    #[serde(default)]
    pub connections: Option<u64>,
    /// The counters.
    #[serde(default)]
    pub counters: SockmapCounters,
    /// Whether the status had a `sockmap` object at all (an agent without the feature has none).
    #[serde(skip)]
    pub present: bool,
}

/// Reads `sockmap` from `mesh-agent status -o json`.
pub fn sockmap_status(cli: &AgentCli) -> Result<SockmapStatus> {
    let v = cli.status_value()?;
    match v.get("sockmap") {
        None | Some(serde_json::Value::Null) => Ok(SockmapStatus::default()),
        Some(s) => {
            // `counters: null` (no counters map, e.g. while off) reads as zeros.
            let mut obj = s.clone();
            if let Some(m) = obj.as_object_mut() {
                m.retain(|k, v| k == "connections" || !v.is_null());
            }
            let mut st: SockmapStatus =
                serde_json::from_value(obj).with_context(|| format!("status.sockmap: {s}"))?;
            st.present = true;
            Ok(st)
        }
    }
}

/// One node with a `client` and a `server` pod, both known workloads (`default/client` with `app=client`,
/// `default/server` with `app=server`), and a ready agent with `--sockmap true` (`on`) or the default (off).
/// Fields drop in order: agent, topology.
#[derive(Debug)]
pub struct AccelSide {
    /// The node's agent.
    pub agent: Agent,
    /// Whether the agent runs with `--sockmap true`.
    pub on: bool,
    /// The manifest directory.
    pub source: SourceDir,
    /// The client pod.
    pub client: Pod,
    /// The server pod.
    pub server: Pod,
    /// The topology (dropped last).
    pub topo: Topology,
}

impl AccelSide {
    /// Builds the node and pods, writes their manifests and starts the agent (ready within 20 s).
    pub fn setup(name: &str, testpod_bin: &Path, on: bool) -> Result<AccelSide> {
        Self::setup_with(name, testpod_bin, on, false, &[])
    }

    /// [`AccelSide::setup`] with IPv6 addresses on the pods too (`ipv6`), and more `mesh-agent run` arguments.
    pub fn setup_with(
        name: &str,
        testpod_bin: &Path,
        on: bool,
        ipv6: bool,
        agent_args: &[&str],
    ) -> Result<AccelSide> {
        let tname = format!("{name}-{}", if on { "on" } else { "off" });
        let topo = Topology::builder(&tname)
            .testpod_bin(testpod_bin)
            .ipv6(ipv6)
            .node(NODE, &["client", "server"])
            .build()?;
        let source = topo.source_dir()?;
        let client = topo.pod("client");
        let server = topo.pod("server");
        Workload::new(&client, "client", &[("app", "client")]).write(&source)?;
        Workload::new(&server, "server", &[("app", "server")]).write(&source)?;
        let mut opts = AgentOptions::for_node(topo.node(NODE), source.path(), None)?;
        if on {
            opts.extra_args
                .extend(["--sockmap".to_string(), "true".to_string()]);
        }
        opts.extra_args
            .extend(agent_args.iter().map(|a| a.to_string()));
        let mut agent = Agent::start_with(opts)?;
        agent.wait_ready(Duration::from_secs(20))?;
        Ok(AccelSide {
            agent,
            on,
            source,
            client,
            server,
            topo,
        })
    }

    /// `on` or `off`, for messages.
    pub fn mode(&self) -> &'static str {
        if self.on { "on" } else { "off" }
    }

    /// The agent's `sockmap` status.
    pub fn status(&self) -> Result<SockmapStatus> {
        sockmap_status(&self.agent.cli())
    }

    /// `server-ip:port`.
    pub fn server_addr(&self, port: u16) -> String {
        format!("{}:{port}", self.server.ip4)
    }

    /// `[server-ipv6]:port` (the side must be set up with IPv6).
    pub fn server_addr6(&self, port: u16) -> String {
        let ip6 = self.server.ip6.expect("the side was set up without IPv6");
        format!("[{ip6}]:{port}")
    }

    /// Starts `sinew-testpod stream --listen <port> --script <script>` in the server pod and waits until it
    /// listens.
    pub fn stream_server(&self, port: u16, script: &str, timeout_ms: u64) -> Result<Proc> {
        let mut p = self.server.testpod(&[
            "stream",
            "--listen",
            &port.to_string(),
            "--script",
            script,
            "--timeout-ms",
            &timeout_ms.to_string(),
        ])?;
        p.wait_for_line(Duration::from_secs(5), |l| l.contains("\"listening\""))
            .context("stream server did not start")?;
        Ok(p)
    }

    /// Starts `sinew-testpod stream --to <server:port> --script <script>` in the client pod.
    pub fn stream_client(&self, port: u16, script: &str, timeout_ms: u64) -> Result<Proc> {
        self.stream_client_in(port, script, timeout_ms, true)
    }

    /// [`AccelSide::stream_client`]; `managed: false` runs it in the client pod's netns but outside the node's
    /// cgroup root ([`Pod::command_unmanaged`]): its socket is never accelerated, while the server's end (a local
    /// pod talking to a local pod address) still enters `sk_conns`, and receives through the TCP stack.
    pub fn stream_client_in(
        &self,
        port: u16,
        script: &str,
        timeout_ms: u64,
        managed: bool,
    ) -> Result<Proc> {
        let to = self.server_addr(port);
        let t = timeout_ms.to_string();
        let args = [
            "stream",
            "--to",
            to.as_str(),
            "--script",
            script,
            "--timeout-ms",
            t.as_str(),
        ];
        if managed {
            self.client.testpod(&args)
        } else {
            self.client.spawn_unmanaged(self.topo.testpod_bin(), &args)
        }
    }

    /// Runs a server script and a client script against each other on `port` and returns both reports (each
    /// process must finish within `bound`).
    pub fn stream_pair(
        &self,
        port: u16,
        server_script: &str,
        client_script: &str,
        timeout_ms: u64,
        bound: Duration,
    ) -> Result<(StreamReport, StreamReport)> {
        self.stream_pair_in(port, server_script, client_script, timeout_ms, bound, true)
    }

    /// [`AccelSide::stream_pair`] with the client managed or not (see [`AccelSide::stream_client_in`]).
    pub fn stream_pair_in(
        &self,
        port: u16,
        server_script: &str,
        client_script: &str,
        timeout_ms: u64,
        bound: Duration,
        managed: bool,
    ) -> Result<(StreamReport, StreamReport)> {
        let srv = self.stream_server(port, server_script, timeout_ms)?;
        let cli = self.stream_client_in(port, client_script, timeout_ms, managed)?;
        let c = cli.wait(bound).context("stream client")?;
        let s = srv.wait(bound).context("stream server")?;
        Ok((s.json()?, c.json()?))
    }

    /// Starts `sinew-testpod echo-tokio --port <port> --name server` in the server pod (a tokio echo server:
    /// edge-triggered epoll) and waits until it listens.
    pub fn tokio_echo(&self, port: u16) -> Result<Proc> {
        let mut p = self.server.testpod(&[
            "echo-tokio",
            "--port",
            &port.to_string(),
            "--name",
            "server",
        ])?;
        p.wait_for_line(Duration::from_secs(5), |l| l.contains("\"listening\""))
            .context("tokio echo server did not start")?;
        Ok(p)
    }

    /// Waits until `sockmap.connections` satisfies `pred` (at most `timeout`); returns the last status.
    pub fn wait_connections(
        &self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(u64) -> bool,
    ) -> Result<SockmapStatus> {
        let mut last = None;
        let r = crate::eventually(timeout, Duration::from_millis(50), || {
            let st = self.status().map_err(|e| format!("{e:#}"))?;
            let ok = st.connections.is_some_and(&pred);
            last = Some(st.clone());
            if ok {
                Ok(st)
            } else {
                Err(format!("connections {:?}", st.connections))
            }
        });
        r.map_err(|e| anyhow!("{what}: {e}; last status {last:?}"))
    }
}

/// Fails unless `report` connected and every step succeeded.
pub fn check_all_ok(report: &StreamReport, what: &str) -> Result<()> {
    if !report.connected {
        bail!("{what}: {} did not connect: {report:#?}", report.role);
    }
    if let Some(bad) = report.steps.iter().find(|s| !s.ok) {
        bail!(
            "{what}: {} step {:?} failed ({:?}); all steps: {:#?}",
            report.role,
            bad.step,
            bad.error,
            report.steps
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_position_addressed_and_hash_is_cut_independent() {
        let p = Pattern::new(CLIENT_SEED);
        let mut a = vec![0u8; PATTERN_PERIOD * 2 + 17];
        p.fill(5, &mut a);
        assert!(p.matches(5, &a));
        assert!(!p.matches(6, &a));
        assert_eq!(a[PATTERN_PERIOD], a[0]);
        let mut b = vec![0u8; 1000];
        p.fill(5 + 3000, &mut b);
        assert_eq!(&a[3000..4000], &b[..]);
        let mut h = StreamHash::default();
        for c in a.chunks(777) {
            h.update(c);
        }
        assert_eq!(h.finish(), stream_hash(&a));
        assert_eq!(p.hash(5, a.len() as u64), stream_hash(&a));
        assert_ne!(
            Pattern::new(SERVER_SEED).hash(0, 64),
            Pattern::new(CLIENT_SEED).hash(0, 64)
        );
    }

    #[test]
    fn error_classes() {
        assert_eq!(error_class(None), "ok");
        assert_eq!(error_class(Some("EPIPE")), "broken");
        assert_eq!(error_class(Some("ECONNRESET")), "broken");
        assert_eq!(error_class(Some("EOF")), "eof");
        assert_eq!(error_class(Some("EAGAIN")), "timeout");
        assert_eq!(error_class(Some("EACCES")), "EACCES");
        // Divergence A is never an accepted error class: only a counted retry.
        assert_eq!(error_class(Some(EAGAIN_EARLY)), EAGAIN_EARLY);
    }

    #[test]
    fn no_backpressure_needs_a_clear_margin() {
        const M: u64 = 1 << 20;
        assert!(no_backpressure(5 * M, 32 * M, 34 * M));
        assert!(no_backpressure(0, 16 * M, 16 * M));
        assert!(!no_backpressure(5 * M, 6 * M, 34 * M));
        assert!(!no_backpressure(4 * M, 4 * M, 4 * M));
        assert_eq!(KnownDivergence::ALL.len(), 2);
    }
}
