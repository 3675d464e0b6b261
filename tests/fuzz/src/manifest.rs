//! The manifest target: the bytes of one manifest file (YAML or JSON, one or more documents)
//! through the manifest source to the model, then through the compiler and the reference
//! evaluator.
//!
//! Whatever the bytes, the source must answer with a cluster and errors, never panic; every
//! error must name the file; the cluster must keep the model's promises (objects under their
//! own keys, canonical blocks, excepts strictly inside their block, port ranges in order); and
//! what it yields must compile into a consistent state and evaluate without panicking, since
//! the agent, `explain` and `diff` all feed it on.

use std::net::IpAddr;

use netwarden_model::{Cluster, ManifestError, Peer, PortRef, cluster_of_bytes};
use netwarden_policy::{
    Compiler,
    evaluate::{self, Flow},
};

use crate::compiler::{NODE, assert_consistent};

/// The name the input is read under: every error must name it.
const FILE: &str = "fuzz.yaml";

/// The most addresses flows are evaluated between, so a large input stays fast.
const MAX_EVALUATED_ADDRESSES: usize = 6;

/// Checks one input: see the module's documentation.
pub fn check(data: &[u8]) {
    let (cluster, errors) = cluster_of_bytes(FILE, data);
    for error in &errors {
        assert_names_the_file(error);
    }
    assert_model_promises(&cluster);

    let mut compiler = Compiler::new(NODE);
    let node_addresses: Vec<IpAddr> = cluster
        .nodes
        .get(NODE)
        .map(|node| node.addresses.clone())
        .unwrap_or_default();
    compiler.set_node_addresses(&node_addresses);
    compiler.sync(cluster.clone());
    assert_consistent(compiler.state(), &"compiling the manifest's cluster");

    let mut addresses: Vec<IpAddr> = cluster
        .pods
        .values()
        .flat_map(|pod| pod.ips.iter().copied())
        .chain(node_addresses.iter().copied())
        .collect();
    addresses.sort_unstable();
    addresses.dedup();
    addresses.truncate(MAX_EVALUATED_ADDRESSES);
    let ports: Vec<u16> = cluster
        .policies
        .values()
        .flat_map(|policy| policy.ingress.iter().chain(&policy.egress))
        .flat_map(|rule| &rule.ports)
        .filter_map(|spec| match spec.port {
            Some(PortRef::Number(port)) => Some(port),
            _ => None,
        })
        .chain([80])
        .take(3)
        .collect();
    for source in &addresses {
        for destination in &addresses {
            for protocol in [6, 17] {
                for port in &ports {
                    let flow = Flow {
                        source: *source,
                        destination: *destination,
                        protocol,
                        port: *port,
                    };
                    let _ = evaluate::evaluate(&cluster, &node_addresses, &flow);
                }
            }
        }
    }
}

fn assert_names_the_file(error: &ManifestError) {
    let message = error.to_string();
    assert!(
        message.contains(FILE),
        "an error does not name the file: {message}"
    );
    if let ManifestError::Invalid { source, .. } = error {
        assert!(
            !source.object.is_empty() && !source.field.is_empty(),
            "a validation error names no object or no field: {message}"
        );
    }
}

/// Panics unless `cluster` keeps what the model's types document.
fn assert_model_promises(cluster: &Cluster) {
    for (name, namespace) in &cluster.namespaces {
        assert_eq!(&namespace.name, name, "a namespace under another key");
        assert_eq!(
            namespace
                .labels
                .get("kubernetes.io/metadata.name")
                .map(String::as_str),
            Some(name.as_str()),
            "namespace {name} lacks its name label"
        );
    }
    for (id, pod) in &cluster.pods {
        assert_eq!(&pod.id, id, "a pod under another key");
        for port in pod.ports.iter() {
            assert_ne!(port.port, 0, "pod {id} has container port 0");
        }
    }
    for (id, policy) in &cluster.policies {
        assert_eq!(&policy.id, id, "a NetworkPolicy under another key");
        assert!(
            policy.policy_types.ingress || policy.policy_types.egress,
            "NetworkPolicy {id} isolates no direction"
        );
        for rule in policy.ingress.iter().chain(&policy.egress) {
            for peer in &rule.peers {
                if let Peer::IpBlock { cidr, except } = peer {
                    assert_eq!(
                        *cidr,
                        cidr.trunc(),
                        "NetworkPolicy {id}: {cidr} not canonical"
                    );
                    for inner in except {
                        assert!(
                            cidr.contains(inner)
                                && inner.prefix_len() > cidr.prefix_len()
                                && *inner == inner.trunc(),
                            "NetworkPolicy {id}: except {inner} not canonical and strictly within {cidr}"
                        );
                    }
                }
            }
            for spec in &rule.ports {
                match (&spec.port, spec.end_port) {
                    (Some(PortRef::Number(first)), Some(last)) => assert!(
                        *first != 0 && last >= *first,
                        "NetworkPolicy {id}: port range {first}-{last}"
                    ),
                    (Some(PortRef::Number(first)), None) => {
                        assert_ne!(*first, 0, "NetworkPolicy {id}: port 0");
                    }
                    (Some(PortRef::Name(name)), end) => assert!(
                        !name.is_empty() && end.is_none(),
                        "NetworkPolicy {id}: named port {name:?} with end {end:?}"
                    ),
                    (None, end) => assert!(
                        end.is_none(),
                        "NetworkPolicy {id}: an end port without a port"
                    ),
                }
            }
        }
    }
    for (id, service) in &cluster.services {
        assert_eq!(&service.id, id, "a Service under another key");
        for port in &service.ports {
            assert_ne!(port.port, 0, "Service {id} has port 0");
        }
    }
    for (id, slice) in &cluster.endpoint_slices {
        assert_eq!(&slice.id, id, "an EndpointSlice under another key");
        assert_eq!(
            slice.service.namespace, id.namespace,
            "EndpointSlice {id} belongs to a Service of another namespace"
        );
    }
    for (name, node) in &cluster.nodes {
        assert_eq!(&node.name, name, "a Node under another key");
    }
    for (name, policy) in &cluster.cluster_policies {
        assert_eq!(
            &policy.name, name,
            "a ClusterNetworkPolicy under another key"
        );
    }
}
