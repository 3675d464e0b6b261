//! The reference evaluator: the NetworkPolicy spec, applied directly to one flow.
//!
//! It shares nothing with the compiler but the validated model: no identities, no CIDR classes,
//! no port prefixes, no maps. It is the oracle the compiler is tested against, and what
//! `netwarden explain` prints, because it can say which policies and rules decided a flow.
//!
//! The semantics, from `networking.k8s.io/v1`:
//! - A pod is isolated for a direction when a policy of its namespace selects it and lists that
//!   direction in its (defaulted) `policyTypes`.
//! - A connection needs the source pod's egress and the destination pod's ingress to allow it;
//!   an address that is not a pod has no policy of its own.
//! - An isolated direction allows exactly the union of the rules of the policies isolating it.
//! - A rule matches when one of its peers matches (no peers: every peer) and one of its ports
//!   matches (no ports: every port of every protocol).
//! - `podSelector` peers select pods of the policy's namespace; `namespaceSelector` peers pods of
//!   the matching namespaces; both in one peer must both match. `ipBlock` matches addresses in
//!   `cidr` and not in any `except`, pods' addresses included.
//! - A named port is the destination pod's container port of that name and protocol; an
//!   address with no pod, or a pod without such a port, matches no named port.
//! - Traffic from the node's own addresses to its pods is always allowed.

use std::{fmt, net::IpAddr};

use netwarden_model::{Cluster, NetworkPolicy, Peer, Pod, PolicyRef, PortRef, PortSpec, Rule};

use crate::compile::Direction;

/// A flow's first packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    /// Source address.
    pub source: IpAddr,
    /// Destination address.
    pub destination: IpAddr,
    /// IP protocol number.
    pub protocol: u8,
    /// Destination port (0 for protocols without ports).
    pub port: u16,
}

/// What one side's policy says of a flow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SideVerdict {
    /// The address is not a pod, so it has no policy of its own.
    NotAPod,
    /// Traffic from the node to its pods is always allowed.
    FromNode,
    /// No policy isolates the pod in this direction.
    NotIsolated,
    /// These rules allow it (every one that does).
    Allowed(Vec<RuleMatch>),
    /// These policies isolate the pod and none of their rules allows it.
    Denied(Vec<PolicyRef>),
}

impl SideVerdict {
    /// Whether this side lets the flow through.
    #[must_use]
    pub fn allows(&self) -> bool {
        !matches!(self, Self::Denied(_))
    }
}

/// A rule that allows a flow, and the parts of it that matched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleMatch {
    /// The policy.
    pub policy: PolicyRef,
    /// The list the rule is in.
    pub direction: Direction,
    /// Its index in that list.
    pub rule: usize,
    /// Index of the peer that matched, or `None` when the rule has no peers (every peer).
    pub peer: Option<usize>,
    /// Index of the port that matched, or `None` when the rule has no ports (every port).
    pub port: Option<usize>,
}

impl fmt::Display for RuleMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = match self.direction {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        };
        let peers = match self.direction {
            Direction::Ingress => "from",
            Direction::Egress => "to",
        };
        write!(
            f,
            "NetworkPolicy {} spec.{list}[{}]",
            self.policy, self.rule
        )?;
        match self.peer {
            Some(peer) => write!(f, ".{peers}[{peer}]")?,
            None => write!(f, " (every peer)")?,
        }
        match self.port {
            Some(port) => write!(f, ".ports[{port}]"),
            None => write!(f, " (every port)"),
        }
    }
}

/// The verdict on a flow: both sides, and their conjunction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// The source pod's egress.
    pub egress: SideVerdict,
    /// The destination pod's ingress.
    pub ingress: SideVerdict,
}

impl Verdict {
    /// Whether the flow is allowed.
    #[must_use]
    pub fn allowed(&self) -> bool {
        self.egress.allows() && self.ingress.allows()
    }
}

/// The pod that owns `address`, as the compiler picks it: host-network pods own no address, and
/// of two pods claiming one address the first by namespace and name wins.
#[must_use]
pub fn pod_at(cluster: &Cluster, address: IpAddr) -> Option<&Pod> {
    cluster
        .pods
        .values()
        .find(|pod| !pod.host_network && pod.ips.contains(&address))
}

/// Evaluates `flow` in `cluster`, where `node_addresses` are the addresses of the node the
/// destination runs on.
#[must_use]
pub fn evaluate(cluster: &Cluster, node_addresses: &[IpAddr], flow: &Flow) -> Verdict {
    let egress = match pod_at(cluster, flow.source) {
        None => SideVerdict::NotAPod,
        Some(pod) => side(cluster, pod, Direction::Egress, flow.destination, flow),
    };
    let ingress = match pod_at(cluster, flow.destination) {
        None => SideVerdict::NotAPod,
        Some(_) if node_addresses.contains(&flow.source) => SideVerdict::FromNode,
        Some(pod) => side(cluster, pod, Direction::Ingress, flow.source, flow),
    };
    Verdict { egress, ingress }
}

/// What `pod`'s policy in `direction` says of traffic with `peer`.
#[must_use]
pub fn side(
    cluster: &Cluster,
    pod: &Pod,
    direction: Direction,
    peer: IpAddr,
    flow: &Flow,
) -> SideVerdict {
    let isolating: Vec<&NetworkPolicy> = cluster
        .policies
        .values()
        .filter(|policy| {
            policy.id.namespace == pod.id.namespace && policy.pod_selector.matches(&pod.labels)
        })
        .filter(|policy| match direction {
            Direction::Ingress => policy.policy_types.ingress,
            Direction::Egress => policy.policy_types.egress,
        })
        .collect();
    if isolating.is_empty() {
        return SideVerdict::NotIsolated;
    }
    let destination = match direction {
        Direction::Ingress => Some(pod),
        Direction::Egress => pod_at(cluster, flow.destination),
    };
    let mut allowing = Vec::new();
    for policy in &isolating {
        let rules: &[Rule] = match direction {
            Direction::Ingress => &policy.ingress,
            Direction::Egress => &policy.egress,
        };
        for (index, rule) in rules.iter().enumerate() {
            let peer_match = if rule.peers.is_empty() {
                Some(None)
            } else {
                rule.peers
                    .iter()
                    .position(|candidate| peer_matches(cluster, policy, candidate, peer))
                    .map(Some)
            };
            let port_match = if rule.ports.is_empty() {
                Some(None)
            } else {
                rule.ports
                    .iter()
                    .position(|spec| port_matches(spec, destination, flow))
                    .map(Some)
            };
            if let (Some(peer), Some(port)) = (peer_match, port_match) {
                allowing.push(RuleMatch {
                    policy: policy.id.clone(),
                    direction,
                    rule: index,
                    peer,
                    port,
                });
            }
        }
    }
    if allowing.is_empty() {
        SideVerdict::Denied(isolating.iter().map(|policy| policy.id.clone()).collect())
    } else {
        SideVerdict::Allowed(allowing)
    }
}

fn peer_matches(cluster: &Cluster, policy: &NetworkPolicy, peer: &Peer, address: IpAddr) -> bool {
    match peer {
        Peer::IpBlock { cidr, except } => {
            cidr.contains(&address) && !except.iter().any(|excepted| excepted.contains(&address))
        }
        Peer::Pods {
            pod_selector,
            namespace_selector,
        } => {
            let Some(pod) = pod_at(cluster, address) else {
                return false;
            };
            let namespace_matches = match namespace_selector {
                None => pod.id.namespace == policy.id.namespace,
                Some(selector) => selector.matches(&cluster.namespace_labels(&pod.id.namespace)),
            };
            namespace_matches
                && pod_selector
                    .as_ref()
                    .is_none_or(|selector| selector.matches(&pod.labels))
        }
    }
}

fn port_matches(spec: &PortSpec, destination: Option<&Pod>, flow: &Flow) -> bool {
    if spec.protocol.number() != flow.protocol {
        return false;
    }
    match &spec.port {
        None => true,
        Some(PortRef::Number(first)) => {
            (*first..=spec.end_port.unwrap_or(*first)).contains(&flow.port)
        }
        Some(PortRef::Name(name)) => destination.is_some_and(|pod| {
            pod.ports
                .iter()
                .find(|port| port.name.as_deref() == Some(name) && port.protocol == spec.protocol)
                .is_some_and(|port| port.port == flow.port)
        }),
    }
}
