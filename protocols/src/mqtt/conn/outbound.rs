//! Deliveries to the client: the outbox drained into the session's queue,
//! what the inflight window allows turned into PUBLISH packets (topic
//! aliases, subscription ids, the client's maximum packet size, gaps as a
//! user property), presence events as JSON, and one write per batch.

use super::*;
use session::Verdict;

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Conn<S> {
    /// Queues one outbox or replay item for this client. `retained_replay`
    /// marks a subscribe replay that asked for retained values: its retained
    /// envelope goes out with RETAIN=1 (MQTT 3.1.1 §3.3.1.3).
    pub(crate) fn queue(&mut self, item: Outbound, retained_replay: bool) -> Result<(), Stop> {
        let d = match item {
            Outbound::Gap(g) => {
                // MQTT 5: the channel's next message carries the reason as a
                // user property. MQTT 3.1.1 has no way to say it: logged.
                if self.v5() {
                    debug!(channel = %g.channel, reason = %g.reason, "history gap; told with the next message");
                } else {
                    info!(channel = %g.channel, reason = %g.reason, "history gap; MQTT 3.1.1 cannot signal it");
                }
                self.state.handle_gap(&g.channel, &g.reason, g.to.as_ref());
                return Ok(());
            }
            Outbound::Message(d) => d,
        };
        let env = &d.envelope;
        let Some(route) = session::route(&self.state.subs, &env.channel) else {
            debug!(channel = %env.channel, "delivery matches no subscription (unsubscribed)");
            return Ok(());
        };
        let is_retained_value = retained_replay && env.retain;
        if !is_retained_value && self.state.is_duplicate(env) {
            return Ok(());
        }
        let qos = session::effective_qos(env.qos, route.qos);
        let retain = is_retained_value || (route.retain_as_published && env.retain);
        let delivery = if env.kind != proto::Kind::Message as i32 { presence_delivery(&d) } else { d };
        let msg = Queued { delivery, qos, retain, sub_ids: route.ids, gap: None };
        if let Err(e) = self.state.handle_delivery(msg, self.cfg.max_queued_bytes) {
            info!(error = %e, "slow consumer: outbound queue full");
            return Err(Stop::Disconnect(reason::QUOTA_EXCEEDED));
        }
        Ok(())
    }

    /// Writes one transmit. `alias` is the topic alias decided when the
    /// PUBLISH was sized ([`fit`]); `None` (a resend) decides it here.
    pub(crate) fn write_transmit(&mut self, t: Transmit, alias: Option<AliasUse>) {
        match t {
            Transmit::PubRel(pkid) => self.push(Outgoing::PubRel(pkid)),
            Transmit::Publish { pkid, dup, msg } => {
                let alias = match alias {
                    Some(a) => a,
                    None if self.v5() => self.out_aliases.assign(&msg.delivery.envelope.channel),
                    None => AliasUse::None,
                };
                let p = publish_packet(self.version, pkid, dup, &msg, now_ms(), alias);
                self.push(Outgoing::Publish(p));
                self.io.delivered += 1;
            }
        }
    }

    /// Drains the outbox, moves what the window allows into PUBLISH packets
    /// after the pending acks, and writes everything once.
    pub(crate) async fn write_batch(&mut self) -> Result<(), Stop> {
        let closed = match &self.session {
            Some(s) => s.handle.outbox.drain(&mut self.drained).err(),
            None => None,
        };
        let drained = std::mem::take(&mut self.drained);
        let mut result = Ok(());
        let mut items = drained.into_iter();
        for item in items.by_ref() {
            if let Err(stop) = self.queue(item, false) {
                result = Err(stop);
                break;
            }
        }
        let mut reuse: Vec<Outbound> = items.collect();
        reuse.clear();
        self.drained = reuse;
        if self.drained.capacity() > 64 {
            self.drained.shrink_to(64);
        }
        result?;
        let now = now_ms();
        let version = self.version;
        let max = self.client_max_packet;
        let aliases = &mut self.out_aliases;
        // The alias each sent PUBLISH was sized with, in transmit order.
        let mut chosen: Vec<AliasUse> = Vec::new();
        let transmits = self.state.poll_transmit(self.window, |q| {
            let env = &q.delivery.envelope;
            if env.message_expiry > 0 && now >= (env.timestamp.max(0) as u64) + u64::from(env.message_expiry) * 1000 {
                debug!(channel = %env.channel, serial = env.serial, "message expired before delivery");
                return Verdict::Skip;
            }
            match fit(version, max, now, q, aliases) {
                Some(alias) => {
                    chosen.push(alias);
                    Verdict::Send
                }
                None => {
                    debug!(channel = %env.channel, max, "over the client's maximum packet size; discarded");
                    Verdict::Discard("too_large")
                }
            }
        });
        let acknowledged = transmits.iter().any(|t| matches!(t, Transmit::Publish { msg, .. } if msg.qos > 0));
        for (t, alias) in transmits.into_iter().zip(chosen) {
            self.write_transmit(t, Some(alias));
        }
        // A persistent session records what it sends at QoS 1/2 before it
        // goes out (see SessionStore::before_send).
        if acknowledged && !self.session_expiry.is_zero() && self.state.take_changed() {
            let recorded =
                self.sessions.before_send(&self.client_id, self.ticket.conn, &self.state, self.session_expiry);
            if let Some(recorded) = recorded {
                let _ = recorded.await;
            }
        }
        self.io.flush().await?;
        match closed {
            Some(r) => {
                info!(code = r.code, reason = r.reason, "the core closed the session");
                Err(Stop::Disconnect(close_reason(r)))
            }
            None => Ok(()),
        }
    }
}

/// The PUBLISH for a queued message, its topic named as `alias` says; MQTT 5
/// properties on a v5 connection only. Pure: the caller decides the alias
/// (and records it), so a packet can be sized before it is sent.
pub(crate) fn publish_packet(
    version: Version,
    pkid: u16,
    dup: bool,
    msg: &Queued,
    now_ms: u64,
    alias: AliasUse,
) -> codec::Publish {
    let env = &msg.delivery.envelope;
    let mut props = codec::PublishProps::default();
    let mut topic = msg.delivery.channel_bytes().clone();
    if version == Version::V5 {
        props.payload_utf8 = env.payload_utf8;
        if env.message_expiry > 0 {
            let elapsed = now_ms.saturating_sub(env.timestamp.max(0) as u64) / 1000;
            props.message_expiry = Some(env.message_expiry.saturating_sub(elapsed as u32).max(1));
        }
        props.response_topic = (!env.response_topic.is_empty()).then(|| env.response_topic.clone());
        props.correlation_data = (!env.correlation_data.is_empty()).then(|| env.correlation_data.clone());
        props.content_type = (!env.content_type.is_empty()).then(|| env.content_type.clone());
        props.user_properties =
            env.headers.iter().filter(|(k, _)| *k != GAP_PROPERTY).map(|(k, v)| (k.clone(), v.clone())).collect();
        if let Some(reason) = &msg.gap {
            props.user_properties.push((GAP_PROPERTY.to_string(), reason.clone()));
        }
        props.subscription_ids = msg.sub_ids.clone();
        match alias {
            AliasUse::None => {}
            AliasUse::New(a) => props.topic_alias = Some(a),
            AliasUse::Existing(a) => {
                props.topic_alias = Some(a);
                topic = Bytes::new();
            }
        }
    }
    codec::Publish { dup, qos: msg.qos, retain: msg.retain, topic, pkid, payload: env.payload.clone(), props }
}

/// How a message goes out within the client's Maximum Packet Size `max`
/// (MQTT 5 §3.1.2.11.4): the topic alias to send it with (recorded in
/// `aliases` when new), or `None` when even its smallest form is larger,
/// so it must be discarded. The size is the exact encoded size of the
/// PUBLISH that would be written: properties, alias and packet id included.
pub(crate) fn fit(
    version: Version,
    max: usize,
    now_ms: u64,
    msg: &Queued,
    aliases: &mut OutboundAliases,
) -> Option<AliasUse> {
    let topic = &msg.delivery.envelope.channel;
    if version != Version::V5 {
        // 3.1.1 clients announce no maximum.
        return Some(AliasUse::None);
    }
    let alias = aliases.peek(topic);
    // The packet id's value does not change the size; 1 sizes one in.
    let size = |alias| codec::publish_size(version, &publish_packet(version, 1, false, msg, now_ms, alias));
    let alias = if max == usize::MAX || size(alias) <= max {
        alias
    } else if matches!(alias, AliasUse::New(_)) && size(AliasUse::None) <= max {
        // A new alias adds its property; the topic alone still fits.
        AliasUse::None
    } else {
        return None;
    };
    if let AliasUse::New(_) = alias {
        aliases.assign(topic);
    }
    Some(alias)
}

/// Presence events on `$presence/...` as JSON for MQTT subscribers.
#[derive(serde::Serialize)]
pub(crate) struct PresenceJson<'a> {
    pub(crate) action: &'static str,
    pub(crate) client_id: &'a str,
    pub(crate) connection_id: &'a str,
    pub(crate) timestamp: i64,
    #[serde(flatten)]
    pub(crate) payload: proto::json::JsonPayload<'a>,
}

/// A presence envelope re-encoded with a JSON payload (the data itself is
/// inlined as `data`, `text` or `data_b64`).
pub(crate) fn presence_delivery(d: &Arc<Delivery>) -> Arc<Delivery> {
    let env = &d.envelope;
    let action = match proto::Kind::try_from(env.kind) {
        Ok(proto::Kind::PresenceEnter) => "enter",
        Ok(proto::Kind::PresenceLeave) => "leave",
        Ok(proto::Kind::PresenceUpdate) => "update",
        _ => return Arc::clone(d),
    };
    let publisher = env.publisher.clone().unwrap_or_default();
    let json = PresenceJson {
        action,
        client_id: &publisher.client_id,
        connection_id: &publisher.connection_id,
        timestamp: env.timestamp,
        payload: proto::json::JsonPayload::new(&env.payload),
    };
    let payload = serde_json::to_vec(&json).unwrap_or_default();
    Delivery::new(proto::Envelope {
        payload: Bytes::from(payload),
        content_type: "application/json".into(),
        payload_utf8: true,
        ..env.clone()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A message with every property that changes the PUBLISH's size.
    fn message(gap: Option<&str>) -> Queued {
        let env = proto::Envelope {
            channel: "sensors/7/temp".into(),
            payload: Bytes::from_static(b"21.5"),
            content_type: "text/plain".into(),
            payload_utf8: true,
            headers: [("trace".to_string(), "t-1".to_string())].into_iter().collect(),
            correlation_data: Bytes::from_static(b"c"),
            ..Default::default()
        };
        Queued { delivery: Delivery::new(env), qos: 1, retain: false, sub_ids: vec![200], gap: gap.map(str::to_string) }
    }

    fn encoded_len(msg: &Queued, alias: AliasUse) -> usize {
        let mut buf = BytesMut::new();
        let p = publish_packet(Version::V5, 77, false, msg, 0, alias);
        codec::encode(Version::V5, &Outgoing::Publish(p), &mut buf).unwrap();
        buf.len()
    }

    /// MQTT 5 §3.1.2.11.4 at the exact boundary: a PUBLISH of exactly the
    /// maximum goes out, one byte less discards it.
    #[test]
    fn fits_exactly_at_the_maximum_packet_size() {
        for gap in [None, Some("epoch_changed")] {
            let msg = message(gap);
            let len = encoded_len(&msg, AliasUse::None);
            let mut aliases = OutboundAliases::new(0);
            assert_eq!(fit(Version::V5, len, 0, &msg, &mut aliases), Some(AliasUse::None), "{gap:?}");
            assert_eq!(fit(Version::V5, len - 1, 0, &msg, &mut aliases), None, "{gap:?}");
        }
    }

    /// A new topic alias adds three bytes: when only the alias makes the
    /// packet too large, it goes without one (and no alias is recorded);
    /// an existing alias drops the topic and may make it fit.
    #[test]
    fn topic_aliases_are_part_of_the_size() {
        let msg = message(None);
        let plain = encoded_len(&msg, AliasUse::None);
        assert_eq!(encoded_len(&msg, AliasUse::New(1)), plain + 3);
        let mut aliases = OutboundAliases::new(4);
        assert_eq!(fit(Version::V5, plain + 2, 0, &msg, &mut aliases), Some(AliasUse::None));
        assert_eq!(aliases.peek("sensors/7/temp"), AliasUse::New(1), "nothing recorded");
        assert_eq!(fit(Version::V5, plain + 3, 0, &msg, &mut aliases), Some(AliasUse::New(1)));
        let short = encoded_len(&msg, AliasUse::Existing(1));
        assert!(short < plain, "{short} {plain}");
        assert_eq!(fit(Version::V5, short, 0, &msg, &mut aliases), Some(AliasUse::Existing(1)));
        assert_eq!(fit(Version::V5, short - 1, 0, &msg, &mut aliases), None);
    }

    #[test]
    fn gaps_are_a_user_property_publishers_cannot_forge() {
        let mut msg = message(Some("trimmed"));
        let env = proto::Envelope {
            headers: [(GAP_PROPERTY.to_string(), "forged".to_string())].into_iter().collect(),
            ..msg.delivery.envelope.clone()
        };
        msg.delivery = Delivery::new(env);
        let p = publish_packet(Version::V5, 1, false, &msg, 0, AliasUse::None);
        assert_eq!(p.props.user_properties, [(GAP_PROPERTY.to_string(), "trimmed".to_string())]);
        msg.gap = None;
        let p = publish_packet(Version::V5, 1, false, &msg, 0, AliasUse::None);
        assert!(p.props.user_properties.is_empty());
    }
}
