//! `mesh-agent run`: install (or adopt) the datapath, then keep the maps in sync with the source.
//!
//! Loop: poll the source directory every 200 ms (a change reaches the maps well within 1 s), load it, compute the
//! desired state (pure), apply it with the reconciler. A full resync runs every 30 s even without a change, which
//! repairs drift (someone deleting an entry by hand). A failed apply is retried on the next tick; the maps keep the
//! last good state in the meantime.

use std::{
    sync::{Arc, Mutex, atomic::Ordering},
    time::{Duration, Instant},
};

use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use crate::{
    admin::{self, AdminState},
    config::Config,
    datapath::Datapath,
    ebpf::{
        self, Layout, Maps,
        policy::{EventLimits, PolicyMaps, ProxyRedirect},
        reconcile::Reconciler,
    },
    events,
    mesh::MeshRuntime,
    metrics::{Metrics, RejectedLabels, ResultLabel, label_value},
    policy::live::{Applied, PolicyPlane, PolicySettings},
    source::{
        SourceError,
        file::{FileSource, Watcher},
    },
    state,
};

const POLL: Duration = Duration::from_millis(200);
const RESYNC: Duration = Duration::from_secs(30);
/// How soon a pod whose netns could not be read is tried again.
const NETNS_RETRY: Duration = Duration::from_millis(500);

pub async fn run(cfg: Config) -> anyhow::Result<()> {
    info!(
        node = %cfg.node,
        source_dir = %cfg.source_dir.display(),
        cgroup_root = %cfg.cgroup_root.display(),
        bpffs_root = %cfg.bpffs_root.display(),
        admin_addr = %cfg.admin_addr,
        log_format = ?cfg.log_format,
        "effective configuration"
    );
    if !cfg.source_dir.is_dir() {
        anyhow::bail!("source-dir {}: not a directory", cfg.source_dir.display());
    }

    let layout = Layout::new(&cfg.bpffs_root);
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    // One agent per install. A second one (a rolling update's surge pod, or a mistake) waits, not ready, until the
    // first exits, instead of reconciling the same maps from another point of view.
    let mut waiting = false;
    let _lock = loop {
        if let Some(lock) = ebpf::try_lock_root(&layout)? {
            break lock;
        }
        if !std::mem::replace(&mut waiting, true) {
            warn!(bpffs_root = %layout.root.display(), "another agent holds this install; waiting for it to exit");
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = sigterm.recv() => return Ok(()),
            _ = sigint.recv() => return Ok(()),
        }
    };
    // Where the kernel sends enrolled connections: fixed for this agent's life.
    let redirect = cfg
        .proxy
        .as_ref()
        .map_or(ProxyRedirect::default(), |p| ProxyRedirect {
            port: p.outbound_port,
            addr4: Some(p.addr),
            addr6: p.addr6,
        });
    let (report, (datapath, plane)) = ebpf::install(&layout, &cfg.cgroup_root, || {
        let datapath = Arc::new(Mutex::new(Datapath::new(Reconciler::new(Maps::open(
            &layout,
        )?)?)));
        let plane = Arc::new(Mutex::new(PolicyPlane::new(
            PolicyMaps::open(&layout)?,
            PolicySettings {
                node: cfg.node.clone(),
                root_namespace: cfg.mesh_root_namespace.clone(),
                trust_domain: cfg.trust_domain.clone(),
                limits: EventLimits {
                    per_sec: cfg.policy_events_per_sec,
                    // A short burst is reported in full; a flood is sampled at the rate.
                    burst: cfg.policy_events_per_sec.clamp(1, 1000),
                },
                proxy: redirect,
            },
        )));
        presync(&cfg, &datapath, &plane);
        Ok((datapath, plane))
    })?;
    info!(
        attached = ?report.attached,
        replaced = ?report.replaced,
        adopted_maps = report.adopted_maps,
        "datapath installed"
    );
    // The node proxy starts after the programs are in: until it listens, a redirected connect is refused at
    // once (nothing listens on the proxy address), never sent elsewhere in plaintext.
    let mesh = match &cfg.proxy {
        Some(settings) => {
            let m = MeshRuntime::start(&cfg, settings, &layout)?;
            info!(
                outbound = %format!("{}:{}", settings.addr, settings.outbound_port),
                inbound_port = settings.inbound_port,
                proxy_identity = %m.certs.proxy_identity().uri(),
                "node proxy listening"
            );
            tokio::spawn(MeshRuntime::renew_loop(m.certs.clone()));
            Some(m)
        }
        None => None,
    };
    let admin_state = Arc::new(AdminState {
        ready: false.into(),
        metrics: Metrics::new(
            &cfg.node,
            datapath.clone(),
            plane.clone(),
            mesh.as_ref().map(|m| (&m.metrics, m.certs.clone())),
        ),
        datapath: datapath.clone(),
        policy: plane.clone(),
        certs: mesh.as_ref().map(|m| m.certs.clone()),
    });
    admin::serve(cfg.admin_addr, admin_state.clone()).await?;
    tokio::spawn(events::run(layout.clone(), admin_state.clone()));

    let mut source = FileSource::new(&cfg.source_dir);
    let mut watcher = Watcher::new(&cfg.source_dir);
    let mut last_sync: Option<Instant> = None;
    let mut retry = false;
    let mut last_errors: Vec<String> = Vec::new();
    let mut last_policy_warnings: Vec<String> = Vec::new();
    loop {
        // A local pod whose netns cannot be read yet (its sandbox is still being created) is looked at again
        // soon, not only at the next resync: until then it is enforced only at its destinations.
        let netns_pending = !last_policy_warnings.is_empty()
            && last_sync.is_some_and(|t| t.elapsed() >= NETNS_RETRY);
        let resync = last_sync.is_none_or(|t| t.elapsed() >= RESYNC);
        if resync && last_sync.is_some() && mesh.is_some() {
            // After traffic bursts the proxy's freed buffers stay with the allocator; give them back.
            crate::sys::trim_heap();
        }
        let due = retry || netns_pending || resync || watcher.changed();
        if due {
            let (snapshot, errors) = source.load();
            report_errors(&admin_state.metrics, &errors, &mut last_errors);
            let desired = state::compute(&snapshot, &cfg.node);
            let result = datapath
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .apply(desired);
            let policy_ok =
                apply_policy(&admin_state, &snapshot, &errors, &mut last_policy_warnings);
            if let Some(m) = &mesh {
                m.update(&snapshot, &cfg.node, &cfg.mesh_root_namespace, &plane);
            }
            let m = &admin_state.metrics;
            let result = match (result, policy_ok) {
                (Ok(ch), true) => Ok(ch),
                (Ok(_), false) => Err(None),
                (Err(e), _) => Err(Some(e)),
            };
            match result {
                Ok(ch) => {
                    m.reconcile
                        .get_or_create(&ResultLabel { result: "ok" })
                        .inc();
                    m.services.set(ch.services as i64);
                    m.backends.set(ch.backends as i64);
                    if ch.upserts + ch.deletes > 0 || last_sync.is_none() {
                        info!(
                            services = ch.services,
                            backends = ch.backends,
                            upserts = ch.upserts,
                            deletes = ch.deletes,
                            "reconciled"
                        );
                    }
                    retry = false;
                    if !admin_state.ready.swap(true, Ordering::AcqRel) {
                        info!("ready: programs attached and first sync in the maps");
                    }
                }
                Err(e) => {
                    m.reconcile
                        .get_or_create(&ResultLabel { result: "error" })
                        .inc();
                    if let Some(e) = e {
                        error!(error = %e, "reconcile failed; the maps keep their last state, retrying");
                    }
                    retry = true;
                }
            }
            last_sync = Some(Instant::now());
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    if let Some(m) = mesh {
        info!("draining the node proxy");
        let cut = tokio::task::spawn_blocking(move || m.drain())
            .await
            .unwrap_or(0);
        info!(cut, "node proxy drained");
    }
    info!(
        "exiting; programs stay attached and maps stay pinned (`mesh-agent uninstall` removes them)"
    );
    Ok(())
}

/// One sync before the programs are attached (see `ebpf::install`): on a fresh node the first connection is
/// already judged by the policies in the source. Errors are only logged here; the loop's first pass repeats the
/// sync (then a no-op) and reports them properly.
fn presync(cfg: &Config, datapath: &Mutex<Datapath>, plane: &Mutex<PolicyPlane>) {
    let (snapshot, errors) = FileSource::new(&cfg.source_dir).load();
    let desired = state::compute(&snapshot, &cfg.node);
    if let Err(e) = datapath
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .apply(desired)
    {
        warn!(error = %e, "pre-attach sync of services failed; retried after attach");
    }
    let result = plane.lock().unwrap_or_else(|e| e.into_inner()).apply(
        &snapshot.authorization_policies,
        &snapshot.pods,
        &snapshot.mesh_inputs(),
        &errors,
    );
    if let Err(e) = result {
        warn!(error = %format!("{e:#}"), "pre-attach sync of policies failed; retried after attach");
    }
}

/// Compiles and applies the snapshot's policies. On failure the previous policy set stays in force in the
/// kernel (nothing is half-applied: see `ebpf::policy`), the error is logged and counted, and `false` makes the
/// loop retry.
fn apply_policy(
    admin: &AdminState,
    snapshot: &crate::source::Snapshot,
    errors: &[SourceError],
    last_warnings: &mut Vec<String>,
) -> bool {
    let mut plane = admin.policy.lock().unwrap_or_else(|e| e.into_inner());
    match plane.apply(
        &snapshot.authorization_policies,
        &snapshot.pods,
        &snapshot.mesh_inputs(),
        errors,
    ) {
        Ok(Applied {
            changes,
            warnings,
            too_large,
        }) => {
            for e in &too_large {
                admin.metrics.policy_errors.inc();
                warn!(error = %e, "policy left out");
            }
            if changes.flipped {
                info!(
                    revision = plane.revision,
                    epoch = changes.epoch,
                    writes = changes.writes,
                    deletes = changes.deletes,
                    policies = snapshot.authorization_policies.len(),
                    "policy in force"
                );
            }
            admin.metrics.policy_revision.set(plane.revision as i64);
            if warnings != *last_warnings {
                for w in &warnings {
                    warn!(warning = %w, "pod not enforced on its client side until its netns can be read");
                }
                *last_warnings = warnings;
            }
            true
        }
        Err(e) => {
            admin.metrics.policy_errors.inc();
            error!(error = %format!("{e:#}"), "policy not applied; the previous policy set stays in force");
            false
        }
    }
}

/// Logs source errors when they change (not on every poll) and mirrors them into metrics.
fn report_errors(metrics: &Metrics, errors: &[SourceError], last: &mut Vec<String>) {
    metrics.source_errors.inc_by(errors.len() as u64);
    metrics.rejected.clear();
    for e in errors {
        metrics
            .rejected
            .get_or_create(&RejectedLabels {
                file: label_value(&e.file.display().to_string()),
                object: label_value(&e.object),
                reason: label_value(&e.reason),
            })
            .set(1);
    }
    let now: Vec<String> = errors.iter().map(ToString::to_string).collect();
    if now != *last {
        for e in &now {
            warn!(error = %e, "rejected source input; its last accepted version (if any) stays in force");
        }
        if now.is_empty() && !last.is_empty() {
            info!("all source errors resolved");
        }
        *last = now;
    }
}
