//! The operator's commands as an operator runs them: the built binary, the repository's demo
//! workloads and example policies, exit codes, standard input, and the kubectl plugin link.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn netwarden(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_netwarden"))
        .current_dir(repo())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn diff_of_the_example_policies_closes_flows_and_exits_1_and_the_reverse_exits_0() {
    let empty = tempfile::tempdir().unwrap();
    let empty = empty.path().to_str().unwrap();
    let shared = ["--shared", "docs/demo/workloads.yaml"];

    let apply = netwarden(
        &[&["diff"][..], &shared, &[empty, "deploy/examples"]].concat(),
        None,
    );
    let stdout = text(&apply.stdout);
    assert_eq!(
        apply.status.code(),
        Some(1),
        "{stdout}{}",
        text(&apply.stderr)
    );
    assert!(
        stdout.starts_with("netwarden diff: 0 flows opened, "),
        "{stdout}"
    );
    // The database stops taking connections from the debug pod...
    assert!(
        ports_of(&stdout, "web/deployment/debug -> data/statefulset/database").contains("TCP 5432"),
        "{stdout}"
    );
    // ...but not from the backend; and the outside keeps reaching the frontend's http port.
    assert!(
        !ports_of(
            &stdout,
            "web/deployment/backend -> data/statefulset/database"
        )
        .contains("TCP 5432"),
        "{stdout}"
    );
    let outside_to_frontend = ports_of(
        &stdout,
        "203.0.113.10 (outside every ipBlock) -> web/deployment/frontend",
    );
    assert!(
        outside_to_frontend.contains("TCP 5432") && !outside_to_frontend.contains("TCP 8080"),
        "{stdout}"
    );

    let revert = netwarden(
        &[
            &["diff", "--format", "json"][..],
            &shared,
            &["deploy/examples", empty],
        ]
        .concat(),
        None,
    );
    assert_eq!(revert.status.code(), Some(0), "{}", text(&revert.stderr));
    let json: serde_json::Value = serde_json::from_slice(&revert.stdout).unwrap();
    assert!(json["closed"].as_array().unwrap().is_empty());
    assert_eq!(json["closedFlows"], 0);
    let closed_before = text(&apply.stdout)
        .lines()
        .next()
        .and_then(|line| line.split(", ").nth(1))
        .and_then(|part| part.split(' ').next())
        .and_then(|count| count.parse::<u64>().ok())
        .unwrap();
    assert!(closed_before > 0);
    assert_eq!(
        json["openedFlows"], closed_before,
        "reverting opens exactly what applying closed"
    );
    let first_flow = &json["opened"][0]["flows"][0];
    assert_eq!(first_flow["source"]["kind"], "pod");
    assert!(first_flow["port"]["protocol"].is_string());
}

/// The ports of the first text report line for `pair` (`SOURCE -> DESTINATION`).
fn ports_of<'a>(report: &'a str, pair: &str) -> &'a str {
    let lead = format!("  {pair}: ");
    report
        .lines()
        .find_map(|line| line.strip_prefix(&lead))
        .unwrap_or("")
}

#[test]
fn diff_reads_a_render_on_standard_input_and_fails_with_2_on_bad_input() {
    let policy = std::fs::read_to_string(repo().join("deploy/examples/30-database.yaml")).unwrap();
    let workloads = std::fs::read_to_string(repo().join("docs/demo/workloads.yaml")).unwrap();
    let output = netwarden(
        &[
            "diff",
            "--format",
            "markdown",
            "docs/demo/workloads.yaml",
            "-",
        ],
        Some(&format!("{workloads}\n---\n{policy}")),
    );
    let stdout = text(&output.stdout);
    assert_eq!(
        output.status.code(),
        Some(1),
        "{stdout}{}",
        text(&output.stderr)
    );
    assert!(
        stdout.starts_with("### :warning: netwarden diff: 0 flows opened, "),
        "{stdout}"
    );
    let row = |from: &str| {
        let lead = format!("| `{from}` | `data/statefulset/database` | ");
        stdout
            .lines()
            .find_map(|line| line.strip_prefix(&lead).map(str::to_owned))
            .unwrap_or_default()
    };
    assert!(
        row("web/deployment/frontend").contains("TCP 5432"),
        "{stdout}"
    );
    assert!(
        !row("web/deployment/backend").contains("TCP 5432"),
        "{stdout}"
    );
    assert!(
        row("web/deployment/backend").contains("TCP 8080"),
        "{stdout}"
    );

    let missing = netwarden(&["diff", "no/such/dir", "deploy/examples"], None);
    assert_eq!(missing.status.code(), Some(2));
    assert!(text(&missing.stderr).contains("no/such/dir"));
}

#[test]
fn matrix_prints_the_grid_and_writes_a_page() {
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("matrix.html");
    let output = netwarden(
        &[
            "matrix",
            "--manifests",
            "docs/demo/workloads.yaml",
            "--manifests",
            "deploy/examples",
            "--port",
            "5432",
            "--html",
            page.to_str().unwrap(),
        ],
        None,
    );
    let stdout = text(&output.stdout);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(stdout.starts_with("connectivity on TCP 5432\n"), "{stdout}");
    let html = std::fs::read_to_string(&page).unwrap();
    assert_eq!(html.matches("<rect ").count(), 36);
}

#[test]
fn linked_as_kubectl_netwarden_it_is_a_kubectl_plugin() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join("kubectl-netwarden");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_netwarden"), &plugin).unwrap();
    let help = Command::new(&plugin).arg("--help").output().unwrap();
    assert!(
        text(&help.stdout).contains("Usage: kubectl netwarden <COMMAND>"),
        "{}",
        text(&help.stdout)
    );

    // kubectl finds plugins on PATH by name; it needs no cluster for that.
    let Some(kubectl) = ["/usr/bin/kubectl", "/usr/local/bin/kubectl"]
        .into_iter()
        .map(Path::new)
        .find(|path| path.exists())
    else {
        eprintln!("kubectl is not installed: checked the plugin binary only");
        return;
    };
    let path = format!(
        "{}:{}",
        dir.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let through_kubectl = Command::new(kubectl)
        .env("PATH", path)
        .args(["netwarden", "--help"])
        .output()
        .unwrap();
    assert!(
        text(&through_kubectl.stdout).contains("Usage: kubectl netwarden <COMMAND>"),
        "{}{}",
        text(&through_kubectl.stdout),
        text(&through_kubectl.stderr)
    );
}
