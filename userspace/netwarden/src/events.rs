//! Deny events from the datapath, turned back into names and logged as structured lines.
//!
//! The datapath reports every deny through a ring buffer, rate-limited per CPU, and never
//! waits for this reader; what it could not report is counted in the status file's verdicts.
//! This task only ever reads: a slow log cannot slow a packet.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv6Addr},
    sync::{Arc, RwLock},
};

use aya::maps::{MapData, RingBuf};
use netwarden_common::{VerdictEvent, counter, direction};
use netwarden_model::PolicyRef;
use tokio::io::unix::AsyncFd;
use tracing::{error, info, warn};

/// What the reader needs to name an event's parts; refreshed after every apply.
#[derive(Debug, Default)]
pub struct Attribution {
    /// Local endpoints by the ifindex of their veth.
    pub endpoints: HashMap<u32, EndpointNames>,
    /// Pods by address, cluster-wide.
    pub pods: HashMap<IpAddr, String>,
    /// Rules by the compiler's id, as "NetworkPolicy ns/name ingress[i]".
    pub rules: HashMap<u32, String>,
    /// Service frontends by the compiler's id, as "Service ns/name port http (cluster IP)
    /// 10.96.0.10:80/TCP": a flow decided after translation names the Service it was opened
    /// to, and its peer is the backend (or the original client) it was judged on.
    pub services: HashMap<u32, String>,
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

/// Reads `ring` until the runtime stops, logging one line per event.
pub fn spawn_reader(ring: RingBuf<MapData>, attribution: SharedAttribution) {
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
                let names = attribution
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                log(&event, &names);
            }
            guard.clear_ready();
        }
    });
}

fn log(event: &VerdictEvent, names: &Attribution) {
    let endpoint = names.endpoints.get(&event.ifindex);
    let pod = endpoint
        .and_then(|endpoint| endpoint.pod.as_deref())
        .unwrap_or("<unknown pod>");
    let ingress = u32::from(event.direction) == direction::INGRESS;
    let pod_address = address(event.pod_addr);
    let peer_address = address(event.peer_addr);
    let peer = names.pods.get(&peer_address).map_or("", String::as_str);
    let (source, destination) = if ingress {
        (
            format!("{peer_address}:{}", event.peer_port),
            format!("{pod_address}:{}", event.pod_port),
        )
    } else {
        (
            format!("{pod_address}:{}", event.pod_port),
            format!("{peer_address}:{}", event.peer_port),
        )
    };
    let (row, reason) = verdict_reason(event, names, endpoint, ingress);
    let reason_code = row.map_or("unknown", |row| row.label);
    let service = match event.frontend {
        0 => "",
        id => names
            .services
            .get(&id)
            .map_or("<a Service no longer known>", String::as_str),
    };
    // One line shape for both verdicts; only the level and the words differ (tracing's levels
    // are fixed per call site, hence the macro).
    macro_rules! verdict_line {
        ($level:ident, $verdict:literal, $message:literal) => {
            $level!(
                target: "netwarden::verdict",
                verdict = $verdict,
                direction = if ingress { "ingress" } else { "egress" },
                pod,
                peer_pod = peer,
                service,
                protocol = protocol_name(event.protocol),
                source = %source,
                destination = %destination,
                policy_id = event.policy,
                reason_code,
                reason = %reason,
                $message
            )
        };
    }
    match row.map(|row| row.kind) {
        Some(counter::Kind::Allow) => verdict_line!(info, "allow", "allowed"),
        Some(counter::Kind::Audit) => verdict_line!(warn, "audit", "would be denied"),
        _ => verdict_line!(warn, "deny", "denied"),
    }
}

/// The event's row of `netwarden_common::counter::TABLE` (`None` for a number this build does
/// not know), and why, in the operator's words: the rule or the policies behind it where the
/// agent can name them, else the table's description.
fn verdict_reason(
    event: &VerdictEvent,
    names: &Attribution,
    endpoint: Option<&EndpointNames>,
    ingress: bool,
) -> (Option<&'static counter::Reason>, String) {
    let row = counter::reason(u32::from(event.reason));
    let words = match u32::from(event.reason) {
        counter::ALLOWED_BY_POLICY => names.rules.get(&event.rule).map_or_else(
            || {
                format!(
                    "allowed by rule {} (no longer in the policy set)",
                    event.rule
                )
            },
            |rule| format!("allowed by {rule}"),
        ),
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
            let policies: Vec<String> = isolating
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
    (row, words)
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
            let (found, words) = verdict_reason(&event, &names, None, true);
            assert_eq!(found, Some(row), "{}", row.label);
            assert!(!words.contains("unknown to this agent"), "{words}");
        }
        let beyond = VerdictEvent {
            reason: u8::try_from(counter::COUNT).unwrap(),
            ..VerdictEvent::default()
        };
        let (found, words) = verdict_reason(&beyond, &names, None, true);
        assert_eq!(found, None);
        assert!(words.contains("unknown to this agent"), "{words}");
    }
}
