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
//!
//! NetworkPolicy speaks of pods, not Services: a flow to a Service address is judged as the flow
//! kube-proxy translates it to, from the client to one backend pod at its target port.
//! [`service_flow`] lists those flows and their verdicts.

use std::{collections::BTreeSet, fmt, net::IpAddr};

use netwarden_model::{
    Cluster, EndpointSliceRef, Enforcement, NetworkPolicy, Peer, Pod, PodRef, PolicyRef, PortRef,
    PortSpec, Protocol, Rule, ServicePort, ServiceRef, ServiceType,
};

use crate::state::Direction;

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
    /// Only these policies, all in audit mode (`netwarden.dev/enforcement: audit`), isolate the
    /// pod and none of their rules allows it: the flow passes and is reported as audited.
    Audited(Vec<PolicyRef>),
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
    let mut isolating: Vec<&NetworkPolicy> = cluster
        .policies
        .values()
        .filter(|policy| policy.selects_pod(&pod.id.namespace, &pod.labels))
        .filter(|policy| match direction {
            Direction::Ingress => policy.policy_types.ingress,
            Direction::Egress => policy.policy_types.egress,
        })
        .collect();
    if isolating.is_empty() {
        return SideVerdict::NotIsolated;
    }
    // Audit-mode policies only add allows to what the enforced ones allow: they count only
    // when nothing enforced isolates the pod in this direction.
    let audited = isolating
        .iter()
        .all(|policy| policy.enforcement == Enforcement::Audit);
    if !audited {
        isolating.retain(|policy| policy.enforcement == Enforcement::Enforce);
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
        let policies = isolating.iter().map(|policy| policy.id.clone()).collect();
        if audited {
            SideVerdict::Audited(policies)
        } else {
            SideVerdict::Denied(policies)
        }
    } else {
        SideVerdict::Allowed(allowing)
    }
}

fn peer_matches(cluster: &Cluster, policy: &NetworkPolicy, peer: &Peer, address: IpAddr) -> bool {
    match peer {
        Peer::IpBlock { cidr, except } => {
            cidr.contains(&address) && !except.iter().any(|excepted| excepted.contains(&address))
        }
        Peer::Pods { .. } => pod_at(cluster, address).is_some_and(|pod| {
            peer.selects_pod(
                &policy.id.namespace,
                &pod.id.namespace,
                || cluster.namespace_labels(&pod.id.namespace),
                &pod.labels,
            )
        }),
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

/// Where a Service's backend comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendOrigin {
    /// A ready endpoint of this EndpointSlice, as kube-proxy reads it.
    EndpointSlice(EndpointSliceRef),
    /// A pod the Service's selector matches, for a snapshot that holds no EndpointSlice of
    /// the Service (manifests rarely carry the slices the control plane would write).
    Selector,
}

impl fmt::Display for BackendOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::EndpointSlice(slice) => write!(f, "EndpointSlice {slice}"),
            Self::Selector => f.write_str("selector"),
        }
    }
}

/// One backend of a Service flow, and the verdict on the flow kube-proxy translates to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    /// The pod behind it (the endpoint's `targetRef`, or the pod owning the address).
    pub pod: Option<PodRef>,
    /// The address the flow is translated to.
    pub address: IpAddr,
    /// The port it is translated to.
    pub port: u16,
    /// Where the backend comes from.
    pub origin: BackendOrigin,
    /// The verdict on the flow from the client to `address:port`.
    pub verdict: Verdict,
}

/// A flow to a Service port, resolved to its backends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceFlow {
    /// The Service port the client connects to.
    pub port: ServicePort,
    /// Every ready backend of the client's address family, in slice (or pod) order.
    pub backends: Vec<Backend>,
}

/// Why a Service flow could not be resolved.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum ServiceFlowError {
    /// The snapshot holds no such Service.
    #[error("no Service {0}")]
    NoService(ServiceRef),
    /// The Service has no port of that number and protocol.
    #[error("Service {service} has no {protocol} port {port}")]
    NoPort {
        /// The Service.
        service: ServiceRef,
        /// The port asked for.
        port: u16,
        /// Its protocol.
        protocol: Protocol,
    },
    /// An ExternalName Service is a DNS alias: kube-proxy translates nothing.
    #[error("Service {0} is of type ExternalName: a DNS alias with no backends")]
    ExternalName(ServiceRef),
}

/// Resolves a flow from `client` to port `port`/`protocol` of `service` to its ready backends
/// of the client's address family (kube-proxy translates a cluster IP to endpoints of its own
/// family), and evaluates the flow to each, where `node_addresses` are those of the backends'
/// node. The backends' port is the EndpointSlice port of the Service port's name and protocol;
/// a slice without it holds no backend of this port.
pub fn service_flow(
    cluster: &Cluster,
    node_addresses: &[IpAddr],
    client: IpAddr,
    service: &ServiceRef,
    port: u16,
    protocol: Protocol,
) -> Result<ServiceFlow, ServiceFlowError> {
    let object = cluster
        .services
        .get(service)
        .ok_or_else(|| ServiceFlowError::NoService(service.clone()))?;
    if object.service_type == ServiceType::ExternalName {
        return Err(ServiceFlowError::ExternalName(service.clone()));
    }
    let service_port = object
        .ports
        .iter()
        .find(|candidate| candidate.port == port && candidate.protocol == protocol)
        .ok_or_else(|| ServiceFlowError::NoPort {
            service: service.clone(),
            port,
            protocol,
        })?;

    let mut targets: Vec<(Option<PodRef>, IpAddr, u16, BackendOrigin)> = Vec::new();
    let mut slices = cluster.endpoint_slices_of(service).peekable();
    if slices.peek().is_none() {
        targets.extend(selected_backends(cluster, object, service_port));
    }
    for slice in slices {
        let Some(slice_port) = slice.ports.iter().find(|candidate| {
            candidate.name == service_port.name && candidate.protocol == service_port.protocol
        }) else {
            continue;
        };
        for endpoint in slice.endpoints.iter().filter(|endpoint| endpoint.ready) {
            // kube-proxy sends to an endpoint's first address.
            let Some(address) = endpoint.addresses.first() else {
                continue;
            };
            let pod = endpoint
                .pod
                .clone()
                .or_else(|| pod_at(cluster, *address).map(|pod| pod.id.clone()));
            let origin = BackendOrigin::EndpointSlice(slice.id.clone());
            targets.push((pod, *address, slice_port.port, origin));
        }
    }

    // One endpoint in two slices (as during a slice's replacement) is one backend.
    let mut seen = BTreeSet::new();
    let backends = targets
        .into_iter()
        .filter(|(_, address, port, _)| {
            address.is_ipv4() == client.is_ipv4() && seen.insert((*address, *port))
        })
        .map(|(pod, address, port, origin)| {
            let flow = Flow {
                source: client,
                destination: address,
                protocol: protocol.number(),
                port,
            };
            Backend {
                pod,
                address,
                port,
                origin,
                verdict: evaluate(cluster, node_addresses, &flow),
            }
        })
        .collect();
    Ok(ServiceFlow {
        port: service_port.clone(),
        backends,
    })
}

/// What the EndpointSlice controller would make of `service`'s selector: every pod of its
/// namespace the selector matches that has an address, not on the host network, at the target
/// port (a named one resolved on each pod; a pod without it is no backend).
fn selected_backends(
    cluster: &Cluster,
    service: &netwarden_model::Service,
    service_port: &ServicePort,
) -> Vec<(Option<PodRef>, IpAddr, u16, BackendOrigin)> {
    if service.selector.is_empty() {
        return Vec::new();
    }
    cluster
        .pods
        .values()
        .filter(|pod| {
            pod.id.namespace == service.id.namespace
                && !pod.host_network
                && service
                    .selector
                    .iter()
                    .all(|(key, value)| pod.labels.get(key) == Some(value))
        })
        .filter_map(|pod| {
            let port = match &service_port.target_port {
                PortRef::Number(number) => Some(*number),
                PortRef::Name(name) => pod
                    .ports
                    .iter()
                    .find(|port| {
                        port.name.as_deref() == Some(name) && port.protocol == service_port.protocol
                    })
                    .map(|port| port.port),
            }?;
            Some(
                pod.ips
                    .iter()
                    .map(move |address| {
                        (
                            Some(pod.id.clone()),
                            *address,
                            port,
                            BackendOrigin::Selector,
                        )
                    })
                    .collect::<Vec<_>>(),
            )
        })
        .flatten()
        .collect()
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use netwarden_model::{Cluster, PodRef, Protocol, ServiceRef};

    use super::{BackendOrigin, ServiceFlowError, SideVerdict, service_flow};

    const CLUSTER: &str = r"
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: x, labels: {app: web}}
spec: {nodeName: n1, containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.0.0.5}
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: x, labels: {app: web}}
spec: {nodeName: n1, containers: [{name: c, ports: [{name: http, containerPort: 8081}]}]}
status: {podIP: 10.0.0.6}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: x, labels: {app: client}}
spec: {nodeName: n1, containers: [{name: c}]}
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: stranger, namespace: x, labels: {app: stranger}}
spec: {nodeName: n1, containers: [{name: c}]}
status: {podIP: 10.0.0.3}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: x}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress: [{from: [{podSelector: {matchLabels: {app: client}}}], ports: [{port: http}]}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: x}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}, {name: metrics, port: 9090}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-abc, namespace: x, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints:
- {addresses: [10.0.0.5], targetRef: {kind: Pod, name: web-1}}
- {addresses: [10.0.0.6], targetRef: {kind: Pod, name: web-2}}
- {addresses: [10.0.0.7], conditions: {ready: false}, targetRef: {kind: Pod, name: web-3}}
ports: [{name: http, port: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-def, namespace: x, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: [{addresses: [10.0.0.5], targetRef: {kind: Pod, name: web-1}}]
ports: [{name: http, port: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: selected, namespace: x}
spec: {clusterIP: 10.96.0.11, selector: {app: web}, ports: [{port: 80, targetPort: http}]}
---
apiVersion: v1
kind: Service
metadata: {name: alias, namespace: x}
spec: {type: ExternalName, externalName: example.com, ports: [{port: 80}]}
";

    fn cluster() -> Cluster {
        let (cluster, errors) = netwarden_model::cluster_of_stream("cluster.yaml", CLUSTER);
        assert!(errors.is_empty(), "{errors:?}");
        cluster
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("test address")
    }

    fn service(name: &str) -> ServiceRef {
        ServiceRef {
            namespace: "x".into(),
            name: name.into(),
        }
    }

    /// The backend pod `x/name`, as [`super::Backend::pod`] holds it.
    #[expect(
        clippy::unnecessary_wraps,
        reason = "compared with Backend::pod, an Option"
    )]
    fn pod(name: &str) -> Option<PodRef> {
        Some(PodRef {
            namespace: "x".into(),
            name: name.into(),
        })
    }

    #[test]
    fn a_service_flow_is_judged_at_each_ready_backend_and_its_target_port() {
        let cluster = cluster();
        let web = service("web");
        let flow = service_flow(&cluster, &[], ip("10.0.0.2"), &web, 80, Protocol::Tcp).unwrap();
        assert_eq!(flow.port.name.as_deref(), Some("http"));
        let backends: Vec<_> = flow
            .backends
            .iter()
            .map(|backend| {
                (
                    backend.pod.clone(),
                    backend.address,
                    backend.port,
                    backend.verdict.allowed(),
                )
            })
            .collect();
        // web-3 is not ready; web-1 in a second slice is still one backend. The slice's port
        // (8080) applies to web-2 too, whatever its container port says.
        assert_eq!(
            backends,
            [
                (pod("web-1"), ip("10.0.0.5"), 8080, true),
                (pod("web-2"), ip("10.0.0.6"), 8080, false),
            ]
        );
        assert_eq!(
            flow.backends[0].origin,
            BackendOrigin::EndpointSlice(netwarden_model::EndpointSliceRef {
                namespace: "x".into(),
                name: "web-abc".into()
            })
        );
        let SideVerdict::Allowed(rules) = &flow.backends[0].verdict.ingress else {
            panic!("{:?}", flow.backends[0].verdict);
        };
        assert_eq!(
            rules[0].to_string(),
            "NetworkPolicy x/web spec.ingress[0].from[0].ports[0]"
        );

        let stranger =
            service_flow(&cluster, &[], ip("10.0.0.3"), &web, 80, Protocol::Tcp).unwrap();
        assert!(
            stranger
                .backends
                .iter()
                .all(|backend| !backend.verdict.allowed())
        );
    }

    #[test]
    fn a_port_the_slices_do_not_carry_and_another_family_have_no_backends() {
        let cluster = cluster();
        let web = service("web");
        let metrics =
            service_flow(&cluster, &[], ip("10.0.0.2"), &web, 9090, Protocol::Tcp).unwrap();
        assert!(metrics.backends.is_empty());
        let from_ipv6 =
            service_flow(&cluster, &[], ip("fd00::2"), &web, 80, Protocol::Tcp).unwrap();
        assert!(from_ipv6.backends.is_empty());
    }

    #[test]
    fn without_slices_the_selector_gives_the_backends_and_names_resolve_per_pod() {
        let cluster = cluster();
        let flow = service_flow(
            &cluster,
            &[],
            ip("10.0.0.2"),
            &service("selected"),
            80,
            Protocol::Tcp,
        )
        .unwrap();
        let backends: Vec<_> = flow
            .backends
            .iter()
            .map(|backend| {
                (
                    backend.pod.clone(),
                    backend.port,
                    backend.origin.clone(),
                    backend.verdict.allowed(),
                )
            })
            .collect();
        assert_eq!(
            backends,
            [
                (pod("web-1"), 8080, BackendOrigin::Selector, true),
                (pod("web-2"), 8081, BackendOrigin::Selector, true),
            ]
        );
    }

    #[test]
    fn unknown_services_ports_and_aliases_are_errors() {
        let cluster = cluster();
        let resolve = |name: &str, port, protocol| {
            service_flow(
                &cluster,
                &[],
                ip("10.0.0.2"),
                &service(name),
                port,
                protocol,
            )
            .unwrap_err()
            .to_string()
        };
        assert_eq!(resolve("nope", 80, Protocol::Tcp), "no Service x/nope");
        assert_eq!(
            resolve("web", 80, Protocol::Udp),
            "Service x/web has no UDP port 80"
        );
        assert_eq!(
            resolve("alias", 80, Protocol::Tcp),
            "Service x/alias is of type ExternalName: a DNS alias with no backends"
        );
        assert!(matches!(
            service_flow(
                &cluster,
                &[],
                ip("10.0.0.2"),
                &service("web"),
                81,
                Protocol::Tcp
            ),
            Err(ServiceFlowError::NoPort { port: 81, .. })
        ));
    }
}
