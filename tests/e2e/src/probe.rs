//! Clients: one-shot dials for probes, and long-lived flows for `open_connection`.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use socket2::{Domain, Socket, Type};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader, Lines},
    net::{
        TcpSocket, UdpSocket,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::{mpsc, oneshot},
    task::JoinHandle,
    time::{MissedTickBehavior, interval, timeout},
};

use crate::{
    netns::Netns,
    scenario::Protocol,
    sctp::{Chunk, Packet, RawSctpSocket},
};

/// How long one attempt may take before the traffic counts as blocked.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);
/// How often an open flow exchanges a line.
const FLOW_INTERVAL: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("no answer within {}s", ATTEMPT_TIMEOUT.as_secs_f32())]
    Timeout,
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("unexpected answer {0:?}")]
    WrongAnswer(String),
    #[error("the connection is closed")]
    Closed,
}

/// What the client side needs: its namespace and its own address in the dialled family.
#[derive(Clone, Copy, Debug)]
pub struct Client<'a> {
    pub netns: &'a Netns,
    pub address: IpAddr,
}

/// The dialled server: its address and port, and who must answer.
#[derive(Clone, Copy, Debug)]
pub struct Server<'a> {
    pub address: SocketAddr,
    pub answerer: Answerer<'a>,
}

/// Who may answer a dial.
#[derive(Clone, Copy, Debug)]
pub enum Answerer<'a> {
    /// This pod or host, serving the dialled port itself (a pod's own address, or a per-pod
    /// Service whose ports are the container ports).
    Exactly(&'a str),
    /// Any of these pods, on whichever port it serves (a Service's endpoints behind a
    /// translation that may change the port).
    AnyOf(&'a [String]),
}

impl Answerer<'_> {
    /// Whether `answer` is the reply of a right server to `line`.
    fn answered(self, protocol: Protocol, port: u16, line: &str, answer: &str) -> bool {
        match self {
            Self::Exactly(identity) => answer == format!("{identity} {protocol} {port} {line}"),
            Self::AnyOf(identities) => identities.iter().any(|identity| {
                answer
                    .strip_prefix(&format!("{identity} {protocol} "))
                    .and_then(|rest| rest.split_once(' '))
                    .is_some_and(|(served, echoed)| served.parse::<u16>().is_ok() && echoed == line)
            }),
        }
    }

    /// Whether `answer` comes from a right server at all (maybe to an earlier line).
    fn is_server_of(self, protocol: Protocol, answer: &str) -> bool {
        match self {
            Self::Exactly(identity) => answer.starts_with(&format!("{identity} {protocol}")),
            Self::AnyOf(identities) => identities
                .iter()
                .any(|identity| answer.starts_with(&format!("{identity} {protocol}"))),
        }
    }
}

/// One attempt to reach `server` from `client`.
pub async fn dial(
    client: Client<'_>,
    server: Server<'_>,
    protocol: Protocol,
) -> Result<(), DialError> {
    let attempt = async {
        match protocol {
            Protocol::Tcp => dial_tcp(client, server, None).await,
            Protocol::Udp => dial_udp(client, server).await,
            Protocol::Sctp => dial_sctp(client, server).await,
        }
    };
    timeout(ATTEMPT_TIMEOUT, attempt)
        .await
        .unwrap_or(Err(DialError::Timeout))
}

fn nonce() -> String {
    format!("{:016x}", fastrand::u64(..))
}

fn answered(server: Server<'_>, protocol: Protocol, line: &str, answer: &str) -> bool {
    server
        .answerer
        .answered(protocol, server.address.port(), line, answer)
}

async fn connect_tcp(
    client: Client<'_>,
    server: Server<'_>,
    source_port: Option<u16>,
) -> Result<(Lines<BufReader<OwnedReadHalf>>, OwnedWriteHalf), DialError> {
    let socket = client
        .netns
        .socket(Domain::for_address(server.address), Type::STREAM, None)?;
    if let Some(port) = source_port {
        socket.set_reuse_address(true)?;
        // Linger 0: the close resets at once (no `TIME_WAIT` keeps the next attempt from the
        // same addresses and ports), without blocking the thread.
        socket.set_linger(Some(Duration::ZERO))?;
        socket.bind(&SocketAddr::new(client.address, port).into())?;
    }
    let stream = TcpSocket::from_std_stream(socket.into())
        .connect(server.address)
        .await?;
    let (reader, writer) = stream.into_split();
    Ok((BufReader::new(reader).lines(), writer))
}

async fn dial_tcp(
    client: Client<'_>,
    server: Server<'_>,
    source_port: Option<u16>,
) -> Result<(), DialError> {
    let (mut lines, mut writer) = connect_tcp(client, server, source_port).await?;
    let line = format!("probe {}", nonce());
    writer.write_all(format!("{line}\n").as_bytes()).await?;
    let answer = lines.next_line().await?.ok_or(DialError::Closed)?;
    if answered(server, Protocol::Tcp, &line, &answer) {
        Ok(())
    } else {
        Err(DialError::WrongAnswer(answer))
    }
}

/// One TCP attempt from `client`'s address and `port`, closed with a RST so that the next
/// attempt may reuse the same addresses and ports at once.
pub async fn dial_tcp_from_port(
    client: Client<'_>,
    server: Server<'_>,
    port: u16,
) -> Result<(), DialError> {
    timeout(ATTEMPT_TIMEOUT, dial_tcp(client, server, Some(port)))
        .await
        .unwrap_or(Err(DialError::Timeout))
}

async fn connect_udp(client: Client<'_>, server: Server<'_>) -> Result<UdpSocket, DialError> {
    let socket: Socket =
        client
            .netns
            .socket(Domain::for_address(server.address), Type::DGRAM, None)?;
    let socket = UdpSocket::from_std(socket.into())?;
    socket.connect(server.address).await?;
    Ok(socket)
}

/// Sends `line` and waits for its echo, skipping late echoes of earlier lines.
async fn exchange_udp(socket: &UdpSocket, server: Server<'_>, line: &str) -> Result<(), DialError> {
    socket.send(line.as_bytes()).await?;
    let mut buffer = vec![0u8; 2048];
    loop {
        let length = socket.recv(&mut buffer).await?;
        let answer = String::from_utf8_lossy(&buffer[..length]);
        if answered(server, Protocol::Udp, line, &answer) {
            return Ok(());
        }
        if !server.answerer.is_server_of(Protocol::Udp, &answer) {
            return Err(DialError::WrongAnswer(answer.into_owned()));
        }
    }
}

async fn dial_udp(client: Client<'_>, server: Server<'_>) -> Result<(), DialError> {
    let socket = connect_udp(client, server).await?;
    exchange_udp(&socket, server, &format!("probe {}", nonce())).await
}

async fn dial_sctp(client: Client<'_>, server: Server<'_>) -> Result<(), DialError> {
    let socket = RawSctpSocket::open(client.netns, client.address)?;
    let source_port = fastrand::u16(32_768..61_000);
    let tag = fastrand::u32(1..);
    socket
        .send(
            server.address.ip(),
            &Packet::init(source_port, server.address.port(), tag),
        )
        .await?;
    loop {
        let (from, packet) = socket.recv().await?;
        let ours = from == server.address.ip()
            && packet.source_port == server.address.port()
            && packet.destination_port == source_port
            && packet.verification_tag == tag;
        if ours && matches!(packet.chunks.first(), Some(Chunk::InitAck { .. })) {
            return Ok(());
        }
    }
}

/// A long-lived TCP connection or UDP flow that exchanges a line every 100 ms.
#[derive(Debug)]
pub struct Flow {
    checks: mpsc::Sender<oneshot::Sender<bool>>,
    task: JoinHandle<()>,
    /// The client's end.
    pub local: SocketAddr,
    /// The server's end.
    pub remote: SocketAddr,
    pub protocol: Protocol,
}

impl Drop for Flow {
    fn drop(&mut self) {
        self.task.abort();
    }
}

enum FlowSocket {
    Tcp {
        lines: Lines<BufReader<OwnedReadHalf>>,
        writer: OwnedWriteHalf,
    },
    Udp(UdpSocket),
}

impl FlowSocket {
    /// One request/answer within the attempt timeout. Timeouts leave the flow usable (the
    /// traffic may just be dropped for now); other errors end it.
    async fn exchange(
        &mut self,
        identity: &str,
        port: u16,
        sequence: u64,
    ) -> Result<(), DialError> {
        let line = format!("flow {sequence}");
        let attempt = async {
            match self {
                Self::Tcp { lines, writer } => {
                    writer.write_all(format!("{line}\n").as_bytes()).await?;
                    let expected = format!("{identity} TCP {port} {line}");
                    // Answers to exchanges that timed out earlier may still arrive first.
                    loop {
                        let answer = lines.next_line().await?.ok_or(DialError::Closed)?;
                        if answer == expected {
                            return Ok(());
                        }
                    }
                }
                Self::Udp(socket) => {
                    let address = SocketAddr::new(socket.peer_addr()?.ip(), port);
                    let answerer = Answerer::Exactly(identity);
                    exchange_udp(socket, Server { address, answerer }, &line).await
                }
            }
        };
        timeout(ATTEMPT_TIMEOUT, attempt)
            .await
            .unwrap_or(Err(DialError::Timeout))
    }
}

impl Flow {
    /// Opens the flow; the first exchange must succeed.
    pub async fn open(
        client: Client<'_>,
        server: Server<'_>,
        protocol: Protocol,
    ) -> Result<Self, DialError> {
        let (mut socket, local) = match protocol {
            Protocol::Tcp => {
                let (lines, writer) = timeout(ATTEMPT_TIMEOUT, connect_tcp(client, server, None))
                    .await
                    .unwrap_or(Err(DialError::Timeout))?;
                let local = writer.local_addr()?;
                (FlowSocket::Tcp { lines, writer }, local)
            }
            Protocol::Udp => {
                let socket = connect_udp(client, server).await?;
                let local = socket.local_addr()?;
                (FlowSocket::Udp(socket), local)
            }
            Protocol::Sctp => {
                return Err(DialError::Io(io::Error::from(io::ErrorKind::Unsupported)));
            }
        };
        let Answerer::Exactly(identity) = server.answerer else {
            return Err(DialError::Io(io::Error::from(io::ErrorKind::Unsupported)));
        };
        let identity = identity.to_owned();
        let port = server.address.port();
        socket.exchange(&identity, port, 0).await?;
        let (checks, mut requests) = mpsc::channel::<oneshot::Sender<bool>>(4);
        let task = tokio::spawn(async move {
            let mut sequence = 0;
            let mut ticks = interval(FLOW_INTERVAL);
            ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
            loop {
                sequence += 1;
                tokio::select! {
                    _ = ticks.tick() => {
                        if let Err(DialError::Io(_) | DialError::Closed | DialError::WrongAnswer(_)) =
                            socket.exchange(&identity, port, sequence).await
                        {
                            return;
                        }
                    }
                    Some(reply) = requests.recv() => {
                        let result = socket.exchange(&identity, port, sequence).await;
                        let _ = reply.send(result.is_ok());
                        if result.is_err_and(|error| !matches!(error, DialError::Timeout)) {
                            return;
                        }
                    }
                }
            }
        });
        Ok(Self {
            checks,
            task,
            local,
            remote: server.address,
            protocol,
        })
    }

    /// Whether a fresh exchange succeeds now (within the attempt timeout).
    pub async fn check(&self) -> bool {
        let (reply, answer) = oneshot::channel();
        if self.checks.send(reply).await.is_err() {
            return false;
        }
        answer.await.unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_must_come_from_the_right_server_for_this_line() {
        let exact = Answerer::Exactly("x/a");
        assert!(exact.answered(Protocol::Tcp, 80, "probe 1", "x/a TCP 80 probe 1"));
        assert!(!exact.answered(Protocol::Tcp, 80, "probe 1", "x/a TCP 81 probe 1"));
        assert!(!exact.answered(Protocol::Tcp, 80, "probe 1", "x/b TCP 80 probe 1"));
        assert!(!exact.answered(Protocol::Tcp, 80, "probe 1", "x/a TCP 80 probe 0"));
        let endpoints = ["web/a".to_owned(), "web/b".to_owned()];
        let any = Answerer::AnyOf(&endpoints);
        // Behind a Service the answering pod serves its own (target) port, not the dialled one.
        assert!(any.answered(Protocol::Udp, 53, "probe 2", "web/b UDP 5353 probe 2"));
        assert!(!any.answered(Protocol::Udp, 53, "probe 2", "web/c UDP 5353 probe 2"));
        assert!(!any.answered(Protocol::Udp, 53, "probe 2", "web/a TCP 5353 probe 2"));
        assert!(!any.answered(Protocol::Udp, 53, "probe 2", "web/a UDP x probe 2"));
        assert!(any.is_server_of(Protocol::Udp, "web/a UDP 5353 probe 1"));
        assert!(!any.is_server_of(Protocol::Udp, "db/a UDP 5353 probe 1"));
    }
}
