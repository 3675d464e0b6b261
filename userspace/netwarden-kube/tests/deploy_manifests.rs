//! The manifests of `deploy/`, and what the Helm chart in `deploy/helm/netwarden` renders with
//! its default values and with others, are valid objects, grant exactly what the agent calls,
//! and run it with the least privilege it needs.
//!
//! Each document is deserialized into its k8s-openapi type and serialized back; any field of
//! the input that does not come back is a field the type does not know (a typo the API server
//! would drop or reject), reported with its path.
//!
//! No `helm` binary can be installed where these tests run (no package registry ships one), so
//! the chart is rendered the way `helm template` renders it, with Go's template language
//! (`gtmpl`) and the few Helm functions the chart uses (`toYaml`, `nindent`, `quote`),
//! implemented below: the templates keep to that subset.

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
        documents.extend(stream_documents(&name, &text));
    }
    documents
}

/// The objects of a YAML stream, as JSON, named `NAME document INDEX`.
fn stream_documents(name: &str, text: &str) -> Vec<(String, Value)> {
    let mut documents = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let yaml = <serde_yaml::Value as serde::Deserialize>::deserialize(document)
            .unwrap_or_else(|error| panic!("{name} document {index}: {error}"));
        if yaml.is_null() {
            continue;
        }
        let json = serde_json::to_value(&yaml)
            .unwrap_or_else(|error| panic!("{name} document {index}: {error}"));
        documents.push((format!("{name} document {index}"), json));
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
    load_documents(documents())
}

/// deploy/, then the chart with its defaults, then with [`CUSTOM_VALUES`]: every check below
/// holds for each.
fn every_render() -> Vec<Deploy> {
    vec![
        load(),
        load_documents(chart::render("netwarden", "netwarden-system", "")),
        load_documents(chart::render("nw", "policy-system", CUSTOM_VALUES)),
    ]
}

/// Values an operator might set, within what the checks below require of every render.
const CUSTOM_VALUES: &str = r"
image: {repository: registry.example/netwarden, tag: v1.2.3, pullPolicy: Always}
resources:
  requests: {cpu: 100m, memory: 128Mi}
  limits: {cpu: '1', memory: 512Mi}
tolerations:
  - operator: Exists
  - {key: dedicated, operator: Equal, value: gateway, effect: NoSchedule}
listeners: {metricsPort: 9963, authz: {enabled: false, port: 9191}}
logJson: false
audit: true
extraArgs: [--watch-stale-after=2m]
";

fn load_documents(documents: Vec<(String, Value)>) -> Deploy {
    let mut deploy = Deploy::default();
    let mut problems = Vec::new();
    for (origin, value) in documents {
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
    for deploy in every_render() {
        let deploy = &deploy;
        assert_eq!(deploy.namespaces.len(), 1);
        assert_eq!(deploy.service_accounts.len(), 1);
        assert_eq!(deploy.cluster_roles.len(), 1);
        assert_eq!(deploy.cluster_role_bindings.len(), 1);
        assert_eq!(deploy.daemon_sets.len(), 1);
    }
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
    for deploy in every_render() {
        let deploy = &deploy;
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
}

#[test]
fn the_binding_gives_the_role_to_the_daemon_sets_service_account() {
    for deploy in every_render() {
        let deploy = &deploy;
        let (daemon_set, _) = agent_container(deploy);
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
}

#[test]
fn the_agent_runs_unprivileged_with_only_the_capabilities_it_needs() {
    for deploy in every_render() {
        let deploy = &deploy;
        let (_, container) = agent_container(deploy);
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
}

#[test]
fn the_daemon_set_covers_every_linux_node_and_reaches_the_host() {
    for deploy in every_render() {
        let deploy = &deploy;
        let (daemon_set, container) = agent_container(deploy);
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
}

#[test]
fn probes_and_resources_are_set() {
    for deploy in every_render() {
        let deploy = &deploy;
        let (_, container) = agent_container(deploy);
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
}

#[test]
fn the_charts_defaults_run_the_agent_exactly_as_deploy_does() {
    let kustomize = load();
    let chart = load_documents(chart::render("netwarden", "netwarden-system", ""));
    let (kustomize_set, kustomize_container) = agent_container(&kustomize);
    let (chart_set, chart_container) = agent_container(&chart);
    assert_eq!(chart_container, kustomize_container);
    let pod_spec = |set: &DaemonSet| set.spec.as_ref().unwrap().template.spec.clone().unwrap();
    assert_eq!(pod_spec(chart_set), pod_spec(kustomize_set));
    assert_eq!(
        chart.cluster_roles[0].rules,
        kustomize.cluster_roles[0].rules
    );
    assert_eq!(
        chart.namespaces[0].metadata.labels.as_ref().unwrap()["pod-security.kubernetes.io/enforce"],
        "privileged"
    );
}

#[test]
fn the_charts_values_reach_the_daemon_set() {
    let chart = load_documents(chart::render("nw", "policy-system", CUSTOM_VALUES));
    let (daemon_set, container) = agent_container(&chart);
    assert_eq!(daemon_set.metadata.name.as_deref(), Some("nw"));
    assert_eq!(
        container.image.as_deref(),
        Some("registry.example/netwarden:v1.2.3")
    );
    assert_eq!(container.image_pull_policy.as_deref(), Some("Always"));
    let args = container.args.clone().unwrap();
    assert!(args.contains(&"--audit".to_owned()), "{args:?}");
    assert!(
        args.contains(&"--watch-stale-after=2m".to_owned()),
        "{args:?}"
    );
    assert!(
        !args.iter().any(|arg| arg.starts_with("--authz-address")),
        "{args:?}"
    );
    assert!(!args.contains(&"--log-json".to_owned()), "{args:?}");
    let ports: Vec<&str> = container
        .ports
        .iter()
        .flatten()
        .filter_map(|port| port.name.as_deref())
        .collect();
    assert_eq!(ports, ["metrics"]);
    let limits = container
        .resources
        .as_ref()
        .unwrap()
        .limits
        .as_ref()
        .unwrap();
    assert_eq!(limits["memory"].0, "512Mi");
    let tolerations = daemon_set
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .tolerations
        .as_ref()
        .unwrap();
    assert_eq!(tolerations.len(), 2);
    assert_eq!(
        chart.namespaces[0].metadata.name.as_deref(),
        Some("policy-system")
    );

    let without_namespace = load_documents(chart::render(
        "nw",
        "policy-system",
        "createNamespace: false",
    ));
    assert!(without_namespace.namespaces.is_empty());
}

/// `helm template` for `deploy/helm/netwarden`, in the subset of Go templates and Helm
/// functions the chart keeps to.
mod chart {
    use std::{collections::HashMap, fs, path::PathBuf};

    use gtmpl::{Context, FuncError, Template, Value as Tmpl};
    use serde_json::Value;

    fn chart_dir() -> PathBuf {
        super::deploy_dir().join("helm/netwarden")
    }

    /// The objects the chart renders for a release `name` in `namespace`, with `overrides`
    /// (YAML) merged over `values.yaml`, named by template file.
    pub fn render(name: &str, namespace: &str, overrides: &str) -> Vec<(String, Value)> {
        let defaults: serde_yaml::Value =
            serde_yaml::from_str(&fs::read_to_string(chart_dir().join("values.yaml")).unwrap())
                .unwrap();
        let mut values = serde_json::to_value(defaults).unwrap();
        if !overrides.trim().is_empty() {
            let overrides: serde_yaml::Value = serde_yaml::from_str(overrides).unwrap();
            merge(&mut values, serde_json::to_value(overrides).unwrap());
        }
        let context = serde_json::json!({
            "Values": values,
            "Release": {"Name": name, "Namespace": namespace, "Service": "Helm"},
            "Chart": {"Name": "netwarden"},
        });
        let mut templates: Vec<PathBuf> = fs::read_dir(chart_dir().join("templates"))
            .unwrap()
            .map(|entry| entry.unwrap().path())
            .filter(|path| {
                path.extension()
                    .is_some_and(|extension| extension == "yaml")
            })
            .collect();
        templates.sort();
        assert!(!templates.is_empty());
        let mut documents = Vec::new();
        for path in templates {
            let file = path.file_name().unwrap().to_string_lossy().into_owned();
            let mut template = Template::default();
            template.add_func("toYaml", to_yaml);
            template.add_func("nindent", nindent);
            template.add_func("quote", quote);
            template
                .parse(fs::read_to_string(&path).unwrap())
                .unwrap_or_else(|error| panic!("{file}: {error}"));
            let text = template
                .render(&Context::from(to_tmpl(&context)))
                .unwrap_or_else(|error| panic!("{file}: {error}"));
            assert!(
                !text.contains("<no value>"),
                "{file}: a value is missing:\n{text}"
            );
            documents.extend(super::stream_documents(&file, &text));
        }
        documents
    }

    /// Helm's deep merge of `--values` over the defaults: maps merge, anything else replaces.
    fn merge(base: &mut Value, overrides: Value) {
        match (base, overrides) {
            (Value::Object(base), Value::Object(overrides)) => {
                for (key, value) in overrides {
                    match base.get_mut(&key) {
                        Some(existing) => merge(existing, value),
                        None => {
                            base.insert(key, value);
                        }
                    }
                }
            }
            (base, overrides) => *base = overrides,
        }
    }

    fn to_tmpl(value: &Value) -> Tmpl {
        match value {
            Value::Null => Tmpl::Nil,
            Value::Bool(flag) => Tmpl::Bool(*flag),
            Value::Number(number) => number
                .as_i64()
                .map_or_else(|| Tmpl::from(number.as_f64().unwrap()), Tmpl::from),
            Value::String(text) => Tmpl::from(text.as_str()),
            Value::Array(items) => Tmpl::Array(items.iter().map(to_tmpl).collect()),
            Value::Object(map) => Tmpl::Object(
                map.iter()
                    .map(|(key, value)| (key.clone(), to_tmpl(value)))
                    .collect::<HashMap<_, _>>(),
            ),
        }
    }

    fn from_tmpl(value: &Tmpl) -> Value {
        match value {
            Tmpl::Bool(flag) => Value::Bool(*flag),
            Tmpl::String(text) => Value::String(text.clone()),
            Tmpl::Number(number) => number.as_i64().map_or_else(
                || serde_json::json!(number.as_f64().unwrap()),
                |integer| serde_json::json!(integer),
            ),
            Tmpl::Array(items) => Value::Array(items.iter().map(from_tmpl).collect()),
            Tmpl::Object(map) | Tmpl::Map(map) => Value::Object(
                map.iter()
                    .map(|(key, value)| (key.clone(), from_tmpl(value)))
                    .collect(),
            ),
            Tmpl::Nil | Tmpl::NoValue | Tmpl::Function(_) => Value::Null,
        }
    }

    fn text_argument(name: &str, args: &[Tmpl], index: usize) -> Result<String, FuncError> {
        match args.get(index) {
            Some(Tmpl::String(text)) => Ok(text.clone()),
            Some(other) => Ok(other.to_string()),
            None => Err(FuncError::AtLeastXArgs(name.to_owned(), index + 1)),
        }
    }

    /// `toYaml`: the value as YAML, without the trailing newline.
    fn to_yaml(args: &[Tmpl]) -> Result<Tmpl, FuncError> {
        let value = args
            .first()
            .ok_or_else(|| FuncError::ExactlyXArgs("toYaml".to_owned(), 1))?;
        let yaml = serde_yaml::to_string(&from_tmpl(value))
            .map_err(|error| FuncError::Generic(error.to_string()))?;
        Ok(Tmpl::from(yaml.trim_end().to_owned()))
    }

    /// `nindent N TEXT`: a newline, then TEXT with every line indented by N spaces.
    fn nindent(args: &[Tmpl]) -> Result<Tmpl, FuncError> {
        let width = match args.first() {
            Some(Tmpl::Number(number)) => number
                .as_u64()
                .ok_or_else(|| FuncError::Generic("nindent: width".to_owned()))?,
            _ => return Err(FuncError::ExactlyXArgs("nindent".to_owned(), 2)),
        };
        let text = text_argument("nindent", args, 1)?;
        let pad = " ".repeat(usize::try_from(width).unwrap());
        let lines: Vec<String> = text.lines().map(|line| format!("{pad}{line}")).collect();
        Ok(Tmpl::from(format!("\n{}", lines.join("\n"))))
    }

    /// `quote`: a double-quoted string (JSON's escaping is a subset of YAML's).
    fn quote(args: &[Tmpl]) -> Result<Tmpl, FuncError> {
        let text = text_argument("quote", args, 0)?;
        Ok(Tmpl::from(serde_json::to_string(&text).unwrap()))
    }
}
