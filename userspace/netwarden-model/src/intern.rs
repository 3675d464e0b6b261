//! One shared copy of equal values that many objects hold.
//!
//! At Kubernetes' limit of 150,000 pods, a copy of its labels in every pod was a sixth of the
//! agent's memory, though a workload's replicas all carry the same ones: the sources keep one
//! copy of each distinct label set and port list instead, as Cilium keeps one identity for each.

use std::{collections::HashSet, hash::Hash, sync::Arc};

use crate::{ContainerPort, Pod, PodMtls, selector::Labels};

/// What pods have in common, one copy of each: labels, ports, mTLS settings, service account
/// and node.
#[derive(Debug, Default)]
pub struct PodInterner {
    labels: Interner<Labels>,
    ports: Interner<[ContainerPort]>,
    mtls: Interner<PodMtls>,
    service_accounts: Interner<str>,
    nodes: Interner<str>,
}

impl PodInterner {
    /// Makes `pod` share what it has in common with the pods seen before.
    pub fn share(&mut self, pod: &mut Pod) {
        pod.labels = self.labels.intern(Arc::clone(&pod.labels));
        pod.ports = self.ports.intern(Arc::clone(&pod.ports));
        pod.mtls = self.mtls.intern(Arc::clone(&pod.mtls));
        pod.service_account = self
            .service_accounts
            .intern(Arc::clone(&pod.service_account));
        if let Some(node) = pod.node_name.as_mut() {
            *node = self.nodes.intern(Arc::clone(node));
        }
    }

    /// A pod was deleted or replaced; see [`Interner::released`].
    pub fn released(&mut self) {
        self.labels.released();
        self.ports.released();
        self.mtls.released();
        self.service_accounts.released();
        self.nodes.released();
    }

    /// Drops the copies no pod holds any more.
    pub fn forget_unused(&mut self) {
        self.labels.forget_unused();
        self.ports.forget_unused();
        self.mtls.forget_unused();
        self.service_accounts.forget_unused();
        self.nodes.forget_unused();
    }
}

/// The distinct values handed out, each shared by every holder of an equal one.
#[derive(Debug)]
pub struct Interner<T: ?Sized> {
    shared: HashSet<Arc<T>>,
    /// Holders that may have let go since the unused copies were last forgotten.
    released: usize,
}

impl<T: ?Sized> Default for Interner<T> {
    fn default() -> Self {
        Self {
            shared: HashSet::new(),
            released: 0,
        }
    }
}

impl<T: ?Sized + Eq + Hash> Interner<T> {
    /// The shared copy equal to `value`, which becomes the shared copy when there is none.
    pub fn intern(&mut self, value: Arc<T>) -> Arc<T> {
        if let Some(shared) = self.shared.get(&*value) {
            return Arc::clone(shared);
        }
        self.shared.insert(Arc::clone(&value));
        value
    }

    /// Drops the copies that only the interner still holds.
    pub fn forget_unused(&mut self) {
        self.shared.retain(|value| Arc::strong_count(value) > 1);
        self.released = 0;
    }

    /// Notes that a holder let go of its copy (a pod deleted or replaced). Unused copies are
    /// forgotten once as many holders went as copies are kept: a pass over them costs each
    /// release O(1), amortized, and at most half of what is kept is garbage.
    pub fn released(&mut self) {
        self.released += 1;
        if self.released >= self.shared.len() {
            self.forget_unused();
        }
    }

    /// How many distinct values are shared.
    #[must_use]
    pub fn len(&self) -> usize {
        self.shared.len()
    }

    /// Whether nothing is shared.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.shared.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::Interner;

    #[test]
    fn equal_values_share_one_copy_until_no_holder_is_left() {
        let mut interner = Interner::<[u16]>::default();
        let first = interner.intern(Arc::from([80, 443]));
        let second = interner.intern(Arc::from(vec![80, 443]));
        let other = interner.intern(Arc::from([53]));
        assert!(Arc::ptr_eq(&first, &second));
        assert!(!Arc::ptr_eq(&first, &other));
        assert_eq!(interner.len(), 2);

        drop(other);
        interner.forget_unused();
        assert_eq!(interner.len(), 1, "a value no one holds is forgotten");
        drop((first, second));
        interner.released();
        assert!(
            interner.is_empty(),
            "one release of one kept copy forgets it"
        );
    }
}
