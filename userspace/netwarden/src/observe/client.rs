//! The client side of the observe endpoint, over any byte stream: the agent's Unix socket, a
//! TCP address, or a Kubernetes port-forward to an agent pod's loopback listener.

use std::{fmt, net::SocketAddr, path::PathBuf, str::FromStr};

use bytes::{Buf as _, Bytes, BytesMut};
use futures::{Stream, stream};
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{
    ObserveError,
    flow::{ObserveRequest, StreamLine},
};
use crate::explain::{ExplainQuery, Explanation};

/// An agent's observe endpoint on this machine: a Unix socket, or a TCP address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AgentAddress {
    /// `--observe-socket`.
    Socket(PathBuf),
    /// `--observe-address`.
    Tcp(SocketAddr),
}

impl FromStr for AgentAddress {
    type Err = std::convert::Infallible;

    /// An `address:port` is TCP, anything else a socket's path.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(text
            .parse()
            .map_or_else(|_| Self::Socket(PathBuf::from(text)), Self::Tcp))
    }
}

impl fmt::Display for AgentAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Socket(path) => write!(f, "{}", path.display()),
            Self::Tcp(address) => write!(f, "{address}"),
        }
    }
}

/// The lines of an agent's flow stream, as they come.
pub type Lines = std::pin::Pin<Box<dyn Stream<Item = Result<StreamLine, ObserveError>> + Send>>;

/// A byte stream to an agent's endpoint.
pub trait Connection: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Connection for T {}

impl AgentAddress {
    /// Opens a connection to the endpoint.
    pub async fn connect(&self) -> Result<Box<dyn Connection>, ObserveError> {
        let failed = |error: std::io::Error| ObserveError::Connect {
            address: self.to_string(),
            reason: error.to_string(),
        };
        Ok(match self {
            Self::Socket(path) => Box::new(
                tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(failed)?,
            ),
            Self::Tcp(address) => Box::new(
                tokio::net::TcpStream::connect(address)
                    .await
                    .map_err(failed)?,
            ),
        })
    }
}

/// Sends one `POST path` with `body` on `connection`; the response, or the agent's error.
async fn post(
    connection: impl Connection,
    path: &str,
    body: Vec<u8>,
) -> Result<Incoming, ObserveError> {
    let (mut sender, driver) =
        hyper::client::conn::http1::handshake(TokioIo::new(connection)).await?;
    tokio::spawn(async move {
        // Ends with the response body, or with the connection.
        let _ = driver.await;
    });
    let request = Request::post(path)
        // HTTP/1.1 wants a Host; the endpoint does not read it.
        .header(header::HOST, "netwarden")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("a request of constant parts");
    let response = sender.send_request(request).await?;
    let status = response.status();
    if status == StatusCode::OK {
        return Ok(response.into_body());
    }
    let text = response.into_body().collect().await?.to_bytes();
    let message = serde_json::from_slice::<serde_json::Value>(&text)
        .ok()
        .and_then(|value| value.get("error")?.as_str().map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(&text).into_owned());
    Err(ObserveError::Refused {
        status: status.as_u16(),
        message,
    })
}

/// The lines the agent streams for `request`, as they come.
pub async fn flows(
    connection: impl Connection,
    request: &ObserveRequest,
) -> Result<Lines, ObserveError> {
    let body = post(
        connection,
        "/v1/flows",
        serde_json::to_vec(request).expect("a request serializes"),
    )
    .await?;
    Ok(Box::pin(split_lines(body)))
}

/// Cuts the body's frames into lines, however the frames fall.
fn split_lines(body: Incoming) -> impl Stream<Item = Result<StreamLine, ObserveError>> + Send {
    stream::unfold(
        (body, BytesMut::new(), false),
        |(mut body, mut pending, mut ended)| async move {
            loop {
                if let Some(end) = pending.iter().position(|byte| *byte == b'\n') {
                    let line = pending.split_to(end + 1);
                    let text = &line[..end];
                    if text.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    let parsed =
                        serde_json::from_slice(text).map_err(|source| ObserveError::Unreadable {
                            line: String::from_utf8_lossy(text).into_owned(),
                            source,
                        });
                    return Some((parsed, (body, pending, ended)));
                }
                if ended {
                    return None;
                }
                match body.frame().await {
                    Some(Ok(frame)) => {
                        if let Ok(mut data) = frame.into_data() {
                            while data.has_remaining() {
                                let chunk = data.chunk();
                                pending.extend_from_slice(chunk);
                                let read = chunk.len();
                                data.advance(read);
                            }
                        }
                    }
                    Some(Err(error)) => {
                        ended = true;
                        return Some((Err(error.into()), (body, pending, ended)));
                    }
                    None => {
                        // A last line without its newline is still a line.
                        ended = true;
                        if !pending.is_empty() {
                            pending.extend_from_slice(b"\n");
                        }
                    }
                }
            }
        },
    )
}

/// The agent's explanation of `query` on the state it applied last.
pub async fn explain(
    connection: impl Connection,
    query: &ExplainQuery,
) -> Result<Explanation, ObserveError> {
    let body = post(
        connection,
        "/v1/explain",
        serde_json::to_vec(query).expect("a query serializes"),
    )
    .await?
    .collect()
    .await?
    .to_bytes();
    serde_json::from_slice(&body).map_err(|source| ObserveError::Unreadable {
        line: String::from_utf8_lossy(&body).into_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use futures::StreamExt as _;
    use netwarden_identity::SocketAccess;
    use tokio::sync::mpsc;

    use super::{AgentAddress, flows};
    use crate::observe::{
        flow::{Filter, FlowRecord, ObserveRequest, StreamLine, Verdict, tests::denied_ingress},
        hub::FlowHub,
        server::{self, Listeners, Served},
    };

    #[test]
    fn an_address_with_a_port_is_tcp_anything_else_a_socket() {
        assert_eq!(
            "127.0.0.1:9964".parse::<AgentAddress>().unwrap(),
            AgentAddress::Tcp("127.0.0.1:9964".parse().unwrap())
        );
        assert_eq!(
            "/run/netwarden/observe.sock"
                .parse::<AgentAddress>()
                .unwrap(),
            AgentAddress::Socket("/run/netwarden/observe.sock".into())
        );
    }

    async fn served(capacity: usize) -> (Arc<FlowHub>, AgentAddress, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("observe.sock");
        let hub = Arc::new(FlowHub::new(capacity));
        let (explain, _) = mpsc::channel(1);
        server::serve(
            Listeners {
                socket: Some((
                    path.clone(),
                    SocketAccess {
                        mode: 0o600,
                        group: None,
                    },
                )),
                address: None,
            },
            Served {
                hub: Arc::clone(&hub),
                explain,
            },
        )
        .await
        .unwrap();
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        (hub, AgentAddress::Socket(path), dir)
    }

    fn record(time_unix_ms: u64, verdict: Verdict) -> FlowRecord {
        FlowRecord {
            time_unix_ms,
            verdict,
            ..denied_ingress()
        }
    }

    /// Over the real socket: the kept records that match, then, following, new ones.
    #[tokio::test]
    async fn an_observer_reads_the_kept_records_filtered_then_follows() {
        let (hub, address, _dir) = served(16).await;
        let now = crate::observe::now_unix_ms();
        hub.publish(record(now, Verdict::Deny));
        hub.publish(record(now, Verdict::Allow));
        // Old: left out by `since`.
        hub.publish(record(now - 120_000, Verdict::Deny));
        let request = ObserveRequest {
            filter: Filter {
                verdict: Some(Verdict::Deny),
                ..Filter::default()
            },
            follow: false,
            since_seconds: Some(60),
        };
        let lines: Vec<StreamLine> = flows(address.connect().await.unwrap(), &request)
            .await
            .unwrap()
            .map(Result::unwrap)
            .collect()
            .await;
        assert_eq!(
            lines,
            [StreamLine::Flow(Box::new(record(now, Verdict::Deny)))]
        );

        let following = ObserveRequest {
            follow: true,
            since_seconds: None,
            ..request
        };
        let mut stream = flows(address.connect().await.unwrap(), &following)
            .await
            .unwrap();
        for _ in 0..2 {
            assert!(matches!(stream.next().await, Some(Ok(StreamLine::Flow(_)))));
        }
        hub.publish(record(now + 1, Verdict::Allow));
        hub.publish(record(now + 2, Verdict::Deny));
        let next = tokio::time::timeout(std::time::Duration::from_secs(5), stream.next())
            .await
            .expect("the new deny within 5 s");
        assert_eq!(
            next.unwrap().unwrap(),
            StreamLine::Flow(Box::new(record(now + 2, Verdict::Deny)))
        );
    }

    /// An observer that does not read loses records and is told so; the publisher never
    /// waited.
    #[tokio::test]
    async fn a_stalled_observer_is_told_what_it_lost() {
        let (hub, address, _dir) = served(4).await;
        let request = ObserveRequest {
            follow: true,
            ..ObserveRequest::default()
        };
        let mut stream = flows(address.connect().await.unwrap(), &request)
            .await
            .unwrap();
        // Far more than the backlog and the socket's buffers hold, all published at once.
        let started = std::time::Instant::now();
        for time in 0..100_000 {
            hub.publish(record(time, Verdict::Deny));
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        let mut lost = 0;
        while let Ok(Some(line)) =
            tokio::time::timeout(std::time::Duration::from_millis(500), stream.next()).await
        {
            if let StreamLine::Lost { lost: count } = line.unwrap() {
                lost += count;
            }
        }
        assert!(lost > 0, "no loss reported");
    }
}
