//! `netwarden-bench identity`: the identity check's latency as a proxy sees it — one
//! `Authorization/Check` call over the agent's Unix socket, gRPC and decision included — on
//! the generated 10,000-pod cluster.
//!
//! Requests go to every local pod from sources drawn over the whole cluster, each presenting
//! its own SPIFFE ID, one at a time on one connection (a proxy's steady state). No conntrack
//! entry is cut on a deny here (that needs the kernel): that is one map update on top.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use netwarden_identity::{
    ClusterIndex, Connection, IdentityService, Snapshot, SocketAccess, TrustDomain,
    client::{check_request, connect_unix, is_allowed},
    decide_indexed,
    server::serve_unix,
};
use netwarden_model::Cluster;

const REQUESTS: usize = 20_000;
const WARM_UP: usize = 500;

pub fn run(cluster: Cluster, node: &str, node_address: IpAddr) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(measure(cluster, node, node_address))
}

async fn measure(cluster: Cluster, node: &str, node_address: IpAddr) -> anyhow::Result<()> {
    let trust_domain = TrustDomain::default();
    let local: Vec<IpAddr> = cluster
        .pods
        .values()
        .filter(|pod| pod.node_name.as_deref() == Some(node))
        .filter_map(|pod| pod.ips.first().copied())
        .collect();
    let pods = cluster.pods.len();
    anyhow::ensure!(!local.is_empty(), "the cluster has no local pods");
    let requests = requests(&cluster, &trust_domain, node, node_address);
    let decision_only = decision_latency(&cluster, &trust_domain, node_address, &requests);
    let snapshot = Snapshot::new(cluster, vec![node_address], local.iter().copied().collect());
    let service = Arc::new(IdentityService::new(
        netwarden_identity::shared(snapshot),
        trust_domain,
        None,
    ));
    let counts = service.counts();
    let dir = tempfile::tempdir().context("a directory for the socket")?;
    let socket = dir.path().join("authz.sock");
    let server = serve_unix(&socket, SocketAccess::default(), service)?;
    let mut client = connect_unix(&socket).await?;

    let mut samples = Vec::with_capacity(REQUESTS);
    anyhow::ensure!(!requests.is_empty(), "no local pod has an http port");
    let mut allowed = 0_usize;
    for index in 0..WARM_UP + REQUESTS {
        let (source, destination, principal) = &requests[index % requests.len()];
        let request = check_request(*source, *destination, principal);
        let started = Instant::now();
        let response = client.check(request).await?.into_inner();
        let took = started.elapsed();
        if index >= WARM_UP {
            samples.push(took);
            allowed += usize::from(is_allowed(&response));
        }
    }
    server.abort();
    samples.sort();
    let at = |per_mille: usize| samples[(samples.len() * per_mille / 1000).min(samples.len() - 1)];
    println!(
        "identity check over gRPC (Unix socket), {} pods, {} local; {REQUESTS} sequential Check calls ({allowed} allowed):",
        pods,
        local.len()
    );
    println!(
        "  p50 {}   p90 {}   p99 {}   max {}",
        us(at(500)),
        us(at(900)),
        us(at(990)),
        us(*samples.last().expect("samples"))
    );
    println!("  decisions: {:?}", counts.snapshot());
    println!(
        "  of which the decision alone (in process, no gRPC): p50 {}   p99 {}",
        us(decision_only.0),
        us(decision_only.1)
    );
    Ok(())
}

/// Connections to every local pod's `http` port: per destination, up to four sources the
/// policy allows (presenting their own identity) and four it does not, drawn over the cluster.
fn requests(
    cluster: &Cluster,
    trust_domain: &TrustDomain,
    node: &str,
    node_address: IpAddr,
) -> Vec<(SocketAddr, SocketAddr, String)> {
    let index = ClusterIndex::new(cluster);
    let pods: Vec<&netwarden_model::Pod> = cluster.pods.values().collect();
    let mut requests = Vec::new();
    for (number, destination) in cluster
        .pods
        .values()
        .filter(|pod| pod.node_name.as_deref() == Some(node))
        .enumerate()
    {
        let (Some(address), Some(http)) = (
            destination.ips.first(),
            destination
                .ports
                .iter()
                .find(|port| port.name.as_deref() == Some("http")),
        ) else {
            continue;
        };
        let (mut allowed, mut denied) = (0, 0);
        for step in 0..pods.len() {
            let source = pods[(number * 7919 + step * 104_729) % pods.len()];
            let Some(source_address) = source.ips.first() else {
                continue;
            };
            let connection = Connection {
                source: *source_address,
                destination: *address,
                port: http.port,
                principal: Some(trust_domain.spiffe_id_of(source)),
            };
            let is_allowed =
                decide_indexed(cluster, &index, &[node_address], trust_domain, &connection)
                    .is_allowed();
            let wanted = if is_allowed {
                &mut allowed
            } else {
                &mut denied
            };
            if *wanted < 4 {
                *wanted += 1;
                requests.push((
                    SocketAddr::new(*source_address, 40_000 + step as u16 % 20_000),
                    SocketAddr::new(*address, http.port),
                    connection.principal.unwrap_or_default(),
                ));
            }
            if allowed == 4 && denied == 4 {
                break;
            }
        }
    }
    requests
}

/// Median and p99 of the decision alone over `requests`, in process.
fn decision_latency(
    cluster: &Cluster,
    trust_domain: &TrustDomain,
    node_address: IpAddr,
    requests: &[(SocketAddr, SocketAddr, String)],
) -> (Duration, Duration) {
    let index = ClusterIndex::new(cluster);
    let mut samples: Vec<Duration> = (0..REQUESTS)
        .map(|number| {
            let (source, destination, principal) = &requests[number % requests.len()];
            let connection = Connection {
                source: source.ip(),
                destination: destination.ip(),
                port: destination.port(),
                principal: Some(principal.clone()),
            };
            let started = Instant::now();
            let decision =
                decide_indexed(cluster, &index, &[node_address], trust_domain, &connection);
            let took = started.elapsed();
            std::hint::black_box(decision);
            took
        })
        .collect();
    samples.sort();
    (
        samples[samples.len() / 2],
        samples[samples.len() * 99 / 100],
    )
}

fn us(duration: Duration) -> String {
    format!("{:.1} µs", duration.as_secs_f64() * 1e6)
}
