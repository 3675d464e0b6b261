//! The live cluster for `netwarden diff --cluster` and `netwarden matrix --cluster`: one
//! consistent read of Namespaces, Pods, NetworkPolicies, Services, EndpointSlices, Nodes and
//! ClusterNetworkPolicies, through the agent's own Kubernetes source (the same lists, the same validation), then stopped.

use std::time::Duration;

use anyhow::Context as _;
use kube::Client;
use netwarden_kube::KubeSource;
use netwarden_model::Cluster;

/// How long the first list of every kind may take.
const LIST_TIMEOUT: Duration = Duration::from_mins(1);

/// The whole live cluster, policies included.
pub fn cluster() -> anyhow::Result<Cluster> {
    runtime()?.block_on(async {
        let client = netwarden_kube::default_client()
            .await
            .context("configuring the Kubernetes client")?;
        snapshot(client, LIST_TIMEOUT).await
    })
}

/// The live cluster without its NetworkPolicies: what both sides of a `diff` share.
pub fn workloads() -> anyhow::Result<Cluster> {
    let mut cluster = cluster()?;
    cluster.policies.clear();
    Ok(cluster)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the Tokio runtime")
}

/// Lists every kind through `client` and returns the cluster once all seven are listed; fails
/// after `timeout` naming the watchers' last errors (the watchers keep retrying until then).
pub async fn snapshot(client: Client, timeout: Duration) -> anyhow::Result<Cluster> {
    let mut source = KubeSource::start(client);
    if tokio::time::timeout(timeout, source.synced())
        .await
        .is_err()
    {
        let (_, errors) = source.cluster();
        let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
        anyhow::bail!(
            "the cluster was not listed within {timeout:?}: {}",
            if errors.is_empty() {
                "no answer".to_owned()
            } else {
                errors.join("; ")
            }
        );
    }
    let (cluster, errors) = source.cluster();
    for error in &errors {
        eprintln!("warning: {error}");
    }
    Ok(cluster)
}

#[cfg(test)]
mod tests {
    //! `snapshot` against a `tower-test` mock playing the API server (as
    //! `netwarden-kube/tests/watch.rs` does at length): it answers each kind's list, keeps each
    //! watch open, and the snapshot must come back with what was listed.

    use std::{
        convert::Infallible,
        sync::{Arc, Mutex},
        time::Duration,
    };

    use bytes::Bytes;
    use futures::channel::mpsc;
    use http::{Request, Response};
    use http_body::Frame;
    use http_body_util::{BodyExt as _, StreamBody, combinators::BoxBody};
    use kube::{Client, client::Body};
    use serde_json::{Value, json};

    use super::snapshot;

    type MockBody = BoxBody<Bytes, Infallible>;
    type Frames = mpsc::UnboundedSender<Result<Frame<Bytes>, Infallible>>;

    fn body() -> (MockBody, Frames) {
        let (tx, rx) = mpsc::unbounded();
        (StreamBody::new(rx).boxed(), tx)
    }

    /// The list kind and items the fake API server serves at a collection path.
    fn listed(path: &str) -> Option<(&'static str, &'static str, Vec<Value>)> {
        Some(match path {
            "/api/v1/namespaces" => (
                "v1",
                "NamespaceList",
                vec![json!({"metadata": {"name": "x", "labels": {"team": "a"}}})],
            ),
            "/api/v1/pods" => (
                "v1",
                "PodList",
                vec![json!({
                    "metadata": {"name": "web", "namespace": "x", "labels": {"app": "web"}},
                    "spec": {"nodeName": "n1", "containers": [{"name": "c"}]},
                    "status": {"podIP": "10.0.0.1"}
                })],
            ),
            "/apis/networking.k8s.io/v1/networkpolicies" => (
                "networking.k8s.io/v1",
                "NetworkPolicyList",
                vec![json!({
                    "metadata": {"name": "deny", "namespace": "x"},
                    "spec": {"podSelector": {}}
                })],
            ),
            "/api/v1/services" => ("v1", "ServiceList", vec![]),
            "/apis/discovery.k8s.io/v1/endpointslices" => {
                ("discovery.k8s.io/v1", "EndpointSliceList", vec![])
            }
            "/api/v1/nodes" => (
                "v1",
                "NodeList",
                vec![json!({
                    "metadata": {"name": "n1"},
                    "status": {"addresses": [{"type": "InternalIP", "address": "172.18.0.2"}]}
                })],
            ),
            "/apis/policy.networking.k8s.io/v1alpha2/clusternetworkpolicies" => (
                "policy.networking.k8s.io/v1alpha2",
                "ClusterNetworkPolicyList",
                vec![],
            ),
            _ => return None,
        })
    }

    /// Serves lists and open watches, noting each request in `requests`.
    async fn api_server(
        mut handle: tower_test::mock::Handle<Request<Body>, Response<MockBody>>,
        requests: Arc<Mutex<Vec<String>>>,
    ) {
        let mut open_watches = Vec::new();
        while let Some((request, respond)) = handle.next_request().await {
            requests.lock().unwrap().push(request.uri().to_string());
            let watch = request
                .uri()
                .query()
                .unwrap_or_default()
                .contains("watch=true");
            let (stream, tx) = body();
            if watch {
                open_watches.push(tx);
            } else {
                let (api_version, kind, items) = listed(request.uri().path())
                    .unwrap_or_else(|| panic!("unexpected request {}", request.uri()));
                let list = json!({
                    "apiVersion": api_version, "kind": kind,
                    "metadata": {"resourceVersion": "100"}, "items": items
                });
                tx.unbounded_send(Ok(Frame::data(Bytes::from(list.to_string()))))
                    .unwrap();
            }
            respond.send_response(
                Response::builder()
                    .status(200)
                    .header("content-type", "application/json")
                    .body(stream)
                    .unwrap(),
            );
        }
    }

    #[tokio::test]
    async fn the_live_cluster_is_read_once_every_kind_is_listed() {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<MockBody>>();
        let requests = Arc::default();
        let server = tokio::spawn(api_server(handle, Arc::clone(&requests)));
        let cluster = snapshot(Client::new(service, "default"), Duration::from_secs(20))
            .await
            .unwrap();
        assert_eq!(
            cluster
                .pods
                .keys()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["x/web"]
        );
        assert_eq!(cluster.namespaces["x"].labels["team"], "a");
        assert_eq!(
            cluster
                .policies
                .keys()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["x/deny"]
        );
        assert_eq!(cluster.nodes.keys().collect::<Vec<_>>(), ["n1"]);
        // Only reads: every request was a list or a watch of one of the seven collections.
        server.abort();
        let requests = requests.lock().unwrap().clone();
        assert!(requests.len() >= 7, "{requests:?}");
        assert!(
            requests
                .iter()
                .all(|uri| listed(uri.split('?').next().unwrap()).is_some()),
            "{requests:?}"
        );
    }

    #[tokio::test]
    async fn an_api_server_that_does_not_answer_fails_after_the_timeout() {
        let (service, _handle) = tower_test::mock::pair::<Request<Body>, Response<MockBody>>();
        let error = snapshot(Client::new(service, "default"), Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("the cluster was not listed within 300ms"),
            "{error}"
        );
    }
}
