// A real browser's WebTransport against a running gateway: headless
// Chromium opens `new WebTransport('https://127.0.0.1:PORT/v1/wt', {
// serverCertificateHashes })` on the gateway's generated dev certificate,
// speaks the protobuf frames with the small hand-written codec below (varint
// length-delimited on streams, bare in datagrams), connects, subscribes to
// one channel on its stream and one as datagrams, receives what this script
// publishes over REST, and publishes a message of its own (which the Rust
// test, gateway/tests/browser_wt.rs, receives over WebSocket).
//
//   node tests/browser/wt.mjs HTTP_BASE QUIC_HOST:PORT CERT_SHA256_HEX
//
// It starts no gateway itself. On success it prints one line `{"ok":true,...}`
// and exits 0; on failure `{"ok":false,"reason":...}` and exits 1. The
// browser is always closed, and the whole run is bounded by OVERALL_MS.

import { run } from './harness.mjs';

const OVERALL_MS = 30_000;
const STEP_MS = 10_000;
const STREAM_CH = 'browser/in';
const DATAGRAM_CH = 'browser/dg';
const OUT_CH = 'browser/out';
const N = 3;

const [httpBase, quicAddr, certHash] = process.argv.slice(2);
if (!httpBase || !quicAddr || !/^[0-9a-f]{64}$/.test(certHash ?? '')) {
  console.log(JSON.stringify({ ok: false, reason: 'usage: wt.mjs HTTP_BASE QUIC_HOST:PORT CERT_SHA256_HEX' }));
  process.exit(2);
}

async function publish(channel, payload) {
  const res = await fetch(`${httpBase}/v1/channels/${channel}/messages`, { method: 'POST', body: payload });
  if (!res.ok) throw new Error(`publish to ${channel}: HTTP ${res.status} ${await res.text()}`);
  return res.json();
}

// Runs in the page: the session, the protobuf codec, the readers.
async function openSession({ url, hashHex, streamCh, datagramCh }) {
  const log = { messages: [], datagrams: [], control: [], errors: [] };
  window.__wt = log;
  const te = new TextEncoder();
  const td = new TextDecoder();

  // --- protobuf, only the fields used here (proto/envelope.proto) ---
  const putVarint = (n, out) => {
    while (n >= 0x80) {
      out.push((n % 0x80) | 0x80);
      n = Math.floor(n / 0x80);
    }
    out.push(n);
  };
  const putBytes = (field, bytes, out) => {
    putVarint(field * 8 + 2, out);
    putVarint(bytes.length, out);
    for (const b of bytes) out.push(b);
  };
  const putString = (field, s, out) => putBytes(field, te.encode(s), out);
  const putUint = (field, n, out) => {
    putVarint(field * 8, out);
    putVarint(n, out);
  };
  const readVarint = (buf, i) => {
    let n = 0;
    let scale = 1;
    for (;;) {
      if (i >= buf.length) return null;
      const b = buf[i++];
      n += (b & 0x7f) * scale;
      if (b < 0x80) return [n, i];
      scale *= 0x80;
    }
  };
  // Field number -> last value (numbers, or subarrays for bytes/messages).
  const fields = (buf) => {
    const out = {};
    let i = 0;
    while (i < buf.length) {
      const [key, j] = readVarint(buf, i);
      const field = Math.floor(key / 8);
      const wire = key % 8;
      if (wire === 0) {
        const [v, k] = readVarint(buf, j);
        out[field] = v;
        i = k;
      } else if (wire === 2) {
        const [len, k] = readVarint(buf, j);
        out[field] = buf.subarray(k, k + len);
        i = k + len;
      } else if (wire === 1) {
        i = j + 8;
      } else if (wire === 5) {
        i = j + 4;
      } else {
        throw new Error(`unsupported wire type ${wire}`);
      }
    }
    return out;
  };
  // ClientFrame { req = 1; oneof frame: field -> body }
  const clientFrame = (req, field, body) => {
    const inner = [];
    body(inner);
    const out = [];
    putUint(1, req, out);
    putBytes(field, inner, out);
    return out;
  };
  const delimited = (bytes) => {
    const out = [];
    putVarint(bytes.length, out);
    return new Uint8Array([...out, ...bytes]);
  };
  // ServerFrame: req = 1, then which body field is set.
  const KINDS = { 2: 'connected', 3: 'subscribed', 5: 'publish_ack', 6: 'message', 7: 'gap', 11: 'error', 12: 'disconnect' };
  const serverFrame = (buf) => {
    const f = fields(buf);
    for (const [no, kind] of Object.entries(KINDS)) {
      if (f[no] !== undefined) return { req: f[1] ?? 0, kind, body: fields(f[no]) };
    }
    return { req: f[1] ?? 0, kind: 'other', body: {} };
  };
  // Envelope: channel 1, payload 2, epoch 4, serial 5, prev_serial 6.
  const envelope = (b) => ({
    channel: td.decode(b[1] ?? new Uint8Array()),
    payload: td.decode(b[2] ?? new Uint8Array()),
    epoch: td.decode(b[4] ?? new Uint8Array()),
    serial: b[5] ?? 0,
    prev: b[6] ?? 0,
  });

  // Length-delimited frames from a ReadableStream of bytes.
  const frames = async function* (readable) {
    const reader = readable.getReader();
    let buf = new Uint8Array();
    for (;;) {
      const pre = readVarint(buf, 0);
      if (pre && buf.length >= pre[1] + pre[0]) {
        yield buf.subarray(pre[1], pre[1] + pre[0]);
        buf = buf.slice(pre[1] + pre[0]);
        continue;
      }
      const { value, done } = await reader.read();
      if (done) return;
      const next = new Uint8Array(buf.length + value.length);
      next.set(buf);
      next.set(value, buf.length);
      buf = next;
    }
  };

  const hash = new Uint8Array(hashHex.match(/../g).map((h) => parseInt(h, 16)));
  const wt = new WebTransport(url, { serverCertificateHashes: [{ algorithm: 'sha-256', value: hash }] });
  await wt.ready;
  const bidi = await wt.createBidirectionalStream();
  const writer = bidi.writable.getWriter();
  const control = frames(bidi.readable);
  const replies = new Map();
  (async () => {
    for await (const buf of control) {
      const f = serverFrame(buf);
      log.control.push(f.kind);
      const waiter = replies.get(f.req);
      if (waiter) waiter(f);
    }
  })().catch((e) => log.errors.push(`control: ${e}`));
  let nextReq = 0;
  const request = (field, body) => {
    const req = ++nextReq;
    const reply = new Promise((resolve) => replies.set(req, resolve));
    writer.write(delimited(clientFrame(req, field, body)));
    return reply;
  };
  window.__wtRequest = request;
  window.__wtPut = { putString, putBytes, putUint, te };

  // Channel streams: every frame names its channel.
  (async () => {
    const streams = wt.incomingUnidirectionalStreams.getReader();
    for (;;) {
      const { value, done } = await streams.read();
      if (done) return;
      (async () => {
        for await (const buf of frames(value)) {
          const f = serverFrame(buf);
          if (f.kind === 'message') log.messages.push(envelope(f.body));
        }
      })().catch((e) => log.errors.push(`stream: ${e}`));
    }
  })().catch((e) => log.errors.push(`streams: ${e}`));
  // Datagrams: one ServerFrame each, no prefix.
  (async () => {
    const datagrams = wt.datagrams.readable.getReader();
    for (;;) {
      const { value, done } = await datagrams.read();
      if (done) return;
      const f = serverFrame(value);
      if (f.kind === 'message') log.datagrams.push(envelope(f.body));
    }
  })().catch((e) => log.errors.push(`datagrams: ${e}`));

  // connect = 2 { client_id = 2 }
  const connected = await request(2, (o) => putString(2, 'chromium', o));
  if (connected.kind !== 'connected') throw new Error(`connect answered ${connected.kind}`);
  // subscribe = 3 { filter = 1, delivery = 8 (1 = datagram) }
  const s1 = await request(3, (o) => putString(1, streamCh, o));
  const s2 = await request(3, (o) => {
    putString(1, datagramCh, o);
    putUint(8, 1, o);
  });
  if (s1.kind !== 'subscribed' || s2.kind !== 'subscribed') throw new Error(`subscribe answered ${s1.kind}, ${s2.kind}`);
  return { clientId: td.decode(connected.body[1]), connectionId: td.decode(connected.body[2]) };
}

async function publishFromPage({ channel, text }) {
  const { putString, putBytes, te } = window.__wtPut;
  // publish = 5 { channel = 1, payload = 2 }
  const ack = await window.__wtRequest(5, (o) => {
    putString(1, channel, o);
    putBytes(2, te.encode(text), o);
  });
  if (ack.kind !== 'publish_ack') throw new Error(`publish answered ${ack.kind}`);
  return { serial: ack.body[3] ?? 0 };
}

async function main({ browser, page, step, finish }) {
  // A loopback http:// page is a secure context: WebTransport is available.
  // A page of the gateway's origin that runs no script of its own (the demo
  // page at `/` would open connections of its own).
  const home = await step('open page', () => page.goto(`${httpBase}/v1/transports`));
  if (!home || !home.ok()) throw new Error(`GET /v1/transports answered ${home && home.status()}`);

  const session = await step('open WebTransport', () =>
    page.evaluate(openSession, {
      url: `https://${quicAddr}/v1/wt`,
      hashHex: certHash,
      streamCh: STREAM_CH,
      datagramCh: DATAGRAM_CH,
    }),
  );
  const acks = await step('publish over REST', async () => {
    const out = [];
    for (let n = 1; n <= N; n++) {
      out.push(await publish(STREAM_CH, `in #${n}`));
      out.push(await publish(DATAGRAM_CH, `dg #${n}`));
    }
    return out;
  });
  await step('receive on the stream and as datagrams', () =>
    page.waitForFunction((n) => window.__wt.messages.length >= n && window.__wt.datagrams.length >= n, N),
  );
  const sent = await step('publish from the page', () =>
    page.evaluate(publishFromPage, { channel: OUT_CH, text: `hello from ${session.clientId}` }),
  );
  const log = await page.evaluate(() => window.__wt);

  const problems = [];
  const texts = log.messages.map((m) => m.payload);
  const want = Array.from({ length: N }, (_, i) => `in #${i + 1}`);
  if (JSON.stringify(texts) !== JSON.stringify(want)) problems.push(`stream messages ${JSON.stringify(texts)}`);
  for (let i = 1; i < log.messages.length; i++) {
    if (log.messages[i].prev !== log.messages[i - 1].serial) problems.push(`stream serial chain broken at ${i}`);
  }
  const streamAcks = acks.filter((a) => a.channel === STREAM_CH);
  if (log.messages[0]?.epoch !== streamAcks[0]?.epoch || log.messages[0]?.serial !== streamAcks[0]?.serial) {
    problems.push(`position ${JSON.stringify(log.messages[0])} differs from the REST ack ${JSON.stringify(streamAcks[0])}`);
  }
  const dgTexts = log.datagrams.map((m) => m.payload);
  const dgWant = Array.from({ length: N }, (_, i) => `dg #${i + 1}`);
  if (JSON.stringify(dgTexts) !== JSON.stringify(dgWant)) problems.push(`datagrams ${JSON.stringify(dgTexts)}`);
  if (log.errors.length) problems.push(`page errors: ${log.errors.join('; ')}`);
  if (!(sent.serial >= 1)) problems.push(`publish ack serial ${sent.serial}`);

  const summary = {
    client_id: session.clientId,
    messages: log.messages.length,
    datagrams: log.datagrams.length,
    published_serial: sent.serial,
    browser: browser.version(),
  };
  if (problems.length) return finish(1, { ok: false, reason: problems.join('; '), ...summary });
  return finish(0, { ok: true, ...summary });
}

run(OVERALL_MS, STEP_MS, main);
