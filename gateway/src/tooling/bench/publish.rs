//! `publish`: acknowledged publishes, closed loop. P publisher connections
//! each keep up to W publishes outstanding for the run's duration, and every
//! publish is timed from the moment it is handed to its connection until its
//! acknowledgement is read:
//!
//! | `--proto` | a publish | its acknowledgement |
//! |---|---|---|
//! | `ws` | a `publish` frame (`switchboard.v1.proto`), `req` = its ticket | `publish_ack` (or `error`) carrying that `req` |
//! | `mqtt` | an MQTT 5 PUBLISH at QoS 1 (rumqttc) | the PUBACK of its packet id; reason ≥ 0x80 is a refusal |
//! | `rest` | `POST /v1/channels/{channel}/messages` on a keep-alive connection | the response: 2xx accepted, anything else refused |
//! | `nats-js` | `PUB subject reply payload` into a JetStream stream | the stream's JSON ack on the reply subject |
//!
//! HTTP/1.1 gives a client no way to keep several requests outstanding on
//! one connection (clients do not pipeline), so a REST publisher with window
//! W holds W keep-alive connections, one request outstanding on each.
//!
//! Closed loop on purpose, unlike `fanout`: the question is how many
//! publishes a server acknowledges per second and what an acknowledgement
//! costs it, not the latency at a given rate. So there is no schedule and no
//! schedule lag; with W = 1 a publisher measures one round trip at a time.
//! The bookkeeping ([`AckWindow`]) takes times as arguments and is tested
//! without sockets. What this scenario does not do: subscribe, or check
//! that the acknowledged messages can be read back.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures_util::stream::{FuturesUnordered, SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use switchboard_proto::server_frame;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use super::clients::{self, Target};
use super::fanout::Clock;
use super::histogram;
use super::nats::{self, NatsJsPub};
use super::payload::{self, Stamp};
use super::procfs::{self, ProcSample, ServerProbe};
use super::report::Report;
use super::{AckProto, BenchError, CommonArgs, PublishArgs};

/// How long one acknowledgement may take while publishing; a publisher
/// whose ack is later gives up (the run then reports it as a client error).
const ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// JetStream stream limits: the gateway's history defaults
/// (`[channels] history_size`, `history_ttl`).
const JS_MAX_MSGS_PER_SUBJECT: u64 = 1000;
const JS_MAX_AGE: Duration = Duration::from_secs(600);

/// Publishes one connection has sent and not yet seen answered: the send
/// time of each, by its ticket (the number its ack carries back: a
/// WebSocket `req`, a NATS reply subject's last token; MQTT maps packet ids
/// to tickets). At most `limit` at a time.
#[derive(Debug)]
pub struct AckWindow {
    limit: usize,
    /// Send time (ns on the run's clock) by ticket.
    waiting: HashMap<u64, u64>,
}

/// Bookkeeping a connection's acks do not fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    /// The window is full: wait for an ack first.
    #[error("{0} publishes already outstanding")]
    Full(usize),
    /// The ticket is already outstanding.
    #[error("ticket {0} is already outstanding")]
    InFlight(u64),
    /// An ack for a ticket that is not outstanding (never sent, or answered twice).
    #[error("an ack for ticket {0}, which is not outstanding")]
    Unknown(u64),
}

impl AckWindow {
    /// A window of `limit` publishes (at least one).
    pub fn new(limit: usize) -> AckWindow {
        let limit = limit.max(1);
        AckWindow { limit, waiting: HashMap::with_capacity(limit) }
    }

    /// Publishes that may be sent before the next ack.
    pub fn room(&self) -> usize {
        self.limit - self.waiting.len()
    }

    /// Publishes outstanding.
    pub fn outstanding(&self) -> usize {
        self.waiting.len()
    }

    /// `ticket` was sent at `now_ns`.
    pub fn sent(&mut self, ticket: u64, now_ns: u64) -> Result<(), AckError> {
        if self.waiting.len() >= self.limit {
            return Err(AckError::Full(self.limit));
        }
        match self.waiting.entry(ticket) {
            std::collections::hash_map::Entry::Occupied(_) => Err(AckError::InFlight(ticket)),
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(now_ns);
                Ok(())
            }
        }
    }

    /// `ticket` was answered at `now_ns`: frees its place and returns its
    /// latency in µs.
    pub fn answered(&mut self, ticket: u64, now_ns: u64) -> Result<u64, AckError> {
        let sent = self.waiting.remove(&ticket).ok_or(AckError::Unknown(ticket))?;
        Ok(now_ns.saturating_sub(sent) / 1000)
    }
}

/// What the server answered to one publish: `Err` holds its refusal.
type Answer = Result<(), String>;

/// The MQTT 5 PUBACK reasons that mean "accepted" (below 0x80).
fn puback_accepted(reason: rumqttc::v5::mqttbytes::v5::PubAckReason) -> bool {
    use rumqttc::v5::mqttbytes::v5::PubAckReason;
    matches!(reason, PubAckReason::Success | PubAckReason::NoMatchingSubscribers)
}

/// An MQTT 5 publisher. rumqttc numbers publishes itself (packet ids) and
/// writes them in the order they were handed over; it reports each write
/// as `Outgoing::Publish(pkid)`, so the tickets handed over and not yet
/// written (`queued`, in order) become `by_pkid` entries at that event.
struct MqttAcked {
    client: rumqttc::v5::AsyncClient,
    events: rumqttc::v5::EventLoop,
    queued: VecDeque<u64>,
    by_pkid: HashMap<u16, u64>,
}

/// One REST request outstanding: its ticket, the lane's client (given back
/// when it ends) and the response status.
type RestCall =
    futures_util::future::BoxFuture<'static, (u64, reqwest::Client, Result<reqwest::StatusCode, BenchError>)>;

/// A REST publisher: W lanes, one keep-alive connection each (a client of
/// its own), one request outstanding per lane.
struct RestLanes {
    idle: Vec<reqwest::Client>,
    running: FuturesUnordered<RestCall>,
}

/// One publisher connection of any protocol. `targets[c]` is channel `c`
/// as the protocol names it: a channel name (WebSocket, MQTT), a publish
/// URL (REST), a subject (NATS).
enum AckConn {
    Ws { sink: SplitSink<clients::Ws, Message>, stream: SplitStream<clients::Ws> },
    Mqtt(Box<MqttAcked>),
    Rest(RestLanes),
    NatsJs(Box<NatsJsPub>),
}

impl AckConn {
    /// Connects publisher `id` (REST: makes its W clients; they connect on
    /// their first request).
    async fn open(proto: AckProto, t: &Target, id: &str, window: usize) -> Result<AckConn, BenchError> {
        match proto {
            AckProto::Ws => {
                let (sink, stream) = clients::ws_open(t, id).await?.split();
                Ok(AckConn::Ws { sink, stream })
            }
            AckProto::Mqtt => {
                use rumqttc::v5::{Event, Incoming};
                // rumqttc's own in-flight bound stays above the window, so
                // the window alone decides what is outstanding; its request
                // queue holds a whole window.
                let opts = clients::mqtt_options(t, id, 0, clients::MQTT_PUB_INFLIGHT)?;
                let (client, mut events) = rumqttc::v5::AsyncClient::new(opts, window.max(16));
                clients::mqtt_wait(&mut events, |ev| Ok(matches!(ev, Event::Incoming(Incoming::ConnAck(_))))).await?;
                Ok(AckConn::Mqtt(Box::new(MqttAcked {
                    client,
                    events,
                    queued: VecDeque::with_capacity(window),
                    by_pkid: HashMap::with_capacity(window),
                })))
            }
            AckProto::Rest => {
                let idle = (0..window).map(|_| clients::http_client(t)).collect::<Result<Vec<_>, _>>()?;
                Ok(AckConn::Rest(RestLanes { idle, running: FuturesUnordered::new() }))
            }
            AckProto::NatsJs => {
                // The inbox token: the client id without its dashes.
                let token: String = id.chars().filter(char::is_ascii_alphanumeric).collect();
                Ok(AckConn::NatsJs(Box::new(NatsJsPub::open(t, id, &token).await?)))
            }
        }
    }

    /// Hands one publish to the connection (written at the next `flush`,
    /// or by the MQTT event loop).
    async fn send(&mut self, ticket: u64, target: &str, payload: Vec<u8>) -> Result<(), BenchError> {
        match self {
            AckConn::Ws { sink, .. } => Ok(sink.feed(clients::publish_frame(target, payload, ticket)).await?),
            AckConn::Mqtt(m) => {
                m.client
                    .try_publish(target, rumqttc::v5::mqttbytes::QoS::AtLeastOnce, false, payload)
                    .map_err(|e| BenchError::Protocol(format!("MQTT: {e}")))?;
                m.queued.push_back(ticket);
                Ok(())
            }
            AckConn::Rest(r) => {
                let client = r.idle.pop().ok_or_else(|| BenchError::Protocol("no idle REST lane".into()))?;
                let url = target.to_string();
                r.running.push(Box::pin(async move {
                    let status = clients::rest_post(&client, &url, payload).await;
                    (ticket, client, status)
                }));
                Ok(())
            }
            AckConn::NatsJs(n) => {
                n.queue(ticket, target, &payload);
                Ok(())
            }
        }
    }

    /// Writes what `send` queued.
    async fn flush(&mut self) -> Result<(), BenchError> {
        match self {
            AckConn::Ws { sink, .. } => Ok(sink.flush().await?),
            AckConn::NatsJs(n) => n.flush().await,
            AckConn::Mqtt(_) | AckConn::Rest(_) => Ok(()),
        }
    }

    /// Waits for the next answer to a publish: its ticket and what it said.
    /// An error means the connection is unusable.
    async fn next_answer(&mut self) -> Result<(u64, Answer), BenchError> {
        match self {
            AckConn::Ws { stream, .. } => loop {
                let Some(f) = clients::ws_recv(stream).await? else {
                    return Err(BenchError::Protocol("WebSocket closed".into()));
                };
                match f.frame {
                    Some(server_frame::Frame::PublishAck(_)) => return Ok((f.req, Ok(()))),
                    Some(server_frame::Frame::Error(e)) if f.req != 0 => {
                        return Ok((f.req, Err(format!("{}: {}", e.code().slug(), e.message))));
                    }
                    Some(server_frame::Frame::Disconnect(d)) => {
                        return Err(BenchError::Protocol(format!("disconnected: {} {}", d.code, d.reason)));
                    }
                    _ => {}
                }
            },
            AckConn::Mqtt(m) => loop {
                use rumqttc::v5::{Event, Incoming};
                match m.events.poll().await.map_err(|e| BenchError::Protocol(format!("MQTT: {e}")))? {
                    Event::Outgoing(rumqttc::Outgoing::Publish(pkid)) => {
                        let ticket = m.queued.pop_front().ok_or_else(|| {
                            BenchError::Protocol(format!("MQTT: publish {pkid} written, none handed over"))
                        })?;
                        m.by_pkid.insert(pkid, ticket);
                    }
                    Event::Incoming(Incoming::PubAck(ack)) => {
                        let Some(ticket) = m.by_pkid.remove(&ack.pkid) else {
                            // Not outstanding: the window reports it as unexpected.
                            return Ok((u64::MAX, Ok(())));
                        };
                        let answer =
                            if puback_accepted(ack.reason) { Ok(()) } else { Err(format!("PUBACK {:?}", ack.reason)) };
                        return Ok((ticket, answer));
                    }
                    Event::Incoming(Incoming::Disconnect(d)) => {
                        return Err(BenchError::Protocol(format!("MQTT DISCONNECT {:?}", d.reason_code)));
                    }
                    _ => {}
                }
            },
            AckConn::Rest(r) => {
                let Some((ticket, client, status)) = r.running.next().await else {
                    return Err(BenchError::Protocol("no REST request outstanding".into()));
                };
                r.idle.push(client);
                match status? {
                    s if s.is_success() => Ok((ticket, Ok(()))),
                    s => Ok((ticket, Err(format!("HTTP {s}")))),
                }
            }
            AckConn::NatsJs(n) => {
                let (ticket, ack) = n.next_ack().await?;
                Ok((ticket, ack.map(|_| ()).map_err(|e| e.to_string())))
            }
        }
    }

    /// Closes (bounded); errors here are not the server's to count.
    async fn close(self) {
        let bound = Duration::from_secs(2);
        match self {
            AckConn::Ws { mut sink, .. } => {
                let _ = tokio::time::timeout(bound, sink.close()).await;
            }
            AckConn::Mqtt(mut m) => {
                use rumqttc::v5::Event;
                if m.client.disconnect().await.is_ok() {
                    let _ = tokio::time::timeout(
                        bound,
                        clients::mqtt_wait(&mut m.events, |ev| {
                            Ok(matches!(ev, Event::Outgoing(rumqttc::Outgoing::Disconnect)))
                        }),
                    )
                    .await;
                }
            }
            AckConn::Rest(_) => {}
            AckConn::NatsJs(n) => n.close().await,
        }
    }
}

/// What one publisher hands back.
struct PubOutcome {
    sent: u64,
    acked: u64,
    refused: u64,
    unacked: u64,
    unexpected: u64,
    first_refusal: Option<String>,
    /// Why the publisher stopped early, if it did.
    error: Option<String>,
    /// Ack latencies of accepted publishes, µs.
    latency: Histogram<u64>,
}

/// Keeps the window full until `end`, then collects the outstanding acks
/// (until `end + drain` at most).
#[allow(clippy::too_many_arguments)] // one call site; a struct would only rename these
async fn drive(
    mut conn: AckConn,
    id: u32,
    targets: Arc<Vec<String>>,
    size: usize,
    window: usize,
    clock: Clock,
    end: Instant,
    drain: Duration,
) -> PubOutcome {
    let mut out = PubOutcome {
        sent: 0,
        acked: 0,
        refused: 0,
        unacked: 0,
        unexpected: 0,
        first_refusal: None,
        error: None,
        latency: histogram::new_histogram(),
    };
    let mut w = AckWindow::new(window);
    let mut channel = id as usize % targets.len();
    'run: loop {
        let publishing = Instant::now() < end;
        if publishing && w.room() > 0 {
            while w.room() > 0 {
                // Tickets count from 1: a WebSocket `req` of 0 marks a pushed frame.
                let (ticket, now) = (out.sent + 1, clock.now_ns());
                let body = payload::encode(Stamp { sched_ns: now, publisher: id, seq: ticket }, size);
                // Cannot fail: the window has room and tickets only grow.
                let _ = w.sent(ticket, now);
                if let Err(e) = conn.send(ticket, &targets[channel], body).await {
                    out.error = Some(e.to_string());
                    break 'run;
                }
                out.sent += 1;
                channel = (channel + 1) % targets.len();
            }
            if let Err(e) = conn.flush().await {
                out.error = Some(e.to_string());
                break;
            }
        }
        if w.outstanding() == 0 {
            break;
        }
        let deadline = if publishing { Instant::now() + ACK_TIMEOUT } else { end + drain };
        match tokio::time::timeout_at(deadline, conn.next_answer()).await {
            Ok(Ok((ticket, answer))) => match w.answered(ticket, clock.now_ns()) {
                Ok(us) => match answer {
                    Ok(()) => {
                        out.acked += 1;
                        out.latency.saturating_record(us.max(1));
                    }
                    Err(why) => {
                        out.refused += 1;
                        out.first_refusal.get_or_insert(why);
                    }
                },
                Err(_) => out.unexpected += 1,
            },
            Ok(Err(e)) => {
                out.error = Some(e.to_string());
                break;
            }
            Err(_) => {
                let waited = if publishing { ACK_TIMEOUT } else { drain };
                out.error = Some(format!("{} publishes unanswered after {waited:?}", w.outstanding()));
                break;
            }
        }
    }
    out.unacked = w.outstanding() as u64;
    conn.close().await;
    out
}

/// Connections a run opens (a REST publisher holds one per window slot).
pub fn connections(proto: AckProto, load: &PublishArgs) -> u64 {
    let per_publisher = if proto == AckProto::Rest { u64::from(load.window) } else { 1 };
    u64::from(load.publishers) * per_publisher
}

/// Runs `publish`.
pub async fn run(proto: AckProto, load: &PublishArgs, common: &CommonArgs) -> anyhow::Result<Report> {
    if load.publishers == 0 || load.channels == 0 {
        anyhow::bail!("--publishers and --channels must be positive");
    }
    let conns = connections(proto, load);
    if conns > common.max_conns {
        anyhow::bail!("{conns} connections exceed --max-conns {}", common.max_conns);
    }
    let window = load.window as usize;
    let mut probe = ServerProbe::prepare(common).await.context("server probe")?;
    let target = common.target(&[]).await?;
    let run_id: u32 = rand::random();
    let prefix = format!("bench/{run_id:08x}");
    let channels: Vec<String> = (0..load.channels).map(|c| format!("{prefix}/{c}")).collect();
    let targets: Arc<Vec<String>> = Arc::new(match proto {
        AckProto::Ws | AckProto::Mqtt => channels,
        AckProto::Rest => channels.iter().map(|c| clients::publish_url(&target.http_base(), c)).collect(),
        AckProto::NatsJs => channels.iter().map(|c| nats::subject_for(c)).collect(),
    });

    let mut publishers = Vec::with_capacity(load.publishers as usize);
    for p in 0..load.publishers {
        let id = format!("bench-{run_id:08x}-p{p}");
        let conn = AckConn::open(proto, &target, &id, window)
            .await
            .with_context(|| format!("publisher {p} could not connect"))?;
        publishers.push(conn);
    }
    if let Some(AckConn::NatsJs(first)) = publishers.first_mut() {
        let config = nats::stream_config(&load.stream, "bench.>", JS_MAX_MSGS_PER_SUBJECT, JS_MAX_AGE);
        first.create_stream(&config).await.context("JetStream stream")?;
    }

    // The measured window starts here.
    probe.open().await.context("server probe")?;
    let self_before = ProcSample::read("self");
    let clock = Clock::new();
    let end = Instant::now() + load.duration;
    let tasks: Vec<_> = publishers
        .into_iter()
        .enumerate()
        .map(|(p, conn)| {
            tokio::spawn(drive(conn, p as u32, targets.clone(), load.size, window, clock, end, common.drain))
        })
        .collect();
    let mut outcomes = Vec::with_capacity(tasks.len());
    for t in tasks {
        outcomes.push(t.await.context("publisher task")?);
    }
    let window_ns = clock.now_ns().max(1);
    let server = probe.close().await;
    let self_after = ProcSample::read("self");

    let mut latency = histogram::new_histogram();
    let (mut sent, mut acked, mut refused, mut unacked, mut unexpected) = (0, 0, 0, 0, 0);
    let (mut first_refusal, mut errors) = (None, Vec::new());
    for o in outcomes {
        histogram::merge_into(&mut latency, &o.latency);
        sent += o.sent;
        acked += o.acked;
        refused += o.refused;
        unacked += o.unacked;
        unexpected += o.unexpected;
        if first_refusal.is_none() {
            first_refusal = o.first_refusal;
        }
        errors.extend(o.error);
    }
    let window_secs = window_ns as f64 / 1e9;
    let mut r = Report {
        scenario: "publish".into(),
        sub_proto: "-".into(),
        pub_proto: proto.name().into(),
        window_secs,
        connections: conns,
        publishers: u64::from(load.publishers),
        published: sent,
        publishes_per_sec: sent as f64 / window_secs,
        channel_prefix: Some(prefix),
        window: Some(u64::from(load.window)),
        acked: Some(acked),
        acked_per_sec: Some(acked as f64 / window_secs),
        refused: Some(refused),
        unacked: Some(unacked),
        unexpected,
        client_errors: errors.len() as u64,
        ..Default::default()
    };
    r.set_latency(histogram::summarize(&latency));
    r.set_server_figures(server);
    // RSS growth here is stored history, not connections.
    r.rss_per_conn_bytes = None;
    r.set_validity(procfs::delta(&self_before, &self_after).cpu_us, window_ns / 1000, super::worker_threads());
    if refused > 0 {
        r.problems.push(format!("{refused} publishes REFUSED (first: {})", first_refusal.unwrap_or_default()));
    }
    if unacked > 0 {
        r.problems.push(format!("{unacked} publishes never answered"));
    }
    if unexpected > 0 {
        r.problems.push(format!("{unexpected} acks for publishes not outstanding"));
    }
    if let Some(first) = errors.first() {
        r.problems.push(format!("{} publishers stopped early (first: {first})", errors.len()));
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_bounds_what_is_outstanding_and_times_each_ack() {
        let mut w = AckWindow::new(3);
        assert_eq!((w.room(), w.outstanding()), (3, 0));
        // Three sent 1 µs apart; the window is then full.
        for t in 0..3 {
            assert_eq!(w.sent(t, 1_000 * t), Ok(()));
        }
        assert_eq!(w.room(), 0);
        assert_eq!(w.sent(3, 5_000), Err(AckError::Full(3)));
        // Acks in any order, each timed from its own send.
        assert_eq!(w.answered(1, 11_000), Ok(10));
        assert_eq!(w.answered(0, 20_000), Ok(20));
        assert_eq!((w.room(), w.outstanding()), (2, 1));
        // An ack twice, or for a ticket never sent, is not counted as an ack.
        assert_eq!(w.answered(1, 30_000), Err(AckError::Unknown(1)));
        assert_eq!(w.answered(u64::MAX, 30_000), Err(AckError::Unknown(u64::MAX)));
        // A ticket still outstanding cannot be sent again.
        assert_eq!(w.sent(2, 31_000), Err(AckError::InFlight(2)));
        assert_eq!(w.sent(3, 31_000), Ok(()));
        // A clock read out of order never makes a negative latency.
        assert_eq!(w.answered(3, 30_000), Ok(0));
        assert_eq!(w.answered(2, 2_000_000), Ok(1_998));
        assert_eq!(w.outstanding(), 0);
        // Window 0 is window 1: strictly one at a time.
        let mut one = AckWindow::new(0);
        assert_eq!(one.sent(0, 0), Ok(()));
        assert_eq!(one.sent(1, 0), Err(AckError::Full(1)));
    }

    #[test]
    fn puback_reasons() {
        use rumqttc::v5::mqttbytes::v5::PubAckReason;
        assert!(puback_accepted(PubAckReason::Success));
        // 0x10: accepted, just nobody listening (a publisher-only bench channel).
        assert!(puback_accepted(PubAckReason::NoMatchingSubscribers));
        for refused in [PubAckReason::QuotaExceeded, PubAckReason::NotAuthorized, PubAckReason::UnspecifiedError] {
            assert!(!puback_accepted(refused), "{refused:?}");
        }
    }

    #[test]
    fn rest_holds_a_connection_per_window_slot() {
        let load = PublishArgs {
            publishers: 4,
            window: 16,
            channels: 100,
            size: 200,
            duration: Duration::from_secs(1),
            stream: "S".into(),
        };
        assert_eq!(connections(AckProto::Rest, &load), 64);
        for p in [AckProto::Ws, AckProto::Mqtt, AckProto::NatsJs] {
            assert_eq!(connections(p, &load), 4, "{p:?}");
        }
    }
}
