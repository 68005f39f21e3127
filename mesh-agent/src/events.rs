//! Reads the kernel's policy events (`pol_events`, a ring buffer) and turns each into an explained flow: kept for
//! `/debug/flows` and `mesh-agent flows`, counted in `sinew_policy_denials_total`, and logged.
//!
//! The kernel already rate-limits events per CPU and counts what it drops (`sinew_policy_events_dropped_total`),
//! so this path is bounded under a flood of denials; the log is limited again here, to [`LOG_PER_SEC`] lines a
//! second, with a count of what was left out.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use aya::maps::RingBuf;
use mesh_common::{map_names, policy::PolicyEvent};
use tokio::io::unix::AsyncFd;
use tracing::{info, warn};

use crate::{
    admin::AdminState,
    ebpf::{Layout, open_map},
    metrics::{DenialLabels, label_value},
};

/// Denial log lines per second, at most.
const LOG_PER_SEC: u32 = 10;

/// Runs until the process exits; an error (the map cannot be opened) is logged once: enforcement does not
/// depend on this reader.
pub async fn run(layout: Layout, admin: Arc<AdminState>) {
    if let Err(e) = read(&layout, &admin).await {
        warn!(error = %format!("{e:#}"), "policy events are not read; denials are still enforced and counted");
    }
}

async fn read(layout: &Layout, admin: &AdminState) -> anyhow::Result<()> {
    let ring = RingBuf::try_from(open_map(layout, map_names::POLICY_EVENTS)?)?;
    // `AsyncFd::new` is deprecated for types whose fd could be closed behind tokio's back; the ring owns its fd
    // and lives inside the AsyncFd until both drop together, so that cannot happen here.
    #[allow(deprecated)]
    let mut fd = AsyncFd::new(ring)?;
    let mut window = Instant::now();
    let mut logged = 0u32;
    let mut suppressed = 0u64;
    loop {
        let mut guard = fd.readable_mut().await?;
        let mut events = Vec::new();
        {
            let ring = guard.get_inner_mut();
            while let Some(item) = ring.next() {
                if let Some(ev) = crate::sys::read_record::<PolicyEvent>(&item) {
                    events.push(ev);
                }
            }
        }
        guard.clear_ready();
        for ev in &events {
            let flow = admin
                .policy
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .record(ev);
            if flow.verdict == "deny" {
                admin
                    .metrics
                    .policy_denials
                    .get_or_create(&DenialLabels {
                        direction: flow.direction,
                        proto: flow.proto,
                        source: label_value(&flow.src_identity),
                        destination: label_value(&flow.dst_identity),
                    })
                    .inc();
            }
            if window.elapsed() >= Duration::from_secs(1) {
                if suppressed > 0 {
                    info!(
                        suppressed,
                        "policy verdict log lines left out in the last second"
                    );
                }
                window = Instant::now();
                logged = 0;
                suppressed = 0;
            }
            if logged < LOG_PER_SEC {
                logged += 1;
                info!(
                    verdict = flow.verdict,
                    audit = flow.audit,
                    direction = flow.direction,
                    proto = flow.proto,
                    src = %flow.src,
                    dst = %flow.dst,
                    src_identity = %flow.src_identity,
                    dst_identity = %flow.dst_identity,
                    dst_workload = flow.dst_workload.as_deref().unwrap_or("-"),
                    policy = flow.policy.as_deref().unwrap_or("-"),
                    rule = ?flow.rule,
                    reason = %flow.reason,
                    "policy verdict"
                );
            } else {
                suppressed += 1;
            }
        }
    }
}
