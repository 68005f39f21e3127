#![allow(
    dead_code,
    reason = "reference evaluator for issue 3; wired into the kernel compiler next"
)]
//! `AuthorizationPolicy` (`security.sinew.dev/v1alpha1`): Istio's L4 authorization API, and a pure reference
//! evaluator of its semantics (issue 3).
//!
//! The types read the same YAML users write for Istio: the same camelCase field names, `action` defaulting to
//! `ALLOW`, ports as strings (`"8080"`) or integers. Fields the API may send as `null` read like absent ones.
//!
//! Nothing here is lenient in the direction of widening access. Values that cannot be parsed, fields an L4
//! enforcer cannot honour (`methods`, `paths`, `hosts`, `when`, JWT `requestPrincipals`, ...) and unknown fields
//! do not make a deserialization error (one typo must not drop a whole policy, let alone a whole snapshot), they
//! are reported per rule by [`eval::statuses`] and evaluated in the safe direction by [`eval::evaluate`]: an ALLOW
//! rule that cannot be honoured exactly matches nothing; a DENY rule is enforced on what can be enforced, resolving
//! every doubt towards matching more. See `eval.rs` for the exact semantics.

pub mod eval;

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The API group/version of [`AuthorizationPolicy`].
pub const API_VERSION: &str = "security.sinew.dev/v1alpha1";
/// The kind of [`AuthorizationPolicy`].
pub const KIND: &str = "AuthorizationPolicy";
/// The default mesh root namespace: a policy there applies to workloads in every namespace.
pub const DEFAULT_ROOT_NAMESPACE: &str = "sinew-system";

/// An `AuthorizationPolicy` object.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicy {
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub api_version: String,
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub kind: String,
    #[serde(default, deserialize_with = "null_default")]
    pub metadata: PolicyMeta,
    #[serde(default, deserialize_with = "null_default")]
    pub spec: PolicySpec,
}

impl AuthorizationPolicy {
    /// `metadata.namespace`.
    pub fn namespace(&self) -> &str {
        &self.metadata.namespace
    }

    /// `metadata.name`.
    pub fn name(&self) -> &str {
        &self.metadata.name
    }

    /// `namespace/name`, the policy's name in verdicts and statuses.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace(), self.name())
    }
}

/// The part of `metadata` a policy needs.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyMeta {
    #[serde(default, deserialize_with = "null_default")]
    pub name: String,
    /// `default` when absent, as `kubectl apply` would do.
    #[serde(default = "default_namespace", deserialize_with = "null_namespace")]
    pub namespace: String,
}

impl Default for PolicyMeta {
    fn default() -> Self {
        PolicyMeta {
            name: String::new(),
            namespace: default_namespace(),
        }
    }
}

/// `spec`. `spec: {}` is an ALLOW policy without rules: it matches nothing, so it denies every request to the
/// workloads it selects.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicySpec {
    /// Absent: the policy applies to every workload in its namespace (in the root namespace: in the mesh).
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Option::is_none"
    )]
    pub selector: Option<WorkloadSelector>,
    #[serde(default, deserialize_with = "null_default")]
    pub action: Action,
    /// ORed. No rules: the policy matches nothing.
    #[serde(default, deserialize_with = "null_default")]
    pub rules: Vec<Rule>,
}

/// `spec.selector`. An empty `matchLabels` selects every workload, like no selector.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    #[serde(default, deserialize_with = "null_default")]
    pub match_labels: BTreeMap<String, String>,
}

impl WorkloadSelector {
    /// Every `matchLabels` entry is present, with that value, in `labels`.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// `spec.action`. Anything but `ALLOW`, `DENY` and `AUDIT` (Istio's `CUSTOM`, a typo) is kept as `Unknown`, so
/// that the policy is reported as rejected and enforced fail-closed (as a DENY) instead of failing to parse.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Action {
    #[default]
    Allow,
    Deny,
    Audit,
    Unknown(String),
}

impl Action {
    pub fn as_str(&self) -> &str {
        match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
            Action::Audit => "AUDIT",
            Action::Unknown(s) => s,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<String> for Action {
    fn from(s: String) -> Self {
        match s.as_str() {
            "ALLOW" => Action::Allow,
            "DENY" => Action::Deny,
            "AUDIT" => Action::Audit,
            _ => Action::Unknown(s),
        }
    }
}

impl<'de> Deserialize<'de> for Action {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Action::from(String::deserialize(d)?))
    }
}

impl Serialize for Action {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// One entry of `spec.rules`. `from`, `to` and `when` are ANDed; an absent one matches everything, so `{}`
/// matches every request.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    /// ORed. `Some(vec![])` (`from: []`) is invalid in Istio and reported as rejected.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Option::is_none"
    )]
    pub from: Option<Vec<RuleFrom>>,
    /// ORed. `Some(vec![])` (`to: []`) is invalid in Istio and reported as rejected.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Option::is_none"
    )]
    pub to: Option<Vec<RuleTo>>,
    /// Conditions, kept opaque: none can be honoured at L4, so a rule with `when` needs a proxy.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub when: Vec<serde_json::Value>,
    /// Fields this version does not know (a typo such as `form:`); reported as rejected.
    #[serde(flatten)]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

/// One entry of `rules[].from`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RuleFrom {
    /// Absent or empty: invalid in Istio, reported as rejected.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Option::is_none"
    )]
    pub source: Option<Source>,
    #[serde(flatten)]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

/// One entry of `rules[].to`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RuleTo {
    /// Absent or empty: invalid in Istio, reported as rejected.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Option::is_none"
    )]
    pub operation: Option<Operation>,
    #[serde(flatten)]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

/// `rules[].from[].source`: present fields are ANDed, an empty list is like an absent field.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Source {
    /// SPIFFE IDs, `spiffe://<td>/ns/<ns>/sa/<sa>` or Istio's `<td>/ns/<ns>/sa/<sa>`; `*`, `prefix*`, `*suffix`.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub principals: Vec<String>,
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub not_principals: Vec<String>,
    /// Namespace names; `*`, `prefix*`, `*suffix`.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub namespaces: Vec<String>,
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub not_namespaces: Vec<String>,
    /// CIDRs or single addresses, IPv4 or IPv6.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub ip_blocks: Vec<String>,
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub not_ip_blocks: Vec<String>,
    /// Other fields: Istio's L7 ones (`requestPrincipals`, `remoteIpBlocks`, ...) need a proxy, the rest are
    /// rejected.
    #[serde(flatten)]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

/// `rules[].to[].operation`: present fields are ANDed, an empty list is like an absent field.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Operation {
    /// The workload's target port (the container port), not the Service port.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub ports: Vec<Port>,
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub not_ports: Vec<Port>,
    /// L7: need a proxy.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub methods: Vec<String>,
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub not_methods: Vec<String>,
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub paths: Vec<String>,
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub not_paths: Vec<String>,
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub hosts: Vec<String>,
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub not_hosts: Vec<String>,
    #[serde(flatten)]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

/// A port as written: Istio's strings (`"8080"`) or integers. Kept as text so that an invalid one (`"80a"`,
/// `70000`, `-1`) is reported by name instead of failing the whole document.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Port(pub String);

impl Port {
    /// The port number, if the text is one (1-65535, decimal digits only).
    pub fn number(&self) -> Option<u16> {
        let s = self.0.as_str();
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse::<u16>().ok().filter(|&p| p != 0)
    }
}

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Port;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number or string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Port, E> {
                Ok(Port(v.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Port, E> {
                Ok(Port(v.to_string()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Port, E> {
                Ok(Port(v.to_string()))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Port, E> {
                Ok(Port(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for Port {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl From<u16> for Port {
    fn from(p: u16) -> Self {
        Port(p.to_string())
    }
}

fn default_namespace() -> String {
    "default".to_string()
}

/// `null` reads like an absent field.
fn null_default<'de, D: Deserializer<'de>, T: Deserialize<'de> + Default>(
    d: D,
) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

fn null_namespace<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?.unwrap_or_else(default_namespace))
}
