//! Differential test: the compiled maps, looked up the way the eBPF program looks them up, must
//! agree with the reference evaluator on every flow of random clusters.
//!
//! `PROPTEST_CASES` sets the number of clusters (default 2,000; `cargo xtask test --thorough`
//! runs 50,000).
//!
//! The generator (`netwarden_policy::test_support`, shared with the datapath's packet
//! differential test) also makes ClusterNetworkPolicies (both tiers, priorities with ties, every
//! action, every peer kind, named ports) and Nodes, which the compiler folds into the same
//! entries; the evaluator's own properties check the tiers' promises on top
//! (`cluster_policy_tiers_keep_their_promises`).

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};

use netwarden_model::{
    Action, Cluster, ClusterNetworkPolicy, ClusterPeer, ClusterRule, ClusterSubject, LabelSelector,
    Pod, PodRef, Tier,
};
use netwarden_policy::{
    Compiler, DatapathState, Direction,
    evaluate::{self, Flow, SideVerdict},
    lookup::{Conntrack, Maps, Opening, Packet, Verdict},
    test_support::{
        LOCAL, NAMESPACES, NODE_ADDRESS, OTHER_NODE_ADDRESS, OUTSIDE, PORTS, PROTOCOLS, add_pod,
        cluster, cluster_with, labels, set_namespace,
    },
};
use proptest::{collection::vec, prelude::*, sample::select};

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|cases| cases.parse().ok())
        .unwrap_or(2000)
}

/// The first packet of a flow over `protocol` to `port`, between `own`, an address of the
/// endpoint on `ifindex`, and `peer`.
fn first_packet(
    ifindex: u32,
    direction: Direction,
    own: IpAddr,
    peer: IpAddr,
    protocol: u8,
    port: u16,
) -> Packet {
    /// The client's side of every flow.
    const EPHEMERAL_PORT: u16 = 40000;
    let (pod_port, peer_port) = match direction {
        _ if protocol == 1 => (0, 0),
        Direction::Egress => (EPHEMERAL_PORT, port),
        Direction::Ingress => (port, EPHEMERAL_PORT),
    };
    Packet {
        ifindex,
        direction,
        pod_address: own,
        peer_address: peer,
        protocol,
        pod_port,
        peer_port,
        opening: Opening::Opens,
        conntrack: Conntrack::Untracked,
    }
}

/// Every flow between a local pod and any address, in both directions: its first packet put
/// through the kernel's lookup on the maps the agent writes for `state`, and asked of the
/// evaluator.
fn assert_agrees(cluster: &Cluster, state: &DatapathState) -> Result<(), TestCaseError> {
    let mut peers: Vec<IpAddr> = cluster
        .pods
        .values()
        .flat_map(|pod| pod.ips.clone())
        .collect();
    peers.extend(OUTSIDE);
    peers.push(NODE_ADDRESS);
    peers.push(OTHER_NODE_ADDRESS);
    let local_pods: Vec<&Pod> = cluster
        .pods
        .values()
        .filter(|pod| pod.node_name.as_deref() == Some(LOCAL))
        .collect();
    let mut maps = Maps::new(state, false);
    for (ifindex, pod) in (1..).zip(&local_pods) {
        maps.place_endpoint(ifindex, &pod.id)
            .map_err(|error| TestCaseError::fail(error.to_string()))?;
    }
    for (ifindex, pod) in (1..).zip(&local_pods) {
        for own in &pod.ips {
            for peer in peers
                .iter()
                .filter(|peer| peer.is_ipv4() == own.is_ipv4() && *peer != own)
            {
                for protocol in PROTOCOLS {
                    for port in if protocol == 1 { &[0][..] } else { &PORTS[..] } {
                        let outbound = Flow {
                            source: *own,
                            destination: *peer,
                            protocol,
                            port: *port,
                        };
                        let expected =
                            evaluate::evaluate(cluster, &[NODE_ADDRESS], &outbound).egress;
                        let got = maps.verdict(&first_packet(
                            ifindex,
                            Direction::Egress,
                            *own,
                            *peer,
                            protocol,
                            *port,
                        ));
                        prop_assert_eq!(
                            got.verdict == Verdict::Pass,
                            expected.allows(),
                            "egress {} {} -> {} proto {} port {}: datapath {:?} ({}), evaluator {:?}",
                            pod.id,
                            own,
                            peer,
                            protocol,
                            port,
                            got,
                            got.label(),
                            expected
                        );

                        let inbound = Flow {
                            source: *peer,
                            destination: *own,
                            protocol,
                            port: *port,
                        };
                        let expected =
                            evaluate::evaluate(cluster, &[NODE_ADDRESS], &inbound).ingress;
                        let got = maps.verdict(&first_packet(
                            ifindex,
                            Direction::Ingress,
                            *own,
                            *peer,
                            protocol,
                            *port,
                        ));
                        prop_assert_eq!(
                            got.verdict == Verdict::Pass,
                            expected.allows(),
                            "ingress {} {} <- {} proto {} port {}: datapath {:?} ({}), evaluator {:?}",
                            pod.id,
                            own,
                            peer,
                            protocol,
                            port,
                            got,
                            got.label(),
                            expected
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn compiled_maps_agree_with_the_reference_evaluator(cluster in cluster()) {
        let mut compiler = Compiler::new(LOCAL);
        compiler.set_node_addresses(&[NODE_ADDRESS]);
        assert_agrees(&cluster, compiler.sync(cluster.clone()))?;
    }

    /// The incremental path: one compiler taken through a series of clusters (each a random
    /// set of pod, namespace and policy changes from the last) must agree with the evaluator
    /// at every step, and keep no policy nobody uses.
    #[test]
    fn incremental_updates_agree_with_the_reference_evaluator(clusters in vec(cluster(), 2..=4)) {
        let mut compiler = Compiler::new(LOCAL);
        compiler.set_node_addresses(&[NODE_ADDRESS]);
        for cluster in &clusters {
            let state = compiler.sync(cluster.clone());
            assert_agrees(cluster, state)?;
            let used: std::collections::BTreeSet<u32> = state
                .endpoints
                .values()
                .flat_map(|endpoint| [endpoint.ingress, endpoint.egress])
                .flatten()
                .collect();
            prop_assert_eq!(used, state.policies.keys().copied().collect());
        }
    }

    /// Pods and namespaces changing one at a time under fixed policies: the path where an
    /// identity joins or leaves selectors and only its entries are recomputed. Every step must
    /// agree with the evaluator, and with what a fresh compiler compiles from the same cluster.
    #[test]
    fn identity_changes_agree_with_the_reference_evaluator(
        cluster in cluster(),
        changes in vec(pod_change(), 1..=6),
    ) {
        let mut compiler = Compiler::new(LOCAL);
        compiler.set_node_addresses(&[NODE_ADDRESS]);
        let mut cluster = cluster;
        compiler.sync(cluster.clone());
        for (serial, change) in changes.iter().enumerate() {
            change.apply(&mut cluster, serial);
            let state = compiler.sync(cluster.clone());
            assert_agrees(&cluster, state)?;
            let mut fresh = Compiler::new(LOCAL);
            fresh.set_node_addresses(&[NODE_ADDRESS]);
            let expected = fresh.sync(cluster.clone());
            prop_assert_eq!(policies_by_endpoint(state), policies_by_endpoint(expected));
            prop_assert_eq!(&state.rules, &expected.rules);
            // Directions that moved together, or one by one to equal content, share one id.
            prop_assert_eq!(state.policies.len(), expected.policies.len());
        }
    }
}

/// An endpoint direction's compiled entries, peers named by what they are rather than by the
/// numbers one compiler gave them (two compilers number identities in the order they meet them).
type Entries = Vec<(PeerName, Option<u8>, u16, u8, netwarden_common::PolicyEntry)>;

/// An endpoint direction's CIDR prefixes with their classes.
type Prefixes = Vec<(ipnet::IpNet, u32)>;

/// A policy entry's peer: an identity by its digest; a CIDR class or reserved identity by number.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum PeerName {
    Identity([u8; 32]),
    Number(u32),
}

/// Each endpoint direction's compiled entries and prefixes, whatever its policy id.
fn policies_by_endpoint(state: &DatapathState) -> BTreeMap<(PodRef, bool), (Entries, Prefixes)> {
    let name = |peer: u32| {
        state
            .identities
            .get(&peer)
            .map_or(PeerName::Number(peer), |info| {
                PeerName::Identity(info.digest())
            })
    };
    let mut policies = BTreeMap::new();
    for (pod, endpoint) in &state.endpoints {
        for (ingress, id) in [(true, endpoint.ingress), (false, endpoint.egress)] {
            let Some(id) = id else { continue };
            let policy = &state.policies[&id];
            let mut entries: Entries = policy
                .entries
                .iter()
                .map(|(entry, decided)| {
                    (
                        name(entry.peer),
                        entry.protocol,
                        entry.port,
                        entry.port_bits,
                        *decided,
                    )
                })
                .collect();
            entries.sort_unstable();
            let cidrs = policy
                .cidrs
                .iter()
                .map(|(prefix, class)| (*prefix, *class))
                .collect();
            policies.insert((pod.clone(), ingress), (entries, cidrs));
        }
    }
    policies
}

/// One change to a cluster's pods or namespaces, the kind that creates, retires or moves label-set
/// identities while the policies stay: a pod relabelled, added, removed or moved to another
/// node, or a namespace relabelled.
#[derive(Clone, Debug)]
enum PodChange {
    Relabel(prop::sample::Index, BTreeMap<String, String>),
    Add(&'static str, BTreeMap<String, String>, bool),
    Remove(prop::sample::Index),
    Move(prop::sample::Index),
    RelabelNamespace(&'static str, BTreeMap<String, String>),
}

fn pod_change() -> impl Strategy<Value = PodChange> {
    prop_oneof![
        3 => (any::<prop::sample::Index>(), labels())
            .prop_map(|(pod, labels)| PodChange::Relabel(pod, labels)),
        2 => (select(&NAMESPACES[..]), labels(), any::<bool>())
            .prop_map(|(namespace, labels, local)| PodChange::Add(namespace, labels, local)),
        1 => any::<prop::sample::Index>().prop_map(PodChange::Remove),
        1 => any::<prop::sample::Index>().prop_map(PodChange::Move),
        1 => (select(&NAMESPACES[..]), labels())
            .prop_map(|(namespace, labels)| PodChange::RelabelNamespace(namespace, labels)),
    ]
}

impl PodChange {
    fn apply(&self, cluster: &mut Cluster, serial: usize) {
        let ids: Vec<PodRef> = cluster.pods.keys().cloned().collect();
        let pick = |index: &prop::sample::Index| (!ids.is_empty()).then(|| index.get(&ids).clone());
        match self {
            Self::Relabel(index, labels) => {
                if let Some(id) = pick(index) {
                    cluster.pods.get_mut(&id).expect("picked").labels =
                        std::sync::Arc::new(labels.clone());
                }
            }
            Self::Add(namespace, labels, local) => {
                let number = u8::try_from(100 + serial).expect("few changes");
                add_pod(
                    cluster,
                    namespace,
                    &format!("added{serial}"),
                    labels.clone(),
                    *local,
                    vec![IpAddr::V4(Ipv4Addr::new(10, 0, 0, number))],
                    Vec::new(),
                );
            }
            Self::Remove(index) => {
                if let Some(id) = pick(index) {
                    cluster.pods.remove(&id);
                }
            }
            Self::Move(index) => {
                if let Some(id) = pick(index) {
                    let pod = cluster.pods.get_mut(&id).expect("picked");
                    let elsewhere = pod.node_name.as_deref() == Some(LOCAL);
                    pod.node_name =
                        Some(if elsewhere { "node-2" } else { LOCAL }.to_owned().into());
                }
            }
            Self::RelabelNamespace(name, labels) => set_namespace(cluster, name, labels.clone()),
        }
    }
}

/// Every flow between a pod and any address, both directions, with what the evaluator says of
/// the pod's side of it.
fn pod_sides(cluster: &Cluster) -> Vec<(String, SideVerdict)> {
    let mut peers: Vec<IpAddr> = cluster
        .pods
        .values()
        .flat_map(|pod| pod.ips.clone())
        .collect();
    peers.extend(OUTSIDE);
    peers.push(NODE_ADDRESS);
    peers.push(OTHER_NODE_ADDRESS);
    let mut sides = Vec::new();
    for pod in cluster.pods.values() {
        for own in &pod.ips {
            for peer in peers
                .iter()
                .filter(|peer| peer.is_ipv4() == own.is_ipv4() && *peer != own)
            {
                for (protocol, port) in [(6, 80), (6, 8080), (17, 53), (132, 9000), (1, 0)] {
                    let outbound = Flow {
                        source: *own,
                        destination: *peer,
                        protocol,
                        port,
                    };
                    sides.push((
                        format!("egress {own} -> {peer} {protocol}/{port}"),
                        evaluate::side(cluster, pod, Direction::Egress, *peer, &outbound),
                    ));
                    let inbound = Flow {
                        source: *peer,
                        destination: *own,
                        protocol,
                        port,
                    };
                    let ingress = if *peer == NODE_ADDRESS {
                        SideVerdict::FromNode
                    } else {
                        evaluate::side(cluster, pod, Direction::Ingress, *peer, &inbound)
                    };
                    sides.push((
                        format!("ingress {own} <- {peer} {protocol}/{port}"),
                        ingress,
                    ));
                }
            }
        }
    }
    sides
}

/// What each tier says of each side [`pod_sides`] lists, and whether that side allows it.
fn pod_tiers(cluster: &Cluster) -> Vec<(evaluate::Tiers, bool, bool)> {
    let mut peers: Vec<IpAddr> = cluster
        .pods
        .values()
        .flat_map(|pod| pod.ips.clone())
        .collect();
    peers.extend(OUTSIDE);
    peers.push(NODE_ADDRESS);
    peers.push(OTHER_NODE_ADDRESS);
    let mut sides = Vec::new();
    for pod in cluster.pods.values() {
        for own in &pod.ips {
            for peer in peers
                .iter()
                .filter(|peer| peer.is_ipv4() == own.is_ipv4() && *peer != own)
            {
                for (protocol, port) in [(6, 80), (6, 8080), (17, 53), (132, 9000), (1, 0)] {
                    let outbound = Flow {
                        source: *own,
                        destination: *peer,
                        protocol,
                        port,
                    };
                    let egress = evaluate::tiers(cluster, pod, Direction::Egress, *peer, &outbound);
                    let allowed = egress.decision().allows();
                    sides.push((egress, allowed, false));
                    let inbound = Flow {
                        source: *peer,
                        destination: *own,
                        protocol,
                        port,
                    };
                    let ingress =
                        evaluate::tiers(cluster, pod, Direction::Ingress, *peer, &inbound);
                    // The node's ingress is allowed before any tier: not a tier's business.
                    let allowed = *peer == NODE_ADDRESS
                        || evaluate::evaluate(cluster, &[NODE_ADDRESS], &inbound)
                            .ingress
                            .allows();
                    sides.push((ingress, allowed, *peer == NODE_ADDRESS));
                }
            }
        }
    }
    sides
}

fn verdict_ties(verdict: &evaluate::TierVerdict) -> &[evaluate::ClusterRuleMatch] {
    match verdict {
        evaluate::TierVerdict::NoMatch => &[],
        evaluate::TierVerdict::Matched { ties, .. } => ties,
    }
}

/// `cluster` without the ClusterNetworkPolicies of `tier`.
fn without_tier(cluster: &Cluster, tier: Tier) -> Cluster {
    let mut cluster = cluster.clone();
    cluster
        .cluster_policies
        .retain(|_, policy| policy.tier != tier);
    cluster
}

/// `cluster` with one more Admin policy, first of all (priority 0, a name that sorts before
/// the generated ones), whose only rule does `action` to everything, both ways, for every pod.
fn with_first_admin_rule(cluster: &Cluster, action: Action) -> Cluster {
    let rule = ClusterRule {
        name: None,
        action,
        peers: vec![ClusterPeer::Everything],
        ports: vec![],
    };
    let mut cluster = cluster.clone();
    cluster.cluster_policies.insert(
        "0-first".into(),
        ClusterNetworkPolicy {
            name: "0-first".into(),
            tier: Tier::Admin,
            priority: 0,
            subject: ClusterSubject::Namespaces(LabelSelector::everything()),
            ingress: vec![rule.clone()],
            egress: vec![rule],
            problems: Vec::new(),
        },
    );
    cluster
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases() / 10, ..ProptestConfig::default() })]

    /// What the tiers promise, checked on the generated ClusterNetworkPolicies: an Admin
    /// Accept or Deny is final; NetworkPolicy decides for the pods it isolates, over Baseline;
    /// Pass hands the flow to the tiers below as if the rest of the Admin tier were not there.
    #[test]
    fn cluster_policy_tiers_keep_their_promises(cluster in cluster_with(true)) {
        let sides = pod_sides(&cluster);
        let tier_sides = pod_tiers(&cluster);
        let no_baseline = pod_sides(&without_tier(&cluster, Tier::Baseline));
        let no_admin = pod_sides(&without_tier(&cluster, Tier::Admin));
        let passing = pod_sides(&with_first_admin_rule(&cluster, Action::Pass));
        let denying = pod_sides(&with_first_admin_rule(&cluster, Action::Deny));
        let accepting = pod_sides(&with_first_admin_rule(&cluster, Action::Accept));
        let mut without_cluster_policies = cluster.clone();
        without_cluster_policies.cluster_policies.clear();
        let network_policy_only = pod_sides(&without_cluster_policies);
        // Order within a tier, checked against each policy evaluated alone: no policy ranked
        // before the deciding one (lower priority, or equal priority and a smaller name) has
        // a matching rule, and the deciding one alone decides the same way.
        for pod in cluster.pods.values() {
            let peers = OUTSIDE.iter().chain(&[NODE_ADDRESS, OTHER_NODE_ADDRESS]).chain(pod.ips.iter());
            for peer in peers.filter(|peer| peer.is_ipv4() == pod.ips[0].is_ipv4()) {
                let flow = Flow { source: pod.ips[0], destination: *peer, protocol: 6, port: 80 };
                let tiers = evaluate::tiers(&cluster, pod, Direction::Egress, *peer, &flow);
                for (tier, verdict) in [(Tier::Admin, &tiers.admin), (Tier::Baseline, &tiers.baseline)] {
                    let alone = |name: &str| {
                        let mut single = cluster.clone();
                        single.cluster_policies.retain(|other, _| other == name);
                        let tiers = evaluate::tiers(&single, pod, Direction::Egress, *peer, &flow);
                        match tier {
                            Tier::Admin => tiers.admin,
                            Tier::Baseline => tiers.baseline,
                        }
                    };
                    for policy in cluster.cluster_policies.values().filter(|policy| policy.tier == tier) {
                        let ranked_before = verdict
                            .rule()
                            .is_none_or(|rule| (policy.priority, policy.name.as_str()) < (rule.priority, rule.policy.as_str()));
                        if ranked_before {
                            let single = alone(&policy.name);
                            prop_assert_eq!(single.rule(), None, "{} is ranked before the decision {:?}", policy.name, verdict);
                        }
                    }
                    if let Some(rule) = verdict.rule() {
                        let single = alone(&rule.policy);
                        prop_assert_eq!(single.rule(), Some(rule));
                        for tie in verdict_ties(verdict) {
                            prop_assert_eq!(rule.priority, tie.priority);
                            prop_assert!(rule.policy < tie.policy, "{} decided over {}", rule, tie);
                        }
                    }
                }
            }
        }
        for (index, (flow, verdict)) in sides.iter().enumerate() {
            // The tiers' order, against each tier's own answer: an Admin Accept or Deny, else
            // NetworkPolicy where it isolates, else a Baseline Accept or Deny, else allow.
            let (tiers, allowed, from_node) = &tier_sides[index];
            let expected = *from_node || match (tiers.admin.rule(), &tiers.network_policy, tiers.baseline.rule()) {
                (Some(rule), _, _) if rule.action != Action::Pass => rule.action == Action::Accept,
                (_, SideVerdict::Allowed(_), _) => true,
                (_, SideVerdict::Denied(_), _) => false,
                (_, _, Some(rule)) if rule.action != Action::Pass => rule.action == Action::Accept,
                _ => true,
            };
            prop_assert_eq!(*allowed, expected, "{}: {:?}", flow, tiers);
            // Keyed on the cluster without Baseline, so that a Baseline rule wrongly deciding
            // cannot hide itself: where the tiers above decide, Baseline changes nothing.
            let decided_above_baseline = match &no_baseline[index].1 {
                SideVerdict::ClusterAccepted(rule) | SideVerdict::ClusterDenied(rule) => {
                    rule.tier == Tier::Admin
                }
                SideVerdict::Allowed(_) | SideVerdict::Denied(_) => true,
                _ => false,
            };
            if decided_above_baseline {
                prop_assert_eq!(&no_baseline[index].1, verdict, "Baseline overrode a higher tier: {}", flow);
            }
            let admin_decided = matches!(
                verdict,
                SideVerdict::ClusterAccepted(rule) | SideVerdict::ClusterDenied(rule) if rule.tier == Tier::Admin
            );
            if !admin_decided {
                prop_assert_eq!(&no_admin[index].1, verdict, "an Admin tier that did not decide changed the verdict: {}", flow);
            }
            prop_assert_eq!(&passing[index].1, &no_admin[index].1, "Pass did not skip the rest of the Admin tier: {}", flow);
            match (&denying[index].1, &accepting[index].1) {
                (SideVerdict::FromNode, SideVerdict::FromNode) => {}
                (SideVerdict::ClusterDenied(denied), SideVerdict::ClusterAccepted(accepted)) => {
                    prop_assert_eq!(denied.policy.as_str(), "0-first", "{}", flow);
                    prop_assert_eq!(accepted.policy.as_str(), "0-first", "{}", flow);
                }
                (denied, accepted) => prop_assert!(false, "{}: the first Admin rule did not decide: {:?}, {:?}", flow, denied, accepted),
            }
            // Where no Admin rule matches and no Baseline rule exists, NetworkPolicy alone
            // decides, exactly as in a cluster without ClusterNetworkPolicies (the verdict the
            // compiler is tested against).
            let admin_matched = cluster
                .cluster_policies
                .values()
                .any(|policy| policy.tier == Tier::Admin);
            if !admin_matched {
                prop_assert_eq!(&no_baseline[index].1, &network_policy_only[index].1, "{}", flow);
            }
            if matches!(network_policy_only[index].1, SideVerdict::Allowed(_) | SideVerdict::Denied(_)) {
                prop_assert_eq!(&no_admin[index].1, &network_policy_only[index].1, "Baseline overrode NetworkPolicy: {}", flow);
            }
        }
    }
}
