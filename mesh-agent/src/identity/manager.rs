//! The node agent's SVID manager: holds an SVID for the node proxy's own identity and for each service account of
//! this node's enrolled pods, renews each at half-life, and hands out the rustls configs the proxy uses.
//!
//! Data flow: the agent builds one [`CertManager`] at start (the CA, the `--svid-lifetime`, the proxy's SPIFFE ID),
//! calls [`CertManager::ensure`] with the local service accounts after every source change, and loops on
//! [`CertManager::renew_due`], sleeping until [`CertManager::next_renewal`]. The proxy asks for
//! [`CertManager::server_config`] (the tunnel server, presenting the proxy identity) and
//! [`CertManager::client_config`] per source workload (presenting that workload's SVID, accepting only a server that
//! is the proxy identity). [`CertManager::certificates`] feeds `mesh-agent status` and `/debug/certs`.
//!
//! Renewal never rebuilds a config: each identity has a slot holding its current rustls [`CertifiedKey`], the configs
//! resolve their certificate from that slot at every handshake, and renewal swaps what is in the slot. New handshakes
//! present the new SVID; established connections keep their keys and are not touched.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, SystemTime};

use rustls::client::danger::ServerCertVerifier;
use rustls::client::{ResolvesClientCert, Resumption};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use rustls::server::{ClientHello, NoServerSessionStorage, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ServerConfig, SignatureScheme};
use serde::Serialize;
use time::OffsetDateTime;

use super::IdentityError;
use super::ca::Ca;
use super::spiffe::SpiffeId;
use super::svid::{self, Svid, SvidOptions};
use super::verify::{self, SpiffeClientVerifier, SpiffeServerVerifier, TrustBundle};

/// The shortest time from issuance to renewal the manager accepts. Renewal is at half-life counted from not-before,
/// which is `backdate` in the past, so this requires `lifetime >= backdate + 10 s`. (Issuance itself also refuses a
/// lifetime under 10 s.)
pub const MIN_RENEWAL_INTERVAL: Duration = Duration::from_secs(5);

/// After a failed renewal, how long before [`CertManager::renew_due`] tries that identity again. The old SVID stays
/// in force meanwhile.
pub const RENEWAL_RETRY: Duration = Duration::from_secs(10);

/// The ALPN protocol both configs offer: HBONE is HTTP/2 CONNECT.
pub const ALPN_H2: &[u8] = b"h2";

/// What a held SVID is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CertRole {
    /// The CA that signs the SVIDs (listed by [`CertManager::certificates`], never renewed).
    Ca,
    /// The node proxy's own identity, presented by the tunnel server.
    Proxy,
    /// A local workload's service account, presented by outbound tunnels from that workload.
    Workload,
}

/// One certificate, for `mesh-agent status` and `/debug/certs`. Times are RFC 3339 in UTC, whole seconds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CertInfo {
    pub role: CertRole,
    /// The SPIFFE ID; for the CA, its trust domain as `spiffe://<td>`.
    pub spiffe_id: String,
    /// The certificate serial number, lower-case hex.
    pub serial: String,
    pub not_before: String,
    pub not_after: String,
    /// When the manager renews it; `None` for the CA.
    pub renew_at: Option<String>,
    /// Seconds from now to not-after; negative once expired.
    pub expires_in_secs: i64,
}

/// What one [`CertManager::renew_due`] call did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RenewReport {
    pub renewed: Vec<SpiffeId>,
    /// The identities whose renewal failed, with the error; their old SVIDs stay in force.
    pub failed: Vec<(SpiffeId, String)>,
}

/// Counters for metrics, monotonic.
#[derive(Debug, Default)]
pub struct CertCounters {
    /// SVIDs issued for an identity that was not held (the proxy's at start, then each new workload).
    pub issued: AtomicU64,
    /// SVIDs replaced by renewal.
    pub renewed: AtomicU64,
    /// Renewal attempts that failed.
    pub renewal_failures: AtomicU64,
    /// First issuances that failed (the identity is not held; `ensure` or `client_config` returned the error).
    pub issuance_failures: AtomicU64,
}

/// A snapshot of [`CertCounters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CertCounts {
    pub issued: u64,
    pub renewed: u64,
    pub renewal_failures: u64,
    pub issuance_failures: u64,
}

impl CertCounters {
    pub fn get(&self) -> CertCounts {
        CertCounts {
            issued: self.issued.load(Ordering::Relaxed),
            renewed: self.renewed.load(Ordering::Relaxed),
            renewal_failures: self.renewal_failures.load(Ordering::Relaxed),
            issuance_failures: self.issuance_failures.load(Ordering::Relaxed),
        }
    }

    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// The certified key one identity presents now. The configs' resolvers read it at each handshake; renewal replaces
/// it. A poisoned lock is harmless here (the value is only ever replaced whole), so it is read through.
#[derive(Debug)]
struct KeySlot(RwLock<Arc<CertifiedKey>>);

impl KeySlot {
    fn get(&self) -> Arc<CertifiedKey> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set(&self, key: Arc<CertifiedKey>) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = key;
    }
}

/// Resolves the certificate of both configs from a [`KeySlot`].
#[derive(Debug)]
struct SlotResolver(Arc<KeySlot>);

impl ResolvesClientCert for SlotResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.get())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl ResolvesServerCert for SlotResolver {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.get())
    }
}

/// A newly signed SVID with its rustls key.
struct Fresh {
    svid: Svid,
    key: Arc<CertifiedKey>,
    serial: String,
}

/// One held identity.
struct Held {
    role: CertRole,
    svid: Svid,
    serial: String,
    slot: Arc<KeySlot>,
    /// Built once, presenting whatever is in `slot`.
    client: Arc<ClientConfig>,
    /// Set by a failed renewal: no new attempt before then.
    retry_at: Option<SystemTime>,
}

/// Holds and renews the node's SVIDs and builds the proxy's TLS configs. `Send + Sync`; reads take a read lock and
/// clone an `Arc`. Signing happens outside the locks.
pub struct CertManager {
    ca: Ca,
    opts: SvidOptions,
    proxy_id: SpiffeId,
    provider: Arc<CryptoProvider>,
    /// Shared by every client config: the CA, the trust domain, and only the proxy identity.
    server_verifier: Arc<dyn ServerCertVerifier>,
    server_config: Arc<ServerConfig>,
    ca_serial: String,
    ca_not_before: SystemTime,
    held: RwLock<BTreeMap<SpiffeId, Held>>,
    counters: CertCounters,
    /// Tests make signing fail with this, to exercise the failure paths.
    #[cfg(test)]
    fail_signing: std::sync::atomic::AtomicBool,
}

const _: fn() = || {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<CertManager>();
};

impl std::fmt::Debug for CertManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertManager")
            .field("trust_domain", &self.ca.trust_domain())
            .field("proxy_id", &self.proxy_id)
            .field("held", &self.held_ids())
            .finish_non_exhaustive()
    }
}

impl CertManager {
    /// Issues the proxy identity's SVID and builds the server config. Fails if the options are invalid (see
    /// [`MIN_RENEWAL_INTERVAL`]; issuance also refuses a lifetime under 10 s) or the proxy identity is not in
    /// the CA's trust domain.
    pub fn new(ca: Ca, opts: SvidOptions, proxy_identity: SpiffeId) -> Result<Self, IdentityError> {
        validate_options(opts)?;
        let provider = verify::provider();
        let bundle = TrustBundle::from_ca(&ca)?;
        let server_verifier: Arc<dyn ServerCertVerifier> = Arc::new(SpiffeServerVerifier::new(
            bundle.clone(),
            Some(proxy_identity.clone()),
            &provider,
        ));
        let proxy = hold(
            sign(&ca, opts, &provider, &proxy_identity)?,
            CertRole::Proxy,
            &provider,
            &server_verifier,
        )?;

        let client_verifier = SpiffeClientVerifier::new(bundle, None, &provider);
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(Arc::new(client_verifier))
            .with_cert_resolver(Arc::new(SlotResolver(proxy.slot.clone())));
        server.alpn_protocols = vec![ALPN_H2.to_vec()];
        // No resumption: every handshake checks the peer's current SVID (and presents ours), and tunnels are
        // long-lived HTTP/2 connections, so full handshakes are rare.
        server.session_storage = Arc::new(NoServerSessionStorage {});
        server.send_tls13_tickets = 0;

        let (ca_serial, ca_not_before) = cert_facts(ca.cert_der());
        let counters = CertCounters::default();
        CertCounters::bump(&counters.issued);
        Ok(CertManager {
            ca,
            opts,
            held: RwLock::new(BTreeMap::from([(proxy_identity.clone(), proxy)])),
            proxy_id: proxy_identity,
            provider,
            server_verifier,
            server_config: Arc::new(server),
            ca_serial,
            ca_not_before,
            counters,
            #[cfg(test)]
            fail_signing: Default::default(),
        })
    }

    /// The node proxy's SPIFFE ID.
    pub fn proxy_identity(&self) -> &SpiffeId {
        &self.proxy_id
    }

    /// The trust domain of the CA (and of every SVID held).
    pub fn trust_domain(&self) -> &str {
        self.ca.trust_domain()
    }

    /// The identities an SVID is held for (the proxy's included), sorted.
    pub fn held_ids(&self) -> Vec<SpiffeId> {
        self.read().keys().cloned().collect()
    }

    /// The counters, for metrics.
    pub fn counters(&self) -> &CertCounters {
        &self.counters
    }

    /// The tunnel server's config: presents the proxy identity's current SVID, requires a client SVID from the trust
    /// domain (any identity; authorization decides afterwards), ALPN `h2`, TLS 1.3 only. Always the same `Arc`.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server_config.clone()
    }

    /// The config for tunnels from the workload `source`: presents `source`'s current SVID (issued now if not held
    /// yet), accepts only a server whose SVID is the proxy identity, ALPN `h2`, TLS 1.3 only. The same `Arc` for the
    /// same source until [`CertManager::ensure`] forgets it.
    pub fn client_config(&self, source: &SpiffeId) -> Result<Arc<ClientConfig>, IdentityError> {
        if let Some(held) = self.read().get(source) {
            return Ok(held.client.clone());
        }
        let fresh = self.sign(source).inspect_err(|_| {
            CertCounters::bump(&self.counters.issuance_failures);
        })?;
        let held = self.hold(fresh, CertRole::Workload)?;
        let mut map = self.write();
        // Another caller may have issued it meanwhile; keep theirs, so the config stays the same.
        let held = map.entry(source.clone()).or_insert_with(|| {
            CertCounters::bump(&self.counters.issued);
            held
        });
        Ok(held.client.clone())
    }

    /// Holds an SVID for each of `ids` (issuing those not held yet) and forgets every other workload SVID. The proxy
    /// identity is always kept. Returns the identities that could not be issued, with the error; the others are held
    /// regardless.
    pub fn ensure(
        &self,
        ids: impl IntoIterator<Item = SpiffeId>,
    ) -> Vec<(SpiffeId, IdentityError)> {
        let wanted: BTreeSet<SpiffeId> = ids.into_iter().collect();
        let missing: Vec<SpiffeId> = {
            let map = self.read();
            wanted
                .iter()
                .filter(|id| !map.contains_key(*id))
                .cloned()
                .collect()
        };
        let mut errors = Vec::new();
        let mut fresh = Vec::new();
        for id in missing {
            match self
                .sign(&id)
                .and_then(|f| self.hold(f, CertRole::Workload))
            {
                Ok(held) => fresh.push((id, held)),
                Err(e) => {
                    CertCounters::bump(&self.counters.issuance_failures);
                    errors.push((id, e));
                }
            }
        }
        let mut map = self.write();
        map.retain(|id, held| held.role == CertRole::Proxy || wanted.contains(id));
        for (id, held) in fresh {
            if let std::collections::btree_map::Entry::Vacant(slot) = map.entry(id) {
                slot.insert(held);
                CertCounters::bump(&self.counters.issued);
            }
        }
        errors
    }

    /// Renews every SVID at or past its half-life at `now` (skipping those whose last renewal failed less than
    /// [`RENEWAL_RETRY`] ago). A renewed SVID is presented by the next handshake; established connections are not
    /// touched. On failure the old SVID stays in force and is tried again after [`RENEWAL_RETRY`].
    pub fn renew_due(&self, now: SystemTime) -> RenewReport {
        let due: Vec<SpiffeId> = self
            .read()
            .iter()
            .filter(|(_, h)| h.svid.needs_renewal(now) && h.retry_at.is_none_or(|t| now >= t))
            .map(|(id, _)| id.clone())
            .collect();
        let mut report = RenewReport::default();
        for id in due {
            let result = self.sign(&id);
            let mut map = self.write();
            // Forgotten meanwhile: nothing to renew.
            let Some(held) = map.get_mut(&id) else {
                continue;
            };
            match result {
                Ok(fresh) => {
                    held.slot.set(fresh.key);
                    held.svid = fresh.svid;
                    held.serial = fresh.serial;
                    held.retry_at = None;
                    CertCounters::bump(&self.counters.renewed);
                    report.renewed.push(id);
                }
                Err(e) => {
                    held.retry_at = Some(now + RENEWAL_RETRY);
                    CertCounters::bump(&self.counters.renewal_failures);
                    report.failed.push((id, e.to_string()));
                }
            }
        }
        report
    }

    /// When [`CertManager::renew_due`] next has something to do: the earliest renewal time (or retry time, after a
    /// failure). Possibly in the past. `None` only if nothing is held, which cannot happen (the proxy's SVID is).
    pub fn next_renewal(&self) -> Option<SystemTime> {
        self.read()
            .values()
            .map(|h| match h.retry_at {
                Some(retry) => retry.max(h.svid.renew_at()),
                None => h.svid.renew_at(),
            })
            .min()
    }

    /// The CA, then the proxy's SVID, then the workloads' SVIDs by SPIFFE ID.
    pub fn certificates(&self) -> Vec<CertInfo> {
        let now = SystemTime::now();
        let mut out = vec![CertInfo {
            role: CertRole::Ca,
            spiffe_id: format!("spiffe://{}", self.ca.trust_domain()),
            serial: self.ca_serial.clone(),
            not_before: rfc3339(self.ca_not_before),
            not_after: rfc3339(self.ca.not_after()),
            renew_at: None,
            expires_in_secs: secs_between(now, self.ca.not_after()),
        }];
        let map = self.read();
        let info = |h: &Held| CertInfo {
            role: h.role,
            spiffe_id: h.svid.id.to_string(),
            serial: h.serial.clone(),
            not_before: rfc3339(h.svid.not_before),
            not_after: rfc3339(h.svid.not_after),
            renew_at: Some(rfc3339(h.svid.renew_at())),
            expires_in_secs: secs_between(now, h.svid.not_after),
        };
        out.extend(map.get(&self.proxy_id).map(info));
        out.extend(
            map.values()
                .filter(|h| h.role == CertRole::Workload)
                .map(info),
        );
        out
    }

    /// Signs a new SVID for `id`.
    fn sign(&self, id: &SpiffeId) -> Result<Fresh, IdentityError> {
        #[cfg(test)]
        if self.fail_signing.load(Ordering::Relaxed) {
            return Err(IdentityError::InvalidOptions(
                "signing disabled by the test".into(),
            ));
        }
        sign(&self.ca, self.opts, &self.provider, id)
    }

    fn hold(&self, fresh: Fresh, role: CertRole) -> Result<Held, IdentityError> {
        hold(fresh, role, &self.provider, &self.server_verifier)
    }

    fn read(&self) -> RwLockReadGuard<'_, BTreeMap<SpiffeId, Held>> {
        // Every update leaves the map consistent, so a panic elsewhere while holding the lock is no reason to fail.
        self.held.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, BTreeMap<SpiffeId, Held>> {
        self.held.write().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Signs a new SVID for `id` and loads its key into rustls.
fn sign(
    ca: &Ca,
    opts: SvidOptions,
    provider: &CryptoProvider,
    id: &SpiffeId,
) -> Result<Fresh, IdentityError> {
    let svid = svid::issue(ca, id, opts)?;
    let key = CertifiedKey::from_der(svid.chain.clone(), svid.key(), provider)?;
    let (serial, _) = cert_facts(svid.leaf());
    Ok(Fresh {
        svid,
        key: Arc::new(key),
        serial,
    })
}

/// Puts a fresh SVID in a slot and builds the client config presenting what is in that slot.
fn hold(
    fresh: Fresh,
    role: CertRole,
    provider: &Arc<CryptoProvider>,
    server_verifier: &Arc<dyn ServerCertVerifier>,
) -> Result<Held, IdentityError> {
    let slot = Arc::new(KeySlot(RwLock::new(fresh.key)));
    let mut client = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(server_verifier.clone())
        .with_client_cert_resolver(Arc::new(SlotResolver(slot.clone())));
    client.alpn_protocols = vec![ALPN_H2.to_vec()];
    // As on the server: no resumption, every handshake verifies the current SVIDs.
    client.resumption = Resumption::disabled();
    Ok(Held {
        role,
        svid: fresh.svid,
        serial: fresh.serial,
        slot,
        client: Arc::new(client),
        retry_at: None,
    })
}

/// Refuses options under which an SVID would be due for renewal less than [`MIN_RENEWAL_INTERVAL`] after issuance
/// (or at once: not-before is `backdate` in the past, so half-life comes `(lifetime - backdate) / 2` after issuance).
fn validate_options(opts: SvidOptions) -> Result<(), IdentityError> {
    let min = opts.backdate + 2 * MIN_RENEWAL_INTERVAL;
    if opts.lifetime < min {
        return Err(IdentityError::InvalidOptions(format!(
            "SVID lifetime {} is too short: with not-before {} in the past, renewal at half-life would come less \
             than {} after issuance; use at least {}",
            format_duration(opts.lifetime),
            format_duration(opts.backdate),
            format_duration(MIN_RENEWAL_INTERVAL),
            format_duration(min),
        )));
    }
    Ok(())
}

/// Parses a duration such as `24h`, `90m`, `30s` or `1h30m` (units `d`, `h`, `m`, `s`, largest first, each at most
/// once; whole numbers). For `--svid-lifetime`; the error names the input.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad =
        |why: String| format!("invalid duration {s:?}: {why} (use e.g. 24h, 90m, 30s or 1h30m)");
    if s.is_empty() {
        return Err(bad("it is empty".into()));
    }
    let mut rest = s;
    let mut total: u64 = 0;
    let mut last_rank = None;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad(format!("expected a number at {rest:?}")));
        }
        let (number, tail) = rest.split_at(digits);
        let unit_len = tail.bytes().take_while(u8::is_ascii_alphabetic).count();
        let (unit, tail) = tail.split_at(unit_len);
        let (rank, unit_secs) = match unit {
            "d" => (0, 24 * 3600),
            "h" => (1, 3600),
            "m" => (2, 60),
            "s" => (3, 1),
            "" if tail.starts_with('.') => return Err(bad("fractions are not supported".into())),
            "" => return Err(bad(format!("{number} has no unit (d, h, m or s)"))),
            other => {
                return Err(bad(format!("unknown unit {other:?} (use d, h, m or s)")));
            }
        };
        if last_rank.is_some_and(|last| rank <= last) {
            return Err(bad(
                "units must come largest first (d, h, m, s), each at most once".into(),
            ));
        }
        last_rank = Some(rank);
        total = number
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(unit_secs))
            .and_then(|n| total.checked_add(n))
            .ok_or_else(|| bad("it is too large".into()))?;
        rest = tail;
    }
    Ok(Duration::from_secs(total))
}

/// Formats whole seconds the way [`parse_duration`] reads them: `1h30m`, `24h`, `0s`.
pub fn format_duration(d: Duration) -> String {
    let mut secs = d.as_secs();
    if secs == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    for (unit, size) in [("d", 24 * 3600), ("h", 3600), ("m", 60), ("s", 1)] {
        if secs >= size {
            out.push_str(&format!("{}{unit}", secs / size));
            secs %= size;
        }
    }
    out
}

/// The serial number (lower-case hex) and not-before of a certificate; empty and the epoch if it cannot be parsed
/// (it always can: these are certificates we signed or loaded after parsing).
fn cert_facts(der: &CertificateDer<'_>) -> (String, SystemTime) {
    match x509_parser::parse_x509_certificate(der) {
        Ok((_, x509)) => {
            let serial = x509
                .raw_serial()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            let not_before = SystemTime::UNIX_EPOCH
                + Duration::from_secs(
                    u64::try_from(x509.validity().not_before.timestamp()).unwrap_or(0),
                );
            (serial, not_before)
        }
        Err(_) => (String::new(), SystemTime::UNIX_EPOCH),
    }
}

/// `2025-01-31T12:00:00Z`.
fn rfc3339(t: SystemTime) -> String {
    let t = OffsetDateTime::from(t);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// Whole seconds from `from` to `to`, negative if `to` is earlier.
fn secs_between(from: SystemTime, to: SystemTime) -> i64 {
    match to.duration_since(from) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

#[cfg(test)]
#[path = "manager_tests.rs"]
mod tests;
