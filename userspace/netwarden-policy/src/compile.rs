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
    Cluster, Namespace, NetworkPolicy, Peer, Pod, PodRef, PolicyRef, PortRef, PortSpec, Rule,
};

use crate::{
    cidr::{self, Block},
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
    /// Things the compiler could not express, naming the object.
    pub warnings: Vec<String>,
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
/// - a policy recompiles the local pods its old or new version selects.
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
    pod_identity: HashMap<PodRef, (PeerId, IdentityInfo)>,
    ip_claims: BTreeMap<IpAddr, BTreeSet<PodRef>>,
    local_pods: BTreeSet<PodRef>,
    selectors: HashMap<SelectorKey, BTreeSet<PeerId>>,
    selector_users: HashMap<SelectorKey, BTreeSet<PodRef>>,
    endpoint_selectors: HashMap<PodRef, Vec<SelectorKey>>,
    named_block_users: BTreeSet<PodRef>,
    policy_ids: HashMap<CompiledPolicy, (PolicyId, usize)>,
    last_policy_id: PolicyId,
    rule_ids: HashMap<RuleOrigin, RuleId>,
    last_rule_id: RuleId,
    duplicate_ips: BTreeMap<IpAddr, String>,
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
            pod_identity: HashMap::new(),
            ip_claims: BTreeMap::new(),
            local_pods: BTreeSet::new(),
            selectors: HashMap::new(),
            selector_users: HashMap::new(),
            endpoint_selectors: HashMap::new(),
            named_block_users: BTreeSet::new(),
            policy_ids: HashMap::new(),
            last_policy_id: 0,
            rule_ids: HashMap::new(),
            last_rule_id: 0,
            duplicate_ips: BTreeMap::new(),
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
        self.node_addresses = new;
        for ip in touched {
            self.refresh_ip(ip);
        }
        &self.state
    }

    /// Brings the compiler to `cluster`, applying only the objects that differ from what it
    /// has.
    pub fn sync(&mut self, cluster: &Cluster) -> &DatapathState {
        let mut changes = Vec::new();
        diff(
            &self.cluster.namespaces,
            &cluster.namespaces,
            &mut changes,
            |name, namespace| Change::Namespace(name.clone(), namespace),
        );
        diff(
            &self.cluster.pods,
            &cluster.pods,
            &mut changes,
            |id, pod| Change::Pod(id.clone(), pod),
        );
        diff(
            &self.cluster.policies,
            &cluster.policies,
            &mut changes,
            |id, policy| Change::Policy(id.clone(), policy),
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
            }
        }
        for pod in std::mem::take(&mut self.dirty) {
            self.recompile_endpoint(&pod);
        }
        self.state.warnings = self.duplicate_ips.values().cloned().collect();
        &self.state
    }

    fn effective(pod: Option<&Pod>) -> Option<&Pod> {
        // Host-network pods share the node's addresses: policy neither selects them nor can
        // tell them from the node. Pods without an address have nothing to enforce yet.
        pod.filter(|pod| !pod.host_network && !pod.ips.is_empty())
    }

    fn change_pod(&mut self, id: PodRef, pod: Option<Pod>) {
        let old = match pod {
            Some(pod) => self.cluster.pods.insert(id.clone(), pod),
            None => self.cluster.pods.remove(&id),
        };
        let pod = self.cluster.pods.get(&id).cloned();
        if old == pod {
            return;
        }
        let mut touched_ips = Vec::new();
        if let Some(old) = Self::effective(old.as_ref()) {
            if let Some((_, info)) = self.pod_identity.remove(&id)
                && let Some(retired) = self.identities.release(&info)
            {
                self.identity_retired(retired);
            }
            for ip in &old.ips {
                if let Some(claims) = self.ip_claims.get_mut(ip) {
                    claims.remove(&id);
                    if claims.is_empty() {
                        self.ip_claims.remove(ip);
                    }
                }
                touched_ips.push(*ip);
            }
        }
        if let Some(new) = Self::effective(pod.as_ref()) {
            let info = IdentityInfo::of(new);
            let (identity, is_new) = self.identities.acquire(&info);
            if is_new {
                self.identity_created(identity, &info);
            }
            self.pod_identity.insert(id.clone(), (identity, info));
            for ip in &new.ips {
                self.ip_claims.entry(*ip).or_default().insert(id.clone());
                touched_ips.push(*ip);
            }
        }
        for ip in touched_ips {
            self.refresh_ip(ip);
        }
        let is_local = |pod: Option<&Pod>| {
            pod.is_some_and(|pod| pod.node_name.as_deref() == Some(self.node.as_str()))
        };
        if is_local(old.as_ref()) || is_local(pod.as_ref()) {
            self.dirty.insert(id.clone());
        }
        if is_local(pod.as_ref()) {
            self.local_pods.insert(id);
        } else {
            self.local_pods.remove(&id);
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
            .identities
            .identities()
            .iter()
            .filter(|(_, info)| info.namespace == name)
            .map(|(id, _)| *id)
            .collect();
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
        for pod in &self.local_pods {
            let Some(labels) = self.cluster.pods.get(pod).map(|pod| &pod.labels) else {
                continue;
            };
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
        let namespace_labels = self.cluster.namespace_labels(&info.namespace);
        for (key, matched) in &mut self.selectors {
            if selector_matches(key, info, &namespace_labels) && matched.insert(identity) {
                self.dirty
                    .extend(self.selector_users.get(key).into_iter().flatten().cloned());
            }
        }
    }

    fn identity_retired(&mut self, identity: PeerId) {
        self.state.identities.remove(&identity);
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
            .and_then(|owner| self.pod_identity.get(owner))
            .map(|(identity, _)| *identity);
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
            if let Some(users) = self.selector_users.get_mut(&key) {
                users.remove(id);
                if users.is_empty() {
                    // Nobody needs this selector's match set maintained any more.
                    self.selector_users.remove(&key);
                    self.selectors.remove(&key);
                }
            }
        }
        self.named_block_users.remove(id);

        let Some(pod) = Self::effective(self.cluster.pods.get(id)).cloned() else {
            return;
        };
        if pod.node_name.as_deref() != Some(self.node.as_str()) {
            return;
        }
        let Some((identity, _)) = self.pod_identity.get(id).cloned() else {
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
        if let Some((id, users)) = self.policy_ids.get_mut(&compiled) {
            *users += 1;
            return *id;
        }
        self.last_policy_id += 1;
        let id = self.last_policy_id;
        self.state.policies.insert(id, compiled.clone());
        self.policy_ids.insert(compiled, (id, 1));
        id
    }

    fn release_policy(&mut self, id: PolicyId) {
        let Some(compiled) = self.state.policies.get(&id) else {
            return;
        };
        let Some((_, users)) = self.policy_ids.get_mut(compiled) else {
            return;
        };
        *users -= 1;
        if *users == 0 {
            let compiled = self.state.policies.remove(&id).expect("present above");
            self.policy_ids.remove(&compiled);
        }
    }

    fn rule_id(&mut self, origin: RuleOrigin) -> RuleId {
        if let Some(id) = self.rule_ids.get(&origin) {
            return *id;
        }
        self.last_rule_id += 1;
        self.rule_ids.insert(origin.clone(), self.last_rule_id);
        self.state.rules.insert(self.last_rule_id, origin);
        self.last_rule_id
    }

    /// The identities a selector peer of a policy in `policy_namespace` matches, computed once
    /// and then maintained as identities and namespaces change.
    fn matching(&mut self, key: &SelectorKey) -> &BTreeSet<PeerId> {
        if !self.selectors.contains_key(key) {
            let mut namespace_labels: HashMap<&str, netwarden_model::selector::Labels> =
                HashMap::new();
            let matched = self
                .identities
                .identities()
                .iter()
                .filter(|(_, info)| {
                    let labels = namespace_labels
                        .entry(info.namespace.as_str())
                        .or_insert_with(|| self.cluster.namespace_labels(&info.namespace));
                    selector_matches(key, info, labels)
                })
                .map(|(id, _)| *id)
                .collect();
            self.selectors.insert(key.clone(), matched);
        }
        &self.selectors[key]
    }

    fn compile_direction(
        &mut self,
        pod: &Pod,
        direction: Direction,
        policies: &[&NetworkPolicy],
        used_selectors: &mut Vec<SelectorKey>,
    ) -> CompiledPolicy {
        let mut compiled = CompiledPolicy::default();
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
                let named_egress = direction == Direction::Egress && has_named_port(&rule.ports);
                let mut add_block = |block: Block, compiler: &mut Self| {
                    if named_egress {
                        // A named port is the destination pod's: each pod address in the block
                        // gets a host prefix of its own, carrying what its names resolve to.
                        compiler.named_block_users.insert(pod.id.clone());
                        for (ip, claims) in &compiler.ip_claims {
                            let inside = block.cidr.contains(ip)
                                && !block.except.iter().any(|except| except.contains(ip));
                            let owner = claims
                                .first()
                                .and_then(|owner| compiler.cluster.pods.get(owner));
                            let Some(owner) = owner.filter(|_| inside) else {
                                continue;
                            };
                            let resolved = named_port_matches(&rule.ports, owner);
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
                        Peer::Pods { .. } => {
                            let key = (policy.id.namespace.clone(), peer.clone());
                            let matched: Vec<PeerId> =
                                self.matching(&key).iter().copied().collect();
                            used_selectors.push(key);
                            for identity in matched {
                                let info = &self.identities.identities()[&identity];
                                for (protocol, port, port_bits) in
                                    port_matches(&rule.ports, direction, pod, Some(info))
                                {
                                    let entry = PolicyMatch {
                                        peer: identity,
                                        protocol,
                                        port,
                                        port_bits,
                                    };
                                    insert_entry(&mut compiled.entries, entry, rule_id);
                                }
                            }
                        }
                    }
                }
            }
        }

        add_cidr_classes(&mut compiled, &blocks);
        compiled
    }
}

/// Turns the `ipBlock` peers of one endpoint's direction into CIDR classes (see `cidr.rs`) and
/// their policy entries.
fn add_cidr_classes(compiled: &mut CompiledPolicy, blocks: &[(Block, RuleId, Vec<PortMatch>)]) {
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
                    insert_entry(&mut compiled.entries, entry, *rule_id);
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

/// Appends a change for every key whose value differs between `old` and `new`.
fn diff<K: Ord, V: PartialEq + Clone>(
    old: &BTreeMap<K, V>,
    new: &BTreeMap<K, V>,
    changes: &mut Vec<Change>,
    change: impl Fn(&K, Option<V>) -> Change,
) {
    for (key, value) in new {
        if old.get(key) != Some(value) {
            changes.push(change(key, Some(value.clone())));
        }
    }
    for key in old.keys() {
        if !new.contains_key(key) {
            changes.push(change(key, None));
        }
    }
}

/// Keeps the lowest rule id when two rules allow the same thing, so attribution is stable.
fn insert_entry(entries: &mut BTreeMap<PolicyMatch, RuleId>, entry: PolicyMatch, rule: RuleId) {
    entries
        .entry(entry)
        .and_modify(|existing| *existing = (*existing).min(rule))
        .or_insert(rule);
}

fn has_named_port(ports: &[PortSpec]) -> bool {
    ports
        .iter()
        .any(|spec| matches!(spec.port, Some(PortRef::Name(_))))
}

/// A protocol (or every protocol) and an aligned port block.
type PortMatch = (Option<u8>, u16, u8);

/// The numeric ports that a rule's named ports resolve to on `destination`.
fn named_port_matches(ports: &[PortSpec], destination: &Pod) -> Vec<PortMatch> {
    ports
        .iter()
        .filter_map(|spec| match &spec.port {
            Some(PortRef::Name(name)) => {
                resolve_named_port(&destination.ports, name, spec.protocol)
                    .map(|port| (Some(spec.protocol.number()), port, 16))
            }
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
