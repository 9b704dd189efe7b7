//! `recovery`: N subscribers on one channel disconnect, K messages are
//! published (over REST) while they are away, and they reconnect with their
//! positions — WebSocket and WebTransport: subscribe `positions`; SSE: `Last-Event-ID`; long
//! polling: the cursor; MQTT: a persistent session (clean start 0, session
//! expiry) at QoS 1. The report gives the catch-up time (reconnect start
//! until every subscriber holds all K) and whether every subscriber got every
//! message exactly once (after a short grace period for late duplicates).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use switchboard_proto as proto;
use tokio::sync::Semaphore;

use super::accounting::{SeqTracker, Tally};
use super::clients::{self, Target};
use super::fanout::{Clock, SubConn};
use super::histogram::{self, LocalBuffer, ShardedHistogram};
use super::payload::{self, Stamp};
use super::procfs::{self, ProcSample, ServerProbe};
use super::report::Report;
use super::{BenchError, CommonArgs, Proto};

/// How long subscribers keep listening after the last one caught up, so late
/// duplicates are counted.
const DUPLICATE_GRACE: Duration = Duration::from_millis(300);
/// MQTT session expiry asked for, seconds.
const SESSION_EXPIRY_S: u32 = 300;

/// Where a subscriber was when it left.
enum Resume {
    Ws(proto::Position),
    Wt(proto::Position),
    Sse(String),
    Poll(String),
    Mqtt,
}

/// Subscribes, notes the position, and disconnects.
async fn first_visit(proto: Proto, t: &Target, channel: &str, id: &str) -> Result<Resume, BenchError> {
    match proto {
        Proto::Ws => {
            let mut ws = clients::ws_open(t, id).await?;
            let pos = clients::ws_subscribe(&mut ws, channel, None).await?;
            let _ = ws.close(None).await;
            Ok(Resume::Ws(pos))
        }
        Proto::Wt => {
            let (sub, pos) = super::wt::WtSub::open(t.wt()?, channel, id, None).await?;
            sub.close();
            Ok(Resume::Wt(pos))
        }
        Proto::Sse => {
            let client = clients::http_client(t)?;
            let (_, id) = clients::sse_open(&client, &t.http_base(), channel, None).await?;
            Ok(Resume::Sse(id))
        }
        Proto::Poll => {
            let client = clients::http_client(t)?;
            let (_, cursor) = clients::poll_once(&client, &t.http_base(), channel, None, 0).await?;
            Ok(Resume::Poll(cursor))
        }
        Proto::Mqtt => {
            use rumqttc::Outgoing;
            use rumqttc::v5::Event;
            let (client, mut events) = clients::mqtt_subscribe(t, id, channel, 1, SESSION_EXPIRY_S).await?;
            client.disconnect().await.map_err(|e| BenchError::Protocol(format!("MQTT: {e}")))?;
            // Drive the event loop until the DISCONNECT is written.
            let _ = clients::mqtt_wait(&mut events, |ev| Ok(matches!(ev, Event::Outgoing(Outgoing::Disconnect)))).await;
            Ok(Resume::Mqtt)
        }
        Proto::Rest | Proto::Nats | Proto::NatsWs => {
            Err(BenchError::Usage(format!("recovery cannot subscribe over {}", proto.name())))
        }
    }
}

/// Reconnects from `resume`.
async fn reconnect(resume: Resume, t: &Target, channel: &str, id: &str) -> Result<SubConn, BenchError> {
    match resume {
        Resume::Ws(pos) => {
            let mut ws = clients::ws_open(t, id).await?;
            clients::ws_subscribe(&mut ws, channel, Some(pos)).await?;
            Ok(SubConn::Ws(Box::new(ws)))
        }
        Resume::Wt(pos) => {
            let (sub, _) = super::wt::WtSub::open(t.wt()?, channel, id, Some(pos)).await?;
            Ok(SubConn::Wt(Box::new(sub)))
        }
        Resume::Sse(last) => {
            let client = clients::http_client(t)?;
            let (events, _) = clients::sse_open(&client, &t.http_base(), channel, Some(&last)).await?;
            Ok(SubConn::Sse(events))
        }
        Resume::Poll(cursor) => {
            Ok(SubConn::Poll { client: clients::http_client(t)?, base: t.http_base(), channel: channel.into(), cursor })
        }
        Resume::Mqtt => {
            use rumqttc::v5::{Event, Incoming};
            let (client, mut events) = rumqttc::v5::AsyncClient::new(
                clients::mqtt_options(t, id, SESSION_EXPIRY_S, clients::MQTT_SUB_INFLIGHT)?,
                64,
            );
            clients::mqtt_wait(&mut events, |ev| match ev {
                Event::Incoming(Incoming::ConnAck(a)) if a.session_present => Ok(true),
                Event::Incoming(Incoming::ConnAck(_)) => Err(BenchError::Protocol("MQTT session not kept".into())),
                _ => Ok(false),
            })
            .await?;
            Ok(SubConn::Mqtt { _client: client, events: Box::new(events) })
        }
    }
}

struct Caught {
    tracker: SeqTracker,
    done_at: Option<Instant>,
    malformed: u64,
    error: Option<String>,
}

/// Receives until all `k` arrived (plus a grace period) or `deadline`.
async fn catch_up(
    mut conn: SubConn,
    k: u64,
    deadline: tokio::time::Instant,
    clock: Clock,
    lat: &ShardedHistogram,
    key: usize,
) -> Caught {
    let mut out = Caught { tracker: SeqTracker::default(), done_at: None, malformed: 0, error: None };
    let mut buf = LocalBuffer::new(key);
    let mut batch: Vec<Bytes> = Vec::new();
    let mut until = deadline;
    loop {
        let r = match tokio::time::timeout_at(until, conn.next(&mut batch)).await {
            Err(_) => break,
            Ok(r) => r,
        };
        let now = clock.now_ns();
        for p in batch.drain(..) {
            match payload::decode(&p) {
                Some(s) if s.publisher == 0 => {
                    buf.record(lat, now.saturating_sub(s.sched_ns) / 1000);
                    out.tracker.observe(s.seq);
                }
                _ => out.malformed += 1,
            }
        }
        if out.done_at.is_none() && out.tracker.distinct() >= k {
            out.done_at = Some(Instant::now());
            until = tokio::time::Instant::now() + DUPLICATE_GRACE;
        }
        if let Err(e) = r {
            out.error = Some(e.to_string());
            break;
        }
    }
    buf.flush(lat);
    out
}

/// Runs the recovery scenario.
pub async fn run(
    proto: Proto,
    subs: u32,
    missed: u32,
    size: usize,
    duration: Duration,
    common: &CommonArgs,
) -> anyhow::Result<Report> {
    if proto == Proto::Rest {
        anyhow::bail!("rest cannot subscribe; use ws, sse, poll or mqtt");
    }
    let conns = u64::from(subs) + 1;
    if conns > common.max_conns {
        anyhow::bail!("{conns} connections exceed --max-conns {}", common.max_conns);
    }
    let t = Arc::new(common.target(&[proto]).await?);
    let run_id: u32 = rand::random();
    let channel = Arc::new(format!("bench/{run_id:08x}/recovery"));
    let publisher = clients::http_client(&t)?;
    let base = t.http_base();
    // The channel must exist so a subscribe reports a position to resume from.
    clients::rest_publish(&publisher, &base, &channel, b"warm-up".to_vec()).await.context("warm-up publish")?;

    let setup = Arc::new(Semaphore::new(256));
    let mut firsts = Vec::new();
    for i in 0..subs {
        let (t, channel, setup) = (t.clone(), channel.clone(), setup.clone());
        firsts.push(tokio::spawn(async move {
            let _permit = setup.acquire_owned().await;
            first_visit(proto, &t, &channel, &format!("bench-{run_id:08x}-r{i}")).await
        }));
    }
    let mut resumes = Vec::new();
    for (i, f) in firsts.into_iter().enumerate() {
        resumes.push(f.await.context("subscriber task")?.with_context(|| format!("subscriber {i} first visit"))?);
    }

    let clock = Clock::new();
    for seq in 0..u64::from(missed) {
        let p = payload::encode(Stamp { sched_ns: clock.now_ns(), publisher: 0, seq }, size);
        clients::rest_publish(&publisher, &base, &channel, p).await.context("publishing the missed messages")?;
    }

    let mut probe = ServerProbe::prepare(common).await.context("server probe")?;
    probe.open().await.context("server probe")?;
    let self_before = ProcSample::read("self");
    let threads = super::worker_threads();
    let lat = Arc::new(ShardedHistogram::new(threads * 4));
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + duration;
    let mut tasks = Vec::new();
    for (i, resume) in resumes.into_iter().enumerate() {
        let (t, channel, setup, lat) = (t.clone(), channel.clone(), setup.clone(), lat.clone());
        tasks.push(tokio::spawn(async move {
            let permit = setup.acquire_owned().await;
            let conn = reconnect(resume, &t, &channel, &format!("bench-{run_id:08x}-r{i}")).await;
            drop(permit);
            match conn {
                Ok(conn) => catch_up(conn, u64::from(missed), deadline, clock, &lat, i).await,
                Err(e) => {
                    Caught { tracker: SeqTracker::default(), done_at: None, malformed: 0, error: Some(e.to_string()) }
                }
            }
        }));
    }
    let mut tally = Tally::default();
    let mut last_done = None::<Instant>;
    let mut all_done = true;
    let mut errors = Vec::new();
    for task in tasks {
        let c = task.await.context("subscriber task")?;
        tally.add(c.tracker.tally(u64::from(missed)));
        tally.unexpected += c.malformed;
        match c.done_at {
            Some(d) => last_done = Some(last_done.map_or(d, |l| l.max(d))),
            None => all_done = false,
        }
        if let Some(e) = c.error {
            errors.push(e);
        }
    }
    let window = started.elapsed();
    let server = probe.close().await;
    let self_after = ProcSample::read("self");

    let mut r = Report {
        scenario: "recovery".into(),
        sub_proto: proto.name().into(),
        pub_proto: "rest".into(),
        window_secs: window.as_secs_f64(),
        connections: conns,
        subscribers: u64::from(subs),
        publishers: 1,
        published: u64::from(missed),
        expected_deliveries: u64::from(subs) * u64::from(missed),
        client_errors: errors.len() as u64,
        ..Default::default()
    };
    r.set_tally(tally);
    r.set_latency(histogram::summarize(&lat.merged()));
    r.catch_up_ms = if all_done { last_done.map(|d| (d - started).as_secs_f64() * 1000.0) } else { None };
    // Deliveries per second of catch-up (the window also holds the duplicate grace period).
    let busy = r.catch_up_ms.map_or(window.as_secs_f64(), |ms| ms / 1000.0);
    r.deliveries_per_sec = r.deliveries as f64 / busy.max(1e-9);
    r.exactly_once = Some(all_done && !tally.has_errors() && errors.is_empty());
    if !all_done {
        r.problems.push(format!("not every subscriber caught up within {duration:?}"));
    }
    if let Some(first) = errors.first() {
        r.problems.push(format!("{} subscribers failed (first: {first})", errors.len()));
    }
    r.set_server_figures(server);
    r.set_validity(procfs::delta(&self_before, &self_after).cpu_us, window.as_micros() as u64, threads);
    Ok(r)
}
