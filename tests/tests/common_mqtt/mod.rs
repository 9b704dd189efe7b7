//! Helpers shared by the MQTT integration tests: a rumqttc 3.1.1 or 5
//! client whose event loop runs in a task that forwards its events (and
//! stops at the first error instead of reconnecting, so a close the test
//! did not ask for is seen), and a raw MQTT socket with hand-made packets
//! for what no well-behaved client would send.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use bytes::{Buf, Bytes, BytesMut};
use rumqttc::v5::mqttbytes::v5 as m5;
use switchboard_tests::WAIT;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// MQTT protocol version of a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ver {
    /// MQTT 3.1.1 (protocol level 4).
    V4,
    /// MQTT 5.0 (protocol level 5).
    V5,
}

impl Ver {
    /// The CONNECT protocol level.
    pub fn level(self) -> u8 {
        match self {
            Ver::V4 => 4,
            Ver::V5 => 5,
        }
    }
}

/// Both versions, for tests that must hold on each.
pub const VERSIONS: [Ver; 2] = [Ver::V4, Ver::V5];

/// A PUBLISH received by a client.
#[derive(Debug, Clone)]
pub struct Msg {
    /// Topic, with a topic alias resolved.
    pub topic: String,
    /// Topic as it was on the wire (empty when the server used an alias).
    pub wire_topic: Bytes,
    /// Payload.
    pub payload: Bytes,
    /// QoS of the PUBLISH.
    pub qos: u8,
    /// RETAIN flag.
    pub retain: bool,
    /// MQTT 5 properties.
    pub props: Option<m5::PublishProperties>,
}

impl Msg {
    /// MQTT 5 user properties, in order.
    pub fn user_properties(&self) -> Vec<(String, String)> {
        self.props.as_ref().map(|p| p.user_properties.clone()).unwrap_or_default()
    }

    /// MQTT 5 topic alias.
    pub fn alias(&self) -> Option<u16> {
        self.props.as_ref().and_then(|p| p.topic_alias)
    }

    /// The payload as text (lossy), for messages.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
}

/// What the event loop reported, reduced to what the tests look at.
#[derive(Debug)]
enum Ev {
    ConnAck {
        session_present: bool,
        props: Option<m5::ConnAckProperties>,
    },
    SubAck(Vec<u8>),
    PubAck(u8),
    PubRec(u8),
    PubComp,
    Publish(Msg),
    /// A DISCONNECT from the server (MQTT 5), with its reason.
    ServerDisconnect(u8),
    /// Our DISCONNECT went out.
    SentDisconnect,
    /// We completed an inbound QoS 2 flow (PUBCOMP written).
    SentPubComp,
    /// The event loop failed (connection closed, refused...).
    Error(String),
}

/// Options of [`Mqtt::connect_with`].
#[derive(Debug, Clone)]
pub struct Opts {
    /// Protocol version.
    pub ver: Ver,
    /// Client id.
    pub id: String,
    /// Clean session (3.1.1) / clean start (5).
    pub clean: bool,
    /// MQTT 5 session expiry interval, seconds.
    pub session_expiry: Option<u32>,
    /// MQTT 5 Topic Alias Maximum announced to the server.
    pub topic_alias_max: Option<u16>,
}

impl Opts {
    /// A clean session with no options.
    pub fn new(ver: Ver, id: &str) -> Self {
        Opts { ver, id: id.into(), clean: true, session_expiry: None, topic_alias_max: None }
    }
}

enum Client {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

fn qos4(q: u8) -> rumqttc::QoS {
    match q {
        0 => rumqttc::QoS::AtMostOnce,
        1 => rumqttc::QoS::AtLeastOnce,
        _ => rumqttc::QoS::ExactlyOnce,
    }
}

fn qos5(q: u8) -> rumqttc::v5::mqttbytes::QoS {
    use rumqttc::v5::mqttbytes::QoS;
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

fn puback_code(r: &m5::PubAckReason) -> u8 {
    use m5::PubAckReason as R;
    match r {
        R::Success => 0x00,
        R::NoMatchingSubscribers => 0x10,
        R::UnspecifiedError => 0x80,
        R::ImplementationSpecificError => 0x83,
        R::NotAuthorized => 0x87,
        R::TopicNameInvalid => 0x90,
        R::PacketIdentifierInUse => 0x91,
        R::QuotaExceeded => 0x97,
        R::PayloadFormatInvalid => 0x99,
    }
}

fn pubrec_code(r: &m5::PubRecReason) -> u8 {
    use m5::PubRecReason as R;
    match r {
        R::Success => 0x00,
        R::NoMatchingSubscribers => 0x10,
        R::UnspecifiedError => 0x80,
        R::ImplementationSpecificError => 0x83,
        R::NotAuthorized => 0x87,
        R::TopicNameInvalid => 0x90,
        R::PacketIdentifierInUse => 0x91,
        R::QuotaExceeded => 0x97,
        R::PayloadFormatInvalid => 0x99,
    }
}

fn suback_code(r: &m5::SubscribeReasonCode) -> u8 {
    use m5::SubscribeReasonCode as R;
    match r {
        R::Success(q) => *q as u8,
        R::Failure | R::Unspecified => 0x80,
        R::ImplementationSpecific => 0x83,
        R::NotAuthorized => 0x87,
        R::TopicFilterInvalid => 0x8F,
        R::PkidInUse => 0x91,
        R::QuotaExceeded => 0x97,
        R::SharedSubscriptionsNotSupported => 0x9E,
        R::SubscriptionIdNotSupported => 0xA1,
        R::WildcardSubscriptionsNotSupported => 0xA2,
    }
}

/// Runs a 3.1.1 event loop, forwarding what the tests look at.
async fn pump_v4(mut el: rumqttc::EventLoop, tx: mpsc::UnboundedSender<Ev>) {
    use rumqttc::{Event, Outgoing, Packet, SubscribeReasonCode};
    loop {
        let ev = match el.poll().await {
            Ok(Event::Incoming(p)) => match p {
                Packet::ConnAck(a) => Ev::ConnAck { session_present: a.session_present, props: None },
                Packet::SubAck(a) => Ev::SubAck(
                    a.return_codes
                        .iter()
                        .map(|c| match c {
                            SubscribeReasonCode::Success(q) => *q as u8,
                            SubscribeReasonCode::Failure => 0x80,
                        })
                        .collect(),
                ),
                Packet::PubAck(_) => Ev::PubAck(0),
                Packet::PubRec(_) => Ev::PubRec(0),
                Packet::PubComp(_) => Ev::PubComp,
                Packet::Publish(p) => Ev::Publish(Msg {
                    topic: p.topic.clone(),
                    wire_topic: Bytes::from(p.topic.into_bytes()),
                    payload: p.payload,
                    qos: p.qos as u8,
                    retain: p.retain,
                    props: None,
                }),
                _ => continue,
            },
            Ok(Event::Outgoing(Outgoing::Disconnect)) => Ev::SentDisconnect,
            Ok(Event::Outgoing(Outgoing::PubComp(_))) => Ev::SentPubComp,
            Ok(Event::Outgoing(_)) => continue,
            Err(e) => {
                let _ = tx.send(Ev::Error(e.to_string()));
                return;
            }
        };
        if tx.send(ev).is_err() {
            return;
        }
    }
}

/// Runs an MQTT 5 event loop, forwarding what the tests look at; resolves
/// topic aliases the server assigns (rumqttc reports the packet before it
/// resolves them).
async fn pump_v5(mut el: rumqttc::v5::EventLoop, tx: mpsc::UnboundedSender<Ev>) {
    use rumqttc::v5::{Event, Incoming};
    let mut aliases: HashMap<u16, String> = HashMap::new();
    loop {
        let ev = match el.poll().await {
            Ok(Event::Incoming(p)) => match p {
                Incoming::ConnAck(a) => Ev::ConnAck { session_present: a.session_present, props: a.properties },
                Incoming::SubAck(a) => Ev::SubAck(a.return_codes.iter().map(suback_code).collect()),
                Incoming::PubAck(a) => Ev::PubAck(puback_code(&a.reason)),
                Incoming::PubRec(a) => Ev::PubRec(pubrec_code(&a.reason)),
                Incoming::PubComp(_) => Ev::PubComp,
                // Reported again as the error that follows; see below.
                Incoming::Disconnect(_) => continue,
                Incoming::Publish(p) => {
                    let alias = p.properties.as_ref().and_then(|x| x.topic_alias);
                    let wire = String::from_utf8_lossy(&p.topic).into_owned();
                    let topic = match alias {
                        Some(a) if wire.is_empty() => aliases.get(&a).cloned().unwrap_or_default(),
                        Some(a) => {
                            aliases.insert(a, wire.clone());
                            wire
                        }
                        None => wire,
                    };
                    Ev::Publish(Msg {
                        topic,
                        wire_topic: p.topic,
                        payload: p.payload,
                        qos: p.qos as u8,
                        retain: p.retain,
                        props: p.properties,
                    })
                }
                _ => continue,
            },
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => Ev::SentDisconnect,
            Ok(Event::Outgoing(rumqttc::Outgoing::PubComp(_))) => Ev::SentPubComp,
            Ok(Event::Outgoing(_)) => continue,
            Err(e) => {
                // rumqttc reports a server DISCONNECT as an error.
                if let rumqttc::v5::ConnectionError::MqttState(rumqttc::v5::StateError::ServerDisconnect {
                    reason_code,
                    ..
                }) = &e
                {
                    let _ = tx.send(Ev::ServerDisconnect(*reason_code as u8));
                }
                let _ = tx.send(Ev::Error(e.to_string()));
                return;
            }
        };
        if tx.send(ev).is_err() {
            return;
        }
    }
}

/// A rumqttc client (3.1.1 or 5) connected to the gateway.
pub struct Mqtt {
    client: Client,
    events: mpsc::UnboundedReceiver<Ev>,
    /// Messages received while waiting for something else.
    pending: VecDeque<Msg>,
    task: JoinHandle<()>,
    /// Client id.
    pub id: String,
    /// CONNACK session present flag.
    pub session_present: bool,
    /// MQTT 5 CONNACK properties.
    pub connack: Option<m5::ConnAckProperties>,
    /// Inbound QoS 2 flows this client completed.
    pubcomps_sent: usize,
}

impl Drop for Mqtt {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Mqtt {
    /// Connects a clean session.
    pub async fn connect(addr: SocketAddr, ver: Ver, id: &str) -> anyhow::Result<Self> {
        Self::connect_with(addr, Opts::new(ver, id)).await
    }

    /// Connects with `opts` and waits for the CONNACK.
    pub async fn connect_with(addr: SocketAddr, opts: Opts) -> anyhow::Result<Self> {
        let host = addr.ip().to_string();
        let (tx, events) = mpsc::unbounded_channel();
        let (client, task) = match opts.ver {
            Ver::V4 => {
                let mut o = rumqttc::MqttOptions::new(opts.id.clone(), host, addr.port());
                o.set_keep_alive(Duration::from_secs(30)).set_clean_session(opts.clean);
                let (c, el) = rumqttc::AsyncClient::new(o, 64);
                (Client::V4(c), tokio::spawn(pump_v4(el, tx)))
            }
            Ver::V5 => {
                let mut o = rumqttc::v5::MqttOptions::new(opts.id.clone(), host, addr.port());
                o.set_keep_alive(Duration::from_secs(30))
                    .set_clean_start(opts.clean)
                    .set_session_expiry_interval(opts.session_expiry)
                    .set_topic_alias_max(opts.topic_alias_max)
                    // rumqttc sizes a table by this up front: 16 MB per
                    // client at its default of 65 535.
                    .set_outgoing_inflight_upper_limit(1024);
                let (c, el) = rumqttc::v5::AsyncClient::new(o, 64);
                (Client::V5(c), tokio::spawn(pump_v5(el, tx)))
            }
        };
        let mut c = Mqtt {
            client,
            events,
            pending: VecDeque::new(),
            task,
            id: opts.id,
            session_present: false,
            connack: None,
            pubcomps_sent: 0,
        };
        match c.next_event().await? {
            Ev::ConnAck { session_present, props } => {
                c.session_present = session_present;
                c.connack = props;
            }
            other => bail!("{}: expected CONNACK, got {other:?}", c.id),
        }
        Ok(c)
    }

    async fn next_event(&mut self) -> anyhow::Result<Ev> {
        let ev = tokio::time::timeout(WAIT, self.events.recv())
            .await
            .map_err(|_| anyhow!("{}: no MQTT event within {WAIT:?}", self.id))?
            .ok_or_else(|| anyhow!("{}: event loop ended", self.id))?;
        if matches!(ev, Ev::SentPubComp) {
            self.pubcomps_sent += 1;
        }
        Ok(ev)
    }

    /// Waits for the event `pick` accepts, keeping messages for later;
    /// a close or an error on the way is an error.
    async fn wait_for<T>(&mut self, what: &str, mut pick: impl FnMut(Ev) -> Option<T>) -> anyhow::Result<T> {
        loop {
            match self.next_event().await? {
                Ev::Publish(m) => self.pending.push_back(m),
                Ev::ServerDisconnect(r) => bail!("{}: server DISCONNECT 0x{r:02X} while waiting for {what}", self.id),
                Ev::Error(e) => bail!("{}: connection failed while waiting for {what}: {e}", self.id),
                ev => {
                    if let Some(t) = pick(ev) {
                        return Ok(t);
                    }
                }
            }
        }
    }

    /// Subscribes; returns the SUBACK codes (granted QoS or failure reason).
    pub async fn subscribe(&mut self, filter: &str, qos: u8) -> anyhow::Result<Vec<u8>> {
        match &self.client {
            Client::V4(c) => c.subscribe(filter, qos4(qos)).await?,
            Client::V5(c) => c.subscribe(filter, qos5(qos)).await?,
        }
        self.wait_for("SUBACK", |e| if let Ev::SubAck(codes) = e { Some(codes) } else { None }).await
    }

    /// Subscribes and expects `qos` granted.
    pub async fn sub(&mut self, filter: &str, qos: u8) -> anyhow::Result<()> {
        let codes = self.subscribe(filter, qos).await?;
        anyhow::ensure!(codes == [qos], "{}: SUBACK for {filter} at QoS {qos}: {codes:?}", self.id);
        Ok(())
    }

    /// MQTT 5 subscribe with user properties; returns the SUBACK codes.
    pub async fn subscribe_props(
        &mut self,
        filter: &str,
        qos: u8,
        user_properties: &[(&str, &str)],
    ) -> anyhow::Result<Vec<u8>> {
        let Client::V5(c) = &self.client else { bail!("subscription properties need MQTT 5") };
        let props = m5::SubscribeProperties {
            id: None,
            user_properties: user_properties.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        c.subscribe_with_properties(filter, qos5(qos), props).await?;
        self.wait_for("SUBACK", |e| if let Ev::SubAck(codes) = e { Some(codes) } else { None }).await
    }

    async fn send_publish(
        &self,
        topic: &str,
        qos: u8,
        retain: bool,
        payload: Bytes,
        props: Option<m5::PublishProperties>,
    ) -> anyhow::Result<()> {
        match (&self.client, props) {
            (Client::V4(c), None) => c.publish_bytes(topic, qos4(qos), retain, payload).await?,
            (Client::V4(_), Some(_)) => bail!("publish properties need MQTT 5"),
            (Client::V5(c), None) => c.publish_bytes(topic, qos5(qos), retain, payload).await?,
            (Client::V5(c), Some(p)) => c.publish_bytes_with_properties(topic, qos5(qos), retain, payload, p).await?,
        }
        Ok(())
    }

    /// Waits for the acknowledgement of one QoS 1/2 publish; returns its
    /// reason (always 0 on 3.1.1).
    async fn wait_ack(&mut self, qos: u8) -> anyhow::Result<u8> {
        match qos {
            0 => Ok(0),
            1 => self.wait_for("PUBACK", |e| if let Ev::PubAck(r) = e { Some(r) } else { None }).await,
            _ => {
                let r = self.wait_for("PUBREC", |e| if let Ev::PubRec(r) = e { Some(r) } else { None }).await?;
                if r >= 0x80 {
                    return Ok(r);
                }
                self.wait_for("PUBCOMP", |e| matches!(e, Ev::PubComp).then_some(())).await?;
                Ok(r)
            }
        }
    }

    /// Publishes and, for QoS 1/2, waits for the flow to complete; returns
    /// the PUBACK/PUBREC reason (0 = success).
    pub async fn publish(
        &mut self,
        topic: &str,
        qos: u8,
        retain: bool,
        payload: impl Into<Bytes>,
    ) -> anyhow::Result<u8> {
        self.send_publish(topic, qos, retain, payload.into(), None).await?;
        self.wait_ack(qos).await
    }

    /// Publishes and expects success.
    pub async fn publish_ok(&mut self, topic: &str, qos: u8, payload: impl Into<Bytes>) -> anyhow::Result<()> {
        let r = self.publish(topic, qos, false, payload).await?;
        anyhow::ensure!(r == 0, "{}: publish to {topic} refused with 0x{r:02X}", self.id);
        Ok(())
    }

    /// MQTT 5 publish with properties; returns the ack reason.
    pub async fn publish_props(
        &mut self,
        topic: &str,
        qos: u8,
        payload: impl Into<Bytes>,
        props: m5::PublishProperties,
    ) -> anyhow::Result<u8> {
        self.send_publish(topic, qos, false, payload.into(), Some(props)).await?;
        self.wait_ack(qos).await
    }

    /// Publishes every payload at `qos` (pipelined by rumqttc's inflight
    /// window) and waits until all are acknowledged with success.
    pub async fn publish_many(&mut self, topic: &str, qos: u8, payloads: Vec<Bytes>) -> anyhow::Result<()> {
        let n = payloads.len();
        let mut acked = 0;
        for p in payloads {
            self.send_publish(topic, qos, false, p, None).await?;
            // Take acks as they come so rumqttc's request queue never fills
            // while nobody reads the events.
            while let Ok(ev) = self.events.try_recv() {
                acked += self.count_ack(ev, qos)?;
            }
        }
        while acked < n && qos > 0 {
            let ev = self.next_event().await?;
            acked += self.count_ack(ev, qos)?;
        }
        Ok(())
    }

    fn count_ack(&mut self, ev: Ev, qos: u8) -> anyhow::Result<usize> {
        Ok(match ev {
            Ev::PubAck(0) if qos == 1 => 1,
            Ev::PubComp if qos == 2 => 1,
            Ev::PubAck(r) | Ev::PubRec(r) if r >= 0x80 => bail!("{}: publish refused with 0x{r:02X}", self.id),
            Ev::Publish(m) => {
                self.pending.push_back(m);
                0
            }
            Ev::ServerDisconnect(r) => bail!("{}: server DISCONNECT 0x{r:02X} while publishing", self.id),
            Ev::Error(e) => bail!("{}: connection failed while publishing: {e}", self.id),
            Ev::SentPubComp => {
                self.pubcomps_sent += 1;
                0
            }
            _ => 0,
        })
    }

    /// The next received message.
    pub async fn next_msg(&mut self) -> anyhow::Result<Msg> {
        if let Some(m) = self.pending.pop_front() {
            return Ok(m);
        }
        loop {
            match self.next_event().await? {
                Ev::Publish(m) => return Ok(m),
                Ev::ServerDisconnect(r) => {
                    bail!("{}: server DISCONNECT 0x{r:02X} while waiting for a message", self.id)
                }
                Ev::Error(e) => bail!("{}: connection failed while waiting for a message: {e}", self.id),
                _ => {}
            }
        }
    }

    /// The next `n` messages.
    pub async fn msgs(&mut self, n: usize) -> anyhow::Result<Vec<Msg>> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.next_msg().await?);
        }
        Ok(out)
    }

    /// Messages already received, without waiting.
    pub fn take_ready(&mut self) -> anyhow::Result<Vec<Msg>> {
        while let Ok(ev) = self.events.try_recv() {
            match ev {
                Ev::Publish(m) => self.pending.push_back(m),
                Ev::ServerDisconnect(r) => bail!("{}: server DISCONNECT 0x{r:02X}", self.id),
                Ev::Error(e) => bail!("{}: connection failed: {e}", self.id),
                Ev::SentPubComp => self.pubcomps_sent += 1,
                _ => {}
            }
        }
        Ok(self.pending.drain(..).collect())
    }

    /// Waits for the server to end the connection; returns the MQTT 5
    /// DISCONNECT reason if one came first.
    pub async fn closed_by_server(&mut self) -> anyhow::Result<Option<u8>> {
        let mut reason = None;
        loop {
            match self.next_event().await {
                Ok(Ev::ServerDisconnect(r)) => reason = Some(r),
                Ok(Ev::Error(_)) => return Ok(reason),
                Ok(Ev::Publish(m)) => self.pending.push_back(m),
                Ok(_) => {}
                Err(e) if e.to_string().contains("event loop ended") => return Ok(reason),
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits until this client has completed `n` inbound QoS 2 flows in all (sent
    /// PUBCOMP for them). A new rumqttc client does not know the packet ids
    /// of an earlier connection and fails on a resent PUBREL, so a test
    /// that reconnects lets the flows finish first.
    pub async fn wait_pubcomps(&mut self, n: usize) -> anyhow::Result<()> {
        while self.pubcomps_sent < n {
            self.wait_for("our PUBCOMP", |e| matches!(e, Ev::SentPubComp).then_some(())).await?;
        }
        Ok(())
    }

    /// Sends DISCONNECT (reason 0) and waits until the server closed the
    /// connection.
    pub async fn disconnect(mut self) -> anyhow::Result<()> {
        match &self.client {
            Client::V4(c) => c.disconnect().await?,
            Client::V5(c) => c.disconnect().await?,
        }
        self.wait_for("our DISCONNECT", |e| matches!(e, Ev::SentDisconnect).then_some(())).await?;
        tokio::time::timeout(WAIT, &mut self.task)
            .await
            .map_err(|_| anyhow!("{}: the server kept the connection open after DISCONNECT", self.id))??;
        Ok(())
    }
}

/// Payloads `"{prefix}{i}"` for `i` in `0..n`.
pub fn numbered(prefix: &str, n: usize) -> Vec<Bytes> {
    (0..n).map(|i| Bytes::from(format!("{prefix}{i}"))).collect()
}

/// Texts of messages (lossy), for compact comparisons.
pub fn texts(msgs: &[Msg]) -> Vec<String> {
    msgs.iter().map(Msg::text).collect()
}

// ---------------------------------------------------------------------------
// Raw packets.

/// Appends an MQTT variable byte integer.
pub fn varint(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
}

/// Appends a two-byte-length-prefixed string or binary.
pub fn mqtt_str(s: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

/// A packet from its first byte and body.
pub fn packet(byte1: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![byte1];
    varint(body.len(), &mut v);
    v.extend_from_slice(body);
    v
}

/// A will for [`connect_packet`].
#[derive(Debug, Clone, Copy)]
pub struct Will<'a> {
    /// Topic.
    pub topic: &'a str,
    /// Payload.
    pub payload: &'a [u8],
    /// QoS.
    pub qos: u8,
}

/// A CONNECT with protocol `level` (5 adds empty property sections, or
/// `props` as given), clean session.
pub fn connect_packet(level: u8, client_id: &str, keep_alive: u16, will: Option<Will>, props: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    mqtt_str(b"MQTT", &mut b);
    b.push(level);
    let mut flags = 0x02;
    if let Some(w) = &will {
        flags |= 0x04 | (w.qos << 3);
    }
    b.push(flags);
    b.extend_from_slice(&keep_alive.to_be_bytes());
    if level == 5 {
        varint(props.len(), &mut b);
        b.extend_from_slice(props);
    }
    mqtt_str(client_id.as_bytes(), &mut b);
    if let Some(w) = will {
        if level == 5 {
            b.push(0);
        }
        mqtt_str(w.topic.as_bytes(), &mut b);
        mqtt_str(w.payload, &mut b);
    }
    packet(0x10, &b)
}

/// A PUBLISH (MQTT 5 with `props` as its property section).
pub fn publish_packet(ver: Ver, topic: &[u8], qos: u8, pkid: u16, payload: &[u8], props: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    mqtt_str(topic, &mut b);
    if qos > 0 {
        b.extend_from_slice(&pkid.to_be_bytes());
    }
    if ver == Ver::V5 {
        varint(props.len(), &mut b);
        b.extend_from_slice(props);
    }
    b.extend_from_slice(payload);
    packet(0x30 | (qos << 1), &b)
}

/// A SUBSCRIBE for one filter.
pub fn subscribe_packet(ver: Ver, pkid: u16, filter: &str, qos: u8) -> Vec<u8> {
    let mut b = pkid.to_be_bytes().to_vec();
    if ver == Ver::V5 {
        b.push(0);
    }
    mqtt_str(filter.as_bytes(), &mut b);
    b.push(qos);
    packet(0x82, &b)
}

/// PINGREQ.
pub const PINGREQ: [u8; 2] = [0xC0, 0x00];

/// DISCONNECT (MQTT 5: with `reason`).
pub fn disconnect_packet(ver: Ver, reason: u8) -> Vec<u8> {
    match ver {
        Ver::V4 => vec![0xE0, 0x00],
        Ver::V5 => vec![0xE0, 0x01, reason],
    }
}

/// One packet read off a raw socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawPacket {
    /// First byte (type and flags).
    pub byte1: u8,
    /// Everything after the remaining length.
    pub body: Bytes,
}

impl RawPacket {
    /// Packet type (1 = CONNECT ... 14 = DISCONNECT).
    pub fn kind(&self) -> u8 {
        self.byte1 >> 4
    }

    /// CONNACK return code / reason.
    pub fn connack_code(&self) -> Option<u8> {
        (self.kind() == 2).then(|| self.body.get(1).copied()).flatten()
    }

    /// DISCONNECT reason (0 when the packet has no body).
    pub fn disconnect_reason(&self) -> Option<u8> {
        (self.kind() == 14).then(|| self.body.first().copied().unwrap_or(0))
    }
}

/// A byte stream a [`Raw`] connection can run over (TCP, or TLS over TCP).
pub trait RawIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> RawIo for T {}

/// A connection speaking hand-made packets.
pub struct Raw {
    stream: Box<dyn RawIo>,
    buf: BytesMut,
}

/// How a raw connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closed {
    /// Packets received before the end.
    pub packets: Vec<RawPacket>,
}

impl Closed {
    /// CONNACK code of the only packet, if that is what it is.
    pub fn only_connack(&self) -> Option<u8> {
        match self.packets.as_slice() {
            [p] => p.connack_code(),
            _ => None,
        }
    }

    /// DISCONNECT reason of the only packet, if that is what it is.
    pub fn only_disconnect(&self) -> Option<u8> {
        match self.packets.as_slice() {
            [p] => p.disconnect_reason(),
            _ => None,
        }
    }
}

fn parse_packet(buf: &mut BytesMut) -> anyhow::Result<Option<RawPacket>> {
    if buf.is_empty() {
        return Ok(None);
    }
    let mut len = 0usize;
    let mut i = 1;
    loop {
        let Some(&b) = buf.get(i) else { return Ok(None) };
        len += usize::from(b & 0x7F) << (7 * (i - 1));
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        if i > 4 {
            bail!("server sent a malformed remaining length");
        }
    }
    if buf.len() < i + len {
        return Ok(None);
    }
    let byte1 = buf[0];
    buf.advance(i);
    Ok(Some(RawPacket { byte1, body: buf.split_to(len).freeze() }))
}

impl Raw {
    /// Opens a TCP connection.
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Self::over(stream))
    }

    /// Speaks packets over an already open stream (e.g. a TLS session).
    pub fn over(stream: impl RawIo + 'static) -> Self {
        Raw { stream: Box::new(stream), buf: BytesMut::new() }
    }

    /// Opens a connection and completes a clean CONNECT (no will) with
    /// `keep_alive`; the CONNACK must be a success.
    pub async fn handshake(addr: SocketAddr, ver: Ver, client_id: &str, keep_alive: u16) -> anyhow::Result<Self> {
        let mut r = Self::connect(addr).await?;
        r.send(&connect_packet(ver.level(), client_id, keep_alive, None, &[])).await?;
        let p = r.packet().await?.context("closed instead of CONNACK")?;
        anyhow::ensure!(p.connack_code() == Some(0), "expected a successful CONNACK, got {p:?}");
        Ok(r)
    }

    /// Writes bytes.
    pub async fn send(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// The next packet within [`WAIT`]; `None` when the server closed.
    pub async fn packet(&mut self) -> anyhow::Result<Option<RawPacket>> {
        self.packet_within(WAIT).await
    }

    /// The next packet within `within`; `None` when the server closed.
    pub async fn packet_within(&mut self, within: Duration) -> anyhow::Result<Option<RawPacket>> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(p) = parse_packet(&mut self.buf)? {
                return Ok(Some(p));
            }
            let n = tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf))
                .await
                .map_err(|_| anyhow!("no packet and no close within {within:?}"))?;
            match n {
                Ok(0) => {
                    anyhow::ensure!(self.buf.is_empty(), "closed after a partial packet: {:?}", self.buf);
                    return Ok(None);
                }
                Ok(_) => {}
                // A reset after the server closed with unread input is a close too.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(None),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Reads until the server closes (within `within`); returns what came
    /// before.
    pub async fn closed_within(&mut self, within: Duration) -> anyhow::Result<Closed> {
        let deadline = tokio::time::Instant::now() + within;
        let mut packets = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.packet_within(left).await.with_context(|| format!("after {packets:?}"))? {
                Some(p) => packets.push(p),
                None => return Ok(Closed { packets }),
            }
        }
    }

    /// [`Raw::closed_within`] with [`WAIT`].
    pub async fn closed(&mut self) -> anyhow::Result<Closed> {
        self.closed_within(WAIT).await
    }

    /// Drops the connection without a DISCONNECT.
    pub fn drop_abruptly(self) {
        drop(self.stream);
    }
}

/// The admin `/healthz` status.
pub async fn healthz(admin: &str) -> anyhow::Result<u16> {
    Ok(reqwest::get(format!("{admin}/healthz")).await?.status().as_u16())
}
