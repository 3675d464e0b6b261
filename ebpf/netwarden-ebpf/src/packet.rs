//! Header parsing: from an Ethernet frame to the flow the endpoint sees.

use aya_ebpf::programs::TcContext;
use netwarden_common::{FlowKey, direction};

const ETH_HEADER_LEN: usize = 14;
const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_SCTP: u8 = 132;

/// What the classifier needs to know about one packet.
pub enum Parsed {
    /// Not IP (ARP and friends): never subject to NetworkPolicy.
    NotIp,
    /// IPv6 neighbour discovery or router messages: link plumbing, always allowed.
    NeighbourDiscovery,
    /// An IP packet, as a flow seen from the pod, and whether it may open a flow.
    Flow(FlowKey, Opening),
}

/// Whether a packet may open a tracked flow.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Opening {
    /// It may: a TCP SYN without ACK, or any packet of a protocol without handshake.
    Yes,
    /// A TCP packet of a connection already under way (no SYN, or a SYN-ACK). Only the first
    /// packet of a handshake may create conntrack state: a mid-stream packet from the server
    /// must not open a "flow" through which the client's packets then pass as replies.
    Continuation,
}

const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;

/// A packet that could not be parsed; the caller drops it where the pod is isolated.
pub struct Malformed;

/// Parses the frame at `ctx`, orienting the flow from the pod's side for `dir`.
#[inline(always)]
pub fn parse(ctx: &TcContext, dir: u32) -> Result<Parsed, Malformed> {
    let ethertype = u16::from_be(ctx.load::<u16>(12).map_err(|_| Malformed)?);
    let IpHeader {
        protocol,
        src,
        dst,
        l4_offset,
        has_ports,
    } = match ethertype {
        ETH_P_IPV4 => parse_ipv4(ctx)?,
        ETH_P_IPV6 => parse_ipv6(ctx)?,
        _ => return Ok(Parsed::NotIp),
    };
    if protocol == IPPROTO_ICMPV6 {
        let icmp_type: u8 = ctx.load(l4_offset).map_err(|_| Malformed)?;
        // Router solicitation/advertisement, neighbour solicitation/advertisement, redirect.
        if (133..=137).contains(&icmp_type) {
            return Ok(Parsed::NeighbourDiscovery);
        }
    }
    let (src_port, dst_port) =
        if has_ports && matches!(protocol, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP) {
            // TCP, UDP and SCTP all start with source port then destination port.
            let ports: [u8; 4] = ctx.load(l4_offset).map_err(|_| Malformed)?;
            (
                u16::from_be_bytes([ports[0], ports[1]]),
                u16::from_be_bytes([ports[2], ports[3]]),
            )
        } else {
            (0, 0)
        };
    let opening = if protocol == IPPROTO_TCP && has_ports {
        let flags: u8 = ctx.load(l4_offset + 13).map_err(|_| Malformed)?;
        if flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN {
            Opening::Yes
        } else {
            Opening::Continuation
        }
    } else {
        Opening::Yes
    };
    let ifindex = ifindex(ctx);
    let flow = if dir == direction::EGRESS {
        FlowKey {
            ifindex,
            protocol,
            padding: [0; 3],
            pod_port: src_port,
            peer_port: dst_port,
            pod_addr: src,
            peer_addr: dst,
        }
    } else {
        FlowKey {
            ifindex,
            protocol,
            padding: [0; 3],
            pod_port: dst_port,
            peer_port: src_port,
            pod_addr: dst,
            peer_addr: src,
        }
    };
    Ok(Parsed::Flow(flow, opening))
}

#[inline(always)]
fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: `ctx.skb.skb` is the `__sk_buff` the kernel handed to this program; reading its
    // `ifindex` field is always permitted for TC programs.
    unsafe { (*ctx.skb.skb).ifindex }
}

/// What the IP header says.
struct IpHeader {
    /// Protocol of the payload (IPv6: the first next-header value).
    protocol: u8,
    src: [u8; 16],
    dst: [u8; 16],
    /// Offset of the L4 header from the start of the frame.
    l4_offset: usize,
    /// Whether the packet carries the L4 header (later fragments do not).
    has_ports: bool,
}

#[inline(always)]
fn parse_ipv4(ctx: &TcContext) -> Result<IpHeader, Malformed> {
    let header: [u8; 20] = ctx.load(ETH_HEADER_LEN).map_err(|_| Malformed)?;
    if header[0] >> 4 != 4 {
        return Err(Malformed);
    }
    let header_len = usize::from(header[0] & 0x0f) * 4;
    if header_len < 20 {
        return Err(Malformed);
    }
    let fragment_offset = u16::from_be_bytes([header[6], header[7]]) & 0x1fff;
    let protocol = header[9];
    let src = ipv4_mapped([header[12], header[13], header[14], header[15]]);
    let dst = ipv4_mapped([header[16], header[17], header[18], header[19]]);
    // Later fragments carry no L4 header: only rules that allow every port can match them.
    Ok(IpHeader {
        protocol,
        src,
        dst,
        l4_offset: ETH_HEADER_LEN + header_len,
        has_ports: fragment_offset == 0,
    })
}

#[inline(always)]
fn parse_ipv6(ctx: &TcContext) -> Result<IpHeader, Malformed> {
    let next_header: u8 = ctx.load(ETH_HEADER_LEN + 6).map_err(|_| Malformed)?;
    let src: [u8; 16] = ctx.load(ETH_HEADER_LEN + 8).map_err(|_| Malformed)?;
    let dst: [u8; 16] = ctx.load(ETH_HEADER_LEN + 24).map_err(|_| Malformed)?;
    // Extension headers are not walked yet: the packet is classified by its first next-header
    // value, which only an all-protocols rule matches, so this fails closed.
    Ok(IpHeader {
        protocol: next_header,
        src,
        dst,
        l4_offset: ETH_HEADER_LEN + 40,
        has_ports: true,
    })
}

#[inline(always)]
fn ipv4_mapped(v4: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3],
    ]
}
