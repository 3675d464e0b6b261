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
    Cluster, NetworkPolicy, Peer, Pod, PodRef, PolicyRef, PortRef, PortSpec, Rule,
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

/// The compiler. It keeps identity, policy and rule ids stable from one compilation to the
/// next, so a small change to the cluster is a small change to the maps.
#[derive(Debug, Default)]
pub struct Compiler {
    identities: IdentityAllocator,
    policy_ids: HashMap<CompiledPolicy, PolicyId>,
    last_policy_id: PolicyId,
    rule_ids: HashMap<RuleOrigin, RuleId>,
    last_rule_id: RuleId,
}

impl Compiler {
    /// A compiler with no history.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Continues where a previous agent left off: `identities` are the numbers it gave (by
    /// [`IdentityInfo::digest`]), and `highest_policy_id` the highest policy id in its maps, so
    /// new policies never overwrite ones that endpoints still use.
    pub fn resume(&mut self, identities: HashMap<[u8; 32], PeerId>, highest_policy_id: PolicyId) {
        self.identities.prefer(identities);
        self.last_policy_id = self.last_policy_id.max(highest_policy_id);
    }

    /// Compiles `cluster` for the node called `node`, whose own addresses are `node_addresses`.
    pub fn compile(
        &mut self,
        cluster: &Cluster,
        node: &str,
        node_addresses: &[IpAddr],
    ) -> DatapathState {
        let mut state = DatapathState::default();

        // Identities and the IP cache. Host-network pods share the node's addresses: policy
        // neither selects them nor can tell them from the node.
        let pods: Vec<(&Pod, IdentityInfo)> = cluster
            .pods
            .values()
            .filter(|pod| !pod.host_network && !pod.ips.is_empty())
            .map(|pod| (pod, IdentityInfo::of(pod)))
            .collect();
        state.identities = self.identities.assign(pods.iter().map(|(_, info)| info));
        let mut owners: HashMap<IpAddr, &PodRef> = HashMap::new();
        for (pod, info) in &pods {
            let identity = self.identities.get(info).expect("assigned above");
            for ip in &pod.ips {
                if let Some(owner) = owners.get(ip) {
                    state.warnings.push(format!("Pod {}: status.podIPs: {ip} is also the address of Pod {owner}; using {owner}", pod.id));
                    continue;
                }
                owners.insert(*ip, &pod.id);
                state.ipcache.insert(*ip, identity);
            }
        }
        for address in node_addresses {
            state.ipcache.insert(*address, IDENTITY_HOST);
        }

        // Local endpoints and their policies.
        let mut selectors = SelectorCache::new(cluster, &state.identities);
        let mut used_policies: HashMap<CompiledPolicy, PolicyId> = HashMap::new();
        let mut used_rules: BTreeMap<RuleId, RuleOrigin> = BTreeMap::new();
        for (pod, info) in &pods {
            if pod.node_name.as_deref() != Some(node) {
                continue;
            }
            let selecting: Vec<&NetworkPolicy> = cluster
                .policies
                .values()
                .filter(|policy| {
                    policy.id.namespace == pod.id.namespace
                        && policy.pod_selector.matches(&pod.labels)
                })
                .collect();
            let mut endpoint = LocalEndpoint {
                pod: pod.id.clone(),
                ips: pod.ips.clone(),
                identity: self.identities.get(info).expect("assigned above"),
                ingress: None,
                egress: None,
                ingress_isolated_by: Vec::new(),
                egress_isolated_by: Vec::new(),
            };
            for direction in [Direction::Ingress, Direction::Egress] {
                let isolating: Vec<&NetworkPolicy> = selecting
                    .iter()
                    .copied()
                    .filter(|policy| match direction {
                        Direction::Ingress => policy.policy_types.ingress,
                        Direction::Egress => policy.policy_types.egress,
                    })
                    .collect();
                if isolating.is_empty() {
                    continue;
                }
                let compiled = self.compile_direction(
                    cluster,
                    &owners,
                    pod,
                    direction,
                    &isolating,
                    &mut selectors,
                    &mut used_rules,
                );
                let id = self.policy_id(compiled.clone());
                used_policies.insert(compiled, id);
                let isolated_by = isolating.iter().map(|policy| policy.id.clone()).collect();
                match direction {
                    Direction::Ingress => {
                        endpoint.ingress = Some(id);
                        endpoint.ingress_isolated_by = isolated_by;
                    }
                    Direction::Egress => {
                        endpoint.egress = Some(id);
                        endpoint.egress_isolated_by = isolated_by;
                    }
                }
            }
            state.endpoints.insert(pod.id.clone(), endpoint);
        }

        // Forget ids nobody uses any more, so they do not pin memory; ids are not reused.
        self.policy_ids
            .retain(|compiled, _| used_policies.contains_key(compiled));
        self.rule_ids.retain(|_, id| used_rules.contains_key(id));
        state.policies = used_policies
            .into_iter()
            .map(|(compiled, id)| (id, compiled))
            .collect();
        state.rules = used_rules;
        state
    }

    fn policy_id(&mut self, compiled: CompiledPolicy) -> PolicyId {
        *self.policy_ids.entry(compiled).or_insert_with(|| {
            self.last_policy_id += 1;
            self.last_policy_id
        })
    }

    fn rule_id(&mut self, origin: RuleOrigin, used: &mut BTreeMap<RuleId, RuleOrigin>) -> RuleId {
        let id = *self.rule_ids.entry(origin.clone()).or_insert_with(|| {
            self.last_rule_id += 1;
            self.last_rule_id
        });
        used.insert(id, origin);
        id
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "one call site; a struct would only rename them"
    )]
    fn compile_direction(
        &mut self,
        cluster: &Cluster,
        owners: &HashMap<IpAddr, &PodRef>,
        pod: &Pod,
        direction: Direction,
        policies: &[&NetworkPolicy],
        selectors: &mut SelectorCache<'_>,
        used_rules: &mut BTreeMap<RuleId, RuleOrigin>,
    ) -> CompiledPolicy {
        let mut compiled = CompiledPolicy::default();
        let mut blocks: Vec<(Block, RuleId, Vec<PortMatch>)> = Vec::new();
        for policy in policies {
            let rules: &[Rule] = match direction {
                Direction::Ingress => &policy.ingress,
                Direction::Egress => &policy.egress,
            };
            for (index, rule) in rules.iter().enumerate() {
                let rule_id = self.rule_id(
                    RuleOrigin { policy: policy.id.clone(), direction, index },
                    used_rules,
                );
                let mut add_block = |block: Block| {
                    if direction == Direction::Egress && has_named_port(&rule.ports) {
                        // A named port is the destination pod's: each pod address in the block
                        // gets a host prefix of its own, carrying what its names resolve to.
                        for (ip, owner) in owners {
                            let inside = block.cidr.contains(ip)
                                && !block.except.iter().any(|except| except.contains(ip));
                            let Some(owner) = cluster.pods.get(owner).filter(|_| inside) else {
                                continue;
                            };
                            let resolved = named_port_matches(&rule.ports, owner);
                            if !resolved.is_empty() {
                                let host = Block { cidr: IpNet::from(*ip), except: Vec::new() };
                                blocks.push((host, rule_id, resolved));
                            }
                        }
                    }
                    let ports = port_matches(&rule.ports, direction, pod, None);
                    blocks.push((block, rule_id, ports));
                };
                if rule.peers.is_empty() {
                    // Every peer: as an ipBlock it also covers pods, the node and the world.
                    add_block(Block { cidr: IpNet::V4(Ipv4Net::default()), except: Vec::new() });
                    add_block(Block { cidr: IpNet::V6(Ipv6Net::default()), except: Vec::new() });
                }
                for peer in &rule.peers {
                    if let Peer::IpBlock { cidr, except } = peer {
                        add_block(Block { cidr: *cidr, except: except.clone() });
                    }
                }
                for peer in &rule.peers {
                    if let Peer::Pods { .. } = peer {
                        for identity in selectors.matching(&policy.id.namespace, peer) {
                            let info = &selectors.identities[&identity];
                            let ports = port_matches(&rule.ports, direction, pod, Some(info));
                            for (protocol, port, port_bits) in ports {
                                let entry = PolicyMatch { peer: identity, protocol, port, port_bits };
                                insert_entry(&mut compiled.entries, entry, rule_id);
                            }
                        }
                    }
                }
            }
        }

        if !blocks.is_empty() {
            let plain: Vec<Block> = blocks.iter().map(|(block, _, _)| block.clone()).collect();
            let mut class_ids: BTreeMap<BTreeSet<usize>, PeerId> = BTreeMap::new();
            for (prefix, holders) in cidr::classes(&plain) {
                let next = CIDR_CLASS_FLAG
                    | u32::try_from(class_ids.len()).expect("fewer than 2^31 classes");
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
        compiled
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
            Some(PortRef::Name(name)) => resolve_named_port(&destination.ports, name, spec.protocol)
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

/// Which identities a pod/namespace selector peer matches, computed once per compilation.
struct SelectorCache<'a> {
    cluster: &'a Cluster,
    identities: &'a BTreeMap<PeerId, IdentityInfo>,
    namespace_labels: HashMap<String, netwarden_model::selector::Labels>,
    matched: HashMap<(String, Peer), Vec<PeerId>>,
}

impl<'a> SelectorCache<'a> {
    fn new(cluster: &'a Cluster, identities: &'a BTreeMap<PeerId, IdentityInfo>) -> Self {
        Self {
            cluster,
            identities,
            namespace_labels: HashMap::new(),
            matched: HashMap::new(),
        }
    }

    fn matching(&mut self, policy_namespace: &str, peer: &Peer) -> Vec<PeerId> {
        let key = (policy_namespace.to_owned(), peer.clone());
        if let Some(found) = self.matched.get(&key) {
            return found.clone();
        }
        let Peer::Pods {
            pod_selector,
            namespace_selector,
        } = peer
        else {
            return Vec::new();
        };
        let mut found = Vec::new();
        for (id, info) in self.identities {
            let namespace_ok = match namespace_selector {
                None => info.namespace == policy_namespace,
                Some(selector) => {
                    let cluster = self.cluster;
                    let labels = self
                        .namespace_labels
                        .entry(info.namespace.clone())
                        .or_insert_with(|| cluster.namespace_labels(&info.namespace));
                    selector.matches(labels)
                }
            };
            if namespace_ok
                && pod_selector
                    .as_ref()
                    .is_none_or(|selector| selector.matches(&info.labels))
            {
                found.push(*id);
            }
        }
        self.matched.insert(key, found.clone());
        found
    }
}
