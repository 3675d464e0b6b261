//! Expiry of tracked flows.
//!
//! The programs never read a clock: on a tracked flow's packet they set activity bits
//! ([`flow_flags`]) when one is missing. The sweeper walks the table every `interval`, clears
//! `SEEN` on flows that had traffic, and counts the sweeps a flow spent without any; a flow is
//! removed once that idle time reaches the timeout for its state:
//!
//! | state | timeout (default) |
//! |---|---|
//! | TCP after a FIN or RST | `closing` (10 s) |
//! | never answered (no packet the other way) | `unreplied` (60 s) |
//! | TCP, answered | `tcp_established` (6 h) |
//! | UDP, SCTP and other protocols, answered | `other` (60 s) |
//!
//! Removing a flow never opens anything: its next packet is decided again from scratch, and
//! for TCP only a SYN may create a new entry. The LRU map still evicts the least recently used
//! flow when it is full, whatever the sweeper does.
//!
//! Flows the mTLS screen or the identity check marked (`FlowState::flags` not zero: awaiting a
//! ClientHello, or cut) are never written back: the screen and the identity check own those
//! bits, and a write from a stale read could undo a cut. They are aged here instead and
//! removed `other` (60 s) after the sweeper first saw them; the kernel then drops any payload
//! to a strict pod that conntrack does not know, so removal does not reopen a cut. Writers in
//! this process (the sweeper, the identity check's cutter) take [`CONNTRACK_WRITES`] around
//! each read-modify-write.

use std::{collections::HashMap, path::Path, sync::Mutex, time::Duration};

use aya::maps::{HashMap as BpfHashMap, MapData, MapError};
use netwarden_common::{FlowKey, FlowState, flow_activity};

use crate::{DatapathError, bpffs::PinLayout};

const IPPROTO_TCP: u8 = 6;

/// Held by every read-modify-write of a conntrack entry from this process, so that one never
/// overwrites another's bits with a stale copy.
pub static CONNTRACK_WRITES: Mutex<()> = Mutex::new(());
const NAME: &str = "CONNTRACK";
/// `BPF_EXIST`: update only an entry that is still there.
const BPF_EXIST: u64 = 2;

/// Idle timeouts by flow state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP flows that saw a FIN or RST.
    pub closing: Duration,
    /// Flows with no packet in the reverse direction yet.
    pub unreplied: Duration,
    /// Answered TCP flows.
    pub tcp_established: Duration,
    /// Answered flows of every other protocol.
    pub other: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            closing: Duration::from_secs(10),
            unreplied: Duration::from_mins(1),
            tcp_established: Duration::from_hours(6),
            other: Duration::from_mins(1),
        }
    }
}

impl Timeouts {
    /// The idle time after which a flow in `state` of `protocol` is removed.
    #[must_use]
    pub fn for_flow(&self, protocol: u8, state: &FlowState) -> Duration {
        if state.activity & flow_activity::CLOSING != 0 {
            self.closing
        } else if state.activity & flow_activity::REPLIED == 0 {
            self.unreplied
        } else if protocol == IPPROTO_TCP {
            self.tcp_established
        } else {
            self.other
        }
    }
}

/// What one sweep did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Flows in the table when the sweep started.
    pub flows: usize,
    /// Flows removed for being idle past their timeout.
    pub expired: usize,
    /// Entries that could not be read back or written (changed under the sweep).
    pub skipped: usize,
}

/// The conntrack table opened from its pin, for a sweeper on a thread of its own.
pub struct Sweeper {
    map: BpfHashMap<MapData, FlowKey, FlowState>,
    interval: Duration,
    timeouts: Timeouts,
    /// Sweeps that found each screened or cut flow (never written back, so aged here).
    marked: HashMap<FlowKey, u32>,
}

impl Sweeper {
    /// Opens the pinned conntrack map under `bpffs`; the sweeper will be called every
    /// `interval`.
    pub fn open(
        bpffs: &Path,
        interval: Duration,
        timeouts: Timeouts,
    ) -> Result<Self, DatapathError> {
        let path = PinLayout::new(bpffs).maps().join(NAME);
        let data =
            MapData::from_pin(&path).map_err(|source| DatapathError::Map { name: NAME, source })?;
        let map = BpfHashMap::try_from(aya::maps::Map::LruHashMap(data))
            .map_err(|source| DatapathError::Map { name: NAME, source })?;
        Ok(Self {
            map,
            interval,
            timeouts,
            marked: HashMap::new(),
        })
    }

    /// The interval the sweeper was opened with.
    #[must_use]
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// One pass over the table.
    pub fn sweep(&mut self) -> SweepReport {
        // Keys first: the table changes under the walk, and a walk that deletes as it goes
        // may restart or skip.
        let keys: std::collections::HashSet<FlowKey> =
            self.map.keys().filter_map(Result::ok).collect();
        let mut report = SweepReport {
            flows: keys.len(),
            ..SweepReport::default()
        };
        self.marked.retain(|key, _| keys.contains(key));
        for key in keys {
            let _writing = CONNTRACK_WRITES
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let Ok(mut state) = self.map.get(&key, 0) else {
                report.skipped += 1;
                continue;
            };
            if state.flags != 0 {
                let sweeps = self.marked.entry(key).or_insert(0);
                *sweeps = sweeps.saturating_add(1);
                if self.interval.saturating_mul(*sweeps) >= self.timeouts.other {
                    self.marked.remove(&key);
                    match self.map.remove(&key) {
                        Ok(()) => report.expired += 1,
                        Err(MapError::KeyNotFound) => {}
                        Err(_) => report.skipped += 1,
                    }
                }
                continue;
            }
            if state.activity & flow_activity::SEEN != 0 {
                state.activity &= !flow_activity::SEEN;
                state.idle_sweeps = 0;
            } else {
                state.idle_sweeps = state.idle_sweeps.saturating_add(1);
                let idle = self.interval.saturating_mul(state.idle_sweeps);
                if idle >= self.timeouts.for_flow(key.protocol, &state) {
                    match self.map.remove(&key) {
                        Ok(()) => report.expired += 1,
                        Err(MapError::KeyNotFound) => {}
                        Err(_) => report.skipped += 1,
                    }
                    continue;
                }
            }
            // BPF_EXIST: a flow the LRU evicted meanwhile is not brought back. A packet racing
            // with this write may lose its activity bit for one sweep: the flow looks idle one
            // interval longer, which the timeouts (many intervals) absorb.
            if self.map.insert(key, state, BPF_EXIST).is_err() {
                report.skipped += 1;
            }
        }
        report
    }
}
