//! `POLICY`, `CIDRS_V4` and `CIDRS_V6`: each compiled policy's entries and `ipBlock` prefixes,
//! under its id. An id's content never changes once this agent installed it: a changed policy
//! gets a new id, is written beside the old one, and the old one is removed once no endpoint
//! uses it (`apply.rs`), which is why this map is synced in two steps.

use std::collections::{BTreeMap, BTreeSet};

use aya::{
    Pod,
    maps::{LpmTrie, MapData, MapError, lpm_trie::Key},
};
use ipnet::IpNet;
use netwarden_common::{
    CIDR_KEY_POLICY_BITS, CidrClass, CidrKey, CidrKeyV4, PeerId, PolicyEntry, PolicyKey,
};
use netwarden_policy::{
    CompiledPolicy, PolicyId, PolicyMatch,
    map_keys::{self, CidrEntryKey},
};

use super::{Keyed, KeyedMap, Synced};
use crate::error::{ApplyError, PolicyMap};

/// Keys of one installed policy, so it can be deleted without scanning the maps, and, until
/// the first apply compared it with what the compiler wants, the content read back from a
/// previous agent's maps (an id this agent installed never changes content: no copy is kept).
#[derive(Default)]
struct InstalledPolicy {
    entries: Vec<Key<PolicyKey>>,
    cidrs_v4: Vec<Key<CidrKeyV4>>,
    cidrs_v6: Vec<Key<CidrKey>>,
    pinned: Option<CompiledPolicy>,
}

/// The three policy maps and the policies this agent knows they hold.
pub(crate) struct Policies {
    entries: Keyed<Key<PolicyKey>, PolicyEntry>,
    cidrs_v4: Keyed<Key<CidrKeyV4>, CidrClass>,
    cidrs_v6: Keyed<Key<CidrKey>, CidrClass>,
    installed: BTreeMap<PolicyId, InstalledPolicy>,
}

/// What [`Policies::install_new`] did, and which policies did not fit.
pub(crate) struct Installed {
    pub synced: Synced,
    /// Policies that did not fit the maps: nothing of them is left installed.
    pub failed: BTreeSet<PolicyId>,
}

impl Policies {
    /// Takes over the pinned maps and reads back every policy they hold.
    pub fn adopt(
        entries: LpmTrie<MapData, PolicyKey, PolicyEntry>,
        cidrs_v4: LpmTrie<MapData, CidrKeyV4, CidrClass>,
        cidrs_v6: LpmTrie<MapData, CidrKey, CidrClass>,
    ) -> Self {
        let mut installed: BTreeMap<PolicyId, InstalledPolicy> = BTreeMap::new();
        for (key, value) in entries.iter().flatten() {
            let (id, entry) = PolicyMatch::from_key(key.prefix_len(), &key.data());
            let policy = installed.entry(id).or_default();
            policy
                .pinned
                .get_or_insert_default()
                .entries
                .insert(entry, value);
            policy.entries.push(key);
        }
        for (key, class) in cidrs_v4.iter().flatten() {
            let data = key.data();
            let net = |len| {
                ipnet::Ipv4Net::new(data.addr.into(), len)
                    .ok()
                    .map(IpNet::V4)
            };
            adopt_cidr(
                &mut installed,
                data.policy,
                key.prefix_len(),
                net,
                class.peer,
            )
            .cidrs_v4
            .push(key);
        }
        for (key, class) in cidrs_v6.iter().flatten() {
            let data = key.data();
            let net = |len| {
                ipnet::Ipv6Net::new(data.addr.into(), len)
                    .ok()
                    .map(IpNet::V6)
            };
            adopt_cidr(
                &mut installed,
                data.policy,
                key.prefix_len(),
                net,
                class.peer,
            )
            .cidrs_v6
            .push(key);
        }
        Self {
            entries: Box::new(entries),
            cidrs_v4: Box::new(cidrs_v4),
            cidrs_v6: Box::new(cidrs_v6),
            installed,
        }
    }

    /// Empty maps (the unit tests' recording ones).
    #[cfg(test)]
    pub fn new(
        entries: Keyed<Key<PolicyKey>, PolicyEntry>,
        cidrs_v4: Keyed<Key<CidrKeyV4>, CidrClass>,
        cidrs_v6: Keyed<Key<CidrKey>, CidrClass>,
    ) -> Self {
        Self {
            entries,
            cidrs_v4,
            cidrs_v6,
            installed: BTreeMap::new(),
        }
    }

    /// Every policy id in the maps.
    pub fn ids(&self) -> impl Iterator<Item = PolicyId> + '_ {
        self.installed.keys().copied()
    }

    /// Each policy a previous agent left, as read back.
    pub fn pinned(&self) -> BTreeMap<PolicyId, CompiledPolicy> {
        self.installed
            .iter()
            .map(|(id, policy)| (*id, policy.pinned.clone().unwrap_or_default()))
            .collect()
    }

    /// Writes every policy of `desired` the maps do not hold yet, under its own id, and makes
    /// pinned policies the compiler adopted hold its rule ids. Nothing is removed.
    pub fn install_new(&mut self, desired: &BTreeMap<PolicyId, CompiledPolicy>) -> Installed {
        let mut synced = Synced::default();
        let mut failed = BTreeSet::new();
        for (id, compiled) in desired {
            if let Some(installed) = self.installed.get_mut(id) {
                // A pinned policy the compiler adopted: equal, or equal but for rule ids.
                if let Some(pinned) = installed.pinned.take()
                    && pinned != *compiled
                {
                    synced.merge(self.rewrite(*id, &pinned, compiled));
                }
                continue;
            }
            match self.install(*id, compiled) {
                Ok(()) => synced.change(),
                Err(error) => {
                    failed.insert(*id);
                    synced.fail(error);
                }
            }
        }
        Installed { synced, failed }
    }

    /// Removes every policy that is not in `desired`, or that did not fit (`failed`).
    pub fn remove_unused(
        &mut self,
        desired: &BTreeMap<PolicyId, CompiledPolicy>,
        failed: &BTreeSet<PolicyId>,
    ) -> Synced {
        let unused: Vec<PolicyId> = self
            .ids()
            .filter(|id| !desired.contains_key(id) || failed.contains(id))
            .collect();
        let mut synced = Synced::default();
        for id in unused {
            self.remove(id);
            synced.change();
        }
        synced
    }

    /// How many entries, IPv4 prefixes and IPv6 prefixes the agent wrote.
    pub fn usage(&self) -> (usize, usize, usize) {
        self.installed
            .values()
            .fold((0, 0, 0), |(entries, cidrs_v4, cidrs_v6), policy| {
                (
                    entries + policy.entries.len(),
                    cidrs_v4 + policy.cidrs_v4.len(),
                    cidrs_v6 + policy.cidrs_v6.len(),
                )
            })
    }

    fn install(&mut self, id: PolicyId, compiled: &CompiledPolicy) -> Result<(), ApplyError> {
        let mut installed = InstalledPolicy::default();
        let result = self.write_policy(id, compiled, &mut installed);
        self.installed.insert(id, installed);
        if result.is_err() {
            self.remove(id);
        }
        result
    }

    /// Writes the prefixes, then the entries, of `compiled`, noting each key written in
    /// `installed`; stops at the first that does not fit.
    fn write_policy(
        &mut self,
        id: PolicyId,
        compiled: &CompiledPolicy,
        installed: &mut InstalledPolicy,
    ) -> Result<(), ApplyError> {
        let does_not_fit = |map, needed, source| ApplyError::PolicyDoesNotFit {
            id,
            map,
            needed,
            source,
        };
        for (prefix, class) in &compiled.cidrs {
            let class = CidrClass { peer: *class };
            let inserted = match map_keys::cidr_key(id, prefix) {
                CidrEntryKey::V4(prefix_len, data) => insert_prefix(
                    self.cidrs_v4.as_mut(),
                    Key::new(prefix_len, data),
                    class,
                    &mut installed.cidrs_v4,
                ),
                CidrEntryKey::V6(prefix_len, data) => insert_prefix(
                    self.cidrs_v6.as_mut(),
                    Key::new(prefix_len, data),
                    class,
                    &mut installed.cidrs_v6,
                ),
            };
            inserted
                .map_err(|source| does_not_fit(PolicyMap::Cidrs, compiled.cidrs.len(), source))?;
        }
        for (entry, decided) in &compiled.entries {
            let (prefix_len, data) = entry.key(id);
            let key = Key::new(prefix_len, data);
            self.entries.insert(&key, *decided).map_err(|source| {
                does_not_fit(PolicyMap::Entries, compiled.entries.len(), source)
            })?;
            installed.entries.push(key);
        }
        Ok(())
    }

    /// Makes pinned policy `id`, read back as `pinned`, hold `compiled`, which the compiler gave
    /// the same id because its shape is the same (see `Compiler::adopt_pinned_policies`): only
    /// the rule ids of entries differ, and each differing value is overwritten in place (one
    /// atomic update per entry, the verdict unchanged).
    fn rewrite(
        &mut self,
        id: PolicyId,
        pinned: &CompiledPolicy,
        compiled: &CompiledPolicy,
    ) -> Synced {
        let mut synced = Synced::default();
        if !pinned.same_shape(compiled) {
            synced.fail(ApplyError::PinnedIdReused { id });
            self.remove(id);
            if let Err(error) = self.install(id, compiled) {
                synced.fail(error);
            }
            synced.change();
            return synced;
        }
        for (entry, decided) in &compiled.entries {
            if pinned.entries.get(entry) == Some(decided) {
                continue;
            }
            let (prefix_len, data) = entry.key(id);
            match self.entries.insert(&Key::new(prefix_len, data), *decided) {
                Ok(()) => synced.change(),
                // The entry still allows; only its attribution is stale.
                Err(source) => synced.fail(ApplyError::RuleRewrite { id, source }),
            }
        }
        synced
    }

    fn remove(&mut self, id: PolicyId) {
        if let Some(installed) = self.installed.remove(&id) {
            for key in installed.entries {
                let _ = self.entries.remove(&key);
            }
            for key in installed.cidrs_v4 {
                let _ = self.cidrs_v4.remove(&key);
            }
            for key in installed.cidrs_v6 {
                let _ = self.cidrs_v6.remove(&key);
            }
        }
    }
}

/// Inserts one prefix into a CIDR trie and remembers its key, so the policy can be removed
/// without walking the trie.
fn insert_prefix<K: Pod>(
    trie: &mut dyn KeyedMap<Key<K>, CidrClass>,
    key: Key<K>,
    class: CidrClass,
    installed: &mut Vec<Key<K>>,
) -> Result<(), MapError> {
    trie.insert(&key, class)?;
    installed.push(key);
    Ok(())
}

/// Records a pinned CIDR trie entry (either family) under its policy: the block it holds, read
/// back from the key's prefix length past the policy id, and the class it maps to.
fn adopt_cidr(
    installed: &mut BTreeMap<PolicyId, InstalledPolicy>,
    policy: [u8; 4],
    key_prefix_len: u32,
    net: impl FnOnce(u8) -> Option<IpNet>,
    class: PeerId,
) -> &mut InstalledPolicy {
    let policy = installed.entry(u32::from_be_bytes(policy)).or_default();
    let prefix_len =
        u8::try_from(key_prefix_len.saturating_sub(CIDR_KEY_POLICY_BITS)).unwrap_or(u8::MAX);
    if let Some(net) = net(prefix_len) {
        policy
            .pinned
            .get_or_insert_default()
            .cidrs
            .insert(net, class);
    }
    policy
}
