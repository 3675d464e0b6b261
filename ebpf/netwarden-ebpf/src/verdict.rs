//! The decision: what a packet of a pod's flow is allowed to do.
//!
//! The maps are described where they are declared: `endpoints.rs` (`ENDPOINTS`,
//! `ENDPOINT_ADDRESSES`), `policy.rs` (`IPCACHE`, `POLICY`, `CIDRS_V4`, `CIDRS_V6`: the key
//! layouts and the precedence of the lookup), `conntrack.rs` (`CONNTRACK_V4`, `CONNTRACK_V6`,
//! `TRANSLATIONS`), `fragments.rs` (`FRAGMENTS`), `frontends.rs` (`FRONTENDS`), `settings.rs`
//! (`EPOCH`, `SETTINGS`) and `exit.rs` (`VERDICTS`, `EVENTS`). All are pinned by the names
//! `netwarden_common::maps` gives them, so a restarted agent adopts them and enforcement
//! never stops. Every verdict leaves through `exit.rs`: counted, and a drop reported.
//!
//! Decision for a packet of flow F on endpoint E in direction D (from the pod's point of view):
//!
//! 1. ARP, and IPv6 neighbour discovery and multicast listener messages from a link-local or
//!    unspecified source (as the RFCs send them): pass (link plumbing, never policy). A VLAN
//!    tag, in the frame (0x8100, 0x88a8, 0x9100) or already taken off by the kernel
//!    (`vlan_present`), and any ethertype but IPv4, IPv6 and ARP: drop, both ways
//!    (`DENIED_VLAN`, `DENIED_ETHERTYPE`). A pod's veth carries nothing else, and the
//!    kernel strips a tag after TC ran and routes what it hid: passing it as "not IP" let a
//!    datagram inside VLAN-0 tags out of a pod under default-deny egress.
//!    A later fragment (no ports): pass when the first fragment of its datagram passed on this
//!    endpoint in the same direction within 2 s (`FRAGMENTS`, keyed by the addresses,
//!    protocol and IP id), else drop (`DENIED_FRAGMENT_UNKNOWN`). Never looked up in
//!    conntrack, where it would match a flow of port 0. A first fragment that passes below is
//!    recorded there.
//! 2. F tracked, epoch current: pass (replies of allowed flows: the fast path, one lookup).
//!    A plain IPv4 TCP or UDP packet (`packet::plain_ipv4_flow`) is looked up before the
//!    rest of step 1, on a short parse; any other packet, and one this step does not pass,
//!    goes through every step.
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
//!   c. D has no policy (id 0: no NetworkPolicy isolates it, no ClusterNetworkPolicy selects
//!      the pod): allow.
//!   d. `I = POLICY[(policy, identity(peer), protocol, port)]` (not looked up for WORLD, which
//!      no entry names: rules for every peer are `0.0.0.0/0` and `::/0` blocks). When no
//!      ClusterNetworkPolicy selects the pod in D (`endpoint_flags::tiered`) and I allows:
//!      allow, the only lookup on the common path.
//!   e. `C = POLICY[(policy, CIDRS_Vx[(policy, peer)], protocol, port)]`.
//!   f. Admin tier: the lower-ranked of I's and C's Admin matches. Accept: allow; Deny: deny;
//!      Pass or none: go on.
//!   g. The tier below: the lower-ranked of their other matches. A NetworkPolicy allow or a
//!      Baseline Accept: allow; a Baseline Deny: deny.
//!   h. No NetworkPolicy isolates D (`endpoint_flags::fallback_allow`): allow.
//!   i. D audited (`endpoint_flags::audit`: only audit-mode policies isolate it, or `--audit`):
//!      pass, counted and reported as audited.
//!   j. deny.

use aya_ebpf::{bindings::TC_ACT_SHOT, programs::TcContext};
use netwarden_common::{
    Endpoint, FlowKey, FlowState, IDENTITY_HOST, IDENTITY_WORLD, POLICY_NOT_ISOLATED, PolicyEntry,
    TierMatch, counter, direction, endpoint_flags, endpoint_state, flow_flags, rule_action,
};

use crate::{
    conntrack, endpoints,
    exit::{self, Attribution},
    fragments, frontends, mtls,
    packet::{self, Layout, Opening, Parsed, fragment},
    policy, settings,
};

/// `TC_ACT_UNSPEC`, which TCX reads as "next": allow, and let later programs have their say.
pub(crate) const ALLOW: i32 = -1;
pub(crate) const DENY: i32 = TC_ACT_SHOT;

#[inline(always)]
pub fn enforce(ctx: &TcContext, dir: u32) -> i32 {
    if passes_tracked_plain(ctx, dir) {
        return ALLOW;
    }
    let (flow, opening, layout) = match packet::parse(ctx, dir) {
        Ok(Parsed::Flow(flow, opening, layout)) => (flow, opening, layout),
        Ok(Parsed::Arp | Parsed::NetworkControl) => {
            return exit::pass(counter::ALLOWED_NETWORK_CONTROL, dir, ALLOW);
        }
        Ok(Parsed::Tagged) => return exit::drop_unreported(counter::DENIED_VLAN, dir, DENY),
        Ok(Parsed::OtherEthertype) => {
            return exit::drop_unreported(counter::DENIED_ETHERTYPE, dir, DENY);
        }
        Err(packet::Malformed) => {
            return exit::drop_unreported(counter::DENIED_MALFORMED, dir, DENY);
        }
    };
    if layout.fragment == fragment::LATER {
        return fragments::follow_first(&flow, dir, layout.fragment_id);
    }
    let verdict = enforce_flow(ctx, dir, &flow, opening, layout);
    // A test of a parsed value on every packet; only first fragments (rare) pay for an insert.
    if layout.fragment == fragment::FIRST && verdict == ALLOW {
        fragments::remember_first(&flow, dir, layout.fragment_id);
    }
    verdict
}

/// Step 2 of the module comment for the packet most packets are, before the rest of step 1's
/// parsing: a packet [`packet::plain_ipv4_flow`] reads, of a tracked flow under the current
/// epoch that the mTLS screen does not watch, passes (counted) as [`enforce_flow`] would pass
/// it. `false` sends the packet through every step (a TCP SYN always: it may reopen a closing
/// flow). Tracked packets take most of the classifiers' time in traffic, and most of them are
/// of this shape. Not inlined: its every way out would reach the full path with registers and
/// stack of its own, and the verifier would walk that path once for each.
#[inline(never)]
fn passes_tracked_plain(ctx: &TcContext, dir: u32) -> bool {
    let Some((flow, opening)) = packet::plain_ipv4_flow(ctx, dir) else {
        return false;
    };
    if opening == Opening::Yes && flow.protocol == packet::IPPROTO_TCP {
        return false;
    }
    let Some(tracked) = conntrack::entry_v4(&flow) else {
        return false;
    };
    // SAFETY: as in `enforce_flow`: the value of a successful lookup, valid for this run,
    // written in plain words.
    let tracked = unsafe { &mut *tracked };
    if tracked.flags != 0 || tracked.epoch != settings::current_epoch() {
        return false;
    }
    conntrack::note_activity(tracked, dir, opening);
    // Counted like any verdict; the caller returns `ALLOW`, the verdict counted here.
    exit::pass(counter::ALLOWED_TRACKED, dir, ALLOW);
    true
}

/// Steps 2 to 5 of the module comment for a packet of `flow` (whole, or a first fragment);
/// step 6 in [`decide_new_flow`].
#[inline(always)]
fn enforce_flow(
    ctx: &TcContext,
    dir: u32,
    flow: &FlowKey,
    opening: Opening,
    layout: Layout,
) -> i32 {
    let flow = *flow;
    let epoch = settings::current_epoch();
    // One conntrack lookup serves the fast path and, when the entry is stale, step 4: the
    // entry's memory stays valid for the whole program run.
    let tracked = conntrack::entry(&flow)
        .filter(|&tracked| !conntrack::reopened(tracked, &flow, dir, opening, epoch));
    if let Some(tracked) = tracked {
        // SAFETY: the pointer comes from a successful lookup; the kernel frees a map value
        // only after every program that may hold it has returned (RCU), so it stays valid for
        // this run. Another CPU may write the same entry meanwhile: plain word stores, where
        // the worst is a lost activity bit, which the flow's next packet sets again.
        let tracked = unsafe { &mut *tracked };
        if tracked.flags != 0 {
            let was_cut = tracked.flags & flow_flags::CUT != 0;
            let screened = mtls::screen(ctx, dir, tracked, &layout);
            if screened != mtls::PASS {
                if was_cut {
                    // Reported when the flow was cut.
                    return exit::drop_unreported(screened, dir, DENY);
                }
                return exit::drop_flow(&flow, dir, screened, &Attribution::policy(0), DENY);
            }
        }
        if tracked.epoch == epoch {
            conntrack::note_activity(tracked, dir, opening);
            return exit::pass(counter::ALLOWED_TRACKED, dir, ALLOW);
        }
    }
    let Some(endpoint) = endpoints::endpoint(flow.ifindex) else {
        return exit::drop_flow(
            &flow,
            dir,
            counter::DENIED_ENDPOINT_NOT_READY,
            &Attribution::policy(0),
            DENY,
        );
    };
    if dir == direction::EGRESS && !endpoints::owns_address(&flow) {
        return exit::drop_flow(
            &flow,
            dir,
            counter::DENIED_SPOOFED,
            &Attribution::policy(policy_of(&endpoint, dir)),
            DENY,
        );
    }
    if opening == Opening::Neighbour {
        // Leaving the pod, from an address the pod owns (checked above); towards it, from a
        // neighbour on the same link: pods on a bridge resolve each other directly, from their
        // own addresses (RFC 4861 7.1). Link plumbing either way: the pod's stack discards one
        // that was routed (a hop limit below 255), and a neighbour message opens no flow.
        return exit::pass(counter::ALLOWED_NETWORK_CONTROL, dir, ALLOW);
    }
    if opening == Opening::Error {
        // The quoted packet travelled the other way.
        let quoted_dir = if dir == direction::EGRESS {
            direction::INGRESS
        } else {
            direction::EGRESS
        };
        if conntrack::quotes_tracked_flow(
            ctx,
            flow.protocol,
            layout.quoted(),
            quoted_dir,
            flow.ifindex,
        ) {
            return exit::pass(counter::ALLOWED_RELATED, dir, ALLOW);
        }
    }
    if let Some(tracked) = tracked {
        // SAFETY: the same entry as above, valid for this run for the same reasons.
        let tracked = unsafe { &mut *tracked };
        return decide_tracked_again(&endpoint, &flow, tracked, dir, opening, epoch);
    }
    if dir == direction::EGRESS && frontends::is_frontend(&flow) {
        // Decided after the node's netfilter translated it, where the backend is known.
        return exit::pass(counter::DEFERRED_TO_TRANSLATION, dir, ALLOW);
    }
    decide_new_flow(ctx, &endpoint, &flow, dir, opening, &layout, epoch)
}

/// Step 4 of the module comment: a packet of `flow`, `tracked` under an older epoch, going
/// `dir`.
#[inline(always)]
fn decide_tracked_again(
    endpoint: &Endpoint,
    flow: &FlowKey,
    tracked: &mut FlowState,
    dir: u32,
    opening: Opening,
    epoch: u32,
) -> i32 {
    let origin = tracked.origin;
    // A translated flow is decided again on the peer it was judged on; one whose
    // translation was evicted cannot be, and is forgotten like a revoked one.
    let judged = conntrack::judged_flow(flow, tracked);
    let reason = match &judged {
        Some(judged) => decide(endpoint, origin, judged, opening_port(judged, origin)).reason,
        None => counter::DENIED_REVOKED,
    };
    if is_allowed(reason) {
        tracked.epoch = epoch;
        conntrack::note_activity(tracked, dir, opening);
        return exit::pass(counter::ALLOWED_TRACKED, dir, ALLOW);
    }
    conntrack::remove(flow);
    exit::drop_for_direction(
        &judged.unwrap_or(*flow),
        origin,
        dir,
        counter::DENIED_REVOKED,
        &Attribution::policy(policy_of(endpoint, dir)),
        DENY,
    )
}

/// Step 6 of the module comment: a packet of `flow`, which conntrack does not know, going
/// `dir`.
#[inline(always)]
fn decide_new_flow(
    ctx: &TcContext,
    endpoint: &Endpoint,
    flow: &FlowKey,
    dir: u32,
    opening: Opening,
    layout: &Layout,
    epoch: u32,
) -> i32 {
    let policy = policy_of(endpoint, dir);
    let Decision { reason, rule } = decide(endpoint, dir, flow, opening_port(flow, dir));
    if !is_allowed(reason) {
        let attribution = Attribution {
            policy,
            rule,
            frontend: 0,
        };
        return exit::drop_flow(flow, dir, reason, &attribution, DENY);
    }
    // Only a flow whose pod address the endpoint owns is tracked, whichever way it opened
    // (towards the pod, a broadcast, multicast or misrouted destination passes on its own):
    // the fast path skips the address check because no entry can hold anything else.
    if opening == Opening::Yes && (dir == direction::EGRESS || endpoints::owns_address(flow)) {
        let mut state = FlowState {
            origin: dir,
            epoch,
            flags: mtls::flags_for_new_flow(flow, dir),
            activity: 0,
            last_seen: conntrack::now_ticks(),
            client_seq: 0,
            hello_end: 0,
        };
        // A SYN may carry data (TCP Fast Open): the screen looks at it too.
        let screened = if state.flags == 0 {
            mtls::PASS
        } else {
            mtls::screen(ctx, dir, &mut state, layout)
        };
        conntrack::insert(flow, &state);
        if screened != mtls::PASS {
            return exit::drop_flow(flow, dir, screened, &Attribution::policy(policy), DENY);
        }
        return exit::pass_new_flow(
            flow,
            dir,
            reason,
            &Attribution {
                policy,
                rule,
                frontend: 0,
            },
            ALLOW,
        );
    }
    if mtls::untracked_payload_refused(ctx, flow, dir, layout.l4_offset, layout.ip_end) {
        return exit::drop_flow(
            flow,
            dir,
            counter::DENIED_PLAINTEXT_TO_STRICT,
            &Attribution::policy(policy),
            DENY,
        );
    }
    exit::pass(reason, dir, ALLOW)
}

/// The policy id `endpoint` is held to in `dir` ([`POLICY_NOT_ISOLATED`]: none).
#[inline(always)]
pub(crate) fn policy_of(endpoint: &Endpoint, dir: u32) -> u32 {
    if dir == direction::INGRESS {
        endpoint.ingress_policy
    } else {
        endpoint.egress_policy
    }
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

/// Whether `reason` names an allowed flow.
#[inline(always)]
pub(crate) fn is_allowed(reason: u32) -> bool {
    counter::passes(reason)
}

/// What [`decide`] found: the counter that names the reason, and the rule that decided (0 when
/// none did: a default, or a fail-closed drop).
pub(crate) struct Decision {
    pub(crate) reason: u32,
    pub(crate) rule: u32,
}

impl Decision {
    #[inline(always)]
    fn because(reason: u32) -> Self {
        Self { reason, rule: 0 }
    }

    #[inline(always)]
    fn by_rule(reason: u32, matched: TierMatch) -> Self {
        Self {
            reason,
            rule: matched.rule,
        }
    }
}

/// Steps 0 and a. to j. of the module comment (the lookups and their precedence: `policy.rs`).
#[inline(always)]
pub(crate) fn decide(endpoint: &Endpoint, dir: u32, flow: &FlowKey, port: u16) -> Decision {
    let packed = decide_packed(endpoint, dir, flow, port);
    Decision {
        reason: packed as u32,
        rule: (packed >> 32) as u32,
    }
}

/// [`decide`], its decision packed in one register (the rule in the high half): not inlined,
/// so its LPM keys have a stack frame of their own, and a struct returned from a BPF function
/// would go through the caller's stack, which the verifier refuses ("cannot return stack
/// pointer to the caller").
#[inline(never)]
fn decide_packed(endpoint: &Endpoint, dir: u32, flow: &FlowKey, port: u16) -> u64 {
    let decision = decide_in_frame(endpoint, dir, flow, port);
    u64::from(decision.rule) << 32 | u64::from(decision.reason)
}

#[inline(always)]
fn decide_in_frame(endpoint: &Endpoint, dir: u32, flow: &FlowKey, port: u16) -> Decision {
    if same_address(&flow.peer_addr, &flow.pod_addr) {
        // Only a flow decided after translation can be judged on the pod itself: a pod
        // reaching itself through its own Service (hairpin).
        return Decision::because(counter::ALLOWED_SELF);
    }
    let peer = policy::peer_identity(&flow.peer_addr);
    if dir == direction::INGRESS && peer == IDENTITY_HOST {
        return Decision::because(counter::ALLOWED_NODE);
    }
    if endpoint.state != endpoint_state::READY {
        return Decision::because(counter::DENIED_ENDPOINT_NOT_READY);
    }
    let policy = policy_of(endpoint, dir);
    if policy == POLICY_NOT_ISOLATED {
        return Decision::because(counter::ALLOWED_NOT_ISOLATED);
    }
    let flags = endpoint.flags;
    // No entry names WORLD: selectors match pods, and rules for every peer are compiled as
    // 0.0.0.0/0 and ::/0 blocks. An address outside the IP cache is decided by its CIDR class alone.
    let by_identity = if peer == IDENTITY_WORLD {
        None
    } else {
        policy::policy_entry(policy, peer, flow.protocol, port)
    };
    if flags & endpoint_flags::tiered(dir) == 0
        && let Some(entry) = by_identity
        && entry.below.action == rule_action::ALLOW
    {
        // No ClusterNetworkPolicy selects the pod: nothing can match before this allow.
        return Decision {
            reason: counter::ALLOWED_BY_POLICY,
            rule: entry.below.rule,
        };
    }
    let by_class = policy::cidr_class(policy, &flow.peer_addr)
        .and_then(|class| policy::policy_entry(policy, class, flow.protocol, port));
    let admin_of = |entry: Option<&PolicyEntry>| entry.map_or(TierMatch::NONE, |entry| entry.admin);
    let below_of = |entry: Option<&PolicyEntry>| entry.map_or(TierMatch::NONE, |entry| entry.below);
    let admin = admin_of(by_identity).first(admin_of(by_class));
    match admin.action {
        rule_action::ACCEPT => return Decision::by_rule(counter::ALLOWED_BY_CLUSTER_POLICY, admin),
        rule_action::DENY => return Decision::by_rule(counter::DENIED_BY_CLUSTER_POLICY, admin),
        // Pass, or no Admin rule matches: the tier below decides.
        _ => {}
    }
    let below = below_of(by_identity).first(below_of(by_class));
    match below.action {
        rule_action::ALLOW => return Decision::by_rule(counter::ALLOWED_BY_POLICY, below),
        rule_action::ACCEPT => return Decision::by_rule(counter::ALLOWED_BY_CLUSTER_POLICY, below),
        rule_action::DENY => return Decision::by_rule(counter::DENIED_BY_CLUSTER_POLICY, below),
        _ => {}
    }
    if flags & endpoint_flags::fallback_allow(dir) != 0 {
        // No NetworkPolicy isolates the direction; a ClusterNetworkPolicy selecting the pod
        // did not decide.
        return Decision::because(counter::ALLOWED_NOT_ISOLATED);
    }
    if flags & endpoint_flags::audit(dir) != 0 {
        // Only the policy's own verdict is audited: everything above that fails closed
        // (unknown endpoints, spoofing, malformed frames) is enforced whatever the mode, and so
        // is a ClusterNetworkPolicy's Deny.
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
