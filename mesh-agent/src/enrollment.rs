//! Mesh enrollment (issue 4): which workloads have their traffic carried through the node proxies.
//!
//! The label `sinew.dev/mesh` on a pod or on its namespace says it. The pod's label wins over its namespace's:
//! `enabled` on the pod enrolls it whatever the namespace says, `disabled` opts it out of an enrolled namespace.
//! Without a pod label, the namespace's decides. Any other value (`true`, `Enabled`, an empty string) enrolls
//! nothing: the workload is treated as not enrolled, and [`validate_label`] reports the value so that the mistake
//! is seen. A pod label with such a value still wins over the namespace's (it is the pod's explicit say, just
//! misspelled), so a typo never enrolls a workload its owner meant to take out.
//!
//! The policy compiler marks enrolled workloads in the kernel tables (their connections to each other are redirected
//! to the node proxy), and the proxy's view uses it to know which destinations it may carry. See `docs/mesh.md`.

use std::collections::BTreeMap;

/// The enrollment label, on a pod or a namespace.
pub const MESH_LABEL: &str = "sinew.dev/mesh";
/// The value that enrolls.
pub const ENABLED: &str = "enabled";
/// The value that opts a pod out of an enrolled namespace (on a namespace: the same as no label).
pub const DISABLED: &str = "disabled";

/// Whether a pod with `pod_labels`, in a namespace with `namespace_labels`, is enrolled in the mesh.
pub fn enrolled(
    pod_labels: &BTreeMap<String, String>,
    namespace_labels: &BTreeMap<String, String>,
) -> bool {
    match pod_labels.get(MESH_LABEL) {
        Some(value) => value == ENABLED,
        None => namespace_labels
            .get(MESH_LABEL)
            .is_some_and(|v| v == ENABLED),
    }
}

/// Checks the enrollment label of one object's labels: absent, `enabled` or `disabled`. The error names the
/// field, for a warning (the object is not rejected: it is only not enrolled).
pub fn validate_label(labels: &BTreeMap<String, String>) -> Result<(), String> {
    match labels.get(MESH_LABEL).map(String::as_str) {
        None | Some(ENABLED | DISABLED) => Ok(()),
        Some(other) => Err(format!(
            "metadata.labels[{MESH_LABEL:?}]: {other:?} is not one of {ENABLED}, {DISABLED} \
             (treated as not enrolled)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(value: Option<&str>) -> BTreeMap<String, String> {
        let mut l = BTreeMap::from([("app".to_owned(), "web".to_owned())]);
        if let Some(v) = value {
            l.insert(MESH_LABEL.to_owned(), v.to_owned());
        }
        l
    }

    #[test]
    fn truth_table() {
        // (pod label, namespace label, enrolled)
        let cases = [
            (None, None, false),
            (None, Some("enabled"), true),
            (None, Some("disabled"), false),
            (None, Some("true"), false),
            (Some("enabled"), None, true),
            (Some("enabled"), Some("enabled"), true),
            (Some("enabled"), Some("disabled"), true),
            (Some("enabled"), Some("bogus"), true),
            (Some("disabled"), None, false),
            (Some("disabled"), Some("enabled"), false),
            (Some("disabled"), Some("disabled"), false),
            // A pod label with another value is the pod's say, misspelled: not enrolled, and it still wins.
            (Some("true"), Some("enabled"), false),
            (Some("Enabled"), Some("enabled"), false),
            (Some(""), Some("enabled"), false),
            (Some("true"), None, false),
            (None, Some("Enabled"), false),
            (None, Some(""), false),
        ];
        for (pod, ns, want) in cases {
            assert_eq!(
                enrolled(&labels(pod), &labels(ns)),
                want,
                "pod={pod:?} namespace={ns:?}"
            );
        }
    }

    #[test]
    fn validate_label_reports_other_values() {
        for ok in [None, Some("enabled"), Some("disabled")] {
            assert_eq!(validate_label(&labels(ok)), Ok(()), "{ok:?}");
        }
        assert_eq!(
            validate_label(&labels(Some("true"))).unwrap_err(),
            "metadata.labels[\"sinew.dev/mesh\"]: \"true\" is not one of enabled, disabled (treated as not enrolled)"
        );
        assert!(
            validate_label(&labels(Some("")))
                .unwrap_err()
                .contains("\"\" is not one of")
        );
        assert!(validate_label(&labels(Some("ENABLED"))).is_err());
    }

    #[test]
    fn other_labels_do_not_matter() {
        let pod = BTreeMap::from([("sinew.dev/mesh-x".to_owned(), "enabled".to_owned())]);
        assert!(!enrolled(&pod, &BTreeMap::new()));
        assert_eq!(validate_label(&pod), Ok(()));
    }
}
