//! `netwarden observe --kubeconfig`: every agent of the cluster, each reached through the API
//! server's port-forward to the loopback listener of its pod.
//!
//! Why this route: the agent's pod uses the node's network, so its loopback listener
//! (`--observe-address=127.0.0.1:9964` in `deploy/daemonset.yaml`) is reachable only from the
//! node itself, and through the API server only by whoever may `create` `pods/portforward` in
//! the agent's namespace — Kubernetes RBAC decides who observes, no port is opened to the
//! network, and no `pods/exec` (a shell on every node) is needed. The Unix socket stays the
//! endpoint for the node's own tools.

use std::path::Path;

use anyhow::Context as _;
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, api::ListParams};

use super::{DEFAULT_POD_PORT, client, flow::ObserveRequest};

/// Where the agents are.
#[derive(clap::Args, Clone, Debug)]
pub struct AgentPods {
    /// With `--kubeconfig`: the agents' namespace.
    #[arg(
        long = "agent-namespace",
        id = "agent_namespace",
        default_value = "netwarden-system"
    )]
    pub namespace: String,
    /// With `--kubeconfig`: the label selector of the agents' pods.
    #[arg(
        long = "agent-selector",
        id = "agent_selector",
        default_value = "app.kubernetes.io/name=netwarden"
    )]
    pub selector: String,
    /// With `--kubeconfig`: the port of the agents' loopback observe listener.
    #[arg(long = "agent-port", id = "agent_port", default_value_t = DEFAULT_POD_PORT)]
    pub port: u16,
}

/// The running agent pods: their names and nodes.
pub async fn agent_pods(
    pods: &Api<Pod>,
    agents: &AgentPods,
) -> anyhow::Result<Vec<(String, String)>> {
    let listed = pods
        .list(&ListParams::default().labels(&agents.selector))
        .await
        .with_context(|| {
            format!(
                "listing the agent pods ({}) in {}",
                agents.selector, agents.namespace
            )
        })?;
    let running: Vec<(String, String)> = listed
        .items
        .into_iter()
        .filter(|pod| {
            pod.status
                .as_ref()
                .and_then(|status| status.phase.as_deref())
                == Some("Running")
        })
        .filter_map(|pod| {
            let node = pod.spec.as_ref()?.node_name.clone().unwrap_or_default();
            Some((pod.metadata.name?, node))
        })
        .collect();
    anyhow::ensure!(
        !running.is_empty(),
        "no running agent pod matches {} in {}",
        agents.selector,
        agents.namespace
    );
    Ok(running)
}

/// A stream of flows from every running agent pod.
pub async fn flows_of_every_agent(
    kubeconfig: &Path,
    agents: &AgentPods,
    request: &ObserveRequest,
) -> anyhow::Result<Vec<client::Lines>> {
    let kube = netwarden_kube::client(Some(kubeconfig))
        .await
        .context("connecting to the Kubernetes API")?;
    let pods: Api<Pod> = Api::namespaced(kube, &agents.namespace);
    let mut streams: Vec<client::Lines> = Vec::new();
    for (name, node) in agent_pods(&pods, agents).await? {
        let mut forward = pods
            .portforward(&name, &[agents.port])
            .await
            .with_context(|| format!("port-forward to {name} (node {node})"))?;
        let connection = forward
            .take_stream(agents.port)
            .with_context(|| format!("port-forward to {name} (node {node}): no stream"))?;
        let lines = client::flows(connection, request)
            .await
            .with_context(|| format!("the agent {name} on node {node}"))?;
        // The forwarder lives as long as its stream is read.
        streams.push(Box::pin(lines.map(move |line| {
            let _forwarding = &forward;
            line
        })));
    }
    Ok(streams)
}

#[cfg(test)]
mod tests {
    use futures::StreamExt as _;
    use k8s_openapi::api::core::v1::Pod;
    use kube::Api;

    use super::{AgentPods, agent_pods};

    const AGENTS: &str = "
apiVersion: v1
kind: Pod
metadata: {name: netwarden-a, namespace: netwarden-system, labels: {app.kubernetes.io/name: netwarden}}
spec: {nodeName: node-1, containers: [{name: agent}]}
status: {phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: netwarden-b, namespace: netwarden-system, labels: {app.kubernetes.io/name: netwarden}}
spec: {nodeName: node-2, containers: [{name: agent}]}
status: {phase: Pending}
---
apiVersion: v1
kind: Pod
metadata: {name: other, namespace: netwarden-system, labels: {app.kubernetes.io/name: other}}
spec: {nodeName: node-1, containers: [{name: c}]}
status: {phase: Running}
";

    fn agents() -> AgentPods {
        AgentPods {
            namespace: "netwarden-system".into(),
            selector: "app.kubernetes.io/name=netwarden".into(),
            port: 9964,
        }
    }

    /// The agents are found by the DaemonSet's label in their namespace; only running ones
    /// are dialled.
    #[tokio::test]
    async fn the_running_agent_pods_are_found_by_label_in_their_namespace() {
        let (client, mut paths) = crate::mock_api::client_of(AGENTS);
        let pods: Api<Pod> = Api::namespaced(client, "netwarden-system");
        let found = agent_pods(&pods, &agents()).await.unwrap();
        assert_eq!(found, [("netwarden-a".to_owned(), "node-1".to_owned())]);
        let path = paths.next().await.unwrap();
        assert!(
            path.starts_with("/api/v1/namespaces/netwarden-system/pods?")
                && path.contains("labelSelector=app.kubernetes.io%2Fname%3Dnetwarden"),
            "{path}"
        );
    }

    #[tokio::test]
    async fn no_running_agent_is_an_error_naming_the_selector() {
        let (client, _) = crate::mock_api::client_of(AGENTS);
        let pods: Api<Pod> = Api::namespaced(client, "netwarden-system");
        let selector = AgentPods {
            selector: "app.kubernetes.io/name=nothing".into(),
            ..agents()
        };
        let error = agent_pods(&pods, &selector).await.unwrap_err().to_string();
        assert!(error.contains("app.kubernetes.io/name=nothing"), "{error}");
    }
}
