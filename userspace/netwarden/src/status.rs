//! The agent's convergence signal: a JSON file rewritten (atomically) after every apply.
//!
//! Tests and operators wait for `source_digest` to equal the digest of what they wrote
//! (`netwarden_model::ManifestDir::digest_of`) instead of sleeping.

use std::{collections::BTreeMap, fs, io, path::Path};

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
    /// Local pods not enforced, with why; the agent retries them with backoff.
    #[serde(default)]
    pub unenforced: Vec<UnenforcedStatus>,
    /// Problems with the input or the datapath, each naming its object.
    pub errors: Vec<String>,
    /// Datapath verdict counters since the maps were created.
    pub verdicts: Verdicts,
    /// Identity check decisions since the agent started, by reason (`allowed`,
    /// `wrong_principal`, ...).
    #[serde(default)]
    pub identity_checks: BTreeMap<String, u64>,
    /// The Kubernetes API watches, one per resource (none for a manifest directory). A stale
    /// one means the applied state may be missing changes; it is still enforced.
    #[serde(default)]
    pub watches: Vec<WatchStatus>,
}

/// One Kubernetes API watch.
#[derive(Debug, Serialize, Deserialize)]
pub struct WatchStatus {
    /// `namespaces`, `pods` or `networkpolicies`.
    pub resource: String,
    /// False once it has failed for `--watch-stale-after` with no success in between.
    pub healthy: bool,
    /// Milliseconds since the Unix epoch of its last accepted list or watch request, or event.
    pub last_success_unix_ms: Option<u128>,
    /// How long it has been failing with no success since, if it is.
    pub failing_for_ms: Option<u128>,
}

impl WatchStatus {
    /// The status of `watch`.
    #[must_use]
    pub fn of(watch: &netwarden_kube::WatchHealth) -> Self {
        Self {
            resource: watch.resource.to_owned(),
            healthy: watch.healthy,
            last_success_unix_ms: watch
                .last_success
                .and_then(|at| at.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|since| since.as_millis()),
            failing_for_ms: watch.failing_for.map(|failing| failing.as_millis()),
        }
    }
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

/// A local pod the datapath does not enforce on.
#[derive(Debug, Serialize, Deserialize)]
pub struct UnenforcedStatus {
    /// `namespace/name`, or null for a pod veth with no known pod yet.
    pub pod: Option<String>,
    /// The host-side veth, if one was found.
    pub interface: Option<String>,
    /// `attach_failed`, `map_write_failed` or `interface_missing`
    /// (`netwarden_datapath::Unenforced::label`).
    pub reason: String,
}

/// Datapath verdict counters, both directions added up, by their label in
/// `netwarden_common::counter::TABLE` (`denied_by_policy`, `events_lost`, ...).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Verdicts(pub BTreeMap<String, u64>);

impl Verdicts {
    /// From the datapath's counter array: every counter of the table, zero included.
    #[must_use]
    pub fn from_counters(counters: &[u64]) -> Self {
        use netwarden_common::{counter, direction};
        let at = |reason: u32| {
            [direction::INGRESS, direction::EGRESS]
                .into_iter()
                .filter_map(|dir| counters.get(counter::slot(dir, reason) as usize))
                .sum()
        };
        Self(
            counter::TABLE
                .iter()
                .map(|reason| (reason.label.to_owned(), at(reason.id)))
                .collect(),
        )
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
    for endpoint in &status.unenforced {
        println!(
            "{:<32} not enforced: {} (retrying)",
            endpoint.pod.as_deref().unwrap_or("<unknown pod>"),
            endpoint.reason
        );
    }
    for watch in status.watches.iter().filter(|watch| !watch.healthy) {
        println!(
            "stale: the watch of {} has failed for {} s; enforcing the last state it applied",
            watch.resource,
            watch.failing_for_ms.unwrap_or(0) / 1000
        );
    }
    for error in &status.errors {
        println!("error: {error}");
    }
    println!(
        "{:<28} {:>12}  since the maps were created",
        "VERDICT COUNTER", "PACKETS"
    );
    for reason in netwarden_common::counter::TABLE {
        let count = status.verdicts.0.get(reason.label).copied().unwrap_or(0);
        println!("{:<28} {count:>12}  {}", reason.label, reason.description);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use netwarden_common::{counter, direction};

    use super::Verdicts;

    #[test]
    fn every_counter_of_the_table_is_in_the_status_file() {
        let counters: Vec<u64> = (1..=u64::from(counter::SLOTS)).collect();
        let json = serde_json::to_value(Verdicts::from_counters(&counters)).unwrap();
        let keys = json.as_object().unwrap();
        assert_eq!(keys.len(), counter::TABLE.len(), "{json}");
        for reason in counter::TABLE {
            let both = counters[counter::slot(direction::INGRESS, reason.id) as usize]
                + counters[counter::slot(direction::EGRESS, reason.id) as usize];
            assert_eq!(keys[reason.label], both, "{}", reason.label);
        }
    }
}
