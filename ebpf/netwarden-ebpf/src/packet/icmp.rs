//! ICMP for IPv4 and IPv6: which messages are echoes, errors, and link plumbing.

use super::{IPPROTO_ICMP, IPPROTO_ICMPV6};

/// The port an ICMP message other than an echo and an error is keyed under, with its type in
/// the low byte (the other port is 0, so the key never matches an echo flow's).
pub(super) const ICMP_INFORMATIONAL_PORT: u16 = 0x100;
pub(super) const ICMPV6_NEIGHBOUR_SOLICITATION: u8 = 135;
pub(super) const ICMPV6_NEIGHBOUR_ADVERTISEMENT: u8 = 136;

/// `Some(true)` for an echo request, `Some(false)` for an echo reply, of ICMP for IPv4 or
/// IPv6.
#[inline(always)]
pub(super) fn echo(protocol: u8, icmp_type: u8) -> Option<bool> {
    match (protocol, icmp_type) {
        (IPPROTO_ICMP, 8) | (IPPROTO_ICMPV6, 128) => Some(true),
        (IPPROTO_ICMP, 0) | (IPPROTO_ICMPV6, 129) => Some(false),
        _ => None,
    }
}

/// Whether an IPv6 source address is link-local (`fe80::/10`) or unspecified (`::`), as
/// neighbour discovery and multicast listener messages are sent from (RFC 4861, RFC 3810).
#[inline(always)]
pub(super) fn is_link_local_or_unspecified(src: [u64; 2]) -> bool {
    let first = src[0].to_ne_bytes();
    (first[0] == 0xfe && first[1] & 0xc0 == 0x80) || (src[0] == 0 && src[1] == 0)
}

/// Neighbour discovery (133-137) and multicast listener queries and reports (130-132, 143).
#[inline(always)]
pub(super) fn is_network_control(icmpv6_type: u8) -> bool {
    matches!(icmpv6_type, 130..=137 | 143)
}

#[inline(always)]
pub(super) fn is_icmp_error(protocol: u8, icmp_type: u8) -> bool {
    if protocol == IPPROTO_ICMP {
        // Destination unreachable (incl. fragmentation needed), time exceeded, parameter problem.
        matches!(icmp_type, 3 | 11 | 12)
    } else {
        // Destination unreachable, packet too big, time exceeded, parameter problem.
        matches!(icmp_type, 1..=4)
    }
}
