//! The agent's observe endpoint: HTTP/1.1 on a Unix socket (by default) and, only when asked,
//! on a TCP address.
//!
//! - `POST /v1/flows`, an [`ObserveRequest`] as the body: the kept records that match, then,
//!   with `follow`, every new one; JSON lines ([`StreamLine`]).
//! - `POST /v1/explain`, an [`ExplainQuery`] as the body: the agent's explanation of that flow
//!   on the state it applied last, as `netwarden explain --output json` prints it.
//!
//! Plain HTTP and JSON lines so that `curl --unix-socket` is a client too. The socket gets its
//! mode and group the way the identity check's does (never left to the umask); a TCP listener
//! has the metrics listener's rule: it is bound only where `--observe-address` says.

use std::{convert::Infallible, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use bytes::Bytes;
use futures::{StreamExt as _, stream};
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use netwarden_identity::SocketAccess;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, UnixListener},
    sync::{broadcast::error::RecvError, mpsc, oneshot},
};
use tracing::{debug, info, warn};

use super::{
    ObserveError,
    flow::{FlowRecord, ObserveRequest, StreamLine},
    hub::FlowHub,
};
use crate::explain::{ExplainQuery, Explanation};

/// Largest request body read: a filter or an explain query is a few hundred bytes.
const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// An explain query for the agent's apply loop, which holds the applied state, and where to
/// send its answer (the explanation, or why there is none).
pub struct ExplainRequest {
    /// The flow.
    pub query: ExplainQuery,
    /// The answer.
    pub reply: oneshot::Sender<Result<Explanation, String>>,
}

/// What every connection is served from.
#[derive(Clone)]
pub struct Served {
    /// The records.
    pub hub: Arc<FlowHub>,
    /// To the apply loop; explain queries are refused when it is full rather than queued.
    pub explain: mpsc::Sender<ExplainRequest>,
}

/// Where the endpoint listens.
pub struct Listeners {
    /// The Unix socket, bound with `access`.
    pub socket: Option<(PathBuf, SocketAccess)>,
    /// The TCP address.
    pub address: Option<SocketAddr>,
}

/// Binds what `listeners` asks for and serves it until the runtime stops. Returns the TCP
/// address bound (its port, when `:0` was asked).
pub async fn serve(
    listeners: Listeners,
    served: Served,
) -> Result<Option<SocketAddr>, ObserveError> {
    let Listeners { socket, address } = listeners;
    if let Some((path, access)) = socket {
        let listener = netwarden_identity::server::bind_unix(&path, access).map_err(|source| {
            ObserveError::Listen {
                address: path.display().to_string(),
                source,
            }
        })?;
        info!(
            socket = %path.display(),
            mode = format!("{:04o}", access.mode),
            group = ?access.group,
            "observe endpoint listening (flows, explain)"
        );
        tokio::spawn(accept_unix(listener, served.clone()));
    }
    let Some(address) = address else {
        return Ok(None);
    };
    let listen_error = |source| ObserveError::Listen {
        address: address.to_string(),
        source,
    };
    let listener = TcpListener::bind(address).await.map_err(listen_error)?;
    let bound = listener.local_addr().map_err(listen_error)?;
    info!(address = %bound, "observe endpoint listening (flows, explain)");
    tokio::spawn(accept_tcp(listener, served));
    Ok(Some(bound))
}

async fn accept_unix(listener: UnixListener, served: Served) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => spawn_connection(stream, served.clone()),
            Err(error) => accept_failed(&error).await,
        }
    }
}

async fn accept_tcp(listener: TcpListener, served: Served) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => spawn_connection(stream, served.clone()),
            Err(error) => accept_failed(&error).await,
        }
    }
}

/// Out of descriptors, most likely: wait a little rather than spin.
async fn accept_failed(error: &std::io::Error) {
    warn!(%error, "observe endpoint: accept failed");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

fn spawn_connection<S>(stream: S, served: Served)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let service = hyper::service::service_fn(move |request| {
            let served = served.clone();
            async move { Ok::<_, Infallible>(respond(request, &served).await) }
        });
        if let Err(error) = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(stream), service)
            .await
        {
            debug!(%error, "observe connection ended");
        }
    });
}

type Body = BoxBody<Bytes, Infallible>;

async fn respond(request: Request<Incoming>, served: &Served) -> Response<Body> {
    let route = (request.method().clone(), request.uri().path().to_owned());
    let body = match read_body(request).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    match (route.0, route.1.as_str()) {
        (Method::POST, "/v1/flows") => match serde_json::from_slice::<ObserveRequest>(&body) {
            Ok(observe) => flows(&served.hub, observe),
            Err(error) => error_response(StatusCode::BAD_REQUEST, &error.to_string()),
        },
        (Method::POST, "/v1/explain") => match serde_json::from_slice::<ExplainQuery>(&body) {
            Ok(query) => explain(&served.explain, query).await,
            Err(error) => error_response(StatusCode::BAD_REQUEST, &error.to_string()),
        },
        _ => error_response(StatusCode::NOT_FOUND, "POST /v1/flows or POST /v1/explain"),
    }
}

async fn read_body(request: Request<Incoming>) -> Result<Bytes, Response<Body>> {
    let limited = http_body_util::Limited::new(request.into_body(), MAX_REQUEST_BYTES);
    match limited.collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) => Err(error_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            &error.to_string(),
        )),
    }
}

/// The stream of `POST /v1/flows`.
fn flows(hub: &FlowHub, observe: ObserveRequest) -> Response<Body> {
    let ObserveRequest {
        filter,
        follow,
        since_seconds,
    } = observe;
    let oldest = since_seconds
        .map(|seconds| super::now_unix_ms().saturating_sub(seconds.saturating_mul(1000)));
    let wanted = move |record: &FlowRecord| {
        oldest.is_none_or(|oldest| record.time_unix_ms >= oldest) && filter.matches(record)
    };
    let subscription = hub.subscribe();
    let recent: Vec<Bytes> = subscription
        .recent
        .iter()
        .filter(|record| wanted(record))
        .map(|record| line(&**record))
        .collect();
    let kept = stream::iter(recent);
    let body: Body = if follow {
        let live = stream::unfold(
            (subscription.live, wanted),
            |(mut live, wanted)| async move {
                loop {
                    let next = match live.recv().await {
                        Ok(record) if wanted(&record) => line(&*record),
                        Ok(_) => continue,
                        Err(RecvError::Lagged(lost)) => line(&StreamLine::Lost { lost }),
                        Err(RecvError::Closed) => return None,
                    };
                    return Some((next, (live, wanted)));
                }
            },
        );
        BodyExt::boxed(StreamBody::new(
            kept.chain(live).map(|line| Ok(Frame::data(line))),
        ))
    } else {
        BodyExt::boxed(StreamBody::new(kept.map(|line| Ok(Frame::data(line)))))
    };
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(body)
        .expect("a response of constant parts")
}

/// `POST /v1/explain`: asks the apply loop, which holds the applied state.
async fn explain(
    loop_sender: &mpsc::Sender<ExplainRequest>,
    query: ExplainQuery,
) -> Response<Body> {
    let (reply, answer) = oneshot::channel();
    if loop_sender
        .try_send(ExplainRequest { query, reply })
        .is_err()
    {
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent is busy with other explain queries; retry",
        );
    }
    match answer.await {
        Ok(Ok(explanation)) => json_response(StatusCode::OK, &explanation),
        Ok(Err(message)) => error_response(StatusCode::UNPROCESSABLE_ENTITY, &message),
        Err(_) => error_response(StatusCode::SERVICE_UNAVAILABLE, "the agent is stopping"),
    }
}

/// One line of the stream: a [`StreamLine`], or a record itself (the same JSON as
/// `StreamLine::Flow`, which is untagged, without copying the record into one).
fn line(value: &impl serde::Serialize) -> Bytes {
    let mut text = serde_json::to_vec(value).expect("a record serializes");
    text.push(b'\n');
    Bytes::from(text)
}

fn json_response(status: StatusCode, value: &impl serde::Serialize) -> Response<Body> {
    let body = serde_json::to_vec(value).expect("an answer serializes");
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)).boxed())
        .expect("a response of constant parts")
}

fn error_response(status: StatusCode, message: &str) -> Response<Body> {
    json_response(status, &serde_json::json!({ "error": message }))
}
