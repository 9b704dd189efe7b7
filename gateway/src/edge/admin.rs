//! The admin listener: `/healthz`, `/readyz`, Prometheus `/metrics`, and the
//! admin API (`GET /v1/sessions`, `POST /v1/sessions/{id}/close`, `GET /v1/stats`,
//! `POST /v1/drain`: drain the node and exit, as on SIGTERM).
//!
//! Loopback by default: the admin API lists every session and closes any.
//! Metrics are labelled by protocol only, never by channel, so their
//! cardinality stays fixed.
//!
//! Who may use the admin API ([`AdminAccess`]; health, readiness and
//! metrics are open to anyone who reaches the listener):
//!
//! | request to the admin API | answer |
//! |---|---|
//! | `[admin] token` set, no `Authorization: Bearer <token>` or another token | 401 `unauthorized` |
//! | no token set, a `Host` other than an IP address or `localhost` with the listener's port (DNS rebinding: a page of a name that resolves to the listener) | 403 `forbidden_host` |
//! | an `Origin` other than the listener's own (`http://` + the `Host` it was sent to): a page of another site | 403 `forbidden_origin` |
//! | otherwise | the route |
//!
//! Without a token the API is open to whoever reaches the address, which
//! `serve` and `check` allow on loopback only
//! ([`crate::edge::config::Config::check_admin_exposure`]); `dev` too binds
//! loopback. Refusals count in `switchboard_admin_refused_total{reason}`
//! and log at `info`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde_json::json;
use tokio::sync::watch;

use crate::core::router::Router;
use crate::edge::http::{Body, error_response, json_response};

/// What every admin request shares.
pub struct AdminState {
    /// The router (sessions, stats, health).
    pub router: Arc<Router>,
    /// Flips to true on shutdown (`/readyz` turns 503).
    pub shutdown: watch::Receiver<bool>,
    /// True once a drain started (`/readyz` turns 503); `POST /v1/drain`
    /// sets it to start one.
    pub draining: Arc<watch::Sender<bool>>,
    /// Who may use the admin API.
    pub access: AdminAccess,
}

/// Who may use the admin API: the configured bearer token (if any) and the
/// listener's own address (its origin, and the `Host`s an unauthenticated
/// API answers to). Decides from a request's headers alone; see the module
/// table.
#[derive(Debug, Clone)]
pub struct AdminAccess {
    /// `[admin] token`; `None`: no authentication.
    token: Option<String>,
    /// The admin listener's port.
    port: u16,
}

/// Why an admin API request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminRefusal {
    /// 401: the token is missing or wrong.
    Unauthorized,
    /// 403: an unauthenticated API asked under a name (DNS rebinding).
    ForbiddenHost,
    /// 403: a page of another origin.
    ForbiddenOrigin,
}

impl AdminRefusal {
    /// The error code and metrics label.
    pub fn code(self) -> &'static str {
        match self {
            AdminRefusal::Unauthorized => "unauthorized",
            AdminRefusal::ForbiddenHost => "forbidden_host",
            AdminRefusal::ForbiddenOrigin => "forbidden_origin",
        }
    }

    fn response(self) -> Response<Body> {
        let (status, message) = match self {
            AdminRefusal::Unauthorized => {
                (StatusCode::UNAUTHORIZED, "the admin API needs Authorization: Bearer <[admin] token>")
            }
            AdminRefusal::ForbiddenHost => (
                StatusCode::FORBIDDEN,
                "without [admin] token the admin API answers only requests to an IP address or localhost",
            ),
            AdminRefusal::ForbiddenOrigin => {
                (StatusCode::FORBIDDEN, "the admin API does not answer pages of another origin")
            }
        };
        let mut r = error_response(status, self.code(), message);
        if self == AdminRefusal::Unauthorized {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"switchboard admin\""));
        }
        r
    }
}

impl AdminAccess {
    /// Access to the API of the admin listener bound at `addr`: with a
    /// bearer token, or (`token` empty) open.
    pub fn new(token: &str, addr: SocketAddr) -> AdminAccess {
        AdminAccess { token: (!token.is_empty()).then(|| token.to_string()), port: addr.port() }
    }

    /// Whether `req` may use the admin API (the module table).
    pub fn check<B>(&self, req: &Request<B>) -> Result<(), AdminRefusal> {
        let headers = req.headers();
        match &self.token {
            Some(token) => {
                let sent = headers
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .map(str::trim);
                if !sent.is_some_and(|s| same_secret(s.as_bytes(), token.as_bytes())) {
                    return Err(AdminRefusal::Unauthorized);
                }
            }
            None => {
                if request_host(req).is_some_and(|h| !self.is_local_authority(h)) {
                    return Err(AdminRefusal::ForbiddenHost);
                }
            }
        }
        if let Some(origin) = headers.get(header::ORIGIN) {
            let origin = origin.to_str().unwrap_or("");
            let own = match request_host(req) {
                Some(host) => origin.strip_prefix("http://").is_some_and(|o| o.eq_ignore_ascii_case(host)),
                None => origin.strip_prefix("http://").is_some_and(|o| self.is_local_authority(o)),
            };
            if !own {
                return Err(AdminRefusal::ForbiddenOrigin);
            }
        }
        Ok(())
    }

    /// `IP:PORT`, `[IPv6]:PORT` or `localhost:PORT` with the listener's
    /// port: a name no page can make resolve elsewhere.
    fn is_local_authority(&self, authority: &str) -> bool {
        let Some((host, port)) = authority.rsplit_once(':') else { return false };
        if port.parse::<u16>().ok() != Some(self.port) {
            return false;
        }
        let ip = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        host.eq_ignore_ascii_case("localhost") || ip.parse::<std::net::IpAddr>().is_ok()
    }
}

/// The authority the request was sent to: `Host`, or HTTP/2's `:authority`.
fn request_host<B>(req: &Request<B>) -> Option<&str> {
    req.headers()
        .get(header::HOST)
        .map(|h| h.to_str().unwrap_or(""))
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
}

/// Compares two secrets in time that depends on their lengths only.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The process-wide Prometheus recorder (installed once; several gateways in
/// one test process share it).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics may be empty");
            }
            describe();
            handle
        })
        .clone()
}

fn describe() {
    metrics::describe_gauge!("switchboard_connections", "Open client sessions, by protocol");
    metrics::describe_counter!("switchboard_connections_opened_total", "Sessions opened, by protocol");
    metrics::describe_gauge!("switchboard_subscriptions", "Subscriptions held (filter, session)");
    metrics::describe_gauge!("switchboard_channels", "Channels with state");
    metrics::describe_gauge!("switchboard_presence_members", "Presence members over all channels");
    metrics::describe_gauge!("switchboard_history_bytes", "Bytes of history over all channels");
    metrics::describe_gauge!("switchboard_retained_bytes", "Bytes of retained values over all channels");
    metrics::describe_counter!("switchboard_messages_in_total", "Messages published, by protocol");
    metrics::describe_counter!(
        "switchboard_publish_duplicates_total",
        "Publishes acknowledged as duplicates, by protocol"
    );
    metrics::describe_counter!("switchboard_messages_out_total", "Messages delivered to subscribers, by protocol");
    metrics::describe_counter!("switchboard_bytes_in_total", "Bytes received, by protocol");
    metrics::describe_counter!("switchboard_bytes_out_total", "Bytes sent, by protocol");
    metrics::describe_counter!(
        "switchboard_slow_consumer_closes_total",
        "Sessions closed as slow consumers, by protocol"
    );
    metrics::describe_counter!("switchboard_protocol_errors_total", "Bad frames received, by protocol and code");
    metrics::describe_counter!(
        "switchboard_origin_refused_total",
        "Browser requests refused for their Origin ([http] allowed_origins), by route"
    );
    metrics::describe_counter!("switchboard_admin_refused_total", "Admin API requests refused, by reason");
    metrics::describe_counter!(
        "switchboard_nats_live_messages_total",
        "Messages this node's live JetStream consumers read (NATS engine)"
    );
    metrics::describe_counter!(
        "switchboard_nats_consumers_started_total",
        "Live JetStream consumers started, by stream subject root (NATS engine)"
    );
}

/// Routes one admin request from `peer`: health, readiness and metrics
/// for anyone; the admin API once [`AdminAccess`] allows it.
pub async fn handle(
    state: Arc<AdminState>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let open = matches!((req.method(), req.uri().path()), (&Method::GET, "/healthz" | "/readyz" | "/metrics"));
    if !open && let Err(why) = state.access.check(&req) {
        metrics::counter!("switchboard_admin_refused_total", "reason" => why.code()).increment(1);
        tracing::info!(%peer, reason = why.code(), method = %req.method(), path = req.uri().path(), "refused an admin request");
        return Ok(why.response());
    }
    let (router, shutdown) = (&state.router, &state.shutdown);
    let resp = match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => json_response(StatusCode::OK, &json!({"status": "ok"})),
        (&Method::GET, "/readyz") => {
            if *shutdown.borrow() || *state.draining.borrow() {
                json_response(StatusCode::SERVICE_UNAVAILABLE, &json!({"status": "draining"}))
            } else if let Err(reason) = router.health() {
                json_response(StatusCode::SERVICE_UNAVAILABLE, &json!({"status": "storage failed", "reason": reason}))
            } else {
                json_response(StatusCode::OK, &json!({"status": "ready"}))
            }
        }
        (&Method::GET, "/metrics") => {
            let text = metrics_handle().render();
            let mut r = Response::new(crate::edge::http::full(text));
            r.headers_mut()
                .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain; version=0.0.4"));
            r
        }
        (&Method::GET, "/v1/sessions") => json_response(StatusCode::OK, &json!({"sessions": router.sessions()})),
        (&Method::GET, "/v1/stats") => {
            let s = router.stats();
            json_response(
                StatusCode::OK,
                &json!({
                    "node": router.node(),
                    "sessions": router.session_count(),
                    "channels": s.channels,
                    "subscriptions": s.subscriptions,
                    "presence_members": s.presence_members,
                }),
            )
        }
        (&Method::POST, "/v1/drain") => {
            if !state.draining.send_replace(true) {
                tracing::info!(%peer, "drain asked for through the admin API");
            }
            json_response(StatusCode::ACCEPTED, &json!({"status": "draining"}))
        }
        (&Method::POST, path) if path.starts_with("/v1/sessions/") && path.ends_with("/close") => {
            let id = path.trim_start_matches("/v1/sessions/").trim_end_matches("/close");
            match id.parse::<u64>() {
                Ok(id) if router.kick(id) => json_response(StatusCode::OK, &json!({"id": id, "closed": true})),
                Ok(id) => error_response(StatusCode::NOT_FOUND, "not_found", format!("no open session {id}")),
                Err(_) => error_response(StatusCode::BAD_REQUEST, "bad_request", "session id must be a number"),
            }
        }
        (_, path) => error_response(StatusCode::NOT_FOUND, "not_found", format!("no admin route {path}")),
    };
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Who asks, with which headers, and the answer.
    type Case<'a> = (&'a AdminAccess, &'a [(&'a str, &'a str)], Result<(), AdminRefusal>);

    fn request(headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::post("/v1/sessions/1/close");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).expect("request")
    }

    #[test]
    fn the_module_table_holds() {
        let addr: SocketAddr = "127.0.0.1:9090".parse().expect("address");
        let open = AdminAccess::new("", addr);
        let locked = AdminAccess::new("a-token-of-16-bytes", addr);
        use AdminRefusal::*;
        let cases: [Case<'_>; 14] = [
            (&open, &[], Ok(())),
            (&open, &[("host", "127.0.0.1:9090")], Ok(())),
            (&open, &[("host", "localhost:9090"), ("origin", "http://localhost:9090")], Ok(())),
            (&open, &[("host", "[::1]:9090"), ("origin", "http://[::1]:9090")], Ok(())),
            (&open, &[("host", "evil.example:9090")], Err(ForbiddenHost)),
            (&open, &[("host", "127.0.0.1:9091")], Err(ForbiddenHost)),
            (&open, &[("host", "127.0.0.1:9090"), ("origin", "https://evil.example")], Err(ForbiddenOrigin)),
            (&open, &[("host", "127.0.0.1:9090"), ("origin", "http://localhost:9090")], Err(ForbiddenOrigin)),
            (&open, &[("origin", "http://127.0.0.1:9090")], Ok(())),
            (&open, &[("origin", "null")], Err(ForbiddenOrigin)),
            (&locked, &[("host", "admin.internal:9090")], Err(Unauthorized)),
            (&locked, &[("authorization", "Bearer a-token-of-16-bytez")], Err(Unauthorized)),
            (&locked, &[("host", "admin.internal:9090"), ("authorization", "Bearer a-token-of-16-bytes")], Ok(())),
            (
                &locked,
                &[("authorization", "Bearer a-token-of-16-bytes"), ("host", "a:1"), ("origin", "http://b:1")],
                Err(ForbiddenOrigin),
            ),
        ];
        for (access, headers, want) in cases {
            assert_eq!(access.check(&request(headers)), want, "{headers:?}");
        }
        assert!(same_secret(b"abc", b"abc") && !same_secret(b"abc", b"abd") && !same_secret(b"abc", b"abcd"));
    }
}
