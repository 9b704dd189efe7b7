//! `fanout` and `cross`: open-loop publishing on a fixed schedule to C
//! channels with M subscribers each, with latency measured against the
//! scheduled send time.
//!
//! A pacer thread (an OS thread, because tokio timers have 1 ms resolution
//! and round every deadline up) hands each publisher the messages that are
//! due: message k of the run is scheduled at `start + k / rate`, goes to
//! publisher `k % P`, and each publisher round-robins over the channels. A
//! publisher that falls behind sends late, and that lateness lands in the
//! latency of every delivery (no coordinated omission) and in the schedule
//! lag histogram (which can mark the run INVALID). Publishers send one
//! message at a time, so a publisher's messages reach the gateway in order
//! and any reordering seen is the gateway's.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use futures_util::StreamExt;
use prost::Message as _;
use switchboard_proto::server_frame;
use tokio::sync::{Semaphore, mpsc, watch};

use super::accounting::{SeqTracker, Tally};
use super::clients::{self, Target};
use super::histogram::{self, LocalBuffer, ShardedHistogram};
use super::nats::{NatsPub, NatsSub};
use super::nchan;
use super::procfs::{self, ProcSample, ServerProbe};
use super::report::Report;
use super::{BenchError, CommonArgs, Flavour, LoadArgs, MqttVersion, Proto};

/// Connections opened at the same time during setup (a bound on SYN bursts).
const SETUP_CONCURRENCY: usize = 256;
/// Queued ticks per publisher before the pacer waits (the schedule still
/// stands: waiting only shows up as lag).
const TICK_QUEUE: usize = 65_536;

/// The run's time base: every timestamp is ns since this instant.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    base: Instant,
}

impl Clock {
    /// A clock starting now.
    pub fn new() -> Clock {
        Clock { base: Instant::now() }
    }

    /// ns since the base.
    pub fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

/// One message a publisher must send.
#[derive(Debug, Clone, Copy)]
struct Tick {
    sched_ns: u64,
    channel: u32,
    seq: u64,
}

/// What subscribers share.
pub(crate) struct Shared {
    pub(crate) clock: Clock,
    pub(crate) latency: ShardedHistogram,
    pub(crate) received: AtomicU64,
}

/// A subscriber connection of any protocol, already subscribed.
pub(crate) enum SubConn {
    // Boxed: the socket state is large and the enum is moved into tasks.
    Ws(Box<clients::Ws>),
    Sse(clients::SseEvents),
    Poll {
        client: reqwest::Client,
        base: String,
        channel: String,
        cursor: String,
    },
    Mqtt {
        _client: rumqttc::v5::AsyncClient,
        events: Box<rumqttc::v5::EventLoop>,
    },
    Mqtt3 {
        _client: rumqttc::AsyncClient,
        events: Box<rumqttc::EventLoop>,
    },
    Nats(Box<NatsSub>),
    Wt(Box<super::wt::WtSub>),
    NchanSse(clients::SseEvents),
    /// `first` is the first poll, already in flight when `open` returns (it
    /// only answers once a message is published).
    NchanPoll {
        client: reqwest::Client,
        url: String,
        cursor: Option<nchan::Cursor>,
        first: Option<tokio::task::JoinHandle<NchanPollResult>>,
    },
}

/// What one Nchan long poll returns: messages and the next cursor.
type NchanPollResult = Result<(Vec<Bytes>, Option<nchan::Cursor>), BenchError>;

impl SubConn {
    /// Connects and subscribes to `channel`.
    pub(crate) async fn open(
        proto: Proto,
        t: &Target,
        channel: &str,
        id: &str,
        qos: u8,
    ) -> Result<SubConn, BenchError> {
        match proto {
            Proto::Ws => {
                let mut ws = clients::ws_open(t, id).await?;
                clients::ws_subscribe(&mut ws, channel, None).await?;
                Ok(SubConn::Ws(Box::new(ws)))
            }
            Proto::Sse if t.flavour == Flavour::Nchan => {
                let client = clients::http_client(t)?;
                Ok(SubConn::NchanSse(nchan::sse_open(&client, &t.http_base(), channel).await?))
            }
            Proto::Sse => {
                let client = clients::http_client(t)?;
                let (events, _) = clients::sse_open(&client, &t.http_base(), channel, None).await?;
                Ok(SubConn::Sse(events))
            }
            Proto::Poll if t.flavour == Flavour::Nchan => {
                let client = clients::http_client(t)?;
                let url = nchan::sub_url(&t.http_base(), channel);
                let first = {
                    let (client, url) = (client.clone(), url.clone());
                    tokio::spawn(async move { nchan::poll_once(&client, &url, None).await })
                };
                Ok(SubConn::NchanPoll { client, url, cursor: None, first: Some(first) })
            }
            Proto::Poll => {
                let client = clients::http_client(t)?;
                let base = t.http_base();
                // A first poll that returns at once fixes the stream's start:
                // its cursor replays everything published after it.
                let (_, cursor) = clients::poll_once(&client, &base, channel, None, 0).await?;
                Ok(SubConn::Poll { client, base, channel: channel.into(), cursor })
            }
            Proto::Mqtt if t.mqtt_version == MqttVersion::V3 => {
                let (client, events) = clients::mqtt3_subscribe(t, id, channel, qos).await?;
                Ok(SubConn::Mqtt3 { _client: client, events: Box::new(events) })
            }
            Proto::Mqtt => {
                let (client, events) = clients::mqtt_subscribe(t, id, channel, qos, 0).await?;
                Ok(SubConn::Mqtt { _client: client, events: Box::new(events) })
            }
            Proto::Nats | Proto::NatsWs => {
                Ok(SubConn::Nats(Box::new(NatsSub::open(proto == Proto::NatsWs, t, channel, id).await?)))
            }
            Proto::Wt => Ok(SubConn::Wt(Box::new(super::wt::WtSub::open(t.wt()?, channel, id, None).await?.0))),
            Proto::Rest => {
                Err(BenchError::Usage("rest cannot subscribe (use ws, wt, mqtt, sse, poll, nats or nats-ws)".into()))
            }
        }
    }

    /// Waits for the next payload(s); `Ok(false)` when the connection ended.
    pub(crate) async fn next(&mut self, out: &mut Vec<Bytes>) -> Result<bool, BenchError> {
        match self {
            SubConn::Ws(ws) => match clients::ws_recv_raw(ws.as_mut()).await? {
                None => Ok(false),
                Some(raw) => {
                    // Fast path: a pushed message's payload, sliced out without decoding the envelope.
                    if let Some(p) = clients::message_payload(&raw) {
                        out.push(p);
                        return Ok(true);
                    }
                    let f =
                        switchboard_proto::ServerFrame::decode(raw).map_err(|e| BenchError::Protocol(e.to_string()))?;
                    match f.frame {
                        Some(server_frame::Frame::Message(env)) => out.push(env.payload),
                        Some(server_frame::Frame::Gap(g)) => {
                            return Err(BenchError::Protocol(format!("gap on {}: {}", g.channel, g.reason)));
                        }
                        Some(server_frame::Frame::Disconnect(d)) => {
                            return Err(BenchError::Protocol(format!("disconnected: {} {}", d.code, d.reason)));
                        }
                        _ => {}
                    }
                    Ok(true)
                }
            },
            SubConn::Sse(events) => match events.next().await {
                None => Ok(false),
                Some(Err(e)) => Err(BenchError::Protocol(format!("SSE: {e}"))),
                Some(Ok(ev)) => {
                    if ev.event == "gap" || ev.event == "disconnect" {
                        return Err(BenchError::Protocol(format!("SSE {}: {}", ev.event, ev.data)));
                    }
                    if let Some(p) = clients::sse_payload(&ev)? {
                        out.push(p);
                    }
                    Ok(true)
                }
            },
            SubConn::Poll { client, base, channel, cursor } => {
                let (payloads, next) = clients::poll_once(client, base, channel, Some(cursor), 5).await?;
                out.extend(payloads);
                *cursor = next;
                Ok(true)
            }
            SubConn::Mqtt { events, .. } => {
                use rumqttc::v5::{Event, Incoming};
                match events.poll().await {
                    Ok(Event::Incoming(Incoming::Publish(p))) => {
                        out.push(p.payload);
                        Ok(true)
                    }
                    Ok(Event::Incoming(Incoming::Disconnect(d))) => {
                        Err(BenchError::Protocol(format!("MQTT DISCONNECT {:?}", d.reason_code)))
                    }
                    Ok(_) => Ok(true),
                    Err(e) => Err(BenchError::Protocol(format!("MQTT: {e}"))),
                }
            }
            SubConn::Mqtt3 { events, .. } => {
                use rumqttc::{Event, Incoming};
                match events.poll().await {
                    Ok(Event::Incoming(Incoming::Publish(p))) => {
                        out.push(p.payload);
                        Ok(true)
                    }
                    Ok(Event::Incoming(Incoming::Disconnect)) => Err(BenchError::Protocol("MQTT DISCONNECT".into())),
                    Ok(_) => Ok(true),
                    Err(e) => Err(BenchError::Protocol(format!("MQTT: {e}"))),
                }
            }
            SubConn::Nats(n) => n.next(out).await,
            SubConn::Wt(w) => w.next(out).await,
            SubConn::NchanSse(events) => match events.next().await {
                None => Ok(false),
                Some(Err(e)) => Err(BenchError::Protocol(format!("Nchan SSE: {e}"))),
                Some(Ok(ev)) => {
                    out.extend(nchan::sse_payload(&ev));
                    Ok(true)
                }
            },
            SubConn::NchanPoll { client, url, cursor, first } => {
                let (payloads, next) = match first {
                    Some(handle) => {
                        let r = handle.await.map_err(|e| BenchError::Protocol(format!("Nchan first poll: {e}")))?;
                        *first = None;
                        r?
                    }
                    None => nchan::poll_once(client, url, cursor.as_ref()).await?,
                };
                out.extend(payloads);
                *cursor = next;
                Ok(true)
            }
        }
    }
}

/// What a subscriber task hands back.
pub(crate) struct SubOutcome {
    pub(crate) channel: u32,
    pub(crate) trackers: Vec<SeqTracker>,
    pub(crate) malformed: u64,
    pub(crate) error: Option<String>,
}

/// Receives until `stop`, accounting every payload.
pub(crate) async fn receive(
    mut conn: SubConn,
    key: usize,
    channel: u32,
    publishers: usize,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> SubOutcome {
    let mut out = SubOutcome { channel, trackers: vec![SeqTracker::default(); publishers], malformed: 0, error: None };
    let mut lat = LocalBuffer::new(key);
    let mut batch = Vec::new();
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            r = conn.next(&mut batch) => {
                let now = shared.clock.now_ns();
                if !batch.is_empty() {
                    // One shared-counter update per batch, not per message.
                    shared.received.fetch_add(batch.len() as u64, Ordering::Relaxed);
                }
                for p in batch.drain(..) {
                    match super::payload::decode(&p) {
                        Some(s) if (s.publisher as usize) < publishers => {
                            lat.record(&shared.latency, now.saturating_sub(s.sched_ns) / 1000);
                            out.trackers[s.publisher as usize].observe(s.seq);
                        }
                        _ => out.malformed += 1,
                    }
                }
                match r {
                    Ok(true) => {}
                    Ok(false) => {
                        out.error = Some("connection closed".into());
                        break;
                    }
                    Err(e) => {
                        out.error = Some(e.to_string());
                        break;
                    }
                }
            }
        }
    }
    lat.flush(&shared.latency);
    out
}

/// A publisher connection of any protocol.
pub(crate) enum PubConn {
    Ws(clients::WsPublisher),
    Mqtt { client: rumqttc::v5::AsyncClient, qos: u8, driver: tokio::task::JoinHandle<u64> },
    Mqtt3 { client: rumqttc::AsyncClient, qos: u8, driver: tokio::task::JoinHandle<u64> },
    Rest { client: reqwest::Client, base: String },
    Nchan { client: reqwest::Client, base: String },
    Nats(NatsPub),
    Wt(super::wt::WtPub),
}

impl PubConn {
    /// Connects a publisher.
    pub(crate) async fn open(proto: Proto, t: &Target, id: &str, qos: u8) -> Result<PubConn, BenchError> {
        match proto {
            Proto::Ws => Ok(PubConn::Ws(clients::WsPublisher::new(clients::ws_open(t, id).await?))),
            Proto::Mqtt if t.mqtt_version == MqttVersion::V3 => {
                use rumqttc::{Event, Incoming};
                let (client, mut events) = clients::mqtt3_client(clients::mqtt3_options(t, id)?, 1024);
                clients::mqtt3_wait(&mut events, |ev| Ok(matches!(ev, Event::Incoming(Incoming::ConnAck(_))))).await?;
                let driver = tokio::spawn(async move {
                    // Drives the socket (acks, pings); ends when the client disconnects.
                    loop {
                        match events.poll().await {
                            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return 0,
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(error = %e, "MQTT publisher");
                                return 1;
                            }
                        }
                    }
                });
                Ok(PubConn::Mqtt3 { client, qos, driver })
            }
            Proto::Mqtt => {
                use rumqttc::v5::{Event, Incoming};
                let (client, mut events) = rumqttc::v5::AsyncClient::new(
                    clients::mqtt_options(t, id, 0, clients::MQTT_PUB_INFLIGHT)?,
                    usize::from(clients::MQTT_PUB_INFLIGHT),
                );
                clients::mqtt_wait(&mut events, |ev| Ok(matches!(ev, Event::Incoming(Incoming::ConnAck(_))))).await?;
                let driver = tokio::spawn(async move {
                    // Drives the socket (acks, pings); ends when the client disconnects.
                    let mut errors = 0u64;
                    loop {
                        match events.poll().await {
                            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => break,
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(error = %e, "MQTT publisher");
                                errors += 1;
                                break;
                            }
                        }
                    }
                    errors
                });
                Ok(PubConn::Mqtt { client, qos, driver })
            }
            Proto::Rest | Proto::Sse | Proto::Poll if t.flavour == Flavour::Nchan => {
                Ok(PubConn::Nchan { client: clients::http_client(t)?, base: t.http_base() })
            }
            Proto::Rest | Proto::Sse | Proto::Poll => {
                Ok(PubConn::Rest { client: clients::http_client(t)?, base: t.http_base() })
            }
            Proto::Nats | Proto::NatsWs => Ok(PubConn::Nats(NatsPub::open(proto == Proto::NatsWs, t, id).await?)),
            Proto::Wt => Ok(PubConn::Wt(super::wt::WtPub::open(t.wt()?, id).await?)),
        }
    }

    /// Sends one message.
    pub(crate) async fn publish(&mut self, channel: &str, payload: Vec<u8>) -> Result<(), BenchError> {
        match self {
            PubConn::Ws(p) => p.publish(channel, payload).await,
            PubConn::Mqtt { client, qos, .. } => client
                .publish(channel, clients::mqtt_qos(*qos), false, payload)
                .await
                .map_err(|e| BenchError::Protocol(format!("MQTT: {e}"))),
            PubConn::Mqtt3 { client, qos, .. } => client
                .publish(channel, clients::mqtt3_qos(*qos), false, payload)
                .await
                .map_err(|e| BenchError::Protocol(format!("MQTT: {e}"))),
            PubConn::Rest { client, base } => clients::rest_publish(client, base, channel, payload).await,
            PubConn::Nchan { client, base } => nchan::publish(client, base, channel, payload).await,
            PubConn::Nats(p) => p.publish(channel, &payload).await,
            PubConn::Wt(p) => p.publish(channel, payload).await,
        }
    }

    /// Closes; returns errors seen after the sends (refused publishes).
    pub(crate) async fn close(self) -> u64 {
        match self {
            PubConn::Ws(p) => p.close().await,
            PubConn::Mqtt { client, mut driver, .. } => {
                let _ = client.disconnect().await;
                match tokio::time::timeout(Duration::from_secs(5), &mut driver).await {
                    Ok(Ok(n)) => n,
                    _ => {
                        driver.abort();
                        0
                    }
                }
            }
            PubConn::Mqtt3 { client, mut driver, .. } => {
                let _ = client.disconnect().await;
                match tokio::time::timeout(Duration::from_secs(5), &mut driver).await {
                    Ok(Ok(n)) => n,
                    _ => {
                        driver.abort();
                        0
                    }
                }
            }
            PubConn::Nats(p) => p.close().await,
            PubConn::Wt(p) => p.close().await,
            PubConn::Rest { .. } | PubConn::Nchan { .. } => 0,
        }
    }
}

struct PubOutcome {
    sent: Vec<u64>,
    errors: u64,
}

async fn publish_ticks(
    mut conn: PubConn,
    id: u32,
    channels: Arc<Vec<String>>,
    mut ticks: mpsc::Receiver<Tick>,
    size: usize,
    clock: Clock,
    lag: Arc<ShardedHistogram>,
) -> PubOutcome {
    let mut out = PubOutcome { sent: vec![0; channels.len()], errors: 0 };
    let mut lag_buf = LocalBuffer::new(id as usize);
    while let Some(t) = ticks.recv().await {
        let now = clock.now_ns();
        lag_buf.record(&lag, now.saturating_sub(t.sched_ns) / 1000);
        let payload =
            super::payload::encode(super::payload::Stamp { sched_ns: t.sched_ns, publisher: id, seq: t.seq }, size);
        out.sent[t.channel as usize] += 1;
        if let Err(e) = conn.publish(&channels[t.channel as usize], payload).await {
            if out.errors == 0 {
                tracing::warn!(publisher = id, error = %e, "publish failed");
            }
            out.errors += 1;
        }
    }
    lag_buf.flush(&lag);
    out.errors += conn.close().await;
    out
}

/// Hands out ticks on schedule until `end_ns`; runs on its own OS thread.
fn pace(txs: Vec<mpsc::Sender<Tick>>, clock: Clock, start_ns: u64, end_ns: u64, rate: f64, channels: u32) {
    let pubs = txs.len() as u64;
    let mut seqs = vec![vec![0u64; channels as usize]; txs.len()];
    let period_ns = 1e9 / rate;
    for k in 0u64.. {
        let sched_ns = start_ns + (k as f64 * period_ns) as u64;
        if sched_ns >= end_ns {
            break;
        }
        let now = clock.now_ns();
        if sched_ns > now {
            // The OS timer (~50 µs slack) is fine-grained enough here.
            std::thread::sleep(Duration::from_nanos(sched_ns - now));
        }
        let p = (k % pubs) as usize;
        let channel = ((k / pubs + p as u64) % u64::from(channels)) as u32;
        let seq = seqs[p][channel as usize];
        seqs[p][channel as usize] += 1;
        if txs[p].blocking_send(Tick { sched_ns, channel, seq }).is_err() {
            break;
        }
    }
}

/// The publisher thread: connects every publisher, says so on `ready`,
/// then sends ticks until the pacer is done. Returns each publisher's outcome.
#[allow(clippy::too_many_arguments)] // one call site; a struct would only rename these
fn run_publishers(
    proto: Proto,
    target: Arc<Target>,
    run_id: u32,
    channels: Arc<Vec<String>>,
    rxs: Vec<mpsc::Receiver<Tick>>,
    size: usize,
    qos: u8,
    clock: Clock,
    lag: Arc<ShardedHistogram>,
    ready: tokio::sync::oneshot::Sender<Result<(), BenchError>>,
) -> Vec<PubOutcome> {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(e.into()));
            return Vec::new();
        }
    };
    rt.block_on(async move {
        let mut conns = Vec::new();
        for p in 0..rxs.len() {
            match PubConn::open(proto, &target, &format!("bench-{run_id:08x}-p{p}"), qos).await {
                Ok(c) => conns.push(c),
                Err(e) => {
                    let _ = ready.send(Err(e));
                    return Vec::new();
                }
            }
        }
        let _ = ready.send(Ok(()));
        let tasks: Vec<_> = conns
            .into_iter()
            .zip(rxs)
            .enumerate()
            .map(|(p, (conn, rx))| {
                tokio::spawn(publish_ticks(conn, p as u32, channels.clone(), rx, size, clock, lag.clone()))
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            // A panicked publisher task reports nothing sent; its messages then show as unexpected.
            out.push(t.await.unwrap_or(PubOutcome { sent: vec![0; channels.len()], errors: 1 }));
        }
        out
    })
}

/// Runs fan-out with `pub_proto` publishers and `sub_proto` subscribers.
pub async fn run(pub_proto: Proto, sub_proto: Proto, load: &LoadArgs, common: &CommonArgs) -> anyhow::Result<Report> {
    if load.channels == 0 || load.pubs == 0 || load.rate <= 0.0 || !load.rate.is_finite() {
        anyhow::bail!("--channels, --pubs and --rate must be positive");
    }
    if matches!(pub_proto, Proto::Sse | Proto::Poll) {
        anyhow::bail!("{} cannot publish; use ws, wt, mqtt, rest, nats or nats-ws", pub_proto.name());
    }
    if common.target == Flavour::Nchan && (!matches!(sub_proto, Proto::Sse | Proto::Poll) || pub_proto != Proto::Rest) {
        anyhow::bail!("--target nchan serves SSE and long-poll subscribers with REST publishers only");
    }
    let subs = u64::from(load.channels) * u64::from(load.subs_per_channel);
    let conns = subs + u64::from(load.pubs);
    if conns > common.max_conns {
        anyhow::bail!("{conns} connections exceed --max-conns {}", common.max_conns);
    }
    // perf (if asked for) attaches now, counting off until the window opens.
    let mut probe = ServerProbe::prepare(common).await.context("server probe")?;
    let target = Arc::new(common.target(&[pub_proto, sub_proto]).await?);
    let sub_targets: Vec<Arc<Target>> =
        common.sub_targets(&[pub_proto, sub_proto]).await?.into_iter().map(Arc::new).collect();
    let run_id: u32 = rand::random();
    let channels: Arc<Vec<String>> = Arc::new((0..load.channels).map(|c| format!("bench/{run_id:08x}/{c}")).collect());
    let clock = Clock::new();
    let threads = super::worker_threads();
    let shared = Arc::new(Shared { clock, latency: ShardedHistogram::new(threads * 4), received: AtomicU64::new(0) });
    let (stop_tx, stop_rx) = watch::channel(false);

    // Subscribers first, all subscribed before the first publish.
    let setup = Arc::new(Semaphore::new(SETUP_CONCURRENCY));
    let (ready_tx, mut ready_rx) = mpsc::channel::<Result<(), BenchError>>(1024);
    let mut sub_tasks = Vec::with_capacity(subs as usize);
    for i in 0..subs as usize {
        let channel = (i % load.channels as usize) as u32;
        let target = sub_targets[i % sub_targets.len()].clone();
        let (channels, shared, setup, ready, stop) =
            (channels.clone(), shared.clone(), setup.clone(), ready_tx.clone(), stop_rx.clone());
        let (qos, pubs) = (load.qos, load.pubs as usize);
        sub_tasks.push(tokio::spawn(async move {
            let permit = setup.acquire_owned().await;
            let conn = SubConn::open(
                sub_proto,
                &target,
                &channels[channel as usize],
                &format!("bench-{run_id:08x}-s{i}"),
                qos,
            )
            .await;
            drop(permit);
            match conn {
                Ok(conn) => {
                    let _ = ready.send(Ok(())).await;
                    Some(receive(conn, i, channel, pubs, shared, stop).await)
                }
                Err(e) => {
                    let _ = ready.send(Err(e)).await;
                    None
                }
            }
        }));
    }
    drop(ready_tx);
    for n in 0..subs {
        match ready_rx.recv().await {
            Some(Ok(())) => {}
            Some(Err(e)) => {
                let _ = stop_tx.send(true);
                return Err(e).with_context(|| format!("subscriber {n} of {subs} could not subscribe"));
            }
            None => anyhow::bail!("subscriber setup ended early"),
        }
    }

    if common.target == Flavour::Nchan {
        // A pending long poll gives no sign of life before the first message:
        // wait until Nchan counts every subscriber of every channel.
        let client = clients::http_client(&target)?;
        for c in channels.iter() {
            if let Err(e) =
                nchan::wait_subscribers(&client, &target.http_base(), c, u64::from(load.subs_per_channel)).await
            {
                let _ = stop_tx.send(true);
                return Err(e).context("Nchan subscribers");
            }
        }
    }

    // Publishers run on their own OS thread (a current-thread runtime), so
    // thousands of busy subscriber tasks cannot delay a scheduled send.
    let lag = Arc::new(ShardedHistogram::new(1));
    let mut txs = Vec::new();
    let mut rxs = Vec::new();
    for _ in 0..load.pubs {
        let (tx, rx) = mpsc::channel(TICK_QUEUE);
        txs.push(tx);
        rxs.push(rx);
    }
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Result<(), BenchError>>();
    let publishers = {
        let (target, channels, lag, size, qos) = (target.clone(), channels.clone(), lag.clone(), load.size, load.qos);
        std::thread::Builder::new()
            .name("bench-publishers".into())
            .spawn(move || run_publishers(pub_proto, target, run_id, channels, rxs, size, qos, clock, lag, ready_tx))
            .context("spawning the publisher thread")?
    };
    match ready_rx.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            let _ = stop_tx.send(true);
            return Err(e).context("publishers could not connect");
        }
        Err(_) => anyhow::bail!("the publisher thread ended during setup"),
    }

    // The measured window starts here.
    if let Err(e) = probe.open().await {
        let _ = stop_tx.send(true);
        return Err(e).context("server probe");
    }
    let self_before = ProcSample::read("self");
    let start_ns = clock.now_ns() + 5_000_000;
    let end_ns = start_ns + load.duration.as_nanos() as u64;
    let (rate, nchan) = (load.rate, load.channels);
    let pacer = std::thread::Builder::new()
        .name("bench-pacer".into())
        .spawn(move || pace(txs, clock, start_ns, end_ns, rate, nchan))
        .context("spawning the pacer thread")?;

    let outcomes = tokio::task::spawn_blocking(move || publishers.join())
        .await
        .context("joining the publisher thread")?
        .map_err(|_| anyhow::anyhow!("the publisher thread panicked"))?;
    let mut sent = vec![vec![0u64; load.channels as usize]; load.pubs as usize];
    let mut pub_errors = 0;
    for (p, o) in outcomes.into_iter().enumerate() {
        sent[p] = o.sent;
        pub_errors += o.errors;
    }
    // The pacer ends once its schedule is done; publishers finished after it.
    let _ = tokio::task::spawn_blocking(move || pacer.join()).await;
    let published: u64 = sent.iter().flatten().sum();
    let publish_end_ns = clock.now_ns();
    let expected = published * u64::from(load.subs_per_channel);

    // Drain: bounded wait for outstanding deliveries.
    let deadline = Instant::now() + common.drain;
    while shared.received.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let window_end_ns = clock.now_ns();
    let server = probe.close().await;
    let self_after = ProcSample::read("self");
    let _ = stop_tx.send(true);

    let mut tally = Tally::default();
    let mut sub_errors = Vec::new();
    for t in sub_tasks {
        let Some(o) = t.await.context("subscriber task")? else { continue };
        for (p, tr) in o.trackers.iter().enumerate() {
            tally.add(tr.tally(sent[p][o.channel as usize]));
        }
        tally.unexpected += o.malformed;
        tally.delivered += o.malformed;
        if let Some(e) = o.error {
            sub_errors.push(e);
        }
    }

    let window_ns = window_end_ns.saturating_sub(start_ns).max(1);
    let publish_ns = publish_end_ns.saturating_sub(start_ns).max(1);
    let mut r = Report {
        scenario: if pub_proto == sub_proto.publisher() { "fanout".into() } else { "cross".into() },
        sub_proto: sub_proto.name().into(),
        pub_proto: pub_proto.name().into(),
        window_secs: window_ns as f64 / 1e9,
        connections: conns,
        subscribers: subs,
        publishers: u64::from(load.pubs),
        published,
        target_publishes_per_sec: load.rate,
        publishes_per_sec: published as f64 / (publish_ns as f64 / 1e9),
        expected_deliveries: expected,
        client_errors: pub_errors + sub_errors.len() as u64,
        ..Default::default()
    };
    r.set_tally(tally);
    r.deliveries_per_sec = r.deliveries as f64 / (window_ns as f64 / 1e9);
    r.set_latency(histogram::summarize(&shared.latency.merged()));
    r.set_lag(histogram::summarize(&lag.merged()));
    r.set_server_figures(server);
    // The publisher thread is a worker too: it gets its own 85 % budget.
    r.set_validity(procfs::delta(&self_before, &self_after).cpu_us, window_ns / 1000, threads + 1);
    if pub_errors > 0 {
        r.problems.push(format!("{pub_errors} publish errors"));
    }
    if let Some(first) = sub_errors.first() {
        r.problems.push(format!("{} subscribers failed (first: {first})", sub_errors.len()));
    }
    Ok(r)
}
