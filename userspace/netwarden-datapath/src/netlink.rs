//! What the node's network looks like, read over rtnetlink: which veth leads to which pod.
//!
//! The agent finds a pod's interface without any knowledge of the CNI, two ways:
//!
//! - **The veth's other end.** The kernel names a veth's peer (`IFLA_LINK`) and, when the peer
//!   sits in another network namespace, that namespace's id as seen from the node
//!   (`IFLA_LINK_NETNSID`). The peer's addresses are dumped in that namespace
//!   (`RTM_GETADDR` with `IFA_TARGET_NETNSID`, Linux 4.20): the pod's own addresses, whatever
//!   the CNI's routing looks like. Bridge CNIs (flannel's `cni0`, the bridge plugin) need this:
//!   their pods are bridge ports without host routes.
//! - **Host routes.** A point-to-point CNI (kindnet, Calico, Cilium in chaining mode...) installs
//!   a route for each pod IP through the pod's host-side veth; where the peer's namespace is not
//!   visible, the route to a pod IP still finds its veth.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::Duration,
};

use futures::{
    StreamExt as _, TryStreamExt as _,
    channel::mpsc::{UnboundedReceiver, UnboundedSender},
};
use ipnet::IpNet;
use netlink_packet_route::{
    AddressFamily,
    address::{AddressAttribute, AddressMessage},
    link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage},
    route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage},
};
use rtnetlink::{Handle, MulticastGroup, RouteMessageBuilder};
use tracing::{debug, warn};

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
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Interface {
    /// Its index.
    pub index: u32,
    /// Its name.
    pub name: String,
    /// Whether it is a veth (the host side of a pod's link).
    pub is_veth: bool,
    /// The bridge it is a port of (`IFLA_MASTER`), if any.
    pub bridge: Option<u32>,
    /// The other end of a veth, when it sits in another network namespace the node sees.
    pub peer: Option<Peer>,
    /// Whether the node has a global address on this interface itself: a routed link (an
    /// uplink, a host behind the node), which no CNI gives a pod's host-side veth.
    pub has_node_address: bool,
}

/// The far end of a veth, in another network namespace (a pod's, usually).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Peer {
    /// The namespace's id as the node's namespace knows it (`IFLA_LINK_NETNSID`).
    pub netns_id: i32,
    /// The peer's index in that namespace (`IFLA_LINK`).
    pub index: u32,
    /// Its global addresses (no link-local ones), as dumped in that namespace; empty when it
    /// has none yet or the kernel would not show them.
    pub addresses: Vec<IpAddr>,
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
    /// `BPF_PROG_TEST_RUN` on crafted packets (tests, the classifier benchmark; feature
    /// `test-support`).
    #[cfg(feature = "test-support")]
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
                ..Interface::default()
            },
        );
        network.routes = addresses
            .iter()
            .map(|address| ((*address).into(), LOOPBACK))
            .collect();
        network
    }

    /// The veth that leads to the pod with address `ip`: the veth whose other end holds `ip`,
    /// else the one the node's longest-prefix route to `ip` leaves through, if that route goes
    /// through a veth. A default route through the uplink means "not a local pod".
    #[must_use]
    pub fn veth_for(&self, ip: IpAddr) -> Option<&Interface> {
        self.veth_holding(ip).or_else(|| self.veth_routed_to(ip))
    }

    fn veth_holding(&self, ip: IpAddr) -> Option<&Interface> {
        self.interfaces.values().find(|interface| {
            interface.is_veth
                && interface
                    .peer
                    .as_ref()
                    .is_some_and(|peer| peer.addresses.contains(&ip))
        })
    }

    fn veth_routed_to(&self, ip: IpAddr) -> Option<&Interface> {
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

    /// Veths that lead to a pod by their shape, whether or not the agent knows the pod: bridge
    /// ports, and veths whose other end has addresses of its own. A veth on which the node has
    /// a global address is a routed link (to a host behind the node), not a pod's.
    pub fn pod_veths(&self) -> impl Iterator<Item = &Interface> {
        self.interfaces.values().filter(|interface| {
            interface.is_veth
                && !interface.has_node_address
                && (interface.bridge.is_some()
                    || interface
                        .peer
                        .as_ref()
                        .is_some_and(|peer| !peer.addresses.is_empty()))
        })
    }

    /// Whether a veth that leads to a pod shows no address for it yet: its addresses may be
    /// configured inside the pod's namespace, which notifies nobody in the node's namespace.
    fn awaits_pod_addresses(&self) -> bool {
        self.interfaces.values().any(|interface| {
            interface.is_veth
                && !interface.has_node_address
                && interface.bridge.is_some()
                && interface
                    .peer
                    .as_ref()
                    .is_none_or(|peer| peer.addresses.is_empty())
        })
    }
}

/// Whether an address can be a pod's: not link-local (every interface has those).
fn is_global(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !v4.is_link_local() && !v4.is_loopback(),
        IpAddr::V6(v6) => !v6.is_unicast_link_local() && !v6.is_loopback(),
    }
}

/// First and longest wait before reading again while a pod's addresses are still missing.
const ADDRESS_RETRY_FIRST: Duration = Duration::from_millis(100);
const ADDRESS_RETRY_LONGEST: Duration = Duration::from_secs(10);

/// A netlink handle for requests, plus a stream of link, address and route changes.
pub struct Netlink {
    handle: Handle,
    /// Strict checking on (`NETLINK_GET_STRICT_CHK`, Linux 4.20): the kernel honours
    /// `IFA_TARGET_NETNSID` and the interface filter of an address dump only on such a socket.
    /// `None` where the kernel has no strict checking: pods are then found by routes alone.
    strict: Option<Handle>,
    /// Fires whenever a link, address or route of the node changes.
    pub changes: UnboundedReceiver<()>,
    wake: UnboundedSender<()>,
    retry: AddressRetry,
}

/// Reading again later while a bridge port shows no pod address: the pod's namespace notifies
/// nobody in the node's namespace when its addresses are configured. Backs off from
/// [`ADDRESS_RETRY_FIRST`] to [`ADDRESS_RETRY_LONGEST`] and starts over once none is missing.
#[derive(Default)]
struct AddressRetry {
    scheduled: std::sync::Arc<AtomicBool>,
    next_millis: AtomicU64,
}

impl AddressRetry {
    fn update(&self, missing: bool, wake: &UnboundedSender<()>) {
        if !missing {
            self.next_millis.store(0, Ordering::Relaxed);
            return;
        }
        if self.scheduled.swap(true, Ordering::AcqRel) {
            return;
        }
        let first = u64::try_from(ADDRESS_RETRY_FIRST.as_millis()).unwrap_or(u64::MAX);
        let longest = u64::try_from(ADDRESS_RETRY_LONGEST.as_millis()).unwrap_or(u64::MAX);
        let delay = self.next_millis.load(Ordering::Relaxed).max(first);
        self.next_millis
            .store(delay.saturating_mul(2).min(longest), Ordering::Relaxed);
        let scheduled = std::sync::Arc::clone(&self.scheduled);
        let wake = wake.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(delay)).await;
            scheduled.store(false, Ordering::Release);
            let _ = wake.unbounded_send(());
        });
    }
}

impl Netlink {
    /// Opens the request sockets and subscribes to change notifications. Must run inside a
    /// tokio runtime: the connections are spawned on it.
    pub fn open() -> Result<Self, NetlinkError> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Socket)?;
        tokio::spawn(connection);
        let strict = match rtnetlink::new_connection_with_strict_check() {
            Ok((connection, strict, _)) => {
                tokio::spawn(connection);
                Some(strict)
            }
            Err(error) => {
                warn!(%error, "no strict netlink checking (Linux < 4.20): pods are found by their host routes only, not behind bridges");
                None
            }
        };
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
        let wake = sender.clone();
        tokio::spawn(messages.for_each(move |_| {
            let _ = sender.unbounded_send(());
            async {}
        }));
        Ok(Self {
            handle,
            strict,
            changes,
            wake,
            retry: AddressRetry::default(),
        })
    }

    /// Dumps links, addresses and routes, and the addresses of every veth's other end.
    pub async fn read(&self) -> Result<NodeNetwork, NetlinkError> {
        let mut network = NodeNetwork::default();
        let mut bridges = BTreeSet::new();
        let mut links = self.handle.link().get().execute();
        while let Some(link) = links
            .try_next()
            .await
            .map_err(|source| NetlinkError::Dump {
                what: "link",
                source,
            })?
        {
            let (interface, is_bridge) = interface_of(&link);
            if is_bridge {
                bridges.insert(interface.index);
            }
            network.interfaces.insert(interface.index, interface);
        }
        for interface in network.interfaces.values_mut() {
            // Bonds and VRFs are masters too; only a bridge makes a veth a pod's port.
            interface.bridge = interface.bridge.filter(|master| bridges.contains(master));
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
            for ip in addresses_of(&address) {
                if is_global(ip)
                    && let Some(interface) = network.interfaces.get_mut(&address.header.index)
                {
                    interface.has_node_address = true;
                }
                if !network.addresses.contains(&ip) {
                    network.addresses.push(ip);
                }
            }
        }

        for interface in network.interfaces.values_mut() {
            if let Some(peer) = interface.peer.as_mut() {
                peer.addresses = self.peer_addresses(peer).await;
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
        self.retry
            .update(network.awaits_pod_addresses(), &self.wake);
        Ok(network)
    }

    /// The global addresses of a veth's other end, dumped in its namespace. A failed dump (a
    /// namespace that just went away, a kernel older than 4.20) leaves them empty: the veth is
    /// then found through its host route, or enforced on as an unknown pod if it is a bridge
    /// port.
    async fn peer_addresses(&self, peer: &Peer) -> Vec<IpAddr> {
        let mut found = Vec::new();
        let Some(strict) = &self.strict else {
            return found;
        };
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut request = strict.address().get();
            let message = request.message_mut();
            message.header.family = family;
            message.header.index = peer.index;
            message
                .attributes
                .push(AddressAttribute::TargetNetNsId(peer.netns_id));
            let mut dump = request.set_link_index_filter(peer.index).execute();
            loop {
                match dump.try_next().await {
                    Ok(Some(address)) => {
                        for ip in addresses_of(&address).filter(|ip| is_global(*ip)) {
                            if !found.contains(&ip) {
                                found.push(ip);
                            }
                        }
                    }
                    Ok(None) => break,
                    Err(error) => {
                        debug!(netns_id = peer.netns_id, index = peer.index, %error, "cannot read a veth peer's addresses");
                        break;
                    }
                }
            }
        }
        found
    }
}

/// What a link dump says of one interface, and whether it is a bridge.
fn interface_of(link: &LinkMessage) -> (Interface, bool) {
    let mut interface = Interface {
        index: link.header.index,
        ..Interface::default()
    };
    let mut peer_index = None;
    let mut peer_netns = None;
    let mut is_bridge = false;
    for attribute in &link.attributes {
        match attribute {
            LinkAttribute::IfName(ifname) => interface.name.clone_from(ifname),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    match info {
                        LinkInfo::Kind(InfoKind::Veth) => interface.is_veth = true,
                        LinkInfo::Kind(InfoKind::Bridge) => is_bridge = true,
                        _ => {}
                    }
                }
            }
            LinkAttribute::Controller(master) => interface.bridge = Some(*master),
            LinkAttribute::Link(index) => peer_index = Some(*index),
            LinkAttribute::LinkNetNsId(id) => peer_netns = Some(*id),
            _ => {}
        }
    }
    // Without a namespace id the peer is in the node's own namespace: not a pod.
    if let (true, Some(index), Some(netns_id)) = (interface.is_veth, peer_index, peer_netns) {
        interface.peer = Some(Peer {
            netns_id,
            index,
            addresses: Vec::new(),
        });
    }
    (interface, is_bridge)
}

fn addresses_of(message: &AddressMessage) -> impl Iterator<Item = IpAddr> + '_ {
    message
        .attributes
        .iter()
        .filter_map(|attribute| match attribute {
            AddressAttribute::Address(ip) | AddressAttribute::Local(ip) => Some(*ip),
            _ => None,
        })
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
        AddressFamily::Inet6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        _ => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    });
    Some((IpNet::new(destination, prefix_len).ok()?.trunc(), oif?))
}

#[cfg(test)]
mod tests {
    use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};

    use super::{Interface, NodeNetwork, Peer, interface_of, is_global};

    const UPLINK: u32 = 2;
    const CNI0: u32 = 3;

    fn veth(index: u32, bridge: Option<u32>, peer_addresses: &[&str]) -> Interface {
        Interface {
            index,
            name: format!("veth{index}"),
            is_veth: true,
            bridge,
            peer: Some(Peer {
                netns_id: i32::try_from(index).unwrap(),
                index: 2,
                addresses: peer_addresses
                    .iter()
                    .map(|ip| ip.parse().unwrap())
                    .collect(),
            }),
            has_node_address: false,
        }
    }

    /// A node with an uplink (default route), a bridge `cni0` holding the pod network's
    /// gateway (a /16 route through it), and whatever veths a test adds.
    fn node(veths: impl IntoIterator<Item = Interface>) -> NodeNetwork {
        let mut network = NodeNetwork::default();
        for (index, name) in [(UPLINK, "eth0"), (CNI0, "cni0")] {
            network.interfaces.insert(
                index,
                Interface {
                    index,
                    name: name.into(),
                    has_node_address: true,
                    ..Interface::default()
                },
            );
        }
        for veth in veths {
            network.interfaces.insert(veth.index, veth);
        }
        network.routes = vec![
            ("0.0.0.0/0".parse().unwrap(), UPLINK),
            ("10.244.0.0/16".parse().unwrap(), CNI0),
        ];
        network
    }

    fn index_for(network: &NodeNetwork, ip: &str) -> Option<u32> {
        network.veth_for(ip.parse().unwrap()).map(|i| i.index)
    }

    fn pod_veths(network: &NodeNetwork) -> Vec<u32> {
        network.pod_veths().map(|i| i.index).collect()
    }

    #[test]
    fn a_pod_is_found_through_its_host_route_and_never_through_the_uplink() {
        let mut network = node([Interface {
            index: 7,
            name: "veth1234".into(),
            is_veth: true,
            ..Interface::default()
        }]);
        network.routes.push(("10.244.0.5/32".parse().unwrap(), 7));
        assert_eq!(index_for(&network, "10.244.0.5"), Some(7));
        assert_eq!(
            index_for(&network, "10.244.0.6"),
            None,
            "the /16 through cni0 and the default route via eth0 are not a pod"
        );
        assert_eq!(network.veth_host_routes().count(), 1);
        assert!(
            pod_veths(&network).is_empty(),
            "no peer and no bridge: only its route makes it a pod's"
        );
    }

    #[test]
    fn a_bridge_port_is_found_through_the_addresses_of_its_other_end() {
        let network = node([
            veth(7, Some(CNI0), &["10.244.0.5", "fd00:10:244::5"]),
            veth(8, Some(CNI0), &["10.244.0.6"]),
        ]);
        assert_eq!(index_for(&network, "10.244.0.5"), Some(7));
        assert_eq!(index_for(&network, "fd00:10:244::5"), Some(7));
        assert_eq!(index_for(&network, "10.244.0.6"), Some(8));
        assert_eq!(index_for(&network, "10.244.0.9"), None);
        assert_eq!(network.veth_host_routes().count(), 0);
        assert_eq!(pod_veths(&network), [7, 8]);
        assert!(!network.awaits_pod_addresses());
    }

    #[test]
    fn the_other_end_wins_over_a_route_through_another_veth() {
        let mut network = node([veth(7, None, &["10.244.0.5"]), veth(8, None, &[])]);
        network.routes.push(("10.244.0.5/32".parse().unwrap(), 8));
        assert_eq!(index_for(&network, "10.244.0.5"), Some(7));
    }

    #[test]
    fn a_bridge_port_without_addresses_is_a_pod_veth_still_waiting_for_them() {
        let network = node([veth(7, Some(CNI0), &[])]);
        assert_eq!(pod_veths(&network), [7]);
        assert!(network.awaits_pod_addresses());
    }

    #[test]
    fn a_routed_link_to_a_host_is_not_a_pod_veth() {
        let mut host = veth(9, None, &["198.18.11.2"]);
        host.has_node_address = true;
        let network = node([host, veth(10, None, &["10.244.0.7"]), veth(11, None, &[])]);
        assert_eq!(
            pod_veths(&network),
            [10],
            "a host behind the node, and a veth leading nowhere known, are not pods"
        );
        assert!(!network.awaits_pod_addresses());
    }

    #[test]
    fn a_link_message_yields_kind_bridge_master_and_peer() {
        let mut link = LinkMessage::default();
        link.header.index = 7;
        link.attributes = vec![
            LinkAttribute::IfName("veth7".into()),
            LinkAttribute::Controller(CNI0),
            LinkAttribute::Link(2),
            LinkAttribute::LinkNetNsId(4),
            LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Veth)]),
        ];
        let (interface, is_bridge) = interface_of(&link);
        assert!(!is_bridge);
        assert_eq!(
            interface,
            Interface {
                index: 7,
                name: "veth7".into(),
                is_veth: true,
                bridge: Some(CNI0),
                peer: Some(Peer {
                    netns_id: 4,
                    index: 2,
                    addresses: Vec::new(),
                }),
                has_node_address: false,
            }
        );

        let mut bridge = LinkMessage::default();
        bridge.attributes = vec![LinkAttribute::LinkInfo(vec![LinkInfo::Kind(
            InfoKind::Bridge,
        )])];
        assert!(interface_of(&bridge).1);

        // A peer in the node's own namespace (no namespace id) is not a pod.
        link.attributes
            .retain(|a| !matches!(a, LinkAttribute::LinkNetNsId(_)));
        assert_eq!(interface_of(&link).0.peer, None);
    }

    #[test]
    fn link_local_addresses_are_nobody_s() {
        for ip in ["169.254.1.1", "fe80::1", "127.0.0.1", "::1"] {
            assert!(!is_global(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["10.244.0.5", "fd00:10:244::5", "198.18.0.2"] {
            assert!(is_global(ip.parse().unwrap()), "{ip}");
        }
    }
}
