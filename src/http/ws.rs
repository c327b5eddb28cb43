//! WebSocket delivery at `/ws` (actix-ws): JSON text frames in both
//! directions, server pings, and limits answered with error frames or
//! close codes (1008 policy, 1009 too big, 1013 try again later).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use actix_web::{HttpRequest, HttpResponse, web};
use actix_ws::{AggregatedMessage, AggregatedMessageStream, CloseCode, CloseReason, ProtocolError};
use bytestring::ByteString;
use futures_util::future::OptionFuture;
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::AppState;
use super::access::connection_span;
use super::admit::{admit, refusal_text};
use super::auth;
use super::error::TokenError;
use super::frame_budget::FrameBudget;
use crate::hub::client::Ended;
use crate::hub::feed::FeedItem;
use crate::hub::session::{
    ClientError, ClientErrorCode, Dropped, Session, SnapshotFrames, Transport, count_delivery, next_snapshot_frame,
    reset_json,
};

/// Frames a client may send.
#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum ClientFrame {
    Subscribe {
        topics: Vec<String>,
        #[serde(default)]
        since: Option<u64>,
        #[serde(default)]
        snapshot: bool,
    },
    Unsubscribe {
        topics: Vec<String>,
    },
    /// A (fresh) subscriber token: replaces the connection's grant.
    Auth {
        token: String,
    },
}

/// Close code of a connection whose token ran out (private-use range).
pub const TOKEN_EXPIRED: u16 = 4001;

#[derive(Deserialize)]
struct WsQuery {
    /// A subscriber token given at connect time (browsers cannot set
    /// `Authorization` on a WebSocket).
    token: Option<String>,
}

/// Frames per second a client may send (burst of twice that); past it
/// frames are refused, and a client that keeps on is disconnected.
const FRAMES_PER_SEC: f64 = 20.0;
const MAX_STRIKES: u32 = 50;

#[utoipa::path(get, path = "/ws", tag = "realtime",
    params(("token" = Option<String>, Query, description = "Subscriber token (or send an `auth` frame)")),
    security((), ("subscriber" = [])),
    responses(
        (status = 101, description = "Upgraded to a WebSocket (frames: docs/asyncapi.yaml)"),
        (status = 400, description = "Not a WebSocket upgrade", body = crate::http::error::ErrorBody),
        (status = 401, description = "Bad or expired subscriber token", body = crate::http::error::ErrorBody),
        (status = 403, description = "A foreign Origin", body = crate::http::error::ErrorBody),
    ))]
pub async fn ws(req: HttpRequest, body: web::Payload, state: web::Data<AppState>) -> actix_web::Result<HttpResponse> {
    let settings = state.hub.settings().clone();
    // A foreign Origin or a bad token is refused before the upgrade, with a
    // JSON body.
    let query = web::Query::<WsQuery>::from_query(req.query_string()).ok();
    let admitted = admit(
        &req,
        &state,
        query.as_ref().and_then(|q| q.token.as_deref()),
        "a WebSocket",
    )?;
    let (response, session, stream) = actix_ws::handle(&req, detached(&req, body).await?)?;
    let ip = admitted.ip;
    let sub = match Session::open(state.realtime(), Transport::WebSocket, ip, admitted.grant) {
        Ok(sub) => sub,
        Err(refused) => {
            actix_web::rt::spawn(async move {
                let _ = session
                    .close(Some(reason(CloseCode::Again, refusal_text(refused))))
                    .await;
            });
            return Ok(response);
        }
    };
    let stream = stream
        .max_frame_size(settings.max_frame_bytes)
        .aggregate_continuations()
        .max_continuation_size(settings.max_frame_bytes);
    let shutdown = state.shutdown.clone();
    let span = connection_span(sub.id(), "ws", ip);
    actix_web::rt::spawn(run(sub, session, stream, state, shutdown).instrument(span));
    Ok(response)
}

/// The client's bytes, each chunk copied out of the connection's read
/// buffer: actix-ws keeps the last chunk's allocation as its own buffer,
/// and a chunk shares the whole read buffer, which an idle connection then
/// could not release (vendor/README.md). Client frames are few and small.
async fn detached(req: &HttpRequest, body: web::Payload) -> actix_web::Result<web::Payload> {
    use futures_util::{Stream, TryStreamExt};
    type Chunks = std::pin::Pin<Box<dyn Stream<Item = Result<bytes::Bytes, actix_web::error::PayloadError>>>>;
    let chunks: Chunks = Box::pin(body.into_inner().map_ok(|chunk| bytes::Bytes::copy_from_slice(&chunk)));
    let mut payload = actix_web::dev::Payload::from(chunks);
    <web::Payload as actix_web::FromRequest>::from_request(req, &mut payload).await
}

/// An async block rather than an async fn: an async fn's future holds its
/// arguments twice (as arguments and as locals), and every idle connection
/// carries this future.
#[allow(clippy::manual_async_fn)] // on purpose: see above
fn run(
    mut sub: Session,
    mut session: actix_ws::Session,
    mut stream: AggregatedMessageStream,
    state: web::Data<AppState>,
    shutdown: CancellationToken,
) -> impl Future<Output = ()> {
    async move {
        let (timeout, ping_every) = {
            let settings = state.hub.settings();
            (settings.client_timeout, settings.ping_interval)
        };
        let metrics = state.metrics.clone();
        let refuse = |reason: Dropped| {
            metrics
                .clients_refused
                .get_or_create(&[("reason", reason.as_str())])
                .inc()
        };
        let mut ping = super::heartbeat(ping_every);
        // Liveness is a pong to one of our last two pings (a ping's payload
        // is random, so no pong sent unasked can pass for an answer), and
        // frames that leave: nothing else the client sends counts.
        let mut pings = [0u64; 2];
        let mut last_pong = Instant::now();
        let mut last_progress = Instant::now();
        let mut budget = FrameBudget::new(FRAMES_PER_SEC);
        let mut strikes = 0u32;
        let mut out = Vec::new();
        // A snapshot being sent: its parts go out before any live update.
        let mut snapshot: Option<SnapshotFrames> = None;
        // Updates go out through their own handle, one at a time and without
        // holding up the loop: a client that stops reading fills the socket,
        // and the heartbeat below must still see it and close it.
        let mut writer = session.clone();
        let mut pending: VecDeque<(ByteString, Option<i64>)> = VecDeque::new();
        let mut expiry = auth::expiry(sub.grant());
        let close = loop {
            // The send of the next frame, boxed and only when there is one:
            // an idle connection then carries no send state.
            let send: OptionFuture<_> = pending
                .front()
                .map(|(frame, _)| Box::pin(send_frame(&mut writer, frame.clone())))
                .into();
            tokio::select! {
                _ = shutdown.cancelled() => break Some(reason(CloseCode::Away, "server shutting down")),
                _ = auth::expired(&mut expiry) => {
                    auth::count_refusal(&metrics, "token_expired");
                    break Some(reason(CloseCode::Other(TOKEN_EXPIRED), "token expired"));
                }
                msg = stream.recv() => {
                    let text = match msg {
                        None | Some(Ok(AggregatedMessage::Close(_))) => break None,
                        Some(Err(ProtocolError::Overflow)) => {
                            refuse(Dropped::FrameTooLarge);
                            break Some(reason(CloseCode::Size, "frame too large"));
                        }
                        Some(Err(_)) => {
                            refuse(Dropped::ProtocolError);
                            break Some(reason(CloseCode::Protocol, "protocol error"));
                        }
                        Some(Ok(AggregatedMessage::Ping(b))) => {
                            match tokio::time::timeout(timeout, session.pong(&b)).await {
                                Ok(Ok(())) => continue,
                                Ok(Err(_)) => break None,
                                Err(_) => {
                                    sub.cut_off();
                                    break Some(slow_consumer());
                                }
                            }
                        }
                        Some(Ok(AggregatedMessage::Pong(b))) => {
                            if answers(&pings, &b) {
                                last_pong = Instant::now();
                            }
                            continue;
                        }
                        Some(Ok(AggregatedMessage::Binary(_))) => None,
                        Some(Ok(AggregatedMessage::Text(t))) => Some(t),
                    };
                    let result = if !budget.take() {
                        Err(ClientError::new(ClientErrorCode::RateLimited, "too many frames; slow down"))
                    } else {
                        match text {
                            None => Err(ClientError::new(ClientErrorCode::BinaryNotSupported, "send JSON text frames")),
                            // Boxed: a subscribe (snapshot query, stream catch-up) has a
                            // large state that every idle connection would otherwise carry.
                            // Bounded: its answer waits on the socket too.
                            Some(t) => {
                                let handled = handle(&mut sub, &mut session, &state.auth, &t, snapshot.is_some());
                                match tokio::time::timeout(timeout, Box::pin(handled)).await {
                                    Ok(r) => r,
                                    Err(_) => {
                                    sub.cut_off();
                                    break Some(slow_consumer());
                                }
                                }
                            }
                        }
                    };
                    match result {
                        Ok(Handled::Done) => {}
                        Ok(Handled::Snapshot(frames)) => snapshot = Some(frames),
                        Ok(Handled::Authorized) => {
                            expiry = auth::expiry(sub.grant());
                        }
                        Ok(Handled::Gone) => break None,
                        Err(e) => {
                            metrics.client_errors.get_or_create(&[("code", e.code.as_str())]).inc();
                            auth::count_refusal(&metrics, e.code.as_str());
                            match tokio::time::timeout(timeout, session.text(e.to_json())).await {
                                Ok(Ok(())) => {}
                                Ok(Err(_)) => break None,
                                Err(_) => {
                                    sub.cut_off();
                                    break Some(slow_consumer());
                                }
                            }
                            strikes += 1;
                            if strikes >= MAX_STRIKES {
                                refuse(Dropped::TooManyErrors);
                                break Some(reason(CloseCode::Policy, "too many bad frames"));
                            }
                        }
                    }
                }
                _ = ping.tick() => {
                    // A buffer cut off while frames wait for the socket: the
                    // loop is not reading the hub meanwhile, so look here.
                    if sub.is_cut_off() || (!pending.is_empty() && last_progress.elapsed() > timeout) {
                        sub.cut_off();
                        break Some(slow_consumer());
                    }
                    if last_pong.elapsed() > timeout {
                        refuse(Dropped::HeartbeatTimeout);
                        break Some(reason(CloseCode::Policy, "no answer to pings"));
                    }
                    pings = [rand::random(), pings[0]];
                    // With the socket full the ping waits for room, but never past
                    // the next tick, where the timeouts above are checked again.
                    if let Ok(Err(_)) = tokio::time::timeout(ping_every, session.ping(&pings[0].to_be_bytes())).await {
                        break None;
                    }
                }
                frame = next_snapshot_frame(&mut snapshot), if pending.is_empty() => {
                    last_progress = Instant::now();
                    match frame {
                        Some(Ok(f)) => pending.push_back((f.json.into(), None)),
                        Some(Err(e)) => {
                            metrics.client_errors.get_or_create(&[("code", e.code.as_str())]).inc();
                            pending.push_back((e.to_json().into(), None));
                            snapshot = None;
                        }
                        None => snapshot = None,
                    }
                }
                open = sub.next(&mut out), if pending.is_empty() && snapshot.is_none() => {
                    last_progress = Instant::now();
                    for item in out.drain(..) {
                        pending.push_back(match item {
                            FeedItem::Update(u) => (u.ws_frame.clone(), Some(u.ts_us)),
                            FeedItem::Reset { offset, reason } => (reset_json(offset, reason).to_string().into(), None),
                        });
                    }
                    if !open {
                        break Some(match sub.ended() {
                            Ended::SlowConsumer => slow_consumer(),
                            Ended::Closed => reason(CloseCode::Away, "server shutting down"),
                        });
                    }
                }
                // Cancel-safe: an unsent frame stays at the front of `pending`.
                Some(sent) = send => {
                    if !sent { break None; }
                    last_progress = Instant::now();
                    sub.progressed();
                    if let Some((_, Some(ts_us))) = pending.pop_front() {
                        count_delivery(&metrics, sub.transport(), ts_us);
                    }
                }
            }
        };
        drop(writer);
        // The close frame waits for room in the socket, but not for long.
        let _ = tokio::time::timeout(Duration::from_secs(1), session.close(close)).await;
    }
}

/// Whether a pong's payload is that of one of our last two pings.
fn answers(pings: &[u64; 2], payload: &[u8]) -> bool {
    <[u8; 8]>::try_from(payload).is_ok_and(|b| {
        let n = u64::from_be_bytes(b);
        n != 0 && pings.contains(&n)
    })
}

/// Close code of a connection cut off as a slow consumer (private-use
/// range): it reconnects and resumes from its last offset.
pub const SLOW_CONSUMER: u16 = 4002;

fn slow_consumer() -> CloseReason {
    reason(CloseCode::Other(SLOW_CONSUMER), "slow consumer")
}

async fn send_frame(writer: &mut actix_ws::Session, frame: ByteString) -> bool {
    writer.text(frame).await.is_ok()
}

fn reason(code: CloseCode, text: &str) -> CloseReason {
    CloseReason {
        code,
        description: Some(text.to_owned()),
    }
}

/// Decodes one client text frame into a frame or the error to answer with.
pub fn parse_frame(text: &str) -> Result<ClientFrame, ClientError> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| ClientError::new(ClientErrorCode::BadJson, format!("not JSON: {e}")))?;
    let op = value.get("op").and_then(|o| o.as_str()).unwrap_or("");
    if !matches!(op, "subscribe" | "unsubscribe" | "auth") {
        return Err(ClientError::new(
            ClientErrorCode::UnknownOp,
            format!("op must be \"subscribe\", \"unsubscribe\" or \"auth\", not {:.40?}", op),
        ));
    }
    serde_json::from_value(value).map_err(|e| ClientError::new(ClientErrorCode::BadFrame, format!("{e}")))
}

/// What became of a client frame.
enum Handled {
    Done,
    /// A subscribe whose snapshot is to be sent.
    Snapshot(SnapshotFrames),
    /// A new token was taken: its expiry replaces the old one's.
    Authorized,
    /// The socket has gone.
    Gone,
}

/// Handles one client frame. `sending_snapshot` while an earlier snapshot's
/// parts are still going out: one snapshot at a time per connection.
async fn handle(
    sub: &mut Session,
    session: &mut actix_ws::Session,
    verifier: &auth::Verifier,
    text: &str,
    sending_snapshot: bool,
) -> Result<Handled, ClientError> {
    match parse_frame(text)? {
        ClientFrame::Auth { token } => {
            let grant = verifier.verify(&token).map_err(|e| {
                let code = match e {
                    TokenError::Expired => ClientErrorCode::TokenExpired,
                    TokenError::Invalid(_) => ClientErrorCode::Unauthorized,
                };
                ClientError::new(code, e.to_string())
            })?;
            let ack = json!({
                "type": "authorized",
                "expires": grant.expires_unix(),
                "topics": grant.scope.patterns().collect::<Vec<_>>(),
            });
            sub.authorize(grant)?;
            if session.text(ack.to_string()).await.is_err() {
                return Ok(Handled::Gone);
            }
            return Ok(Handled::Authorized);
        }
        ClientFrame::Subscribe {
            topics,
            since,
            snapshot,
        } => {
            if snapshot && sending_snapshot {
                return Err(ClientError::new(
                    ClientErrorCode::Busy,
                    "a snapshot is still being sent on this connection; ask again after its snapshot_end",
                ));
            }
            let frames = sub.subscribe(&topics, since, snapshot).await?;
            let ack = json!({ "type": "subscribed", "topics": sub.patterns() });
            if session.text(ack.to_string()).await.is_err() {
                return Ok(Handled::Gone);
            }
            if let Some(frames) = frames {
                return Ok(Handled::Snapshot(frames));
            }
        }
        ClientFrame::Unsubscribe { topics } => {
            sub.unsubscribe(&topics).await?;
            let ack = json!({ "type": "unsubscribed", "topics": topics, "remaining": sub.patterns() });
            if session.text(ack.to_string()).await.is_err() {
                return Ok(Handled::Gone);
            }
        }
    }
    Ok(Handled::Done)
}
