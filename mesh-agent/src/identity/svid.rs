//! X.509-SVIDs: one per (namespace, service account), signed by the [`Ca`].
//!
//! Profile: a fresh ECDSA P-256 key per SVID; an empty subject with exactly one URI SAN,
//! `spiffe://<td>/ns/<ns>/sa/<sa>`, marked critical (RFC 5280 requires that when the subject is empty);
//! `CA:false`; key usage `digitalSignature`; extended key usage `serverAuth` + `clientAuth`; not-before 5 minutes in
//! the past for clock skew; 24 h lifetime by default, never past the CA's own expiry.

use std::time::{Duration, SystemTime};

use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

use super::IdentityError;
use super::ca::{CLOCK_SKEW, Ca};
use super::spiffe::SpiffeId;

/// The default SVID lifetime.
pub const DEFAULT_SVID_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// Issuance options.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SvidOptions {
    /// From now to not-after. Default 24 h.
    pub lifetime: Duration,
    /// How far before now not-before is set, for clock skew between nodes. Default 5 min.
    pub backdate: Duration,
}

/// The shortest lifetime issued: renewal at half-life must leave time for handshakes in between.
pub const MIN_LIFETIME: Duration = Duration::from_secs(10);

impl SvidOptions {
    /// `lifetime`, backdated by the usual clock skew allowance, or by a tenth of the lifetime when that is less
    /// (a short-lived SVID backdated by 5 minutes would be due for renewal the moment it is issued).
    pub fn with_lifetime(lifetime: Duration) -> SvidOptions {
        SvidOptions {
            lifetime,
            backdate: CLOCK_SKEW.min(lifetime / 10),
        }
    }
}

impl Default for SvidOptions {
    fn default() -> Self {
        SvidOptions {
            lifetime: DEFAULT_SVID_LIFETIME,
            backdate: CLOCK_SKEW,
        }
    }
}

/// An issued SVID: the chain to present (leaf, then the CA), its private key, and its validity.
pub struct Svid {
    pub id: SpiffeId,
    /// Leaf first, then the CA certificate.
    pub chain: Vec<CertificateDer<'static>>,
    /// Not-before as written in the certificate (whole seconds).
    pub not_before: SystemTime,
    /// Not-after as written in the certificate (whole seconds).
    pub not_after: SystemTime,
    key_pkcs8: Vec<u8>,
    key_pem: String,
    cert_pem: String,
}

impl std::fmt::Debug for Svid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Svid")
            .field("id", &self.id)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Clone for Svid {
    fn clone(&self) -> Self {
        Svid {
            id: self.id.clone(),
            chain: self.chain.clone(),
            not_before: self.not_before,
            not_after: self.not_after,
            key_pkcs8: self.key_pkcs8.clone(),
            key_pem: self.key_pem.clone(),
            cert_pem: self.cert_pem.clone(),
        }
    }
}

impl Svid {
    /// The leaf certificate.
    pub fn leaf(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }

    /// The private key, PKCS#8, as rustls takes it.
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_pkcs8.clone()))
    }

    /// The private key as PKCS#8 PEM.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// The leaf certificate as PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// When to renew: half-way between not-before and not-after.
    pub fn renew_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + life / 2
    }

    /// Whether `now` is at or past [`Svid::renew_at`].
    pub fn needs_renewal(&self, now: SystemTime) -> bool {
        now >= self.renew_at()
    }
}

impl Ca {
    /// Issues an SVID for `spiffe://<ca trust domain>/ns/<namespace>/sa/<service_account>` with the default options.
    pub fn issue(&self, namespace: &str, service_account: &str) -> Result<Svid, IdentityError> {
        let id = SpiffeId::new(self.trust_domain(), namespace, service_account)?;
        issue(self, &id, SvidOptions::default())
    }
}

/// Issues an SVID for `id`, which must be in the CA's trust domain.
pub fn issue(ca: &Ca, id: &SpiffeId, opts: SvidOptions) -> Result<Svid, IdentityError> {
    if id.trust_domain() != ca.trust_domain() {
        return Err(IdentityError::TrustDomainMismatch {
            ca: ca.trust_domain().to_string(),
            requested: id.trust_domain().to_string(),
        });
    }
    if opts.lifetime < MIN_LIFETIME {
        return Err(IdentityError::InvalidOptions(format!(
            "lifetime {:?} is shorter than {MIN_LIFETIME:?}",
            opts.lifetime
        )));
    }
    let now = OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .expect("0 is a valid nanosecond");
    let ca_not_after = OffsetDateTime::from(ca.not_after());
    let not_after = (now + opts.lifetime).min(ca_not_after);
    let params = leaf_params(vec![id.uri()], now - opts.backdate, not_after)?;
    sign(ca, id.clone(), &params)
}

/// The leaf profile, with `uris` as the URI SANs (one, except in tests that build bad certificates).
pub(crate) fn leaf_params(
    uris: Vec<String>,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<CertificateParams, IdentityError> {
    let mut params = CertificateParams::default();
    // Empty subject: rcgen then marks the SAN extension critical.
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = uris
        .into_iter()
        .map(|u| Ok(SanType::URI(u.try_into()?)))
        .collect::<Result<_, rcgen::Error>>()?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.not_before = not_before;
    params.not_after = not_after;
    Ok(params)
}

/// Signs `params` with the CA and a fresh P-256 key.
pub(crate) fn sign(
    ca: &Ca,
    id: SpiffeId,
    params: &CertificateParams,
) -> Result<Svid, IdentityError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let cert = params.signed_by(&key, ca.issuer())?;
    Ok(Svid {
        id,
        chain: vec![cert.der().clone(), ca.cert_der().clone()],
        not_before: params.not_before.into(),
        not_after: params.not_after.into(),
        key_pkcs8: key.serialize_der(),
        key_pem: key.serialize_pem(),
        cert_pem: cert.pem(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::extensions::{GeneralName, ParsedExtension};

    #[test]
    fn svid_has_the_profile() {
        let ca = Ca::generate("cluster.local").unwrap();
        let before = SystemTime::now();
        let svid = ca.issue("default", "web").unwrap();
        assert_eq!(
            svid.id.to_string(),
            "spiffe://cluster.local/ns/default/sa/web"
        );
        assert_eq!(svid.chain.len(), 2);
        assert_eq!(&svid.chain[1], ca.cert_der());

        let (_, x) = x509_parser::parse_x509_certificate(svid.leaf()).unwrap();
        assert!(x.subject().iter().next().is_none(), "empty subject");
        let san = x.subject_alternative_name().unwrap().unwrap();
        assert!(san.critical, "SAN must be critical with an empty subject");
        let names: Vec<_> = san.value.general_names.iter().collect();
        assert_eq!(names.len(), 1);
        assert!(matches!(
            names[0],
            GeneralName::URI("spiffe://cluster.local/ns/default/sa/web")
        ));
        let bc = x.basic_constraints().unwrap().unwrap().value;
        assert!(!bc.ca);
        let ku = x.key_usage().unwrap().unwrap();
        assert!(ku.critical && ku.value.digital_signature() && !ku.value.key_cert_sign());
        let eku = x.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth && !eku.any);
        assert!(x.extensions().iter().any(|e| matches!(
            e.parsed_extension(),
            ParsedExtension::AuthorityKeyIdentifier(_)
        )));
        assert_eq!(
            x.issuer(),
            x509_parser::parse_x509_certificate(ca.cert_der())
                .unwrap()
                .1
                .subject()
        );
        assert_eq!(
            x.public_key().subject_public_key.data.len(),
            65,
            "uncompressed P-256 point"
        );
        assert_eq!(
            x.public_key()
                .algorithm
                .parameters
                .as_ref()
                .unwrap()
                .as_oid()
                .unwrap()
                .to_id_string(),
            "1.2.840.10045.3.1.7"
        );

        // Validity: not-before about 5 min back, 24 h from issuance.
        let nb = svid.not_before;
        assert!(nb <= before - Duration::from_secs(299) && nb >= before - Duration::from_secs(302));
        assert_eq!(
            svid.not_after.duration_since(nb).unwrap(),
            DEFAULT_SVID_LIFETIME + CLOCK_SKEW
        );
        assert_eq!(x.validity().not_before.timestamp(), unix(nb));
        assert_eq!(x.validity().not_after.timestamp(), unix(svid.not_after));
        // Each SVID has its own key.
        let other = ca.issue("default", "web").unwrap();
        assert_ne!(other.key_pem(), svid.key_pem());
    }

    fn unix(t: SystemTime) -> i64 {
        t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64
    }

    #[test]
    fn renew_at_is_half_life_and_lifetime_is_configurable() {
        let ca = Ca::generate("cluster.local").unwrap();
        let id = SpiffeId::new("cluster.local", "ns1", "sa1").unwrap();
        let opts = SvidOptions {
            lifetime: Duration::from_secs(3600),
            backdate: Duration::from_secs(0),
        };
        let svid = issue(&ca, &id, opts).unwrap();
        assert_eq!(
            svid.not_after.duration_since(svid.not_before).unwrap(),
            Duration::from_secs(3600)
        );
        assert_eq!(svid.renew_at(), svid.not_before + Duration::from_secs(1800));
        assert!(!svid.needs_renewal(svid.not_before + Duration::from_secs(1799)));
        assert!(svid.needs_renewal(svid.renew_at()));

        let short = SvidOptions {
            lifetime: Duration::from_secs(1),
            ..SvidOptions::default()
        };
        assert!(matches!(
            issue(&ca, &id, short),
            Err(IdentityError::InvalidOptions(_))
        ));
        // Never past the CA's expiry.
        let long = SvidOptions {
            lifetime: Duration::from_secs(20 * 365 * 24 * 3600),
            ..SvidOptions::default()
        };
        assert!(issue(&ca, &id, long).unwrap().not_after <= ca.not_after());
    }

    #[test]
    fn issuance_validates_the_id() {
        let ca = Ca::generate("cluster.local").unwrap();
        match ca.issue("Default", "web") {
            Err(IdentityError::SpiffeId(e)) => assert_eq!(e.field, "namespace"),
            other => panic!("{other:?}"),
        }
        match ca.issue("default", "web_1") {
            Err(IdentityError::SpiffeId(e)) => assert_eq!(e.field, "service_account"),
            other => panic!("{other:?}"),
        }
        let foreign = SpiffeId::new("other.td", "default", "web").unwrap();
        let e = issue(&ca, &foreign, SvidOptions::default()).unwrap_err();
        assert!(
            matches!(e, IdentityError::TrustDomainMismatch { .. }),
            "{e}"
        );
    }
}
