//! Which veth enforces for which pod, on the shapes CNIs give a node: no kernel needed.

use std::net::IpAddr;

use netwarden_common::endpoint_state;
use netwarden_model::PodRef;
use netwarden_policy::{DatapathState, LocalEndpoint};

use super::desired_endpoints;
use crate::{
    netlink::{Interface, NodeNetwork, Peer},
    report::ApplyReport,
};

const CNI0: u32 = 3;

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn bridge_port(index: u32, peer_addresses: &[&str]) -> Interface {
    Interface {
        index,
        name: format!("veth{index}"),
        is_veth: true,
        bridge: Some(CNI0),
        peer: Some(Peer {
            netns_id: i32::try_from(index).unwrap(),
            index: 2,
            addresses: peer_addresses.iter().map(|text| ip(text)).collect(),
        }),
        has_node_address: false,
    }
}

fn bridge_node(ports: impl IntoIterator<Item = Interface>) -> NodeNetwork {
    let mut network = NodeNetwork::default();
    network.interfaces.insert(
        CNI0,
        Interface {
            index: CNI0,
            name: "cni0".into(),
            has_node_address: true,
            ..Interface::default()
        },
    );
    for port in ports {
        network.interfaces.insert(port.index, port);
    }
    network.routes = vec![("10.244.0.0/16".parse().unwrap(), CNI0)];
    network
}

fn state(pods: &[(&str, &[&str])]) -> DatapathState {
    let mut state = DatapathState::default();
    for (name, ips) in pods {
        let pod = PodRef {
            namespace: "x".into(),
            name: (*name).into(),
        };
        let ips = ips.iter().map(|text| ip(text)).collect();
        let endpoint = LocalEndpoint {
            ingress: Some(1),
            ..LocalEndpoint::unisolated(pod.clone(), ips, 100)
        };
        state.endpoints.insert(pod, endpoint);
    }
    state
}

/// `(ifindex, pod, state, addresses)` of one desired endpoint.
type Seen = (u32, Option<String>, u32, Vec<IpAddr>);

/// Every desired endpoint, and the pending pods.
fn endpoints(state: &DatapathState, network: &NodeNetwork) -> (Vec<Seen>, Vec<String>) {
    let mut report = ApplyReport::default();
    let desired = desired_endpoints(state, network, &mut report);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let endpoints = desired
        .into_iter()
        .map(|(index, endpoint)| {
            (
                index,
                endpoint.pod.map(|pod| pod.to_string()),
                endpoint.value.state,
                endpoint.addresses,
            )
        })
        .collect();
    let pending = report.pending.iter().map(ToString::to_string).collect();
    (endpoints, pending)
}

#[test]
fn pods_on_a_bridge_are_found_through_their_veth_s_other_end() {
    let network = bridge_node([
        bridge_port(7, &["10.244.0.11", "fd00:10:244::11"]),
        bridge_port(8, &["10.244.0.12"]),
    ]);
    let (endpoints, pending) = endpoints(
        &state(&[
            ("a", &["10.244.0.11", "fd00:10:244::11"]),
            ("b", &["10.244.0.12"]),
        ]),
        &network,
    );
    assert!(pending.is_empty(), "{pending:?}");
    assert_eq!(
        endpoints,
        [
            (
                7,
                Some("x/a".into()),
                endpoint_state::READY,
                vec![ip("10.244.0.11"), ip("fd00:10:244::11")]
            ),
            (
                8,
                Some("x/b".into()),
                endpoint_state::READY,
                vec![ip("10.244.0.12")]
            ),
        ]
    );
}

#[test]
fn a_bridge_port_no_known_pod_leads_to_fails_closed_with_its_addresses() {
    let network = bridge_node([
        bridge_port(7, &["10.244.0.11"]),
        bridge_port(8, &["10.244.0.12"]),
        bridge_port(9, &[]),
    ]);
    let (endpoints, pending) = endpoints(&state(&[("a", &["10.244.0.11"])]), &network);
    assert!(pending.is_empty(), "{pending:?}");
    assert_eq!(
        endpoints,
        [
            (
                7,
                Some("x/a".into()),
                endpoint_state::READY,
                vec![ip("10.244.0.11")]
            ),
            (8, None, endpoint_state::UNKNOWN, vec![ip("10.244.0.12")]),
            (9, None, endpoint_state::UNKNOWN, vec![]),
        ]
    );
}

#[test]
fn a_pod_whose_address_is_not_seen_yet_is_pending_and_its_port_unknown() {
    let network = bridge_node([bridge_port(7, &[])]);
    let (endpoints, pending) = endpoints(&state(&[("a", &["10.244.0.11"])]), &network);
    assert_eq!(pending, ["x/a"]);
    assert_eq!(endpoints, [(7, None, endpoint_state::UNKNOWN, vec![])]);
}

#[test]
fn a_point_to_point_pod_is_still_found_through_its_host_route() {
    let mut network = NodeNetwork::default();
    network.interfaces.insert(
        7,
        Interface {
            index: 7,
            name: "cali7".into(),
            is_veth: true,
            ..Interface::default()
        },
    );
    network.interfaces.insert(
        8,
        Interface {
            index: 8,
            name: "cali8".into(),
            is_veth: true,
            ..Interface::default()
        },
    );
    network.routes = vec![
        ("10.244.0.11/32".parse().unwrap(), 7),
        ("10.244.0.12/32".parse().unwrap(), 8),
    ];
    let (endpoints, pending) = endpoints(&state(&[("a", &["10.244.0.11"])]), &network);
    assert!(pending.is_empty(), "{pending:?}");
    assert_eq!(
        endpoints,
        [
            (
                7,
                Some("x/a".into()),
                endpoint_state::READY,
                vec![ip("10.244.0.11")]
            ),
            (8, None, endpoint_state::UNKNOWN, vec![ip("10.244.0.12")]),
        ]
    );
}
