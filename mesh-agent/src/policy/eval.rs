//! The reference evaluator: what an `AuthorizationPolicy` set decides for one L4 request, and per-rule statuses.
//!
//! This is the specification the kernel compiler is tested against, and there is one implementation of it:
//! [`Evaluator`], which parses and checks every rule once when it is built, so that a compiler can evaluate
//! millions of requests against the same policies. [`evaluate`], [`evaluate_with_root`], [`statuses`] and
//! [`rule_status`] are thin wrappers over the same compiled rules.
//!
//! # Semantics
//!
//! - Scope: a policy applies to a workload if it is in the workload's namespace, or in the mesh root namespace,
//!   and it has no selector or its `matchLabels` are all among the workload's labels.
//! - Order: AUDIT policies never change the verdict (they are reported in [`Verdict::audit`]); any matching DENY
//!   rule denies; else, if no ALLOW policy applies, the request is allowed; else a matching ALLOW rule allows;
//!   else the request is denied (default deny). Among several matching policies the decider is the first by
//!   `namespace/name`, then rule index, so verdicts do not depend on the order policies were listed in.
//! - A rule: `from` entries ORed, `to` entries ORed, `from`/`to`/`when` ANDed, absent ones match everything
//!   (`rules: [{}]` matches every request; `spec: {}` has no rules and matches none). Inside one source or
//!   operation the present fields are ANDed; a field matches if any value matches, a `not*` field if none does.
//! - `ports` are the workload's target ports (the port the connection arrives on at the pod), never Service
//!   ports. AuthorizationPolicy has no protocol field: ports match TCP and UDP alike.
//!
//! # Unauthenticated sources (Istio security advisory 2021-003)
//!
//! `principals` and `namespaces` only ever match an authenticated (mTLS) peer: a plaintext source has no identity,
//! so it is in no namespace and has no principal. `notPrincipals` and `notNamespaces` are the negation of that
//! membership, so a plaintext source DOES match them: its identity is in none of the listed values. This is the
//! direction that never widens access where the field is used to shut traffic out: `DENY` with
//! `notNamespaces: [prod]` ("deny everything not from prod") also denies plaintext, which is what advisory
//! 2021-003 was about (Istio used to let plaintext through such a DENY). The same rule in an ALLOW policy means
//! "allow everything not from prod" and therefore allows plaintext, as in Istio; a policy that wants only
//! authenticated peers says so with `principals: ["*"]`.
//!
//! # No silent widening
//!
//! Parts of a rule that cannot be honoured by an L4 enforcer (`methods`, `paths`, `hosts` and their `not*`
//! forms, `when`, and Istio's JWT/XFF source fields `requestPrincipals`, `remoteIpBlocks` and their `not*` forms)
//! make the rule [`RuleStatus::ProxyRequired`]. Values that cannot be parsed, unknown fields, empty or missing
//! `source`/`operation`, and an unknown `action` make it [`RuleStatus::Rejected`]. Neither is dropped silently:
//!
//! - In ALLOW (and AUDIT) policies such a rule matches nothing: we cannot check the condition, so we do not grant
//!   what it would grant.
//! - In DENY policies such a rule is enforced on what can be checked, resolving every doubt towards matching more,
//!   so the deny is broader, never narrower: L7 fields, `when` and unknown fields are ignored; an unparsable value
//!   in a positive field (`ipBlocks`, `ports`, `principals`, `namespaces`) makes that field match everything it
//!   could match (every source IP, every port, every authenticated peer); an unparsable value in a `not*` field is
//!   left out of it (so it excludes less); an empty or missing `source`/`operation` matches everything.
//! - A policy whose `action` is unknown (Istio's `CUSTOM`, a typo) is enforced as a DENY in the same fail-closed way:
//!   it could have been meant to deny, and enforcing it as an ALLOW would add a default deny it did not ask for
//!   while granting what its rules match.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use super::{Action, AuthorizationPolicy, DEFAULT_ROOT_NAMESPACE, Operation, Port, Rule, Source};

/// An authenticated (mTLS) peer: its SPIFFE ID is `spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl Identity {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Identity {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        }
    }

    /// The principal as Istio matches it: the SPIFFE ID without `spiffe://`.
    pub fn principal(&self) -> String {
        format!(
            "{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
}

/// One L4 request (a connection or, for UDP, a flow) as the enforcer sees it at the destination workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// `None`: unauthenticated (plaintext, or from outside the mesh).
    pub source: Option<Identity>,
    pub source_ip: IpAddr,
    pub dest_namespace: String,
    pub dest_labels: BTreeMap<String, String>,
    /// The workload's target port (the container port), not the Service port.
    pub dest_port: u16,
    pub protocol: Protocol,
}

/// The policy rule that decided a verdict (or, in [`Verdict::audit`], that an AUDIT policy matched).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decider {
    /// `namespace/name`.
    pub policy: String,
    pub action: Action,
    pub rule_index: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    /// `None` for the two defaults: no ALLOW policy applies (allow), or ALLOW policies apply and none matched
    /// (deny).
    pub deciding: Option<Decider>,
    /// Why, in words.
    pub reason: String,
    /// The first matching rule of every applicable AUDIT policy, by `namespace/name`. Never changes `allowed`.
    pub audit: Vec<Decider>,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let word = if self.allowed { "allow" } else { "deny" };
        match &self.deciding {
            Some(d) => {
                write!(
                    f,
                    "{word} by {} rule {} ({}",
                    d.policy, d.rule_index, d.action
                )?;
                if matches!(d.action, Action::Unknown(_)) {
                    f.write_str(" as DENY")?;
                }
                f.write_str(")")
            }
            None => write!(f, "{word}: {}", self.reason),
        }
    }
}

/// Whether a rule is enforced exactly by the kernel datapath.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RuleStatus {
    /// Every field is L4 and valid: enforced exactly.
    KernelEnforced,
    /// Has L7 fields or conditions: an ALLOW rule matches nothing, a DENY rule is enforced on its L4 part only.
    ProxyRequired { reason: String },
    /// Invalid: an ALLOW rule matches nothing, a DENY rule is enforced fail-closed.
    Rejected { reason: String },
}

/// Default reason when ALLOW policies apply and none matched.
pub const DEFAULT_DENY_REASON: &str =
    "an ALLOW policy selects the workload and no rule matched (default deny)";
/// Default reason when no ALLOW policy applies.
pub const DEFAULT_ALLOW_REASON: &str = "no ALLOW policy selects the workload";

/// Evaluates `policies` for `req`, with the default mesh root namespace ([`DEFAULT_ROOT_NAMESPACE`]).
pub fn evaluate(policies: &[AuthorizationPolicy], req: &Request) -> Verdict {
    evaluate_with_root(policies, req, DEFAULT_ROOT_NAMESPACE)
}

/// Evaluates `policies` for `req`; policies in `root_namespace` apply to workloads in every namespace.
///
/// The same as `Evaluator::new(policies, root_namespace).evaluate(req)`; build an [`Evaluator`] once to evaluate
/// many requests against the same policies.
pub fn evaluate_with_root(
    policies: &[AuthorizationPolicy],
    req: &Request,
    root_namespace: &str,
) -> Verdict {
    Evaluator::new(policies, root_namespace).evaluate(req)
}

/// Whether `policy` applies to the destination workload of `req`.
pub fn applies_to(policy: &AuthorizationPolicy, req: &Request, root_namespace: &str) -> bool {
    selects(
        policy,
        &req.dest_namespace,
        &req.dest_labels,
        root_namespace,
    )
}

/// Whether `policy` applies to a workload in `namespace` with `labels`.
fn selects(
    policy: &AuthorizationPolicy,
    namespace: &str,
    labels: &BTreeMap<String, String>,
    root_namespace: &str,
) -> bool {
    let ns = policy.namespace();
    (ns == namespace || ns == root_namespace)
        && policy
            .spec
            .selector
            .as_ref()
            .is_none_or(|s| s.matches(labels))
}

/// The status of every rule of `policy`, in order.
pub fn statuses(policy: &AuthorizationPolicy) -> Vec<RuleStatus> {
    (0..policy.spec.rules.len())
        .map(|i| rule_status(policy, i))
        .collect()
}

/// The status of `policy.spec.rules[rule_index]` (Rejected if there is no such rule).
pub fn rule_status(policy: &AuthorizationPolicy, rule_index: usize) -> RuleStatus {
    if rule_index >= policy.spec.rules.len() {
        return RuleStatus::Rejected {
            reason: format!("rules[{rule_index}]: no such rule"),
        };
    }
    compile_rule(policy, rule_index).status()
}

/// Checks a policy before it is accepted (by the file source, later by an admission webhook). `Err` names every
/// problem with its field path, separated by `"; "`, e.g.
/// `spec.rules[0].from[0].source.ipBlocks[1]: "10.0.0.0/33" is not a CIDR`.
///
/// Rejected: a missing `metadata.name`; an unknown `spec.action` or `spec` field; every problem that makes a rule
/// [`RuleStatus::Rejected`] (malformed principal or namespace, invalid CIDR, port out of range or not a number,
/// unknown fields, empty `from: []`/`to: []`, missing or empty `source`/`operation`); and IPv4-mapped IPv6 blocks
/// (inside `::ffff:0:0/96`), which must be written in their IPv4 form. Rules that need a proxy (L7 fields, `when`)
/// are valid: their status says how they are enforced.
pub fn validate(policy: &AuthorizationPolicy) -> Result<(), String> {
    let mut problems = Vec::new();
    if policy.name().is_empty() {
        problems.push("metadata.name: must not be empty".to_string());
    }
    if let Action::Unknown(a) = &policy.spec.action {
        problems.push(format!(
            "spec.action: {a:?} is not one of ALLOW, DENY, AUDIT"
        ));
    }
    for key in policy.spec.unknown.keys() {
        problems.push(format!("spec.{key}: unknown field"));
    }
    for (i, rule) in policy.spec.rules.iter().enumerate() {
        // The unknown action is reported once above, not once per rule.
        let compiled = compile_rule(policy, i);
        problems.extend(
            compiled
                .problems
                .iter()
                .filter(|p| !p.starts_with("spec.action:"))
                .map(|p| format!("spec.{p}")),
        );
        for (j, from) in rule.from.iter().flatten().enumerate() {
            let Some(source) = &from.source else { continue };
            for (name, blocks) in [
                ("ipBlocks", &source.ip_blocks),
                ("notIpBlocks", &source.not_ip_blocks),
            ] {
                for (k, block) in blocks.iter().enumerate() {
                    if let Some(v4) = ipv4_mapped_form(block) {
                        problems.push(format!(
                            "spec.rules[{i}].from[{j}].source.{name}[{k}]: {block:?} is an IPv4-mapped IPv6 \
                             block; write the IPv4 form {v4}"
                        ));
                    }
                }
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// The IPv4 spelling of an IPv6 block inside `::ffff:0:0/96` (`::ffff:10.0.0.0/104` -> `10.0.0.0/8`), if it is
/// one.
fn ipv4_mapped_form(block: &str) -> Option<String> {
    let (addr, len) = match block.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (block, None),
    };
    let IpAddr::V6(v6) = addr.parse::<IpAddr>().ok()? else {
        return None;
    };
    let cidr = parse_cidr(block).ok()?;
    let v4 = v6.to_ipv4_mapped()?;
    // parse_cidr turned it into IPv4 exactly when it is inside ::ffff:0:0/96.
    cidr.addr.is_ipv4().then(|| match len {
        Some(_) => format!("{v4}/{}", cidr.len),
        None => v4.to_string(),
    })
}

/// A set of policies with their rules compiled once, to evaluate many requests.
///
/// This is the one implementation of the semantics in the module documentation: [`evaluate`] and
/// [`evaluate_with_root`] build an `Evaluator` for a single request. A kernel compiler that enumerates requests
/// uses [`applicable`](Self::applicable) once per workload and [`evaluate_among`](Self::evaluate_among) per
/// request, and [`ports`](Self::ports) / [`cidrs`](Self::cidrs) to know which ports and addresses can make a
/// difference (any two values that fall in the same CIDRs and are not named ports get the same verdict).
pub struct Evaluator<'a> {
    policies: &'a [AuthorizationPolicy],
    root_namespace: String,
    /// Indices into `policies` in decider order: by `namespace/name`, then listing order.
    order: Vec<usize>,
    /// `rank[i]`: the position of policy `i` in `order`.
    rank: Vec<usize>,
    /// `namespace/name` of each policy.
    keys: Vec<String>,
    /// Each policy's rules, compiled.
    rules: Vec<Vec<CompiledRule>>,
    /// Each policy's rule statuses.
    statuses: Vec<Vec<RuleStatus>>,
}

impl<'a> Evaluator<'a> {
    /// Compiles every rule of `policies`; policies in `root_namespace` apply to workloads in every namespace.
    pub fn new(policies: &'a [AuthorizationPolicy], root_namespace: &str) -> Self {
        let mut order: Vec<usize> = (0..policies.len()).collect();
        // Stable: policies with the same namespace/name keep their listing order.
        order.sort_by(|&a, &b| {
            let (a, b) = (&policies[a], &policies[b]);
            (a.namespace(), a.name()).cmp(&(b.namespace(), b.name()))
        });
        let mut rank = vec![0; policies.len()];
        for (position, &i) in order.iter().enumerate() {
            rank[i] = position;
        }
        let rules: Vec<Vec<CompiledRule>> = policies
            .iter()
            .map(|p| {
                (0..p.spec.rules.len())
                    .map(|i| compile_rule(p, i))
                    .collect()
            })
            .collect();
        let statuses = rules
            .iter()
            .map(|rules| rules.iter().map(CompiledRule::status).collect())
            .collect();
        Evaluator {
            policies,
            root_namespace: root_namespace.to_string(),
            order,
            rank,
            keys: policies.iter().map(AuthorizationPolicy::key).collect(),
            rules,
            statuses,
        }
    }

    /// The policies this evaluator was built from.
    pub fn policies(&self) -> &'a [AuthorizationPolicy] {
        self.policies
    }

    /// Indices (into the policies) of the policies that apply to a workload in `namespace` with `labels`, in
    /// decider order (by `namespace/name`).
    pub fn applicable(&self, namespace: &str, labels: &BTreeMap<String, String>) -> Vec<usize> {
        self.order
            .iter()
            .copied()
            .filter(|&i| selects(&self.policies[i], namespace, labels, &self.root_namespace))
            .collect()
    }

    /// The verdict for `req`, given that exactly the policies `applicable` apply to its destination, in the
    /// order [`applicable`](Self::applicable) returns them. `req.dest_namespace` and `req.dest_labels` are not
    /// looked at.
    pub fn evaluate_among(&self, applicable: &[usize], req: &Request) -> Verdict {
        debug_assert!(
            applicable
                .windows(2)
                .all(|w| self.rank[w[0]] < self.rank[w[1]]),
            "applicable policies must be in the order Evaluator::applicable returns"
        );
        let peer = Peer::of(req);
        let first_match = |i: usize| -> Option<Decider> {
            let rule_index = self.rules[i].iter().position(|c| c.matches(&peer))?;
            Some(Decider {
                policy: self.keys[i].clone(),
                action: self.policies[i].spec.action.clone(),
                rule_index,
            })
        };
        let action = |i: usize| &self.policies[i].spec.action;

        let audit: Vec<Decider> = applicable
            .iter()
            .filter(|&&i| *action(i) == Action::Audit)
            .filter_map(|&i| first_match(i))
            .collect();

        let deny = applicable
            .iter()
            .filter(|&&i| mode(action(i)) == Mode::Broad)
            .find_map(|&i| first_match(i).map(|d| (i, d)));
        if let Some((i, d)) = deny {
            let mut reason = format!(
                "rule {} of {} ({}) matches",
                d.rule_index, d.policy, d.action
            );
            if let Action::Unknown(a) = &d.action {
                reason.push_str(&format!("; action {a:?} is unknown, enforced as DENY"));
            }
            match &self.statuses[i][d.rule_index] {
                RuleStatus::KernelEnforced => {}
                RuleStatus::ProxyRequired { .. } => reason.push_str(
                    " on its L4 part (L7 fields ignored: the deny is broader, never narrower)",
                ),
                RuleStatus::Rejected { reason: r } => {
                    reason.push_str(&format!(" (rejected, enforced fail-closed: {r})"))
                }
            }
            return Verdict {
                allowed: false,
                deciding: Some(d),
                reason,
                audit,
            };
        }

        let mut allow_policies = applicable
            .iter()
            .copied()
            .filter(|&i| *action(i) == Action::Allow)
            .peekable();
        if allow_policies.peek().is_none() {
            return Verdict {
                allowed: true,
                deciding: None,
                reason: DEFAULT_ALLOW_REASON.to_string(),
                audit,
            };
        }
        match allow_policies.find_map(first_match) {
            Some(d) => Verdict {
                allowed: true,
                reason: format!(
                    "rule {} of {} ({}) matches",
                    d.rule_index, d.policy, d.action
                ),
                deciding: Some(d),
                audit,
            },
            None => Verdict {
                allowed: false,
                deciding: None,
                reason: DEFAULT_DENY_REASON.to_string(),
                audit,
            },
        }
    }

    /// The verdict for `req`: `evaluate_among(&self.applicable(&req.dest_namespace, &req.dest_labels), req)`.
    pub fn evaluate(&self, req: &Request) -> Verdict {
        self.evaluate_among(&self.applicable(&req.dest_namespace, &req.dest_labels), req)
    }

    /// The status of every rule of policy `policy` (an index into the policies), in order.
    pub fn statuses(&self, policy: usize) -> &[RuleStatus] {
        &self.statuses[policy]
    }

    /// Every valid port number named in `ports`/`notPorts` of the rules of the policies `applicable`. A port
    /// that is not in this set gets the same verdict as any other port not in it.
    pub fn ports(&self, applicable: &[usize]) -> BTreeSet<u16> {
        let mut ports = BTreeSet::new();
        let operations = applicable
            .iter()
            .flat_map(|&i| &self.rules[i])
            .flat_map(|rule| &rule.to);
        for operation in operations {
            for field in [&operation.ports, &operation.not_ports]
                .into_iter()
                .flatten()
            {
                ports.extend(field.values.iter().copied());
            }
        }
        ports
    }

    /// The ports named by these policies, grouped so that ports of one group are named by exactly the same
    /// `ports`/`notPorts` fields: no rule can tell them apart, so they get the same verdict from every source and
    /// one of them stands for all. Groups in ascending order of their first port, each sorted.
    pub fn port_groups(&self, applicable: &[usize]) -> Vec<Vec<u16>> {
        // For each port, the fields naming it: (policy, rule, operation, negated).
        type Field = (usize, usize, usize, bool);
        let mut named: BTreeMap<u16, Vec<Field>> = BTreeMap::new();
        for &p in applicable {
            for (r, rule) in self.rules[p].iter().enumerate() {
                for (o, operation) in rule.to.iter().enumerate() {
                    for (negated, field) in
                        [(false, &operation.ports), (true, &operation.not_ports)]
                    {
                        for &port in field.iter().flat_map(|f| &f.values) {
                            let tags = named.entry(port).or_default();
                            let tag = (p, r, o, negated);
                            if tags.last() != Some(&tag) {
                                tags.push(tag);
                            }
                        }
                    }
                }
            }
        }
        let mut groups: BTreeMap<Vec<Field>, Vec<u16>> = BTreeMap::new();
        for (port, tags) in named {
            groups.entry(tags).or_default().push(port);
        }
        let mut out: Vec<Vec<u16>> = groups.into_values().collect();
        out.sort();
        out
    }

    /// Every valid CIDR in `ipBlocks`/`notIpBlocks` of any rule of any policy: the network address (host bits
    /// zero) and the prefix length in its own family (IPv4-mapped IPv6 blocks are given as IPv4), deduplicated
    /// and sorted. A source address gets the same verdict as any other that falls in exactly the same CIDRs.
    pub fn cidrs(&self) -> Vec<(IpAddr, u8)> {
        let mut cidrs = BTreeSet::new();
        let sources = self.rules.iter().flatten().flat_map(|rule| &rule.from);
        for source in sources {
            for field in [&source.ip_blocks, &source.not_ip_blocks]
                .into_iter()
                .flatten()
            {
                cidrs.extend(field.values.iter().map(|c| (c.network(), c.len)));
            }
        }
        cidrs.into_iter().collect()
    }
}

/// How doubts (invalid values, unenforceable fields) resolve for a policy's rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// ALLOW and AUDIT: a rule that cannot be checked exactly matches nothing.
    Exact,
    /// DENY and unknown actions: a rule is checked on what can be checked, doubts resolve towards matching.
    Broad,
}

fn mode(action: &Action) -> Mode {
    match action {
        Action::Allow | Action::Audit => Mode::Exact,
        Action::Deny | Action::Unknown(_) => Mode::Broad,
    }
}

/// What a rule looks at in a request, prepared once per request.
struct Peer<'r> {
    /// The principal as Istio matches it (no `spiffe://`); `None` for plaintext.
    principal: Option<String>,
    namespace: Option<&'r str>,
    /// IPv4-mapped IPv6 addresses as IPv4, as CIDRs are kept.
    ip: IpAddr,
    port: u16,
}

impl<'r> Peer<'r> {
    fn of(req: &'r Request) -> Self {
        Peer {
            principal: req.source.as_ref().map(Identity::principal),
            namespace: req.source.as_ref().map(|i| i.namespace.as_str()),
            ip: req.source_ip.to_canonical(),
            port: req.dest_port,
        }
    }
}

/// A rule parsed for evaluation, with what was wrong with it.
struct CompiledRule {
    mode: Mode,
    /// Rejections, each naming its field.
    problems: Vec<String>,
    /// Fields that need a proxy.
    l7: Vec<String>,
    /// ORed; empty: every source.
    from: Vec<SourceMatch>,
    /// ORed; empty: every operation.
    to: Vec<OperationMatch>,
}

impl CompiledRule {
    fn matches(&self, peer: &Peer) -> bool {
        if self.mode == Mode::Exact && !(self.problems.is_empty() && self.l7.is_empty()) {
            return false;
        }
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(peer)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(peer)))
    }

    fn status(&self) -> RuleStatus {
        let broad = self.mode == Mode::Broad;
        if !self.problems.is_empty() {
            let mut reason = self.problems.join("; ");
            if !self.l7.is_empty() {
                reason.push_str(&format!("; also needs a proxy for {}", self.l7.join(", ")));
            }
            reason.push_str(if broad {
                "; enforced fail-closed as a DENY: invalid values match everything they could, unknown fields are ignored"
            } else {
                "; the rule matches nothing"
            });
            return RuleStatus::Rejected { reason };
        }
        if !self.l7.is_empty() {
            let consequence = if broad {
                "the DENY rule is enforced on its L4 part only (broader)"
            } else {
                "the rule matches nothing without a proxy"
            };
            return RuleStatus::ProxyRequired {
                reason: format!(
                    "{} cannot be enforced at L4; {consequence}",
                    self.l7.join(", ")
                ),
            };
        }
        RuleStatus::KernelEnforced
    }
}

/// A present, non-empty field. `invalid`: some values could not be parsed (left out of `values`).
struct Field<T> {
    values: Vec<T>,
    invalid: bool,
}

impl<T> Field<T> {
    /// A positive field: any value matches. In a DENY rule an invalid value could have matched anything.
    fn any(&self, f: impl Fn(&T) -> bool) -> bool {
        self.invalid || self.values.iter().any(f)
    }

    /// A `not*` field: no value matches. Invalid values are left out, so they exclude nothing.
    fn none(&self, f: impl Fn(&T) -> bool) -> bool {
        !self.values.iter().any(f)
    }
}

#[derive(Default)]
struct SourceMatch {
    principals: Option<Field<Pattern>>,
    not_principals: Option<Field<Pattern>>,
    namespaces: Option<Field<Pattern>>,
    not_namespaces: Option<Field<Pattern>>,
    ip_blocks: Option<Field<Cidr>>,
    not_ip_blocks: Option<Field<Cidr>>,
}

impl SourceMatch {
    fn matches(&self, peer: &Peer) -> bool {
        let principal = peer.principal.as_deref();
        positive_identity(&self.principals, principal)
            && negative_identity(&self.not_principals, principal)
            && positive_identity(&self.namespaces, peer.namespace)
            && negative_identity(&self.not_namespaces, peer.namespace)
            && self
                .ip_blocks
                .as_ref()
                .is_none_or(|f| f.any(|c| c.contains(peer.ip)))
            && self
                .not_ip_blocks
                .as_ref()
                .is_none_or(|f| f.none(|c| c.contains(peer.ip)))
    }
}

/// `principals`/`namespaces`: only an authenticated peer can be in the list.
fn positive_identity(field: &Option<Field<Pattern>>, id: Option<&str>) -> bool {
    match (field, id) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(f), Some(id)) => f.any(|p| p.matches(id)),
    }
}

/// `notPrincipals`/`notNamespaces`: an unauthenticated peer is in none of the listed values, so it matches
/// (see the module documentation: this is what makes a `notNamespaces` DENY catch plaintext).
fn negative_identity(field: &Option<Field<Pattern>>, id: Option<&str>) -> bool {
    match (field, id) {
        (None, _) | (Some(_), None) => true,
        (Some(f), Some(id)) => f.none(|p| p.matches(id)),
    }
}

#[derive(Default)]
struct OperationMatch {
    ports: Option<Field<u16>>,
    not_ports: Option<Field<u16>>,
}

impl OperationMatch {
    fn matches(&self, peer: &Peer) -> bool {
        self.ports
            .as_ref()
            .is_none_or(|f| f.any(|&p| p == peer.port))
            && self
                .not_ports
                .as_ref()
                .is_none_or(|f| f.none(|&p| p == peer.port))
    }
}

/// Istio's string match for principals and namespaces.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Pattern {
    Any,
    Exact(String),
    Prefix(String),
    Suffix(String),
}

impl Pattern {
    fn matches(&self, s: &str) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Exact(e) => s == e,
            Pattern::Prefix(p) => s.starts_with(p.as_str()),
            Pattern::Suffix(x) => s.ends_with(x.as_str()),
        }
    }
}

const SPIFFE_SCHEME: &str = "spiffe://";

/// A principal: `spiffe://<td>/ns/<ns>/sa/<sa>` or `<td>/ns/<ns>/sa/<sa>` (the same principal), or a wildcard
/// form (`*`, `prefix*`, `*suffix`) of either, matched against the form without `spiffe://`.
fn parse_principal(s: &str) -> Result<Pattern, String> {
    let body = s.strip_prefix(SPIFFE_SCHEME).unwrap_or(s);
    let pattern = parse_wildcard(body)?;
    let text = match &pattern {
        Pattern::Any => return Ok(pattern),
        Pattern::Exact(t) | Pattern::Prefix(t) | Pattern::Suffix(t) => t,
    };
    if let Some(c) = text
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || "._-/".contains(c)))
    {
        return Err(format!("contains {c:?}, which a SPIFFE ID cannot"));
    }
    if let Pattern::Exact(t) = &pattern {
        let segments: Vec<&str> = t.split('/').collect();
        let well_formed = matches!(segments.as_slice(), [td, "ns", ns, "sa", sa]
            if !td.is_empty() && !ns.is_empty() && !sa.is_empty()
                && td.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c)));
        if !well_formed {
            return Err("is not a SPIFFE ID of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
                .to_string());
        }
    }
    Ok(pattern)
}

/// A namespace name, or a wildcard form of one.
fn parse_namespace(s: &str) -> Result<Pattern, String> {
    let pattern = parse_wildcard(s)?;
    let (text, exact) = match &pattern {
        Pattern::Any => return Ok(pattern),
        Pattern::Exact(t) => (t, true),
        Pattern::Prefix(t) | Pattern::Suffix(t) => (t, false),
    };
    let label_chars = text
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    let ends_ok = !exact || (!text.starts_with('-') && !text.ends_with('-'));
    if !label_chars || !ends_ok || text.len() > 63 {
        return Err(
            "is not a namespace name (up to 63 lowercase letters, digits and '-')".to_string(),
        );
    }
    Ok(pattern)
}

/// Istio's wildcard forms: `*`, `prefix*`, `*suffix`; a `*` anywhere else is an error (Istio would match it
/// literally, which is never what was meant).
fn parse_wildcard(s: &str) -> Result<Pattern, String> {
    if s.is_empty() {
        return Err("is empty".to_string());
    }
    if s == "*" {
        return Ok(Pattern::Any);
    }
    let stars = s.matches('*').count();
    if stars == 0 {
        return Ok(Pattern::Exact(s.to_string()));
    }
    if stars == 1 {
        if let Some(rest) = s.strip_prefix('*') {
            return Ok(Pattern::Suffix(rest.to_string()));
        }
        if let Some(rest) = s.strip_suffix('*') {
            return Ok(Pattern::Prefix(rest.to_string()));
        }
    }
    Err("has a '*' that is not alone, at the start or at the end".to_string())
}

/// An address block. IPv4-mapped IPv6 blocks (`::ffff:10.0.0.0/104`) are kept as IPv4, and source addresses are
/// canonicalized the same way, so both spellings match the same peers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Cidr {
    addr: IpAddr,
    len: u8,
}

impl Cidr {
    /// The network address: the address with its host bits zero.
    fn network(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.len))
                    .unwrap_or(0);
                IpAddr::V6((u128::from(a) & mask).into())
            }
        }
    }

    fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                prefix_eq(u32::from(net).into(), u32::from(ip).into(), 32, self.len)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_eq(u128::from(net), u128::from(ip), 128, self.len)
            }
            _ => false,
        }
    }
}

/// The first `len` of the `bits` low bits of `a` and `b` are equal.
fn prefix_eq(a: u128, b: u128, bits: u32, len: u8) -> bool {
    let host_bits = bits - u32::from(len);
    (a ^ b).checked_shr(host_bits).unwrap_or(0) == 0
}

/// `a.b.c.d`, `a.b.c.d/n`, an IPv6 address or an IPv6 CIDR.
fn parse_cidr(s: &str) -> Result<Cidr, String> {
    let (addr_text, len_text) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    let what = if len_text.is_some() {
        "is not a CIDR"
    } else {
        "is not an IP address or CIDR"
    };
    let addr: IpAddr = addr_text.parse().map_err(|_| what.to_string())?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len = match len_text {
        None => max,
        Some(l) if !l.is_empty() && l.len() <= 3 && l.bytes().all(|b| b.is_ascii_digit()) => l
            .parse::<u8>()
            .ok()
            .filter(|&n| n <= max)
            .ok_or_else(|| what.to_string())?,
        Some(_) => return Err(what.to_string()),
    };
    if let IpAddr::V6(v6) = addr
        && let Some(v4) = v6.to_ipv4_mapped()
        && len >= 96
    {
        return Ok(Cidr {
            addr: IpAddr::V4(v4),
            len: len - 96,
        });
    }
    Ok(Cidr { addr, len })
}

/// Source fields Istio has that need the request (JWT claims, X-Forwarded-For).
const L7_SOURCE_FIELDS: &[&str] = &[
    "requestPrincipals",
    "notRequestPrincipals",
    "remoteIpBlocks",
    "notRemoteIpBlocks",
];

fn compile_rule(policy: &AuthorizationPolicy, index: usize) -> CompiledRule {
    let rule: &Rule = &policy.spec.rules[index];
    let path = format!("rules[{index}]");
    let mut c = CompiledRule {
        mode: mode(&policy.spec.action),
        problems: Vec::new(),
        l7: Vec::new(),
        from: Vec::new(),
        to: Vec::new(),
    };
    if let Action::Unknown(a) = &policy.spec.action {
        c.problems.push(format!(
            "spec.action: {a:?} is not ALLOW, DENY or AUDIT (enforced as DENY)"
        ));
    }
    for key in rule.unknown.keys() {
        c.problems.push(format!("{path}.{key}: unknown field"));
    }
    if let Some(from) = &rule.from {
        if from.is_empty() {
            c.problems.push(format!(
                "{path}.from: must not be empty (omit it to match every source)"
            ));
        }
        for (j, entry) in from.iter().enumerate() {
            let path = format!("{path}.from[{j}]");
            for key in entry.unknown.keys() {
                c.problems.push(format!("{path}.{key}: unknown field"));
            }
            let source = match &entry.source {
                Some(s) => compile_source(s, &format!("{path}.source"), &mut c),
                None => {
                    c.problems.push(format!("{path}.source: missing"));
                    SourceMatch::default()
                }
            };
            c.from.push(source);
        }
    }
    if let Some(to) = &rule.to {
        if to.is_empty() {
            c.problems.push(format!(
                "{path}.to: must not be empty (omit it to match every operation)"
            ));
        }
        for (j, entry) in to.iter().enumerate() {
            let path = format!("{path}.to[{j}]");
            for key in entry.unknown.keys() {
                c.problems.push(format!("{path}.{key}: unknown field"));
            }
            let operation = match &entry.operation {
                Some(o) => compile_operation(o, &format!("{path}.operation"), &mut c),
                None => {
                    c.problems.push(format!("{path}.operation: missing"));
                    OperationMatch::default()
                }
            };
            c.to.push(operation);
        }
    }
    if !rule.when.is_empty() {
        c.l7.push(format!("{path}.when"));
    }
    c
}

fn compile_source(s: &Source, path: &str, c: &mut CompiledRule) -> SourceMatch {
    let lists = [
        &s.principals,
        &s.not_principals,
        &s.namespaces,
        &s.not_namespaces,
        &s.ip_blocks,
        &s.not_ip_blocks,
    ];
    if lists.iter().all(|l| l.is_empty()) && s.unknown.is_empty() {
        c.problems.push(format!("{path}: must not be empty"));
    }
    for key in s.unknown.keys() {
        if L7_SOURCE_FIELDS.contains(&key.as_str()) {
            c.l7.push(format!("{path}.{key}"));
        } else {
            c.problems.push(format!("{path}.{key}: unknown field"));
        }
    }
    let mut field = |name: &str, values: &[String], parse: fn(&str) -> Result<Pattern, String>| {
        compile_field(path, name, values, |v| parse(v), &mut c.problems)
    };
    let principals = field("principals", &s.principals, parse_principal);
    let not_principals = field("notPrincipals", &s.not_principals, parse_principal);
    let namespaces = field("namespaces", &s.namespaces, parse_namespace);
    let not_namespaces = field("notNamespaces", &s.not_namespaces, parse_namespace);
    SourceMatch {
        principals,
        not_principals,
        namespaces,
        not_namespaces,
        ip_blocks: compile_field(
            path,
            "ipBlocks",
            &s.ip_blocks,
            |v| parse_cidr(v),
            &mut c.problems,
        ),
        not_ip_blocks: compile_field(
            path,
            "notIpBlocks",
            &s.not_ip_blocks,
            |v| parse_cidr(v),
            &mut c.problems,
        ),
    }
}

fn compile_operation(o: &Operation, path: &str, c: &mut CompiledRule) -> OperationMatch {
    let l7 = [
        ("methods", &o.methods),
        ("notMethods", &o.not_methods),
        ("paths", &o.paths),
        ("notPaths", &o.not_paths),
        ("hosts", &o.hosts),
        ("notHosts", &o.not_hosts),
    ];
    if o.ports.is_empty()
        && o.not_ports.is_empty()
        && l7.iter().all(|(_, l)| l.is_empty())
        && o.unknown.is_empty()
    {
        c.problems.push(format!("{path}: must not be empty"));
    }
    for (name, values) in l7 {
        if !values.is_empty() {
            c.l7.push(format!("{path}.{name}"));
        }
    }
    for key in o.unknown.keys() {
        c.problems.push(format!("{path}.{key}: unknown field"));
    }
    let port = |p: &Port| {
        p.number()
            .ok_or_else(|| "is not a port (1-65535)".to_string())
    };
    OperationMatch {
        ports: compile_field(path, "ports", &o.ports, port, &mut c.problems),
        not_ports: compile_field(path, "notPorts", &o.not_ports, port, &mut c.problems),
    }
}

/// Parses every value of a field; an empty list is an absent field. Each invalid value is reported as
/// `<path>.<name>[<i>]: "<value>" <why>`.
fn compile_field<V: fmt::Debug + AsText, T>(
    path: &str,
    name: &str,
    values: &[V],
    parse: impl Fn(&V) -> Result<T, String>,
    problems: &mut Vec<String>,
) -> Option<Field<T>> {
    if values.is_empty() {
        return None;
    }
    let mut field = Field {
        values: Vec::new(),
        invalid: false,
    };
    for (i, v) in values.iter().enumerate() {
        match parse(v) {
            Ok(t) => field.values.push(t),
            Err(why) => {
                problems.push(format!("{path}.{name}[{i}]: {:?} {why}", v.as_text()));
                field.invalid = true;
            }
        }
    }
    Some(field)
}

/// The value as the user wrote it, for messages.
trait AsText {
    fn as_text(&self) -> &str;
}

impl AsText for String {
    fn as_text(&self) -> &str {
        self
    }
}

impl AsText for Port {
    fn as_text(&self) -> &str {
        &self.0
    }
}

/// Specs [`validate`] accepts (including L7 ones, which it accepts and marks as needing the proxy): the validator's
/// tests and the CRD schema's tests both check them, so the two cannot drift apart.
#[cfg(test)]
pub(crate) const VALID_SPECS: &[&str] = &[
    "{}",
    "{action: DENY, rules: [{}]}",
    "{action: AUDIT, rules: [{to: [{operation: {ports: ['8080', 9090], notPorts: [1]}}]}]}",
    "{selector: {matchLabels: {app: web}}, rules: [{from: [{source: {principals: ['spiffe://cluster.local/ns/a/sa/b', 'cluster.local/ns/*'], notNamespaces: [x]}}]}]}",
    "{rules: [{from: [{source: {ipBlocks: [10.0.0.0/8, '2001:db8::/32', 1.2.3.4, '::/0', '::ffff:0:0/95'], notIpBlocks: ['fd00::1']}}]}]}",
    // L7: valid, the status says it needs a proxy.
    "{rules: [{to: [{operation: {methods: [GET], paths: [/x]}}], when: [{key: a, values: [b]}]}]}",
    "{rules: [{from: [{source: {requestPrincipals: ['*']}}]}]}",
];

#[cfg(test)]
mod tests {
    use super::*;

    const TD: &str = "cluster.local";

    fn pol(yaml: &str) -> AuthorizationPolicy {
        serde_yaml::from_str(yaml).unwrap_or_else(|e| panic!("bad test YAML: {e}\n{yaml}"))
    }

    fn pols(yaml: &str) -> Vec<AuthorizationPolicy> {
        use serde::Deserialize;
        serde_yaml::Deserializer::from_str(yaml)
            .map(|d| AuthorizationPolicy::deserialize(d).unwrap())
            .collect()
    }

    /// An mTLS request from `cluster.local/ns/foo/sa/client` at 10.1.2.3 to `default`'s `app=web` on 8080.
    fn req() -> Request {
        Request {
            source: Some(Identity::new(TD, "foo", "client")),
            source_ip: "10.1.2.3".parse().unwrap(),
            dest_namespace: "default".to_string(),
            dest_labels: BTreeMap::from([("app".to_string(), "web".to_string())]),
            dest_port: 8080,
            protocol: Protocol::Tcp,
        }
    }

    fn plaintext() -> Request {
        Request {
            source: None,
            ..req()
        }
    }

    fn from(ns: &str, sa: &str) -> Request {
        Request {
            source: Some(Identity::new(TD, ns, sa)),
            ..req()
        }
    }

    fn from_ip(ip: &str) -> Request {
        Request {
            source_ip: ip.parse().unwrap(),
            ..req()
        }
    }

    fn to_port(port: u16) -> Request {
        Request {
            dest_port: port,
            ..req()
        }
    }

    fn allowed(policies: &[AuthorizationPolicy], r: &Request) -> bool {
        evaluate(policies, r).allowed
    }

    /// Every test evaluates through here: the public wrapper, checked against an [`Evaluator`] built once and
    /// used through `applicable` + `evaluate_among`, and against [`oracle`] (the evaluator as it was before rules
    /// were precompiled), so that every case below also proves the three agree byte for byte.
    fn evaluate(policies: &[AuthorizationPolicy], r: &Request) -> Verdict {
        evaluate_with_root(policies, r, DEFAULT_ROOT_NAMESPACE)
    }

    fn evaluate_with_root(policies: &[AuthorizationPolicy], r: &Request, root: &str) -> Verdict {
        let v = super::evaluate_with_root(policies, r, root);
        if root == DEFAULT_ROOT_NAMESPACE {
            assert_eq!(super::evaluate(policies, r), v);
        }
        let e = Evaluator::new(policies, root);
        assert_eq!(e.evaluate(r), v);
        let applicable = e.applicable(&r.dest_namespace, &r.dest_labels);
        let elsewhere = Request {
            dest_namespace: "nowhere-else".into(),
            dest_labels: BTreeMap::new(),
            ..r.clone()
        };
        assert_eq!(e.evaluate_among(&applicable, &elsewhere), v);
        assert_eq!(oracle(policies, r, root), v);
        v
    }

    /// The evaluator before precompilation: filter, sort, then compile each rule on every call.
    fn oracle(policies: &[AuthorizationPolicy], req: &Request, root_namespace: &str) -> Verdict {
        let mut applicable: Vec<&AuthorizationPolicy> = policies
            .iter()
            .filter(|p| applies_to(p, req, root_namespace))
            .collect();
        applicable.sort_by(|a, b| (a.namespace(), a.name()).cmp(&(b.namespace(), b.name())));
        let first_match = |p: &AuthorizationPolicy| -> Option<Decider> {
            let i =
                (0..p.spec.rules.len()).find(|&i| compile_rule(p, i).matches(&Peer::of(req)))?;
            Some(Decider {
                policy: p.key(),
                action: p.spec.action.clone(),
                rule_index: i,
            })
        };
        let audit: Vec<Decider> = applicable
            .iter()
            .filter(|p| p.spec.action == Action::Audit)
            .filter_map(|p| first_match(p))
            .collect();
        let deny = applicable
            .iter()
            .filter(|p| mode(&p.spec.action) == Mode::Broad)
            .find_map(|p| first_match(p).map(|d| (*p, d)));
        if let Some((p, d)) = deny {
            let mut reason = format!(
                "rule {} of {} ({}) matches",
                d.rule_index, d.policy, d.action
            );
            if let Action::Unknown(a) = &d.action {
                reason.push_str(&format!("; action {a:?} is unknown, enforced as DENY"));
            }
            match rule_status(p, d.rule_index) {
                RuleStatus::KernelEnforced => {}
                RuleStatus::ProxyRequired { .. } => reason.push_str(
                    " on its L4 part (L7 fields ignored: the deny is broader, never narrower)",
                ),
                RuleStatus::Rejected { reason: r } => {
                    reason.push_str(&format!(" (rejected, enforced fail-closed: {r})"))
                }
            }
            return Verdict {
                allowed: false,
                deciding: Some(d),
                reason,
                audit,
            };
        }
        let mut allow_policies = applicable
            .iter()
            .filter(|p| p.spec.action == Action::Allow)
            .peekable();
        if allow_policies.peek().is_none() {
            return Verdict {
                allowed: true,
                deciding: None,
                reason: DEFAULT_ALLOW_REASON.to_string(),
                audit,
            };
        }
        match allow_policies.find_map(|p| first_match(p)) {
            Some(d) => Verdict {
                allowed: true,
                reason: format!(
                    "rule {} of {} ({}) matches",
                    d.rule_index, d.policy, d.action
                ),
                deciding: Some(d),
                audit,
            },
            None => Verdict {
                allowed: false,
                deciding: None,
                reason: DEFAULT_DENY_REASON.to_string(),
                audit,
            },
        }
    }

    fn rejected_reason(s: &RuleStatus) -> &str {
        match s {
            RuleStatus::Rejected { reason } => reason,
            other => panic!("expected Rejected, got {other:?}"),
        }
    }

    fn proxy_reason(s: &RuleStatus) -> &str {
        match s {
            RuleStatus::ProxyRequired { reason } => reason,
            other => panic!("expected ProxyRequired, got {other:?}"),
        }
    }

    const ALLOW_FOO: &str = "
metadata: {name: allow-foo, namespace: default}
spec:
  rules:
  - from:
    - source: {namespaces: [foo]}
";

    const DENY_FOO: &str = "
metadata: {name: deny-foo, namespace: default}
spec:
  action: DENY
  rules:
  - from:
    - source: {namespaces: [foo]}
";

    // ---- order -------------------------------------------------------------------------------------------------

    #[test]
    fn no_policies_allow() {
        let v = evaluate(&[], &req());
        assert!(v.allowed);
        assert_eq!(v.deciding, None);
        assert_eq!(v.to_string(), "allow: no ALLOW policy selects the workload");
    }

    #[test]
    fn deny_wins_over_allow() {
        let ps = [pol(ALLOW_FOO), pol(DENY_FOO)];
        let v = evaluate(&ps, &req());
        assert!(!v.allowed);
        assert_eq!(
            v.deciding,
            Some(Decider {
                policy: "default/deny-foo".to_string(),
                action: Action::Deny,
                rule_index: 0
            })
        );
        assert_eq!(v.to_string(), "deny by default/deny-foo rule 0 (DENY)");
    }

    #[test]
    fn only_deny_policies_allow_the_rest() {
        let ps = [pol(DENY_FOO)];
        assert!(!allowed(&ps, &req()));
        let v = evaluate(&ps, &from("bar", "client"));
        assert!(v.allowed);
        assert_eq!(v.to_string(), "allow: no ALLOW policy selects the workload");
    }

    #[test]
    fn allow_policy_selecting_workload_makes_default_deny() {
        let ps = [pol(ALLOW_FOO)];
        let v = evaluate(&ps, &req());
        assert!(v.allowed);
        assert_eq!(v.to_string(), "allow by default/allow-foo rule 0 (ALLOW)");
        let v = evaluate(&ps, &from("bar", "client"));
        assert!(!v.allowed);
        assert_eq!(v.deciding, None);
        assert_eq!(
            v.to_string(),
            "deny: an ALLOW policy selects the workload and no rule matched (default deny)"
        );
    }

    #[test]
    fn empty_spec_denies_all() {
        let ps = [pol(
            "metadata: {name: deny-all, namespace: default}\nspec: {}\n",
        )];
        assert_eq!(ps[0].spec.action, Action::Allow);
        assert!(!allowed(&ps, &req()));
        assert!(!allowed(&ps, &plaintext()));
        // A missing or null spec is the same.
        assert!(!allowed(
            &[pol("metadata: {name: x, namespace: default}\nspec:\n")],
            &req()
        ));
    }

    #[test]
    fn empty_rule_allows_all() {
        let ps = [
            pol("metadata: {name: deny-all, namespace: default}\nspec: {}\n"),
            pol("metadata: {name: allow-all, namespace: default}\nspec:\n  rules:\n  - {}\n"),
        ];
        assert!(allowed(&ps, &req()));
        assert!(allowed(&ps, &plaintext()));
        assert!(allowed(&ps, &to_port(1)));
        assert_eq!(statuses(&ps[1]), vec![RuleStatus::KernelEnforced]);
    }

    #[test]
    fn deny_with_empty_rule_denies_all() {
        let ps = [pol(
            "metadata: {name: d, namespace: default}\nspec:\n  action: DENY\n  rules: [{}]\n",
        )];
        assert!(!allowed(&ps, &plaintext()));
        // And a DENY without rules denies nothing.
        let ps = [pol(
            "metadata: {name: d, namespace: default}\nspec:\n  action: DENY\n",
        )];
        assert!(allowed(&ps, &plaintext()));
    }

    #[test]
    fn audit_never_changes_the_verdict() {
        let audit = pol(
            "metadata: {name: audit-all, namespace: default}\nspec:\n  action: AUDIT\n  rules: [{}]\n",
        );
        // Alone: no ALLOW policy, so allowed (AUDIT does not make a default deny either).
        let v = evaluate(std::slice::from_ref(&audit), &req());
        assert!(v.allowed);
        assert_eq!(v.deciding, None);
        assert_eq!(v.audit.len(), 1);
        assert_eq!(v.audit[0].policy, "default/audit-all");
        assert_eq!(v.audit[0].action, Action::Audit);
        // With a DENY: still denied, audit still reported.
        let v = evaluate(&[audit.clone(), pol(DENY_FOO)], &req());
        assert!(!v.allowed);
        assert_eq!(v.audit.len(), 1);
        // With an ALLOW that does not match: still default deny.
        let v = evaluate(&[audit, pol(ALLOW_FOO)], &from("bar", "x"));
        assert!(!v.allowed);
        assert_eq!(v.audit.len(), 1);
    }

    #[test]
    fn rules_are_ored_and_first_matching_rule_decides() {
        let p = pol("
metadata: {name: two, namespace: default}
spec:
  rules:
  - from: [{source: {namespaces: [bar]}}]
  - to: [{operation: {ports: ['8080']}}]
");
        let v = evaluate(std::slice::from_ref(&p), &from("bar", "x"));
        assert_eq!(v.deciding.unwrap().rule_index, 0);
        let v = evaluate(std::slice::from_ref(&p), &req());
        assert_eq!(v.deciding.unwrap().rule_index, 1);
        assert!(!allowed(
            &[p],
            &Request {
                dest_port: 9090,
                ..req()
            }
        ));
    }

    #[test]
    fn decider_does_not_depend_on_listing_order() {
        let a = pol("metadata: {name: a, namespace: default}\nspec: {action: DENY, rules: [{}]}\n");
        let b = pol("metadata: {name: b, namespace: default}\nspec: {action: DENY, rules: [{}]}\n");
        let d1 = evaluate(&[a.clone(), b.clone()], &req()).deciding.unwrap();
        let d2 = evaluate(&[b, a], &req()).deciding.unwrap();
        assert_eq!(d1, d2);
        assert_eq!(d1.policy, "default/a");
    }

    #[test]
    fn from_to_are_anded_and_entries_ored() {
        let ps = [pol("
metadata: {name: p, namespace: default}
spec:
  rules:
  - from:
    - source: {namespaces: [foo]}
    - source: {ipBlocks: [192.168.0.0/16]}
    to:
    - operation: {ports: ['8080']}
    - operation: {ports: ['9090']}
")];
        assert!(allowed(&ps, &req()));
        assert!(allowed(&ps, &to_port(9090)));
        assert!(!allowed(&ps, &to_port(7070)), "to does not match");
        assert!(allowed(
            &ps,
            &Request {
                source: None,
                source_ip: "192.168.3.4".parse().unwrap(),
                ..req()
            }
        ));
        assert!(!allowed(&ps, &plaintext()), "no from entry matches");
    }

    #[test]
    fn fields_inside_one_source_are_anded() {
        let ps = [pol("
metadata: {name: p, namespace: default}
spec:
  rules:
  - from:
    - source:
        namespaces: [foo]
        ipBlocks: [10.0.0.0/8]
")];
        assert!(allowed(&ps, &req()));
        assert!(!allowed(&ps, &from_ip("11.0.0.1")));
        assert!(!allowed(&ps, &from("bar", "client")));
    }

    // ---- scope -------------------------------------------------------------------------------------------------

    #[test]
    fn selector_must_match_workload_labels() {
        let p = pol("
metadata: {name: p, namespace: default}
spec:
  selector:
    matchLabels: {app: web, tier: front}
  rules: [{from: [{source: {namespaces: [bar]}}]}]
");
        // Does not select app=web alone: no ALLOW applies, allowed.
        assert!(allowed(std::slice::from_ref(&p), &req()));
        let mut r = req();
        r.dest_labels.insert("tier".into(), "front".into());
        assert!(
            !allowed(std::slice::from_ref(&p), &r),
            "selected now, foo is not allowed"
        );
        r.dest_labels.insert("app".into(), "db".into());
        assert!(allowed(&[p], &r), "label value differs");
    }

    #[test]
    fn empty_selector_selects_whole_namespace() {
        let ps = [pol(
            "metadata: {name: p, namespace: default}\nspec:\n  selector: {matchLabels: {}}\n",
        )];
        assert!(!allowed(
            &ps,
            &Request {
                dest_labels: BTreeMap::new(),
                ..req()
            }
        ));
    }

    #[test]
    fn policy_in_other_namespace_does_not_apply() {
        let ps = [pol(
            "metadata: {name: deny-all, namespace: other}\nspec: {}\n",
        )];
        assert!(allowed(&ps, &req()));
        assert!(!allowed(
            &ps,
            &Request {
                dest_namespace: "other".into(),
                ..req()
            }
        ));
    }

    #[test]
    fn missing_namespace_defaults_to_default() {
        let p = pol("metadata: {name: deny-all}\nspec: {}\n");
        assert_eq!(p.key(), "default/deny-all");
        assert!(!allowed(&[p], &req()));
    }

    #[test]
    fn root_namespace_policy_applies_mesh_wide() {
        let p = pol(
            "metadata: {name: deny-all, namespace: sinew-system}\nspec: {action: DENY, rules: [{}]}\n",
        );
        for ns in ["default", "prod", "sinew-system"] {
            let v = evaluate(
                std::slice::from_ref(&p),
                &Request {
                    dest_namespace: ns.into(),
                    ..req()
                },
            );
            assert!(!v.allowed, "{ns}");
            assert_eq!(v.to_string(), "deny by sinew-system/deny-all rule 0 (DENY)");
        }
    }

    #[test]
    fn root_namespace_selector_matches_workload_labels_anywhere() {
        let p = pol("
metadata: {name: web-foo-only, namespace: sinew-system}
spec:
  selector: {matchLabels: {app: web}}
  rules: [{from: [{source: {namespaces: [foo]}}]}]
");
        let ps = [p];
        let r = Request {
            dest_namespace: "prod".into(),
            ..from("bar", "x")
        };
        assert!(!allowed(&ps, &r), "app=web in prod is selected");
        let r = Request {
            dest_labels: BTreeMap::from([("app".into(), "db".into())]),
            ..r
        };
        assert!(allowed(&ps, &r), "app=db is not selected");
    }

    #[test]
    fn root_namespace_is_configurable() {
        let ps = [pol(
            "metadata: {name: deny-all, namespace: mesh-root}\nspec: {}\n",
        )];
        assert!(allowed(&ps, &req()), "not the default root");
        assert!(!evaluate_with_root(&ps, &req(), "mesh-root").allowed);
        let ps = [pol(
            "metadata: {name: deny-all, namespace: sinew-system}\nspec: {}\n",
        )];
        assert!(
            evaluate_with_root(&ps, &req(), "mesh-root").allowed,
            "sinew-system is an ordinary namespace now"
        );
    }

    // ---- source fields -----------------------------------------------------------------------------------------

    #[test]
    fn namespaces_and_principals_never_match_plaintext() {
        for src in [
            "namespaces: ['*']",
            "namespaces: [foo]",
            "principals: ['*']",
            "principals: [cluster.local/ns/foo/sa/client]",
        ] {
            let allow = pol(&format!(
                "metadata: {{name: a, namespace: default}}\nspec:\n  rules: [{{from: [{{source: {{{src}}}}}]}}]\n"
            ));
            assert!(
                allowed(std::slice::from_ref(&allow), &req()),
                "{src}: mTLS matches"
            );
            assert!(
                !allowed(std::slice::from_ref(&allow), &plaintext()),
                "{src}: plaintext must not match ALLOW"
            );
            let deny = pol(&format!(
                "metadata: {{name: d, namespace: default}}\nspec:\n  action: DENY\n  rules: [{{from: [{{source: {{{src}}}}}]}}]\n"
            ));
            assert!(
                !allowed(std::slice::from_ref(&deny), &req()),
                "{src}: mTLS matches DENY"
            );
            assert!(
                allowed(&[deny], &plaintext()),
                "{src}: plaintext does not match DENY"
            );
        }
    }

    #[test]
    fn not_namespaces_deny_catches_plaintext() {
        // Advisory 2021-003: "deny everything not from prod" must deny plaintext too.
        let ps = [pol("
metadata: {name: only-prod, namespace: default}
spec:
  action: DENY
  rules: [{from: [{source: {notNamespaces: [prod]}}]}]
")];
        assert!(!allowed(&ps, &plaintext()));
        assert!(!allowed(&ps, &req()), "foo is not prod");
        assert!(allowed(&ps, &from("prod", "x")));
    }

    #[test]
    fn not_principals_deny_catches_plaintext() {
        let ps = [pol("
metadata: {name: only-admin, namespace: default}
spec:
  action: DENY
  rules: [{from: [{source: {notPrincipals: [cluster.local/ns/ops/sa/admin]}}]}]
")];
        assert!(!allowed(&ps, &plaintext()));
        assert!(!allowed(&ps, &from("ops", "other")));
        assert!(allowed(&ps, &from("ops", "admin")));
    }

    #[test]
    fn not_namespaces_in_allow_admits_plaintext_like_istio() {
        let ps = [pol("
metadata: {name: p, namespace: default}
spec:
  rules: [{from: [{source: {notNamespaces: [foo]}}]}]
")];
        assert!(!allowed(&ps, &req()));
        assert!(allowed(&ps, &from("bar", "x")));
        assert!(
            allowed(&ps, &plaintext()),
            "plaintext is in no namespace; principals: ['*'] would require mTLS"
        );
        let ps = [pol("
metadata: {name: p, namespace: default}
spec:
  rules: [{from: [{source: {notNamespaces: [foo], principals: ['*']}}]}]
")];
        assert!(!allowed(&ps, &plaintext()));
        assert!(allowed(&ps, &from("bar", "x")));
    }

    #[test]
    fn spiffe_and_prefixless_principals_are_the_same() {
        for p in [
            "spiffe://cluster.local/ns/foo/sa/client",
            "cluster.local/ns/foo/sa/client",
        ] {
            let ps = [pol(&format!(
                "metadata: {{name: a, namespace: default}}\nspec: {{rules: [{{from: [{{source: {{principals: ['{p}']}}}}]}}]}}\n"
            ))];
            assert!(allowed(&ps, &req()), "{p}");
            assert!(!allowed(&ps, &from("foo", "other")), "{p}");
            assert!(
                !allowed(
                    &ps,
                    &Request {
                        source: Some(Identity::new("other.td", "foo", "client")),
                        ..req()
                    }
                ),
                "{p}: trust domain"
            );
            assert_eq!(statuses(&ps[0]), vec![RuleStatus::KernelEnforced]);
        }
    }

    #[test]
    fn wildcard_principals() {
        let cases = [
            ("*", "foo", "client", true),
            ("spiffe://cluster.local/ns/foo/*", "foo", "anything", true),
            ("cluster.local/ns/foo/*", "foobar", "x", false),
            ("*/sa/client", "bar", "client", true),
            ("*/sa/client", "bar", "client2", false),
            ("spiffe://*", "bar", "x", true),
            ("cluster.local/*", "bar", "x", true),
        ];
        for (pattern, ns, sa, expect) in cases {
            let ps = [pol(&format!(
                "metadata: {{name: a, namespace: default}}\nspec: {{rules: [{{from: [{{source: {{principals: ['{pattern}']}}}}]}}]}}\n"
            ))];
            assert_eq!(
                statuses(&ps[0]),
                vec![RuleStatus::KernelEnforced],
                "{pattern}"
            );
            assert_eq!(
                allowed(&ps, &from(ns, sa)),
                expect,
                "{pattern} vs {ns}/{sa}"
            );
        }
    }

    #[test]
    fn wildcard_namespaces() {
        let cases = [
            ("*", "x", true),
            ("team-*", "team-a", true),
            ("team-*", "teams", false),
            ("*-prod", "web-prod", true),
            ("*-prod", "prod", false),
        ];
        for (pattern, ns, expect) in cases {
            let ps = [pol(&format!(
                "metadata: {{name: a, namespace: default}}\nspec: {{rules: [{{from: [{{source: {{namespaces: ['{pattern}']}}}}]}}]}}\n"
            ))];
            assert_eq!(allowed(&ps, &from(ns, "sa")), expect, "{pattern} vs {ns}");
        }
    }

    #[test]
    fn not_principals_field() {
        let ps = [pol("
metadata: {name: p, namespace: default}
spec: {rules: [{from: [{source: {notPrincipals: ['*/sa/bad', cluster.local/ns/foo/sa/evil]}}]}]}
")];
        assert!(allowed(&ps, &req()));
        assert!(!allowed(&ps, &from("foo", "evil")));
        assert!(!allowed(&ps, &from("any", "bad")));
    }

    #[test]
    fn ip_blocks_v4_edges() {
        let cases = [
            ("10.0.0.0/8", "10.255.255.255", true),
            ("10.0.0.0/8", "11.0.0.0", false),
            ("0.0.0.0/0", "203.0.113.9", true),
            ("0.0.0.0/0", "2001:db8::1", false),
            ("10.1.2.3/32", "10.1.2.3", true),
            ("10.1.2.3/32", "10.1.2.4", false),
            ("10.1.2.3", "10.1.2.3", true),
            ("10.1.2.3", "10.1.2.2", false),
            ("10.1.2.77/24", "10.1.2.200", true),
            ("192.168.0.0/23", "192.168.1.255", true),
            ("192.168.0.0/23", "192.168.2.0", false),
            ("10.0.0.0/8", "::ffff:10.9.9.9", true),
            ("::ffff:10.0.0.0/104", "10.9.9.9", true),
        ];
        assert_ip_block_cases(&cases);
    }

    /// An ALLOW policy with `ipBlocks: [block]` is kernel-enforced and admits exactly the expected sources.
    fn assert_ip_block_cases(cases: &[(&str, &str, bool)]) {
        for &(block, ip, expect) in cases {
            let ps = [pol(&format!(
                "metadata: {{name: a, namespace: default}}\nspec: {{rules: [{{from: [{{source: {{ipBlocks: ['{block}']}}}}]}}]}}\n"
            ))];
            assert_eq!(
                statuses(&ps[0]),
                vec![RuleStatus::KernelEnforced],
                "{block}"
            );
            assert_eq!(allowed(&ps, &from_ip(ip)), expect, "{block} vs {ip}");
        }
    }

    #[test]
    fn ip_blocks_v6_edges() {
        let cases = [
            ("2001:db8::/32", "2001:db8:ffff::1", true),
            ("2001:db8::/32", "2001:db9::1", false),
            ("::/0", "fe80::1", true),
            ("::/0", "10.0.0.1", false),
            ("2001:db8::1/128", "2001:db8::1", true),
            ("2001:db8::1/128", "2001:db8::2", false),
            ("2001:db8::1", "2001:db8::1", true),
            ("2001:db8::/127", "2001:db8::1", true),
            ("2001:db8::/127", "2001:db8::2", false),
        ];
        assert_ip_block_cases(&cases);
    }

    #[test]
    fn invalid_cidrs_are_rejected() {
        for bad in [
            "10.0.0.0/33",
            "2001:db8::/129",
            "10.0.0.256",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "10.0.0.0/8/8",
            "fe80::1%eth0",
            "host.example",
            "10.0.0.0/-1",
        ] {
            assert!(parse_cidr(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_cidr("10.0.0.0/33").unwrap_err(), "is not a CIDR");
        assert_eq!(
            parse_cidr("10.0.0.300").unwrap_err(),
            "is not an IP address or CIDR"
        );
    }

    #[test]
    fn not_ip_blocks_field() {
        let ps = [pol("
metadata: {name: p, namespace: default}
spec: {rules: [{from: [{source: {notIpBlocks: [10.1.0.0/16, '2001:db8::/32']}}]}]}
")];
        assert!(!allowed(&ps, &req()));
        assert!(!allowed(&ps, &from_ip("2001:db8::5")));
        assert!(allowed(&ps, &from_ip("10.2.0.1")));
        assert!(allowed(&ps, &from_ip("2001:db9::5")));
    }

    #[test]
    fn not_namespaces_field_in_allow() {
        let ps = [pol("
metadata: {name: p, namespace: default}
spec: {rules: [{from: [{source: {notNamespaces: ['kube-*', foo]}}]}]}
")];
        assert!(!allowed(&ps, &req()));
        assert!(!allowed(&ps, &from("kube-system", "x")));
        assert!(allowed(&ps, &from("bar", "x")));
    }

    // ---- operation fields --------------------------------------------------------------------------------------

    #[test]
    fn ports_are_target_ports() {
        // Service port 80 -> targetPort 8080: the request arrives at the workload on 8080.
        let p80 = [pol(
            "metadata: {name: p, namespace: default}\nspec: {rules: [{to: [{operation: {ports: ['80']}}]}]}\n",
        )];
        assert!(
            !allowed(&p80, &to_port(8080)),
            "the Service port does not match"
        );
        let p8080 = [pol(
            "metadata: {name: p, namespace: default}\nspec: {rules: [{to: [{operation: {ports: ['8080']}}]}]}\n",
        )];
        assert!(allowed(&p8080, &to_port(8080)));
    }

    #[test]
    fn ports_accept_strings_and_integers() {
        let p = pol(
            "metadata: {name: p, namespace: default}\nspec: {rules: [{to: [{operation: {ports: ['8080', 9090], notPorts: [9091]}}]}]}\n",
        );
        assert_eq!(
            p.spec.rules[0].to.as_ref().unwrap()[0]
                .operation
                .as_ref()
                .unwrap()
                .ports,
            vec![Port::from(8080), Port::from(9090)]
        );
        let ps = [p];
        assert!(allowed(&ps, &to_port(8080)));
        assert!(allowed(&ps, &to_port(9090)));
        assert!(!allowed(&ps, &to_port(9091)));
        // JSON too (the API server speaks JSON).
        let j: AuthorizationPolicy = serde_json::from_str(r#"{"metadata":{"name":"j","namespace":"default"},"spec":{"rules":[{"to":[{"operation":{"ports":[8080,"9090"]}}]}]}}"#).unwrap();
        assert!(allowed(std::slice::from_ref(&j), &to_port(9090)));
        assert_eq!(statuses(&j), vec![RuleStatus::KernelEnforced]);
    }

    #[test]
    fn not_ports_field() {
        let ps = [pol(
            "metadata: {name: p, namespace: default}\nspec: {rules: [{to: [{operation: {notPorts: ['22', '2222']}}]}]}\n",
        )];
        assert!(allowed(&ps, &req()));
        assert!(!allowed(&ps, &to_port(22)));
        assert!(!allowed(&ps, &to_port(2222)));
    }

    #[test]
    fn ports_match_udp_like_tcp() {
        let ps = [pol(
            "metadata: {name: p, namespace: default}\nspec: {rules: [{to: [{operation: {ports: ['53']}}]}]}\n",
        )];
        assert!(allowed(
            &ps,
            &Request {
                protocol: Protocol::Udp,
                ..to_port(53)
            }
        ));
        assert!(!allowed(
            &ps,
            &Request {
                protocol: Protocol::Udp,
                ..to_port(54)
            }
        ));
    }

    // ---- no silent widening ------------------------------------------------------------------------------------

    #[test]
    fn l7_fields_in_allow_match_nothing() {
        for field in [
            "methods: [GET]",
            "notMethods: [DELETE]",
            "paths: [/api/*]",
            "notPaths: [/admin]",
            "hosts: [web.example]",
            "notHosts: [evil.example]",
        ] {
            let p = pol(&format!(
                "
metadata: {{name: p, namespace: default}}
spec:
  rules:
  - from: [{{source: {{namespaces: [foo]}}}}]
    to: [{{operation: {{ports: ['8080'], {field}}}}}]
"
            ));
            assert!(
                !allowed(std::slice::from_ref(&p), &req()),
                "{field}: ALLOW with L7 must not allow"
            );
            let name = field.split(':').next().unwrap();
            let reason = proxy_reason(&statuses(&p)[0]).to_string();
            assert!(
                reason.contains(&format!("rules[0].to[0].operation.{name}")),
                "{reason}"
            );
            assert!(reason.contains("matches nothing"), "{reason}");
        }
    }

    #[test]
    fn l7_fields_in_deny_enforced_on_l4_part() {
        let p = pol("
metadata: {name: no-delete, namespace: default}
spec:
  action: DENY
  rules:
  - from: [{source: {namespaces: [foo]}}]
    to: [{operation: {methods: [DELETE], ports: ['8080']}}]
");
        let ps = [p];
        let v = evaluate(&ps, &req());
        assert!(!v.allowed, "foo -> 8080 is denied whatever the method");
        assert_eq!(v.to_string(), "deny by default/no-delete rule 0 (DENY)");
        assert!(v.reason.contains("L4 part"), "{}", v.reason);
        assert!(
            allowed(&ps, &to_port(9090)),
            "the L4 part still narrows by port"
        );
        assert!(allowed(&ps, &from("bar", "x")), "and by namespace");
        let reason = proxy_reason(&statuses(&ps[0])[0]).to_string();
        assert!(
            reason.contains("rules[0].to[0].operation.methods") && reason.contains("L4 part only"),
            "{reason}"
        );
    }

    #[test]
    fn deny_with_only_l7_operation_denies_every_port() {
        let ps = [pol("
metadata: {name: d, namespace: default}
spec: {action: DENY, rules: [{to: [{operation: {paths: [/admin]}}]}]}
")];
        assert!(!allowed(&ps, &to_port(1)));
        assert!(!allowed(&ps, &plaintext()));
    }

    #[test]
    fn when_is_treated_as_l7() {
        let allow = pol("
metadata: {name: a, namespace: default}
spec:
  rules:
  - from: [{source: {namespaces: [foo]}}]
    when:
    - key: request.headers[x-token]
      values: [secret]
");
        assert!(!allowed(std::slice::from_ref(&allow), &req()));
        assert!(proxy_reason(&statuses(&allow)[0]).contains("rules[0].when"));
        let deny = pol("
metadata: {name: d, namespace: default}
spec:
  action: DENY
  rules:
  - from: [{source: {namespaces: [foo]}}]
    when: [{key: source.ip, values: [10.0.0.1]}]
");
        assert!(
            !allowed(std::slice::from_ref(&deny), &req()),
            "when ignored: foo is denied"
        );
        assert!(allowed(&[deny], &from("bar", "x")));
    }

    #[test]
    fn l7_source_fields_need_a_proxy() {
        let allow = pol("
metadata: {name: a, namespace: default}
spec: {rules: [{from: [{source: {requestPrincipals: ['issuer/subject'], namespaces: [foo]}}]}]}
");
        assert!(!allowed(std::slice::from_ref(&allow), &req()));
        assert!(
            proxy_reason(&statuses(&allow)[0])
                .contains("rules[0].from[0].source.requestPrincipals")
        );
        let deny = pol("
metadata: {name: d, namespace: default}
spec: {action: DENY, rules: [{from: [{source: {remoteIpBlocks: [1.2.3.4]}}]}]}
");
        assert!(!allowed(&[deny], &req()), "L4 part empty: every source");
    }

    // ---- rejected rules ----------------------------------------------------------------------------------------

    const BAD_CIDR: &str = "
spec:
  rules:
  - from:
    - source: {namespaces: [foo]}
    - source: {ipBlocks: [10.0.0.0/8, 192.168.0.0/16, 10.0.0.0/33]}
";

    #[test]
    fn rejected_reason_names_the_field() {
        let p = pol(&format!(
            "metadata: {{name: a, namespace: default}}{BAD_CIDR}"
        ));
        let s = statuses(&p);
        let reason = rejected_reason(&s[0]);
        assert!(
            reason.contains(r#"rules[0].from[1].source.ipBlocks[2]: "10.0.0.0/33" is not a CIDR"#),
            "{reason}"
        );
        assert!(reason.contains("matches nothing"), "{reason}");
        assert_eq!(rule_status(&p, 0), s[0]);
        assert!(rejected_reason(&rule_status(&p, 7)).contains("rules[7]"));
    }

    #[test]
    fn rejected_allow_rule_matches_nothing() {
        let p = pol(&format!(
            "metadata: {{name: a, namespace: default}}{BAD_CIDR}"
        ));
        // foo would match from[0], but the rule is rejected as a whole.
        assert!(!allowed(&[p], &req()));
    }

    #[test]
    fn rejected_deny_rule_fails_closed() {
        let p = pol("
metadata: {name: d, namespace: default}
spec:
  action: DENY
  rules:
  - from: [{source: {ipBlocks: [10.0.0.0/33]}}]
    to: [{operation: {ports: ['8080']}}]
");
        assert!(rejected_reason(&statuses(&p)[0]).contains("fail-closed"));
        let ps = [p];
        assert!(
            !allowed(&ps, &from_ip("192.0.2.1")),
            "an unparsable ipBlock matches every source IP"
        );
        assert!(!allowed(&ps, &from_ip("2001:db8::1")));
        assert!(allowed(&ps, &to_port(9090)), "the valid part still applies");
    }

    #[test]
    fn rejected_deny_not_field_excludes_nothing() {
        let ps = [pol("
metadata: {name: d, namespace: default}
spec:
  action: DENY
  rules: [{from: [{source: {notIpBlocks: [10.1.2.0/24, bogus]}}]}]
")];
        assert!(
            allowed(&ps, &req()),
            "10.1.2.3 is still excluded by the valid block"
        );
        assert!(
            !allowed(&ps, &from_ip("10.9.9.9")),
            "bogus excludes nothing"
        );
    }

    #[test]
    fn invalid_port_and_principal_rejected() {
        let p = pol("
metadata: {name: d, namespace: default}
spec:
  action: DENY
  rules:
  - from: [{source: {principals: ['spiffe://cluster.local/ns/foo'], notNamespaces: [Bad_NS]}}]
    to: [{operation: {ports: ['80a', 70000, 0, -1]}}]
");
        let reason = rejected_reason(&statuses(&p)[0]).to_string();
        for expect in [
            r#"rules[0].from[0].source.principals[0]: "spiffe://cluster.local/ns/foo" is not a SPIFFE ID"#,
            r#"rules[0].from[0].source.notNamespaces[0]: "Bad_NS" is not a namespace name"#,
            r#"rules[0].to[0].operation.ports[0]: "80a" is not a port"#,
            r#"rules[0].to[0].operation.ports[1]: "70000" is not a port"#,
            r#"rules[0].to[0].operation.ports[2]: "0" is not a port"#,
            r#"rules[0].to[0].operation.ports[3]: "-1" is not a port"#,
        ] {
            assert!(reason.contains(expect), "missing {expect:?} in {reason}");
        }
        // Fail closed: the malformed principal matches every authenticated peer, every port matches.
        let ps = [p];
        assert!(!allowed(&ps, &from("anything", "x")));
        assert!(!allowed(
            &ps,
            &Request {
                dest_port: 1,
                ..from("anything", "x")
            }
        ));
        assert!(
            allowed(&ps, &plaintext()),
            "a principal never matches plaintext, even fail-closed"
        );
    }

    #[test]
    fn malformed_patterns() {
        assert!(parse_principal("cluster.local/ns/a*b/sa/c").is_err());
        assert!(parse_principal("**").is_err());
        assert!(parse_principal("").is_err());
        assert!(parse_principal("spiffe://").is_err());
        assert!(parse_principal("http://cluster.local/ns/a/sa/b").is_err());
        assert!(parse_principal("Cluster.Local/ns/a/sa/b").is_err());
        assert!(parse_principal("cluster.local/ns/a/sa/b/extra").is_err());
        assert!(parse_principal("cluster.local/ns//sa/b").is_err());
        assert!(parse_namespace("-foo").is_err());
        assert!(parse_namespace(&"a".repeat(64)).is_err());
        assert!(parse_namespace("a*b").is_err());
        assert_eq!(parse_namespace("a-*"), Ok(Pattern::Prefix("a-".into())));
    }

    #[test]
    fn unknown_action_is_rejected_and_enforced_as_deny() {
        let p = pol("
metadata: {name: ext, namespace: default}
spec:
  action: CUSTOM
  rules: [{from: [{source: {namespaces: [foo]}}]}]
");
        assert_eq!(p.spec.action, Action::Unknown("CUSTOM".into()));
        assert!(
            rejected_reason(&statuses(&p)[0])
                .contains(r#"spec.action: "CUSTOM" is not ALLOW, DENY or AUDIT"#)
        );
        let ps = [p];
        let v = evaluate(&ps, &req());
        assert!(!v.allowed);
        assert_eq!(v.to_string(), "deny by default/ext rule 0 (CUSTOM as DENY)");
        assert!(
            allowed(&ps, &from("bar", "x")),
            "not a default deny: it is not an ALLOW"
        );
    }

    #[test]
    fn unknown_fields_and_empty_entries_are_rejected() {
        // A typo (`form:`) must not turn a narrow ALLOW rule into `{}` (allow all).
        let p = pol("
metadata: {name: a, namespace: default}
spec:
  rules:
  - form: [{source: {namespaces: [foo]}}]
  - from: []
  - from: [{source: {}}]
  - to: [{}]
  - from: [{source: {namespace: [foo]}}]
  - to: [{operation: {port: ['8080']}}]
");
        let s = statuses(&p);
        let expect = [
            "rules[0].form: unknown field",
            "rules[1].from: must not be empty",
            "rules[2].from[0].source: must not be empty",
            "rules[3].to[0].operation: missing",
            "rules[4].from[0].source.namespace: unknown field",
            "rules[5].to[0].operation.port: unknown field",
        ];
        for (i, e) in expect.iter().enumerate() {
            assert!(rejected_reason(&s[i]).contains(e), "rule {i}: {:?}", s[i]);
        }
        assert!(
            !allowed(&[p], &req()),
            "none of the rejected ALLOW rules matches"
        );
    }

    #[test]
    fn statuses_per_rule() {
        let p = pol("
metadata: {name: mixed, namespace: default}
spec:
  rules:
  - from: [{source: {principals: [cluster.local/ns/foo/sa/client]}}]
    to: [{operation: {ports: ['8080']}}]
  - to: [{operation: {methods: [GET]}}]
  - from: [{source: {ipBlocks: [not-an-ip]}}]
");
        let s = statuses(&p);
        assert_eq!(s.len(), 3);
        assert_eq!(s[0], RuleStatus::KernelEnforced);
        proxy_reason(&s[1]);
        assert!(
            rejected_reason(&s[2]).contains(
                r#"rules[2].from[0].source.ipBlocks[0]: "not-an-ip" is not an IP address"#
            )
        );
    }

    // ---- parsing ----------------------------------------------------------------------------------------------

    #[test]
    fn parses_realistic_istio_style_policies() {
        let ps = pols(
            r#"
apiVersion: security.sinew.dev/v1alpha1
kind: AuthorizationPolicy
metadata:
  name: httpbin
  namespace: foo
spec:
  selector:
    matchLabels:
      app: httpbin
      version: v1
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/sleep"]
    - source:
        namespaces: ["dev"]
        notIpBlocks: ["10.10.0.0/16"]
    to:
    - operation:
        ports: ["8000", "8443"]
        notPorts: ["8001"]
  - from:
    - source:
        ipBlocks: ["203.0.113.0/24", "2001:db8::/48"]
---
apiVersion: security.sinew.dev/v1alpha1
kind: AuthorizationPolicy
metadata:
  name: deny-legacy
  namespace: foo
spec:
  action: DENY
  rules:
  - from:
    - source:
        notNamespaces: ["foo", "dev"]
    to:
    - operation:
        ports:
        - 9000
"#,
        );
        assert_eq!(ps.len(), 2);
        assert_eq!(ps[0].key(), "foo/httpbin");
        assert_eq!(ps[0].spec.selector.as_ref().unwrap().match_labels.len(), 2);
        assert_eq!(ps[0].spec.rules.len(), 2);
        assert_eq!(statuses(&ps[0]), vec![RuleStatus::KernelEnforced; 2]);
        assert_eq!(statuses(&ps[1]), vec![RuleStatus::KernelEnforced]);

        let labels = BTreeMap::from([
            ("app".to_string(), "httpbin".to_string()),
            ("version".to_string(), "v1".to_string()),
        ]);
        let base = Request {
            dest_namespace: "foo".into(),
            dest_labels: labels,
            dest_port: 8000,
            ..from("default", "sleep")
        };
        assert!(allowed(&ps, &base));
        assert!(!allowed(
            &ps,
            &Request {
                dest_port: 8001,
                ..base.clone()
            }
        ));
        assert!(allowed(
            &ps,
            &Request {
                dest_port: 8443,
                ..from("dev", "x")
            }
            .clone_into_ns(&base)
        ));
        assert!(!allowed(
            &ps,
            &Request {
                source_ip: "10.10.1.1".parse().unwrap(),
                dest_port: 8443,
                ..from("dev", "x")
            }
            .clone_into_ns(&base)
        ));
        // Rule 1: any port from the v4/v6 blocks, even plaintext.
        assert!(allowed(
            &ps,
            &Request {
                source: None,
                source_ip: "2001:db8:0:1::9".parse().unwrap(),
                dest_port: 1234,
                ..base.clone()
            }
        ));
        // The DENY: plaintext to 9000 is not in foo/dev, denied even from an allowed block.
        let v = evaluate(
            &ps,
            &Request {
                source: None,
                source_ip: "203.0.113.5".parse().unwrap(),
                dest_port: 9000,
                ..base.clone()
            },
        );
        assert_eq!(v.to_string(), "deny by foo/deny-legacy rule 0 (DENY)");
        // Round trip keeps the meaning.
        let again: AuthorizationPolicy =
            serde_yaml::from_str(&serde_yaml::to_string(&ps[0]).unwrap()).unwrap();
        assert_eq!(again, ps[0]);
    }

    #[test]
    fn nulls_read_like_absent_fields() {
        let p = pol("
metadata: {name: n, namespace: default}
spec:
  selector:
  action:
  rules:
  - from:
    to:
    when:
");
        assert_eq!(p.spec.action, Action::Allow);
        assert_eq!(statuses(&p), vec![RuleStatus::KernelEnforced]);
        assert!(allowed(&[p], &plaintext()), "one empty rule: allow all");
    }

    #[test]
    fn indentation_mistake_makes_two_rules() {
        // The known confusion: a `-` before `to` splits one rule into two ORed ones. Evaluated as written (the
        // ORed rules allow more), the statuses show two rules, so a reviewer sees it.
        let one = pol("
metadata: {name: p, namespace: default}
spec:
  rules:
  - from: [{source: {namespaces: [foo]}}]
    to: [{operation: {ports: ['8080']}}]
");
        let two = pol("
metadata: {name: p, namespace: default}
spec:
  rules:
  - from: [{source: {namespaces: [foo]}}]
  - to: [{operation: {ports: ['8080']}}]
");
        assert_eq!(statuses(&one).len(), 1);
        assert_eq!(statuses(&two).len(), 2);
        let bar = from("bar", "x");
        assert!(!allowed(std::slice::from_ref(&one), &bar));
        assert!(allowed(&[two], &bar));
    }

    // ---- validate ---------------------------------------------------------------------------------------------

    /// `validate`'s error for a policy `metadata: {name: p}` with this `spec`.
    fn invalid(spec: &str) -> String {
        let p = pol(&format!(
            "metadata: {{name: p, namespace: default}}\nspec: {spec}\n"
        ));
        validate(&p).expect_err(spec)
    }

    #[test]
    fn validate_accepts_good_policies_including_l7() {
        for spec in VALID_SPECS {
            let p = pol(&format!("metadata: {{name: p}}\nspec: {spec}\n"));
            assert_eq!(validate(&p), Ok(()), "{spec}");
        }
    }

    #[test]
    fn validate_rejects_naming_the_field() {
        let cases = [
            (
                "{action: ALOW}",
                r#"spec.action: "ALOW" is not one of ALLOW, DENY, AUDIT"#,
            ),
            (
                "{action: CUSTOM, rules: [{}]}",
                r#"spec.action: "CUSTOM" is not one of ALLOW, DENY, AUDIT"#,
            ),
            ("{actions: DENY}", "spec.actions: unknown field"),
            (
                "{rules: [{from: [{source: {ipBlocks: [10.0.0.0/8, 10.0.0.0/33]}}]}]}",
                r#"spec.rules[0].from[0].source.ipBlocks[1]: "10.0.0.0/33" is not a CIDR"#,
            ),
            (
                "{rules: [{}, {from: [{source: {notIpBlocks: [nope]}}]}]}",
                r#"spec.rules[1].from[0].source.notIpBlocks[0]: "nope" is not an IP address or CIDR"#,
            ),
            (
                "{rules: [{from: [{source: {principals: ['spiffe://cluster.local/ns/foo']}}]}]}",
                r#"spec.rules[0].from[0].source.principals[0]: "spiffe://cluster.local/ns/foo" is not a SPIFFE ID"#,
            ),
            (
                "{rules: [{from: [{source: {namespaces: [Bad_NS]}}]}]}",
                r#"spec.rules[0].from[0].source.namespaces[0]: "Bad_NS" is not a namespace name"#,
            ),
            (
                "{rules: [{to: [{operation: {ports: [70000]}}]}]}",
                r#"spec.rules[0].to[0].operation.ports[0]: "70000" is not a port (1-65535)"#,
            ),
            (
                "{rules: [{to: [{operation: {notPorts: ['80a']}}]}]}",
                r#"spec.rules[0].to[0].operation.notPorts[0]: "80a" is not a port (1-65535)"#,
            ),
            ("{rules: [{form: []}]}", "spec.rules[0].form: unknown field"),
            (
                "{rules: [{from: [{source: {namespace: [a]}}]}]}",
                "spec.rules[0].from[0].source.namespace: unknown field",
            ),
            (
                "{rules: [{to: [{operation: {port: [1]}}]}]}",
                "spec.rules[0].to[0].operation.port: unknown field",
            ),
            (
                "{rules: [{from: []}]}",
                "spec.rules[0].from: must not be empty",
            ),
            ("{rules: [{to: []}]}", "spec.rules[0].to: must not be empty"),
            (
                "{rules: [{from: [{}]}]}",
                "spec.rules[0].from[0].source: missing",
            ),
            (
                "{rules: [{to: [{}]}]}",
                "spec.rules[0].to[0].operation: missing",
            ),
            (
                "{rules: [{from: [{source: {}}]}]}",
                "spec.rules[0].from[0].source: must not be empty",
            ),
            (
                "{rules: [{to: [{operation: {}}]}]}",
                "spec.rules[0].to[0].operation: must not be empty",
            ),
            (
                "{rules: [{from: [{source: {ipBlocks: ['::ffff:10.0.0.0/104']}}]}]}",
                r#"spec.rules[0].from[0].source.ipBlocks[0]: "::ffff:10.0.0.0/104" is an IPv4-mapped IPv6 block; write the IPv4 form 10.0.0.0/8"#,
            ),
            (
                "{rules: [{from: [{source: {notIpBlocks: [10.0.0.0/8, '::ffff:10.1.2.3']}}]}]}",
                r#"spec.rules[0].from[0].source.notIpBlocks[1]: "::ffff:10.1.2.3" is an IPv4-mapped IPv6 block; write the IPv4 form 10.1.2.3"#,
            ),
            (
                "{rules: [{from: [{source: {ipBlocks: ['::ffff:0:0/96']}}]}]}",
                "write the IPv4 form 0.0.0.0/0",
            ),
        ];
        for (spec, want) in cases {
            let err = invalid(spec);
            assert!(err.contains(want), "{spec}:\n got {err}\nwant {want}");
            assert!(
                !err.contains("matches nothing") && !err.contains("fail-closed"),
                "{err}"
            );
        }
    }

    #[test]
    fn validate_reports_every_problem_and_the_action_once() {
        let err = invalid(
            "{action: NOPE, extra: 1, rules: [{from: []}, {to: [{operation: {ports: [0]}}]}]}",
        );
        assert_eq!(
            err,
            r#"spec.action: "NOPE" is not one of ALLOW, DENY, AUDIT; spec.extra: unknown field; spec.rules[0].from: must not be empty (omit it to match every source); spec.rules[1].to[0].operation.ports[0]: "0" is not a port (1-65535)"#
        );
    }

    #[test]
    fn validate_requires_a_name() {
        for meta in ["{namespace: x}", "{name: '', namespace: x}", "{name: null}"] {
            let p = pol(&format!("metadata: {meta}\nspec: {{}}\n"));
            assert_eq!(
                validate(&p),
                Err("metadata.name: must not be empty".to_string()),
                "{meta}"
            );
        }
    }

    #[test]
    fn validate_agrees_with_rejected_statuses() {
        // Every policy the tests above call Rejected is invalid, and a valid one has no Rejected rule.
        for spec in [
            "{rules: [{from: [{source: {ipBlocks: [x]}}]}, {}]}",
            "{action: DENY, rules: [{to: [{operation: {ports: [-1]}}]}]}",
        ] {
            let p = pol(&format!("metadata: {{name: p}}\nspec: {spec}\n"));
            assert!(
                statuses(&p)
                    .iter()
                    .any(|s| matches!(s, RuleStatus::Rejected { .. }))
            );
            assert!(validate(&p).is_err());
        }
    }

    // ---- Evaluator ----------------------------------------------------------------------------------------------

    #[test]
    fn evaluator_applicable_is_in_decider_order() {
        let ps = pols(
            "
metadata: {name: z, namespace: default}
spec: {action: DENY, rules: [{}]}
---
metadata: {name: other-ns, namespace: prod}
spec: {}
---
metadata: {name: a, namespace: sinew-system}
spec: {selector: {matchLabels: {app: web}}}
---
metadata: {name: b, namespace: default}
spec: {selector: {matchLabels: {app: db}}}
---
metadata: {name: a, namespace: default}
spec: {action: AUDIT, rules: [{}]}
",
        );
        let e = Evaluator::new(&ps, DEFAULT_ROOT_NAMESPACE);
        let web = BTreeMap::from([("app".to_string(), "web".to_string())]);
        assert_eq!(e.applicable("default", &web), [4, 0, 2]);
        assert_eq!(e.applicable("prod", &web), [1, 2]);
        assert_eq!(e.applicable("prod", &BTreeMap::new()), [1]);
        assert_eq!(e.applicable("empty", &BTreeMap::new()), Vec::<usize>::new());
        let v = e.evaluate_among(&[4, 0, 2], &req());
        assert_eq!(v.to_string(), "deny by default/z rule 0 (DENY)");
        assert_eq!(v.audit[0].policy, "default/a");
        // Without the DENY, the root namespace's ALLOW (no rules) denies by default.
        assert!(!e.evaluate_among(&[4, 2], &req()).allowed);
        assert!(e.evaluate_among(&[], &req()).allowed);
        assert_eq!(e.statuses(0), [RuleStatus::KernelEnforced]);
        assert_eq!(e.policies().len(), 5);
    }

    #[test]
    fn evaluator_agrees_with_the_wrapper_on_a_request_grid() {
        // Every request of a small grid against a mixed policy set, through every entry point.
        let ps = pols(
            "
metadata: {name: allow-foo-8080, namespace: default}
spec:
  rules:
  - from: [{source: {namespaces: [foo], notIpBlocks: [10.1.2.128/25]}}]
    to: [{operation: {ports: ['8080'], notPorts: ['8081']}}]
  - from: [{source: {ipBlocks: ['2001:db8::/32', 192.168.0.0/16]}}]
---
metadata: {name: deny-plaintext, namespace: default}
spec:
  action: DENY
  rules: [{from: [{source: {notPrincipals: ['*']}}], to: [{operation: {ports: ['9090']}}]}]
---
metadata: {name: broken, namespace: sinew-system}
spec:
  action: DENY
  rules: [{from: [{source: {ipBlocks: [bogus], namespaces: [evil]}}]}]
---
metadata: {name: audit, namespace: default}
spec: {action: AUDIT, rules: [{to: [{operation: {ports: ['8080']}}]}]}
---
metadata: {name: custom, namespace: default}
spec: {action: CUSTOM, rules: [{to: [{operation: {ports: ['7070']}}]}]}
",
        );
        let sources = [
            Some(Identity::new(TD, "foo", "client")),
            Some(Identity::new(TD, "evil", "x")),
            Some(Identity::new(TD, "bar", "x")),
            None,
        ];
        let ips = [
            "10.1.2.3",
            "10.1.2.200",
            "192.168.1.1",
            "2001:db8::9",
            "::ffff:10.1.2.3",
        ];
        let mut seen = BTreeSet::new();
        for source in &sources {
            for ip in ips {
                for port in [7070, 8080, 8081, 9090, 1] {
                    for ns in ["default", "prod"] {
                        let r = Request {
                            source: source.clone(),
                            source_ip: ip.parse().unwrap(),
                            dest_namespace: ns.into(),
                            dest_port: port,
                            ..req()
                        };
                        seen.insert(evaluate(&ps, &r).to_string());
                    }
                }
            }
        }
        // The grid reaches every kind of verdict.
        for expect in [
            "allow by default/allow-foo-8080 rule 0 (ALLOW)",
            "allow by default/allow-foo-8080 rule 1 (ALLOW)",
            "deny by default/custom rule 0 (CUSTOM as DENY)",
            "deny by default/deny-plaintext rule 0 (DENY)",
            "deny by sinew-system/broken rule 0 (DENY)",
            "allow: no ALLOW policy selects the workload",
            "deny: an ALLOW policy selects the workload and no rule matched (default deny)",
        ] {
            assert!(seen.contains(expect), "{expect} not in {seen:#?}");
        }
    }

    #[test]
    fn evaluator_ports() {
        let ps = pols("
metadata: {name: a, namespace: default}
spec:
  rules:
  - to: [{operation: {ports: ['8080', 9090, '80a', 0, 70000], notPorts: [22]}}]
  - to: [{operation: {methods: [GET], ports: ['443']}}]
  - from: [{source: {namespaces: [foo]}}]
---
metadata: {name: b, namespace: default}
spec: {action: DENY, rules: [{to: [{operation: {notPorts: ['22', '2222']}}, {operation: {ports: [65535]}}]}]}
---
metadata: {name: c, namespace: prod}
spec: {rules: [{to: [{operation: {ports: ['1']}}]}]}
");
        let e = Evaluator::new(&ps, DEFAULT_ROOT_NAMESPACE);
        assert_eq!(
            e.ports(&[0]),
            BTreeSet::from([22, 443, 8080, 9090]),
            "invalid ports left out, L7 and rejected rules included"
        );
        assert_eq!(e.ports(&[1]), BTreeSet::from([22, 2222, 65535]));
        assert_eq!(
            e.ports(&[0, 1, 2]),
            BTreeSet::from([1, 22, 443, 2222, 8080, 9090, 65535])
        );
        assert_eq!(e.ports(&[]), BTreeSet::new());
        let labels = BTreeMap::new();
        assert_eq!(e.ports(&e.applicable("default", &labels)).len(), 6);
    }

    #[test]
    fn evaluator_cidrs() {
        let ps = pols("
metadata: {name: a, namespace: default}
spec:
  rules:
  - from:
    - source: {ipBlocks: [10.1.2.77/24, 10.1.2.0/24, 10.0.0.0/33, 192.168.1.1, bogus]}
    - source: {notIpBlocks: ['2001:db8::1/32', '::ffff:10.0.0.0/104', '::ffff:0:0/95', 0.0.0.0/0, '::/0']}
---
metadata: {name: b, namespace: other}
spec: {action: DENY, rules: [{from: [{source: {ipBlocks: ['2001:db8::5', 10.255.255.255/8]}}]}]}
");
        let e = Evaluator::new(&ps, DEFAULT_ROOT_NAMESPACE);
        let cidr = |s: &str, len: u8| (s.parse::<IpAddr>().unwrap(), len);
        assert_eq!(
            e.cidrs(),
            [
                cidr("0.0.0.0", 0),
                cidr("10.0.0.0", 8),
                cidr("10.1.2.0", 24),
                cidr("192.168.1.1", 32),
                cidr("::", 0),
                cidr("::fffe:0:0", 95),
                cidr("2001:db8::", 32),
                cidr("2001:db8::5", 128),
            ]
        );
        assert_eq!(Evaluator::new(&[], "x").cidrs(), []);
    }

    trait IntoNs {
        fn clone_into_ns(self, base: &Request) -> Request;
    }

    impl IntoNs for Request {
        /// This request, sent to `base`'s destination workload.
        fn clone_into_ns(self, base: &Request) -> Request {
            Request {
                dest_namespace: base.dest_namespace.clone(),
                dest_labels: base.dest_labels.clone(),
                ..self
            }
        }
    }
}
