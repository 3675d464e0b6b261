//! The generated cluster written as the API server would serve it, one file per namespace.

use std::{fmt::Write as _, fs, io, path::Path};

use netwarden_model::{
    AddressType, Cluster, EndpointSlice, LabelSelector, NetworkPolicy, Peer, Pod, PortRef,
    PortSpec, Requirement, Rule, Service, ServiceType,
};
use serde_json::{Value, json};

/// Writes every object of `cluster` under `dir`.
pub fn write(cluster: &Cluster, dir: &Path) -> io::Result<()> {
    for namespace in cluster.namespaces.values() {
        let mut text = String::new();
        let mut document = |value: Value| {
            let _ = writeln!(
                text,
                "---\n{}",
                serde_yaml::to_string(&value).expect("JSON values serialize")
            );
        };
        document(
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace.name, "labels": namespace.labels}}),
        );
        for pod in cluster
            .pods
            .values()
            .filter(|pod| pod.id.namespace == namespace.name)
        {
            document(pod_object(pod));
        }
        for policy in cluster
            .policies
            .values()
            .filter(|policy| policy.id.namespace == namespace.name)
        {
            document(policy_object(policy));
        }
        for service in cluster
            .services
            .values()
            .filter(|service| service.id.namespace == namespace.name)
        {
            document(service_object(service));
        }
        for slice in cluster
            .endpoint_slices
            .values()
            .filter(|slice| slice.id.namespace == namespace.name)
        {
            document(endpoint_slice_object(slice));
        }
        fs::write(dir.join(format!("{}.yaml", namespace.name)), text)?;
    }
    Ok(())
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
        "metadata": {"name": pod.id.name, "namespace": pod.id.namespace, "labels": pod.labels},
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
