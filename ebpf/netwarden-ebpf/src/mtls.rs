//! The mTLS screen: a new TCP flow to an mTLS-strict pod must open with a TLS ClientHello.
//!
//! Maps (pinned by name, written by the agent from the pods' `netwarden.dev/mtls` label and
//! `netwarden.dev/mtls-exempt-ports` annotation):
//!
//! - `MTLS_STRICT_ENDPOINTS`: ifindex of a strict pod's veth -> `MTLS_STRICT`.
//! - `MTLS_EXEMPT_PORTS`: (ifindex, pod port) of the ports on which a strict pod accepts
//!   plaintext.
//!
//! The screen runs after the L3/L4 decision, which it never loosens:
//!
//! 1. A TCP flow opened towards a strict pod, on a port that is not exempt, is tracked with
//!    `AWAITING_CLIENT_HELLO`.
//! 2. The client's SYN gives its ISN: `client_seq` = ISN + 1, where its stream starts
//!    (`ISN_KNOWN`). While a flag is set, each client packet is looked at. No payload: pass.
//!    Payload starting after ISN + 1: pass (the pod's stack uses it only after the first
//!    byte, which is screened). Payload starting before it (it may overlap it), or a second SYN
//!    with another ISN: drop. At ISN + 1, a TLS handshake record (content type 22, version 3.1
//!    to 3.4) whose first message is a ClientHello (handshake type 1): pass, and wait for the
//!    pod's ACK of it (`AWAITING_HELLO_ACK`, `hello_end`); a retransmission of it passes too.
//!    Anything else at ISN + 1 (plaintext, a TLS alert, fewer than six bytes, garbage): drop,
//!    mark the flow `CUT_PLAINTEXT` and report it once. When the pod's ACK covers `hello_end`,
//!    the pod's stream starts with the ClientHello: the flags clear and the rest of the flow
//!    is the ordinary fast path. A ClientHello the pod's stack discards (bad checksum, out of
//!    window) therefore opens nothing. The payload's end is the IP length field's, or the
//!    frame's when that field is 0 (BIG TCP).
//! 3. A flow marked cut (`CUT_PLAINTEXT`, or `CUT_BY_IDENTITY`, which the agent sets when the
//!    identity check refuses the connection) drops every packet, both ways, until its entry is
//!    evicted from the LRU table. A new connection on the same addresses and ports stays cut
//!    meanwhile: a client reusing its source port that soon is refused until the entry ages
//!    out (the price of a cut that a retransmitted SYN cannot undo).
//!
//! 4. A TCP packet with payload towards a strict pod on a screened port whose flow conntrack
//!    does not know (evicted from the LRU table, expired by the sweeper) drops: unscreened
//!    bytes never reach a strict pod.
//!
//! Strictness is decided when the flow opens: making a pod strict does not cut connections
//! already under way. UDP and other protocols are not screened (see `docs/identity.md`).

use aya_ebpf::{bindings::BPF_F_NO_PREALLOC, macros::map, maps::HashMap, programs::TcContext};
use netwarden_common::{
    FlowKey, FlowState, MtlsExemptPort, counter, direction, flow_activity, flow_flags, maps,
};

mod client_hello;

use client_hello::{TLS_PREFIX_LEN, TcpPayload, is_client_hello, tcp_payload_start};

use crate::packet::{self, IPPROTO_TCP, Layout};

#[map]
static MTLS_STRICT_ENDPOINTS: HashMap<u32, u32> =
    HashMap::pinned(maps::MTLS_STRICT_ENDPOINTS.capacity, BPF_F_NO_PREALLOC);
pinned_as!(MTLS_STRICT_ENDPOINTS);

#[map]
static MTLS_EXEMPT_PORTS: HashMap<MtlsExemptPort, u32> =
    HashMap::pinned(maps::MTLS_EXEMPT_PORTS.capacity, BPF_F_NO_PREALLOC);
pinned_as!(MTLS_EXEMPT_PORTS);

/// The screen's answer when the packet may go on to the ordinary decision.
pub const PASS: u32 = u32::MAX;

/// The flags a flow opened by a packet going `dir` starts with.
#[inline(always)]
pub fn flags_for_new_flow(flow: &FlowKey, dir: u32) -> u32 {
    if dir != direction::INGRESS || flow.protocol != IPPROTO_TCP {
        return 0;
    }
    if MTLS_STRICT_ENDPOINTS.get_ptr(flow.ifindex).is_none() {
        return 0;
    }
    let exempt = MtlsExemptPort {
        ifindex: flow.ifindex,
        port: flow.pod_port,
        padding: 0,
    };
    if MTLS_EXEMPT_PORTS.get_ptr(exempt).is_some() {
        return 0;
    }
    flow_flags::AWAITING_CLIENT_HELLO
}

/// Steps 2 and 3 of the module comment for a packet going `dir` of a flow in `state`
/// (updated in place): [`PASS`], or the counter to drop the packet under. The caller reports
/// the flow when this packet is the one that cut it (its flags had no cut bit before). Returns
/// a plain integer, and is not inlined: the payload parse gets a stack frame of its own. The
/// packet is a TCP segment laid out as `layout` says.
#[inline(never)]
pub fn screen(ctx: &TcContext, dir: u32, state: &mut FlowState, layout: &Layout) -> u32 {
    let flags = state.flags;
    if flags & flow_flags::CUT_BY_IDENTITY != 0 {
        return counter::DENIED_BY_IDENTITY;
    }
    if flags & flow_flags::CUT_PLAINTEXT != 0 {
        return counter::DENIED_PLAINTEXT_TO_STRICT;
    }
    if flags & (flow_flags::AWAITING_CLIENT_HELLO | flow_flags::AWAITING_HELLO_ACK) == 0 {
        return PASS;
    }
    let Ok(numbers) = packet::tcp_numbers(ctx, layout.l4_offset) else {
        return cut(state);
    };
    // A flagged flow was opened towards the pod: the server's segments only tell whether it
    // took the ClientHello (its ACK covers it), after which the flow is an ordinary one.
    if dir != direction::INGRESS {
        if flags & flow_flags::AWAITING_HELLO_ACK != 0
            && numbers.flags & packet::TCP_FLAG_ACK != 0
            && seq_at_or_after(numbers.ack, state.hello_end)
        {
            state.flags = flags & !SCREENING;
        }
        return PASS;
    }
    let mut payload_seq = numbers.seq;
    if numbers.flags & (packet::TCP_FLAG_SYN | packet::TCP_FLAG_ACK) == packet::TCP_FLAG_SYN {
        // The client's ISN: its first byte of payload is ISN + 1. Recorded once; a SYN with
        // another ISN would make the screen and the pod's stack disagree on where the stream
        // starts, so it drops (a new connection on the same ports may re-arm once the old one
        // is closing).
        let first = numbers.seq.wrapping_add(1);
        if flags & flow_flags::ISN_KNOWN == 0
            || (state.activity & flow_activity::CLOSING != 0
                && flags & flow_flags::AWAITING_CLIENT_HELLO != 0)
        {
            state.client_seq = first;
            state.flags = flags | flow_flags::ISN_KNOWN;
        } else if first != state.client_seq {
            return counter::DENIED_PLAINTEXT_TO_STRICT;
        }
        payload_seq = first;
    }
    let mut start = [0_u8; TLS_PREFIX_LEN];
    let mut length = 0;
    let payload = tcp_payload_start(
        ctx,
        layout.l4_offset,
        layout.ip_end,
        &mut start,
        &mut length,
    );
    if payload == TcpPayload::Empty {
        return PASS;
    }
    if state.flags & flow_flags::ISN_KNOWN == 0 {
        // Payload before the screen saw a SYN (a flow the hook after translation created,
        // whose SYN never came this way): nothing to measure it against.
        return counter::DENIED_PLAINTEXT_TO_STRICT;
    }
    if payload_seq != state.client_seq {
        // Bytes after the stream's first: the pod's stack uses them only after the first
        // byte, which is screened, so they may pass. Bytes before it may overlap it: drop
        // them (the client's own retransmission of nothing it needs).
        return if seq_at_or_after(payload_seq, state.client_seq) {
            PASS
        } else {
            counter::DENIED_PLAINTEXT_TO_STRICT
        };
    }
    // The stream's first byte, until the pod acknowledged what it took: a ClientHello (or its
    // retransmission), or the flow is cut.
    if payload == TcpPayload::Starts && is_client_hello(&start) {
        if state.flags & flow_flags::AWAITING_CLIENT_HELLO != 0 {
            state.hello_end = payload_seq.wrapping_add(length);
            state.flags =
                (state.flags & !flow_flags::AWAITING_CLIENT_HELLO) | flow_flags::AWAITING_HELLO_ACK;
        }
        return PASS;
    }
    cut(state)
}

/// The flags of a flow the screen is still watching.
const SCREENING: u32 =
    flow_flags::AWAITING_CLIENT_HELLO | flow_flags::AWAITING_HELLO_ACK | flow_flags::ISN_KNOWN;

/// Marks the flow cut for plaintext.
#[inline(always)]
fn cut(state: &mut FlowState) -> u32 {
    state.flags = (state.flags & !SCREENING) | flow_flags::CUT_PLAINTEXT;
    counter::DENIED_PLAINTEXT_TO_STRICT
}

/// Whether sequence number `seq` is `reference` or after it (modulo 2^32, RFC 793).
#[inline(always)]
fn seq_at_or_after(seq: u32, reference: u32) -> bool {
    seq.wrapping_sub(reference) < 1 << 31
}

/// Whether a TCP packet going `dir` that conntrack does not know (its entry was evicted or
/// expired) must drop because it carries payload to an mTLS-strict pod on a screened port:
/// the screen never saw this connection open, so it cannot vouch for the payload. Pure ACKs,
/// FINs and RSTs pass as the policy says; a connection that lost its entry this way breaks
/// rather than carry unscreened bytes (fail closed). Inlined: most packets leave at the first
/// test, and a call would cost them more than the test.
#[inline(always)]
pub fn untracked_payload_refused(
    ctx: &TcContext,
    flow: &FlowKey,
    dir: u32,
    l4_offset: usize,
    ip_end: usize,
) -> bool {
    if flags_for_new_flow(flow, dir) == 0 {
        return false;
    }
    let mut start = [0_u8; TLS_PREFIX_LEN];
    let mut length = 0;
    tcp_payload_start(ctx, l4_offset, ip_end, &mut start, &mut length) != TcpPayload::Empty
}
