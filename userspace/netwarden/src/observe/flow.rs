//! One verdict as an observer sees it, and the filter an observer asks for.
//!
//! The same types are serialized by the agent and read back by `netwarden observe`: one JSON
//! object per line, so `curl --unix-socket` and `jq` read the stream as well as the CLI does.

use std::{fmt, net::SocketAddr};

use serde::{Deserialize, Serialize};

/// Allowed or denied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Let through (allows are sampled: `--allow-events`).
    Allow,
    /// Dropped (every deny is reported, within the datapath's per-CPU rate limit).
    Deny,
    /// Let through, but a policy in audit mode would drop it (every one is reported, like a
    /// deny).
    Audit,
}

/// From the pod's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Towards the pod.
    Ingress,
    /// Leaving the pod.
    Egress,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `pad`, not `write_str`: the table aligns on widths.
        f.pad(match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
            Self::Audit => "audit",
        })
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Self::Ingress => "ingress",
            Self::Egress => "egress",
        })
    }
}

/// A verdict of the datapath, named by the agent that read it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRecord {
    /// When the agent read it from the datapath's ring buffer (Unix milliseconds; the event
    /// itself carries no time, and is read within milliseconds of the packet).
    pub time_unix_ms: u64,
    /// The node whose agent reported it.
    pub node: String,
    /// Allowed or denied.
    pub verdict: Verdict,
    /// From the local pod's point of view.
    pub direction: Direction,
    /// The local pod, `namespace/name` (`None`: a veth whose pod the agent does not know yet).
    pub pod: Option<String>,
    /// The pod at the other end, when the address is a known pod's.
    pub peer_pod: Option<String>,
    /// For a flow decided after translation, the Service it was opened to.
    pub service: Option<String>,
    /// `TCP`, `UDP`, `SCTP`, `ICMP`, `ICMPv6` or the protocol number.
    pub protocol: String,
    /// Where the packet came from.
    pub source: SocketAddr,
    /// Where it went.
    pub destination: SocketAddr,
    /// The reason's label in `netwarden_common::counter::TABLE` (as in the metrics).
    pub reason_code: String,
    /// Why, in the operator's words (the rule, or the isolating policies).
    pub reason: String,
    /// The NetworkPolicies behind the verdict, `namespace/name`: the one whose rule allowed
    /// it, or those isolating the pod in that direction for a default deny.
    pub policies: Vec<String>,
}

/// Which records an observer wants; every field set must match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Filter {
    /// The local pod or its peer is in this namespace.
    pub namespace: Option<String>,
    /// The local pod or its peer is this pod: `namespace/name`, or `name` in any namespace
    /// (or in `namespace` when that is set too).
    pub pod: Option<String>,
    /// Only this verdict.
    pub verdict: Option<Verdict>,
    /// Only this direction.
    pub direction: Option<Direction>,
    /// Only this protocol (case-insensitive).
    pub protocol: Option<String>,
    /// The source or the destination port.
    pub port: Option<u16>,
    /// A policy behind the verdict: `namespace/name`, or `name` in any namespace.
    pub policy: Option<String>,
}

impl Filter {
    /// Whether `record` passes every condition set.
    #[must_use]
    pub fn matches(&self, record: &FlowRecord) -> bool {
        let Self {
            namespace,
            pod,
            verdict,
            direction,
            protocol,
            port,
            policy,
        } = self;
        let pods = || {
            [record.pod.as_deref(), record.peer_pod.as_deref()]
                .into_iter()
                .flatten()
        };
        namespace.as_deref().is_none_or(|namespace| {
            pods().any(|pod| pod.split_once('/').is_some_and(|(ns, _)| ns == namespace))
        }) && pod
            .as_deref()
            .is_none_or(|wanted| pods().any(|pod| names_match(pod, wanted, namespace.as_deref())))
            && verdict.is_none_or(|verdict| verdict == record.verdict)
            && direction.is_none_or(|direction| direction == record.direction)
            && protocol
                .as_deref()
                .is_none_or(|protocol| protocol.eq_ignore_ascii_case(&record.protocol))
            && port.is_none_or(|port| {
                record.source.port() == port || record.destination.port() == port
            })
            && policy.as_deref().is_none_or(|wanted| {
                record
                    .policies
                    .iter()
                    .any(|policy| names_match(policy, wanted, None))
            })
    }
}

/// `full` (`namespace/name`) is `wanted`: the same `namespace/name`, or a bare name equal to
/// its name (and in `namespace`, when one is given).
fn names_match(full: &str, wanted: &str, namespace: Option<&str>) -> bool {
    if wanted.contains('/') {
        return full == wanted;
    }
    full.split_once('/').is_some_and(|(ns, name)| {
        name == wanted && namespace.is_none_or(|namespace| namespace == ns)
    })
}

/// What an observer asks the agent for (`POST /v1/flows`, a JSON body).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ObserveRequest {
    /// Which records.
    pub filter: Filter,
    /// Keep the stream open and send new records as they come; without it the stream ends
    /// after the records the agent keeps.
    pub follow: bool,
    /// Only records at most this many seconds old, by the agent's clock (so clocks of the CLI
    /// and the nodes need not agree).
    pub since_seconds: Option<u64>,
}

/// One line of the stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StreamLine {
    /// The observer fell behind and this many records were dropped for it (never for the
    /// datapath or the other observers).
    Lost {
        /// How many.
        lost: u64,
    },
    /// A record.
    Flow(Box<FlowRecord>),
}

#[cfg(test)]
pub(crate) mod tests {
    use super::{Direction, Filter, FlowRecord, StreamLine, Verdict};

    /// A deny of TCP from `x/a` to port 80 of `x/b`, seen at `x/b`'s ingress.
    pub fn denied_ingress() -> FlowRecord {
        FlowRecord {
            time_unix_ms: 1_000,
            node: "node-1".into(),
            verdict: Verdict::Deny,
            direction: Direction::Ingress,
            pod: Some("x/b".into()),
            peer_pod: Some("x/a".into()),
            service: None,
            protocol: "TCP".into(),
            source: "10.244.0.10:43296".parse().unwrap(),
            destination: "10.244.0.11:80".parse().unwrap(),
            reason_code: "denied_by_policy".into(),
            reason: "default deny: isolated by NetworkPolicy x/deny; no rule allows it".into(),
            policies: vec!["x/deny".into()],
        }
    }

    fn passes(filter: &Filter) -> bool {
        filter.matches(&denied_ingress())
    }

    #[test]
    fn each_filter_field_selects_and_rejects() {
        assert!(passes(&Filter::default()));
        let cases: [(Filter, Filter); 7] = [
            (
                Filter {
                    namespace: Some("x".into()),
                    ..Filter::default()
                },
                Filter {
                    namespace: Some("y".into()),
                    ..Filter::default()
                },
            ),
            (
                Filter {
                    pod: Some("x/a".into()),
                    ..Filter::default()
                },
                Filter {
                    pod: Some("y/a".into()),
                    ..Filter::default()
                },
            ),
            (
                Filter {
                    verdict: Some(Verdict::Deny),
                    ..Filter::default()
                },
                Filter {
                    verdict: Some(Verdict::Allow),
                    ..Filter::default()
                },
            ),
            (
                Filter {
                    direction: Some(Direction::Ingress),
                    ..Filter::default()
                },
                Filter {
                    direction: Some(Direction::Egress),
                    ..Filter::default()
                },
            ),
            (
                Filter {
                    protocol: Some("tcp".into()),
                    ..Filter::default()
                },
                Filter {
                    protocol: Some("UDP".into()),
                    ..Filter::default()
                },
            ),
            (
                Filter {
                    port: Some(43296),
                    ..Filter::default()
                },
                Filter {
                    port: Some(443),
                    ..Filter::default()
                },
            ),
            (
                Filter {
                    policy: Some("deny".into()),
                    ..Filter::default()
                },
                Filter {
                    policy: Some("y/deny".into()),
                    ..Filter::default()
                },
            ),
        ];
        for (selects, rejects) in cases {
            assert!(passes(&selects), "{selects:?}");
            assert!(!passes(&rejects), "{rejects:?}");
        }
    }

    #[test]
    fn a_bare_pod_name_matches_in_any_namespace_unless_one_is_given() {
        assert!(passes(&Filter {
            pod: Some("b".into()),
            ..Filter::default()
        }));
        assert!(!passes(&Filter {
            pod: Some("b".into()),
            namespace: Some("y".into()),
            ..Filter::default()
        }));
        assert!(!passes(&Filter {
            pod: Some("x/c".into()),
            ..Filter::default()
        }));
    }

    #[test]
    fn stream_lines_read_back_as_written() {
        for line in [
            StreamLine::Lost { lost: 7 },
            StreamLine::Flow(Box::new(denied_ingress())),
        ] {
            let text = serde_json::to_string(&line).unwrap();
            assert_eq!(
                serde_json::from_str::<StreamLine>(&text).unwrap(),
                line,
                "{text}"
            );
        }
        // A flow is a plain object on its line, for jq.
        let text = serde_json::to_string(&StreamLine::Flow(Box::new(denied_ingress()))).unwrap();
        assert!(text.starts_with("{\"time_unix_ms\":1000,"), "{text}");
    }
}
