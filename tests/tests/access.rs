//! Who may talk to the gateway, and from which page (issue #13, items 12
//! and 21):
//!
//! - `[http] allowed_origins`: a page of an origin not on the list gets 403
//!   `forbidden_origin` on every browser-facing route (WebSocket and MQTT
//!   over WebSocket upgrades, SSE and long polls whether the front door or
//!   hyper serves them, REST, `POST /v1/refresh`) and its WebTransport
//!   session request is refused, each counted in
//!   `switchboard_origin_refused_total{route}`; a listed origin and a
//!   client without `Origin` go on; without a list (the default, `dev`'s
//!   too) any origin goes on.
//! - the admin listener: with `[admin] token` the admin API needs it as a
//!   bearer token while health, readiness and metrics stay open; without one
//!   it answers only requests addressed to an IP or `localhost`; either way a
//!   page of another origin cannot use it. Refusals count in
//!   `switchboard_admin_refused_total{reason}`.
//!
//! A binary of its own: the tests assert on process-wide metrics.

#[allow(dead_code)] // each test binary uses part of it
mod common_b;

use anyhow::{Context, bail};
use common_b::{metric, metrics_text};
use serde_json::{Value, json};
use switchboard_tests::*;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// The page the tests' gateway allows.
const APP: &str = "https://app.example";
/// A page it does not.
const EVIL: &str = "https://evil.example";
/// The admin token of the tests that set one.
const ADMIN_TOKEN: &str = "admin-token-for-tests-0123456789";

/// The refusal counters these tests read are the process's: `cargo test`
/// runs a file's tests side by side in one process, so one at a time.
static COUNTERS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `switchboard_origin_refused_total{route}` now (0 before the first).
async fn origin_refused(gw: &TestGateway, route: &str) -> anyhow::Result<f64> {
    let text = metrics_text(gw).await?;
    Ok(metric(&text, "switchboard_origin_refused_total", &format!("route=\"{route}\"")).unwrap_or(0.0))
}

/// `switchboard_admin_refused_total{reason}` now (0 before the first).
async fn admin_refused(gw: &TestGateway, reason: &str) -> anyhow::Result<f64> {
    let text = metrics_text(gw).await?;
    Ok(metric(&text, "switchboard_admin_refused_total", &format!("reason=\"{reason}\"")).unwrap_or(0.0))
}

/// A WebSocket upgrade of `path` with `origin` (if any): the HTTP status
/// (101 when it opened) and, on a refusal, the error code of the body.
async fn ws_upgrade(gw: &TestGateway, path: &str, origin: Option<&str>) -> anyhow::Result<(u16, Option<String>)> {
    use tokio_tungstenite::tungstenite::Error;
    let mut request = format!("{}{path}", gw.ws).into_client_request()?;
    let protocol = match path {
        "/mqtt" => Some("mqtt"),
        "/v1/ws" => Some("switchboard.v1.json"),
        _ => None,
    };
    if let Some(p) = protocol {
        request.headers_mut().insert("sec-websocket-protocol", p.parse()?);
    }
    if let Some(o) = origin {
        request.headers_mut().insert("origin", o.parse()?);
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((_ws, response)) => Ok((response.status().as_u16(), None)),
        Err(Error::Http(response)) => {
            let body: Value = serde_json::from_slice(response.body().as_deref().unwrap_or_default())?;
            Ok((response.status().as_u16(), body["error"]["code"].as_str().map(str::to_string)))
        }
        Err(e) => bail!("upgrade of {path}: {e}"),
    }
}

/// One HTTP request with `origin` (if any): the status and the error code.
async fn http_call(req: reqwest::RequestBuilder, origin: Option<&str>) -> anyhow::Result<(u16, Option<String>)> {
    let req = match origin {
        Some(o) => req.header("origin", o),
        None => req,
    };
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    // An SSE stream that opened never ends: its status is the answer.
    if status == 200 && resp.headers().get("content-type").is_some_and(|t| t == "text/event-stream") {
        return Ok((status, None));
    }
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    Ok((status, body["error"]["code"].as_str().map(str::to_string)))
}

/// The HTTP routes a page may call, with their route label and the status
/// of an allowed call (`POST /v1/refresh` without a connection id is 400
/// once the Origin is settled).
fn http_routes(gw: &TestGateway) -> Vec<(&'static str, reqwest::RequestBuilder, u16)> {
    let c = reqwest::Client::new();
    let h = &gw.http;
    vec![
        ("sse", c.get(format!("{h}/v1/sse?channel=o/sse")), 200),
        ("poll", c.get(format!("{h}/v1/poll?channel=o/poll&timeout=0")), 200),
        ("poll", c.post(format!("{h}/v1/poll")).body("channel=o%2Fpoll&timeout=0"), 200),
        ("rest", c.post(format!("{h}/v1/channels/o/rest/messages")).body("x"), 200),
        ("rest", c.get(format!("{h}/v1/channels/o/rest/history")), 200),
        ("refresh", c.post(format!("{h}/v1/refresh")), 400),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_of_other_origins_are_refused_on_every_browser_route() -> anyhow::Result<()> {
    let _one = COUNTERS.lock().await;
    let gw =
        TestGateway::start_with(|c| c.http.allowed_origins = vec![APP.into(), "http://localhost:3000".into()]).await?;
    let forbidden = (403, Some("forbidden_origin".to_string()));

    for (path, route) in [("/v1/ws", "ws"), ("/mqtt", "mqtt_ws"), ("/v1/ws-echo", "ws_echo")] {
        let before = origin_refused(&gw, route).await?;
        assert_eq!(ws_upgrade(&gw, path, Some(EVIL)).await?, forbidden, "{path} from {EVIL}");
        assert_eq!(origin_refused(&gw, route).await?, before + 1.0, "{path}: counted");
        for origin in [Some(APP), Some("http://localhost:3000"), None] {
            assert_eq!(ws_upgrade(&gw, path, origin).await?, (101, None), "{path} from {origin:?}");
        }
    }

    for (i, (route, req, allowed)) in http_routes(&gw).into_iter().enumerate() {
        let before = origin_refused(&gw, route).await?;
        let evil = req.try_clone().context("a request without a stream body")?;
        assert_eq!(http_call(evil, Some(EVIL)).await?, forbidden, "{route} #{i} from {EVIL}");
        assert_eq!(origin_refused(&gw, route).await?, before + 1.0, "{route} #{i}: counted");
        for origin in [Some(APP), None] {
            let again = req.try_clone().context("a request without a stream body")?;
            assert_eq!(http_call(again, origin).await?.0, allowed, "{route} #{i} from {origin:?}");
        }
    }
    // Nothing a refused page sent was published.
    let (_, history) = get_json(&format!("{}/v1/channels/o/rest/history", gw.http)).await?;
    assert_eq!(history["messages"].as_array().map(Vec::len), Some(2), "{history}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_list_any_origin_may_connect() -> anyhow::Result<()> {
    let _one = COUNTERS.lock().await;
    let gw = TestGateway::start().await?;
    assert_eq!(ws_upgrade(&gw, "/v1/ws", Some(EVIL)).await?, (101, None));
    let (status, _) = rest_publish(&gw.http, "o/any", "x", &[("origin", EVIL)]).await?;
    assert_eq!(status, 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webtransport_session_requests_follow_the_same_list() -> anyhow::Result<()> {
    let _one = COUNTERS.lock().await;
    let gw = TestGateway::start_with(|c| {
        with_quic(c);
        c.http.allowed_origins = vec![APP.into()];
    })
    .await?;
    let open = |origin: Option<&str>| {
        let mut opts = gw.wt_options().expect("QUIC listener");
        opts.client_id = "wt-origin".into();
        opts.headers = origin.map(|o| vec![("origin".to_string(), o.to_string())]).unwrap_or_default();
        async move { switchboard::tooling::client_wt::WtClient::connect(&opts).await }
    };
    let before = origin_refused(&gw, "wt").await?;
    assert!(open(Some(EVIL)).await.is_err(), "a page of another origin is refused");
    assert_eq!(origin_refused(&gw, "wt").await?, before + 1.0);
    for origin in [Some(APP), None] {
        let c = open(origin).await;
        assert!(c.is_ok(), "{origin:?}: {:?}", c.err());
    }
    Ok(())
}

/// An admin request: `method` on `path`, with headers.
async fn admin_call(
    gw: &TestGateway,
    method: reqwest::Method,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<(u16, Value)> {
    let mut req = reqwest::Client::new().request(method, format!("{}{path}", gw.admin));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    let www = resp.headers().get("www-authenticate").map(|v| v.to_str().unwrap_or("").to_string());
    let mut body: Value = resp.json().await.unwrap_or(Value::Null);
    if let Some(w) = www {
        body["www-authenticate"] = json!(w);
    }
    Ok((status, body))
}

/// The session id of the client `client_id`.
fn session_id(gw: &TestGateway, client_id: &str) -> anyhow::Result<u64> {
    let sessions = gw.gateway.router.sessions();
    sessions.iter().find(|s| s.client_id == client_id).map(|s| s.id).context("no such session")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_the_admin_api_needs_it_and_health_stays_open() -> anyhow::Result<()> {
    let _one = COUNTERS.lock().await;
    use reqwest::Method;
    let gw = TestGateway::start_with(|c| c.admin.token = ADMIN_TOKEN.into()).await?;
    let _client = WsClient::connect(&gw.ws, Codec::Json, "watched").await?;
    let id = session_id(&gw, "watched")?;
    let close = format!("/v1/sessions/{id}/close");
    let bearer = format!("Bearer {ADMIN_TOKEN}");

    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(admin_call(&gw, Method::GET, path, &[]).await?.0, 200, "{path} stays open");
    }
    let before = admin_refused(&gw, "unauthorized").await?;
    let refusals = [
        (Method::GET, "/v1/sessions", None),
        (Method::GET, "/v1/stats", Some("Bearer wrong-token-wrong-token-00")),
        (Method::POST, close.as_str(), None),
        (Method::POST, close.as_str(), Some("Basic YWRtaW46YWRtaW4=")),
    ];
    for (method, path, auth) in &refusals {
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", *a)).collect();
        let (status, body) = admin_call(&gw, method.clone(), path, &headers).await?;
        assert_eq!((status, body["error"]["code"].as_str()), (401, Some("unauthorized")), "{method} {path}");
        assert!(body["www-authenticate"].as_str().is_some_and(|w| w.starts_with("Bearer")), "{body}");
    }
    assert_eq!(admin_refused(&gw, "unauthorized").await?, before + refusals.len() as f64);
    assert_eq!(gw.sessions(), 1, "nothing was closed");

    let (status, body) = admin_call(&gw, Method::GET, "/v1/sessions", &[("authorization", &bearer)]).await?;
    assert_eq!(status, 200);
    assert_eq!(body["sessions"].as_array().map(Vec::len), Some(1), "{body}");
    // A page of another origin cannot use the API, even with the token.
    let before = admin_refused(&gw, "forbidden_origin").await?;
    let (status, body) =
        admin_call(&gw, Method::POST, &close, &[("authorization", &bearer), ("origin", "https://evil.example")])
            .await?;
    assert_eq!((status, body["error"]["code"].as_str()), (403, Some("forbidden_origin")));
    assert_eq!(admin_refused(&gw, "forbidden_origin").await?, before + 1.0);
    assert_eq!(gw.sessions(), 1, "nothing was closed");
    let (status, body) = admin_call(&gw, Method::POST, &close, &[("authorization", &bearer)]).await?;
    assert_eq!((status, body["closed"].as_bool()), (200, Some(true)), "{body}");
    eventually(WAIT, "the session to close", || async { gw.sessions() == 0 }).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_the_admin_api_answers_only_its_own_address_and_origin() -> anyhow::Result<()> {
    let _one = COUNTERS.lock().await;
    use reqwest::Method;
    let gw = TestGateway::start().await?;
    let _client = WsClient::connect(&gw.ws, Codec::Json, "kept").await?;
    let id = session_id(&gw, "kept")?;
    let close = format!("/v1/sessions/{id}/close");
    let own = gw.admin.clone();
    let port = gw.gateway.admin_addr.map(|a| a.port()).unwrap_or_default();

    assert_eq!(admin_call(&gw, Method::GET, "/v1/sessions", &[]).await?.0, 200, "open on loopback");
    // A page of another site: its POST carries its Origin.
    let before = admin_refused(&gw, "forbidden_origin").await?;
    for origin in ["https://evil.example", "null", &format!("http://localhost:{}", port + 1)] {
        let (status, body) = admin_call(&gw, Method::POST, &close, &[("origin", origin)]).await?;
        assert_eq!((status, body["error"]["code"].as_str()), (403, Some("forbidden_origin")), "{origin}");
    }
    assert_eq!(admin_refused(&gw, "forbidden_origin").await?, before + 3.0);
    // DNS rebinding: a name of the attacker's that resolves to loopback.
    let before = admin_refused(&gw, "forbidden_host").await?;
    let rebound = format!("evil.example:{port}");
    let (status, body) = admin_call(&gw, Method::GET, "/v1/sessions", &[("host", &rebound)]).await?;
    assert_eq!((status, body["error"]["code"].as_str()), (403, Some("forbidden_host")));
    let (status, _) =
        admin_call(&gw, Method::POST, &close, &[("host", &rebound), ("origin", &format!("http://{rebound}"))]).await?;
    assert_eq!(status, 403);
    assert_eq!(admin_refused(&gw, "forbidden_host").await?, before + 2.0);
    assert_eq!(admin_call(&gw, Method::GET, "/healthz", &[("host", &rebound)]).await?.0, 200);
    assert_eq!(gw.sessions(), 1, "nothing was closed");

    // The listener's own origin (a page it served, were there one) may.
    let (status, body) = admin_call(&gw, Method::POST, &close, &[("origin", &own)]).await?;
    assert_eq!((status, body["closed"].as_bool()), (200, Some(true)), "{body}");
    eventually(WAIT, "the session to close", || async { gw.sessions() == 0 }).await?;
    Ok(())
}
