//! The datapath's lookup, over a [`DatapathState`] instead of eBPF maps.
//!
//! This follows `decide()` in `ebpf/netwarden-ebpf/src/verdict.rs` step for step, including
//! the IPv4-mapped 16-byte addresses and longest-prefix matching, so tests of the compiler test
//! what the kernel will do with its output.

use std::net::IpAddr;

use netwarden_common::{IDENTITY_HOST, IDENTITY_WORLD, IPV4_MAPPED_PREFIX_BITS, PeerId};
use netwarden_model::PodRef;

use crate::state::{DatapathState, Direction, RuleId};

/// Why the datapath passes or drops the first packet of a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// From the node to the pod.
    AllowedNode,
    /// The endpoint is not isolated in this direction.
    AllowedNotIsolated,
    /// Allowed by this rule.
    Allowed(RuleId),
    /// Isolated, and no rule allows it.
    Denied,
    /// Not a local endpoint.
    UnknownEndpoint,
}

impl Decision {
    /// Whether the packet passes.
    #[must_use]
    pub fn is_allowed(self) -> bool {
        matches!(
            self,
            Self::AllowedNode | Self::AllowedNotIsolated | Self::Allowed(_)
        )
    }
}

/// Decides the first packet of a flow between local endpoint `endpoint` and `peer`, in
/// `direction` from the endpoint's point of view, to destination `port` over `protocol`.
#[must_use]
pub fn decide(
    state: &DatapathState,
    endpoint: &PodRef,
    direction: Direction,
    peer: IpAddr,
    protocol: u8,
    port: u16,
) -> Decision {
    let Some(endpoint) = state.endpoints.get(endpoint) else {
        return Decision::UnknownEndpoint;
    };
    let identity = state.ipcache.get(&peer).copied().unwrap_or(IDENTITY_WORLD);
    if direction == Direction::Ingress && identity == IDENTITY_HOST {
        return Decision::AllowedNode;
    }
    let policy = match direction {
        Direction::Ingress => endpoint.ingress,
        Direction::Egress => endpoint.egress,
    };
    let Some(policy) = policy.and_then(|id| state.policies.get(&id)) else {
        return Decision::AllowedNotIsolated;
    };
    let allowing = |peer_id: PeerId| {
        policy
            .entries
            .iter()
            .find(|(entry, _)| entry.peer == peer_id && entry.covers(protocol, port))
            .map(|(_, rule)| *rule)
    };
    // As the datapath: WORLD is never looked up, no entry names it.
    if identity != IDENTITY_WORLD
        && let Some(rule) = allowing(identity)
    {
        return Decision::Allowed(rule);
    }
    let address = mapped(peer);
    let class = policy
        .cidrs
        .iter()
        .filter_map(|(prefix, class)| {
            let (bits, prefix_len) = mapped_prefix(prefix);
            prefix_holds(&bits, prefix_len, &address).then_some((prefix_len, *class))
        })
        .max_by_key(|(prefix_len, _)| *prefix_len)
        .map(|(_, class)| class);
    match class.and_then(allowing) {
        Some(rule) => Decision::Allowed(rule),
        None => Decision::Denied,
    }
}

/// An address as the datapath stores it: 16 bytes, IPv4-mapped for IPv4.
#[must_use]
pub fn mapped(address: IpAddr) -> [u8; 16] {
    match address {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// A prefix as the datapath stores it: the mapped address and its prefix length.
#[must_use]
pub fn mapped_prefix(prefix: &ipnet::IpNet) -> ([u8; 16], u32) {
    match prefix {
        ipnet::IpNet::V4(v4) => (
            mapped(IpAddr::V4(v4.network())),
            IPV4_MAPPED_PREFIX_BITS + u32::from(v4.prefix_len()),
        ),
        ipnet::IpNet::V6(v6) => (v6.network().octets(), u32::from(v6.prefix_len())),
    }
}

fn prefix_holds(prefix: &[u8; 16], prefix_len: u32, address: &[u8; 16]) -> bool {
    let prefix = u128::from_be_bytes(*prefix);
    let address = u128::from_be_bytes(*address);
    let mask = if prefix_len == 0 {
        0
    } else {
        u128::MAX << (128 - prefix_len)
    };
    prefix & mask == address & mask
}
