//! The agent's convergence signal: a JSON file rewritten (atomically) after every apply.
//!
//! Tests and operators wait for `source_digest` to equal the digest of what they wrote
//! (`netwarden_model::ManifestDir::digest_of`) instead of sleeping.

use std::{fs, io, path::Path};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

/// Where the agent writes its status unless told otherwise.
pub const DEFAULT_STATUS_FILE: &str = "/run/netwarden/status.json";

/// What the agent has applied.
#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    /// The agent's process id, so a waiter can tell a restarted agent from its predecessor.
    pub pid: u32,
    /// Incremented on every apply.
    pub generation: u64,
    /// Digest of the manifest directory content that the applied state reflects.
    pub source_digest: String,
    /// Milliseconds since the Unix epoch when the apply finished.
    pub applied_unix_ms: u128,
    /// Every endpoint the datapath enforces on.
    pub endpoints: Vec<EndpointStatus>,
    /// Local pods whose interface has not been found yet.
    pub pending: Vec<String>,
    /// Problems with the input or the datapath, each naming its object.
    pub errors: Vec<String>,
    /// Datapath verdict counters since the maps were created.
    pub verdicts: Verdicts,
    /// Identity check decisions since the agent started, by reason (`allowed`,
    /// `wrong_principal`, ...).
    #[serde(default)]
    pub identity_checks: std::collections::BTreeMap<String, u64>,
}

/// One endpoint.
#[derive(Debug, Serialize, Deserialize)]
pub struct EndpointStatus {
    /// `namespace/name`, or null for a pod veth with no known pod yet.
    pub pod: Option<String>,
    /// The host-side veth.
    pub interface: String,
    /// Its index.
    pub ifindex: u32,
    /// `ready`, `unknown` or `locked`.
    pub state: String,
    /// Whether both programs are attached.
    pub attached: bool,
}

/// Datapath verdict counters.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Verdicts {
    /// Packets of tracked flows.
    pub allowed_tracked: u64,
    /// New flows in a direction no policy isolates.
    pub allowed_not_isolated: u64,
    /// New flows a rule allows.
    pub allowed_by_policy: u64,
    /// New flows from the node.
    pub allowed_node: u64,
    /// ARP, neighbour discovery, non-IP.
    pub allowed_network_control: u64,
    /// Dropped: isolated, no rule allows.
    pub denied_by_policy: u64,
    /// Dropped: endpoint unknown, locked or without a map entry.
    pub denied_endpoint_not_ready: u64,
    /// Dropped: a tracked flow the current policy revokes.
    pub denied_revoked: u64,
    /// Dropped: unparsable.
    pub denied_malformed: u64,
    /// Dropped: left a pod from an address it does not own.
    pub denied_spoofed: u64,
    /// ICMP errors about tracked flows.
    pub allowed_related: u64,
    /// Deny events not reported: over the per-CPU rate limit.
    pub events_rate_limited: u64,
    /// Deny events not reported: the ring buffer was full.
    pub events_lost: u64,
    /// Dropped: a TCP flow to an mTLS-strict pod did not open with a TLS ClientHello.
    #[serde(default)]
    pub denied_plaintext_to_strict: u64,
    /// Dropped: packets of flows the identity check refused.
    #[serde(default)]
    pub denied_by_identity: u64,
}

impl Verdicts {
    /// From the datapath's counter array, both directions added up.
    #[must_use]
    pub fn from_counters(counters: &[u64]) -> Self {
        use netwarden_common::{counter, direction};
        let at = |reason: u32| {
            [direction::INGRESS, direction::EGRESS]
                .into_iter()
                .filter_map(|dir| counters.get(counter::slot(dir, reason) as usize))
                .sum()
        };
        Self {
            allowed_tracked: at(counter::ALLOWED_TRACKED),
            allowed_not_isolated: at(counter::ALLOWED_NOT_ISOLATED),
            allowed_by_policy: at(counter::ALLOWED_BY_POLICY),
            allowed_node: at(counter::ALLOWED_NODE),
            allowed_network_control: at(counter::ALLOWED_NETWORK_CONTROL),
            denied_by_policy: at(counter::DENIED_BY_POLICY),
            denied_endpoint_not_ready: at(counter::DENIED_ENDPOINT_NOT_READY),
            denied_revoked: at(counter::DENIED_REVOKED),
            denied_malformed: at(counter::DENIED_MALFORMED),
            denied_spoofed: at(counter::DENIED_SPOOFED),
            allowed_related: at(counter::ALLOWED_RELATED),
            events_rate_limited: at(counter::EVENTS_RATE_LIMITED),
            events_lost: at(counter::EVENTS_LOST),
            denied_plaintext_to_strict: at(counter::DENIED_PLAINTEXT_TO_STRICT),
            denied_by_identity: at(counter::DENIED_BY_IDENTITY),
        }
    }
}

/// Writes `status` to `path` atomically (a reader sees the old file or the new one).
pub fn write(path: &Path, status: &Status) -> io::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    fs::create_dir_all(dir)?;
    let file_name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temporary = dir.join(format!(".{file_name}.{}", std::process::id()));
    fs::write(&temporary, serde_json::to_vec_pretty(status)?)?;
    fs::rename(&temporary, path)
}

/// `netwarden status`.
pub fn print(path: &Path, json: bool) -> anyhow::Result<()> {
    let text = fs::read_to_string(path)
        .with_context(|| format!("reading {} (is the agent running?)", path.display()))?;
    if json {
        println!("{text}");
        return Ok(());
    }
    let status: Status =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    println!(
        "agent pid {} applied generation {} (source {})",
        status.pid,
        status.generation,
        &status.source_digest[..12.min(status.source_digest.len())]
    );
    println!(
        "{:<32} {:<16} {:>7} {:<8} attached",
        "POD", "INTERFACE", "IFINDEX", "STATE"
    );
    for endpoint in &status.endpoints {
        println!(
            "{:<32} {:<16} {:>7} {:<8} {}",
            endpoint.pod.as_deref().unwrap_or("<unknown pod>"),
            endpoint.interface,
            endpoint.ifindex,
            endpoint.state,
            endpoint.attached
        );
    }
    for pod in &status.pending {
        println!("{pod:<32} (no route to its IP through a veth yet)");
    }
    for error in &status.errors {
        println!("error: {error}");
    }
    Ok(())
}
