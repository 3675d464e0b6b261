//! The `observe` step: the operator's view of the run, checked. The harness runs the real
//! `netwarden observe` CLI against the running agent's observe socket, prints its table, and
//! checks its JSON lines: every flow the step expects must be reported with the step's verdict,
//! from the right pod to the right pod and port (and, when asked, naming a policy or a
//! reason), and the flows it lists as `absent` must not be.
//!
//! What a step expects is fixed when the scenario is validated: the flows it lists, or else
//! every cell the probes since the previous `observe` of denies (or the agent's restart, which
//! empties its ring) expected blocked, as far as the step's filters select them. Only records
//! read since the previous `observe` of the same verdict count.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    path::Path,
};

use serde::Deserialize;

use crate::{
    cli::{CliError, Output, run_netwarden},
    node::Addresses,
    scenario::{IpFamily, Protocol},
};

/// A verdict as the observe endpoint names it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ObservedVerdict {
    Allow,
    #[default]
    Deny,
    Audit,
}

impl ObservedVerdict {
    /// The word of `netwarden observe --verdict`.
    fn as_arg(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
            Self::Audit => "audit",
        }
    }
}

impl fmt::Display for ObservedVerdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_arg())
    }
}

/// From the reporting pod's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlowDirection {
    Ingress,
    Egress,
}

impl FlowDirection {
    fn as_arg(self) -> &'static str {
        match self {
            Self::Ingress => "ingress",
            Self::Egress => "egress",
        }
    }
}

/// A flow a step names: a client, a server, the server's port and the protocol. Ends are pods
/// (`namespace/name`) or external hosts.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowEnds {
    pub from: String,
    pub to: String,
    pub port: u16,
    #[serde(default)]
    pub protocol: Protocol,
}

impl fmt::Display for FlowEnds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} -> {} {}/{}",
            self.from, self.to, self.protocol, self.port
        )
    }
}

/// Pod keys have a namespace; external hosts' keys do not, and the agent names no pod for
/// their addresses.
fn is_pod(key: &str) -> bool {
    key.contains('/')
}

/// What `netwarden observe` is asked for: its filter flags.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObserveFilter {
    pub verdict: ObservedVerdict,
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub direction: Option<FlowDirection>,
    pub protocol: Option<Protocol>,
    pub port: Option<u16>,
    pub policy: Option<String>,
}

impl ObserveFilter {
    /// The CLI's flags for this filter.
    #[must_use]
    pub fn args(&self) -> Vec<String> {
        let mut args = vec!["--verdict".to_owned(), self.verdict.as_arg().to_owned()];
        let mut add = |flag: &str, value: Option<String>| {
            if let Some(value) = value {
                args.extend([flag.to_owned(), value]);
            }
        };
        add("--namespace", self.namespace.clone());
        add("--pod", self.pod.clone());
        add(
            "--direction",
            self.direction
                .map(|direction| direction.as_arg().to_owned()),
        );
        add(
            "--protocol",
            self.protocol.map(|protocol| protocol.to_string()),
        );
        add("--port", self.port.map(|port| port.to_string()));
        add("--policy", self.policy.clone());
        args
    }

    /// Whether the agent would report `flow` to this filter, as far as the harness can tell
    /// without the agent's answer: by namespace, pod, protocol and port (not by direction or
    /// policy, which only the agent knows).
    #[must_use]
    pub fn selects(&self, flow: &FlowEnds) -> bool {
        let ends = [flow.from.as_str(), flow.to.as_str()];
        let in_namespace = |key: &str, namespace: &str| {
            key.split_once('/')
                .is_some_and(|(candidate, _)| candidate == namespace)
        };
        self.namespace
            .as_deref()
            .is_none_or(|namespace| ends.iter().any(|end| in_namespace(end, namespace)))
            && self.pod.as_deref().is_none_or(|wanted| {
                ends.iter()
                    .any(|end| names_match(end, wanted, self.namespace.as_deref()))
            })
            && self
                .protocol
                .is_none_or(|protocol| protocol == flow.protocol)
            && self.port.is_none_or(|port| port == flow.port)
    }
}

/// `full` (`namespace/name`) is `wanted`: the same `namespace/name`, or a bare name equal to its
/// name (in `namespace`, when one is given), as the observe filter reads pod and policy names.
fn names_match(full: &str, wanted: &str, namespace: Option<&str>) -> bool {
    if wanted.contains('/') {
        return full == wanted;
    }
    full.split_once('/').is_some_and(|(ns, name)| {
        name == wanted && namespace.is_none_or(|namespace| namespace == ns)
    })
}

/// A validated `observe` step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observe {
    pub filter: ObserveFilter,
    /// Flows that must be reported with the filter's verdict, in every family of the model.
    pub expect: Vec<FlowEnds>,
    /// Whether `expect` is the step's own list (else the probes' blocked cells).
    pub listed: bool,
    /// Flows that must not be reported with that verdict.
    pub absent: Vec<FlowEnds>,
    /// A policy every expected flow's record must name (`namespace/name`, or a bare name).
    pub expect_policy: Option<String>,
    /// Words every expected flow's reason must contain.
    pub expect_reason: Option<String>,
}

impl fmt::Display for Observe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} flows: {} {}",
            self.filter.verdict,
            self.expect.len(),
            if self.listed {
                "listed"
            } else {
                "blocked in the probes since the previous observe"
            }
        )?;
        if !self.absent.is_empty() {
            write!(f, ", {} absent", self.absent.len())?;
        }
        if let Some(policy) = &self.expect_policy {
            write!(f, ", naming {policy}")?;
        }
        Ok(())
    }
}

/// The step as a scenario spells it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawObserve {
    #[serde(default)]
    pub verdict: ObservedVerdict,
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub direction: Option<FlowDirection>,
    pub protocol: Option<Protocol>,
    pub port: Option<u16>,
    pub policy: Option<String>,
    pub flows: Option<Vec<FlowEnds>>,
    #[serde(default)]
    pub absent: Vec<FlowEnds>,
    pub expect_policy: Option<String>,
    pub expect_reason: Option<String>,
}

impl RawObserve {
    /// The filter, and what is left of the step.
    #[must_use]
    pub fn split(self) -> (ObserveFilter, Option<Vec<FlowEnds>>, ObserveChecks) {
        let filter = ObserveFilter {
            verdict: self.verdict,
            namespace: self.namespace,
            pod: self.pod,
            direction: self.direction,
            protocol: self.protocol,
            port: self.port,
            policy: self.policy,
        };
        let checks = ObserveChecks {
            absent: self.absent,
            expect_policy: self.expect_policy,
            expect_reason: self.expect_reason,
        };
        (filter, self.flows, checks)
    }
}

/// The parts of a step that are neither its filter nor its expected flows.
#[derive(Debug)]
pub struct ObserveChecks {
    pub absent: Vec<FlowEnds>,
    pub expect_policy: Option<String>,
    pub expect_reason: Option<String>,
}

/// One flow line of `netwarden observe -o json`, read leniently: fields this harness does not
/// check are ignored.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct ObservedFlow {
    pub time_unix_ms: u64,
    pub verdict: ObservedVerdict,
    pub direction: FlowDirection,
    /// The reporting pod.
    pub pod: Option<String>,
    /// The pod at the other end, when the address is a known pod's.
    pub peer_pod: Option<String>,
    pub protocol: String,
    pub source: SocketAddr,
    pub destination: SocketAddr,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub policies: Vec<String>,
}

impl ObservedFlow {
    /// The pods the record names at the client's and the server's end.
    fn named_ends(&self) -> (Option<&str>, Option<&str>) {
        match self.direction {
            FlowDirection::Ingress => (self.peer_pod.as_deref(), self.pod.as_deref()),
            FlowDirection::Egress => (self.pod.as_deref(), self.peer_pod.as_deref()),
        }
    }

    /// Whether this is a record of `flow` between these addresses, whatever it names.
    fn is_between(&self, flow: &FlowEnds, from: IpAddr, to: IpAddr) -> bool {
        self.protocol
            .eq_ignore_ascii_case(&flow.protocol.to_string())
            && self.destination.port() == flow.port
            && self.source.ip() == from
            && self.destination.ip() == to
    }

    fn describe(&self) -> String {
        let (client, server) = self.named_ends();
        let end = |pod: Option<&str>, address: SocketAddr| match pod {
            Some(pod) => format!("{pod} {address}"),
            None => address.to_string(),
        };
        format!(
            "{} {} {} {} -> {}: {}",
            self.verdict,
            self.direction.as_arg(),
            self.protocol,
            end(client, self.source),
            end(server, self.destination),
            self.reason
        )
    }
}

/// What `netwarden observe -o json` printed, read: its flows (a `{"lost":N}` line, which a
/// command without `--follow` never prints, is skipped).
pub fn parse_json_lines(text: &str) -> Result<Vec<ObservedFlow>, CliError> {
    let unreadable = |line: &str, source| CliError::Unreadable {
        command: "netwarden observe -o json".to_owned(),
        text: line.to_owned(),
        source,
    };
    let mut flows = Vec::new();
    for line in text.lines().filter(|line| !line.trim().is_empty()) {
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|source| unreadable(line, source))?;
        if value.get("lost").is_some() {
            continue;
        }
        flows.push(serde_json::from_value(value).map_err(|source| unreadable(line, source))?);
    }
    Ok(flows)
}

/// Where the flows of a step's check are: the endpoints' addresses and the model's families.
pub struct Network<'a> {
    pub families: &'a [IpFamily],
    /// Every endpoint that ever existed, by key.
    pub addresses: &'a (dyn Fn(&str) -> Option<Addresses> + Sync),
}

/// What is wrong with `records` (read at most since `since_unix_ms`) for `observe`: one line
/// per expected flow missing, misnamed or without the policy or reason asked for, and per
/// absent flow reported.
#[must_use]
pub fn check(
    observe: &Observe,
    network: &Network<'_>,
    records: &[ObservedFlow],
    since_unix_ms: Option<u64>,
) -> Vec<String> {
    let verdict = observe.filter.verdict;
    let records: Vec<&ObservedFlow> = records
        .iter()
        .filter(|record| record.verdict == verdict)
        .filter(|record| since_unix_ms.is_none_or(|since| record.time_unix_ms >= since))
        .collect();
    let mut problems = Vec::new();
    for flow in &observe.expect {
        for (family, from, to) in addresses_of(flow, network) {
            let between: Vec<&ObservedFlow> = records
                .iter()
                .copied()
                .filter(|record| record.is_between(flow, from, to))
                .collect();
            let wanted_names = (
                is_pod(&flow.from).then_some(flow.from.as_str()),
                is_pod(&flow.to).then_some(flow.to.as_str()),
            );
            let named: Vec<&ObservedFlow> = between
                .iter()
                .copied()
                .filter(|record| record.named_ends() == wanted_names)
                .collect();
            let explained = named.iter().any(|record| {
                observe.expect_policy.as_deref().is_none_or(|wanted| {
                    record
                        .policies
                        .iter()
                        .any(|policy| names_match(policy, wanted, None))
                }) && observe
                    .expect_reason
                    .as_deref()
                    .is_none_or(|words| record.reason.contains(words))
            });
            let problem = match (between.first(), named.first()) {
                (None, _) => {
                    format!("{flow} ({family} {from} -> {to}): no {verdict} flow reported")
                }
                (Some(other), None) => format!(
                    "{flow} ({family}): reported with other names: {}",
                    other.describe()
                ),
                (Some(_), Some(record)) if !explained => format!(
                    "{flow} ({family}): reported, but not naming {}: {}",
                    [
                        observe.expect_policy.as_deref(),
                        observe.expect_reason.as_deref()
                    ]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join(" and "),
                    record.describe()
                ),
                _ => continue,
            };
            problems.push(problem);
        }
    }
    for flow in &observe.absent {
        for (family, from, to) in addresses_of(flow, network) {
            if let Some(record) = records
                .iter()
                .find(|record| record.is_between(flow, from, to))
            {
                problems.push(format!(
                    "{flow} ({family}): must not be reported {verdict}, yet: {}",
                    record.describe()
                ));
            }
        }
    }
    problems
}

/// The client's and server's addresses of `flow` in each family where both have one.
fn addresses_of(flow: &FlowEnds, network: &Network<'_>) -> Vec<(IpFamily, IpAddr, IpAddr)> {
    let (Some(from), Some(to)) = (
        (network.addresses)(&flow.from),
        (network.addresses)(&flow.to),
    ) else {
        return Vec::new();
    };
    network
        .families
        .iter()
        .filter_map(|family| Some((*family, from.get(*family)?, to.get(*family)?)))
        .collect()
}

/// Now, in Unix milliseconds, the clock the agent stamps its records with (the same machine's).
#[must_use]
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
        })
}

/// `netwarden observe` against the agent's `socket` with `args`: its command line as an
/// operator would type it, then what it printed.
pub async fn run_observe(
    binary: &Path,
    socket: &Path,
    args: &[String],
    output: Output,
) -> Result<(String, String), CliError> {
    let mut all = vec![
        "observe".to_owned(),
        "--agent".to_owned(),
        socket.display().to_string(),
    ];
    all.extend(args.iter().cloned());
    if output == Output::Json {
        all.extend(["-o".to_owned(), "json".to_owned()]);
    }
    run_netwarden(binary, &all).await
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    fn ends(from: &str, to: &str, port: u16) -> FlowEnds {
        FlowEnds {
            from: from.to_owned(),
            to: to.to_owned(),
            port,
            protocol: Protocol::Tcp,
        }
    }

    fn address(key: &str) -> Option<Addresses> {
        let last = match key {
            "web/debug" => 12,
            "data/database" => 13,
            "web/frontend" => 10,
            "internet" => {
                return Some(Addresses {
                    v4: Some(Ipv4Addr::new(198, 18, 15, 2)),
                    v6: None,
                });
            }
            _ => return None,
        };
        Some(Addresses {
            v4: Some(Ipv4Addr::new(10, 244, 0, last)),
            v6: Some(Ipv6Addr::new(
                0xfd00,
                0x10,
                0x244,
                0,
                0,
                0,
                0,
                u16::from(last),
            )),
        })
    }

    /// What the agent reports when `data/database`'s ingress drops `web/debug` on 5432.
    fn denied_at_database() -> ObservedFlow {
        ObservedFlow {
            time_unix_ms: 2_000,
            verdict: ObservedVerdict::Deny,
            direction: FlowDirection::Ingress,
            pod: Some("data/database".to_owned()),
            peer_pod: Some("web/debug".to_owned()),
            protocol: "TCP".to_owned(),
            source: "10.244.0.12:40000".parse().unwrap(),
            destination: "10.244.0.13:5432".parse().unwrap(),
            reason: "default deny: isolated by NetworkPolicy data/database, data/default-deny; no rule allows it".to_owned(),
            policies: vec!["data/database".to_owned(), "data/default-deny".to_owned()],
        }
    }

    fn expecting(flows: Vec<FlowEnds>) -> Observe {
        Observe {
            filter: ObserveFilter::default(),
            expect: flows,
            listed: true,
            absent: Vec::new(),
            expect_policy: None,
            expect_reason: None,
        }
    }

    fn assert_passes(problems: &[String]) {
        assert!(problems.is_empty(), "{problems:?}");
    }

    fn problems(observe: &Observe, records: &[ObservedFlow], since: Option<u64>) -> Vec<String> {
        let network = Network {
            families: &[IpFamily::IPv4],
            addresses: &address,
        };
        check(observe, &network, records, since)
    }

    #[test]
    fn an_expected_deny_reported_with_its_pods_and_port_passes() {
        let observe = expecting(vec![ends("web/debug", "data/database", 5432)]);
        assert_passes(&problems(&observe, &[denied_at_database()], None));
        // Reported where the client's egress dropped it: the same flow, named from the other end.
        let at_egress = ObservedFlow {
            direction: FlowDirection::Egress,
            pod: Some("web/debug".to_owned()),
            peer_pod: Some("data/database".to_owned()),
            ..denied_at_database()
        };
        assert_passes(&problems(&observe, &[at_egress], None));
    }

    /// The negative controls: each thing the step checks, wrong in the records, fails it.
    #[test]
    fn a_missing_misnamed_or_unexplained_flow_fails() {
        let observe = expecting(vec![ends("web/debug", "data/database", 5432)]);
        let missing = problems(&observe, &[], None);
        assert_eq!(
            missing,
            [
                "web/debug -> data/database TCP/5432 (IPv4 10.244.0.12 -> 10.244.0.13): no deny flow reported"
            ]
        );
        let other_port = ObservedFlow {
            destination: "10.244.0.13:8080".parse().unwrap(),
            ..denied_at_database()
        };
        assert_eq!(problems(&observe, &[other_port], None).len(), 1);
        let other_protocol = ObservedFlow {
            protocol: "UDP".to_owned(),
            ..denied_at_database()
        };
        assert_eq!(problems(&observe, &[other_protocol], None).len(), 1);
        let allowed = ObservedFlow {
            verdict: ObservedVerdict::Allow,
            ..denied_at_database()
        };
        assert_eq!(problems(&observe, &[allowed], None).len(), 1);
        // Reported before the window: an older deny of the same flow does not count.
        assert_eq!(
            problems(&observe, &[denied_at_database()], Some(2_001)).len(),
            1
        );
        // The right addresses, the wrong names: the observer would be told the wrong pods.
        let misnamed = ObservedFlow {
            peer_pod: None,
            ..denied_at_database()
        };
        let found = problems(&observe, &[misnamed], None);
        assert_eq!(found.len(), 1);
        assert!(
            found[0].contains("reported with other names: deny ingress TCP 10.244.0.12:40000 -> data/database 10.244.0.13:5432"),
            "{found:?}"
        );
        let naming = Observe {
            expect_policy: Some("web/default-deny".to_owned()),
            ..observe.clone()
        };
        let found = problems(&naming, &[denied_at_database()], None);
        assert_eq!(found.len(), 1);
        assert!(
            found[0].contains("not naming web/default-deny"),
            "{found:?}"
        );
        let bare_name = Observe {
            expect_policy: Some("default-deny".to_owned()),
            expect_reason: Some("no rule allows it".to_owned()),
            ..observe.clone()
        };
        assert_passes(&problems(&bare_name, &[denied_at_database()], None));
        let other_reason = Observe {
            expect_reason: Some("allowed by".to_owned()),
            ..observe
        };
        assert_eq!(
            problems(&other_reason, &[denied_at_database()], None).len(),
            1
        );
    }

    #[test]
    fn external_hosts_are_matched_by_address_and_every_family_is_expected() {
        let from_outside = ObservedFlow {
            pod: Some("web/debug".to_owned()),
            peer_pod: None,
            source: "198.18.15.2:50000".parse().unwrap(),
            destination: "10.244.0.12:8080".parse().unwrap(),
            ..denied_at_database()
        };
        let observe = expecting(vec![ends("internet", "web/debug", 8080)]);
        assert_passes(&problems(
            &observe,
            std::slice::from_ref(&from_outside),
            None,
        ));
        // Both pods have IPv6 addresses: in a dual-stack model both families must be reported.
        let dual = Network {
            families: &[IpFamily::IPv4, IpFamily::IPv6],
            addresses: &address,
        };
        let observe = expecting(vec![ends("web/debug", "data/database", 5432)]);
        let found = check(&observe, &dual, &[denied_at_database()], None);
        assert_eq!(found.len(), 1);
        assert!(
            found[0].contains("(IPv6 fd00:10:244::c -> fd00:10:244::d)"),
            "{found:?}"
        );
        // The host has no IPv6 address: only IPv4 is expected of it.
        let observe = expecting(vec![ends("internet", "web/debug", 8080)]);
        assert_passes(&check(&observe, &dual, &[from_outside], None));
    }

    #[test]
    fn an_absent_flow_that_is_reported_fails() {
        let observe = Observe {
            absent: vec![ends("web/debug", "data/database", 5432)],
            ..expecting(Vec::new())
        };
        assert_passes(&problems(&observe, &[], None));
        let found = problems(&observe, &[denied_at_database()], None);
        assert_eq!(found.len(), 1);
        assert!(found[0].contains("must not be reported deny"), "{found:?}");
    }

    #[test]
    fn the_filter_becomes_the_cli_flags_and_selects_flows_as_the_agent_would() {
        let filter = ObserveFilter {
            verdict: ObservedVerdict::Audit,
            namespace: Some("web".to_owned()),
            pod: Some("debug".to_owned()),
            direction: Some(FlowDirection::Egress),
            protocol: Some(Protocol::Udp),
            port: Some(53),
            policy: Some("web/default-deny".to_owned()),
        };
        assert_eq!(
            filter.args().join(" "),
            "--verdict audit --namespace web --pod debug --direction egress --protocol UDP --port 53 --policy web/default-deny"
        );
        assert_eq!(ObserveFilter::default().args().join(" "), "--verdict deny");
        let selects = |filter: &ObserveFilter, flow: &FlowEnds| filter.selects(flow);
        let flow = ends("internet", "web/debug", 8080);
        assert!(selects(&ObserveFilter::default(), &flow));
        for (filter, expected) in [
            (
                ObserveFilter {
                    namespace: Some("web".to_owned()),
                    ..ObserveFilter::default()
                },
                true,
            ),
            (
                ObserveFilter {
                    namespace: Some("data".to_owned()),
                    ..ObserveFilter::default()
                },
                false,
            ),
            (
                ObserveFilter {
                    pod: Some("debug".to_owned()),
                    ..ObserveFilter::default()
                },
                true,
            ),
            (
                ObserveFilter {
                    pod: Some("data/debug".to_owned()),
                    ..ObserveFilter::default()
                },
                false,
            ),
            (
                ObserveFilter {
                    pod: Some("debug".to_owned()),
                    namespace: Some("data".to_owned()),
                    ..ObserveFilter::default()
                },
                false,
            ),
            (
                ObserveFilter {
                    port: Some(8080),
                    ..ObserveFilter::default()
                },
                true,
            ),
            (
                ObserveFilter {
                    port: Some(5432),
                    ..ObserveFilter::default()
                },
                false,
            ),
            (
                ObserveFilter {
                    protocol: Some(Protocol::Udp),
                    ..ObserveFilter::default()
                },
                false,
            ),
        ] {
            assert_eq!(selects(&filter, &flow), expected, "{filter:?}");
        }
    }

    #[test]
    fn json_lines_are_read_leniently_and_lost_notices_skipped() {
        let text = r#"{"time_unix_ms":1796569765332,"node":"nwe2e-node","verdict":"deny","direction":"ingress","pod":"x/b","peer_pod":"x/a","service":null,"protocol":"TCP","source":"10.244.0.10:48326","destination":"10.244.0.11:80","reason_code":"denied_by_policy","reason":"default deny","policies":["x/deny"],"future":1}
{"lost":3}

"#;
        let flows = parse_json_lines(text).unwrap();
        assert_eq!(flows.len(), 1);
        assert_eq!(flows[0].named_ends(), (Some("x/a"), Some("x/b")));
        assert!(matches!(
            parse_json_lines("{\"verdict\":\"deny\"}"),
            Err(CliError::Unreadable { .. })
        ));
    }
}
