//! Builds the eBPF object (mesh-ebpf, bpf target, nightly + bpf-linker) into OUT_DIR; main embeds it.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    // Read at run time, not with env!(): a build script binary can be reused from another checkout of the same
    // workspace sharing the target directory, and must not point back there.
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let meta = std::path::Path::new(&manifest_dir).join("../mesh-ebpf");
    let root = meta.canonicalize().context("mesh-ebpf directory")?;
    let root = root.to_str().context("mesh-ebpf path is not UTF-8")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "mesh-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
    .context("building the eBPF programs (run `cargo xtask setup` first)")
}
