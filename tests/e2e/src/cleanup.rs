//! Everything a run creates outside its own memory (agents, namespaces, mounts, directories) is
//! registered here, so that it is removed exactly once: by its guard on the normal path and on
//! panics, or by [`cleanup_all`] when SIGINT/SIGTERM ends the run, or by [`remove_stale`] in a
//! later run when this one was killed outright.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use nix::{
    mount::{MntFlags, umount2},
    sys::signal::{Signal, kill},
    unistd::Pid,
};

/// Prefix of every network namespace the harness creates: `nwe2e-<pid>-<scenario>-<role>`.
pub const NETNS_PREFIX: &str = "nwe2e-";
/// Parent of the per-scenario directories: `<pid>-<scenario>`.
pub const RUN_ROOT: &str = "/run/netwarden-e2e";

#[derive(Clone, Debug)]
pub enum Resource {
    Agent(Pid),
    Netns(String),
    Mount(PathBuf),
    Dir(PathBuf),
}

impl Resource {
    /// Agents go first (they hold pins and interfaces), directories last (mounts live in them).
    fn rank(&self) -> u8 {
        match self {
            Self::Agent(_) => 0,
            Self::Netns(_) => 1,
            Self::Mount(_) => 2,
            Self::Dir(_) => 3,
        }
    }
}

static REGISTRY: Mutex<BTreeMap<u64, Resource>> = Mutex::new(BTreeMap::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// A registered resource; dropping it removes the resource unless [`Registration::disarm`] was
/// called (or a signal handler removed it already).
#[derive(Debug)]
pub struct Registration(Option<u64>);

/// Registers `resource` for removal.
pub fn register(resource: Resource) -> Registration {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    registry().insert(id, resource);
    Registration(Some(id))
}

fn registry() -> std::sync::MutexGuard<'static, BTreeMap<u64, Resource>> {
    // A panic while holding the lock cannot leave the map inconsistent: keep cleaning up.
    REGISTRY
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Registration {
    /// The resource was released by its owner in an orderly way: forget it.
    pub fn disarm(mut self) {
        if let Some(id) = self.0.take() {
            registry().remove(&id);
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let resource = self.0.take().and_then(|id| registry().remove(&id));
        if let Some(resource) = resource {
            remove(&resource);
        }
    }
}

/// Removes every registered resource; for the signal handler.
pub fn cleanup_all() {
    let mut resources: Vec<Resource> = std::mem::take(&mut *registry()).into_values().collect();
    resources.sort_by_key(Resource::rank);
    let agents: Vec<Pid> = resources
        .iter()
        .filter_map(|resource| {
            if let Resource::Agent(pid) = resource {
                Some(*pid)
            } else {
                None
            }
        })
        .collect();
    for pid in &agents {
        let _ = kill(*pid, Signal::SIGTERM);
    }
    wait_gone(&agents, Duration::from_secs(3));
    for resource in &resources {
        remove(resource);
    }
}

fn remove(resource: &Resource) {
    match resource {
        Resource::Agent(pid) => {
            // Only reached when the agent's owner did not stop it: no time for a graceful exit.
            let _ = kill(*pid, Signal::SIGKILL);
        }
        Resource::Netns(name) => {
            let _ = Command::new("ip")
                .args(["netns", "del", name])
                .stderr(std::process::Stdio::null())
                .status();
        }
        Resource::Mount(path) => {
            let _ = umount2(path, MntFlags::MNT_DETACH);
        }
        Resource::Dir(path) => {
            let _ = fs::remove_dir_all(path);
        }
    }
}

fn is_running(pid: Pid) -> bool {
    // A zombie has exited already; its parent reaps it later.
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
    })
}

fn wait_gone(pids: &[Pid], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while pids.iter().any(|pid| is_running(*pid)) {
        if Instant::now() >= deadline {
            for pid in pids {
                let _ = kill(*pid, Signal::SIGKILL);
            }
            return;
        }
        // Signal-handler context: there is no event to wait for other than the processes' exit.
        thread::sleep(Duration::from_millis(20));
    }
}

fn owner_is_alive(pid: u32) -> bool {
    pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes what runs that died without cleaning up left behind: their namespaces, agents,
/// bpffs mounts and directories. Returns what was removed, for the log.
#[must_use]
pub fn remove_stale() -> Vec<String> {
    let mut removed = Vec::new();
    if let Ok(entries) = fs::read_dir("/run/netns") {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_prefix(NETNS_PREFIX)
                .and_then(|rest| rest.split('-').next()?.parse::<u32>().ok())
            else {
                continue;
            };
            if !owner_is_alive(pid) {
                remove(&Resource::Netns(name.clone()));
                removed.push(format!("network namespace {name}"));
            }
        }
    }
    let Ok(entries) = fs::read_dir(RUN_ROOT) else {
        return removed;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .split('-')
            .next()
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if owner_is_alive(pid) {
            continue;
        }
        let dir = entry.path();
        let agents = agents_using(&dir);
        for pid in &agents {
            let _ = kill(*pid, Signal::SIGTERM);
            removed.push(format!("agent pid {pid}"));
        }
        wait_gone(&agents, Duration::from_secs(3));
        remove(&Resource::Mount(dir.join("bpffs")));
        remove(&Resource::Dir(dir.clone()));
        removed.push(format!("directory {}", dir.display()));
    }
    removed
}

/// Processes whose command line names `dir`: only agents started by the harness do.
fn agents_using(dir: &Path) -> Vec<Pid> {
    let needle = format!("{}/", dir.display());
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
                cmdline
                    .split(|byte| *byte == 0)
                    .any(|arg| arg.starts_with(needle.as_bytes()))
            })
        })
        .map(Pid::from_raw)
        .collect()
}
