//! Stable ids for compiled policies and rules.
//!
//! Equal content gets the same policy id, so the endpoints of a node share their compiled
//! policies; an id is never reused by one compiler, so an endpoint moves from one policy to the
//! next with one map write. Rule ids derive from where the rule comes from, so a restarted
//! agent numbers rules as its predecessor did.

use std::{
    collections::{BTreeMap, BTreeSet},
    hash::{Hash, Hasher as _},
};

use netwarden_common::PolicyEntry;
use rustc_hash::{FxHashMap, FxHasher};

use crate::state::{
    CompiledPolicy, PolicyId, PolicyMatch, PolicyShape, RULE_ID_MASK, RuleId, RuleOrigin,
};

/// Policies a previous agent left in the maps, offered to the first compilation so that an
/// unchanged policy keeps its id and its entries (see [`crate::Compiler::adopt_pinned_policies`]).
#[derive(Clone, Debug, Default)]
struct PinnedPolicies {
    /// By exact content, rule ids included.
    exact: FxHashMap<CompiledPolicy, PolicyId>,
    /// By shape, for content that differs only in rule ids.
    by_shape: FxHashMap<PolicyShape, BTreeSet<PolicyId>>,
    /// Every pinned policy's content, by id.
    content: BTreeMap<PolicyId, CompiledPolicy>,
}

impl PinnedPolicies {
    /// Takes the pinned id for `compiled`, preferring one of equal content: each pinned id is
    /// given to one compiled policy at most.
    fn take(&mut self, compiled: &CompiledPolicy) -> Option<PolicyId> {
        // Nothing pinned (every compilation but a restarted agent's first): no shape to
        // compute, which copies the whole content.
        if self.content.is_empty() {
            return None;
        }
        let id = match self.exact.get(compiled) {
            Some(id) => *id,
            None => *self.by_shape.get(&compiled.shape())?.first()?,
        };
        let pinned = self.content.remove(&id)?;
        self.exact.remove(&pinned);
        if let Some(ids) = self.by_shape.get_mut(&pinned.shape()) {
            ids.remove(&id);
        }
        Some(id)
    }
}

/// Compiled policies by content, with how many endpoint directions use each.
///
/// Content is found by its [`ContentDigest`], which a change of a few entries updates without
/// reading the rest, and compared in full only on a digest match; the content itself is kept
/// once, in the state's policies.
#[derive(Clone, Debug, Default)]
pub(crate) struct PolicyIds {
    by_digest: FxHashMap<ContentDigest, Vec<PolicyId>>,
    digests: FxHashMap<PolicyId, ContentDigest>,
    users: FxHashMap<PolicyId, usize>,
    /// The highest id handed out or found pinned; the next new policy gets the one above.
    highest: PolicyId,
    pinned: PinnedPolicies,
}

impl PolicyIds {
    /// New ids start above `id`.
    pub(crate) fn start_above(&mut self, id: PolicyId) {
        self.highest = self.highest.max(id);
    }

    /// Offers pinned policies to the next compilation (see
    /// [`crate::Compiler::adopt_pinned_policies`]).
    pub(crate) fn adopt_pinned(
        &mut self,
        pinned: impl IntoIterator<Item = (PolicyId, CompiledPolicy)>,
    ) {
        for (id, content) in pinned {
            self.start_above(id);
            self.pinned
                .by_shape
                .entry(content.shape())
                .or_default()
                .insert(id);
            self.pinned.exact.entry(content.clone()).or_insert(id);
            self.pinned.content.insert(id, content);
        }
    }

    /// Forgets the pinned policies no compilation claimed.
    pub(crate) fn forget_pinned(&mut self) {
        self.pinned = PinnedPolicies::default();
    }

    /// The id of `compiled`, adding it to `policies` when it is new; and whether it is.
    pub(crate) fn acquire(
        &mut self,
        compiled: CompiledPolicy,
        policies: &mut BTreeMap<PolicyId, CompiledPolicy>,
    ) -> (PolicyId, bool) {
        let digest = ContentDigest::of(&compiled);
        self.acquire_digested(compiled, digest, 1, policies)
    }

    /// [`PolicyIds::acquire`] for `users` endpoint directions at once, of content whose digest
    /// the caller has (see [`PolicyIds::digest`]).
    pub(crate) fn acquire_digested(
        &mut self,
        compiled: CompiledPolicy,
        digest: ContentDigest,
        users: usize,
        policies: &mut BTreeMap<PolicyId, CompiledPolicy>,
    ) -> (PolicyId, bool) {
        debug_assert_eq!(digest, ContentDigest::of(&compiled));
        debug_assert!(users > 0, "acquired for someone");
        let same_digest = self.by_digest.entry(digest).or_default();
        if let Some(id) = same_digest.iter().find(|id| policies[*id] == compiled) {
            *self.users.entry(*id).or_default() += users;
            return (*id, false);
        }
        let id = self.pinned.take(&compiled).unwrap_or_else(|| {
            self.highest += 1;
            self.highest
        });
        same_digest.push(id);
        policies.insert(id, compiled);
        self.digests.insert(id, digest);
        self.users.insert(id, users);
        (id, true)
    }

    /// The digest of policy `id`'s content.
    pub(crate) fn digest(&self, id: PolicyId) -> ContentDigest {
        self.digests[&id]
    }

    /// How many endpoint directions use policy `id`.
    pub(crate) fn users(&self, id: PolicyId) -> usize {
        self.users.get(&id).copied().unwrap_or(0)
    }

    /// One user fewer of policy `id`; the last one removes it from `policies`, and it is
    /// returned.
    pub(crate) fn release(
        &mut self,
        id: PolicyId,
        policies: &mut BTreeMap<PolicyId, CompiledPolicy>,
    ) -> Option<CompiledPolicy> {
        self.release_users(id, 1, policies)
    }

    /// [`PolicyIds::release`] for `count` users at once.
    pub(crate) fn release_users(
        &mut self,
        id: PolicyId,
        count: usize,
        policies: &mut BTreeMap<PolicyId, CompiledPolicy>,
    ) -> Option<CompiledPolicy> {
        let users = self.users.get_mut(&id)?;
        debug_assert!(*users >= count, "released by its users only");
        *users = users.saturating_sub(count);
        if *users > 0 {
            return None;
        }
        self.users.remove(&id);
        if let Some(digest) = self.digests.remove(&id)
            && let Some(ids) = self.by_digest.get_mut(&digest)
        {
            ids.retain(|other| *other != id);
            if ids.is_empty() {
                self.by_digest.remove(&digest);
            }
        }
        policies.remove(&id)
    }
}

/// A digest of a compiled policy's content: the wrapping sum of its entries' and prefixes'
/// hashes, so that adding or removing a few entries updates it in their time, not the policy's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub(crate) struct ContentDigest(u64);

impl ContentDigest {
    /// The digest of `policy`.
    pub(crate) fn of(policy: &CompiledPolicy) -> Self {
        let mut digest = Self::default();
        for (entry, decided) in &policy.entries {
            digest.add(entry, decided);
        }
        for prefix in &policy.cidrs {
            digest.0 = digest.0.wrapping_add(spread(&prefix));
        }
        digest
    }

    /// Counts one more entry.
    pub(crate) fn add(&mut self, entry: &PolicyMatch, decided: &PolicyEntry) {
        self.0 = self.0.wrapping_add(spread(&(entry, decided)));
    }

    /// Counts one entry fewer.
    pub(crate) fn remove(&mut self, entry: &PolicyMatch, decided: &PolicyEntry) {
        self.0 = self.0.wrapping_sub(spread(&(entry, decided)));
    }
}

/// A hash of `value` whose bits are all mixed: summed, `FxHash`'s weak low bits would collide.
fn spread(value: &impl Hash) -> u64 {
    let mut hasher = FxHasher::default();
    value.hash(&mut hasher);
    // The 64-bit finaliser of MurmurHash3.
    let mut mixed = hasher.finish();
    mixed ^= mixed >> 33;
    mixed = mixed.wrapping_mul(0xff51_afd7_ed55_8ccd);
    mixed ^= mixed >> 33;
    mixed = mixed.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    mixed ^ mixed >> 33
}

/// Rule ids by origin, with how many entries of compiled policies name each.
///
/// The rule table holds exactly the rules some policy's entries name (attribution only ever
/// looks up those): a rule is given its id when it is compiled, and forgotten at the end of
/// the update once no policy names it (its policy was deleted, changed, or selects no local
/// pod any more; or the rule allowed nothing). Otherwise the table would grow with every
/// policy that ever existed, and differ from what a restarted agent compiles.
#[derive(Clone, Debug, Default)]
pub(crate) struct RuleIds {
    by_origin: FxHashMap<RuleOrigin, RuleId>,
    /// For each rule some policy names, how many entries of the policies do: counted by entry,
    /// so that a policy that replaces another with a few entries changed counts only those.
    users: FxHashMap<RuleId, usize>,
    /// Rules that may have no user left: given an id, or last named by a released policy.
    maybe_unused: Vec<RuleId>,
}

impl RuleIds {
    /// The id of the rule at `origin`, recording it in `rules` when it is new.
    pub(crate) fn id(
        &mut self,
        origin: &RuleOrigin,
        rules: &mut BTreeMap<RuleId, RuleOrigin>,
    ) -> RuleId {
        if let Some(id) = self.by_origin.get(origin) {
            return *id;
        }
        // Derived from the origin, not from the order rules were met: a restarted agent numbers
        // each rule as its predecessor did, so the entries it finds pinned are already its own.
        // A collision (rare: 31 bits) takes the next free number.
        let mut id = origin.stable_id();
        while rules.contains_key(&id) {
            id = (id % RULE_ID_MASK) + 1;
        }
        self.by_origin.insert(origin.clone(), id);
        rules.insert(id, origin.clone());
        self.maybe_unused.push(id);
        id
    }

    /// A new compiled policy names the rules of its entries.
    pub(crate) fn hold(&mut self, policy: &CompiledPolicy) {
        self.hold_entries(policy.entries.values());
    }

    /// A removed compiled policy no longer names the rules of its entries.
    pub(crate) fn let_go(&mut self, policy: &CompiledPolicy) {
        self.let_go_entries(policy.entries.values());
    }

    /// New policy entries name their rules.
    pub(crate) fn hold_entries<'e>(&mut self, entries: impl IntoIterator<Item = &'e PolicyEntry>) {
        for id in entries.into_iter().flat_map(rules_named) {
            *self.users.entry(id).or_default() += 1;
        }
    }

    /// Removed policy entries no longer name their rules.
    pub(crate) fn let_go_entries<'e>(
        &mut self,
        entries: impl IntoIterator<Item = &'e PolicyEntry>,
    ) {
        for id in entries.into_iter().flat_map(rules_named) {
            if let Some(users) = self.users.get_mut(&id) {
                *users -= 1;
                if *users == 0 {
                    self.users.remove(&id);
                    self.maybe_unused.push(id);
                }
            }
        }
    }

    /// Removes from `rules` every rule no policy names.
    pub(crate) fn drop_unused(&mut self, rules: &mut BTreeMap<RuleId, RuleOrigin>) {
        for id in std::mem::take(&mut self.maybe_unused) {
            if !self.users.contains_key(&id)
                && let Some(origin) = rules.remove(&id)
            {
                self.by_origin.remove(&origin);
            }
        }
    }
}

/// The rules a policy entry names: up to one a tier.
fn rules_named(decided: &PolicyEntry) -> impl Iterator<Item = RuleId> {
    [decided.admin.rule, decided.below.rule]
        .into_iter()
        .filter(|rule| *rule != 0)
}
