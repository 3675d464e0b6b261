//! `netwarden`: the node agent and the operator's tools.
//!
//! The work lives in libraries: `netwarden-model` (cluster snapshot and manifest source),
//! `netwarden-policy` (compiler), `netwarden-datapath` (eBPF maps, attachment, netlink). This
//! binary wires them together and parses the command line.

mod agent;
mod diff;
mod events;
mod explain;
mod flows;
mod health;
mod html;
mod identity;
mod input;
mod live;
mod matrix;
mod metrics;
mod retry;
mod snapshot;
mod status;

use std::path::{Path, PathBuf};

use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand};

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
enum Command {
    /// Enforce NetworkPolicies on this node's pods.
    Agent(agent::AgentOptions),
    /// Explain the verdict on a flow: the rule that allows it, or the policies that isolate it.
    Explain(explain::ExplainOptions),
    /// The flows a change of manifests opens and closes; exit code 1 when it closes any.
    Diff(diff::DiffOptions),
    /// Who can reach whom: the connectivity matrix, as text or an HTML page.
    Matrix(matrix::MatrixOptions),
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

/// kubectl runs `kubectl-NAME` from PATH for `kubectl NAME ...`; a link of that name to this
/// binary makes it a plugin.
const KUBECTL_PLUGIN: &str = "kubectl-netwarden";

/// The name to show in usage: `kubectl netwarden` when run as the kubectl plugin.
fn invoked_as(argv0: Option<&std::ffi::OsStr>) -> &'static str {
    let file_name = argv0
        .map(Path::new)
        .and_then(Path::file_name)
        .and_then(|name| name.to_str());
    if file_name == Some(KUBECTL_PLUGIN) {
        "kubectl netwarden"
    } else {
        "netwarden"
    }
}

fn main() -> anyhow::Result<()> {
    let argv0 = std::env::args_os().next();
    let matches = Cli::command()
        .bin_name(invoked_as(argv0.as_deref()))
        .get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|error| error.exit());
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
        // diff(1)'s convention, for CI gates: 1 means "closes flows", so errors are 2.
        Command::Diff(options) => match diff::run(&options) {
            Ok(code) => std::process::exit(code),
            Err(error) => {
                eprintln!("Error: {error:?}");
                std::process::exit(2)
            }
        },
        Command::Matrix(options) => matrix::run(&options),
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

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;

    use clap::CommandFactory as _;

    use super::{Cli, invoked_as};

    #[test]
    fn run_as_kubectl_netwarden_it_calls_itself_the_kubectl_plugin() {
        assert_eq!(
            invoked_as(Some(OsStr::new("/usr/local/bin/kubectl-netwarden"))),
            "kubectl netwarden"
        );
        assert_eq!(invoked_as(Some(OsStr::new("netwarden"))), "netwarden");
        assert_eq!(invoked_as(None), "netwarden");
        let usage = Cli::command()
            .bin_name(invoked_as(Some(OsStr::new("kubectl-netwarden"))))
            .render_usage()
            .to_string();
        assert_eq!(usage, "Usage: kubectl netwarden <COMMAND>");
    }
}
