//! Expiry of tracked flows.
//!
//! The programs store, per flow, when a packet last passed (the kernel's jiffies in ticks of
//! 64, written only when the tick changes) and whether it was answered or is closing. The
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
//!
//! Jiffies are the one clock a BPF program reads for free (the verifier inlines
//! `bpf_jiffies64` into a load), but userspace cannot read them, nor the kernel's `HZ`. The
//! sweeper runs a tiny program of the same object, `conntrack_clock`, with `BPF_PROG_TEST_RUN`
//! to read them, and measures `HZ` once at start against `CLOCK_MONOTONIC`.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, MapData, MapError},
    programs::{ProgramError, SchedClassifier, TestRun as _, TestRunOptions},
};
use netwarden_common::{
    CLOCK_TICK_SHIFT, FlowKey, FlowKeyV4, FlowState, clock_ticks, flow_activity,
};

use crate::{DatapathError, bpffs::PinLayout};

const CLOCK_PROGRAM: &str = "conntrack_clock";

const IPPROTO_TCP: u8 = 6;

/// The table of IPv4 flows ([`FlowKeyV4`] keys).
pub const TABLE_V4: &str = netwarden_common::maps::CONNTRACK_V4.name;
/// The table of IPv6 flows ([`FlowKey`] keys).
pub const TABLE_V6: &str = netwarden_common::maps::CONNTRACK_V6.name;

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
    /// IPv4 flows in their table when the sweep started.
    pub ipv4_flows: usize,
    /// IPv6 flows in their table when the sweep started.
    pub ipv6_flows: usize,
    /// IPv4 flows removed for being idle past their timeout.
    pub ipv4_expired: usize,
    /// IPv6 flows removed for being idle past their timeout.
    pub ipv6_expired: usize,
    /// Entries that could not be read or removed (changed under the sweep).
    pub skipped: usize,
}

impl SweepReport {
    /// Flows in both tables when the sweep started.
    #[must_use]
    pub fn flows(&self) -> usize {
        self.ipv4_flows + self.ipv6_flows
    }

    /// Flows removed from both tables.
    #[must_use]
    pub fn expired(&self) -> usize {
        self.ipv4_expired + self.ipv6_expired
    }
}

/// The conntrack tables opened from their pins, for a sweeper on a thread of its own.
pub struct Sweeper {
    ipv4: BpfHashMap<MapData, FlowKeyV4, FlowState>,
    ipv6: BpfHashMap<MapData, FlowKey, FlowState>,
    clock: Clock,
    interval: Duration,
    timeouts: Timeouts,
}

impl Sweeper {
    /// Opens the pinned conntrack map and clock program under `bpffs` (measuring the kernel's
    /// `HZ` takes a tenth of a second); the sweeper will be called every `interval`.
    pub fn open(
        bpffs: &Path,
        interval: Duration,
        timeouts: Timeouts,
    ) -> Result<Self, DatapathError> {
        let maps = PinLayout::new(bpffs).maps();
        let clock = Clock::open(&PinLayout::new(bpffs).conntrack_clock()).map_err(|source| {
            DatapathError::Program {
                name: CLOCK_PROGRAM,
                source,
            }
        })?;
        Ok(Self {
            ipv4: open_table(&maps, TABLE_V4)?,
            ipv6: open_table(&maps, TABLE_V6)?,
            clock,
            interval,
            timeouts,
        })
    }

    /// The interval the sweeper was opened with.
    #[must_use]
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// The kernel's tick rate the sweeper measured.
    #[must_use]
    pub fn hz(&self) -> f64 {
        self.clock.hz
    }

    /// One pass over the table, now. Fails, removing nothing, when the clock cannot be read.
    pub fn sweep(&mut self) -> Result<SweepReport, ProgramError> {
        self.sweep_after(Duration::ZERO)
    }

    /// One pass over the table as if `later` more time had passed (tests look into the
    /// future with it instead of waiting for it).
    pub fn sweep_after(&mut self, later: Duration) -> Result<SweepReport, ProgramError> {
        let jiffies = self.clock.jiffies()? + self.clock.jiffies_in(later);
        let now = clock_ticks(jiffies);
        let (ipv4_flows, ipv4) = sweep_table(&mut self.ipv4, &self.clock, &self.timeouts, now);
        let (ipv6_flows, ipv6) = sweep_table(&mut self.ipv6, &self.clock, &self.timeouts, now);
        Ok(SweepReport {
            ipv4_flows,
            ipv6_flows,
            ipv4_expired: ipv4.expired,
            ipv6_expired: ipv6.expired,
            skipped: ipv4.skipped + ipv6.skipped,
        })
    }
}

/// A pinned conntrack table.
pub(crate) fn open_table<K: aya::Pod>(
    maps: &Path,
    name: &'static str,
) -> Result<BpfHashMap<MapData, K, FlowState>, DatapathError> {
    let data =
        MapData::from_pin(maps.join(name)).map_err(|source| DatapathError::Map { name, source })?;
    BpfHashMap::try_from(aya::maps::Map::LruHashMap(data))
        .map_err(|source| DatapathError::Map { name, source })
}

/// Flows a sweep removed or could not read.
#[derive(Default)]
struct Removed {
    expired: usize,
    skipped: usize,
}

/// One pass over one table at tick `now`: how many flows it held, and what was removed.
fn sweep_table<K: aya::Pod + Protocol>(
    table: &mut BpfHashMap<MapData, K, FlowState>,
    clock: &Clock,
    timeouts: &Timeouts,
    now: u32,
) -> (usize, Removed) {
    // Keys first: the table changes under the walk, and a walk that deletes as it goes may
    // restart or skip.
    let keys: Vec<K> = table.keys().filter_map(Result::ok).collect();
    let mut removed = Removed::default();
    for key in &keys {
        let Ok(state) = table.get(key, 0) else {
            removed.skipped += 1;
            continue;
        };
        if clock.idle(now, state.last_seen) < timeouts.for_flow(key.protocol(), &state) {
            continue;
        }
        match table.remove(key) {
            Ok(()) => removed.expired += 1,
            Err(MapError::KeyNotFound) => {}
            Err(_) => removed.skipped += 1,
        }
    }
    (keys.len(), removed)
}

/// The IP protocol of a conntrack key.
trait Protocol {
    fn protocol(&self) -> u8;
}

impl Protocol for FlowKey {
    fn protocol(&self) -> u8 {
        self.protocol
    }
}

impl Protocol for FlowKeyV4 {
    fn protocol(&self) -> u8 {
        self.protocol
    }
}

/// Loads the clock program of the datapath's object and pins it where [`Sweeper::open`] finds
/// it, replacing the pin of a previous agent (whose object may differ).
pub(crate) fn pin_clock(ebpf: &mut Ebpf, layout: &PinLayout) -> Result<(), DatapathError> {
    let error = |source| DatapathError::Program {
        name: CLOCK_PROGRAM,
        source,
    };
    let program: &mut SchedClassifier = ebpf
        .program_mut(CLOCK_PROGRAM)
        .ok_or(ProgramError::NotLoaded)
        .and_then(TryInto::try_into)
        .map_err(error)?;
    program.load().map_err(error)?;
    let path = layout.conntrack_clock();
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(source) if source.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(error(ProgramError::IOError(source))),
    }
    program
        .pin(&path)
        .map_err(|source| error(ProgramError::IOError(std::io::Error::other(source))))
}

/// The kernel's jiffies, read through the pinned `conntrack_clock` program.
struct Clock {
    program: SchedClassifier,
    /// Jiffies per second.
    hz: f64,
}

impl Clock {
    /// The `HZ` values Linux is built with; a measurement close to one is taken to be it.
    const KNOWN_HZ: [f64; 5] = [100.0, 250.0, 300.0, 1000.0, 1024.0];
    /// Long enough for the measurement to tell 250 from 300 (25 against 30 jiffies, ±1).
    const MEASUREMENT: Duration = Duration::from_millis(100);

    fn open(pin: &Path) -> Result<Self, ProgramError> {
        let mut clock = Self {
            program: SchedClassifier::from_pin(pin)?,
            hz: 0.0,
        };
        let (first, started) = (clock.jiffies()?, Instant::now());
        // A measurement, not a wait for an event: nothing signals the passing of jiffies.
        std::thread::sleep(Self::MEASUREMENT);
        let (second, elapsed) = (clock.jiffies()?, started.elapsed());
        #[expect(
            clippy::cast_precision_loss,
            reason = "a few hundred jiffies convert exactly"
        )]
        let measured = (second - first) as f64 / elapsed.as_secs_f64();
        clock.hz = Self::KNOWN_HZ
            .into_iter()
            .find(|known| (measured - known).abs() <= known * 0.1)
            .unwrap_or(measured)
            .max(1.0);
        Ok(clock)
    }

    fn jiffies(&self) -> Result<u64, ProgramError> {
        let frame = [0_u8; 64];
        let mut out = [0_u8; 64];
        let result = self.program.test_run(TestRunOptions {
            data_in: Some(&frame),
            data_out: Some(&mut out),
            repeat: 1,
            ..TestRunOptions::default()
        })?;
        if result.return_value != 0 {
            return Err(ProgramError::IOError(std::io::Error::other(
                "the conntrack clock program could not write the frame",
            )));
        }
        let mut jiffies = [0_u8; 8];
        jiffies.copy_from_slice(&out[..8]);
        Ok(u64::from_ne_bytes(jiffies))
    }

    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a positive duration's jiffies"
    )]
    fn jiffies_in(&self, duration: Duration) -> u64 {
        (duration.as_secs_f64() * self.hz).round() as u64
    }

    /// How long ago tick `last_seen` was at tick `now`. A stamp after `now` (the datapath
    /// wrote it between the clock read and the entry read) is no idle time at all.
    fn idle(&self, now: u32, last_seen: u32) -> Duration {
        let ticks = now.wrapping_sub(last_seen);
        if ticks > u32::MAX / 2 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(f64::from(ticks) * f64::from(1_u32 << CLOCK_TICK_SHIFT) / self.hz)
    }
}
