//! `netwarden`: the node agent and the operator's tools.
//!
//! The work lives in libraries: `netwarden-model` (cluster snapshot and manifest source),
//! `netwarden-policy` (compiler), `netwarden-datapath` (eBPF maps, attachment, netlink). This
//! binary wires them together and parses the command line.

mod agent;
mod events;
mod explain;
mod health;
mod identity;
mod input;
mod metrics;
#[cfg(test)]
mod mock_api;
mod observe;
mod retry;
mod status;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "netwarden",
    version,
    about = "eBPF Kubernetes NetworkPolicy enforcer"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
#[expect(
    clippy::large_enum_variant,
    reason = "parsed once at startup; the agent's options are its largest"
)]
enum Command {
    /// Enforce NetworkPolicies on this node's pods.
    Agent(agent::AgentOptions),
    /// Explain the verdict on a flow: the rule that allows it, or the policies that isolate it.
    Explain(explain::ExplainOptions),
    /// Print the flows an agent decides: the ones it keeps, then (`--follow`) new ones.
    Observe(observe::cli::ObserveCommand),
    /// Print the state the agent last applied.
    Status {
        /// The agent's status file.
        #[arg(long, default_value = status::DEFAULT_STATUS_FILE)]
        status_file: PathBuf,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Agent(options) => {
            init_logging(options.log_json);
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            runtime.block_on(agent::run(options))
        }
        Command::Explain(options) => explain::run(&options),
        Command::Observe(command) => observe::cli::run(&command),
        Command::Status { status_file, json } => status::print(&status_file, json),
    }
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("NETWARDEN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
