//! From a cluster snapshot to the content of the datapath maps.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    net::IpAddr,
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use netwarden_common::{
    CIDR_CLASS_FLAG, IDENTITY_HOST, POLICY_KEY_ANY_PORT_BITS, POLICY_KEY_ANY_PROTOCOL_BITS, PeerId,
    PolicyKey,
};
use netwarden_model::{
    Cluster, ContainerPort, Namespace, NetworkPolicy, Peer, Pod, PodRef, PolicyRef, PortRef,
    PortSpec, Rule, Service, ServiceRef,
};
use rustc_hash::FxHashMap;

use crate::{
    cidr::{self, Block},
    frontends::{Frontend, FrontendId, FrontendInfo, FrontendTable},
    identity::{IdentityAllocator, IdentityInfo, resolve_named_port},
    ports::port_prefixes,
};

/// Id of one compiled policy in the datapath maps. Ids are never reused by one compiler, so an
/// endpoint can be switched from one policy to the next in a single map write.
pub type PolicyId = u32;

/// Id of one rule of one NetworkPolicy, for attribution.
pub type RuleId = u32;

/// Direction from the pod's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// Traffic towards the pod.
    Ingress,
    /// Traffic leaving the pod.
    Egress,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ingress => "ingress",
            Self::Egress => "egress",
        })
    }
}

/// One entry of a policy: a peer, and the protocol and ports it may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyMatch {
    /// A label-set identity, or a CIDR class of this policy.
    pub peer: PeerId,
    /// The IP protocol, or every protocol.
    pub protocol: Option<u8>,
    /// First port of an aligned block (0 when `port_bits` is 0).
    pub port: u16,
    /// Fixed leading bits of the port: 16 for one port, 0 for every port.
    pub port_bits: u8,
}

impl PolicyMatch {
    /// The LPM key (prefix length and data) of this entry in policy `policy`.
    #[must_use]
    pub fn key(&self, policy: PolicyId) -> (u32, PolicyKey) {
        match self.protocol {
            None => (
                POLICY_KEY_ANY_PROTOCOL_BITS,
                PolicyKey::new(policy, self.peer, 0, 0),
            ),
            Some(protocol) => (
                POLICY_KEY_ANY_PORT_BITS + u32::from(self.port_bits),
                PolicyKey::new(policy, self.peer, protocol, self.port),
            ),
        }
    }

    /// The policy and entry of an LPM key read back from the policy map: the inverse of
    /// [`PolicyMatch::key`].
    #[must_use]
    pub fn from_key(prefix_len: u32, key: &PolicyKey) -> (PolicyId, Self) {
        let policy = u32::from_be_bytes(key.policy);
        let peer = u32::from_be_bytes(key.peer);
        let entry = if prefix_len <= POLICY_KEY_ANY_PROTOCOL_BITS {
            Self {
                peer,
                protocol: None,
                port: 0,
                port_bits: 0,
            }
        } else {
            Self {
                peer,
                protocol: Some(key.protocol),
                port: u16::from_be_bytes(key.port),
                port_bits: u8::try_from(prefix_len.saturating_sub(POLICY_KEY_ANY_PORT_BITS))
                    .unwrap_or(16)
                    .min(16),
            }
        };
        (policy, entry)
    }

    /// Whether a flow with this protocol and destination port falls under the entry.
    #[must_use]
    pub fn covers(&self, protocol: u8, port: u16) -> bool {
        match self.protocol {
            None => true,
            Some(own) if own != protocol => false,
            Some(_) if self.port_bits == 0 => true,
            Some(_) => {
                let mask = u16::MAX << (16 - u32::from(self.port_bits));
                port & mask == self.port
            }
        }
    }
}

/// Everything one endpoint's direction allows.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct CompiledPolicy {
    /// Allowed (peer, protocol, port) entries, with the rule that allowed each.
    pub entries: BTreeMap<PolicyMatch, RuleId>,
    /// Address prefixes of `ipBlock` rules, mapped to their CIDR class.
    pub cidrs: BTreeMap<IpNet, PeerId>,
}

/// A compiled policy's entries and prefixes without their rule ids.
type PolicyShape = (Vec<PolicyMatch>, Vec<(IpNet, PeerId)>);

impl CompiledPolicy {
    /// What the policy lets through, without the rule ids that only attribute it: two
    /// policies of equal shape enforce the same, and one can take the other's place by
    /// rewriting the values of its entries, never adding or removing a key.
    fn shape(&self) -> PolicyShape {
        (
            self.entries.keys().copied().collect(),
            self.cidrs
                .iter()
                .map(|(net, class)| (*net, *class))
                .collect(),
        )
    }
}

/// Policies a previous agent left in the maps, offered to the first compilation so that an
/// unchanged policy keeps its id and its entries (see [`Compiler::adopt_pinned_policies`]).
#[derive(Clone, Debug, Default)]
struct PinnedPolicies {
    /// By exact content, rule ids included.
    exact: FxHashMap<CompiledPolicy, PolicyId>,
    /// By shape, for content that differs only in rule ids.
    by_shape: FxHashMap<PolicyShape, BTreeSet<PolicyId>>,
    /// Every pinned policy's content, by id.
    content: BTreeMap<PolicyId, CompiledPolicy>,
}

impl PinnedPolicies {
    /// Takes the pinned id for `compiled`, preferring one of equal content: each pinned id is
    /// given to one compiled policy at most.
    fn take(&mut self, compiled: &CompiledPolicy) -> Option<PolicyId> {
        let id = match self.exact.get(compiled) {
            Some(id) => *id,
            None => *self.by_shape.get(&compiled.shape())?.first()?,
        };
        let pinned = self.content.remove(&id)?;
        self.exact.remove(&pinned);
        if let Some(ids) = self.by_shape.get_mut(&pinned.shape()) {
            ids.remove(&id);
        }
        Some(id)
    }
}

/// Where a rule comes from.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleOrigin {
    /// The NetworkPolicy.
    pub policy: PolicyRef,
    /// `ingress` or `egress`.
    pub direction: Direction,
    /// Index of the rule in that list.
    pub index: usize,
}

/// Rule ids are 31-bit, never 0.
const RULE_ID_MASK: RuleId = 0x7fff_ffff;

impl RuleOrigin {
    /// The rule's preferred id: a digest of where it comes from, in `1..=RULE_ID_MASK`.
    fn stable_id(&self) -> RuleId {
        use sha2::{Digest as _, Sha256};
        let mut hasher = Sha256::new();
        let direction = self.direction.to_string();
        for field in [
            self.policy.namespace.as_bytes(),
            self.policy.name.as_bytes(),
            direction.as_bytes(),
        ] {
            hasher.update((field.len() as u64).to_be_bytes());
            hasher.update(field);
        }
        hasher.update((self.index as u64).to_be_bytes());
        let digest = hasher.finalize();
        let id = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]) & RULE_ID_MASK;
        id.max(1)
    }
}

impl fmt::Display for RuleOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "NetworkPolicy {} {}[{}]",
            self.policy, self.direction, self.index
        )
    }
}

/// A pod on this node, and what its veth enforces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalEndpoint {
    /// The pod.
    pub pod: PodRef,
    /// Its addresses.
    pub ips: Vec<IpAddr>,
    /// Its identity.
    pub identity: PeerId,
    /// The policy for traffic towards it; `None` when no policy isolates it for ingress.
    pub ingress: Option<PolicyId>,
    /// The policy for traffic leaving it; `None` when no policy isolates it for egress.
    pub egress: Option<PolicyId>,
    /// The policies that isolate it for ingress, for explanations.
    pub ingress_isolated_by: Vec<PolicyRef>,
    /// The policies that isolate it for egress.
    pub egress_isolated_by: Vec<PolicyRef>,
}

/// The content of every datapath map, as the compiler wants it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DatapathState {
    /// Every pod address in the cluster and every node address, with its identity.
    pub ipcache: BTreeMap<IpAddr, PeerId>,
    /// Local endpoints.
    pub endpoints: BTreeMap<PodRef, LocalEndpoint>,
    /// Compiled policies referenced by the endpoints.
    pub policies: BTreeMap<PolicyId, CompiledPolicy>,
    /// The rules the policies' entries name.
    pub rules: BTreeMap<RuleId, RuleOrigin>,
    /// Identities in use.
    pub identities: BTreeMap<PeerId, IdentityInfo>,
    /// Every Service address and port kube-proxy translates, with the Service it leads to.
    pub service_frontends: BTreeMap<Frontend, FrontendInfo>,
    /// Things the compiler could not express, naming the object.
    pub warnings: Vec<String>,
}

impl DatapathState {
    /// The frontend with id `id`, for attribution. A linear search: events are rate-limited,
    /// and frontends number in the thousands.
    #[must_use]
    pub fn frontend(&self, id: FrontendId) -> Option<(&Frontend, &FrontendInfo)> {
        self.service_frontends
            .iter()
            .find(|(_, info)| info.id == id)
    }
}

/// One change to the cluster, as a source reports it: the object's new version, or `None` when
/// it was deleted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A pod was created, updated or deleted.
    Pod(PodRef, Option<Pod>),
    /// A namespace was created, updated or deleted.
    Namespace(String, Option<Namespace>),
    /// A NetworkPolicy was created, updated or deleted.
    Policy(PolicyRef, Option<NetworkPolicy>),
    /// A Service was created, updated or deleted.
    Service(ServiceRef, Option<Service>),
}

/// A pod/namespace selector peer, in the namespace of the policy it belongs to.
type SelectorKey = (String, Peer);

/// The compiler. It keeps the datapath state for the cluster it was told about and updates it
/// from one change at a time, touching only what the change can affect:
///
/// - a pod changes the IP cache for its addresses; when it creates or retires a label-set
///   identity, the cached selectors are checked against that one identity, and only the
///   endpoints whose policies use a selector whose match set changed are recompiled;
/// - a namespace re-checks the selectors against the identities of that namespace;
/// - a policy recompiles the local pods its old or new version selects;
/// - a Service replaces its own frontends, and node addresses the node-port frontends.
///
/// Identity, policy and rule ids stay stable from one change to the next, so a small change to
/// the cluster is a small change to the maps. A new peer pod whose label set already exists
/// changes only the IP cache.
#[derive(Clone, Debug)]
pub struct Compiler {
    node: String,
    node_addresses: BTreeSet<IpAddr>,
    cluster: Cluster,
    identities: IdentityAllocator,
    /// Every pod, as little as the compiler needs of it: a fingerprint to tell changes, its
    /// identity and addresses. Only local pods are kept whole (`local`).
    pods: BTreeMap<PodRef, PodRecord>,
    namespace_identities: BTreeMap<String, BTreeSet<PeerId>>,
    ip_claims: BTreeMap<IpAddr, BTreeSet<PodRef>>,
    local: BTreeMap<PodRef, Pod>,
    selectors: FxHashMap<SelectorKey, BTreeSet<PeerId>>,
    selector_users: FxHashMap<SelectorKey, BTreeSet<PodRef>>,
    endpoint_selectors: FxHashMap<PodRef, Vec<SelectorKey>>,
    named_block_users: BTreeSet<PodRef>,
    policy_ids: FxHashMap<CompiledPolicy, PolicyId>,
    policy_users: FxHashMap<PolicyId, usize>,
    last_policy_id: PolicyId,
    pinned_policies: PinnedPolicies,
    rule_ids: FxHashMap<RuleOrigin, RuleId>,
    duplicate_ips: BTreeMap<IpAddr, String>,
    frontends: FrontendTable,
    dirty: BTreeSet<PodRef>,
    state: DatapathState,
}

impl Compiler {
    /// A compiler for the node called `node`, with an empty cluster.
    #[must_use]
    pub fn new(node: impl Into<String>) -> Self {
        Self {
            node: node.into(),
            node_addresses: BTreeSet::new(),
            cluster: Cluster::default(),
            identities: IdentityAllocator::default(),
            pods: BTreeMap::new(),
            namespace_identities: BTreeMap::new(),
            ip_claims: BTreeMap::new(),
            local: BTreeMap::new(),
            selectors: FxHashMap::default(),
            selector_users: FxHashMap::default(),
            endpoint_selectors: FxHashMap::default(),
            named_block_users: BTreeSet::new(),
            policy_ids: FxHashMap::default(),
            policy_users: FxHashMap::default(),
            last_policy_id: 0,
            pinned_policies: PinnedPolicies::default(),
            rule_ids: FxHashMap::default(),
            duplicate_ips: BTreeMap::new(),
            frontends: FrontendTable::default(),
            dirty: BTreeSet::new(),
            state: DatapathState::default(),
        }
    }

    /// Continues where a previous agent left off: `identities` are the numbers it gave (by
    /// [`IdentityInfo::digest`]), and `highest_policy_id` the highest policy id in its maps, so
    /// new policies never overwrite ones that endpoints still use.
    pub fn resume(&mut self, identities: HashMap<[u8; 32], PeerId>, highest_policy_id: PolicyId) {
        self.identities.prefer(identities);
        self.last_policy_id = self.last_policy_id.max(highest_policy_id);
    }

    /// Offers the policies a previous agent left in the maps (their id and content, as read
    /// back) to the next compilation: a policy it compiles whose pinned content is equal, or
    /// equal but for rule ids, keeps its pinned id, so an unchanged policy is not installed a
    /// second time beside its old copy (which would fill large maps until endpoints lock down).
    /// New ids start above every pinned one. Ids the next compilation does not claim are
    /// forgotten after it, and the datapath deletes them once no endpoint uses them.
    pub fn adopt_pinned_policies(
        &mut self,
        pinned: impl IntoIterator<Item = (PolicyId, CompiledPolicy)>,
    ) {
        for (id, content) in pinned {
            self.last_policy_id = self.last_policy_id.max(id);
            self.pinned_policies
                .by_shape
                .entry(content.shape())
                .or_default()
                .insert(id);
            self.pinned_policies
                .exact
                .entry(content.clone())
                .or_insert(id);
            self.pinned_policies.content.insert(id, content);
        }
    }

    /// Every pod address with the pod that owns it (the first claimant by namespace and name).
    pub fn pod_addresses(&self) -> impl Iterator<Item = (IpAddr, &PodRef)> {
        self.ip_claims
            .iter()
            .filter_map(|(ip, claims)| claims.first().map(|owner| (*ip, owner)))
    }

    /// The state for everything applied so far.
    #[must_use]
    pub fn state(&self) -> &DatapathState {
        &self.state
    }

    /// The node's own addresses: traffic from them to local pods is always allowed.
    pub fn set_node_addresses(&mut self, addresses: &[IpAddr]) -> &DatapathState {
        let new: BTreeSet<IpAddr> = addresses.iter().copied().collect();
        let touched: Vec<IpAddr> = self
            .node_addresses
            .symmetric_difference(&new)
            .copied()
            .collect();
        if touched.is_empty() {
            return &self.state;
        }
        self.node_addresses = new;
        for ip in touched {
            self.refresh_ip(ip);
        }
        for (id, service) in &self.cluster.services {
            if service.ports.iter().any(|port| port.node_port.is_some()) {
                self.frontends.set_service(
                    id,
                    Some(service),
                    &self.node_addresses,
                    &mut self.state.service_frontends,
                );
            }
        }
        self.collect_warnings();
        // Pinned ids are offered to one compilation, the first after a restart: the datapath
        // deletes those it did not claim, and an id once deleted is not used again.
        self.pinned_policies = PinnedPolicies::default();
        &self.state
    }

    /// Brings the compiler to `cluster`, applying only the objects that differ from what it
    /// has. Takes the snapshot by value: changed objects move into the compiler uncopied.
    pub fn sync(&mut self, cluster: Cluster) -> &DatapathState {
        let Cluster {
            namespaces,
            pods,
            policies,
            services,
            // The datapath judges the translated flow by its backend pod: it needs no backends.
            endpoint_slices: _,
            // Not compiled yet (issue #15, part 2): only the reference evaluator reads them.
            cluster_policies: _,
            nodes: _,
        } = cluster;
        let mut changes = Vec::new();
        diff(
            &self.cluster.namespaces,
            namespaces,
            &mut changes,
            Change::Namespace,
        );
        for id in self.pods.keys() {
            if !pods.contains_key(id) {
                changes.push(Change::Pod(id.clone(), None));
            }
        }
        for (id, pod) in pods {
            if self.pods.get(&id).map(|record| record.fingerprint) != Some(fingerprint(&pod)) {
                changes.push(Change::Pod(id, Some(pod)));
            }
        }
        diff(
            &self.cluster.policies,
            policies,
            &mut changes,
            Change::Policy,
        );
        diff(
            &self.cluster.services,
            services,
            &mut changes,
            Change::Service,
        );
        self.update(changes)
    }

    /// Applies `changes` and recompiles what they affect.
    pub fn update(&mut self, changes: impl IntoIterator<Item = Change>) -> &DatapathState {
        for change in changes {
            match change {
                Change::Pod(id, pod) => self.change_pod(id, pod),
                Change::Namespace(name, namespace) => self.change_namespace(&name, namespace),
                Change::Policy(id, policy) => self.change_policy(&id, policy),
                Change::Service(id, service) => self.change_service(&id, service),
            }
        }
        for pod in std::mem::take(&mut self.dirty) {
            self.recompile_endpoint(&pod);
        }
        // Nobody needs these match sets maintained any more.
        let unused: Vec<SelectorKey> = self
            .selector_users
            .iter()
            .filter(|(_, users)| users.is_empty())
            .map(|(key, _)| key.clone())
            .collect();
        for key in unused {
            self.selector_users.remove(&key);
            self.selectors.remove(&key);
        }
        self.collect_warnings();
        &self.state
    }

    fn collect_warnings(&mut self) {
        self.state.warnings = self
            .duplicate_ips
            .values()
            .chain(self.frontends.conflicts())
            .cloned()
            .collect();
    }

    fn change_service(&mut self, id: &ServiceRef, service: Option<Service>) {
        let old = match service {
            Some(service) => self.cluster.services.insert(id.clone(), service),
            None => self.cluster.services.remove(id),
        };
        let new = self.cluster.services.get(id);
        if old.as_ref() == new {
            return;
        }
        self.frontends.set_service(
            id,
            new,
            &self.node_addresses,
            &mut self.state.service_frontends,
        );
    }

    fn effective(pod: Option<&Pod>) -> Option<&Pod> {
        // Host-network pods share the node's addresses: policy neither selects them nor can
        // tell them from the node. Pods without an address have nothing to enforce yet.
        pod.filter(|pod| !pod.host_network && !pod.ips.is_empty())
    }

    fn change_pod(&mut self, id: PodRef, pod: Option<Pod>) {
        let new_fingerprint = pod.as_ref().map(fingerprint);
        if self.pods.get(&id).map(|record| record.fingerprint) == new_fingerprint {
            return;
        }
        let old_local = self.local.remove(&id).is_some();
        let mut touched_ips = Vec::new();
        if let Some(old) = self.pods.remove(&id) {
            if let Some(identity) = old.identity
                && let Some(retired) = self.identities.release_id(identity)
            {
                self.identity_retired(retired);
            }
            for ip in old.ips {
                if let Some(claims) = self.ip_claims.get_mut(&ip) {
                    claims.remove(&id);
                    if claims.is_empty() {
                        self.ip_claims.remove(&ip);
                    }
                }
                touched_ips.push(ip);
            }
        }
        let mut new_local = false;
        if let (Some(pod), Some(fingerprint)) = (pod, new_fingerprint) {
            let mut record = PodRecord {
                fingerprint,
                identity: None,
                ips: Vec::new(),
            };
            if Self::effective(Some(&pod)).is_some() {
                let info = IdentityInfo::of(&pod);
                let (identity, is_new) = self.identities.acquire(&info);
                if is_new {
                    self.identity_created(identity, &info);
                }
                record.identity = Some(identity);
                record.ips.clone_from(&pod.ips);
                for ip in &pod.ips {
                    self.ip_claims.entry(*ip).or_default().insert(id.clone());
                    touched_ips.push(*ip);
                }
            }
            self.pods.insert(id.clone(), record);
            if pod.node_name.as_deref() == Some(self.node.as_str()) {
                new_local = true;
                self.local.insert(id.clone(), pod);
            }
        }
        for ip in touched_ips {
            self.refresh_ip(ip);
        }
        if old_local || new_local {
            self.dirty.insert(id);
        }
        // Egress rules with ipBlock peers and named ports depend on every pod's addresses and
        // ports; they are rare, so their endpoints are simply recompiled.
        self.dirty.extend(self.named_block_users.iter().cloned());
    }

    fn change_namespace(&mut self, name: &str, namespace: Option<Namespace>) {
        let old = match namespace {
            Some(namespace) => self.cluster.namespaces.insert(name.to_owned(), namespace),
            None => self.cluster.namespaces.remove(name),
        };
        if old.as_ref() == self.cluster.namespaces.get(name) {
            return;
        }
        let labels = self.cluster.namespace_labels(name);
        let members: Vec<PeerId> = self
            .namespace_identities
            .get(name)
            .map(|members| members.iter().copied().collect())
            .unwrap_or_default();
        for (key, matched) in &mut self.selectors {
            let (
                _,
                Peer::Pods {
                    pod_selector,
                    namespace_selector: Some(namespace_selector),
                },
            ) = key
            else {
                continue;
            };
            for id in &members {
                let info = &self.identities.identities()[id];
                let matches = namespace_selector.matches(&labels)
                    && pod_selector
                        .as_ref()
                        .is_none_or(|selector| selector.matches(&info.labels));
                let changed = if matches {
                    matched.insert(*id)
                } else {
                    matched.remove(id)
                };
                if changed {
                    self.dirty
                        .extend(self.selector_users.get(key).into_iter().flatten().cloned());
                }
            }
        }
    }

    fn change_policy(&mut self, id: &PolicyRef, policy: Option<NetworkPolicy>) {
        let old = match policy {
            Some(policy) => self.cluster.policies.insert(id.clone(), policy),
            None => self.cluster.policies.remove(id),
        };
        let policy = self.cluster.policies.get(id).cloned();
        if old == policy {
            return;
        }
        let namespace = PodRef {
            namespace: id.namespace.clone(),
            name: String::new(),
        };
        for (pod, local) in self
            .local
            .range(namespace..)
            .take_while(|(pod, _)| pod.namespace == id.namespace)
        {
            let labels = &local.labels;
            let selected = |policy: &Option<NetworkPolicy>| {
                policy.as_ref().is_some_and(|policy| {
                    policy.id.namespace == pod.namespace && policy.pod_selector.matches(labels)
                })
            };
            if selected(&old) || selected(&policy) {
                self.dirty.insert(pod.clone());
            }
        }
    }

    fn identity_created(&mut self, identity: PeerId, info: &IdentityInfo) {
        self.state.identities.insert(identity, info.clone());
        self.namespace_identities
            .entry(info.namespace.clone())
            .or_default()
            .insert(identity);
        let namespace_labels = self.cluster.namespace_labels(&info.namespace);
        for (key, matched) in &mut self.selectors {
            if selector_matches(key, info, &namespace_labels) && matched.insert(identity) {
                self.dirty
                    .extend(self.selector_users.get(key).into_iter().flatten().cloned());
            }
        }
    }

    fn identity_retired(&mut self, identity: PeerId) {
        if let Some(info) = self.state.identities.remove(&identity)
            && let Some(members) = self.namespace_identities.get_mut(&info.namespace)
        {
            members.remove(&identity);
            if members.is_empty() {
                self.namespace_identities.remove(&info.namespace);
            }
        }
        for (key, matched) in &mut self.selectors {
            if matched.remove(&identity) {
                self.dirty
                    .extend(self.selector_users.get(key).into_iter().flatten().cloned());
            }
        }
    }

    /// Sets the IP cache entry of `ip`: the node if it is a node address, else the identity of
    /// the first pod (by namespace and name) that claims it.
    fn refresh_ip(&mut self, ip: IpAddr) {
        let claims = self.ip_claims.get(&ip);
        match claims
            .map(|claims| claims.iter().collect::<Vec<_>>())
            .as_deref()
        {
            Some([_, second, ..]) => {
                let owner = claims
                    .and_then(|claims| claims.first())
                    .expect("two claims");
                self.duplicate_ips.insert(
                    ip,
                    format!("Pod {second}: status.podIPs: {ip} is also the address of Pod {owner}; using {owner}"),
                );
            }
            _ => {
                self.duplicate_ips.remove(&ip);
            }
        }
        let owner_identity = claims
            .and_then(|claims| claims.first())
            .and_then(|owner| self.pods.get(owner))
            .and_then(|record| record.identity);
        let identity = if self.node_addresses.contains(&ip) {
            Some(IDENTITY_HOST)
        } else {
            owner_identity
        };
        match identity {
            Some(identity) => {
                self.state.ipcache.insert(ip, identity);
            }
            None => {
                self.state.ipcache.remove(&ip);
            }
        }
    }

    fn recompile_endpoint(&mut self, id: &PodRef) {
        // Forget what the endpoint used before.
        if let Some(old) = self.state.endpoints.remove(id) {
            for policy in [old.ingress, old.egress].into_iter().flatten() {
                self.release_policy(policy);
            }
        }
        for key in self.endpoint_selectors.remove(id).unwrap_or_default() {
            // A selector nobody uses any more is dropped at the end of the update, so that
            // an endpoint recompiled in the same update finds it still computed.
            if let Some(users) = self.selector_users.get_mut(&key) {
                users.remove(id);
            }
        }
        self.named_block_users.remove(id);

        let Some(pod) = Self::effective(self.local.get(id)).cloned() else {
            return;
        };
        let Some(identity) = self.pods.get(id).and_then(|record| record.identity) else {
            return;
        };
        let selecting: Vec<NetworkPolicy> = self
            .cluster
            .policies
            .range(
                PolicyRef {
                    namespace: id.namespace.clone(),
                    name: String::new(),
                }..,
            )
            .take_while(|(policy, _)| policy.namespace == id.namespace)
            .filter(|(_, policy)| policy.pod_selector.matches(&pod.labels))
            .map(|(_, policy)| policy.clone())
            .collect();
        let mut endpoint = LocalEndpoint {
            pod: id.clone(),
            ips: pod.ips.clone(),
            identity,
            ingress: None,
            egress: None,
            ingress_isolated_by: Vec::new(),
            egress_isolated_by: Vec::new(),
        };
        let mut used_selectors = Vec::new();
        for direction in [Direction::Ingress, Direction::Egress] {
            let isolating: Vec<&NetworkPolicy> = selecting
                .iter()
                .filter(|policy| match direction {
                    Direction::Ingress => policy.policy_types.ingress,
                    Direction::Egress => policy.policy_types.egress,
                })
                .collect();
            if isolating.is_empty() {
                continue;
            }
            let compiled = self.compile_direction(&pod, direction, &isolating, &mut used_selectors);
            let policy = self.acquire_policy(compiled);
            let isolated_by = isolating.iter().map(|policy| policy.id.clone()).collect();
            match direction {
                Direction::Ingress => {
                    endpoint.ingress = Some(policy);
                    endpoint.ingress_isolated_by = isolated_by;
                }
                Direction::Egress => {
                    endpoint.egress = Some(policy);
                    endpoint.egress_isolated_by = isolated_by;
                }
            }
        }
        for key in &used_selectors {
            self.selector_users
                .entry(key.clone())
                .or_default()
                .insert(id.clone());
        }
        self.endpoint_selectors.insert(id.clone(), used_selectors);
        self.state.endpoints.insert(id.clone(), endpoint);
    }

    fn acquire_policy(&mut self, compiled: CompiledPolicy) -> PolicyId {
        if let Some(id) = self.policy_ids.get(&compiled) {
            *self.policy_users.entry(*id).or_default() += 1;
            return *id;
        }
        let id = self.pinned_policies.take(&compiled).unwrap_or_else(|| {
            self.last_policy_id += 1;
            self.last_policy_id
        });
        self.state.policies.insert(id, compiled.clone());
        self.policy_ids.insert(compiled, id);
        self.policy_users.insert(id, 1);
        id
    }

    fn release_policy(&mut self, id: PolicyId) {
        let Some(users) = self.policy_users.get_mut(&id) else {
            return;
        };
        *users -= 1;
        if *users == 0 {
            self.policy_users.remove(&id);
            if let Some(compiled) = self.state.policies.remove(&id) {
                self.policy_ids.remove(&compiled);
            }
        }
    }

    fn rule_id(&mut self, origin: RuleOrigin) -> RuleId {
        if let Some(id) = self.rule_ids.get(&origin) {
            return *id;
        }
        // Derived from the origin, not from the order rules were met: a restarted agent numbers
        // each rule as its predecessor did, so the entries it finds pinned are already its own.
        // A collision (rare: 31 bits) takes the next free number.
        let mut id = origin.stable_id();
        while self.state.rules.contains_key(&id) {
            id = (id % RULE_ID_MASK) + 1;
        }
        self.rule_ids.insert(origin.clone(), id);
        self.state.rules.insert(id, origin);
        id
    }

    /// The identities a selector peer of a policy in `policy_namespace` matches, computed once
    /// and then maintained as identities and namespaces change.
    fn matching(&mut self, key: &SelectorKey) -> &BTreeSet<PeerId> {
        if !self.selectors.contains_key(key) {
            let (
                policy_namespace,
                Peer::Pods {
                    pod_selector,
                    namespace_selector,
                },
            ) = key
            else {
                return self.selectors.entry(key.clone()).or_default();
            };
            // Only the identities of the namespaces the peer can match are looked at.
            let namespaces: Vec<&String> = match namespace_selector {
                None => self
                    .namespace_identities
                    .get_key_value(policy_namespace)
                    .map(|(ns, _)| ns)
                    .into_iter()
                    .collect(),
                Some(selector) => self
                    .namespace_identities
                    .keys()
                    .filter(|namespace| selector.matches(&self.cluster.namespace_labels(namespace)))
                    .collect(),
            };
            let identities = self.identities.identities();
            let matched = namespaces
                .into_iter()
                .flat_map(|namespace| &self.namespace_identities[namespace])
                .filter(|id| {
                    pod_selector
                        .as_ref()
                        .is_none_or(|selector| selector.matches(&identities[*id].labels))
                })
                .copied()
                .collect();
            self.selectors.insert(key.clone(), matched);
        }
        &self.selectors[key]
    }

    /// Adds one `ipBlock` (or the every-peer block) of `rule` to the endpoint's blocks.
    fn add_ip_block(
        &mut self,
        block: Block,
        pod: &Pod,
        direction: Direction,
        rule: &Rule,
        rule_id: RuleId,
        blocks: &mut Vec<(Block, RuleId, Vec<PortMatch>)>,
    ) {
        if direction == Direction::Egress && has_named_port(&rule.ports) {
            // A named port is the destination pod's: each pod address in the block gets a
            // host prefix of its own, carrying what its names resolve to.
            self.named_block_users.insert(pod.id.clone());
            for (ip, claims) in &self.ip_claims {
                let inside = block.cidr.contains(ip)
                    && !block.except.iter().any(|except| except.contains(ip));
                let owner = claims
                    .first()
                    .and_then(|owner| self.pods.get(owner))
                    .and_then(|record| record.identity)
                    .map(|identity| &self.identities.identities()[&identity]);
                let Some(owner) = owner.filter(|_| inside) else {
                    continue;
                };
                let resolved = named_port_matches(&rule.ports, &owner.named_ports);
                if !resolved.is_empty() {
                    let host = Block {
                        cidr: IpNet::from(*ip),
                        except: Vec::new(),
                    };
                    blocks.push((host, rule_id, resolved));
                }
            }
        }
        let ports = port_matches(&rule.ports, direction, pod, None);
        blocks.push((block, rule_id, ports));
    }

    fn compile_direction(
        &mut self,
        pod: &Pod,
        direction: Direction,
        policies: &[&NetworkPolicy],
        used_selectors: &mut Vec<SelectorKey>,
    ) -> CompiledPolicy {
        let mut compiled = CompiledPolicy::default();
        // Collected unsorted and built into the map in one pass: much cheaper than inserting
        // thousands of entries one by one.
        let mut entries: Vec<(PolicyMatch, RuleId)> = Vec::new();
        let mut blocks: Vec<(Block, RuleId, Vec<PortMatch>)> = Vec::new();
        for policy in policies {
            let rules: &[Rule] = match direction {
                Direction::Ingress => &policy.ingress,
                Direction::Egress => &policy.egress,
            };
            for (index, rule) in rules.iter().enumerate() {
                let rule_id = self.rule_id(RuleOrigin {
                    policy: policy.id.clone(),
                    direction,
                    index,
                });
                let mut add_block = |block: Block, compiler: &mut Self| {
                    compiler.add_ip_block(block, pod, direction, rule, rule_id, &mut blocks);
                };
                if rule.peers.is_empty() {
                    // Every peer: as an ipBlock it also covers pods, the node and the world.
                    add_block(
                        Block {
                            cidr: IpNet::V4(Ipv4Net::default()),
                            except: Vec::new(),
                        },
                        self,
                    );
                    add_block(
                        Block {
                            cidr: IpNet::V6(Ipv6Net::default()),
                            except: Vec::new(),
                        },
                        self,
                    );
                }
                for peer in &rule.peers {
                    match peer {
                        Peer::IpBlock { cidr, except } => {
                            add_block(
                                Block {
                                    cidr: *cidr,
                                    except: except.clone(),
                                },
                                self,
                            );
                        }
                        Peer::Pods {
                            namespace_selector, ..
                        } => {
                            // A namespaceSelector peer means the same in every policy namespace.
                            let scope = if namespace_selector.is_some() {
                                String::new()
                            } else {
                                policy.id.namespace.clone()
                            };
                            let key = (scope, peer.clone());
                            let matched: Vec<PeerId> =
                                self.matching(&key).iter().copied().collect();
                            used_selectors.push(key);
                            // Only egress named ports depend on the peer; resolve the rest once.
                            let shared = (direction == Direction::Ingress
                                || !has_named_port(&rule.ports))
                            .then(|| port_matches(&rule.ports, direction, pod, None));
                            for identity in matched {
                                // The datapath never looks WORLD up in the policy map.
                                debug_assert_ne!(identity, netwarden_common::IDENTITY_WORLD);
                                let resolved;
                                let ports = if let Some(ports) = &shared {
                                    ports
                                } else {
                                    let info = &self.identities.identities()[&identity];
                                    resolved =
                                        port_matches(&rule.ports, direction, pod, Some(info));
                                    &resolved
                                };
                                for &(protocol, port, port_bits) in ports {
                                    let entry = PolicyMatch {
                                        peer: identity,
                                        protocol,
                                        port,
                                        port_bits,
                                    };
                                    entries.push((entry, rule_id));
                                }
                            }
                        }
                    }
                }
            }
        }

        add_cidr_classes(&mut compiled, &mut entries, &blocks);
        // Lowest rule id first, so attribution is stable (across restarts too: rule ids derive
        // from the rule's origin) when several rules allow the same.
        entries.sort_unstable();
        entries.dedup_by_key(|(entry, _)| *entry);
        compiled.entries = entries.into_iter().collect();
        compiled
    }
}

/// Turns the `ipBlock` peers of one endpoint's direction into CIDR classes (see `cidr.rs`) and
/// their policy entries.
fn add_cidr_classes(
    compiled: &mut CompiledPolicy,
    entries: &mut Vec<(PolicyMatch, RuleId)>,
    blocks: &[(Block, RuleId, Vec<PortMatch>)],
) {
    if !blocks.is_empty() {
        let plain: Vec<Block> = blocks.iter().map(|(block, _, _)| block.clone()).collect();
        let mut class_ids: BTreeMap<BTreeSet<usize>, PeerId> = BTreeMap::new();
        for (prefix, holders) in cidr::classes(&plain) {
            let next =
                CIDR_CLASS_FLAG | u32::try_from(class_ids.len()).expect("fewer than 2^31 classes");
            let class = if holders.is_empty() {
                // The empty class: no entries, so the lookup finds nothing and denies.
                CIDR_CLASS_FLAG | u32::MAX >> 1
            } else {
                *class_ids.entry(holders.clone()).or_insert(next)
            };
            compiled.cidrs.insert(prefix, class);
            for index in holders {
                let (_, rule_id, ports) = &blocks[index];
                for (protocol, port, port_bits) in ports {
                    let entry = PolicyMatch {
                        peer: class,
                        protocol: *protocol,
                        port: *port,
                        port_bits: *port_bits,
                    };
                    entries.push((entry, *rule_id));
                }
            }
        }
    }
}

/// Whether the selector peer `key` matches pods of identity `info`.
fn selector_matches(
    key: &SelectorKey,
    info: &IdentityInfo,
    namespace_labels: &netwarden_model::selector::Labels,
) -> bool {
    let (
        policy_namespace,
        Peer::Pods {
            pod_selector,
            namespace_selector,
        },
    ) = key
    else {
        return false;
    };
    let namespace_ok = match namespace_selector {
        None => info.namespace == *policy_namespace,
        Some(selector) => selector.matches(namespace_labels),
    };
    namespace_ok
        && pod_selector
            .as_ref()
            .is_none_or(|selector| selector.matches(&info.labels))
}

/// What the compiler keeps of a pod that may be remote.
#[derive(Clone, Debug)]
struct PodRecord {
    /// Tells a changed pod from an unchanged one without keeping it.
    fingerprint: u128,
    /// Its identity, when it has addresses and is not on the host network.
    identity: Option<PeerId>,
    /// The addresses it claims.
    ips: Vec<IpAddr>,
}

/// 128 bits of two independent `SipHash` runs over the whole pod: an update is missed only if
/// both collide with the previous version of the same pod.
fn fingerprint(pod: &Pod) -> u128 {
    use std::hash::{BuildHasher as _, Hash as _, Hasher as _};
    let mut first =
        std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
            .build_hasher();
    let mut second = first.clone();
    second.write_u8(0xa5);
    pod.hash(&mut first);
    pod.hash(&mut second);
    (u128::from(first.finish()) << 64) | u128::from(second.finish())
}

/// Appends a change for every key whose value differs between `old` and `new`.
fn diff<K: Ord + Clone, V: PartialEq>(
    old: &BTreeMap<K, V>,
    new: BTreeMap<K, V>,
    changes: &mut Vec<Change>,
    change: impl Fn(K, Option<V>) -> Change,
) {
    for key in old.keys() {
        if !new.contains_key(key) {
            changes.push(change(key.clone(), None));
        }
    }
    for (key, value) in new {
        if old.get(&key) != Some(&value) {
            changes.push(change(key, Some(value)));
        }
    }
}

fn has_named_port(ports: &[PortSpec]) -> bool {
    ports
        .iter()
        .any(|spec| matches!(spec.port, Some(PortRef::Name(_))))
}

/// A protocol (or every protocol) and an aligned port block.
type PortMatch = (Option<u8>, u16, u8);

/// The numeric ports that a rule's named ports resolve to on `destination`.
fn named_port_matches(ports: &[PortSpec], destination: &[ContainerPort]) -> Vec<PortMatch> {
    ports
        .iter()
        .filter_map(|spec| match &spec.port {
            Some(PortRef::Name(name)) => resolve_named_port(destination, name, spec.protocol)
                .map(|port| (Some(spec.protocol.number()), port, 16)),
            _ => None,
        })
        .collect()
}

/// The (protocol, port block) pairs a rule's `ports` allow towards a destination. Named ports
/// resolve against the destination pod: the endpoint itself for ingress, the peer identity for
/// egress (`None` for an ipBlock peer, where a name resolves to nothing).
fn port_matches(
    ports: &[PortSpec],
    direction: Direction,
    pod: &Pod,
    peer: Option<&IdentityInfo>,
) -> Vec<(Option<u8>, u16, u8)> {
    if ports.is_empty() {
        return vec![(None, 0, 0)];
    }
    let mut matches = Vec::new();
    for spec in ports {
        let protocol = Some(spec.protocol.number());
        match &spec.port {
            None => matches.push((protocol, 0, 0)),
            Some(PortRef::Number(first)) => {
                let last = spec.end_port.unwrap_or(*first);
                matches.extend(
                    port_prefixes(*first, last)
                        .into_iter()
                        .map(|(port, bits)| (protocol, port, bits)),
                );
            }
            Some(PortRef::Name(name)) => {
                let resolved = match direction {
                    Direction::Ingress => resolve_named_port(&pod.ports, name, spec.protocol),
                    Direction::Egress => peer.and_then(|info| info.named_port(name, spec.protocol)),
                };
                matches.extend(resolved.map(|port| (protocol, port, 16)));
            }
        }
    }
    matches
}
