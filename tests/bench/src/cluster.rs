//! A generated cluster at the scale of the compile benchmark. By default ([`Shape::DEFAULT`]):
//! 100 namespaces of 10 apps with 10 replicas each (10,000 pods), 10 policies per namespace
//! (1,000) using every feature of `networking.k8s.io/v1`, 200 ClusterNetworkPolicies (100 Admin,
//! 100 Baseline), a node for every 110 pods, and 110 of the pods on the benchmarked node. Larger
//! shapes (`--pods`, `--policies`, `--namespaces`) spread pods and policies over the namespaces
//! the same way; the benchmarked node keeps 110 pods whatever the size, as a kubelet would.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use netwarden_model::{
    Action, Cluster, ClusterNetworkPolicy, ClusterPeer, ClusterPort, ClusterRule, ClusterSubject,
    ContainerPort, LabelSelector, Namespace, NetworkPolicy, Node, Peer, Pod, PodRef, PolicyRef,
    PolicyTypes, PortRef, PortSpec, Protocol, Requirement, Rule, Tier,
};

/// The node whose pods are the local endpoints.
pub const NODE: &str = "node-0";
/// Replicas per app (Deployment): a namespace's pods are apps of this many replicas.
pub const REPLICAS: usize = 10;
/// Pods per node, the kubelet's default limit: the benchmarked node is full, at any size.
const PODS_PER_NODE: usize = 110;
/// The policy templates of a namespace ([`policies`]).
const TEMPLATES: usize = 10;
/// ClusterNetworkPolicies of each tier (issue #15: 200 in all).
pub const CLUSTER_POLICIES_PER_TIER: usize = 100;

/// How large a cluster to generate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    /// Namespaces.
    pub namespaces: usize,
    /// Pods, spread evenly over the namespaces.
    pub pods: usize,
    /// NetworkPolicies, spread evenly over the namespaces.
    pub policies: usize,
}

impl Shape {
    /// The compile benchmark's cluster, whose targets are issue #17's.
    pub const DEFAULT: Self = Self {
        namespaces: 100,
        pods: 10_000,
        policies: 1_000,
    };

    /// Nodes: one for every [`PODS_PER_NODE`] pods; pod `index` runs on node `index % nodes`,
    /// so node 0, the benchmarked one, gets 110.
    #[must_use]
    pub fn nodes(&self) -> usize {
        self.pods.div_ceil(PODS_PER_NODE).max(1)
    }

    /// Pods of namespace `ns` (the first namespaces take the remainder).
    #[must_use]
    pub fn pods_in(&self, ns: usize) -> usize {
        share(self.pods, self.namespaces, ns)
    }

    /// NetworkPolicies of namespace `ns`.
    #[must_use]
    pub fn policies_in(&self, ns: usize) -> usize {
        share(self.policies, self.namespaces, ns)
    }

    /// Apps of namespace `ns`.
    #[must_use]
    pub fn apps_in(&self, ns: usize) -> usize {
        self.pods_in(ns).div_ceil(REPLICAS)
    }

    /// This shape at `pods` pods: namespaces and policies in the same proportion to pods.
    #[must_use]
    pub fn scaled_to(&self, pods: usize) -> Self {
        let scale = |count: usize| (count * pods).div_ceil(self.pods).max(1);
        Self {
            namespaces: scale(self.namespaces),
            pods,
            policies: scale(self.policies),
        }
    }

    /// A remote pod in the middle of the cluster (`ns-050/app-5-3` by default), for the
    /// incremental benchmarks.
    #[must_use]
    pub fn sample_pod(&self) -> PodRef {
        let ns = self.namespaces / 2;
        PodRef {
            namespace: namespace_name(ns),
            name: format!("app-{}-3", self.apps_in(ns) / 2),
        }
    }
}

/// Part `index` of `total` split into `parts` nearly equal parts.
fn share(total: usize, parts: usize, index: usize) -> usize {
    total / parts + usize::from(index < total % parts)
}

/// The name of namespace `ns`.
#[must_use]
pub fn namespace_name(ns: usize) -> String {
    format!("ns-{ns:03}")
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
        .collect()
}

fn select(pairs: &[(&str, &str)]) -> LabelSelector {
    LabelSelector {
        requirements: pairs
            .iter()
            .map(|(key, value)| Requirement::In((*key).to_owned(), vec![(*value).to_owned()]))
            .collect(),
    }
}

fn tier(app: usize) -> &'static str {
    ["frontend", "backend", "db"][app % 3]
}

fn port(protocol: Protocol, number: u16) -> PortSpec {
    PortSpec {
        protocol,
        port: Some(PortRef::Number(number)),
        end_port: None,
    }
}

fn named(name: &str) -> PortSpec {
    PortSpec {
        protocol: Protocol::Tcp,
        port: Some(PortRef::Name(name.to_owned())),
        end_port: None,
    }
}

/// The pod `replica` of `app` in namespace `ns`, the `index`th of the cluster (its addresses:
/// `10.0.0.0/8` holds 16 million), on node `index % nodes`.
#[must_use]
pub fn pod(ns: usize, app: usize, replica: usize, index: usize, nodes: usize) -> Pod {
    let namespace = namespace_name(ns);
    let index_bits = u32::try_from(index).expect("fewer than 2^24 pods");
    assert!(index_bits < 1 << 24, "fewer than 2^24 pods");
    let [_, high, a, b] = index_bits.to_be_bytes();
    let mut ips = vec![IpAddr::V4(Ipv4Addr::new(10, high, a, b))];
    if ns.is_multiple_of(10) {
        ips.push(IpAddr::V6(Ipv6Addr::new(
            0xfd00,
            0,
            0,
            0,
            0,
            u16::from(high),
            u16::from(a),
            u16::from(b),
        )));
    }
    Pod {
        id: PodRef {
            namespace,
            name: format!("app-{app}-{replica}"),
        },
        labels: labels(&[
            ("app", &format!("app-{app}")),
            ("tier", tier(app)),
            (
                "version",
                if replica.is_multiple_of(2) {
                    "v1"
                } else {
                    "v2"
                },
            ),
        ])
        .into(),
        node_name: Some(format!("node-{}", index % nodes).into()),
        ips,
        ports: vec![
            ContainerPort {
                name: Some("http".into()),
                port: 8080 + u16::try_from(app % 100).expect("below 100"),
                protocol: Protocol::Tcp,
            },
            ContainerPort {
                name: Some("metrics".into()),
                port: 9090,
                protocol: Protocol::Tcp,
            },
            ContainerPort {
                name: Some("dns".into()),
                port: 53,
                protocol: Protocol::Udp,
            },
        ]
        .into(),
        host_network: false,
        service_account: format!("app-{app}").into(),
        mtls: netwarden_model::PodMtls::default().into(),
    }
}

/// The `count` policies of namespace `ns` out of `namespaces`: the ten templates of
/// [`templates`]; fewer than ten rotate through them from namespace to namespace (so every
/// template is in the cluster, and `ns-000` always has `default-deny` and `frontend-public`),
/// more repeat them under new names.
#[must_use]
pub fn policies(ns: usize, namespaces: usize, count: usize) -> Vec<NetworkPolicy> {
    let templates = templates(ns, namespaces);
    let start = if count < TEMPLATES {
        ns * count % TEMPLATES
    } else {
        0
    };
    (0..count)
        .map(|nth| {
            let mut policy = templates[(start + nth) % TEMPLATES].clone();
            let round = nth / TEMPLATES;
            if round > 0 {
                policy.id.name = format!("{}-{round}", policy.id.name);
            }
            policy
        })
        .collect()
}

/// The ten policy templates of namespace `ns` out of `namespaces`.
#[must_use]
#[expect(
    clippy::too_many_lines,
    reason = "one literal policy set, read top to bottom"
)]
fn templates(ns: usize, namespaces: usize) -> Vec<NetworkPolicy> {
    let namespace = namespace_name(ns);
    let id = |name: &str| PolicyRef {
        namespace: namespace.clone(),
        name: name.to_owned(),
    };
    let ingress_only = PolicyTypes {
        ingress: true,
        egress: false,
    };
    let egress_only = PolicyTypes {
        ingress: false,
        egress: true,
    };
    let pods = |pod_selector: LabelSelector| Peer::Pods {
        pod_selector: Some(pod_selector),
        namespace_selector: None,
    };
    let cidr = |text: &str| text.parse().expect("benchmark CIDR");
    vec![
        NetworkPolicy {
            enforcement: netwarden_model::Enforcement::Enforce,
            id: id("default-deny"),
            pod_selector: LabelSelector::everything(),
            policy_types: ingress_only,
            ingress: vec![],
            egress: vec![],
        },
        NetworkPolicy {
            enforcement: netwarden_model::Enforcement::Enforce,
            id: id("frontend-public"),
            pod_selector: select(&[("tier", "frontend")]),
            policy_types: ingress_only,
            ingress: vec![Rule {
                peers: vec![],
                ports: vec![named("http")],
            }],
            egress: vec![],
        },
        NetworkPolicy {
            enforcement: netwarden_model::Enforcement::Enforce,
            id: id("backend-from-frontend"),
            pod_selector: select(&[("tier", "backend")]),
            policy_types: ingress_only,
            ingress: vec![Rule {
                peers: vec![pods(select(&[("tier", "frontend")]))],
                ports: vec![PortSpec {
                    protocol: Protocol::Tcp,
                    port: Some(PortRef::Number(8080)),
                    end_port: Some(8090),
                }],
            }],
            egress: vec![],
        },
        NetworkPolicy {
            enforcement: netwarden_model::Enforcement::Enforce,
            id: id("db-from-backend"),
            pod_selector: select(&[("tier", "db")]),
            policy_types: ingress_only,
            ingress: vec![Rule {
                peers: vec![Peer::Pods {
                    pod_selector: Some(select(&[("tier", "backend")])),
                    namespace_selector: Some(select(&[("team", &format!("t{}", ns % 10))])),
                }],
                ports: vec![port(Protocol::Tcp, 5432)],
            }],
            egress: vec![],
        },
        NetworkPolicy {
            enforcement: netwarden_model::Enforcement::Enforce,
            id: id("frontend-egress"),
            pod_selector: select(&[("tier", "frontend")]),
            policy_types: egress_only,
            ingress: vec![],
            egress: vec![
                Rule {
                    peers: vec![pods(select(&[("tier", "backend")]))],
                    ports: vec![named("http")],
                },
                Rule {
                    peers: vec![Peer::Pods {
                        pod_selector: Some(select(&[("k8s-app", "kube-dns")])),
                        namespace_selector: Some(select(&[(
                            "kubernetes.io/metadata.name",
                            "kube-system",
                        )])),
                    }],
                    ports: vec![port(Protocol::Udp, 53), port(Protocol::Tcp, 53)],
                },
                Rule {
                    peers: vec![Peer::IpBlock {
                        cidr: cidr("0.0.0.0/0"),
                        except: vec![cidr("10.0.0.0/8")],
                    }],
                    ports: vec![port(Protocol::Tcp, 443)],
                },
            ],
        },
        NetworkPolicy {
            enforcement: netwarden_model::Enforcement::Enforce,
            id: id("internal-https"),
            pod_selector: LabelSelector::everything(),
            policy_types: ingress_only,
            ingress: vec![Rule {
                peers: vec![Peer::IpBlock {
                    cidr: cidr("10.0.0.0/8"),
                    except: vec![cidr("10.1.0.0/16"), cidr("10.2.0.0/16")],
                }],
                ports: vec![port(Protocol::Tcp, 443)],
            }],
            egress: vec![],
        },
        NetworkPolicy {
            enforcement: netwarden_model::Enforcement::Enforce,
            id: id("expressions"),
            pod_selector: LabelSelector {
                requirements: vec![
                    Requirement::In("app".into(), vec!["app-1".into(), "app-2".into()]),
                    Requirement::NotIn("version".into(), vec!["v2".into()]),
                ],
            },
            policy_types: ingress_only,
            ingress: vec![Rule {
                peers: vec![Peer::Pods {
                    pod_selector: None,
                    namespace_selector: Some(LabelSelector {
                        requirements: vec![Requirement::Exists("env".into())],
                    }),
                }],
                ports: vec![named("metrics")],
            }],
            egress: vec![],
        },
        NetworkPolicy {
            enforcement: netwarden_model::Enforcement::Enforce,
            id: id("dns-and-signalling"),
            pod_selector: LabelSelector {
                requirements: vec![Requirement::DoesNotExist("canary".into())],
            },
            policy_types: ingress_only,
            ingress: vec![Rule {
                peers: vec![pods(LabelSelector::everything())],
                ports: vec![port(Protocol::Udp, 53), port(Protocol::Sctp, 9000)],
            }],
            egress: vec![],
        },
        NetworkPolicy {
            enforcement: netwarden_model::Enforcement::Enforce,
            id: id("v6-monitoring"),
            pod_selector: select(&[("tier", "db")]),
            policy_types: ingress_only,
            ingress: vec![Rule {
                peers: vec![Peer::IpBlock {
                    cidr: cidr("fd00::/64"),
                    except: vec![cidr("fd00::ff00/120")],
                }],
                ports: vec![PortSpec {
                    protocol: Protocol::Tcp,
                    port: Some(PortRef::Number(9100)),
                    end_port: Some(9199),
                }],
            }],
            egress: vec![],
        },
        NetworkPolicy {
            enforcement: netwarden_model::Enforcement::Enforce,
            id: id("to-next-namespace"),
            pod_selector: select(&[("tier", "backend")]),
            policy_types: PolicyTypes {
                ingress: false,
                egress: true,
            },
            ingress: vec![],
            egress: vec![Rule {
                peers: vec![Peer::Pods {
                    pod_selector: Some(select(&[("app", "app-0")])),
                    namespace_selector: Some(LabelSelector {
                        requirements: vec![Requirement::In(
                            "kubernetes.io/metadata.name".into(),
                            vec![namespace_name((ns + 1) % namespaces)],
                        )],
                    }),
                }],
                ports: vec![named("http")],
            }],
        },
    ]
}

/// The default cluster ([`Shape::DEFAULT`]).
#[must_use]
pub fn generate() -> Cluster {
    generate_shape(Shape::DEFAULT)
}

/// A cluster of `shape`.
#[must_use]
pub fn generate_shape(shape: Shape) -> Cluster {
    let mut cluster = Cluster::default();
    let nodes = shape.nodes();
    let mut index = 0;
    for ns in 0..shape.namespaces {
        let name = namespace_name(ns);
        let mut namespace_labels = labels(&[
            ("team", &format!("t{}", ns % 10)),
            ("kubernetes.io/metadata.name", &name),
        ]);
        if ns % 3 != 0 {
            namespace_labels.insert(
                "env".into(),
                if ns % 3 == 1 { "prod" } else { "staging" }.into(),
            );
        }
        cluster.namespaces.insert(
            name.clone(),
            Namespace {
                name,
                labels: namespace_labels.into(),
            },
        );
        for nth in 0..shape.pods_in(ns) {
            let pod = pod(ns, nth / REPLICAS, nth % REPLICAS, index, nodes);
            index += 1;
            cluster.pods.insert(pod.id.clone(), pod);
        }
        for policy in policies(ns, shape.namespaces, shape.policies_in(ns)) {
            cluster.policies.insert(policy.id.clone(), policy.into());
        }
    }
    for node in 0..nodes {
        let node = node_object(node);
        cluster.nodes.insert(node.name.clone(), node);
    }
    for policy in cluster_policies() {
        cluster.cluster_policies.insert(policy.name.clone(), policy);
    }
    cluster
}

/// Node `node`: zone and role labels, for `nodes` peers to select.
fn node_object(node: usize) -> Node {
    let [_, _, a, b] = u32::try_from(node)
        .expect("fewer than 2^16 nodes")
        .to_be_bytes();
    Node {
        name: format!("node-{node}"),
        labels: labels(&[
            ("topology.kubernetes.io/zone", &format!("zone-{}", node % 3)),
            (
                "node-role.kubernetes.io/worker",
                if node.is_multiple_of(10) { "infra" } else { "" },
            ),
        ]),
        addresses: vec![IpAddr::V4(Ipv4Addr::new(172, 18, a, b))],
    }
}

/// 100 Admin and 100 Baseline ClusterNetworkPolicies, as a platform team writes them: per team
/// or per tier of app, with `Accept`, `Deny` and `Pass` rules over namespaces, pods and
/// networks, named ports and port ranges. Every tenth priority is shared with the policy
/// before it (ties, which netwarden breaks by name).
#[must_use]
pub fn cluster_policies() -> Vec<ClusterNetworkPolicy> {
    (0..CLUSTER_POLICIES_PER_TIER)
        .flat_map(|nth| [admin_policy(nth), baseline_policy(nth)])
        .collect()
}

/// Priority of the `nth` policy of a tier: steps of 10, every tenth one tied with the one before.
fn priority(nth: usize) -> u16 {
    let step = nth - usize::from(nth % 10 == 9);
    u16::try_from(step * 10).expect("at most 100 policies per tier")
}

fn cidrs(texts: &[&str]) -> Vec<ipnet::IpNet> {
    texts
        .iter()
        .map(|text| text.parse().expect("benchmark CIDR"))
        .collect()
}

fn tcp(first: u16, last: u16) -> ClusterPort {
    ClusterPort::Range {
        protocol: Protocol::Tcp,
        first,
        last,
    }
}

fn udp(port: u16) -> ClusterPort {
    ClusterPort::Range {
        protocol: Protocol::Udp,
        first: port,
        last: port,
    }
}

fn rule(
    name: &str,
    action: Action,
    peers: Vec<ClusterPeer>,
    ports: Vec<ClusterPort>,
) -> ClusterRule {
    ClusterRule {
        name: Some(name.to_owned()),
        action,
        peers,
        ports,
    }
}

/// The `nth` Admin policy: guards for one team's namespaces, or for one tier of app in
/// production.
fn admin_policy(nth: usize) -> ClusterNetworkPolicy {
    let team = format!("t{}", nth % 10);
    let subject = if nth.is_multiple_of(2) {
        ClusterSubject::Namespaces(select(&[("team", &team)]))
    } else {
        ClusterSubject::Pods {
            namespace_selector: select(&[("env", "prod")]),
            pod_selector: select(&[("tier", tier(nth))]),
        }
    };
    ClusterNetworkPolicy {
        name: format!("admin-{nth:03}"),
        tier: Tier::Admin,
        priority: priority(nth),
        subject,
        ingress: vec![
            rule(
                "monitoring",
                Action::Accept,
                vec![ClusterPeer::Namespaces(select(&[(
                    "kubernetes.io/metadata.name",
                    "monitoring",
                )]))],
                vec![ClusterPort::Named("metrics".into())],
            ),
            rule(
                "other-team-db",
                Action::Deny,
                vec![ClusterPeer::Pods {
                    namespace_selector: select(&[("team", &format!("t{}", (nth + 1) % 10))]),
                    pod_selector: select(&[("tier", "frontend")]),
                }],
                vec![tcp(5432, 5432)],
            ),
            rule(
                "staging-to-namespace-policies",
                Action::Pass,
                vec![ClusterPeer::Namespaces(select(&[("env", "staging")]))],
                vec![],
            ),
        ],
        egress: vec![
            rule(
                "cloud-metadata",
                Action::Deny,
                vec![ClusterPeer::Networks(cidrs(&[
                    "169.254.169.254/32",
                    "fd00:ec2::254/128",
                ]))],
                vec![],
            ),
            rule(
                "dns",
                Action::Accept,
                vec![ClusterPeer::Pods {
                    namespace_selector: select(&[("kubernetes.io/metadata.name", "kube-system")]),
                    pod_selector: select(&[("k8s-app", "kube-dns")]),
                }],
                vec![udp(53), tcp(53, 53)],
            ),
            rule(
                "cluster-to-namespace-policies",
                Action::Pass,
                vec![ClusterPeer::Networks(cidrs(&["10.0.0.0/8", "fd00::/48"]))],
                vec![],
            ),
        ],
        problems: Vec::new(),
    }
}

/// The `nth` Baseline policy: a team's default, isolating it from the other teams unless a
/// NetworkPolicy says otherwise.
fn baseline_policy(nth: usize) -> ClusterNetworkPolicy {
    let team = format!("t{}", nth % 10);
    ClusterNetworkPolicy {
        name: format!("baseline-{nth:03}"),
        tier: Tier::Baseline,
        priority: priority(nth),
        subject: if nth.is_multiple_of(3) {
            ClusterSubject::Pods {
                namespace_selector: select(&[("team", &team)]),
                pod_selector: select(&[("app", &format!("app-{}", nth % 10))]),
            }
        } else {
            ClusterSubject::Namespaces(select(&[("team", &team)]))
        },
        ingress: vec![
            rule(
                "same-team",
                Action::Accept,
                vec![ClusterPeer::Namespaces(select(&[("team", &team)]))],
                vec![],
            ),
            rule(
                "other-teams",
                Action::Deny,
                vec![ClusterPeer::Namespaces(LabelSelector::everything())],
                vec![],
            ),
        ],
        egress: vec![
            rule(
                "web",
                Action::Accept,
                vec![ClusterPeer::Networks(cidrs(&["0.0.0.0/0", "::/0"]))],
                vec![tcp(443, 443), tcp(8000, 8999)],
            ),
            rule(
                "private-ranges",
                Action::Deny,
                vec![ClusterPeer::Networks(cidrs(&[
                    "192.168.0.0/16",
                    "172.16.0.0/12",
                ]))],
                vec![],
            ),
        ],
        problems: Vec::new(),
    }
}
