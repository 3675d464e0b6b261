//! Later fragments, which carry no ports, follow the first fragment of their datagram.
//!
//! Map: `FRAGMENTS`, an LRU of first fragments that passed (keyed by the endpoint, direction,
//! addresses, protocol and IP id) -> until when their datagram's later fragments pass
//! ([`FRAGMENT_LIFETIME_NS`]). A full table forgets the oldest datagram, whose later fragments
//! then drop (fail closed). Never looked up in conntrack, where a later fragment would match a
//! flow of port 0.

use aya_ebpf::{bindings::BPF_ANY, helpers::bpf_ktime_get_ns, macros::map, maps::LruHashMap};
use netwarden_common::{FRAGMENT_LIFETIME_NS, FlowKey, FragmentKey, FragmentState, counter, maps};

use crate::{
    exit::{self, Attribution},
    verdict::{ALLOW, DENY},
};

#[map]
static FRAGMENTS: LruHashMap<FragmentKey, FragmentState> =
    LruHashMap::pinned(maps::FRAGMENTS.capacity, 0);
pinned_as!(FRAGMENTS);

/// The key of the datagram a fragment of `flow` going `dir` belongs to.
#[inline(always)]
fn fragment_key(flow: &FlowKey, dir: u32, id: u32) -> FragmentKey {
    FragmentKey {
        ifindex: flow.ifindex,
        protocol: flow.protocol,
        #[expect(clippy::cast_possible_truncation, reason = "a direction is 0 or 1")]
        direction: dir as u8,
        padding: 0,
        id,
        pod_addr: flow.pod_addr,
        peer_addr: flow.peer_addr,
    }
}

/// Records that the first fragment of datagram `id` of `flow` passed going `dir`. Not
/// inlined: the key has a stack frame of its own.
#[inline(never)]
pub(crate) fn remember_first(flow: &FlowKey, dir: u32, id: u32) {
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let state = FragmentState {
        until_ns: now + FRAGMENT_LIFETIME_NS,
    };
    let _ = FRAGMENTS.insert(fragment_key(flow, dir, id), state, u64::from(BPF_ANY));
}

/// The verdict of a later fragment (no ports) of datagram `id` of `flow` going `dir`: it
/// passes when the datagram's first fragment passed here within [`FRAGMENT_LIFETIME_NS`],
/// and drops otherwise. Entries are not removed at the last fragment: fragments may arrive
/// out of order. Not inlined: the key has a stack frame of its own.
#[inline(never)]
pub(crate) fn follow_first(flow: &FlowKey, dir: u32, id: u32) -> i32 {
    let key = fragment_key(flow, dir, id);
    // SAFETY: the value is copied out at once.
    let known = unsafe { FRAGMENTS.get(key) }.copied();
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    match known {
        Some(state) if now <= state.until_ns => exit::pass(counter::ALLOWED_FRAGMENT, dir, ALLOW),
        _ => exit::drop_flow(
            flow,
            dir,
            counter::DENIED_FRAGMENT_UNKNOWN,
            &Attribution::policy(0),
            DENY,
        ),
    }
}
