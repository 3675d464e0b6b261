//! Named network namespaces, `ip` invocations in them, and sockets created inside them.

use std::{
    fs::File,
    io,
    os::fd::{AsFd, AsRawFd as _, BorrowedFd, RawFd},
    process::Stdio,
};

use nix::sched::{CloneFlags, setns};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::{io::AsyncWriteExt as _, process::Command};

use crate::cleanup::{self, Registration, Resource};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot run `{command}`: {source}")]
    Spawn { command: String, source: io::Error },
    #[error("`{command}` failed: {stderr}")]
    Failed { command: String, stderr: String },
    #[error("cannot open network namespace {name}: {source}")]
    Open { name: String, source: io::Error },
}

/// A named network namespace (`ip netns add`), deleted when dropped.
#[derive(Debug)]
pub struct Netns {
    name: String,
    file: File,
    registration: Registration,
}

impl Netns {
    pub async fn create(name: &str) -> Result<Self, NetnsError> {
        ip(&["netns", "add", name]).await?;
        let registration = cleanup::register(Resource::Netns(name.to_owned()));
        let file = File::open(format!("/run/netns/{name}")).map_err(|source| NetnsError::Open {
            name: name.to_owned(),
            source,
        })?;
        Ok(Self {
            name: name.to_owned(),
            file,
            registration,
        })
    }

    /// Deletes the namespace now; dropping it does the same, but blocks the thread.
    pub async fn delete(self) -> Result<(), NetnsError> {
        let Self {
            name,
            file,
            registration,
        } = self;
        drop(file);
        let result = ip(&["netns", "del", &name]).await;
        registration.disarm();
        result
    }

    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace file descriptor, for `setns` in a child before `exec`.
    #[must_use]
    pub fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Runs `f` on the current thread while it is in this namespace. Sockets created by `f`
    /// stay in the namespace for their lifetime; nothing else of the thread does.
    pub fn enter<T>(&self, f: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
        let original = File::open("/proc/thread-self/ns/net")?;
        setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        let _restore = Restore(original);
        f()
    }

    /// A non-blocking socket in this namespace.
    pub fn socket(
        &self,
        domain: Domain,
        kind: Type,
        protocol: Option<Protocol>,
    ) -> io::Result<Socket> {
        let socket = self.enter(|| Socket::new(domain, kind, protocol))?;
        socket.set_nonblocking(true)?;
        Ok(socket)
    }

    /// Runs `ip -n NS -batch -` with `commands`, one per line.
    pub async fn ip_batch(&self, commands: &[String]) -> Result<(), NetnsError> {
        run_with_input(
            "ip",
            &["-n", &self.name, "-batch", "-"],
            &commands.join("\n"),
        )
        .await
    }

    /// Runs `program ARGS` inside this namespace (through `nsenter --net`, which unlike
    /// `ip netns exec` leaves the mounts alone), feeding it `input` on stdin.
    pub async fn run(&self, program: &str, args: &[&str], input: &str) -> Result<(), NetnsError> {
        let namespace = format!("--net=/run/netns/{}", self.name);
        let mut full = vec![namespace.as_str(), program];
        full.extend_from_slice(args);
        run_with_input("nsenter", &full, input).await
    }

    /// Sets sysctls (`key=value`) in this namespace. `ip netns exec` is used only here: it
    /// remounts /sys, which a sysctl does not mind but the agent would.
    pub async fn sysctl(&self, settings: &[&str]) -> Result<(), NetnsError> {
        let mut args = vec!["netns", "exec", &self.name, "sysctl", "-qw"];
        args.extend_from_slice(settings);
        ip(&args).await
    }
}

/// Puts the thread back into the namespace it came from, also when the closure panics.
struct Restore(File);

impl Drop for Restore {
    fn drop(&mut self) {
        // A thread left in a pod's namespace would silently create later sockets there; that
        // must never happen, and restoring an fd we just opened cannot fail in practice.
        setns(self.0.as_fd(), CloneFlags::CLONE_NEWNET)
            .expect("cannot return the thread to its network namespace");
    }
}

impl AsFd for Netns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// Runs `ip ARGS`.
pub async fn ip(args: &[&str]) -> Result<(), NetnsError> {
    run_with_input("ip", args, "").await
}

async fn run_with_input(program: &str, args: &[&str], input: &str) -> Result<(), NetnsError> {
    let command = format!("{program} {}", args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_empty() {
            Stdio::null()
        } else {
            Stdio::piped()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| NetnsError::Spawn {
            command: command.clone(),
            source,
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .await
            .map_err(|source| NetnsError::Spawn {
                command: command.clone(),
                source,
            })?;
    }
    let output = child
        .wait_with_output()
        .await
        .map_err(|source| NetnsError::Spawn {
            command: command.clone(),
            source,
        })?;
    if output.status.success() {
        Ok(())
    } else {
        let detail = if input.is_empty() {
            String::new()
        } else {
            format!(" (input: {})", input.replace('\n', "; "))
        };
        Err(NetnsError::Failed {
            command: format!("{command}{detail}"),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}
