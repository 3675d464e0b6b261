//! Label-set identities: every pod with the same namespace, labels and named ports shares one.
//!
//! Named ports are part of the identity because egress rules resolve a port name against each
//! peer pod: two pods with equal labels but different numbers for `http` must not share policy
//! entries. Pods of one Deployment share all three, so identities stay few.

use std::collections::{BTreeMap, HashMap};

use netwarden_common::{FIRST_POD_IDENTITY, PeerId};
use netwarden_model::{ContainerPort, Pod, selector::Labels};

/// What every pod of an identity has in common.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdentityInfo {
    /// The pods' namespace.
    pub namespace: String,
    /// The pods' labels.
    pub labels: Labels,
    /// The pods' named container ports, sorted.
    pub named_ports: Vec<ContainerPort>,
}

impl IdentityInfo {
    /// The identity a pod has.
    #[must_use]
    pub fn of(pod: &Pod) -> Self {
        let mut named_ports: Vec<ContainerPort> = pod
            .ports
            .iter()
            .filter(|port| port.name.is_some())
            .cloned()
            .collect();
        named_ports.sort();
        named_ports.dedup();
        Self {
            namespace: pod.id.namespace.clone(),
            labels: pod.labels.clone(),
            named_ports,
        }
    }

    /// A stable digest of the identity, under which the datapath remembers its number across
    /// agent restarts.
    #[must_use]
    pub fn digest(&self) -> [u8; 32] {
        use sha2::{Digest as _, Sha256};
        let mut hasher = Sha256::new();
        let mut field = |bytes: &[u8]| {
            hasher.update((bytes.len() as u64).to_be_bytes());
            hasher.update(bytes);
        };
        field(self.namespace.as_bytes());
        for (key, value) in &self.labels {
            field(key.as_bytes());
            field(value.as_bytes());
        }
        field(b"ports");
        for port in &self.named_ports {
            field(port.name.as_deref().unwrap_or_default().as_bytes());
            field(&port.port.to_be_bytes());
            field(&[port.protocol.number()]);
        }
        hasher.finalize().into()
    }

    /// The number of the container port called `name` with `protocol`, if the pods have one.
    #[must_use]
    pub fn named_port(&self, name: &str, protocol: netwarden_model::Protocol) -> Option<u16> {
        resolve_named_port(&self.named_ports, name, protocol)
    }
}

/// The number of the port called `name` with `protocol` among `ports`.
#[must_use]
pub fn resolve_named_port(
    ports: &[ContainerPort],
    name: &str,
    protocol: netwarden_model::Protocol,
) -> Option<u16> {
    ports
        .iter()
        .find(|port| port.name.as_deref() == Some(name) && port.protocol == protocol)
        .map(|port| port.port)
}

/// Hands out identities and keeps them stable while they are in use, so that a change to one
/// pod does not renumber every other pod's identity in the maps.
#[derive(Debug, Default)]
pub struct IdentityAllocator {
    by_info: HashMap<IdentityInfo, PeerId>,
    next: PeerId,
    free: Vec<PeerId>,
    preferred: HashMap<[u8; 32], PeerId>,
}

impl IdentityAllocator {
    /// Numbers a previous agent gave to identities (by [`IdentityInfo::digest`]): a new
    /// identity with one of these digests gets the same number back.
    pub fn prefer(&mut self, preferred: HashMap<[u8; 32], PeerId>) {
        let highest = preferred.values().copied().max().unwrap_or(0);
        self.next = self
            .next
            .max(highest.saturating_add(1))
            .max(FIRST_POD_IDENTITY);
        self.preferred = preferred;
    }

    /// Assigns identities for exactly `infos`, reusing the ids of those seen last time and
    /// releasing the rest.
    pub fn assign<'a>(
        &mut self,
        infos: impl Iterator<Item = &'a IdentityInfo>,
    ) -> BTreeMap<PeerId, IdentityInfo> {
        if self.next < FIRST_POD_IDENTITY {
            self.next = FIRST_POD_IDENTITY;
        }
        let mut live: HashMap<IdentityInfo, PeerId> = HashMap::new();
        let mut fresh = Vec::new();
        for info in infos {
            if live.contains_key(info) {
                continue;
            }
            if let Some(id) = self.by_info.remove(info) {
                live.insert(info.clone(), id);
            } else {
                fresh.push(info.clone());
                live.insert(info.clone(), 0);
            }
        }
        // Whatever is left in `by_info` is no longer used.
        self.free.extend(self.by_info.drain().map(|(_, id)| id));
        self.free.sort_unstable_by(|a, b| b.cmp(a));
        let taken: std::collections::HashSet<PeerId> = live.values().copied().collect();
        for info in fresh {
            if let Some(id) = self
                .preferred
                .remove(&info.digest())
                .filter(|id| !taken.contains(id))
            {
                self.free.retain(|free| *free != id);
                live.insert(info, id);
                continue;
            }
            let id = self.free.pop().unwrap_or_else(|| {
                let id = self.next;
                self.next += 1;
                id
            });
            live.insert(info, id);
        }
        let assigned = live.iter().map(|(info, id)| (*id, info.clone())).collect();
        self.by_info = live;
        assigned
    }

    /// The identity of `info`, if it is in use.
    #[must_use]
    pub fn get(&self, info: &IdentityInfo) -> Option<PeerId> {
        self.by_info.get(info).copied()
    }
}
