//! `netwarden explain`: which policy rule allows a flow, or which policies isolate it.

use std::{net::IpAddr, path::PathBuf};

use anyhow::{Context as _, bail};
use netwarden_identity::{Connection, TrustDomain, acceptable_principals, decide::decide};
use netwarden_model::{Cluster, ManifestDir, Protocol};
use netwarden_policy::evaluate::{self, Flow, SideVerdict};

/// `netwarden explain`.
#[derive(clap::Args)]
pub struct ExplainOptions {
    /// Directory of manifests (Namespaces, Pods, NetworkPolicies) describing the cluster.
    #[arg(long)]
    pub manifests: PathBuf,
    /// The client: `namespace/pod` or an IP address.
    #[arg(long)]
    pub from: String,
    /// The server: `namespace/pod` or an IP address.
    #[arg(long)]
    pub to: String,
    /// Destination port.
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
}

/// Prints the verdict and the rules behind it.
pub fn run(options: &ExplainOptions) -> anyhow::Result<()> {
    let mut source = ManifestDir::new(&options.manifests);
    source
        .refresh()
        .with_context(|| format!("reading {}", options.manifests.display()))?;
    let (cluster, errors) = source.cluster();
    for error in &errors {
        eprintln!("warning: {error}");
    }
    for problem in cluster.annotation_problems() {
        eprintln!("warning: {problem}");
    }
    let protocol =
        Protocol::from_api(&options.protocol.to_ascii_uppercase()).with_context(|| {
            format!(
                "--protocol {:?}: expected TCP, UDP or SCTP",
                options.protocol
            )
        })?;
    let source_ip = address(&cluster, &options.from, None)?;
    let destination_ip = address(&cluster, &options.to, Some(source_ip))?;
    let flow = Flow {
        source: source_ip,
        destination: destination_ip,
        protocol: protocol.number(),
        port: options.port,
    };
    let verdict = evaluate::evaluate(&cluster, &options.node_addresses, &flow);

    println!(
        "{protocol} {} -> {} port {}: {}",
        describe(&cluster, source_ip),
        describe(&cluster, destination_ip),
        options.port,
        if verdict.allowed() {
            "ALLOWED"
        } else {
            "DENIED"
        }
    );
    let peer_text = |peer: IpAddr| describe(&cluster, peer);
    print_side(
        "egress of",
        &cluster,
        source_ip,
        &verdict.egress,
        &format!("to {} port {}", peer_text(destination_ip), options.port),
        protocol,
    );
    print_side(
        "ingress of",
        &cluster,
        destination_ip,
        &verdict.ingress,
        &format!("from {} to port {}", peer_text(source_ip), options.port),
        protocol,
    );
    print_mtls(
        &cluster,
        options,
        Flow {
            source: source_ip,
            destination: destination_ip,
            protocol: protocol.number(),
            port: options.port,
        },
        verdict.allowed(),
    )?;
    Ok(())
}

/// For an mTLS-strict destination: what the kernel's screen and the identity check add to the
/// L4 verdict, and which principals the identity check would accept.
fn print_mtls(
    cluster: &Cluster,
    options: &ExplainOptions,
    flow: Flow,
    l4_allowed: bool,
) -> anyhow::Result<()> {
    let trust_domain = TrustDomain::new(&options.trust_domain).context("--trust-domain")?;
    for line in mtls_lines(
        cluster,
        &options.node_addresses,
        &trust_domain,
        flow,
        l4_allowed,
    ) {
        println!("{line}");
    }
    Ok(())
}

/// The lines [`print_mtls`] prints; none when the destination is not mTLS-strict.
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

fn print_side(
    label: &str,
    cluster: &Cluster,
    address: IpAddr,
    verdict: &SideVerdict,
    flow: &str,
    protocol: Protocol,
) {
    let who = describe(cluster, address);
    match verdict {
        SideVerdict::NotAPod => println!("  {label} {who}: not a pod, no policy of its own"),
        SideVerdict::FromNode => {
            println!("  {label} {who}: allowed, traffic from the node is always allowed");
        }
        SideVerdict::NotIsolated => {
            println!("  {label} {who}: allowed, no NetworkPolicy isolates it in this direction");
        }
        SideVerdict::Allowed(rules) => {
            for rule in rules {
                println!("  {label} {who}: allowed by {rule}");
            }
        }
        SideVerdict::Denied(policies) => {
            let names: Vec<String> = policies
                .iter()
                .map(|policy| format!("NetworkPolicy {policy}"))
                .collect();
            println!(
                "  {label} {who}: DENIED, isolated by {}; no rule allows {protocol} {flow}",
                names.join(", ")
            );
        }
    }
}

fn address(
    cluster: &Cluster,
    text: &str,
    same_family_as: Option<IpAddr>,
) -> anyhow::Result<IpAddr> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok(ip);
    }
    let Some((namespace, name)) = text.split_once('/') else {
        bail!("{text:?} is neither an IP address nor namespace/pod");
    };
    let pod = cluster
        .pods
        .values()
        .find(|pod| pod.id.namespace == namespace && pod.id.name == name)
        .with_context(|| format!("no Pod {text} in the manifests"))?;
    let family = |ip: &&IpAddr| same_family_as.is_none_or(|other| other.is_ipv4() == ip.is_ipv4());
    pod.ips
        .iter()
        .find(family)
        .copied()
        .with_context(|| format!("Pod {text} has no IP address (of the same family)"))
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

    use super::mtls_lines;

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
}
