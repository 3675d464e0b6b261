//! One endpoint's direction: the rules of the policies isolating it, turned into policy
//! entries (identity or CIDR class, protocol, aligned port block) and CIDR prefixes.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use netwarden_common::{CIDR_CLASS_FLAG, IDENTITY_WORLD, PeerId};
use netwarden_model::{Cluster, ContainerPort, NetworkPolicy, Peer, Pod, PortRef, PortSpec, Rule};

use crate::{
    cidr::{self, Block},
    identity::{IdentityInfo, resolve_named_port},
    ids::RuleIds,
    pods::{AddressClaims, Pods},
    ports::port_prefixes,
    selectors::{SelectorKey, Selectors, selector_key},
    state::{CompiledPolicy, Direction, PolicyMatch, RuleId, RuleOrigin},
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
}

/// One `ipBlock` (or the every-peer block) of one rule, with the port blocks it allows.
type BlockRule = (Block, RuleId, Vec<PortMatch>);

impl RuleCompiler<'_> {
    /// The compiled policy of `pod`'s `direction`, isolated by `policies`.
    pub(crate) fn compile_direction(
        &mut self,
        pod: &Pod,
        direction: Direction,
        policies: &[&NetworkPolicy],
    ) -> CompiledPolicy {
        let mut compiled = CompiledPolicy::default();
        // Collected unsorted and built into the map in one pass: much cheaper than inserting
        // thousands of entries one by one.
        let mut entries: Vec<(PolicyMatch, RuleId)> = Vec::new();
        let mut blocks: Vec<BlockRule> = Vec::new();
        for policy in policies {
            let rules: &[Rule] = match direction {
                Direction::Ingress => &policy.ingress,
                Direction::Egress => &policy.egress,
            };
            for (index, rule) in rules.iter().enumerate() {
                let rule_id = self.rule_ids.id(
                    RuleOrigin {
                        policy: policy.id.clone(),
                        direction,
                        index,
                    },
                    self.rules,
                );
                if rule.peers.is_empty() {
                    // Every peer: as an ipBlock it also covers pods, the node and the world.
                    for every in [IpNet::V4(Ipv4Net::default()), IpNet::V6(Ipv6Net::default())] {
                        let block = Block {
                            cidr: every,
                            except: Vec::new(),
                        };
                        self.add_ip_block(block, pod, direction, rule, rule_id, &mut blocks);
                    }
                }
                for peer in &rule.peers {
                    match peer {
                        Peer::IpBlock { cidr, except } => {
                            let block = Block {
                                cidr: *cidr,
                                except: except.clone(),
                            };
                            self.add_ip_block(block, pod, direction, rule, rule_id, &mut blocks);
                        }
                        Peer::Pods { .. } => self.add_selector_peer(
                            &policy.id.namespace,
                            peer,
                            pod,
                            direction,
                            rule,
                            rule_id,
                            &mut entries,
                        ),
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

    /// Adds an entry for each identity a selector peer of `rule` matches and each port block
    /// the rule allows towards it.
    #[expect(
        clippy::too_many_arguments,
        reason = "one rule's peer in its context; a struct would only rename them"
    )]
    fn add_selector_peer(
        &mut self,
        policy_namespace: &str,
        peer: &Peer,
        pod: &Pod,
        direction: Direction,
        rule: &Rule,
        rule_id: RuleId,
        entries: &mut Vec<(PolicyMatch, RuleId)>,
    ) {
        let key = selector_key(policy_namespace, peer);
        let matched: Vec<PeerId> = self
            .selectors
            .matching(&key, self.pods, self.cluster)
            .iter()
            .copied()
            .collect();
        self.selectors_used.push(key);
        // Only egress named ports depend on the peer; resolve the rest once.
        let shared = (direction == Direction::Ingress || !has_named_port(&rule.ports))
            .then(|| port_matches(&rule.ports, direction, pod, None));
        for identity in matched {
            // The datapath never looks WORLD up in the policy map.
            debug_assert_ne!(identity, IDENTITY_WORLD);
            let resolved;
            let ports = if let Some(ports) = &shared {
                ports
            } else {
                let info = self.pods.identity_info(identity);
                resolved = port_matches(&rule.ports, direction, pod, Some(info));
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

    /// Adds one `ipBlock` (or the every-peer block) of `rule` to the endpoint's blocks.
    fn add_ip_block(
        &mut self,
        block: Block,
        pod: &Pod,
        direction: Direction,
        rule: &Rule,
        rule_id: RuleId,
        blocks: &mut Vec<BlockRule>,
    ) {
        if direction == Direction::Egress && has_named_port(&rule.ports) {
            // A named port is the destination pod's: each pod address in the block gets a
            // host prefix of its own, carrying what its names resolve to.
            self.reads_every_pod = true;
            for (ip, owner) in self.addresses.owners() {
                let inside = block.cidr.contains(&ip)
                    && !block.except.iter().any(|except| except.contains(&ip));
                let owner = self
                    .pods
                    .identity_of(owner)
                    .map(|identity| self.pods.identity_info(identity));
                let Some(owner) = owner.filter(|_| inside) else {
                    continue;
                };
                let resolved = named_port_matches(&rule.ports, &owner.named_ports);
                if !resolved.is_empty() {
                    let host = Block {
                        cidr: IpNet::from(ip),
                        except: Vec::new(),
                    };
                    blocks.push((host, rule_id, resolved));
                }
            }
        }
        let ports = port_matches(&rule.ports, direction, pod, None);
        blocks.push((block, rule_id, ports));
    }
}

/// Turns the `ipBlock` peers of one endpoint's direction into CIDR classes (see `cidr.rs`) and
/// their policy entries.
fn add_cidr_classes(
    compiled: &mut CompiledPolicy,
    entries: &mut Vec<(PolicyMatch, RuleId)>,
    blocks: &[BlockRule],
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
