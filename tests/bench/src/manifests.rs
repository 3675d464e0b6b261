//! The generated cluster written as the API server would serve it, one file per namespace.

use std::{fmt::Write as _, fs, io, path::Path};

use netwarden_model::{
    Cluster, LabelSelector, NetworkPolicy, Peer, Pod, PortRef, PortSpec, Requirement, Rule,
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
