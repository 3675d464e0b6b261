//! Connection tracking: the flows the programs let open, so their replies pass on the fast
//! path, and the peer each translated flow was judged on.
//!
//! Maps:
//!
//! - `CONNTRACK_V4`, `CONNTRACK_V6`: LRUs of flows as the endpoint sees them (IPv4 flows with
//!   4-byte addresses: a shorter key to hash on every packet) -> the direction that opened
//!   the flow, the policy epoch under which it was last allowed, when it was last active (in
//!   ticks of the kernel's jiffies) and whether it was answered or is closing, from which the
//!   agent's sweeper expires idle flows: TCP closing after 10 s, unanswered flows after 60 s,
//!   other protocols after 60 s idle, established TCP after 6 h idle (all configurable). A
//!   full table evicts the least recently used flow, which is decided again on its next
//!   packet: an eviction never opens anything.
//! - `TRANSLATIONS`: the peer each translated flow was judged on (the Service's backend, or
//!   the masqueraded client), keyed like `CONNTRACK_*`: a stale flow is decided again on the
//!   same peer. Sized like one conntrack table; an entry whose flow was evicted is harmless (it
//!   is only read for a flow whose state says it was translated), a flow whose entry was
//!   evicted is dropped.

use aya_ebpf::{
    bindings::BPF_ANY, helpers::bpf_jiffies64, macros::map, maps::LruHashMap, programs::TcContext,
};
use netwarden_common::{
    FlowKey, FlowKeyV4, FlowState, Translation, clock_ticks, flow_activity, maps,
};

use crate::{
    mtls,
    packet::{self, Opening},
};

#[map]
static CONNTRACK_V4: LruHashMap<FlowKeyV4, FlowState> =
    LruHashMap::pinned(maps::CONNTRACK_V4.capacity, 0);
pinned_as!(CONNTRACK_V4);

#[map]
static CONNTRACK_V6: LruHashMap<FlowKey, FlowState> =
    LruHashMap::pinned(maps::CONNTRACK_V6.capacity, 0);
pinned_as!(CONNTRACK_V6);

#[map]
static TRANSLATIONS: LruHashMap<FlowKey, Translation> =
    LruHashMap::pinned(maps::TRANSLATIONS.capacity, 0);
pinned_as!(TRANSLATIONS);

/// The conntrack entry of `flow`: IPv4 flows live in a table of their own, whose keys are
/// less than half as long to hash and compare.
#[inline(always)]
pub(crate) fn entry(flow: &FlowKey) -> Option<*mut FlowState> {
    match flow.ipv4() {
        Some(key) => entry_v4(&key),
        None => CONNTRACK_V6.get_ptr_mut(flow),
    }
}

/// The conntrack entry of the IPv4 flow `key`.
#[inline(always)]
pub(crate) fn entry_v4(key: &FlowKeyV4) -> Option<*mut FlowState> {
    CONNTRACK_V4.get_ptr_mut(key)
}

/// Tracks `flow` in `state`, replacing what was tracked under its key. A full table evicts
/// its least recently used flow.
#[inline(always)]
pub(crate) fn insert(flow: &FlowKey, state: &FlowState) {
    let _ = match flow.ipv4() {
        Some(key) => CONNTRACK_V4.insert(key, state, u64::from(BPF_ANY)),
        None => CONNTRACK_V6.insert(flow, state, u64::from(BPF_ANY)),
    };
}

/// Forgets `flow`.
#[inline(always)]
pub(crate) fn remove(flow: &FlowKey) {
    let _ = match flow.ipv4() {
        Some(key) => CONNTRACK_V4.remove(key),
        None => CONNTRACK_V6.remove(flow),
    };
}

/// Records the peer translated flow `flow` was judged on. Written before the flow's conntrack
/// entry, so a packet that finds the flow finds what it was judged on.
#[inline(always)]
pub(crate) fn record_translation(flow: &FlowKey, translation: &Translation) {
    // By reference: by value the translation would be copied onto a stack that is all but
    // full.
    let _ = TRANSLATIONS.insert(flow, translation, 0);
}

/// `flow` with the peer it was judged on: itself, or for a translated flow the peer recorded
/// when it was decided after translation (`None` when that record is gone).
#[inline(always)]
pub(crate) fn judged_flow(flow: &FlowKey, tracked: &FlowState) -> Option<FlowKey> {
    if tracked.activity & flow_activity::TRANSLATED == 0 {
        return Some(*flow);
    }
    // SAFETY: the value is copied out at once.
    let translation = unsafe { TRANSLATIONS.get(flow) }.copied()?;
    let mut judged = *flow;
    judged.peer_addr = translation.peer_addr;
    judged.peer_port = translation.peer_port;
    Some(judged)
}

/// Whether a packet of `flow` going `dir` opens a new connection over `tracked`, the entry of
/// an earlier one on the same addresses and ports that is closing: a bare SYN after a FIN or
/// RST (a client reusing its port, as `tcp_tw_reuse` lets it). Such a packet is decided as a
/// new flow, whose entry replaces the old one: otherwise the new connection would live on the
/// old one's closing state, and its entry be swept ten idle seconds later, cutting a
/// connection that is merely quiet; and a SYN the other way would pass as a reply of the old.
/// When the new connection is the same flow as the old one in every way its decision depends
/// on (same direction, same policy epoch, not translated, no mTLS screen now or then), the
/// decision would be the same, and the entry is only made new again here.
#[inline(always)]
pub(crate) fn reopened(
    tracked: *mut FlowState,
    flow: &FlowKey,
    dir: u32,
    opening: Opening,
    epoch: u32,
) -> bool {
    // SAFETY: the pointer comes from a successful lookup in this program run (RCU keeps the
    // value alive until the program returns); plain word accesses, as on the fast path.
    let tracked = unsafe { &mut *tracked };
    if opening != Opening::Yes
        || flow.protocol != packet::IPPROTO_TCP
        || tracked.activity & flow_activity::CLOSING == 0
    {
        return false;
    }
    let same_decision = tracked.epoch == epoch
        && tracked.origin == dir
        && tracked.flags == 0
        && tracked.activity & flow_activity::TRANSLATED == 0
        && mtls::flags_for_new_flow(flow, dir) == 0;
    if !same_decision {
        return true;
    }
    tracked.activity = 0;
    tracked.last_seen = now_ticks();
    false
}

/// Whether a packet that may open a flow (its kernel connection is new) passes on `tracked`,
/// the current entry of `flow`, now to be judged as `judged` going `dir` (`translated`: on
/// another peer than the key's, recorded in `TRANSLATIONS`). It does when the entry was judged
/// on the same peer: a retransmitted SYN, a UDP flow's next datagram, or a new connection over
/// a closed one on the same addresses and ports whose decision cannot differ (same peer and
/// direction, no mTLS screen then or now), whose entry is then made new again. Otherwise it is
/// decided afresh: kube-proxy balances each kernel connection anew, so a client reusing its
/// port may reach another backend.
#[inline(always)]
pub(crate) fn continues_judged(
    tracked: &mut FlowState,
    flow: &FlowKey,
    judged: &FlowKey,
    dir: u32,
    translated: bool,
) -> bool {
    // Untranslated, the key is the peer (the caller checked the entry is not translated).
    // SAFETY: the value is read at once.
    let same_peer = !translated
        || unsafe { TRANSLATIONS.get(flow) }.is_some_and(|translation| {
            translation.peer_port == judged.peer_port && translation.peer_addr == judged.peer_addr
        });
    if !same_peer {
        return false;
    }
    if flow.protocol != packet::IPPROTO_TCP || tracked.activity & flow_activity::CLOSING == 0 {
        return true;
    }
    if tracked.origin != dir || tracked.flags != 0 || mtls::flags_for_new_flow(flow, dir) != 0 {
        return false;
    }
    tracked.activity = if translated {
        flow_activity::TRANSLATED
    } else {
        0
    };
    tracked.last_seen = now_ticks();
    true
}

/// Records what the agent's sweeper needs to expire the flow: when it was last active, whether
/// it was answered, whether it is closing. Stores only what changed, so an active flow costs a
/// load of the kernel's jiffies per packet and a store per tick, not one per packet.
#[inline(always)]
pub(crate) fn note_activity(tracked: &mut FlowState, dir: u32, opening: Opening) {
    let mut bits = 0;
    if dir != tracked.origin {
        bits |= flow_activity::REPLIED;
    }
    if opening == Opening::Closing {
        bits |= flow_activity::CLOSING;
    }
    if tracked.activity & bits != bits {
        tracked.activity |= bits;
    }
    let now = now_ticks();
    if tracked.last_seen != now {
        tracked.last_seen = now;
    }
}

/// The conntrack clock the sweeper compares with (see `clock_ticks`).
#[inline(always)]
pub(crate) fn now_ticks() -> u32 {
    // SAFETY: bpf_jiffies64 has no preconditions.
    clock_ticks(unsafe { bpf_jiffies64() })
}

/// Whether the packet an ICMP error quotes, starting at `offset`, belongs to a flow tracked
/// for the endpoint at `ifindex` (`dir` is the direction the quoted packet travelled). A
/// function of its own (not inlined) so the quoted headers do not crowd the main program's
/// 512-byte stack.
#[inline(never)]
pub(crate) fn quotes_tracked_flow(
    ctx: &TcContext,
    icmp_protocol: u8,
    offset: usize,
    dir: u32,
    ifindex: u32,
) -> bool {
    packet::quoted_flow(ctx, icmp_protocol, offset, dir, ifindex)
        .is_some_and(|quoted| entry(&quoted).is_some())
}
