//! The Kubernetes API source: Namespaces, Pods, NetworkPolicies, Services, EndpointSlices, Nodes
//! and ClusterNetworkPolicies watched cluster-wide, turned into the same validated [`Cluster`]
//! the manifest-directory source yields.
//!
//! Seven kube-rs watchers (one per kind) feed seven caches: a [`PodCache`] of pods converted
//! to the model as they arrive (pods are most of a cluster), reflector stores of trimmed
//! objects for the other kinds. Each watcher
//!
//! - lists in pages of 500 (a consistent list, which API servers from 1.31 serve from their watch
//!   cache), then watches from the list's `resourceVersion` with bookmarks, resuming from the
//!   last event or bookmark when the watch ends;
//! - relists when the API server answers `410 Gone` (the watcher resets itself; the cache keeps
//!   its content and is swapped atomically once the new list is complete);
//! - backs off on errors ([`WatchStreamExt::default_backoff`]: 0.8 s doubling to 30 s, jittered)
//!   and resumes; meanwhile the caches keep the last state, so the agent keeps enforcing it;
//! - is [stale](KubeSource::watch_health) once it has failed for longer than a bound
//!   ([`DEFAULT_STALE_AFTER`]) without a success in between — a list or watch request the API
//!   server accepted, or an event — which the agent reports in readiness, metrics and status;
//! - trims what it caches ([`trim_namespace`], [`trim_network_policy`], [`trim_service`],
//!   [`trim_endpoint_slice`], [`trim_node`], [`trim_cluster_network_policy`]): managed fields,
//!   owner references, annotations (but the `netwarden.dev/*` ones) and everything of a Service
//!   or an EndpointSlice the compiler does not read; pods are converted as they arrive
//!   (`PodCache`); objects without a name, which a cache cannot key, are dropped
//!   ([`cache_events`]).
//!
//! ClusterNetworkPolicy is a CRD (`policy.networking.k8s.io/v1alpha2`, installed from the
//! network-policy-api release: see `docs/cluster-network-policy.md`), read with netwarden's own
//! types ([`ClusterNetworkPolicyObject`]). A cluster without the CRD answers its list with
//! `404 Not Found`: the kind then counts as listed and empty (there can be no such policy),
//! is reported by [`KubeSource::absent_kinds`], not as a failing watch, and is listed again
//! after the watcher's backoff, so installing the CRD later is picked up.
//!
//! [`KubeSource::cluster`] validates the caches with [`netwarden_model::convert`], with the
//! manifest source's rules for bad input: an invalid NetworkPolicy keeps its last valid version,
//! or isolates its namespace both ways if it never had one (fail closed); an invalid
//! ClusterNetworkPolicy keeps its last valid version, or denies its subject everything before
//! every other Admin policy if it never had one; an invalid Node, Service or
//! EndpointSlice is left out (a Service only names addresses that lead to pods, so one
//! missing opens nothing). [`events`] posts a
//! Kubernetes Event on each NetworkPolicy the agent cannot enforce as written.

pub mod events;

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    sync::{
        Arc, Mutex, PoisonError, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use futures::{Stream, StreamExt as _};
use k8s_openapi::{
    api::{
        core::v1::{
            LoadBalancerIngress, LoadBalancerStatus, Namespace, Node, NodeAddress, NodeStatus,
            ObjectReference, Pod, Service, ServiceSpec, ServiceStatus,
        },
        discovery::v1::{Endpoint, EndpointSlice},
        networking::v1::NetworkPolicy,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client, Resource, ResourceExt as _,
    runtime::{
        WatchStreamExt as _,
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use netwarden_model::{
    Cluster, ClusterNetworkPolicy, ModelError, PodInterner, PolicyRef,
    cluster::NetworkPolicy as ModelPolicy,
    cluster_policy::{self, api},
    convert,
};
use sha2::{Digest as _, Sha256};

use crate::events::{PolicyEvents, Unenforceable};
use tokio::{sync::watch, task::JoinHandle, time::Instant};

/// What the Kubernetes source reports.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// No client configuration was found (in-cluster, `KUBECONFIG` or `~/.kube/config`).
    #[error("no Kubernetes client configuration: {0}")]
    Config(#[source] kube::Error),
    /// The kubeconfig file given could not be read or used.
    #[error("kubeconfig {}: {source}", path.display())]
    Kubeconfig {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: kube::config::KubeconfigError,
    },
    /// The last attempt to list or watch a kind failed; the watcher backs off and retries, and
    /// the cache keeps the last state it had.
    #[error("watching {kind}s: {message}")]
    Watch {
        /// `Namespace`, `Pod`, `NetworkPolicy`, `Service`, `EndpointSlice`, `Node` or
        /// `ClusterNetworkPolicy`.
        kind: &'static str,
        /// The watcher's error.
        message: String,
    },
    /// An object failed validation; see [`KubeSource::cluster`] for what is enforced instead.
    #[error(transparent)]
    Invalid(#[from] ModelError),
}

/// A client with the default configuration: in-cluster (the DaemonSet's ServiceAccount), else
/// `KUBECONFIG`, else `~/.kube/config`.
pub async fn default_client() -> Result<Client, KubeError> {
    Client::try_default().await.map_err(KubeError::Config)
}

/// A client from the kubeconfig file at `path` (its current context), or the default
/// configuration when there is none.
pub async fn client(kubeconfig: Option<&std::path::Path>) -> Result<Client, KubeError> {
    let Some(path) = kubeconfig else {
        return default_client().await;
    };
    let kubeconfig_error = |source| KubeError::Kubeconfig {
        path: path.to_owned(),
        source,
    };
    let file = kube::config::Kubeconfig::read_from(path).map_err(kubeconfig_error)?;
    let config =
        kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
            .await
            .map_err(kubeconfig_error)?;
    Client::try_from(config).map_err(KubeError::Config)
}

/// The kinds watched, in the order of [`KubeSource`]'s arrays.
const KINDS: [&str; 7] = [
    "Namespace",
    "Pod",
    "NetworkPolicy",
    "Service",
    "EndpointSlice",
    "Node",
    cluster_policy::KIND,
];
/// Their API resources, in the same order.
const RESOURCES: [&str; KINDS.len()] = [
    "namespaces",
    "pods",
    "networkpolicies",
    "services",
    "endpointslices",
    "nodes",
    cluster_policy::PLURAL,
];
/// Index of ClusterNetworkPolicy in [`KINDS`].
const CLUSTER_POLICY: usize = 6;
/// The kinds a cluster may not serve (a CRD that is not installed): a `404` on their list
/// means "none", not a failure.
const OPTIONAL: [bool; KINDS.len()] = [false, false, false, false, false, false, true];

/// A ClusterNetworkPolicy as the watcher caches it: netwarden's own serde types
/// ([`api::ClusterNetworkPolicy`]), which keep unknown fields for the conversion to fail
/// closed on, made a Kubernetes resource.
#[derive(Clone, Debug, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(transparent)]
pub struct ClusterNetworkPolicyObject(pub api::ClusterNetworkPolicy);

impl Resource for ClusterNetworkPolicyObject {
    type DynamicType = ();
    type Scope = k8s_openapi::ClusterResourceScope;

    fn kind((): &()) -> Cow<'_, str> {
        cluster_policy::KIND.into()
    }

    fn group((): &()) -> Cow<'_, str> {
        cluster_policy::GROUP.into()
    }

    fn version((): &()) -> Cow<'_, str> {
        cluster_policy::VERSION.into()
    }

    fn plural((): &()) -> Cow<'_, str> {
        cluster_policy::PLURAL.into()
    }

    fn meta(&self) -> &ObjectMeta {
        &self.0.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.0.metadata
    }
}

/// The pods the source follows, each converted to the model as it arrives: a pod is kept as
/// the ~2 KB the compiler reads, not as the `k8s-openapi` object (6.6 KB trimmed: its structs'
/// inline size, most of it empty options), which at 150,000 pods was ~950 MiB.
#[derive(Clone, Debug, Default)]
pub struct PodCache {
    entries: Arc<RwLock<PodEntries>>,
}

#[derive(Debug, Default)]
struct PodEntries {
    /// By namespace and name.
    current: HashMap<(String, String), CachedPod>,
    /// A relist being read: swapped in whole at its end, as a reflector store does, so a
    /// relist never shows half of the cluster.
    relist: HashMap<(String, String), CachedPod>,
    /// What the pods have in common, one copy of each (a workload's replicas share their
    /// labels, ports and service account, a node's pods its name).
    shared: PodInterner,
}

impl PodEntries {
    /// `object` converted, sharing what it has in common (labels, ports, mTLS settings, service
    /// account, node) with the pods already cached.
    fn convert(&mut self, object: &Pod) -> ((String, String), CachedPod) {
        let (key, mut cached) = CachedPod::of(object);
        if let Ok(pod) = cached.pod.as_mut() {
            self.shared.share(pod);
        }
        (key, cached)
    }

    /// A pod was deleted or replaced: the copies only it held may go.
    fn released(&mut self) {
        self.shared.released();
    }
}

/// A pod as converted, and the `resourceVersion` it was converted from (for the digest).
#[derive(Debug)]
struct CachedPod {
    resource_version: String,
    pod: Result<netwarden_model::Pod, ModelError>,
}

impl CachedPod {
    fn of(object: &Pod) -> ((String, String), Self) {
        let key = (object.namespace().unwrap_or_default(), object.name_any());
        let cached = Self {
            resource_version: object.resource_version().unwrap_or_default(),
            pod: convert::pod(object),
        };
        (key, cached)
    }
}

impl PodCache {
    /// Applies one event of the pod watcher.
    pub fn apply(&self, event: &watcher::Event<Pod>) {
        let mut entries = self.entries.write().unwrap_or_else(PoisonError::into_inner);
        match event {
            watcher::Event::Apply(object) => {
                let (key, cached) = entries.convert(object);
                if entries.current.insert(key, cached).is_some() {
                    entries.released();
                }
            }
            watcher::Event::Delete(object) => {
                let key = (object.namespace().unwrap_or_default(), object.name_any());
                if entries.current.remove(&key).is_some() {
                    entries.released();
                }
            }
            watcher::Event::Init => entries.relist = HashMap::new(),
            watcher::Event::InitApply(object) => {
                let (key, cached) = entries.convert(object);
                entries.relist.insert(key, cached);
            }
            watcher::Event::InitDone => {
                entries.current = std::mem::take(&mut entries.relist);
                entries.shared.forget_unused();
            }
        }
    }

    /// Pods held, valid or not.
    #[must_use]
    pub fn len(&self) -> usize {
        self.read().current.len()
    }

    /// Whether it holds none.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, PodEntries> {
        self.entries.read().unwrap_or_else(PoisonError::into_inner)
    }
}

/// How long a kind's watcher may keep failing, with no success in between, before the source
/// reports it stale: longer than a few of the watcher's backoffs (at most 30 s each), so one
/// API server restart does not count.
pub const DEFAULT_STALE_AFTER: Duration = Duration::from_mins(1);

/// How one kind's watcher is doing, as of [`KubeSource::watch_health`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchHealth {
    /// `Namespace`, `Pod` or `NetworkPolicy`.
    pub kind: &'static str,
    /// Its API resource: `namespaces`, `pods` or `networkpolicies`.
    pub resource: &'static str,
    /// When a list or watch request of this kind was last accepted by the API server, or an
    /// event of it arrived (wall clock); `None` before the first.
    pub last_success: Option<SystemTime>,
    /// How long it has been failing with no success since, if it is.
    pub failing_for: Option<Duration>,
    /// False once `failing_for` reached the source's bound: the cache may be missing changes.
    pub healthy: bool,
}

/// What the source knows of one kind's watcher.
#[derive(Clone, Copy, Debug, Default)]
struct KindHealth {
    last_success: Option<SystemTime>,
    /// The first failure since the last success.
    failing_since: Option<Instant>,
}

/// State shared between the watcher tasks and the source.
#[derive(Debug)]
struct Shared {
    /// Bumped on every change of a cache, every watch error and every completed list.
    generation: watch::Sender<u64>,
    /// One flag per kind of [`KINDS`]: its first list is complete.
    synced: [AtomicBool; KINDS.len()],
    /// The last error per kind, cleared by the next event that kind delivers.
    errors: Mutex<BTreeMap<&'static str, String>>,
    /// Errors the watchers recovered from (failed lists and watches, `410 Gone`).
    restarts: AtomicU64,
    /// One per kind of [`KINDS`].
    health: Mutex<[KindHealth; KINDS.len()]>,
    /// One flag per kind of [`KINDS`]: its last list was answered `404 Not Found` (an
    /// optional kind whose CRD is not installed).
    absent: [AtomicBool; KINDS.len()],
}

impl Shared {
    fn bump(&self) {
        self.generation.send_modify(|generation| *generation += 1);
    }

    /// The kind at `index` got an answer or an event. Recovering from a failure is a change
    /// of its own (the source's health changed), so waiters are woken for it.
    fn succeeded(&self, index: usize) {
        let recovered = {
            let mut health = self.health.lock().expect("health lock");
            health[index].last_success = Some(SystemTime::now());
            health[index].failing_since.take().is_some()
        };
        if recovered {
            self.bump();
        }
    }

    /// The kind at `index` failed to list or watch.
    fn failed(&self, index: usize) {
        let mut health = self.health.lock().expect("health lock");
        health[index].failing_since.get_or_insert_with(Instant::now);
    }
}

/// Namespaces, Pods, NetworkPolicies, Services, EndpointSlices, Nodes and
/// ClusterNetworkPolicies of the whole cluster, followed as they change.
///
/// Dropping it stops the watchers.
#[derive(Debug)]
pub struct KubeSource {
    namespaces: Store<Namespace>,
    pods: PodCache,
    policies: Store<NetworkPolicy>,
    services: Store<Service>,
    endpoint_slices: Store<EndpointSlice>,
    nodes: Store<Node>,
    cluster_policies: Store<ClusterNetworkPolicyObject>,
    shared: Arc<Shared>,
    changes: watch::Receiver<u64>,
    validator: Validator,
    tasks: Vec<JoinHandle<()>>,
    stale_after: Duration,
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl KubeSource {
    /// A source using the default client configuration: in-cluster (the DaemonSet's
    /// ServiceAccount), else `KUBECONFIG`, else `~/.kube/config`.
    pub async fn try_default() -> Result<Self, KubeError> {
        Ok(Self::start(default_client().await?))
    }

    /// Spawns the watchers on the current Tokio runtime. Nothing is awaited: a cluster
    /// that cannot be reached shows as a source that is not [synced](Self::is_synced) and
    /// reports [`KubeError::Watch`] from [`cluster`](Self::cluster).
    #[must_use]
    pub fn start(client: Client) -> Self {
        let (generation, changes) = watch::channel(0);
        let shared = Arc::new(Shared {
            generation,
            synced: Default::default(),
            errors: Mutex::default(),
            restarts: AtomicU64::new(0),
            health: Mutex::default(),
            absent: Default::default(),
        });
        let client = observed(
            client,
            &shared,
            [
                Namespace::url_path(&(), None),
                Pod::url_path(&(), None),
                NetworkPolicy::url_path(&(), None),
                Service::url_path(&(), None),
                EndpointSlice::url_path(&(), None),
                Node::url_path(&(), None),
                ClusterNetworkPolicyObject::url_path(&(), None),
            ],
        );
        let (namespaces, namespace_task) =
            spawn_watcher(Api::all(client.clone()), 0, trim_namespace, &shared);
        let pods = PodCache::default();
        let pod_task = {
            let pods = pods.clone();
            spawn_follower(
                watch_events(Api::<Pod>::all(client.clone()))
                    .filter(|event| std::future::ready(has_a_key(event))),
                1,
                move |event| pods.apply(event),
                &shared,
            )
        };
        let (policies, policy_task) =
            spawn_watcher(Api::all(client.clone()), 2, trim_network_policy, &shared);
        let (services, service_task) =
            spawn_watcher(Api::all(client.clone()), 3, trim_service, &shared);
        let (endpoint_slices, endpoint_slice_task) =
            spawn_watcher(Api::all(client.clone()), 4, trim_endpoint_slice, &shared);
        let (nodes, node_task) = spawn_watcher(Api::all(client.clone()), 5, trim_node, &shared);
        let (cluster_policies, cluster_policy_task) = spawn_watcher(
            Api::all(client),
            CLUSTER_POLICY,
            trim_cluster_network_policy,
            &shared,
        );
        Self {
            namespaces,
            pods,
            policies,
            services,
            endpoint_slices,
            nodes,
            cluster_policies,
            shared,
            changes,
            validator: Validator::default(),
            tasks: vec![
                namespace_task,
                pod_task,
                policy_task,
                service_task,
                endpoint_slice_task,
                node_task,
                cluster_policy_task,
            ],
            stale_after: DEFAULT_STALE_AFTER,
        }
    }

    /// The same source, reporting a watcher stale after `stale_after` of failures.
    #[must_use]
    pub fn with_stale_after(mut self, stale_after: Duration) -> Self {
        self.stale_after = stale_after;
        self
    }

    /// How each kind's watcher is doing now, in the order of [`KINDS`]: Namespace, Pod,
    /// NetworkPolicy, Service, EndpointSlice, Node, ClusterNetworkPolicy.
    #[must_use]
    pub fn watch_health(&self) -> Vec<WatchHealth> {
        let now = Instant::now();
        let health = *self.shared.health.lock().expect("health lock");
        KINDS
            .iter()
            .zip(RESOURCES)
            .zip(health)
            .map(|((kind, resource), health)| {
                let failing_for = health
                    .failing_since
                    .map(|since| now.saturating_duration_since(since));
                WatchHealth {
                    kind,
                    resource,
                    last_success: health.last_success,
                    failing_for,
                    healthy: failing_for.is_none_or(|failing| failing < self.stale_after),
                }
            })
            .collect()
    }

    /// The kinds the cluster does not serve (a CRD that is not installed: no
    /// ClusterNetworkPolicy can exist), as of their last list.
    #[must_use]
    pub fn absent_kinds(&self) -> Vec<&'static str> {
        KINDS
            .iter()
            .zip(&self.shared.absent)
            .filter(|(_, absent)| absent.load(Ordering::Acquire))
            .map(|(kind, _)| *kind)
            .collect()
    }

    /// When the next failing, not yet stale, watcher turns stale, if any.
    fn next_stale_deadline(&self) -> Option<Instant> {
        let now = Instant::now();
        self.shared
            .health
            .lock()
            .expect("health lock")
            .iter()
            .filter_map(|health| health.failing_since)
            .map(|since| since + self.stale_after)
            .filter(|deadline| *deadline > now)
            .min()
    }

    /// Posts an Event for each problem whose policy the cache holds, attached to that object
    /// (a policy deleted since is not reported). Returns how many were queued (the rest were
    /// within the rate limit's window, or gone).
    pub fn report(&self, events: &mut PolicyEvents, problems: &[Unenforceable]) -> usize {
        problems
            .iter()
            .filter(|problem| {
                self.policy_reference(&problem.policy)
                    .is_some_and(|regarding| events.post(regarding, problem))
            })
            .count()
    }

    /// A reference to a cached NetworkPolicy, or ClusterNetworkPolicy for an empty namespace
    /// (with its uid, so an Event attaches to this incarnation of the object), or `None` if the
    /// cache does not hold it.
    #[must_use]
    pub fn policy_reference(&self, policy: &PolicyRef) -> Option<ObjectReference> {
        if policy.namespace.is_empty() {
            let key = ObjectRef::new(&policy.name);
            return self
                .cluster_policies
                .get(&key)
                .map(|object| object.object_ref(&()));
        }
        let key = ObjectRef::new(&policy.name).within(&policy.namespace);
        self.policies.get(&key).map(|object| object.object_ref(&()))
    }

    /// Waits for the next change of any cache, watch error, or change of a watcher's
    /// [health](Self::watch_health) since the last call; returns at once if one happened since.
    /// Changes in between are coalesced. Cancel-safe.
    pub async fn changed(&mut self) {
        let stale_at = self.next_stale_deadline();
        let turns_stale = async {
            match stale_at {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            // The sender lives in `self.shared`, so this never fails while `self` exists.
            _ = self.changes.changed() => {}
            () = turns_stale => {}
        }
    }

    /// Waits until [`is_synced`](Self::is_synced).
    pub async fn synced(&mut self) {
        while !self.is_synced() {
            self.changed().await;
        }
    }

    /// Whether the first list of every kind is complete: before that, the caches hold nothing
    /// or part of the cluster, and nothing may be enforced from them.
    #[must_use]
    pub fn is_synced(&self) -> bool {
        self.shared
            .synced
            .iter()
            .all(|synced| synced.load(Ordering::Acquire))
    }

    /// How many times the watchers recovered from an error (a failed list or watch, `410 Gone`).
    #[must_use]
    pub fn restarts(&self) -> u64 {
        self.shared.restarts.load(Ordering::Relaxed)
    }

    /// The cluster the caches hold, and every problem found: objects that failed validation
    /// (see [`Validator::cluster`] for what is enforced instead) and the watchers' last errors.
    pub fn cluster(&mut self) -> (Cluster, Vec<KubeError>) {
        let objects = CachedObjects {
            namespaces: self.namespaces.state(),
            // Pods are converted as they arrive (`PodCache`): added below.
            pods: Vec::new(),
            policies: self.policies.state(),
            services: self.services.state(),
            endpoint_slices: self.endpoint_slices.state(),
            nodes: self.nodes.state(),
            cluster_policies: self.cluster_policies.state(),
        };
        let (mut cluster, mut errors) = self.validator.cluster(&objects);
        for cached in self.pods.read().current.values() {
            match &cached.pod {
                Ok(pod) => {
                    cluster.pods.insert(pod.id.clone(), pod.clone());
                }
                Err(error) => errors.push(error.clone().into()),
            }
        }
        let watch_errors = self.shared.errors.lock().expect("errors lock");
        errors.extend(watch_errors.iter().map(|(kind, message)| KubeError::Watch {
            kind,
            message: message.clone(),
        }));
        (cluster, errors)
    }

    /// Identifies the content of the caches: SHA-256 of every object's kind, namespace, name and
    /// `resourceVersion`, sorted. Equal caches give equal digests, any change a new one. The
    /// agent reports it as the id of the state it applied.
    #[must_use]
    pub fn digest(&self) -> String {
        let mut entries: Vec<(&str, String, String, String)> = Vec::new();
        push_entries(&mut entries, KINDS[0], &self.namespaces);
        entries.extend(
            self.pods
                .read()
                .current
                .iter()
                .map(|((namespace, name), cached)| {
                    (
                        KINDS[1],
                        namespace.clone(),
                        name.clone(),
                        cached.resource_version.clone(),
                    )
                }),
        );
        push_entries(&mut entries, KINDS[2], &self.policies);
        push_entries(&mut entries, KINDS[3], &self.services);
        push_entries(&mut entries, KINDS[4], &self.endpoint_slices);
        push_entries(&mut entries, KINDS[5], &self.nodes);
        push_entries(&mut entries, KINDS[6], &self.cluster_policies);
        entries.sort_unstable();
        let mut hasher = Sha256::new();
        for (kind, namespace, name, version) in &entries {
            for part in [*kind, namespace, name, version] {
                hasher.update(part.as_bytes());
                hasher.update([0]);
            }
        }
        let mut hex = String::with_capacity(64);
        for byte in hasher.finalize() {
            let _ = write!(hex, "{byte:02x}");
        }
        hex
    }
}

/// The objects of the seven caches, as [`Validator::cluster`] reads them.
#[derive(Clone, Debug, Default)]
pub struct CachedObjects {
    /// Namespaces.
    pub namespaces: Vec<Arc<Namespace>>,
    /// Pods.
    pub pods: Vec<Arc<Pod>>,
    /// NetworkPolicies.
    pub policies: Vec<Arc<NetworkPolicy>>,
    /// Services.
    pub services: Vec<Arc<Service>>,
    /// EndpointSlices.
    pub endpoint_slices: Vec<Arc<EndpointSlice>>,
    /// Nodes.
    pub nodes: Vec<Arc<Node>>,
    /// ClusterNetworkPolicies.
    pub cluster_policies: Vec<Arc<ClusterNetworkPolicyObject>>,
}

/// Validates cached objects into the model with the source's rules for bad input, remembering
/// each policy's last valid version from one call to the next (what [`KubeSource::cluster`]
/// does with its caches).
#[derive(Clone, Debug, Default)]
pub struct Validator {
    last_good_policies: HashMap<PolicyRef, Arc<ModelPolicy>>,
    last_good_cluster_policies: HashMap<String, ClusterNetworkPolicy>,
}

impl Validator {
    /// The cluster `objects` describe, and the objects that failed validation.
    ///
    /// Invalid Namespaces, Pods, Services, EndpointSlices and Nodes are left out (a pod without
    /// a valid object has no identity, which fails closed; a Service without one is no
    /// frontend). An invalid NetworkPolicy is replaced by its last valid version, or, if it
    /// never had one, by a policy isolating its whole namespace in both directions; an invalid
    /// ClusterNetworkPolicy by its last valid version, or, if it never had one, by one denying
    /// its subject everything before every other Admin policy.
    pub fn cluster(&mut self, objects: &CachedObjects) -> (Cluster, Vec<KubeError>) {
        let mut cluster = Cluster::default();
        let mut errors = Vec::new();
        for object in &objects.namespaces {
            match convert::namespace(object) {
                Ok(namespace) => {
                    cluster.namespaces.insert(namespace.name.clone(), namespace);
                }
                Err(error) => errors.push(error.into()),
            }
        }
        for object in &objects.pods {
            match convert::pod(object) {
                Ok(pod) => {
                    cluster.pods.insert(pod.id.clone(), pod);
                }
                Err(error) => errors.push(error.into()),
            }
        }
        for object in &objects.policies {
            let id = PolicyRef {
                namespace: object.namespace().unwrap_or_else(|| "default".to_owned()),
                name: object.name_any(),
            };
            match convert::network_policy(object) {
                Ok(policy) => {
                    let policy = Arc::new(policy);
                    self.last_good_policies
                        .insert(id.clone(), Arc::clone(&policy));
                    cluster.policies.insert(id, policy);
                }
                Err(error) => {
                    let fallback = self
                        .last_good_policies
                        .get(&id)
                        .cloned()
                        .unwrap_or_else(|| Arc::new(ModelPolicy::lockdown(id.clone())));
                    cluster.policies.insert(id, fallback);
                    errors.push(error.into());
                }
            }
        }
        self.last_good_policies
            .retain(|id, _| cluster.policies.contains_key(id));
        for object in &objects.services {
            match convert::service(object) {
                Ok(service) => {
                    cluster.services.insert(service.id.clone(), service);
                }
                Err(error) => errors.push(error.into()),
            }
        }
        for object in &objects.endpoint_slices {
            match convert::endpoint_slice(object) {
                Ok(slice) => {
                    cluster.endpoint_slices.insert(slice.id.clone(), slice);
                }
                Err(error) => errors.push(error.into()),
            }
        }
        for object in &objects.nodes {
            match convert::node(object) {
                Ok(node) => {
                    cluster.nodes.insert(node.name.clone(), node);
                }
                Err(error) => errors.push(error.into()),
            }
        }
        for object in &objects.cluster_policies {
            let name = object.name_any();
            match cluster_policy::convert(&object.0) {
                Ok(policy) => {
                    self.last_good_cluster_policies
                        .insert(name.clone(), policy.clone());
                    cluster.cluster_policies.insert(name, policy);
                }
                Err(error) => {
                    let fallback = self
                        .last_good_cluster_policies
                        .get(&name)
                        .cloned()
                        .unwrap_or_else(|| {
                            ClusterNetworkPolicy::lockdown(
                                name.clone(),
                                cluster_policy::subject_of(&object.0),
                            )
                        });
                    cluster.cluster_policies.insert(name, fallback);
                    errors.push(error.into());
                }
            }
        }
        self.last_good_cluster_policies
            .retain(|name, _| cluster.cluster_policies.contains_key(name));
        (cluster, errors)
    }
}

fn push_entries<K: Resource<DynamicType = ()> + Clone>(
    entries: &mut Vec<(&'static str, String, String, String)>,
    kind: &'static str,
    store: &Store<K>,
) {
    entries.extend(store.state().iter().map(|object| {
        (
            kind,
            object.namespace().unwrap_or_default(),
            object.name_any(),
            object.resource_version().unwrap_or_default(),
        )
    }));
}

/// `client`, telling `shared` of every request to one of `paths` (the kinds' collections, in
/// the order of [`KINDS`]) that the API server accepts. A watcher that resumes a watch, or
/// watches again after its watch ended, emits no event until something changes; without this
/// a recovered watcher on a quiet cluster would look like it was still failing.
fn observed(client: Client, shared: &Arc<Shared>, paths: [String; KINDS.len()]) -> Client {
    let namespace = client.default_namespace().to_owned();
    let shared = Arc::clone(shared);
    let paths = Arc::new(paths);
    let service = tower::service_fn(move |request: http::Request<kube::client::Body>| {
        let client = client.clone();
        let shared = Arc::clone(&shared);
        let kind = paths.iter().position(|path| path == request.uri().path());
        async move {
            let response = client.send(request).await?;
            if let Some(index) = kind
                && response.status().is_success()
            {
                shared.succeeded(index);
            }
            Ok::<_, kube::Error>(response)
        }
    });
    Client::new(service, namespace)
}

/// What the source does with each event of a kind's watcher before the agent sees it: trims
/// its object (`trim`), drops it if the cache cannot key it, and applies the rest to the cache
/// behind `writer`. The stream goes on with the events that were applied, and the errors.
///
/// An object without `metadata.name` cannot be keyed (the reflector panics on it, which would
/// kill the kind's watcher and leave its cache silently stale). The API server never sends
/// one; if something else does, the object is dropped with a warning: it would not validate
/// anyway, its name being required.
pub fn cache_events<K, S>(
    events: S,
    trim: fn(&mut K),
    writer: reflector::store::Writer<K>,
) -> impl Stream<Item = Result<watcher::Event<K>, watcher::Error>>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
{
    events
        .modify(trim)
        .filter(|event| std::future::ready(has_a_key(event)))
        .reflect(writer)
}

/// Whether the cache can key the event's object (it has a name), or the event has none.
fn has_a_key<K: Resource<DynamicType = ()>>(
    event: &Result<watcher::Event<K>, watcher::Error>,
) -> bool {
    let object = match event {
        Ok(
            watcher::Event::Apply(object)
            | watcher::Event::Delete(object)
            | watcher::Event::InitApply(object),
        ) => object,
        Ok(watcher::Event::Init | watcher::Event::InitDone) | Err(_) => return true,
    };
    if object.meta().name.is_some() {
        return true;
    }
    tracing::warn!(
        kind = %K::kind(&()),
        namespace = object.meta().namespace.as_deref().unwrap_or_default(),
        "ignored an object without metadata.name"
    );
    false
}

/// Watches `api` into a reflector store, each object trimmed by `trim` first.
fn spawn_watcher<K>(
    api: Api<K>,
    index: usize,
    trim: fn(&mut K),
    shared: &Arc<Shared>,
) -> (Store<K>, JoinHandle<()>)
where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (store, mut writer) = reflector::store();
    let events = watch_events(api)
        .modify(trim)
        .filter(|event| std::future::ready(has_a_key(event)));
    let task = spawn_follower(
        events,
        index,
        move |event| writer.apply_watcher_event(event),
        shared,
    );
    (store, task)
}

/// The list-then-watch events of `api`, resumed with backoff after errors.
fn watch_events<K>(api: Api<K>) -> impl Stream<Item = Result<watcher::Event<K>, watcher::Error>>
where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + 'static,
{
    // Not `any_semantic()`: kube drops `resourceVersion=0` from paged lists anyway, and a
    // consistent list cannot go back in time after a relist.
    watcher(api, watcher::Config::default()).default_backoff()
}

/// Follows `events` of kind `index` into a cache (`keep` is given every event, the cache swaps
/// in a relist at `InitDone`), and keeps the source's health and change count.
fn spawn_follower<K, S>(
    events: S,
    index: usize,
    mut keep: impl FnMut(&watcher::Event<K>) + Send + 'static,
    shared: &Arc<Shared>,
) -> JoinHandle<()>
where
    K: Send + 'static,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
{
    let kind = KINDS[index];
    let shared = Arc::clone(shared);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(events);
        while let Some(event) = stream.next().await {
            if let Ok(event) = &event {
                keep(event);
            }
            match event {
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {
                    shared.succeeded(index);
                    // The store swaps in the new list at `InitDone`: nothing changed yet.
                    continue;
                }
                Ok(watcher::Event::InitDone) => {
                    tracing::debug!(kind, "listed");
                    shared.absent[index].store(false, Ordering::Release);
                    shared.succeeded(index);
                    shared.errors.lock().expect("errors lock").remove(kind);
                    shared.synced[index].store(true, Ordering::Release);
                }
                Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_)) => {
                    shared.succeeded(index);
                    shared.errors.lock().expect("errors lock").remove(kind);
                }
                Err(watcher::Error::InitialListFailed(kube::Error::Api(status)))
                    if OPTIONAL[index] && status.code == 404 =>
                {
                    // The CRD is not installed: none of these objects can exist. The answer
                    // is a success of the API server, and the kind counts as listed; the
                    // watcher lists again after its backoff.
                    if !shared.absent[index].swap(true, Ordering::AcqRel) {
                        tracing::info!(
                            kind,
                            "not served by the API server (CRD not installed); none enforced"
                        );
                    }
                    shared.succeeded(index);
                    shared.errors.lock().expect("errors lock").remove(kind);
                    shared.synced[index].store(true, Ordering::Release);
                }
                Err(error) => {
                    tracing::warn!(kind, %error, "watch failed; backing off and resuming");
                    shared.failed(index);
                    shared.restarts.fetch_add(1, Ordering::Relaxed);
                    shared
                        .errors
                        .lock()
                        .expect("errors lock")
                        .insert(kind, error.to_string());
                }
            }
            shared.bump();
        }
    })
}

/// Keeps of an object's metadata what the conversion, the digest and the reflector read: name,
/// namespace, uid, `resourceVersion`, labels, deletion timestamp and the `netwarden.dev/*`
/// annotations (a pod's mTLS ones, a NetworkPolicy's enforcement mode). Managed fields, other
/// annotations (kubectl's copy of the whole object among them), owner references, finalizers
/// and timestamps are dropped: with 150,000 pods, owner references alone are tens of MiB.
fn trim_metadata(metadata: &mut ObjectMeta) {
    let ours: BTreeMap<String, String> = metadata
        .annotations
        .take()
        .unwrap_or_default()
        .into_iter()
        .filter(|(key, _)| key.starts_with(NETWARDEN_ANNOTATION_PREFIX))
        .collect();
    *metadata = ObjectMeta {
        name: metadata.name.take(),
        namespace: metadata.namespace.take(),
        uid: metadata.uid.take(),
        resource_version: metadata.resource_version.take(),
        labels: metadata.labels.take(),
        deletion_timestamp: metadata.deletion_timestamp.take(),
        annotations: (!ours.is_empty()).then_some(ours),
        ..ObjectMeta::default()
    };
}

/// Keeps of a Namespace its name, labels and `resourceVersion` ([`trim_metadata`]).
pub fn trim_namespace(namespace: &mut Namespace) {
    trim_metadata(&mut namespace.metadata);
    namespace.spec = None;
    namespace.status = None;
}

/// The prefix of the annotations netwarden reads (a pod's mTLS exempt ports and allowed
/// principals, a NetworkPolicy's enforcement mode).
const NETWARDEN_ANNOTATION_PREFIX: &str = "netwarden.dev/";

/// Keeps of a NetworkPolicy its metadata ([`trim_metadata`]: its `netwarden.dev/enforcement`
/// annotation, not kubectl's last-applied-configuration copy of the spec) and its spec.
pub fn trim_network_policy(policy: &mut NetworkPolicy) {
    trim_metadata(&mut policy.metadata);
}

/// Keeps of a Node what [`convert::node`] reads: its metadata ([`trim_metadata`]; its labels
/// are what `nodes` peers select), and of its status the addresses.
/// Nodes' status changes often (conditions, images): trimmed, the cache stays small.
pub fn trim_node(node: &mut Node) {
    trim_metadata(&mut node.metadata);
    node.spec = None;
    node.status = node.status.take().map(|status| NodeStatus {
        addresses: status.addresses.map(|addresses| {
            addresses
                .into_iter()
                .map(|address| NodeAddress {
                    address: address.address,
                    type_: address.type_,
                })
                .collect()
        }),
        ..NodeStatus::default()
    });
}

/// Keeps of a ClusterNetworkPolicy its metadata ([`trim_metadata`]), and
/// its spec (and fields the API does not have, which the conversion must see to fail closed);
/// the status implementations write is dropped.
pub fn trim_cluster_network_policy(policy: &mut ClusterNetworkPolicyObject) {
    trim_metadata(&mut policy.0.metadata);
    policy.0.status = None;
}

/// Keeps of a Service what [`convert::service`] reads: metadata ([`trim_metadata`]), its type, addresses, ports and selector, and of the status the load-balancer
/// ingress addresses.
pub fn trim_service(service: &mut Service) {
    trim_metadata(&mut service.metadata);
    service.spec = service.spec.take().map(|spec| ServiceSpec {
        type_: spec.type_,
        cluster_ip: spec.cluster_ip,
        cluster_ips: spec.cluster_ips,
        external_ips: spec.external_ips,
        ports: spec.ports,
        selector: spec.selector,
        ..ServiceSpec::default()
    });
    service.status = service.status.take().map(|status| ServiceStatus {
        load_balancer: status
            .load_balancer
            .map(|load_balancer| LoadBalancerStatus {
                ingress: load_balancer.ingress.map(|ingress| {
                    ingress
                        .into_iter()
                        .map(|point| LoadBalancerIngress {
                            ip: point.ip,
                            ..LoadBalancerIngress::default()
                        })
                        .collect()
                }),
            }),
        ..ServiceStatus::default()
    });
}

/// Keeps of an EndpointSlice what [`convert::endpoint_slice`] reads: metadata
/// ([`trim_metadata`]; its labels name its Service), its address type and ports, and of
/// each endpoint its addresses, conditions, node and the pod it points to.
pub fn trim_endpoint_slice(slice: &mut EndpointSlice) {
    trim_metadata(&mut slice.metadata);
    for endpoint in &mut slice.endpoints {
        *endpoint = Endpoint {
            addresses: std::mem::take(&mut endpoint.addresses),
            conditions: endpoint.conditions.take(),
            node_name: endpoint.node_name.take(),
            target_ref: endpoint.target_ref.take().map(|target| ObjectReference {
                kind: target.kind,
                namespace: target.namespace,
                name: target.name,
                ..ObjectReference::default()
            }),
            ..Endpoint::default()
        };
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::{
        core::v1::Pod, core::v1::Service, discovery::v1::EndpointSlice,
        networking::v1::NetworkPolicy,
    };

    use super::{
        ClusterNetworkPolicyObject, trim_cluster_network_policy, trim_endpoint_slice,
        trim_network_policy, trim_node, trim_service,
    };

    #[test]
    fn trimmed_nodes_and_cluster_policies_keep_exactly_what_the_conversion_reads() {
        let mut node: k8s_openapi::api::core::v1::Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n1", "resourceVersion": "3", "labels": {"zone": "a"},
                         "annotations": {"node.alpha.kubernetes.io/ttl": "0"},
                         "managedFields": [{"manager": "kubelet", "operation": "Update"}]},
            "spec": {"podCIDR": "10.244.0.0/24", "providerID": "kind://n1"},
            "status": {"addresses": [{"type": "InternalIP", "address": "172.18.0.2"},
                                     {"type": "Hostname", "address": "n1"}],
                       "conditions": [{"type": "Ready", "status": "True"}],
                       "nodeInfo": {"kubeletVersion": "v1.35.0", "architecture": "amd64",
                                    "bootID": "", "containerRuntimeVersion": "", "kernelVersion": "",
                                    "kubeProxyVersion": "", "machineID": "", "operatingSystem": "linux",
                                    "osImage": "", "systemUUID": ""}}
        }))
        .unwrap();
        let before = netwarden_model::convert::node(&node).unwrap();
        trim_node(&mut node);
        assert_eq!(
            serde_json::to_value(&node).unwrap(),
            serde_json::json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": "n1", "resourceVersion": "3", "labels": {"zone": "a"}},
                "status": {"addresses": [{"type": "InternalIP", "address": "172.18.0.2"},
                                         {"type": "Hostname", "address": "n1"}]}
            })
        );
        assert_eq!(netwarden_model::convert::node(&node).unwrap(), before);

        let mut policy: ClusterNetworkPolicyObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
            "metadata": {"name": "p", "resourceVersion": "4",
                         "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"}},
            "spec": {"tier": "Admin", "priority": 1, "subject": {"namespaces": {}},
                     "ingress": [{"action": "Deny", "from": [{"futurePeer": {}}]}]},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .unwrap();
        let before = netwarden_model::cluster_policy::convert(&policy.0).unwrap();
        assert_eq!(
            before.problems.len(),
            1,
            "the unknown peer reached the conversion"
        );
        trim_cluster_network_policy(&mut policy);
        assert_eq!(
            serde_json::to_value(&policy).unwrap(),
            serde_json::json!({
                "apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
                "metadata": {"name": "p", "resourceVersion": "4"},
                "spec": {"tier": "Admin", "priority": 1, "subject": {"namespaces": {}},
                         "ingress": [{"action": "Deny", "from": [{"futurePeer": {}}]}]}
            })
        );
        assert_eq!(
            netwarden_model::cluster_policy::convert(&policy.0).unwrap(),
            before
        );
    }

    #[test]
    fn trimmed_services_keep_exactly_what_the_compiler_reads() {
        let mut service: Service = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "web", "namespace": "x", "resourceVersion": "7",
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"},
                "managedFields": [{"manager": "kubectl", "operation": "Apply"}]
            },
            "spec": {
                "type": "LoadBalancer", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                "externalIPs": ["192.0.2.7"], "selector": {"app": "web"},
                "sessionAffinity": "None", "ipFamilies": ["IPv4"],
                "externalTrafficPolicy": "Cluster", "internalTrafficPolicy": "Cluster",
                "ports": [{"name": "http", "port": 80, "targetPort": "http", "nodePort": 30080,
                           "protocol": "TCP"}]
            },
            "status": {
                "loadBalancer": {"ingress": [{"ip": "198.51.100.1", "ipMode": "VIP",
                                              "ports": [{"port": 80, "protocol": "TCP"}]}]},
                "conditions": [{"type": "Ready", "status": "True", "reason": "r", "message": "",
                                "lastTransitionTime": "2026-01-01T00:00:00Z"}]
            }
        }))
        .unwrap();
        let before = netwarden_model::convert::service(&service).unwrap();
        trim_service(&mut service);
        assert_eq!(
            serde_json::to_value(&service).unwrap(),
            serde_json::json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "web", "namespace": "x", "resourceVersion": "7"},
                "spec": {
                    "type": "LoadBalancer", "clusterIP": "10.96.0.10",
                    "clusterIPs": ["10.96.0.10"], "externalIPs": ["192.0.2.7"],
                    "selector": {"app": "web"},
                    "ports": [{"name": "http", "port": 80, "targetPort": "http",
                               "nodePort": 30080, "protocol": "TCP"}]
                },
                "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}]}}
            })
        );
        assert_eq!(netwarden_model::convert::service(&service).unwrap(), before);
    }

    #[test]
    fn trimmed_endpoint_slices_keep_exactly_what_the_compiler_reads() {
        let mut slice: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "web-abc", "namespace": "x", "resourceVersion": "8",
                "labels": {"kubernetes.io/service-name": "web",
                           "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
                "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2026-01-01T00:00:00Z"},
                "managedFields": [{"manager": "kube-controller-manager", "operation": "Update"}]
            },
            "addressType": "IPv4",
            "endpoints": [{
                "addresses": ["10.0.0.1"], "hostname": "web-1", "zone": "a", "nodeName": "node-1",
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "hints": {"forZones": [{"name": "a"}]},
                "targetRef": {"kind": "Pod", "name": "web-1", "namespace": "x", "uid": "u",
                              "resourceVersion": "3"}
            }],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP", "appProtocol": "http"}]
        }))
        .unwrap();
        let before = netwarden_model::convert::endpoint_slice(&slice).unwrap();
        trim_endpoint_slice(&mut slice);
        assert_eq!(
            serde_json::to_value(&slice).unwrap(),
            serde_json::json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {
                    "name": "web-abc", "namespace": "x", "resourceVersion": "8",
                    "labels": {"kubernetes.io/service-name": "web",
                               "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}
                },
                "addressType": "IPv4",
                "endpoints": [{
                    "addresses": ["10.0.0.1"], "nodeName": "node-1",
                    "conditions": {"ready": true, "serving": true, "terminating": false},
                    "targetRef": {"kind": "Pod", "name": "web-1", "namespace": "x"}
                }],
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP", "appProtocol": "http"}]
            })
        );
        assert_eq!(
            netwarden_model::convert::endpoint_slice(&slice).unwrap(),
            before
        );
    }

    #[test]
    fn trimmed_network_policies_keep_their_enforcement_mode() {
        let mut policy: NetworkPolicy = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "p", "namespace": "x", "resourceVersion": "5",
                "annotations": {
                    "kubectl.kubernetes.io/last-applied-configuration": "{}",
                    "netwarden.dev/enforcement": "audit"
                },
                "managedFields": [{"manager": "kubectl", "operation": "Apply"}]
            },
            "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}
        }))
        .unwrap();
        trim_network_policy(&mut policy);
        assert_eq!(
            serde_json::to_value(&policy.metadata).unwrap(),
            serde_json::json!({"name": "p", "namespace": "x", "resourceVersion": "5",
                               "annotations": {"netwarden.dev/enforcement": "audit"}})
        );
        assert_eq!(
            netwarden_model::convert::network_policy(&policy)
                .unwrap()
                .enforcement,
            netwarden_model::Enforcement::Audit
        );
    }

    fn api_pod(name: &str, version: &str, ip: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "x", "resourceVersion": version,
                         "labels": {"app": name}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c"}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}
        }))
        .unwrap()
    }

    #[test]
    fn the_pod_cache_keeps_converted_pods_and_swaps_a_relist_in_whole() {
        use kube::runtime::watcher::Event;

        let cache = super::PodCache::default();
        cache.apply(&Event::Apply(api_pod("a", "1", "10.0.0.1")));
        cache.apply(&Event::Apply(api_pod("bad", "2", "not an address")));
        assert_eq!(cache.len(), 2);
        {
            let entries = cache.read();
            let a = &entries.current[&("x".to_owned(), "a".to_owned())];
            assert_eq!(a.resource_version, "1");
            assert_eq!(
                a.pod.as_ref().unwrap(),
                &netwarden_model::convert::pod(&api_pod("a", "1", "10.0.0.1")).unwrap()
            );
            assert!(
                entries.current[&("x".to_owned(), "bad".to_owned())]
                    .pod
                    .is_err()
            );
        }
        // A relist under way shows nothing of itself, then replaces everything at its end.
        cache.apply(&Event::Init);
        cache.apply(&Event::InitApply(api_pod("b", "3", "10.0.0.2")));
        assert_eq!(cache.len(), 2);
        cache.apply(&Event::InitDone);
        let names: Vec<String> = cache
            .read()
            .current
            .keys()
            .map(|key| key.1.clone())
            .collect();
        assert_eq!(names, ["b"]);
        cache.apply(&Event::Delete(api_pod("b", "4", "10.0.0.2")));
        assert!(cache.is_empty());
    }

    /// Found by the `watch` fuzz target: the trim dropped every annotation, so a policy in
    /// audit mode was enforced when read from the API server.
    #[test]
    fn a_trimmed_network_policy_converts_as_before_the_trim() {
        let mut policy: NetworkPolicy = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "p", "namespace": "x", "resourceVersion": "4",
                "annotations": {
                    "netwarden.dev/enforcement": "audit",
                    "kubectl.kubernetes.io/last-applied-configuration": "{}"
                },
                "managedFields": [{"manager": "kubectl", "operation": "Apply"}]
            },
            "spec": {"podSelector": {}, "ingress": [{"ports": [{"port": 80}]}]}
        }))
        .unwrap();
        let before = netwarden_model::convert::network_policy(&policy).unwrap();
        trim_network_policy(&mut policy);
        assert_eq!(
            serde_json::to_value(&policy.metadata).unwrap(),
            serde_json::json!({
                "name": "p", "namespace": "x", "resourceVersion": "4",
                "annotations": {"netwarden.dev/enforcement": "audit"}
            })
        );
        let after = netwarden_model::convert::network_policy(&policy).unwrap();
        assert_eq!(after, before);
        assert_eq!(after.enforcement, netwarden_model::Enforcement::Audit);
    }

    /// Found by the `watch` fuzz target: kube's reflector panics on an object without a name,
    /// which killed the kind's watcher task and left its cache silently stale.
    #[test]
    fn objects_without_a_name_are_dropped_before_the_cache() {
        use kube::runtime::{reflector, watcher};

        let named: k8s_openapi::api::core::v1::Namespace =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "x"}})).unwrap();
        let nameless = k8s_openapi::api::core::v1::Namespace::default();
        let events = vec![
            Ok(watcher::Event::Apply(nameless.clone())),
            Ok(watcher::Event::Apply(named)),
            Ok(watcher::Event::Init),
            Ok(watcher::Event::InitApply(nameless.clone())),
            Ok(watcher::Event::InitDone),
            Ok(watcher::Event::Delete(nameless)),
        ];
        let (store, writer) = reflector::store();
        let passed = futures::executor::block_on_stream(Box::pin(super::cache_events(
            futures::stream::iter(events),
            super::trim_namespace,
            writer,
        )))
        .count();
        assert_eq!(passed, 3, "the named object, Init and InitDone");
        assert!(
            store.is_empty(),
            "the relist replaced the named object with none"
        );
    }
}
