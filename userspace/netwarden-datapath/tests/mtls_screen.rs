//! The mTLS screen run by the kernel on crafted frames (`BPF_PROG_TEST_RUN`): a new TCP flow to
//! an mTLS-strict pod must open with a TLS ClientHello; exempt ports and other pods are not
//! screened; a flow the identity check refused drops both ways.
//!
//! Needs root (it loads programs and mounts a private bpffs); skipped with a message otherwise.
//! Programs are never attached to any interface.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use netwarden_common::{counter, direction, flow_flags};
use netwarden_datapath::{Capacity, Datapath};
use netwarden_policy::Compiler;

mod common;

use common::{IFINDEX, PrivateBpffs};

const ALLOW: i32 = -1;
const DENY: i32 = 2;

const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const SERVER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);
const HTTPS: u16 = 443;
const METRICS: u16 = 9090;
/// Single runs per median of the screen's cost on the ClientHello itself.
const RUNS: usize = 20_000;
/// Kernel-side repetitions per mean of the screen's cost.
const REPEAT: u32 = 200_000;

/// The server is strict by its label; its policy admits the client on 443 and 9090.
const MANIFESTS: &str = r"
apiVersion: v1
kind: Pod
metadata:
  name: server
  namespace: x
  labels: {app: server, netwarden.dev/mtls: strict}
  annotations: {netwarden.dev/mtls-exempt-ports: '9090'}
spec: {nodeName: node-1, containers: [{name: c}]}
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
    ports: [{port: 443}, {port: 9090}]
";

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
    /// The datapath with `MANIFESTS` applied; the server is made strict when `strict`, with
    /// the exempt ports its annotation names.
    fn new(strict: bool) -> Option<Self> {
        let bpffs = PrivateBpffs::new()?;
        let (mut datapath, _) = Datapath::open(bpffs.path(), &Capacity::default())
            .unwrap_or_else(|error| panic!("loading the datapath: {error}"));
        datapath.detached();
        let cluster = common::cluster_from(MANIFESTS);
        let server = &cluster.pods[&netwarden_model::manifests::pod_ref("x/server")];
        assert!(cluster.is_mtls_strict(server));
        let exempt = server.mtls.exempt_ports.clone();
        let mut compiler = Compiler::new("node-1");
        let state = compiler.sync(cluster);
        let network = common::loopback_node(&[IpAddr::V4(SERVER), IpAddr::V6(SERVER6)]);
        let report = datapath.apply(state, &network);
        assert!(
            report.errors.is_empty(),
            "apply errors: {:?}",
            report.errors
        );
        if strict {
            let changed = datapath
                .sync_mtls(&BTreeMap::from([(IFINDEX, exempt)]))
                .expect("write the mTLS maps");
            assert!(changed);
        }
        Some(Self {
            datapath: Some(datapath),
            bpffs,
        })
    }

    fn datapath(&mut self) -> &mut Datapath {
        self.datapath.as_mut().expect("present until drop")
    }

    fn run(&mut self, towards_pod: bool, frame: &[u8]) -> i32 {
        self.datapath()
            .test_run(towards_pod, frame, IFINDEX, 1)
            .expect("BPF_PROG_TEST_RUN")
            .0
    }

    /// The reason's counter, both directions together.
    fn counter(&mut self, reason: u32) -> u64 {
        let verdicts = self.datapath().verdicts();
        [direction::INGRESS, direction::EGRESS]
            .into_iter()
            .map(|dir| verdicts[counter::slot(dir, reason) as usize])
            .sum()
    }
}

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const PSH_ACK: u8 = 0x18;

/// The client's ISN in every test: its stream starts at `ISN + 1`.
const ISN: u32 = 1;

/// An Ethernet frame of a TCP segment between the client (`client_port`) and the server
/// (`server_port`), towards the server when `to_server`: a SYN at the client's [`ISN`], any
/// other segment at `ISN + 1` with no acknowledgement number.
fn segment(
    v6: bool,
    to_server: bool,
    client_port: u16,
    server_port: u16,
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    let seq = if flags & SYN == 0 { ISN + 1 } else { ISN };
    numbered(
        v6,
        Ends {
            to_server,
            client_port,
            server_port,
        },
        flags,
        (seq, 0),
        payload,
    )
}

/// Which way a segment goes, between which ports.
#[derive(Clone, Copy)]
struct Ends {
    to_server: bool,
    client_port: u16,
    server_port: u16,
}

/// [`segment`] with its sequence and acknowledgement numbers.
fn numbered(v6: bool, ends: Ends, flags: u8, (seq, ack): (u32, u32), payload: &[u8]) -> Vec<u8> {
    let Ends {
        to_server,
        client_port,
        server_port,
    } = ends;
    let (source_port, destination_port) = if to_server {
        (client_port, server_port)
    } else {
        (server_port, client_port)
    };
    let mut tcp = Vec::new();
    tcp.extend(source_port.to_be_bytes());
    tcp.extend(destination_port.to_be_bytes());
    tcp.extend(seq.to_be_bytes());
    tcp.extend(ack.to_be_bytes());
    tcp.extend([0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    tcp.extend(payload);
    let mut frame = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    if v6 {
        let (source, destination) = if to_server {
            (CLIENT6, SERVER6)
        } else {
            (SERVER6, CLIENT6)
        };
        frame.extend(0x86dd_u16.to_be_bytes());
        frame.extend([0x60, 0, 0, 0]);
        frame.extend(u16::try_from(tcp.len()).unwrap().to_be_bytes());
        frame.extend([6, 64]);
        frame.extend(source.octets());
        frame.extend(destination.octets());
    } else {
        let (source, destination) = if to_server {
            (CLIENT, SERVER)
        } else {
            (SERVER, CLIENT)
        };
        frame.extend(0x0800_u16.to_be_bytes());
        frame.extend([0x45, 0]);
        frame.extend(u16::try_from(20 + tcp.len()).unwrap().to_be_bytes());
        frame.extend([0, 1, 0, 0, 64, 6, 0, 0]);
        frame.extend(source.octets());
        frame.extend(destination.octets());
    }
    frame.extend(tcp);
    frame
}

/// The start of a TLS 1.3 ClientHello as clients send it: a handshake record with the legacy
/// version 3.1, then handshake type 1.
fn client_hello() -> Vec<u8> {
    let mut record = vec![
        0x16, 0x03, 0x01, 0x00, 0xc4, 0x01, 0x00, 0x00, 0xc0, 0x03, 0x03,
    ];
    record.extend([0x5a; 32]);
    record
}

/// Opens a flow: SYN (towards the pod) and the client's ACK; both must pass.
fn open(harness: &mut Harness, v6: bool, client_port: u16, server_port: u16) {
    assert_eq!(
        harness.run(true, &segment(v6, true, client_port, server_port, SYN, &[])),
        ALLOW,
        "SYN"
    );
    assert_eq!(
        harness.run(
            false,
            &segment(v6, false, client_port, server_port, SYN | ACK, &[])
        ),
        ALLOW,
        "SYN-ACK"
    );
    assert_eq!(
        harness.run(true, &segment(v6, true, client_port, server_port, ACK, &[])),
        ALLOW,
        "ACK"
    );
}

#[test]
fn a_client_hello_opens_a_strict_flow_and_plaintext_cuts_it() {
    let Some(mut harness) = Harness::new(true) else {
        return;
    };
    for v6 in [false, true] {
        // TLS: the ClientHello passes, and after it the flow is an ordinary one.
        open(&mut harness, v6, 40000, HTTPS);
        assert_eq!(
            harness.run(
                true,
                &segment(v6, true, 40000, HTTPS, PSH_ACK, &client_hello())
            ),
            ALLOW
        );
        let after_hello = ISN + 1 + u32::try_from(client_hello().len()).unwrap();
        let ends = |to_server| Ends {
            to_server,
            client_port: 40000,
            server_port: HTTPS,
        };
        assert_eq!(
            harness.run(
                false,
                &numbered(
                    v6,
                    ends(false),
                    PSH_ACK,
                    (7000, after_hello),
                    b"\x16\x03\x03server hello"
                )
            ),
            ALLOW
        );
        assert_eq!(
            harness.run(
                true,
                &numbered(
                    v6,
                    ends(true),
                    PSH_ACK,
                    (after_hello, 7000),
                    b"\x17\x03\x03application data"
                )
            ),
            ALLOW
        );

        // Plaintext HTTP on the same port: cut, then every packet of the flow drops both ways.
        let before = harness.counter(counter::DENIED_PLAINTEXT_TO_STRICT);
        open(&mut harness, v6, 40001, HTTPS);
        assert_eq!(
            harness.run(
                true,
                &segment(v6, true, 40001, HTTPS, PSH_ACK, b"GET / HTTP/1.1\r\n\r\n")
            ),
            DENY
        );
        assert_eq!(
            harness.run(
                true,
                &segment(v6, true, 40001, HTTPS, PSH_ACK, &client_hello())
            ),
            DENY,
            "too late for a ClientHello"
        );
        assert_eq!(
            harness.run(false, &segment(v6, false, 40001, HTTPS, ACK, &[])),
            DENY,
            "the server's side is cut too"
        );
        assert_eq!(
            harness.counter(counter::DENIED_PLAINTEXT_TO_STRICT),
            before + 3
        );
    }
}

#[test]
fn alerts_short_records_and_other_handshakes_are_not_a_client_hello() {
    let Some(mut harness) = Harness::new(true) else {
        return;
    };
    let not_client_hellos: [&[u8]; 5] = [
        b"\x15\x03\x03\x00\x02\x02\x28",     // a TLS alert
        b"\x16\x03",                         // fewer than six bytes
        b"\x16\x03\x03\x00\x40\x02\x00\x00", // a ServerHello from the client
        b"\x16\x03\x05\x00\x40\x01\x00\x00", // no such TLS version
        b"\x16\x02\x00\x00\x40\x01\x00\x00", // SSL 2
    ];
    for (index, payload) in not_client_hellos.iter().enumerate() {
        let port = 41000 + u16::try_from(index).unwrap();
        open(&mut harness, false, port, HTTPS);
        assert_eq!(
            harness.run(true, &segment(false, true, port, HTTPS, PSH_ACK, payload)),
            DENY,
            "payload {index}"
        );
    }
    // A SYN carrying data (TCP Fast Open) is screened too.
    assert_eq!(
        harness.run(
            true,
            &segment(false, true, 42000, HTTPS, SYN, b"GET / HTTP/1.1\r\n")
        ),
        DENY
    );
}

#[test]
fn exempt_ports_and_pods_that_are_not_strict_accept_plaintext() {
    let Some(mut strict) = Harness::new(true) else {
        return;
    };
    open(&mut strict, false, 40000, METRICS);
    assert_eq!(
        strict.run(
            true,
            &segment(
                false,
                true,
                40000,
                METRICS,
                PSH_ACK,
                b"GET /metrics HTTP/1.1\r\n"
            )
        ),
        ALLOW
    );
    let Some(mut lax) = Harness::new(false) else {
        return;
    };
    open(&mut lax, false, 40000, HTTPS);
    assert_eq!(
        lax.run(
            true,
            &segment(false, true, 40000, HTTPS, PSH_ACK, b"GET / HTTP/1.1\r\n")
        ),
        ALLOW
    );
    // The screen never loosens the policy: a port no rule allows is still dropped.
    assert_eq!(
        strict.run(true, &segment(false, true, 40002, 8080, SYN, &[])),
        DENY
    );
}

#[test]
fn a_flow_the_identity_check_refused_drops_both_ways() {
    let Some(mut harness) = Harness::new(true) else {
        return;
    };
    let mut cutter = harness.datapath().flow_cutter().expect("conntrack handle");
    open(&mut harness, false, 40000, HTTPS);
    assert_eq!(
        harness.run(
            true,
            &segment(false, true, 40000, HTTPS, PSH_ACK, &client_hello())
        ),
        ALLOW
    );
    acknowledge_client_hello(&mut harness, 40000);
    let pod = SocketAddr::new(IpAddr::V4(SERVER), HTTPS);
    let peer = SocketAddr::new(IpAddr::V4(CLIENT), 40000);
    assert!(
        cutter
            .cut(IFINDEX, pod, peer, direction::INGRESS)
            .expect("cut the flow")
    );
    assert_eq!(
        cutter.flags(IFINDEX, pod, peer),
        Some(flow_flags::CUT_BY_IDENTITY)
    );
    assert_eq!(
        harness.run(
            true,
            &segment(false, true, 40000, HTTPS, PSH_ACK, b"\x17\x03\x03more")
        ),
        DENY
    );
    assert_eq!(
        harness.run(
            false,
            &segment(false, false, 40000, HTTPS, PSH_ACK, b"\x17\x03\x03reply")
        ),
        DENY
    );
    assert_eq!(harness.counter(counter::DENIED_BY_IDENTITY), 2);
    // A flow cut before it was seen cannot open afterwards.
    let later = SocketAddr::new(IpAddr::V4(CLIENT), 40001);
    assert!(
        !cutter
            .cut(IFINDEX, pod, later, direction::INGRESS)
            .expect("cut the flow")
    );
    assert_eq!(
        harness.run(true, &segment(false, true, 40001, HTTPS, SYN, &[])),
        DENY
    );
}

/// What the screen adds to a packet it inspects, measured two ways on the same tracked flow:
///
/// - the kernel's own mean over `REPEAT` runs of one client segment without payload, with the
///   flow awaiting its ClientHello (the screen parses down to the payload, finds none, and
///   leaves the flow as it was, so every run does the same work) and without (the fast path);
/// - the ClientHello segment itself, one run at a time with the flag set again before each run
///   (per-run timings are coarse; the median of many is printed for reference).
///
/// Prints the figures (`--nocapture`); fails only if the screen costs more than 1 µs.
#[test]
fn the_client_hello_check_costs_little() {
    let Some(mut harness) = Harness::new(true) else {
        return;
    };
    let mut cutter = harness.datapath().flow_cutter().expect("conntrack handle");
    open(&mut harness, false, 40000, HTTPS);
    let pod = SocketAddr::new(IpAddr::V4(SERVER), HTTPS);
    let peer = SocketAddr::new(IpAddr::V4(CLIENT), 40000);
    let ack = segment(false, true, 40000, HTTPS, ACK, &[]);
    let mut mean = |flags: u32| -> Duration {
        cutter
            .set_flags(IFINDEX, pod, peer, flags)
            .expect("set flags");
        let (verdict, took) = harness
            .datapath()
            .test_run(true, &ack, IFINDEX, REPEAT)
            .expect("BPF_PROG_TEST_RUN");
        assert_eq!(verdict, ALLOW);
        took
    };
    // Interleaved rounds, so frequency changes and other load hit both alike; best of each.
    let mut screened = Vec::new();
    let mut fast = Vec::new();
    for _ in 0..5 {
        screened.push(mean(
            flow_flags::AWAITING_CLIENT_HELLO | flow_flags::ISN_KNOWN,
        ));
        fast.push(mean(0));
    }
    let screened = *screened.iter().min().expect("rounds");
    let fast = *fast.iter().min().expect("rounds");
    let added = screened.saturating_sub(fast);

    let hello = segment(false, true, 40000, HTTPS, PSH_ACK, &client_hello());
    let mut per_run = |flags: u32| -> Duration {
        let mut samples: Vec<Duration> = (0..RUNS)
            .map(|_| {
                cutter
                    .set_flags(IFINDEX, pod, peer, flags)
                    .expect("set flags");
                let (verdict, took) = harness
                    .datapath()
                    .test_run(true, &hello, IFINDEX, 1)
                    .expect("BPF_PROG_TEST_RUN");
                assert_eq!(verdict, ALLOW);
                took
            })
            .collect();
        samples.sort();
        samples[RUNS / 2]
    };
    let hello_screened = per_run(flow_flags::AWAITING_CLIENT_HELLO | flow_flags::ISN_KNOWN);
    let hello_fast = per_run(0);
    println!(
        "mTLS screen: tracked segment {} ns, screened {} ns: +{} ns per screened packet (kernel mean of {REPEAT} runs, best of 5 rounds); ClientHello segment, single runs: {} ns screened vs {} ns fast path (median of {RUNS})",
        fast.as_nanos(),
        screened.as_nanos(),
        added.as_nanos(),
        hello_screened.as_nanos(),
        hello_fast.as_nanos(),
    );
    assert!(
        added < Duration::from_micros(1),
        "the screen costs {added:?}"
    );
}

#[test]
fn sync_mtls_adds_and_removes_exactly_what_changed() {
    let Some(mut harness) = Harness::new(true) else {
        return;
    };
    let same = BTreeMap::from([(IFINDEX, BTreeSet::from([METRICS]))]);
    assert!(
        !harness
            .datapath()
            .sync_mtls(&same)
            .expect("sync the mTLS maps")
    );
    // The pod stops being strict: plaintext opens flows again.
    assert!(
        harness
            .datapath()
            .sync_mtls(&BTreeMap::new())
            .expect("sync the mTLS maps")
    );
    open(&mut harness, false, 40000, HTTPS);
    assert_eq!(
        harness.run(
            true,
            &segment(false, true, 40000, HTTPS, PSH_ACK, b"GET / HTTP/1.1\r\n")
        ),
        ALLOW
    );
}

#[test]
fn unscreened_bytes_never_reach_a_strict_pod_when_conntrack_forgot_the_flow() {
    use std::time::Duration;

    use netwarden_datapath::conntrack::{Sweeper, Timeouts};

    let Some(mut harness) = Harness::new(true) else {
        return;
    };
    let minute = Duration::from_mins(1);
    let mut sweeper = Sweeper::open(harness.bpffs.path(), minute, Timeouts::default())
        .expect("the conntrack map is pinned under the harness's bpffs");

    // A screened connection (ClientHello seen) and a plaintext one on the exempt port.
    open(&mut harness, false, 41000, HTTPS);
    let hello = segment(false, true, 41000, HTTPS, PSH_ACK, &client_hello());
    assert_eq!(harness.run(true, &hello), ALLOW);
    open(&mut harness, false, 41001, METRICS);
    // A flow still awaiting its ClientHello.
    open(&mut harness, false, 41002, HTTPS);

    // Seven hours on, every flow is idle past its timeout.
    let report = sweeper
        .sweep_after(Duration::from_hours(7))
        .expect("the conntrack clock reads");
    assert_eq!(
        (report.flows(), report.expired()),
        (3, 3),
        "all three flows expired"
    );

    // Conntrack no longer knows them: payload to the strict port drops, whatever it is...
    let application_data = segment(false, true, 41000, HTTPS, PSH_ACK, b"\x17\x03\x03data");
    assert_eq!(harness.run(true, &application_data), DENY);
    let plaintext = segment(
        false,
        true,
        41002,
        HTTPS,
        PSH_ACK,
        b"GET / HTTP/1.1\r\n\r\n",
    );
    assert_eq!(harness.run(true, &plaintext), DENY, "no screen, no bytes");
    // ...a bare ACK still passes as the policy says, and the exempt port keeps plaintext.
    assert_eq!(
        harness.run(true, &segment(false, true, 41000, HTTPS, ACK, &[])),
        ALLOW
    );
    let exempt = segment(
        false,
        true,
        41001,
        METRICS,
        PSH_ACK,
        b"GET /metrics\r\n\r\n",
    );
    assert_eq!(harness.run(true, &exempt), ALLOW);
}

/// The server's ACK of the IPv4 ClientHello the client sent from `client_port` at `ISN + 1`.
fn acknowledge_client_hello(harness: &mut Harness, client_port: u16) {
    let after_hello = ISN + 1 + u32::try_from(client_hello().len()).unwrap();
    let ack = numbered(
        false,
        Ends {
            to_server: false,
            client_port,
            server_port: HTTPS,
        },
        ACK,
        (7000, after_hello),
        &[],
    );
    assert_eq!(harness.run(false, &ack), ALLOW, "the server's ACK");
}

#[test]
fn a_client_hello_counts_only_at_the_clients_isn_plus_one_until_the_pod_acknowledged_it() {
    let Some(mut harness) = Harness::new(true) else {
        return;
    };
    let to_server = |client_port| Ends {
        to_server: true,
        client_port,
        server_port: HTTPS,
    };
    let plaintext = b"GET / HTTP/1.1\r\n\r\n";

    // A ClientHello out of the window (the pod's stack discards it) opens nothing, and
    // plaintext at the stream's start is still screened.
    open(&mut harness, false, 40000, HTTPS);
    let elsewhere = numbered(
        false,
        to_server(40000),
        PSH_ACK,
        (ISN + 100_000, 0),
        &client_hello(),
    );
    assert_eq!(
        harness.run(true, &elsewhere),
        ALLOW,
        "bytes after the start wait in the pod"
    );
    let before = numbered(
        false,
        to_server(40000),
        PSH_ACK,
        (ISN.wrapping_sub(10), 0),
        &client_hello(),
    );
    assert_eq!(
        harness.run(true, &before),
        DENY,
        "bytes before the start may overlap it"
    );
    let start = |payload: &[u8]| numbered(false, to_server(40000), PSH_ACK, (ISN + 1, 0), payload);
    assert_eq!(
        harness.run(true, &start(plaintext)),
        DENY,
        "plaintext at ISN + 1"
    );

    // The ClientHello at ISN + 1 passes, but until the pod acknowledged it, the stream's start
    // is still screened: a ClientHello with a bad checksum is discarded by the pod's stack and
    // must not leave room for plaintext in its place.
    open(&mut harness, false, 40001, HTTPS);
    let start = |payload: &[u8]| numbered(false, to_server(40001), PSH_ACK, (ISN + 1, 0), payload);
    assert_eq!(harness.run(true, &start(&client_hello())), ALLOW);
    assert_eq!(
        harness.run(true, &start(&client_hello())),
        ALLOW,
        "its retransmission"
    );
    assert_eq!(
        harness.run(true, &start(plaintext)),
        DENY,
        "plaintext in its place"
    );

    // Acknowledged: the flow is an ordinary one.
    open(&mut harness, false, 40002, HTTPS);
    let start = |payload: &[u8]| numbered(false, to_server(40002), PSH_ACK, (ISN + 1, 0), payload);
    assert_eq!(harness.run(true, &start(&client_hello())), ALLOW);
    acknowledge_client_hello(&mut harness, 40002);
    assert_eq!(
        harness.run(true, &start(plaintext)),
        ALLOW,
        "the pod took the ClientHello"
    );

    // A second SYN with another ISN would move the stream's start away from the pod's.
    open(&mut harness, false, 40003, HTTPS);
    let other_syn = numbered(false, to_server(40003), SYN, (ISN + 5000, 0), &[]);
    assert_eq!(harness.run(true, &other_syn), DENY);
}

#[test]
fn big_tcp_length_fields_of_zero_do_not_hide_a_payload() {
    let Some(mut harness) = Harness::new(true) else {
        return;
    };
    for v6 in [false, true] {
        open(&mut harness, v6, 40000, HTTPS);
        let mut frame = segment(v6, true, 40000, HTTPS, PSH_ACK, b"GET / HTTP/1.1\r\n\r\n");
        // IPv4 total length (14 + 2), IPv6 payload length (14 + 4): 0, as BIG TCP sends them.
        let length = if v6 { 14 + 4 } else { 14 + 2 };
        frame[length..length + 2].copy_from_slice(&[0, 0]);
        assert_eq!(harness.run(true, &frame), DENY, "v6: {v6}");
    }
}
