//! `mesh-agent run`: install (or adopt) the datapath, then keep the maps in sync with the source.
//!
//! Loop: look at the source (the directory, or the kubernetes watchers' revision) every 200 ms (a change reaches
//! the maps well within 1 s), load it, compute the desired state (pure), apply it with the reconciler. A full resync
//! runs every 30 s even without a change, which repairs drift (someone deleting an entry by hand). A failed apply is
//! retried on the next tick; the maps keep the last good state in the meantime.

use std::{
    sync::{Arc, Mutex, atomic::Ordering},
    time::{Duration, Instant},
};

use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use crate::{
    admin::{self, AdminState},
    config::{Config, SourceSettings},
    datapath::Datapath,
    ebpf::{
        self, Layout, Maps,
        policy::{EventLimits, PolicyMaps, ProxyRedirect},
        reconcile::Reconciler,
    },
    events,
    mesh::MeshRuntime,
    metrics::{Metrics, RejectedLabels, ResultLabel, label_value},
    policy::{
        live::{Applied, PolicyPlane, PolicySettings},
        status::{LeaseSettings, StatusWriter},
    },
    source::{
        Snapshot, SourceError,
        file::{FileSource, Watcher},
        kubernetes::KubeSource,
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
        source = ?cfg.source,
        cgroup_root = %cfg.cgroup_root.display(),
        bpffs_root = %cfg.bpffs_root.display(),
        admin_addr = %cfg.admin_addr,
        log_format = ?cfg.log_format,
        sockmap = cfg.sockmap.enabled,
        sockmap_stream_verdict = cfg.sockmap.stream_verdict,
        "effective configuration"
    );
    if let Some(dir) = cfg.source.dir()
        && !dir.is_dir()
    {
        anyhow::bail!("source-dir {}: not a directory", dir.display());
    }

    let layout = Layout::new(&cfg.bpffs_root);
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    // The watchers start listing at once, while this agent may still wait for the node below.
    let mut input = Input::open(&cfg).await?;
    // One agent per install. A second one (a rolling update's surge pod) asks the one in charge to hand the node
    // over and waits until it has: the old agent stops reconciling and releases the lock, but keeps its proxy
    // serving until it is told to stop, so the node is never without one (see docs/install.md).
    let mut waiting = false;
    let lock = loop {
        if let Some(lock) = ebpf::try_lock_root(&layout)? {
            break lock;
        }
        if !std::mem::replace(&mut waiting, true) {
            warn!(bpffs_root = %layout.root.display(), "another agent holds this install; asking it to hand over");
            ebpf::request_handover(&layout)?;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = sigterm.recv() => return Ok(()),
            _ = sigint.recv() => return Ok(()),
        }
    };
    // Whether this agent asked for it or an earlier one left the request behind, it is answered now.
    ebpf::clear_handover(&layout);
    // Nothing reaches the kernel before every kind has been listed once: a snapshot without pods (or without
    // policies) would be a wrong state, not an early one.
    let mut last_report = Instant::now();
    while !input.synced() {
        if last_report.elapsed() >= Duration::from_secs(5) {
            warn!(waiting_for = ?input.unsynced(), "kubernetes source: waiting for the first complete list");
            last_report = Instant::now();
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = sigterm.recv() => return Ok(()),
            _ = sigint.recv() => return Ok(()),
        }
    }
    // Where the kernel sends enrolled connections: fixed for this agent's life.
    let redirect = cfg
        .proxy
        .as_ref()
        .map_or(ProxyRedirect::default(), |p| ProxyRedirect {
            port: p.outbound_port,
            addr4: Some(p.addr),
            addr6: p.addr6,
        });
    let (report, (datapath, plane)) =
        ebpf::install(&layout, &cfg.cgroup_root, cfg.sockmap, || {
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
                    sockmap: cfg.sockmap.enabled,
                },
            )));
            presync(&mut input, &cfg, &datapath, &plane);
            Ok((datapath, plane))
        })?;
    info!(
        attached = ?report.attached,
        replaced = ?report.replaced,
        detached = ?report.detached,
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
    let mut status_writer = StatusTask::start(&cfg, &input);
    let admin_state = Arc::new(AdminState {
        ready: false.into(),
        metrics: Metrics::new(
            &cfg.node,
            datapath.clone(),
            plane.clone(),
            mesh.as_ref().map(|m| (&m.metrics, m.certs.clone())),
            status_writer.as_ref().map(|w| w.stats.clone()),
        ),
        datapath: datapath.clone(),
        policy: plane.clone(),
        certs: mesh.as_ref().map(|m| m.certs.clone()),
    });
    admin::serve(cfg.admin_addr, admin_state.clone()).await?;
    let events = tokio::spawn(events::run(layout.clone(), admin_state.clone()));

    let mut last_sync: Option<Instant> = None;
    let mut retry = false;
    let mut last_errors: Vec<String> = Vec::new();
    let mut last_policy_warnings: Vec<String> = Vec::new();
    loop {
        // A local pod whose netns cannot be read yet (its sandbox is still being created) is looked at again
        // soon, not only at the next resync: until then it is enforced only at its destinations.
        let netns_pending = (!last_policy_warnings.is_empty() || input.netns_pending())
            && last_sync.is_some_and(|t| t.elapsed() >= NETNS_RETRY);
        let resync = last_sync.is_none_or(|t| t.elapsed() >= RESYNC);
        if resync && last_sync.is_some() && mesh.is_some() {
            // After traffic bursts the proxy's freed buffers stay with the allocator; give them back.
            crate::sys::trim_heap();
        }
        let due = retry || netns_pending || resync || input.changed();
        if due {
            let (snapshot, errors) = input.load();
            if let Some(w) = &status_writer {
                w.changed.send_modify(|n| *n += 1);
            }
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
        if ebpf::handover_requested(&layout) {
            info!(
                "another agent asks for this node: handing over (this agent stops reconciling, its proxy keeps serving until it is told to stop)"
            );
            admin_state.ready.store(false, Ordering::Release);
            events.abort();
            if let Some(w) = status_writer.take() {
                w.stop().await;
            }
            drop(input);
            drop(lock);
            tokio::select! {
                _ = sigterm.recv() => {}
                _ = sigint.recv() => {}
            }
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    if let Some(w) = status_writer {
        w.stop().await;
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

/// The policy status writer's task (kubernetes source only), and how to nudge and stop it.
struct StatusTask {
    /// Its counters, exported as `sinew_policy_status_*`.
    stats: Arc<crate::policy::status::StatusStats>,
    changed: tokio::sync::watch::Sender<u64>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl StatusTask {
    fn start(cfg: &Config, input: &Input) -> Option<StatusTask> {
        let (SourceSettings::Kubernetes(k), Input::Kube(source, client)) = (&cfg.source, input)
        else {
            return None;
        };
        if !k.policy_status {
            return None;
        }
        let mut lease = LeaseSettings::new(&k.lease_namespace, &k.lease_holder);
        lease.name = k.lease_name.clone();
        let (changed, changed_rx) = tokio::sync::watch::channel(0u64);
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let shared = source.shared();
        let writer = StatusWriter::new(client.clone(), lease).with_changes(changed_rx);
        let stats = writer.stats();
        let task = tokio::spawn(writer.run(move || shared.policies(), stop_rx));
        Some(StatusTask {
            stats,
            changed,
            stop,
            task,
        })
    }

    /// Stops writing and releases the lease (bounded: a dead API server does not hold up a shutdown).
    async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(3), self.task).await;
    }
}

/// Where objects come from: the file source or the API server. Both give the same [`Snapshot`].
enum Input {
    File {
        source: FileSource,
        watcher: Watcher,
    },
    Kube(KubeSource, kube::Client),
}

impl Input {
    async fn open(cfg: &Config) -> anyhow::Result<Input> {
        Ok(match &cfg.source {
            SourceSettings::Dir(dir) => Input::File {
                source: FileSource::new(dir),
                watcher: Watcher::new(dir),
            },
            SourceSettings::Kubernetes(k) => {
                let client = crate::source::kubernetes::client(k.kubeconfig.as_deref()).await?;
                info!(
                    "kubernetes source: watching services, endpointslices, pods, namespaces and the mesh resources"
                );
                Input::Kube(
                    KubeSource::start(
                        client.clone(),
                        &cfg.node,
                        cfg.cgroup_root.clone(),
                        k.proc_root.clone(),
                    ),
                    client,
                )
            }
        })
    }

    fn load(&mut self) -> (Snapshot, Vec<SourceError>) {
        match self {
            Input::File { source, .. } => source.load(),
            Input::Kube(k, _) => k.load(),
        }
    }

    fn changed(&mut self) -> bool {
        match self {
            Input::File { watcher, .. } => watcher.changed(),
            Input::Kube(k, _) => k.changed(),
        }
    }

    fn synced(&self) -> bool {
        match self {
            Input::File { .. } => true,
            Input::Kube(k, _) => k.synced(),
        }
    }

    fn unsynced(&self) -> Vec<String> {
        match self {
            Input::File { .. } => Vec::new(),
            Input::Kube(k, _) => k.unsynced(),
        }
    }

    fn netns_pending(&self) -> bool {
        match self {
            Input::File { .. } => false,
            Input::Kube(k, _) => k.netns_pending(),
        }
    }
}

/// One sync before the programs are attached (see `ebpf::install`): on a fresh node the first connection is
/// already judged by the policies in the source. Errors are only logged here; the loop's first pass repeats the
/// sync (then a no-op) and reports them properly.
fn presync(
    input: &mut Input,
    cfg: &Config,
    datapath: &Mutex<Datapath>,
    plane: &Mutex<PolicyPlane>,
) {
    let (snapshot, errors) = input.load();
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
