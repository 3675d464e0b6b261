//! The whole classifier, frame in, verdict and counter reason out: a model of `enforce()` in
//! `ebpf/netwarden-ebpf/src/verdict.rs` with the parser of `packet.rs`, the conntrack table of
//! `conntrack.rs` and the fragment table of `fragments.rs`, over [`Maps`].
//!
//! [`Maps::verdict`] is the decision on a parsed packet; this module is what comes before and
//! after it: which frames are IP packets at all, the flow a packet belongs to as the endpoint
//! sees it, whether it may open a flow, what conntrack holds for it (and for the packet an ICMP
//! error quotes), and what the verdict leaves in the two tables. The kernel's tables are LRU
//! maps; [`Tables`] never forgets, so it models them only while they are not full.
//!
//! Not modelled: `__sk_buff.vlan_present` (a tag the kernel took off before TC: it cannot be
//! set through `BPF_PROG_TEST_RUN` either), the mTLS screen (frames of mTLS-strict pods), and
//! flows decided after translation (`flow_activity::TRANSLATED`, `FRONTENDS`).
//!
//! The differential test in `netwarden-datapath/tests/packet_differential.rs` runs random and
//! mutated frames through the real programs and through [`Maps::classify`].

use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, Ipv6Addr},
};

use netwarden_common::{
    FRAGMENT_LIFETIME_NS, FlowKey, FlowKeyV4, FragmentKey, counter, direction as dir,
};

use crate::{
    lookup::{Conntrack, ConntrackChange, Maps, Opening, Outcome, Packet, Verdict},
    state::Direction,
};

/// No header the classifier reads lies further into a frame than this (`MAX_HEADER_OFFSET`).
const MAX_HEADER_OFFSET: usize = 1024;
const ETH_HEADER_LEN: usize = 14;
const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_ARP: u16 = 0x0806;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
const ETH_P_QINQ: u16 = 0x9100;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_SCTP: u8 = 132;
/// IPv6 extension headers the parser walks, and how many at most.
const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AUTH: u8 = 51;
const IPV6_DEST_OPTS: u8 = 60;
const IPV6_MAX_EXTENSION_HEADERS: usize = 6;
/// The port an ICMP message other than an echo is keyed under, its type in the low byte.
const ICMP_INFORMATIONAL_PORT: u16 = 0x100;
const ICMPV6_NEIGHBOUR_SOLICITATION: u8 = 135;
const ICMPV6_NEIGHBOUR_ADVERTISEMENT: u8 = 136;
const TCP_FLAG_FIN: u8 = 0x01;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_RST: u8 = 0x04;
const TCP_FLAG_ACK: u8 = 0x10;

/// Which part of its datagram a packet is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fragment {
    /// Not a fragment (IPv6 atomic fragments included).
    Whole,
    /// Offset 0, more to come: carries the ports.
    First,
    /// A later fragment: no ports.
    Later,
}

/// What the parser makes of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// ARP.
    Arp,
    /// A VLAN tag in the frame.
    Tagged,
    /// An ethertype other than IPv4, IPv6 and ARP.
    OtherEthertype,
    /// Neighbour discovery or MLD from a link-local or unspecified source.
    NetworkControl,
    /// A header the parser could not read.
    Malformed,
    /// An IP packet: its flow from the pod's side.
    Flow(ParsedFlow),
}

/// An IP packet as the parser hands it on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParsedFlow {
    /// Its flow as the endpoint sees it.
    pub flow: FlowKey,
    /// What it may do.
    pub opening: ParsedOpening,
    /// Which part of its datagram it is.
    pub fragment: Fragment,
    /// The datagram's identification (fragments only).
    pub fragment_id: u32,
    /// Where its transport header starts.
    pub l4_offset: usize,
}

/// [`Opening`] before conntrack was asked about an ICMP error's quoted packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParsedOpening {
    /// May open a flow.
    Opens,
    /// May not.
    Continues,
    /// May not, and tells conntrack the connection is closing: a TCP FIN or RST.
    Closes,
    /// A neighbour solicitation or advertisement from a non-link-local source.
    Neighbour,
    /// An ICMP error.
    IcmpError,
}

/// One direction's tracked flow, as `CONNTRACK_V4`/`CONNTRACK_V6` hold it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrackedFlow {
    /// The direction of the packet that opened it.
    pub origin: Direction,
    /// The policy epoch it was last allowed under.
    pub epoch: u32,
    /// A TCP FIN or RST of the flow passed (`flow_activity::CLOSING`).
    pub closing: bool,
}

/// A conntrack key: IPv4 flows in a table of their own, keyed by 4-byte addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConntrackKey {
    /// A `CONNTRACK_V4` key.
    V4(FlowKeyV4),
    /// A `CONNTRACK_V6` key.
    V6(FlowKey),
}

impl ConntrackKey {
    /// The key `flow` is tracked under, as `conntrack::entry` picks the table.
    #[must_use]
    pub fn of(flow: &FlowKey) -> Self {
        flow.ipv4().map_or(Self::V6(*flow), Self::V4)
    }
}

/// What the programs keep between packets: conntrack, the first fragments that passed, and the
/// policy epoch the agent last set.
#[derive(Clone, Debug, Default)]
pub struct Tables {
    /// Tracked flows.
    pub conntrack: HashMap<ConntrackKey, TrackedFlow>,
    /// First fragments that passed: until when (ns of the monotonic clock) their datagram's
    /// later fragments pass.
    pub fragments: HashMap<FragmentKey, u64>,
    /// The policy epoch (`EPOCH`).
    pub epoch: u32,
}

impl Tables {
    /// What the agent does after an apply that changed anything: every tracked flow is decided
    /// again at its next packet.
    pub fn bump_epoch(&mut self) {
        self.epoch = self.epoch.wrapping_add(1);
    }
}

/// The classifier's answer for one frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Classified {
    /// What the parser made of the frame.
    pub parsed: Parsed,
    /// Whether it passes.
    pub verdict: Verdict,
    /// The counter reason.
    pub reason: u32,
    /// What it did to conntrack.
    pub conntrack: ConntrackChange,
    /// For a later fragment whose first fragment passed: how long its entry had left to live
    /// (negative: expired), so a caller timing the kernel from outside knows when the two
    /// clocks may disagree.
    pub fragment_time_left_ns: Option<i128>,
}

impl fmt::Display for Classified {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let label = counter::reason(self.reason).map_or("unknown", |reason| reason.label);
        write!(f, "{:?} {label} ({:?})", self.verdict, self.conntrack)
    }
}

impl Maps<'_> {
    /// What the program on the veth at `ifindex` does with `frame` going `direction`, at
    /// `now_ns` on the monotonic clock (`bpf_ktime_get_ns`), given and updating `tables`.
    pub fn classify(
        &self,
        tables: &mut Tables,
        frame: &[u8],
        direction: Direction,
        ifindex: u32,
        now_ns: u64,
    ) -> Classified {
        let parsed = parse(frame, direction, ifindex);
        let simple = |verdict, reason| Classified {
            parsed,
            verdict,
            reason,
            conntrack: ConntrackChange::None,
            fragment_time_left_ns: None,
        };
        let packet = match parsed {
            Parsed::Arp | Parsed::NetworkControl => {
                return simple(Verdict::Pass, counter::ALLOWED_NETWORK_CONTROL);
            }
            Parsed::Tagged => return simple(Verdict::Drop, counter::DENIED_VLAN),
            Parsed::OtherEthertype => return simple(Verdict::Drop, counter::DENIED_ETHERTYPE),
            Parsed::Malformed => return simple(Verdict::Drop, counter::DENIED_MALFORMED),
            Parsed::Flow(packet) => packet,
        };
        let fragment_key = fragment_key(&packet.flow, direction, packet.fragment_id);
        if packet.fragment == Fragment::Later {
            let until = tables.fragments.get(&fragment_key).copied();
            let time_left = until.map(|until| i128::from(until) - i128::from(now_ns));
            let passes = time_left.is_some_and(|left| left >= 0);
            return Classified {
                fragment_time_left_ns: time_left,
                ..if passes {
                    simple(Verdict::Pass, counter::ALLOWED_FRAGMENT)
                } else {
                    simple(Verdict::Drop, counter::DENIED_FRAGMENT_UNKNOWN)
                }
            };
        }
        let key = ConntrackKey::of(&packet.flow);
        let opening = opening(tables, frame, &packet, direction, ifindex);
        let tracked = tables
            .conntrack
            .get(&key)
            .copied()
            .filter(|tracked| !reopened(tables, *tracked, &packet, direction, &key));
        let outcome: Outcome = self.verdict(&Packet {
            ifindex,
            direction,
            pod_address: IpAddr::V6(Ipv6Addr::from(packet.flow.pod_addr)),
            peer_address: IpAddr::V6(Ipv6Addr::from(packet.flow.peer_addr)),
            protocol: packet.flow.protocol,
            pod_port: packet.flow.pod_port,
            peer_port: packet.flow.peer_port,
            opening,
            conntrack: match tracked {
                None => Conntrack::Untracked,
                Some(tracked) if tracked.epoch == tables.epoch => Conntrack::CurrentEpoch,
                Some(tracked) => Conntrack::OlderEpoch {
                    opened: tracked.origin,
                },
            },
        });
        match outcome.conntrack {
            ConntrackChange::None => {
                // A FIN or RST that passed on its tracked flow marks it closing.
                if outcome.verdict == Verdict::Pass
                    && packet.opening == ParsedOpening::Closes
                    && let Some(tracked) = tables.conntrack.get_mut(&key)
                {
                    tracked.closing = true;
                }
            }
            ConntrackChange::Created | ConntrackChange::Renewed => {
                let origin = tracked.map_or(direction, |tracked| tracked.origin);
                let closing = tracked.is_some_and(|tracked| tracked.closing)
                    || packet.opening == ParsedOpening::Closes;
                tables.conntrack.insert(
                    key,
                    TrackedFlow {
                        origin,
                        epoch: tables.epoch,
                        closing,
                    },
                );
            }
            ConntrackChange::Removed => {
                tables.conntrack.remove(&key);
            }
        }
        if packet.fragment == Fragment::First && outcome.verdict == Verdict::Pass {
            tables
                .fragments
                .insert(fragment_key, now_ns + FRAGMENT_LIFETIME_NS);
        }
        Classified {
            parsed,
            verdict: outcome.verdict,
            reason: outcome.reason,
            conntrack: outcome.conntrack,
            fragment_time_left_ns: None,
        }
    }
}

/// Whether `packet` opens a new TCP connection over `tracked`, a closing one on the same
/// addresses and ports (`conntrack::reopened`): it is then decided as a new flow, unless it is
/// the same flow in every way its decision depends on, whose entry is only made new again.
fn reopened(
    tables: &mut Tables,
    tracked: TrackedFlow,
    packet: &ParsedFlow,
    direction: Direction,
    key: &ConntrackKey,
) -> bool {
    if packet.opening != ParsedOpening::Opens
        || packet.flow.protocol != IPPROTO_TCP
        || !tracked.closing
    {
        return false;
    }
    if tracked.epoch != tables.epoch || tracked.origin != direction {
        return true;
    }
    tables.conntrack.insert(
        *key,
        TrackedFlow {
            closing: false,
            ..tracked
        },
    );
    false
}

/// What `packet` may do, with conntrack asked about the packet an ICMP error quotes.
fn opening(
    tables: &Tables,
    frame: &[u8],
    packet: &ParsedFlow,
    direction: Direction,
    ifindex: u32,
) -> Opening {
    match packet.opening {
        ParsedOpening::Opens => Opening::Opens,
        ParsedOpening::Continues | ParsedOpening::Closes => Opening::Continues,
        ParsedOpening::Neighbour => Opening::Neighbour,
        ParsedOpening::IcmpError => {
            // The quoted packet travelled the other way.
            let quoted_direction = match direction {
                Direction::Egress => Direction::Ingress,
                Direction::Ingress => Direction::Egress,
            };
            let quoted = quoted_flow(
                frame,
                packet.flow.protocol,
                packet.l4_offset + 8,
                quoted_direction,
                ifindex,
            );
            Opening::IcmpError {
                quotes_tracked_flow: quoted.is_some_and(|quoted| {
                    tables.conntrack.contains_key(&ConntrackKey::of(&quoted))
                }),
            }
        }
    }
}

/// The key of the datagram a fragment of `flow` going `direction` belongs to.
fn fragment_key(flow: &FlowKey, direction: Direction, id: u32) -> FragmentKey {
    FragmentKey {
        ifindex: flow.ifindex,
        protocol: flow.protocol,
        direction: kernel_direction(direction) as u8,
        padding: 0,
        id,
        pod_addr: flow.pod_addr,
        peer_addr: flow.peer_addr,
    }
}

fn kernel_direction(direction: Direction) -> u32 {
    match direction {
        Direction::Ingress => dir::INGRESS,
        Direction::Egress => dir::EGRESS,
    }
}

/// `len` bytes of `frame` at `offset`, as `header_at` and `load` read them: all inside the
/// frame, or none.
fn bytes(frame: &[u8], offset: usize, len: usize) -> Option<&[u8]> {
    frame.get(offset..offset.checked_add(len)?)
}

fn u16_at(frame: &[u8], offset: usize) -> Option<u16> {
    bytes(frame, offset, 2).map(|two| u16::from_be_bytes([two[0], two[1]]))
}

/// What the IP header says (`ip.rs`).
#[derive(Clone, Copy, Debug)]
struct IpHeader {
    /// The ICMP of this IP version: ICMP in IPv4, `ICMPv6` in IPv6. The other one is a
    /// protocol without ports like any other.
    icmp: u8,
    src: [u8; 16],
    dst: [u8; 16],
    l4_offset: usize,
    protocol: u8,
    fragment: Fragment,
    fragment_id: u32,
}

impl IpHeader {
    fn has_ports(&self) -> bool {
        self.fragment != Fragment::Later
    }

    /// The flow of this packet with these ports, from the pod's side for `direction`.
    fn orient(&self, ifindex: u32, direction: Direction, src_port: u16, dst_port: u16) -> FlowKey {
        let (pod, peer) = match direction {
            Direction::Egress => ((self.src, src_port), (self.dst, dst_port)),
            Direction::Ingress => ((self.dst, dst_port), (self.src, src_port)),
        };
        FlowKey::new(ifindex, self.protocol, pod, peer)
    }
}

fn fragment_of(offset: u16, more: bool) -> Fragment {
    if offset != 0 {
        Fragment::Later
    } else if more {
        Fragment::First
    } else {
        Fragment::Whole
    }
}

fn ipv4_mapped(v4: &[u8]) -> [u8; 16] {
    let mut addr = [0; 16];
    addr[10] = 0xff;
    addr[11] = 0xff;
    addr[12..].copy_from_slice(v4);
    addr
}

/// The IPv4 header at `offset` (`parse_ipv4`).
fn parse_ipv4(frame: &[u8], offset: usize) -> Option<IpHeader> {
    let ip = bytes(frame, offset, 20)?;
    if ip[0] >> 4 != 4 {
        return None;
    }
    let header_len = usize::from(ip[0] & 0x0f) * 4;
    if header_len < 20 {
        return None;
    }
    let flags_and_offset = u16::from_be_bytes([ip[6], ip[7]]);
    Some(IpHeader {
        icmp: IPPROTO_ICMP,
        src: ipv4_mapped(&ip[12..16]),
        dst: ipv4_mapped(&ip[16..20]),
        l4_offset: offset + header_len,
        protocol: ip[9],
        fragment: fragment_of(flags_and_offset & 0x1fff, flags_and_offset & 0x2000 != 0),
        fragment_id: u32::from(u16::from_be_bytes([ip[4], ip[5]])),
    })
}

/// The IPv6 header at `offset`, walking up to `max_extension_headers` (`parse_ipv6`).
fn parse_ipv6(frame: &[u8], offset: usize, max_extension_headers: usize) -> Option<IpHeader> {
    let ip = bytes(frame, offset, 40)?;
    if ip[0] >> 4 != 6 {
        return None;
    }
    let mut header = IpHeader {
        icmp: IPPROTO_ICMPV6,
        src: ip[8..24].try_into().ok()?,
        dst: ip[24..40].try_into().ok()?,
        l4_offset: offset + 40,
        protocol: ip[6],
        fragment: Fragment::Whole,
        fragment_id: 0,
    };
    for _ in 0..max_extension_headers {
        match header.protocol {
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS | IPV6_AUTH => {
                let extension = bytes(frame, header.l4_offset, 2)?;
                let units = usize::from(extension[1]);
                let length = if header.protocol == IPV6_AUTH {
                    (units + 2) * 4
                } else {
                    (units + 1) * 8
                };
                header.protocol = extension[0];
                header.l4_offset += length;
            }
            IPV6_FRAGMENT => {
                let extension = bytes(frame, header.l4_offset, 8)?;
                let offset_field = u16::from_be_bytes([extension[2], extension[3]]);
                header.fragment_id =
                    u32::from_be_bytes([extension[4], extension[5], extension[6], extension[7]]);
                header.protocol = extension[0];
                header.fragment = fragment_of(offset_field >> 3, offset_field & 1 != 0);
                header.l4_offset += 8;
            }
            _ => break,
        }
    }
    Some(header)
}

/// `Some(true)` for an echo request, `Some(false)` for an echo reply (`icmp::echo`).
fn echo(protocol: u8, icmp_type: u8) -> Option<bool> {
    match (protocol, icmp_type) {
        (IPPROTO_ICMP, 8) | (IPPROTO_ICMPV6, 128) => Some(true),
        (IPPROTO_ICMP, 0) | (IPPROTO_ICMPV6, 129) => Some(false),
        _ => None,
    }
}

fn is_icmp_error(protocol: u8, icmp_type: u8) -> bool {
    if protocol == IPPROTO_ICMP {
        matches!(icmp_type, 3 | 11 | 12)
    } else {
        matches!(icmp_type, 1..=4)
    }
}

fn is_link_local_or_unspecified(address: &[u8; 16]) -> bool {
    (address[0] == 0xfe && address[1] & 0xc0 == 0x80) || *address == [0; 16]
}

/// Parses `frame` going `direction` on the veth at `ifindex` (`packet::parse`).
#[must_use]
pub fn parse(frame: &[u8], direction: Direction, ifindex: u32) -> Parsed {
    let Some(ethernet) = bytes(frame, 0, ETH_HEADER_LEN) else {
        return Parsed::Malformed;
    };
    let ethertype = u16::from_be_bytes([ethernet[12], ethernet[13]]);
    let header = match ethertype {
        ETH_P_IPV4 => parse_ipv4(frame, ETH_HEADER_LEN),
        ETH_P_IPV6 => parse_ipv6(frame, ETH_HEADER_LEN, IPV6_MAX_EXTENSION_HEADERS),
        ETH_P_ARP => return Parsed::Arp,
        ETH_P_8021Q | ETH_P_8021AD | ETH_P_QINQ => return Parsed::Tagged,
        _ => return Parsed::OtherEthertype,
    };
    let Some(header) = header.filter(|header| header.l4_offset <= MAX_HEADER_OFFSET) else {
        return Parsed::Malformed;
    };
    parse_transport(frame, &header, direction, ifindex).unwrap_or(Parsed::Malformed)
}

/// The ports of an IP packet and what it may do; `None` when its transport header is cut.
fn parse_transport(
    frame: &[u8],
    header: &IpHeader,
    direction: Direction,
    ifindex: u32,
) -> Option<Parsed> {
    let flow = |src_port, dst_port, opening| {
        Parsed::Flow(ParsedFlow {
            flow: header.orient(ifindex, direction, src_port, dst_port),
            opening,
            fragment: header.fragment,
            fragment_id: header.fragment_id,
            l4_offset: header.l4_offset,
        })
    };
    if !header.has_ports() {
        return Some(flow(0, 0, ParsedOpening::Opens));
    }
    match header.protocol {
        IPPROTO_ICMP | IPPROTO_ICMPV6 if header.protocol == header.icmp => {
            let icmp = bytes(frame, header.l4_offset, 8)?;
            let icmp_type = icmp[0];
            let informational = ICMP_INFORMATIONAL_PORT | u16::from(icmp_type);
            if header.protocol == IPPROTO_ICMPV6 && matches!(icmp_type, 130..=137 | 143) {
                if is_link_local_or_unspecified(&header.src) {
                    return Some(Parsed::NetworkControl);
                }
                let opening = if matches!(
                    icmp_type,
                    ICMPV6_NEIGHBOUR_SOLICITATION | ICMPV6_NEIGHBOUR_ADVERTISEMENT
                ) {
                    ParsedOpening::Neighbour
                } else {
                    ParsedOpening::Continues
                };
                return Some(flow(0, informational, opening));
            }
            if let Some(request) = echo(header.protocol, icmp_type) {
                let id = u16::from_be_bytes([icmp[4], icmp[5]]);
                let opening = if request {
                    ParsedOpening::Opens
                } else {
                    ParsedOpening::Continues
                };
                return Some(flow(id, id, opening));
            }
            let opening = if is_icmp_error(header.protocol, icmp_type) {
                ParsedOpening::IcmpError
            } else {
                ParsedOpening::Continues
            };
            Some(flow(0, informational, opening))
        }
        IPPROTO_TCP => {
            let tcp = bytes(frame, header.l4_offset, 14)?;
            let flags = tcp[13];
            // FIN and RST continue a connection too: they only tell the sweeper it is closing.
            let opening = if flags & (TCP_FLAG_SYN | TCP_FLAG_ACK) == TCP_FLAG_SYN {
                ParsedOpening::Opens
            } else if flags & (TCP_FLAG_FIN | TCP_FLAG_RST) != 0 {
                ParsedOpening::Closes
            } else {
                ParsedOpening::Continues
            };
            Some(flow(
                u16::from_be_bytes([tcp[0], tcp[1]]),
                u16::from_be_bytes([tcp[2], tcp[3]]),
                opening,
            ))
        }
        IPPROTO_UDP | IPPROTO_SCTP => Some(flow(
            u16_at(frame, header.l4_offset)?,
            u16_at(frame, header.l4_offset + 2)?,
            ParsedOpening::Opens,
        )),
        _ => Some(flow(0, 0, ParsedOpening::Opens)),
    }
}

/// The flow of the packet an ICMP error quotes at `offset`, as the endpoint at `ifindex` saw
/// it going `direction` (`packet::quoted_flow`).
fn quoted_flow(
    frame: &[u8],
    icmp_protocol: u8,
    offset: usize,
    direction: Direction,
    ifindex: u32,
) -> Option<FlowKey> {
    let header = if icmp_protocol == IPPROTO_ICMP {
        parse_ipv4(frame, offset)
    } else {
        // A quoted IPv6 packet's extension headers are not walked.
        parse_ipv6(frame, offset, 0)
    }
    .filter(|header| header.l4_offset <= MAX_HEADER_OFFSET && header.has_ports())?;
    let l4 = bytes(frame, header.l4_offset, 8)?;
    let (src_port, dst_port) = match header.protocol {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => (
            u16::from_be_bytes([l4[0], l4[1]]),
            u16::from_be_bytes([l4[2], l4[3]]),
        ),
        IPPROTO_ICMP | IPPROTO_ICMPV6
            if header.protocol == header.icmp && echo(header.protocol, l4[0]) == Some(true) =>
        {
            let id = u16::from_be_bytes([l4[4], l4[5]]);
            (id, id)
        }
        _ => return None,
    };
    Some(header.orient(ifindex, direction, src_port, dst_port))
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use netwarden_common::{FRAGMENT_LIFETIME_NS, counter};

    use super::{Fragment, Parsed, ParsedOpening, Tables, parse};
    use crate::{
        Compiler, Direction,
        lookup::{ConntrackChange, Maps, Verdict},
    };

    const POD: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    const PEER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
    const ROUTER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);

    fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, payload: &[u8]) -> Vec<u8> {
        let mut frame = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x08, 0x00];
        let total = u16::try_from(20 + payload.len()).expect("a small packet");
        frame.extend([0x45, 0]);
        frame.extend(total.to_be_bytes());
        frame.extend([0x42, 0x42, 0, 0, 64, protocol, 0, 0]);
        frame.extend(src.octets());
        frame.extend(dst.octets());
        frame.extend(payload);
        frame
    }

    fn udp(src_port: u16, dst_port: u16) -> Vec<u8> {
        let mut datagram = src_port.to_be_bytes().to_vec();
        datagram.extend(dst_port.to_be_bytes());
        datagram.extend([0, 8, 0, 0]);
        datagram
    }

    /// A pod on this node with no policy.
    fn compiler() -> Compiler {
        let yaml = "apiVersion: v1\nkind: Pod\nmetadata: {name: pod, namespace: x}\nspec: {nodeName: node-1, containers: [{name: c}]}\nstatus: {podIPs: [{ip: 10.0.0.1}]}\n";
        let (cluster, errors) = netwarden_model::cluster_of_stream("cluster.yaml", yaml);
        assert!(errors.is_empty(), "{errors:?}");
        let mut compiler = Compiler::new("node-1");
        compiler.sync(cluster);
        compiler
    }

    /// The maps with the pod placed on ifindex 1.
    fn placed(compiler: &Compiler) -> Maps<'_> {
        let mut maps = Maps::new(compiler.state(), false);
        let pod = compiler.state().endpoints.keys().next().expect("the pod");
        maps.place_endpoint(1, &pod.clone()).expect("a local pod");
        maps
    }

    #[test]
    fn the_other_ip_versions_icmp_is_a_protocol_without_ports() {
        let mut solicitation = vec![135, 0, 0, 0, 0, 0, 0, 0];
        solicitation.extend([0; 16]);
        let Parsed::Flow(flow) = parse(&ipv4(PEER, POD, 58, &solicitation), Direction::Ingress, 1)
        else {
            panic!("an IP packet");
        };
        assert_eq!(
            (flow.opening, flow.flow.pod_port, flow.flow.peer_port),
            (ParsedOpening::Opens, 0, 0)
        );
        let Parsed::Flow(echo) = parse(
            &ipv4(PEER, POD, 1, &[8, 0, 0, 0, 0x12, 0x34, 0, 1]),
            Direction::Ingress,
            1,
        ) else {
            panic!("an IP packet");
        };
        assert_eq!(
            (echo.opening, echo.flow.pod_port),
            (ParsedOpening::Opens, 0x1234)
        );
    }

    #[test]
    fn an_error_quoting_a_tracked_flow_passes_and_its_flow_is_tracked_by_its_ports() {
        let compiler = compiler();
        let maps = placed(&compiler);
        let mut tables = Tables::default();
        let query = ipv4(POD, PEER, 17, &udp(5353, 53));
        let opened = maps.classify(&mut tables, &query, Direction::Egress, 1, 0);
        assert_eq!(
            (opened.verdict, opened.reason, opened.conntrack),
            (
                Verdict::Pass,
                counter::ALLOWED_NOT_ISOLATED,
                ConntrackChange::Created
            )
        );
        let unreachable = |src_port: u16| {
            let mut icmp = vec![3, 3, 0, 0, 0, 0, 0, 0];
            icmp.extend(&ipv4(POD, PEER, 17, &udp(src_port, 53))[14..]);
            ipv4(ROUTER, POD, 1, &icmp)
        };
        let related = maps.classify(&mut tables, &unreachable(5353), Direction::Ingress, 1, 0);
        assert_eq!(related.reason, counter::ALLOWED_RELATED);
        let other = maps.classify(&mut tables, &unreachable(5354), Direction::Ingress, 1, 0);
        assert_eq!(
            other.reason,
            counter::ALLOWED_NOT_ISOLATED,
            "an ordinary packet"
        );
        tables.bump_epoch();
        let answer = ipv4(PEER, POD, 17, &udp(53, 5353));
        let renewed = maps.classify(&mut tables, &answer, Direction::Ingress, 1, 0);
        assert_eq!(
            (renewed.reason, renewed.conntrack),
            (counter::ALLOWED_TRACKED, ConntrackChange::Renewed)
        );
    }

    #[test]
    fn later_fragments_follow_a_first_fragment_that_passed_for_its_lifetime() {
        let compiler = compiler();
        let maps = placed(&compiler);
        let mut tables = Tables::default();
        let mut first = ipv4(POD, PEER, 17, &udp(5353, 53));
        first[14 + 6] = 0x20; // more fragments
        let mut later = ipv4(POD, PEER, 17, &[0; 8]);
        later[14 + 7] = 0x03; // offset 24
        assert!(matches!(
            parse(&later, Direction::Egress, 1),
            Parsed::Flow(flow) if flow.fragment == Fragment::Later
        ));
        let unknown = maps.classify(&mut tables, &later, Direction::Egress, 1, 10);
        assert_eq!(unknown.reason, counter::DENIED_FRAGMENT_UNKNOWN);
        maps.classify(&mut tables, &first, Direction::Egress, 1, 10);
        let follows = maps.classify(&mut tables, &later, Direction::Egress, 1, 20);
        assert_eq!(follows.reason, counter::ALLOWED_FRAGMENT);
        let expired = maps.classify(
            &mut tables,
            &later,
            Direction::Egress,
            1,
            11 + FRAGMENT_LIFETIME_NS,
        );
        assert_eq!(
            (expired.reason, expired.fragment_time_left_ns),
            (counter::DENIED_FRAGMENT_UNKNOWN, Some(-1))
        );
        let towards_pod = maps.classify(&mut tables, &later, Direction::Ingress, 1, 20);
        assert_eq!(
            towards_pod.reason,
            counter::DENIED_FRAGMENT_UNKNOWN,
            "another direction's datagram"
        );
    }

    #[test]
    fn frames_that_are_no_ip_packets_are_told_apart_before_any_lookup() {
        let ethernet = |ethertype: u16, payload: &[u8]| {
            let mut frame = vec![0; 12];
            frame.extend(ethertype.to_be_bytes());
            frame.extend(payload);
            frame
        };
        assert_eq!(
            parse(&ethernet(0x0806, &[0; 28]), Direction::Egress, 1),
            Parsed::Arp
        );
        assert_eq!(
            parse(&ethernet(0x8100, &[0; 28]), Direction::Egress, 1),
            Parsed::Tagged
        );
        assert_eq!(
            parse(&ethernet(0x88cc, &[0; 28]), Direction::Egress, 1),
            Parsed::OtherEthertype
        );
        assert_eq!(parse(&[0; 13], Direction::Egress, 1), Parsed::Malformed);
        let mut cut = ipv4(POD, PEER, 6, &[0; 13]);
        assert_eq!(parse(&cut, Direction::Egress, 1), Parsed::Malformed);
        cut.push(0x02);
        assert!(matches!(
            parse(&cut, Direction::Egress, 1),
            Parsed::Flow(flow) if flow.opening == ParsedOpening::Opens
        ));
    }
}
