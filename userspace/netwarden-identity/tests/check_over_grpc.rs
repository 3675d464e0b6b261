//! The Check service over a real gRPC connection on a Unix socket: what a proxy sees.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use netwarden_identity::{
    CUT_RATE_LIMITED, CutRate, FlowCutter, IdentityService, RefusedConnection, SharedSnapshot,
    Snapshot, SocketAccess, TrustDomain,
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
    let _server = serve_unix(&socket, SocketAccess::default(), service).unwrap();
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
    let _server = serve_unix(&socket, SocketAccess::default(), service).unwrap();
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
fn over_tcp_only_the_destination_pods_own_address_may_ask() {
    let snapshot = snapshot();
    let server = "10.0.0.1".parse().unwrap();
    let client = "10.0.0.2".parse().unwrap();
    assert!(may_ask_about(&snapshot, server, server));
    // Not another pod, not the node (every hostNetwork pod has its addresses), not loopback.
    assert!(!may_ask_about(&snapshot, client, server));
    assert!(!may_ask_about(
        &snapshot,
        "192.168.0.10".parse().unwrap(),
        server
    ));
    assert!(!may_ask_about(
        &snapshot,
        "127.0.0.1".parse().unwrap(),
        server
    ));
    // A pod asking about itself, but it is not a pod of this node.
    assert!(!may_ask_about(&snapshot, client, client));
}

/// A strict server pod whose address is a loopback one, so a test can call from it over TCP.
const LOOPBACK_CLUSTER: &str = r"
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: x, labels: {app: server, netwarden.dev/mtls: strict}}
spec: {nodeName: n1, serviceAccountName: server, containers: [{name: c}]}
status: {podIP: 127.0.0.5}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: x, labels: {app: client}}
spec: {nodeName: n1, serviceAccountName: client, containers: [{name: c}]}
status: {podIP: 10.0.0.2}
";

/// A Check client over TCP to `server`, calling from `from`.
async fn connect_tcp_from(
    from: std::net::IpAddr,
    server: SocketAddr,
) -> netwarden_identity::client::CheckClient {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{server}"))
        .unwrap()
        .connect_with_connector(tower::service_fn(
            move |_: tonic::transport::Uri| async move {
                let socket = tokio::net::TcpSocket::new_v4()?;
                socket.bind(SocketAddr::new(from, 0))?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(socket.connect(server).await?))
            },
        ))
        .await
        .unwrap();
    envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient::new(
        channel,
    )
}

#[tokio::test]
async fn a_tcp_caller_on_a_node_address_cannot_cut_a_pods_flow() {
    let (cluster, errors) = netwarden_model::cluster_of_stream("cluster.yaml", LOOPBACK_CLUSTER);
    assert!(errors.is_empty(), "{errors:?}");
    let node: std::net::IpAddr = "127.0.0.1".parse().unwrap();
    let server_pod: std::net::IpAddr = "127.0.0.5".parse().unwrap();
    let cutter = Arc::new(RecordingCutter::default());
    let service = Arc::new(IdentityService::new(
        shared(Snapshot::new(cluster, vec![node], [server_pod].into())),
        TrustDomain::default(),
        Some(cutter.clone()),
    ));
    let counts = service.counts();
    let (bound, _server) = serve_tcp(SocketAddr::new(node, 0), service).await.unwrap();
    let source: SocketAddr = "10.0.0.2:40000".parse().unwrap();
    let destination = SocketAddr::new(server_pod, 8443);
    // A principal that is not the client's: the check denies, and a deny cuts.
    let wrong = || check_request(source, destination, "spiffe://cluster.local/ns/x/sa/server");

    let mut from_node = connect_tcp_from(node, bound).await;
    let refused = from_node.check(wrong()).await.unwrap().into_inner();
    let status = refused.status.unwrap();
    assert_eq!(status.code, 7, "PERMISSION_DENIED: {status:?}");
    assert!(
        status.message.contains("is not the pod"),
        "{}",
        status.message
    );
    assert!(cutter.0.lock().unwrap().is_empty(), "nothing was cut");
    assert_eq!(
        counts.snapshot().get("caller_not_the_destination"),
        Some(&1)
    );

    // The server pod's own proxy is decided, and its deny cuts the flow it named.
    let mut from_pod = connect_tcp_from(server_pod, bound).await;
    let denied = from_pod.check(wrong()).await.unwrap().into_inner();
    assert!(!is_allowed(&denied));
    assert_eq!(
        *cutter.0.lock().unwrap(),
        [RefusedConnection {
            source,
            destination
        }]
    );
    let allowed = from_pod
        .check(check_request(
            source,
            destination,
            "spiffe://cluster.local/ns/x/sa/client",
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(is_allowed(&allowed), "{allowed:?}");
}

#[tokio::test(start_paused = true)]
async fn cuts_are_rate_limited_per_destination_pod_and_denies_still_answered() {
    let cutter = Arc::new(RecordingCutter::default());
    let service = IdentityService::new(
        shared(snapshot()),
        TrustDomain::default(),
        Some(cutter.clone()),
    )
    .with_cut_rate(CutRate {
        per_second: 100,
        burst: 3,
    });
    let deny = check_request(
        "10.0.0.2:40000".parse().unwrap(),
        "10.0.0.1:8443".parse().unwrap(),
        "spiffe://cluster.local/ns/x/sa/server",
    );
    let cuts = || cutter.0.lock().unwrap().len();
    for _ in 0..5 {
        let decision = service.check_request(&deny, None).unwrap();
        assert!(!decision.is_allowed());
    }
    assert_eq!(cuts(), 3, "the burst");
    assert_eq!(service.counts().snapshot().get(CUT_RATE_LIMITED), Some(&2));

    tokio::time::advance(std::time::Duration::from_millis(10)).await;
    service.check_request(&deny, None).unwrap();
    assert_eq!(cuts(), 4, "one token back after 10 ms");
    service.check_request(&deny, None).unwrap();
    assert_eq!(cuts(), 4);
}

#[tokio::test]
async fn the_unix_socket_has_the_mode_and_group_asked_for() {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};

    let dir = tempfile::tempdir().unwrap();
    // A group the test may give the socket: any as root, else our own.
    let probe = dir.path().join("probe");
    std::fs::write(&probe, "").unwrap();
    let probe = std::fs::metadata(&probe).unwrap();
    let group = if probe.uid() == 0 { 4242 } else { probe.gid() };
    for (name, access) in [
        (
            "authz.sock",
            SocketAccess {
                mode: 0o660,
                group: Some(group),
            },
        ),
        (
            "private.sock",
            SocketAccess {
                mode: 0o600,
                group: None,
            },
        ),
    ] {
        let socket = dir.path().join(name);
        // A stale socket of a previous agent is replaced.
        drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
        let service = Arc::new(IdentityService::new(
            shared(snapshot()),
            TrustDomain::default(),
            None,
        ));
        let _server = serve_unix(&socket, access, service).unwrap();
        let metadata = std::fs::metadata(&socket).unwrap();
        assert_eq!(
            metadata.permissions().mode() & 0o7777,
            access.mode,
            "{name}"
        );
        assert_eq!(
            metadata.gid(),
            access.group.unwrap_or(probe.gid()),
            "{name}"
        );
        // It serves, and no staging directory is left beside it.
        connect_unix(&socket).await.unwrap();
        let mut left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .filter(|file| file.starts_with('.'))
            .collect();
        left.sort();
        assert!(left.is_empty(), "{left:?}");
    }
}
