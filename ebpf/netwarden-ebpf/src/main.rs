//! netwarden's datapath: two TC classifiers on every local pod's host-side veth.
//!
//! Entry points are named from the pod's point of view, as Cilium names them, because the veth's
//! TC hooks are the other way round: `from_container` runs on the veth's TC ingress and enforces
//! the pod's *egress* policy; `to_container` runs on its TC egress and enforces the pod's
//! *ingress* policy. Both return `TC_ACT_UNSPEC` (TCX "next") to allow, so programs of the
//! cluster's CNI attached to the same hook still run: netwarden only ever says no.
#![no_std]
#![no_main]

mod mtls;
mod packet;
mod verdict;

use aya_ebpf::{macros::classifier, programs::TcContext};
use netwarden_common::direction;

#[classifier]
pub fn from_container(ctx: TcContext) -> i32 {
    verdict::enforce(&ctx, direction::EGRESS)
}

#[classifier]
pub fn to_container(ctx: TcContext) -> i32 {
    verdict::enforce(&ctx, direction::INGRESS)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
