//! `netwarden-bench datapath` (traffic part): real traffic between two pod namespaces on a
//! simulated node, with no program, with netwarden enforcing 10, 1,000 and 10,000 rules, and with
//! the same 10,000-rule policy as iptables linear chains and as an nftables set; and through a
//! Service: the client dials a `ClusterIP` that kube-proxy's iptables-mode rules translate to
//! the server pod, with no program (kube-proxy alone) and with netwarden enforcing an egress
//! policy on the client, decided after translation by the agent's netfilter hook.
//!
//! Each configuration is measured for TCP throughput (iperf3), the rate of
//! connect/request/close loops, and request/response latency over one connection. Every run of
//! a configuration sits between two baseline runs (no program), every figure is the median of
//! `repeats` runs, and each ratio is the median over rounds of a run against the mean of the
//! baseline runs beside it (for netwarden behind the Service: of kube-proxy alone, so the
//! ratio is netwarden's own cost on a translated flow). A second pass pins
//! client and server to one CPU: on 2-vCPU machines unpinned request/response latency is mostly
//! cross-CPU wake-ups. Last, the connection loop runs once more for netwarden at 10,000 rules
//! and behind the Service with the kernel's per-program statistics on, and the time each
//! program takes per run and per connection is printed (`program_stats.rs`): where the
//! connection rate's cost goes, measured in the same run as the ratios.
//!
//! The policy isolates the server pod and allows the client pod on the measured ports after
//! `rules - 1` single-address `ipBlock` rules on the same ports, with 100 Admin and 100 Baseline
//! ClusterNetworkPolicies selecting both pods in force (`tiers.rs`: none matches the traffic). iptables and nftables get the same
//! rules, stateless and client last (a linear chain walked by every packet to the server, the
//! way the quoted kube-router and older Calico figures were measured; the nftables set is one
//! lookup whatever its size). netwarden is stateful: established packets take its conntrack.

use std::{
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::{fd::AsFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use ipnet::{IpNet, Ipv4Net};
use netwarden_model::{
    Cluster, LabelSelector, Namespace, NetworkPolicy, Peer, Pod, PodRef, PolicyRef, PolicyTypes,
    PortRef, PortSpec, Protocol, Requirement, Rule,
};
use nix::{
    sched::{CloneFlags, CpuSet},
    unistd::Pid,
};

pub(crate) const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 2);
pub(crate) const SERVER: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 3);
const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
pub(crate) const IPERF_PORT: u16 = 5201;
pub(crate) const LOOP_PORT: u16 = 7000;
const NAMESPACE: &str = "bench";
/// The server pod's Service: a `ClusterIP` in the cluster's Service CIDR (`10.96.0.0/16`, as the
/// e2e harness allocates them), routed nowhere, translated by kube-proxy's rules on the node.
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const SERVICE: &str = "server";
/// The Service's ports: iperf3's at its own number, the loop's at 80 (translated to
/// [`LOOP_PORT`], so the destination port is rewritten too).
const SERVICE_IPERF_PORT: u16 = IPERF_PORT;
const SERVICE_LOOP_PORT: u16 = 80;
/// A third Service port whose backend port ([`DENIED_PORT`], where nothing listens) the
/// client's egress policy does not allow: the probe that the Service's flows are decided.
const SERVICE_DENIED_PORT: u16 = 81;
pub(crate) const DENIED_PORT: u16 = 7001;

/// How long and how often each figure is measured.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    pub seconds: f64,
    pub repeats: usize,
}

/// One configuration of the node's filtering.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Filter {
    None,
    Netwarden(u32),
    /// The same as `Netwarden`, with a `netwarden observe --follow` client attached to the
    /// agent's observe endpoint the whole run: the event path must not slow the datapath.
    Observed(u32),
    Iptables(u32),
    Nftables(u32),
    /// The client dials the server through its `ClusterIP`, translated by kube-proxy's
    /// iptables-mode rules on the node; with netwarden enforcing an egress policy on the
    /// client (decided after translation, by the netfilter hook) or with no program.
    Service {
        netwarden: bool,
    },
}

impl Filter {
    /// The configuration whose runs this one's ratios are taken against: kube-proxy alone for
    /// netwarden behind a Service (the translation's own cost is not netwarden's), no program
    /// for the rest.
    fn baseline(self) -> Self {
        match self {
            Self::Service { netwarden: true } => Self::Service { netwarden: false },
            _ => Self::None,
        }
    }

    /// Where the client connects: the server pod itself, or its Service.
    fn target(self) -> Target {
        match self {
            Self::Service { .. } => Target {
                address: CLUSTER_IP,
                iperf_port: SERVICE_IPERF_PORT,
                loop_port: SERVICE_LOOP_PORT,
            },
            _ => Target {
                address: SERVER,
                iperf_port: IPERF_PORT,
                loop_port: LOOP_PORT,
            },
        }
    }
}

impl std::fmt::Display for Filter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::None => write!(f, "no program"),
            Self::Netwarden(rules) => write!(f, "netwarden, {rules} rules"),
            Self::Observed(rules) => write!(f, "netwarden, {rules}, observed"),
            Self::Iptables(rules) => write!(f, "iptables linear, {rules} rules"),
            Self::Nftables(rules) => write!(f, "nftables set, {rules} rules"),
            Self::Service { netwarden: false } => write!(f, "ClusterIP, no program"),
            Self::Service { netwarden: true } => write!(f, "ClusterIP, netwarden*"),
        }
    }
}

/// The address and ports the client dials.
#[derive(Clone, Copy, Debug)]
struct Target {
    address: Ipv4Addr,
    iperf_port: u16,
    loop_port: u16,
}

/// What one run of one configuration measured.
#[derive(Clone, Copy, Debug)]
struct Sample {
    throughput_bps: f64,
    connections_per_second: f64,
    rr_p50: Duration,
    rr_p99: Duration,
}

/// Medians of a configuration's runs, as ratios to the baseline medians of the same pass.
#[derive(Clone, Copy, Debug)]
pub struct Ratios {
    pub throughput: f64,
    pub connections: f64,
    pub rr_p50: f64,
    pub rr_p99: f64,
}

/// The figures the summary line needs from one pass: the 10,000-rule configurations, and
/// netwarden behind a Service against kube-proxy alone.
pub struct PassResult {
    pub netwarden: Ratios,
    pub iptables: Ratios,
    pub nftables: Ratios,
    pub service: Ratios,
}

/// Builds the node, runs both passes and prints them; the node is removed whatever happens.
pub fn run(agent: &Path, plan: Plan) -> anyhow::Result<(PassResult, PassResult)> {
    let node = Node::create()?;
    let result = (|| {
        let mut bench = Bench::start(&node, agent)?;
        let unpinned = bench.pass(plan, false)?;
        let pinned = bench.pass(plan, true)?;
        bench.program_costs(plan.seconds)?;
        bench.stop_agent();
        Ok((unpinned, pinned))
    })();
    drop(node);
    result
}

/// Network namespaces `<prefix>node`, `<prefix>cli`, `<prefix>srv`: two pods wired to the node
/// by veths with host routes, like point-to-point CNIs do.
pub(crate) struct Node {
    prefix: String,
    work: PathBuf,
}

impl Node {
    pub(crate) fn create() -> anyhow::Result<Self> {
        remove_leftovers();
        let prefix = format!("{NETNS_PREFIX}{}", std::process::id());
        let work = std::env::temp_dir().join(format!("{WORK_PREFIX}{}", std::process::id()));
        let node = Self { prefix, work };
        fs::create_dir_all(node.work.join("manifests"))?;
        for suffix in ["node", "cli", "srv"] {
            command("ip", &["netns", "add", &node.netns(suffix)])?;
        }
        let ns = node.netns("node");
        ip(&ns, &["link", "set", "lo", "up"])?;
        sysctl(&ns, "net.ipv4.ip_forward", "1")?;
        for (pod, address) in [("cli", CLIENT), ("srv", SERVER)] {
            let host = format!("v{pod}");
            let pod_ns = node.netns(pod);
            ip(
                &ns,
                &[
                    "link", "add", &host, "type", "veth", "peer", "name", "eth0", "netns", &pod_ns,
                ],
            )?;
            ip(&ns, &["link", "set", &host, "up"])?;
            ip(
                &ns,
                &["address", "add", &format!("{GATEWAY}/32"), "dev", &host],
            )?;
            ip(
                &ns,
                &["route", "add", &format!("{address}/32"), "dev", &host],
            )?;
            ip(&pod_ns, &["link", "set", "lo", "up"])?;
            ip(&pod_ns, &["link", "set", "eth0", "up"])?;
            ip(
                &pod_ns,
                &["address", "add", &format!("{address}/32"), "dev", "eth0"],
            )?;
            ip(
                &pod_ns,
                &[
                    "route",
                    "add",
                    &GATEWAY.to_string(),
                    "dev",
                    "eth0",
                    "scope",
                    "link",
                ],
            )?;
            ip(
                &pod_ns,
                &[
                    "route",
                    "add",
                    "default",
                    "via",
                    &GATEWAY.to_string(),
                    "dev",
                    "eth0",
                ],
            )?;
        }
        // The connection loop leaves TIME_WAIT sockets on the client, which closes first;
        // reusing them after 1 ms keeps the port range from capping the loop.
        let client = node.netns("cli");
        sysctl(&client, "net.ipv4.tcp_tw_reuse", "1")?;
        sysctl(&client, "net.ipv4.tcp_tw_reuse_delay", "1")?;
        sysctl(&client, "net.ipv4.ip_local_port_range", "10000 65000")?;
        Ok(node)
    }

    fn netns(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.prefix)
    }

    /// The namespace of `node`, `cli` or `srv`.
    pub(crate) fn netns_path(&self, suffix: &str) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.netns(suffix)))
    }

    /// The node's working directory: the agent's manifests, bpffs and status file.
    pub(crate) fn work(&self) -> &Path {
        &self.work
    }

    /// The agent's status file.
    pub(crate) fn status_file(&self) -> PathBuf {
        self.work.join("status.json")
    }

    /// The agent's private bpffs, mounted by [`spawn_agent`].
    pub(crate) fn bpffs(&self) -> PathBuf {
        self.work.join("bpffs")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let bpffs = self.work.join("bpffs");
        let _ = nix::mount::umount2(&bpffs, nix::mount::MntFlags::MNT_DETACH);
        for suffix in ["cli", "srv", "node"] {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.netns(suffix)])
                .status();
        }
        let _ = fs::remove_dir_all(&self.work);
    }
}

/// A run's namespaces and work directory are named by these prefixes and the run's pid.
const NETNS_PREFIX: &str = "nwtb";
const WORK_PREFIX: &str = "netwarden-traffic-";

/// Removes what earlier runs that were killed before they could clean up left behind: their
/// namespaces, and their work directories with the private bpffs mounted in each (whose pins
/// would keep that run's maps in the kernel).
fn remove_leftovers() {
    let dead = |rest: &str| {
        let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
        !pid.is_empty() && !Path::new(&format!("/proc/{pid}")).exists()
    };
    for entry in fs::read_dir("/run/netns").into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.strip_prefix(NETNS_PREFIX).is_some_and(dead) {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
    for entry in fs::read_dir(std::env::temp_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.strip_prefix(WORK_PREFIX).is_some_and(dead) {
            let work = entry.path();
            let _ = nix::mount::umount2(&work.join("bpffs"), nix::mount::MntFlags::MNT_DETACH);
            let _ = fs::remove_dir_all(&work);
        }
    }
}

/// The node with its long-lived parts: the iperf3 server and, while a netwarden configuration
/// is measured, the agent.
struct Bench<'node> {
    node: &'node Node,
    agent_binary: PathBuf,
    agent: Option<Agent>,
    /// `netwarden observe --follow` on the agent's socket, and the flows it printed.
    observer: Option<Observer>,
    iperf_server: Child,
}

/// A following observer, counting the flows it is sent.
struct Observer {
    child: Child,
    flows: Arc<AtomicU64>,
}

/// A running agent and the lines of its log, as they come.
pub(crate) struct Agent {
    pub(crate) child: Child,
    pub(crate) log: mpsc::Receiver<String>,
}

impl<'node> Bench<'node> {
    fn start(node: &'node Node, agent: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            node,
            agent_binary: agent.to_owned(),
            agent: None,
            observer: None,
            iperf_server: start_iperf_server(node)?,
        })
    }

    /// One pass: `repeats` rounds of every configuration, baselines interleaved.
    fn pass(&mut self, plan: Plan, pinned: bool) -> anyhow::Result<PassResult> {
        // Every configuration between two baseline runs: its ratio is against their mean, so
        // the machine's drift over a round (other tenants of the host) cancels out.
        let order = [
            Filter::None,
            Filter::Netwarden(10),
            Filter::None,
            Filter::Netwarden(1_000),
            Filter::None,
            Filter::Netwarden(10_000),
            Filter::None,
            Filter::Observed(10_000),
            Filter::None,
            Filter::Iptables(10_000),
            Filter::None,
            Filter::Nftables(10_000),
            Filter::None,
            // netwarden behind a Service sits between two runs of kube-proxy alone, its
            // baseline; kube-proxy alone sits between no-program runs (the next round's first).
            Filter::Service { netwarden: false },
            Filter::Service { netwarden: true },
            Filter::Service { netwarden: false },
        ];
        let mut samples: Vec<(usize, Filter, Sample)> = Vec::new();
        let runs = (0..plan.repeats)
            .flat_map(|round| order.map(|filter| (round, filter)))
            .chain([(plan.repeats, Filter::None)]);
        for (round, filter) in runs {
            self.configure(filter)?;
            let sample = self.measure(plan.seconds, pinned, filter.target())?;
            eprintln!(
                "  [{} pass, round {}] {filter}: {:.2} Gbit/s, {:.0} conn/s, rr p50 {:.1} us p99 {:.1} us",
                if pinned { "pinned" } else { "unpinned" },
                round + 1,
                sample.throughput_bps / 1e9,
                sample.connections_per_second,
                micros(sample.rr_p50),
                micros(sample.rr_p99),
            );
            samples.push((round, filter, sample));
        }
        print_pass(&samples, plan, pinned)
    }

    /// Puts the node in `filter`'s state, removing whatever the previous one installed.
    fn configure(&mut self, filter: Filter) -> anyhow::Result<()> {
        let node_ns = self.node.netns("node");
        // iptables-nft keeps its rules in nftables tables: one flush of the node namespace's
        // ruleset removes both kinds.
        nft_flush(&self.node.netns_path("node"))?;
        if !matches!(
            filter,
            Filter::Netwarden(_) | Filter::Observed(_) | Filter::Service { netwarden: true }
        ) {
            self.stop_agent();
        }
        if !matches!(filter, Filter::Observed(_)) {
            self.stop_observer();
        }
        match filter {
            Filter::None => {}
            Filter::Netwarden(rules) => self.netwarden(&cluster(rules))?,
            Filter::Observed(rules) => {
                self.netwarden(&cluster(rules))?;
                self.start_observer()?;
            }
            Filter::Service { netwarden } => {
                pipe(
                    in_netns(
                        &mut Command::new("iptables-nft-restore"),
                        &self.node.netns_path("node"),
                    )?,
                    &kube_proxy_rules(),
                )
                .with_context(|| format!("loading kube-proxy's rules in {node_ns}"))?;
                if netwarden {
                    self.netwarden(&service_cluster())?;
                }
                self.probe_service(netwarden)?;
            }
            Filter::Iptables(rules) => {
                let mut script = String::from("*filter\n:NW-SERVER - [0:0]\n");
                script.push_str("-A FORWARD -o vsrv -j NW-SERVER\n");
                for address in blocked_peers(rules) {
                    let _ = writeln!(
                        script,
                        "-A NW-SERVER -s {address}/32 -p tcp -m multiport --dports {IPERF_PORT},{LOOP_PORT} -j ACCEPT"
                    );
                }
                let _ = write!(
                    script,
                    "-A NW-SERVER -s {CLIENT}/32 -p tcp -m multiport --dports {IPERF_PORT},{LOOP_PORT} -j ACCEPT\n-A NW-SERVER -j DROP\nCOMMIT\n"
                );
                pipe(
                    in_netns(
                        Command::new("iptables-nft-restore").arg("--noflush"),
                        &self.node.netns_path("node"),
                    )?,
                    &script,
                )
                .with_context(|| format!("loading {rules} iptables rules in {node_ns}"))?;
            }
            Filter::Nftables(rules) => {
                let mut elements: Vec<String> =
                    blocked_peers(rules).map(|a| a.to_string()).collect();
                elements.push(CLIENT.to_string());
                let script = format!(
                    "table inet netwarden_bench {{\n set allowed {{ type ipv4_addr; flags interval; elements = {{ {} }} }}\n chain forward {{ type filter hook forward priority 0; policy accept;\n  oifname \"vsrv\" ip saddr @allowed tcp dport {{ {IPERF_PORT}, {LOOP_PORT} }} accept\n  oifname \"vsrv\" drop\n }}\n}}\n",
                    elements.join(", ")
                );
                pipe(
                    in_netns(
                        Command::new("nft").arg("-f").arg("-"),
                        &self.node.netns_path("node"),
                    )?,
                    &script,
                )
                .with_context(|| format!("loading {rules} nftables elements in {node_ns}"))?;
            }
        }
        Ok(())
    }

    /// Starts the agent if needed, writes `cluster` (a policy with some number of rules, or
    /// the Service configuration) and waits for the agent to log that it applied a change.
    fn netwarden(&mut self, cluster: &Cluster) -> anyhow::Result<()> {
        if self.agent.is_none() {
            self.agent = Some(self.spawn_agent()?);
            self.wait_applied(false)?;
        }
        write_manifests(self.node, cluster)?;
        self.wait_applied(true)
    }

    /// Checks that the Service configuration is what it claims, with a connection to the
    /// Service port whose backend port the client's policy does not allow: kube-proxy alone
    /// translates it to the server pod, which refuses it (nothing listens there; without the
    /// translation the node would answer "unreachable"); with netwarden the flow is decided
    /// after translation and its first packet dropped, so the connection times out.
    fn probe_service(&self, netwarden: bool) -> anyhow::Result<()> {
        let probe = on_thread_in(&self.node.netns_path("cli"), false, move || {
            let target = SocketAddr::from((CLUSTER_IP, SERVICE_DENIED_PORT));
            let result = TcpStream::connect_timeout(&target, Duration::from_millis(300));
            let expected = if netwarden {
                std::io::ErrorKind::TimedOut
            } else {
                std::io::ErrorKind::ConnectionRefused
            };
            match result {
                Err(error) if error.kind() == expected => Ok(()),
                Err(error) => bail!("connecting to {target}: {error}, expected {expected}"),
                Ok(_) => bail!("connecting to {target} succeeded, expected {expected}"),
            }
        })?;
        probe
            .join()
            .map_err(|_| anyhow::anyhow!("the Service probe panicked"))?
            .context(if netwarden {
                "netwarden does not decide the Service's flows"
            } else {
                "kube-proxy's rules do not translate the Service"
            })
    }

    fn spawn_agent(&self) -> anyhow::Result<Agent> {
        spawn_agent(&self.agent_binary, self.node)
    }

    /// Waits for the agent's next "applied" line (one that changed maps when `changed`).
    fn wait_applied(&mut self, changed: bool) -> anyhow::Result<()> {
        let agent = self.agent.as_mut().context("no agent")?;
        let deadline = Instant::now() + Duration::from_mins(1);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = agent
                .log
                .recv_timeout(left)
                .context("the agent did not apply the benchmark policy within 60 s")?;
            let Ok(entry) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            let fields = &entry["fields"];
            if fields["message"] == "applied" && (!changed || fields["changed"] == true) {
                return Ok(());
            }
            if entry["level"] == "ERROR" || entry["level"] == "WARN" {
                eprintln!("  agent: {line}");
            }
        }
    }

    /// Attaches `netwarden observe --follow` to the agent's observe socket (beside its status
    /// file), reading every line it prints as a terminal would.
    fn start_observer(&mut self) -> anyhow::Result<()> {
        if self.observer.is_some() {
            return Ok(());
        }
        let mut child = Command::new(&self.agent_binary)
            .args(["observe", "--follow", "--output", "json", "--agent"])
            .arg(self.node.work.join("observe.sock"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting netwarden observe --follow")?;
        let stdout = child.stdout.take().context("observer stdout")?;
        let flows = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&flows);
        std::thread::spawn(move || {
            for _ in BufReader::new(stdout).lines().map_while(Result::ok) {
                counted.fetch_add(1, Ordering::Relaxed);
            }
        });
        // Connected, or it would have exited: a missing socket ends it at once.
        std::thread::sleep(Duration::from_millis(200));
        if let Some(status) = child.try_wait()? {
            bail!("netwarden observe --follow exited at once: {status}");
        }
        self.observer = Some(Observer { child, flows });
        Ok(())
    }

    /// Detaches the observer, saying how many flows it was sent.
    fn stop_observer(&mut self) {
        if let Some(mut observer) = self.observer.take() {
            let _ = observer.child.kill();
            let _ = observer.child.wait();
            eprintln!(
                "  (the observer was sent {} flows)",
                observer.flows.load(Ordering::Relaxed)
            );
        }
    }

    /// Stops the agent and removes its pinned programs and maps, so that nothing stays
    /// attached (pinned links outlive the agent by design).
    fn stop_agent(&mut self) {
        self.stop_observer();
        if let Some(mut agent) = self.agent.take() {
            if let Ok(pid) = i32::try_from(agent.child.id()) {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), nix::sys::signal::SIGTERM);
            }
            let _ = agent.child.wait();
            let bpffs = self.node.work.join("bpffs");
            let _ = nix::mount::umount2(&bpffs, nix::mount::MntFlags::MNT_DETACH);
            let _ = fs::remove_file(
                self.node
                    .work
                    .join("manifests")
                    .join(format!("{NAMESPACE}.yaml")),
            );
        }
    }

    /// Throughput, then the connection loop, then request/response.
    fn measure(&self, seconds: f64, pinned: bool, target: Target) -> anyhow::Result<Sample> {
        let throughput_bps = self.iperf(seconds, pinned, target)?;
        let connections_per_second = self.connection_loop(seconds, pinned, target)?;
        let (rr_p50, rr_p99) = self.request_response(seconds, pinned, target)?;
        Ok(Sample {
            throughput_bps,
            connections_per_second,
            rr_p50,
            rr_p99,
        })
    }

    fn iperf(&self, seconds: f64, pinned: bool, target: Target) -> anyhow::Result<f64> {
        let mut command = in_netns(
            Command::new("iperf3").args([
                "--client",
                &target.address.to_string(),
                "--port",
                &target.iperf_port.to_string(),
                "--time",
                &format!("{}", seconds.ceil()),
                "--json",
            ]),
            &self.node.netns_path("cli"),
        )?;
        if pinned {
            // Client on CPU 0, and the server told to move there too.
            command.args(["--affinity", "0,0"]);
        }
        let output = command.stderr(Stdio::inherit()).output()?;
        let report: serde_json::Value =
            serde_json::from_slice(&output.stdout).context("iperf3 printed no JSON report")?;
        report["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .with_context(|| {
                format!(
                    "iperf3 reported no throughput: {}",
                    report["error"].as_str().unwrap_or("no error given")
                )
            })
    }

    /// Connect, send a byte, read a byte, close, as often as possible for `seconds`: the rate.
    fn connection_loop(&self, seconds: f64, pinned: bool, target: Target) -> anyhow::Result<f64> {
        let (connections, elapsed) = self.connections(seconds, pinned, target)?;
        Ok(f64::from(connections) / elapsed.as_secs_f64())
    }

    /// The connection loop's connections, and how long it took them.
    fn connections(
        &self,
        seconds: f64,
        pinned: bool,
        target: Target,
    ) -> anyhow::Result<(u32, Duration)> {
        let server = LoopServer::start(&self.node.netns_path("srv"), pinned, false)?;
        let duration = Duration::from_secs_f64(seconds);
        let client = on_thread_in(&self.node.netns_path("cli"), pinned, move || {
            let target = SocketAddr::from((target.address, target.loop_port));
            let started = Instant::now();
            let mut connections = 0_u32;
            while started.elapsed() < duration {
                let mut stream = TcpStream::connect(target)?;
                stream.set_nodelay(true)?;
                stream.write_all(b"?")?;
                let mut byte = [0_u8; 1];
                stream.read_exact(&mut byte)?;
                connections += 1;
            }
            Ok((connections, started.elapsed()))
        })?;
        let counted = client
            .join()
            .map_err(|_| anyhow::anyhow!("client panicked"))?;
        server.stop(&self.node.netns_path("cli"));
        counted
    }

    /// Where a connection's cost goes: the connection loop once more for netwarden at 10,000
    /// rules and behind the Service, with the kernel's per-program statistics on, printed per
    /// program (`program_stats.rs`). Unpinned, like the targets' pass.
    fn program_costs(&mut self, seconds: f64) -> anyhow::Result<()> {
        println!();
        println!(
            "cost in traffic: the connection loop again ({seconds:.1} s, unpinned) with the kernel's per-program statistics on (BPF_ENABLE_STATS); every run also pays the statistics' own two clock reads, so per-run times are an upper bound and the rates below are not the ratios' runs"
        );
        println!(
            "  {:<30} {:<16} {:>10} {:>9} {:>9}",
            "configuration", "program", "runs/conn", "ns/run", "us/conn"
        );
        for filter in [
            Filter::Netwarden(10_000),
            Filter::Service { netwarden: true },
        ] {
            self.configure(filter)?;
            let window = crate::program_stats::Window::open()?;
            let (connections, elapsed) = self.connections(seconds, false, filter.target())?;
            let costs = window.close();
            let per_connection = |time: Duration| micros(time) / f64::from(connections.max(1));
            let mut total = Duration::ZERO;
            for cost in &costs {
                total += cost.time;
                println!(
                    "  {:<30} {:<16} {:>10.1} {:>9.0} {:>9.2}",
                    filter.to_string(),
                    cost.name,
                    cost.runs_per(connections),
                    cost.per_run().as_secs_f64() * 1e9,
                    per_connection(cost.time),
                );
            }
            println!(
                "  {:<30} {:<16} {:>10} {:>9} {:>9.2}   ({:.0} conn/s)",
                filter.to_string(),
                "all",
                "",
                "",
                per_connection(total),
                f64::from(connections) / elapsed.as_secs_f64(),
            );
        }
        self.configure(Filter::None)
    }

    /// One connection, one byte each way, for `seconds`: the latency of each exchange.
    fn request_response(
        &self,
        seconds: f64,
        pinned: bool,
        target: Target,
    ) -> anyhow::Result<(Duration, Duration)> {
        let server = LoopServer::start(&self.node.netns_path("srv"), pinned, true)?;
        let duration = Duration::from_secs_f64(seconds);
        let client = on_thread_in(&self.node.netns_path("cli"), pinned, move || {
            let mut stream = TcpStream::connect_timeout(
                &SocketAddr::from((target.address, target.loop_port)),
                Duration::from_secs(1),
            )?;
            stream.set_nodelay(true)?;
            let mut latencies = Vec::with_capacity(200_000);
            let started = Instant::now();
            let mut byte = [0_u8; 1];
            while started.elapsed() < duration {
                let sent = Instant::now();
                stream.write_all(b"?")?;
                stream.read_exact(&mut byte)?;
                latencies.push(sent.elapsed());
            }
            latencies.sort_unstable();
            let at = |fraction: f64| {
                #[expect(
                    clippy::cast_possible_truncation,
                    clippy::cast_sign_loss,
                    clippy::cast_precision_loss,
                    reason = "an index into a non-empty sample vector"
                )]
                let index = ((latencies.len() as f64 * fraction) as usize).min(latencies.len() - 1);
                latencies[index]
            };
            if latencies.is_empty() {
                bail!("no request/response exchange completed");
            }
            Ok((at(0.50), at(0.99)))
        })?;
        let latencies = client
            .join()
            .map_err(|_| anyhow::anyhow!("client panicked"))?;
        server.stop(&self.node.netns_path("cli"));
        latencies
    }
}

/// Starts iperf3's server in the server pod and waits for it to listen.
pub(crate) fn start_iperf_server(node: &Node) -> anyhow::Result<Child> {
    let mut iperf_server = in_netns(
        Command::new("iperf3").args([
            "--server",
            "--forceflush",
            "--port",
            &IPERF_PORT.to_string(),
        ]),
        &node.netns_path("srv"),
    )?
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .context("starting iperf3 (apt install iperf3, or run cargo xtask setup)")?;
    // Ready once it says so; its first line is "Server listening on 5201 ...".
    let stdout = iperf_server.stdout.take().context("iperf3 stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    loop {
        match lines.next() {
            Some(Ok(line)) if line.contains("listening") => break,
            Some(Ok(_)) => {}
            _ => bail!("iperf3 --server exited before listening"),
        }
    }
    std::thread::spawn(move || lines.for_each(drop));
    Ok(iperf_server)
}

/// Starts `binary` as the node's agent (JSON log lines on its stderr, passed on as they come)
/// on the node's manifests, private bpffs (mounted first if it is not) and status file.
pub(crate) fn spawn_agent(binary: &Path, node: &Node) -> anyhow::Result<Agent> {
    let bpffs = node.bpffs();
    if !bpffs.exists() {
        crate::mount_private_bpffs(&bpffs)?;
    }
    let mut command = in_netns(
        Command::new(binary)
            .args(["agent", "--node", crate::cluster::NODE, "--manifests"])
            .arg(node.work.join("manifests"))
            .arg("--bpffs")
            .arg(&bpffs)
            .arg("--status-file")
            .arg(node.status_file())
            .arg("--log-json"),
        &node.netns_path("node"),
    )?;
    let mut child = command
        .env("NETWARDEN_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting the agent {}", binary.display()))?;
    let stderr = child.stderr.take().context("agent stderr")?;
    let (sender, log) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if sender.send(line).is_err() {
                break;
            }
        }
    });
    Ok(Agent { child, log })
}

/// Writes `cluster` as the node's manifests: one file, so one rename, one inotify event with
/// the whole new content behind it (the cluster-scoped objects, such as the
/// ClusterNetworkPolicies, join the namespace's).
pub(crate) fn write_manifests(node: &Node, cluster: &Cluster) -> anyhow::Result<()> {
    let manifests = node.work.join("manifests");
    let staging = node.work.join("staging");
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(&staging)?;
    crate::manifests::write(cluster, &staging)?;
    let file = format!("{NAMESPACE}.yaml");
    let mut content = fs::read_to_string(staging.join("cluster-scoped.yaml"))?;
    content.push_str(&fs::read_to_string(staging.join(&file))?);
    fs::write(staging.join(&file), content)?;
    fs::rename(staging.join(&file), manifests.join(&file))?;
    Ok(())
}

impl Drop for Bench<'_> {
    fn drop(&mut self) {
        self.stop_agent();
        let _ = self.iperf_server.kill();
        let _ = self.iperf_server.wait();
    }
}

/// The loop and request/response server in the server pod: answers each byte with a byte;
/// in loop mode, then waits for the client to close first (so `TIME_WAIT` lands on the client).
struct LoopServer {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<anyhow::Result<()>>,
}

impl LoopServer {
    fn start(netns: &Path, pinned: bool, persistent: bool) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready, listening) = mpsc::channel();
        let stopping = Arc::clone(&stop);
        let thread = on_thread_in(netns, pinned, move || {
            let listener = bind_reusable(SocketAddr::from((SERVER, LOOP_PORT)))?;
            let _ = ready.send(());
            for stream in listener.incoming() {
                if stopping.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(mut stream) = stream else { continue };
                stream.set_nodelay(true)?;
                let mut byte = [0_u8; 1];
                while let Ok(1) = stream.read(&mut byte) {
                    if stream.write_all(&byte).is_err() {
                        break;
                    }
                    if !persistent {
                        // Wait for the client's FIN.
                        let _ = stream.read(&mut byte);
                        break;
                    }
                }
            }
            Ok(())
        })?;
        listening
            .recv_timeout(Duration::from_secs(5))
            .context("the loop server did not start listening")?;
        Ok(Self { stop, thread })
    }

    /// Stops the server, waking its `accept` with a connection from the client pod (never from
    /// this thread's namespace, whose routes lead off the machine).
    fn stop(self, client_netns: &Path) {
        self.stop.store(true, Ordering::Relaxed);
        if let Ok(waker) = on_thread_in(client_netns, false, || {
            let _ = TcpStream::connect_timeout(
                &SocketAddr::from((SERVER, LOOP_PORT)),
                Duration::from_millis(500),
            );
            Ok(())
        }) {
            let _ = waker.join();
        }
        let _ = self.thread.join();
    }
}

pub(crate) fn bind_reusable(address: SocketAddr) -> anyhow::Result<TcpListener> {
    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, bind, listen, setsockopt, socket,
        sockopt,
    };
    let socket = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    setsockopt(&socket, sockopt::ReuseAddr, &true)?;
    let SocketAddr::V4(v4) = address else {
        bail!("IPv4 only")
    };
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&socket),
        &SockaddrIn::from(v4),
    )?;
    listen(&socket, Backlog::new(1024)?)?;
    Ok(TcpListener::from(socket))
}

/// Runs `work` on a new thread inside the network namespace at `netns`, on CPU 0 when
/// `pinned`.
pub(crate) fn on_thread_in<T: Send + 'static>(
    netns: &Path,
    pinned: bool,
    work: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<JoinHandle<anyhow::Result<T>>> {
    let namespace =
        fs::File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
    Ok(std::thread::spawn(move || {
        nix::sched::setns(namespace.as_fd(), CloneFlags::CLONE_NEWNET)
            .context("entering the pod's network namespace")?;
        if pinned {
            let mut cpus = CpuSet::new();
            cpus.set(0)?;
            nix::sched::sched_setaffinity(Pid::from_raw(0), &cpus)?;
        }
        work()
    }))
}

/// `program` to be started inside the network namespace at `netns`.
pub(crate) fn in_netns(command: &mut Command, netns: &Path) -> anyhow::Result<Command> {
    let namespace =
        fs::File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
    let mut prepared = Command::new(command.get_program());
    prepared.args(command.get_args());
    for (key, value) in command.get_envs() {
        if let Some(value) = value {
            prepared.env(key, value);
        }
    }
    let fd = namespace.as_fd().try_clone_to_owned()?;
    // SAFETY: `setns` is async-signal-safe and touches only the child about to exec.
    unsafe {
        prepared.pre_exec(move || {
            nix::sched::setns(&fd, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
        });
    }
    Ok(prepared)
}

fn pipe(mut command: Command, input: &str) -> anyhow::Result<()> {
    let mut child = command
        .stdin(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", command.get_program().display()))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(input.as_bytes())?;
    let status = child.wait()?;
    if !status.success() {
        bail!("{} failed: {status}", command.get_program().display());
    }
    Ok(())
}

fn nft_flush(netns: &Path) -> anyhow::Result<()> {
    let status = in_netns(Command::new("nft").arg("flush ruleset"), netns)?
        .status()
        .context("running nft (apt install nftables, or run cargo xtask setup)")?;
    if !status.success() {
        bail!("nft flush ruleset failed: {status}");
    }
    Ok(())
}

fn command(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new(program)
        .args(args)
        .status()
        .with_context(|| format!("starting {program}"))?;
    if !status.success() {
        bail!("{program} {} failed: {status}", args.join(" "));
    }
    Ok(())
}

fn ip(netns: &str, args: &[&str]) -> anyhow::Result<()> {
    let mut full = vec!["-n", netns];
    full.extend_from_slice(args);
    command("ip", &full)
}

fn sysctl(netns: &str, key: &str, value: &str) -> anyhow::Result<()> {
    command(
        "ip",
        &[
            "netns",
            "exec",
            netns,
            "sysctl",
            "-q",
            "-w",
            &format!("{key}={value}"),
        ],
    )
}

/// The `rules - 1` addresses that precede the client in every rule set: single addresses in
/// 172.16.0.0/12, none of them the client.
fn blocked_peers(rules: u32) -> impl Iterator<Item = Ipv4Addr> {
    let base = u32::from(Ipv4Addr::new(172, 16, 0, 0));
    (0..rules.saturating_sub(1)).map(move |index| Ipv4Addr::from(base + index))
}

/// The benchmark cluster: [`isolated_server`] with 100 Admin and 100 Baseline
/// ClusterNetworkPolicies selecting both pods in force (`tiers.rs`).
fn cluster(rules: u32) -> Cluster {
    let mut cluster = isolated_server(rules);
    crate::tiers::add(&mut cluster, NAMESPACE);
    cluster
}

/// Client and server pods on this node, the server isolated by one policy with `rules - 1`
/// `ipBlock` rules and a last rule allowing the client pod on [`IPERF_PORT`] and [`LOOP_PORT`]
/// (so not on [`DENIED_PORT`]).
pub(crate) fn isolated_server(rules: u32) -> Cluster {
    let mut cluster = Cluster::default();
    cluster.namespaces.insert(
        NAMESPACE.into(),
        Namespace {
            name: NAMESPACE.into(),
            labels: Arc::new(
                [(
                    "kubernetes.io/metadata.name".to_owned(),
                    NAMESPACE.to_owned(),
                )]
                .into(),
            ),
        },
    );
    for (name, ip) in [("client", CLIENT), ("server", SERVER)] {
        let pod = Pod {
            id: PodRef {
                namespace: NAMESPACE.into(),
                name: name.into(),
            },
            labels: Arc::new([("app".to_owned(), name.to_owned())].into()),
            node_name: Some(crate::cluster::NODE.into()),
            ips: vec![IpAddr::V4(ip)],
            ports: Vec::new().into(),
            host_network: false,
            service_account: "default".into(),
            mtls: netwarden_model::PodMtls::default().into(),
        };
        cluster.pods.insert(pod.id.clone(), pod);
    }
    let ports: Vec<PortSpec> = [IPERF_PORT, LOOP_PORT]
        .into_iter()
        .map(|port| PortSpec {
            protocol: Protocol::Tcp,
            port: Some(PortRef::Number(port)),
            end_port: None,
        })
        .collect();
    let mut ingress: Vec<Rule> = blocked_peers(rules)
        .map(|address| Rule {
            peers: vec![Peer::IpBlock {
                cidr: IpNet::V4(Ipv4Net::new(address, 32).expect("a /32")),
                except: Vec::new(),
            }],
            ports: ports.clone(),
        })
        .collect();
    ingress.push(Rule {
        peers: vec![Peer::Pods {
            pod_selector: Some(LabelSelector {
                requirements: vec![Requirement::In("app".into(), vec!["client".into()])],
            }),
            namespace_selector: None,
        }],
        ports,
    });
    let policy = NetworkPolicy {
        enforcement: netwarden_model::Enforcement::Enforce,
        id: PolicyRef {
            namespace: NAMESPACE.into(),
            name: "server".into(),
        },
        pod_selector: LabelSelector {
            requirements: vec![Requirement::In("app".into(), vec!["server".into()])],
        },
        policy_types: PolicyTypes {
            ingress: true,
            egress: false,
        },
        ingress,
        egress: Vec::new(),
    };
    cluster.policies.insert(policy.id.clone(), policy.into());
    cluster
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn micros(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e6
}

/// The four figures of a sample, in table order.
fn figures(sample: &Sample) -> [f64; 4] {
    [
        sample.throughput_bps,
        sample.connections_per_second,
        micros(sample.rr_p50),
        micros(sample.rr_p99),
    ]
}

/// The mean of the runs of `baseline` just before and just after run `index` (for a run of
/// `baseline` itself: the nearest other ones), so each ratio compares runs seconds apart.
fn neighbour_baseline(
    samples: &[(usize, Filter, Sample)],
    index: usize,
    baseline: Filter,
) -> [f64; 4] {
    let is_baseline = |i: &usize| samples[*i].1 == baseline;
    let before = (0..index).rev().find(is_baseline);
    let after = (index + 1..samples.len()).find(is_baseline);
    let runs: Vec<[f64; 4]> = before
        .into_iter()
        .chain(after)
        .map(|i| figures(&samples[i].2))
        .collect();
    #[expect(clippy::cast_precision_loss, reason = "one or two runs")]
    let count = runs.len() as f64;
    std::array::from_fn(|figure| runs.iter().map(|f| f[figure]).sum::<f64>() / count)
}

/// Each of `filter`'s runs' figures as ratios to [`neighbour_baseline`] of its
/// [`Filter::baseline`], one array a round.
fn round_ratios(samples: &[(usize, Filter, Sample)], filter: Filter) -> Vec<[f64; 4]> {
    samples
        .iter()
        .enumerate()
        .filter(|(_, (_, f, _))| *f == filter)
        .map(|(index, (_, _, sample))| {
            let baseline = neighbour_baseline(samples, index, filter.baseline());
            let figures = figures(sample);
            std::array::from_fn(|figure| figures[figure] / baseline[figure])
        })
        .collect()
}

/// The median over rounds of each of [`round_ratios`].
fn paired_ratios(samples: &[(usize, Filter, Sample)], filter: Filter) -> [f64; 4] {
    let ratios = round_ratios(samples, filter);
    std::array::from_fn(|figure| median(ratios.iter().map(|r| r[figure]).collect()))
}

/// The lowest and highest of one figure's per-round ratios (`figure` indexes [`figures`]).
fn ratio_range(samples: &[(usize, Filter, Sample)], filter: Filter, figure: usize) -> (f64, f64) {
    round_ratios(samples, filter)
        .iter()
        .map(|ratios| ratios[figure])
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(low, high), ratio| {
            (low.min(ratio), high.max(ratio))
        })
}

/// Prints a pass's table: each configuration's median figures, and the median over rounds of
/// its ratio to the mean of the baseline runs just before and after it (pairing neighbours
/// cancels the drifts of a shared virtual machine that medians over the whole pass keep).
fn print_pass(
    samples: &[(usize, Filter, Sample)],
    plan: Plan,
    pinned: bool,
) -> anyhow::Result<PassResult> {
    let medians = |filter: Filter| -> [f64; 4] {
        let of_filter: Vec<[f64; 4]> = samples
            .iter()
            .filter(|(_, f, _)| *f == filter)
            .map(|(_, _, sample)| figures(sample))
            .collect();
        std::array::from_fn(|figure| median(of_filter.iter().map(|f| f[figure]).collect()))
    };
    let baseline_runs = samples
        .iter()
        .filter(|(_, f, _)| *f == Filter::None)
        .count();
    println!();
    println!(
        "{} pass: {} rounds of {:.1} s runs, {baseline_runs} baseline runs, one before and after every other run; figures are medians, ratios the median over rounds of each run against the mean of the baseline runs beside it (for the baseline itself: the spread between neighbouring baseline runs)",
        if pinned {
            "pinned (client and server on CPU 0)"
        } else {
            "unpinned"
        },
        plan.repeats,
        plan.seconds
    );
    println!(
        "  {:<30} {:>12} {:>7} {:>10} {:>7} {:>10} {:>7} {:>10} {:>7}",
        "configuration",
        "tput Gbit/s",
        "ratio",
        "conn/s",
        "ratio",
        "rr p50 us",
        "ratio",
        "rr p99 us",
        "ratio"
    );
    let mut ratios = std::collections::HashMap::new();
    for filter in [
        Filter::None,
        Filter::Netwarden(10),
        Filter::Netwarden(1_000),
        Filter::Netwarden(10_000),
        Filter::Observed(10_000),
        Filter::Iptables(10_000),
        Filter::Nftables(10_000),
        Filter::Service { netwarden: false },
        Filter::Service { netwarden: true },
    ] {
        let figures = medians(filter);
        let paired = paired_ratios(samples, filter);
        let ratio = Ratios {
            throughput: paired[0],
            connections: paired[1],
            rr_p50: paired[2],
            rr_p99: paired[3],
        };
        println!(
            "  {:<30} {:>12.2} {:>6.2}x {:>10.0} {:>6.2}x {:>10.1} {:>6.2}x {:>10.1} {:>6.2}x",
            filter.to_string(),
            figures[0] / 1e9,
            ratio.throughput,
            figures[1],
            ratio.connections,
            figures[2],
            ratio.rr_p50,
            figures[3],
            ratio.rr_p99
        );
        ratios.insert(filter, ratio);
    }
    println!(
        "  ClusterIP rows: the client dials {CLUSTER_IP}:{SERVICE_IPERF_PORT} (iperf3) and {CLUSTER_IP}:{SERVICE_LOOP_PORT} (loop), translated by kube-proxy's iptables rules to the server pod; * ratios against the ClusterIP runs with no program beside it (kube-proxy alone), the others against no program"
    );
    print_round_ranges(samples);
    let take = |filter| {
        ratios
            .get(&filter)
            .copied()
            .context("a measured configuration")
    };
    let (observed, unobserved) = (
        take(Filter::Observed(10_000))?,
        take(Filter::Netwarden(10_000))?,
    );
    println!(
        "  observed row: `netwarden observe --follow` attached to the agent the whole run (allows sampled 1 in 100, as by default); against the same rules unobserved: tput {:.2}x, conn/s {:.2}x, rr p50 {:.2}x, rr p99 {:.2}x",
        observed.throughput / unobserved.throughput,
        observed.connections / unobserved.connections,
        observed.rr_p50 / unobserved.rr_p50,
        observed.rr_p99 / unobserved.rr_p99,
    );
    Ok(PassResult {
        netwarden: take(Filter::Netwarden(10_000))?,
        iptables: take(Filter::Iptables(10_000))?,
        nftables: take(Filter::Nftables(10_000))?,
        service: take(Filter::Service { netwarden: true })?,
    })
}

/// Prints how far single rounds' ratios stray for the rows with targets: the targets are medians
/// of a handful of rounds, and the spread says how near a target a median can be told apart
/// from it on this machine.
fn print_round_ranges(samples: &[(usize, Filter, Sample)]) {
    let ranges: Vec<String> = [
        Filter::Netwarden(10_000),
        Filter::Service { netwarden: true },
    ]
    .into_iter()
    .map(|filter| {
        let (tput, conn) = (
            ratio_range(samples, filter, 0),
            ratio_range(samples, filter, 1),
        );
        format!(
            "{filter}: tput {:.2}x-{:.2}x, conn/s {:.2}x-{:.2}x",
            tput.0, tput.1, conn.0, conn.1
        )
    })
    .collect();
    println!(
        "  single rounds' ratios (the medians above are of these): {}",
        ranges.join("; ")
    );
}

/// The node's `filter` and `nat` tables as kube-proxy in iptables mode writes them for the one
/// Service of [`service_cluster`] (three TCP ports, one ready endpoint, the server pod): the
/// chains, names, hashes, masquerade mark and rules of `pkg/proxy/iptables/proxier.go`
/// (kubernetes/kubernetes), as the e2e harness generates them (`tests/e2e/src/kube_proxy.rs`)
/// for a one-node cluster without `NodePort` Services. Chain suffixes are kube-proxy's hashes:
/// base32(sha256(`bench/server:iperf` `tcp`))\[..16\] and so on, with the endpoint appended
/// for `KUBE-SEP-`. Loaded with `iptables-nft-restore`, so one `nft flush ruleset` removes it.
fn kube_proxy_rules() -> String {
    const MARK: &str = "0x4000";
    const POD_CIDR: &str = "10.244.0.0/16";
    let mut text = String::from(
        "*filter\n\
         :INPUT ACCEPT [0:0]\n\
         :FORWARD ACCEPT [0:0]\n\
         :OUTPUT ACCEPT [0:0]\n\
         :KUBE-SERVICES - [0:0]\n\
         :KUBE-EXTERNAL-SERVICES - [0:0]\n\
         :KUBE-FORWARD - [0:0]\n\
         -A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
         -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
         -A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n\
         -A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n",
    );
    let _ = write!(
        text,
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {MARK}/{MARK} -j ACCEPT\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
         COMMIT\n\
         *nat\n\
         :PREROUTING ACCEPT [0:0]\n\
         :INPUT ACCEPT [0:0]\n\
         :OUTPUT ACCEPT [0:0]\n\
         :POSTROUTING ACCEPT [0:0]\n\
         :KUBE-SERVICES - [0:0]\n\
         :KUBE-NODEPORTS - [0:0]\n\
         :KUBE-POSTROUTING - [0:0]\n\
         :KUBE-MARK-MASQ - [0:0]\n"
    );
    // (Service port name, Service port, endpoint port, KUBE-SVC- hash, KUBE-SEP- hash).
    let ports = [
        (
            "iperf",
            SERVICE_IPERF_PORT,
            IPERF_PORT,
            "7UWT2LEQNQGZ7JMI",
            "DT5EUYOVVKSQ45NS",
        ),
        (
            "loop",
            SERVICE_LOOP_PORT,
            LOOP_PORT,
            "CULH3G2XHSMSUR2N",
            "KC3UELRLQCLCNCHY",
        ),
        (
            "denied",
            SERVICE_DENIED_PORT,
            DENIED_PORT,
            "Y7UPYYRB5HOIY4CH",
            "6DH5JKD7GW5QVRSE",
        ),
    ];
    for (_, _, _, service_hash, endpoint_hash) in ports {
        let _ = writeln!(
            text,
            ":KUBE-SVC-{service_hash} - [0:0]\n:KUBE-SEP-{endpoint_hash} - [0:0]"
        );
    }
    let _ = write!(
        text,
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark {MARK}\n\
         -A KUBE-POSTROUTING -m mark ! --mark {MARK}/{MARK} -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark {MARK}\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n"
    );
    for (name, service_port, endpoint_port, service_hash, endpoint_hash) in ports {
        let name = format!("{NAMESPACE}/{SERVICE}:{name}");
        let service_chain = format!("KUBE-SVC-{service_hash}");
        let endpoint_chain = format!("KUBE-SEP-{endpoint_hash}");
        let endpoint = format!("{SERVER}:{endpoint_port}");
        let _ = write!(
            text,
            "-A KUBE-SERVICES -m comment --comment \"{name} cluster IP\" -m tcp -p tcp -d {CLUSTER_IP} --dport {service_port} -j {service_chain}\n\
             -A {service_chain} -m comment --comment \"{name} cluster IP\" -m tcp -p tcp -d {CLUSTER_IP} --dport {service_port} ! -s {POD_CIDR} -j KUBE-MARK-MASQ\n\
             -A {service_chain} -m comment --comment \"{name} -> {endpoint}\" -j {endpoint_chain}\n\
             -A {endpoint_chain} -m comment --comment {name} -s {SERVER} -j KUBE-MARK-MASQ\n\
             -A {endpoint_chain} -m comment --comment {name} -m tcp -p tcp -j DNAT --to-destination {endpoint}\n"
        );
    }
    text.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n\
         COMMIT\n",
    );
    text
}

/// The Service configuration: the 1-rule cluster (the server isolated, the client pod
/// allowed), the client isolated for egress by a policy allowing the server pod by pod
/// selector on the measured endpoint ports, and the server's Service with its
/// `EndpointSlice`, so that the agent knows the `ClusterIP` as a frontend and decides the flow
/// after translation. The Service's third port leads to a port the policy does not allow.
fn service_cluster() -> Cluster {
    use netwarden_model::{
        AddressType, EndpointPort, EndpointSlice, EndpointSliceRef, Service, ServiceEndpoint,
        ServicePort, ServiceRef, ServiceType,
    };
    let mut cluster = cluster(1);
    let selector = |app: &str| LabelSelector {
        requirements: vec![Requirement::In("app".into(), vec![app.into()])],
    };
    let policy = NetworkPolicy {
        enforcement: netwarden_model::Enforcement::Enforce,
        id: PolicyRef {
            namespace: NAMESPACE.into(),
            name: "client-egress".into(),
        },
        pod_selector: selector("client"),
        policy_types: PolicyTypes {
            ingress: false,
            egress: true,
        },
        ingress: Vec::new(),
        egress: vec![Rule {
            peers: vec![Peer::Pods {
                pod_selector: Some(selector("server")),
                namespace_selector: None,
            }],
            ports: [IPERF_PORT, LOOP_PORT]
                .into_iter()
                .map(|port| PortSpec {
                    protocol: Protocol::Tcp,
                    port: Some(PortRef::Number(port)),
                    end_port: None,
                })
                .collect(),
        }],
    };
    cluster.policies.insert(policy.id.clone(), policy.into());
    let id = ServiceRef {
        namespace: NAMESPACE.into(),
        name: SERVICE.into(),
    };
    let ports = [
        ("iperf", SERVICE_IPERF_PORT, IPERF_PORT),
        ("loop", SERVICE_LOOP_PORT, LOOP_PORT),
        ("denied", SERVICE_DENIED_PORT, DENIED_PORT),
    ];
    let service = Service {
        id: id.clone(),
        service_type: ServiceType::ClusterIp,
        cluster_ips: vec![IpAddr::V4(CLUSTER_IP)],
        external_ips: Vec::new(),
        load_balancer_ips: Vec::new(),
        ports: ports
            .iter()
            .map(|&(name, port, target)| ServicePort {
                name: Some(name.into()),
                protocol: Protocol::Tcp,
                port,
                target_port: PortRef::Number(target),
                node_port: None,
            })
            .collect(),
        selector: [("app".to_owned(), "server".to_owned())].into(),
    };
    cluster.services.insert(id.clone(), service);
    let slice = EndpointSlice {
        id: EndpointSliceRef {
            namespace: NAMESPACE.into(),
            name: format!("{SERVICE}-bench"),
        },
        service: id,
        address_type: AddressType::Ipv4,
        endpoints: vec![ServiceEndpoint {
            addresses: vec![IpAddr::V4(SERVER)],
            ready: true,
            pod: Some(PodRef {
                namespace: NAMESPACE.into(),
                name: "server".into(),
            }),
            node_name: Some(crate::cluster::NODE.into()),
        }],
        ports: ports
            .iter()
            .map(|&(name, _, target)| EndpointPort {
                name: Some(name.into()),
                protocol: Protocol::Tcp,
                port: target,
            })
            .collect(),
    };
    cluster.endpoint_slices.insert(slice.id.clone(), slice);
    cluster
}

#[cfg(test)]
#[expect(
    clippy::float_cmp,
    reason = "each expected ratio is one correctly rounded quotient of the figures given"
)]
mod tests {
    use super::*;

    fn run(
        filter: Filter,
        throughput_bps: f64,
        connections_per_second: f64,
    ) -> (usize, Filter, Sample) {
        let sample = Sample {
            throughput_bps,
            connections_per_second,
            rr_p50: Duration::from_micros(50),
            rr_p99: Duration::from_micros(90),
        };
        (0, filter, sample)
    }

    #[test]
    fn each_run_is_paired_with_the_baseline_runs_beside_it() {
        let measured = Filter::Netwarden(10_000);
        let samples = [
            run(Filter::None, 10.0, 100.0),
            run(measured, 9.0, 90.0),
            run(Filter::None, 10.0, 100.0),
            // Against the mean of its neighbours (10 and 14), not of the whole pass.
            run(measured, 12.0, 96.0),
            run(Filter::None, 14.0, 140.0),
            run(measured, 14.0, 133.0),
            run(Filter::None, 14.0, 140.0),
        ];
        let ratios = round_ratios(&samples, measured);
        let throughput: Vec<f64> = ratios.iter().map(|ratio| ratio[0]).collect();
        assert_eq!(throughput, [0.9, 1.0, 1.0]);
        let connections: Vec<f64> = ratios.iter().map(|ratio| ratio[1]).collect();
        assert_eq!(connections, [0.9, 0.8, 0.95]);
        assert_eq!(paired_ratios(&samples, measured)[1], 0.9);
        assert_eq!(ratio_range(&samples, measured, 1), (0.8, 0.95));
    }

    #[test]
    fn the_service_row_is_paired_with_kube_proxy_alone_not_with_no_program() {
        let measured = Filter::Service { netwarden: true };
        let alone = Filter::Service { netwarden: false };
        let samples = [
            run(Filter::None, 20.0, 200.0),
            run(alone, 10.0, 100.0),
            run(measured, 9.0, 85.0),
            run(alone, 10.0, 100.0),
            run(Filter::None, 20.0, 200.0),
        ];
        let ratios = paired_ratios(&samples, measured);
        assert_eq!((ratios[0], ratios[1]), (0.9, 0.85));
    }
}
