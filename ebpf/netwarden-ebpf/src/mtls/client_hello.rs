//! What the mTLS screen reads of a TCP payload: whether it starts with a TLS ClientHello.
//! The TCP and IP headers were parsed before (`packet.rs`); this reads the first bytes past
//! them.

use aya_ebpf::programs::TcContext;

use crate::packet::{MAX_HEADER_OFFSET, Malformed, load};

/// Bytes of a TCP payload the mTLS screen reads: a TLS record header (5) and the handshake
/// type (1).
pub(crate) const TLS_PREFIX_LEN: usize = 6;

/// What a TCP segment carries. Fieldless, so a non-inlined function can return it in a
/// register the verifier sees fully written (an enum carrying bytes is returned with undefined
/// padding bits, which the verifier refuses to read).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum TcpPayload {
    /// No payload (a handshake segment, a pure ACK, a FIN or RST without data).
    Empty,
    /// Fewer than [`TLS_PREFIX_LEN`] bytes: no TLS record header fits.
    Short,
    /// At least [`TLS_PREFIX_LEN`] bytes; the first ones were copied out.
    Starts,
    /// Not a TCP segment that could be parsed.
    Malformed,
}

/// The start of the TCP payload of the frame at `ctx`, whose TCP header starts at
/// `layout.l4_offset`, copied into `start` when it has one. The payload's end comes from the
/// IP length fields, never from the frame's length, so link-layer padding is not taken for
/// payload. Not inlined: a stack frame of its own.
#[inline(never)]
pub(crate) fn tcp_payload_start(
    ctx: &TcContext,
    l4_offset: usize,
    ip_end: usize,
    start: &mut [u8; TLS_PREFIX_LEN],
    length: &mut u32,
) -> TcpPayload {
    // The verifier needs the bound again in this frame.
    if l4_offset > MAX_HEADER_OFFSET {
        return TcpPayload::Malformed;
    }
    let Ok(data_offset) = load::<u8>(ctx, l4_offset + 12) else {
        return TcpPayload::Malformed;
    };
    let payload = l4_offset + usize::from(data_offset >> 4) * 4;
    #[expect(
        clippy::cast_possible_truncation,
        reason = "an skb is shorter than 4 GiB"
    )]
    if payload < ip_end {
        *length = (ip_end - payload) as u32;
    }
    if payload >= ip_end {
        TcpPayload::Empty
    } else if payload + TLS_PREFIX_LEN > ip_end {
        TcpPayload::Short
    } else {
        match load::<[u8; TLS_PREFIX_LEN]>(ctx, payload) {
            Ok(bytes) => {
                *start = bytes;
                TcpPayload::Starts
            }
            Err(Malformed) => TcpPayload::Malformed,
        }
    }
}

/// A TLS record header of a handshake record (22), protocol version 3.1 (TLS 1.0, what TLS 1.3
/// clients write for compatibility) to 3.4, whose first handshake message is a ClientHello (1).
#[inline(always)]
pub(crate) fn is_client_hello(start: &[u8; TLS_PREFIX_LEN]) -> bool {
    start[0] == 0x16 && start[1] == 0x03 && (0x01..=0x04).contains(&start[2]) && start[5] == 0x01
}
