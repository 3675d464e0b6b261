//! The generated cluster written as the API server would serve it, one file per namespace and
//! one for the cluster-scoped objects (Nodes, ClusterNetworkPolicies).

use std::{fmt::Write as _, fs, io, path::Path};

use netwarden_model::{
    Action, AddressType, Cluster, ClusterNetworkPolicy, ClusterPeer, ClusterPort, ClusterRule,
    ClusterSubject, EndpointSlice, LabelSelector, NetworkPolicy, Node, Peer, Pod, PodRef,
    PolicyRef, PortRef, PortSpec, Requirement, Rule, Service, ServiceType, Tier,
};
use serde_json::{Value, json};

/// YAML documents, one after the other.
#[derive(Default)]
struct Documents(String);

impl Documents {
    fn push(&mut self, value: &Value) {
        let _ = writeln!(
            self.0,
            "---\n{}",
            serde_yaml::to_string(value).expect("JSON values serialize")
        );
    }
}

/// The first and last possible keys of namespace `name` in a map ordered by namespace, then
/// name: each namespace's objects are a range, not a scan of the whole cluster (150,000 pods
/// times 5,000 namespaces would be).
fn in_namespace<K: Ord>(
    name: &str,
    key: impl Fn(String, String) -> K,
) -> std::ops::RangeInclusive<K> {
    key(name.to_owned(), String::new())..=key(name.to_owned(), char::MAX.to_string())
}

/// Writes every object of `cluster` under `dir`.
pub fn write(cluster: &Cluster, dir: &Path) -> io::Result<()> {
    let mut scoped = Documents::default();
    for node in cluster.nodes.values() {
        scoped.push(&node_object(node));
    }
    for policy in cluster.cluster_policies.values() {
        scoped.push(&cluster_policy_object(policy));
    }
    fs::write(dir.join("cluster-scoped.yaml"), scoped.0)?;
    for namespace in cluster.namespaces.keys() {
        write_namespace(cluster, namespace, dir)?;
    }
    Ok(())
}

/// Writes the objects of `namespace` to their file under `dir`, through a temporary file
/// renamed in place, so that the agent never reads half of it.
pub fn write_namespace(cluster: &Cluster, namespace: &str, dir: &Path) -> io::Result<()> {
    let mut text = Documents::default();
    let mut document = |value: Value| text.push(&value);
    if let Some(namespace) = cluster.namespaces.get(namespace) {
        document(
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace.name, "labels": *namespace.labels}}),
        );
    }
    let pods = in_namespace(namespace, |namespace, name| PodRef { namespace, name });
    for pod in cluster.pods.range(pods).map(|(_, pod)| pod) {
        document(pod_object(pod));
    }
    let policies = in_namespace(namespace, |namespace, name| PolicyRef { namespace, name });
    for policy in cluster.policies.range(policies).map(|(_, policy)| policy) {
        document(policy_object(policy));
    }
    for service in cluster
        .services
        .values()
        .filter(|service| service.id.namespace == namespace)
    {
        document(service_object(service));
    }
    for slice in cluster
        .endpoint_slices
        .values()
        .filter(|slice| slice.id.namespace == namespace)
    {
        document(endpoint_slice_object(slice));
    }
    // Hidden: the agent reads `*.yaml`, `*.yml` and `*.json` only.
    let partial = dir.join(format!(".{namespace}.partial"));
    fs::write(&partial, text.0)?;
    fs::rename(partial, dir.join(format!("{namespace}.yaml")))
}

fn pod_object(pod: &Pod) -> Value {
    let ports: Vec<Value> = pod
        .ports
        .iter()
        .map(|port| json!({"name": port.name, "containerPort": port.port, "protocol": port.protocol.to_string()}))
        .collect();
    let ips: Vec<Value> = pod
        .ips
        .iter()
        .map(|ip| json!({"ip": ip.to_string()}))
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": pod.id.name, "namespace": pod.id.namespace, "labels": *pod.labels},
        "spec": {"nodeName": pod.node_name, "serviceAccountName": pod.service_account,
                 "containers": [{"name": "app", "image": "registry.example/app:1", "ports": ports}]},
        "status": {"phase": "Running", "podIP": pod.ips[0].to_string(), "podIPs": ips},
    })
}

fn selector(selector: &LabelSelector) -> Value {
    let expressions: Vec<Value> = selector
        .requirements
        .iter()
        .map(|requirement| match requirement {
            Requirement::In(key, values) => json!({"key": key, "operator": "In", "values": values}),
            Requirement::NotIn(key, values) => {
                json!({"key": key, "operator": "NotIn", "values": values})
            }
            Requirement::Exists(key) => json!({"key": key, "operator": "Exists"}),
            Requirement::DoesNotExist(key) => json!({"key": key, "operator": "DoesNotExist"}),
        })
        .collect();
    json!({"matchExpressions": expressions})
}

fn rule(rule: &Rule, peers_field: &str) -> Value {
    let peers: Vec<Value> = rule
        .peers
        .iter()
        .map(|peer| match peer {
            Peer::IpBlock { cidr, except } => {
                let except: Vec<String> = except.iter().map(ToString::to_string).collect();
                json!({"ipBlock": {"cidr": cidr.to_string(), "except": except}})
            }
            Peer::Pods {
                pod_selector,
                namespace_selector,
            } => {
                let mut peer = serde_json::Map::new();
                if let Some(pods) = pod_selector {
                    peer.insert("podSelector".into(), selector(pods));
                }
                if let Some(namespaces) = namespace_selector {
                    peer.insert("namespaceSelector".into(), selector(namespaces));
                }
                Value::Object(peer)
            }
        })
        .collect();
    let ports: Vec<Value> = rule.ports.iter().map(port).collect();
    json!({peers_field: peers, "ports": ports})
}

fn port(spec: &PortSpec) -> Value {
    let mut port = serde_json::Map::new();
    port.insert("protocol".into(), json!(spec.protocol.to_string()));
    match &spec.port {
        Some(PortRef::Number(number)) => {
            port.insert("port".into(), json!(number));
        }
        Some(PortRef::Name(name)) => {
            port.insert("port".into(), json!(name));
        }
        None => {}
    }
    if let Some(end) = spec.end_port {
        port.insert("endPort".into(), json!(end));
    }
    Value::Object(port)
}

fn policy_object(policy: &NetworkPolicy) -> Value {
    let mut types = Vec::new();
    if policy.policy_types.ingress {
        types.push("Ingress");
    }
    if policy.policy_types.egress {
        types.push("Egress");
    }
    let ingress: Vec<Value> = policy.ingress.iter().map(|r| rule(r, "from")).collect();
    let egress: Vec<Value> = policy.egress.iter().map(|r| rule(r, "to")).collect();
    json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": policy.id.name, "namespace": policy.id.namespace},
        "spec": {"podSelector": selector(&policy.pod_selector), "policyTypes": types, "ingress": ingress, "egress": egress},
    })
}

fn port_ref(port: &PortRef) -> Value {
    match port {
        PortRef::Number(number) => json!(number),
        PortRef::Name(name) => json!(name),
    }
}

fn service_object(service: &Service) -> Value {
    let ports: Vec<Value> = service
        .ports
        .iter()
        .map(|port| {
            let mut object = serde_json::Map::new();
            if let Some(name) = &port.name {
                object.insert("name".into(), json!(name));
            }
            object.insert("protocol".into(), json!(port.protocol.to_string()));
            object.insert("port".into(), json!(port.port));
            object.insert("targetPort".into(), port_ref(&port.target_port));
            if let Some(node_port) = port.node_port {
                object.insert("nodePort".into(), json!(node_port));
            }
            Value::Object(object)
        })
        .collect();
    let cluster_ips: Vec<String> = service
        .cluster_ips
        .iter()
        .map(ToString::to_string)
        .collect();
    let external_ips: Vec<String> = service
        .external_ips
        .iter()
        .map(ToString::to_string)
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": service.id.name, "namespace": service.id.namespace},
        "spec": {"type": match service.service_type {
                     ServiceType::ClusterIp => "ClusterIP",
                     ServiceType::NodePort => "NodePort",
                     ServiceType::LoadBalancer => "LoadBalancer",
                     ServiceType::ExternalName => "ExternalName",
                 },
                 "clusterIP": cluster_ips.first(), "clusterIPs": cluster_ips,
                 "externalIPs": external_ips, "selector": service.selector, "ports": ports},
    })
}

fn endpoint_slice_object(slice: &EndpointSlice) -> Value {
    let endpoints: Vec<Value> = slice
        .endpoints
        .iter()
        .map(|endpoint| {
            let addresses: Vec<String> =
                endpoint.addresses.iter().map(ToString::to_string).collect();
            let mut object = serde_json::Map::new();
            object.insert("addresses".into(), json!(addresses));
            object.insert("conditions".into(), json!({"ready": endpoint.ready}));
            if let Some(pod) = &endpoint.pod {
                object.insert(
                    "targetRef".into(),
                    json!({"kind": "Pod", "namespace": pod.namespace, "name": pod.name}),
                );
            }
            if let Some(node) = &endpoint.node_name {
                object.insert("nodeName".into(), json!(node));
            }
            Value::Object(object)
        })
        .collect();
    let ports: Vec<Value> = slice
        .ports
        .iter()
        .map(|port| json!({"name": port.name, "protocol": port.protocol.to_string(), "port": port.port}))
        .collect();
    let service_label = netwarden_model::convert::SERVICE_NAME_LABEL;
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": slice.id.name, "namespace": slice.id.namespace,
                     "labels": {service_label: slice.service.name}},
        "addressType": match slice.address_type {
            AddressType::Ipv4 => "IPv4",
            AddressType::Ipv6 => "IPv6",
            AddressType::Fqdn => "FQDN",
        },
        "endpoints": endpoints,
        "ports": ports,
    })
}

fn node_object(node: &Node) -> Value {
    let addresses: Vec<Value> = node
        .addresses
        .iter()
        .map(|address| json!({"type": "InternalIP", "address": address.to_string()}))
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": node.name, "labels": node.labels},
        "status": {"addresses": addresses},
    })
}

fn namespaced_pods(namespace_selector: &LabelSelector, pod_selector: &LabelSelector) -> Value {
    json!({"namespaceSelector": selector(namespace_selector),
           "podSelector": selector(pod_selector)})
}

fn cluster_peer(peer: &ClusterPeer) -> Value {
    match peer {
        ClusterPeer::Namespaces(namespaces) => json!({"namespaces": selector(namespaces)}),
        ClusterPeer::Pods {
            namespace_selector,
            pod_selector,
        } => json!({"pods": namespaced_pods(namespace_selector, pod_selector)}),
        ClusterPeer::Networks(networks) => {
            let networks: Vec<String> = networks.iter().map(ToString::to_string).collect();
            json!({"networks": networks})
        }
        ClusterPeer::Nodes(nodes) => json!({"nodes": selector(nodes)}),
        ClusterPeer::Everything => unreachable!("no API peer is everything"),
    }
}

fn cluster_port(port: &ClusterPort) -> Value {
    match port {
        ClusterPort::Range {
            protocol,
            first,
            last,
        } => {
            let destination = if first == last {
                json!({"number": first})
            } else {
                json!({"range": {"start": first, "end": last}})
            };
            json!({protocol.to_string().to_lowercase(): {"destinationPort": destination}})
        }
        ClusterPort::Named(name) => json!({"destinationNamedPort": name}),
    }
}

fn cluster_rule(rule: &ClusterRule, peers_field: &str) -> Value {
    let mut object = serde_json::Map::new();
    if let Some(name) = &rule.name {
        object.insert("name".into(), json!(name));
    }
    object.insert(
        "action".into(),
        json!(match rule.action {
            Action::Accept => "Accept",
            Action::Deny => "Deny",
            Action::Pass => "Pass",
        }),
    );
    object.insert(
        peers_field.into(),
        rule.peers.iter().map(cluster_peer).collect(),
    );
    if !rule.ports.is_empty() {
        object.insert(
            "protocols".into(),
            rule.ports.iter().map(cluster_port).collect(),
        );
    }
    Value::Object(object)
}

fn cluster_policy_object(policy: &ClusterNetworkPolicy) -> Value {
    let subject = match &policy.subject {
        ClusterSubject::Namespaces(namespaces) => json!({"namespaces": selector(namespaces)}),
        ClusterSubject::Pods {
            namespace_selector,
            pod_selector,
        } => json!({"pods": namespaced_pods(namespace_selector, pod_selector)}),
    };
    let ingress: Vec<Value> = policy
        .ingress
        .iter()
        .map(|rule| cluster_rule(rule, "from"))
        .collect();
    let egress: Vec<Value> = policy
        .egress
        .iter()
        .map(|rule| cluster_rule(rule, "to"))
        .collect();
    json!({
        "apiVersion": format!("{}/{}", netwarden_model::cluster_policy::GROUP, netwarden_model::cluster_policy::VERSION),
        "kind": netwarden_model::cluster_policy::KIND,
        "metadata": {"name": policy.name},
        "spec": {
            "tier": match policy.tier {
                Tier::Admin => "Admin",
                Tier::Baseline => "Baseline",
            },
            "priority": policy.priority,
            "subject": subject,
            "ingress": ingress,
            "egress": egress,
        },
    })
}

#[cfg(test)]
mod tests {
    use netwarden_model::ManifestDir;

    use crate::cluster::{Shape, generate_shape};

    /// What the agent reads from the manifests is the cluster the compile benchmark compiles:
    /// its figures and the agent's memory are of one cluster.
    #[test]
    fn the_manifests_read_back_as_the_generated_cluster() {
        let shape = Shape {
            namespaces: 7,
            pods: 130,
            policies: 23,
        };
        let cluster = generate_shape(shape);
        let dir = tempfile::tempdir().unwrap();
        super::write(&cluster, dir.path()).unwrap();
        let mut source = ManifestDir::new(dir.path());
        source.refresh().unwrap();
        let (read, errors) = source.cluster();
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(read.namespaces, cluster.namespaces);
        assert_eq!(read.pods, cluster.pods);
        assert_eq!(read.policies, cluster.policies);
        assert_eq!(read.nodes, cluster.nodes);
        assert_eq!(read.cluster_policies.len(), 200);
        assert_eq!(read.cluster_policies, cluster.cluster_policies);
    }
}
