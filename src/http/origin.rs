//! Where a request comes from, checked for every route and both realtime
//! transports: which `Host` names the service answers to (a DNS-rebinding
//! page names its own), which browser origins may open a stream, and which
//! address a client has when it comes through a trusted proxy.

use std::net::IpAddr;

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{self, HeaderValue};
use actix_web::middleware::Next;
use actix_web::{HttpRequest, HttpResponse, ResponseError, web};

use super::AppState;
use super::error::ApiError;
use crate::settings::{ServerSettings, TrustedProxies};

/// The `Host` names requests may carry. `localhost` and IP literals always
/// pass: a rebinding page can only put its own DNS name in `Host`, so names
/// are what must be listed. Ports are compared only where an entry names one:
/// port mappings (Docker, a balancer on 443) change what clients send.
#[derive(Debug, Clone)]
pub(crate) struct HostPolicy {
    any: bool,
    names: Vec<(String, Option<u16>)>,
}

impl HostPolicy {
    pub(crate) fn new(server: &ServerSettings) -> Self {
        let mut names: Vec<(String, Option<u16>)> = server
            .allowed_hosts
            .iter()
            .map(|h| split_host(h.trim()))
            .map(|(name, port)| (normalize(name), port))
            .collect();
        // A bind to a name (not an address) is a name clients use.
        if server.host.parse::<IpAddr>().is_err() {
            names.push((normalize(&server.host), None));
        }
        Self {
            any: server.allowed_hosts.iter().any(|h| h.trim() == "*"),
            names,
        }
    }

    pub(crate) fn allows(&self, host: &str) -> bool {
        if self.any {
            return true;
        }
        let (name, port) = split_host(host.trim());
        let literal = name.strip_prefix('[').and_then(|n| n.strip_suffix(']')).unwrap_or(name);
        if literal.parse::<IpAddr>().is_ok() {
            return true;
        }
        let name = normalize(name);
        name == "localhost"
            || self
                .names
                .iter()
                .any(|(n, p)| *n == name && (p.is_none() || *p == port))
    }
}

/// `name[:port]`, `[v6][:port]`; an unbracketed v6 address is all name.
fn split_host(host: &str) -> (&str, Option<u16>) {
    if host.starts_with('[') {
        let end = host.find(']').map_or(host.len(), |i| i + 1);
        let (name, after) = host.split_at(end);
        return (name, after.strip_prefix(':').and_then(|p| p.parse().ok()));
    }
    match host.rsplit_once(':') {
        Some((name, port)) if !name.contains(':') => (name, port.parse().ok()),
        _ => (host, None),
    }
}

fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// Middleware over the whole app: a request naming a host the service does
/// not answer to is refused before any route sees it. A request without
/// `Host` is not a browser's and passes.
pub(crate) async fn check_host(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    let host = req
        .headers()
        .get(header::HOST)
        .map(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| Some(a.as_str())));
    let allowed = match (host, req.app_data::<web::Data<HostPolicy>>()) {
        (None, _) | (_, None) => true,
        (Some(None), _) => false,
        (Some(Some(host)), Some(policy)) => policy.allows(host),
    };
    if allowed {
        return Ok(next.call(req).await?.map_into_left_body());
    }
    if let Some(state) = req.app_data::<web::Data<AppState>>() {
        state.metrics.clients_refused.get_or_create(&[("reason", "host")]).inc();
    }
    let refusal = ApiError::BadHost("this service does not answer to that Host; see server.allowed_hosts".into());
    Ok(req.into_response(refusal.error_response()).map_into_right_body())
}

/// What a request's `Origin` means for a realtime stream.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Origin {
    /// No `Origin`: not a browser (curl, a server), always allowed.
    Absent,
    /// A page allowed to read the stream; CORS answers echo it.
    Allowed(HeaderValue),
    Refused,
}

/// Browsers send `Origin`; a page from elsewhere must be in `allowed`
/// (`hub.allowed_origins`). Same-origin pages (the echo page) always pass;
/// `Host` is trustworthy here because `check_host` has vetted it.
pub(crate) fn check_origin(req: &HttpRequest, allowed: &[String]) -> Origin {
    let Some(value) = req.headers().get(header::ORIGIN) else {
        return Origin::Absent;
    };
    let Ok(origin) = value.to_str() else {
        return Origin::Refused;
    };
    if allowed.iter().any(|a| a == "*" || a.eq_ignore_ascii_case(origin)) {
        return Origin::Allowed(value.clone());
    }
    let host = origin.split_once("://").map(|(_, h)| h).unwrap_or("");
    let own = req.headers().get(header::HOST).and_then(|h| h.to_str().ok());
    if own.is_some_and(|own| own.eq_ignore_ascii_case(host)) {
        Origin::Allowed(value.clone())
    } else {
        Origin::Refused
    }
}

/// Counts and answers a refused origin.
pub(crate) fn origin_refused(state: &AppState, what: &str) -> ApiError {
    state
        .metrics
        .clients_refused
        .get_or_create(&[("reason", "origin")])
        .inc();
    ApiError::Forbidden(format!("this Origin may not open {what} here"))
}

/// CORS preflight of `/events`: `EventSource` itself sends none, but a page
/// reading the stream with `fetch` and `Last-Event-ID` does.
pub(crate) async fn preflight(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let mut res = HttpResponse::NoContent();
    res.insert_header((header::ALLOW, "GET, OPTIONS"))
        .insert_header((header::VARY, "Origin"));
    match check_origin(&req, &state.hub.settings().allowed_origins) {
        Origin::Refused => return Err(origin_refused(&state, "an event stream")),
        Origin::Absent => {}
        Origin::Allowed(origin) => {
            res.insert_header((header::ACCESS_CONTROL_ALLOW_ORIGIN, origin))
                .insert_header((header::ACCESS_CONTROL_ALLOW_METHODS, "GET"))
                .insert_header((header::ACCESS_CONTROL_ALLOW_HEADERS, "Last-Event-ID, Authorization"))
                .insert_header((header::ACCESS_CONTROL_MAX_AGE, "600"));
        }
    }
    Ok(res.finish())
}

/// The client's address for per-address limits. Behind a load balancer every
/// peer is the balancer; only from a peer in `server.trusted_proxies` is
/// `X-Forwarded-For` believed, and then only up to its rightmost address not
/// itself a trusted proxy (the one the nearest trusted proxy saw): what a
/// client writes into the header lies left of that and is never reached.
pub(crate) fn client_ip(req: &HttpRequest, trusted: &TrustedProxies) -> Option<IpAddr> {
    let peer = req.peer_addr()?.ip().to_canonical();
    if trusted.is_empty() || !trusted.contains(peer) {
        return Some(peer);
    }
    let hops: Vec<&str> = req
        .headers()
        .get_all("x-forwarded-for")
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .collect();
    let mut client = peer;
    for hop in hops.iter().rev() {
        // A hop a trusted proxy wrote but that does not parse: keep the last
        // address known for sure.
        let Some(ip) = parse_hop(hop) else { break };
        client = ip;
        if !trusted.contains(ip) {
            break;
        }
    }
    Some(client)
}

/// `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1` or `[2001:db8::1]:443`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    hop.parse::<IpAddr>()
        .ok()
        .or_else(|| hop.parse::<std::net::SocketAddr>().ok().map(|s| s.ip()))
        .map(|ip| ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allowed: &[&str], bind: &str) -> HostPolicy {
        let settings =
            crate::settings::Settings::load(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config"))
                .map(|s| s.server)
                .unwrap();
        HostPolicy::new(&ServerSettings {
            host: bind.into(),
            allowed_hosts: allowed.iter().map(|s| s.to_string()).collect(),
            ..settings
        })
    }

    #[test]
    fn host_names_must_be_listed_and_addresses_always_pass() {
        let p = policy(&["shop.example", "api.example:8443"], "0.0.0.0");
        for ok in [
            "localhost",
            "localhost:8080",
            "LOCALHOST.",
            "127.0.0.1:8080",
            "10.0.0.7",
            "[::1]:8080",
            "[::1]",
            "shop.example",
            "Shop.Example:443",
            "api.example:8443",
        ] {
            assert!(p.allows(ok), "{ok}");
        }
        for refused in [
            "evil.example",
            "evil.example:8080",
            "api.example:8080",
            "api.example",
            "localhost.evil.example",
            "shop.example.evil.example",
            "",
        ] {
            assert!(!p.allows(refused), "{refused}");
        }
        assert!(policy(&[], "gateway.internal").allows("gateway.internal:8080"));
        assert!(policy(&["*"], "127.0.0.1").allows("anything.example"));
    }

    #[test]
    fn forwarded_hops_parse_with_or_without_port() {
        assert_eq!(parse_hop(" 192.0.2.1 "), Some("192.0.2.1".parse().unwrap()));
        assert_eq!(parse_hop("192.0.2.1:5000"), Some("192.0.2.1".parse().unwrap()));
        assert_eq!(parse_hop("[2001:db8::1]:443"), Some("2001:db8::1".parse().unwrap()));
        assert_eq!(parse_hop("::ffff:192.0.2.1"), Some("192.0.2.1".parse().unwrap()));
        assert_eq!(parse_hop("unknown"), None);
    }
}
