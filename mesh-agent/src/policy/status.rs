//! Writing each AuthorizationPolicy's status subresource, by one agent elected through a Lease.
//!
//! Every agent sees every policy, but only one should write statuses: N agents writing the same status would make
//! N writes per change and fight over `lastTransitionTime`. So the agents elect a writer through a
//! `coordination.k8s.io/v1` Lease (`sinew-policy-status` in the agent's namespace), as client-go's leader election
//! does:
//!
//! ```text
//!  every renew_every (5 s) ──▶ GET lease ──▶ decide() ──▶ Create (POST) / Renew, TakeOver (PUT with
//!                                              │           the resourceVersion read; 409: lost, follow)
//!                                              └──▶ Follow { holder, until }
//!  while leader, each tick and each `changed` signal:
//!      policies() ──▶ desired_status() ──▶ equal to the object's status? skip : PATCH .../{name}/status
//! ```
//!
//! - [`desired_status`] is pure: the per-rule list from [`eval::statuses`], an `Accepted` condition from
//!   [`validate`] and an `Enforced` summary. A condition keeps its `lastTransitionTime` while its status does not
//!   change, so an unchanged policy yields exactly its current status, and no write.
//! - [`decide`] is pure: a lease without holder, or whose `renewTime + leaseDurationSeconds` is past, is free.
//!   Expiry compares the holder's clock with ours, so node clocks must agree to well within
//!   `duration - renew_every` (10 s by default); NTP does that. Two writers for a moment only cost duplicate,
//!   identical writes.
//! - After a write, the object the `policies` closure returns may still carry the old status until the watch
//!   delivers the new one; the writer remembers what it wrote for that object version, so it does not write again.
//! - On stop, the leader releases the lease (empty `holderIdentity`) instead of letting it expire, so another
//!   agent takes over at its next tick (within `renew_every`) instead of after `duration`. A crashed leader is
//!   replaced within `duration + renew_every`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, ObjectMeta, Time};
use k8s_openapi::chrono::{DateTime, SubsecRound, TimeDelta, Utc};
use kube::api::{Api, Patch, PatchParams, PostParams};
use tokio::sync::watch;
use tokio::time::Instant;

use super::eval::{self, RuleStatus};
use super::{Action, AuthorizationPolicy, AuthorizationPolicyStatus, validate};

/// The default name of the Lease.
pub const DEFAULT_LEASE_NAME: &str = "sinew-policy-status";
/// The condition saying whether the policy is valid (and so in force).
pub const CONDITION_ACCEPTED: &str = "Accepted";
/// The condition summarizing how the policy's rules are enforced.
pub const CONDITION_ENFORCED: &str = "Enforced";
/// Longer condition messages are cut here, under metav1's `maxLength` of 32768.
const MAX_MESSAGE_CHARS: usize = 32_000;

/// The Lease the agents elect the status writer with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseSettings {
    /// The agent's namespace.
    pub namespace: String,
    /// Default [`DEFAULT_LEASE_NAME`].
    pub name: String,
    /// This agent: its pod's name.
    pub holder: String,
    /// How long a lease lasts without renewal (`leaseDurationSeconds`, rounded up to whole seconds). Default 15 s.
    pub duration: Duration,
    /// How often the lease is read and renewed, and statuses are checked. Default 5 s; must be well below
    /// `duration`.
    pub renew_every: Duration,
}

/// What to do with the Lease, given what it holds now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// There is no lease: create it, held by us.
    Create,
    /// We hold it: renew it.
    Renew,
    /// It is free (no holder) or expired: take it over.
    TakeOver,
    /// Someone else holds it until `until`.
    Follow {
        holder: String,
        until: DateTime<Utc>,
    },
}

/// Counters of the status writer, shared with the metrics.
#[derive(Debug, Default)]
pub struct StatusStats {
    /// Status patches that succeeded.
    pub writes: AtomicU64,
    /// Policies whose status was already the desired one (counted per policy per pass).
    pub skipped: AtomicU64,
    /// Failed API calls: status patches and lease reads or writes (a 404 on a deleted policy is not one).
    pub errors: AtomicU64,
    /// Whether this agent holds the lease.
    pub leader: AtomicBool,
}

/// Elects the status writer and, while elected, writes the statuses. Build it, take [`stats`](Self::stats), then
/// [`run`](Self::run) it.
pub struct StatusWriter {
    client: kube::Client,
    settings: LeaseSettings,
    stats: Arc<StatusStats>,
    changed: Option<watch::Receiver<u64>>,
}

/// What was last written for a policy, and on which version of the object.
struct Written {
    generation: Option<i64>,
    /// The `resourceVersion` of the object the write was computed from: while the closure still returns that
    /// version, the watch has not delivered the write yet and `status` is the current status.
    seen_version: Option<String>,
    status: AuthorizationPolicyStatus,
}

/// The election state and what the loop remembers between passes.
struct Runner {
    leases: Api<Lease>,
    client: kube::Client,
    settings: LeaseSettings,
    stats: Arc<StatusStats>,
    /// While leader: our lease is valid (by our clock) until then.
    leader_until: Option<Instant>,
    /// The holder we last saw, to log changes once.
    last_holder: Option<String>,
    written: BTreeMap<(String, String), Written>,
    /// `verb resource` denied (403) and already logged; cleared by the next success.
    denied: BTreeSet<String>,
}

impl LeaseSettings {
    /// The default lease (`sinew-policy-status`, 15 s, renewed every 5 s) in `namespace`, held as `holder`.
    pub fn new(namespace: &str, holder: &str) -> Self {
        LeaseSettings {
            namespace: namespace.to_string(),
            name: DEFAULT_LEASE_NAME.to_string(),
            holder: holder.to_string(),
            duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
        }
    }

    /// `leaseDurationSeconds`: the duration rounded up to whole seconds, at least 1.
    pub fn duration_seconds(&self) -> i32 {
        let secs = self.duration.as_secs() + u64::from(self.duration.subsec_nanos() > 0);
        i32::try_from(secs).unwrap_or(i32::MAX).max(1)
    }
}

impl StatusWriter {
    /// A writer that checks statuses every `settings.renew_every`.
    pub fn new(client: kube::Client, settings: LeaseSettings) -> Self {
        StatusWriter {
            client,
            settings,
            stats: Arc::default(),
            changed: None,
        }
    }

    /// Also check statuses (when leader) each time `changed` changes: the policy source bumps it on every change,
    /// so a new policy's status is written at once instead of at the next tick.
    pub fn with_changes(mut self, changed: watch::Receiver<u64>) -> Self {
        self.changed = Some(changed);
        self
    }

    /// The counters, to export as metrics.
    pub fn stats(&self) -> Arc<StatusStats> {
        self.stats.clone()
    }

    /// Runs until `stop` is true (or its sender is dropped), then releases the lease if held. `policies` returns
    /// the current objects, with their `status`, `metadata.generation` and `metadata.resourceVersion`.
    pub async fn run<F>(self, policies: F, mut stop: watch::Receiver<bool>)
    where
        F: Fn() -> Vec<AuthorizationPolicy>,
    {
        let StatusWriter {
            client,
            settings,
            stats,
            mut changed,
        } = self;
        if settings.renew_every >= settings.duration {
            tracing::warn!(
                renew_every = ?settings.renew_every,
                duration = ?settings.duration,
                "the status lease is renewed less often than it expires: leadership will flap"
            );
        }
        let mut runner = Runner {
            leases: Api::namespaced(client.clone(), &settings.namespace),
            client,
            settings,
            stats,
            leader_until: None,
            last_holder: None,
            written: BTreeMap::new(),
            denied: BTreeSet::new(),
        };
        let mut next_tick = Instant::now();
        while !*stop.borrow_and_update() {
            tokio::select! {
                r = stop.changed() => {
                    if r.is_err() {
                        break;
                    }
                }
                () = tokio::time::sleep_until(next_tick) => {
                    next_tick = Instant::now() + runner.settings.renew_every;
                    runner.lease_tick().await;
                    if runner.is_leader() {
                        runner.write_statuses(&policies()).await;
                    }
                }
                alive = changed_signal(&mut changed) => {
                    if !alive {
                        changed = None;
                    } else if runner.is_leader() {
                        runner.write_statuses(&policies()).await;
                    }
                }
            }
        }
        runner.release().await;
    }
}

impl Runner {
    fn is_leader(&self) -> bool {
        self.leader_until.is_some_and(|t| Instant::now() < t)
    }

    fn lease_key(&self) -> String {
        format!("{}/{}", self.settings.namespace, self.settings.name)
    }

    /// Reads the lease, acquires or renews it if we can, and updates the leader flag.
    async fn lease_tick(&mut self) {
        let started = Instant::now();
        let now = Utc::now();
        let current = match self.leases.get_opt(&self.settings.name).await {
            Ok(l) => l,
            Err(e) => {
                self.api_error("get", "leases", &self.lease_key(), &e);
                self.update_leader(None);
                return;
            }
        };
        let decision = decide(current.as_ref(), &self.settings.holder, now);
        let Some(lease) = next_lease(&decision, current.as_ref(), &self.settings, now) else {
            if let Decision::Follow { holder, until } = &decision {
                if self.last_holder.as_deref() != Some(holder) {
                    tracing::debug!(lease = %self.lease_key(), %holder, %until, "another agent writes policy statuses");
                    self.last_holder = Some(holder.clone());
                }
            }
            self.leader_until = None;
            self.update_leader(None);
            return;
        };
        let result = match decision {
            Decision::Create => self.leases.create(&PostParams::default(), &lease).await,
            _ => {
                self.leases
                    .replace(&self.settings.name, &PostParams::default(), &lease)
                    .await
            }
        };
        match result {
            Ok(_) => {
                self.denied.remove("write leases");
                self.last_holder = Some(self.settings.holder.clone());
                self.update_leader(Some(started + self.settings.duration));
            }
            // 409 on create (AlreadyExists) or replace (Conflict): another agent wrote it first. Follow; the next
            // tick reads who won.
            Err(kube::Error::Api(r)) if r.code == 409 => {
                tracing::debug!(lease = %self.lease_key(), ?decision, "lost the race for the status lease");
                self.leader_until = None;
                self.update_leader(None);
            }
            Err(e) => {
                let verb = if decision == Decision::Create {
                    "create"
                } else {
                    "update"
                };
                self.api_error(verb, "leases", &self.lease_key(), &e);
                self.update_leader(None);
            }
        }
    }

    /// `Some(until)`: we hold the lease until then. `None`: we do not hold it now; a lease we held stays ours
    /// until its deadline passes (a failed renewal does not end it before then).
    fn update_leader(&mut self, until: Option<Instant>) {
        if until.is_some() {
            self.leader_until = until;
        }
        let leader = self.is_leader();
        let was = self.stats.leader.swap(leader, Ordering::Relaxed);
        if leader && !was {
            tracing::info!(
                lease = %self.lease_key(),
                holder = %self.settings.holder,
                "became the policy status writer"
            );
        } else if !leader && was {
            tracing::info!(
                lease = %self.lease_key(),
                holder = %self.settings.holder,
                "no longer the policy status writer"
            );
            // Another agent writes now: what we wrote says nothing about what it will write.
            self.written.clear();
        }
        if !leader {
            self.leader_until = None;
        }
    }

    /// Writes each policy's desired status where it differs from its current one.
    async fn write_statuses(&mut self, policies: &[AuthorizationPolicy]) {
        let now = Time(Utc::now());
        let live: BTreeSet<(String, String)> = policies
            .iter()
            .map(|p| (p.namespace().to_string(), p.name().to_string()))
            .collect();
        self.written.retain(|k, _| live.contains(k));
        for policy in policies {
            if policy.name().is_empty() {
                continue;
            }
            let key = (policy.namespace().to_string(), policy.name().to_string());
            let remembered = self.written.get(&key).filter(|w| {
                w.generation == policy.metadata.generation
                    && w.seen_version == policy.metadata.resource_version
            });
            let current = match remembered {
                Some(w) => Some(&w.status),
                None => {
                    self.written.remove(&key);
                    policy.status.as_ref()
                }
            };
            let desired = desired_from(policy, current, now.clone());
            if current == Some(&desired) {
                self.stats.skipped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if !self.is_leader() {
                // The lease ran out during the pass.
                return;
            }
            let api: Api<AuthorizationPolicy> = Api::namespaced(self.client.clone(), &key.0);
            let patch = Patch::Merge(status_patch(&desired));
            match api
                .patch_status(&key.1, &PatchParams::default(), &patch)
                .await
            {
                Ok(_) => {
                    self.stats.writes.fetch_add(1, Ordering::Relaxed);
                    self.denied.remove("patch authorizationpolicies/status");
                    tracing::debug!(
                        policy = %policy.key(),
                        generation = ?policy.metadata.generation,
                        "wrote policy status"
                    );
                    self.written.insert(
                        key,
                        Written {
                            generation: policy.metadata.generation,
                            seen_version: policy.metadata.resource_version.clone(),
                            status: desired,
                        },
                    );
                }
                // Deleted since the closure saw it: nothing to report on.
                Err(kube::Error::Api(r)) if r.code == 404 => {
                    tracing::debug!(policy = %policy.key(), "policy deleted before its status was written");
                }
                Err(e) => {
                    self.api_error("patch", "authorizationpolicies/status", &policy.key(), &e)
                }
            }
        }
    }

    /// Counts and logs a failed call; a 403 is logged as an error once per `verb resource` until it succeeds.
    fn api_error(&mut self, verb: &str, resource: &str, object: &str, e: &kube::Error) {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        let what = format!("{verb} {resource}");
        match e {
            kube::Error::Api(r) if r.code == 403 => {
                // Lease writes share one key: create and update are granted together.
                let key = if resource == "leases" && verb != "get" {
                    "write leases".to_string()
                } else {
                    what.clone()
                };
                if self.denied.insert(key) {
                    tracing::error!(
                        %object,
                        "forbidden: {what}: {}; grant the agent's service account \"{verb}\" on {resource}",
                        r.message
                    );
                } else {
                    tracing::debug!(%object, "forbidden: {what}");
                }
            }
            e => tracing::warn!(%object, "{what}: {e}"),
        }
    }

    /// Gives the lease up, if we hold it, so that another agent takes over at its next tick.
    async fn release(&mut self) {
        if self.stats.leader.load(Ordering::Relaxed) {
            match self.leases.get_opt(&self.settings.name).await {
                Ok(Some(mut lease)) if holder_of(&lease) == self.settings.holder => {
                    let spec = lease.spec.get_or_insert_with(Default::default);
                    spec.holder_identity = Some(String::new());
                    spec.renew_time = Some(MicroTime(Utc::now()));
                    if let Err(e) = self
                        .leases
                        .replace(&self.settings.name, &PostParams::default(), &lease)
                        .await
                    {
                        // It expires by itself.
                        tracing::warn!(lease = %self.lease_key(), "releasing the status lease: {e}");
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(lease = %self.lease_key(), "releasing the status lease: {e}")
                }
            }
        }
        self.leader_until = None;
        self.update_leader(None);
    }
}

/// The status `policy` should have at `now`: how each rule is enforced, `Accepted` and `Enforced` conditions, and
/// `observedGeneration`. A condition whose status is the same as in `policy.status` keeps its
/// `lastTransitionTime`; others get `now` (truncated to seconds, as the API stores it).
pub fn desired_status(policy: &AuthorizationPolicy, now: Time) -> AuthorizationPolicyStatus {
    desired_from(policy, policy.status.as_ref(), now)
}

/// [`desired_status`] with transition times carried over from `current`.
fn desired_from(
    policy: &AuthorizationPolicy,
    current: Option<&AuthorizationPolicyStatus>,
    now: Time,
) -> AuthorizationPolicyStatus {
    let now = Time(now.0.trunc_subsecs(0));
    let generation = policy.metadata.generation;
    let statuses = eval::statuses(policy);
    let mut status = AuthorizationPolicyStatus::from_statuses(&statuses);
    status.observed_generation = generation;
    let condition = |type_: &str, ok: bool, reason: &str, message: String| {
        let status = if ok { "True" } else { "False" };
        let last_transition_time = current
            .and_then(|c| c.condition(type_))
            .filter(|c| c.status == status)
            .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
        Condition {
            type_: type_.to_string(),
            status: status.to_string(),
            reason: reason.to_string(),
            message: truncate(message),
            last_transition_time,
            observed_generation: generation,
        }
    };
    let indexes = |want: fn(&RuleStatus) -> bool| -> Vec<String> {
        statuses
            .iter()
            .enumerate()
            .filter(|(_, s)| want(s))
            .map(|(i, _)| i.to_string())
            .collect()
    };
    let rejected = indexes(|s| matches!(s, RuleStatus::Rejected { .. }));
    let proxied = indexes(|s| matches!(s, RuleStatus::ProxyRequired { .. }));
    match validate(policy) {
        Ok(()) => {
            status.conditions.push(condition(
                CONDITION_ACCEPTED,
                true,
                "Valid",
                "the policy is valid and in force".to_string(),
            ));
        }
        Err(problems) => {
            status.conditions.push(condition(
                CONDITION_ACCEPTED,
                false,
                "Invalid",
                format!(
                    "{problems}. This version of the policy is not in force; the last valid version of this \
                     object, if any, stays in force"
                ),
            ));
        }
    }
    let accepted = status.conditions[0].status == "True";
    let enforced = if !rejected.is_empty() || !accepted {
        let message = if rejected.is_empty() {
            "the policy is not accepted (see the Accepted condition)".to_string()
        } else {
            format!(
                "{} rejected (see status.rules); the policy is not accepted",
                rules_phrase(&rejected, "is", "are")
            )
        };
        condition(CONDITION_ENFORCED, false, "Rejected", message)
    } else if !proxied.is_empty() {
        let consequence = match policy.spec.action {
            Action::Deny => "enforced on their L4 part only, which denies more",
            _ => "they match nothing without it",
        };
        let message = format!(
            "{} the node proxy for L7 fields (see status.rules): {consequence}; the other rules are enforced in \
             the kernel",
            rules_phrase(&proxied, "needs", "need"),
        );
        condition(CONDITION_ENFORCED, true, "ProxyRequired", message)
    } else {
        let message = match statuses.len() {
            0 => "the policy has no rules; it is enforced in the kernel".to_string(),
            n => format!("all {n} rules are enforced in the kernel"),
        };
        condition(CONDITION_ENFORCED, true, "Kernel", message)
    };
    status.conditions.push(enforced);
    status
}

/// A condition message that fits the schema's `maxLength` (a policy with thousands of problems names them all).
fn truncate(mut message: String) -> String {
    if let Some((at, _)) = message.char_indices().nth(MAX_MESSAGE_CHARS) {
        message.truncate(at);
        message.push_str(" ...");
    }
    message
}

/// `rule 2 is` / `rules 1, 3 are`.
fn rules_phrase(indexes: &[String], one: &str, many: &str) -> String {
    match indexes {
        [i] => format!("rule {i} {one}"),
        _ => format!("rules {} {many}", indexes.join(", ")),
    }
}

/// The merge patch that sets `status` to `desired`. A merge patch keeps the keys it does not mention, so every
/// key we own is named (`null` removes it).
fn status_patch(desired: &AuthorizationPolicyStatus) -> serde_json::Value {
    let mut status = serde_json::to_value(desired).unwrap_or_default();
    if let Some(obj) = status.as_object_mut() {
        for key in ["rules", "observedGeneration", "conditions"] {
            obj.entry(key).or_insert(serde_json::Value::Null);
        }
    }
    serde_json::json!({ "status": status })
}

/// Whether and how to acquire the lease `lease` (`None`: it does not exist) as `holder` at `now`.
///
/// A lease with no or an empty `holderIdentity` is free. One held by someone else is expired when
/// `renewTime + leaseDurationSeconds < now` (`acquireTime` stands in for a missing `renewTime`; a missing duration
/// is 0, and a lease without either time is expired).
pub fn decide(lease: Option<&Lease>, holder: &str, now: DateTime<Utc>) -> Decision {
    let Some(lease) = lease else {
        return Decision::Create;
    };
    let current = holder_of(lease);
    if current.is_empty() {
        return Decision::TakeOver;
    }
    if current == holder {
        return Decision::Renew;
    }
    match lease.spec.as_ref().and_then(expiry) {
        Some(until) if until >= now => Decision::Follow {
            holder: current.to_string(),
            until,
        },
        _ => Decision::TakeOver,
    }
}

/// The lease to write for `decision` (`None` for [`Decision::Follow`]), from `current` as read (its
/// `resourceVersion` makes the write fail with 409 if someone else wrote in between).
pub fn next_lease(
    decision: &Decision,
    current: Option<&Lease>,
    settings: &LeaseSettings,
    now: DateTime<Utc>,
) -> Option<Lease> {
    let mut lease = match (decision, current) {
        (Decision::Follow { .. }, _) => return None,
        (Decision::Create, _) | (_, None) => Lease {
            metadata: ObjectMeta {
                name: Some(settings.name.clone()),
                namespace: Some(settings.namespace.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                lease_transitions: Some(0),
                ..Default::default()
            }),
        },
        (_, Some(current)) => current.clone(),
    };
    let spec = lease.spec.get_or_insert_with(Default::default);
    if *decision == Decision::TakeOver && current.is_some() {
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
    }
    if *decision != Decision::Renew {
        spec.acquire_time = Some(MicroTime(now));
    }
    spec.holder_identity = Some(settings.holder.clone());
    spec.lease_duration_seconds = Some(settings.duration_seconds());
    spec.renew_time = Some(MicroTime(now));
    Some(lease)
}

fn holder_of(lease: &Lease) -> &str {
    lease
        .spec
        .as_ref()
        .and_then(|s| s.holder_identity.as_deref())
        .unwrap_or("")
}

/// When a lease held by someone expires.
fn expiry(spec: &LeaseSpec) -> Option<DateTime<Utc>> {
    let renewed = spec.renew_time.as_ref().or(spec.acquire_time.as_ref())?.0;
    let secs = spec.lease_duration_seconds.unwrap_or(0).max(0);
    Some(renewed + TimeDelta::seconds(i64::from(secs)))
}

/// Waits for the next change of `changed`; `false` when its sender is gone. Never returns without a receiver.
async fn changed_signal(changed: &mut Option<watch::Receiver<u64>>) -> bool {
    match changed {
        Some(rx) => rx.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Enforcement;

    fn pol(yaml: &str) -> AuthorizationPolicy {
        let mut p: AuthorizationPolicy =
            serde_yaml::from_str(yaml).unwrap_or_else(|e| panic!("bad test YAML: {e}\n{yaml}"));
        p.metadata.generation = Some(3);
        p
    }

    fn at(secs: i64) -> Time {
        Time(DateTime::from_timestamp(1_700_000_000 + secs, 0).unwrap())
    }

    fn cond<'a>(s: &'a AuthorizationPolicyStatus, t: &str) -> &'a Condition {
        s.condition(t)
            .unwrap_or_else(|| panic!("no {t} condition in {s:#?}"))
    }

    const L4: &str = "
metadata: {name: db, namespace: shop}
spec:
  rules:
  - from: [{source: {principals: [cluster.local/ns/shop/sa/api]}}]
    to: [{operation: {ports: ['5432']}}]
  - from: [{source: {namespaces: [ops]}}]
";

    #[test]
    fn valid_l4_policy_is_accepted_and_kernel_enforced() {
        let s = desired_status(&pol(L4), at(0));
        assert_eq!(s.observed_generation, Some(3));
        assert_eq!(s.rules.len(), 2);
        assert!(
            s.rules
                .iter()
                .all(|r| r.status == Enforcement::KernelEnforced)
        );
        let accepted = cond(&s, CONDITION_ACCEPTED);
        assert_eq!(
            (accepted.status.as_str(), accepted.reason.as_str()),
            ("True", "Valid")
        );
        assert_eq!(accepted.observed_generation, Some(3));
        assert_eq!(accepted.last_transition_time, at(0));
        let enforced = cond(&s, CONDITION_ENFORCED);
        assert_eq!(
            (enforced.status.as_str(), enforced.reason.as_str()),
            ("True", "Kernel")
        );
        assert_eq!(enforced.message, "all 2 rules are enforced in the kernel");
        // Exactly the two conditions, Accepted first.
        let types: Vec<&str> = s.conditions.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, [CONDITION_ACCEPTED, CONDITION_ENFORCED]);
    }

    #[test]
    fn proxy_required_rules_are_listed_by_index() {
        let p = pol("
metadata: {name: web, namespace: shop}
spec:
  rules:
  - from: [{source: {namespaces: [shop]}}]
  - to: [{operation: {methods: [GET]}}]
  - when: [{key: 'request.headers[x]', values: [y]}]
");
        let s = desired_status(&p, at(0));
        assert_eq!(cond(&s, CONDITION_ACCEPTED).status, "True");
        let enforced = cond(&s, CONDITION_ENFORCED);
        assert_eq!(
            (enforced.status.as_str(), enforced.reason.as_str()),
            ("True", "ProxyRequired")
        );
        assert!(
            enforced
                .message
                .starts_with("rules 1, 2 need the node proxy"),
            "{}",
            enforced.message
        );
        assert!(
            enforced.message.contains("match nothing"),
            "{}",
            enforced.message
        );
        assert_eq!(s.rules[1].status, Enforcement::ProxyRequired);
        assert!(s.rules[1].reason.contains("methods"), "{:?}", s.rules[1]);
    }

    #[test]
    fn invalid_policy_is_not_accepted_and_names_the_field() {
        let p = pol("
metadata: {name: bad, namespace: shop}
spec:
  rules:
  - from: [{source: {namespaces: [shop]}}]
  - from: [{source: {ipBlocks: [10.0.0.0/33]}}]
");
        let s = desired_status(&p, at(0));
        let accepted = cond(&s, CONDITION_ACCEPTED);
        assert_eq!(
            (accepted.status.as_str(), accepted.reason.as_str()),
            ("False", "Invalid")
        );
        assert!(
            accepted
                .message
                .contains("spec.rules[1].from[0].source.ipBlocks[0]"),
            "{}",
            accepted.message
        );
        assert!(
            accepted.message.contains("not in force")
                && accepted.message.contains("last valid version"),
            "{}",
            accepted.message
        );
        let enforced = cond(&s, CONDITION_ENFORCED);
        assert_eq!(
            (enforced.status.as_str(), enforced.reason.as_str()),
            ("False", "Rejected")
        );
        assert!(
            enforced.message.starts_with("rule 1 is rejected"),
            "{}",
            enforced.message
        );
        assert_eq!(s.rules[1].status, Enforcement::Rejected);

        // Invalid without any rejected rule (an unknown spec field): still not enforced.
        let s = desired_status(
            &pol("metadata: {name: typo}\nspec: {actions: DENY}\n"),
            at(0),
        );
        assert!(
            cond(&s, CONDITION_ACCEPTED)
                .message
                .contains("spec.actions: unknown field")
        );
        let enforced = cond(&s, CONDITION_ENFORCED);
        assert_eq!(
            (enforced.status.as_str(), enforced.reason.as_str()),
            ("False", "Rejected")
        );
    }

    #[test]
    fn unchanged_policy_keeps_its_status_exactly() {
        let mut p = pol(L4);
        let first = desired_status(&p, at(0));
        p.status = Some(first.clone());
        let again = desired_status(&p, at(100));
        assert_eq!(again, first);
        // Through JSON, as it comes back from the API server.
        let json = serde_json::to_value(&p).unwrap();
        let read: AuthorizationPolicy = serde_json::from_value(json).unwrap();
        assert_eq!(read.status.as_ref(), Some(&first));
        assert_eq!(desired_status(&read, at(200)), first);
    }

    #[test]
    fn transition_time_changes_only_when_the_condition_flips() {
        let mut p = pol(L4);
        p.status = Some(desired_status(&p, at(0)));
        // A new generation that is still valid: new observedGeneration, same transition times.
        p.metadata.generation = Some(4);
        p.spec.rules.pop();
        let s = desired_status(&p, at(50));
        assert_eq!(s.observed_generation, Some(4));
        assert_eq!(cond(&s, CONDITION_ACCEPTED).observed_generation, Some(4));
        assert_eq!(cond(&s, CONDITION_ACCEPTED).last_transition_time, at(0));
        assert_eq!(cond(&s, CONDITION_ENFORCED).last_transition_time, at(0));
        // The reason changes (Kernel -> ProxyRequired) but the status stays True: the time stays too.
        p.status = Some(s);
        p.spec.rules[0].when = vec![serde_json::json!({"key": "k", "values": ["v"]})];
        let s = desired_status(&p, at(60));
        assert_eq!(cond(&s, CONDITION_ENFORCED).reason, "ProxyRequired");
        assert_eq!(cond(&s, CONDITION_ENFORCED).last_transition_time, at(0));
        // Invalid: both flip to False at the new time.
        p.status = Some(s);
        p.spec.action = Action::Unknown("CUSTOM".into());
        let s = desired_status(&p, at(100));
        assert_eq!(cond(&s, CONDITION_ACCEPTED).status, "False");
        assert_eq!(cond(&s, CONDITION_ACCEPTED).last_transition_time, at(100));
        assert_eq!(cond(&s, CONDITION_ENFORCED).last_transition_time, at(100));
        // Sub-second precision is dropped, as the API server stores seconds.
        p.status = None;
        let precise = Time(at(7).0 + TimeDelta::milliseconds(250));
        let s = desired_status(&p, precise);
        assert_eq!(cond(&s, CONDITION_ACCEPTED).last_transition_time, at(7));
    }

    #[test]
    fn status_serializes_leniently() {
        // Old objects (rules only) and nulls read as before.
        let s: AuthorizationPolicyStatus = serde_json::from_value(serde_json::json!({
            "rules": [], "observedGeneration": null, "conditions": null
        }))
        .unwrap();
        assert_eq!(s, AuthorizationPolicyStatus::default());
        // A malformed condition is dropped, the rest is kept.
        let good = desired_status(&pol(L4), at(0));
        let mut json = serde_json::to_value(&good).unwrap();
        json["conditions"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"type": "Broken"}));
        let read: AuthorizationPolicyStatus = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(read, good);
        assert_eq!(
            json["conditions"][0]["lastTransitionTime"],
            "2023-11-14T22:13:20Z"
        );
        // Empty conditions and no generation are not written.
        let plain = serde_json::to_value(AuthorizationPolicyStatus::default()).unwrap();
        assert_eq!(plain, serde_json::json!({"rules": []}));
        // The patch names every key, so a merge patch removes stale ones.
        let patch = status_patch(&AuthorizationPolicyStatus::default());
        assert_eq!(
            patch,
            serde_json::json!({"status": {"rules": [], "observedGeneration": null, "conditions": null}})
        );
    }

    fn now() -> DateTime<Utc> {
        at(1000).0
    }

    fn lease(holder: Option<&str>, renewed_ago: i64, duration: i32) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some(DEFAULT_LEASE_NAME.into()),
                namespace: Some("sinew-system".into()),
                resource_version: Some("7".into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_string),
                lease_duration_seconds: Some(duration),
                acquire_time: Some(MicroTime(now() - TimeDelta::seconds(500))),
                renew_time: Some(MicroTime(now() - TimeDelta::seconds(renewed_ago))),
                lease_transitions: Some(4),
                ..Default::default()
            }),
        }
    }

    fn settings() -> LeaseSettings {
        LeaseSettings::new("sinew-system", "agent-a")
    }

    #[test]
    fn decide_without_a_lease_creates_it() {
        assert_eq!(decide(None, "agent-a", now()), Decision::Create);
        let l = next_lease(&Decision::Create, None, &settings(), now()).unwrap();
        assert_eq!(l.metadata.name.as_deref(), Some(DEFAULT_LEASE_NAME));
        assert_eq!(l.metadata.namespace.as_deref(), Some("sinew-system"));
        assert_eq!(l.metadata.resource_version, None);
        let spec = l.spec.unwrap();
        assert_eq!(spec.holder_identity.as_deref(), Some("agent-a"));
        assert_eq!(spec.lease_duration_seconds, Some(15));
        assert_eq!(spec.acquire_time, Some(MicroTime(now())));
        assert_eq!(spec.renew_time, Some(MicroTime(now())));
        assert_eq!(spec.lease_transitions, Some(0));
    }

    #[test]
    fn decide_renews_our_own_lease() {
        // Even past its expiry: nobody took it.
        for ago in [1, 100] {
            let l = lease(Some("agent-a"), ago, 15);
            assert_eq!(decide(Some(&l), "agent-a", now()), Decision::Renew);
        }
        let l = lease(Some("agent-a"), 1, 15);
        let next = next_lease(&Decision::Renew, Some(&l), &settings(), now()).unwrap();
        assert_eq!(next.metadata.resource_version.as_deref(), Some("7"));
        let spec = next.spec.unwrap();
        assert_eq!(spec.renew_time, Some(MicroTime(now())));
        assert_eq!(spec.acquire_time, l.spec.as_ref().unwrap().acquire_time);
        assert_eq!(spec.lease_transitions, Some(4));
    }

    #[test]
    fn decide_follows_a_live_lease_of_another() {
        let l = lease(Some("agent-b"), 10, 15);
        assert_eq!(
            decide(Some(&l), "agent-a", now()),
            Decision::Follow {
                holder: "agent-b".into(),
                until: now() + TimeDelta::seconds(5)
            }
        );
        assert_eq!(
            next_lease(
                &decide(Some(&l), "agent-a", now()),
                Some(&l),
                &settings(),
                now()
            ),
            None
        );
        // Exactly at the deadline it is still live.
        let l = lease(Some("agent-b"), 15, 15);
        assert!(matches!(
            decide(Some(&l), "agent-a", now()),
            Decision::Follow { .. }
        ));
    }

    #[test]
    fn decide_takes_over_an_expired_lease() {
        let l = lease(Some("agent-b"), 16, 15);
        assert_eq!(decide(Some(&l), "agent-a", now()), Decision::TakeOver);
        let next = next_lease(&Decision::TakeOver, Some(&l), &settings(), now()).unwrap();
        assert_eq!(next.metadata.resource_version.as_deref(), Some("7"));
        let spec = next.spec.unwrap();
        assert_eq!(spec.holder_identity.as_deref(), Some("agent-a"));
        assert_eq!(spec.lease_transitions, Some(5));
        assert_eq!(spec.acquire_time, Some(MicroTime(now())));
        assert_eq!(spec.renew_time, Some(MicroTime(now())));
        // No times at all: expired.
        let mut l = lease(Some("agent-b"), 0, 15);
        let spec = l.spec.as_mut().unwrap();
        (spec.renew_time, spec.acquire_time) = (None, None);
        assert_eq!(decide(Some(&l), "agent-a", now()), Decision::TakeOver);
    }

    #[test]
    fn decide_takes_a_lease_without_holder() {
        for holder in [None, Some("")] {
            let l = lease(holder, 0, 15);
            assert_eq!(decide(Some(&l), "agent-a", now()), Decision::TakeOver);
        }
        let mut l = lease(None, 0, 15);
        l.spec = None;
        assert_eq!(decide(Some(&l), "agent-a", now()), Decision::TakeOver);
        let next = next_lease(&Decision::TakeOver, Some(&l), &settings(), now()).unwrap();
        assert_eq!(next.spec.unwrap().lease_transitions, Some(1));
    }

    #[test]
    fn long_messages_are_cut_to_fit_the_schema() {
        let blocks: Vec<String> = (0..5000).map(|i| format!("bad{i}")).collect();
        let mut p = pol(L4);
        p.spec.rules[1].from.as_mut().unwrap()[0]
            .source
            .as_mut()
            .unwrap()
            .ip_blocks = blocks;
        let s = desired_status(&p, at(0));
        let message = &cond(&s, CONDITION_ACCEPTED).message;
        assert_eq!(message.chars().count(), MAX_MESSAGE_CHARS + 4);
        assert!(message.ends_with(" ..."));
        assert_eq!(truncate("short".into()), "short");
    }

    /// Log output, for the once-per-resource check.
    use crate::testing::LogCapture as Capture;

    fn forbidden(resource: &str) -> kube::Error {
        kube::Error::Api(kube::core::ErrorResponse {
            status: "Failure".into(),
            message: format!("{resource} is forbidden: User cannot patch resource"),
            reason: "Forbidden".into(),
            code: 403,
        })
    }

    #[tokio::test]
    async fn forbidden_is_logged_once_per_verb_and_resource_and_always_counted() {
        let client =
            kube::Client::try_from(kube::Config::new("http://127.0.0.1:9".parse().unwrap()))
                .unwrap();
        let mut runner = Runner {
            leases: Api::namespaced(client.clone(), "sinew-system"),
            client,
            settings: settings(),
            stats: Arc::default(),
            leader_until: None,
            last_holder: None,
            written: BTreeMap::new(),
            denied: BTreeSet::new(),
        };
        let capture = Capture::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(capture.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            for name in ["shop/a", "shop/b", "shop/a"] {
                runner.api_error(
                    "patch",
                    "authorizationpolicies/status",
                    name,
                    &forbidden("authorizationpolicies/status"),
                );
            }
            runner.api_error("get", "leases", "sinew-system/x", &forbidden("leases"));
            // After a success (which clears the entry) it is logged again.
            runner.denied.remove("patch authorizationpolicies/status");
            runner.api_error(
                "patch",
                "authorizationpolicies/status",
                "shop/c",
                &forbidden("authorizationpolicies/status"),
            );
        });
        let logs = capture.text();
        let errors: Vec<&str> = logs.lines().filter(|l| l.contains("ERROR")).collect();
        assert_eq!(errors.len(), 3, "{logs}");
        assert!(
            errors[0].contains("forbidden: patch authorizationpolicies/status")
                && errors[0].contains("shop/a"),
            "{logs}"
        );
        assert!(errors[1].contains("forbidden: get leases"), "{logs}");
        assert!(errors[2].contains("shop/c"), "{logs}");
        assert_eq!(runner.stats.errors.load(Ordering::Relaxed), 5);
    }

    #[test]
    fn lease_duration_rounds_up_to_seconds() {
        let mut s = settings();
        for (d, secs) in [(2000, 2), (2001, 3), (300, 1), (0, 1)] {
            s.duration = Duration::from_millis(d);
            assert_eq!(s.duration_seconds(), secs, "{d} ms");
        }
    }
}
