//! The datapath's lookup, over what the agent writes to the maps instead of the maps.
//!
//! [`Maps`] holds what the agent writes for a [`DatapathState`], keyed by
//! [`crate::map_keys`], and [`Maps::verdict`] follows `enforce_flow` and `decide` in
//! `ebpf/netwarden-ebpf/src/verdict.rs` (with the lookups of `policy.rs`) step for step: the same keys (16-byte IPv4-mapped
//! addresses in `IPCACHE`, `ENDPOINT_ADDRESSES` and `FRONTENDS`; IPv4 prefixes in `CIDRS_V4`
//! under 4-byte addresses and IPv6 ones in `CIDRS_V6`, each after the policy id; `POLICY` keyed
//! by policy, peer, protocol and port), the same longest-prefix matches, the same endpoint
//! states, the same order of checks and the same reasons (`netwarden_common::counter`). So the
//! compiler's tests test what the kernel will do with its output, and a differential test can
//! feed one packet both to the kernel (`BPF_PROG_TEST_RUN`) and to [`Maps::verdict`].
//!
//! Left out, because they are not the policy lookup: frame parsing (ARP, neighbour discovery,
//! VLAN tags, other ethertypes, malformed headers), fragments and the conntrack table itself,
//! which [`crate::classify`] models on top of [`Maps::verdict`] for whole frames; the mTLS
//! screen and flows decided after translation (`translated.rs`). [`Packet`] describes an IP
//! packet of a pod that is not mTLS-strict, as the parser hands it to the decision: its flow,
//! what it may do to conntrack ([`Opening`]) and what conntrack holds for it.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use netwarden_common::{
    CIDR_KEY_FULL_BITS, CIDR_KEY_V4_FULL_BITS, CidrKey, CidrKeyV4, Endpoint, EndpointAddress,
    FrontendKey, IDENTITY_HOST, IDENTITY_WORLD, POLICY_KEY_FULL_BITS, POLICY_NOT_ISOLATED, PeerId,
    PolicyEntry, PolicyKey, counter, endpoint_flags, endpoint_state, ipv4_of_mapped, rule_action,
};
use netwarden_model::PodRef;

// Kept here too: the datapath imports it from this module.
pub use crate::map_keys::mapped;
use crate::{
    map_keys::{CidrEntryKey, cidr_key, endpoint_address, frontend_key, ready_endpoint},
    state::{DatapathState, Direction, PolicyId, RuleId},
};

/// Why the datapath passes or drops the first packet of a flow: the outcomes of the kernel's
/// `decide()`, each with its reason ([`Decision::reason`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The peer is the pod itself (`ALLOWED_SELF`).
    AllowedSelf,
    /// From the node to the pod (`ALLOWED_NODE`).
    AllowedNode,
    /// The endpoint is not READY: its pod is unknown, or it is locked down
    /// (`DENIED_ENDPOINT_NOT_READY`).
    NotReady,
    /// The endpoint is not isolated in this direction (`ALLOWED_NOT_ISOLATED`).
    AllowedNotIsolated,
    /// Allowed by this rule (`ALLOWED_BY_POLICY`).
    Allowed(RuleId),
    /// Isolated, and no rule allows it (`DENIED_BY_POLICY`).
    Denied,
    /// Isolated in audit mode, and no rule allows it: passes (`AUDITED_BY_POLICY`).
    Audited,
    /// A ClusterNetworkPolicy `Accept` rule matched first (`ALLOWED_BY_CLUSTER_POLICY`).
    ClusterAccepted(RuleId),
    /// A ClusterNetworkPolicy `Deny` rule matched first (`DENIED_BY_CLUSTER_POLICY`).
    ClusterDenied(RuleId),
}

impl Decision {
    /// Whether the packet passes.
    #[must_use]
    pub fn is_allowed(self) -> bool {
        matches!(
            self,
            Self::AllowedSelf
                | Self::AllowedNode
                | Self::AllowedNotIsolated
                | Self::Allowed(_)
                | Self::Audited
                | Self::ClusterAccepted(_)
        )
    }

    /// The `counter` reason the kernel counts this decision under.
    #[must_use]
    pub fn reason(self) -> u32 {
        match self {
            Self::AllowedSelf => counter::ALLOWED_SELF,
            Self::AllowedNode => counter::ALLOWED_NODE,
            Self::NotReady => counter::DENIED_ENDPOINT_NOT_READY,
            Self::AllowedNotIsolated => counter::ALLOWED_NOT_ISOLATED,
            Self::Allowed(_) => counter::ALLOWED_BY_POLICY,
            Self::Denied => counter::DENIED_BY_POLICY,
            Self::Audited => counter::AUDITED_BY_POLICY,
            Self::ClusterAccepted(_) => counter::ALLOWED_BY_CLUSTER_POLICY,
            Self::ClusterDenied(_) => counter::DENIED_BY_CLUSTER_POLICY,
        }
    }
}

/// What conntrack holds for a packet's flow when the packet arrives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Conntrack {
    /// Nothing: the flow is new (or was evicted, or swept).
    Untracked,
    /// The flow, allowed under the current policy epoch.
    CurrentEpoch,
    /// The flow, allowed under an older epoch, opened in direction `opened`.
    OlderEpoch {
        /// The direction of the packet that opened it.
        opened: Direction,
    },
}

/// What a packet may do besides being decided, as the kernel's parser (`packet.rs`) tells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opening {
    /// It may open a tracked flow: a TCP SYN without ACK, an ICMP echo request, any packet of
    /// UDP, SCTP and protocols without ports.
    Opens,
    /// It may not: a TCP segment of a connection under way (FIN and RST too: they only tell the
    /// sweeper the connection is closing), an echo reply, any other ICMP message.
    Continues,
    /// An IPv6 neighbour solicitation or advertisement from an address that is not link-local:
    /// link plumbing leaving the pod from an address it owns, and towards it.
    Neighbour,
    /// An ICMP error; `quotes_tracked_flow` when the packet it quotes belongs to a flow
    /// conntrack holds for the endpoint (such an error passes).
    IcmpError {
        /// Whether the quoted packet's flow is tracked.
        quotes_tracked_flow: bool,
    },
}

/// One packet, as the programs see it on a pod's veth: its flow from the pod's side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet {
    /// The veth's ifindex (the endpoint).
    pub ifindex: u32,
    /// Leaving the pod (egress) or reaching it (ingress).
    pub direction: Direction,
    /// The pod's address: the source of a packet leaving it, the destination of one reaching
    /// it. Both addresses are of one family.
    pub pod_address: IpAddr,
    /// The other end's address.
    pub peer_address: IpAddr,
    /// The IP protocol number.
    pub protocol: u8,
    /// The pod's port (0 for protocols without ports).
    pub pod_port: u16,
    /// The peer's port (0 for protocols without ports).
    pub peer_port: u16,
    /// What the packet may do: open a flow, continue one, or pass as link plumbing or as an
    /// ICMP error about a tracked flow.
    pub opening: Opening,
    /// What conntrack holds for its flow.
    pub conntrack: Conntrack,
}

/// What the program returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// `TC_ACT_UNSPEC`: on to the next program.
    Pass,
    /// `TC_ACT_SHOT`.
    Drop,
}

/// What the packet does to its flow's conntrack entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConntrackChange {
    /// Nothing.
    None,
    /// A new entry, under the current epoch.
    Created,
    /// The entry, decided again and still allowed, now under the current epoch.
    Renewed,
    /// The entry, decided again and now denied, removed.
    Removed,
}

/// The kernel's answer for one packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// Whether it passes.
    pub verdict: Verdict,
    /// The `counter` reason it is counted under.
    pub reason: u32,
    /// The rule that allowed a new flow (`ALLOWED_BY_POLICY`), as the verdict event names it.
    pub rule: Option<RuleId>,
    /// What it did to conntrack.
    pub conntrack: ConntrackChange,
}

impl Outcome {
    fn new(verdict: Verdict, reason: u32) -> Self {
        Self {
            verdict,
            reason,
            rule: None,
            conntrack: ConntrackChange::None,
        }
    }

    /// The reason's label, as the metrics and the verdict log name it.
    #[must_use]
    pub fn label(&self) -> &'static str {
        counter::reason(self.reason).map_or("unknown", |reason| reason.label)
    }
}

/// A [`Maps`] endpoint could not be placed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    /// The compiled state has no local endpoint for this pod.
    #[error("Pod {0} is not a local endpoint of the compiled state")]
    NotAnEndpoint(PodRef),
}

/// The maps the programs read, as the agent writes them for one [`DatapathState`].
///
/// Each map is held under the key bytes the agent writes ([`crate::map_keys`]); the tries
/// answer as the kernel's LPM tries do.
#[derive(Clone, Debug)]
pub struct Maps<'a> {
    state: &'a DatapathState,
    ipcache: HashMap<[u8; 16], PeerId>,
    policy: LpmTrie<POLICY_KEY_BYTES, PolicyEntry>,
    cidrs_v4: LpmTrie<CIDR_V4_KEY_BYTES, PeerId>,
    cidrs_v6: LpmTrie<CIDR_V6_KEY_BYTES, PeerId>,
    endpoints: BTreeMap<u32, Endpoint>,
    endpoint_addresses: BTreeSet<EndpointAddress>,
    /// Empty unless the hook after translation is attached; the agent raises
    /// `SETTING_FRONTENDS_INSTALLED` exactly while it holds an entry.
    frontends: BTreeSet<FrontendKey>,
}

impl<'a> Maps<'a> {
    /// What the agent writes for `state` before it places any endpoint: `IPCACHE`, `POLICY`,
    /// `CIDRS_V4`, `CIDRS_V6`, and `FRONTENDS` when the hook after translation is attached
    /// (`translation_hook`; without it no frontend is installed and nothing is deferred).
    #[must_use]
    pub fn new(state: &'a DatapathState, translation_hook: bool) -> Self {
        let ipcache = state
            .ipcache
            .iter()
            .map(|(address, identity)| (mapped(*address), *identity))
            .collect();
        let mut policy = LpmTrie::default();
        let mut cidrs_v4 = LpmTrie::default();
        let mut cidrs_v6 = LpmTrie::default();
        // In the order the agent installs a policy: its prefixes, then its entries.
        for (id, compiled) in &state.policies {
            for (prefix, class) in &compiled.cidrs {
                match cidr_key(*id, prefix) {
                    CidrEntryKey::V4(prefix_len, key) => {
                        cidrs_v4.insert(prefix_len, cidr_v4_bytes(key), *class);
                    }
                    CidrEntryKey::V6(prefix_len, key) => {
                        cidrs_v6.insert(prefix_len, cidr_v6_bytes(&key), *class);
                    }
                }
            }
            for (entry, decided) in &compiled.entries {
                let (prefix_len, key) = entry.key(*id);
                policy.insert(prefix_len, policy_key_bytes(&key), *decided);
            }
        }
        let frontends = if translation_hook {
            state.service_frontends.keys().map(frontend_key).collect()
        } else {
            BTreeSet::new()
        };
        Self {
            state,
            ipcache,
            policy,
            cidrs_v4,
            cidrs_v6,
            endpoints: BTreeMap::new(),
            endpoint_addresses: BTreeSet::new(),
            frontends,
        }
    }

    /// Enforces on `ifindex` for the local pod `pod`, as the agent does once its policies are
    /// installed: READY with its policies, owning its addresses.
    ///
    /// # Errors
    ///
    /// [`LookupError::NotAnEndpoint`] when the state has no local endpoint for `pod`.
    pub fn place_endpoint(&mut self, ifindex: u32, pod: &PodRef) -> Result<(), LookupError> {
        let local = self
            .state
            .endpoints
            .get(pod)
            .ok_or_else(|| LookupError::NotAnEndpoint(pod.clone()))?;
        let addresses = local.ips.clone();
        self.set_endpoint(ifindex, ready_endpoint(local), &addresses);
        Ok(())
    }

    /// Writes `ENDPOINTS[ifindex]` as given and the addresses the endpoint owns: for a locked
    /// or unknown endpoint ([`crate::map_keys::locked_endpoint`],
    /// [`crate::map_keys::unknown_endpoint`]).
    pub fn set_endpoint(&mut self, ifindex: u32, endpoint: Endpoint, addresses: &[IpAddr]) {
        self.endpoints.insert(ifindex, endpoint);
        self.endpoint_addresses
            .retain(|owned| owned.ifindex != ifindex);
        self.endpoint_addresses.extend(
            addresses
                .iter()
                .map(|address| endpoint_address(ifindex, *address)),
        );
    }

    /// What the program does with `packet`: steps 2 to 6 of `verdict.rs` (the module comment
    /// above says what is left out).
    #[must_use]
    pub fn verdict(&self, packet: &Packet) -> Outcome {
        use {Verdict::Drop, Verdict::Pass};
        // 2. A tracked flow of the current epoch: the fast path, before any other check.
        if packet.conntrack == Conntrack::CurrentEpoch {
            return Outcome::new(Pass, counter::ALLOWED_TRACKED);
        }
        // 3. The endpoint, then the source of a packet leaving the pod.
        let Some(endpoint) = self.endpoints.get(&packet.ifindex) else {
            return Outcome::new(Drop, counter::DENIED_ENDPOINT_NOT_READY);
        };
        let owns_pod_address = self
            .endpoint_addresses
            .contains(&endpoint_address(packet.ifindex, packet.pod_address));
        if packet.direction == Direction::Egress && !owns_pod_address {
            return Outcome::new(Drop, counter::DENIED_SPOOFED);
        }
        // Link plumbing, and errors about tracked flows (path MTU discovery).
        match packet.opening {
            Opening::Neighbour => return Outcome::new(Pass, counter::ALLOWED_NETWORK_CONTROL),
            Opening::IcmpError {
                quotes_tracked_flow: true,
            } => return Outcome::new(Pass, counter::ALLOWED_RELATED),
            _ => {}
        }
        // 4. A tracked flow of an older epoch: decided again for the direction that opened it,
        // on the port its opening packet went to.
        if let Conntrack::OlderEpoch { opened } = packet.conntrack {
            let decision = self.decide(
                endpoint,
                opened,
                packet.pod_address,
                packet.peer_address,
                packet.protocol,
                opening_port(packet, opened),
            );
            return if decision.is_allowed() {
                Outcome {
                    conntrack: ConntrackChange::Renewed,
                    ..Outcome::new(Pass, counter::ALLOWED_TRACKED)
                }
            } else {
                Outcome {
                    conntrack: ConntrackChange::Removed,
                    ..Outcome::new(Drop, counter::DENIED_REVOKED)
                }
            };
        }
        // 5. A new flow leaving the pod for a Service frontend: decided after translation.
        if packet.direction == Direction::Egress && self.is_frontend(packet) {
            return Outcome::new(Pass, counter::DEFERRED_TO_TRANSLATION);
        }
        // 6. A new flow: decided, and tracked when allowed and the packet may open it — towards
        // the pod only at an address the endpoint owns.
        let decision = self.decide(
            endpoint,
            packet.direction,
            packet.pod_address,
            packet.peer_address,
            packet.protocol,
            opening_port(packet, packet.direction),
        );
        if !decision.is_allowed() {
            return Outcome::new(Drop, decision.reason());
        }
        let tracked = packet.opening == Opening::Opens
            && (packet.direction == Direction::Egress || owns_pod_address);
        Outcome {
            rule: match decision {
                Decision::Allowed(rule) => Some(rule),
                _ => None,
            },
            conntrack: if tracked {
                ConntrackChange::Created
            } else {
                ConntrackChange::None
            },
            ..Outcome::new(Pass, decision.reason())
        }
    }

    /// Steps 0 and a. to j. of `verdict.rs`: the first packet of a flow between the endpoint
    /// at `pod_address` and `peer_address`, in `direction`, to destination `port`.
    #[must_use]
    pub fn decide(
        &self,
        endpoint: &Endpoint,
        direction: Direction,
        pod_address: IpAddr,
        peer_address: IpAddr,
        protocol: u8,
        port: u16,
    ) -> Decision {
        let peer_address = mapped(peer_address);
        // 0. Compared as the kernel compares them: as 16-byte addresses.
        if peer_address == mapped(pod_address) {
            return Decision::AllowedSelf;
        }
        let peer = self
            .ipcache
            .get(&peer_address)
            .copied()
            .unwrap_or(IDENTITY_WORLD);
        if direction == Direction::Ingress && peer == IDENTITY_HOST {
            return Decision::AllowedNode;
        }
        if endpoint.state != endpoint_state::READY {
            return Decision::NotReady;
        }
        let policy = match direction {
            Direction::Ingress => endpoint.ingress_policy,
            Direction::Egress => endpoint.egress_policy,
        };
        if policy == POLICY_NOT_ISOLATED {
            return Decision::AllowedNotIsolated;
        }
        let dir = match direction {
            Direction::Ingress => netwarden_common::direction::INGRESS,
            Direction::Egress => netwarden_common::direction::EGRESS,
        };
        // d. WORLD is never looked up: no entry names it.
        let by_identity = if peer == IDENTITY_WORLD {
            None
        } else {
            self.policy_entry(policy, peer, protocol, port)
        };
        if endpoint.flags & endpoint_flags::tiered(dir) == 0
            && let Some(entry) = by_identity
            && entry.below.action == rule_action::ALLOW
        {
            return Decision::Allowed(entry.below.rule);
        }
        // e. The CIDR class, from the trie of the peer's family.
        let by_class = self
            .cidr_class(policy, &peer_address)
            .and_then(|class| self.policy_entry(policy, class, protocol, port));
        let (identity, class) = (
            by_identity.unwrap_or_default(),
            by_class.unwrap_or_default(),
        );
        // f. The Admin tier.
        let admin = identity.admin.first(class.admin);
        match admin.action {
            rule_action::ACCEPT => return Decision::ClusterAccepted(admin.rule),
            rule_action::DENY => return Decision::ClusterDenied(admin.rule),
            _ => {}
        }
        // g. The tier below.
        let below = identity.below.first(class.below);
        match below.action {
            rule_action::ALLOW => return Decision::Allowed(below.rule),
            rule_action::ACCEPT => return Decision::ClusterAccepted(below.rule),
            rule_action::DENY => return Decision::ClusterDenied(below.rule),
            _ => {}
        }
        // h. No NetworkPolicy isolates the direction.
        if endpoint.flags & endpoint_flags::fallback_allow(dir) != 0 {
            return Decision::AllowedNotIsolated;
        }
        // i. Audit mode passes what the policy does not allow.
        if endpoint.flags & endpoint_flags::audit(dir) != 0 {
            return Decision::Audited;
        }
        Decision::Denied
    }

    /// The longest `POLICY` entry matching the full key, if any.
    fn policy_entry(
        &self,
        policy: PolicyId,
        peer: PeerId,
        protocol: u8,
        port: u16,
    ) -> Option<PolicyEntry> {
        let key = PolicyKey::new(policy, peer, protocol, port);
        self.policy
            .longest_match(POLICY_KEY_FULL_BITS, &policy_key_bytes(&key))
    }

    /// The CIDR class of `address` (16 bytes, IPv4-mapped for IPv4) in `policy`: the longest
    /// match in `CIDRS_V4` for an IPv4-mapped address, in `CIDRS_V6` for any other, as the
    /// kernel tells them apart.
    fn cidr_class(&self, policy: PolicyId, address: &[u8; 16]) -> Option<PeerId> {
        let policy = policy.to_be_bytes();
        match ipv4_of_mapped(address) {
            Some(v4) => self.cidrs_v4.longest_match(
                CIDR_KEY_V4_FULL_BITS,
                &cidr_v4_bytes(CidrKeyV4 { policy, addr: v4 }),
            ),
            None => self.cidrs_v6.longest_match(
                CIDR_KEY_FULL_BITS,
                &cidr_v6_bytes(&CidrKey {
                    policy,
                    addr: *address,
                }),
            ),
        }
    }

    /// Whether a packet leaving a pod goes to a Service frontend.
    fn is_frontend(&self, packet: &Packet) -> bool {
        // The frontend map is looked up only while a frontend is installed; an empty map
        // answers the same.
        !self.frontends.is_empty()
            && self.frontends.contains(&FrontendKey {
                addr: mapped(packet.peer_address),
                protocol: packet.protocol,
                padding: 0,
                port: packet.peer_port,
            })
    }
}

/// Decides the first packet of a flow between local endpoint `endpoint` and `peer`, in
/// `direction` from the endpoint's point of view, to destination `port` over `protocol`: the
/// kernel's `decide()` on the maps the agent writes for `state`, from the endpoint's address
/// of the peer's family. An endpoint the state does not have is [`Decision::NotReady`], the
/// reason the kernel counts a packet of an interface without an `ENDPOINTS` entry under.
#[must_use]
pub fn decide(
    state: &DatapathState,
    endpoint: &PodRef,
    direction: Direction,
    peer: IpAddr,
    protocol: u8,
    port: u16,
) -> Decision {
    let Some(local) = state.endpoints.get(endpoint) else {
        return Decision::NotReady;
    };
    let pod_address = local
        .ips
        .iter()
        .find(|own| own.is_ipv4() == peer.is_ipv4())
        .or(local.ips.first())
        .copied()
        .unwrap_or(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED));
    Maps::new(state, false).decide(
        &ready_endpoint(local),
        direction,
        pod_address,
        peer,
        protocol,
        port,
    )
}

/// The destination port of the packet that opened the flow in direction `opened`.
fn opening_port(packet: &Packet, opened: Direction) -> u16 {
    match opened {
        Direction::Egress => packet.peer_port,
        Direction::Ingress => packet.pod_port,
    }
}

/// An LPM trie as the kernel's answers: one value per prefix length and first that many bits
/// of the key (writing the same again replaces it), and a lookup of a full key finds the
/// value of the longest prefix it starts with.
#[derive(Clone, Debug)]
struct LpmTrie<const N: usize, V> {
    /// By prefix length and key, the bits past the prefix cleared.
    entries: BTreeMap<(u32, [u8; N]), V>,
    prefix_lens: BTreeSet<u32>,
}

impl<const N: usize, V> Default for LpmTrie<N, V> {
    fn default() -> Self {
        Self {
            entries: BTreeMap::new(),
            prefix_lens: BTreeSet::new(),
        }
    }
}

impl<const N: usize, V: Copy> LpmTrie<N, V> {
    fn insert(&mut self, prefix_len: u32, key: [u8; N], value: V) {
        self.entries
            .insert((prefix_len, masked(key, prefix_len)), value);
        self.prefix_lens.insert(prefix_len);
    }

    /// The value of the longest entry matching the first `key_bits` bits of `key`, as a
    /// lookup with that prefix length finds it.
    fn longest_match(&self, key_bits: u32, key: &[u8; N]) -> Option<V> {
        self.prefix_lens
            .range(..=key_bits)
            .rev()
            .find_map(|prefix_len| {
                self.entries
                    .get(&(*prefix_len, masked(*key, *prefix_len)))
                    .copied()
            })
    }
}

/// `key` with every bit past the first `prefix_len` cleared.
fn masked<const N: usize>(mut key: [u8; N], prefix_len: u32) -> [u8; N] {
    for (index, byte) in key.iter_mut().enumerate() {
        let first_bit = u32::try_from(index * 8).unwrap_or(u32::MAX);
        let kept = prefix_len.saturating_sub(first_bit).min(8);
        *byte &= if kept == 0 { 0 } else { u8::MAX << (8 - kept) };
    }
    key
}

// The LPM tries compare a key's bytes in memory order. These turn each key into those bytes;
// the size checks and the exhaustive patterns fail the build if a key's layout changes.
const POLICY_KEY_BYTES: usize = size_of::<PolicyKey>();
const CIDR_V4_KEY_BYTES: usize = size_of::<CidrKeyV4>();
const CIDR_V6_KEY_BYTES: usize = size_of::<CidrKey>();
const _: () = assert!(POLICY_KEY_BYTES == 4 + 4 + 1 + 2 + 1);
const _: () = assert!(CIDR_V4_KEY_BYTES == 4 + 4);
const _: () = assert!(CIDR_V6_KEY_BYTES == 4 + 16);

fn policy_key_bytes(key: &PolicyKey) -> [u8; POLICY_KEY_BYTES] {
    let PolicyKey {
        policy,
        peer,
        protocol,
        port,
        padding,
    } = key;
    let mut bytes = [0; POLICY_KEY_BYTES];
    bytes[..4].copy_from_slice(policy);
    bytes[4..8].copy_from_slice(peer);
    bytes[8] = *protocol;
    bytes[9..11].copy_from_slice(port);
    bytes[11] = *padding;
    bytes
}

fn cidr_v4_bytes(key: CidrKeyV4) -> [u8; CIDR_V4_KEY_BYTES] {
    let CidrKeyV4 { policy, addr } = key;
    let mut bytes = [0; CIDR_V4_KEY_BYTES];
    bytes[..4].copy_from_slice(&policy);
    bytes[4..].copy_from_slice(&addr);
    bytes
}

fn cidr_v6_bytes(key: &CidrKey) -> [u8; CIDR_V6_KEY_BYTES] {
    let CidrKey { policy, addr } = key;
    let mut bytes = [0; CIDR_V6_KEY_BYTES];
    bytes[..4].copy_from_slice(policy);
    bytes[4..].copy_from_slice(addr);
    bytes
}

#[cfg(test)]
mod tests {
    use std::{fmt::Write as _, net::IpAddr};

    use netwarden_common::counter::{self, Kind};
    use netwarden_model::{
        PodRef, PortRef, Protocol, Service, ServicePort, ServiceRef, ServiceType,
    };

    use super::{
        Conntrack, ConntrackChange, Decision, LpmTrie, Maps, Opening, Outcome, Packet, Verdict,
        masked,
    };
    use crate::{
        Change, Compiler, DatapathState, Direction,
        map_keys::{locked_endpoint, unknown_endpoint},
    };

    const NODE: &str = "node-1";
    const NODE_ADDRESS: &str = "172.18.0.2";
    const SERVER: u32 = 10;
    const CLIENT: u32 = 11;
    const TCP: u8 = 6;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("test address")
    }

    fn at(name: &str) -> PodRef {
        PodRef {
            namespace: "x".into(),
            name: name.into(),
        }
    }

    /// A server (10.0.0.1, `fd00::1`) and a client (10.0.0.2) on this node, a remote pod
    /// (10.0.0.9), and `policies` (NetworkPolicy specs in namespace `x`, by name).
    fn compile(policies: &[(&str, &str)]) -> Compiler {
        let mut yaml = String::new();
        for (name, labels, ips, node) in [
            (
                "server",
                "app: server",
                "[{ip: 10.0.0.1}, {ip: 'fd00::1'}]",
                NODE,
            ),
            ("client", "app: client", "[{ip: 10.0.0.2}]", NODE),
            ("remote", "app: client", "[{ip: 10.0.0.9}]", "node-2"),
        ] {
            write!(
                yaml,
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: x, labels: {{{labels}}}}}\nspec: {{nodeName: {node}, containers: [{{name: c}}]}}\nstatus: {{podIPs: {ips}}}\n"
            )
            .expect("writing to a String");
        }
        for (name, spec) in policies {
            write!(
                yaml,
                "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: x}}\nspec:\n{spec}\n"
            )
            .expect("writing to a String");
        }
        let (cluster, errors) = netwarden_model::cluster_of_stream("cluster.yaml", &yaml);
        assert!(errors.is_empty(), "fixture has errors: {errors:?}");
        let mut compiler = Compiler::new(NODE);
        compiler.set_node_addresses(&[ip(NODE_ADDRESS)]);
        compiler.sync(cluster);
        compiler
    }

    /// The maps with the server and the client placed on their interfaces.
    fn placed(state: &DatapathState, translation_hook: bool) -> Maps<'_> {
        let mut maps = Maps::new(state, translation_hook);
        maps.place_endpoint(SERVER, &at("server")).expect("server");
        maps.place_endpoint(CLIENT, &at("client")).expect("client");
        maps
    }

    /// A TCP SYN between the endpoint on `ifindex` at `pod` and `peer`, to `port` on the
    /// side it goes to.
    fn syn(ifindex: u32, direction: Direction, pod: &str, peer: &str, port: u16) -> Packet {
        let (pod_port, peer_port) = match direction {
            Direction::Egress => (40000, port),
            Direction::Ingress => (port, 40000),
        };
        Packet {
            ifindex,
            direction,
            pod_address: ip(pod),
            peer_address: ip(peer),
            protocol: TCP,
            pod_port,
            peer_port,
            opening: Opening::Opens,
            conntrack: Conntrack::Untracked,
        }
    }

    /// The outcome of `packet`, checked against the reason table: a passed packet is counted
    /// under an allow reason, a dropped one under a deny reason.
    fn verdict(maps: &Maps<'_>, packet: &Packet) -> Outcome {
        let outcome = maps.verdict(packet);
        let kind = counter::reason(outcome.reason)
            .expect("a reason of the table")
            .kind;
        let expected = match kind {
            Kind::Allow | Kind::Audit => Verdict::Pass,
            Kind::Deny => Verdict::Drop,
            Kind::EventAccounting => panic!("{outcome:?} counted as an event"),
        };
        assert_eq!(outcome.verdict, expected, "{outcome:?}");
        outcome
    }

    const DENY_ALL: &str = "  podSelector: {}\n  policyTypes: [Ingress, Egress]";

    #[test]
    fn a_tracked_flow_of_the_current_epoch_passes_before_any_other_check() {
        let compiler = compile(&[("deny", DENY_ALL)]);
        let maps = placed(compiler.state(), false);
        let mut packet = syn(99, Direction::Egress, "10.0.0.7", "192.0.2.1", 80);
        assert_eq!(
            verdict(&maps, &packet).reason,
            counter::DENIED_ENDPOINT_NOT_READY,
            "an interface without an ENDPOINTS entry"
        );
        packet.conntrack = Conntrack::CurrentEpoch;
        assert_eq!(verdict(&maps, &packet).reason, counter::ALLOWED_TRACKED);
    }

    #[test]
    fn a_packet_leaving_a_pod_from_an_address_it_does_not_own_is_spoofed() {
        let compiler = compile(&[]);
        let maps = placed(compiler.state(), false);
        let spoofed = syn(CLIENT, Direction::Egress, "10.0.0.1", "192.0.2.1", 80);
        assert_eq!(verdict(&maps, &spoofed).reason, counter::DENIED_SPOOFED);
        let own = syn(CLIENT, Direction::Egress, "10.0.0.2", "192.0.2.1", 80);
        let outcome = verdict(&maps, &own);
        assert_eq!(outcome.reason, counter::ALLOWED_NOT_ISOLATED);
        assert_eq!(outcome.conntrack, ConntrackChange::Created);
        // Towards the pod the destination is not checked, but only its own address is tracked.
        let broadcast = syn(CLIENT, Direction::Ingress, "10.0.0.255", "10.0.0.9", 80);
        let outcome = verdict(&maps, &broadcast);
        assert_eq!(outcome.reason, counter::ALLOWED_NOT_ISOLATED);
        assert_eq!(outcome.conntrack, ConntrackChange::None);
    }

    #[test]
    fn endpoints_not_ready_deny_all_but_the_node() {
        let compiler = compile(&[]);
        let mut maps = placed(compiler.state(), false);
        maps.set_endpoint(SERVER, locked_endpoint(), &[ip("10.0.0.1")]);
        maps.set_endpoint(12, unknown_endpoint(), &[ip("10.0.0.50")]);
        for (ifindex, own) in [(SERVER, "10.0.0.1"), (12, "10.0.0.50")] {
            let from_node = syn(ifindex, Direction::Ingress, own, NODE_ADDRESS, 8080);
            assert_eq!(verdict(&maps, &from_node).reason, counter::ALLOWED_NODE);
            for packet in [
                syn(ifindex, Direction::Ingress, own, "10.0.0.2", 8080),
                syn(ifindex, Direction::Egress, own, "10.0.0.2", 8080),
                syn(ifindex, Direction::Egress, own, NODE_ADDRESS, 10250),
            ] {
                assert_eq!(
                    verdict(&maps, &packet).reason,
                    counter::DENIED_ENDPOINT_NOT_READY,
                    "{packet:?}"
                );
            }
        }
    }

    #[test]
    fn a_stale_flow_is_decided_again_for_the_direction_and_port_that_opened_it() {
        let allow_web = "  podSelector: {matchLabels: {app: client}}\n  policyTypes: [Egress]\n  egress: [{ports: [{port: 80}]}]";
        let compiler = compile(&[("out", allow_web)]);
        let maps = placed(compiler.state(), false);
        // The server's answer to the client's connection to port 80: an ingress packet from
        // port 80 to the client's ephemeral port, decided as the egress flow it belongs to.
        let mut reply = syn(CLIENT, Direction::Ingress, "10.0.0.2", "10.0.0.1", 40000);
        reply.peer_port = 80;
        reply.opening = Opening::Continues;
        reply.conntrack = Conntrack::OlderEpoch {
            opened: Direction::Egress,
        };
        let outcome = verdict(&maps, &reply);
        assert_eq!(
            (outcome.reason, outcome.conntrack),
            (counter::ALLOWED_TRACKED, ConntrackChange::Renewed)
        );
        // As a new flow the same packet is the server opening a connection to port 40000,
        // which ingress (not isolated) allows: the decision above was not this one.
        reply.conntrack = Conntrack::Untracked;
        assert_eq!(verdict(&maps, &reply).reason, counter::ALLOWED_NOT_ISOLATED);

        let compiler = compile(&[("deny", DENY_ALL)]);
        let maps = placed(compiler.state(), false);
        reply.conntrack = Conntrack::OlderEpoch {
            opened: Direction::Egress,
        };
        let outcome = verdict(&maps, &reply);
        assert_eq!(
            (outcome.reason, outcome.conntrack),
            (counter::DENIED_REVOKED, ConntrackChange::Removed)
        );
    }

    #[test]
    fn ipv4_peers_are_looked_up_in_the_ipv4_trie_and_ipv6_blocks_never_hold_them() {
        let blocks = "  podSelector: {matchLabels: {app: server}}\n  ingress:\n  - from: [{ipBlock: {cidr: '::/0'}}]\n  - from: [{ipBlock: {cidr: 192.0.2.0/24}}]\n    ports: [{port: 443}]";
        let compiler = compile(&[("in", blocks)]);
        let maps = placed(compiler.state(), false);
        let v4 = syn(SERVER, Direction::Ingress, "10.0.0.1", "198.51.100.1", 8080);
        assert_eq!(verdict(&maps, &v4).reason, counter::DENIED_BY_POLICY);
        let v6 = syn(SERVER, Direction::Ingress, "fd00::1", "2001:db8::1", 8080);
        assert_eq!(verdict(&maps, &v6).reason, counter::ALLOWED_BY_POLICY);
        let in_block = syn(SERVER, Direction::Ingress, "10.0.0.1", "192.0.2.7", 443);
        assert_eq!(verdict(&maps, &in_block).reason, counter::ALLOWED_BY_POLICY);
        // The kernel tells the families apart by the 16-byte form: an IPv4-mapped IPv6 peer
        // is looked up in CIDRS_V4, like the IPv4 address it maps.
        let mapped = syn(
            SERVER,
            Direction::Ingress,
            "fd00::1",
            "::ffff:192.0.2.7",
            443,
        );
        assert_eq!(verdict(&maps, &mapped).reason, counter::ALLOWED_BY_POLICY);
    }

    #[test]
    fn the_longest_policy_entry_names_the_rule_as_the_trie_does() {
        // Ports 80-81 are one /15 entry, port 80 a /16 one: whichever rule id is lower, the
        // longer match is the rule reported.
        let rules = "  podSelector: {matchLabels: {app: server}}\n  ingress:\n  - ports: [{port: 80, endPort: 81}]\n  - ports: [{port: 80}]";
        let compiler = compile(&[("in", rules)]);
        let state = compiler.state();
        let maps = placed(state, false);
        let rule_index = |port| {
            let outcome = verdict(
                &maps,
                &syn(SERVER, Direction::Ingress, "10.0.0.1", "10.0.0.9", port),
            );
            state.rules[&outcome.rule.expect("allowed by a rule")].index
        };
        assert_eq!(rule_index(80), 1);
        assert_eq!(rule_index(81), 0);
    }

    #[test]
    fn new_flows_to_a_service_frontend_are_deferred_only_while_the_hook_is_attached() {
        let mut compiler = compile(&[("deny", DENY_ALL)]);
        let service = Service {
            id: ServiceRef {
                namespace: "x".into(),
                name: "web".into(),
            },
            service_type: ServiceType::ClusterIp,
            cluster_ips: vec![ip("10.96.0.10")],
            external_ips: Vec::new(),
            load_balancer_ips: Vec::new(),
            ports: vec![ServicePort {
                name: Some("http".into()),
                protocol: Protocol::Tcp,
                port: 80,
                target_port: PortRef::Number(8080),
                node_port: None,
            }],
            selector: [("app".to_owned(), "server".to_owned())].into(),
        };
        let state = compiler.update([Change::Service(service.id.clone(), Some(service))]);
        let to_service = syn(CLIENT, Direction::Egress, "10.0.0.2", "10.96.0.10", 80);
        let other_port = syn(CLIENT, Direction::Egress, "10.0.0.2", "10.96.0.10", 81);
        let with_hook = placed(state, true);
        assert_eq!(
            verdict(&with_hook, &to_service).reason,
            counter::DEFERRED_TO_TRANSLATION
        );
        assert_eq!(
            verdict(&with_hook, &other_port).reason,
            counter::DENIED_BY_POLICY
        );
        let without_hook = placed(state, false);
        assert_eq!(
            verdict(&without_hook, &to_service).reason,
            counter::DENIED_BY_POLICY
        );
    }

    #[test]
    fn the_trie_model_answers_as_an_lpm_trie() {
        let mut trie = LpmTrie::<2, u32>::default();
        trie.insert(4, [0xa0, 0x00], 1);
        trie.insert(12, [0xab, 0xc0], 2);
        // The same prefix again, bits past it aside: the same entry, replaced.
        trie.insert(4, [0xaf, 0xff], 3);
        assert_eq!(trie.longest_match(16, &[0xab, 0xcd]), Some(2));
        assert_eq!(trie.longest_match(16, &[0xab, 0xdd]), Some(3));
        assert_eq!(
            trie.longest_match(8, &[0xab, 0xcd]),
            Some(3),
            "a shorter lookup"
        );
        assert_eq!(trie.longest_match(16, &[0xb0, 0x00]), None);
        assert_eq!(masked([0xff, 0xff], 9), [0xff, 0x80]);
        assert_eq!(masked([0xff, 0xff], 0), [0, 0]);
    }

    #[test]
    fn a_pod_judged_on_its_own_address_is_itself() {
        let compiler = compile(&[("deny", DENY_ALL)]);
        let maps = placed(compiler.state(), false);
        let hairpin = syn(SERVER, Direction::Egress, "10.0.0.1", "10.0.0.1", 8080);
        assert_eq!(verdict(&maps, &hairpin).reason, counter::ALLOWED_SELF);
        assert_eq!(
            super::decide(
                compiler.state(),
                &at("server"),
                Direction::Ingress,
                ip("10.0.0.1"),
                TCP,
                80
            ),
            Decision::AllowedSelf
        );
        assert_eq!(
            super::decide(
                compiler.state(),
                &at("nobody"),
                Direction::Ingress,
                ip("10.0.0.2"),
                TCP,
                80
            ),
            Decision::NotReady
        );
    }
}
