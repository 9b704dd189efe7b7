//! Order under concurrency: four publishers on three front ends race on one
//! channel while a JSON and a protobuf subscriber read. Both must see serials
//! 1..=N with an unbroken `prev_serial` chain, the same message at each
//! serial, and every publisher's messages in the order it sent them. And a
//! `subscribe` is in effect for a publish that raced it from another
//! connection.

use super::common_a;

use std::collections::HashMap;

use common_a::*;
use switchboard_proto as proto;
use switchboard_tests::*;

const CHANNEL: &str = "order/race";
const PUBLISHERS: usize = 4;
const PER_PUBLISHER: usize = 2_500;
const TOTAL: usize = PUBLISHERS * PER_PUBLISHER;
/// Publishes a WebSocket publisher keeps in flight before reading acks.
const WINDOW: usize = 64;

fn payload(publisher: usize, seq: usize) -> Vec<u8> {
    format!("{publisher}:{seq}").into_bytes()
}

fn parse(p: &[u8]) -> (usize, usize) {
    let text = std::str::from_utf8(p).expect("utf-8 payload");
    let (a, b) = text.split_once(':').expect("publisher:seq");
    (a.parse().expect("publisher"), b.parse().expect("seq"))
}

/// Runs publisher `id` to completion; returns the acked serials in send order.
async fn run_publisher(id: usize, ws: String, http: String) -> anyhow::Result<Vec<u64>> {
    let payloads = (0..PER_PUBLISHER).map(move |seq| payload(id, seq));
    let serials = match id {
        0 | 1 => {
            let codec = if id == 0 { Codec::Json } else { Codec::Proto };
            let mut c = WsClient::connect(&ws, codec, &format!("pub-{id}")).await?;
            let acks = publish_pipelined(&mut c, CHANNEL, payloads, WINDOW).await?;
            assert!(acks.iter().all(|a| !a.duplicate && a.channel == CHANNEL));
            acks.iter().map(|a| a.serial).collect()
        }
        2 => {
            let rest = Rest::new(&http);
            let mut serials = Vec::with_capacity(PER_PUBLISHER);
            for p in payloads {
                serials.push(rest.publish_ok(CHANNEL, &p).await?.1);
            }
            serials
        }
        _ => {
            // REST with a JSON body.
            let rest = Rest::new(&http);
            let mut serials = Vec::with_capacity(PER_PUBLISHER);
            for p in payloads {
                let text = String::from_utf8(p)?;
                let (status, body) = rest.publish_json(CHANNEL, &serde_json::json!({"text": text}), &[]).await?;
                anyhow::ensure!(status == 200, "REST JSON publish answered {status}: {body}");
                serials.push(ack_position(&body).1);
            }
            serials
        }
    };
    Ok(serials)
}

fn check_stream(name: &str, msgs: &[proto::Envelope], epoch: &str) {
    assert_eq!(msgs.len(), TOTAL, "{name}");
    assert_contiguous(msgs, CHANNEL, epoch, 1, TOTAL as u64);
    let mut next_seq = [0usize; PUBLISHERS];
    for m in msgs {
        let (publisher, seq) = parse(&m.payload);
        assert_eq!(seq, next_seq[publisher], "{name}: publisher {publisher} out of order at serial {}", m.serial);
        next_seq[publisher] += 1;
    }
    assert_eq!(next_seq, [PER_PUBLISHER; PUBLISHERS], "{name}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_on_three_front_ends_keep_one_order() -> anyhow::Result<()> {
    let gw = TestGateway::start().await?;
    let (json_sub, proto_sub) = both_codecs(&gw.ws, CHANNEL, "sub").await?;
    // Readers run concurrently with the publishers, so neither outbox fills.
    let json_reader = collect(json_sub, TOTAL);
    let proto_reader = collect(proto_sub, TOTAL);

    let publishers: Vec<_> =
        (0..PUBLISHERS).map(|id| tokio::spawn(run_publisher(id, gw.ws.clone(), gw.http.clone()))).collect();
    let mut acked: HashMap<u64, Vec<u8>> = HashMap::new();
    for (id, task) in publishers.into_iter().enumerate() {
        let serials = task.await??;
        assert_eq!(serials.len(), PER_PUBLISHER);
        assert!(serials.windows(2).all(|w| w[0] < w[1]), "publisher {id}: acked serials not increasing");
        for (seq, serial) in serials.into_iter().enumerate() {
            assert!(acked.insert(serial, payload(id, seq)).is_none(), "serial {serial} acked twice");
        }
    }
    assert_eq!(acked.len(), TOTAL);

    let (mut json_sub, from_json) = json_reader.await??;
    let (mut proto_sub, from_proto) = proto_reader.await??;
    let epoch = from_json[0].epoch.clone();
    check_stream("json", &from_json, &epoch);
    check_stream("proto", &from_proto, &epoch);
    for (j, p) in from_json.iter().zip(&from_proto) {
        assert_eq!(key(j), key(p), "the encodings disagree at serial {}", j.serial);
        assert_eq!(acked.get(&j.serial), Some(&j.payload.to_vec()), "ack and delivery disagree at serial {}", j.serial);
    }

    // Nothing beyond the 10 000: the next message is the next serial.
    let mut last = WsClient::connect(&gw.ws, Codec::Proto, "last").await?;
    let ack = last.publish(CHANNEL, b"after", "").await?;
    assert_eq!(ack.serial, TOTAL as u64 + 1);
    for (name, sub) in [("json", &mut json_sub), ("proto", &mut proto_sub)] {
        let m = sub.next_message().await?;
        assert_eq!((m.serial, m.prev_serial, &m.payload[..]), (ack.serial, TOTAL as u64, &b"after"[..]), "{name}");
    }
    // Both subscribers kept up: none was closed as a slow consumer.
    assert_eq!(gw.sessions(), 3);
    Ok(())
}

/// #13 item 18 on WebSocket: a `subscribe` is in effect for every publish
/// that reaches the gateway after it did. The subscriber sends its
/// `subscribe` and, without waiting for `subscribed`, another connection
/// publishes at once: every round's message arrives (each round a fresh
/// channel, so a lost message cannot hide behind a later one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribe_is_in_effect_once_it_arrives() -> anyhow::Result<()> {
    const ROUNDS: usize = 60;
    let gw = TestGateway::start().await?;
    let mut publisher = WsClient::connect(&gw.ws, Codec::Json, "at-once-pub").await?;
    let mut lost = Vec::new();
    for round in 0..ROUNDS {
        let channel = format!("at-once/ws/{round}");
        let mut sub = WsClient::connect(&gw.ws, Codec::Json, &format!("at-once-sub-{round}")).await?;
        sub.send(proto::client_frame::Frame::Subscribe(proto::Subscribe {
            filter: channel.clone(),
            ..Default::default()
        }))
        .await?;
        publisher.publish_frame(proto::Publish { channel, payload: "now".into(), ..Default::default() }).await?;
        let got = tokio::time::timeout(std::time::Duration::from_millis(500), async {
            loop {
                if let Some(proto::server_frame::Frame::Message(_)) = sub.recv_frame().await?.frame {
                    return anyhow::Ok(());
                }
            }
        })
        .await;
        if !matches!(got, Ok(Ok(()))) {
            lost.push(round);
        }
    }
    assert!(lost.is_empty(), "{} of {ROUNDS} rounds lost their message: {lost:?}", lost.len());
    Ok(())
}
