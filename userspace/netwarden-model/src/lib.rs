//! The cluster as netwarden sees it.
//!
//! Sources (a directory of manifests, or the Kubernetes API) hand this crate the objects exactly
//! as the API server serves them; it validates them once into [`Cluster`], the snapshot that the
//! policy compiler and the reference evaluator both read. Nothing here touches the kernel.

pub mod cluster;
pub mod cluster_policy;
pub mod convert;
mod intern;
pub mod manifests;
pub mod selector;

pub use cluster::{
    ALLOWED_PRINCIPALS_ANNOTATION, AddressType, Cluster, ClusterView, ContainerPort,
    ENFORCEMENT_ANNOTATION, EndpointPort, EndpointSlice, EndpointSliceRef, Enforcement,
    MTLS_EXEMPT_PORTS_ANNOTATION, MTLS_LABEL, MTLS_STRICT, Namespace, NetworkPolicy, Node, Peer,
    Pod, PodMtls, PodRef, PodsView, PolicyRef, PolicyTypes, PortRef, PortSpec, Protocol, Rule,
    Service, ServiceEndpoint, ServicePort, ServiceRef, ServiceType,
};
pub use cluster_policy::{
    Action, ClusterNetworkPolicy, ClusterPeer, ClusterPort, ClusterRule, ClusterSubject,
    PriorityTie, Tier,
};
pub use convert::ModelError;
pub use intern::{Interner, PodInterner};
pub use manifests::{ManifestDir, ManifestError, cluster_of_bytes, cluster_of_stream};
pub use selector::{LabelSelector, Requirement};
