//! Reading the frame: bounds the verifier accepts, and unaligned loads.

use aya_ebpf::programs::TcContext;

use super::Malformed;

/// Reads a `T` at `offset` of the frame: straight from the packet when the bytes are in its
/// linear part (always the case for headers of traffic between pods), through
/// `bpf_skb_load_bytes` otherwise. A helper call per field costs more than the whole lookup.
#[inline(always)]
pub(crate) fn load<T: Copy>(ctx: &TcContext, offset: usize) -> Result<T, Malformed> {
    let (start, end) = frame_bounds(ctx);
    // At least two bytes: for one, LLVM turns `start + offset + 1 <= end` into
    // `start + offset < end`, from which the verifier learns no range. A byte at the very end
    // of a frame takes the helper instead.
    if start + offset + size_of::<T>().max(2) <= end {
        // SAFETY: the bytes lie between `data` and `data_end`, which the verifier checks too;
        // headers are not aligned, so the read is unaligned.
        return Ok(unsafe { core::ptr::read_unaligned((start + offset) as *const T) });
    }
    ctx.load(offset).map_err(|_| Malformed)
}

/// The address of `len` bytes at `offset` of the frame, with the verifier convinced they lie
/// inside it: one bounds check per header rather than one per field. Bytes outside the
/// linear part of the frame (never the case for headers of traffic between pods) are pulled
/// into it first; that invalidates every address taken before, so callers take one header
/// at a time. The fields are then read with [`Header`]'s unaligned loads.
#[inline(always)]
pub(super) fn header_at(ctx: &TcContext, offset: usize, len: usize) -> Result<Header, Malformed> {
    if let Some(header) = linear_header_at(ctx, offset, len) {
        return Ok(header);
    }
    let wanted = u32::try_from(offset + len).map_err(|_| Malformed)?;
    ctx.pull_data(wanted).map_err(|_| Malformed)?;
    linear_header_at(ctx, offset, len).ok_or(Malformed)
}

/// [`header_at`] without the pull: `None` when the bytes are not all in the frame's linear
/// part.
#[inline(always)]
pub(super) fn linear_header_at(ctx: &TcContext, offset: usize, len: usize) -> Option<Header> {
    let (start, end) = frame_bounds(ctx);
    let at = start + offset;
    (at + len <= end).then_some(Header(at))
}

/// `data` and `data_end` of the frame, read afresh. Volatile reads: LLVM would otherwise
/// merge them with earlier reads and re-extend the merged 32-bit value with shifts, which the
/// verifier refuses on a packet pointer.
#[inline(always)]
fn frame_bounds(ctx: &TcContext) -> (usize, usize) {
    let skb = ctx.skb.skb;
    // SAFETY: `skb` is the `__sk_buff` the kernel handed to the program; TC programs may read
    // its `data` and `data_end` fields.
    unsafe {
        (
            core::ptr::read_volatile(&raw const (*skb).data) as usize,
            core::ptr::read_volatile(&raw const (*skb).data_end) as usize,
        )
    }
}

/// One load of the width `$load` names from address `$at`, zero-extended to 64 bits.
/// Assembly, because LLVM assembles an unaligned load from single bytes and headers start at
/// any alignment; the kernel loads packet bytes at any alignment on the architectures with
/// efficient unaligned access (x86-64, arm64).
macro_rules! unaligned_load {
    ($load:literal, $at:expr) => {{
        let value: u64;
        // SAFETY: one load from bytes `header_at()` checked lie in the frame; the verifier
        // checks it again.
        unsafe {
            core::arch::asm!(
                $load,
                value = lateout(reg) value,
                at = in(reg) $at,
                options(nostack, readonly, preserves_flags),
            );
        }
        value
    }};
}

/// The address of a header whose bytes the verifier knows are in the frame.
#[derive(Clone, Copy)]
pub(super) struct Header(usize);

impl Header {
    /// The byte at `offset`.
    #[inline(always)]
    pub(super) fn u8(self, offset: usize) -> u8 {
        // SAFETY: `header_at()` checked that the bytes lie in the frame; so does the verifier.
        unsafe { *((self.0 + offset) as *const u8) }
    }

    /// The 16-bit field at `offset`, in memory order (network byte order).
    #[inline(always)]
    pub(super) fn u16(self, offset: usize) -> u16 {
        unaligned_load!("{value} = *(u16 *)({at} + 0)", self.0 + offset) as u16
    }

    /// The 32-bit field at `offset`, in memory order.
    #[inline(always)]
    pub(super) fn u32(self, offset: usize) -> u32 {
        unaligned_load!("{value} = *(u32 *)({at} + 0)", self.0 + offset) as u32
    }

    /// The 64-bit field at `offset`, in memory order.
    #[inline(always)]
    pub(super) fn u64(self, offset: usize) -> u64 {
        unaligned_load!("{value} = *(u64 *)({at} + 0)", self.0 + offset)
    }
}

/// No header the classifier reads lies further into a frame than this.
pub(crate) const MAX_HEADER_OFFSET: usize = 1024;
