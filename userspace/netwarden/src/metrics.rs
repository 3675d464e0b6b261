//! The agent's Prometheus metrics (`prometheus-client`), rendered in the text exposition format
//! on `/metrics` of `--metrics-address`.
//!
//! The agent loop sets the gauges after every apply ([`Metrics::observe_apply`]); the datapath's
//! verdict counters are read when the endpoint is scraped ([`Metrics::observe_verdicts`]), so
//! they are current even when nothing has been applied for hours. Counters that are totals kept
//! elsewhere (the datapath's per-CPU counters, the watchers' restarts) are exposed as those
//! totals, not re-counted here: they survive agent restarts the way the pinned maps do.

use std::{
    collections::BTreeMap,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, UNIX_EPOCH},
};

use netwarden_common::{counter, direction};
use netwarden_datapath::{
    ApplyReport, EndpointState, MapUsage, Unenforced,
    conntrack::{SweepReport, TABLE_V4, TABLE_V6},
};
use netwarden_identity::CUT_RATE_LIMITED;
use netwarden_kube::WatchHealth;
use netwarden_policy::DatapathState;
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Metric, Registry, Unit},
};

/// `state` of an endpoint, as the status file names it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

/// Why a local pod is not enforced ([`Unenforced::label`]).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UnenforcedLabels {
    reason: &'static str,
}

/// A datapath map, by its pinned name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabels {
    map: &'static str,
}

/// One verdict counter of the datapath.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabels {
    /// `ingress` or `egress`, from the pod's point of view.
    direction: &'static str,
    /// `allow` or `deny`: the reason's [`counter::Kind`].
    verdict: &'static str,
    /// The reason's label in `netwarden_common::counter::TABLE`.
    reason: &'static str,
}

/// One of the datapath's counters of verdict events it could not report.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UnreportedLabels {
    /// The reason's label in `netwarden_common::counter::TABLE`.
    reason: &'static str,
}

/// A watched Kubernetes API resource.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResourceLabels {
    /// `namespaces`, `pods` or `networkpolicies`.
    resource: &'static str,
}

/// One kind of identity check decision, by its label (`allowed`, `wrong_principal`, ...).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    decision: &'static str,
}

/// The reasons of `netwarden_common::counter::TABLE` that count packets.
fn verdict_reasons() -> impl Iterator<Item = &'static counter::Reason> {
    counter::TABLE
        .iter()
        .filter(|reason| reason.kind != counter::Kind::EventAccounting)
}

/// The reasons of `netwarden_common::counter::TABLE` that count unreported events.
fn unreported_event_reasons() -> impl Iterator<Item = &'static counter::Reason> {
    counter::TABLE
        .iter()
        .filter(|reason| reason.kind == counter::Kind::EventAccounting)
}

const DIRECTIONS: [(u32, &str); 2] = [
    (direction::INGRESS, "ingress"),
    (direction::EGRESS, "egress"),
];

/// What one apply produced, for [`Metrics::observe_apply`].
pub struct Applied<'a> {
    /// NetworkPolicies in the cluster the source holds (valid or not).
    pub policies: usize,
    /// Objects the source or the compiler could not enforce as written.
    pub input_errors: usize,
    /// What the compiler wants in the maps.
    pub state: &'a DatapathState,
    /// What the datapath did.
    pub report: &'a ApplyReport,
    /// How full the maps are after it.
    pub maps: &'a [MapUsage],
    /// From the change that caused it being seen to the maps being updated; `None` for the
    /// first apply, which follows the initial sync rather than a change.
    pub latency: Option<Duration>,
}

/// Help of `netwarden_endpoints_unenforced`.
const UNENFORCED_HELP: &str = "Local pods not enforced, by reason (attach_failed, map_write_failed, interface_missing); retried with backoff, and /readyz fails while any is";

/// Every metric the agent exports, and the registry that renders them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    policies: Gauge,
    compiled_policies: Gauge,
    identities: Gauge,
    endpoints: Family<StateLabels, Gauge>,
    endpoints_locked_down: Gauge,
    endpoints_unenforced: Family<UnenforcedLabels, Gauge>,
    pending_pods: Gauge,
    input_errors: Gauge,
    map_entries: Family<MapLabels, Gauge>,
    map_capacity: Family<MapLabels, Gauge>,
    verdicts: Family<VerdictLabels, Counter>,
    unreported_events: Family<UnreportedLabels, Counter>,
    applies: Counter,
    apply_duration: Histogram,
    watch_restarts: Counter,
    conntrack_expired: Counter,
    identity_checks: Family<DecisionLabels, Counter>,
    identity_cuts_rate_limited: Counter,
    watch_healthy: Family<ResourceLabels, Gauge>,
    watch_last_success: Family<ResourceLabels, Gauge<f64, AtomicU64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every metric registered under the `netwarden_` prefix, at zero.
    #[must_use]
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("netwarden");
        let r = &mut registry;
        let metrics = Self {
            policies: registered(
                r,
                "policies",
                "NetworkPolicies the source holds, valid or not",
            ),
            compiled_policies: registered(
                r,
                "compiled_policies",
                "Distinct compiled policies in the maps (endpoints with equal policies share one)",
            ),
            identities: registered(
                r,
                "identities",
                "Peer identities (namespace, labels, named ports) in use",
            ),
            endpoints: registered(
                r,
                "endpoints",
                "Local endpoints by state: ready, unknown (no pod object yet), locked (over capacity)",
            ),
            endpoints_locked_down: registered(
                r,
                "endpoints_locked_down",
                "Local endpoints denying all but node traffic because their policy does not fit the maps",
            ),
            endpoints_unenforced: registered(r, "endpoints_unenforced", UNENFORCED_HELP),
            pending_pods: registered(
                r,
                "pending_pods",
                "Local pods whose interface has not been found yet",
            ),
            input_errors: registered(
                r,
                "input_errors",
                "Problems with the input or the maps at the last apply (each is logged with its object and field)",
            ),
            map_entries: registered(
                r,
                "map_entries",
                "Entries the agent wrote to each datapath map",
            ),
            map_capacity: registered(r, "map_capacity", "max_entries of each datapath map"),
            verdicts: registered(
                r,
                "verdicts",
                "Packets decided by the datapath since its maps were created, by direction (pod's view), verdict and reason",
            ),
            unreported_events: registered(
                r,
                "verdict_events_unreported",
                "Verdict events (denies, sampled allows) the datapath could not report, by reason: over its per-CPU rate limit, or the ring buffer was full",
            ),
            applies: registered(r, "applies", "Compilations applied to the datapath"),
            // 100 µs to ~3 s: an incremental apply is sub-millisecond, a full one on a large
            // cluster takes seconds.
            apply_duration: registered_in_seconds(
                r,
                "apply_duration",
                "From a change being seen by the agent to the maps being updated",
                Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            ),
            watch_restarts: registered(
                r,
                "watch_restarts",
                "Kubernetes list/watch failures the watchers backed off from and resumed (410 Gone included)",
            ),
            conntrack_expired: registered(
                r,
                "conntrack_expired",
                "Tracked flows the sweeper removed for being idle past their timeout",
            ),
            identity_checks: registered(
                r,
                "identity_checks",
                "Identity check (Authorization/Check) requests since the agent started, by decision",
            ),
            watch_healthy: registered(
                r,
                "watch_healthy",
                "1 while the Kubernetes API watch of the resource works, 0 once it has failed for --watch-stale-after with no success (the last state is still enforced)",
            ),
            watch_last_success: registered_in_seconds(
                r,
                "watch_last_success_timestamp",
                "When the API server last accepted a list or watch request of the resource, or sent an event of it (Unix time)",
                Family::default(),
            ),
            identity_cuts_rate_limited: registered(
                r,
                "identity_cuts_rate_limited",
                "Identity check denies not cut in the kernel: their destination pod was over --authz-cut-rate",
            ),
            registry,
        };
        metrics.create_every_series();
        metrics
    }

    /// Every series exists from the start, at zero: a rate over a series that appears late
    /// misses its first increase.
    fn create_every_series(&self) {
        for (_, name) in DIRECTIONS {
            for reason in verdict_reasons() {
                let labels = VerdictLabels {
                    direction: name,
                    verdict: reason.kind.label(),
                    reason: reason.label,
                };
                drop(self.verdicts.get_or_create(&labels));
            }
        }
        for reason in unreported_event_reasons() {
            let labels = UnreportedLabels {
                reason: reason.label,
            };
            drop(self.unreported_events.get_or_create(&labels));
        }
        for state in EndpointState::ALL {
            drop(self.endpoints.get_or_create(&StateLabels {
                state: state.label(),
            }));
        }
        for reason in Unenforced::ALL {
            drop(self.endpoints_unenforced.get_or_create(&UnenforcedLabels {
                reason: reason.label(),
            }));
        }
    }

    /// Records what an apply produced.
    pub fn observe_apply(&self, applied: &Applied<'_>) {
        let Applied {
            policies,
            input_errors,
            state,
            report,
            maps,
            latency,
        } = applied;
        self.policies.set(gauge_value(*policies));
        self.compiled_policies
            .set(gauge_value(state.policies.len()));
        self.identities.set(gauge_value(state.identities.len()));
        for state in EndpointState::ALL {
            let count = report
                .endpoints
                .iter()
                .filter(|endpoint| endpoint.state == state)
                .count();
            self.endpoints
                .get_or_create(&StateLabels {
                    state: state.label(),
                })
                .set(gauge_value(count));
            if state == EndpointState::Locked {
                self.endpoints_locked_down.set(gauge_value(count));
            }
        }
        for reason in Unenforced::ALL {
            let count = report
                .unenforced
                .iter()
                .filter(|endpoint| endpoint.reason == reason)
                .count();
            self.endpoints_unenforced
                .get_or_create(&UnenforcedLabels {
                    reason: reason.label(),
                })
                .set(gauge_value(count));
        }
        self.pending_pods.set(gauge_value(report.pending.len()));
        self.input_errors.set(gauge_value(*input_errors));
        for usage in *maps {
            let labels = MapLabels { map: usage.map };
            if let Some(entries) = usage.entries {
                self.map_entries
                    .get_or_create(&labels)
                    .set(gauge_value(entries));
            }
            self.map_capacity
                .get_or_create(&labels)
                .set(i64::from(usage.capacity));
        }
        self.applies.inc();
        if let Some(latency) = latency {
            self.apply_duration.observe(latency.as_secs_f64());
        }
    }

    /// Takes the datapath's verdict counters (summed over CPUs, indexed by
    /// `netwarden_common::counter::slot`).
    pub fn observe_verdicts(&self, counters: &[u64]) {
        let at = |dir: u32, reason: u32| {
            counters
                .get(counter::slot(dir, reason) as usize)
                .copied()
                .unwrap_or(0)
        };
        for (dir, name) in DIRECTIONS {
            for reason in verdict_reasons() {
                let labels = VerdictLabels {
                    direction: name,
                    verdict: reason.kind.label(),
                    reason: reason.label,
                };
                set_total(&self.verdicts.get_or_create(&labels), at(dir, reason.id));
            }
        }
        for reason in unreported_event_reasons() {
            let labels = UnreportedLabels {
                reason: reason.label,
            };
            let both = at(direction::INGRESS, reason.id) + at(direction::EGRESS, reason.id);
            set_total(&self.unreported_events.get_or_create(&labels), both);
        }
    }

    /// What a conntrack sweep found: the tables' sizes, and how many idle flows it removed.
    pub fn observe_conntrack_sweep(&self, report: &SweepReport) {
        for (map, flows, expired) in [
            (TABLE_V4, report.ipv4_flows, report.ipv4_expired),
            (TABLE_V6, report.ipv6_flows, report.ipv6_expired),
        ] {
            self.map_entries
                .get_or_create(&MapLabels { map })
                .set(gauge_value(flows.saturating_sub(expired)));
        }
        self.conntrack_expired
            .inc_by(u64::try_from(report.expired()).unwrap_or(u64::MAX));
    }

    /// Takes the identity check's decision totals (`netwarden_identity::DecisionCounts`).
    pub fn observe_identity_checks(&self, counts: &BTreeMap<&'static str, u64>) {
        for (&decision, &count) in counts {
            if decision == CUT_RATE_LIMITED {
                set_total(&self.identity_cuts_rate_limited, count);
            } else {
                set_total(
                    &self
                        .identity_checks
                        .get_or_create(&DecisionLabels { decision }),
                    count,
                );
            }
        }
    }

    /// Takes how the Kubernetes API watches are doing.
    pub fn observe_watches(&self, watches: &[WatchHealth]) {
        for watch in watches {
            let labels = ResourceLabels {
                resource: watch.resource,
            };
            self.watch_healthy
                .get_or_create(&labels)
                .set(i64::from(watch.healthy));
            if let Some(since_epoch) = watch
                .last_success
                .and_then(|at| at.duration_since(UNIX_EPOCH).ok())
            {
                self.watch_last_success
                    .get_or_create(&labels)
                    .set(since_epoch.as_secs_f64());
            }
        }
    }

    /// Takes the watchers' restart total.
    pub fn observe_watch_restarts(&self, total: u64) {
        set_total(&self.watch_restarts, total);
    }

    /// The text exposition (the `OpenMetrics` format, which Prometheus reads) of every metric.
    #[must_use]
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail; a metric that failed to encode would be a bug here.
        encode(&mut text, &self.registry).expect("metrics encode into a String");
        text
    }
}

/// The content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A new metric, registered under `name`.
fn registered<M: Metric + Clone + Default>(registry: &mut Registry, name: &str, help: &str) -> M {
    let metric = M::default();
    registry.register(name, help, metric.clone());
    metric
}

/// `metric`, registered under `name` with the unit seconds.
fn registered_in_seconds<M: Metric + Clone>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    metric: M,
) -> M {
    registry.register_with_unit(name, help, Unit::Seconds, metric.clone());
    metric
}

/// A counter whose total is kept elsewhere: exposed as it is.
fn set_total(counter: &Counter, total: u64) {
    counter.inner().store(total, Ordering::Relaxed);
}

fn gauge_value(count: usize) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use std::{net::IpAddr, time::Duration};

    use aya::{maps::MapError, sys::SyscallError};
    use netwarden_common::{counter, direction, maps as pinned};
    use netwarden_datapath::{
        ApplyError, ApplyReport, EndpointReport, EndpointState, MapUsage, PolicyMap, Unenforced,
        UnenforcedEndpoint,
    };
    use netwarden_model::manifests::pod_ref;
    use netwarden_policy::{Compiler, DatapathState};

    use super::{Applied, Metrics};

    /// Two pods on this node, one policy isolating `b` for ingress from anything but `a`, and a
    /// second policy whose namespace does not exist (still counted as a policy).
    const CLUSTER: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: x}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {app: a}}
spec: {nodeName: node-1, containers: [{name: c, ports: [{containerPort: 80}]}]}
status: {podIP: 10.244.0.5}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: x, labels: {app: b}}
spec: {nodeName: node-1, containers: [{name: c, ports: [{containerPort: 80}]}]}
status: {podIP: 10.244.0.6}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-a, namespace: x}
spec:
  podSelector: {matchLabels: {app: b}}
  ingress: [{from: [{podSelector: {matchLabels: {app: a}}}], ports: [{port: 80}]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: elsewhere, namespace: y}
spec: {podSelector: {}, policyTypes: [Egress]}
";

    /// The lines of `text` that are samples of `name` (with its labels, if any).
    fn samples<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
        text.lines()
            .filter(|line| {
                line.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
            })
            .collect()
    }

    fn value(text: &str, series: &str) -> String {
        let line = text
            .lines()
            .find(|line| {
                line.strip_prefix(series)
                    .is_some_and(|rest| rest.starts_with(' '))
            })
            .unwrap_or_else(|| panic!("no sample {series} in\n{text}"));
        line[series.len() + 1..].to_owned()
    }

    /// [`CLUSTER`] read as the manifest source reads it and compiled for `node-1`: the number
    /// of policies and the compiler's state.
    fn compiled() -> (usize, DatapathState) {
        let (cluster, errors) = netwarden_model::cluster_of_stream("cluster.yaml", CLUSTER);
        assert!(errors.is_empty(), "{errors:?}");
        let policies = cluster.policies.len();
        let mut compiler = Compiler::new("node-1");
        compiler.set_node_addresses(&["172.18.0.2".parse::<IpAddr>().unwrap()]);
        (policies, compiler.sync(cluster).clone())
    }

    #[test]
    fn unenforced_pods_are_counted_by_reason() {
        let (policies, state) = compiled();
        let report = ApplyReport {
            unenforced: vec![
                UnenforcedEndpoint {
                    pod: Some(pod_ref("x/c")),
                    interface: None,
                    reason: Unenforced::InterfaceMissing,
                },
                UnenforcedEndpoint {
                    pod: Some(pod_ref("x/a")),
                    interface: Some("veth-a".into()),
                    reason: Unenforced::AttachFailed,
                },
            ],
            ..ApplyReport::default()
        };
        let metrics = Metrics::new();
        let series =
            |reason: &str| format!(r#"netwarden_endpoints_unenforced{{reason="{reason}"}}"#);
        // Every reason is a series from the start.
        for reason in Unenforced::ALL {
            assert_eq!(value(&metrics.render(), &series(reason.label())), "0");
        }
        metrics.observe_apply(&Applied {
            policies,
            input_errors: 0,
            state: &state,
            report: &report,
            maps: &[],
            latency: None,
        });
        let text = metrics.render();
        assert_eq!(value(&text, &series("attach_failed")), "1");
        assert_eq!(value(&text, &series("map_write_failed")), "0");
        assert_eq!(value(&text, &series("interface_missing")), "1");
    }

    /// What the datapath reports when policy `id` does not fit the policy map.
    fn policy_map_full(id: u32) -> ApplyError {
        ApplyError::PolicyDoesNotFit {
            id,
            map: PolicyMap::Entries,
            needed: 5,
            source: MapError::SyscallError(SyscallError {
                call: "bpf_map_update_elem",
                io_error: std::io::Error::from_raw_os_error(libc::E2BIG),
            }),
        }
    }

    #[test]
    fn a_compiled_apply_renders_its_gauges_and_latency() {
        let (policies, state) = compiled();
        // The datapath's report for that state on a node where `b`'s policy did not fit.
        let report = ApplyReport {
            endpoints: vec![
                EndpointReport {
                    pod: Some(pod_ref("x/a")),
                    interface: "veth-a".into(),
                    ifindex: 5,
                    state: EndpointState::Ready,
                    attached: true,
                },
                EndpointReport {
                    pod: Some(pod_ref("x/b")),
                    interface: "veth-b".into(),
                    ifindex: 6,
                    state: EndpointState::Locked,
                    attached: true,
                },
            ],
            pending: vec![],
            errors: vec![policy_map_full(1)],
            changed: true,
            ..ApplyReport::default()
        };
        let maps = [
            MapUsage {
                map: pinned::POLICY.name,
                entries: Some(3),
                capacity: 4,
            },
            MapUsage {
                map: pinned::CONNTRACK_V4.name,
                entries: None,
                capacity: 1024,
            },
        ];
        let metrics = Metrics::new();
        metrics.observe_apply(&Applied {
            policies,
            input_errors: report.errors.len(),
            state: &state,
            report: &report,
            maps: &maps,
            latency: Some(Duration::from_micros(750)),
        });
        let text = metrics.render();

        assert_eq!(value(&text, "netwarden_policies"), "2");
        // One compiled policy (b's ingress); a is not isolated.
        assert_eq!(state.policies.len(), 1);
        assert_eq!(value(&text, "netwarden_compiled_policies"), "1");
        assert_eq!(
            value(&text, "netwarden_identities"),
            state.identities.len().to_string()
        );
        assert!(!state.identities.is_empty());
        assert_eq!(value(&text, r#"netwarden_endpoints{state="ready"}"#), "1");
        assert_eq!(value(&text, r#"netwarden_endpoints{state="locked"}"#), "1");
        assert_eq!(value(&text, r#"netwarden_endpoints{state="unknown"}"#), "0");
        assert_eq!(value(&text, "netwarden_endpoints_locked_down"), "1");
        assert_eq!(value(&text, "netwarden_input_errors"), "1");
        let (policy, conntrack) = (pinned::POLICY.name, pinned::CONNTRACK_V4.name);
        let of_map = |series: &str, map: &str| value(&text, &format!(r#"{series}{{map="{map}"}}"#));
        assert_eq!(of_map("netwarden_map_entries", policy), "3");
        assert_eq!(of_map("netwarden_map_capacity", policy), "4");
        assert_eq!(of_map("netwarden_map_capacity", conntrack), "1024");
        assert!(
            samples(&text, "netwarden_map_entries")
                .iter()
                .all(|line| !line.contains(conntrack)),
            "conntrack entries are not known to the agent:\n{text}"
        );
        assert_eq!(value(&text, "netwarden_applies_total"), "1");
        assert!(text.contains("# TYPE netwarden_apply_duration_seconds histogram"));
        assert!(text.contains("# UNIT netwarden_apply_duration_seconds seconds"));
        assert_eq!(value(&text, "netwarden_apply_duration_seconds_count"), "1");
        assert_eq!(
            value(&text, "netwarden_apply_duration_seconds_sum"),
            "0.00075"
        );
        // 750 µs falls in the 0.0008 bucket, not in 0.0004.
        assert_eq!(
            value(
                &text,
                r#"netwarden_apply_duration_seconds_bucket{le="0.0004"}"#
            ),
            "0"
        );
        assert_eq!(
            value(
                &text,
                r#"netwarden_apply_duration_seconds_bucket{le="0.0008"}"#
            ),
            "1"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn verdict_counters_render_by_direction_verdict_and_reason() {
        let metrics = Metrics::new();
        let mut counters = vec![0; counter::SLOTS as usize];
        counters[counter::slot(direction::INGRESS, counter::DENIED_BY_POLICY) as usize] = 7;
        counters[counter::slot(direction::EGRESS, counter::ALLOWED_TRACKED) as usize] = 40;
        counters[counter::slot(direction::INGRESS, counter::EVENTS_LOST) as usize] = 2;
        counters[counter::slot(direction::EGRESS, counter::EVENTS_LOST) as usize] = 1;
        metrics.observe_verdicts(&counters);
        metrics.observe_watch_restarts(3);
        let text = metrics.render();

        assert_eq!(
            value(
                &text,
                r#"netwarden_verdicts_total{direction="ingress",verdict="deny",reason="denied_by_policy"}"#
            ),
            "7"
        );
        assert_eq!(
            value(
                &text,
                r#"netwarden_verdicts_total{direction="egress",verdict="allow",reason="allowed_tracked"}"#
            ),
            "40"
        );
        assert_eq!(
            value(
                &text,
                r#"netwarden_verdicts_total{direction="egress",verdict="deny",reason="denied_by_policy"}"#
            ),
            "0"
        );
        // Every reason in both directions, the event counters apart.
        let packet_reasons = counter::TABLE
            .iter()
            .filter(|reason| reason.kind != counter::Kind::EventAccounting)
            .count();
        assert_eq!(
            samples(&text, "netwarden_verdicts_total").len(),
            2 * packet_reasons
        );
        assert_eq!(
            value(
                &text,
                r#"netwarden_verdict_events_unreported_total{reason="events_lost"}"#
            ),
            "3"
        );
        assert_eq!(
            value(
                &text,
                r#"netwarden_verdict_events_unreported_total{reason="events_rate_limited"}"#
            ),
            "0"
        );
        assert_eq!(value(&text, "netwarden_watch_restarts_total"), "3");

        // Counters are the datapath's totals: a later read replaces, not adds.
        counters[counter::slot(direction::INGRESS, counter::DENIED_BY_POLICY) as usize] = 9;
        metrics.observe_verdicts(&counters);
        let text = metrics.render();
        assert_eq!(
            value(
                &text,
                r#"netwarden_verdicts_total{direction="ingress",verdict="deny",reason="denied_by_policy"}"#
            ),
            "9"
        );
    }

    #[test]
    fn watch_health_renders_per_resource() {
        let metrics = Metrics::new();
        let watch = |resource, healthy: bool| netwarden_kube::WatchHealth {
            kind: "Pod",
            resource,
            last_success: Some(std::time::UNIX_EPOCH + Duration::from_millis(1_700_000_000_500)),
            failing_for: (!healthy).then_some(Duration::from_secs(90)),
            healthy,
        };
        metrics.observe_watches(&[watch("pods", false), watch("namespaces", true)]);
        let text = metrics.render();
        assert_eq!(
            value(&text, r#"netwarden_watch_healthy{resource="pods"}"#),
            "0"
        );
        assert_eq!(
            value(&text, r#"netwarden_watch_healthy{resource="namespaces"}"#),
            "1"
        );
        assert_eq!(
            value(
                &text,
                r#"netwarden_watch_last_success_timestamp_seconds{resource="pods"}"#
            ),
            "1700000000.5"
        );
    }

    #[test]
    fn identity_decisions_and_skipped_cuts_are_counted_apart() {
        let metrics = Metrics::new();
        metrics.observe_identity_checks(
            &[
                ("allowed", 4),
                ("wrong_principal", 2),
                (netwarden_identity::CUT_RATE_LIMITED, 1),
            ]
            .into(),
        );
        let text = metrics.render();
        assert_eq!(
            value(
                &text,
                r#"netwarden_identity_checks_total{decision="wrong_principal"}"#
            ),
            "2"
        );
        assert_eq!(
            value(
                &text,
                r#"netwarden_identity_checks_total{decision="allowed"}"#
            ),
            "4"
        );
        assert_eq!(
            value(&text, "netwarden_identity_cuts_rate_limited_total"),
            "1"
        );
        assert!(!text.contains(r#"decision="cut_rate_limited""#), "{text}");
    }

    #[test]
    fn every_counter_of_the_table_is_a_metric_series() {
        let metrics = Metrics::new();
        // Each counter gets its own value, so a series reading the wrong slot shows.
        let counters: Vec<u64> = (1..=u64::from(counter::SLOTS)).collect();
        metrics.observe_verdicts(&counters);
        let text = metrics.render();
        for reason in counter::TABLE {
            let ingress = counters[counter::slot(direction::INGRESS, reason.id) as usize];
            let egress = counters[counter::slot(direction::EGRESS, reason.id) as usize];
            match reason.kind {
                counter::Kind::Allow | counter::Kind::Deny | counter::Kind::Audit => {
                    for (name, count) in [("ingress", ingress), ("egress", egress)] {
                        let series = format!(
                            r#"netwarden_verdicts_total{{direction="{name}",verdict="{}",reason="{}"}}"#,
                            reason.kind.label(),
                            reason.label
                        );
                        assert_eq!(value(&text, &series), count.to_string(), "{series}");
                    }
                }
                counter::Kind::EventAccounting => {
                    let series = format!(
                        r#"netwarden_verdict_events_unreported_total{{reason="{}"}}"#,
                        reason.label
                    );
                    assert_eq!(value(&text, &series), (ingress + egress).to_string());
                }
            }
        }
    }
}
