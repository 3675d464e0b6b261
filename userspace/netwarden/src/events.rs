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
    let (allowed, reason) = verdict_reason(event, names, endpoint, ingress);
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
                protocol = protocol_name(event.protocol),
                source = %source,
                destination = %destination,
                policy_id = event.policy,
                reason = %reason,
                $message
            )
        };
    }
    if allowed {
        verdict_line!(info, "allow", "allowed");
    } else {
        verdict_line!(warn, "deny", "denied");
    }
}

/// Whether the event is an allow, and why, in the operator's words.
fn verdict_reason(
    event: &VerdictEvent,
    names: &Attribution,
    endpoint: Option<&EndpointNames>,
    ingress: bool,
) -> (bool, String) {
    match u32::from(event.reason) {
        counter::ALLOWED_BY_POLICY => (
            true,
            names.rules.get(&event.rule).map_or_else(
                || {
                    format!(
                        "allowed by rule {} (no longer in the policy set)",
                        event.rule
                    )
                },
                |rule| format!("allowed by {rule}"),
            ),
        ),
        counter::ALLOWED_NOT_ISOLATED => (
            true,
            format!(
                "allowed: no NetworkPolicy isolates this pod for {}",
                if ingress { "ingress" } else { "egress" }
            ),
        ),
        counter::ALLOWED_NODE => (true, "allowed: traffic from the node".to_owned()),
        counter::DENIED_BY_POLICY => {
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
            (
                false,
                format!(
                    "default deny: isolated by NetworkPolicy {}; no rule allows it",
                    policies.join(", ")
                ),
            )
        }
        counter::DENIED_ENDPOINT_NOT_READY => (
            false,
            "endpoint not ready: its pod is not known yet, or its policy did not fit the maps"
                .to_owned(),
        ),
        counter::DENIED_REVOKED => (
            false,
            "revoked: the current policy no longer allows this established flow".to_owned(),
        ),
        counter::DENIED_SPOOFED => (
            false,
            "spoofed: the pod does not own the source address".to_owned(),
        ),
        counter::DENIED_PLAINTEXT_TO_STRICT => (
            false,
            "plaintext to mTLS-strict pod: the flow's first payload was not a TLS ClientHello"
                .to_owned(),
        ),
        counter::DENIED_BY_IDENTITY => (false, "refused by the identity check".to_owned()),
        other => (false, format!("reason {other}")),
    }
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
