//! A Check client over the agent's Unix socket, for proxies written in Rust, the e2e harness's
//! test proxy and the benchmark.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use envoy_types::{
    ext_authz::v3::pb::CheckRequest,
    pb::envoy::{
        config::core::v3::{
            Address, SocketAddress, address::Address as AnyAddress, socket_address::PortSpecifier,
        },
        service::auth::v3::{AttributeContext, attribute_context::Peer, authorization_client},
    },
};
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

use crate::IdentityError;

/// A connected Check client.
pub type CheckClient = authorization_client::AuthorizationClient<Channel>;

/// Connects to the Check server on the Unix socket at `path`.
pub async fn connect_unix(path: &Path) -> Result<CheckClient, IdentityError> {
    let socket: PathBuf = path.to_owned();
    // The URI is required by the API and ignored by the connector.
    let channel = Endpoint::from_static("http://[::]:50051")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
        .map_err(|error| IdentityError::Connect {
            address: path.display().to_string(),
            reason: error.to_string(),
        })?;
    Ok(authorization_client::AuthorizationClient::new(channel))
}

/// The request a proxy sends for a connection from `source` to `destination` whose peer
/// presented `principal` (empty: none).
#[must_use]
pub fn check_request(source: SocketAddr, destination: SocketAddr, principal: &str) -> CheckRequest {
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(Peer {
                address: Some(socket_address(source)),
                principal: principal.to_owned(),
                ..Peer::default()
            }),
            destination: Some(Peer {
                address: Some(socket_address(destination)),
                ..Peer::default()
            }),
            ..AttributeContext::default()
        }),
    }
}

fn socket_address(address: SocketAddr) -> Address {
    Address {
        address: Some(AnyAddress::SocketAddress(SocketAddress {
            address: address.ip().to_string(),
            port_specifier: Some(PortSpecifier::PortValue(u32::from(address.port()))),
            ..SocketAddress::default()
        })),
    }
}

/// Whether a Check response allows the connection (`status.code` is OK).
#[must_use]
pub fn is_allowed(response: &envoy_types::ext_authz::v3::pb::CheckResponse) -> bool {
    response
        .status
        .as_ref()
        .is_some_and(|status| status.code == 0)
}
