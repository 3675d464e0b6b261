//! How a verdict leaves a program: every packet is counted under its reason, and every drop of
//! a flow is reported to the agent by the same call that counts it (as Cilium's `bpf_lxc.c`
//! sends every drop through `send_drop_notify`, which updates the drop metric and emits the
//! event), so no path can count a drop the agent never hears of, or the reverse.
//! Programs return what these functions return; they never touch the counters or the events
//! themselves.
//!
//! Maps:
//!
//! - `VERDICTS`: per-CPU packet counters, one per reason (`counter::TABLE`) and direction.
//! - `EVENTS`: a ring buffer of `VerdictEvent`s: every reported drop, and the new allowed
//!   flows `SETTING_ALLOW_EVENT_PERIOD` samples. At most `EVENTS_PER_CPU_PER_SECOND` per CPU
//!   (`EVENT_BUDGET`); what does not fit is counted (`EVENTS_RATE_LIMITED`, `EVENTS_LOST`),
//!   never waited for.

use aya_ebpf::{
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    macros::map,
    maps::{PerCpuArray, RingBuf},
};
use netwarden_common::{
    EVENTS_PER_CPU_PER_SECOND, EventBudget, FlowKey, SETTING_ALLOW_EVENT_PERIOD, VerdictEvent,
    counter, maps,
};

use crate::settings;

/// Verdict events for the agent (see `VerdictEvent`).
#[map]
static EVENTS: RingBuf = RingBuf::pinned(maps::EVENTS.capacity, 0);
pinned_as!(EVENTS);

#[map]
static EVENT_BUDGET: PerCpuArray<EventBudget> = PerCpuArray::pinned(maps::EVENT_BUDGET.capacity, 0);
pinned_as!(EVENT_BUDGET);

#[map]
static VERDICTS: PerCpuArray<u64> = PerCpuArray::pinned(maps::VERDICTS.capacity, 0);
pinned_as!(VERDICTS);

/// What a verdict event names besides the flow: the policy in force, the rule that allowed it
/// (0: none) and the Service frontend it was opened to (0: none). A struct, passed by
/// reference: a BPF function takes at most five arguments.
#[derive(Clone, Copy)]
pub(crate) struct Attribution {
    pub(crate) policy: u32,
    pub(crate) rule: u32,
    pub(crate) frontend: u32,
}

impl Attribution {
    /// A verdict under `policy` that no rule or frontend explains.
    #[inline(always)]
    pub(crate) const fn policy(policy: u32) -> Self {
        Self {
            policy,
            rule: 0,
            frontend: 0,
        }
    }
}

/// Drops a packet of `flow` going `dir` for `reason`: reports the flow and counts the packet.
/// Returns `verdict`, the program's drop value.
#[inline(always)]
pub(crate) fn drop_flow(
    flow: &FlowKey,
    dir: u32,
    reason: u32,
    attribution: &Attribution,
    verdict: i32,
) -> i32 {
    drop_for_direction(flow, dir, dir, reason, attribution, verdict)
}

/// [`drop_flow`] for a packet decided on the policy of another direction than its own (a
/// tracked flow decided again for the direction that opened it): the event names the
/// direction that decided, the counter the packet's own.
#[inline(always)]
pub(crate) fn drop_for_direction(
    flow: &FlowKey,
    decided_dir: u32,
    packet_dir: u32,
    reason: u32,
    attribution: &Attribution,
    verdict: i32,
) -> i32 {
    report(flow, decided_dir, reason, attribution);
    count(reason, packet_dir, verdict)
}

/// Drops a packet going `dir` for `reason` and only counts it: for packets that name no flow
/// the agent could be told of (unparsable, VLAN-tagged, of another ethertype, whose kernel
/// state could not be read), and for the later packets of a flow whose drop was reported when
/// it was cut.
#[inline(always)]
pub(crate) fn drop_unreported(reason: u32, dir: u32, verdict: i32) -> i32 {
    count(reason, dir, verdict)
}

/// Passes a packet going `dir` for `reason`: counted, never reported.
#[inline(always)]
pub(crate) fn pass(reason: u32, dir: u32, verdict: i32) -> i32 {
    count(reason, dir, verdict)
}

/// Passes the packet that opens `flow` going `dir`, for `reason`: reported when the agent's
/// allow-event sampling picks it, counted always.
#[inline(always)]
pub(crate) fn pass_new_flow(
    flow: &FlowKey,
    dir: u32,
    reason: u32,
    attribution: &Attribution,
    verdict: i32,
) -> i32 {
    // Every audited flow is reported (within the budget, like a drop): it is what the
    // operator rolling out the policy is watching for.
    if reason == counter::AUDITED_BY_POLICY || allow_event_sampled() {
        report(flow, dir, reason, attribution);
    }
    count(reason, dir, verdict)
}

/// Whether this new allowed flow is one the agent asked to hear about.
#[inline(always)]
fn allow_event_sampled() -> bool {
    let period = settings::get(SETTING_ALLOW_EVENT_PERIOD);
    // SAFETY: bpf_get_prandom_u32 has no preconditions.
    period == 1 || (period > 1 && unsafe { bpf_get_prandom_u32() } % period == 0)
}

/// Reports a verdict to the agent, within the per-CPU budget; never waits, counts what it
/// drops. Not inlined: the event has a stack frame of its own.
#[inline(never)]
fn report(flow: &FlowKey, dir: u32, reason: u32, attribution: &Attribution) {
    let Attribution {
        policy,
        rule,
        frontend,
    } = *attribution;
    let Some(budget) = EVENT_BUDGET.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU slot of a successful lookup: only programs running on this CPU touch
    // it, one at a time (they run with migration disabled and none of them sends a packet,
    // which could run another inside it).
    let budget = unsafe { &mut *budget };
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if now.wrapping_sub(budget.window_start_ns) > 1_000_000_000 {
        budget.window_start_ns = now;
        budget.sent = 0;
    }
    if budget.sent >= EVENTS_PER_CPU_PER_SECOND {
        count(counter::EVENTS_RATE_LIMITED, dir, 0);
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<VerdictEvent>(0) else {
        count(counter::EVENTS_LOST, dir, 0);
        return;
    };
    budget.sent += 1;
    entry.write(VerdictEvent {
        ifindex: flow.ifindex,
        #[expect(clippy::cast_possible_truncation, reason = "a direction is 0 or 1")]
        direction: dir as u8,
        protocol: flow.protocol,
        #[expect(
            clippy::cast_possible_truncation,
            reason = "reasons fit a u8 (`counter::TABLE` checks it)"
        )]
        reason: reason as u8,
        padding: 0,
        pod_port: flow.pod_port,
        peer_port: flow.peer_port,
        policy,
        pod_addr: flow.pod_addr,
        peer_addr: flow.peer_addr,
        rule,
        frontend,
    });
    entry.submit(0);
}

/// Adds one to the counter of `reason` in `dir`; returns `verdict`.
#[inline(always)]
fn count(reason: u32, dir: u32, verdict: i32) -> i32 {
    if let Some(counter) = VERDICTS.get_ptr_mut(counter::slot(dir, reason)) {
        // SAFETY: per-CPU slot of a successful lookup; only this CPU writes it.
        unsafe { *counter += 1 };
    }
    verdict
}
