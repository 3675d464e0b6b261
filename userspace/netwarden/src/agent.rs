//! The node agent: source -> compiler -> datapath, again whenever the input or the node's
//! network changes.
//!
//! The loop never sleeps: it waits for a file-system event, a netlink notification or a signal,
//! takes whatever else is already queued, and applies once for all of it.

use std::{
    path::PathBuf,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use futures::StreamExt as _;
use netwarden_datapath::{
    ApplyReport, Capacity, Datapath,
    netlink::{Netlink, NodeNetwork},
};
use netwarden_policy::Compiler;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use crate::{
    events::{self, Attribution, EndpointNames, SharedAttribution},
    health,
    identity::{self, IdentityWiring},
    input::Input,
    status::{self, EndpointStatus, Status, Verdicts},
};

/// `netwarden agent`.
#[derive(clap::Args)]
pub struct AgentOptions {
    /// Read Namespaces, Pods and NetworkPolicies from YAML/JSON files in this directory (and
    /// follow its changes) instead of the Kubernetes API. Without it, the agent watches the
    /// cluster of its in-cluster configuration or `KUBECONFIG`.
    #[arg(long)]
    pub manifests: Option<PathBuf>,
    /// This node's name: pods with this `spec.nodeName` are the local endpoints.
    #[arg(long, env = "NODE_NAME")]
    pub node: String,
    /// A bpf filesystem (mounted there if it is not one) under which maps and links are pinned.
    #[arg(long, default_value = "/sys/fs/bpf")]
    pub bpffs: PathBuf,
    /// Where to write the applied state.
    #[arg(long, default_value = status::DEFAULT_STATUS_FILE)]
    pub status_file: PathBuf,
    /// Serve `/healthz` and `/readyz` on this address (the node's own address in a DaemonSet).
    #[arg(long)]
    pub metrics_address: Option<std::net::SocketAddr>,
    /// Log JSON lines instead of text.
    #[arg(long)]
    pub log_json: bool,
    /// Capacity of the policy map (entries over all endpoints).
    #[arg(long, default_value_t = Capacity::default().policy)]
    pub policy_map_entries: u32,
    /// Capacity of the CIDR map (prefixes over all policies).
    #[arg(long, default_value_t = Capacity::default().cidrs)]
    pub cidr_map_entries: u32,
    /// Capacity of the IP-to-identity map.
    #[arg(long, default_value_t = Capacity::default().ipcache)]
    pub ipcache_entries: u32,
    /// Capacity of the connection-tracking table.
    #[arg(long, default_value_t = Capacity::default().conntrack)]
    pub conntrack_entries: u32,
    /// The identity check for mTLS-strict pods.
    #[command(flatten)]
    pub identity: identity::IdentityOptions,
}

/// Compiles the current input for `network`, applies it and writes the status file.
#[expect(
    clippy::too_many_arguments,
    reason = "the agent's long-lived parts, borrowed for one apply"
)]
fn apply(
    compiler: &mut Compiler,
    datapath: &mut Datapath,
    input: &mut Input,
    network: &NodeNetwork,
    generation: u64,
    options: &AgentOptions,
    attribution: &SharedAttribution,
    identity: &IdentityWiring,
) {
    let started = std::time::Instant::now();
    let (cluster, input_errors) = input.cluster();
    // The identity check decides on the same snapshot the compiler compiles.
    let identity_cluster = cluster.clone();
    compiler.set_node_addresses(&network.addresses);
    compiler.sync(cluster);
    let state = compiler.state();
    let mut errors = input_errors;
    // Before the apply: an endpoint that turns ready is already screened if it is strict.
    identity.sync_kernel(datapath, &identity_cluster, network, state, &mut errors);
    let report = datapath.apply(state, network);
    identity.refresh(identity_cluster, network, state, &mut errors);
    errors.extend(state.warnings.iter().cloned());
    errors.extend(report.errors.iter().cloned());
    for message in &errors {
        warn!(%message, "not enforced as written");
    }
    let status = Status {
        pid: std::process::id(),
        generation,
        source_digest: input.digest(),
        applied_unix_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_millis(),
        endpoints: report
            .endpoints
            .iter()
            .map(|endpoint| EndpointStatus {
                pod: endpoint.pod.clone(),
                interface: endpoint.interface.clone(),
                ifindex: endpoint.ifindex,
                state: endpoint.state.to_owned(),
                attached: endpoint.attached,
            })
            .collect(),
        pending: report.pending.clone(),
        errors,
        verdicts: Verdicts::from_counters(&datapath.verdicts()),
        identity_checks: identity.counts(),
    };
    refresh_attribution(compiler, &report, attribution);
    release_freed_memory();
    if let Err(error) = status::write(&options.status_file, &status) {
        error!(%error, path = %options.status_file.display(), "cannot write the status file");
    }
    info!(
        generation,
        endpoints = report.endpoints.len(),
        policies = state.policies.len(),
        identities = state.identities.len(),
        changed = report.changed,
        elapsed_us = started.elapsed().as_micros(),
        "applied"
    );
}

/// Gives the event reader the names of what was just applied.
fn refresh_attribution(compiler: &Compiler, report: &ApplyReport, attribution: &SharedAttribution) {
    let state = compiler.state();
    let endpoints = report
        .endpoints
        .iter()
        .map(|endpoint| {
            let local = endpoint.pod.as_deref().and_then(|pod| {
                state
                    .endpoints
                    .get(&netwarden_model::manifests::pod_ref(pod))
            });
            let names = EndpointNames {
                pod: endpoint.pod.clone(),
                ingress_isolated_by: local
                    .map(|local| local.ingress_isolated_by.clone())
                    .unwrap_or_default(),
                egress_isolated_by: local
                    .map(|local| local.egress_isolated_by.clone())
                    .unwrap_or_default(),
            };
            (endpoint.ifindex, names)
        })
        .collect();
    let pods = compiler
        .pod_addresses()
        .map(|(ip, pod)| (ip, pod.to_string()))
        .collect();
    let mut shared = attribution
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    *shared = Attribution { endpoints, pods };
}

/// Hands memory freed by an apply (the previous snapshot, compile scratch) back to the kernel:
/// glibc keeps it in its arenas otherwise, and a node agent's resident size is a budget.
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists; it is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Runs the agent until SIGTERM or SIGINT. Enforcement stays in place when it exits: maps and
/// links are pinned, and the next agent adopts them.
pub async fn run(options: AgentOptions) -> anyhow::Result<()> {
    let capacity = Capacity {
        policy: options.policy_map_entries,
        cidrs: options.cidr_map_entries,
        ipcache: options.ipcache_entries,
        conntrack: options.conntrack_entries,
        ..Capacity::default()
    };
    let (mut datapath, inherited) =
        Datapath::open(&options.bpffs, &capacity).context("opening the datapath")?;
    let attribution = SharedAttribution::default();
    if let Some(ring) = datapath.take_events() {
        events::spawn_reader(ring, attribution.clone());
    }
    let identity = IdentityWiring::start(&options.identity, &mut datapath).await?;
    let mut compiler = Compiler::new(options.node.clone());
    compiler.resume(inherited.identities, inherited.highest_policy_id);

    let ready = health::Readiness::default();
    if let Some(address) = options.metrics_address {
        health::serve(address, ready.clone()).await?;
    }
    let mut netlink = Netlink::open().context("opening netlink")?;
    let mut input = match &options.manifests {
        Some(dir) => Input::manifests(dir)?,
        None => Input::kubernetes().await?,
    };
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;

    let network = netlink.read().await.context("reading the node's network")?;
    datapath.adopt_links(&network);

    info!(node = %options.node, input = %input.describe(), "agent started");
    let mut generation = 0_u64;
    let mut last_network = None;
    let mut input_changed = true;
    loop {
        // A failed read skips this round: applying an empty network would detach every
        // endpoint. The maps keep enforcing; the next notification retries.
        let network = netlink
            .read()
            .await
            .inspect_err(|error| error!(%error, "cannot read the node's network"))
            .ok();
        // What the directory holds now decides, not which event woke us: an event can arrive
        // while another is being handled.
        match input.refresh() {
            Some(content_changed) if content_changed || input_changed => {
                input_changed = false;
                last_network = None;
            }
            _ => {}
        }
        if let Some(network) = network.filter(|network| last_network.as_ref() != Some(network)) {
            generation += 1;
            apply(
                &mut compiler,
                &mut datapath,
                &mut input,
                &network,
                generation,
                &options,
                &attribution,
                &identity,
            );
            last_network = Some(network);
            ready.store(true, std::sync::atomic::Ordering::Release);
        }

        tokio::select! {
            () = input.changed() => input_changed = true,
            Some(()) = netlink.changes.next() => {}
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
        // Coalesce whatever else is already queued into this one apply.
        if input.drain() {
            input_changed = true;
        }
        while netlink.changes.try_recv().is_ok() {}
    }
    info!("stopping; enforcement stays in place (pinned maps and links)");
    Ok(())
}
