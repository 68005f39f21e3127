//! rustls verifiers for SPIFFE mTLS, and the TLS 1.3-only config builders.
//!
//! Both verifiers run the same checks, in this order:
//! 1. webpki chain validation against the CA (signature path, validity at the handshake time, leaf not a CA,
//!    extended key usage `serverAuth` for a server, `clientAuth` for a client);
//! 2. the leaf has exactly one URI SAN, and it is a well-formed SPIFFE ID;
//! 3. that ID is in the CA's trust domain;
//! 4. if an expected ID was given, it is that ID.
//!
//! A failure is a [`Rejection`] carried inside the rustls error; [`rejection_of`] gets it back, and
//! [`Rejection::reason`] is the stable label for metrics. The server name the client dials is not checked: the
//! SPIFFE ID is the identity.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{
    CryptoProvider, WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature,
};
use rustls::pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, ClientConfig, CommonState, DigitallySignedStruct, DistinguishedName,
    OtherError, ServerConfig, SignatureScheme,
};
use webpki::{EndEntityCert, KeyUsage};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use super::IdentityError;
use super::ca::Ca;
use super::spiffe::{SpiffeId, SpiffeIdError};
use super::svid::Svid;

/// Why a peer certificate was refused. [`Rejection::reason`] is a stable label for metrics.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("the peer sent no certificate")]
    NoCertificate,
    #[error("the certificate is not signed by the trusted CA")]
    UnknownCa,
    #[error("the certificate has expired")]
    Expired,
    #[error("the certificate is not valid yet")]
    NotYetValid,
    #[error("the leaf certificate is a CA (basicConstraints CA:true)")]
    LeafIsCa,
    #[error("the certificate's extended key usage does not allow this role")]
    BadKeyUsage,
    #[error("the certificate chain is invalid: {0}")]
    InvalidChain(String),
    #[error("the certificate cannot be parsed: {0}")]
    BadCertificate(String),
    #[error("the certificate has no URI SAN")]
    NoUriSan,
    #[error("the certificate has {0} URI SANs; an SVID has exactly one")]
    MultipleUriSans(usize),
    #[error("the certificate's URI SAN is not a SPIFFE ID of this mesh: {0}")]
    MalformedSpiffeId(SpiffeIdError),
    #[error("the SPIFFE ID {got} is not in the trust domain {expected:?}")]
    WrongTrustDomain {
        expected: String,
        got: Box<SpiffeId>,
    },
    #[error("the SPIFFE ID {got} is not the expected {expected}")]
    SpiffeIdMismatch {
        expected: Box<SpiffeId>,
        got: Box<SpiffeId>,
    },
}

impl Rejection {
    /// Every reason [`Rejection::reason`] can return, for pre-registering metric labels.
    pub const REASONS: &'static [&'static str] = &[
        "no_certificate",
        "unknown_ca",
        "expired",
        "not_yet_valid",
        "leaf_is_ca",
        "bad_key_usage",
        "invalid_chain",
        "bad_certificate",
        "no_uri_san",
        "multiple_uri_sans",
        "malformed_spiffe_id",
        "wrong_trust_domain",
        "spiffe_id_mismatch",
    ];

    /// A stable snake_case label, for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::NoCertificate => "no_certificate",
            Rejection::UnknownCa => "unknown_ca",
            Rejection::Expired => "expired",
            Rejection::NotYetValid => "not_yet_valid",
            Rejection::LeafIsCa => "leaf_is_ca",
            Rejection::BadKeyUsage => "bad_key_usage",
            Rejection::InvalidChain(_) => "invalid_chain",
            Rejection::BadCertificate(_) => "bad_certificate",
            Rejection::NoUriSan => "no_uri_san",
            Rejection::MultipleUriSans(_) => "multiple_uri_sans",
            Rejection::MalformedSpiffeId(_) => "malformed_spiffe_id",
            Rejection::WrongTrustDomain { .. } => "wrong_trust_domain",
            Rejection::SpiffeIdMismatch { .. } => "spiffe_id_mismatch",
        }
    }

    fn into_rustls(self) -> rustls::Error {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(self))))
    }
}

/// The [`Rejection`] inside a rustls error raised by these verifiers (on the side that verified), if any.
pub fn rejection_of(err: &rustls::Error) -> Option<&Rejection> {
    match err {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(e))) => {
            e.downcast_ref::<Rejection>()
        }
        _ => None,
    }
}

fn map_webpki(e: webpki::Error) -> Rejection {
    use webpki::Error as E;
    match e {
        // A CA with the same name but another key fails on the signature, not on the name.
        E::UnknownIssuer | E::InvalidSignatureForPublicKey => Rejection::UnknownCa,
        E::CertExpired { .. } => Rejection::Expired,
        E::CertNotValidYet { .. } => Rejection::NotYetValid,
        E::CaUsedAsEndEntity => Rejection::LeafIsCa,
        E::RequiredEkuNotFoundContext(_) | E::EmptyEkuExtension => Rejection::BadKeyUsage,
        E::BadDer | E::BadDerTime | E::TrailingData(_) | E::UnsupportedCertVersion => {
            Rejection::BadCertificate(e.to_string())
        }
        other => Rejection::InvalidChain(other.to_string()),
    }
}

/// The URI SANs of a parsed certificate, in order.
pub(crate) fn uri_sans(x509: &X509Certificate<'_>) -> Result<Vec<String>, String> {
    let san = x509
        .subject_alternative_name()
        .map_err(|e| format!("bad subjectAltName ({e})"))?;
    Ok(san
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(u.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// The SPIFFE ID of a certificate: its single URI SAN, parsed. Checks neither the chain nor the trust domain (the
/// verifiers do); meant for a peer certificate after a successful handshake.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, Rejection> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| Rejection::BadCertificate(e.to_string()))?;
    let uris = uri_sans(&x509).map_err(Rejection::BadCertificate)?;
    match uris.as_slice() {
        [] => Err(Rejection::NoUriSan),
        [uri] => SpiffeId::parse(uri).map_err(Rejection::MalformedSpiffeId),
        many => Err(Rejection::MultipleUriSans(many.len())),
    }
}

/// The authenticated SPIFFE ID of the peer of a connection whose handshake completed with these verifiers.
pub fn peer_spiffe_id(conn: &CommonState) -> Result<SpiffeId, Rejection> {
    match conn.peer_certificates() {
        Some([leaf, ..]) => spiffe_id_of(leaf),
        _ => Err(Rejection::NoCertificate),
    }
}

/// What a verifier trusts: the CA certificates (roots) of one trust domain.
#[derive(Clone, Debug)]
pub struct TrustBundle {
    trust_domain: String,
    roots: Arc<[TrustAnchor<'static>]>,
}

impl TrustBundle {
    /// Trusts `ca`'s certificate for its trust domain.
    pub fn from_ca(ca: &Ca) -> Result<TrustBundle, IdentityError> {
        TrustBundle::new(ca.trust_domain(), std::slice::from_ref(ca.cert_der()))
    }

    /// Trusts `roots` for `trust_domain`.
    pub fn new(
        trust_domain: &str,
        roots: &[CertificateDer<'_>],
    ) -> Result<TrustBundle, IdentityError> {
        super::spiffe::validate_trust_domain(trust_domain)?;
        let roots = roots
            .iter()
            .map(|c| {
                webpki::anchor_from_trusted_cert(c)
                    .map(|a| a.to_owned())
                    .map_err(|e| {
                        IdentityError::Tls(rustls::Error::General(format!("bad trust anchor: {e}")))
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TrustBundle {
            trust_domain: trust_domain.to_string(),
            roots: roots.into(),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }
}

/// The checks shared by both verifiers.
#[derive(Debug)]
struct Checker {
    bundle: TrustBundle,
    expected: Option<SpiffeId>,
    algs: WebPkiSupportedAlgorithms,
}

impl Checker {
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: KeyUsage,
    ) -> Result<SpiffeId, Rejection> {
        let ee = EndEntityCert::try_from(end_entity)
            .map_err(|e| Rejection::BadCertificate(e.to_string()))?;
        ee.verify_for_usage(
            self.algs.all,
            &self.bundle.roots,
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(map_webpki)?;
        let id = spiffe_id_of(end_entity)?;
        if id.trust_domain() != self.bundle.trust_domain {
            return Err(Rejection::WrongTrustDomain {
                expected: self.bundle.trust_domain.clone(),
                got: Box::new(id),
            });
        }
        if let Some(expected) = &self.expected {
            if *expected != id {
                return Err(Rejection::SpiffeIdMismatch {
                    expected: Box::new(expected.clone()),
                    got: Box::new(id),
                });
            }
        }
        Ok(id)
    }
}

/// Verifies a server's SVID (used by the client side).
#[derive(Debug)]
pub struct SpiffeServerVerifier(Checker);

impl SpiffeServerVerifier {
    /// `expected`: the only server identity to accept, if given; otherwise any ID in the trust domain.
    pub fn new(bundle: TrustBundle, expected: Option<SpiffeId>, provider: &CryptoProvider) -> Self {
        SpiffeServerVerifier(Checker {
            bundle,
            expected,
            algs: provider.signature_verification_algorithms,
        })
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0
            .check(end_entity, intermediates, now, KeyUsage::server_auth())
            .map(|_| ServerCertVerified::assertion())
            .map_err(Rejection::into_rustls)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.0.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.algs.supported_schemes()
    }
}

/// Verifies a client's SVID (used by the server side). A client certificate is mandatory.
#[derive(Debug)]
pub struct SpiffeClientVerifier(Checker);

impl SpiffeClientVerifier {
    /// `expected`: the only client identity to accept, if given; otherwise any ID in the trust domain (the normal
    /// case: authorization policy decides afterwards, with [`peer_spiffe_id`]).
    pub fn new(bundle: TrustBundle, expected: Option<SpiffeId>, provider: &CryptoProvider) -> Self {
        SpiffeClientVerifier(Checker {
            bundle,
            expected,
            algs: provider.signature_verification_algorithms,
        })
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0
            .check(end_entity, intermediates, now, KeyUsage::client_auth())
            .map(|_| ClientCertVerified::assertion())
            .map_err(Rejection::into_rustls)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.0.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.algs.supported_schemes()
    }
}

/// The crypto provider: rustls on `ring`.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS 1.3-only server config presenting `svid` and requiring a client SVID from `ca`'s trust domain.
pub fn server_config(svid: &Svid, ca: &Ca) -> Result<ServerConfig, IdentityError> {
    let provider = provider();
    let verifier = SpiffeClientVerifier::new(TrustBundle::from_ca(ca)?, None, &provider);
    Ok(ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(svid.chain.clone(), svid.key())?)
}

/// A TLS 1.3-only client config presenting `svid` and accepting a server SVID from `ca`'s trust domain, and only
/// `expected` if given.
pub fn client_config(
    svid: &Svid,
    ca: &Ca,
    expected: Option<SpiffeId>,
) -> Result<ClientConfig, IdentityError> {
    let provider = provider();
    let verifier = SpiffeServerVerifier::new(TrustBundle::from_ca(ca)?, expected, &provider);
    Ok(ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(svid.chain.clone(), svid.key())?)
}
