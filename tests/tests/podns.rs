//! `mesh_agent::podns` on real cgroups, processes and network namespaces: a pod's netns is found from its UID
//! alone for both kubelet cgroup drivers (and kind's nested layout), pods that start later are found on the next
//! call, a hostNetwork pod is refused, and a pod whose process or cgroup went away is noticed.
//!
//! Each test owns a cgroup `/sys/fs/cgroup/unified/snw<pid>-<n>-podns` (the finder's cgroup root, never the
//! machine's) with kubelet-style pod cgroups below it ([`PodCgroup`]), and `ip netns` namespaces standing in for
//! pod sandboxes. Every one is a guard: removed on success, failure and panic.

use std::path::Path;
use std::time::Duration;

use mesh_agent::podns::{NetnsError, PodNetns};
use mesh_agent::sys::netns_cookie;
use sinew_tests::kubepods::{Driver, Layout, PodCgroup, Qos};
use sinew_tests::util::unique_id;
use sinew_tests::{Cgroup, Netns, eventually, require_privileged};

const UID_A: &str = "6f1c2a9e-0d4b-4c3e-8a7f-5b6c7d8e9f01";
const UID_B: &str = "a2b3c4d5-e6f7-4809-9a1b-2c3d4e5f6071";
const UID_C: &str = "13579bdf-2468-4ace-9bdf-0123456789ab";

/// How long a change (a process exiting) may take to show in the cgroup files.
const CHANGE: Duration = Duration::from_secs(5);

/// A test's cgroup root and two pod network namespaces.
struct Fixture {
    // Field order is drop order: namespaces last, after the cgroup (and its processes) are gone.
    root: Cgroup,
    ns_a: Netns,
    ns_b: Netns,
}

fn fixture() -> Fixture {
    let id = unique_id();
    Fixture {
        root: Cgroup::new(&format!("{id}-podns")).expect("test cgroup root"),
        ns_a: Netns::new(&format!("{id}-a")).expect("netns a"),
        ns_b: Netns::new(&format!("{id}-b")).expect("netns b"),
    }
}

fn cookie(path: &Path) -> u64 {
    netns_cookie(path).unwrap_or_else(|e| panic!("netns cookie of {}: {e}", path.display()))
}

/// Asserts that the finder resolves `uid` to the pause process's netns, which is `netns`.
fn assert_found(
    finder: &mut PodNetns,
    uid: &str,
    pause: &sinew_tests::kubepods::Pause,
    netns: &Netns,
) {
    let path = finder
        .netns_path(uid)
        .unwrap_or_else(|e| panic!("pod {uid} in {}: {e}", netns.name()));
    assert_eq!(
        path,
        pause.netns_path(),
        "pod {uid}: the pause process's netns"
    );
    assert_eq!(
        cookie(&path),
        cookie(&netns.path()),
        "pod {uid}: {} is not in {}",
        path.display(),
        netns.name()
    );
}

#[test]
fn finds_pod_netns_by_uid_for_both_cgroup_drivers() {
    if !require_privileged("finds_pod_netns_by_uid_for_both_cgroup_drivers") {
        return;
    }
    let f = fixture();
    let mut finder = PodNetns::new(f.root.path(), "/proc");

    // Not created yet: no cgroup. Nothing is remembered about the miss.
    let e = finder.netns_path(UID_A).expect_err("no pod yet");
    assert!(matches!(e, NetnsError::NoCgroup { .. }), "{e}");

    // systemd driver, BestEffort: the cgroup appears before its sandbox process.
    let pod_a = PodCgroup::create(
        f.root.path(),
        UID_A,
        Layout::new(Driver::Systemd, Qos::BestEffort),
    )
    .expect("pod a cgroup");
    let e = finder.netns_path(UID_A).expect_err("no process yet");
    assert!(matches!(e, NetnsError::NoProcess { .. }), "{e}");
    assert!(
        pod_a
            .scope_dir()
            .ends_with(format!("cri-containerd-{}.scope", UID_A.replace('-', ""))),
        "{}",
        pod_a.scope_dir().display()
    );
    let pause_a = pod_a.spawn_pause(&f.ns_a.path()).expect("pause a");
    assert_found(&mut finder, UID_A, &pause_a, &f.ns_a);
    assert_eq!(finder.pod_cgroup(UID_A).unwrap(), pod_a.pod_dir());

    // cgroupfs driver, Burstable, in the other namespace, next to the first pod.
    let pod_b = PodCgroup::create(
        f.root.path(),
        UID_B,
        Layout::new(Driver::Cgroupfs, Qos::Burstable),
    )
    .expect("pod b cgroup");
    let pause_b = pod_b.spawn_pause(&f.ns_b.path()).expect("pause b");
    assert_found(&mut finder, UID_B, &pause_b, &f.ns_b);
    assert_ne!(cookie(&f.ns_a.path()), cookie(&f.ns_b.path()));

    // kind: systemd slices nested below kubelet's own, Guaranteed.
    let pod_c = PodCgroup::create(
        f.root.path(),
        UID_C,
        Layout::new(Driver::Systemd, Qos::Guaranteed).nested(),
    )
    .expect("pod c cgroup");
    let pause_c = pod_c.spawn_pause(&f.ns_b.path()).expect("pause c");
    assert_found(&mut finder, UID_C, &pause_c, &f.ns_b);

    // The first pod is still found (from the cache) after the others came.
    assert_found(&mut finder, UID_A, &pause_a, &f.ns_a);
}

#[test]
fn pod_restart_exit_and_removal_are_noticed() {
    if !require_privileged("pod_restart_exit_and_removal_are_noticed") {
        return;
    }
    let f = fixture();
    let mut finder = PodNetns::new(f.root.path(), "/proc");
    let pod = PodCgroup::create(
        f.root.path(),
        UID_A,
        Layout::new(Driver::Cgroupfs, Qos::BestEffort).nested(),
    )
    .expect("pod cgroup");
    let mut pause = pod.spawn_pause(&f.ns_a.path()).expect("pause");
    assert_found(&mut finder, UID_A, &pause, &f.ns_a);

    // The process exits: the next call says so.
    pause.kill();
    eventually(CHANGE, Duration::from_millis(10), || {
        match finder.netns_path(UID_A) {
            Err(NetnsError::NoProcess { .. }) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .unwrap_or_else(|e| panic!("after the pause process exited: {e}"));

    // A new sandbox in another namespace (the pod restarted): found, with the new netns.
    let pause = pod.spawn_pause(&f.ns_b.path()).expect("second pause");
    assert_found(&mut finder, UID_A, &pause, &f.ns_b);

    // An app container's scope appears next to the sandbox's (empty here): the sandbox is still the one found.
    let app_dir = pod
        .container(&Layout::new(Driver::Cgroupfs, Qos::BestEffort).container_name("app"))
        .expect("app container");
    assert!(app_dir.is_dir());
    assert_found(&mut finder, UID_A, &pause, &f.ns_b);

    // The pod's cgroup is removed: the cached directory is dropped and the pod is not found.
    let pod_dir = pod.pod_dir().to_path_buf();
    drop(pause);
    drop(pod);
    assert!(!pod_dir.exists(), "{} left behind", pod_dir.display());
    let e = finder.netns_path(UID_A).expect_err("pod gone");
    assert!(matches!(e, NetnsError::NoCgroup { .. }), "{e}");
    assert_eq!(finder.cached(), 0);
    // Every hierarchy level the pod created went with it.
    let left: Vec<_> = std::fs::read_dir(f.root.path())
        .expect("read root")
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "left below the root: {left:?}");
}

#[test]
fn host_network_pod_is_refused() {
    if !require_privileged("host_network_pod_is_refused") {
        return;
    }
    let f = fixture();
    let mut finder = PodNetns::new(f.root.path(), "/proc");
    let pod = PodCgroup::create(
        f.root.path(),
        UID_A,
        Layout::new(Driver::Systemd, Qos::Burstable),
    )
    .expect("pod cgroup");
    // hostNetwork: the sandbox stays in the network namespace of the node, which is this test's own (the
    // finder's default refuses pid 1's and its own; pid 1's cannot be read in every sandbox this runs in).
    // `/proc/self` is resolved in the child, before exec: its own netns, which it inherited from the test.
    let _pause = pod
        .spawn_pause(Path::new("/proc/self/ns/net"))
        .expect("host-network pause");
    let e = finder.netns_path(UID_A).expect_err("host network");
    assert!(matches!(e, NetnsError::HostNetwork { .. }), "{e}");
    assert!(e.to_string().contains(UID_A), "{e}");

    // A normal pod next to it, whose runtime helper (CRI-O's conmon) sits in the pod's cgroup but in the node's
    // netns, and started before the sandbox: the helper is skipped, the sandbox found.
    let other = PodCgroup::create(
        f.root.path(),
        UID_B,
        Layout::new(Driver::Systemd, Qos::Burstable),
    )
    .expect("pod b cgroup");
    let conmon_dir = other
        .container("crio-conmon-b.scope")
        .expect("conmon scope");
    let _conmon = other
        .spawn_pause_in(&conmon_dir, Path::new("/proc/self/ns/net"))
        .expect("conmon stand-in");
    let pause_b = other.spawn_pause(&f.ns_a.path()).expect("pause b");
    assert_found(&mut finder, UID_B, &pause_b, &f.ns_a);

    // A node simulated in a namespace of its own (as the harness does) is added explicitly: a pod in the node's
    // namespace is refused, the others are found (and the helper in the machine's netns is still skipped).
    let mut node_finder = PodNetns::new(f.root.path(), "/proc").with_host_netns([f.ns_b.path()]);
    let on_node = PodCgroup::create(
        f.root.path(),
        UID_C,
        Layout::new(Driver::Cgroupfs, Qos::Guaranteed),
    )
    .expect("pod c cgroup");
    let _pause_c = on_node.spawn_pause(&f.ns_b.path()).expect("pause c");
    let e = node_finder
        .netns_path(UID_C)
        .expect_err("in the node's netns");
    assert!(matches!(e, NetnsError::HostNetwork { .. }), "{e}");
    assert_found(&mut node_finder, UID_B, &pause_b, &f.ns_a);
}
