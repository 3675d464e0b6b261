//! The manifests of `deploy/` are valid objects, grant exactly what the agent calls, and run it
//! with the least privilege it needs.
//!
//! Each document is deserialized into its k8s-openapi type and serialized back; any field of
//! the input that does not come back is a field the type does not know (a typo the API server
//! would drop or reject), reported with its path.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{Container, Namespace, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

/// The YAML files directly in `deploy/`, by name.
fn manifest_files() -> BTreeSet<String> {
    fs::read_dir(deploy_dir())
        .expect("deploy/ is listed")
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| {
            Path::new(name)
                .extension()
                .is_some_and(|extension| extension == "yaml" || extension == "yml")
        })
        .collect()
}

/// Every object of deploy/ but the kustomization, as JSON, with the file it comes from.
fn documents() -> Vec<(String, Value)> {
    let mut documents = Vec::new();
    for name in manifest_files() {
        if name == "kustomization.yaml" {
            continue;
        }
        let text = fs::read_to_string(deploy_dir().join(&name)).unwrap();
        for (index, document) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let yaml = <serde_yaml::Value as serde::Deserialize>::deserialize(document)
                .unwrap_or_else(|error| panic!("{name} document {index}: {error}"));
            if yaml.is_null() {
                continue;
            }
            let json = serde_json::to_value(&yaml)
                .unwrap_or_else(|error| panic!("{name} document {index}: {error}"));
            documents.push((format!("{name} document {index}"), json));
        }
    }
    documents
}

/// Paths of `input` that `typed` (the input after a round trip through its type) lacks or
/// changed.
fn dropped(input: &Value, typed: &Value, path: &str, problems: &mut Vec<String>) {
    match (input, typed) {
        (Value::Object(input), Value::Object(typed)) => {
            for (key, value) in input {
                let here = format!("{path}.{key}");
                match typed.get(key) {
                    Some(back) => dropped(value, back, &here, problems),
                    None => problems.push(format!("{here}: unknown field")),
                }
            }
        }
        (Value::Array(input), Value::Array(typed)) if input.len() == typed.len() => {
            for (index, (value, back)) in input.iter().zip(typed).enumerate() {
                dropped(value, back, &format!("{path}[{index}]"), problems);
            }
        }
        (input, typed) if input == typed => {}
        (input, typed) => problems.push(format!("{path}: {input} came back as {typed}")),
    }
}

/// Deserializes into `T`, rejecting fields `T` does not have.
fn strict<T: DeserializeOwned + Serialize>(origin: &str, value: &Value) -> Result<T, String> {
    let typed: T =
        serde_json::from_value(value.clone()).map_err(|error| format!("{origin}: {error}"))?;
    let back = serde_json::to_value(&typed).unwrap();
    let mut problems = Vec::new();
    dropped(value, &back, "", &mut problems);
    if problems.is_empty() {
        Ok(typed)
    } else {
        Err(format!("{origin}: {}", problems.join("; ")))
    }
}

/// The typed objects of deploy/.
#[derive(Default)]
struct Deploy {
    namespaces: Vec<Namespace>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    cluster_role_bindings: Vec<ClusterRoleBinding>,
    daemon_sets: Vec<DaemonSet>,
}

fn load() -> Deploy {
    let mut deploy = Deploy::default();
    let mut problems = Vec::new();
    for (origin, value) in documents() {
        let api_version = value["apiVersion"].as_str().unwrap_or_default();
        let kind = value["kind"].as_str().unwrap_or_default();
        let result = match (api_version, kind) {
            ("v1", "Namespace") => strict(&origin, &value).map(|o| deploy.namespaces.push(o)),
            ("v1", "ServiceAccount") => {
                strict(&origin, &value).map(|o| deploy.service_accounts.push(o))
            }
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
                strict(&origin, &value).map(|o| deploy.cluster_roles.push(o))
            }
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                strict(&origin, &value).map(|o| deploy.cluster_role_bindings.push(o))
            }
            ("apps/v1", "DaemonSet") => strict(&origin, &value).map(|o| deploy.daemon_sets.push(o)),
            _ => Err(format!("{origin}: unexpected {api_version} {kind}")),
        };
        if let Err(problem) = result {
            problems.push(problem);
        }
    }
    assert!(
        problems.is_empty(),
        "invalid manifests:\n{}",
        problems.join("\n")
    );
    deploy
}

fn agent_container(deploy: &Deploy) -> (&DaemonSet, &Container) {
    let [daemon_set] = deploy.daemon_sets.as_slice() else {
        panic!("expected one DaemonSet");
    };
    let spec = daemon_set
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap();
    let [container] = spec.containers.as_slice() else {
        panic!("expected one container");
    };
    (daemon_set, container)
}

#[test]
fn the_round_trip_check_catches_unknown_fields() {
    let value = serde_json::json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "x", "lables": {"a": "b"}}
    });
    let error = strict::<Namespace>("test", &value).unwrap_err();
    assert_eq!(error, "test: .metadata.lables: unknown field");
}

#[test]
fn every_manifest_is_a_valid_object_without_unknown_fields() {
    let deploy = load();
    assert_eq!(deploy.namespaces.len(), 1);
    assert_eq!(deploy.service_accounts.len(), 1);
    assert_eq!(deploy.cluster_roles.len(), 1);
    assert_eq!(deploy.cluster_role_bindings.len(), 1);
    assert_eq!(deploy.daemon_sets.len(), 1);
}

#[test]
fn the_kustomization_lists_every_manifest() {
    let text = fs::read_to_string(deploy_dir().join("kustomization.yaml")).unwrap();
    let kustomization: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    assert_eq!(
        kustomization["apiVersion"].as_str(),
        Some("kustomize.config.k8s.io/v1beta1")
    );
    assert_eq!(kustomization["kind"].as_str(), Some("Kustomization"));
    assert_eq!(
        kustomization["namespace"].as_str(),
        Some("netwarden-system")
    );
    let listed: BTreeSet<String> = kustomization["resources"]
        .as_sequence()
        .expect("resources is a list")
        .iter()
        .map(|resource| resource.as_str().unwrap().to_owned())
        .collect();
    let mut files = manifest_files();
    files.remove("kustomization.yaml");
    assert_eq!(listed, files);
}

#[test]
fn the_cluster_role_grants_exactly_what_the_agent_calls() {
    let deploy = load();
    let [role] = deploy.cluster_roles.as_slice() else {
        panic!("expected one ClusterRole");
    };
    let mut granted = BTreeSet::new();
    for rule in role.rules.iter().flatten() {
        assert!(rule.resource_names.is_none(), "{rule:?}");
        assert!(rule.non_resource_urls.is_none(), "{rule:?}");
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    granted.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    // The watchers list and watch (never get: tests/watch.rs sees every request they make);
    // Events are created, and patched when kube-rs's Recorder extends a series, in the
    // events.k8s.io group only (tests/events.rs sees both requests).
    let mut expected = BTreeSet::new();
    for (group, resource) in [
        ("", "pods"),
        ("", "namespaces"),
        ("", "services"),
        ("networking.k8s.io", "networkpolicies"),
        ("discovery.k8s.io", "endpointslices"),
        ("", "nodes"),
        ("policy.networking.k8s.io", "clusternetworkpolicies"),
    ] {
        for verb in ["list", "watch"] {
            expected.insert((group.to_owned(), resource.to_owned(), verb.to_owned()));
        }
    }
    for verb in ["create", "patch"] {
        expected.insert((
            "events.k8s.io".to_owned(),
            "events".to_owned(),
            verb.to_owned(),
        ));
    }
    let extra: Vec<_> = granted.difference(&expected).collect();
    let missing: Vec<_> = expected.difference(&granted).collect();
    assert!(
        extra.is_empty() && missing.is_empty(),
        "granted but not called: {extra:?}; called but not granted: {missing:?}"
    );
}

#[test]
fn the_binding_gives_the_role_to_the_daemon_sets_service_account() {
    let deploy = load();
    let (daemon_set, _) = agent_container(&deploy);
    let account = &deploy.service_accounts[0];
    let binding = &deploy.cluster_role_bindings[0];
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(
        Some(&binding.role_ref.name),
        deploy.cluster_roles[0].metadata.name.as_ref()
    );
    let [subject] = binding.subjects.as_deref().unwrap() else {
        panic!("expected one subject");
    };
    assert_eq!(subject.kind, "ServiceAccount");
    assert_eq!(Some(&subject.name), account.metadata.name.as_ref());
    assert_eq!(subject.namespace, account.metadata.namespace);
    let pod_spec = daemon_set
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap();
    assert_eq!(pod_spec.service_account_name, account.metadata.name);
    let namespace = deploy.namespaces[0].metadata.name.clone();
    assert_eq!(account.metadata.namespace, namespace);
    assert_eq!(daemon_set.metadata.namespace, namespace);
}

#[test]
fn the_agent_runs_unprivileged_with_only_the_capabilities_it_needs() {
    let deploy = load();
    let (_, container) = agent_container(&deploy);
    let security = container.security_context.as_ref().unwrap();
    assert_ne!(security.privileged, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(security.read_only_root_filesystem, Some(true));
    let capabilities = security.capabilities.as_ref().unwrap();
    assert_eq!(capabilities.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    let added: BTreeSet<&str> = capabilities
        .add
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    assert_eq!(
        added,
        BTreeSet::from(["BPF", "NET_ADMIN", "PERFMON", "SYS_RESOURCE"])
    );
    // The API server allows Bidirectional propagation only in privileged containers.
    for mount in container.volume_mounts.iter().flatten() {
        assert_ne!(
            mount.mount_propagation.as_deref(),
            Some("Bidirectional"),
            "{}",
            mount.name
        );
    }
}

#[test]
fn the_daemon_set_covers_every_linux_node_and_reaches_the_host() {
    let deploy = load();
    let (daemon_set, container) = agent_container(&deploy);
    let spec = daemon_set.spec.as_ref().unwrap();
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(
        pod.node_selector.as_ref().unwrap()["kubernetes.io/os"],
        "linux"
    );
    assert!(
        pod.tolerations.iter().flatten().any(|toleration| {
            toleration.operator.as_deref() == Some("Exists")
                && toleration.key.is_none()
                && toleration.effect.is_none()
        }),
        "must tolerate every taint"
    );
    let rolling = spec
        .update_strategy
        .as_ref()
        .and_then(|strategy| strategy.rolling_update.as_ref())
        .unwrap();
    assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(1)));

    let node_name = container
        .env
        .iter()
        .flatten()
        .find(|env| env.name == "NODE_NAME")
        .expect("NODE_NAME is set");
    let field = node_name
        .value_from
        .as_ref()
        .and_then(|from| from.field_ref.as_ref())
        .unwrap();
    assert_eq!(field.field_path, "spec.nodeName");

    // /sys/fs/bpf is the host's, so pins outlive the pod.
    let bpffs = pod
        .volumes
        .iter()
        .flatten()
        .find(|volume| {
            volume
                .host_path
                .as_ref()
                .is_some_and(|host| host.path == "/sys/fs/bpf")
        })
        .expect("a hostPath volume for /sys/fs/bpf");
    assert!(
        container
            .volume_mounts
            .iter()
            .flatten()
            .any(|mount| mount.name == bpffs.name && mount.mount_path == "/sys/fs/bpf")
    );

    // The status file is on a writable volume (the root filesystem is read-only).
    let args = container.args.as_deref().unwrap();
    let status_file = args
        .iter()
        .find_map(|arg| arg.strip_prefix("--status-file="))
        .expect("--status-file is given");
    assert_eq!(status_file, "/run/netwarden/status.json");
    let status_mount = container
        .volume_mounts
        .iter()
        .flatten()
        .find(|mount| status_file.starts_with(&format!("{}/", mount.mount_path)))
        .expect("the status file's directory is mounted");
    assert!(
        pod.volumes
            .iter()
            .flatten()
            .any(|volume| volume.name == status_mount.name && volume.empty_dir.is_some())
    );
    assert_ne!(status_mount.read_only, Some(true));
}

#[test]
fn probes_and_resources_are_set() {
    let deploy = load();
    let (_, container) = agent_container(&deploy);
    let metrics_port = container
        .ports
        .iter()
        .flatten()
        .find(|port| port.name.as_deref() == Some("metrics"))
        .expect("a metrics port");
    assert_eq!(metrics_port.container_port, 9963);
    for (probe, path) in [
        (&container.liveness_probe, "/healthz"),
        (&container.readiness_probe, "/readyz"),
    ] {
        let get = probe
            .as_ref()
            .and_then(|probe| probe.http_get.as_ref())
            .unwrap();
        assert_eq!(get.path.as_deref(), Some(path));
        assert!(
            matches!(
                &get.port,
                IntOrString::String(name) if name == "metrics"
            ) || get.port == IntOrString::Int(9963)
        );
    }
    let resources = container.resources.as_ref().unwrap();
    for key in ["cpu", "memory"] {
        assert!(
            resources.requests.as_ref().unwrap().contains_key(key),
            "request {key}"
        );
        assert!(
            resources.limits.as_ref().unwrap().contains_key(key),
            "limit {key}"
        );
    }
}
