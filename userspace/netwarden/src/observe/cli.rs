//! `netwarden observe`: the flows of one agent (its socket or a TCP address) or of every agent
//! of a cluster (through the Kubernetes API's port-forward), filtered, as a table or JSON lines.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use futures::{StreamExt as _, stream::SelectAll};

use super::{
    DEFAULT_SOCKET,
    client::{self, AgentAddress, Lines},
    flow::{Direction, Filter, FlowRecord, ObserveRequest, StreamLine, Verdict},
};

/// How `observe` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// One line per flow, for people.
    Table,
    /// The agent's JSON lines, as they are (a lost-records notice is `{"lost":N}`).
    Json,
}

/// `netwarden observe`.
#[derive(clap::Args)]
pub struct ObserveCommand {
    /// The agent's observe endpoint: its Unix socket (`--observe-socket`) or a TCP address
    /// (`--observe-address`).
    #[arg(long, default_value = DEFAULT_SOCKET, conflicts_with = "kubeconfig")]
    pub agent: AgentAddress,
    /// Observe every agent of the cluster of this kubeconfig (its current context), each
    /// through a port-forward to its pod's loopback listener.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    #[command(flatten)]
    pub agents: super::cluster::AgentPods,
    /// Only flows whose pod or peer is in this namespace.
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
    /// Only flows whose pod or peer is this pod (`namespace/name`, or `name`).
    #[arg(long)]
    pub pod: Option<String>,
    /// Only this verdict.
    #[arg(long, value_enum)]
    pub verdict: Option<Verdict>,
    /// Only this direction, from the pod's point of view.
    #[arg(long, value_enum)]
    pub direction: Option<Direction>,
    /// Only this protocol (TCP, UDP, SCTP, ICMP, `ICMPv6`).
    #[arg(long)]
    pub protocol: Option<String>,
    /// Only flows with this source or destination port.
    #[arg(long)]
    pub port: Option<u16>,
    /// Only verdicts a NetworkPolicy is behind (`namespace/name`, or `name`): the one whose
    /// rule allowed it, or one isolating the pod.
    #[arg(long)]
    pub policy: Option<String>,
    /// `table` or `json` (JSON lines).
    #[arg(long, short = 'o', value_enum, default_value = "table")]
    pub output: Output,
    /// Keep printing new flows as they come (without it: the flows the agents keep, then exit).
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Only flows at most this old (`30s`, `5m`, `1h`), by each agent's clock.
    #[arg(long, value_parser = crate::agent::parse_duration)]
    pub since: Option<Duration>,
}

/// Prints the flows; returns when the streams end (or at once on a closed stdout).
pub fn run(command: &ObserveCommand) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let request = ObserveRequest {
            filter: Filter {
                namespace: command.namespace.clone(),
                pod: command.pod.clone(),
                verdict: command.verdict,
                direction: command.direction,
                protocol: command.protocol.clone(),
                port: command.port,
                policy: command.policy.clone(),
            },
            follow: command.follow,
            since_seconds: command.since.map(|since| since.as_secs()),
        };
        let streams: Vec<Lines> = match &command.kubeconfig {
            None => {
                let connection = command.agent.connect().await?;
                vec![client::flows(connection, &request).await?]
            }
            Some(kubeconfig) => {
                super::cluster::flows_of_every_agent(kubeconfig, &command.agents, &request).await?
            }
        };
        print(streams, command.output, !command.follow).await
    })
}

/// Prints the lines of every stream as they come; without `--follow`, sorted by time once all
/// have ended (several agents' rings interleave).
async fn print(streams: Vec<Lines>, output: Output, sort: bool) -> anyhow::Result<()> {
    let mut merged: SelectAll<Lines> = futures::stream::select_all(streams);
    let mut held = Vec::new();
    let stdout = std::io::stdout();
    while let Some(line) = merged.next().await {
        let line = line.context("reading the flows")?;
        if sort {
            held.push(line);
            continue;
        }
        if !write_line(&mut stdout.lock(), &line, output) {
            return Ok(());
        }
    }
    held.sort_by_key(|line| match line {
        StreamLine::Flow(record) => record.time_unix_ms,
        StreamLine::Lost { .. } => 0,
    });
    let mut out = stdout.lock();
    for line in &held {
        if !write_line(&mut out, line, output) {
            break;
        }
    }
    Ok(())
}

/// Writes one line; `false` once stdout is closed (`| head`), which ends the command quietly.
fn write_line(out: &mut impl std::io::Write, line: &StreamLine, output: Output) -> bool {
    let written = match (output, line) {
        (Output::Json, line) => serde_json::to_string(line)
            .map_err(std::io::Error::other)
            .and_then(|text| writeln!(out, "{text}")),
        (Output::Table, StreamLine::Flow(record)) => writeln!(out, "{}", table_row(record)),
        (Output::Table, StreamLine::Lost { lost }) => {
            eprintln!("netwarden observe: {lost} flows lost (this observer fell behind the agent)");
            Ok(())
        }
    };
    written.and_then(|()| out.flush()).is_ok()
}

/// One flow for people: time, node, verdict, direction, protocol, who to whom, why.
pub fn table_row(record: &FlowRecord) -> String {
    let FlowRecord {
        time_unix_ms,
        node,
        verdict,
        direction,
        pod,
        peer_pod,
        service,
        protocol,
        source,
        destination,
        reason_code: _,
        reason,
        policies: _,
    } = record;
    let time = i64::try_from(*time_unix_ms)
        .ok()
        .and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok())
        .map_or_else(|| time_unix_ms.to_string(), |time| format!("{time:.3}"));
    let (source_pod, destination_pod) = match direction {
        Direction::Ingress => (peer_pod, pod),
        Direction::Egress => (pod, peer_pod),
    };
    let named = |pod: &Option<String>, address: &SocketAddr| match pod {
        Some(pod) => format!("{pod} {address}"),
        None => address.to_string(),
    };
    let via = service
        .as_deref()
        .map(|service| format!(" (opened to {service})"))
        .unwrap_or_default();
    format!(
        "{time} {node} {verdict:<5} {direction:<7} {protocol} {} -> {}{via}: {reason}",
        named(source_pod, source),
        named(destination_pod, destination),
        verdict = match verdict {
            Verdict::Allow => "ALLOW",
            Verdict::Deny => "DENY",
            Verdict::Audit => "AUDIT",
        },
    )
}

#[cfg(test)]
mod tests {
    use super::table_row;
    use crate::observe::flow::tests::denied_ingress;

    #[test]
    fn a_row_reads_from_the_client_to_the_server_with_the_reason() {
        let mut record = denied_ingress();
        record.time_unix_ms = 1_796_554_962_500;
        assert_eq!(
            table_row(&record),
            "2026-12-06T11:02:42.500Z node-1 DENY  ingress TCP x/a 10.244.0.10:43296 -> x/b 10.244.0.11:80: default deny: isolated by NetworkPolicy x/deny; no rule allows it"
        );
        // The same flow allowed where it left x/a: the columns stay aligned.
        let egress = crate::observe::flow::FlowRecord {
            verdict: crate::observe::flow::Verdict::Allow,
            direction: crate::observe::flow::Direction::Egress,
            pod: Some("x/a".into()),
            peer_pod: Some("x/b".into()),
            reason: "allowed: no NetworkPolicy isolates this pod for egress".into(),
            ..record
        };
        assert_eq!(
            table_row(&egress),
            "2026-12-06T11:02:42.500Z node-1 ALLOW egress  TCP x/a 10.244.0.10:43296 -> x/b 10.244.0.11:80: allowed: no NetworkPolicy isolates this pod for egress"
        );
    }
}
