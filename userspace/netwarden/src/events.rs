//! Deny events from the datapath, turned back into names and logged as structured lines.
//!
//! The datapath reports every deny through a ring buffer, rate-limited per CPU, and never
//! waits for this reader; what it could not report is counted in the status file's verdicts.
//! This task only ever reads: a slow log cannot slow a packet. Each event is also published
//! to the observe endpoint's ring ([`crate::observe::hub`]), which never waits for observers.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, RwLock},
};

use aya::maps::{MapData, RingBuf};
use netwarden_common::{VerdictEvent, counter, direction};
use netwarden_model::{PodRef, PolicyRef};
use tokio::io::unix::AsyncFd;
use tracing::{error, info, warn};

use crate::observe::{
    flow::{Direction, FlowRecord, Verdict},
    hub::FlowHub,
};

/// Every pod address with its pod, IPv4 and IPv6 apart: an `IpAddr` key is 17 bytes, and an
/// IPv4 one 4 (a table slot of 16 bytes instead of 32, for each of 150,000 pods).
#[derive(Debug, Default)]
pub struct PodsByAddress {
    v4: HashMap<Ipv4Addr, Arc<PodRef>>,
    v6: HashMap<Ipv6Addr, Arc<PodRef>>,
}

impl PodsByAddress {
    /// The pod that has `ip`.
    pub fn get(&self, ip: IpAddr) -> Option<&Arc<PodRef>> {
        match ip {
            IpAddr::V4(ip) => self.v4.get(&ip),
            IpAddr::V6(ip) => self.v6.get(&ip),
        }
    }

    /// Keeps the addresses for which `keep` holds.
    pub fn retain(&mut self, mut keep: impl FnMut(IpAddr, &Arc<PodRef>) -> bool) {
        self.v4.retain(|ip, pod| keep(IpAddr::V4(*ip), pod));
        self.v6.retain(|ip, pod| keep(IpAddr::V6(*ip), pod));
    }

    /// Gives `ip` to `pod` unless it has a pod already.
    pub fn insert_if_absent(&mut self, ip: IpAddr, pod: &Arc<PodRef>) {
        match ip {
            IpAddr::V4(ip) => self.v4.entry(ip).or_insert_with(|| Arc::clone(pod)),
            IpAddr::V6(ip) => self.v6.entry(ip).or_insert_with(|| Arc::clone(pod)),
        };
    }
}

/// What the reader needs to name an event's parts; refreshed after every apply.
#[derive(Debug, Default)]
pub struct Attribution {
    /// Local endpoints by the ifindex of their veth.
    pub endpoints: HashMap<u32, EndpointNames>,
    /// Pods by address, cluster-wide: the compiler's own names, shared.
    pub pods: PodsByAddress,
    /// Rules by the compiler's id.
    pub rules: HashMap<u32, RuleNames>,
    /// Service frontends by the compiler's id, as "Service ns/name port http (cluster IP)
    /// 10.96.0.10:80/TCP": a flow decided after translation names the Service it was opened
    /// to, and its peer is the backend (or the original client) it was judged on.
    pub services: HashMap<u32, String>,
}

/// Names of one rule.
#[derive(Debug, Default)]
pub struct RuleNames {
    /// The rule, as "NetworkPolicy ns/name ingress[i]".
    pub rule: String,
    /// Its policy: `namespace/name`, or a ClusterNetworkPolicy's name.
    pub policy: String,
}

/// Names of one local endpoint.
#[derive(Debug, Default)]
pub struct EndpointNames {
    /// `namespace/name`, or `None` for a veth whose pod is not known yet.
    pub pod: Option<String>,
    /// The policies isolating it for ingress.
    pub ingress_isolated_by: Vec<PolicyRef>,
    /// The policies isolating it for egress.
    pub egress_isolated_by: Vec<PolicyRef>,
}

/// Shared between the apply loop (writer) and the event reader.
pub type SharedAttribution = Arc<RwLock<Attribution>>;

/// Reads `ring` until the runtime stops, logging one line per event and publishing it to
/// `observers` (as reported by the agent of `node`).
pub fn spawn_reader(
    ring: RingBuf<MapData>,
    attribution: SharedAttribution,
    node: String,
    observers: Option<Arc<FlowHub>>,
) {
    tokio::spawn(async move {
        // SAFETY: the ring buffer's descriptor is owned by `ring`, which the AsyncFd owns and
        // keeps open for as long as it is registered.
        let mut ring = match unsafe { AsyncFd::register(ring) } {
            Ok(ring) => ring,
            Err(error) => {
                error!(%error, "cannot watch the event ring buffer; deny events will not be logged");
                return;
            }
        };
        loop {
            let Ok(mut guard) = ring.readable_mut().await else {
                return;
            };
            let ring = guard.get_inner_mut();
            while let Some(item) = ring.next() {
                if item.len() < size_of::<VerdictEvent>() {
                    continue;
                }
                // SAFETY: the item holds at least one `VerdictEvent`, written by the datapath
                // with this very layout; it is read unaligned because ring items are 8-aligned
                // only by convention.
                let event = unsafe { item.as_ptr().cast::<VerdictEvent>().read_unaligned() };
                let record = {
                    let names = attribution
                        .read()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    record(&event, &names, &node, crate::observe::now_unix_ms())
                };
                log(&record, event.policy);
                if let Some(hub) = &observers {
                    hub.publish(record);
                }
            }
            guard.clear_ready();
        }
    });
}

/// The event in names: its pods, Service, addresses and reason.
fn record(event: &VerdictEvent, names: &Attribution, node: &str, time_unix_ms: u64) -> FlowRecord {
    let endpoint = names.endpoints.get(&event.ifindex);
    let ingress = u32::from(event.direction) == direction::INGRESS;
    let pod_address = SocketAddr::new(address(event.pod_addr), event.pod_port);
    let peer_address = SocketAddr::new(address(event.peer_addr), event.peer_port);
    let (source, destination) = if ingress {
        (peer_address, pod_address)
    } else {
        (pod_address, peer_address)
    };
    let (row, reason, policies) = verdict_reason(event, names, endpoint, ingress);
    let service = match event.frontend {
        0 => None,
        id => Some(
            names
                .services
                .get(&id)
                .map_or("<a Service no longer known>", String::as_str)
                .to_owned(),
        ),
    };
    FlowRecord {
        time_unix_ms,
        node: node.to_owned(),
        verdict: match row.map(|row| row.kind) {
            Some(counter::Kind::Allow) => Verdict::Allow,
            Some(counter::Kind::Audit) => Verdict::Audit,
            _ => Verdict::Deny,
        },
        direction: if ingress {
            Direction::Ingress
        } else {
            Direction::Egress
        },
        pod: endpoint.and_then(|endpoint| endpoint.pod.clone()),
        peer_pod: names.pods.get(peer_address.ip()).map(ToString::to_string),
        service,
        protocol: protocol_name(event.protocol),
        source,
        destination,
        reason_code: row.map_or("unknown", |row| row.label).to_owned(),
        reason,
        policies,
    }
}

/// One log line per verdict, its fields as the README shows them.
fn log(record: &FlowRecord, policy_id: u32) {
    let FlowRecord {
        time_unix_ms: _,
        node: _,
        verdict,
        direction,
        pod,
        peer_pod,
        service,
        protocol,
        source,
        destination,
        reason_code,
        reason,
        policies: _,
    } = record;
    let pod = pod.as_deref().unwrap_or("<unknown pod>");
    let peer = peer_pod.as_deref().unwrap_or_default();
    let service = service.as_deref().unwrap_or_default();
    // One line shape for both verdicts; only the level and the words differ (tracing's levels
    // are fixed per call site, hence the macro).
    macro_rules! verdict_line {
        ($level:ident, $verdict:literal, $message:literal) => {
            $level!(
                target: "netwarden::verdict",
                verdict = $verdict,
                direction = %direction,
                pod,
                peer_pod = peer,
                service,
                protocol = protocol.as_str(),
                source = %source,
                destination = %destination,
                policy_id,
                reason_code = reason_code.as_str(),
                reason = %reason,
                $message
            )
        };
    }
    match verdict {
        Verdict::Allow => verdict_line!(info, "allow", "allowed"),
        Verdict::Audit => verdict_line!(warn, "audit", "would be denied"),
        Verdict::Deny => verdict_line!(warn, "deny", "denied"),
    }
}

/// The event's row of `netwarden_common::counter::TABLE` (`None` for a number this build does
/// not know), why, in the operator's words (the rule or the policies behind it where the
/// agent can name them, else the table's description), and those policies (`namespace/name`).
fn verdict_reason(
    event: &VerdictEvent,
    names: &Attribution,
    endpoint: Option<&EndpointNames>,
    ingress: bool,
) -> (Option<&'static counter::Reason>, String, Vec<String>) {
    let row = counter::reason(u32::from(event.reason));
    let mut policies = Vec::new();
    let words = match u32::from(event.reason) {
        counter::ALLOWED_BY_POLICY => match names.rules.get(&event.rule) {
            Some(rule) => {
                policies.push(rule.policy.clone());
                format!("allowed by {}", rule.rule)
            }
            None => format!(
                "allowed by rule {} (no longer in the policy set)",
                event.rule
            ),
        },
        reason @ (counter::ALLOWED_BY_CLUSTER_POLICY | counter::DENIED_BY_CLUSTER_POLICY) => {
            let verb = if reason == counter::ALLOWED_BY_CLUSTER_POLICY {
                "accepted"
            } else {
                "denied"
            };
            match names.rules.get(&event.rule) {
                Some(rule) => {
                    policies.push(rule.policy.clone());
                    format!("{verb} by {}", rule.rule)
                }
                None => format!(
                    "{verb} by ClusterNetworkPolicy rule {} (no longer in the policy set)",
                    event.rule
                ),
            }
        }
        counter::ALLOWED_NOT_ISOLATED => format!(
            "allowed: no NetworkPolicy isolates this pod for {}",
            if ingress { "ingress" } else { "egress" }
        ),
        reason @ (counter::DENIED_BY_POLICY | counter::AUDITED_BY_POLICY) => {
            let isolating = endpoint.map(|endpoint| {
                if ingress {
                    &endpoint.ingress_isolated_by
                } else {
                    &endpoint.egress_isolated_by
                }
            });
            policies = isolating
                .into_iter()
                .flatten()
                .map(ToString::to_string)
                .collect();
            let verdict = if reason == counter::AUDITED_BY_POLICY {
                "audit: passed, enforcing would deny it"
            } else {
                "default deny"
            };
            format!(
                "{verdict}: isolated by NetworkPolicy {}; no rule allows it",
                policies.join(", ")
            )
        }
        other => row.map_or_else(
            || format!("reason {other}, unknown to this agent"),
            |row| row.description.to_owned(),
        ),
    };
    (row, words, policies)
}

fn address(mapped: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(mapped);
    v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
}

fn protocol_name(protocol: u8) -> String {
    match protocol {
        1 => "ICMP".into(),
        6 => "TCP".into(),
        17 => "UDP".into(),
        58 => "ICMPv6".into(),
        132 => "SCTP".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use netwarden_common::{VerdictEvent, counter, direction};

    use super::{Attribution, verdict_reason};

    #[test]
    fn every_counter_of_the_table_names_its_events() {
        let names = Attribution::default();
        for row in &counter::TABLE {
            let event = VerdictEvent {
                direction: u8::try_from(direction::INGRESS).unwrap(),
                reason: u8::try_from(row.id).unwrap(),
                ..VerdictEvent::default()
            };
            let (found, words, _) = verdict_reason(&event, &names, None, true);
            assert_eq!(found, Some(row), "{}", row.label);
            assert!(!words.contains("unknown to this agent"), "{words}");
        }
        let beyond = VerdictEvent {
            reason: u8::try_from(counter::COUNT).unwrap(),
            ..VerdictEvent::default()
        };
        let (found, words, _) = verdict_reason(&beyond, &names, None, true);
        assert_eq!(found, None);
        assert!(words.contains("unknown to this agent"), "{words}");
    }
}
