//! Deliveries to the client: the outbox drained into the session's queue,
//! what the inflight window allows turned into PUBLISH packets (topic
//! aliases, subscription ids, the client's maximum packet size), presence
//! events as JSON, and one write per batch.

use super::*;

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Conn<S> {
    /// Queues one outbox or replay item for this client. `retained_replay`
    /// marks a subscribe replay that asked for retained values: its retained
    /// envelope goes out with RETAIN=1 (MQTT 3.1.1 §3.3.1.3).
    pub(crate) fn queue(&mut self, item: Outbound, retained_replay: bool) -> Result<(), Stop> {
        let d = match item {
            Outbound::Gap(g) => {
                // MQTT has no way to say "you missed messages": log it and
                // carry on from where the channel is now.
                info!(channel = %g.channel, reason = %g.reason, "history gap; MQTT cannot signal it to the client");
                if let Some(to) = g.to {
                    self.state.advance(&g.channel, &to.epoch, to.serial);
                }
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
        let msg = Queued { delivery, qos, retain, sub_ids: route.ids };
        if let Err(e) = self.state.handle_delivery(msg, self.cfg.max_queued_bytes) {
            info!(error = %e, "slow consumer: outbound queue full");
            return Err(Stop::Disconnect(reason::QUOTA_EXCEEDED));
        }
        Ok(())
    }

    /// Builds the PUBLISH for a queued message.
    pub(crate) fn build_publish(
        &mut self,
        pkid: u16,
        dup: bool,
        msg: &Queued,
        now_ms: u64,
        assign_alias: bool,
    ) -> codec::Publish {
        let env = &msg.delivery.envelope;
        let mut props = codec::PublishProps::default();
        let mut topic = msg.delivery.channel_bytes().clone();
        if self.v5() {
            props.payload_utf8 = env.payload_utf8;
            if env.message_expiry > 0 {
                let elapsed = now_ms.saturating_sub(env.timestamp.max(0) as u64) / 1000;
                props.message_expiry = Some(env.message_expiry.saturating_sub(elapsed as u32).max(1));
            }
            props.response_topic = (!env.response_topic.is_empty()).then(|| env.response_topic.clone());
            props.correlation_data = (!env.correlation_data.is_empty()).then(|| env.correlation_data.clone());
            props.content_type = (!env.content_type.is_empty()).then(|| env.content_type.clone());
            props.user_properties = env.headers.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            props.subscription_ids = msg.sub_ids.clone();
            if assign_alias {
                match self.out_aliases.assign(&env.channel) {
                    AliasUse::None => {}
                    AliasUse::New(a) => props.topic_alias = Some(a),
                    AliasUse::Existing(a) => {
                        props.topic_alias = Some(a);
                        topic = Bytes::new();
                    }
                }
            }
        }
        codec::Publish { dup, qos: msg.qos, retain: msg.retain, topic, pkid, payload: env.payload.clone(), props }
    }

    pub(crate) fn write_transmit(&mut self, t: Transmit) {
        match t {
            Transmit::PubRel(pkid) => self.push(Outgoing::PubRel(pkid)),
            Transmit::Publish { pkid, dup, msg } => {
                let p = self.build_publish(pkid, dup, &msg, now_ms(), true);
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
        let transmits = self.state.poll_transmit(self.window, |q| {
            let env = &q.delivery.envelope;
            if env.message_expiry > 0 && now >= (env.timestamp.max(0) as u64) + u64::from(env.message_expiry) * 1000 {
                debug!(channel = %env.channel, serial = env.serial, "message expired before delivery");
                return false;
            }
            if max != usize::MAX {
                let probe = codec::Publish {
                    qos: q.qos,
                    retain: q.retain,
                    topic: q.delivery.channel_bytes().clone(),
                    pkid: 1,
                    payload: env.payload.clone(),
                    ..Default::default()
                };
                // Properties add a little; headers are counted generously.
                let extra: usize = env.headers.iter().map(|(k, v)| k.len() + v.len() + 5).sum::<usize>()
                    + env.content_type.len()
                    + env.response_topic.len()
                    + env.correlation_data.len()
                    + 32;
                if codec::publish_size(version, &probe) + extra > max {
                    debug!(channel = %env.channel, max, "message larger than the client's maximum packet size; skipped");
                    return false;
                }
            }
            true
        });
        for t in transmits {
            self.write_transmit(t);
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
