//! Running the programs on crafted packets (`BPF_PROG_TEST_RUN`) instead of attaching them:
//! for tests and the per-packet benchmark only (feature `test-support`).

use std::time::Duration;

use aya::{
    maps::{HashMap as BpfHashMap, Map, MapData},
    programs::{ProgramError, SchedClassifier, TestRun as _, TestRunOptions},
};
use netwarden_common::{FlowKey, FlowKeyV4, FlowState, FragmentKey, FragmentState};

use crate::{
    Datapath,
    attach::Hook,
    conntrack::{TABLE_V4, TABLE_V6, open_table},
    error::DatapathError,
    loader::PROGRAMS,
    netfilter,
};

/// Why [`Datapath::verified_instructions`] could not read a program's verifier figure.
#[derive(Debug, thiserror::Error)]
pub enum VerifiedInstructionsError {
    /// A classifier is not loaded, or its `bpf_prog_info` could not be read.
    #[error("program {name}: {source}")]
    Classifier {
        /// The classifier.
        name: &'static str,
        /// Why.
        source: ProgramError,
    },
    /// The hook after translation could not be loaded, or its fdinfo read.
    #[error("hook after translation: {0}")]
    Hook(#[from] netfilter::NetfilterError),
}

/// The program benchmarks run to measure `BPF_PROG_TEST_RUN` alone.
const TEST_RUN_BASELINE: &str = "test_run_baseline";

impl Datapath {
    /// Keeps the programs unattached: maps are written as usual and the programs can be run on
    /// crafted packets with [`Datapath::test_run`], without touching any interface.
    pub fn detached(&mut self) {
        self.enforcer.attachments.enabled = false;
    }

    /// Runs the program of one hook on `frame` with `BPF_PROG_TEST_RUN`, `repeat` times, as if
    /// it arrived on interface `ifindex` (the kernel requires the interface to exist; 1, the
    /// loopback, always does). Returns the program's verdict and the mean time per run.
    pub fn test_run(
        &self,
        towards_pod: bool,
        frame: &[u8],
        ifindex: u32,
        repeat: u32,
    ) -> Result<(i32, Duration), ProgramError> {
        let name = if towards_pod {
            Hook::ToContainer.program()
        } else {
            Hook::FromContainer.program()
        };
        let program: &SchedClassifier = self
            .kernel
            .ebpf
            .program(name)
            .and_then(|program| program.try_into().ok())
            .ok_or(ProgramError::NotLoaded)?;
        test_run(program, frame, ifindex, repeat)
    }

    /// Runs a program that allows everything and reads nothing the way [`Datapath::test_run`]
    /// runs a classifier: what `BPF_PROG_TEST_RUN` itself costs per run, for benchmarks to
    /// subtract. The program is loaded at the first call.
    pub fn test_run_baseline(
        &mut self,
        frame: &[u8],
        repeat: u32,
    ) -> Result<(i32, Duration), ProgramError> {
        let program: &mut SchedClassifier = self
            .kernel
            .ebpf
            .program_mut(TEST_RUN_BASELINE)
            .and_then(|program| program.try_into().ok())
            .ok_or(ProgramError::NotLoaded)?;
        if program.fd().is_err() {
            program.load()?;
        }
        test_run(program, frame, 1, repeat)
    }

    /// How many instructions the verifier processed to load each program on this kernel, which
    /// refuses a program past 1,000,000: the two classifiers as loaded, and the hook after
    /// translation loaded once more for the count (and dropped: nothing is attached).
    pub fn verified_instructions(
        &self,
    ) -> Result<Vec<(&'static str, u32)>, VerifiedInstructionsError> {
        let mut counts = Vec::new();
        for hook in [Hook::FromContainer, Hook::ToContainer] {
            let name = hook.program();
            let info = self
                .kernel
                .ebpf
                .program(name)
                .ok_or(ProgramError::NotLoaded)
                .and_then(aya::programs::Program::info)
                .map_err(|source| VerifiedInstructionsError::Classifier { name, source })?;
            counts.push((name, info.verified_instruction_count().unwrap_or(0)));
        }
        let hook = netfilter::load(PROGRAMS, &self.kernel.layout.maps(), &self.kernel.ebpf)?;
        let count = netfilter::verified_instructions(&hook).map_err(|source| {
            netfilter::NetfilterError::Syscall {
                what: "reading the hook's fdinfo".into(),
                source,
                log: String::new(),
            }
        })?;
        counts.push((netfilter::PROGRAM, count.unwrap_or(0)));
        Ok(counts)
    }

    /// Every flow the programs track, read from the pinned conntrack tables (IPv4 flows with
    /// their 4-byte keys). Flows removed under the walk are left out.
    pub fn conntrack_entries(&self) -> Result<TrackedFlows, DatapathError> {
        let maps = self.kernel.layout.maps();
        let ipv4 = open_table::<FlowKeyV4>(&maps, TABLE_V4)?;
        let ipv6 = open_table::<FlowKey>(&maps, TABLE_V6)?;
        Ok(TrackedFlows {
            ipv4: ipv4.iter().filter_map(Result::ok).collect(),
            ipv6: ipv6.iter().filter_map(Result::ok).collect(),
        })
    }

    /// The datagrams whose first fragment passed (`FRAGMENTS`), with until when their later
    /// fragments pass.
    pub fn fragment_entries(&self) -> Result<Vec<(FragmentKey, FragmentState)>, DatapathError> {
        const NAME: &str = netwarden_common::maps::FRAGMENTS.name;
        let data = MapData::from_pin(self.kernel.layout.maps().join(NAME))
            .map_err(|source| DatapathError::Map { name: NAME, source })?;
        let table: BpfHashMap<MapData, FragmentKey, FragmentState> =
            BpfHashMap::try_from(Map::LruHashMap(data))
                .map_err(|source| DatapathError::Map { name: NAME, source })?;
        Ok(table.iter().filter_map(Result::ok).collect())
    }

    /// Makes the next kernel calls of each kind fail (tests of the agent's retries).
    pub fn inject_faults(&mut self, faults: crate::faults::Faults) {
        self.enforcer.maps.endpoints.failing_writes = faults.endpoint_writes;
        self.kernel.faults = faults;
    }
}

/// What the conntrack tables hold ([`Datapath::conntrack_entries`]).
pub struct TrackedFlows {
    /// `CONNTRACK_V4`.
    pub ipv4: Vec<(FlowKeyV4, FlowState)>,
    /// `CONNTRACK_V6`.
    pub ipv6: Vec<(FlowKey, FlowState)>,
}

/// One `BPF_PROG_TEST_RUN` of `program` on `frame` as if it arrived on interface `ifindex`:
/// its verdict and the mean time per run.
fn test_run(
    program: &SchedClassifier,
    frame: &[u8],
    ifindex: u32,
    repeat: u32,
) -> Result<(i32, Duration), ProgramError> {
    // `struct __sk_buff`: ifindex is its 11th u32 (offset 40); the rest stays zero.
    let mut context = [0_u8; 192];
    context[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    let mut out = vec![0_u8; frame.len() + 256];
    let result = program.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ctx_in: Some(&context),
        repeat,
        ..TestRunOptions::default()
    })?;
    #[expect(
        clippy::cast_possible_wrap,
        reason = "TC verdicts are small signed numbers"
    )]
    let verdict = result.return_value as i32;
    Ok((verdict, result.duration))
}
