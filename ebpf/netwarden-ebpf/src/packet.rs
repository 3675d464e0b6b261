//! Header parsing: from an Ethernet frame to the flow the endpoint sees. Parsing only: what
//! a flow is allowed to do is asked elsewhere (`verdict.rs`, `conntrack.rs`).
//!
//! `frame.rs` reads the frame within bounds the verifier accepts, `ip.rs` the IP layer and
//! `icmp.rs` classifies ICMP messages; this module puts them together into a [`Parsed`].

mod frame;
mod icmp;
mod ip;

use aya_ebpf::programs::TcContext;
pub(crate) use frame::{MAX_HEADER_OFFSET, load};
use frame::{header_at, linear_header_at};
use icmp::{
    ICMP_INFORMATIONAL_PORT, ICMPV6_NEIGHBOUR_ADVERTISEMENT, ICMPV6_NEIGHBOUR_SOLICITATION, echo,
    is_icmp_error, is_link_local_or_unspecified, is_network_control,
};
use ip::{IPV6_MAX_EXTENSION_HEADERS, IpHeader, octets, parse_ipv4, parse_ipv6};
use netwarden_common::{FlowKey, FlowKeyV4, direction};

const ETH_HEADER_LEN: usize = 14;
/// An IPv4 header without options.
const IPV4_HEADER_LEN: usize = 20;
/// A TCP header up to its flags byte, which ends it; as many bytes cover a UDP header.
const TCP_HEADER_TO_FLAGS: usize = 14;
const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_ARP: u16 = 0x0806;
/// VLAN tags: 802.1Q, 802.1ad (Q-in-Q) and the pre-standard Q-in-Q tag.
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
const ETH_P_QINQ: u16 = 0x9100;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_SCTP: u8 = 132;

/// What the classifier needs to know about one packet.
pub enum Parsed {
    /// ARP: link plumbing, never subject to NetworkPolicy.
    Arp,
    /// A VLAN tag, in the frame (802.1Q, 802.1ad, 0x9100) or taken off by the kernel
    /// (`vlan_present`): the kernel may strip it after the classifier and deliver what it
    /// hid, so a pod never sends or receives one.
    Tagged,
    /// An ethertype other than IPv4, IPv6 and ARP: a pod's link carries nothing else.
    OtherEthertype,
    /// IPv6 neighbour discovery and multicast listener messages: link plumbing, always passed.
    NetworkControl,
    /// An IP packet: its flow as seen from the pod, whether it may open a flow, and where its
    /// layers lie.
    Flow(FlowKey, Opening, Layout),
}

/// Where an IP packet's layers lie in the frame, so later steps (the mTLS screen, the ICMP
/// error check) need not parse the headers again. Not carried by `Opening::Error`: LLVM
/// spills an enum's payload on paths where it is undefined, which the verifier refuses.
#[derive(Clone, Copy)]
pub struct Layout {
    /// Offset of the L4 header (at most `MAX_HEADER_OFFSET`).
    pub l4_offset: usize,
    /// Offset of the end of the IP packet, from its length field: link-layer padding is not
    /// payload.
    pub ip_end: usize,
    /// Which part of a fragmented datagram the packet is ([`fragment`]).
    pub fragment: u32,
    /// The datagram's identification: IPv4's 16-bit id, IPv6's fragment header's 32-bit id
    /// (meaningful for fragments only).
    pub fragment_id: u32,
}

/// Which part of a datagram a packet is.
pub mod fragment {
    /// Not a fragment (IPv6 atomic fragments included: offset 0 and no more to come).
    pub const WHOLE: u32 = 0;
    /// The first fragment: offset 0, more fragments to come. It carries the ports.
    pub const FIRST: u32 = 1;
    /// A later fragment: no L4 header, so no ports.
    pub const LATER: u32 = 2;
}

impl Layout {
    /// Where the IP header an ICMP error quotes starts.
    pub fn quoted(self) -> usize {
        self.l4_offset + 8
    }
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
    /// A TCP FIN or RST: a continuation that also tells conntrack the connection is closing.
    Closing,
    /// An IPv6 neighbour solicitation or advertisement from an address that is not
    /// link-local: it passes leaving the pod from an address the pod owns, and towards the pod
    /// (link plumbing: pods on a bridge resolve each other directly). It never opens a flow.
    Neighbour,
    /// An ICMP error (unreachable, packet too big, time exceeded, parameter problem): when the
    /// packet it quotes belongs to a tracked flow the error passes, so path MTU discovery
    /// keeps working. An error never opens a flow itself.
    Error,
}

const TCP_FLAG_FIN: u8 = 0x01;
pub const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_RST: u8 = 0x04;
pub const TCP_FLAG_ACK: u8 = 0x10;

/// A packet that could not be parsed; the caller drops it.
pub struct Malformed;

/// Parses the frame at `ctx`, orienting the flow from the pod's side for `dir`. Inlined, as
/// are the IPv4 and IPv6 parsers it calls: the flow is built where the caller keeps it, where
/// a call would return it through the stack and the caller copy it twice more.
#[inline(always)]
pub fn parse(ctx: &TcContext, dir: u32) -> Result<Parsed, Malformed> {
    if vlan_present(ctx) {
        return Ok(Parsed::Tagged);
    }
    let ethertype = u16::from_be(header_at(ctx, 0, ETH_HEADER_LEN)?.u16(12));
    // The ICMP of the packet's IP version. The other one is a protocol without ports like any
    // other: an IPv4 packet of protocol 58 is no neighbour solicitation, and taken for one it
    // passed both ways whatever the policy said.
    let (header, icmp_protocol) = match ethertype {
        ETH_P_IPV4 => (parse_ipv4(ctx, ETH_HEADER_LEN)?, IPPROTO_ICMP),
        ETH_P_IPV6 => (
            parse_ipv6(ctx, ETH_HEADER_LEN, IPV6_MAX_EXTENSION_HEADERS)?,
            IPPROTO_ICMPV6,
        ),
        ETH_P_ARP => return Ok(Parsed::Arp),
        ETH_P_8021Q | ETH_P_8021AD | ETH_P_QINQ => return Ok(Parsed::Tagged),
        _ => return Ok(Parsed::OtherEthertype),
    };
    let header = header.bounded()?;
    let ifindex = ifindex(ctx);
    if header.has_ports() && header.protocol == icmp_protocol {
        // The type, code, checksum and four bytes more: no ICMP message is shorter.
        let icmp = header_at(ctx, header.l4_offset, 8)?;
        let icmp_type = icmp.u8(0);
        if header.protocol == IPPROTO_ICMPV6 && is_network_control(icmp_type) {
            if is_link_local_or_unspecified(header.src) {
                return Ok(Parsed::NetworkControl);
            }
            // Neighbour solicitations and advertisements may come from any address of the
            // interface (RFC 4861 7.1), and Linux sends them from the address of the packet
            // that needed the neighbour: the caller passes them leaving the pod from an
            // address the pod owns, and towards the pod (a neighbour on a bridge). Every other
            // one is an ordinary packet that opens nothing.
            let opening = if matches!(
                icmp_type,
                ICMPV6_NEIGHBOUR_SOLICITATION | ICMPV6_NEIGHBOUR_ADVERTISEMENT
            ) {
                Opening::Neighbour
            } else {
                Opening::Continuation
            };
            return Ok(Parsed::Flow(
                orient(
                    ifindex,
                    dir,
                    &header,
                    0,
                    ICMP_INFORMATIONAL_PORT | u16::from(icmp_type),
                ),
                opening,
                header.layout(),
            ));
        }
        if let Some(request) = echo(header.protocol, icmp_type) {
            // Keyed by the echo identifier on both sides, so a reply finds its request's
            // entry and nothing else does; only a request may open a flow.
            let id = u16::from_be(icmp.u16(4));
            let opening = if request {
                Opening::Yes
            } else {
                Opening::Continuation
            };
            return Ok(Parsed::Flow(
                orient(ifindex, dir, &header, id, id),
                opening,
                header.layout(),
            ));
        }
        if !is_icmp_error(header.protocol, icmp_type) {
            // Other informational messages (timestamps, router discovery...) open nothing and
            // match no echo flow: their two ports always differ, an echo's never do.
            return Ok(Parsed::Flow(
                orient(
                    ifindex,
                    dir,
                    &header,
                    0,
                    ICMP_INFORMATIONAL_PORT | u16::from(icmp_type),
                ),
                Opening::Continuation,
                header.layout(),
            ));
        }
        // An error. Whether the quoted packet belongs to a tracked flow is asked by the
        // caller: a call from here would stack three frames deep. Keyed like an
        // informational message, so the error itself matches no tracked flow.
        return Ok(Parsed::Flow(
            orient(
                ifindex,
                dir,
                &header,
                0,
                ICMP_INFORMATIONAL_PORT | u16::from(icmp_type),
            ),
            Opening::Error,
            header.layout(),
        ));
    }
    let (src_port, dst_port, opening) = transport(ctx, &header)?;
    Ok(Parsed::Flow(
        orient(ifindex, dir, &header, src_port, dst_port),
        opening,
        header.layout(),
    ))
}

/// Ports and whether the packet may open a flow.
#[inline(always)]
fn transport(ctx: &TcContext, header: &IpHeader) -> Result<(u16, u16, Opening), Malformed> {
    if !header.has_ports() || !matches!(header.protocol, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP) {
        return Ok((0, 0, Opening::Yes));
    }
    // TCP, UDP and SCTP all start with source port then destination port; TCP's flags are
    // its 14th byte. Two bounds checks in two branches: the verifier does not tie a length
    // chosen by protocol to the protocol test guarding the flags.
    if header.protocol != IPPROTO_TCP {
        let l4 = header_at(ctx, header.l4_offset, 4)?;
        return Ok((
            u16::from_be(l4.u16(0)),
            u16::from_be(l4.u16(2)),
            Opening::Yes,
        ));
    }
    let l4 = header_at(ctx, header.l4_offset, TCP_HEADER_TO_FLAGS)?;
    let (src_port, dst_port) = (u16::from_be(l4.u16(0)), u16::from_be(l4.u16(2)));
    Ok((src_port, dst_port, tcp_opening(l4.u8(13))))
}

/// Whether a TCP segment with `flags` may open a flow: only a SYN without ACK may.
#[inline(always)]
fn tcp_opening(flags: u8) -> Opening {
    if flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN {
        Opening::Yes
    } else if flags & (TCP_FLAG_FIN | TCP_FLAG_RST) != 0 {
        Opening::Closing
    } else {
        Opening::Continuation
    }
}

/// The flow of the packet most packets are, read the short way: an IPv4 TCP or UDP packet,
/// untagged, unfragmented, without IP options, whose headers lie in the frame's linear part.
/// `None` for any other packet, which [`parse`] reads in full. Where both read a packet they
/// agree: the same flow and opening, and nothing in such a packet that [`parse`] would call
/// malformed. So the fast path can look a packet up before the rest is parsed.
#[inline(always)]
pub fn plain_ipv4_flow(ctx: &TcContext, dir: u32) -> Option<(FlowKeyV4, Opening)> {
    const IP: usize = ETH_HEADER_LEN;
    const L4: usize = ETH_HEADER_LEN + IPV4_HEADER_LEN;
    /// Version 4, a header of five words: no options.
    const VERSION_4_NO_OPTIONS: u8 = 0x45;
    /// The more-fragments bit and the fragment offset.
    const FRAGMENT_BITS: u16 = 0x3fff;
    if vlan_present(ctx) {
        return None;
    }
    let frame = linear_header_at(ctx, 0, L4 + TCP_HEADER_TO_FLAGS)?;
    if u16::from_be(frame.u16(12)) != ETH_P_IPV4
        || frame.u8(IP) != VERSION_4_NO_OPTIONS
        || u16::from_be(frame.u16(IP + 6)) & FRAGMENT_BITS != 0
    {
        return None;
    }
    let protocol = frame.u8(IP + 9);
    let opening = match protocol {
        IPPROTO_TCP => tcp_opening(frame.u8(L4 + 13)),
        IPPROTO_UDP => Opening::Yes,
        _ => return None,
    };
    let (src, dst) = (
        frame.u32(IP + 12).to_ne_bytes(),
        frame.u32(IP + 16).to_ne_bytes(),
    );
    let (src_port, dst_port) = (u16::from_be(frame.u16(L4)), u16::from_be(frame.u16(L4 + 2)));
    let (pod, peer) = pod_and_peer(dir, (src, src_port), (dst, dst_port));
    Some((FlowKeyV4::new(ifindex(ctx), protocol, pod, peer), opening))
}

/// The flow of the packet an ICMP error quotes, starting at `offset`, as the endpoint at
/// `ifindex` saw it going `dir`: `None` when it has no ports (or echo identifier) to key a
/// flow by. Inlined into its caller (`conntrack::quotes_tracked_flow`), which is not inlined
/// itself, so the quoted headers stay off the main program's stack.
#[inline(always)]
pub fn quoted_flow(
    ctx: &TcContext,
    icmp_protocol: u8,
    offset: usize,
    dir: u32,
    ifindex: u32,
) -> Option<FlowKey> {
    let parsed = if icmp_protocol == IPPROTO_ICMP {
        parse_ipv4(ctx, offset)
    } else {
        // A quoted IPv6 packet is taken as it is: its extension headers are not walked.
        parse_ipv6(ctx, offset, 0)
    };
    let Ok(header) = parsed.and_then(IpHeader::bounded) else {
        return None;
    };
    if !header.has_ports() {
        return None;
    }
    let Ok(ports) = header_at(ctx, header.l4_offset, 8) else {
        return None;
    };
    let (src_port, dst_port) = match header.protocol {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => {
            (u16::from_be(ports.u16(0)), u16::from_be(ports.u16(2)))
        }
        // A quoted echo request (a ping to an unreachable host): keyed by its identifier. The
        // quoted packet is of the error's IP version, so its ICMP is the error's.
        protocol if protocol == icmp_protocol && echo(protocol, ports.u8(0)) == Some(true) => {
            let id = u16::from_be(ports.u16(4));
            (id, id)
        }
        _ => return None,
    };
    Some(orient(ifindex, dir, &header, src_port, dst_port))
}

/// The flow of a packet going in `dir`, from the pod's side.
#[inline(always)]
fn orient(ifindex: u32, dir: u32, header: &IpHeader, src_port: u16, dst_port: u16) -> FlowKey {
    let (pod, peer) = pod_and_peer(
        dir,
        (octets(header.src), src_port),
        (octets(header.dst), dst_port),
    );
    FlowKey::new(ifindex, header.protocol, pod, peer)
}

/// The pod's and its peer's (address, port) for a packet from `source` to `destination` going
/// `dir`: the pod is the source of what leaves it.
#[inline(always)]
fn pod_and_peer<A>(dir: u32, source: (A, u16), destination: (A, u16)) -> ((A, u16), (A, u16)) {
    if dir == direction::EGRESS {
        (source, destination)
    } else {
        (destination, source)
    }
}

/// Whether the kernel took a VLAN tag off the frame before the classifier saw it (a
/// hardware-accelerated or untagged-on-receive tag is in the `__sk_buff`, not in the frame).
#[inline(always)]
fn vlan_present(ctx: &TcContext) -> bool {
    // SAFETY: `ctx.skb.skb` is the `__sk_buff` the kernel handed to this program; TC programs
    // may read its `vlan_present` field.
    unsafe { (*ctx.skb.skb).vlan_present != 0 }
}

#[inline(always)]
fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: `ctx.skb.skb` is the `__sk_buff` the kernel handed to this program; reading its
    // `ifindex` field is always permitted for TC programs.
    unsafe { (*ctx.skb.skb).ifindex }
}

/// A TCP segment's sequence and acknowledgement numbers (host order) and flags.
#[derive(Clone, Copy)]
pub struct TcpNumbers {
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
}

/// The numbers of the TCP segment whose header starts at `l4_offset`.
#[inline(always)]
pub fn tcp_numbers(ctx: &TcContext, l4_offset: usize) -> Result<TcpNumbers, Malformed> {
    // The verifier needs the bound again in the caller's frame.
    if l4_offset > MAX_HEADER_OFFSET {
        return Err(Malformed);
    }
    Ok(TcpNumbers {
        seq: u32::from_be(load::<u32>(ctx, l4_offset + 4)?),
        ack: u32::from_be(load::<u32>(ctx, l4_offset + 8)?),
        flags: load::<u8>(ctx, l4_offset + 13)?,
    })
}
