//! What the compiler produces: the content of the datapath maps, and the ids that name it.

use std::{collections::BTreeMap, fmt, net::IpAddr, sync::Arc};

use ipnet::IpNet;
use netwarden_common::{
    POLICY_KEY_ANY_PORT_BITS, POLICY_KEY_ANY_PROTOCOL_BITS, PeerId, PolicyEntry, PolicyKey,
    TierMatch,
};
use netwarden_model::{PodRef, PolicyRef, Tier};

use crate::{
    frontends::{Frontend, FrontendId, FrontendInfo},
    identity::IdentityInfo,
};

/// Id of one compiled policy in the datapath maps. Ids are never reused by one compiler, so an
/// endpoint can be switched from one policy to the next in a single map write.
pub type PolicyId = u32;

/// Id of one rule of one NetworkPolicy or ClusterNetworkPolicy, for attribution.
pub type RuleId = u32;

/// Direction from the pod's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// Traffic towards the pod.
    Ingress,
    /// Traffic leaving the pod.
    Egress,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ingress => "ingress",
            Self::Egress => "egress",
        })
    }
}

/// One entry of a policy: a peer, and the protocol and ports it may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyMatch {
    /// A label-set identity, or a CIDR class of this policy.
    pub peer: PeerId,
    /// The IP protocol, or every protocol.
    pub protocol: Option<u8>,
    /// First port of an aligned block (0 when `port_bits` is 0).
    pub port: u16,
    /// Fixed leading bits of the port: 16 for one port, 0 for every port.
    pub port_bits: u8,
}

impl PolicyMatch {
    /// The LPM key (prefix length and data) of this entry in policy `policy`.
    #[must_use]
    pub fn key(&self, policy: PolicyId) -> (u32, PolicyKey) {
        match self.protocol {
            None => (
                POLICY_KEY_ANY_PROTOCOL_BITS,
                PolicyKey::new(policy, self.peer, 0, 0),
            ),
            Some(protocol) => (
                POLICY_KEY_ANY_PORT_BITS + u32::from(self.port_bits),
                PolicyKey::new(policy, self.peer, protocol, self.port),
            ),
        }
    }

    /// The policy and entry of an LPM key read back from the policy map: the inverse of
    /// [`PolicyMatch::key`].
    #[must_use]
    pub fn from_key(prefix_len: u32, key: &PolicyKey) -> (PolicyId, Self) {
        let policy = u32::from_be_bytes(key.policy);
        let peer = u32::from_be_bytes(key.peer);
        let entry = if prefix_len <= POLICY_KEY_ANY_PROTOCOL_BITS {
            Self {
                peer,
                protocol: None,
                port: 0,
                port_bits: 0,
            }
        } else {
            Self {
                peer,
                protocol: Some(key.protocol),
                port: u16::from_be_bytes(key.port),
                port_bits: u8::try_from(prefix_len.saturating_sub(POLICY_KEY_ANY_PORT_BITS))
                    .unwrap_or(16)
                    .min(16),
            }
        };
        (policy, entry)
    }

    /// Whether a flow with this protocol and destination port falls under the entry.
    #[must_use]
    pub fn covers(&self, protocol: u8, port: u16) -> bool {
        match self.protocol {
            None => true,
            Some(own) if own != protocol => false,
            Some(_) if self.port_bits == 0 => true,
            Some(_) => {
                let mask = u16::MAX << (16 - u32::from(self.port_bits));
                port & mask == self.port
            }
        }
    }
}

/// Everything one endpoint's direction decides.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct CompiledPolicy {
    /// (peer, protocol, port) entries, with the first rule of each tier that matches all of
    /// the entry (the longest entry a lookup finds is its whole answer).
    pub entries: BTreeMap<PolicyMatch, PolicyEntry>,
    /// Address prefixes of `ipBlock` and `networks` peers (and the every-peer block), mapped to
    /// their CIDR class.
    pub cidrs: BTreeMap<IpNet, PeerId>,
}

/// A compiled policy's entries and prefixes without their rule ids.
pub(crate) type PolicyShape = (Vec<(PolicyMatch, PolicyEntry)>, Vec<(IpNet, PeerId)>);

impl CompiledPolicy {
    /// What the policy decides, without the rule ids that only attribute it: two policies of
    /// equal shape enforce the same, and one can take the other's place by rewriting the values
    /// of its entries, never adding or removing a key.
    pub(crate) fn shape(&self) -> PolicyShape {
        let unattributed = |matched: TierMatch| TierMatch { rule: 0, ..matched };
        (
            self.entries
                .iter()
                .map(|(entry, decided)| {
                    let decided = PolicyEntry {
                        admin: unattributed(decided.admin),
                        below: unattributed(decided.below),
                    };
                    (*entry, decided)
                })
                .collect(),
            self.cidrs
                .iter()
                .map(|(net, class)| (*net, *class))
                .collect(),
        )
    }

    /// Whether `other` decides the same (see [`CompiledPolicy::shape`]): it may differ in rule
    /// ids only.
    #[must_use]
    pub fn same_shape(&self, other: &Self) -> bool {
        self.shape() == other.shape()
    }
}

/// The policy a rule belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RulePolicy {
    /// A NetworkPolicy.
    Network(PolicyRef),
    /// A ClusterNetworkPolicy (cluster-scoped: a name) of this tier.
    Cluster {
        /// Its name.
        name: String,
        /// Its tier.
        tier: Tier,
    },
}

impl RulePolicy {
    /// The policy's name as operators filter by it: `namespace/name` for a NetworkPolicy, the
    /// name of a (cluster-scoped) ClusterNetworkPolicy.
    #[must_use]
    pub fn name(&self) -> String {
        match self {
            Self::Network(policy) => policy.to_string(),
            Self::Cluster { name, .. } => name.clone(),
        }
    }
}

impl fmt::Display for RulePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Network(policy) => write!(f, "NetworkPolicy {policy}"),
            Self::Cluster { name, tier } => write!(f, "ClusterNetworkPolicy {name} ({tier} tier)"),
        }
    }
}

/// Where a rule comes from.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleOrigin {
    /// The policy.
    pub policy: RulePolicy,
    /// `ingress` or `egress`.
    pub direction: Direction,
    /// Index of the rule in that list.
    pub index: usize,
}

/// Rule ids are 31-bit, never 0.
pub(crate) const RULE_ID_MASK: RuleId = 0x7fff_ffff;

impl RuleOrigin {
    /// The rule's preferred id: a digest of where it comes from, in `1..=RULE_ID_MASK`.
    pub(crate) fn stable_id(&self) -> RuleId {
        use sha2::{Digest as _, Sha256};
        let mut hasher = Sha256::new();
        let direction = self.direction.to_string();
        // A NetworkPolicy hashes its namespace and name as it always did (a restarted agent
        // keeps its rule ids); a cluster-scoped name is hashed after the tier, which no
        // namespace can spell ("Admin"/"Baseline" have capitals).
        let (scope, name) = match &self.policy {
            RulePolicy::Network(policy) => (policy.namespace.clone(), policy.name.as_str()),
            RulePolicy::Cluster { name, tier } => (tier.to_string(), name.as_str()),
        };
        for field in [scope.as_bytes(), name.as_bytes(), direction.as_bytes()] {
            hasher.update((field.len() as u64).to_be_bytes());
            hasher.update(field);
        }
        hasher.update((self.index as u64).to_be_bytes());
        let digest = hasher.finalize();
        let id = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]) & RULE_ID_MASK;
        id.max(1)
    }
}

impl fmt::Display for RuleOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}[{}]", self.policy, self.direction, self.index)
    }
}

/// A pod on this node, and what its veth enforces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalEndpoint {
    /// The pod.
    pub pod: PodRef,
    /// Its addresses.
    pub ips: Vec<IpAddr>,
    /// Its identity.
    pub identity: PeerId,
    /// The policy for traffic towards it; `None` when no policy isolates it for ingress.
    pub ingress: Option<PolicyId>,
    /// The policy for traffic leaving it; `None` when no policy isolates it for egress.
    pub egress: Option<PolicyId>,
    /// The policies that isolate it for ingress, for explanations.
    pub ingress_isolated_by: Vec<PolicyRef>,
    /// The policies that isolate it for egress.
    pub egress_isolated_by: Vec<PolicyRef>,
    /// Whether what `ingress` does not allow passes and is reported instead of dropped: only
    /// policies in audit mode isolate the direction (or the agent audits everything).
    pub ingress_audit: bool,
    /// The same for `egress`.
    pub egress_audit: bool,
    /// The ClusterNetworkPolicies (Admin and Baseline) that select it and have ingress rules,
    /// in evaluation order: a policy id even when no NetworkPolicy isolates it.
    pub ingress_cluster_policies: Vec<String>,
    /// The same for egress.
    pub egress_cluster_policies: Vec<String>,
}

impl LocalEndpoint {
    /// An endpoint no policy of any tier applies to yet.
    #[must_use]
    pub fn unisolated(pod: PodRef, ips: Vec<IpAddr>, identity: PeerId) -> Self {
        Self {
            pod,
            ips,
            identity,
            ingress: None,
            egress: None,
            ingress_isolated_by: Vec::new(),
            egress_isolated_by: Vec::new(),
            ingress_audit: false,
            egress_audit: false,
            ingress_cluster_policies: Vec::new(),
            egress_cluster_policies: Vec::new(),
        }
    }
}

/// The content of every datapath map, as the compiler wants it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DatapathState {
    /// Every pod address in the cluster and every node address, with its identity.
    pub ipcache: BTreeMap<IpAddr, PeerId>,
    /// Local endpoints.
    pub endpoints: BTreeMap<PodRef, LocalEndpoint>,
    /// Compiled policies referenced by the endpoints.
    pub policies: BTreeMap<PolicyId, CompiledPolicy>,
    /// The rules the policies' entries name.
    pub rules: BTreeMap<RuleId, RuleOrigin>,
    /// Identities in use (shared with the compiler's allocator, not copied).
    pub identities: BTreeMap<PeerId, Arc<IdentityInfo>>,
    /// Every Service address and port kube-proxy translates, with the Service it leads to.
    pub service_frontends: BTreeMap<Frontend, FrontendInfo>,
    /// Things the compiler could not express, naming the object.
    pub warnings: Vec<String>,
}

impl DatapathState {
    /// The frontend with id `id`, for attribution. A linear search: events are rate-limited,
    /// and frontends number in the thousands.
    #[must_use]
    pub fn frontend(&self, id: FrontendId) -> Option<(&Frontend, &FrontendInfo)> {
        self.service_frontends
            .iter()
            .find(|(_, info)| info.id == id)
    }
}
