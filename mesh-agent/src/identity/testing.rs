//! Deliberately malformed SVIDs, for tests that prove a verifier refuses them.
//!
//! Not `cfg(test)`: the unit tests here, the proxy's loopback tests and the privileged end-to-end tests (another crate,
//! which writes the certificates to disk with [`Svid::cert_pem`] and [`Svid::key_pem`]) all build bad certificates
//! the same way, from the real SVID profile with one thing changed.

use rcgen::{BasicConstraints, IsCa};
use time::OffsetDateTime;

use super::IdentityError;
use super::ca::Ca;
use super::spiffe::SpiffeId;
use super::svid::{Svid, leaf_params, sign};

/// An SVID signed by `ca` with `uris` as its URI SANs (none, one or several, well-formed or not), valid from
/// `not_before` to `not_after` seconds relative to now (negative: in the past), and `CA:true` if `leaf_is_ca`.
/// Everything else follows the normal profile. Its `id` is the first URI when that parses as a SPIFFE ID, otherwise
/// `spiffe://<ca trust domain>/ns/bad/sa/bad` (informational only: the certificate is what a peer sees).
pub fn crafted(
    ca: &Ca,
    uris: &[&str],
    not_before: i64,
    not_after: i64,
    leaf_is_ca: bool,
) -> Result<Svid, IdentityError> {
    let now = OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .expect("0 is a valid nanosecond");
    let mut params = leaf_params(
        uris.iter().map(|u| u.to_string()).collect(),
        now + time::Duration::seconds(not_before),
        now + time::Duration::seconds(not_after),
    )?;
    if leaf_is_ca {
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    }
    let id = match uris.first().map(|u| SpiffeId::parse(u)) {
        Some(Ok(id)) => id,
        _ => SpiffeId::new(ca.trust_domain(), "bad", "bad")?,
    };
    sign(ca, id, &params)
}
