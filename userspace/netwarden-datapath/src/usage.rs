//! How full the maps are, and the verdict counters: what the agent's metrics read.

use aya::maps::{MapData, PerCpuArray};
use netwarden_common::{counter, maps as pinned};

use crate::{conntrack, loader::Capacity, maps::SyncedMaps};

/// How full one map is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapUsage {
    /// The map's name, as pinned.
    pub map: &'static str,
    /// Entries written by the agent; `None` for a map the programs fill.
    pub entries: Option<usize>,
    /// Its `max_entries`.
    pub capacity: u32,
}

/// How full each map is, as far as the agent knows without walking the kernel's maps: the
/// entries it wrote. Connection tracking is filled by the programs, so only its capacity is
/// known.
pub(crate) fn map_usage(maps: &SyncedMaps, capacity: &Capacity) -> Vec<MapUsage> {
    let (entries, cidrs_v4, cidrs_v6) = maps.policies.usage();
    vec![
        MapUsage {
            map: pinned::ENDPOINTS.name,
            entries: Some(maps.endpoints.installed().len()),
            capacity: capacity.endpoints,
        },
        MapUsage {
            map: pinned::ENDPOINT_ADDRESSES.name,
            entries: Some(maps.addresses.len()),
            // As the programs declare it (not configurable: four addresses for each of the
            // default 4,096 endpoints).
            capacity: pinned::ENDPOINT_ADDRESSES.capacity,
        },
        MapUsage {
            map: pinned::IPCACHE.name,
            entries: Some(maps.ipcache.len()),
            capacity: capacity.ipcache,
        },
        MapUsage {
            // With the hash that takes its exact entries.
            map: pinned::POLICY.name,
            entries: Some(entries),
            capacity: capacity.policy + capacity.exact_policy(),
        },
        MapUsage {
            // With the hash that takes its single addresses.
            map: pinned::CIDRS_V4.name,
            entries: Some(cidrs_v4),
            capacity: capacity.cidrs + capacity.exact_cidrs_v4(),
        },
        MapUsage {
            map: pinned::CIDRS_V6.name,
            entries: Some(cidrs_v6),
            capacity: capacity.cidrs,
        },
        MapUsage {
            map: conntrack::TABLE_V4,
            entries: None,
            capacity: capacity.conntrack,
        },
        MapUsage {
            map: conntrack::TABLE_V6,
            entries: None,
            capacity: capacity.conntrack,
        },
    ]
}

/// The datapath's per-CPU verdict counters, readable from any task.
pub struct VerdictCounters {
    pub(crate) map: PerCpuArray<MapData, u64>,
}

impl VerdictCounters {
    /// The counters summed over CPUs, indexed by [`counter::slot`].
    #[must_use]
    pub fn read(&self) -> Vec<u64> {
        sum_counters(&self.map)
    }
}

/// Every verdict counter summed over CPUs, indexed by [`counter::slot`].
pub(crate) fn sum_counters(map: &PerCpuArray<MapData, u64>) -> Vec<u64> {
    (0..counter::SLOTS)
        .map(|index| map.get(&index, 0).map_or(0, |values| values.iter().sum()))
        .collect()
}
