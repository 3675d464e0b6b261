//! The pods the compiler knows of, kept as little as it needs: label-set identities for every
//! pod, the addresses they claim, and the local pods whole.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
};

use netwarden_common::PeerId;
use netwarden_model::{Pod, PodRef};
use rustc_hash::FxHashMap;
use smallvec::SmallVec;

use crate::identity::{IdentityAllocator, IdentityInfo};

/// Every pod of the cluster, and the identities they hold.
#[derive(Clone, Debug, Default)]
pub(crate) struct Pods {
    /// Every pod, by what the compiler keeps of it; hashed, not ordered: each pod is looked up
    /// several times at a full compile, and a lookup in a tree of 150,000 compares ~40 names.
    /// The key is shared with the addresses the pod claims and the names the agent reports.
    pub(crate) records: FxHashMap<Arc<PodRef>, PodRecord>,
    /// The pods of this node, whole: their policies are compiled from them.
    pub(crate) local: BTreeMap<PodRef, Pod>,
    pub(crate) identities: IdentityAllocator,
    /// The identities of each namespace's pods: a selector peer looks only at the namespaces
    /// it can select.
    pub(crate) identities_by_namespace: BTreeMap<String, BTreeSet<PeerId>>,
}

impl Pods {
    /// The identity of pod `id`, when it has one (it has addresses and is not on the host
    /// network).
    pub(crate) fn identity_of(&self, id: &PodRef) -> Option<PeerId> {
        self.records.get(id).and_then(|record| record.identity)
    }

    /// What pods of identity `id` have in common.
    pub(crate) fn identity_info(&self, id: PeerId) -> &IdentityInfo {
        &self.identities.identities()[&id]
    }

    /// [`Pods::identity_info`], shared.
    pub(crate) fn identity_info_shared(&self, id: PeerId) -> &Arc<IdentityInfo> {
        &self.identities.identities()[&id]
    }

    /// The pod as the compiler treats it: host-network pods share the node's addresses, so
    /// policy neither selects them nor can tell them from the node; pods without an address
    /// have nothing to enforce yet.
    pub(crate) fn enforceable(pod: Option<&Pod>) -> Option<&Pod> {
        pod.filter(|pod| !pod.host_network && !pod.ips.is_empty())
    }
}

/// What the compiler keeps of a pod that may be remote.
#[derive(Clone, Debug)]
pub(crate) struct PodRecord {
    /// Tells a changed pod from an unchanged one without keeping it.
    pub(crate) fingerprint: Fingerprint,
    /// Its identity, when it has addresses and is not on the host network.
    pub(crate) identity: Option<PeerId>,
    /// The addresses it claims: one inline (IPv4 or IPv6), a dual-stack pod's on the heap.
    pub(crate) ips: SmallVec<[IpAddr; 1]>,
}

/// 128 bits of `SipHash`-1-3 over the whole pod, in one pass (two 64-bit runs hashed every pod
/// twice, a sixth of a full compile): an update is missed only if it collides with the previous
/// version of the same pod.
pub(crate) fn fingerprint(pod: &Pod) -> Fingerprint {
    use siphasher::sip128::Hasher128 as _;
    use std::hash::Hash as _;
    let mut hasher = siphasher::sip128::SipHasher13::new();
    pod.hash(&mut hasher);
    let hash = hasher.finish128();
    [hash.h1, hash.h2]
}

/// A [`fingerprint`], as two words rather than a `u128`: its 16-byte alignment padded each of
/// the 150,000 records' table slots by 16 bytes.
pub(crate) type Fingerprint = [u64; 2];

/// Which pods claim each address. Two pods may claim one (the API server does not stop it):
/// the first by namespace and name owns it, and the other is reported.
///
/// Nearly every address has one claimant: the sorted claimants are kept inline when there is
/// one, each the pod's record key. A `BTreeSet`'s first insert allocates a node for eleven
/// (~600 bytes an address, 7 MiB at 10,000 pods), a `Vec`'s room for four (30 MiB at 150,000
/// pods), and a copy of the name its own two strings.
#[derive(Clone, Debug, Default)]
pub(crate) struct AddressClaims {
    claims: BTreeMap<IpAddr, SmallVec<[Arc<PodRef>; 1]>>,
    /// A warning for each address claimed twice.
    duplicates: BTreeMap<IpAddr, String>,
}

impl AddressClaims {
    pub(crate) fn claim(&mut self, ip: IpAddr, pod: &Arc<PodRef>) {
        let claims = self.claims.entry(ip).or_default();
        if let Err(at) = claims.binary_search_by(|claimant| (**claimant).cmp(pod)) {
            claims.insert(at, Arc::clone(pod));
        }
    }

    pub(crate) fn release(&mut self, ip: IpAddr, pod: &PodRef) {
        if let Some(claims) = self.claims.get_mut(&ip) {
            if let Ok(at) = claims.binary_search_by(|claimant| (**claimant).cmp(pod)) {
                claims.remove(at);
            }
            if claims.is_empty() {
                self.claims.remove(&ip);
            }
        }
    }

    /// The pod that owns `ip`: the first claimant by namespace and name.
    pub(crate) fn owner(&self, ip: IpAddr) -> Option<&Arc<PodRef>> {
        self.claims.get(&ip).and_then(|claims| claims.first())
    }

    /// Every claimed address with its owner.
    pub(crate) fn owners(&self) -> impl Iterator<Item = (IpAddr, &Arc<PodRef>)> {
        self.claims
            .iter()
            .filter_map(|(ip, claims)| claims.first().map(|owner| (*ip, owner)))
    }

    /// Records whether `ip` is claimed twice, for [`AddressClaims::warnings`].
    pub(crate) fn check_duplicate(&mut self, ip: IpAddr) {
        match self.claims.get(&ip).map(SmallVec::as_slice) {
            Some([owner, second, ..]) => {
                self.duplicates.insert(
                    ip,
                    format!("Pod {second}: status.podIPs: {ip} is also the address of Pod {owner}; using {owner}"),
                );
            }
            _ => {
                self.duplicates.remove(&ip);
            }
        }
    }

    /// A warning for each address two pods claim.
    pub(crate) fn warnings(&self) -> impl Iterator<Item = &String> {
        self.duplicates.values()
    }
}
