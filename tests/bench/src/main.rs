//! `netwarden-bench`: the compile benchmark (the compiler at cluster scale and the agent's
//! memory with it), the datapath's per-packet costs, the identity check's latency, and traffic
//! across the agent's restarts and upgrades.
//!
//! Run through `cargo xtask bench compile|datapath|identity|restart` (root: the agent part loads its
//! maps into the kernel inside a network namespace of its own and a private bpffs).

mod agent;
mod cluster;
mod compile;
mod datapath;
mod heap;
mod identity;
mod kube_cache;
mod manifests;
mod program_stats;
mod restart;
mod targets;
mod tiers;
mod traffic;

use std::{
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    time::Duration,
};

use clap::{Parser, Subcommand};

use crate::cluster::Shape;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Compile times, map entries and agent memory on a generated 10,000-pod cluster; with
    /// `--pods`, on clusters of 10,000, 50,000 and that many pods, a row each.
    Compile {
        /// The agent binary to measure memory with; skipped when absent.
        #[arg(long)]
        agent: Option<PathBuf>,
        #[command(flatten)]
        scale: ScaleOptions,
    },
    /// Write the generated cluster's manifests (what the compile benchmark's agent reads) to a
    /// directory, for profiling the agent by hand.
    Manifests {
        /// The directory (created).
        dir: PathBuf,
        #[command(flatten)]
        scale: ScaleOptions,
    },
    /// The classifier's own cost per packet (`BPF_PROG_TEST_RUN`) with 10,000 CIDR rules, then
    /// traffic between two pods against no program, iptables and nftables.
    Datapath {
        /// The agent binary enforcing the traffic part; without it only the classifier is
        /// measured.
        #[arg(long)]
        agent: Option<PathBuf>,
        /// Seconds each figure is measured for.
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
        /// Rounds per pass: every configuration once, each between two baseline runs.
        #[arg(long, default_value_t = 5)]
        repeats: usize,
    },
    /// The identity check's latency (`Authorization/Check` over the Unix socket), p50/p99.
    Identity,
    /// Traffic between two pods (iperf3, idle connections, a connect loop to an allowed port,
    /// attempts on a forbidden one) while the agent is upgraded from `--old-agent`, then killed
    /// (SIGKILL) and restarted; fails when a connection broke, an allowed one was refused or a
    /// forbidden one accepted.
    Restart(restart::Options),
}

/// The size of a scale run.
#[derive(clap::Args)]
struct ScaleOptions {
    /// Pods of the largest cluster (scale mode); without it, the default 10,000-pod cluster.
    #[arg(long)]
    pods: Option<usize>,
    /// NetworkPolicies of the largest cluster [default: one per 10 pods].
    #[arg(long, requires = "pods")]
    policies: Option<usize>,
    /// Namespaces of the largest cluster [default: one per 30 pods].
    #[arg(long, requires = "pods")]
    namespaces: Option<usize>,
}

impl ScaleOptions {
    /// The largest cluster asked for, if any.
    fn largest(&self) -> anyhow::Result<Option<Shape>> {
        let Some(pods) = self.pods else {
            return Ok(None);
        };
        let shape = Shape {
            namespaces: self.namespaces.unwrap_or(pods / 30).max(1),
            pods,
            policies: self.policies.unwrap_or(pods / 10),
        };
        anyhow::ensure!(
            shape.pods >= shape.namespaces,
            "--pods: at least one pod per namespace"
        );
        Ok(Some(shape))
    }
}

const NODE_ADDRESS: IpAddr = IpAddr::V4(Ipv4Addr::new(172, 18, 0, 2));

fn main() -> anyhow::Result<()> {
    match Cli::parse().bench {
        Bench::Compile { agent, scale } => match scale.largest()? {
            None => compile::run_default(agent.as_deref()),
            Some(largest) => compile::run_scale(largest, agent.as_deref()),
        },
        Bench::Manifests { dir, scale } => {
            let shape = scale.largest()?.unwrap_or(Shape::DEFAULT);
            std::fs::create_dir_all(&dir)?;
            manifests::write(&cluster::generate_shape(shape), &dir)?;
            println!("{shape:?} written to {}", dir.display());
            Ok(())
        }
        Bench::Datapath {
            agent,
            seconds,
            repeats,
        } => datapath(agent.as_deref(), traffic::Plan { seconds, repeats }),
        Bench::Identity => identity::run(cluster::generate(), cluster::NODE, NODE_ADDRESS),
        Bench::Restart(options) => restart::run(&options),
    }
}

/// The targets of issue #12: ratios are to no program (for the Service ones, to kube-proxy
/// alone), from the unpinned pass.
const TARGET_THROUGHPUT: f64 = 0.97;
const TARGET_CONNECTIONS: f64 = 0.95;
const TARGET_CT_HIT_NS: f64 = 60.0;
const TARGET_NEW_FLOW_NS: f64 = 300.0;
/// The Service row's connection rate, which the issue asks to report, not to meet
/// [`TARGET_CONNECTIONS`]: a connection through a Service is judged after kube-proxy's NAT by a
/// third program, on its first packet twice (the client's egress and the backend's ingress,
/// three inserts). Six full runs since the hook's judged connections were shared by all CPUs
/// measured 0.85x-0.90x of kube-proxy alone, and with that hook judging nothing the row still
/// measured 0.91x-0.92x (docs/design.md, "Where a connection's cost goes"). The bound is the
/// lowest of those medians: what the design reaches, with no margin under it.
const TARGET_SERVICE_CONNECTIONS: f64 = 0.85;

/// The classifier's cost, then traffic, then the one summary line; an error (a non-zero exit)
/// when a target is missed.
fn datapath(agent: Option<&std::path::Path>, plan: traffic::Plan) -> anyhow::Result<()> {
    let costs = datapath::run()?;
    let (ct_hit, new_flow) = (costs.tracked.own, costs.decided.own);
    let ns = |duration: Duration| duration.as_secs_f64() * 1e9;
    let mut targets = vec![
        Target::at_most("ct_hit_ns", ns(ct_hit), TARGET_CT_HIT_NS),
        Target::at_most("new_flow_ns", ns(new_flow), TARGET_NEW_FLOW_NS),
    ];
    let Some(agent) = agent else {
        println!(
            "summary: ct_hit_ns={:.1} new_flow_ns={:.1}",
            ns(ct_hit),
            ns(new_flow)
        );
        return check(&targets);
    };
    let (unpinned, pinned) = traffic::run(agent, plan)?;
    println!();
    println!(
        "summary figures: throughput and connection rate from the unpinned pass, request/response p99 from the pinned pass"
    );
    println!(
        "summary: tput_10k={:.2}x conn_10k={:.2}x rr_p99_10k={:.2}x iptables_tput_10k={:.2}x nft_tput_10k={:.2}x service_throughput={:.2}x service_connrate={:.2}x ct_hit_ns={:.1} new_flow_ns={:.1}",
        unpinned.netwarden.throughput,
        unpinned.netwarden.connections,
        pinned.netwarden.rr_p99,
        unpinned.iptables.throughput,
        unpinned.nftables.throughput,
        unpinned.service.throughput,
        unpinned.service.connections,
        ns(ct_hit),
        ns(new_flow)
    );
    targets.extend([
        Target::at_least("tput_10k", unpinned.netwarden.throughput, TARGET_THROUGHPUT),
        Target::at_least(
            "conn_10k",
            unpinned.netwarden.connections,
            TARGET_CONNECTIONS,
        ),
        Target::at_least(
            "service_throughput",
            unpinned.service.throughput,
            TARGET_THROUGHPUT,
        ),
        Target::at_least(
            "service_connrate",
            unpinned.service.connections,
            TARGET_SERVICE_CONNECTIONS,
        ),
    ]);
    check(&targets)
}

/// One figure of the summary against its target.
struct Target {
    name: &'static str,
    value: f64,
    bound: f64,
    at_least: bool,
}

impl Target {
    fn at_least(name: &'static str, value: f64, bound: f64) -> Self {
        Self {
            name,
            value,
            bound,
            at_least: true,
        }
    }

    fn at_most(name: &'static str, value: f64, bound: f64) -> Self {
        Self {
            name,
            value,
            bound,
            at_least: false,
        }
    }

    fn met(&self) -> bool {
        if self.at_least {
            self.value >= self.bound
        } else {
            self.value <= self.bound
        }
    }
}

/// Prints every target and whether it was met; an error naming the missed ones.
fn check(targets: &[Target]) -> anyhow::Result<()> {
    let line: Vec<String> = targets
        .iter()
        .map(|target| {
            format!(
                "{}{}{}:{}",
                target.name,
                if target.at_least { ">=" } else { "<=" },
                target.bound,
                if target.met() { "ok" } else { "MISSED" }
            )
        })
        .collect();
    println!("targets: {}", line.join(" "));
    let missed: Vec<&str> = targets
        .iter()
        .filter(|target| !target.met())
        .map(|target| target.name)
        .collect();
    if missed.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("targets missed: {}", missed.join(", "))
    }
}

/// Creates `dir` and mounts a bpf filesystem of its own there, so nothing the benchmark pins
/// touches the host's `/sys/fs/bpf`; unmounting it releases everything pinned.
pub fn mount_private_bpffs(dir: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context as _;
    std::fs::create_dir_all(dir)?;
    nix::mount::mount(
        Some("bpf"),
        dir,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .context("mounting a private bpffs")
}

#[must_use]
pub fn ms(duration: Duration) -> String {
    format!("{:.3}", duration.as_secs_f64() * 1000.0)
}

#[must_use]
#[expect(clippy::cast_precision_loss, reason = "memory sizes for display")]
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}
