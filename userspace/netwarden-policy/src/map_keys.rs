//! How the compiler's output is keyed in the datapath maps: the keys and values the agent
//! writes, built in one place so that [`crate::lookup`] reads exactly what the kernel reads.
//!
//! Addresses are 16 bytes (IPv4-mapped for IPv4) in the hash maps (`IPCACHE`,
//! `ENDPOINT_ADDRESSES`, `FRONTENDS`, conntrack keys of IPv6 flows). The `ipBlock` tries are one
//! per family: `CIDRS_V4` keyed by a 4-byte address, `CIDRS_V6` by a 16-byte one, each after a
//! 32-bit policy id, so an IPv4 `/n` is a `/(32 + n)` key of `CIDRS_V4`.

use std::net::IpAddr;

use ipnet::IpNet;
use netwarden_common::{
    CIDR_KEY_POLICY_BITS, CidrKey, CidrKeyV4, Endpoint, EndpointAddress, FrontendKey, IpKey,
    direction, endpoint_flags, endpoint_state,
};

use crate::{
    frontends::Frontend,
    state::{LocalEndpoint, PolicyId},
};

/// An address as the hash maps store it: 16 bytes, IPv4-mapped for IPv4.
#[must_use]
pub fn mapped(address: IpAddr) -> [u8; 16] {
    match address {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The `IPCACHE` key of `address`.
#[must_use]
pub fn ip_key(address: IpAddr) -> IpKey {
    IpKey {
        addr: mapped(address),
    }
}

/// The `ENDPOINT_ADDRESSES` key saying that the endpoint on `ifindex` owns `address`.
#[must_use]
pub fn endpoint_address(ifindex: u32, address: IpAddr) -> EndpointAddress {
    EndpointAddress {
        ifindex,
        addr: mapped(address),
    }
}

/// The `ENDPOINTS` value of a local pod whose policies are installed.
#[must_use]
pub fn ready_endpoint(endpoint: &LocalEndpoint) -> Endpoint {
    Endpoint {
        ingress_policy: endpoint
            .ingress
            .unwrap_or(netwarden_common::POLICY_NOT_ISOLATED),
        egress_policy: endpoint
            .egress
            .unwrap_or(netwarden_common::POLICY_NOT_ISOLATED),
        state: endpoint_state::READY,
        flags: endpoint_flags(endpoint),
    }
}

/// [`Endpoint::flags`] of `endpoint`, direction by direction.
fn endpoint_flags(endpoint: &LocalEndpoint) -> u32 {
    let sides = [
        (
            direction::INGRESS,
            endpoint.ingress,
            endpoint.ingress_audit,
            &endpoint.ingress_isolated_by,
            &endpoint.ingress_cluster_policies,
        ),
        (
            direction::EGRESS,
            endpoint.egress,
            endpoint.egress_audit,
            &endpoint.egress_isolated_by,
            &endpoint.egress_cluster_policies,
        ),
    ];
    let mut flags = 0;
    for (dir, policy, audit, isolated_by, cluster_policies) in sides {
        if audit {
            flags |= endpoint_flags::audit(dir);
        }
        if policy.is_some() && isolated_by.is_empty() {
            flags |= endpoint_flags::fallback_allow(dir);
        }
        if !cluster_policies.is_empty() {
            flags |= endpoint_flags::tiered(dir);
        }
    }
    flags
}

/// The `ENDPOINTS` value of a pod whose policies did not fit the maps: locked down.
#[must_use]
pub fn locked_endpoint() -> Endpoint {
    Endpoint {
        state: endpoint_state::LOCKED,
        ..Endpoint::default()
    }
}

/// The `ENDPOINTS` value of a veth whose pod the agent does not know yet.
#[must_use]
pub fn unknown_endpoint() -> Endpoint {
    Endpoint {
        state: endpoint_state::UNKNOWN,
        ..Endpoint::default()
    }
}

/// A prefix of a policy's `ipBlock` classes, in the trie of its family, with its LPM prefix
/// length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CidrEntryKey {
    /// A `CIDRS_V4` key.
    V4(u32, CidrKeyV4),
    /// A `CIDRS_V6` key.
    V6(u32, CidrKey),
}

/// The key of `prefix` of policy `policy` in the CIDR trie of its family.
#[must_use]
pub fn cidr_key(policy: PolicyId, prefix: &IpNet) -> CidrEntryKey {
    let policy = policy.to_be_bytes();
    match prefix {
        IpNet::V4(v4) => CidrEntryKey::V4(
            CIDR_KEY_POLICY_BITS + u32::from(v4.prefix_len()),
            CidrKeyV4 {
                policy,
                addr: v4.network().octets(),
            },
        ),
        IpNet::V6(v6) => CidrEntryKey::V6(
            CIDR_KEY_POLICY_BITS + u32::from(v6.prefix_len()),
            CidrKey {
                policy,
                addr: v6.network().octets(),
            },
        ),
    }
}

/// The `FRONTENDS` key of `frontend`.
#[must_use]
pub fn frontend_key(frontend: &Frontend) -> FrontendKey {
    FrontendKey {
        addr: mapped(frontend.address),
        protocol: frontend.protocol.number(),
        padding: 0,
        port: frontend.port,
    }
}

#[cfg(test)]
mod tests {
    use netwarden_common::{CidrKeyV4, IPV4_MAPPED_PREFIX_BITS, ipv4_of_mapped};

    use super::{CidrEntryKey, cidr_key, mapped};

    #[test]
    fn ipv4_prefixes_key_the_ipv4_trie_with_four_byte_addresses() {
        let key = cidr_key(7, &"10.1.0.0/16".parse().expect("a prefix"));
        assert_eq!(
            key,
            CidrEntryKey::V4(
                32 + 16,
                CidrKeyV4 {
                    policy: [0, 0, 0, 7],
                    addr: [10, 1, 0, 0],
                }
            )
        );
        let CidrEntryKey::V6(prefix_len, v6) = cidr_key(7, &"fd00::/8".parse().expect("a prefix"))
        else {
            panic!("an IPv6 prefix keyed the IPv4 trie");
        };
        assert_eq!((prefix_len, v6.addr[0]), (32 + 8, 0xfd));
    }

    #[test]
    fn hash_map_addresses_are_ipv4_mapped_as_the_datapath_reads_them() {
        let v4 = mapped("10.0.0.1".parse().expect("an address"));
        assert_eq!(ipv4_of_mapped(&v4), Some([10, 0, 0, 1]));
        assert_eq!(
            u128::from_be_bytes(v4) >> (128 - IPV4_MAPPED_PREFIX_BITS),
            0xffff
        );
        assert_eq!(
            ipv4_of_mapped(&mapped("fd00::1".parse().expect("an address"))),
            None
        );
    }
}
