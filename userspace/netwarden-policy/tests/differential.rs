//! Differential test: the compiled maps, looked up the way the eBPF program looks them up, must
//! agree with the reference evaluator on every flow of random clusters.
//!
//! `PROPTEST_CASES` sets the number of clusters (default 2,000; `cargo xtask test --thorough`
//! runs 50,000).

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use netwarden_model::{
    Cluster, ContainerPort, LabelSelector, Namespace, NetworkPolicy, Peer, Pod, PodRef, PolicyRef,
    PolicyTypes, PortRef, PortSpec, Protocol, Requirement, Rule,
};
use netwarden_policy::{
    Compiler, DatapathState, Direction,
    evaluate::{self, Flow},
    lookup::{Conntrack, Maps, Packet, Verdict},
};
use proptest::{collection::vec, prelude::*, sample::select};

const LOCAL: &str = "node-1";
const NODE_ADDRESS: IpAddr = IpAddr::V4(Ipv4Addr::new(172, 18, 0, 2));
const KEYS: [&str; 3] = ["app", "tier", "env"];
const VALUES: [&str; 3] = ["a", "b", "c"];
const NAMESPACES: [&str; 3] = ["ns0", "ns1", "ns2"];
const PORT_NAMES: [&str; 4] = ["http", "dns", "sig", "nope"];
const PORTS: [u16; 9] = [53, 80, 81, 85, 5353, 8080, 8090, 9000, 9001];
const PROTOCOLS: [u8; 4] = [6, 17, 132, 1];
const OUTSIDE: [IpAddr; 3] = [
    IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)),
    IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1)),
    IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
];

fn labels() -> impl Strategy<Value = BTreeMap<String, String>> {
    proptest::collection::btree_map(select(&KEYS[..]), select(&VALUES[..]), 0..=2).prop_map(
        |labels| {
            labels
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect()
        },
    )
}

fn requirement() -> impl Strategy<Value = Requirement> {
    let key = select(&KEYS[..]).prop_map(str::to_owned);
    let values = proptest::collection::btree_set(select(&VALUES[..]), 1..=2)
        .prop_map(|values| values.into_iter().map(str::to_owned).collect::<Vec<_>>());
    prop_oneof![
        (key.clone(), values.clone()).prop_map(|(k, v)| Requirement::In(k, v)),
        (key.clone(), values).prop_map(|(k, v)| Requirement::NotIn(k, v)),
        key.clone().prop_map(Requirement::Exists),
        key.prop_map(Requirement::DoesNotExist),
    ]
}

fn selector() -> impl Strategy<Value = LabelSelector> {
    vec(requirement(), 0..=2).prop_map(|requirements| LabelSelector { requirements })
}

/// Blocks around the pod range (10.0.0.0/24, `fd00::/64`) and outside it, with excepts strictly
/// inside.
fn ip_block() -> impl Strategy<Value = Peer> {
    const BLOCKS: [(&str, &[&str]); 9] = [
        (
            "10.0.0.0/24",
            &["10.0.0.0/29", "10.0.0.4/30", "10.0.0.3/32", "10.0.0.128/25"],
        ),
        (
            "10.0.0.0/29",
            &["10.0.0.4/30", "10.0.0.2/31", "10.0.0.5/32"],
        ),
        ("10.0.0.4/30", &["10.0.0.6/32"]),
        ("10.0.0.3/32", &[]),
        ("0.0.0.0/0", &["10.0.0.0/24", "192.0.2.0/24", "10.0.0.1/32"]),
        ("192.0.2.0/24", &["192.0.2.7/32"]),
        ("fd00::/64", &["fd00::/126", "fd00::3/128"]),
        ("fd00::/126", &["fd00::2/127"]),
        ("::/0", &["fd00::/64", "2001:db8::/32"]),
    ];
    select(&BLOCKS[..]).prop_flat_map(|(cidr, excepts)| {
        let excepts: Vec<&str> = excepts.to_vec();
        proptest::sample::subsequence(excepts.clone(), 0..=excepts.len()).prop_map(move |chosen| {
            Peer::IpBlock {
                cidr: cidr.parse().expect("test cidr"),
                except: chosen
                    .iter()
                    .map(|except| except.parse().expect("test except"))
                    .collect(),
            }
        })
    })
}

fn peer() -> impl Strategy<Value = Peer> {
    prop_oneof![
        selector().prop_map(|pods| Peer::Pods {
            pod_selector: Some(pods),
            namespace_selector: None
        }),
        selector().prop_map(|namespaces| Peer::Pods {
            pod_selector: None,
            namespace_selector: Some(namespaces)
        }),
        (selector(), selector()).prop_map(|(pods, namespaces)| Peer::Pods {
            pod_selector: Some(pods),
            namespace_selector: Some(namespaces)
        }),
        ip_block(),
    ]
}

fn protocol() -> impl Strategy<Value = Protocol> {
    select(&[Protocol::Tcp, Protocol::Udp, Protocol::Sctp][..])
}

fn port_spec() -> impl Strategy<Value = PortSpec> {
    let number = select(&PORTS[..]);
    prop_oneof![
        protocol().prop_map(|protocol| PortSpec {
            protocol,
            port: None,
            end_port: None
        }),
        (protocol(), number).prop_map(|(protocol, port)| PortSpec {
            protocol,
            port: Some(PortRef::Number(port)),
            end_port: None
        }),
        (
            protocol(),
            select(&[(80, 90), (8000, 8100), (53, 53), (1, 65535)][..])
        )
            .prop_map(|(protocol, (first, last))| {
                PortSpec {
                    protocol,
                    port: Some(PortRef::Number(first)),
                    end_port: Some(last),
                }
            }),
        (protocol(), select(&PORT_NAMES[..])).prop_map(|(protocol, name)| PortSpec {
            protocol,
            port: Some(PortRef::Name(name.to_owned())),
            end_port: None
        }),
    ]
}

fn rule() -> impl Strategy<Value = Rule> {
    (vec(peer(), 0..=2), vec(port_spec(), 0..=2)).prop_map(|(peers, ports)| Rule { peers, ports })
}

fn policy(index: usize) -> impl Strategy<Value = NetworkPolicy> {
    (
        select(&NAMESPACES[..]),
        selector(),
        select(&[(true, false), (false, true), (true, true)][..]),
        vec(rule(), 0..=2),
        vec(rule(), 0..=2),
    )
        .prop_map(
            move |(namespace, pod_selector, (ingress, egress), ingress_rules, egress_rules)| {
                NetworkPolicy {
                    enforcement: netwarden_model::Enforcement::Enforce,
                    id: PolicyRef {
                        namespace: namespace.to_owned(),
                        name: format!("p{index}"),
                    },
                    pod_selector,
                    policy_types: PolicyTypes { ingress, egress },
                    ingress: ingress_rules,
                    egress: egress_rules,
                }
            },
        )
}

fn container_ports() -> impl Strategy<Value = Vec<ContainerPort>> {
    let candidates = [
        ContainerPort {
            name: Some("http".into()),
            port: 80,
            protocol: Protocol::Tcp,
        },
        ContainerPort {
            name: Some("http".into()),
            port: 8080,
            protocol: Protocol::Tcp,
        },
        ContainerPort {
            name: Some("dns".into()),
            port: 53,
            protocol: Protocol::Udp,
        },
        ContainerPort {
            name: Some("dns".into()),
            port: 5353,
            protocol: Protocol::Udp,
        },
        ContainerPort {
            name: Some("sig".into()),
            port: 9000,
            protocol: Protocol::Sctp,
        },
        ContainerPort {
            name: Some("sig".into()),
            port: 9001,
            protocol: Protocol::Tcp,
        },
        ContainerPort {
            name: None,
            port: 81,
            protocol: Protocol::Tcp,
        },
    ];
    proptest::sample::subsequence(candidates.to_vec(), 0..=3).prop_map(|ports| {
        // Container port names are unique within a pod.
        let mut seen = Vec::new();
        ports
            .into_iter()
            .filter(|port| {
                port.name.is_none()
                    || !seen.contains(&port.name) && {
                        seen.push(port.name.clone());
                        true
                    }
            })
            .collect()
    })
}

fn cluster() -> impl Strategy<Value = Cluster> {
    let pods = vec(
        (
            select(&NAMESPACES[..]),
            labels(),
            any::<bool>(),
            any::<bool>(),
            container_ports(),
        ),
        1..=7,
    );
    let namespaces = vec(labels(), 3);
    let policies = (0..4_usize).map(policy).collect::<Vec<_>>();
    (pods, namespaces, policies, 0..=4_usize).prop_map(
        |(pods, namespace_labels, policies, policy_count)| {
            let mut cluster = Cluster::default();
            for (name, mut labels) in NAMESPACES.iter().zip(namespace_labels) {
                labels.insert("kubernetes.io/metadata.name".into(), (*name).to_owned());
                cluster.namespaces.insert(
                    (*name).to_owned(),
                    Namespace {
                        name: (*name).to_owned(),
                        labels,
                    },
                );
            }
            for (index, (namespace, labels, local, dual_stack, ports)) in
                pods.into_iter().enumerate()
            {
                let number = u8::try_from(index + 1).expect("few pods");
                let mut ips = vec![IpAddr::V4(Ipv4Addr::new(10, 0, 0, number))];
                if dual_stack {
                    ips.push(IpAddr::V6(Ipv6Addr::new(
                        0xfd00,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        u16::from(number),
                    )));
                }
                let id = PodRef {
                    namespace: namespace.to_owned(),
                    name: format!("pod{index}"),
                };
                cluster.pods.insert(
                    id.clone(),
                    Pod {
                        id,
                        labels,
                        node_name: Some(if local { LOCAL } else { "node-2" }.to_owned()),
                        ips,
                        ports,
                        host_network: false,
                        service_account: "default".into(),
                        mtls: netwarden_model::PodMtls::default(),
                    },
                );
            }
            for policy in policies.into_iter().take(policy_count) {
                cluster.policies.insert(policy.id.clone(), policy);
            }
            cluster
        },
    )
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|cases| cases.parse().ok())
        .unwrap_or(2000)
}

/// The first packet of a flow over `protocol` to `port`, between `own`, an address of the
/// endpoint on `ifindex`, and `peer`.
fn first_packet(
    ifindex: u32,
    direction: Direction,
    own: IpAddr,
    peer: IpAddr,
    protocol: u8,
    port: u16,
) -> Packet {
    /// The client's side of every flow.
    const EPHEMERAL_PORT: u16 = 40000;
    let (pod_port, peer_port) = match direction {
        _ if protocol == 1 => (0, 0),
        Direction::Egress => (EPHEMERAL_PORT, port),
        Direction::Ingress => (port, EPHEMERAL_PORT),
    };
    Packet {
        ifindex,
        direction,
        pod_address: own,
        peer_address: peer,
        protocol,
        pod_port,
        peer_port,
        opens_flow: true,
        conntrack: Conntrack::Untracked,
    }
}

/// Every flow between a local pod and any address, in both directions: its first packet put
/// through the kernel's lookup on the maps the agent writes for `state`, and asked of the
/// evaluator.
fn assert_agrees(cluster: &Cluster, state: &DatapathState) -> Result<(), TestCaseError> {
    let mut peers: Vec<IpAddr> = cluster
        .pods
        .values()
        .flat_map(|pod| pod.ips.clone())
        .collect();
    peers.extend(OUTSIDE);
    peers.push(NODE_ADDRESS);
    let local_pods: Vec<&Pod> = cluster
        .pods
        .values()
        .filter(|pod| pod.node_name.as_deref() == Some(LOCAL))
        .collect();
    let mut maps = Maps::new(state, false);
    for (ifindex, pod) in (1..).zip(&local_pods) {
        maps.place_endpoint(ifindex, &pod.id)
            .map_err(|error| TestCaseError::fail(error.to_string()))?;
    }
    for (ifindex, pod) in (1..).zip(&local_pods) {
        for own in &pod.ips {
            for peer in peers
                .iter()
                .filter(|peer| peer.is_ipv4() == own.is_ipv4() && *peer != own)
            {
                for protocol in PROTOCOLS {
                    for port in if protocol == 1 { &[0][..] } else { &PORTS[..] } {
                        let outbound = Flow {
                            source: *own,
                            destination: *peer,
                            protocol,
                            port: *port,
                        };
                        let expected =
                            evaluate::evaluate(cluster, &[NODE_ADDRESS], &outbound).egress;
                        let got = maps.verdict(&first_packet(
                            ifindex,
                            Direction::Egress,
                            *own,
                            *peer,
                            protocol,
                            *port,
                        ));
                        prop_assert_eq!(
                            got.verdict == Verdict::Pass,
                            expected.allows(),
                            "egress {} {} -> {} proto {} port {}: datapath {:?} ({}), evaluator {:?}",
                            pod.id,
                            own,
                            peer,
                            protocol,
                            port,
                            got,
                            got.label(),
                            expected
                        );

                        let inbound = Flow {
                            source: *peer,
                            destination: *own,
                            protocol,
                            port: *port,
                        };
                        let expected =
                            evaluate::evaluate(cluster, &[NODE_ADDRESS], &inbound).ingress;
                        let got = maps.verdict(&first_packet(
                            ifindex,
                            Direction::Ingress,
                            *own,
                            *peer,
                            protocol,
                            *port,
                        ));
                        prop_assert_eq!(
                            got.verdict == Verdict::Pass,
                            expected.allows(),
                            "ingress {} {} <- {} proto {} port {}: datapath {:?} ({}), evaluator {:?}",
                            pod.id,
                            own,
                            peer,
                            protocol,
                            port,
                            got,
                            got.label(),
                            expected
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn compiled_maps_agree_with_the_reference_evaluator(cluster in cluster()) {
        let mut compiler = Compiler::new(LOCAL);
        compiler.set_node_addresses(&[NODE_ADDRESS]);
        assert_agrees(&cluster, compiler.sync(cluster.clone()))?;
    }

    /// The incremental path: one compiler taken through a series of clusters (each a random
    /// set of pod, namespace and policy changes from the last) must agree with the evaluator
    /// at every step, and keep no policy nobody uses.
    #[test]
    fn incremental_updates_agree_with_the_reference_evaluator(clusters in vec(cluster(), 2..=4)) {
        let mut compiler = Compiler::new(LOCAL);
        compiler.set_node_addresses(&[NODE_ADDRESS]);
        for cluster in &clusters {
            let state = compiler.sync(cluster.clone());
            assert_agrees(cluster, state)?;
            let used: std::collections::BTreeSet<u32> = state
                .endpoints
                .values()
                .flat_map(|endpoint| [endpoint.ingress, endpoint.egress])
                .flatten()
                .collect();
            prop_assert_eq!(used, state.policies.keys().copied().collect());
        }
    }
}
