//! The live cluster for `netwarden diff --cluster` and `netwarden matrix --cluster`: one
//! consistent read of Namespaces, Pods, NetworkPolicies, Services and EndpointSlices, through
//! the agent's own Kubernetes source (the same lists, the same validation), then stopped.

use std::time::Duration;

use anyhow::Context as _;
use kube::Client;
use netwarden_kube::KubeSource;
use netwarden_model::Cluster;

/// How long the first list of every kind may take.
const LIST_TIMEOUT: Duration = Duration::from_secs(60);

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

/// Lists every kind through `client` and returns the cluster once all five are listed; fails
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
