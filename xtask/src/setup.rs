//! `cargo xtask setup`: every prerequisite, idempotently. Each step says what it checks and what it does.
//!
//! - the nightly toolchain's `rust-src` (the eBPF crate builds `core` for the bpf target);
//! - `bpf-linker`, built against the nightly's own libLLVM so the two LLVMs agree (a prefix directory whose
//!   `lib/libLLVM.so` points at the nightly's `libLLVM.so.<ver>-rust-*`);
//! - `bpftool` and `iproute2` (`ip`) from the distribution, for tests, demo and operators.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::run;

const NIGHTLY: &str = "nightly";

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program} >/dev/null 2>&1")])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn step(msg: &str) {
    eprintln!("[setup] {msg}");
}

pub fn setup() -> anyhow::Result<()> {
    rust_src()?;
    bpf_linker()?;
    system_packages()?;
    step("all prerequisites present");
    Ok(())
}

fn rust_src() -> anyhow::Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        NIGHTLY,
    ]))
    .context("the nightly toolchain is needed for the eBPF programs")?;
    if installed.lines().any(|l| l.trim() == "rust-src") {
        step("nightly rust-src: present");
        return Ok(());
    }
    step("nightly rust-src: installing");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))
}

/// The nightly's libLLVM, e.g. `<sysroot>/lib/libLLVM.so.22.1-rust-1.97.0-nightly`, and its major version.
fn nightly_llvm() -> anyhow::Result<(PathBuf, String)> {
    let sysroot =
        output(Command::new("rustc").args([&format!("+{NIGHTLY}"), "--print", "sysroot"]))?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let verbose = output(Command::new("rustc").args([&format!("+{NIGHTLY}"), "-vV"]))?;
    let llvm = verbose
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("rustc +nightly -vV prints no LLVM version")?
        .trim()
        .to_string();
    let major = llvm.split('.').next().unwrap_or_default().to_string();
    let so = std::fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with(&format!("libLLVM.so.{major}")) && n.contains("-rust-")
            })
        })
        .with_context(|| format!("no libLLVM.so.{major}*-rust-* in {}", lib.display()))?;
    Ok((so, major))
}

fn bpf_linker() -> anyhow::Result<()> {
    let (so, major) = nightly_llvm()?;
    // A stamp records which libLLVM the installed linker was built against, so a nightly update rebuilds it.
    let home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into())).join(".cargo")
        });
    let stamp = home.join("bpf-linker.llvm");
    let want = so.display().to_string();
    if have("bpf-linker") && std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == want) {
        step(&format!("bpf-linker: present (built against {want})"));
        return Ok(());
    }
    if have("bpf-linker") && !stamp.exists() {
        // Installed by hand earlier: trust it if it runs; the eBPF build will say so if it does not fit.
        if Command::new("bpf-linker")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            step("bpf-linker: present (no stamp; assuming it was built for this nightly)");
            std::fs::write(&stamp, &want).ok();
            return Ok(());
        }
    }
    let prefix = std::env::temp_dir().join(format!("sinew-llvm-prefix-{major}"));
    let libdir = prefix.join("lib");
    std::fs::create_dir_all(&libdir)?;
    let link = libdir.join("libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&so, &link)
        .with_context(|| format!("linking {} -> {}", link.display(), so.display()))?;
    step(&format!(
        "bpf-linker: building against the nightly's LLVM {major} ({want}); this takes a minute or two"
    ));
    run(Command::new("cargo")
        .args([
            &format!("+{NIGHTLY}"),
            "install",
            "bpf-linker",
            "--locked",
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        .env("LLVM_PREFIX", &prefix))?;
    std::fs::write(&stamp, &want)?;
    Ok(())
}

fn system_packages() -> anyhow::Result<()> {
    let wanted = [("bpftool", "bpftool"), ("ip", "iproute2")];
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(bin, _)| !have(bin))
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        step("bpftool, iproute2: present");
        return Ok(());
    }
    if !have("apt-get") {
        bail!("missing {missing:?} and no apt-get: install them with your package manager");
    }
    step(&format!("installing {missing:?} with apt-get"));
    run(Command::new("apt-get").arg("update").arg("-qq"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}
