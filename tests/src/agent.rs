//! Running `mesh-agent` for a simulated node, and talking to it: admin HTTP (`/readyz`, `/metrics`), and the
//! `status`, `dump services` and `uninstall` commands. The contract is `docs/agent-contract.md`.
//!
//! The agent runs in the root network namespace: it only needs the node's cgroup root and bpffs directory, and its
//! admin port on 127.0.0.1 is then reachable from the test. Each agent gets its own free port.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use crate::topology::Node;
use crate::util::{eventually, tail_file, target_dir};

/// The agent binary: `SINEW_AGENT_BIN` if set, else `<target>/debug/mesh-agent`.
pub fn agent_bin() -> PathBuf {
    match std::env::var_os("SINEW_AGENT_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => target_dir().join("debug").join("mesh-agent"),
    }
}

/// The test pod binary when not given explicitly: `SINEW_TESTPOD_BIN` if set, else
/// `<target>/debug/sinew-testpod` (build it with `cargo build -p sinew-tests --bin sinew-testpod`).
pub fn default_testpod_bin() -> PathBuf {
    match std::env::var_os("SINEW_TESTPOD_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => target_dir().join("debug").join("sinew-testpod"),
    }
}

/// A free TCP port on 127.0.0.1 (bound and released; another process could take it in between, which is
/// unlikely enough for tests).
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding an ephemeral port")?;
    Ok(l.local_addr()?.port())
}

/// The agent's one-shot commands for one node (no daemon needed).
#[derive(Debug, Clone)]
pub struct AgentCli {
    /// The `mesh-agent` binary.
    pub bin: PathBuf,
    /// `--cgroup-root` (omitted if `None`).
    pub cgroup_root: Option<PathBuf>,
    /// `--bpffs-root`.
    pub bpffs_root: PathBuf,
}

impl AgentCli {
    /// The commands for `node`, using [`agent_bin`].
    pub fn for_node(node: &Node) -> AgentCli {
        AgentCli {
            bin: agent_bin(),
            cgroup_root: Some(node.cgroup_root().to_path_buf()),
            bpffs_root: node.bpffs_root(),
        }
    }

    fn run(&self, args: &[&str], with_cgroup: bool) -> Result<String> {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args);
        if with_cgroup {
            if let Some(c) = &self.cgroup_root {
                cmd.arg("--cgroup-root").arg(c);
            }
        }
        cmd.arg("--bpffs-root")
            .arg(&self.bpffs_root)
            .stdin(Stdio::null());
        let out = crate::util::run_bounded(&mut cmd, Duration::from_secs(30))
            .with_context(|| format!("{} {}", self.bin.display(), args.join(" ")))?;
        if !out.0.success() {
            bail!(
                "`mesh-agent {}` failed ({}): {}{}",
                args.join(" "),
                out.0,
                out.2.trim(),
                out.1.trim()
            );
        }
        Ok(out.1)
    }

    /// `mesh-agent status -o json`, parsed.
    pub fn status(&self) -> Result<AgentStatus> {
        let text = self.run(&["status", "-o", "json"], true)?;
        serde_json::from_str(&text).with_context(|| format!("parsing status: {text}"))
    }

    /// `mesh-agent status -o json` as untyped JSON (for fields the typed view does not have).
    pub fn status_value(&self) -> Result<serde_json::Value> {
        let text = self.run(&["status", "-o", "json"], true)?;
        serde_json::from_str(&text).with_context(|| format!("parsing status: {text}"))
    }

    /// `mesh-agent dump services -o json`, parsed.
    pub fn dump_services(&self) -> Result<Vec<DumpedService>> {
        let text = self.run(&["dump", "services", "-o", "json"], false)?;
        serde_json::from_str(&text).with_context(|| format!("parsing dump services: {text}"))
    }

    /// `mesh-agent dump sockmap -o json` (the accelerated connections), as untyped JSON.
    pub fn dump_sockmap(&self) -> Result<serde_json::Value> {
        let text = self.run(&["dump", "sockmap", "-o", "json"], false)?;
        serde_json::from_str(&text).with_context(|| format!("parsing dump sockmap: {text}"))
    }

    /// `mesh-agent uninstall`.
    pub fn uninstall(&self) -> Result<String> {
        self.run(&["uninstall"], true)
    }
}

/// One element of `dump services -o json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DumpedService {
    /// The VIP.
    pub vip: String,
    /// Service port.
    pub port: u16,
    /// `tcp` or `udp`.
    pub proto: String,
    /// Service id.
    #[serde(default)]
    pub id: u32,
    /// Number of slots in use.
    pub count: u32,
    /// Backends by slot.
    #[serde(default)]
    pub backends: Vec<DumpedBackend>,
}

/// A backend slot in [`DumpedService`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DumpedBackend {
    /// Slot index.
    #[serde(default)]
    pub slot: u32,
    /// Backend id.
    #[serde(default)]
    pub id: u32,
    /// Backend address.
    pub addr: String,
    /// Backend port.
    pub port: u16,
}

/// `status -o json` (only the fields the tests rely on; the rest is ignored).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentStatus {
    /// The bpffs root the status is about.
    #[serde(default)]
    pub bpffs_root: Option<String>,
    /// Programs and their attachment.
    #[serde(default)]
    pub programs: Vec<ProgramStatus>,
    /// Maps and their entry counts.
    #[serde(default)]
    pub maps: Vec<MapStatus>,
}

/// A program in [`AgentStatus`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProgramStatus {
    /// Program name (`connect4`, ...).
    pub name: String,
    /// Kernel program id (behind the link).
    #[serde(default)]
    pub program_id: Option<u64>,
    /// Kernel link id: stays the same for as long as the program has never been detached.
    #[serde(default)]
    pub link_id: Option<u64>,
    /// Whether its link is attached.
    #[serde(default)]
    pub attached: bool,
    /// Where its link is pinned.
    #[serde(default)]
    pub link_pin: Option<String>,
}

/// A map in [`AgentStatus`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MapStatus {
    /// Map name.
    pub name: String,
    /// Pin path.
    #[serde(default)]
    pub pin: Option<String>,
    /// Current entries.
    #[serde(default)]
    pub entries: Option<u64>,
    /// Capacity.
    #[serde(default)]
    pub max_entries: Option<u64>,
}

/// How to start an agent. [`Agent::start`] fills it from a [`Node`]; xtask can build one by hand.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// The binary.
    pub bin: PathBuf,
    /// `--node`.
    pub node: String,
    /// `--source-dir` (the file source), unless `kubeconfig` is set.
    pub source_dir: PathBuf,
    /// `--kubeconfig`: the kubernetes source (a fake API server's kubeconfig) instead of `source_dir`.
    pub kubeconfig: Option<PathBuf>,
    /// `--cgroup-root`.
    pub cgroup_root: PathBuf,
    /// `--bpffs-root`.
    pub bpffs_root: PathBuf,
    /// `--admin-addr`.
    pub admin_addr: SocketAddr,
    /// Where stdout and stderr go (appended across restarts).
    pub log_path: PathBuf,
    /// Anything else to pass to `run`.
    pub extra_args: Vec<String>,
}

impl AgentOptions {
    /// The options for `node`'s agent: its cgroup and bpffs roots, admin on `127.0.0.1:<admin_port>` (a free port
    /// if `None`), and its node proxy in the node's network namespace (the agent itself runs in the test's), with
    /// its state (a generated CA) in the node's work directory.
    pub fn for_node(
        node: &Node,
        source_dir: &Path,
        admin_port: Option<u16>,
    ) -> Result<AgentOptions> {
        let port = match admin_port {
            Some(p) => p,
            None => free_port()?,
        };
        let state_dir = node.work_dir().join(format!("state-{}", node.name()));
        Ok(AgentOptions {
            bin: agent_bin(),
            node: node.name().to_string(),
            source_dir: source_dir.to_path_buf(),
            kubeconfig: None,
            cgroup_root: node.cgroup_root().to_path_buf(),
            bpffs_root: node.bpffs_root(),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], port)),
            log_path: node.work_dir().join(format!("agent-{}.log", node.name())),
            extra_args: vec![
                "--proxy-netns".into(),
                node.netns().path().display().to_string(),
                "--state-dir".into(),
                state_dir.display().to_string(),
            ],
        })
    }
}

/// A running `mesh-agent run`. Stopped with SIGTERM on drop (programs stay attached, as in production; the node's
/// bpffs guard uninstalls later). When dropped during a panic it prints the tail of its log.
#[derive(Debug)]
pub struct Agent {
    opts: AgentOptions,
    child: Option<Child>,
    starts: u32,
}

impl Agent {
    /// Starts the agent for `node`, reading `source_dir`, with its admin server on `127.0.0.1:<admin_port>` (a free
    /// port if `None`). Does not wait for readiness: call [`Agent::wait_ready`].
    pub fn start(node: &Node, source_dir: &Path, admin_port: Option<u16>) -> Result<Agent> {
        Agent::start_with(AgentOptions::for_node(node, source_dir, admin_port)?)
    }

    /// Starts an agent from explicit options.
    pub fn start_with(opts: AgentOptions) -> Result<Agent> {
        if !opts.bin.exists() {
            bail!(
                "mesh-agent binary {} not found: build it with `cargo build -p mesh-agent` or set SINEW_AGENT_BIN",
                opts.bin.display()
            );
        }
        let mut a = Agent {
            opts,
            child: None,
            starts: 0,
        };
        a.spawn()?;
        Ok(a)
    }

    fn spawn(&mut self) -> Result<()> {
        let o = &self.opts;
        let mut log = File::options()
            .create(true)
            .append(true)
            .open(&o.log_path)
            .with_context(|| format!("open {}", o.log_path.display()))?;
        self.starts += 1;
        writeln!(
            log,
            "===== sinew-tests: agent start #{} at {} ms =====",
            self.starts,
            crate::unix_ms()
        )?;
        let mut cmd = Command::new(&o.bin);
        cmd.arg("run").arg("--node").arg(&o.node);
        match &o.kubeconfig {
            Some(kc) => cmd.arg("--kubeconfig").arg(kc),
            None => cmd.arg("--source-dir").arg(&o.source_dir),
        };
        cmd.arg("--cgroup-root")
            .arg(&o.cgroup_root)
            .arg("--bpffs-root")
            .arg(&o.bpffs_root)
            .arg("--admin-addr")
            .arg(o.admin_addr.to_string())
            .args(&o.extra_args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            // The log is a file: no colour escapes.
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.child = Some(
            cmd.spawn()
                .with_context(|| format!("spawning {}", o.bin.display()))?,
        );
        Ok(())
    }

    /// The options it runs with.
    pub fn options(&self) -> &AgentOptions {
        &self.opts
    }

    /// The admin address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.opts.admin_addr
    }

    /// The log file.
    pub fn log_path(&self) -> &Path {
        &self.opts.log_path
    }

    /// The running process's pid, if any.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The one-shot commands for this agent's node.
    pub fn cli(&self) -> AgentCli {
        AgentCli {
            bin: self.opts.bin.clone(),
            cgroup_root: Some(self.opts.cgroup_root.clone()),
            bpffs_root: self.opts.bpffs_root.clone(),
        }
    }

    /// The exit status if the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits until `/readyz` answers 200. Fails early, with the log tail, if the agent exits.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let addr = self.opts.admin_addr;
        let mut exited = None;
        let r = eventually(timeout, Duration::from_millis(20), || {
            if let Some(s) = self.exited() {
                exited = Some(s);
                return Ok(());
            }
            match http_get(addr, "/readyz", Duration::from_millis(500)) {
                Ok(resp) if resp.status == 200 => Ok(()),
                Ok(resp) => Err(format!("/readyz: {} {}", resp.status, resp.body.trim())),
                Err(e) => Err(format!("/readyz: {e:#}")),
            }
        });
        if let Some(s) = exited {
            bail!(
                "agent exited ({s}) before it was ready; log tail:\n{}",
                self.log_tail(40)
            );
        }
        r.map_err(|e| anyhow!("agent not ready: {e}; log tail:\n{}", self.log_tail(40)))
    }

    /// `GET path` on the admin server.
    pub fn get(&self, path: &str) -> Result<HttpResponse> {
        http_get(self.opts.admin_addr, path, Duration::from_secs(2))
    }

    /// `GET /metrics`, parsed.
    pub fn metrics(&self) -> Result<Metrics> {
        let r = self.get("/metrics")?;
        if r.status != 200 {
            bail!("/metrics: status {}: {}", r.status, r.body);
        }
        Ok(Metrics::parse(&r.body))
    }

    /// Kills the agent with SIGKILL (no chance to clean up: the crash case) and reaps it.
    pub fn kill9(&mut self) -> Result<()> {
        let mut c = self
            .child
            .take()
            .ok_or_else(|| anyhow!("agent is not running"))?;
        c.kill().context("SIGKILL")?;
        c.wait().context("wait")?;
        Ok(())
    }

    /// Stops the agent with SIGTERM (waiting up to 10 s, then SIGKILL). Returns its exit status.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        let mut c = self
            .child
            .take()
            .ok_or_else(|| anyhow!("agent is not running"))?;
        let _ = crate::sys::signal(c.id(), libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = c.try_wait()? {
                return Ok(s);
            }
            if Instant::now() >= deadline {
                let _ = c.kill();
                let s = c.wait()?;
                bail!("agent ignored SIGTERM for 10 s; killed ({s})");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts the agent again with the same options (after [`Agent::kill9`] or [`Agent::stop`]; a running agent is
    /// killed first). Does not wait for readiness.
    pub fn restart(&mut self) -> Result<()> {
        if self.child.is_some() {
            let _ = self.kill9();
        }
        self.spawn()
    }

    /// The last `n` lines of the agent's log.
    pub fn log_tail(&self, n: usize) -> String {
        tail_file(&self.opts.log_path, n)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- mesh-agent log tail ({}) -----\n{}\n-----",
                self.opts.log_path.display(),
                self.log_tail(60)
            );
        }
        if self.child.is_some() {
            if let Err(e) = self.stop() {
                eprintln!("sinew-tests: stopping agent: {e:#}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Policy (issue 3): `/debug/policies`, `/debug/policy/check`, `/debug/flows` and their CLI wrappers.

/// `GET /debug/policies` (= `mesh-agent policy status -o json`). Fields the tests do not use are kept in `extra`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PolicyStatus {
    /// Bumped on every compilation that reached the kernel.
    #[serde(default)]
    pub revision: u64,
    /// Exactly the policies whose compilation has reached the kernel.
    #[serde(default)]
    pub policies: Vec<PolicyEntry>,
    /// Objects the source rejected (bad input).
    #[serde(default)]
    pub rejected: Vec<RejectedEntry>,
    /// Everything else.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl PolicyStatus {
    /// `namespace/name` of every policy in force.
    pub fn names(&self) -> std::collections::BTreeSet<String> {
        self.policies.iter().map(PolicyEntry::key).collect()
    }

    /// The policy `namespace/name`, if in force.
    pub fn policy(&self, key: &str) -> Option<&PolicyEntry> {
        self.policies.iter().find(|p| p.key() == key)
    }
}

/// One policy in [`PolicyStatus`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PolicyEntry {
    /// `metadata.namespace`.
    #[serde(default)]
    pub namespace: String,
    /// `metadata.name`.
    #[serde(default)]
    pub name: String,
    /// `spec.action` as enforced.
    #[serde(default)]
    pub action: String,
    /// `ns/pod` of every workload it selects.
    #[serde(default)]
    pub selects: Vec<String>,
    /// Per rule: how it is enforced.
    #[serde(default)]
    pub rules: Vec<RuleEntry>,
    /// Everything else.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl PolicyEntry {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// One rule's status in [`PolicyEntry`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RuleEntry {
    /// Index in `spec.rules`.
    #[serde(default)]
    pub index: usize,
    /// `kernel-enforced`, `proxy-required` or `rejected`.
    #[serde(default)]
    pub status: String,
    /// Why, when not kernel-enforced.
    #[serde(default)]
    pub reason: Option<String>,
}

/// A rejected object in [`PolicyStatus`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RejectedEntry {
    /// The file it came from.
    #[serde(default)]
    pub file: String,
    /// The object (kind and `namespace/name`), as far as it could be read.
    #[serde(default)]
    pub object: String,
    /// The error, naming the field.
    #[serde(default)]
    pub reason: String,
}

/// `GET /debug/policy/check` (= `mesh-agent policy check -o json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PolicyCheck {
    /// The verdict.
    pub allowed: bool,
    /// `allow` or `deny`.
    #[serde(default)]
    pub verdict: String,
    /// The deciding policy `namespace/name`, `None` for the defaults.
    #[serde(default)]
    pub policy: Option<String>,
    /// The deciding rule's index.
    #[serde(default)]
    pub rule: Option<u64>,
    /// Why, in words.
    #[serde(default)]
    pub reason: String,
    /// Everything else.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// `GET /debug/flows?since=SEQ` (= `mesh-agent flows -o json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Flows {
    /// The `since` to ask with next time.
    #[serde(default)]
    pub next: u64,
    /// Recent verdicts, oldest first.
    #[serde(default)]
    pub flows: Vec<Flow>,
}

/// One reported verdict in [`Flows`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Flow {
    /// Sequence number.
    #[serde(default)]
    pub seq: u64,
    /// `egress` (decided at the client's connect) or `ingress` (at the destination's first packet).
    #[serde(default)]
    pub direction: String,
    /// `deny` or `allow`.
    #[serde(default)]
    pub verdict: String,
    /// An AUDIT policy matched.
    #[serde(default)]
    pub audit: bool,
    /// `tcp` or `udp`.
    #[serde(default)]
    pub proto: String,
    /// `ip:port`.
    #[serde(default)]
    pub src: String,
    /// `ip:port`.
    #[serde(default)]
    pub dst: String,
    /// `ns/sa`, `world` or `host`.
    #[serde(default)]
    pub src_identity: String,
    /// `ns/sa`, `world` or `host`.
    #[serde(default)]
    pub dst_identity: String,
    /// The deciding policy `namespace/name`.
    #[serde(default)]
    pub policy: Option<String>,
    /// The deciding rule.
    #[serde(default)]
    pub rule: Option<u64>,
    /// Why.
    #[serde(default)]
    pub reason: String,
    /// Everything else.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// Percent-encodes a query value (unreserved characters and `/` and `:` stay).
fn query_escape(v: &str) -> String {
    let mut out = String::new();
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/:".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Agent {
    /// `GET path` and parse the JSON body (fails on a non-200 status, with the body).
    pub fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T> {
        let r = self.get(path)?;
        if r.status != 200 {
            bail!("{path}: status {}: {}", r.status, r.body.trim());
        }
        serde_json::from_str(&r.body).with_context(|| format!("{path}: parsing {}", r.body))
    }

    /// `GET /debug/policies`.
    pub fn policy_status(&self) -> Result<PolicyStatus> {
        self.get_json("/debug/policies")
    }

    /// `GET /debug/policy/check?from=..&to=..&port=..&proto=..`: `from` is `ns/sa` or an IP, `to` is `ns/pod`,
    /// `proto` is `tcp` or `udp`.
    pub fn policy_check(
        &self,
        from: &str,
        to: &str,
        port: u16,
        proto: &str,
    ) -> Result<PolicyCheck> {
        self.get_json(&format!(
            "/debug/policy/check?from={}&to={}&port={port}&proto={}",
            query_escape(from),
            query_escape(to),
            query_escape(proto)
        ))
    }

    /// `GET /debug/flows?since=SEQ`.
    pub fn flows(&self, since: u64) -> Result<Flows> {
        self.get_json(&format!("/debug/flows?since={since}"))
    }

    /// Polls `/debug/policies` until the set of `namespace/name` in force is exactly `expected` and every
    /// `rejected` entry mentions one of `rejected_ok` (in its object or file); returns that status. On timeout
    /// the error shows the last status.
    pub fn wait_policies(
        &self,
        expected: &std::collections::BTreeSet<String>,
        rejected_ok: &[&str],
        timeout: Duration,
    ) -> Result<PolicyStatus> {
        let mut last = None;
        let r = eventually(timeout, Duration::from_millis(20), || {
            let st = self.policy_status().map_err(|e| format!("{e:#}"))?;
            let names = st.names();
            let bad: Vec<&RejectedEntry> = st
                .rejected
                .iter()
                .filter(|r| {
                    !rejected_ok
                        .iter()
                        .any(|ok| r.object.contains(ok) || r.file.contains(ok))
                })
                .collect();
            if !bad.is_empty() {
                return Err(format!("unexpected rejections: {bad:#?}"));
            }
            if &names == expected {
                return Ok(st);
            }
            let missing: Vec<_> = expected.difference(&names).collect();
            let extra: Vec<_> = names.difference(expected).collect();
            last = Some(st);
            Err(format!(
                "policies in force: missing {missing:?}, unexpected {extra:?}"
            ))
        });
        r.map_err(|e| {
            anyhow!(
                "{e}; last /debug/policies: {}",
                last.map(|s| serde_json::to_string_pretty(&s).unwrap_or_default())
                    .unwrap_or_default()
            )
        })
    }

    /// Runs `mesh-agent <args> --admin-addr <this agent>` (the admin-facing CLI commands) to completion.
    pub fn cli_admin(&self, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new(&self.opts.bin);
        cmd.args(args)
            .arg("--admin-addr")
            .arg(self.opts.admin_addr.to_string())
            .env("NO_COLOR", "1");
        let out = crate::util::run_bounded(&mut cmd, Duration::from_secs(30))
            .with_context(|| format!("mesh-agent {}", args.join(" ")))?;
        if !out.0.success() {
            bail!(
                "`mesh-agent {}` failed ({}): {}{}",
                args.join(" "),
                out.0,
                out.2.trim(),
                out.1.trim()
            );
        }
        Ok(out.1)
    }

    /// `mesh-agent policy status -o json`, parsed.
    pub fn cli_policy_status(&self) -> Result<PolicyStatus> {
        let text = self.cli_admin(&["policy", "status", "-o", "json"])?;
        serde_json::from_str(&text).with_context(|| format!("parsing policy status: {text}"))
    }

    /// `mesh-agent policy check --from .. --to .. --port .. --proto .. -o json`, parsed.
    pub fn cli_policy_check(
        &self,
        from: &str,
        to: &str,
        port: u16,
        proto: &str,
    ) -> Result<PolicyCheck> {
        let port = port.to_string();
        let text = self.cli_admin(&[
            "policy", "check", "--from", from, "--to", to, "--port", &port, "--proto", proto, "-o",
            "json",
        ])?;
        serde_json::from_str(&text).with_context(|| format!("parsing policy check: {text}"))
    }

    /// `mesh-agent flows -o json`, parsed.
    pub fn cli_flows(&self) -> Result<Flows> {
        let text = self.cli_admin(&["flows", "-o", "json"])?;
        serde_json::from_str(&text).with_context(|| format!("parsing flows: {text}"))
    }
}

/// An HTTP response from [`http_get`].
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Body as text.
    pub body: String,
}

/// A minimal HTTP/1.0 GET (the server closes the connection after the response, so the body ends at EOF).
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<HttpResponse> {
    let mut s =
        TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    // Bounded by the read timeout per read and by size.
    s.take(16 << 20)
        .read_to_end(&mut raw)
        .with_context(|| format!("reading {path}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("{path}: malformed response: {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("{path}: bad status line: {head:?}"))?;
    Ok(HttpResponse {
        status,
        body: body.to_string(),
    })
}

/// One Prometheus sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name (with `_total` etc. as exposed).
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Value.
    pub value: f64,
}

/// Parsed Prometheus text exposition.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    /// Every sample, in order.
    pub samples: Vec<Sample>,
    /// Lines that are neither comments nor valid samples. Prometheus rejects a whole scrape with one of these, so
    /// tests report them.
    pub invalid: Vec<String>,
}

impl Metrics {
    /// Parses the text format (comments skipped; label values unescaped).
    pub fn parse(text: &str) -> Metrics {
        let mut m = Metrics::default();
        for l in text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            match parse_sample(l) {
                Some(s) => m.samples.push(s),
                None => m.invalid.push(l.to_string()),
            }
        }
        m
    }

    /// Samples named `name` whose labels include all of `labels`.
    pub fn find<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).is_some_and(|x| x == v))
        })
    }

    /// The value of the single sample matching, or the sum if several match; `None` if none does.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut it = self.find(name, labels).peekable();
        it.peek()?;
        Some(it.map(|s| s.value).sum())
    }

    /// Like [`Metrics::get`] but 0 when absent (counters that have not been touched yet).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }
}

fn parse_sample(line: &str) -> Option<Sample> {
    let (name, rest) = match line.find(['{', ' ']) {
        Some(i) => (&line[..i], &line[i..]),
        None => return None,
    };
    let mut labels = BTreeMap::new();
    let rest = if let Some(r) = rest.strip_prefix('{') {
        let mut chars = r.char_indices().peekable();
        let mut end = None;
        // One pass over the label set; every iteration consumes at least one character.
        loop {
            while chars.peek().is_some_and(|(_, c)| *c == ',' || *c == ' ') {
                chars.next();
            }
            let Some(&(i, c)) = chars.peek() else { break };
            if c == '}' {
                end = Some(i + 1);
                break;
            }
            let mut key = String::new();
            for (_, c) in chars.by_ref() {
                if c == '=' {
                    break;
                }
                key.push(c);
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                return None;
            }
            let mut val = String::new();
            let mut closed = false;
            while let Some((_, c)) = chars.next() {
                match c {
                    '\\' => match chars.next().map(|(_, c)| c) {
                        Some('n') => val.push('\n'),
                        Some(o) => val.push(o),
                        None => return None,
                    },
                    '"' => {
                        closed = true;
                        break;
                    }
                    o => val.push(o),
                }
            }
            if !closed {
                return None;
            }
            labels.insert(key.trim().to_string(), val);
        }
        &r[end?..]
    } else {
        rest
    };
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_prometheus_text() {
        let text = r#"# HELP sinew_agent_info Agent info.
# TYPE sinew_agent_info gauge
sinew_agent_info{version="0.1.0",node="node-a"} 1
sinew_source_errors_total 3
sinew_source_rejected{file="/x/bad.yaml",object="Service default/web",reason="bad \"ip\", see\\docs"} 1
sinew_service_balanced_total{service="default/web",port="80",proto="tcp",vip="10.96.0.10:80"} 60 1700000000
# EOF
"#;
        let m = Metrics::parse(text);
        assert_eq!(m.samples.len(), 4);
        assert!(m.invalid.is_empty(), "{:?}", m.invalid);
        let bad = Metrics::parse("x{reason=\"a \"b\" c\"} 1\ny 2\n");
        assert_eq!(
            bad.invalid.len(),
            1,
            "unescaped quotes in a label value are invalid"
        );
        assert_eq!(bad.samples.len(), 1);
        assert_eq!(m.get("sinew_source_errors_total", &[]), Some(3.0));
        assert_eq!(
            m.get(
                "sinew_service_balanced_total",
                &[("service", "default/web"), ("port", "80")]
            ),
            Some(60.0)
        );
        let rej = m.find("sinew_source_rejected", &[]).next().unwrap();
        assert_eq!(rej.labels["reason"], "bad \"ip\", see\\docs");
        assert_eq!(m.get("nope", &[]), None);
        assert_eq!(m.value("nope", &[]), 0.0);
    }
}
