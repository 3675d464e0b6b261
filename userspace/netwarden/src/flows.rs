//! The flows `netwarden diff` and `netwarden matrix` put to the reference evaluator: from every
//! pod and representative outside address, to every pod (and, for egress, every outside
//! address), on every port that matters.
//!
//! A cluster has too many addresses and ports to try them all, but a policy can only tell apart
//! what it names. So the outside world is one address in each piece the policies' `ipBlock`s
//! cut it into (a block less its `except`s, each `except`, and what no block holds), and the
//! ports are every port a policy or a container names, the ends of every range, and one port
//! per protocol that nothing names ("any other port").

use std::{collections::BTreeSet, fmt, net::IpAddr};

use ipnet::IpNet;
use netwarden_model::{Cluster, Peer, PodRef, PortRef, Protocol};
use netwarden_policy::evaluate::{self, Flow, Verdict};
use serde::Serialize;

/// One end of a flow.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum Endpoint {
    /// A pod, at its first address (IPv4 first).
    Pod {
        /// `namespace/name`.
        #[serde(serialize_with = "as_text")]
        pod: PodRef,
    },
    /// An address outside the pods, standing for its piece of the `ipBlock`s.
    External {
        /// The address.
        address: IpAddr,
        /// The narrowest `ipBlock` CIDR or `except` holding it; `None` when none does.
        block: Option<IpNet>,
    },
}

impl Endpoint {
    /// Its address in `cluster`; `None` for a pod `cluster` does not hold or has no address.
    #[must_use]
    pub fn address(&self, cluster: &Cluster) -> Option<IpAddr> {
        match self {
            Self::Pod { pod } => {
                let pod = cluster.pods.get(pod)?;
                if pod.host_network {
                    return None;
                }
                pod.ips
                    .iter()
                    .find(|ip| ip.is_ipv4())
                    .or_else(|| pod.ips.first())
                    .copied()
            }
            Self::External { address, .. } => Some(*address),
        }
    }

    /// Whether this is a pod.
    #[must_use]
    pub fn is_pod(&self) -> bool {
        matches!(self, Self::Pod { .. })
    }

    /// A short label: `namespace/name`, or the address.
    #[must_use]
    pub fn short(&self) -> String {
        match self {
            Self::Pod { pod } => pod.to_string(),
            Self::External { address, .. } => address.to_string(),
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Pod { pod } => write!(f, "{pod}"),
            Self::External {
                address,
                block: Some(block),
            } => write!(f, "{address} (ipBlock {block})"),
            Self::External {
                address,
                block: None,
            } => write!(f, "{address} (outside every ipBlock)"),
        }
    }
}

/// A destination port to try.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PortProbe {
    /// Its protocol.
    #[serde(serialize_with = "as_text")]
    pub protocol: Protocol,
    /// The port.
    pub port: u16,
    /// The port stands for every port nothing names.
    pub any_other: bool,
}

impl fmt::Display for PortProbe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.any_other {
            write!(f, "{} any other port", self.protocol)
        } else {
            write!(f, "{} {}", self.protocol, self.port)
        }
    }
}

/// One flow: who connects to whom on which port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct FlowKey {
    /// The client.
    pub source: Endpoint,
    /// The server.
    pub destination: Endpoint,
    /// The destination port.
    pub port: PortProbe,
}

impl fmt::Display for FlowKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {} {}", self.source, self.destination, self.port)
    }
}

/// Serializes a model type by its display form (`web/frontend`, `TCP`).
pub fn as_text<T: fmt::Display, S: serde::Serializer>(
    value: &T,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_str(value)
}

/// Every endpoint and port worth trying in any of `clusters` (the sides of a comparison).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Universe {
    /// Pods first (by namespace and name), then outside addresses.
    pub endpoints: Vec<Endpoint>,
    /// Ports, by protocol and number.
    pub ports: Vec<PortProbe>,
}

/// Well-known documentation addresses (RFC 5737, RFC 3849), one of which stands for the outside
/// world beyond every `ipBlock`.
const OUTSIDE_CANDIDATES: [&str; 4] = ["203.0.113.10", "198.51.100.10", "192.0.2.10", "8.8.8.8"];
const OUTSIDE_CANDIDATES_V6: [&str; 2] = ["2001:db8::10", "2001:4860:4860::8888"];

impl Universe {
    /// The endpoints and ports of `clusters`.
    #[must_use]
    pub fn of(clusters: &[&Cluster]) -> Self {
        let mut pods = BTreeSet::new();
        let mut pod_addresses = BTreeSet::new();
        let mut blocks = BTreeSet::new();
        let mut named_ports: BTreeSet<(Protocol, u16, u16)> = BTreeSet::new();
        for cluster in clusters {
            for pod in cluster.pods.values() {
                pod_addresses.extend(pod.ips.iter().copied());
                let endpoint = Endpoint::Pod {
                    pod: pod.id.clone(),
                };
                if endpoint.address(cluster).is_some() {
                    pods.insert(endpoint);
                }
                for port in pod.ports.iter() {
                    named_ports.insert((port.protocol, port.port, port.port));
                }
            }
            for policy in cluster.policies.values() {
                for rule in policy.ingress.iter().chain(&policy.egress) {
                    for peer in &rule.peers {
                        if let Peer::IpBlock { cidr, except } = peer {
                            blocks.insert(*cidr);
                            blocks.extend(except.iter().copied());
                        }
                    }
                    for spec in &rule.ports {
                        if let Some(PortRef::Number(first)) = spec.port {
                            let last = spec.end_port.unwrap_or(first);
                            named_ports.insert((spec.protocol, first, last));
                        } else {
                            // Every port of the protocol (or a named one, resolved on the
                            // pods' container ports above): the protocol is in play.
                            named_ports.insert((spec.protocol, 0, 0));
                        }
                    }
                }
            }
        }
        let mut endpoints: Vec<Endpoint> = pods.into_iter().collect();
        endpoints.extend(outside_representatives(&blocks, &pod_addresses));
        Self {
            endpoints,
            ports: port_probes(&named_ports),
        }
    }

    /// Every flow between the endpoints on every port: from pods and outside addresses to pods,
    /// and from pods to outside addresses (what is outside has no policy between its parts).
    pub fn flows(&self) -> impl Iterator<Item = FlowKey> + '_ {
        self.endpoints.iter().flat_map(move |source| {
            self.endpoints
                .iter()
                .filter(move |destination| {
                    *destination != source && (source.is_pod() || destination.is_pod())
                })
                .flat_map(move |destination| {
                    self.ports.iter().map(move |port| FlowKey {
                        source: source.clone(),
                        destination: destination.clone(),
                        port: *port,
                    })
                })
        })
    }
}

/// The verdict on `flow` in `cluster`; `None` when an endpoint is not in it, or its ends are of
/// different address families.
#[must_use]
pub fn judge(cluster: &Cluster, flow: &FlowKey) -> Option<Verdict> {
    let source = flow.source.address(cluster)?;
    let destination = flow.destination.address(cluster)?;
    if source.is_ipv4() != destination.is_ipv4() {
        return None;
    }
    Some(evaluate::evaluate(
        cluster,
        &[],
        &Flow {
            source,
            destination,
            protocol: flow.port.protocol.number(),
            port: flow.port.port,
        },
    ))
}

/// One address in each piece the blocks cut the address space into, none of them a pod's, and
/// one outside every block (IPv6 only when a block is IPv6).
fn outside_representatives(
    blocks: &BTreeSet<IpNet>,
    pod_addresses: &BTreeSet<IpAddr>,
) -> Vec<Endpoint> {
    let narrowest = |address: IpAddr| {
        blocks
            .iter()
            .filter(|block| block.contains(&address))
            .max_by_key(|block| block.prefix_len())
            .copied()
    };
    let mut chosen = BTreeSet::new();
    for block in blocks {
        let nested: Vec<&IpNet> = blocks
            .iter()
            .filter(|other| *other != block && block.contains(*other))
            .collect();
        let candidates = block_candidates(block, &nested);
        if let Some(address) = candidates.into_iter().find(|address| {
            !pod_addresses.contains(address) && !nested.iter().any(|net| net.contains(address))
        }) {
            chosen.insert(address);
        }
    }
    let mut families = vec![OUTSIDE_CANDIDATES.as_slice()];
    if blocks.iter().any(|block| matches!(block, IpNet::V6(_))) {
        families.push(OUTSIDE_CANDIDATES_V6.as_slice());
    }
    for candidates in families {
        if let Some(address) = candidates
            .iter()
            .filter_map(|text| text.parse::<IpAddr>().ok())
            .find(|address| narrowest(*address).is_none() && !pod_addresses.contains(address))
        {
            chosen.insert(address);
        }
    }
    chosen
        .into_iter()
        .map(|address| Endpoint::External {
            address,
            block: narrowest(address),
        })
        .collect()
}

/// Addresses of `block` to try, in order: its first hosts, then those just around each nested
/// block, so that one of them lies outside the nested blocks and the pods; the network address
/// last (the only one of a `/32`).
fn block_candidates(block: &IpNet, nested: &[&IpNet]) -> Vec<IpAddr> {
    let first = block.network();
    let mut candidates: Vec<Option<IpAddr>> = (1..16).map(|step| offset(first, step)).collect();
    for net in nested {
        candidates.push(offset(net.broadcast(), 1));
        candidates.push(offset(net.network(), -1));
    }
    candidates.push(Some(first));
    candidates
        .into_iter()
        .flatten()
        .filter(|address| block.contains(address))
        .collect()
}

fn offset(address: IpAddr, by: i128) -> Option<IpAddr> {
    match address {
        IpAddr::V4(v4) => {
            let value = i128::from(u32::from(v4)) + by;
            u32::try_from(value)
                .ok()
                .map(|value| IpAddr::V4(value.into()))
        }
        IpAddr::V6(v6) => {
            let value = i128::try_from(u128::from(v6)).ok()? + by;
            u128::try_from(value)
                .ok()
                .map(|value| IpAddr::V6(value.into()))
        }
    }
}

/// The probes for `(protocol, first, last)` port mentions (`(protocol, 0, 0)`: the protocol as a
/// whole): each named port, both ends of each range, and per protocol one port that no mention
/// holds. TCP and UDP are always in play (a rule without ports opens them all).
fn port_probes(mentions: &BTreeSet<(Protocol, u16, u16)>) -> Vec<PortProbe> {
    let mut protocols: BTreeSet<Protocol> = [Protocol::Tcp, Protocol::Udp].into();
    protocols.extend(mentions.iter().map(|(protocol, _, _)| *protocol));
    let mut probes = BTreeSet::new();
    for (protocol, first, last) in mentions {
        if *first != 0 {
            for port in [*first, *last] {
                probes.insert(PortProbe {
                    protocol: *protocol,
                    port,
                    any_other: false,
                });
            }
        }
    }
    for protocol in protocols {
        let unnamed = (1..=u16::MAX).rev().find(|port| {
            !mentions.iter().any(|(mentioned, first, last)| {
                *mentioned == protocol && (*first..=*last).contains(port)
            })
        });
        if let Some(port) = unnamed {
            probes.insert(PortProbe {
                protocol,
                port,
                any_other: true,
            });
        }
    }
    probes.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use netwarden_model::Protocol;

    use super::{Endpoint, PortProbe, Universe, judge};

    const CLUSTER: &str = r"
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {app: a}}
spec: {containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: x, labels: {app: b}}
spec: {containers: [{name: c}]}
status: {podIP: 10.0.0.2}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: egress, namespace: x}
spec:
  podSelector: {matchLabels: {app: a}}
  policyTypes: [Egress]
  egress:
  - to: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}}]
    ports: [{port: 1000, endPort: 2000}, {protocol: UDP, port: 53}]
";

    fn universe() -> (netwarden_model::Cluster, Universe) {
        let (cluster, errors) = netwarden_model::cluster_of_stream("c.yaml", CLUSTER);
        assert!(errors.is_empty(), "{errors:?}");
        let universe = Universe::of(&[&cluster]);
        (cluster, universe)
    }

    #[test]
    fn outside_addresses_stand_for_each_piece_of_the_blocks_and_avoid_pods() {
        let (_, universe) = universe();
        let outside: Vec<String> = universe
            .endpoints
            .iter()
            .filter(|endpoint| !endpoint.is_pod())
            .map(ToString::to_string)
            .collect();
        // 10.0.0.1 and 10.0.0.2 are pods: the block's representative is the next address.
        assert_eq!(
            outside,
            [
                "10.0.0.3 (ipBlock 10.0.0.0/8)",
                "10.1.0.1 (ipBlock 10.1.0.0/16)",
                "203.0.113.10 (outside every ipBlock)",
            ]
        );
    }

    #[test]
    fn ports_are_the_named_ones_the_range_ends_and_one_other_per_protocol() {
        let (_, universe) = universe();
        let ports: Vec<String> = universe.ports.iter().map(ToString::to_string).collect();
        assert_eq!(
            ports,
            [
                "TCP 1000",
                "TCP 2000",
                "TCP 8080",
                "TCP any other port",
                "UDP 53",
                "UDP any other port",
            ]
        );
        let other_tcp = universe.ports[3];
        assert_eq!(
            other_tcp,
            PortProbe {
                protocol: Protocol::Tcp,
                port: 65535,
                any_other: true
            }
        );
    }

    #[test]
    fn flows_leave_out_outside_to_outside_and_are_judged_by_the_evaluator() {
        let (cluster, universe) = universe();
        let flows: Vec<_> = universe.flows().collect();
        assert!(
            flows
                .iter()
                .all(|flow| flow.source.is_pod() || flow.destination.is_pod())
        );
        // 2 pods and 3 outside addresses: 2*4 from pods + 3*2 from outside, on 6 ports.
        assert_eq!(flows.len(), (2 * 4 + 3 * 2) * 6);

        let a_to_excepted = flows
            .iter()
            .find(|flow| {
                flow.source.short() == "x/a"
                    && flow.destination.address(&cluster)
                        == Some("10.1.0.1".parse::<IpAddr>().unwrap())
                    && flow.port.port == 1000
            })
            .unwrap();
        assert!(!judge(&cluster, a_to_excepted).unwrap().allowed());
        let a_to_b = flows
            .iter()
            .find(|flow| {
                flow.source.short() == "x/a"
                    && flow.destination
                        == Endpoint::Pod {
                            pod: netwarden_model::manifests::pod_ref("x/b"),
                        }
                    && flow.port.port == 2000
            })
            .unwrap();
        assert!(judge(&cluster, a_to_b).unwrap().allowed());
    }
}
