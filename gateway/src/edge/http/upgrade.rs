//! WebSocket upgrades on the HTTP listener: `/v1/ws` (Switchboard frames),
//! `/v1/ws-echo` (RFC 6455 echo) and `/mqtt` (MQTT over WebSocket). The
//! handshake is checked here; the session belongs to its front end.

use super::*;

/// What a WebSocket upgrade leads to.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Route {
    /// `/v1/ws`: Switchboard frames.
    Switchboard,
    /// `/v1/ws-echo`: raw echo.
    Echo,
    /// `/mqtt`: MQTT packets over WebSocket.
    Mqtt,
}

pub(super) fn upgrade(
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
    let mut ws_cfg = state.ws.clone();
    match route {
        Route::Echo => ws_cfg.max_frame_size = state.config.echo.max_message_size,
        // A WebSocket message may carry a whole MQTT packet.
        Route::Mqtt => ws_cfg.max_frame_size = ws_cfg.max_frame_size.max(state.mqtt.max_packet_size + 8),
        Route::Switchboard => {}
    }
    let extensions: Vec<&str> =
        headers.get_all(header::SEC_WEBSOCKET_EXTENSIONS).iter().filter_map(|v| v.to_str().ok()).collect();
    let deflate = ws_frames::negotiate(&extensions, &ws_cfg.deflate);
    let (agreed, extension_answer) = deflate.map_or((None, None), |(d, answer)| (Some(d), Some(answer)));
    let max_message = ws_cfg.max_frame_size;
    let on_upgrade = hyper::upgrade::on(&mut req);
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
        // The frame layer: permessage-deflate if agreed, and UTF-8 checked
        // as text arrives (always).
        let io = ws_frames::FrameLayer::new(TokioIo::new(upgraded), agreed, max_message);
        let stream = WebSocketStream::from_raw_socket(io, Role::Server, Some(ws::websocket_config(&ws_cfg))).await;
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
    if let Some(v) = extension_answer.and_then(|a| HeaderValue::from_str(&a).ok()) {
        h.insert(header::SEC_WEBSOCKET_EXTENSIONS, v);
    }
    r
}
