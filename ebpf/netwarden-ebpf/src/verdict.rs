//! The policy lookup.
//!
//! Maps (all pinned by name, so a restarted agent adopts them and enforcement never stops):
//!
//! - `ENDPOINTS`: ifindex of a pod's host-side veth -> its ingress and egress policy ids and its
//!   lifecycle state. A policy id of 0 means "not isolated in this direction".
//! - `IPCACHE`: hash of 16-byte addresses -> peer identity. Every pod IP in the cluster maps to
//!   the identity of its (namespace, labels, named ports); the node's own addresses map to HOST.
//!   Other addresses are WORLD. Every entry is one address, so an exact hash lookup is the
//!   whole answer: ranges of addresses are `ipBlock` business, and live in `CIDRS_V4/6`.
//! - `POLICY`: LPM keyed by `(policy id, peer, protocol, port)`, big-endian. An entry may stop
//!   after the peer (all protocols, all ports), after the protocol (all ports) or inside the port
//!   (an aligned port range, which is how `endPort` ranges are stored). Any match allows:
//!   NetworkPolicy has no deny rules, so no precedence between matches is needed.
//! - `CIDRS_V4`, `CIDRS_V6`: LPMs keyed by `(policy id, address)`, one per IP family (the
//!   IPv4 key is 64 bits, not 160) -> a CIDR class: the exact set of `ipBlock`
//!   rules of that policy whose `cidr` holds the address and whose `except` does not. The class
//!   is looked up in `POLICY` like an identity. This path applies to pod IPs too, so `ipBlock`
//!   semantics stay exact whatever identity the address has.
//! - `ENDPOINT_ADDRESSES`: (ifindex, address) of every address a local pod owns.
//! - `CONNTRACK_V4`, `CONNTRACK_V6`: LRUs of flows as the endpoint sees them (IPv4 flows with
//!   4-byte addresses: a shorter key to hash on every packet) -> the direction that opened
//!   the flow, the policy epoch under which it was last allowed, when it was last active (in
//!   ticks of the kernel's jiffies) and whether it was answered or is closing, from which the
//!   agent's sweeper expires idle flows: TCP closing after 10 s, unanswered flows after 60 s,
//!   other protocols after 60 s idle, established TCP after 6 h idle (all configurable). A
//!   full table evicts the least recently used flow.
//! - `FRAGMENTS`: LRU of first fragments that passed -> until when their datagram's later
//!   fragments pass.
//! - `EPOCH`: bumped by the agent after every policy change.
//! - `EVENTS`: a ring buffer of deny events, at most `EVENTS_PER_CPU_PER_SECOND` per CPU; what
//!   does not fit is counted (`EVENTS_RATE_LIMITED`, `EVENTS_LOST`), never waited for.
//!
//! Decision for a packet of flow F on endpoint E in direction D (from the pod's point of view):
//!
//! 1. ARP, and IPv6 neighbour discovery and multicast listener messages from a link-local or
//!    unspecified source (as the RFCs send them): pass (link plumbing, never policy). A VLAN tag, in the frame (0x8100, 0x88a8, 0x9100) or already taken off
//!    by the kernel (`vlan_present`), and any ethertype but IPv4, IPv6 and ARP: drop, both
//!    ways (`DENIED_VLAN`, `DENIED_ETHERTYPE`). A pod's veth carries nothing else, and the
//!    kernel strips a tag after TC ran and routes what it hid: passing it as "not IP" let a
//!    datagram inside VLAN-0 tags out of a pod under default-deny egress.
//!    A later fragment (no ports): pass when the first fragment of its datagram passed on this
//!    endpoint in the same direction within 2 s (`FRAGMENTS`, keyed by the addresses,
//!    protocol and IP id), else drop (`DENIED_FRAGMENT_UNKNOWN`). Never looked up in
//!    conntrack, where it would match a flow of port 0. A first fragment that passes below is
//!    recorded there.
//! 2. F tracked, epoch current: pass (replies of allowed flows: the fast path, one lookup).
//!    Step 3 is safely skipped, so a spoofed source cannot ride the fast path: the key holds
//!    E's ifindex (another endpoint's flows are never found here) and the pod's address, and
//!    F is tracked only for an address E owns (leaving the pod, after step 3's check; towards
//!    it, only when the destination is E's own address: a broadcast or multicast packet the
//!    policy allows passes untracked, so the pod cannot answer through its entry from the
//!    group's address). Any change to `ENDPOINTS` or `ENDPOINT_ADDRESSES` bumps the epoch,
//!    which sends F back through every step.
//! 3. E unknown to `ENDPOINTS`: drop (an attached veth the agent forgot about fails closed).
//!    Leaving the pod from an address `ENDPOINT_ADDRESSES` does not give it: drop (spoofed).
//!    An ICMP error quoting a packet of a tracked flow (a TCP, UDP or SCTP flow by its ports,
//!    a ping by its echo identifier): pass (PMTU discovery keeps working). A neighbour
//!    solicitation or advertisement leaving the pod from an address it owns that is not
//!    link-local, or arriving at it from a neighbour on its link: pass (Linux sends them from
//!    the address of the packet that needed the neighbour; pods on a bridge resolve each other
//!    directly). Other neighbour discovery and MLD from non-link-local sources are ordinary
//!    packets from here on.
//! 4. F tracked, epoch stale: decide again for the direction that opened F; drop and forget F
//!    when that decision now denies (a revoked permission does not live on in conntrack).
//!    A translated F (`flow_activity::TRANSLATED`) is decided again on the peer it was judged
//!    on (`TRANSLATIONS`: the Service's backend, or the masqueraded client).
//! 5. F new, leaving the pod for a Service frontend (`FRONTENDS`): pass on undecided; the hook
//!    after translation (`translated.rs`) decides it on the backend it reaches.
//! 6. F new: decide for D; track F when allowed and the packet may open a flow (for ICMP only
//!    an echo request may, keyed by its identifier so that only its replies match; for TCP
//!    only a SYN may: a mid-stream packet passes or drops on its own and never creates state, so a
//!    revoked connection cannot be revived by the server's next segment).
//!
//! Flows towards mTLS-strict pods also go through the mTLS screen (`mtls.rs`) before steps 3
//! and 4: it may drop a packet the policy allows, never pass one it denies. It takes the
//! ClientHello only at the client's ISN + 1 and watches the stream's start until the pod
//! acknowledged it; a flow it watches is not on the fast path until then.
//!
//! decide(E, D, peer address, protocol, destination port):
//!   0. the peer is the pod itself (only a flow judged after translation can be: a pod reaching
//!      itself through its own Service): allow, as over loopback.
//!   a. D is ingress and the peer is the node: allow (kubelet probes keep working).
//!   b. E not READY (pod object unknown, or locked down): deny.
//!   c. D not isolated (policy id 0): allow.
//!   d. `POLICY[(policy, identity(peer), protocol, port)]` matches: allow (not looked up for
//!      WORLD, which no entry names: rules for every peer are `0.0.0.0/0` and `::/0` blocks).
//!   e. `POLICY[(policy, CIDRS_Vx[(policy, peer)], protocol, port)]` matches: allow.
//!   f. deny.

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_F_NO_PREALLOC, TC_ACT_SHOT},
    helpers::{bpf_get_prandom_u32, bpf_jiffies64, bpf_ktime_get_ns},
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::TcContext,
};
use netwarden_common::{
    CidrClass, CidrKey, CidrKeyV4, EPOCH_INDEX, EVENTS_PER_CPU_PER_SECOND, Endpoint,
    EndpointAddress, EventBudget, FRAGMENT_LIFETIME_NS, FlowKey, FlowKeyV4, FlowState, FragmentKey,
    FragmentState, FrontendKey, FrontendValue, IDENTITY_HOST, IDENTITY_WORLD, IpIdentity, IpKey,
    POLICY_KEY_FULL_BITS, POLICY_NOT_ISOLATED, PolicyEntry, PolicyKey, SETTING_ALLOW_EVENT_PERIOD,
    SETTING_FRONTENDS_INSTALLED, SETTINGS_COUNT, Translation, VerdictEvent, clock_ticks, counter,
    direction, endpoint_state, flow_activity, flow_flags, ipv4_of_mapped,
};

use crate::{
    mtls,
    packet::{self, Layout, Opening, Parsed, fragment},
};

/// `TC_ACT_UNSPEC`, which TCX reads as "next": allow, and let later programs have their say.
const ALLOW: i32 = -1;
const DENY: i32 = TC_ACT_SHOT;

// Memory (docs/design.md, "Map memory"): the hash maps only the agent writes allocate an
// element per entry (`BPF_F_NO_PREALLOC`), so they cost what they hold, not their
// `max_entries`; the LRU tables the programs fill must be preallocated, so their size is their
// cost; LPM tries always allocate per entry. The agent overrides some sizes (`Capacity`).
/// Service frontends (address, protocol, port) the node's netfilter may translate: a flow a
/// pod opens to one is decided after translation (`translated.rs`), on the backend it reaches.
/// Empty when the hook after translation is not attached, so nothing is ever deferred to a
/// hook that is not there.
#[map]
static FRONTENDS: HashMap<FrontendKey, FrontendValue> = HashMap::pinned(65536, BPF_F_NO_PREALLOC);

/// The peer each translated flow was judged on (the backend, or the masqueraded client),
/// keyed like `CONNTRACK_*`: a stale flow is decided again on the same peer. Sized like one
/// conntrack table; an entry whose flow was evicted is harmless (it is only read for a flow
/// whose state says it was translated), a flow whose entry was evicted is dropped.
#[map]
pub(crate) static TRANSLATIONS: LruHashMap<FlowKey, Translation> = LruHashMap::pinned(65536, 0);

/// The local endpoint (ifindex) owning each address: the hook after translation sees the
/// packet on the node's routing path, where only the addresses tell which pod sent it or
/// receives it (anti-spoofing on the pod's own interface vouches for the source).
#[map]
pub(crate) static ENDPOINT_OF_ADDRESS: HashMap<IpKey, u32> =
    HashMap::pinned(16384, BPF_F_NO_PREALLOC);

#[map]
pub(crate) static ENDPOINTS: HashMap<u32, Endpoint> = HashMap::pinned(4096, BPF_F_NO_PREALLOC);

#[map]
static ENDPOINT_ADDRESSES: HashMap<EndpointAddress, u32> =
    HashMap::pinned(16384, BPF_F_NO_PREALLOC);

#[map]
static IPCACHE: HashMap<IpKey, IpIdentity> = HashMap::pinned(65536, BPF_F_NO_PREALLOC);

#[map]
static POLICY: LpmTrie<PolicyKey, PolicyEntry> = LpmTrie::pinned(262_144, 0);

#[map]
static CIDRS_V4: LpmTrie<CidrKeyV4, CidrClass> = LpmTrie::pinned(65536, 0);

#[map]
static CIDRS_V6: LpmTrie<CidrKey, CidrClass> = LpmTrie::pinned(65536, 0);

#[map]
static CONNTRACK_V4: LruHashMap<FlowKeyV4, FlowState> = LruHashMap::pinned(65536, 0);

#[map]
static CONNTRACK_V6: LruHashMap<FlowKey, FlowState> = LruHashMap::pinned(65536, 0);

/// First fragments that passed, for their datagram's later fragments (which carry no ports)
/// to follow for [`FRAGMENT_LIFETIME_NS`]. LRU: a full table forgets the oldest datagram,
/// whose later fragments then drop (fail closed).
#[map]
static FRAGMENTS: LruHashMap<FragmentKey, FragmentState> = LruHashMap::pinned(8192, 0);

#[map]
static EPOCH: Array<u32> = Array::pinned(1, 0);

/// Knobs the agent sets at start ([`SETTING_ALLOW_EVENT_PERIOD`]).
#[map]
static SETTINGS: Array<u32> = Array::pinned(SETTINGS_COUNT, 0);

/// The agent's record of which label set got which identity (SHA-256 of the set -> identity).
/// The programs never read it; it is pinned with the other maps so a restarted agent hands out
/// the same identities and its first update is not a renumbering of the whole cluster.
#[map]
static IDENTITIES: HashMap<[u8; 32], u32> = HashMap::pinned(65536, BPF_F_NO_PREALLOC);

/// Verdict events for the agent (see `VerdictEvent`).
#[map]
static EVENTS: RingBuf = RingBuf::pinned(256 * 1024, 0);

#[map]
static EVENT_BUDGET: PerCpuArray<EventBudget> = PerCpuArray::pinned(1, 0);

#[map]
static VERDICTS: PerCpuArray<u64> = PerCpuArray::pinned(counter::SLOTS, 0);

#[inline(always)]
pub fn enforce(ctx: &TcContext, dir: u32) -> i32 {
    let (flow, opening, layout) = match packet::parse(ctx, dir) {
        Ok(Parsed::Flow(flow, opening, layout)) => (flow, opening, layout),
        Ok(Parsed::Arp | Parsed::NetworkControl) => {
            return count(counter::ALLOWED_NETWORK_CONTROL, dir, ALLOW);
        }
        Ok(Parsed::Tagged) => return count(counter::DENIED_VLAN, dir, DENY),
        Ok(Parsed::OtherEthertype) => return count(counter::DENIED_ETHERTYPE, dir, DENY),
        Err(packet::Malformed) => return count(counter::DENIED_MALFORMED, dir, DENY),
    };
    if layout.fragment == fragment::LATER {
        return follow_first_fragment(&flow, dir, layout.fragment_id);
    }
    let verdict = enforce_flow(ctx, dir, &flow, opening, layout);
    // A test of a parsed value on every packet; only first fragments (rare) pay for an insert.
    if layout.fragment == fragment::FIRST && verdict == ALLOW {
        remember_first_fragment(&flow, dir, layout.fragment_id);
    }
    verdict
}

/// Steps 2 to 5 of the module comment for a packet of `flow` (whole, or a first fragment).
#[inline(always)]
fn enforce_flow(
    ctx: &TcContext,
    dir: u32,
    flow: &FlowKey,
    opening: Opening,
    layout: Layout,
) -> i32 {
    let flow = *flow;
    let epoch = current_epoch();
    // One conntrack lookup serves the fast path and, when the entry is stale, step 4: the
    // entry's memory stays valid for the whole program run.
    let tracked = conntrack_entry(&flow);
    if let Some(tracked) = tracked {
        // SAFETY: the pointer comes from a successful lookup and stays valid for this run.
        let tracked = unsafe { &mut *tracked };
        if tracked.flags != 0 {
            let was_cut = tracked.flags & flow_flags::CUT != 0;
            let screened = mtls::screen(ctx, dir, tracked, &layout);
            if screened != mtls::PASS {
                if !was_cut {
                    report(
                        &flow,
                        dir,
                        screened,
                        &Attribution {
                            policy: 0,
                            rule: 0,
                            frontend: 0,
                        },
                    );
                }
                return count(screened, dir, DENY);
            }
        }
        if tracked.epoch == epoch {
            note_activity(tracked, dir, opening);
            return count(counter::ALLOWED_TRACKED, dir, ALLOW);
        }
    }
    // SAFETY: the value is copied out at once; a concurrent update can at worst make this
    // packet see the endpoint's previous state, which was valid too.
    let Some(endpoint) = (unsafe { ENDPOINTS.get(flow.ifindex) }).copied() else {
        report(
            &flow,
            dir,
            counter::DENIED_ENDPOINT_NOT_READY,
            &Attribution {
                policy: 0,
                rule: 0,
                frontend: 0,
            },
        );
        return count(counter::DENIED_ENDPOINT_NOT_READY, dir, DENY);
    };
    let policy = if dir == direction::INGRESS {
        endpoint.ingress_policy
    } else {
        endpoint.egress_policy
    };
    if dir == direction::EGRESS && !owns_address(&flow) {
        report(
            &flow,
            dir,
            counter::DENIED_SPOOFED,
            &Attribution {
                policy,
                rule: 0,
                frontend: 0,
            },
        );
        return count(counter::DENIED_SPOOFED, dir, DENY);
    }
    if opening == Opening::Neighbour {
        // Leaving the pod, from an address the pod owns (checked above); towards it, from a
        // neighbour on the same link: pods on a bridge resolve each other directly, from their
        // own addresses (RFC 4861 7.1). Link plumbing either way: the pod's stack discards one
        // that was routed (a hop limit below 255), and a neighbour message opens no flow.
        return count(counter::ALLOWED_NETWORK_CONTROL, dir, ALLOW);
    }
    if opening == Opening::Error {
        // The quoted packet travelled the other way.
        let quoted_dir = if dir == direction::EGRESS {
            direction::INGRESS
        } else {
            direction::EGRESS
        };
        if packet::quotes_tracked_flow(
            ctx,
            flow.protocol,
            layout.quoted(),
            quoted_dir,
            flow.ifindex,
        ) {
            return count(counter::ALLOWED_RELATED, dir, ALLOW);
        }
    }
    if let Some(tracked) = tracked {
        // SAFETY: the pointer comes from a successful lookup and is valid for this program run.
        let tracked = unsafe { &mut *tracked };
        let origin = tracked.origin;
        // A translated flow is decided again on the peer it was judged on; one whose
        // translation was evicted cannot be, and is forgotten like a revoked one.
        let judged = judged_flow(&flow, tracked);
        let reason = match &judged {
            Some(judged) => decide(&endpoint, origin, judged, opening_port(judged, origin)).reason,
            None => counter::DENIED_REVOKED,
        };
        if is_allowed(reason) {
            tracked.epoch = epoch;
            note_activity(tracked, dir, opening);
            return count(counter::ALLOWED_TRACKED, dir, ALLOW);
        }
        conntrack_remove(&flow);
        report(
            &judged.unwrap_or(flow),
            origin,
            counter::DENIED_REVOKED,
            &Attribution {
                policy,
                rule: 0,
                frontend: 0,
            },
        );
        return count(counter::DENIED_REVOKED, dir, DENY);
    }

    if dir == direction::EGRESS && is_frontend(&flow) {
        // Decided after the node's netfilter translated it, where the backend is known.
        return count(counter::DEFERRED_TO_TRANSLATION, dir, ALLOW);
    }

    let Decision { reason, rule } = decide(&endpoint, dir, &flow, opening_port(&flow, dir));
    if is_allowed(reason) {
        // A full table evicts its least recently used flow; that flow is decided again on its
        // next packet, so an eviction never opens anything.
        // Only a flow whose pod address the endpoint owns is tracked, whichever way it opened
        // (towards the pod, a broadcast, multicast or misrouted destination passes on its own):
        // the fast path skips the address check because no entry can hold anything else.
        if opening == Opening::Yes && (dir == direction::EGRESS || owns_address(&flow)) {
            let mut state = FlowState {
                origin: dir,
                epoch,
                flags: mtls::flags_for_new_flow(&flow, dir),
                activity: 0,
                last_seen: now_ticks(),
                client_seq: 0,
                hello_end: 0,
            };
            // A SYN may carry data (TCP Fast Open): the screen looks at it too.
            let screened = if state.flags == 0 {
                mtls::PASS
            } else {
                mtls::screen(ctx, dir, &mut state, &layout)
            };
            conntrack_insert(&flow, &state);
            if screened != mtls::PASS {
                report(
                    &flow,
                    dir,
                    screened,
                    &Attribution {
                        policy,
                        rule: 0,
                        frontend: 0,
                    },
                );
                return count(screened, dir, DENY);
            }
            // Every audited flow is reported (rate-limited like denies): it is what the
            // operator rolling out the policy needs to see.
            if reason == counter::AUDITED_BY_POLICY || allow_event_sampled() {
                report(
                    &flow,
                    dir,
                    reason,
                    &Attribution {
                        policy,
                        rule,
                        frontend: 0,
                    },
                );
            }
        } else if mtls::untracked_payload_refused(ctx, &flow, dir, layout.l4_offset, layout.ip_end)
        {
            report(
                &flow,
                dir,
                counter::DENIED_PLAINTEXT_TO_STRICT,
                &Attribution {
                    policy,
                    rule: 0,
                    frontend: 0,
                },
            );
            return count(counter::DENIED_PLAINTEXT_TO_STRICT, dir, DENY);
        }
        return count(reason, dir, ALLOW);
    }
    report(
        &flow,
        dir,
        reason,
        &Attribution {
            policy,
            rule: 0,
            frontend: 0,
        },
    );
    count(reason, dir, DENY)
}

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
fn remember_first_fragment(flow: &FlowKey, dir: u32, id: u32) {
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
fn follow_first_fragment(flow: &FlowKey, dir: u32, id: u32) -> i32 {
    let key = fragment_key(flow, dir, id);
    // SAFETY: the value is copied out at once.
    let known = unsafe { FRAGMENTS.get(key) }.copied();
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    match known {
        Some(state) if now <= state.until_ns => count(counter::ALLOWED_FRAGMENT, dir, ALLOW),
        _ => {
            report(
                flow,
                dir,
                counter::DENIED_FRAGMENT_UNKNOWN,
                &Attribution {
                    policy: 0,
                    rule: 0,
                    frontend: 0,
                },
            );
            count(counter::DENIED_FRAGMENT_UNKNOWN, dir, DENY)
        }
    }
}

/// What a verdict event names besides the flow: the policy in force, the rule that allowed it
/// (0: none) and the Service frontend it was opened to (0: none). A struct, passed by
/// reference: a BPF function takes at most five arguments.
#[derive(Clone, Copy)]
pub(crate) struct Attribution {
    pub(crate) policy: u32,
    pub(crate) rule: u32,
    pub(crate) frontend: u32,
}

/// Reports a deny to the agent, within the per-CPU budget; never waits, counts what it drops.
/// Not inlined: the event has a stack frame of its own.
#[inline(never)]
pub(crate) fn report(flow: &FlowKey, dir: u32, reason: u32, attribution: &Attribution) {
    let Attribution {
        policy,
        rule,
        frontend,
    } = *attribution;
    let Some(budget) = EVENT_BUDGET.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU slot of a successful lookup; only this CPU touches it, and a TC program
    // is not preempted by itself on one CPU.
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
        direction: dir as u8,
        protocol: flow.protocol,
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

/// Whether this new allowed flow is one the agent asked to hear about.
#[inline(always)]
pub(crate) fn allow_event_sampled() -> bool {
    let period = SETTINGS
        .get(SETTING_ALLOW_EVENT_PERIOD)
        .copied()
        .unwrap_or(0);
    // SAFETY: bpf_get_prandom_u32 has no preconditions.
    period == 1 || (period > 1 && unsafe { bpf_get_prandom_u32() } % period == 0)
}

/// `flow` with the peer it was judged on: itself, or for a translated flow the peer recorded
/// when it was decided after translation (`None` when that record is gone).
#[inline(always)]
fn judged_flow(flow: &FlowKey, tracked: &FlowState) -> Option<FlowKey> {
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

/// Whether a packet leaving a pod goes to a Service frontend, which the node's netfilter may
/// translate before it is routed.
#[inline(always)]
fn is_frontend(flow: &FlowKey) -> bool {
    frontends_installed() && frontend_of(&flow.peer_addr, flow.protocol, flow.peer_port) != 0
}

/// Whether any Service frontend is installed (nothing is deferred otherwise).
#[inline(always)]
pub(crate) fn frontends_installed() -> bool {
    SETTINGS
        .get(SETTING_FRONTENDS_INSTALLED)
        .copied()
        .unwrap_or(0)
        != 0
}

/// The id of the Service frontend at (`addr`, `protocol`, `port`), or 0.
#[inline(always)]
pub(crate) fn frontend_of(addr: &[u8; 16], protocol: u8, port: u16) -> u32 {
    let key = FrontendKey {
        addr: *addr,
        protocol,
        padding: 0,
        port,
    };
    FRONTENDS
        .get_ptr(key)
        // SAFETY: the pointer comes from a successful lookup and is read at once.
        .map_or(0, |found| unsafe { (*found).id })
}

/// Whether `flow` is tracked (whatever its epoch).
#[inline(always)]
pub fn is_tracked(flow: &FlowKey) -> bool {
    conntrack_entry(flow).is_some()
}

/// The conntrack entry of `flow`: IPv4 flows live in a table of their own, whose keys are
/// less than half as long to hash and compare.
#[inline(always)]
pub(crate) fn conntrack_entry(flow: &FlowKey) -> Option<*mut FlowState> {
    match flow.ipv4() {
        Some(key) => CONNTRACK_V4.get_ptr_mut(key),
        None => CONNTRACK_V6.get_ptr_mut(flow),
    }
}

#[inline(always)]
pub(crate) fn conntrack_insert(flow: &FlowKey, state: &FlowState) {
    // A full table evicts its least recently used flow, decided again on its next packet.
    let _ = match flow.ipv4() {
        Some(key) => CONNTRACK_V4.insert(key, state, u64::from(BPF_ANY)),
        None => CONNTRACK_V6.insert(flow, state, u64::from(BPF_ANY)),
    };
}

#[inline(always)]
pub(crate) fn conntrack_remove(flow: &FlowKey) {
    let _ = match flow.ipv4() {
        Some(key) => CONNTRACK_V4.remove(key),
        None => CONNTRACK_V6.remove(flow),
    };
}

/// Whether the pod behind the packet's interface owns its source address.
#[inline(always)]
fn owns_address(flow: &FlowKey) -> bool {
    let key = EndpointAddress {
        ifindex: flow.ifindex,
        addr: flow.pod_addr,
    };
    ENDPOINT_ADDRESSES.get_ptr(key).is_some()
}

/// The destination port of the packet that opened `flow` in direction `origin`.
#[inline(always)]
pub(crate) fn opening_port(flow: &FlowKey, origin: u32) -> u16 {
    if origin == direction::EGRESS {
        flow.peer_port
    } else {
        flow.pod_port
    }
}

#[inline(always)]
pub(crate) fn is_allowed(reason: u32) -> bool {
    matches!(
        reason,
        counter::ALLOWED_BY_POLICY
            | counter::ALLOWED_NODE
            | counter::ALLOWED_NOT_ISOLATED
            | counter::ALLOWED_SELF
            | counter::AUDITED_BY_POLICY
    )
}

/// What [`decide`] found: the counter that names the reason, and for an allow by policy the
/// rule that allowed it (0 otherwise).
pub(crate) struct Decision {
    pub(crate) reason: u32,
    pub(crate) rule: u32,
}

impl Decision {
    #[inline(always)]
    fn because(reason: u32) -> Self {
        Self { reason, rule: 0 }
    }
}

/// Steps a. to f. of the module comment. Not inlined, so its LPM keys have a stack frame of
/// their own.
#[inline(never)]
pub(crate) fn decide(endpoint: &Endpoint, dir: u32, flow: &FlowKey, port: u16) -> Decision {
    if same_address(&flow.peer_addr, &flow.pod_addr) {
        // Only a flow decided after translation can be judged on the pod itself: a pod
        // reaching itself through its own Service (hairpin).
        return Decision::because(counter::ALLOWED_SELF);
    }
    let peer = peer_identity(&flow.peer_addr);
    if dir == direction::INGRESS && peer == IDENTITY_HOST {
        return Decision::because(counter::ALLOWED_NODE);
    }
    if endpoint.state != endpoint_state::READY {
        return Decision::because(counter::DENIED_ENDPOINT_NOT_READY);
    }
    let policy = if dir == direction::INGRESS {
        endpoint.ingress_policy
    } else {
        endpoint.egress_policy
    };
    if policy == POLICY_NOT_ISOLATED {
        return Decision::because(counter::ALLOWED_NOT_ISOLATED);
    }
    // No entry names WORLD: selectors match pods, and rules for every peer are compiled as
    // 0.0.0.0/0 and ::/0 blocks. An address outside the IP cache is decided by its CIDR class alone.
    if peer != IDENTITY_WORLD
        && let Some(rule) = policy_rule(policy, peer, flow.protocol, port)
    {
        return Decision {
            reason: counter::ALLOWED_BY_POLICY,
            rule,
        };
    }
    if let Some(class) = cidr_class(policy, &flow.peer_addr)
        && let Some(rule) = policy_rule(policy, class, flow.protocol, port)
    {
        return Decision {
            reason: counter::ALLOWED_BY_POLICY,
            rule,
        };
    }
    if endpoint.audit & direction::audit_bit(dir) != 0 {
        // Only the policy's own verdict is audited: everything above that fails closed
        // (unknown endpoints, spoofing, malformed frames) is enforced whatever the mode.
        return Decision::because(counter::AUDITED_BY_POLICY);
    }
    Decision::because(counter::DENIED_BY_POLICY)
}

/// Whether two addresses are equal, compared as two words each.
#[inline(always)]
fn same_address(a: &[u8; 16], b: &[u8; 16]) -> bool {
    let word = |addr: &[u8; 16], at: usize| {
        u64::from_ne_bytes([
            addr[at],
            addr[at + 1],
            addr[at + 2],
            addr[at + 3],
            addr[at + 4],
            addr[at + 5],
            addr[at + 6],
            addr[at + 7],
        ])
    };
    word(a, 0) == word(b, 0) && word(a, 8) == word(b, 8)
}

/// The CIDR class of `addr` in `policy`, from the trie of the address's family.
#[inline(always)]
fn cidr_class(policy: u32, addr: &[u8; 16]) -> Option<u32> {
    let class = match ipv4_of_mapped(addr) {
        Some(v4) => CIDRS_V4.get(Key::new(
            32 + 32,
            CidrKeyV4 {
                policy: policy.to_be_bytes(),
                addr: v4,
            },
        )),
        None => CIDRS_V6.get(Key::new(
            32 + 128,
            CidrKey {
                policy: policy.to_be_bytes(),
                addr: *addr,
            },
        )),
    };
    class.map(|class| class.peer)
}

#[inline(always)]
fn peer_identity(addr: &[u8; 16]) -> u32 {
    IPCACHE
        .get_ptr(IpKey { addr: *addr })
        // SAFETY: the pointer comes from a successful lookup and is read at once.
        .map_or(IDENTITY_WORLD, |found| unsafe { (*found).identity })
}

/// The rule of the longest `POLICY` entry matching, if any.
#[inline(always)]
fn policy_rule(policy: u32, peer: u32, protocol: u8, port: u16) -> Option<u32> {
    let key = Key::new(
        POLICY_KEY_FULL_BITS,
        PolicyKey::new(policy, peer, protocol, port),
    );
    POLICY.get(&key).map(|entry| entry.rule)
}

#[inline(always)]
pub(crate) fn current_epoch() -> u32 {
    EPOCH.get(EPOCH_INDEX).copied().unwrap_or(0)
}

#[inline(always)]
pub(crate) fn count(reason: u32, dir: u32, verdict: i32) -> i32 {
    if let Some(counter) = VERDICTS.get_ptr_mut(counter::slot(dir, reason)) {
        // SAFETY: per-CPU slot of a successful lookup; only this CPU writes it.
        unsafe { *counter += 1 };
    }
    verdict
}
