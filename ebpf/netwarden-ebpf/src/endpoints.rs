//! The local pods the programs enforce for, and the addresses each owns.
//!
//! Maps (written by the agent only; any change bumps the policy epoch, which sends every
//! tracked flow back through the whole decision):
//!
//! - `ENDPOINTS`: ifindex of a pod's host-side veth -> its ingress and egress policy ids and
//!   its lifecycle state. A policy id of 0 means "not isolated in this direction".
//! - `ENDPOINT_ADDRESSES`: (ifindex, address) of every address a local pod owns: a packet
//!   leaving the pod from any other is spoofed.
//! - `ENDPOINT_OF_ADDRESS`: address -> the ifindex of the local pod owning it. The hook after
//!   translation sees packets on the node's routing path, where only the addresses tell which
//!   pod sent or receives them (anti-spoofing on the pod's own interface vouches for the
//!   source).

use aya_ebpf::{bindings::BPF_F_NO_PREALLOC, macros::map, maps::HashMap};
use netwarden_common::{Endpoint, EndpointAddress, FlowKey, IpKey, maps};

#[map]
static ENDPOINTS: HashMap<u32, Endpoint> =
    HashMap::pinned(maps::ENDPOINTS.capacity, BPF_F_NO_PREALLOC);
pinned_as!(ENDPOINTS);

#[map]
static ENDPOINT_ADDRESSES: HashMap<EndpointAddress, u32> =
    HashMap::pinned(maps::ENDPOINT_ADDRESSES.capacity, BPF_F_NO_PREALLOC);
pinned_as!(ENDPOINT_ADDRESSES);

#[map]
static ENDPOINT_OF_ADDRESS: HashMap<IpKey, u32> =
    HashMap::pinned(maps::ENDPOINT_OF_ADDRESS.capacity, BPF_F_NO_PREALLOC);
pinned_as!(ENDPOINT_OF_ADDRESS);

/// The endpoint behind host-side veth `ifindex`, if the agent knows it.
#[inline(always)]
pub(crate) fn endpoint(ifindex: u32) -> Option<Endpoint> {
    // SAFETY: the value is copied out at once; a concurrent update can at worst make this
    // packet see the endpoint's previous state, which was valid too.
    unsafe { ENDPOINTS.get(ifindex) }.copied()
}

/// Whether the pod behind the packet's interface owns its source address.
#[inline(always)]
pub(crate) fn owns_address(flow: &FlowKey) -> bool {
    let key = EndpointAddress {
        ifindex: flow.ifindex,
        addr: flow.pod_addr,
    };
    ENDPOINT_ADDRESSES.get_ptr(key).is_some()
}

/// The ifindex of the local pod owning `addr`, if one does.
#[inline(always)]
pub(crate) fn endpoint_of(addr: &[u8; 16]) -> Option<u32> {
    ENDPOINT_OF_ADDRESS
        .get_ptr(IpKey { addr: *addr })
        // SAFETY: the pointer comes from a successful lookup and is read at once.
        .map(|ifindex| unsafe { *ifindex })
}
