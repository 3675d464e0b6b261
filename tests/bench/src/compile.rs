//! `netwarden-bench compile`: the compiler at cluster scale, and the agent's memory with it.
//!
//! One size ([`measure`]) is timed in-process — full compiles, then three incremental changes —
//! weighed in-process (the model, the compiler's state, the Kubernetes source's pod cache, from
//! the allocator's statistics) and measured on the agent, which is started on the same cluster's
//! manifests. Scale mode measures several sizes of one shape in a row, to show how cost grows.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use netwarden_model::{Cluster, PodRef, PolicyRef, PortRef};
use netwarden_policy::{Change, Compiler, DatapathState};

use crate::{
    NODE_ADDRESS, agent,
    cluster::{self, Shape},
    heap, kube_cache, mib, ms,
    targets::{self, Figures},
};

/// What one size measured.
pub struct Row {
    /// The cluster.
    pub shape: Shape,
    /// Full compile, median and p99.
    pub full: (Duration, Duration),
    /// One remote pod relabelled into a new label set, median and p99.
    pub relabel: (Duration, Duration),
    /// One policy selecting a local pod changed, median and p99.
    pub policy: (Duration, Duration),
    /// One remote pod of a known label set added and removed, median and p99.
    pub peer: (Duration, Duration),
    /// Mean and maximum map entries per endpoint.
    pub entries: (f64, usize),
    /// The benchmark's heap: the cluster model, the compiler with its state, the Kubernetes
    /// source's pod cache.
    pub heap: Heap,
    /// The agent's memory, when an agent was given.
    pub memory: Option<agent::Memory>,
}

/// Heap the benchmark process keeps for one cluster.
pub struct Heap {
    /// The cluster model the sources build and the compiler keeps.
    pub model_bytes: u64,
    /// A compiler after a full compile: its copy of the cluster, indexes and state.
    pub compiler_bytes: u64,
    /// The Kubernetes source's pod cache.
    pub kube_pods: kube_cache::CacheMemory,
}

impl Row {
    /// The figures held to targets.
    pub fn figures(&self) -> Figures {
        Figures {
            full: self.full.0,
            relabel: self.relabel.0,
            peak_rss_bytes: self.memory.as_ref().map(|memory| memory.peak_rss_bytes),
            map_bytes: self.memory.as_ref().map(|memory| memory.map_bytes),
        }
    }

    /// The summary line's figures, `name=value` separated by spaces.
    pub fn summary(&self) -> String {
        let memory = |figure: fn(&agent::Memory) -> u64| {
            self.memory.as_ref().map_or_else(
                || "n/a".to_owned(),
                |memory| format!("{:.1}", mib(figure(memory))),
            )
        };
        format!(
            "full_ms={} incr_relabel_ms={} incr_policy_ms={} incr_peer_ms={} entries_per_endpoint={:.0} map_mib={} rss_mib={}",
            ms(self.full.0),
            ms(self.relabel.0),
            ms(self.policy.0),
            ms(self.peer.0),
            self.entries.0,
            memory(|memory| memory.map_bytes),
            memory(|memory| memory.peak_rss_bytes),
        )
    }
}

/// Generates the cluster of `shape`, times the compiler on it (full compiles `runs` times),
/// weighs it, and measures `agent` on it when given. Prints the details as it goes.
pub fn measure(shape: Shape, agent: Option<&Path>, runs: usize) -> anyhow::Result<Row> {
    let cluster = cluster::generate_shape(shape);
    let local = cluster
        .pods
        .values()
        .filter(|pod| pod.node_name.as_deref() == Some(cluster::NODE))
        .count();
    println!(
        "cluster: {} namespaces, {} pods ({local} on {}), {} policies, {} ClusterNetworkPolicies, {} nodes",
        cluster.namespaces.len(),
        cluster.pods.len(),
        cluster::NODE,
        cluster.policies.len(),
        cluster.cluster_policies.len(),
        cluster.nodes.len(),
    );

    // Copies are made and compilers dropped outside the timed part.
    let mut copies: Vec<Cluster> = (0..runs).map(|_| cluster.clone()).collect();
    let mut compilers = Vec::new();
    let full = time(runs, || {
        let mut compiler = Compiler::new(cluster::NODE);
        compiler.set_node_addresses(&[NODE_ADDRESS]);
        compiler.sync(copies.pop().expect("one copy per run"));
        compilers.push(compiler);
    });
    drop(compilers);
    let (compiler_bytes, mut compiler) = heap::kept_by(|| {
        let mut compiler = Compiler::new(cluster::NODE);
        compiler.set_node_addresses(&[NODE_ADDRESS]);
        compiler.sync(cluster.clone());
        compiler
    });
    let baseline = compiler.state().clone();

    let relabel = incremental_relabel(&mut compiler, &cluster, &shape.sample_pod());
    let policy = incremental_policy(&mut compiler, &cluster);
    let (peer, peer_touches_only_ipcache) = incremental_peer(&mut compiler, shape);
    drop(compiler);

    let (model_bytes, copy) = heap::kept_by(|| cluster.clone());
    drop(copy);
    let kube_pods = kube_cache::measure(&cluster)?;

    let mut row = Row {
        shape,
        full,
        relabel,
        policy,
        peer,
        entries: entries_per_endpoint(&baseline),
        heap: Heap {
            model_bytes,
            compiler_bytes,
            kube_pods,
        },
        memory: None,
    };
    print_compiler(&row, &baseline, peer_touches_only_ipcache);

    let mut relabelled = cluster.pods[&shape.sample_pod()].clone();
    std::sync::Arc::make_mut(&mut relabelled.labels).insert("canary".into(), "true".into());
    let memory = match agent {
        Some(agent) if agent.exists() => Some(agent::measure(agent, &cluster, &relabelled)?),
        Some(agent) => anyhow::bail!("no agent binary at {}", agent.display()),
        None => {
            println!("agent memory: not measured (no --agent binary)");
            None
        }
    };
    if let Some(memory) = &memory {
        print_agent(memory);
    }
    row.memory = memory;
    Ok(row)
}

/// The compiler's timings, the state it compiled and the heap of `row`.
fn print_compiler(row: &Row, baseline: &DatapathState, peer_touches_only_ipcache: bool) {
    let Row {
        shape,
        full,
        relabel,
        policy,
        peer,
        entries,
        heap,
        memory: _,
    } = row;
    let label = format!(
        "full, {} pods / {} policies",
        thousands(shape.pods),
        thousands(shape.policies)
    );
    println!();
    println!(
        "{:<44} {:>10} {:>10}",
        "compile (median of runs)", "median", "p99"
    );
    for (name, (median, p99)) in [
        (label.as_str(), full),
        ("incremental: one pod relabelled (new set)", relabel),
        ("incremental: one policy changed", policy),
        ("incremental: one peer pod added (known set)", peer),
    ] {
        println!("{name:<44} {:>10} {:>10}", ms(*median), ms(*p99));
    }
    println!();
    println!(
        "state: {} identities, {} IP cache entries, {} distinct compiled policies for {} endpoints",
        baseline.identities.len(),
        baseline.ipcache.len(),
        baseline.policies.len(),
        baseline.endpoints.len()
    );
    println!(
        "map entries per endpoint (policy + CIDR, both directions): mean {:.0}, max {}",
        entries.0, entries.1
    );
    println!(
        "adding a peer pod with a known label set changes only the IP cache: {}",
        if peer_touches_only_ipcache {
            "yes"
        } else {
            "NO"
        }
    );
    let pods = shape.pods as u64;
    println!(
        "heap: cluster model {:.1} MiB ({} B/pod), compiler with its state {:.1} MiB, kube source's pod cache {:.1} MiB ({} B/pod; {} B/pod as whole API objects)",
        mib(heap.model_bytes),
        heap.model_bytes / pods.max(1),
        mib(heap.compiler_bytes),
        mib(heap.kube_pods.cached_bytes),
        heap.kube_pods.cached_bytes_per_pod(),
        heap.kube_pods.whole_bytes_per_pod,
    );
}

fn print_agent(memory: &agent::Memory) {
    println!(
        "agent with the manifest source: apply {:.0} ms after start, a relabelled pod's manifest applied {:.0} ms after it was written, RSS {:.1} MiB (peak {:.1} MiB), eBPF maps {:.1} MiB (memlock)",
        memory.first_apply.as_secs_f64() * 1000.0,
        memory.change_apply.as_secs_f64() * 1000.0,
        mib(memory.rss_bytes),
        mib(memory.peak_rss_bytes),
        mib(memory.map_bytes)
    );
    println!();
    println!(
        "{:<20} {:>12} {:>8} {:>10}",
        "eBPF map", "max_entries", "flags", "MiB"
    );
    for map in &memory.maps {
        println!(
            "{:<20} {:>12} {:>#8x} {:>10.2}",
            map.name,
            map.max_entries,
            map.flags,
            mib(map.bytes)
        );
    }
}

/// `10,000`.
fn thousands(number: usize) -> String {
    let digits = number.to_string();
    let mut out = String::new();
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// The default run: today's cluster, the summary line and issue #17's targets.
pub fn run_default(agent: Option<&Path>) -> anyhow::Result<()> {
    let row = measure(Shape::DEFAULT, agent, 7)?;
    println!("summary: {}", row.summary());
    let misses = targets::missed(&row.figures(), &targets::TARGETS);
    report(&[(row.shape.pods, misses)])
}

/// Scale mode: sizes of `largest`'s shape — 10,000 and 50,000 pods when smaller, then
/// `largest` — one after the other, a row each, each held to its size's targets.
pub fn run_scale(largest: Shape, agent: Option<&Path>) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for pods in [10_000, 50_000]
        .into_iter()
        .filter(|&pods| pods < largest.pods)
        .chain([largest.pods])
    {
        let shape = largest.scaled_to(pods);
        println!();
        println!("== {} pods ==", thousands(pods));
        // Every full compile keeps a copy of the cluster and a compiler until the timing ends:
        // fewer runs for the large ones.
        let runs = if pods <= Shape::DEFAULT.pods { 7 } else { 3 };
        rows.push(measure(shape, agent, runs)?);
    }
    println!();
    println!(
        "{:>8} {:>6} {:>7} {:>9} {:>9} {:>9} {:>8} {:>8} {:>9} {:>10} {:>9} {:>8}",
        "pods",
        "ns",
        "pols",
        "full_ms",
        "relabel",
        "policy",
        "peer",
        "map_mib",
        "rss_mib",
        "model_B/pod",
        "kube_B/pod",
        "compiler"
    );
    for row in &rows {
        let memory = |figure: fn(&agent::Memory) -> u64| {
            row.memory.as_ref().map_or_else(
                || "n/a".to_owned(),
                |memory| format!("{:.1}", mib(figure(memory))),
            )
        };
        println!(
            "{:>8} {:>6} {:>7} {:>9} {:>9} {:>9} {:>8} {:>8} {:>9} {:>10} {:>9} {:>7.1}M",
            row.shape.pods,
            row.shape.namespaces,
            row.shape.policies,
            ms(row.full.0),
            ms(row.relabel.0),
            ms(row.policy.0),
            ms(row.peer.0),
            memory(|memory| memory.map_bytes),
            memory(|memory| memory.peak_rss_bytes),
            row.heap.model_bytes / row.shape.pods.max(1) as u64,
            row.heap.kube_pods.cached_bytes_per_pod(),
            mib(row.heap.compiler_bytes),
        );
    }
    let mut results = Vec::new();
    for row in &rows {
        println!(
            "summary: pods={} namespaces={} policies={} {}",
            row.shape.pods,
            row.shape.namespaces,
            row.shape.policies,
            row.summary()
        );
        let targets = targets::at_size(row.shape.pods);
        results.push((row.shape.pods, targets::missed(&row.figures(), &targets)));
    }
    report(&results)
}

/// Prints each miss under its size; an error when there was any.
fn report(results: &[(usize, Vec<targets::Miss>)]) -> anyhow::Result<()> {
    let mut missed = 0;
    for (pods, misses) in results {
        for miss in misses {
            println!("target missed at {pods} pods: {miss}");
        }
        missed += misses.len();
    }
    if missed > 0 {
        anyhow::bail!("{missed} of the compile benchmark's targets missed");
    }
    println!("targets: all met");
    Ok(())
}

/// Runs `work` `runs` times; returns the median and the 99th percentile.
pub fn time(runs: usize, mut work: impl FnMut()) -> (Duration, Duration) {
    let mut samples: Vec<Duration> = (0..runs)
        .map(|_| {
            let started = Instant::now();
            work();
            started.elapsed()
        })
        .collect();
    samples.sort();
    let p99 = samples[(samples.len() * 99 / 100).min(samples.len() - 1)];
    (samples[samples.len() / 2], p99)
}

/// A remote pod gets a label no pod has (a new identity), then loses it again.
fn incremental_relabel(
    compiler: &mut Compiler,
    cluster: &Cluster,
    id: &PodRef,
) -> (Duration, Duration) {
    let original = cluster.pods[id].clone();
    assert_ne!(
        original.node_name.as_deref(),
        Some(cluster::NODE),
        "a remote pod"
    );
    let mut relabelled = original.clone();
    std::sync::Arc::make_mut(&mut relabelled.labels).insert("canary".into(), "true".into());
    let mut flip = false;
    time(400, || {
        flip = !flip;
        let pod = if flip {
            relabelled.clone()
        } else {
            original.clone()
        };
        compiler.update([Change::Pod(id.clone(), Some(pod))]);
    })
}

/// A policy selecting a local pod changes its port, then changes back.
fn incremental_policy(compiler: &mut Compiler, cluster: &Cluster) -> (Duration, Duration) {
    let id = PolicyRef {
        namespace: cluster::namespace_name(0),
        name: "frontend-public".into(),
    };
    let original = cluster.policies[&id].clone();
    let mut changed = original.clone();
    std::sync::Arc::make_mut(&mut changed).ingress[0].ports[0].port = Some(PortRef::Number(8443));
    let mut flip = false;
    time(400, || {
        flip = !flip;
        let policy = if flip {
            changed.clone()
        } else {
            original.clone()
        };
        compiler.update([Change::Policy(id.clone(), Some(policy))]);
    })
}

/// A remote pod with a label set that already exists is added, then removed. Returns the
/// timings and whether the add changed nothing but the IP cache.
fn incremental_peer(compiler: &mut Compiler, shape: Shape) -> ((Duration, Duration), bool) {
    let ns = shape.namespaces / 2 + 1;
    // The first index past the cluster's pods: an address no pod has.
    let mut pod = cluster::pod(ns, shape.apps_in(ns) / 2, 0, shape.pods, shape.nodes());
    pod.id.name = format!("{}-extra", pod.id.name);
    pod.node_name = Some("node-1".into());
    debug_assert_eq!(pod.ips.len(), 1, "one address: one IP cache entry");
    let id = pod.id.clone();
    let baseline = compiler.state().clone();
    let after = compiler
        .update([Change::Pod(id.clone(), Some(pod.clone()))])
        .clone();
    let only_ipcache = after.policies == baseline.policies
        && after.endpoints == baseline.endpoints
        && after.identities == baseline.identities
        && after.ipcache.len() == baseline.ipcache.len() + 1;
    compiler.update([Change::Pod(id.clone(), None)]);
    let mut present = false;
    let timings = time(400, || {
        present = !present;
        compiler.update([Change::Pod(id.clone(), present.then(|| pod.clone()))]);
    });
    (timings, only_ipcache)
}

/// Mean and maximum number of map entries (policy and CIDR, both directions) per endpoint.
fn entries_per_endpoint(state: &DatapathState) -> (f64, usize) {
    let counts: Vec<usize> = state
        .endpoints
        .values()
        .map(|endpoint| {
            [endpoint.ingress, endpoint.egress]
                .into_iter()
                .flatten()
                .filter_map(|id| state.policies.get(&id))
                .map(|policy| policy.entries.len() + policy.cidrs.len())
                .sum()
        })
        .collect();
    let total: usize = counts.iter().sum();
    #[expect(clippy::cast_precision_loss, reason = "a few hundred endpoints")]
    let mean = total as f64 / counts.len().max(1) as f64;
    (mean, counts.into_iter().max().unwrap_or(0))
}
