//! An open MQTT connection: its state ([`Conn`]), the one `select!` loop over
//! the socket, the outbox, the keepalive timer, shutdown and takeover, and how
//! it ends (session stored or handed over, will published or delayed).
//! Packet handling is [`inbound`]; queueing, encoding and writing deliveries
//! is [`outbound`].

use super::*;

mod inbound;
mod outbound;

/// An open core session. Dropping it tells the core, so `core.close` runs
/// exactly once however the connection ends.
pub(crate) struct CoreSession {
    pub(crate) handle: SessionHandle,
    pub(crate) core: Arc<dyn Core>,
    pub(crate) end: CloseKind,
}

impl Drop for CoreSession {
    fn drop(&mut self) {
        self.core.close(self.handle.id, self.end);
    }
}

/// Why the session loop stopped, decided once; [`Conn::finish`] acts on it.
#[derive(Debug)]
pub(crate) enum Stop {
    /// The client sent DISCONNECT with this reason.
    ClientDisconnect(u8),
    /// We close: MQTT 5 DISCONNECT with this reason first.
    Disconnect(u8),
    /// Another connection took the session over.
    TakenOver(Handover),
    /// The transport is gone or stuck.
    Gone,
}

/// One accepted connection. Deadlines and buffers live here, not in
/// futures that the `select!` could drop.
pub(crate) struct Conn<S> {
    pub(crate) io: Io<S>,
    pub(crate) version: Version,
    pub(crate) client_id: String,
    pub(crate) core: Arc<dyn Core>,
    pub(crate) sessions: Arc<dyn SessionStore>,
    /// Taken when a delayed will needs the core session to outlive us.
    pub(crate) session: Option<CoreSession>,
    pub(crate) ticket: Ticket,
    pub(crate) state: SessionState,
    /// Set when resuming a stored session: its disconnect time.
    pub(crate) resume_since: Option<u64>,
    pub(crate) keepalive: Keepalive,
    pub(crate) timer: Pin<Box<Sleep>>,
    pub(crate) in_aliases: InboundAliases,
    pub(crate) out_aliases: OutboundAliases,
    /// Outbound QoS 1/2 in flight at most.
    pub(crate) window: usize,
    /// The client's Maximum Packet Size (MQTT 5), else unlimited.
    pub(crate) client_max_packet: usize,
    /// Boxed: most connections have none, and every connection holds this.
    pub(crate) will: Option<Box<WillMsg>>,
    /// Zero: the session ends with the connection.
    pub(crate) session_expiry: Duration,
    /// MQTT 5 §3.14.2.2.2: a DISCONNECT may not raise a zero expiry.
    pub(crate) v5_expiry_was_zero: bool,
    /// The CONNECT's Authentication Method (`jwt`): re-authentication is
    /// allowed only with it (MQTT 5 §4.12).
    pub(crate) auth_method: Option<String>,
    /// Channels whose presence this client entered via `$presence/...`.
    pub(crate) entered: HashSet<String>,
    pub(crate) drained: Vec<Outbound>,
    /// When the bytes being handled arrived ([`crate::arrival`]): a
    /// SUBSCRIBE is in effect from then.
    pub(crate) arrival: ArrivalClock,
    pub(crate) cfg: Arc<MqttConfig>,
    pub(crate) shutdown: watch::Receiver<bool>,
}

/// What woke the connection task.
pub(crate) enum Event {
    Shutdown,
    Kick(Result<Handover, oneshot::error::RecvError>),
    Timer,
    Read(std::io::Result<usize>),
    Outbox,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Conn<S> {
    pub(crate) fn v5(&self) -> bool {
        self.version == Version::V5
    }

    pub(crate) fn handle_id(&self) -> u64 {
        self.session.as_ref().map_or(0, |s| s.handle.id)
    }

    pub(crate) fn push(&mut self, p: Outgoing) {
        if let Err(e) = codec::encode(self.version, &p, &mut self.io.wbuf) {
            warn!(error = %e, packet = ?p, "could not encode a packet");
        }
    }

    /// Tells the store what changed in a persistent session, before the
    /// packets that acknowledge the change are written.
    pub(crate) fn checkpoint(&mut self) {
        if !self.session_expiry.is_zero() && self.state.take_changed() {
            self.sessions.checkpoint(&self.client_id, self.ticket.conn, &self.state, self.session_expiry);
        }
    }

    /// After CONNACK: resend inflight (DUP), re-subscribe a resumed session
    /// from its positions, then flush.
    pub(crate) async fn resume_and_flush(&mut self) -> Result<(), Stop> {
        if let Some(since) = self.resume_since {
            for t in self.state.resend() {
                self.write_transmit(t, None);
            }
            let subs = self.state.subs.clone();
            for sub in subs {
                let req = proto::Subscribe {
                    filter: sub.filter.clone(),
                    positions: self.state.positions_for(&sub.filter),
                    rewind: None,
                    presence: false,
                    retained: false,
                    no_local: sub.no_local,
                    // Channels first published while the client was away.
                    since_ms: since.max(1),
                    ..Default::default()
                };
                match self.core.subscribe(self.handle_id(), req).await {
                    Ok(outcome) => {
                        for item in outcome.replay {
                            self.queue(item, false)?;
                        }
                    }
                    Err(e) => warn!(filter = %sub.filter, error = %e, "could not restore a subscription"),
                }
            }
        }
        self.checkpoint();
        self.write_batch().await
    }

    pub(crate) async fn run(&mut self) -> Stop {
        loop {
            let outbox = self.session.as_ref().map(|s| Arc::clone(&s.handle.outbox));
            let event = tokio::select! {
                biased;
                changed = self.shutdown.changed() => match changed {
                    Ok(()) if !*self.shutdown.borrow_and_update() => continue,
                    _ => Event::Shutdown,
                },
                kick = &mut self.ticket.kick => Event::Kick(kick),
                () = &mut self.timer, if self.keepalive.deadline().is_some() => Event::Timer,
                n = self.arrival.stamped(self.io.read_more()) => Event::Read(n),
                () = async { match &outbox { Some(o) => o.ready().await, None => std::future::pending().await } } => Event::Outbox,
            };
            let handled = match event {
                Event::Shutdown => {
                    debug!("gateway shutting down");
                    Err(Stop::Disconnect(reason::SHUTTING_DOWN))
                }
                Event::Kick(Ok(handover)) => {
                    info!("session taken over by a new connection");
                    Err(Stop::TakenOver(handover))
                }
                Event::Kick(Err(_)) => {
                    // The store dropped our slot without a handover: only a
                    // takeover does that, so the session is someone else's.
                    Err(Stop::Disconnect(reason::SESSION_TAKEN_OVER))
                }
                Event::Timer => self.on_timer(),
                Event::Read(Ok(0)) => {
                    debug!("peer closed the connection");
                    Err(Stop::Gone)
                }
                Event::Read(Err(e)) => {
                    debug!(error = %e, "read failed");
                    Err(Stop::Gone)
                }
                // Boxed: packet handling is the loop's largest state, and an
                // idle connection waits in the select above, not here.
                Event::Read(Ok(_)) => {
                    self.arrival.read_done();
                    Box::pin(self.on_bytes()).await
                }
                Event::Outbox => Ok(()),
            };
            if let Err(stop) = handled {
                return stop;
            }
            self.checkpoint();
            if let Err(stop) = self.write_batch().await {
                return stop;
            }
        }
    }

    /// Packets the client sent right behind its CONNECT (a SUBSCRIBE
    /// pipelined without waiting for the CONNACK) arrived with it: handle
    /// them now rather than at the next read.
    pub(crate) async fn pipelined(&mut self) -> Result<(), Stop> {
        if self.io.rbuf.is_empty() {
            return Ok(());
        }
        self.arrival.read_done();
        self.on_bytes().await?;
        self.checkpoint();
        self.write_batch().await
    }

    pub(crate) fn on_timer(&mut self) -> Result<(), Stop> {
        let now = Instant::now();
        if self.keepalive.expired(now) {
            info!("keep alive timeout");
            protocol_error("keepalive_timeout");
            return Err(Stop::Disconnect(reason::KEEP_ALIVE_TIMEOUT));
        }
        // Re-armed from the last packet only when it fires, so a busy
        // connection costs no timer resets.
        if let Some(d) = self.keepalive.deadline() {
            self.timer.as_mut().reset(d);
        }
        Ok(())
    }

    /// Ends the connection: DISCONNECT (MQTT 5), the will, the session store,
    /// the core session; then, when the server closed (not the client, not
    /// a dead transport), a lingering close, so that what was written last
    /// reaches a client that is still sending.
    pub(crate) async fn finish(mut self, stop: Stop) {
        let mut linger = matches!(stop, Stop::Disconnect(_) | Stop::TakenOver(_));
        let (end, handover) = match stop {
            Stop::ClientDisconnect(r) => {
                if let Some(s) = &mut self.session {
                    s.end = CloseKind::Clean;
                }
                let end =
                    if r == reason::DISCONNECT_WITH_WILL { End::DisconnectWithWill } else { End::CleanDisconnect };
                (end, None)
            }
            Stop::Disconnect(r) => {
                if self.v5() {
                    self.push(Outgoing::Disconnect(r));
                }
                linger &= self.io.flush().await.is_ok();
                (End::Abrupt, None)
            }
            Stop::TakenOver(h) => {
                if self.v5() {
                    self.push(Outgoing::Disconnect(reason::SESSION_TAKEN_OVER));
                }
                linger &= self.io.flush().await.is_ok();
                (End::TakenOver, Some(h))
            }
            Stop::Gone => (End::Abrupt, None),
        };
        self.io.shutdown().await;
        self.publish_will(end).await;

        let now = Instant::now();
        let persistent = !self.session_expiry.is_zero();
        let stored = persistent.then(|| {
            let mut state = std::mem::take(&mut self.state);
            state.detach();
            Box::new(StoredSession { state, disconnected_ms: now_ms() })
        });
        match handover {
            Some(h) => {
                let _ = h.send(stored);
            }
            None => self.sessions.release(&self.client_id, self.ticket.conn, stored, self.session_expiry, now),
        }
        debug!(?end, persistent, "connection ended");
        // The core session (if still here) ends now, not after the linger:
        // core.close(.., clean or abrupt).
        drop(self.session.take());
        if linger {
            self.io.close_lingering().await;
        }
    }

    pub(crate) async fn publish_will(&mut self, end: End) {
        let Some(will) = self.will.take().map(|w| *w) else { return };
        let expiry = self.session_expiry.as_secs().min(u64::from(u32::MAX)) as u32;
        match session::will_action(end, will.delay, expiry) {
            session::WillAction::Discard => debug!("will discarded"),
            session::WillAction::Publish => {
                let id = self.handle_id();
                match self.core.publish(id, will.publish).await {
                    Ok(_) => debug!("will published"),
                    Err(e) => info!(error = %e, "will refused by the core"),
                }
            }
            session::WillAction::After(delay) => {
                let Some(delayed) = self.sessions.delay_will(&self.client_id) else {
                    // The node holds its maximum of delayed wills: this one
                    // goes now, as if its delay were 0.
                    info!(
                        limit = "delayed_wills",
                        "the node holds its maximum of delayed wills; will published at once"
                    );
                    metrics::counter!("switchboard_limit_exceeded_total", "limit" => "delayed_wills", "protocol" => "mqtt")
                        .increment(1);
                    let id = self.handle_id();
                    if let Err(e) = self.core.publish(id, will.publish).await {
                        info!(error = %e, "will refused by the core");
                    }
                    return;
                };
                // The core session stays open until the will is decided: it
                // is the publisher. A reconnect (or a newer will) cancels the
                // wait at once, so a client reconnecting in a loop holds one
                // waiting will, not one per connection.
                let Some(session) = self.session.take() else { return };
                let sessions = Arc::clone(&self.sessions);
                let client_id = self.client_id.clone();
                debug!(?delay, "will delayed");
                tokio::spawn(
                    async move {
                        let token = delayed.token;
                        tokio::select! {
                            () = tokio::time::sleep(delay) => {}
                            () = delayed.cancelled.notified() => {}
                        }
                        if sessions.take_will(&client_id, token) {
                            match session.core.publish(session.handle.id, will.publish).await {
                                Ok(_) => debug!("delayed will published"),
                                Err(e) => info!(error = %e, "delayed will refused by the core"),
                            }
                        } else {
                            debug!("delayed will cancelled by a reconnect");
                        }
                        drop(session);
                    }
                    .in_current_span(),
                );
            }
        }
    }
}
