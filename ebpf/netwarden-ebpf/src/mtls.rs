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
//! 2. While the flag is set, each client packet's payload is looked at. No payload (the rest
//!    of the handshake, pure ACKs): pass. A TLS handshake record (content type 22, version
//!    3.1 to 3.4) whose first message is a ClientHello (handshake type 1): pass and clear
//!    the flag — the rest of the flow is the ordinary fast path. Anything else (plaintext, a
//!    TLS alert, fewer than six bytes, garbage): drop, mark the flow `CUT_PLAINTEXT` and report
//!    it once.
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
use netwarden_common::{FlowKey, MtlsExemptPort, counter, direction, flow_flags};

use crate::packet::{self, IPPROTO_TCP, TLS_PREFIX_LEN, TcpPayload};

#[map]
static MTLS_STRICT_ENDPOINTS: HashMap<u32, u32> = HashMap::pinned(4096, BPF_F_NO_PREALLOC);

#[map]
static MTLS_EXEMPT_PORTS: HashMap<MtlsExemptPort, u32> = HashMap::pinned(16384, BPF_F_NO_PREALLOC);

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

/// Steps 2 and 3 of the module comment for a packet going `dir` of a flow with `flags`
/// (updated in place): [`PASS`], or the counter to drop the packet under. The caller reports
/// the flow when this packet is the one that cut it (its flags had no cut bit before). Returns
/// a plain integer, and is not inlined: the payload parse gets a stack frame of its own. The
/// packet is a TCP segment whose header starts at `l4_offset` (from `packet::Layout`).
#[inline(never)]
pub fn screen(ctx: &TcContext, dir: u32, flags: &mut u32, l4_offset: usize, ip_end: usize) -> u32 {
    if *flags & flow_flags::CUT_BY_IDENTITY != 0 {
        return counter::DENIED_BY_IDENTITY;
    }
    if *flags & flow_flags::CUT_PLAINTEXT != 0 {
        return counter::DENIED_PLAINTEXT_TO_STRICT;
    }
    // Only the client's packets are screened; a flagged flow was opened towards the pod.
    if *flags & flow_flags::AWAITING_CLIENT_HELLO == 0 || dir != direction::INGRESS {
        return PASS;
    }
    let mut start = [0_u8; TLS_PREFIX_LEN];
    match packet::tcp_payload_start(ctx, l4_offset, ip_end, &mut start) {
        TcpPayload::Empty => PASS,
        TcpPayload::Starts if is_client_hello(&start) => {
            *flags &= !flow_flags::AWAITING_CLIENT_HELLO;
            PASS
        }
        TcpPayload::Starts | TcpPayload::Short | TcpPayload::Malformed => {
            *flags = (*flags & !flow_flags::AWAITING_CLIENT_HELLO) | flow_flags::CUT_PLAINTEXT;
            counter::DENIED_PLAINTEXT_TO_STRICT
        }
    }
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
    packet::tcp_payload_start(ctx, l4_offset, ip_end, &mut start) != TcpPayload::Empty
}

/// A TLS record header of a handshake record (22), protocol version 3.1 (TLS 1.0, what TLS 1.3
/// clients write for compatibility) to 3.4, whose first handshake message is a ClientHello (1).
#[inline(always)]
fn is_client_hello(start: &[u8; TLS_PREFIX_LEN]) -> bool {
    start[0] == 0x16 && start[1] == 0x03 && (0x01..=0x04).contains(&start[2]) && start[5] == 0x01
}
