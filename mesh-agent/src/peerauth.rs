//! `PeerAuthentication` (`security.sinew.dev/v1alpha1`): Istio's API for the mTLS mode a workload accepts, and a
//! pure function that resolves the effective mode of one workload port (issue 4).
//!
//! The file source accepts the objects (validated, per-object last-good) and puts them in
//! [`Snapshot::peer_authentications`]; the policy compiler turns [`workload_modes`] into the kernel's mTLS tables
//! (STRICT enforced in the kernel). See `docs/peer-authentication.md` and `docs/mesh.md`.
//!
//! The types read the YAML users write for Istio: `selector.matchLabels`, `mtls.mode` (`STRICT`, `PERMISSIVE`,
//! `DISABLE`, `UNSET`; absent is `UNSET`), `portLevelMtls` keyed by port (strings or numbers). As with
//! [`AuthorizationPolicy`](crate::policy::AuthorizationPolicy), a field sent as `null` reads like an absent one,
//! and values that cannot be honoured (an unknown mode, a bad port, an unknown field) do not fail the parse: they
//! are kept, [`validate`] reports each with its field path, and [`effective_mode`] resolves them in the direction
//! that never widens what a workload accepts (an unknown mode counts as `STRICT`).
//!
//! [`Snapshot::peer_authentications`]: crate::source::Snapshot::peer_authentications

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};

/// The API group/version of [`PeerAuthentication`].
pub const API_VERSION: &str = crate::policy::API_VERSION;
/// The kind of [`PeerAuthentication`].
pub const KIND: &str = "PeerAuthentication";

/// Which workloads the object applies to and the mTLS mode they accept.
///
/// Without a selector the object applies to every workload of its namespace (a namespace policy); in the mesh
/// root namespace, to every workload of the mesh (the mesh policy). With a selector it applies to the workloads
/// whose labels match (a workload policy), and only a workload policy may have `portLevelMtls`.
//
// The derive generates `PeerAuthentication` (`metadata`, `spec`) and its CRD. A missing or `null` spec reads
// like `spec: {}`. Unknown fields are kept so that a typo such as `mtl:` is reported instead of silently turning a
// STRICT policy into an inherited one. The CRD schema is strict instead (see `crate::crds`): the `unknown` maps
// are left out of it, so the API server's field validation rejects the typo, and its other constraints (enums,
// CEL rules) mirror `validate`, never rejecting what it accepts.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, JsonSchema)]
#[kube(
    group = "security.sinew.dev",
    version = "v1alpha1",
    kind = "PeerAuthentication",
    namespaced,
    doc = "Sinew's peer authentication (mTLS mode) policy, with Istio's field names and precedence.",
    derive = "PartialEq",
    derive = "Default",
    shortname = "pa",
    category = "sinew",
    printcolumn = r#"{"name": "Mode", "type": "string", "jsonPath": ".spec.mtls.mode"}"#,
    printcolumn = r#"{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend(
    "x-kubernetes-validations" = [{"rule": PORT_LEVEL_NEEDS_SELECTOR_RULE, "message": PORT_LEVEL_NEEDS_SELECTOR_MESSAGE}]
))]
// Deserialize is written by hand (through `SpecFields`) so that `spec: null` and a missing spec read as `{}`.
pub struct PeerAuthenticationSpec {
    /// Absent (or an empty `matchLabels`): a namespace policy, or the mesh policy in the root namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    // Not nullable in the schema, so that the CEL rule above never meets a `null` selector: the API server prunes
    // `selector: null`, which the agent reads like an absent selector anyway.
    #[schemars(with = "Selector")]
    pub selector: Option<Selector>,
    /// Absent: `UNSET`, the mode is inherited from the next level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<Mtls>,
    /// Per workload port (the container port, not the Service port); only valid with a selector. Keys are the
    /// ports as written (`"8080"`; numbers are read as their decimal text).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(transform = port_level_mtls_schema)]
    pub port_level_mtls: BTreeMap<String, Mtls>,
    /// Fields this version does not know; [`validate`] rejects them.
    #[serde(flatten)]
    #[schemars(skip)]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

/// What [`PeerAuthenticationSpec`] deserializes through.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SpecFields {
    #[serde(default, deserialize_with = "null_default")]
    selector: Option<Selector>,
    #[serde(default, deserialize_with = "null_default")]
    mtls: Option<Mtls>,
    #[serde(default, deserialize_with = "port_map")]
    port_level_mtls: BTreeMap<String, Mtls>,
    #[serde(flatten)]
    unknown: BTreeMap<String, serde_json::Value>,
}

impl<'de> Deserialize<'de> for PeerAuthenticationSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match Option::<SpecFields>::deserialize(d)? {
            None => PeerAuthenticationSpec::default(),
            Some(f) => PeerAuthenticationSpec {
                selector: f.selector,
                mtls: f.mtls,
                port_level_mtls: f.port_level_mtls,
                unknown: f.unknown,
            },
        })
    }
}

/// `spec.selector`. Unlike a typo elsewhere, a typo here (`matchLabel:`) would turn a workload policy into a
/// namespace policy, so unknown fields are kept and rejected.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Selector {
    #[serde(default, deserialize_with = "null_default")]
    #[schemars(extend(
        "x-kubernetes-validations" = [{"rule": LABEL_KEYS_NOT_EMPTY_RULE, "message": LABEL_KEYS_NOT_EMPTY_MESSAGE}]
    ))]
    pub match_labels: BTreeMap<String, String>,
    #[serde(flatten)]
    #[schemars(skip)]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

impl Selector {
    /// Every `matchLabels` entry is present, with that value, in `labels`.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// `spec.mtls` and each value of `spec.portLevelMtls`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Mtls {
    /// Absent or `null`: `UNSET`.
    #[serde(default, deserialize_with = "null_default")]
    pub mode: Mode,
    #[serde(flatten)]
    #[schemars(skip)]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

impl Mtls {
    /// `{mode: <mode>}`.
    pub fn new(mode: Mode) -> Self {
        Mtls {
            mode,
            unknown: BTreeMap::new(),
        }
    }
}

/// `mtls.mode` as written. Anything but the four Istio values (a typo, a lowercase `strict`) is kept as
/// `Unknown`, rejected by [`validate`] and resolved as `STRICT` by [`effective_mode`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Inherit from the next level.
    #[default]
    Unset,
    Disable,
    Permissive,
    Strict,
    Unknown(String),
}

crate::lenient::lenient_enum!(Mode {
    Unset = "UNSET",
    Disable = "DISABLE",
    Permissive = "PERMISSIVE",
    Strict = "STRICT",
});

impl Mode {
    /// The mode this setting decides, or `None` for `UNSET` (inherit). `Unknown` decides `STRICT`.
    pub fn decided(&self) -> Option<MtlsMode> {
        match self {
            Mode::Unset => None,
            Mode::Disable => Some(MtlsMode::Disable),
            Mode::Permissive => Some(MtlsMode::Permissive),
            Mode::Strict | Mode::Unknown(_) => Some(MtlsMode::Strict),
        }
    }
}

/// The mode a workload port ends up with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    /// Plaintext only: the proxy does not terminate mTLS for the port.
    Disable,
    /// Both mTLS (from meshed peers) and plaintext. The default when nothing is set.
    Permissive,
    /// mTLS only: the port accepts connections only from the node proxy.
    Strict,
}

impl MtlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            MtlsMode::Disable => "DISABLE",
            MtlsMode::Permissive => "PERMISSIVE",
            MtlsMode::Strict => "STRICT",
        }
    }
}

impl fmt::Display for MtlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PeerAuthentication {
    /// An object named `namespace/name` (tests and tools; objects normally come from YAML or the API server).
    pub fn new_in(namespace: &str, name: &str, spec: PeerAuthenticationSpec) -> Self {
        let mut pa = PeerAuthentication::new(name, spec);
        pa.metadata.namespace = Some(namespace.to_string());
        pa
    }

    /// `metadata.namespace`; `default` when it is absent or empty, as `kubectl apply` would do.
    pub fn namespace(&self) -> &str {
        self.metadata
            .namespace
            .as_deref()
            .filter(|ns| !ns.is_empty())
            .unwrap_or("default")
    }

    /// `metadata.name`; empty when absent ([`validate`] rejects that).
    pub fn name(&self) -> &str {
        self.metadata.name.as_deref().unwrap_or("")
    }

    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace(), self.name())
    }

    /// The selector, if it has at least one label. An empty `matchLabels` is no selector, as in Istio.
    pub fn workload_selector(&self) -> Option<&Selector> {
        self.spec
            .selector
            .as_ref()
            .filter(|s| !s.match_labels.is_empty())
    }

    /// `spec.mtls.mode`, `UNSET` when absent.
    pub fn mode(&self) -> &Mode {
        self.spec
            .mtls
            .as_ref()
            .map_or(&Mode::Unset, |mtls| &mtls.mode)
    }
}

/// A `portLevelMtls` key as a port number (1-65535, decimal digits only), or why it is not one.
pub fn parse_port(key: &str) -> Result<u16, String> {
    if key.is_empty() || !key.bytes().all(|b| b.is_ascii_digit()) {
        return Err("not a port number".to_owned());
    }
    match key.parse::<u32>() {
        Ok(p @ 1..=65535) => Ok(p as u16),
        _ => Err("port out of range 1-65535".to_owned()),
    }
}

/// Checks an object before a source accepts it. Every problem is reported, each naming its field path, joined
/// by `; `.
pub fn validate(pa: &PeerAuthentication) -> Result<(), String> {
    let mut problems = Vec::new();
    if pa.name().is_empty() {
        problems.push("metadata.name: must not be empty".to_owned());
    }
    let spec = &pa.spec;
    for key in spec.unknown.keys() {
        problems.push(format!("spec.{key}: unknown field"));
    }
    if let Some(selector) = &spec.selector {
        for key in selector.unknown.keys() {
            problems.push(format!("spec.selector.{key}: unknown field"));
        }
        for key in selector.match_labels.keys() {
            if key.is_empty() {
                problems.push("spec.selector.matchLabels: empty label key".to_owned());
            }
        }
    }
    if let Some(mtls) = &spec.mtls {
        check_mtls("spec.mtls", mtls, &mut problems);
    }
    if !spec.port_level_mtls.is_empty() && pa.workload_selector().is_none() {
        problems.push(
            "spec.portLevelMtls: only valid with a spec.selector that has matchLabels \
             (a workload policy), as in Istio"
                .to_owned(),
        );
    }
    let mut seen: BTreeMap<u16, &str> = BTreeMap::new();
    for (key, mtls) in &spec.port_level_mtls {
        let field = format!("spec.portLevelMtls[{key:?}]");
        match parse_port(key) {
            Err(reason) => problems.push(format!("{field}: {reason}")),
            Ok(port) => {
                if let Some(first) = seen.insert(port, key) {
                    problems.push(format!("{field}: port {port} is also given as {first:?}"));
                }
            }
        }
        check_mtls(&field, mtls, &mut problems);
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

fn check_mtls(field: &str, mtls: &Mtls, problems: &mut Vec<String>) {
    if let Mode::Unknown(m) = &mtls.mode {
        problems.push(format!(
            "{field}.mode: {m:?} is not one of UNSET, DISABLE, PERMISSIVE, STRICT"
        ));
    }
    for key in mtls.unknown.keys() {
        problems.push(format!("{field}.{key}: unknown field"));
    }
}

/// The mode of one workload port, the object that decided it, and how.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Resolved {
    pub mode: MtlsMode,
    /// `namespace/name` of the deciding object; `None` for the default (nothing set).
    pub from: Option<String>,
    /// A sentence for logs and `status`: which level decided, and which levels were `UNSET`.
    pub reason: String,
}

/// The level a [`PeerAuthentication`] applies at, for one workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Level {
    Workload,
    Namespace,
    Mesh,
}

impl Level {
    fn name(self) -> &'static str {
        match self {
            Level::Workload => "workload",
            Level::Namespace => "namespace",
            Level::Mesh => "mesh",
        }
    }
}

/// The level `pa` applies at for a workload in `pod_namespace` with `pod_labels`, or `None` if it does not apply.
///
/// As in Istio: a policy with a selector applies only in its own namespace, and never from the root namespace
/// (Istio ignores selector policies there, even for root-namespace workloads).
fn level(
    pa: &PeerAuthentication,
    root_namespace: &str,
    pod_namespace: &str,
    pod_labels: &BTreeMap<String, String>,
) -> Option<Level> {
    let ns = pa.namespace();
    match pa.workload_selector() {
        None if ns == root_namespace => Some(Level::Mesh),
        None if ns == pod_namespace => Some(Level::Namespace),
        None => None,
        Some(_) if ns == root_namespace => None,
        Some(s) if ns == pod_namespace && s.matches(pod_labels) => Some(Level::Workload),
        Some(_) => None,
    }
}

/// The effective mTLS mode of `port` of a workload in `pod_namespace` with `pod_labels`, with Istio's
/// precedence:
///
/// 1. the workload policy (a selector that matches, in the pod's namespace): its `portLevelMtls` entry for the
///    port, then its `mtls`;
/// 2. the namespace policy (no selector, in the pod's namespace);
/// 3. the mesh policy (no selector, in `root_namespace`);
/// 4. `PERMISSIVE`.
///
/// An `UNSET` mode (or no `mtls`) at a level inherits from the next one; an `UNSET` port entry inherits the
/// workload policy's (possibly inherited) mode. Only one object per level is considered: when several apply,
/// Istio takes the oldest; without creation times the first by `namespace/name` (then listing order) wins, and
/// the others are ignored even if the winner is `UNSET`, as in Istio.
///
/// An unknown mode (which [`validate`] rejects, so it only reaches here from unvalidated input) decides
/// `STRICT`, the mode that accepts the least. Port keys that are not port numbers never match; if two keys name
/// the same port (`"8080"`, `"08080"`), the strictest decided mode among them is used.
pub fn effective_mode(
    policies: &[PeerAuthentication],
    root_namespace: &str,
    pod_namespace: &str,
    pod_labels: &BTreeMap<String, String>,
    port: u16,
) -> Resolved {
    // The winner at each level: the smallest `namespace/name`, first listed among equals.
    let mut winners: [Option<(String, &PeerAuthentication)>; 3] = [None, None, None];
    for pa in policies {
        let Some(level) = level(pa, root_namespace, pod_namespace, pod_labels) else {
            continue;
        };
        let slot = &mut winners[level as usize];
        let key = pa.key();
        if slot.as_ref().is_none_or(|(best, _)| key < *best) {
            *slot = Some((key, pa));
        }
    }
    let [workload, namespace, mesh] = winners;

    // Levels from the bottom up; each decided mode overrides what is below it.
    let mut resolved = Resolved {
        mode: MtlsMode::Permissive,
        from: None,
        reason: "no PeerAuthentication sets a mode: the default".to_owned(),
    };
    let mut unset = Vec::new();
    for (level, winner) in [(Level::Mesh, &mesh), (Level::Namespace, &namespace)] {
        if let Some((key, pa)) = winner {
            decide(&mut resolved, &mut unset, level, key, pa.mode());
        }
    }
    let Some((key, pa)) = &workload else {
        resolved.reason = with_unset(resolved.reason, &unset);
        return resolved;
    };
    decide(&mut resolved, &mut unset, Level::Workload, key, pa.mode());
    let port_modes: BTreeSet<Option<MtlsMode>> = pa
        .spec
        .port_level_mtls
        .iter()
        .filter(|(k, _)| parse_port(k) == Ok(port))
        .map(|(_, mtls)| mtls.mode.decided())
        .collect();
    match port_modes.iter().flatten().max() {
        Some(&mode) => {
            resolved = Resolved {
                mode,
                from: Some(key.clone()),
                reason: format!("portLevelMtls[{port}] of workload policy {key}"),
            };
        }
        None if !port_modes.is_empty() => unset.push(format!("portLevelMtls[{port}] of {key}")),
        None => {}
    }
    resolved.reason = with_unset(resolved.reason, &unset);
    resolved
}

/// The mode of every TCP port of a workload: the mode of ports without a `portLevelMtls` entry, and the ports
/// whose [`effective_mode`] differs from it. This is what the kernel tables hold.
pub fn workload_modes(
    policies: &[PeerAuthentication],
    root_namespace: &str,
    pod_namespace: &str,
    pod_labels: &BTreeMap<String, String>,
) -> (MtlsMode, BTreeMap<u16, MtlsMode>) {
    // Only a workload policy (selector, pod's namespace) has port entries that apply; collect every port any of
    // them names, then ask the reference for each.
    let named: BTreeSet<u16> = policies
        .iter()
        .filter(|pa| level(pa, root_namespace, pod_namespace, pod_labels) == Some(Level::Workload))
        .flat_map(|pa| pa.spec.port_level_mtls.keys())
        .filter_map(|k| parse_port(k).ok())
        .collect();
    let other = (1..=u16::MAX)
        .find(|p| !named.contains(p))
        .unwrap_or(u16::MAX);
    let mode_of =
        |port: u16| effective_mode(policies, root_namespace, pod_namespace, pod_labels, port).mode;
    let default = mode_of(other);
    let ports = named
        .into_iter()
        .map(|p| (p, mode_of(p)))
        .filter(|(_, m)| *m != default)
        .collect();
    (default, ports)
}

/// Applies one level's mode: a decided mode replaces `resolved`, `UNSET` is noted.
fn decide(resolved: &mut Resolved, unset: &mut Vec<String>, level: Level, key: &str, mode: &Mode) {
    match mode.decided() {
        Some(decided) => {
            let unknown = match mode {
                Mode::Unknown(m) => format!(" (unknown mode {m:?} read as STRICT)"),
                _ => String::new(),
            };
            *resolved = Resolved {
                mode: decided,
                from: Some(key.to_owned()),
                reason: format!("{} policy {key}{unknown}", level.name()),
            };
            // Levels below the decider no longer matter for the explanation.
            unset.clear();
        }
        None => unset.push(format!("{} policy {key}", level.name())),
    }
}

fn with_unset(reason: String, unset: &[String]) -> String {
    if unset.is_empty() {
        reason
    } else {
        // Most specific first: the order a reader walks the precedence.
        let levels: Vec<&str> = unset.iter().rev().map(String::as_str).collect();
        format!("{reason}; UNSET, inherited: {}", levels.join(", "))
    }
}

// The CRD schema's CEL rules. Each mirrors a check of `validate` and accepts everything it accepts (`crds.rs`
// tests that on the examples and fixtures).

/// `portLevelMtls` only in a workload policy: with a selector that has at least one label.
pub(crate) const PORT_LEVEL_NEEDS_SELECTOR_RULE: &str = "!has(self.portLevelMtls) || size(self.portLevelMtls) == 0 \
    || (has(self.selector) && has(self.selector.matchLabels) && size(self.selector.matchLabels) > 0)";
pub(crate) const PORT_LEVEL_NEEDS_SELECTOR_MESSAGE: &str = "portLevelMtls is only valid with a selector that has matchLabels (a workload policy), as in Istio";
/// `selector.matchLabels` has no empty key.
pub(crate) const LABEL_KEYS_NOT_EMPTY_RULE: &str = "self.all(key, key != '')";
pub(crate) const LABEL_KEYS_NOT_EMPTY_MESSAGE: &str =
    "selector.matchLabels: label keys must not be empty";
pub(crate) const PORT_KEYS_MESSAGE: &str =
    "portLevelMtls keys must be port numbers 1-65535 (decimal digits), e.g. '8080'";

/// The CEL rule that every `portLevelMtls` key is what [`parse_port`] accepts.
pub(crate) fn port_keys_rule() -> String {
    format!(
        "self.all(port, port.matches('{}'))",
        crate::policy::PORT_PATTERN
    )
}

/// `portLevelMtls` in the CRD: every key a port number. At most 65535 entries, which never refuses an object
/// [`validate`] accepts (its keys are distinct port numbers) and bounds the cost estimate of the keys rule.
fn port_level_mtls_schema(schema: &mut schemars::Schema) {
    schema.insert("maxProperties".into(), 65535.into());
    schema.insert(
        "x-kubernetes-validations".into(),
        serde_json::json!([{"rule": port_keys_rule(), "message": PORT_KEYS_MESSAGE}]),
    );
}

/// `null` reads like an absent field.
fn null_default<'de, D: Deserializer<'de>, T: Deserialize<'de> + Default>(
    d: D,
) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// `portLevelMtls`: keys as strings or numbers (YAML `8080:` is an integer key), `null` as empty. Two keys that
/// read as the same text (`8080` and `"8080"`) fail the object rather than one silently replacing the other.
fn port_map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, Mtls>, D::Error> {
    struct PortMap;
    impl<'de> serde::de::Visitor<'de> for PortMap {
        type Value = BTreeMap<String, Mtls>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a map from port to {mode}")
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(BTreeMap::new())
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(BTreeMap::new())
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_map(self)
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some(PortKey(key)) = map.next_key()? {
                let value: Option<Mtls> = map.next_value()?;
                if out.contains_key(&key) {
                    return Err(serde::de::Error::custom(format!(
                        "port {key:?} is given twice"
                    )));
                }
                out.insert(key, value.unwrap_or_default());
            }
            Ok(out)
        }
    }
    d.deserialize_option(PortMap)
}

/// A `portLevelMtls` key, kept as text so that a bad one (`"8080a"`, `0`, `-1`) is reported by name.
struct PortKey(String);

impl<'de> Deserialize<'de> for PortKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = PortKey;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number or string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<PortKey, E> {
                Ok(PortKey(v.to_owned()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<PortKey, E> {
                Ok(PortKey(v.to_string()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<PortKey, E> {
                Ok(PortKey(v.to_string()))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<PortKey, E> {
                // `8080.0` is not a port; keep a spelling that says so.
                Ok(PortKey(format!("{v:?}")))
            }
        }
        d.deserialize_any(V)
    }
}

/// Specs [`validate`] accepts: the validator's tests and the CRD schema's tests both check them.
#[cfg(test)]
pub(crate) const VALID_SPECS: &[&str] = &[
    "{}",
    "{mtls: {}}",
    "{mtls: {mode: UNSET}}",
    "{mtls: {mode: STRICT}}",
    "{mtls: {mode: PERMISSIVE}}",
    "{mtls: {mode: DISABLE}}",
    "{selector: {matchLabels: {app: web}}, portLevelMtls: {1: {mode: DISABLE}, '65535': {}}}",
    "{selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}, portLevelMtls: {8080: {mode: UNSET}}}",
];

#[cfg(test)]
mod tests {
    use super::*;
    use kube::{CustomResourceExt, Resource};

    const ROOT: &str = "sinew-system";

    fn pa(yaml: &str) -> PeerAuthentication {
        serde_yaml::from_str(yaml).unwrap_or_else(|e| panic!("bad test YAML: {e}\n{yaml}"))
    }

    /// An object `namespace/name` with this spec (YAML flow).
    fn obj(namespace: &str, name: &str, spec: &str) -> PeerAuthentication {
        pa(&format!(
            "metadata: {{name: {name}, namespace: {namespace}}}\nspec: {spec}\n"
        ))
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn web() -> BTreeMap<String, String> {
        labels(&[("app", "web")])
    }

    /// The mode and deciding object of `shop`'s `app: web` pod on `port`.
    fn resolve(policies: &[PeerAuthentication], port: u16) -> (MtlsMode, Option<String>) {
        let r = effective_mode(policies, ROOT, "shop", &web(), port);
        (r.mode, r.from)
    }

    fn from(key: &str) -> Option<String> {
        Some(key.to_owned())
    }

    fn error(spec: &str) -> String {
        validate(&obj("shop", "p", spec)).unwrap_err()
    }

    use MtlsMode::{Disable, Permissive, Strict};

    #[test]
    fn resource_identity_and_accessors() {
        assert_eq!(PeerAuthentication::api_version(&()), API_VERSION);
        assert_eq!(PeerAuthentication::kind(&()), KIND);
        assert_eq!(PeerAuthentication::plural(&()), "peerauthentications");
        let p = PeerAuthentication::new_in("shop", "strict", PeerAuthenticationSpec::default());
        assert_eq!(p.key(), "shop/strict");
        assert_eq!(p.mode(), &Mode::Unset);
        for meta in [
            "{name: a}",
            "{name: a, namespace: null}",
            "{name: a, namespace: ''}",
        ] {
            assert_eq!(
                pa(&format!("metadata: {meta}\n")).key(),
                "default/a",
                "{meta}"
            );
        }
        assert_eq!(pa("metadata: {namespace: x}\n").name(), "");
    }

    #[test]
    fn null_and_missing_read_as_absent() {
        let empty = PeerAuthenticationSpec::default();
        for spec in [
            "",
            "{}",
            "{selector: null, mtls: null, portLevelMtls: null}",
        ] {
            assert_eq!(
                pa(&format!("metadata: {{name: a}}\nspec: {spec}\n")).spec,
                empty,
                "{spec:?}"
            );
        }
        assert_eq!(pa("metadata: {name: a}\n").spec, empty);
        let p = obj(
            "shop",
            "a",
            "{selector: {matchLabels: null}, mtls: {mode: null}, portLevelMtls: {'80': null}}",
        );
        assert_eq!(p.mode(), &Mode::Unset);
        assert_eq!(p.spec.selector, Some(Selector::default()));
        assert_eq!(p.spec.port_level_mtls["80"], Mtls::default());
        assert_eq!(
            p.workload_selector(),
            None,
            "empty matchLabels is no selector"
        );
    }

    #[test]
    fn reads_istio_yaml_with_ports_as_strings_or_numbers() {
        let p = pa("
apiVersion: security.sinew.dev/v1alpha1
kind: PeerAuthentication
metadata: {name: web, namespace: shop}
spec:
  selector:
    matchLabels: {app: web}
  mtls:
    mode: STRICT
  portLevelMtls:
    8080:
      mode: DISABLE
    '9090': {mode: PERMISSIVE}
    9091: {}
");
        assert_eq!(p.mode(), &Mode::Strict);
        let ports: Vec<(&str, &Mode)> = p
            .spec
            .port_level_mtls
            .iter()
            .map(|(k, v)| (k.as_str(), &v.mode))
            .collect();
        assert_eq!(
            ports,
            [
                ("8080", &Mode::Disable),
                ("9090", &Mode::Permissive),
                ("9091", &Mode::Unset)
            ]
        );
        assert_eq!(validate(&p), Ok(()));
        // Through a serde_yaml::Value too, as the file source reads it, and from JSON (the API server).
        let value: serde_yaml::Value = serde_yaml::from_str(
            "metadata: {name: a}\nspec: {selector: {matchLabels: {a: b}}, portLevelMtls: {8080: {mode: STRICT}, -1: {}, 80.5: {}}}\n",
        )
        .unwrap();
        let p: PeerAuthentication = serde_yaml::from_value(value).unwrap();
        let keys: Vec<&str> = p.spec.port_level_mtls.keys().map(String::as_str).collect();
        assert_eq!(keys, ["-1", "80.5", "8080"]);
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(json["apiVersion"], API_VERSION);
        assert_eq!(json["kind"], KIND);
        assert_eq!(json["spec"]["portLevelMtls"]["8080"]["mode"], "STRICT");
        let again: PeerAuthentication = serde_json::from_value(json).unwrap();
        assert_eq!(again, p);
    }

    #[test]
    fn the_same_port_key_twice_fails_the_object() {
        let e = serde_yaml::from_str::<PeerAuthentication>(
            "metadata: {name: a}\nspec: {portLevelMtls: {8080: {mode: STRICT}, '8080': {mode: DISABLE}}}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("port \"8080\" is given twice"), "{e}");
    }

    #[test]
    fn unknown_values_are_kept() {
        let p = obj(
            "shop",
            "a",
            "{mtl: {mode: STRICT}, mtls: {mode: strict, extra: 1}, selector: {matchLabel: {app: web}}}",
        );
        assert_eq!(p.mode(), &Mode::Unknown("strict".into()));
        assert_eq!(p.spec.unknown["mtl"], serde_json::json!({"mode": "STRICT"}));
        assert_eq!(p.spec.mtls.as_ref().unwrap().unknown["extra"], 1);
        assert_eq!(
            p.spec.selector.as_ref().unwrap().unknown["matchLabel"],
            serde_json::json!({"app": "web"})
        );
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(json["spec"]["mtls"]["mode"], "strict");
        assert_eq!(json["spec"]["mtl"]["mode"], "STRICT");
    }

    #[test]
    fn valid_objects() {
        for spec in VALID_SPECS {
            assert_eq!(validate(&obj("shop", "p", spec)), Ok(()), "{spec}");
        }
    }

    #[test]
    fn validation_errors_name_the_field() {
        let cases = [
            (
                "{mtls: {mode: STRICTT}}",
                "spec.mtls.mode: \"STRICTT\" is not one of UNSET, DISABLE, PERMISSIVE, STRICT",
            ),
            (
                "{mtls: {mode: strict}}",
                "spec.mtls.mode: \"strict\" is not one of UNSET, DISABLE, PERMISSIVE, STRICT",
            ),
            ("{mtl: {mode: STRICT}}", "spec.mtl: unknown field"),
            (
                "{mtls: {mode: STRICT, mdoe: DISABLE}}",
                "spec.mtls.mdoe: unknown field",
            ),
            (
                "{selector: {matchLabel: {app: web}}}",
                "spec.selector.matchLabel: unknown field",
            ),
            (
                "{selector: {matchLabels: {'': x}}}",
                "spec.selector.matchLabels: empty label key",
            ),
            (
                "{selector: {matchLabels: {app: web}}, portLevelMtls: {8080a: {mode: STRICT}}}",
                "spec.portLevelMtls[\"8080a\"]: not a port number",
            ),
            (
                "{selector: {matchLabels: {app: web}}, portLevelMtls: {0: {mode: STRICT}}}",
                "spec.portLevelMtls[\"0\"]: port out of range 1-65535",
            ),
            (
                "{selector: {matchLabels: {app: web}}, portLevelMtls: {65536: {mode: STRICT}}}",
                "spec.portLevelMtls[\"65536\"]: port out of range 1-65535",
            ),
            (
                "{selector: {matchLabels: {app: web}}, portLevelMtls: {-1: {mode: STRICT}}}",
                "spec.portLevelMtls[\"-1\"]: not a port number",
            ),
            (
                "{selector: {matchLabels: {app: web}}, portLevelMtls: {'': {mode: STRICT}}}",
                "spec.portLevelMtls[\"\"]: not a port number",
            ),
            (
                "{selector: {matchLabels: {app: web}}, portLevelMtls: {80.0: {mode: STRICT}}}",
                "spec.portLevelMtls[\"80.0\"]: not a port number",
            ),
            (
                "{selector: {matchLabels: {app: web}}, portLevelMtls: {8080: {mode: OFF}}}",
                "spec.portLevelMtls[\"8080\"].mode: \"OFF\" is not one of UNSET, DISABLE, PERMISSIVE, STRICT",
            ),
            (
                "{selector: {matchLabels: {app: web}}, portLevelMtls: {8080: {mod: STRICT}}}",
                "spec.portLevelMtls[\"8080\"].mod: unknown field",
            ),
            (
                "{selector: {matchLabels: {app: web}}, portLevelMtls: {8080: {}, '08080': {}}}",
                "spec.portLevelMtls[\"8080\"]: port 8080 is also given as \"08080\"",
            ),
            (
                "{portLevelMtls: {8080: {mode: STRICT}}}",
                "spec.portLevelMtls: only valid with a spec.selector that has matchLabels (a workload policy), as in Istio",
            ),
            (
                "{selector: {matchLabels: {}}, portLevelMtls: {8080: {mode: STRICT}}}",
                "spec.portLevelMtls: only valid with a spec.selector",
            ),
        ];
        for (spec, want) in cases {
            let got = error(spec);
            assert!(got.starts_with(want), "{spec}\n got: {got}\nwant: {want}");
        }
        assert_eq!(
            validate(&pa("metadata: {namespace: shop}\n")).unwrap_err(),
            "metadata.name: must not be empty"
        );
    }

    #[test]
    fn every_problem_is_reported() {
        assert_eq!(
            error("{mtls: {mode: X}, portLevelMtls: {x: {mode: Y}}, z: 1}"),
            "spec.z: unknown field; \
             spec.mtls.mode: \"X\" is not one of UNSET, DISABLE, PERMISSIVE, STRICT; \
             spec.portLevelMtls: only valid with a spec.selector that has matchLabels (a workload policy), as in Istio; \
             spec.portLevelMtls[\"x\"]: not a port number; \
             spec.portLevelMtls[\"x\"].mode: \"Y\" is not one of UNSET, DISABLE, PERMISSIVE, STRICT"
        );
    }

    #[test]
    fn default_is_permissive() {
        let r = effective_mode(&[], ROOT, "shop", &web(), 8080);
        assert_eq!(r.mode, Permissive);
        assert_eq!(r.from, None);
        assert_eq!(r.reason, "no PeerAuthentication sets a mode: the default");
    }

    /// The precedence table: (mesh, namespace, workload) modes, `-` for no object; the expected mode and level.
    #[test]
    fn precedence_table() {
        let cases: &[(&str, &str, &str, MtlsMode, Option<&str>)] = &[
            ("-", "-", "-", Permissive, None),
            ("STRICT", "-", "-", Strict, Some("sinew-system/mesh")),
            ("DISABLE", "-", "-", Disable, Some("sinew-system/mesh")),
            ("STRICT", "PERMISSIVE", "-", Permissive, Some("shop/ns")),
            ("PERMISSIVE", "STRICT", "-", Strict, Some("shop/ns")),
            ("-", "DISABLE", "-", Disable, Some("shop/ns")),
            ("STRICT", "PERMISSIVE", "DISABLE", Disable, Some("shop/wl")),
            ("DISABLE", "DISABLE", "STRICT", Strict, Some("shop/wl")),
            ("-", "-", "PERMISSIVE", Permissive, Some("shop/wl")),
            // UNSET inherits from the next level, through any number of levels.
            ("STRICT", "UNSET", "-", Strict, Some("sinew-system/mesh")),
            (
                "STRICT",
                "UNSET",
                "UNSET",
                Strict,
                Some("sinew-system/mesh"),
            ),
            ("-", "DISABLE", "UNSET", Disable, Some("shop/ns")),
            ("UNSET", "UNSET", "UNSET", Permissive, None),
            ("-", "-", "UNSET", Permissive, None),
        ];
        for &(mesh, ns, wl, mode, decider) in cases {
            // UNSET is written both ways: as `mtls: {mode: UNSET}` (mesh, namespace) and as no `mtls` (workload).
            let spec = |m: &str, selector: &str| match m {
                "UNSET" if selector.is_empty() => "{mtls: {mode: UNSET}}".to_owned(),
                "UNSET" => format!("{{{selector}}}"),
                _ if selector.is_empty() => format!("{{mtls: {{mode: {m}}}}}"),
                _ => format!("{{{selector}, mtls: {{mode: {m}}}}}"),
            };
            let mut policies = Vec::new();
            if mesh != "-" {
                policies.push(obj(ROOT, "mesh", &spec(mesh, "")));
            }
            if ns != "-" {
                policies.push(obj("shop", "ns", &spec(ns, "")));
            }
            if wl != "-" {
                let s = spec(wl, "selector: {matchLabels: {app: web}}");
                policies.push(obj("shop", "wl", &s));
            }
            // Listing order must not matter.
            for reversed in [false, true] {
                if reversed {
                    policies.reverse();
                }
                assert_eq!(
                    resolve(&policies, 8080),
                    (mode, decider.map(str::to_owned)),
                    "mesh={mesh} ns={ns} workload={wl} reversed={reversed}"
                );
            }
        }
    }

    #[test]
    fn reasons_say_which_level_decided_and_what_was_inherited() {
        let policies = [
            obj(ROOT, "mesh", "{mtls: {mode: STRICT}}"),
            obj("shop", "ns", "{mtls: {mode: UNSET}}"),
            obj("shop", "wl", "{selector: {matchLabels: {app: web}}}"),
        ];
        let r = effective_mode(&policies, ROOT, "shop", &web(), 80);
        assert_eq!(
            r.reason,
            "mesh policy sinew-system/mesh; UNSET, inherited: workload policy shop/wl, namespace policy shop/ns"
        );
        let r = effective_mode(&policies[..2], ROOT, "shop", &web(), 80);
        assert_eq!(
            r.reason,
            "mesh policy sinew-system/mesh; UNSET, inherited: namespace policy shop/ns"
        );
        let r = effective_mode(&policies[..1], ROOT, "shop", &web(), 80);
        assert_eq!(r.reason, "mesh policy sinew-system/mesh");
    }

    #[test]
    fn port_level_settings_of_the_workload_policy_win() {
        let policies = [
            obj(ROOT, "mesh", "{mtls: {mode: PERMISSIVE}}"),
            obj("shop", "ns", "{mtls: {mode: DISABLE}}"),
            obj(
                "shop",
                "wl",
                "{selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}, \
                 portLevelMtls: {8080: {mode: DISABLE}, '9090': {mode: PERMISSIVE}, 9091: {mode: UNSET}}}",
            ),
        ];
        assert_eq!(resolve(&policies, 8080), (Disable, from("shop/wl")));
        assert_eq!(resolve(&policies, 9090), (Permissive, from("shop/wl")));
        // UNSET on the port: the workload policy's own mode.
        assert_eq!(resolve(&policies, 9091), (Strict, from("shop/wl")));
        // Other ports: the workload policy's mode.
        assert_eq!(resolve(&policies, 443), (Strict, from("shop/wl")));
        let r = effective_mode(&policies, ROOT, "shop", &web(), 8080);
        assert_eq!(r.reason, "portLevelMtls[8080] of workload policy shop/wl");
        let r = effective_mode(&policies, ROOT, "shop", &web(), 9091);
        assert_eq!(
            r.reason,
            "workload policy shop/wl; UNSET, inherited: portLevelMtls[9091] of shop/wl"
        );
    }

    #[test]
    fn port_level_unset_falls_back_to_the_inherited_mode() {
        // The workload policy has only port settings: other ports and UNSET ports inherit from the namespace.
        let policies = [
            obj("shop", "ns", "{mtls: {mode: STRICT}}"),
            obj(
                "shop",
                "wl",
                "{selector: {matchLabels: {app: web}}, portLevelMtls: {8080: {mode: DISABLE}, 9091: {}}}",
            ),
        ];
        assert_eq!(resolve(&policies, 8080), (Disable, from("shop/wl")));
        assert_eq!(resolve(&policies, 9091), (Strict, from("shop/ns")));
        assert_eq!(resolve(&policies, 80), (Strict, from("shop/ns")));
        // Without anything above it: the default.
        assert_eq!(resolve(&policies[1..], 9091), (Permissive, None));
    }

    #[test]
    fn port_level_settings_only_apply_through_a_matching_selector() {
        // Invalid (validate rejects it), but if it arrives: a namespace policy's ports are ignored, as in Istio.
        let ns = obj(
            "shop",
            "ns",
            "{mtls: {mode: STRICT}, portLevelMtls: {8080: {mode: DISABLE}}}",
        );
        assert_eq!(resolve(&[ns], 8080), (Strict, from("shop/ns")));
        // A workload policy for other pods does not apply at all.
        let other = obj(
            "shop",
            "db",
            "{selector: {matchLabels: {app: db}}, portLevelMtls: {8080: {mode: DISABLE}}}",
        );
        assert_eq!(resolve(&[other], 8080), (Permissive, None));
    }

    #[test]
    fn selectors_match_a_subset_of_the_pod_labels() {
        let wl = obj(
            "shop",
            "wl",
            "{selector: {matchLabels: {app: web, tier: front}}, mtls: {mode: STRICT}}",
        );
        let policies = [wl];
        let mode =
            |l: &[(&str, &str)]| effective_mode(&policies, ROOT, "shop", &labels(l), 80).mode;
        assert_eq!(
            mode(&[("app", "web"), ("tier", "front"), ("v", "1")]),
            Strict
        );
        assert_eq!(mode(&[("app", "web")]), Permissive);
        assert_eq!(mode(&[("app", "web"), ("tier", "back")]), Permissive);
        assert_eq!(mode(&[]), Permissive);
    }

    #[test]
    fn other_namespaces_do_not_apply() {
        let policies = [
            obj("other", "ns", "{mtls: {mode: STRICT}}"),
            obj(
                "other",
                "wl",
                "{selector: {matchLabels: {app: web}}, mtls: {mode: DISABLE}}",
            ),
        ];
        assert_eq!(resolve(&policies, 80), (Permissive, None));
    }

    #[test]
    fn root_namespace() {
        let mesh = obj(ROOT, "mesh", "{mtls: {mode: STRICT}}");
        // A selector policy in the root namespace is ignored, as in Istio, even for pods there.
        let root_wl = obj(
            ROOT,
            "wl",
            "{selector: {matchLabels: {app: web}}, mtls: {mode: DISABLE}}",
        );
        let policies = [mesh.clone(), root_wl];
        assert_eq!(resolve(&policies, 80), (Strict, from("sinew-system/mesh")));
        let r = effective_mode(&policies, ROOT, ROOT, &web(), 80);
        assert_eq!((r.mode, r.from), (Strict, from("sinew-system/mesh")));
        // For a pod in the root namespace, a no-selector policy there is the mesh policy (counted once).
        let r = effective_mode(&policies[..1], ROOT, ROOT, &web(), 80);
        assert_eq!(r.reason, "mesh policy sinew-system/mesh");
        // Another root namespace: the same object is then a plain namespace policy of sinew-system.
        let r = effective_mode(&[mesh], "istio-system", "shop", &web(), 80);
        assert_eq!((r.mode, r.from), (Permissive, None));
    }

    #[test]
    fn ties_at_a_level_go_to_the_first_by_namespace_and_name() {
        let policies = [
            obj("shop", "b-strict", "{mtls: {mode: STRICT}}"),
            obj("shop", "a-disable", "{mtls: {mode: DISABLE}}"),
            obj(
                "shop",
                "z-wl",
                "{selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}}",
            ),
            obj(
                "shop",
                "m-wl",
                "{selector: {matchLabels: {tier: x}}, mtls: {mode: DISABLE}}",
            ),
        ];
        // Namespace level: a-disable wins over b-strict whatever the order.
        assert_eq!(
            resolve(&policies[..2], 80),
            (Disable, from("shop/a-disable"))
        );
        let reversed: Vec<_> = policies[..2].iter().rev().cloned().collect();
        assert_eq!(resolve(&reversed, 80), (Disable, from("shop/a-disable")));
        // Workload level: m-wl does not select this pod, so z-wl decides.
        assert_eq!(resolve(&policies, 80), (Strict, from("shop/z-wl")));
        // Both select it: m-wl sorts first.
        let both = labels(&[("app", "web"), ("tier", "x")]);
        let r = effective_mode(&policies, ROOT, "shop", &both, 80);
        assert_eq!((r.mode, r.from), (Disable, from("shop/m-wl")));
    }

    #[test]
    fn an_unset_winner_does_not_let_the_next_object_at_its_level_decide() {
        // As in Istio: one object per level. a-unset wins the namespace level and inherits from the mesh;
        // b-disable is ignored.
        let policies = [
            obj(ROOT, "mesh", "{mtls: {mode: STRICT}}"),
            obj("shop", "b-disable", "{mtls: {mode: DISABLE}}"),
            obj("shop", "a-unset", "{}"),
        ];
        assert_eq!(resolve(&policies, 80), (Strict, from("sinew-system/mesh")));
    }

    #[test]
    fn unknown_modes_resolve_as_strict() {
        let policies = [
            obj("shop", "ns", "{mtls: {mode: DISABLED}}"),
            obj(
                "shop",
                "wl",
                "{selector: {matchLabels: {app: web}}, mtls: {mode: DISABLE}, portLevelMtls: {8080: {mode: off}}}",
            ),
        ];
        assert_eq!(resolve(&policies[..1], 80), (Strict, from("shop/ns")));
        let r = effective_mode(&policies[..1], ROOT, "shop", &web(), 80);
        assert_eq!(
            r.reason,
            "namespace policy shop/ns (unknown mode \"DISABLED\" read as STRICT)"
        );
        assert_eq!(resolve(&policies, 8080), (Strict, from("shop/wl")));
        assert_eq!(resolve(&policies, 80), (Disable, from("shop/wl")));
    }

    #[test]
    fn two_keys_for_one_port_take_the_strictest() {
        let p = obj(
            "shop",
            "wl",
            "{selector: {matchLabels: {app: web}}, portLevelMtls: {'08080': {mode: DISABLE}, 8080: {mode: STRICT}, '8080a': {mode: DISABLE}}}",
        );
        assert!(validate(&p).is_err());
        assert_eq!(resolve(&[p], 8080), (Strict, from("shop/wl")));
    }

    #[test]
    fn parse_port_accepts_only_decimal_ports() {
        assert_eq!(parse_port("1"), Ok(1));
        assert_eq!(parse_port("65535"), Ok(65535));
        assert_eq!(parse_port("08080"), Ok(8080));
        for bad in ["", "0", "65536", "99999999999", "+80", " 80", "80a", "0x50"] {
            assert!(parse_port(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn crd_is_namespaced_and_strict() {
        let crd = serde_json::to_value(PeerAuthentication::crd()).unwrap();
        assert_eq!(
            crd["metadata"]["name"],
            "peerauthentications.security.sinew.dev"
        );
        let spec = &crd["spec"];
        assert_eq!(spec["scope"], "Namespaced");
        assert_eq!(spec["names"]["shortNames"], serde_json::json!(["pa"]));
        let version = &spec["versions"][0];
        assert_eq!(version["name"], "v1alpha1");
        // Unknown fields are refused by the API server, not preserved; `crds.rs` walks the whole schema.
        let text = serde_json::to_string(&crd).unwrap();
        assert!(
            !text.contains("x-kubernetes-preserve-unknown-fields"),
            "{text}"
        );
        assert!(!text.contains("\"unknown\""), "{text}");
        let schema = &version["schema"]["openAPIV3Schema"]["properties"]["spec"];
        assert_eq!(
            schema["x-kubernetes-validations"][0]["rule"], PORT_LEVEL_NEEDS_SELECTOR_RULE,
            "{schema:#}"
        );
        let selector = &schema["properties"]["selector"];
        assert_eq!(selector.get("nullable"), None, "{selector:#}");
        assert_eq!(
            selector["properties"]["matchLabels"]["x-kubernetes-validations"][0]["rule"],
            LABEL_KEYS_NOT_EMPTY_RULE
        );
        let mtls = &schema["properties"]["mtls"];
        assert_eq!(
            mtls["properties"]["mode"]["enum"],
            serde_json::json!(["UNSET", "DISABLE", "PERMISSIVE", "STRICT"]),
            "{mtls:#}"
        );
        let ports = &schema["properties"]["portLevelMtls"];
        assert_eq!(ports["type"], "object", "{schema:#}");
        assert_eq!(ports["maxProperties"], 65535);
        assert_eq!(
            ports["x-kubernetes-validations"][0]["rule"],
            port_keys_rule()
        );
        assert_eq!(
            ports["additionalProperties"]["properties"]["mode"]["enum"],
            mtls["properties"]["mode"]["enum"]
        );
    }
}
