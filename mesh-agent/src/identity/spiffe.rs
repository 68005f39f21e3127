//! SPIFFE IDs of the form `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`, exactly these segments.

use std::fmt;
use std::str::FromStr;

/// A SPIFFE ID naming a Kubernetes service account: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
///
/// Every component is validated on construction, so a `SpiffeId` always prints as a well-formed ID.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

/// A malformed SPIFFE ID or component. `field` names the part that is wrong: `trust_domain`, `namespace`,
/// `service_account`, or `spiffe_id` for the shape of the whole ID.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field} {value:?}: {problem}")]
pub struct SpiffeIdError {
    pub field: &'static str,
    pub value: String,
    pub problem: &'static str,
}

fn err(field: &'static str, value: &str, problem: &'static str) -> SpiffeIdError {
    SpiffeIdError {
        field,
        value: value.to_string(),
        problem,
    }
}

/// A SPIFFE trust domain: 1-255 characters from `a-z 0-9 . - _` (the SPIFFE spec; no upper case, no port).
pub fn validate_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    const F: &str = "trust_domain";
    if td.is_empty() {
        return Err(err(F, td, "must not be empty"));
    }
    if td.len() > 255 {
        return Err(err(F, td, "must be at most 255 characters"));
    }
    if !td
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Err(err(F, td, "may only contain a-z, 0-9, '.', '-' and '_'"));
    }
    Ok(())
}

fn is_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

/// A Kubernetes namespace name: an RFC 1123 label (1-63 of `a-z 0-9 -`, starting and ending alphanumeric).
pub fn validate_namespace(ns: &str) -> Result<(), SpiffeIdError> {
    const F: &str = "namespace";
    if ns.is_empty() {
        return Err(err(F, ns, "must not be empty"));
    }
    if ns.len() > 63 {
        return Err(err(F, ns, "must be at most 63 characters"));
    }
    if !ns.bytes().all(|b| is_alnum(b) || b == b'-') {
        return Err(err(F, ns, "may only contain a-z, 0-9 and '-'"));
    }
    let b = ns.as_bytes();
    if !is_alnum(b[0]) || !is_alnum(b[b.len() - 1]) {
        return Err(err(F, ns, "must start and end with a-z or 0-9"));
    }
    Ok(())
}

/// A Kubernetes service account name: an RFC 1123 subdomain (1-253 of `a-z 0-9 - .`, each dot-separated label
/// starting and ending alphanumeric).
pub fn validate_service_account(sa: &str) -> Result<(), SpiffeIdError> {
    const F: &str = "service_account";
    if sa.is_empty() {
        return Err(err(F, sa, "must not be empty"));
    }
    if sa.len() > 253 {
        return Err(err(F, sa, "must be at most 253 characters"));
    }
    if !sa.bytes().all(|b| is_alnum(b) || b == b'-' || b == b'.') {
        return Err(err(F, sa, "may only contain a-z, 0-9, '-' and '.'"));
    }
    for label in sa.split('.') {
        let b = label.as_bytes();
        if b.is_empty() || !is_alnum(b[0]) || !is_alnum(b[b.len() - 1]) {
            return Err(err(
                F,
                sa,
                "each '.'-separated part must start and end with a-z or 0-9",
            ));
        }
    }
    Ok(())
}

impl SpiffeId {
    /// Builds an ID from its components, validating each (the error names the field).
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        validate_trust_domain(trust_domain)?;
        validate_namespace(namespace)?;
        validate_service_account(service_account)?;
        Ok(SpiffeId {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        })
    }

    /// Parses `spiffe://<td>/ns/<ns>/sa/<sa>`. Anything else (another scheme, other path segments, a query, a
    /// fragment, a port, upper case in the trust domain) is rejected.
    pub fn parse(uri: &str) -> Result<Self, SpiffeIdError> {
        const F: &str = "spiffe_id";
        let rest = uri
            .strip_prefix("spiffe://")
            .ok_or_else(|| err(F, uri, "must start with \"spiffe://\""))?;
        let (td, path) = rest.split_once('/').ok_or_else(|| {
            err(
                F,
                uri,
                "must have the path /ns/<namespace>/sa/<service-account>",
            )
        })?;
        validate_trust_domain(td)?;
        let segments: Vec<&str> = path.split('/').collect();
        match segments.as_slice() {
            ["ns", ns, "sa", sa] => SpiffeId::new(td, ns, sa),
            _ => Err(err(
                F,
                uri,
                "path must be exactly /ns/<namespace>/sa/<service-account>",
            )),
        }
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    /// The URI form, as written in the certificate's URI SAN.
    pub fn uri(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SpiffeId::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_round_trip() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/web-frontend").unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "web-frontend");
        assert_eq!(
            id.to_string(),
            "spiffe://cluster.local/ns/default/sa/web-frontend"
        );
        assert_eq!(
            id,
            SpiffeId::new("cluster.local", "default", "web-frontend").unwrap()
        );
        assert_eq!(
            "spiffe://td/ns/a/sa/b.c"
                .parse::<SpiffeId>()
                .unwrap()
                .service_account(),
            "b.c"
        );
    }

    #[test]
    fn malformed_ids_name_the_field() {
        let cases = [
            ("https://cluster.local/ns/a/sa/b", "spiffe_id"),
            ("SPIFFE://cluster.local/ns/a/sa/b", "spiffe_id"),
            ("spiffe://cluster.local", "spiffe_id"),
            ("spiffe://cluster.local/", "spiffe_id"),
            ("spiffe://cluster.local/ns/a/sa/b/extra", "spiffe_id"),
            ("spiffe://cluster.local/ns/a/sa/", "service_account"),
            ("spiffe://cluster.local/sa/b/ns/a", "spiffe_id"),
            ("spiffe://cluster.local/ns/a/sa/b?x=1", "service_account"),
            ("spiffe:///ns/a/sa/b", "trust_domain"),
            ("spiffe://Cluster.Local/ns/a/sa/b", "trust_domain"),
            ("spiffe://cluster.local:8080/ns/a/sa/b", "trust_domain"),
            ("spiffe://cluster.local/ns/A/sa/b", "namespace"),
            ("spiffe://cluster.local/ns/-a/sa/b", "namespace"),
            ("spiffe://cluster.local/ns/a.b/sa/b", "namespace"),
            ("spiffe://cluster.local/ns/a/sa/b..c", "service_account"),
            ("spiffe://cluster.local/ns/a/sa/b_c", "service_account"),
        ];
        for (uri, field) in cases {
            let e = SpiffeId::parse(uri).expect_err(uri);
            assert_eq!(e.field, field, "{uri}: {e}");
        }
        let long = "a".repeat(64);
        assert_eq!(
            SpiffeId::new("td", &long, "b").unwrap_err().field,
            "namespace"
        );
        assert_eq!(
            SpiffeId::new("td", "a", "").unwrap_err().field,
            "service_account"
        );
        let e = SpiffeId::new("td", "a", "B").unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid service_account \"B\": may only contain a-z, 0-9, '-' and '.'"
        );
    }
}
