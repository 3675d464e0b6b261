//! netwarden's datapath in the kernel, seen from userspace.
//!
//! [`Datapath::open`] loads the TC programs, adopting the maps and links a previous agent
//! pinned; [`Datapath::apply`] makes the maps and attachments match a compiled
//! [`DatapathState`], in an order that never lets a packet see a half-written policy (stated
//! and tested in `apply.rs`).
//!
//! - `loader`: loading the programs against the pinned maps and reading back what they hold;
//! - `maps`: one module per map the agent keeps in step, each owning what it installed;
//! - `attach`: attaching, detaching and adopting the programs' links, and the hook after
//!   translation;
//! - `apply`: the order of all that;
//! - `usage`: how full the maps are, and the verdict counters;
//! - [`conntrack`], [`mtls`], [`netfilter`], [`netlink`], [`upgrade`], [`bpffs`]: the conntrack
//!   sweeper, the mTLS maps, the hook after translation's loader, the node's network, pins of
//!   older builds, and the bpf filesystem.

mod apply;
mod attach;
pub mod bpffs;
pub mod conntrack;
mod desired;
mod error;
#[cfg(feature = "test-support")]
pub mod faults;
mod loader;
mod maps;
pub mod mtls;
pub mod netfilter;
pub mod netlink;
mod report;
#[cfg(feature = "test-support")]
mod test_support;
pub mod upgrade;
mod usage;

use std::path::Path;

use aya::maps::{MapData, PerCpuArray, RingBuf};
use netwarden_common::SETTING_ALLOW_EVENT_PERIOD;
use netwarden_policy::DatapathState;

#[cfg(feature = "test-support")]
pub use crate::test_support::{TrackedFlows, VerifiedInstructionsError};
use crate::{apply::Enforcer, loader::Kernel, netlink::NodeNetwork};
pub use crate::{
    attach::{TranslationHook, clsact_placement},
    error::{ApplyError, AttachError, AttachFailure, DatapathError, PolicyMap},
    loader::{CONNTRACK_ENTRIES, Capacity, Inherited},
    report::{ApplyReport, EndpointReport, EndpointState, Unenforced, UnenforcedEndpoint},
    usage::{MapUsage, VerdictCounters},
};

/// The loaded programs, their maps, and what the maps hold.
pub struct Datapath {
    kernel: Kernel,
    enforcer: Enforcer,
    verdicts: PerCpuArray<MapData, u64>,
    events: Option<RingBuf<MapData>>,
    capacity: Capacity,
}

impl Datapath {
    /// Loads the programs with maps pinned under `bpffs` (adopting existing pins) and reads
    /// back what the maps hold.
    pub fn open(bpffs: &Path, capacity: &Capacity) -> Result<(Self, Inherited), DatapathError> {
        let loader::Opened {
            kernel,
            maps,
            verdicts,
            events,
            inherited,
        } = loader::open(bpffs, capacity)?;
        let datapath = Self {
            kernel,
            enforcer: Enforcer::new(maps),
            verdicts,
            events: Some(events),
            capacity: capacity.clone(),
        };
        Ok((datapath, inherited))
    }

    /// Makes the maps and attachments enforce `state` on the interfaces found in `network`.
    pub fn apply(&mut self, state: &DatapathState, network: &NodeNetwork) -> ApplyReport {
        self.enforcer.apply(&mut self.kernel, state, network)
    }

    /// Loads the hook after translation and attaches it to this network namespace's
    /// netfilter (`POSTROUTING` and `LOCAL_IN`, after source NAT), replacing a previous agent's.
    /// Until it is attached no flow is deferred to it; on a kernel without netfilter BPF
    /// links (Linux < 6.4) or BTF, flows to Services are judged on the Service's address.
    pub fn attach_translation_hook(&mut self) -> Result<(), netfilter::NetfilterError> {
        self.enforcer.translation.attach(&mut self.kernel)
    }

    /// Attaches the hook after translation (see [`Datapath::attach_translation_hook`]) at the end
    /// of the next apply, once every map it reads is written: an upgrade whose loader created
    /// a map afresh never lets the new hook decide on an empty map. A previous agent's hook
    /// keeps deciding, with the maps it was loaded with, until then.
    pub fn attach_translation_hook_after_fill(&mut self) {
        self.enforcer.translation = TranslationHook::AfterFill;
    }

    /// Whether the hook after translation is attached, or why not.
    #[must_use]
    pub fn translation_hook(&self) -> &TranslationHook {
        &self.enforcer.translation
    }

    /// The ring buffer of deny events (`netwarden_common::VerdictEvent`), once: the caller
    /// reads it on its own task.
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }

    /// How many new allowed flows the programs report as events: 0 none, 1 every one, N about
    /// one in N.
    pub fn set_allow_event_period(&mut self, period: u32) -> Result<(), DatapathError> {
        self.enforcer
            .maps
            .settings
            .set(SETTING_ALLOW_EVENT_PERIOD, period)
            .map_err(|source| DatapathError::Map {
                name: netwarden_common::maps::SETTINGS.name,
                source,
            })
    }

    /// Verdict counters summed over CPUs, indexed by [`netwarden_common::counter::slot`]
    /// (direction, reason).
    #[must_use]
    pub fn verdicts(&self) -> Vec<u64> {
        usage::sum_counters(&self.verdicts)
    }

    /// A second handle on the verdict counters, opened from their pin, for a reader on another
    /// task (the metrics endpoint reads them when it is scraped, not when the agent applies).
    pub fn verdict_counters(&self) -> Result<VerdictCounters, DatapathError> {
        const NAME: &str = netwarden_common::maps::VERDICTS.name;
        let data = MapData::from_pin(self.kernel.layout.maps().join(NAME))
            .map_err(|source| DatapathError::Map { name: NAME, source })?;
        let map = PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data))
            .map_err(|source| DatapathError::Map { name: NAME, source })?;
        Ok(VerdictCounters { map })
    }

    /// How full each map is, as far as the agent knows without walking the kernel's maps: the
    /// entries it wrote. Connection tracking is filled by the programs, so only its capacity is
    /// known.
    #[must_use]
    pub fn map_usage(&self) -> Vec<MapUsage> {
        usage::map_usage(&self.enforcer.maps, &self.capacity)
    }
}
