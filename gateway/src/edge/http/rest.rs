//! The REST API under `/v1/channels/{channel}/...` (publish, history,
//! presence) and `POST /v1/refresh`: each handler turns a request into one
//! router call and its answer into JSON (the table is in the parent module).

use super::*;

/// Splits `/v1/channels/{channel}/{action}` into the decoded channel and action.
pub(super) fn channel_route(path: &str) -> Option<(String, &str)> {
    let rest = path.strip_prefix("/v1/channels/")?;
    let (raw, action) = rest.rsplit_once('/')?;
    let channel = percent_encoding::percent_decode_str(raw).decode_utf8().ok()?.into_owned();
    Some((channel, action))
}

pub(super) fn header_str<'a, B>(req: &'a Request<B>, name: &str) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

pub(super) async fn rest(state: HttpState, peer: SocketAddr, req: Request<Incoming>) -> Response<Body> {
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
        (Method::POST, "messages") => rest_publish(state, peer, principal, channel, req).await,
        (Method::GET, "history") => rest_history(state, principal, channel, &req).await,
        (Method::POST, "presence") => rest_presence_enter(state, peer, principal, channel, req).await,
        (Method::DELETE, "presence") => {
            match stream_caller(&state, &principal, header_str(&req, "x-connection-id"), Op::Presence, &channel) {
                Ok(Some((caller, caps))) => match state.router.presence_leave_as(&caller, &caps, &channel).await {
                    Ok(()) => json_response(StatusCode::OK, &json!({"channel": channel, "left": true})),
                    Err(e) => core_error(&e),
                },
                Ok(None) => missing_connection(),
                Err(r) => *r,
            }
        }
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
pub(super) struct PublishBody<'a> {
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
pub(super) fn json_body<'a, T: serde::Deserialize<'a>>(body: &'a [u8]) -> Result<T, ErrorResponse> {
    serde_json::from_slice(body).map_err(|e| {
        Box::new(error_response(StatusCode::BAD_REQUEST, ErrorCode::BadFrame.slug(), format!("bad JSON body: {e}")))
    })
}

/// The payload of a JSON body's `data` / `text` / `data_b64` fields.
pub(super) fn json_payload(
    data: Option<&serde_json::value::RawValue>,
    text: Option<&str>,
    data_b64: Option<&str>,
) -> Result<Bytes, ErrorResponse> {
    proto::json::decode_payload(data, text, data_b64)
        .map_err(|e| Box::new(error_response(StatusCode::BAD_REQUEST, ErrorCode::BadFrame.slug(), e)))
}

pub(super) async fn read_body(
    state: &HttpState,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Bytes, Response<Body>> {
    let limit = state.config.limits.max_body_size;
    match collect_body(state, peer, req.version(), req.into_body(), limit).await? {
        // Copied out: hyper's chunk is a slice of the connection's read
        // buffer, which history would otherwise keep whole with the message.
        Ok(b) => Ok(Bytes::copy_from_slice(&b)),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            let message = format!("request body over {limit} bytes");
            http_limit_exceeded("body_size", &message);
            Err(error_response(StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::MessageTooLarge.slug(), message))
        }
        Err(e) => Err(error_response(StatusCode::BAD_REQUEST, "bad_request", format!("cannot read body: {e}"))),
    }
}

/// Reads a request body of at most `limit` bytes: the outer `Err` is the
/// `408 request_timeout` for a body not whole within `[http]
/// body_read_timeout` of the head (counted and logged; HTTP/1.1 closes the
/// connection after it), the inner result hyper's (`LengthLimitError` when
/// over `limit`).
pub(super) async fn collect_body(
    state: &HttpState,
    peer: SocketAddr,
    version: http::Version,
    body: Incoming,
    limit: usize,
) -> Result<Result<Bytes, Box<dyn std::error::Error + Send + Sync>>, Response<Body>> {
    let within = state.config.http.body_read_timeout;
    match tokio::time::timeout(within, Limited::new(body, limit).collect()).await {
        Ok(r) => Ok(r.map(|b| b.to_bytes())),
        Err(_) => {
            crate::edge::timeouts::expired(crate::edge::timeouts::Expired::Body, peer);
            let message = format!("the request body did not arrive within {within:?}");
            let mut r = error_response(StatusCode::REQUEST_TIMEOUT, "request_timeout", message);
            if version < http::Version::HTTP_2 {
                r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Err(r)
        }
    }
}

/// A response that ends the request early (boxed: responses are large).
pub(super) type ErrorResponse = Box<Response<Body>>;

/// Who is calling the REST API.
pub(super) struct RestPrincipal {
    caller: Caller,
    caps: Arc<Caps>,
    /// Authenticated with a server API key (may act for any stream).
    api_key: bool,
}

/// Authenticates a REST request: a configured API key (`X-Api-Key`) may do
/// everything; a connection token (`Authorization: Bearer`) may do what its
/// caps allow, as its `sub`; in open mode with no API keys configured,
/// anyone may do everything; in token mode a request without credentials
/// may do what `[auth] anonymous_caps` allows, as a fresh anonymous id (so
/// it acts for no stream). Anything else is 401.
pub(super) fn rest_principal<B>(state: &HttpState, req: &Request<B>) -> Result<RestPrincipal, ErrorResponse> {
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
    if header_str(req, "authorization").is_none()
        && let Some(caps) = state.router.anonymous_caps()
    {
        let caller = Router::rest_caller(&Router::anonymous_client_id());
        return Ok(RestPrincipal { caller, caps, api_key: false });
    }
    Err(unauthorized("send X-Api-Key or Authorization: Bearer <connection token>".into()))
}

/// The identity of the SSE / long-poll session named by `X-Connection-Id`
/// (REST is their uplink), to do `op` on `channel`: `Ok(None)` without the
/// header. Only the same client (or an API key) may act for a stream, and
/// the request's own credentials must allow `op` on `channel` as well as the
/// stream's caps (checked by the router with the caps returned here): a
/// narrow token of the stream's client must not borrow the stream's wider
/// rights.
pub(super) fn stream_caller(
    state: &HttpState,
    principal: &RestPrincipal,
    conn: Option<&str>,
    op: Op,
    channel: &str,
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
    if !principal.caps.allows(op, channel) {
        return Err(Box::new(error_response(
            StatusCode::FORBIDDEN,
            ErrorCode::PermissionDenied.slug(),
            format!(
                "not allowed to {} {channel:?}: acting for a stream needs the request's own token to allow it too",
                op.name()
            ),
        )));
    }
    Ok(Some((caller, caps)))
}

pub(super) fn missing_connection() -> Response<Body> {
    error_response(
        StatusCode::BAD_REQUEST,
        ErrorCode::NoIdentity.slug(),
        "presence over REST acts for an open stream: send its X-Connection-Id",
    )
}

/// `POST /v1/channels/{channel}/presence`: enters (or updates) presence for
/// the stream named by `X-Connection-Id`; the body is the member data (JSON
/// mapping when `application/json`, else raw).
pub(super) async fn rest_presence_enter(
    state: HttpState,
    peer: SocketAddr,
    principal: RestPrincipal,
    channel: String,
    req: Request<Incoming>,
) -> Response<Body> {
    let (caller, caps) =
        match stream_caller(&state, &principal, header_str(&req, "x-connection-id"), Op::Presence, &channel) {
            Ok(Some(c)) => c,
            Ok(None) => return missing_connection(),
            Err(r) => return *r,
        };
    let is_json = header_str(&req, "content-type").is_some_and(|t| t.starts_with("application/json"));
    let body = match read_body(&state, peer, req).await {
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

pub(super) async fn rest_publish(
    state: HttpState,
    peer: SocketAddr,
    principal: RestPrincipal,
    channel: String,
    req: Request<Incoming>,
) -> Response<Body> {
    let conn = header_str(&req, "x-connection-id").map(str::to_string);
    let idem = header_str(&req, "idempotency-key").map(str::to_string);
    let content_type = header_str(&req, "content-type").unwrap_or("").to_string();
    let is_json = content_type.split(';').next().is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"));
    let body = match read_body(&state, peer, req).await {
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
    let (caller, caps) = match stream_caller(&state, &principal, conn.as_deref(), Op::Publish, &channel) {
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

pub(super) async fn rest_history(
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
    // Built and encoded in its turn (switchboard_protocols::heavy).
    let _turn = switchboard_protocols::heavy::turn().await;
    match state.router.history_of(&principal.caps, h).await {
        Ok(r) => raw_json(proto::json::encode_server_frame(&proto::ServerFrame {
            req: 0,
            frame: Some(proto::server_frame::Frame::History(r)),
        })),
        Err(e) => core_error(&e),
    }
}

/// The bearer token of an `Authorization` header, if any.
pub(super) fn bearer<B>(req: &Request<B>) -> Option<String> {
    header_str(req, "authorization")?.strip_prefix("Bearer ").map(|t| t.trim().to_string())
}

/// `POST /v1/refresh`: gives an open SSE or long-poll stream (named by
/// `X-Connection-Id`, or `connection_id` in a JSON body) a new token
/// (`Authorization: Bearer`, or `token` in the body). The new token must name
/// the same client; the stream continues with its caps and expiry.
pub(super) async fn refresh_stream(state: HttpState, peer: SocketAddr, req: Request<Incoming>) -> Response<Body> {
    let mut conn = header_str(&req, "x-connection-id").map(str::to_string);
    let mut token = bearer(&req);
    let body = match read_body(&state, peer, req).await {
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
