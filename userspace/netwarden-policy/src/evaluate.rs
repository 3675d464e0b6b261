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
//! ClusterNetworkPolicy (`policy.networking.k8s.io/v1alpha2`) puts tiers around NetworkPolicy.
//! Each side of a flow (the source pod's egress, the destination pod's ingress) is decided by
//! its own pod's policies, in this order:
//! 1. Admin tier: the ClusterNetworkPolicies of tier Admin whose subject selects the pod, by
//!    priority (lower first), then by name (upstream leaves equal priorities undefined; the
//!    name makes it deterministic, and the rules of other policies of that priority that also
//!    match are reported as ties). Their rules of this direction in order; the first that
//!    matches decides: `Accept` allows (nothing later is consulted), `Deny` denies, `Pass`
//!    skips the rest of the Admin tier.
//! 2. NetworkPolicy, as above, if one isolates the pod in this direction: it decides. An
//!    `Audited` verdict (only audit-mode policies isolate the pod, none allows the flow) does
//!    not decide: evaluation goes on to the Baseline tier, whose Deny denies; any other
//!    outcome passes the flow as `Audited`.
//! 3. Baseline tier, as the Admin tier.
//! 4. Allow.
//!
//! A ClusterNetworkPolicy rule matches when one of its peers matches (`namespaces`, `pods`,
//! `networks` blocks, which hold pods' addresses too, and the addresses of `nodes`) and one of
//! its `protocols` does (none: every protocol and port); a named port is the destination pod's
//! container port of that name, in that port's protocol. Every tier is evaluated whatever
//! decided ([`Tiers`]), so `explain` can say what the tiers below would have said.
//!
//! NetworkPolicy speaks of pods, not Services: a flow to a Service address is judged as the flow
//! kube-proxy translates it to, from the client to one backend pod at its target port.
//! [`service_flow`] lists those flows and their verdicts.

use std::{collections::BTreeSet, fmt, net::IpAddr};

use netwarden_model::{
    Action, Cluster, ClusterNetworkPolicy, ClusterPort, ClusterRule, EndpointSliceRef, Enforcement,
    NetworkPolicy, Peer, Pod, PodRef, PolicyRef, PortRef, PortSpec, Protocol, Rule, ServicePort,
    ServiceRef, ServiceType, Tier,
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
    /// No policy of any tier decided: allowed by default (no NetworkPolicy isolates the pod
    /// in this direction, and no ClusterNetworkPolicy rule accepted or denied it).
    NotIsolated,
    /// These NetworkPolicy rules allow it (every one that does).
    Allowed(Vec<RuleMatch>),
    /// These NetworkPolicies isolate the pod and none of their rules allows it.
    Denied(Vec<PolicyRef>),
    /// This ClusterNetworkPolicy rule accepted it (Admin tier, or Baseline tier for a pod no
    /// NetworkPolicy isolates).
    ClusterAccepted(ClusterRuleMatch),
    /// This ClusterNetworkPolicy rule denied it.
    ClusterDenied(ClusterRuleMatch),
    /// Only these policies, all in audit mode (`netwarden.dev/enforcement: audit`), isolate the
    /// pod and none of their rules allows it: the flow passes and is reported as audited.
    Audited(Vec<PolicyRef>),
}

impl SideVerdict {
    /// Whether this side lets the flow through.
    #[must_use]
    pub fn allows(&self) -> bool {
        !matches!(self, Self::Denied(_) | Self::ClusterDenied(_))
    }
}

/// A ClusterNetworkPolicy rule that matched a flow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterRuleMatch {
    /// The policy's name.
    pub policy: String,
    /// Its tier.
    pub tier: Tier,
    /// Its priority.
    pub priority: u16,
    /// The list the rule is in.
    pub direction: Direction,
    /// Its index in that list.
    pub rule: usize,
    /// Its `name`, if it has one.
    pub name: Option<String>,
    /// What it does.
    pub action: Action,
}

impl fmt::Display for ClusterRuleMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = match self.direction {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        };
        write!(
            f,
            "ClusterNetworkPolicy {} {list}[{}]",
            self.policy, self.rule
        )?;
        if let Some(name) = &self.name {
            write!(f, " {name:?}")?;
        }
        write!(
            f,
            " ({}; {} tier, priority {})",
            self.action, self.tier, self.priority
        )
    }
}

/// What one tier of ClusterNetworkPolicies says of one side of a flow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TierVerdict {
    /// No rule of the tier's policies selecting the pod matches.
    NoMatch,
    /// `rule` matched first and decides.
    Matched {
        /// The deciding rule.
        rule: ClusterRuleMatch,
        /// The first matching rule of each other policy of the same tier and priority, which
        /// netwarden evaluates after `rule`'s policy because their names sort after it;
        /// upstream leaves the order undefined, so these are worth a warning.
        ties: Vec<ClusterRuleMatch>,
    },
}

impl TierVerdict {
    /// The deciding rule, if one matched.
    #[must_use]
    pub fn rule(&self) -> Option<&ClusterRuleMatch> {
        match self {
            Self::NoMatch => None,
            Self::Matched { rule, .. } => Some(rule),
        }
    }
}

/// What each tier says of one side of a flow, each evaluated whatever the tiers above said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tiers {
    /// The Admin tier.
    pub admin: TierVerdict,
    /// NetworkPolicy: [`SideVerdict::NotIsolated`], [`SideVerdict::Allowed`],
    /// [`SideVerdict::Denied`] or [`SideVerdict::Audited`].
    pub network_policy: SideVerdict,
    /// The Baseline tier.
    pub baseline: TierVerdict,
}

impl Tiers {
    /// The verdict of the tiers together: the first Accept or Deny of the Admin tier, else
    /// NetworkPolicy if it isolates the pod, else the first Accept or Deny of the Baseline
    /// tier, else allowed.
    ///
    /// Audit mode: when only audit-mode NetworkPolicies isolate the pod and none allows the
    /// flow ([`SideVerdict::Audited`]), the NetworkPolicy tier is enforced as if it did not
    /// isolate: a Baseline Deny denies, and otherwise the flow passes as `Audited`.
    #[must_use]
    pub fn decision(&self) -> SideVerdict {
        if let Some(decided) = decisive(&self.admin) {
            return decided;
        }
        match &self.network_policy {
            SideVerdict::NotIsolated => {
                decisive(&self.baseline).unwrap_or(SideVerdict::NotIsolated)
            }
            SideVerdict::Audited(_) => match decisive(&self.baseline) {
                Some(denied @ SideVerdict::ClusterDenied(_)) => denied,
                _ => self.network_policy.clone(),
            },
            decided => decided.clone(),
        }
    }

    /// Every tie a deciding rule of this side had (see [`TierVerdict::Matched`]).
    pub fn ties(&self) -> impl Iterator<Item = (&ClusterRuleMatch, &ClusterRuleMatch)> {
        [&self.admin, &self.baseline]
            .into_iter()
            .filter_map(|tier| match tier {
                TierVerdict::NoMatch => None,
                TierVerdict::Matched { rule, ties } => {
                    Some(ties.iter().map(move |tie| (rule, tie)))
                }
            })
            .flatten()
    }
}

impl fmt::Display for Tiers {
    /// One line: each tier's say, whatever decided (what `explain` shows under a verdict).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tier = |verdict: &TierVerdict| match verdict.rule() {
            None => "no rule matches".to_owned(),
            Some(rule) => rule.to_string(),
        };
        let network_policy = match &self.network_policy {
            SideVerdict::Allowed(rules) => format!(
                "allowed by {}",
                rules
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            SideVerdict::Denied(policies) => format!(
                "denied: isolated by {}",
                policies
                    .iter()
                    .map(|policy| format!("NetworkPolicy {policy}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            SideVerdict::Audited(policies) => format!(
                "audited: isolated in audit mode by {}",
                policies
                    .iter()
                    .map(|policy| format!("NetworkPolicy {policy}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            _ => "not isolated".to_owned(),
        };
        write!(
            f,
            "Admin tier: {}; NetworkPolicy: {network_policy}; Baseline tier: {}",
            tier(&self.admin),
            tier(&self.baseline)
        )
    }
}

/// A tier's Accept or Deny as a verdict; `None` when it passed or nothing matched.
fn decisive(tier: &TierVerdict) -> Option<SideVerdict> {
    let rule = tier.rule()?;
    match rule.action {
        Action::Accept => Some(SideVerdict::ClusterAccepted(rule.clone())),
        Action::Deny => Some(SideVerdict::ClusterDenied(rule.clone())),
        Action::Pass => None,
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
    /// What each tier said of the egress side (`None` when it is not a pod's). Boxed: a
    /// verdict is passed around by value, and most readers want only the two sides.
    pub egress_tiers: Option<Box<Tiers>>,
    /// What each tier said of the ingress side (`None` when it is not a pod's, or the flow
    /// comes from the node).
    pub ingress_tiers: Option<Box<Tiers>>,
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
    let egress_tiers = pod_at(cluster, flow.source).map(|pod| {
        Box::new(tiers(
            cluster,
            pod,
            Direction::Egress,
            flow.destination,
            flow,
        ))
    });
    let egress = egress_tiers
        .as_ref()
        .map_or(SideVerdict::NotAPod, |tiers| tiers.decision());
    let (ingress, ingress_tiers) = match pod_at(cluster, flow.destination) {
        None => (SideVerdict::NotAPod, None),
        Some(_) if node_addresses.contains(&flow.source) => (SideVerdict::FromNode, None),
        Some(pod) => {
            let tiers = tiers(cluster, pod, Direction::Ingress, flow.source, flow);
            (tiers.decision(), Some(Box::new(tiers)))
        }
    };
    Verdict {
        egress,
        ingress,
        egress_tiers,
        ingress_tiers,
    }
}

/// What `pod`'s policies of every tier in `direction` say of traffic with `peer`.
#[must_use]
pub fn side(
    cluster: &Cluster,
    pod: &Pod,
    direction: Direction,
    peer: IpAddr,
    flow: &Flow,
) -> SideVerdict {
    tiers(cluster, pod, direction, peer, flow).decision()
}

/// What each tier says of traffic with `peer` in `direction` of `pod`.
#[must_use]
pub fn tiers(
    cluster: &Cluster,
    pod: &Pod,
    direction: Direction,
    peer: IpAddr,
    flow: &Flow,
) -> Tiers {
    let destination = match direction {
        Direction::Ingress => Some(pod),
        Direction::Egress => pod_at(cluster, flow.destination),
    };
    let tier = |tier| cluster_tier(cluster, pod, tier, direction, peer, destination, flow);
    Tiers {
        admin: tier(Tier::Admin),
        network_policy: network_policy_side(cluster, pod, direction, peer, flow),
        baseline: tier(Tier::Baseline),
    }
}

/// The first matching rule of `tier`'s policies selecting `pod`, by priority then name, and
/// the ties it has.
fn cluster_tier(
    cluster: &Cluster,
    pod: &Pod,
    tier: Tier,
    direction: Direction,
    peer: IpAddr,
    destination: Option<&Pod>,
    flow: &Flow,
) -> TierVerdict {
    let mut policies: Vec<&ClusterNetworkPolicy> = cluster
        .cluster_policies
        .values()
        .filter(|policy| policy.tier == tier && policy.subject.selects(cluster, pod))
        .collect();
    // Stable: the map yields equal priorities by name already.
    policies.sort_by_key(|policy| policy.priority);
    let mut decided: Option<ClusterRuleMatch> = None;
    let mut also_matched = Vec::new();
    for policy in policies {
        if decided
            .as_ref()
            .is_some_and(|rule| rule.priority != policy.priority)
        {
            break;
        }
        let rules = policy.rules(direction == Direction::Ingress);
        let Some((index, rule)) = rules
            .iter()
            .enumerate()
            .find(|(_, rule)| cluster_rule_matches(cluster, rule, peer, destination, flow))
        else {
            continue;
        };
        let matched = ClusterRuleMatch {
            policy: policy.name.clone(),
            tier,
            priority: policy.priority,
            direction,
            rule: index,
            name: rule.name.clone(),
            action: rule.action,
        };
        if decided.is_none() {
            decided = Some(matched);
        } else {
            also_matched.push(matched);
        }
    }
    match decided {
        None => TierVerdict::NoMatch,
        Some(rule) => TierVerdict::Matched {
            rule,
            ties: also_matched,
        },
    }
}

fn cluster_rule_matches(
    cluster: &Cluster,
    rule: &ClusterRule,
    peer: IpAddr,
    destination: Option<&Pod>,
    flow: &Flow,
) -> bool {
    rule.peers
        .iter()
        .any(|candidate| candidate.matches(cluster, peer))
        && (rule.ports.is_empty()
            || rule
                .ports
                .iter()
                .any(|port| cluster_port_matches(port, destination, flow)))
}

fn cluster_port_matches(port: &ClusterPort, destination: Option<&Pod>, flow: &Flow) -> bool {
    match port {
        ClusterPort::Range {
            protocol,
            first,
            last,
        } => protocol.number() == flow.protocol && (*first..=*last).contains(&flow.port),
        ClusterPort::Named(name) => destination.is_some_and(|pod| {
            pod.ports.iter().any(|candidate| {
                candidate.name.as_deref() == Some(name)
                    && candidate.protocol.number() == flow.protocol
                    && candidate.port == flow.port
            })
        }),
    }
}

/// What `pod`'s NetworkPolicies in `direction` say of traffic with `peer`.
fn network_policy_side(
    cluster: &Cluster,
    pod: &Pod,
    direction: Direction,
    peer: IpAddr,
    flow: &Flow,
) -> SideVerdict {
    let mut isolating: Vec<&NetworkPolicy> = cluster
        .policies
        .values()
        .map(AsRef::as_ref)
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

#[cfg(test)]
mod tier_tests {
    use std::net::IpAddr;

    use netwarden_model::{Action, Cluster, Tier};

    use super::{Flow, SideVerdict, TierVerdict, Verdict, evaluate};

    /// Namespaces `x` (team a) and `y` (team b); pods `x/a` (10.0.0.1), `x/b` (10.0.0.2,
    /// named port `http` 8080/TCP), `y/c` (10.0.0.3); node `n1` (172.18.0.2, linux).
    const PODS: &str = r"
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {team: a}}
---
apiVersion: v1
kind: Namespace
metadata: {name: y, labels: {team: b}}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {app: a}}
spec: {nodeName: n1, containers: [{name: c}]}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: x, labels: {app: b}}
spec: {nodeName: n1, containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: c, namespace: y, labels: {app: c}}
spec: {nodeName: n1, containers: [{name: c}]}
status: {podIP: 10.0.0.3}
---
apiVersion: v1
kind: Node
metadata: {name: n1, labels: {kubernetes.io/os: linux}}
status: {addresses: [{type: InternalIP, address: 172.18.0.2}]}
";

    /// A NetworkPolicy isolating `x/b` for ingress and allowing only `x/a` to it.
    const ONLY_A_TO_B: &str = r"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: only-a, namespace: x}
spec:
  podSelector: {matchLabels: {app: b}}
  ingress: [{from: [{podSelector: {matchLabels: {app: a}}}]}]
";

    fn cluster(objects: &[&str]) -> Cluster {
        let stream = [PODS]
            .iter()
            .chain(objects)
            .copied()
            .collect::<Vec<_>>()
            .join("\n---\n");
        let (cluster, errors) = netwarden_model::cluster_of_stream("cluster.yaml", &stream);
        assert!(errors.is_empty(), "{errors:?}");
        cluster
    }

    /// A ClusterNetworkPolicy named `name`.
    fn cnp(name: &str, tier: &str, priority: u16, rest: &str) -> String {
        format!(
            "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {{name: {name}}}\nspec:\n  tier: {tier}\n  priority: {priority}\n{rest}"
        )
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("test address")
    }

    fn tcp(source: &str, destination: &str, port: u16) -> Flow {
        Flow {
            source: ip(source),
            destination: ip(destination),
            protocol: 6,
            port,
        }
    }

    fn judge(cluster: &Cluster, flow: &Flow) -> Verdict {
        evaluate(cluster, &[ip("172.18.0.2")], flow)
    }

    const A: &str = "10.0.0.1";
    const B: &str = "10.0.0.2";
    const C: &str = "10.0.0.3";

    /// Ingress to `x/b` from namespace `team`: `action`.
    fn to_b_from(team: &str, action: &str) -> String {
        format!(
            "  subject: {{pods: {{namespaceSelector: {{matchLabels: {{team: a}}}}, podSelector: {{matchLabels: {{app: b}}}}}}}}\n  ingress: [{{action: {action}, from: [{{namespaces: {{matchLabels: {{team: {team}}}}}}}]}}]\n"
        )
    }

    #[test]
    fn an_admin_deny_overrides_what_network_policy_allows_and_names_the_rule() {
        let cluster = cluster(&[
            ONLY_A_TO_B,
            &cnp("deny-x", "Admin", 10, &to_b_from("a", "Deny")),
        ]);
        let verdict = judge(&cluster, &tcp(A, B, 80));
        assert!(!verdict.allowed());
        let SideVerdict::ClusterDenied(rule) = &verdict.ingress else {
            panic!("{verdict:?}");
        };
        assert_eq!(
            rule.to_string(),
            "ClusterNetworkPolicy deny-x ingress[0] (Deny; Admin tier, priority 10)"
        );
        let tiers = verdict.ingress_tiers.as_ref().unwrap();
        assert!(
            matches!(tiers.network_policy, SideVerdict::Allowed(_)),
            "the tier below would have allowed it: {tiers:?}"
        );
        assert_eq!(
            tiers.to_string(),
            "Admin tier: ClusterNetworkPolicy deny-x ingress[0] (Deny; Admin tier, priority 10); NetworkPolicy: allowed by NetworkPolicy x/only-a spec.ingress[0].from[0] (every port); Baseline tier: no rule matches"
        );
        // The subject is x/b only: x/a's ingress is not touched.
        assert!(judge(&cluster, &tcp(B, A, 80)).allowed());
    }

    #[test]
    fn an_admin_accept_overrides_network_policy_and_ends_evaluation() {
        let cluster = cluster(&[
            ONLY_A_TO_B,
            &cnp("accept-y", "Admin", 10, &to_b_from("b", "Accept")),
            &cnp("deny-y-later", "Admin", 20, &to_b_from("b", "Deny")),
            &cnp("baseline-deny-y", "Baseline", 0, &to_b_from("b", "Deny")),
        ]);
        let verdict = judge(&cluster, &tcp(C, B, 80));
        assert!(verdict.allowed(), "{verdict:?}");
        let SideVerdict::ClusterAccepted(rule) = &verdict.ingress else {
            panic!("{verdict:?}");
        };
        assert_eq!(rule.policy, "accept-y");
        let tiers = verdict.ingress_tiers.unwrap();
        assert!(matches!(tiers.network_policy, SideVerdict::Denied(_)));
        assert_eq!(tiers.baseline.rule().unwrap().policy, "baseline-deny-y");
    }

    #[test]
    fn pass_skips_the_rest_of_the_admin_tier_to_network_policy_then_baseline() {
        let pass_then_deny = [
            cnp("pass-y", "Admin", 1, &to_b_from("b", "Pass")),
            cnp("deny-y", "Admin", 2, &to_b_from("b", "Deny")),
        ];
        // NetworkPolicy isolates x/b: it decides (denies y/c), the Admin deny never applies.
        let isolated = cluster(&[ONLY_A_TO_B, &pass_then_deny[0], &pass_then_deny[1]]);
        let verdict = judge(&isolated, &tcp(C, B, 80));
        assert!(
            matches!(verdict.ingress, SideVerdict::Denied(_)),
            "{verdict:?}"
        );
        assert_eq!(
            verdict.ingress_tiers.unwrap().admin.rule().unwrap().action,
            Action::Pass
        );

        // No NetworkPolicy: the Baseline tier decides, then the default.
        let accept = cnp(
            "baseline-accept-y",
            "Baseline",
            5,
            &to_b_from("b", "Accept"),
        );
        let baseline = cluster(&[&pass_then_deny[0], &pass_then_deny[1], &accept]);
        let verdict = judge(&baseline, &tcp(C, B, 80));
        let SideVerdict::ClusterAccepted(rule) = &verdict.ingress else {
            panic!("{verdict:?}");
        };
        assert_eq!(
            (rule.tier, rule.policy.as_str()),
            (Tier::Baseline, "baseline-accept-y")
        );
        let default = cluster(&[&pass_then_deny[0], &pass_then_deny[1]]);
        assert_eq!(
            judge(&default, &tcp(C, B, 80)).ingress,
            SideVerdict::NotIsolated
        );

        // Without the Pass, the Admin deny applies.
        let denied = cluster(&[&pass_then_deny[1], &accept]);
        assert!(!judge(&denied, &tcp(C, B, 80)).allowed());
    }

    #[test]
    fn baseline_decides_only_where_no_network_policy_isolates() {
        let deny_all_to_x = cnp(
            "baseline-deny",
            "Baseline",
            100,
            "  subject: {namespaces: {matchLabels: {team: a}}}\n  ingress: [{action: Deny, from: [{namespaces: {}}]}]\n",
        );
        let cluster = cluster(&[ONLY_A_TO_B, &deny_all_to_x]);
        // x/b is isolated by NetworkPolicy, which allows x/a.
        assert!(judge(&cluster, &tcp(A, B, 80)).allowed());
        // x/a is not: the baseline denies y/c.
        let verdict = judge(&cluster, &tcp(C, A, 80));
        let SideVerdict::ClusterDenied(rule) = &verdict.ingress else {
            panic!("{verdict:?}");
        };
        assert_eq!(rule.tier, Tier::Baseline);
        // The node's probes still pass.
        assert_eq!(
            judge(&cluster, &tcp("172.18.0.2", A, 80)).ingress,
            SideVerdict::FromNode
        );
    }

    #[test]
    fn an_audited_network_policy_tier_goes_on_to_baseline_and_the_default() {
        let audit_only_a_to_b = ONLY_A_TO_B.replace(
            "metadata: {name: only-a, namespace: x}",
            "metadata: {name: only-a, namespace: x, annotations: {netwarden.dev/enforcement: audit}}",
        );
        // Nothing below: the default allows, reported as audited.
        let alone = cluster(&[&audit_only_a_to_b]);
        let verdict = judge(&alone, &tcp(C, B, 80));
        assert!(verdict.allowed(), "{verdict:?}");
        assert!(
            matches!(&verdict.ingress, SideVerdict::Audited(policies) if policies.len() == 1),
            "{verdict:?}"
        );
        // What the audit-mode policy allows is simply allowed.
        assert!(matches!(
            judge(&alone, &tcp(A, B, 80)).ingress,
            SideVerdict::Allowed(_)
        ));

        // A Baseline Accept: still audited (the NetworkPolicy tier would have denied it).
        let accepted = cluster(&[
            &audit_only_a_to_b,
            &cnp(
                "baseline-accept-y",
                "Baseline",
                5,
                &to_b_from("b", "Accept"),
            ),
        ]);
        let verdict = judge(&accepted, &tcp(C, B, 80));
        assert!(verdict.allowed(), "{verdict:?}");
        assert!(
            matches!(verdict.ingress, SideVerdict::Audited(_)),
            "{verdict:?}"
        );
        assert_eq!(
            verdict.ingress_tiers.unwrap().to_string(),
            "Admin tier: no rule matches; NetworkPolicy: audited: isolated in audit mode by NetworkPolicy x/only-a; Baseline tier: ClusterNetworkPolicy baseline-accept-y ingress[0] (Accept; Baseline tier, priority 5)"
        );

        // A Baseline Deny: denied by the Baseline rule.
        let denied = cluster(&[
            &audit_only_a_to_b,
            &cnp("baseline-deny-y", "Baseline", 5, &to_b_from("b", "Deny")),
        ]);
        let verdict = judge(&denied, &tcp(C, B, 80));
        assert!(!verdict.allowed(), "{verdict:?}");
        let SideVerdict::ClusterDenied(rule) = &verdict.ingress else {
            panic!("{verdict:?}");
        };
        assert_eq!(
            (rule.tier, rule.policy.as_str()),
            (Tier::Baseline, "baseline-deny-y")
        );

        // The Admin tier decides first: its Accept wins over the Baseline Deny.
        let admin = cluster(&[
            &audit_only_a_to_b,
            &cnp("baseline-deny-y", "Baseline", 5, &to_b_from("b", "Deny")),
            &cnp("admin-accept-y", "Admin", 5, &to_b_from("b", "Accept")),
        ]);
        let verdict = judge(&admin, &tcp(C, B, 80));
        let SideVerdict::ClusterAccepted(rule) = &verdict.ingress else {
            panic!("{verdict:?}");
        };
        assert_eq!(rule.tier, Tier::Admin);
    }

    #[test]
    fn equal_priorities_are_decided_by_name_and_reported_as_ties() {
        let cluster = cluster(&[
            &cnp("b-deny", "Admin", 7, &to_b_from("b", "Deny")),
            &cnp("a-accept", "Admin", 7, &to_b_from("b", "Accept")),
        ]);
        let verdict = judge(&cluster, &tcp(C, B, 80));
        let tiers = verdict.ingress_tiers.as_ref().unwrap();
        let TierVerdict::Matched { rule, ties } = &tiers.admin else {
            panic!("{tiers:?}");
        };
        assert_eq!(rule.policy, "a-accept", "the first by name decides");
        assert_eq!(ties.len(), 1);
        assert_eq!(ties[0].policy, "b-deny");
        assert_eq!(tiers.ties().count(), 1);
        assert!(verdict.allowed());
    }

    #[test]
    fn rules_are_tried_in_order_and_protocols_ports_and_named_ports_match() {
        let cluster = cluster(&[&cnp(
            "ordered",
            "Admin",
            1,
            "  subject: {namespaces: {matchLabels: {team: b}}}
  egress:
  - {name: web, action: Accept, to: [{pods: {podSelector: {matchLabels: {app: b}}}}], protocols: [{destinationNamedPort: http}, {udp: {destinationPort: {range: {start: 5000, end: 5010}}}}]}
  - {action: Accept, to: [{nodes: {matchLabels: {kubernetes.io/os: linux}}}], protocols: [{tcp: {destinationPort: {number: 10250}}}]}
  - {action: Accept, to: [{networks: [192.0.2.0/24]}]}
  - {action: Deny, to: [{networks: [0.0.0.0/0]}]}
",
        )]);
        let egress = |flow: Flow| judge(&cluster, &flow).egress;
        let SideVerdict::ClusterAccepted(rule) = egress(tcp(C, B, 8080)) else {
            panic!("the named port");
        };
        assert_eq!(
            rule.to_string(),
            "ClusterNetworkPolicy ordered egress[0] \"web\" (Accept; Admin tier, priority 1)"
        );
        assert!(
            egress(Flow {
                protocol: 17,
                ..tcp(C, B, 5005)
            })
            .allows()
        );
        let SideVerdict::ClusterDenied(rule) = egress(tcp(C, B, 80)) else {
            panic!("port 80 is not http");
        };
        assert_eq!(rule.rule, 3, "the networks block holds pods too");
        assert!(egress(tcp(C, "172.18.0.2", 10250)).allows(), "the node");
        assert!(!egress(tcp(C, "172.18.0.2", 22)).allows());
        assert!(
            egress(Flow {
                protocol: 1,
                ..tcp(C, "192.0.2.9", 0)
            })
            .allows(),
            "no protocols: every protocol"
        );
        assert!(!egress(tcp(C, "198.51.100.1", 443)).allows());
        // x/a is no subject: not denied.
        assert_eq!(
            egress(tcp(A, "198.51.100.1", 443)),
            SideVerdict::NotIsolated
        );
    }
}
