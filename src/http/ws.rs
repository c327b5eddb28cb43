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
    ClientError, ClientErrorCode, Dropped, Session, SnapshotFrame, SnapshotFrames, Transport, count_delivery,
    next_snapshot_frame, reset_json,
};

/// Frames a client may send.
#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub(crate) enum ClientFrame {
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
pub(crate) const TOKEN_EXPIRED: u16 = 4001;

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
pub(crate) async fn ws(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
) -> actix_web::Result<HttpResponse> {
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
    let sub = match Session::open(state.session_context(), Transport::WebSocket, ip, admitted.grant) {
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
/// carries this future (`size::the_connection_future_stays_small`).
#[allow(clippy::manual_async_fn)] // on purpose: see above
fn run(
    sub: Session,
    session: actix_ws::Session,
    mut stream: AggregatedMessageStream,
    state: web::Data<AppState>,
    shutdown: CancellationToken,
) -> impl Future<Output = ()> {
    // Built here, out of the async block: the block keeps every value it
    // captures for its whole life, so moving `sub` into a `Connection`
    // inside it would carry the session twice.
    let mut conn = Connection::new(sub, session, state);
    let mut ping = super::heartbeat(conn.ping_every);
    async move {
        let close = loop {
            // The send of the next frame, boxed and only when there is one:
            // an idle connection then carries no send state.
            let send: OptionFuture<_> = conn
                .pending
                .front()
                .map(|(frame, ..)| Box::pin(send_frame(&mut conn.writer, frame.clone())))
                .into();
            let next = tokio::select! {
                _ = shutdown.cancelled() => Next::Close(Some(reason(CloseCode::Away, "server shutting down"))),
                _ = auth::expired(&mut conn.expiry) => {
                    auth::count_refusal(&conn.state.metrics, "token_expired");
                    Next::Close(Some(reason(CloseCode::Other(TOKEN_EXPIRED), "token expired")))
                }
                // Boxed: what a client frame or a heartbeat needs to hold
                // while it waits is allocated then, not carried by every
                // idle connection.
                msg = stream.recv() => Box::pin(conn.on_message(msg)).await,
                _ = ping.tick() => Box::pin(conn.on_tick()).await,
                frame = next_snapshot_frame(&mut conn.snapshot), if conn.pending.is_empty() => {
                    conn.on_snapshot_frame(frame);
                    Next::Go
                }
                open = conn.sub.next(&mut conn.out), if conn.pending.is_empty() && conn.snapshot.is_none() => {
                    conn.on_feed(open)
                }
                // Cancel-safe: an unsent frame stays at the front of `pending`.
                Some(sent) = send => conn.on_sent(sent),
            };
            if let Next::Close(close) = next {
                break close;
            }
        };
        let Connection { writer, session, .. } = conn;
        drop(writer);
        // The close frame waits for room in the socket, but not for long.
        let _ = tokio::time::timeout(Duration::from_secs(1), session.close(close)).await;
    }
}

/// What the connection's loop does after an event.
enum Next {
    Go,
    /// Close, with this reason (none: the peer has gone).
    Close(Option<CloseReason>),
}

/// One WebSocket connection's state between events.
struct Connection {
    sub: Session,
    /// For answers to the client's frames, pings and the close.
    session: actix_ws::Session,
    /// Updates go out through their own handle, one at a time and without
    /// holding up the loop: a client that stops reading fills the socket,
    /// and the heartbeat must still see it and close it.
    writer: actix_ws::Session,
    /// Frames to send in order, with the `ts_us` of those that are updates
    /// and the span of an update's traced delivery, ended once it is sent.
    pending: VecDeque<(ByteString, Option<i64>, Option<Box<tracing::Span>>)>,
    /// A snapshot being sent: its parts go out before any live update.
    snapshot: Option<SnapshotFrames>,
    out: Vec<FeedItem>,
    state: web::Data<AppState>,
    expiry: auth::Expiry,
    timeout: Duration,
    ping_every: Duration,
    /// Liveness is a pong to one of our last two pings (a ping's payload
    /// is random, so no pong sent unasked can pass for an answer), and
    /// frames that leave: nothing else the client sends counts.
    pings: [u64; 2],
    last_pong: Instant,
    last_progress: Instant,
    budget: FrameBudget,
    strikes: u32,
}

impl Connection {
    fn new(sub: Session, session: actix_ws::Session, state: web::Data<AppState>) -> Self {
        let (timeout, ping_every) = {
            let settings = state.hub.settings();
            (settings.client_timeout, settings.ping_interval)
        };
        Self {
            expiry: auth::expiry(sub.grant()),
            sub,
            writer: session.clone(),
            session,
            pending: VecDeque::new(),
            snapshot: None,
            out: Vec::new(),
            state,
            timeout,
            ping_every,
            pings: [0; 2],
            last_pong: Instant::now(),
            last_progress: Instant::now(),
            budget: FrameBudget::new(FRAMES_PER_SEC),
            strikes: 0,
        }
    }

    fn refuse(&self, reason: Dropped) {
        self.state
            .metrics
            .clients_refused
            .get_or_create(&[("reason", reason.as_str())])
            .inc();
    }

    /// A message from the client, or its end.
    async fn on_message(&mut self, msg: Option<Result<AggregatedMessage, ProtocolError>>) -> Next {
        let text = match msg {
            None | Some(Ok(AggregatedMessage::Close(_))) => return Next::Close(None),
            Some(Err(ProtocolError::Overflow)) => {
                self.refuse(Dropped::FrameTooLarge);
                return Next::Close(Some(reason(CloseCode::Size, "frame too large")));
            }
            Some(Err(_)) => {
                self.refuse(Dropped::ProtocolError);
                return Next::Close(Some(reason(CloseCode::Protocol, "protocol error")));
            }
            Some(Ok(AggregatedMessage::Ping(b))) => {
                return match tokio::time::timeout(self.timeout, self.session.pong(&b)).await {
                    Ok(Ok(())) => Next::Go,
                    Ok(Err(_)) => Next::Close(None),
                    Err(_) => self.slow_consumer(),
                };
            }
            Some(Ok(AggregatedMessage::Pong(b))) => {
                if answers(&self.pings, &b) {
                    self.last_pong = Instant::now();
                }
                return Next::Go;
            }
            Some(Ok(AggregatedMessage::Binary(_))) => None,
            Some(Ok(AggregatedMessage::Text(t))) => Some(t),
        };
        let result = if !self.budget.take() {
            Err(ClientError::new(
                ClientErrorCode::RateLimited,
                "too many frames; slow down",
            ))
        } else {
            match text {
                None => Err(ClientError::new(
                    ClientErrorCode::BinaryNotSupported,
                    "send JSON text frames",
                )),
                // Boxed: a subscribe (snapshot query, stream catch-up) has a
                // large state that every idle connection would otherwise carry.
                // Bounded: its answer waits on the socket too.
                Some(t) => {
                    let sending_snapshot = self.snapshot.is_some();
                    let handled = handle(&mut self.sub, &mut self.session, &self.state.auth, &t, sending_snapshot);
                    match tokio::time::timeout(self.timeout, Box::pin(handled)).await {
                        Ok(r) => r,
                        Err(_) => return self.slow_consumer(),
                    }
                }
            }
        };
        match result {
            Ok(Handled::Done) => Next::Go,
            Ok(Handled::Snapshot(frames)) => {
                self.snapshot = Some(frames);
                Next::Go
            }
            Ok(Handled::Authorized) => {
                self.expiry = auth::expiry(self.sub.grant());
                Next::Go
            }
            Ok(Handled::Gone) => Next::Close(None),
            Err(e) => self.answer_error(e).await,
        }
    }

    /// Tells the client what was wrong with its frame; too many wrong
    /// frames close the connection.
    async fn answer_error(&mut self, e: ClientError) -> Next {
        let metrics = &self.state.metrics;
        metrics.client_errors.get_or_create(&[("code", e.code.as_str())]).inc();
        auth::count_refusal(metrics, e.code.as_str());
        match tokio::time::timeout(self.timeout, self.session.text(e.to_json())).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Next::Close(None),
            Err(_) => return self.slow_consumer(),
        }
        self.strikes += 1;
        if self.strikes >= MAX_STRIKES {
            self.refuse(Dropped::TooManyErrors);
            return Next::Close(Some(reason(CloseCode::Policy, "too many bad frames")));
        }
        Next::Go
    }

    /// The heartbeat: the timeouts are checked, and a ping goes out.
    async fn on_tick(&mut self) -> Next {
        // A buffer cut off while frames wait for the socket: the loop is
        // not reading the hub meanwhile, so look here.
        if self.sub.is_cut_off() || (!self.pending.is_empty() && self.last_progress.elapsed() > self.timeout) {
            return self.slow_consumer();
        }
        if self.last_pong.elapsed() > self.timeout {
            self.refuse(Dropped::HeartbeatTimeout);
            return Next::Close(Some(reason(CloseCode::Policy, "no answer to pings")));
        }
        self.pings = [rand::random(), self.pings[0]];
        // With the socket full the ping waits for room, but never past the
        // next tick, where the timeouts above are checked again.
        match tokio::time::timeout(self.ping_every, self.session.ping(&self.pings[0].to_be_bytes())).await {
            Ok(Err(_)) => Next::Close(None),
            _ => Next::Go,
        }
    }

    fn on_snapshot_frame(&mut self, frame: Option<Result<SnapshotFrame, ClientError>>) {
        self.last_progress = Instant::now();
        match frame {
            Some(Ok(f)) => self.pending.push_back((f.json.into(), None, None)),
            Some(Err(e)) => {
                self.state
                    .metrics
                    .client_errors
                    .get_or_create(&[("code", e.code.as_str())])
                    .inc();
                self.pending.push_back((e.to_json().into(), None, None));
                self.snapshot = None;
            }
            None => self.snapshot = None,
        }
    }

    /// Updates and resets from the hub; `open` is false once the feed ended.
    fn on_feed(&mut self, open: bool) -> Next {
        self.last_progress = Instant::now();
        for item in self.out.drain(..) {
            self.pending.push_back(match item {
                FeedItem::Update(u) => (u.ws_frame.clone(), Some(u.ts_us), deliver_span(&u, "ws")),
                FeedItem::Reset { offset, reason } => (reset_json(offset, reason).to_string().into(), None, None),
            });
        }
        if open {
            return Next::Go;
        }
        Next::Close(Some(match self.sub.ended() {
            Ended::SlowConsumer => slow_consumer(),
            Ended::Closed => reason(CloseCode::Away, "server shutting down"),
        }))
    }

    /// The front frame went out (or the socket has gone).
    fn on_sent(&mut self, sent: bool) -> Next {
        if !sent {
            return Next::Close(None);
        }
        self.last_progress = Instant::now();
        self.sub.progressed();
        if let Some((_, Some(ts_us), traced)) = self.pending.pop_front() {
            count_delivery(&self.state.metrics, self.sub.transport(), ts_us);
            if let Some(trace_id) = traced.and_then(|span| crate::trace::id_of(&span)) {
                self.sub.traced(ts_us, trace_id);
            }
        }
        Next::Go
    }

    fn slow_consumer(&self) -> Next {
        self.sub.cut_off();
        Next::Close(Some(slow_consumer()))
    }
}

/// The span of an update's delivery on this socket, from the hub's hand to
/// the write, when its trace is sampled and no other socket traces it.
pub(crate) fn deliver_span(u: &crate::update::Update, transport: &'static str) -> Option<Box<tracing::Span>> {
    let parent = u.trace.as_ref().and_then(|t| t.claim())?;
    let span = tracing::info_span!(
        "deliver",
        transport,
        offset = u.offset,
        trace_id = tracing::field::Empty
    );
    crate::trace::follow(&span, parent);
    crate::trace::show_id(&span);
    Some(Box::new(span))
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
pub(crate) const SLOW_CONSUMER: u16 = 4002;

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
pub(crate) fn parse_frame(text: &str) -> Result<ClientFrame, ClientError> {
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

#[cfg(test)]
mod properties {
    //! The client frame decoder never panics, and takes every frame of the
    //! documented shape.

    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(crate::testing::proptest_config())]

        #[test]
        fn client_frame_decoder_never_panics(text in ".{0,300}") {
            if let Err(e) = parse_frame(&text) {
                prop_assert!(["bad_json", "unknown_op", "bad_frame"].contains(&e.code.as_str()));
            }
        }

        #[test]
        fn client_frames_of_the_right_shape_decode(topics in proptest::collection::vec("[a-z#*.]{1,20}", 1..5), since in any::<Option<u64>>()) {
            let frame = serde_json::json!({"op": "subscribe", "topics": topics, "since": since, "snapshot": true});
            prop_assert!(parse_frame(&frame.to_string()).is_ok());
        }
    }
}

#[cfg(test)]
mod size {
    use super::*;

    fn future_size<A, B, C, D, E, F>(_: impl Fn(A, B, C, D, E) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Every idle WebSocket connection is this future: bytes here are
    /// bytes times the connections an instance holds (19,500).
    #[test]
    fn the_connection_future_stays_small() {
        let bytes = future_size(run);
        println!("a WebSocket connection's future: {bytes} bytes");
        // 1,344 bytes today; built inside the block, with the shared
        // handles copied into every session, it was 2,112.
        assert!(bytes <= 1400, "{bytes} bytes");
    }
}
