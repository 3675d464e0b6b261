//! The agent's memory with the generated cluster: started on the manifests in a network
//! namespace and a bpffs of its own, then one pod is relabelled in its manifest, and the agent
//! is measured once it has applied that change too, then stopped. The peak counts both
//! applies: every change to a cluster is applied the same way, so the first apply alone would
//! understate what the agent needs resident.

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead as _, BufReader},
    os::{fd::AsFd as _, unix::process::CommandExt as _},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use netwarden_model::{Cluster, Pod};
use nix::{mount::MntFlags, sched::CloneFlags};

use crate::cluster::NODE;

/// What the agent used.
pub struct Memory {
    /// From start to the first "applied" log line.
    pub first_apply: Duration,
    /// From the relabelled pod's manifest written to its change applied.
    pub change_apply: Duration,
    /// Resident set after the change's apply.
    pub rss_bytes: u64,
    /// Peak resident set (`VmHWM`) over the start, the first apply and the change's.
    pub peak_rss_bytes: u64,
    /// Kernel memory of its eBPF maps, as `memlock` in their fdinfo, each map once.
    pub map_bytes: u64,
    /// Each map the agent holds, largest first.
    pub maps: Vec<MapMemory>,
}

/// One eBPF map the agent holds, from its fdinfo.
pub struct MapMemory {
    /// Its name as the kernel keeps it (at most 15 bytes).
    pub name: String,
    /// `max_entries`.
    pub max_entries: u64,
    /// `map_flags` (`BPF_F_NO_PREALLOC` is 1).
    pub flags: u64,
    /// `memlock`: what the kernel charges for it (since Linux 6.4 the memory it uses, not an
    /// estimate from `max_entries`).
    pub bytes: u64,
}

/// Applies the agent may make, retries included, before the change must have been applied.
const APPLIES_BEFORE_THE_CHANGE: usize = 100;

/// Runs the agent on `cluster`, changes `relabelled` (a pod of `cluster` with new labels) in
/// its manifest, and measures the agent.
pub fn measure(agent: &Path, cluster: &Cluster, relabelled: &Pod) -> anyhow::Result<Memory> {
    let work = std::env::temp_dir().join(format!("netwarden-bench-{}", std::process::id()));
    let netns = format!("nwbench-{}", std::process::id());
    let result = run(agent, cluster, relabelled, &work, &netns);
    let _ = nix::mount::umount2(&work.join("bpffs"), MntFlags::MNT_DETACH);
    let _ = Command::new("ip").args(["netns", "del", &netns]).status();
    let _ = fs::remove_dir_all(&work);
    result
}

fn run(
    agent: &Path,
    cluster: &Cluster,
    relabelled: &Pod,
    work: &Path,
    netns: &str,
) -> anyhow::Result<Memory> {
    let manifests = work.join("manifests");
    let bpffs = work.join("bpffs");
    fs::create_dir_all(&manifests)?;
    crate::manifests::write(cluster, &manifests).context("writing manifests")?;
    crate::mount_private_bpffs(&bpffs)?;
    if !Command::new("ip")
        .args(["netns", "add", netns])
        .status()?
        .success()
    {
        bail!("cannot create network namespace {netns}");
    }
    let namespace = fs::File::open(format!("/run/netns/{netns}"))?;

    let mut command = Command::new(agent);
    command
        .args(["agent", "--node", NODE])
        .arg("--manifests")
        .arg(&manifests)
        .arg("--bpffs")
        .arg(&bpffs)
        .arg("--status-file")
        .arg(work.join("status.json"))
        .args(capacity_args(cluster))
        // Plain log lines, to read `changed=true` in.
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let fd = namespace.as_fd().try_clone_to_owned()?;
    // SAFETY: `setns` is async-signal-safe and touches only the child about to exec.
    unsafe {
        command.pre_exec(move || {
            nix::sched::setns(&fd, CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
        });
    }
    let started = Instant::now();
    let mut child = command.spawn().context("starting the agent")?;
    let stderr = child.stderr.take().context("agent stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    let mut apply_lines = lines
        .by_ref()
        .filter_map(Result::ok)
        .filter(|line| line.contains(" applied"));
    let applied = apply_lines.next().is_some();
    let first_apply = started.elapsed();
    let changed = Instant::now();
    let change_applied = applied
        && crate::manifests::write_namespace(
            &changed_cluster(cluster, relabelled),
            &relabelled.id.namespace,
            &manifests,
        )
        .is_ok()
        && apply_lines
            .take(APPLIES_BEFORE_THE_CHANGE)
            .any(|line| line.contains("changed=true"));
    let change_apply = changed.elapsed();
    let pid = child.id();
    let measured = if change_applied {
        read_memory(pid)
    } else if applied {
        Err(anyhow::anyhow!(
            "the agent did not apply the relabelled pod"
        ))
    } else {
        Err(anyhow::anyhow!("the agent exited before applying"))
    };
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid)?),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = child.wait();
    let (rss_bytes, peak_rss_bytes, maps) = measured?;
    Ok(Memory {
        first_apply,
        change_apply,
        rss_bytes,
        peak_rss_bytes,
        map_bytes: maps.iter().map(|map| map.bytes).sum(),
        maps,
    })
}

/// `cluster` with `relabelled` in place of its pod.
fn changed_cluster(cluster: &Cluster, relabelled: &Pod) -> Cluster {
    let mut changed = cluster.clone();
    changed
        .pods
        .insert(relabelled.id.clone(), relabelled.clone());
    changed
}

/// What an operator adds to the agent's command line for `cluster`: a larger IP cache once the
/// cluster's addresses (pods' and nodes') would fill three quarters of the default one, a power
/// of two with a quarter to spare. The map allocates per entry, so its size costs only its
/// bucket array (16 bytes an entry).
fn capacity_args(cluster: &Cluster) -> Vec<String> {
    let addresses = cluster
        .pods
        .values()
        .map(|pod| pod.ips.len())
        .sum::<usize>()
        + cluster
            .nodes
            .values()
            .map(|node| node.addresses.len())
            .sum::<usize>();
    let default = netwarden_datapath::Capacity::default().ipcache as usize;
    if addresses * 4 <= default * 3 {
        return Vec::new();
    }
    let entries = (addresses + addresses / 4).next_power_of_two();
    vec!["--ipcache-entries".to_owned(), entries.to_string()]
}

/// `VmRSS`, `VmHWM` and the maps of process `pid`. A map the process holds through several
/// descriptors (the conntrack sweeper opens its tables from their pins) is counted once.
fn read_memory(pid: u32) -> anyhow::Result<(u64, u64, Vec<MapMemory>)> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    // The first number after `name` on its line.
    let number = |text: &str, name: &str| -> u64 {
        text.lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|value| value.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let mut maps = BTreeMap::new();
    for entry in fs::read_dir(format!("/proc/{pid}/fd"))? {
        let entry = entry?;
        let is_map = fs::read_link(entry.path())
            .is_ok_and(|target| target.to_string_lossy() == "anon_inode:bpf-map");
        if !is_map {
            continue;
        }
        let info = fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            entry.file_name().to_string_lossy()
        ))?;
        let field = |name| number(&info, name);
        let id = u32::try_from(field("map_id:"))?;
        let name = aya::maps::MapInfo::from_id(id)
            .ok()
            .and_then(|map| map.name_as_str().map(str::to_owned))
            .unwrap_or_else(|| format!("map {id}"));
        maps.entry(id).or_insert(MapMemory {
            name,
            max_entries: field("max_entries:"),
            flags: u64::from_str_radix(
                info.lines()
                    .find_map(|line| line.strip_prefix("map_flags:"))
                    .map_or("0", |value| value.trim().trim_start_matches("0x")),
                16,
            )?,
            bytes: field("memlock:"),
        });
    }
    let mut maps: Vec<MapMemory> = maps.into_values().collect();
    maps.sort_by(|a, b| b.bytes.cmp(&a.bytes).then_with(|| a.name.cmp(&b.name)));
    Ok((
        number(&status, "VmRSS:") * 1024,
        number(&status, "VmHWM:") * 1024,
        maps,
    ))
}
