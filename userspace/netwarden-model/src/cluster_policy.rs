//! `ClusterNetworkPolicy` (`policy.networking.k8s.io/v1alpha2`, from
//! kubernetes-sigs/network-policy-api): the API's shape ([`api`]), the validated model, and the
//! conversion between them.
//!
//! The conversion applies the CRD's validation (enums, `priority` 0-1000, at most 25 rules per
//! direction, 1-25 peers and protocols per rule, exactly one field per subject, peer, protocol
//! and port, `start < end`, no named port towards `networks` or `nodes`), so an object the API
//! server would reject is rejected here, naming the object and the field.
//!
//! Fail closed, as upstream demands of a peer this implementation does not know (a newer CRD's
//! peer type, or any unknown field in a peer or a protocol): an `Accept` rule matches no traffic
//! through it, a `Deny` or `Pass` rule becomes a rule denying everything. `domainNames` is known
//! but not enforced: it is left out of an `Accept` rule (which then accepts less) and makes any
//! other rule deny everything. Each case is kept as a problem on the policy
//! ([`ClusterNetworkPolicy::problems`]) for the agent to report; the rest of the policy is
//! enforced. Unknown fields anywhere else make the object invalid.

use std::{collections::BTreeMap, fmt, net::IpAddr};

use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;

use crate::{
    cluster::{Cluster, Node, Pod, Protocol},
    convert::{self, Ctx, ModelError},
    selector::LabelSelector,
};

/// The API group of [`api::ClusterNetworkPolicy`].
pub const GROUP: &str = "policy.networking.k8s.io";
/// Its version.
pub const VERSION: &str = "v1alpha2";
/// Its kind.
pub const KIND: &str = "ClusterNetworkPolicy";
/// Its resource (for RBAC and the API's paths).
pub const PLURAL: &str = "clusternetworkpolicies";

/// The most rules a direction may have.
pub const MAX_RULES: usize = 25;
/// The most peers, protocols, networks or domain names a rule may have.
pub const MAX_ITEMS: usize = 25;
/// The highest priority value (the lowest precedence).
pub const MAX_PRIORITY: u16 = 1000;
/// The longest rule name.
pub const MAX_RULE_NAME: usize = 100;

/// The objects as the API server serves them (`config/crd` of network-policy-api v0.2.0).
///
/// Every struct keeps the fields it does not know in `unknown` instead of failing to
/// deserialize: an object written against a newer CRD must still reach the conversion, which
/// decides what failing closed means for it (a watch whose list fails to decode would instead
/// stop following every ClusterNetworkPolicy).
pub mod api {
    use std::collections::BTreeMap;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use serde::{Deserialize, Serialize};

    /// Fields a struct does not know, by name.
    pub type Unknown = BTreeMap<String, serde_json::Value>;

    /// A `ClusterNetworkPolicy`.
    #[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct ClusterNetworkPolicy {
        /// `policy.networking.k8s.io/v1alpha2` (absent in some list items).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub api_version: Option<String>,
        /// `ClusterNetworkPolicy` (absent in some list items).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub kind: Option<String>,
        /// Its metadata (cluster-scoped: no namespace).
        #[serde(default)]
        pub metadata: ObjectMeta,
        /// `spec`; required.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub spec: Option<Spec>,
        /// `status`, written by implementations; never read.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub status: Option<serde_json::Value>,
        /// Anything else.
        #[serde(flatten)]
        pub unknown: Unknown,
    }

    /// `spec`.
    #[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Spec {
        /// `Admin` or `Baseline`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub tier: Option<String>,
        /// 0 to 1000, lower first.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub priority: Option<i64>,
        /// The pods it applies to.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub subject: Option<Subject>,
        /// Rules for traffic towards the subject's pods, in order.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub ingress: Option<Vec<IngressRule>>,
        /// Rules for traffic leaving the subject's pods, in order.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub egress: Option<Vec<EgressRule>>,
        /// Anything else.
        #[serde(flatten)]
        pub unknown: Unknown,
    }

    /// `spec.subject`: exactly one field.
    #[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Subject {
        /// Every pod of the namespaces this selects.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub namespaces: Option<LabelSelector>,
        /// The pods this selects in the namespaces it selects.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub pods: Option<NamespacedPod>,
        /// Anything else.
        #[serde(flatten)]
        pub unknown: Unknown,
    }

    /// A namespace selector and a pod selector, both required to match.
    #[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct NamespacedPod {
        /// Empty or absent: every namespace.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub namespace_selector: Option<LabelSelector>,
        /// Required; empty: every pod.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub pod_selector: Option<LabelSelector>,
        /// Anything else.
        #[serde(flatten)]
        pub unknown: Unknown,
    }

    /// A `metav1.LabelSelector`, with its unknown fields kept: a misspelt `matchLabel` must
    /// not silently select everything.
    #[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct LabelSelector {
        /// Labels that must be equal.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub match_labels: Option<BTreeMap<String, String>>,
        /// Requirements that must all hold.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub match_expressions: Option<Vec<LabelSelectorRequirement>>,
        /// Anything else.
        #[serde(flatten)]
        pub unknown: Unknown,
    }

    /// One of `matchExpressions`.
    #[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct LabelSelectorRequirement {
        /// The label.
        #[serde(default)]
        pub key: String,
        /// `In`, `NotIn`, `Exists` or `DoesNotExist`.
        #[serde(default)]
        pub operator: String,
        /// The values, for `In` and `NotIn`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub values: Option<Vec<String>>,
        /// Anything else.
        #[serde(flatten)]
        pub unknown: Unknown,
    }

    /// One of `spec.ingress`.
    #[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct IngressRule {
        /// At most 100 characters; for reports only.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub name: Option<String>,
        /// `Accept`, `Deny` or `Pass`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub action: Option<String>,
        /// The sources it applies to (1-25).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub from: Option<Vec<Peer>>,
        /// The protocols and ports it applies to (1-25); absent: all.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub protocols: Option<Vec<ProtocolMatch>>,
        /// Anything else.
        #[serde(flatten)]
        pub unknown: Unknown,
    }

    /// One of `spec.egress`.
    #[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct EgressRule {
        /// At most 100 characters; for reports only.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub name: Option<String>,
        /// `Accept`, `Deny` or `Pass`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub action: Option<String>,
        /// The destinations it applies to (1-25).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub to: Option<Vec<Peer>>,
        /// The protocols and ports it applies to (1-25); absent: all.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub protocols: Option<Vec<ProtocolMatch>>,
        /// Anything else.
        #[serde(flatten)]
        pub unknown: Unknown,
    }

    /// A peer: exactly one field. Ingress peers may only be `namespaces` or `pods`; the
    /// conversion treats the egress-only kinds in an ingress rule as unknown.
    #[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Peer {
        /// Every pod of the namespaces this selects.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub namespaces: Option<LabelSelector>,
        /// The pods this selects in the namespaces it selects.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub pods: Option<NamespacedPod>,
        /// The addresses of the nodes this selects (egress, experimental).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub nodes: Option<LabelSelector>,
        /// CIDRs, IPv4 or IPv6 (egress, 1-25).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub networks: Option<Vec<String>>,
        /// Domain names (egress, `Accept` only, experimental; not enforced by netwarden).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub domain_names: Option<Vec<String>>,
        /// Anything else: a peer type this implementation does not know.
        #[serde(flatten)]
        pub unknown: Unknown,
    }

    /// One of `protocols`: exactly one field.
    #[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct ProtocolMatch {
        /// TCP to a destination port.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub tcp: Option<ProtocolPort>,
        /// UDP to a destination port.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub udp: Option<ProtocolPort>,
        /// SCTP to a destination port.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub sctp: Option<ProtocolPort>,
        /// A container port name of the destination pod (its protocol is the port's).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub destination_named_port: Option<String>,
        /// Anything else: a protocol this implementation does not know.
        #[serde(flatten)]
        pub unknown: Unknown,
    }

    /// `tcp`, `udp` or `sctp`: `destinationPort` is required.
    #[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct ProtocolPort {
        /// The port or range.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub destination_port: Option<Port>,
        /// Anything else.
        #[serde(flatten)]
        pub unknown: Unknown,
    }

    /// A port number or a range: exactly one.
    #[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Port {
        /// 1-65535.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub number: Option<i64>,
        /// `start < end`, both 1-65535.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub range: Option<PortRange>,
        /// Anything else.
        #[serde(flatten)]
        pub unknown: Unknown,
    }

    /// An inclusive range of ports.
    #[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
    #[serde(rename_all = "camelCase")]
    pub struct PortRange {
        /// The first port.
        #[serde(default)]
        pub start: i64,
        /// The last port.
        #[serde(default)]
        pub end: i64,
        /// Anything else.
        #[serde(flatten)]
        pub unknown: Unknown,
    }
}

/// Which tier a ClusterNetworkPolicy sits in: Admin policies are evaluated before
/// NetworkPolicy, Baseline policies after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tier {
    /// Before NetworkPolicy: its Accept and Deny cannot be overridden.
    Admin,
    /// After NetworkPolicy: it decides only for pods no NetworkPolicy isolates.
    Baseline,
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Admin => "Admin",
            Self::Baseline => "Baseline",
        })
    }
}

/// What a matching rule does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    /// Allow it (replies too); no later rule of any tier is consulted for this direction.
    Accept,
    /// Drop it; no later rule of any tier is consulted.
    Deny,
    /// Skip the rest of this tier: the next tier decides.
    Pass,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Accept => "Accept",
            Self::Deny => "Deny",
            Self::Pass => "Pass",
        })
    }
}

/// The pods a ClusterNetworkPolicy applies to (never host-network pods).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ClusterSubject {
    /// Every pod of the namespaces this selects.
    Namespaces(LabelSelector),
    /// The pods `pod_selector` selects in the namespaces `namespace_selector` selects.
    Pods {
        /// Namespaces.
        namespace_selector: LabelSelector,
        /// Pods in them.
        pod_selector: LabelSelector,
    },
}

impl ClusterSubject {
    /// Whether `pod` is one of the subject's pods.
    #[must_use]
    pub fn selects(&self, cluster: &Cluster, pod: &Pod) -> bool {
        if pod.host_network {
            return false;
        }
        let namespace_labels = cluster.namespace_labels(&pod.id.namespace);
        match self {
            Self::Namespaces(namespaces) => namespaces.matches(&namespace_labels),
            Self::Pods {
                namespace_selector,
                pod_selector,
            } => namespace_selector.matches(&namespace_labels) && pod_selector.matches(&pod.labels),
        }
    }
}

/// One peer of a rule.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ClusterPeer {
    /// Every pod (not on the host network) of the namespaces this selects.
    Namespaces(LabelSelector),
    /// The pods `pod_selector` selects in the namespaces `namespace_selector` selects.
    Pods {
        /// Namespaces.
        namespace_selector: LabelSelector,
        /// Pods in them.
        pod_selector: LabelSelector,
    },
    /// Every address in these blocks, pods' included (egress only).
    Networks(Vec<IpNet>),
    /// Every address (`status.addresses`) of the nodes this selects (egress only).
    Nodes(LabelSelector),
    /// Every address: what a `Deny` or `Pass` rule with a peer this implementation cannot
    /// enforce becomes (fail closed). The API has no such peer.
    Everything,
}

impl ClusterPeer {
    /// Whether `address` is this peer.
    #[must_use]
    pub fn matches(&self, cluster: &Cluster, address: IpAddr) -> bool {
        let pod = || {
            cluster
                .pods
                .values()
                .find(|pod| !pod.host_network && pod.ips.contains(&address))
        };
        match self {
            Self::Namespaces(namespaces) => pod().is_some_and(|pod| {
                namespaces.matches(&cluster.namespace_labels(&pod.id.namespace))
            }),
            Self::Pods {
                namespace_selector,
                pod_selector,
            } => pod().is_some_and(|pod| {
                namespace_selector.matches(&cluster.namespace_labels(&pod.id.namespace))
                    && pod_selector.matches(&pod.labels)
            }),
            Self::Networks(networks) => networks.iter().any(|network| network.contains(&address)),
            Self::Nodes(nodes) => cluster.nodes.values().any(|node: &Node| {
                nodes.matches(&node.labels) && node.addresses.contains(&address)
            }),
            Self::Everything => true,
        }
    }
}

/// One of a rule's `protocols`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ClusterPort {
    /// A protocol and an inclusive range of destination ports (`number` is a range of one).
    Range {
        /// TCP, UDP or SCTP.
        protocol: Protocol,
        /// The first port.
        first: u16,
        /// The last port.
        last: u16,
    },
    /// The destination pod's container port of this name, in that port's protocol; nothing
    /// towards an address that is not a pod, or a pod without it.
    Named(String),
}

/// One ingress or egress rule.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ClusterRule {
    /// `name`, for reports.
    pub name: Option<String>,
    /// What it does to matching traffic.
    pub action: Action,
    /// `from`/`to`. Empty matches nothing: the API requires one peer, so only an `Accept` rule
    /// whose every peer could not be enforced has none.
    pub peers: Vec<ClusterPeer>,
    /// `protocols`; empty: every protocol and port (ICMP included).
    pub ports: Vec<ClusterPort>,
}

impl ClusterRule {
    /// The rule a `Deny` or `Pass` rule becomes when part of it cannot be enforced: deny
    /// everything (upstream's definition of failing closed for those actions).
    #[must_use]
    pub fn deny_everything(name: Option<String>) -> Self {
        Self {
            name,
            action: Action::Deny,
            peers: vec![ClusterPeer::Everything],
            ports: Vec::new(),
        }
    }
}

/// A validated ClusterNetworkPolicy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterNetworkPolicy {
    /// Its name (cluster-scoped).
    pub name: String,
    /// Its tier.
    pub tier: Tier,
    /// 0-1000: lower is evaluated first within the tier. Equal priorities are evaluated in
    /// the order of their names (upstream leaves the order undefined; see
    /// [`priority_ties`]).
    pub priority: u16,
    /// The pods it applies to.
    pub subject: ClusterSubject,
    /// Rules for traffic towards the subject's pods, in order.
    pub ingress: Vec<ClusterRule>,
    /// Rules for traffic leaving the subject's pods, in order.
    pub egress: Vec<ClusterRule>,
    /// What of it is not enforced as written, and what is enforced instead (each names the
    /// policy and the field).
    pub problems: Vec<ModelError>,
}

impl ClusterNetworkPolicy {
    /// What a ClusterNetworkPolicy that never validated enforces, whatever the source: every
    /// pod of `subject` (every pod at all when the subject could not be read either) denied
    /// everything both ways, first of all Admin policies (fail closed until it is fixed).
    #[must_use]
    pub fn lockdown(name: String, subject: Option<ClusterSubject>) -> Self {
        Self {
            name,
            tier: Tier::Admin,
            priority: 0,
            subject: subject
                .unwrap_or_else(|| ClusterSubject::Namespaces(LabelSelector::everything())),
            ingress: vec![ClusterRule::deny_everything(None)],
            egress: vec![ClusterRule::deny_everything(None)],
            problems: Vec::new(),
        }
    }

    /// The rules of `direction` (`true` for ingress).
    #[must_use]
    pub fn rules(&self, ingress: bool) -> &[ClusterRule] {
        if ingress { &self.ingress } else { &self.egress }
    }
}

/// Two ClusterNetworkPolicies of one tier and priority. Upstream leaves it undefined which
/// decides a connection both match; netwarden evaluates them in the order of their names, so
/// `first` decides.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PriorityTie {
    /// The tier.
    pub tier: Tier,
    /// The priority both have.
    pub priority: u16,
    /// The first by name: it decides where both match.
    pub first: String,
    /// The other.
    pub second: String,
}

impl fmt::Display for PriorityTie {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ClusterNetworkPolicies {} and {} are both {} tier, priority {}: where both match a connection, {} decides (the first by name; upstream leaves it undefined)",
            self.first, self.second, self.tier, self.priority, self.first
        )
    }
}

/// Every pair of ClusterNetworkPolicies that share a tier and a priority, for the agent to
/// warn about: which of them decides is netwarden's choice, not the API's.
#[must_use]
pub fn priority_ties(cluster: &Cluster) -> Vec<PriorityTie> {
    let mut by_rank: BTreeMap<(Tier, u16), Vec<&str>> = BTreeMap::new();
    for policy in cluster.cluster_policies.values() {
        by_rank
            .entry((policy.tier, policy.priority))
            .or_default()
            .push(&policy.name);
    }
    let mut ties = Vec::new();
    for ((tier, priority), names) in by_rank {
        for (index, first) in names.iter().enumerate() {
            for second in &names[index + 1..] {
                ties.push(PriorityTie {
                    tier,
                    priority,
                    first: (*first).to_owned(),
                    second: (*second).to_owned(),
                });
            }
        }
    }
    ties
}

/// Validates a ClusterNetworkPolicy. Fails on what the API server would reject; what it
/// would accept but netwarden cannot enforce as written is enforced failing closed and listed
/// in [`ClusterNetworkPolicy::problems`].
pub fn convert(object: &api::ClusterNetworkPolicy) -> Result<ClusterNetworkPolicy, ModelError> {
    let name = convert::name_of(KIND, &object.metadata)?;
    let ctx = Ctx {
        kind: KIND,
        object: &name,
    };
    no_unknown(&ctx, "", &object.unknown)?;
    if let Some(api_version) = &object.api_version
        && *api_version != format!("{GROUP}/{VERSION}")
    {
        return Err(ctx.error(
            "apiVersion",
            format!("{api_version:?} is not {GROUP}/{VERSION}"),
        ));
    }
    let spec = object
        .spec
        .as_ref()
        .ok_or_else(|| ctx.error("spec", "is required"))?;
    no_unknown(&ctx, "spec", &spec.unknown)?;
    let (tier, priority) = rank(&ctx, spec)?;
    let subject = subject(
        &ctx,
        spec.subject
            .as_ref()
            .ok_or_else(|| ctx.error("spec.subject", "is required"))?,
    )?;

    let mut problems = Vec::new();
    let ingress = spec.ingress.as_deref().unwrap_or_default();
    let egress = spec.egress.as_deref().unwrap_or_default();
    for (field, count) in [
        ("spec.ingress", ingress.len()),
        ("spec.egress", egress.len()),
    ] {
        if count > MAX_RULES {
            return Err(ctx.error(
                field,
                format!("has {count} rules; at most {MAX_RULES} are allowed"),
            ));
        }
    }
    let ingress = ingress
        .iter()
        .enumerate()
        .map(|(index, rule)| {
            no_unknown(&ctx, &format!("spec.ingress[{index}]"), &rule.unknown)?;
            let written = RuleParts {
                name: rule.name.as_deref(),
                action: rule.action.as_deref(),
                peers: rule.from.as_deref(),
                protocols: rule.protocols.as_deref(),
            };
            self::rule(&ctx, &mut problems, Direction::Ingress, index, &written)
        })
        .collect::<Result<_, _>>()?;
    let egress = egress
        .iter()
        .enumerate()
        .map(|(index, rule)| {
            no_unknown(&ctx, &format!("spec.egress[{index}]"), &rule.unknown)?;
            let written = RuleParts {
                name: rule.name.as_deref(),
                action: rule.action.as_deref(),
                peers: rule.to.as_deref(),
                protocols: rule.protocols.as_deref(),
            };
            self::rule(&ctx, &mut problems, Direction::Egress, index, &written)
        })
        .collect::<Result<_, _>>()?;

    Ok(ClusterNetworkPolicy {
        name,
        tier,
        priority,
        subject,
        ingress,
        egress,
        problems,
    })
}

/// `spec.tier` and `spec.priority`.
fn rank(ctx: &Ctx<'_>, spec: &api::Spec) -> Result<(Tier, u16), ModelError> {
    let tier = match spec.tier.as_deref() {
        Some("Admin") => Tier::Admin,
        Some("Baseline") => Tier::Baseline,
        Some(other) => {
            return Err(ctx.error(
                "spec.tier",
                format!("{other:?} is neither Admin nor Baseline"),
            ));
        }
        None => return Err(ctx.error("spec.tier", "is required")),
    };
    let priority = match spec.priority {
        Some(priority) => u16::try_from(priority)
            .ok()
            .filter(|priority| *priority <= MAX_PRIORITY)
            .ok_or_else(|| {
                ctx.error(
                    "spec.priority",
                    format!("{priority} is not within 0-{MAX_PRIORITY}"),
                )
            })?,
        None => return Err(ctx.error("spec.priority", "is required")),
    };
    Ok((tier, priority))
}

/// The subject of `object` if it validates: what [`ClusterNetworkPolicy::lockdown`] locks
/// down when the rest of the object does not.
#[must_use]
pub fn subject_of(object: &api::ClusterNetworkPolicy) -> Option<ClusterSubject> {
    let name = object.metadata.name.clone().unwrap_or_default();
    let ctx = Ctx {
        kind: KIND,
        object: &name,
    };
    subject(&ctx, object.spec.as_ref()?.subject.as_ref()?).ok()
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Ingress,
    Egress,
}

struct RuleParts<'a> {
    name: Option<&'a str>,
    action: Option<&'a str>,
    peers: Option<&'a [api::Peer]>,
    protocols: Option<&'a [api::ProtocolMatch]>,
}

/// What a peer or protocol of a rule turned out to be.
enum Item<T> {
    Enforced(T),
    /// Known, valid, but not enforced (`domainNames`): left out of an Accept rule.
    Unsupported(String),
    /// Unknown to this implementation: the rule fails closed.
    Unknown(String),
}

fn rule(
    ctx: &Ctx<'_>,
    problems: &mut Vec<ModelError>,
    direction: Direction,
    index: usize,
    written: &RuleParts<'_>,
) -> Result<ClusterRule, ModelError> {
    let (list, peers_field) = match direction {
        Direction::Ingress => ("spec.ingress", "from"),
        Direction::Egress => ("spec.egress", "to"),
    };
    let field = format!("{list}[{index}]");
    let name = written.name.filter(|name| !name.is_empty());
    if let Some(name) = name
        && name.chars().count() > MAX_RULE_NAME
    {
        return Err(ctx.error(
            format!("{field}.name"),
            format!("is longer than {MAX_RULE_NAME} characters"),
        ));
    }
    let action = match written.action {
        Some("Accept") => Action::Accept,
        Some("Deny") => Action::Deny,
        Some("Pass") => Action::Pass,
        Some(other) => {
            return Err(ctx.error(
                format!("{field}.action"),
                format!("{other:?} is not Accept, Deny or Pass"),
            ));
        }
        None => return Err(ctx.error(format!("{field}.action"), "is required")),
    };
    let peers = written
        .peers
        .ok_or_else(|| ctx.error(format!("{field}.{peers_field}"), "is required"))?;
    items_count(ctx, &format!("{field}.{peers_field}"), peers.len())?;
    let mut items = Vec::new();
    for (p, peer) in peers.iter().enumerate() {
        let item_field = format!("{field}.{peers_field}[{p}]");
        items.push((
            item_field.clone(),
            self::peer(ctx, &item_field, direction, peer)?,
        ));
    }
    let mut matched_ports = Vec::new();
    let mut unknown_protocols = Vec::new();
    if let Some(protocols) = written.protocols {
        items_count(ctx, &format!("{field}.protocols"), protocols.len())?;
        for (p, protocol) in protocols.iter().enumerate() {
            let protocol_field = format!("{field}.protocols[{p}]");
            match port(ctx, &protocol_field, protocol)? {
                Item::Enforced(port) => matched_ports.push(port),
                Item::Unsupported(problem) | Item::Unknown(problem) => {
                    unknown_protocols.push((protocol_field, problem));
                }
            }
        }
    }
    // CEL rule of the CRD: named ports exist only on pods.
    let named = matched_ports
        .iter()
        .any(|port| matches!(port, ClusterPort::Named(_)));
    let towards_non_pods = peers
        .iter()
        .any(|peer| peer.networks.is_some() || peer.nodes.is_some() || peer.domain_names.is_some());
    if direction == Direction::Egress && named && towards_non_pods {
        return Err(ctx.error(
            field,
            "networks/nodes/domainNames peer cannot be set with destinationNamedPort: only pods have named ports",
        ));
    }

    let fail_closed = match action {
        Action::Accept => "this rule accepts nothing through it",
        Action::Deny | Action::Pass => "this rule denies everything instead",
    };
    let mut enforced = Vec::new();
    let mut deny_everything = false;
    for (item_field, item) in items {
        match item {
            Item::Enforced(peer) => enforced.push(peer),
            Item::Unsupported(problem) | Item::Unknown(problem) => {
                problems.push(ctx.error(item_field, format!("{problem}; {fail_closed}")));
                deny_everything |= action != Action::Accept;
            }
        }
    }
    for (protocol_field, problem) in unknown_protocols {
        problems.push(ctx.error(protocol_field, format!("{problem}; {fail_closed}")));
        if action == Action::Accept {
            // Upstream: an Accept rule with something unknown in it matches no traffic.
            enforced.clear();
        } else {
            deny_everything = true;
        }
    }
    if deny_everything {
        return Ok(ClusterRule::deny_everything(name.map(str::to_owned)));
    }
    Ok(ClusterRule {
        name: name.map(str::to_owned),
        action,
        peers: enforced,
        ports: matched_ports,
    })
}

fn peer(
    ctx: &Ctx<'_>,
    field: &str,
    direction: Direction,
    peer: &api::Peer,
) -> Result<Item<ClusterPeer>, ModelError> {
    let mut set: Vec<&str> = Vec::new();
    if peer.namespaces.is_some() {
        set.push("namespaces");
    }
    if peer.pods.is_some() {
        set.push("pods");
    }
    let egress_only = [
        ("nodes", peer.nodes.is_some()),
        ("networks", peer.networks.is_some()),
        ("domainNames", peer.domain_names.is_some()),
    ];
    let mut unknown: Vec<String> = peer.unknown.keys().cloned().collect();
    for (key, present) in egress_only {
        if present {
            match direction {
                Direction::Egress => set.push(key),
                // Not a field of an ingress peer: as unknown as any other.
                Direction::Ingress => unknown.push(key.to_owned()),
            }
        }
    }
    if !unknown.is_empty() {
        return Ok(Item::Unknown(format!(
            "peer type {} is not known to netwarden",
            unknown.join(", ")
        )));
    }
    match set.as_slice() {
        [] => {
            return Ok(Item::Unknown(
                "the peer sets no field netwarden knows".into(),
            ));
        }
        [_] => {}
        more => {
            return Err(ctx.error(
                field,
                format!("sets {}: exactly one field is allowed", more.join(" and ")),
            ));
        }
    }
    if let Some(namespaces) = &peer.namespaces {
        return Ok(Item::Enforced(ClusterPeer::Namespaces(selector(
            ctx,
            &format!("{field}.namespaces"),
            namespaces,
        )?)));
    }
    if let Some(pods) = &peer.pods {
        let (namespace_selector, pod_selector) =
            namespaced_pod(ctx, &format!("{field}.pods"), pods)?;
        return Ok(Item::Enforced(ClusterPeer::Pods {
            namespace_selector,
            pod_selector,
        }));
    }
    if let Some(nodes) = &peer.nodes {
        return Ok(Item::Enforced(ClusterPeer::Nodes(selector(
            ctx,
            &format!("{field}.nodes"),
            nodes,
        )?)));
    }
    if let Some(networks) = &peer.networks {
        let networks_field = format!("{field}.networks");
        items_count(ctx, &networks_field, networks.len())?;
        let mut blocks = Vec::new();
        for (index, text) in networks.iter().enumerate() {
            blocks.push(convert::parse_cidr(
                ctx,
                &format!("{networks_field}[{index}]"),
                text,
            )?);
        }
        return Ok(Item::Enforced(ClusterPeer::Networks(blocks)));
    }
    let names = peer.domain_names.as_deref().unwrap_or_default();
    let names_field = format!("{field}.domainNames");
    items_count(ctx, &names_field, names.len())?;
    Ok(Item::Unsupported(
        "domainNames is not supported by netwarden".into(),
    ))
}

fn port(
    ctx: &Ctx<'_>,
    field: &str,
    protocol: &api::ProtocolMatch,
) -> Result<Item<ClusterPort>, ModelError> {
    if !protocol.unknown.is_empty() {
        let keys: Vec<&str> = protocol.unknown.keys().map(String::as_str).collect();
        return Ok(Item::Unknown(format!(
            "protocol {} is not known to netwarden",
            keys.join(", ")
        )));
    }
    let set: Vec<(&str, Option<Protocol>, &api::ProtocolPort)> = [
        ("tcp", Protocol::Tcp, &protocol.tcp),
        ("udp", Protocol::Udp, &protocol.udp),
        ("sctp", Protocol::Sctp, &protocol.sctp),
    ]
    .into_iter()
    .filter_map(|(key, number, port)| port.as_ref().map(|port| (key, Some(number), port)))
    .collect();
    match (set.as_slice(), &protocol.destination_named_port) {
        ([], None) => Ok(Item::Unknown(
            "the protocol sets no field netwarden knows".into(),
        )),
        ([], Some(name)) => {
            if name.is_empty() {
                return Err(ctx.error(format!("{field}.destinationNamedPort"), "must not be empty"));
            }
            Ok(Item::Enforced(ClusterPort::Named(name.clone())))
        }
        ([(key, Some(protocol), port)], None) => {
            let port_field = format!("{field}.{key}");
            no_unknown(ctx, &port_field, &port.unknown)?;
            let destination = port
                .destination_port
                .as_ref()
                .ok_or_else(|| ctx.error(format!("{port_field}.destinationPort"), "is required"))?;
            let destination_field = format!("{port_field}.destinationPort");
            no_unknown(ctx, &destination_field, &destination.unknown)?;
            let (first, last) = match (destination.number, &destination.range) {
                (Some(number), None) => {
                    let number = port_number(ctx, &format!("{destination_field}.number"), number)?;
                    (number, number)
                }
                (None, Some(range)) => {
                    let range_field = format!("{destination_field}.range");
                    no_unknown(ctx, &range_field, &range.unknown)?;
                    let start = port_number(ctx, &format!("{range_field}.start"), range.start)?;
                    let end = port_number(ctx, &format!("{range_field}.end"), range.end)?;
                    if start >= end {
                        return Err(ctx.error(
                            range_field,
                            format!("start {start} must be less than end {end}"),
                        ));
                    }
                    (start, end)
                }
                (None, None) => {
                    return Err(ctx.error(destination_field, "must set number or range"));
                }
                (Some(_), Some(_)) => {
                    return Err(ctx.error(
                        destination_field,
                        "sets number and range: exactly one is allowed",
                    ));
                }
            };
            Ok(Item::Enforced(ClusterPort::Range {
                protocol: *protocol,
                first,
                last,
            }))
        }
        (set, named) => {
            let mut keys: Vec<&str> = set.iter().map(|(key, _, _)| *key).collect();
            if named.is_some() {
                keys.push("destinationNamedPort");
            }
            Err(ctx.error(
                field,
                format!("sets {}: exactly one field is allowed", keys.join(" and ")),
            ))
        }
    }
}

fn port_number(ctx: &Ctx<'_>, field: &str, number: i64) -> Result<u16, ModelError> {
    u16::try_from(number)
        .ok()
        .filter(|port| *port != 0)
        .ok_or_else(|| ctx.error(field, format!("{number} is not a port (1-65535)")))
}

fn subject(ctx: &Ctx<'_>, subject: &api::Subject) -> Result<ClusterSubject, ModelError> {
    no_unknown(ctx, "spec.subject", &subject.unknown)?;
    match (&subject.namespaces, &subject.pods) {
        (Some(namespaces), None) => Ok(ClusterSubject::Namespaces(selector(
            ctx,
            "spec.subject.namespaces",
            namespaces,
        )?)),
        (None, Some(pods)) => {
            let (namespace_selector, pod_selector) =
                namespaced_pod(ctx, "spec.subject.pods", pods)?;
            Ok(ClusterSubject::Pods {
                namespace_selector,
                pod_selector,
            })
        }
        (None, None) => Err(ctx.error("spec.subject", "must set namespaces or pods")),
        (Some(_), Some(_)) => Err(ctx.error(
            "spec.subject",
            "sets namespaces and pods: exactly one is allowed",
        )),
    }
}

fn namespaced_pod(
    ctx: &Ctx<'_>,
    field: &str,
    pods: &api::NamespacedPod,
) -> Result<(LabelSelector, LabelSelector), ModelError> {
    no_unknown(ctx, field, &pods.unknown)?;
    let namespace_selector = match &pods.namespace_selector {
        Some(namespaces) => selector(ctx, &format!("{field}.namespaceSelector"), namespaces)?,
        None => LabelSelector::everything(),
    };
    let pod_selector = selector(
        ctx,
        &format!("{field}.podSelector"),
        pods.pod_selector
            .as_ref()
            .ok_or_else(|| ctx.error(format!("{field}.podSelector"), "is required"))?,
    )?;
    Ok((namespace_selector, pod_selector))
}

fn selector(
    ctx: &Ctx<'_>,
    field: &str,
    selector: &api::LabelSelector,
) -> Result<LabelSelector, ModelError> {
    no_unknown(ctx, field, &selector.unknown)?;
    let match_expressions = selector
        .match_expressions
        .as_ref()
        .map(|expressions| {
            expressions
                .iter()
                .enumerate()
                .map(|(index, expression)| {
                    no_unknown(
                        ctx,
                        &format!("{field}.matchExpressions[{index}]"),
                        &expression.unknown,
                    )?;
                    Ok(meta::LabelSelectorRequirement {
                        key: expression.key.clone(),
                        operator: expression.operator.clone(),
                        values: expression.values.clone(),
                    })
                })
                .collect::<Result<Vec<_>, ModelError>>()
        })
        .transpose()?;
    convert::selector(
        ctx,
        field,
        Some(&meta::LabelSelector {
            match_labels: selector.match_labels.clone(),
            match_expressions,
        }),
    )
}

fn items_count(ctx: &Ctx<'_>, field: &str, count: usize) -> Result<(), ModelError> {
    match count {
        0 => Err(ctx.error(field, "must have at least one item")),
        count if count > MAX_ITEMS => Err(ctx.error(
            field,
            format!("has {count} items; at most {MAX_ITEMS} are allowed"),
        )),
        _ => Ok(()),
    }
}

/// Fails on fields the API does not have at `field` (an object written against another
/// version of the CRD, or a typo): what they mean cannot be known.
fn no_unknown(ctx: &Ctx<'_>, field: &str, unknown: &api::Unknown) -> Result<(), ModelError> {
    let Some(key) = unknown.keys().next() else {
        return Ok(());
    };
    Err(ctx.error(field_path(field, key), "unknown field"))
}

/// `key` under `field`: `field.key`, or `field["key"]` when the key is not a plain name (it is
/// empty, or holds dots, spaces, quotes...), so that every error names a field one can find.
fn field_path(field: &str, key: &str) -> String {
    let plain = !key.is_empty()
        && key
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-');
    match (plain, field.is_empty()) {
        (true, true) => key.to_owned(),
        (true, false) => format!("{field}.{key}"),
        (false, _) => format!("{field}[{key:?}]"),
    }
}

#[cfg(test)]
mod tests;
