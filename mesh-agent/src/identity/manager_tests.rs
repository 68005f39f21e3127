//! The SVID manager: issuance on demand and by `ensure`, forgetting, renewal at half-life under real TLS 1.3
//! connections over an in-memory duplex (open connections keep working, new handshakes present the new SVIDs), the
//! client refusing a server that is not the proxy identity, the `status` listing, and duration parsing.

use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, CommonState, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

use super::*;
use crate::identity::ca::tests::TempDir;
use crate::identity::verify::{peer_spiffe_id, rejection_of};

const TD: &str = "cluster.local";

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new(TD, ns, sa).unwrap()
}

fn proxy_id() -> SpiffeId {
    id("sinew-system", "sinew-agent")
}

/// No backdate, so half-life is exactly `lifetime / 2` after issuance.
fn opts(lifetime_secs: u64) -> SvidOptions {
    SvidOptions {
        lifetime: Duration::from_secs(lifetime_secs),
        backdate: Duration::ZERO,
    }
}

fn manager(lifetime_secs: u64) -> CertManager {
    CertManager::new(Ca::generate(TD).unwrap(), opts(lifetime_secs), proxy_id()).unwrap()
}

fn info(m: &CertManager, id: &SpiffeId) -> CertInfo {
    m.certificates()
        .into_iter()
        .find(|c| c.spiffe_id == id.to_string())
        .unwrap_or_else(|| panic!("{id} is not listed"))
}

fn serial(m: &CertManager, id: &SpiffeId) -> String {
    info(m, id).serial
}

/// The serial of the certificate the peer of `conn` presented.
fn peer_serial(conn: &CommonState) -> String {
    cert_facts(&conn.peer_certificates().expect("a peer certificate")[0]).0
}

type Client = client::TlsStream<DuplexStream>;
type Server = server::TlsStream<DuplexStream>;

/// A TLS handshake between the two configs over an in-memory duplex; each side's result.
async fn handshake(
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
) -> (io::Result<Client>, io::Result<Server>) {
    let (c, s) = tokio::io::duplex(64 * 1024);
    let name = ServerName::try_from("sinew-proxy.test").unwrap();
    tokio::join!(
        TlsConnector::from(client).connect(name, c),
        TlsAcceptor::from(server).accept(s)
    )
}

async fn connect(client: Arc<ClientConfig>, server: Arc<ServerConfig>) -> (Client, Server) {
    match handshake(client, server).await {
        (Ok(c), Ok(s)) => (c, s),
        (c, s) => panic!(
            "handshake failed: client {:?}, server {:?}",
            c.err(),
            s.err()
        ),
    }
}

/// Sends `msg` each way and checks it arrives.
async fn exchange(c: &mut Client, s: &mut Server, msg: &[u8]) {
    let mut buf = vec![0; msg.len()];
    c.write_all(msg).await.unwrap();
    c.flush().await.unwrap();
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(buf, msg);
    s.write_all(msg).await.unwrap();
    s.flush().await.unwrap();
    c.read_exact(&mut buf).await.unwrap();
    assert_eq!(buf, msg);
}

/// The rustls error inside a failed tokio-rustls handshake.
fn rustls_error(e: &io::Error) -> &rustls::Error {
    e.get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
        .unwrap_or_else(|| panic!("not a rustls error: {e}"))
}

#[test]
fn issues_on_demand_and_caches_the_client_config() {
    let m = manager(3600);
    assert_eq!(m.held_ids(), vec![proxy_id()]);
    assert_eq!(m.counters().get().issued, 1);
    assert!(Arc::ptr_eq(&m.server_config(), &m.server_config()));

    let web = id("shop", "web");
    let first = m.client_config(&web).unwrap();
    assert_eq!(m.held_ids(), vec![id("shop", "web"), proxy_id()]);
    assert_eq!(m.counters().get().issued, 2);
    let again = m.client_config(&web).unwrap();
    assert!(
        Arc::ptr_eq(&first, &again),
        "the same config for the same source"
    );
    assert_eq!(m.counters().get().issued, 2);
    assert_eq!(first.alpn_protocols, vec![b"h2".to_vec()]);
    assert_eq!(m.server_config().alpn_protocols, vec![b"h2".to_vec()]);

    let foreign = SpiffeId::new("other.td", "shop", "web").unwrap();
    let e = m.client_config(&foreign).unwrap_err();
    assert!(
        matches!(e, IdentityError::TrustDomainMismatch { .. }),
        "{e}"
    );
    assert_eq!(m.counters().get().issuance_failures, 1);
    assert!(!m.held_ids().contains(&foreign));
}

#[test]
fn ensure_issues_the_set_and_forgets_the_rest() {
    let m = manager(3600);
    let (a, b) = (id("shop", "web"), id("shop", "db"));
    assert!(m.ensure([a.clone(), b.clone()]).is_empty());
    assert_eq!(m.held_ids(), vec![b.clone(), a.clone(), proxy_id()]);
    assert_eq!(m.counters().get().issued, 3);
    let b_serial = serial(&m, &b);
    let b_config = m.client_config(&b).unwrap();

    // `a` leaves; `b` is kept as it is (not reissued); the proxy is never forgotten, nor reissued when listed; a
    // foreign ID fails alone.
    let foreign = SpiffeId::new("other.td", "shop", "web").unwrap();
    let errors = m.ensure([b.clone(), proxy_id(), foreign.clone()]);
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].0, foreign);
    assert!(
        matches!(errors[0].1, IdentityError::TrustDomainMismatch { .. }),
        "{}",
        errors[0].1
    );
    assert_eq!(m.held_ids(), vec![b.clone(), proxy_id()]);
    assert_eq!(serial(&m, &b), b_serial);
    assert!(Arc::ptr_eq(&m.client_config(&b).unwrap(), &b_config));
    assert_eq!(m.counters().get().issued, 3);
    assert_eq!(m.counters().get().issuance_failures, 1);

    assert!(m.ensure([]).is_empty());
    assert_eq!(m.held_ids(), vec![proxy_id()]);
    assert!(
        !m.certificates()
            .iter()
            .any(|c| c.role == CertRole::Workload)
    );
    // Coming back means a new SVID.
    assert!(m.ensure([b.clone()]).is_empty());
    assert_ne!(serial(&m, &b), b_serial);
    assert!(!Arc::ptr_eq(&m.client_config(&b).unwrap(), &b_config));
}

#[tokio::test]
async fn renewal_at_half_life_swaps_the_svids_without_breaking_open_connections() {
    let m = manager(60);
    let web = id("shop", "web");
    let client_config = m.client_config(&web).unwrap();
    let server_config = m.server_config();
    let (mut c1, mut s1) = connect(client_config.clone(), server_config.clone()).await;
    exchange(&mut c1, &mut s1, b"before renewal").await;
    let (old_web, old_proxy) = (serial(&m, &web), serial(&m, &proxy_id()));
    assert_eq!(peer_serial(c1.get_ref().1), old_proxy);
    assert_eq!(peer_serial(s1.get_ref().1), old_web);

    // Half-life: 30 s after not-before. Nothing is due a second before it.
    let (web_nb, web_renew) = {
        let held = m.read();
        let svid = &held[&web].svid;
        (svid.not_before, svid.renew_at())
    };
    assert_eq!(web_renew, web_nb + Duration::from_secs(30));
    let first = m.next_renewal().unwrap();
    assert!(first <= web_renew);
    assert_eq!(
        m.renew_due(first - Duration::from_secs(1)),
        RenewReport::default()
    );
    let report = m.renew_due(web_renew);
    assert_eq!(report.renewed, vec![web.clone(), proxy_id()]);
    assert!(report.failed.is_empty());
    assert_eq!(m.counters().get().renewed, 2);
    assert_eq!(m.counters().get().issued, 2, "renewal is not issuance");
    // Issuance is in whole seconds: this renewal may fall in the same second as the first issuance.
    assert!(m.next_renewal().unwrap() >= first);
    let (new_web, new_proxy) = (serial(&m, &web), serial(&m, &proxy_id()));
    assert_ne!(new_web, old_web);
    assert_ne!(new_proxy, old_proxy);

    // The connection made before keeps working, on its old certificates.
    for i in 0..3 {
        exchange(&mut c1, &mut s1, format!("after renewal {i}").as_bytes()).await;
    }
    assert_eq!(peer_serial(c1.get_ref().1), old_proxy);

    // The configs are the same objects; a new handshake through them presents the new SVIDs, both ways.
    assert!(Arc::ptr_eq(&m.client_config(&web).unwrap(), &client_config));
    assert!(Arc::ptr_eq(&m.server_config(), &server_config));
    let (mut c2, mut s2) = connect(client_config, server_config).await;
    exchange(&mut c2, &mut s2, b"new handshake").await;
    assert_eq!(peer_serial(c2.get_ref().1), new_proxy);
    assert_eq!(peer_serial(s2.get_ref().1), new_web);
    assert_eq!(peer_spiffe_id(s2.get_ref().1).unwrap(), web);

    // Forgetting the workload does not break its connections either.
    m.ensure([]);
    exchange(&mut c1, &mut s1, b"after forgetting").await;
    exchange(&mut c2, &mut s2, b"after forgetting").await;
}

#[test]
fn a_failed_renewal_keeps_the_old_svid_and_retries_later() {
    let m = manager(60);
    let web = id("shop", "web");
    assert!(m.ensure([web.clone()]).is_empty());
    let t = m.next_renewal().unwrap() + Duration::from_secs(5);
    let before = (serial(&m, &web), serial(&m, &proxy_id()));

    m.fail_signing.store(true, Ordering::Relaxed);
    let report = m.renew_due(t);
    assert!(report.renewed.is_empty());
    let failed: Vec<_> = report.failed.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(failed, vec![web.clone(), proxy_id()]);
    assert!(
        report.failed[0].1.contains("signing disabled"),
        "{:?}",
        report.failed
    );
    assert_eq!((serial(&m, &web), serial(&m, &proxy_id())), before);
    assert_eq!(m.counters().get().renewal_failures, 2);
    // No retry before RENEWAL_RETRY, and the agent is told when.
    assert_eq!(m.next_renewal(), Some(t + RENEWAL_RETRY));
    assert_eq!(
        m.renew_due(t + RENEWAL_RETRY - Duration::from_secs(1)),
        RenewReport::default()
    );

    m.fail_signing.store(false, Ordering::Relaxed);
    let report = m.renew_due(t + RENEWAL_RETRY);
    assert_eq!(report.renewed, vec![web.clone(), proxy_id()]);
    assert_ne!(serial(&m, &web), before.0);
    assert!(
        m.read().values().all(|h| h.retry_at.is_none()),
        "back on the normal schedule"
    );

    // A failed first issuance is reported per ID; what is held stays.
    m.fail_signing.store(true, Ordering::Relaxed);
    let db = id("shop", "db");
    let errors = m.ensure([web.clone(), db.clone()]);
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].0, db);
    assert_eq!(m.held_ids(), vec![web.clone(), proxy_id()]);
    assert!(m.client_config(&db).is_err());
    assert_eq!(m.counters().get().issuance_failures, 2);
}

#[tokio::test]
async fn the_client_accepts_only_the_proxy_identity() {
    let dir = TempDir::new();
    let load = || Ca::load_or_generate(&dir.0, TD).unwrap().0;
    let node_a = CertManager::new(load(), opts(3600), proxy_id()).unwrap();
    let node_b = CertManager::new(load(), opts(3600), proxy_id()).unwrap();
    let impostor = CertManager::new(load(), opts(3600), id("default", "web")).unwrap();
    let web = id("shop", "web");

    // Another node's proxy, same CA: accepted, TLS 1.3, h2, each side learns the other.
    let (c, s) = connect(node_a.client_config(&web).unwrap(), node_b.server_config()).await;
    assert_eq!(peer_spiffe_id(c.get_ref().1).unwrap(), proxy_id());
    assert_eq!(peer_spiffe_id(s.get_ref().1).unwrap(), web);
    assert_eq!(c.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(
        c.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );

    // A server with a valid SVID of the trust domain that is not the proxy identity: refused.
    let (c, s) = handshake(
        node_a.client_config(&web).unwrap(),
        impostor.server_config(),
    )
    .await;
    let err = c.expect_err("the client must refuse the server");
    let rejection = rejection_of(rustls_error(&err)).expect("a rejection");
    assert_eq!(rejection.reason(), "spiffe_id_mismatch", "{rejection}");
    assert!(s.is_err());

    // A proxy with the right name but another CA: refused.
    let other_ca = manager(3600);
    let (c, _) = handshake(
        node_a.client_config(&web).unwrap(),
        other_ca.server_config(),
    )
    .await;
    let err = c.expect_err("the client must refuse the server");
    assert_eq!(
        rejection_of(rustls_error(&err)).map(|r| r.reason()),
        Some("unknown_ca")
    );
    // And our server refuses a client whose SVID is from another CA (the client trusts our CA, so only the server's
    // check can fail).
    let foreign_svid = Ca::generate(TD).unwrap().issue("shop", "web").unwrap();
    let client = verify::client_config(&foreign_svid, &load(), Some(proxy_id())).unwrap();
    let (_, s) = handshake(Arc::new(client), node_a.server_config()).await;
    let err = s.expect_err("the server must refuse the client");
    assert_eq!(
        rejection_of(rustls_error(&err)).map(|r| r.reason()),
        Some("unknown_ca")
    );
}

#[test]
fn certificates_list_the_ca_the_proxy_and_the_workloads() {
    let m = manager(3600);
    assert!(
        m.ensure([id("shop", "web"), id("auth", "login")])
            .is_empty()
    );
    let certs = m.certificates();
    let roles: Vec<_> = certs.iter().map(|c| c.role).collect();
    assert_eq!(
        roles,
        [
            CertRole::Ca,
            CertRole::Proxy,
            CertRole::Workload,
            CertRole::Workload
        ]
    );
    let ids: Vec<_> = certs.iter().map(|c| c.spiffe_id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "spiffe://cluster.local",
            "spiffe://cluster.local/ns/sinew-system/sa/sinew-agent",
            "spiffe://cluster.local/ns/auth/sa/login",
            "spiffe://cluster.local/ns/shop/sa/web",
        ]
    );
    let mut serials: Vec<_> = certs.iter().map(|c| c.serial.clone()).collect();
    assert!(
        serials
            .iter()
            .all(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit()))
    );
    serials.sort();
    serials.dedup();
    assert_eq!(serials.len(), 4);

    // RFC 3339 UTC, so the strings order like the times.
    let ca = &certs[0];
    assert_eq!(ca.renew_at, None);
    assert!(ca.expires_in_secs > 9 * 365 * 24 * 3600);
    for leaf in &certs[1..] {
        let renew_at = leaf.renew_at.as_deref().unwrap();
        assert!(leaf.not_before.as_str() < renew_at, "{leaf:?}");
        assert!(renew_at < leaf.not_after.as_str(), "{leaf:?}");
        assert!(leaf.not_after < ca.not_after, "{leaf:?}");
        assert!(ca.not_before <= leaf.not_before, "{leaf:?}");
        assert!(
            (3590..=3600).contains(&leaf.expires_in_secs),
            "{}",
            leaf.expires_in_secs
        );
    }

    let json = serde_json::to_value(&certs).unwrap();
    assert_eq!(json[0]["role"], "ca");
    assert_eq!(json[1]["role"], "proxy");
    assert_eq!(json[2]["role"], "workload");
    assert!(json[0]["renew_at"].is_null());
    assert_eq!(
        rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000)),
        "2001-09-09T01:46:40Z"
    );
    assert_eq!(
        secs_between(
            SystemTime::UNIX_EPOCH + Duration::from_secs(10),
            SystemTime::UNIX_EPOCH
        ),
        -10
    );
}

#[test]
fn new_validates_the_options_and_the_proxy_identity() {
    let new = |lifetime: u64, backdate: u64| {
        CertManager::new(
            Ca::generate(TD).unwrap(),
            SvidOptions {
                lifetime: Duration::from_secs(lifetime),
                backdate: Duration::from_secs(backdate),
            },
            proxy_id(),
        )
    };
    // Renewal would be due at once (half-life counted from a not-before 5 minutes back).
    let e = new(300, 300).unwrap_err().to_string();
    assert!(
        e.contains("lifetime 5m is too short") && e.contains("5m10s"),
        "{e}"
    );
    assert!(new(309, 300).is_err());
    assert!(new(310, 300).is_ok());
    // Nothing shorter than 10 s (renewal 5 s after issuance at the earliest).
    assert!(new(9, 0).is_err());
    assert!(new(10, 0).is_ok());

    let m = CertManager::new(
        Ca::generate(TD).unwrap(),
        SvidOptions::default(),
        proxy_id(),
    )
    .unwrap();
    let next = m.next_renewal().unwrap();
    let expected = SystemTime::now() + Duration::from_secs((24 * 3600 - 300) / 2);
    assert!(
        next <= expected && next + Duration::from_secs(5) >= expected,
        "{next:?}"
    );

    let foreign = SpiffeId::new("other.td", "sinew-system", "sinew-agent").unwrap();
    let e = CertManager::new(Ca::generate(TD).unwrap(), opts(3600), foreign).unwrap_err();
    assert!(
        matches!(e, IdentityError::TrustDomainMismatch { .. }),
        "{e}"
    );
}

#[test]
fn parse_duration_accepts_units_and_names_bad_input() {
    let ok = [
        ("24h", 24 * 3600),
        ("90m", 90 * 60),
        ("30s", 30),
        ("1h30m", 5400),
        ("1d12h", 36 * 3600),
        ("2h0m5s", 7205),
        ("0s", 0),
    ];
    for (s, secs) in ok {
        assert_eq!(parse_duration(s), Ok(Duration::from_secs(secs)), "{s}");
    }
    let bad = [
        ("", "empty"),
        ("10", "no unit"),
        ("1x", "unknown unit"),
        ("5ms", "unknown unit"),
        ("h", "expected a number"),
        ("1.5h", "fractions"),
        ("30m1h", "largest first"),
        ("1h1h", "largest first"),
        ("-1h", "expected a number"),
        (" 1h", "expected a number"),
        ("1h ", "expected a number"),
        ("99999999999999999999d", "too large"),
        ("213503982334602d", "too large"),
    ];
    for (s, why) in bad {
        let e = parse_duration(s).expect_err(s);
        assert!(e.contains(&format!("{s:?}")) && e.contains(why), "{s}: {e}");
    }
    for secs in [0, 1, 59, 60, 3600, 5400, 86400, 90061] {
        let d = Duration::from_secs(secs);
        assert_eq!(parse_duration(&format_duration(d)), Ok(d));
    }
    assert_eq!(format_duration(Duration::from_secs(5400)), "1h30m");
    assert_eq!(format_duration(Duration::from_secs(90061)), "1d1h1m1s");
}
