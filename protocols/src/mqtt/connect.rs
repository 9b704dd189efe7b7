//! Opening a connection: the CONNECT within its timeout, the protocol level,
//! authentication through the core, the client id rules, the session claim
//! (resume, takeover) and the CONNACK. What follows belongs to [`super::conn`].

use super::*;

/// Reads the CONNECT and opens the session; `None` when the connection
/// ended instead.
pub(crate) async fn open<S: AsyncRead + AsyncWrite + Unpin + Send>(
    mut io: Io<S>,
    core: Arc<dyn Core>,
    sessions: Arc<dyn SessionStore>,
    cfg: Arc<MqttConfig>,
    peer: Peer,
    mut shutdown: watch::Receiver<bool>,
    span: Span,
) -> Option<Conn<S>> {
    let Some(connect) = read_connect(&mut io, &cfg, &mut shutdown).await else {
        io.shutdown().await;
        return None;
    };
    span.record("version", if connect.version == Version::V5 { "5" } else { "3.1.1" });
    accept(io, *connect, core, sessions, cfg, peer, shutdown, &span).await
}

/// Reads until a CONNECT, within the connect timeout. `None` ends the
/// connection (after writing a refusal where the spec asks for one).
pub(crate) async fn read_connect<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut Io<S>,
    cfg: &MqttConfig,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<Box<codec::Connect>> {
    let deadline = tokio::time::sleep(cfg.connect_timeout);
    tokio::pin!(deadline);
    loop {
        match codec::decode(&mut io.rbuf, None, cfg.max_packet_size) {
            Ok(Some(Packet::Connect(c))) => return Some(c),
            Ok(Some(other)) => {
                // `decode` only yields a CONNECT here; be defensive anyway.
                info!(packet = ?other, "refused: the first packet must be CONNECT");
                protocol_error("not_connect");
                return None;
            }
            Ok(None) => {}
            Err(CodecError::UnsupportedVersion(level)) => {
                info!(level, "refused: unsupported MQTT protocol level");
                protocol_error("unsupported_version");
                codec::refuse_version(&mut io.wbuf);
                if io.flush().await.is_ok() {
                    io.close_lingering().await;
                }
                return None;
            }
            Err(e) => {
                info!(error = %e, "refused before CONNECT");
                protocol_error(match e {
                    CodecError::TooLarge { .. } => "too_large",
                    CodecError::NotConnect(_) => "not_connect",
                    _ => "malformed",
                });
                return None;
            }
        }
        tokio::select! {
            biased;
            _ = shutdown.changed() => {
                debug!("shutdown before CONNECT");
                return None;
            }
            () = &mut deadline => {
                info!(timeout = ?cfg.connect_timeout, "refused: no CONNECT in time");
                protocol_error("connect_timeout");
                return None;
            }
            n = io.read_more() => match n {
                Ok(0) | Err(_) => {
                    debug!("peer closed before CONNECT");
                    return None;
                }
                Ok(_) => {}
            },
        }
    }
}

/// Writes a refusing CONNACK and closes, lingering so that the refusal
/// reaches a client that is already sending more.
pub(crate) async fn refuse<S: AsyncRead + AsyncWrite + Unpin>(io: &mut Io<S>, version: Version, code: u8) {
    let _ = codec::encode(version, &Outgoing::ConnAck { session_present: false, code, props: None }, &mut io.wbuf);
    match io.flush().await {
        Ok(()) => io.close_lingering().await,
        Err(_) => io.shutdown().await,
    }
}

/// The will, validated and ready to publish.
#[derive(Debug, Clone)]
pub(crate) struct WillMsg {
    pub(crate) publish: proto::Publish,
    pub(crate) delay: u32,
}

/// Handles the CONNECT: client id rules, the core session, the session
/// store, CONNACK. `None` when the connection was refused (and closed).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn accept<S: AsyncRead + AsyncWrite + Unpin + Send>(
    mut io: Io<S>,
    c: codec::Connect,
    core: Arc<dyn Core>,
    sessions: Arc<dyn SessionStore>,
    cfg: Arc<MqttConfig>,
    peer: Peer,
    shutdown: watch::Receiver<bool>,
    span: &Span,
) -> Option<Conn<S>> {
    let version = c.version;
    let v5 = version == Version::V5;
    // MQTT 3.1.1 §3.1.3.1: an empty id needs clean session 1 (else 0x02);
    // MQTT 5 §3.1.3.1.1: the server assigns one and says so in CONNACK.
    // A device authenticated by its certificate is that certificate's id.
    let mut assigned = None;
    let client_id = if let Some(id) = &peer.cert_identity {
        if !c.client_id.is_empty() && c.client_id != *id {
            info!(certificate = %id, asked = %c.client_id, "refused: client id differs from the certificate's");
            refuse(&mut io, version, if v5 { reason::CLIENT_ID_INVALID } else { 2 }).await;
            return None;
        }
        if c.client_id.is_empty() && v5 {
            assigned = Some(id.clone());
        }
        id.clone()
    } else if c.client_id.is_empty() {
        if !v5 && !c.clean {
            info!("refused: empty client id with clean session 0");
            refuse(&mut io, version, 2).await;
            return None;
        }
        let id = generated_client_id();
        assigned = Some(id.clone());
        id
    } else {
        c.client_id.clone()
    };
    span.record("client_id", client_id.as_str());

    let will = match &c.will {
        None => None,
        Some(w) => {
            let topic = std::str::from_utf8(&w.topic).ok().filter(|t| topic_error(t).is_none());
            let Some(topic) = topic else {
                info!("refused: invalid will topic");
                protocol_error("topic_invalid");
                refuse(&mut io, version, reason::TOPIC_NAME_INVALID).await;
                return None;
            };
            let p = codec::Publish {
                qos: w.qos,
                retain: w.retain,
                payload: w.payload.clone(),
                props: w.props.clone(),
                ..Default::default()
            };
            Some(Box::new(WillMsg { publish: publish_request(topic.to_string(), &p), delay: w.delay }))
        }
    };

    // The password is the connection token; with the `jwt` Authentication
    // Method (MQTT 5 §4.12, for re-authentication) the Authentication Data
    // is, when present.
    let mut token = c.password.clone().unwrap_or_default();
    let auth_method = match (&c.auth_method, &c.auth_data) {
        (None, None) => None,
        (None, Some(_)) => {
            // MQTT 5 §3.1.2.11.10.
            info!("refused: Authentication Data without an Authentication Method");
            protocol_error("protocol_error");
            refuse(&mut io, version, reason::PROTOCOL_ERROR).await;
            return None;
        }
        (Some(m), data) if m == AUTH_METHOD_JWT => {
            if let Some(d) = data {
                token = String::from_utf8_lossy(d).into_owned();
            }
            Some(m.clone())
        }
        (Some(m), _) => {
            info!(method = %m, "refused: unknown authentication method");
            protocol_error("bad_auth_method");
            refuse(&mut io, version, reason::BAD_AUTHENTICATION_METHOD).await;
            return None;
        }
    };

    // No password, no Authentication Data, no client certificate: the core
    // either refuses the client or admits it anonymously, naming it.
    let credentials = !token.is_empty() || peer.cert_identity.is_some();
    let open = OpenSession {
        protocol: proto::Protocol::Mqtt,
        client_id: client_id.clone(),
        token,
        peer: peer.addr,
        cert_identity: peer.cert_identity.clone(),
    };
    let handle = match core.open(open).await {
        Ok(h) => h,
        Err(e) => {
            info!(code = e.code.slug(), error = %e, "refused: the core did not open the session");
            let (v4code, v5code) = connack_refusal(e.code);
            refuse(&mut io, version, if v5 { v5code } else { v4code }).await;
            return None;
        }
    };
    let session = CoreSession { handle, core: Arc::clone(&core), end: CloseKind::Abrupt };
    // The core names the client (with token auth, the token's `sub`). A
    // CONNECT asking for another id is refused: its id keys the persistent
    // session and the takeover below, which belong to that other client.
    // An anonymous client (admitted without credentials) gets the id the
    // core generated whatever it asked, and no persistent session: nothing
    // could resume it, and it must not fill the store.
    let anonymous = !credentials && session.handle.client_id != client_id;
    let client_id = if session.handle.client_id == client_id {
        client_id
    } else if c.client_id.is_empty() || anonymous {
        let id = session.handle.client_id.clone();
        if v5 && c.client_id.is_empty() {
            assigned = Some(id.clone());
        }
        span.record("client_id", id.as_str());
        id
    } else {
        info!(asked = %client_id, token = %session.handle.client_id, "refused: the client id is not the token's");
        drop(session);
        refuse(&mut io, version, if v5 { reason::CLIENT_ID_INVALID } else { 2 }).await;
        return None;
    };

    // Authorised: now the client id may displace another connection.
    let now = Instant::now();
    let (ticket, claim) = sessions.claim(&client_id, now);
    let stored = match claim {
        Claim::Fresh => None,
        Claim::Resumed(s) => Some(s),
        Claim::Takeover(rx) => {
            info!("session takeover: closing the previous connection");
            match tokio::time::timeout(cfg.takeover_timeout, rx).await {
                Ok(Ok(s)) => s,
                _ => {
                    warn!("previous connection did not hand its session over in time");
                    None
                }
            }
        }
        Claim::Lookup(rx) => match tokio::time::timeout(cfg.takeover_timeout, rx).await {
            Ok(Ok(Ok(s))) => s,
            failed => {
                let why = match failed {
                    Ok(Ok(Err(e))) => e,
                    Ok(Err(_)) => "the session store dropped the lookup".to_string(),
                    _ => "the session store did not answer in time".to_string(),
                };
                warn!(error = %why, "refused: the shared session store cannot answer");
                sessions.release(&client_id, ticket.conn, None, Duration::ZERO, now);
                drop(session);
                refuse(&mut io, version, if v5 { reason::SERVER_UNAVAILABLE } else { 3 }).await;
                return None;
            }
        },
    };
    // Clean session / clean start discards what was stored (§3.1.2.4).
    let stored = if c.clean { None } else { stored };
    let session_present = stored.is_some();
    let sessions = match anonymous {
        true => Arc::new(Ephemeral(sessions)),
        false => sessions,
    };
    let expiry_cap = sessions.expiry_max();
    let session_expiry = if v5 {
        let asked = Duration::from_secs(c.session_expiry.into());
        asked.min(expiry_cap)
    } else if c.clean {
        Duration::ZERO
    } else {
        expiry_cap
    };
    let mut keep_alive = c.keep_alive;
    let mut server_keep_alive = None;
    if v5 && cfg.keepalive_max > 0 && (keep_alive == 0 || keep_alive > cfg.keepalive_max) {
        keep_alive = cfg.keepalive_max;
        server_keep_alive = Some(keep_alive);
    }
    let props = v5.then(|| {
        Box::new(rumqttc::v5::mqttbytes::v5::ConnAckProperties {
            session_expiry_interval: (Duration::from_secs(c.session_expiry.into()) > session_expiry)
                .then_some(session_expiry.as_secs() as u32),
            receive_max: Some(cfg.receive_maximum),
            max_qos: None,
            retain_available: Some(1),
            max_packet_size: Some(u32::try_from(cfg.max_packet_size).unwrap_or(u32::MAX)),
            assigned_client_identifier: assigned.clone(),
            topic_alias_max: Some(cfg.max_topic_aliases),
            reason_string: None,
            user_properties: Vec::new(),
            wildcard_subscription_available: Some(1),
            subscription_identifiers_available: Some(1),
            shared_subscription_available: Some(1),
            server_keep_alive,
            response_information: None,
            server_reference: None,
            // MQTT 5 §4.12: named back only when the client used it.
            authentication_method: auth_method.clone(),
            authentication_data: None,
        })
    });
    let _ = codec::encode(version, &Outgoing::ConnAck { session_present, code: reason::SUCCESS, props }, &mut io.wbuf);
    debug!(session_present, ?session_expiry, keep_alive, "session opened");
    let window = usize::from(c.receive_maximum.unwrap_or(u16::MAX).min(cfg.receive_maximum).max(1));
    let client_max_packet = c.max_packet_size.map_or(usize::MAX, |m| m as usize);
    let (state, disconnected_ms) = match stored {
        Some(s) => (s.state, Some(s.disconnected_ms)),
        None => (SessionState::default(), None),
    };
    Some(Conn {
        io,
        version,
        client_id,
        core,
        sessions,
        session: Some(session),
        ticket,
        state,
        resume_since: disconnected_ms,
        keepalive: Keepalive::new(keep_alive, now),
        timer: Box::pin(tokio::time::sleep_until(now + Duration::from_secs(keep_alive.into()) * 3 / 2)),
        in_aliases: InboundAliases::new(if v5 { cfg.max_topic_aliases } else { 0 }),
        out_aliases: OutboundAliases::new(if v5 { c.topic_alias_max } else { 0 }),
        window,
        client_max_packet,
        will,
        session_expiry,
        v5_expiry_was_zero: v5 && c.session_expiry == 0,
        auth_method,
        entered: HashSet::new(),
        drained: Vec::new(),
        arrival: ArrivalClock::default(),
        cfg,
        shutdown,
    })
}

/// The session store of an anonymous client: its session is never kept
/// (expiry 0, whatever the CONNECT or DISCONNECT asks), while the claim,
/// takeover and wills work as for any client.
#[derive(Debug)]
struct Ephemeral(Arc<dyn SessionStore>);

impl SessionStore for Ephemeral {
    fn claim(&self, client_id: &str, now: Instant) -> (Ticket, Claim) {
        self.0.claim(client_id, now)
    }

    fn release(&self, client_id: &str, conn: u64, _: Option<Box<StoredSession>>, _: Duration, now: Instant) {
        self.0.release(client_id, conn, None, Duration::ZERO, now);
    }

    fn expiry_max(&self) -> Duration {
        Duration::ZERO
    }

    fn delay_will(&self, client_id: &str) -> Option<super::DelayedWill> {
        self.0.delay_will(client_id)
    }

    fn take_will(&self, client_id: &str, token: u64) -> bool {
        self.0.take_will(client_id, token)
    }
}
