//! Runs scenarios: builds each one's node, writes its manifests, drives the agent through the
//! steps and compares what the network does with what the scenario expects.

use std::{
    collections::{BTreeSet, HashMap},
    fmt::Write as _,
    fs,
    io::{IsTerminal as _, Write as _},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use futures::future::join_all;
use indexmap::IndexMap;
use nix::{
    mount::{MsFlags, mount},
    sys::signal::Signal,
};
use tokio::{sync::Semaphore, task::JoinSet};

use crate::{
    agent::{Agent, AgentConfig, AgentError, StatusWatcher, Wanted, log_tail},
    cleanup::{self, NETNS_PREFIX, RUN_ROOT, Registration, Resource},
    cli::{self, CliError},
    crafted::{self, QuotedPacket},
    dns::{self, Zone},
    driver::{
        self, At, CannotRun, Capabilities, Change, Driver, Findings, NewPod, NotPlayable, Plan,
        Spoofed, Support,
    },
    explain::Explain,
    kube_proxy::{KubeProxy, KubeProxyError, KubeProxyMode},
    manifests::{ManifestError, ManifestWriter},
    mtls::{ExpectAgentLog, IdentityCheck, MtlsError, MtlsProbe, MtlsState, PodView},
    netns::NetnsError,
    node::{Addresses, Endpoint, EndpointKind, Node, NodeError, ipv6_supported},
    observe::{self, Network, Observe, ObservedVerdict},
    placeholder::{self, PlaceholderError},
    probe::{self, Answerer, Client, DialError, Flow, Server},
    report::{self, ObservedGrid, Outcome, Verdict},
    scenario::{
        self, Cni, ConnectionExpectation, Delivery, Dial, DialVia, IpFamily, Labels, NODE_CLIENT,
        PodSpec, ProbeVia, Protocol, Quote, Reachability, Resolve, RestartMode, Scenario,
        SpoofedSource, Step,
    },
    servers::{self, ServerError, Servers},
    services::{self, PodEndpoint, ServiceError, ServiceRegistry, ServiceSpec},
};

/// Pause before the one retry of a probe that disagreed, as upstream does.
const RETRY_PAUSE: Duration = Duration::from_millis(300);
/// Lines of the agent log shown with a failure.
const LOG_TAIL_LINES: usize = 30;

/// How to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// The agent binary; `None` runs without an agent (everything is then open).
    pub agent: Option<PathBuf>,
    pub jobs: usize,
    pub verbose: bool,
    /// Run every scenario through per-pod Services with kube-proxy in this mode.
    pub through_services: Option<KubeProxyMode>,
    /// Wires pods this way whatever the scenarios' `model.cni` says.
    pub cni: Option<Cni>,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{}: {error}", path.display())]
    Discover {
        path: PathBuf,
        error: std::io::Error,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("cannot compute the manifest digest: {0}")]
    Digest(#[from] netwarden_model::ManifestError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Mtls(#[from] MtlsError),
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error(transparent)]
    KubeProxy(#[from] KubeProxyError),
    #[error("policy placeholder: {0}")]
    Placeholder(#[from] PlaceholderError),
    #[error("cannot open connection {name}: {source}")]
    Open { name: String, source: DialError },
    #[error("cannot send or watch for a crafted packet: {0}")]
    Crafted(std::io::Error),
    #[error("cannot prepare {}: {source}", path.display())]
    Workspace {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot mount bpffs on {}: {source}", path.display())]
    Mount { path: PathBuf, source: nix::Error },
    #[error(transparent)]
    Cli(#[from] CliError),
    #[error(transparent)]
    NotPlayable(#[from] NotPlayable),
}

/// Finds the scenario files: named files as they are, directories searched for `*.yaml`
/// files that declare a `format` (so policy files may sit beside scenarios).
pub fn discover(paths: &[PathBuf]) -> Result<Vec<PathBuf>, RunError> {
    let mut found = Vec::new();
    for path in paths {
        let metadata = fs::metadata(path).map_err(|error| RunError::Discover {
            path: path.clone(),
            error,
        })?;
        if metadata.is_dir() {
            let mut files = Vec::new();
            walk(path, &mut files)?;
            files.sort();
            found.extend(files.into_iter().filter(|file| {
                fs::read_to_string(file).is_ok_and(|text| scenario::looks_like_scenario(&text))
            }));
        } else {
            found.push(path.clone());
        }
    }
    Ok(found)
}

fn walk(dir: &Path, into: &mut Vec<PathBuf>) -> Result<(), RunError> {
    let entries = fs::read_dir(dir).map_err(|error| RunError::Discover {
        path: dir.to_owned(),
        error,
    })?;
    for entry in entries {
        let path = entry
            .map_err(|error| RunError::Discover {
                path: dir.to_owned(),
                error,
            })?
            .path();
        if path.is_dir() {
            walk(&path, into)?;
        } else if path
            .extension()
            .is_some_and(|extension| extension == "yaml")
        {
            into.push(path);
        }
    }
    Ok(())
}

/// Runs every scenario, `options.jobs` at a time, printing each verdict as it comes and the
/// latency and summary lines at the end. Returns whether everything passed or was skipped.
pub async fn run(options: Options, files: Vec<PathBuf>) -> bool {
    let options = Arc::new(options);
    let permits = Arc::new(Semaphore::new(options.jobs.max(1)));
    let mut running = JoinSet::new();
    let mut names = HashMap::new();
    for (index, file) in files.into_iter().enumerate() {
        let options = Arc::clone(&options);
        let permits = Arc::clone(&permits);
        let name = file.display().to_string();
        let handle = running.spawn(async move {
            let _permit = permits
                .acquire_owned()
                .await
                .expect("the semaphore is never closed");
            run_file(index + 1, &file, &options).await
        });
        names.insert(handle.id(), name);
    }
    let mut outcomes = Vec::new();
    while let Some(joined) = running.join_next_with_id().await {
        let outcome = match joined {
            Ok((_, outcome)) => outcome,
            Err(error) => {
                let name = names.get(&error.id()).cloned().unwrap_or_default();
                Outcome::failed(name, format!("the harness panicked: {error}"))
            }
        };
        print!("{}", outcome.render(options.verbose));
        let _ = std::io::stdout().flush();
        outcomes.push(outcome);
    }
    let latencies: Vec<Duration> = outcomes
        .iter()
        .flat_map(|outcome| outcome.latencies.iter().copied())
        .collect();
    println!("{}", report::latency_line(&latencies));
    let restarts: Vec<Duration> = outcomes
        .iter()
        .flat_map(|outcome| outcome.restart_latencies.iter().copied())
        .collect();
    if !restarts.is_empty() {
        println!("{}", report::restart_latency_line(&restarts));
    }
    println!("{}", report::summary_line(&outcomes));
    outcomes
        .iter()
        .all(|outcome| outcome.verdict != Verdict::Fail)
}

async fn run_file(index: usize, path: &Path, options: &Options) -> Outcome {
    let scenario = match scenario::load(path) {
        Ok(scenario) => match options.through_services {
            Some(mode) => scenario.through_services(mode),
            None => scenario,
        },
        Err(error) => return Outcome::failed(path.display().to_string(), error.to_string()),
    };
    let capabilities = NetnsCapabilities {
        agent: options.agent.is_some(),
        ipv6: ipv6_supported(),
    };
    match driver::plan(&capabilities, &scenario) {
        Ok(plan) => run_scenario(index, &scenario, &plan, options).await,
        Err(CannotRun(reason)) => Outcome {
            verdict: Verdict::Skip(reason),
            ..Outcome::failed(scenario.name, String::new())
        },
    }
}

/// Prints progress of one scenario in verbose mode, tagged with its index.
#[derive(Clone, Debug)]
pub struct Progress {
    tag: String,
    verbose: bool,
    color: bool,
}

impl Progress {
    fn line(&self, text: &str) {
        if self.verbose {
            self.block(text);
        }
    }

    /// Several lines printed together, so that concurrent scenarios do not interleave them.
    fn block(&self, text: &str) {
        let mut out = std::io::stdout().lock();
        for line in text.lines() {
            let _ = writeln!(out, "{} {line}", self.tag);
        }
        let _ = out.flush();
    }
}

/// The scenario's directory: manifests, status file, agent log and a private bpffs.
#[derive(Debug)]
struct Workspace {
    manifests: PathBuf,
    bpffs: PathBuf,
    status_file: PathBuf,
    log: PathBuf,
    /// Where the agent serves the identity check.
    authz_socket: PathBuf,
    /// Where the agent serves its observe endpoint.
    observe_socket: PathBuf,
    // Declared in removal order: the mount before the directory it sits in.
    _mount: Registration,
    _dir: Registration,
}

impl Workspace {
    fn create(index: usize) -> Result<Self, StepError> {
        let root = Path::new(RUN_ROOT).join(format!("{}-{index}", std::process::id()));
        let io_error = |source| StepError::Workspace {
            path: root.clone(),
            source,
        };
        if root.exists() {
            fs::remove_dir_all(&root).map_err(io_error)?;
        }
        let manifests = root.join("manifests");
        let bpffs = root.join("bpffs");
        fs::create_dir_all(&manifests).map_err(io_error)?;
        let dir = cleanup::register(Resource::Dir(root.clone()));
        fs::create_dir(&bpffs).map_err(io_error)?;
        mount(
            Some("bpf"),
            &bpffs,
            Some("bpf"),
            MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|source| StepError::Mount {
            path: bpffs.clone(),
            source,
        })?;
        let mount = cleanup::register(Resource::Mount(bpffs.clone()));
        Ok(Self {
            manifests,
            bpffs,
            status_file: root.join("status.json"),
            log: root.join("agent.log"),
            authz_socket: root.join("authz.sock"),
            observe_socket: root.join("observe.sock"),
            _mount: mount,
            _dir: dir,
        })
    }
}

/// A pod or external host that exists now.
#[derive(Debug)]
struct Live {
    endpoint: Endpoint,
    servers: Servers,
    /// `None` for external hosts.
    pod: Option<PodSpec>,
    published: bool,
}

/// The live pods as the mTLS ops see them.
fn pod_views(live: &IndexMap<String, Live>) -> HashMap<String, PodView<'_>> {
    live.iter()
        .filter_map(|(key, live)| {
            Some((
                key.clone(),
                PodView {
                    netns: &live.endpoint.netns,
                    addresses: &live.endpoint.addresses,
                    spec: live.pod.as_ref()?,
                },
            ))
        })
        .collect()
}

/// One scenario (or soak) on its simulated node: what exists, and the agent.
pub struct ScenarioRun<'a> {
    scenario: &'a Scenario,
    progress: Progress,
    writer: ManifestWriter,
    node: Node,
    /// In grid order.
    live: IndexMap<String, Live>,
    /// Addresses of every endpoint that ever existed, for placeholders and `reuse_ip_of`.
    addresses: HashMap<String, Addresses>,
    namespaces: IndexMap<String, Labels>,
    /// `namespace/name` of the policies on disk.
    policies: BTreeSet<String>,
    agent_config: Option<AgentConfig>,
    agent: Option<Agent>,
    watcher: Option<StatusWatcher>,
    flows: HashMap<String, Flow>,
    /// Client and server of each flow, by flow name.
    flow_ends: HashMap<String, (String, String)>,
    latencies: Vec<Duration>,
    /// From a restart to the new agent's first apply.
    restart_latencies: Vec<Duration>,
    failures: Vec<String>,
    mtls: MtlsState,
    /// The Services of the cluster and the kube-proxy that translates them, when it has any.
    services: Option<(ServiceRegistry, KubeProxy)>,
    /// What the pods serving DNS answer: the Services and published pods as they are now.
    zone: Zone,
    /// When the previous `observe` step of each verdict read the agent's flows (Unix
    /// milliseconds): the next one of that verdict judges the flows reported since.
    observed_until_unix_ms: HashMap<ObservedVerdict, u64>,
}

async fn run_scenario(
    index: usize,
    scenario: &Scenario,
    plan: &Plan,
    options: &Options,
) -> Outcome {
    let started = Instant::now();
    let progress = Progress {
        tag: format!("[{index}]"),
        verbose: options.verbose,
        color: std::io::stdout().is_terminal(),
    };
    progress.line(&format!(
        "scenario {} ({})",
        scenario.name,
        scenario.path.display()
    ));
    let (workspace, mut run) = match prepare(index, scenario, options, progress).await {
        Ok(prepared) => prepared,
        Err(detail) => {
            return Outcome {
                elapsed: started.elapsed(),
                ..Outcome::failed(scenario.name.clone(), detail)
            };
        }
    };
    let (findings, played) = driver::play(&mut run, scenario, plan).await;
    run.failures.extend(findings);
    if let Err(error) = played {
        run.failures.push(format!("error: {error}"));
    }
    let verdict = if run.failures.is_empty() {
        Verdict::Pass
    } else {
        Verdict::Fail
    };
    let agent_log_tail = (verdict == Verdict::Fail && options.agent.is_some())
        .then(|| log_tail(&workspace.log, LOG_TAIL_LINES));
    let restart_latencies = std::mem::take(&mut run.restart_latencies);
    let (latencies, failures) = run.teardown().await;
    drop(workspace);
    Outcome {
        name: scenario.name.clone(),
        verdict,
        details: failures,
        agent_log_tail,
        latencies,
        restart_latencies,
        elapsed: started.elapsed(),
    }
}

/// The scenario's workspace and node, and the run that drives them: nothing wired or started
/// yet ([`Driver::set_up`] does that).
async fn prepare<'a>(
    index: usize,
    scenario: &'a Scenario,
    options: &Options,
    progress: Progress,
) -> Result<(Workspace, ScenarioRun<'a>), String> {
    let workspace = Workspace::create(index).map_err(|error| error.to_string())?;
    let prefix = format!("{NETNS_PREFIX}{}-{index}-", std::process::id());
    let cni = options.cni.unwrap_or(scenario.model.cni);
    let node = Node::create(&prefix, &scenario.model.ip_families, cni)
        .await
        .map_err(|error| format!("cannot create the node: {error}"))?;
    let agent_config = options.agent.as_ref().map(|binary| AgentConfig {
        binary: binary.clone(),
        manifests: workspace.manifests.clone(),
        bpffs: workspace.bpffs.clone(),
        status_file: workspace.status_file.clone(),
        log: workspace.log.clone(),
        extra_args: scenario.agent_args.clone(),
        authz_socket: workspace.authz_socket.clone(),
        observe_socket: workspace.observe_socket.clone(),
    });
    let run = ScenarioRun {
        scenario,
        progress,
        writer: ManifestWriter::new(&workspace.manifests),
        node,
        live: IndexMap::new(),
        addresses: HashMap::new(),
        namespaces: scenario.model.namespaces.clone(),
        policies: BTreeSet::new(),
        agent_config,
        agent: None,
        watcher: None,
        flows: HashMap::new(),
        flow_ends: HashMap::new(),
        latencies: Vec::new(),
        restart_latencies: Vec::new(),
        failures: Vec::new(),
        mtls: MtlsState::new(workspace.authz_socket.clone()),
        services: scenario.uses_services().then(|| {
            (
                ServiceRegistry::new(&scenario.model.ip_families),
                KubeProxy::new(scenario.model.kube_proxy, &scenario.model.ip_families),
            )
        }),
        zone: Zone::default(),
        observed_until_unix_ms: HashMap::new(),
    };
    Ok((workspace, run))
}

impl ScenarioRun<'_> {
    /// Wires the model, writes its objects, then starts the agent and waits for it.
    async fn build_model(&mut self) -> Result<(), StepError> {
        let model = &self.scenario.model;
        for (key, pod) in &model.pods {
            self.add_endpoint(key, Some(pod.clone()), None).await?;
        }
        for host in &model.external_hosts {
            self.add_endpoint(host, None, None).await?;
        }
        for (name, labels) in &model.namespaces {
            self.writer.namespace(name, labels)?;
        }
        for live in self.live.values_mut() {
            if let Some(pod) = &live.pod {
                self.writer.pod(pod, &live.endpoint.addresses)?;
                live.published = true;
            }
        }
        self.sync_services().await?;
        if let Some(config) = &self.agent_config {
            self.watcher = Some(StatusWatcher::new(&config.status_file)?);
            let agent = Agent::start(config, self.node.netns())?;
            self.progress
                .line(&format!("agent started, pid {}", agent.pid()));
            self.agent = Some(agent);
            self.converge(None).await?;
        }
        Ok(())
    }

    async fn add_endpoint(
        &mut self,
        key: &str,
        pod: Option<PodSpec>,
        reuse: Option<Addresses>,
    ) -> Result<(), StepError> {
        let kind = if pod.is_some() {
            EndpointKind::Pod
        } else {
            EndpointKind::External
        };
        let endpoint = self.node.wire(kind, reuse).await?;
        if let (Some(pod), Some((registry, _))) = (&pod, &mut self.services)
            && self.scenario.model.per_pod_services
        {
            registry.create(ServiceSpec::per_pod(pod))?;
        }
        let ports = pod
            .as_ref()
            .map_or(&self.scenario.model.default_ports, |pod| &pod.ports);
        // Only model pods serve DNS: `dns: true` is a field of the model.
        let dns =
            (pod.is_some() && self.scenario.model.dns_pods.contains(key)).then_some(&self.zone);
        let servers = servers::start(&endpoint.netns, key, &endpoint.addresses, ports, dns)?;
        self.progress.line(&format!(
            "  {key}: {} via {}",
            endpoint.addresses, endpoint.host_interface
        ));
        self.addresses.insert(key.to_owned(), endpoint.addresses);
        self.live.insert(
            key.to_owned(),
            Live {
                endpoint,
                servers,
                pod,
                published: false,
            },
        );
        Ok(())
    }

    /// Sends a datagram from `from` to `to` with a forged (or, for `own`, the true) source
    /// address, over every family of the model; each must meet `expect`.
    async fn spoof_datagram(
        &self,
        At { number, step }: At<'_>,
        (from, to): (&str, &str),
        claim: &Claim<'_>,
        expect: Delivery,
    ) -> Result<Findings, StepError> {
        let mut findings = Findings::new();
        for family in self.scenario.model.ip_families.clone() {
            let sender = &self.live[from].endpoint;
            let receiver = &self.live[to].endpoint;
            let claimed = match claim.source {
                SpoofedSource::Own => &sender.addresses,
                SpoofedSource::Endpoint(endpoint) => &self.addresses[endpoint.as_str()],
            };
            let (Some(claimed), Some(destination)) =
                (claimed.get(family), receiver.addresses.get(family))
            else {
                continue;
            };
            let framing = match claim.frame_tags {
                None => crafted::Framing::RawIp,
                Some(tags) => crafted::Framing::Frame {
                    tags,
                    gateway: crafted::interface_mac(self.node.netns(), &sender.host_interface)
                        .map_err(StepError::Crafted)?,
                },
            };
            let arrived = crafted::spoofed_datagram_arrives(
                (&sender.netns, claimed),
                &receiver.netns,
                destination,
                framing,
            )
            .await
            .map_err(StepError::Crafted)?;
            let outcome = if arrived { "delivered" } else { "dropped" };
            self.progress
                .line(&format!("  {family}: from {claimed}: {outcome}"));
            if arrived != (expect == Delivery::Delivered) {
                findings.push(format!(
                    "step {number} {step}: {family} datagram claiming {claimed} was {outcome}"
                ));
            }
        }
        Ok(findings)
    }

    /// Sends a "fragmentation needed" / "packet too big" error from the connection's server to
    /// its client, quoting a packet of the connection or of an unrelated flow.
    async fn send_icmp_error(
        &self,
        At { number, step }: At<'_>,
        connection: &str,
        quote: Quote,
        expect: Delivery,
    ) -> Result<Findings, StepError> {
        let flow = &self.flows[connection];
        let (client, server) = &self.flow_ends[connection];
        let mut quoted = QuotedPacket {
            client: flow.local,
            server: flow.remote,
            tcp: flow.protocol == Protocol::Tcp,
        };
        if quote == Quote::Unrelated {
            // The discard port: no flow of the harness ever uses it as a source.
            quoted.client.set_port(9);
        }
        let arrived = crafted::icmp_error_arrives(
            &self.live[server.as_str()].endpoint.netns,
            &self.live[client.as_str()].endpoint.netns,
            quoted,
        )
        .await
        .map_err(StepError::Crafted)?;
        let outcome = if arrived { "delivered" } else { "dropped" };
        self.progress.line(&format!("  the error was {outcome}"));
        let mut findings = Findings::new();
        if arrived != (expect == Delivery::Delivered) {
            findings.push(format!(
                "step {number} {step}: the ICMP error was {outcome}"
            ));
        }
        Ok(findings)
    }

    fn register_service(&mut self, key: &str) -> Result<(), StepError> {
        let spec = self.scenario.services[key].clone();
        let (registry, _) = self.services.as_mut().expect("the scenario has services");
        let created = registry.create(spec)?;
        let ports: Vec<String> = created
            .spec
            .ports
            .iter()
            .map(|port| match port.node_port {
                Some(node_port) => {
                    format!("{}/{} (node port {node_port})", port.protocol, port.port)
                }
                None => format!("{}/{}", port.protocol, port.port),
            })
            .collect();
        self.progress.line(&format!(
            "  {key}: {} {}",
            created.cluster_ips,
            ports.join(", ")
        ));
        Ok(())
    }

    /// Rewrites the Service and `EndpointSlice` objects from the pods that exist now, and
    /// reprograms kube-proxy's rules and the cluster DNS's names from them.
    async fn sync_services(&mut self) -> Result<(), StepError> {
        let pods: Vec<PodEndpoint<'_>> = self
            .live
            .values()
            .filter(|live| live.published)
            .filter_map(|live| {
                Some(PodEndpoint {
                    spec: live.pod.as_ref()?,
                    addresses: &live.endpoint.addresses,
                })
            })
            .collect();
        let Some((registry, kube_proxy)) = &mut self.services else {
            self.zone.update([], &pods);
            return Ok(());
        };
        self.zone.update(registry.services(), &pods);
        let slices = registry.sync(&self.writer, &pods)?;
        let services: Vec<&services::Service> = registry.services().collect();
        kube_proxy
            .program(self.node.netns(), &services, &slices)
            .await?;
        Ok(())
    }

    /// Where a probe from any client reaches `server` (`key`) in `family`: its own address, or
    /// its per-pod Service's `ClusterIP` (external hosts have no Service).
    fn probe_destination(
        &self,
        key: &str,
        server: &Live,
        family: IpFamily,
        via: ProbeVia,
    ) -> Option<std::net::IpAddr> {
        let spec = server.pod.as_ref();
        match (via, spec, &self.services) {
            (ProbeVia::Service, Some(spec), Some((registry, _))) => {
                let service = registry.get(&format!(
                    "{}/{}",
                    spec.namespace,
                    services::per_pod_name(&spec.namespace, &spec.name)
                ));
                debug_assert!(service.is_some(), "{key} has a per-pod Service");
                service?.cluster_ips.get(family)
            }
            _ => server.endpoint.addresses.get(family),
        }
    }

    /// Dials a Service once per family of the model; each must meet the expectation.
    async fn dial_service(&self, At { number, step }: At<'_>, dial: &Dial) -> Findings {
        let mut findings = Findings::new();
        let mut outcome = self.dial_once(dial).await;
        let wanted = dial.expect == Reachability::Allowed;
        let meets = |answers: &DialAnswers| answers.wrong.is_empty() && answers.reached() == wanted;
        let retried = outcome.iter().any(|(_, answers)| !meets(answers));
        if retried {
            tokio::time::sleep(RETRY_PAUSE).await;
            outcome = self.dial_once(dial).await;
        }
        for (what, answers) in outcome {
            let verdict = answers.to_string();
            self.progress.line(&format!("  {what}: {verdict}"));
            if !meets(&answers) {
                let retry_note = if retried { " (retried once)" } else { "" };
                findings.push(format!(
                    "step {number} {step}{retry_note}: {what} was {verdict}"
                ));
            }
        }
        findings
    }

    /// `dial.attempts` connections per family: a description of what was dialled and what
    /// answered.
    async fn dial_once(&self, dial: &Dial) -> Vec<(String, DialAnswers)> {
        let (registry, _) = self.services.as_ref().expect("validated: services exist");
        let service = registry
            .get(&dial.service)
            .expect("validated: the service exists");
        let (namespace, _) = dial.service.split_once('/').expect("validated");
        let answerers: Vec<String> = dial.answered_only_by.clone().unwrap_or_else(|| {
            self.live
                .iter()
                .filter(|(_, live)| {
                    live.pod
                        .as_ref()
                        .is_some_and(|pod| pod.namespace == namespace)
                })
                .map(|(key, _)| key.clone())
                .collect()
        });
        let (client_netns, client_addresses) = if dial.from == NODE_CLIENT {
            (self.node.netns(), self.node.addresses())
        } else {
            let client = &self.live[dial.from.as_str()].endpoint;
            (&client.netns, client.addresses)
        };
        let mut outcome = Vec::new();
        for family in &self.scenario.model.ip_families {
            let Some(source) = client_addresses.get(*family) else {
                continue;
            };
            let destination = match dial.via {
                DialVia::ClusterIp => service
                    .cluster_ips
                    .get(*family)
                    .map(|ip| SocketAddr::new(ip, dial.port)),
                DialVia::NodePort => service
                    .port(dial.port, dial.protocol)
                    .and_then(|port| port.node_port)
                    .zip(self.node.addresses().get(*family))
                    .map(|(node_port, ip)| SocketAddr::new(ip, node_port)),
            };
            let Some(destination) = destination else {
                continue;
            };
            let client = Client {
                netns: client_netns,
                address: source,
            };
            let server = Server {
                address: destination,
                answerer: Answerer::AnyOf(&answerers),
            };
            let mut answers = DialAnswers::default();
            for _ in 0..dial.attempts {
                let attempt = match dial.source_port {
                    Some(port) => probe::dial_tcp_from_port(client, server, port).await,
                    None => probe::dial(client, server, dial.protocol).await,
                };
                match attempt {
                    Ok(()) => answers.answered += 1,
                    Err(DialError::WrongAnswer(answer)) => answers.wrong.push(answer),
                    Err(_) => answers.blocked += 1,
                }
            }
            outcome.push((format!("{family} {destination}"), answers));
        }
        outcome
    }

    /// Asks the DNS Service once per family of the model; each answer must meet the
    /// expectation. Retried once after a short wait, as dials are.
    async fn resolve_name(&self, At { number, step }: At<'_>, resolve: &Resolve) -> Findings {
        let mut findings = Findings::new();
        let mut outcome = self.resolve_once(resolve).await;
        let retried = outcome
            .iter()
            .any(|(_, got)| !dns::meets(resolve.expect, got));
        if retried {
            tokio::time::sleep(RETRY_PAUSE).await;
            outcome = self.resolve_once(resolve).await;
        }
        for (what, got) in outcome {
            let text = match &got {
                Ok(answer) => answer.to_string(),
                Err(error) => format!("blocked ({error})"),
            };
            self.progress.line(&format!("  {what}: {text}"));
            if !dns::meets(resolve.expect, &got) {
                let retry_note = if retried { " (retried once)" } else { "" };
                findings.push(format!("step {number} {step}{retry_note}: {what}: {text}"));
            }
        }
        findings
    }

    /// One query per family: what was asked and what came back.
    async fn resolve_once(
        &self,
        resolve: &Resolve,
    ) -> Vec<(String, Result<dns::Answer, dns::ResolveError>)> {
        let (registry, _) = self.services.as_ref().expect("validated: services exist");
        let service = registry
            .get(&resolve.server)
            .expect("validated: the service exists");
        let name = dns::parse_name(&resolve.name).expect("validated: a DNS name");
        let kind = dns::query_type(resolve.expect);
        let client = &self.live[resolve.from.as_str()].endpoint;
        let mut outcome = Vec::new();
        for family in &self.scenario.model.ip_families {
            let (Some(_), Some(ip)) = (
                client.addresses.get(*family),
                service.cluster_ips.get(*family),
            ) else {
                continue;
            };
            let server = SocketAddr::new(ip, dns::SERVICE_PORT);
            let got = dns::resolve(&client.netns, server, resolve.protocol, &name, kind).await;
            outcome.push((
                format!("{kind} over {family} {} {server}", resolve.protocol),
                got,
            ));
        }
        outcome
    }

    fn write_policy_file(&mut self, key: &str) -> Result<(), StepError> {
        let object = &self.scenario.policies[key];
        let primary = self.scenario.model.primary_family();
        let addresses = &self.addresses;
        let rendered = placeholder::substitute_value(object, &mut |found| {
            let target = addresses
                .get(found.target())
                .ok_or_else(|| PlaceholderError::Unknown(found.to_string()))?;
            found.render(primary, target.v4, target.v6)
        })?;
        let identity = scenario::policy_identity(key);
        self.writer.policy_by_identity(identity, &rendered)?;
        self.policies.insert(identity.to_owned());
        Ok(())
    }

    fn delete_policy_file(&mut self, identity: &str) -> Result<(), StepError> {
        self.writer.delete_policy_by_identity(identity)?;
        self.policies.remove(identity);
        Ok(())
    }

    fn rewrite_labels(
        &mut self,
        pod_labels: &IndexMap<String, Labels>,
        namespace_labels: &IndexMap<String, Labels>,
    ) -> Result<(), StepError> {
        for (namespace, labels) in namespace_labels {
            let labels = scenario::namespace_labels(namespace, labels);
            self.writer.namespace(namespace, &labels)?;
            self.namespaces.insert(namespace.clone(), labels);
        }
        for (key, labels) in pod_labels {
            let live = self.live.get_mut(key).expect("validated: the pod exists");
            let pod = live.pod.as_mut().expect("validated: a pod, not a host");
            pod.labels.clone_from(labels);
            if live.published {
                self.writer.pod(pod, &live.endpoint.addresses)?;
            }
        }
        Ok(())
    }

    fn publish(&mut self, key: &str) -> Result<(), StepError> {
        let live = self.live.get_mut(key).expect("validated: the pod exists");
        self.writer.pod(
            live.pod.as_ref().expect("validated: a pod"),
            &live.endpoint.addresses,
        )?;
        live.published = true;
        Ok(())
    }

    /// Stops the agent and starts a new one (the capabilities leave the step out without an
    /// agent).
    async fn replace_agent(&mut self, mode: RestartMode) -> Result<(), StepError> {
        let (Some(config), Some(agent)) = (&self.agent_config, self.agent.take()) else {
            return Ok(());
        };
        let signal = match mode {
            RestartMode::Graceful => Signal::SIGTERM,
            RestartMode::Kill => Signal::SIGKILL,
        };
        let old_pid = agent.pid();
        let exit = agent.stop(signal).await?;
        let agent = Agent::start(config, self.node.netns())?;
        self.progress.line(&format!(
            "  agent {old_pid} stopped ({exit}); agent {} started",
            agent.pid()
        ));
        self.agent = Some(agent);
        Ok(())
    }

    /// Waits until the agent reports the current manifests applied and every pod attached.
    async fn converge(
        &mut self,
        changed_at: Option<Instant>,
    ) -> Result<Option<Duration>, StepError> {
        let (Some(config), Some(agent), Some(watcher)) = (
            &self.agent_config,
            self.agent.as_mut(),
            self.watcher.as_mut(),
        ) else {
            return Ok(None);
        };
        let pods = || self.live.values().filter(|live| live.pod.is_some());
        let wanted = Wanted {
            pid: agent.pid(),
            digest: netwarden_model::ManifestDir::digest_of(&config.manifests)?,
            ready: pods()
                .filter(|live| live.published)
                .map(|live| live.endpoint.host_interface.clone())
                .collect(),
            attached: pods()
                .filter(|live| !live.published)
                .map(|live| live.endpoint.host_interface.clone())
                .collect(),
        };
        let status = watcher.wait_for(agent, &wanted).await?;
        let latency = changed_at.map(|at| at.elapsed());
        let mut line = format!("  applied: generation {}", status.generation);
        if let Some(latency) = latency {
            let _ = write!(line, " after {:.1}ms", latency.as_secs_f64() * 1000.0);
        }
        if !status.errors.is_empty() {
            let _ = write!(line, "; agent reports: {}", status.errors.join(" | "));
        }
        self.progress.line(&line);
        Ok(latency)
    }

    async fn open_flow(
        &self,
        from: &str,
        to: &str,
        port: u16,
        protocol: Protocol,
        via: ProbeVia,
    ) -> Result<Flow, DialError> {
        let family = self.scenario.model.primary_family();
        let client = &self.live[from].endpoint;
        let (Some(source), Some(destination)) = (
            client.addresses.get(family),
            self.probe_destination(to, &self.live[to], family, via),
        ) else {
            unreachable!(
                "every endpoint, and every pod's per-pod Service, has an address in the primary family"
            )
        };
        Flow::open(
            Client {
                netns: &client.netns,
                address: source,
            },
            Server {
                address: SocketAddr::new(destination, port),
                answerer: Answerer::Exactly(to),
            },
            protocol,
        )
        .await
    }

    /// Dials every cell of every family at once.
    async fn observe(&self, port: u16, protocol: Protocol, via: ProbeVia) -> Vec<ObservedGrid> {
        let families = &self.scenario.model.ip_families;
        let endpoints: Vec<(&String, &Live)> = self.live.iter().collect();
        let size = endpoints.len();
        let mut dials = Vec::new();
        for (family_index, family) in families.iter().enumerate() {
            for (row, (_, client)) in endpoints.iter().enumerate() {
                for (column, (identity, server)) in endpoints.iter().enumerate() {
                    // Hosts outside the cluster have no route to ClusterIPs (and kube-proxy
                    // would masquerade them if they had): they keep dialling pod addresses.
                    let via = if client.pod.is_some() {
                        via
                    } else {
                        ProbeVia::Pod
                    };
                    let (Some(source), Some(destination)) = (
                        client.endpoint.addresses.get(*family),
                        self.probe_destination(identity, server, *family, via),
                    ) else {
                        continue;
                    };
                    if row == column {
                        continue;
                    }
                    dials.push(async move {
                        let reached = probe::dial(
                            Client {
                                netns: &client.endpoint.netns,
                                address: source,
                            },
                            Server {
                                address: SocketAddr::new(destination, port),
                                answerer: Answerer::Exactly(identity),
                            },
                            protocol,
                        )
                        .await
                        .is_ok();
                        (family_index, row, column, reached)
                    });
                }
            }
        }
        let mut grids: Vec<ObservedGrid> = families
            .iter()
            .map(|family| ObservedGrid {
                family: *family,
                reached: vec![vec![Some(false); size]; size],
            })
            .collect();
        for grid in &mut grids {
            for (index, row) in grid.reached.iter_mut().enumerate() {
                row[index] = None;
            }
        }
        for (family_index, row, column, reached) in join_all(dials).await {
            grids[family_index].reached[row][column] = Some(reached);
        }
        grids
    }

    async fn probe_grid(&self, At { number, step }: At<'_>) -> Findings {
        let &Step::Probe {
            port,
            protocol,
            expect: ref expected,
            via,
        } = step
        else {
            unreachable!("called for probe steps only")
        };
        let order: Vec<&String> = self.live.keys().collect();
        assert!(
            order.iter().copied().eq(&expected.endpoints),
            "validation keeps the grid order in step with the pods"
        );
        let started = Instant::now();
        let mut observed = self.observe(port, protocol, via).await;
        let mut differing = report::mismatches(expected, &observed);
        let retried = !differing.is_empty();
        if retried {
            tokio::time::sleep(RETRY_PAUSE).await;
            observed = self.observe(port, protocol, via).await;
            differing = report::mismatches(expected, &observed);
        }
        if self.progress.verbose {
            let mut text = String::new();
            for grid in &observed {
                let title = format!(
                    "  {protocol}/{port} over {}: {:.2}s{}{}",
                    grid.family,
                    started.elapsed().as_secs_f64(),
                    if retried { ", retried" } else { "" },
                    if differing.iter().any(|cell| cell.family == grid.family) {
                        ", DIFFERS (! marks cells)"
                    } else {
                        ", as expected"
                    },
                );
                text.push_str(&report::render_grid(
                    &title,
                    expected,
                    grid,
                    self.progress.color,
                ));
            }
            self.progress.block(&text);
        }
        let mut findings = Findings::new();
        if differing.is_empty() {
            return findings;
        }
        let retry_note = if retried { " (retried once)" } else { "" };
        findings.push(format!(
            "step {number} {step}{retry_note}: {} cell(s) differ",
            differing.len()
        ));
        for cell in differing {
            findings.push(format!(
                "  {} -> {}: expected {}, got {} ({})",
                cell.row,
                cell.column,
                report::cell(cell.expected),
                report::cell(cell.got),
                cell.family
            ));
        }
        findings
    }

    /// Stops the agent, then removes every namespace; returns the latencies and failures.
    async fn teardown(mut self) -> (Vec<Duration>, Vec<String>) {
        self.flows.clear();
        if let Some(agent) = self.agent.take() {
            match agent.stop(Signal::SIGTERM).await {
                Ok(exit) => self.progress.line(&format!("agent stopped ({exit})")),
                Err(error) => self
                    .failures
                    .push(format!("cannot stop the agent: {error}")),
            }
        }
        self.watcher = None;
        for (key, live) in self.live.drain(..) {
            drop(live.servers);
            if let Err(error) = self.node.unwire(live.endpoint).await {
                self.progress
                    .line(&format!("cannot delete the namespace of {key}: {error}"));
            }
        }
        if let Err(error) = self.node.delete().await {
            self.progress
                .line(&format!("cannot delete the node namespace: {error}"));
        }
        (self.latencies, self.failures)
    }
}

/// What the simulated node can run: everything, but IPv6 on a kernel without it; without an
/// agent, the steps about the agent are left out.
#[derive(Clone, Copy, Debug)]
pub struct NetnsCapabilities {
    /// Whether an agent runs beside the harness.
    pub agent: bool,
    /// Whether this kernel has IPv6.
    pub ipv6: bool,
}

impl Capabilities for NetnsCapabilities {
    fn unsupported_model(&self, scenario: &Scenario) -> Option<String> {
        (scenario.model.has(IpFamily::IPv6) && !self.ipv6)
            .then(|| "the model needs IPv6, which this kernel lacks".to_owned())
    }

    fn supports(&self, step: &Step) -> Support {
        match step {
            Step::RestartAgent { .. }
            | Step::ExpectAgentLog(_)
            | Step::Observe(_)
            | Step::Explain(_)
                if !self.agent =>
            {
                Support::Skip("no agent runs (--no-agent)".to_owned())
            }
            _ => Support::Play,
        }
    }
}

impl Driver for ScenarioRun<'_> {
    type Error = StepError;

    fn begin_step(&mut self, At { number, step }: At<'_>, left_out: Option<&str>) {
        self.progress.line(&format!("step {number}: {step}"));
        if let Some(reason) = left_out {
            self.progress.line(&format!("  left out: {reason}"));
        }
    }

    async fn set_up(&mut self) -> Result<(), StepError> {
        self.build_model().await
    }

    async fn write_policy(&mut self, policy: &str) -> Result<(), StepError> {
        self.write_policy_file(policy)
    }

    async fn delete_policy(&mut self, policy: &str) -> Result<(), StepError> {
        self.delete_policy_file(scenario::policy_identity(policy))
    }

    async fn delete_all_policies(&mut self, namespaces: &[String]) -> Result<(), StepError> {
        let doomed: Vec<String> = self
            .policies
            .iter()
            .filter(|identity| {
                identity
                    .split_once('/')
                    .is_some_and(|(namespace, _)| namespaces.iter().any(|n| n == namespace))
            })
            .cloned()
            .collect();
        for identity in doomed {
            self.delete_policy_file(&identity)?;
        }
        Ok(())
    }

    async fn relabel(
        &mut self,
        pod_labels: &IndexMap<String, Labels>,
        namespace_labels: &IndexMap<String, Labels>,
    ) -> Result<(), StepError> {
        self.rewrite_labels(pod_labels, namespace_labels)
    }

    async fn add_pod(&mut self, new: NewPod<'_>) -> Result<(), StepError> {
        let (namespace, name) = scenario::split_pod_key(new.key).expect("validated");
        let spec = PodSpec {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            labels: new.labels.clone(),
            ports: new
                .ports
                .unwrap_or(&self.scenario.model.default_ports)
                .to_vec(),
            identity: crate::mtls::PodIdentity::default(),
        };
        let reuse = new
            .reuse_ip_of
            .and_then(|old| self.addresses.get(old).copied());
        self.add_endpoint(new.key, Some(spec), reuse).await?;
        if new.publish {
            self.publish(new.key)?;
        }
        Ok(())
    }

    async fn publish_pod(&mut self, pod: &str) -> Result<(), StepError> {
        self.publish(pod)
    }

    async fn delete_pod(&mut self, pod: &str) -> Result<(), StepError> {
        let live = self
            .live
            .shift_remove(pod)
            .expect("validated: the pod exists");
        if live.published {
            let spec = live.pod.as_ref().expect("validated: a pod, not a host");
            self.writer.delete_pod(&spec.namespace, &spec.name)?;
        }
        drop(live.servers);
        self.node.unwire(live.endpoint).await?;
        if let (Some(spec), Some((registry, _))) = (&live.pod, &mut self.services) {
            registry.delete(&format!(
                "{}/{}",
                spec.namespace,
                services::per_pod_name(&spec.namespace, &spec.name)
            ));
        }
        Ok(())
    }

    async fn create_service(&mut self, service: &str) -> Result<(), StepError> {
        self.register_service(service)
    }

    async fn delete_service(&mut self, service: &str) -> Result<(), StepError> {
        let (registry, _) = self.services.as_mut().expect("the scenario has services");
        registry.delete(service);
        Ok(())
    }

    async fn restart_agent(&mut self, mode: RestartMode) -> Result<(), StepError> {
        self.replace_agent(mode).await
    }

    async fn settle(&mut self, change: Change) -> Result<(), StepError> {
        // kube-proxy follows the API before the agent is waited for, as on a node where both
        // watch the same objects.
        self.sync_services().await?;
        // The change is on disk (or in the namespaces) now: the latency clock starts.
        let latency = self.converge(Some(Instant::now())).await?;
        // A restart measures the new agent's start (loading programs against the pinned maps),
        // not an apply: it is reported on a line of its own.
        let bucket = match change {
            Change::Objects => &mut self.latencies,
            Change::AgentRestart => &mut self.restart_latencies,
        };
        bucket.extend(latency);
        Ok(())
    }

    async fn probe(&mut self, at: At<'_>) -> Result<Findings, StepError> {
        Ok(self.probe_grid(at).await)
    }

    async fn dial(&mut self, at: At<'_>, dial: &Dial) -> Result<Findings, StepError> {
        Ok(self.dial_service(at, dial).await)
    }

    async fn resolve(&mut self, at: At<'_>, resolve: &Resolve) -> Result<Findings, StepError> {
        Ok(self.resolve_name(at, resolve).await)
    }

    async fn open_connection(
        &mut self,
        name: &str,
        (from, to): (&str, &str),
        port: u16,
        protocol: Protocol,
        via: ProbeVia,
    ) -> Result<(), StepError> {
        let flow = self
            .open_flow(from, to, port, protocol, via)
            .await
            .map_err(|source| StepError::Open {
                name: name.to_owned(),
                source,
            })?;
        self.flows.insert(name.to_owned(), flow);
        self.flow_ends
            .insert(name.to_owned(), (from.to_owned(), to.to_owned()));
        Ok(())
    }

    async fn check_connection(
        &mut self,
        At { number, step }: At<'_>,
        name: &str,
        expect: ConnectionExpectation,
    ) -> Result<Findings, StepError> {
        let alive = self.flows[name].check().await;
        let state = if alive { "alive" } else { "closed" };
        self.progress.line(&format!("  {name} is {state}"));
        let mut findings = Findings::new();
        if alive != (expect == ConnectionExpectation::Alive) {
            findings.push(format!("step {number} {step}: the connection is {state}"));
        }
        Ok(findings)
    }

    async fn send_spoofed(
        &mut self,
        at: At<'_>,
        spoofed: Spoofed<'_>,
    ) -> Result<Findings, StepError> {
        let claim = Claim {
            source: spoofed.source,
            frame_tags: spoofed.frame_tags,
        };
        self.spoof_datagram(at, (spoofed.from, spoofed.to), &claim, spoofed.expect)
            .await
    }

    async fn icmp_error(
        &mut self,
        at: At<'_>,
        connection: &str,
        quote: Quote,
        expect: Delivery,
    ) -> Result<Findings, StepError> {
        self.send_icmp_error(at, connection, quote, expect).await
    }

    async fn mtls_probe(
        &mut self,
        At { number, step }: At<'_>,
        probe: &MtlsProbe,
    ) -> Result<Findings, StepError> {
        let pods = pod_views(&self.live);
        let outcome = self.mtls.probe(&pods, probe).await?;
        self.progress.line(&format!("  {outcome}"));
        Ok(outcome
            .mismatch(probe.expect)
            .map(|problem| format!("step {number} {step}: {problem}"))
            .into_iter()
            .collect())
    }

    async fn identity_check(
        &mut self,
        At { number, step }: At<'_>,
        check: &IdentityCheck,
    ) -> Result<Findings, StepError> {
        let pods = pod_views(&self.live);
        let answer = self.mtls.check(&pods, check).await?;
        self.progress.line(&format!("  {answer}"));
        Ok(answer
            .mismatch(check)
            .map(|problem| format!("step {number} {step}: {problem}"))
            .into_iter()
            .collect())
    }

    async fn expect_agent_log(
        &mut self,
        At { number, step }: At<'_>,
        expect: &ExpectAgentLog,
    ) -> Result<Findings, StepError> {
        let Some(config) = &self.agent_config else {
            unreachable!("the capabilities leave it out without an agent")
        };
        let mut findings = Findings::new();
        match expect.find(&config.log).await {
            Ok(line) => self.progress.line(&format!("  found: {line}")),
            Err(problem) => findings.push(format!("step {number} {step}: {problem}")),
        }
        Ok(findings)
    }

    async fn observe_flows(
        &mut self,
        at: At<'_>,
        observe: &Observe,
    ) -> Result<Findings, StepError> {
        self.observe_and_check(at, observe).await
    }

    async fn explain_flow(&mut self, at: At<'_>, explain: &Explain) -> Result<Findings, StepError> {
        self.explain_and_check(at, explain).await
    }
}

impl ScenarioRun<'_> {
    /// Runs `netwarden observe` with the step's filters, as JSON lines to check (once more
    /// after a short wait when something is missing: the agent reads the datapath's ring
    /// asynchronously), then as the table an operator reads, which verbose runs print.
    async fn observe_and_check(
        &mut self,
        At { number, step }: At<'_>,
        observe: &Observe,
    ) -> Result<Findings, StepError> {
        let Some(config) = &self.agent_config else {
            unreachable!("the capabilities leave it out without an agent")
        };
        let since = self
            .observed_until_unix_ms
            .get(&observe.filter.verdict)
            .copied();
        let mut args = observe.filter.args();
        if let Some(since) = since {
            // `--since` counts whole seconds; the check below cuts at the millisecond.
            let seconds = observe::now_unix_ms().saturating_sub(since) / 1000 + 1;
            args.extend(["--since".to_owned(), format!("{seconds}s")]);
        }
        let addresses = |key: &str| self.addresses.get(key).copied();
        let network = Network {
            families: &self.scenario.model.ip_families,
            addresses: &addresses,
        };
        let read = || async {
            let (_, json) = observe::run_observe(
                &config.binary,
                &config.observe_socket,
                &args,
                cli::Output::Json,
            )
            .await?;
            let records = observe::parse_json_lines(&json)?;
            Ok::<_, StepError>(observe::check(observe, &network, &records, since))
        };
        let mut problems = read().await?;
        let retried = !problems.is_empty();
        if retried {
            tokio::time::sleep(RETRY_PAUSE).await;
            problems = read().await?;
        }
        let (command, table) = observe::run_observe(
            &config.binary,
            &config.observe_socket,
            &args,
            cli::Output::Text,
        )
        .await?;
        self.observed_until_unix_ms
            .insert(observe.filter.verdict, observe::now_unix_ms());
        let mut shown = format!("  $ {command}\n");
        for line in table.lines() {
            let _ = writeln!(shown, "  {line}");
        }
        let retry_note = if retried { " (read twice)" } else { "" };
        if problems.is_empty() {
            let _ = write!(
                shown,
                "  as expected{retry_note}: {} {} flow(s) reported, {} absent",
                observe.expect.len(),
                observe.filter.verdict,
                observe.absent.len()
            );
        } else {
            let _ = write!(shown, "  DIFFERS{retry_note}: see the findings");
        }
        self.progress.line(&shown);
        let mut findings = Findings::new();
        if problems.is_empty() {
            return Ok(findings);
        }
        findings.push(format!(
            "step {number} {step}{retry_note}: {} problem(s) with what `netwarden observe` reports",
            problems.len()
        ));
        findings.extend(problems.into_iter().map(|problem| format!("  {problem}")));
        Ok(findings)
    }
}

impl ScenarioRun<'_> {
    /// Asks the agent to explain the flow, and the same command offline on the agent's
    /// manifests, each as text to print (verbose runs) and as JSON to check.
    async fn explain_and_check(
        &self,
        At { number, step }: At<'_>,
        explain: &Explain,
    ) -> Result<Findings, StepError> {
        let Some(config) = &self.agent_config else {
            unreachable!("the capabilities leave it out without an agent")
        };
        let family = self.scenario.model.primary_family();
        let host = |key: &str| {
            self.addresses
                .get(key)
                .and_then(|addresses| addresses.get(family))
        };
        // Live on the agent's applied state, then offline on the very manifests it reads: one
        // implementation, which must agree with the probes either way.
        let sources = [
            ("--agent", config.observe_socket.display().to_string()),
            ("--manifests", config.manifests.display().to_string()),
        ];
        let mut findings = Findings::new();
        for (flag, source) in sources {
            let mut args = vec!["explain".to_owned(), flag.to_owned(), source];
            args.extend(explain.args(&host));
            let (command, text) = cli::run_netwarden(&config.binary, &args).await?;
            let mut shown = format!("  $ {command}\n");
            for line in text.lines() {
                let _ = writeln!(shown, "  {line}");
            }
            self.progress.line(shown.trim_end());
            args.extend(["-o".to_owned(), "json".to_owned()]);
            let (command, json) = cli::run_netwarden(&config.binary, &args).await?;
            if let Some(problem) = explain.mismatch(&json, &command)? {
                findings.push(format!("step {number} {step} ({flag}): {problem}"));
            }
        }
        Ok(findings)
    }
}

/// What a `send_spoofed` datagram claims and how it is sent.
struct Claim<'a> {
    source: &'a SpoofedSource,
    frame_tags: Option<u8>,
}

/// A simulated node with the agent, for a caller that makes its own changes and checks (the
/// soak) rather than play a scenario's steps: the scenario gives the model and the policies the
/// caller may write, [`SimulatedNode::driver`] makes the changes.
pub struct SimulatedNode<'a> {
    run: ScenarioRun<'a>,
    // Dropped after the run, whose agent and namespaces use it.
    workspace: Workspace,
}

impl<'a> SimulatedNode<'a> {
    /// Builds the node, wires the model and starts `agent`, waiting for its first apply.
    pub async fn start(
        index: usize,
        scenario: &'a Scenario,
        agent: PathBuf,
        verbose: bool,
    ) -> Result<Self, String> {
        let options = Options {
            agent: Some(agent),
            jobs: 1,
            verbose,
            through_services: None,
            cni: None,
        };
        let progress = Progress {
            tag: format!("[{index}]"),
            verbose,
            color: false,
        };
        let (workspace, run) = prepare(index, scenario, &options, progress).await?;
        let mut node = Self { run, workspace };
        if let Err(error) = node.run.set_up().await {
            let failures = node.teardown().await;
            return Err(format!("cannot set up: {error}; {}", failures.join("; ")));
        }
        Ok(node)
    }

    /// The scenario the node was built from.
    #[must_use]
    pub fn scenario(&self) -> &'a Scenario {
        self.run.scenario
    }

    /// Makes changes the way scenario steps do.
    pub fn driver(&mut self) -> &mut ScenarioRun<'a> {
        &mut self.run
    }

    /// The running agent's pid.
    #[must_use]
    pub fn agent_pid(&self) -> Option<u32> {
        self.run.agent.as_ref().map(Agent::pid)
    }

    /// The private bpffs the agent pins in.
    #[must_use]
    pub fn bpffs(&self) -> &Path {
        &self.workspace.bpffs
    }

    /// The manifest directory the agent reads.
    #[must_use]
    pub fn manifests(&self) -> &Path {
        &self.workspace.manifests
    }

    /// The agent's log file.
    #[must_use]
    pub fn log(&self) -> &Path {
        &self.workspace.log
    }

    /// The agent's status file as it is now.
    #[must_use]
    pub fn status(&self) -> Option<crate::agent::Status> {
        self.run.watcher.as_ref()?.read()
    }

    /// The node's namespace, where the agent runs.
    #[must_use]
    pub fn node_netns(&self) -> &crate::netns::Netns {
        self.run.node.netns()
    }

    /// The live pods' keys, in the order they were added.
    pub fn pods(&self) -> impl Iterator<Item = &str> {
        self.run
            .live
            .iter()
            .filter(|(_, live)| live.pod.is_some())
            .map(|(key, _)| key.as_str())
    }

    /// A live pod's addresses, or a deleted one's last addresses.
    #[must_use]
    pub fn addresses(&self, key: &str) -> Option<Addresses> {
        self.run.addresses.get(key).copied()
    }

    /// One dial from pod `from` to pod `to`'s own address in `family`: whether the right
    /// server answered within the attempt timeout.
    pub async fn reaches(
        &self,
        (from, to): (&str, &str),
        family: IpFamily,
        port: u16,
        protocol: Protocol,
    ) -> bool {
        let (Some(client), Some(server)) = (self.run.live.get(from), self.run.live.get(to)) else {
            return false;
        };
        let (Some(source), Some(destination)) = (
            client.endpoint.addresses.get(family),
            server.endpoint.addresses.get(family),
        ) else {
            return false;
        };
        probe::dial(
            Client {
                netns: &client.endpoint.netns,
                address: source,
            },
            Server {
                address: SocketAddr::new(destination, port),
                answerer: Answerer::Exactly(to),
            },
            protocol,
        )
        .await
        .is_ok()
    }

    /// Whether the connection opened as `name` still exchanges lines.
    pub async fn connection_alive(&self, name: &str) -> bool {
        match self.run.flows.get(name) {
            Some(flow) => flow.check().await,
            None => false,
        }
    }

    /// The change-to-applied latencies measured since the last call, and the restart-to-applied
    /// ones.
    pub fn take_latencies(&mut self) -> (Vec<Duration>, Vec<Duration>) {
        (
            std::mem::take(&mut self.run.latencies),
            std::mem::take(&mut self.run.restart_latencies),
        )
    }

    /// Stops the agent and removes everything; returns what went wrong doing so.
    pub async fn teardown(self) -> Vec<String> {
        let Self { run, workspace } = self;
        let (_, failures) = run.teardown().await;
        drop(workspace);
        failures
    }
}

/// What the attempts of one `dial` in one family met.
#[derive(Debug, Default)]
struct DialAnswers {
    /// Answered by a pod that may answer.
    answered: u32,
    /// Not answered in time, or refused.
    blocked: u32,
    /// Answers from a pod that may not answer (`answered_only_by`).
    wrong: Vec<String>,
}

impl DialAnswers {
    fn reached(&self) -> bool {
        self.answered > 0
    }
}

impl std::fmt::Display for DialAnswers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verdict = if self.reached() { "allowed" } else { "blocked" };
        if self.answered + self.blocked + u32::try_from(self.wrong.len()).unwrap_or(u32::MAX) > 1 {
            write!(
                f,
                "{verdict} ({} answered, {} blocked)",
                self.answered, self.blocked
            )?;
        } else {
            write!(f, "{verdict}")?;
        }
        if !self.wrong.is_empty() {
            write!(
                f,
                ", answered by a pod that may not answer: {:?}",
                self.wrong
            )?;
        }
        Ok(())
    }
}
