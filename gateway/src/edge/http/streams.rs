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

/// Long polls' sessions parked on the node between polls, by connection id.
///
/// A browser spreads its requests over several keep-alive connections, so
/// the per-connection [`PollSlot`] alone rarely sees a poller's next poll:
/// each poll would open a new session, re-subscribe and replay from history,
/// and presence entered for the session (REST `X-Connection-Id`) would go
/// with it. A poll that names its session (`session=`, the previous
/// response's `connection_id`) parks the session here instead, and its next
/// poll continues it from any connection. A parked session that no poll
/// continues within [`PARKED_LINGER`] ends (as a finished poll); one that
/// a poll of its own client (same client id and token) names but does not
/// continue (new filters, another cursor) ends at once, and one that another
/// client names stays for its owner. Bounded: at most [`PARKED_MAX`] on the node
/// and [`PARKED_PER_IP`] per client address; past them a session ends after
/// its poll, as without `session=`. A drain ends them all at once.
pub struct ParkedPolls {
    inner: parking_lot::Mutex<ParkedInner>,
    shutdown: watch::Receiver<bool>,
}

#[derive(Default)]
struct ParkedInner {
    by_id: std::collections::HashMap<String, Parked>,
    per_ip: std::collections::HashMap<std::net::IpAddr, usize>,
}

struct Parked {
    kept: Box<poll::KeptPoll>,
    ip: std::net::IpAddr,
    /// When it was parked (it ends [`PARKED_LINGER`] later).
    at: tokio::time::Instant,
}

/// How long a parked session waits for its next poll.
pub const PARKED_LINGER: std::time::Duration = std::time::Duration::from_secs(30);
/// Parked sessions on the node, at most.
pub const PARKED_MAX: usize = 100_000;
/// Parked sessions per client address, at most.
pub const PARKED_PER_IP: usize = 256;

impl ParkedPolls {
    /// An empty registry whose sessions end when `shutdown` flips. One task
    /// ends the sessions whose linger ran out, once a second (not a timer
    /// per park: a park per poll would keep a poll rate × 30 s of them).
    pub fn new(shutdown: watch::Receiver<bool>) -> Arc<ParkedPolls> {
        let parked = Arc::new(ParkedPolls { inner: parking_lot::Mutex::new(ParkedInner::default()), shutdown });
        let weak = Arc::downgrade(&parked);
        let mut stop = parked.shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let stopping = tokio::select! {
                    _ = tick.tick() => false,
                    _ = stop.wait_for(|s| *s) => true,
                };
                let Some(me) = weak.upgrade() else { return };
                let now = tokio::time::Instant::now();
                let expired: Vec<Parked> = {
                    let mut inner = me.inner.lock();
                    let ids: Vec<String> = inner
                        .by_id
                        .iter()
                        .filter(|(_, p)| stopping || now.duration_since(p.at) >= PARKED_LINGER)
                        .map(|(id, _)| id.clone())
                        .collect();
                    let gone: Vec<Parked> = ids.iter().filter_map(|id| inner.by_id.remove(id)).collect();
                    for p in &gone {
                        inner.release(p.ip);
                    }
                    gone
                };
                // Ends the sessions outside the lock.
                drop(expired);
                if stopping {
                    return;
                }
            }
        });
        parked
    }

    /// Takes the session `req` names, if it is parked here and `req`
    /// continues it. A poll that continues it with a new token (the client
    /// refreshed its token) refreshes the session in place first, as
    /// `POST /v1/refresh` does: the token must name the same client; if the
    /// core refuses it, the session stays parked for its owner.
    async fn take(&self, req: &StreamRequest, router: &Router) -> Option<Box<poll::KeptPoll>> {
        let id = req.session.as_deref()?;
        let mut parked = {
            let mut inner = self.inner.lock();
            let p = inner.by_id.get(id)?;
            if !p.kept.continues_but_token(req) && !p.kept.owned_by(req) {
                return None;
            }
            let parked = inner.by_id.remove(id)?;
            inner.release(parked.ip);
            parked
        };
        if !parked.kept.continues_but_token(req) {
            // Its owner moved on (new filters, another cursor): the poll
            // opens a fresh session and this one ends now, not after the
            // linger (its presence then leaves unless the client enters
            // again for the new session, within the grace).
            drop(parked);
            return None;
        }
        if parked.kept.continues(req) {
            return Some(parked.kept);
        }
        match Core::refresh(router, parked.kept.session_id(), &req.token).await {
            Ok(()) => {
                parked.kept.refreshed(&req.token);
                Some(parked.kept)
            }
            Err(e) => {
                tracing::debug!(session = id, error = %e.message, "a poll's new token was refused; its session stays parked");
                self.park(parked.kept, parked.ip);
                None
            }
        }
    }

    /// Parks `kept` for its next poll (or ends it, over the bounds).
    fn park(&self, kept: Box<poll::KeptPoll>, ip: std::net::IpAddr) {
        let id = kept.connection_id().to_string();
        let replaced = {
            let mut inner = self.inner.lock();
            let held = inner.per_ip.get(&ip).copied().unwrap_or(0);
            if inner.by_id.len() >= PARKED_MAX || held >= PARKED_PER_IP || *self.shutdown.borrow() {
                tracing::debug!(%ip, parked = inner.by_id.len(), "poll session not parked: over the bound");
                return;
            }
            *inner.per_ip.entry(ip).or_default() += 1;
            let replaced = inner.by_id.insert(id, Parked { kept, ip, at: tokio::time::Instant::now() });
            if let Some(old) = &replaced {
                inner.release(old.ip);
            }
            replaced
        };
        // Ends a session it replaced outside the lock.
        drop(replaced);
    }
}

impl ParkedInner {
    fn release(&mut self, ip: std::net::IpAddr) {
        if let Some(n) = self.per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&ip);
            }
        }
    }
}

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
    // A poll that names its session continues it from the node's parked
    // sessions; else from the connection's slot.
    let named = parsed.session.is_some();
    let kept = match named {
        true => state.parked.take(&parsed, &state.router).await,
        false => slot.and_then(|s| s.0.lock().take()),
    };
    let polled = poll::poll_kept(core, &parsed, &state.poll, state.shutdown.clone(), now, kept).await;
    match polled.map(|(body, kept)| {
        match (named, kept) {
            (true, Some(kept)) => state.parked.park(kept, peer.ip()),
            (false, kept) => {
                if let Some(s) = slot {
                    *s.0.lock() = kept;
                }
            }
            (true, None) => {}
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
