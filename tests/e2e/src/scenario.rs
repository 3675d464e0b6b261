//! The `netwarden-scenario/v1` format: serde types, defaults and validation.
//!
//! Validation replays the steps against the evolving model (pods added and deleted, policies
//! created and deleted) so that every mistake a scenario author can make statically is reported
//! before any namespace is created, naming the file and the step.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt, fs,
    net::IpAddr,
    path::{Path, PathBuf},
};

use indexmap::{IndexMap, IndexSet};
use serde::{Deserialize, Serialize};

use crate::{
    dns,
    explain::Explain,
    kube_proxy::KubeProxyMode,
    observe::{FlowEnds, Observe, ObserveFilter, ObservedVerdict, RawObserve},
    placeholder,
    services::{self, ServiceSpec, ServiceType},
};

/// The only format this harness understands.
pub const FORMAT: &str = "netwarden-scenario/v1";

/// A label set.
pub type Labels = BTreeMap<String, String>;

/// What is wrong with a scenario file.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Yaml {
        path: PathBuf,
        source: serde_yaml::Error,
    },
    #[error("{}: {problem}", path.display())]
    Invalid { path: PathBuf, problem: String },
    #[error("{}: step {step} ({op}): {problem}", path.display())]
    Step {
        path: PathBuf,
        step: usize,
        op: String,
        problem: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, Serialize)]
pub enum IpFamily {
    IPv4,
    IPv6,
}

/// How the CNI wires pods to the node (`model.cni`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Cni {
    /// A veth per pod with a host route to its address (kindnet, Calico).
    #[default]
    Ptp,
    /// Pods are ports of a Linux bridge holding the pod network's gateway (flannel's `cni0`).
    Bridge,
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::IPv4 => "IPv4",
            Self::IPv6 => "IPv6",
        })
    }
}

#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, Serialize,
)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
    Sctp,
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

/// A container port, spelled as in a Pod spec.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
#[expect(clippy::struct_field_names, reason = "named after the Pod spec field")]
pub struct ContainerPort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(rename = "containerPort")]
    pub container_port: u16,
    #[serde(default)]
    pub protocol: Protocol,
}

/// A pod of the model, or one added by a step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodSpec {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    pub ports: Vec<ContainerPort>,
    /// Service account and annotations (the identity check's inputs).
    pub identity: crate::mtls::PodIdentity,
}

/// The simulated cluster a scenario starts from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Model {
    pub ip_families: Vec<IpFamily>,
    /// Namespace name to its complete label set (`kubernetes.io/metadata.name` included).
    pub namespaces: IndexMap<String, Labels>,
    /// Ports of pods that do not list their own; external hosts serve these too.
    pub default_ports: Vec<ContainerPort>,
    /// `ns/name` to the pod, in grid order.
    pub pods: IndexMap<String, PodSpec>,
    /// Model pods that serve the cluster DNS (`dns: true`) on their `dns` and `dns-tcp` ports.
    pub dns_pods: BTreeSet<String>,
    /// External host keys, in grid order after the pods.
    pub external_hosts: Vec<String>,
    /// `services: per_pod`: a `ClusterIP` Service per pod, as upstream's e2e suite creates.
    pub per_pod_services: bool,
    /// How the node's netfilter translates Services (when there are any).
    pub kube_proxy: KubeProxyMode,
    /// How pods are wired to the node.
    pub cni: Cni,
}

/// `model.services`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum ServicesMode {
    PerPod,
}

/// What a probe dials.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProbeVia {
    /// The server pod's own address.
    #[default]
    Pod,
    /// The server pod's per-pod Service (`ClusterIP` and service port).
    Service,
}

/// Which address of a Service a `dial` step uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DialVia {
    #[default]
    ClusterIp,
    /// The node's own address and the port's nodePort.
    NodePort,
}

/// Whether a `dial` must get through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reachability {
    Allowed,
    Blocked,
}

/// The `from` of a `dial` that stands for a `hostNetwork` client in the node namespace.
pub const NODE_CLIENT: &str = "node";

/// One connection to a Service.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dial {
    /// A pod, an external host, or `node`.
    pub from: String,
    /// `namespace/name` of the Service.
    pub service: String,
    /// The service port.
    pub port: u16,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default)]
    pub via: DialVia,
    pub expect: Reachability,
    /// TCP only: the client dials from this port, and closes each connection with a RST so
    /// that the next attempt reuses the same addresses and ports at once (as a client with
    /// `tcp_tw_reuse` does), in a new kernel connection that kube-proxy balances afresh.
    #[serde(default)]
    pub source_port: Option<u16>,
    /// How many connections per family [default: 1]. With more than one, `allowed` means at
    /// least one was answered, `blocked` that none was.
    #[serde(default = "one_attempt")]
    pub attempts: u32,
    /// The pods that may answer [default: any pod of the Service's namespace]: an answer from
    /// another is a failure whatever `expect` says.
    #[serde(default)]
    pub answered_only_by: Option<Vec<String>>,
}

fn one_attempt() -> u32 {
    1
}

impl fmt::Display for Dial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let via = match self.via {
            DialVia::ClusterIp => "cluster IP",
            DialVia::NodePort => "node port",
        };
        write!(
            f,
            "{} -> {} {}/{} by {via}",
            self.from, self.service, self.protocol, self.port,
        )?;
        if let Some(port) = self.source_port {
            write!(f, " from port {port}")?;
        }
        if self.attempts > 1 {
            write!(f, ", {} attempts", self.attempts)?;
        }
        if let Some(pods) = &self.answered_only_by {
            write!(f, ", answered only by {}", pods.join(" "))?;
        }
        write!(
            f,
            " (expect {})",
            format!("{:?}", self.expect).to_lowercase()
        )
    }
}

/// The DNS Service a `resolve` step asks when it names none, as in a real cluster.
pub const DEFAULT_DNS_SERVICE: &str = "kube-system/kube-dns";

/// One name looked up through the cluster DNS Service.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resolve {
    /// The pod that asks.
    pub from: String,
    pub name: String,
    /// `namespace/name` of the DNS Service; its `ClusterIP`, port 53, is asked.
    #[serde(default = "default_dns_service")]
    pub server: String,
    /// UDP or TCP (default UDP).
    #[serde(default = "udp")]
    pub protocol: Protocol,
    pub expect: ResolveExpectation,
}

fn default_dns_service() -> String {
    DEFAULT_DNS_SERVICE.to_owned()
}

fn udp() -> Protocol {
    Protocol::Udp
}

/// What a `resolve` step must get.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResolveExpectation {
    /// NOERROR with exactly this address (an A query for IPv4, AAAA for IPv6).
    Address(IpAddr),
    NxDomain,
    /// No answer within the probes' attempt timeout.
    Blocked,
}

impl<'de> Deserialize<'de> for ResolveExpectation {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        match text.as_str() {
            "nxdomain" => Ok(Self::NxDomain),
            "blocked" => Ok(Self::Blocked),
            address => address.parse().map(Self::Address).map_err(|_| {
                serde::de::Error::custom(format!(
                    "expect: {address:?} is neither an address nor nxdomain nor blocked"
                ))
            }),
        }
    }
}

impl fmt::Display for ResolveExpectation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Address(address) => write!(f, "{address}"),
            Self::NxDomain => f.write_str("nxdomain"),
            Self::Blocked => f.write_str("blocked"),
        }
    }
}

impl fmt::Display for Resolve {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} asks {} for {} over {} (expect {})",
            self.from, self.server, self.name, self.protocol, self.expect
        )
    }
}

impl Model {
    #[must_use]
    pub fn has(&self, family: IpFamily) -> bool {
        self.ip_families.contains(&family)
    }

    /// The family `{{ip ..}}` and `{{cidr ..}}` refer to: IPv6 only in an IPv6-only model.
    #[must_use]
    pub fn primary_family(&self) -> IpFamily {
        if self.has(IpFamily::IPv4) {
            IpFamily::IPv4
        } else {
            IpFamily::IPv6
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RestartMode {
    Graceful,
    Kill,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectionExpectation {
    Alive,
    Closed,
}

/// The expected connectivity of one probe, rows and columns in the grid order of its step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpectedGrid {
    pub endpoints: Vec<String>,
    /// `allowed[row][column]`; the diagonal is not scored.
    pub allowed: Vec<Vec<bool>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    CreatePolicy {
        policy: String,
    },
    UpdatePolicy {
        policy: String,
    },
    DeletePolicy {
        policy: String,
    },
    DeleteAllPolicies {
        namespaces: Vec<String>,
    },
    Relabel {
        pod_labels: IndexMap<String, Labels>,
        namespace_labels: IndexMap<String, Labels>,
    },
    AddPod {
        pod: String,
        labels: Labels,
        ports: Option<Vec<ContainerPort>>,
        reuse_ip_of: Option<String>,
        publish: bool,
    },
    PublishPod {
        pod: String,
    },
    DeletePod {
        pod: String,
    },
    RestartAgent {
        mode: RestartMode,
    },
    OpenConnection {
        name: String,
        from: String,
        to: String,
        port: u16,
        protocol: Protocol,
        /// To the server pod's own address, or through its per-pod Service.
        via: ProbeVia,
    },
    CheckConnection {
        name: String,
        expect: ConnectionExpectation,
    },
    Probe {
        port: u16,
        protocol: Protocol,
        expect: ExpectedGrid,
        via: ProbeVia,
    },
    CreateService {
        service: String,
    },
    DeleteService {
        service: String,
    },
    Dial(Dial),
    Resolve(Resolve),
    MtlsProbe(crate::mtls::MtlsProbe),
    IdentityCheck(crate::mtls::IdentityCheck),
    ExpectAgentLog(crate::mtls::ExpectAgentLog),
    /// `netwarden observe` run against the agent, its output checked.
    Observe(Observe),
    /// `netwarden explain --agent` asked about a flow, its verdict checked.
    Explain(Explain),
    SendSpoofed {
        from: String,
        to: String,
        source: SpoofedSource,
        /// `None`: sent through a raw IP socket; `Some(n)`: sent as an Ethernet frame on the
        /// pod's interface, inside `n` VLAN tags of VLAN 0 (`Some(0)`: untagged).
        frame_tags: Option<u8>,
        expect: Delivery,
    },
    IcmpError {
        connection: String,
        quote: Quote,
        expect: Delivery,
    },
}

/// The source address a `send_spoofed` datagram claims.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SpoofedSource {
    /// The sender's own address (the control case).
    Own,
    /// The address of this pod (`NS/POD`) or external host.
    Endpoint(String),
}

/// Whether a crafted packet must arrive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Delivery {
    Delivered,
    Dropped,
}

/// What an `icmp_error` quotes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Quote {
    /// A packet of the named connection: the error is related to a tracked flow.
    Connection,
    /// A packet between the same two pods from a port no flow uses.
    Unrelated,
}

impl Step {
    #[must_use]
    pub fn op(&self) -> &'static str {
        match self {
            Self::CreatePolicy { .. } => "create_policy",
            Self::UpdatePolicy { .. } => "update_policy",
            Self::DeletePolicy { .. } => "delete_policy",
            Self::DeleteAllPolicies { .. } => "delete_all_policies",
            Self::Relabel { .. } => "relabel",
            Self::AddPod { .. } => "add_pod",
            Self::PublishPod { .. } => "publish_pod",
            Self::DeletePod { .. } => "delete_pod",
            Self::RestartAgent { .. } => "restart_agent",
            Self::OpenConnection { .. } => "open_connection",
            Self::CheckConnection { .. } => "check_connection",
            Self::Probe { .. } => "probe",
            Self::CreateService { .. } => "create_service",
            Self::DeleteService { .. } => "delete_service",
            Self::Dial(_) => "dial",
            Self::Resolve(_) => "resolve",
            Self::SendSpoofed { .. } => "send_spoofed",
            Self::IcmpError { .. } => "icmp_error",
            Self::MtlsProbe(_) => "mtls_probe",
            Self::IdentityCheck(_) => "identity_check",
            Self::ExpectAgentLog(_) => "expect_agent_log",
            Self::Observe(_) => "observe",
            Self::Explain(_) => "explain",
        }
    }
}

impl fmt::Display for Step {
    #[expect(
        clippy::too_many_lines,
        reason = "one arm per op reads better than a function per op"
    )]
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::CreatePolicy { policy }
            | Self::UpdatePolicy { policy }
            | Self::DeletePolicy { policy } => {
                write!(f, "{} {policy}", self.op())
            }
            Self::DeleteAllPolicies { namespaces } => {
                write!(f, "delete_all_policies in {}", namespaces.join(", "))
            }
            Self::Relabel {
                pod_labels,
                namespace_labels,
            } => {
                let targets: Vec<&str> = pod_labels
                    .keys()
                    .chain(namespace_labels.keys())
                    .map(String::as_str)
                    .collect();
                write!(f, "relabel {}", targets.join(", "))
            }
            Self::AddPod { pod, publish, .. } => {
                write!(
                    f,
                    "add_pod {pod}{}",
                    if *publish { "" } else { " (unpublished)" }
                )
            }
            Self::PublishPod { pod } | Self::DeletePod { pod } => write!(f, "{} {pod}", self.op()),
            Self::RestartAgent { mode } => {
                write!(f, "restart_agent ({})", format!("{mode:?}").to_lowercase())
            }
            Self::OpenConnection {
                name,
                from,
                to,
                port,
                protocol,
                via,
            } => {
                write!(
                    f,
                    "open_connection {name}: {from} -> {to} {protocol}/{port}{}",
                    match via {
                        ProbeVia::Pod => "",
                        ProbeVia::Service => " via service",
                    }
                )
            }
            Self::CheckConnection { name, expect } => {
                write!(
                    f,
                    "check_connection {name} (expect {})",
                    format!("{expect:?}").to_lowercase()
                )
            }
            Self::Probe {
                port,
                protocol,
                via,
                ..
            } => match via {
                ProbeVia::Pod => write!(f, "probe {protocol}/{port}"),
                ProbeVia::Service => write!(f, "probe {protocol}/{port} via service"),
            },
            Self::CreateService { service } | Self::DeleteService { service } => {
                write!(f, "{} {service}", self.op())
            }
            Self::Dial(dial) => write!(f, "dial {dial}"),
            Self::Resolve(resolve) => write!(f, "resolve: {resolve}"),
            Self::SendSpoofed {
                from,
                to,
                source,
                frame_tags,
                expect,
            } => {
                let source = match source {
                    SpoofedSource::Own => "its own address".to_owned(),
                    SpoofedSource::Endpoint(endpoint) => format!("the address of {endpoint}"),
                };
                let framing = match frame_tags {
                    None => String::new(),
                    Some(0) => ", as an untagged frame".to_owned(),
                    Some(tags) => format!(", inside {tags} VLAN tag(s)"),
                };
                write!(
                    f,
                    "send_spoofed {from} -> {to} from {source}{framing} (expect {})",
                    format!("{expect:?}").to_lowercase()
                )
            }
            Self::IcmpError {
                connection,
                quote,
                expect,
            } => write!(
                f,
                "icmp_error about {connection} ({}; expect {})",
                format!("{quote:?}").to_lowercase(),
                format!("{expect:?}").to_lowercase()
            ),
            Self::MtlsProbe(probe) => write!(f, "mtls_probe {probe}"),
            Self::IdentityCheck(check) => write!(f, "identity_check {check}"),
            Self::ExpectAgentLog(expect) => write!(f, "expect_agent_log {expect}"),
            Self::Observe(observe) => write!(f, "observe {observe}"),
            Self::Explain(explain) => write!(f, "explain {explain}"),
        }
    }
}

/// A validated scenario.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub path: PathBuf,
    pub name: String,
    pub model: Model,
    /// Policy key to the `NetworkPolicy` (`namespace/name[@variant]`) or `ClusterNetworkPolicy`
    /// (`name[@variant]`) object, placeholders not yet substituted.
    pub policies: IndexMap<String, serde_yaml::Value>,
    /// Extra command-line arguments for the agent.
    pub agent_args: Vec<String>,
    /// `namespace/name` to the Services steps may create.
    pub services: IndexMap<String, ServiceSpec>,
    pub steps: Vec<Step>,
}

impl Scenario {
    /// Whether the node runs kube-proxy: some Service exists at some point.
    #[must_use]
    pub fn uses_services(&self) -> bool {
        self.model.per_pod_services || !self.services.is_empty()
    }

    /// The scenario run through Services, as a real cluster runs upstream's suite: per-pod
    /// Services, kube-proxy in `mode`, every probe and long-lived connection dialling Services.
    /// The name says so.
    #[must_use]
    pub fn through_services(mut self, mode: KubeProxyMode) -> Self {
        self.model.per_pod_services = true;
        self.model.kube_proxy = mode;
        for step in &mut self.steps {
            if let Step::Probe { via, .. } | Step::OpenConnection { via, .. } = step {
                *via = ProbeVia::Service;
            }
        }
        self.name = format!("{} [service-{mode}]", self.name);
        self
    }

    /// Every pod that ever exists in the scenario, model pods first.
    pub fn all_pods(&self) -> impl Iterator<Item = &str> {
        self.model
            .pods
            .keys()
            .map(String::as_str)
            .chain(self.steps.iter().filter_map(|step| match step {
                Step::AddPod { pod, .. } => Some(pod.as_str()),
                _ => None,
            }))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScenario {
    format: String,
    name: String,
    #[serde(default)]
    model: Option<RawModel>,
    #[serde(default)]
    policies: IndexMap<String, serde_yaml::Value>,
    #[serde(default)]
    policy_files: Vec<PathBuf>,
    /// Extra command-line arguments for the agent (e.g. small map sizes).
    #[serde(default)]
    agent_args: Vec<String>,
    /// Services steps may create, keyed `namespace/name`.
    #[serde(default)]
    services: IndexMap<String, serde_yaml::Value>,
    steps: Vec<serde_yaml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    ip_families: Option<Vec<IpFamily>>,
    namespaces: Option<IndexMap<String, Option<RawNamespace>>>,
    container_ports: Option<Vec<ContainerPort>>,
    pods: Option<IndexMap<String, Option<RawPod>>>,
    external_hosts: Option<IndexMap<String, Option<RawExternalHost>>>,
    services: Option<ServicesMode>,
    kube_proxy: Option<KubeProxyMode>,
    cni: Option<Cni>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNamespace {
    #[serde(default)]
    labels: Labels,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPod {
    #[serde(default)]
    labels: Labels,
    ports: Option<Vec<ContainerPort>>,
    #[serde(default)]
    annotations: Labels,
    #[serde(rename = "serviceAccountName")]
    service_account_name: Option<String>,
    /// Serve the cluster DNS on container ports `dns` (53/UDP) and `dns-tcp` (53/TCP).
    #[serde(default)]
    dns: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExternalHost {}

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum RawStep {
    CreatePolicy {
        policy: String,
    },
    UpdatePolicy {
        policy: String,
    },
    DeletePolicy {
        policy: String,
    },
    DeleteAllPolicies {
        namespaces: Vec<String>,
    },
    Relabel {
        #[serde(default)]
        pod_labels: IndexMap<String, Labels>,
        #[serde(default)]
        namespace_labels: IndexMap<String, Labels>,
    },
    AddPod {
        pod: String,
        #[serde(default)]
        labels: Labels,
        ports: Option<Vec<ContainerPort>>,
        reuse_ip_of: Option<String>,
        #[serde(default = "yes")]
        publish: bool,
    },
    PublishPod {
        pod: String,
    },
    DeletePod {
        pod: String,
    },
    RestartAgent {
        mode: RestartMode,
    },
    OpenConnection {
        name: String,
        from: String,
        to: String,
        port: u16,
        #[serde(default)]
        protocol: Protocol,
        #[serde(default)]
        via: ProbeVia,
    },
    CheckConnection {
        name: String,
        expect: ConnectionExpectation,
    },
    Probe {
        port: u16,
        #[serde(default)]
        protocol: Protocol,
        expect: RawProbeExpectation,
        #[serde(default)]
        via: ProbeVia,
    },
    CreateService {
        service: String,
    },
    DeleteService {
        service: String,
    },
    Dial(Dial),
    Resolve(Resolve),
    MtlsProbe(crate::mtls::MtlsProbe),
    IdentityCheck(crate::mtls::IdentityCheck),
    ExpectAgentLog(crate::mtls::ExpectAgentLog),
    Observe(RawObserve),
    Explain(Explain),
    SendSpoofed {
        from: String,
        to: String,
        /// `own`, or the pod or external host whose address the packet claims.
        source: String,
        /// Send an Ethernet frame inside this many VLAN-0 tags (0: untagged) on the sender's
        /// interface, rather than an IP packet through a raw socket.
        #[serde(default)]
        frame_tags: Option<u8>,
        expect: Delivery,
    },
    IcmpError {
        connection: String,
        #[serde(default = "quote_connection")]
        quote: Quote,
        expect: Delivery,
    },
}

fn quote_connection() -> Quote {
    Quote::Connection
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProbeExpectation {
    grid: IndexMap<String, String>,
}

const NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// The upstream `NetworkPolicy` e2e model: x/y/z × a/b/c, ports 80 and 81 over every protocol.
#[must_use]
pub fn upstream_model(ip_families: Vec<IpFamily>, ports: Option<Vec<ContainerPort>>) -> Model {
    let default_ports = ports.unwrap_or_else(|| {
        let mut ports = Vec::new();
        for port in [80, 81] {
            for (protocol, suffix) in [
                (Protocol::Tcp, "tcp"),
                (Protocol::Udp, "udp"),
                (Protocol::Sctp, "sctp"),
            ] {
                ports.push(ContainerPort {
                    name: Some(format!("serve-{port}-{suffix}")),
                    container_port: port,
                    protocol,
                });
            }
        }
        ports
    });
    let mut namespaces = IndexMap::new();
    let mut pods = IndexMap::new();
    for ns in ["x", "y", "z"] {
        namespaces.insert(
            ns.to_owned(),
            Labels::from([
                (NAME_LABEL.to_owned(), ns.to_owned()),
                ("ns".to_owned(), ns.to_owned()),
            ]),
        );
        for pod in ["a", "b", "c"] {
            pods.insert(
                format!("{ns}/{pod}"),
                PodSpec {
                    namespace: ns.to_owned(),
                    name: pod.to_owned(),
                    labels: Labels::from([("pod".to_owned(), pod.to_owned())]),
                    ports: default_ports.clone(),
                    identity: crate::mtls::PodIdentity::default(),
                },
            );
        }
    }
    Model {
        ip_families,
        namespaces,
        default_ports,
        pods,
        dns_pods: BTreeSet::new(),
        external_hosts: Vec::new(),
        per_pod_services: false,
        kube_proxy: KubeProxyMode::default(),
        cni: Cni::default(),
    }
}

/// A namespace's complete label set: `labels` plus the name label the API server adds.
#[must_use]
pub fn namespace_labels(name: &str, labels: &Labels) -> Labels {
    let mut labels = labels.clone();
    labels.insert(NAME_LABEL.to_owned(), name.to_owned());
    labels
}

/// Whether a YAML file found by walking a directory is meant as a scenario: it has a top-level
/// `format` key. Files named on the command line are always scenarios.
#[must_use]
pub fn looks_like_scenario(text: &str) -> bool {
    serde_yaml::from_str::<serde_yaml::Value>(text)
        .ok()
        .and_then(|value| value.as_mapping().map(|map| map.contains_key("format")))
        .unwrap_or(false)
}

/// Reads and validates a scenario file.
pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
    let text = fs::read_to_string(path).map_err(|source| ScenarioError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(path, &text)
}

/// Parses and validates scenario text; `path` names it in errors and anchors `policy_files`.
pub fn parse(path: &Path, text: &str) -> Result<Scenario, ScenarioError> {
    let invalid = |problem: String| ScenarioError::Invalid {
        path: path.to_owned(),
        problem,
    };
    let raw: RawScenario = serde_yaml::from_str(text).map_err(|source| ScenarioError::Yaml {
        path: path.to_owned(),
        source,
    })?;
    if raw.format != FORMAT {
        return Err(invalid(format!(
            "format is {:?}, expected {FORMAT:?}",
            raw.format
        )));
    }
    let model = build_model(raw.model).map_err(invalid)?;
    let mut policies = IndexMap::new();
    for (key, object) in raw.policies {
        let object = check_policy(&key, object).map_err(invalid)?;
        policies.insert(key, object);
    }
    for file in &raw.policy_files {
        let file_path = path.parent().unwrap_or(Path::new(".")).join(file);
        for (key, object) in load_policy_file(&file_path).map_err(invalid)? {
            if policies.contains_key(&key) {
                return Err(invalid(format!(
                    "policy {key} from {} is defined twice",
                    file_path.display()
                )));
            }
            policies.insert(key, object);
        }
    }
    let mut services = IndexMap::new();
    for (key, object) in raw.services {
        let service = services::parse_service(&key, object).map_err(invalid)?;
        if !model.namespaces.contains_key(&service.namespace) {
            return Err(invalid(format!(
                "service {key}: namespace {} is not in the model",
                service.namespace
            )));
        }
        services.insert(key, service);
    }
    let mut steps = Vec::with_capacity(raw.steps.len());
    for (index, value) in raw.steps.into_iter().enumerate() {
        let op = value
            .get("op")
            .and_then(serde_yaml::Value::as_str)
            .unwrap_or("?")
            .to_owned();
        let step =
            serde_yaml::from_value::<RawStep>(value).map_err(|error| ScenarioError::Step {
                path: path.to_owned(),
                step: index + 1,
                op: op.clone(),
                problem: error.to_string(),
            })?;
        steps.push(step);
    }
    let scenario = Validator::new(&model, &policies, &services)
        .validate(steps)
        .map_err(|(step, op, problem)| ScenarioError::Step {
            path: path.to_owned(),
            step,
            op: op.to_owned(),
            problem,
        })?;
    let scenario = Scenario {
        path: path.to_owned(),
        name: raw.name,
        model,
        policies,
        agent_args: raw.agent_args,
        services,
        steps: scenario,
    };
    check_placeholders(&scenario).map_err(invalid)?;
    Ok(scenario)
}

fn build_model(raw: Option<RawModel>) -> Result<Model, String> {
    let Some(raw) = raw else {
        return Ok(upstream_model(vec![IpFamily::IPv4], None));
    };
    let mut ip_families = raw.ip_families.unwrap_or_else(|| vec![IpFamily::IPv4]);
    let distinct: BTreeSet<IpFamily> = ip_families.iter().copied().collect();
    if ip_families.is_empty() || distinct.len() != ip_families.len() {
        return Err("model.ip_families must list IPv4 and/or IPv6, each once".to_owned());
    }
    ip_families.sort();
    let per_pod_services = raw.services == Some(ServicesMode::PerPod);
    let kube_proxy = raw.kube_proxy.unwrap_or_default();
    let cni = raw.cni.unwrap_or_default();
    if raw.namespaces.is_none() && raw.pods.is_none() {
        // Only families, ports, hosts or the node's options given: the upstream model with those.
        let mut model = upstream_model(ip_families, raw.container_ports);
        model.external_hosts = external_hosts(raw.external_hosts)?;
        model.per_pod_services = per_pod_services;
        model.kube_proxy = kube_proxy;
        model.cni = cni;
        return Ok(model);
    }
    let default_ports = raw
        .container_ports
        .unwrap_or_else(|| upstream_model(Vec::new(), None).default_ports);
    let mut namespaces = IndexMap::new();
    for (name, namespace) in raw.namespaces.unwrap_or_default() {
        check_name("namespace", &name)?;
        namespaces.insert(
            name.clone(),
            namespace_labels(&name, &namespace.unwrap_or_default().labels),
        );
    }
    let mut pods = IndexMap::new();
    let mut dns_pods = BTreeSet::new();
    for (key, pod) in raw.pods.unwrap_or_default() {
        let (namespace, name) = split_pod_key(&key)?;
        if !namespaces.contains_key(namespace) {
            return Err(format!(
                "pod {key}: namespace {namespace} is not in model.namespaces"
            ));
        }
        let pod = pod.unwrap_or_default();
        let mut ports = pod.ports.unwrap_or_else(|| default_ports.clone());
        if pod.dns {
            ports.extend(dns::container_ports());
            dns_pods.insert(key.clone());
        }
        check_ports(&key, &ports)?;
        pods.insert(
            key.clone(),
            PodSpec {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                labels: pod.labels,
                ports,
                identity: crate::mtls::PodIdentity {
                    service_account: pod.service_account_name,
                    annotations: pod.annotations,
                },
            },
        );
    }
    let external_hosts = external_hosts(raw.external_hosts)?;
    if let Some(clash) = external_hosts.iter().find(|host| pods.contains_key(*host)) {
        return Err(format!("external host {clash} has the key of a pod"));
    }
    Ok(Model {
        ip_families,
        namespaces,
        default_ports,
        pods,
        dns_pods,
        external_hosts,
        per_pod_services,
        kube_proxy,
        cni,
    })
}

fn external_hosts(
    raw: Option<IndexMap<String, Option<RawExternalHost>>>,
) -> Result<Vec<String>, String> {
    let hosts: Vec<String> = raw.unwrap_or_default().into_keys().collect();
    for host in &hosts {
        if host.contains('/') {
            return Err(format!(
                "external host key {host:?} must not contain '/' (that is how pods are named)"
            ));
        }
        check_name("external host", host)?;
    }
    Ok(hosts)
}

fn check_name(what: &str, name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if valid {
        Ok(())
    } else {
        Err(format!("{what} name {name:?} is not a valid DNS label"))
    }
}

fn check_ports(pod: &str, ports: &[ContainerPort]) -> Result<(), String> {
    let mut seen = BTreeSet::new();
    for port in ports {
        if port.container_port == 0 {
            return Err(format!("pod {pod}: containerPort 0 is not a port"));
        }
        if !seen.insert((port.container_port, port.protocol as u8)) {
            return Err(format!(
                "pod {pod}: port {}/{} listed twice",
                port.protocol, port.container_port
            ));
        }
    }
    Ok(())
}

/// Splits `ns/name`.
pub fn split_pod_key(key: &str) -> Result<(&str, &str), String> {
    let (namespace, name) = key
        .split_once('/')
        .ok_or_else(|| format!("pod key {key:?} is not NAMESPACE/NAME"))?;
    check_name("namespace", namespace)?;
    check_name("pod", name)?;
    Ok((namespace, name))
}

/// The `namespace/name` (or, for a cluster-scoped policy, `name`) a policy key stands for: the
/// key without its `@variant`.
#[must_use]
pub fn policy_identity(key: &str) -> &str {
    key.split_once('@').map_or(key, |(identity, _)| identity)
}

/// The API group and version of `ClusterNetworkPolicy` (network-policy-api).
pub const CLUSTER_NETWORK_POLICY_API_VERSION: &str = "policy.networking.k8s.io/v1alpha2";

/// What a policy identity names: a namespaced `NetworkPolicy` (`namespace/name`) or a
/// cluster-scoped `ClusterNetworkPolicy` (`name`, no slash).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyName<'a> {
    Namespaced { namespace: &'a str, name: &'a str },
    Cluster { name: &'a str },
}

impl<'a> PolicyName<'a> {
    /// Splits a policy key or identity (any `@variant` is dropped first).
    #[must_use]
    pub fn of(key: &'a str) -> Self {
        match policy_identity(key).split_once('/') {
            Some((namespace, name)) => Self::Namespaced { namespace, name },
            None => Self::Cluster {
                name: policy_identity(key),
            },
        }
    }
}

/// Checks that a policy object matches its key and fills in what the key implies: a
/// `NetworkPolicy` for a `namespace/name` key (its namespace filled in from the key when the object
/// omits it, as `kubectl apply -n` would), a `policy.networking.k8s.io/v1alpha2`
/// `ClusterNetworkPolicy` for a `name` key (cluster-scoped: no namespace; `spec.tier` `Admin` or
/// `Baseline` and an integer `spec.priority`, so that a typo fails before any namespace exists).
fn check_policy(key: &str, mut object: serde_yaml::Value) -> Result<serde_yaml::Value, String> {
    let kind = object.get("kind").and_then(serde_yaml::Value::as_str);
    let (namespace, name) = match PolicyName::of(key) {
        PolicyName::Namespaced { namespace, name } => {
            if kind != Some("NetworkPolicy") {
                return Err(format!(
                    "policy {key}: kind is {kind:?}, expected NetworkPolicy (a ClusterNetworkPolicy's key has no namespace part)"
                ));
            }
            (Some(namespace), name)
        }
        PolicyName::Cluster { name } => {
            if kind != Some("ClusterNetworkPolicy") {
                return Err(format!(
                    "policy {key}: kind is {kind:?}, expected ClusterNetworkPolicy (a NetworkPolicy's key is NAMESPACE/NAME[@VARIANT])"
                ));
            }
            check_cluster_policy(key, &object)?;
            (None, name)
        }
    };
    let metadata = object
        .get_mut("metadata")
        .and_then(serde_yaml::Value::as_mapping_mut)
        .ok_or_else(|| format!("policy {key}: no metadata"))?;
    let object_name = metadata.get("name").and_then(serde_yaml::Value::as_str);
    if object_name != Some(name) {
        return Err(format!(
            "policy {key}: metadata.name is {object_name:?}, the key says {name:?}"
        ));
    }
    let object_namespace = metadata
        .get("namespace")
        .and_then(serde_yaml::Value::as_str);
    match (namespace, object_namespace) {
        (Some(namespace), None) => {
            metadata.insert("namespace".into(), namespace.into());
        }
        (Some(namespace), Some(object_namespace)) if object_namespace != namespace => {
            return Err(format!(
                "policy {key}: metadata.namespace is {object_namespace:?}, the key says {namespace:?}"
            ));
        }
        (None, Some(object_namespace)) => {
            return Err(format!(
                "policy {key}: a ClusterNetworkPolicy is cluster-scoped, but metadata.namespace is {object_namespace:?}"
            ));
        }
        _ => {}
    }
    Ok(object)
}

/// The few fields of a `ClusterNetworkPolicy` the harness checks itself; the agent judges the rest.
fn check_cluster_policy(key: &str, object: &serde_yaml::Value) -> Result<(), String> {
    let api_version = object.get("apiVersion").and_then(serde_yaml::Value::as_str);
    if api_version != Some(CLUSTER_NETWORK_POLICY_API_VERSION) {
        return Err(format!(
            "policy {key}: apiVersion is {api_version:?}, expected {CLUSTER_NETWORK_POLICY_API_VERSION:?}"
        ));
    }
    let spec = object
        .get("spec")
        .ok_or_else(|| format!("policy {key}: no spec"))?;
    let tier = spec.get("tier").and_then(serde_yaml::Value::as_str);
    if !matches!(tier, Some("Admin" | "Baseline")) {
        return Err(format!(
            "policy {key}: spec.tier is {tier:?}, expected \"Admin\" or \"Baseline\""
        ));
    }
    if !spec.get("priority").is_some_and(serde_yaml::Value::is_i64) {
        return Err(format!("policy {key}: spec.priority must be an integer"));
    }
    Ok(())
}

/// The `NetworkPolicy` objects of a (multi-document) manifest file, keyed `namespace/name`.
fn load_policy_file(path: &Path) -> Result<Vec<(String, serde_yaml::Value)>, String> {
    let text = fs::read_to_string(path)
        .map_err(|error| format!("policy file {}: {error}", path.display()))?;
    let mut objects = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(&text).enumerate() {
        let value = serde_yaml::Value::deserialize(document)
            .map_err(|error| format!("policy file {} document {index}: {error}", path.display()))?;
        collect_policies(&value, &mut objects);
    }
    let mut keyed = Vec::new();
    for object in objects {
        let name = object
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(serde_yaml::Value::as_str);
        let namespace = object
            .get("metadata")
            .and_then(|m| m.get("namespace"))
            .and_then(serde_yaml::Value::as_str)
            .unwrap_or("default");
        let Some(name) = name else {
            return Err(format!(
                "policy file {}: a NetworkPolicy has no metadata.name",
                path.display()
            ));
        };
        let key = format!("{namespace}/{name}");
        let object = check_policy(&key, object)
            .map_err(|error| format!("policy file {}: {error}", path.display()))?;
        keyed.push((key, object));
    }
    Ok(keyed)
}

fn collect_policies(value: &serde_yaml::Value, into: &mut Vec<serde_yaml::Value>) {
    match value.get("kind").and_then(serde_yaml::Value::as_str) {
        Some("NetworkPolicy") => into.push(value.clone()),
        Some("List" | "NetworkPolicyList") => {
            if let Some(items) = value.get("items").and_then(serde_yaml::Value::as_sequence) {
                for item in items {
                    collect_policies(item, into);
                }
            }
        }
        // Other objects (namespaces, comments-only documents) may sit beside the policies.
        _ => {}
    }
}

/// Every placeholder names a pod or external host of the scenario and a family the model has.
fn check_placeholders(scenario: &Scenario) -> Result<(), String> {
    let model = &scenario.model;
    let mut targets: BTreeSet<&str> = scenario.all_pods().collect();
    targets.extend(model.external_hosts.iter().map(String::as_str));
    let check = |text: &str| -> Result<(), String> {
        for found in placeholder::parse_all(text).map_err(|error| error.to_string())? {
            if !targets.contains(found.target()) {
                return Err(format!(
                    "{found} names no pod or external host of the scenario"
                ));
            }
            if !model.has(found.family(model.primary_family())) {
                return Err(format!("{found} needs a family the model does not have"));
            }
        }
        Ok(())
    };
    for (key, object) in &scenario.policies {
        let mut problem = Ok(());
        placeholder::visit_strings(object, &mut |text| {
            if problem.is_ok() {
                problem = check(text);
            }
        });
        problem.map_err(|problem| format!("policy {key}: {problem}"))?;
    }
    Ok(())
}

/// Replays the steps on the model's shape, checking references and grids.
struct Validator<'a> {
    model: &'a Model,
    policies: &'a IndexMap<String, serde_yaml::Value>,
    order: Vec<String>,
    namespaces: BTreeSet<String>,
    unpublished: BTreeSet<String>,
    deleted: BTreeSet<String>,
    ever: BTreeSet<String>,
    existing_policies: BTreeSet<String>,
    connections: BTreeSet<String>,
    services: &'a IndexMap<String, ServiceSpec>,
    existing_services: BTreeSet<String>,
    /// The cells the probes expected blocked since the previous `observe` step of denies or
    /// the agent's restart: what an `observe` step that lists no flows expects reported
    /// denied.
    blocked_since_observe: IndexSet<FlowEnds>,
}

impl<'a> Validator<'a> {
    fn new(
        model: &'a Model,
        policies: &'a IndexMap<String, serde_yaml::Value>,
        services: &'a IndexMap<String, ServiceSpec>,
    ) -> Self {
        let order: Vec<String> = model
            .pods
            .keys()
            .chain(&model.external_hosts)
            .cloned()
            .collect();
        Self {
            model,
            policies,
            ever: order.iter().cloned().collect(),
            order,
            namespaces: model.namespaces.keys().cloned().collect(),
            unpublished: BTreeSet::new(),
            deleted: BTreeSet::new(),
            existing_policies: BTreeSet::new(),
            connections: BTreeSet::new(),
            services,
            existing_services: BTreeSet::new(),
            blocked_since_observe: IndexSet::new(),
        }
    }

    fn validate(mut self, raw: Vec<RawStep>) -> Result<Vec<Step>, (usize, &'static str, String)> {
        let mut steps = Vec::with_capacity(raw.len());
        for (index, raw) in raw.into_iter().enumerate() {
            let step = self
                .step(raw)
                .map_err(|(op, problem)| (index + 1, op, problem))?;
            steps.push(step);
        }
        Ok(steps)
    }

    fn pod(&self, key: &str) -> Result<(), String> {
        if self.order.iter().any(|existing| existing == key)
            && !self.model.external_hosts.iter().any(|h| h == key)
        {
            Ok(())
        } else {
            Err(format!("no pod {key} exists at this step"))
        }
    }

    fn endpoint(&self, key: &str) -> Result<(), String> {
        if self.order.iter().any(|existing| existing == key) {
            Ok(())
        } else {
            Err(format!("no pod or external host {key} exists at this step"))
        }
    }

    fn policy(&self, key: &str) -> Result<(), String> {
        if self.policies.contains_key(key) {
            Ok(())
        } else {
            Err(format!("policy {key} is not defined in policies"))
        }
    }

    #[expect(
        clippy::too_many_lines,
        reason = "one arm per op reads better than a function per op"
    )]
    fn step(&mut self, raw: RawStep) -> Result<Step, (&'static str, String)> {
        Ok(match raw {
            RawStep::CreatePolicy { policy } => {
                let op = "create_policy";
                self.policy(&policy).map_err(|e| (op, e))?;
                if !self
                    .existing_policies
                    .insert(policy_identity(&policy).to_owned())
                {
                    return Err((
                        op,
                        format!(
                            "{} already exists (use update_policy)",
                            policy_identity(&policy)
                        ),
                    ));
                }
                Step::CreatePolicy { policy }
            }
            RawStep::UpdatePolicy { policy } => {
                let op = "update_policy";
                self.policy(&policy).map_err(|e| (op, e))?;
                if !self.existing_policies.contains(policy_identity(&policy)) {
                    return Err((
                        op,
                        format!("{} does not exist at this step", policy_identity(&policy)),
                    ));
                }
                Step::UpdatePolicy { policy }
            }
            RawStep::DeletePolicy { policy } => {
                let op = "delete_policy";
                self.policy(&policy).map_err(|e| (op, e))?;
                if !self.existing_policies.remove(policy_identity(&policy)) {
                    return Err((
                        op,
                        format!("{} does not exist at this step", policy_identity(&policy)),
                    ));
                }
                Step::DeletePolicy { policy }
            }
            RawStep::DeleteAllPolicies { namespaces } => {
                let op = "delete_all_policies";
                if let Some(unknown) = namespaces.iter().find(|ns| !self.namespaces.contains(*ns)) {
                    return Err((op, format!("namespace {unknown} is not in the model")));
                }
                self.existing_policies.retain(|identity| {
                    !namespaces
                        .iter()
                        .any(|ns| identity.split_once('/').is_some_and(|(n, _)| n == ns))
                });
                Step::DeleteAllPolicies { namespaces }
            }
            RawStep::Relabel {
                pod_labels,
                namespace_labels,
            } => {
                let op = "relabel";
                if pod_labels.is_empty() && namespace_labels.is_empty() {
                    return Err((
                        op,
                        "relabel changes nothing: give pod_labels and/or namespace_labels"
                            .to_owned(),
                    ));
                }
                for pod in pod_labels.keys() {
                    self.pod(pod).map_err(|e| (op, e))?;
                }
                if let Some(unknown) = namespace_labels
                    .keys()
                    .find(|ns| !self.namespaces.contains(*ns))
                {
                    return Err((op, format!("namespace {unknown} is not in the model")));
                }
                Step::Relabel {
                    pod_labels,
                    namespace_labels,
                }
            }
            RawStep::AddPod {
                pod,
                labels,
                ports,
                reuse_ip_of,
                publish,
            } => {
                let op = "add_pod";
                let (namespace, _) = split_pod_key(&pod).map_err(|e| (op, e))?;
                if !self.namespaces.contains(namespace) {
                    return Err((op, format!("namespace {namespace} is not in the model")));
                }
                if !self.ever.insert(pod.clone()) && !self.deleted.contains(&pod) {
                    return Err((op, format!("{pod} already exists")));
                }
                if let Some(ports) = &ports {
                    check_ports(&pod, ports).map_err(|e| (op, e))?;
                }
                if let Some(old) = &reuse_ip_of
                    && !self.deleted.remove(old)
                {
                    return Err((
                        op,
                        format!(
                            "reuse_ip_of: {old} was not deleted earlier (or its IP is reused already)"
                        ),
                    ));
                }
                self.deleted.remove(&pod);
                if !publish {
                    self.unpublished.insert(pod.clone());
                }
                self.order.push(pod.clone());
                Step::AddPod {
                    pod,
                    labels,
                    ports,
                    reuse_ip_of,
                    publish,
                }
            }
            RawStep::PublishPod { pod } => {
                if !self.unpublished.remove(&pod) {
                    return Err((
                        "publish_pod",
                        format!("{pod} was not added with publish: false, or is published already"),
                    ));
                }
                Step::PublishPod { pod }
            }
            RawStep::DeletePod { pod } => {
                self.pod(&pod).map_err(|e| ("delete_pod", e))?;
                self.order.retain(|existing| *existing != pod);
                self.unpublished.remove(&pod);
                self.deleted.insert(pod.clone());
                Step::DeletePod { pod }
            }
            RawStep::RestartAgent { mode } => {
                // The new agent's ring starts empty: what the old one saw is gone.
                self.blocked_since_observe.clear();
                Step::RestartAgent { mode }
            }
            RawStep::OpenConnection {
                name,
                from,
                to,
                port,
                protocol,
                via,
            } => {
                let op = "open_connection";
                self.endpoint(&from).map_err(|e| (op, e))?;
                self.endpoint(&to).map_err(|e| (op, e))?;
                if via == ProbeVia::Service && !self.model.per_pod_services {
                    return Err((
                        op,
                        "via: service needs `services: per_pod` in the model".to_owned(),
                    ));
                }
                if protocol == Protocol::Sctp {
                    return Err((
                        op,
                        "long-lived SCTP flows are not supported (no SCTP in this kernel)"
                            .to_owned(),
                    ));
                }
                if !self.connections.insert(name.clone()) {
                    return Err((op, format!("a connection named {name} is open already")));
                }
                Step::OpenConnection {
                    name,
                    from,
                    to,
                    port,
                    protocol,
                    via,
                }
            }
            RawStep::SendSpoofed {
                from,
                to,
                source,
                frame_tags,
                expect,
            } => {
                let op = "send_spoofed";
                self.endpoint(&from).map_err(|e| (op, e))?;
                self.endpoint(&to).map_err(|e| (op, e))?;
                let source = if source == "own" {
                    SpoofedSource::Own
                } else {
                    self.endpoint(&source).map_err(|e| (op, e))?;
                    SpoofedSource::Endpoint(source)
                };
                Step::SendSpoofed {
                    from,
                    to,
                    source,
                    frame_tags,
                    expect,
                }
            }
            RawStep::IcmpError {
                connection,
                quote,
                expect,
            } => {
                if !self.connections.contains(&connection) {
                    return Err((
                        "icmp_error",
                        format!("no connection named {connection} was opened"),
                    ));
                }
                Step::IcmpError {
                    connection,
                    quote,
                    expect,
                }
            }
            RawStep::CheckConnection { name, expect } => {
                if !self.connections.contains(&name) {
                    return Err((
                        "check_connection",
                        format!("no connection named {name} was opened"),
                    ));
                }
                Step::CheckConnection { name, expect }
            }
            RawStep::Probe {
                port,
                protocol,
                expect,
                via,
            } => {
                let grid = self.grid(&expect.grid).map_err(|e| ("probe", e))?;
                if via == ProbeVia::Service && !self.model.per_pod_services {
                    return Err((
                        "probe",
                        "via: service needs `services: per_pod` in the model".to_owned(),
                    ));
                }
                self.remember_blocked(&grid, port, protocol);
                Step::Probe {
                    port,
                    protocol,
                    expect: grid,
                    via,
                }
            }
            RawStep::CreateService { service } => {
                let op = "create_service";
                if !self.services.contains_key(&service) {
                    return Err((op, format!("service {service} is not defined in services")));
                }
                if !self.existing_services.insert(service.clone()) {
                    return Err((op, format!("{service} exists already")));
                }
                Step::CreateService { service }
            }
            RawStep::DeleteService { service } => {
                if !self.existing_services.remove(&service) {
                    return Err((
                        "delete_service",
                        format!("{service} does not exist at this step"),
                    ));
                }
                Step::DeleteService { service }
            }
            RawStep::Dial(dial) => {
                self.dial(&dial).map_err(|e| ("dial", e))?;
                Step::Dial(dial)
            }
            RawStep::Resolve(resolve) => {
                self.resolve(&resolve).map_err(|e| ("resolve", e))?;
                Step::Resolve(resolve)
            }
            RawStep::MtlsProbe(probe) => {
                for pod in probe.pods() {
                    self.pod(pod).map_err(|e| ("mtls_probe", e))?;
                }
                Step::MtlsProbe(probe)
            }
            RawStep::IdentityCheck(check) => {
                for pod in check.pods() {
                    self.pod(pod).map_err(|e| ("identity_check", e))?;
                }
                Step::IdentityCheck(check)
            }
            RawStep::ExpectAgentLog(expect) => Step::ExpectAgentLog(expect),
            RawStep::Observe(raw) => {
                let observe = self.observe(raw).map_err(|e| ("observe", e))?;
                // A deny observe ends the window of denies, whatever it selected, as the time
                // window of the records it reads ends with it.
                if observe.filter.verdict == ObservedVerdict::Deny {
                    self.blocked_since_observe.clear();
                }
                Step::Observe(observe)
            }
            RawStep::Explain(explain) => {
                self.explain(&explain).map_err(|e| ("explain", e))?;
                Step::Explain(explain)
            }
        })
    }

    /// An explain's ends exist, and it names a pod or host or a Service with that port.
    fn explain(&self, explain: &Explain) -> Result<(), String> {
        self.endpoint(&explain.from)?;
        match (&explain.to, &explain.service) {
            (Some(to), None) => {
                self.endpoint(to)?;
                if self.pod(&explain.from).is_err() && self.pod(to).is_err() {
                    return Err("between two external hosts, no pod's policy applies".to_owned());
                }
                Ok(())
            }
            (None, Some(service)) => self.dial(&Dial {
                from: explain.from.clone(),
                service: service.clone(),
                port: explain.port,
                protocol: explain.protocol,
                via: DialVia::ClusterIp,
                expect: Reachability::Allowed,
                source_port: None,
                attempts: 1,
                answered_only_by: None,
            }),
            _ => Err("give `to` (a pod or external host) or `service`, not both".to_owned()),
        }
    }

    /// Notes the blocked cells of a probe's grid that the agent sees: those with a pod at one
    /// end at least (a flow between two external hosts never crosses a pod's veth).
    fn remember_blocked(&mut self, grid: &ExpectedGrid, port: u16, protocol: Protocol) {
        for (row, client) in grid.endpoints.iter().enumerate() {
            for (column, server) in grid.endpoints.iter().enumerate() {
                let external = |key: &String| self.model.external_hosts.contains(key);
                if row == column
                    || grid.allowed[row][column]
                    || (external(client) && external(server))
                {
                    continue;
                }
                self.blocked_since_observe.insert(FlowEnds {
                    from: client.clone(),
                    to: server.clone(),
                    port,
                    protocol,
                });
            }
        }
    }

    /// What an `observe` step expects: its own flows, or the blocked cells since the previous
    /// one that its filters select. The harness can judge a filter by namespace, pod, protocol
    /// and port, not by direction or policy (only the agent knows which end dropped a flow and
    /// why), and a grid says what is blocked, not what is audited or allowed: those steps list
    /// their flows.
    fn observe(&self, raw: RawObserve) -> Result<Observe, String> {
        let (filter, listed, checks) = raw.split();
        if let Some(namespace) = &filter.namespace
            && !self.namespaces.contains(namespace)
        {
            return Err(format!("namespace {namespace} is not in the model"));
        }
        for flow in listed.iter().flatten().chain(&checks.absent) {
            self.flow_ends(flow)?;
        }
        let expect = if let Some(flows) = &listed {
            if let Some(unselected) = flows.iter().find(|flow| !filter.selects(flow)) {
                return Err(format!(
                    "the step's filters do not select {unselected}, which it expects"
                ));
            }
            flows.clone()
        } else {
            self.blocked_cells_selected_by(&filter)?
        };
        if let Some(both) = checks.absent.iter().find(|flow| expect.contains(flow)) {
            return Err(format!("{both} is both expected and absent"));
        }
        Ok(Observe {
            filter,
            expect,
            listed: listed.is_some(),
            absent: checks.absent,
            expect_policy: checks.expect_policy,
            expect_reason: checks.expect_reason,
        })
    }

    /// The blocked cells since the previous observe of denies that `filter` selects, for a
    /// step that lists no flows.
    fn blocked_cells_selected_by(&self, filter: &ObserveFilter) -> Result<Vec<FlowEnds>, String> {
        if filter.verdict != ObservedVerdict::Deny {
            return Err(format!(
                "verdict {}: list `flows` (a probe's grid says what is blocked, not what the \
                 agent reports {})",
                filter.verdict, filter.verdict
            ));
        }
        if filter.direction.is_some() || filter.policy.is_some() {
            return Err(
                "with `direction` or `policy`, list `flows`: the harness cannot tell \
                 which blocked cells the agent reports under them"
                    .to_owned(),
            );
        }
        let selected: Vec<FlowEnds> = self
            .blocked_since_observe
            .iter()
            .filter(|flow| filter.selects(flow))
            .cloned()
            .collect();
        if selected.is_empty() {
            return Err(
                "no probe since the previous observe (or agent restart) expected a \
                 blocked flow that the filters select: list `flows`"
                    .to_owned(),
            );
        }
        Ok(selected)
    }

    /// A flow named by a step: both ends exist now, one at least is a pod, and they differ.
    fn flow_ends(&self, flow: &FlowEnds) -> Result<(), String> {
        self.endpoint(&flow.from)?;
        self.endpoint(&flow.to)?;
        if flow.from == flow.to {
            return Err(format!("{flow}: a pod to itself is never judged"));
        }
        if self.pod(&flow.from).is_err() && self.pod(&flow.to).is_err() {
            return Err(format!(
                "{flow}: between two external hosts, no pod's veth sees it"
            ));
        }
        Ok(())
    }

    /// A resolve's client is a pod, its name a DNS name, and its server a Service with port 53
    /// in its protocol.
    fn resolve(&self, resolve: &Resolve) -> Result<(), String> {
        self.pod(&resolve.from)?;
        dns::parse_name(&resolve.name)?;
        if resolve.protocol == Protocol::Sctp {
            return Err("DNS is asked over UDP or TCP".to_owned());
        }
        self.dial(&Dial {
            from: resolve.from.clone(),
            service: resolve.server.clone(),
            port: dns::SERVICE_PORT,
            protocol: resolve.protocol,
            via: DialVia::ClusterIp,
            expect: Reachability::Allowed,
            source_port: None,
            attempts: 1,
            answered_only_by: None,
        })
        .map_err(|problem| format!("server {}: {problem}", resolve.server))
    }

    /// A dial's client exists, and its Service exists and has the port (and nodePort).
    fn dial(&self, dial: &Dial) -> Result<(), String> {
        if dial.from != NODE_CLIENT {
            self.endpoint(&dial.from)?;
        }
        if dial.attempts == 0 {
            return Err("attempts must be at least 1".to_owned());
        }
        if dial.source_port.is_some() && dial.protocol != Protocol::Tcp {
            return Err("source_port is for TCP dials".to_owned());
        }
        for pod in dial.answered_only_by.iter().flatten() {
            self.pod(pod)?;
        }
        if let Some(service) = self.services.get(&dial.service) {
            if !self.existing_services.contains(&dial.service) {
                return Err(format!(
                    "service {} does not exist at this step",
                    dial.service
                ));
            }
            if !service
                .ports
                .iter()
                .any(|port| port.port == dial.port && port.protocol == dial.protocol)
            {
                return Err(format!(
                    "service {} has no port {}/{}",
                    dial.service, dial.protocol, dial.port
                ));
            }
            if dial.via == DialVia::NodePort && service.kind != ServiceType::NodePort {
                return Err(format!("service {} is not of type NodePort", dial.service));
            }
            return Ok(());
        }
        let per_pod = self.order.iter().any(|pod| {
            split_pod_key(pod).is_ok_and(|(namespace, name)| {
                dial.service == format!("{namespace}/{}", services::per_pod_name(namespace, name))
            })
        });
        if !(per_pod && self.model.per_pod_services) {
            return Err(format!(
                "no service {} at this step (neither in services nor a per-pod Service)",
                dial.service
            ));
        }
        if dial.via == DialVia::NodePort {
            return Err("per-pod Services are ClusterIP Services: no node port".to_owned());
        }
        Ok(())
    }

    fn grid(&self, rows: &IndexMap<String, String>) -> Result<ExpectedGrid, String> {
        if let Some(unknown) = rows.keys().find(|row| !self.order.contains(row)) {
            return Err(format!(
                "grid row {unknown} is not a pod or external host at this step (expected rows: {})",
                self.order.join(" ")
            ));
        }
        let mut allowed = Vec::with_capacity(self.order.len());
        for endpoint in &self.order {
            let row = rows
                .get(endpoint)
                .ok_or_else(|| format!("grid has no row for {endpoint}"))?;
            let cells: Vec<char> = row.chars().collect();
            if cells.len() != self.order.len() {
                return Err(format!(
                    "grid row {endpoint} has {} columns, the model has {} ({})",
                    cells.len(),
                    self.order.len(),
                    self.order.join(" ")
                ));
            }
            let row = cells
                .into_iter()
                .map(|cell| match cell {
                    '.' => Ok(true),
                    'X' => Ok(false),
                    other => Err(format!(
                        "grid row {endpoint}: {other:?} is neither '.' nor 'X'"
                    )),
                })
                .collect::<Result<Vec<bool>, String>>()?;
            allowed.push(row);
        }
        Ok(ExpectedGrid {
            endpoints: self.order.clone(),
            allowed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str) -> Result<Scenario, ScenarioError> {
        parse(Path::new("test.yaml"), text)
    }

    const SMALL: &str = r#"
format: netwarden-scenario/v1
name: small
model:
  namespaces: { x: {} }
  container_ports: [ { name: http, containerPort: 80, protocol: TCP } ]
  pods:
    x/a: { labels: { app: a } }
    x/b: {}
policies:
  x/deny:
    apiVersion: networking.k8s.io/v1
    kind: NetworkPolicy
    metadata: { name: deny }
    spec: { podSelector: {}, ingress: [ { from: [ { ipBlock: { cidr: "{{cidr x/a 16}}" } } ] } ] }
steps:
"#;

    fn with_steps(steps: &str) -> Result<Scenario, ScenarioError> {
        parse_str(&format!("{SMALL}{steps}"))
    }

    #[test]
    fn default_model_is_upstream() {
        let scenario =
            parse_str("format: netwarden-scenario/v1\nname: n\nsteps:\n- op: probe\n  port: 80\n  protocol: SCTP\n  expect:\n    grid:\n      x/a: ..X......\n      x/b: .........\n      x/c: .........\n      y/a: .........\n      y/b: .........\n      y/c: .........\n      z/a: .........\n      z/b: .........\n      z/c: .........\n").unwrap();
        let model = &scenario.model;
        assert_eq!(
            model.pods.keys().collect::<Vec<_>>(),
            [
                "x/a", "x/b", "x/c", "y/a", "y/b", "y/c", "z/a", "z/b", "z/c"
            ]
        );
        assert_eq!(model.namespaces["y"]["ns"], "y");
        assert_eq!(model.namespaces["y"][NAME_LABEL], "y");
        assert_eq!(model.default_ports.len(), 6);
        assert!(model.default_ports.iter().any(|p| p.name.as_deref() == Some("serve-81-sctp") && p.protocol == Protocol::Sctp));
        assert_eq!(model.ip_families, [IpFamily::IPv4]);
        let Step::Probe { expect, .. } = &scenario.steps[0] else {
            panic!()
        };
        assert!(!expect.allowed[0][2]);
        assert!(expect.allowed[0][1]);
    }

    #[test]
    fn families_only_model_is_upstream_dual_stack() {
        let scenario = parse_str("format: netwarden-scenario/v1\nname: n\nmodel: { ip_families: [IPv6, IPv4] }\nsteps: []\n").unwrap();
        assert_eq!(scenario.model.ip_families, [IpFamily::IPv4, IpFamily::IPv6]);
        assert_eq!(scenario.model.pods.len(), 9);
    }

    #[test]
    fn the_cni_s_shape_is_point_to_point_unless_a_bridge_is_asked_for() {
        let shape = |model: &str| {
            parse_str(&format!(
                "format: netwarden-scenario/v1\nname: n\n{model}steps: []\n"
            ))
            .map(|scenario| scenario.model.cni)
        };
        assert_eq!(shape("").unwrap(), Cni::Ptp);
        assert_eq!(shape("model: { cni: bridge }\n").unwrap(), Cni::Bridge);
        assert_eq!(
            shape("model: { namespaces: { x: {} }, pods: { x/a: {} }, cni: bridge }\n").unwrap(),
            Cni::Bridge
        );
        assert!(shape("model: { cni: flannel }\n").is_err());
    }

    #[test]
    fn explicit_model_adds_name_label() {
        let scenario = with_steps("  []").unwrap();
        assert_eq!(
            scenario.model.namespaces["x"],
            Labels::from([(NAME_LABEL.to_owned(), "x".to_owned())])
        );
        assert_eq!(scenario.policies["x/deny"]["metadata"]["namespace"], "x");
    }

    #[test]
    fn grid_rows_and_columns_must_match_model() {
        let ok = with_steps(
            "- { op: probe, port: 80, protocol: TCP, expect: { grid: { x/a: '.X', x/b: '..' } } }\n",
        );
        assert!(ok.is_ok(), "{ok:?}");
        let short = with_steps(
            "- { op: probe, port: 80, protocol: TCP, expect: { grid: { x/a: '.', x/b: '..' } } }\n",
        );
        let error = short.unwrap_err().to_string();
        assert!(
            error.contains("step 1 (probe)") && error.contains("1 columns"),
            "{error}"
        );
        let missing = with_steps("- { op: probe, port: 80, expect: { grid: { x/a: '..' } } }\n");
        assert!(missing.unwrap_err().to_string().contains("no row for x/b"));
        let unknown = with_steps(
            "- { op: probe, port: 80, expect: { grid: { x/a: '..', x/b: '..', x/c: '..' } } }\n",
        );
        assert!(
            unknown
                .unwrap_err()
                .to_string()
                .contains("x/c is not a pod")
        );
        let bad_char =
            with_steps("- { op: probe, port: 80, expect: { grid: { x/a: '.x', x/b: '..' } } }\n");
        assert!(bad_char.unwrap_err().to_string().contains("neither"));
    }

    #[test]
    fn grid_follows_added_and_deleted_pods() {
        let steps = "
- { op: delete_pod, pod: x/a }
- { op: add_pod, pod: x/c, reuse_ip_of: x/a, publish: false }
- { op: probe, port: 80, expect: { grid: { x/b: '.X', x/c: '..' } } }
- { op: publish_pod, pod: x/c }
";
        let scenario = with_steps(steps).unwrap();
        let Step::Probe { expect, .. } = &scenario.steps[2] else {
            panic!()
        };
        assert_eq!(expect.endpoints, ["x/b", "x/c"]);
        assert!(
            with_steps("- { op: add_pod, pod: x/c, reuse_ip_of: x/a }\n")
                .unwrap_err()
                .to_string()
                .contains("reuse_ip_of")
        );
        assert!(with_steps("- { op: publish_pod, pod: x/a }\n").is_err());
        assert!(
            with_steps("- { op: add_pod, pod: q/c }\n")
                .unwrap_err()
                .to_string()
                .contains("namespace q")
        );
    }

    #[test]
    fn unknown_keys_and_references_are_errors() {
        let error = with_steps("- { op: create_policy, polcy: x/deny }\n")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("test.yaml: step 1 (create_policy)") && error.contains("polcy"),
            "{error}"
        );
        assert!(
            with_steps("- { op: create_policy, policy: x/nope }\n")
                .unwrap_err()
                .to_string()
                .contains("not defined")
        );
        assert!(
            with_steps("- { op: frobnicate }\n")
                .unwrap_err()
                .to_string()
                .contains("frobnicate")
        );
        assert!(
            with_steps("- { op: delete_policy, policy: x/deny }\n")
                .unwrap_err()
                .to_string()
                .contains("does not exist")
        );
        assert!(with_steps("- { op: check_connection, name: c, expect: alive }\n").is_err());
        assert!(
            with_steps("- { op: relabel, pod_labels: { x/z: {} } }\n")
                .unwrap_err()
                .to_string()
                .contains("x/z")
        );
        let top = parse_str("format: netwarden-scenario/v1\nname: n\nsurprise: 1\nsteps: []\n")
            .unwrap_err()
            .to_string();
        assert!(top.contains("surprise"), "{top}");
        let model = parse_str(
            "format: netwarden-scenario/v1\nname: n\nmodel: { pods: { x/a: {} } }\nsteps: []\n",
        );
        assert!(model.unwrap_err().to_string().contains("namespace x"));
        let format = parse_str("format: netwarden-scenario/v2\nname: n\nsteps: []\n")
            .unwrap_err()
            .to_string();
        assert!(format.contains("v2"));
    }

    #[test]
    fn policy_lifecycle_is_checked() {
        let ok = with_steps(
            "- { op: create_policy, policy: x/deny }\n- { op: delete_all_policies, namespaces: [x] }\n- { op: create_policy, policy: x/deny }\n",
        );
        assert!(ok.is_ok(), "{ok:?}");
        let twice = with_steps(
            "- { op: create_policy, policy: x/deny }\n- { op: create_policy, policy: x/deny }\n",
        );
        assert!(twice.unwrap_err().to_string().contains("already exists"));
    }

    #[test]
    fn placeholders_must_name_known_endpoints() {
        let text = SMALL.replace("{{cidr x/a 16}}", "{{ip x/q}}");
        assert!(
            parse_str(&format!("{text}  []"))
                .unwrap_err()
                .to_string()
                .contains("x/q")
        );
        let text = SMALL.replace("{{cidr x/a 16}}", "{{ip6 x/a}}");
        assert!(
            parse_str(&format!("{text}  []"))
                .unwrap_err()
                .to_string()
                .contains("family")
        );
    }

    #[test]
    fn policy_key_must_match_object() {
        let text = SMALL.replace("x/deny:", "x/other:");
        assert!(
            parse_str(&format!("{text}  []"))
                .unwrap_err()
                .to_string()
                .contains("metadata.name")
        );
        let text = SMALL.replace("x/deny:", "x/deny@v2:");
        assert!(parse_str(&format!("{text}  []")).is_ok());
    }

    #[test]
    fn service_keys_alone_keep_the_upstream_model() {
        let scenario = parse_str(
            "format: netwarden-scenario/v1\nname: n\nmodel: { services: per_pod, kube_proxy: nftables, cni: bridge }\nsteps:\n- { op: dial, from: node, service: x/s-x-a, port: 80, protocol: UDP, expect: allowed }\n",
        )
        .unwrap();
        let model = &scenario.model;
        assert_eq!(model.pods.len(), 9);
        assert!(model.per_pod_services);
        assert_eq!(model.kube_proxy, KubeProxyMode::Nftables);
        assert_eq!(model.cni, Cni::Bridge);
        assert!(scenario.uses_services());
        let Step::Dial(dial) = &scenario.steps[0] else {
            panic!()
        };
        assert_eq!(
            (dial.via, dial.protocol),
            (DialVia::ClusterIp, Protocol::Udp)
        );
        let defaults = parse_str("format: netwarden-scenario/v1\nname: n\nsteps: []\n").unwrap();
        assert_eq!(defaults.model.kube_proxy, KubeProxyMode::Iptables);
        assert_eq!(defaults.model.cni, Cni::Ptp);
        assert!(!defaults.uses_services());
    }

    #[test]
    fn via_service_needs_per_pod_services_and_variants_turn_it_on() {
        let probe =
            "- { op: probe, port: 80, via: service, expect: { grid: { x/a: '..', x/b: '..' } } }\n";
        let connection =
            "- { op: open_connection, name: c, from: x/a, to: x/b, port: 80, via: service }\n";
        for steps in [probe, connection] {
            assert!(
                with_steps(steps)
                    .unwrap_err()
                    .to_string()
                    .contains("services: per_pod"),
                "{steps}"
            );
        }
        let plain = with_steps(
            "- { op: probe, port: 80, expect: { grid: { x/a: '..', x/b: '..' } } }\n- { op: open_connection, name: c, from: x/a, to: x/b, port: 80 }\n",
        )
        .unwrap();
        let through = plain.through_services(KubeProxyMode::Nftables);
        assert!(
            through.name.ends_with(" [service-nftables]"),
            "{}",
            through.name
        );
        assert!(through.model.per_pod_services);
        assert_eq!(through.model.kube_proxy, KubeProxyMode::Nftables);
        assert!(matches!(
            through.steps[0],
            Step::Probe {
                via: ProbeVia::Service,
                ..
            }
        ));
        assert!(matches!(
            through.steps[1],
            Step::OpenConnection {
                via: ProbeVia::Service,
                ..
            }
        ));
    }

    #[test]
    fn service_steps_are_checked() {
        let text = SMALL.replace(
            "steps:\n",
            "services:\n  x/web:\n    apiVersion: v1\n    kind: Service\n    metadata: { name: web }\n    spec: { selector: { app: a }, ports: [ { port: 80, targetPort: http } ] }\nsteps:\n",
        );
        let steps = |steps: &str| parse_str(&format!("{text}{steps}"));
        let ok = steps(
            "- { op: create_service, service: x/web }\n- { op: dial, from: x/b, service: x/web, port: 80, expect: blocked }\n- { op: delete_service, service: x/web }\n",
        );
        assert!(ok.is_ok(), "{ok:?}");
        assert!(ok.unwrap().services["x/web"].ports[0].target_port.is_some());
        let before =
            steps("- { op: dial, from: x/b, service: x/web, port: 80, expect: allowed }\n");
        assert!(
            before
                .unwrap_err()
                .to_string()
                .contains("does not exist at this step")
        );
        let wrong_port = steps(
            "- { op: create_service, service: x/web }\n- { op: dial, from: node, service: x/web, port: 81, expect: allowed }\n",
        );
        assert!(
            wrong_port
                .unwrap_err()
                .to_string()
                .contains("no port TCP/81")
        );
        let node_port = steps(
            "- { op: create_service, service: x/web }\n- { op: dial, from: x/a, service: x/web, port: 80, via: node_port, expect: allowed }\n",
        );
        assert!(
            node_port
                .unwrap_err()
                .to_string()
                .contains("not of type NodePort")
        );
        let unknown_client = steps(
            "- { op: create_service, service: x/web }\n- { op: dial, from: x/q, service: x/web, port: 80, expect: allowed }\n",
        );
        assert!(unknown_client.unwrap_err().to_string().contains("x/q"));
        let per_pod =
            steps("- { op: dial, from: x/a, service: x/s-x-b, port: 80, expect: allowed }\n");
        assert!(
            per_pod.unwrap_err().to_string().contains("per-pod"),
            "no per-pod Services in this model"
        );
        assert!(steps("- { op: delete_service, service: x/web }\n").is_err());
        assert!(steps("- { op: create_service, service: x/nope }\n").is_err());
    }

    #[test]
    fn dns_pods_get_the_coredns_ports() {
        let text = SMALL.replace("x/b: {}", "x/b: { dns: true }");
        let scenario = parse_str(&format!("{text}  []")).unwrap();
        let model = &scenario.model;
        assert_eq!(
            model.dns_pods.iter().collect::<Vec<_>>(),
            ["x/b"],
            "only pods that ask"
        );
        let ports = &model.pods["x/b"].ports;
        assert_eq!(
            ports.len(),
            3,
            "the default port and dns, dns-tcp: {ports:?}"
        );
        assert!(ports.iter().any(|port| port.name.as_deref() == Some("dns")
            && port.container_port == 53
            && port.protocol == Protocol::Udp));
        assert!(
            ports
                .iter()
                .any(|port| port.name.as_deref() == Some("dns-tcp")
                    && port.container_port == 53
                    && port.protocol == Protocol::Tcp)
        );
        assert_eq!(model.pods["x/a"].ports.len(), 1);
        let clash = SMALL.replace(
            "x/b: {}",
            "x/b: { dns: true, ports: [ { containerPort: 53, protocol: UDP } ] }",
        );
        assert!(
            parse_str(&format!("{clash}  []"))
                .unwrap_err()
                .to_string()
                .contains("listed twice")
        );
    }

    #[test]
    fn resolve_steps_are_checked() {
        let text = SMALL.replace(
            "steps:\n",
            "services:\n  x/kube-dns:\n    apiVersion: v1\n    kind: Service\n    metadata: { name: kube-dns }\n    spec: { selector: { app: a }, ports: [ { name: dns, port: 53, protocol: UDP }, { name: dns-tcp, port: 53, protocol: TCP } ] }\nsteps:\n- { op: create_service, service: x/kube-dns }\n",
        );
        let steps = |steps: &str| parse_str(&format!("{text}{steps}"));
        let ok = steps(
            "- { op: resolve, from: x/b, name: kube-dns.x.svc.cluster.local, server: x/kube-dns, expect: 10.96.0.10 }\n- { op: resolve, from: x/b, name: a.x.svc.cluster.local., server: x/kube-dns, protocol: TCP, expect: nxdomain }\n- { op: resolve, from: x/a, name: b, server: x/kube-dns, expect: 'fd00::1' }\n",
        )
        .unwrap();
        let Step::Resolve(resolve) = &ok.steps[1] else {
            panic!()
        };
        assert_eq!(resolve.protocol, Protocol::Udp, "UDP by default");
        assert_eq!(
            resolve.expect,
            ResolveExpectation::Address("10.96.0.10".parse().unwrap())
        );
        let Step::Resolve(resolve) = &ok.steps[2] else {
            panic!()
        };
        assert_eq!(resolve.expect, ResolveExpectation::NxDomain);
        let default_server =
            steps("- { op: resolve, from: x/b, name: a.x.svc.cluster.local, expect: blocked }\n")
                .unwrap_err()
                .to_string();
        assert!(
            default_server.contains("kube-system/kube-dns"),
            "{default_server}"
        );
        let bad_expect =
            steps("- { op: resolve, from: x/b, name: a, server: x/kube-dns, expect: answered }\n");
        assert!(bad_expect.unwrap_err().to_string().contains("neither"));
        let sctp = steps(
            "- { op: resolve, from: x/b, name: a, server: x/kube-dns, protocol: SCTP, expect: blocked }\n",
        );
        assert!(sctp.unwrap_err().to_string().contains("UDP or TCP"));
        let bad_name = steps(
            "- { op: resolve, from: x/b, name: 'a..b', server: x/kube-dns, expect: blocked }\n",
        );
        assert!(bad_name.unwrap_err().to_string().contains("not a DNS name"));
        let unknown =
            steps("- { op: resolve, from: x/q, name: a, server: x/kube-dns, expect: blocked }\n");
        assert!(unknown.unwrap_err().to_string().contains("x/q"));
    }

    #[test]
    fn policy_files_join_policies() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("policies.yaml"),
            "apiVersion: v1\nkind: Namespace\nmetadata: { name: x }\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: { name: extra, namespace: x }\nspec: { podSelector: {} }\n",
        )
        .unwrap();
        let text = format!(
            "{}policy_files: [policies.yaml]\nsteps:\n- {{ op: create_policy, policy: x/extra }}\n",
            SMALL.trim_end().trim_end_matches("steps:")
        );
        let scenario = parse(&dir.path().join("s.yaml"), &text).unwrap();
        assert!(scenario.policies.contains_key("x/extra"));
    }

    /// `SMALL` with extra `policies` entries (indented as keys under `policies:`) and steps.
    fn with_policies(policies: &str, steps: &str) -> Result<Scenario, ScenarioError> {
        let (head, _) = SMALL.split_once("policies:\n").unwrap();
        let (_, tail) = SMALL.split_once("policies:\n").unwrap();
        parse_str(&format!("{head}policies:\n{policies}{tail}{steps}"))
    }

    const ADMIN: &str = r#"  admin-deny:
    apiVersion: policy.networking.k8s.io/v1alpha2
    kind: ClusterNetworkPolicy
    metadata: { name: admin-deny }
    spec:
      tier: Admin
      priority: 3
      subject: { namespaces: {} }
      egress:
        - { action: Deny, to: [ { networks: [ "{{cidr x/b 32}}" ] } ] }
  admin-deny@v2:
    apiVersion: policy.networking.k8s.io/v1alpha2
    kind: ClusterNetworkPolicy
    metadata: { name: admin-deny }
    spec: { tier: Admin, priority: 4, subject: { namespaces: {} } }
"#;

    #[test]
    fn cluster_network_policies_have_keys_without_a_namespace() {
        let scenario = with_policies(
            ADMIN,
            "- { op: create_policy, policy: admin-deny }\n- { op: delete_all_policies, namespaces: [x] }\n- { op: update_policy, policy: admin-deny@v2 }\n- { op: delete_policy, policy: admin-deny }\n- { op: create_policy, policy: admin-deny@v2 }\n",
        )
        .unwrap();
        let object = &scenario.policies["admin-deny"];
        assert_eq!(object["kind"], "ClusterNetworkPolicy");
        assert!(
            object["metadata"].get("namespace").is_none(),
            "no namespace is filled in for a cluster-scoped object"
        );
        assert_eq!(
            PolicyName::of("admin-deny@v2"),
            PolicyName::Cluster { name: "admin-deny" }
        );
        assert_eq!(
            PolicyName::of("x/deny@v2"),
            PolicyName::Namespaced {
                namespace: "x",
                name: "deny"
            }
        );
        // delete_all_policies leaves cluster-scoped policies in place.
        let again = with_policies(
            ADMIN,
            "- { op: create_policy, policy: admin-deny }\n- { op: delete_all_policies, namespaces: [x] }\n- { op: create_policy, policy: admin-deny@v2 }\n",
        );
        assert!(again.unwrap_err().to_string().contains("already exists"));
    }

    #[test]
    fn cluster_network_policies_are_checked_against_their_keys() {
        let cnp = |key: &str, body: &str| {
            with_policies(
                &format!("  {key}:\n    apiVersion: policy.networking.k8s.io/v1alpha2\n    kind: ClusterNetworkPolicy\n{body}"),
                "",
            )
            .unwrap_err()
            .to_string()
        };
        let spec = "    spec: { tier: Admin, priority: 1, subject: { namespaces: {} } }\n";
        assert!(
            cnp(
                "x/admin",
                &format!("    metadata: {{ name: admin }}\n{spec}")
            )
            .contains("expected NetworkPolicy")
        );
        assert!(
            cnp("admin", &format!("    metadata: {{ name: other }}\n{spec}"))
                .contains("the key says \"admin\"")
        );
        assert!(
            cnp(
                "admin",
                &format!("    metadata: {{ name: admin, namespace: x }}\n{spec}")
            )
            .contains("cluster-scoped")
        );
        assert!(
            cnp(
                "admin",
                "    metadata: { name: admin }\n    spec: { tier: Developer, priority: 1, subject: {} }\n"
            )
            .contains("spec.tier")
        );
        assert!(
            cnp(
                "admin",
                "    metadata: { name: admin }\n    spec: { tier: Admin, priority: high, subject: {} }\n"
            )
            .contains("spec.priority")
        );
        let wrong_version = with_policies(
            &format!(
                "  admin:\n    apiVersion: policy.networking.k8s.io/v1alpha1\n    kind: ClusterNetworkPolicy\n    metadata: {{ name: admin }}\n{spec}"
            ),
            "",
        );
        assert!(
            wrong_version
                .unwrap_err()
                .to_string()
                .contains("apiVersion")
        );
        let network_policy_without_namespace = with_policies(
            "  deny:\n    apiVersion: networking.k8s.io/v1\n    kind: NetworkPolicy\n    metadata: { name: deny }\n    spec: { podSelector: {} }\n",
            "",
        );
        assert!(
            network_policy_without_namespace
                .unwrap_err()
                .to_string()
                .contains("expected ClusterNetworkPolicy")
        );
        // Placeholders in a cluster-scoped policy name pods of the scenario.
        let unknown_pod = with_policies(
            "  admin:\n    apiVersion: policy.networking.k8s.io/v1alpha2\n    kind: ClusterNetworkPolicy\n    metadata: { name: admin }\n    spec:\n      tier: Baseline\n      priority: 1\n      subject: { namespaces: {} }\n      egress: [ { action: Deny, to: [ { networks: [ \"{{cidr x/q 32}}\" ] } ] } ]\n",
            "",
        );
        assert!(unknown_pod.unwrap_err().to_string().contains("x/q"));
    }

    #[test]
    fn observe_expects_the_cells_blocked_since_the_previous_observe_or_restart() {
        let scenario = with_steps(
            "- { op: probe, port: 80, expect: { grid: { x/a: '.X', x/b: '..' } } }\n\
             - { op: probe, port: 81, protocol: UDP, expect: { grid: { x/a: '.X', x/b: 'X.' } } }\n\
             - { op: probe, port: 80, expect: { grid: { x/a: '.X', x/b: '..' } } }\n\
             - { op: observe, port: 80, expect_policy: x/deny }\n\
             - { op: observe, verdict: audit, flows: [ { from: x/a, to: x/b, port: 80 } ] }\n\
             - { op: probe, port: 80, expect: { grid: { x/a: '..', x/b: 'X.' } } }\n\
             - { op: observe }\n\
             - { op: probe, port: 80, expect: { grid: { x/a: '..', x/b: 'X.' } } }\n\
             - { op: restart_agent, mode: graceful }\n\
             - { op: probe, port: 80, expect: { grid: { x/a: '.X', x/b: '..' } } }\n\
             - { op: observe, absent: [ { from: x/b, to: x/a, port: 80 } ] }\n",
        )
        .unwrap();
        let observe = |index: usize| {
            let Step::Observe(observe) = &scenario.steps[index] else {
                panic!("step {index} is {}", scenario.steps[index])
            };
            observe
        };
        let expected = |index: usize| {
            observe(index)
                .expect
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
        };
        // Port 80 only, once however many probes blocked it; the UDP cells, not selected, went
        // out of the window with it.
        assert_eq!(expected(3), ["x/a -> x/b TCP/80"]);
        assert!(!observe(3).listed);
        assert_eq!(observe(3).expect_policy.as_deref(), Some("x/deny"));
        assert!(observe(4).listed);
        // An audit observe does not end the window of denies.
        assert_eq!(expected(6), ["x/b -> x/a TCP/80"]);
        // The restart emptied the agent's ring: only the probe after it counts.
        assert_eq!(expected(10), ["x/a -> x/b TCP/80"]);
        assert_eq!(
            scenario.steps[10].to_string(),
            "observe deny flows: 1 blocked in the probes since the previous observe, 1 absent"
        );
    }

    #[test]
    fn an_observe_step_that_checks_nothing_or_what_the_harness_cannot_judge_is_an_error() {
        let blocked = "- { op: probe, port: 80, expect: { grid: { x/a: '.X', x/b: '..' } } }\n";
        let problem = |step: &str| {
            with_steps(&format!("{blocked}{step}"))
                .unwrap_err()
                .to_string()
        };
        for (step, expected) in [
            (
                "- { op: observe, port: 81 }",
                "no probe since the previous observe",
            ),
            (
                "- { op: observe, verdict: audit }",
                "verdict audit: list `flows`",
            ),
            (
                "- { op: observe, direction: ingress }",
                "with `direction` or `policy`, list `flows`",
            ),
            (
                "- { op: observe, policy: x/deny }",
                "with `direction` or `policy`, list `flows`",
            ),
            (
                "- { op: observe, namespace: q }",
                "namespace q is not in the model",
            ),
            (
                "- { op: observe, flows: [ { from: x/a, to: x/c, port: 80 } ] }",
                "no pod or external host x/c",
            ),
            (
                "- { op: observe, flows: [ { from: x/a, to: x/a, port: 80 } ] }",
                "a pod to itself",
            ),
            (
                "- { op: observe, port: 81, flows: [ { from: x/a, to: x/b, port: 80 } ] }",
                "do not select x/a -> x/b TCP/80",
            ),
            (
                "- { op: observe, absent: [ { from: x/a, to: x/b, port: 80 } ] }",
                "both expected and absent",
            ),
            ("- { op: observe, colour: red }", "unknown field `colour`"),
        ] {
            let error = problem(step);
            assert!(error.contains(expected), "{step}: {error}");
            assert!(error.contains("step 2 (observe)"), "{step}: {error}");
        }
        // Listed flows need no probe, and may be audited flows.
        let listed = with_steps(
            "- { op: observe, verdict: audit, direction: ingress, policy: deny, flows: [ { from: x/a, to: x/b, port: 80 } ] }\n",
        )
        .unwrap();
        let Step::Observe(observe) = &listed.steps[0] else {
            panic!()
        };
        assert!(observe.listed);
        assert_eq!(
            observe.filter.args().join(" "),
            "--verdict audit --direction ingress --policy deny"
        );
    }

    #[test]
    fn an_explain_step_names_existing_ends_and_one_destination() {
        let explain =
            with_steps("- { op: explain, from: x/a, to: x/b, port: 80, expect: denied }\n")
                .unwrap();
        assert_eq!(
            explain.steps[0].to_string(),
            "explain x/a -> x/b TCP/80 (expect denied)"
        );
        for (step, expected) in [
            (
                "{ op: explain, from: x/a, to: x/c, port: 80, expect: denied }",
                "no pod or external host x/c",
            ),
            (
                "{ op: explain, from: x/a, port: 80, expect: denied }",
                "give `to`",
            ),
            (
                "{ op: explain, from: x/a, to: x/b, service: x/s, port: 80, expect: denied }",
                "give `to`",
            ),
            (
                "{ op: explain, from: x/a, service: x/s, port: 80, expect: denied }",
                "no service x/s",
            ),
            (
                "{ op: explain, from: x/a, to: x/b, port: 80, expect: maybe }",
                "unknown variant `maybe`",
            ),
        ] {
            let error = with_steps(&format!("- {step}\n")).unwrap_err().to_string();
            assert!(error.contains(expected), "{step}: {error}");
        }
    }

    /// The demo's observe step expects every cell its grids block after the example policies.
    #[test]
    fn the_demo_observes_every_flow_the_example_policies_block() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios/demo/three-tier.yaml");
        let scenario = load(&path).unwrap_or_else(|error| panic!("{error}"));
        let observe = scenario
            .steps
            .iter()
            .find_map(|step| match step {
                Step::Observe(observe) => Some(observe),
                _ => None,
            })
            .expect("the demo has an observe step");
        let blocked_after_policies: usize = scenario
            .steps
            .iter()
            .filter_map(|step| match step {
                Step::Probe { expect, .. } => Some(expect),
                _ => None,
            })
            .skip(2)
            .map(|grid| {
                grid.allowed
                    .iter()
                    .flatten()
                    .filter(|allowed| !**allowed)
                    .count()
            })
            .sum();
        assert!(blocked_after_policies > 0);
        assert_eq!(observe.expect.len(), blocked_after_policies);
    }

    /// Every scenario of `tests/scenarios/cluster-policy` (the network-policy-api conformance
    /// suite) parses and validates, although `cargo xtask test` does not run them yet.
    #[test]
    fn cluster_policy_scenarios_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios/cluster-policy");
        let mut parsed = 0;
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|extension| extension != "yaml") {
                continue;
            }
            let text = fs::read_to_string(&path).unwrap();
            if !looks_like_scenario(&text) {
                continue;
            }
            let scenario = load(&path).unwrap_or_else(|error| panic!("{error}"));
            assert!(
                scenario
                    .policies
                    .values()
                    .any(|object| object["kind"] == "ClusterNetworkPolicy"),
                "{} holds no ClusterNetworkPolicy",
                path.display()
            );
            parsed += 1;
        }
        assert!(parsed > 0, "no scenario in {}", dir.display());
    }
}
