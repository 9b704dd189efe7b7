// A real browser's EventSource against a running gateway: headless Chromium
// subscribes to two channels with `new EventSource(...)` and nothing else;
// this script publishes over REST, has the server end the stream halfway
// (admin `POST /v1/sessions/{id}/close`), and publishes the rest while the
// browser is away. The browser reconnects by itself with `Last-Event-ID`, and
// the page must end with every message exactly once, in per-channel order.
//
//   node tests/browser/eventsource.mjs HTTP_BASE ADMIN_BASE
//   (e.g. http://127.0.0.1:8080 http://127.0.0.1:9090)
//
// It starts no gateway itself (gateway/tests/browser.rs does). On success it
// prints one line `{"ok":true,...}` and exits 0; on failure it prints
// `{"ok":false,"reason":...}` and exits 1. The browser is always closed, and
// the whole run is bounded by OVERALL_MS.

import { run } from './harness.mjs';

const OVERALL_MS = 30_000;
const STEP_MS = 10_000;
const CHANNELS = ['browser/a', 'browser/b'];
const PER_CHANNEL = 6; // half before the drop, half while the browser is away

const [httpBase, adminBase] = process.argv.slice(2);
if (!httpBase || !adminBase) {
  console.log(JSON.stringify({ ok: false, reason: 'usage: eventsource.mjs HTTP_BASE ADMIN_BASE' }));
  process.exit(2);
}

/** Publishes one message over REST; returns the gateway's answer. */
async function publish(channel, payload) {
  const url = `${httpBase}/v1/channels/${channel}/messages`;
  const res = await fetch(url, { method: 'POST', body: payload });
  if (!res.ok) throw new Error(`publish to ${channel}: HTTP ${res.status} ${await res.text()}`);
  return res.json();
}

async function admin(method, path) {
  const res = await fetch(`${adminBase}${path}`, { method });
  if (!res.ok) throw new Error(`${method} ${path}: HTTP ${res.status} ${await res.text()}`);
  return res.json();
}

/** Publishes messages first..=last on every channel, interleaved. */
async function publishRange(first, last) {
  const acks = [];
  for (let n = first; n <= last; n++) {
    for (const ch of CHANNELS) acks.push(await publish(ch, `${ch} #${n}`));
  }
  return acks;
}

async function main({ browser, page, step, finish }) {

  // Every SSE request the browser makes, with its Last-Event-ID: the proof
  // that the second one is the browser's own reconnect.
  const sseRequests = [];
  page.on('request', async (req) => {
    if (!req.url().includes('/v1/sse')) return;
    const entry = { url: req.url(), lastEventId: null };
    sseRequests.push(entry);
    try {
      entry.lastEventId = (await req.allHeaders())['last-event-id'] ?? null;
    } catch {
      // Headers are unavailable once the page is gone; the count still holds.
    }
  });

  // Same origin as /v1/sse, so the EventSource needs no CORS.
  // A page of the gateway's origin that runs no script of its own (the demo
  // page at `/` would open connections of its own).
  const home = await step('open page', () => page.goto(`${httpBase}/v1/transports`));
  if (!home || !home.ok()) throw new Error(`GET /v1/transports answered ${home && home.status()}`);

  const query = CHANNELS.map((c) => `channel=${encodeURIComponent(c)}`).join('&');
  await step('open EventSource', () =>
    page.evaluate((url) => {
      const log = { messages: [], connected: [], disconnects: [], gaps: [], opens: 0, errors: 0 };
      window.__sb = log;
      const es = new EventSource(url);
      es.addEventListener('open', () => log.opens++);
      es.addEventListener('error', () => log.errors++);
      es.addEventListener('connected', (e) => log.connected.push({ ...JSON.parse(e.data), lastEventId: e.lastEventId }));
      es.addEventListener('disconnect', (e) => log.disconnects.push(JSON.parse(e.data)));
      es.addEventListener('gap', (e) => log.gaps.push(JSON.parse(e.data)));
      es.addEventListener('message', (e) => {
        const m = JSON.parse(e.data);
        log.messages.push({ channel: m.channel, serial: m.serial, prev: m.prev_serial, text: m.text, id: e.lastEventId });
      });
    }, `/v1/sse?${query}`),
  );
  const connId = await step('wait for connected', async () => {
    await page.waitForFunction(() => window.__sb.connected.length === 1);
    return page.evaluate(() => window.__sb.connected[0].connection_id);
  });

  const half = PER_CHANNEL / 2;
  const total = PER_CHANNEL * CHANNELS.length;
  await step('publish first half', () => publishRange(1, half));
  await step('receive first half', () =>
    page.waitForFunction((n) => window.__sb.messages.length >= n, half * CHANNELS.length),
  );

  // The server ends the stream: find this browser's session and close it.
  const session = await step('find session', async () => {
    const { sessions } = await admin('GET', '/v1/sessions');
    const s = sessions.find((x) => x.protocol === 'sse' && x.connection_id === connId);
    if (!s) throw new Error(`no sse session with connection_id ${connId}: ${JSON.stringify(sessions)}`);
    return s;
  });
  await step('close session', () => admin('POST', `/v1/sessions/${session.id}/close`));
  await step('see disconnect', () => page.waitForFunction(() => window.__sb.disconnects.length >= 1));

  // Published while the browser is away (its retry is ~1 s): these reach it
  // only through recovery from history on its own reconnect.
  await step('publish second half', () => publishRange(half + 1, PER_CHANNEL));
  await step('receive everything', () =>
    page.waitForFunction(
      (n) => window.__sb.connected.length >= 2 && window.__sb.messages.length >= n,
      total,
    ),
  );
  // Anything extra (a duplicate) would arrive right behind; give it a moment.
  await new Promise((r) => setTimeout(r, 300));
  const log = await page.evaluate(() => window.__sb);

  const problems = [];
  const expected = [];
  for (const ch of CHANNELS) for (let n = 1; n <= PER_CHANNEL; n++) expected.push(`${ch} #${n}`);
  const texts = log.messages.map((m) => m.text);
  if (texts.length !== total) problems.push(`got ${texts.length} messages, want ${total}`);
  for (const t of expected) {
    const k = texts.filter((x) => x === t).length;
    if (k !== 1) problems.push(`${JSON.stringify(t)} arrived ${k} times`);
  }
  for (const ch of CHANNELS) {
    const mine = log.messages.filter((m) => m.channel === ch);
    const want = expected.filter((t) => t.startsWith(`${ch} #`));
    if (JSON.stringify(mine.map((m) => m.text)) !== JSON.stringify(want)) {
      problems.push(`${ch} order: ${JSON.stringify(mine.map((m) => m.text))}`);
    }
    for (let i = 1; i < mine.length; i++) {
      if (mine[i].prev !== mine[i - 1].serial) problems.push(`${ch}: serial ${mine[i].serial} has prev ${mine[i].prev}`);
    }
  }
  if (log.gaps.length) problems.push(`unexpected gap events: ${JSON.stringify(log.gaps)}`);
  if (log.connected.length !== 2) problems.push(`${log.connected.length} connected events, want 2`);
  if (log.connected.length === 2 && log.connected[0].connection_id === log.connected[1].connection_id) {
    problems.push('the second stream reused the first connection id');
  }
  if (log.disconnects[0]?.code !== 4003) problems.push(`disconnect event ${JSON.stringify(log.disconnects[0])}, want code 4003`);
  if (sseRequests.length !== 2) problems.push(`${sseRequests.length} SSE requests, want 2`);
  const lastBeforeDrop = log.messages[half * CHANNELS.length - 1]?.id;
  const resumedWith = sseRequests[1]?.lastEventId;
  if (resumedWith !== lastBeforeDrop) {
    problems.push(`reconnect sent Last-Event-ID ${JSON.stringify(resumedWith)}, want ${JSON.stringify(lastBeforeDrop)}`);
  }

  const summary = {
    messages: texts.length,
    opens: log.opens,
    connected: log.connected.length,
    disconnect: log.disconnects[0] ?? null,
    sse_requests: sseRequests.length,
    last_event_id_on_reconnect: resumedWith ?? null,
    browser: browser.version(),
  };
  if (problems.length) return finish(1, { ok: false, reason: problems.join('; '), ...summary });
  return finish(0, { ok: true, ...summary });
}

run(OVERALL_MS, STEP_MS, main);
