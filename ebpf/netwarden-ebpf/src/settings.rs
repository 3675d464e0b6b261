//! What the agent tells the programs besides policy.
//!
//! Maps:
//!
//! - `EPOCH`: the policy epoch, bumped by the agent after every policy change; a tracked flow
//!   of an older epoch is decided again.
//! - `SETTINGS`: the agent's knobs, set at start (`SETTING_*` in `netwarden_common`).

use aya_ebpf::{macros::map, maps::Array};
use netwarden_common::{EPOCH_INDEX, SETTING_FRONTENDS_INSTALLED, maps};

#[map]
static EPOCH: Array<u32> = Array::pinned(maps::EPOCH.capacity, 0);
pinned_as!(EPOCH);

#[map]
static SETTINGS: Array<u32> = Array::pinned(maps::SETTINGS.capacity, 0);
pinned_as!(SETTINGS);

/// The setting at `index` (0 when unset).
#[inline(always)]
pub(crate) fn get(index: u32) -> u32 {
    SETTINGS.get(index).copied().unwrap_or(0)
}

/// Whether any Service frontend is installed (nothing is deferred to the hook after
/// translation otherwise).
#[inline(always)]
pub(crate) fn frontends_installed() -> bool {
    get(SETTING_FRONTENDS_INSTALLED) != 0
}

/// The policy epoch.
#[inline(always)]
pub(crate) fn current_epoch() -> u32 {
    EPOCH.get(EPOCH_INDEX).copied().unwrap_or(0)
}
