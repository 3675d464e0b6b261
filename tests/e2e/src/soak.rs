//! `netwarden-e2e soak`: the agent on a simulated node while a seeded random walk adds, deletes
//! and relabels pods, relabels namespaces, creates, updates and deletes NetworkPolicies and
//! ClusterNetworkPolicies, and SIGKILLs the agent now and then. After every change it waits for
//! the agent to report it applied, then dials a sample of pod pairs and compares each outcome
//! with the reference evaluator (`netwarden_policy::evaluate`) on the very manifests the agent
//! read. A few long-lived connections between pods whose policy never changes must survive
//! everything, restarts included.
//!
//! Every minute it prints the agent's RSS and open descriptors, the entries of each pinned map as
//! the kernel holds them, conntrack entries, the apply latency (p50/p99 of the agent's own
//! `netwarden_apply_duration_seconds` histogram, and of the harness's change-to-applied wait),
//! probes and disagreements. At the end it restores the initial cluster and checks that the maps
//! hold as many entries as they did before the churn, that no pin was left behind, that the
//! agent holds no more descriptors, and how fast RSS grew within each agent's life.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    fmt::{self, Write as _},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use futures::future::join_all;
use indexmap::IndexMap;
use netwarden_model::ManifestDir;
use netwarden_policy::evaluate::{self, Flow};
use serde_yaml::Value;
use socket2::{Domain, Type};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpSocket,
};

use crate::{
    driver::{Change, Driver as _, NewPod},
    kube_proxy::KubeProxyMode,
    node::{NODE_V4, NODE_V6, ipv6_supported},
    pins,
    report::percentile,
    runner::{SimulatedNode, StepError},
    scenario::{
        self, Cni, ContainerPort, IpFamily, Labels, Model, PodSpec, ProbeVia, Protocol,
        RestartMode, Scenario,
    },
};

/// Where the agent serves its metrics, inside the node's namespace.
const METRICS_ADDRESS: &str = "127.0.0.1:9464";
/// Flow records the agent keeps for `netwarden observe`: few, so that this bounded buffer is
/// full within the warm-up. With the default 4,096 it fills at the churn's ~500 verdict events
/// a minute over eight minutes or more; without restarts RSS then climbed 39.8 to 42.6 MiB over
/// ten minutes, where with 256 it stayed within 40.0-40.2 MiB from the second minute to the
/// fifth (seed 19), and the slope would take the filling for a leak.
const OBSERVE_BUFFER: &str = "256";
/// The agent's apply latency histogram, as rendered on `/metrics`.
const APPLY_BUCKET: &str = "netwarden_apply_duration_seconds_bucket";
/// Pause before the one retry of a probe that disagreed: the same as the scenario runner's.
const RETRY_PAUSE: Duration = Duration::from_millis(300);
/// How long the maps may take to match the baseline after the agent reported the restore
/// applied, and how often they are read meanwhile.
const MAPS_SETTLE: Duration = Duration::from_secs(5);
const MAPS_REREAD: Duration = Duration::from_millis(250);
/// How often the per-minute figures are taken.
const MINUTE: Duration = Duration::from_mins(1);
/// RSS samples this soon after an agent starts are left out of the slope: the allocator and
/// the caches fill up once, which is not growth (a 30-minute run with a restart every two
/// minutes and one minute left out measured +471 KiB/min within lives while the per-minute
/// RSS stayed within 38.4-40.8 MiB: the first minutes still climb).
const WARM_UP: Duration = Duration::from_mins(2);
/// Runs shorter than this have too few samples for the RSS slope to mean anything: it is
/// reported, not held to `--max-rss-slope`.
const SLOPE_HELD_FROM: Duration = Duration::from_mins(5);
/// Churn pods per namespace, at least and at most.
const MIN_PODS_PER_NAMESPACE: usize = 1;
const MAX_PODS_PER_NAMESPACE: usize = 6;
/// Initial pods per churn namespace.
const INITIAL_PODS_PER_NAMESPACE: usize = 3;
/// Churned NetworkPolicy names per namespace, and variants of each.
const POLICY_NAMES: usize = 3;
const POLICY_VARIANTS: usize = 5;
/// Churned ClusterNetworkPolicy names, and variants of each.
const CLUSTER_POLICY_NAMES: usize = 2;
const CLUSTER_POLICY_VARIANTS: usize = 4;

const STABLE_NAMESPACE: &str = "stable";
const CHURN_NAMESPACES: [&str; 3] = ["churn-a", "churn-b", "churn-c"];
const STABLE_CLIENT: &str = "stable/client";
const STABLE_SERVER: &str = "stable/server";
const STABLE_POLICY: &str = "stable/allow-client";
const APPS: [&str; 3] = ["web", "api", "db"];
const ROLES: [&str; 2] = ["x", "y"];
const TEAMS: [&str; 2] = ["red", "blue"];
/// What probes dial: every pod serves these.
const PROBED: [(u16, Protocol); 3] = [
    (80, Protocol::Tcp),
    (81, Protocol::Tcp),
    (80, Protocol::Udp),
];

/// How long the churn goes on, and how.
#[derive(Debug, clap::Args)]
pub struct SoakArgs {
    /// The agent binary [default: `netwarden` beside this executable].
    #[arg(long, value_name = "PATH")]
    pub agent: Option<PathBuf>,
    /// Churn for this many minutes.
    #[arg(long, required_unless_present = "steps", conflicts_with = "steps")]
    minutes: Option<u64>,
    /// Churn for this many steps instead (the short run CI does).
    #[arg(long)]
    steps: Option<u64>,
    /// Seeds the churn: the same seed makes the same changes in the same order.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// SIGKILL and restart the agent every this many steps (about five minutes of churn here:
    /// the RSS slope needs lives longer than their warm-up).
    #[arg(long, default_value_t = 250, value_parser = clap::value_parser!(u64).range(1..))]
    restart_every: u64,
    /// Pod pairs dialled after every step.
    #[arg(long, default_value_t = 12)]
    probes_per_step: usize,
    /// Fail when RSS grows faster than this within an agent's life (KiB/min), in runs of five
    /// minutes or more.
    #[arg(long, default_value_t = 256.0)]
    max_rss_slope: f64,
    /// Print every step.
    #[arg(long)]
    verbose: bool,
}

/// Why the soak could not go on.
#[derive(Debug, thiserror::Error)]
pub enum SoakError {
    #[error("{0}")]
    SetUp(String),
    #[error(transparent)]
    Step(#[from] StepError),
    #[error("cannot read the manifests back: {0}")]
    Manifests(#[from] netwarden_model::ManifestError),
    #[error("cannot read {what}: {source}")]
    Read {
        what: String,
        source: std::io::Error,
    },
    #[error("the agent is not running")]
    NoAgent,
}

fn read_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SoakError {
    let what = what.into();
    move |source| SoakError::Read { what, source }
}

/// Runs the soak; returns whether it passed.
pub async fn run(args: &SoakArgs, agent: PathBuf) -> Result<bool, SoakError> {
    let families = if ipv6_supported() {
        vec![IpFamily::IPv4, IpFamily::IPv6]
    } else {
        vec![IpFamily::IPv4]
    };
    let mut rng = fastrand::Rng::with_seed(args.seed);
    let scenario = soak_scenario(&mut rng, &families);
    let node = SimulatedNode::start(1, &scenario, agent, args.verbose)
        .await
        .map_err(SoakError::SetUp)?;
    let mut soak = Soak {
        args,
        node,
        families,
        rng,
        world: World::initial(&scenario),
        manifests: None,
        minute: MinuteTally::default(),
        histogram: HistogramReader::default(),
        rss: Vec::new(),
        incarnation: Incarnation::default(),
        totals: Totals::default(),
        problems: Vec::new(),
    };
    soak.manifests = Some(ManifestDir::new(soak.node.manifests()));
    let result = soak.run().await;
    let log = soak.node.log().to_owned();
    let Soak {
        node, mut problems, ..
    } = soak;
    if let Err(error) = &result {
        problems.push(format!("error: {error}"));
        println!(
            "agent log (last lines):\n{}",
            crate::agent::log_tail(&log, 30)
        );
    }
    problems.extend(node.teardown().await);
    for problem in &problems {
        println!("FAIL {problem}");
    }
    let passed = problems.is_empty();
    println!("soak: {}", if passed { "PASS" } else { "FAIL" });
    Ok(passed)
}

/// The cluster the churn starts from: a `stable` namespace whose two pods' policy never
/// changes (the long-lived connections run between them) and three churned namespaces, with
/// every policy variant the churn may write declared up front.
fn soak_scenario(rng: &mut fastrand::Rng, families: &[IpFamily]) -> Scenario {
    let mut namespaces = IndexMap::new();
    namespaces.insert(
        STABLE_NAMESPACE.to_owned(),
        scenario::namespace_labels(STABLE_NAMESPACE, &Labels::new()),
    );
    let mut pods = IndexMap::new();
    for (key, app) in [(STABLE_CLIENT, "client"), (STABLE_SERVER, "server")] {
        pods.insert(key.to_owned(), pod_spec(key, labels(&[("app", app)])));
    }
    for (index, namespace) in CHURN_NAMESPACES.iter().enumerate() {
        let team = TEAMS[index % TEAMS.len()];
        namespaces.insert(
            (*namespace).to_owned(),
            scenario::namespace_labels(namespace, &churn_namespace_labels(team)),
        );
        for pod in 0..INITIAL_PODS_PER_NAMESPACE {
            let key = format!("{namespace}/init-{pod}");
            let labels = random_pod_labels(rng);
            pods.insert(key.clone(), pod_spec(&key, labels));
        }
    }
    let mut policies = IndexMap::new();
    policies.insert(STABLE_POLICY.to_owned(), stable_policy());
    for namespace in CHURN_NAMESPACES {
        for name in 0..POLICY_NAMES {
            for variant in 0..POLICY_VARIANTS {
                let name = format!("np-{name}");
                policies.insert(
                    format!("{namespace}/{name}@v{variant}"),
                    network_policy(rng, namespace, &name),
                );
            }
        }
    }
    for name in 0..CLUSTER_POLICY_NAMES {
        for variant in 0..CLUSTER_POLICY_VARIANTS {
            let name = format!("cnp-{name}");
            policies.insert(format!("{name}@v{variant}"), cluster_policy(rng, &name));
        }
    }
    Scenario {
        path: PathBuf::from("soak"),
        name: "soak".to_owned(),
        model: Model {
            ip_families: families.to_vec(),
            namespaces,
            default_ports: served_ports(),
            pods,
            dns_pods: BTreeSet::new(),
            external_hosts: Vec::new(),
            per_pod_services: false,
            kube_proxy: KubeProxyMode::default(),
            cni: Cni::default(),
        },
        policies,
        agent_args: [
            "--metrics-address",
            METRICS_ADDRESS,
            "--observe-buffer",
            OBSERVE_BUFFER,
        ]
        .map(str::to_owned)
        .to_vec(),
        services: IndexMap::new(),
        steps: Vec::new(),
    }
}

/// What every pod serves (and names, for named ports).
fn served_ports() -> Vec<ContainerPort> {
    vec![
        port(Some("http"), 80, Protocol::Tcp),
        port(Some("alt"), 81, Protocol::Tcp),
        port(Some("udp"), 80, Protocol::Udp),
    ]
}

fn port(name: Option<&str>, number: u16, protocol: Protocol) -> ContainerPort {
    ContainerPort {
        name: name.map(str::to_owned),
        container_port: number,
        protocol,
    }
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
        .collect()
}

fn pod_spec(key: &str, labels: Labels) -> PodSpec {
    let (namespace, name) = scenario::split_pod_key(key).expect("soak keys are namespace/name");
    PodSpec {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        labels,
        ports: served_ports(),
        identity: crate::mtls::PodIdentity::default(),
    }
}

fn churn_namespace_labels(team: &str) -> Labels {
    labels(&[("churn", "yes"), ("team", team)])
}

fn pick<'a>(rng: &mut fastrand::Rng, choices: &[&'a str]) -> &'a str {
    choices[rng.usize(..choices.len())]
}

fn random_pod_labels(rng: &mut fastrand::Rng) -> Labels {
    labels(&[("app", pick(rng, &APPS)), ("role", pick(rng, &ROLES))])
}

fn yaml(value: &serde_json::Value) -> Value {
    serde_yaml::to_value(value).expect("JSON values are YAML values")
}

/// The stable pods' one policy: the server takes TCP and UDP on 80 from the client.
fn stable_policy() -> Value {
    yaml(&serde_json::json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": { "name": "allow-client", "namespace": STABLE_NAMESPACE },
        "spec": {
            "podSelector": { "matchLabels": { "app": "server" } },
            "policyTypes": ["Ingress"],
            "ingress": [{
                "from": [{ "podSelector": { "matchLabels": { "app": "client" } } }],
                "ports": [{ "protocol": "TCP", "port": 80 }, { "protocol": "UDP", "port": 80 }],
            }],
        },
    }))
}

fn pod_selector(rng: &mut fastrand::Rng) -> serde_json::Value {
    match rng.u8(..4) {
        0 => serde_json::json!({}),
        1 => serde_json::json!({ "matchLabels": { "app": pick(rng, &APPS) } }),
        2 => serde_json::json!({ "matchLabels": { "role": pick(rng, &ROLES) } }),
        _ => serde_json::json!({ "matchExpressions": [
            { "key": "app", "operator": "In", "values": [pick(rng, &APPS), pick(rng, &APPS)] },
        ] }),
    }
}

fn network_policy_peer(rng: &mut fastrand::Rng) -> serde_json::Value {
    match rng.u8(..6) {
        0 => serde_json::json!({ "podSelector": pod_selector(rng) }),
        1 => {
            serde_json::json!({ "namespaceSelector": { "matchLabels": { "team": pick(rng, &TEAMS) } } })
        }
        2 => serde_json::json!({ "namespaceSelector": { "matchLabels": {
            "kubernetes.io/metadata.name": STABLE_NAMESPACE } } }),
        3 => serde_json::json!({
            "namespaceSelector": { "matchLabels": { "team": pick(rng, &TEAMS) } },
            "podSelector": { "matchLabels": { "app": pick(rng, &APPS) } },
        }),
        4 => {
            serde_json::json!({ "ipBlock": { "cidr": "10.244.0.0/24", "except": ["10.244.0.16/28"] } })
        }
        _ => {
            serde_json::json!({ "ipBlock": { "cidr": "fd00:10:244::/120", "except": ["fd00:10:244::10/124"] } })
        }
    }
}

fn network_policy_ports(rng: &mut fastrand::Rng) -> Option<serde_json::Value> {
    match rng.u8(..6) {
        0 => None,
        1 => Some(serde_json::json!([{ "protocol": "TCP", "port": 80 }])),
        2 => Some(serde_json::json!([{ "port": "http" }])),
        3 => Some(serde_json::json!([{ "protocol": "UDP", "port": 80 }])),
        4 => Some(serde_json::json!([{ "protocol": "TCP", "port": 80, "endPort": 81 }])),
        _ => Some(serde_json::json!([{ "protocol": "UDP", "port": "udp" }, { "port": "alt" }])),
    }
}

fn network_policy_rule(rng: &mut fastrand::Rng, peers_key: &str) -> serde_json::Value {
    let mut rule = serde_json::json!({});
    let peers = rng.usize(..3);
    if peers > 0 {
        rule[peers_key] = (0..peers).map(|_| network_policy_peer(rng)).collect();
    }
    if let Some(ports) = network_policy_ports(rng) {
        rule["ports"] = ports;
    }
    rule
}

fn network_policy(rng: &mut fastrand::Rng, namespace: &str, name: &str) -> Value {
    let types: &[&str] = match rng.u8(..3) {
        0 => &["Ingress"],
        1 => &["Egress"],
        _ => &["Ingress", "Egress"],
    };
    let mut spec = serde_json::json!({ "podSelector": pod_selector(rng), "policyTypes": types });
    if types.contains(&"Ingress") {
        spec["ingress"] = (0..rng.usize(..3))
            .map(|_| network_policy_rule(rng, "from"))
            .collect();
    }
    if types.contains(&"Egress") {
        spec["egress"] = (0..rng.usize(..3))
            .map(|_| network_policy_rule(rng, "to"))
            .collect();
    }
    yaml(&serde_json::json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": { "name": name, "namespace": namespace },
        "spec": spec,
    }))
}

/// A ClusterNetworkPolicy whose subject is always in the churned namespaces: the stable pods'
/// policy never changes.
fn cluster_policy(rng: &mut fastrand::Rng, name: &str) -> Value {
    let admin = rng.bool();
    let subject = match rng.u8(..3) {
        0 => serde_json::json!({ "namespaces": { "matchLabels": { "churn": "yes" } } }),
        1 => serde_json::json!({ "namespaces": { "matchLabels": { "team": pick(rng, &TEAMS) } } }),
        _ => serde_json::json!({ "pods": {
            "namespaceSelector": { "matchLabels": { "churn": "yes" } },
            "podSelector": { "matchLabels": { "app": pick(rng, &APPS) } },
        } }),
    };
    let rule = |rng: &mut fastrand::Rng, egress: bool| {
        let actions: &[&str] = if admin {
            &["Accept", "Deny", "Pass"]
        } else {
            &["Accept", "Deny"]
        };
        let peer = match rng.u8(..if egress { 4 } else { 3 }) {
            0 => {
                serde_json::json!({ "namespaces": { "matchLabels": { "team": pick(rng, &TEAMS) } } })
            }
            1 => serde_json::json!({ "namespaces": { "matchLabels": {
                "kubernetes.io/metadata.name": STABLE_NAMESPACE } } }),
            2 => serde_json::json!({ "pods": {
                "namespaceSelector": {},
                "podSelector": { "matchLabels": { "app": pick(rng, &APPS) } },
            } }),
            _ => serde_json::json!({ "networks": ["10.244.0.0/25", "fd00:10:244::/121"] }),
        };
        let mut rule = serde_json::json!({ "action": pick(rng, actions) });
        rule[if egress { "to" } else { "from" }] = serde_json::json!([peer]);
        match rng.u8(..3) {
            0 => {}
            1 => {
                rule["protocols"] =
                    serde_json::json!([{ "tcp": { "destinationPort": { "number": 80 } } }]);
            }
            _ => {
                rule["protocols"] =
                    serde_json::json!([{ "udp": { "destinationPort": { "number": 80 } } }]);
            }
        }
        rule
    };
    let ingress: Vec<serde_json::Value> = (0..rng.usize(..3)).map(|_| rule(rng, false)).collect();
    let egress: Vec<serde_json::Value> = (0..rng.usize(..3)).map(|_| rule(rng, true)).collect();
    yaml(&serde_json::json!({
        "apiVersion": scenario::CLUSTER_NETWORK_POLICY_API_VERSION,
        "kind": "ClusterNetworkPolicy",
        "metadata": { "name": name },
        "spec": {
            "tier": if admin { "Admin" } else { "Baseline" },
            "priority": rng.u16(1..100),
            "subject": subject,
            "ingress": ingress,
            "egress": egress,
        },
    }))
}

/// What the churn believes exists, beside what the runner wired: enough to pick the next
/// change and to restore the initial cluster at the end.
#[derive(Clone, Debug)]
struct World {
    /// Churned pods that exist, with their labels.
    pods: IndexMap<String, Labels>,
    /// Churned namespaces' labels (without the name label).
    namespaces: IndexMap<String, Labels>,
    /// Policy identity to the key of the variant on disk.
    policies: BTreeMap<String, String>,
    /// Deleted pods whose addresses new pods take, oldest first, as on a node whose IPAM
    /// hands addresses out again.
    free_addresses: VecDeque<String>,
    next_pod: u64,
}

impl World {
    fn initial(scenario: &Scenario) -> Self {
        let pods = scenario
            .model
            .pods
            .iter()
            .filter(|(key, _)| !key.starts_with(&format!("{STABLE_NAMESPACE}/")))
            .map(|(key, spec)| (key.clone(), spec.labels.clone()))
            .collect();
        let namespaces = CHURN_NAMESPACES
            .iter()
            .enumerate()
            .map(|(index, namespace)| {
                (
                    (*namespace).to_owned(),
                    churn_namespace_labels(TEAMS[index % TEAMS.len()]),
                )
            })
            .collect();
        let mut policies = BTreeMap::new();
        policies.insert(STABLE_POLICY.to_owned(), STABLE_POLICY.to_owned());
        for namespace in CHURN_NAMESPACES {
            policies.insert(format!("{namespace}/np-0"), format!("{namespace}/np-0@v0"));
        }
        policies.insert("cnp-0".to_owned(), "cnp-0@v0".to_owned());
        Self {
            pods,
            namespaces,
            policies,
            free_addresses: VecDeque::new(),
            next_pod: 0,
        }
    }

    fn pods_in(&self, namespace: &str) -> Vec<String> {
        self.pods
            .keys()
            .filter(|key| key.starts_with(&format!("{namespace}/")))
            .cloned()
            .collect()
    }

    /// Every policy identity the churn may write, namespaced and cluster-wide.
    fn churned_identities() -> Vec<String> {
        let mut identities = Vec::new();
        for namespace in CHURN_NAMESPACES {
            for name in 0..POLICY_NAMES {
                identities.push(format!("{namespace}/np-{name}"));
            }
        }
        for name in 0..CLUSTER_POLICY_NAMES {
            identities.push(format!("cnp-{name}"));
        }
        identities
    }
}

fn variants_of(identity: &str) -> usize {
    if identity.contains('/') {
        POLICY_VARIANTS
    } else {
        CLUSTER_POLICY_VARIANTS
    }
}

/// One change of the churn.
#[derive(Clone, Debug)]
enum ChurnStep {
    AddPod {
        key: String,
        labels: Labels,
        reuse_ip_of: Option<String>,
    },
    DeletePod(String),
    RelabelPod {
        key: String,
        labels: Labels,
    },
    RelabelNamespace {
        namespace: String,
        labels: Labels,
    },
    /// Create or update: writes the variant `key` (`identity@vN`).
    WritePolicy(String),
    DeletePolicy(String),
    RestartAgent,
}

impl fmt::Display for ChurnStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |labels: &Labels| {
            labels
                .iter()
                .map(|(key, value)| format!("{key}={value}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        match self {
            Self::AddPod {
                key,
                labels,
                reuse_ip_of,
            } => {
                write!(f, "add pod {key} {{{}}}", show(labels))?;
                if let Some(old) = reuse_ip_of {
                    write!(f, " with the addresses of {old}")?;
                }
                Ok(())
            }
            Self::DeletePod(key) => write!(f, "delete pod {key}"),
            Self::RelabelPod { key, labels } => write!(f, "relabel pod {key} {{{}}}", show(labels)),
            Self::RelabelNamespace { namespace, labels } => {
                write!(f, "relabel namespace {namespace} {{{}}}", show(labels))
            }
            Self::WritePolicy(key) => write!(f, "write policy {key}"),
            Self::DeletePolicy(identity) => write!(f, "delete policy {identity}"),
            Self::RestartAgent => write!(f, "SIGKILL and restart the agent"),
        }
    }
}

/// Picks the next change and updates `world` as if it were made.
fn next_step(rng: &mut fastrand::Rng, world: &mut World) -> ChurnStep {
    loop {
        let namespace = pick(rng, &CHURN_NAMESPACES);
        let in_namespace = world.pods_in(namespace);
        match rng.u8(..100) {
            0..15 if in_namespace.len() < MAX_PODS_PER_NAMESPACE => {
                world.next_pod += 1;
                let key = format!("{namespace}/pod-{}", world.next_pod);
                let labels = random_pod_labels(rng);
                // Half the time a fresh address, when the node still has them to give.
                let reuse_ip_of = if rng.bool() || world.next_pod > 150 {
                    world.free_addresses.pop_front()
                } else {
                    None
                };
                world.pods.insert(key.clone(), labels.clone());
                return ChurnStep::AddPod {
                    key,
                    labels,
                    reuse_ip_of,
                };
            }
            15..30 if in_namespace.len() > MIN_PODS_PER_NAMESPACE => {
                let key = in_namespace[rng.usize(..in_namespace.len())].clone();
                world.pods.shift_remove(&key);
                world.free_addresses.push_back(key.clone());
                return ChurnStep::DeletePod(key);
            }
            30..50 if !in_namespace.is_empty() => {
                let key = in_namespace[rng.usize(..in_namespace.len())].clone();
                let labels = random_pod_labels(rng);
                world.pods.insert(key.clone(), labels.clone());
                return ChurnStep::RelabelPod { key, labels };
            }
            50..56 => {
                let labels = churn_namespace_labels(pick(rng, &TEAMS));
                world
                    .namespaces
                    .insert(namespace.to_owned(), labels.clone());
                return ChurnStep::RelabelNamespace {
                    namespace: namespace.to_owned(),
                    labels,
                };
            }
            56..88 => {
                // Create when missing, update (another variant) when present.
                let identities = World::churned_identities();
                let identity = identities[rng.usize(..identities.len())].clone();
                let variants = variants_of(&identity);
                let current = world.policies.get(&identity).cloned();
                let key = loop {
                    let key = format!("{identity}@v{}", rng.usize(..variants));
                    if current.as_ref() != Some(&key) {
                        break key;
                    }
                };
                world.policies.insert(identity, key.clone());
                return ChurnStep::WritePolicy(key);
            }
            88..100 => {
                let existing: Vec<String> = world
                    .policies
                    .keys()
                    .filter(|identity| *identity != STABLE_POLICY)
                    .cloned()
                    .collect();
                if existing.is_empty() {
                    continue;
                }
                let identity = existing[rng.usize(..existing.len())].clone();
                world.policies.remove(&identity);
                return ChurnStep::DeletePolicy(identity);
            }
            _ => {}
        }
    }
}

/// The agent's apply latency histogram, read from `/metrics`: cumulative counts per upper
/// bound (seconds), `+Inf` last.
type Buckets = Vec<(f64, u64)>;

/// Turns successive scrapes into the observations made between them, across restarts (a new
/// agent's histogram starts from zero).
#[derive(Debug, Default)]
struct HistogramReader {
    last: Option<(u32, Buckets)>,
}

impl HistogramReader {
    /// The observations since the previous reading.
    fn since_last(&mut self, pid: u32, now: Buckets) -> Buckets {
        let delta = match &self.last {
            Some((last_pid, last)) if *last_pid == pid && last.len() == now.len() => now
                .iter()
                .zip(last)
                .map(|((bound, count), (_, before))| (*bound, count.saturating_sub(*before)))
                .collect(),
            _ => now.clone(),
        };
        self.last = Some((pid, now));
        delta
    }
}

/// Adds `more` to `into`, bucket by bucket.
fn add_buckets(into: &mut Buckets, more: &Buckets) {
    if into.is_empty() {
        into.clone_from(more);
        return;
    }
    for ((_, count), (_, extra)) in into.iter_mut().zip(more) {
        *count += extra;
    }
}

/// The upper bound of the bucket holding the `percent`th percentile (nearest rank), in
/// milliseconds; `None` without observations.
fn bucket_percentile(buckets: &Buckets, percent: u64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total == 0 {
        return None;
    }
    let rank = (total * percent).div_ceil(100).max(1);
    buckets
        .iter()
        .find(|(_, count)| *count >= rank)
        .map(|(bound, _)| bound * 1000.0)
}

/// The apply latency buckets in a `/metrics` page.
fn parse_apply_buckets(page: &str) -> Buckets {
    let mut buckets: Buckets = page
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(APPLY_BUCKET)?;
            let bound = rest.split("le=\"").nth(1)?.split('"').next()?;
            let bound = if bound == "+Inf" {
                f64::INFINITY
            } else {
                bound.parse().ok()?
            };
            let count = rest.split('}').nth(1)?.split_whitespace().next()?;
            Some((bound, count.parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

/// Least-squares slope of `(minutes, KiB)` samples within each agent's life (the samples of
/// one incarnation are centred on their own means, so a restart's drop is no slope), in KiB
/// per minute; `None` with too few samples.
fn rss_slope(samples: &[RssSample]) -> Option<f64> {
    let mut by_incarnation: BTreeMap<u64, Vec<(f64, f64)>> = BTreeMap::new();
    for sample in samples {
        by_incarnation
            .entry(sample.incarnation)
            .or_default()
            .push((sample.minutes, sample.kib));
    }
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for points in by_incarnation.values().filter(|points| points.len() >= 2) {
        let count = f64::from(u32::try_from(points.len()).unwrap_or(u32::MAX));
        let mean_x = points.iter().map(|(x, _)| x).sum::<f64>() / count;
        let mean_y = points.iter().map(|(_, y)| y).sum::<f64>() / count;
        for (x, y) in points {
            sxy += (x - mean_x) * (y - mean_y);
            sxx += (x - mean_x) * (x - mean_x);
        }
    }
    (sxx > 0.0).then(|| sxy / sxx)
}

#[derive(Clone, Copy, Debug)]
struct RssSample {
    /// Since the soak's churn began.
    minutes: f64,
    kib: f64,
    incarnation: u64,
}

/// The agent process now running.
#[derive(Debug, Default)]
struct Incarnation {
    number: u64,
    started: Option<Instant>,
}

/// What one minute saw.
#[derive(Debug, Default)]
struct MinuteTally {
    steps: u64,
    probes: u64,
    disagreements: u64,
    retried: u64,
    restarts: u64,
    apply: Buckets,
}

/// What the whole run saw.
#[derive(Debug, Default)]
struct Totals {
    /// RSS at each minute's end, whichever agent runs: the run's RSS over time.
    minute_rss: Vec<RssSample>,
    steps: u64,
    probes: u64,
    /// Probes the evaluator expected blocked: the churn must exercise both outcomes.
    expected_blocked: u64,
    disagreements: u64,
    retried: u64,
    restarts: u64,
    connection_checks: u64,
    apply: Buckets,
    applied: Vec<Duration>,
    restarted: Vec<Duration>,
}

/// The figures the end of the run is compared with.
#[derive(Debug)]
struct Snapshot {
    /// The keys of each keyed map, conntrack's included.
    maps: BTreeMap<String, BTreeSet<Vec<u8>>>,
    pins: BTreeSet<PathBuf>,
    fds: usize,
    rss_kib: u64,
}

struct Soak<'a> {
    args: &'a SoakArgs,
    node: SimulatedNode<'a>,
    families: Vec<IpFamily>,
    rng: fastrand::Rng,
    world: World,
    manifests: Option<ManifestDir>,
    minute: MinuteTally,
    histogram: HistogramReader,
    rss: Vec<RssSample>,
    incarnation: Incarnation,
    totals: Totals,
    problems: Vec<String>,
}

/// The long-lived connections, between the stable pods: (name, from, to, port, protocol).
const CONNECTIONS: [(&str, &str, &str, u16, Protocol); 3] = [
    (
        "stable-tcp",
        STABLE_CLIENT,
        STABLE_SERVER,
        80,
        Protocol::Tcp,
    ),
    (
        "stable-udp",
        STABLE_CLIENT,
        STABLE_SERVER,
        80,
        Protocol::Udp,
    ),
    (
        "stable-reverse-tcp",
        STABLE_SERVER,
        STABLE_CLIENT,
        81,
        Protocol::Tcp,
    ),
];

impl Soak<'_> {
    async fn run(&mut self) -> Result<(), SoakError> {
        for key in self.world.policies.values() {
            self.node.driver().write_policy(key).await?;
        }
        self.node.driver().settle(Change::Objects).await?;
        // The baseline is taken from an agent that adopted the pins of another, as the last one
        // of the run will have: both hold the same objects the same way.
        self.restart_agent().await?;
        for (name, from, to, port, protocol) in CONNECTIONS {
            self.node
                .driver()
                .open_connection(name, (from, to), port, protocol, ProbeVia::Pod)
                .await?;
        }
        let baseline = self.snapshot()?;
        // The figures count the churn's steps only, not the set-up and the first restart.
        self.scrape_apply_latency().await;
        self.minute = MinuteTally::default();
        self.totals.apply.clear();
        let _ = self.node.take_latencies();
        println!(
            "soak: seed {} {}, restart every {} steps, {} probes per step, families {}",
            self.args.seed,
            match (self.args.minutes, self.args.steps) {
                (Some(minutes), _) => format!("{minutes} minute(s)"),
                (None, Some(steps)) => format!("{steps} step(s)"),
                (None, None) => unreachable!("clap requires one"),
            },
            self.args.restart_every,
            self.args.probes_per_step,
            self.families
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("+"),
        );
        println!("baseline: {}", describe(&baseline));
        println!(
            "{:>3} {:>5} {:>6} {:>5} {:>4} {:>9} {:>4} {:>9} {:>17} {:>17}  map entries",
            "min",
            "steps",
            "probes",
            "disag",
            "rest",
            "rss_kib",
            "fds",
            "conntrack",
            "apply p50/p99 ms",
            "wait p50/p99 ms"
        );
        let churn_started = Instant::now();
        let mut minute_started = Instant::now();
        let mut minute_number = 0;
        let mut step_number = 0;
        loop {
            let done = match (self.args.minutes, self.args.steps) {
                (Some(minutes), _) => churn_started.elapsed() >= MINUTE * minutes as u32,
                (None, Some(steps)) => step_number >= steps,
                (None, None) => true,
            };
            if done {
                break;
            }
            step_number += 1;
            let step = if step_number % self.args.restart_every == 0 {
                ChurnStep::RestartAgent
            } else {
                next_step(&mut self.rng, &mut self.world)
            };
            if self.args.verbose {
                println!("step {step_number}: {step}");
            }
            self.play(&step).await?;
            self.probe(step_number, Some(&step)).await?;
            self.sample_rss(churn_started)?;
            if minute_started.elapsed() >= MINUTE {
                minute_number += 1;
                self.end_minute(minute_number).await?;
                minute_started = Instant::now();
            }
        }
        if self.minute.steps > 0 {
            minute_number += 1;
            self.end_minute(minute_number).await?;
        }
        let churned_for = churn_started.elapsed();
        self.restore().await?;
        self.check_connections("after the churn").await;
        let (probes, disagreements) = (self.totals.probes, self.totals.disagreements);
        self.probe(u64::MAX, None).await?;
        println!(
            "after restoring the initial cluster: every pod pair probed once, {} probes, {} disagreements",
            self.totals.probes - probes,
            self.totals.disagreements - disagreements
        );
        let end = self.settled_snapshot(&baseline).await?;
        self.report(&baseline, &end, churned_for);
        Ok(())
    }

    /// The snapshot after the restore. The agent has reported it applied; should a map still
    /// differ from the baseline, the maps are read again for a few seconds, and a difference
    /// that goes away is printed as a note: the report then holds the last reading.
    async fn settled_snapshot(&self, baseline: &Snapshot) -> Result<Snapshot, SoakError> {
        let first = self.snapshot()?;
        let differences = map_differences(baseline, &first);
        if differences.is_empty() {
            return Ok(first);
        }
        let started = Instant::now();
        let mut now = first;
        while started.elapsed() < MAPS_SETTLE {
            tokio::time::sleep(MAPS_REREAD).await;
            now = self.snapshot()?;
            if map_differences(baseline, &now).is_empty() {
                for difference in &differences {
                    println!(
                        "note: once the agent reported the restore applied, {difference}; as at the baseline {}ms later",
                        started.elapsed().as_millis()
                    );
                }
                break;
            }
        }
        Ok(now)
    }

    /// Makes one change and waits for the agent to report it applied.
    async fn play(&mut self, step: &ChurnStep) -> Result<(), SoakError> {
        let driver = self.node.driver();
        match step {
            ChurnStep::AddPod {
                key,
                labels,
                reuse_ip_of,
            } => {
                driver
                    .add_pod(NewPod {
                        key,
                        labels,
                        ports: None,
                        reuse_ip_of: reuse_ip_of.as_deref(),
                        publish: true,
                    })
                    .await?;
            }
            ChurnStep::DeletePod(key) => driver.delete_pod(key).await?,
            ChurnStep::RelabelPod { key, labels } => {
                let pods = IndexMap::from([(key.clone(), labels.clone())]);
                driver.relabel(&pods, &IndexMap::new()).await?;
            }
            ChurnStep::RelabelNamespace { namespace, labels } => {
                let namespaces = IndexMap::from([(namespace.clone(), labels.clone())]);
                driver.relabel(&IndexMap::new(), &namespaces).await?;
            }
            ChurnStep::WritePolicy(key) => driver.write_policy(key).await?,
            ChurnStep::DeletePolicy(identity) => driver.delete_policy(identity).await?,
            ChurnStep::RestartAgent => return self.restart_agent().await,
        }
        self.node.driver().settle(Change::Objects).await?;
        self.minute.steps += 1;
        self.totals.steps += 1;
        Ok(())
    }

    /// SIGKILLs the agent (after reading its histogram one last time) and waits for the new
    /// one to reconcile; the long-lived connections must have survived.
    async fn restart_agent(&mut self) -> Result<(), SoakError> {
        if self.incarnation.started.is_some() {
            self.scrape_apply_latency().await;
        }
        let driver = self.node.driver();
        driver.restart_agent(RestartMode::Kill).await?;
        driver.settle(Change::AgentRestart).await?;
        self.incarnation.number += 1;
        self.incarnation.started = Some(Instant::now());
        self.minute.restarts += 1;
        self.totals.restarts += 1;
        // Not counted at the first restart, which comes before the baseline and the churn.
        if self.totals.restarts > 1 {
            self.minute.steps += 1;
            self.totals.steps += 1;
            self.check_connections("after a restart").await;
        }
        Ok(())
    }

    async fn check_connections(&mut self, when: &str) {
        for (name, ..) in CONNECTIONS {
            self.totals.connection_checks += 1;
            if !self.node.connection_alive(name).await {
                self.problems
                    .push(format!("connection {name} is closed {when}"));
            }
        }
    }

    /// Dials a sample of pod pairs after `step` (every pair, once the churn is over and the
    /// initial cluster restored: `None`) and compares each outcome with the reference
    /// evaluator.
    async fn probe(&mut self, step_number: u64, step: Option<&ChurnStep>) -> Result<(), SoakError> {
        let manifests = self
            .manifests
            .as_mut()
            .expect("set before the churn starts");
        manifests.refresh()?;
        let (cluster, _) = manifests.cluster();
        let node_addresses = [IpAddr::V4(NODE_V4), IpAddr::V6(NODE_V6)];
        let pods: Vec<String> = self.node.pods().map(str::to_owned).collect();
        let pairs: Vec<(usize, usize)> = if step.is_some() {
            (0..self.args.probes_per_step)
                .map(|_| {
                    let from = self.rng.usize(..pods.len());
                    (
                        from,
                        (from + 1 + self.rng.usize(..pods.len() - 1)) % pods.len(),
                    )
                })
                .collect()
        } else {
            (0..pods.len())
                .flat_map(|from| (0..pods.len()).map(move |to| (from, to)))
                .filter(|(from, to)| from != to)
                .collect()
        };
        let mut sample = Vec::new();
        for (from, to) in pairs {
            let family = self.families[self.rng.usize(..self.families.len())];
            let (port, protocol) = PROBED[self.rng.usize(..PROBED.len())];
            let (Some(source), Some(destination)) = (
                self.node
                    .addresses(&pods[from])
                    .and_then(|addresses| addresses.get(family)),
                self.node
                    .addresses(&pods[to])
                    .and_then(|addresses| addresses.get(family)),
            ) else {
                continue;
            };
            let flow = Flow {
                source,
                destination,
                protocol: match protocol {
                    Protocol::Tcp => 6,
                    Protocol::Udp => 17,
                    Protocol::Sctp => 132,
                },
                port,
            };
            let expected = evaluate::evaluate(&cluster, &node_addresses, &flow).allowed();
            sample.push(Probe {
                from: pods[from].clone(),
                to: pods[to].clone(),
                family,
                port,
                protocol,
                expected,
            });
        }
        let node = &self.node;
        let outcomes = join_all(sample.iter().map(|probe| dial(node, probe))).await;
        let differing: Vec<&Probe> = sample
            .iter()
            .zip(outcomes)
            .filter(|(probe, reached)| probe.expected != *reached)
            .map(|(probe, _)| probe)
            .collect();
        self.minute.probes += sample.len() as u64;
        self.totals.probes += sample.len() as u64;
        self.totals.expected_blocked +=
            sample.iter().filter(|probe| !probe.expected).count() as u64;
        if differing.is_empty() {
            return Ok(());
        }
        // Once more after a pause, as the scenario runner does: what still differs is a
        // disagreement.
        tokio::time::sleep(RETRY_PAUSE).await;
        let again = join_all(differing.iter().map(|probe| dial(node, probe))).await;
        self.minute.retried += differing.len() as u64;
        self.totals.retried += differing.len() as u64;
        for (probe, reached) in differing.into_iter().zip(again) {
            if probe.expected != reached {
                self.minute.disagreements += 1;
                self.totals.disagreements += 1;
                let when = match step {
                    Some(step) => format!("step {step_number} ({step})"),
                    None => "after restoring the initial cluster".to_owned(),
                };
                self.problems.push(format!(
                    "{when}: {probe}: the evaluator says {}, the network {} (retried once)",
                    verdict(probe.expected),
                    verdict(reached),
                ));
            }
        }
        Ok(())
    }

    fn agent_pid(&self) -> Result<u32, SoakError> {
        self.node.agent_pid().ok_or(SoakError::NoAgent)
    }

    fn sample_rss(&mut self, churn_started: Instant) -> Result<(), SoakError> {
        let warm = self
            .incarnation
            .started
            .is_some_and(|started| started.elapsed() >= WARM_UP);
        if warm {
            let kib = rss_kib(self.agent_pid()?)?;
            self.rss.push(RssSample {
                minutes: churn_started.elapsed().as_secs_f64() / 60.0,
                kib: f64::from(u32::try_from(kib).unwrap_or(u32::MAX)),
                incarnation: self.incarnation.number,
            });
        }
        Ok(())
    }

    /// Adds what the agent's histogram observed since the last scrape to this minute's.
    async fn scrape_apply_latency(&mut self) {
        let Some(pid) = self.node.agent_pid() else {
            return;
        };
        match scrape_metrics(self.node.node_netns()).await {
            Ok(page) => {
                let delta = self.histogram.since_last(pid, parse_apply_buckets(&page));
                add_buckets(&mut self.minute.apply, &delta);
                add_buckets(&mut self.totals.apply, &delta);
            }
            Err(error) => self
                .problems
                .push(format!("cannot read the agent's metrics: {error}")),
        }
    }

    async fn end_minute(&mut self, number: u64) -> Result<(), SoakError> {
        self.scrape_apply_latency().await;
        self.check_connections(&format!("in minute {number}")).await;
        let snapshot = self.snapshot()?;
        let (applied, restarted) = self.node.take_latencies();
        let mut sorted = applied.clone();
        sorted.sort();
        self.totals.applied.extend(applied);
        self.totals.restarted.extend(restarted);
        self.totals.minute_rss.push(RssSample {
            minutes: f64::from(u32::try_from(number).unwrap_or(u32::MAX)),
            kib: f64::from(u32::try_from(snapshot.rss_kib).unwrap_or(u32::MAX)),
            // One line through every minute's figure, across restarts.
            incarnation: 0,
        });
        let minute = std::mem::take(&mut self.minute);
        let (conntrack, maps) = split_conntrack(&snapshot.maps);
        let milliseconds = |duration: Duration| duration.as_secs_f64() * 1000.0;
        println!(
            "{number:>3} {:>5} {:>6} {:>5} {:>4} {:>9} {:>4} {:>9} {:>17} {:>8.1}/{:<8.1}  {}",
            minute.steps,
            minute.probes,
            minute.disagreements,
            minute.restarts,
            snapshot.rss_kib,
            snapshot.fds,
            conntrack,
            bucket_range(&minute.apply),
            milliseconds(percentile(&sorted, 50)),
            milliseconds(percentile(&sorted, 99)),
            maps.iter()
                .map(|(map, entries)| format!("{map}={entries}"))
                .collect::<Vec<_>>()
                .join(" "),
        );
        Ok(())
    }

    fn snapshot(&self) -> Result<Snapshot, SoakError> {
        let pid = self.agent_pid()?;
        let bpffs = self.node.bpffs();
        Ok(Snapshot {
            maps: pins::map_keys(bpffs).map_err(read_error("the pinned maps"))?,
            pins: pins::pins(bpffs).map_err(read_error("the pins"))?,
            fds: std::fs::read_dir(format!("/proc/{pid}/fd"))
                .map_err(read_error("the agent's descriptors"))?
                .count(),
            rss_kib: rss_kib(pid)?,
        })
    }

    /// Puts the initial cluster back: the initial policy variants and namespace labels, and the
    /// initial churned pods with their labels and addresses (every other churned pod deleted).
    async fn restore(&mut self) -> Result<(), SoakError> {
        let initial = World::initial(self.node.scenario());
        let driver = self.node.driver();
        for identity in self.world.policies.keys() {
            if !initial.policies.contains_key(identity) {
                driver.delete_policy(identity).await?;
            }
        }
        for key in initial.policies.values() {
            driver.write_policy(key).await?;
        }
        driver
            .relabel(&IndexMap::new(), &initial.namespaces)
            .await?;
        for key in self.world.pods.keys() {
            driver.delete_pod(key).await?;
        }
        for (key, labels) in &initial.pods {
            driver
                .add_pod(NewPod {
                    key,
                    labels,
                    ports: None,
                    reuse_ip_of: Some(key),
                    publish: true,
                })
                .await?;
        }
        driver.settle(Change::Objects).await?;
        self.world = initial;
        self.scrape_apply_latency().await;
        let (applied, restarted) = self.node.take_latencies();
        self.totals.applied.extend(applied);
        self.totals.restarted.extend(restarted);
        Ok(())
    }

    /// Prints the run's figures and records what failed.
    fn report(&mut self, baseline: &Snapshot, end: &Snapshot, churned_for: Duration) {
        let totals = &self.totals;
        println!(
            "in all: {:.1} min of churn, {} steps, {} restarts, {} probes ({} expected blocked, {} retried), {} disagreements, {} connection checks",
            churned_for.as_secs_f64() / 60.0,
            totals.steps,
            totals.restarts.saturating_sub(1),
            totals.probes,
            totals.expected_blocked,
            totals.retried,
            totals.disagreements,
            totals.connection_checks,
        );
        println!(
            "apply latency (agent histogram, bucket bounds): p50/p99 {} ms over {} applies",
            bucket_range(&totals.apply),
            totals.apply.last().map_or(0, |(_, count)| *count),
        );
        println!("{}", crate::report::latency_line(&totals.applied));
        println!("{}", crate::report::restart_latency_line(&totals.restarted));
        let across = rss_slope(&totals.minute_rss);
        println!(
            "rss over the run (minute figures, across restarts): {}",
            across.map_or_else(|| "n/a".to_owned(), |slope| format!("{slope:+.1} KiB/min")),
        );
        let slope = rss_slope(&self.rss);
        println!(
            "rss: baseline {} KiB, end {} KiB, slope {} within agent lives ({} samples, first {}s of each left out)",
            baseline.rss_kib,
            end.rss_kib,
            slope.map_or_else(|| "n/a".to_owned(), |slope| format!("{slope:+.1} KiB/min")),
            self.rss.len(),
            WARM_UP.as_secs(),
        );
        if let Some(slope) = slope
            && churned_for >= SLOPE_HELD_FROM
            && slope > self.args.max_rss_slope
        {
            self.problems.push(format!(
                "RSS grows {slope:.1} KiB/min within agent lives (at most {} allowed)",
                self.args.max_rss_slope
            ));
        }
        println!("after restoring the initial cluster: {}", describe(end));
        self.problems.extend(map_differences(baseline, end));
        let live_ifindexes: BTreeSet<u32> = self
            .node
            .status()
            .map(|status| {
                status
                    .endpoints
                    .iter()
                    .filter(|endpoint| endpoint.attached)
                    .map(|endpoint| endpoint.ifindex)
                    .collect()
            })
            .unwrap_or_default();
        for pin in &end.pins {
            if let Some(ifindex) = pins::link_ifindex(pin)
                && !live_ifindexes.contains(&ifindex)
            {
                self.problems.push(format!(
                    "pin {} is left of an interface that no longer exists",
                    pin.display()
                ));
            }
        }
        let shape = |pins: &BTreeSet<PathBuf>| -> BTreeMap<String, usize> {
            let mut shape = BTreeMap::new();
            for pin in pins {
                let kind = match pins::link_ifindex(pin) {
                    Some(_) => format!(
                        "links/*-{}",
                        pin.file_name()
                            .and_then(|name| name.to_str())
                            .and_then(|name| name.split_once('-'))
                            .map_or("", |(_, hook)| hook)
                    ),
                    None => pin.display().to_string(),
                };
                *shape.entry(kind).or_insert(0) += 1;
            }
            shape
        };
        let (before, after) = (shape(&baseline.pins), shape(&end.pins));
        if before != after {
            self.problems.push(format!(
                "pins differ from the baseline: {after:?} now, {before:?} before"
            ));
        }
        if end.fds > baseline.fds {
            self.problems.push(format!(
                "the agent holds {} descriptors after the churn, {} before it",
                end.fds, baseline.fds
            ));
        }
    }
}

/// One dial of the sample and what the evaluator expects of it.
#[derive(Debug)]
struct Probe {
    from: String,
    to: String,
    family: IpFamily,
    port: u16,
    protocol: Protocol,
    expected: bool,
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} -> {} {}/{} over {}",
            self.from, self.to, self.protocol, self.port, self.family
        )
    }
}

async fn dial(node: &SimulatedNode<'_>, probe: &Probe) -> bool {
    node.reaches(
        (&probe.from, &probe.to),
        probe.family,
        probe.port,
        probe.protocol,
    )
    .await
}

fn verdict(allowed: bool) -> &'static str {
    if allowed { "allowed" } else { "blocked" }
}

/// `p50/p99` of the buckets, as their upper bounds in milliseconds.
fn bucket_range(buckets: &Buckets) -> String {
    let show = |value: Option<f64>| match value {
        None => "-".to_owned(),
        Some(value) if value.is_infinite() => "inf".to_owned(),
        Some(value) => format!("{value:.1}"),
    };
    format!(
        "{}/{}",
        show(bucket_percentile(buckets, 50)),
        show(bucket_percentile(buckets, 99))
    )
}

fn is_conntrack(map: &str) -> bool {
    map.starts_with("CONNTRACK")
}

/// Conntrack entries (both tables), and every other map's entries.
fn split_conntrack(maps: &BTreeMap<String, BTreeSet<Vec<u8>>>) -> (usize, BTreeMap<String, usize>) {
    let mut conntrack = 0;
    let mut others = BTreeMap::new();
    for (map, keys) in maps {
        if is_conntrack(map) {
            conntrack += keys.len();
        } else {
            others.insert(map.clone(), keys.len());
        }
    }
    (conntrack, others)
}

/// Each map (but conntrack's) holding more or fewer entries than at the baseline, with the
/// keys only one of them holds when there are few (hex). Keys themselves may differ with the
/// same count: a pod re-created at the same address has another interface index.
fn map_differences(baseline: &Snapshot, now: &Snapshot) -> Vec<String> {
    let empty = BTreeSet::new();
    let names: BTreeSet<&String> = baseline
        .maps
        .keys()
        .chain(now.maps.keys())
        .filter(|map| !is_conntrack(map))
        .collect();
    let hex = |keys: Vec<&Vec<u8>>| -> String {
        if keys.len() > 8 {
            return format!("{} keys", keys.len());
        }
        keys.iter()
            .map(|key| {
                key.iter().fold(String::new(), |mut text, byte| {
                    let _ = write!(text, "{byte:02x}");
                    text
                })
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    let mut differences = Vec::new();
    for map in names {
        let before = baseline.maps.get(map).unwrap_or(&empty);
        let after = now.maps.get(map).unwrap_or(&empty);
        if before.len() != after.len() {
            differences.push(format!(
                "map {map} holds {} entries, {} at the baseline (only now: [{}]; only then: [{}])",
                after.len(),
                before.len(),
                hex(after.difference(before).collect()),
                hex(before.difference(after).collect()),
            ));
        }
    }
    differences
}

fn describe(snapshot: &Snapshot) -> String {
    let (conntrack, maps) = split_conntrack(&snapshot.maps);
    let mut text = format!(
        "rss {} KiB, {} fds, {} pins, {conntrack} conntrack entries, maps:",
        snapshot.rss_kib,
        snapshot.fds,
        snapshot.pins.len()
    );
    for (map, entries) in maps {
        let _ = write!(text, " {map}={entries}");
    }
    text
}

fn rss_kib(pid: u32) -> Result<u64, SoakError> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).map_err(read_error(path))?;
    Ok(status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.split_whitespace().next())
        .and_then(|value| value.parse().ok())
        .unwrap_or(0))
}

/// `GET /metrics` from the agent, which listens inside the node's namespace.
async fn scrape_metrics(node: &crate::netns::Netns) -> std::io::Result<String> {
    let address: SocketAddr = METRICS_ADDRESS.parse().expect("a socket address");
    let socket = node.socket(Domain::IPV4, Type::STREAM, None)?;
    let exchange = async {
        let mut stream = TcpSocket::from_std_stream(socket.into())
            .connect(address)
            .await?;
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: netwarden\r\n\r\n")
            .await?;
        let mut page = String::new();
        stream.read_to_string(&mut page).await?;
        Ok::<_, std::io::Error>(page)
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .unwrap_or_else(|_| Err(std::io::Error::from(std::io::ErrorKind::TimedOut)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rss_slope_ignores_the_drop_of_a_restart() {
        // Two lives, each growing 10 KiB/min, the second starting lower.
        let samples: Vec<RssSample> = [(0.0, 100.0, 1), (1.0, 110.0, 1), (2.0, 120.0, 1)]
            .into_iter()
            .chain([(3.0, 50.0, 2), (4.0, 60.0, 2)])
            .map(|(minutes, kib, incarnation)| RssSample {
                minutes,
                kib,
                incarnation,
            })
            .collect();
        let slope = rss_slope(&samples).unwrap();
        assert!((slope - 10.0).abs() < 1e-9, "{slope}");
        let flat: Vec<RssSample> = (0..5)
            .map(|minute| RssSample {
                minutes: f64::from(minute),
                kib: 100.0,
                incarnation: 1,
            })
            .collect();
        assert_eq!(rss_slope(&flat), Some(0.0));
        assert_eq!(rss_slope(&flat[..1]), None);
    }

    #[test]
    fn histogram_deltas_survive_a_restart() {
        let page = "# TYPE netwarden_apply_duration_seconds histogram\n\
            netwarden_apply_duration_seconds_sum 0.5\n\
            netwarden_apply_duration_seconds_count 4\n\
            netwarden_apply_duration_seconds_bucket{le=\"0.001\"} 1\n\
            netwarden_apply_duration_seconds_bucket{le=\"0.002\"} 3\n\
            netwarden_apply_duration_seconds_bucket{le=\"+Inf\"} 4\n";
        let buckets = parse_apply_buckets(page);
        assert_eq!(buckets.len(), 3);
        assert_eq!(buckets[1], (0.002, 3));
        assert_eq!(bucket_percentile(&buckets, 50), Some(2.0));
        assert_eq!(bucket_percentile(&buckets, 25), Some(1.0));
        assert!(bucket_percentile(&buckets, 99).unwrap().is_infinite());

        let mut reader = HistogramReader::default();
        assert_eq!(reader.since_last(7, buckets.clone()), buckets);
        let later = vec![(0.001, 2), (0.002, 5), (f64::INFINITY, 6)];
        assert_eq!(
            reader.since_last(7, later),
            vec![(0.001, 1), (0.002, 2), (f64::INFINITY, 2)]
        );
        // A new agent's histogram starts from zero: all of it is new.
        let restarted = vec![(0.001, 1), (0.002, 1), (f64::INFINITY, 1)];
        assert_eq!(reader.since_last(8, restarted.clone()), restarted);
        assert_eq!(bucket_percentile(&Vec::new(), 50), None);
    }

    #[test]
    fn churn_is_deterministic_and_keeps_its_bounds() {
        let families = [IpFamily::IPv4];
        let walk = |seed| {
            let mut rng = fastrand::Rng::with_seed(seed);
            let scenario = soak_scenario(&mut rng, &families);
            let mut world = World::initial(&scenario);
            let steps: Vec<String> = (0..500)
                .map(|_| next_step(&mut rng, &mut world).to_string())
                .collect();
            for namespace in CHURN_NAMESPACES {
                let pods = world.pods_in(namespace).len();
                assert!((MIN_PODS_PER_NAMESPACE..=MAX_PODS_PER_NAMESPACE).contains(&pods));
            }
            for key in world.policies.values() {
                assert!(scenario.policies.contains_key(key), "{key} is declared");
            }
            steps
        };
        assert_eq!(walk(3), walk(3));
        assert_ne!(walk(3), walk(4));
    }

    #[test]
    fn cluster_policies_never_select_the_stable_namespace() {
        let mut rng = fastrand::Rng::with_seed(9);
        for _ in 0..200 {
            let policy = cluster_policy(&mut rng, "cnp");
            let subject = serde_yaml::to_string(&policy["spec"]["subject"]).unwrap();
            assert!(
                subject.contains("churn") || subject.contains("team"),
                "{subject}"
            );
        }
    }
}
