// The browser client (`/v1/client.js`) in headless Chromium against a
// running gateway, one scenario per run:
//
//   node tests/browser/client.mjs forced   HTTP_BASE
//       each transport forced in turn (WebTransport, WebSocket, SSE, long
//       polling): subscribe, publish from the page and over REST, receive
//       every message once in order, presence (enter, events, members) and
//       history.
//   node tests/browser/client.mjs fallback HTTP_BASE
//       the page is loaded through a proxy in this script (a gateway without
//       QUIC behind it): by default the client lands on WebSocket; with the
//       proxy refusing WebSocket upgrades, on SSE; with it also holding back
//       streamed responses (as a buffering proxy does), on long polling; and
//       once the proxy lets everything through again, it climbs back up to
//       WebSocket. Every message arrives at every stage.
//   node tests/browser/client.mjs recovery HTTP_BASE
//       through the proxy: the page goes offline (`context.setOffline`)
//       while messages are published and while it publishes itself; back
//       online it has every message once, in order, and its queued publishes
//       are acknowledged; then the same across a forced change of transport
//       (offline, WebSocket upgrades refused meanwhile: back on SSE).
//   node tests/browser/client.mjs gaps     HTTP_BASE
//       a gateway keeping 3 messages per channel: on each transport forced
//       in turn, the page goes offline while 6 messages are published, and
//       back online it is told of the `trimmed` gap (from its position to
//       the channel's), then receives what follows; nothing is skipped in
//       silence.
//   node tests/browser/client.mjs silent   HTTP_BASE
//       through the proxy (a gateway with 1 s SSE keep-alives): for
//       WebSocket, SSE and long polling in turn, the proxy stops carrying
//       anything on the connections open (nothing is closed, no error comes);
//       the client notices by its own checks (WebSocket pings, SSE `ping`
//       events, a poll's deadline), reconnects, and has every message
//       published meanwhile once, in order.
//   node tests/browser/client.mjs drain    HTTP_BASE ADMIN_BASE
//       through the proxy: the node drains (admin `POST /v1/drain`); the
//       client is told to go (1012), and once a second node is up on the
//       same address and store (gateway/tests/browser_client.rs starts it
//       when the first has exited) it reconnects by itself and has every
//       message once, in order, with no gap.
//   node tests/browser/client.mjs tokens   HTTP_BASE SECRET
//       a gateway in token mode (HS256 key `k1` = SECRET, no leeway): one
//       client per transport with `getToken`, whose tokens live 3 s; over
//       8 s every client refreshes in place, never drops, and receives every
//       message published meanwhile once, in order.
//
// It starts no gateway itself (gateway/tests/browser_client.rs does). One
// JSON result line on stdout; exit 0 on success. Bounded by OVERALL_MS.

import { createHmac } from 'node:crypto';
import http from 'node:http';
import net from 'node:net';

import { run } from './harness.mjs';

const OVERALL_MS = 90_000;
const STEP_MS = 20_000;

const [scenario, httpBase, third] = process.argv.slice(2);
const known = ['forced', 'fallback', 'recovery', 'tokens', 'drain', 'gaps', 'silent'];
if (!known.includes(scenario) || !httpBase || (['tokens', 'drain'].includes(scenario) && !third)) {
  console.log(JSON.stringify({ ok: false, reason: 'usage: client.mjs forced|fallback|recovery|gaps|silent HTTP_BASE | tokens HTTP_BASE SECRET | drain HTTP_BASE ADMIN_BASE' }));
  process.exit(2);
}

const b64url = (x) => Buffer.from(x).toString('base64url');

/** Token mode's HS256 secret (`tokens`). */
const tokenSecret = scenario === 'tokens' ? third : '';

/** An HS256 token of key `k1` for `sub`, valid `ttl` seconds, with every right on `tok/#`. */
function mint(sub, ttl) {
  const head = b64url(JSON.stringify({ alg: 'HS256', typ: 'JWT', kid: 'k1' }));
  const exp = Math.floor(Date.now() / 1000) + ttl;
  const body = b64url(JSON.stringify({ sub, exp, caps: { 'tok/#': 'subscribe,publish,presence,history' } }));
  const sig = createHmac('sha256', tokenSecret).update(`${head}.${body}`).digest('base64url');
  return `${head}.${body}.${sig}`;
}

/** Publishes over REST, straight to the gateway (with a token in token mode). */
async function publish(channel, text) {
  const headers = { 'content-type': 'text/plain' };
  if (tokenSecret) headers.authorization = `Bearer ${mint('publisher', 60)}`;
  const res = await fetch(`${httpBase}/v1/channels/${encodeURIComponent(channel)}/messages`, {
    method: 'POST',
    headers,
    body: text,
  });
  if (!res.ok) throw new Error(`publish to ${channel}: HTTP ${res.status} ${await res.text()}`);
  return res.json();
}

/**
 * A forwarding HTTP proxy on 127.0.0.1:0 that a test can turn hostile:
 * `refuseUpgrades` answers WebSocket upgrades 403; `holdStreams` holds back
 * SSE responses (headers and body) as a buffering proxy does.
 */
async function startProxy(upstream) {
  const target = new URL(upstream);
  const mode = { refuseUpgrades: false, holdStreams: false };
  const sockets = new Set();
  // What `freezeAll` stops: every exchange in progress.
  const links = new Set();
  const server = http.createServer((req, res) => {
    const held = mode.holdStreams && req.url.startsWith('/v1/sse');
    const up = http.request(
      { host: target.hostname, port: target.port, method: req.method, path: req.url, headers: req.headers },
      (upRes) => {
        if (held) {
          // Never forwarded: the stream never ends, so nothing arrives.
          upRes.resume();
          return;
        }
        res.writeHead(upRes.statusCode, upRes.headers);
        upRes.pipe(res);
        const link = () => {
          upRes.unpipe(res);
          upRes.pause();
        };
        links.add(link);
        res.on('close', () => links.delete(link));
      },
    );
    up.on('error', () => res.destroy());
    res.on('close', () => up.destroy());
    req.pipe(up);
  });
  server.on('connection', (s) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
  });
  server.on('upgrade', (req, socket, head) => {
    if (mode.refuseUpgrades) {
      socket.end('HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\nconnection: close\r\n\r\n');
      return;
    }
    const up = net.connect(Number(target.port), target.hostname, () => {
      let head0 = `${req.method} ${req.url} HTTP/1.1\r\n`;
      for (let i = 0; i < req.rawHeaders.length; i += 2) head0 += `${req.rawHeaders[i]}: ${req.rawHeaders[i + 1]}\r\n`;
      up.write(`${head0}\r\n`);
      if (head.length) up.write(head);
      up.pipe(socket);
      socket.pipe(up);
      const link = () => {
        up.unpipe(socket);
        socket.unpipe(up);
        up.pause();
        socket.pause();
      };
      links.add(link);
      up.on('close', () => links.delete(link));
    });
    sockets.add(up);
    up.on('close', () => sockets.delete(up));
    up.on('error', () => socket.destroy());
    socket.on('error', () => up.destroy());
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  const base = `http://127.0.0.1:${server.address().port}`;
  return {
    base,
    mode,
    /**
     * Stops every exchange in progress without closing anything: the
     * connections stay open and carry nothing more (a path that died in
     * silence). New ones pass.
     */
    freezeAll() {
      for (const link of links) link();
      links.clear();
    },
    /** Cuts every connection through it (clients see their transport drop). */
    dropAll() {
      for (const s of sockets) s.destroy();
    },
    close() {
      for (const s of sockets) s.destroy();
      server.close();
    },
  };
}

/** Installs the client module and a recorder in the page. */
async function installClient(page, base) {
  await page.goto(`${base}/v1/transports`);
  await page.evaluate(async () => {
    const mod = await import('/v1/client.js');
    window.sb = { mod, clients: {} };
    window.makeClient = (name, options) => {
      const c = mod.connect(location.origin, options);
      const log = { messages: [], presence: [], gaps: [], states: [], errors: [], disconnects: [] };
      c.on('state', (s) => log.states.push(`${s.state}:${s.transport || ''}`));
      c.on('gap', (g) => log.gaps.push(g));
      c.on('error', (e) => log.errors.push(`${e.code || ''} ${e.message}`));
      c.on('disconnected', (d) => log.disconnects.push(d.code));
      window.sb.clients[name] = { c, log };
      return true;
    };
    window.subscribeAll = (name, filter, options = {}) => {
      const { c, log } = window.sb.clients[name];
      return c.subscribe(filter, (m) => log.messages.push(m), { ...options, onPresence: (m) => log.presence.push(m) }).ready.then(() => true);
    };
  });
}

/** Waits until client `name` is connected (on `transport`, when given). */
async function connected(page, name, transport) {
  await page.waitForFunction(
    ([n, t]) => {
      const x = window.sb.clients[n];
      return x && x.c.state === 'connected' && (!t || x.c.transport === t);
    },
    [name, transport],
  );
  return page.evaluate((n) => window.sb.clients[n].c.transport, name);
}

/** Waits until client `name` received `count` messages on `channel`; returns them compactly. */
async function received(page, name, channel, count) {
  await page.waitForFunction(
    ([n, ch, k]) => window.sb.clients[n].log.messages.filter((m) => m.channel === ch).length >= k,
    [name, channel, count],
  );
  return page.evaluate(
    ([n, ch]) =>
      window.sb.clients[n].log.messages
        .filter((m) => m.channel === ch)
        .map((m) => ({ serial: m.serial, prev: m.prev_serial, text: m.text ?? JSON.stringify(m.data), epoch: m.epoch })),
    [name, channel],
  );
}

/** Every message once, in order, with an unbroken prev_serial chain, and exactly `texts`. */
function exactly(got, texts, what) {
  const seen = got.map((m) => m.text);
  if (JSON.stringify(seen) !== JSON.stringify(texts)) {
    throw new Error(`${what}: got ${JSON.stringify(seen)}, want ${JSON.stringify(texts)}`);
  }
  for (let i = 1; i < got.length; i++) {
    if (got[i].prev !== got[i - 1].serial || got[i].epoch !== got[0].epoch) {
      throw new Error(`${what}: chain broken at ${i}: ${JSON.stringify(got)}`);
    }
  }
}

async function forced({ page, step, finish }) {
  const results = {};
  await step('load the client', () => installClient(page, httpBase));
  for (const transport of ['webtransport', 'websocket', 'sse', 'poll']) {
    const ch = `forced/${transport}`;
    const me = `page-${transport}`;
    const early = `${ch}/early`;
    await step(`${transport}: connect, subscribing while it connects`, async () => {
      await page.evaluate(([n, t, id, e]) => {
        window.makeClient(n, { transports: [t], clientId: id });
        // Made while the transport is still connecting.
        setTimeout(() => window.subscribeAll(n, e), 0);
      }, [transport, transport, me, early]);
      await connected(page, transport, transport);
      await page.waitForFunction(([n, e]) => window.sb.clients[n].c.subs.get(e)?.established, [transport, early]);
    });
    await step(`${transport}: subscribe with presence`, () => page.evaluate(([n, c]) => window.subscribeAll(n, c, { presence: true }), [transport, ch]));
    await step(`${transport}: enter presence`, () => page.evaluate(([n, c]) => window.sb.clients[n].c.presence.enter(c, { role: 'tester' }), [transport, ch]));
    const acks = await step(`${transport}: publish from the page`, () =>
      page.evaluate(async ([n, c]) => {
        const { c: client } = window.sb.clients[n];
        const out = [];
        for (let i = 1; i <= 3; i++) out.push(await client.publish(c, `page ${i}`));
        return out;
      }, [transport, ch]),
    );
    await step(`${transport}: publish over REST`, async () => {
      await publish(ch, 'rest 4');
      await publish(ch, 'rest 5');
    });
    const got = await step(`${transport}: receive`, () => received(page, transport, ch, 5));
    exactly(got, ['page 1', 'page 2', 'page 3', 'rest 4', 'rest 5'], transport);
    if (acks.map((a) => a.serial).join() !== got.slice(0, 3).map((m) => m.serial).join()) {
      throw new Error(`${transport}: acks ${JSON.stringify(acks)} do not name the delivered positions ${JSON.stringify(got)}`);
    }
    const presence = await step(`${transport}: presence event and members`, async () => {
      await page.waitForFunction((n) => window.sb.clients[n].log.presence.some((m) => m.kind === 'presence.enter'), transport);
      return page.evaluate(async ([n, c]) => {
        const { c: client, log } = window.sb.clients[n];
        const members = await client.presence.members(c);
        const enter = log.presence.find((m) => m.kind === 'presence.enter');
        return { members: members.map((m) => ({ client_id: m.client_id, data: m.data })), enter: { client_id: enter.publisher.client_id, data: enter.data } };
      }, [transport, ch]);
    });
    const history = await step(`${transport}: history`, () =>
      page.evaluate(async ([n, c]) => {
        const h = await window.sb.clients[n].c.history(c, { limit: 10 });
        return { serial: h.serial, texts: h.messages.map((m) => m.text) };
      }, [transport, ch]),
    );
    await publish(early, 'early 1');
    const earlyGot = await step(`${transport}: the subscription made while connecting receives`, () => received(page, transport, early, 1));
    // A new subscription's rewind on a channel another subscription of the
    // same client already received: it gets the rewind all the same (on SSE
    // and polling, read while the stream stays open).
    const rewound = await step(`${transport}: a rewind of what another subscription got`, () =>
      page.evaluate(async ([n, c]) => {
        const { c: client } = window.sb.clients[n];
        const got = [];
        await client.subscribe('forced/+', (m) => m.channel === c && got.push(m.text), { rewind: 3 }).ready;
        const until = Date.now() + 5000;
        while (got.length < 3 && Date.now() < until) await new Promise((r) => setTimeout(r, 50));
        return got;
      }, [transport, ch]),
    );
    const used = await page.evaluate((n) => window.sb.clients[n].c.transport, transport);
    await page.evaluate((n) => window.sb.clients[n].c.close(), transport);
    results[transport] = { transport: used, messages: got.length, serials: got.map((m) => m.serial), presence, history, early: earlyGot.length, rewound };
  }
  finish(0, { ok: true, results });
}

async function fallback({ page, step, finish }) {
  const proxy = await startProxy(httpBase);
  const stages = {};
  try {
    await step('load the client through the proxy', () => installClient(page, proxy.base));
    const stage = async (name, expect, options) => {
      const ch = `fallback/${name}`;
      // Subscribed from the start, as a page does: a transport must carry
      // the stream to count as connected.
      await step(`${name}: connect and subscribe`, async () => {
        await page.evaluate(([n, o, c]) => {
          window.makeClient(n, o);
          window.subscribeAll(n, c);
        }, [name, options, ch]);
        await connected(page, name, expect);
        await page.waitForFunction(([n, c]) => window.sb.clients[n].c.subs.get(c).established, [name, ch]);
      });
      await step(`${name}: publish`, async () => {
        for (let i = 1; i <= 5; i++) await publish(ch, `m${i}`);
      });
      const got = await step(`${name}: receive`, () => received(page, name, ch, 5));
      exactly(got, ['m1', 'm2', 'm3', 'm4', 'm5'], name);
      const states = await page.evaluate((n) => window.sb.clients[n].log.states, name);
      stages[name] = { transport: await page.evaluate((n) => window.sb.clients[n].c.transport, name), states, messages: got.length };
    };
    const quick = { connectTimeout: 3000, upgradeAfter: 0 };
    await stage('no_quic', 'websocket', quick);
    proxy.mode.refuseUpgrades = true;
    await stage('no_websocket', 'sse', quick);
    proxy.mode.holdStreams = true;
    await stage('no_streaming', 'poll', { connectTimeout: 3000, upgradeAfter: 2000 });
    // Everything allowed again: the polling client climbs back to WebSocket
    // and keeps receiving, once each.
    proxy.mode.refuseUpgrades = false;
    proxy.mode.holdStreams = false;
    await step('climb back: upgrade to websocket', () => connected(page, 'no_streaming', 'websocket'));
    for (let i = 6; i <= 8; i++) await publish('fallback/no_streaming', `m${i}`);
    const got = await step('climb back: receive', () => received(page, 'no_streaming', 'fallback/no_streaming', 8));
    exactly(got, ['m1', 'm2', 'm3', 'm4', 'm5', 'm6', 'm7', 'm8'], 'after the upgrade');
    stages.climb_back = { transport: await page.evaluate(() => window.sb.clients.no_streaming.c.transport), messages: got.length };
  } finally {
    proxy.close();
  }
  finish(0, { ok: true, stages });
}

async function recovery({ page, step, finish }) {
  const proxy = await startProxy(httpBase);
  const context = page.context();
  const ch = 'recovery/a';
  const texts = [];
  const out = {};
  try {
    await step('load the client through the proxy', () => installClient(page, proxy.base));
    await step('connect', async () => {
      await page.evaluate(() => window.makeClient('r', { connectTimeout: 3000, upgradeAfter: 0, retryMax: 1000 }));
      out.first = await connected(page, 'r');
    });
    await step('subscribe', () => page.evaluate((c) => window.subscribeAll('r', c), ch));
    for (let i = 1; i <= 3; i++) texts.push((await publish(ch, `before ${i}`), `before ${i}`));
    await step('receive before', () => received(page, 'r', ch, 3));

    // Offline: the page publishes (queued) and REST publishes while away.
    await context.setOffline(true);
    await step('notice offline', () => page.waitForFunction(() => window.sb.clients.r.c.state !== 'connected'));
    await page.evaluate((c) => {
      window.pagePublishes = [1, 2].map((i) => window.sb.clients.r.c.publish(c, `queued ${i}`));
    }, ch);
    for (let i = 1; i <= 4; i++) texts.push((await publish(ch, `away ${i}`), `away ${i}`));
    texts.push('queued 1', 'queued 2');
    await context.setOffline(false);
    out.back = await step('reconnect', () => connected(page, 'r'));
    const acks = await step('queued publishes acknowledged', () => page.evaluate(() => Promise.all(window.pagePublishes)));
    for (let i = 1; i <= 2; i++) texts.push((await publish(ch, `after ${i}`), `after ${i}`));
    let got = await step('receive everything once', () => received(page, 'r', ch, texts.length));
    exactly(got, texts, 'offline and back');
    out.acks = acks.map((a) => ({ serial: a.serial, duplicate: a.duplicate }));

    // A forced change of transport: offline again, and WebSocket upgrades
    // are refused meanwhile, so the client comes back on SSE.
    await context.setOffline(true);
    await step('notice offline again', () => page.waitForFunction(() => window.sb.clients.r.c.state !== 'connected'));
    proxy.mode.refuseUpgrades = true;
    proxy.dropAll();
    for (let i = 1; i <= 4; i++) texts.push((await publish(ch, `switch ${i}`), `switch ${i}`));
    await context.setOffline(false);
    out.switched = await step('reconnect on sse', () => connected(page, 'r', 'sse'));
    texts.push((await publish(ch, 'on sse'), 'on sse'));
    got = await step('receive everything once after the switch', () => received(page, 'r', ch, texts.length));
    exactly(got, texts, 'across the transport change');
    out.messages = got.length;
    out.gaps = await page.evaluate(() => window.sb.clients.r.log.gaps.length);
    out.states = await page.evaluate(() => window.sb.clients.r.log.states);
    // Nothing more arrives late (a duplicate would).
    await page.waitForTimeout(300);
    const total = await page.evaluate((c) => window.sb.clients.r.log.messages.filter((m) => m.channel === c).length, ch);
    if (total !== texts.length) throw new Error(`${total} messages after settling, want ${texts.length}`);
  } finally {
    proxy.close();
  }
  finish(0, { ok: true, ...out });
}

async function tokens({ page, step, finish }) {
  const TTL = 3;
  const RUN_MS = 8000;
  const minted = {};
  await page.exposeFunction('mintToken', (sub) => {
    minted[sub] = (minted[sub] || 0) + 1;
    return mint(sub, TTL);
  });
  await step('load the client', () => installClient(page, httpBase));
  const transports = ['webtransport', 'websocket', 'sse', 'poll'];
  await step('connect every transport with getToken', async () => {
    await page.evaluate((ts) => {
      for (const t of ts) {
        window.makeClient(t, { transports: [t], getToken: () => window.mintToken(`tok-${t}`) });
        window.subscribeAll(t, `tok/${t}`);
      }
    }, transports);
    for (const t of transports) {
      await connected(page, t, t);
      await page.waitForFunction(([n, c]) => window.sb.clients[n].c.subs.get(c).established, [t, `tok/${t}`]);
    }
  });
  // Messages throughout more than two token lifetimes.
  const sent = {};
  const until = Date.now() + RUN_MS;
  for (let i = 1; Date.now() < until; i++) {
    for (const t of transports) {
      await publish(`tok/${t}`, `m${i}`);
      (sent[t] = sent[t] || []).push(`m${i}`);
    }
    await page.waitForTimeout(400);
  }
  const results = {};
  for (const t of transports) {
    const got = await step(`${t}: receive`, () => received(page, t, `tok/${t}`, sent[t].length));
    exactly(got, sent[t], t);
    const states = await page.evaluate((n) => window.sb.clients[n].log.states, t);
    const errors = await page.evaluate((n) => window.sb.clients[n].log.errors, t);
    results[t] = { messages: got.length, minted: minted[`tok-${t}`] || 0, states, errors };
  }
  finish(0, { ok: true, ttl: TTL, run_ms: RUN_MS, results });
}

async function drain({ page, step, finish }) {
  const adminBase = third;
  const proxy = await startProxy(httpBase);
  const ch = 'drain/a';
  const texts = [];
  const out = {};
  try {
    await step('load the client through the proxy', () => installClient(page, proxy.base));
    await step('connect and subscribe', async () => {
      await page.evaluate((c) => {
        window.makeClient('d', { connectTimeout: 3000, retryMax: 1000, upgradeAfter: 1000 });
        window.subscribeAll('d', c);
      }, ch);
      out.before = await connected(page, 'd');
      await page.waitForFunction((c) => window.sb.clients.d.c.subs.get(c).established, ch);
    });
    for (let i = 1; i <= 3; i++) texts.push((await publish(ch, `first ${i}`), `first ${i}`));
    await step('receive from the first node', () => received(page, 'd', ch, 3));
    const res = await fetch(`${adminBase}/v1/drain`, { method: 'POST' });
    if (res.status !== 202) throw new Error(`POST /v1/drain: HTTP ${res.status}`);
    await step('told to go', () => page.waitForFunction(() => window.sb.clients.d.log.disconnects.length > 0));
    out.told = await page.evaluate(() => window.sb.clients.d.log.disconnects[0]);
    // The second node comes up on the same address once the first exited.
    await step('the second node answers', async () => {
      for (;;) {
        const up = await fetch(`${httpBase}/v1/transports`).then((r) => r.ok, () => false);
        if (up) return;
        await new Promise((r) => setTimeout(r, 100));
      }
    });
    for (let i = 1; i <= 3; i++) texts.push((await publish(ch, `second ${i}`), `second ${i}`));
    out.after = await step('reconnect', () => connected(page, 'd'));
    const got = await step('receive everything once', () => received(page, 'd', ch, texts.length));
    exactly(got, texts, 'across the drain');
    out.messages = got.length;
    out.gaps = await page.evaluate(() => window.sb.clients.d.log.gaps);
    await page.waitForTimeout(300);
    const total = await page.evaluate((c) => window.sb.clients.d.log.messages.filter((m) => m.channel === c).length, ch);
    if (total !== texts.length) throw new Error(`${total} messages after settling, want ${texts.length}`);
  } finally {
    proxy.close();
  }
  finish(0, { ok: true, ...out });
}

async function gaps({ page, step, finish }) {
  const context = page.context();
  const results = {};
  await step('load the client', () => installClient(page, httpBase));
  for (const transport of ['webtransport', 'websocket', 'sse', 'poll']) {
    const ch = `gap/${transport}`;
    await step(`${transport}: connect and subscribe`, async () => {
      await page.evaluate(([n, t, c]) => {
        window.makeClient(n, { transports: [t], retryMax: 1000 });
        window.subscribeAll(n, c);
      }, [transport, transport, ch]);
      await connected(page, transport, transport);
      await page.waitForFunction(([n, c]) => window.sb.clients[n].c.subs.get(c).established, [transport, ch]);
    });
    await publish(ch, 'kept 1');
    await publish(ch, 'kept 2');
    await step(`${transport}: receive before`, () => received(page, transport, ch, 2));
    await context.setOffline(true);
    await step(`${transport}: notice offline`, () => page.waitForFunction((n) => window.sb.clients[n].c.state !== 'connected', transport));
    // History keeps 3: serials 3..5 are trimmed by the time it is back.
    for (let i = 1; i <= 6; i++) await publish(ch, `away ${i}`);
    await context.setOffline(false);
    await step(`${transport}: reconnect`, () => connected(page, transport, transport));
    await step(`${transport}: told of the gap`, () => page.waitForFunction((n) => window.sb.clients[n].log.gaps.length > 0, transport));
    await publish(ch, 'after');
    const got = await step(`${transport}: receive after`, () => received(page, transport, ch, 3));
    const gap = await page.evaluate((n) => window.sb.clients[n].log.gaps.map((g) => ({ reason: g.reason, from: g.from && g.from.serial, to: g.to && g.to.serial })), transport);
    await page.evaluate((n) => window.sb.clients[n].c.close(), transport);
    results[transport] = { texts: got.map((m) => m.text), serials: got.map((m) => m.serial), gaps: gap };
  }
  finish(0, { ok: true, results });
}

async function silent({ page, step, finish }) {
  const proxy = await startProxy(httpBase);
  const results = {};
  try {
    await step('load the client through the proxy', () => installClient(page, proxy.base));
    for (const transport of ['websocket', 'sse', 'poll']) {
      const ch = `silent/${transport}`;
      const texts = [];
      await step(`${transport}: connect and subscribe`, async () => {
        await page.evaluate(([n, t, c]) => {
          window.makeClient(n, { transports: [t], pingInterval: 1000, requestTimeout: 1500, pollTimeout: 2, retryMax: 1000 });
          window.subscribeAll(n, c);
        }, [transport, transport, ch]);
        await connected(page, transport, transport);
        await page.waitForFunction(([n, c]) => window.sb.clients[n].c.subs.get(c).established, [transport, ch]);
      });
      for (let i = 1; i <= 2; i++) texts.push((await publish(ch, `before ${i}`), `before ${i}`));
      await step(`${transport}: receive before`, () => received(page, transport, ch, 2));
      proxy.freezeAll();
      for (let i = 1; i <= 3; i++) texts.push((await publish(ch, `silent ${i}`), `silent ${i}`));
      if (transport !== 'poll') {
        // A poll past its deadline is just polled again, on a new
        // connection: no disconnect to see there.
        await step(`${transport}: notice the dead path`, () =>
          page.waitForFunction((n) => window.sb.clients[n].log.disconnects.length > 0, transport),
        );
        await step(`${transport}: reconnect`, () => connected(page, transport, transport));
      }
      const got = await step(`${transport}: receive everything once`, () => received(page, transport, ch, texts.length));
      exactly(got, texts, transport);
      const disconnects = await page.evaluate((n) => window.sb.clients[n].log.disconnects, transport);
      await page.evaluate((n) => window.sb.clients[n].c.close(), transport);
      results[transport] = { messages: got.length, disconnects };
    }
  } finally {
    proxy.close();
  }
  finish(0, { ok: true, results });
}

run(OVERALL_MS, STEP_MS, async (ctx) => {
  const main = { forced, fallback, recovery, tokens, drain, gaps, silent }[scenario];
  await main(ctx);
});
