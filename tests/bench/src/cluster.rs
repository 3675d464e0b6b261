//! A generated cluster at the scale of the compile benchmark: 100 namespaces of 10 apps with 10
//! replicas each (10,000 pods), 10 policies per namespace (1,000) using every feature of
//! `networking.k8s.io/v1`, and 110 of the pods on the benchmarked node.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use netwarden_model::{
    Cluster, ContainerPort, LabelSelector, Namespace, NetworkPolicy, Peer, Pod, PodRef, PolicyRef,
    PolicyTypes, PortRef, PortSpec, Protocol, Requirement, Rule,
};

/// The node whose pods are the local endpoints.
pub const NODE: &str = "node-0";
/// Namespaces.
pub const NAMESPACES: usize = 100;
/// Apps (Deployments) per namespace.
pub const APPS: usize = 10;
/// Replicas per app.
pub const REPLICAS: usize = 10;
/// Every how many pods one lands on the benchmarked node (10,000 / 91 = 110).
const LOCAL_EVERY: usize = 91;

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

/// The pod `replica` of `app` in namespace `ns`.
#[must_use]
pub fn pod(ns: usize, app: usize, replica: usize, index: usize) -> Pod {
    let namespace = format!("ns-{ns:03}");
    let [a, b] = u16::try_from(index)
        .expect("fewer than 65536 pods")
        .to_be_bytes();
    let mut ips = vec![IpAddr::V4(Ipv4Addr::new(10, 0, a, b))];
    if ns.is_multiple_of(10) {
        ips.push(IpAddr::V6(Ipv6Addr::new(
            0xfd00,
            0,
            0,
            0,
            0,
            0,
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
        ]),
        node_name: Some(format!(
            "node-{}",
            if index.is_multiple_of(LOCAL_EVERY) {
                0
            } else {
                1 + index % 90
            }
        )),
        ips,
        ports: vec![
            ContainerPort {
                name: Some("http".into()),
                port: 8080 + u16::try_from(app).expect("few apps"),
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
        ],
        host_network: false,
        service_account: format!("app-{app}"),
        mtls: netwarden_model::PodMtls::default(),
    }
}

/// The ten policies of namespace `ns`.
#[must_use]
#[expect(
    clippy::too_many_lines,
    reason = "one literal policy set, read top to bottom"
)]
pub fn policies(ns: usize) -> Vec<NetworkPolicy> {
    let namespace = format!("ns-{ns:03}");
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
                            vec![format!("ns-{:03}", (ns + 1) % NAMESPACES)],
                        )],
                    }),
                }],
                ports: vec![named("http")],
            }],
        },
    ]
}

/// The whole cluster.
#[must_use]
pub fn generate() -> Cluster {
    let mut cluster = Cluster::default();
    for ns in 0..NAMESPACES {
        let name = format!("ns-{ns:03}");
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
                labels: namespace_labels,
            },
        );
        for app in 0..APPS {
            for replica in 0..REPLICAS {
                let index = (ns * APPS + app) * REPLICAS + replica;
                let pod = pod(ns, app, replica, index);
                cluster.pods.insert(pod.id.clone(), pod);
            }
        }
        for policy in policies(ns) {
            cluster.policies.insert(policy.id.clone(), policy);
        }
    }
    cluster
}
