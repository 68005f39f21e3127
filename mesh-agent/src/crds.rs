//! `mesh-agent crds`: the CRD YAML of the mesh resources, generated from the Rust types.

/// Every CRD Sinew defines, as one multi-document YAML stream.
pub fn render() -> String {
    String::new()
}
