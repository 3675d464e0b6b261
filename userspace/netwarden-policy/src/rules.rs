//! One endpoint's direction: the rules of every tier that apply to it, turned into policy
//! entries (identity or CIDR class, protocol, aligned port block) and CIDR prefixes.
//!
//! The tiers' precedence is resolved here, not in the datapath: every rule gets a rank in its
//! tier's evaluation order (Admin ClusterNetworkPolicies by priority, name and rule index;
//! NetworkPolicy's rules all one rank; then Baseline), and every entry holds, per tier, the
//! first rule that matches all of it (see `docs/design.md`, "ClusterNetworkPolicy tiers").

use std::{
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

use crate::{
    cidr::{self, Block},
    identity::{IdentityInfo, resolve_named_port},
    ids::RuleIds,
    pods::{AddressClaims, Pods},
    ports::port_prefixes,
    selectors::{SelectorKey, Selectors, selector_key},
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
    /// recompiles the endpoint.
    pub(crate) selectors_used: Vec<SelectorKey>,
    /// Whether an egress `ipBlock` rule with named ports was compiled: its entries depend on
    /// every pod's addresses and ports.
    pub(crate) reads_every_pod: bool,
    /// Whether a ClusterNetworkPolicy `nodes` peer was compiled: its entries depend on the
    /// nodes' labels and addresses.
    pub(crate) reads_nodes: bool,
}

/// Which of an entry's two decisions a rule takes part in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
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

impl RuleCompiler<'_> {
    /// The compiled policy of `pod`'s `direction`.
    pub(crate) fn compile_direction(
        &mut self,
        pod: &Pod,
        direction: Direction,
        policies: &DirectionPolicies<'_>,
    ) -> CompiledPolicy {
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
        compiled
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
            let rule_id = self.rule_ids.id(
                RuleOrigin {
                    policy: RulePolicy::Network(policy.id.clone()),
                    direction,
                    index,
                },
                self.rules,
            );
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
                        let ports = |_: &mut Self, info: Option<&IdentityInfo>| {
                            port_matches(&rule.ports, direction, pod, info)
                        };
                        let per_peer =
                            direction == Direction::Egress && has_named_port(&rule.ports);
                        self.add_selector_peer(key, per_peer, ranked, candidates, ports);
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
            let rule_id = self.rule_ids.id(
                RuleOrigin {
                    policy: RulePolicy::Cluster {
                        name: policy.name.clone(),
                        tier: policy.tier,
                    },
                    direction,
                    index,
                },
                self.rules,
            );
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
            for peer in &rule.peers {
                match peer {
                    ClusterPeer::Namespaces(namespaces) => {
                        let peer = Peer::Pods {
                            pod_selector: None,
                            namespace_selector: Some(namespaces.clone()),
                        };
                        self.add_cluster_selector_peer(
                            &peer, rule, ranked, pod, direction, candidates,
                        );
                    }
                    ClusterPeer::Pods {
                        namespace_selector,
                        pod_selector,
                    } => {
                        let peer = Peer::Pods {
                            pod_selector: Some(pod_selector.clone()),
                            namespace_selector: Some(namespace_selector.clone()),
                        };
                        self.add_cluster_selector_peer(
                            &peer, rule, ranked, pod, direction, candidates,
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
    fn add_cluster_selector_peer(
        &mut self,
        peer: &Peer,
        rule: &ClusterRule,
        ranked: Ranked,
        pod: &Pod,
        direction: Direction,
        candidates: &mut Vec<Candidate>,
    ) {
        // A selector with a namespaceSelector means the same in every namespace.
        let key = selector_key("", peer);
        let per_peer = direction == Direction::Egress && has_cluster_named_port(&rule.ports);
        let ports = |_: &mut Self, info: Option<&IdentityInfo>| {
            let destination = match direction {
                Direction::Ingress => &pod.ports[..],
                Direction::Egress => info.map_or(&[][..], |info| &info.named_ports[..]),
            };
            cluster_port_matches(&rule.ports, destination)
        };
        self.add_selector_peer(key, per_peer, ranked, candidates, ports);
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
        if !ports.is_empty() {
            blocks.push((block, ranked, ports));
        }
    }

    /// Adds a candidate for each identity a selector peer matches and each port block the
    /// rule matches towards it. `per_peer`: the ports depend on the peer (egress named ports).
    fn add_selector_peer(
        &mut self,
        key: SelectorKey,
        per_peer: bool,
        ranked: Ranked,
        candidates: &mut Vec<Candidate>,
        mut ports: impl FnMut(&mut Self, Option<&IdentityInfo>) -> Vec<PortMatch>,
    ) {
        let matched: Vec<PeerId> = self
            .selectors
            .matching(&key, self.pods, self.cluster)
            .iter()
            .copied()
            .collect();
        self.selectors_used.push(key);
        // Only egress named ports depend on the peer; resolve the rest once.
        let shared = (!per_peer).then(|| ports(self, None));
        for identity in matched {
            // The datapath never looks WORLD up in the policy map.
            debug_assert_ne!(identity, IDENTITY_WORLD);
            let resolved;
            let ports = if let Some(ports) = &shared {
                ports
            } else {
                let info = self.pods.identity_info(identity).clone();
                resolved = ports(self, Some(&info));
                &resolved
            };
            for &(protocol, port, port_bits) in ports {
                let entry = PolicyMatch {
                    peer: identity,
                    protocol,
                    port,
                    port_bits,
                };
                candidates.push((entry, ranked));
            }
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
        port_matches(ports, direction, pod, None)
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
            for &(protocol, port, port_bits) in ports {
                let entry = PolicyMatch {
                    peer: class,
                    protocol,
                    port,
                    port_bits,
                };
                candidates.push((entry, *ranked));
            }
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
fn resolve(candidates: Vec<Candidate>) -> BTreeMap<PolicyMatch, PolicyEntry> {
    let mut own: BTreeMap<PolicyMatch, PolicyEntry> = BTreeMap::new();
    for (entry, ranked) in candidates {
        let decided = own.entry(entry).or_default();
        match ranked.slot {
            Slot::Admin => decided.admin = earlier(decided.admin, ranked.decision),
            Slot::Below => decided.below = earlier(decided.below, ranked.decision),
        }
    }
    own.iter()
        .map(|(entry, decided)| {
            let mut resolved = *decided;
            for cover in covering(entry) {
                if let Some(outer) = own.get(&cover) {
                    resolved.admin = earlier(resolved.admin, outer.admin);
                    resolved.below = earlier(resolved.below, outer.below);
                }
            }
            (*entry, resolved)
        })
        .collect()
}

/// The keys of the same peer that hold all of `entry`, other than itself.
fn covering(entry: &PolicyMatch) -> impl Iterator<Item = PolicyMatch> + '_ {
    let every_protocol = PolicyMatch {
        protocol: None,
        port: 0,
        port_bits: 0,
        ..*entry
    };
    let shorter_ports = entry.protocol.into_iter().flat_map(move |_| {
        (0..entry.port_bits).map(move |bits| PolicyMatch {
            port: if bits == 0 {
                0
            } else {
                entry.port & (u16::MAX << (16 - u32::from(bits)))
            },
            port_bits: bits,
            ..*entry
        })
    });
    std::iter::once(every_protocol)
        .filter(|_| entry.protocol.is_some())
        .chain(shorter_ports)
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

/// The (protocol, port block) pairs a rule's `ports` allow towards a destination. Named ports
/// resolve against the destination pod: the endpoint itself for ingress, the peer identity for
/// egress (`None` for an ipBlock peer, where a name resolves to nothing).
fn port_matches(
    ports: &[PortSpec],
    direction: Direction,
    pod: &Pod,
    peer: Option<&IdentityInfo>,
) -> Vec<PortMatch> {
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
