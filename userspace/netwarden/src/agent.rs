//! The node agent: source -> compiler -> datapath, again whenever the input or the node's
//! network changes.
//!
//! The loop never sleeps: it waits for a file-system event, a netlink notification, a signal
//! or, while a local pod is left unenforced, the retry timer (`retry.rs`), takes whatever else
//! is already queued, and applies once for all of it.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use futures::StreamExt as _;
use netwarden_datapath::{
    ApplyReport, Capacity, Datapath, TranslationHook,
    conntrack::{Sweeper, Timeouts},
    netlink::{Netlink, NodeNetwork},
};
use netwarden_kube::events::Unenforceable;
use netwarden_policy::{Compiler, DatapathState};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{debug, error, info, warn};

use crate::{
    events::{self, Attribution, EndpointNames, RuleNames, SharedAttribution},
    explain, health,
    identity::{self, IdentityWiring},
    input::Input,
    metrics::{Applied, Metrics},
    observe::{self, server::ExplainRequest},
    retry::Retry,
    status::{self, EndpointStatus, Status, UnenforcedStatus, Verdicts, WatchStatus},
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
    /// Without `--manifests`: the kubeconfig to reach the API server with (its current
    /// context). Without it: the in-cluster configuration, else `KUBECONFIG`, else
    /// `~/.kube/config`.
    #[arg(long, conflicts_with = "manifests")]
    pub kubeconfig: Option<PathBuf>,
    /// A bpf filesystem (mounted there if it is not one) under which maps and links are pinned.
    #[arg(long, default_value = "/sys/fs/bpf")]
    pub bpffs: PathBuf,
    /// Where to write the applied state.
    #[arg(long, default_value = status::DEFAULT_STATUS_FILE)]
    pub status_file: PathBuf,
    /// Serve `/healthz`, `/readyz` and Prometheus `/metrics` on this address (the node's own
    /// address in a DaemonSet).
    #[arg(long)]
    pub metrics_address: Option<std::net::SocketAddr>,
    /// Without `--manifests`: after how long a Kubernetes API watch that keeps failing (with no
    /// successful list or watch in between) is reported stale — `/readyz` fails, the
    /// `netwarden_watch_healthy` metric and the status file say so. The datapath keeps
    /// enforcing the last applied state either way. `60s`, `2m`, or seconds.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub watch_stale_after: Duration,
    /// Log JSON lines instead of text.
    #[arg(long)]
    pub log_json: bool,
    /// Capacity of the policy map (entries over all endpoints).
    #[arg(long, default_value_t = Capacity::default().policy)]
    pub policy_map_entries: u32,
    /// Capacity of each CIDR map, IPv4 and IPv6 (prefixes over all policies).
    #[arg(long, default_value_t = Capacity::default().cidrs)]
    pub cidr_map_entries: u32,
    /// Capacity of the IP-to-identity map.
    #[arg(long, default_value_t = Capacity::default().ipcache)]
    pub ipcache_entries: u32,
    /// Capacity of each connection-tracking table, IPv4 and IPv6.
    #[arg(long, default_value_t = Capacity::default().conntrack)]
    pub conntrack_entries: u32,
    /// Report about one in N new allowed flows as a verdict log line naming the rule that
    /// allowed it (1: every one, 0: none). Denies are always reported.
    #[arg(long, default_value_t = 100)]
    pub allow_events: u32,
    /// Do not attach the hook after translation: flows to Services are then judged on the
    /// Service's address where they leave the pod (which denies them wherever egress is
    /// isolated by pod selectors). For kernels where the hook misbehaves, and for tests.
    #[arg(long)]
    pub no_translation_hook: bool,
    /// Audit every policy, whatever its `netwarden.dev/enforcement` annotation: nothing a
    /// policy does not allow is dropped; each such new flow passes and is logged and counted
    /// with verdict `audit`. For rolling out default deny on a cluster; restart without it to
    /// enforce.
    #[arg(long)]
    pub audit: bool,
    /// Seconds between two sweeps of the connection-tracking table for idle flows.
    #[arg(long, default_value_t = 10)]
    pub conntrack_sweep_seconds: u64,
    /// Idle seconds after which an answered TCP connection is forgotten.
    #[arg(long, default_value_t = Timeouts::default().tcp_established.as_secs())]
    pub conntrack_tcp_seconds: u64,
    /// Idle seconds after which an answered flow of another protocol (UDP, SCTP, ICMP) is
    /// forgotten.
    #[arg(long, default_value_t = Timeouts::default().other.as_secs())]
    pub conntrack_other_seconds: u64,
    /// Idle seconds after which a flow nobody answered is forgotten.
    #[arg(long, default_value_t = Timeouts::default().unreplied.as_secs())]
    pub conntrack_unreplied_seconds: u64,
    /// Idle seconds after which a TCP connection that sent a FIN or RST is forgotten.
    #[arg(long, default_value_t = Timeouts::default().closing.as_secs())]
    pub conntrack_closing_seconds: u64,
    /// The identity check for mTLS-strict pods.
    #[command(flatten)]
    pub identity: identity::IdentityOptions,
    /// The observe endpoint: recent and live flows, explain on the applied state.
    #[command(flatten)]
    pub observe: observe::ObserveOptions,
}

/// What [`apply`] works with besides the input and the node's network.
struct Agent<'a> {
    compiler: &'a mut Compiler,
    datapath: &'a mut Datapath,
    options: &'a AgentOptions,
    attribution: &'a SharedAttribution,
    metrics: &'a Metrics,
    identity: &'a IdentityWiring,
    readiness: &'a health::ReadinessState,
}

/// Compiles the current input for `network`, applies it and writes the status file.
/// `change_seen` is when the agent woke for the change being applied (`None` at startup).
/// Returns how many local pods are left unenforced.
fn apply(
    agent: &mut Agent<'_>,
    input: &mut Input,
    network: &NodeNetwork,
    generation: u64,
    change_seen: Option<Instant>,
) -> usize {
    let Agent {
        compiler,
        datapath,
        options,
        attribution,
        metrics,
        identity,
        readiness,
    } = agent;
    let started = Instant::now();
    let watches = input.watch_health();
    let (cluster, input_errors) = input.cluster_view();
    let policies = cluster.rest.policies.len();
    // The identity check decides on the same snapshot the compiler compiles.
    let identity_input = identity.prepare(&cluster);
    compiler.set_node_addresses(&network.addresses);
    compiler.sync_view(cluster);
    let state = compiler.state();
    let mut errors = input_errors;
    // Before the apply: an endpoint that turns ready is already screened if it is strict.
    identity.sync_kernel(datapath, &identity_input, network, state, &mut errors);
    let report = datapath.apply(state, network);
    if generation == 1 {
        log_translation_hook(options, datapath);
    }
    let latency = change_seen.map(|seen| seen.elapsed());
    identity.refresh(identity_input, network, state, &mut errors);
    errors.extend(state.warnings.iter().cloned());
    for message in &errors {
        warn!(%message, "not enforced as written");
    }
    errors.extend(datapath_errors(&report));
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
                pod: endpoint.pod.as_ref().map(ToString::to_string),
                interface: endpoint.interface.clone(),
                ifindex: endpoint.ifindex,
                state: endpoint.state.label().to_owned(),
                attached: endpoint.attached,
            })
            .collect(),
        pending: report.pending.iter().map(ToString::to_string).collect(),
        unenforced: report
            .unenforced
            .iter()
            .map(|endpoint| UnenforcedStatus {
                pod: endpoint.pod.as_ref().map(ToString::to_string),
                interface: endpoint.interface.clone(),
                reason: endpoint.reason.label().to_owned(),
            })
            .collect(),
        errors,
        verdicts: Verdicts::from_counters(&datapath.verdicts()),
        identity_checks: identity.counts(),
        watches: watches.iter().map(WatchStatus::of).collect(),
    };
    metrics.observe_watches(&watches);
    readiness.set_unenforced(report.unenforced.len());
    readiness.applied(&watches);
    for watch in watches.iter().filter(|watch| !watch.healthy) {
        warn!(
            resource = watch.resource,
            failing_for_s = watch.failing_for.unwrap_or_default().as_secs(),
            "the Kubernetes API watch is stale; enforcing the last applied state"
        );
    }
    metrics.observe_apply(&Applied {
        policies,
        input_errors: status.errors.len(),
        state,
        report: &report,
        maps: &datapath.map_usage(),
        latency,
    });
    input.report_unenforceable(&over_capacity(state, &report));
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
        unenforced = report.unenforced.len(),
        elapsed_us = started.elapsed().as_micros(),
        "applied"
    );
    report.unenforced.len()
}

/// Logs what the datapath could not carry out, by kind, and returns it as the status file
/// lists it.
fn datapath_errors(report: &ApplyReport) -> Vec<String> {
    report
        .errors
        .iter()
        .map(|error| {
            warn!(message = %error, kind = error.metric_label(), "not enforced as written");
            error.to_string()
        })
        .collect()
}

/// After an apply: a retry scheduled while a local pod is unenforced (readiness says so too:
/// `apply` reports the count before the apply as done).
fn settle(unenforced: usize, retry: &mut Retry) {
    retry.after_apply(unenforced);
    if let Some(deadline) = retry.deadline() {
        let retry_in_ms = deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .as_millis();
        warn!(
            unenforced,
            retry_in_ms, "local pods not enforced; not ready, retrying"
        );
    }
}

/// A duration as `--watch-stale-after` takes it: `90s`, `2m`, `1h`, or plain seconds.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit())
        .map_or((text, ""), |at| text.split_at(at));
    let seconds = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => 0,
    };
    number
        .parse::<u64>()
        .ok()
        .filter(|value| seconds > 0 && *value > 0)
        .and_then(|value| value.checked_mul(seconds))
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{text:?} is not a duration such as 90s, 2m or 1h"))
}

/// Sweeps the pinned conntrack table for idle flows on a thread of its own, for as long as the
/// agent runs (a restarted agent picks the table up where this one left it).
fn spawn_conntrack_sweeper(options: &AgentOptions, metrics: Arc<Metrics>) -> anyhow::Result<()> {
    let seconds = Duration::from_secs;
    let timeouts = Timeouts {
        closing: seconds(options.conntrack_closing_seconds),
        unreplied: seconds(options.conntrack_unreplied_seconds),
        tcp_established: seconds(options.conntrack_tcp_seconds),
        other: seconds(options.conntrack_other_seconds),
    };
    let interval = seconds(options.conntrack_sweep_seconds.max(1));
    let mut sweeper =
        Sweeper::open(&options.bpffs, interval, timeouts).context("opening the conntrack table")?;
    debug!(hz = sweeper.hz(), "conntrack clock");
    std::thread::Builder::new()
        .name("conntrack-sweeper".into())
        .spawn(move || {
            loop {
                // A timer, not a wait for an event: idleness is the absence of events.
                std::thread::sleep(sweeper.interval());
                let report = match sweeper.sweep() {
                    Ok(report) => report,
                    Err(error) => {
                        warn!(%error, "conntrack sweep skipped: cannot read the kernel's clock");
                        continue;
                    }
                };
                metrics.observe_conntrack_sweep(&report);
                if report.expired() > 0 || report.skipped > 0 {
                    debug!(
                        flows = report.flows(),
                        expired = report.expired(),
                        skipped = report.skipped,
                        "conntrack sweep"
                    );
                }
            }
        })
        .context("starting the conntrack sweeper")?;
    Ok(())
}

/// The policies behind each endpoint the datapath locked down because its compiled policy did
/// not fit the maps, naming the direction's field.
fn over_capacity(state: &DatapathState, report: &ApplyReport) -> Vec<Unenforceable> {
    let mut problems = Vec::new();
    for endpoint in state.endpoints.values() {
        let directions = [
            (
                "spec.ingress",
                endpoint.ingress,
                &endpoint.ingress_isolated_by,
            ),
            ("spec.egress", endpoint.egress, &endpoint.egress_isolated_by),
        ];
        for (field, id, policies) in directions {
            let Some(why) = id.and_then(|id| report.policy_failure(id)) else {
                continue;
            };
            let pod = endpoint.pod.to_string();
            let why = why.to_string();
            problems.extend(
                policies
                    .iter()
                    .map(|policy| Unenforceable::over_capacity(policy.clone(), field, &pod, &why)),
            );
        }
    }
    problems
}

/// Gives the event reader the names of what was just applied.
fn refresh_attribution(compiler: &Compiler, report: &ApplyReport, attribution: &SharedAttribution) {
    let state = compiler.state();
    let endpoints = report
        .endpoints
        .iter()
        .map(|endpoint| {
            let local = endpoint
                .pod
                .as_ref()
                .and_then(|pod| state.endpoints.get(pod));
            let names = EndpointNames {
                pod: endpoint.pod.as_ref().map(ToString::to_string),
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
    let mut shared = attribution
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    // Every pod address is edited in place rather than collected anew: a second map of every
    // address and its pod's name (150,000 of them) was built at each apply while the first was
    // still held, at the apply's peak. The event reader waits for the walk, a few milliseconds.
    let mut pods = std::mem::take(&mut shared.pods);
    pods.retain(|ip, name| {
        compiler
            .pod_address_owner(ip)
            .is_some_and(|owner| Arc::ptr_eq(name, owner))
    });
    for (ip, owner) in compiler.pod_addresses() {
        pods.insert_if_absent(ip, owner);
    }
    let rules = state
        .rules
        .iter()
        .map(|(id, origin)| {
            let names = RuleNames {
                rule: origin.to_string(),
                policy: origin.policy.name(),
            };
            (*id, names)
        })
        .collect();
    let services = state
        .service_frontends
        .iter()
        .map(|(frontend, info)| (info.id, format!("{info} {frontend}")))
        .collect();
    *shared = Attribution {
        endpoints,
        pods,
        rules,
        services,
    };
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

/// Serves `/healthz`, `/readyz` and `/metrics` on `address`.
async fn serve_health(
    address: std::net::SocketAddr,
    datapath: &Datapath,
    identity: &IdentityWiring,
    ready: &health::Readiness,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<()> {
    // Without the counters the other metrics are still worth serving.
    let verdicts = datapath
        .verdict_counters()
        .inspect_err(|error| error!(%error, "verdict counters will not be exported"))
        .ok()
        .map(Arc::new);
    let sources = health::ScrapeSources {
        verdicts,
        identity_checks: identity.decision_counts(),
    };
    health::serve(address, Arc::clone(ready), Arc::clone(metrics), sources).await
}

/// The manifest directory, or the Kubernetes API once its caches are synced.
async fn open_input(options: &AgentOptions) -> anyhow::Result<Input> {
    match &options.manifests {
        Some(dir) => Input::manifests(dir),
        None => {
            Input::kubernetes(
                &options.node,
                options.kubeconfig.as_deref(),
                options.watch_stale_after,
            )
            .await
        }
    }
}

/// Says, after the first apply, what flows to Services are judged on.
fn log_translation_hook(options: &AgentOptions, datapath: &Datapath) {
    match datapath.translation_hook() {
        _ if options.no_translation_hook => warn!(
            "hook after translation not attached (--no-translation-hook): flows to Services are judged on the Service's address"
        ),
        TranslationHook::Attached => info!(
            "hook after translation attached: flows to Services are decided on the pods they reach"
        ),
        TranslationHook::Failed(error) => warn!(
            %error,
            "hook after translation not attached: flows to Services are judged on the Service's address"
        ),
        TranslationHook::Off | TranslationHook::AfterFill => {}
    }
}

/// The next explain query; never, without an observe endpoint.
async fn next_explain_request(
    requests: Option<&mut tokio::sync::mpsc::Receiver<ExplainRequest>>,
) -> Option<ExplainRequest> {
    match requests {
        Some(requests) => requests.recv().await,
        None => std::future::pending().await,
    }
}

/// Answers `request` on the cluster the input holds, which the last apply compiled (none
/// before the first apply). The snapshot is taken per query rather than kept beside the
/// compiler's own, which keeps only what it needs of remote pods: a copy of the whole cluster
/// would cost every agent memory (10,000 pods: ~10 MiB) for a query that comes rarely.
fn answer_explain(
    request: ExplainRequest,
    input: &mut Input,
    node_addresses: Option<&[std::net::IpAddr]>,
    trust_domain: &netwarden_identity::TrustDomain,
) {
    let ExplainRequest { query, reply } = request;
    let answer = match node_addresses {
        None => Err("the agent has not applied a state yet".to_owned()),
        Some(node_addresses) => {
            explain::explain(&input.snapshot(), node_addresses, trust_domain, &query)
                .map_err(|error| error.to_string())
        }
    };
    // The asker may have gone; nothing to do then.
    let _ = reply.send(answer);
}

/// Opens (or adopts) the pinned datapath with the options' capacities and settings.
fn open_datapath(
    options: &AgentOptions,
) -> anyhow::Result<(Datapath, netwarden_datapath::Inherited)> {
    let capacity = Capacity {
        policy: options.policy_map_entries,
        cidrs: options.cidr_map_entries,
        ipcache: options.ipcache_entries,
        conntrack: options.conntrack_entries,
        ..Capacity::default()
    };
    let (mut datapath, inherited) =
        Datapath::open(&options.bpffs, &capacity).context("opening the datapath")?;
    datapath
        .set_allow_event_period(options.allow_events)
        .context("setting the allow-event period")?;
    // The agent runs in the node's network namespace: the hook goes on its netfilter, once
    // the first apply has written the maps it reads.
    if !options.no_translation_hook {
        datapath.attach_translation_hook_after_fill();
    }
    Ok((datapath, inherited))
}

/// Starts the observe endpoint (unless `--no-observe`) and the reader of the datapath's
/// events, which logs them and publishes them to the endpoint; returns the explain queries
/// the endpoint passes on.
async fn start_events(
    options: &AgentOptions,
    datapath: &mut Datapath,
    attribution: &SharedAttribution,
) -> anyhow::Result<Option<tokio::sync::mpsc::Receiver<ExplainRequest>>> {
    let observing = observe::start(&options.observe, &options.status_file).await?;
    let (observers, explain_requests) = match observing {
        Some(observing) => (Some(observing.hub), Some(observing.explain)),
        None => (None, None),
    };
    if let Some(ring) = datapath.take_events() {
        events::spawn_reader(ring, attribution.clone(), options.node.clone(), observers);
    }
    Ok(explain_requests)
}

/// Runs the agent until SIGTERM or SIGINT. Enforcement stays in place when it exits: maps and
/// links are pinned, and the next agent adopts them.
/// The node's compiler, auditing every policy under `--audit` (and saying so).
fn new_compiler(options: &AgentOptions) -> Compiler {
    if options.audit {
        warn!("--audit: no policy drops anything; would-be drops are reported as audited");
    }
    Compiler::new(options.node.clone()).auditing_everything(options.audit)
}

pub async fn run(options: AgentOptions) -> anyhow::Result<()> {
    let (mut datapath, inherited) = open_datapath(&options)?;
    let attribution = SharedAttribution::default();
    let mut explain_requests = start_events(&options, &mut datapath, &attribution).await?;
    let trust_domain = netwarden_identity::TrustDomain::new(&options.identity.trust_domain)
        .context("--trust-domain")?;
    // The node's addresses of the last apply, for live explain queries.
    let mut applied_node_addresses = None;
    let identity = IdentityWiring::start(&options.identity, &mut datapath).await?;
    let mut compiler = new_compiler(&options);
    compiler.resume(inherited.identities, inherited.highest_policy_id);
    // Unchanged policies keep their pinned ids: the first apply rewrites none of them.
    compiler.adopt_pinned_policies(inherited.policies);
    let metrics = Arc::new(Metrics::new());
    spawn_conntrack_sweeper(&options, Arc::clone(&metrics))?;

    let ready = health::Readiness::default();
    if let Some(address) = options.metrics_address {
        serve_health(address, &datapath, &identity, &ready, &metrics).await?;
    }
    let mut netlink = Netlink::open().context("opening netlink")?;
    let mut input = open_input(&options).await?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;

    // Links a previous agent pinned are taken over at the end of the first apply, once this
    // agent's maps are filled (`Datapath::apply`): its programs never run on empty maps.

    info!(node = %options.node, input = %input.describe(), "agent started");
    let mut generation = 0_u64;
    let mut last_network = None;
    let mut input_changed = true;
    let mut change_seen = None;
    let mut retry = Retry::default();
    'agent: loop {
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
            let mut agent = Agent {
                compiler: &mut compiler,
                datapath: &mut datapath,
                options: &options,
                attribution: &attribution,
                metrics: &metrics,
                identity: &identity,
                readiness: &ready,
            };
            let unenforced = apply(
                &mut agent,
                &mut input,
                &network,
                generation,
                change_seen.take(),
            );
            applied_node_addresses = Some(network.addresses.clone());
            last_network = Some(network);
            settle(unenforced, &mut retry);
        }

        let mut retrying = false;
        // Explain queries are answered here, between applies, on the state applied last; they
        // wake nothing else.
        loop {
            tokio::select! {
                // A change seen is applied before a query is answered.
                biased;
                _ = terminate.recv() => break 'agent,
                _ = interrupt.recv() => break 'agent,
                () = input.changed() => {
                    input_changed = true;
                    break;
                }
                // A pod left unenforced: apply again although nothing changed.
                () = retry.due() => {
                    last_network = None;
                    retrying = true;
                    break;
                }
                Some(()) = netlink.changes.next() => break,
                Some(request) = next_explain_request(explain_requests.as_mut()) => {
                    answer_explain(
                        request,
                        &mut input,
                        applied_node_addresses.as_deref(),
                        &trust_domain,
                    );
                }
            }
        }
        // A retry is no change: it has no apply latency.
        change_seen = (!retrying).then(Instant::now);
        metrics.observe_watch_restarts(input.watch_restarts());
        // Coalesce whatever else is already queued into this one apply.
        if input.drain() {
            input_changed = true;
        }
        while netlink.changes.try_recv().is_ok() {}
    }
    info!("stopping; enforcement stays in place (pinned maps and links)");
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use aya::{maps::MapError, sys::SyscallError};
    use netwarden_datapath::{ApplyError, ApplyReport, PolicyMap};
    use netwarden_kube::events::Reason;
    use netwarden_model::{ManifestDir, PolicyRef};
    use netwarden_policy::Compiler;

    use super::{over_capacity, parse_duration, settle};
    use crate::{health::ReadinessState, retry::Retry};

    /// A pod whose attachment fails is retried by the timer alone, 100 ms then 200 ms later,
    /// and the agent is unready until it is enforced. Needs root (it loads and attaches
    /// programs, on the loopback of a network namespace of the test's own).
    #[test]
    fn a_failed_attach_is_retried_with_backoff_and_the_agent_is_unready_meanwhile() {
        use netwarden_datapath::{Capacity, Datapath, faults::Faults, netlink::NodeNetwork};
        use tokio::time::Instant;

        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: loading eBPF programs needs root");
            return;
        }
        let bpffs = tempfile::tempdir().unwrap();
        let root = bpffs.path().to_owned();
        let outcome = std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("a network namespace of the test's own");
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap();
            runtime.block_on(async move {
                let (mut datapath, _) = Datapath::open(&root, &Capacity::default()).unwrap();
                let (cluster, errors) = netwarden_model::cluster_of_stream(
                    "cluster.yaml",
                    "\
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x}
spec: {nodeName: node-1, containers: [{name: c}]}
status: {podIP: 10.0.0.1}
",
                );
                assert!(errors.is_empty(), "{errors:?}");
                let mut compiler = Compiler::new("node-1");
                let state = compiler.sync(cluster).clone();
                let network = NodeNetwork::behind_loopback(&["10.0.0.1".parse().unwrap()]);
                // Both hooks fail at the first apply, one at the second.
                datapath.inject_faults(Faults {
                    attaches: 3,
                    ..Faults::default()
                });
                let ready = ReadinessState::default();
                let mut retry = Retry::default();
                let mut waits = Vec::new();
                let mut readiness = Vec::new();
                loop {
                    let report = datapath.apply(&state, &network);
                    // As the agent's apply reports it, then schedules the retry.
                    ready.set_unenforced(report.unenforced.len());
                    ready.applied(&[]);
                    settle(report.unenforced.len(), &mut retry);
                    readiness.push(ready.is_ready());
                    if retry.deadline().is_none() {
                        break;
                    }
                    let started = Instant::now();
                    retry.due().await;
                    waits.push(started.elapsed().as_millis());
                }
                (waits, readiness)
            })
        })
        .join();
        let _ = nix::mount::umount2(bpffs.path(), nix::mount::MntFlags::MNT_DETACH);
        let (waits, readiness) = outcome.expect("the test thread");
        assert_eq!(waits, [100, 200]);
        assert_eq!(readiness, [false, false, true]);
    }

    #[test]
    fn durations_are_seconds_minutes_or_hours() {
        let seconds = std::time::Duration::from_secs;
        assert_eq!(parse_duration("60s"), Ok(seconds(60)));
        assert_eq!(parse_duration("90"), Ok(seconds(90)));
        assert_eq!(parse_duration("2m"), Ok(seconds(120)));
        assert_eq!(parse_duration("1h"), Ok(seconds(3600)));
        for bad in ["", "0s", "s", "1.5m", "10ms", "-1s", "1d"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_policy_that_does_not_fit_names_each_policy_isolating_the_locked_direction() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("cluster.yaml"),
            "\
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: x, labels: {app: b}}
spec: {nodeName: node-1, containers: [{name: c}]}
status: {podIP: 10.244.0.6}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: big, namespace: x}
spec: {podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8}}]}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: egress-only, namespace: x}
spec: {podSelector: {}, policyTypes: [Egress]}
",
        )
        .unwrap();
        let mut source = ManifestDir::new(dir.path());
        source.refresh().unwrap();
        let mut compiler = Compiler::new("node-1");
        compiler.set_node_addresses(&["172.18.0.2".parse::<IpAddr>().unwrap()]);
        let state = compiler.sync(source.cluster().0).clone();
        let endpoint = state.endpoints.values().next().unwrap();
        let ingress = endpoint.ingress.expect("b is isolated for ingress");
        let mut report = ApplyReport::default();
        report.failed_policies.insert(ingress);
        report.errors.push(ApplyError::PolicyDoesNotFit {
            id: ingress,
            map: PolicyMap::Cidrs,
            needed: 1,
            source: MapError::SyscallError(SyscallError {
                call: "bpf_map_update_elem",
                io_error: std::io::Error::from_raw_os_error(libc::E2BIG),
            }),
        });

        let problems = over_capacity(&state, &report);
        let [problem] = problems.as_slice() else {
            panic!("expected one problem, got {problems:?}");
        };
        assert_eq!(
            problem.policy,
            PolicyRef {
                namespace: "x".into(),
                name: "big".into()
            }
        );
        assert_eq!(problem.reason, Reason::OverCapacity);
        assert_eq!(problem.field, "spec.ingress");
        assert!(problem.detail.contains("pod x/b"), "{}", problem.detail);
        assert!(
            problem.detail.contains("CIDR map is full or failing"),
            "{}",
            problem.detail
        );
        assert!(over_capacity(&state, &ApplyReport::default()).is_empty());
    }
}
