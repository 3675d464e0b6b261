//! The maps the agent keeps in step with the compiled state, one module per map (or per group
//! of maps written together), each owning what it installed.
//!
//! Every write goes through [`KeyedMap`] or [`ArrayMap`]: the aya maps implement them, and
//! so does a recorder in this crate's unit tests, which checks the order the apply promises
//! (`apply.rs`) on every run, without root.

pub(crate) mod addresses;
pub(crate) mod endpoints;
pub(crate) mod epoch;
pub(crate) mod frontends;
pub(crate) mod identities;
pub(crate) mod ipcache;
pub(crate) mod policies;
#[cfg(test)]
pub(crate) mod recording;

use std::{borrow::BorrowMut, net::IpAddr};

use aya::{
    Pod,
    maps::{Array, HashMap as BpfHashMap, LpmTrie, MapData, MapError, lpm_trie::Key},
};

use crate::error::ApplyError;

/// Every map the agent writes, each with what it installed.
pub(crate) struct SyncedMaps {
    pub ipcache: ipcache::IpCache,
    pub policies: policies::Policies,
    pub endpoints: endpoints::Endpoints,
    pub addresses: addresses::Addresses,
    pub frontends: frontends::Frontends,
    pub identities: identities::Identities,
    pub epoch: epoch::Epoch,
    /// `SETTINGS`: the frontends flag and the allow-event period.
    pub settings: Box<dyn ArrayMap<u32>>,
}

/// Writes to a hash map or LPM trie.
pub(crate) trait KeyedMap<K, V>: Send {
    /// Adds or replaces the entry of `key`.
    fn insert(&mut self, key: &K, value: V) -> Result<(), MapError>;
    /// Removes the entry of `key`.
    fn remove(&mut self, key: &K) -> Result<(), MapError>;
}

/// Reads and writes of an array map's cells.
pub(crate) trait ArrayMap<V>: Send {
    /// The value at `index`.
    fn get(&self, index: u32) -> Result<V, MapError>;
    /// Writes the value at `index`.
    fn set(&mut self, index: u32, value: V) -> Result<(), MapError>;
}

/// A hash map or trie as the reconcilers hold it.
pub(crate) type Keyed<K, V> = Box<dyn KeyedMap<K, V>>;

impl<T: BorrowMut<MapData> + Send, K: Pod + Send, V: Pod + Send> KeyedMap<K, V>
    for BpfHashMap<T, K, V>
{
    fn insert(&mut self, key: &K, value: V) -> Result<(), MapError> {
        Self::insert(self, key, value, 0)
    }

    fn remove(&mut self, key: &K) -> Result<(), MapError> {
        Self::remove(self, key)
    }
}

impl<T: BorrowMut<MapData> + Send, K: Pod + Send, V: Pod + Send> KeyedMap<Key<K>, V>
    for LpmTrie<T, K, V>
{
    fn insert(&mut self, key: &Key<K>, value: V) -> Result<(), MapError> {
        Self::insert(self, key, value, 0)
    }

    fn remove(&mut self, key: &Key<K>) -> Result<(), MapError> {
        Self::remove(self, key)
    }
}

impl<T: BorrowMut<MapData> + Send, V: Pod + Send> ArrayMap<V> for Array<T, V> {
    fn get(&self, index: u32) -> Result<V, MapError> {
        Self::get(self, &index, 0)
    }

    fn set(&mut self, index: u32, value: V) -> Result<(), MapError> {
        Self::set(self, index, value, 0)
    }
}

/// What one sync of a map did: whether it wrote anything, and what it could not write (the
/// rest of the sync went on).
#[derive(Debug, Default)]
#[must_use]
pub(crate) struct Synced {
    /// Whether the map changed.
    pub changed: bool,
    /// What did not take.
    pub failures: Vec<ApplyError>,
}

impl Synced {
    /// Notes that the map changed.
    pub fn change(&mut self) {
        self.changed = true;
    }

    /// Notes what did not take.
    pub fn fail(&mut self, error: ApplyError) {
        self.failures.push(error);
    }

    /// Takes in what another sync did.
    pub fn merge(&mut self, other: Self) {
        self.changed |= other.changed;
        self.failures.extend(other.failures);
    }
}

/// The address a map key holds (IPv4 is stored mapped into IPv6).
pub(crate) fn unmapped(addr: [u8; 16]) -> IpAddr {
    let v6 = std::net::Ipv6Addr::from(addr);
    v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
}
