//! Just enough SCTP (RFC 9260) to tell whether an association could start: INIT and INIT-ACK
//! chunks, the common header and its CRC-32C checksum.
//!
//! The test kernel has no SCTP module, so both ends speak it over raw IP sockets. IPv4 raw
//! sockets deliver the IP header in front of the packet; [`strip_ipv4_header`] removes it.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::fd::AsRawFd as _,
};

use nix::sys::socket::{SockaddrStorage, recvfrom};
use socket2::{Domain, SockAddr, Socket, Type};
use tokio::io::unix::AsyncFd;

use crate::netns::Netns;

/// IP protocol number of SCTP.
pub const IPPROTO_SCTP: i32 = 132;

const COMMON_HEADER_LEN: usize = 12;
const CHUNK_INIT: u8 = 1;
const CHUNK_INIT_ACK: u8 = 2;
const PARAM_STATE_COOKIE: u16 = 7;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SctpError {
    #[error("packet of {0} bytes is shorter than the SCTP common header")]
    Short(usize),
    #[error("checksum {found:#010x} does not match the content ({computed:#010x})")]
    Checksum { found: u32, computed: u32 },
    #[error("chunk at offset {0} runs past the end of the packet")]
    ChunkLength(usize),
    #[error("{0} chunk is too short")]
    ChunkBody(&'static str),
    #[error("not an IPv4 packet carrying SCTP")]
    NotIpv4Sctp,
}

/// The fields of INIT and INIT-ACK that matter here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InitFields {
    pub initiate_tag: u32,
    pub a_rwnd: u32,
    pub outbound_streams: u16,
    pub inbound_streams: u16,
    pub initial_tsn: u32,
}

impl InitFields {
    /// Fields for a new association with the given tag.
    #[must_use]
    pub fn new(initiate_tag: u32) -> Self {
        Self {
            initiate_tag,
            a_rwnd: 65_535,
            outbound_streams: 10,
            inbound_streams: 10,
            initial_tsn: initiate_tag ^ 0x5a5a_5a5a,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Chunk {
    Init(InitFields),
    InitAck {
        fields: InitFields,
        state_cookie: Vec<u8>,
    },
    Other {
        kind: u8,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    pub source_port: u16,
    pub destination_port: u16,
    pub verification_tag: u32,
    pub chunks: Vec<Chunk>,
}

impl Packet {
    /// An INIT from `source_port` to `destination_port` (verification tag 0, as RFC 9260 requires).
    #[must_use]
    pub fn init(source_port: u16, destination_port: u16, initiate_tag: u32) -> Self {
        Self {
            source_port,
            destination_port,
            verification_tag: 0,
            chunks: vec![Chunk::Init(InitFields::new(initiate_tag))],
        }
    }

    /// The INIT-ACK answering this packet's INIT, if it is one.
    #[must_use]
    pub fn init_ack_for(&self, initiate_tag: u32, state_cookie: Vec<u8>) -> Option<Self> {
        let Some(Chunk::Init(init)) = self.chunks.first() else {
            return None;
        };
        Some(Self {
            source_port: self.destination_port,
            destination_port: self.source_port,
            verification_tag: init.initiate_tag,
            chunks: vec![Chunk::InitAck {
                fields: InitFields::new(initiate_tag),
                state_cookie,
            }],
        })
    }

    /// The wire form, checksum included.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(&self.source_port.to_be_bytes());
        out.extend_from_slice(&self.destination_port.to_be_bytes());
        out.extend_from_slice(&self.verification_tag.to_be_bytes());
        out.extend_from_slice(&[0; 4]);
        for chunk in &self.chunks {
            encode_chunk(chunk, &mut out);
        }
        let checksum = crc32c::crc32c(&out);
        // The CRC32c is stored least significant byte first (RFC 9260 appendix A).
        out[8..12].copy_from_slice(&checksum.to_le_bytes());
        out
    }

    /// Parses a packet, rejecting it when the checksum is wrong.
    pub fn decode(bytes: &[u8]) -> Result<Self, SctpError> {
        if bytes.len() < COMMON_HEADER_LEN {
            return Err(SctpError::Short(bytes.len()));
        }
        let found = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
        let mut zeroed = bytes.to_vec();
        zeroed[8..12].fill(0);
        let computed = crc32c::crc32c(&zeroed);
        if found != computed {
            return Err(SctpError::Checksum { found, computed });
        }
        let mut chunks = Vec::new();
        let mut offset = COMMON_HEADER_LEN;
        while offset + 4 <= bytes.len() {
            let kind = bytes[offset];
            let length = usize::from(be16(bytes, offset + 2));
            if length < 4 || offset + length > bytes.len() {
                return Err(SctpError::ChunkLength(offset));
            }
            chunks.push(decode_chunk(kind, &bytes[offset + 4..offset + length])?);
            offset += length.next_multiple_of(4);
        }
        Ok(Self {
            source_port: be16(bytes, 0),
            destination_port: be16(bytes, 2),
            verification_tag: be32(bytes, 4),
            chunks,
        })
    }
}

fn encode_chunk(chunk: &Chunk, out: &mut Vec<u8>) {
    let start = out.len();
    let (kind, fields, cookie) = match chunk {
        Chunk::Init(fields) => (CHUNK_INIT, fields, None),
        Chunk::InitAck {
            fields,
            state_cookie,
        } => (CHUNK_INIT_ACK, fields, Some(state_cookie)),
        Chunk::Other { kind } => {
            out.extend_from_slice(&[*kind, 0, 0, 4]);
            return;
        }
    };
    out.extend_from_slice(&[kind, 0, 0, 0]);
    out.extend_from_slice(&fields.initiate_tag.to_be_bytes());
    out.extend_from_slice(&fields.a_rwnd.to_be_bytes());
    out.extend_from_slice(&fields.outbound_streams.to_be_bytes());
    out.extend_from_slice(&fields.inbound_streams.to_be_bytes());
    out.extend_from_slice(&fields.initial_tsn.to_be_bytes());
    if let Some(cookie) = cookie {
        let length = u16::try_from(4 + cookie.len()).expect("state cookie fits a parameter");
        out.extend_from_slice(&PARAM_STATE_COOKIE.to_be_bytes());
        out.extend_from_slice(&length.to_be_bytes());
        out.extend_from_slice(cookie);
    }
    // The chunk length excludes the final padding; the padding itself is always present.
    let length = u16::try_from(out.len() - start).expect("chunk fits its length field");
    out[start + 2..start + 4].copy_from_slice(&length.to_be_bytes());
    out.resize(out.len().next_multiple_of(4), 0);
}

fn decode_chunk(kind: u8, body: &[u8]) -> Result<Chunk, SctpError> {
    let name = match kind {
        CHUNK_INIT => "INIT",
        CHUNK_INIT_ACK => "INIT-ACK",
        _ => return Ok(Chunk::Other { kind }),
    };
    if body.len() < 16 {
        return Err(SctpError::ChunkBody(name));
    }
    let fields = InitFields {
        initiate_tag: be32(body, 0),
        a_rwnd: be32(body, 4),
        outbound_streams: be16(body, 8),
        inbound_streams: be16(body, 10),
        initial_tsn: be32(body, 12),
    };
    if kind == CHUNK_INIT {
        return Ok(Chunk::Init(fields));
    }
    let mut state_cookie = Vec::new();
    let mut offset = 16;
    while offset + 4 <= body.len() {
        let parameter = be16(body, offset);
        let length = usize::from(be16(body, offset + 2));
        if length < 4 || offset + length > body.len() {
            return Err(SctpError::ChunkBody(name));
        }
        if parameter == PARAM_STATE_COOKIE {
            state_cookie = body[offset + 4..offset + length].to_vec();
        }
        offset += length.next_multiple_of(4);
    }
    Ok(Chunk::InitAck {
        fields,
        state_cookie,
    })
}

fn be16(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([bytes[at], bytes[at + 1]])
}

fn be32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// Source, destination and SCTP payload of a packet read from an IPv4 raw socket.
pub fn strip_ipv4_header(bytes: &[u8]) -> Result<(Ipv4Addr, Ipv4Addr, &[u8]), SctpError> {
    if bytes.len() < 20 || bytes[0] >> 4 != 4 || i32::from(bytes[9]) != IPPROTO_SCTP {
        return Err(SctpError::NotIpv4Sctp);
    }
    let header_len = usize::from(bytes[0] & 0x0f) * 4;
    if header_len < 20 || bytes.len() < header_len {
        return Err(SctpError::NotIpv4Sctp);
    }
    let source = Ipv4Addr::new(bytes[12], bytes[13], bytes[14], bytes[15]);
    let destination = Ipv4Addr::new(bytes[16], bytes[17], bytes[18], bytes[19]);
    Ok((source, destination, &bytes[header_len..]))
}

/// A raw SCTP socket in a namespace, bound to one local address so that the kernel delivers
/// only packets for that address. It still sees every association to that address: callers
/// filter by ports and tags.
#[derive(Debug)]
pub struct RawSctpSocket {
    socket: AsyncFd<Socket>,
    local: IpAddr,
}

impl RawSctpSocket {
    pub fn open(netns: &Netns, local: IpAddr) -> io::Result<Self> {
        let domain = Domain::for_address(SocketAddr::new(local, 0));
        let socket = netns.socket(
            domain,
            Type::RAW,
            Some(socket2::Protocol::from(IPPROTO_SCTP)),
        )?;
        socket.bind(&SocketAddr::new(local, 0).into())?;
        // SAFETY: a `Socket` owns its descriptor and always returns that same descriptor from
        // `as_raw_fd`, for as long as it lives; the `AsyncFd` owns the `Socket`.
        let socket = unsafe { AsyncFd::register(socket) }.map_err(|error| error.into_parts().1)?;
        Ok(Self { socket, local })
    }

    /// The next valid SCTP packet for the local address, with its source address. Packets that
    /// do not parse or fail the checksum are dropped, as an SCTP stack would.
    pub async fn recv(&self) -> io::Result<(IpAddr, Packet)> {
        let mut buffer = vec![0u8; 2048];
        loop {
            let mut guard = self.socket.readable().await?;
            let received = guard.try_io(|socket| {
                recvfrom::<SockaddrStorage>(socket.as_raw_fd(), &mut buffer)
                    .map_err(io::Error::from)
            });
            let Ok(result) = received else { continue };
            let (length, from) = result?;
            let bytes = &buffer[..length];
            let parsed = match self.local {
                IpAddr::V4(local) => match strip_ipv4_header(bytes) {
                    Ok((source, destination, payload)) if destination == local => {
                        Packet::decode(payload).map(|packet| (IpAddr::V4(source), packet))
                    }
                    _ => continue,
                },
                IpAddr::V6(_) => {
                    let Some(source) = from
                        .as_ref()
                        .and_then(|from| from.as_sockaddr_in6())
                        .map(nix::sys::socket::SockaddrIn6::ip)
                    else {
                        continue;
                    };
                    Packet::decode(bytes).map(|packet| (IpAddr::V6(source), packet))
                }
            };
            if let Ok(parsed) = parsed {
                return Ok(parsed);
            }
        }
    }

    pub async fn send(&self, to: IpAddr, packet: &Packet) -> io::Result<()> {
        let bytes = packet.encode();
        let to = SockAddr::from(SocketAddr::new(to, 0));
        loop {
            let mut guard = self.socket.writable().await?;
            if let Ok(result) = guard.try_io(|socket| socket.get_ref().send_to(&bytes, &to)) {
                return result.map(drop);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn init_round_trips_with_a_valid_checksum() {
        let init = Packet::init(40_000, 80, 0xdead_beef);
        let bytes = init.encode();
        assert_eq!(bytes.len(), 12 + 20);
        assert_eq!(&bytes[..4], &[0x9c, 0x40, 0x00, 0x50]);
        assert_eq!(
            &bytes[4..8],
            &[0, 0, 0, 0],
            "INIT carries verification tag 0"
        );
        assert_eq!(&bytes[12..16], &[1, 0, 0, 20]);
        assert_eq!(Packet::decode(&bytes).unwrap(), init);
    }

    #[test]
    fn init_ack_answers_with_the_peer_tag_and_a_cookie() {
        let init = Packet::init(40_000, 81, 0x0102_0304);
        let ack = init.init_ack_for(0x0a0b_0c0d, b"cookie!".to_vec()).unwrap();
        assert_eq!(
            (ack.source_port, ack.destination_port, ack.verification_tag),
            (81, 40_000, 0x0102_0304)
        );
        let bytes = ack.encode();
        assert_eq!(bytes.len() % 4, 0);
        // Chunk length: 4 header + 16 fixed + 4 parameter header + 7 cookie bytes, padding excluded.
        assert_eq!(u16::from_be_bytes([bytes[14], bytes[15]]), 31);
        let decoded = Packet::decode(&bytes).unwrap();
        assert_eq!(decoded, ack);
        let Chunk::InitAck {
            fields,
            state_cookie,
        } = &decoded.chunks[0]
        else {
            panic!("{decoded:?}")
        };
        assert_eq!(fields.initiate_tag, 0x0a0b_0c0d);
        assert_eq!(state_cookie, b"cookie!");
        assert!(
            ack.init_ack_for(1, Vec::new()).is_none(),
            "only an INIT is answered"
        );
    }

    #[test]
    fn corrupted_packets_are_rejected() {
        let mut bytes = Packet::init(1, 2, 3).encode();
        bytes[20] ^= 1;
        assert!(matches!(
            Packet::decode(&bytes),
            Err(SctpError::Checksum { .. })
        ));
        assert_eq!(Packet::decode(&bytes[..8]), Err(SctpError::Short(8)));
        let mut bad_length = Packet::init(1, 2, 3).encode();
        bad_length[14..16].copy_from_slice(&200u16.to_be_bytes());
        let checksum = {
            let mut zeroed = bad_length.clone();
            zeroed[8..12].fill(0);
            crc32c::crc32c(&zeroed)
        };
        bad_length[8..12].copy_from_slice(&checksum.to_le_bytes());
        assert_eq!(Packet::decode(&bad_length), Err(SctpError::ChunkLength(12)));
    }

    #[test]
    fn checksum_is_stored_little_endian() {
        let bytes = Packet::init(5000, 80, 1).encode();
        let mut zeroed = bytes.clone();
        zeroed[8..12].fill(0);
        assert_eq!(bytes[8..12], crc32c::crc32c(&zeroed).to_le_bytes());
    }

    #[test]
    fn ipv4_header_is_stripped() {
        let payload = Packet::init(1, 2, 3).encode();
        let mut packet = vec![
            0x45, 0, 0, 0, 0, 0, 0, 0, 64, 132, 0, 0, 10, 244, 0, 11, 10, 244, 0, 12,
        ];
        packet.extend_from_slice(&payload);
        let (source, destination, rest) = strip_ipv4_header(&packet).unwrap();
        assert_eq!(
            (source, destination),
            (Ipv4Addr::new(10, 244, 0, 11), Ipv4Addr::new(10, 244, 0, 12))
        );
        assert_eq!(rest, payload.as_slice());
        packet[9] = 6;
        assert_eq!(strip_ipv4_header(&packet), Err(SctpError::NotIpv4Sctp));
    }
}
