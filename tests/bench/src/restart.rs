//! `netwarden-bench restart`: traffic between two pods keeps flowing while the agent is
//! killed (SIGKILL) and restarted, and while it is upgraded from a build whose maps had another
//! layout (issue #17: "restart and upgrade under load").
//!
//! The node is the datapath benchmark's (`traffic.rs`): a client and a server pod, the server
//! isolated by a policy that allows the client on [`IPERF_PORT`] and [`LOOP_PORT`] only. For
//! the whole run, from the client:
//!
//! - one iperf3 TCP stream, its bytes reported every 100 ms: it must never break, and how long
//!   it stalled is reported;
//! - a few idle established connections, each exchanging a byte every 20 ms: none may break;
//! - a connect/request/close loop to [`LOOP_PORT`], which the policy allows: no connection may
//!   fail, nor need its SYN sent again (a dropped SYN is a transient deny, even though the
//!   retransmission a second later gets through);
//! - a loop of connection attempts to [`DENIED_PORT`], where the server listens but the policy
//!   forbids: none may be accepted (counted by the client and by the server).
//!
//! Meanwhile the agent goes through its phases: the first agent (the old build, with
//! `--old-agent`) enforcing alone; the upgrade (SIGTERM, then this build started on the same
//! pins, as a DaemonSet's rolling update does); then `cycles` times SIGKILL, the agent down
//! for a while (the pinned programs enforce alone), and a restart; every second kill lands
//! just after a change to the server's policy that decides none of the traffic (a rule more
//! or less), 0 to 25 ms after the change is written (varying by cycle), so that some kills
//! land while the agent reads or applies it. Each phase lasts until the
//! new agent has applied and taken over, then `seconds` more; the waits are on the agent's
//! status file, never on a fixed delay. A table gives each phase's figures, and the run fails
//! when one of the goals is missed.

use std::{
    fs,
    io::{ErrorKind, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use netwarden_model::{Cluster, PortRef};
use nix::{sys::signal::Signal, unistd::Pid};

use crate::traffic::{
    self, Agent, CLIENT, DENIED_PORT, IPERF_PORT, LOOP_PORT, Node, SERVER, bind_reusable,
    on_thread_in,
};

/// What to run.
#[derive(clap::Args)]
pub struct Options {
    /// This build's agent.
    #[arg(long)]
    pub agent: PathBuf,
    /// An agent of an earlier build (other map layouts) to start with and upgrade from.
    #[arg(long)]
    pub old_agent: Option<PathBuf>,
    /// SIGKILL and restart cycles.
    #[arg(long, default_value_t = 5)]
    pub cycles: usize,
    /// Seconds of traffic after each agent has taken over (and before the first event).
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Seconds the agent stays down after each SIGKILL.
    #[arg(long, default_value_t = 1.0)]
    pub down_seconds: f64,
    /// Put in a fault the run must catch (it must then fail): to check the bench itself.
    #[arg(long, value_enum)]
    pub sabotage: Option<Sabotage>,
}

/// Faults put in on purpose: the run must then miss a goal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Sabotage {
    /// After each SIGKILL, remove the pins of the programs' links, as an agent that detaches
    /// when it dies would leave them: the server pod is open until the restarted agent
    /// attaches again.
    UnpinLinks,
    /// At the first restart, a policy that no longer allows the loop's port: the loop's
    /// connections fail from then on.
    DenyLoopPort,
}

/// Idle established connections kept open across the run.
const IDLE_CONNECTIONS: usize = 4;
/// How often each idle connection exchanges a byte.
const IDLE_PERIOD: Duration = Duration::from_millis(20);
/// A connect slower than this had its SYN sent again: the first was dropped (Linux's initial
/// retransmission timeout is one second).
const SYN_RETRANSMITTED: Duration = Duration::from_millis(900);
/// How long an allowed connection may take to connect or answer before it counts as failed.
const ALLOWED_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a connection attempt to the forbidden port waits for an answer: the policy drops
/// its SYN, so it times out unless something lets it through.
const FORBIDDEN_TIMEOUT: Duration = Duration::from_millis(20);
/// iperf3's reporting interval: stalls are measured in these steps.
const IPERF_INTERVAL_SECONDS: f64 = 0.1;
/// How long after writing a policy change the agent is killed, by cycle: spread so that some
/// kills land before the agent has read the change and some during its apply.
const KILL_AFTER_CHANGE: [Duration; 5] = [
    Duration::from_millis(0),
    Duration::from_millis(3),
    Duration::from_millis(6),
    Duration::from_millis(12),
    Duration::from_millis(25),
];
/// How long an agent may take from its start to its first apply taking over the node.
const READY_TIMEOUT: Duration = Duration::from_mins(1);

/// Figures of one phase, written by the traffic threads while it is the current one.
#[derive(Default)]
struct Row {
    allowed_ok: AtomicU64,
    allowed_failed: AtomicU64,
    allowed_syn_retransmitted: AtomicU64,
    forbidden_probes: AtomicU64,
    forbidden_accepted: AtomicU64,
    forbidden_accepted_by_server: AtomicU64,
    idle_broken: AtomicU64,
    idle_longest_gap_us: AtomicU64,
}

/// The phases, and which one traffic is in now.
struct Ledger {
    current: AtomicUsize,
    rows: Vec<Row>,
    /// The first few failures, with their phase, to print.
    failures: Mutex<Vec<(usize, String)>>,
}

impl Ledger {
    fn new(phases: usize) -> Self {
        Self {
            current: AtomicUsize::new(0),
            rows: (0..phases).map(|_| Row::default()).collect(),
            failures: Mutex::new(Vec::new()),
        }
    }

    fn row(&self) -> &Row {
        &self.rows[self.current.load(Ordering::Relaxed)]
    }

    fn failure(&self, what: String) {
        let mut failures = self.failures.lock().expect("no thread panics holding it");
        if failures.len() < 20 {
            failures.push((self.current.load(Ordering::Relaxed), what));
        }
    }
}

/// One phase as the main thread lived it.
struct Phase {
    name: String,
    started: Instant,
    /// From the agent's start to its first apply having taken over.
    to_ready: Option<Duration>,
    /// How long no agent ran.
    down: Option<Duration>,
}

/// Runs the bench; an error (a non-zero exit) when a goal is missed.
pub fn run(options: &Options) -> anyhow::Result<()> {
    let node = Node::create()?;
    let result = run_on(&node, options);
    drop(node);
    let (phases, ledger, iperf) = result?;
    report(&phases, &ledger, &iperf, options)
}

type Outcome = (Vec<Phase>, Arc<Ledger>, IperfRun);

fn run_on(node: &Node, options: &Options) -> anyhow::Result<Outcome> {
    fs::create_dir_all(node.work().join("manifests"))?;
    traffic::write_manifests(node, &traffic::isolated_server(1))?;
    let phase_count = 1 + usize::from(options.old_agent.is_some()) + options.cycles;
    let ledger = Arc::new(Ledger::new(phase_count));
    let mut phases = Vec::with_capacity(phase_count);

    let first = options.old_agent.as_deref().unwrap_or(&options.agent);
    let started = Instant::now();
    // Each of these stops what it started when dropped, on the way out of an error too (the
    // last started first), before the node's namespaces and bpffs go.
    let mut agent = start_agent(first, node)?;
    let to_ready = started.elapsed();
    let _iperf_server = KillOnDrop(traffic::start_iperf_server(node)?);
    let mut servers = Servers::start(node, &ledger)?;
    let mut traffic = start_traffic(node, &ledger)?;
    let iperf = Iperf::start(node)?;
    phases.push(Phase {
        name: if options.old_agent.is_some() {
            "old agent, steady".into()
        } else {
            "agent, steady".into()
        },
        started: Instant::now(),
        to_ready: Some(to_ready),
        down: None,
    });
    let seconds = Duration::from_secs_f64(options.seconds);
    let result = (|| -> anyhow::Result<()> {
        std::thread::sleep(seconds);
        if options.old_agent.is_some() {
            let name = "upgrade (SIGTERM old, start new)".to_owned();
            begin(&mut phases, &ledger, name);
            let stopped = Instant::now();
            agent.stop(Signal::SIGTERM)?;
            let down = stopped.elapsed();
            let restarted = Instant::now();
            agent = start_agent(&options.agent, node)?;
            finish(&mut phases, down, restarted.elapsed());
            std::thread::sleep(seconds);
        }
        let mut server_rules = 1;
        for cycle in 1..=options.cycles {
            let mid_change = cycle % 2 == 0 && options.sabotage != Some(Sabotage::DenyLoopPort);
            let name = if mid_change {
                format!("SIGKILL mid-change, restart {cycle}")
            } else {
                format!("SIGKILL + restart {cycle}")
            };
            begin(&mut phases, &ledger, name);
            if mid_change {
                // The server's policy gains or loses a rule that decides none of the
                // traffic: a new policy id, the endpoint switched to it, the old one deleted.
                server_rules = 3 - server_rules;
                traffic::write_manifests(node, &traffic::isolated_server(server_rules))?;
                std::thread::sleep(KILL_AFTER_CHANGE[(cycle / 2) % KILL_AFTER_CHANGE.len()]);
            }
            let killed = Instant::now();
            agent.stop(Signal::SIGKILL)?;
            if options.sabotage == Some(Sabotage::UnpinLinks) {
                unpin_links(node)?;
            }
            if options.sabotage == Some(Sabotage::DenyLoopPort) && cycle == 1 {
                traffic::write_manifests(node, &loop_port_denied())?;
            }
            std::thread::sleep(Duration::from_secs_f64(options.down_seconds));
            let down = killed.elapsed();
            let restarted = Instant::now();
            agent = start_agent(&options.agent, node)?;
            finish(&mut phases, down, restarted.elapsed());
            std::thread::sleep(seconds);
        }
        Ok(())
    })();
    let iperf = iperf.stop();
    traffic.join();
    servers.stop();
    agent.stop(Signal::SIGTERM)?;
    result?;
    Ok((phases, ledger, iperf?))
}

/// A child process killed and reaped when dropped.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the next phase: traffic's figures go to its row from now on.
fn begin(phases: &mut Vec<Phase>, ledger: &Ledger, name: String) {
    phases.push(Phase {
        name,
        started: Instant::now(),
        to_ready: None,
        down: None,
    });
    ledger.current.store(phases.len() - 1, Ordering::Relaxed);
}

/// Records how long the phase's agent was down and took to take over.
fn finish(phases: &mut [Phase], down: Duration, to_ready: Duration) {
    if let Some(phase) = phases.last_mut() {
        phase.down = Some(down);
        phase.to_ready = Some(to_ready);
    }
}

/// A running agent, its warnings passed on to stderr; stopped with SIGTERM when dropped.
struct RunningAgent {
    child: Child,
    reaped: bool,
}

impl RunningAgent {
    /// Signals the agent and reaps it (once: its pid may be another process's afterwards).
    fn stop(&mut self, signal: Signal) -> anyhow::Result<()> {
        if self.reaped {
            return Ok(());
        }
        let pid = Pid::from_raw(i32::try_from(self.child.id())?);
        nix::sys::signal::kill(pid, signal).with_context(|| format!("sending {signal}"))?;
        self.child.wait()?;
        self.reaped = true;
        Ok(())
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        let _ = self.stop(Signal::SIGTERM);
    }
}

/// Starts `binary` as the node's agent and waits until its first apply has taken over the node.
fn start_agent(binary: &Path, node: &Node) -> anyhow::Result<RunningAgent> {
    let Agent { mut child, log } = traffic::spawn_agent(binary, node)?;
    std::thread::spawn(move || {
        for line in log {
            let Ok(entry) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            // Denied flows are logged as warnings too: the forbidden probes make many.
            let verdict = !entry["fields"]["verdict"].is_null();
            if (entry["level"] == "ERROR" || entry["level"] == "WARN") && !verdict {
                eprintln!("  agent {}: {}", entry["level"], entry["fields"]);
            }
        }
    });
    match wait_enforcing(&node.status_file(), &mut child) {
        Ok(()) => Ok(RunningAgent {
            child,
            reaped: false,
        }),
        Err(error) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(error)
        }
    }
}

/// Waits for the status file of the agent `child` (its pid: not a predecessor's) to show both
/// pods enforced, attached and nothing pending: the end of its first apply, which takes over
/// the links a previous agent pinned.
fn wait_enforcing(status_file: &Path, child: &mut Child) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("the agent exited before its first apply: {status}");
        }
        if let Ok(text) = fs::read_to_string(status_file)
            && let Ok(status) = serde_json::from_str::<serde_json::Value>(&text)
            && status["pid"] == child.id()
        {
            let endpoints = status["endpoints"]
                .as_array()
                .map_or(&[][..], Vec::as_slice);
            let attached = endpoints
                .iter()
                .filter(|endpoint| endpoint["attached"] == true && endpoint["state"] == "ready")
                .count();
            let settled = [&status["pending"], &status["unenforced"], &status["errors"]]
                .iter()
                .all(|list| list.as_array().is_none_or(Vec::is_empty));
            if attached == 2 && settled {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!(
                "the agent did not enforce both pods within {} s (status file {})",
                READY_TIMEOUT.as_secs(),
                status_file.display()
            );
        }
        // The status file is rewritten atomically after each apply; polling it is the
        // agent's own convergence signal.
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Removes the pins of every link under the node's bpffs: the programs detach.
fn unpin_links(node: &Node) -> anyhow::Result<()> {
    let links = netwarden_datapath::bpffs::PinLayout::new(&node.bpffs()).links();
    for entry in fs::read_dir(&links).with_context(|| format!("reading {}", links.display()))? {
        fs::remove_file(entry?.path())?;
    }
    Ok(())
}

/// The bench's cluster with the loop's port no longer allowed.
fn loop_port_denied() -> Cluster {
    let mut cluster = traffic::isolated_server(1);
    for policy in cluster.policies.values_mut() {
        for rule in &mut Arc::make_mut(policy).ingress {
            rule.ports
                .retain(|port| port.port != Some(PortRef::Number(LOOP_PORT)));
        }
    }
    cluster
}

/// Threads that run until told to stop.
struct Workers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<anyhow::Result<()>>>,
}

impl Workers {
    fn new() -> Self {
        Self {
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
        }
    }

    /// Tells every thread to stop; [`Workers::join`] then waits for them.
    fn tell_to_stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    fn join(&mut self) {
        self.tell_to_stop();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.join();
    }
}

/// The server pod's listeners: an echo server on the allowed [`LOOP_PORT`] (a thread per
/// connection, for the idle connections and the loop at once) and one on [`DENIED_PORT`]
/// counting what it accepts.
struct Servers {
    workers: Workers,
    /// The server pod's namespace, to wake the listeners from.
    netns: PathBuf,
}

impl Servers {
    fn start(node: &Node, ledger: &Arc<Ledger>) -> anyhow::Result<Self> {
        let mut workers = Workers::new();
        let (ready, listening) = std::sync::mpsc::channel();
        for port in [LOOP_PORT, DENIED_PORT] {
            let stopping = Arc::clone(&workers.stop);
            let ledger = Arc::clone(ledger);
            let ready = ready.clone();
            workers
                .threads
                .push(on_thread_in(&node.netns_path("srv"), false, move || {
                    let listener = bind_reusable(SocketAddr::from((SERVER, port)))?;
                    let _ = ready.send(());
                    for stream in listener.incoming() {
                        if stopping.load(Ordering::Relaxed) {
                            break;
                        }
                        let Ok(stream) = stream else { continue };
                        if port == DENIED_PORT {
                            ledger
                                .row()
                                .forbidden_accepted_by_server
                                .fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        std::thread::spawn(move || echo(stream));
                    }
                    Ok(())
                })?);
        }
        for _ in 0..workers.threads.len() {
            listening
                .recv_timeout(Duration::from_secs(5))
                .context("the server pod's listeners did not start")?;
        }
        Ok(Self {
            workers,
            netns: node.netns_path("srv"),
        })
    }

    /// Stops the listeners, waking each `accept` with a connection from the node (the loop's
    /// port is reachable from there; the forbidden one too, as the node is not policed).
    fn stop(&mut self) {
        if self.workers.threads.is_empty() {
            return;
        }
        self.workers.tell_to_stop();
        for port in [LOOP_PORT, DENIED_PORT] {
            if let Ok(waker) = on_thread_in(&self.netns, false, move || {
                let _ = TcpStream::connect_timeout(
                    &SocketAddr::from((SERVER, port)),
                    Duration::from_millis(500),
                );
                Ok(())
            }) {
                let _ = waker.join();
            }
        }
        self.workers.join();
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Answers each byte with a byte until the client closes.
fn echo(mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut byte = [0_u8; 1];
    while let Ok(1) = stream.read(&mut byte) {
        if stream.write_all(&byte).is_err() {
            break;
        }
    }
}

/// Starts the client pod's connections: the idle ones (connected before it returns), the
/// allowed loop and the forbidden probes.
fn start_traffic(node: &Node, ledger: &Arc<Ledger>) -> anyhow::Result<Workers> {
    let mut workers = Workers::new();
    let stop = Arc::clone(&workers.stop);
    let client = node.netns_path("cli");
    let threads = &mut workers.threads;
    let (connected, idle_ready) = std::sync::mpsc::channel();
    for index in 0..IDLE_CONNECTIONS {
        let (stop, ledger, connected) = (Arc::clone(&stop), Arc::clone(ledger), connected.clone());
        threads.push(on_thread_in(&client, false, move || {
            idle_connection(index, &stop, &ledger, &connected);
            Ok(())
        })?);
    }
    for _ in 0..IDLE_CONNECTIONS {
        idle_ready
            .recv_timeout(ALLOWED_TIMEOUT)
            .context("an idle connection did not connect")??;
    }
    let (stopping, counted) = (Arc::clone(&stop), Arc::clone(ledger));
    threads.push(on_thread_in(&client, false, move || {
        allowed_loop(&stopping, &counted);
        Ok(())
    })?);
    let (stopping, counted) = (Arc::clone(&stop), Arc::clone(ledger));
    threads.push(on_thread_in(&client, false, move || {
        forbidden_loop(&stopping, &counted);
        Ok(())
    })?);
    Ok(workers)
}

/// One established connection exchanging a byte every [`IDLE_PERIOD`] until stopped; an
/// exchange that fails breaks it (counted, not reopened).
fn idle_connection(
    index: usize,
    stop: &AtomicBool,
    ledger: &Ledger,
    connected: &std::sync::mpsc::Sender<anyhow::Result<()>>,
) {
    let opened =
        TcpStream::connect_timeout(&SocketAddr::from((SERVER, LOOP_PORT)), ALLOWED_TIMEOUT)
            .and_then(|stream| {
                stream.set_nodelay(true)?;
                stream.set_read_timeout(Some(Duration::from_secs(30)))?;
                Ok(stream)
            });
    let mut stream = match opened {
        Ok(stream) => {
            let _ = connected.send(Ok(()));
            stream
        }
        Err(error) => {
            let _ = connected.send(Err(anyhow::anyhow!("idle connection {index}: {error}")));
            return;
        }
    };
    let mut last = Instant::now();
    let mut byte = [0_u8; 1];
    while !stop.load(Ordering::Relaxed) {
        if let Err(error) = stream
            .write_all(b"?")
            .and_then(|()| stream.read_exact(&mut byte))
        {
            ledger.row().idle_broken.fetch_add(1, Ordering::Relaxed);
            ledger.failure(format!("idle connection {index} broke: {error}"));
            return;
        }
        let gap = u64::try_from(last.elapsed().as_micros()).unwrap_or(u64::MAX);
        ledger
            .row()
            .idle_longest_gap_us
            .fetch_max(gap, Ordering::Relaxed);
        last = Instant::now();
        std::thread::sleep(IDLE_PERIOD);
    }
}

/// Connect, send a byte, read it back, close, to the allowed port, until stopped.
fn allowed_loop(stop: &AtomicBool, ledger: &Ledger) {
    let target = SocketAddr::from((SERVER, LOOP_PORT));
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let exchanged =
            TcpStream::connect_timeout(&target, ALLOWED_TIMEOUT).and_then(|mut stream| {
                let connect = started.elapsed();
                stream.set_nodelay(true)?;
                stream.set_read_timeout(Some(ALLOWED_TIMEOUT))?;
                stream.write_all(b"?")?;
                let mut byte = [0_u8; 1];
                stream.read_exact(&mut byte)?;
                Ok(connect)
            });
        let row = ledger.row();
        match exchanged {
            Ok(connect) if connect >= SYN_RETRANSMITTED => {
                row.allowed_syn_retransmitted
                    .fetch_add(1, Ordering::Relaxed);
                ledger.failure(format!(
                    "allowed connection needed {:.0} ms to connect (its SYN was dropped)",
                    connect.as_secs_f64() * 1e3
                ));
            }
            Ok(_) => {
                row.allowed_ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(error) => {
                row.allowed_failed.fetch_add(1, Ordering::Relaxed);
                ledger.failure(format!("allowed connection failed: {error}"));
            }
        }
    }
}

/// Connection attempts to the forbidden port until stopped: each must time out.
fn forbidden_loop(stop: &AtomicBool, ledger: &Ledger) {
    let target = SocketAddr::from((SERVER, DENIED_PORT));
    while !stop.load(Ordering::Relaxed) {
        let attempt = TcpStream::connect_timeout(&target, FORBIDDEN_TIMEOUT);
        let row = ledger.row();
        row.forbidden_probes.fetch_add(1, Ordering::Relaxed);
        match attempt {
            Ok(_) => {
                row.forbidden_accepted.fetch_add(1, Ordering::Relaxed);
                ledger.failure(format!(
                    "a connection to forbidden port {DENIED_PORT} was accepted"
                ));
            }
            Err(error) if error.kind() == ErrorKind::TimedOut => {}
            Err(error) => {
                // Refused or unreachable: not accepted, but not the policy's silent drop either.
                ledger.failure(format!("forbidden probe: {error}"));
            }
        }
    }
}

/// The iperf3 client, from the client pod to the server's iperf3, running until stopped.
struct Iperf {
    child: Child,
    started: Instant,
}

/// What iperf3 reported.
struct IperfRun {
    started: Instant,
    /// Bytes received per [`IPERF_INTERVAL_SECONDS`], from its start.
    intervals: Vec<(f64, u64)>,
    /// Why it ended, if not because it was stopped.
    broken: Option<String>,
}

impl Iperf {
    fn start(node: &Node) -> anyhow::Result<Self> {
        let child = traffic::in_netns(
            Command::new("iperf3").args([
                "--client",
                &SERVER.to_string(),
                "--port",
                &IPERF_PORT.to_string(),
                // Stopped with SIGINT, after which it reports what it measured.
                "--time",
                "86400",
                "--interval",
                &IPERF_INTERVAL_SECONDS.to_string(),
                "--json",
            ]),
            &node.netns_path("cli"),
        )?
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting iperf3 (apt install iperf3, or run cargo xtask setup)")?;
        Ok(Self {
            child,
            started: Instant::now(),
        })
    }

    fn stop(mut self) -> anyhow::Result<IperfRun> {
        let pid = Pid::from_raw(i32::try_from(self.child.id())?);
        // It exits early only when its connection broke; its report says why.
        let _ = nix::sys::signal::kill(pid, Signal::SIGINT);
        let mut output = String::new();
        self.child
            .stdout
            .take()
            .context("iperf3 stdout")?
            .read_to_string(&mut output)?;
        self.child.wait()?;
        let report: serde_json::Value =
            serde_json::from_str(&output).context("iperf3 printed no JSON report")?;
        let intervals = report["intervals"]
            .as_array()
            .map(|intervals| {
                intervals
                    .iter()
                    .filter_map(|interval| {
                        Some((
                            interval["sum"]["start"].as_f64()?,
                            interval["sum"]["bytes"].as_u64()?,
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default();
        // "interrupt - the client has terminated": stopped by us.
        let broken = report["error"]
            .as_str()
            .filter(|error| !error.starts_with("interrupt"))
            .map(str::to_owned);
        Ok(IperfRun {
            started: self.started,
            intervals,
            broken,
        })
    }
}

impl Drop for Iperf {
    fn drop(&mut self) {
        // Stopped already, or an error on the way: nothing is left running either way.
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl IperfRun {
    /// Bytes and the longest stretch with none received, in phase `index` of `phases`.
    fn in_phase(&self, phases: &[Phase], index: usize) -> (u64, Duration) {
        let starts: Vec<f64> = phases
            .iter()
            .map(|phase| {
                phase
                    .started
                    .saturating_duration_since(self.started)
                    .as_secs_f64()
            })
            .collect();
        let end = starts.get(index + 1).copied().unwrap_or(f64::INFINITY);
        let mut bytes = 0;
        let (mut empty, mut longest) = (0_u32, 0_u32);
        for &(start, received) in &self.intervals {
            if start < starts[index] || start >= end {
                continue;
            }
            bytes += received;
            empty = if received == 0 { empty + 1 } else { 0 };
            longest = longest.max(empty);
        }
        (
            bytes,
            Duration::from_secs_f64(f64::from(longest) * IPERF_INTERVAL_SECONDS),
        )
    }
}

/// Prints the table and checks the goals.
fn report(
    phases: &[Phase],
    ledger: &Ledger,
    iperf: &IperfRun,
    options: &Options,
) -> anyhow::Result<()> {
    println!();
    println!(
        "restart under load: iperf3 {CLIENT} -> {SERVER}:{IPERF_PORT}, {IDLE_CONNECTIONS} idle connections (a byte every {} ms) and a connect/request/close loop to :{LOOP_PORT} (allowed), connection attempts to :{DENIED_PORT} (forbidden, {} ms each); each phase lasts until its agent has taken over, then {:.1} s{}",
        IDLE_PERIOD.as_millis(),
        FORBIDDEN_TIMEOUT.as_millis(),
        options.seconds,
        options.sabotage.map_or(String::new(), |sabotage| format!(
            "; SABOTAGED: {sabotage:?}"
        ))
    );
    println!(
        "  {:<36} {:>7} {:>8} {:>9} {:>7} {:>7} {:>9} {:>8} {:>6} {:>9} {:>9} {:>9}",
        "phase",
        "down ms",
        "ready ms",
        "allowed",
        "failed",
        "SYN rtx",
        "forbidden",
        "accepted",
        "broken",
        "idle gap",
        "iperf MB",
        "stall ms"
    );
    let load = |value: &AtomicU64| value.load(Ordering::Relaxed);
    let millis = |duration: Option<Duration>| {
        duration.map_or("-".to_owned(), |duration| {
            format!("{:.0}", duration.as_secs_f64() * 1e3)
        })
    };
    let mut totals = [0_u64; 4];
    for (index, (phase, row)) in phases.iter().zip(&ledger.rows).enumerate() {
        let (bytes, stall) = iperf.in_phase(phases, index);
        let accepted = load(&row.forbidden_accepted).max(load(&row.forbidden_accepted_by_server));
        println!(
            "  {:<36} {:>7} {:>8} {:>9} {:>7} {:>7} {:>9} {:>8} {:>6} {:>9} {:>9.0} {:>9.0}",
            phase.name,
            millis(phase.down),
            millis(phase.to_ready),
            load(&row.allowed_ok),
            load(&row.allowed_failed),
            load(&row.allowed_syn_retransmitted),
            load(&row.forbidden_probes),
            accepted,
            load(&row.idle_broken),
            millis(Some(Duration::from_micros(load(&row.idle_longest_gap_us)))),
            crate::mib(bytes),
            stall.as_secs_f64() * 1e3
        );
        totals[0] += load(&row.allowed_failed);
        totals[1] += load(&row.allowed_syn_retransmitted);
        totals[2] += accepted;
        totals[3] += load(&row.idle_broken);
    }
    println!(
        "  columns: allowed = loop connections that completed; failed = ones that did not; SYN rtx = ones whose first SYN was dropped; accepted = forbidden connections accepted (client or server count, the larger); broken = idle connections broken; idle gap = longest wait between two exchanges of an idle connection; stall = longest iperf3 stretch with no byte received"
    );
    let failures = ledger.failures.lock().expect("no thread panics holding it");
    for (phase, failure) in failures.iter() {
        println!("  in {}: {failure}", phases[*phase].name);
    }
    if let Some(broken) = &iperf.broken {
        println!("  iperf3 stream broke: {broken}");
    }
    let established_broken = totals[3] + u64::from(iperf.broken.is_some());
    #[expect(clippy::cast_precision_loss, reason = "small counts")]
    let count = |value: u64| value as f64;
    println!(
        "summary: established_broken={established_broken} allowed_refused={} allowed_syn_dropped={} forbidden_accepted={}",
        totals[0], totals[1], totals[2]
    );
    crate::check(&[
        crate::Target::at_most("established_broken", count(established_broken), 0.0),
        crate::Target::at_most("allowed_refused", count(totals[0]), 0.0),
        crate::Target::at_most("allowed_syn_dropped", count(totals[1]), 0.0),
        crate::Target::at_most("forbidden_accepted", count(totals[2]), 0.0),
    ])
}
