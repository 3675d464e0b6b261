//! The types shared by netwarden's eBPF programs and its userspace agent.
//!
//! Every type here is `#[repr(C)]` with explicit padding, so the kernel, the eBPF objects and
//! userspace agree on the layout byte for byte. Multi-byte fields that take part in LPM prefix
//! matching are stored as big-endian byte arrays: an LPM trie compares keys bit by bit from the
//! first byte, so the most significant bits must come first.
//!
//! Addresses in hash keys (`IpKey`, `FlowKey`, `EndpointAddress`, ...) are 16 bytes, IPv4
//! stored IPv4-mapped (`::ffff:a.b.c.d`), so one table serves both families. The two tables
//! every packet of a flow may hit keep IPv4 apart, for shorter keys: conntrack (`FlowKeyV4`
//! in `CONNTRACK_V4`, `FlowKey` in `CONNTRACK_V6`) and the `ipBlock` tries (`CidrKeyV4` with
//! a 4-byte address in `CIDRS_V4`, `CidrKey` with a 16-byte one in `CIDRS_V6`).
//!
//! [`maps`] names every map the programs and the agent share, with its capacity.
#![no_std]

/// Numeric identity of a peer: a pod label set, the node, the world, or a CIDR class.
pub type PeerId = u32;

/// The node's own addresses. Ingress from the node is always allowed (kubelet probes).
pub const IDENTITY_HOST: PeerId = 1;
/// Any address the agent knows nothing about: not a pod, not the node.
pub const IDENTITY_WORLD: PeerId = 2;
/// The first identity the compiler hands out to a pod label set.
pub const FIRST_POD_IDENTITY: PeerId = 256;
/// Peer ids with this bit set name a CIDR class of one policy, found through [`CidrKey`]; they
/// never collide with label-set identities.
pub const CIDR_CLASS_FLAG: PeerId = 1 << 31;

/// The prefix length of an IPv4 address's IPv4-mapped form (`::ffff:0:0/96`): an IPv4 `/n`
/// is an IPv6 `/(96 + n)` in the agent's reference evaluator.
pub const IPV4_MAPPED_PREFIX_BITS: u32 = bits(IPV4_MAPPED_PREFIX.len());

/// `bytes` bytes as LPM prefix bits.
#[expect(
    clippy::cast_possible_truncation,
    reason = "keys are a few dozen bytes; the results are checked in the tests"
)]
const fn bits(bytes: usize) -> u32 {
    (bytes * 8) as u32
}

/// A policy id of zero means the endpoint is not isolated in that direction.
pub const POLICY_NOT_ISOLATED: u32 = 0;

/// Where a pod endpoint stands in its lifecycle; anything but `READY` denies all but node traffic.
pub mod endpoint_state {
    /// A pod veth the agent has found before it knows the pod (fail closed until it does).
    pub const UNKNOWN: u32 = 0;
    /// The endpoint's policy is computed and installed.
    pub const READY: u32 = 1;
    /// The endpoint's policy did not fit in the maps: locked down until it does.
    pub const LOCKED: u32 = 2;
}

/// Direction of a flow from the pod's point of view.
pub mod direction {
    /// Traffic towards the pod (checked on the host-side veth's TC egress).
    pub const INGRESS: u32 = 0;
    /// Traffic leaving the pod (checked on the host-side veth's TC ingress).
    pub const EGRESS: u32 = 1;
}

/// The bits of [`Endpoint::flags`], one per [`direction`] each.
///
/// Every flag reads "as before ClusterNetworkPolicy" when clear, so a pinned endpoint of an
/// older build (whose word was zero) keeps its meaning.
pub mod endpoint_flags {
    /// A new flow the direction's policy does not decide passes and is reported as audited
    /// ([`counter::AUDITED_BY_POLICY`](super::counter::AUDITED_BY_POLICY)) instead of
    /// dropped: only policies annotated `netwarden.dev/enforcement: audit` isolate the
    /// direction, or the agent runs with `--audit`.
    #[must_use]
    pub const fn audit(dir: u32) -> u32 {
        1 << dir
    }

    /// No NetworkPolicy isolates the direction, but a ClusterNetworkPolicy selects the pod, so
    /// it has a policy id: what no rule decides is allowed
    /// ([`counter::ALLOWED_NOT_ISOLATED`](super::counter::ALLOWED_NOT_ISOLATED)), not denied.
    #[must_use]
    pub const fn fallback_allow(dir: u32) -> u32 {
        1 << (2 + dir)
    }

    /// A ClusterNetworkPolicy selects the pod in this direction: a new flow needs both policy
    /// lookups (the identity's and the CIDR class's), because the rule that matches first may
    /// sit in either. Clear, an identity entry that allows ends the decision at once.
    #[must_use]
    pub const fn tiered(dir: u32) -> u32 {
        1 << (4 + dir)
    }
}

/// A local endpoint, keyed by the ifindex of its host-side veth.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Endpoint {
    /// Policy id checked for traffic towards the pod, or [`POLICY_NOT_ISOLATED`].
    pub ingress_policy: u32,
    /// Policy id checked for traffic leaving the pod, or [`POLICY_NOT_ISOLATED`].
    pub egress_policy: u32,
    /// One of [`endpoint_state`]. A `u32`, not an enum, so the type has no invalid bit patterns.
    pub state: u32,
    /// [`endpoint_flags`], per direction: audit mode, the fallback of a direction no
    /// NetworkPolicy isolates, whether a ClusterNetworkPolicy selects the pod. (This was a zero
    /// reserved word, then the audit bits alone: each flag's clear state is the older meaning.)
    pub flags: u32,
}

/// Key of the map of addresses each endpoint owns: a packet leaving a pod from any other
/// source address is spoofed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointAddress {
    /// The endpoint's host-side veth.
    pub ifindex: u32,
    /// One of its addresses, IPv4-mapped for IPv4.
    pub addr: [u8; 16],
}

/// Key of the IP-to-identity map: a 16-byte address (IPv4-mapped for IPv4).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpKey {
    /// The address, network byte order.
    pub addr: [u8; 16],
}

/// Value of the IP-to-identity map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpIdentity {
    /// The address's identity: its pod's label set, or [`IDENTITY_HOST`] for the node's.
    pub identity: PeerId,
}

/// Prefix length of a [`PolicyKey`] that names a policy, a peer, a protocol and a port: the
/// programs look up every packet with it.
pub const POLICY_KEY_FULL_BITS: u32 = bits(core::mem::offset_of!(PolicyKey, padding));
/// Prefix length of a [`PolicyKey`] that stops after the peer: every protocol and port.
pub const POLICY_KEY_ANY_PROTOCOL_BITS: u32 = bits(core::mem::offset_of!(PolicyKey, protocol));
/// Prefix length of a [`PolicyKey`] that stops after the protocol: every port of it. A port
/// range adds the bits its ports share.
pub const POLICY_KEY_ANY_PORT_BITS: u32 = bits(core::mem::offset_of!(PolicyKey, port));

/// LPM data of the `POLICY` trie: what a policy allows, `(policy, peer, protocol, port)`, all
/// big-endian so that the trie compares the most significant bits first.
///
/// ```text
///  bits 0      32     64        72        88     96
///       | policy | peer | protocol | port    | pad |
/// ```
///
/// The lookup is always at [`POLICY_KEY_FULL_BITS`]; an entry may wildcard the tail:
///
/// 1. stop after the peer ([`POLICY_KEY_ANY_PROTOCOL_BITS`]): every protocol and port;
/// 2. stop after the protocol ([`POLICY_KEY_ANY_PORT_BITS`]): every port of that protocol;
/// 3. stop inside the port: a power-of-two aligned port range (how `endPort` is stored);
/// 4. cover the port: that port alone.
///
/// The policy id and the peer are never wildcarded: a peer is one label-set identity or one
/// CIDR class (found in `CIDRS_V4`/`CIDRS_V6`, keyed by [`CidrKeyV4`]/[`CidrKey`]), and each
/// is looked up on its own. Any match allows and its entry's rule is the one reported: the
/// trie returns the longest, and NetworkPolicy has no deny rules, so no other precedence is
/// needed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    /// Policy id, big-endian.
    pub policy: [u8; 4],
    /// Peer identity or CIDR class, big-endian.
    pub peer: [u8; 4],
    /// IP protocol number (6 TCP, 17 UDP, 132 SCTP, ...).
    pub protocol: u8,
    /// Destination port of the flow's first packet, big-endian.
    pub port: [u8; 2],
    /// Never covered by a prefix; zero.
    pub padding: u8,
}

impl PolicyKey {
    /// The key for one policy, peer, protocol and port.
    #[must_use]
    pub const fn new(policy: u32, peer: PeerId, protocol: u8, port: u16) -> Self {
        Self {
            policy: policy.to_be_bytes(),
            peer: peer.to_be_bytes(),
            protocol,
            port: port.to_be_bytes(),
            padding: 0,
        }
    }
}

/// What a rule that matches does, in a [`TierMatch`].
pub mod rule_action {
    /// No rule of this tier matches.
    pub const NONE: u8 = 0;
    /// A NetworkPolicy rule allows it.
    pub const ALLOW: u8 = 1;
    /// A ClusterNetworkPolicy `Accept`: allowed, no later rule of any tier is consulted.
    pub const ACCEPT: u8 = 2;
    /// A ClusterNetworkPolicy `Deny`: dropped, no later rule of any tier is consulted.
    pub const DENY: u8 = 3;
    /// A ClusterNetworkPolicy `Pass` (or a Baseline `Accept` that an audited NetworkPolicy
    /// tier cannot let decide): the rest of the tier is skipped, the next one decides.
    pub const PASS: u8 = 4;
}

/// The first rule of one tier that matches a peer, protocol and port: the compiler resolved
/// the rules' order for this entry, so the datapath only compares two of these (one per
/// lookup) by rank.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TierMatch {
    /// The compiler's id of the rule (see the agent's rule table), 0 with [`rule_action::NONE`].
    pub rule: u32,
    /// Its place in the tier's evaluation order for this endpoint and direction, from 0: of
    /// two matches, the lower rank was matched first. Every NetworkPolicy rule has the same
    /// rank (NetworkPolicy is a union).
    pub rank: u16,
    /// One of [`rule_action`].
    pub action: u8,
    /// Zero.
    pub reserved: u8,
}

impl TierMatch {
    /// No rule of the tier matches.
    pub const NONE: Self = Self {
        rule: 0,
        rank: u16::MAX,
        action: rule_action::NONE,
        reserved: 0,
    };

    /// Of `self` and `other`, the one matched first (the lower rank; a match before none).
    #[inline]
    #[must_use]
    pub const fn first(self, other: Self) -> Self {
        if other.action != rule_action::NONE
            && (self.action == rule_action::NONE || other.rank < self.rank)
        {
            other
        } else {
            self
        }
    }
}

/// Value of the policy map: for one peer (identity or CIDR class), protocol and port block,
/// the first matching rule of the Admin tier, and of the tier below it (NetworkPolicy when one
/// isolates the direction, else Baseline).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyEntry {
    /// The first Admin ClusterNetworkPolicy rule that matches, or [`TierMatch::NONE`].
    pub admin: TierMatch,
    /// The NetworkPolicy rule that allows it, or the first Baseline rule that matches, or
    /// [`TierMatch::NONE`].
    pub below: TierMatch,
}

impl Default for PolicyEntry {
    fn default() -> Self {
        Self {
            admin: TierMatch::NONE,
            below: TierMatch::NONE,
        }
    }
}

/// Prefix length of a [`CidrKey`] or [`CidrKeyV4`] that covers the policy id only: an entry
/// for a CIDR of `/n` has a prefix of this plus `n`.
pub const CIDR_KEY_POLICY_BITS: u32 = bits(core::mem::offset_of!(CidrKey, addr));
/// Prefix length of a fully specified [`CidrKey`] (one IPv6 address): the `CIDRS_V6` lookup.
pub const CIDR_KEY_FULL_BITS: u32 = bits(size_of::<CidrKey>());
/// Prefix length of a fully specified [`CidrKeyV4`] (one IPv4 address): the `CIDRS_V4` lookup.
pub const CIDR_KEY_V4_FULL_BITS: u32 = bits(size_of::<CidrKeyV4>());

/// LPM data of `CIDRS_V6`, the per-policy trie of IPv6 `ipBlock` prefixes: `(policy, address)`,
/// big-endian.
///
/// ```text
///  bits 0      32                 160
///       | policy | address (16 B) |
/// ```
///
/// Looked up at [`CIDR_KEY_FULL_BITS`]; an entry covers the policy id and the prefix's bits
/// ([`CIDR_KEY_POLICY_BITS`] + `n` for a `/n`), never fewer than the policy id. The longest
/// match wins: its value is the CIDR class of that address in that policy, the exact set of
/// the policy's `ipBlock` rules whose `cidr` holds the address and whose `except` does not
/// (the compiler stores every `cidr` and `except` of the policy with the set its addresses
/// share, so the longest match is the whole answer: `netwarden-policy/src/cidr.rs`). The class
/// is then looked up in `POLICY` like a peer identity ([`PolicyKey`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CidrKey {
    /// Policy id, big-endian.
    pub policy: [u8; 4],
    /// The address, network byte order.
    pub addr: [u8; 16],
}

/// LPM data of `CIDRS_V4`, the per-policy trie of IPv4 `ipBlock` prefixes: [`CidrKey`] with a
/// 4-byte address, looked up at [`CIDR_KEY_V4_FULL_BITS`].
///
/// ```text
///  bits 0      32               64
///       | policy | address (4 B) |
/// ```
///
/// IPv4 peers have a trie of their own: a 64-bit key compares in one step at each node of the
/// walk, where the 160 bits of an IPv4-mapped [`CidrKey`] took three.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CidrKeyV4 {
    /// Policy id, big-endian.
    pub policy: [u8; 4],
    /// The address, network byte order.
    pub addr: [u8; 4],
}

/// Value of `CIDRS_V4` and `CIDRS_V6`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CidrClass {
    /// A peer id with [`CIDR_CLASS_FLAG`] set, looked up in the policy map like an identity.
    pub peer: PeerId,
}

/// A flow as the endpoint sees it: the pod's side first, whatever direction the packet goes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// The endpoint's host-side veth.
    pub ifindex: u32,
    /// IP protocol number.
    pub protocol: u8,
    /// Zero. Two fields, not `[u8; 3]`: a zeroed byte array becomes a byte-by-byte `memset`
    /// call in the BPF program, on its hottest path.
    pub padding_byte: u8,
    /// Zero.
    pub padding_half: u16,
    /// The pod's port (host order), or zero for protocols without ports.
    pub pod_port: u16,
    /// The peer's port (host order), or zero for protocols without ports.
    pub peer_port: u16,
    /// The pod's address, IPv4-mapped for IPv4.
    pub pod_addr: [u8; 16],
    /// The peer's address, IPv4-mapped for IPv4.
    pub peer_addr: [u8; 16],
}

/// The prefix of an IPv4-mapped IPv6 address, `::ffff:0:0/96`.
const IPV4_MAPPED_PREFIX: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];

impl FlowKey {
    /// The `protocol` flow on endpoint `ifindex` between the pod's address and port (`pod`)
    /// and its peer's (`peer`), addresses IPv4-mapped for IPv4, padding zeroed.
    #[must_use]
    pub const fn new(
        ifindex: u32,
        protocol: u8,
        pod: ([u8; 16], u16),
        peer: ([u8; 16], u16),
    ) -> Self {
        Self {
            ifindex,
            protocol,
            padding_byte: 0,
            padding_half: 0,
            pod_port: pod.1,
            peer_port: peer.1,
            pod_addr: pod.0,
            peer_addr: peer.0,
        }
    }

    /// The flow's key in `CONNTRACK_V4` when both addresses are IPv4 (IPv4-mapped), else
    /// `None`: the flow lives in `CONNTRACK_V6` under this key.
    #[must_use]
    #[expect(
        clippy::inline_always,
        reason = "runs on every packet in the eBPF programs, where a call costs more than the body"
    )]
    #[inline(always)]
    pub fn ipv4(&self) -> Option<FlowKeyV4> {
        let pod = ipv4_of_mapped(&self.pod_addr)?;
        let peer = ipv4_of_mapped(&self.peer_addr)?;
        Some(FlowKeyV4::new(
            self.ifindex,
            self.protocol,
            (pod, self.pod_port),
            (peer, self.peer_port),
        ))
    }
}

/// The IPv4 address of an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`), if it is one. Compared as words, not bytes: this runs
/// on every packet.
#[expect(
    clippy::inline_always,
    reason = "runs on every packet in the eBPF programs, where a call costs more than the body"
)]
#[inline(always)]
#[must_use]
pub fn ipv4_of_mapped(addr: &[u8; 16]) -> Option<[u8; 4]> {
    let prefix = u64::from_ne_bytes([
        addr[0], addr[1], addr[2], addr[3], addr[4], addr[5], addr[6], addr[7],
    ]);
    let middle = u32::from_ne_bytes([addr[8], addr[9], addr[10], addr[11]]);
    let mapped_prefix = u64::from_ne_bytes([0; 8]);
    let mapped_middle = u32::from_ne_bytes([
        IPV4_MAPPED_PREFIX[8],
        IPV4_MAPPED_PREFIX[9],
        IPV4_MAPPED_PREFIX[10],
        IPV4_MAPPED_PREFIX[11],
    ]);
    (prefix == mapped_prefix && middle == mapped_middle)
        .then(|| [addr[12], addr[13], addr[14], addr[15]])
}

/// An IPv4 flow as the endpoint sees it: [`FlowKey`] with 4-byte addresses, the key of
/// `CONNTRACK_V4`. Every packet of a tracked flow hashes and compares its key: 20 bytes
/// rather than 44 is a third of the fast path's cost.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKeyV4 {
    /// The endpoint's host-side veth.
    pub ifindex: u32,
    /// IP protocol number.
    pub protocol: u8,
    /// Zero.
    pub padding_byte: u8,
    /// Zero.
    pub padding_half: u16,
    /// The pod's port (host order), or zero for protocols without ports.
    pub pod_port: u16,
    /// The peer's port (host order), or zero for protocols without ports.
    pub peer_port: u16,
    /// The pod's address, network byte order.
    pub pod_addr: [u8; 4],
    /// The peer's address, network byte order.
    pub peer_addr: [u8; 4],
}

impl FlowKeyV4 {
    /// The `protocol` flow on endpoint `ifindex` between the pod's address and port (`pod`)
    /// and its peer's (`peer`), padding zeroed.
    #[must_use]
    pub const fn new(
        ifindex: u32,
        protocol: u8,
        pod: ([u8; 4], u16),
        peer: ([u8; 4], u16),
    ) -> Self {
        Self {
            ifindex,
            protocol,
            padding_byte: 0,
            padding_half: 0,
            pod_port: pod.1,
            peer_port: peer.1,
            pod_addr: pod.0,
            peer_addr: peer.0,
        }
    }

    /// The same flow as a [`FlowKey`], with IPv4-mapped addresses.
    #[must_use]
    pub fn flow(&self) -> FlowKey {
        let mapped = |v4: [u8; 4]| {
            let mut addr = [0; 16];
            addr[..12].copy_from_slice(&IPV4_MAPPED_PREFIX);
            addr[12..].copy_from_slice(&v4);
            addr
        };
        FlowKey::new(
            self.ifindex,
            self.protocol,
            (mapped(self.pod_addr), self.pod_port),
            (mapped(self.peer_addr), self.peer_port),
        )
    }
}

/// Value of the connection-tracking map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowState {
    /// The [`direction`] of the packet that opened the flow.
    pub origin: u32,
    /// The policy epoch under which the flow was last found allowed; a flow from an older epoch
    /// is checked again against the current policy before its packet passes.
    pub epoch: u32,
    /// [`flow_flags`]: what the mTLS screen still expects of the flow, or why it was cut.
    /// Written by the screen and by the agent's identity check, never by the sweeper.
    pub flags: u32,
    /// [`flow_activity`]: what the datapath has seen of the flow. Bits are only ever set, by
    /// the datapath, and only when one is missing. A word of its own, so the datapath's
    /// activity stores never race with the screen's.
    pub activity: u32,
    /// When a packet of the flow last passed: [`clock_ticks`] of the kernel's jiffies, stored
    /// only when the tick changes. The agent's sweeper reads it and never writes the entry.
    pub last_seen: u32,
    /// For a flow the mTLS screen watches: the client's ISN + 1, where its stream (and its
    /// ClientHello) starts (valid once [`flow_flags::ISN_KNOWN`] is set). Zero otherwise.
    pub client_seq: u32,
    /// For a flow the mTLS screen watches: the sequence number after the ClientHello's
    /// segment, which the pod's ACK must cover before the screen lets go. Zero otherwise.
    pub hello_end: u32,
}

/// Jiffies per tick of [`FlowState::last_seen`], as a shift: 64 jiffies, 64 ms at `HZ=1000`,
/// 256 ms at `HZ=250`. The tick wraps after 2^32 of them (8.7 years at `HZ=1000`).
pub const CLOCK_TICK_SHIFT: u32 = 6;

/// The tick of [`FlowState::last_seen`] at `jiffies`. Jiffies, not nanoseconds: the verifier
/// turns `bpf_jiffies64` into one load, where a clock helper is a call costing a quarter of
/// the whole conntrack fast path.
#[must_use]
#[expect(
    clippy::inline_always,
    reason = "runs on every packet in the eBPF programs, where a call costs more than the body"
)]
#[inline(always)]
#[expect(
    clippy::cast_possible_truncation,
    reason = "ticks wrap; ages are computed with wrapping arithmetic"
)]
pub const fn clock_ticks(jiffies: u64) -> u32 {
    (jiffies >> CLOCK_TICK_SHIFT) as u32
}

/// Bits of [`FlowState::activity`].
pub mod flow_activity {
    /// A packet went the other way from the one that opened the flow.
    pub const REPLIED: u32 = 2;
    /// A TCP FIN or RST went through: the connection is closing.
    pub const CLOSING: u32 = 4;
    /// The flow's peer is not the pod that decides it: the flow was translated by the node's
    /// netfilter (a Service's address, or a masqueraded source), and `TRANSLATIONS` holds the
    /// peer it was judged on. Set once, by the hook after translation, when it creates the flow.
    pub const TRANSLATED: u32 = 8;
}

/// Bits of [`FlowState::flags`]. A flow with none set is an ordinary tracked flow.
pub mod flow_flags {
    /// A TCP flow to an mTLS-strict pod whose client has not sent payload yet: its first
    /// payload must be a TLS handshake record carrying a ClientHello.
    pub const AWAITING_CLIENT_HELLO: u32 = 1 << 0;
    /// Cut: the client's first payload was not a ClientHello. Every later packet drops.
    pub const CUT_PLAINTEXT: u32 = 1 << 1;
    /// Cut: the identity check refused the connection (the agent sets this). Every later
    /// packet drops.
    pub const CUT_BY_IDENTITY: u32 = 1 << 2;
    /// Either cut.
    pub const CUT: u32 = CUT_PLAINTEXT | CUT_BY_IDENTITY;
    /// The ClientHello passed at the client's ISN + 1; the pod has not acknowledged it yet,
    /// so the stream's first bytes are still screened (a segment the pod's stack discarded,
    /// for a bad checksum, must not leave the flow open for plaintext in its place).
    pub const AWAITING_HELLO_ACK: u32 = 1 << 3;
    /// The screen saw the client's SYN: [`FlowState::client_seq`](super::FlowState) holds
    /// its ISN + 1.
    pub const ISN_KNOWN: u32 = 1 << 4;
}

/// Value of the map of mTLS-strict endpoints (keyed by ifindex): present means strict.
pub const MTLS_STRICT: u32 = 1;

/// Key of the map of ports on which an mTLS-strict endpoint accepts plaintext
/// (`netwarden.dev/mtls-exempt-ports`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MtlsExemptPort {
    /// The endpoint's host-side veth.
    pub ifindex: u32,
    /// The pod's port (host order).
    pub port: u16,
    /// Zero.
    pub padding: u16,
}

/// Key of the map of Service frontends: an address, protocol and port that the node's
/// netfilter (kube-proxy) may translate to a backend. A flow a pod opens to a frontend is not
/// decided where it leaves the pod but after translation, on the backend it reaches.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendKey {
    /// The frontend's address, IPv4-mapped for IPv4.
    pub addr: [u8; 16],
    /// IP protocol number.
    pub protocol: u8,
    /// Zero.
    pub padding: u8,
    /// The frontend's port (host order).
    pub port: u16,
}

/// Value of the map of Service frontends.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrontendValue {
    /// The compiler's id of the frontend (names the Service and port in verdict logs).
    pub id: u32,
}

/// Key of the map of first fragments that passed: a later fragment carries no ports, so it
/// follows the first fragment of its datagram, found by the flow's endpoint, direction,
/// addresses, protocol and the datagram's identification.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragmentKey {
    /// The endpoint's host-side veth.
    pub ifindex: u32,
    /// IP protocol number.
    pub protocol: u8,
    /// The [`direction`] of the datagram, from the pod's point of view.
    pub direction: u8,
    /// Zero.
    pub padding: u16,
    /// IPv4's 16-bit identification, or IPv6's fragment header's 32-bit one.
    pub id: u32,
    /// The pod's address, IPv4-mapped for IPv4.
    pub pod_addr: [u8; 16],
    /// The peer's address, IPv4-mapped for IPv4.
    pub peer_addr: [u8; 16],
}

/// Value of the map of first fragments that passed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragmentState {
    /// Until when (`bpf_ktime_get_ns`) later fragments of the datagram pass.
    pub until_ns: u64,
}

/// How long after its first fragment passed the later fragments of a datagram pass: the
/// fragments of one datagram are sent back to back, and the kernel's own reassembly gives up
/// after 30 s (`ipfrag_time`) on a datagram that lost one.
pub const FRAGMENT_LIFETIME_NS: u64 = 2_000_000_000;

/// What a translated flow was judged on: for a flow a pod opened to a Service, the backend it
/// was translated to; for a flow that reached a pod with a masqueraded source, the original
/// client. Keyed by the flow's [`FlowKey`] as the endpoint sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Translation {
    /// The peer's real address, IPv4-mapped for IPv4.
    pub peer_addr: [u8; 16],
    /// The peer's real port (host order).
    pub peer_port: u16,
    /// Zero.
    pub padding: u16,
    /// The Service frontend the flow was opened to (0: none, a masqueraded source only).
    pub frontend: u32,
}

/// Where the fields the hook after translation reads lie in this kernel's structures, in
/// bytes, from the kernel's BTF: the programs are compiled once for every kernel, and these
/// structures are not ABI. Written by the agent before it attaches the hook; an all-zero
/// layout (`valid == 0`) means the hook must not trust anything it reads. The layout of
/// `struct nf_conntrack_tuple` itself has not changed since it was introduced; the agent
/// checks it against [`conntrack_tuple`] and attaches nothing when it differs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelLayout {
    /// Non-zero once the agent wrote the offsets.
    pub valid: u32,
    /// `struct sk_buff`: `_nfct` (the conntrack entry, with its ctinfo in the low 3 bits).
    pub skb_nfct: u32,
    /// `struct sk_buff`: `head`.
    pub skb_head: u32,
    /// `struct sk_buff`: `network_header`.
    pub skb_network_header: u32,
    /// `struct nf_conn`: `status`.
    pub conn_status: u32,
    /// `struct nf_conn`: `tuplehash[IP_CT_DIR_ORIGINAL].tuple`.
    pub conn_original_tuple: u32,
    /// `struct nf_conn`: `tuplehash[IP_CT_DIR_REPLY].tuple`.
    pub conn_reply_tuple: u32,
    /// Zero.
    pub padding: u32,
}

/// The layout of the kernel's `struct nf_conntrack_tuple` the hook after translation reads.
pub mod conntrack_tuple {
    /// `src.u3`: the source address (the first 4 bytes for IPv4).
    pub const SRC_ADDR: usize = 0;
    /// `src.u.all`: the source port, network order.
    pub const SRC_PORT: usize = 16;
    /// `src.l3num`: the address family (`AF_INET`, `AF_INET6`).
    pub const FAMILY: usize = 18;
    /// `dst.u3`: the destination address.
    pub const DST_ADDR: usize = 20;
    /// `dst.u.all`: the destination port, network order.
    pub const DST_PORT: usize = 36;
    /// `dst.protonum`: the IP protocol.
    pub const PROTOCOL: usize = 38;
    /// The size of the structure.
    pub const SIZE: usize = 40;
}

/// A verdict the datapath reports to the agent through the `EVENTS` ring buffer: every deny,
/// and new allowed flows as sampled by [`SETTING_ALLOW_EVENT_PERIOD`], within a per-CPU rate
/// limit (the loss is counted, the datapath never waits).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VerdictEvent {
    /// The endpoint's host-side veth.
    pub ifindex: u32,
    /// The [`direction`] of the packet, from the pod's point of view.
    pub direction: u8,
    /// IP protocol number.
    pub protocol: u8,
    /// The [`counter`] that names the reason.
    pub reason: u8,
    /// Zero.
    pub padding: u8,
    /// The pod's port (host order).
    pub pod_port: u16,
    /// The peer's port (host order).
    pub peer_port: u16,
    /// The policy id in force for that direction (0: not isolated).
    pub policy: u32,
    /// The pod's address, IPv4-mapped for IPv4.
    pub pod_addr: [u8; 16],
    /// The peer's address, IPv4-mapped for IPv4.
    pub peer_addr: [u8; 16],
    /// For an allowed flow, the compiler's id of the rule that allowed it (0: none, the flow
    /// was allowed for another reason, such as an unisolated direction).
    pub rule: u32,
    /// For a flow decided after translation, the Service frontend it was opened to (0: none);
    /// `peer_addr` and `peer_port` are then the backend or the original client it was judged on.
    pub frontend: u32,
}

/// Events each CPU may report per second before it only counts them.
pub const EVENTS_PER_CPU_PER_SECOND: u32 = 1000;

/// Per-CPU state of the event rate limit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventBudget {
    /// Start of the current one-second window (`bpf_ktime_get_ns`).
    pub window_start_ns: u64,
    /// Events reported in the window.
    pub sent: u32,
    /// Zero.
    pub padding: u32,
}

/// Reasons counted by the per-CPU verdict counters: the one table every view reads (the
/// datapath counts under these numbers; the agent's metrics, status file and verdict log name
/// them from [`counter::TABLE`]). The counter array holds one block of [`counter::COUNT`]
/// reasons per [`direction`]: see [`counter::slot`].
///
/// A reason is never renumbered or removed (the counters are pinned and survive upgrades):
/// a retired one stays in the table, described as retired.
pub mod counter {
    use super::same;

    /// What a counter counts.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Kind {
        /// Packets that passed.
        Allow,
        /// Packets that were dropped.
        Deny,
        /// Packets that passed although a policy in audit mode would have dropped them.
        Audit,
        /// Verdict events the datapath could not report (not packets).
        EventAccounting,
    }

    impl Kind {
        /// `allow`, `deny`, `audit` or `event_accounting`, as metrics and logs name it.
        #[must_use]
        pub const fn label(self) -> &'static str {
            match self {
                Self::Allow => "allow",
                Self::Deny => "deny",
                Self::Audit => "audit",
                Self::EventAccounting => "event_accounting",
            }
        }
    }

    /// One counter of [`TABLE`].
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Reason {
        /// Its number: its index in [`TABLE`] and in each direction's block of counters.
        pub id: u32,
        /// In snake case: the `reason` label of the metrics, the key in the status file, the
        /// `reason_code` of the verdict log.
        pub label: &'static str,
        /// Whether it counts passed packets, dropped ones, or unreported events.
        pub kind: Kind,
        /// One line for operators.
        pub description: &'static str,
    }

    /// Declares each reason's constant and its row of [`TABLE`] from one line, so a reason
    /// cannot have a number without a row.
    macro_rules! reasons {
        ($($(#[$doc:meta])* $name:ident = $id:literal, $kind:ident, $label:literal, $description:literal;)*) => {
            $(
                $(#[$doc])*
                pub const $name: u32 = $id;
            )*
            /// Every reason, in the order of its number.
            pub const TABLE: [Reason; [$($id),*].len()] = [$(Reason {
                id: $name,
                label: $label,
                kind: Kind::$kind,
                description: $description,
            }),*];
        };
    }

    reasons! {
        /// Passed: a tracked flow of the current epoch.
        ALLOWED_TRACKED = 0, Allow, "allowed_tracked",
            "a packet of a tracked flow the current policy still allows";
        /// Passed: the direction is not isolated.
        ALLOWED_NOT_ISOLATED = 1, Allow, "allowed_not_isolated",
            "a new flow in a direction no NetworkPolicy isolates";
        /// Passed: a policy rule allows it.
        ALLOWED_BY_POLICY = 2, Allow, "allowed_by_policy",
            "a new flow a NetworkPolicy rule allows";
        /// Passed: traffic from the node.
        ALLOWED_NODE = 3, Allow, "allowed_node",
            "a new flow from the node (kubelet probes)";
        /// Passed: ARP, neighbour discovery, multicast listener messages.
        ALLOWED_NETWORK_CONTROL = 4, Allow, "allowed_network_control",
            "ARP, neighbour discovery or multicast listener messages";
        /// Dropped: isolated and no rule allows it.
        DENIED_BY_POLICY = 5, Deny, "denied_by_policy",
            "isolated by a NetworkPolicy and no rule allows it";
        /// Dropped: the endpoint is not known or not ready.
        DENIED_ENDPOINT_NOT_READY = 6, Deny, "denied_endpoint_not_ready",
            "the pod is not known yet, or its policy did not fit the maps";
        /// Dropped: a tracked flow that the current policy no longer allows.
        DENIED_REVOKED = 7, Deny, "denied_revoked",
            "a tracked flow the current policy no longer allows";
        /// Dropped: the packet could not be parsed.
        DENIED_MALFORMED = 8, Deny, "denied_malformed",
            "a packet that could not be parsed";
        /// Dropped: a packet left a pod from an address the pod does not own.
        DENIED_SPOOFED = 9, Deny, "denied_spoofed",
            "a packet left a pod from an address the pod does not own";
        /// Passed: an ICMP error about a packet of a tracked flow (keeps PMTU discovery working).
        ALLOWED_RELATED = 10, Allow, "allowed_related",
            "an ICMP error about a tracked flow (path MTU discovery)";
        /// Events not reported: over the per-CPU rate limit.
        EVENTS_RATE_LIMITED = 11, EventAccounting, "events_rate_limited",
            "verdict events not reported: over the per-CPU rate limit";
        /// Events not reported: the ring buffer was full (the agent is behind).
        EVENTS_LOST = 12, EventAccounting, "events_lost",
            "verdict events not reported: the ring buffer was full (the agent fell behind)";
        /// Dropped: the first payload of a TCP flow to an mTLS-strict pod was not a TLS
        /// ClientHello, and every later packet of that flow; also a payload to such a pod on a
        /// connection conntrack no longer knows (the screen cannot vouch for it).
        DENIED_PLAINTEXT_TO_STRICT = 13, Deny, "denied_plaintext_to_strict",
            "plaintext to an mTLS-strict pod: the flow did not open with a TLS ClientHello";
        /// Dropped: a packet of a flow the identity check refused.
        DENIED_BY_IDENTITY = 14, Deny, "denied_by_identity",
            "a packet of a flow the identity check refused";
        /// Passed on, undecided: a flow a pod opens to a Service frontend is decided after the
        /// node's netfilter translated it, on the backend it reaches (the hook after
        /// translation counts that decision under its own reason).
        DEFERRED_TO_TRANSLATION = 15, Allow, "deferred_to_translation",
            "a new flow to a Service frontend, decided after translation on its backend";
        /// Dropped: the hook after translation could not read the kernel's conntrack entry or
        /// headers of a flow it must decide.
        DENIED_UNREADABLE_TRANSLATION = 16, Deny, "denied_unreadable_translation",
            "a flow to a Service whose translation could not be read";
        /// Passed: a pod reaching itself through a Service (hairpin). Through its own address
        /// it reaches itself over loopback, where no policy applies; its Service is no different.
        ALLOWED_SELF = 17, Allow, "allowed_self",
            "a pod reaching itself through a Service (hairpin)";
        /// Dropped: a frame of an ethertype other than IPv4, IPv6 and ARP, from or to a pod.
        DENIED_ETHERTYPE = 18, Deny, "denied_ethertype",
            "a frame of an ethertype other than IPv4, IPv6 and ARP";
        /// Dropped: a VLAN-tagged frame (802.1Q, 802.1ad, 0x9100), tagged in the frame or
        /// with the tag taken off by the kernel, from or to a pod.
        DENIED_VLAN = 19, Deny, "denied_vlan",
            "a VLAN-tagged frame (802.1Q, 802.1ad or QinQ) from or to a pod";
        /// Dropped: a later fragment (no ports) of a datagram whose first fragment did not pass
        /// here in the last [`FRAGMENT_LIFETIME_NS`](super::FRAGMENT_LIFETIME_NS).
        DENIED_FRAGMENT_UNKNOWN = 20, Deny, "denied_fragment_unknown",
            "a later fragment of a datagram whose first fragment did not pass";
        /// Passed: a later fragment of a datagram whose first fragment passed.
        ALLOWED_FRAGMENT = 21, Allow, "allowed_fragment",
            "a later fragment of a datagram whose first fragment passed";
        /// Passed and reported: isolated only by policies in audit mode (or under the agent's
        /// `--audit`), and no rule allows it: enforcing would drop it.
        AUDITED_BY_POLICY = 22, Audit, "audited_by_policy",
            "a new flow a policy in audit mode would drop: passed and reported";
        /// Passed: a ClusterNetworkPolicy `Accept` rule (Admin tier, or Baseline for a pod no
        /// NetworkPolicy isolates) matched first.
        ALLOWED_BY_CLUSTER_POLICY = 23, Allow, "allowed_by_cluster_policy",
            "a new flow a ClusterNetworkPolicy Accept rule matched first";
        /// Dropped: a ClusterNetworkPolicy `Deny` rule matched first.
        DENIED_BY_CLUSTER_POLICY = 24, Deny, "denied_by_cluster_policy",
            "a new flow a ClusterNetworkPolicy Deny rule matched first";
    }

    /// Number of reasons.
    #[expect(
        clippy::cast_possible_truncation,
        reason = "the table has a few dozen rows; checked below"
    )]
    pub const COUNT: u32 = TABLE.len() as u32;
    /// Number of counters: every reason, once per direction.
    pub const SLOTS: u32 = 2 * COUNT;

    // The table is complete and in order: row `i` is reason `i`, so every number below COUNT
    // has a row, [`reason`] is an index, and no two reasons share a number or a label.
    const _: () = {
        assert!(
            TABLE.len() < u8::MAX as usize,
            "VerdictEvent::reason is a u8"
        );
        let mut row = 0;
        while row < TABLE.len() {
            assert!(
                TABLE[row].id as usize == row,
                "counter::TABLE is out of order"
            );
            assert!(
                is_snake_case(TABLE[row].label),
                "a counter label is not snake_case"
            );
            let mut other = 0;
            while other < row {
                assert!(
                    !same(TABLE[row].label, TABLE[other].label),
                    "two counters share a label"
                );
                other += 1;
            }
            row += 1;
        }
    };

    const fn is_snake_case(label: &str) -> bool {
        let bytes = label.as_bytes();
        if bytes.is_empty() || !bytes[0].is_ascii_lowercase() {
            return false;
        }
        let mut at = 0;
        while at < bytes.len() {
            let byte = bytes[at];
            if !(byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'_') {
                return false;
            }
            at += 1;
        }
        true
    }

    /// The row of reason number `id`, if there is one.
    #[must_use]
    pub fn reason(id: u32) -> Option<&'static Reason> {
        TABLE.get(id as usize)
    }

    /// Index in the counter array of `reason` counted in `direction` (a
    /// [`direction`](super::direction) value, from the pod's point of view).
    #[must_use]
    pub const fn slot(direction: u32, reason: u32) -> u32 {
        direction * COUNT + reason
    }

    /// Whether a packet decided for `reason` passes: the reasons of [`Kind::Allow`] and
    /// [`Kind::Audit`]. A match the verifier can follow (the table holds strings); a test keeps
    /// it equal to the table, so a new reason cannot be counted as allowed and dropped.
    #[must_use]
    pub const fn passes(reason: u32) -> bool {
        matches!(
            reason,
            ALLOWED_TRACKED
                | ALLOWED_NOT_ISOLATED
                | ALLOWED_BY_POLICY
                | ALLOWED_NODE
                | ALLOWED_NETWORK_CONTROL
                | ALLOWED_RELATED
                | DEFERRED_TO_TRANSLATION
                | ALLOWED_SELF
                | ALLOWED_FRAGMENT
                | AUDITED_BY_POLICY
                | ALLOWED_BY_CLUSTER_POLICY
        )
    }
}

/// Index of the policy epoch in the one-element epoch array.
pub const EPOCH_INDEX: u32 = 0;

/// Index in the `SETTINGS` array of the allow-event period: 0 reports no allowed flow, 1 every
/// new one, N about one in N (sampled at random, so no flow pattern can hide from it).
pub const SETTING_ALLOW_EVENT_PERIOD: u32 = 0;
/// Index in the `SETTINGS` array of whether any Service frontend is installed (0 or 1): a new
/// flow leaving a pod looks its destination up in the frontend map only then, so a node
/// without Services pays nothing for them.
pub const SETTING_FRONTENDS_INSTALLED: u32 = 1;
/// Entries of the `SETTINGS` array.
pub const SETTINGS_COUNT: u32 = 2;

/// Every map the programs and the agent share: the name it has in the eBPF object and is
/// pinned under in bpffs (`#[map]` takes it from the static's name, and the programs check at
/// build time that it is this one), and its capacity (`max_entries`; the agent may load some
/// larger or smaller, see its `Capacity`).
///
/// A name is never changed: a restarted or upgraded agent adopts the maps pinned under these
/// names, and enforcement never stops.
///
/// Memory (docs/design.md, "Map memory"): the hash maps only the agent writes allocate an
/// element per entry (`BPF_F_NO_PREALLOC`), so they cost what they hold, not their capacity;
/// the LRU tables the programs fill are preallocated, so their capacity is their cost; LPM
/// tries always allocate per entry.
pub mod maps {
    use super::{SETTINGS_COUNT, counter, same};

    /// A shared map's name and capacity.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct PinnedMap {
        /// Its name in the eBPF object and its pin's file name.
        pub name: &'static str,
        /// Its `max_entries` as the object declares it (bytes, for a ring buffer).
        pub capacity: u32,
    }

    impl PinnedMap {
        /// Fails (at compile time, in a `const`) unless `name` is this map's name: the programs
        /// check their statics' names with it.
        pub const fn assert_named(self, name: &str) {
            assert!(
                same(self.name, name),
                "a map's static is not named as netwarden_common::maps names it"
            );
        }
    }

    const fn map(name: &'static str, capacity: u32) -> PinnedMap {
        PinnedMap { name, capacity }
    }

    /// Endpoints (host-side veth ifindex -> `Endpoint`).
    pub const ENDPOINTS: PinnedMap = map("ENDPOINTS", 4096);
    /// Addresses each endpoint owns (`EndpointAddress` -> 1): the anti-spoofing check.
    pub const ENDPOINT_ADDRESSES: PinnedMap = map("ENDPOINT_ADDRESSES", 16384);
    /// The local endpoint owning each address (`IpKey` -> ifindex), for the hook after
    /// translation.
    pub const ENDPOINT_OF_ADDRESS: PinnedMap = map("ENDPOINT_OF_ADDRESS", 16384);
    /// Address -> identity of every pod in the cluster and of the node (`IpKey` -> `IpIdentity`).
    pub const IPCACHE: PinnedMap = map("IPCACHE", 65536);
    /// What each policy allows (`PolicyKey` LPM -> `PolicyEntry`): the entries that leave part
    /// of the key out, and exact ones [`POLICY_EXACT`] had no room for.
    pub const POLICY: PinnedMap = map("POLICY", 262_144);
    /// What each policy allows on one protocol and port (`PolicyKey` -> `PolicyEntry`): the
    /// entries of `POLICY` that leave nothing out, looked up first, with one hash where the trie
    /// walks a node per bit that tells its keys apart. A quarter of `POLICY`'s size by default:
    /// a hash map's buckets cost memory used or not.
    pub const POLICY_EXACT: PinnedMap = map("POLICY_EXACT", POLICY.capacity / 4);
    /// IPv4 `ipBlock` prefixes of each policy (`CidrKeyV4` LPM -> `CidrClass`): all but the
    /// single addresses [`CIDRS_V4_EXACT`] has room for.
    pub const CIDRS_V4: PinnedMap = map("CIDRS_V4", 65536);
    /// The single addresses (`/32` blocks) of `CIDRS_V4` (`CidrKeyV4` -> `CidrClass`), looked
    /// up first, as `POLICY_EXACT` is before `POLICY`; a quarter of its size.
    pub const CIDRS_V4_EXACT: PinnedMap = map("CIDRS_V4_EXACT", CIDRS_V4.capacity / 4);
    /// IPv6 `ipBlock` prefixes of each policy (`CidrKey` LPM -> `CidrClass`).
    pub const CIDRS_V6: PinnedMap = map("CIDRS_V6", 65536);
    /// The agent's record of which label set got which identity (SHA-256 -> identity).
    pub const IDENTITIES: PinnedMap = map("IDENTITIES", 65536);
    /// Tracked IPv4 flows (`FlowKeyV4` LRU -> `FlowState`).
    pub const CONNTRACK_V4: PinnedMap = map("CONNTRACK_V4", 65536);
    /// Tracked IPv6 flows (`FlowKey` LRU -> `FlowState`).
    pub const CONNTRACK_V6: PinnedMap = map("CONNTRACK_V6", 65536);
    /// The peer each translated flow was judged on (`FlowKey` LRU -> `Translation`); sized
    /// like one conntrack table.
    pub const TRANSLATIONS: PinnedMap = map("TRANSLATIONS", 65536);
    /// Service frontends (`FrontendKey` -> `FrontendValue`).
    pub const FRONTENDS: PinnedMap = map("FRONTENDS", 65536);
    /// First fragments that passed (`FragmentKey` LRU -> `FragmentState`).
    pub const FRAGMENTS: PinnedMap = map("FRAGMENTS", 8192);
    /// mTLS-strict endpoints (ifindex -> `MTLS_STRICT`).
    pub const MTLS_STRICT_ENDPOINTS: PinnedMap = map("MTLS_STRICT_ENDPOINTS", 4096);
    /// Ports on which a strict endpoint takes plaintext (`MtlsExemptPort` -> 1).
    pub const MTLS_EXEMPT_PORTS: PinnedMap = map("MTLS_EXEMPT_PORTS", 16384);
    /// The policy epoch, at `EPOCH_INDEX`.
    pub const EPOCH: PinnedMap = map("EPOCH", 1);
    /// The agent's knobs (`SETTING_*`).
    pub const SETTINGS: PinnedMap = map("SETTINGS", SETTINGS_COUNT);
    /// Per-CPU verdict counters, one per reason and direction (`counter::slot`).
    pub const VERDICTS: PinnedMap = map("VERDICTS", counter::SLOTS);
    /// Verdict events for the agent (`VerdictEvent`): a ring buffer of this many bytes.
    pub const EVENTS: PinnedMap = map("EVENTS", 256 * 1024);
    /// Per-CPU state of the event rate limit (`EventBudget`).
    pub const EVENT_BUDGET: PinnedMap = map("EVENT_BUDGET", 1);
    /// Where the kernel fields the hook after translation reads lie (`KernelLayout`).
    pub const KERNEL_LAYOUT: PinnedMap = map("KERNEL_LAYOUT", 1);
    /// Per-CPU scratch space of the hook after translation (the stack is too small for it).
    pub const TUPLES: PinnedMap = map("TUPLES", 1);
    /// Slots of translated kernel connections the hook after translation let through (a tag
    /// of their `nf_conn` and the epoch), shared by all CPUs. Never pinned: each load of the
    /// programs starts with an empty cache of its own.
    pub const JUDGED_CONNECTIONS: PinnedMap = map("JUDGED_CONNECTIONS", 16_384);

    /// Every shared map.
    pub const ALL: [PinnedMap; 24] = [
        ENDPOINTS,
        ENDPOINT_ADDRESSES,
        ENDPOINT_OF_ADDRESS,
        IPCACHE,
        POLICY,
        POLICY_EXACT,
        CIDRS_V4,
        CIDRS_V4_EXACT,
        CIDRS_V6,
        IDENTITIES,
        CONNTRACK_V4,
        CONNTRACK_V6,
        TRANSLATIONS,
        FRONTENDS,
        FRAGMENTS,
        MTLS_STRICT_ENDPOINTS,
        MTLS_EXEMPT_PORTS,
        EPOCH,
        SETTINGS,
        VERDICTS,
        EVENTS,
        EVENT_BUDGET,
        KERNEL_LAYOUT,
        TUPLES,
    ];

    /// Maps each load of the programs keeps to itself, never pinned: caches, which a new
    /// load starts empty, so nothing in them outlives the programs that wrote it.
    pub const UNPINNED: [PinnedMap; 1] = [JUDGED_CONNECTIONS];

    /// Names of maps earlier versions pinned and this one no longer has (the agent removes
    /// their pins on upgrade): never to be reused for another map.
    pub const RETIRED_NAMES: [&str; 2] = ["CONNTRACK", "CIDRS"];

    // No two maps share a name, and no map takes a retired one.
    const _: () = {
        let mut row = 0;
        while row < ALL.len() {
            let mut other = 0;
            while other < row {
                assert!(
                    !same(ALL[row].name, ALL[other].name),
                    "two maps share a name"
                );
                other += 1;
            }
            let mut retired = 0;
            while retired < RETIRED_NAMES.len() {
                assert!(
                    !same(ALL[row].name, RETIRED_NAMES[retired]),
                    "a map takes a retired name"
                );
                retired += 1;
            }
            row += 1;
        }
        let mut unpinned = 0;
        while unpinned < UNPINNED.len() {
            let mut row = 0;
            while row < ALL.len() {
                assert!(
                    !same(UNPINNED[unpinned].name, ALL[row].name),
                    "an unpinned map takes a shared map's name"
                );
                row += 1;
            }
            unpinned += 1;
        }
    };
}

/// Whether two strings are equal, in a `const` (where `==` on `str` is not available).
const fn same(left: &str, right: &str) -> bool {
    let (left, right) = (left.as_bytes(), right.as_bytes());
    if left.len() != right.len() {
        return false;
    }
    let mut at = 0;
    while at < left.len() {
        if left[at] != right[at] {
            return false;
        }
        at += 1;
    }
    true
}

#[cfg(feature = "user")]
mod pod_impls {
    use super::{
        CidrClass, CidrKey, CidrKeyV4, Endpoint, EndpointAddress, EventBudget, FlowKey, FlowKeyV4,
        FlowState, FragmentKey, FragmentState, FrontendKey, FrontendValue, IpIdentity, IpKey,
        KernelLayout, MtlsExemptPort, PolicyEntry, PolicyKey, Translation, VerdictEvent,
    };

    // SAFETY: every type below is `#[repr(C)]`, `Copy`, made only of integers and byte arrays,
    // and has no implicit padding, so any bit pattern is a valid value.
    unsafe impl aya::Pod for Endpoint {}
    // SAFETY: see above.
    unsafe impl aya::Pod for EndpointAddress {}
    // SAFETY: see above.
    unsafe impl aya::Pod for VerdictEvent {}
    // SAFETY: see above.
    unsafe impl aya::Pod for EventBudget {}
    // SAFETY: see above.
    unsafe impl aya::Pod for IpKey {}
    // SAFETY: see above.
    unsafe impl aya::Pod for IpIdentity {}
    // SAFETY: see above.
    unsafe impl aya::Pod for PolicyKey {}
    // SAFETY: see above.
    unsafe impl aya::Pod for PolicyEntry {}
    // SAFETY: see above.
    unsafe impl aya::Pod for CidrKey {}
    // SAFETY: see above.
    unsafe impl aya::Pod for CidrKeyV4 {}
    // SAFETY: see above.
    unsafe impl aya::Pod for CidrClass {}
    // SAFETY: see above.
    unsafe impl aya::Pod for FlowKey {}
    // SAFETY: see above.
    unsafe impl aya::Pod for FlowKeyV4 {}
    // SAFETY: see above.
    unsafe impl aya::Pod for FlowState {}
    // SAFETY: see above.
    unsafe impl aya::Pod for MtlsExemptPort {}
    // SAFETY: see above.
    unsafe impl aya::Pod for FrontendKey {}
    // SAFETY: see above.
    unsafe impl aya::Pod for FrontendValue {}
    // SAFETY: see above.
    unsafe impl aya::Pod for Translation {}
    // SAFETY: see above.
    unsafe impl aya::Pod for KernelLayout {}
    // SAFETY: see above.
    unsafe impl aya::Pod for FragmentKey {}
    // SAFETY: see above.
    unsafe impl aya::Pod for FragmentState {}
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_reasons_that_pass_are_the_tables_allows_and_audits() {
        for reason in super::counter::TABLE {
            let passes = matches!(
                reason.kind,
                super::counter::Kind::Allow | super::counter::Kind::Audit
            );
            assert_eq!(
                super::counter::passes(reason.id),
                passes,
                "{}",
                reason.label
            );
        }
    }

    use core::mem::size_of;

    use super::{CidrKey, Endpoint, FlowKey, FlowState, PolicyKey};

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<Endpoint>(), 16);
        assert_eq!(size_of::<PolicyKey>(), 12);
        assert_eq!(size_of::<CidrKey>(), 20);
        assert_eq!(size_of::<super::CidrKeyV4>(), 8);
        assert_eq!(size_of::<super::EndpointAddress>(), 20);
        assert_eq!(size_of::<super::VerdictEvent>(), 56);
        assert_eq!(size_of::<super::FrontendKey>(), 20);
        assert_eq!(size_of::<super::Translation>(), 24);
        assert_eq!(size_of::<super::KernelLayout>(), 32);
        assert_eq!(size_of::<super::EventBudget>(), 16);
        assert_eq!(size_of::<FlowKey>(), 44);
        assert_eq!(size_of::<super::FlowKeyV4>(), 20);
        assert_eq!(size_of::<FlowState>(), 28);
        assert_eq!(size_of::<super::MtlsExemptPort>(), 8);
        assert_eq!(size_of::<super::FragmentKey>(), 44);
        assert_eq!(size_of::<super::FragmentState>(), 8);
    }

    /// The prefix lengths are derived from the key layouts; these are the numbers the pinned
    /// tries were written with, which a restarted agent must still read the same way.
    #[test]
    fn prefix_lengths_match_the_pinned_tries() {
        assert_eq!(super::POLICY_KEY_ANY_PROTOCOL_BITS, 32 + 32);
        assert_eq!(super::POLICY_KEY_ANY_PORT_BITS, 32 + 32 + 8);
        assert_eq!(super::POLICY_KEY_FULL_BITS, 32 + 32 + 8 + 16);
        assert_eq!(super::CIDR_KEY_POLICY_BITS, 32);
        assert_eq!(super::CIDR_KEY_V4_FULL_BITS, 32 + 32);
        assert_eq!(super::CIDR_KEY_FULL_BITS, 32 + 128);
        assert_eq!(super::IPV4_MAPPED_PREFIX_BITS, 96);
    }

    #[test]
    fn a_full_policy_key_covers_every_byte_but_the_padding() {
        let key = PolicyKey::new(0x0102_0304, 0x0506_0708, 0x09, 0x0a0b);
        // SAFETY: `PolicyKey` is `#[repr(C)]`, made of bytes, with no implicit padding.
        let bytes: [u8; 12] = unsafe { core::mem::transmute(key) };
        // Big-endian and in order: the trie compares the policy's most significant bit first.
        assert_eq!(bytes, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 0]);
        assert_eq!(
            super::POLICY_KEY_FULL_BITS,
            11 * 8,
            "all but the padding byte"
        );
    }

    #[test]
    fn shared_maps_keep_their_pinned_names() {
        use super::maps;
        let names = maps::ALL.map(|map| map.name);
        assert_eq!(
            names,
            [
                "ENDPOINTS",
                "ENDPOINT_ADDRESSES",
                "ENDPOINT_OF_ADDRESS",
                "IPCACHE",
                "POLICY",
                "POLICY_EXACT",
                "CIDRS_V4",
                "CIDRS_V4_EXACT",
                "CIDRS_V6",
                "IDENTITIES",
                "CONNTRACK_V4",
                "CONNTRACK_V6",
                "TRANSLATIONS",
                "FRONTENDS",
                "FRAGMENTS",
                "MTLS_STRICT_ENDPOINTS",
                "MTLS_EXEMPT_PORTS",
                "EPOCH",
                "SETTINGS",
                "VERDICTS",
                "EVENTS",
                "EVENT_BUDGET",
                "KERNEL_LAYOUT",
                "TUPLES",
            ]
        );
        assert_eq!(maps::VERDICTS.capacity, 2 * super::counter::COUNT);
    }

    #[test]
    fn ipv4_flows_key_the_ipv4_table_and_convert_back() {
        let mut flow = FlowKey {
            ifindex: 7,
            protocol: 6,
            pod_port: 80,
            peer_port: 40000,
            ..FlowKey::default()
        };
        flow.pod_addr[10..].copy_from_slice(&[0xff, 0xff, 10, 0, 0, 1]);
        flow.peer_addr[10..].copy_from_slice(&[0xff, 0xff, 10, 0, 0, 2]);
        let v4 = flow.ipv4().expect("both addresses are IPv4-mapped");
        assert_eq!((v4.pod_addr, v4.peer_addr), ([10, 0, 0, 1], [10, 0, 0, 2]));
        assert_eq!(v4.flow(), flow);

        // One IPv6 address (here `::1`) and the flow is an IPv6 one.
        flow.peer_addr = [0; 16];
        flow.peer_addr[15] = 1;
        assert_eq!(flow.ipv4(), None);
    }
}
