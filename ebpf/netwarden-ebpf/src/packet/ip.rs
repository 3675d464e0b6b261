//! The IP layer: IPv4 and IPv6 headers (IPv6 extension headers walked), fragments, and
//! addresses in the two-word form the flow keys are built from.

use aya_ebpf::programs::TcContext;

use super::{
    Layout, MAX_HEADER_OFFSET, Malformed, fragment,
    frame::{header_at, load},
};

/// IPv6 extension headers walked to find the transport header: hop-by-hop, routing,
/// fragment, authentication and destination options.
const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AUTH: u8 = 51;
const IPV6_DEST_OPTS: u8 = 60;
/// More extension headers than this and the packet is classified by the last next-header
/// seen, which only an all-protocols rule matches: it fails closed.
pub(super) const IPV6_MAX_EXTENSION_HEADERS: usize = 6;

/// What the IP header says.
///
/// Addresses are two 64-bit words (network byte order in memory), never byte arrays that
/// start zeroed: the BPF backend turns zero-filled byte runs into calls to a byte-at-a-time
/// `memset`, which cost more than the whole conntrack lookup.
#[derive(Clone, Copy)]
pub(super) struct IpHeader {
    pub(super) src: [u64; 2],
    pub(super) dst: [u64; 2],
    /// Offset of the L4 header from the start of the frame.
    pub(super) l4_offset: usize,
    /// Offset of the end of the IP packet, from its length field.
    pub(super) ip_end: usize,
    /// Protocol of the payload (IPv6: after the extension headers).
    pub(super) protocol: u8,
    /// Which part of a datagram the packet is ([`fragment`]).
    pub(super) fragment: u32,
    /// The datagram's identification, for fragments.
    pub(super) fragment_id: u32,
}

impl IpHeader {
    /// The header, if its L4 offset is within [`MAX_HEADER_OFFSET`]. The offset comes back
    /// from the parser through the stack, unbounded as far as the verifier knows; packet
    /// pointer arithmetic needs the bound.
    #[inline(always)]
    pub(super) fn bounded(self) -> Result<Self, Malformed> {
        if self.l4_offset > MAX_HEADER_OFFSET {
            return Err(Malformed);
        }
        Ok(self)
    }

    #[inline(always)]
    pub(super) fn layout(&self) -> Layout {
        Layout {
            l4_offset: self.l4_offset,
            ip_end: self.ip_end,
            fragment: self.fragment,
            fragment_id: self.fragment_id,
        }
    }

    /// Whether the packet carries the L4 header (later fragments do not).
    #[inline(always)]
    pub(super) fn has_ports(&self) -> bool {
        self.fragment != fragment::LATER
    }
}

/// The IPv4 header at `offset`, read field by field.
#[inline(always)]
pub(super) fn parse_ipv4(ctx: &TcContext, offset: usize) -> Result<IpHeader, Malformed> {
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
pub(super) fn parse_ipv6(
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
        src,
        dst,
        l4_offset,
        ip_end,
        protocol,
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
pub(super) fn octets(words: [u64; 2]) -> [u8; 16] {
    // SAFETY: both types are 16 plain bytes with no invalid bit patterns.
    unsafe { core::mem::transmute::<[u64; 2], [u8; 16]>(words) }
}
