//! Random clusters for property tests (feature `test-support`): pods of three namespaces on two
//! nodes, NetworkPolicies with every kind of peer and port, and ClusterNetworkPolicies of both
//! tiers. The compiler's differential test (`tests/differential.rs`) checks the compiled maps
//! against the reference evaluator on them; the datapath's packet differential test
//! (`netwarden-datapath/tests/packet_differential.rs`) loads them into the kernel.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use netwarden_model::{
    Action, Cluster, ClusterNetworkPolicy, ClusterPeer, ClusterPort, ClusterRule, ClusterSubject,
    ContainerPort, LabelSelector, Namespace, NetworkPolicy, Node, Peer, Pod, PodRef, PolicyRef,
    PolicyTypes, PortRef, PortSpec, Protocol, Requirement, Rule, Tier,
};
use proptest::{collection::vec, prelude::*, sample::select};

/// Whether the differential tests' clusters hold ClusterNetworkPolicies (turned off only to
/// tell a NetworkPolicy regression from a tier one).
const COMPILER_COMPILES_CLUSTER_POLICIES: bool = true;

/// The node the compiler compiles for.
pub const LOCAL: &str = "node-1";
/// The local node's address.
pub const NODE_ADDRESS: IpAddr = IpAddr::V4(Ipv4Addr::new(172, 18, 0, 2));
/// The other node's address: a `nodes` peer may select it, and flows reach it.
pub const OTHER_NODE_ADDRESS: IpAddr = IpAddr::V4(Ipv4Addr::new(172, 18, 0, 3));
const KEYS: [&str; 3] = ["app", "tier", "env"];
const VALUES: [&str; 3] = ["a", "b", "c"];
/// The generated clusters' namespaces.
pub const NAMESPACES: [&str; 3] = ["ns0", "ns1", "ns2"];
const PORT_NAMES: [&str; 4] = ["http", "dns", "sig", "nope"];
/// The ports rules name, and flows go to.
pub const PORTS: [u16; 9] = [53, 80, 81, 85, 5353, 8080, 8090, 9000, 9001];
/// The protocols flows use: TCP, UDP, SCTP and ICMP.
pub const PROTOCOLS: [u8; 4] = [6, 17, 132, 1];
/// Addresses outside the cluster, both families.
pub const OUTSIDE: [IpAddr; 3] = [
    IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)),
    IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1)),
    IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
];

/// Labels from a small alphabet of keys and values, so that selectors match often.
pub fn labels() -> impl Strategy<Value = BTreeMap<String, String>> {
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

/// Blocks for `networks` peers: around the pods, the nodes and the outside, both families.
fn networks() -> impl Strategy<Value = ClusterPeer> {
    const NETWORKS: [&str; 8] = [
        "10.0.0.0/24",
        "10.0.0.0/30",
        "10.0.0.3/32",
        "0.0.0.0/0",
        "172.18.0.0/16",
        "192.0.2.0/24",
        "fd00::/64",
        "::/0",
    ];
    proptest::sample::subsequence(NETWORKS.to_vec(), 1..=2).prop_map(|blocks| {
        ClusterPeer::Networks(
            blocks
                .iter()
                .map(|block| block.parse().expect("test network"))
                .collect(),
        )
    })
}

fn cluster_peer(ingress: bool) -> BoxedStrategy<ClusterPeer> {
    let pods = prop_oneof![
        4 => selector().prop_map(ClusterPeer::Namespaces),
        4 => (selector(), selector()).prop_map(|(namespace_selector, pod_selector)| {
            ClusterPeer::Pods {
                namespace_selector,
                pod_selector,
            }
        }),
        // What a Deny or Pass rule with a peer that cannot be enforced becomes.
        1 => Just(ClusterPeer::Everything),
    ];
    if ingress {
        return pods.boxed();
    }
    prop_oneof![
        9 => pods,
        3 => networks(),
        2 => selector().prop_map(ClusterPeer::Nodes),
    ]
    .boxed()
}

fn cluster_port() -> impl Strategy<Value = ClusterPort> {
    prop_oneof![
        (protocol(), select(&PORTS[..])).prop_map(|(protocol, port)| ClusterPort::Range {
            protocol,
            first: port,
            last: port
        }),
        (
            protocol(),
            select(&[(80, 90), (8000, 8100), (1, 65535)][..])
        )
            .prop_map(|(protocol, (first, last))| ClusterPort::Range {
                protocol,
                first,
                last
            }),
        select(&PORT_NAMES[..]).prop_map(|name| ClusterPort::Named(name.to_owned())),
    ]
}

fn cluster_rule(ingress: bool) -> impl Strategy<Value = ClusterRule> {
    (
        select(&[Action::Accept, Action::Deny, Action::Pass][..]),
        vec(cluster_peer(ingress), 1..=2),
        vec(cluster_port(), 0..=2),
    )
        .prop_map(|(action, peers, mut ports)| {
            // The CRD rejects named ports towards addresses that are not pods.
            if peers
                .iter()
                .any(|peer| matches!(peer, ClusterPeer::Networks(_) | ClusterPeer::Nodes(_)))
            {
                ports.retain(|port| !matches!(port, ClusterPort::Named(_)));
            }
            ClusterRule {
                name: None,
                action,
                peers,
                ports,
            }
        })
}

fn cluster_policy(index: usize) -> impl Strategy<Value = ClusterNetworkPolicy> {
    let subject = prop_oneof![
        selector().prop_map(ClusterSubject::Namespaces),
        (selector(), selector()).prop_map(|(namespace_selector, pod_selector)| {
            ClusterSubject::Pods {
                namespace_selector,
                pod_selector,
            }
        }),
    ];
    (
        select(&[Tier::Admin, Tier::Baseline][..]),
        // Few values, so that equal priorities (ties) are common.
        select(&[0_u16, 5, 5, 10, 1000][..]),
        subject,
        vec(cluster_rule(true), 0..=3),
        vec(cluster_rule(false), 0..=3),
    )
        .prop_map(
            move |(tier, priority, subject, ingress, egress)| ClusterNetworkPolicy {
                name: format!("cnp{index}"),
                tier,
                priority,
                subject,
                ingress,
                egress,
                problems: Vec::new(),
            },
        )
}

/// Both nodes, labelled at random for `nodes` peers.
fn nodes() -> impl Strategy<Value = Vec<Node>> {
    (labels(), labels()).prop_map(|(local, other)| {
        vec![
            Node {
                name: LOCAL.to_owned(),
                labels: local,
                addresses: vec![NODE_ADDRESS],
            },
            Node {
                name: "node-2".to_owned(),
                labels: other,
                addresses: vec![OTHER_NODE_ADDRESS],
            },
        ]
    })
}

/// A cluster with NetworkPolicies and, when `with_cluster_policies`, up to four
/// ClusterNetworkPolicies and the nodes.
pub fn cluster_with(with_cluster_policies: bool) -> impl Strategy<Value = Cluster> {
    let cluster_policies = (0..4_usize).map(cluster_policy).collect::<Vec<_>>();
    let count = if with_cluster_policies {
        0..=4_usize
    } else {
        0..=0
    };
    (
        cluster_without_cluster_policies(),
        cluster_policies,
        count,
        nodes(),
    )
        .prop_map(move |(mut cluster, cluster_policies, count, nodes)| {
            if with_cluster_policies {
                for node in nodes {
                    cluster.nodes.insert(node.name.clone(), node);
                }
            }
            for policy in cluster_policies.into_iter().take(count) {
                cluster.cluster_policies.insert(policy.name.clone(), policy);
            }
            cluster
        })
}

/// The clusters the differential tests give the compiler.
pub fn cluster() -> impl Strategy<Value = Cluster> {
    cluster_with(COMPILER_COMPILES_CLUSTER_POLICIES)
}

fn cluster_without_cluster_policies() -> impl Strategy<Value = Cluster> {
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
            for (name, labels) in NAMESPACES.iter().zip(namespace_labels) {
                set_namespace(&mut cluster, name, labels);
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
                add_pod(
                    &mut cluster,
                    namespace,
                    &format!("pod{index}"),
                    labels,
                    local,
                    ips,
                    ports,
                );
            }
            for policy in policies.into_iter().take(policy_count) {
                cluster.policies.insert(policy.id.clone(), policy.into());
            }
            cluster
        },
    )
}

/// Creates or relabels namespace `name`, with the name label the API server adds.
pub fn set_namespace(cluster: &mut Cluster, name: &str, mut labels: BTreeMap<String, String>) {
    labels.insert("kubernetes.io/metadata.name".into(), name.to_owned());
    cluster.namespaces.insert(
        name.to_owned(),
        Namespace {
            name: name.to_owned(),
            labels: labels.into(),
        },
    );
}

/// Adds pod `namespace/name`, on the local node or on another.
pub fn add_pod(
    cluster: &mut Cluster,
    namespace: &str,
    name: &str,
    labels: BTreeMap<String, String>,
    local: bool,
    ips: Vec<IpAddr>,
    ports: Vec<ContainerPort>,
) {
    let id = PodRef {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    };
    cluster.pods.insert(
        id.clone(),
        Pod {
            id,
            labels: labels.into(),
            node_name: Some(if local { LOCAL } else { "node-2" }.to_owned().into()),
            ips,
            ports: ports.into(),
            host_network: false,
            service_account: "default".into(),
            mtls: netwarden_model::PodMtls::default().into(),
        },
    );
}
