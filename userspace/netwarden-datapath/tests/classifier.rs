//! The TC programs run by the kernel on crafted frames (`BPF_PROG_TEST_RUN`), the way Cilium's
//! `bpf/tests` exercise its datapath: truncated headers, IPv6 extension chains, fragments,
//! SCTP, spoofed sources and ICMP errors, against maps written by the real compiler.
//!
//! Needs root (it loads programs and mounts a private bpffs); skipped with a message otherwise.
//! Programs are never attached to any interface.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use netwarden_datapath::{Capacity, Datapath, EndpointState};
use netwarden_policy::Compiler;

mod common;

use common::{IFINDEX, PrivateBpffs};

const ALLOW: i32 = -1;
const DENY: i32 = 2;

const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const STRANGER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3);
const SERVER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);

const MANIFESTS: &str = r"
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: x, labels: {app: server}}
spec: {nodeName: node-1, containers: [{name: c, ports: [{name: http, containerPort: 80}]}]}
status: {podIPs: [{ip: 10.0.0.1}, {ip: 'fd00::1'}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: x, labels: {app: client}}
spec: {nodeName: node-2, containers: [{name: c}]}
status: {podIPs: [{ip: 10.0.0.2}, {ip: 'fd00::2'}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: server, namespace: x}
spec:
  podSelector: {matchLabels: {app: server}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: client}}}]
    ports: [{port: http}, {protocol: SCTP, port: 9000}]
";

/// A datapath loaded on a private bpffs, with the maps of `MANIFESTS` and the server pod's
/// endpoint on the loopback's index. Unmounts the bpffs on drop.
struct Harness {
    datapath: Option<Datapath>,
    bpffs: PrivateBpffs,
}

impl Drop for Harness {
    fn drop(&mut self) {
        // The programs and maps go before the bpffs they are pinned in.
        drop(self.datapath.take());
    }
}

impl Harness {
    fn new() -> Option<Self> {
        Self::with_capacity(&Capacity::default(), true)
    }

    /// A harness whose maps have `capacity`; `expect_clean` asserts the apply reported nothing.
    fn with_capacity(capacity: &Capacity, expect_clean: bool) -> Option<Self> {
        Self::with_manifests(MANIFESTS, capacity, expect_clean)
    }

    /// A harness for the cluster of `manifests`, whose one local pod is the server.
    fn with_manifests(manifests: &str, capacity: &Capacity, expect_clean: bool) -> Option<Self> {
        let bpffs = PrivateBpffs::new()?;
        let (mut datapath, _) = Datapath::open(bpffs.path(), capacity).unwrap_or_else(|error| {
            panic!(
                "loading the datapath on {}: {error}",
                bpffs.path().display()
            )
        });
        datapath.detached();

        let mut compiler = Compiler::new("node-1");
        let state = compiler.sync(common::cluster_from(manifests));
        let network = common::loopback_node(&[IpAddr::V4(SERVER), IpAddr::V6(SERVER6)]);
        let report = datapath.apply(state, &network);
        let locked = report
            .endpoints
            .iter()
            .any(|endpoint| endpoint.state == EndpointState::Locked);
        assert_eq!(
            locked, !expect_clean,
            "only a harness too small for its policy locks: {report:?}"
        );
        assert!(
            !expect_clean || report.errors.is_empty(),
            "apply errors: {:?}",
            report.errors
        );
        assert_eq!(
            report.endpoints.len(),
            1,
            "the server is the one local endpoint: {report:?}"
        );
        Some(Self {
            datapath: Some(datapath),
            bpffs,
        })
    }

    /// The conntrack sweeper on the harness's table, with the default timeouts; tests tell it
    /// how far into the future to look rather than wait.
    fn sweeper(&self) -> netwarden_datapath::conntrack::Sweeper {
        use netwarden_datapath::conntrack::{Sweeper, Timeouts};
        Sweeper::open(
            self.bpffs.path(),
            std::time::Duration::from_secs(10),
            Timeouts::default(),
        )
        .expect("the conntrack map is pinned under the harness's bpffs")
    }

    /// The verdict of the program towards the pod (`true`) or from it (`false`) on `frame`.
    fn run(&self, towards_pod: bool, frame: &[u8]) -> i32 {
        let datapath = self.datapath.as_ref().expect("present until drop");
        datapath
            .test_run(towards_pod, frame, IFINDEX, 1)
            .unwrap_or_else(|error| {
                panic!(
                    "BPF_PROG_TEST_RUN failed on a {}-byte frame: {error}",
                    frame.len()
                )
            })
            .0
    }
}

fn ethernet(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    frame.extend(ethertype.to_be_bytes());
    frame.extend(payload);
    frame
}

fn ipv4(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    fragment_offset: u16,
    payload: &[u8],
) -> Vec<u8> {
    let total = u16::try_from(20 + payload.len()).expect("small packet");
    let mut packet = vec![0x45, 0];
    packet.extend(total.to_be_bytes());
    packet.extend([0, 1]);
    packet.extend((fragment_offset / 8).to_be_bytes());
    packet.extend([64, protocol, 0, 0]);
    packet.extend(src.octets());
    packet.extend(dst.octets());
    packet.extend(payload);
    packet
}

/// An IPv6 packet whose extension headers (`(type, length in 8-byte units)`) precede the payload.
fn ipv6(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    protocol: u8,
    extensions: &[(u8, u8)],
    payload: &[u8],
) -> Vec<u8> {
    let mut chain = Vec::new();
    let mut next = protocol;
    for (index, (kind, length)) in extensions.iter().enumerate().rev() {
        let mut header = vec![next, *length];
        header.resize(8 * (usize::from(*length) + 1), 0);
        chain.splice(0..0, header);
        next = *kind;
        let _ = index;
    }
    let total = u16::try_from(chain.len() + payload.len()).expect("small packet");
    let mut packet = vec![0x60, 0, 0, 0];
    packet.extend(total.to_be_bytes());
    packet.extend([next, 64]);
    packet.extend(src.octets());
    packet.extend(dst.octets());
    packet.extend(chain);
    packet.extend(payload);
    packet
}

fn tcp(source: u16, destination: u16, syn: bool) -> Vec<u8> {
    let mut segment = Vec::new();
    segment.extend(source.to_be_bytes());
    segment.extend(destination.to_be_bytes());
    segment.extend([
        0,
        0,
        0,
        1,
        0,
        0,
        0,
        0,
        0x50,
        if syn { 0x02 } else { 0x10 },
        0xff,
        0xff,
        0,
        0,
        0,
        0,
    ]);
    segment
}

fn sctp_init(source: u16, destination: u16) -> Vec<u8> {
    let mut packet = Vec::new();
    packet.extend(source.to_be_bytes());
    packet.extend(destination.to_be_bytes());
    packet.extend([0; 8]);
    packet.extend([1, 0, 0, 20, 0, 0, 0, 7, 0, 1, 0, 0, 0, 1, 0, 1, 0, 0, 0, 1]);
    packet
}

#[test]
fn tcp_and_sctp_ports_are_enforced_towards_the_pod() {
    let Some(harness) = Harness::new() else {
        return;
    };
    let syn = |from, port| ethernet(0x0800, &ipv4(from, SERVER, 6, 0, &tcp(40000, port, true)));
    assert_eq!(
        harness.run(true, &syn(CLIENT, 80)),
        ALLOW,
        "client to the named port http"
    );
    assert_eq!(
        harness.run(true, &syn(CLIENT, 81)),
        DENY,
        "client to a port no rule names"
    );
    assert_eq!(
        harness.run(true, &syn(STRANGER, 80)),
        DENY,
        "an address that is no client"
    );
    let init = |port| {
        ethernet(
            0x0800,
            &ipv4(CLIENT, SERVER, 132, 0, &sctp_init(5000, port)),
        )
    };
    assert_eq!(harness.run(true, &init(9000)), ALLOW, "SCTP to 9000");
    assert_eq!(harness.run(true, &init(9001)), DENY, "SCTP to 9001");
}

#[test]
fn ipv6_extension_chains_are_walked_and_later_fragments_fail_closed() {
    let Some(harness) = Harness::new() else {
        return;
    };
    let chained = |port| {
        ethernet(
            0x86dd,
            &ipv6(
                CLIENT6,
                SERVER6,
                6,
                &[(0, 0), (60, 1)],
                &tcp(40000, port, true),
            ),
        )
    };
    assert_eq!(
        harness.run(true, &chained(80)),
        ALLOW,
        "hop-by-hop and destination options before TCP/80"
    );
    assert_eq!(
        harness.run(true, &chained(81)),
        DENY,
        "the same chain before TCP/81"
    );

    // A fragment header with a non-zero offset: no ports to match, and the rule has ports.
    let mut later = ipv6(CLIENT6, SERVER6, 6, &[(44, 0)], &[0; 16]);
    later[40 + 2] = 0x05; // fragment offset 160 bytes
    later[40 + 3] = 0x00;
    assert_eq!(
        harness.run(true, &ethernet(0x86dd, &later)),
        DENY,
        "a later fragment"
    );
    let first = ipv6(CLIENT6, SERVER6, 6, &[(44, 0)], &tcp(40000, 80, true));
    assert_eq!(
        harness.run(true, &ethernet(0x86dd, &first)),
        ALLOW,
        "the first fragment carries the ports"
    );
}

#[test]
fn truncated_and_malformed_headers_are_dropped() {
    let Some(harness) = Harness::new() else {
        return;
    };
    let whole = ethernet(0x0800, &ipv4(CLIENT, SERVER, 6, 0, &tcp(40000, 80, true)));
    // BPF_PROG_TEST_RUN itself refuses a frame cut inside the IPv4 header (24 bytes was
    // refused here), so the cuts fall in the ports and before the TCP flags.
    for cut in [14 + 20 + 2, 14 + 20 + 13] {
        assert_eq!(
            harness.run(true, &whole[..cut]),
            DENY,
            "frame cut at {cut} bytes"
        );
    }
    let mut missing_options = whole.clone();
    missing_options[14] = 0x4f; // a 60-byte header: the "options" run into the TCP header
    assert_eq!(
        harness.run(true, &missing_options),
        DENY,
        "header length past the frame's end"
    );
    let mut bad_version = whole.clone();
    bad_version[14] = 0x55;
    assert_eq!(
        harness.run(true, &bad_version),
        DENY,
        "IPv4 ethertype with version 5"
    );
    let arp = ethernet(0x0806, &[0; 28]);
    assert_eq!(harness.run(true, &arp), ALLOW, "ARP is never policy");
}

#[test]
fn packets_leaving_a_pod_from_an_address_it_does_not_own_are_dropped() {
    let Some(harness) = Harness::new() else {
        return;
    };
    let from = |source| {
        ethernet(
            0x0800,
            &ipv4(source, CLIENT, 17, 0, &[0x13, 0x88, 0, 53, 0, 8, 0, 0]),
        )
    };
    assert_eq!(
        harness.run(false, &from(SERVER)),
        ALLOW,
        "its own address (egress not isolated)"
    );
    assert_eq!(
        harness.run(false, &from(Ipv4Addr::new(10, 0, 0, 99))),
        DENY,
        "somebody else's address"
    );
    let from6 = |source| {
        ethernet(
            0x86dd,
            &ipv6(source, CLIENT6, 17, &[], &[0x13, 0x88, 0, 53, 0, 8, 0, 0]),
        )
    };
    assert_eq!(
        harness.run(false, &from6(SERVER6)),
        ALLOW,
        "its own IPv6 address"
    );
    assert_eq!(
        harness.run(false, &from6(CLIENT6)),
        DENY,
        "the client's IPv6 address"
    );
}

#[test]
fn icmp_errors_about_tracked_flows_pass_and_others_do_not() {
    let Some(harness) = Harness::new() else {
        return;
    };
    let outside = Ipv4Addr::new(192, 0, 2, 1);
    let router = Ipv4Addr::new(198, 51, 100, 1);
    // The server opens a connection out (its egress is not isolated): tracked.
    let syn = ethernet(0x0800, &ipv4(SERVER, outside, 6, 0, &tcp(5555, 443, true)));
    assert_eq!(harness.run(false, &syn), ALLOW);

    let fragmentation_needed = |source_port| {
        let quoted = ipv4(SERVER, outside, 6, 0, &tcp(source_port, 443, false)[..8]);
        let mut icmp = vec![3, 4, 0, 0, 0, 0, 0x05, 0xdc];
        icmp.extend(quoted);
        ethernet(0x0800, &ipv4(router, SERVER, 1, 0, &icmp))
    };
    assert_eq!(
        harness.run(true, &fragmentation_needed(5555)),
        ALLOW,
        "PMTU error of the tracked flow"
    );
    assert_eq!(
        harness.run(true, &fragmentation_needed(5556)),
        DENY,
        "an error about no flow of the pod"
    );
    let echo = ethernet(
        0x0800,
        &ipv4(router, SERVER, 1, 0, &[8, 0, 0, 0, 0, 1, 0, 1]),
    );
    assert_eq!(
        harness.run(true, &echo),
        DENY,
        "echo request to an isolated pod whose rules all have ports"
    );
}

/// The server's two entries (TCP 80 and SCTP 9000 from the client) with room for one in the
/// hash of exact entries: the other goes to the trie, and the programs find both.
#[test]
fn exact_entries_the_hash_has_no_room_for_are_found_in_the_trie() {
    let capacity = Capacity {
        policy: 4,
        ..Capacity::default()
    };
    assert_eq!(capacity.exact_policy(), 1);
    let Some(harness) = Harness::with_capacity(&capacity, true) else {
        return;
    };
    let syn = |from, port| ethernet(0x0800, &ipv4(from, SERVER, 6, 0, &tcp(40000, port, true)));
    let init = |port| {
        ethernet(
            0x0800,
            &ipv4(CLIENT, SERVER, 132, 0, &sctp_init(5000, port)),
        )
    };
    assert_eq!(harness.run(true, &syn(CLIENT, 80)), ALLOW, "TCP to 80");
    assert_eq!(harness.run(true, &init(9000)), ALLOW, "SCTP to 9000");
    assert_eq!(harness.run(true, &syn(CLIENT, 81)), DENY, "TCP to 81");
    assert_eq!(harness.run(true, &init(9001)), DENY, "SCTP to 9001");
    assert_eq!(harness.run(true, &syn(STRANGER, 80)), DENY, "no client");
}

#[test]
fn an_endpoint_whose_policy_does_not_fit_the_maps_is_locked_down() {
    // The server's ingress policy needs more entries than this policy map holds.
    let capacity = Capacity {
        policy: 1,
        ..Capacity::default()
    };
    let Some(harness) = Harness::with_capacity(&capacity, false) else {
        return;
    };
    let syn = |from| ethernet(0x0800, &ipv4(from, SERVER, 6, 0, &tcp(40000, 80, true)));
    assert_eq!(
        harness.run(true, &syn(CLIENT)),
        DENY,
        "locked: not even the allowed client passes"
    );
    assert_eq!(
        harness.run(
            false,
            &ethernet(
                0x0800,
                &ipv4(SERVER, CLIENT, 17, 0, &[0, 53, 0, 53, 0, 8, 0, 0])
            )
        ),
        DENY,
        "locked both ways"
    );
}

#[test]
fn verdicts_are_counted_per_direction_and_read_the_same_through_the_pin() {
    use netwarden_common::{counter, direction};

    let Some(harness) = Harness::new() else {
        return;
    };
    let datapath = harness.datapath.as_ref().expect("present until drop");
    let reader = datapath
        .verdict_counters()
        .expect("the counters open from their pin");
    let at = |counters: &[u64], dir, reason| counters[counter::slot(dir, reason) as usize];
    let before = datapath.verdicts();
    assert_eq!(before.len(), counter::SLOTS as usize);

    // Towards the server (its ingress, isolated): a stranger is denied by policy.
    let to_server = ethernet(0x0800, &ipv4(STRANGER, SERVER, 6, 0, &tcp(40000, 80, true)));
    assert_eq!(harness.run(true, &to_server), DENY);
    // From the server (its egress, not isolated): allowed as such.
    let from_server = ethernet(0x0800, &ipv4(SERVER, CLIENT, 6, 0, &tcp(40001, 443, true)));
    assert_eq!(harness.run(false, &from_server), ALLOW);

    let after = datapath.verdicts();
    let delta = |dir, reason| at(&after, dir, reason) - at(&before, dir, reason);
    assert_eq!(delta(direction::INGRESS, counter::DENIED_BY_POLICY), 1);
    assert_eq!(delta(direction::EGRESS, counter::DENIED_BY_POLICY), 0);
    assert_eq!(delta(direction::EGRESS, counter::ALLOWED_NOT_ISOLATED), 1);
    assert_eq!(delta(direction::INGRESS, counter::ALLOWED_NOT_ISOLATED), 0);
    assert_eq!(
        reader.read(),
        after,
        "the metrics endpoint reads the same counters"
    );
}

/// A TCP segment with exactly `flags` (FIN 0x01, SYN 0x02, RST 0x04, ACK 0x10).
fn tcp_with_flags(source: u16, destination: u16, flags: u8) -> Vec<u8> {
    let mut segment = tcp(source, destination, false);
    segment[13] = flags;
    segment
}

/// A framed IPv4 TCP segment between two (address, port) ends with `flags`.
fn tcp_frame(from: (Ipv4Addr, u16), to: (Ipv4Addr, u16), flags: u8) -> Vec<u8> {
    ethernet(
        0x0800,
        &ipv4(from.0, to.0, 6, 0, &tcp_with_flags(from.1, to.1, flags)),
    )
}

fn udp(source: u16, destination: u16) -> Vec<u8> {
    let mut datagram = Vec::new();
    datagram.extend(source.to_be_bytes());
    datagram.extend(destination.to_be_bytes());
    datagram.extend([0, 12, 0, 0, b'p', b'i', b'n', b'g']);
    datagram
}

#[test]
fn idle_flows_expire_by_state_and_a_swept_connection_is_not_revived_mid_stream() {
    use std::time::Duration;

    let Some(harness) = Harness::new() else {
        return;
    };
    let mut sweeper = harness.sweeper();
    let outside = Ipv4Addr::new(192, 0, 2, 1);

    // An answered TCP connection into the server, and a UDP flow out of it nobody answers.
    let client_to_server = |flags| tcp_frame((CLIENT, 40000), (SERVER, 80), flags);
    let server_to_client = |flags| tcp_frame((SERVER, 80), (CLIENT, 40000), flags);
    assert_eq!(harness.run(true, &client_to_server(0x02)), ALLOW, "SYN");
    assert_eq!(
        harness.run(false, &server_to_client(0x12)),
        ALLOW,
        "SYN-ACK"
    );
    let unanswered = ethernet(0x0800, &ipv4(SERVER, outside, 17, 0, &udp(5353, 53)));
    assert_eq!(harness.run(false, &unanswered), ALLOW);
    // The sweeper is told how far into the future to look rather than waited for.
    let mut sweep_after = |later: Duration| {
        sweeper
            .sweep_after(later)
            .expect("the conntrack clock reads")
    };
    let report = sweep_after(Duration::ZERO);
    assert_eq!(
        (report.flows(), report.expired()),
        (2, 0),
        "both tracked, none idle"
    );

    // A minute on, the unanswered flow is gone; the established connection (6 h) stays.
    assert_eq!(sweep_after(Duration::from_secs(65)).expired(), 1);
    assert_eq!(sweep_after(Duration::from_secs(65)).flows(), 1);
    assert_eq!(sweep_after(Duration::from_mins(6 * 60 - 1)).expired(), 0);

    // A FIN marks it closing: ten idle seconds later it is gone.
    assert_eq!(harness.run(true, &client_to_server(0x11)), ALLOW, "FIN");
    assert_eq!(
        sweep_after(Duration::from_secs(5)).expired(),
        0,
        "closing, not yet idle long"
    );
    assert_eq!(
        sweep_after(Duration::from_secs(12)).expired(),
        1,
        "closing flows go after 10 s"
    );
    assert_eq!(sweep_after(Duration::from_secs(12)).flows(), 0);

    // Without its entry, a mid-stream segment is decided on its own and creates nothing: the
    // server's packet to the client passes only because the server's egress is not isolated.
    assert_eq!(harness.run(false, &server_to_client(0x10)), ALLOW);
    assert_eq!(
        harness.run(true, &client_to_server(0x10)),
        ALLOW,
        "policy allows client:80"
    );
    assert_eq!(
        sweep_after(Duration::ZERO).flows(),
        0,
        "no entry came back from mid-stream segments"
    );
}

#[test]
fn a_connection_reusing_a_closed_ones_ports_is_tracked_as_new() {
    use std::time::Duration;

    let Some(harness) = Harness::new() else {
        return;
    };
    let mut sweeper = harness.sweeper();
    let mut expired_after = |later: Duration| {
        sweeper
            .sweep_after(later)
            .expect("the conntrack clock reads")
            .expired()
    };
    let client_to_server = |flags| tcp_frame((CLIENT, 40000), (SERVER, 80), flags);
    let server_to_client = |flags| tcp_frame((SERVER, 80), (CLIENT, 40000), flags);
    // A connection that closes, then another from the same client port (`tcp_tw_reuse`).
    for connection in ["first", "second"] {
        assert_eq!(
            harness.run(true, &client_to_server(0x02)),
            ALLOW,
            "{connection} SYN"
        );
        assert_eq!(
            harness.run(false, &server_to_client(0x12)),
            ALLOW,
            "{connection} SYN-ACK"
        );
        assert_eq!(harness.run(true, &client_to_server(0x10)), ALLOW);
        if connection == "first" {
            assert_eq!(harness.run(true, &client_to_server(0x11)), ALLOW, "FIN");
        }
    }
    // The second connection is established, not the first one's closing: a quiet minute
    // does not cut it (closing flows go after 10 s, established ones after 6 h).
    assert_eq!(
        expired_after(Duration::from_mins(1)),
        0,
        "the new connection was swept as the old one's closing flow"
    );

    // A flow the server opened, closed; a SYN the other way on its ports is a new
    // connection into the server, which its ingress policy does not allow (only the client,
    // on port 80): it must not pass as a reply of the old flow.
    let stranger_to_server = |flags| tcp_frame((STRANGER, 7000), (SERVER, 5000), flags);
    let server_to_stranger = |flags| tcp_frame((SERVER, 5000), (STRANGER, 7000), flags);
    assert_eq!(
        harness.run(false, &server_to_stranger(0x02)),
        ALLOW,
        "egress is open"
    );
    assert_eq!(
        harness.run(true, &stranger_to_server(0x12)),
        ALLOW,
        "the reply of a tracked flow"
    );
    assert_eq!(harness.run(false, &server_to_stranger(0x11)), ALLOW, "FIN");
    assert_eq!(
        harness.run(true, &stranger_to_server(0x02)),
        DENY,
        "a SYN into the server over a closed flow's entry"
    );
}

#[test]
fn new_allowed_flows_are_reported_with_their_rule_when_asked_and_denies_always() {
    use netwarden_common::{VerdictEvent, counter};

    let Some(mut harness) = Harness::new() else {
        return;
    };
    let datapath = harness.datapath.as_mut().expect("present until drop");
    let mut ring = datapath
        .take_events()
        .expect("the event ring is there once");
    let mut next_event = || {
        ring.next().map(|item| {
            assert_eq!(item.len(), size_of::<VerdictEvent>());
            // SAFETY: the ring holds `VerdictEvent`s written by the programs, whole (checked
            // length); `VerdictEvent` is plain integers, valid for any bytes.
            unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<VerdictEvent>()) }
        })
    };
    let syn = |source, port| ethernet(0x0800, &ipv4(source, SERVER, 6, 0, &tcp(port, 80, true)));

    // Off: an allowed flow says nothing.
    harness
        .datapath
        .as_mut()
        .expect("present")
        .set_allow_event_period(0)
        .expect("setting");
    assert_eq!(harness.run(true, &syn(CLIENT, 41000)), ALLOW);
    // Every one: the event names the rule of the server's policy.
    harness
        .datapath
        .as_mut()
        .expect("present")
        .set_allow_event_period(1)
        .expect("setting");
    assert_eq!(harness.run(true, &syn(CLIENT, 41001)), ALLOW);
    // Its next segment is tracked: no second event.
    assert_eq!(
        harness.run(
            true,
            &ethernet(0x0800, &ipv4(CLIENT, SERVER, 6, 0, &tcp(41001, 80, false)))
        ),
        ALLOW
    );
    // A deny is reported whatever the setting.
    assert_eq!(harness.run(true, &syn(STRANGER, 41002)), DENY);

    let allowed = next_event().expect("the allowed flow was reported");
    assert_eq!(u32::from(allowed.reason), counter::ALLOWED_BY_POLICY);
    assert_eq!(
        allowed.peer_port, 41001,
        "not the flow opened while events were off"
    );
    assert_ne!(allowed.rule, 0, "the rule that allowed it is named");
    let denied = next_event().expect("the deny was reported");
    assert_eq!(u32::from(denied.reason), counter::DENIED_BY_POLICY);
    assert_eq!(denied.rule, 0);
    assert!(
        next_event().is_none(),
        "nothing else: tracked packets are not events"
    );
}

#[test]
fn tagged_frames_and_ethertypes_other_than_ip_and_arp_drop_both_ways() {
    use netwarden_common::{counter, direction};

    let Some(harness) = Harness::new() else {
        return;
    };
    let datapath = harness.datapath.as_ref().expect("present until drop");
    // What a pod under default-deny egress sent on the real kernel: a UDP datagram inside a
    // VLAN-0 tag (the kernel had taken the outer one off already).
    let datagram = ipv4(SERVER, CLIENT, 17, 0, &udp(5353, 53));
    let tagged = |tpid: u16| {
        let mut inner = vec![0, 0];
        inner.extend(0x0800_u16.to_be_bytes());
        inner.extend(&datagram);
        ethernet(tpid, &inner)
    };
    let before = datapath.verdicts();
    for tpid in [0x8100, 0x88a8, 0x9100] {
        assert_eq!(
            harness.run(false, &tagged(tpid)),
            DENY,
            "{tpid:#x} from the pod"
        );
        assert_eq!(
            harness.run(true, &tagged(tpid)),
            DENY,
            "{tpid:#x} to the pod"
        );
    }
    // LLDP, PPPoE discovery, and an 802.3 length field (LLC, as STP sends): nothing a pod's
    // point-to-point link carries.
    for ethertype in [0x88cc, 0x8863, 0x0026] {
        let frame = ethernet(ethertype, &datagram);
        assert_eq!(
            harness.run(false, &frame),
            DENY,
            "{ethertype:#x} from the pod"
        );
        assert_eq!(harness.run(true, &frame), DENY, "{ethertype:#x} to the pod");
    }
    let after = datapath.verdicts();
    let delta = |dir, reason| {
        after[counter::slot(dir, reason) as usize] - before[counter::slot(dir, reason) as usize]
    };
    for dir in [direction::EGRESS, direction::INGRESS] {
        assert_eq!(delta(dir, counter::DENIED_VLAN), 3);
        assert_eq!(delta(dir, counter::DENIED_ETHERTYPE), 3);
    }
    // The untagged datagram, ARP and IPv6 still pass (the server's egress is not isolated).
    assert_eq!(harness.run(false, &ethernet(0x0800, &datagram)), ALLOW);
    let arp = ethernet(0x0806, &[0; 28]);
    assert_eq!(harness.run(false, &arp), ALLOW, "ARP from the pod");
    assert_eq!(harness.run(true, &arp), ALLOW, "ARP to the pod");
    let datagram6 = ipv6(SERVER6, CLIENT6, 17, &[], &udp(5353, 53));
    assert_eq!(harness.run(false, &ethernet(0x86dd, &datagram6)), ALLOW);
}

/// An IPv4 fragment of datagram `id` at byte `offset`, with more fragments to come when `more`.
fn ipv4_fragment(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    id: u16,
    offset: u16,
    more: bool,
    payload: &[u8],
) -> Vec<u8> {
    let mut packet = ipv4(src, dst, 17, 0, payload);
    packet[4..6].copy_from_slice(&id.to_be_bytes());
    let flags_and_offset = (offset / 8) | if more { 0x2000 } else { 0 };
    packet[6..8].copy_from_slice(&flags_and_offset.to_be_bytes());
    packet
}

/// An IPv6 UDP fragment of datagram `id` at byte `offset` (a fragment header, then `payload`).
fn ipv6_fragment(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    id: u32,
    offset: u16,
    more: bool,
    payload: &[u8],
) -> Vec<u8> {
    let mut packet = ipv6(src, dst, 17, &[(44, 0)], payload);
    let offset_field = ((offset / 8) << 3) | u16::from(more);
    packet[40 + 2..40 + 4].copy_from_slice(&offset_field.to_be_bytes());
    packet[40 + 4..40 + 8].copy_from_slice(&id.to_be_bytes());
    packet
}

#[test]
fn later_fragments_follow_their_first_fragment_and_unknown_ones_drop() {
    use netwarden_common::{counter, direction};

    let Some(harness) = Harness::new() else {
        return;
    };
    let datapath = harness.datapath.as_ref().expect("present until drop");
    let resolver = Ipv4Addr::new(192, 0, 2, 53);
    // The server asks a resolver (its egress is not isolated): the flow is tracked. The
    // server's ingress rules name ports, so nothing without ports passes in on policy alone.
    let query = ethernet(0x0800, &ipv4(SERVER, resolver, 17, 0, &udp(5353, 53)));
    assert_eq!(harness.run(false, &query), ALLOW);

    // A large answer, in two fragments: the first carries the ports, the second none.
    let mut answer_start = udp(53, 5353);
    answer_start.extend([0x5a; 16]);
    let answer = |id, offset, more, payload: &[u8]| {
        ethernet(
            0x0800,
            &ipv4_fragment(resolver, SERVER, id, offset, more, payload),
        )
    };
    let before = datapath.verdicts();
    assert_eq!(
        harness.run(true, &answer(0x4242, 0, true, &answer_start)),
        ALLOW,
        "the first fragment is a reply of the tracked flow"
    );
    assert_eq!(
        harness.run(true, &answer(0x4242, 24, false, &[0x5a; 16])),
        ALLOW,
        "the second fragment follows the first"
    );
    assert_eq!(
        harness.run(true, &answer(0x4343, 24, false, &[0x5a; 16])),
        DENY,
        "a fragment of a datagram whose first fragment never came"
    );
    let forged = ethernet(
        0x0800,
        &ipv4_fragment(STRANGER, SERVER, 0x4242, 24, false, &[0x5a; 16]),
    );
    assert_eq!(
        harness.run(true, &forged),
        DENY,
        "the same id from another peer"
    );
    // A first fragment the policy denies opens nothing for the rest of its datagram.
    let denied = |offset, more, payload: &[u8]| {
        ethernet(
            0x0800,
            &ipv4_fragment(STRANGER, SERVER, 0x5000, offset, more, payload),
        )
    };
    assert_eq!(harness.run(true, &denied(0, true, &udp(53, 9999))), DENY);
    assert_eq!(harness.run(true, &denied(24, false, &[0; 16])), DENY);
    let after = datapath.verdicts();
    let delta = |reason| {
        after[counter::slot(direction::INGRESS, reason) as usize]
            - before[counter::slot(direction::INGRESS, reason) as usize]
    };
    assert_eq!(delta(counter::ALLOWED_FRAGMENT), 1);
    assert_eq!(delta(counter::DENIED_FRAGMENT_UNKNOWN), 3);

    // IPv6: the fragment header's 32-bit identification.
    let query6 = ethernet(0x86dd, &ipv6(SERVER6, CLIENT6, 17, &[], &udp(5353, 53)));
    assert_eq!(harness.run(false, &query6), ALLOW);
    let answer6 = |id, offset, more, payload: &[u8]| {
        ethernet(
            0x86dd,
            &ipv6_fragment(CLIENT6, SERVER6, id, offset, more, payload),
        )
    };
    assert_eq!(
        harness.run(true, &answer6(0x0102_0304, 0, true, &answer_start)),
        ALLOW
    );
    assert_eq!(
        harness.run(true, &answer6(0x0102_0304, 24, false, &[0x5a; 16])),
        ALLOW
    );
    assert_eq!(
        harness.run(true, &answer6(0x0102_0305, 24, false, &[0x5a; 16])),
        DENY
    );
}

/// An ICMP (or `ICMPv6`) echo request or reply with identifier `id`.
fn echo(request: bool, v6: bool, id: u16) -> Vec<u8> {
    let kind = match (request, v6) {
        (true, false) => 8,
        (false, false) => 0,
        (true, true) => 128,
        (false, true) => 129,
    };
    let mut message = vec![kind, 0, 0, 0];
    message.extend(id.to_be_bytes());
    message.extend([0, 1]);
    message.extend(b"ping");
    message
}

#[test]
fn echo_flows_are_keyed_by_their_identifier_and_only_requests_open_them() {
    let Some(harness) = Harness::new() else {
        return;
    };
    let outside = Ipv4Addr::new(192, 0, 2, 1);
    let router = Ipv4Addr::new(198, 51, 100, 1);
    let from_pod = |message: &[u8]| ethernet(0x0800, &ipv4(SERVER, outside, 1, 0, message));
    let to_pod = |message: &[u8]| ethernet(0x0800, &ipv4(outside, SERVER, 1, 0, message));
    // The server pings out (its egress is not isolated; its ingress rules all name ports).
    assert_eq!(
        harness.run(false, &from_pod(&echo(true, false, 0x1234))),
        ALLOW
    );
    assert_eq!(
        harness.run(true, &to_pod(&echo(false, false, 0x1234))),
        ALLOW,
        "the reply to the request"
    );
    assert_eq!(
        harness.run(true, &to_pod(&echo(false, false, 0x4321))),
        DENY,
        "a reply to no request of the pod"
    );
    let timestamp = [
        13, 0, 0, 0, 0x12, 0x34, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ];
    assert_eq!(
        harness.run(true, &to_pod(&timestamp)),
        DENY,
        "another ICMP message from the pinged peer"
    );
    // (A request from the peer with the pinging pod's identifier matches the flow too: both
    // ends' ports are the identifier, as a reply must find its request's entry.)
    // A reply opens nothing: an unsolicited one leaves the pod (egress not isolated), and the
    // peer's request with the same identifier is still decided by the pod's ingress policy.
    assert_eq!(
        harness.run(false, &from_pod(&echo(false, false, 0x7777))),
        ALLOW
    );
    assert_eq!(harness.run(true, &to_pod(&echo(true, false, 0x7777))), DENY);

    // An error about the ping (host unreachable) passes; one about another ping does not.
    let unreachable = |id| {
        let mut icmp = vec![3, 1, 0, 0, 0, 0, 0, 0];
        icmp.extend(ipv4(SERVER, outside, 1, 0, &echo(true, false, id)[..8]));
        ethernet(0x0800, &ipv4(router, SERVER, 1, 0, &icmp))
    };
    assert_eq!(harness.run(true, &unreachable(0x1234)), ALLOW);
    assert_eq!(harness.run(true, &unreachable(0x4321)), DENY);

    // ICMPv6 alike.
    let outside6: Ipv6Addr = "2001:db8::1".parse().expect("an address");
    let request6 = ethernet(
        0x86dd,
        &ipv6(SERVER6, outside6, 58, &[], &echo(true, true, 9)),
    );
    assert_eq!(harness.run(false, &request6), ALLOW);
    let reply6 = |id| {
        ethernet(
            0x86dd,
            &ipv6(outside6, SERVER6, 58, &[], &echo(false, true, id)),
        )
    };
    assert_eq!(harness.run(true, &reply6(9)), ALLOW);
    assert_eq!(harness.run(true, &reply6(10)), DENY);
}

#[test]
fn neighbour_discovery_and_mld_pass_from_link_local_or_unspecified_sources_and_neighbours_from_their_own()
 {
    let Some(harness) = Harness::new() else {
        return;
    };
    let link_local: Ipv6Addr = "fe80::1".parse().expect("an address");
    let global: Ipv6Addr = "2001:db8::1".parse().expect("an address");
    let message = |kind: u8| {
        let mut message = vec![kind, 0, 0, 0, 0, 0, 0, 0];
        message.extend(SERVER6.octets());
        message
    };
    let to_pod = |source, kind| ethernet(0x86dd, &ipv6(source, SERVER6, 58, &[], &message(kind)));
    // Towards the server (isolated, rules with ports only).
    for kind in [130, 133, 134, 135, 136, 137, 143] {
        assert_eq!(
            harness.run(true, &to_pod(link_local, kind)),
            ALLOW,
            "{kind} from fe80::1"
        );
        assert_eq!(
            harness.run(true, &to_pod(Ipv6Addr::UNSPECIFIED, kind)),
            ALLOW,
            "{kind} from ::"
        );
        // A neighbour on the same link (pods on a bridge) solicits from its own address.
        let from_global = if matches!(kind, 135 | 136) {
            ALLOW
        } else {
            DENY
        };
        assert_eq!(
            harness.run(true, &to_pod(global, kind)),
            from_global,
            "{kind} from a global address"
        );
    }
    // Leaving the pod: a solicitation from its own address is plumbing (Linux sends them
    // from the address of the packet that needed the neighbour); from another, spoofed.
    let from_pod = |source, kind| ethernet(0x86dd, &ipv6(source, global, 58, &[], &message(kind)));
    assert_eq!(harness.run(false, &from_pod(SERVER6, 135)), ALLOW);
    assert_eq!(harness.run(false, &from_pod(CLIENT6, 135)), DENY);
    assert_eq!(harness.run(false, &from_pod(CLIENT6, 136)), DENY);
    assert_eq!(harness.run(false, &from_pod(link_local, 135)), ALLOW);
}

#[test]
fn a_tracked_flow_never_carries_a_source_the_pod_does_not_own() {
    let Some(harness) = Harness::new() else {
        return;
    };
    // The client may reach the server on SCTP 9000. An INIT addressed to a multicast group
    // reaches the server's interface too, and the policy allows it...
    let group = Ipv4Addr::new(224, 0, 0, 9);
    let init = ethernet(0x0800, &ipv4(CLIENT, group, 132, 0, &sctp_init(5000, 9000)));
    assert_eq!(harness.run(true, &init), ALLOW);
    // ...but it opens no flow the pod could then send through from the group's address,
    // which it does not own: the fast path would not check the source.
    let forged = ethernet(0x0800, &ipv4(group, CLIENT, 132, 0, &sctp_init(9000, 5000)));
    assert_eq!(harness.run(false, &forged), DENY, "a spoofed source");
    // The same exchange on the server's own address is tracked, and its replies pass.
    let init = ethernet(
        0x0800,
        &ipv4(CLIENT, SERVER, 132, 0, &sctp_init(5001, 9000)),
    );
    assert_eq!(harness.run(true, &init), ALLOW);
    let reply = ethernet(
        0x0800,
        &ipv4(SERVER, CLIENT, 132, 0, &sctp_init(9000, 5001)),
    );
    assert_eq!(harness.run(false, &reply), ALLOW);
    // A flow tracked on the server's interface is keyed by it: the same forged reply on
    // another interface is decided there (not an endpoint here: dropped).
    let datapath = harness.datapath.as_ref().expect("present until drop");
    let other = IFINDEX + 1;
    if let Ok((verdict, _)) = datapath.test_run(false, &reply, other, 1) {
        assert_eq!(verdict, DENY, "the server's flow on ifindex {other}");
    }
}

/// The server's egress: an Admin Accept to the client on 8080 before a Deny of everything, and
/// a Baseline Deny of port 9000 its own NetworkPolicy-free ingress falls to.
const CLUSTER_POLICIES: &str = r"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: server-egress}
spec:
  tier: Admin
  priority: 5
  subject: {namespaces: {matchLabels: {kubernetes.io/metadata.name: x}}}
  egress:
  - name: client-8080
    action: Accept
    to: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: client}}}}]
    protocols: [{tcp: {destinationPort: {number: 8080}}}]
  - name: nothing-else
    action: Deny
    to: [{networks: ['0.0.0.0/0', '::/0']}]
---
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: baseline}
spec:
  tier: Baseline
  priority: 5
  subject: {namespaces: {}}
  ingress:
  - name: no-9000
    action: Deny
    from: [{namespaces: {}}]
    protocols: [{tcp: {destinationPort: {number: 9000}}}]
";

#[test]
fn cluster_network_policy_tiers_decide_new_flows_and_accepted_ones_are_tracked() {
    let server_only = MANIFESTS
        .split("---")
        .filter(|document| !document.contains("NetworkPolicy"))
        .collect::<Vec<_>>()
        .join("---");
    let manifests = format!("{server_only}---{CLUSTER_POLICIES}");
    let Some(harness) = Harness::with_manifests(&manifests, &Capacity::default(), true) else {
        return;
    };
    let to_client = |port| ethernet(0x0800, &ipv4(SERVER, CLIENT, 6, 0, &tcp(40000, port, true)));
    assert_eq!(
        harness.run(false, &to_client(8080)),
        ALLOW,
        "the Admin Accept"
    );
    assert_eq!(
        harness.run(false, &to_client(8081)),
        DENY,
        "the Admin Deny after it"
    );
    let answer = ethernet(
        0x0800,
        &ipv4(CLIENT, SERVER, 6, 0, &tcp_with_flags(8080, 40000, 0x12)),
    );
    assert_eq!(
        harness.run(true, &answer),
        ALLOW,
        "the accepted flow's reply"
    );
    let to_server = |port| ethernet(0x0800, &ipv4(CLIENT, SERVER, 6, 0, &tcp(40001, port, true)));
    assert_eq!(
        harness.run(true, &to_server(80)),
        ALLOW,
        "no tier decides: allowed"
    );
    assert_eq!(
        harness.run(true, &to_server(9000)),
        DENY,
        "the Baseline Deny"
    );
}

#[test]
fn an_ipv4_packet_of_protocol_58_is_no_neighbour_solicitation() {
    let Some(harness) = Harness::new() else {
        return;
    };
    // An ICMPv6 neighbour solicitation's first bytes, carried by IPv4: protocol 58 means
    // nothing to IPv4, and this is an ordinary packet of a protocol without ports, which the
    // server's rules (all with ports) do not allow from anybody. Taken for link plumbing, it
    // passed towards any pod and out of any pod, whatever the policy.
    let mut solicitation = vec![135, 0, 0, 0, 0, 0, 0, 0];
    solicitation.extend(SERVER6.octets());
    let frame = |source| ethernet(0x0800, &ipv4(source, SERVER, 58, 0, &solicitation));
    assert_eq!(harness.run(true, &frame(CLIENT)), DENY, "from the client");
    assert_eq!(harness.run(true, &frame(STRANGER)), DENY, "from a stranger");
    // And an ICMP echo request inside IPv6 is no ping either: it opens no echo flow that
    // the pinged peer's replies could ride.
    let outside6: Ipv6Addr = "2001:db8::1".parse().expect("an address");
    let request = ethernet(
        0x86dd,
        &ipv6(SERVER6, outside6, 1, &[], &echo(true, false, 0x2222)),
    );
    assert_eq!(
        harness.run(false, &request),
        ALLOW,
        "egress is not isolated"
    );
    let reply = ethernet(
        0x86dd,
        &ipv6(outside6, SERVER6, 1, &[], &echo(false, false, 0x2222)),
    );
    assert_eq!(
        harness.run(true, &reply),
        ALLOW,
        "a packet of the flow the request opened (protocol 1, no ports) comes back"
    );
}
