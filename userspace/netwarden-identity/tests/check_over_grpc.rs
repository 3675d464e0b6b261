//! The Check service over a real gRPC connection on a Unix socket: what a proxy sees.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use netwarden_identity::{
    FlowCutter, IdentityService, RefusedConnection, SharedSnapshot, Snapshot, TrustDomain,
    client::{check_request, connect_unix, is_allowed},
    server::{is_local_caller, may_ask_about, serve_tcp, serve_unix},
    shared,
};

const CLUSTER: &str = r"
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: x, labels: {app: server, netwarden.dev/mtls: strict}}
spec: {nodeName: n1, serviceAccountName: server, containers: [{name: c}]}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: x, labels: {app: client}}
spec: {nodeName: n1, serviceAccountName: client, containers: [{name: c}]}
status: {podIP: 10.0.0.2}
";

#[derive(Default)]
struct RecordingCutter(Mutex<Vec<RefusedConnection>>);

impl FlowCutter for RecordingCutter {
    fn cut(&self, connection: &RefusedConnection) -> String {
        self.0.lock().unwrap().push(*connection);
        "recorded".into()
    }
}

fn snapshot() -> Snapshot {
    let (cluster, errors) = netwarden_model::cluster_of_stream("cluster.yaml", CLUSTER);
    assert!(errors.is_empty(), "{errors:?}");
    Snapshot::new(
        cluster,
        vec!["192.168.0.10".parse().unwrap()],
        ["10.0.0.1".parse().unwrap()].into(),
    )
}

#[tokio::test]
async fn a_proxy_is_answered_with_the_decision_and_denies_are_cut() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("authz.sock");
    let cutter = Arc::new(RecordingCutter::default());
    let shared = shared(snapshot());
    let service = Arc::new(IdentityService::new(
        Arc::clone(&shared),
        TrustDomain::default(),
        Some(cutter.clone()),
    ));
    let counts = service.counts();
    let _server = serve_unix(&socket, service).unwrap();
    let mut client = connect_unix(&socket).await.unwrap();

    let source: SocketAddr = "10.0.0.2:40000".parse().unwrap();
    let destination: SocketAddr = "10.0.0.1:8443".parse().unwrap();
    let allowed = client
        .check(check_request(
            source,
            destination,
            "spiffe://cluster.local/ns/x/sa/client",
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(is_allowed(&allowed), "{allowed:?}");
    assert!(cutter.0.lock().unwrap().is_empty());

    let denied = client
        .check(check_request(
            source,
            destination,
            "spiffe://cluster.local/ns/x/sa/server",
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!is_allowed(&denied));
    let status = denied.status.unwrap();
    assert_eq!(status.code, 7, "PERMISSION_DENIED");
    assert!(
        status.message.contains("is not the identity of x/client"),
        "{}",
        status.message
    );
    assert_eq!(
        *cutter.0.lock().unwrap(),
        [RefusedConnection {
            source,
            destination
        }]
    );

    // A request without addresses is refused, not answered OK.
    let malformed = client
        .check(envoy_types::ext_authz::v3::pb::CheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(!is_allowed(&malformed));

    let counts = counts.snapshot();
    assert_eq!(counts.get("allowed"), Some(&1));
    assert_eq!(counts.get("wrong_principal"), Some(&1));
    assert_eq!(counts.get("malformed_request"), Some(&1));
}

#[tokio::test]
async fn before_the_first_apply_the_check_is_unavailable_and_cuts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("authz.sock");
    let cutter = Arc::new(RecordingCutter::default());
    let snapshot = SharedSnapshot::default();
    let service = Arc::new(IdentityService::new(
        Arc::clone(&snapshot),
        TrustDomain::default(),
        Some(cutter.clone()),
    ));
    let counts = service.counts();
    let _server = serve_unix(&socket, service).unwrap();
    let mut client = connect_unix(&socket).await.unwrap();
    let request = || {
        check_request(
            "10.0.0.2:40000".parse().unwrap(),
            "10.0.0.1:8443".parse().unwrap(),
            "spiffe://cluster.local/ns/x/sa/client",
        )
    };

    let status = client.check(request()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(cutter.0.lock().unwrap().is_empty());
    assert_eq!(counts.snapshot().get("not_applied_yet"), Some(&1));

    // The agent's first apply: the same request is now decided.
    *snapshot.write().unwrap() = Some(Arc::new(self::snapshot()));
    let response = client.check(request()).await.unwrap().into_inner();
    assert!(is_allowed(&response), "{response:?}");
}

#[test]
fn only_the_node_and_local_pods_may_call_over_tcp() {
    let shared = shared(snapshot());
    assert!(is_local_caller(&shared, "127.0.0.1".parse().unwrap()));
    assert!(is_local_caller(&shared, "192.168.0.10".parse().unwrap()));
    assert!(is_local_caller(&shared, "10.0.0.1".parse().unwrap()));
    // A pod of the cluster, but not of this node; and a stranger.
    assert!(!is_local_caller(&shared, "10.0.0.2".parse().unwrap()));
    assert!(!is_local_caller(&shared, "203.0.113.9".parse().unwrap()));
}

#[test]
fn a_pod_may_only_ask_about_connections_to_itself() {
    let snapshot = snapshot();
    let server = "10.0.0.1".parse().unwrap();
    let other = "10.0.0.2".parse().unwrap();
    assert!(may_ask_about(&snapshot, server, server));
    assert!(!may_ask_about(&snapshot, server, other));
    assert!(may_ask_about(
        &snapshot,
        "192.168.0.10".parse().unwrap(),
        other
    ));
    assert!(may_ask_about(
        &snapshot,
        "127.0.0.1".parse().unwrap(),
        other
    ));
}

#[tokio::test]
async fn the_node_address_listener_answers_the_node() {
    let cutter = Arc::new(RecordingCutter::default());
    let shared = shared(snapshot());
    let service = Arc::new(IdentityService::new(
        shared,
        TrustDomain::default(),
        Some(cutter.clone()),
    ));
    let (bound, _server) = serve_tcp("127.0.0.1:0".parse().unwrap(), service)
        .await
        .unwrap();
    let mut client = envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient::connect(
        format!("http://{bound}"),
    )
    .await
    .unwrap();
    let response = client
        .check(check_request(
            "10.0.0.2:40000".parse().unwrap(),
            "10.0.0.1:8443".parse().unwrap(),
            "spiffe://cluster.local/ns/x/sa/client",
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(is_allowed(&response), "{response:?}");
}
