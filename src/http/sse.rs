//! Server-Sent Events at `/events?topics=…[&since=N][&snapshot=true]`:
//! `id:` is the stream offset, `event:` the kind, `data:` the JSON update.
//! `Last-Event-ID` resumes; comments keep proxies from timing out.

use std::collections::VecDeque;

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use bytes::Bytes;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::AppState;
use super::access::connection_span;
use super::admit::{Admitted, admit, refusal_text};
use super::auth;
use super::error::ApiError;
use super::ws::deliver_span;
use crate::hub::Refused;
use crate::hub::client::Ended;
use crate::hub::feed::FeedItem;
use crate::hub::session::{
    ClientError, ClientErrorCode, Session, SnapshotFrames, Transport, next_snapshot_frame, reset_json,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EventsQuery {
    topics: Option<String>,
    since: Option<String>,
    snapshot: Option<String>,
    /// A subscriber token, for clients that cannot send `Authorization`.
    token: Option<String>,
}

fn parse_offset(raw: &str, what: &str) -> Result<u64, ApiError> {
    raw.trim()
        .parse()
        .map_err(|_| ApiError::BadRequest(format!("{what} must be a stream offset (a non-negative integer)")))
}

#[utoipa::path(get, path = "/events", tag = "realtime",
    params(
        ("topics" = String, Query, description = "Comma-separated topic patterns (`*` one word, `#` any)"),
        ("since" = Option<i64>, Query, description = "Resume after this stream offset"),
        ("snapshot" = Option<bool>, Query, description = "Start with the current state of the patterns' products"),
        ("token" = Option<String>, Query, description = "Subscriber token, for clients that cannot send Authorization"),
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this offset (browsers send it on reconnect)"),
    ),
    security((), ("subscriber" = [])),
    responses(
        (status = 200, description = "The event stream (see docs/asyncapi.yaml). Refused only for now (snapshots busy, the catalog unavailable, the connection limit): a `retry:` of when to come back, one `error` event (`busy` or `unavailable`, with `retry_ms`), and the end of the stream, so an EventSource reconnects by itself", content_type = "text/event-stream", body = String),
        (status = 400, description = "Malformed path, query or body", body = crate::http::error::ErrorBody), (status = 401, description = "Bad or expired subscriber token", body = crate::http::error::ErrorBody),
        (status = 403, description = "A pattern outside the grant, or a foreign Origin", body = crate::http::error::ErrorBody),
        (status = 429, description = "Too many connections from this address", body = crate::http::error::ErrorBody),
    ))]
pub(crate) async fn events(
    req: HttpRequest,
    state: web::Data<AppState>,
    query: web::Query<EventsQuery>,
) -> Result<HttpResponse, ApiError> {
    let topics: Vec<String> = query
        .topics
        .as_deref()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect();
    let last_event_id = req.headers().get("last-event-id").and_then(|v| v.to_str().ok());
    let since = match (last_event_id, query.since.as_deref()) {
        (Some(id), _) if !id.trim().is_empty() => Some(parse_offset(id, "Last-Event-ID")?),
        (_, Some(s)) => Some(parse_offset(s, "since")?),
        _ => None,
    };
    let snapshot = match query.snapshot.as_deref() {
        None | Some("false") | Some("0") => false,
        Some("true") | Some("1") | Some("") => true,
        Some(_) => return Err(ApiError::BadRequest("snapshot must be true or false".into())),
    };
    let Admitted { origin, grant, ip } = admit(&req, &state, query.token.as_deref(), "an event stream")?;
    let retry = state.hub.settings().sse_retry;
    let mut sub = match Session::open(state.session_context(), Transport::Sse, ip, grant) {
        Ok(sub) => sub,
        Err(refused @ Refused::Instance) => {
            let e = ClientError::new(ClientErrorCode::Busy, refusal_text(refused));
            return Ok(retry_later(e.retry_after(retry), origin));
        }
        Err(refused @ Refused::PerIp) => return Err(ApiError::TooManyRequests(refusal_text(refused).into())),
    };
    let span = connection_span(sub.id(), "sse", ip);
    let snapshot = match sub.subscribe(&topics, since, snapshot).instrument(span.clone()).await {
        Ok(snapshot) => snapshot,
        // Only for now: an EventSource told so comes back by itself.
        Err(e) if matches!(e.code, ClientErrorCode::Busy | ClientErrorCode::Unavailable) => {
            state
                .metrics
                .client_errors
                .get_or_create(&[("code", e.code.as_str())])
                .inc();
            let after = e.retry.unwrap_or(retry);
            return Ok(retry_later(e.retry_after(after), origin));
        }
        Err(e) => {
            auth::count_refusal(&state.metrics, e.code.as_str());
            return Err(ApiError::from(e));
        }
    };

    let settings = state.hub.settings();
    let first = format!(": product-gateway\nretry: {}\n\n", settings.sse_retry.as_millis());
    let mut pending = VecDeque::new();
    pending.push_back((Bytes::from(first), None));
    let keepalive = super::heartbeat(settings.sse_keepalive);
    let expiry = auth::expiry(sub.grant());
    let body = futures_util::stream::unfold(
        EventStream {
            expiry,
            sub,
            snapshot,
            pending,
            in_flight: None,
            out: Vec::new(),
            keepalive,
            shutdown: state.shutdown.clone(),
            done: false,
            span,
        },
        |s| {
            let span = s.span.clone();
            next_chunk(s).instrument(span)
        },
    );
    Ok(stream_response(origin).streaming(body))
}

fn stream_response(origin: Option<header::HeaderValue>) -> actix_web::HttpResponseBuilder {
    let mut res = HttpResponse::Ok();
    res.insert_header((header::CONTENT_TYPE, "text/event-stream"))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header(("X-Accel-Buffering", "no"))
        .insert_header((header::VARY, "Origin"));
    if let Some(origin) = origin {
        res.insert_header((header::ACCESS_CONTROL_ALLOW_ORIGIN, origin));
    }
    res
}

/// A refusal that is only for now (`busy`, `unavailable`), as a stream of
/// one `error` event after a `retry:` of when to come back: a 503 would make
/// an EventSource give up for good, an ended stream makes it reconnect by
/// itself after that long.
fn retry_later(e: ClientError, origin: Option<header::HeaderValue>) -> HttpResponse {
    let retry = e.retry.map_or(0, |r| r.as_millis());
    let body = format!("retry: {retry}\n\nevent: error\ndata: {}\n\n", e.to_json());
    stream_response(origin).body(body)
}

/// A traced delivery's span and its update's publish time.
type TracedWrite = (Box<tracing::Span>, i64);

struct EventStream {
    /// The connection's span, entered while the body is produced.
    span: tracing::Span,
    sub: Session,
    /// The snapshot being sent: its parts go before any live update.
    snapshot: Option<SnapshotFrames>,
    /// Chunks to send in order; an update's with the span of its traced
    /// delivery and its publish time.
    pending: VecDeque<(Bytes, Option<TracedWrite>)>,
    /// The traced delivery whose chunk was taken last: written once the
    /// body is polled again.
    in_flight: Option<TracedWrite>,
    out: Vec<FeedItem>,
    keepalive: tokio::time::Interval,
    /// When the token runs out; the stream then ends with an error event.
    expiry: auth::Expiry,
    shutdown: CancellationToken,
    done: bool,
}

/// An async block rather than an async fn, which would hold the stream's
/// state twice (as argument and as local) on every idle connection.
#[allow(clippy::manual_async_fn)] // on purpose: see above
fn next_chunk(
    mut s: EventStream,
) -> impl Future<Output = Option<(Result<Bytes, std::convert::Infallible>, EventStream)>> {
    async move {
        loop {
            if !s.done && auth::has_expired(&s.expiry) {
                // Nothing queued after the token ran out is sent, whether or
                // not the client was reading when it did.
                s.pending.clear();
                s.pending.push_back((token_expired_event(), None));
                s.done = true;
            }
            // Being polled means the last chunk was taken: progress.
            if let Some((span, ts_us)) = s.in_flight.take()
                && let Some(trace_id) = crate::trace::id_of(&span)
            {
                s.sub.traced(ts_us, trace_id);
            }
            if let Some((chunk, traced)) = s.pending.pop_front() {
                s.sub.progressed();
                s.in_flight = traced;
                return Some((Ok(chunk), s));
            }
            if s.done {
                return None;
            }
            tokio::select! {
                _ = s.shutdown.cancelled() => s.done = true,
                _ = auth::expired(&mut s.expiry) => {
                    s.pending.push_back((token_expired_event(), None));
                    s.done = true;
                }
                _ = s.keepalive.tick() => s.pending.push_back((Bytes::from_static(b": keep-alive\n\n"), None)),
                // A snapshot's parts go out before any live update.
                frame = next_snapshot_frame(&mut s.snapshot) => match frame {
                    Some(Ok(f)) => s.pending.push_back((snapshot_event(f), None)),
                    Some(Err(e)) => {
                        // The client reconnects without an event id: a fresh snapshot.
                        s.pending.push_back((error_event(&e), None));
                        s.done = true;
                    }
                    None => s.snapshot = None,
                },
                open = s.sub.next(&mut s.out), if s.snapshot.is_none() => {
                    for item in s.out.drain(..) {
                        match item {
                            FeedItem::Update(u) => {
                                s.sub.delivered(u.ts_us);
                                s.pending.push_back((u.sse_event.clone(), deliver_span(&u, "sse").map(|span| (span, u.ts_us))));
                            }
                            FeedItem::Reset { offset, reason } => {
                                s.pending.push_back((Bytes::from(format!("event: reset\ndata: {}\n\n", reset_json(offset, reason))), None));
                            }
                        }
                    }
                    if !open {
                        if s.sub.ended() == Ended::SlowConsumer {
                            s.pending.push_back((error_event(&ClientError::new(
                                ClientErrorCode::SlowConsumer,
                                "this client fell too far behind; reconnect to resume",
                            )), None));
                        }
                        s.done = true;
                    }
                }
            }
        }
    }
}

/// The last event of a stream whose token ran out: the client reconnects
/// with a fresh token (and its `Last-Event-ID`, so nothing is missed).
fn token_expired_event() -> Bytes {
    error_event(&ClientError::new(
        ClientErrorCode::TokenExpired,
        "the token has expired; reconnect with a fresh one",
    ))
}

fn error_event(e: &ClientError) -> Bytes {
    Bytes::from(format!("event: error\ndata: {}\n\n", e.to_json()))
}

/// A snapshot frame as an event; `snapshot_end` carries the offset updates
/// follow as the event id, so a reconnect resumes after the snapshot.
fn snapshot_event(f: crate::hub::session::SnapshotFrame) -> Bytes {
    Bytes::from(match f.end_offset {
        Some(Some(offset)) => format!("id: {offset}\nevent: snapshot_end\ndata: {}\n\n", f.json),
        Some(None) => format!("event: snapshot_end\ndata: {}\n\n", f.json),
        None => format!("event: snapshot\ndata: {}\n\n", f.json),
    })
}

/// An SSE subscribe answers with the status its code calls for.
impl From<ClientError> for ApiError {
    fn from(e: ClientError) -> Self {
        match e.code {
            ClientErrorCode::Unavailable => ApiError::Unavailable(e.message),
            ClientErrorCode::Busy => ApiError::Busy(e.message),
            ClientErrorCode::Forbidden => ApiError::Forbidden(e.message),
            code => ApiError::BadRequest(format!("{}: {}", code.as_str(), e.message)),
        }
    }
}
