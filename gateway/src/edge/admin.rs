//! The admin listener: `/healthz`, `/readyz`, Prometheus `/metrics`, and the
//! admin API (`GET /v1/sessions`, `POST /v1/sessions/{id}/close`, `GET /v1/stats`).
//!
//! Loopback by default: it exposes every session. Metrics are labelled by
//! protocol only, never by channel, so their cardinality stays fixed.

use std::convert::Infallible;
use std::sync::{Arc, OnceLock};

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde_json::json;
use tokio::sync::watch;

use crate::core::router::Router;
use crate::edge::http::{Body, error_response, json_response};

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
}

/// Routes one admin request.
pub async fn handle(
    router: Arc<Router>,
    shutdown: watch::Receiver<bool>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let resp = match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => json_response(StatusCode::OK, &json!({"status": "ok"})),
        (&Method::GET, "/readyz") => {
            if *shutdown.borrow() {
                json_response(StatusCode::SERVICE_UNAVAILABLE, &json!({"status": "shutting down"}))
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
