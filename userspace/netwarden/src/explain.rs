//! `netwarden explain`: which policy rule allows a flow, or which policies isolate it.

use std::{net::IpAddr, path::PathBuf};

use anyhow::{Context as _, bail};
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
    Ok(())
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
