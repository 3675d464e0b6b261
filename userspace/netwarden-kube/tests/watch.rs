//! `KubeSource` against a mocked API server.
//!
//! No API server can run here, so the client's HTTP service is a `tower-test` mock (the way
//! kube-rs's controller-rs example tests its controller): the test plays the API server, takes
//! each request the watchers make, checks it, and answers with what a real API server sends —
//! List objects with `metadata.resourceVersion`, and watch responses as newline-delimited
//! `{"type": ..., "object": ...}` events on a body that stays open until the test closes it.
//!
//! Every step waits at most `STEP`, so a missing request or change fails instead of hanging.

use std::{collections::BTreeMap, convert::Infallible, time::Duration};

use bytes::Bytes;
use futures::channel::mpsc;
use http::{Method, Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt as _, StreamBody, combinators::BoxBody};
use kube::{Client, client::Body};
use netwarden_kube::{
    KubeError, KubeSource, WatchHealth,
    events::{DEFAULT_WINDOW, PolicyEvents, Unenforceable},
};
use netwarden_model::{PodRef, PolicyRef, ServiceRef};
use serde_json::{Value, json};
use tokio::time::timeout;

/// Longer than the watcher's first backoff (0.8 s, jittered up to twice that).
const STEP: Duration = Duration::from_secs(10);

type MockBody = BoxBody<Bytes, Infallible>;
type Handle = tower_test::mock::Handle<Request<Body>, Response<MockBody>>;
type Respond = tower_test::mock::SendResponse<Response<MockBody>>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Namespaces,
    Pods,
    Policies,
    Services,
    EndpointSlices,
    Nodes,
    ClusterPolicies,
}

impl Kind {
    const ALL: [Kind; 7] = [
        Kind::Namespaces,
        Kind::Pods,
        Kind::Policies,
        Kind::Services,
        Kind::EndpointSlices,
        Kind::Nodes,
        Kind::ClusterPolicies,
    ];

    /// The cluster-wide collection path the watcher must use.
    fn of_path(path: &str) -> Option<Self> {
        match path {
            "/api/v1/namespaces" => Some(Self::Namespaces),
            "/api/v1/pods" => Some(Self::Pods),
            "/apis/networking.k8s.io/v1/networkpolicies" => Some(Self::Policies),
            "/api/v1/services" => Some(Self::Services),
            "/apis/discovery.k8s.io/v1/endpointslices" => Some(Self::EndpointSlices),
            "/api/v1/nodes" => Some(Self::Nodes),
            "/apis/policy.networking.k8s.io/v1alpha2/clusternetworkpolicies" => {
                Some(Self::ClusterPolicies)
            }
            _ => None,
        }
    }

    fn list_kind(self) -> (&'static str, &'static str) {
        match self {
            Self::Namespaces => ("v1", "NamespaceList"),
            Self::Pods => ("v1", "PodList"),
            Self::Policies => ("networking.k8s.io/v1", "NetworkPolicyList"),
            Self::Services => ("v1", "ServiceList"),
            Self::EndpointSlices => ("discovery.k8s.io/v1", "EndpointSliceList"),
            Self::Nodes => ("v1", "NodeList"),
            Self::ClusterPolicies => (
                "policy.networking.k8s.io/v1alpha2",
                "ClusterNetworkPolicyList",
            ),
        }
    }
}

/// One request of a watcher, waiting for the test's answer.
struct Call {
    kind: Kind,
    uri: String,
    query: BTreeMap<String, String>,
    respond: Respond,
}

impl Call {
    fn is_watch(&self) -> bool {
        self.query.get("watch").map(String::as_str) == Some("true")
    }

    /// Answers an initial list with these items at `resource_version`.
    fn list(self, resource_version: &str, items: Vec<Value>) {
        assert!(!self.is_watch(), "expected a list, got {}", self.uri);
        let (api_version, kind) = self.kind.list_kind();
        let mut body = json!({
            "apiVersion": api_version,
            "kind": kind,
            "metadata": {"resourceVersion": resource_version},
        });
        body["items"] = Value::Array(items);
        let (stream, tx) = open_body();
        tx.unbounded_send(Ok(Frame::data(Bytes::from(body.to_string()))))
            .unwrap();
        drop(tx);
        self.respond.send_response(ok(stream));
    }

    /// Accepts a watch that must resume from `resource_version`, and keeps it open.
    fn watch_from(self, resource_version: &str) -> Watch {
        assert!(self.is_watch(), "expected a watch, got {}", self.uri);
        assert_eq!(
            self.query.get("resourceVersion").map(String::as_str),
            Some(resource_version),
            "watch resumes from the wrong resourceVersion: {}",
            self.uri
        );
        assert_eq!(
            self.query.get("allowWatchBookmarks").map(String::as_str),
            Some("true"),
            "watch without bookmarks: {}",
            self.uri
        );
        let (stream, tx) = open_body();
        self.respond.send_response(ok(stream));
        Watch { tx }
    }

    /// The API server does not serve the resource (its CRD is not installed).
    fn not_found(self) {
        assert!(!self.is_watch(), "expected a list, got {}", self.uri);
        let body = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": "the server could not find the requested resource",
            "reason": "NotFound", "details": {}, "code": 404
        });
        let (stream, tx) = open_body();
        tx.unbounded_send(Ok(Frame::data(Bytes::from(body.to_string()))))
            .unwrap();
        drop(tx);
        self.respond.send_response(
            Response::builder()
                .status(404)
                .header("content-type", "application/json")
                .body(stream)
                .unwrap(),
        );
    }

    /// The connection fails, as when the API server is unreachable.
    fn unreachable(self) {
        self.respond
            .send_error(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
    }
}

type Frames = mpsc::UnboundedSender<Result<Frame<Bytes>, Infallible>>;

fn open_body() -> (MockBody, Frames) {
    let (tx, rx) = mpsc::unbounded();
    (StreamBody::new(rx).boxed(), tx)
}

fn ok(body: MockBody) -> Response<MockBody> {
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(body)
        .unwrap()
}

/// An open watch response.
struct Watch {
    tx: Frames,
}

impl Watch {
    /// Sends one watch event, as the API server frames it: JSON and a newline.
    fn send(&self, event_type: &str, object: Value) {
        let mut event = json!({"type": event_type});
        event["object"] = object;
        let line = format!("{event}\n");
        self.tx
            .unbounded_send(Ok(Frame::data(Bytes::from(line))))
            .unwrap();
    }

    /// A bookmark, shaped as the API server sends it for pods.
    fn bookmark(&self, resource_version: &str) {
        self.send(
            "BOOKMARK",
            json!({
                "kind": "Pod", "apiVersion": "v1",
                "metadata": {"resourceVersion": resource_version, "creationTimestamp": null},
                "spec": {"containers": null}, "status": {}
            }),
        );
    }

    /// The API server's answer to a watch from a compacted resourceVersion.
    fn gone(&self) {
        self.send(
            "ERROR",
            json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Failure",
                "message": "too old resource version: 100 (250)",
                "reason": "Expired", "code": 410
            }),
        );
    }

    /// The connection ends (the API server's watch timeout, a restart, a network cut).
    fn close(self) {
        drop(self.tx);
    }
}

/// The fake API server: hands out the watchers' requests by kind, whatever order they come in.
struct ApiServer {
    handle: Handle,
    pending: Vec<Call>,
    /// How long [`next`](Self::next) waits for a request.
    step: Duration,
}

impl ApiServer {
    async fn next(&mut self, kind: Kind) -> Call {
        if let Some(index) = self.pending.iter().position(|call| call.kind == kind) {
            return self.pending.remove(index);
        }
        loop {
            let step = self.step;
            let (request, respond) = timeout(step, self.handle.next_request())
                .await
                .unwrap_or_else(|_| panic!("no {kind:?} request within {step:?}"))
                .expect("the client is gone");
            assert_eq!(request.method(), Method::GET, "{}", request.uri());
            let uri = request.uri().to_string();
            let kind_of = Kind::of_path(request.uri().path())
                .unwrap_or_else(|| panic!("unexpected request {uri}"));
            let query = request
                .uri()
                .query()
                .unwrap_or_default()
                .split('&')
                .filter_map(|pair| pair.split_once('='))
                .map(|(key, value)| (key.to_owned(), value.to_owned()))
                .collect();
            let call = Call {
                kind: kind_of,
                uri,
                query,
                respond,
            };
            if kind_of == kind {
                return call;
            }
            self.pending.push(call);
        }
    }

    /// Answers the initial lists, with no Services and no EndpointSlices.
    async fn list_all(
        &mut self,
        source: &mut KubeSource,
        namespaces: Vec<Value>,
        pods: Vec<Value>,
        policies: Vec<Value>,
    ) {
        self.list_with_services(source, namespaces, pods, policies, vec![], vec![])
            .await;
    }

    /// Answers the initial lists of every kind.
    async fn list_with_services(
        &mut self,
        source: &mut KubeSource,
        namespaces: Vec<Value>,
        pods: Vec<Value>,
        policies: Vec<Value>,
        services: Vec<Value>,
        endpoint_slices: Vec<Value>,
    ) {
        self.next(Kind::Namespaces).await.list("100", namespaces);
        self.next(Kind::Pods).await.list("100", pods);
        self.next(Kind::Policies).await.list("100", policies);
        self.next(Kind::Services).await.list("100", services);
        self.next(Kind::EndpointSlices)
            .await
            .list("100", endpoint_slices);
        self.next(Kind::Nodes).await.list("100", vec![]);
        self.next(Kind::ClusterPolicies).await.list("100", vec![]);
        until(source, "synced", |s| s.is_synced()).await;
    }
}

fn start() -> (KubeSource, ApiServer) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<MockBody>>();
    let source = KubeSource::start(Client::new(service, "default"));
    (
        source,
        ApiServer {
            handle,
            pending: Vec::new(),
            step: STEP,
        },
    )
}

/// Waits (at most `STEP`) until `done` holds, woken by the source's change signal.
async fn until(source: &mut KubeSource, what: &str, mut done: impl FnMut(&mut KubeSource) -> bool) {
    let waited = timeout(STEP, async {
        while !done(source) {
            source.changed().await;
        }
    })
    .await;
    assert!(waited.is_ok(), "timed out waiting until {what}");
}

fn namespace(name: &str, labels: Value) -> Value {
    let mut object = json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "resourceVersion": "10", "uid": format!("uid-{name}")},
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"}
    });
    object["metadata"]["labels"] = labels;
    object
}

fn pod(namespace: &str, name: &str, resource_version: &str, ip: &str, app: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name, "namespace": namespace, "resourceVersion": resource_version,
            "uid": format!("uid-{namespace}-{name}"), "labels": {"app": app},
            "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-01-01T00:00:00Z"},
            "managedFields": [{"manager": "kubelet", "operation": "Update",
                               "apiVersion": "v1", "fieldsType": "FieldsV1"}]
        },
        "spec": {
            "nodeName": "node-1",
            "containers": [{"name": "c", "image": "nginx",
                            "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]}]
        },
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "192.168.1.1"}
    })
}

fn policy(namespace: &str, name: &str, resource_version: &str, spec: Value) -> Value {
    let mut object = json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": namespace, "resourceVersion": resource_version,
                     "uid": format!("uid-{namespace}-{name}"), "generation": 1}
    });
    object["spec"] = spec;
    object
}

fn allow_from_app(app: &str) -> Value {
    json!({
        "podSelector": {},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": app}}}]}],
        "policyTypes": ["Ingress"]
    })
}

fn bad_cidr() -> Value {
    json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/33"}}]}]})
}

fn service(
    namespace: &str,
    name: &str,
    resource_version: &str,
    cluster_ip: &str,
    port: i64,
) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {
            "name": name, "namespace": namespace, "resourceVersion": resource_version,
            "uid": format!("uid-{namespace}-{name}"),
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"}
        },
        "spec": {
            "type": "ClusterIP", "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
            "selector": {"app": name}, "sessionAffinity": "None",
            "ports": [{"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}]
        },
        "status": {"loadBalancer": {}}
    })
}

fn endpoint_slice(
    namespace: &str,
    service: &str,
    resource_version: &str,
    pod_name: &str,
    ip: &str,
    ready: bool,
) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{service}-abcde"), "namespace": namespace,
            "resourceVersion": resource_version,
            "labels": {"kubernetes.io/service-name": service}
        },
        "addressType": "IPv4",
        "endpoints": [{
            "addresses": [ip], "nodeName": "node-1",
            "conditions": {"ready": ready, "serving": ready, "terminating": false},
            "targetRef": {"kind": "Pod", "name": pod_name, "namespace": namespace}
        }],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
    })
}

fn service_ref(namespace: &str, name: &str) -> ServiceRef {
    ServiceRef {
        namespace: namespace.into(),
        name: name.into(),
    }
}

fn service_names(source: &mut KubeSource) -> Vec<String> {
    source
        .cluster()
        .0
        .services
        .keys()
        .map(ToString::to_string)
        .collect()
}

fn pod_ref(namespace: &str, name: &str) -> PodRef {
    PodRef {
        namespace: namespace.into(),
        name: name.into(),
    }
}

fn policy_ref(namespace: &str, name: &str) -> PolicyRef {
    PolicyRef {
        namespace: namespace.into(),
        name: name.into(),
    }
}

fn pod_names(source: &mut KubeSource) -> Vec<String> {
    source
        .cluster()
        .0
        .pods
        .keys()
        .map(ToString::to_string)
        .collect()
}

fn watch_errors(source: &mut KubeSource) -> Vec<String> {
    source
        .cluster()
        .1
        .into_iter()
        .filter(|error| matches!(error, KubeError::Watch { .. }))
        .map(|error| error.to_string())
        .collect()
}

#[tokio::test]
async fn the_source_is_synced_only_once_every_kind_is_listed() {
    let (mut source, mut api) = start();
    assert!(!source.is_synced());

    api.next(Kind::Namespaces)
        .await
        .list("100", vec![namespace("x", json!({"team": "blue"}))]);
    let first_list = api.next(Kind::Pods).await;
    // A paged, consistent list.
    assert_eq!(
        first_list.query.get("limit").map(String::as_str),
        Some("500"),
        "{}",
        first_list.uri
    );
    first_list.list("100", vec![pod("x", "a", "11", "10.244.0.5", "a")]);
    until(&mut source, "the pod is listed", |s| {
        pod_names(s) == ["x/a"]
    })
    .await;
    assert!(!source.is_synced(), "synced without the NetworkPolicy list");

    api.next(Kind::Policies)
        .await
        .list("100", vec![policy("x", "allow", "12", allow_from_app("a"))]);
    api.next(Kind::Services).await.list("100", vec![]);
    until(&mut source, "the policy is listed", |s| {
        !s.cluster().0.policies.is_empty()
    })
    .await;
    assert!(!source.is_synced(), "synced without the EndpointSlice list");
    api.next(Kind::EndpointSlices).await.list("100", vec![]);
    api.next(Kind::Nodes).await.list("100", vec![]);
    until(&mut source, "the nodes are listed", |s| {
        s.watch_health()[5].last_success.is_some()
    })
    .await;
    assert!(
        !source.is_synced(),
        "synced without the ClusterNetworkPolicy list"
    );
    api.next(Kind::ClusterPolicies).await.list("100", vec![]);
    until(&mut source, "synced", |s| s.is_synced()).await;
    assert!(source.absent_kinds().is_empty());

    let (cluster, errors) = source.cluster();
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(cluster.namespaces["x"].labels["team"], "blue");
    assert_eq!(
        cluster.namespaces["x"].labels["kubernetes.io/metadata.name"],
        "x"
    );
    let a = &cluster.pods[&pod_ref("x", "a")];
    assert_eq!(a.ips, ["10.244.0.5".parse::<std::net::IpAddr>().unwrap()]);
    assert_eq!(a.node_name.as_deref(), Some("node-1"));
    assert_eq!(a.ports[0].name.as_deref(), Some("http"));
    assert!(cluster.policies.contains_key(&policy_ref("x", "allow")));

    // Then each kind watches from its list's resourceVersion, with bookmarks.
    for kind in Kind::ALL {
        api.next(kind).await.watch_from("100");
    }
}

#[tokio::test]
async fn watch_events_add_modify_and_delete_objects() {
    let (mut source, mut api) = start();
    api.list_all(
        &mut source,
        vec![namespace("x", json!({}))],
        vec![
            pod("x", "a", "11", "10.244.0.5", "a"),
            pod("x", "c", "13", "10.244.0.7", "c"),
        ],
        vec![],
    )
    .await;
    let watch = api.next(Kind::Pods).await.watch_from("100");
    let listed = source.digest();

    watch.send("ADDED", pod("x", "b", "101", "10.244.0.6", "b"));
    until(&mut source, "b is added", |s| {
        pod_names(s) == ["x/a", "x/b", "x/c"]
    })
    .await;
    let added = source.digest();
    assert_ne!(added, listed);

    watch.send("MODIFIED", pod("x", "a", "102", "10.244.0.5", "a2"));
    until(&mut source, "a is relabelled", |s| {
        s.cluster().0.pods[&pod_ref("x", "a")].labels["app"] == "a2"
    })
    .await;
    assert_ne!(source.digest(), added);

    watch.send("DELETED", pod("x", "c", "103", "10.244.0.7", "c"));
    until(&mut source, "c is deleted", |s| {
        pod_names(s) == ["x/a", "x/b"]
    })
    .await;
    assert!(source.cluster().1.is_empty());
    assert_eq!(source.restarts(), 0);
}

#[tokio::test]
async fn a_bookmark_moves_the_resume_point_and_changes_nothing_else() {
    let (mut source, mut api) = start();
    api.list_all(
        &mut source,
        vec![],
        vec![pod("x", "a", "11", "10.244.0.5", "a")],
        vec![],
    )
    .await;
    let digest = source.digest();
    let watch = api.next(Kind::Pods).await.watch_from("100");
    watch.bookmark("150");
    watch.close();

    // The watch ended: the watcher reconnects from the bookmark, not from the list.
    api.next(Kind::Pods).await.watch_from("150");
    assert_eq!(source.digest(), digest);
    assert_eq!(pod_names(&mut source), ["x/a"]);
    assert_eq!(source.restarts(), 0);
}

#[tokio::test]
async fn a_closed_watch_reconnects_from_the_last_event() {
    let (mut source, mut api) = start();
    api.list_all(&mut source, vec![], vec![], vec![]).await;
    let watch = api.next(Kind::Pods).await.watch_from("100");
    watch.send("ADDED", pod("x", "a", "101", "10.244.0.5", "a"));
    until(&mut source, "a is added", |s| pod_names(s) == ["x/a"]).await;
    watch.close();

    let watch = api.next(Kind::Pods).await.watch_from("101");
    watch.send("ADDED", pod("x", "b", "102", "10.244.0.6", "b"));
    until(&mut source, "b is added after the reconnect", |s| {
        pod_names(s) == ["x/a", "x/b"]
    })
    .await;
    assert_eq!(source.restarts(), 0, "a closed watch is not an error");
}

#[tokio::test]
async fn gone_relists_and_swaps_the_cache_when_the_new_list_is_complete() {
    let (mut source, mut api) = start();
    api.list_all(
        &mut source,
        vec![],
        vec![
            pod("x", "a", "11", "10.244.0.5", "a"),
            pod("x", "b", "12", "10.244.0.6", "b"),
        ],
        vec![],
    )
    .await;
    let watch = api.next(Kind::Pods).await.watch_from("100");
    watch.gone();
    until(&mut source, "the 410 is reported", |s| s.restarts() == 1).await;
    let errors = watch_errors(&mut source);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].starts_with("watching Pods: "), "{errors:?}");

    // After the backoff the watcher lists again; until the list arrives, the old state holds.
    let relist = api.next(Kind::Pods).await;
    assert!(!relist.is_watch(), "410 must relist, got {}", relist.uri);
    assert_eq!(pod_names(&mut source), ["x/a", "x/b"]);
    assert!(source.is_synced());
    relist.list(
        "300",
        vec![
            pod("x", "b", "12", "10.244.0.6", "b"),
            pod("x", "d", "250", "10.244.0.8", "d"),
        ],
    );
    until(&mut source, "the relist replaces the cache", |s| {
        pod_names(s) == ["x/b", "x/d"]
    })
    .await;
    assert!(watch_errors(&mut source).is_empty());
    api.next(Kind::Pods).await.watch_from("300");
}

#[tokio::test]
async fn an_unreachable_api_server_keeps_the_last_state_while_the_watcher_backs_off() {
    let (mut source, mut api) = start();
    api.list_all(
        &mut source,
        vec![namespace("x", json!({}))],
        vec![pod("x", "a", "11", "10.244.0.5", "a")],
        vec![policy("x", "allow", "12", allow_from_app("a"))],
    )
    .await;
    let (before, _) = source.cluster();
    let digest = source.digest();
    let watch = api.next(Kind::Pods).await.watch_from("100");
    watch.close();

    // Two failed reconnects, each after a backoff.
    api.next(Kind::Pods).await.unreachable();
    until(&mut source, "the failure is reported", |s| {
        s.restarts() >= 1
    })
    .await;
    let (during, errors) = source.cluster();
    assert_eq!(during, before, "the last state is kept");
    assert_eq!(source.digest(), digest);
    assert!(source.is_synced());
    assert!(
        errors
            .iter()
            .any(|error| matches!(error, KubeError::Watch { kind: "Pod", .. })),
        "{errors:?}"
    );
    api.next(Kind::Pods).await.unreachable();
    until(&mut source, "the second failure is reported", |s| {
        s.restarts() >= 2
    })
    .await;

    // The API server is back: the watch resumes where it was, nothing missed.
    let watch = api.next(Kind::Pods).await.watch_from("100");
    watch.send("ADDED", pod("x", "b", "101", "10.244.0.6", "b"));
    until(&mut source, "b is added", |s| {
        pod_names(s) == ["x/a", "x/b"]
    })
    .await;
    assert!(watch_errors(&mut source).is_empty());
}

#[tokio::test]
async fn an_invalid_network_policy_is_reported_with_its_field_and_the_rest_is_enforced() {
    let (mut source, mut api) = start();
    api.list_all(
        &mut source,
        vec![namespace("x", json!({}))],
        vec![pod("x", "a", "11", "10.244.0.5", "a")],
        vec![
            policy("x", "allow", "12", allow_from_app("a")),
            policy("x", "bad", "13", bad_cidr()),
        ],
    )
    .await;

    let (cluster, errors) = source.cluster();
    let [KubeError::Invalid(error)] = errors.as_slice() else {
        panic!("expected one validation error, got {errors:?}");
    };
    assert_eq!(error.kind, "NetworkPolicy");
    assert_eq!(error.object, "x/bad");
    assert_eq!(error.field, "spec.ingress[0].from[0].ipBlock.cidr");
    let allow = cluster.policies[&policy_ref("x", "allow")].clone();
    assert_eq!(allow.ingress.len(), 1);
    assert_eq!(cluster.pods.len(), 1);
    // Events about it attach to this incarnation of the object.
    let reference = source
        .policy_reference(&policy_ref("x", "bad"))
        .expect("the cache holds it");
    assert_eq!(reference.uid.as_deref(), Some("uid-x-bad"));
    assert_eq!(reference.kind.as_deref(), Some("NetworkPolicy"));
    assert_eq!(source.policy_reference(&policy_ref("x", "gone")), None);
    // Never valid: it isolates its namespace both ways (fail closed).
    let bad = &cluster.policies[&policy_ref("x", "bad")];
    assert!(bad.policy_types.ingress && bad.policy_types.egress);
    assert!(bad.ingress.is_empty() && bad.egress.is_empty());

    // A policy that turns invalid keeps its last valid version.
    let watch = api.next(Kind::Policies).await.watch_from("100");
    watch.send("MODIFIED", policy("x", "allow", "101", bad_cidr()));
    until(&mut source, "the invalid update is reported", |s| {
        s.cluster()
            .1
            .iter()
            .any(|error| matches!(error, KubeError::Invalid(error) if error.object == "x/allow"))
    })
    .await;
    assert_eq!(
        source.cluster().0.policies[&policy_ref("x", "allow")],
        allow
    );

    // Fixing it applies the fix.
    watch.send("MODIFIED", policy("x", "bad", "102", allow_from_app("b")));
    until(&mut source, "the fixed policy applies", |s| {
        s.cluster().0.policies[&policy_ref("x", "bad")]
            .ingress
            .len()
            == 1
    })
    .await;
}

#[tokio::test]
async fn the_event_on_an_invalid_policy_attaches_to_the_cached_object() {
    let (mut source, mut api) = start();
    api.list_all(
        &mut source,
        vec![namespace("x", json!({}))],
        vec![pod("x", "a", "11", "10.244.0.5", "a")],
        vec![policy("x", "bad", "13", bad_cidr())],
    )
    .await;
    // The agent's Events go through a client of their own; here, a second mock.
    let (service, mut events_api) = tower_test::mock::pair::<Request<Body>, Response<MockBody>>();
    let mut events = PolicyEvents::start(Client::new(service, "default"), "node-1", DEFAULT_WINDOW);

    // What the agent does at every apply.
    let problems = Unenforceable::from_errors(&source.cluster().1);
    assert_eq!(source.report(&mut events, &problems), 1);
    let (request, respond) = timeout(STEP, events_api.next_request())
        .await
        .expect("no Event posted")
        .expect("the client is gone");
    assert_eq!(request.method(), Method::POST);
    assert_eq!(
        request.uri().path(),
        "/apis/events.k8s.io/v1/namespaces/x/events"
    );
    let body = request.into_body().collect().await.unwrap().to_bytes();
    let event: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(event["regarding"]["uid"], "uid-x-bad");
    assert_eq!(event["regarding"]["kind"], "NetworkPolicy");
    assert_eq!(event["reason"], "InvalidField");
    assert!(
        event["note"]
            .as_str()
            .unwrap()
            .starts_with("spec.ingress[0].from[0].ipBlock.cidr: "),
        "{event}"
    );
    respond.send_response(
        Response::builder()
            .status(201)
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(body).boxed())
            .unwrap(),
    );

    // The next apply finds it again: nothing is posted within the window.
    let problems = Unenforceable::from_errors(&source.cluster().1);
    assert_eq!(problems.len(), 1);
    assert_eq!(source.report(&mut events, &problems), 0);
    // A policy the cache no longer holds is not reported.
    let gone = Unenforceable::over_capacity(policy_ref("x", "gone"), "spec.egress", "x/a", "full");
    assert_eq!(source.report(&mut events, &[gone]), 0);
}

#[tokio::test]
async fn services_and_endpoint_slices_are_listed_and_followed() {
    let (mut source, mut api) = start();
    api.list_with_services(
        &mut source,
        vec![namespace("x", json!({}))],
        vec![pod("x", "web-1", "11", "10.244.0.5", "web")],
        vec![],
        vec![service("x", "web", "12", "10.96.0.10", 80)],
        vec![endpoint_slice(
            "x",
            "web",
            "13",
            "web-1",
            "10.244.0.5",
            true,
        )],
    )
    .await;
    let (cluster, errors) = source.cluster();
    assert!(errors.is_empty(), "{errors:?}");
    let web = &cluster.services[&service_ref("x", "web")];
    assert_eq!(
        web.cluster_ips,
        ["10.96.0.10".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(web.ports[0].port, 80);
    let slices: Vec<_> = cluster
        .endpoint_slices_of(&service_ref("x", "web"))
        .collect();
    assert_eq!(slices.len(), 1);
    assert_eq!(slices[0].endpoints[0].pod, Some(pod_ref("x", "web-1")));
    assert!(slices[0].endpoints[0].ready);

    let services = api.next(Kind::Services).await.watch_from("100");
    let slices = api.next(Kind::EndpointSlices).await.watch_from("100");
    let listed = source.digest();

    // The backend stops being ready.
    slices.send(
        "MODIFIED",
        endpoint_slice("x", "web", "101", "web-1", "10.244.0.5", false),
    );
    until(&mut source, "the endpoint is not ready", |s| {
        s.cluster()
            .0
            .endpoint_slices
            .values()
            .all(|slice| slice.endpoints.iter().all(|endpoint| !endpoint.ready))
    })
    .await;
    assert_ne!(source.digest(), listed);

    // A Service that does not validate is reported and left out.
    services.send("ADDED", service("x", "bad", "102", "10.96.0.11", 70000));
    until(&mut source, "the invalid Service is reported", |s| {
        s.cluster().1.iter().any(|error| {
            matches!(error, KubeError::Invalid(error)
                if error.kind == "Service" && error.object == "x/bad"
                    && error.field == "spec.ports[0].port")
        })
    })
    .await;
    assert_eq!(service_names(&mut source), ["x/web"]);
    // It is no NetworkPolicy: no Event is due for it.
    assert!(Unenforceable::from_errors(&source.cluster().1).is_empty());

    services.send("MODIFIED", service("x", "web", "103", "10.96.0.10", 8080));
    until(&mut source, "the port change applies", |s| {
        s.cluster().0.services[&service_ref("x", "web")].ports[0].port == 8080
    })
    .await;
    services.send("DELETED", service("x", "web", "104", "10.96.0.10", 8080));
    slices.send(
        "DELETED",
        endpoint_slice("x", "web", "105", "web-1", "10.244.0.5", false),
    );
    until(&mut source, "the Service and its slice are gone", |s| {
        let (cluster, _) = s.cluster();
        cluster.services.is_empty() && cluster.endpoint_slices.is_empty()
    })
    .await;
    assert_eq!(source.restarts(), 0);
}

fn pod_watch(source: &KubeSource) -> WatchHealth {
    let health = source.watch_health();
    assert_eq!(
        health.iter().map(|kind| kind.kind).collect::<Vec<_>>(),
        [
            "Namespace",
            "Pod",
            "NetworkPolicy",
            "Service",
            "EndpointSlice",
            "Node",
            "ClusterNetworkPolicy"
        ]
    );
    health[1].clone()
}

#[tokio::test(start_paused = true)]
async fn a_watch_that_keeps_failing_turns_stale_after_the_bound_and_recovers_on_a_quiet_cluster() {
    const STALE_AFTER: Duration = Duration::from_mins(1);
    let (source, mut api) = start();
    let mut source = source.with_stale_after(STALE_AFTER);
    // Paused time: the watcher's backoffs (up to 30 s) pass as soon as everything waits.
    api.step = Duration::from_mins(10);
    api.list_all(
        &mut source,
        vec![namespace("x", json!({}))],
        vec![pod("x", "a", "11", "10.244.0.5", "a")],
        vec![],
    )
    .await;
    let (before, _) = source.cluster();
    api.next(Kind::Pods).await.watch_from("100").close();
    assert!(source.watch_health().iter().all(|kind| kind.healthy));
    assert!(pod_watch(&source).last_success.is_some());

    // The API server fails every retry of the watcher (backing off 0.8 s doubling to 30 s),
    // while the test waits for the source to report a change of health.
    let first_failure = tokio::time::Instant::now();
    api.next(Kind::Pods).await.unreachable();
    let mut failures = 1;
    let stale_for = loop {
        tokio::select! {
            call = api.next(Kind::Pods) => {
                call.unreachable();
                failures += 1;
            }
            () = source.changed() => {
                let pod = pod_watch(&source);
                if !pod.healthy {
                    break first_failure.elapsed();
                }
                if source.restarts() > 0 {
                    assert!(pod.failing_for.is_some(), "{pod:?}");
                }
            }
        }
    };
    assert!(failures >= 4, "the watcher retried only {failures} times");
    // Woken at the bound itself, not at the next failure.
    assert!(
        (STALE_AFTER..STALE_AFTER + Duration::from_millis(5)).contains(&stale_for),
        "stale after {stale_for:?}, not at the bound"
    );
    let pod = pod_watch(&source);
    assert!(
        !pod.healthy && pod.failing_for >= Some(STALE_AFTER),
        "{pod:?}"
    );
    assert!(
        source.watch_health()[0].healthy,
        "other kinds are not affected"
    );
    // The caches keep what they had: the agent keeps enforcing the last state.
    assert_eq!(source.cluster().0, before);

    // The API server is back. The watch resumes with no event to deliver (a quiet cluster):
    // the accepted request alone makes it healthy again.
    let watch = api.next(Kind::Pods).await.watch_from("100");
    let waited = timeout(api.step, async {
        while !pod_watch(&source).healthy {
            source.changed().await;
        }
    })
    .await;
    assert!(waited.is_ok(), "the resumed watch is still reported stale");
    assert_eq!(pod_watch(&source).failing_for, None);
    drop(watch);
}

fn node(name: &str, resource_version: &str, address: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {
            "name": name, "resourceVersion": resource_version, "uid": format!("uid-{name}"),
            "labels": {"kubernetes.io/os": "linux"},
            "annotations": {"node.alpha.kubernetes.io/ttl": "0"}
        },
        "spec": {"podCIDR": "10.244.0.0/24"},
        "status": {
            "addresses": [{"type": "InternalIP", "address": address},
                          {"type": "Hostname", "address": name}],
            "conditions": [{"type": "Ready", "status": "True"}],
            "images": [{"names": ["nginx"], "sizeBytes": 1}]
        }
    })
}

fn cluster_policy(name: &str, resource_version: &str, priority: i64) -> Value {
    json!({
        "apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
        "metadata": {"name": name, "resourceVersion": resource_version, "uid": format!("uid-{name}"),
                     "generation": 1},
        "spec": {
            "tier": "Admin", "priority": priority,
            "subject": {"namespaces": {"matchLabels": {"team": "blue"}}},
            "egress": [{"name": "no-nodes", "action": "Deny",
                        "to": [{"nodes": {"matchLabels": {"kubernetes.io/os": "linux"}}}]}]
        },
        "status": {"conditions": []}
    })
}

#[tokio::test]
async fn nodes_and_cluster_network_policies_are_listed_and_followed() {
    let (mut source, mut api) = start();
    api.next(Kind::Namespaces).await.list("100", vec![]);
    api.next(Kind::Pods).await.list("100", vec![]);
    api.next(Kind::Policies).await.list("100", vec![]);
    api.next(Kind::Services).await.list("100", vec![]);
    api.next(Kind::EndpointSlices).await.list("100", vec![]);
    api.next(Kind::Nodes)
        .await
        .list("100", vec![node("node-1", "20", "172.18.0.2")]);
    api.next(Kind::ClusterPolicies)
        .await
        .list("100", vec![cluster_policy("no-nodes", "21", 10)]);
    until(&mut source, "synced", |s| s.is_synced()).await;

    let (cluster, errors) = source.cluster();
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(
        cluster.nodes["node-1"].addresses,
        ["172.18.0.2".parse::<std::net::IpAddr>().unwrap()]
    );
    let policy = &cluster.cluster_policies["no-nodes"];
    assert_eq!(
        (policy.tier, policy.priority),
        (netwarden_model::Tier::Admin, 10)
    );
    assert_eq!(policy.egress[0].name.as_deref(), Some("no-nodes"));

    let watch = api.next(Kind::ClusterPolicies).await.watch_from("100");
    let listed = source.digest();
    watch.send("MODIFIED", cluster_policy("no-nodes", "101", 20));
    until(&mut source, "the priority changes", |s| {
        s.cluster().0.cluster_policies["no-nodes"].priority == 20
    })
    .await;
    assert_ne!(source.digest(), listed);

    // An invalid policy that never validated denies its subject everything, and is reported.
    let mut bad = cluster_policy("typo", "102", 10);
    bad["spec"]["egress"][0]["to"][0] = json!({"networks": ["10.0.0.0/33"]});
    watch.send("ADDED", bad);
    until(&mut source, "the invalid policy is seen", |s| {
        s.cluster().0.cluster_policies.contains_key("typo")
    })
    .await;
    let (cluster, errors) = source.cluster();
    assert_eq!(
        cluster.cluster_policies["typo"],
        netwarden_model::ClusterNetworkPolicy::lockdown(
            "typo".into(),
            Some(netwarden_model::ClusterSubject::Namespaces(
                netwarden_model::LabelSelector {
                    requirements: vec![netwarden_model::Requirement::In(
                        "team".into(),
                        vec!["blue".into()]
                    )]
                }
            ))
        )
    );
    let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        messages,
        [
            "ClusterNetworkPolicy typo: spec.egress[0].to[0].networks[0]: \"10.0.0.0/33\" is not a CIDR"
        ]
    );

    watch.send("DELETED", cluster_policy("no-nodes", "103", 20));
    until(&mut source, "the policy is deleted", |s| {
        !s.cluster().0.cluster_policies.contains_key("no-nodes")
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_cluster_without_the_crd_has_no_cluster_policies_and_picks_them_up_once_installed() {
    let (mut source, mut api) = start();
    // Paused time: the watcher's backoff before it lists again passes at once.
    api.step = Duration::from_mins(10);
    api.next(Kind::Namespaces).await.list("100", vec![]);
    api.next(Kind::Pods).await.list("100", vec![]);
    api.next(Kind::Policies).await.list("100", vec![]);
    api.next(Kind::Services).await.list("100", vec![]);
    api.next(Kind::EndpointSlices).await.list("100", vec![]);
    api.next(Kind::Nodes).await.list("100", vec![]);
    api.next(Kind::ClusterPolicies).await.not_found();
    until(&mut source, "synced without the CRD", |s| s.is_synced()).await;
    assert_eq!(source.absent_kinds(), ["ClusterNetworkPolicy"]);
    assert!(
        source
            .watch_health()
            .iter()
            .all(|kind| kind.healthy && kind.failing_for.is_none()),
        "a missing CRD is no failing watch: {:?}",
        source.watch_health()
    );
    let (cluster, errors) = source.cluster();
    assert!(cluster.cluster_policies.is_empty());
    assert!(errors.is_empty(), "{errors:?}");

    // The CRD is installed; the watcher's next list finds a policy.
    api.next(Kind::ClusterPolicies)
        .await
        .list("200", vec![cluster_policy("no-nodes", "150", 10)]);
    until(&mut source, "the policy is listed", |s| {
        s.cluster().0.cluster_policies.contains_key("no-nodes")
    })
    .await;
    assert!(source.absent_kinds().is_empty());
}
