//! Header parsing: from an Ethernet frame to the flow the endpoint sees.

use aya_ebpf::programs::TcContext;
use netwarden_common::{FlowKey, direction};

const ETH_HEADER_LEN: usize = 14;
const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_ARP: u16 = 0x0806;
/// VLAN tags: 802.1Q, 802.1ad (QinQ) and the pre-standard QinQ tag.
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
const ETH_P_QINQ: u16 = 0x9100;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_SCTP: u8 = 132;

/// IPv6 extension headers walked to find the transport header: hop-by-hop, routing,
/// fragment, authentication and destination options.
const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AUTH: u8 = 51;
const IPV6_DEST_OPTS: u8 = 60;
/// More extension headers than this and the packet is classified by the last next-header
/// seen, which only an all-protocols rule matches: it fails closed.
const IPV6_MAX_EXTENSION_HEADERS: usize = 6;

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

/// Reads a `T` at `offset` of the frame: straight from the packet when the bytes are in its
/// linear part (always the case for headers of traffic between pods), through
/// `bpf_skb_load_bytes` otherwise. A helper call per field costs more than the whole lookup.
#[inline(always)]
fn load<T: Copy>(ctx: &TcContext, offset: usize) -> Result<T, Malformed> {
    let (start, end) = frame_bounds(ctx);
    // At least two bytes: for one, LLVM turns `start + offset + 1 <= end` into
    // `start + offset < end`, from which the verifier learns no range. A byte at the very end
    // of a frame takes the helper instead.
    if start + offset + core::mem::size_of::<T>().max(2) <= end {
        // SAFETY: the bytes lie between `data` and `data_end`, which the verifier checks too;
        // headers are not aligned, so the read is unaligned.
        return Ok(unsafe { core::ptr::read_unaligned((start + offset) as *const T) });
    }
    ctx.load(offset).map_err(|_| Malformed)
}

/// The address of `len` bytes at `offset` of the frame, with the verifier convinced they lie
/// inside it: one bounds check per header rather than one per field. Bytes outside the
/// linear part of the frame (never the case for headers of traffic between pods) are pulled
/// into it first; that invalidates every address taken before, so callers take one header
/// at a time. The fields are then read with [`Header`]'s unaligned loads.
#[inline(always)]
fn header_at(ctx: &TcContext, offset: usize, len: usize) -> Result<Header, Malformed> {
    let (start, end) = frame_bounds(ctx);
    let at = start + offset;
    if at + len <= end {
        return Ok(Header(at));
    }
    let wanted = u32::try_from(offset + len).map_err(|_| Malformed)?;
    ctx.pull_data(wanted).map_err(|_| Malformed)?;
    let (start, end) = frame_bounds(ctx);
    let at = start + offset;
    if at + len <= end {
        return Ok(Header(at));
    }
    Err(Malformed)
}

/// `data` and `data_end` of the frame, read afresh. Volatile reads: LLVM would otherwise
/// merge them with earlier reads and re-extend the merged 32-bit value with shifts, which the
/// verifier refuses on a packet pointer.
#[inline(always)]
fn frame_bounds(ctx: &TcContext) -> (usize, usize) {
    let skb = ctx.skb.skb;
    // SAFETY: `skb` is the `__sk_buff` the kernel handed to the program; TC programs may read
    // its `data` and `data_end` fields.
    unsafe {
        (
            core::ptr::read_volatile(&raw const (*skb).data) as usize,
            core::ptr::read_volatile(&raw const (*skb).data_end) as usize,
        )
    }
}

/// One load of the width `$load` names from address `$at`, zero-extended to 64 bits.
/// Assembly, because LLVM assembles an unaligned load from single bytes and headers start at
/// any alignment; the kernel loads packet bytes at any alignment on the architectures with
/// efficient unaligned access (x86-64, arm64).
macro_rules! unaligned_load {
    ($load:literal, $at:expr) => {{
        let value: u64;
        // SAFETY: one load from bytes `header_at()` checked lie in the frame; the verifier
        // checks it again.
        unsafe {
            core::arch::asm!(
                $load,
                value = lateout(reg) value,
                at = in(reg) $at,
                options(nostack, readonly, preserves_flags),
            );
        }
        value
    }};
}

/// The address of a header whose bytes the verifier knows are in the frame.
#[derive(Clone, Copy)]
struct Header(usize);

impl Header {
    /// The byte at `offset`.
    #[inline(always)]
    fn u8(self, offset: usize) -> u8 {
        // SAFETY: `header_at()` checked that the bytes lie in the frame; so does the verifier.
        unsafe { *((self.0 + offset) as *const u8) }
    }

    /// The 16-bit field at `offset`, in memory order (network byte order).
    #[inline(always)]
    fn u16(self, offset: usize) -> u16 {
        unaligned_load!("{value} = *(u16 *)({at} + 0)", self.0 + offset) as u16
    }

    /// The 32-bit field at `offset`, in memory order.
    #[inline(always)]
    fn u32(self, offset: usize) -> u32 {
        unaligned_load!("{value} = *(u32 *)({at} + 0)", self.0 + offset) as u32
    }

    /// The 64-bit field at `offset`, in memory order.
    #[inline(always)]
    fn u64(self, offset: usize) -> u64 {
        unaligned_load!("{value} = *(u64 *)({at} + 0)", self.0 + offset)
    }
}

/// No header the classifier reads lies further into a frame than this.
const MAX_HEADER_OFFSET: usize = 1024;

/// What the IP header says.
///
/// Addresses are two 64-bit words (network byte order in memory), never byte arrays that
/// start zeroed: the BPF backend turns zero-filled byte runs into calls to a byte-at-a-time
/// `memset`, which cost more than the whole conntrack lookup.
#[derive(Clone, Copy)]
struct IpHeader {
    src: [u64; 2],
    dst: [u64; 2],
    /// Offset of the L4 header from the start of the frame.
    l4_offset: usize,
    /// Offset of the end of the IP packet, from its length field.
    ip_end: usize,
    /// Protocol of the payload (IPv6: after the extension headers).
    protocol: u8,
    /// Which part of a datagram the packet is ([`fragment`]).
    fragment: u32,
    /// The datagram's identification, for fragments.
    fragment_id: u32,
}

/// Parses the frame at `ctx`, orienting the flow from the pod's side for `dir`. Inlined, as
/// are the IPv4 and IPv6 parsers it calls: the flow is built where the caller keeps it, where
/// a call would return it through the stack and the caller copy it twice more.
#[inline(always)]
pub fn parse(ctx: &TcContext, dir: u32) -> Result<Parsed, Malformed> {
    if vlan_present(ctx) {
        return Ok(Parsed::Tagged);
    }
    let ethertype = u16::from_be(header_at(ctx, 0, ETH_HEADER_LEN)?.u16(12));
    let header = match ethertype {
        ETH_P_IPV4 => parse_ipv4(ctx, ETH_HEADER_LEN)?,
        ETH_P_IPV6 => parse_ipv6(ctx, ETH_HEADER_LEN, IPV6_MAX_EXTENSION_HEADERS)?,
        ETH_P_ARP => return Ok(Parsed::Arp),
        ETH_P_8021Q | ETH_P_8021AD | ETH_P_QINQ => return Ok(Parsed::Tagged),
        _ => return Ok(Parsed::OtherEthertype),
    };
    let header = header.bounded()?;
    let ifindex = ifindex(ctx);
    if header.has_ports() && (header.protocol == IPPROTO_ICMP || header.protocol == IPPROTO_ICMPV6)
    {
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
    let l4 = header_at(ctx, header.l4_offset, 14)?;
    let (src_port, dst_port) = (u16::from_be(l4.u16(0)), u16::from_be(l4.u16(2)));
    let flags = l4.u8(13);
    let opening = if flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN {
        Opening::Yes
    } else if flags & (TCP_FLAG_FIN | TCP_FLAG_RST) != 0 {
        Opening::Closing
    } else {
        Opening::Continuation
    };
    Ok((src_port, dst_port, opening))
}

/// Whether the packet quoted by an ICMP error, starting at `offset`, belongs to a tracked
/// flow of the endpoint. A function of its own (not inlined) so its headers do not crowd the
/// main program's 512-byte stack.
#[inline(never)]
pub fn quotes_tracked_flow(
    ctx: &TcContext,
    icmp_protocol: u8,
    offset: usize,
    dir: u32,
    ifindex: u32,
) -> bool {
    let parsed = if icmp_protocol == IPPROTO_ICMP {
        parse_ipv4(ctx, offset)
    } else {
        // A quoted IPv6 packet is taken as it is: its extension headers are not walked.
        parse_ipv6(ctx, offset, 0)
    };
    let Ok(header) = parsed.and_then(IpHeader::bounded) else {
        return false;
    };
    if !header.has_ports() {
        return false;
    }
    let Ok(ports) = header_at(ctx, header.l4_offset, 8) else {
        return false;
    };
    let (src_port, dst_port) = match header.protocol {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => {
            (u16::from_be(ports.u16(0)), u16::from_be(ports.u16(2)))
        }
        // A quoted echo request (a ping to an unreachable host): keyed by its identifier.
        IPPROTO_ICMP | IPPROTO_ICMPV6 if echo(header.protocol, ports.u8(0)) == Some(true) => {
            let id = u16::from_be(ports.u16(4));
            (id, id)
        }
        _ => return false,
    };
    crate::verdict::is_tracked(&orient(ifindex, dir, &header, src_port, dst_port))
}

/// The port an ICMP message other than an echo and an error is keyed under, with its type in
/// the low byte (the other port is 0, so the key never matches an echo flow's).
const ICMP_INFORMATIONAL_PORT: u16 = 0x100;
const ICMPV6_NEIGHBOUR_SOLICITATION: u8 = 135;
const ICMPV6_NEIGHBOUR_ADVERTISEMENT: u8 = 136;

/// `Some(true)` for an echo request, `Some(false)` for an echo reply, of ICMP or ICMPv6.
#[inline(always)]
fn echo(protocol: u8, icmp_type: u8) -> Option<bool> {
    match (protocol, icmp_type) {
        (IPPROTO_ICMP, 8) | (IPPROTO_ICMPV6, 128) => Some(true),
        (IPPROTO_ICMP, 0) | (IPPROTO_ICMPV6, 129) => Some(false),
        _ => None,
    }
}

/// Whether an IPv6 source address is link-local (`fe80::/10`) or unspecified (`::`), as
/// neighbour discovery and multicast listener messages are sent from (RFC 4861, RFC 3810).
#[inline(always)]
fn is_link_local_or_unspecified(src: [u64; 2]) -> bool {
    let first = src[0].to_ne_bytes();
    (first[0] == 0xfe && first[1] & 0xc0 == 0x80) || (src[0] == 0 && src[1] == 0)
}

/// Neighbour discovery (133-137) and multicast listener queries and reports (130-132, 143).
#[inline(always)]
fn is_network_control(icmpv6_type: u8) -> bool {
    matches!(icmpv6_type, 130..=137 | 143)
}

#[inline(always)]
fn is_icmp_error(protocol: u8, icmp_type: u8) -> bool {
    if protocol == IPPROTO_ICMP {
        // Destination unreachable (incl. fragmentation needed), time exceeded, parameter problem.
        matches!(icmp_type, 3 | 11 | 12)
    } else {
        // Destination unreachable, packet too big, time exceeded, parameter problem.
        matches!(icmp_type, 1..=4)
    }
}

/// The flow of a packet going in `dir`, from the pod's side.
#[inline(always)]
fn orient(ifindex: u32, dir: u32, header: &IpHeader, src_port: u16, dst_port: u16) -> FlowKey {
    if dir == direction::EGRESS {
        FlowKey {
            ifindex,
            protocol: header.protocol,
            padding_byte: 0,
            padding_half: 0,
            pod_port: src_port,
            peer_port: dst_port,
            pod_addr: octets(header.src),
            peer_addr: octets(header.dst),
        }
    } else {
        FlowKey {
            ifindex,
            protocol: header.protocol,
            padding_byte: 0,
            padding_half: 0,
            pod_port: dst_port,
            peer_port: src_port,
            pod_addr: octets(header.dst),
            peer_addr: octets(header.src),
        }
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

impl IpHeader {
    /// The header, if its L4 offset is within [`MAX_HEADER_OFFSET`]. The offset comes back
    /// from the parser through the stack, unbounded as far as the verifier knows; packet
    /// pointer arithmetic needs the bound.
    #[inline(always)]
    fn bounded(self) -> Result<Self, Malformed> {
        if self.l4_offset > MAX_HEADER_OFFSET {
            return Err(Malformed);
        }
        Ok(self)
    }

    #[inline(always)]
    fn layout(&self) -> Layout {
        Layout {
            l4_offset: self.l4_offset,
            ip_end: self.ip_end,
            fragment: self.fragment,
            fragment_id: self.fragment_id,
        }
    }

    /// Whether the packet carries the L4 header (later fragments do not).
    #[inline(always)]
    fn has_ports(&self) -> bool {
        self.fragment != fragment::LATER
    }
}

/// The IPv4 header at `offset`, read field by field.
#[inline(always)]
fn parse_ipv4(ctx: &TcContext, offset: usize) -> Result<IpHeader, Malformed> {
    let ip = header_at(ctx, offset, 20)?;
    let version_and_length = ip.u8(0);
    if version_and_length >> 4 != 4 {
        return Err(Malformed);
    }
    let header_len = usize::from(version_and_length & 0x0f) * 4;
    if header_len < 20 {
        return Err(Malformed);
    }
    let flags_and_offset = u16::from_be(ip.u16(6));
    Ok(IpHeader {
        protocol: ip.u8(9),
        src: ipv4_mapped(ip.u32(12)),
        dst: ipv4_mapped(ip.u32(16)),
        l4_offset: offset + header_len,
        ip_end: ip_end(ctx, offset, usize::from(u16::from_be(ip.u16(2)))),
        fragment: fragment_of(flags_and_offset & 0x1fff, flags_and_offset & 0x2000 != 0),
        fragment_id: u32::from(u16::from_be(ip.u16(4))),
    })
}

/// The IPv6 header at `offset`, walking up to `max_extension_headers`.
#[inline(always)]
fn parse_ipv6(
    ctx: &TcContext,
    offset: usize,
    max_extension_headers: usize,
) -> Result<IpHeader, Malformed> {
    let ip = header_at(ctx, offset, 40)?;
    if ip.u8(0) >> 4 != 6 {
        return Err(Malformed);
    }
    let src = [ip.u64(8), ip.u64(16)];
    let dst = [ip.u64(24), ip.u64(32)];
    let mut protocol = ip.u8(6);
    let payload_length = usize::from(u16::from_be(ip.u16(4)));
    let ip_end = if payload_length == 0 {
        ip_end(ctx, offset, 0)
    } else {
        offset + 40 + payload_length
    };
    let mut l4_offset = offset + 40;
    let mut fragment = fragment::WHOLE;
    let mut fragment_id = 0;
    for _ in 0..max_extension_headers {
        match protocol {
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS | IPV6_AUTH => {
                // Field by field, not `header_at`: a pulled and an unpulled frame would leave
                // the verifier two states to follow through every further header.
                let [next, units] = load::<[u8; 2]>(ctx, l4_offset)?;
                let length = if protocol == IPV6_AUTH {
                    (usize::from(units) + 2) * 4
                } else {
                    (usize::from(units) + 1) * 8
                };
                protocol = next;
                l4_offset += length;
            }
            IPV6_FRAGMENT => {
                let next: u8 = load(ctx, l4_offset)?;
                let offset_field = u16::from_be(load::<u16>(ctx, l4_offset + 2)?);
                fragment_id = u32::from_be(load::<u32>(ctx, l4_offset + 4)?);
                protocol = next;
                fragment = fragment_of(offset_field >> 3, offset_field & 1 != 0);
                l4_offset += 8;
            }
            _ => break,
        }
    }
    Ok(IpHeader {
        protocol,
        src,
        dst,
        l4_offset,
        ip_end,
        fragment,
        fragment_id,
    })
}

/// Where an IP packet at `offset` whose length field says `length` ends. A length of 0 is
/// BIG TCP's (IPv4 total length 0, IPv6 payload length 0 with a jumbo option): the packet
/// then ends with the frame, never where the field says (which would make every payload
/// look empty).
#[inline(always)]
fn ip_end(ctx: &TcContext, offset: usize, length: usize) -> usize {
    if length == 0 {
        // SAFETY: `ctx.skb.skb` is the `__sk_buff` the kernel handed to this program; TC
        // programs may read its `len` field.
        unsafe { (*ctx.skb.skb).len as usize }
    } else {
        offset + length
    }
}

/// The part of its datagram a packet with this fragment offset and more-fragments bit is.
#[inline(always)]
fn fragment_of(offset: u16, more: bool) -> u32 {
    if offset != 0 {
        fragment::LATER
    } else if more {
        fragment::FIRST
    } else {
        fragment::WHOLE
    }
}

/// `::ffff:a.b.c.d` as two words in memory order: eight zero bytes, then `0, 0, 0xff, 0xff`
/// and the IPv4 address as it lay in the packet (one store each, so nothing becomes a
/// zero-filling `memset`).
#[inline(always)]
fn ipv4_mapped(v4: u32) -> [u64; 2] {
    let v4 = v4.to_ne_bytes();
    [
        0,
        u64::from_ne_bytes([0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3]]),
    ]
}

/// The address's bytes in memory order.
#[inline(always)]
fn octets(words: [u64; 2]) -> [u8; 16] {
    // SAFETY: both types are 16 plain bytes with no invalid bit patterns.
    unsafe { core::mem::transmute::<[u64; 2], [u8; 16]>(words) }
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

/// Bytes of a TCP payload the mTLS screen reads: a TLS record header (5) and the handshake
/// type (1).
pub const TLS_PREFIX_LEN: usize = 6;

/// What a TCP segment carries. Fieldless, so a non-inlined function can return it in a
/// register the verifier sees fully written (an enum carrying bytes is returned with undefined
/// padding bits, which the verifier refuses to read).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum TcpPayload {
    /// No payload (a handshake segment, a pure ACK, a FIN or RST without data).
    Empty,
    /// Fewer than [`TLS_PREFIX_LEN`] bytes: no TLS record header fits.
    Short,
    /// At least [`TLS_PREFIX_LEN`] bytes; the first ones were copied out.
    Starts,
    /// Not a TCP segment that could be parsed.
    Malformed,
}

/// The start of the TCP payload of the frame at `ctx`, whose TCP header starts at
/// `layout.l4_offset`, copied into `start` when it has one. The payload's end comes from the
/// IP length fields, never from the frame's length, so link-layer padding is not taken for
/// payload. Not inlined: a stack frame of its own.
#[inline(never)]
pub fn tcp_payload_start(
    ctx: &TcContext,
    l4_offset: usize,
    ip_end: usize,
    start: &mut [u8; TLS_PREFIX_LEN],
    length: &mut u32,
) -> TcpPayload {
    // The verifier needs the bound again in this frame.
    if l4_offset > MAX_HEADER_OFFSET {
        return TcpPayload::Malformed;
    }
    let Ok(data_offset) = load::<u8>(ctx, l4_offset + 12) else {
        return TcpPayload::Malformed;
    };
    let payload = l4_offset + usize::from(data_offset >> 4) * 4;
    #[expect(
        clippy::cast_possible_truncation,
        reason = "an skb is shorter than 4 GiB"
    )]
    if payload < ip_end {
        *length = (ip_end - payload) as u32;
    }
    if payload >= ip_end {
        TcpPayload::Empty
    } else if payload + TLS_PREFIX_LEN > ip_end {
        TcpPayload::Short
    } else {
        match load::<[u8; TLS_PREFIX_LEN]>(ctx, payload) {
            Ok(bytes) => {
                *start = bytes;
                TcpPayload::Starts
            }
            Err(Malformed) => TcpPayload::Malformed,
        }
    }
}
