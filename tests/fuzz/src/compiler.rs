//! The compiler target: an arbitrary valid cluster, then an arbitrary sequence of changes
//! (batches of object updates and deletions, whole new snapshots, new node addresses, agent
//! restarts that adopt the previous maps). After every step the compiler's incremental state
//! must be consistent (every id it names exists, nothing is kept that nothing uses) and equal,
//! up to the numbering of ids, to a full recompile of the same cluster by a new compiler.
//!
//! Clusters are drawn from small vocabularies (three namespaces, a few pods, labels, addresses,
//! blocks and ports), so that changes keep hitting the same objects, selectors keep matching,
//! addresses collide and Services claim each other's frontends. Everything generated is
//! something [`netwarden_model::convert`] can produce: the compiler's input is validated.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt::{self, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use arbitrary::{Result, Unstructured};
use ipnet::IpNet;
use netwarden_common::{CIDR_CLASS_FLAG, FIRST_POD_IDENTITY, IDENTITY_HOST, PeerId};
use netwarden_model::{
    Cluster, ContainerPort, Enforcement, LabelSelector, Namespace, NetworkPolicy, Peer, Pod,
    PodMtls, PodRef, PolicyRef, PolicyTypes, PortRef, PortSpec, Protocol, Requirement, Rule,
    Service, ServicePort, ServiceRef, ServiceType, selector::Labels,
};
use netwarden_policy::{
    Change, CompiledPolicy, Compiler, DatapathState, Frontend, FrontendKind, IdentityInfo,
    PolicyId, RuleOrigin,
};

/// The node the compiler enforces for.
pub const NODE: &str = "node-1";
const OTHER_NODE: &str = "node-2";
const NAMESPACES: [&str; 3] = ["ns0", "ns1", "ns2"];
/// The namespace label the API server sets, which namespace selectors often use.
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";
const LABEL_KEYS: [&str; 4] = ["app", "tier", "env", NAMESPACE_NAME_LABEL];
const LABEL_VALUES: [&str; 5] = ["a", "b", "c", "ns0", "ns1"];
const POD_NAMES: [&str; 6] = ["pod0", "pod1", "pod2", "pod3", "pod4", "pod5"];
const POLICY_NAMES: [&str; 3] = ["p0", "p1", "p2"];
const SERVICE_NAMES: [&str; 2] = ["s0", "s1"];
const PORT_NAMES: [&str; 4] = ["http", "dns", "sig", "nope"];
const PORT_NUMBERS: [u16; 6] = [1, 53, 80, 8080, 9000, 65535];
const PORT_RANGES: [(u16, u16); 5] = [(80, 90), (1, 65535), (53, 53), (65534, 65535), (1024, 2047)];
const PROTOCOLS: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

/// Pod addresses: a few of each family, an IPv4-mapped IPv6 address, and the node's own.
const POD_ADDRESSES: [IpAddr; 8] = [
    IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
    IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)),
    IpAddr::V4(Ipv4Addr::new(10, 0, 0, 3)),
    IpAddr::V4(Ipv4Addr::new(10, 0, 0, 4)),
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1)),
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2)),
    IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0x0a00, 0x0001)),
    IpAddr::V4(Ipv4Addr::new(172, 18, 0, 2)),
];

/// Node addresses, some of them also pods'.
const NODE_ADDRESSES: [IpAddr; 4] = [
    IpAddr::V4(Ipv4Addr::new(172, 18, 0, 2)),
    IpAddr::V4(Ipv4Addr::new(172, 18, 0, 3)),
    IpAddr::V4(Ipv4Addr::new(10, 0, 0, 4)),
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2)),
];

const SERVICE_ADDRESSES: [IpAddr; 5] = [
    IpAddr::V4(Ipv4Addr::new(10, 96, 0, 1)),
    IpAddr::V4(Ipv4Addr::new(10, 96, 0, 2)),
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 1)),
    IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)),
    IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
];

/// `ipBlock`s around and outside the pod addresses, each with excepts strictly inside it.
const BLOCKS: [(&str, &[&str]); 12] = [
    (
        "10.0.0.0/24",
        &["10.0.0.0/29", "10.0.0.4/30", "10.0.0.3/32", "10.0.0.128/25"],
    ),
    (
        "10.0.0.0/29",
        &["10.0.0.4/30", "10.0.0.2/31", "10.0.0.1/32"],
    ),
    ("10.0.0.4/30", &["10.0.0.4/32"]),
    ("10.0.0.3/32", &[]),
    ("0.0.0.0/0", &["10.0.0.0/24", "192.0.2.0/24", "10.0.0.1/32"]),
    ("172.18.0.0/16", &["172.18.0.2/32"]),
    ("fd00::/64", &["fd00::/126", "fd00::2/128"]),
    ("fd00::/126", &["fd00::2/127"]),
    ("::/0", &["fd00::/64", "2001:db8::/32"]),
    ("::ffff:0:0/96", &["::ffff:10.0.0.0/120"]),
    ("::ffff:10.0.0.0/120", &[]),
    ("fd00::1/128", &[]),
];

/// A cluster, and the changes it goes through.
#[derive(Debug)]
struct Scenario {
    /// Every policy in audit mode (the agent's `--audit`).
    audit_everything: bool,
    node_addresses: Vec<IpAddr>,
    initial: Cluster,
    steps: Vec<Step>,
}

/// One step of a [`Scenario`].
#[derive(Debug)]
enum Step {
    /// Changes applied with [`Compiler::update`] as one batch.
    Update(Vec<Change>),
    /// A whole new snapshot, applied with [`Compiler::sync`].
    Sync(Cluster),
    /// New node addresses.
    NodeAddresses(Vec<IpAddr>),
    /// The agent restarts: a new compiler resumes from the old one's identities and adopts
    /// the policies it left pinned in the maps, then compiles the same cluster.
    Restart,
}

/// Checks one input: see the module's documentation.
pub fn check(data: &[u8]) {
    let mut input = Unstructured::new(data);
    let Ok(scenario) = scenario(&mut input) else {
        return;
    };
    run(scenario);
}

fn run(scenario: Scenario) {
    let Scenario {
        audit_everything,
        mut node_addresses,
        initial,
        steps,
    } = scenario;
    let mut compiler = Compiler::new(NODE).auditing_everything(audit_everything);
    compiler.set_node_addresses(&node_addresses);
    let mut cluster = initial;
    compiler.sync(cluster.clone());
    assert_equals_full_recompile(
        &compiler,
        &cluster,
        &node_addresses,
        audit_everything,
        &"initial sync",
    );
    for (index, step) in steps.iter().enumerate() {
        // Formatted only when a check fails: a step's `Debug` costs as much as checking it.
        let described = AfterStep { index, step };
        match step {
            Step::Update(changes) => {
                for change in changes {
                    apply(&mut cluster, change.clone());
                }
                compiler.update(changes.clone());
            }
            Step::Sync(next) => {
                cluster.clone_from(next);
                compiler.sync(cluster.clone());
            }
            Step::NodeAddresses(addresses) => {
                node_addresses.clone_from(addresses);
                compiler.set_node_addresses(&node_addresses);
            }
            Step::Restart => {
                let before = compiler.state().clone();
                compiler = restarted(&compiler, &cluster, &node_addresses, audit_everything);
                // Nothing changed but the agent: every policy keeps its pinned id and content,
                // so the first apply of the new agent rewrites nothing in the maps.
                assert_eq!(
                    compiler.state().policies,
                    before.policies,
                    "after {described}: a restarted compiler did not keep the pinned policies"
                );
            }
        }
        assert_equals_full_recompile(
            &compiler,
            &cluster,
            &node_addresses,
            audit_everything,
            &described,
        );
    }
}

/// The step a failed check names: `step N: <the step>`.
struct AfterStep<'a> {
    index: usize,
    step: &'a Step,
}

impl fmt::Display for AfterStep<'_> {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "step {}: {:?}", self.index, self.step)
    }
}

/// What an agent restarting after `previous` compiles: it resumes the identity numbers and
/// policy ids, and adopts the policies left in the maps, as `netwarden agent` does.
fn restarted(
    previous: &Compiler,
    cluster: &Cluster,
    node_addresses: &[IpAddr],
    audit_everything: bool,
) -> Compiler {
    let state = previous.state();
    let identities: HashMap<[u8; 32], PeerId> = state
        .identities
        .iter()
        .map(|(id, info)| (info.digest(), *id))
        .collect();
    let highest = state.policies.keys().copied().max().unwrap_or_default();
    let mut compiler = Compiler::new(NODE).auditing_everything(audit_everything);
    compiler.resume(identities, highest);
    compiler.adopt_pinned_policies(
        state
            .policies
            .iter()
            .map(|(id, policy)| (*id, policy.clone())),
    );
    // In the agent's order: every apply sets the node's addresses, then syncs.
    compiler.set_node_addresses(node_addresses);
    compiler.sync(cluster.clone());
    compiler
}

/// Panics unless the rule table holds exactly the rules some policy entry names.
fn assert_rule_table_is_what_entries_name(state: &DatapathState, after: &dyn fmt::Display) {
    let named: BTreeSet<u32> = state
        .policies
        .values()
        .flat_map(|policy| policy.entries.values())
        .flat_map(|decided| [decided.admin.rule, decided.below.rule])
        .collect();
    let unnamed: Vec<&RuleOrigin> = state
        .rules
        .iter()
        .filter(|(id, _)| !named.contains(id))
        .map(|(_, origin)| origin)
        .collect();
    assert!(
        unnamed.is_empty(),
        "after {after}: the rule table keeps rules no policy entry names: {unnamed:?}"
    );
}

/// Applies `change` to `cluster`, as the compiler is told to.
fn apply(cluster: &mut Cluster, change: Change) {
    fn upsert<K: Ord, V>(map: &mut BTreeMap<K, V>, key: K, value: Option<V>) {
        match value {
            Some(value) => map.insert(key, value),
            None => map.remove(&key),
        };
    }
    match change {
        Change::Pod(id, pod) => upsert(&mut cluster.pods, id, pod),
        Change::Namespace(name, namespace) => upsert(&mut cluster.namespaces, name, namespace),
        Change::Policy(id, policy) => upsert(&mut cluster.policies, id, policy),
        Change::Service(id, service) => upsert(&mut cluster.services, id, service),
        Change::ClusterPolicy(name, policy) => upsert(&mut cluster.cluster_policies, name, policy),
        Change::Node(name, node) => upsert(&mut cluster.nodes, name, node),
    }
}

/// Panics unless `compiler`'s state is consistent and equals, up to ids, what a new compiler
/// makes of `cluster` on a node with `node_addresses`.
pub fn assert_equals_full_recompile(
    compiler: &Compiler,
    cluster: &Cluster,
    node_addresses: &[IpAddr],
    audit_everything: bool,
    after: &dyn fmt::Display,
) {
    let mut fresh = Compiler::new(NODE).auditing_everything(audit_everything);
    fresh.set_node_addresses(node_addresses);
    fresh.sync(cluster.clone());
    assert_consistent(compiler.state(), after);
    assert_consistent(fresh.state(), &"a full recompile");
    let incremental = Canonical::of(compiler.state());
    let full = Canonical::of(fresh.state());
    assert!(
        incremental == full,
        "after {after}, the incremental state differs from a full recompile:\n{}",
        difference(&incremental, &full)
    );
}

/// The first fields in which two canonical states differ, for the crash report.
fn difference(incremental: &Canonical, full: &Canonical) -> String {
    let mut report = String::new();
    let mut field = |name: &str, left: String, right: String| {
        if left != right {
            let _ = writeln!(
                report,
                "{name}:\n  incremental: {left}\n  full:        {right}"
            );
        }
    };
    field(
        "ipcache",
        format!("{:?}", incremental.ipcache),
        format!("{:?}", full.ipcache),
    );
    field(
        "endpoints",
        format!("{:?}", incremental.endpoints),
        format!("{:?}", full.endpoints),
    );
    field(
        "policies",
        format!("{:?}", incremental.policies),
        format!("{:?}", full.policies),
    );
    field(
        "rules",
        format!("{:?}", incremental.rules),
        format!("{:?}", full.rules),
    );
    field(
        "identities",
        format!("{:?}", incremental.identities),
        format!("{:?}", full.identities),
    );
    field(
        "service_frontends",
        format!("{:?}", incremental.service_frontends),
        format!("{:?}", full.service_frontends),
    );
    field(
        "warnings",
        format!("{:?}", incremental.warnings),
        format!("{:?}", full.warnings),
    );
    report
}

/// Panics unless every id `state` names exists and everything it holds is used: what the
/// datapath needs to install it without dangling entries or leaks.
pub fn assert_consistent(state: &DatapathState, after: &dyn fmt::Display) {
    let used_policies: BTreeSet<PolicyId> = state
        .endpoints
        .values()
        .flat_map(|endpoint| [endpoint.ingress, endpoint.egress])
        .flatten()
        .collect();
    let policies: BTreeSet<PolicyId> = state.policies.keys().copied().collect();
    assert_eq!(
        used_policies, policies,
        "after {after}: the policies the endpoints use are not the policies the state holds"
    );
    for (pod, endpoint) in &state.endpoints {
        assert_eq!(
            &endpoint.pod, pod,
            "after {after}: endpoint under another key"
        );
        assert!(
            state.identities.contains_key(&endpoint.identity),
            "after {after}: endpoint {pod} has identity {} that is not in use",
            endpoint.identity
        );
        assert_eq!(
            endpoint.ingress.is_some(),
            !endpoint.ingress_isolated_by.is_empty()
                || !endpoint.ingress_cluster_policies.is_empty(),
            "after {after}: endpoint {pod}: an ingress policy without isolating policies, or the reverse"
        );
        assert_eq!(
            endpoint.egress.is_some(),
            !endpoint.egress_isolated_by.is_empty() || !endpoint.egress_cluster_policies.is_empty(),
            "after {after}: endpoint {pod}: an egress policy without isolating policies, or the reverse"
        );
    }
    for (id, policy) in &state.policies {
        for (entry, decided) in &policy.entries {
            for rule in [decided.admin.rule, decided.below.rule] {
                assert!(
                    rule == 0 || state.rules.contains_key(&rule),
                    "after {after}: policy {id} names rule {rule}, which the rule table lacks"
                );
            }
            let is_class = entry.peer & CIDR_CLASS_FLAG != 0;
            assert!(
                is_class
                    || entry.peer < FIRST_POD_IDENTITY
                    || state.identities.contains_key(&entry.peer),
                "after {after}: policy {id} names identity {}, which is not in use",
                entry.peer
            );
        }
        for class in policy.cidrs.values() {
            assert!(
                class & CIDR_CLASS_FLAG != 0,
                "after {after}: policy {id} maps a prefix to {class}, which is not a CIDR class"
            );
        }
    }
    assert_rule_table_is_what_entries_name(state, after);
    for (address, identity) in &state.ipcache {
        assert!(
            *identity == IDENTITY_HOST || state.identities.contains_key(identity),
            "after {after}: {address} has identity {identity}, which is not in use"
        );
    }
    let distinct_identities: BTreeSet<&IdentityInfo> =
        state.identities.values().map(AsRef::as_ref).collect();
    assert_eq!(
        distinct_identities.len(),
        state.identities.len(),
        "after {after}: two identities for one label set: {:?}",
        state.identities
    );
    let frontend_ids: BTreeSet<u32> = state
        .service_frontends
        .values()
        .map(|info| info.id)
        .collect();
    assert_eq!(
        frontend_ids.len(),
        state.service_frontends.len(),
        "after {after}: two frontends share an id"
    );
    assert!(
        !frontend_ids.contains(&0),
        "after {after}: a frontend has id 0"
    );
}

/// A peer of a policy entry, named by what it stands for instead of its number.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum PeerName {
    /// A label-set identity.
    Identity(IdentityInfo),
    /// A CIDR class: numbered by the policy's own content, so equal content numbers alike.
    Class(PeerId),
    /// The node, or another reserved identity.
    Reserved(PeerId),
}

/// A compiled policy, its identities named by label set and its rules by origin.
/// A tier's match in an entry: the rule's origin, rank and action.
type CanonicalMatch = (Option<RuleOrigin>, u16, u8);

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct CanonicalPolicy {
    /// Per entry, each tier's match.
    entries: BTreeMap<(PeerName, Option<u8>, u16, u8), [CanonicalMatch; 2]>,
    cidrs: BTreeMap<IpNet, PeerId>,
}

/// A local endpoint with its policies' content instead of their ids.
#[derive(Clone, Debug, PartialEq, Eq)]
struct CanonicalEndpoint {
    ips: Vec<IpAddr>,
    identity: PeerName,
    ingress: Option<CanonicalPolicy>,
    egress: Option<CanonicalPolicy>,
    ingress_isolated_by: Vec<PolicyRef>,
    egress_isolated_by: Vec<PolicyRef>,
    ingress_audit: bool,
    egress_audit: bool,
}

/// A [`DatapathState`] without the numbering of identities, policies, rules and frontends,
/// which depends on the order things happened in: two compilers that agree on what the maps
/// enforce have equal canonical states.
#[derive(Debug, PartialEq, Eq)]
struct Canonical {
    ipcache: BTreeMap<IpAddr, PeerName>,
    endpoints: BTreeMap<PodRef, CanonicalEndpoint>,
    policies: BTreeSet<CanonicalPolicy>,
    rules: BTreeSet<RuleOrigin>,
    identities: BTreeSet<IdentityInfo>,
    service_frontends: BTreeMap<Frontend, (ServiceRef, Option<String>, FrontendKind)>,
    warnings: Vec<String>,
}

impl Canonical {
    fn of(state: &DatapathState) -> Self {
        let peer = |id: PeerId| {
            if id & CIDR_CLASS_FLAG != 0 {
                PeerName::Class(id)
            } else {
                state
                    .identities
                    .get(&id)
                    .map_or(PeerName::Reserved(id), |info| {
                        PeerName::Identity(info.as_ref().clone())
                    })
            }
        };
        let policy = |compiled: &CompiledPolicy| CanonicalPolicy {
            entries: compiled
                .entries
                .iter()
                .map(|(entry, decided)| {
                    let tier = |matched: netwarden_common::TierMatch| {
                        (
                            state.rules.get(&matched.rule).cloned(),
                            matched.rank,
                            matched.action,
                        )
                    };
                    (
                        (
                            peer(entry.peer),
                            entry.protocol,
                            entry.port,
                            entry.port_bits,
                        ),
                        [tier(decided.admin), tier(decided.below)],
                    )
                })
                .collect(),
            cidrs: compiled.cidrs.clone(),
        };
        let policy_of =
            |id: Option<PolicyId>| id.and_then(|id| state.policies.get(&id)).map(policy);
        Self {
            ipcache: state
                .ipcache
                .iter()
                .map(|(address, identity)| (*address, peer(*identity)))
                .collect(),
            endpoints: state
                .endpoints
                .iter()
                .map(|(pod, endpoint)| {
                    (
                        pod.clone(),
                        CanonicalEndpoint {
                            ips: endpoint.ips.clone(),
                            identity: peer(endpoint.identity),
                            ingress: policy_of(endpoint.ingress),
                            egress: policy_of(endpoint.egress),
                            ingress_isolated_by: endpoint.ingress_isolated_by.clone(),
                            egress_isolated_by: endpoint.egress_isolated_by.clone(),
                            ingress_audit: endpoint.ingress_audit,
                            egress_audit: endpoint.egress_audit,
                        },
                    )
                })
                .collect(),
            policies: state.policies.values().map(policy).collect(),
            rules: state.rules.values().cloned().collect(),
            identities: state
                .identities
                .values()
                .map(|info| info.as_ref().clone())
                .collect(),
            service_frontends: state
                .service_frontends
                .iter()
                .map(|(frontend, info)| {
                    (
                        *frontend,
                        (info.service.clone(), info.port_name.clone(), info.kind),
                    )
                })
                .collect(),
            warnings: state.warnings.clone(),
        }
    }
}

// Generators. Each draws from the vocabularies above; when the input runs out, `arbitrary`
// answers with the smallest choice, so every input makes a scenario.

fn scenario(input: &mut Unstructured<'_>) -> Result<Scenario> {
    let audit_everything = input.ratio(1, 8)?;
    let node_addresses = node_addresses(input)?;
    let initial = cluster(input)?;
    let mut steps = Vec::new();
    while steps.len() < 12 && !input.is_empty() {
        steps.push(step(input)?);
    }
    Ok(Scenario {
        audit_everything,
        node_addresses,
        initial,
        steps,
    })
}

fn step(input: &mut Unstructured<'_>) -> Result<Step> {
    Ok(match input.int_in_range(0..=15)? {
        0..=11 => {
            let count = input.int_in_range(1..=4)?;
            let mut changes = Vec::with_capacity(count);
            for _ in 0..count {
                changes.push(change(input)?);
            }
            Step::Update(changes)
        }
        12 | 13 => Step::Sync(cluster(input)?),
        14 => Step::NodeAddresses(node_addresses(input)?),
        _ => Step::Restart,
    })
}

fn change(input: &mut Unstructured<'_>) -> Result<Change> {
    let delete = input.ratio(1, 4)?;
    Ok(match input.int_in_range(0..=7)? {
        0..=3 => {
            let id = pod_ref(input)?;
            let pod = if delete { None } else { Some(pod(input, &id)?) };
            Change::Pod(id, pod)
        }
        4 => {
            let name = (*input.choose(&NAMESPACES)?).to_owned();
            let namespace = if delete {
                None
            } else {
                Some(namespace(input, &name)?)
            };
            Change::Namespace(name, namespace)
        }
        5 | 6 => {
            let id = PolicyRef {
                namespace: (*input.choose(&NAMESPACES)?).to_owned(),
                name: (*input.choose(&POLICY_NAMES)?).to_owned(),
            };
            let policy = if delete {
                None
            } else {
                Some(policy(input, &id)?.into())
            };
            Change::Policy(id, policy)
        }
        _ => {
            let id = ServiceRef {
                namespace: (*input.choose(&NAMESPACES)?).to_owned(),
                name: (*input.choose(&SERVICE_NAMES)?).to_owned(),
            };
            let service = if delete {
                None
            } else {
                Some(service(input, &id)?)
            };
            Change::Service(id, service)
        }
    })
}

fn cluster(input: &mut Unstructured<'_>) -> Result<Cluster> {
    let mut cluster = Cluster::default();
    for name in NAMESPACES {
        // A namespace without an object still has pods: its labels are only its name.
        if input.ratio(7, 8)? {
            cluster
                .namespaces
                .insert(name.to_owned(), namespace(input, name)?);
        }
    }
    for _ in 0..input.int_in_range(0..=6)? {
        let id = pod_ref(input)?;
        let pod = pod(input, &id)?;
        cluster.pods.insert(id, pod);
    }
    for _ in 0..input.int_in_range(0..=3)? {
        let id = PolicyRef {
            namespace: (*input.choose(&NAMESPACES)?).to_owned(),
            name: (*input.choose(&POLICY_NAMES)?).to_owned(),
        };
        let policy = policy(input, &id)?;
        cluster.policies.insert(id, policy.into());
    }
    for _ in 0..input.int_in_range(0..=2)? {
        let id = ServiceRef {
            namespace: (*input.choose(&NAMESPACES)?).to_owned(),
            name: (*input.choose(&SERVICE_NAMES)?).to_owned(),
        };
        let service = service(input, &id)?;
        cluster.services.insert(id, service);
    }
    Ok(cluster)
}

fn node_addresses(input: &mut Unstructured<'_>) -> Result<Vec<IpAddr>> {
    let mut addresses = Vec::new();
    for address in NODE_ADDRESSES {
        if input.ratio(1, 2)? {
            addresses.push(address);
        }
    }
    Ok(addresses)
}

fn namespace(input: &mut Unstructured<'_>, name: &str) -> Result<Namespace> {
    let mut labels = labels(input)?;
    // The API server sets it on every namespace, whatever the object says.
    labels.insert(NAMESPACE_NAME_LABEL.to_owned(), name.to_owned());
    Ok(Namespace {
        name: name.to_owned(),
        labels: labels.into(),
    })
}

fn pod_ref(input: &mut Unstructured<'_>) -> Result<PodRef> {
    Ok(PodRef {
        namespace: (*input.choose(&NAMESPACES)?).to_owned(),
        name: (*input.choose(&POD_NAMES)?).to_owned(),
    })
}

fn pod(input: &mut Unstructured<'_>, id: &PodRef) -> Result<Pod> {
    let node_name = match input.int_in_range(0..=5)? {
        0..=2 => Some(NODE.to_owned()),
        3 | 4 => Some(OTHER_NODE.to_owned()),
        _ => None,
    };
    // The conversion keeps `status.podIPs` as listed, repeats included.
    let mut ips = Vec::new();
    for _ in 0..input.int_in_range(0..=2)? {
        ips.push(*input.choose(&POD_ADDRESSES)?);
    }
    let candidates = [
        ContainerPort {
            name: Some("http".into()),
            port: 80,
            protocol: Protocol::Tcp,
        },
        ContainerPort {
            name: Some("http".into()),
            port: 8080,
            protocol: Protocol::Tcp,
        },
        ContainerPort {
            name: Some("dns".into()),
            port: 53,
            protocol: Protocol::Udp,
        },
        ContainerPort {
            name: Some("dns".into()),
            port: 53,
            protocol: Protocol::Tcp,
        },
        ContainerPort {
            name: Some("sig".into()),
            port: 9000,
            protocol: Protocol::Sctp,
        },
        ContainerPort {
            name: None,
            port: 9000,
            protocol: Protocol::Tcp,
        },
    ];
    let mut ports = Vec::new();
    for candidate in candidates {
        if input.ratio(1, 4)? {
            ports.push(candidate);
        }
    }
    Ok(Pod {
        id: id.clone(),
        labels: labels(input)?.into(),
        node_name: node_name.map(Into::into),
        ips,
        ports: ports.into(),
        host_network: input.ratio(1, 8)?,
        service_account: "default".to_owned().into(),
        mtls: PodMtls::default().into(),
    })
}

fn labels(input: &mut Unstructured<'_>) -> Result<Labels> {
    let mut labels = Labels::new();
    for _ in 0..input.int_in_range(0..=2)? {
        labels.insert(
            (*input.choose(&LABEL_KEYS[..3])?).to_owned(),
            (*input.choose(&LABEL_VALUES)?).to_owned(),
        );
    }
    Ok(labels)
}

fn selector(input: &mut Unstructured<'_>) -> Result<LabelSelector> {
    let mut requirements = Vec::new();
    for _ in 0..input.int_in_range(0..=2)? {
        let key = (*input.choose(&LABEL_KEYS)?).to_owned();
        // `In` and `NotIn` need values; the conversion rejects them without.
        let mut values = vec![(*input.choose(&LABEL_VALUES)?).to_owned()];
        if input.ratio(1, 3)? {
            values.push((*input.choose(&LABEL_VALUES)?).to_owned());
        }
        requirements.push(match input.int_in_range(0..=3)? {
            0 => Requirement::In(key, values),
            1 => Requirement::NotIn(key, values),
            2 => Requirement::Exists(key),
            _ => Requirement::DoesNotExist(key),
        });
    }
    Ok(LabelSelector { requirements })
}

fn peer(input: &mut Unstructured<'_>) -> Result<Peer> {
    Ok(match input.int_in_range(0..=3)? {
        0 => Peer::Pods {
            pod_selector: Some(selector(input)?),
            namespace_selector: None,
        },
        1 => Peer::Pods {
            pod_selector: None,
            namespace_selector: Some(selector(input)?),
        },
        2 => Peer::Pods {
            pod_selector: Some(selector(input)?),
            namespace_selector: Some(selector(input)?),
        },
        _ => {
            let (cidr, excepts) = *input.choose(&BLOCKS)?;
            let mut except = Vec::new();
            for text in excepts {
                if input.ratio(1, 2)? {
                    except.push(text.parse().expect("the vocabulary's excepts parse"));
                }
            }
            Peer::IpBlock {
                cidr: cidr.parse().expect("the vocabulary's blocks parse"),
                except,
            }
        }
    })
}

fn port_spec(input: &mut Unstructured<'_>) -> Result<PortSpec> {
    let protocol = *input.choose(&PROTOCOLS)?;
    Ok(match input.int_in_range(0..=3)? {
        0 => PortSpec {
            protocol,
            port: None,
            end_port: None,
        },
        1 => PortSpec {
            protocol,
            port: Some(PortRef::Number(*input.choose(&PORT_NUMBERS)?)),
            end_port: None,
        },
        2 => {
            let (first, last) = *input.choose(&PORT_RANGES)?;
            PortSpec {
                protocol,
                port: Some(PortRef::Number(first)),
                end_port: Some(last),
            }
        }
        _ => PortSpec {
            protocol,
            port: Some(PortRef::Name((*input.choose(&PORT_NAMES)?).to_owned())),
            end_port: None,
        },
    })
}

fn rules(input: &mut Unstructured<'_>) -> Result<Vec<Rule>> {
    let mut rules = Vec::new();
    for _ in 0..input.int_in_range(0..=2)? {
        let mut peers = Vec::new();
        for _ in 0..input.int_in_range(0..=2)? {
            peers.push(peer(input)?);
        }
        let mut ports = Vec::new();
        for _ in 0..input.int_in_range(0..=2)? {
            ports.push(port_spec(input)?);
        }
        rules.push(Rule { peers, ports });
    }
    Ok(rules)
}

fn policy(input: &mut Unstructured<'_>, id: &PolicyRef) -> Result<NetworkPolicy> {
    // Validation never yields a policy isolating neither direction.
    let (ingress, egress) = *input.choose(&[(true, false), (false, true), (true, true)])?;
    Ok(NetworkPolicy {
        id: id.clone(),
        pod_selector: selector(input)?,
        policy_types: PolicyTypes { ingress, egress },
        ingress: rules(input)?,
        egress: rules(input)?,
        enforcement: if input.ratio(1, 4)? {
            Enforcement::Audit
        } else {
            Enforcement::Enforce
        },
    })
}

fn addresses_from(input: &mut Unstructured<'_>, pool: &[IpAddr]) -> Result<Vec<IpAddr>> {
    let mut addresses = Vec::new();
    for _ in 0..input.int_in_range(0..=2)? {
        addresses.push(*input.choose(pool)?);
    }
    Ok(addresses)
}

fn service(input: &mut Unstructured<'_>, id: &ServiceRef) -> Result<Service> {
    let service_type = *input.choose(&[
        ServiceType::ClusterIp,
        ServiceType::NodePort,
        ServiceType::LoadBalancer,
        ServiceType::ExternalName,
    ])?;
    // The conversion reads no cluster IP of an ExternalName Service.
    let cluster_ips = if service_type == ServiceType::ExternalName {
        Vec::new()
    } else {
        addresses_from(input, &SERVICE_ADDRESSES[..3])?
    };
    let has_node_ports = matches!(
        service_type,
        ServiceType::NodePort | ServiceType::LoadBalancer
    );
    let mut ports = Vec::new();
    for _ in 0..input.int_in_range(0..=2)? {
        let port = *input.choose(&[53, 80, 8080])?;
        ports.push(ServicePort {
            name: input
                .choose(&[None, Some("http"), Some("dns")])?
                .map(str::to_owned),
            protocol: *input.choose(&PROTOCOLS)?,
            port,
            target_port: if input.ratio(1, 3)? {
                PortRef::Name((*input.choose(&PORT_NAMES)?).to_owned())
            } else {
                PortRef::Number(*input.choose(&[port, 8080, 9000])?)
            },
            node_port: if has_node_ports {
                *input.choose(&[None, Some(30080), Some(30053)])?
            } else {
                None
            },
        });
    }
    Ok(Service {
        id: id.clone(),
        service_type,
        cluster_ips,
        external_ips: addresses_from(input, &SERVICE_ADDRESSES[3..])?,
        // The conversion reads `status.loadBalancer` whatever the type.
        load_balancer_ips: addresses_from(input, &SERVICE_ADDRESSES[3..])?,
        ports,
        selector: labels(input)?,
    })
}
