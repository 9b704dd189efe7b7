//! Connection scenarios: `idle` (open N subscribed connections, hold them,
//! measure setup rate, handshake latency and server RSS per connection) and
//! `churn` (connect → subscribe → receive one message the bench publishes →
//! disconnect, started at a target rate).
//!
//! A handshake is everything until the subscription is confirmed: TCP
//! connect, protocol handshake and subscribe (WebSocket `subscribed`, SSE
//! `connected`, the first long poll's answer, MQTT SUBACK).

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use tokio::sync::{Semaphore, mpsc, watch};

use super::clients;
use super::fanout::{Clock, Shared, SubConn, receive};
use super::histogram::{self, ShardedHistogram};
use super::payload::{self, Stamp};
use super::procfs::{self, ProcSample, ServerProbe};
use super::report::Report;
use super::{CommonArgs, Proto};

/// Channels the connections of `idle` and the cycles of `churn` spread over.
const CHANNELS: usize = 64;
/// Connections opened at once during `idle` setup.
const SETUP_CONCURRENCY: usize = 256;

/// Runs `idle`.
pub async fn idle(proto: Proto, conns: u64, hold: Duration, common: &CommonArgs) -> anyhow::Result<Report> {
    if conns > common.max_conns {
        anyhow::bail!("{conns} connections exceed --max-conns {}", common.max_conns);
    }
    let t = Arc::new(common.target(&[proto]).await?);
    let run_id: u32 = rand::random();
    let threads = super::worker_threads();
    let handshakes = Arc::new(ShardedHistogram::new(threads * 4));
    let shared =
        Arc::new(Shared { clock: Clock::new(), latency: ShardedHistogram::new(1), received: AtomicU64::new(0) });
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut probe = ServerProbe::prepare(common).await.context("server probe")?;
    probe.open().await.context("server probe")?;
    let self_before = ProcSample::read("self");
    let started = Instant::now();
    let setup = Arc::new(Semaphore::new(SETUP_CONCURRENCY));
    let (ready_tx, mut ready_rx) = mpsc::channel::<Result<(), String>>(1024);
    let mut tasks = Vec::new();
    for i in 0..conns as usize {
        let (t, shared, handshakes, setup, ready, stop) =
            (t.clone(), shared.clone(), handshakes.clone(), setup.clone(), ready_tx.clone(), stop_rx.clone());
        tasks.push(tokio::spawn(async move {
            let permit = setup.acquire_owned().await;
            let channel = format!("bench/{run_id:08x}/idle/{}", i % CHANNELS);
            let t0 = Instant::now();
            let conn = SubConn::open(proto, &t, &channel, &format!("bench-{run_id:08x}-i{i}"), 0).await;
            handshakes.record_batch(i, &[t0.elapsed().as_micros() as u64]);
            drop(permit);
            match conn {
                Ok(conn) => {
                    let _ = ready.send(Ok(())).await;
                    // Reading keeps the connection alive (pongs, MQTT pings, the next poll).
                    receive(conn, i, 0, 0, shared, stop).await.error
                }
                Err(e) => {
                    let _ = ready.send(Err(e.to_string())).await;
                    None
                }
            }
        }));
    }
    drop(ready_tx);
    let mut failed = Vec::new();
    // Count answers: the senders live as long as their connections.
    for _ in 0..conns {
        match ready_rx.recv().await {
            Some(Ok(())) => {}
            Some(Err(e)) => failed.push(e),
            None => break,
        }
    }
    let setup_time = started.elapsed();
    let opened = conns - failed.len() as u64;
    tokio::time::sleep(hold).await;
    let window = started.elapsed();
    let server = probe.close().await;
    let self_after = ProcSample::read("self");
    let _ = stop_tx.send(true);
    let mut dropped = 0u64;
    for task in tasks {
        if task.await.context("connection task")?.is_some() {
            dropped += 1;
        }
    }

    let mut r = Report {
        scenario: "idle".into(),
        sub_proto: proto.name().into(),
        pub_proto: "-".into(),
        window_secs: window.as_secs_f64(),
        connections: opened,
        subscribers: opened,
        connects_per_sec: Some(opened as f64 / setup_time.as_secs_f64().max(1e-9)),
        client_errors: failed.len() as u64 + dropped,
        ..Default::default()
    };
    r.set_handshake(histogram::summarize(&handshakes.merged()));
    r.set_server_figures(server);
    if let Some(first) = failed.first() {
        r.problems.push(format!("{} connections failed (first: {first})", failed.len()));
    }
    if dropped > 0 {
        r.problems.push(format!("{dropped} connections dropped while held"));
    }
    r.set_validity(procfs::delta(&self_before, &self_after).cpu_us, window.as_micros() as u64, threads);
    Ok(r)
}

/// One churn cycle: subscribe, have the bench publish one message, receive it.
async fn cycle(
    proto: Proto,
    t: &clients::Target,
    publisher: &reqwest::Client,
    channel: &str,
    id: &str,
    seq: u64,
    clock: Clock,
) -> Result<(u64, u64), String> {
    let t0 = Instant::now();
    let mut conn = SubConn::open(proto, t, channel, id, 1).await.map_err(|e| e.to_string())?;
    let handshake_us = t0.elapsed().as_micros() as u64;
    let p = payload::encode(Stamp { sched_ns: clock.now_ns(), publisher: 0, seq }, 0);
    clients::rest_publish(publisher, &t.http_base(), channel, p).await.map_err(|e| e.to_string())?;
    let mut batch: Vec<Bytes> = Vec::new();
    let deadline = tokio::time::Instant::now() + clients::HANDSHAKE_TIMEOUT;
    loop {
        match tokio::time::timeout_at(deadline, conn.next(&mut batch)).await {
            Err(_) => return Err("message not received in time".into()),
            Ok(Err(e)) => return Err(e.to_string()),
            Ok(Ok(false)) => return Err("closed before the message".into()),
            Ok(Ok(true)) => {}
        }
        let now = clock.now_ns();
        // Other cycles share the channel: wait for our own sequence.
        if let Some(s) = batch.drain(..).filter_map(|b| payload::decode(&b)).find(|s| s.seq == seq) {
            return Ok((handshake_us, now.saturating_sub(s.sched_ns) / 1000));
        }
    }
}

/// Runs `churn`.
pub async fn churn(proto: Proto, rate: f64, duration: Duration, common: &CommonArgs) -> anyhow::Result<Report> {
    if rate <= 0.0 || !rate.is_finite() {
        anyhow::bail!("--rate must be positive");
    }
    let t = Arc::new(common.target(&[proto]).await?);
    let run_id: u32 = rand::random();
    let clock = Clock::new();
    let threads = super::worker_threads();
    let handshakes = Arc::new(ShardedHistogram::new(threads * 4));
    let latency = Arc::new(ShardedHistogram::new(threads * 4));
    let publisher = clients::http_client(&t)?;
    // Connections in flight are capped by --max-conns (minus the publisher's pool).
    let cap = Arc::new(Semaphore::new(common.max_conns.saturating_sub(4).max(1) as usize));
    let mut probe = ServerProbe::prepare(common).await.context("server probe")?;
    probe.open().await.context("server probe")?;
    let self_before = ProcSample::read("self");
    let started = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    let mut skipped = 0u64;
    for i in 0u64.. {
        let at = started + Duration::from_secs_f64(i as f64 / rate);
        if at >= started + duration {
            break;
        }
        tokio::time::sleep_until(at).await;
        let Ok(permit) = cap.clone().try_acquire_owned() else {
            skipped += 1;
            continue;
        };
        let (t, publisher, handshakes, latency) = (t.clone(), publisher.clone(), handshakes.clone(), latency.clone());
        tasks.push(tokio::spawn(async move {
            let channel = format!("bench/{run_id:08x}/churn/{}", i % CHANNELS as u64);
            let r = cycle(proto, &t, &publisher, &channel, &format!("bench-{run_id:08x}-c{i}"), i, clock).await;
            drop(permit);
            if let Ok((hs, lat)) = r {
                handshakes.record_batch(i as usize, &[hs]);
                latency.record_batch(i as usize, &[lat]);
            }
            r.err()
        }));
    }
    let attempted = tasks.len() as u64;
    let mut errors = Vec::new();
    for task in tasks {
        if let Some(e) = task.await.context("churn task")? {
            errors.push(e);
        }
    }
    let window = started.elapsed();
    let server = probe.close().await;
    let self_after = ProcSample::read("self");
    let done = attempted - errors.len() as u64;

    let mut r = Report {
        scenario: "churn".into(),
        sub_proto: proto.name().into(),
        pub_proto: "rest".into(),
        window_secs: window.as_secs_f64(),
        connections: attempted,
        subscribers: attempted,
        publishers: 1,
        published: attempted,
        expected_deliveries: attempted,
        connects_per_sec: Some(done as f64 / window.as_secs_f64().max(1e-9)),
        target_publishes_per_sec: rate,
        publishes_per_sec: attempted as f64 / window.as_secs_f64().max(1e-9),
        client_errors: errors.len() as u64,
        ..Default::default()
    };
    r.deliveries = done;
    r.lost = errors.len() as u64;
    r.deliveries_per_sec = done as f64 / window.as_secs_f64().max(1e-9);
    r.set_handshake(histogram::summarize(&handshakes.merged()));
    r.set_latency(histogram::summarize(&latency.merged()));
    if let Some(first) = errors.first() {
        r.problems.push(format!("{} cycles failed (first: {first})", errors.len()));
    }
    if skipped > 0 {
        r.problems.push(format!("{skipped} cycles skipped: --max-conns in flight"));
    }
    r.set_server_figures(server);
    r.set_validity(procfs::delta(&self_before, &self_after).cpu_us, window.as_micros() as u64, threads);
    Ok(r)
}
