//! The operator's commands of the agent's binary (`netwarden observe`, `netwarden explain`), run
//! by the harness as an operator would run them: to their end, their output read.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use tokio::process::Command;

/// How long one command (never `--follow`, so it ends by itself) may take.
const CLI_TIMEOUT: Duration = Duration::from_secs(10);

/// Why an operator command of `netwarden` could not be run or read.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot run {}: {source}", binary.display())]
    Spawn {
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error("`{command}` did not end within {}s", CLI_TIMEOUT.as_secs())]
    Timeout { command: String },
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("unreadable output of `{command}` ({source}): {text}")]
    Unreadable {
        command: String,
        text: String,
        source: serde_json::Error,
    },
}

/// How the CLI prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// For people: `observe`'s table, `explain`'s lines.
    Text,
    Json,
}

/// Runs `binary` (the agent's binary, whose subcommands are the operator's commands) with
/// `args` and waits for it to end: the command line as an operator would type it (`netwarden`
/// for the binary), and what it printed.
pub async fn run_netwarden(binary: &Path, args: &[String]) -> Result<(String, String), CliError> {
    let command = format!("netwarden {}", args.join(" "));
    let child = Command::new(binary)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let finished = tokio::time::timeout(CLI_TIMEOUT, child)
        .await
        .map_err(|_| CliError::Timeout {
            command: command.clone(),
        })?
        .map_err(|source| CliError::Spawn {
            binary: binary.to_owned(),
            source,
        })?;
    if !finished.status.success() {
        return Err(CliError::Failed {
            command,
            status: finished.status.to_string(),
            stderr: String::from_utf8_lossy(&finished.stderr).trim().to_owned(),
        });
    }
    Ok((
        command,
        String::from_utf8_lossy(&finished.stdout).into_owned(),
    ))
}
