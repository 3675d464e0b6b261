//! The identity check's decision, pure: a cluster snapshot and a connection in, a verdict with
//! its reason out.
//!
//! A connection to a pod is allowed only when all of these hold, checked in this order (the
//! first that fails is the reason given):
//!
//! 1. the destination address is a pod the agent knows (fail closed on anything else);
//! 2. NetworkPolicy allows source -> destination:port over TCP, as the reference evaluator
//!    says — the evaluator the compiler, and so the datapath, is tested against;
//! 3. the peer presented a principal;
//! 4. the source address belongs to a pod, and the principal is that pod's SPIFFE ID,
//!    `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`: a valid certificate used
//!    from another pod's address is refused;
//! 5. when the destination pod has `netwarden.dev/allowed-principals`, the principal matches
//!    one of its entries (`*` stands for one whole last path segment).

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::IpAddr,
};

use netwarden_model::{Cluster, Pod, PodRef, Protocol};
use netwarden_policy::evaluate::{self, Flow, SideVerdict, Verdict};

use crate::IdentityError;

/// The trust domain of the cluster's SPIFFE IDs (`cluster.local` unless configured).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Validates a trust domain name as SPIFFE defines it: lowercase letters, digits, `.`, `-`
    /// and `_`, not empty.
    pub fn new(name: &str) -> Result<Self, IdentityError> {
        let valid = !name.is_empty()
            && name.bytes().all(|byte| {
                byte.is_ascii_lowercase() || byte.is_ascii_digit() || b".-_".contains(&byte)
            });
        if valid {
            Ok(Self(name.to_owned()))
        } else {
            Err(IdentityError::InvalidTrustDomain(name.to_owned()))
        }
    }

    /// The SPIFFE ID of workloads running as `service_account` in `namespace`.
    #[must_use]
    pub fn spiffe_id(&self, namespace: &str, service_account: &str) -> String {
        format!("spiffe://{}/ns/{namespace}/sa/{service_account}", self.0)
    }

    /// The SPIFFE ID of `pod`.
    #[must_use]
    pub fn spiffe_id_of(&self, pod: &Pod) -> String {
        self.spiffe_id(&pod.id.namespace, &pod.service_account)
    }
}

impl Default for TrustDomain {
    fn default() -> Self {
        Self("cluster.local".to_owned())
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A connection as the destination's proxy saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connection {
    /// The client's address.
    pub source: IpAddr,
    /// The address the client connected to: the destination pod's.
    pub destination: IpAddr,
    /// The port the client connected to.
    pub port: u16,
    /// The principal of the client's verified certificate (its URI SAN), if it presented one.
    pub principal: Option<String>,
}

/// The identity check's verdict, with everything its reason names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Every check passed.
    Allowed {
        /// The client pod.
        source: PodRef,
        /// The server pod.
        destination: PodRef,
        /// The principal that was verified.
        principal: String,
    },
    /// A check failed; the first in the module's order is named.
    Denied(Denial),
}

impl Decision {
    /// Whether the connection may go on.
    #[must_use]
    pub fn is_allowed(&self) -> bool {
        matches!(self, Self::Allowed { .. })
    }

    /// A short name of the decision's kind, for counters and structured logs.
    #[must_use]
    pub fn label(&self) -> &'static str {
        match self {
            Self::Allowed { .. } => "allowed",
            Self::Denied(denial) => denial.label(),
        }
    }
}

/// Why a connection was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Denial {
    /// No pod the agent knows has the destination address.
    UnknownDestination(IpAddr),
    /// NetworkPolicy does not allow the flow.
    NetworkPolicy(Verdict),
    /// The client presented no principal (no verified certificate).
    NoPrincipal,
    /// No pod has the source address, so no principal can be expected from it.
    SourceNotAPod(IpAddr),
    /// The principal is not the SPIFFE ID of the pod that owns the source address.
    WrongPrincipal {
        /// What the client presented.
        presented: String,
        /// The source pod.
        source: PodRef,
        /// The source pod's SPIFFE ID.
        expected: String,
    },
    /// The destination's `netwarden.dev/allowed-principals` does not list the principal.
    NotAnAllowedPrincipal {
        /// What the client presented.
        presented: String,
        /// The destination pod.
        destination: PodRef,
        /// Its allowed principals.
        allowed: Vec<String>,
    },
}

impl Denial {
    /// A short name of the reason, for counters and structured logs.
    #[must_use]
    pub fn label(&self) -> &'static str {
        match self {
            Self::UnknownDestination(_) => "unknown_destination",
            Self::NetworkPolicy(_) => "network_policy",
            Self::NoPrincipal => "no_principal",
            Self::SourceNotAPod(_) => "source_not_a_pod",
            Self::WrongPrincipal { .. } => "wrong_principal",
            Self::NotAnAllowedPrincipal { .. } => "principal_not_allowed",
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Allowed {
                source,
                destination,
                principal,
            } => write!(
                f,
                "allowed: NetworkPolicy allows {source} -> {destination} and {principal} is the identity of {source}"
            ),
            Self::Denied(denial) => write!(f, "denied: {denial}"),
        }
    }
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownDestination(address) => {
                write!(f, "the destination {address} is not a pod this agent knows")
            }
            Self::NetworkPolicy(verdict) => {
                f.write_str("NetworkPolicy does not allow it")?;
                for (side, side_verdict) in
                    [("egress", &verdict.egress), ("ingress", &verdict.ingress)]
                {
                    if let SideVerdict::ClusterDenied(rule) = side_verdict {
                        write!(f, " ({side} denied by {rule})")?;
                    }
                    if let SideVerdict::Denied(policies) = side_verdict {
                        let names: Vec<String> = policies.iter().map(ToString::to_string).collect();
                        write!(
                            f,
                            " ({side} isolated by {}; no rule allows it)",
                            names.join(", ")
                        )?;
                    }
                }
                Ok(())
            }
            Self::NoPrincipal => f.write_str("the client presented no verified principal"),
            Self::SourceNotAPod(address) => write!(
                f,
                "the source {address} is not a pod, so no workload identity can come from it"
            ),
            Self::WrongPrincipal {
                presented,
                source,
                expected,
            } => write!(
                f,
                "principal {presented} is not the identity of {source}, the pod that owns the source address (expected {expected})"
            ),
            Self::NotAnAllowedPrincipal {
                presented,
                destination,
                allowed,
            } => write!(
                f,
                "principal {presented} is not in the allowed principals of {destination} ({})",
                allowed.join(", ")
            ),
        }
    }
}

/// Decides `connection` on `cluster`, whose node has `node_addresses`.
#[must_use]
pub fn decide(
    cluster: &Cluster,
    node_addresses: &[IpAddr],
    trust_domain: &TrustDomain,
    connection: &Connection,
) -> Decision {
    let Some(destination) = evaluate::pod_at(cluster, connection.destination) else {
        return Decision::Denied(Denial::UnknownDestination(connection.destination));
    };
    let verdict = evaluate::evaluate(
        cluster,
        node_addresses,
        &Flow {
            source: connection.source,
            destination: connection.destination,
            protocol: Protocol::Tcp.number(),
            port: connection.port,
        },
    );
    if !verdict.allowed() {
        return Decision::Denied(Denial::NetworkPolicy(verdict));
    }
    let Some(presented) = connection.principal.as_deref().filter(|p| !p.is_empty()) else {
        return Decision::Denied(Denial::NoPrincipal);
    };
    let Some(source) = evaluate::pod_at(cluster, connection.source) else {
        return Decision::Denied(Denial::SourceNotAPod(connection.source));
    };
    let expected = trust_domain.spiffe_id_of(source);
    if presented != expected {
        return Decision::Denied(Denial::WrongPrincipal {
            presented: presented.to_owned(),
            source: source.id.clone(),
            expected,
        });
    }
    if let Some(allowed) = &destination.mtls.allowed_principals
        && !allowed
            .iter()
            .any(|pattern| principal_matches(pattern, presented))
    {
        return Decision::Denied(Denial::NotAnAllowedPrincipal {
            presented: presented.to_owned(),
            destination: destination.id.clone(),
            allowed: allowed.clone(),
        });
    }
    Decision::Allowed {
        source: source.id.clone(),
        destination: destination.id.clone(),
        principal: presented.to_owned(),
    }
}

/// The cluster indexed by pod address, so that a decision reads only what concerns its two
/// addresses instead of scanning every pod (the reference evaluator scans: it is written to be
/// obviously right, not fast).
///
/// [`ClusterIndex::relevant`] gives a cluster that decides exactly like the whole one for a
/// flow between two addresses: NetworkPolicy matches a peer only through the pod that owns its
/// address (or the address itself, for `ipBlock`), named ports resolve on the destination pod,
/// and only the policies of the two pods' namespaces can isolate them. So it keeps every pod
/// claiming either address (the evaluator's tie-break between two claimants needs them all),
/// the namespaces of those pods, and the policies of those namespaces.
#[derive(Clone, Debug, Default)]
pub struct ClusterIndex {
    /// Pods by address, in the cluster's order.
    by_address: HashMap<IpAddr, Vec<PodRef>>,
}

impl ClusterIndex {
    /// Indexes `cluster`.
    #[must_use]
    pub fn new(cluster: &Cluster) -> Self {
        let mut by_address: HashMap<IpAddr, Vec<PodRef>> = HashMap::new();
        for pod in cluster.pods.values() {
            for ip in &pod.ips {
                by_address.entry(*ip).or_default().push(pod.id.clone());
            }
        }
        Self { by_address }
    }

    /// The pods claiming `address`, in the cluster's order.
    #[must_use]
    pub fn pods_at(&self, address: IpAddr) -> &[PodRef] {
        self.by_address.get(&address).map_or(&[], Vec::as_slice)
    }

    /// The part of `cluster` that decides flows between `first` and `second`.
    #[must_use]
    pub fn relevant(&self, cluster: &Cluster, first: IpAddr, second: IpAddr) -> Cluster {
        // ClusterNetworkPolicies select across namespaces, and their `nodes` peers need the
        // nodes: they are kept whole (there are few).
        let mut part = Cluster {
            cluster_policies: cluster.cluster_policies.clone(),
            nodes: cluster.nodes.clone(),
            ..Cluster::default()
        };
        for address in [first, second] {
            for id in self.by_address.get(&address).into_iter().flatten() {
                let Some(pod) = cluster.pods.get(id) else {
                    continue;
                };
                part.pods.insert(id.clone(), pod.clone());
                if let Some(namespace) = cluster.namespaces.get(&id.namespace) {
                    part.namespaces
                        .insert(id.namespace.clone(), namespace.clone());
                }
                if !part
                    .policies
                    .keys()
                    .any(|policy| policy.namespace == id.namespace)
                {
                    part.policies.extend(
                        cluster
                            .policies
                            .iter()
                            .filter(|(policy, _)| policy.namespace == id.namespace)
                            .map(|(policy, object)| (policy.clone(), object.clone())),
                    );
                }
            }
        }
        part
    }
}

/// [`decide`] on the part of `cluster` that concerns the connection (see [`ClusterIndex`]).
#[must_use]
pub fn decide_indexed(
    cluster: &Cluster,
    index: &ClusterIndex,
    node_addresses: &[IpAddr],
    trust_domain: &TrustDomain,
    connection: &Connection,
) -> Decision {
    let part = index.relevant(cluster, connection.source, connection.destination);
    decide(&part, node_addresses, trust_domain, connection)
}

/// Whether `principal` matches an allowed-principals entry: equal, or equal up to a last path
/// segment that the pattern spells `*` (one whole segment, never a `/`).
#[must_use]
pub fn principal_matches(pattern: &str, principal: &str) -> bool {
    match pattern.strip_suffix("/*") {
        Some(prefix) => principal
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_prefix('/'))
            .is_some_and(|segment| !segment.is_empty() && !segment.contains('/')),
        None => pattern == principal,
    }
}

/// What the identity check would accept on a connection to `destination` (a pod address) on
/// `port`: every principal it would allow, with the pods it would allow it from. Pods without
/// an address, and host-network pods, can never be a source.
#[must_use]
pub fn acceptable_principals(
    cluster: &Cluster,
    node_addresses: &[IpAddr],
    trust_domain: &TrustDomain,
    destination: IpAddr,
    port: u16,
) -> BTreeMap<String, Vec<PodRef>> {
    let index = ClusterIndex::new(cluster);
    let mut accepted: BTreeMap<String, Vec<PodRef>> = BTreeMap::new();
    for pod in cluster.pods.values().filter(|pod| !pod.host_network) {
        let principal = trust_domain.spiffe_id_of(pod);
        let allowed_from_some_address = pod.ips.iter().any(|source| {
            decide_indexed(
                cluster,
                &index,
                node_addresses,
                trust_domain,
                &Connection {
                    source: *source,
                    destination,
                    port,
                    principal: Some(principal.clone()),
                },
            )
            .is_allowed()
        });
        if allowed_from_some_address {
            accepted.entry(principal).or_default().push(pod.id.clone());
        }
    }
    accepted
}

#[cfg(test)]
mod tests {
    use netwarden_model::PodRef;

    use super::{Connection, Decision, Denial, TrustDomain, acceptable_principals, decide};

    /// `shop/web` (service account `web`) may reach `shop/api` on 8443; `shop/batch` (service
    /// account `batch`) may too; `shop/intruder` may not (NetworkPolicy). `shop/api` accepts
    /// only `web`'s service account and anything of namespace `ops`.
    const CLUSTER: &str = r"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Pod
metadata:
  name: api
  namespace: shop
  labels: {app: api, netwarden.dev/mtls: strict}
  annotations:
    netwarden.dev/allowed-principals: 'spiffe://cluster.local/ns/shop/sa/web, spiffe://cluster.local/ns/ops/sa/*'
spec: {nodeName: n1, serviceAccountName: api, containers: [{name: c}]}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec: {nodeName: n1, serviceAccountName: web, containers: [{name: c}]}
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: batch, namespace: shop, labels: {app: batch}}
spec: {nodeName: n1, serviceAccountName: batch, containers: [{name: c}]}
status: {podIP: 10.0.0.3}
---
apiVersion: v1
kind: Pod
metadata: {name: intruder, namespace: shop, labels: {app: intruder}}
spec: {nodeName: n1, containers: [{name: c}]}
status: {podIP: 10.0.0.4}
---
apiVersion: v1
kind: Pod
metadata: {name: sre, namespace: ops, labels: {app: sre}}
spec: {nodeName: n1, serviceAccountName: oncall, containers: [{name: c}]}
status: {podIP: 10.0.0.5}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: api, namespace: shop}
spec:
  podSelector: {matchLabels: {app: api}}
  ingress:
  - from:
    - podSelector: {matchExpressions: [{key: app, operator: In, values: [web, batch]}]}
    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: ops}}
    ports: [{port: 8443}]
";

    const NODE: &str = "192.168.0.10";

    fn cluster() -> netwarden_model::Cluster {
        let (cluster, errors) = netwarden_model::cluster_of_stream("cluster.yaml", CLUSTER);
        assert!(errors.is_empty(), "{errors:?}");
        cluster
    }

    fn check(source: &str, port: u16, principal: Option<&str>) -> Decision {
        decide(
            &cluster(),
            &[NODE.parse().unwrap()],
            &TrustDomain::default(),
            &Connection {
                source: source.parse().unwrap(),
                destination: "10.0.0.1".parse().unwrap(),
                port,
                principal: principal.map(str::to_owned),
            },
        )
    }

    fn pod(namespace: &str, name: &str) -> PodRef {
        PodRef {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    #[test]
    fn the_right_identity_from_its_own_pod_is_allowed() {
        let decision = check(
            "10.0.0.2",
            8443,
            Some("spiffe://cluster.local/ns/shop/sa/web"),
        );
        assert_eq!(
            decision,
            Decision::Allowed {
                source: pod("shop", "web"),
                destination: pod("shop", "api"),
                principal: "spiffe://cluster.local/ns/shop/sa/web".into(),
            }
        );
        assert_eq!(
            decision.to_string(),
            "allowed: NetworkPolicy allows shop/web -> shop/api and spiffe://cluster.local/ns/shop/sa/web is the identity of shop/web"
        );
    }

    #[test]
    fn a_valid_identity_of_another_service_account_is_denied() {
        let decision = check(
            "10.0.0.2",
            8443,
            Some("spiffe://cluster.local/ns/shop/sa/batch"),
        );
        assert_eq!(
            decision,
            Decision::Denied(Denial::WrongPrincipal {
                presented: "spiffe://cluster.local/ns/shop/sa/batch".into(),
                source: pod("shop", "web"),
                expected: "spiffe://cluster.local/ns/shop/sa/web".into(),
            })
        );
    }

    #[test]
    fn the_right_certificate_from_another_pods_address_is_denied() {
        // batch is allowed by NetworkPolicy, but the certificate is web's.
        let decision = check(
            "10.0.0.3",
            8443,
            Some("spiffe://cluster.local/ns/shop/sa/web"),
        );
        assert_eq!(decision.label(), "wrong_principal");
        assert!(
            decision
                .to_string()
                .contains("not the identity of shop/batch")
        );
    }

    #[test]
    fn a_source_network_policy_denies_is_refused_whatever_its_certificate() {
        let decision = check(
            "10.0.0.4",
            8443,
            Some("spiffe://cluster.local/ns/shop/sa/default"),
        );
        assert_eq!(decision.label(), "network_policy");
        assert_eq!(
            decision.to_string(),
            "denied: NetworkPolicy does not allow it (ingress isolated by shop/api; no rule allows it)"
        );
        // The port is part of the policy too.
        assert_eq!(
            check(
                "10.0.0.2",
                8080,
                Some("spiffe://cluster.local/ns/shop/sa/web")
            )
            .label(),
            "network_policy"
        );
    }

    #[test]
    fn the_destinations_allowed_principals_are_enforced_with_a_last_segment_wildcard() {
        // batch's own identity from its own address: allowed by policy, not by the annotation.
        let decision = check(
            "10.0.0.3",
            8443,
            Some("spiffe://cluster.local/ns/shop/sa/batch"),
        );
        assert_eq!(decision.label(), "principal_not_allowed");
        // ops/* matches any service account of namespace ops.
        let decision = check(
            "10.0.0.5",
            8443,
            Some("spiffe://cluster.local/ns/ops/sa/oncall"),
        );
        assert!(decision.is_allowed(), "{decision}");
    }

    #[test]
    fn no_principal_an_unknown_source_or_an_unknown_destination_fail_closed() {
        assert_eq!(check("10.0.0.2", 8443, None).label(), "no_principal");
        assert_eq!(check("10.0.0.2", 8443, Some("")).label(), "no_principal");
        // An address outside the cluster: the policy only admits pods, so NetworkPolicy denies.
        assert_eq!(
            check(
                "10.9.9.9",
                8443,
                Some("spiffe://cluster.local/ns/shop/sa/web")
            )
            .label(),
            "network_policy"
        );
        // The node may reach the pod (kubelet probes), but carries no workload identity.
        assert_eq!(
            check(NODE, 8443, Some("spiffe://cluster.local/ns/shop/sa/web")).label(),
            "source_not_a_pod"
        );
        let decision = decide(
            &cluster(),
            &[],
            &TrustDomain::default(),
            &Connection {
                source: "10.0.0.2".parse().unwrap(),
                destination: "10.0.0.99".parse().unwrap(),
                port: 8443,
                principal: Some("spiffe://cluster.local/ns/shop/sa/web".into()),
            },
        );
        assert_eq!(decision.label(), "unknown_destination");
    }

    #[test]
    fn the_trust_domain_is_part_of_the_identity() {
        let other = TrustDomain::new("prod.example").unwrap();
        let decision = decide(
            &cluster(),
            &[],
            &other,
            &Connection {
                source: "10.0.0.2".parse().unwrap(),
                destination: "10.0.0.1".parse().unwrap(),
                port: 8443,
                principal: Some("spiffe://cluster.local/ns/shop/sa/web".into()),
            },
        );
        assert_eq!(decision.label(), "wrong_principal");
        assert!(TrustDomain::new("Bad Domain").is_err());
        assert!(TrustDomain::new("").is_err());
    }

    #[test]
    fn wildcards_cover_one_whole_last_segment_only() {
        use super::principal_matches;
        let pattern = "spiffe://cluster.local/ns/ops/sa/*";
        assert!(principal_matches(
            pattern,
            "spiffe://cluster.local/ns/ops/sa/a"
        ));
        assert!(!principal_matches(
            pattern,
            "spiffe://cluster.local/ns/ops/sa/"
        ));
        assert!(!principal_matches(
            pattern,
            "spiffe://cluster.local/ns/ops/sa/a/b"
        ));
        assert!(!principal_matches(
            pattern,
            "spiffe://cluster.local/ns/ops/sab"
        ));
        assert!(principal_matches("spiffe://td/x", "spiffe://td/x"));
        assert!(!principal_matches("spiffe://td/x", "spiffe://td/xy"));
    }

    #[test]
    fn the_indexed_decision_is_the_decision_on_the_whole_cluster() {
        // And with ClusterNetworkPolicies, which select across namespaces: an Admin Deny of
        // `ops`, and a Baseline Deny of everything else to `shop` pods no NetworkPolicy isolates.
        let (with_tiers, errors) = netwarden_model::cluster_of_stream(
            "cluster.yaml",
            &format!(
                "{CLUSTER}---
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {{name: no-ops}}
spec:
  tier: Admin
  priority: 1
  subject: {{namespaces: {{matchLabels: {{kubernetes.io/metadata.name: shop}}}}}}
  ingress: [{{action: Deny, from: [{{namespaces: {{matchLabels: {{kubernetes.io/metadata.name: ops}}}}}}]}}]
---
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {{name: baseline}}
spec:
  tier: Baseline
  priority: 1
  subject: {{namespaces: {{}}}}
  ingress: [{{action: Deny, from: [{{namespaces: {{}}}}]}}]
"
            ),
        );
        assert!(errors.is_empty(), "{errors:?}");
        let mut compared = 0;
        for cluster in [cluster(), with_tiers] {
            compared += compare_indexed(&cluster);
        }
        assert_eq!(compared, 2 * 7 * 7 * 2 * 6);
    }

    /// Every connection between the pods' addresses, the node's and an outside one, decided
    /// on the whole cluster and on its indexed part; returns how many were compared.
    fn compare_indexed(cluster: &netwarden_model::Cluster) -> usize {
        use super::{ClusterIndex, decide_indexed};
        let index = ClusterIndex::new(cluster);
        let node: std::net::IpAddr = NODE.parse().unwrap();
        let addresses: Vec<std::net::IpAddr> = cluster
            .pods
            .values()
            .flat_map(|pod| pod.ips.clone())
            .chain([node, "10.9.9.9".parse().unwrap()])
            .collect();
        let principals: Vec<Option<String>> = cluster
            .pods
            .values()
            .map(|pod| Some(TrustDomain::default().spiffe_id_of(pod)))
            .chain([None])
            .collect();
        let mut compared = 0;
        for source in &addresses {
            for destination in &addresses {
                for port in [8443, 8080] {
                    for principal in &principals {
                        let connection = Connection {
                            source: *source,
                            destination: *destination,
                            port,
                            principal: principal.clone(),
                        };
                        let whole = decide(cluster, &[node], &TrustDomain::default(), &connection);
                        let indexed = decide_indexed(
                            cluster,
                            &index,
                            &[node],
                            &TrustDomain::default(),
                            &connection,
                        );
                        assert_eq!(indexed, whole, "{connection:?}");
                        compared += 1;
                    }
                }
            }
        }
        compared
    }

    #[test]
    fn explain_lists_the_principals_that_would_be_accepted() {
        let accepted = acceptable_principals(
            &cluster(),
            &[],
            &TrustDomain::default(),
            "10.0.0.1".parse().unwrap(),
            8443,
        );
        let principals: Vec<&str> = accepted.keys().map(String::as_str).collect();
        assert_eq!(
            principals,
            [
                "spiffe://cluster.local/ns/ops/sa/oncall",
                "spiffe://cluster.local/ns/shop/sa/web"
            ]
        );
        assert_eq!(
            accepted["spiffe://cluster.local/ns/shop/sa/web"],
            [pod("shop", "web")]
        );
    }
}
