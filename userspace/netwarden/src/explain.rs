//! `netwarden explain`: which policy rule allows a flow, or which policies isolate it; for a
//! flow to a Service, the same for the flow to each of its backends.
//!
//! One implementation, [`explain`], on a cluster snapshot from any of three places: a
//! directory of manifests (offline), a running agent's applied state (`--agent`: the agent
//! runs [`explain`] on it and sends the result back), or the cluster's API objects
//! (`--kubeconfig`, listed the way the agent's Kubernetes source lists them).

use std::{net::IpAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use netwarden_identity::{Connection, TrustDomain, acceptable_principals, decide::decide};
use netwarden_model::{Cluster, ManifestDir, Protocol, ServiceRef};
use netwarden_policy::evaluate::{self, Flow, ServiceFlowError, SideVerdict};
use serde::{Deserialize, Serialize};

use crate::observe::client::AgentAddress;

/// How `explain` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// The lines, for people.
    Text,
    /// One JSON object: `allowed` and the same `lines`.
    Json,
}

/// `netwarden explain`.
#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("state").required(true).args(["manifests", "agent", "kubeconfig"])))]
pub struct ExplainOptions {
    /// Explain on a directory of manifests (Namespaces, Pods, NetworkPolicies, Services,
    /// EndpointSlices) describing the cluster.
    #[arg(long)]
    pub manifests: Option<PathBuf>,
    /// Explain on what a running agent applied last: its observe endpoint, a Unix socket
    /// (`/run/netwarden/observe.sock`) or a TCP address. The agent's node addresses and trust
    /// domain are used; `--node-address` and `--trust-domain` are not.
    #[arg(long)]
    pub agent: Option<AgentAddress>,
    /// Explain on the cluster's API objects, listed through this kubeconfig (its current
    /// context) with the agent's own rules for invalid objects.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// The client: `namespace/pod` or an IP address.
    #[arg(long)]
    pub from: String,
    /// The server: `namespace/pod` or an IP address.
    #[arg(
        long,
        required_unless_present = "to_service",
        conflicts_with = "to_service"
    )]
    pub to: Option<String>,
    /// A Service, `namespace/name`: the flow is judged at each of its ready backends, as
    /// kube-proxy translates it.
    #[arg(long, value_name = "NAMESPACE/NAME")]
    pub to_service: Option<String>,
    /// Destination port (with `--to-service`, the Service port).
    #[arg(long)]
    pub port: u16,
    /// TCP, UDP or SCTP.
    #[arg(long, default_value = "TCP")]
    pub protocol: String,
    /// Addresses of the destination's node (traffic from them is always allowed).
    #[arg(long = "node-address")]
    pub node_addresses: Vec<IpAddr>,
    /// The SPIFFE trust domain of workload identities (for mTLS-strict destinations).
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
    /// `text` or `json`.
    #[arg(long, short = 'o', value_enum, default_value = "text")]
    pub output: Output,
}

/// The flow to explain, as the CLI sends it to an agent (`POST /v1/explain`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExplainQuery {
    /// The client: `namespace/pod` or an IP address.
    pub from: String,
    /// The server: `namespace/pod` or an IP address (or `to_service`).
    pub to: Option<String>,
    /// A Service, `namespace/name`.
    pub to_service: Option<String>,
    /// The destination port (the Service port with `to_service`).
    pub port: u16,
    /// `TCP`, `UDP` or `SCTP`.
    pub protocol: String,
}

/// The verdict on a flow and the reasons, as printed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explanation {
    /// The flow is allowed (to a Service: to at least one of its backends).
    pub allowed: bool,
    /// The explanation, as `--output text` prints it: the verdict first, then one line per
    /// side and rule, indented.
    pub lines: Vec<String>,
}

/// Why a flow cannot be explained.
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    /// `--protocol` is not one a NetworkPolicy names.
    #[error("--protocol {0:?}: expected TCP, UDP or SCTP")]
    Protocol(String),
    /// A pod argument is neither an address nor `namespace/pod`.
    #[error("{0:?} is neither an IP address nor namespace/pod")]
    NotAnEndpoint(String),
    /// No such pod.
    #[error("no Pod {0} in the cluster snapshot")]
    NoPod(String),
    /// The pod has no address (of the client's family).
    #[error("Pod {0} has no IP address (of the same family)")]
    NoAddress(String),
    /// `--to-service` is not `namespace/name`.
    #[error("--to-service {0:?}: expected namespace/name")]
    ServiceName(String),
    /// Neither `to` nor `to_service`.
    #[error("--to or --to-service is required")]
    NoDestination,
    /// The Service cannot take the flow.
    #[error(transparent)]
    Service(#[from] ServiceFlowError),
}

/// How long `--kubeconfig` waits for the first complete list of every kind.
const LIST_TIMEOUT: Duration = Duration::from_secs(30);

/// Prints the verdict and the rules behind it.
pub fn run(options: &ExplainOptions) -> anyhow::Result<()> {
    let query = ExplainQuery {
        from: options.from.clone(),
        to: options.to.clone(),
        to_service: options.to_service.clone(),
        port: options.port,
        protocol: options.protocol.clone(),
    };
    let explanation = if let Some(agent) = &options.agent {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            let connection = agent.connect().await?;
            crate::observe::client::explain(connection, &query).await
        })?
    } else {
        let cluster = match (&options.manifests, &options.kubeconfig) {
            (Some(dir), _) => cluster_of_manifests(dir)?,
            (None, Some(kubeconfig)) => cluster_of_api(kubeconfig)?,
            (None, None) => anyhow::bail!("--manifests, --agent or --kubeconfig is required"),
        };
        let trust_domain = TrustDomain::new(&options.trust_domain).context("--trust-domain")?;
        explain(&cluster, &options.node_addresses, &trust_domain, &query)?
    };
    match options.output {
        Output::Text => {
            for line in &explanation.lines {
                println!("{line}");
            }
        }
        Output::Json => println!("{}", serde_json::to_string_pretty(&explanation)?),
    }
    Ok(())
}

/// The snapshot of a manifest directory; its problems are printed as warnings.
fn cluster_of_manifests(dir: &std::path::Path) -> anyhow::Result<Cluster> {
    let mut source = ManifestDir::new(dir);
    source
        .refresh()
        .with_context(|| format!("reading {}", dir.display()))?;
    let (cluster, errors) = source.cluster();
    for error in &errors {
        eprintln!("warning: {error}");
    }
    for problem in cluster.annotation_problems() {
        eprintln!("warning: {problem}");
    }
    Ok(cluster)
}

/// The snapshot of the cluster's API objects, listed by the agent's own Kubernetes source (so
/// invalid objects are handled as the agent handles them); problems are printed as warnings.
fn cluster_of_api(kubeconfig: &std::path::Path) -> anyhow::Result<Cluster> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let client = netwarden_kube::client(Some(kubeconfig))
            .await
            .context("connecting to the Kubernetes API")?;
        let mut source = netwarden_kube::KubeSource::start(client);
        listed_cluster(&mut source, LIST_TIMEOUT).await
    })
}

/// Waits until `source` has listed every kind, then takes its snapshot.
async fn listed_cluster(
    source: &mut netwarden_kube::KubeSource,
    timeout: Duration,
) -> anyhow::Result<Cluster> {
    if tokio::time::timeout(timeout, source.synced())
        .await
        .is_err()
    {
        let (_, errors) = source.cluster();
        let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
        anyhow::bail!(
            "the API objects were not all listed within {} s: {}",
            timeout.as_secs(),
            errors.join("; ")
        );
    }
    let (cluster, errors) = source.cluster();
    for error in &errors {
        eprintln!("warning: {error}");
    }
    for problem in cluster.annotation_problems() {
        eprintln!("warning: {problem}");
    }
    Ok(cluster)
}

/// The verdict on `query` in `cluster` and the rules behind it: what every form of
/// `netwarden explain` prints, and what a running agent answers on its applied state.
pub fn explain(
    cluster: &Cluster,
    node_addresses: &[IpAddr],
    trust_domain: &TrustDomain,
    query: &ExplainQuery,
) -> Result<Explanation, ExplainError> {
    let protocol = Protocol::from_api(&query.protocol.to_ascii_uppercase())
        .ok_or_else(|| ExplainError::Protocol(query.protocol.clone()))?;
    let source_ip = address(cluster, &query.from, None)?;
    if let Some(service) = &query.to_service {
        let (namespace, name) = service
            .split_once('/')
            .ok_or_else(|| ExplainError::ServiceName(service.clone()))?;
        let service = ServiceRef {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        };
        let (allowed, lines) = service_lines(
            cluster,
            node_addresses,
            trust_domain,
            source_ip,
            &service,
            query.port,
            protocol,
        )?;
        return Ok(Explanation { allowed, lines });
    }
    let to = query.to.as_deref().ok_or(ExplainError::NoDestination)?;
    let destination_ip = address(cluster, to, Some(source_ip))?;
    let flow = Flow {
        source: source_ip,
        destination: destination_ip,
        protocol: protocol.number(),
        port: query.port,
    };
    let verdict = evaluate::evaluate(cluster, node_addresses, &flow);
    let allowed = verdict.allowed();
    let mut lines = vec![format!(
        "{protocol} {} -> {} port {}: {}",
        describe(cluster, source_ip),
        describe(cluster, destination_ip),
        query.port,
        if allowed { "ALLOWED" } else { "DENIED" }
    )];
    lines.extend(
        verdict_lines(
            cluster,
            &verdict,
            source_ip,
            destination_ip,
            query.port,
            protocol,
        )
        .into_iter()
        .map(|line| format!("  {line}")),
    );
    lines.extend(mtls_lines(
        cluster,
        node_addresses,
        trust_domain,
        flow,
        allowed,
    ));
    Ok(Explanation { allowed, lines })
}

/// What a flow to port `port` of `service` meets at each of its ready backends: the flow
/// kube-proxy translates it to, with the verdict and rules of both sides, and what an
/// mTLS-strict backend adds.
fn service_lines(
    cluster: &Cluster,
    node_addresses: &[IpAddr],
    trust_domain: &TrustDomain,
    client: IpAddr,
    service: &ServiceRef,
    port: u16,
    protocol: Protocol,
) -> Result<(bool, Vec<String>), ServiceFlowError> {
    let resolved =
        evaluate::service_flow(cluster, node_addresses, client, service, port, protocol)?;
    let port_name = resolved
        .port
        .name
        .as_ref()
        .map(|name| format!(" ({name})"))
        .unwrap_or_default();
    let head = format!(
        "{protocol} {} -> Service {service} port {port}{port_name}",
        describe(cluster, client)
    );
    if resolved.backends.is_empty() {
        return Ok((
            false,
            vec![format!(
                "{head}: no ready backend of the client's address family; kube-proxy has nowhere to send it"
            )],
        ));
    }
    let allowed = resolved
        .backends
        .iter()
        .filter(|backend| backend.verdict.allowed())
        .count();
    let mut lines = vec![format!(
        "{head}: ALLOWED to {allowed} of {} backends",
        resolved.backends.len()
    )];
    for backend in &resolved.backends {
        let who = backend.pod.as_ref().map_or_else(
            || backend.address.to_string(),
            |pod| format!("{pod} ({})", backend.address),
        );
        lines.push(format!(
            "  backend {who} port {}, from {}: {}",
            backend.port,
            backend.origin,
            if backend.verdict.allowed() {
                "ALLOWED"
            } else {
                "DENIED"
            }
        ));
        lines.extend(
            verdict_lines(
                cluster,
                &backend.verdict,
                client,
                backend.address,
                backend.port,
                protocol,
            )
            .into_iter()
            .map(|line| format!("    {line}")),
        );
        let flow = Flow {
            source: client,
            destination: backend.address,
            protocol: protocol.number(),
            port: backend.port,
        };
        lines.extend(
            mtls_lines(
                cluster,
                node_addresses,
                trust_domain,
                flow,
                backend.verdict.allowed(),
            )
            .into_iter()
            .map(|line| format!("  {line}")),
        );
    }
    Ok((allowed > 0, lines))
}

/// The lines of both sides of a verdict on the flow from `source` to `destination:port`.
pub(crate) fn verdict_lines(
    cluster: &Cluster,
    verdict: &evaluate::Verdict,
    source: IpAddr,
    destination: IpAddr,
    port: u16,
    protocol: Protocol,
) -> Vec<String> {
    let mut lines = side_lines(
        "egress of",
        cluster,
        source,
        &verdict.egress,
        &format!("to {} port {port}", describe(cluster, destination)),
        protocol,
    );
    lines.extend(side_lines(
        "ingress of",
        cluster,
        destination,
        &verdict.ingress,
        &format!("from {} to port {port}", describe(cluster, source)),
        protocol,
    ));
    // Where a ClusterNetworkPolicy rule matched, what each tier said (the deciding tier hides
    // the others), and the ties netwarden broke by name where upstream leaves them undefined.
    for (label, tiers) in [
        ("egress tiers", &verdict.egress_tiers),
        ("ingress tiers", &verdict.ingress_tiers),
    ] {
        let Some(tiers) = tiers else { continue };
        if tiers.admin.rule().is_none() && tiers.baseline.rule().is_none() {
            continue;
        }
        lines.push(format!("{label}: {tiers}"));
        for (rule, tie) in tiers.ties() {
            lines.push(format!(
                "warning: {rule} and {tie} have the same priority and both match; {} decides (the first by name; upstream leaves it undefined)",
                rule.policy
            ));
        }
    }
    lines
}

/// For an mTLS-strict destination: what the kernel's screen and the identity check add to the
/// L4 verdict, and which principals the identity check would accept; none when the destination
/// is not mTLS-strict.
fn mtls_lines(
    cluster: &Cluster,
    node_addresses: &[IpAddr],
    trust_domain: &TrustDomain,
    flow: Flow,
    l4_allowed: bool,
) -> Vec<String> {
    let mut lines = Vec::new();
    let Some(destination) = evaluate::pod_at(cluster, flow.destination) else {
        return lines;
    };
    if !cluster.is_mtls_strict(destination) {
        return lines;
    }
    let l4 = if l4_allowed { "allowed" } else { "DENIED" };
    lines.push(format!(
        "  {} is mTLS-strict; L4 verdict: {l4}",
        destination.id
    ));
    if flow.protocol != Protocol::Tcp.number() {
        lines.push(
            "    not TCP: the kernel does not screen it and no proxy can check an identity (NetworkPolicy alone decides)"
                .to_owned(),
        );
        return lines;
    }
    if destination.mtls.exempt_ports.contains(&flow.port) {
        lines.push(format!(
            "    port {} is exempt (netwarden.dev/mtls-exempt-ports): plaintext is accepted, no identity check",
            flow.port
        ));
        return lines;
    }
    lines.push(
        "    kernel: the client's first payload must be a TLS ClientHello, or the flow is cut"
            .to_owned(),
    );
    if let Some(allowed) = &destination.mtls.allowed_principals {
        lines.push(format!(
            "    netwarden.dev/allowed-principals: {}",
            allowed.join(", ")
        ));
    }
    let accepted = acceptable_principals(
        cluster,
        node_addresses,
        trust_domain,
        flow.destination,
        flow.port,
    );
    if accepted.is_empty() {
        lines.push("    identity check: accepts no principal on this port".to_owned());
    }
    for (principal, pods) in &accepted {
        let pods: Vec<String> = pods.iter().map(ToString::to_string).collect();
        lines.push(format!(
            "    identity check accepts {principal}, from the address of {}",
            pods.join(", ")
        ));
    }
    if let Some(source) = evaluate::pod_at(cluster, flow.source) {
        let principal = trust_domain.spiffe_id_of(source);
        let decision = decide(
            cluster,
            node_addresses,
            trust_domain,
            &Connection {
                source: flow.source,
                destination: flow.destination,
                port: flow.port,
                principal: Some(principal.clone()),
            },
        );
        lines.push(format!(
            "    {} presenting {principal}: {decision}",
            source.id
        ));
    }
    lines
}

/// What one side's verdict says, one line per rule that allows the flow.
fn side_lines(
    label: &str,
    cluster: &Cluster,
    address: IpAddr,
    verdict: &SideVerdict,
    flow: &str,
    protocol: Protocol,
) -> Vec<String> {
    let who = describe(cluster, address);
    match verdict {
        SideVerdict::NotAPod => vec![format!("{label} {who}: not a pod, no policy of its own")],
        SideVerdict::FromNode => vec![format!(
            "{label} {who}: allowed, traffic from the node is always allowed"
        )],
        SideVerdict::NotIsolated => vec![format!(
            "{label} {who}: allowed, no NetworkPolicy isolates it in this direction"
        )],
        SideVerdict::Allowed(rules) => rules
            .iter()
            .map(|rule| format!("{label} {who}: allowed by {rule}"))
            .collect(),
        SideVerdict::ClusterAccepted(rule) => vec![format!("{label} {who}: allowed by {rule}")],
        SideVerdict::ClusterDenied(rule) => vec![format!(
            "{label} {who}: DENIED by {rule}; no later rule of any tier is consulted"
        )],
        SideVerdict::Denied(policies) | SideVerdict::Audited(policies) => {
            let names: Vec<String> = policies
                .iter()
                .map(|policy| format!("NetworkPolicy {policy}"))
                .collect();
            let verdict = if matches!(verdict, SideVerdict::Audited(_)) {
                "AUDIT (passes; enforcing would deny it), isolated in audit mode by"
            } else {
                "DENIED, isolated by"
            };
            vec![format!(
                "{label} {who}: {verdict} {}; no rule allows {protocol} {flow}",
                names.join(", ")
            )]
        }
    }
}

fn address(
    cluster: &Cluster,
    text: &str,
    same_family_as: Option<IpAddr>,
) -> Result<IpAddr, ExplainError> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok(ip);
    }
    let Some((namespace, name)) = text.split_once('/') else {
        return Err(ExplainError::NotAnEndpoint(text.to_owned()));
    };
    let pod = cluster
        .pods
        .values()
        .find(|pod| pod.id.namespace == namespace && pod.id.name == name)
        .ok_or_else(|| ExplainError::NoPod(text.to_owned()))?;
    let family = |ip: &&IpAddr| same_family_as.is_none_or(|other| other.is_ipv4() == ip.is_ipv4());
    pod.ips
        .iter()
        .find(family)
        .copied()
        .ok_or_else(|| ExplainError::NoAddress(text.to_owned()))
}

fn describe(cluster: &Cluster, address: IpAddr) -> String {
    match evaluate::pod_at(cluster, address) {
        Some(pod) => format!("{} ({address})", pod.id),
        None => address.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use netwarden_identity::TrustDomain;
    use netwarden_policy::evaluate::Flow;

    use super::{mtls_lines, service_lines};

    const CLUSTER: &str = r"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {netwarden.dev/mtls: strict}}
---
apiVersion: v1
kind: Pod
metadata:
  name: api
  namespace: shop
  labels: {app: api}
  annotations: {netwarden.dev/mtls-exempt-ports: '9090', netwarden.dev/allowed-principals: 'spiffe://cluster.local/ns/web/sa/*'}
spec: {nodeName: n1, serviceAccountName: api, containers: [{name: c}]}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: frontend, namespace: web, labels: {app: frontend}}
spec: {nodeName: n1, serviceAccountName: frontend, containers: [{name: c}]}
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: job, namespace: batch, labels: {app: job}}
spec: {nodeName: n1, containers: [{name: c}]}
status: {podIP: 10.0.0.3}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: api, namespace: shop}
spec:
  podSelector: {matchLabels: {app: api}}
  ingress:
  - from: [{namespaceSelector: {}}]
    ports: [{port: 8443}, {port: 9090}]
";

    fn lines(source: &str, port: u16, protocol: u8) -> Vec<String> {
        let (cluster, errors) = netwarden_model::cluster_of_stream("cluster.yaml", CLUSTER);
        assert!(errors.is_empty(), "{errors:?}");
        mtls_lines(
            &cluster,
            &[],
            &TrustDomain::default(),
            Flow {
                source: source.parse().unwrap(),
                destination: "10.0.0.1".parse().unwrap(),
                protocol,
                port,
            },
            true,
        )
    }

    #[test]
    fn a_strict_destination_shows_the_screen_and_the_principals_the_check_accepts() {
        assert_eq!(
            lines("10.0.0.3", 8443, 6),
            [
                "  shop/api is mTLS-strict; L4 verdict: allowed",
                "    kernel: the client's first payload must be a TLS ClientHello, or the flow is cut",
                "    netwarden.dev/allowed-principals: spiffe://cluster.local/ns/web/sa/*",
                "    identity check accepts spiffe://cluster.local/ns/web/sa/frontend, from the address of web/frontend",
                "    batch/job presenting spiffe://cluster.local/ns/batch/sa/default: denied: principal spiffe://cluster.local/ns/batch/sa/default is not in the allowed principals of shop/api (spiffe://cluster.local/ns/web/sa/*)",
            ]
        );
    }

    #[test]
    fn exempt_ports_udp_and_lax_destinations_say_so() {
        assert_eq!(
            lines("10.0.0.2", 9090, 6)[1],
            "    port 9090 is exempt (netwarden.dev/mtls-exempt-ports): plaintext is accepted, no identity check"
        );
        assert!(lines("10.0.0.2", 53, 17)[1].starts_with("    not TCP"));
        let (cluster, errors) = netwarden_model::cluster_of_stream("cluster.yaml", CLUSTER);
        assert!(errors.is_empty(), "{errors:?}");
        let towards_a_lax_pod = mtls_lines(
            &cluster,
            &[],
            &TrustDomain::default(),
            Flow {
                source: "10.0.0.1".parse().unwrap(),
                destination: "10.0.0.2".parse().unwrap(),
                protocol: 6,
                port: 8443,
            },
            true,
        );
        assert!(towards_a_lax_pod.is_empty());
    }

    const SERVICE_CLUSTER: &str = r"
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: x, labels: {app: web, track: stable}}
spec: {nodeName: n1, containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.0.0.5}
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: x, labels: {app: web, track: canary}}
spec: {nodeName: n1, containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.0.0.6}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: x, labels: {app: client}}
spec: {nodeName: n1, containers: [{name: c}]}
status: {podIP: 10.0.0.2}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: x}
spec:
  podSelector: {matchLabels: {track: stable}}
  ingress: [{from: [{podSelector: {matchLabels: {app: client}}}], ports: [{port: http}]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: canary, namespace: x}
spec: {podSelector: {matchLabels: {track: canary}}, policyTypes: [Ingress]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: x}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-abc, namespace: x, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints:
- {addresses: [10.0.0.5], targetRef: {kind: Pod, name: web-1}}
- {addresses: [10.0.0.6], targetRef: {kind: Pod, name: web-2}}
- {addresses: [10.0.0.7], conditions: {ready: false}}
ports: [{name: http, port: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: x}
spec: {clusterIP: 10.96.0.11, ports: [{port: 80}]}
";

    fn service(cluster: &netwarden_model::Cluster, name: &str, port: u16) -> Vec<String> {
        service_lines(
            cluster,
            &[],
            &TrustDomain::default(),
            "10.0.0.2".parse().unwrap(),
            &netwarden_model::ServiceRef {
                namespace: "x".into(),
                name: name.into(),
            },
            port,
            netwarden_model::Protocol::Tcp,
        )
        .map_or_else(|error| vec![error.to_string()], |(_, lines)| lines)
    }

    #[test]
    fn a_flow_to_a_service_is_explained_at_each_backend_naming_the_service_and_the_pod() {
        let (cluster, errors) = netwarden_model::cluster_of_stream("cluster.yaml", SERVICE_CLUSTER);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(
            service(&cluster, "web", 80),
            [
                "TCP x/client (10.0.0.2) -> Service x/web port 80 (http): ALLOWED to 1 of 2 backends",
                "  backend x/web-1 (10.0.0.5) port 8080, from EndpointSlice x/web-abc: ALLOWED",
                "    egress of x/client (10.0.0.2): allowed, no NetworkPolicy isolates it in this direction",
                "    ingress of x/web-1 (10.0.0.5): allowed by NetworkPolicy x/web spec.ingress[0].from[0].ports[0]",
                "  backend x/web-2 (10.0.0.6) port 8080, from EndpointSlice x/web-abc: DENIED",
                "    egress of x/client (10.0.0.2): allowed, no NetworkPolicy isolates it in this direction",
                "    ingress of x/web-2 (10.0.0.6): DENIED, isolated by NetworkPolicy x/canary; no rule allows TCP from x/client (10.0.0.2) to port 8080",
            ]
        );
    }

    #[test]
    fn a_service_without_backends_or_that_port_says_so() {
        let (cluster, errors) = netwarden_model::cluster_of_stream("cluster.yaml", SERVICE_CLUSTER);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(
            service(&cluster, "empty", 80),
            [
                "TCP x/client (10.0.0.2) -> Service x/empty port 80: no ready backend of the client's address family; kube-proxy has nowhere to send it"
            ]
        );
        assert_eq!(
            service(&cluster, "web", 443),
            ["Service x/web has no TCP port 443"]
        );
    }

    /// `--kubeconfig`: the API objects, listed by the agent's Kubernetes source from a mocked
    /// API server, explain a flow exactly as the same objects do as manifests.
    #[tokio::test]
    async fn the_cluster_api_explains_like_the_same_objects_as_manifests() {
        let objects =
            format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: x}}\n---{SERVICE_CLUSTER}");
        let (client, _) = crate::mock_api::client_of(&objects);
        let mut source = netwarden_kube::KubeSource::start(client);
        let live = super::listed_cluster(&mut source, crate::mock_api::STEP)
            .await
            .unwrap();
        let (offline, errors) = netwarden_model::cluster_of_stream("cluster.yaml", &objects);
        assert!(errors.is_empty(), "{errors:?}");
        let queries = [
            super::ExplainQuery {
                from: "x/client".into(),
                to: None,
                to_service: Some("x/web".into()),
                port: 80,
                protocol: "tcp".into(),
            },
            super::ExplainQuery {
                from: "x/client".into(),
                to: Some("x/web-2".into()),
                to_service: None,
                port: 8080,
                protocol: "TCP".into(),
            },
        ];
        for query in &queries {
            let explained =
                |cluster| super::explain(cluster, &[], &TrustDomain::default(), query).unwrap();
            let from_the_api = explained(&live);
            assert_eq!(from_the_api, explained(&offline), "{query:?}");
            assert!(from_the_api.lines.len() > 2, "{from_the_api:?}");
        }
        assert!(
            !super::explain(&live, &[], &TrustDomain::default(), &queries[1])
                .unwrap()
                .allowed
        );
    }

    #[test]
    fn cluster_policies_show_every_tier_and_warn_about_ties() {
        let cluster_policies = r"
---
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: b-deny-batch}
spec:
  tier: Admin
  priority: 3
  subject: {namespaces: {matchLabels: {kubernetes.io/metadata.name: shop}}}
  ingress: [{action: Deny, from: [{namespaces: {matchLabels: {kubernetes.io/metadata.name: batch}}}]}]
---
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: a-pass-all}
spec:
  tier: Admin
  priority: 3
  subject: {namespaces: {}}
  ingress: [{name: to-np, action: Pass, from: [{namespaces: {}}]}]
";
        let (cluster, errors) = netwarden_model::cluster_of_stream(
            "cluster.yaml",
            &format!("{CLUSTER}{cluster_policies}"),
        );
        assert!(errors.is_empty(), "{errors:?}");
        let flow = Flow {
            source: "10.0.0.3".parse().unwrap(),
            destination: "10.0.0.1".parse().unwrap(),
            protocol: 6,
            port: 8443,
        };
        let verdict = netwarden_policy::evaluate::evaluate(&cluster, &[], &flow);
        let lines = super::verdict_lines(
            &cluster,
            &verdict,
            flow.source,
            flow.destination,
            8443,
            netwarden_model::Protocol::Tcp,
        );
        assert_eq!(
            lines[2],
            "ingress tiers: Admin tier: ClusterNetworkPolicy a-pass-all ingress[0] \"to-np\" (Pass; Admin tier, priority 3); NetworkPolicy: allowed by NetworkPolicy shop/api spec.ingress[0].from[0].ports[0]; Baseline tier: no rule matches",
            "{lines:#?}"
        );
        assert_eq!(
            lines[3],
            "warning: ClusterNetworkPolicy a-pass-all ingress[0] \"to-np\" (Pass; Admin tier, priority 3) and ClusterNetworkPolicy b-deny-batch ingress[0] (Deny; Admin tier, priority 3) have the same priority and both match; a-pass-all decides (the first by name; upstream leaves it undefined)"
        );
        assert!(verdict.allowed());
    }
}
