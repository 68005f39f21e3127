//! `cargo xtask`: orchestration that is never on the plain `cargo build` path.
//!
//! - `setup`: installs every prerequisite, idempotently, saying what it does.
//! - `test`: setup, build, then every test (unit and privileged netns end-to-end).
//! - `demo`: setup, build, and a live demo in network namespaces: load balancing over 3 backends, a policy, and mTLS
//!   between two nodes.
//! - `bench`: setup, build, and side-by-side benchmarks in network namespaces (groups: single-node, mesh across
//!   two nodes, same-node socket acceleration).

mod bench;
mod demo;
mod os;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the nightly's rust-src, bpf-linker (against the nightly's LLVM), bpftool and iproute2.
    Setup,
    /// Setup, build, and run all tests (the privileged end-to-end tests need root; under CI=true they never skip).
    Test {
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Setup, build, and run the demo in network namespaces (root): load balancing, policy, mTLS between nodes.
    Demo {
        /// Keep the demo topology up until Ctrl-C, to poke at it with bpftool and curl.
        #[arg(long)]
        hold: bool,
    },
    /// Setup, build (release), and benchmark: no mesh vs Sinew, side by side (root); groups single-node, mesh and
    /// same-node (`--only`).
    Bench(bench::BenchArgs),
}

/// The workspace root (xtask lives one level below it).
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent directory")
        .to_path_buf()
}

/// Runs a command, echoing it, and fails with its status.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("+ {cmd:?}");
    let status = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(workspace());
    c
}

/// Builds the agent and the test pod helper; returns the agent binary's path.
pub fn build(release: bool) -> anyhow::Result<PathBuf> {
    let mut c = cargo();
    c.args(["build", "-p", "mesh-agent", "-p", "sinew-tests", "--bins"]);
    if release {
        c.arg("--release");
    }
    run(&mut c)?;
    let dir = workspace()
        .join("target")
        .join(if release { "release" } else { "debug" });
    Ok(dir.join("mesh-agent"))
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Setup => setup::setup(),
        Cmd::Test { args } => {
            setup::setup()?;
            let agent = build(false)?;
            // Unit tests everywhere, then the netns end-to-end tests; the e2e harness finds the agent through
            // SINEW_AGENT_BIN.
            let mut c = cargo();
            // mesh-ebpf only builds for the bpf target (build.rs of mesh-agent does that).
            c.args(["test", "--workspace", "--exclude", "mesh-ebpf"])
                .env("SINEW_AGENT_BIN", &agent);
            if !args.is_empty() {
                c.arg("--").args(&args);
            }
            run(&mut c)
        }
        Cmd::Demo { hold } => {
            setup::setup()?;
            let agent = build(false)?;
            demo::demo(&agent, hold)
        }
        Cmd::Bench(args) => {
            setup::setup()?;
            let agent = build(true)?;
            bench::bench(&agent, &args)
        }
    }
}
