//! `netwarden-e2e kind --dry-run` (what `cargo xtask e2e-kind --dry-run` runs): the commands
//! and manifests of a kind run, in order, checked without a cluster.
//!
//! The output is read the way a shell would read it: comment lines, command lines, and
//! here-documents (`<<'EOF'` ... `EOF`) holding the generated files and manifests. Every manifest
//! is parsed into its k8s-openapi type, rejecting fields the type does not know.

use std::{path::PathBuf, process::Command};

use k8s_openapi::api::{
    core::v1::{Namespace, Pod},
    networking::v1::NetworkPolicy,
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

/// The scenario every deployment of this repository is checked with, from `shared/`.
const SHARED: &str = "../shared/scenarios/default-deny-ingress.yaml";
/// A scenario of this repository with a `{{cidr}}` placeholder and the nine-pod model.
const LOCAL: &str =
    "tests/scenarios/upstream/should-allow-egress-access-to-server-in-cidr-block.yaml";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// One command of the output, with its here-document.
#[derive(Debug)]
struct Entry {
    command: String,
    body: Option<String>,
}

/// The commands, and the report lines (`PLANNED name`, `SKIP name: why`, the summary).
fn dry_run(scenarios: &[&str]) -> (Vec<Entry>, Vec<String>) {
    let output = Command::new(env!("CARGO_BIN_EXE_netwarden-e2e"))
        .current_dir(repo())
        .args(["kind", "--dry-run"])
        .args(scenarios)
        .output()
        .expect("running netwarden-e2e");
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut entries = Vec::new();
    let mut reports = Vec::new();
    let mut lines = stdout.lines();
    while let Some(line) = lines.next() {
        if line.starts_with('#') {
            continue;
        }
        if ["PLANNED ", "SKIP ", "PASS ", "FAIL ", "dry run: "]
            .iter()
            .any(|report| line.starts_with(report))
        {
            reports.push(line.to_owned());
            continue;
        }
        let (command, body) = match line.strip_suffix(" <<'EOF'") {
            Some(command) => {
                let mut body = String::new();
                for line in lines.by_ref() {
                    if line == "EOF" {
                        break;
                    }
                    body.push_str(line);
                    body.push('\n');
                }
                (command.to_owned(), Some(body))
            }
            None => (line.to_owned(), None),
        };
        entries.push(Entry { command, body });
    }
    (entries, reports)
}

/// Index of the first command starting with `prefix` at or after `from`.
fn find(entries: &[Entry], from: usize, prefix: &str) -> usize {
    entries[from..]
        .iter()
        .position(|entry| entry.command.starts_with(prefix))
        .map_or_else(
            || panic!("no command {prefix:?} after #{from}: {entries:#?}"),
            |index| from + index,
        )
}

/// Parses `value` into `T`, failing on any field `T` does not know (it would not come back).
fn strict<T: DeserializeOwned + Serialize>(value: &Value) -> T {
    let typed: T =
        serde_json::from_value(value.clone()).unwrap_or_else(|error| panic!("{error}: {value:#}"));
    let back = serde_json::to_value(&typed).unwrap();
    assert_eq!(&back, value, "fields lost in the round trip");
    typed
}

fn documents(body: &str) -> Vec<Value> {
    body.split("---\n")
        .filter(|document| !document.trim().is_empty())
        .map(|document| serde_yaml::from_str(document).unwrap())
        .collect()
}

const KUBECTL: &str = "kubectl --context kind-netwarden-e2e";

#[test]
fn the_cluster_is_created_the_agent_deployed_and_the_cluster_deleted_in_order() {
    assert!(
        repo().join(SHARED).is_file(),
        "{SHARED} is missing: the shared scenarios sit beside the repository"
    );
    let (entries, reports) = dry_run(&[SHARED, LOCAL]);

    let config = find(&entries, 0, "cat > target/e2e-kind/kind.yaml");
    assert_eq!(config, 0, "the kind configuration comes first");
    let cluster: Value = serde_yaml::from_str(entries[config].body.as_deref().unwrap()).unwrap();
    assert_eq!(cluster["kind"], "Cluster");
    assert_eq!(cluster["nodes"].as_array().unwrap().len(), 3);
    assert!(
        cluster.get("networking").is_none(),
        "kindnet, the default CNI"
    );
    let create = find(&entries, 0, "kind create cluster");
    assert_eq!(create, 1, "kind create cluster is the first command");
    assert_eq!(
        entries[create].command,
        "kind create cluster --name netwarden-e2e --config target/e2e-kind/kind.yaml --wait 120s"
    );

    let build = find(&entries, create, "docker build");
    assert_eq!(
        entries[build].command,
        "docker build -f ./deploy/Containerfile -t netwarden:dev ."
    );
    let load = find(&entries, build, "kind load docker-image");
    assert_eq!(
        entries[load].command,
        "kind load docker-image netwarden:dev --name netwarden-e2e"
    );
    let overlay = find(
        &entries,
        load,
        "cat > target/e2e-kind/overlay/kustomization.yaml",
    );
    let kustomization: Value =
        serde_yaml::from_str(entries[overlay].body.as_deref().unwrap()).unwrap();
    // Relative to the overlay: kustomize refuses absolute bases.
    let base = PathBuf::from(kustomization["resources"][0].as_str().unwrap());
    assert_eq!(base, PathBuf::from("../../../deploy"));
    // (target/e2e-kind/overlay is three levels below the root, which holds deploy/.)
    assert!(repo().join("deploy/kustomization.yaml").is_file());
    assert_eq!(
        kustomization["images"][0]["name"],
        "ghcr.io/netwarden/netwarden"
    );
    assert_eq!(kustomization["images"][0]["newName"], "netwarden");
    assert_eq!(kustomization["images"][0]["newTag"], "dev");
    let apply = find(&entries, overlay, &format!("{KUBECTL} apply -k"));
    assert_eq!(
        entries[apply].command,
        format!("{KUBECTL} apply -k target/e2e-kind/overlay")
    );
    let rollout = find(
        &entries,
        apply,
        &format!("{KUBECTL} -n netwarden-system rollout status"),
    );
    let first_pods = find(&entries, rollout, &format!("{KUBECTL} apply -f -"));
    assert!(
        entries[first_pods]
            .body
            .as_deref()
            .unwrap()
            .contains("kind: Pod"),
        "pods come after the rollout"
    );

    let delete = find(&entries, 0, "kind delete cluster");
    assert_eq!(delete, entries.len() - 1, "the cluster is deleted last");
    assert_eq!(
        entries[delete].command,
        "kind delete cluster --name netwarden-e2e"
    );
    assert_eq!(
        reports,
        [
            "PLANNED default deny ingress in namespace x, then allow from pods labelled \
             role=client (dry run: probes not evaluated)",
            "PLANNED NetworkPolicy between server and client should allow egress access to \
             server in CIDR block [Feature:NetworkPolicy] (dry run: probes not evaluated)",
            "dry run: 2 scenarios planned, 0 skipped",
        ]
    );
}

/// The namespaces and pods of the shared scenario's model.
fn check_shared_objects(body: &str) {
    let mut namespaces = Vec::new();
    let mut pods = Vec::new();
    for document in documents(body) {
        match document["kind"].as_str() {
            Some("Namespace") => namespaces.push(strict::<Namespace>(&document)),
            Some("Pod") => pods.push(strict::<Pod>(&document)),
            other => panic!("unexpected {other:?}"),
        }
    }
    let names: Vec<_> = namespaces
        .iter()
        .map(|namespace| namespace.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(names, ["x", "y"]);
    let mut pod_names: Vec<_> = pods
        .iter()
        .map(|pod| {
            format!(
                "{}/{}",
                pod.metadata.namespace.as_deref().unwrap(),
                pod.metadata.name.as_deref().unwrap()
            )
        })
        .collect();
    pod_names.sort();
    assert_eq!(pod_names, ["x/client", "x/server", "y/client", "y/other"]);
    let server = pods
        .iter()
        .find(|pod| pod.metadata.name.as_deref() == Some("server"))
        .unwrap();
    assert_eq!(server.metadata.labels.as_ref().unwrap()["app"], "server");
    let containers = &server.spec.as_ref().unwrap().containers;
    let serving: Vec<_> = containers
        .iter()
        .map(|container| {
            let port = &container.ports.as_ref().unwrap()[0];
            assert_eq!(
                container.image.as_deref(),
                Some("registry.k8s.io/e2e-test-images/agnhost:2.53")
            );
            let command = container.command.as_ref().unwrap().join(" ");
            (
                port.name.clone().unwrap(),
                port.container_port,
                port.protocol.clone().unwrap(),
                command,
            )
        })
        .collect();
    assert_eq!(
        serving,
        [
            (
                "http".to_owned(),
                80,
                "TCP".to_owned(),
                "/agnhost serve-hostname --tcp --http=false --port 80".to_owned()
            ),
            (
                "dns".to_owned(),
                53,
                "UDP".to_owned(),
                "/agnhost serve-hostname --udp --http=false --port 53".to_owned()
            ),
        ]
    );
}

#[test]
fn the_shared_default_deny_scenario_becomes_pods_policies_and_probes() {
    let (entries, _) = dry_run(&[SHARED]);
    let rollout = find(
        &entries,
        0,
        &format!("{KUBECTL} -n netwarden-system rollout status"),
    );

    // Namespaces and pods: one Pod per model pod, one serving container per container port.
    let objects = find(&entries, rollout, &format!("{KUBECTL} apply -f -"));
    check_shared_objects(entries[objects].body.as_deref().unwrap());

    // Every namespace's pods are ready before the first policy.
    let wait_x = find(
        &entries,
        objects,
        &format!("{KUBECTL} -n x wait --for=condition=Ready pod --all"),
    );
    let wait_y = find(
        &entries,
        objects,
        &format!("{KUBECTL} -n y wait --for=condition=Ready pod --all"),
    );
    let deny = find(&entries, objects + 1, &format!("{KUBECTL} apply -f -"));
    assert!(wait_x < deny && wait_y < deny);
    let policy = strict::<NetworkPolicy>(&documents(entries[deny].body.as_deref().unwrap())[0]);
    assert_eq!(policy.metadata.name.as_deref(), Some("deny-ingress"));
    assert_eq!(policy.metadata.namespace.as_deref(), Some("x"));

    // The first probe runs before the policy, with the scenario's expectations: four pods,
    // twelve pairs.
    let probes: Vec<(usize, &Entry)> = entries
        .iter()
        .enumerate()
        .filter(|(_, entry)| entry.command.contains(" exec "))
        .collect();
    assert_eq!(probes.len(), 4 * 12);
    assert!(probes[11].0 < deny && deny < probes[12].0);
    assert_eq!(
        probes[0].1.command,
        format!(
            "{KUBECTL} -n x exec server -c serve-80-tcp -- /agnhost connect '<ip x/client>:80' \
             --timeout=3s --protocol=tcp  # x/server -> x/client: expect connects"
        )
    );
    // After deny-ingress, y/other cannot reach x/server; it still reaches y/client.
    let after_deny: Vec<&str> = probes[12..24]
        .iter()
        .map(|(_, entry)| entry.command.as_str())
        .collect();
    assert!(
        after_deny.contains(
            &format!(
                "{KUBECTL} -n y exec other -c serve-80-tcp -- /agnhost connect '<ip x/server>:80' \
             --timeout=3s --protocol=tcp  # y/other -> x/server: expect blocked"
            )
            .as_str()
        )
    );
    assert!(after_deny.iter().any(|command| command
        .ends_with("connect '<ip y/client>:80' --timeout=3s --protocol=tcp  # y/other -> y/client: expect connects")));
    // The last probe is over UDP on port 53, every pair blocked towards x.
    let last_probe = probes[47].1.command.as_str();
    assert!(
        last_probe.ends_with("connect '<ip y/client>:53' --timeout=3s --protocol=udp  # y/other -> y/client: expect connects"),
        "{last_probe}"
    );
    assert!(probes[36..48].iter().all(|(_, entry)| {
        !entry.command.contains("'<ip x/") || entry.command.ends_with("expect blocked")
    }));

    // Then the namespaces go, before the cluster.
    let cleanup = find(
        &entries,
        probes[47].0,
        &format!("{KUBECTL} delete namespace x y"),
    );
    assert_eq!(cleanup + 1, entries.len() - 1);
}

#[test]
fn placeholders_become_the_pods_addresses_and_unsupported_scenarios_are_skipped() {
    let (entries, _) = dry_run(&[LOCAL, "tests/scenarios/semantics/ipv6-only.yaml"]);
    let policies: Vec<NetworkPolicy> = entries
        .iter()
        .filter_map(|entry| entry.body.as_deref())
        .flat_map(documents)
        .filter(|document| document["kind"] == "NetworkPolicy")
        .map(|document| strict::<NetworkPolicy>(&document))
        .collect();
    let [policy] = policies.as_slice() else {
        panic!("expected one policy, got {policies:?}");
    };
    let egress = &policy.spec.as_ref().unwrap().egress.as_ref().unwrap()[0];
    let block = egress.to.as_ref().unwrap()[0].ip_block.as_ref().unwrap();
    assert_eq!(block.cidr, "<cidr y/b 32>");
    // Nine pods, six ports each (80 and 81 over TCP, UDP and SCTP); SCTP is served by porter.
    let objects = entries
        .iter()
        .find(|entry| {
            entry
                .body
                .as_deref()
                .is_some_and(|body| body.contains("kind: Pod"))
        })
        .unwrap();
    let pods: Vec<Pod> = documents(objects.body.as_deref().unwrap())
        .iter()
        .filter(|document| document["kind"] == "Pod")
        .map(strict::<Pod>)
        .collect();
    assert_eq!(pods.len(), 9);
    let containers = &pods[0].spec.as_ref().unwrap().containers;
    assert_eq!(containers.len(), 6);
    let sctp = containers
        .iter()
        .find(|container| container.name == "serve-81-sctp")
        .unwrap();
    assert_eq!(sctp.command.as_ref().unwrap(), &["/agnhost", "porter"]);
    assert_eq!(sctp.env.as_ref().unwrap()[0].name, "SERVE_SCTP_PORT_81");
    assert_eq!(
        entries
            .iter()
            .filter(|entry| entry.command.contains(" exec "))
            .count(),
        9 * 8
    );

    let output = Command::new(env!("CARGO_BIN_EXE_netwarden-e2e"))
        .current_dir(repo())
        .args([
            "kind",
            "--dry-run",
            "tests/scenarios/semantics/ipv6-only.yaml",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(
        stdout.contains(": the kind cluster is IPv4-only\n"),
        "{stdout}"
    );
    assert!(
        stdout.ends_with("dry run: 0 scenarios planned, 1 skipped\n"),
        "{stdout}"
    );
}
