//! Expiry of tracked flows.
//!
//! The programs store, per flow, when a packet last passed (`CLOCK_MONOTONIC_COARSE` in ticks
//! of 2^30 ns, written only when the tick changes) and whether it was answered or is closing. The
//! sweeper walks the table every `interval` and removes the flows idle past the timeout for
//! their state; it only reads and deletes, never writes an entry back, so it can never undo a
//! bit the datapath or the identity check set:
//!
//! | state | timeout (default) |
//! |---|---|
//! | TCP after a FIN or RST | `closing` (10 s) |
//! | never answered (no packet the other way) | `unreplied` (60 s) |
//! | TCP, answered | `tcp_established` (6 h) |
//! | UDP, SCTP and other protocols, answered | `other` (60 s) |
//! | awaiting a ClientHello, or cut (mTLS screen, identity check) | `other` (60 s) |
//!
//! Removing a flow never opens anything: its next packet is decided again from scratch, for
//! TCP only a SYN may create a new entry, and payload to an mTLS-strict pod on a connection
//! conntrack does not know drops. The LRU map still evicts the least recently used flow when
//! it is full, whatever the sweeper does.

use std::{path::Path, time::Duration};

use aya::maps::{HashMap as BpfHashMap, MapData, MapError};
use netwarden_common::{CLOCK_TICK_NS, FlowKey, FlowState, flow_activity};

use crate::{DatapathError, bpffs::PinLayout};

const IPPROTO_TCP: u8 = 6;

const NAME: &str = "CONNTRACK";

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
        if state.flags != 0 {
            self.other
        } else if state.activity & flow_activity::CLOSING != 0 {
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
    /// Entries that could not be read or removed (changed under the sweep).
    pub skipped: usize,
}

/// The conntrack table opened from its pin, for a sweeper on a thread of its own.
pub struct Sweeper {
    map: BpfHashMap<MapData, FlowKey, FlowState>,
    interval: Duration,
    timeouts: Timeouts,
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
        })
    }

    /// The interval the sweeper was opened with.
    #[must_use]
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// One pass over the table, now.
    pub fn sweep(&mut self) -> SweepReport {
        self.sweep_at(coarse_now())
    }

    /// One pass over the table as if the coarse monotonic clock read `now` (tests look into
    /// the future with it instead of waiting for it).
    pub fn sweep_at(&mut self, now: Duration) -> SweepReport {
        let now_ticks = ticks(now);
        // Keys first: the table changes under the walk, and a walk that deletes as it goes
        // may restart or skip.
        let keys: Vec<FlowKey> = self.map.keys().filter_map(Result::ok).collect();
        let mut report = SweepReport {
            flows: keys.len(),
            ..SweepReport::default()
        };
        for key in keys {
            let Ok(state) = self.map.get(&key, 0) else {
                report.skipped += 1;
                continue;
            };
            let idle_ticks = now_ticks.saturating_sub(state.last_seen);
            let idle = Duration::from_nanos(u64::from(idle_ticks) * CLOCK_TICK_NS);
            if idle < self.timeouts.for_flow(key.protocol, &state) {
                continue;
            }
            match self.map.remove(&key) {
                Ok(()) => report.expired += 1,
                Err(MapError::KeyNotFound) => {}
                Err(_) => report.skipped += 1,
            }
        }
        report
    }
}

/// The clock the datapath stamps flows with (`bpf_ktime_get_coarse_ns`).
#[must_use]
pub fn coarse_now() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)
        .map_or(Duration::ZERO, Duration::from)
}

/// `time` in the datapath's ticks of [`CLOCK_TICK_NS`].
fn ticks(time: Duration) -> u32 {
    u32::try_from(time.as_nanos() / u128::from(CLOCK_TICK_NS)).unwrap_or(u32::MAX)
}
