//! The HTTP listener's routes: WebSocket upgrade at `/v1/ws`, the echo route
//! `/v1/ws-echo`, the REST API under `/v1/channels/`, and the demo page.
//!
//! REST (all bodies JSON; errors are `{"error":{"code","message"}}` with the
//! codes of docs/protocol.md):
//!
//! | method and path | does | success |
//! |---|---|---|
//! | `POST /v1/channels/{channel}/messages` | publish (`X-Api-Key` if keys are configured; `Idempotency-Key` honoured) | 200 `{"channel","epoch","serial","duplicate"}` |
//! | `GET /v1/channels/{channel}/history?since=EPOCH:SERIAL&limit=N&reverse=1` | read history | 200 `{"channel","epoch","serial","messages":[...]}` |
//! | `GET /v1/channels/{channel}/presence` | list members | 200 `{"channel","members":[...]}` |
//!
//! `{channel}` is the channel name with its `/` kept (`/v1/channels/sensors/1/messages`)
//! or percent-encoded. The handlers only translate HTTP to router calls.
//!
//! Every browser-facing route (WebSocket and MQTT-over-WebSocket upgrades,
//! SSE, long polling, `POST /v1/refresh`, REST) first checks the request's
//! `Origin` against `[http] allowed_origins`
//! ([`switchboard_protocols::origin`]): a page of another origin gets 403
//! `forbidden_origin`; a request without `Origin` is not a browser's and goes
//! on. The demo page, `/v1/client.js`, `/v1/transports` and
//! `/v1/wt/cert-hash` are for any page.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::json;
use switchboard_proto::{self as proto, ErrorCode};
use switchboard_protocols::origin::OriginPolicy;
use switchboard_protocols::port::{Core, CoreError};
use switchboard_protocols::stream::{RequestError, StreamLimits, StreamRequest};
use switchboard_protocols::{mqtt, poll, sse, ws, ws_frames};
use tokio::sync::watch;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

use crate::core::auth::{Caps, Op};
use crate::core::engine::Caller;
use crate::core::router::Router;
use crate::edge::config::Config;

mod rest;
mod streams;
mod upgrade;

use rest::*;
use streams::*;
pub use streams::{ParkedPolls, PollSlot};
use upgrade::*;

/// Response body type of every route.
pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// A complete body.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed_unsync()
}

/// What every HTTP handler shares: one allocation, cloned per connection
/// and request as a pointer.
#[derive(Clone)]
pub struct HttpState(Arc<HttpShared>);

impl HttpState {
    /// Shares `shared`.
    pub fn new(shared: HttpShared) -> HttpState {
        HttpState(Arc::new(shared))
    }
}

impl std::ops::Deref for HttpState {
    type Target = HttpShared;

    fn deref(&self) -> &HttpShared {
        &self.0
    }
}

/// The contents of [`HttpState`].
pub struct HttpShared {
    /// The router.
    pub router: Arc<Router>,
    /// TLS (for `GET /v1/wt/cert-hash`), when a TLS listener is enabled.
    pub tls: Option<Arc<crate::edge::tls::TlsState>>,
    /// Configuration.
    pub config: Arc<Config>,
    /// WebSocket front-end settings.
    pub ws: ws::WsConfig,
    /// Serve `/v1/ws-echo`.
    pub echo: bool,
    /// Flips to true on shutdown.
    pub shutdown: watch::Receiver<bool>,
    /// SSE settings.
    pub sse: sse::SseConfig,
    /// Long-poll settings.
    pub poll: poll::PollConfig,
    /// Limits on SSE and long-poll requests.
    pub stream_limits: StreamLimits,
    /// MQTT front-end settings (for `/mqtt`).
    pub mqtt: Arc<mqtt::MqttConfig>,
    /// MQTT persistent sessions, shared with the TCP listener.
    pub mqtt_sessions: Arc<dyn mqtt::SessionStore>,
    /// The pages allowed to use the browser-facing routes (`[http]
    /// allowed_origins`).
    pub origins: OriginPolicy,
    /// The other listeners' ports, for `GET /v1/transports`.
    pub listeners: Listeners,
    /// Long-poll sessions parked between polls (`session=`).
    pub parked: Arc<ParkedPolls>,
}

/// The ports of the listeners a page cannot learn from its own URL: what
/// `GET /v1/transports` tells the browser client (which WebTransport port to
/// try) and the demo page (which MQTT port its command lines name). `None`:
/// the listener is off.
#[derive(Debug, Clone, Copy, Default)]
pub struct Listeners {
    /// QUIC (WebTransport).
    pub quic: Option<u16>,
    /// MQTT over TCP.
    pub mqtt: Option<u16>,
    /// MQTT over TLS.
    pub mqtts: Option<u16>,
    /// HTTPS.
    pub https: Option<u16>,
}

/// The HTTP status for a core error code.
pub fn status_for(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::MessageTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorCode::PermissionDenied | ErrorCode::ReservedChannel => StatusCode::FORBIDDEN,
        ErrorCode::BadPosition => StatusCode::CONFLICT,
        ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::BAD_REQUEST,
    }
}

/// `GET /v1/wt/cert-hash`: the SHA-256 of the certificate the QUIC
/// listener presents, for `new WebTransport(url, {serverCertificateHashes})`.
/// Public information (any TLS client sees the certificate), so any origin
/// may read it.
fn cert_hash(state: &HttpState) -> Response<Body> {
    let Some(hash) = state.tls.as_ref().and_then(|t| t.cert_hash()) else {
        return error_response(StatusCode::NOT_FOUND, "not_found", "no TLS listener is enabled".to_string());
    };
    use base64::Engine as _;
    let body = serde_json::json!({
        "algorithm": "sha-256",
        "hex": crate::edge::tls::hex(&hash),
        "base64": base64::engine::general_purpose::STANDARD.encode(hash),
    });
    let mut resp = json_response(StatusCode::OK, &body);
    resp.headers_mut().insert(http::header::ACCESS_CONTROL_ALLOW_ORIGIN, http::HeaderValue::from_static("*"));
    resp.headers_mut().insert(http::header::CACHE_CONTROL, http::HeaderValue::from_static("no-store"));
    resp
}

/// `GET /v1/transports`: which listeners this gateway runs, by port, for a
/// page that knows only the HTTP(S) origin it was loaded from. The browser
/// client learns from it whether (and where) to try WebTransport and whether
/// to pin the certificate by hash (only a generated development certificate
/// can be: browsers accept `serverCertificateHashes` only for certificates
/// valid at most 14 days, which the generated one is and a CA-issued one is
/// not). Ports are no secret (a port scan finds them), so any origin may
/// read it.
fn transports(state: &HttpState) -> Response<Body> {
    let l = &state.listeners;
    let port = |p: Option<u16>| p.map(|port| json!({"port": port}));
    let webtransport = l.quic.zip(state.tls.as_ref()).map(|(port, tls)| {
        let pin = tls.is_generated().then(|| tls.cert_hash()).flatten();
        json!({
            "port": port,
            "path": "/v1/wt",
            "certificate_hash": pin.map(|h| json!({"algorithm": "sha-256", "hex": crate::edge::tls::hex(&h)})),
        })
    });
    let body = json!({
        "webtransport": webtransport,
        "websocket": {"path": "/v1/ws", "subprotocols": ["switchboard.v1.json", "switchboard.v1.proto"]},
        "sse": {"path": "/v1/sse", "keepalive_ms": state.sse.keepalive.as_millis() as u64},
        "poll": {"path": "/v1/poll"},
        "https": port(l.https),
        "mqtt": port(l.mqtt),
        "mqtts": port(l.mqtts),
        "version": env!("CARGO_PKG_VERSION"),
    });
    let mut resp = json_response(StatusCode::OK, &body);
    resp.headers_mut().insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// A JSON response.
pub fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(full(value.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// An error response in the documented shape.
pub fn error_response(status: StatusCode, code: &str, message: impl std::fmt::Display) -> Response<Body> {
    json_response(status, &json!({"error": {"code": code, "message": message.to_string()}}))
}

fn core_error(e: &CoreError) -> Response<Body> {
    error_response(status_for(e.code), e.code.slug(), &e.message)
}

fn raw_json(text: String) -> Response<Body> {
    let mut r = Response::new(full(text));
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// The route of a browser-facing path, as labelled in
/// `switchboard_origin_refused_total{route}`; `None` for the paths any page
/// may read (the demo page, `/v1/wt/cert-hash`, `/v1/transports`,
/// `/v1/client.js`) and unknown ones.
fn browser_route(path: &str) -> Option<&'static str> {
    match path {
        "/v1/ws" => Some("ws"),
        "/v1/ws-echo" => Some("ws_echo"),
        "/mqtt" => Some("mqtt_ws"),
        "/v1/sse" => Some("sse"),
        "/v1/poll" => Some("poll"),
        "/v1/refresh" => Some("refresh"),
        p if p.starts_with("/v1/channels/") => Some("rest"),
        _ => None,
    }
}

/// The 403 `forbidden_origin` for a browser-facing request whose `Origin`
/// the policy does not allow (counted and logged); `None` lets it through.
/// A request without `Origin` is not a browser's and always goes on.
fn refuse_origin<B>(state: &HttpState, peer: SocketAddr, req: &Request<B>) -> Option<Response<Body>> {
    let route = browser_route(req.uri().path())?;
    // An Origin that is not visible ASCII matches no entry.
    let origin = req.headers().get(header::ORIGIN).map(|v| v.to_str().unwrap_or(""));
    if state.origins.allows(origin) {
        return None;
    }
    let origin = origin.unwrap_or_default();
    switchboard_protocols::origin::refused(route, origin, Some(peer));
    Some(error_response(
        StatusCode::FORBIDDEN,
        "forbidden_origin",
        format!("pages from origin {origin:?} may not use this gateway (it is not in [http] allowed_origins)"),
    ))
}

/// `GET /v1/sse` and `GET /v1/poll`; `None` for any other request. The
/// front door ([`crate::edge::front`]) calls this for the HTTP/1.1 requests it
/// serves itself, hyper's handler ([`handle`]) for the rest. Both check the
/// `Origin` first.
pub async fn stream_get<B>(state: HttpState, peer: SocketAddr, req: &Request<B>) -> Option<Response<Body>> {
    if req.method() != Method::GET {
        return None;
    }
    if let Some(refusal) = refuse_origin(&state, peer, req) {
        return Some(refusal);
    }
    serve_stream_get(state, peer, req).await
}

/// [`stream_get`] once the method and the `Origin` are settled.
async fn serve_stream_get<B>(state: HttpState, peer: SocketAddr, req: &Request<B>) -> Option<Response<Body>> {
    match req.uri().path() {
        "/v1/sse" => Some(serve_sse(state, peer, req).await),
        "/v1/poll" => Some(serve_poll(state, peer, req, query_pairs(req)).await),
        _ => None,
    }
}

/// Routes one request.
pub async fn handle(
    state: HttpState,
    peer: SocketAddr,
    ticket: Option<Arc<crate::edge::admission::Ticket>>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    if let Some(refusal) = refuse_origin(&state, peer, &req) {
        return Ok(refusal);
    }
    let path = req.uri().path().to_string();
    let resp = match (req.method(), path.as_str()) {
        (&Method::GET, "/v1/ws") => upgrade(state, peer, ticket, req, Route::Switchboard),
        (&Method::GET, "/v1/ws-echo") if state.echo => upgrade(state, peer, ticket, req, Route::Echo),
        (&Method::GET, "/mqtt") => upgrade(state, peer, ticket, req, Route::Mqtt),
        (&Method::GET, "/") => demo_page(),
        (&Method::GET, "/v1/wt/cert-hash") => cert_hash(&state),
        (&Method::GET, "/v1/transports") => transports(&state),
        (&Method::GET, "/v1/client.js") => client_module(),
        (&Method::GET, "/v1/sse" | "/v1/poll") => match serve_stream_get(state, peer, &req).await {
            Some(r) => r,
            None => error_response(StatusCode::NOT_FOUND, "not_found", format!("no route for {path}")),
        },
        (&Method::POST, "/v1/poll") => poll_post(state, peer, req).await,
        (&Method::POST, "/v1/refresh") => refresh_stream(state, peer, req).await,
        (_, "/v1/sse" | "/v1/poll" | "/v1/refresh") => {
            error_response(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "GET /v1/sse; GET or POST /v1/poll")
        }
        (_, p) if p.starts_with("/v1/channels/") => rest(state, peer, req).await,
        (_, "/v1/ws") => {
            error_response(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "use GET with a WebSocket upgrade")
        }
        _ => error_response(StatusCode::NOT_FOUND, "not_found", format!("no route for {path}")),
    };
    Ok(resp)
}

fn query_pairs<B>(req: &Request<B>) -> Vec<(String, String)> {
    req.uri().query().map(|q| url::form_urlencoded::parse(q.as_bytes()).into_owned().collect()).unwrap_or_default()
}

/// `GET /v1/client.js`: the browser client, an ES module with no
/// dependencies (source: `gateway/src/edge/web/client.js`). Readable from
/// any origin: a page elsewhere may `import` it (module scripts are fetched
/// with CORS), and it is public code.
fn client_module() -> Response<Body> {
    let mut r = Response::new(full(Bytes::from_static(include_bytes!("../web/client.js"))));
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/javascript; charset=utf-8"));
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

fn demo_page() -> Response<Body> {
    let mut r = Response::new(full(Bytes::from_static(include_bytes!("../web/demo.html"))));
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_routes() {
        assert_eq!(channel_route("/v1/channels/a/messages"), Some(("a".into(), "messages")));
        assert_eq!(channel_route("/v1/channels/a/b/c/history"), Some(("a/b/c".into(), "history")));
        assert_eq!(channel_route("/v1/channels/a%2Fb/presence"), Some(("a/b".into(), "presence")));
        assert_eq!(channel_route("/v1/channels/x/messages/messages"), Some(("x/messages".into(), "messages")));
        assert_eq!(channel_route("/v1/channels/messages"), None);
    }

    #[test]
    fn statuses() {
        assert_eq!(status_for(ErrorCode::InvalidChannel), StatusCode::BAD_REQUEST);
        assert_eq!(status_for(ErrorCode::MessageTooLarge), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(status_for(ErrorCode::ReservedChannel), StatusCode::FORBIDDEN);
        assert_eq!(status_for(ErrorCode::BadPosition), StatusCode::CONFLICT);
    }
}
