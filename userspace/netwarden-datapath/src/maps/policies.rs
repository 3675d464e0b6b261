//! `POLICY`, `CIDRS_V4` and `CIDRS_V6`, each trie with the hash beside it that takes its exact
//! entries where it has one (`POLICY_EXACT`, `CIDRS_V4_EXACT`): each compiled policy's entries
//! and `ipBlock` prefixes, under its id. An id's content never changes once this agent
//! installed it: a changed policy gets a new id, is written beside the old one, and the old
//! one is removed once no endpoint uses it (`apply.rs`), which is why this map is synced in
//! two steps.

use std::collections::{BTreeMap, BTreeSet};

use aya::{
    Pod,
    maps::{HashMap as BpfHashMap, LpmTrie, MapData, MapError, lpm_trie::Key},
    sys::SyscallError,
};
use ipnet::IpNet;
use netwarden_common::{
    CIDR_KEY_POLICY_BITS, CIDR_KEY_V4_FULL_BITS, CidrClass, CidrKey, CidrKeyV4,
    POLICY_KEY_FULL_BITS, PeerId, PolicyEntry, PolicyKey,
};
use netwarden_policy::{
    CompiledPolicy, PolicyId, PolicyMatch,
    map_keys::{self, CidrEntryKey},
};

use super::{Keyed, KeyedMap, Synced};
use crate::error::{ApplyError, PolicyMap};

/// The pinned maps [`Policies`] writes.
pub(crate) struct PolicyTables {
    pub entries_exact: BpfHashMap<MapData, PolicyKey, PolicyEntry>,
    pub entries: LpmTrie<MapData, PolicyKey, PolicyEntry>,
    pub cidrs_v4_exact: BpfHashMap<MapData, CidrKeyV4, CidrClass>,
    pub cidrs_v4: LpmTrie<MapData, CidrKeyV4, CidrClass>,
    pub cidrs_v6: LpmTrie<MapData, CidrKey, CidrClass>,
}

/// Which hashes of exact entries are written (a hash sized to no entries is not).
#[derive(Clone, Copy)]
pub(crate) struct ExactWritten {
    pub entries: bool,
    pub cidrs_v4: bool,
}

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

/// A trie and the hash beside it that takes its exact entries (`POLICY` with `POLICY_EXACT`,
/// `CIDRS_V4` with `CIDRS_V4_EXACT`), written as one map of the trie's keys: an entry that
/// leaves nothing of its key out (a prefix of `full_bits`) goes to the hash while it has room,
/// any other to the trie. The programs ask the hash first and the trie on a miss
/// (`ebpf/netwarden-ebpf/src/policy.rs` says why that is the longest match), so where an exact
/// entry lies changes no decision.
struct ExactFirst<K, V> {
    exact: Keyed<K, V>,
    /// Whether the hash is written (its capacity above 0); read back and removed from
    /// whatever its size.
    exact_written: bool,
    trie: Keyed<Key<K>, V>,
    full_bits: u32,
}

impl<K: Pod + Send, V: Pod + Send> ExactFirst<K, V> {
    fn new(
        exact: BpfHashMap<MapData, K, V>,
        exact_written: bool,
        trie: LpmTrie<MapData, K, V>,
        full_bits: u32,
    ) -> Self {
        Self {
            exact: Box::new(exact),
            exact_written,
            trie: Box::new(trie),
            full_bits,
        }
    }

    /// The hash's entries, keyed as the trie would hold them.
    fn exact_entries(
        exact: &BpfHashMap<MapData, K, V>,
        full_bits: u32,
    ) -> impl Iterator<Item = (Key<K>, V)> + '_ {
        exact
            .iter()
            .flatten()
            .map(move |(key, value)| (Key::new(full_bits, key), value))
    }
}

impl<K: Pod + Send, V: Pod + Send> KeyedMap<Key<K>, V> for ExactFirst<K, V> {
    fn insert(&mut self, key: &Key<K>, value: V) -> Result<(), MapError> {
        if self.exact_written && key.prefix_len() == self.full_bits {
            let exact = key.data();
            match self.exact.insert(&exact, value) {
                Ok(()) => return Ok(()),
                // Full: the trie takes it. A value the hash held before must not shadow the
                // trie's new one: it goes, or the write fails.
                Err(error) => match self.exact.remove(&exact) {
                    Ok(()) => {}
                    Err(gone) if not_found(&gone) => {}
                    Err(_) => return Err(error),
                },
            }
        }
        self.trie.insert(key, value)
    }

    fn remove(&mut self, key: &Key<K>) -> Result<(), MapError> {
        // An exact key may be in either map (the trie when the hash was full), or in both
        // when the hash had room again for a rewrite: it leaves both.
        let from_exact = if key.prefix_len() == self.full_bits {
            self.exact.remove(&key.data())
        } else {
            Ok(())
        };
        let from_trie = self.trie.remove(key);
        match (from_exact, from_trie) {
            (Err(error), _) | (_, Err(error)) if !not_found(&error) => Err(error),
            _ => Ok(()),
        }
    }
}

/// Whether a map write failed only because the key was not there.
fn not_found(error: &MapError) -> bool {
    match error {
        MapError::KeyNotFound => true,
        MapError::SyscallError(SyscallError { io_error, .. }) => {
            io_error.kind() == std::io::ErrorKind::NotFound
        }
        _ => false,
    }
}

impl Policies {
    /// Takes over the pinned maps and reads back every policy they hold.
    pub fn adopt(tables: PolicyTables, exact_written: ExactWritten) -> Self {
        let PolicyTables {
            entries_exact,
            entries,
            cidrs_v4_exact,
            cidrs_v4,
            cidrs_v6,
        } = tables;
        let mut installed: BTreeMap<PolicyId, InstalledPolicy> = BTreeMap::new();
        let exact_entries = ExactFirst::exact_entries(&entries_exact, POLICY_KEY_FULL_BITS);
        for (key, value) in entries.iter().flatten().chain(exact_entries) {
            let (id, entry) = PolicyMatch::from_key(key.prefix_len(), &key.data());
            let policy = installed.entry(id).or_default();
            policy
                .pinned
                .get_or_insert_default()
                .entries
                .insert(entry, value);
            policy.entries.push(key);
        }
        let exact_cidrs_v4 = ExactFirst::exact_entries(&cidrs_v4_exact, CIDR_KEY_V4_FULL_BITS);
        for (key, class) in cidrs_v4.iter().flatten().chain(exact_cidrs_v4) {
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
            entries: Box::new(ExactFirst::new(
                entries_exact,
                exact_written.entries,
                entries,
                POLICY_KEY_FULL_BITS,
            )),
            cidrs_v4: Box::new(ExactFirst::new(
                cidrs_v4_exact,
                exact_written.cidrs_v4,
                cidrs_v4,
                CIDR_KEY_V4_FULL_BITS,
            )),
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

#[cfg(test)]
mod tests {
    use aya::maps::lpm_trie::Key;
    use netwarden_common::{POLICY_KEY_FULL_BITS, PolicyEntry, PolicyKey, TierMatch};

    use super::{ExactFirst, KeyedMap as _};
    use crate::maps::recording::{Content, Recorder};

    /// A hash of exact entries with room for one, beside an unbounded trie, and what each holds.
    fn tables(exact_written: bool) -> (ExactFirst<PolicyKey, PolicyEntry>, Content, Content) {
        let recorder = Recorder::default();
        let (exact, in_exact) = recorder.keyed("exact", 1, |key: &PolicyKey| {
            u16::from_be_bytes(key.port).to_string()
        });
        let (trie, in_trie) = recorder.keyed("trie", usize::MAX, |key: &Key<PolicyKey>| {
            format!(
                "{}/{}",
                u16::from_be_bytes(key.data().port),
                key.prefix_len()
            )
        });
        let tables = ExactFirst {
            exact,
            exact_written,
            trie,
            full_bits: POLICY_KEY_FULL_BITS,
        };
        (tables, in_exact, in_trie)
    }

    fn key(port: u16, prefix_len: u32) -> Key<PolicyKey> {
        Key::new(prefix_len, PolicyKey::new(7, 9, 6, port))
    }

    fn keys(content: &Content) -> Vec<String> {
        content.entries().into_keys().collect()
    }

    const ENTRY: PolicyEntry = PolicyEntry {
        admin: TierMatch::NONE,
        below: TierMatch::NONE,
    };

    #[test]
    fn exact_entries_fill_the_hash_then_the_trie_and_leave_both() {
        let (mut tables, in_exact, in_trie) = tables(true);
        let full = POLICY_KEY_FULL_BITS;
        tables.insert(&key(80, full), ENTRY).expect("into the hash");
        // The hash is full: the trie takes the next exact entry, as it takes a port range.
        tables.insert(&key(81, full), ENTRY).expect("into the trie");
        tables
            .insert(&key(8000, full - 3), ENTRY)
            .expect("into the trie");
        assert_eq!(keys(&in_exact), ["80"]);
        assert_eq!(keys(&in_trie), ["8000/85", "81/88"]);

        tables.remove(&key(80, full)).expect("removed");
        tables.remove(&key(81, full)).expect("removed");
        tables.remove(&key(8000, full - 3)).expect("removed");
        assert!(keys(&in_exact).is_empty());
        assert!(keys(&in_trie).is_empty());
    }

    #[test]
    fn a_hash_sized_to_nothing_leaves_every_entry_to_the_trie() {
        let (mut tables, in_exact, in_trie) = tables(false);
        tables
            .insert(&key(80, POLICY_KEY_FULL_BITS), ENTRY)
            .expect("into the trie");
        assert!(keys(&in_exact).is_empty());
        assert_eq!(keys(&in_trie), ["80/88"]);
    }
}
