//! Helpers shared by the agent end-to-end test binaries.
// Each test binary uses a different subset.
#![allow(dead_code)]

use std::time::Duration;

use sinew_tests::scenario::{LbFixture, LbOptions, SERVICE};
use sinew_tests::testpod::ConnectReport;
use sinew_tests::{Metrics, testpod_bin};

/// Builds the standard scenario or panics with the reason (including the agent log tail when it did not start).
pub fn fixture(name: &str, opts: LbOptions) -> LbFixture {
    LbFixture::setup(name, testpod_bin!(), &opts)
        .unwrap_or_else(|e| panic!("{name}: setup failed: {e:#}"))
}

/// Asserts a connect run had no failure, with the whole report on failure.
pub fn assert_all_ok(r: &ConnectReport, what: &str) {
    assert!(
        r.failed == 0 && r.ok == r.attempts && r.attempts > 0,
        "{what}: connects failed: {r:#?}"
    );
}

/// Scrapes `/metrics` or panics.
pub fn metrics(f: &LbFixture) -> Metrics {
    f.agent
        .metrics()
        .unwrap_or_else(|e| panic!("scraping /metrics: {e:#}"))
}

/// `sinew_service_balanced_total` for the scenario's TCP port.
pub fn balanced(m: &Metrics) -> f64 {
    m.value(
        "sinew_service_balanced_total",
        &[("service", &format!("default/{SERVICE}")), ("port", "80")],
    )
}

/// Short bound for "the change is visible within ~1 s" (the contract says 1 s; 3 s leaves room on a loaded box).
pub const CHANGE_BOUND: Duration = Duration::from_secs(3);

/// For failure messages: the series whose name contains `part`, so a renamed or mislabelled metric is obvious.
pub fn series_like(m: &Metrics, part: &str) -> String {
    let found: Vec<String> = m
        .samples
        .iter()
        .filter(|s| s.name.contains(part))
        .map(|s| format!("{}{:?}={}", s.name, s.labels, s.value))
        .collect();
    format!("series named like {part:?}: {found:?}")
}
