//! ClusterNetworkPolicies in force during the datapath benchmarks: 100 of each tier whose
//! subject is the benchmark's namespace, so both of its pods are tiered both ways (a new flow
//! pays both policy lookups and the tiers' comparison), and none of whose rules matches the
//! measured traffic: the verdicts, and so the comparison with iptables and nftables, stay the
//! same.

use ipnet::{IpNet, Ipv4Net};
use netwarden_model::{
    Action, Cluster, ClusterNetworkPolicy, ClusterPeer, ClusterPort, ClusterRule, ClusterSubject,
    LabelSelector, Protocol, Requirement, Tier,
};

/// How many ClusterNetworkPolicies of each tier are in force.
pub const PER_TIER: u16 = 100;

/// Adds [`PER_TIER`] Admin and [`PER_TIER`] Baseline ClusterNetworkPolicies selecting
/// `namespace` to `cluster`: Admin ones deny, then pass, towards addresses and namespaces the
/// benchmark never uses; Baseline ones deny the same.
pub fn add(cluster: &mut Cluster, namespace: &str) {
    for tier in [Tier::Admin, Tier::Baseline] {
        for index in 0..PER_TIER {
            let policy = policy(tier, index, namespace);
            cluster.cluster_policies.insert(policy.name.clone(), policy);
        }
    }
}

fn policy(tier: Tier, index: u16, namespace: &str) -> ClusterNetworkPolicy {
    let selector = |key: &str, value: String| LabelSelector {
        requirements: vec![Requirement::In(key.to_owned(), vec![value])],
    };
    // 198.18.0.0/15 is for benchmarks (RFC 2544): no benchmark peer lives there.
    let [high, low] = index.to_be_bytes();
    let network =
        IpNet::V4(Ipv4Net::new(std::net::Ipv4Addr::new(198, 18, high, low), 32).expect("a /32"));
    let elsewhere = ClusterPeer::Namespaces(selector(
        "kubernetes.io/metadata.name",
        format!("bench-elsewhere-{index}"),
    ));
    let port = ClusterPort::Range {
        protocol: Protocol::Tcp,
        first: 10_000 + index,
        last: 10_000 + index,
    };
    let rule = |action, name: &str, peers: Vec<ClusterPeer>| ClusterRule {
        name: Some(name.to_owned()),
        action,
        peers,
        ports: vec![port.clone()],
    };
    let mut egress = vec![rule(
        Action::Deny,
        "deny-elsewhere",
        vec![ClusterPeer::Networks(vec![network]), elsewhere.clone()],
    )];
    let mut ingress = vec![rule(
        Action::Deny,
        "deny-elsewhere",
        vec![elsewhere.clone()],
    )];
    if tier == Tier::Admin {
        egress.push(rule(
            Action::Pass,
            "pass-elsewhere",
            vec![elsewhere.clone()],
        ));
        ingress.push(rule(Action::Pass, "pass-elsewhere", vec![elsewhere]));
    }
    let tier_name = match tier {
        Tier::Admin => "admin",
        Tier::Baseline => "baseline",
    };
    ClusterNetworkPolicy {
        name: format!("bench-{tier_name}-{index:03}"),
        tier,
        priority: index,
        subject: ClusterSubject::Namespaces(selector(
            "kubernetes.io/metadata.name",
            namespace.to_owned(),
        )),
        ingress,
        egress,
        problems: Vec::new(),
    }
}
