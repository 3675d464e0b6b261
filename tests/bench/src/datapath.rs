//! `netwarden-bench datapath`: what the classifier itself costs per packet, measured by the
//! kernel with `BPF_PROG_TEST_RUN` on a policy with 10,000 CIDR rules in force, beside 100
//! Admin and 100 Baseline ClusterNetworkPolicies selecting the pods (`tiers.rs`).
//!
//! Two paths: a packet of a tracked flow (the conntrack fast path), and a packet the program
//! must decide from scratch in the worst way — a peer that is no pod (identity lookup misses)
//! allowed by one of the 10,000 `ipBlock` rules (CIDR lookup, then the policy lookup again).
//! The second is measured with a TCP segment that is not a SYN, which is decided on every run
//! and never tracked; it leaves out only the conntrack insert of a real first packet.
//!
//! `BPF_PROG_TEST_RUN` adds a cost of its own to every run (the loop, the indirect call into
//! the program, its timer checks). An empty program is run beside the classifier in every
//! batch, and the classifier's own cost is its run minus that.

use std::{
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use anyhow::bail;
use ipnet::{IpNet, Ipv4Net};
use netwarden_datapath::{Capacity, Datapath, netlink::NodeNetwork};
use netwarden_model::{
    Cluster, LabelSelector, NetworkPolicy, Peer, Pod, PodRef, PolicyRef, PolicyTypes, PortRef,
    PortSpec, Protocol, Rule,
};
use netwarden_policy::Compiler;

const RULES: u32 = 10_000;
const IFINDEX: u32 = 1;
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

/// Runs the measurement and prints it.
pub fn run() -> anyhow::Result<Costs> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the datapath benchmark loads eBPF programs: run it as root");
    }
    let bpffs = std::env::temp_dir().join(format!("netwarden-bench-bpffs-{}", std::process::id()));
    crate::mount_private_bpffs(&bpffs)?;
    let result = measure(&bpffs);
    let _ = nix::mount::umount2(&bpffs, nix::mount::MntFlags::MNT_DETACH);
    let _ = std::fs::remove_dir(&bpffs);
    let costs = result?;
    println!(
        "classifier cost per packet (BPF_PROG_TEST_RUN, {RULES} CIDR rules and {} ClusterNetworkPolicies in force; median of {BATCHES} \
         interleaved batches of {RUNS_PER_BATCH} runs; own = run - empty program run of the same batch)",
        2 * crate::tiers::PER_TIER
    );
    println!(
        "  BPF_PROG_TEST_RUN alone (empty program):              {:>6.1} ns",
        ns(costs.empty_program)
    );
    println!("                                                           run      own");
    for (name, cost) in [
        (
            "tracked flow (conntrack hit):                   ",
            costs.tracked,
        ),
        (
            "decided from scratch, pod peer (identity match):",
            costs.pod_peer,
        ),
        (
            "decided from scratch, ipBlock peer (CIDR LPM):  ",
            costs.decided,
        ),
    ] {
        println!(
            "  {name}  {:>6.1} ns {:>6.1} ns",
            ns(cost.run),
            ns(cost.own)
        );
    }
    Ok(costs)
}

const BATCHES: usize = 15;
const RUNS_PER_BATCH: u32 = 200_000;

/// What one path costs per packet: medians over the batches.
#[derive(Clone, Copy)]
pub struct Cost {
    /// The whole `BPF_PROG_TEST_RUN` run.
    pub run: Duration,
    /// The run minus the empty program's run in the same batch: the classifier's own cost.
    pub own: Duration,
}

/// What each path costs per packet.
pub struct Costs {
    /// `BPF_PROG_TEST_RUN` with a program that does nothing.
    pub empty_program: Duration,
    /// A packet of a tracked flow.
    pub tracked: Cost,
    /// A packet decided from scratch, allowed by one of the 10,000 `ipBlock` rules.
    pub decided: Cost,
    /// A packet decided from scratch, allowed by a rule selecting its pod.
    pub pod_peer: Cost,
}

fn measure(bpffs: &std::path::Path) -> anyhow::Result<Costs> {
    let (mut datapath, _) = Datapath::open(bpffs, &Capacity::default())?;
    datapath.detached();
    let mut compiler = Compiler::new("node-0");
    let state = compiler.sync(cluster());
    let report = datapath.apply(state, &NodeNetwork::behind_loopback(&[IpAddr::V4(SERVER)]));
    if !report.errors.is_empty() {
        bail!("installing the benchmark policy: {:?}", report.errors);
    }

    // Open a tracked flow from the client; its next segments take the fast path.
    let (opened, _) = datapath.test_run(true, &frame(CLIENT, 40000, true), IFINDEX, 1)?;
    let tracked = frame(CLIENT, 40000, false);
    // A peer in the last of the 10,000 blocks, on the allowed port, mid-connection: decided
    // on every run, through the CIDR map.
    let block_peer = Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 16, 0, 0)) + RULES - 1);
    let decided = frame(block_peer, 40001, false);
    // The client pod, mid-connection on a port it never opened: decided on every run through
    // its identity (one IP-cache and one policy lookup), the common case of a new flow.
    let pod_peer = frame(CLIENT, 40002, false);

    let mut batches = Vec::with_capacity(BATCHES);
    for _ in 0..BATCHES {
        let (_, empty) = datapath.test_run_baseline(&tracked, RUNS_PER_BATCH)?;
        let run = |frame: &[u8]| -> anyhow::Result<Duration> {
            let (verdict, duration) = datapath.test_run(true, frame, IFINDEX, RUNS_PER_BATCH)?;
            if verdict != -1 || opened != -1 {
                bail!(
                    "a benchmark packet was not allowed: verdict {verdict} (opening SYN: {opened})"
                );
            }
            Ok(duration)
        };
        batches.push([empty, run(&tracked)?, run(&decided)?, run(&pod_peer)?]);
    }
    let median = |mut values: Vec<Duration>| {
        values.sort_unstable();
        values[values.len() / 2]
    };
    let cost = |path: usize| Cost {
        run: median(batches.iter().map(|batch| batch[path]).collect()),
        own: median(
            batches
                .iter()
                .map(|batch| batch[path].saturating_sub(batch[0]))
                .collect(),
        ),
    };
    Ok(Costs {
        empty_program: median(batches.iter().map(|batch| batch[0]).collect()),
        tracked: cost(1),
        decided: cost(2),
        pod_peer: cost(3),
    })
}

/// A server isolated by one policy: the client pod on port 80, and 10,000 single-address
/// `ipBlock` rules on port 80.
fn cluster() -> Cluster {
    let mut cluster = Cluster::default();
    for (name, ip, node) in [("server", SERVER, "node-0"), ("client", CLIENT, "node-1")] {
        let pod = Pod {
            id: PodRef {
                namespace: "bench".into(),
                name: name.into(),
            },
            labels: std::sync::Arc::new([("app".to_owned(), name.to_owned())].into()),
            node_name: Some(node.into()),
            ips: vec![IpAddr::V4(ip)],
            ports: Vec::new().into(),
            host_network: false,
            service_account: "default".into(),
            mtls: netwarden_model::PodMtls::default().into(),
        };
        cluster.pods.insert(pod.id.clone(), pod);
    }
    let port80 = vec![PortSpec {
        protocol: Protocol::Tcp,
        port: Some(PortRef::Number(80)),
        end_port: None,
    }];
    let mut ingress = vec![Rule {
        peers: vec![Peer::Pods {
            pod_selector: Some(LabelSelector {
                requirements: vec![netwarden_model::Requirement::In(
                    "app".into(),
                    vec!["client".into()],
                )],
            }),
            namespace_selector: None,
        }],
        ports: port80.clone(),
    }];
    let base = u32::from(Ipv4Addr::new(172, 16, 0, 0));
    ingress.extend((0..RULES).map(|index| Rule {
        peers: vec![Peer::IpBlock {
            cidr: IpNet::V4(Ipv4Net::new(Ipv4Addr::from(base + index), 32).expect("a /32")),
            except: Vec::new(),
        }],
        ports: port80.clone(),
    }));
    let policy = NetworkPolicy {
        enforcement: netwarden_model::Enforcement::Enforce,
        id: PolicyRef {
            namespace: "bench".into(),
            name: "server".into(),
        },
        pod_selector: LabelSelector {
            requirements: vec![netwarden_model::Requirement::In(
                "app".into(),
                vec!["server".into()],
            )],
        },
        policy_types: PolicyTypes {
            ingress: true,
            egress: false,
        },
        ingress,
        egress: Vec::new(),
    };
    cluster.policies.insert(policy.id.clone(), policy.into());
    crate::tiers::add(&mut cluster, "bench");
    cluster
}

/// An Ethernet/IPv4/TCP frame from `source:port` to the server's port 80.
fn frame(source: Ipv4Addr, port: u16, syn: bool) -> Vec<u8> {
    let mut frame = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x08, 0x00];
    frame.extend([0x45, 0, 0, 40, 0, 1, 0, 0, 64, 6, 0, 0]);
    frame.extend(source.octets());
    frame.extend(SERVER.octets());
    frame.extend(port.to_be_bytes());
    frame.extend(80_u16.to_be_bytes());
    frame.extend([
        0,
        0,
        0,
        1,
        0,
        0,
        0,
        0,
        0x50,
        if syn { 0x02 } else { 0x10 },
        0xff,
        0xff,
        0,
        0,
        0,
        0,
    ]);
    frame
}

fn ns(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e9
}
