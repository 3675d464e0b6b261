//! Writes the generated seeds under `fuzz/seeds/` (the manifest seeds are plain files, written
//! by hand). Run after changing what a target reads, then commit the files:
//!
//! ```sh
//! cargo test -p netwarden-fuzz --test write_seeds -- --ignored
//! ```

use std::{fs, net::SocketAddr, path::PathBuf};

use envoy_types::pb::envoy::config::core::v3::{
    Address, Pipe, address::Address as AnyAddress, socket_address::PortSpecifier,
};
use netwarden_fuzz::mutate::Rng;
use netwarden_identity::client::check_request;
use prost::Message as _;
use serde_json::{Value, json};

fn seeds(target: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/seeds")
        .join(target);
    fs::create_dir_all(&dir).expect("the seeds directory");
    dir
}

fn address(text: &str) -> SocketAddr {
    text.parse().expect("a socket address")
}

#[test]
#[ignore = "writes files; run by hand"]
fn write_identity_seeds() {
    let dir = seeds("identity");
    let web = "spiffe://cluster.local/ns/shop/sa/web";
    let probe = "spiffe://cluster.local/ns/ops/sa/probe";
    // (name, caller choice byte, request): the byte picks the caller (see CALLERS) and, below
    // 16, an agent that has not applied the cluster yet.
    let mut requests = vec![
        (
            "allowed-from-the-unix-socket",
            16 * 9,
            check_request(address("10.0.1.1:40000"), address("10.0.0.1:8443"), probe),
        ),
        (
            "twin-source-over-tcp-from-the-destination",
            16 * 9 + 1,
            check_request(address("10.0.0.9:40000"), address("10.0.0.1:8443"), web),
        ),
        (
            "ipv6-wrong-principal",
            16 * 9 + 2,
            check_request(address("[fd00::1:1]:40000"), address("[fd00::1]:9090"), web),
        ),
        (
            "mapped-addresses",
            16 * 9 + 3,
            check_request(
                address("[::ffff:10.0.1.1]:40000"),
                address("[::ffff:10.0.0.1]:8443"),
                probe,
            ),
        ),
        (
            "policy-denies-api",
            16 * 9 + 4,
            check_request(address("10.0.1.1:40000"), address("10.0.0.2:8500"), probe),
        ),
        (
            "no-principal-to-the-twins",
            16 * 9 + 5,
            check_request(address("10.0.0.1:40000"), address("10.0.0.9:80"), ""),
        ),
        (
            "caller-is-the-node",
            16 * 9 + 6,
            check_request(address("172.18.0.2:40000"), address("10.0.0.1:8443"), web),
        ),
        (
            "unknown-destination-from-a-stranger",
            16 * 9 + 8,
            check_request(address("192.0.2.1:40000"), address("192.0.2.2:443"), web),
        ),
        (
            "not-applied-yet",
            0,
            check_request(address("10.0.1.1:40000"), address("10.0.0.1:8443"), probe),
        ),
    ];
    let mut bad_port = check_request(address("10.0.1.1:40000"), address("10.0.0.1:8443"), probe);
    if let Some(AnyAddress::SocketAddress(socket)) = bad_port
        .attributes
        .as_mut()
        .and_then(|attributes| attributes.destination.as_mut())
        .and_then(|peer| peer.address.as_mut())
        .and_then(|address| address.address.as_mut())
    {
        socket.port_specifier = Some(PortSpecifier::PortValue(70000));
    }
    requests.push(("port-out-of-range", 16 * 9, bad_port));
    let mut named_port = check_request(address("10.0.1.1:40000"), address("10.0.0.1:8443"), probe);
    if let Some(AnyAddress::SocketAddress(socket)) = named_port
        .attributes
        .as_mut()
        .and_then(|attributes| attributes.source.as_mut())
        .and_then(|peer| peer.address.as_mut())
        .and_then(|address| address.address.as_mut())
    {
        socket.port_specifier = Some(PortSpecifier::NamedPort("https".into()));
        socket.address = "not-an-address".into();
    }
    requests.push(("named-port-and-hostname", 16 * 9, named_port));
    let mut pipe = check_request(address("10.0.1.1:40000"), address("10.0.0.1:8443"), probe);
    if let Some(destination) = pipe
        .attributes
        .as_mut()
        .and_then(|attributes| attributes.destination.as_mut())
    {
        destination.address = Some(Address {
            address: Some(AnyAddress::Pipe(Pipe {
                path: "/run/socket".into(),
                mode: 0o600,
            })),
        });
    }
    requests.push(("pipe-destination", 16 * 9, pipe));
    let mut empty = check_request(address("10.0.1.1:40000"), address("10.0.0.1:8443"), probe);
    empty.attributes = None;
    requests.push(("no-attributes", 16 * 9, empty));
    for (name, choice, request) in requests {
        let mut bytes = vec![choice];
        bytes.extend(request.encode_to_vec());
        fs::write(dir.join(name), bytes).expect("a seed written");
    }
}

/// A watch response body: one JSON event per line.
fn body(kind: u8, events: &[Value]) -> Vec<u8> {
    let mut bytes = vec![kind];
    for event in events {
        bytes.extend(event.to_string().into_bytes());
        bytes.push(b'\n');
    }
    bytes
}

fn event(kind: &str, object: &Value) -> Value {
    json!({"type": kind, "object": object})
}

#[test]
#[ignore = "writes files; run by hand"]
fn write_watch_seeds() {
    let dir = seeds("watch");
    let gone = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "too old resource version", "reason": "Expired", "code": 410}});
    let bookmark = |kind: &str, api_version: &str| json!({"type": "BOOKMARK", "object": {"kind": kind, "apiVersion": api_version, "metadata": {"resourceVersion": "12345", "annotations": {"k8s.io/initial-events-end": "true"}}}});
    let namespace = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x", "resourceVersion": "1", "labels": {"team": "a"}, "annotations": {"note": "dropped"}}, "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}});
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a", "namespace": "x", "resourceVersion": "2", "labels": {"app": "a"}, "annotations": {"netwarden.dev/allowed-principals": "spiffe://cluster.local/ns/y/sa/*", "kubectl.kubernetes.io/last-applied-configuration": "{}"}, "managedFields": [{"manager": "kubectl", "operation": "Apply"}]}, "spec": {"nodeName": "node-1", "serviceAccountName": "api", "hostNetwork": false, "containers": [{"name": "c", "image": "nginx", "ports": [{"name": "http", "containerPort": 80}]}]}, "status": {"phase": "Running", "podIP": "10.0.0.1", "podIPs": [{"ip": "10.0.0.1"}, {"ip": "fd00::1"}], "hostIP": "172.18.0.2"}});
    let bad_pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "a", "namespace": "x", "resourceVersion": "3"}, "spec": {"containers": [{"name": "c", "ports": [{"containerPort": 0}]}]}, "status": {"podIP": "10.0.0.300"}});
    let policy = json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "p", "namespace": "x", "resourceVersion": "4", "uid": "u1", "annotations": {"netwarden.dev/enforcement": "audit"}}, "spec": {"podSelector": {"matchLabels": {"app": "a"}}, "policyTypes": ["Ingress"], "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}], "ports": [{"port": "http"}, {"port": 8000, "endPort": 8100}]}]}});
    let bad_policy = json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "p", "namespace": "x", "resourceVersion": "5"}, "spec": {"podSelector": {}, "ingress": [{"ports": [{"port": 70000}]}]}});
    let never_valid = json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "q", "resourceVersion": "6"}, "spec": {"podSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}}});
    let service = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "x", "resourceVersion": "7"}, "spec": {"type": "NodePort", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"], "sessionAffinity": "None", "selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http", "nodePort": 30080}]}, "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.1", "hostname": "lb", "ipMode": "VIP"}]}}});
    let slice = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": {"name": "web-abc", "namespace": "x", "resourceVersion": "8", "labels": {"kubernetes.io/service-name": "web"}}, "addressType": "IPv4", "endpoints": [{"addresses": ["10.0.0.1"], "conditions": {"ready": true, "serving": true}, "nodeName": "node-1", "zone": "a", "hostname": "h", "targetRef": {"kind": "Pod", "name": "a", "namespace": "x", "uid": "u"}}], "ports": [{"name": "http", "port": 8080, "protocol": "TCP", "appProtocol": "http"}]});
    let node = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1", "resourceVersion": "9", "labels": {"zone": "a"}}, "spec": {"podCIDR": "10.0.0.0/24"}, "status": {"addresses": [{"type": "InternalIP", "address": "172.18.0.2"}, {"type": "Hostname", "address": "node-1"}], "conditions": [{"type": "Ready", "status": "True"}]}});
    let cluster_policy = json!({"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy", "metadata": {"name": "guard", "resourceVersion": "10"}, "spec": {"tier": "Admin", "priority": 20, "subject": {"namespaces": {"matchLabels": {"team": "a"}}}, "egress": [{"action": "Deny", "to": [{"networks": ["0.0.0.0/0"]}]}]}, "status": {"conditions": []}});
    let bad_cluster_policy = json!({"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy", "metadata": {"name": "guard", "resourceVersion": "11"}, "spec": {"tier": "Baseline", "priority": 2000, "subject": {"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "a"}}}}}});
    let seeds: [(&str, u8, Vec<Value>); 8] = [
        (
            "namespaces",
            0,
            vec![
                event("ADDED", &namespace),
                bookmark("Namespace", "v1"),
                event("DELETED", &namespace),
                gone.clone(),
            ],
        ),
        (
            "pods",
            1,
            vec![
                event("ADDED", &pod),
                event("MODIFIED", &bad_pod),
                event("DELETED", &bad_pod),
            ],
        ),
        (
            "network-policies",
            2,
            vec![
                event("ADDED", &policy),
                event("MODIFIED", &bad_policy),
                event("ADDED", &never_valid),
                event("DELETED", &policy),
            ],
        ),
        ("services", 3, vec![event("ADDED", &service), gone.clone()]),
        ("endpoint-slices", 4, vec![event("ADDED", &slice)]),
        (
            "nodes",
            5,
            vec![event("ADDED", &node), bookmark("Node", "v1")],
        ),
        (
            "cluster-network-policies",
            6,
            vec![
                event("ADDED", &cluster_policy),
                event("MODIFIED", &bad_cluster_policy),
                event("DELETED", &cluster_policy),
            ],
        ),
        (
            "status-line",
            2,
            vec![json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 500})],
        ),
    ];
    for (name, kind, events) in seeds {
        fs::write(dir.join(name), body(kind, &events)).expect("a seed written");
    }
    // A line cut short, and a line that is not UTF-8, as a broken connection leaves them.
    let mut torn = body(1, &[event("ADDED", &pod)]);
    torn.extend(b"{\"type\": \"MODIFIED\", \"object\": {\"kind\": \"Po");
    fs::write(dir.join("torn-line"), torn).expect("a seed written");
    let mut binary = body(3, &[event("ADDED", &service)]);
    binary.extend(b"\xff\xfe\n");
    fs::write(dir.join("not-utf8"), binary).expect("a seed written");
}

#[test]
#[ignore = "writes files; run by hand"]
fn write_compiler_seeds() {
    let dir = seeds("compiler");
    // The compiler target draws every choice from the bytes: random bytes of a few lengths
    // make scenarios from one sync to a dozen steps.
    let mut rng = Rng::new(0xc0_4d11e5);
    for (index, len) in [64, 128, 256, 512, 1024, 2048].into_iter().enumerate() {
        let bytes: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        fs::write(dir.join(format!("random-{index}-{len}")), bytes).expect("a seed written");
    }
}
