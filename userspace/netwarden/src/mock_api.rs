//! A mocked Kubernetes API server for the tests of the CLI's cluster modes (`explain
//! --kubeconfig`, `observe --kubeconfig`): the client's HTTP service is a `tower-test` mock
//! that answers lists with the objects of a YAML stream and keeps watches open and silent.

use std::{convert::Infallible, time::Duration};

use bytes::Bytes;
use futures::channel::mpsc;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use serde_json::{Value, json};

type MockBody = BoxBody<Bytes, Infallible>;

/// How long the tests wait for the client's requests at most.
pub const STEP: Duration = Duration::from_secs(10);

/// A client whose API server holds the objects of `yaml` (multi-document); also returns the
/// request paths (with their queries) the client sent, as they come.
pub fn client_of(yaml: &str) -> (kube::Client, mpsc::UnboundedReceiver<String>) {
    let objects: Vec<Value> = serde_yaml::Deserializer::from_str(yaml)
        .map(|document| {
            let value: serde_yaml::Value = serde::Deserialize::deserialize(document).unwrap();
            serde_json::to_value(value).unwrap()
        })
        .collect();
    let (service, mut handle) =
        tower_test::mock::pair::<Request<kube::client::Body>, Response<MockBody>>();
    let (seen, paths) = mpsc::unbounded();
    tokio::spawn(async move {
        // Watches stay open (and silent) for as long as the server runs.
        let mut open_watches = Vec::new();
        while let Some((request, respond)) = handle.next_request().await {
            let path = request.uri().path().to_owned();
            let query = request.uri().query().unwrap_or_default().to_owned();
            let _ = seen.unbounded_send(format!("{path}?{query}"));
            if query.contains("watch=true") {
                let (sender, body) = mpsc::unbounded::<Result<Frame<Bytes>, Infallible>>();
                open_watches.push(sender);
                respond.send_response(Response::new(BodyExt::boxed(StreamBody::new(body))));
                continue;
            }
            let selector = query
                .split('&')
                .find_map(|pair| pair.strip_prefix("labelSelector="))
                .map(|selector| selector.replace("%3D", "=").replace("%2F", "/"));
            let list = list_of(&objects, &path, selector.as_deref());
            respond.send_response(Response::new(BodyExt::boxed(Full::new(Bytes::from(
                serde_json::to_vec(&list).unwrap(),
            )))));
        }
    });
    (kube::Client::new(service, "default"), paths)
}

/// The List a real API server would answer `path` with (cluster-wide or one namespace's,
/// optionally of the pods with one `key=value` label).
fn list_of(objects: &[Value], path: &str, selector: Option<&str>) -> Value {
    let (api_version, kind, namespace) = match path.split('/').collect::<Vec<_>>().as_slice() {
        ["", "api", "v1", "namespaces"] => ("v1", "Namespace", None),
        ["", "api", "v1", "pods"] => ("v1", "Pod", None),
        ["", "api", "v1", "namespaces", namespace, "pods"] => ("v1", "Pod", Some(*namespace)),
        ["", "api", "v1", "services"] => ("v1", "Service", None),
        ["", "api", "v1", "nodes"] => ("v1", "Node", None),
        [
            "",
            "apis",
            "policy.networking.k8s.io",
            "v1alpha2",
            "clusternetworkpolicies",
        ] => (
            "policy.networking.k8s.io/v1alpha2",
            "ClusterNetworkPolicy",
            None,
        ),
        ["", "apis", "networking.k8s.io", "v1", "networkpolicies"] => {
            ("networking.k8s.io/v1", "NetworkPolicy", None)
        }
        ["", "apis", "discovery.k8s.io", "v1", "endpointslices"] => {
            ("discovery.k8s.io/v1", "EndpointSlice", None)
        }
        _ => panic!("unexpected request {path}"),
    };
    let label = selector.and_then(|selector| selector.split_once('='));
    let items: Vec<Value> = objects
        .iter()
        .filter(|object| object["kind"] == kind)
        .filter(|object| {
            namespace.is_none_or(|namespace| object["metadata"]["namespace"] == namespace)
        })
        .filter(|object| {
            label.is_none_or(|(key, value)| object["metadata"]["labels"][key] == value)
        })
        .cloned()
        .collect();
    json!({
        "apiVersion": api_version,
        "kind": format!("{kind}List"),
        "metadata": {"resourceVersion": "1"},
        "items": items,
    })
}
