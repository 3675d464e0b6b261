//! What `netwarden diff` and `netwarden matrix` read: a cluster described by manifests in a
//! directory, a file or standard input (a `kustomize build` or `helm template` render), or by
//! the live cluster.
//!
//! Renders hold Deployments rather than Pods, and manifests hold pods without addresses, while
//! the reference evaluator judges flows between addresses. So each workload's pod template
//! stands for one pod of that workload (`namespace/deployment/name`), and every pod without an
//! address is given one from `198.18.0.0/15`, the range RFC 2544 sets aside for benchmarks,
//! which no real policy is likely to name.

use std::{
    io::Read as _,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use k8s_openapi::api::core::v1 as core;
use netwarden_model::{Cluster, ManifestDir, convert};
use serde::Deserialize as _;

/// Where a side of a comparison comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ManifestSource {
    /// A directory of manifest files, or one file.
    Path(PathBuf),
    /// Standard input (`-`).
    Stdin,
}

impl ManifestSource {
    /// `-` is standard input; anything else a path.
    #[must_use]
    pub fn parse(text: &str) -> Self {
        if text == "-" {
            Self::Stdin
        } else {
            Self::Path(PathBuf::from(text))
        }
    }
}

impl std::fmt::Display for ManifestSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Path(path) => write!(f, "{}", path.display()),
            Self::Stdin => f.write_str("standard input"),
        }
    }
}

/// The first address given to a pod the manifests leave without one.
const SYNTHETIC_POD_BASE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);

/// Reads `source` into a cluster, with its workloads' pod templates as pods; warnings (files or
/// objects that could not be used) are printed to standard error.
pub fn load(source: &ManifestSource) -> anyhow::Result<Cluster> {
    let (mut cluster, texts) = match source {
        ManifestSource::Stdin => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("reading manifests from standard input")?;
            let (cluster, errors) = netwarden_model::cluster_of_stream("<stdin>", &text);
            warn(errors.iter());
            (cluster, vec![("<stdin>".to_owned(), text)])
        }
        ManifestSource::Path(path) if path.is_dir() => {
            let mut dir = ManifestDir::new(path);
            dir.refresh()
                .with_context(|| format!("reading {}", path.display()))?;
            let (cluster, errors) = dir.cluster();
            warn(errors.iter());
            (cluster, read_dir_texts(path)?)
        }
        ManifestSource::Path(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let name = path.display().to_string();
            let (cluster, errors) = netwarden_model::cluster_of_stream(&name, &text);
            warn(errors.iter());
            (cluster, vec![(name, text)])
        }
    };
    for (name, text) in &texts {
        for problem in add_workload_pods(&mut cluster, text) {
            eprintln!("warning: {name}: {problem}");
        }
    }
    warn(cluster.annotation_problems());
    Ok(cluster)
}

/// Adds `shared`'s objects to `cluster` where it has none of the same kind and name.
pub fn merge_shared(cluster: &mut Cluster, shared: &Cluster) {
    let Cluster {
        namespaces,
        pods,
        policies,
        services,
        endpoint_slices,
        cluster_policies,
        nodes,
    } = shared;
    for (key, value) in namespaces {
        cluster
            .namespaces
            .entry(key.clone())
            .or_insert_with(|| value.clone());
    }
    for (key, value) in pods {
        cluster
            .pods
            .entry(key.clone())
            .or_insert_with(|| value.clone());
    }
    for (key, value) in policies {
        cluster
            .policies
            .entry(key.clone())
            .or_insert_with(|| value.clone());
    }
    for (key, value) in services {
        cluster
            .services
            .entry(key.clone())
            .or_insert_with(|| value.clone());
    }
    for (key, value) in endpoint_slices {
        cluster
            .endpoint_slices
            .entry(key.clone())
            .or_insert_with(|| value.clone());
    }
    for (key, value) in cluster_policies {
        cluster
            .cluster_policies
            .entry(key.clone())
            .or_insert_with(|| value.clone());
    }
    for (key, value) in nodes {
        cluster
            .nodes
            .entry(key.clone())
            .or_insert_with(|| value.clone());
    }
}

/// Gives every pod without an address (and not on the host network) one of its own, in pod
/// order, so that two reads of the same pods give the same addresses.
pub fn address_unaddressed_pods(cluster: &mut Cluster) {
    let taken: Vec<IpAddr> = cluster
        .pods
        .values()
        .flat_map(|pod| pod.ips.iter().copied())
        .collect();
    let mut next = u32::from(SYNTHETIC_POD_BASE);
    for pod in cluster.pods.values_mut() {
        if !pod.ips.is_empty() || pod.host_network {
            continue;
        }
        while taken.contains(&IpAddr::V4(Ipv4Addr::from(next))) {
            next += 1;
        }
        pod.ips.push(IpAddr::V4(Ipv4Addr::from(next)));
        next += 1;
    }
}

fn warn<E: std::fmt::Display>(errors: impl Iterator<Item = E>) {
    for error in errors {
        eprintln!("warning: {error}");
    }
}

/// The manifest files of a directory (as the manifest source lists them), with their text.
fn read_dir_texts(dir: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let mut texts = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        let name = path
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        let is_manifest = [".yaml", ".yml", ".json"]
            .iter()
            .any(|ext| name.ends_with(ext));
        if name.starts_with('.') || !is_manifest || !path.is_file() {
            continue;
        }
        // The manifest source already reported files it could not read.
        if let Ok(text) = std::fs::read_to_string(&path) {
            texts.push((name, text));
        }
    }
    texts.sort();
    Ok(texts)
}

/// Adds a pod for each workload of `text` (a YAML stream) whose name no pod of `cluster` has;
/// returns what could not be used.
fn add_workload_pods(cluster: &mut Cluster, text: &str) -> Vec<String> {
    let mut problems = Vec::new();
    for (document, deserializer) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let Ok(value) = serde_yaml::Value::deserialize(deserializer) else {
            // The manifest source reported the syntax error already.
            break;
        };
        let mut workloads = Vec::new();
        collect_workloads(value, &mut workloads);
        for workload in workloads {
            match template_pod(&workload) {
                Ok(Some(pod)) => match convert::pod(&pod) {
                    Ok(pod) => {
                        cluster.pods.entry(pod.id.clone()).or_insert(pod);
                    }
                    Err(error) => problems.push(format!("document {document}: {error}")),
                },
                Ok(None) => {}
                Err(problem) => problems.push(format!("document {document}: {problem}")),
            }
        }
    }
    problems
}

/// The workload objects of a document, looking into `List`s.
fn collect_workloads(value: serde_yaml::Value, into: &mut Vec<serde_yaml::Value>) {
    let kind = value
        .get("kind")
        .and_then(serde_yaml::Value::as_str)
        .unwrap_or_default();
    if kind == "List" {
        if let Some(items) = value.get("items").and_then(serde_yaml::Value::as_sequence) {
            for item in items.clone() {
                collect_workloads(item, into);
            }
        }
    } else if template_path(kind).is_some() {
        into.push(value);
    }
}

/// Where a workload kind keeps the template of the pods it creates.
fn template_path(kind: &str) -> Option<&'static [&'static str]> {
    match kind {
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "ReplicationController"
        | "Job" => Some(&["spec", "template"]),
        "CronJob" => Some(&["spec", "jobTemplate", "spec", "template"]),
        _ => None,
    }
}

/// The pod a workload's template describes, named `KIND/NAME` (`deployment/backend`) in the
/// workload's namespace, or `None` when `workload` is not a workload.
fn template_pod(workload: &serde_yaml::Value) -> Result<Option<core::Pod>, String> {
    let kind = workload
        .get("kind")
        .and_then(serde_yaml::Value::as_str)
        .unwrap_or_default();
    let Some(path) = template_path(kind) else {
        return Ok(None);
    };
    let metadata = workload.get("metadata");
    let field = |name: &str| {
        metadata
            .and_then(|metadata| metadata.get(name))
            .and_then(serde_yaml::Value::as_str)
            .map(str::to_owned)
    };
    let name = field("name").ok_or_else(|| format!("{kind} without metadata.name"))?;
    let mut template = workload;
    for step in path {
        template = template
            .get(step)
            .ok_or_else(|| format!("{kind} {name}: no {}", path.join(".")))?;
    }
    let template: core::PodTemplateSpec = serde_yaml::from_value(template.clone())
        .map_err(|error| format!("{kind} {name}: {}: {error}", path.join(".")))?;
    let template_metadata = template.metadata.unwrap_or_default();
    Ok(Some(core::Pod {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(format!("{}/{name}", kind.to_ascii_lowercase())),
            namespace: Some(field("namespace").unwrap_or_else(|| "default".to_owned())),
            labels: template_metadata.labels,
            annotations: template_metadata.annotations,
            ..Default::default()
        },
        spec: template.spec,
        status: None,
    }))
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use netwarden_model::PodRef;

    use super::{add_workload_pods, address_unaddressed_pods};

    const RENDER: &str = r"
apiVersion: apps/v1
kind: Deployment
metadata: {name: api, namespace: shop}
spec:
  selector: {matchLabels: {app: api}}
  template:
    metadata: {labels: {app: api}}
    spec: {containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: report}
spec:
  schedule: '@daily'
  jobTemplate:
    spec:
      template:
        metadata: {labels: {app: report}}
        spec: {containers: [{name: c}], restartPolicy: Never}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop, labels: {app: db}}
spec: {containers: [{name: c}]}
status: {podIP: 198.18.0.1}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: settings}
";

    fn pod(namespace: &str, name: &str) -> PodRef {
        PodRef {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    #[test]
    fn workload_templates_become_pods_with_addresses_that_avoid_the_real_pods() {
        let (mut cluster, errors) = netwarden_model::cluster_of_stream("render.yaml", RENDER);
        assert!(errors.is_empty(), "{errors:?}");
        assert!(add_workload_pods(&mut cluster, RENDER).is_empty());
        address_unaddressed_pods(&mut cluster);

        let api = &cluster.pods[&pod("shop", "deployment/api")];
        assert_eq!(api.labels["app"], "api");
        assert_eq!(api.ports[0].port, 8080);
        let report = &cluster.pods[&pod("default", "cronjob/report")];
        assert_eq!(report.labels["app"], "report");

        let addresses: Vec<IpAddr> = cluster.pods.values().map(|pod| pod.ips[0]).collect();
        // The real pod keeps its address; the two templates get the next free ones.
        assert_eq!(
            addresses,
            ["198.18.0.2", "198.18.0.1", "198.18.0.3"]
                .map(|ip| ip.parse::<IpAddr>().unwrap())
                .to_vec(),
            "default/cronjob/report, shop/db, shop/deployment/api in key order",
        );
    }

    #[test]
    fn shared_objects_fill_in_what_a_side_lacks_and_never_replace_its_own() {
        let (mut side, _) = netwarden_model::cluster_of_stream(
            "side.yaml",
            "kind: Namespace\nmetadata: {name: shop, labels: {side: 'yes'}}\n",
        );
        let (shared, errors) = netwarden_model::cluster_of_stream("shared.yaml", RENDER);
        assert!(errors.is_empty(), "{errors:?}");
        let (namespace, _) = netwarden_model::cluster_of_stream(
            "ns.yaml",
            "kind: Namespace\nmetadata: {name: shop, labels: {side: 'no'}}\n",
        );
        super::merge_shared(&mut side, &namespace);
        super::merge_shared(&mut side, &shared);
        assert_eq!(side.namespaces["shop"].labels["side"], "yes");
        assert!(side.pods.contains_key(&pod("shop", "db")));
    }

    #[test]
    fn a_workload_without_a_template_is_reported() {
        let (mut cluster, _) = netwarden_model::cluster_of_stream("x.yaml", "");
        let problems = add_workload_pods(
            &mut cluster,
            "kind: Deployment\nmetadata: {name: broken}\nspec: {}\n",
        );
        assert_eq!(
            problems,
            ["document 0: Deployment broken: no spec.template"]
        );
        assert!(cluster.pods.is_empty());
    }
}
