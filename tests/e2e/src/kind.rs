//! `netwarden-e2e kind`: the scenario files on a real cluster made by kind.
//!
//! One kind cluster (kindnet, one control plane and two workers) runs the agent's image as the
//! DaemonSet of `deploy/`. Each scenario becomes real objects: its namespaces with their labels,
//! one Pod per model pod whose containers serve every container port (agnhost
//! `serve-hostname`, one container per port and protocol, as upstream's NetworkPolicy e2e
//! does), its NetworkPolicies with the placeholders filled from the pods' IPs, and its probes as
//! `kubectl exec ... /agnhost connect` from the source pod. Every command is printed before it
//! runs; with `--dry-run` nothing runs, and pod IPs are printed as `<ip NS/POD>`.
//!
//! What a real cluster cannot give is skipped with the reason: chosen IPs (`reuse_ip_of`), pods
//! whose Pod object does not exist yet (`publish: false`), long-lived connections kept by the
//! harness, hosts outside the pod network, and IPv6 (the cluster is IPv4-only).

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::Write as _,
    net::Ipv4Addr,
    path::{Component, Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, bail};
use indexmap::IndexMap;
use k8s_openapi::{
    api::core::v1::{
        Container, ContainerPort as K8sContainerPort, EnvVar, Namespace, Pod, PodSpec as K8sPodSpec,
    },
    api::networking::v1::NetworkPolicy,
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use crate::{
    driver::{
        self, At, CannotRun, Capabilities, Change, Driver, Findings, NewPod, PlayError, Support,
    },
    placeholder::{self, Placeholder},
    scenario::{self, ContainerPort, IpFamily, Labels, Protocol, RestartMode, Scenario, Step},
};

/// The ClusterNetworkPolicy CRD of the network-policy-api release the conformance suite in
/// `tests/scenarios/cluster-policy` was ported from (`docs/cluster-network-policy.md`).
pub const CLUSTER_NETWORK_POLICY_CRD: &str = "https://raw.githubusercontent.com/kubernetes-sigs/network-policy-api/refs/tags/v0.2.0/config/crd/experimental/policy.networking.k8s.io_clusternetworkpolicies.yaml";

/// The server image of upstream's NetworkPolicy e2e.
pub const AGNHOST: &str = "registry.k8s.io/e2e-test-images/agnhost:2.53";
/// The namespace of `deploy/`.
const AGENT_NAMESPACE: &str = "netwarden-system";
/// The image `deploy/kustomization.yaml` names.
const DEPLOY_IMAGE: &str = "ghcr.io/netwarden/netwarden";
/// How long one probe may take before it counts as blocked.
const PROBE_TIMEOUT: &str = "3s";

/// The container engine that builds the image and that kind runs its nodes with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Engine {
    /// Docker: kind's default provider; `kind load docker-image` reads its images.
    Docker,
    /// Podman: kind's experimental provider; images are loaded from an archive.
    Podman,
}

impl Engine {
    fn program(self) -> &'static str {
        match self {
            Self::Docker => "docker",
            Self::Podman => "podman",
        }
    }
}

/// What `netwarden-e2e kind` was asked to do.
#[derive(Debug, clap::Args)]
pub struct KindArgs {
    /// Print every command and generated manifest, in order, and run nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Leave the cluster running at the end (for a look with kubectl).
    #[arg(long)]
    pub keep: bool,
    /// The kind cluster's name.
    #[arg(long, default_value = "netwarden-e2e")]
    pub cluster: String,
    /// The agent image to build and load.
    #[arg(long, default_value = "netwarden:dev")]
    pub image: String,
    /// The container engine.
    #[arg(long, value_enum, default_value_t = Engine::Docker)]
    pub engine: Engine,
    /// The repository's root (holds `deploy/`).
    #[arg(long, default_value = ".")]
    pub repo: PathBuf,
    /// Where generated files (kind configuration, kustomize overlay) are written.
    #[arg(long, default_value = "target/e2e-kind")]
    pub work_dir: PathBuf,
    /// Scenario files or directories.
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<PathBuf>,
}

/// A command line, its environment additions and its standard input.
struct Cmd {
    env: Vec<(&'static str, String)>,
    argv: Vec<String>,
    stdin: Option<String>,
    /// Printed after the command as a shell comment.
    note: Option<String>,
}

impl Cmd {
    fn new<S: AsRef<str>>(argv: &[S]) -> Self {
        Self {
            env: Vec::new(),
            argv: argv.iter().map(|arg| arg.as_ref().to_owned()).collect(),
            stdin: None,
            note: None,
        }
    }

    fn stdin(mut self, text: String) -> Self {
        self.stdin = Some(text);
        self
    }

    fn note(mut self, note: String) -> Self {
        self.note = Some(note);
        self
    }

    /// As a shell line, with a here-document for the standard input.
    fn display(&self) -> String {
        let mut line = String::new();
        for (key, value) in &self.env {
            let _ = write!(line, "{key}={} ", quote(value));
        }
        line.push_str(
            &self
                .argv
                .iter()
                .map(|arg| quote(arg))
                .collect::<Vec<_>>()
                .join(" "),
        );
        if let Some(note) = &self.note {
            let _ = write!(line, "  # {note}");
        }
        if let Some(stdin) = &self.stdin {
            let _ = write!(line, " <<'EOF'\n{}EOF", with_newline(stdin));
        }
        line
    }
}

fn with_newline(text: &str) -> String {
    if text.ends_with('\n') {
        text.to_owned()
    } else {
        format!("{text}\n")
    }
}

/// Quotes `arg` for a POSIX shell when it needs it.
fn quote(arg: &str) -> String {
    let plain = !arg.is_empty()
        && arg.chars().all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/' | ':' | '=' | ',' | '@')
        });
    if plain {
        arg.to_owned()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// Prints a comment line between the commands.
fn say(comment: &str) {
    println!("# {comment}");
}

/// Prints commands and runs them, or only prints them.
struct Shell {
    dry_run: bool,
}

impl Shell {
    /// Runs `cmd`, failing when it fails; returns its standard output ("" in a dry run).
    fn run(&self, cmd: &Cmd) -> anyhow::Result<String> {
        let (success, stdout, stderr) = self.execute(cmd)?;
        if !success {
            bail!("{} failed: {}", cmd.argv.join(" "), stderr.trim());
        }
        Ok(stdout)
    }

    /// Runs `cmd` and returns whether it succeeded (true in a dry run).
    fn succeeds(&self, cmd: &Cmd) -> anyhow::Result<bool> {
        Ok(self.execute(cmd)?.0)
    }

    fn execute(&self, cmd: &Cmd) -> anyhow::Result<(bool, String, String)> {
        println!("{}", cmd.display());
        if self.dry_run {
            return Ok((true, String::new(), String::new()));
        }
        let mut command = Command::new(&cmd.argv[0]);
        command
            .args(&cmd.argv[1..])
            .envs(cmd.env.iter().map(|(key, value)| (*key, value)))
            .stdin(if cmd.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {}", cmd.argv[0]))?;
        if let Some(stdin) = &cmd.stdin {
            child
                .stdin
                .take()
                .expect("stdin is piped")
                .write_all(stdin.as_bytes())
                .with_context(|| format!("writing to {}", cmd.argv[0]))?;
        }
        let output = child
            .wait_with_output()
            .with_context(|| format!("waiting for {}", cmd.argv[0]))?;
        Ok((
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        ))
    }

    /// Writes a generated file (printed as a here-document either way).
    fn write_file(&self, path: &Path, content: &str) -> anyhow::Result<()> {
        println!(
            "cat > {} <<'EOF'\n{}EOF",
            quote(&path.display().to_string()),
            with_newline(content)
        );
        if self.dry_run {
            return Ok(());
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(path, content).with_context(|| format!("writing {}", path.display()))
    }

    fn sleep(&self, duration: Duration) {
        println!("sleep {}", duration.as_secs());
        if !self.dry_run {
            std::thread::sleep(duration);
        }
    }
}

/// How a scenario ended.
enum Outcome {
    Passed,
    Failed(String),
    Skipped(String),
    Planned,
}

/// Runs `netwarden-e2e kind`. Returns whether every scenario passed (or, in a dry run, whether
/// every scenario could be planned).
pub fn run(args: &KindArgs) -> anyhow::Result<bool> {
    let files = crate::runner::discover(&args.paths)?;
    if files.is_empty() {
        bail!("no scenario files found");
    }
    let scenarios = files
        .iter()
        .map(|file| scenario::load(file).with_context(|| format!("loading {}", file.display())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let shell = Shell {
        dry_run: args.dry_run,
    };
    let kube = Kube {
        context: format!("kind-{}", args.cluster),
        shell: &shell,
    };
    let cluster_up = create_cluster(&shell, args);
    let mut outcomes = Vec::new();
    let result = cluster_up
        .and_then(|()| deploy_agent(&shell, &kube, args))
        .map(|()| {
            for scenario in &scenarios {
                let outcome = run_scenario(&kube, scenario);
                report(scenario, &outcome);
                outcomes.push(outcome);
            }
        });
    if args.keep {
        say(&format!(
            "--keep: cluster {} left running (kubectl --context {})",
            args.cluster, kube.context
        ));
    } else {
        say("always, even after a failure: the cluster goes");
        shell.run(&kind(args, &["delete", "cluster", "--name", &args.cluster]))?;
    }
    result?;
    let count = |wanted: fn(&Outcome) -> bool| outcomes.iter().filter(|o| wanted(o)).count();
    let passed = count(|o| matches!(o, Outcome::Passed));
    let failed = count(|o| matches!(o, Outcome::Failed(_)));
    let skipped = count(|o| matches!(o, Outcome::Skipped(_)));
    let planned = count(|o| matches!(o, Outcome::Planned));
    if args.dry_run {
        println!("dry run: {planned} scenarios planned, {skipped} skipped");
    } else {
        println!("{passed} passed, {failed} failed, {skipped} skipped");
    }
    Ok(failed == 0)
}

fn report(scenario: &Scenario, outcome: &Outcome) {
    match outcome {
        Outcome::Passed => println!("PASS {}", scenario.name),
        Outcome::Failed(why) => println!("FAIL {}\n{why}", scenario.name),
        Outcome::Skipped(why) => println!("SKIP {}: {why}", scenario.name),
        Outcome::Planned => println!("PLANNED {} (dry run: probes not evaluated)", scenario.name),
    }
}

/// A kind command, with the provider set for Podman.
fn kind<S: AsRef<str>>(options: &KindArgs, words: &[S]) -> Cmd {
    let mut full = vec!["kind".to_owned()];
    full.extend(words.iter().map(|word| word.as_ref().to_owned()));
    let mut cmd = Cmd::new(&full);
    if options.engine == Engine::Podman {
        cmd.env
            .push(("KIND_EXPERIMENTAL_PROVIDER", "podman".to_owned()));
    }
    cmd
}

/// The cluster: kind's default CNI (kindnet, which wires pods with veths and host routes),
/// a control plane and two workers, so that peers on other nodes are covered.
fn create_cluster(shell: &Shell, args: &KindArgs) -> anyhow::Result<()> {
    say("a kind cluster with its default CNI, kindnet");
    let config = args.work_dir.join("kind.yaml");
    shell.write_file(
        &config,
        "kind: Cluster\napiVersion: kind.x-k8s.io/v1alpha4\nnodes:\n  - role: control-plane\n  - role: worker\n  - role: worker\n",
    )?;
    shell.run(&kind(
        args,
        &[
            "create",
            "cluster",
            "--name",
            &args.cluster,
            "--config",
            &config.display().to_string(),
            "--wait",
            "120s",
        ],
    ))?;
    Ok(())
}

/// Builds the image, loads it into every node, applies `deploy/` with the image replaced, and
/// waits for the DaemonSet.
fn deploy_agent(shell: &Shell, kube: &Kube<'_>, args: &KindArgs) -> anyhow::Result<()> {
    say("the agent's image, built and loaded into every node (no registry involved)");
    let containerfile = args.repo.join("deploy/Containerfile");
    shell.run(&Cmd::new(&[
        args.engine.program(),
        "build",
        "-f",
        &containerfile.display().to_string(),
        "-t",
        &args.image,
        &args.repo.display().to_string(),
    ]))?;
    match args.engine {
        Engine::Docker => {
            shell.run(&kind(
                args,
                &["load", "docker-image", &args.image, "--name", &args.cluster],
            ))?;
        }
        Engine::Podman => {
            let archive = args.work_dir.join("netwarden-image.tar");
            let archive = archive.display().to_string();
            shell.run(&Cmd::new(&[
                "podman",
                "save",
                "--format",
                "docker-archive",
                "-o",
                &archive,
                &args.image,
            ]))?;
            shell.run(&kind(
                args,
                &["load", "image-archive", &archive, "--name", &args.cluster],
            ))?;
        }
    }

    // Before the agent, which would otherwise list ClusterNetworkPolicies as an absent kind
    // until its next retry.
    say("the ClusterNetworkPolicy CRD (network-policy-api's experimental channel: `nodes` peers)");
    kube.run(&["apply", "-f", CLUSTER_NETWORK_POLICY_CRD])?;

    say("deploy/ with the image set to the one just loaded (a kustomize overlay)");
    let overlay = args.work_dir.join("overlay");
    // Kustomize takes a base only as a path relative to the kustomization.
    let deploy = relative_path(&overlay, &args.repo.join("deploy"))?;
    let (name, tag) = split_image(&args.image);
    shell.write_file(
        &overlay.join("kustomization.yaml"),
        &format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - {}\nimages:\n  - name: {DEPLOY_IMAGE}\n    newName: {name}\n    newTag: {tag}\n",
            deploy.display()
        ),
    )?;
    kube.run(&["apply", "-k", &overlay.display().to_string()])?;
    kube.run(&[
        "-n",
        AGENT_NAMESPACE,
        "rollout",
        "status",
        "daemonset/netwarden",
        "--timeout=300s",
    ])?;
    Ok(())
}

/// `to` as a path relative to the directory `from`.
fn relative_path(from: &Path, to: &Path) -> anyhow::Result<PathBuf> {
    let parts = |path: &Path| -> anyhow::Result<Vec<std::ffi::OsString>> {
        let path =
            std::path::absolute(path).with_context(|| format!("resolving {}", path.display()))?;
        let mut parts = Vec::new();
        for component in path.components() {
            match component {
                Component::CurDir | Component::RootDir | Component::Prefix(_) => {}
                Component::ParentDir => {
                    parts.pop();
                }
                Component::Normal(part) => parts.push(part.to_owned()),
            }
        }
        Ok(parts)
    };
    let from = parts(from)?;
    let to = parts(to)?;
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut relative = PathBuf::new();
    for _ in common..from.len() {
        relative.push("..");
    }
    for part in &to[common..] {
        relative.push(part);
    }
    Ok(relative)
}

/// `name:tag` (a registry port is not a tag).
fn split_image(image: &str) -> (&str, &str) {
    match image.rsplit_once(':') {
        Some((name, tag)) if !tag.contains('/') => (name, tag),
        _ => (image, "latest"),
    }
}

/// kubectl on the kind cluster's context.
struct Kube<'a> {
    context: String,
    shell: &'a Shell,
}

impl Kube<'_> {
    fn cmd<S: AsRef<str>>(&self, argv: &[S]) -> Cmd {
        let mut full = vec![
            "kubectl".to_owned(),
            "--context".to_owned(),
            self.context.clone(),
        ];
        full.extend(argv.iter().map(|arg| arg.as_ref().to_owned()));
        Cmd::new(&full)
    }

    fn run<S: AsRef<str>>(&self, argv: &[S]) -> anyhow::Result<String> {
        self.shell.run(&self.cmd(argv))
    }

    fn apply(&self, manifest: String) -> anyhow::Result<()> {
        self.shell
            .run(&self.cmd(&["apply", "-f", "-"]).stdin(manifest))?;
        Ok(())
    }
}

/// What a kind cluster can run: IPv4 pods that the API server places and addresses, with the
/// agent as `deploy/` runs it. Nothing is left out: a step it cannot play rules the scenario
/// out, as what follows would be judged on another world.
struct KindCapabilities;

/// Why Service steps rule a scenario out.
const NO_SERVICES: &str =
    "Services are emulated by the netns harness only (the kind path does not create them yet)";

impl Capabilities for KindCapabilities {
    fn unsupported_model(&self, scenario: &Scenario) -> Option<String> {
        if scenario.model.has(IpFamily::IPv6) {
            return Some("the kind cluster is IPv4-only".to_owned());
        }
        if !scenario.agent_args.is_empty() {
            return Some(format!(
                "agent_args {:?}: the DaemonSet runs with the arguments in deploy/",
                scenario.agent_args
            ));
        }
        if !scenario.model.external_hosts.is_empty() {
            return Some("external hosts have no counterpart in a kind cluster".to_owned());
        }
        if scenario.uses_services() {
            return Some(NO_SERVICES.to_owned());
        }
        None
    }

    fn supports(&self, step: &Step) -> Support {
        let unsupported = |reason: &str| Support::Unsupported(reason.to_owned());
        match step {
            Step::AddPod {
                reuse_ip_of: Some(_),
                ..
            } => unsupported("a real cluster does not let a pod choose its IP"),
            Step::AddPod { publish: false, .. } | Step::PublishPod { .. } => {
                unsupported("a real pod's veth never exists before its Pod object")
            }
            Step::CreatePolicy { .. }
            | Step::UpdatePolicy { .. }
            | Step::DeletePolicy { .. }
            | Step::DeleteAllPolicies { .. }
            | Step::Relabel { .. }
            | Step::AddPod { .. }
            | Step::DeletePod { .. }
            | Step::RestartAgent { .. }
            | Step::Probe { .. } => Support::Play,
            Step::CreateService { .. }
            | Step::DeleteService { .. }
            | Step::Dial(_)
            | Step::Resolve(_) => unsupported(NO_SERVICES),
            Step::OpenConnection { .. } | Step::CheckConnection { .. } => {
                unsupported("long-lived connections are kept by the netns harness only")
            }
            Step::SendSpoofed { .. } | Step::IcmpError { .. } => {
                unsupported("crafted packets are sent from the netns harness only")
            }
            // A check of the view only: the scenario's world goes on the same without it.
            Step::Observe(_) | Step::Explain(_) => Support::Skip(
                "the observe and explain steps ask the netns harness's agent on its socket (on \
                 a cluster: `--kubeconfig`)"
                    .to_owned(),
            ),
            Step::MtlsProbe(_) | Step::IdentityCheck(_) | Step::ExpectAgentLog(_) => unsupported(
                "the test CA, the mTLS test proxy and the agent's log live in the netns harness",
            ),
        }
    }
}

/// The pods of a scenario as they stand, with their addresses.
struct Cluster<'a> {
    scenario: &'a Scenario,
    kube: &'a Kube<'a>,
    /// `ns/name` to its labels and ports, in grid order.
    pods: BTreeMap<String, (Labels, Vec<ContainerPort>)>,
    /// `ns/name` to its IP, or `<ip ns/name>` in a dry run.
    ips: BTreeMap<String, String>,
    namespaces: BTreeMap<String, Labels>,
}

fn run_scenario(kube: &Kube<'_>, scenario: &Scenario) -> Outcome {
    say(&format!(
        "scenario {} ({})",
        scenario.name,
        scenario.path.display()
    ));
    let plan = match driver::plan(&KindCapabilities, scenario) {
        Ok(plan) => plan,
        Err(CannotRun(reason)) => return Outcome::Skipped(reason),
    };
    let mut cluster = Cluster {
        scenario,
        kube,
        pods: scenario
            .model
            .pods
            .iter()
            .map(|(key, pod)| (key.clone(), (pod.labels.clone(), pod.ports.clone())))
            .collect(),
        ips: BTreeMap::new(),
        namespaces: scenario
            .model
            .namespaces
            .iter()
            .map(|(name, labels)| (name.clone(), labels.clone()))
            .collect(),
    };
    // Every command blocks: the futures of the interpreter never wait on anything else.
    let (findings, played) =
        futures::executor::block_on(driver::play(&mut cluster, scenario, &plan));
    let result = match played {
        Ok(()) => Ok(findings),
        Err(PlayError::SetUp(error)) => Err(error),
        Err(PlayError::Step {
            number,
            step,
            source,
        }) => Err(source.context(format!("step {number} ({step})"))),
    };
    let cleanup = cluster.clean_up();
    match (result, cleanup) {
        (Ok(failures), Ok(())) if failures.is_empty() => {
            if kube.shell.dry_run {
                Outcome::Planned
            } else {
                Outcome::Passed
            }
        }
        (Ok(failures), Ok(())) => Outcome::Failed(failures.join("\n")),
        (Err(error), _) | (Ok(_), Err(error)) => Outcome::Failed(format!("{error:#}")),
    }
}

impl Cluster<'_> {
    /// Creates the model's namespaces and pods and waits until every pod is ready.
    fn create_model(&mut self) -> anyhow::Result<()> {
        say("its namespaces and pods; every pod serves each of its container ports");
        let mut manifest = String::new();
        for (name, labels) in &self.namespaces {
            push_document(&mut manifest, &namespace(name, labels))?;
        }
        for (key, (labels, ports)) in &self.pods {
            push_document(&mut manifest, &pod(key, labels, ports)?)?;
        }
        self.kube.apply(manifest)?;
        for name in self.namespaces.keys() {
            self.wait_for_pods(name)?;
        }
        self.read_ips()
    }

    fn wait_for_pods(&self, namespace: &str) -> anyhow::Result<()> {
        self.kube.run(&[
            "-n",
            namespace,
            "wait",
            "--for=condition=Ready",
            "pod",
            "--all",
            "--timeout=180s",
        ])?;
        Ok(())
    }

    /// The pods' IPs (`<ip NS/POD>` in a dry run).
    fn read_ips(&mut self) -> anyhow::Result<()> {
        for namespace in self.namespaces.keys() {
            let listed = self.kube.run(&[
                "-n",
                namespace,
                "get",
                "pods",
                "-o",
                r#"jsonpath={range .items[*]}{.metadata.name} {.status.podIP}{"\n"}{end}"#,
            ])?;
            for line in listed.lines() {
                if let Some((name, ip)) = line.split_once(' ') {
                    self.ips
                        .insert(format!("{namespace}/{name}"), ip.trim().to_owned());
                }
            }
        }
        if self.kube.shell.dry_run {
            for key in self.pods.keys() {
                self.ips.insert(key.clone(), format!("<ip {key}>"));
            }
        }
        for key in self.pods.keys() {
            if !self.ips.contains_key(key) {
                bail!("pod {key} has no IP");
            }
        }
        Ok(())
    }

    /// Sets the complete new label sets of pods and namespaces.
    fn label_objects(
        &mut self,
        pod_labels: &IndexMap<String, Labels>,
        namespace_labels: &IndexMap<String, Labels>,
    ) -> anyhow::Result<()> {
        for (key, labels) in pod_labels {
            let (namespace, name) = scenario::split_pod_key(key).map_err(anyhow::Error::msg)?;
            let entry = self
                .pods
                .get_mut(key)
                .with_context(|| format!("no pod {key}"))?;
            let mut argv = vec!["-n", namespace, "label", "pod", name, "--overwrite"];
            let changes = label_changes(&entry.0, labels);
            argv.extend(changes.iter().map(String::as_str));
            self.kube.run(&argv)?;
            entry.0.clone_from(labels);
        }
        for (namespace, labels) in namespace_labels {
            let labels = scenario::namespace_labels(namespace, labels);
            let current = self
                .namespaces
                .get_mut(namespace)
                .with_context(|| format!("no namespace {namespace}"))?;
            let mut argv = vec!["label", "namespace", namespace, "--overwrite"];
            let changes = label_changes(current, &labels);
            argv.extend(changes.iter().map(String::as_str));
            self.kube.run(&argv)?;
            *current = labels;
        }
        Ok(())
    }

    /// Restarts every agent: a rolling restart (SIGTERM), or pods deleted at once (no grace).
    fn restart_daemonset(&self, mode: RestartMode) -> anyhow::Result<()> {
        match mode {
            RestartMode::Graceful => {
                self.kube.run(&[
                    "-n",
                    AGENT_NAMESPACE,
                    "rollout",
                    "restart",
                    "daemonset/netwarden",
                ])?;
            }
            RestartMode::Kill => {
                self.kube.run(&[
                    "-n",
                    AGENT_NAMESPACE,
                    "delete",
                    "pod",
                    "-l",
                    "app.kubernetes.io/name=netwarden",
                    "--grace-period=0",
                    "--force",
                ])?;
            }
        }
        self.kube.run(&[
            "-n",
            AGENT_NAMESPACE,
            "rollout",
            "status",
            "daemonset/netwarden",
            "--timeout=300s",
        ])?;
        Ok(())
    }

    /// Dials every (row, column) pair but the diagonal from inside the row's pod; probes again
    /// once after a short wait when the grid disagrees (policy changes take effect
    /// asynchronously, and nothing here can see the agents apply them), as upstream does.
    fn probe_grid(
        &self,
        port: u16,
        protocol: Protocol,
        endpoints: &[String],
        allowed: &[Vec<bool>],
    ) -> anyhow::Result<Option<String>> {
        let mut mismatches = self.dial_all(port, protocol, endpoints, allowed)?;
        if !mismatches.is_empty() {
            self.kube.shell.sleep(Duration::from_secs(5));
            mismatches = self.dial_all(port, protocol, endpoints, allowed)?;
        }
        if mismatches.is_empty() {
            Ok(None)
        } else {
            Ok(Some(format!(
                "{protocol}/{port}: {}",
                mismatches.join(", ")
            )))
        }
    }

    fn dial_all(
        &self,
        port: u16,
        protocol: Protocol,
        endpoints: &[String],
        allowed: &[Vec<bool>],
    ) -> anyhow::Result<Vec<String>> {
        let mut mismatches = Vec::new();
        for (row, from) in endpoints.iter().enumerate() {
            for (column, to) in endpoints.iter().enumerate() {
                if row == column {
                    continue;
                }
                let expected = allowed[row][column];
                let connected = self.dial(from, to, port, protocol, expected)?;
                if connected != expected && !self.kube.shell.dry_run {
                    mismatches.push(format!(
                        "{from} -> {to} {} (expected {})",
                        if connected { "connected" } else { "blocked" },
                        if expected { "connected" } else { "blocked" }
                    ));
                }
            }
        }
        Ok(mismatches)
    }

    /// Whether `from` reaches `to` (printed with what is `expected`).
    fn dial(
        &self,
        from: &str,
        to: &str,
        port: u16,
        protocol: Protocol,
        expected: bool,
    ) -> anyhow::Result<bool> {
        let (namespace, name) = scenario::split_pod_key(from).map_err(anyhow::Error::msg)?;
        let (_, ports) = self
            .pods
            .get(from)
            .with_context(|| format!("no pod {from}"))?;
        let ip = self
            .ips
            .get(to)
            .with_context(|| format!("no IP for {to}"))?;
        let container = containers(ports)[0].name.clone();
        let target = format!("{ip}:{port}");
        let timeout = format!("--timeout={PROBE_TIMEOUT}");
        let protocol = format!("--protocol={}", protocol_name(protocol));
        let cmd = self.kube.cmd(&[
            "-n", namespace, "exec", name, "-c", &container, "--", "/agnhost", "connect", &target,
            &timeout, &protocol,
        ]);
        let expectation = if expected { "connects" } else { "blocked" };
        self.kube
            .shell
            .succeeds(&cmd.note(format!("{from} -> {to}: expect {expectation}")))
    }

    /// A policy object with its placeholders replaced by the pods' IPs.
    fn fill_placeholders(&self, object: &serde_yaml::Value) -> anyhow::Result<serde_yaml::Value> {
        let dry_run = self.kube.shell.dry_run;
        let mut resolve = |placeholder: &Placeholder| {
            let target = placeholder.target().to_owned();
            let ip = self
                .ips
                .get(&target)
                .ok_or_else(|| placeholder::PlaceholderError::Unknown(target.clone()))?;
            if dry_run {
                return Ok(match placeholder {
                    Placeholder::Ip(_) | Placeholder::Ip6(_) => ip.clone(),
                    Placeholder::Cidr(_, prefix) | Placeholder::Cidr6(_, prefix) => {
                        format!("<cidr {target} {prefix}>")
                    }
                });
            }
            let v4 = ip.parse::<Ipv4Addr>().ok();
            placeholder.render(IpFamily::IPv4, v4, None)
        };
        Ok(placeholder::substitute_value(object, &mut resolve)?)
    }

    /// Deletes the scenario's namespaces (and with them its pods and policies).
    fn clean_up(&self) -> anyhow::Result<()> {
        say("the scenario's namespaces go, and everything in them");
        let mut argv = vec!["delete", "namespace"];
        argv.extend(self.namespaces.keys().map(String::as_str));
        argv.extend(["--wait=true", "--timeout=180s"]);
        self.kube.run(&argv)?;
        Ok(())
    }
}

impl Driver for Cluster<'_> {
    type Error = anyhow::Error;

    fn begin_step(&mut self, At { number, step }: At<'_>, left_out: Option<&str>) {
        say(&format!("step {number}: {step}"));
        if let Some(reason) = left_out {
            say(&format!("left out: {reason}"));
        }
    }

    async fn set_up(&mut self) -> anyhow::Result<()> {
        self.create_model()
    }

    async fn write_policy(&mut self, policy: &str) -> anyhow::Result<()> {
        let object = self
            .scenario
            .policies
            .get(policy)
            .with_context(|| format!("no policy {policy}"))?;
        let object = self.fill_placeholders(object)?;
        // Checked here, so a typo fails before the API server sees it.
        match scenario::PolicyName::of(scenario::policy_identity(policy)) {
            scenario::PolicyName::Namespaced { .. } => {
                let _: NetworkPolicy = serde_yaml::from_value(object.clone())
                    .with_context(|| format!("{policy} is not a NetworkPolicy"))?;
            }
            scenario::PolicyName::Cluster { .. } => {
                let _: netwarden_model::cluster_policy::api::ClusterNetworkPolicy =
                    serde_yaml::from_value(object.clone())
                        .with_context(|| format!("{policy} is not a ClusterNetworkPolicy"))?;
            }
        }
        self.kube.apply(serde_yaml::to_string(&object)?)
    }

    async fn delete_policy(&mut self, policy: &str) -> anyhow::Result<()> {
        match scenario::PolicyName::of(scenario::policy_identity(policy)) {
            scenario::PolicyName::Namespaced { namespace, name } => {
                self.kube
                    .run(&["-n", namespace, "delete", "networkpolicy", name])?;
            }
            scenario::PolicyName::Cluster { name } => {
                self.kube.run(&["delete", "clusternetworkpolicy", name])?;
            }
        }
        Ok(())
    }

    async fn delete_all_policies(&mut self, namespaces: &[String]) -> anyhow::Result<()> {
        for namespace in namespaces {
            self.kube
                .run(&["-n", namespace, "delete", "networkpolicy", "--all"])?;
        }
        Ok(())
    }

    async fn relabel(
        &mut self,
        pod_labels: &IndexMap<String, Labels>,
        namespace_labels: &IndexMap<String, Labels>,
    ) -> anyhow::Result<()> {
        self.label_objects(pod_labels, namespace_labels)
    }

    async fn add_pod(&mut self, new: NewPod<'_>) -> anyhow::Result<()> {
        let ports = new
            .ports
            .unwrap_or(&self.scenario.model.default_ports)
            .to_vec();
        let mut manifest = String::new();
        push_document(&mut manifest, &pod(new.key, new.labels, &ports)?)?;
        self.kube.apply(manifest)?;
        let (namespace, _) = scenario::split_pod_key(new.key).map_err(anyhow::Error::msg)?;
        self.pods
            .insert(new.key.to_owned(), (new.labels.clone(), ports));
        self.wait_for_pods(namespace)?;
        self.read_ips()
    }

    async fn delete_pod(&mut self, key: &str) -> anyhow::Result<()> {
        let (namespace, name) = scenario::split_pod_key(key).map_err(anyhow::Error::msg)?;
        self.kube
            .run(&["-n", namespace, "delete", "pod", name, "--wait=true"])?;
        self.pods.remove(key);
        self.ips.remove(key);
        Ok(())
    }

    async fn restart_agent(&mut self, mode: RestartMode) -> anyhow::Result<()> {
        self.restart_daemonset(mode)
    }

    /// Nothing to wait for: nothing here can see the agents apply a change, so probes retry
    /// instead.
    async fn settle(&mut self, _change: Change) -> anyhow::Result<()> {
        Ok(())
    }

    async fn probe(&mut self, At { number, step }: At<'_>) -> anyhow::Result<Findings> {
        let Step::Probe {
            port,
            protocol,
            expect,
            ..
        } = step
        else {
            unreachable!("called for probe steps only")
        };
        let failure = self.probe_grid(*port, *protocol, &expect.endpoints, &expect.allowed)?;
        Ok(failure
            .map(|failure| format!("  step {number} ({step}): {failure}"))
            .into_iter()
            .collect())
    }
}

/// `kubectl label` arguments turning `from` into exactly `to`.
fn label_changes(from: &Labels, to: &Labels) -> Vec<String> {
    let mut changes: Vec<String> = to
        .iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect();
    changes.extend(
        from.keys()
            .filter(|key| !to.contains_key(*key))
            .map(|key| format!("{key}-")),
    );
    changes
}

fn protocol_name(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
    }
}

fn push_document<T: serde::Serialize>(manifest: &mut String, object: &T) -> anyhow::Result<()> {
    manifest.push_str("---\n");
    manifest.push_str(&serde_yaml::to_string(object)?);
    Ok(())
}

fn namespace(name: &str, labels: &Labels) -> Namespace {
    Namespace {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(labels.clone()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    }
}

/// One container per container port, serving it as upstream's NetworkPolicy e2e does: agnhost
/// `serve-hostname` answers a TCP connection or a UDP datagram with the pod's name, agnhost
/// `porter` an SCTP association. A pod without ports still gets a container to probe from.
fn containers(ports: &[ContainerPort]) -> Vec<Container> {
    if ports.is_empty() {
        return vec![Container {
            name: "client".to_owned(),
            image: Some(AGNHOST.to_owned()),
            command: Some(vec!["/agnhost".to_owned(), "pause".to_owned()]),
            ..Container::default()
        }];
    }
    ports
        .iter()
        .map(|port| {
            let protocol = protocol_name(port.protocol);
            let number = port.container_port.to_string();
            let (command, env) = match port.protocol {
                Protocol::Tcp | Protocol::Udp => (
                    vec![
                        "/agnhost".to_owned(),
                        "serve-hostname".to_owned(),
                        format!("--{protocol}"),
                        "--http=false".to_owned(),
                        "--port".to_owned(),
                        number,
                    ],
                    None,
                ),
                Protocol::Sctp => (
                    vec!["/agnhost".to_owned(), "porter".to_owned()],
                    Some(vec![EnvVar {
                        name: format!("SERVE_SCTP_PORT_{number}"),
                        value: Some("foo".to_owned()),
                        ..EnvVar::default()
                    }]),
                ),
            };
            Container {
                name: format!("serve-{}-{protocol}", port.container_port),
                image: Some(AGNHOST.to_owned()),
                command: Some(command),
                env,
                ports: Some(vec![K8sContainerPort {
                    name: port.name.clone(),
                    container_port: i32::from(port.container_port),
                    protocol: Some(port.protocol.to_string()),
                    ..K8sContainerPort::default()
                }]),
                ..Container::default()
            }
        })
        .collect()
}

fn pod(key: &str, labels: &Labels, ports: &[ContainerPort]) -> anyhow::Result<Pod> {
    let (namespace, name) = scenario::split_pod_key(key).map_err(anyhow::Error::msg)?;
    Ok(Pod {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(labels.clone()),
            ..ObjectMeta::default()
        },
        spec: Some(K8sPodSpec {
            containers: containers(ports),
            // Deleting a namespace between scenarios should not wait 30 s per pod.
            termination_grace_period_seconds: Some(0),
            ..K8sPodSpec::default()
        }),
        status: None,
    })
}
