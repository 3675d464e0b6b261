//! Stable ids for compiled policies and rules.
//!
//! Equal content gets the same policy id, so the endpoints of a node share their compiled
//! policies; an id is never reused by one compiler, so an endpoint moves from one policy to the
//! next with one map write. Rule ids derive from where the rule comes from, so a restarted
//! agent numbers rules as its predecessor did.

use std::collections::{BTreeMap, BTreeSet};

use rustc_hash::FxHashMap;

use crate::state::{CompiledPolicy, PolicyId, PolicyShape, RULE_ID_MASK, RuleId, RuleOrigin};

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
#[derive(Clone, Debug, Default)]
pub(crate) struct PolicyIds {
    by_content: FxHashMap<CompiledPolicy, PolicyId>,
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
        if let Some(id) = self.by_content.get(&compiled) {
            *self.users.entry(*id).or_default() += 1;
            return (*id, false);
        }
        let id = self.pinned.take(&compiled).unwrap_or_else(|| {
            self.highest += 1;
            self.highest
        });
        policies.insert(id, compiled.clone());
        self.by_content.insert(compiled, id);
        self.users.insert(id, 1);
        (id, true)
    }

    /// One user fewer of policy `id`; the last one removes it from `policies`, and it is
    /// returned.
    pub(crate) fn release(
        &mut self,
        id: PolicyId,
        policies: &mut BTreeMap<PolicyId, CompiledPolicy>,
    ) -> Option<CompiledPolicy> {
        let users = self.users.get_mut(&id)?;
        *users -= 1;
        if *users > 0 {
            return None;
        }
        self.users.remove(&id);
        let compiled = policies.remove(&id)?;
        self.by_content.remove(&compiled);
        Some(compiled)
    }
}

/// Rule ids by origin, with how many compiled policies name each.
///
/// The rule table holds exactly the rules some policy's entries name (attribution only ever
/// looks up those): a rule is given its id when it is compiled, and forgotten at the end of
/// the update once no policy names it (its policy was deleted, changed, or selects no local
/// pod any more; or the rule allowed nothing). Otherwise the table would grow with every
/// policy that ever existed, and differ from what a restarted agent compiles.
#[derive(Clone, Debug, Default)]
pub(crate) struct RuleIds {
    by_origin: FxHashMap<RuleOrigin, RuleId>,
    /// For each rule some policy names, how many policies do.
    users: FxHashMap<RuleId, usize>,
    /// Rules that may have no user left: given an id, or last named by a released policy.
    maybe_unused: Vec<RuleId>,
}

impl RuleIds {
    /// The id of the rule at `origin`, recording it in `rules` when it is new.
    pub(crate) fn id(
        &mut self,
        origin: RuleOrigin,
        rules: &mut BTreeMap<RuleId, RuleOrigin>,
    ) -> RuleId {
        if let Some(id) = self.by_origin.get(&origin) {
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
        rules.insert(id, origin);
        self.maybe_unused.push(id);
        id
    }

    /// A new compiled policy names the rules of its entries.
    pub(crate) fn hold(&mut self, policy: &CompiledPolicy) {
        for id in rules_named(policy) {
            *self.users.entry(id).or_default() += 1;
        }
    }

    /// A removed compiled policy no longer names the rules of its entries.
    pub(crate) fn let_go(&mut self, policy: &CompiledPolicy) {
        for id in rules_named(policy) {
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

/// The rules a compiled policy's entries name, each once.
fn rules_named(policy: &CompiledPolicy) -> BTreeSet<RuleId> {
    policy
        .entries
        .values()
        .flat_map(|decided| [decided.admin.rule, decided.below.rule])
        .filter(|rule| *rule != 0)
        .collect()
}
