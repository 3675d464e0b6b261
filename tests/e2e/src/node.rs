//! The simulated node: a node namespace and one namespace per pod or external host, a veth pair
//! each, with pods wired one of two ways (`model.cni`):
//!
//! - **point-to-point** (kindnet, Calico): a /32 (/128) pod address, a link-local gateway on the
//!   host side, and a host route to the pod through its veth;
//! - **bridge** (flannel's `cni0`, the CNI bridge plugin): the host side is a port of the bridge
//!   `cni0`, which holds the pod network's gateway addresses; the pod has its address with the
//!   pod network's prefix (/16, /64) and a default route via the gateway. No host routes.
//!
//! External hosts are not pods: each sits on a small subnet of its own behind the node (a /30
//! and a /64, like an uplink), reached through a connected route, never a host route, so the
//! agent does not take its veth for the veth of a pod it has not heard of.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use crate::{
    netns::{Netns, NetnsError},
    scenario::{Cni, IpFamily},
};

/// The node name in Pod objects and on the agent's command line.
pub const NODE_NAME: &str = "nwe2e-node";
/// The gateway every pod routes through; it sits on the host side of every veth.
const GATEWAY_V4: &str = "169.254.1.1";
const GATEWAY_V6: &str = "fe80::1";
/// The node's own addresses (on `node0`): `hostNetwork` clients dial from them, `NodePorts`
/// listen on them.
pub const NODE_V4: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 2);
pub const NODE_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x172, 0x18, 0, 0, 0, 0, 2);
/// The bridge of the bridge shape, named as flannel names it.
const BRIDGE: &str = "cni0";
/// The pod network's gateway on the bridge: the first address of the pod network.
const BRIDGE_GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
const BRIDGE_GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, 1);
/// The bridge's own MAC address, derived from its IPv4 gateway the way the CNI bridge plugin did
/// (`0a:58` and the address). Set explicitly because a bridge without one takes the lowest MAC
/// of its ports and changes it as pods come and go: pods' neighbour entries for the gateway
/// would then point at another pod's veth.
const BRIDGE_MAC: &str = "0a:58:0a:f4:00:01";
/// The pod network's prefixes, which every pod address lies in.
const POD_PREFIX_V4: u8 = 16;
const POD_PREFIX_V6: u8 = 64;
/// Hosts get `BASE + counter` as the last address byte.
const ADDRESS_BASE: u32 = 10;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("address space exhausted: more than {0} pods and hosts in one scenario")]
    Exhausted(u32),
}

/// Whether this kernel has IPv6 at all.
#[must_use]
pub fn ipv6_supported() -> bool {
    Path::new("/proc/sys/net/ipv6").exists()
}

/// The addresses of a pod or external host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Addresses {
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
}

impl Addresses {
    #[must_use]
    pub fn get(&self, family: IpFamily) -> Option<IpAddr> {
        match family {
            IpFamily::IPv4 => self.v4.map(IpAddr::V4),
            IpFamily::IPv6 => self.v6.map(IpAddr::V6),
        }
    }

    /// Every address, IPv4 first.
    #[must_use]
    pub fn all(&self) -> Vec<IpAddr> {
        self.v4
            .map(IpAddr::V4)
            .into_iter()
            .chain(self.v6.map(IpAddr::V6))
            .collect()
    }

    fn pick(families: &[IpFamily], v4: Ipv4Addr, v6: Ipv6Addr) -> Self {
        Self {
            v4: families.contains(&IpFamily::IPv4).then_some(v4),
            v6: families.contains(&IpFamily::IPv6).then_some(v6),
        }
    }
}

impl fmt::Display for Addresses {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let all: Vec<String> = self.all().iter().map(ToString::to_string).collect();
        f.write_str(&all.join(", "))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndpointKind {
    Pod,
    External,
}

/// A pod or external host: its namespace and how it hangs off the node.
#[derive(Debug)]
pub struct Endpoint {
    pub netns: Netns,
    /// The host side of the veth pair, in the node namespace.
    pub host_interface: String,
    pub addresses: Addresses,
}

/// The node namespace and the counter that names veths and picks addresses.
#[derive(Debug)]
pub struct Node {
    prefix: String,
    families: Vec<IpFamily>,
    cni: Cni,
    netns: Netns,
    /// Endpoints wired so far: names veths and namespaces.
    counter: u32,
    /// Endpoints given fresh addresses so far: picks the next one.
    fresh_addresses: u32,
}

impl Node {
    /// Creates the node namespace: forwarding on, `lo` up, the node's own addresses on a
    /// dummy interface, and for the bridge shape the bridge. Namespaces are named
    /// `<prefix>node`, `<prefix>p<N>`, `<prefix>x<N>`.
    pub async fn create(prefix: &str, families: &[IpFamily], cni: Cni) -> Result<Self, NodeError> {
        let netns = Netns::create(&format!("{prefix}node")).await?;
        let ipv6 = ipv6_supported();
        // Reverse-path filtering off, as on the machines we checked, and explicitly: a spoofed
        // source must reach netwarden's check, not be dropped by the node's routing first.
        let mut sysctls = vec![
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
        ];
        if ipv6 {
            // Without DAD the link-local gateway of a new veth is usable at once.
            sysctls.extend([
                "net.ipv6.conf.all.forwarding=1",
                "net.ipv6.conf.default.accept_dad=0",
            ]);
        }
        netns.sysctl(&sysctls).await?;
        netns.ip_batch(&["link set lo up".to_owned()]).await?;
        // Kernels built without CONFIG_DUMMY get a bridge without ports instead: equally inert,
        // and the node addresses only need to be local.
        if netns
            .ip_batch(&["link add node0 type dummy".to_owned()])
            .await
            .is_err()
        {
            netns
                .ip_batch(&["link add node0 type bridge".to_owned()])
                .await?;
        }
        let mut commands = vec![
            "link set node0 up".to_owned(),
            format!("address add {NODE_V4}/32 dev node0"),
        ];
        if ipv6 {
            commands.push(format!("address add {NODE_V6}/128 dev node0 nodad"));
        }
        netns.ip_batch(&commands).await?;
        if cni == Cni::Bridge {
            create_bridge(&netns, families, ipv6).await?;
        }
        Ok(Self {
            prefix: prefix.to_owned(),
            families: families.to_vec(),
            cni,
            netns,
            counter: 0,
            fresh_addresses: 0,
        })
    }

    #[must_use]
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// The node's own addresses in the model's families.
    #[must_use]
    pub fn addresses(&self) -> Addresses {
        Addresses::pick(&self.families, NODE_V4, NODE_V6)
    }

    /// Creates and wires a pod or external host. `reuse` gives it the addresses of a pod that
    /// was deleted earlier instead of fresh ones.
    pub async fn wire(
        &mut self,
        kind: EndpointKind,
        reuse: Option<Addresses>,
    ) -> Result<Endpoint, NodeError> {
        self.counter += 1;
        let n = self.counter;
        let (role, host_interface) = match kind {
            EndpointKind::Pod => ("p", format!("vp{n}")),
            EndpointKind::External => ("x", format!("vx{n}")),
        };
        // Only fresh addresses count against the address space: a long run (the soak) wires
        // many more endpoints than that over time, reusing the addresses of deleted ones.
        let addresses = if let Some(reused) = reuse {
            reused
        } else {
            self.fresh_addresses(kind)?
        };
        let netns = Netns::create(&format!("{}{role}{n}", self.prefix)).await?;
        if addresses.v6.is_some() {
            // Set before eth0 appears so that its link-local address skips DAD too.
            netns
                .sysctl(&[
                    "net.ipv6.conf.all.accept_dad=0",
                    "net.ipv6.conf.default.accept_dad=0",
                ])
                .await?;
        }

        let mut host_side = vec![
            format!(
                "link add {host_interface} type veth peer name eth0 netns {}",
                netns.name()
            ),
            format!("link set {host_interface} up"),
        ];
        let mut pod_side = vec!["link set lo up".to_owned(), "link set eth0 up".to_owned()];
        let wiring = match (kind, self.cni) {
            (EndpointKind::External, _) => wire_routed_host,
            (EndpointKind::Pod, Cni::Ptp) => wire_point_to_point,
            (EndpointKind::Pod, Cni::Bridge) => wire_bridge_port,
        };
        wiring(&host_interface, addresses, &mut host_side, &mut pod_side);
        self.netns.ip_batch(&host_side).await?;
        netns.ip_batch(&pod_side).await?;
        Ok(Endpoint {
            netns,
            host_interface,
            addresses,
        })
    }

    /// The next addresses never given out, for a pod or an external host.
    fn fresh_addresses(&mut self, kind: EndpointKind) -> Result<Addresses, NodeError> {
        self.fresh_addresses += 1;
        let host = u8::try_from(self.fresh_addresses + ADDRESS_BASE)
            .map_err(|_| NodeError::Exhausted(255 - ADDRESS_BASE))?;
        Ok(match kind {
            EndpointKind::Pod => Addresses::pick(
                &self.families,
                Ipv4Addr::new(10, 244, 0, host),
                Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, u16::from(host)),
            ),
            EndpointKind::External => Addresses::pick(
                &self.families,
                Ipv4Addr::new(198, 18, host, 2),
                Ipv6Addr::new(0xfd00, 0x198, 0x18, u16::from(host), 0, 0, 0, 2),
            ),
        })
    }

    /// Removes a pod or host. The veth goes first: a namespace is destroyed asynchronously by
    /// the kernel, and its veth and host route could otherwise linger into the next step (and
    /// clash with a pod that reuses the address).
    pub async fn unwire(&self, endpoint: Endpoint) -> Result<(), NodeError> {
        self.netns
            .ip_batch(&[format!("link del {}", endpoint.host_interface)])
            .await?;
        Ok(endpoint.netns.delete().await?)
    }

    /// Deletes the node namespace; pods and hosts must have been deleted first.
    pub async fn delete(self) -> Result<(), NodeError> {
        Ok(self.netns.delete().await?)
    }
}

/// The bridge of the bridge shape, up and holding the gateways, with bridged traffic passed
/// through the node's iptables and ip6tables as kube-proxy requires of bridge CNIs. These
/// `br_netfilter` switches are per network namespace (since Linux 5.3): only the node's
/// namespace is changed.
async fn create_bridge(netns: &Netns, families: &[IpFamily], ipv6: bool) -> Result<(), NodeError> {
    let mut commands = vec![
        format!("link add {BRIDGE} address {BRIDGE_MAC} type bridge"),
        format!("link set {BRIDGE} up"),
    ];
    if families.contains(&IpFamily::IPv4) {
        commands.push(format!(
            "address add {BRIDGE_GATEWAY_V4}/{POD_PREFIX_V4} dev {BRIDGE}"
        ));
    }
    if ipv6 && families.contains(&IpFamily::IPv6) {
        commands.push(format!(
            "address add {BRIDGE_GATEWAY_V6}/{POD_PREFIX_V6} dev {BRIDGE} nodad"
        ));
    }
    netns.ip_batch(&commands).await?;
    let mut sysctls = vec!["net.bridge.bridge-nf-call-iptables=1"];
    if ipv6 {
        sysctls.push("net.bridge.bridge-nf-call-ip6tables=1");
    }
    netns.sysctl(&sysctls).await?;
    Ok(())
}

/// An external host on a subnet of its own behind the node (a /30 and a /64, like an uplink):
/// a connected route, never a host route, and the node's address on the host side.
fn wire_routed_host(
    host_interface: &str,
    addresses: Addresses,
    host_side: &mut Vec<String>,
    pod_side: &mut Vec<String>,
) {
    if let Some(v4) = addresses.v4 {
        let gateway = Ipv4Addr::from(u32::from(v4) - 1);
        host_side.push(format!("address add {gateway}/30 dev {host_interface}"));
        pod_side.extend([
            format!("address add {v4}/30 dev eth0"),
            format!("route add default via {gateway} dev eth0"),
        ]);
    }
    if let Some(v6) = addresses.v6 {
        let gateway = Ipv6Addr::from(u128::from(v6) - 1);
        host_side.push(format!(
            "address add {gateway}/64 dev {host_interface} nodad"
        ));
        pod_side.extend([
            format!("address add {v6}/64 dev eth0 nodad"),
            format!("route add default via {gateway} dev eth0"),
        ]);
    }
}

/// A pod's veth as point-to-point CNIs wire it: a link-local gateway on the host side, the
/// pod's address alone (/32, /128), and a host route to it through the veth.
fn wire_point_to_point(
    host_interface: &str,
    addresses: Addresses,
    host_side: &mut Vec<String>,
    pod_side: &mut Vec<String>,
) {
    host_side.push(format!("address add {GATEWAY_V4}/32 dev {host_interface}"));
    if let Some(v4) = addresses.v4 {
        host_side.push(format!("route add {v4}/32 dev {host_interface}"));
        pod_side.extend([
            format!("address add {v4}/32 dev eth0"),
            format!("route add {GATEWAY_V4} dev eth0 scope link"),
            format!("route add default via {GATEWAY_V4} dev eth0"),
        ]);
    }
    if let Some(v6) = addresses.v6 {
        host_side.extend([
            format!("address add {GATEWAY_V6}/64 dev {host_interface} nodad"),
            format!("route add {v6}/128 dev {host_interface}"),
        ]);
        pod_side.extend([
            format!("address add {v6}/128 dev eth0 nodad"),
            format!("route add default via {GATEWAY_V6} dev eth0"),
        ]);
    }
}

/// A pod's veth as the bridge plugin wires it with `hairpinMode`: the host side a port of the
/// bridge (hairpin on, so a pod reaches itself through a Service), the pod's addresses with the
/// pod network's prefixes and a default route via the gateway.
fn wire_bridge_port(
    host_interface: &str,
    addresses: Addresses,
    host_side: &mut Vec<String>,
    pod_side: &mut Vec<String>,
) {
    host_side.extend([
        format!("link set {host_interface} master {BRIDGE}"),
        format!("link set {host_interface} type bridge_slave hairpin on"),
    ]);
    if let Some(v4) = addresses.v4 {
        pod_side.extend([
            format!("address add {v4}/{POD_PREFIX_V4} dev eth0"),
            format!("route add default via {BRIDGE_GATEWAY_V4} dev eth0"),
        ]);
    }
    if let Some(v6) = addresses.v6 {
        pod_side.extend([
            format!("address add {v6}/{POD_PREFIX_V6} dev eth0 nodad"),
            format!("route add default via {BRIDGE_GATEWAY_V6} dev eth0"),
        ]);
    }
}
