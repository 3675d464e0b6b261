//! CIDR classes: `ipBlock` rules turned into one LPM lookup.
//!
//! For the addresses of one policy's `ipBlock` rules, let P be every `cidr` and every `except`.
//! The LPM trie holds each q in P, mapped to the set of rules r with `r.cidr ⊇ q` and no
//! `e ∈ r.except` with `e ⊇ q`. For an address a whose longest match in P is q, every prefix of
//! P that holds a also holds q (prefixes holding one address are nested), so that set is exactly
//! the rules whose block holds a and whose excepts do not. An except that no other rule covers
//! still gets its own (empty) entry, or the lookup would fall back to the enclosing block.
//!
//! Each family has its trie (`CIDRS_V4`, `CIDRS_V6`), and containment is per family: an IPv6
//! block such as `::/0` never holds an IPv4 address. The IPv4 root is still added to P whenever
//! the policy has IPv6 blocks (the empty class, unless an IPv4 block is the root): a leftover of the single trie IPv4 once
//! shared as IPv4-mapped IPv6, where it kept `::/0` from matching IPv4 addresses. With a trie
//! per family an IPv4 address without an IPv4 prefix finds no class and is denied just the
//! same; the entry stays because dropping it changes the compiled content, and with it the
//! policy ids pinned by running agents.

use std::collections::{BTreeMap, BTreeSet};

use ipnet::{IpNet, Ipv4Net};

/// One `ipBlock` of one rule.
#[derive(Clone, Debug)]
pub struct Block {
    /// The block.
    pub cidr: IpNet,
    /// Its excepts.
    pub except: Vec<IpNet>,
}

/// Every prefix the trie needs, with the indexes (into `blocks`) of the blocks that hold it.
#[must_use]
pub fn classes(blocks: &[Block]) -> BTreeMap<IpNet, BTreeSet<usize>> {
    let mut prefixes: BTreeSet<IpNet> = BTreeSet::new();
    for block in blocks {
        prefixes.insert(block.cidr);
        prefixes.extend(block.except.iter().copied());
    }
    if prefixes.iter().any(|prefix| matches!(prefix, IpNet::V6(_))) {
        prefixes.insert(IpNet::V4(Ipv4Net::default()));
    }
    prefixes
        .into_iter()
        .map(|prefix| {
            let holders = blocks
                .iter()
                .enumerate()
                .filter(|(_, block)| {
                    contains(&block.cidr, &prefix)
                        && !block.except.iter().any(|except| contains(except, &prefix))
                })
                .map(|(index, _)| index)
                .collect();
            (prefix, holders)
        })
        .collect()
}

/// Whether `outer` holds all of `inner`, within one address family.
fn contains(outer: &IpNet, inner: &IpNet) -> bool {
    match (outer, inner) {
        (IpNet::V4(outer), IpNet::V4(inner)) => outer.contains(inner),
        (IpNet::V6(outer), IpNet::V6(inner)) => outer.contains(inner),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::{Block, classes};

    fn net(text: &str) -> ipnet::IpNet {
        text.parse().unwrap()
    }

    #[test]
    fn an_address_excepted_by_one_rule_but_allowed_by_another_keeps_the_other() {
        let blocks = [
            Block {
                cidr: net("10.0.0.0/16"),
                except: vec![net("10.0.1.0/24")],
            },
            Block {
                cidr: net("10.0.1.0/24"),
                except: vec![],
            },
            Block {
                cidr: net("10.0.0.0/8"),
                except: vec![net("10.0.2.0/24")],
            },
        ];
        let classes = classes(&blocks);
        assert_eq!(classes[&net("10.0.0.0/16")], BTreeSet::from([0, 2]));
        assert_eq!(classes[&net("10.0.1.0/24")], BTreeSet::from([1, 2]));
        assert_eq!(classes[&net("10.0.2.0/24")], BTreeSet::from([0]));
        assert_eq!(classes[&net("10.0.0.0/8")], BTreeSet::from([2]));
    }

    #[test]
    fn ipv6_blocks_never_hold_ipv4_addresses() {
        let classes = classes(&[Block {
            cidr: net("::/0"),
            except: vec![],
        }]);
        assert_eq!(classes[&net("0.0.0.0/0")], BTreeSet::new());
        assert_eq!(classes[&net("::/0")], BTreeSet::from([0]));
    }
}
