//! One endpoint's direction: the rules of every tier that apply to it, turned into policy
//! entries (identity or CIDR class, protocol, aligned port block) and CIDR prefixes.
//!
//! The tiers' precedence is resolved here, not in the datapath: every rule gets a rank in its
//! tier's evaluation order (Admin ClusterNetworkPolicies by priority, name and rule index;
//! NetworkPolicy's rules all one rank; then Baseline), and every entry holds, per tier, the
//! first rule that matches all of it (see `docs/design.md`, "ClusterNetworkPolicy tiers").

use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use netwarden_common::{
    CIDR_CLASS_FLAG, IDENTITY_WORLD, PeerId, PolicyEntry, TierMatch, rule_action,
};
use netwarden_model::{
    Action, Cluster, ClusterNetworkPolicy, ClusterPeer, ClusterPort, ClusterRule, ContainerPort,
    NetworkPolicy, Peer, Pod, PortRef, PortSpec, Rule,
};
use rustc_hash::FxHashSet;

use crate::{
    cidr::{self, Block},
    identity::{IdentityInfo, resolve_named_port},
    ids::RuleIds,
    pods::{AddressClaims, Pods},
    ports::port_prefixes,
    selectors::{SelectorId, SelectorKey, Selectors, selector_key},
    state::{CompiledPolicy, Direction, PolicyMatch, RuleId, RuleOrigin, RulePolicy},
};

/// What compiling an endpoint's rules reads and updates, and what it found the result
/// depends on.
pub(crate) struct RuleCompiler<'a> {
    pub(crate) cluster: &'a Cluster,
    pub(crate) pods: &'a Pods,
    pub(crate) addresses: &'a AddressClaims,
    pub(crate) selectors: &'a mut Selectors,
    pub(crate) rule_ids: &'a mut RuleIds,
    /// Every rule an id was given to (the state's rule table).
    pub(crate) rules: &'a mut BTreeMap<RuleId, RuleOrigin>,
    /// The selector peers the compiled entries came from: a change to their match sets
    /// updates the endpoint.
    pub(crate) selectors_used: Vec<SelectorId>,
    /// Whether an egress `ipBlock` rule with named ports was compiled: its entries depend on
    /// every pod's addresses and ports.
    pub(crate) reads_every_pod: bool,
    /// Whether a ClusterNetworkPolicy `nodes` peer was compiled: its entries depend on the
    /// nodes' labels and addresses.
    pub(crate) reads_nodes: bool,
    /// The current direction's selector peers, in evaluation order.
    direction_rules: Vec<SelectorRule>,
    /// What the current direction already holds at an earlier rank (see [`Ranked::after_every_earlier_rule`]).
    held: FxHashSet<(Slot, Holder, Vec<PortMatch>)>,
}

/// A peer of a rule, as far as shadowing goes: a selector peer's match set or a block.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Holder {
    Selector(SelectorId),
    Block(IpNet, Vec<IpNet>),
}

/// A selector peer of one rule of an endpoint direction, kept so that the direction's entries
/// for one identity can be recomputed alone when it joins or leaves the peer's match set.
#[derive(Clone, Debug)]
pub(crate) struct SelectorRule {
    selector: SelectorId,
    origin: RuleOrigin,
    ranked: Ranked,
    ports: RulePorts,
}

/// The port blocks a rule matches towards the pods of a selector peer.
#[derive(Clone, Debug)]
enum RulePorts {
    /// The same towards every pod.
    Same(Vec<PortMatch>),
    /// A NetworkPolicy egress rule's ports, names resolved on each destination pod.
    NamedOnPeer(Vec<PortSpec>),
    /// A ClusterNetworkPolicy egress rule's `protocols`, names resolved on each destination pod.
    ClusterNamedOnPeer(Vec<ClusterPort>),
}

impl RulePorts {
    /// The port blocks towards the pods of identity `peer`.
    fn towards(&self, peer: &IdentityInfo) -> Cow<'_, [PortMatch]> {
        match self {
            Self::Same(same) => Cow::Borrowed(same),
            Self::NamedOnPeer(ports) => Cow::Owned(port_matches(ports, &peer.named_ports)),
            Self::ClusterNamedOnPeer(ports) => {
                Cow::Owned(cluster_port_matches(ports, &peer.named_ports))
            }
        }
    }
}

/// An endpoint direction's selector peers in evaluation order: what its entries for one
/// identity are computed from.
#[derive(Clone, Debug, Default)]
pub(crate) struct DirectionRules(Vec<SelectorRule>);

impl DirectionRules {
    /// The direction's entries for `identity` from the match sets as they are now.
    pub(crate) fn identity_entries(
        &self,
        identity: PeerId,
        pods: &Pods,
        selectors: &Selectors,
        rule_ids: &mut RuleIds,
        rules: &mut BTreeMap<RuleId, RuleOrigin>,
    ) -> BTreeMap<PolicyMatch, PolicyEntry> {
        let mut candidates = Vec::new();
        for rule in &self.0 {
            // An identity no selector matches any more (retired) has no entries.
            if !selectors.matches(rule.selector, identity) {
                continue;
            }
            // Looked up again: the rule's id was forgotten if it had no entries until now.
            let ranked = Ranked {
                decision: TierMatch {
                    rule: rule_ids.id(&rule.origin, rules),
                    ..rule.ranked.decision
                },
                ..rule.ranked
            };
            let towards = rule.ports.towards(pods.identity_info(identity));
            push_candidates(&mut candidates, identity, &towards, ranked);
        }
        resolve(candidates)
    }
}

/// Adds a candidate for each port block towards `peer` (an identity or a CIDR class).
fn push_candidates(
    candidates: &mut Vec<Candidate>,
    peer: PeerId,
    ports: &[PortMatch],
    ranked: Ranked,
) {
    // The datapath never looks WORLD up in the policy map.
    debug_assert_ne!(peer, IDENTITY_WORLD);
    for &(protocol, port, port_bits) in ports {
        let entry = PolicyMatch {
            peer,
            protocol,
            port,
            port_bits,
        };
        candidates.push((entry, ranked));
    }
}

/// Which of an entry's two decisions a rule takes part in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Slot {
    /// The Admin tier.
    Admin,
    /// The tier below it: NetworkPolicy when one isolates the direction, else Baseline.
    Below,
}

/// A rule in one endpoint direction's evaluation order: its slot, and what it does at what
/// rank.
#[derive(Clone, Copy, Debug)]
struct Ranked {
    slot: Slot,
    decision: TierMatch,
}

impl Ranked {
    /// Whether this rule comes after every rule met before it in its slot, so that a peer and
    /// ports an earlier rule of the slot already holds add nothing: true of ClusterNetworkPolicy
    /// rules (ranks that grow in the order they are met), not of NetworkPolicy's, which share a
    /// rank and are told apart by rule id.
    fn after_every_earlier_rule(self) -> bool {
        self.slot == Slot::Admin || self.decision.rank > 0
    }
}

/// One peer entry a rule matches, before the rules' order is resolved.
type Candidate = (PolicyMatch, Ranked);

/// One block (`ipBlock`, `networks`, a node's address, or the every-peer block) of one rule,
/// with the port blocks it matches.
type BlockRule = (Block, Ranked, Vec<PortMatch>);

/// The policies one endpoint direction is held to, tier by tier, in evaluation order.
pub(crate) struct DirectionPolicies<'p> {
    /// Admin ClusterNetworkPolicies selecting the pod, by priority then name.
    pub(crate) admin: Vec<&'p ClusterNetworkPolicy>,
    /// The NetworkPolicies isolating the direction (empty: none does).
    pub(crate) network: Vec<&'p NetworkPolicy>,
    /// Baseline ClusterNetworkPolicies selecting the pod, by priority then name.
    pub(crate) baseline: Vec<&'p ClusterNetworkPolicy>,
    /// Only audit-mode NetworkPolicies isolate it (or the agent audits everything): a flow they
    /// do not allow passes as audited unless an Admin or Baseline rule denies it.
    pub(crate) audited: bool,
}

impl<'a> RuleCompiler<'a> {
    /// A compiler for one endpoint's directions.
    pub(crate) fn new(
        cluster: &'a Cluster,
        pods: &'a Pods,
        addresses: &'a AddressClaims,
        selectors: &'a mut Selectors,
        rule_ids: &'a mut RuleIds,
        rules: &'a mut BTreeMap<RuleId, RuleOrigin>,
    ) -> Self {
        Self {
            cluster,
            pods,
            addresses,
            selectors,
            rule_ids,
            rules,
            selectors_used: Vec::new(),
            reads_every_pod: false,
            reads_nodes: false,
            direction_rules: Vec::new(),
            held: FxHashSet::default(),
        }
    }

    /// The compiled policy of `pod`'s `direction`, and what its entries for one identity are
    /// computed from.
    pub(crate) fn compile_direction(
        &mut self,
        pod: &Pod,
        direction: Direction,
        policies: &DirectionPolicies<'_>,
    ) -> (CompiledPolicy, DirectionRules) {
        self.direction_rules.clear();
        self.held.clear();
        let mut compiled = CompiledPolicy::default();
        // Collected unsorted and resolved in one pass: much cheaper than inserting thousands
        // of entries one by one.
        let mut candidates: Vec<Candidate> = Vec::new();
        let mut blocks: Vec<BlockRule> = Vec::new();
        let mut admin_rank = 0;
        for policy in &policies.admin {
            self.add_cluster_policy(
                policy,
                Slot::Admin,
                &mut admin_rank,
                false,
                pod,
                direction,
                &mut candidates,
                &mut blocks,
            );
        }
        // NetworkPolicy is a union: its rules share one rank, before every Baseline rule.
        let network_rank = Ranked {
            slot: Slot::Below,
            decision: TierMatch {
                rule: 0,
                rank: 0,
                action: rule_action::ALLOW,
                reserved: 0,
            },
        };
        for policy in &policies.network {
            self.add_network_policy(
                policy,
                network_rank,
                pod,
                direction,
                &mut candidates,
                &mut blocks,
            );
        }
        // Baseline decides only where no NetworkPolicy isolates the direction, or where the
        // isolation is audited (there only its Deny counts: an Accept leaves the flow to be
        // reported as audited).
        if policies.network.is_empty() || policies.audited {
            let mut baseline_rank = 1;
            for policy in &policies.baseline {
                self.add_cluster_policy(
                    policy,
                    Slot::Below,
                    &mut baseline_rank,
                    policies.audited,
                    pod,
                    direction,
                    &mut candidates,
                    &mut blocks,
                );
            }
        }

        add_cidr_classes(&mut compiled, &mut candidates, &blocks);
        compiled.entries = resolve(candidates);
        let rules = DirectionRules(std::mem::take(&mut self.direction_rules));
        (compiled, rules)
    }

    /// Adds the rules of one NetworkPolicy isolating the direction.
    fn add_network_policy(
        &mut self,
        policy: &NetworkPolicy,
        ranked: Ranked,
        pod: &Pod,
        direction: Direction,
        candidates: &mut Vec<Candidate>,
        blocks: &mut Vec<BlockRule>,
    ) {
        let rules: &[Rule] = match direction {
            Direction::Ingress => &policy.ingress,
            Direction::Egress => &policy.egress,
        };
        for (index, rule) in rules.iter().enumerate() {
            let origin = RuleOrigin {
                policy: RulePolicy::Network(policy.id.clone()),
                direction,
                index,
            };
            let rule_id = self.rule_ids.id(&origin, self.rules);
            let ranked = Ranked {
                decision: TierMatch {
                    rule: rule_id,
                    ..ranked.decision
                },
                ..ranked
            };
            if rule.peers.is_empty() {
                // Every peer: as an ipBlock it also covers pods, the node and the world.
                for every in every_address() {
                    let ports =
                        self.address_ports(&every, pod, direction, &rule.ports, ranked, blocks);
                    blocks.push((every, ranked, ports));
                }
            }
            for peer in &rule.peers {
                match peer {
                    Peer::IpBlock { cidr, except } => {
                        let block = Block {
                            cidr: *cidr,
                            except: except.clone(),
                        };
                        let ports =
                            self.address_ports(&block, pod, direction, &rule.ports, ranked, blocks);
                        blocks.push((block, ranked, ports));
                    }
                    Peer::Pods { .. } => {
                        let key = selector_key(&policy.id.namespace, peer);
                        let selector = self.selectors.id_of(key, self.pods, self.cluster);
                        let ports = match direction {
                            Direction::Egress if has_named_port(&rule.ports) => {
                                RulePorts::NamedOnPeer(rule.ports.clone())
                            }
                            Direction::Egress => RulePorts::Same(port_matches(&rule.ports, &[])),
                            Direction::Ingress => {
                                RulePorts::Same(port_matches(&rule.ports, &pod.ports))
                            }
                        };
                        self.add_selector_peer(selector, ports, &origin, ranked, candidates);
                    }
                }
            }
        }
    }

    /// Adds the rules of one ClusterNetworkPolicy selecting the pod, numbering their ranks
    /// from `rank` on. `audited`: a Baseline Accept under an audited NetworkPolicy tier, which
    /// only ends the tier (the flow is then reported as audited).
    #[expect(
        clippy::too_many_arguments,
        reason = "one policy in its endpoint direction's context; a struct would only rename them"
    )]
    fn add_cluster_policy(
        &mut self,
        policy: &ClusterNetworkPolicy,
        slot: Slot,
        rank: &mut u16,
        audited: bool,
        pod: &Pod,
        direction: Direction,
        candidates: &mut Vec<Candidate>,
        blocks: &mut Vec<BlockRule>,
    ) {
        for (index, rule) in policy
            .rules(direction == Direction::Ingress)
            .iter()
            .enumerate()
        {
            let origin = RuleOrigin {
                policy: RulePolicy::Cluster {
                    name: policy.name.clone(),
                    tier: policy.tier,
                },
                direction,
                index,
            };
            let rule_id = self.rule_ids.id(&origin, self.rules);
            let action = match rule.action {
                Action::Accept if audited => rule_action::PASS,
                Action::Accept => rule_action::ACCEPT,
                Action::Deny => rule_action::DENY,
                Action::Pass => rule_action::PASS,
            };
            let ranked = Ranked {
                slot,
                decision: TierMatch {
                    rule: rule_id,
                    rank: *rank,
                    action,
                    reserved: 0,
                },
            };
            // 25 rules a policy: the ranks run out past 2,600 policies selecting one pod.
            *rank = rank.saturating_add(1).min(u16::MAX - 1);
            for (peer_index, peer) in rule.peers.iter().enumerate() {
                match peer {
                    ClusterPeer::Namespaces(_) | ClusterPeer::Pods { .. } => {
                        let selector = self.selectors.cluster_peer_id(
                            &policy.name,
                            (direction, index, peer_index),
                            || as_selector_peer(peer),
                            self.pods,
                            self.cluster,
                        );
                        self.add_cluster_selector_peer(
                            selector, rule, &origin, ranked, pod, direction, candidates,
                        );
                    }
                    ClusterPeer::Networks(networks) => {
                        for network in networks {
                            let block = Block {
                                cidr: *network,
                                except: Vec::new(),
                            };
                            self.add_cluster_block(block, rule, ranked, pod, direction, blocks);
                        }
                    }
                    ClusterPeer::Nodes(nodes) => {
                        self.reads_nodes = true;
                        let addresses: Vec<IpAddr> = self
                            .cluster
                            .nodes
                            .values()
                            .filter(|node| nodes.matches(&node.labels))
                            .flat_map(|node| node.addresses.iter().copied())
                            .collect();
                        for address in addresses {
                            let block = Block {
                                cidr: IpNet::from(address),
                                except: Vec::new(),
                            };
                            self.add_cluster_block(block, rule, ranked, pod, direction, blocks);
                        }
                    }
                    ClusterPeer::Everything => {
                        for every in every_address() {
                            self.add_cluster_block(every, rule, ranked, pod, direction, blocks);
                        }
                    }
                }
            }
        }
    }

    /// A `namespaces` or `pods` peer of a ClusterNetworkPolicy rule, as the selector peer that
    /// selects the same pods.
    #[expect(
        clippy::too_many_arguments,
        reason = "one peer of one rule in its endpoint direction's context"
    )]
    fn add_cluster_selector_peer(
        &mut self,
        selector: SelectorId,
        rule: &ClusterRule,
        origin: &RuleOrigin,
        ranked: Ranked,
        pod: &Pod,
        direction: Direction,
        candidates: &mut Vec<Candidate>,
    ) {
        let ports = match direction {
            Direction::Egress if has_cluster_named_port(&rule.ports) => {
                RulePorts::ClusterNamedOnPeer(rule.ports.clone())
            }
            Direction::Egress => RulePorts::Same(cluster_port_matches(&rule.ports, &[])),
            Direction::Ingress => RulePorts::Same(cluster_port_matches(&rule.ports, &pod.ports)),
        };
        self.add_selector_peer(selector, ports, origin, ranked, candidates);
    }

    /// A block of a ClusterNetworkPolicy rule. A named port towards it is resolved on each pod
    /// address it holds (egress), or on the endpoint itself (ingress).
    fn add_cluster_block(
        &mut self,
        block: Block,
        rule: &ClusterRule,
        ranked: Ranked,
        pod: &Pod,
        direction: Direction,
        blocks: &mut Vec<BlockRule>,
    ) {
        if direction == Direction::Egress && has_cluster_named_port(&rule.ports) {
            for (host, named_ports) in self.pod_hosts_in(&block) {
                let resolved = cluster_port_matches(&named_only(&rule.ports), &named_ports);
                if !resolved.is_empty() {
                    blocks.push((host, ranked, resolved));
                }
            }
        }
        let destination = match direction {
            Direction::Ingress => &pod.ports[..],
            Direction::Egress => &[][..],
        };
        let ports = cluster_port_matches(&rule.ports, destination);
        let holder = Holder::Block(block.cidr, block.except.clone());
        if !ports.is_empty() && self.hold(holder, &ports, ranked) {
            blocks.push((block, ranked, ports));
        }
    }

    /// Adds a candidate for each identity a selector peer matches and each port block the
    /// rule matches towards it.
    fn add_selector_peer(
        &mut self,
        selector: SelectorId,
        ports: RulePorts,
        origin: &RuleOrigin,
        ranked: Ranked,
        candidates: &mut Vec<Candidate>,
    ) {
        self.selectors_used.push(selector);
        if let RulePorts::Same(same) = &ports
            && !self.hold(Holder::Selector(selector), same, ranked)
        {
            return;
        }
        if let RulePorts::Same(same) = &ports {
            // In key order, so that this peer's candidates are one sorted run (`resolve` sorts
            // runs by merging them); and no identity looked up, whose ports do not matter.
            let mut same = same.clone();
            same.sort_unstable();
            for identity in self.selectors.matching_ids(selector) {
                push_candidates(candidates, identity, &same, ranked);
            }
        } else {
            for identity in self.selectors.matching_ids(selector) {
                let towards = ports.towards(self.pods.identity_info(identity));
                push_candidates(candidates, identity, &towards, ranked);
            }
        }
        self.direction_rules.push(SelectorRule {
            selector,
            origin: origin.clone(),
            ranked,
            ports,
        });
    }

    /// Records that the current direction holds `holder` on `ports` at `ranked`; false when an
    /// earlier rule of its slot already does, so that this one adds nothing.
    fn hold(&mut self, holder: Holder, ports: &[PortMatch], ranked: Ranked) -> bool {
        let key = (ranked.slot, holder, ports.to_vec());
        if ranked.after_every_earlier_rule() {
            self.held.insert(key)
        } else {
            self.held.insert(key);
            true
        }
    }

    /// The port blocks a NetworkPolicy `ipBlock` (or every-peer block) allows. An egress named
    /// port is the destination pod's: each pod address in the block gets a host prefix of its
    /// own, carrying what its names resolve to.
    fn address_ports(
        &mut self,
        block: &Block,
        pod: &Pod,
        direction: Direction,
        ports: &[PortSpec],
        ranked: Ranked,
        blocks: &mut Vec<BlockRule>,
    ) -> Vec<PortMatch> {
        if direction == Direction::Egress && has_named_port(ports) {
            for (host, named_ports) in self.pod_hosts_in(block) {
                let resolved = named_port_matches(ports, &named_ports);
                if !resolved.is_empty() {
                    blocks.push((host, ranked, resolved));
                }
            }
        }
        // An address that is no pod has no named ports.
        let destination = match direction {
            Direction::Ingress => &pod.ports[..],
            Direction::Egress => &[][..],
        };
        port_matches(ports, destination)
    }

    /// Every pod address in `block` (outside its excepts), as a host block, with the pod's
    /// container ports. Its entries depend on every pod: any pod change recompiles the
    /// endpoint.
    fn pod_hosts_in(&mut self, block: &Block) -> Vec<(Block, Vec<ContainerPort>)> {
        self.reads_every_pod = true;
        let mut hosts = Vec::new();
        for (ip, owner) in self.addresses.owners() {
            let inside =
                block.cidr.contains(&ip) && !block.except.iter().any(|except| except.contains(&ip));
            if !inside {
                continue;
            }
            let Some(identity) = self.pods.identity_of(owner) else {
                continue;
            };
            let host = Block {
                cidr: IpNet::from(ip),
                except: Vec::new(),
            };
            hosts.push((host, self.pods.identity_info(identity).named_ports.clone()));
        }
        hosts
    }
}

/// The selector peer (with its scope) that selects what a ClusterNetworkPolicy `namespaces` or
/// `pods` peer selects.
fn as_selector_peer(peer: &ClusterPeer) -> SelectorKey {
    let peer = match peer {
        ClusterPeer::Namespaces(namespaces) => Peer::Pods {
            pod_selector: None,
            namespace_selector: Some(namespaces.clone()),
        },
        ClusterPeer::Pods {
            namespace_selector,
            pod_selector,
        } => Peer::Pods {
            pod_selector: Some(pod_selector.clone()),
            namespace_selector: Some(namespace_selector.clone()),
        },
        _ => unreachable!("only namespaces and pods peers are selectors"),
    };
    // A selector with a namespaceSelector means the same in every namespace.
    selector_key("", &peer)
}

/// `0.0.0.0/0` and `::/0`.
fn every_address() -> [Block; 2] {
    [IpNet::V4(Ipv4Net::default()), IpNet::V6(Ipv6Net::default())].map(|cidr| Block {
        cidr,
        except: Vec::new(),
    })
}

/// Turns the blocks of one endpoint's direction into CIDR classes (see `cidr.rs`) and their
/// candidates.
fn add_cidr_classes(
    compiled: &mut CompiledPolicy,
    candidates: &mut Vec<Candidate>,
    blocks: &[BlockRule],
) {
    if blocks.is_empty() {
        return;
    }
    let plain: Vec<Block> = blocks.iter().map(|(block, _, _)| block.clone()).collect();
    let mut class_ids: BTreeMap<BTreeSet<usize>, PeerId> = BTreeMap::new();
    for (prefix, holders) in cidr::classes(&plain) {
        if holders.is_empty() {
            // The empty class: no entries, so the lookup finds nothing and denies.
            compiled
                .cidrs
                .insert(prefix, CIDR_CLASS_FLAG | u32::MAX >> 1);
            continue;
        }
        if let Some(class) = class_ids.get(&holders) {
            compiled.cidrs.insert(prefix, *class);
            continue;
        }
        let class =
            CIDR_CLASS_FLAG | u32::try_from(class_ids.len()).expect("fewer than 2^31 classes");
        compiled.cidrs.insert(prefix, class);
        for &index in &holders {
            let (_, ranked, ports) = &blocks[index];
            push_candidates(candidates, class, ports, *ranked);
        }
        class_ids.insert(holders, class);
    }
}

/// Of two matches of one tier, the one evaluated first: the lower rank, then (among the equal
/// ranks of NetworkPolicy's rules) the lower rule id, so attribution is stable.
fn earlier(a: TierMatch, b: TierMatch) -> TierMatch {
    let order = |matched: &TierMatch| {
        (
            matched.action == rule_action::NONE,
            matched.rank,
            matched.rule,
        )
    };
    if order(&b) < order(&a) { b } else { a }
}

/// The entries of a compiled policy from its candidates: each key gets, per tier, the first
/// rule of every candidate whose key covers it. A lookup returns the longest key holding a
/// flow, and any candidate that matches part of that key's own part matches all of it (its key
/// is that key or one of the ones it nests in), so that key's answer is the flow's.
fn resolve(mut candidates: Vec<Candidate>) -> BTreeMap<PolicyMatch, PolicyEntry> {
    // Sorted, then folded and built in one pass: a map built from sorted keys is filled leaf by
    // leaf, where thousands of inserts would each search it. Each selector peer's candidates
    // come as a sorted run (by identity, then port), which the stable sort merges rather than
    // sorting them again; the order among equal keys does not matter to the fold.
    candidates.sort_by_key(|(entry, _)| *entry);
    let mut folded: Vec<(PolicyMatch, PolicyEntry)> = Vec::with_capacity(candidates.len());
    for (entry, ranked) in candidates {
        let decided = match folded.last_mut() {
            Some((last, decided)) if *last == entry => decided,
            _ => {
                folded.push((entry, PolicyEntry::default()));
                &mut folded.last_mut().expect("just pushed").1
            }
        };
        match ranked.slot {
            Slot::Admin => decided.admin = earlier(decided.admin, ranked.decision),
            Slot::Below => decided.below = earlier(decided.below, ranked.decision),
        }
    }
    // A key is covered only by keys of its own peer, which sort next to it: each peer's few
    // keys are compared with each other, where looking up every shorter port block of every
    // key in a map was most of the compile.
    let mut resolved = Vec::with_capacity(folded.len());
    for peer_keys in folded.chunk_by(|(a, _), (b, _)| a.peer == b.peer) {
        for (entry, decided) in peer_keys {
            let mut decided = *decided;
            for (outer, outer_decided) in peer_keys {
                if holds_all_of(outer, entry) {
                    decided.admin = earlier(decided.admin, outer_decided.admin);
                    decided.below = earlier(decided.below, outer_decided.below);
                }
            }
            resolved.push((*entry, decided));
        }
    }
    resolved.into_iter().collect()
}

/// Whether `outer`, another key of the same peer, holds all of `entry`: every protocol, or
/// the same protocol and a shorter port block that holds `entry`'s.
fn holds_all_of(outer: &PolicyMatch, entry: &PolicyMatch) -> bool {
    let Some(protocol) = entry.protocol else {
        return false;
    };
    match outer.protocol {
        None => true,
        Some(outer_protocol) => {
            outer_protocol == protocol
                && outer.port_bits < entry.port_bits
                && entry.port & port_mask(outer.port_bits) == outer.port
        }
    }
}

/// The mask of a port block of `bits` leading bits.
fn port_mask(bits: u8) -> u16 {
    u16::MAX.checked_shl(16 - u32::from(bits)).unwrap_or(0)
}

fn has_cluster_named_port(ports: &[ClusterPort]) -> bool {
    ports
        .iter()
        .any(|port| matches!(port, ClusterPort::Named(_)))
}

/// The named ones of a ClusterNetworkPolicy rule's `protocols`.
fn named_only(ports: &[ClusterPort]) -> Vec<ClusterPort> {
    ports
        .iter()
        .filter(|port| matches!(port, ClusterPort::Named(_)))
        .cloned()
        .collect()
}

/// The (protocol, port block) pairs a ClusterNetworkPolicy rule's `protocols` match towards a
/// destination with container ports `destination` (none for an address that is not a pod: a
/// named port matches nothing there).
fn cluster_port_matches(ports: &[ClusterPort], destination: &[ContainerPort]) -> Vec<PortMatch> {
    if ports.is_empty() {
        return vec![(None, 0, 0)];
    }
    let mut matches = Vec::new();
    for port in ports {
        match port {
            ClusterPort::Range {
                protocol,
                first,
                last,
            } => matches.extend(
                port_prefixes(*first, *last)
                    .into_iter()
                    .map(|(port, bits)| (Some(protocol.number()), port, bits)),
            ),
            ClusterPort::Named(name) => matches.extend(
                destination
                    .iter()
                    .filter(|candidate| candidate.name.as_deref() == Some(name.as_str()))
                    .map(|candidate| (Some(candidate.protocol.number()), candidate.port, 16)),
            ),
        }
    }
    matches
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

/// The (protocol, port block) pairs a rule's `ports` allow towards a destination with
/// container ports `destination`: the endpoint itself for ingress, the peer's for egress (none
/// for an address that is no pod, where a name resolves to nothing).
fn port_matches(ports: &[PortSpec], destination: &[ContainerPort]) -> Vec<PortMatch> {
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
            Some(PortRef::Name(name)) => matches.extend(
                resolve_named_port(destination, name, spec.protocol)
                    .map(|port| (protocol, port, 16)),
            ),
        }
    }
    matches
}
