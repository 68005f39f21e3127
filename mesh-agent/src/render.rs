//! Text rendering of the admin endpoints' JSON for the CLI (`-o json` prints the JSON itself).

use std::fmt::Write as _;

use serde_json::Value;

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("-")
}

/// `mesh-agent policy status`.
pub fn policy_status(v: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "policy revision {} (epoch {}, generation {}), kernel enforcing: {}; root namespace {}, trust domain {}",
        v["revision"],
        v["epoch"],
        v["generation"],
        v["enforcing"],
        s(&v["root_namespace"]),
        s(&v["trust_domain"])
    );
    let empty = Vec::new();
    for p in v["policies"].as_array().unwrap_or(&empty) {
        let selects = p["selects"].as_array().unwrap_or(&empty);
        let _ = writeln!(
            out,
            "\n{}/{}  {}  selects {} pod(s){}",
            s(&p["namespace"]),
            s(&p["name"]),
            s(&p["action"]),
            selects.len(),
            if selects.is_empty() {
                String::new()
            } else {
                format!(": {}", selects.iter().map(s).collect::<Vec<_>>().join(", "))
            }
        );
        let rules = p["rules"].as_array().unwrap_or(&empty);
        if rules.is_empty() {
            let _ = writeln!(out, "  (no rules: matches nothing)");
        }
        for r in rules {
            let _ = write!(out, "  rule {}: {}", r["index"], s(&r["status"]));
            if let Some(reason) = r["reason"].as_str() {
                let _ = write!(out, " ({reason})");
            }
            out.push('\n');
        }
    }
    let rejected = v["rejected"].as_array().unwrap_or(&empty);
    if !rejected.is_empty() {
        let _ = writeln!(
            out,
            "\nrejected (not in force; a previous version, if any, is):"
        );
        for r in rejected {
            let _ = writeln!(
                out,
                "  {}: {}: {}",
                s(&r["file"]),
                s(&r["object"]),
                s(&r["reason"])
            );
        }
    }
    let c = &v["counters"];
    let _ = writeln!(
        out,
        "\nkernel: {} verdict entries, {} addresses, {} local endpoints; denied {} at connect, {} at ingress; {} events dropped",
        v["kernel"]["verdict_entries"],
        v["kernel"]["ipcache_entries"],
        v["kernel"]["local_endpoints"],
        c["denied_egress"],
        c["denied_ingress"],
        c["events_dropped"]
    );
    if let Some(mesh) = v["mesh"].as_object().filter(|m| !m.is_empty()) {
        let _ = writeln!(
            out,
            "\nmesh: {} enrolled pod(s); {} redirected to the node proxy, {} from it, {} plaintext refused by STRICT",
            mesh.len(),
            c["proxy_redirected"],
            c["proxy_ingress"],
            c["strict_denied"]
        );
        for (pod, e) in mesh {
            let ports = e["ports"].as_object().map_or(String::new(), |p| {
                p.iter()
                    .map(|(port, m)| format!(", port {port} {}", s(m)))
                    .collect()
            });
            let _ = writeln!(out, "  {pod}: {}{ports}", s(&e["mode"]));
        }
    }
    out
}

/// `mesh-agent policy check`.
pub fn check(v: &Value) -> String {
    let mut out = String::new();
    let verdict = s(&v["verdict"]).to_uppercase();
    let _ = writeln!(
        out,
        "{verdict}  {} -> {} port {}/{}",
        s(&v["source"]),
        s(&v["destination"]),
        v["port"],
        s(&v["proto"])
    );
    match v["policy"].as_str() {
        Some(p) => {
            let _ = writeln!(
                out,
                "  decided by {p} rule {} ({})",
                v["rule"],
                s(&v["action"])
            );
        }
        None => {
            let _ = writeln!(out, "  decided by the default");
        }
    }
    let _ = writeln!(out, "  reason: {}", s(&v["reason"]));
    if let Some(e) = v["enforcement"].as_str() {
        let _ = writeln!(out, "  enforcement: {e}");
    }
    if let Some(a) = v["audit"].as_array().filter(|a| !a.is_empty()) {
        let names: Vec<&str> = a.iter().map(s).collect();
        let _ = writeln!(out, "  audited by: {}", names.join(", "));
    }
    let _ = writeln!(
        out,
        "  kernel tables in force say: {}",
        s(&v["kernel_verdict"])
    );
    if let Some(m) = v["mtls"].as_str() {
        let _ = writeln!(out, "  mesh: {m}");
    }
    out
}

/// One line of `mesh-agent flows`.
pub fn flow(f: &Value) -> String {
    let decided = match f["policy"].as_str() {
        Some(p) => format!("{p} rule {}", f["rule"]),
        None => "default".to_string(),
    };
    format!(
        "#{} {} {}{} {} {} ({}) -> {} ({}{}) by {} [{} side]: {}",
        f["seq"],
        s(&f["verdict"]).to_uppercase(),
        s(&f["direction"]),
        if f["audit"].as_bool() == Some(true) {
            " AUDIT"
        } else {
            ""
        },
        s(&f["proto"]),
        s(&f["src"]),
        s(&f["src_identity"]),
        s(&f["dst"]),
        s(&f["dst_identity"]),
        f["dst_workload"]
            .as_str()
            .map(|w| format!(", pod {w}"))
            .unwrap_or_default(),
        decided,
        s(&f["side"]),
        s(&f["reason"])
    )
}
