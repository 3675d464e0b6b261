//! The real agent on a simulated node: `netwarden observe` shows the record of a probe the
//! datapath denied (from the ring, and live with `--follow`), and `netwarden explain --agent`
//! answers exactly what offline `explain --manifests` answers on the same cluster.
//!
//! Root only (it loads eBPF programs and creates network namespaces). Everything it creates is
//! its own: three namespaces with names unique to this run, their veths (which go with the
//! namespaces), a private bpffs under a temporary directory, the agent process; all removed
//! when the test ends, failed or not. The root namespace's interfaces, routes and firewall are
//! not touched.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use serde_json::Value;

const NETWARDEN: &str = env!("CARGO_BIN_EXE_netwarden");
const CLIENT: &str = "10.244.0.10";
const SERVER: &str = "10.244.0.11";

const CLUSTER: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: x}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {app: a}}
spec: {nodeName: node-1, containers: [{name: c}]}
status: {podIP: 10.244.0.10}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: x, labels: {app: b}}
spec: {nodeName: node-1, containers: [{name: c, ports: [{name: http, containerPort: 80}]}]}
status: {podIP: 10.244.0.11}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny, namespace: x}
spec: {podSelector: {matchLabels: {app: b}}, policyTypes: [Ingress]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: x}
spec:
  podSelector: {matchLabels: {app: b}}
  ingress: [{from: [{podSelector: {matchLabels: {app: a}}}], ports: [{port: 8080}]}]
";

/// What the test created; removed on drop, in the reverse order.
struct SimulatedNode {
    work: tempfile::TempDir,
    names: [String; 3],
    agent: Option<Child>,
}

impl SimulatedNode {
    fn node(&self) -> &str {
        &self.names[0]
    }

    fn netns_path(name: &str) -> PathBuf {
        Path::new("/run/netns").join(name)
    }

    fn bpffs(&self) -> PathBuf {
        self.work.path().join("bpffs")
    }

    fn socket(&self) -> PathBuf {
        self.work.path().join("observe.sock")
    }

    fn manifests(&self) -> PathBuf {
        self.work.path().join("manifests")
    }
}

impl Drop for SimulatedNode {
    fn drop(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            let _ = agent.kill();
            let _ = agent.wait();
        }
        for name in &self.names {
            let _ = Command::new("ip").args(["netns", "delete", name]).status();
        }
        let _ = nix::mount::umount2(&self.bpffs(), nix::mount::MntFlags::MNT_DETACH);
    }
}

fn run(command: &mut Command) -> std::process::Output {
    let output = command
        .output()
        .unwrap_or_else(|error| panic!("{command:?}: {error}"));
    assert!(
        output.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn ip(netns: &str, args: &str) {
    run(Command::new("ip")
        .args(["-n", netns])
        .args(args.split_whitespace()));
}

/// A node namespace and two pods wired as point-to-point CNIs wire them (a link-local gateway
/// on the host side of each veth, the pod's /32, a host route), and the manifests.
fn simulated_node() -> SimulatedNode {
    let id = format!("{:x}{:x}", std::process::id() % 0xffff, fastrand_u16());
    let names = [
        format!("nwob-node-{id}"),
        format!("nwob-a-{id}"),
        format!("nwob-b-{id}"),
    ];
    let node = SimulatedNode {
        work: tempfile::tempdir().unwrap(),
        names: names.clone(),
        agent: None,
    };
    for name in &names {
        run(Command::new("ip").args(["netns", "add", name]));
    }
    run(Command::new("ip").args([
        "netns",
        "exec",
        &names[0],
        "sysctl",
        "-q",
        "-w",
        "net.ipv4.ip_forward=1",
    ]));
    ip(&names[0], "link set lo up");
    for (pod, address, host) in [(&names[1], CLIENT, "a"), (&names[2], SERVER, "b")] {
        let host = format!("nwob{host}{id}");
        ip(
            &names[0],
            &format!("link add {host} type veth peer name eth0 netns {pod}"),
        );
        ip(&names[0], &format!("address add 169.254.1.1/32 dev {host}"));
        ip(&names[0], &format!("link set {host} up"));
        ip(&names[0], &format!("route add {address}/32 dev {host}"));
        ip(pod, "link set lo up");
        ip(pod, &format!("address add {address}/32 dev eth0"));
        ip(pod, "link set eth0 up");
        ip(pod, "route add 169.254.1.1 dev eth0 scope link");
        ip(pod, "route add default via 169.254.1.1 dev eth0");
    }
    std::fs::create_dir(node.manifests()).unwrap();
    std::fs::write(node.manifests().join("cluster.yaml"), CLUSTER).unwrap();
    node
}

fn fastrand_u16() -> u16 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    (nanos >> 8) as u16
}

/// Starts the agent in the node namespace (`nsenter --net`: `ip netns exec` would hide the
/// bpffs) and waits until both pods are enforced.
fn start_agent(node: &mut SimulatedNode) {
    let agent = Command::new("nsenter")
        .arg(format!(
            "--net={}",
            SimulatedNode::netns_path(node.node()).display()
        ))
        .args([NETWARDEN, "agent", "--node", "node-1", "--manifests"])
        .arg(node.manifests())
        .arg("--bpffs")
        .arg(node.bpffs())
        .arg("--status-file")
        .arg(node.work.path().join("status.json"))
        .args(["--allow-events", "1", "--observe-buffer", "64"])
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(node.work.path().join("agent.log")).unwrap(),
        ))
        .spawn()
        .expect("starting the agent");
    node.agent = Some(agent);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = std::fs::read_to_string(node.work.path().join("status.json"))
            .ok()
            .and_then(|text| serde_json::from_str::<Value>(&text).ok())
            .is_some_and(|status| {
                let endpoints = status["endpoints"].as_array().cloned().unwrap_or_default();
                endpoints.len() == 2
                    && endpoints
                        .iter()
                        .all(|endpoint| endpoint["state"] == "ready")
            });
        if ready && node.socket().exists() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not enforce both pods within 30 s: {}",
            std::fs::read_to_string(node.work.path().join("agent.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Opens TCP from pod a to `SERVER:port`; whether it connected (nothing listens in b, so an
/// allowed SYN is refused at once and a denied one times out).
fn probe(node: &SimulatedNode, port: u16) -> &'static str {
    let status = Command::new("nsenter")
        .arg(format!(
            "--net={}",
            SimulatedNode::netns_path(&node.names[1]).display()
        ))
        .args([
            "timeout",
            "1",
            "bash",
            "-c",
            &format!("exec 3<>/dev/tcp/{SERVER}/{port}"),
        ])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    // timeout(1) exits 124 when the time ran out.
    if status.code() == Some(124) {
        "timed out"
    } else {
        "answered"
    }
}

fn netwarden(args: &[&str]) -> String {
    String::from_utf8(run(Command::new(NETWARDEN).args(args)).stdout).unwrap()
}

/// The flows `observe` prints, as JSON values.
fn observed(node: &SimulatedNode, filters: &[&str]) -> Vec<Value> {
    let socket = node.socket();
    let mut args = vec!["observe", "--agent", socket.to_str().unwrap(), "-o", "json"];
    args.extend_from_slice(filters);
    netwarden(&args)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

fn is_the_denied_probe(flow: &Value, port: u16) -> bool {
    flow["verdict"] == "deny"
        && flow["direction"] == "ingress"
        && flow["pod"] == "x/b"
        && flow["peer_pod"] == "x/a"
        && flow["destination"] == format!("{SERVER}:{port}")
        && flow["reason_code"] == "denied_by_policy"
        && flow["node"] == "node-1"
}

#[test]
fn observe_shows_a_denied_probe_and_live_explain_matches_offline() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: loading eBPF programs and creating namespaces need root");
        return;
    }
    let mut node = simulated_node();
    start_agent(&mut node);
    the_ring_keeps_a_denied_probe_and_filters_select(&node);
    a_follower_sees_a_new_deny(&node);
    live_explain_answers_as_offline(&node);
}

fn the_ring_keeps_a_denied_probe_and_filters_select(node: &SimulatedNode) {
    // A denied probe: the datapath reports it, the ring keeps it.
    assert_eq!(probe(node, 80), "timed out", "port 80 of x/b is denied");
    let deadline = Instant::now() + Duration::from_secs(10);
    let record = loop {
        let flows = observed(node, &["--verdict", "deny", "--pod", "x/b"]);
        if let Some(record) = flows.iter().find(|flow| is_the_denied_probe(flow, 80)) {
            break record.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no record of the denied probe: {flows:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let policies: Vec<String> = serde_json::from_value(record["policies"].clone()).unwrap();
    assert_eq!(policies, ["x/deny", "x/web"], "{record}");
    // Filters leave it out when they should.
    // (Its egress from x/a, which no policy isolates, was allowed: only x/b's ingress denies.)
    let ingress_allowed = observed(
        node,
        &[
            "--verdict",
            "allow",
            "--direction",
            "ingress",
            "--port",
            "80",
        ],
    );
    assert!(ingress_allowed.is_empty(), "{ingress_allowed:?}");
    let egress_allowed = observed(
        node,
        &["--verdict", "allow", "--pod", "x/a", "--port", "80"],
    );
    assert!(
        egress_allowed
            .iter()
            .any(|flow| flow["direction"] == "egress"
                && flow["reason_code"] == "allowed_not_isolated"),
        "{egress_allowed:?}"
    );
    assert!(observed(node, &["--namespace", "y"]).is_empty());
    assert!(
        observed(node, &["--direction", "egress", "--port", "80"])
            .iter()
            .all(|flow| flow["direction"] == "egress")
    );
    // The allowed port: a sampled allow (`--allow-events 1`) naming the rule.
    assert_eq!(probe(node, 8080), "answered", "port 8080 of x/b is allowed");
    let allowed = observed(node, &["--verdict", "allow", "--policy", "x/web"]);
    assert!(
        allowed
            .iter()
            .any(|flow| flow["destination"] == format!("{SERVER}:8080")
                && flow["reason"]
                    .as_str()
                    .is_some_and(|reason| reason.contains("NetworkPolicy x/web ingress[0]"))),
        "{allowed:?}"
    );
    // The table names both pods and the reason (printed for the README with --nocapture).
    let socket = node.socket();
    let socket = socket.to_str().unwrap();
    let table = netwarden(&[
        "observe",
        "--agent",
        socket,
        "--verdict",
        "deny",
        "--port",
        "80",
    ]);
    assert!(
        table.contains("DENY  ingress TCP x/a 10.244.0.10:")
            && table.contains(
                "-> x/b 10.244.0.11:80: default deny: isolated by NetworkPolicy x/deny, x/web"
            ),
        "{table}"
    );
    eprintln!(
        "$ netwarden observe --pod x/b\n{}",
        netwarden(&["observe", "--agent", socket, "--pod", "x/b"])
    );
    eprintln!(
        "$ netwarden observe --pod x/b -o json --verdict deny\n{}",
        netwarden(&[
            "observe",
            "--agent",
            socket,
            "--pod",
            "x/b",
            "-o",
            "json",
            "--verdict",
            "deny"
        ])
    );
}

/// A follower sees a new deny as it happens.
fn a_follower_sees_a_new_deny(node: &SimulatedNode) {
    let socket = node.socket();
    let mut follower = Command::new(NETWARDEN)
        .args([
            "observe",
            "--agent",
            socket.to_str().unwrap(),
            "--follow",
            "-o",
            "json",
        ])
        .args(["--verdict", "deny", "--port", "81", "--since", "1s"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (sender, lines) = mpsc::channel();
    let stdout = follower.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if sender.send(line).is_err() {
                break;
            }
        }
    });
    // Let it connect before the probe (the ring would have it anyway, `--since 1s` aside).
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(probe(node, 81), "timed out");
    let line = lines.recv_timeout(Duration::from_secs(10));
    let _ = follower.kill();
    let _ = follower.wait();
    let line = line.expect("the follower printed the new deny within 10 s");
    let flow: Value = serde_json::from_str(&line).unwrap();
    assert!(is_the_denied_probe(&flow, 81), "{flow}");
}

/// Live explain answers what offline explain answers, in both outputs, allowed and denied.
fn live_explain_answers_as_offline(node: &SimulatedNode) {
    let socket = node.socket();
    // Live explain answers what offline explain answers, in both outputs, allowed and denied.
    let manifests = node.manifests();
    for port in ["80", "8080"] {
        for output in ["text", "json"] {
            let flow = ["--from", "x/a", "--to", "x/b", "--port", port, "-o", output];
            let from_the_agent =
                netwarden(&[&["explain", "--agent", socket.to_str().unwrap()], &flow[..]].concat());
            let offline = netwarden(
                &[
                    &["explain", "--manifests", manifests.to_str().unwrap()],
                    &flow[..],
                ]
                .concat(),
            );
            assert_eq!(from_the_agent, offline, "port {port}, {output}");
            eprintln!(
                "$ netwarden explain --agent ... --port {port} -o {output}\n{from_the_agent}"
            );
        }
    }
    let denied: Value = serde_json::from_str(&netwarden(&[
        "explain",
        "--agent",
        socket.to_str().unwrap(),
        "--from",
        "x/a",
        "--to",
        "x/b",
        "--port",
        "80",
        "-o",
        "json",
    ]))
    .unwrap();
    assert_eq!(denied["allowed"], false, "{denied}");
    // A query the agent cannot answer is an error naming why, not a verdict.
    let unknown = Command::new(NETWARDEN)
        .args([
            "explain",
            "--agent",
            socket.to_str().unwrap(),
            "--from",
            "x/nobody",
            "--to",
            "x/b",
            "--port",
            "80",
        ])
        .output()
        .unwrap();
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no Pod x/nobody"));
}
