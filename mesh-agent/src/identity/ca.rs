//! The CA that signs SVIDs: loaded from a directory holding `ca.crt` and `ca.key` (PEM), or generated (ECDSA P-256,
//! self-signed, `CA:true`, path length 0, 10 years, URI SAN `spiffe://<trust-domain>`) and written into the state
//! directory.

use std::fs::{self, OpenOptions, Permissions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use time::OffsetDateTime;

use super::IdentityError;
use super::spiffe::validate_trust_domain;

/// File name of the CA certificate in a CA directory.
pub const CA_CERT_FILE: &str = "ca.crt";
/// File name of the CA private key (PKCS#8 PEM) in a CA directory.
pub const CA_KEY_FILE: &str = "ca.key";

/// Lifetime of a generated CA.
pub const GENERATED_CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How far in the past certificates start, for clock skew between nodes.
pub const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

/// Where a CA came from, for the start-up log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaSource {
    Loaded,
    Generated,
}

/// A CA: its certificate and its signing key.
pub struct Ca {
    trust_domain: String,
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    not_after: SystemTime,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError {
    let path = path.to_path_buf();
    move |source| IdentityError::Io { op, path, source }
}

fn bad_file(path: &Path, problem: impl Into<String>) -> IdentityError {
    IdentityError::BadFile {
        path: path.to_path_buf(),
        problem: problem.into(),
    }
}

impl Ca {
    /// Generates a new CA for `trust_domain`.
    pub fn generate(trust_domain: &str) -> Result<Ca, IdentityError> {
        validate_trust_domain(trust_domain)?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let now = OffsetDateTime::now_utc()
            .replace_nanosecond(0)
            .expect("0 is a valid nanosecond");
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Sinew");
        dn.push(DnType::CommonName, format!("Sinew mesh CA {trust_domain}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.subject_alt_names =
            vec![SanType::URI(format!("spiffe://{trust_domain}").try_into()?)];
        params.not_before = now - CLOCK_SKEW;
        params.not_after = now + GENERATED_CA_LIFETIME;
        let cert = params.self_signed(&key)?;
        Ok(Ca {
            trust_domain: trust_domain.to_string(),
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            not_after: params.not_after.into(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads `ca.crt` and `ca.key` from `dir`. The certificate must be a CA whose public key matches the key, valid
    /// now, and, if it carries a `spiffe://` URI SAN, that SAN must be `spiffe://<trust_domain>`. Errors name the
    /// file.
    pub fn load(dir: &Path, trust_domain: &str) -> Result<Ca, IdentityError> {
        validate_trust_domain(trust_domain)?;
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let cert_pem = fs::read_to_string(&cert_path).map_err(io_err("reading", &cert_path))?;
        let key_pem = fs::read_to_string(&key_path).map_err(io_err("reading", &key_path))?;

        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| bad_file(&cert_path, format!("no PEM CERTIFICATE block ({e})")))?
            .into_owned();
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| bad_file(&key_path, format!("not a usable PEM private key ({e})")))?;

        let (_, x509) = x509_parser::parse_x509_certificate(&cert_der)
            .map_err(|e| bad_file(&cert_path, format!("not an X.509 certificate ({e})")))?;
        match x509.basic_constraints() {
            Ok(Some(bc)) if bc.value.ca => {}
            Ok(_) => {
                return Err(bad_file(
                    &cert_path,
                    "not a CA certificate (basicConstraints CA is not set)",
                ));
            }
            Err(e) => return Err(bad_file(&cert_path, format!("bad basicConstraints ({e})"))),
        }
        if x509.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(bad_file(
                &key_path,
                format!(
                    "the key does not match the certificate in {}",
                    cert_path.display()
                ),
            ));
        }
        let not_after = SystemTime::UNIX_EPOCH
            + Duration::from_secs(
                u64::try_from(x509.validity().not_after.timestamp()).unwrap_or(0),
            );
        if not_after <= SystemTime::now() {
            return Err(bad_file(
                &cert_path,
                format!(
                    "the CA certificate expired at {}",
                    x509.validity().not_after
                ),
            ));
        }
        let uris = super::verify::uri_sans(&x509).map_err(|e| bad_file(&cert_path, e))?;
        let expected = format!("spiffe://{trust_domain}");
        if let Some(other) = uris
            .iter()
            .find(|u| u.starts_with("spiffe://") && **u != expected)
        {
            return Err(bad_file(
                &cert_path,
                format!("the CA is for {other:?}, not the trust domain {trust_domain:?}"),
            ));
        }
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)
            .map_err(|e| bad_file(&cert_path, format!("cannot sign with this CA ({e})")))?;
        Ok(Ca {
            trust_domain: trust_domain.to_string(),
            cert_der,
            cert_pem,
            not_after,
            issuer,
        })
    }

    /// Writes `ca.crt` (0644) and `ca.key` (0600) into `dir`, creating it, each atomically (a temporary file, fsync,
    /// rename); the key goes first, so a `ca.crt` never exists without its key.
    pub fn write_to(&self, dir: &Path) -> Result<(), IdentityError> {
        fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
        write_atomic(
            &dir.join(CA_KEY_FILE),
            self.issuer.key().serialize_pem().as_bytes(),
            0o600,
        )?;
        write_atomic(&dir.join(CA_CERT_FILE), self.cert_pem.as_bytes(), 0o644)?;
        let d = fs::File::open(dir).map_err(io_err("opening", dir))?;
        d.sync_all().map_err(io_err("syncing", dir))?;
        Ok(())
    }

    /// Loads the CA in `state_dir` if both files are there, generates and writes one if neither is, and refuses a
    /// directory holding only one of them.
    pub fn load_or_generate(
        state_dir: &Path,
        trust_domain: &str,
    ) -> Result<(Ca, CaSource), IdentityError> {
        let cert = state_dir.join(CA_CERT_FILE).exists();
        let key = state_dir.join(CA_KEY_FILE).exists();
        match (cert, key) {
            (true, true) => Ok((Ca::load(state_dir, trust_domain)?, CaSource::Loaded)),
            (false, false) => {
                let ca = Ca::generate(trust_domain)?;
                ca.write_to(state_dir)?;
                Ok((ca, CaSource::Generated))
            }
            (have_cert, _) => {
                let (present, missing) = if have_cert {
                    (CA_CERT_FILE, CA_KEY_FILE)
                } else {
                    (CA_KEY_FILE, CA_CERT_FILE)
                };
                Err(IdentityError::IncompleteCaDir {
                    dir: state_dir.to_path_buf(),
                    problem: format!(
                        "{present} exists but {missing} does not; remove {present} to generate a new CA, \
                         or restore {missing}"
                    ),
                })
            }
        }
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The private key as PKCS#8 PEM (what `write_to` stores in `ca.key`).
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    pub(crate) fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }
}

fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), IdentityError> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp: PathBuf = path.with_file_name(format!(".{name}.tmp"));
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err("creating", &tmp))?;
    // `mode` only applies to a new file; a leftover temporary file keeps its old mode otherwise.
    f.set_permissions(Permissions::from_mode(mode))
        .map_err(io_err("setting permissions on", &tmp))?;
    f.write_all(data).map_err(io_err("writing", &tmp))?;
    f.sync_all().map_err(io_err("syncing", &tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(io_err("renaming into place", path))?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A fresh empty directory under the system temp dir, removed on drop.
    pub(crate) struct TempDir(pub PathBuf);

    impl TempDir {
        pub(crate) fn new() -> TempDir {
            static N: AtomicU32 = AtomicU32::new(0);
            let p = std::env::temp_dir().join(format!(
                "sinew-identity-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn generated_ca_has_the_profile() {
        let ca = Ca::generate("cluster.local").unwrap();
        let (_, x) = x509_parser::parse_x509_certificate(ca.cert_der()).unwrap();
        let bc = x.basic_constraints().unwrap().unwrap();
        assert!(bc.critical && bc.value.ca);
        assert_eq!(bc.value.path_len_constraint, Some(0));
        let ku = x.key_usage().unwrap().unwrap().value;
        assert!(ku.key_cert_sign() && ku.crl_sign());
        assert_eq!(
            super::super::verify::uri_sans(&x).unwrap(),
            vec!["spiffe://cluster.local".to_string()]
        );
        assert_eq!(x.subject(), x.issuer());
        let life = x.validity().not_after.timestamp() - x.validity().not_before.timestamp();
        assert_eq!(life as u64, (GENERATED_CA_LIFETIME + CLOCK_SKEW).as_secs());
        // ECDSA P-256 key, ECDSA-with-SHA256 signature.
        assert_eq!(
            x.signature_algorithm.algorithm.to_id_string(),
            "1.2.840.10045.4.3.2"
        );
        assert_eq!(x.public_key().subject_public_key.data.len(), 65);
        assert!(Ca::generate("Bad Domain").is_err());
    }

    #[test]
    fn written_ca_loads_back_identical_and_key_is_0600() {
        let dir = TempDir::new();
        let state = dir.0.join("state");
        let (ca, src) = Ca::load_or_generate(&state, "cluster.local").unwrap();
        assert_eq!(src, CaSource::Generated);
        let mode = |f: &str| fs::metadata(state.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(CA_KEY_FILE), 0o600);
        assert_eq!(mode(CA_CERT_FILE), 0o644);
        assert!(!state.join(".ca.key.tmp").exists() && !state.join(".ca.crt.tmp").exists());
        for _ in 0..2 {
            let (again, src) = Ca::load_or_generate(&state, "cluster.local").unwrap();
            assert_eq!(src, CaSource::Loaded);
            assert_eq!(again.cert_der(), ca.cert_der());
            assert_eq!(again.key_pem(), ca.key_pem());
            assert_eq!(again.trust_domain(), "cluster.local");
            assert_eq!(again.not_after(), ca.not_after());
        }
    }

    #[test]
    fn load_errors_name_the_file() {
        let dir = TempDir::new();
        let e = Ca::load(&dir.0, "cluster.local").unwrap_err().to_string();
        assert!(e.contains("ca.crt") && e.contains("reading"), "{e}");

        let ca = Ca::generate("cluster.local").unwrap();
        ca.write_to(&dir.0).unwrap();
        fs::write(dir.0.join(CA_CERT_FILE), "garbage").unwrap();
        let e = Ca::load(&dir.0, "cluster.local").unwrap_err().to_string();
        assert!(e.contains("ca.crt") && e.contains("PEM"), "{e}");

        ca.write_to(&dir.0).unwrap();
        fs::write(
            dir.0.join(CA_KEY_FILE),
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let e = Ca::load(&dir.0, "cluster.local").unwrap_err().to_string();
        assert!(e.contains("ca.key"), "{e}");

        // A key from another CA.
        fs::write(
            dir.0.join(CA_KEY_FILE),
            Ca::generate("cluster.local").unwrap().key_pem(),
        )
        .unwrap();
        let e = Ca::load(&dir.0, "cluster.local").unwrap_err().to_string();
        assert!(e.contains("ca.key") && e.contains("does not match"), "{e}");

        ca.write_to(&dir.0).unwrap();
        let e = Ca::load(&dir.0, "other.domain").unwrap_err().to_string();
        assert!(e.contains("ca.crt") && e.contains("other.domain"), "{e}");

        // Only one of the two files: refused, not overwritten.
        fs::remove_file(dir.0.join(CA_KEY_FILE)).unwrap();
        let e = Ca::load_or_generate(&dir.0, "cluster.local")
            .unwrap_err()
            .to_string();
        assert!(e.contains("but ca.key does not"), "{e}");
        assert_eq!(
            fs::read_to_string(dir.0.join(CA_CERT_FILE)).unwrap(),
            ca.cert_pem()
        );
    }

    #[test]
    fn a_leaf_certificate_is_not_loaded_as_a_ca() {
        let dir = TempDir::new();
        let ca = Ca::generate("cluster.local").unwrap();
        let svid = ca.issue("default", "web").unwrap();
        fs::write(dir.0.join(CA_CERT_FILE), svid.cert_pem()).unwrap();
        fs::write(dir.0.join(CA_KEY_FILE), svid.key_pem()).unwrap();
        let e = Ca::load(&dir.0, "cluster.local").unwrap_err().to_string();
        assert!(e.contains("ca.crt") && e.contains("not a CA"), "{e}");
    }
}
