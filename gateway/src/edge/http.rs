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
use switchboard_protocols::port::{Core, CoreError};
use switchboard_protocols::stream::{RequestError, StreamLimits, StreamRequest};
use switchboard_protocols::{mqtt, poll, sse, ws};
use tokio::sync::watch;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

use crate::core::auth::Caps;
use crate::edge::config::Config;
use crate::core::engine::Caller;
use crate::core::router::Router;

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

/// `GET /v1/sse` and `GET /v1/poll`; `None` for any other request. The
/// front door ([`crate::edge::front`]) calls this for the HTTP/1.1 requests it
/// serves itself, hyper's handler for the rest.
pub async fn stream_get<B>(state: HttpState, peer: SocketAddr, req: &Request<B>) -> Option<Response<Body>> {
    if req.method() != Method::GET {
        return None;
    }
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
    let path = req.uri().path().to_string();
    let resp = match (req.method(), path.as_str()) {
        (&Method::GET, "/v1/ws") => upgrade(state, peer, ticket, req, Route::Switchboard),
        (&Method::GET, "/v1/ws-echo") if state.echo => upgrade(state, peer, ticket, req, Route::Echo),
        (&Method::GET, "/mqtt") => upgrade(state, peer, ticket, req, Route::Mqtt),
        (&Method::GET, "/") => demo_page(),
        (&Method::GET, "/v1/wt/cert-hash") => cert_hash(&state),
        (&Method::GET, "/v1/sse" | "/v1/poll") => match stream_get(state, peer, &req).await {
            Some(r) => r,
            None => error_response(StatusCode::NOT_FOUND, "not_found", format!("no route for {path}")),
        },
        (&Method::POST, "/v1/poll") => poll_post(state, peer, req).await,
        (&Method::POST, "/v1/refresh") => refresh_stream(state, req).await,
        (_, "/v1/sse" | "/v1/poll" | "/v1/refresh") => {
            error_response(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "GET /v1/sse; GET or POST /v1/poll")
        }
        (_, p) if p.starts_with("/v1/channels/") => rest(state, req).await,
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

/// What a WebSocket upgrade leads to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    /// `/v1/ws`: Switchboard frames.
    Switchboard,
    /// `/v1/ws-echo`: raw echo.
    Echo,
    /// `/mqtt`: MQTT packets over WebSocket.
    Mqtt,
}

fn upgrade(
    state: HttpState,
    peer: SocketAddr,
    ticket: Option<Arc<crate::edge::admission::Ticket>>,
    mut req: Request<Incoming>,
    route: Route,
) -> Response<Body> {
    let headers = req.headers();
    let has_token = |name: header::HeaderName, token: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    if !has_token(header::UPGRADE, "websocket") || !has_token(header::CONNECTION, "upgrade") {
        return error_response(
            StatusCode::UPGRADE_REQUIRED,
            "upgrade_required",
            "this endpoint needs a WebSocket upgrade",
        );
    }
    if headers.get(header::SEC_WEBSOCKET_VERSION).and_then(|v| v.to_str().ok()) != Some("13") {
        let mut r =
            error_response(StatusCode::BAD_REQUEST, "bad_websocket_version", "Sec-WebSocket-Version must be 13");
        r.headers_mut().insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        return r;
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY).map(|k| derive_accept_key(k.as_bytes())) else {
        return error_response(StatusCode::BAD_REQUEST, "bad_websocket_key", "Sec-WebSocket-Key is missing");
    };
    let offered: Option<String> = {
        let all: Vec<&str> =
            headers.get_all(header::SEC_WEBSOCKET_PROTOCOL).iter().filter_map(|v| v.to_str().ok()).collect();
        (!all.is_empty()).then(|| all.join(","))
    };
    if route == Route::Mqtt {
        let offers_mqtt = offered.as_deref().is_some_and(|o| o.split(',').any(|p| p.trim() == mqtt::ws::SUBPROTOCOL));
        if !offers_mqtt {
            return error_response(
                StatusCode::BAD_REQUEST,
                "unsupported_subprotocol",
                "MQTT over WebSocket needs Sec-WebSocket-Protocol: mqtt",
            );
        }
    }
    let codec = if route != Route::Switchboard {
        None
    } else {
        match ws::negotiate(offered.as_deref()) {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "refused WebSocket subprotocol");
                return error_response(
                    StatusCode::BAD_REQUEST,
                    "unsupported_subprotocol",
                    format!("{e}; supported: {}, {}", ws::SUBPROTOCOL_JSON, ws::SUBPROTOCOL_PROTO),
                );
            }
        }
    };
    let query = query_pairs(&req);
    let get = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()).unwrap_or_default();
    let info = ws::ConnInfo { peer: Some(peer), token: get("token"), client_id: get("client_id") };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let mut ws_cfg = state.ws.clone();
    match route {
        Route::Echo => ws_cfg.max_frame_size = state.config.echo.max_message_size,
        // A WebSocket message may carry a whole MQTT packet.
        Route::Mqtt => ws_cfg.max_frame_size = ws_cfg.max_frame_size.max(state.mqtt.max_packet_size + 8),
        Route::Switchboard => {}
    }
    let shutdown = state.shutdown.clone();
    let router = state.router.clone();
    let mqtt_sessions = state.mqtt_sessions.clone();
    let mqtt_cfg = state.mqtt.clone();
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "WebSocket upgrade failed");
                return;
            }
        };
        let stream =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(ws::websocket_config(&ws_cfg)))
                .await;
        let core: Arc<dyn Core> = router;
        // The session runs in a task of its own, as large as its route's
        // future and no larger (a WebSocket session does not pay for MQTT's
        // or the echo's); this task, which held the upgrade, ends here.
        // The connection's admission slot goes with the session.
        let hold = move |()| drop(ticket);
        use futures_util::FutureExt as _;
        match route {
            Route::Echo => tokio::spawn(ws::serve_echo(stream, shutdown).map(hold)),
            Route::Mqtt => {
                tokio::spawn(mqtt::serve_ws(stream, core, mqtt_sessions, mqtt_cfg, Some(peer), shutdown).map(hold))
            }
            Route::Switchboard => tokio::spawn(
                ws::serve(stream, codec.unwrap_or(ws::Codec::Json), core, info, ws_cfg, shutdown).map(hold),
            ),
        };
    });
    let mut r = Response::new(full(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(v) = HeaderValue::from_str(&key) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    if let Some(c) = codec
        && offered.is_some()
    {
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(c.subprotocol()));
    }
    if route == Route::Mqtt {
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(mqtt::ws::SUBPROTOCOL));
    }
    r
}

/// Splits `/v1/channels/{channel}/{action}` into the decoded channel and action.
fn channel_route(path: &str) -> Option<(String, &str)> {
    let rest = path.strip_prefix("/v1/channels/")?;
    let (raw, action) = rest.rsplit_once('/')?;
    let channel = percent_encoding::percent_decode_str(raw).decode_utf8().ok()?.into_owned();
    Some((channel, action))
}

fn header_str<'a, B>(req: &'a Request<B>, name: &str) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

async fn rest(state: HttpState, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let Some((channel, action)) = channel_route(&path) else {
        return error_response(
            StatusCode::NOT_FOUND,
            "not_found",
            "use /v1/channels/{channel}/messages|history|presence",
        );
    };
    let principal = match rest_principal(&state, &req) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    match (req.method().clone(), action) {
        (Method::POST, "messages") => rest_publish(state, principal, channel, req).await,
        (Method::GET, "history") => rest_history(state, principal, channel, &req).await,
        (Method::POST, "presence") => rest_presence_enter(state, principal, channel, req).await,
        (Method::DELETE, "presence") => match stream_caller(&state, &principal, header_str(&req, "x-connection-id")) {
            Ok(Some((caller, caps))) => match state.router.presence_leave_as(&caller, &caps, &channel).await {
                Ok(()) => json_response(StatusCode::OK, &json!({"channel": channel, "left": true})),
                Err(e) => core_error(&e),
            },
            Ok(None) => missing_connection(),
            Err(r) => *r,
        },
        (Method::GET, "presence") => match state.router.members_of(&principal.caps, &channel).await {
            Ok(m) => raw_json(proto::json::encode_server_frame(&proto::ServerFrame {
                req: 0,
                frame: Some(proto::server_frame::Frame::Presence(m)),
            })),
            Err(e) => core_error(&e),
        },
        (_, "messages" | "history" | "presence") => error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "POST messages; GET history and presence",
        ),
        _ => error_response(StatusCode::NOT_FOUND, "not_found", format!("unknown channel action {action:?}")),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody<'a> {
    #[serde(borrow)]
    data: Option<&'a serde_json::value::RawValue>,
    text: Option<String>,
    data_b64: Option<String>,
    id: Option<String>,
    #[serde(default)]
    content_type: String,
    #[serde(default)]
    headers: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    retain: bool,
}

/// Parses a JSON request body, or the documented 400 `bad_frame`.
fn json_body<'a, T: serde::Deserialize<'a>>(body: &'a [u8]) -> Result<T, ErrorResponse> {
    serde_json::from_slice(body).map_err(|e| {
        Box::new(error_response(StatusCode::BAD_REQUEST, ErrorCode::BadFrame.slug(), format!("bad JSON body: {e}")))
    })
}

/// The payload of a JSON body's `data` / `text` / `data_b64` fields.
fn json_payload(
    data: Option<&serde_json::value::RawValue>,
    text: Option<&str>,
    data_b64: Option<&str>,
) -> Result<Bytes, ErrorResponse> {
    proto::json::decode_payload(data, text, data_b64)
        .map_err(|e| Box::new(error_response(StatusCode::BAD_REQUEST, ErrorCode::BadFrame.slug(), e)))
}

async fn read_body(state: &HttpState, req: Request<Incoming>) -> Result<Bytes, Response<Body>> {
    let limit = state.config.limits.max_body_size;
    match Limited::new(req.into_body(), limit).collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            let message = format!("request body over {limit} bytes");
            http_limit_exceeded("body_size", &message);
            Err(error_response(StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::MessageTooLarge.slug(), message))
        }
        Err(e) => Err(error_response(StatusCode::BAD_REQUEST, "bad_request", format!("cannot read body: {e}"))),
    }
}

/// The identity of the SSE / long-poll session named by `X-Connection-Id`
/// (REST is their uplink): `Ok(None)` without the header.
/// A response that ends the request early (boxed: responses are large).
type ErrorResponse = Box<Response<Body>>;

/// Who is calling the REST API.
struct RestPrincipal {
    caller: Caller,
    caps: Arc<Caps>,
    /// Authenticated with a server API key (may act for any stream).
    api_key: bool,
}

/// Authenticates a REST request: a configured API key (`X-Api-Key`) may do
/// everything; a connection token (`Authorization: Bearer`) may do what its
/// caps allow, as its `sub`; in open mode with no API keys configured,
/// anyone may do everything. Anything else is 401.
fn rest_principal<B>(state: &HttpState, req: &Request<B>) -> Result<RestPrincipal, ErrorResponse> {
    let unauthorized =
        |m: String| Box::new(error_response(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized.slug(), m));
    let keys = &state.config.rest.api_keys;
    if let Some(k) = header_str(req, "x-api-key") {
        return if keys.iter().any(|known| known == k) {
            Ok(RestPrincipal { caller: Router::rest_caller(""), caps: Arc::new(Caps::all()), api_key: true })
        } else {
            Err(unauthorized("unknown API key".into()))
        };
    }
    if let Some(token) = bearer(req)
        && !state.router.is_open()
    {
        let (sub, caps, _) = state.router.verify_token(&token).map_err(|e| unauthorized(e.message))?;
        return Ok(RestPrincipal { caller: Router::rest_caller(&sub), caps, api_key: false });
    }
    if keys.is_empty() && state.router.is_open() {
        return Ok(RestPrincipal { caller: Router::rest_caller(""), caps: Arc::new(Caps::all()), api_key: true });
    }
    Err(unauthorized("send X-Api-Key or Authorization: Bearer <connection token>".into()))
}

/// The identity of the SSE / long-poll session named by `X-Connection-Id`
/// (REST is their uplink): `Ok(None)` without the header. Only the same
/// client (or an API key) may act for a stream.
fn stream_caller(
    state: &HttpState,
    principal: &RestPrincipal,
    conn: Option<&str>,
) -> Result<Option<(Caller, Arc<Caps>)>, ErrorResponse> {
    let Some(conn) = conn else { return Ok(None) };
    let (caller, caps) = state.router.caller_for_connection(conn).ok_or_else(|| {
        Box::new(error_response(
            StatusCode::BAD_REQUEST,
            ErrorCode::NotConnected.slug(),
            format!("no open session with connection id {conn:?}"),
        ))
    })?;
    if !principal.api_key && principal.caller.client_id != caller.client_id {
        return Err(Box::new(error_response(
            StatusCode::FORBIDDEN,
            ErrorCode::PermissionDenied.slug(),
            "a token may only act for streams of its own client",
        )));
    }
    Ok(Some((caller, caps)))
}

fn missing_connection() -> Response<Body> {
    error_response(
        StatusCode::BAD_REQUEST,
        ErrorCode::NoIdentity.slug(),
        "presence over REST acts for an open stream: send its X-Connection-Id",
    )
}

/// `POST /v1/channels/{channel}/presence`: enters (or updates) presence for
/// the stream named by `X-Connection-Id`; the body is the member data (JSON
/// mapping when `application/json`, else raw).
async fn rest_presence_enter(
    state: HttpState,
    principal: RestPrincipal,
    channel: String,
    req: Request<Incoming>,
) -> Response<Body> {
    let (caller, caps) = match stream_caller(&state, &principal, header_str(&req, "x-connection-id")) {
        Ok(Some(c)) => c,
        Ok(None) => return missing_connection(),
        Err(r) => return *r,
    };
    let is_json = header_str(&req, "content-type").is_some_and(|t| t.starts_with("application/json"));
    let body = match read_body(&state, req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let data = if is_json {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct PresenceBody<'a> {
            #[serde(borrow)]
            data: Option<&'a serde_json::value::RawValue>,
            text: Option<String>,
            data_b64: Option<String>,
        }
        let parsed: PresenceBody<'_> = match json_body(&body) {
            Ok(p) => p,
            Err(r) => return *r,
        };
        match json_payload(parsed.data, parsed.text.as_deref(), parsed.data_b64.as_deref()) {
            Ok(p) => p,
            Err(r) => return *r,
        }
    } else {
        body
    };
    match state.router.presence_enter_as(&caller, &caps, &channel, data, false).await {
        Ok(()) => json_response(StatusCode::OK, &json!({"channel": channel, "entered": true})),
        Err(e) => core_error(&e),
    }
}

async fn rest_publish(
    state: HttpState,
    principal: RestPrincipal,
    channel: String,
    req: Request<Incoming>,
) -> Response<Body> {
    let conn = header_str(&req, "x-connection-id").map(str::to_string);
    let idem = header_str(&req, "idempotency-key").map(str::to_string);
    let content_type = header_str(&req, "content-type").unwrap_or("").to_string();
    let is_json = content_type.split(';').next().is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"));
    let body = match read_body(&state, req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let mut publish = if is_json {
        let parsed: PublishBody<'_> = match json_body(&body) {
            Ok(p) => p,
            Err(r) => return *r,
        };
        let payload = match json_payload(parsed.data, parsed.text.as_deref(), parsed.data_b64.as_deref()) {
            Ok(p) => p,
            Err(r) => return *r,
        };
        proto::Publish {
            channel: channel.clone(),
            payload,
            id: parsed.id.unwrap_or_default(),
            content_type: parsed.content_type,
            headers: parsed.headers,
            retain: parsed.retain,
            ..Default::default()
        }
    } else {
        proto::Publish { channel: channel.clone(), payload: body, content_type, ..Default::default() }
    };
    if let Some(k) = idem {
        publish.id = k;
    }
    if publish.id.len() > 256 {
        return error_response(StatusCode::BAD_REQUEST, ErrorCode::BadRequest.slug(), "idempotency key over 256 bytes");
    }
    let (caller, caps) = match stream_caller(&state, &principal, conn.as_deref()) {
        Ok(Some(c)) => c,
        Ok(None) => (principal.caller, principal.caps),
        Err(r) => return *r,
    };
    match state.router.publish_as(&caller, &caps, publish).await {
        Ok(ack) => json_response(
            StatusCode::OK,
            &json!({"channel": ack.channel, "epoch": ack.epoch, "serial": ack.serial, "duplicate": ack.duplicate}),
        ),
        Err(e) => core_error(&e),
    }
}

async fn rest_history(
    state: HttpState,
    principal: RestPrincipal,
    channel: String,
    req: &Request<Incoming>,
) -> Response<Body> {
    let mut h = proto::History { channel, ..Default::default() };
    for (k, v) in query_pairs(req) {
        match k.as_str() {
            "since" => {
                let Some((epoch, serial)) = v.rsplit_once(':').and_then(|(e, s)| Some((e, s.parse::<u64>().ok()?)))
                else {
                    return error_response(
                        StatusCode::BAD_REQUEST,
                        ErrorCode::BadPosition.slug(),
                        "since must be EPOCH:SERIAL",
                    );
                };
                h.since = Some(proto::Position { epoch: epoch.to_string(), serial });
            }
            "limit" => match v.parse() {
                Ok(n) => h.limit = n,
                Err(_) => return error_response(StatusCode::BAD_REQUEST, "bad_request", "limit must be a number"),
            },
            "reverse" => h.reverse = matches!(v.as_str(), "1" | "true"),
            _ => {
                return error_response(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    format!("unknown query parameter {k:?}"),
                );
            }
        }
    }
    match state.router.history_of(&principal.caps, h).await {
        Ok(r) => raw_json(proto::json::encode_server_frame(&proto::ServerFrame {
            req: 0,
            frame: Some(proto::server_frame::Frame::History(r)),
        })),
        Err(e) => core_error(&e),
    }
}

fn request_error(e: &RequestError) -> Response<Body> {
    let limit = match e.code {
        "query_too_large" => Some("query_len"),
        c if c == ErrorCode::TooManySubscriptions.slug() => Some("stream_channels"),
        _ => None,
    };
    if let Some(limit) = limit {
        http_limit_exceeded(limit, &e.message);
    }
    error_response(StatusCode::BAD_REQUEST, e.code, &e.message)
}

/// Counts and logs an HTTP request over a limit (`query_len`,
/// `stream_channels`, `body_size`) in `switchboard_limit_exceeded_total`.
fn http_limit_exceeded(limit: &'static str, message: &str) {
    metrics::counter!("switchboard_limit_exceeded_total", "limit" => limit, "protocol" => "http").increment(1);
    tracing::info!(limit, message, "limit exceeded");
}

/// The bearer token of an `Authorization` header, if any.
fn bearer<B>(req: &Request<B>) -> Option<String> {
    header_str(req, "authorization")?.strip_prefix("Bearer ").map(|t| t.trim().to_string())
}

fn parse_stream<B>(
    state: &HttpState,
    peer: SocketAddr,
    req: &Request<B>,
    pairs: &[(String, String)],
) -> Result<StreamRequest, RequestError> {
    let raw_query = req.uri().query().map_or(0, str::len);
    if raw_query > state.stream_limits.max_query_len {
        return Err(RequestError {
            code: "query_too_large",
            message: format!("query over {} bytes", state.stream_limits.max_query_len),
        });
    }
    let mut parsed = StreamRequest::parse(pairs, header_str(req, "last-event-id"), &state.stream_limits)?;
    if let Some(t) = bearer(req) {
        parsed.token = t;
    }
    parsed.peer = Some(peer);
    Ok(parsed)
}

async fn serve_sse<B>(state: HttpState, peer: SocketAddr, req: &Request<B>) -> Response<Body> {
    use futures_util::StreamExt;
    let pairs = query_pairs(req);
    let parsed = match parse_stream(&state, peer, req, &pairs) {
        Ok(p) => p,
        Err(e) => return request_error(&e),
    };
    let core: Arc<dyn Core> = state.router.clone();
    let now = crate::core::router::now_ms() as u64;
    let stream = match sse::open(core, &parsed, &state.sse, state.shutdown.clone(), now).await {
        Ok(s) => s,
        Err(e) => return core_error(&e),
    };
    let body = StreamBody::new(stream.map(|chunk| Ok::<_, Infallible>(hyper::body::Frame::data(chunk))));
    let mut r = Response::new(body.boxed_unsync());
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    r
}

/// A keep-alive connection's long-poll session between its polls (see
/// [`poll::KeptPoll`]). The front door puts one in every request's
/// extensions; the session goes when the connection does. Boxed: every
/// front-door connection has a slot, SSE streams too, and an empty one
/// costs a pointer instead of a session's size.
#[derive(Clone, Default)]
pub struct PollSlot(Arc<parking_lot::Mutex<Option<Box<poll::KeptPoll>>>>);

async fn serve_poll<B>(
    state: HttpState,
    peer: SocketAddr,
    req: &Request<B>,
    pairs: Vec<(String, String)>,
) -> Response<Body> {
    let parsed = match parse_stream(&state, peer, req, &pairs) {
        Ok(p) => p,
        Err(e) => return request_error(&e),
    };
    let core: Arc<dyn Core> = state.router.clone();
    let now = crate::core::router::now_ms() as u64;
    let slot = req.extensions().get::<PollSlot>();
    let kept = slot.and_then(|s| s.0.lock().take());
    let polled = poll::poll_kept(core, &parsed, &state.poll, state.shutdown.clone(), now, kept).await;
    match polled.map(|(body, kept)| {
        if let Some(s) = slot {
            *s.0.lock() = kept;
        }
        body
    }) {
        Ok(body) => {
            let mut r = raw_json(body);
            r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            r
        }
        Err(e) => core_error(&e),
    }
}

/// Flattens a JSON object into query-style pairs: arrays repeat the key,
/// booleans become 1/0, numbers their text.
fn json_pairs(body: &[u8]) -> Result<Vec<(String, String)>, String> {
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| format!("bad JSON body: {e}"))?;
    let obj = v.as_object().ok_or("the JSON body must be an object")?;
    let mut pairs = Vec::new();
    for (k, v) in obj {
        let items: Vec<&serde_json::Value> = match v {
            serde_json::Value::Array(a) => a.iter().collect(),
            other => vec![other],
        };
        for item in items {
            let text = match item {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Bool(b) => if *b { "1" } else { "0" }.to_string(),
                serde_json::Value::Number(n) => n.to_string(),
                _ => return Err(format!("field {k:?} must be a string, number, boolean or array of them")),
            };
            pairs.push((k.clone(), text));
        }
    }
    Ok(pairs)
}

/// `POST /v1/poll`: the same parameters as the query, in a form-encoded or
/// JSON body (for filter lists too long for a URL).
async fn poll_post(state: HttpState, peer: SocketAddr, req: Request<Incoming>) -> Response<Body> {
    let is_json = header_str(&req, "content-type").is_some_and(|t| t.starts_with("application/json"));
    let (parts, body) = req.into_parts();
    let limit = state.stream_limits.max_query_len;
    let bytes = match Limited::new(body, limit).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            let message = format!("body over {limit} bytes");
            http_limit_exceeded("query_len", &message);
            return error_response(StatusCode::BAD_REQUEST, "query_too_large", message);
        }
    };
    let mut pairs: Vec<(String, String)> = match parts.uri.query() {
        Some(q) => url::form_urlencoded::parse(q.as_bytes()).into_owned().collect(),
        None => Vec::new(),
    };
    if is_json {
        match json_pairs(&bytes) {
            Ok(p) => pairs.extend(p),
            Err(e) => return error_response(StatusCode::BAD_REQUEST, "bad_request", e),
        }
    } else {
        pairs.extend(url::form_urlencoded::parse(&bytes).into_owned());
    }
    // Rebuild a body-less request for the header lookups.
    let req = Request::from_parts(parts, ());
    serve_poll(state, peer, &req, pairs).await
}

/// `POST /v1/refresh`: gives an open SSE or long-poll stream (named by
/// `X-Connection-Id`, or `connection_id` in a JSON body) a new token
/// (`Authorization: Bearer`, or `token` in the body). The new token must name
/// the same client; the stream continues with its caps and expiry.
async fn refresh_stream(state: HttpState, req: Request<Incoming>) -> Response<Body> {
    let mut conn = header_str(&req, "x-connection-id").map(str::to_string);
    let mut token = bearer(&req);
    let body = match read_body(&state, req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    if !body.is_empty() {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct RefreshBody {
            connection_id: Option<String>,
            token: Option<String>,
        }
        match serde_json::from_slice::<RefreshBody>(&body) {
            Ok(b) => {
                conn = conn.or(b.connection_id);
                token = token.or(b.token);
            }
            Err(e) => return error_response(StatusCode::BAD_REQUEST, "bad_request", format!("bad JSON body: {e}")),
        }
    }
    let (Some(conn), Some(token)) = (conn, token) else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "send X-Connection-Id and Authorization: Bearer",
        );
    };
    let Some(session) = state.router.session_for_connection(&conn) else {
        return error_response(
            StatusCode::NOT_FOUND,
            ErrorCode::NotConnected.slug(),
            format!("no open session with connection id {conn:?}"),
        );
    };
    match Core::refresh(state.router.as_ref(), session, &token).await {
        Ok(()) => json_response(StatusCode::OK, &json!({"connection_id": conn, "refreshed": true})),
        Err(e) => core_error(&e),
    }
}

fn demo_page() -> Response<Body> {
    let mut r = Response::new(full(Bytes::from_static(include_bytes!("web/demo.html"))));
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
