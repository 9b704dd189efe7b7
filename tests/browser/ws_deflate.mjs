// A real browser's WebSocket against a running gateway, with
// permessage-deflate: headless Chromium (which always offers the extension)
// opens /v1/ws, and the page checks `ws.extensions`, then publishes
// messages from a few bytes to just under the message limit — highly
// compressible and not — on a channel it subscribes to, and must get every
// one back byte for byte, in order. Chromium compresses what it sends and
// inflates what the gateway compressed, so each round trip crosses both
// directions of the extension; a broken frame would fail the connection.
//
//   node tests/browser/ws_deflate.mjs HTTP_BASE
//   (e.g. http://127.0.0.1:8080)
//
// It starts no gateway itself (gateway/tests/browser.rs does). On success it
// prints one line `{"ok":true,...}` and exits 0; on failure it prints
// `{"ok":false,"reason":...}` and exits 1. The browser is always closed, and
// the whole run is bounded by OVERALL_MS.

import { run } from './harness.mjs';

const OVERALL_MS = 30_000;
const STEP_MS = 10_000;

const [httpBase] = process.argv.slice(2);
if (!httpBase) {
  console.log(JSON.stringify({ ok: false, reason: 'usage: ws_deflate.mjs HTTP_BASE' }));
  process.exit(2);
}

async function main({ browser, page, step, finish }) {
  // A page of the gateway's origin that runs no script of its own (the demo
  // page at `/` would open connections of its own).
  const home = await step('open page', () => page.goto(`${httpBase}/v1/transports`));
  if (!home || !home.ok()) throw new Error(`GET /v1/transports answered ${home && home.status()}`);

  const wsUrl = `${httpBase.replace(/^http/, 'ws')}/v1/ws?client_id=browser-deflate`;
  const result = await step('round trips', () =>
    page.evaluate(async (url) => {
      // Payload sizes up to just under the default 64 KiB message limit
      // (the channel name and the JSON escaping count too).
      const compressible = (n) => '{"sensor":"s1","temp":21.5,"unit":"C"} '.repeat(Math.ceil(n / 40)).slice(0, n);
      let seed = 7;
      const noise = (n) => {
        let s = '';
        for (let i = 0; i < n; i++) {
          seed = (seed * 1103515245 + 12345) & 0x7fffffff;
          s += String.fromCharCode(0x21 + (seed % 90)); // printable ASCII, no quote or backslash
        }
        return s.replace(/["\\]/g, 'x');
      };
      const texts = [
        'tiny',
        compressible(300),
        'grüße, ünïcödé ✓ '.repeat(200),
        compressible(20_000),
        noise(30_000),
        compressible(65_000),
      ];
      const ws = new WebSocket(url, 'switchboard.v1.json');
      const inbox = [];
      let wake = null;
      ws.onmessage = (e) => {
        inbox.push(JSON.parse(e.data));
        if (wake) wake();
      };
      const closed = new Promise((resolve) => {
        ws.onclose = (e) => resolve({ code: e.code, reason: e.reason });
      });
      const next = async (pred) => {
        for (;;) {
          const i = inbox.findIndex(pred);
          if (i >= 0) return inbox.splice(i, 1)[0];
          await new Promise((r) => {
            wake = r;
          });
        }
      };
      await new Promise((resolve, reject) => {
        ws.onopen = resolve;
        ws.onerror = () => reject(new Error('WebSocket error before open'));
      });
      const extensions = ws.extensions;
      await next((f) => f.type === 'connected');
      ws.send(JSON.stringify({ type: 'subscribe', req: 1, filter: 'browser/deflate' }));
      await next((f) => f.type === 'subscribed');
      const got = [];
      for (let i = 0; i < texts.length; i++) {
        ws.send(JSON.stringify({ type: 'publish', req: 10 + i, channel: 'browser/deflate', text: texts[i] }));
        const ack = await Promise.race([next((f) => f.req === 10 + i), closed]);
        if (ack.type !== 'publish_ack') return { extensions, error: `publish ${i}: ${JSON.stringify(ack).slice(0, 300)}` };
        const m = await next((f) => f.type === 'message');
        got.push({ size: texts[i].length, same: m.text === texts[i] });
      }
      ws.close(1000, 'done');
      return { extensions, got, close: await closed };
    }, wsUrl),
  );

  const problems = [];
  if (!/^permessage-deflate\b/.test(result.extensions || '')) {
    problems.push(`negotiated extensions ${JSON.stringify(result.extensions)}, want permessage-deflate`);
  }
  if (result.error) problems.push(result.error);
  for (const g of result.got || []) if (!g.same) problems.push(`a message of ${g.size} bytes came back different`);
  if ((result.got || []).length !== 6) problems.push(`${(result.got || []).length} round trips, want 6`);
  const summary = { extensions: result.extensions, round_trips: (result.got || []).length, close: result.close ?? null, browser: browser.version() };
  if (problems.length) return finish(1, { ok: false, reason: problems.join('; '), ...summary });
  return finish(0, { ok: true, ...summary });
}

run(OVERALL_MS, STEP_MS, main);
