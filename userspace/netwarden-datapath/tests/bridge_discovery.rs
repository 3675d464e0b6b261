//! The kernel side of finding pods on a bridge: a pod's host-side veth is a port of `cni0`, its
//! addresses live only in its own namespace, and no host route leads to it. The node's
//! [`Netlink`] must see the port, its peer, and the peer's addresses once they are configured,
//! although configuring them notifies nobody in the node's namespace.
//!
//! Needs root (it creates two network namespaces of its own, removed however the test ends);
//! skipped with a message otherwise. Nothing outside those namespaces is touched.

use std::{
    fs::File,
    net::IpAddr,
    process::Command,
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use netwarden_datapath::netlink::{Netlink, NodeNetwork};
use nix::sched::{CloneFlags, setns};

/// How long the agent may take to notice addresses set inside a pod's namespace.
const NOTICE_WITHIN: Duration = Duration::from_secs(3);

/// Rounds of 100 ms without a notification that count as the node's namespace being quiet.
const QUIET_ROUNDS: u32 = 15;

/// Named namespaces, deleted on drop.
struct Namespaces(Vec<String>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("runs ip");
    assert!(status.success(), "ip {}", args.join(" "));
}

/// Waits for the reader to be woken and reads again, as the agent does, until `found` holds.
fn woken_until(
    netlink: &mut Netlink,
    runtime: &tokio::runtime::Runtime,
    found: impl Fn(&NodeNetwork) -> bool,
) -> NodeNetwork {
    let deadline = Instant::now() + NOTICE_WITHIN;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let woken = runtime.block_on(async {
            tokio::time::timeout(left, netlink.changes.next())
                .await
                .is_ok()
        });
        assert!(woken, "nothing woke the reader within {NOTICE_WITHIN:?}");
        let network = runtime.block_on(netlink.read()).expect("reads the node");
        if found(&network) {
            return network;
        }
    }
}

/// Namespaces `node` and `pod`: a bridge `cni0` in `node` holding the gateway, and the pod's
/// veth `vb1` a port of it, up, with no pod address yet.
fn wire_bridge_port(node: &str, pod: &str) {
    ip(&["netns", "add", node]);
    ip(&["netns", "add", pod]);
    // No IPv6 link-local addresses on the node's side: their late notifications (after DAD)
    // would wake the reader for reasons of their own.
    for command in [
        "link add cni0 type bridge",
        "link set cni0 addrgenmode none",
        "link set cni0 up",
        "address add 10.244.0.1/16 dev cni0",
        &format!("link add vb1 type veth peer name eth0 netns {pod}"),
        "link set vb1 master cni0",
        "link set vb1 addrgenmode none",
        "link set vb1 up",
    ] {
        let mut args = vec!["-n", node];
        args.extend(command.split(' '));
        ip(&args);
    }
    ip(&["-n", pod, "link", "set", "eth0", "up"]);
}

/// Lets the setup's notifications arrive (carrier changes reach the node up to a second late)
/// and forgets them.
fn settle(netlink: &mut Netlink, runtime: &tokio::runtime::Runtime) {
    runtime.block_on(async {
        let mut quiet = 0;
        while quiet < QUIET_ROUNDS {
            tokio::time::sleep(Duration::from_millis(100)).await;
            quiet += 1;
            while netlink.changes.try_recv().is_ok() {
                quiet = 0;
            }
        }
    });
}

#[test]
fn a_bridge_port_s_pod_addresses_are_read_in_the_pod_s_namespace() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: creating network namespaces needs root");
        return;
    }
    let node = format!("nwdisc-{}-node", std::process::id());
    let pod = format!("nwdisc-{}-pod", std::process::id());
    let _namespaces = Namespaces(vec![node.clone(), pod.clone()]);
    wire_bridge_port(&node, &pod);

    let node_file = File::open(format!("/run/netns/{node}")).expect("opens the node namespace");
    let expected: Vec<IpAddr> = vec![
        "10.244.0.5".parse().unwrap(),
        "fd00:10:244::5".parse().unwrap(),
    ];
    let pod_name = pod.clone();
    // The reader's sockets are created on a thread of their own inside the node's namespace.
    std::thread::spawn(move || {
        setns(&node_file, CloneFlags::CLONE_NEWNET).expect("enters the node namespace");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let mut netlink = runtime
            .block_on(async { Netlink::open() })
            .expect("opens netlink");

        let network = runtime.block_on(netlink.read()).expect("reads the node");
        let port = network
            .interfaces
            .values()
            .find(|interface| interface.name == "vb1")
            .expect("vb1 is seen");
        let bridge = network
            .interfaces
            .values()
            .find(|interface| interface.name == "cni0")
            .expect("cni0 is seen");
        assert!(port.is_veth);
        assert_eq!(port.bridge, Some(bridge.index), "vb1 is a port of cni0");
        let peer = port.peer.as_ref().expect("the peer's namespace is visible");
        assert!(
            peer.addresses.is_empty(),
            "only link-local so far: {peer:?}"
        );
        assert_eq!(
            network.pod_veths().map(|i| i.index).collect::<Vec<_>>(),
            [port.index],
            "a bridge port is a pod's veth before its addresses are known"
        );
        assert!(bridge.has_node_address);

        // Read once more after the node is quiet, as the agent would on its last wake: only
        // the reader's own retry can notice what happens inside the pod's namespace now.
        settle(&mut netlink, &runtime);
        let network = runtime.block_on(netlink.read()).expect("reads the node");
        assert!(network.veth_for(expected[0]).is_none());
        for address in &expected {
            let mut args = vec!["-n", &pod_name, "address", "add"];
            let with_prefix = match address {
                IpAddr::V4(_) => format!("{address}/16"),
                IpAddr::V6(_) => format!("{address}/64"),
            };
            args.extend([with_prefix.as_str(), "dev", "eth0"]);
            if address.is_ipv6() {
                args.push("nodad");
            }
            ip(&args);
        }
        let network = woken_until(&mut netlink, &runtime, |network| {
            network
                .veth_for(expected[0])
                .is_some_and(|interface| interface.name == "vb1")
        });
        let port = network
            .veth_for(expected[1])
            .expect("found by its IPv6 address");
        assert_eq!(port.name, "vb1");
        assert_eq!(
            port.peer.as_ref().map(|peer| peer.addresses.clone()),
            Some(expected),
            "global addresses only, no link-local one"
        );
        assert_eq!(
            network.veth_host_routes().count(),
            0,
            "no host routes on a bridge"
        );
    })
    .join()
    .expect("the reader thread passes");
}
