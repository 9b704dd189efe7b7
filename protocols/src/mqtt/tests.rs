//! Connection tests against a fake core over `tokio::io::duplex`, with
//! client packets written by hand with rumqttc's `mqttbytes`.

use super::*;

use std::collections::HashMap;

use parking_lot::Mutex;
use rumqttc::mqttbytes::QoS as Q4;
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::QoS as Q5;
use rumqttc::v5::mqttbytes::v5;
use tokio::io::DuplexStream;
use tokio::task::JoinHandle;

use crate::port::{Outbox, SessionId, SlowPolicy, SubscribeOutcome};

/// Upper bound on any single wait; a hang fails the test instead.
const WAIT: Duration = Duration::from_secs(5);

/// A core that records calls and answers from canned data.
struct FakeCore {
    calls: Mutex<Vec<String>>,
    publishes: Mutex<Vec<proto::Publish>>,
    subscribes: Mutex<Vec<proto::Subscribe>>,
    outbox: Mutex<Arc<Outbox>>,
    publish_error: Mutex<Option<CoreError>>,
    /// Returned as the replay of the next subscribe.
    replay: Mutex<Vec<Outbound>>,
    next_id: AtomicU64,
}

impl FakeCore {
    fn new() -> Arc<Self> {
        Arc::new(FakeCore {
            calls: Mutex::new(Vec::new()),
            publishes: Mutex::new(Vec::new()),
            subscribes: Mutex::new(Vec::new()),
            outbox: Mutex::new(Outbox::new(1 << 20)),
            publish_error: Mutex::new(None),
            replay: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(1),
        })
    }

    fn outbox(&self) -> Arc<Outbox> {
        self.outbox.lock().clone()
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().clone()
    }

    fn published(&self) -> Vec<proto::Publish> {
        self.publishes.lock().clone()
    }
}

#[async_trait::async_trait]
impl Core for FakeCore {
    async fn open(&self, req: OpenSession) -> Result<SessionHandle, CoreError> {
        self.calls.lock().push(format!("open {} {}", req.client_id, req.token));
        // Each session gets a fresh outbox, as the real core does.
        let outbox = Outbox::new(1 << 20);
        *self.outbox.lock() = outbox.clone();
        // A token `sub:NAME` names the client, as a real token's `sub` does.
        let client_id = req.token.strip_prefix("sub:").map_or(req.client_id, str::to_string);
        Ok(SessionHandle {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            client_id,
            connection_id: "c1".into(),
            node: "n1".into(),
            outbox,
        })
    }

    async fn subscribe(&self, session: SessionId, req: proto::Subscribe) -> Result<SubscribeOutcome, CoreError> {
        self.calls.lock().push(format!("subscribe {session} {}", req.filter));
        let filter = req.filter.clone();
        self.subscribes.lock().push(req);
        Ok(SubscribeOutcome {
            subscribed: proto::Subscribed { filter, channels: Vec::new() },
            replay: std::mem::take(&mut *self.replay.lock()),
        })
    }

    async fn unsubscribe(&self, session: SessionId, filter: &str) -> Result<(), CoreError> {
        self.calls.lock().push(format!("unsubscribe {session} {filter}"));
        Ok(())
    }

    async fn publish(&self, session: SessionId, req: proto::Publish) -> Result<proto::PublishAck, CoreError> {
        self.calls.lock().push(format!("publish {session} {}", req.channel));
        if let Some(e) = self.publish_error.lock().clone() {
            return Err(e);
        }
        let channel = req.channel.clone();
        self.publishes.lock().push(req);
        Ok(proto::PublishAck { channel, epoch: "e".into(), serial: 1, duplicate: false })
    }

    async fn presence_enter(&self, session: SessionId, channel: &str, _: Bytes, update: bool) -> Result<(), CoreError> {
        self.calls.lock().push(format!("presence_enter {session} {channel} {update}"));
        Ok(())
    }

    async fn presence_leave(&self, session: SessionId, channel: &str) -> Result<(), CoreError> {
        self.calls.lock().push(format!("presence_leave {session} {channel}"));
        Ok(())
    }

    async fn presence_members(&self, _: SessionId, channel: &str) -> Result<proto::PresenceMembers, CoreError> {
        Ok(proto::PresenceMembers { channel: channel.into(), members: Vec::new() })
    }

    async fn history(&self, _: SessionId, req: proto::History) -> Result<proto::HistoryResult, CoreError> {
        Ok(proto::HistoryResult { channel: req.channel, ..Default::default() })
    }

    async fn refresh(&self, session: SessionId, token: &str) -> Result<(), CoreError> {
        self.calls.lock().push(format!("refresh {session} {token}"));
        if token == "bad" {
            return Err(CoreError::new(ErrorCode::Unauthorized, "bad token"));
        }
        Ok(())
    }

    fn close(&self, session: SessionId, kind: CloseKind) {
        self.calls.lock().push(format!("close {session} {kind:?}"));
    }
}

fn delivery(channel: &str, serial: u64, qos: Option<u32>) -> Arc<Delivery> {
    Delivery::new(proto::Envelope {
        channel: channel.into(),
        epoch: "e".into(),
        serial,
        prev_serial: serial - 1,
        payload: Bytes::from(format!("m{serial}")),
        qos,
        timestamp: now_ms() as i64,
        ..Default::default()
    })
}

/// A server packet as the client reads it.
#[derive(Debug)]
enum In {
    V4(v4::Packet),
    V5(Box<v5::Packet>),
}

struct Client {
    io: DuplexStream,
    buf: BytesMut,
    v5: bool,
}

impl Client {
    async fn send4(&mut self, p: v4::Packet) {
        let mut b = BytesMut::new();
        p.write(&mut b, usize::MAX).expect("encode");
        self.io.write_all(&b).await.expect("write");
    }

    async fn send5(&mut self, p: v5::Packet) {
        let mut b = BytesMut::new();
        p.write(&mut b, None).expect("encode");
        self.io.write_all(&b).await.expect("write");
    }

    /// The next packet, or None at EOF.
    async fn recv(&mut self) -> Option<In> {
        tokio::time::timeout(WAIT, async {
            loop {
                if !self.buf.is_empty() {
                    if self.v5 {
                        match v5::Packet::read(&mut self.buf, None) {
                            Ok(p) => return Some(In::V5(Box::new(p))),
                            Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => {}
                            Err(e) => panic!("bad server packet: {e}"),
                        }
                    } else {
                        match v4::Packet::read(&mut self.buf, usize::MAX) {
                            Ok(p) => return Some(In::V4(p)),
                            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                            Err(e) => panic!("bad server packet: {e}"),
                        }
                    }
                }
                match self.io.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => {
                        // The server closed: close our side too, as clients
                        // do (its lingering close then ends at once).
                        let _ = self.io.shutdown().await;
                        return None;
                    }
                    Ok(_) => {}
                }
            }
        })
        .await
        .expect("receive timed out")
    }

    async fn recv4(&mut self) -> v4::Packet {
        match self.recv().await {
            Some(In::V4(p)) => p,
            other => panic!("expected a packet, got {other:?}"),
        }
    }

    async fn recv5(&mut self) -> v5::Packet {
        match self.recv().await {
            Some(In::V5(p)) => *p,
            other => panic!("expected a packet, got {other:?}"),
        }
    }

    /// Writes raw bytes (packets rumqttc cannot encode, such as AUTH).
    async fn send_raw(&mut self, bytes: &[u8]) {
        self.io.write_all(bytes).await.expect("write");
    }

    /// The next packet, which must be an AUTH (rumqttc's reader does not
    /// know AUTH; AUTH is symmetric, so the server's decoder reads it).
    async fn recv_auth(&mut self) -> codec::Auth {
        tokio::time::timeout(WAIT, async {
            loop {
                match codec::decode(&mut self.buf, Some(Version::V5), 1 << 20) {
                    Ok(Some(Packet::Auth(a))) => return a,
                    Ok(Some(other)) => panic!("expected AUTH, got {other:?}"),
                    Ok(None) => {}
                    Err(e) => panic!("bad AUTH from the server: {e}"),
                }
                let n = self.io.read_buf(&mut self.buf).await.expect("read");
                assert!(n > 0, "closed instead of AUTH");
            }
        })
        .await
        .expect("receive timed out")
    }

    async fn expect_closed(&mut self) {
        if let Some(p) = self.recv().await {
            panic!("expected EOF, got {p:?}");
        }
    }
}

/// The core's session store, faked: one slot per client id, live (with the
/// kick that asks the connection to hand its session over) or stored;
/// wills are tokens. No expiry and no bound: those are the core's, tested
/// there.
#[derive(Debug, Default)]
struct FakeSessions {
    slots: Mutex<HashMap<String, FakeSlot>>,
    wills: Mutex<HashMap<String, u64>>,
    next: std::sync::atomic::AtomicU64,
    checkpoints: std::sync::atomic::AtomicUsize,
}

#[derive(Debug)]
enum FakeSlot {
    Live { conn: u64, kick: Option<oneshot::Sender<Handover>> },
    Stored(Box<StoredSession>),
}

impl FakeSessions {
    fn stored(&self) -> usize {
        self.slots.lock().values().filter(|s| matches!(s, FakeSlot::Stored(_))).count()
    }
}

impl SessionStore for FakeSessions {
    fn claim(&self, client_id: &str, _now: Instant) -> (Ticket, Claim) {
        self.wills.lock().remove(client_id);
        let conn = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let (kick_tx, kick) = oneshot::channel();
        let old = self.slots.lock().insert(client_id.into(), FakeSlot::Live { conn, kick: Some(kick_tx) });
        let claim = match old {
            None => Claim::Fresh,
            Some(FakeSlot::Stored(s)) => Claim::Resumed(s),
            Some(FakeSlot::Live { kick, .. }) => {
                let (tx, rx) = oneshot::channel();
                match kick.map(|k| k.send(tx)) {
                    Some(Ok(())) => Claim::Takeover(rx),
                    _ => Claim::Fresh,
                }
            }
        };
        (Ticket { conn, kick }, claim)
    }

    fn release(&self, client_id: &str, conn: u64, session: Option<Box<StoredSession>>, _: Duration, _: Instant) {
        let mut slots = self.slots.lock();
        if !matches!(slots.get(client_id), Some(FakeSlot::Live { conn: c, .. }) if c == &conn) {
            return;
        }
        match session {
            Some(s) => slots.insert(client_id.into(), FakeSlot::Stored(s)),
            None => slots.remove(client_id),
        };
    }

    fn checkpoint(&self, _: &str, _: u64, _: &SessionState, _: Duration) {
        self.checkpoints.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn expiry_max(&self) -> Duration {
        Duration::from_secs(3600)
    }

    fn delay_will(&self, client_id: &str) -> Option<super::DelayedWill> {
        let token = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        self.wills.lock().insert(client_id.into(), token);
        Some(super::DelayedWill { token, cancelled: Arc::new(tokio::sync::Notify::new()) })
    }

    fn take_will(&self, client_id: &str, token: u64) -> bool {
        let mut wills = self.wills.lock();
        let due = wills.get(client_id) == Some(&token);
        if due {
            wills.remove(client_id);
        }
        due
    }
}

struct Harness {
    core: Arc<FakeCore>,
    sessions: Arc<FakeSessions>,
    cfg: Arc<MqttConfig>,
    shutdown: watch::Sender<bool>,
}

impl Harness {
    fn new() -> Self {
        Self::with(MqttConfig::default())
    }

    fn with(cfg: MqttConfig) -> Self {
        Harness {
            core: FakeCore::new(),
            sessions: Arc::new(FakeSessions::default()),
            cfg: Arc::new(cfg),
            shutdown: watch::channel(false).0,
        }
    }

    fn start(&self, v5: bool) -> (Client, JoinHandle<()>) {
        let (server, client) = tokio::io::duplex(1 << 20);
        let core: Arc<dyn Core> = self.core.clone();
        let task = tokio::spawn(serve(
            server,
            core,
            self.sessions.clone() as Arc<dyn SessionStore>,
            self.cfg.clone(),
            Peer::default(),
            self.shutdown.subscribe(),
        ));
        (Client { io: client, buf: BytesMut::new(), v5 }, task)
    }

    async fn connect4(&self, id: &str, clean: bool) -> (Client, JoinHandle<()>, bool) {
        let (mut c, task) = self.start(false);
        let mut p = v4::Connect::new(id);
        p.clean_session = clean;
        p.keep_alive = 0;
        c.send4(v4::Packet::Connect(p)).await;
        let v4::Packet::ConnAck(ack) = c.recv4().await else { panic!("no CONNACK") };
        assert_eq!(ack.code, v4::ConnectReturnCode::Success);
        (c, task, ack.session_present)
    }

    async fn connect5(
        &self,
        id: &str,
        props: Option<v5::ConnectProperties>,
        will: Option<v5::LastWill>,
    ) -> (Client, JoinHandle<()>, v5::ConnAck) {
        let (mut c, task) = self.start(true);
        let p = v5::Connect { keep_alive: 0, client_id: id.into(), clean_start: true, properties: props };
        c.send5(v5::Packet::Connect(p, will, None)).await;
        let v5::Packet::ConnAck(ack) = c.recv5().await else { panic!("no CONNACK") };
        assert_eq!(ack.code, v5::ConnectReturnCode::Success);
        (c, task, ack)
    }
}

async fn join(task: JoinHandle<()>) {
    tokio::time::timeout(WAIT, task).await.expect("server task hung").expect("server task panicked");
}

fn disconnect_reason(p: v5::Packet) -> v5::DisconnectReasonCode {
    match p {
        v5::Packet::Disconnect(d) => d.reason_code,
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
}

async fn subscribe4(c: &mut Client, filter: &str, qos: Q4) {
    c.send4(v4::Packet::Subscribe(v4::Subscribe::new(filter, qos))).await;
    let v4::Packet::SubAck(ack) = c.recv4().await else { panic!("no SUBACK") };
    assert_eq!(ack.return_codes, vec![v4::SubscribeReasonCode::Success(qos)]);
}

#[tokio::test]
async fn connect_v4_and_v5_get_connack() {
    let h = Harness::new();
    let (mut c, task, present) = h.connect4("dev1", true).await;
    assert!(!present);
    c.send4(v4::Packet::PingReq).await;
    assert_eq!(c.recv4().await, v4::Packet::PingResp);
    c.send4(v4::Packet::Disconnect).await;
    c.expect_closed().await;
    join(task).await;

    let (mut c, task, ack) = h.connect5("", None, None).await;
    let props = ack.properties.expect("CONNACK properties");
    assert!(props.assigned_client_identifier.is_some_and(|id| id.starts_with("auto-")));
    assert_eq!(props.receive_max, Some(100));
    assert_eq!(props.topic_alias_max, Some(32));
    assert_eq!(props.max_packet_size, Some(256 * 1024));
    c.send5(v5::Packet::Disconnect(v5::Disconnect::new(v5::DisconnectReasonCode::NormalDisconnection))).await;
    c.expect_closed().await;
    join(task).await;
    let closes: Vec<_> = h.core.calls().into_iter().filter(|c| c.starts_with("close")).collect();
    assert_eq!(closes, vec!["close 1 Clean", "close 2 Clean"]);
}

#[tokio::test]
async fn password_is_the_token_and_empty_persistent_v4_id_is_refused() {
    let h = Harness::new();
    let (mut c, task) = h.start(false);
    let mut p = v4::Connect::new("u");
    p.set_login("user", "secret-token");
    c.send4(v4::Packet::Connect(p)).await;
    assert!(matches!(c.recv4().await, v4::Packet::ConnAck(_)));
    assert_eq!(h.core.calls()[0], "open u secret-token");
    drop(c);
    join(task).await;

    let (mut c, task) = h.start(false);
    let mut p = v4::Connect::new("");
    p.clean_session = false;
    c.send4(v4::Packet::Connect(p)).await;
    let v4::Packet::ConnAck(ack) = c.recv4().await else { panic!() };
    assert_eq!(ack.code, v4::ConnectReturnCode::BadClientId);
    c.expect_closed().await;
    join(task).await;
}

#[tokio::test]
async fn packet_before_connect_closes() {
    let h = Harness::new();
    let (mut c, task) = h.start(false);
    c.send4(v4::Packet::PingReq).await;
    c.expect_closed().await;
    join(task).await;
    assert!(h.core.calls().is_empty(), "no session was opened");
}

#[tokio::test]
async fn connect_timeout_closes() {
    let h = Harness::with(MqttConfig { connect_timeout: Duration::from_millis(100), ..MqttConfig::default() });
    let (mut c, task) = h.start(false);
    c.expect_closed().await;
    join(task).await;
}

#[tokio::test]
async fn unknown_protocol_level_is_refused() {
    let h = Harness::new();
    let (mut c, task) = h.start(false);
    let mut b = BytesMut::new();
    v4::Packet::Connect(v4::Connect::new("x")).write(&mut b, usize::MAX).unwrap();
    b[8] = 3; // MQTT 3.1
    c.io.write_all(&b).await.unwrap();
    let v4::Packet::ConnAck(ack) = c.recv4().await else { panic!() };
    assert_eq!(ack.code, v4::ConnectReturnCode::RefusedProtocolVersion);
    c.expect_closed().await;
    join(task).await;
    assert!(h.core.calls().is_empty());
}

#[tokio::test]
async fn second_connect_is_a_protocol_error() {
    let h = Harness::new();
    let (mut c, task, _) = h.connect5("a", None, None).await;
    c.send5(v5::Packet::Connect(
        v5::Connect { keep_alive: 0, client_id: "a".into(), clean_start: true, properties: None },
        None,
        None,
    ))
    .await;
    assert_eq!(disconnect_reason(c.recv5().await), v5::DisconnectReasonCode::ProtocolError);
    c.expect_closed().await;
    join(task).await;
}

#[tokio::test]
async fn inbound_qos_0_1_2_acks_and_qos2_dedupe() {
    let h = Harness::new();
    let (mut c, task, _) = h.connect4("p", true).await;
    c.send4(v4::Packet::Publish(v4::Publish::new("a/b", Q4::AtMostOnce, "zero"))).await;
    let mut p1 = v4::Publish::new("a/b", Q4::AtLeastOnce, "one");
    p1.pkid = 10;
    c.send4(v4::Packet::Publish(p1)).await;
    assert_eq!(c.recv4().await, v4::Packet::PubAck(v4::PubAck::new(10)));
    let mut p2 = v4::Publish::new("a/b", Q4::ExactlyOnce, "two");
    p2.pkid = 11;
    c.send4(v4::Packet::Publish(p2.clone())).await;
    assert_eq!(c.recv4().await, v4::Packet::PubRec(v4::PubRec::new(11)));
    // A retransmission before PUBREL is acknowledged, not published again.
    p2.dup = true;
    c.send4(v4::Packet::Publish(p2.clone())).await;
    assert_eq!(c.recv4().await, v4::Packet::PubRec(v4::PubRec::new(11)));
    c.send4(v4::Packet::PubRel(v4::PubRel::new(11))).await;
    assert_eq!(c.recv4().await, v4::Packet::PubComp(v4::PubComp::new(11)));
    let got: Vec<_> = h.core.published().iter().map(|p| (p.payload.clone(), p.qos)).collect();
    assert_eq!(
        got,
        vec![
            (Bytes::from_static(b"zero"), Some(0)),
            (Bytes::from_static(b"one"), Some(1)),
            (Bytes::from_static(b"two"), Some(2)),
        ]
    );
    // After PUBREL the same id is a new message.
    c.send4(v4::Packet::Publish(p2)).await;
    assert_eq!(c.recv4().await, v4::Packet::PubRec(v4::PubRec::new(11)));
    assert_eq!(h.core.published().len(), 4);
    drop(c);
    join(task).await;
}

#[tokio::test]
async fn refused_publish_acks_v5_reason_and_closes_v4() {
    let h = Harness::new();
    *h.core.publish_error.lock() = Some(CoreError::new(ErrorCode::PermissionDenied, "no"));
    let (mut c, task, _) = h.connect5("a", None, None).await;
    let mut p = v5::Publish::new("a", Q5::AtLeastOnce, "x", None);
    p.pkid = 3;
    c.send5(v5::Packet::Publish(p)).await;
    let v5::Packet::PubAck(ack) = c.recv5().await else { panic!() };
    assert_eq!((ack.pkid, ack.reason), (3, v5::PubAckReason::NotAuthorized));
    drop(c);
    join(task).await;

    let (mut c, task, _) = h.connect4("b", true).await;
    let mut p = v4::Publish::new("a", Q4::AtLeastOnce, "x");
    p.pkid = 3;
    c.send4(v4::Packet::Publish(p)).await;
    c.expect_closed().await;
    join(task).await;
}

#[tokio::test]
async fn invalid_publish_topics_are_refused() {
    for topic in ["a/+", "a/#", "$SYS/x", "$share/g/x", "$presence", ""] {
        let h = Harness::new();
        let (mut c, task, _) = h.connect5("a", None, None).await;
        c.send5(v5::Packet::Publish(v5::Publish::new(topic, Q5::AtMostOnce, "x", None))).await;
        assert_eq!(disconnect_reason(c.recv5().await), v5::DisconnectReasonCode::TopicNameInvalid, "{topic:?}");
        c.expect_closed().await;
        join(task).await;
        assert!(h.core.published().is_empty());
    }
    // Invalid UTF-8 (v5 carries the topic as raw bytes).
    let h = Harness::new();
    let (mut c, task, _) = h.connect5("a", None, None).await;
    let mut p = v5::Publish::new("x", Q5::AtMostOnce, "x", None);
    p.topic = Bytes::from_static(b"\xff\xfe");
    c.send5(v5::Packet::Publish(p)).await;
    assert_eq!(disconnect_reason(c.recv5().await), v5::DisconnectReasonCode::TopicNameInvalid);
    join(task).await;
    // 3.1.1: the connection is closed.
    let h = Harness::new();
    let (mut c, task, _) = h.connect4("a", true).await;
    c.send4(v4::Packet::Publish(v4::Publish::new("a/+", Q4::AtMostOnce, "x"))).await;
    c.expect_closed().await;
    join(task).await;
}

#[tokio::test]
async fn invalid_filter_gets_suback_failure() {
    let h = Harness::new();
    let (mut c, task, _) = h.connect4("a", true).await;
    c.send4(v4::Packet::Subscribe(v4::Subscribe::new_many([
        v4::SubscribeFilter::new("a/#/b".into(), Q4::AtLeastOnce),
        v4::SubscribeFilter::new("ok/+".into(), Q4::AtLeastOnce),
    ])))
    .await;
    let v4::Packet::SubAck(ack) = c.recv4().await else { panic!() };
    assert_eq!(
        ack.return_codes,
        vec![v4::SubscribeReasonCode::Failure, v4::SubscribeReasonCode::Success(Q4::AtLeastOnce)]
    );
    drop(c);
    join(task).await;

    let (mut c, task, _) = h.connect5("b", None, None).await;
    c.send5(v5::Packet::Subscribe(v5::Subscribe::new(v5::Filter::new("a+", Q5::AtMostOnce), None))).await;
    let v5::Packet::SubAck(ack) = c.recv5().await else { panic!() };
    assert_eq!(ack.return_codes, vec![v5::SubscribeReasonCode::TopicFilterInvalid]);
    drop(c);
    join(task).await;
}

#[tokio::test]
async fn outbound_qos1_and_qos2_flows() {
    let h = Harness::new();
    let (mut c, task, _) = h.connect4("s", true).await;
    subscribe4(&mut c, "a/#", Q4::ExactlyOnce).await;
    subscribe4(&mut c, "q1", Q4::AtLeastOnce).await;
    let outbox = h.core.outbox();
    // Unset publisher QoS = 2, capped by the subscription.
    outbox.push(Outbound::Message(delivery("a/x", 1, None)), SlowPolicy::Disconnect);
    let v4::Packet::Publish(p) = c.recv4().await else { panic!() };
    assert_eq!((p.qos, p.pkid, p.topic.as_str(), p.retain, p.dup), (Q4::ExactlyOnce, 1, "a/x", false, false));
    c.send4(v4::Packet::PubRec(v4::PubRec::new(1))).await;
    assert_eq!(c.recv4().await, v4::Packet::PubRel(v4::PubRel::new(1)));
    c.send4(v4::Packet::PubComp(v4::PubComp::new(1))).await;
    // Publisher QoS 2 on a QoS 1 subscription goes at 1; publisher 0 at 0.
    outbox.push(Outbound::Message(delivery("q1", 1, Some(2))), SlowPolicy::Disconnect);
    let v4::Packet::Publish(p) = c.recv4().await else { panic!() };
    assert_eq!((p.qos, p.pkid), (Q4::AtLeastOnce, 2));
    c.send4(v4::Packet::PubAck(v4::PubAck::new(2))).await;
    outbox.push(Outbound::Message(delivery("q1", 2, Some(0))), SlowPolicy::Disconnect);
    let v4::Packet::Publish(p) = c.recv4().await else { panic!() };
    assert_eq!((p.qos, p.pkid, &p.payload[..]), (Q4::AtMostOnce, 0, &b"m2"[..]));
    // A delivery at or below the delivered position is a duplicate.
    outbox.push(Outbound::Message(delivery("q1", 2, Some(1))), SlowPolicy::Disconnect);
    outbox.push(Outbound::Message(delivery("q1", 3, Some(1))), SlowPolicy::Disconnect);
    let v4::Packet::Publish(p) = c.recv4().await else { panic!() };
    assert_eq!(&p.payload[..], b"m3");
    drop(c);
    join(task).await;
}

#[tokio::test]
async fn inflight_window_holds_messages_until_acked() {
    let h = Harness::with(MqttConfig { receive_maximum: 1, ..MqttConfig::default() });
    let (mut c, task, _) = h.connect4("w", true).await;
    subscribe4(&mut c, "a", Q4::AtLeastOnce).await;
    let outbox = h.core.outbox();
    outbox.push(Outbound::Message(delivery("a", 1, Some(1))), SlowPolicy::Disconnect);
    outbox.push(Outbound::Message(delivery("a", 2, Some(1))), SlowPolicy::Disconnect);
    let v4::Packet::Publish(p) = c.recv4().await else { panic!() };
    assert_eq!(p.pkid, 1);
    // The second waits for the first's PUBACK; a ping proves nothing else came.
    c.send4(v4::Packet::PingReq).await;
    assert_eq!(c.recv4().await, v4::Packet::PingResp);
    c.send4(v4::Packet::PubAck(v4::PubAck::new(1))).await;
    let v4::Packet::Publish(p) = c.recv4().await else { panic!() };
    assert_eq!((p.pkid, &p.payload[..]), (2, &b"m2"[..]));
    drop(c);
    join(task).await;
}

#[tokio::test]
async fn retained_replay_has_retain_flag_live_does_not() {
    let h = Harness::new();
    let (mut c, task, _) = h.connect4("r", true).await;
    let mut retained = delivery("a", 1, Some(1)).envelope.clone();
    retained.retain = true;
    *h.core.replay.lock() = vec![Outbound::Message(Delivery::new(retained.clone()))];
    subscribe4(&mut c, "a", Q4::AtLeastOnce).await;
    assert!(h.core.subscribes.lock()[0].retained, "MQTT asks for retained values");
    let v4::Packet::Publish(p) = c.recv4().await else { panic!() };
    assert!(p.retain);
    c.send4(v4::Packet::PubAck(v4::PubAck::new(p.pkid))).await;
    retained.serial = 2;
    h.core.outbox().push(Outbound::Message(Delivery::new(retained)), SlowPolicy::Disconnect);
    let v4::Packet::Publish(p) = c.recv4().await else { panic!() };
    assert!(!p.retain, "live messages go with retain=0");
    drop(c);
    join(task).await;
}

#[tokio::test]
async fn persistent_session_resumes_with_dup_then_replay() {
    let h = Harness::new();
    let (mut c, task, present) = h.connect4("p", false).await;
    assert!(!present);
    subscribe4(&mut c, "a", Q4::AtLeastOnce).await;
    h.core.outbox().push(Outbound::Message(delivery("a", 1, Some(1))), SlowPolicy::Disconnect);
    let v4::Packet::Publish(p) = c.recv4().await else { panic!() };
    assert_eq!((p.pkid, p.dup), (1, false));
    // Drop without acking.
    drop(c);
    join(task).await;
    assert_eq!(h.sessions.stored(), 1);

    // While away, serial 2 was published; the core replays 1 (overlap) and 2.
    *h.core.replay.lock() =
        vec![Outbound::Message(delivery("a", 1, Some(1))), Outbound::Message(delivery("a", 2, Some(1)))];
    let (mut c, task, present) = h.connect4("p", false).await;
    assert!(present);
    let v4::Packet::Publish(p) = c.recv4().await else { panic!() };
    assert_eq!((p.pkid, p.dup, &p.payload[..]), (1, true, &b"m1"[..]));
    let v4::Packet::Publish(p) = c.recv4().await else { panic!() };
    assert_eq!((p.pkid, p.dup, &p.payload[..]), (2, false, &b"m2"[..]));
    let sub = h.core.subscribes.lock().last().cloned().expect("re-subscribed");
    assert_eq!(sub.filter, "a");
    assert_eq!(sub.positions.get("a").map(|p| (p.epoch.as_str(), p.serial)), Some(("e", 1)));
    assert!(sub.since_ms > 0);
    c.send4(v4::Packet::Disconnect).await;
    c.expect_closed().await;
    join(task).await;

    // A clean session discards what was stored.
    let (c, task, present) = h.connect4("p", true).await;
    assert!(!present);
    drop(c);
    join(task).await;
}

#[tokio::test]
async fn qos2_pubrel_pending_is_resent_as_pubrel() {
    let h = Harness::new();
    let (mut c, task, _) = h.connect4("q", false).await;
    subscribe4(&mut c, "a", Q4::ExactlyOnce).await;
    h.core.outbox().push(Outbound::Message(delivery("a", 1, None)), SlowPolicy::Disconnect);
    let v4::Packet::Publish(p) = c.recv4().await else { panic!() };
    c.send4(v4::Packet::PubRec(v4::PubRec::new(p.pkid))).await;
    assert_eq!(c.recv4().await, v4::Packet::PubRel(v4::PubRel::new(1)));
    drop(c);
    join(task).await;
    let (mut c, task, present) = h.connect4("q", false).await;
    assert!(present);
    assert_eq!(c.recv4().await, v4::Packet::PubRel(v4::PubRel::new(1)), "exactly once: PUBREL, not PUBLISH");
    c.send4(v4::Packet::PubComp(v4::PubComp::new(1))).await;
    c.send4(v4::Packet::PingReq).await;
    assert_eq!(c.recv4().await, v4::Packet::PingResp);
    drop(c);
    join(task).await;
}

#[tokio::test]
async fn keepalive_timeout_closes_with_0x8d() {
    let h = Harness::new();
    let (mut c, task) = h.start(true);
    let p = v5::Connect { keep_alive: 1, client_id: "k".into(), clean_start: true, properties: None };
    c.send5(v5::Packet::Connect(p, None, None)).await;
    assert!(matches!(c.recv5().await, v5::Packet::ConnAck(_)));
    let started = std::time::Instant::now();
    assert_eq!(disconnect_reason(c.recv5().await), v5::DisconnectReasonCode::KeepAliveTimeout);
    assert!(started.elapsed() >= Duration::from_millis(1400), "{:?}", started.elapsed());
    c.expect_closed().await;
    join(task).await;
}

#[tokio::test]
async fn will_on_abrupt_drop_not_on_clean_disconnect() {
    let h = Harness::new();
    let will = || Some(v5::LastWill::new("dev/status", "offline", Q5::AtLeastOnce, true, None));
    let (c, task, _) = h.connect5("w1", None, will()).await;
    drop(c);
    join(task).await;
    let p = h.core.published();
    assert_eq!(p.len(), 1);
    assert_eq!(
        (p[0].channel.as_str(), &p[0].payload[..], p[0].qos, p[0].retain),
        ("dev/status", &b"offline"[..], Some(1), true)
    );

    let (mut c, task, _) = h.connect5("w2", None, will()).await;
    c.send5(v5::Packet::Disconnect(v5::Disconnect::new(v5::DisconnectReasonCode::NormalDisconnection))).await;
    c.expect_closed().await;
    join(task).await;
    assert_eq!(h.core.published().len(), 1, "a clean DISCONNECT discards the will");

    let (mut c, task, _) = h.connect5("w3", None, will()).await;
    // Written by hand: rumqttc encodes a reason-only DISCONNECT wrongly.
    c.io.write_all(&[0xe0, 0x01, 0x04]).await.unwrap();
    c.expect_closed().await;
    join(task).await;
    assert_eq!(h.core.published().len(), 2, "DISCONNECT 0x04 publishes the will");

    // 3.1.1: an abrupt drop publishes the will too.
    let (mut c, task) = h.start(false);
    let mut p = v4::Connect::new("w4");
    p.last_will = Some(v4::LastWill::new("dev/4", "gone", Q4::AtMostOnce, false));
    c.send4(v4::Packet::Connect(p)).await;
    assert!(matches!(c.recv4().await, v4::Packet::ConnAck(_)));
    drop(c);
    join(task).await;
    assert_eq!(h.core.published().last().map(|p| p.channel.clone()), Some("dev/4".into()));
}

#[tokio::test]
async fn delayed_will_is_cancelled_by_reconnect() {
    let h = Harness::new();
    let props = v5::ConnectProperties { session_expiry_interval: Some(60), ..v5::ConnectProperties::new() };
    let wp = v5::LastWillProperties {
        delay_interval: Some(1),
        payload_format_indicator: None,
        message_expiry_interval: None,
        content_type: None,
        response_topic: None,
        correlation_data: None,
        user_properties: Vec::new(),
    };
    let will = v5::LastWill::new("dev/status", "offline", Q5::AtMostOnce, false, Some(wp));
    let (c, task, _) = h.connect5("d", Some(props.clone()), Some(will.clone())).await;
    drop(c);
    join(task).await;
    // Reconnect before the delay: the will never goes.
    let (c2, task2, _) = h.connect5("d", Some(props.clone()), None).await;
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert!(h.core.published().is_empty());
    drop(c2);
    join(task2).await;

    let (c, task, _) = h.connect5("e", Some(props), Some(will)).await;
    drop(c);
    join(task).await;
    assert!(h.core.published().is_empty(), "delayed");
    let deadline = std::time::Instant::now() + WAIT;
    while h.core.published().is_empty() {
        assert!(std::time::Instant::now() < deadline, "delayed will never published");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn oversize_packet_is_refused_0x95() {
    let h = Harness::with(MqttConfig { max_packet_size: 1024, ..MqttConfig::default() });
    let (mut c, task, ack) = h.connect5("big", None, None).await;
    assert_eq!(ack.properties.and_then(|p| p.max_packet_size), Some(1024));
    // Only the fixed header of a huge packet: refused before the body.
    c.io.write_all(&[0x30, 0x80, 0x80, 0x40]).await.unwrap();
    assert_eq!(disconnect_reason(c.recv5().await), v5::DisconnectReasonCode::PacketTooLarge);
    c.expect_closed().await;
    join(task).await;
    assert!(h.core.published().is_empty());
}

#[tokio::test]
async fn takeover_closes_the_first_connection_with_0x8e() {
    let h = Harness::new();
    let (mut first, task1, _) = h.connect5("same", None, None).await;
    let (second, task2, _) = h.connect5("same", None, None).await;
    assert_eq!(disconnect_reason(first.recv5().await), v5::DisconnectReasonCode::SessionTakenOver);
    first.expect_closed().await;
    join(task1).await;
    drop(second);
    join(task2).await;
}

#[tokio::test]
async fn v5_properties_travel_both_ways() {
    let h = Harness::new();
    let props = v5::ConnectProperties { topic_alias_max: Some(4), ..v5::ConnectProperties::new() };
    let (mut c, task, _) = h.connect5("m", Some(props), None).await;
    let pp = v5::PublishProperties {
        payload_format_indicator: Some(1),
        message_expiry_interval: Some(60),
        topic_alias: Some(1),
        response_topic: Some("reply".into()),
        correlation_data: Some(Bytes::from_static(b"c1")),
        user_properties: vec![("k".into(), "1".into()), ("k".into(), "2".into()), ("id".into(), "abc".into())],
        subscription_identifiers: Vec::new(),
        content_type: Some("text/plain".into()),
    };
    c.send5(v5::Packet::Publish(v5::Publish::new("t/1", Q5::AtMostOnce, "hi", Some(pp.clone())))).await;
    // The alias alone names the topic now.
    let mut p = v5::Publish::new("", Q5::AtMostOnce, "again", Some(pp.clone()));
    p.topic = Bytes::new();
    c.send5(v5::Packet::Publish(p)).await;
    // Invalid UTF-8 with the format indicator is refused with 0x99.
    let mut bad = v5::Publish::new("t/1", Q5::AtLeastOnce, Bytes::from_static(b"\xff"), Some(pp));
    bad.pkid = 4;
    c.send5(v5::Packet::Publish(bad)).await;
    let v5::Packet::PubAck(ack) = c.recv5().await else { panic!() };
    assert_eq!(ack.reason, v5::PubAckReason::PayloadFormatInvalid);
    let got = h.core.published();
    assert_eq!(got.len(), 2);
    assert_eq!(got[1].channel, "t/1");
    let p = &got[0];
    assert_eq!(p.headers.get("k").map(String::as_str), Some("2"), "last duplicate wins");
    assert_eq!(p.id, "abc");
    assert_eq!((p.message_expiry, p.payload_utf8, p.content_type.as_str()), (60, true, "text/plain"));
    assert_eq!((p.response_topic.as_str(), &p.correlation_data[..]), ("reply", &b"c1"[..]));

    // Outbound: subscription id, aliases, properties.
    let sp = v5::SubscribeProperties { id: Some(9), user_properties: vec![("rewind".into(), "30s".into())] };
    c.send5(v5::Packet::Subscribe(v5::Subscribe::new(v5::Filter::new("o/#", Q5::AtMostOnce), Some(sp)))).await;
    assert!(matches!(c.recv5().await, v5::Packet::SubAck(_)));
    assert_eq!(h.core.subscribes.lock()[0].rewind, Some(proto::Rewind { count: 0, duration_ms: 30_000 }));
    let mut env = delivery("o/x", 1, Some(0)).envelope.clone();
    env.content_type = "application/json".into();
    env.headers.insert("h".into(), "v".into());
    h.core.outbox().push(Outbound::Message(Delivery::new(env.clone())), SlowPolicy::Disconnect);
    env.serial = 2;
    h.core.outbox().push(Outbound::Message(Delivery::new(env)), SlowPolicy::Disconnect);
    let v5::Packet::Publish(p) = c.recv5().await else { panic!() };
    let props = p.properties.expect("properties");
    assert_eq!((&p.topic[..], props.topic_alias), (&b"o/x"[..], Some(1)));
    assert_eq!(props.subscription_identifiers, vec![9]);
    assert_eq!(props.content_type.as_deref(), Some("application/json"));
    assert_eq!(props.user_properties, vec![("h".to_string(), "v".to_string())]);
    let v5::Packet::Publish(p) = c.recv5().await else { panic!() };
    assert_eq!((&p.topic[..], p.properties.and_then(|p| p.topic_alias)), (&b""[..], Some(1)));
    drop(c);
    join(task).await;
}

#[tokio::test]
async fn invalid_topic_alias_is_0x94() {
    let h = Harness::new();
    let (mut c, task, _) = h.connect5("a", None, None).await;
    let pp = v5::PublishProperties { topic_alias: Some(7), ..Default::default() };
    let mut p = v5::Publish::new("", Q5::AtMostOnce, "x", Some(pp));
    p.topic = Bytes::new();
    c.send5(v5::Packet::Publish(p)).await;
    assert_eq!(disconnect_reason(c.recv5().await), v5::DisconnectReasonCode::TopicAliasInvalid);
    join(task).await;
}

#[tokio::test]
async fn presence_topics_enter_update_leave_and_deliver_json() {
    let h = Harness::new();
    let (mut c, task, _) = h.connect5("pr", None, None).await;
    c.send5(v5::Packet::Publish(v5::Publish::new("$presence/room", Q5::AtMostOnce, "{\"a\":1}", None))).await;
    c.send5(v5::Packet::Publish(v5::Publish::new("$presence/room", Q5::AtMostOnce, "b", None))).await;
    c.send5(v5::Packet::Publish(v5::Publish::new("$presence/room", Q5::AtMostOnce, "", None))).await;
    c.send5(v5::Packet::Subscribe(v5::Subscribe::new(v5::Filter::new("$presence/room", Q5::AtMostOnce), None))).await;
    assert!(matches!(c.recv5().await, v5::Packet::SubAck(_)));
    let calls: Vec<_> = h.core.calls().into_iter().filter(|c| c.starts_with("presence")).collect();
    assert_eq!(calls, vec!["presence_enter 1 room false", "presence_enter 1 room true", "presence_leave 1 room"]);
    let env = proto::Envelope {
        channel: "$presence/room".into(),
        epoch: "e".into(),
        serial: 1,
        kind: proto::Kind::PresenceEnter as i32,
        payload: Bytes::from_static(b"{\"a\":1}"),
        publisher: Some(proto::Publisher { client_id: "x".into(), connection_id: "c9".into(), ..Default::default() }),
        ..Default::default()
    };
    h.core.outbox().push(Outbound::Message(Delivery::new(env)), SlowPolicy::Disconnect);
    let v5::Packet::Publish(p) = c.recv5().await else { panic!() };
    let json: serde_json::Value = serde_json::from_slice(&p.payload).expect("JSON");
    assert_eq!(json["action"], "enter");
    assert_eq!(json["client_id"], "x");
    assert_eq!(json["connection_id"], "c9");
    assert_eq!(json["data"]["a"], 1);
    drop(c);
    join(task).await;
}

#[tokio::test]
async fn shutdown_sends_0x8b_and_slow_consumer_0x97() {
    let h = Harness::new();
    let (mut c, task, _) = h.connect5("s", None, None).await;
    h.shutdown.send(true).unwrap();
    assert_eq!(disconnect_reason(c.recv5().await), v5::DisconnectReasonCode::ServerShuttingDown);
    join(task).await;

    let h = Harness::new();
    let (mut c, task, _) = h.connect5("s", None, None).await;
    h.core.outbox().close(CloseReason::SLOW);
    assert_eq!(disconnect_reason(c.recv5().await), v5::DisconnectReasonCode::QuotaExceeded);
    join(task).await;
}

#[tokio::test]
async fn mqtt_over_websocket() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::Role;
    let h = Harness::new();
    let (a, b) = tokio::io::duplex(1 << 16);
    let server = WebSocketStream::from_raw_socket(a, Role::Server, None).await;
    let mut client = WebSocketStream::from_raw_socket(b, Role::Client, None).await;
    let core: Arc<dyn Core> = h.core.clone();
    let task = tokio::spawn(serve_ws(
        server,
        core,
        h.sessions.clone() as Arc<dyn SessionStore>,
        h.cfg.clone(),
        None,
        h.shutdown.subscribe(),
    ));
    let mut connect = BytesMut::new();
    v4::Packet::Connect(v4::Connect::new("ws")).write(&mut connect, usize::MAX).unwrap();
    // A packet split over two messages.
    let tail = connect.split_off(5);
    client.send(Message::binary(connect.freeze())).await.unwrap();
    client.send(Message::binary(tail.freeze())).await.unwrap();
    let msg = tokio::time::timeout(WAIT, client.next()).await.unwrap().unwrap().unwrap();
    let Message::Binary(b) = msg else { panic!("{msg:?}") };
    assert_eq!(&b[..], &[0x20, 0x02, 0x00, 0x00], "CONNACK");
    client.send(Message::Close(None)).await.unwrap();
    join(task).await;
}

use tokio_tungstenite::WebSocketStream;

#[tokio::test]
async fn serve_is_send() {
    fn is_send<T: Send>(_: &T) {}
    let h = Harness::new();
    let (server, _client) = tokio::io::duplex(64);
    let core: Arc<dyn Core> = h.core.clone();
    let fut = serve(
        server,
        core,
        h.sessions.clone() as Arc<dyn SessionStore>,
        h.cfg.clone(),
        Peer::default(),
        h.shutdown.subscribe(),
    );
    is_send(&fut);
}

/// An MQTT 5 AUTH packet: `reason`, then the method and data properties.
fn auth_bytes(reason: u8, method: Option<&str>, data: Option<&str>) -> Vec<u8> {
    let mut props = Vec::new();
    for (id, v) in [(0x15u8, method), (0x16, data)] {
        if let Some(v) = v {
            props.push(id);
            props.extend_from_slice(&(v.len() as u16).to_be_bytes());
            props.extend_from_slice(v.as_bytes());
        }
    }
    let mut body = vec![reason, props.len() as u8];
    body.extend(props);
    let mut p = vec![0xF0, body.len() as u8];
    p.extend(body);
    p
}

fn jwt_props(data: Option<&str>) -> v5::ConnectProperties {
    v5::ConnectProperties {
        authentication_method: Some("jwt".into()),
        authentication_data: data.map(|d| Bytes::from(d.to_string())),
        ..v5::ConnectProperties::new()
    }
}

#[tokio::test]
async fn reauthentication_refreshes_the_core_session_and_answers_auth_success() {
    let h = Harness::new();
    let (mut c, task, ack) = h.connect5("dev", Some(jwt_props(Some("t1"))), None).await;
    let props = ack.properties.expect("CONNACK properties");
    assert_eq!(props.authentication_method.as_deref(), Some("jwt"), "the method is named back");
    assert_eq!(h.core.calls()[0], "open dev t1", "the Authentication Data is the token");
    c.send_raw(&auth_bytes(0x19, Some("jwt"), Some("t2"))).await;
    let a = c.recv_auth().await;
    assert_eq!((a.reason, a.method.as_deref()), (0x00, Some("jwt")));
    assert!(h.core.calls().contains(&"refresh 1 t2".to_string()));
    // The session goes on.
    c.send5(v5::Packet::PingReq(v5::PingReq)).await;
    assert!(matches!(c.recv5().await, v5::Packet::PingResp(_)));
    // A refused token ends it: DISCONNECT 0x87.
    c.send_raw(&auth_bytes(0x19, Some("jwt"), Some("bad"))).await;
    assert_eq!(disconnect_reason(c.recv5().await), v5::DisconnectReasonCode::NotAuthorized);
    c.expect_closed().await;
    join(task).await;

    // Without Authentication Data the password is the token.
    let (mut c, task) = h.start(true);
    let connect =
        v5::Connect { keep_alive: 0, client_id: "pw".into(), clean_start: true, properties: Some(jwt_props(None)) };
    c.send5(v5::Packet::Connect(connect, None, Some(v5::Login::new("pw", "t3")))).await;
    assert!(matches!(c.recv5().await, v5::Packet::ConnAck(a) if a.code == v5::ConnectReturnCode::Success));
    assert!(h.core.calls().contains(&"open pw t3".to_string()));
    drop(c);
    join(task).await;
}

#[tokio::test]
async fn reauthentication_refusals_follow_the_table() {
    let h = Harness::new();
    // (CONNECT props, AUTH bytes, DISCONNECT reason)
    let cases = [
        ("AUTH without a method at CONNECT", None, auth_bytes(0x19, Some("jwt"), Some("t")), 0x82),
        ("another method", Some(jwt_props(Some("t"))), auth_bytes(0x19, Some("other"), Some("t")), 0x8C),
        ("no method in AUTH", Some(jwt_props(Some("t"))), auth_bytes(0x19, None, Some("t")), 0x82),
        ("AUTH continue", Some(jwt_props(Some("t"))), auth_bytes(0x18, Some("jwt"), Some("t")), 0x82),
        ("AUTH success from a client", Some(jwt_props(Some("t"))), vec![0xF0, 0x00], 0x82),
    ];
    for (case, props, auth, want) in cases {
        let (mut c, task, _) = h.connect5(case, props, None).await;
        c.send_raw(&auth).await;
        // Read raw: rumqttc's reader does not know DISCONNECT 0x8C.
        let mut raw = Vec::new();
        tokio::time::timeout(WAIT, c.io.read_to_end(&mut raw)).await.expect("not closed").expect("read");
        let _ = c.io.shutdown().await;
        assert_eq!(raw, [0xE0, 0x02, want, 0x00], "{case}: DISCONNECT {want:#04x}, then close");
        join(task).await;
    }
    // At CONNECT: an unknown method (0x8C), data without a method (0x82).
    let scram =
        v5::ConnectProperties { authentication_method: Some("SCRAM-SHA-1".into()), ..v5::ConnectProperties::new() };
    let no_method =
        v5::ConnectProperties { authentication_data: Some(Bytes::from_static(b"t")), ..v5::ConnectProperties::new() };
    for (props, want) in [(scram, 0x8C), (no_method, 0x82)] {
        let (mut c, task) = h.start(true);
        let connect = v5::Connect { keep_alive: 0, client_id: "x".into(), clean_start: true, properties: Some(props) };
        c.send5(v5::Packet::Connect(connect, None, None)).await;
        // Read raw: rumqttc's reader does not know CONNACK 0x8C.
        let mut raw = Vec::new();
        tokio::time::timeout(WAIT, c.io.read_to_end(&mut raw)).await.expect("not closed").expect("read");
        let _ = c.io.shutdown().await;
        assert_eq!(raw, [0x20, 0x03, 0x00, want, 0x00], "CONNACK {want:#04x}, then close");
        join(task).await;
    }
    assert!(!h.core.calls().iter().any(|c| c.starts_with("open x")), "refused before the core is asked");
}

#[tokio::test]
async fn the_core_names_the_client() {
    let h = Harness::new();
    // Asking for another id than the token's is refused (3.1.1: 0x02).
    let (mut c, task) = h.start(false);
    let mut p = v4::Connect::new("victim");
    p.set_login("u", "sub:mallory");
    c.send4(v4::Packet::Connect(p)).await;
    let v4::Packet::ConnAck(ack) = c.recv4().await else { panic!("no CONNACK") };
    assert_eq!(ack.code, v4::ConnectReturnCode::BadClientId);
    c.expect_closed().await;
    join(task).await;
    assert!(h.core.calls().iter().any(|c| c.starts_with("close 1")), "the core session is closed");
    // An empty id becomes the token's (MQTT 5: assigned in CONNACK).
    let (mut c, task) = h.start(true);
    let connect = v5::Connect { keep_alive: 0, client_id: String::new(), clean_start: true, properties: None };
    c.send5(v5::Packet::Connect(connect, None, Some(v5::Login::new("u", "sub:device-7")))).await;
    let v5::Packet::ConnAck(ack) = c.recv5().await else { panic!("no CONNACK") };
    assert_eq!(ack.code, v5::ConnectReturnCode::Success);
    assert_eq!(ack.properties.and_then(|p| p.assigned_client_identifier).as_deref(), Some("device-7"));
    drop(c);
    join(task).await;
}

/// Clients may pipeline: a SUBSCRIBE written together with the CONNECT,
/// before the CONNACK, is answered at once, not at the next read.
#[tokio::test]
async fn packets_pipelined_behind_connect_are_handled_at_once() {
    let h = Harness::new();
    let (mut c, _task) = h.start(false);
    let mut bytes = BytesMut::new();
    let mut p = v4::Connect::new("pipeliner");
    p.keep_alive = 0;
    v4::Packet::Connect(p).write(&mut bytes, usize::MAX).expect("encode");
    v4::Packet::Subscribe(v4::Subscribe::new("a/b", Q4::AtLeastOnce)).write(&mut bytes, usize::MAX).expect("encode");
    c.send_raw(&bytes).await;
    assert!(matches!(c.recv4().await, v4::Packet::ConnAck(_)));
    assert!(matches!(c.recv4().await, v4::Packet::SubAck(_)), "SUBACK without another byte from the client");
}

/// Size of the future `f` returns for a `Conn` (without running it).
fn conn_future_size<S: 'static, Fut>(_f: impl FnOnce(&'static mut Conn<S>) -> Fut) -> usize {
    std::mem::size_of::<Fut>()
}

/// An idle connection's memory is mostly its task, and a task is as large
/// as its largest state: the connect phase and packet handling are boxed
/// so that the wait in the session loop stays small, and what most
/// connections never use (a will, topic aliases) is boxed on demand, the
/// configuration shared. (Bounds with headroom for compiler differences; a
/// regression that inlines the connect phase again roughly doubles the
/// size. 1 736 bytes before the will, aliases and configuration moved out.)
#[test]
fn an_open_connection_task_stays_small() {
    let h = Harness::new();
    let (server, _client) = tokio::io::duplex(64);
    let core: Arc<dyn Core> = h.core.clone();
    let fut = serve(
        server,
        core,
        h.sessions.clone() as Arc<dyn SessionStore>,
        h.cfg.clone(),
        Peer::default(),
        h.shutdown.subscribe(),
    );
    let task = std::mem::size_of_val(&fut);
    let run = conn_future_size::<DuplexStream, _>(|c| c.run());
    let conn = std::mem::size_of::<Conn<DuplexStream>>();
    assert!(run <= 640, "the session loop's future is {run} bytes");
    assert!(task <= conn + run + 256, "the task is {task} bytes (Conn {conn}, loop {run})");
    assert!(task <= 1536, "the task is {task} bytes");
}
