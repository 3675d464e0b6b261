//! The servers every pod runs, inside the harness process: sockets are created in the pod's
//! namespace and driven by the harness's runtime, so a pod costs no process.
//!
//! Every answer names the pod and port, so a probe can tell that the intended server answered
//! and not some other one the traffic was redirected to. A DNS pod's container ports `dns` (UDP)
//! and `dns-tcp` (TCP) serve the cluster DNS instead (`dns`).

use std::{
    io,
    net::{IpAddr, SocketAddr},
};

use socket2::{Domain, Socket, Type};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{TcpListener, TcpStream, UdpSocket},
    task::JoinHandle,
};

use crate::{
    dns::{self, Zone},
    netns::Netns,
    node::Addresses,
    scenario::{ContainerPort, Protocol},
    sctp::{Chunk, RawSctpSocket},
};

#[derive(Debug, thiserror::Error)]
#[error("cannot serve {protocol}/{port} on {address} for {identity}: {source}")]
pub struct ServerError {
    identity: String,
    protocol: Protocol,
    port: u16,
    address: IpAddr,
    source: io::Error,
}

/// The running servers of one pod or host; dropping them closes every socket.
#[derive(Debug, Default)]
pub struct Servers {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Servers {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Starts a server for every port on every address of the endpoint named `identity`; with a
/// `dns` zone (a DNS pod), its `dns` and `dns-tcp` ports answer DNS queries from it.
pub fn start(
    netns: &Netns,
    identity: &str,
    addresses: &Addresses,
    ports: &[ContainerPort],
    dns: Option<&Zone>,
) -> Result<Servers, ServerError> {
    let mut servers = Servers::default();
    for address in addresses.all() {
        for port in ports {
            let error = |source| ServerError {
                identity: identity.to_owned(),
                protocol: port.protocol,
                port: port.container_port,
                address,
                source,
            };
            let local = SocketAddr::new(address, port.container_port);
            let task = match (port.protocol, port.name.as_deref(), dns) {
                (Protocol::Udp, Some(dns::UDP_PORT_NAME), Some(zone)) => tokio::spawn(
                    dns::serve_udp(bind_udp(netns, local).map_err(error)?, zone.clone()),
                ),
                (Protocol::Tcp, Some(dns::TCP_PORT_NAME), Some(zone)) => tokio::spawn(
                    dns::serve_tcp(listen_tcp(netns, local).map_err(error)?, zone.clone()),
                ),
                (Protocol::Tcp, ..) => tokio::spawn(serve_tcp(
                    listen_tcp(netns, local).map_err(error)?,
                    identity.to_owned(),
                )),
                (Protocol::Udp, ..) => tokio::spawn(serve_udp(
                    bind_udp(netns, local).map_err(error)?,
                    identity.to_owned(),
                )),
                // One raw socket per address answers every SCTP port, below.
                (Protocol::Sctp, ..) => continue,
            };
            servers.tasks.push(task);
        }
        let sctp_ports: Vec<u16> = ports
            .iter()
            .filter(|port| port.protocol == Protocol::Sctp)
            .map(|port| port.container_port)
            .collect();
        if let Some(&first) = sctp_ports.first() {
            let socket = RawSctpSocket::open(netns, address).map_err(|source| ServerError {
                identity: identity.to_owned(),
                protocol: Protocol::Sctp,
                port: first,
                address,
                source,
            })?;
            servers
                .tasks
                .push(tokio::spawn(serve_sctp(socket, sctp_ports)));
        }
    }
    Ok(servers)
}

fn bound_socket(netns: &Netns, local: SocketAddr, kind: Type) -> io::Result<Socket> {
    let socket = netns.socket(Domain::for_address(local), kind, None)?;
    if local.is_ipv6() {
        // The IPv4 address has its own socket.
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.bind(&local.into())?;
    Ok(socket)
}

fn listen_tcp(netns: &Netns, local: SocketAddr) -> io::Result<TcpListener> {
    let socket = bound_socket(netns, local, Type::STREAM)?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

fn bind_udp(netns: &Netns, local: SocketAddr) -> io::Result<UdpSocket> {
    UdpSocket::from_std(bound_socket(netns, local, Type::DGRAM)?.into())
}

async fn serve_tcp(listener: TcpListener, identity: String) {
    let port = listener.local_addr().map_or(0, |local| local.port());
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(answer_lines(stream, format!("{identity} TCP {port}")));
    }
}

async fn answer_lines(stream: TcpStream, prefix: String) {
    let (reader, mut writer) = stream.into_split();
    let mut lines = BufReader::new(reader).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if writer
            .write_all(format!("{prefix} {line}\n").as_bytes())
            .await
            .is_err()
        {
            return;
        }
    }
}

async fn serve_udp(socket: UdpSocket, identity: String) {
    let port = socket.local_addr().map_or(0, |local| local.port());
    let mut buffer = vec![0u8; 65_536];
    loop {
        let Ok((length, peer)) = socket.recv_from(&mut buffer).await else {
            continue;
        };
        let answer = format!(
            "{identity} UDP {port} {}",
            String::from_utf8_lossy(&buffer[..length])
        );
        let _ = socket.send_to(answer.as_bytes(), peer).await;
    }
}

async fn serve_sctp(socket: RawSctpSocket, ports: Vec<u16>) {
    loop {
        let Ok((peer, packet)) = socket.recv().await else {
            continue;
        };
        if !ports.contains(&packet.destination_port)
            || !matches!(packet.chunks.first(), Some(Chunk::Init(_)))
        {
            continue;
        }
        let cookie = format!("netwarden-e2e {peer} {}", packet.source_port).into_bytes();
        if let Some(answer) = packet.init_ack_for(fastrand::u32(1..), cookie) {
            let _ = socket.send(peer, &answer).await;
        }
    }
}
