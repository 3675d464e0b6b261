//! `netwarden-e2e`: runs `netwarden-scenario/v1` files against the real agent on a simulated
//! node made of network namespaces.

mod agent;
mod cleanup;
mod cli;
mod crafted;
mod dns;
mod driver;
mod explain;
mod kind;
mod kube_proxy;
mod manifests;
mod mtls;
mod netns;
mod node;
mod observe;
mod pins;
mod placeholder;
mod probe;
mod report;
mod runner;
mod scenario;
mod sctp;
mod servers;
mod services;
mod soak;

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Debug, Parser)]
#[command(
    name = "netwarden-e2e",
    version,
    about = "End-to-end tests of the netwarden agent on a simulated node"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run scenario files, or every scenario found in directories (recursively `*.yaml`).
    Run(RunArgs),
    /// Run scenario files on a kind cluster with the agent's image (`cargo xtask e2e-kind`).
    Kind(kind::KindArgs),
    /// Churn pods, labels and policies and restart the agent for a while, checking probes
    /// against the reference evaluator and the agent for leaks (`cargo xtask soak`).
    Soak(soak::SoakArgs),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// The agent binary [default: `netwarden` beside this executable].
    #[arg(long, value_name = "PATH")]
    agent: Option<PathBuf>,
    /// How many scenarios run at once.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..))]
    jobs: u16,
    /// Print every step and every probe's connectivity matrix.
    #[arg(long)]
    verbose: bool,
    /// Run every scenario through Services as upstream's suite runs on a real cluster: a
    /// per-pod Service for every pod, kube-proxy in the given mode, every probe dialling the
    /// server's Service. Reported with the variant in the scenario's name.
    #[arg(long, value_name = "VARIANT")]
    variant: Option<Variant>,
    /// Run without an agent, to test the harness itself: everything is then open.
    #[arg(long, conflicts_with = "agent")]
    no_agent: bool,
    /// Wire pods the way this CNI does, whatever each scenario's `model.cni` says.
    #[arg(long, value_enum)]
    cni: Option<scenario::Cni>,
    /// Scenario files or directories.
    #[arg(required = true, value_name = "PATH")]
    paths: Vec<PathBuf>,
}

/// A way of running every scenario besides the one it describes.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Variant {
    /// Through per-pod Services, kube-proxy in iptables mode.
    ServiceIptables,
    /// Through per-pod Services, kube-proxy in nftables mode.
    ServiceNftables,
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("netwarden-e2e: {error:#}");
            ExitCode::from(2)
        }
    }
}

async fn run() -> anyhow::Result<ExitCode> {
    let args = match Cli::parse().command {
        Command::Run(args) => args,
        Command::Soak(args) => {
            require_root()?;
            let agent = agent_binary(args.agent.clone())?;
            for removed in cleanup::remove_stale() {
                eprintln!("removed leftover {removed} of an earlier run");
            }
            spawn_signal_handler()?;
            let passed = soak::run(&args, agent).await?;
            return Ok(if passed {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        // Sequential commands only: no runtime needed, and none of the netns machinery.
        Command::Kind(args) => {
            let passed = tokio::task::spawn_blocking(move || kind::run(&args)).await??;
            return Ok(if passed {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
    };
    require_root()?;
    let agent = if args.no_agent {
        None
    } else {
        Some(agent_binary(args.agent)?)
    };
    for removed in cleanup::remove_stale() {
        eprintln!("removed leftover {removed} of an earlier run");
    }
    let files = runner::discover(&args.paths)?;
    if files.is_empty() {
        bail!(
            "no scenario files found in {}",
            args.paths
                .iter()
                .map(|path| path.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    spawn_signal_handler()?;
    let options = runner::Options {
        agent,
        jobs: usize::from(args.jobs),
        verbose: args.verbose,
        through_services: args.variant.map(|variant| match variant {
            Variant::ServiceIptables => kube_proxy::KubeProxyMode::Iptables,
            Variant::ServiceNftables => kube_proxy::KubeProxyMode::Nftables,
        }),
        cni: args.cni,
    };
    let all_passed = runner::run(options, files).await;
    Ok(if all_passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn require_root() -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("netwarden-e2e creates network namespaces and mounts bpffs: run it as root");
    }
    Ok(())
}

/// The agent binary: `given`, or `netwarden` beside this executable.
fn agent_binary(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let agent = match given {
        Some(agent) => agent,
        None => std::env::current_exe()
            .context("cannot find this executable")?
            .with_file_name("netwarden"),
    };
    if !agent.is_file() {
        bail!(
            "agent binary {} not found: build it, pass --agent PATH, or test the harness alone with --no-agent",
            agent.display()
        );
    }
    Ok(agent)
}

/// On SIGINT or SIGTERM: stop the agents and remove every namespace, mount and directory of
/// this run, then exit with the conventional status.
fn spawn_signal_handler() -> anyhow::Result<()> {
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    tokio::spawn(async move {
        let code = tokio::select! {
            _ = interrupt.recv() => 130,
            _ = terminate.recv() => 143,
        };
        eprintln!("interrupted: stopping agents and removing namespaces");
        // Blocking is fine here: the run is over.
        cleanup::cleanup_all();
        std::process::exit(code);
    });
    Ok(())
}
