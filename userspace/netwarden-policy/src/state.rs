//! What the compiler produces: the content of the datapath maps, and the ids that name it.

use std::{collections::BTreeMap, fmt, net::IpAddr, sync::Arc};

use ipnet::IpNet;
use netwarden_common::{POLICY_KEY_ANY_PORT_BITS, POLICY_KEY_ANY_PROTOCOL_BITS, PeerId, PolicyKey};
use netwarden_model::{PodRef, PolicyRef};

use crate::{
    frontends::{Frontend, FrontendId, FrontendInfo},
    identity::IdentityInfo,
};

/// Id of one compiled policy in the datapath maps. Ids are never reused by one compiler, so an
/// endpoint can be switched from one policy to the next in a single map write.
pub type PolicyId = u32;

/// Id of one rule of one NetworkPolicy, for attribution.
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

/// Everything one endpoint's direction allows.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct CompiledPolicy {
    /// Allowed (peer, protocol, port) entries, with the rule that allowed each.
    pub entries: BTreeMap<PolicyMatch, RuleId>,
    /// Address prefixes of `ipBlock` rules, mapped to their CIDR class.
    pub cidrs: BTreeMap<IpNet, PeerId>,
}

/// A compiled policy's entries and prefixes without their rule ids.
pub(crate) type PolicyShape = (Vec<PolicyMatch>, Vec<(IpNet, PeerId)>);

impl CompiledPolicy {
    /// What the policy lets through, without the rule ids that only attribute it: two
    /// policies of equal shape enforce the same, and one can take the other's place by
    /// rewriting the values of its entries, never adding or removing a key.
    pub(crate) fn shape(&self) -> PolicyShape {
        (
            self.entries.keys().copied().collect(),
            self.cidrs
                .iter()
                .map(|(net, class)| (*net, *class))
                .collect(),
        )
    }
}

/// Where a rule comes from.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleOrigin {
    /// The NetworkPolicy.
    pub policy: PolicyRef,
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
        for field in [
            self.policy.namespace.as_bytes(),
            self.policy.name.as_bytes(),
            direction.as_bytes(),
        ] {
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
        write!(
            f,
            "NetworkPolicy {} {}[{}]",
            self.policy, self.direction, self.index
        )
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
