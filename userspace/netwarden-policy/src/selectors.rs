//! Selector peers, resolved to the identities they match and kept up to date.
//!
//! A `podSelector`/`namespaceSelector` peer compiles to one policy entry per identity it
//! matches. Each distinct peer's match set is computed once, then maintained as identities come
//! and go and namespaces change labels; an endpoint is recompiled only when a set its policies
//! use changed. Whether a peer selects a pod is decided by [`Peer::selects_pod`], the one
//! matcher the reference evaluator uses too.

use std::collections::BTreeSet;

use netwarden_common::PeerId;
use netwarden_model::{Cluster, Peer, PodRef, selector::Labels};
use rustc_hash::FxHashMap;

use crate::{identity::IdentityInfo, pods::Pods};

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

/// The match sets of the selector peers local endpoints use, and who uses each.
#[derive(Clone, Debug, Default)]
pub(crate) struct Selectors {
    matched: FxHashMap<SelectorKey, BTreeSet<PeerId>>,
    users: FxHashMap<SelectorKey, BTreeSet<PodRef>>,
    used_by: FxHashMap<PodRef, Vec<SelectorKey>>,
}

impl Selectors {
    /// The identities `key` matches, computed once and then maintained.
    pub(crate) fn matching(
        &mut self,
        key: &SelectorKey,
        pods: &Pods,
        cluster: &Cluster,
    ) -> &BTreeSet<PeerId> {
        if !self.matched.contains_key(key) {
            let (policy_namespace, peer) = key;
            // An index, not a second semantics: a peer without a namespaceSelector can select
            // its policy's namespace only, so that is the only one looked at.
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
            let matched = candidates
                .into_iter()
                .filter(|(namespace, _)| {
                    peer.selects_namespace(policy_namespace, namespace, || {
                        cluster.namespace_labels(namespace)
                    })
                })
                .flat_map(|(_, members)| members)
                .filter(|id| peer.selects_pod_labels(&pods.identity_info(**id).labels))
                .copied()
                .collect();
            self.matched.insert(key.clone(), matched);
        }
        &self.matched[key]
    }

    /// Adds a new identity to the sets that match it; the users of a changed set are added to
    /// `dirty`.
    pub(crate) fn identity_created(
        &mut self,
        identity: PeerId,
        info: &IdentityInfo,
        namespace_labels: &Labels,
        dirty: &mut BTreeSet<PodRef>,
    ) {
        for (key, matched) in &mut self.matched {
            let (policy_namespace, peer) = key;
            if peer.selects_pod(
                policy_namespace,
                &info.namespace,
                || namespace_labels,
                &info.labels,
            ) && matched.insert(identity)
            {
                dirty.extend(self.users.get(key).into_iter().flatten().cloned());
            }
        }
    }

    /// Removes a retired identity from every set; the users of a changed set are added to
    /// `dirty`.
    pub(crate) fn identity_retired(&mut self, identity: PeerId, dirty: &mut BTreeSet<PodRef>) {
        for (key, matched) in &mut self.matched {
            if matched.remove(&identity) {
                dirty.extend(self.users.get(key).into_iter().flatten().cloned());
            }
        }
    }

    /// Checks the identities `members` of namespace `namespace`, now labelled `labels`,
    /// against every peer with a `namespaceSelector` (no other depends on namespace labels);
    /// the users of a changed set are added to `dirty`.
    pub(crate) fn namespace_relabelled(
        &mut self,
        namespace: &str,
        labels: &Labels,
        members: &[(PeerId, &IdentityInfo)],
        dirty: &mut BTreeSet<PodRef>,
    ) {
        for (key, matched) in &mut self.matched {
            let (policy_namespace, peer) = key;
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
                let changed =
                    if peer.selects_pod(policy_namespace, namespace, || labels, &info.labels) {
                        matched.insert(*id)
                    } else {
                        matched.remove(id)
                    };
                if changed {
                    dirty.extend(self.users.get(key).into_iter().flatten().cloned());
                }
            }
        }
    }

    /// Records that endpoint `pod` was compiled with the peers `keys`.
    pub(crate) fn record_uses(&mut self, pod: &PodRef, keys: Vec<SelectorKey>) {
        for key in &keys {
            self.users
                .entry(key.clone())
                .or_default()
                .insert(pod.clone());
        }
        self.used_by.insert(pod.clone(), keys);
    }

    /// Forgets what endpoint `pod` used. A set nobody uses any more is dropped later
    /// ([`Selectors::drop_unused`]), so that an endpoint recompiled in the same update finds
    /// it still computed.
    pub(crate) fn forget_uses(&mut self, pod: &PodRef) {
        for key in self.used_by.remove(pod).unwrap_or_default() {
            if let Some(users) = self.users.get_mut(&key) {
                users.remove(pod);
            }
        }
    }

    /// Drops the sets no endpoint uses: nobody needs them maintained.
    pub(crate) fn drop_unused(&mut self) {
        let unused: Vec<SelectorKey> = self
            .users
            .iter()
            .filter(|(_, users)| users.is_empty())
            .map(|(key, _)| key.clone())
            .collect();
        for key in unused {
            self.users.remove(&key);
            self.matched.remove(&key);
        }
    }
}
