//! The agent's memory with the generated cluster: started on the manifests in a network
//! namespace and a bpffs of its own, measured once it has applied them, then stopped.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    os::{fd::AsFd as _, unix::process::CommandExt as _},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use netwarden_model::Cluster;
use nix::{mount::MntFlags, sched::CloneFlags};

use crate::cluster::NODE;

/// What the agent used.
pub struct Memory {
    /// From start to the first "applied" log line.
    pub first_apply: Duration,
    /// Resident set after the first apply.
    pub rss_bytes: u64,
    /// Peak resident set (`VmHWM`).
    pub peak_rss_bytes: u64,
    /// Kernel memory of its eBPF maps, as `memlock` in their fdinfo.
    pub map_bytes: u64,
}

/// Runs the agent on `cluster` and measures it.
pub fn measure(agent: &Path, cluster: &Cluster) -> anyhow::Result<Memory> {
    let work = std::env::temp_dir().join(format!("netwarden-bench-{}", std::process::id()));
    let netns = format!("nwbench-{}", std::process::id());
    let result = run(agent, cluster, &work, &netns);
    let _ = nix::mount::umount2(&work.join("bpffs"), MntFlags::MNT_DETACH);
    let _ = Command::new("ip").args(["netns", "del", &netns]).status();
    let _ = fs::remove_dir_all(&work);
    result
}

fn run(agent: &Path, cluster: &Cluster, work: &Path, netns: &str) -> anyhow::Result<Memory> {
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
    let mut applied = false;
    for line in BufReader::new(stderr).lines() {
        if line?.contains(" applied") {
            applied = true;
            break;
        }
    }
    let first_apply = started.elapsed();
    let pid = child.id();
    let measured = if applied {
        read_memory(pid)
    } else {
        Err(anyhow::anyhow!("the agent exited before applying"))
    };
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid)?),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = child.wait();
    let (rss_bytes, peak_rss_bytes, map_bytes) = measured?;
    Ok(Memory {
        first_apply,
        rss_bytes,
        peak_rss_bytes,
        map_bytes,
    })
}

fn read_memory(pid: u32) -> anyhow::Result<(u64, u64, u64)> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024)
    };
    let mut map_bytes = 0;
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
        map_bytes += info
            .lines()
            .find_map(|line| line.strip_prefix("memlock:"))
            .and_then(|value| value.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok((field("VmRSS:"), field("VmHWM:"), map_bytes))
}
