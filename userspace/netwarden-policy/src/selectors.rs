//! Selector peers, resolved to the identities they match and kept up to date.
//!
//! A `podSelector`/`namespaceSelector` peer compiles to one policy entry per identity it
//! matches. Each distinct peer's match set is computed once, then maintained as identities come
//! and go and namespaces change labels; when an identity joins or leaves a set, the endpoints
//! whose policies use it have their entries for that identity recomputed. Whether a peer selects a pod is decided by [`Peer::selects_pod`], the one
//! matcher the reference evaluator uses too.

use std::collections::{BTreeMap, BTreeSet};

use netwarden_common::PeerId;
use netwarden_model::{Cluster, Peer, PodRef, selector::Labels};
use rustc_hash::FxHashMap;

use crate::{identity::IdentityInfo, pods::Pods, state::Direction};

/// A selector peer, with the namespace it is read in: its policy's for a peer without a
/// `namespaceSelector`, empty for one with (it means the same in every policy namespace).
pub(crate) type SelectorKey = (String, Peer);

/// The key under which `peer`, of a policy in `policy_namespace`, is cached.
pub(crate) fn selector_key(policy_namespace: &str, peer: &Peer) -> SelectorKey {
    let scope = match peer {
        Peer::Pods {
            namespace_selector: Some(_),
            ..
        } => String::new(),
        _ => policy_namespace.to_owned(),
    };
    (scope, peer.clone())
}

/// A selector peer's number while some endpoint uses it: endpoints record the peers they were
/// compiled with by number, not by a copy of the selector. Numbers are not reused.
pub(crate) type SelectorId = u32;

/// One selector peer's match set and the endpoints compiled with it.
#[derive(Clone, Debug)]
struct SelectorSet {
    key: SelectorKey,
    matched: BTreeSet<PeerId>,
    users: BTreeSet<PodRef>,
}

/// Endpoints to bring up to date for identities that joined or left a match set they use,
/// each with those identities: only the entries of those peers change.
pub(crate) type IdentityChanges = BTreeMap<PodRef, BTreeSet<PeerId>>;

/// The match sets of the selector peers local endpoints use, and who uses each.
#[derive(Clone, Debug, Default)]
pub(crate) struct Selectors {
    ids: FxHashMap<SelectorKey, SelectorId>,
    sets: FxHashMap<SelectorId, SelectorSet>,
    used_by: FxHashMap<PodRef, Vec<SelectorId>>,
    next_id: SelectorId,
    /// The number of each ClusterNetworkPolicy peer's selector, by policy name and place
    /// (direction, rule, peer): every endpoint a policy selects compiles all its rules, and
    /// building and hashing the selector each time was most of that. Valid while the policy is
    /// unchanged and its set exists (numbers are not reused).
    cluster_peers: FxHashMap<String, FxHashMap<ClusterPeerPlace, SelectorId>>,
}

/// Where a peer sits in a ClusterNetworkPolicy: direction, rule index, peer index.
pub(crate) type ClusterPeerPlace = (Direction, usize, usize);

impl Selectors {
    /// The number of `key`, its match set computed when it is new and then maintained.
    pub(crate) fn id_of(&mut self, key: SelectorKey, pods: &Pods, cluster: &Cluster) -> SelectorId {
        if let Some(id) = self.ids.get(&key) {
            return *id;
        }
        let id = self.next_id;
        self.next_id = self
            .next_id
            .checked_add(1)
            .expect("fewer than 2^32 selector peers in one agent's life");
        let matched = compute_matches(&key, pods, cluster);
        self.ids.insert(key.clone(), id);
        self.sets.insert(
            id,
            SelectorSet {
                key,
                matched,
                users: BTreeSet::new(),
            },
        );
        id
    }

    /// The number of the selector of the ClusterNetworkPolicy `policy`'s peer at `place`;
    /// `key` builds it when it is not known.
    pub(crate) fn cluster_peer_id(
        &mut self,
        policy: &str,
        place: ClusterPeerPlace,
        key: impl FnOnce() -> SelectorKey,
        pods: &Pods,
        cluster: &Cluster,
    ) -> SelectorId {
        let known = self
            .cluster_peers
            .get(policy)
            .and_then(|places| places.get(&place))
            .filter(|id| self.sets.contains_key(id));
        if let Some(id) = known {
            return *id;
        }
        let id = self.id_of(key(), pods, cluster);
        self.cluster_peers
            .entry(policy.to_owned())
            .or_default()
            .insert(place, id);
        id
    }

    /// Forgets the selector numbers of ClusterNetworkPolicy `policy`'s peers (it changed).
    pub(crate) fn forget_cluster_policy(&mut self, policy: &str) {
        self.cluster_peers.remove(policy);
    }

    /// The identities selector `id` matches.
    pub(crate) fn matching_ids(&self, id: SelectorId) -> impl Iterator<Item = PeerId> + '_ {
        self.sets
            .get(&id)
            .into_iter()
            .flat_map(|set| set.matched.iter().copied())
    }

    /// Whether selector `id` matches `identity`.
    pub(crate) fn matches(&self, id: SelectorId, identity: PeerId) -> bool {
        self.sets
            .get(&id)
            .is_some_and(|set| set.matched.contains(&identity))
    }

    /// Adds a new identity to the sets that match it; the users of a changed set are added to
    /// `changes` with it.
    pub(crate) fn identity_created(
        &mut self,
        identity: PeerId,
        info: &IdentityInfo,
        namespace_labels: &Labels,
        changes: &mut IdentityChanges,
    ) {
        for set in self.sets.values_mut() {
            let (policy_namespace, peer) = &set.key;
            if peer.selects_pod(
                policy_namespace,
                &info.namespace,
                || namespace_labels,
                &info.labels,
            ) && set.matched.insert(identity)
            {
                note_change(changes, &set.users, identity);
            }
        }
    }

    /// Removes a retired identity from every set; the users of a changed set are added to
    /// `changes` with it.
    pub(crate) fn identity_retired(&mut self, identity: PeerId, changes: &mut IdentityChanges) {
        for set in self.sets.values_mut() {
            if set.matched.remove(&identity) {
                note_change(changes, &set.users, identity);
            }
        }
    }

    /// Checks the identities `members` of namespace `namespace`, now labelled `labels`,
    /// against every peer with a `namespaceSelector` (no other depends on namespace labels);
    /// the users of a changed set are added to `changes` with the identities that moved.
    pub(crate) fn namespace_relabelled(
        &mut self,
        namespace: &str,
        labels: &Labels,
        members: &[(PeerId, &IdentityInfo)],
        changes: &mut IdentityChanges,
    ) {
        for set in self.sets.values_mut() {
            let (policy_namespace, peer) = &set.key;
            if !matches!(
                peer,
                Peer::Pods {
                    namespace_selector: Some(_),
                    ..
                }
            ) {
                continue;
            }
            for (id, info) in members {
                let moved =
                    if peer.selects_pod(policy_namespace, namespace, || labels, &info.labels) {
                        set.matched.insert(*id)
                    } else {
                        set.matched.remove(id)
                    };
                if moved {
                    note_change(changes, &set.users, *id);
                }
            }
        }
    }

    /// Records that endpoint `pod` was compiled with the peers `ids`.
    pub(crate) fn record_uses(&mut self, pod: &PodRef, mut ids: Vec<SelectorId>) {
        // Many rules share a peer (every Baseline policy's "other namespaces", say).
        ids.sort_unstable();
        ids.dedup();
        for id in &ids {
            if let Some(set) = self.sets.get_mut(id) {
                set.users.insert(pod.clone());
            }
        }
        self.used_by.insert(pod.clone(), ids);
    }

    /// Forgets what endpoint `pod` used. A set nobody uses any more is dropped later
    /// ([`Selectors::drop_unused`]), so that an endpoint recompiled in the same update finds
    /// it still computed.
    pub(crate) fn forget_uses(&mut self, pod: &PodRef) {
        for id in self.used_by.remove(pod).unwrap_or_default() {
            if let Some(set) = self.sets.get_mut(&id) {
                set.users.remove(pod);
            }
        }
    }

    /// Drops the sets no endpoint uses: nobody needs them maintained.
    pub(crate) fn drop_unused(&mut self) {
        let ids = &mut self.ids;
        self.sets.retain(|_, set| {
            let used = !set.users.is_empty();
            if !used {
                ids.remove(&set.key);
            }
            used
        });
    }
}

fn note_change(changes: &mut IdentityChanges, users: &BTreeSet<PodRef>, identity: PeerId) {
    for user in users {
        changes.entry(user.clone()).or_default().insert(identity);
    }
}

/// The identities selector peer `key` matches now.
fn compute_matches(key: &SelectorKey, pods: &Pods, cluster: &Cluster) -> BTreeSet<PeerId> {
    let (policy_namespace, peer) = key;
    // An index, not a second semantics: a peer without a namespaceSelector can select its
    // policy's namespace only, so that is the only one looked at.
    let candidates: Vec<(&String, &BTreeSet<PeerId>)> = match peer {
        Peer::Pods {
            namespace_selector: None,
            ..
        } => pods
            .identities_by_namespace
            .get_key_value(policy_namespace)
            .into_iter()
            .collect(),
        _ => pods.identities_by_namespace.iter().collect(),
    };
    candidates
        .into_iter()
        .filter(|(namespace, _)| {
            peer.selects_namespace(policy_namespace, namespace, || {
                cluster.namespace_labels(namespace)
            })
        })
        .flat_map(|(_, members)| members)
        .filter(|id| peer.selects_pod_labels(&pods.identity_info(**id).labels))
        .copied()
        .collect()
}
