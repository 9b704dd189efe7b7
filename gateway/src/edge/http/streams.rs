//! Server-Sent Events (`GET /v1/sse`) and long polling (`GET`/`POST
//! /v1/poll`): the request is parsed into a stream request, then the SSE or
//! long-poll front end takes over.

use super::*;

pub(super) fn request_error(e: &RequestError) -> Response<Body> {
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
pub(super) fn http_limit_exceeded(limit: &'static str, message: &str) {
    metrics::counter!("switchboard_limit_exceeded_total", "limit" => limit, "protocol" => "http").increment(1);
    tracing::info!(limit, message, "limit exceeded");
}

pub(super) fn parse_stream<B>(
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

pub(super) async fn serve_sse<B>(state: HttpState, peer: SocketAddr, req: &Request<B>) -> Response<Body> {
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

pub(super) async fn serve_poll<B>(
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
pub(super) fn json_pairs(body: &[u8]) -> Result<Vec<(String, String)>, String> {
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
pub(super) async fn poll_post(state: HttpState, peer: SocketAddr, req: Request<Incoming>) -> Response<Body> {
    let is_json = header_str(&req, "content-type").is_some_and(|t| t.starts_with("application/json"));
    let limit = state.stream_limits.max_query_len;
    let (parts, body) = req.into_parts();
    let bytes = match collect_body(&state, peer, parts.version, body, limit).await {
        Err(timed_out) => return timed_out,
        Ok(Ok(b)) => b,
        Ok(Err(_)) => {
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
