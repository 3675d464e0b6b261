//! Label-set identities: every pod with the same namespace, labels and named ports shares one.
//!
//! Named ports are part of the identity because egress rules resolve a port name against each
//! peer pod: two pods with equal labels but different numbers for `http` must not share policy
//! entries. Pods of one Deployment share all three, so identities stay few.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use netwarden_common::{FIRST_POD_IDENTITY, PeerId};
use netwarden_model::{ContainerPort, Pod, selector::Labels};

/// What every pod of an identity has in common.
///
/// Its `Hash` must stay the derived one: [`PodIdentity`] hashes a pod's fields the same way.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdentityInfo {
    /// The pods' namespace.
    pub namespace: String,
    /// The pods' labels, shared with the pods.
    pub labels: Arc<Labels>,
    /// The pods' named container ports, sorted.
    pub named_ports: Vec<ContainerPort>,
}

impl IdentityInfo {
    /// The identity a pod has.
    #[must_use]
    pub fn of(pod: &Pod) -> Self {
        Self {
            namespace: pod.id.namespace.clone(),
            labels: pod.labels.clone(),
            named_ports: Self::named_ports_of(pod).into_iter().cloned().collect(),
        }
    }

    /// The named container ports of `pod`, sorted and without duplicates.
    fn named_ports_of(pod: &Pod) -> Vec<&ContainerPort> {
        let mut named_ports: Vec<&ContainerPort> = pod
            .ports
            .iter()
            .filter(|port| port.name.is_some())
            .collect();
        named_ports.sort();
        named_ports.dedup();
        named_ports
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
        for (key, value) in self.labels.iter() {
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

/// Hands out identities, counting the pods that hold each, and keeps a number stable while any
/// pod holds it, so a change to one pod does not renumber other pods' identities in the maps.
///
/// A released number is never handed out again by this allocator: policies compiled for the old
/// label set may still be in the maps while the new one's addresses are written, and reuse would
/// let them allow the wrong pods for that moment. A restarted agent starts above the numbers in
/// use, so the space (2^31) does not run out.
///
/// Each identity's labels and ports are kept once, shared by both indexes (at 150,000 pods
/// there are tens of thousands of identities).
#[derive(Clone, Debug, Default)]
pub struct IdentityAllocator {
    by_info: hashbrown::HashMap<Arc<IdentityInfo>, (PeerId, usize), rustc_hash::FxBuildHasher>,
    info_of: BTreeMap<PeerId, Arc<IdentityInfo>>,
    next: PeerId,
    preferred: HashMap<[u8; 32], PeerId>,
}

impl IdentityAllocator {
    /// Numbers a previous agent gave to identities (by [`IdentityInfo::digest`]): a new
    /// identity with one of these digests gets the same number back.
    pub fn prefer(&mut self, preferred: HashMap<[u8; 32], PeerId>) {
        let highest = preferred.values().copied().max().unwrap_or(0);
        self.next = self.next.max(highest.saturating_add(1));
        self.preferred = preferred;
    }

    /// One more pod holds `info`. Returns its identity and whether the identity is new.
    pub fn acquire(&mut self, info: &IdentityInfo) -> (PeerId, bool) {
        if let Some((id, holders)) = self.by_info.get_mut(info) {
            *holders += 1;
            return (*id, false);
        }
        self.next = self.next.max(FIRST_POD_IDENTITY);
        // A digest is a SHA-256: computed only when a previous agent left numbers.
        let preferred = (!self.preferred.is_empty())
            .then(|| self.preferred.remove(&info.digest()))
            .flatten()
            .filter(|id| !self.info_of.contains_key(id));
        let id = preferred.unwrap_or_else(|| {
            // `prefer` put `next` above every number a previous agent used.
            self.next += 1;
            self.next - 1
        });
        let info = Arc::new(info.clone());
        self.by_info.insert(Arc::clone(&info), (id, 1));
        self.info_of.insert(id, info);
        (id, true)
    }

    /// [`IdentityAllocator::acquire`] for the identity of `pod`, built only when it is new: at
    /// a full compile every pod is acquired, and building each one's copied its labels.
    pub fn acquire_of(&mut self, pod: &Pod) -> (PeerId, bool) {
        let key = PodIdentity {
            namespace: &pod.id.namespace,
            labels: &pod.labels,
            named_ports: IdentityInfo::named_ports_of(pod),
        };
        if let Some((id, holders)) = self.by_info.get_mut(&key) {
            *holders += 1;
            return (*id, false);
        }
        self.acquire(&IdentityInfo::of(pod))
    }

    /// One pod fewer holds `info`. Returns the identity if no pod holds it any more.
    pub fn release(&mut self, info: &IdentityInfo) -> Option<PeerId> {
        let (id, holders) = self.by_info.get_mut(info)?;
        *holders -= 1;
        if *holders > 0 {
            return None;
        }
        let id = *id;
        self.by_info.remove(info);
        self.info_of.remove(&id);
        Some(id)
    }

    /// One pod fewer holds identity `id`. Returns it if no pod holds it any more.
    pub fn release_id(&mut self, id: PeerId) -> Option<PeerId> {
        let info = Arc::clone(self.info_of.get(&id)?);
        self.release(&info)
    }

    /// Identities in use.
    #[must_use]
    pub fn identities(&self) -> &BTreeMap<PeerId, Arc<IdentityInfo>> {
        &self.info_of
    }
}

/// A pod's identity, borrowed from the pod: looked up without building an [`IdentityInfo`].
#[derive(Hash)]
struct PodIdentity<'p> {
    // The fields of `IdentityInfo`, in its order, hashing as its fields do (a reference hashes
    // as what it points to; a `Vec` as its elements).
    namespace: &'p str,
    labels: &'p Labels,
    named_ports: Vec<&'p ContainerPort>,
}

impl hashbrown::Equivalent<Arc<IdentityInfo>> for PodIdentity<'_> {
    fn equivalent(&self, info: &Arc<IdentityInfo>) -> bool {
        self.namespace == info.namespace
            && self.labels == &*info.labels
            && self.named_ports.iter().copied().eq(&info.named_ports)
    }
}

#[cfg(test)]
mod tests {
    use std::hash::BuildHasher as _;

    use netwarden_model::{PodRef, Protocol};

    use super::*;

    fn port(name: Option<&str>, port: u16) -> ContainerPort {
        ContainerPort {
            name: name.map(str::to_owned),
            port,
            protocol: Protocol::Tcp,
        }
    }

    /// A pod is looked up by its borrowed fields: they must hash as the identity built from it,
    /// or every pod would get an identity of its own.
    #[test]
    fn a_pod_hashes_and_compares_as_its_identity() {
        let pod = Pod {
            id: PodRef {
                namespace: "shop".into(),
                name: "web-1".into(),
            },
            labels: Arc::new([("app".to_owned(), "web".to_owned())].into()),
            ports: Arc::new([
                port(Some("metrics"), 9090),
                port(None, 7000),
                port(Some("http"), 8080),
                port(Some("http"), 8080),
            ]),
            node_name: None,
            ips: Vec::new(),
            host_network: false,
            service_account: "default".into(),
            mtls: netwarden_model::PodMtls::default().into(),
        };
        let key = PodIdentity {
            namespace: &pod.id.namespace,
            labels: &pod.labels,
            named_ports: IdentityInfo::named_ports_of(&pod),
        };
        let info = Arc::new(IdentityInfo::of(&pod));
        let hasher = rustc_hash::FxBuildHasher;
        assert_eq!(hasher.hash_one(&key), hasher.hash_one(&info));
        assert!(hashbrown::Equivalent::equivalent(&key, &info));

        let mut allocator = IdentityAllocator::default();
        let (id, new) = allocator.acquire(&info);
        assert!(new);
        assert_eq!(allocator.acquire_of(&pod), (id, false));
        let mut other = pod.clone();
        Arc::make_mut(&mut other.labels).insert("version".into(), "v2".into());
        assert_ne!(allocator.acquire_of(&other).0, id);
    }
}
