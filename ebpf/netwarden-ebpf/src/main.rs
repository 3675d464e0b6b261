//! netwarden's datapath: two TC classifiers on every local pod's host-side veth.
//!
//! Entry points are named from the pod's point of view, as Cilium names them, because the veth's
//! TC hooks are the other way round: `from_container` runs on the veth's TC ingress and enforces
//! the pod's *egress* policy; `to_container` runs on its TC egress and enforces the pod's
//! *ingress* policy. Both return `TC_ACT_UNSPEC` (TCX "next") to allow, so programs of the
//! cluster's CNI attached to the same hook still run: netwarden only ever says no.
#![no_std]
#![no_main]
// Unaligned packet loads in BPF assembly (`packet::Header`).
#![feature(asm_experimental_arch)]
#![expect(
    clippy::inline_always,
    reason = "a BPF call costs more than most bodies here, and what is inlined decides what fits \
              the verifier's 512-byte stack: every `inline` is chosen, and says so where it is \
              `never`"
)]

/// Fails the build unless the map static `$map` is named as `netwarden_common::maps` names
/// it: `#[map]` exports the static's name as the map's name in the object, which is the name
/// the agent opens and pins the map by.
macro_rules! pinned_as {
    ($map:ident) => {
        const _: () = netwarden_common::maps::$map.assert_named(stringify!($map));
    };
}

mod conntrack;
mod endpoints;
mod exit;
mod fragments;
mod frontends;
mod mtls;
mod packet;
mod policy;
mod settings;
mod translated;
mod verdict;

use aya_ebpf::{macros::classifier, programs::TcContext};
use netwarden_common::direction;

#[classifier]
#[expect(
    clippy::needless_pass_by_value,
    reason = "aya's #[classifier] hands the context over by value"
)]
pub fn from_container(ctx: TcContext) -> i32 {
    verdict::enforce(&ctx, direction::EGRESS)
}

#[classifier]
#[expect(
    clippy::needless_pass_by_value,
    reason = "aya's #[classifier] hands the context over by value"
)]
pub fn to_container(ctx: TcContext) -> i32 {
    verdict::enforce(&ctx, direction::INGRESS)
}

/// The hook after translation (`translated.rs`): a `BPF_PROG_TYPE_NETFILTER` program on the
/// node's POSTROUTING and `LOCAL_IN` hooks. It lives in the `classifier` section only so that
/// aya parses the object and creates its maps; the agent loads it as a netfilter program of
/// its own (`netwarden-datapath/src/netfilter.rs`).
#[unsafe(no_mangle)]
#[unsafe(link_section = "classifier")]
#[expect(
    clippy::no_mangle_with_rust_abi,
    reason = "declared as aya's #[classifier] declares its programs, so it is built as they are"
)]
pub fn after_translation(ctx: *mut translated::NfContext) -> i32 {
    translated::hook(ctx)
}

/// Allows everything and reads nothing: never attached, only run by benchmarks so that
/// `BPF_PROG_TEST_RUN`'s own cost per run can be measured beside the classifiers' and told
/// apart from theirs.
#[classifier]
pub fn test_run_baseline(_ctx: TcContext) -> i32 {
    -1
}

/// Writes the kernel's jiffies, the clock the classifiers stamp flows with, over the first 8
/// bytes of the frame it runs on. Never attached: the agent's conntrack sweeper runs it with
/// `BPF_PROG_TEST_RUN` and reads the frame back, userspace having no other way to read jiffies.
#[classifier]
#[expect(
    clippy::needless_pass_by_value,
    reason = "aya's #[classifier] hands the context over by value"
)]
pub fn conntrack_clock(ctx: TcContext) -> i32 {
    // SAFETY: bpf_jiffies64 has no preconditions.
    let jiffies = unsafe { aya_ebpf::helpers::bpf_jiffies64() };
    match ctx.store(0, &jiffies, 0) {
        Ok(()) => 0,
        Err(_) => 1,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
