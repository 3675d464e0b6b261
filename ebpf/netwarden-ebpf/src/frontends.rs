//! Service frontends: flows a pod opens to one are decided after the node's netfilter
//! translated them, on the backend they reach (`translated.rs`).
//!
//! Map: `FRONTENDS`, (address, protocol, port) of every frontend the node's netfilter
//! (kube-proxy) may translate -> the compiler's id of the frontend. Empty when the hook after
//! translation is not attached, so nothing is ever deferred to a hook that is not there.

use aya_ebpf::{bindings::BPF_F_NO_PREALLOC, macros::map, maps::HashMap};
use netwarden_common::{FlowKey, FrontendKey, FrontendValue, maps};

use crate::settings;

#[map]
static FRONTENDS: HashMap<FrontendKey, FrontendValue> =
    HashMap::pinned(maps::FRONTENDS.capacity, BPF_F_NO_PREALLOC);
pinned_as!(FRONTENDS);

/// Whether a packet leaving a pod goes to a Service frontend, which the node's netfilter may
/// translate before it is routed. Looks the frontend up only while one is installed, so a
/// node without Services pays nothing for them.
#[inline(always)]
pub(crate) fn is_frontend(flow: &FlowKey) -> bool {
    settings::frontends_installed()
        && frontend_of(&flow.peer_addr, flow.protocol, flow.peer_port) != 0
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
