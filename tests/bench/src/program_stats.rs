//! Where the datapath's time goes in traffic: the kernel's own per-program run statistics
//! (`BPF_ENABLE_STATS`), read before and after a measured run. `BPF_PROG_TEST_RUN` (`datapath.rs`)
//! gives a program's cost on one warm packet; this gives what it costs on the node's real
//! packets, cold caches and all, and how often each program runs per connection.
//!
//! The statistics stay on only while the window's descriptor is open, and cost every run two
//! clock reads of their own: figures taken through them are an upper bound, and the runs they
//! watch are not the ones the ratios come from.

use std::{collections::BTreeMap, os::fd::OwnedFd, time::Duration};

use anyhow::Context as _;
use aya::{
    programs::loaded_programs,
    sys::{Stats, enable_stats},
};

/// Run statistics switched on, and every loaded program's figures when they were.
pub struct Window {
    _enabled: OwnedFd,
    opened: BTreeMap<u32, Runs>,
}

/// What one program has run since it was loaded (while statistics were on).
#[derive(Clone, Default)]
struct Runs {
    name: String,
    count: u64,
    time: Duration,
}

/// One program's share of a window: its runs and their time, summed over every loaded program
/// of that name that ran (each pod's veth runs the same classifier).
#[derive(Debug, Clone, PartialEq)]
pub struct ProgramCost {
    pub name: String,
    pub runs: u64,
    pub time: Duration,
}

impl ProgramCost {
    /// Runs per connection of a window that saw `connections`.
    #[expect(
        clippy::cast_precision_loss,
        reason = "run counts of a few seconds' traffic, far below 2^52"
    )]
    pub fn runs_per(&self, connections: u32) -> f64 {
        self.runs as f64 / f64::from(connections.max(1))
    }

    /// Mean time of one run.
    pub fn per_run(&self) -> Duration {
        u32::try_from(self.runs)
            .ok()
            .filter(|&runs| runs > 0)
            .map_or(Duration::ZERO, |runs| self.time / runs)
    }
}

impl Window {
    /// Switches the statistics on and records where every program stands.
    pub fn open() -> anyhow::Result<Self> {
        let enabled = enable_stats(Stats::RunTime).context("BPF_ENABLE_STATS")?;
        Ok(Self {
            _enabled: enabled,
            opened: snapshot(),
        })
    }

    /// The programs that ran since [`Window::open`], by name, busiest first; the statistics go
    /// off with the window.
    pub fn close(self) -> Vec<ProgramCost> {
        ran_between(&self.opened, &snapshot())
    }
}

/// Every loaded program's figures, by id. A program unloaded while the list is walked is
/// skipped.
fn snapshot() -> BTreeMap<u32, Runs> {
    let mut programs = BTreeMap::new();
    for info in loaded_programs() {
        let Ok(info) = info else { continue };
        programs.insert(
            info.id(),
            Runs {
                name: info.name_as_str().unwrap_or("(unnamed)").to_owned(),
                count: info.run_count(),
                time: info.run_time(),
            },
        );
    }
    programs
}

/// The runs between two snapshots, summed by program name; a program loaded after `before`
/// counts from zero.
fn ran_between(before: &BTreeMap<u32, Runs>, after: &BTreeMap<u32, Runs>) -> Vec<ProgramCost> {
    let mut by_name: BTreeMap<&str, ProgramCost> = BTreeMap::new();
    for (id, now) in after {
        let then = before.get(id).cloned().unwrap_or_default();
        let runs = now.count.saturating_sub(then.count);
        if runs == 0 {
            continue;
        }
        let cost = by_name.entry(&now.name).or_insert_with(|| ProgramCost {
            name: now.name.clone(),
            runs: 0,
            time: Duration::ZERO,
        });
        cost.runs += runs;
        cost.time += now.time.saturating_sub(then.time);
    }
    let mut costs: Vec<ProgramCost> = by_name.into_values().collect();
    costs.sort_by(|a, b| b.time.cmp(&a.time).then_with(|| a.name.cmp(&b.name)));
    costs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runs(name: &str, count: u64, micros: u64) -> Runs {
        Runs {
            name: name.into(),
            count,
            time: Duration::from_micros(micros),
        }
    }

    #[test]
    fn sums_programs_of_one_name_and_leaves_out_idle_ones() {
        let before = BTreeMap::from([
            (1, runs("from_container", 10, 5)),
            (2, runs("from_container", 0, 0)),
            (3, runs("idle", 7, 7)),
        ]);
        let after = BTreeMap::from([
            (1, runs("from_container", 30, 15)),
            (2, runs("from_container", 20, 10)),
            (3, runs("idle", 7, 7)),
            // Loaded after the window opened: all its runs are the window's.
            (4, runs("nw_translated", 5, 50)),
        ]);
        let costs = ran_between(&before, &after);
        assert_eq!(
            costs,
            vec![
                ProgramCost {
                    name: "nw_translated".into(),
                    runs: 5,
                    time: Duration::from_micros(50),
                },
                ProgramCost {
                    name: "from_container".into(),
                    runs: 40,
                    time: Duration::from_micros(20),
                },
            ]
        );
        assert_eq!(costs[1].per_run(), Duration::from_nanos(500));
        assert!((costs[1].runs_per(8) - 5.0).abs() < f64::EPSILON);
        assert_eq!(costs[0].per_run(), Duration::from_micros(10));
    }

    #[test]
    fn a_program_that_never_ran_costs_nothing_per_run() {
        let cost = ProgramCost {
            name: "x".into(),
            runs: 0,
            time: Duration::ZERO,
        };
        assert_eq!(cost.per_run(), Duration::ZERO);
    }
}
