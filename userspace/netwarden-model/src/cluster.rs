//! The validated cluster snapshot.

use std::{
    borrow::{Borrow, Cow},
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
    sync::Arc,
};

use ipnet::IpNet;

use crate::{
    cluster_policy::ClusterNetworkPolicy,
    convert::ModelError,
    selector::{LabelSelector, Labels},
};

/// Namespace and name of a pod.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodRef {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub name: String,
}

/// Namespace and name of a NetworkPolicy.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyRef {
    /// The policy's namespace.
    pub namespace: String,
    /// The policy's name.
    pub name: String,
}

impl fmt::Display for PodRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl fmt::Display for PolicyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A namespace and its labels (always including `kubernetes.io/metadata.name`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    /// The namespace's name.
    pub name: String,
    /// Its labels, shared by the source, each apply's snapshot and the compiler.
    pub labels: Arc<Labels>,
}

/// L4 protocols a NetworkPolicy port can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// TCP (6).
    Tcp,
    /// UDP (17).
    Udp,
    /// SCTP (132).
    Sctp,
}

impl Protocol {
    /// The IP protocol number.
    #[must_use]
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => 6,
            Self::Udp => 17,
            Self::Sctp => 132,
        }
    }

    /// Parses the API's spelling (`TCP`, `UDP`, `SCTP`).
    #[must_use]
    pub fn from_api(name: &str) -> Option<Self> {
        match name {
            "TCP" => Some(Self::Tcp),
            "UDP" => Some(Self::Udp),
            "SCTP" => Some(Self::Sctp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        })
    }
}

/// A container port of a pod.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContainerPort {
    /// Its name, the target of named ports in policies.
    pub name: Option<String>,
    /// The port number.
    pub port: u16,
    /// Its protocol.
    pub protocol: Protocol,
}

/// A pod as the policy engine needs it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Pod {
    /// Namespace and name.
    pub id: PodRef,
    /// Its labels, one copy shared by the pods that carry the same ones (a workload's
    /// replicas; see [`Interner`](crate::Interner)).
    pub labels: Arc<Labels>,
    /// The node it runs on, once scheduled (shared with the node's other pods).
    pub node_name: Option<Arc<str>>,
    /// Every IP of the pod (`status.podIPs`, or `status.podIP`). Empty until it has one.
    pub ips: Vec<IpAddr>,
    /// Container ports of all its containers, shared like the labels.
    pub ports: Arc<[ContainerPort]>,
    /// Host-network pods share the node's addresses: policy neither selects them nor can tell
    /// them apart from the node.
    pub host_network: bool,
    /// `spec.serviceAccountName`, `default` when unset (shared like the labels).
    pub service_account: Arc<str>,
    /// What the pod's `netwarden.dev/*` label and annotations ask of mutual TLS (shared: nearly
    /// every pod asks nothing).
    pub mtls: Arc<PodMtls>,
}

/// The label that makes a pod, or every pod of a namespace, mTLS-strict.
pub const MTLS_LABEL: &str = "netwarden.dev/mtls";
/// The value of [`MTLS_LABEL`] that makes it strict.
pub const MTLS_STRICT: &str = "strict";
/// Pod annotation: comma-separated ports of a strict pod that accept plaintext.
pub const MTLS_EXEMPT_PORTS_ANNOTATION: &str = "netwarden.dev/mtls-exempt-ports";
/// Pod annotation: comma-separated SPIFFE IDs the identity check accepts as clients of the pod
/// (`*` may stand for the whole last path segment).
pub const ALLOWED_PRINCIPALS_ANNOTATION: &str = "netwarden.dev/allowed-principals";

/// A pod's mutual-TLS settings, as its label and annotations state them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct PodMtls {
    /// The pod itself carries `netwarden.dev/mtls: strict`. Its namespace may make it strict
    /// too: ask [`Cluster::is_mtls_strict`].
    pub strict_label: bool,
    /// Valid ports of `netwarden.dev/mtls-exempt-ports`: plaintext is accepted on them.
    pub exempt_ports: BTreeSet<u16>,
    /// Valid entries of `netwarden.dev/allowed-principals`, or `None` when the annotation is
    /// absent (then any principal that passes the other checks is accepted).
    pub allowed_principals: Option<Vec<String>>,
    /// What was wrong in those annotations. Invalid entries are left out, which fails closed:
    /// a port that does not parse is not exempt, a principal that does not parse accepts no one.
    pub problems: Vec<ModelError>,
}

/// Which directions a policy isolates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PolicyTypes {
    /// The policy isolates selected pods for ingress.
    pub ingress: bool,
    /// The policy isolates selected pods for egress.
    pub egress: bool,
}

/// A validated NetworkPolicy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkPolicy {
    /// Namespace and name.
    pub id: PolicyRef,
    /// `spec.podSelector`, within the policy's namespace.
    pub pod_selector: LabelSelector,
    /// `spec.policyTypes`, with the API server's defaulting applied.
    pub policy_types: PolicyTypes,
    /// `spec.ingress` (empty when absent).
    pub ingress: Vec<Rule>,
    /// `spec.egress` (empty when absent).
    pub egress: Vec<Rule>,
    /// Its `netwarden.dev/enforcement` annotation.
    pub enforcement: Enforcement,
}

/// The annotation that puts a policy in audit mode (`audit`) or keeps it enforced (`enforce`,
/// the default).
pub const ENFORCEMENT_ANNOTATION: &str = "netwarden.dev/enforcement";

/// Whether a policy's drops happen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Enforcement {
    /// What it does not allow is dropped.
    #[default]
    Enforce,
    /// Evaluated like an enforced policy, but what it would drop passes and is reported as
    /// audited: a default deny can be rolled out after watching what it would break.
    Audit,
}

impl Enforcement {
    /// The annotation's value.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Enforce => "enforce",
            Self::Audit => "audit",
        }
    }
}

impl NetworkPolicy {
    /// What a NetworkPolicy that never validated enforces, whatever the source: its namespace
    /// isolated in both directions, nothing allowed (fail closed until it is fixed).
    #[must_use]
    pub fn lockdown(id: PolicyRef) -> Self {
        Self {
            id,
            pod_selector: LabelSelector::everything(),
            policy_types: PolicyTypes {
                ingress: true,
                egress: true,
            },
            ingress: Vec::new(),
            egress: Vec::new(),
            // A policy that does not validate is enforced, whatever it asked for.
            enforcement: Enforcement::Enforce,
        }
    }

    /// Whether the policy selects a pod of `namespace` labelled `labels`: a policy selects
    /// only pods of its own namespace.
    #[must_use]
    pub fn selects_pod(&self, namespace: &str, labels: &Labels) -> bool {
        self.id.namespace == namespace && self.pod_selector.matches(labels)
    }
}

/// One ingress or egress rule.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Rule {
    /// `from`/`to`; empty means every peer.
    pub peers: Vec<Peer>,
    /// `ports`; empty means every port of every protocol.
    pub ports: Vec<PortSpec>,
}

/// One peer of a rule.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Peer {
    /// `podSelector` and/or `namespaceSelector`.
    Pods {
        /// Pods matching it; `None` means every pod of the selected namespaces.
        pod_selector: Option<LabelSelector>,
        /// Namespaces matching it; `None` means the policy's own namespace.
        namespace_selector: Option<LabelSelector>,
    },
    /// `ipBlock`.
    IpBlock {
        /// The block, canonical (host bits cleared).
        cidr: IpNet,
        /// Sub-blocks excluded from it, canonical.
        except: Vec<IpNet>,
    },
}

// Which pods a selector peer selects, said once: the compiler (over label-set identities) and
// the reference evaluator (over pods) both ask here.
impl Peer {
    /// Whether this peer, in a policy of `policy_namespace`, selects pods of `namespace`.
    /// `namespace_labels` is called only when a `namespaceSelector` needs the labels. An
    /// `ipBlock` selects no namespace: it matches addresses, pods' included, not pods.
    pub fn selects_namespace<L: Borrow<Labels>>(
        &self,
        policy_namespace: &str,
        namespace: &str,
        namespace_labels: impl FnOnce() -> L,
    ) -> bool {
        match self {
            Self::Pods {
                namespace_selector: None,
                ..
            } => namespace == policy_namespace,
            Self::Pods {
                namespace_selector: Some(selector),
                ..
            } => selector.matches(namespace_labels().borrow()),
            Self::IpBlock { .. } => false,
        }
    }

    /// Whether this peer's `podSelector` selects pods labelled `labels`, in a namespace
    /// [`Peer::selects_namespace`] selects.
    #[must_use]
    pub fn selects_pod_labels(&self, labels: &Labels) -> bool {
        match self {
            Self::Pods { pod_selector, .. } => pod_selector
                .as_ref()
                .is_none_or(|selector| selector.matches(labels)),
            Self::IpBlock { .. } => false,
        }
    }

    /// Whether this peer, in a policy of `policy_namespace`, selects a pod of `namespace`
    /// labelled `labels`.
    pub fn selects_pod<L: Borrow<Labels>>(
        &self,
        policy_namespace: &str,
        namespace: &str,
        namespace_labels: impl FnOnce() -> L,
        labels: &Labels,
    ) -> bool {
        self.selects_namespace(policy_namespace, namespace, namespace_labels)
            && self.selects_pod_labels(labels)
    }
}

/// One entry of a rule's `ports`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PortSpec {
    /// The protocol (TCP when unset).
    pub protocol: Protocol,
    /// The port; `None` means every port of the protocol.
    pub port: Option<PortRef>,
    /// The last port of a range starting at a numeric `port`.
    pub end_port: Option<u16>,
}

/// A port by number or by container port name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PortRef {
    /// A port number.
    Number(u16),
    /// A container port's name, resolved against the destination pod.
    Name(String),
}

/// Namespace and name of a Service.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceRef {
    /// The Service's namespace.
    pub namespace: String,
    /// The Service's name.
    pub name: String,
}

impl fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Namespace and name of an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointSliceRef {
    /// The slice's namespace (always its Service's).
    pub namespace: String,
    /// The slice's name.
    pub name: String,
}

impl fmt::Display for EndpointSliceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// `spec.type` of a Service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ServiceType {
    /// Reachable on its cluster IPs (and external IPs) only.
    ClusterIp,
    /// Also on every node's addresses at each port's `nodePort`.
    NodePort,
    /// A `NodePort` Service that also gets load-balancer addresses.
    LoadBalancer,
    /// A DNS alias: no address, no port, nothing to translate.
    ExternalName,
}

impl fmt::Display for ServiceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::ClusterIp => "ClusterIP",
            Self::NodePort => "NodePort",
            Self::LoadBalancer => "LoadBalancer",
            Self::ExternalName => "ExternalName",
        })
    }
}

/// One entry of a Service's `spec.ports`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServicePort {
    /// Its name; EndpointSlice ports of the same name carry the backends' port.
    pub name: Option<String>,
    /// Its protocol (TCP when unset).
    pub protocol: Protocol,
    /// The port clients connect to on the Service's addresses.
    pub port: u16,
    /// The backends' port: a number, or a container port name (`port` when unset).
    pub target_port: PortRef,
    /// The port on every node's addresses, for NodePort and LoadBalancer Services.
    pub node_port: Option<u16>,
}

/// A validated Service: the addresses and ports kube-proxy translates to its backends.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Service {
    /// Namespace and name.
    pub id: ServiceRef,
    /// `spec.type` (`ClusterIP` when unset).
    pub service_type: ServiceType,
    /// `spec.clusterIPs` (or `spec.clusterIP`); empty for headless (`None`) and ExternalName
    /// Services, which kube-proxy does not translate.
    pub cluster_ips: Vec<IpAddr>,
    /// `spec.externalIPs`.
    pub external_ips: Vec<IpAddr>,
    /// `status.loadBalancer.ingress[].ip` (ingress points given by hostname are left out).
    pub load_balancer_ips: Vec<IpAddr>,
    /// `spec.ports`.
    pub ports: Vec<ServicePort>,
    /// `spec.selector`; empty when the Service's EndpointSlices are managed by someone else.
    pub selector: Labels,
}

/// `addressType` of an EndpointSlice.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AddressType {
    /// IPv4 addresses.
    Ipv4,
    /// IPv6 addresses.
    Ipv6,
    /// Host names (deprecated): kube-proxy ignores such slices, so their endpoints carry no
    /// address here.
    Fqdn,
}

/// One endpoint of an EndpointSlice: a backend of its Service.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServiceEndpoint {
    /// Its addresses (kube-proxy uses the first).
    pub addresses: Vec<IpAddr>,
    /// `conditions.ready` (`true` when unset, as the API documents it): only ready endpoints
    /// receive new connections.
    pub ready: bool,
    /// The pod behind it (`targetRef` of kind Pod).
    pub pod: Option<PodRef>,
    /// The node it runs on.
    pub node_name: Option<String>,
}

/// One entry of an EndpointSlice's `ports`: the backends' port for the Service port of the
/// same name and protocol.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct EndpointPort {
    /// The Service port's name (`None` for a Service's single unnamed port).
    pub name: Option<String>,
    /// Its protocol (TCP when unset).
    pub protocol: Protocol,
    /// The port the endpoints listen on.
    pub port: u16,
}

/// A validated EndpointSlice (`discovery.k8s.io/v1`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct EndpointSlice {
    /// Namespace and name.
    pub id: EndpointSliceRef,
    /// The Service it holds backends of (label `kubernetes.io/service-name`).
    pub service: ServiceRef,
    /// What its addresses are.
    pub address_type: AddressType,
    /// `endpoints`.
    pub endpoints: Vec<ServiceEndpoint>,
    /// `ports`; entries without a port number are left out (kube-proxy ignores them too).
    pub ports: Vec<EndpointPort>,
}

/// A node, as the `nodes` peer of a ClusterNetworkPolicy selects it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Node {
    /// Its name.
    pub name: String,
    /// Its labels.
    pub labels: Labels,
    /// Every IP address of `status.addresses`, whatever its type (`InternalIP`,
    /// `ExternalIP`); host names are left out.
    pub addresses: Vec<IpAddr>,
}

/// Everything the compiler and the evaluator read: one consistent snapshot of the cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cluster {
    /// Namespaces by name.
    pub namespaces: BTreeMap<String, Namespace>,
    /// Pods by namespace and name.
    pub pods: BTreeMap<PodRef, Pod>,
    /// NetworkPolicies by namespace and name, each shared by the source that read it, the
    /// compiler and every snapshot taken for an apply.
    pub policies: BTreeMap<PolicyRef, Arc<NetworkPolicy>>,
    /// Services by namespace and name.
    pub services: BTreeMap<ServiceRef, Service>,
    /// EndpointSlices by namespace and name.
    pub endpoint_slices: BTreeMap<EndpointSliceRef, EndpointSlice>,
    /// ClusterNetworkPolicies by name.
    pub cluster_policies: BTreeMap<String, ClusterNetworkPolicy>,
    /// Nodes by name (the `nodes` peer of ClusterNetworkPolicies reads their addresses).
    pub nodes: BTreeMap<String, Node>,
}

impl Cluster {
    /// Whether `pod` is mTLS-strict: it, or its namespace, carries `netwarden.dev/mtls: strict`.
    #[must_use]
    pub fn is_mtls_strict(&self, pod: &Pod) -> bool {
        pod.mtls.strict_label
            || self
                .namespaces
                .get(&pod.id.namespace)
                .is_some_and(|namespace| {
                    namespace.labels.get(MTLS_LABEL).map(String::as_str) == Some(MTLS_STRICT)
                })
    }

    /// What of the ClusterNetworkPolicies is enforced otherwise than written (each names its
    /// policy and field).
    pub fn cluster_policy_problems(&self) -> impl Iterator<Item = &ModelError> {
        self.cluster_policies
            .values()
            .flat_map(|policy| policy.problems.iter())
    }

    /// Problems in the pods' `netwarden.dev/*` annotations (each names its pod and field).
    pub fn annotation_problems(&self) -> impl Iterator<Item = &ModelError> {
        self.pods.values().flat_map(|pod| pod.mtls.problems.iter())
    }

    /// The EndpointSlices that hold backends of `service`.
    pub fn endpoint_slices_of(&self, service: &ServiceRef) -> impl Iterator<Item = &EndpointSlice> {
        let service = service.clone();
        let first = EndpointSliceRef {
            namespace: service.namespace.clone(),
            name: String::new(),
        };
        let namespace = service.namespace.clone();
        // Slices are keyed by namespace first: only the Service's namespace is walked.
        self.endpoint_slices
            .range(first..)
            .map(|(_, slice)| slice)
            .take_while(move |slice| slice.id.namespace == namespace)
            .filter(move |slice| slice.service == service)
    }

    /// The labels of `namespace`; a namespace with no object has only its name label, as the
    /// API server would give it.
    #[must_use]
    pub fn namespace_labels(&self, namespace: &str) -> Cow<'_, Labels> {
        // Borrowed: selectors read namespace labels for every pod and policy they check.
        self.namespaces.get(namespace).map_or_else(
            || {
                Cow::Owned(Labels::from([(
                    crate::convert::NAMESPACE_NAME_LABEL.to_owned(),
                    namespace.to_owned(),
                )]))
            },
            |ns| Cow::Borrowed(&*ns.labels),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::{Labels, Peer};
    use crate::selector::{LabelSelector, Requirement};

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
            .collect()
    }

    fn selector(key: &str, value: &str) -> LabelSelector {
        LabelSelector {
            requirements: vec![Requirement::In(key.to_owned(), vec![value.to_owned()])],
        }
    }

    fn never_read() -> Labels {
        panic!("a peer without a namespaceSelector read the namespace's labels")
    }

    #[test]
    fn a_pod_selector_alone_selects_in_the_policy_namespace_only() {
        let peer = Peer::Pods {
            pod_selector: Some(selector("app", "web")),
            namespace_selector: None,
        };
        let web = labels(&[("app", "web")]);
        assert!(peer.selects_pod("x", "x", never_read, &web));
        assert!(!peer.selects_pod("x", "y", never_read, &web));
        assert!(!peer.selects_pod("x", "x", never_read, &labels(&[("app", "db")])));
    }

    #[test]
    fn a_namespace_selector_needs_both_selectors_to_match() {
        let peer = Peer::Pods {
            pod_selector: Some(selector("app", "web")),
            namespace_selector: Some(selector("team", "a")),
        };
        let team_a = labels(&[("team", "a")]);
        let web = labels(&[("app", "web")]);
        assert!(peer.selects_pod("x", "y", || &team_a, &web));
        assert!(!peer.selects_pod("x", "y", || labels(&[("team", "b")]), &web));
        assert!(!peer.selects_pod("x", "y", || &team_a, &labels(&[])));
        let every_pod = Peer::Pods {
            pod_selector: None,
            namespace_selector: Some(selector("team", "a")),
        };
        assert!(every_pod.selects_pod("x", "y", || &team_a, &labels(&[])));
    }

    #[test]
    fn an_ip_block_selects_no_pod() {
        let peer = Peer::IpBlock {
            cidr: "0.0.0.0/0".parse().expect("a prefix"),
            except: Vec::new(),
        };
        assert!(!peer.selects_pod("x", "x", || labels(&[]), &labels(&[])));
    }
}

/// A cluster whose pods may be borrowed from the source that keeps them. A source that holds
/// the model already (the manifest directory) lends its pods instead of copying them for every
/// apply: the compiler copies only the pods that changed, and 10,000 pods are ~18 MiB.
#[derive(Debug)]
pub struct ClusterView<'a> {
    /// Everything but the pods: its `pods` is empty.
    pub rest: Cluster,
    /// The pods.
    pub pods: PodsView<'a>,
}

/// The pods of a [`ClusterView`], owned or borrowed, by namespace and name.
#[derive(Debug)]
pub enum PodsView<'a> {
    /// Pods the view owns.
    Owned(BTreeMap<PodRef, Pod>),
    /// Pods a source keeps, sorted by namespace and name, each once: a snapshot is taken at
    /// every apply, and a tree of 150,000 took three times the room.
    Borrowed(Vec<(&'a PodRef, &'a Pod)>),
}

impl PodsView<'_> {
    /// Whether pod `id` is there.
    #[must_use]
    pub fn contains(&self, id: &PodRef) -> bool {
        match self {
            Self::Owned(pods) => pods.contains_key(id),
            Self::Borrowed(pods) => pods.binary_search_by(|(pod, _)| (*pod).cmp(id)).is_ok(),
        }
    }

    /// Every pod, in order.
    #[must_use]
    pub fn iter(&self) -> Box<dyn Iterator<Item = (&PodRef, &Pod)> + '_> {
        self.into_iter()
    }

    /// How many.
    #[must_use]
    pub fn len(&self) -> usize {
        match self {
            Self::Owned(pods) => pods.len(),
            Self::Borrowed(pods) => pods.len(),
        }
    }

    /// Whether there are none.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<'view> IntoIterator for &'view PodsView<'_> {
    type Item = (&'view PodRef, &'view Pod);
    type IntoIter = Box<dyn Iterator<Item = Self::Item> + 'view>;

    fn into_iter(self) -> Self::IntoIter {
        match self {
            PodsView::Owned(pods) => Box::new(pods.iter()),
            PodsView::Borrowed(pods) => Box::new(pods.iter().map(|(id, pod)| (*id, *pod))),
        }
    }
}

impl From<Cluster> for ClusterView<'static> {
    fn from(mut cluster: Cluster) -> Self {
        let pods = std::mem::take(&mut cluster.pods);
        Self {
            rest: cluster,
            pods: PodsView::Owned(pods),
        }
    }
}

impl ClusterView<'_> {
    /// The whole cluster, borrowed pods copied.
    #[must_use]
    pub fn into_cluster(self) -> Cluster {
        let Self { mut rest, pods } = self;
        rest.pods = match pods {
            PodsView::Owned(pods) => pods,
            PodsView::Borrowed(pods) => pods
                .into_iter()
                .map(|(id, pod)| (id.clone(), pod.clone()))
                .collect(),
        };
        rest
    }

    /// A copy of the whole cluster.
    #[must_use]
    pub fn to_cluster(&self) -> Cluster {
        let mut cluster = self.rest.clone();
        cluster.pods = self
            .pods
            .iter()
            .map(|(id, pod)| (id.clone(), pod.clone()))
            .collect();
        cluster
    }

    /// Problems in the pods' `netwarden.dev/*` annotations, as
    /// [`Cluster::annotation_problems`].
    pub fn annotation_problems(&self) -> impl Iterator<Item = &ModelError> {
        self.pods
            .iter()
            .flat_map(|(_, pod)| pod.mtls.problems.iter())
    }
}
