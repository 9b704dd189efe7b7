//! Packets from the client: PUBLISH (QoS 0/1/2, presence topics), SUBSCRIBE
//! and UNSUBSCRIBE, AUTH, the acknowledgements of our deliveries, PING and
//! DISCONNECT; each becomes a core call or a session-state change.

use super::*;

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Conn<S> {
    /// Decodes and handles every complete packet in the read buffer.
    pub(crate) async fn on_bytes(&mut self) -> Result<(), Stop> {
        self.keepalive.handle_packet(Instant::now());
        loop {
            let packet = match codec::decode(&mut self.io.rbuf, Some(self.version), self.cfg.max_packet_size) {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(CodecError::TooLarge { size, max }) => {
                    info!(size, max, "packet too large");
                    protocol_error("too_large");
                    return Err(Stop::Disconnect(reason::PACKET_TOO_LARGE));
                }
                Err(e) => {
                    info!(error = %e, "malformed packet");
                    protocol_error("malformed");
                    return Err(Stop::Disconnect(reason::MALFORMED));
                }
            };
            self.on_packet(packet).await?;
        }
        if self.io.rbuf.is_empty() && self.io.rbuf.capacity() > KEEP_BUFFER {
            self.io.rbuf = BytesMut::with_capacity(self.cfg.read_buffer_size);
        }
        Ok(())
    }

    pub(crate) async fn on_packet(&mut self, packet: Packet) -> Result<(), Stop> {
        match packet {
            Packet::Publish(p) => self.on_publish(p).await,
            Packet::PubAck { pkid } => {
                if !self.state.handle_puback(pkid) {
                    debug!(pkid, "PUBACK for an unknown packet id");
                }
                Ok(())
            }
            Packet::PubRec { pkid, failed } => {
                if self.state.handle_pubrec(pkid, failed) {
                    self.push(Outgoing::PubRel(pkid));
                }
                Ok(())
            }
            Packet::PubRel { pkid } => {
                if !self.state.handle_pubrel(pkid) {
                    debug!(pkid, "PUBREL for an unknown packet id");
                }
                self.push(Outgoing::PubComp(pkid));
                Ok(())
            }
            Packet::PubComp { pkid } => {
                if !self.state.handle_pubcomp(pkid) {
                    debug!(pkid, "PUBCOMP for an unknown packet id");
                }
                Ok(())
            }
            Packet::Subscribe(s) => self.on_subscribe(s).await,
            Packet::Unsubscribe { pkid, filters } => {
                let mut reasons = Vec::with_capacity(filters.len());
                for f in filters {
                    let had = self.state.unsubscribe(&f);
                    if let Err(e) = self.core.unsubscribe(self.handle_id(), &f).await {
                        debug!(filter = %f, error = %e, "core unsubscribe refused");
                    }
                    reasons.push(if had { reason::SUCCESS } else { reason::NO_SUBSCRIPTION_EXISTED });
                }
                self.push(Outgoing::UnsubAck(pkid, reasons));
                Ok(())
            }
            Packet::PingReq => {
                self.push(Outgoing::PingResp);
                Ok(())
            }
            Packet::Disconnect { reason: r, session_expiry } => {
                if let Some(secs) = session_expiry {
                    if self.v5_expiry_was_zero && secs > 0 {
                        info!("DISCONNECT raised a zero session expiry");
                        protocol_error("protocol_error");
                        return Err(Stop::Disconnect(reason::PROTOCOL_ERROR));
                    }
                    self.session_expiry = Duration::from_secs(secs.into()).min(self.sessions.expiry_max());
                }
                debug!(reason = r, "client DISCONNECT");
                Err(Stop::ClientDisconnect(r))
            }
            Packet::Auth(a) => self.on_auth(a).await,
            Packet::Connect(_) | Packet::Unexpected(_) => {
                info!(packet = ?packet, "protocol error: unexpected packet");
                protocol_error("protocol_error");
                Err(Stop::Disconnect(reason::PROTOCOL_ERROR))
            }
        }
    }

    /// AUTH: re-authentication with a new token (see the module docs).
    pub(crate) async fn on_auth(&mut self, a: codec::Auth) -> Result<(), Stop> {
        let protocol_violation = |why: &str| {
            info!(why, "protocol error in AUTH");
            protocol_error("protocol_error");
            Err(Stop::Disconnect(reason::PROTOCOL_ERROR))
        };
        let Some(method) = self.auth_method.clone() else {
            return protocol_violation("AUTH after a CONNECT without an Authentication Method");
        };
        if a.reason != reason::REAUTHENTICATE {
            // 0x00 is the server's answer; 0x18 continues an exchange the
            // server started, and this server never starts one.
            return protocol_violation("AUTH reason other than re-authenticate");
        }
        let Some(asked) = a.method else {
            return protocol_violation("AUTH without an Authentication Method");
        };
        if asked != method {
            // MQTT 5 §4.12.1-1: the same method as at CONNECT.
            info!(method = %asked, "re-authentication with another method");
            protocol_error("bad_auth_method");
            return Err(Stop::Disconnect(reason::BAD_AUTHENTICATION_METHOD));
        }
        let token = a.data.map(|d| String::from_utf8_lossy(&d).into_owned()).unwrap_or_default();
        match self.core.refresh(self.handle_id(), &token).await {
            Ok(()) => {
                debug!("re-authenticated");
                self.push(Outgoing::Auth { reason: reason::SUCCESS, method });
                Ok(())
            }
            Err(e) => {
                // MQTT 5 §4.12.1-2: a failed re-authentication ends the
                // connection.
                info!(code = e.code.slug(), error = %e, "re-authentication refused");
                Err(Stop::Disconnect(reason::NOT_AUTHORIZED))
            }
        }
    }

    /// Refuses a bad PUBLISH topic: DISCONNECT 0x90 (3.1.1: close).
    pub(crate) fn bad_topic(&self, why: &str) -> Stop {
        info!(why, "invalid PUBLISH topic");
        protocol_error("topic_invalid");
        Stop::Disconnect(reason::TOPIC_NAME_INVALID)
    }

    pub(crate) fn ack(&mut self, qos: u8, pkid: u16, code: u8) {
        match qos {
            1 => self.push(Outgoing::PubAck(pkid, code)),
            2 => self.push(Outgoing::PubRec(pkid, code)),
            _ => {}
        }
    }

    pub(crate) async fn on_publish(&mut self, p: codec::Publish) -> Result<(), Stop> {
        let Ok(topic) = std::str::from_utf8(&p.topic) else {
            return Err(self.bad_topic("topic is not UTF-8"));
        };
        let topic = match self.in_aliases.resolve(topic, p.props.topic_alias) {
            Ok(t) => t,
            Err(e) => {
                info!(error = %e, "invalid topic alias");
                protocol_error("alias_invalid");
                return Err(Stop::Disconnect(reason::TOPIC_ALIAS_INVALID));
            }
        };
        if let Some(why) = topic_error(&topic) {
            return Err(self.bad_topic(why));
        }
        if p.qos == 2 {
            if !self.state.handle_inbound_qos2(p.pkid) {
                // A retransmission before PUBREL: acknowledge, do not publish.
                debug!(pkid = p.pkid, "duplicate QoS 2 PUBLISH");
                self.push(Outgoing::PubRec(p.pkid, reason::SUCCESS));
                return Ok(());
            }
            if self.state.inbound_qos2_len() > usize::from(self.cfg.receive_maximum) {
                info!(max = self.cfg.receive_maximum, "receive maximum exceeded");
                protocol_error("receive_maximum");
                return Err(Stop::Disconnect(reason::RECEIVE_MAXIMUM_EXCEEDED));
            }
        }
        let result = if p.props.payload_utf8 && std::str::from_utf8(&p.payload).is_err() {
            // MQTT 5 §3.3.2.3.2: the indicator promises UTF-8.
            Err(reason::PAYLOAD_FORMAT_INVALID)
        } else if let Some(channel) = presence_target(&topic) {
            self.presence(channel.to_string(), p.payload.clone()).await.map_err(|e| publish_reason(e.code))
        } else {
            let req = publish_request(topic, &p);
            match self.core.publish(self.handle_id(), req).await {
                Ok(_) => Ok(()),
                Err(e) => {
                    debug!(code = e.code.slug(), error = %e, "publish refused");
                    Err(publish_reason(e.code))
                }
            }
        };
        match result {
            Ok(()) => self.ack(p.qos, p.pkid, reason::SUCCESS),
            Err(code) => {
                if p.qos == 2 {
                    self.state.forget_inbound_qos2(p.pkid);
                }
                if !self.v5() {
                    // MQTT 3.1.1 has no negative ack: closing is the only
                    // way to tell the client (§3.3.5).
                    info!(code, "publish refused; closing (3.1.1 has no negative ack)");
                    return Err(Stop::Disconnect(code));
                }
                if p.qos == 0 {
                    info!(code, "QoS 0 publish refused; dropped");
                }
                self.ack(p.qos, p.pkid, code);
            }
        }
        Ok(())
    }

    /// `$presence/<channel>`: a payload enters (or updates), empty leaves.
    pub(crate) async fn presence(&mut self, channel: String, data: Bytes) -> Result<(), CoreError> {
        let id = self.handle_id();
        if data.is_empty() {
            self.entered.remove(&channel);
            return self.core.presence_leave(id, &channel).await;
        }
        let update = self.entered.contains(&channel);
        self.core.presence_enter(id, &channel, data, update).await?;
        self.entered.insert(channel);
        Ok(())
    }

    pub(crate) async fn on_subscribe(&mut self, s: codec::Subscribe) -> Result<(), Stop> {
        let rewind = s.user_properties.iter().rev().find(|(k, _)| k == "rewind").map(|(_, v)| v.clone());
        let rewind = match rewind.map(|v| crate::stream::parse_rewind(&v)) {
            Some(Ok(r)) => Some(r),
            Some(Err(e)) => {
                debug!(error = %e, "ignoring an invalid rewind property");
                None
            }
            None => None,
        };
        let mut codes = Vec::with_capacity(s.filters.len());
        let mut replays = Vec::new();
        for f in s.filters {
            if !valid_filter(&f.filter) || (f.no_local && f.filter.starts_with("$share/")) {
                // MQTT 5 §3.8.3.1: no local on a shared subscription is a
                // protocol error; answering 0x8F is kinder and still clear.
                info!(filter = %f.filter, "invalid topic filter");
                protocol_error("topic_invalid");
                codes.push(if self.v5() { reason::TOPIC_FILTER_INVALID } else { 0x80 });
                continue;
            }
            let shared = f.filter.starts_with("$share/");
            let is_new = !self.state.subs.iter().any(|x| x.filter == f.filter);
            let retained = !shared
                && match f.retain_handling {
                    0 => true,
                    1 => is_new,
                    _ => false,
                };
            let req = proto::Subscribe {
                filter: f.filter.clone(),
                positions: Default::default(),
                rewind,
                presence: false,
                retained,
                no_local: f.no_local,
                since_ms: 0,
                ..Default::default()
            };
            match self.core.subscribe_arrived(self.handle_id(), req, self.arrival.arrived()).await {
                Ok(outcome) => {
                    let qos = f.qos.min(2);
                    self.state.subscribe(Subscription {
                        filter: f.filter,
                        qos,
                        no_local: f.no_local,
                        retain_as_published: f.retain_as_published,
                        id: s.id,
                    });
                    codes.push(qos);
                    replays.push((outcome.replay, retained));
                }
                Err(e) => {
                    info!(filter = %f.filter, code = e.code.slug(), error = %e, "subscribe refused");
                    codes.push(suback_code(self.version, e.code));
                }
            }
        }
        // SUBACK first, then the replay (retained values, rewind), then live.
        self.push(Outgoing::SubAck(s.pkid, codes));
        for (items, retained) in replays {
            for item in items {
                self.queue(item, retained)?;
            }
        }
        Ok(())
    }
}
