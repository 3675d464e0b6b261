//! The agent process, and waiting for its status file to report a wanted state.

use std::{
    fmt,
    fs::{self, OpenOptions},
    io,
    os::unix::process::ExitStatusExt as _,
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    time::Duration,
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use notify::{RecursiveMode, Watcher as _};
use serde::Deserialize;
use tokio::{
    process::{Child, Command},
    sync::mpsc,
    time::{Instant, sleep_until, timeout},
};

use crate::{
    cleanup::{self, Registration, Resource},
    netns::Netns,
    node::NODE_NAME,
};

/// How long the agent may take to apply a change.
pub const CONVERGENCE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long an agent sent SIGTERM may take to exit before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot start {}: {source}", binary.display())]
    Spawn { binary: PathBuf, source: io::Error },
    #[error("cannot watch {}: {source}", path.display())]
    Watch {
        path: PathBuf,
        source: notify::Error,
    },
    #[error("waiting for the agent: {0}")]
    Wait(io::Error),
    #[error("the agent exited ({0}) before reporting the wanted state")]
    Exited(ExitDescription),
    #[error("the agent did not report the wanted state within {}s; wanted {wanted}; last status: {}", CONVERGENCE_TIMEOUT.as_secs(), last.as_ref().map_or_else(|| "none".to_owned(), ToString::to_string))]
    Timeout {
        wanted: Wanted,
        last: Option<Box<Status>>,
    },
}

/// An exit status, with the signal spelled out.
#[derive(Debug)]
pub struct ExitDescription(pub ExitStatus);

impl fmt::Display for ExitDescription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.0.code(), self.0.signal()) {
            (Some(code), _) => write!(f, "exit code {code}"),
            (None, Some(signal)) => {
                let name = Signal::try_from(signal)
                    .map_or_else(|_| signal.to_string(), |signal| signal.as_str().to_owned());
                write!(f, "killed by {name}")
            }
            (None, None) => write!(f, "{}", self.0),
        }
    }
}

/// Where one scenario's agent reads and writes.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub binary: PathBuf,
    pub manifests: PathBuf,
    pub bpffs: PathBuf,
    pub status_file: PathBuf,
    pub log: PathBuf,
    /// The scenario's `agent_args`.
    pub extra_args: Vec<String>,
    /// Where the agent serves the identity check (`--authz-socket`).
    pub authz_socket: PathBuf,
    /// Where the agent serves its observe endpoint (`--observe-socket`): in the scenario's
    /// directory, so that concurrent scenarios never read each other's flows.
    pub observe_socket: PathBuf,
}

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    child: Child,
    pid: u32,
    registration: Option<Registration>,
}

impl Agent {
    /// Starts the agent in the node's network namespace (but the harness's mount namespace, so
    /// that it sees the scenario's bpffs), its output appended to the log file.
    pub fn start(config: &AgentConfig, node: &Netns) -> Result<Self, AgentError> {
        let spawn_error = |source| AgentError::Spawn {
            binary: config.binary.clone(),
            source,
        };
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&config.log)
            .map_err(spawn_error)?;
        let mut command = Command::new(&config.binary);
        command
            .arg("agent")
            .arg("--manifests")
            .arg(&config.manifests)
            .args(["--node", NODE_NAME])
            .arg("--bpffs")
            .arg(&config.bpffs)
            .arg("--status-file")
            .arg(&config.status_file)
            .arg("--authz-socket")
            .arg(&config.authz_socket)
            .arg("--observe-socket")
            .arg(&config.observe_socket)
            .args(&config.extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(spawn_error)?)
            .stderr(log);
        let node_fd = node.raw_fd();
        // SAFETY: the closure runs in the forked child before exec and only makes the setns
        // system call, which is async-signal-safe; `node_fd` stays open in the parent until
        // the spawn returns, so the child's copy is valid.
        unsafe {
            command.pre_exec(move || {
                if libc::setns(node_fd, libc::CLONE_NEWNET) == 0 {
                    Ok(())
                } else {
                    Err(io::Error::last_os_error())
                }
            });
        }
        let child = command.spawn().map_err(spawn_error)?;
        let pid = child.id().expect("a child that was just spawned has a pid");
        let registration = cleanup::register(Resource::Agent(Pid::from_raw(pid.cast_signed())));
        Ok(Self {
            child,
            pid,
            registration: Some(registration),
        })
    }

    #[must_use]
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Stops the agent with `signal` (SIGKILL after a grace period) and waits for it to exit.
    pub async fn stop(mut self, signal: Signal) -> Result<ExitDescription, AgentError> {
        let _ = kill(Pid::from_raw(self.pid.cast_signed()), signal);
        let status = if let Ok(status) = timeout(STOP_TIMEOUT, self.child.wait()).await {
            status
        } else {
            let _ = kill(Pid::from_raw(self.pid.cast_signed()), Signal::SIGKILL);
            self.child.wait().await
        }
        .map_err(AgentError::Wait)?;
        if let Some(registration) = self.registration.take() {
            registration.disarm();
        }
        Ok(ExitDescription(status))
    }
}

/// The agent's status file, parsed leniently: unknown fields are ignored, missing ones default.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct Status {
    pub pid: u32,
    pub generation: u64,
    pub source_digest: String,
    pub endpoints: Vec<EndpointStatus>,
    pub errors: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct EndpointStatus {
    pub pod: Option<String>,
    pub interface: String,
    pub ifindex: u32,
    pub state: String,
    pub attached: bool,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pid {} generation {} digest {}",
            self.pid,
            self.generation,
            short(&self.source_digest)
        )?;
        for endpoint in &self.endpoints {
            write!(
                f,
                "; {} ({}) {}{}",
                endpoint.interface,
                endpoint.pod.as_deref().unwrap_or("no pod"),
                endpoint.state,
                if endpoint.attached {
                    ", attached"
                } else {
                    ", not attached"
                }
            )?;
        }
        if !self.errors.is_empty() {
            write!(f, "; errors: {}", self.errors.join(" | "))?;
        }
        Ok(())
    }
}

fn short(digest: &str) -> &str {
    digest.get(..12).unwrap_or(digest)
}

/// The state the harness waits for.
#[derive(Clone, Debug)]
pub struct Wanted {
    pub pid: u32,
    pub digest: String,
    /// Interfaces of published pods: attached, and ready or locked down (a pod whose policy
    /// does not fit the maps is locked down for good: that is the agent's final word on it).
    pub ready: Vec<String>,
    /// Interfaces of unpublished pods: attached, whatever their state.
    pub attached: Vec<String>,
}

impl Wanted {
    #[must_use]
    pub fn is_met_by(&self, status: &Status) -> bool {
        let listed = |interface: &String, ready: bool| {
            status.endpoints.iter().any(|endpoint| {
                endpoint.interface == *interface
                    && endpoint.attached
                    && (!ready || endpoint.state == "ready" || endpoint.state == "locked")
            })
        };
        status.pid == self.pid
            && status.source_digest == self.digest
            && self.ready.iter().all(|interface| listed(interface, true))
            && self
                .attached
                .iter()
                .all(|interface| listed(interface, false))
    }
}

impl fmt::Display for Wanted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pid {} digest {}", self.pid, short(&self.digest))?;
        if !self.ready.is_empty() {
            write!(f, ", ready: {}", self.ready.join(" "))?;
        }
        if !self.attached.is_empty() {
            write!(f, ", attached: {}", self.attached.join(" "))?;
        }
        Ok(())
    }
}

/// Wakes the harness whenever the status file is replaced.
pub struct StatusWatcher {
    path: PathBuf,
    events: mpsc::UnboundedReceiver<()>,
    _watcher: notify::RecommendedWatcher,
}

impl fmt::Debug for StatusWatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StatusWatcher")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl StatusWatcher {
    /// Watches the directory, not the file: the agent replaces the file by rename.
    pub fn new(path: &Path) -> Result<Self, AgentError> {
        let watch_error = |source| AgentError::Watch {
            path: path.to_owned(),
            source,
        };
        let (sender, events) = mpsc::unbounded_channel();
        let target = path.to_owned();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                // The agent's log lives in the same directory; only the status file matters.
                if event.is_ok_and(|event| event.paths.contains(&target)) {
                    let _ = sender.send(());
                }
            })
            .map_err(watch_error)?;
        let directory = path.parent().unwrap_or(Path::new("/"));
        watcher
            .watch(directory, RecursiveMode::NonRecursive)
            .map_err(watch_error)?;
        Ok(Self {
            path: path.to_owned(),
            events,
            _watcher: watcher,
        })
    }

    /// The status as it is now; `None` while the file is missing or half-written.
    #[must_use]
    pub fn read(&self) -> Option<Status> {
        serde_json::from_slice(&fs::read(&self.path).ok()?).ok()
    }

    /// Waits until the status meets `wanted`, the agent exits, or the timeout passes.
    pub async fn wait_for(
        &mut self,
        agent: &mut Agent,
        wanted: &Wanted,
    ) -> Result<Status, AgentError> {
        let deadline = Instant::now() + CONVERGENCE_TIMEOUT;
        while self.events.try_recv().is_ok() {}
        let mut last = None;
        loop {
            if let Some(status) = self.read() {
                if wanted.is_met_by(&status) {
                    return Ok(status);
                }
                last = Some(Box::new(status));
            }
            tokio::select! {
                _ = self.events.recv() => {}
                exit = agent.child.wait() => {
                    let status = exit.map_err(AgentError::Wait)?;
                    return Err(AgentError::Exited(ExitDescription(status)));
                }
                () = sleep_until(deadline) => {
                    return Err(AgentError::Timeout { wanted: wanted.clone(), last: self.read().map(Box::new).or(last) });
                }
            }
        }
    }
}

/// The last `lines` lines of the agent's log.
#[must_use]
pub fn log_tail(log: &Path, lines: usize) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_parses_leniently_and_matches_wanted_state() {
        let status: Status = serde_json::from_str(
            r#"{"pid": 7, "generation": 3, "source_digest": "abc", "future": true,
                "endpoints": [{"pod": "x/a", "interface": "vp1", "ifindex": 5, "state": "ready", "attached": true, "extra": 1},
                              {"pod": null, "interface": "vp2", "ifindex": 6, "state": "unknown", "attached": true}],
                "errors": []}"#,
        )
        .unwrap();
        let mut wanted = Wanted {
            pid: 7,
            digest: "abc".to_owned(),
            ready: vec!["vp1".to_owned()],
            attached: vec!["vp2".to_owned()],
        };
        assert!(wanted.is_met_by(&status));
        wanted.ready.push("vp2".to_owned());
        assert!(!wanted.is_met_by(&status), "vp2 is not ready");
        wanted.ready.pop();
        wanted.pid = 8;
        assert!(!wanted.is_met_by(&status), "another agent's status");
        let empty: Status = serde_json::from_str("{}").unwrap();
        assert!(empty.endpoints.is_empty());
    }
}
