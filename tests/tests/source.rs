//! The file source through a real `mesh-agent`: backends follow file changes within about a second, and a bad file
//! is kept out while the last good state keeps serving.

mod common;

use std::time::{Duration, Instant};

use common::{CHANGE_BOUND, assert_all_ok, fixture, metrics};
use sinew_tests::manifest::{Service, ServicePort};
use sinew_tests::scenario::{LbFixture, LbOptions, VIP, service};
use sinew_tests::{eventually, require_privileged};

/// Polls short connect runs until `pred` holds for one; returns how long it took.
fn until_connects(
    f: &LbFixture,
    to: &str,
    count: u32,
    what: &str,
    pred: impl Fn(&sinew_tests::testpod::ConnectReport) -> bool,
) -> Duration {
    let start = Instant::now();
    eventually(CHANGE_BOUND, Duration::from_millis(50), || {
        let r = f.connect(to, count, 0, 500).map_err(|e| format!("{e:#}"))?;
        if pred(&r) {
            Ok(())
        } else {
            Err(format!("names {:?} errors {:?}", r.names, r.errors))
        }
    })
    .unwrap_or_else(|e| panic!("{what}: {e}\nagent log:\n{}", f.agent.log_tail(30)));
    let took = start.elapsed();
    eprintln!("{what}: visible after {took:?}");
    took
}

#[test]
fn backends_follow_pod_file_changes() {
    if !require_privileged("backends_follow_pod_file_changes") {
        return;
    }
    let f = fixture(
        "src-pods",
        LbOptions {
            backends: 2,
            spare: 1,
            ..Default::default()
        },
    );
    let vip = f.vip_tcp();
    let r = f.connect(&vip, 30, 0, 2000).expect("connect");
    assert_all_ok(&r, "before changes");
    assert!(
        !r.names.contains_key("b3"),
        "b3 is not in the service yet: {:?}",
        r.names
    );

    // Added: b3's Pod file appears.
    f.write_backend(f.backend("b3"), true).expect("write b3");
    until_connects(&f, &vip, 20, "b3 added", |r| {
        r.failed == 0 && r.names.contains_key("b3")
    });
    let dump = f.agent.cli().dump_services().expect("dump services");
    let web = dump
        .iter()
        .find(|s| s.vip == VIP.to_string() && s.port == 80 && s.proto == "tcp");
    let web = web.unwrap_or_else(|| panic!("no 10.96.0.10:80/tcp in dump: {dump:#?}"));
    assert_eq!(web.count, 3, "{web:#?}");
    assert!(web.backends.iter().all(|b| b.port == 8080), "{web:#?}");

    // Removed: b2's Pod file is deleted. Once a run avoids b2, no later connection may reach it.
    f.remove_backend(f.backend("b2")).expect("remove b2");
    until_connects(&f, &vip, 20, "b2 removed", |r| {
        r.failed == 0 && !r.names.contains_key("b2")
    });
    let r = f.connect(&vip, 60, 0, 2000).expect("connect");
    assert_all_ok(&r, "after removing b2");
    assert!(
        !r.names.contains_key("b2"),
        "removed backend still reached: {:?}",
        r.names
    );

    // Not ready: b1 stays in the files but its Ready condition turns False.
    f.write_backend(f.backend("b1"), false)
        .expect("b1 not ready");
    until_connects(&f, &vip, 20, "b1 not ready", |r| {
        r.failed == 0 && !r.names.contains_key("b1")
    });
    let r = f.connect(&vip, 40, 0, 2000).expect("connect");
    assert_all_ok(&r, "after b1 turned not ready");
    assert_eq!(
        r.names.keys().collect::<Vec<_>>(),
        vec!["b3"],
        "only b3 is left: {:?}",
        r.names
    );
}

#[test]
fn backends_follow_endpoint_slice_edits() {
    if !require_privileged("backends_follow_endpoint_slice_edits") {
        return;
    }
    let f = fixture(
        "src-slice",
        LbOptions {
            endpoint_slice: true,
            ..Default::default()
        },
    );
    let vip = f.vip_tcp();
    let (b1, b2) = (f.backend("b1").clone(), f.backend("b2").clone());
    f.write_endpoint_slice(&[&b1, &b2]).expect("rewrite slice");
    until_connects(&f, &vip, 20, "b3 dropped from the slice", |r| {
        r.failed == 0 && !r.names.contains_key("b3")
    });
    let r = f.connect(&vip, 60, 0, 2000).expect("connect");
    assert_all_ok(&r, "after the slice edit");
    assert!(
        !r.names.contains_key("b3"),
        "removed endpoint still reached: {:?}",
        r.names
    );
}

/// Waits until `/metrics` reports `file` as rejected and the error counter is above `errors_before`; returns the
/// new counter value.
///
/// A `sinew_source_rejected` line that names the file but is not valid exposition text (Prometheus would drop the
/// whole scrape) still counts as "reported" here, so the rest of the test runs; the line is collected in
/// `malformed` and the test fails on it at the end.
fn wait_rejected(
    f: &LbFixture,
    file: &str,
    errors_before: f64,
    malformed: &mut Vec<String>,
) -> f64 {
    let mut bad_lines = Vec::new();
    let errors = eventually(CHANGE_BOUND, Duration::from_millis(50), || {
        let m = f.agent.metrics().map_err(|e| format!("{e:#}"))?;
        let errors = m.value("sinew_source_errors_total", &[]);
        let rejected: Vec<_> = m
            .find("sinew_source_rejected", &[])
            .filter(|s| s.labels.get("file").is_some_and(|v| v.contains(file)))
            .collect();
        let broken: Vec<String> = m
            .invalid
            .iter()
            .filter(|l| l.starts_with("sinew_source_rejected") && l.contains(file))
            .cloned()
            .collect();
        if (rejected.is_empty() && broken.is_empty()) || errors <= errors_before {
            return Err(format!(
                "sinew_source_errors_total={errors} (before {errors_before}), rejected: {:?}, \
                 malformed /metrics lines: {:?}",
                m.find("sinew_source_rejected", &[]).collect::<Vec<_>>(),
                m.invalid
            ));
        }
        match rejected.first() {
            Some(s) => eprintln!("rejected {file}: {:?}", s.labels),
            None => bad_lines = broken,
        }
        Ok(errors)
    })
    .unwrap_or_else(|e| {
        panic!(
            "{file} was not reported as rejected: {e}\nagent log:\n{}",
            f.agent.log_tail(30)
        )
    });
    malformed.extend(bad_lines);
    errors
}

/// Waits until no `sinew_source_rejected` line (valid or not) names `file`.
fn wait_not_rejected(f: &LbFixture, file: &str) {
    eventually(CHANGE_BOUND, Duration::from_millis(50), || {
        let m = f.agent.metrics().map_err(|e| format!("{e:#}"))?;
        let mut still: Vec<String> = m
            .find("sinew_source_rejected", &[])
            .filter(|s| s.labels.get("file").is_some_and(|v| v.contains(file)) && s.value > 0.0)
            .map(|s| format!("{s:?}"))
            .collect();
        still.extend(
            m.invalid
                .iter()
                .filter(|l| l.starts_with("sinew_source_rejected") && l.contains(file))
                .cloned(),
        );
        if still.is_empty() {
            Ok(())
        } else {
            Err(format!("still rejected: {still:?}"))
        }
    })
    .unwrap_or_else(|e| panic!("{file}: {e}"));
}

/// Fails on `/metrics` lines that are not valid Prometheus text.
fn assert_well_formed(malformed: &[String]) {
    assert!(
        malformed.is_empty(),
        "sinew_source_rejected lines are not valid Prometheus text (label values must escape \\ \" and \\n), \
         so a real scrape would fail: {malformed:#?}"
    );
}

/// The agent is alive and the last good state still balances VIP:80 to all three backends.
fn assert_old_state_serves(f: &mut LbFixture, what: &str) {
    assert!(
        f.agent.exited().is_none(),
        "{what}: the agent exited\n{}",
        f.agent.log_tail(30)
    );
    let h = f.agent.get("/healthz").expect("healthz");
    assert_eq!(h.status, 200, "{what}: /healthz");
    let r = f.connect(&f.vip_tcp(), 30, 0, 2000).expect("connect");
    assert_all_ok(&r, what);
    assert_eq!(
        r.names.len(),
        3,
        "{what}: all backends still in use: {:?}",
        r.names
    );
}

#[test]
fn invalid_service_edit_is_kept_out_until_fixed() {
    if !require_privileged("invalid_service_edit_is_kept_out_until_fixed") {
        return;
    }
    let mut f = fixture("src-invalid", LbOptions::default());
    let mut malformed = Vec::new();
    let file = "service-web.yaml";
    let e0 = metrics(&f).value("sinew_source_errors_total", &[]);

    // An impossible ClusterIP.
    let mut bad = service(true);
    bad.cluster_ip = "10.96.0.999".into();
    f.source.write(file, &[bad.to_value()]).expect("write");
    let e1 = wait_rejected(&f, file, e0, &mut malformed);
    assert_old_state_serves(&mut f, "after clusterIP 10.96.0.999");

    // A port out of range.
    let bad = service(true).port(ServicePort::tcp("big", 70000, 8080));
    f.source.write(file, &[bad.to_value()]).expect("write");
    let e2 = eventually(CHANGE_BOUND, Duration::from_millis(50), || {
        let e = metrics(&f).value("sinew_source_errors_total", &[]);
        if e > e1 {
            Ok(e)
        } else {
            Err(format!("errors {e}, was {e1}"))
        }
    })
    .unwrap_or_else(|e| panic!("port 70000 was not rejected: {e}"));
    wait_rejected(&f, file, e1, &mut malformed);
    assert_old_state_serves(&mut f, "after port 70000");
    assert!(e2 > e1 && e1 > e0);

    // Fixed, with a visible change: the service moves from port 80 to 8081.
    let fixed = Service::new("web", &VIP.to_string())
        .port(ServicePort::tcp("http", 8081, 8080))
        .selector("app", "web");
    f.source.write(file, &[fixed.to_value()]).expect("write");
    let new_vip = format!("{VIP}:8081");
    until_connects(&f, &new_vip, 20, "fixed service on :8081", |r| {
        r.failed == 0 && r.names.len() == 3
    });
    wait_not_rejected(&f, file);
    // Port 80 is no longer a service: nothing answers there any more.
    until_connects(&f, &f.vip_tcp(), 2, "old port 80 gone", |r| r.ok == 0);
    assert_well_formed(&malformed);
}

#[test]
fn duplicate_object_in_another_file_is_kept_out() {
    if !require_privileged("duplicate_object_in_another_file_is_kept_out") {
        return;
    }
    let mut f = fixture("src-duplicate", LbOptions::default());
    let mut malformed = Vec::new();
    let e0 = metrics(&f).value("sinew_source_errors_total", &[]);
    // Same namespace/name as service-web.yaml, different ClusterIP. The file that brings the duplicate is the one
    // rejected; "zz-" also sorts it last, so no ordering rule could pick the original instead.
    let mut dup = service(true);
    dup.cluster_ip = "10.96.0.11".into();
    let file = "zz-duplicate.yaml";
    f.source.write(file, &[dup.to_value()]).expect("write");
    wait_rejected(&f, file, e0, &mut malformed);
    assert_old_state_serves(&mut f, "with a duplicate Service in another file");
    let r = f.connect("10.96.0.11:80", 3, 0, 1000).expect("connect");
    assert_eq!(
        r.ok, 0,
        "the duplicate's ClusterIP must not be served: {r:#?}"
    );

    f.source.remove(file).expect("remove duplicate");
    wait_not_rejected(&f, file);
    assert_old_state_serves(&mut f, "after removing the duplicate");
    assert_well_formed(&malformed);
}
