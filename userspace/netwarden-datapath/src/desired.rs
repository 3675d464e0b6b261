//! Which interface enforces for which endpoint, from the compiled state and the node's network.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use netwarden_common::{Endpoint, endpoint_state};
use netwarden_model::PodRef;
use netwarden_policy::{DatapathState, map_keys};

use crate::{
    error::ApplyError,
    netlink::{self, NodeNetwork},
    report::{ApplyReport, Unenforced, UnenforcedEndpoint},
};

/// What one local endpoint should look like in the maps.
#[derive(Clone, Debug)]
pub(crate) struct DesiredEndpoint {
    /// The pod, or `None` for a veth no known pod is routed through yet.
    pub pod: Option<PodRef>,
    /// Its `ENDPOINTS` entry.
    pub value: Endpoint,
    /// The host-side veth.
    pub interface: String,
    /// The addresses the pod may send from.
    pub addresses: Vec<IpAddr>,
}

/// Which interface enforces for which endpoint: local pods through the veth that leads to their
/// IP (its other end holds it, or the node routes it there), and veths that lead to a pod no
/// local pod object describes yet (a pod the agent has not heard of): those are unknown
/// endpoints, allowed only node traffic and only from the addresses seen on them.
pub(crate) fn desired_endpoints(
    state: &DatapathState,
    network: &NodeNetwork,
    report: &mut ApplyReport,
) -> BTreeMap<u32, DesiredEndpoint> {
    let mut desired: BTreeMap<u32, DesiredEndpoint> = BTreeMap::new();
    let mut known_ips = BTreeSet::new();
    for endpoint in state.endpoints.values() {
        known_ips.extend(endpoint.ips.iter().copied());
        let Some(interface) = endpoint.ips.iter().find_map(|ip| network.veth_for(*ip)) else {
            report.pending.push(endpoint.pod.clone());
            report.unenforced.push(UnenforcedEndpoint {
                pod: Some(endpoint.pod.clone()),
                interface: None,
                reason: Unenforced::InterfaceMissing,
            });
            continue;
        };
        // The same value the lookup mirror reads (`netwarden_policy::lookup`).
        let value = map_keys::ready_endpoint(endpoint);
        if let Some(DesiredEndpoint {
            pod: Some(other), ..
        }) = desired.get(&interface.index)
        {
            report.errors.push(ApplyError::InterfaceTaken {
                pod: endpoint.pod.clone(),
                interface: interface.name.clone(),
                other: other.clone(),
            });
            continue;
        }
        desired.insert(
            interface.index,
            DesiredEndpoint {
                pod: Some(endpoint.pod.clone()),
                value,
                interface: interface.name.clone(),
                addresses: endpoint.ips.clone(),
            },
        );
    }
    // A veth routed to an address no local pod has yet: a pod the agent has not heard of.
    for (ip, interface) in network.veth_host_routes() {
        if !known_ips.contains(&ip) {
            add_unknown_endpoint(&mut desired, interface, &[ip]);
        }
    }
    // A bridge port, or a veth whose other end has addresses, that no known pod's address
    // leads to: also a pod the agent has not heard of, whatever its addresses are.
    for interface in network.pod_veths() {
        let addresses = interface
            .peer
            .as_ref()
            .map_or(&[][..], |peer| &peer.addresses);
        add_unknown_endpoint(&mut desired, interface, addresses);
    }
    desired
}

/// Every (endpoint, address it may send from) of `desired`.
pub(crate) fn owned_addresses(desired: &BTreeMap<u32, DesiredEndpoint>) -> BTreeSet<(u32, IpAddr)> {
    desired
        .iter()
        .flat_map(|(ifindex, endpoint)| endpoint.addresses.iter().map(move |ip| (*ifindex, *ip)))
        .collect()
}

/// Makes `interface` an unknown endpoint sending from `addresses` (among others already
/// recorded), unless it enforces for a known pod.
fn add_unknown_endpoint(
    desired: &mut BTreeMap<u32, DesiredEndpoint>,
    interface: &netlink::Interface,
    addresses: &[IpAddr],
) {
    let endpoint = desired
        .entry(interface.index)
        .or_insert_with(|| DesiredEndpoint {
            pod: None,
            value: Endpoint {
                state: endpoint_state::UNKNOWN,
                ..Endpoint::default()
            },
            interface: interface.name.clone(),
            addresses: Vec::new(),
        });
    if endpoint.pod.is_some() {
        return;
    }
    for ip in addresses {
        if !endpoint.addresses.contains(ip) {
            endpoint.addresses.push(*ip);
        }
    }
}

#[cfg(test)]
mod tests;
