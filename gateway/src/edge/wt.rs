//! The QUIC listener: WebTransport sessions at `/v1/wt`, served by the
//! front end in `switchboard_protocols::wt`.
//!
//! [`bind`] builds the QUIC endpoint on UDP with the shared certificate
//! resolver ([`TlsState::quic_config`]: TLS 1.3, ALPN `h3`), so a
//! certificate reload applies to new QUIC handshakes as it does to HTTPS
//! and MQTTS. [`accept_loop`] admits each connection attempt (connections
//! per IP and per second, as the TCP listeners do), bounds the QUIC and
//! HTTP/3 handshakes by `tls.handshake_timeout` (a failed or slow one counts
//! in `switchboard_tls_handshake_failures_total{listener="quic"}` with
//! `reason` `error` or `timeout`, as on HTTPS and MQTTS), and hands every
//! session request to the front end, which holds the IP's slot for its life.
//!
//! It does not inspect requests, open sessions or close them: the front end
//! does, and on shutdown each session closes itself with 1012. The QUIC
//! transport is tuned here for bounded memory per session (see
//! [`transport_config`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use switchboard_protocols::origin::OriginPolicy;
use switchboard_protocols::port::Core;
use switchboard_protocols::wt::{self, WtConfig};
use tokio::sync::watch;
use wtransport::config::QuicTransportConfig;
use wtransport::endpoint::endpoint_side::Server;
use wtransport::quinn::VarInt as QuicVarInt;
use wtransport::{Endpoint, ServerConfig, VarInt};

use crate::core::router::Router;
use crate::edge::admission::Admission;
use crate::edge::config::Config;
use crate::edge::server::ServerError;
use crate::edge::tls::TlsState;

/// A bound QUIC endpoint.
pub type QuicEndpoint = Endpoint<Server>;

/// Streams the client may have open at once. Bidirectional: the session's
/// CONNECT stream, the control stream, and room to see (and refuse) extra
/// ones rather than leave them blocked. Unidirectional: HTTP/3's control
/// and QPACK streams, plus room to refuse.
const CLIENT_BIDI_STREAMS: u32 = 4;
const CLIENT_UNI_STREAMS: u32 = 8;
/// Flow-control windows: what one client may have in flight towards us,
/// per stream and per connection. Control frames are small; the bound is
/// memory per session, not throughput.
const STREAM_RECEIVE_WINDOW: u32 = 256 * 1024;
const RECEIVE_WINDOW: u32 = 1024 * 1024;
/// Unacknowledged bytes quinn buffers per connection towards the client.
const SEND_WINDOW: u64 = 1024 * 1024;
/// Datagrams buffered each way; the oldest go first when full.
const DATAGRAM_BUFFER: usize = 64 * 1024;

/// The front end's tunables from the configuration, with the gateway's
/// one `Origin` allow-list (`[http] allowed_origins`).
pub fn front_end_config(config: &Config, require_token: bool, allowed_origins: OriginPolicy) -> WtConfig {
    let w = &config.websocket;
    WtConfig {
        handshake_timeout: w.handshake_timeout,
        write_timeout: w.write_timeout,
        max_frame_size: config.limits.max_frame_size,
        max_buffered: config.limits.outbox_bytes,
        require_token,
        allowed_origins,
        ..WtConfig::default()
    }
}

/// The QUIC transport of the listener: small windows and buffers (memory
/// per session), keep-alives at `websocket.ping_interval` and an idle
/// timeout of twice that (at least 30 s), so a vanished client is dropped.
pub fn transport_config(config: &Config) -> QuicTransportConfig {
    let mut t = QuicTransportConfig::default();
    t.max_concurrent_bidi_streams(QuicVarInt::from_u32(CLIENT_BIDI_STREAMS));
    t.max_concurrent_uni_streams(QuicVarInt::from_u32(CLIENT_UNI_STREAMS));
    t.stream_receive_window(QuicVarInt::from_u32(STREAM_RECEIVE_WINDOW));
    t.receive_window(QuicVarInt::from_u32(RECEIVE_WINDOW));
    t.send_window(SEND_WINDOW);
    t.datagram_receive_buffer_size(Some(DATAGRAM_BUFFER));
    t.datagram_send_buffer_size(DATAGRAM_BUFFER);
    let ping = config.websocket.ping_interval;
    let idle = (ping * 2).max(Duration::from_secs(30));
    t.keep_alive_interval((!ping.is_zero()).then_some(ping));
    t.max_idle_timeout(idle.try_into().ok());
    t
}

/// Binds the QUIC listener on `addr` (UDP) with the shared certificates.
pub fn bind(addr: &str, tls: &TlsState, config: &Config) -> Result<(QuicEndpoint, SocketAddr), ServerError> {
    let err = |source: std::io::Error| ServerError::Bind { name: "quic", addr: addr.to_string(), source };
    let invalid = |why: String| err(std::io::Error::new(std::io::ErrorKind::InvalidInput, why));
    let sock_addr: SocketAddr = addr.parse().map_err(|_| invalid("not IP:PORT".into()))?;
    let rustls = tls.quic_config().map_err(|e| ServerError::Config(e.to_string()))?;
    let server = ServerConfig::builder()
        .with_bind_address(sock_addr)
        .with_custom_tls_and_transport(rustls, transport_config(config))
        .build();
    let endpoint = Endpoint::server(server).map_err(err)?;
    let local = endpoint.local_addr().map_err(err)?;
    Ok((endpoint, local))
}

/// Counts and logs a connection attempt refused at accept.
fn refused(peer: SocketAddr, why: crate::edge::admission::Refusal) {
    metrics::counter!("switchboard_connections_refused_total", "listener" => "quic", "reason" => why.label())
        .increment(1);
    tracing::debug!(%peer, listener = "quic", reason = why.label(), "connection refused at accept");
}

/// Counts a QUIC connection that never got to its session request.
fn handshake_failed(reason: &'static str) {
    metrics::counter!("switchboard_tls_handshake_failures_total", "listener" => "quic", "reason" => reason)
        .increment(1);
}

/// Accepts QUIC connections until shutdown and serves each WebTransport
/// session request with the front end.
pub async fn accept_loop(
    endpoint: QuicEndpoint,
    admission: Arc<Admission>,
    router: Arc<Router>,
    cfg: WtConfig,
    handshake_timeout: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let incoming = tokio::select! {
            incoming = endpoint.accept() => incoming,
            _ = shutdown.changed() => break,
        };
        let peer = incoming.remote_address();
        let ticket = match admission.admit(peer.ip(), std::time::Instant::now()) {
            Ok(t) => t,
            Err(why) => {
                refused(peer, why);
                incoming.refuse();
                continue;
            }
        };
        let core: Arc<dyn Core> = router.clone();
        let cfg = cfg.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            // The IP's slot lives as long as the session.
            let _ticket = ticket;
            let request = match tokio::time::timeout(handshake_timeout, incoming).await {
                Ok(Ok(request)) => request,
                Ok(Err(e)) => {
                    // Counted like a failed HTTPS or MQTTS handshake: a client
                    // that refused the certificate, a broken TLS or HTTP/3 setup.
                    handshake_failed("error");
                    return tracing::debug!(%peer, error = %e, "QUIC or HTTP/3 handshake failed");
                }
                Err(_) => {
                    handshake_failed("timeout");
                    return tracing::debug!(%peer, "QUIC or HTTP/3 handshake timed out");
                }
            };
            wt::serve_request(request, core, cfg, shutdown).await;
        });
    }
    // Sessions close themselves (1012) on the same signal; give their
    // closing frames a moment, then stop whatever is left (handshakes).
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    endpoint.close(VarInt::from_u32(1012), b"server shutting down");
}
