//! The manifest directory the agent watches: one file per object, each replaced atomically.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use serde_json::json;

use crate::{
    node::{Addresses, NODE_NAME},
    scenario::{Labels, PodSpec, PolicyName},
};

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot write {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot delete {}: {source}", path.display())]
    Delete { path: PathBuf, source: io::Error },
    #[error("cannot serialize {name}: {source}")]
    Serialize {
        name: String,
        source: serde_yaml::Error,
    },
}

/// Writes API objects into the directory the agent reads.
#[derive(Debug)]
pub struct ManifestWriter {
    dir: PathBuf,
}

impl ManifestWriter {
    #[must_use]
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
        }
    }

    pub fn namespace(&self, name: &str, labels: &Labels) -> Result<(), ManifestError> {
        let object = json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": { "name": name, "labels": labels },
        });
        self.write(&format!("ns-{name}.yaml"), &object)
    }

    /// The Pod object as the API server serves it for a running pod on this node.
    pub fn pod(&self, pod: &PodSpec, addresses: &Addresses) -> Result<(), ManifestError> {
        let ips: Vec<String> = addresses.all().iter().map(ToString::to_string).collect();
        let ports: Vec<serde_json::Value> = pod
            .ports
            .iter()
            .map(|port| {
                let mut value = json!({ "containerPort": port.container_port, "protocol": port.protocol.to_string() });
                if let Some(name) = &port.name {
                    value["name"] = json!(name);
                }
                value
            })
            .collect();
        let mut object = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": { "name": pod.name, "namespace": pod.namespace, "labels": pod.labels },
            "spec": {
                "nodeName": NODE_NAME,
                "containers": [{ "name": "server", "image": "netwarden/e2e-server", "ports": ports }],
            },
            "status": {
                "phase": "Running",
                "podIP": ips.first(),
                "podIPs": ips.iter().map(|ip| json!({ "ip": ip })).collect::<Vec<_>>(),
            },
        });
        if !pod.identity.annotations.is_empty() {
            object["metadata"]["annotations"] = json!(pod.identity.annotations);
        }
        if let Some(account) = &pod.identity.service_account {
            object["spec"]["serviceAccountName"] = json!(account);
        }
        self.write(&pod_file(&pod.namespace, &pod.name), &object)
    }

    pub fn delete_pod(&self, namespace: &str, name: &str) -> Result<(), ManifestError> {
        self.delete(&pod_file(namespace, name))
    }

    /// Writes a `NetworkPolicy` (placeholders already substituted) under its namespace/name.
    pub fn policy(
        &self,
        namespace: &str,
        name: &str,
        object: &serde_yaml::Value,
    ) -> Result<(), ManifestError> {
        self.write(&policy_file(namespace, name), object)
    }

    pub fn delete_policy(&self, namespace: &str, name: &str) -> Result<(), ManifestError> {
        self.delete(&policy_file(namespace, name))
    }

    /// Writes a cluster-scoped `ClusterNetworkPolicy` (placeholders already substituted) under
    /// its name.
    pub fn cluster_policy(
        &self,
        name: &str,
        object: &serde_yaml::Value,
    ) -> Result<(), ManifestError> {
        self.write(&cluster_policy_file(name), object)
    }

    pub fn delete_cluster_policy(&self, name: &str) -> Result<(), ManifestError> {
        self.delete(&cluster_policy_file(name))
    }

    /// Writes the policy a scenario's policy identity names (`namespace/name`: a
    /// `NetworkPolicy`; `name`: a `ClusterNetworkPolicy`).
    pub fn policy_by_identity(
        &self,
        identity: &str,
        object: &serde_yaml::Value,
    ) -> Result<(), ManifestError> {
        match PolicyName::of(identity) {
            PolicyName::Namespaced { namespace, name } => self.policy(namespace, name, object),
            PolicyName::Cluster { name } => self.cluster_policy(name, object),
        }
    }

    /// Deletes what [`Self::policy_by_identity`] wrote.
    pub fn delete_policy_by_identity(&self, identity: &str) -> Result<(), ManifestError> {
        match PolicyName::of(identity) {
            PolicyName::Namespaced { namespace, name } => self.delete_policy(namespace, name),
            PolicyName::Cluster { name } => self.delete_cluster_policy(name),
        }
    }

    /// Writes any object under a file name of the caller's choosing (Services, `EndpointSlices`).
    pub fn object(&self, file: &str, object: &impl serde::Serialize) -> Result<(), ManifestError> {
        self.write(file, object)
    }

    /// Removes a file written by [`Self::object`].
    pub fn remove(&self, file: &str) -> Result<(), ManifestError> {
        self.delete(file)
    }

    fn write(&self, file: &str, object: &impl serde::Serialize) -> Result<(), ManifestError> {
        let text = serde_yaml::to_string(object).map_err(|source| ManifestError::Serialize {
            name: file.to_owned(),
            source,
        })?;
        let path = self.dir.join(file);
        // The agent ignores dot files, and a rename replaces the file in one step, so it never
        // reads a half-written object.
        let temporary = self.dir.join(format!(".tmp-{file}"));
        fs::write(&temporary, text)
            .and_then(|()| fs::rename(&temporary, &path))
            .map_err(|source| ManifestError::Write { path, source })
    }

    fn delete(&self, file: &str) -> Result<(), ManifestError> {
        let path = self.dir.join(file);
        fs::remove_file(&path).map_err(|source| ManifestError::Delete { path, source })
    }
}

fn pod_file(namespace: &str, name: &str) -> String {
    format!("pod-{namespace}-{name}.yaml")
}

fn policy_file(namespace: &str, name: &str) -> String {
    format!("netpol-{namespace}-{name}.yaml")
}

fn cluster_policy_file(name: &str) -> String {
    format!("cnp-{name}.yaml")
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::scenario::{ContainerPort, Protocol};

    #[test]
    fn pod_object_looks_like_the_api_servers() {
        let dir = tempfile::tempdir().unwrap();
        let writer = ManifestWriter::new(dir.path());
        let pod = PodSpec {
            namespace: "x".to_owned(),
            name: "a".to_owned(),
            labels: Labels::from([("pod".to_owned(), "a".to_owned())]),
            ports: vec![ContainerPort {
                name: Some("http".to_owned()),
                container_port: 80,
                protocol: Protocol::Tcp,
            }],
            identity: crate::mtls::PodIdentity::default(),
        };
        writer
            .pod(
                &pod,
                &Addresses {
                    v4: Some(Ipv4Addr::new(10, 244, 0, 11)),
                    v6: None,
                },
            )
            .unwrap();
        let text = fs::read_to_string(dir.path().join("pod-x-a.yaml")).unwrap();
        let value: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
        assert_eq!(value["spec"]["nodeName"], NODE_NAME);
        assert_eq!(value["spec"]["containers"][0]["ports"][0]["name"], "http");
        assert_eq!(value["status"]["podIP"], "10.244.0.11");
        assert_eq!(value["status"]["podIPs"][0]["ip"], "10.244.0.11");
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary file is left"
        );
        writer.delete_pod("x", "a").unwrap();
        assert!(writer.delete_pod("x", "a").is_err());
    }

    #[test]
    fn cluster_policies_are_written_under_their_name_alone() {
        let dir = tempfile::tempdir().unwrap();
        let writer = ManifestWriter::new(dir.path());
        let object: serde_yaml::Value = serde_yaml::from_str(
            "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: { name: default }\nspec: { tier: Baseline, priority: 10, subject: { namespaces: {} } }\n",
        )
        .unwrap();
        writer.policy_by_identity("default", &object).unwrap();
        let namespaced: serde_yaml::Value = serde_yaml::from_str(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: { name: default, namespace: x }\nspec: { podSelector: {} }\n",
        )
        .unwrap();
        writer.policy_by_identity("x/default", &namespaced).unwrap();
        let text = fs::read_to_string(dir.path().join("cnp-default.yaml")).unwrap();
        let written: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
        assert_eq!(written, object);
        assert!(dir.path().join("netpol-x-default.yaml").is_file());
        writer.delete_policy_by_identity("default").unwrap();
        assert!(!dir.path().join("cnp-default.yaml").exists());
        assert!(
            dir.path().join("netpol-x-default.yaml").is_file(),
            "the namespaced one stays"
        );
        writer.delete_policy_by_identity("x/default").unwrap();
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
        assert!(writer.delete_cluster_policy("default").is_err());
    }
}
