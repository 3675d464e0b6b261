//! The policy lookup's maps: who a peer is, and what each policy allows it.
//!
//! ```text
//! IPCACHE   hash  IpKey { address (16 B, IPv4-mapped) }             -> identity
//! CIDRS_V4  LPM   CidrKeyV4 { policy (32 bits), address (32 bits) }  -> CIDR class
//! CIDRS_V6  LPM   CidrKey   { policy (32 bits), address (128 bits) } -> CIDR class
//! POLICY    LPM   PolicyKey { policy (32), peer (32), protocol (8), port (16) } -> PolicyEntry
//! POLICY_EXACT   hash  PolicyKey (all of it)                       -> PolicyEntry
//! CIDRS_V4_EXACT hash  CidrKeyV4 (all of it)                       -> CIDR class
//! ```
//!
//! All LPM keys are big-endian and looked up fully specified (`CIDR_KEY_V4_FULL_BITS`,
//! `CIDR_KEY_FULL_BITS`, `POLICY_KEY_FULL_BITS`). What an entry may leave out:
//!
//! - `IPCACHE` is exact: one pod address (its label set's identity) or one of the node's
//!   (`IDENTITY_HOST`). Anything else is `IDENTITY_WORLD`, which no `POLICY` entry names:
//!   rules for every peer are compiled as `0.0.0.0/0` and `::/0` blocks.
//! - `CIDRS_V4`/`CIDRS_V6` never wildcard the policy id; the address may stop at any prefix
//!   length. The longest match is the class: the exact set of the policy's `ipBlock` rules
//!   whose `cidr` holds the address and whose `except` does not. A class is a peer id with
//!   `CIDR_CLASS_FLAG` set, so it never collides with an identity.
//! - `POLICY` never wildcards the policy id or the peer; an entry may stop after the peer
//!   (every protocol and port), after the protocol (every port), or inside the port (an aligned
//!   port range, which is how `endPort` ranges are stored).
//! - `POLICY_EXACT` holds the entries that stop nowhere (one protocol and port, what most rules
//!   compile to), which the agent writes there rather than into `POLICY` while it has room;
//!   `CIDRS_V4_EXACT` likewise holds `CIDRS_V4`'s single addresses (`/32` blocks). No key is
//!   longer than such an entry's, so when the hash holds the key looked up it is the longest
//!   match; when it does not, the longest match is the trie's, which holds every other entry. A
//!   lookup that hits pays one hash instead of a walk down the trie, a node for each bit that
//!   tells its keys apart.
//!
//! Precedence, in the order `verdict::decide` asks:
//!
//! 1. `POLICY[(policy, IPCACHE[peer], protocol, port)]` (skipped for `IDENTITY_WORLD`);
//! 2. `POLICY[(policy, CIDRS_Vx[(policy, peer)], protocol, port)]`.
//!
//! Within one `POLICY` lookup the trie returns the longest entry; the compiler gave every entry
//! the decision of the rules covering all of it, so the longest one is the whole answer for its
//! peer kind. An entry holds two [`netwarden_common::TierMatch`]es: the first Admin
//! ClusterNetworkPolicy rule that matches, and the first match of the tier below (a
//! NetworkPolicy allow, or a Baseline rule). The rule that matches first overall may come from
//! either lookup, so `verdict::decide` takes the lower rank of the two, tier by tier. A
//! direction no ClusterNetworkPolicy selects has no Admin or Baseline matches: there an identity
//! entry that allows ends the decision, as before the tiers. The CIDR path applies to pod
//! addresses too, so `ipBlock` and `networks` semantics stay exact whatever identity an address
//! has. See `netwarden_common::{PolicyKey, CidrKey, CidrKeyV4, PolicyEntry}` for the layouts.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{HashMap, LpmTrie, lpm_trie::Key},
};
use netwarden_common::{
    CIDR_KEY_FULL_BITS, CIDR_KEY_V4_FULL_BITS, CidrClass, CidrKey, CidrKeyV4, IDENTITY_WORLD,
    IpIdentity, IpKey, POLICY_KEY_FULL_BITS, PeerId, PolicyEntry, PolicyKey, ipv4_of_mapped, maps,
};

#[map]
static IPCACHE: HashMap<IpKey, IpIdentity> =
    HashMap::pinned(maps::IPCACHE.capacity, BPF_F_NO_PREALLOC);
pinned_as!(IPCACHE);

#[map]
static POLICY: LpmTrie<PolicyKey, PolicyEntry> = LpmTrie::pinned(maps::POLICY.capacity, 0);
pinned_as!(POLICY);

#[map]
static POLICY_EXACT: HashMap<PolicyKey, PolicyEntry> =
    HashMap::pinned(maps::POLICY_EXACT.capacity, BPF_F_NO_PREALLOC);
pinned_as!(POLICY_EXACT);

#[map]
static CIDRS_V4: LpmTrie<CidrKeyV4, CidrClass> = LpmTrie::pinned(maps::CIDRS_V4.capacity, 0);
pinned_as!(CIDRS_V4);

#[map]
static CIDRS_V4_EXACT: HashMap<CidrKeyV4, CidrClass> =
    HashMap::pinned(maps::CIDRS_V4_EXACT.capacity, BPF_F_NO_PREALLOC);
pinned_as!(CIDRS_V4_EXACT);

#[map]
static CIDRS_V6: LpmTrie<CidrKey, CidrClass> = LpmTrie::pinned(maps::CIDRS_V6.capacity, 0);
pinned_as!(CIDRS_V6);

/// The agent's record of which label set got which identity (SHA-256 of the set -> identity).
/// The programs never read it; it is pinned with the other maps so a restarted agent hands out
/// the same identities and its first update is not a renumbering of the whole cluster.
#[map]
static IDENTITIES: HashMap<[u8; 32], u32> =
    HashMap::pinned(maps::IDENTITIES.capacity, BPF_F_NO_PREALLOC);
pinned_as!(IDENTITIES);

/// The identity of the peer at `addr`: its pod's, the node's, or `IDENTITY_WORLD`.
#[inline(always)]
pub(crate) fn peer_identity(addr: &[u8; 16]) -> PeerId {
    IPCACHE
        .get_ptr(IpKey { addr: *addr })
        // SAFETY: the pointer comes from a successful lookup and is read at once.
        .map_or(IDENTITY_WORLD, |found| unsafe { (*found).identity })
}

/// The CIDR class of `addr` in `policy`, from the trie of the address's family.
#[inline(always)]
pub(crate) fn cidr_class(policy: u32, addr: &[u8; 16]) -> Option<PeerId> {
    let packed = cidr_class_packed(policy, addr);
    (packed != NO_CLASS).then_some(packed as PeerId)
}

/// [`cidr_class`] when there is none: above every `u32`.
const NO_CLASS: u64 = 1 << 32;

/// [`cidr_class`] in one register ([`NO_CLASS`]: none): not inlined, so that its keys (up to
/// 24 bytes) have a frame beside the decision's rather than inside it, where the hook after
/// translation's deepest call chain would pass the 512 bytes of stack a program may use.
#[inline(never)]
fn cidr_class_packed(policy: u32, addr: &[u8; 16]) -> u64 {
    cidr_class_in_frame(policy, addr).map_or(NO_CLASS, u64::from)
}

#[inline(always)]
fn cidr_class_in_frame(policy: u32, addr: &[u8; 16]) -> Option<PeerId> {
    let class = match ipv4_of_mapped(addr) {
        Some(v4) => {
            let key = Key::new(
                CIDR_KEY_V4_FULL_BITS,
                CidrKeyV4 {
                    policy: policy.to_be_bytes(),
                    addr: v4,
                },
            );
            #[expect(
                clippy::needless_borrows_for_generic_args,
                reason = "borrowed, the trie's key is the hash's: no second copy on the stack"
            )]
            // SAFETY: as in `policy_entry`: an element of a map that is not preallocated,
            // whole until this run returns.
            let exact = unsafe { CIDRS_V4_EXACT.get(&key.data) };
            exact.or_else(|| CIDRS_V4.get(&key))
        }
        None => CIDRS_V6.get(Key::new(
            CIDR_KEY_FULL_BITS,
            CidrKey {
                policy: policy.to_be_bytes(),
                addr: *addr,
            },
        )),
    };
    class.map(|class| class.peer)
}

/// The longest entry matching, if any: the exact one from `POLICY_EXACT`, else the longest
/// in `POLICY`. The map's value, read in place (a copy would cost the decision's frame 16
/// bytes per lookup).
#[inline(always)]
pub(crate) fn policy_entry(
    policy: u32,
    peer: PeerId,
    protocol: u8,
    port: u16,
) -> Option<&'static PolicyEntry> {
    let key = Key::new(
        POLICY_KEY_FULL_BITS,
        PolicyKey::new(policy, peer, protocol, port),
    );
    #[expect(
        clippy::needless_borrows_for_generic_args,
        reason = "by value the key would be copied into a frame of its own, past the 512 bytes \
                  of stack the hook after translation may use; borrowed, the trie's key is it"
    )]
    // SAFETY: the map is not preallocated, so the kernel writes an update into a new element
    // and frees the old one, like a deleted one, only after every program that may hold it
    // has returned (RCU): the value read in place is whole for this run.
    let exact = unsafe { POLICY_EXACT.get(&key.data) };
    if let Some(exact) = exact {
        return Some(exact);
    }
    POLICY.get(&key)
}
