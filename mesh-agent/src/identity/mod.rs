//! Workload identity for the node proxy (issue 4): a CA, X.509-SVIDs, and rustls verifiers that check the chain and
//! then the SPIFFE ID, TLS 1.3 only.
//!
//! The node agent's entry point is [`manager::CertManager`]: it issues an SVID for the node proxy and for each local
//! service account, renews them at half-life, and gives the proxy its rustls configs. `docs/identity.md` describes
//! the certificate profile, the verification steps, the rejection reasons and the manager.
//!
//! - [`manager`]: the agent's SVID manager (issuance per local service account, renewal without breaking open
//!   connections, the proxy's server and client configs, `status` listing, counters).
//! - [`ca`]: load a CA from a directory (`ca.crt`, `ca.key`) or generate one into the state directory.
//! - [`svid`]: issue an X.509-SVID for a (namespace, service account), with renewal at half-life.
//! - [`verify`]: the rustls verifiers, the TLS 1.3-only `server_config` / `client_config` builders, and the
//!   [`verify::Rejection`] reasons meant for metrics.

pub mod ca;
pub mod manager;
pub mod spiffe;
pub mod svid;
pub mod testing;
pub mod verify;

#[cfg(test)]
mod tests;

use std::path::PathBuf;

pub use ca::{Ca, CaSource};
pub use manager::{
    CertCounters, CertCounts, CertInfo, CertManager, CertRole, RenewReport, format_duration,
    parse_duration,
};
pub use spiffe::{SpiffeId, SpiffeIdError};
pub use svid::{Svid, SvidOptions};
pub use verify::{
    Rejection, TrustBundle, client_config, peer_spiffe_id, rejection_of, server_config,
    spiffe_id_of,
};

/// The SPIFFE trust domain when none is configured.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// Errors of the CA, of issuance and of building TLS configs. (A peer certificate that fails verification is a
/// [`Rejection`] instead.)
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {problem}", path.display())]
    BadFile { path: PathBuf, problem: String },
    #[error("{}: {problem}", dir.display())]
    IncompleteCaDir { dir: PathBuf, problem: String },
    #[error(transparent)]
    SpiffeId(#[from] SpiffeIdError),
    #[error("the CA's trust domain is {ca:?}, not {requested:?}")]
    TrustDomainMismatch { ca: String, requested: String },
    #[error("invalid SVID options: {0}")]
    InvalidOptions(String),
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS config: {0}")]
    Tls(#[from] rustls::Error),
}
