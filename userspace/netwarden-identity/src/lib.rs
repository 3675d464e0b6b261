//! The identity check for mTLS-strict pods.
//!
//! The kernel makes sure a new TCP flow to an mTLS-strict pod starts with a TLS ClientHello; a
//! proxy in the pod terminates that TLS and asks this check, over Envoy's external
//! authorization API, whether the verified client principal may talk to the pod from where it
//! connects. [`decide`] is the decision (pure, on the same cluster model the datapath is
//! compiled from); [`server`] serves it over gRPC on a Unix socket and a node address.

pub mod client;
pub mod decide;
pub mod limit;
pub mod server;

pub use decide::{
    ClusterIndex, Connection, Decision, Denial, TrustDomain, acceptable_principals, decide_indexed,
};
pub use limit::CutRate;
pub use server::{
    CUT_RATE_LIMITED, DecisionCounts, FlowCutter, IdentityService, RefusedConnection,
    SharedSnapshot, Snapshot, SocketAccess, shared,
};

/// Errors of the identity check.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The configured trust domain is not a valid SPIFFE trust domain.
    #[error("{0:?} is not a SPIFFE trust domain (lowercase letters, digits, '.', '-', '_')")]
    InvalidTrustDomain(String),
    /// A Check request lacks an attribute the decision needs.
    #[error("the Check request has no {0}")]
    MissingAttribute(&'static str),
    /// A Check request carries an address that is not an IP socket address.
    #[error("the Check request's {field} is not an IP address and port: {value:?}")]
    BadAddress {
        /// The attribute.
        field: &'static str,
        /// What it held.
        value: String,
    },
    /// The agent has not applied the cluster yet: the check cannot tell a pod from a stranger.
    #[error("the agent has not applied the cluster yet; retry")]
    NotAppliedYet,
    /// A TCP caller asked about a connection to a pod it is not (only that pod's proxy may).
    #[error(
        "caller {caller} is not the pod at {destination}: over TCP only a pod's own proxy may ask about its connections"
    )]
    NotTheDestination {
        /// The caller's address.
        caller: std::net::IpAddr,
        /// The destination it asked about.
        destination: std::net::IpAddr,
    },
    /// The client could not connect.
    #[error("cannot connect to the identity check at {address}: {reason}")]
    Connect {
        /// The socket path or address.
        address: String,
        /// Why.
        reason: String,
    },
    /// The server could not listen.
    #[error("cannot listen on {address}: {source}")]
    Listen {
        /// The socket path or address.
        address: String,
        /// Why.
        source: std::io::Error,
    },
}
