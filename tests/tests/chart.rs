//! The Helm chart (`charts/sinew`), checked without a cluster: values against the schema (and bad values refused
//! with their path), template references against values.yaml, documentation and dead keys, the agent config the
//! ConfigMap renders against the agent's own parser, the CRDs against `mesh-agent crds`, block balance, and the
//! DaemonSet's and RBAC's security-relevant settings. `cargo test -p sinew-tests --test chart`.
//!
//! Two tests need the built agent binary (`cargo build -p mesh-agent`): the CRDs and the CLI flags the chart uses.
//! One renders the chart with a real `helm` when one is installed (`$HELM` or `helm` on PATH) and says so loudly
//! when there is none.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use serde_json::{Value, json};
use sinew_tests::agent_bin;
use sinew_tests::chart::{
    self, Usage, check_blocks, config_block, config_map_keys, file_config_keys, lookup,
    option_paths, pattern_matches, read_chart_file, render_simple, strip_actions, templates,
    unsupported_keywords, validate, values_keys, values_refs, yaml_docs, yaml_key_paths,
    yaml_to_json,
};
use sinew_tests::workspace_root;

/// Values keys no template needs to use, with the reason. Empty: every key does something.
const INTENTIONALLY_UNUSED: &[(&str, &str)] = &[];

/// The capabilities the agent needs, in values.yaml's order (each has its reason there).
const CAPABILITIES: &[&str] = &["BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"];

fn schema() -> Value {
    serde_json::from_str(&read_chart_file("values.schema.json").unwrap())
        .expect("values.schema.json is JSON")
}

fn values() -> Value {
    yaml_to_json(&read_chart_file("values.yaml").unwrap()).expect("values.yaml is YAML")
}

fn template(name: &str) -> String {
    read_chart_file(&format!("templates/{name}")).unwrap()
}

fn path(p: &str) -> Vec<String> {
    p.split('.').map(str::to_string).collect()
}

/// Every `.Values` path the templates refer to.
fn all_refs() -> BTreeSet<Vec<String>> {
    let mut refs = BTreeSet::new();
    for (name, text) in templates().unwrap() {
        for (line, p) in values_refs(&text).unwrap_or_else(|e| panic!("{name}: {e:#}")) {
            assert!(
                !p.is_empty(),
                "{name}:{line}: a bare `.Values` hides which keys the template uses"
            );
            refs.insert(p);
        }
    }
    refs
}

/// `values` with `v` set at `at` (dotted; intermediate objects created).
fn with(values: &Value, at: &str, v: Value) -> Value {
    let mut out = values.clone();
    let keys = path(at);
    let mut cur = &mut out;
    for k in &keys[..keys.len() - 1] {
        cur = cur
            .as_object_mut()
            .expect("an object on the way")
            .entry(k.clone())
            .or_insert_with(|| json!({}));
    }
    cur.as_object_mut()
        .expect("an object at the end")
        .insert(keys[keys.len() - 1].clone(), v);
    out
}

/// `values` without the key at `at`.
fn without(values: &Value, at: &str) -> Value {
    let mut out = values.clone();
    let keys = path(at);
    let parent = keys[..keys.len() - 1]
        .iter()
        .fold(&mut out, |v, k| v.get_mut(k).expect("the parent exists"));
    parent
        .as_object_mut()
        .unwrap()
        .remove(&keys[keys.len() - 1]);
    out
}

/// The stripped template (actions removed) parsed as YAML documents.
fn stripped_docs(name: &str) -> Vec<Value> {
    let text = strip_actions(&template(name)).unwrap();
    yaml_docs(&text)
        .unwrap_or_else(|e| panic!("{name} without its actions is not YAML: {e:#}\n{text}"))
}

#[test]
fn values_match_the_schema() {
    let errors = validate(&schema(), &values());
    assert!(
        errors.is_empty(),
        "values.yaml does not match values.schema.json:\n{}",
        errors
            .iter()
            .map(|e| format!("  {e}\n"))
            .collect::<String>()
    );
}

#[test]
fn schema_is_draft_07_and_uses_only_keywords_the_validator_implements() {
    let s = schema();
    assert_eq!(s["$schema"], "http://json-schema.org/draft-07/schema#");
    assert_eq!(unsupported_keywords(&s), Vec::<String>::new());
    // Every object in the schema is closed (or a map with a schema for its values): typos fail.
    fn closed(s: &Value, at: &str, out: &mut Vec<String>) {
        let Some(o) = s.as_object() else { return };
        if o.get("type") == Some(&json!("object")) && o.get("additionalProperties").is_none() {
            let open_ok = ["nodeAffinity", "podAffinity", "podAntiAffinity"]
                .iter()
                .any(|k| at.ends_with(k));
            if !open_ok {
                out.push(at.to_string());
            }
        }
        for key in ["properties", "definitions"] {
            for (k, sub) in o.get(key).and_then(Value::as_object).into_iter().flatten() {
                closed(sub, &format!("{at}/{k}"), out);
            }
        }
        for key in ["items", "additionalProperties"] {
            if let Some(sub) = o.get(key) {
                closed(sub, &format!("{at}/{key}"), out);
            }
        }
    }
    let mut open = Vec::new();
    closed(&s, "#", &mut open);
    assert!(
        open.is_empty(),
        "objects without additionalProperties: {open:?}"
    );
}

#[test]
fn bad_values_are_rejected_with_their_path() {
    let v = values();
    let cases: Vec<(&str, Value, &str, &str)> = vec![
        (
            "a port out of range",
            with(&v, "config.proxy.inboundPort", json!(70000)),
            "$.config.proxy.inboundPort",
            "maximum",
        ),
        (
            "a port of 0",
            with(&v, "config.adminPort", json!(0)),
            "$.config.adminPort",
            "minimum",
        ),
        (
            "an unknown log format",
            with(&v, "config.logFormat", json!("yaml")),
            "$.config.logFormat",
            "enum",
        ),
        (
            "a duration the agent does not parse",
            with(&v, "config.proxy.drainTimeout", json!("10 seconds")),
            "$.config.proxy.drainTimeout",
            "pattern",
        ),
        (
            "units out of order",
            with(&v, "config.svidLifetime", json!("30m1h")),
            "$.config.svidLifetime",
            "pattern",
        ),
        (
            "a typo at the top",
            with(&v, "tolerations_", json!([])),
            "$.tolerations_",
            "additionalProperties",
        ),
        (
            "a typo in a group",
            with(&v, "config.proxy.drainTimout", json!("10s")),
            "$.config.proxy.drainTimout",
            "additionalProperties",
        ),
        (
            "a missing required key",
            without(&v, "image.repository"),
            "$.image",
            "required",
        ),
        (
            "a capability with the CAP_ prefix",
            with(&v, "agent.capabilities", json!(["BPF", "CAP_SYS_ADMIN"])),
            "$.agent.capabilities[1]",
            "enum",
        ),
        (
            "a string where a number goes",
            with(&v, "terminationGracePeriodSeconds", json!("30")),
            "$.terminationGracePeriodSeconds",
            "type",
        ),
        (
            "a fraction where an integer goes",
            with(&v, "config.proxy.maxStreams", json!(1.5)),
            "$.config.proxy.maxStreams",
            "type",
        ),
        (
            "a boolean quantity, through $ref",
            with(&v, "agent.resources.requests.cpu", json!(true)),
            "$.agent.resources.requests.cpu",
            "type",
        ),
        (
            "a typo in resources, through $ref",
            with(&v, "agent.resources.request", json!({})),
            "$.agent.resources.request",
            "additionalProperties",
        ),
        (
            "a toleration operator in the wrong case",
            with(&v, "tolerations", json!([{"operator": "exists"}])),
            "$.tolerations[0].operator",
            "enum",
        ),
        (
            "an upper-case namespace",
            with(&v, "config.meshRootNamespace", json!("Sinew")),
            "$.config.meshRootNamespace",
            "pattern",
        ),
        (
            "a CA validity of 0 days",
            with(&v, "ca.validityDays", json!(0)),
            "$.ca.validityDays",
            "minimum",
        ),
        (
            "a relative host path",
            with(&v, "hostPaths.stateDir", json!("var/lib/sinew")),
            "$.hostPaths.stateDir",
            "pattern",
        ),
    ];
    let s = schema();
    for (what, doc, at, keyword) in cases {
        let errors = validate(&s, &doc);
        assert!(
            errors
                .iter()
                .any(|e| e.path == at && e.message.starts_with(keyword)),
            "{what}: expected a {keyword} error at {at}, got {errors:?}"
        );
        assert!(
            errors.iter().all(|e| e.path.starts_with(at)),
            "{what}: errors elsewhere too: {errors:?}"
        );
    }
}

#[test]
fn pattern_engine_matches_like_a_regex() {
    let cases = [
        ("^[a-z0-9._-]+$", "cluster.local", true),
        ("^[a-z0-9._-]+$", "Cluster.local", false),
        ("^[a-z0-9._-]+$", "", false),
        ("^([0-9]+d)?([0-9]+h)?([0-9]+m)?([0-9]+s)?$", "1h30m", true),
        ("^([0-9]+d)?([0-9]+h)?([0-9]+m)?([0-9]+s)?$", "30m1h", false),
        ("^([0-9]+d)?([0-9]+h)?([0-9]+m)?([0-9]+s)?$", "10", false),
        ("^([a-z0-9]([-a-z0-9]*[a-z0-9])?)?$", "", true),
        ("^([a-z0-9]([-a-z0-9]*[a-z0-9])?)?$", "sinew-system", true),
        ("^([a-z0-9]([-a-z0-9]*[a-z0-9])?)?$", "sinew-", false),
        ("^/", "/sys/fs/cgroup", true),
        ("^/", "sys", false),
        // A search, not a whole match, without anchors.
        ("b+", "abbbc", true),
        ("^b+$", "abbbc", false),
        ("a|b", "xbx", true),
        ("^(?:ab){2}$", "abab", true),
        ("^(?:ab){2}$", "ababab", false),
        ("^a{2,3}$", "aaa", true),
        ("^a{2,3}$", "aaaa", false),
        ("^a{2,}$", "aaaaa", true),
        ("^[^0-9]+$", "abc", true),
        ("^[^0-9]+$", "a1c", false),
        ("^\\d+\\.\\d+$", "1.5", true),
        ("^\\d+\\.\\d+$", "15", false),
        (
            "^[0-9]{1,3}[.][0-9]{1,3}[.][0-9]{1,3}[.][0-9]{1,3}$",
            "169.254.7.1",
            true,
        ),
        (
            "^[0-9]{1,3}[.][0-9]{1,3}[.][0-9]{1,3}[.][0-9]{1,3}$",
            "169.254.7",
            false,
        ),
        ("^a.c$", "abc", true),
        ("^a?b*c+$", "c", true),
        ("^a?b*c+$", "aabc", false),
    ];
    for (p, s, want) in cases {
        assert_eq!(pattern_matches(p, s).unwrap(), want, "{p} on {s:?}");
    }
    for bad in ["(ab", "ab)", "[ab", "*a", "a{2", "\\q", "(?=a)", "a+?"] {
        assert!(pattern_matches(bad, "a").is_err(), "{bad} must be refused");
    }
    // Every pattern the schema uses parses.
    fn patterns(s: &Value, out: &mut Vec<String>) {
        match s {
            Value::Object(o) => {
                if let Some(p) = o.get("pattern").and_then(Value::as_str) {
                    out.push(p.to_string());
                }
                o.values().for_each(|v| patterns(v, out));
            }
            Value::Array(a) => a.iter().for_each(|v| patterns(v, out)),
            _ => {}
        }
    }
    let mut all = Vec::new();
    patterns(&schema(), &mut all);
    assert!(!all.is_empty());
    for p in all {
        pattern_matches(&p, "x").unwrap_or_else(|e| panic!("schema pattern {p}: {e:#}"));
    }
}

#[test]
fn templates_are_balanced() {
    let all = templates().unwrap();
    let names: Vec<&str> = all.iter().map(|(n, _)| n.as_str()).collect();
    for want in [
        "_helpers.tpl",
        "NOTES.txt",
        "clusterrole.yaml",
        "configmap.yaml",
        "crds.yaml",
        "daemonset.yaml",
        "role.yaml",
        "secret-ca.yaml",
        "serviceaccount.yaml",
    ] {
        assert!(
            names.contains(&want),
            "templates/{want} is missing: {names:?}"
        );
    }
    for (name, text) in &all {
        check_blocks(text).unwrap_or_else(|e| panic!("templates/{name}: {e:#}"));
    }
}

#[test]
fn the_block_checker_refuses_unbalanced_templates() {
    let bad = [
        ("{{- if .Values.a }}\nx\n", "never closed"),
        ("x\n{{- end }}\n", "closes no block"),
        ("{{ else }}\n", "outside"),
        ("{{ .Values.a \n", "unclosed"),
        ("a: }}\n", "closes no action"),
        ("{{/* open comment\n", "unclosed comment"),
        (
            "{{ if .Values.a }}{{ range .Values.b }}{{ end }}\n",
            "never closed",
        ),
        ("{{ .Values.a {{ .Values.b }}\n", "inside an action"),
    ];
    for (text, want) in bad {
        let e = check_blocks(text).expect_err(text).to_string();
        assert!(e.contains(want), "{text:?}: {e}");
    }
    check_blocks("{{- /* c */ -}}\n{{ define \"x\" }}{{ if .a }}{{ else if .b }}{{ else }}{{ end }}{{ end }}\n")
        .unwrap();
}

#[test]
fn every_template_reference_exists_in_values() {
    let v = values();
    let mut missing = Vec::new();
    for (name, text) in templates().unwrap() {
        for (line, p) in values_refs(&text).unwrap() {
            if lookup(&v, &p).is_none() {
                missing.push(format!("templates/{name}:{line}: .Values.{}", p.join(".")));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "not in values.yaml:\n{}",
        missing.join("\n")
    );
    // The scanner sees references in every position: `$.Values`, include and default arguments, pipelines.
    let refs = values_refs(
        "{{ $.Values.a.b }}{{ include \"x\" .Values.c }}{{ default .Chart.Name .Values.d.e | quote }}\
         {{/* .Values.comment */}}{{ .Values.f | int64 }}{{ (index .Values.g \"h\") }}",
    )
    .unwrap();
    let got: Vec<String> = refs.into_iter().map(|(_, p)| p.join(".")).collect();
    assert_eq!(got, ["a.b", "c", "d.e", "f", "g"]);
}

#[test]
fn the_values_key_scanner_agrees_with_the_yaml_parser() {
    let text = read_chart_file("values.yaml").unwrap();
    let scanned: BTreeSet<Vec<String>> = values_keys(&text)
        .unwrap()
        .into_iter()
        .map(|k| k.path)
        .collect();
    assert_eq!(scanned, yaml_key_paths(&values()));
}

#[test]
fn every_values_key_is_documented() {
    let text = read_chart_file("values.yaml").unwrap();
    let readme = read_chart_file("README.md").unwrap();
    let keys = values_keys(&text).unwrap();
    let options = option_paths(&values(), &all_refs());
    let mut undocumented = Vec::new();
    for (p, _) in &options {
        let key = keys
            .iter()
            .find(|k| &k.path == p)
            .expect("the scanner lists every key");
        let in_readme = readme.contains(&format!("`{}`", p.join(".")));
        if !key.commented && !in_readme {
            undocumented.push(format!("values.yaml:{}: {}", key.line, p.join(".")));
        }
    }
    assert!(
        undocumented.is_empty(),
        "keys without a comment on the line before (or a row in README.md's values table):\n{}",
        undocumented.join("\n")
    );
    // The README's values table has a row for every option a template uses as a whole.
    let missing: Vec<String> = options
        .iter()
        .filter(|(_, u)| *u == Usage::Leaf)
        .map(|(p, _)| p.join("."))
        .filter(|p| !readme.contains(&format!("| `{p}` |")))
        .collect();
    assert!(
        missing.is_empty(),
        "README.md's values table lacks {missing:?}"
    );
}

#[test]
fn every_values_key_is_used_by_a_template() {
    let options = option_paths(&values(), &all_refs());
    let unused: Vec<String> = options
        .iter()
        .filter(|(_, u)| *u == Usage::Unused)
        .map(|(p, _)| p.join("."))
        .filter(|p| !INTENTIONALLY_UNUSED.iter().any(|(k, _)| k == p))
        .collect();
    assert!(
        unused.is_empty(),
        "values.yaml keys no template uses: {unused:?}"
    );
    for (k, why) in INTENTIONALLY_UNUSED {
        assert!(
            options
                .iter()
                .any(|(p, u)| p.join(".") == *k && *u == Usage::Unused),
            "{k} is listed as unused ({why}) but is used or gone"
        );
    }
}

/// The config keys `mesh-agent run --config` accepts, read from the agent's source at run time.
fn agent_config_keys() -> BTreeSet<String> {
    let src = workspace_root().join("mesh-agent/src/config.rs");
    let text = std::fs::read_to_string(&src).unwrap();
    file_config_keys(&text).unwrap()
}

#[test]
fn config_map_keys_are_keys_the_agent_accepts() {
    let accepted = agent_config_keys();
    let keys = config_map_keys(&template("configmap.yaml")).unwrap();
    assert!(keys.len() > 10, "{keys:?}");
    let unknown: Vec<&String> = keys.iter().filter(|k| !accepted.contains(*k)).collect();
    assert!(
        unknown.is_empty(),
        "the ConfigMap sets keys the agent's FileConfig does not have: {unknown:?} (has {accepted:?})"
    );
    let mut seen = BTreeSet::new();
    for k in &keys {
        assert!(seen.insert(k), "{k} is set twice");
    }
    // The chart never uses the file source: no source-dir, and no kubeconfig (in-cluster config).
    assert!(!keys.iter().any(|k| k == "source-dir" || k == "kubeconfig"));
    // The flags the DaemonSet passes are config keys too (the same names).
    let ds = template("daemonset.yaml");
    let flags: Vec<&str> = ds
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- --"))
        .map(|f| f.split('=').next().unwrap())
        .collect();
    assert_eq!(flags, ["config", "node", "lease-namespace", "lease-holder"]);
    for f in &flags[1..] {
        assert!(accepted.contains(*f), "--{f} is no config key of the agent");
    }
    // The reader sees renames and refuses a struct it no longer understands.
    let demo = "#[derive(Deserialize)]\n#[serde(deny_unknown_fields, rename_all = \"kebab-case\")]\n\
                struct FileConfig {\n    node: Option<String>,\n    #[serde(rename = \"x-y\")]\n    \
                some_field: Option<u32>,\n    proxy_addr6: Option<Ipv6Addr>,\n}\n";
    assert_eq!(
        file_config_keys(demo).unwrap(),
        BTreeSet::from(["node".into(), "x-y".into(), "proxy-addr6".into()])
    );
    assert!(file_config_keys(&demo.replace("kebab-case", "snake_case")).is_err());
}

/// Parses a config file the way `mesh-agent run --config` does, with the node name the DaemonSet passes as a
/// flag, and returns the effective config as the agent logs it (JSON).
fn agent_resolve(config_yaml: &str, tag: &str) -> Result<Value, String> {
    let file = std::env::temp_dir().join(format!("sinew-chart-{}-{tag}.yaml", std::process::id()));
    std::fs::write(&file, config_yaml).unwrap();
    let args = mesh_agent::config::RunArgs {
        config: Some(file.clone()),
        node: Some("node-1".into()),
        ..Default::default()
    };
    let result = args.resolve();
    std::fs::remove_file(&file).ok();
    result
        .map(|c| serde_json::to_value(&c).unwrap())
        .map_err(|e| e.to_string())
}

#[test]
fn the_agent_accepts_the_config_the_chart_renders() {
    let v = values();
    let block = config_block(&template("configmap.yaml")).unwrap();
    let render =
        |values: &Value| -> String { render_simple(&block, values, "sinew-system").unwrap() };

    // The defaults, plus what the DaemonSet passes as flags.
    let config = render(&v);
    let with_flags = format!("{config}lease-namespace: sinew-system\nlease-holder: sinew-x7k2p\n");
    let c = agent_resolve(&with_flags, "defaults")
        .unwrap_or_else(|e| panic!("the agent refuses the chart's config: {e}\n{with_flags}"));
    let text = c.to_string();
    for want in [
        "/run/sinew/cgroupv2",
        "/sys/fs/bpf/sinew",
        "/host/proc",
        "/etc/sinew/ca",
        "/var/lib/sinew",
        "sinew-policy-status",
        "sinew-x7k2p",
        "sinew-agent",
    ] {
        assert!(
            text.contains(want),
            "{want} not in the effective config: {c:#}"
        );
    }
    assert_eq!(c["admin-addr"], "127.0.0.1:15020");
    assert_eq!(c["mesh-root-namespace"], "sinew-system");
    assert!(c["proxy"].is_object(), "{c:#}");

    // Other values render to configs the agent takes as well.
    let variants = [
        ("proxy off", with(&v, "config.proxy.enabled", json!(false))),
        (
            "ipv6",
            with(&v, "config.proxy.addr6", json!("fd16:9254:7:1::1")),
        ),
        (
            "root ns",
            with(&v, "config.meshRootNamespace", json!("mesh-root")),
        ),
        (
            "big numbers",
            with(&v, "config.policyEventsPerSec", json!(1000000)),
        ),
        ("text logs", with(&v, "config.logFormat", json!("text"))),
        ("no status", with(&v, "config.policyStatus", json!(false))),
    ];
    for (tag, values) in variants {
        assert!(validate(&schema(), &values).is_empty(), "{tag}");
        let config = render(&values);
        let c = agent_resolve(&config, "variant")
            .unwrap_or_else(|e| panic!("{tag}: the agent refuses it: {e}\n{config}"));
        match tag {
            "proxy off" => assert!(c["proxy"].is_null(), "{c:#}"),
            "ipv6" => assert!(c.to_string().contains("fd16:9254:7:1::1"), "{c:#}"),
            "root ns" => assert_eq!(c["mesh-root-namespace"], "mesh-root"),
            "big numbers" => assert_eq!(c["policy-events-per-sec"], 1000000),
            "text logs" => assert_eq!(c["log-format"], "text"),
            _ => {}
        }
    }
}

#[test]
fn crds_file_is_what_mesh_agent_crds_prints() {
    let bin = agent_bin();
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p mesh-agent` first",
        bin.display()
    );
    let out = Command::new(&bin).arg("crds").output().unwrap();
    assert!(out.status.success(), "mesh-agent crds failed: {out:?}");
    let file = chart::chart_dir().join("files/crds.yaml");
    let on_disk = std::fs::read(&file).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (generate it with `mesh-agent crds`)",
            file.display()
        )
    });
    assert!(
        on_disk == out.stdout,
        "charts/sinew/files/crds.yaml differs from `mesh-agent crds`; regenerate it:\n  \
         target/debug/mesh-agent crds > charts/sinew/files/crds.yaml"
    );
    let docs = yaml_docs(&String::from_utf8(out.stdout).unwrap()).unwrap();
    let names: BTreeSet<&str> = docs
        .iter()
        .map(|d| d["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        BTreeSet::from([
            "authorizationpolicies.security.sinew.dev",
            "peerauthentications.security.sinew.dev"
        ])
    );
    for d in &docs {
        assert_eq!(d["kind"], "CustomResourceDefinition");
        assert_eq!(
            d["metadata"]["annotations"]["helm.sh/resource-policy"], "keep",
            "{} must survive helm uninstall",
            d["metadata"]["name"]
        );
    }
    // The template includes the file, and only when crds.install is set.
    let t = template("crds.yaml");
    assert!(t.contains(".Files.Get \"files/crds.yaml\""), "{t}");
    assert!(t.contains("{{- if .Values.crds.install }}"), "{t}");
}

#[test]
fn the_agent_has_the_commands_and_flags_the_chart_uses() {
    let bin = agent_bin();
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p mesh-agent` first",
        bin.display()
    );
    let help = |args: &[&str]| -> String {
        let out = Command::new(&bin)
            .args(args)
            .arg("--help")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mesh-agent {} --help failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // The init container.
    assert!(help(&["mount-bpffs"]).contains("--bpffs-root"));
    // The agent container's flags.
    let run = help(&["run"]);
    for f in ["--config", "--node", "--lease-namespace", "--lease-holder"] {
        assert!(run.contains(f), "mesh-agent run has no {f}");
    }
    // What NOTES.txt and the docs tell operators to run.
    let status = help(&["status"]);
    assert!(status.contains("--cgroup-root") && status.contains("--admin-addr"));
    assert!(help(&["policy", "status"]).contains("--admin-addr"));
    assert!(help(&["uninstall"]).contains("--bpffs-root"));
}

fn find<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind}"))
}

fn mount<'a>(container: &'a Value, name: &str) -> &'a Value {
    container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == name)
        .unwrap_or_else(|| panic!("{} has no mount {name}", container["name"]))
}

fn volume<'a>(pod: &'a Value, name: &str) -> &'a Value {
    pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == name)
        .unwrap_or_else(|| panic!("no volume {name}"))
}

/// The DaemonSet's security-relevant settings, on its structure (`docs` is the template without its actions, or a
/// real rendering). `rendered`: values are filled in (otherwise they read `TEMPLATE`).
fn check_daemonset(docs: &[Value], rendered: bool) {
    let ds = find(docs, "DaemonSet");
    assert_eq!(
        ds["spec"]["updateStrategy"],
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}})
    );
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["hostPID"], true);
    assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet");
    assert_eq!(pod["automountServiceAccountToken"], true);
    assert!(pod.get("hostIPC").is_none() && pod.get("shareProcessNamespace").is_none());

    let containers = pod["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    let agent = &containers[0];
    assert_eq!(agent["name"], "agent");
    let sc = &agent["securityContext"];
    assert_ne!(
        sc["privileged"], true,
        "the agent container must not be privileged"
    );
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["runAsUser"], 0);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    if rendered {
        assert_eq!(sc["capabilities"]["add"], json!(CAPABILITIES));
    }
    // No ports anywhere: with hostNetwork they would be hostPorts and block the surge pod.
    let text = serde_json::to_string(ds).unwrap();
    for word in ["\"ports\"", "containerPort", "hostPort"] {
        assert!(!text.contains(word), "the DaemonSet declares {word}");
    }
    // Probes on loopback.
    for (probe, path) in [
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ] {
        let get = &agent[probe]["httpGet"];
        assert_eq!(get["host"], "127.0.0.1", "{probe}");
        assert_eq!(get["path"], path, "{probe}");
    }
    // Mounts and their propagation.
    let bpffs = mount(agent, "bpffs");
    assert_eq!(bpffs["mountPath"], "/sys/fs/bpf");
    assert_eq!(bpffs["mountPropagation"], "HostToContainer");
    assert_eq!(mount(agent, "cgroup")["mountPath"], "/run/sinew/cgroupv2");
    assert_eq!(mount(agent, "cgroup")["readOnly"], true);
    let proc = mount(agent, "host-proc");
    assert_eq!(proc["mountPath"], "/host/proc");
    assert_eq!(proc["readOnly"], true);
    assert_eq!(mount(agent, "ca")["readOnly"], true);
    assert_eq!(mount(agent, "config")["readOnly"], true);
    assert_eq!(mount(agent, "state")["mountPath"], "/var/lib/sinew");
    assert_eq!(
        volume(pod, "bpffs")["hostPath"],
        json!({"path": "/sys/fs/bpf", "type": "DirectoryOrCreate"})
    );
    assert_eq!(volume(pod, "host-proc")["hostPath"]["path"], "/proc");
    assert_eq!(
        volume(pod, "state")["hostPath"]["type"],
        "DirectoryOrCreate"
    );
    assert!(volume(pod, "ca")["secret"].is_object());
    if rendered {
        assert_eq!(volume(pod, "cgroup")["hostPath"]["path"], "/sys/fs/cgroup");
        assert_eq!(pod["priorityClassName"], "system-node-critical");
        assert_eq!(pod["tolerations"], json!([{"operator": "Exists"}]));
        assert_eq!(pod["nodeSelector"], json!({"kubernetes.io/os": "linux"}));
        assert_eq!(pod["terminationGracePeriodSeconds"], 30);
    }
    // The only privileged container: the init container that mounts bpffs with Bidirectional propagation.
    let inits = pod["initContainers"].as_array().unwrap();
    assert_eq!(inits.len(), 1);
    let init = &inits[0];
    assert_eq!(
        init["command"],
        json!(["mesh-agent", "mount-bpffs", "--bpffs-root", "/sys/fs/bpf"])
    );
    assert_eq!(init["securityContext"]["privileged"], true);
    assert_eq!(mount(init, "bpffs")["mountPropagation"], "Bidirectional");
    assert_eq!(init["volumeMounts"].as_array().unwrap().len(), 1);
    // The agent's flags come from the downward API.
    assert_eq!(agent["command"], json!(["mesh-agent"]));
    assert_eq!(
        agent["args"],
        json!([
            "run",
            "--config=/etc/sinew/config/config.yaml",
            "--node=$(NODE_NAME)",
            "--lease-namespace=$(POD_NAMESPACE)",
            "--lease-holder=$(POD_NAME)"
        ])
    );
    let env: BTreeMap<&str, &str> = agent["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap(),
                e["valueFrom"]["fieldRef"]["fieldPath"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        env,
        BTreeMap::from([
            ("NODE_NAME", "spec.nodeName"),
            ("POD_NAME", "metadata.name"),
            ("POD_NAMESPACE", "metadata.namespace"),
        ])
    );
    assert_eq!(mount(agent, "config")["mountPath"], "/etc/sinew/config");
}

/// The paths in the agent's config are where the DaemonSet mounts the node's directories.
fn check_config_matches_mounts(docs: &[Value], config_yaml: &str) {
    let config = yaml_to_json(config_yaml).unwrap();
    let pod = &find(docs, "DaemonSet")["spec"]["template"]["spec"];
    let agent = &pod["containers"][0];
    assert_eq!(config["cgroup-root"], mount(agent, "cgroup")["mountPath"]);
    assert_eq!(config["proc-root"], mount(agent, "host-proc")["mountPath"]);
    assert_eq!(config["ca-dir"], mount(agent, "ca")["mountPath"]);
    assert_eq!(config["state-dir"], mount(agent, "state")["mountPath"]);
    let bpffs_root = config["bpffs-root"].as_str().unwrap();
    let bpffs_mount = mount(agent, "bpffs")["mountPath"].as_str().unwrap();
    assert!(
        bpffs_root.starts_with(&format!("{bpffs_mount}/")),
        "{bpffs_root}"
    );
    assert!(
        config["admin-addr"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );
}

#[test]
fn daemonset_has_the_security_settings() {
    let docs = stripped_docs("daemonset.yaml");
    check_daemonset(&docs, false);
    // The capabilities are exactly values.yaml's list, which is exactly what the agent needs.
    let v = values();
    assert_eq!(v["agent"]["capabilities"], json!(CAPABILITIES));
    let ds = template("daemonset.yaml");
    let add = ds
        .lines()
        .skip_while(|l| l.trim() != "add:")
        .nth(1)
        .expect("a line after add:");
    assert_eq!(
        add.trim(),
        "{{- toYaml .Values.agent.capabilities | nindent 16 }}"
    );
    // Only the init container is privileged.
    assert_eq!(ds.matches("privileged: true").count(), 1);
    let init_end = ds.find("      containers:").unwrap();
    assert!(ds[..init_end].contains("privileged: true"));
    // The grace period is checked against the drain timeout before anything renders.
    assert!(ds.starts_with("{{- include \"sinew.validate\" . }}"));
    let helpers = template("_helpers.tpl");
    assert!(helpers.contains("must be longer than config.proxy.drainTimeout"));
    // A config change rolls the DaemonSet.
    assert!(ds.contains(
        "checksum/config: {{ include (print $.Template.BasePath \"/configmap.yaml\") . | sha256sum }}"
    ));
    // The config's paths are the mount paths.
    let block = config_block(&template("configmap.yaml")).unwrap();
    let config = render_simple(&block, &v, "sinew-system").unwrap();
    check_config_matches_mounts(&docs, &config);
}

/// `(apiGroup, resource, verb)` of every rule, with the resourceNames of each.
fn rule_set(role: &Value) -> BTreeSet<(String, String, String, Vec<String>)> {
    let mut out = BTreeSet::new();
    for rule in role["rules"].as_array().unwrap() {
        let names: Vec<String> = rule["resourceNames"]
            .as_array()
            .map(|a| a.iter().map(|n| n.as_str().unwrap().to_string()).collect())
            .unwrap_or_default();
        for g in rule["apiGroups"].as_array().unwrap() {
            for r in rule["resources"].as_array().unwrap() {
                for v in rule["verbs"].as_array().unwrap() {
                    out.insert((
                        g.as_str().unwrap().into(),
                        r.as_str().unwrap().into(),
                        v.as_str().unwrap().into(),
                        names.clone(),
                    ));
                }
            }
        }
    }
    out
}

fn check_rbac(cluster_role: &Value, role: &Value, lease_name: &str) {
    let mut want = BTreeSet::new();
    for (g, r) in [
        ("", "services"),
        ("", "pods"),
        ("", "namespaces"),
        ("discovery.k8s.io", "endpointslices"),
        ("security.sinew.dev", "authorizationpolicies"),
        ("security.sinew.dev", "peerauthentications"),
    ] {
        for v in ["get", "list", "watch"] {
            want.insert((g.into(), r.into(), v.into(), vec![]));
        }
    }
    for v in ["patch", "update"] {
        want.insert((
            "security.sinew.dev".into(),
            "authorizationpolicies/status".into(),
            v.into(),
            vec![],
        ));
    }
    assert_eq!(rule_set(cluster_role), want, "ClusterRole rules");
    let lease = |v: &str, names: Vec<String>| {
        (
            "coordination.k8s.io".to_string(),
            "leases".to_string(),
            v.to_string(),
            names,
        )
    };
    assert_eq!(
        rule_set(role),
        BTreeSet::from([
            lease("get", vec![lease_name.into()]),
            lease("update", vec![lease_name.into()]),
            lease("create", vec![]),
        ]),
        "Role rules"
    );
}

#[test]
fn rbac_grants_only_what_the_agent_needs() {
    let cr = stripped_docs("clusterrole.yaml");
    let role = stripped_docs("role.yaml");
    check_rbac(find(&cr, "ClusterRole"), find(&role, "Role"), "TEMPLATE");
    for (docs, kind) in [(&cr, "ClusterRoleBinding"), (&role, "RoleBinding")] {
        let b = find(docs, kind);
        assert_eq!(b["subjects"][0]["kind"], "ServiceAccount");
        assert_eq!(b["roleRef"]["kind"], kind.trim_end_matches("Binding"));
    }
    // The names the ServiceAccount and the proxy identity use are one value.
    let cm = template("configmap.yaml");
    assert!(cm.contains("proxy-service-account: {{ .Values.serviceAccount.name | quote }}"));
    assert_eq!(values()["serviceAccount"]["name"], "sinew-agent");
}

#[test]
fn chart_metadata_and_ca_secret() {
    let c = yaml_to_json(&read_chart_file("Chart.yaml").unwrap()).unwrap();
    assert_eq!(c["apiVersion"], "v2");
    assert_eq!(c["name"], "sinew");
    assert_eq!(c["version"], "0.1.0");
    assert_eq!(c["appVersion"], "0.1.0");
    assert_eq!(c["kubeVersion"], ">=1.27.0-0");
    let helpers = template("_helpers.tpl");
    for label in [
        "app.kubernetes.io/name:",
        "app.kubernetes.io/instance:",
        "app.kubernetes.io/version:",
        "app.kubernetes.io/managed-by:",
        "helm.sh/chart:",
    ] {
        assert!(helpers.contains(label), "labels lack {label}");
    }
    assert!(helpers.contains("default .Chart.AppVersion .Values.image.tag"));
    // The CA: an existing Secret, or one generated once, kept across upgrades and after uninstall.
    let secret = template("secret-ca.yaml");
    assert!(secret.starts_with("{{- /*"));
    for want in [
        "{{- if not .Values.ca.existingSecret }}",
        "lookup \"v1\" \"Secret\" .Release.Namespace $name",
        "genCAWithKey",
        "genPrivateKey \"ed25519\"",
        "helm.sh/resource-policy: keep",
        "ca.crt: {{ $crt }}",
        "ca.key: {{ $key }}",
    ] {
        assert!(secret.contains(want), "secret-ca.yaml lacks {want}");
    }
    // Helm's plain genCA writes an RSA PKCS#1 key, which the agent cannot load.
    for a in chart::actions(&secret).unwrap() {
        assert!(
            a.comment || !a.body.split_whitespace().any(|w| w == "genCA"),
            "line {}: genCA",
            a.line
        );
    }
}

/// A CA exactly as the chart generates it: Helm 4.1.4's `genCAWithKey "Sinew mesh CA cluster.local" 3650
/// (genPrivateKey "ed25519")`, taken from `helm template` output. Test material only.
const HELM_CA_CRT: &str = "-----BEGIN CERTIFICATE-----
MIIBbDCCAR6gAwIBAgIRALwEEWsIp2YWxspxW2/v6WEwBQYDK2VwMCYxJDAiBgNV
BAMTG1NpbmV3IG1lc2ggQ0EgY2x1c3Rlci5sb2NhbDAeFw0yNjExMjYxMzM0MTZa
Fw0zNjExMjMxMzM0MTZaMCYxJDAiBgNVBAMTG1NpbmV3IG1lc2ggQ0EgY2x1c3Rl
ci5sb2NhbDAqMAUGAytlcAMhAE9zFAWfyWUfxvBwILzWcsznATkRBYxCoBCPFlFG
u2vTo2EwXzAOBgNVHQ8BAf8EBAMCAqQwHQYDVR0lBBYwFAYIKwYBBQUHAwEGCCsG
AQUFBwMCMA8GA1UdEwEB/wQFMAMBAf8wHQYDVR0OBBYEFItNtgY5UDHF9NVaWLCX
pxdjRLAuMAUGAytlcANBAKovb0KxsjN2LWjPgFfBde+rTLImaGshFEghcAg6ac+h
nfYbEtJgpRkP4Ts7k60XtPbHt76Abeh3JqKHjZATbwU=
-----END CERTIFICATE-----
";
const HELM_CA_KEY: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIOzCOSVuvJzPO4k4Aff26R7OXjc9X95gQ5C7svf2JdD5
-----END PRIVATE KEY-----
";

/// Loads `ca.crt`/`ca.key` with the agent's CA loader, issues two SVIDs and runs an mTLS handshake between them
/// with the agent's own TLS configs.
fn assert_ca_works_in_the_agent(crt: &str, key: &str, tag: &str) {
    use mesh_agent::identity::{ca::Ca, spiffe::SpiffeId, verify};
    let dir = std::env::temp_dir().join(format!("sinew-chart-ca-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("ca.crt"), crt).unwrap();
    std::fs::write(dir.join("ca.key"), key).unwrap();
    let ca = Ca::load(&dir, "cluster.local");
    std::fs::remove_dir_all(&dir).ok();
    let ca = ca.unwrap_or_else(|e| panic!("the agent does not load the chart's CA: {e}"));
    let server_svid = ca.issue("sinew-system", "sinew-agent").unwrap();
    let client_svid = ca.issue("shop", "api").unwrap();
    let server = verify::server_config(&server_svid, &ca).unwrap();
    let expected =
        SpiffeId::parse("spiffe://cluster.local/ns/sinew-system/sa/sinew-agent").unwrap();
    let client = verify::client_config(&client_svid, &ca, Some(expected)).unwrap();

    let mut c = rustls::ClientConnection::new(
        Arc::new(client),
        rustls::pki_types::ServerName::try_from("sinew.test").unwrap(),
    )
    .unwrap();
    let mut s = rustls::ServerConnection::new(Arc::new(server)).unwrap();
    for _ in 0..16 {
        let mut buf = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut buf).unwrap();
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            s.read_tls(&mut rd).unwrap();
            s.process_new_packets()
                .expect("the server accepts the client SVID");
        }
        let mut buf = Vec::new();
        while s.wants_write() {
            s.write_tls(&mut buf).unwrap();
        }
        let mut rd = &buf[..];
        while !rd.is_empty() {
            c.read_tls(&mut rd).unwrap();
            c.process_new_packets()
                .expect("the client accepts the server SVID");
        }
        if !c.is_handshaking() && !s.is_handshaking() {
            break;
        }
    }
    assert!(
        !c.is_handshaking() && !s.is_handshaking(),
        "the handshake did not finish"
    );
    assert_eq!(
        verify::peer_spiffe_id(&s).unwrap().to_string(),
        "spiffe://cluster.local/ns/shop/sa/api"
    );
}

#[test]
fn a_ca_generated_by_helm_loads_and_signs_in_the_agent() {
    assert_ca_works_in_the_agent(HELM_CA_CRT, HELM_CA_KEY, "fixture");
}

/// Renders the chart with a real helm, when there is one. Without one it says so and checks nothing: the static
/// tests above cover the chart's files.
#[test]
fn the_chart_renders_with_helm_when_available() {
    let Some(bin) = chart::helm_bin() else {
        eprintln!(
            "SKIPPED the_chart_renders_with_helm_when_available: no helm (set HELM=/path/to/helm or put helm on \
             PATH); the static chart tests still ran"
        );
        return;
    };
    let helm = |args: &[&str]| chart::helm(&bin, args);
    let template = |extra: &[&str]| -> Result<String, String> {
        let mut args = vec![
            "template",
            "sinew",
            "sinew",
            "-n",
            "sinew-system",
            "--kube-version",
            "1.31.0",
        ];
        args.extend_from_slice(extra);
        helm(&args)
    };
    helm(&["lint", "sinew", "--kube-version", "1.31.0"])
        .unwrap_or_else(|e| panic!("helm lint: {e}"));

    // The defaults.
    let out = template(&[]).unwrap_or_else(|e| panic!("helm template: {e}"));
    let docs = yaml_docs(&out).unwrap();
    let kinds: BTreeSet<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    for k in [
        "ServiceAccount",
        "Secret",
        "ConfigMap",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "DaemonSet",
    ] {
        assert!(kinds.contains(k), "no {k} in {kinds:?}");
    }
    if chart::chart_dir().join("files/crds.yaml").exists() {
        let crds = docs
            .iter()
            .filter(|d| d["kind"] == "CustomResourceDefinition")
            .count();
        assert_eq!(crds, 2);
    }
    check_daemonset(&docs, true);
    check_rbac(
        find(&docs, "ClusterRole"),
        find(&docs, "Role"),
        "sinew-policy-status",
    );
    let config = find(&docs, "ConfigMap")["data"]["config.yaml"]
        .as_str()
        .unwrap()
        .to_string();
    check_config_matches_mounts(&docs, &config);
    // The static renderer and helm agree on the config file.
    let block = config_block(&template_text("configmap.yaml")).unwrap();
    let simple = render_simple(&block, &values(), "sinew-system").unwrap();
    assert_eq!(
        yaml_to_json(&simple).unwrap(),
        yaml_to_json(&config).unwrap()
    );
    // The generated CA loads in the agent.
    let secret = find(&docs, "Secret");
    let decode = |k: &str| -> String {
        let b64 = secret["data"][k].as_str().unwrap();
        String::from_utf8(base64_decode(b64)).unwrap()
    };
    assert_ca_works_in_the_agent(&decode("ca.crt"), &decode("ca.key"), "helm");
    let pod = &find(&docs, "DaemonSet")["spec"]["template"]["spec"];
    assert_eq!(
        pod["containers"][0]["securityContext"]["appArmorProfile"]["type"],
        "Unconfined"
    );

    // Before 1.30, AppArmor is an annotation.
    let old = template(&["--kube-version", "1.29.0"]).unwrap();
    let old = yaml_docs(&old).unwrap();
    let ds = find(&old, "DaemonSet");
    assert_eq!(
        ds["spec"]["template"]["metadata"]["annotations"]["container.apparmor.security.beta.kubernetes.io/agent"],
        "unconfined"
    );
    assert!(
        ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["appArmorProfile"]
            .is_null()
    );

    // Options.
    let out = template(&[
        "--set",
        "ca.existingSecret=my-ca",
        "--set",
        "crds.install=false",
        "--set",
        "config.policyStatus=false",
        "--set",
        "serviceAccount.create=false",
    ])
    .unwrap();
    let docs = yaml_docs(&out).unwrap();
    for gone in [
        "Secret",
        "CustomResourceDefinition",
        "Role",
        "RoleBinding",
        "ServiceAccount",
    ] {
        assert!(!docs.iter().any(|d| d["kind"] == gone), "{gone} rendered");
    }
    let pod = &find(&docs, "DaemonSet")["spec"]["template"]["spec"];
    assert_eq!(volume(pod, "ca")["secret"]["secretName"], "my-ca");
    assert!(
        !serde_json::to_string(find(&docs, "ClusterRole"))
            .unwrap()
            .contains("status"),
        "no status write without policyStatus"
    );

    // The grace period must cover the drain.
    let e = template(&["--set", "terminationGracePeriodSeconds=10"]).unwrap_err();
    assert!(
        e.contains("must be longer than config.proxy.drainTimeout"),
        "{e}"
    );
    let e = template(&[
        "--set",
        "config.proxy.drainTimeout=1m",
        "--set",
        "terminationGracePeriodSeconds=45",
    ])
    .unwrap_err();
    assert!(e.contains("1m = 60 s"), "{e}");
    template(&[
        "--set",
        "config.proxy.drainTimeout=1m",
        "--set",
        "terminationGracePeriodSeconds=90",
    ])
    .unwrap();

    // helm's own schema validation refuses what this validator refuses.
    for (set, field) in [
        ("config.proxy.inboundPort=70000", "inboundPort"),
        ("config.logFormat=yaml", "logFormat"),
        ("config.proxy.drainTimeout=10 seconds", "drainTimeout"),
        ("tolerations_=x", "tolerations_"),
    ] {
        let e = template(&["--set", set]).expect_err(set);
        assert!(e.contains(field), "{set}: {e}");
    }
}

fn template_text(name: &str) -> String {
    template(name)
}

fn base64_decode(s: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().filter(|c| *c != b'=' && !c.is_ascii_whitespace()) {
        let v = ALPHABET.iter().position(|&a| a == c).expect("base64") as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

#[test]
fn notes_and_docs_name_real_maps_and_commands() {
    // Every pinned map the docs tell operators to dump exists in docs/architecture.md's map table.
    let arch = std::fs::read_to_string(workspace_root().join("docs/architecture.md")).unwrap();
    let install = std::fs::read_to_string(workspace_root().join("docs/install.md")).unwrap();
    let notes = template("NOTES.txt");
    let readme = read_chart_file("README.md").unwrap();
    for (name, text) in [
        ("docs/install.md", &install),
        ("NOTES.txt", &notes),
        ("README.md", &readme),
    ] {
        for m in text.split("/sys/fs/bpf/sinew/maps/").skip(1) {
            let map: String = m
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if map.is_empty() {
                continue;
            }
            assert!(
                arch.contains(&format!("| `{map}` |")),
                "{name} names the map {map}, which docs/architecture.md does not list"
            );
        }
    }
    assert!(Path::new(&workspace_root().join("docs/install.md")).exists());
}
