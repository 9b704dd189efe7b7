//! Starting and stopping the gateway: listeners, the router, housekeeping,
//! graceful shutdown.
//!
//! [`Gateway::start`] binds every configured listener (port 0 picks a free
//! port; the bound addresses are reported back), and [`Gateway::shutdown`]
//! stops accepting, tells every client to reconnect elsewhere (WebSocket
//! close 1012), and waits at most the configured grace for sessions to end.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use switchboard_protocols::port::CloseReason;
use switchboard_protocols::{mqtt, ws};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::core::engine::disk::DiskStore;
use crate::core::engine::local::LocalEngine;
use crate::core::engine::mqtt_sessions::{MqttSessions, StoreLimits};
use crate::core::engine::nats::NatsEngine;
use crate::core::engine::nats::mqtt::NatsSessions;
use crate::core::engine::{Engine, EngineConfig};
use crate::core::router::Router;
use crate::edge::admin::{AdminAccess, AdminState};
use crate::edge::admission::{Admission, Rates, Refusal, Ticket};
use crate::edge::config::Config;
use crate::edge::front;
use crate::edge::http::{HttpShared, HttpState};
use crate::edge::timeouts::{self, Expired, HttpTimeouts, TimedIo, Tracked, Watch, Watchdog};
use crate::edge::tls::TlsState;
use crate::edge::webhooks::Webhooks;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The configuration cannot be used.
    #[error("{0}")]
    Config(String),
    /// The store cannot be opened (the message names the directory and
    /// what to do).
    #[error("{0}")]
    Storage(String),
    /// The shared engine cannot be reached or set up.
    #[error("{0}")]
    Engine(String),
    /// A listener could not bind.
    #[error("cannot listen on {addr} ({name}): {source}")]
    Bind {
        /// Listener name.
        name: &'static str,
        /// Address.
        addr: String,
        /// Cause.
        source: std::io::Error,
    },
}

/// A running gateway.
pub struct Gateway {
    /// Bound HTTP address, if enabled.
    pub http_addr: Option<SocketAddr>,
    /// Bound admin address, if enabled.
    pub admin_addr: Option<SocketAddr>,
    /// Bound MQTT address, if enabled.
    pub mqtt_addr: Option<SocketAddr>,
    /// Bound HTTPS address, if enabled.
    pub https_addr: Option<SocketAddr>,
    /// Bound MQTTS address, if enabled.
    pub mqtts_addr: Option<SocketAddr>,
    /// Bound QUIC (WebTransport) address, if enabled.
    pub quic_addr: Option<SocketAddr>,
    /// TLS state shared by the HTTPS, MQTTS and QUIC listeners, if any is
    /// enabled.
    pub tls: Option<Arc<TlsState>>,
    /// The store, when channel state is on disk (`None`: memory).
    pub storage: Option<crate::core::engine::disk::DiskOptions>,
    /// The NATS servers, when channel state is in JetStream.
    pub nats: Option<String>,
    /// The router (for in-process inspection).
    pub router: Arc<Router>,
    shutdown_tx: watch::Sender<bool>,
    /// Set when a drain starts (`/readyz` turns 503 at once); the admin API
    /// sets it to ask for one ([`Gateway::drain_requested`]).
    draining: Arc<watch::Sender<bool>>,
    tasks: Vec<JoinHandle<()>>,
    grace: Duration,
    drain_delay: Duration,
    /// The MQTT sessions on NATS, whose queued writes a shutdown waits for.
    nats_sessions: Option<Arc<NatsSessions>>,
    /// The webhook endpoints, whose pending deliveries a shutdown gives
    /// `webhook_flush` to go out.
    webhooks: Option<Arc<Webhooks>>,
    webhook_flush: Duration,
}

/// How long a shutdown waits for queued MQTT session writes to NATS.
const SESSION_FLUSH_WAIT: Duration = Duration::from_secs(5);

/// Pending connections the kernel queues per listener. The default 128
/// overflows under connection bursts (reconnect storms after a restart),
/// and each overflow costs the client a one-second SYN retry.
const LISTEN_BACKLOG: u32 = 4096;

async fn bind(name: &'static str, addr: &str) -> Result<Option<TcpListener>, ServerError> {
    if addr.is_empty() {
        return Ok(None);
    }
    let err = |source: std::io::Error| ServerError::Bind { name, addr: addr.to_string(), source };
    let sock_addr: SocketAddr =
        addr.parse().map_err(|_| err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "not IP:PORT")))?;
    let socket = if sock_addr.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() }
        .map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    socket.bind(sock_addr).map_err(err)?;
    socket.listen(LISTEN_BACKLOG).map(Some).map_err(err)
}

impl Gateway {
    /// Binds the listeners and starts serving.
    pub async fn start(config: Config) -> Result<Gateway, ServerError> {
        let config = Arc::new(config);
        crate::edge::admin::metrics_handle();
        let nats = config.engine.kind == crate::edge::config::EngineKind::Nats;
        // On NATS, channel state is the cluster's; `[storage]` is not used.
        let storage = if nats { None } else { config.storage.disk() };
        let (disk, recovery) = match &storage {
            Some(opts) => {
                let (store, recovery) = DiskStore::open(opts).map_err(|e| ServerError::Storage(e.to_string()))?;
                (Some(store), Some(recovery))
            }
            None => (None, None),
        };
        // Before the engine, which hands presence events to them.
        let webhooks =
            Webhooks::start(&config.webhooks, &config.node.name, disk.clone()).map_err(ServerError::Config)?;
        let lifecycle = webhooks.as_ref().map(Webhooks::lifecycle).unwrap_or_default();
        let engine_config = EngineConfig { lifecycle: lifecycle.clone(), ..config.engine() };
        let nats_engine = match nats {
            true => Some(
                NatsEngine::start(engine_config.clone(), config.nats.options(), config.limits.max_message_size)
                    .await
                    .map_err(|e| ServerError::Engine(e.to_string()))?,
            ),
            false => None,
        };
        let engine: Arc<dyn Engine> = match (&disk, recovery) {
            _ if nats_engine.is_some() => nats_engine.clone().expect("the NATS engine"),
            (Some(store), Some(recovery)) => {
                let engine = Arc::new(
                    LocalEngine::with_store(engine_config, store.clone(), recovery, crate::core::router::now_ms())
                        .map_err(|e| ServerError::Storage(e.to_string()))?,
                );
                engine.spawn_loader();
                engine
            }
            _ => Arc::new(LocalEngine::new(engine_config)),
        };
        // Validated at load: a bad key configuration never gets this far.
        let auth = config.auth.verifier().map_err(|e| ServerError::Config(e.to_string()))?;
        let router = Router::new(engine, config.router_limits(), config.node.name.clone(), auth, lifecycle);
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let draining = Arc::new(watch::Sender::new(false));
        let mut tasks = vec![router.spawn_sweeper(Duration::from_secs(1))];
        let l = &config.limits;
        let admission = Admission::new(
            l.max_connections_per_ip,
            Rates {
                rate: l.new_connections_per_sec,
                burst: l.new_connections_burst,
                ip_rate: l.new_connections_per_ip_per_sec,
                ip_burst: l.new_connections_per_ip_burst,
            },
        );

        let tls = match config.tls_needed() {
            true => Some(TlsState::new(&config.tls, config.dev).map_err(|e| ServerError::Config(e.to_string()))?),
            false => None,
        };
        if let Some(tls) = &tls {
            tasks.push(tls.spawn_reloader(shutdown_rx.clone()));
        }
        let handshake_timeout = config.tls.handshake_timeout;
        let http_timeouts = config.http.timeouts();
        // Validated at load, like the keys.
        let origins = config.origin_policy().map_err(|e| ServerError::Config(e.to_string()))?;

        let http = bind("http", &config.listen.http).await?;
        let https = bind("https", &config.listen.https).await?;
        let admin = bind("admin", &config.listen.admin).await?;
        let mqtt = bind("mqtt", &config.listen.mqtt).await?;
        let mqtts = bind("mqtts", &config.listen.mqtts).await?;
        let addr = |l: &Option<TcpListener>| l.as_ref().and_then(|l| l.local_addr().ok());
        let (http_addr, https_addr, admin_addr) = (addr(&http), addr(&https), addr(&admin));
        let (mqtt_addr, mqtts_addr) = (addr(&mqtt), addr(&mqtts));
        // Bound before the HTTP routes are built: `GET /v1/transports` names
        // the QUIC port a browser's WebTransport should use.
        let quic = match tls.as_ref().filter(|_| !config.listen.quic.is_empty()) {
            Some(tls) => Some(crate::edge::wt::bind(&config.listen.quic, tls, &config)?),
            None => None,
        };
        let quic_addr = quic.as_ref().map(|(_, addr)| *addr);

        // One persistent-session store for MQTT over TCP and over WebSocket.
        let mqtt_cfg = Arc::new(config.mqtt.front_end());
        let limits = StoreLimits {
            max_sessions: mqtt_cfg.max_sessions,
            expiry_max: mqtt_cfg.session_expiry_max,
            max_delayed_wills: config.mqtt.max_delayed_wills,
        };
        let mut nats_sessions = None;
        let mqtt_sessions: Arc<dyn mqtt::SessionStore> = match &nats_engine {
            // On NATS the sessions are the cluster's, so a device resumes on
            // any node (docs/cluster.md).
            Some(engine) => {
                let sessions =
                    NatsSessions::start(engine, limits).await.map_err(|e| ServerError::Engine(e.to_string()))?;
                nats_sessions = Some(sessions.clone());
                sessions
            }
            None => {
                let sessions = Arc::new(match &disk {
                    Some(store) => MqttSessions::on_disk(
                        limits,
                        store.clone(),
                        tokio::time::Instant::now(),
                        crate::core::router::now_ms().max(0) as u64,
                    ),
                    None => MqttSessions::with_limits(limits),
                });
                tasks.push(spawn_mqtt_sweeper(&sessions));
                sessions
            }
        };

        if let Some(listener) = http {
            let w = &config.websocket;
            let state = HttpState::new(HttpShared {
                router: router.clone(),
                config: config.clone(),
                ws: ws::WsConfig {
                    handshake_timeout: w.handshake_timeout,
                    write_timeout: w.write_timeout,
                    ping_interval: w.ping_interval,
                    max_frame_size: config.limits.max_frame_size,
                    read_buffer_size: w.read_buffer,
                    write_buffer_size: w.write_buffer,
                    deflate: switchboard_protocols::ws_frames::DeflateConfig {
                        enabled: w.deflate,
                        context_takeover: w.deflate_context_takeover,
                        min_size: w.deflate_min_size,
                    },
                },
                echo: config.echo.enabled,
                shutdown: shutdown_rx.clone(),
                sse: switchboard_protocols::sse::SseConfig { keepalive: config.sse.keepalive, retry: config.sse.retry },
                poll: switchboard_protocols::poll::PollConfig {
                    default_timeout: config.poll.default_timeout,
                    max_timeout: config.poll.max_timeout,
                    batch_max: config.poll.batch_max,
                },
                stream_limits: switchboard_protocols::stream::StreamLimits {
                    max_channels: config.limits.max_stream_channels,
                    max_query_len: config.limits.max_query_len,
                },
                mqtt: mqtt_cfg.clone(),
                mqtt_sessions: mqtt_sessions.clone(),
                tls: tls.clone(),
                origins: origins.clone(),
                parked: crate::edge::http::ParkedPolls::new(shutdown_rx.clone()),
                listeners: crate::edge::http::Listeners {
                    quic: quic_addr.map(|a| a.port()),
                    mqtt: mqtt_addr.map(|a| a.port()),
                    mqtts: mqtts_addr.map(|a| a.port()),
                    https: https_addr.map(|a| a.port()),
                },
            });
            // The same routes over TLS: HTTP/1.1 and HTTP/2 by ALPN.
            let secure = https.zip(tls.clone()).map(|(listener, tls)| {
                let state = state.clone();
                let tls = Tls { config: Arc::new(move || tls.https_config()), timeout: handshake_timeout };
                let front = Some(state.clone());
                let (admission, shutdown) = (Some(admission.clone()), shutdown_rx.clone());
                accept_loop(listener, "https", admission, Some(tls), front, http_timeouts, shutdown, {
                    move |peer, ticket| {
                        let state = state.clone();
                        service_fn(move |req| crate::edge::http::handle(state.clone(), peer, ticket.clone(), req))
                    }
                })
            });
            tasks.extend(secure.map(tokio::spawn));
            tasks.push(tokio::spawn(accept_loop(
                listener,
                "http",
                Some(admission.clone()),
                None,
                Some(state.clone()),
                http_timeouts,
                shutdown_rx.clone(),
                move |peer, ticket| {
                    let state = state.clone();
                    service_fn(move |req| crate::edge::http::handle(state.clone(), peer, ticket.clone(), req))
                },
            )));
        }
        if let Some((listener, addr)) = admin.zip(admin_addr) {
            let state = Arc::new(AdminState {
                router: router.clone(),
                shutdown: shutdown_rx.clone(),
                draining: draining.clone(),
                access: AdminAccess::new(&config.admin.token, addr),
            });
            if config.admin.token.is_empty() {
                tracing::info!(%addr, "the admin API is open to whoever reaches its address ([admin] token is not set)");
            }
            tasks.push(tokio::spawn(accept_loop(
                listener,
                "admin",
                None,
                None,
                None,
                http_timeouts,
                shutdown_rx.clone(),
                move |peer, _ticket| {
                    let state = state.clone();
                    service_fn(move |req| crate::edge::admin::handle(state.clone(), peer, req))
                },
            )));
        }
        let mqtt_listeners = [
            mqtt.map(|l| (l, "mqtt", None)),
            mqtts.zip(tls.clone()).map(|(l, tls)| {
                (l, "mqtts", Some(Tls { config: Arc::new(move || tls.mqtts_config()), timeout: handshake_timeout }))
            }),
        ];
        for (listener, name, tls) in mqtt_listeners.into_iter().flatten() {
            tasks.push(tokio::spawn(mqtt_accept_loop(
                listener,
                name,
                tls,
                admission.clone(),
                router.clone(),
                mqtt_sessions.clone(),
                mqtt_cfg.clone(),
                shutdown_rx.clone(),
            )));
        }

        // QUIC listener: crate::edge::wt
        if let Some((endpoint, _)) = quic {
            // Token mode needs a token at the session request, unless
            // anonymous clients are admitted.
            let require_token = !router.is_open() && router.anonymous_caps().is_none();
            let wt_cfg = crate::edge::wt::front_end_config(&config, require_token, origins.clone());
            tasks.push(tokio::spawn(crate::edge::wt::accept_loop(
                endpoint,
                admission.clone(),
                router.clone(),
                wt_cfg,
                handshake_timeout,
                shutdown_rx.clone(),
            )));
        }

        Ok(Gateway {
            http_addr,
            admin_addr,
            mqtt_addr,
            https_addr,
            mqtts_addr,
            quic_addr,
            tls,
            storage,
            nats: nats.then(|| config.nats.servers.join(",")),
            router,
            shutdown_tx,
            draining,
            tasks,
            grace: config.shutdown.grace,
            drain_delay: config.shutdown.drain_delay,
            nats_sessions,
            webhooks,
            webhook_flush: config.shutdown.webhook_flush,
        })
    }

    /// Resolves when the admin API asked for a drain (`POST /v1/drain`);
    /// the caller then runs [`Gateway::shutdown`], as on SIGTERM.
    pub async fn drain_requested(&self) {
        let mut rx = self.draining.subscribe();
        let _ = rx.wait_for(|d| *d).await;
    }

    /// Drains the node: `/readyz` turns 503 at once while everything is
    /// still served for `[shutdown] drain_delay` (so a load balancer stops
    /// sending new clients); then it stops accepting, tells every client to
    /// reconnect elsewhere in its protocol's words, waits up to the grace
    /// period for the sessions to end (a request being handled is answered
    /// first), and closes the store (flushed, synced, marked clean).
    pub async fn shutdown(self) {
        self.draining.send_replace(true);
        tracing::info!(delay = ?self.drain_delay, grace = ?self.grace, "draining");
        tokio::time::sleep(self.drain_delay).await;
        let _ = self.shutdown_tx.send(true);
        self.router.close_all(CloseReason::SHUTDOWN);
        let deadline = tokio::time::Instant::now() + self.grace;
        while self.router.session_count() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = self.router.session_count();
        if left > 0 {
            tracing::warn!(sessions = left, "shutdown grace ran out with sessions still open");
        }
        for t in self.tasks {
            t.abort();
        }
        // The MQTT sessions the closed connections released are written to
        // NATS before the process goes (bounded: NATS may be down).
        if let Some(sessions) = &self.nats_sessions {
            let failed_before = sessions.failed();
            if !sessions.flush(SESSION_FLUSH_WAIT).await {
                tracing::warn!(
                    pending = sessions.pending(),
                    "shutdown: MQTT session writes to NATS still queued after {SESSION_FLUSH_WAIT:?}; those sessions \
                     resume from their previous record"
                );
            }
            let failed = sessions.failed() - failed_before;
            if failed > 0 {
                tracing::warn!(
                    failed,
                    "shutdown: MQTT session writes to NATS failed; those sessions resume from their previous record"
                );
            }
        }
        // The sessions' disconnect events are queued by now: a short chance
        // to deliver them, then the workers stop (a durable outbox keeps
        // the rest) before the store closes.
        // Members within their grace period would never come back to this
        // process: their leaves go out now, before the webhooks' flush.
        self.router.leave_pending_presence();
        if let Some(webhooks) = &self.webhooks {
            webhooks.shutdown(self.webhook_flush).await;
        }
        // After the sessions: nothing publishes any more, and the store
        // records a clean stop.
        self.router.close_engine();
    }
}

/// Counts and logs a connection refused at accept.
fn refused(listener: &'static str, peer: SocketAddr, why: Refusal) {
    metrics::counter!("switchboard_connections_refused_total", "listener" => listener, "reason" => why.label())
        .increment(1);
    tracing::debug!(%peer, listener, reason = why.label(), "connection refused at accept");
}

/// Forgets expired MQTT persistent sessions every ten seconds.
fn spawn_mqtt_sweeper(sessions: &Arc<MqttSessions>) -> JoinHandle<()> {
    let weak = Arc::downgrade(sessions);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        loop {
            tick.tick().await;
            let Some(sessions) = weak.upgrade() else { break };
            sessions.sweep(tokio::time::Instant::now());
        }
    })
}

/// TLS on a TCP listener: the current configuration (it changes on
/// reload) and the handshake deadline.
#[derive(Clone)]
struct Tls {
    config: Arc<dyn Fn() -> Arc<rustls::ServerConfig> + Send + Sync>,
    timeout: Duration,
}

impl Tls {
    /// The TLS handshake, bounded by the deadline; `None` (counted and
    /// logged) when it fails.
    ///
    /// Both the handshake and the stream it yields live on the heap: a
    /// connection's task is as large as its largest state, and inline they
    /// made every idle TLS connection's task carry the handshake's state
    /// (the whole rustls connection mid-handshake) for its life, beside the
    /// stream itself.
    async fn accept(
        &self,
        stream: tokio::net::TcpStream,
        listener: &'static str,
        peer: SocketAddr,
    ) -> Option<Box<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>> {
        let acceptor = tokio_rustls::TlsAcceptor::from((self.config)());
        let why = match tokio::time::timeout(self.timeout, Box::pin(acceptor.accept(stream))).await {
            Ok(Ok(s)) => return Some(Box::new(s)),
            Ok(Err(e)) => {
                tracing::debug!(%peer, listener, error = %e, "TLS handshake failed");
                "error"
            }
            Err(_) => {
                tracing::debug!(%peer, listener, "TLS handshake timed out");
                "timeout"
            }
        };
        metrics::counter!("switchboard_tls_handshake_failures_total", "listener" => listener, "reason" => why)
            .increment(1);
        None
    }
}

/// The client id a verified client certificate proves, if one was sent.
/// `Err` when a certificate was verified but cannot be an id.
fn cert_identity(tls: &tokio_rustls::server::TlsStream<tokio::net::TcpStream>) -> Result<Option<String>, String> {
    match tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
        None => Ok(None),
        Some(leaf) => crate::edge::tls::client_identity(leaf).map(Some),
    }
}

/// Accepts MQTT connections (3.1.1 and 5 on one port, over TCP or TLS)
/// until shutdown.
#[allow(clippy::too_many_arguments)]
async fn mqtt_accept_loop(
    listener: TcpListener,
    name: &'static str,
    tls: Option<Tls>,
    admission: Arc<Admission>,
    router: Arc<Router>,
    sessions: Arc<dyn mqtt::SessionStore>,
    cfg: Arc<mqtt::MqttConfig>,
    mut shutdown: watch::Receiver<bool>,
) {
    while let Some((stream, peer)) = next_connection(&listener, name, &mut shutdown).await {
        let ticket = match admission.admit(peer.ip(), std::time::Instant::now()) {
            Ok(t) => t,
            Err(why) => {
                refused(name, peer, why);
                drop(stream);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let core: Arc<dyn switchboard_protocols::port::Core> = router.clone();
        let (sessions, cfg, shutdown) = (sessions.clone(), cfg.clone(), shutdown.clone());
        let tls = tls.clone();
        // One task per kind of connection: a task is as large as its
        // largest state, and a plain connection must not pay for TLS's.
        let Some(tls) = tls else {
            // The session's future is built here and not inside an `async`
            // block: the block would keep its own copy of every argument.
            let session = mqtt::serve(stream, core, sessions, cfg, mqtt::Peer::addr(Some(peer)), shutdown);
            tokio::spawn(futures_util::FutureExt::map(session, move |()| drop(ticket)));
            continue;
        };
        tokio::spawn(async move {
            let _ticket = ticket;
            let Some(stream) = tls.accept(stream, name, peer).await else { return };
            let cert_identity = match cert_identity(&stream) {
                Ok(id) => id,
                Err(why) => {
                    metrics::counter!("switchboard_tls_handshake_failures_total", "listener" => name, "reason" => "identity")
                        .increment(1);
                    tracing::info!(%peer, listener = name, reason = %why, "refused a client certificate");
                    return;
                }
            };
            let peer = mqtt::Peer { addr: Some(peer), cert_identity };
            mqtt::serve(stream, core, sessions, cfg, peer, shutdown).await;
        });
    }
}

/// Accepts TCP connections and serves HTTP/1.1 and HTTP/2 (with upgrades)
/// on each until shutdown, within `timeouts`.
#[allow(clippy::too_many_arguments)]
async fn accept_loop<S, F>(
    listener: TcpListener,
    name: &'static str,
    admission: Option<Arc<Admission>>,
    tls: Option<Tls>,
    front: Option<crate::edge::http::HttpState>,
    timeouts: HttpTimeouts,
    mut shutdown: watch::Receiver<bool>,
    make_service: F,
) where
    F: Fn(SocketAddr, Option<Arc<Ticket>>) -> S + Send + 'static,
    S: hyper::service::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<crate::edge::http::Body>,
            Error = std::convert::Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
{
    while let Some((stream, peer)) = next_connection(&listener, name, &mut shutdown).await {
        let ticket = match admission.as_ref().map(|a| a.admit(peer.ip(), std::time::Instant::now())) {
            None => None,
            Some(Ok(t)) => Some(t),
            Some(Err(why)) => {
                refused(name, peer, why);
                // Best effort: tell an HTTP client why, then close.
                let mut stream = stream;
                // Read the request head first (briefly): an HTTP client
                // that is still sending treats an early answer as a broken
                // connection and never sees the 429.
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                    let answer = async {
                        let mut head = Vec::new();
                        let mut chunk = [0u8; 512];
                        while head.len() < front::MAX_HEAD && !head.windows(4).any(|w| w == b"\r\n\r\n") {
                            match stream.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => head.extend_from_slice(&chunk[..n]),
                            }
                        }
                        let _ = stream.write_all(crate::edge::admission::HTTP_REFUSAL).await;
                        let _ = stream.shutdown().await;
                    };
                    let _ = tokio::time::timeout(Duration::from_secs(1), answer).await;
                });
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        // Shared with the request handlers: an upgraded connection (a
        // WebSocket) keeps the IP's slot after hyper's task ends.
        let ticket = ticket.map(Arc::new);
        let service = make_service(peer, ticket.clone());
        let conn_shutdown = shutdown.clone();
        // Each task holds the IP's connection slot until the connection
        // ends. One task per kind: a plain connection must not pay for the
        // size of TLS's state.
        let front = front.clone();
        let conn = Conn { peer, timeouts, shutdown: conn_shutdown };
        match tls.clone() {
            None => tokio::spawn(async move {
                serve_connection(stream, front, service, conn, false).await;
                drop(ticket);
            }),
            Some(tls) => tokio::spawn(async move {
                let _ticket = ticket;
                let Some(stream) = tls.accept(stream, name, peer).await else { return };
                // HTTP/2 (ALPN h2) is hyper's from the first byte.
                let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                serve_connection(stream, front.filter(|_| !h2), service, conn, h2).await;
            }),
        };
    }
}

/// The next accepted connection, or `None` once the gateway stops. Accept
/// errors (out of file descriptors and the like) are logged and retried
/// after a short back-off.
async fn next_connection(
    listener: &TcpListener,
    name: &'static str,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<(tokio::net::TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => return Some(c),
                Err(e) => {
                    tracing::warn!(listener = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.changed() => return None,
        }
    }
}

/// What a connection's HTTP serving needs besides its stream and service.
struct Conn {
    peer: SocketAddr,
    timeouts: HttpTimeouts,
    shutdown: watch::Receiver<bool>,
}

/// One HTTP connection: through the front door ([`front`]) when given,
/// which hands hyper whatever is not its own, else straight to hyper
/// (`h2`: HTTP/2 by ALPN).
async fn serve_connection<IO, S>(io: IO, front: Option<crate::edge::http::HttpState>, service: S, conn: Conn, h2: bool)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<crate::edge::http::Body>,
            Error = std::convert::Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
{
    match front {
        Some(state) => {
            if let front::Outcome::Hyper(io, slot) = front::serve(io, state, conn.peer).await {
                // An h2c client (prior knowledge) starts with the preface.
                let h2 = h2 || io.is_h2_preface();
                if h2 {
                    // HTTP/2 multiplexes any number of pollers (tabs) on one
                    // connection: no one session is kept for "the next poll".
                    Box::pin(serve_http(io, service, conn, h2)).await;
                } else {
                    // HTTP/1.1: the connection's kept poll session stays
                    // with it through the requests hyper serves.
                    let service = hyper::service::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
                        req.extensions_mut().insert(slot.clone());
                        service.call(req)
                    });
                    // Boxed: hyper's state is not needed while a stream lasts.
                    Box::pin(serve_http(io, service, conn, h2)).await;
                }
            }
        }
        // Boxed too: inline, hyper's connection state would make every
        // task as large, the front door's idle streams included.
        None => Box::pin(serve_http(io, service, conn, h2)).await,
    }
}

/// Serves HTTP/1.1 and HTTP/2 (with upgrades) on one connection until it
/// ends, a timeout expires ([`crate::edge::timeouts`]) or the gateway
/// stops.
async fn serve_http<IO, S>(io: IO, service: S, conn: Conn, h2: bool)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<crate::edge::http::Body>,
            Error = std::convert::Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
{
    let Conn { peer, timeouts, mut shutdown } = conn;
    let watch = Watch::new(timeouts, peer, h2);
    let io = TokioIo::new(TimedIo::new(io, watch.clone()));
    let service = Tracked::new(service, watch.clone());
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    let mut watchdog = Watchdog::new(watch.clone());
    let expired = tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
            }
            None
        }
        kind = &mut watchdog => Some(kind),
        _ = shutdown.changed() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), conn.as_mut()).await;
            None
        }
    };
    if let Some(kind) = expired {
        timeouts::expired(kind, peer);
        // An idle connection is closed politely (HTTP/2: GOAWAY, so the
        // client does not retry into a dead connection); the rest dropped.
        if kind == Expired::Idle {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(timeouts.write, conn.as_mut()).await;
        }
    }
    watch.release();
}
