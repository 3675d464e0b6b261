//! Crafted packets: datagrams with a forged source address (`send_spoofed`), and ICMP errors
//! quoting a flow (`icmp_error`). Both are sent through raw sockets inside pod namespaces and
//! watched for on the receiving pod, within [`DELIVERY_TIMEOUT`].

use std::{
    io,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd as _,
    time::Duration,
};

use socket2::{Domain, Protocol, SockAddr, Type};
use tokio::{io::unix::AsyncFd, net::UdpSocket, time::timeout};

use crate::netns::Netns;

/// How long a crafted packet may take to arrive before it counts as dropped.
pub const DELIVERY_TIMEOUT: Duration = Duration::from_secs(1);

/// The port the spoofed datagrams go to: no scenario server listens there.
const SPOOF_PORT: u16 = 7999;
const IPPROTO_RAW: i32 = 255;
/// The MTU an ICMP error announces: above the minimum the kernel accepts, below the veth's.
const MTU: u16 = 1400;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ICMP: i32 = 1;
const IPPROTO_ICMPV6: i32 = 58;

/// How a crafted datagram leaves the sender.
#[derive(Clone, Copy, Debug)]
pub enum Framing {
    /// Through a raw IP socket: the sender's stack frames and routes it.
    RawIp,
    /// As an Ethernet frame on the sender's `eth0`, addressed to `gateway` (the MAC of the
    /// veth's host side), inside `tags` VLAN tags of VLAN 0 (priority tags, which the kernel
    /// strips and delivers): 0 sends it untagged.
    Frame { tags: u8, gateway: [u8; 6] },
}

/// The MAC address of `interface` in `netns`.
pub fn interface_mac(netns: &Netns, interface: &str) -> io::Result<[u8; 6]> {
    netns.enter(|| {
        let addresses = nix::ifaddrs::getifaddrs().map_err(io::Error::from)?;
        addresses
            .filter(|address| address.interface_name == interface)
            .find_map(|address| address.address?.as_link_addr()?.addr())
            .ok_or_else(|| io::Error::other(format!("{interface} has no MAC address")))
    })
}

/// Sends a UDP datagram from `sender`'s namespace claiming to come from `source`, to
/// `destination` in `receiver`'s namespace, framed as `framing` says; returns whether it
/// arrived.
pub async fn spoofed_datagram_arrives(
    (sender, source): (&Netns, IpAddr),
    receiver: &Netns,
    destination: IpAddr,
    framing: Framing,
) -> io::Result<bool> {
    let listening = receiver.socket(
        Domain::for_address(SocketAddr::new(destination, 0)),
        Type::DGRAM,
        None,
    )?;
    // The receiver of an earlier family or step may still be closing on this port.
    listening.set_reuse_address(true)?;
    listening.bind(&SocketAddr::new(destination, SPOOF_PORT).into())?;
    let listening = UdpSocket::from_std(listening.into())?;

    let payload = format!("spoofed {}", std::process::id()).into_bytes();
    let mut udp = Vec::with_capacity(8 + payload.len());
    udp.extend(4321_u16.to_be_bytes());
    udp.extend(SPOOF_PORT.to_be_bytes());
    udp.extend(
        u16::try_from(8 + payload.len())
            .unwrap_or(u16::MAX)
            .to_be_bytes(),
    );
    udp.extend([0, 0]);
    udp.extend(&payload);
    let checksum = transport_checksum(source, destination, IPPROTO_UDP, &udp);
    udp[6..8].copy_from_slice(&checksum.to_be_bytes());
    let packet = ip_packet(source, destination, IPPROTO_UDP, &udp);
    match framing {
        Framing::RawIp => {
            // IPPROTO_RAW sockets take the whole IP header from us (IP_HDRINCL /
            // IPV6_HDRINCL are implied), source address included.
            let raw = sender.socket(
                Domain::for_address(SocketAddr::new(destination, 0)),
                Type::RAW,
                Some(Protocol::from(IPPROTO_RAW)),
            )?;
            send_raw(raw, &packet, destination).await?;
        }
        Framing::Frame { tags, gateway } => {
            let ethertype: u16 = if destination.is_ipv4() {
                0x0800
            } else {
                0x86dd
            };
            let mut frame = Vec::with_capacity(14 + 4 * usize::from(tags) + packet.len());
            frame.extend(gateway);
            frame.extend([0x02, 0, 0, 0, 0, 0x01]);
            for _ in 0..tags {
                // 802.1Q, priority 0, VLAN 0.
                frame.extend([0x81, 0x00, 0, 0]);
            }
            frame.extend(ethertype.to_be_bytes());
            frame.extend(&packet);
            send_frame(sender, "eth0", &frame)?;
        }
    }

    let mut buffer = [0_u8; 256];
    let arrival = timeout(DELIVERY_TIMEOUT, async {
        loop {
            let (length, _) = listening.recv_from(&mut buffer).await?;
            if buffer[..length] == payload[..] {
                return Ok::<_, io::Error>(());
            }
        }
    })
    .await;
    match arrival {
        Ok(result) => result.map(|()| true),
        Err(_) => Ok(false),
    }
}

/// The packet an ICMP error quotes: a TCP or UDP packet from `client` to `server`.
#[derive(Clone, Copy, Debug)]
pub struct QuotedPacket {
    pub client: SocketAddr,
    pub server: SocketAddr,
    pub tcp: bool,
}

/// Sends "fragmentation needed" (IPv4) or "packet too big" (IPv6) from `server_ns` to the
/// client of `quoted`, as a router or the server would on a path with a smaller MTU, and
/// returns whether the client's namespace received it.
pub async fn icmp_error_arrives(
    server_ns: &Netns,
    client_ns: &Netns,
    quoted: QuotedPacket,
) -> io::Result<bool> {
    let v4 = quoted.client.is_ipv4();
    let (domain, protocol) = if v4 {
        (Domain::IPV4, IPPROTO_ICMP)
    } else {
        (Domain::IPV6, IPPROTO_ICMPV6)
    };
    let watcher = client_ns.socket(domain, Type::RAW, Some(Protocol::from(protocol)))?;
    let watcher = register(watcher)?;

    let transport_protocol = if quoted.tcp { IPPROTO_TCP } else { IPPROTO_UDP };
    // The quoted packet: its IP header and the first 8 bytes of its transport header, which
    // hold the ports (RFC 792 and RFC 4443 quote at least that much).
    let mut first_bytes = Vec::new();
    first_bytes.extend(quoted.client.port().to_be_bytes());
    first_bytes.extend(quoted.server.port().to_be_bytes());
    first_bytes.extend([0, 0, 0, 1]);
    let original = ip_packet(
        quoted.client.ip(),
        quoted.server.ip(),
        transport_protocol,
        &first_bytes,
    );
    let mut message = if v4 {
        // Type 3 (unreachable), code 4 (fragmentation needed), next-hop MTU.
        let mut message = vec![3, 4, 0, 0, 0, 0];
        message.extend(MTU.to_be_bytes());
        message
    } else {
        // Type 2 (packet too big), code 0, MTU; the kernel fills the ICMPv6 checksum.
        let mut message = vec![2, 0, 0, 0, 0, 0];
        message.extend(MTU.to_be_bytes());
        message
    };
    message.extend(&original);
    if v4 {
        let checksum = internet_checksum(&message, 0);
        message[2..4].copy_from_slice(&checksum.to_be_bytes());
    }
    let sender = server_ns.socket(domain, Type::RAW, Some(Protocol::from(protocol)))?;
    send_raw(sender, &message, quoted.client.ip()).await?;

    let (wanted_type, header_skip) = if v4 { (3_u8, true) } else { (2_u8, false) };
    let received = timeout(DELIVERY_TIMEOUT, async {
        let mut buffer = [0_u8; 2048];
        loop {
            let mut guard = watcher.readable().await?;
            let Ok(result) = guard.try_io(|socket| {
                nix::sys::socket::recv(
                    socket.get_ref().as_raw_fd(),
                    &mut buffer,
                    nix::sys::socket::MsgFlags::empty(),
                )
                .map_err(io::Error::from)
            }) else {
                continue;
            };
            let length = result?;
            let mut icmp = &buffer[..length];
            if header_skip {
                let header_length = usize::from(icmp.first().copied().unwrap_or(0) & 0x0f) * 4;
                icmp = icmp.get(header_length..).unwrap_or_default();
            }
            if icmp.first() == Some(&wanted_type) && icmp.get(8..) == Some(&original[..]) {
                return Ok::<_, io::Error>(());
            }
        }
    })
    .await;
    match received {
        Ok(result) => result.map(|()| true),
        Err(_) => Ok(false),
    }
}

/// Sends `frame` (from its Ethernet header on) out of `interface` in `netns`, through a packet
/// socket: nothing of the sender's stack touches it.
fn send_frame(netns: &Netns, interface: &str, frame: &[u8]) -> io::Result<()> {
    let socket = netns.socket(Domain::PACKET, Type::RAW, None)?;
    let ifindex =
        netns.enter(|| nix::net::if_::if_nametoindex(interface).map_err(io::Error::from))?;
    // SAFETY: `sockaddr_ll` is plain integers and bytes; all zeros is a valid value.
    let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    address.sll_family = u16::try_from(libc::AF_PACKET).unwrap_or_default();
    address.sll_ifindex = i32::try_from(ifindex).map_err(io::Error::other)?;
    address.sll_halen = 6;
    address.sll_addr[..6].copy_from_slice(&frame[..6]);
    let length = u32::try_from(size_of::<libc::sockaddr_ll>()).map_err(io::Error::other)?;
    // SAFETY: the storage is a `sockaddr_ll` of `length` bytes, written above; `try_init`
    // hands the closure storage at least as large as any socket address.
    let ((), address) = unsafe {
        SockAddr::try_init(|storage, storage_length| {
            std::ptr::copy_nonoverlapping(
                (&raw const address).cast::<u8>(),
                storage.cast::<u8>(),
                size_of::<libc::sockaddr_ll>(),
            );
            *storage_length = length;
            Ok(())
        })
    }?;
    let sent = socket.send_to(frame, &address)?;
    if sent == frame.len() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "sent {sent} of {} bytes",
            frame.len()
        )))
    }
}

fn register(socket: socket2::Socket) -> io::Result<AsyncFd<socket2::Socket>> {
    // SAFETY: a `Socket` owns its descriptor and always returns that same descriptor from
    // `as_raw_fd`, for as long as it lives; the `AsyncFd` owns the `Socket`.
    unsafe { AsyncFd::register(socket) }.map_err(|error| error.into_parts().1)
}

async fn send_raw(socket: socket2::Socket, packet: &[u8], to: IpAddr) -> io::Result<()> {
    let socket = register(socket)?;
    let to = SockAddr::from(SocketAddr::new(to, 0));
    loop {
        let mut guard = socket.writable().await?;
        if let Ok(result) = guard.try_io(|socket| socket.get_ref().send_to(packet, &to)) {
            return result.map(drop);
        }
    }
}

/// An IPv4 or IPv6 header (no options or extension headers) followed by `payload`.
fn ip_packet(source: IpAddr, destination: IpAddr, protocol: u8, payload: &[u8]) -> Vec<u8> {
    let mut packet = Vec::with_capacity(40 + payload.len());
    match (source, destination) {
        (IpAddr::V4(source), IpAddr::V4(destination)) => {
            let total = u16::try_from(20 + payload.len()).unwrap_or(u16::MAX);
            packet.extend([0x45, 0]);
            packet.extend(total.to_be_bytes());
            packet.extend([0x12, 0x34, 0x40, 0, 64, protocol, 0, 0]);
            packet.extend(source.octets());
            packet.extend(destination.octets());
            let checksum = internet_checksum(&packet, 0);
            packet[10..12].copy_from_slice(&checksum.to_be_bytes());
        }
        (source, destination) => {
            let to_v6 = |address: IpAddr| match address {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            let length = u16::try_from(payload.len()).unwrap_or(u16::MAX);
            packet.extend([0x60, 0, 0, 0]);
            packet.extend(length.to_be_bytes());
            packet.extend([protocol, 64]);
            packet.extend(to_v6(source).octets());
            packet.extend(to_v6(destination).octets());
        }
    }
    packet.extend(payload);
    packet
}

/// The UDP/TCP checksum over the pseudo-header and `segment` (checksum field zero).
fn transport_checksum(source: IpAddr, destination: IpAddr, protocol: u8, segment: &[u8]) -> u16 {
    let mut pseudo = Vec::new();
    match (source, destination) {
        (IpAddr::V4(source), IpAddr::V4(destination)) => {
            pseudo.extend(source.octets());
            pseudo.extend(destination.octets());
            pseudo.extend([0, protocol]);
            pseudo.extend(
                u16::try_from(segment.len())
                    .unwrap_or(u16::MAX)
                    .to_be_bytes(),
            );
        }
        (source, destination) => {
            for address in [source, destination] {
                match address {
                    IpAddr::V4(v4) => pseudo.extend(v4.to_ipv6_mapped().octets()),
                    IpAddr::V6(v6) => pseudo.extend(v6.octets()),
                }
            }
            pseudo.extend(
                u32::try_from(segment.len())
                    .unwrap_or(u32::MAX)
                    .to_be_bytes(),
            );
            pseudo.extend([0, 0, 0, protocol]);
        }
    }
    let partial = sum_words(&pseudo, 0);
    let checksum = internet_checksum(segment, partial);
    // UDP sends a computed zero as all ones (zero means "no checksum").
    if checksum == 0 { 0xffff } else { checksum }
}

fn sum_words(bytes: &[u8], mut sum: u32) -> u32 {
    for chunk in bytes.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], chunk.get(1).copied().unwrap_or(0)]);
        sum += u32::from(word);
    }
    sum
}

/// RFC 1071.
fn internet_checksum(bytes: &[u8], initial: u32) -> u16 {
    let mut sum = sum_words(bytes, initial);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).unwrap_or(u16::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_header_checksum_verifies_to_zero() {
        let packet = ip_packet(
            "10.0.0.1".parse().expect("an address"),
            "10.0.0.2".parse().expect("an address"),
            IPPROTO_UDP,
            &[1, 2, 3, 4],
        );
        assert_eq!(internet_checksum(&packet[..20], 0), 0);
    }

    #[test]
    fn checksum_of_rfc1071_example() {
        // RFC 1071 section 3: the sum of 0001 f203 f4f5 f6f7 is ddf2, so the checksum is 220d.
        assert_eq!(
            internet_checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7], 0),
            0x220d
        );
    }
}
