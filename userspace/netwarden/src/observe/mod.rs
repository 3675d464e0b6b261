//! The operator's live view of an agent: its recent and new verdicts (`netwarden observe`) and
//! explanations on the state it applied (`netwarden explain --agent`).
//!
//! - [`flow`]: the record and the filter, as the endpoint sends and reads them;
//! - [`hub`]: the bounded ring and the broadcast the event reader publishes to without waiting;
//! - [`server`]: the endpoint (HTTP on a Unix socket; TCP only where asked);
//! - [`client`]: the other end, over a Unix socket, TCP or a Kubernetes port-forward;
//! - [`cli`]: `netwarden observe`.

pub mod cli;
pub mod client;
pub mod cluster;
pub mod flow;
pub mod hub;
pub mod server;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use netwarden_identity::SocketAccess;
use tokio::sync::mpsc;

use crate::identity::{group_id, parse_mode};

/// The observe socket's file name, beside the status file by default.
pub const SOCKET_NAME: &str = "observe.sock";
/// Where `netwarden observe` and `netwarden explain --agent` look by default: beside the
/// default status file.
pub const DEFAULT_SOCKET: &str = "/run/netwarden/observe.sock";
/// The port of the loopback listener the DaemonSet gives the agent, for `kubectl port-forward`
/// and `netwarden observe --kubeconfig`.
pub const DEFAULT_POD_PORT: u16 = 9964;

/// What the observe endpoint reports.
#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    /// The endpoint could not listen.
    #[error("observe endpoint: cannot listen on {address}: {source}")]
    Listen {
        /// The socket's path or the TCP address.
        address: String,
        /// Why.
        source: std::io::Error,
    },
    /// An agent's endpoint could not be reached.
    #[error("cannot reach the agent at {address}: {reason}")]
    Connect {
        /// The socket's path, the TCP address or the pod.
        address: String,
        /// Why.
        reason: String,
    },
    /// The HTTP exchange failed.
    #[error("talking to the agent: {0}")]
    Http(#[from] hyper::Error),
    /// The agent answered with an error.
    #[error("the agent answered {status}: {message}")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The agent's words.
        message: String,
    },
    /// A line of the agent's answer is not what this build reads.
    #[error("unreadable answer from the agent ({source}): {line}")]
    Unreadable {
        /// The text.
        line: String,
        /// Why.
        source: serde_json::Error,
    },
}

/// The observe endpoint's options of `netwarden agent`.
#[derive(clap::Args)]
pub struct ObserveOptions {
    /// Serve the observe endpoint (recent and live flows, explain on the applied state) on
    /// this Unix socket. Default: `observe.sock` beside `--status-file`.
    #[arg(long)]
    pub observe_socket: Option<PathBuf>,
    /// Permission bits of `--observe-socket`, in octal: whoever can open it sees every flow of
    /// this node's pods and the policies behind them.
    #[arg(long, default_value = "0660", value_parser = parse_mode)]
    pub observe_socket_mode: u32,
    /// Group of `--observe-socket` (a name or a numeric id); the agent's own when unset.
    #[arg(long)]
    pub observe_socket_group: Option<String>,
    /// Serve it on this TCP address too (the DaemonSet uses the pod's loopback, for
    /// port-forwards; nothing else reaches it there).
    #[arg(long)]
    pub observe_address: Option<SocketAddr>,
    /// Flows kept for a new observer, and how far a following observer may fall behind before
    /// it loses records (it is told how many).
    #[arg(long, default_value_t = 4096)]
    pub observe_buffer: usize,
    /// Serve no observe endpoint at all (the verdict log stays).
    #[arg(long, conflicts_with_all = ["observe_socket", "observe_address"])]
    pub no_observe: bool,
}

/// What the agent keeps of a started observe endpoint.
pub struct Observing {
    /// Where the event reader publishes.
    pub hub: Arc<FlowHub>,
    /// Explain queries for the apply loop.
    pub explain: mpsc::Receiver<server::ExplainRequest>,
}

use hub::FlowHub;

/// Explain queries waiting for the apply loop at most; more are refused, not queued.
const EXPLAIN_QUEUE: usize = 16;

/// Starts the endpoint `options` asks for; `None` with `--no-observe`.
pub async fn start(
    options: &ObserveOptions,
    status_file: &Path,
) -> anyhow::Result<Option<Observing>> {
    let ObserveOptions {
        observe_socket,
        observe_socket_mode,
        observe_socket_group,
        observe_address,
        observe_buffer,
        no_observe,
    } = options;
    if *no_observe {
        return Ok(None);
    }
    let socket = observe_socket.clone().unwrap_or_else(|| {
        status_file
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join(SOCKET_NAME)
    });
    let access = SocketAccess {
        mode: *observe_socket_mode,
        group: observe_socket_group
            .as_deref()
            .map(group_id)
            .transpose()
            .map_err(|error| error.context("--observe-socket-group"))?,
    };
    let hub = Arc::new(FlowHub::new(*observe_buffer));
    let (sender, explain) = mpsc::channel(EXPLAIN_QUEUE);
    server::serve(
        server::Listeners {
            socket: Some((socket, access)),
            address: *observe_address,
        },
        server::Served {
            hub: Arc::clone(&hub),
            explain: sender,
        },
    )
    .await?;
    Ok(Some(Observing { hub, explain }))
}

/// Now, in Unix milliseconds (0 before 1970: a clock that wrong dates nothing usefully).
pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis() as u64)
}
