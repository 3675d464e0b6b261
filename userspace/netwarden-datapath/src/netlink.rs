//! What the node's network looks like, read over rtnetlink: which veth leads to which pod.
//!
//! A point-to-point CNI (kindnet, Calico, Cilium in chaining mode...) installs a host route for
//! each pod IP through the pod's host-side veth. The route to a pod IP is therefore how the agent
//! finds the interface to enforce on, without any knowledge of the CNI.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use futures::{StreamExt as _, TryStreamExt as _, channel::mpsc::UnboundedReceiver};
use ipnet::IpNet;
use netlink_packet_route::{
    address::AddressAttribute,
    link::{InfoKind, LinkAttribute, LinkInfo},
    route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage},
};
use rtnetlink::{Handle, MulticastGroup, RouteMessageBuilder};

/// Reading the node's network failed.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The netlink socket could not be opened.
    #[error("cannot open a netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    /// A dump request failed.
    #[error("netlink {what} dump failed: {source}")]
    Dump {
        /// Links, addresses or routes.
        what: &'static str,
        /// The netlink error.
        source: rtnetlink::Error,
    },
}

/// A network interface of the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    /// Its index.
    pub index: u32,
    /// Its name.
    pub name: String,
    /// Whether it is a veth (the host side of a pod's link).
    pub is_veth: bool,
}

/// The routing-relevant state of the node's network namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeNetwork {
    /// Interfaces by index.
    pub interfaces: BTreeMap<u32, Interface>,
    /// Main-table unicast routes with an output interface.
    pub routes: Vec<(IpNet, u32)>,
    /// Every address configured on the node.
    pub addresses: Vec<IpAddr>,
}

impl NodeNetwork {
    /// A node whose only pod sits behind the loopback (ifindex 1, which always exists), reached
    /// through host routes to `addresses`: the network the programs see when they are run with
    /// `BPF_PROG_TEST_RUN` on crafted packets (tests, the classifier benchmark).
    #[must_use]
    pub fn behind_loopback(addresses: &[IpAddr]) -> Self {
        const LOOPBACK: u32 = 1;
        let mut network = Self::default();
        network.interfaces.insert(
            LOOPBACK,
            Interface {
                index: LOOPBACK,
                name: "lo".into(),
                is_veth: true,
            },
        );
        network.routes = addresses
            .iter()
            .map(|address| ((*address).into(), LOOPBACK))
            .collect();
        network
    }

    /// The veth that the node's longest-prefix route to `ip` leaves through, if that route
    /// goes through a veth. A default route through the uplink means "not a local pod".
    #[must_use]
    pub fn veth_for(&self, ip: IpAddr) -> Option<&Interface> {
        let (_, oif) = self
            .routes
            .iter()
            .filter(|(net, _)| net.contains(&ip))
            .max_by_key(|(net, _)| net.prefix_len())?;
        self.interfaces
            .get(oif)
            .filter(|interface| interface.is_veth)
    }

    /// Host routes (/32, /128) through veths: each is a pod's address, whether or not the agent
    /// knows the pod yet.
    pub fn veth_host_routes(&self) -> impl Iterator<Item = (IpAddr, &Interface)> {
        self.routes
            .iter()
            .filter(|(net, _)| net.prefix_len() == net.max_prefix_len())
            .filter_map(|(net, oif)| {
                let interface = self.interfaces.get(oif)?;
                interface.is_veth.then_some((net.addr(), interface))
            })
    }
}

/// A netlink handle for requests, plus a stream of link, address and route changes.
pub struct Netlink {
    handle: Handle,
    /// Fires whenever a link, address or route of the node changes.
    pub changes: UnboundedReceiver<()>,
}

impl Netlink {
    /// Opens the request socket and subscribes to change notifications. Must run inside a tokio
    /// runtime: the connections are spawned on it.
    pub fn open() -> Result<Self, NetlinkError> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Socket)?;
        tokio::spawn(connection);
        let (monitor, _, messages) = rtnetlink::new_multicast_connection(&[
            MulticastGroup::Link,
            MulticastGroup::Ipv4Ifaddr,
            MulticastGroup::Ipv6Ifaddr,
            MulticastGroup::Ipv4Route,
            MulticastGroup::Ipv6Route,
        ])
        .map_err(NetlinkError::Socket)?;
        tokio::spawn(monitor);
        let (sender, changes) = futures::channel::mpsc::unbounded();
        tokio::spawn(messages.for_each(move |_| {
            let _ = sender.unbounded_send(());
            async {}
        }));
        Ok(Self { handle, changes })
    }

    /// Dumps links, addresses and routes.
    pub async fn read(&self) -> Result<NodeNetwork, NetlinkError> {
        let mut network = NodeNetwork::default();
        let mut links = self.handle.link().get().execute();
        while let Some(link) = links
            .try_next()
            .await
            .map_err(|source| NetlinkError::Dump {
                what: "link",
                source,
            })?
        {
            let mut name = String::new();
            let mut is_veth = false;
            for attribute in &link.attributes {
                match attribute {
                    LinkAttribute::IfName(ifname) => name.clone_from(ifname),
                    LinkAttribute::LinkInfo(infos) => {
                        is_veth |= infos
                            .iter()
                            .any(|info| matches!(info, LinkInfo::Kind(InfoKind::Veth)));
                    }
                    _ => {}
                }
            }
            network.interfaces.insert(
                link.header.index,
                Interface {
                    index: link.header.index,
                    name,
                    is_veth,
                },
            );
        }

        let mut addresses = self.handle.address().get().execute();
        while let Some(address) =
            addresses
                .try_next()
                .await
                .map_err(|source| NetlinkError::Dump {
                    what: "address",
                    source,
                })?
        {
            for attribute in &address.attributes {
                if let AddressAttribute::Address(ip) | AddressAttribute::Local(ip) = attribute
                    && !network.addresses.contains(ip)
                {
                    network.addresses.push(*ip);
                }
            }
        }

        for request in [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
        ] {
            let mut routes = self.handle.route().get(request).execute();
            while let Some(route) =
                routes
                    .try_next()
                    .await
                    .map_err(|source| NetlinkError::Dump {
                        what: "route",
                        source,
                    })?
            {
                if let Some(entry) = main_table_route(&route) {
                    network.routes.push(entry);
                }
            }
        }
        Ok(network)
    }
}

fn main_table_route(route: &RouteMessage) -> Option<(IpNet, u32)> {
    let mut table = u32::from(route.header.table);
    let mut destination = None;
    let mut oif = None;
    for attribute in &route.attributes {
        match attribute {
            RouteAttribute::Table(id) => table = *id,
            RouteAttribute::Destination(RouteAddress::Inet(v4)) => {
                destination = Some(IpAddr::V4(*v4));
            }
            RouteAttribute::Destination(RouteAddress::Inet6(v6)) => {
                destination = Some(IpAddr::V6(*v6));
            }
            RouteAttribute::Oif(index) => oif = Some(*index),
            _ => {}
        }
    }
    if table != u32::from(RouteHeader::RT_TABLE_MAIN) {
        return None;
    }
    let prefix_len = route.header.destination_prefix_length;
    let destination = destination.unwrap_or(match route.header.address_family {
        netlink_packet_route::AddressFamily::Inet6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        _ => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    });
    Some((IpNet::new(destination, prefix_len).ok()?.trunc(), oif?))
}

#[cfg(test)]
mod tests {
    use super::{Interface, NodeNetwork};

    fn network() -> NodeNetwork {
        let mut network = NodeNetwork::default();
        network.interfaces.insert(
            2,
            Interface {
                index: 2,
                name: "eth0".into(),
                is_veth: false,
            },
        );
        network.interfaces.insert(
            7,
            Interface {
                index: 7,
                name: "veth1234".into(),
                is_veth: true,
            },
        );
        network.routes = vec![
            ("0.0.0.0/0".parse().unwrap(), 2),
            ("10.244.0.5/32".parse().unwrap(), 7),
        ];
        network
    }

    #[test]
    fn a_pod_is_found_through_its_host_route_and_never_through_the_uplink() {
        let network = network();
        assert_eq!(
            network
                .veth_for("10.244.0.5".parse().unwrap())
                .map(|i| i.index),
            Some(7)
        );
        assert_eq!(
            network.veth_for("10.244.0.6".parse().unwrap()),
            None,
            "default route via eth0 is not a pod"
        );
        assert_eq!(network.veth_host_routes().count(), 1);
    }
}
