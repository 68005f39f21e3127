//! Real in-memory TLS handshakes between the identity configs: the happy path, each rejection with a generated bad
//! certificate (checked from both sides: a client verifying a bad server, a server verifying a bad client), and a
//! TLS 1.2-only peer.

use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, Connection, ServerConfig, ServerConnection};

use super::*;

const TD: &str = "cluster.local";

struct Outcome {
    client: ClientConnection,
    server: ServerConnection,
    client_err: Option<rustls::Error>,
    server_err: Option<rustls::Error>,
}

/// Moves bytes from `from` to `to` until `from` has nothing to send; records `to`'s first error.
fn transfer(
    from: &mut Connection,
    to: &mut Connection,
    to_err: &mut Option<rustls::Error>,
) -> bool {
    let mut buf = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut buf).unwrap();
    }
    if buf.is_empty() || to_err.is_some() {
        return false;
    }
    let mut rd = &buf[..];
    while !rd.is_empty() {
        if to.read_tls(&mut rd).unwrap() == 0 {
            break;
        }
        if let Err(e) = to.process_new_packets() {
            *to_err = Some(e);
            break;
        }
    }
    true
}

fn handshake(client: ClientConfig, server: ServerConfig) -> Outcome {
    let name = ServerName::try_from("sinew.test").unwrap();
    let mut c = Connection::Client(ClientConnection::new(Arc::new(client), name).unwrap());
    let mut s = Connection::Server(ServerConnection::new(Arc::new(server)).unwrap());
    let (mut client_err, mut server_err) = (None, None);
    for _ in 0..32 {
        let a = transfer(&mut c, &mut s, &mut server_err);
        let b = transfer(&mut s, &mut c, &mut client_err);
        if !a && !b {
            break;
        }
    }
    match (c, s) {
        (Connection::Client(client), Connection::Server(server)) => Outcome {
            client,
            server,
            client_err,
            server_err,
        },
        _ => unreachable!(),
    }
}

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new(TD, ns, sa).unwrap()
}

/// An SVID signed by `ca` with `uris` as URI SANs, valid from `nb` to `na` (relative to now), optionally CA:true.
fn crafted(ca: &Ca, uris: &[&str], nb: i64, na: i64, leaf_is_ca: bool) -> Svid {
    testing::crafted(ca, uris, nb, na, leaf_is_ca).unwrap()
}

/// The peer presenting `bad` is refused with `reason`: a client refuses such a server, and a server refuses such a
/// client. `expected` is the identity the client (or server) insists on, if any.
fn assert_refused(ca: &Ca, bad: &Svid, expected: Option<SpiffeId>, reason: &str) {
    let good = ca.issue("default", "good").unwrap();

    // The client verifies a bad server.
    let out = handshake(
        client_config(&good, ca, expected.clone()).unwrap(),
        server_config(bad, ca).unwrap(),
    );
    let err = out.client_err.expect("the client must refuse the server");
    let rej = rejection_of(&err).unwrap_or_else(|| panic!("not a rejection: {err}"));
    assert_eq!(rej.reason(), reason, "client side: {rej}");
    assert!(out.client.is_handshaking());
    // The server hears about it as an alert.
    assert!(
        matches!(
            out.server_err,
            Some(rustls::Error::AlertReceived(
                rustls::AlertDescription::CertificateUnknown
            ))
        ),
        "{:?}",
        out.server_err
    );

    // The server verifies a bad client.
    let bundle = TrustBundle::from_ca(ca).unwrap();
    let provider = verify::provider();
    let verifier = verify::SpiffeClientVerifier::new(bundle, expected, &provider);
    let server = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(good.chain.clone(), good.key())
        .unwrap();
    let out = handshake(client_config(bad, ca, None).unwrap(), server);
    let err = out.server_err.expect("the server must refuse the client");
    let rej = rejection_of(&err).unwrap_or_else(|| panic!("not a rejection: {err}"));
    assert_eq!(rej.reason(), reason, "server side: {rej}");
    assert!(
        matches!(
            out.client_err,
            Some(rustls::Error::AlertReceived(
                rustls::AlertDescription::CertificateUnknown
            ))
        ),
        "{:?}",
        out.client_err
    );
    assert!(Rejection::REASONS.contains(&reason));
}

#[test]
fn mutual_tls13_handshake_each_side_learns_the_other() {
    let ca = Ca::generate(TD).unwrap();
    let client_svid = ca.issue("shop", "frontend").unwrap();
    let server_svid = ca.issue("shop", "backend").unwrap();
    for expected in [None, Some(server_svid.id.clone())] {
        let out = handshake(
            client_config(&client_svid, &ca, expected).unwrap(),
            server_config(&server_svid, &ca).unwrap(),
        );
        assert!(out.client_err.is_none() && out.server_err.is_none());
        assert!(!out.client.is_handshaking() && !out.server.is_handshaking());
        assert_eq!(
            out.client.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        assert_eq!(
            out.server.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        assert_eq!(peer_spiffe_id(&out.server).unwrap(), client_svid.id);
        assert_eq!(peer_spiffe_id(&out.client).unwrap(), server_svid.id);
    }
}

#[test]
fn a_ca_loaded_from_disk_interoperates_with_the_original() {
    let dir = ca::tests::TempDir::new();
    let (ca, _) = Ca::load_or_generate(&dir.0, TD).unwrap();
    let (loaded, src) = Ca::load_or_generate(&dir.0, TD).unwrap();
    assert_eq!(src, CaSource::Loaded);
    // An SVID signed by the reloaded CA is trusted through the original, and the other way round.
    let a = loaded.issue("a", "a").unwrap();
    let b = ca.issue("b", "b").unwrap();
    let out = handshake(
        client_config(&a, &ca, None).unwrap(),
        server_config(&b, &loaded).unwrap(),
    );
    assert!(
        out.client_err.is_none() && out.server_err.is_none(),
        "{:?} {:?}",
        out.client_err,
        out.server_err
    );
    assert_eq!(peer_spiffe_id(&out.server).unwrap(), a.id);
}

#[test]
fn refuses_an_unknown_ca() {
    let ca = Ca::generate(TD).unwrap();
    // Same trust domain, so the same subject name: only the key differs.
    let other = Ca::generate(TD).unwrap();
    let bad = other.issue("default", "intruder").unwrap();
    assert_refused(&ca, &bad, None, "unknown_ca");
}

#[test]
fn refuses_a_wrong_trust_domain() {
    let ca = Ca::generate(TD).unwrap();
    let bad = crafted(
        &ca,
        &["spiffe://evil.example/ns/default/sa/web"],
        -300,
        3600,
        false,
    );
    assert_refused(&ca, &bad, None, "wrong_trust_domain");
}

#[test]
fn refuses_an_expired_certificate() {
    let ca = Ca::generate(TD).unwrap();
    let bad = crafted(
        &ca,
        &["spiffe://cluster.local/ns/default/sa/web"],
        -7200,
        -3600,
        false,
    );
    assert_refused(&ca, &bad, None, "expired");
}

#[test]
fn refuses_a_certificate_not_yet_valid() {
    let ca = Ca::generate(TD).unwrap();
    let bad = crafted(
        &ca,
        &["spiffe://cluster.local/ns/default/sa/web"],
        3600,
        7200,
        false,
    );
    assert_refused(&ca, &bad, None, "not_yet_valid");
}

#[test]
fn refuses_several_uri_sans() {
    let ca = Ca::generate(TD).unwrap();
    let bad = crafted(
        &ca,
        &[
            "spiffe://cluster.local/ns/default/sa/web",
            "spiffe://cluster.local/ns/kube-system/sa/admin",
        ],
        -300,
        3600,
        false,
    );
    assert_eq!(spiffe_id_of(bad.leaf()), Err(Rejection::MultipleUriSans(2)));
    assert_refused(&ca, &bad, None, "multiple_uri_sans");
}

#[test]
fn refuses_a_leaf_with_the_ca_flag() {
    let ca = Ca::generate(TD).unwrap();
    let bad = crafted(
        &ca,
        &["spiffe://cluster.local/ns/default/sa/web"],
        -300,
        3600,
        true,
    );
    assert_refused(&ca, &bad, None, "leaf_is_ca");
}

#[test]
fn refuses_a_spiffe_id_other_than_the_expected_one() {
    let ca = Ca::generate(TD).unwrap();
    let bad = ca.issue("default", "impostor").unwrap();
    assert_refused(&ca, &bad, Some(id("default", "web")), "spiffe_id_mismatch");
}

#[test]
fn refuses_no_uri_san_and_a_malformed_spiffe_id() {
    let ca = Ca::generate(TD).unwrap();
    let bad = crafted(&ca, &[], -300, 3600, false);
    assert_refused(&ca, &bad, None, "no_uri_san");
    let bad = crafted(
        &ca,
        &["spiffe://cluster.local/workload/web"],
        -300,
        3600,
        false,
    );
    assert_refused(&ca, &bad, None, "malformed_spiffe_id");
}

#[test]
fn refuses_a_tls12_only_peer() {
    let ca = Ca::generate(TD).unwrap();
    let a = ca.issue("default", "a").unwrap();
    let b = ca.issue("default", "b").unwrap();
    let tls12 = || {
        ClientConfig::builder_with_provider(verify::provider())
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
    };
    let bundle = TrustBundle::from_ca(&ca).unwrap();

    // A TLS 1.2-only client (with the very same verifier and a valid SVID) against our server.
    let verifier = verify::SpiffeServerVerifier::new(bundle.clone(), None, &verify::provider());
    let client = tls12()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(a.chain.clone(), a.key())
        .unwrap();
    let out = handshake(client, server_config(&b, &ca).unwrap());
    let err = out.server_err.expect("the server must refuse TLS 1.2");
    assert!(matches!(err, rustls::Error::PeerIncompatible(_)), "{err:?}");
    assert!(out.client_err.is_some());

    // Our client against a TLS 1.2-only server.
    let verifier = verify::SpiffeClientVerifier::new(bundle, None, &verify::provider());
    let server = ServerConfig::builder_with_provider(verify::provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(b.chain.clone(), b.key())
        .unwrap();
    let out = handshake(client_config(&a, &ca, None).unwrap(), server);
    let err = out
        .server_err
        .expect("the TLS 1.2 server cannot agree with a TLS 1.3-only client");
    assert!(matches!(err, rustls::Error::PeerIncompatible(_)), "{err:?}");
    let err = out.client_err.expect("the client must fail");
    assert!(
        matches!(
            err,
            rustls::Error::AlertReceived(rustls::AlertDescription::ProtocolVersion)
        ),
        "{err:?}"
    );
    assert!(out.client.is_handshaking());
}
