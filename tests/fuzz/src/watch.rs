//! The kube source target: the body of a watch response, as the API server streams it
//! (newline-delimited `{"type": ..., "object": ...}` events), decoded by kube's own watch
//! client, trimmed, cached and validated as [`netwarden_kube::KubeSource`] does it.
//!
//! The first byte picks the kind watched (Namespace, Pod, NetworkPolicy, Service,
//! EndpointSlice, Node, ClusterNetworkPolicy); the rest is the body. Whatever it holds, nothing
//! may panic; trimming an object must not change what it converts to (the caches keep only what
//! the conversion reads); a NetworkPolicy or ClusterNetworkPolicy in the cache is never left
//! out of the cluster, however invalid (it fails closed); and every validation error names its
//! object and field.

use std::{convert::Infallible, fmt::Debug, sync::Arc, sync::OnceLock};

use bytes::Bytes;
use http_body_util::Full;
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
    networking::v1::NetworkPolicy,
};
use kube::{
    Api, Client, Resource, ResourceExt as _,
    api::WatchParams,
    core::WatchEvent,
    runtime::{reflector::store::Writer, watcher},
};
use netwarden_kube::{
    CachedObjects, ClusterNetworkPolicyObject, KubeError, Validator, cache_events,
    trim_cluster_network_policy, trim_endpoint_slice, trim_namespace, trim_network_policy,
    trim_node, trim_service,
};
use netwarden_model::{Cluster, ModelError, PolicyRef, cluster_policy, convert};
use serde::de::DeserializeOwned;

/// A kind the kube source watches, with what the source does with its objects.
trait Watched:
    Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static
{
    /// What the conversion makes of it.
    type Model: PartialEq + Debug;
    /// What the watcher keeps of it.
    fn trim(&mut self);
    /// [`Watched::trim`] as the function the source's pipeline takes.
    fn trim_in_place(object: &mut Self) {
        object.trim();
    }
    /// The conversion [`Validator::cluster`] applies.
    fn convert(&self) -> Result<Self::Model, ModelError>;
    /// `objects` as the cache of their kind, the others empty.
    fn cached(objects: Vec<Arc<Self>>) -> CachedObjects;
    /// Panics unless `cluster` keeps what it promises of the `cached` objects.
    fn assert_kept(_cached: &[Arc<Self>], _cluster: &Cluster) {}
}

impl Watched for Namespace {
    type Model = netwarden_model::Namespace;
    fn trim(&mut self) {
        trim_namespace(self);
    }
    fn convert(&self) -> Result<Self::Model, ModelError> {
        convert::namespace(self)
    }
    fn cached(namespaces: Vec<Arc<Self>>) -> CachedObjects {
        CachedObjects {
            namespaces,
            ..CachedObjects::default()
        }
    }
}

impl Watched for Pod {
    type Model = netwarden_model::Pod;
    /// Not trimmed: the source converts a pod as it arrives (`PodCache`) and keeps the model.
    fn trim(&mut self) {}
    fn convert(&self) -> Result<Self::Model, ModelError> {
        convert::pod(self)
    }
    fn cached(pods: Vec<Arc<Self>>) -> CachedObjects {
        CachedObjects {
            pods,
            ..CachedObjects::default()
        }
    }
}

impl Watched for NetworkPolicy {
    type Model = netwarden_model::NetworkPolicy;
    fn trim(&mut self) {
        trim_network_policy(self);
    }
    fn convert(&self) -> Result<Self::Model, ModelError> {
        convert::network_policy(self)
    }
    fn cached(policies: Vec<Arc<Self>>) -> CachedObjects {
        CachedObjects {
            policies,
            ..CachedObjects::default()
        }
    }
    fn assert_kept(cached: &[Arc<Self>], cluster: &Cluster) {
        for object in cached {
            let id = PolicyRef {
                namespace: object.namespace().unwrap_or_else(|| "default".to_owned()),
                name: object.name_any(),
            };
            assert!(
                cluster.policies.contains_key(&id),
                "cached NetworkPolicy {id} is not enforced in any form"
            );
        }
    }
}

impl Watched for Service {
    type Model = netwarden_model::Service;
    fn trim(&mut self) {
        trim_service(self);
    }
    fn convert(&self) -> Result<Self::Model, ModelError> {
        convert::service(self)
    }
    fn cached(services: Vec<Arc<Self>>) -> CachedObjects {
        CachedObjects {
            services,
            ..CachedObjects::default()
        }
    }
}

impl Watched for EndpointSlice {
    type Model = netwarden_model::EndpointSlice;
    fn trim(&mut self) {
        trim_endpoint_slice(self);
    }
    fn convert(&self) -> Result<Self::Model, ModelError> {
        convert::endpoint_slice(self)
    }
    fn cached(endpoint_slices: Vec<Arc<Self>>) -> CachedObjects {
        CachedObjects {
            endpoint_slices,
            ..CachedObjects::default()
        }
    }
}

impl Watched for Node {
    type Model = netwarden_model::Node;
    fn trim(&mut self) {
        trim_node(self);
    }
    fn convert(&self) -> Result<Self::Model, ModelError> {
        convert::node(self)
    }
    fn cached(nodes: Vec<Arc<Self>>) -> CachedObjects {
        CachedObjects {
            nodes,
            ..CachedObjects::default()
        }
    }
}

impl Watched for ClusterNetworkPolicyObject {
    type Model = netwarden_model::ClusterNetworkPolicy;
    fn trim(&mut self) {
        trim_cluster_network_policy(self);
    }
    fn convert(&self) -> Result<Self::Model, ModelError> {
        cluster_policy::convert(&self.0)
    }
    fn cached(cluster_policies: Vec<Arc<Self>>) -> CachedObjects {
        CachedObjects {
            cluster_policies,
            ..CachedObjects::default()
        }
    }
    fn assert_kept(cached: &[Arc<Self>], cluster: &Cluster) {
        for object in cached {
            let name = object.name_any();
            assert!(
                cluster.cluster_policies.contains_key(&name),
                "cached ClusterNetworkPolicy {name} is not enforced in any form"
            );
        }
    }
}

/// Checks one input: see the module's documentation.
pub fn check(data: &[u8]) {
    let Some((&choice, body)) = data.split_first() else {
        return;
    };
    match choice % 7 {
        0 => follow::<Namespace>(body),
        1 => follow::<Pod>(body),
        2 => follow::<NetworkPolicy>(body),
        3 => follow::<Service>(body),
        4 => follow::<EndpointSlice>(body),
        5 => follow::<Node>(body),
        _ => follow::<ClusterNetworkPolicyObject>(body),
    }
}

/// The runtime kube's client runs on, built once.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime")
    })
}

/// The events kube's watch client decodes from `body`, as it streams them to the watcher:
/// each decoded event, or the error it reports for a line.
fn decode<K: Watched>(body: &[u8]) -> Vec<Result<WatchEvent<K>, kube::Error>> {
    let body = Bytes::copy_from_slice(body);
    runtime().block_on(async move {
        // The API server: every request is answered with the body, as a watch response is.
        let server = tower::service_fn(move |_: http::Request<kube::client::Body>| {
            let body = body.clone();
            async move { Ok::<_, Infallible>(http::Response::new(Full::new(body))) }
        });
        let api: Api<K> = Api::all(Client::new(server, "default"));
        let stream = match api.watch(&WatchParams::default(), "0").await {
            Ok(stream) => stream,
            Err(error) => return vec![Err(error)],
        };
        futures::StreamExt::collect(stream).await
    })
}

fn follow<K: Watched>(body: &[u8]) {
    let mut untrimmed = Vec::new();
    let mut events = Vec::new();
    for event in decode::<K>(body) {
        let event = match event {
            Ok(WatchEvent::Added(object) | WatchEvent::Modified(object)) => {
                untrimmed.push(object.clone());
                Ok(watcher::Event::Apply(object))
            }
            Ok(WatchEvent::Deleted(object)) => {
                untrimmed.push(object.clone());
                Ok(watcher::Event::Delete(object))
            }
            // Bookmarks only move the watcher's resource version.
            Ok(WatchEvent::Bookmark(_)) => continue,
            Ok(WatchEvent::Error(status)) => Err(watcher::Error::WatchError(status)),
            Err(error) => Err(watcher::Error::WatchFailed(error)),
        };
        events.push(event);
    }

    for object in untrimmed {
        let mut trimmed = object.clone();
        trimmed.trim();
        assert_eq!(
            trimmed.convert(),
            object.convert(),
            "trimming changed what {} {:?} converts to",
            K::kind(&()),
            object.meta().name
        );
    }

    // Through the source's own pipeline: trimmed, filtered and cached as the watcher's events
    // are, then validated after each one, as the agent does after each change.
    let writer: Writer<K> = Writer::default();
    let store = writer.as_reader();
    let cached = cache_events(futures::stream::iter(events), K::trim_in_place, writer);
    let mut validator = Validator::default();
    for _ in futures::executor::block_on_stream(Box::pin(cached)) {
        let cached = store.state();
        let (cluster, errors) = validator.cluster(&K::cached(cached.clone()));
        K::assert_kept(&cached, &cluster);
        for error in errors {
            if let KubeError::Invalid(error) = error {
                assert!(
                    !error.object.is_empty() && !error.field.is_empty(),
                    "a validation error names no object or no field: {error}"
                );
            }
        }
    }
}
