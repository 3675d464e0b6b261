//! The hook after translation: the policy decision for flows the node's netfilter rewrote.
//!
//! kube-proxy translates a Service's address to a backend pod in the node's netfilter (nat
//! PREROUTING), after the pod's `from_container` program has seen the packet, and
//! masquerades some sources (hairpin, NodePort, off-cluster clients) in nat POSTROUTING,
//! before `to_container` sees it. NetworkPolicy applies to the pods a flow really reaches, so
//! such flows are decided here, on the node's netfilter hooks after all NAT (POSTROUTING and
//! `LOCAL_IN`, after source NAT: the agent attaches it, `netwarden-datapath/src/netfilter.rs`),
//! from the kernel conntrack entry, which holds the flow both as it was sent (original tuple)
//! and as it was delivered (reply tuple):
//!
//! 1. Only packets in the original direction of their kernel connection are looked at, and of
//!    an answered connection only those that were translated (whose flow this hook tracks);
//!    replies belong to flows decided on their first packets and pass through the pods' own
//!    programs (their conntrack).
//! 2. Egress: the original source is a local pod, and the original destination is a Service
//!    frontend (`FRONTENDS`: `from_container` let the packet on undecided) or was translated
//!    (a frontend the agent does not know yet): the source pod's egress policy decides on the
//!    backend the flow was translated to (the reply tuple's source).
//! 3. Ingress: the flow was translated (destination or source) and its backend is a local pod:
//!    the backend's ingress policy decides on the original client, not on the masqueraded
//!    address its own program will see.
//! 4. A flow allowed on its kernel connection's first packets is tracked under the keys the
//!    pods' programs will look up (the frontend, the masqueraded address), marked translated,
//!    with the peer it was judged on in `TRANSLATIONS`: its next packets take the fast path,
//!    and after a policy change it is decided again on that same peer. Where the key already
//!    names that peer (the backend's side of a flow whose client nothing masqueraded, a flow
//!    conntrack does not follow) it is tracked as any flow, with no translation to record.
//!    A denied one drops.
//! 5. A translated connection this hook let through is remembered with the policy epoch it
//!    was judged under (`JUDGED_CONNECTIONS`). Its later packets in the original
//!    direction pass on that alone while the epoch is current, without copying the tuples and
//!    repeating steps 2 to 4 (which would find the flow tracked and pass it). Sound because an
//!    `nf_conn` is reused only for a new kernel connection, whose first packet (new or related,
//!    never established) this hook judges in full, after the entry was written: allowed, it was
//!    allowed under an epoch at least as recent; denied, it never becomes established.
//!
//! Kernel structures are read with `bpf_probe_read_kernel` at offsets the agent takes from the
//! kernel's BTF (`KERNEL_LAYOUT`): programs are built once for every kernel.

use aya_ebpf::{
    helpers::{bpf_probe_read_kernel, bpf_probe_read_kernel_buf},
    macros::map,
    maps::{Array, PerCpuArray},
};
use netwarden_common::{
    FlowKey, FlowState, KernelLayout, Translation, conntrack_tuple, counter, direction,
    flow_activity, maps,
};

use crate::{
    conntrack,
    endpoints::{self, endpoint_of},
    exit::{self, Attribution},
    frontends::frontend_of,
    mtls,
    packet::{IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP},
    settings,
    verdict::{Decision, decide, is_allowed, opening_port, policy_of},
};

/// Netfilter's verdicts.
const NF_DROP: i32 = 0;
const NF_ACCEPT: i32 = 1;

/// `enum ip_conntrack_info`: a packet of a connection's first direction once it was answered
/// (`IP_CT_ESTABLISHED`) or before (`IP_CT_NEW`); values from `IP_CT_IS_REPLY` (3) on are
/// replies; `IP_CT_UNTRACKED` (7) is a packet conntrack was told to leave alone.
const IP_CT_ESTABLISHED: u64 = 0;
const IP_CT_NEW: u64 = 2;
const IP_CT_IS_REPLY: u64 = 3;
const IP_CT_UNTRACKED: u64 = 7;
/// The low bits of `skb->_nfct` that hold the ctinfo.
const NFCT_INFO_MASK: u64 = 7;
/// `enum ip_conntrack_status`: source and destination were translated.
const IPS_SRC_NAT: u64 = 1 << 4;
const IPS_DST_NAT: u64 = 1 << 5;
/// Address families in a conntrack tuple.
const AF_INET: u16 = 2;

/// The context of a `BPF_PROG_TYPE_NETFILTER` program (`struct bpf_nf_ctx`).
#[repr(C)]
pub struct NfContext {
    /// `const struct nf_hook_state *`.
    state: u64,
    /// `struct sk_buff *`.
    skb: u64,
}

/// Where the kernel's fields lie (see `KernelLayout`).
#[map]
static KERNEL_LAYOUT: Array<KernelLayout> = Array::pinned(maps::KERNEL_LAYOUT.capacity, 0);
pinned_as!(KERNEL_LAYOUT);

/// A kernel connection's two tuples, copied out of the kernel: as the flow was sent
/// (`original`) and as it is answered (`reply`; its source is where the flow was delivered);
/// and room for the flow keys built from them.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Tuples {
    original: [u8; conntrack_tuple::SIZE],
    reply: [u8; conntrack_tuple::SIZE],
    /// The flow as an endpoint's program sees it.
    key: FlowKey,
    /// The same flow with the peer it is judged on.
    judged: FlowKey,
    /// The conntrack state and translation written for an allowed flow.
    state: FlowState,
    translation: Translation,
}

/// Step 5 of the module comment: slots of translated kernel connections this hook let through,
/// shared by all CPUs (a connection's packets in one direction are not all handled on one: a
/// per-CPU cache missed about once per connection in `cargo xtask bench datapath`'s Service
/// row), each one aligned word, which every CPU loads and stores whole, so no run reads half of
/// another's write: a tag of the `nf_conn`'s address in the high half, the policy epoch in the
/// low. A slot is overwritten by the next connection that hashes to it, whose first packets are
/// then judged in full again. Not pinned: a new load starts with empty slots
/// (`maps::UNPINNED`).
#[map]
static JUDGED_CONNECTIONS: Array<u64> =
    Array::with_max_entries(maps::JUDGED_CONNECTIONS.capacity, 0);
pinned_as!(JUDGED_CONNECTIONS);

/// The slot of kernel connection `conn` in [`JUDGED_CONNECTIONS`] and what it holds when the
/// connection was judged under `epoch`. Fibonacci hashing: the slot from the bits just below
/// the product's top half (they mix the address's low 32 bits, which tell slab objects apart),
/// the tag from its top half (which mixes every bit).
#[inline(always)]
fn judged_slot(conn: u64, epoch: u32) -> (u32, u64) {
    const SLOT_BITS: u32 = maps::JUDGED_CONNECTIONS.capacity.trailing_zeros();
    const _: () = assert!(maps::JUDGED_CONNECTIONS.capacity.is_power_of_two());
    let mixed = conn.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    #[expect(
        clippy::cast_possible_truncation,
        reason = "SLOT_BITS bits of the product, and its top half"
    )]
    let (slot, tag) = (
        ((mixed >> (32 - SLOT_BITS)) as u32) & (maps::JUDGED_CONNECTIONS.capacity - 1),
        (mixed >> 32) as u32,
    );
    (slot, u64::from(tag) << 32 | u64::from(epoch))
}

/// Per-CPU room for [`Tuples`]: a BPF program has 512 bytes of stack for all its frames
/// together, and the decision below is three calls deep.
#[map]
static TUPLES: PerCpuArray<Tuples> = PerCpuArray::pinned(maps::TUPLES.capacity, 0);
pinned_as!(TUPLES);

/// One side of a connection: an address (IPv4-mapped for IPv4) and a port (0 for protocols
/// without ports).
#[derive(Clone, Copy)]
struct AddressPort {
    addr: [u8; 16],
    port: u16,
}

/// The hook's entry point: [`NF_ACCEPT`] or [`NF_DROP`].
#[inline(always)]
pub fn hook(ctx: *const NfContext) -> i32 {
    // SAFETY: the verifier lets a netfilter program load its context's two pointers; a plain
    // load, where a helper call would cost every packet on the node's routing path.
    let skb = unsafe { core::ptr::read_volatile(&raw const (*ctx).skb) };
    let Some(layout) = KERNEL_LAYOUT.get(0).copied() else {
        return NF_ACCEPT;
    };
    if layout.valid == 0 {
        // The agent attaches the hook only after writing the layout.
        return NF_ACCEPT;
    }
    let Ok(nfct) = read::<u64>(skb, layout.skb_nfct) else {
        return unreadable();
    };
    let ctinfo = nfct & NFCT_INFO_MASK;
    let conn = nfct & !NFCT_INFO_MASK;
    if conn == 0 || ctinfo == IP_CT_UNTRACKED {
        return untracked(skb, &layout);
    }
    if ctinfo >= IP_CT_IS_REPLY {
        return NF_ACCEPT;
    }
    let Ok(status) = read::<u64>(conn, layout.conn_status) else {
        return unreadable();
    };
    let translated = status & (IPS_SRC_NAT | IPS_DST_NAT) != 0;
    if !translated && (ctinfo != IP_CT_NEW || !settings::frontends_installed()) {
        // Nothing translated it: its pods' programs decided it, unless it is the first
        // packet of a flow `from_container` left undecided for a frontend, which it does only
        // while one is installed.
        return NF_ACCEPT;
    }
    let epoch = settings::current_epoch();
    let (slot, remembered) = judged_slot(conn, epoch);
    if translated
        && ctinfo == IP_CT_ESTABLISHED
        && JUDGED_CONNECTIONS.get(slot).copied() == Some(remembered)
    {
        return NF_ACCEPT;
    }
    let Some(tuples) = TUPLES.get_ptr_mut(0) else {
        return unreadable();
    };
    // SAFETY: per-CPU slot of a successful lookup; only this CPU uses it, for this packet.
    let tuples = unsafe { &mut *tuples };
    let original = conn + u64::from(layout.conn_original_tuple & 0xffff);
    let reply = conn + u64::from(layout.conn_reply_tuple & 0xffff);
    // SAFETY: bpf_probe_read_kernel reads any kernel address safely, failing on a bad one.
    let copied = unsafe {
        bpf_probe_read_kernel_buf(original as *const u8, &mut tuples.original).is_ok()
            && bpf_probe_read_kernel_buf(reply as *const u8, &mut tuples.reply).is_ok()
    };
    if !copied {
        return unreadable();
    }
    let verdict = decide_seen(
        tuples,
        status & IPS_DST_NAT != 0,
        translated,
        ctinfo == IP_CT_NEW,
        epoch,
    );
    if verdict == NF_ACCEPT
        && translated
        && let Some(entry) = JUDGED_CONNECTIONS.get_ptr_mut(slot)
    {
        // Remembered under the epoch it was decided under.
        // SAFETY: a slot of a successful lookup (array values live as long as the map), written
        // in one aligned store, so a run on another CPU reads the old word or the new one.
        unsafe { core::ptr::write_volatile(entry, remembered) };
    }
    verdict
}

/// Steps 2 to 4 of the module comment for a connection with `tuples`. Not inlined: each step
/// needs a stack frame of its own to stay within the 512 bytes a program may use.
#[inline(never)]
fn decide_seen(
    tuples: &mut Tuples,
    destination_translated: bool,
    translated: bool,
    may_open: bool,
    epoch: u32,
) -> i32 {
    let protocol = tuples.original[conntrack_tuple::PROTOCOL];
    let family = u16::from_ne_bytes([
        tuples.original[conntrack_tuple::FAMILY],
        tuples.original[conntrack_tuple::FAMILY + 1],
    ]);
    let sent_to = tuple_endpoint(&tuples.original, family, protocol, false);
    let frontend = frontend_of(&sent_to.addr, protocol, sent_to.port);
    let client = tuple_endpoint(&tuples.original, family, protocol, true);
    if (frontend != 0 || destination_translated)
        && let Some(ifindex) = endpoint_of(&client.addr)
    {
        tuples.key = flow_key(ifindex, protocol, &client, &sent_to);
        let backend = tuple_endpoint(&tuples.reply, family, protocol, true);
        tuples.judged = flow_key(ifindex, protocol, &client, &backend);
        if !judge(tuples, direction::EGRESS, frontend, may_open, epoch) {
            return NF_DROP;
        }
    }
    if !translated {
        return NF_ACCEPT;
    }
    let backend = tuple_endpoint(&tuples.reply, family, protocol, true);
    if let Some(ifindex) = endpoint_of(&backend.addr) {
        let client_as_seen = tuple_endpoint(&tuples.reply, family, protocol, false);
        tuples.key = flow_key(ifindex, protocol, &backend, &client_as_seen);
        tuples.judged = flow_key(ifindex, protocol, &backend, &client);
        if !judge(tuples, direction::INGRESS, frontend, may_open, epoch) {
            return NF_DROP;
        }
    }
    NF_ACCEPT
}

/// Decides the flow `tuples.key` (as its endpoint's program sees it) in `dir` as
/// `tuples.judged` (the same flow with the peer it is judged on); tracks it when allowed and
/// `may_open`, under policy `epoch`. Whether it is allowed. Not inlined (see above).
#[inline(never)]
fn judge(tuples: &Tuples, dir: u32, frontend: u32, may_open: bool, epoch: u32) -> bool {
    let key = &tuples.key;
    let judged = &tuples.judged;
    // Judged on the peer its endpoint sees (a backend reached by a client nothing
    // masqueraded, a flow conntrack does not follow): tracked like any flow, with no
    // translation to record, one insert fewer on a connection's first packet.
    let translated = key.peer_port != judged.peer_port || key.peer_addr != judged.peer_addr;
    if let Some(tracked) = conntrack::entry(key) {
        // SAFETY: the pointer comes from a successful lookup; the kernel frees a map value only
        // after every program that may hold it has returned (RCU). Plain word accesses, as on
        // the classifiers' fast path.
        let tracked = unsafe { &mut *tracked };
        if tracked.epoch == epoch
            && (tracked.activity & flow_activity::TRANSLATED != 0) == translated
            && (!may_open || conntrack::continues_judged(tracked, key, judged, dir, translated))
        {
            return true;
        }
    }
    let attribution = |policy, rule| Attribution {
        policy,
        rule,
        frontend,
    };
    let Some(endpoint) = endpoints::endpoint(key.ifindex) else {
        exit::drop_flow(
            judged,
            dir,
            counter::DENIED_ENDPOINT_NOT_READY,
            &attribution(0, 0),
            NF_DROP,
        );
        return false;
    };
    let policy = policy_of(&endpoint, dir);
    let Decision { reason, rule } = decide(&endpoint, dir, judged, opening_port(judged, dir));
    if !is_allowed(reason) {
        conntrack::remove(key);
        exit::drop_flow(judged, dir, reason, &attribution(policy, rule), NF_DROP);
        return false;
    }
    if !may_open {
        exit::pass(reason, dir, NF_ACCEPT);
        return true;
    }
    let Some(scratch) = TUPLES.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: per-CPU slot of a successful lookup; only this CPU uses it, for this packet
    // (the same slot `tuples` points to: only fields `tuples` is not read through change).
    let scratch = unsafe { &mut *scratch };
    if translated {
        scratch.translation = Translation {
            peer_addr: judged.peer_addr,
            peer_port: judged.peer_port,
            padding: 0,
            frontend,
        };
        // The translation first: a packet that finds the flow finds what it was judged on.
        conntrack::record_translation(key, &scratch.translation);
    }
    scratch.state = FlowState {
        origin: dir,
        epoch,
        flags: mtls::flags_for_new_flow(key, dir),
        activity: if translated {
            flow_activity::TRANSLATED
        } else {
            0
        },
        last_seen: conntrack::now_ticks(),
        client_seq: 0,
        hello_end: 0,
    };
    conntrack::insert(key, &scratch.state);
    exit::pass_new_flow(judged, dir, reason, &attribution(policy, rule), NF_ACCEPT);
    true
}

/// A packet conntrack does not follow: nothing translated it, but `from_container` may have
/// let it on undecided because its destination is a frontend. Decided here on its own
/// destination; tracked like any flow when it may open one.
#[inline(never)]
fn untracked(skb: u64, layout: &KernelLayout) -> i32 {
    if !settings::frontends_installed() {
        return NF_ACCEPT;
    }
    let (Ok(head), Ok(network_header)) = (
        read::<u64>(skb, layout.skb_head),
        read::<u16>(skb, layout.skb_network_header),
    ) else {
        return unreadable();
    };
    let ip = head + u64::from(network_header);
    let Ok(first) = read::<[u8; 40]>(ip, 0) else {
        return unreadable();
    };
    let (protocol, source, destination, l4) = match first[0] >> 4 {
        4 => {
            let fragment_offset = u16::from_be_bytes([first[6], first[7]]) & 0x1fff;
            if fragment_offset != 0 {
                // No ports: `from_container` did not take it for a frontend's.
                return NF_ACCEPT;
            }
            let l4 = Some(ip + u64::from(first[0] & 0x0f) * 4);
            let mut source = [0_u8; 16];
            let mut destination = [0_u8; 16];
            mapped_v4(&mut source, [first[12], first[13], first[14], first[15]]);
            mapped_v4(
                &mut destination,
                [first[16], first[17], first[18], first[19]],
            );
            (first[9], source, destination, l4)
        }
        6 => {
            let mut source = [0_u8; 16];
            let mut destination = [0_u8; 16];
            source.copy_from_slice(&first[8..24]);
            // The first 40 bytes were read; the destination's last 16 follow.
            let Ok(rest) = read::<[u8; 16]>(ip, 24) else {
                return unreadable();
            };
            destination.copy_from_slice(&rest);
            // Extension headers are not walked here: `from_container` did, and may have let
            // such a packet on undecided; from a local pod it drops below.
            let l4 = (!matches!(first[6], 0 | 43 | 44 | 51 | 60)).then_some(ip + 40);
            (first[6], source, destination, l4)
        }
        _ => return NF_ACCEPT,
    };
    let Some(ifindex) = endpoint_of(&source) else {
        return NF_ACCEPT;
    };
    let Some(l4) = l4 else {
        // Ports behind extension headers this hook does not walk: fail closed.
        return unreadable();
    };
    if !matches!(protocol, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP) {
        // No ports, no frontend: `from_container` decided it.
        return NF_ACCEPT;
    }
    let Ok(ports) = read::<[u8; 14]>(l4, 0) else {
        return unreadable();
    };
    let client = AddressPort {
        addr: source,
        port: u16::from_be_bytes([ports[0], ports[1]]),
    };
    let frontend_endpoint = AddressPort {
        addr: destination,
        port: u16::from_be_bytes([ports[2], ports[3]]),
    };
    let frontend = frontend_of(&destination, protocol, frontend_endpoint.port);
    if frontend == 0 {
        return NF_ACCEPT;
    }
    // Only the first packet of a TCP handshake may open a flow (see `packet::Opening`).
    let may_open = protocol != IPPROTO_TCP || ports[13] & 0x12 == 0x02;
    let Some(tuples) = TUPLES.get_ptr_mut(0) else {
        return unreadable();
    };
    // SAFETY: per-CPU slot of a successful lookup; only this CPU uses it, for this packet.
    let tuples = unsafe { &mut *tuples };
    tuples.key = flow_key(ifindex, protocol, &client, &frontend_endpoint);
    tuples.judged = tuples.key;
    if judge(
        tuples,
        direction::EGRESS,
        frontend,
        may_open,
        settings::current_epoch(),
    ) {
        NF_ACCEPT
    } else {
        NF_DROP
    }
}

/// A flow this hook must decide whose kernel state it could not read: dropped and counted.
#[inline(always)]
fn unreadable() -> i32 {
    exit::drop_unreported(
        counter::DENIED_UNREADABLE_TRANSLATION,
        direction::EGRESS,
        NF_DROP,
    )
}

/// The flow an endpoint's program sees for a packet between `pod` and `peer`.
#[inline(always)]
fn flow_key(ifindex: u32, protocol: u8, pod: &AddressPort, peer: &AddressPort) -> FlowKey {
    FlowKey::new(
        ifindex,
        protocol,
        (pod.addr, pod.port),
        (peer.addr, peer.port),
    )
}

/// The source (`source`) or destination of a conntrack tuple, IPv4-mapped for IPv4; ports
/// only for the protocols whose ports policy speaks of.
#[inline(always)]
fn tuple_endpoint(
    tuple: &[u8; conntrack_tuple::SIZE],
    family: u16,
    protocol: u8,
    source: bool,
) -> AddressPort {
    let (addr_at, port_at) = if source {
        (conntrack_tuple::SRC_ADDR, conntrack_tuple::SRC_PORT)
    } else {
        (conntrack_tuple::DST_ADDR, conntrack_tuple::DST_PORT)
    };
    let mut addr = [0_u8; 16];
    if family == AF_INET {
        mapped_v4(
            &mut addr,
            [
                tuple[addr_at],
                tuple[addr_at + 1],
                tuple[addr_at + 2],
                tuple[addr_at + 3],
            ],
        );
    } else {
        addr.copy_from_slice(&tuple[addr_at..addr_at + 16]);
    }
    let port = if matches!(protocol, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP) {
        u16::from_be_bytes([tuple[port_at], tuple[port_at + 1]])
    } else {
        0
    };
    AddressPort { addr, port }
}

#[inline(always)]
fn mapped_v4(addr: &mut [u8; 16], v4: [u8; 4]) {
    addr[10] = 0xff;
    addr[11] = 0xff;
    addr[12..].copy_from_slice(&v4);
}

/// Reads a `T` at `offset` past the kernel address `base`.
#[inline(always)]
fn read<T>(base: u64, offset: u32) -> Result<T, i32> {
    // Offsets come from a map; masking them keeps the address arithmetic bounded for the
    // verifier. No kernel structure read here is anywhere near 64 KiB.
    let address = base + u64::from(offset & 0xffff);
    // SAFETY: bpf_probe_read_kernel reads any kernel address safely, failing on a bad one.
    unsafe { bpf_probe_read_kernel(address as *const T) }
}
