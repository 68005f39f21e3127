//! `mesh-agent`: Sinew's per-node agent and its CLI.

use std::{path::PathBuf, process::ExitCode};

use clap::{Args, Parser, Subcommand, ValueEnum};

mod render;

use mesh_agent::{
    client,
    config::{self, DEFAULT_BPFFS_ROOT, DEFAULT_CGROUP_ROOT, LogFormat},
    ebpf::{self, Layout},
    run,
};

#[derive(Parser)]
#[command(
    name = "mesh-agent",
    version,
    about = "Sinew node agent: in-kernel service mesh data plane"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent: attach the programs and keep the maps in sync with the source.
    Run(Box<config::RunArgs>),
    /// Show programs, links and maps (with entry counts) of an install.
    Status {
        #[command(flatten)]
        roots: Roots,
        /// The agent's admin address, asked for readiness.
        #[arg(long, value_name = "ADDR", default_value = config::DEFAULT_ADMIN_ADDR)]
        admin_addr: std::net::SocketAddr,
        #[arg(short, long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Print decoded map contents.
    Dump {
        #[arg(value_enum)]
        what: DumpWhat,
        #[command(flatten)]
        roots: Roots,
        #[arg(short, long, value_enum, default_value = "text")]
        output: Output,
    },
    /// AuthorizationPolicy: how each rule is enforced, and why a connection is allowed or denied.
    Policy {
        #[command(subcommand)]
        cmd: PolicyCmd,
    },
    /// Recent policy verdicts the kernel reported (denials and AUDIT matches), explained.
    Flows {
        /// Keep printing new verdicts as they arrive (until Ctrl-C).
        #[arg(short, long)]
        follow: bool,
        /// The agent's admin address.
        #[arg(long, value_name = "ADDR", default_value = config::DEFAULT_ADMIN_ADDR)]
        admin_addr: std::net::SocketAddr,
        #[arg(short, long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Detach every program and remove every pin.
    Uninstall {
        #[command(flatten)]
        roots: Roots,
    },
    /// Print the CustomResourceDefinitions of the mesh resources (AuthorizationPolicy, PeerAuthentication).
    Crds,
    /// Mount bpffs at PATH unless it already is on bpffs (the Helm chart's privileged init container runs this,
    /// so that the mount propagates to the host and outlives the agent's container).
    MountBpffs {
        #[arg(long, value_name = "PATH", default_value = "/sys/fs/bpf")]
        bpffs_root: PathBuf,
    },
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Every policy in force, the workloads it selects, and each rule's enforcement: kernel-enforced,
    /// proxy-required or rejected, with the reason. Also the rejected policies.
    Status {
        #[arg(long, value_name = "ADDR", default_value = config::DEFAULT_ADMIN_ADDR)]
        admin_addr: std::net::SocketAddr,
        #[arg(short, long, value_enum, default_value = "text")]
        output: Output,
    },
    /// The verdict for one connection, and the policy and rule that decide it, from the agent's live state.
    Check {
        /// The source: `<namespace>/<serviceaccount>` or an IP address.
        #[arg(long)]
        from: String,
        /// The destination pod: `<namespace>/<pod>`.
        #[arg(long)]
        to: String,
        /// The destination (target) port.
        #[arg(long)]
        port: u16,
        #[arg(long, value_enum, default_value = "tcp")]
        proto: Proto,
        #[arg(long, value_name = "ADDR", default_value = config::DEFAULT_ADMIN_ADDR)]
        admin_addr: std::net::SocketAddr,
        #[arg(short, long, value_enum, default_value = "text")]
        output: Output,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Proto {
    Tcp,
    Udp,
}

#[derive(Args, Clone)]
struct Roots {
    /// cgroup v2 directory the programs are attached at.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_CGROUP_ROOT)]
    cgroup_root: PathBuf,
    /// Directory on bpffs with the pins.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_BPFFS_ROOT)]
    bpffs_root: PathBuf,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum DumpWhat {
    /// Services with their slots and backends.
    Services,
    /// Same-node accelerated connections (`--sockmap`), client to server, and which ends are in `sk_conns`.
    Sockmap,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SINEW_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn print<T: serde::Serialize>(output: Output, value: &T, text: impl FnOnce(&T) -> String) {
    match output {
        Output::Text => print!("{}", text(value)),
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(value).expect("plain data serializes")
        ),
    }
}

/// Prints an admin endpoint's JSON as is, or rendered as text.
fn show(
    output: Output,
    body: &str,
    text: impl FnOnce(&serde_json::Value) -> String,
) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", body.trim_end()),
        Output::Text => print!("{}", text(&serde_json::from_str(body)?)),
    }
    Ok(())
}

fn flows(addr: std::net::SocketAddr, follow: bool, output: Output) -> anyhow::Result<()> {
    let mut since = 0u64;
    loop {
        let body = client::get(addr, &format!("/debug/flows?since={since}"))?;
        let v: serde_json::Value = serde_json::from_str(&body)?;
        let empty = Vec::new();
        let flows = v["flows"].as_array().unwrap_or(&empty);
        match (output, follow) {
            (Output::Json, false) => println!("{}", body.trim_end()),
            // Following prints one JSON object per line, so the stream can be piped to jq.
            (Output::Json, true) => {
                for f in flows {
                    println!("{f}");
                }
            }
            (Output::Text, _) => {
                for f in flows {
                    println!("{}", render::flow(f));
                }
            }
        }
        if !follow {
            return Ok(());
        }
        since = v["next"].as_u64().unwrap_or(since);
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Run(args) => match args.resolve() {
            Ok(cfg) => {
                init_logging(cfg.log_format);
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(anyhow::Error::from)
                    .and_then(|rt| rt.block_on(run::run(cfg)))
            }
            Err(e) => Err(anyhow::anyhow!("invalid configuration: {e}")),
        },
        Cmd::Status {
            roots,
            admin_addr,
            output,
        } => ebpf::inspect::status(&Layout::new(&roots.bpffs_root), admin_addr)
            .map(|s| print(output, &s, |s| s.render())),
        Cmd::Dump {
            what: DumpWhat::Services,
            roots,
            output,
        } => ebpf::Maps::open(&Layout::new(&roots.bpffs_root))
            .and_then(ebpf::reconcile::Reconciler::new)
            .map(|r| {
                let dump = ebpf::inspect::dump_services(&r.maps, |id| {
                    let c = r.counters(id);
                    (c.balanced, c.no_backend)
                });
                print(output, &dump, |d| ebpf::inspect::render_services(d));
            }),
        Cmd::Dump {
            what: DumpWhat::Sockmap,
            roots,
            output,
        } => ebpf::accel::AccelMaps::open(&Layout::new(&roots.bpffs_root))
            .and_then(|m| m.connections())
            .map(|(conns, _)| print(output, &conns, |c| ebpf::accel::render_connections(c))),
        Cmd::Policy {
            cmd: PolicyCmd::Status { admin_addr, output },
        } => client::get(admin_addr, "/debug/policies")
            .and_then(|body| show(output, &body, render::policy_status)),
        Cmd::Policy {
            cmd:
                PolicyCmd::Check {
                    from,
                    to,
                    port,
                    proto,
                    admin_addr,
                    output,
                },
        } => {
            let proto = match proto {
                Proto::Tcp => "tcp",
                Proto::Udp => "udp",
            };
            let path = format!(
                "/debug/policy/check?from={}&to={}&port={port}&proto={proto}",
                client::encode(&from),
                client::encode(&to)
            );
            client::get(admin_addr, &path).and_then(|body| show(output, &body, render::check))
        }
        Cmd::Flows {
            follow,
            admin_addr,
            output,
        } => flows(admin_addr, follow, output),
        Cmd::MountBpffs { bpffs_root } => ebpf::ensure_bpffs(&bpffs_root).map(|()| {
            println!("{} is on bpffs", bpffs_root.display());
        }),
        Cmd::Crds => {
            print!("{}", mesh_agent::crds::render());
            Ok(())
        }
        Cmd::Uninstall { roots } => {
            ebpf::uninstall(&Layout::new(&roots.bpffs_root)).map(|removed| {
                for r in &removed {
                    println!("removed {r}");
                }
                // Links detach when their last reference (the pin) goes; check with
                // `bpftool cgroup tree <cgroup-root>`.
                println!(
                    "uninstalled: {} pins removed under {} (programs detached from {})",
                    removed.len(),
                    roots.bpffs_root.display(),
                    roots.cgroup_root.display()
                );
            })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}
