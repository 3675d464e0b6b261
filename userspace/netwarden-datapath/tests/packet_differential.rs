//! The kernel's classifier against its model: random and mutated frames (every ethertype, VLAN
//! tags, IPv4 options, IPv6 extension chains, fragments, truncations, TCP flag combinations,
//! ICMP errors quoting tracked and untracked flows) run through the real programs with
//! `BPF_PROG_TEST_RUN` and through `netwarden_policy::lookup::Maps::classify`, over random
//! compiled states (`netwarden_policy::test_support`) and the conntrack and fragment contents
//! the earlier frames left. Both must give every frame the same verdict and counter reason, and
//! hold the same conntrack and fragment entries after every state.
//!
//! Seeded: `NETWARDEN_PACKET_SEED` (default below) and `NETWARDEN_PACKET_CASES` frames (default
//! 3,000; `cargo xtask test --thorough` runs 1,000,000). A failure prints the seed, the frame's
//! number, the frame in hex, the state and both answers; the same seed replays the same frames.
//!
//! Needs root (it loads programs and mounts a private bpffs); skipped with a message otherwise.

use std::{
    collections::{HashMap, HashSet},
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Instant,
};

use netwarden_common::{
    FragmentKey,
    counter::{self, Kind},
    flow_activity,
};
use netwarden_datapath::{Capacity, Datapath, TrackedFlows};
use netwarden_model::{Cluster, Enforcement};
use netwarden_policy::{
    Compiler, Direction,
    classify::{Classified, ConntrackKey, Tables},
    lookup::{Maps, Verdict},
    map_keys::unknown_endpoint,
    test_support::{LOCAL, NODE_ADDRESS, OTHER_NODE_ADDRESS, OUTSIDE, PORTS},
};
use proptest::{
    strategy::{Strategy as _, ValueTree as _},
    test_runner::{Config, RngAlgorithm, TestRng, TestRunner},
};

mod common;

use common::{IFINDEX, PrivateBpffs};

const DEFAULT_SEED: u64 = 0x6e77_7064_6966_6631;
const DEFAULT_CASES: u64 = 3_000;
/// Frames run under one compiled state before the next random one is applied (over the same
/// conntrack and fragment tables, whose flows the new epoch sends back through the decision).
const FRAMES_PER_STATE: u64 = 150;
/// Frames run by one loaded datapath: the kernel's tables are LRU maps that start evicting
/// before they are full, which the model's tables do not; a fresh datapath keeps them far from
/// it.
const FRAMES_PER_DATAPATH: u64 = 20_000;
/// A later fragment whose first fragment's entry expires this close to when it is run may be
/// judged on either side of the expiry by the kernel, whose clock the test reads only around
/// the run.
const FRAGMENT_CLOCK_MARGIN_NS: i128 = 50_000_000;
/// The first state of every loaded datapath, before the random ones: a dual-stack local pod
/// isolated both ways, reached by a remote pod on one port, reaching the outside on another.
const FIRST_CLUSTER: &str = r"
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: ns0, labels: {app: a}}
spec: {nodeName: node-1, containers: [{name: c, ports: [{name: http, containerPort: 80}]}]}
status: {podIPs: [{ip: 10.0.0.1}, {ip: 'fd00::1'}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: ns0, labels: {app: b}}
spec: {nodeName: node-2, containers: [{name: c}]}
status: {podIPs: [{ip: 10.0.0.2}, {ip: 'fd00::2'}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: server, namespace: ns0}
spec:
  podSelector: {matchLabels: {app: a}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from: [{podSelector: {matchLabels: {app: b}}}]
    ports: [{port: http}, {protocol: SCTP, port: 9000}]
  egress:
  - to: [{ipBlock: {cidr: 192.0.2.0/24}}, {ipBlock: {cidr: '2001:db8::/32'}}]
    ports: [{protocol: UDP, port: 53}, {port: 443}]
";
const ALLOW: i32 = -1;
const DENY: i32 = 2;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().map_or(default, |value| {
        let value = value.trim();
        value
            .strip_prefix("0x")
            .map_or_else(|| value.parse(), |hex| u64::from_str_radix(hex, 16))
            .unwrap_or_else(|error| panic!("{name}={value}: {error}"))
    })
}

/// `SplitMix64`: small, seeded, the same on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number below `bound` (not 0).
    fn below(&mut self, bound: usize) -> usize {
        (self.next() % bound as u64) as usize
    }

    /// True `percent` times in a hundred.
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }

    fn byte(&mut self) -> u8 {
        self.next() as u8
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.byte()).collect()
    }

    /// Fewer than `bound` random bytes.
    fn bytes_below(&mut self, bound: usize) -> Vec<u8> {
        let len = self.below(bound);
        self.bytes(len)
    }
}

fn monotonic_ns() -> u64 {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("the monotonic clock reads");
    u64::try_from(now.tv_sec()).expect("after boot") * 1_000_000_000
        + u64::try_from(now.tv_nsec()).expect("nanoseconds")
}

/// The addresses frames are made of: the endpoint's own, the cluster's pods and nodes, the
/// outside, and the odd ones (broadcast, multicast, link-local, unspecified, IPv4-mapped).
struct Addresses {
    own: Vec<IpAddr>,
    v4: Vec<IpAddr>,
    v6: Vec<IpAddr>,
}

impl Addresses {
    fn new(cluster: &Cluster, own: &[IpAddr]) -> Self {
        let mut all: Vec<IpAddr> = cluster
            .pods
            .values()
            .flat_map(|pod| pod.ips.clone())
            .collect();
        all.extend(OUTSIDE);
        all.extend([NODE_ADDRESS, OTHER_NODE_ADDRESS]);
        all.extend(
            [
                "10.0.0.200",
                "10.0.0.3",
                "224.0.0.9",
                "255.255.255.255",
                "0.0.0.0",
                "192.0.2.200",
                "fe80::1",
                "::",
                "ff02::1",
                "fd00::3",
                "2001:db8:1::9",
                "::ffff:10.0.0.1",
                "::ffff:172.18.0.2",
            ]
            .map(|text| text.parse::<IpAddr>().expect("a test address")),
        );
        Self {
            own: own.to_vec(),
            v4: all.iter().copied().filter(IpAddr::is_ipv4).collect(),
            v6: all.iter().copied().filter(IpAddr::is_ipv6).collect(),
        }
    }

    fn any(&self, rng: &mut Rng, v6: bool) -> IpAddr {
        if rng.chance(3) {
            return if v6 {
                IpAddr::V6(Ipv6Addr::from(
                    u128::from(rng.next()) << 64 | u128::from(rng.next()),
                ))
            } else {
                IpAddr::V4(Ipv4Addr::from(rng.next() as u32))
            };
        }
        rng.pick(if v6 { &self.v6 } else { &self.v4 })
    }

    /// Mostly the endpoint's own address of the family, when it has one.
    fn own(&self, rng: &mut Rng, v6: bool) -> IpAddr {
        let own: Vec<IpAddr> = self
            .own
            .iter()
            .copied()
            .filter(|own| own.is_ipv6() == v6)
            .collect();
        if own.is_empty() || rng.chance(15) {
            self.any(rng, v6)
        } else {
            rng.pick(&own)
        }
    }
}

/// A packet's L3/L4 identity, remembered so that later frames answer it, repeat it, or quote
/// it in an ICMP error.
#[derive(Clone, Copy, Debug)]
struct Sent {
    direction: Direction,
    src: IpAddr,
    dst: IpAddr,
    protocol: u8,
    src_port: u16,
    dst_port: u16,
}

impl Sent {
    fn reply(self) -> Self {
        Self {
            direction: opposite(self.direction),
            src: self.dst,
            dst: self.src,
            src_port: self.dst_port,
            dst_port: self.src_port,
            ..self
        }
    }
}

fn opposite(direction: Direction) -> Direction {
    match direction {
        Direction::Ingress => Direction::Egress,
        Direction::Egress => Direction::Ingress,
    }
}

fn octets(address: IpAddr) -> Vec<u8> {
    match address {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

fn ethernet(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    frame.extend(ethertype.to_be_bytes());
    frame.extend(payload);
    frame
}

/// How an IP header is laid out around its payload.
#[derive(Clone, Debug, Default)]
struct IpShape {
    /// IPv4 options, in 4-byte words (0 to 10).
    ipv4_option_words: usize,
    /// Fragment offset (bytes, a multiple of 8) and more-fragments bit.
    fragment: Option<(u16, bool)>,
    fragment_id: u32,
    /// IPv6 extension headers: (type, length field).
    extensions: Vec<(u8, u8)>,
}

fn ip_packet(
    rng: &mut Rng,
    src: IpAddr,
    dst: IpAddr,
    protocol: u8,
    shape: &IpShape,
    payload: &[u8],
) -> Vec<u8> {
    if src.is_ipv4() {
        let header_len = 20 + 4 * shape.ipv4_option_words;
        let total = u16::try_from(header_len + payload.len()).unwrap_or(u16::MAX);
        let mut packet = vec![0x40 | (header_len / 4) as u8, 0];
        packet.extend(total.to_be_bytes());
        packet.extend((shape.fragment_id as u16).to_be_bytes());
        let (offset, more) = shape.fragment.unwrap_or((0, false));
        packet.extend(((offset / 8) | if more { 0x2000 } else { 0 }).to_be_bytes());
        packet.extend([64, protocol, 0, 0]);
        packet.extend(octets(src));
        packet.extend(octets(dst));
        for _ in 0..shape.ipv4_option_words {
            // NOP, end of options, router alert, or garbage: the parser skips them all.
            packet.extend(rng.pick(&[[1, 1, 1, 1], [0, 0, 0, 0], [148, 4, 0, 0], [7, 7, 4, 0]]));
        }
        packet.extend(payload);
        return packet;
    }
    let mut extensions = shape.extensions.clone();
    // A fragment of IPv6 needs a fragment header; the chain may hold one already.
    if shape.fragment.is_some() && !extensions.iter().any(|(kind, _)| *kind == 44) {
        extensions.push((44, 0));
    }
    let mut chain = Vec::new();
    let mut next = protocol;
    for (kind, length) in extensions.iter().rev() {
        let mut header = vec![next, *length];
        match kind {
            44 => {
                let (offset, more) = shape.fragment.unwrap_or((0, false));
                header.extend((offset | u16::from(more)).to_be_bytes());
                header.extend(shape.fragment_id.to_be_bytes());
            }
            51 => header.resize((usize::from(*length) + 2) * 4, 0),
            _ => header.resize((usize::from(*length) + 1) * 8, 1),
        }
        chain.splice(0..0, header);
        next = *kind;
    }
    let total = u16::try_from(chain.len() + payload.len()).unwrap_or(u16::MAX);
    let mut packet = vec![0x60, 0, 0, 0];
    packet.extend(total.to_be_bytes());
    packet.extend([next, 64]);
    packet.extend(octets(src));
    packet.extend(octets(dst));
    packet.extend(chain);
    packet.extend(payload);
    packet
}

fn ethertype_of(address: IpAddr) -> u16 {
    if address.is_ipv4() { 0x0800 } else { 0x86dd }
}

/// Frames from a seeded generator, shaped around one compiled state.
struct Frames {
    rng: Rng,
    sent: Vec<Sent>,
}

const TCP_FLAGS: [u8; 10] = [0x02, 0x12, 0x10, 0x11, 0x04, 0x14, 0x18, 0x00, 0xff, 0x03];

impl Frames {
    /// A transport header of `protocol` with these ports (ICMP: the echo identifier), or a
    /// random payload for a protocol without ports.
    fn transport(&mut self, protocol: u8, src_port: u16, dst_port: u16) -> Vec<u8> {
        let rng = &mut self.rng;
        let mut l4 = Vec::new();
        match protocol {
            6 => {
                l4.extend(src_port.to_be_bytes());
                l4.extend(dst_port.to_be_bytes());
                l4.extend([0, 0, 0, 1, 0, 0, 0, 0, 0x50]);
                l4.push(if rng.chance(10) {
                    rng.byte()
                } else {
                    rng.pick(&TCP_FLAGS)
                });
                l4.extend([0xff, 0xff, 0, 0, 0, 0]);
            }
            17 | 132 => {
                l4.extend(src_port.to_be_bytes());
                l4.extend(dst_port.to_be_bytes());
                l4.extend([0, 12, 0, 0]);
                l4.extend(rng.bytes_below(12));
            }
            // Types by the protocol number, whatever the IP version: neighbour solicitations in
            // IPv4 packets of protocol 58 are what showed the parser took them for ICMPv6.
            1 | 58 => {
                let types: &[u8] = if protocol == 1 {
                    &[8, 0, 13, 14, 9, 10, 5, 3, 11, 12, 42]
                } else {
                    &[
                        128, 129, 133, 134, 135, 136, 137, 130, 131, 132, 143, 1, 2, 3, 4, 200,
                    ]
                };
                l4.push(rng.pick(types));
                l4.push(rng.byte() & 3);
                l4.extend([0, 0]);
                l4.extend(src_port.to_be_bytes());
                l4.extend([0, 1]);
                l4.extend(rng.bytes_below(24));
            }
            _ => l4.extend(rng.bytes_below(24)),
        }
        l4
    }

    fn shape(&mut self, v6: bool) -> IpShape {
        let rng = &mut self.rng;
        let mut shape = IpShape {
            fragment_id: rng.pick(&[1, 2, 3, 0x4242]),
            ..IpShape::default()
        };
        if !v6 && rng.chance(15) {
            shape.ipv4_option_words = rng.below(11);
        }
        if v6 && rng.chance(25) {
            for _ in 0..=rng.below(8) {
                let kind = rng.pick(&[0, 43, 60, 51, 44]);
                shape.extensions.push((kind, rng.pick(&[0, 0, 1, 2])));
            }
        }
        if rng.chance(15) {
            shape.fragment = Some(if rng.chance(50) {
                (0, true)
            } else {
                (8 * (1 + rng.below(200) as u16), rng.chance(50))
            });
        }
        shape
    }

    /// A new flow's first packet, or one of a flow a recent frame belongs to.
    fn ip_flow(&mut self, addresses: &Addresses) -> Sent {
        if !self.sent.is_empty() && self.rng.chance(45) {
            let recent = self.sent[self.sent.len() - 1 - self.rng.below(self.sent.len().min(16))];
            return if self.rng.chance(60) {
                recent.reply()
            } else {
                recent
            };
        }
        let rng = &mut self.rng;
        let v6 = rng.chance(40);
        let direction = if rng.chance(50) {
            Direction::Egress
        } else {
            Direction::Ingress
        };
        let (own, peer) = (addresses.own(rng, v6), addresses.any(rng, v6));
        let (src, dst) = match direction {
            Direction::Egress => (own, peer),
            Direction::Ingress => (peer, own),
        };
        let protocol = rng.pick(&[6, 6, 6, 17, 17, 132, 1, 58, 47, 255, 0]);
        let protocol = match (protocol, v6) {
            (1, true) if rng.chance(80) => 58,
            (58, false) if rng.chance(80) => 1,
            _ => protocol,
        };
        let ephemeral = rng.pick(&[40000, 40001, 5353, 1]);
        let port = if rng.chance(10) {
            rng.next() as u16
        } else {
            rng.pick(&PORTS)
        };
        let (src_port, dst_port) = if rng.chance(80) {
            (ephemeral, port)
        } else {
            (port, ephemeral)
        };
        Sent {
            direction,
            src,
            dst,
            protocol,
            src_port,
            dst_port,
        }
    }

    /// The next frame and the direction it goes.
    fn next(&mut self, addresses: &Addresses) -> (Vec<u8>, Direction) {
        let roll = self.rng.below(100);
        let (mut frame, direction) = match roll {
            0..=4 => (ethernet(0x0806, &self.rng.bytes(28)), self.direction()),
            5..=9 => {
                let tag = self.rng.pick(&[0x8100, 0x88a8, 0x9100]);
                let flow = self.ip_flow(addresses);
                let inner = self.ip_frame(flow);
                let mut tagged = vec![0, 0];
                tagged.extend(&inner[12..]);
                (ethernet(tag, &tagged), flow.direction)
            }
            10..=13 => {
                let ethertype = self
                    .rng
                    .pick(&[0x88cc, 0x8863, 0x0026, 0x86dc, 0x0801, 0x8847]);
                let payload = {
                    let mut payload = self.rng.bytes(20);
                    payload.extend(self.rng.bytes_below(40));
                    payload
                };
                (ethernet(ethertype, &payload), self.direction())
            }
            14..=23 => self.icmp_error(addresses),
            _ => {
                let flow = self.ip_flow(addresses);
                (self.ip_frame(flow), flow.direction)
            }
        };
        self.mutate(&mut frame);
        (frame, direction)
    }

    fn direction(&mut self) -> Direction {
        if self.rng.chance(50) {
            Direction::Egress
        } else {
            Direction::Ingress
        }
    }

    fn ip_frame(&mut self, flow: Sent) -> Vec<u8> {
        let v6 = flow.src.is_ipv6();
        let l4 = self.transport(flow.protocol, flow.src_port, flow.dst_port);
        let shape = self.shape(v6);
        let packet = ip_packet(
            &mut self.rng,
            flow.src,
            flow.dst,
            flow.protocol,
            &shape,
            &l4,
        );
        self.sent.push(flow);
        if self.sent.len() > 64 {
            self.sent.remove(0);
        }
        ethernet(ethertype_of(flow.src), &packet)
    }

    /// An ICMP error about a recent packet (its flow tracked or not), going back the other way.
    fn icmp_error(&mut self, addresses: &Addresses) -> (Vec<u8>, Direction) {
        let quoted = if self.sent.is_empty() || self.rng.chance(20) {
            self.ip_flow(addresses)
        } else {
            self.sent[self.sent.len() - 1 - self.rng.below(self.sent.len().min(16))]
        };
        let v6 = quoted.src.is_ipv6();
        let mut quoted_l4 = Vec::new();
        quoted_l4.extend(quoted.src_port.to_be_bytes());
        quoted_l4.extend(quoted.dst_port.to_be_bytes());
        quoted_l4.extend([0, 0, 0, 1]);
        if matches!(quoted.protocol, 1 | 58) {
            let request = if quoted.protocol == 1 { 8 } else { 128 };
            quoted_l4 = vec![request, 0, 0, 0];
            quoted_l4.extend(quoted.src_port.to_be_bytes());
            quoted_l4.extend([0, 1]);
        }
        let shape = IpShape {
            ipv4_option_words: if self.rng.chance(10) { 2 } else { 0 },
            ..IpShape::default()
        };
        let mut quoted_packet = ip_packet(
            &mut self.rng,
            quoted.src,
            quoted.dst,
            quoted.protocol,
            &shape,
            &quoted_l4,
        );
        if self.rng.chance(15) {
            let cut = self.rng.below(quoted_packet.len());
            quoted_packet.truncate(cut);
        }
        let (kind, code) = if v6 {
            (self.rng.pick(&[1, 2, 3, 4]), 0)
        } else {
            (self.rng.pick(&[3, 3, 11, 12]), self.rng.pick(&[1, 3, 4]))
        };
        let mut icmp = vec![kind, code, 0, 0, 0, 0, 0x05, 0xdc];
        icmp.extend(quoted_packet);
        // From the quoted packet's destination or a router on the way, to its source.
        let src = if self.rng.chance(50) {
            quoted.dst
        } else {
            addresses.any(&mut self.rng, v6)
        };
        let protocol = if v6 { 58 } else { 1 };
        let shape = if self.rng.chance(10) {
            self.shape(v6)
        } else {
            IpShape::default()
        };
        let packet = ip_packet(&mut self.rng, src, quoted.src, protocol, &shape, &icmp);
        (
            ethernet(ethertype_of(src), &packet),
            opposite(quoted.direction),
        )
    }

    /// Truncations, flipped bytes, a wrong length field, padding.
    fn mutate(&mut self, frame: &mut Vec<u8>) {
        let rng = &mut self.rng;
        if rng.chance(8) {
            let keep = 14 + rng.below(frame.len() - 13);
            frame.truncate(keep);
        }
        if rng.chance(6) {
            for _ in 0..=rng.below(3) {
                let at = 14 + rng.below(frame.len().saturating_sub(14).max(1));
                if at < frame.len() {
                    frame[at] ^= 1 << rng.below(8);
                }
            }
        }
        if rng.chance(3) && frame.len() > 18 {
            frame[16] = rng.byte();
            frame[17] = rng.byte();
        }
        if rng.chance(4) {
            frame.extend(rng.bytes_below(40));
        }
    }
}

fn hex(frame: &[u8]) -> String {
    let mut text = String::new();
    for byte in frame {
        write!(text, "{byte:02x}").expect("writing to a String");
    }
    text
}

/// Whether `BPF_PROG_TEST_RUN` refuses `frame` (`EINVAL`) rather than running the program on
/// it: an IPv4 or IPv6 ethertype with less than the IP header behind it.
fn test_run_refuses(frame: &[u8]) -> bool {
    match u16::from_be_bytes([frame[12], frame[13]]) {
        0x0800 => frame.len() < 14 + 20,
        0x86dd => frame.len() < 14 + 40,
        _ => false,
    }
}

/// What the kernel said of one frame: its verdict and the one reason counted for it.
#[derive(Debug, PartialEq, Eq)]
struct KernelAnswer {
    verdict: i32,
    reason: Option<u32>,
    direction: Option<u32>,
}

fn kernel_direction(direction: Direction) -> u32 {
    match direction {
        Direction::Ingress => netwarden_common::direction::INGRESS,
        Direction::Egress => netwarden_common::direction::EGRESS,
    }
}

/// The one packet counter that moved between two reads (event accounting aside).
fn counted(before: &[u64], after: &[u64]) -> Result<(u32, u32), String> {
    let moved: Vec<(u32, u32, u64)> = (0..counter::SLOTS)
        .filter_map(|slot| {
            let delta = after[slot as usize] - before[slot as usize];
            let (direction, reason) = (slot / counter::COUNT, slot % counter::COUNT);
            let kind = counter::reason(reason).map(|reason| reason.kind);
            (delta != 0 && kind != Some(Kind::EventAccounting))
                .then_some((direction, reason, delta))
        })
        .collect();
    match moved[..] {
        [(direction, reason, 1)] => Ok((direction, reason)),
        _ => Err(format!("counters moved: {moved:?}")),
    }
}

/// One loaded datapath and the model of the kernel tables it holds.
struct Run {
    datapath: Option<Datapath>,
    _bpffs: PrivateBpffs,
}

impl Drop for Run {
    fn drop(&mut self) {
        // The programs and maps go before the bpffs they are pinned in.
        drop(self.datapath.take());
    }
}

#[derive(Default)]
struct Tally {
    frames: u64,
    states: u64,
    mismatches: u64,
    refused: u64,
    clock_ambiguous: u64,
    reasons: std::collections::BTreeMap<&'static str, u64>,
    report: String,
}

impl Tally {
    fn count(&mut self, reason: u32) {
        let label = counter::reason(reason).map_or("unknown", |reason| reason.label);
        *self.reasons.entry(label).or_default() += 1;
    }

    fn tables_differ(&mut self, seed: u64, endpoint: &str, difference: &str) {
        self.mismatches += 1;
        writeln!(
            self.report,
            "--- after frame {} of seed {seed:#x} ({endpoint}): the kernel's tables are not the \
             model's: {difference}",
            self.frames - 1
        )
        .expect("writing to a String");
    }
}

#[test]
fn the_kernel_classifier_gives_every_frame_the_verdict_and_reason_of_its_model() {
    let seed = env_u64("NETWARDEN_PACKET_SEED", DEFAULT_SEED);
    let cases = env_u64("NETWARDEN_PACKET_CASES", DEFAULT_CASES);
    let started = Instant::now();
    let mut rng = Rng(seed);
    let mut tally = Tally::default();
    while tally.frames < cases {
        let Some(bpffs) = PrivateBpffs::new() else {
            return;
        };
        let (mut datapath, _) = Datapath::open(bpffs.path(), &Capacity::default())
            .unwrap_or_else(|error| panic!("loading the datapath: {error}"));
        datapath.detached();
        let mut run = Run {
            datapath: Some(datapath),
            _bpffs: bpffs,
        };
        run_datapath(&mut run, &mut rng, seed, cases, &mut tally);
    }
    eprintln!(
        "packet differential: seed {seed:#x}, {} frames over {} states in {:.1?}: {} refused by \
         BPF_PROG_TEST_RUN, {} too close to a fragment's expiry to judge, {} mismatches; \
         reasons {:?}",
        tally.frames,
        tally.states,
        started.elapsed(),
        tally.refused,
        tally.clock_ambiguous,
        tally.mismatches,
        tally.reasons
    );
    assert_eq!(
        tally.mismatches, 0,
        "the kernel and its model disagree (replay: NETWARDEN_PACKET_SEED={seed:#x} \
         NETWARDEN_PACKET_CASES={cases}):\n{}",
        tally.report
    );
}

/// Frames through one loaded datapath, state after state, until it has run its share.
fn run_datapath(run: &mut Run, rng: &mut Rng, seed: u64, cases: u64, tally: &mut Tally) {
    let mut compiler = Compiler::new(LOCAL);
    compiler.set_node_addresses(&[NODE_ADDRESS]);
    let mut tables = Tables::default();
    let first_frame = tally.frames;
    while tally.frames < cases && tally.frames - first_frame < FRAMES_PER_DATAPATH {
        let cluster = if tally.frames == first_frame {
            common::cluster_from(FIRST_CLUSTER)
        } else {
            random_cluster(rng)
        };
        let state = compiler.sync(cluster.clone());
        let mut maps = Maps::new(state, false);
        let (own, description) = place_endpoint(rng, state, &mut maps);
        let network = common::loopback_node(&own);
        let report = run
            .datapath
            .as_mut()
            .expect("present until drop")
            .apply(state, &network);
        let datapath = run.datapath.as_ref().expect("present until drop");
        assert!(
            report.errors.is_empty(),
            "apply errors: {:?}",
            report.errors
        );
        assert_eq!(
            report.endpoints.len(),
            usize::from(!own.is_empty()),
            "{report:?}"
        );
        if report.changed {
            tables.bump_epoch();
        }
        tally.states += 1;
        let addresses = Addresses::new(&cluster, &own);
        let mut frames = Frames {
            rng: Rng(rng.next()),
            sent: Vec::new(),
        };
        let mut counters = datapath.verdicts();
        for _ in 0..FRAMES_PER_STATE {
            if tally.frames >= cases {
                break;
            }
            let (frame, direction) = frames.next(&addresses);
            let now = monotonic_ns();
            let before = tables.clone();
            let kernel = datapath.test_run(direction == Direction::Ingress, &frame, IFINDEX, 1);
            let number = tally.frames;
            tally.frames += 1;
            let Ok((verdict, _)) = kernel else {
                // The kernel builds no skb of an IP ethertype without the whole IP header: no
                // program runs. Any other refusal is a failure of the test itself.
                assert!(
                    test_run_refuses(&frame),
                    "BPF_PROG_TEST_RUN refused frame {number} of seed {seed:#x}: {kernel:?}\n{}",
                    hex(&frame)
                );
                tally.refused += 1;
                continue;
            };
            let after = datapath.verdicts();
            let moved = counted(&counters, &after);
            counters = after;
            let model = maps.classify(&mut tables, &frame, direction, IFINDEX, now);
            tally.count(model.reason);
            if model
                .fragment_time_left_ns
                .is_some_and(|left| left.abs() < FRAGMENT_CLOCK_MARGIN_NS)
            {
                tally.clock_ambiguous += 1;
                continue;
            }
            let (kernel, expected) = answers(verdict, moved.as_ref().ok(), &model, direction);
            if kernel != expected {
                tally.mismatches += 1;
                if tally.mismatches <= 5 {
                    describe_mismatch(
                        &mut tally.report,
                        seed,
                        number,
                        &frame,
                        direction,
                        &description,
                        &cluster,
                        &before,
                        &model,
                        &kernel,
                        moved.err(),
                    );
                }
            }
        }
        if let Err(difference) = same_tables(datapath, &tables) {
            tally.tables_differ(seed, &description, &difference);
        }
    }
}

/// Whether the kernel's conntrack holds the flows the model's does, each opened in the same
/// direction and last allowed under the same epoch, and its fragment table the same datagrams.
fn same_tables(datapath: &Datapath, tables: &Tables) -> Result<(), String> {
    let TrackedFlows { ipv4, ipv6 } = datapath
        .conntrack_entries()
        .map_err(|error| format!("reading conntrack: {error}"))?;
    let kernel: HashMap<ConntrackKey, (u32, u32)> = ipv4
        .into_iter()
        .map(|(key, state)| (ConntrackKey::V4(key), state))
        .chain(
            ipv6.into_iter()
                .map(|(key, state)| (ConntrackKey::V6(key), state)),
        )
        .map(|(key, state)| {
            // Neither the mTLS screen nor the hook after translation has a say here.
            assert_eq!(
                (state.flags, state.activity & flow_activity::TRANSLATED),
                (0, 0),
                "{key:?}: {state:?}"
            );
            (key, (state.origin, state.epoch))
        })
        .collect();
    let model: HashMap<ConntrackKey, (u32, u32)> = tables
        .conntrack
        .iter()
        .map(|(key, tracked)| (*key, (kernel_direction(tracked.origin), tracked.epoch)))
        .collect();
    if kernel != model {
        let only_kernel: Vec<_> = kernel
            .iter()
            .filter(|(key, value)| model.get(key) != Some(value))
            .take(5)
            .collect();
        let only_model: Vec<_> = model
            .iter()
            .filter(|(key, value)| kernel.get(key) != Some(value))
            .take(5)
            .collect();
        return Err(format!(
            "conntrack: {} flows in the kernel, {} in the model; the kernel's that differ \
             (origin, epoch): {only_kernel:?}; the model's: {only_model:?}",
            kernel.len(),
            model.len()
        ));
    }
    let fragments = datapath
        .fragment_entries()
        .map_err(|error| format!("reading the fragment table: {error}"))?;
    let kernel: HashSet<FragmentKey> = fragments.into_iter().map(|(key, _)| key).collect();
    let model: HashSet<FragmentKey> = tables.fragments.keys().copied().collect();
    if kernel != model {
        return Err(format!(
            "fragments: the kernel's alone {:?}; the model's alone {:?}",
            kernel.difference(&model).take(5).collect::<Vec<_>>(),
            model.difference(&kernel).take(5).collect::<Vec<_>>()
        ));
    }
    Ok(())
}

/// Which endpoint the loopback is: a local pod (mostly), a pod the agent does not know, or
/// none. Its addresses, and what it is in words.
fn place_endpoint(
    rng: &mut Rng,
    state: &netwarden_policy::DatapathState,
    maps: &mut Maps<'_>,
) -> (Vec<IpAddr>, String) {
    let local_pods: Vec<_> = state.endpoints.keys().cloned().collect();
    let roll = rng.below(100);
    if roll < 70 && !local_pods.is_empty() {
        let pod = local_pods[rng.below(local_pods.len())].clone();
        maps.place_endpoint(IFINDEX, &pod).expect("a local pod");
        (
            state.endpoints[&pod].ips.clone(),
            format!("local pod {pod}"),
        )
    } else if roll < 85 {
        let address: IpAddr = rng
            .pick(&["10.0.0.200", "fd00::c8"])
            .parse()
            .expect("address");
        maps.set_endpoint(IFINDEX, unknown_endpoint(), &[address]);
        (
            vec![address],
            format!("a pod unknown to the agent at {address}"),
        )
    } else {
        (Vec::new(), "no endpoint".to_owned())
    }
}

/// What the kernel answered (its verdict, and the counter that moved if exactly one did) and
/// what the model says it should have.
fn answers(
    verdict: i32,
    moved: Option<&(u32, u32)>,
    model: &Classified,
    direction: Direction,
) -> (KernelAnswer, KernelAnswer) {
    let kernel = KernelAnswer {
        verdict,
        reason: moved.map(|moved| moved.1),
        direction: moved.map(|moved| moved.0),
    };
    let expected = KernelAnswer {
        verdict: if model.verdict == Verdict::Pass {
            ALLOW
        } else {
            DENY
        },
        reason: Some(model.reason),
        direction: Some(kernel_direction(direction)),
    };
    (kernel, expected)
}

/// A cluster from the generator the compiler's differential test uses, seeded by `rng`.
fn random_cluster(rng: &mut Rng) -> Cluster {
    let mut seed = [0; 32];
    for chunk in seed.chunks_mut(8) {
        chunk.copy_from_slice(&rng.next().to_le_bytes());
    }
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &seed),
    );
    let mut cluster = netwarden_policy::test_support::cluster()
        .new_tree(&mut runner)
        .expect("a cluster")
        .current();
    // Audit mode, which the compiler's generator leaves out (its evaluator has no say in it).
    for policy in cluster.policies.values_mut() {
        if rng.chance(20) {
            std::sync::Arc::make_mut(policy).enforcement = Enforcement::Audit;
        }
    }
    cluster
}

#[expect(
    clippy::too_many_arguments,
    reason = "everything a failure report names"
)]
fn describe_mismatch(
    report: &mut String,
    seed: u64,
    number: u64,
    frame: &[u8],
    direction: Direction,
    endpoint: &str,
    cluster: &Cluster,
    tables: &Tables,
    model: &Classified,
    kernel: &KernelAnswer,
    counters: Option<String>,
) {
    let label = |reason: Option<u32>| {
        reason
            .and_then(counter::reason)
            .map_or("none", |reason| reason.label)
    };
    let tracked: Vec<(&ConntrackKey, _)> = tables.conntrack.iter().collect();
    writeln!(
        report,
        "--- frame {number} of seed {seed:#x}, {direction} on ifindex {IFINDEX} ({endpoint})\n\
         frame: {}\n\
         parsed by the model: {:?}\n\
         model:  {model}\n\
         kernel: verdict {} reason {} direction {:?}{}\n\
         conntrack before ({} flows, epoch {}): {tracked:?}\n\
         fragments before: {:?}\n\
         cluster: {cluster:?}",
        hex(frame),
        model.parsed,
        kernel.verdict,
        label(kernel.reason),
        kernel.direction,
        counters.map_or_else(String::new, |moved| format!(" ({moved})")),
        tables.conntrack.len(),
        tables.epoch,
        tables.fragments,
    )
    .expect("writing to a String");
}
