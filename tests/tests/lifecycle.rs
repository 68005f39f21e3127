//! The agent's lifecycle: `kill -9` and restart under load with no failed connect, reconciliation of changes made
//! while it was down, and `uninstall` leaving nothing attached or pinned.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{CHANGE_BOUND, assert_all_ok, fixture};
use sinew_tests::guards::list_files;
use sinew_tests::scenario::{LbOptions, VIP};
use sinew_tests::testpod::ConnectReport;
use sinew_tests::topology::client_bound;
use sinew_tests::{eventually, require_privileged, unix_ms, util::run};

/// Program names `bpftool cgroup tree <root>` lists under the node's cgroup root (JSON output, any shape: every
/// `"name"` field below the root).
fn attached_programs(cgroup_root: &Path) -> Vec<String> {
    let out = run(
        "bpftool",
        &["-j", "cgroup", "tree", &cgroup_root.display().to_string()],
    )
    .unwrap_or_else(|e| panic!("bpftool cgroup tree: {e:#}"));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "bpftool output {:?}: {e}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    let mut names = Vec::new();
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, x) in m {
                    if k == "name" {
                        if let Some(s) = x.as_str() {
                            out.push(s.to_string());
                        }
                    }
                    walk(x, out);
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    walk(&v, &mut names);
    names
}

#[test]
fn kill9_and_restart_lose_no_connection_and_reconcile() {
    if !require_privileged("kill9_and_restart_lose_no_connection_and_reconcile") {
        return;
    }
    let mut f = fixture(
        "life-kill9",
        LbOptions {
            backends: 3,
            spare: 1,
            ..Default::default()
        },
    );
    let vip = f.vip_tcp();
    // 300 connects, 10 ms apart: about 3-4 s, long enough to span the kill, the downtime and the restart.
    let (count, interval, timeout) = (300u32, 10u64, 2000u64);
    let mut client = f
        .client
        .testpod(&[
            "tcp-connect",
            "--to",
            &vip,
            "--count",
            &count.to_string(),
            "--interval-ms",
            &interval.to_string(),
            "--timeout-ms",
            &timeout.to_string(),
            "--progress-every",
            "10",
        ])
        .expect("start client");
    // Kill only once the client's connects are flowing.
    client
        .wait_for_line(Duration::from_secs(5), |l| l.contains("\"progress\""))
        .expect("client progress");
    let before = f.agent.cli().status().expect("status before kill -9");
    let killed_at = unix_ms();
    f.agent.kill9().expect("kill -9");

    // With the agent dead the programs stay attached, their links pinned.
    let status = f
        .agent
        .cli()
        .status()
        .unwrap_or_else(|e| panic!("status after kill -9: {e:#}"));
    assert!(
        !status.programs.is_empty(),
        "status lists no programs: {status:#?}"
    );
    // The same-node acceleration programs attach only with `--sockmap true` (off here; tests/tests/sockmap.rs
    // restarts an agent with it on).
    let attached_by_default =
        |p: &&sinew_tests::agent::ProgramStatus| !p.name.starts_with("accel_");
    for p in status.programs.iter().filter(attached_by_default) {
        assert!(
            p.attached,
            "program {} detached after kill -9: {status:#?}",
            p.name
        );
        if let Some(pin) = &p.link_pin {
            assert!(
                Path::new(pin).exists(),
                "link pin {pin} of {} is gone",
                p.name
            );
        }
    }
    assert!(
        status.programs.iter().any(|p| p.name == "connect4"),
        "{status:#?}"
    );

    // A backend added while the agent is down.
    f.write_backend(f.backend("b4"), true).expect("write b4");
    f.agent.restart().expect("restart");
    f.agent
        .wait_ready(Duration::from_secs(20))
        .expect("ready after restart");
    let ready_at = unix_ms();

    // The restart swapped new programs into the same links (BPF_LINK_UPDATE): every link id is unchanged, so the
    // programs were never detached, and every program id is new, so the restarted agent's code is what runs.
    let after = f.agent.cli().status().expect("status after restart");
    for p in before.programs.iter().filter(attached_by_default) {
        let q = after
            .programs
            .iter()
            .find(|q| q.name == p.name)
            .unwrap_or_else(|| panic!("{} missing after restart: {after:#?}", p.name));
        assert!(p.link_id.is_some() && q.attached, "{p:#?} / {q:#?}");
        assert_eq!(
            p.link_id, q.link_id,
            "{}: the link was replaced, not updated",
            p.name
        );
        assert_ne!(
            p.program_id, q.program_id,
            "{}: the old program still runs",
            p.name
        );
    }

    let out = client
        .wait(client_bound(count, interval, timeout))
        .expect("client run");
    let r: ConnectReport = out.json().expect("client report");
    eprintln!(
        "client ran {}..{} ms; killed at {killed_at}, ready again at {ready_at}; names {:?}",
        r.started_unix_ms, r.finished_unix_ms, r.names
    );
    assert!(
        r.started_unix_ms <= killed_at && killed_at <= r.finished_unix_ms,
        "the kill did not happen while the client was connecting"
    );
    assert_eq!(r.attempts, count);
    assert_all_ok(&r, "connects across kill -9 and restart");

    // The restarted agent adopted the pinned state and reconciled the change it missed.
    eventually(CHANGE_BOUND, Duration::from_millis(50), || {
        let r = f.connect(&vip, 30, 0, 1000).map_err(|e| format!("{e:#}"))?;
        if r.failed == 0 && r.names.contains_key("b4") {
            Ok(())
        } else {
            Err(format!("{:?} {:?}", r.names, r.errors))
        }
    })
    .unwrap_or_else(|e| panic!("b4 (added while the agent was down) never served: {e}"));
    let dump = f.agent.cli().dump_services().expect("dump services");
    let web = dump
        .iter()
        .find(|s| s.vip == VIP.to_string() && s.port == 80 && s.proto == "tcp")
        .unwrap_or_else(|| panic!("no VIP:80 in {dump:#?}"));
    assert_eq!(web.count, 4, "{web:#?}");
}

#[test]
fn uninstall_detaches_and_unpins() {
    if !require_privileged("uninstall_detaches_and_unpins") {
        return;
    }
    let mut f = fixture("life-uninstall", LbOptions::default());
    let vip = f.vip_tcp();
    let node = f.topo.node(sinew_tests::scenario::NODE);
    let cgroup_root = node.cgroup_root().to_path_buf();
    let bpffs_dir = node.bpffs().dir().to_path_buf();
    let before = attached_programs(&cgroup_root);
    assert!(
        before.iter().any(|n| n.contains("connect4")),
        "bpftool shows no connect4 before uninstall: {before:?}"
    );
    assert!(
        !list_files(&bpffs_dir).is_empty(),
        "nothing pinned before uninstall"
    );

    // SIGTERM: the agent exits and leaves everything attached (restart and upgrade never detach).
    let status = f.agent.stop().expect("stop");
    assert!(
        status.success(),
        "agent exit status on SIGTERM: {status}\n{}",
        f.agent.log_tail(20)
    );
    let r = f.connect(&vip, 10, 0, 2000).expect("connect");
    assert_all_ok(&r, "after SIGTERM, programs still balance");

    let out = f
        .agent
        .cli()
        .uninstall()
        .unwrap_or_else(|e| panic!("uninstall: {e:#}"));
    eprintln!("uninstall said: {out}");
    let after = attached_programs(&cgroup_root);
    assert!(
        after.is_empty(),
        "programs still attached under {}: {after:?}",
        cgroup_root.display()
    );
    let pins = list_files(&bpffs_dir);
    assert!(pins.is_empty(), "pins left after uninstall: {pins:?}");

    // The VIP is an unrouted address again: connects fail (quickly, or at our short timeout), never balanced.
    let r = f.connect(&vip, 3, 0, 500).expect("connect");
    assert_eq!(r.ok, 0, "VIP still balanced after uninstall: {r:#?}");
    assert!(r.names.is_empty(), "{r:#?}");
}

/// Unmounts and removes a scratch bpffs mount point, also when the test fails.
struct ScratchMount(std::path::PathBuf);

impl Drop for ScratchMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.0.join("bpf"))
            .status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn mounted(path: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(path.to_str().unwrap_or("")))
}

#[test]
fn bpffs_root_outside_sys_fs_bpf_is_mounted_then_unmounted() {
    if !require_privileged("bpffs_root_outside_sys_fs_bpf_is_mounted_then_unmounted") {
        return;
    }
    let mut f = fixture("life-bpffs", LbOptions::default());
    // Hand the node over from the fixture's agent to one whose --bpffs-root is on no bpf filesystem yet.
    f.agent.stop().expect("stop");
    f.agent
        .cli()
        .uninstall()
        .expect("uninstall the fixture's install");
    let scratch =
        ScratchMount(Path::new("/run").join(format!("{}bpf", sinew_tests::util::unique_id())));
    let root = scratch.0.join("bpf");
    assert!(!mounted(&root));
    let mut opts = f.agent.options().clone();
    opts.bpffs_root = root.clone();
    let mut agent = sinew_tests::Agent::start_with(opts).expect("start agent");
    agent
        .wait_ready(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("ready with --bpffs-root {}: {e:#}", root.display()));
    assert!(
        mounted(&root),
        "the agent did not mount bpffs at {}",
        root.display()
    );
    let r = f.connect(&f.vip_tcp(), 10, 0, 2000).expect("connect");
    assert_all_ok(&r, "balanced with pins under a self-mounted bpffs");

    agent.stop().expect("stop");
    agent.cli().uninstall().expect("uninstall");
    assert!(
        !mounted(&root),
        "uninstall left the bpffs it mounted at {}",
        root.display()
    );
    assert!(!root.exists(), "{} left behind", root.display());
}

#[test]
fn a_second_agent_takes_the_node_over_without_dropping_a_connection() {
    if !require_privileged("a_second_agent_takes_the_node_over_without_dropping_a_connection") {
        return;
    }
    let mut f = fixture("life-handover", LbOptions::default());
    // Connections keep coming through the whole handover (as during a DaemonSet rolling update with
    // maxSurge 1): 150 connects, one every 20 ms.
    let client = f.client.clone();
    let to = f.vip_tcp();
    let load = std::thread::spawn(move || client.tcp_connect(&to, 150, 20, 2000));
    std::thread::sleep(Duration::from_millis(300));
    let mut opts = f.agent.options().clone();
    opts.admin_addr =
        std::net::SocketAddr::from(([127, 0, 0, 1], sinew_tests::free_port().expect("port")));
    opts.log_path = opts.log_path.with_extension("second.log");
    let mut second = sinew_tests::Agent::start_with(opts).expect("start the second agent");
    // The new agent asks, the old one hands over, and the new one becomes ready while the old one still runs.
    second
        .wait_ready(Duration::from_secs(15))
        .unwrap_or_else(|e| {
            panic!(
                "second agent never took over: {e:#}\n{}",
                second.log_tail(30)
            )
        });
    assert!(
        second.log_tail(50).contains("asking it to hand over"),
        "{}",
        second.log_tail(50)
    );
    assert!(
        f.agent.exited().is_none(),
        "the old agent must keep running until it is told to stop"
    );
    assert!(
        f.agent.log_tail(50).contains("handing over"),
        "{}",
        f.agent.log_tail(50)
    );
    let old_ready = f.agent.get("/readyz").map(|r| r.status).unwrap_or(0);
    assert_ne!(
        old_ready, 200,
        "the old agent still reports ready after handing over"
    );
    let old_health = f.agent.get("/healthz").map(|r| r.status).unwrap_or(0);
    assert_eq!(
        old_health, 200,
        "the old agent must stay healthy (not restarted by its liveness probe)"
    );
    assert!(
        !f.agent.options().bpffs_root.join("handover").exists(),
        "the handover request was not cleared"
    );
    // The new agent is the one reconciling now.
    let b1 = f.backends[0].clone();
    f.remove_backend(&b1).expect("remove b1");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while second
        .cli()
        .dump_services()
        .expect("dump")
        .iter()
        .any(|s| s.backends.iter().any(|b| b.addr == b1.ip4.to_string()))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the new agent does not reconcile"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let r = load.join().expect("load thread").expect("connect load");
    assert_all_ok(&r, "connections across the handover");
    let status = f.agent.stop().expect("stop the old agent");
    assert!(
        status.success(),
        "the old agent exits cleanly after handing over: {status:?}"
    );
    let r = f.connect(&f.vip_tcp(), 20, 0, 2000).expect("connect");
    assert_all_ok(&r, "balanced by the new agent after the old one left");
    second.stop().expect("stop the second agent");
}
