// @ts-check
/**
 * Switchboard's browser client: one ES module, no dependencies, no build
 * step. The gateway serves it at `/v1/client.js`.
 *
 * ```js
 * import { connect } from 'http://127.0.0.1:8080/v1/client.js';
 * const sb = connect('http://127.0.0.1:8080');
 * sb.subscribe('chat/+', (m) => console.log(m.channel, m.serial, m.data ?? m.text), { rewind: 10 });
 * await sb.publish('chat/lobby', { msg: 'hi' });
 * ```
 *
 * What it does for the page (docs/client.md has the whole API):
 *
 * - **Transports, with fallback.** WebTransport, then WebSocket, then
 *   Server-Sent Events (publishing over REST), then long polling, in an
 *   order the page may change. It moves down the list when a transport
 *   cannot connect within `connectTimeout` or keeps dropping, and probes the
 *   better ones again every `upgradeAfter`.
 * - **Recovery on any transport.** Positions `(epoch, serial)` are the same
 *   on every protocol, so the client keeps one position per channel and,
 *   after any reconnect on whichever transport, resumes every subscription
 *   from it (WebSocket and WebTransport `positions` and `since_ms`; SSE and
 *   long polling a cursor it builds itself). A gap the gateway reports, or a
 *   hole in a channel's `prev_serial` chain, reaches the page as a `gap`;
 *   nothing is skipped in silence, and nothing is delivered twice (a
 *   message at or below a channel's position is dropped).
 * - **Publishes survive a disconnect.** They are queued (bounded) with an
 *   idempotency id and sent, or sent again, once connected; the gateway's
 *   dedupe window makes a retry deliver once.
 * - **Tokens.** A static `token`, or `getToken()`, called before each
 *   connect and again before the token expires, to refresh the session in
 *   place on every transport.
 *
 * It does not: bundle any third-party code, keep anything across page
 * loads (positions live in memory), or use WebTransport datagrams.
 */

/** @typedef {'webtransport' | 'websocket' | 'sse' | 'poll'} TransportName */
/** @typedef {'connecting' | 'connected' | 'disconnected' | 'failed' | 'closed'} State */
/** @typedef {{ epoch: string, serial: number }} Position */
/**
 * A message or presence event, in the JSON shape of docs/protocol.md on
 * every transport: the payload is `data` (a JSON value), `text` (other
 * UTF-8) or `data_b64` (other bytes).
 * @typedef {{
 *   type: 'message', channel: string, epoch: string, serial: number, prev_serial: number,
 *   timestamp: number, kind: 'message' | 'presence.enter' | 'presence.update' | 'presence.leave',
 *   id?: string, publisher?: { client_id?: string, protocol?: string, node?: string, connection_id?: string },
 *   content_type?: string, headers?: Record<string, string>, retain?: boolean,
 *   data?: any, text?: string, data_b64?: string,
 * }} Message
 */
/**
 * History could not fill what was missed (`trimmed`, `epoch_changed`,
 * `not_granted`, from the gateway), or the client saw a hole in a channel's
 * `prev_serial` chain (`missed`: e.g. a `drop-oldest` slow-consumer policy).
 * Delivery continues after `to`.
 * @typedef {{ channel: string, from?: Position, to?: Position, reason: string }} Gap
 */
/** @typedef {{ channel: string, epoch: string, serial: number, duplicate: boolean }} Ack */
/** @typedef {{ client_id: string, connection_id: string, protocol?: string, data?: any, text?: string, data_b64?: string }} Member */
/** @typedef {{ channel: string, epoch: string, serial: number, messages: Message[] }} HistoryPage */
/**
 * @typedef {{
 *   rewind?: number | string | { count?: number, durationMs?: number },
 *   presence?: boolean,
 *   retained?: boolean,
 *   onPresence?: (m: Message) => void,
 *   onGap?: (g: Gap) => void,
 * }} SubscribeOptions
 */
/**
 * @typedef {{
 *   transports?: TransportName[],
 *   token?: string,
 *   getToken?: () => Promise<string> | string,
 *   clientId?: string,
 *   connectTimeout?: number,
 *   requestTimeout?: number,
 *   retryMin?: number,
 *   retryMax?: number,
 *   failAfter?: number,
 *   upgradeAfter?: number,
 *   maxQueued?: number,
 *   refreshMargin?: number,
 *   pollTimeout?: number,
 *   pingInterval?: number,
 *   webtransport?: { url?: string, certificateHashes?: { algorithm: string, value: BufferSource }[] },
 * }} ConnectOptions
 */

/** The default order: fastest first, the one that passes any proxy last. */
export const TRANSPORTS = /** @type {TransportName[]} */ (['webtransport', 'websocket', 'sse', 'poll']);

const DEFAULTS = {
  connectTimeout: 5000,
  requestTimeout: 10000,
  retryMin: 250,
  retryMax: 10000,
  failAfter: 3,
  upgradeAfter: 60000,
  maxQueued: 1000,
  refreshMargin: 30000,
  pollTimeout: 25,
  pingInterval: 15000,
};

/** A connection that lasted this long counts as working (resets `failAfter`). */
const STABLE_MS = 10000;
/** Publishes in flight at once on WebSocket and WebTransport (REST: one). */
const PUBLISH_WINDOW = 64;
/**
 * Slack on the gateway's clock when resuming channels that have no position
 * yet (`since_ms`): the client's estimate of the gateway's time is a lower
 * bound already; this covers what it cannot see.
 */
const SINCE_SLACK_MS = 500;
/** Answers that end a subscription for good, even one the gateway had taken before. */
const FILTER_REFUSALS = new Set(['invalid_filter', 'reserved_channel', 'permission_denied', 'too_many_subscriptions']);
/** Answers that refuse a subscription (not a transport failure). */
const REFUSALS = new Set(['invalid_filter', 'reserved_channel', 'permission_denied', 'too_many_subscriptions', 'bad_request', 'bad_cursor']);
/** Close codes after which reconnecting cannot help. */
const FINAL_CODES = new Set([1002, 1003, 1007, 1008, 1009, 4001, 4002, 4003, 4005, 4007, 4008]);

/** An error the gateway answered (`code` as in docs/protocol.md) or the client's own. */
export class SwitchboardError extends Error {
  /**
   * @param {string} code
   * @param {string} message
   */
  constructor(code, message) {
    super(message);
    this.name = 'SwitchboardError';
    /** @type {string} */
    this.code = code;
  }
}

/**
 * Creates a client and starts connecting.
 * @param {string} url the gateway's HTTP(S) base, e.g. `https://rt.example.com`
 * @param {ConnectOptions} [options]
 * @returns {Client}
 */
export function connect(url, options = {}) {
  return new Client(url, options);
}

/** Whether MQTT filter `filter` matches channel `channel` (docs/protocol.md, Channels and filters). */
export function matches(filter, channel) {
  const f = filter.split('/');
  const c = channel.split('/');
  if ((f[0] === '#' || f[0] === '+') && channel.startsWith('$')) return false;
  for (let i = 0; i < f.length; i++) {
    if (f[i] === '#') return true;
    if (i >= c.length) return false;
    if (f[i] !== '+' && f[i] !== c[i]) return false;
  }
  return f.length === c.length;
}

const isWildcard = (filter) => filter.split('/').some((l) => l === '+' || l === '#');

// ---------------------------------------------------------------------------
// Payloads: the JSON mapping (docs/protocol.md, Payloads in JSON).

const utf8 = new TextEncoder();
const strictUtf8 = new TextDecoder('utf-8', { fatal: true });

function toBase64(bytes) {
  let s = '';
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

function fromBase64(b64) {
  const s = atob(b64);
  const out = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
  return out;
}

/** Bytes of a JS value to publish: text, bytes, or a JSON value. */
function encodePayload(data) {
  if (typeof data === 'string') return { field: 'text', value: data, bytes: () => utf8.encode(data) };
  if (data instanceof Uint8Array || data instanceof ArrayBuffer || ArrayBuffer.isView(data)) {
    const bytes =
      data instanceof Uint8Array
        ? data
        : data instanceof ArrayBuffer
          ? new Uint8Array(data)
          : new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
    return { field: 'data_b64', value: toBase64(bytes), bytes: () => bytes };
  }
  if (data === undefined || data === null || typeof data === 'function' || typeof data === 'symbol') {
    throw new SwitchboardError('bad_request', 'publish a string, bytes, or a JSON value other than null');
  }
  const json = JSON.stringify(data);
  return { field: 'data', value: data, bytes: () => utf8.encode(json) };
}

/** The JSON mapping of payload bytes, as the gateway itself maps them. */
function mapPayload(bytes, into) {
  let text;
  try {
    text = strictUtf8.decode(bytes);
  } catch {
    if (bytes.length) into.data_b64 = toBase64(bytes);
    return into;
  }
  if (text.length && text.trim() === text && text !== 'null') {
    try {
      into.data = JSON.parse(text);
      return into;
    } catch {
      // Not JSON: text.
    }
  }
  if (text.length) into.text = text;
  return into;
}

/**
 * A message's payload as bytes, whichever field carries it.
 * @param {{ data?: any, text?: string, data_b64?: string }} m
 * @returns {Uint8Array}
 */
export function payloadBytes(m) {
  if (m.data_b64 !== undefined) return fromBase64(m.data_b64);
  if (m.text !== undefined) return utf8.encode(m.text);
  if (m.data !== undefined) return utf8.encode(JSON.stringify(m.data));
  return new Uint8Array(0);
}

// ---------------------------------------------------------------------------
// Protobuf, only the frames of proto/envelope.proto this client uses
// (WebTransport has no JSON mapping).

class ProtoWriter {
  constructor() {
    /** @type {number[]} */
    this.out = [];
  }
  varint(n) {
    while (n >= 0x80) {
      this.out.push((n % 0x80) | 0x80);
      n = Math.floor(n / 0x80);
    }
    this.out.push(n);
  }
  uint(field, n) {
    if (!n) return;
    this.varint(field * 8);
    this.varint(n);
  }
  bool(field, b) {
    if (b) this.uint(field, 1);
  }
  bytes(field, bytes) {
    if (!bytes || !bytes.length) return;
    this.varint(field * 8 + 2);
    this.varint(bytes.length);
    for (const b of bytes) this.out.push(b);
  }
  string(field, s) {
    if (s) this.bytes(field, utf8.encode(s));
  }
  /** A nested message, written even when empty (a oneof case must be present). */
  message(field, fill) {
    const inner = new ProtoWriter();
    fill(inner);
    this.varint(field * 8 + 2);
    this.varint(inner.out.length);
    for (const b of inner.out) this.out.push(b);
  }
  map(field, obj, fillValue) {
    for (const [k, v] of Object.entries(obj || {})) {
      this.message(field, (e) => {
        e.string(1, k);
        fillValue(e, v);
      });
    }
  }
}

function readVarint(buf, i) {
  let n = 0;
  let scale = 1;
  for (let k = 0; k < 10; k++) {
    if (i >= buf.length) return null;
    const b = buf[i++];
    n += (b & 0x7f) * scale;
    if (b < 0x80) return [n, i];
    scale *= 0x80;
  }
  throw new SwitchboardError('bad_frame', 'varint longer than 10 bytes');
}

/** Field number -> values (numbers, or Uint8Array for length-delimited). */
function protoFields(buf) {
  /** @type {Map<number, any[]>} */
  const out = new Map();
  let i = 0;
  while (i < buf.length) {
    const key = readVarint(buf, i);
    if (!key) throw new SwitchboardError('bad_frame', 'truncated protobuf');
    const [k, j] = key;
    const field = Math.floor(k / 8);
    const wire = k % 8;
    let value;
    i = j;
    if (wire === 0) {
      const v = readVarint(buf, i);
      if (!v) throw new SwitchboardError('bad_frame', 'truncated protobuf');
      [value, i] = v;
    } else if (wire === 2) {
      const len = readVarint(buf, i);
      if (!len || len[1] + len[0] > buf.length) throw new SwitchboardError('bad_frame', 'truncated protobuf');
      value = buf.subarray(len[1], len[1] + len[0]);
      i = len[1] + len[0];
    } else if (wire === 1 || wire === 5) {
      i += wire === 1 ? 8 : 4;
      continue;
    } else {
      throw new SwitchboardError('bad_frame', `protobuf wire type ${wire}`);
    }
    if (!out.has(field)) out.set(field, []);
    /** @type {any[]} */ (out.get(field)).push(value);
  }
  return out;
}

const td = new TextDecoder();
const pStr = (f, n) => (f.has(n) ? td.decode(f.get(n).at(-1)) : '');
const pNum = (f, n) => (f.has(n) ? f.get(n).at(-1) : 0);
const pMsg = (f, n) => (f.has(n) ? protoFields(f.get(n).at(-1)) : null);
const pAll = (f, n) => (f.has(n) ? f.get(n).map(protoFields) : []);

const ERROR_CODES = [
  'unspecified', 'bad_frame', 'unknown_frame', 'invalid_channel', 'invalid_filter', 'message_too_large',
  'bad_position', 'not_connected', 'already_connected', 'permission_denied', 'unauthorized',
  'too_many_subscriptions', 'rate_limited', 'not_subscribed', 'no_identity', 'reserved_channel', 'bad_request',
  'internal', 'unavailable', 'bad_cursor',
];
const PROTOCOLS = ['', 'ws', 'rest', 'sse', 'poll', 'mqtt', 'wt', 'internal'];
const KINDS = ['message', 'presence.enter', 'presence.leave', 'presence.update'];

function pPosition(f) {
  return f ? { epoch: pStr(f, 1), serial: pNum(f, 2) } : undefined;
}

function pEnvelope(f) {
  /** @type {any} */
  const m = {
    type: 'message',
    channel: pStr(f, 1),
    epoch: pStr(f, 4),
    serial: pNum(f, 5),
    prev_serial: pNum(f, 6),
    timestamp: pNum(f, 7),
    kind: KINDS[pNum(f, 11)] || 'message',
  };
  const id = pStr(f, 3);
  if (id) m.id = id;
  const p = pMsg(f, 8);
  if (p) {
    m.publisher = { client_id: pStr(p, 1), protocol: PROTOCOLS[pNum(p, 2)] || '', node: pStr(p, 3), connection_id: pStr(p, 4) };
  }
  const ct = pStr(f, 9);
  if (ct) m.content_type = ct;
  const headers = pAll(f, 10);
  if (headers.length) m.headers = Object.fromEntries(headers.map((e) => [pStr(e, 1), pStr(e, 2)]));
  if (pNum(f, 12)) m.retain = true;
  return mapPayload(f.has(2) ? f.get(2).at(-1) : new Uint8Array(0), m);
}

/** One `ServerFrame` as the JSON frame of the same meaning. */
function decodeServerFrame(buf) {
  const f = protoFields(buf);
  const req = pNum(f, 1);
  const body = (n) => pMsg(f, n);
  let b;
  if ((b = body(2))) return { type: 'connected', req, client_id: pStr(b, 1), connection_id: pStr(b, 2), node: pStr(b, 3), version: pStr(b, 4) };
  if ((b = body(3))) {
    const channels = pAll(b, 2).map((c) => ({ channel: pStr(c, 1), epoch: pStr(c, 2), serial: pNum(c, 3), recovered: !!pNum(c, 4) }));
    return { type: 'subscribed', req, filter: pStr(b, 1), channels };
  }
  if ((b = body(4))) return { type: 'unsubscribed', req, filter: pStr(b, 1) };
  if ((b = body(5))) return { type: 'publish_ack', req, channel: pStr(b, 1), epoch: pStr(b, 2), serial: pNum(b, 3), duplicate: !!pNum(b, 4) };
  if ((b = body(6))) return { ...pEnvelope(b), req };
  if ((b = body(7))) return { type: 'gap', req, channel: pStr(b, 1), from: pPosition(pMsg(b, 2)), to: pPosition(pMsg(b, 3)), reason: pStr(b, 4) };
  if ((b = body(8))) {
    const members = pAll(b, 2).map((m) =>
      mapPayload(m.has(3) ? m.get(3).at(-1) : new Uint8Array(0), {
        client_id: pStr(m, 1),
        connection_id: pStr(m, 2),
        protocol: PROTOCOLS[pNum(m, 4)] || '',
      }),
    );
    return { type: 'presence', req, channel: pStr(b, 1), members };
  }
  if ((b = body(9))) return { type: 'history', req, channel: pStr(b, 1), epoch: pStr(b, 2), serial: pNum(b, 3), messages: pAll(b, 4).map(pEnvelope) };
  if (body(10)) return { type: 'pong', req };
  if ((b = body(11))) return { type: 'error', req, code: ERROR_CODES[pNum(b, 1)] || 'internal', message: pStr(b, 2) };
  if ((b = body(12))) return { type: 'disconnect', req, code: pNum(b, 1), reason: pStr(b, 2), reconnect: !!pNum(b, 3) };
  if (body(13)) return { type: 'refreshed', req };
  return { type: 'unknown', req };
}

/** A JSON-shaped client frame as a `ClientFrame`. */
function encodeClientFrame(frame) {
  const w = new ProtoWriter();
  w.uint(1, frame.req);
  const payload = (m) => (m.payload ? m.payload.bytes() : new Uint8Array(0));
  switch (frame.type) {
    case 'connect':
      w.message(2, (m) => {
        m.string(1, frame.token);
        m.string(2, frame.client_id);
      });
      break;
    case 'subscribe':
      w.message(3, (m) => {
        m.string(1, frame.filter);
        m.map(2, frame.positions, (e, p) =>
          e.message(2, (pos) => {
            pos.string(1, p.epoch);
            pos.uint(2, p.serial);
          }),
        );
        if (frame.rewind) {
          m.message(3, (r) => {
            r.uint(1, frame.rewind.count || 0);
            r.uint(2, frame.rewind.duration_ms || 0);
          });
        }
        m.bool(4, frame.presence);
        m.bool(5, frame.retained);
        m.uint(6, frame.since_ms || 0);
      });
      break;
    case 'unsubscribe':
      w.message(4, (m) => m.string(1, frame.filter));
      break;
    case 'publish':
      w.message(5, (m) => {
        m.string(1, frame.channel);
        m.bytes(2, payload(frame));
        m.string(3, frame.id);
        m.string(4, frame.content_type);
        m.map(5, frame.headers, (e, v) => e.string(2, String(v)));
        m.bool(6, frame.retain);
      });
      break;
    case 'presence.enter':
    case 'presence.update':
      w.message(frame.type === 'presence.enter' ? 6 : 7, (m) => {
        m.string(1, frame.channel);
        m.bytes(2, payload(frame));
      });
      break;
    case 'presence.leave':
      w.message(8, (m) => m.string(1, frame.channel));
      break;
    case 'presence.get':
      w.message(9, (m) => m.string(1, frame.channel));
      break;
    case 'history':
      w.message(10, (m) => {
        m.string(1, frame.channel);
        if (frame.since) {
          m.message(2, (p) => {
            p.string(1, frame.since.epoch);
            p.uint(2, frame.since.serial);
          });
        }
        m.uint(3, frame.limit || 0);
        m.bool(4, frame.reverse);
      });
      break;
    case 'refresh':
      w.message(11, (m) => m.string(1, frame.token));
      break;
    case 'ping':
      w.message(12, () => {});
      break;
    default:
      throw new SwitchboardError('bad_request', `no frame ${frame.type}`);
  }
  return new Uint8Array(w.out);
}

/** A JSON-shaped client frame as the JSON text the WebSocket subprotocol takes. */
function encodeJsonFrame(frame) {
  const out = { ...frame };
  if (frame.payload) {
    delete out.payload;
    out[frame.payload.field] = frame.payload.value;
  }
  return JSON.stringify(out);
}

/** Splits varint-length-delimited frames off a growing buffer. */
class Delimited {
  constructor(max) {
    this.buf = new Uint8Array(0);
    this.max = max;
  }
  /** @param {Uint8Array} chunk */
  push(chunk) {
    const next = new Uint8Array(this.buf.length + chunk.length);
    next.set(this.buf);
    next.set(chunk, this.buf.length);
    this.buf = next;
    const frames = [];
    for (;;) {
      const len = readVarint(this.buf, 0);
      if (!len) break;
      const [n, start] = len;
      if (n > this.max) throw new SwitchboardError('bad_frame', `frame of ${n} bytes`);
      if (this.buf.length < start + n) break;
      frames.push(this.buf.slice(start, start + n));
      this.buf = this.buf.subarray(start + n);
    }
    return frames;
  }
}

function delimit(bytes) {
  const w = new ProtoWriter();
  w.varint(bytes.length);
  const out = new Uint8Array(w.out.length + bytes.length);
  out.set(w.out);
  out.set(bytes, w.out.length);
  return out;
}

// ---------------------------------------------------------------------------
// Stream cursors (docs/protocol.md, Stream cursors): built from the client's
// own positions when an SSE stream or a poll must resume channels that
// another transport delivered, or resume after the stream's filters changed.

function fnv1a(bytes) {
  let h = 0x811c9dc5;
  for (const b of bytes) {
    h ^= b;
    h = Math.imul(h, 0x01000193) >>> 0;
  }
  return h >>> 0;
}

/**
 * @param {number} sinceMs
 * @param {Map<string, Position>} positions
 */
function encodeCursor(sinceMs, positions) {
  const w = new ProtoWriter();
  w.out.push(1);
  w.varint(Math.max(0, Math.floor(sinceMs)));
  const names = [...positions.keys()].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
  w.varint(names.length);
  for (const name of names) {
    const p = /** @type {Position} */ (positions.get(name));
    const n = utf8.encode(name);
    w.varint(n.length);
    for (const b of n) w.out.push(b);
    const e = utf8.encode(p.epoch);
    w.out.push(e.length);
    for (const b of e) w.out.push(b);
    w.varint(p.serial);
  }
  const sum = fnv1a(w.out);
  w.out.push(sum >>> 24, (sum >>> 16) & 0xff, (sum >>> 8) & 0xff, sum & 0xff);
  return toBase64(new Uint8Array(w.out)).replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
}

/** The `since` of a cursor the gateway sent (the gateway's clock), or null. */
function cursorSince(cursor) {
  try {
    const raw = fromBase64(cursor.replace(/-/g, '+').replace(/_/g, '/'));
    const v = raw[0] === 1 ? readVarint(raw, 1) : null;
    return v ? v[0] : null;
  } catch {
    return null;
  }
}

const MAX_CURSOR_CHARS = 4096;

// ---------------------------------------------------------------------------
// Helpers.

function randomId(prefix) {
  const b = new Uint8Array(12);
  crypto.getRandomValues(b);
  return prefix + Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
}

const sleep = (ms, signal) =>
  new Promise((resolve) => {
    if (signal?.aborted) return resolve(undefined);
    const wake = () => {
      clearTimeout(t);
      resolve(undefined);
    };
    const t = setTimeout(() => {
      signal?.removeEventListener('abort', wake);
      resolve(undefined);
    }, ms);
    signal?.addEventListener('abort', wake, { once: true });
  });

function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new SwitchboardError('timeout', `${what} took longer than ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** Seconds until a JWT's `exp`, or null when it has none (or is no JWT). */
function tokenExpiry(token) {
  try {
    const part = token.split('.')[1];
    const json = JSON.parse(td.decode(fromBase64(part.replace(/-/g, '+').replace(/_/g, '/').padEnd(Math.ceil(part.length / 4) * 4, '='))));
    return typeof json.exp === 'number' ? json.exp * 1000 : null;
  } catch {
    return null;
  }
}

/** A rewind option as the frame's `{count, duration_ms}`, or null. */
function rewindOf(rewind) {
  if (rewind === undefined || rewind === null || rewind === 0) return null;
  if (typeof rewind === 'number') return { count: rewind };
  if (typeof rewind === 'string') {
    const m = /^(\d+)(ms|s|m|h)?$/.exec(rewind.trim());
    if (!m) throw new SwitchboardError('bad_request', `rewind ${JSON.stringify(rewind)}: a count, or a duration like 30s`);
    if (!m[2]) return { count: Number(m[1]) };
    const unit = { ms: 1, s: 1000, m: 60000, h: 3600000 }[m[2]];
    return { duration_ms: Number(m[1]) * unit };
  }
  const out = {};
  if (rewind.count) out.count = rewind.count;
  if (rewind.durationMs) out.duration_ms = rewind.durationMs;
  return out.count || out.duration_ms ? out : null;
}

/** `rewind=` of SSE and long polling: a count or a duration. */
function rewindParam(r) {
  return r.duration_ms ? `${r.duration_ms}ms` : String(r.count);
}

/** A resolvable promise. */
function deferred() {
  /** @type {(v: any) => void} */
  let resolve = () => {};
  /** @type {(e: any) => void} */
  let reject = () => {};
  const promise = new Promise((res, rej) => {
    resolve = res;
    reject = rej;
  });
  return { promise, resolve, reject };
}

// ---------------------------------------------------------------------------
// Subscriptions.

/** One filter the page subscribed to. */
export class Subscription {
  /**
   * @param {Client} client
   * @param {string} filter
   * @param {(m: Message) => void} onMessage
   * @param {SubscribeOptions} options
   */
  constructor(client, filter, onMessage, options) {
    this.client = client;
    /** @type {string} */
    this.filter = filter;
    this.onMessage = onMessage;
    this.options = options;
    this.rewind = rewindOf(options.rewind);
    /** Whether the gateway acknowledged it once (later subscribes are resumes). */
    this.established = false;
    /**
     * Per channel, the last position handed to this subscription: what it
     * resumes from, and below which it takes nothing (its own dedupe, so a
     * new subscription's rewind is not hidden by what another one got).
     * @type {Map<string, Position>}
     */
    this.positions = new Map();
    /**
     * Per channel, where a fresh subscription began (the `subscribed`
     * reply): a resume starts there when nothing arrived since. Never used
     * to drop anything.
     * @type {Map<string, Position>}
     */
    this.floors = new Map();
    const d = deferred();
    /** Resolves with the first `subscribed` reply; rejects if the gateway refuses the filter. */
    this.ready = d.promise;
    this.settle = d;
    this.ready.catch(() => {});
  }

  /** Whether a channel's envelopes belong to this subscription (its `$presence/` companion too). */
  accepts(channel) {
    if (this.options.presence && channel.startsWith('$presence/')) return matches(this.filter, channel.slice(10));
    return matches(this.filter, channel);
  }

  /** Stops it. */
  unsubscribe() {
    return this.client.unsubscribe(this.filter);
  }
}

// ---------------------------------------------------------------------------
// Transports. Each opens with `open()` (resolves once the gateway named the
// connection) and reports its end through `closed` ({code, reason,
// reconnect}). The client drives them with the same operations.

/**
 * WebSocket (`switchboard.v1.json`) and WebTransport (protobuf) speak the
 * same frames with request ids: one base.
 */
class FramedTransport {
  /** @param {Client} client */
  constructor(client) {
    this.client = client;
    this.req = 0;
    /** @type {Map<number, {resolve: (v: any) => void, reject: (e: any) => void}>} */
    this.pending = new Map();
    const d = deferred();
    this.closed = d.promise;
    this.finish = d.resolve;
    this.ended = false;
    /** @type {{code: number, reason: string, reconnect: boolean} | null} */
    this.goodbye = null;
    this.connectionId = '';
    this.publishWindow = PUBLISH_WINDOW;
  }

  /** Sends a frame and resolves with its reply (rejects on `error`). */
  request(frame) {
    if (this.ended) return Promise.reject(new SwitchboardError('disconnected', 'the connection is closed'));
    const req = ++this.req;
    const d = deferred();
    this.pending.set(req, d);
    try {
      this.send({ ...frame, req });
    } catch (e) {
      this.pending.delete(req);
      return Promise.reject(e);
    }
    return withTimeout(d.promise, this.client.options.requestTimeout, frame.type).finally(() => this.pending.delete(req));
  }

  /** One frame from the gateway, in the JSON shape. */
  receive(frame) {
    this.client.heard();
    if (frame.req && this.pending.has(frame.req)) {
      const d = /** @type {any} */ (this.pending.get(frame.req));
      this.pending.delete(frame.req);
      if (frame.type === 'error') d.reject(new SwitchboardError(frame.code, frame.message));
      else d.resolve(frame);
      return;
    }
    switch (frame.type) {
      case 'message':
        this.client.deliver(frame);
        break;
      case 'gap':
        this.client.gap(frame);
        break;
      case 'disconnect':
        this.goodbye = { code: frame.code, reason: frame.reason, reconnect: frame.reconnect };
        break;
      case 'error':
        this.client.emit('error', new SwitchboardError(frame.code, frame.message));
        break;
      default:
        break;
    }
  }

  /** Ends the transport once; every request still waiting fails. */
  end(outcome) {
    if (this.ended) return;
    this.ended = true;
    clearInterval(this.pinger);
    for (const d of this.pending.values()) d.reject(new SwitchboardError('disconnected', 'the connection closed'));
    this.pending.clear();
    this.finish(this.goodbye || outcome);
  }

  /** After `connected`: pings, so a dead path is noticed without waiting for TCP. */
  startPinging() {
    const every = this.client.options.pingInterval;
    this.pinger = setInterval(() => {
      if (this.client.quietFor() < every) return;
      this.request({ type: 'ping' }).catch(() => this.close({ code: 4004, reason: 'ping timeout', reconnect: true }));
    }, every);
  }

  async hello(token, clientId) {
    const frame = { type: 'connect' };
    if (token) frame.token = token;
    if (clientId) frame.client_id = clientId;
    const c = await this.request(frame);
    this.connectionId = c.connection_id;
    this.startPinging();
    return c;
  }

  subscribe(sub, positions, sinceMs) {
    const frame = { type: 'subscribe', filter: sub.filter };
    if (positions.size) frame.positions = Object.fromEntries(positions);
    if (sinceMs) frame.since_ms = sinceMs;
    else if (sub.rewind) frame.rewind = sub.rewind;
    if (sub.options.presence) frame.presence = true;
    if (sub.options.retained && !sub.established) frame.retained = true;
    return this.request(frame);
  }

  unsubscribe(filter) {
    return this.request({ type: 'unsubscribe', filter });
  }

  publish(p) {
    const frame = { type: 'publish', channel: p.channel, payload: p.payload, id: p.id };
    if (p.options.contentType) frame.content_type = p.options.contentType;
    if (p.options.headers) frame.headers = p.options.headers;
    if (p.options.retain) frame.retain = true;
    return this.request(frame);
  }

  presence(kind, channel, payload) {
    const frame = { type: `presence.${kind}`, channel };
    if (payload) frame.payload = payload;
    return this.request(frame);
  }

  async members(channel) {
    return (await this.request({ type: 'presence.get', channel })).members;
  }

  history(channel, o) {
    const frame = { type: 'history', channel };
    if (o.since) frame.since = o.since;
    if (o.limit) frame.limit = o.limit;
    if (o.reverse) frame.reverse = true;
    return this.request(frame);
  }

  async refresh(token) {
    await this.request({ type: 'refresh', token });
  }
}

class WebSocketTransport extends FramedTransport {
  static transportName = 'websocket';

  async open(token, clientId) {
    const base = new URL(this.client.url);
    base.protocol = base.protocol === 'https:' ? 'wss:' : 'ws:';
    base.pathname = base.pathname.replace(/\/$/, '') + '/v1/ws';
    const ws = new WebSocket(base.toString(), 'switchboard.v1.json');
    this.ws = ws;
    const opened = deferred();
    ws.onopen = () => opened.resolve(undefined);
    ws.onmessage = (e) => {
      let frame;
      try {
        frame = JSON.parse(e.data);
      } catch {
        return this.close({ code: 1002, reason: 'unreadable frame', reconnect: true });
      }
      this.receive(frame);
    };
    ws.onclose = (e) => {
      opened.reject(new SwitchboardError('unavailable', `WebSocket closed (${e.code}) before it opened`));
      this.end({ code: e.code, reason: e.reason, reconnect: !FINAL_CODES.has(e.code) });
    };
    ws.onerror = () => opened.reject(new SwitchboardError('unavailable', 'WebSocket failed to open'));
    await opened.promise;
    return this.hello(token, clientId);
  }

  send(frame) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) throw new SwitchboardError('disconnected', 'the WebSocket is not open');
    this.ws.send(encodeJsonFrame(frame));
  }

  close(outcome) {
    try {
      this.ws?.close(1000);
    } catch {
      // Already closing.
    }
    this.end(outcome);
  }
}

class WebTransportTransport extends FramedTransport {
  static transportName = 'webtransport';

  async open(token, clientId) {
    if (typeof WebTransport === 'undefined') throw new SwitchboardError('unavailable', 'this browser has no WebTransport');
    const o = this.client.options.webtransport || {};
    let url = o.url;
    let hashes = o.certificateHashes;
    if (!url) {
      const info = await this.client.transportsInfo();
      if (this.ended) throw new SwitchboardError('disconnected', 'the attempt was given up');
      const wt = info && info.webtransport;
      if (!wt) throw new SwitchboardError('unavailable', 'the gateway runs no WebTransport (QUIC) listener');
      const base = new URL(this.client.url);
      // Browsers may resolve `localhost` to ::1 first; the gateway's QUIC
      // listener is usually on 127.0.0.1.
      const host = base.hostname === 'localhost' ? '127.0.0.1' : base.hostname;
      url = `https://${host.includes(':') && !host.startsWith('[') ? `[${host}]` : host}:${wt.port}${wt.path}`;
      if (!hashes && wt.certificate_hash) {
        const value = Uint8Array.from(wt.certificate_hash.hex.match(/../g), (h) => parseInt(h, 16));
        hashes = [{ algorithm: 'sha-256', value }];
      }
    }
    const target = new URL(url);
    target.searchParams.set('auth', 'connect');
    const init = hashes ? { serverCertificateHashes: hashes } : {};
    if (this.ended) throw new SwitchboardError('disconnected', 'the attempt was given up');
    const wt = new WebTransport(target.toString(), init);
    this.wt = wt;
    wt.closed.then(
      () => this.end({ code: 1000, reason: 'closed', reconnect: true }),
      (e) => this.end({ code: 1006, reason: String(e && e.message ? e.message : e), reconnect: true }),
    );
    await wt.ready;
    if (this.ended) {
      // Given up while the session was being set up.
      wt.close({ closeCode: 0, reason: '' });
      throw new SwitchboardError('disconnected', 'the attempt was given up');
    }
    const control = await wt.createBidirectionalStream();
    this.writer = control.writable.getWriter();
    this.readStream(control.readable);
    this.acceptStreams(wt.incomingUnidirectionalStreams);
    return this.hello(token, clientId);
  }

  async readStream(readable) {
    const reader = readable.getReader();
    const frames = new Delimited(16 * 1024 * 1024);
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        for (const f of frames.push(value)) this.receive(decodeServerFrame(f));
      }
    } catch {
      // The session ended; `closed` reports it.
    }
  }

  async acceptStreams(incoming) {
    const reader = incoming.getReader();
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        this.readStream(value);
      }
    } catch {
      // The session ended.
    }
  }

  send(frame) {
    if (!this.writer) throw new SwitchboardError('disconnected', 'the session is not open');
    this.writer.write(delimit(encodeClientFrame(frame))).catch(() => {});
  }

  close(outcome) {
    try {
      this.wt?.close({ closeCode: 0, reason: '' });
    } catch {
      // Already closed.
    }
    this.end(outcome);
  }
}

/**
 * SSE and long polling receive on a stream of their own and act over REST
 * (`X-Connection-Id`): one base.
 */
class StreamTransport {
  /** @param {Client} client */
  constructor(client) {
    this.client = client;
    const d = deferred();
    this.closed = d.promise;
    this.finish = d.resolve;
    this.ended = false;
    this.connectionId = '';
    /** The last cursor the gateway sent, valid for `this.filters`. */
    this.cursor = '';
    this.filtersKey = '';
    this.publishWindow = 1;
    this.abort = new AbortController();
    /** @type {{code: number, reason: string, reconnect: boolean} | null} */
    this.goodbye = null;
  }

  /**
   * What the stream carries: every subscription's filter; with none, the
   * `$presence/` channels of the presence the client holds (presence over
   * REST acts for an open stream).
   */
  streamFilters() {
    const subs = [...this.client.subs.values()];
    const filters = subs.map((s) => s.filter);
    if (!filters.length) for (const channel of this.client.entered.keys()) filters.push(`$presence/${channel}`);
    return { filters, presence: subs.some((s) => s.options.presence), subs };
  }

  /**
   * What the next stream (or poll) asks for: its filters and where it
   * resumes. The gateway's last cursor while the filters are unchanged;
   * else a cursor built from the client's positions of the channels the
   * filters match (`since`: see `Client.resumeSince`). A first stream with
   * no position anywhere opens fresh, with the subscriptions' rewind when
   * they all ask the same; otherwise each new subscription's rewind is read
   * first by a one-off poll (`rewindOnce`) and the stream resumes after it.
   */
  async plan() {
    const { filters, presence, subs } = this.streamFilters();
    const key = JSON.stringify([filters, presence]);
    const planned = new Set(subs.map((s) => s.filter));
    if (this.cursor && key === this.filtersKey) return { filters, presence, key, planned, from: { cursor: this.cursor } };
    const live = !!this.filtersKey;
    const fresh = !live && !this.client.positions.size && !subs.some((s) => s.established);
    const replay = (s) => JSON.stringify([s.rewind, !!s.options.retained]);
    if (fresh && subs.every((s) => replay(s) === replay(subs[0] || s))) {
      for (const s of subs) s.replayed = true;
      const first = subs[0];
      const from = {};
      if (first && first.rewind) from.rewind = first.rewind;
      if (first && first.options.retained) from.retained = true;
      return { filters, presence, key, planned, from };
    }
    for (const s of subs) {
      if ((s.rewind || s.options.retained) && !s.established && !s.replayed) {
        s.replayed = true;
        await this.replayOnce(s);
      }
    }
    const positions = new Map();
    for (const [channel, p] of this.client.positions) {
      if (subs.some((s) => s.accepts(channel))) positions.set(channel, p);
    }
    let cursor = encodeCursor(this.client.resumeSince(live), positions);
    // Over the gateway's limit: drop positions (those channels then resume
    // by time, which may repeat what the client drops as already seen).
    while (cursor.length > MAX_CURSOR_CHARS && positions.size) {
      positions.delete(positions.keys().next().value);
      cursor = encodeCursor(this.client.resumeSince(live), positions);
    }
    return { filters, presence, key, planned, from: { cursor } };
  }

  /**
   * A new subscription's rewind and retained values, read by fresh polls
   * that answer at once (an open stream cannot replay for one filter).
   */
  async replayOnce(sub) {
    let cursor = '';
    for (let page = 0; page < 1000; page++) {
      const body = { channel: [sub.filter], timeout: 0 };
      if (cursor) {
        body.cursor = cursor;
      } else {
        if (sub.rewind) body.rewind = rewindParam(sub.rewind);
        if (sub.options.retained) body.retained = true;
      }
      if (this.client.options.clientId) body.client_id = this.client.options.clientId;
      const json = await this.rest('POST', '/v1/poll', { body: JSON.stringify(body), actAs: false });
      this.absorb(json);
      cursor = json.cursor;
      if (!json.more) return;
    }
  }

  /** A poll's answer: the gateway's clock from its cursor, then its gaps and messages. */
  absorb(json) {
    this.client.heard();
    const since = cursorSince(json.cursor);
    if (since) this.client.observeServerTime(since);
    for (const g of json.gaps || []) this.client.gap(g);
    for (const m of json.messages || []) this.client.deliver(m);
  }

  params(filters, presence, from) {
    const q = new URLSearchParams();
    for (const f of filters) q.append('channel', f);
    if (presence) q.set('presence', '1');
    if (from.cursor) q.set('lastEventId', from.cursor);
    if (from.rewind) q.set('rewind', rewindParam(from.rewind));
    if (from.retained) q.set('retained', '1');
    if (this.client.options.clientId) q.set('client_id', this.client.options.clientId);
    return q;
  }

  /** With nothing to stream, a request that shows the gateway answers. */
  async reachable() {
    await this.rest('GET', '/v1/transports', { actAs: false });
    this.connectionId = '';
    this.planned = new Set();
    return { connection_id: '' };
  }

  headers(extra = {}) {
    const h = { ...extra };
    if (this.client.token) h.authorization = `Bearer ${this.client.token}`;
    return h;
  }

  /** A REST call; resolves with the JSON answer, rejects with the gateway's error. */
  async rest(method, path, { body, actAs = true, contentType = 'application/json', extra = {} } = {}) {
    const headers = this.headers(extra);
    if (body !== undefined) headers['content-type'] = contentType;
    if (actAs && this.connectionId) headers['x-connection-id'] = this.connectionId;
    let res;
    try {
      res = await withTimeout(
        fetch(this.client.endpoint(path), { method, headers, body, signal: this.abort.signal, cache: 'no-store' }),
        this.client.options.requestTimeout,
        `${method} ${path}`,
      );
    } catch (e) {
      throw new SwitchboardError('disconnected', `${method} ${path}: ${e && e.message ? e.message : e}`);
    }
    const text = await res.text();
    let json = null;
    try {
      json = text ? JSON.parse(text) : null;
    } catch {
      // Not JSON: an intermediary's page.
    }
    if (!res.ok) {
      const err = json && json.error;
      throw new SwitchboardError(err ? err.code : `http_${res.status}`, err ? err.message : `HTTP ${res.status}`);
    }
    return json;
  }

  chan(channel) {
    return `/v1/channels/${encodeURIComponent(channel)}`;
  }

  async publish(p) {
    const body = { [p.payload.field]: p.payload.value, id: p.id };
    if (p.options.contentType) body.content_type = p.options.contentType;
    if (p.options.headers) body.headers = p.options.headers;
    if (p.options.retain) body.retain = true;
    return this.rest('POST', `${this.chan(p.channel)}/messages`, { body: JSON.stringify(body) });
  }

  async presence(kind, channel, payload) {
    if (kind === 'leave') return this.rest('DELETE', `${this.chan(channel)}/presence`);
    const body = payload ? JSON.stringify({ [payload.field]: payload.value }) : '{}';
    return this.rest('POST', `${this.chan(channel)}/presence`, { body });
  }

  async members(channel) {
    return (await this.rest('GET', `${this.chan(channel)}/presence`, { actAs: false })).members;
  }

  history(channel, o) {
    const q = new URLSearchParams();
    if (o.since) q.set('since', `${o.since.epoch}:${o.since.serial}`);
    if (o.limit) q.set('limit', String(o.limit));
    if (o.reverse) q.set('reverse', '1');
    const s = q.toString();
    return this.rest('GET', `${this.chan(channel)}/history${s ? `?${s}` : ''}`, { actAs: false });
  }

  async refresh(token) {
    await this.rest('POST', '/v1/refresh', { body: JSON.stringify({ connection_id: this.connectionId, token }), extra: { authorization: `Bearer ${token}` } });
  }

  end(outcome) {
    if (this.ended) return;
    this.ended = true;
    this.abort.abort();
    this.finish(outcome);
  }

  close(outcome) {
    this.end(outcome);
  }
}

class SseTransport extends StreamTransport {
  static transportName = 'sse';

  open() {
    return this.stream();
  }

  /** (Re)opens the EventSource for the current subscriptions; resolves on `connected`. */
  async stream() {
    const { filters, presence, key, planned, from } = await this.plan();
    this.es?.close();
    this.es = null;
    if (this.ended) throw new SwitchboardError('disconnected', 'the SSE transport ended');
    // Nothing to receive: REST alone (publishes, history, members).
    if (!filters.length) return this.reachable();
    const q = this.params(filters, presence, from);
    // Keep-alives as events the watchdog below can see.
    q.set('heartbeat', '1');
    if (this.client.token) q.set('token', this.client.token);
    const url = this.client.endpoint(`/v1/sse?${q}`);
    const es = new EventSource(url);
    this.es = es;
    const opened = deferred();
    const remember = (e) => {
      if (es !== this.es) return false;
      this.client.heard();
      if (e.lastEventId) {
        this.cursor = e.lastEventId;
        this.filtersKey = key;
      }
      return true;
    };
    es.addEventListener('connected', (e) => {
      if (!remember(e)) return;
      const c = JSON.parse(e.data);
      const changed = this.connectionId && this.connectionId !== c.connection_id;
      this.connectionId = c.connection_id;
      this.planned = planned;
      this.streamed = true;
      // Presence entered over REST belongs to the stream's session: a
      // reopened stream enters it again (the gateway takes the membership
      // over within the presence grace).
      if (changed) this.client.reenterPresence();
      const since = cursorSince(e.lastEventId);
      if (since) this.client.observeServerTime(since);
      opened.resolve(c);
    });
    const onMessage = (e) => {
      if (!remember(e)) return;
      this.client.deliver(JSON.parse(e.data));
    };
    es.addEventListener('message', onMessage);
    es.addEventListener('presence', onMessage);
    es.addEventListener('ping', (e) => remember(e));
    es.addEventListener('gap', (e) => {
      if (remember(e)) this.client.gap(JSON.parse(e.data));
    });
    es.addEventListener('disconnect', (e) => {
      if (es !== this.es) return;
      const d = JSON.parse(e.data);
      this.goodbye = { code: d.code, reason: d.reason, reconnect: d.reconnect };
    });
    let connected = false;
    opened.promise.then(() => {
      connected = true;
      this.watch(es);
    }, () => {});
    es.onerror = async () => {
      if (es !== this.es) return;
      // The browser would retry by itself; the client decides instead (it
      // may move to another transport), resuming from the same cursor.
      es.close();
      if (!connected) {
        // EventSource hides why it failed: a refused request (a filter the
        // token does not allow, a bad cursor) is read again with fetch.
        opened.reject(await this.refusal(url));
        return;
      }
      this.end(this.goodbye || { code: 1006, reason: 'SSE stream ended', reconnect: true });
    };
    return opened.promise;
  }

  /**
   * Notices a stream that died without a word (a half-open connection: no
   * error event ever comes): the gateway sends a `ping` event after each
   * `keepalive_ms` of silence (`GET /v1/transports`, 15 s by default), so
   * nothing at all for 2.5 times that ends the transport, and the client
   * reconnects and resumes.
   */
  async watch(es) {
    clearInterval(this.watchdog);
    const info = await this.client.transportsInfo().catch(() => null);
    if (es !== this.es || this.ended) return;
    const keepalive = (info && info.sse && info.sse.keepalive_ms) || 15000;
    const silence = keepalive * 2.5;
    this.watchdog = setInterval(() => {
      if (es !== this.es || this.ended) return clearInterval(this.watchdog);
      if (this.client.quietFor() > silence) {
        es.close();
        this.end({ code: 4004, reason: `nothing from the SSE stream for ${silence} ms`, reconnect: true });
      }
    }, Math.min(1000, keepalive));
  }

  /** Why `GET url` failed: the gateway's error when it answered one, else `unavailable`. */
  async refusal(url) {
    const probe = new AbortController();
    const timer = setTimeout(() => probe.abort(), this.client.options.connectTimeout);
    try {
      const res = await fetch(url, { signal: probe.signal, cache: 'no-store' });
      if (res.ok) return new SwitchboardError('unavailable', 'the SSE stream failed');
      const json = await res.json().catch(() => null);
      const err = json && json.error;
      return new SwitchboardError(err ? err.code : `http_${res.status}`, err ? err.message : `HTTP ${res.status}`);
    } catch {
      return new SwitchboardError('unavailable', 'the SSE stream failed');
    } finally {
      clearTimeout(timer);
      probe.abort();
    }
  }

  /**
   * Subscriptions changed: the stream reopens with the new filters, from
   * the client's positions. One reopening at a time: changes made while
   * one is under way are taken by one more reopening after it.
   */
  resubscribe() {
    if (this.ended) return Promise.resolve();
    if (this.reopening) {
      this.dirty = true;
      return this.reopening;
    }
    this.reopening = (async () => {
      try {
        do {
          this.dirty = false;
          await withTimeout(this.stream(), this.client.options.connectTimeout, 'SSE stream');
        } while (this.dirty && !this.ended);
      } finally {
        this.reopening = null;
      }
    })();
    return this.reopening;
  }

  end(outcome) {
    clearInterval(this.watchdog);
    this.es?.close();
    super.end(outcome);
  }
}

class PollTransport extends StreamTransport {
  static transportName = 'poll';

  async open() {
    // A first poll that answers at once: it proves the path and names the
    // session (for presence over REST).
    const first = (await this.pollOnce(0)) || (await this.reachable());
    this.loop();
    return { connection_id: this.connectionId, first };
  }

  async pollOnce(timeout) {
    const { filters, presence, key, planned, from } = await this.plan();
    if (!filters.length) {
      this.connectionId = '';
      this.planned = planned;
      return null;
    }
    const q = this.params(filters, presence, { retained: from.retained });
    // The session the last answer named: the gateway continues it (with
    // presence entered for it) from whichever connection this poll takes.
    // (Empty on the first poll: park the session it opens.)
    q.set('session', this.connectionId);
    if (from.cursor) q.set('cursor', from.cursor);
    if (from.rewind) q.set('rewind', rewindParam(from.rewind));
    q.set('timeout', String(timeout));
    this.current = new AbortController();
    const signal = this.current.signal;
    const onEnd = () => this.current?.abort();
    this.abort.signal.addEventListener('abort', onEnd);
    // GET when it fits well inside the gateway's 8 KiB request head (the
    // token and the browser's own headers come on top), POST otherwise.
    const query = q.toString();
    const byGet = query.length <= 4000;
    // A poll the gateway holds at most `timeout`: no answer well after that
    // means a dead path (a half-open connection), not a quiet channel.
    const deadline = setTimeout(() => this.current?.abort(), timeout * 1000 + this.client.options.requestTimeout);
    let res;
    let json;
    try {
      res = await fetch(this.client.endpoint(byGet ? `/v1/poll?${query}` : '/v1/poll'), {
        method: byGet ? 'GET' : 'POST',
        headers: this.headers(byGet ? {} : { 'content-type': 'application/x-www-form-urlencoded' }),
        body: byGet ? undefined : query,
        signal,
        cache: 'no-store',
      });
      json = await res.json().catch(() => null);
    } finally {
      clearTimeout(deadline);
      this.abort.signal.removeEventListener('abort', onEnd);
    }
    if (!res.ok) {
      const err = json && json.error;
      throw new SwitchboardError(err ? err.code : `http_${res.status}`, err ? err.message : `HTTP ${res.status}`);
    }
    this.streamed = true;
    this.planned = planned;
    this.cursor = json.cursor;
    this.filtersKey = key;
    this.absorb(json);
    if (json.connection_id && json.connection_id !== this.connectionId) {
      const changed = !!this.connectionId;
      this.connectionId = json.connection_id;
      // Presence entered over REST belongs to the poll's session; a new
      // session enters again (within the presence grace, so the channel
      // sees neither a leave nor a second enter).
      if (changed) this.client.reenterPresence();
    }
    return json;
  }

  async loop() {
    let failures = 0;
    while (!this.ended) {
      // Right after the subscriptions changed, a poll that answers at once
      // (it names the new session for presence and settles the change).
      const timeout = this.restarted ? 0 : this.client.options.pollTimeout;
      const restarted = this.restarted;
      this.restarted = null;
      try {
        const r = await this.pollOnce(timeout);
        failures = 0;
        restarted?.resolve(undefined);
        if (!r && !this.restarted) await sleep(this.client.options.pollTimeout * 1000, this.wake());
      } catch (e) {
        if (this.ended) {
          restarted?.reject(e);
          return;
        }
        if (this.restarted) {
          // Cut by another change of subscriptions: the next poll carries both.
          if (restarted) this.restarted.promise.then(restarted.resolve, restarted.reject);
          continue;
        }
        const code = e instanceof SwitchboardError ? e.code : 'unavailable';
        if (restarted && REFUSALS.has(code)) {
          // The new subscriptions were refused; the client drops them.
          restarted.reject(e);
          continue;
        }
        if (restarted) this.restarted = restarted;
        if (code === 'unauthorized' || code === 'bad_cursor') {
          if (code === 'bad_cursor') this.cursor = '';
          this.end({ code: code === 'unauthorized' ? 4006 : 1006, reason: String(e.message), reconnect: true });
          return;
        }
        if (++failures >= 2) {
          this.end({ code: 1006, reason: `poll failed: ${e && e.message ? e.message : e}`, reconnect: true });
          return;
        }
        await sleep(250, this.abort.signal);
      }
    }
  }

  /** A signal that fires when the subscriptions change (ends an idle wait). */
  wake() {
    this.waker = new AbortController();
    return this.waker.signal;
  }

  /**
   * Subscriptions changed: the waiting poll is cut and the next one, which
   * answers at once, carries the new filters; resolves after it.
   */
  resubscribe() {
    if (this.ended) return Promise.resolve();
    const d = this.restarted || deferred();
    this.restarted = d;
    this.current?.abort();
    this.waker?.abort();
    return withTimeout(d.promise, this.client.options.connectTimeout, 'poll');
  }

  end(outcome) {
    this.restarted?.reject(new SwitchboardError('disconnected', 'the poll transport ended'));
    this.restarted = null;
    super.end(outcome);
  }
}

const TRANSPORT_CLASSES = {
  webtransport: WebTransportTransport,
  websocket: WebSocketTransport,
  sse: SseTransport,
  poll: PollTransport,
};

// ---------------------------------------------------------------------------
// The client.

/** A connection to the gateway that outlives any one transport. */
export class Client {
  /**
   * @param {string} url
   * @param {ConnectOptions} options
   */
  constructor(url, options = {}) {
    this.url = url.replace(/\/+$/, '');
    this.options = { ...DEFAULTS, ...options };
    const order = this.options.transports || TRANSPORTS;
    for (const t of order) {
      if (!TRANSPORT_CLASSES[t]) throw new SwitchboardError('bad_request', `unknown transport ${JSON.stringify(t)}; use ${TRANSPORTS.join(', ')}`);
    }
    if (!order.length) throw new SwitchboardError('bad_request', 'transports is empty');
    /** @type {TransportName[]} */
    this.order = [...order];
    if (!options.token && !options.getToken && !options.clientId) {
      // Open mode: one id for the client's life, so presence survives its
      // reconnects (the gateway keys presence grace on the client id).
      this.options.clientId = randomId('web-');
    }
    /** @type {State} */
    this.state = 'connecting';
    /** @type {TransportName | null} */
    this.transport = null;
    this.clientId = '';
    this.connectionId = '';
    /** @type {string} */
    this.token = options.token || '';
    /** @type {Map<string, Subscription>} */
    this.subs = new Map();
    /** Per channel, the position of the last envelope handed to the page. */
    /** @type {Map<string, Position>} */
    this.positions = new Map();
    /** Presence this client holds: channel -> payload (re-entered after reconnects). */
    /** @type {Map<string, any>} */
    this.entered = new Map();
    /** Publishes not yet acknowledged, oldest first. */
    this.queue = [];
    this.inflight = 0;
    /** @type {Map<string, Set<Function>>} */
    this.listeners = new Map();
    /** A lower bound of (gateway clock - local clock), ms. */
    this.clockOffset = -2000;
    this.lastHeard = Date.now();
    /** @type {any} */
    this.current = null;
    this.stopped = false;
    this.wakeup = new AbortController();
    const online = () => this.wakeup.abort();
    const offline = () => this.current?.close({ code: 1006, reason: 'the browser went offline', reconnect: true });
    this.onOnline = online;
    this.onOffline = offline;
    if (typeof window !== 'undefined') {
      window.addEventListener('online', online);
      window.addEventListener('offline', offline);
    }
    // Learns the gateway's clock (the `Date` header) and what it runs.
    this.transportsInfo().catch(() => {});
    // Started after the caller's synchronous code, so listeners it adds
    // right after `connect()` hear the first `connecting`.
    queueMicrotask(() => this.run());
  }

  // --- events ---

  /**
   * Listens: `state` ({state, transport}), `connecting`, `connected`
   * ({transport, clientId, connectionId}), `disconnected` ({code, reason}),
   * `failed` (error), `gap` (Gap), `error` (SwitchboardError).
   * @returns {() => void} removes the listener
   */
  on(event, fn) {
    if (!this.listeners.has(event)) this.listeners.set(event, new Set());
    /** @type {Set<Function>} */ (this.listeners.get(event)).add(fn);
    return () => this.listeners.get(event)?.delete(fn);
  }

  emit(event, detail) {
    for (const fn of this.listeners.get(event) || []) {
      try {
        fn(detail);
      } catch (e) {
        setTimeout(() => {
          throw e;
        });
      }
    }
  }

  setState(state, detail = {}) {
    this.state = state;
    this.emit(state, detail);
    this.emit('state', { state, transport: this.transport, ...detail });
  }

  // --- time ---

  heard() {
    this.lastHeard = Date.now();
  }

  quietFor() {
    return Date.now() - this.lastHeard;
  }

  observeServerTime(ms) {
    const offset = ms - Date.now();
    if (offset > this.clockOffset) this.clockOffset = offset;
  }

  /**
   * Where channels with no position resume from (`since_ms`, a cursor's
   * `since`), in gateway time and on the early side. After a reconnect: the
   * last moment the client heard from the gateway (nothing it could have
   * missed is older). When an open stream only changes its filters
   * (`live`): now, so a new filter replays nothing from before it.
   */
  resumeSince(live = false) {
    const local = live ? Date.now() : (this.resumeMark ?? this.lastHeard);
    return Math.max(1, local + this.clockOffset - SINCE_SLACK_MS);
  }

  endpoint(path) {
    return this.url + path;
  }

  /** `GET /v1/transports`, once per client (null when unreachable). */
  async transportsInfo() {
    if (!this.info) {
      this.info = (async () => {
        const res = await withTimeout(fetch(this.endpoint('/v1/transports'), { cache: 'no-store' }), this.options.connectTimeout, 'GET /v1/transports');
        if (!res.ok) throw new SwitchboardError(`http_${res.status}`, 'GET /v1/transports failed');
        const date = Date.parse(res.headers.get('date') || '');
        if (!Number.isNaN(date)) this.observeServerTime(date - 1000);
        return res.json();
      })();
      this.info.catch(() => {
        this.info = null;
      });
    }
    return this.info;
  }

  // --- the connection loop ---

  async freshToken() {
    const g = this.options.getToken;
    if (!g) return this.token;
    const exp = this.token ? tokenExpiry(this.token) : null;
    if (!this.token || (exp !== null && exp - Date.now() < this.options.refreshMargin)) this.token = await g();
    return this.token;
  }

  scheduleRefresh() {
    clearTimeout(this.refreshTimer);
    if (!this.options.getToken || !this.token) return;
    const exp = tokenExpiry(this.token);
    if (exp === null) return;
    const lifetime = exp - Date.now();
    const margin = Math.min(this.options.refreshMargin, lifetime / 3);
    this.refreshTimer = setTimeout(async () => {
      try {
        const getToken = /** @type {() => any} */ (this.options.getToken);
        const token = await getToken();
        this.token = token;
        await this.current?.refresh(token);
        this.scheduleRefresh();
      } catch (e) {
        this.emit('error', e);
        // Refused: the gateway ends the session at expiry (4006) and the
        // reconnect fetches a token again.
      }
    }, Math.min(2 ** 31 - 1, Math.max(1000, lifetime - margin)));
  }

  async attempt(name) {
    const Transport = TRANSPORT_CLASSES[name];
    const t = new Transport(this);
    const token = await this.freshToken();
    try {
      const c = await withTimeout(t.open(token, this.options.clientId), this.options.connectTimeout, `${name} connect`);
      return { t, c };
    } catch (e) {
      t.close({ code: 1006, reason: 'connect failed', reconnect: true });
      if (t.resubscribe && e instanceof SwitchboardError && REFUSALS.has(e.code) && e.code !== 'bad_cursor' && [...this.subs.values()].some((s) => !s.established)) {
        // A stream opens with every subscription at once: the new ones it
        // refused go, and the transport is tried again without them.
        this.dropUnacknowledged(e);
        return this.attempt(name);
      }
      throw e;
    }
  }

  async run() {
    let index = 0;
    let failures = 0;
    let delay = 0;
    let tried = 0;
    let retriedToken = false;
    while (!this.stopped) {
      if (delay) {
        await sleep(delay, this.wakeup.signal);
        if (this.wakeup.signal.aborted) this.wakeup = new AbortController();
      }
      if (this.stopped) return;
      if (typeof navigator !== 'undefined' && navigator.onLine === false) {
        this.setState('disconnected', { code: 1006, reason: 'offline' });
        await sleep(this.options.retryMax, this.wakeup.signal);
        if (this.wakeup.signal.aborted) this.wakeup = new AbortController();
        continue;
      }
      const name = this.order[index];
      this.transport = name;
      this.setState('connecting', { transport: name });
      let opened;
      try {
        opened = await this.attempt(name);
      } catch (e) {
        if (this.stopped) return;
        this.emit('error', e);
        const unauthorized = e instanceof SwitchboardError && e.code === 'unauthorized';
        if (unauthorized && !this.options.getToken) {
          this.setState('failed', { error: e });
          this.stopped = true;
          return;
        }
        if (unauthorized && !retriedToken) {
          // The token, not the transport: the same one again with a fresh token.
          this.token = '';
          retriedToken = true;
          continue;
        }
        retriedToken = false;
        index = (index + 1) % this.order.length;
        tried += 1;
        // A whole round failed: back off, then start again from the best.
        if (tried % this.order.length === 0) {
          index = 0;
          delay = this.backoff(++failures);
        } else {
          delay = 0;
        }
        continue;
      }
      if (this.stopped) {
        opened.t.close({ code: 1000, reason: 'closed by the page', reconnect: false });
        return;
      }
      tried = 0;
      retriedToken = false;
      const started = Date.now();
      await this.adopt(opened.t, opened.c, name);
      const outcome = await this.follow();
      // What a resume may have missed starts here (the new transport's own
      // handshake must not move it).
      this.resumeMark = this.lastHeard;
      if (this.stopped) return;
      this.connectionId = '';
      this.setState('disconnected', { code: outcome.code, reason: outcome.reason });
      if (!outcome.reconnect && outcome.code !== 4006) {
        this.setState('failed', { error: new SwitchboardError(`closed_${outcome.code}`, outcome.reason || 'closed by the gateway') });
        this.stopped = true;
        return;
      }
      if (outcome.code === 4006) this.token = '';
      index = this.order.indexOf(/** @type {TransportName} */ (this.transport));
      if (outcome.unusable) {
        index = (index + 1) % this.order.length;
        failures = 0;
        delay = 0;
        continue;
      }
      if (Date.now() - started >= STABLE_MS) {
        failures = 0;
      } else if (++failures >= this.options.failAfter) {
        // It connects but keeps dropping: the next transport.
        index = (index + 1) % this.order.length;
        failures = 0;
      }
      // A drain (1012) asks for a prompt reconnect; anything else backs off.
      delay = outcome.code === 1012 ? Math.random() * this.options.retryMin : this.backoff(failures);
    }
  }

  backoff(n) {
    const cap = Math.min(this.options.retryMax, this.options.retryMin * 2 ** Math.max(0, n));
    return cap / 2 + Math.random() * (cap / 2);
  }

  /** Waits for the current transport's end (a transport swapped in by an upgrade continues the wait). */
  async follow() {
    for (;;) {
      const t = this.current;
      const outcome = await t.closed;
      if (this.current === t || this.stopped) {
        clearInterval(this.upgrader);
        return outcome;
      }
    }
  }

  /**
   * Makes `t` the transport: resubscribe, enter presence again, send what
   * is queued. A transport it replaces (an upgrade) is closed only once
   * every subscription resumed on `t`, so the move loses nothing (what both
   * deliver is dropped as already seen).
   */
  async adopt(t, c, name) {
    const previous = this.current;
    this.current = t;
    this.transport = name;
    this.connectionId = t.connectionId;
    if (c && c.client_id) this.clientId = c.client_id;
    this.sendEpoch = (this.sendEpoch || 0) + 1;
    for (const p of this.queue) p.sent = false;
    this.inflight = 0;
    if (t.resubscribe) {
      // SSE and polling opened with the subscriptions they planned.
      for (const sub of this.subs.values()) if (t.planned?.has(sub.filter)) this.established(sub, null);
    } else {
      await Promise.all([...this.subs.values()].map((sub) => this.sendSubscribe(sub)));
    }
    this.resumeMark = null;
    if (previous && previous !== t) previous.close({ code: 1000, reason: 'replaced', reconnect: true });
    if (this.stopped || t.ended || this.current !== t) return;
    this.reenterPresence();
    this.scheduleRefresh();
    this.setState('connected', { transport: name, clientId: this.clientId, connectionId: this.connectionId });
    this.catchUp();
    this.pump();
    this.planUpgrade();
  }

  /**
   * Subscriptions made while the transport was connecting: WebSocket and
   * WebTransport subscribe them now; SSE and polling reopen the stream if
   * its filters are not the client's.
   */
  catchUp() {
    const t = this.current;
    if (!t || this.state !== 'connected') return;
    if (t.resubscribe) {
      const missing = [...this.subs.values()].some((s) => !t.planned?.has(s.filter));
      const extra = [...(t.planned || [])].some((f) => !this.subs.has(f));
      if (missing || extra) this.restream(null);
      return;
    }
    for (const sub of this.subs.values()) if (!sub.established) this.sendSubscribe(sub);
  }

  /** On a transport below the first, probes the better ones every `upgradeAfter`. */
  planUpgrade() {
    clearInterval(this.upgrader);
    const rank = this.order.indexOf(/** @type {TransportName} */ (this.transport));
    if (rank <= 0 || !this.options.upgradeAfter) return;
    this.upgrader = setInterval(async () => {
      if (this.probing || this.state !== 'connected') return;
      this.probing = true;
      try {
        for (const name of this.order.slice(0, this.order.indexOf(/** @type {TransportName} */ (this.transport)))) {
          try {
            const { t, c } = await this.attempt(name);
            if (this.stopped || this.state !== 'connected') {
              t.close({ code: 1000, reason: 'not needed', reconnect: false });
              return;
            }
            await this.adopt(t, c, name);
            return;
          } catch {
            // Still unavailable: try the next better one.
          }
        }
      } finally {
        this.probing = false;
      }
    }, this.options.upgradeAfter);
  }

  // --- subscriptions ---

  /**
   * Subscribes to a channel or MQTT filter.
   * @param {string} filter
   * @param {(m: Message) => void} onMessage
   * @param {SubscribeOptions} [options]
   * @returns {Subscription}
   */
  subscribe(filter, onMessage, options = {}) {
    if (typeof filter !== 'string' || !filter) throw new SwitchboardError('invalid_filter', 'a filter is a non-empty string');
    if (this.subs.has(filter)) throw new SwitchboardError('already_subscribed', `already subscribed to ${JSON.stringify(filter)}`);
    const sub = new Subscription(this, filter, onMessage, options);
    this.subs.set(filter, sub);
    if (this.state === 'connected' && this.current) {
      if (this.current.resubscribe) this.restream(sub);
      else this.sendSubscribe(sub);
    }
    return sub;
  }

  /**
   * SSE and polling: the stream reopens for the subscriptions as they are
   * now. When the gateway refuses it (a filter it rejects or the token does
   * not allow), the subscriptions it has not acknowledged yet are dropped,
   * their `ready` rejected with its error, and the stream opens without them.
   */
  async restream(sub) {
    const t = this.current;
    for (let tries = 0; tries < 2; tries++) {
      try {
        await t.resubscribe();
        for (const s of this.subs.values()) if (!s.established && t.planned?.has(s.filter)) this.established(s, null);
        return;
      } catch (e) {
        if (t !== this.current || t.ended) return;
        if (!(e instanceof SwitchboardError) || !REFUSALS.has(e.code)) break;
        this.dropUnacknowledged(e);
      }
    }
    // A transport that never carried a stream (it connected with no
    // subscription) and cannot open one is no good here: the next one.
    t.close({ code: 1006, reason: 'the stream could not open', reconnect: true, unusable: !t.streamed });
  }

  /** Drops the subscriptions the gateway has not acknowledged, with its refusal. */
  dropUnacknowledged(e) {
    for (const [filter, s] of [...this.subs]) {
      if (s.established) continue;
      this.subs.delete(filter);
      s.settle.reject(e);
    }
  }

  established(sub, reply) {
    sub.established = true;
    sub.settle.resolve(reply);
  }

  /**
   * Where `sub` resumes from: per channel, the last position it was handed,
   * else where it began (a fresh subscription's `subscribed` reply).
   * Empty after the gateway refused its positions (`bad_position`): it then
   * resumes by time, and its own dedupe keeps anything from showing twice.
   */
  positionsFor(sub) {
    if (sub.byTimeOnly) return new Map();
    const out = new Map(sub.floors);
    for (const [channel, p] of sub.positions) out.set(channel, p);
    return out;
  }

  /** Subscribes (or resumes) `sub` on the current transport, once at a time. */
  async sendSubscribe(sub) {
    const t = this.current;
    if (!t || sub.sending === t) return;
    sub.sending = t;
    const resume = sub.established;
    const positions = resume ? this.positionsFor(sub) : new Map();
    // The gateway takes at most 1 000 positions; the others resume by time.
    while (positions.size > 1000) positions.delete(positions.keys().next().value);
    const since = resume ? this.resumeSince() : 0;
    try {
      const reply = await t.subscribe(sub, positions, since);
      if (!resume && !sub.rewind && !sub.options.retained) {
        // A fresh subscription is in effect from these positions: a resume
        // continues from them even if nothing arrives first.
        for (const ch of reply.channels || []) {
          if (ch.epoch && !sub.positions.has(ch.channel)) sub.floors.set(ch.channel, { epoch: ch.epoch, serial: ch.serial });
        }
      }
      this.established(sub, reply);
    } catch (e) {
      // Cut off: the reconnect subscribes again.
      if (!(e instanceof SwitchboardError) || e.code === 'disconnected' || e.code === 'timeout') return;
      if (this.subs.get(sub.filter) !== sub) return;
      if (!sub.established || FILTER_REFUSALS.has(e.code)) {
        // Refused for good: the subscription is gone, and the page is told.
        this.subs.delete(sub.filter);
        sub.settle.reject(e);
        if (sub.established) this.emit('error', new SwitchboardError(e.code, `subscription ${JSON.stringify(sub.filter)} ended: ${e.message}`));
        return;
      }
      if (e.code === 'bad_position') sub.byTimeOnly = true;
      // Anything else (unavailable, internal, rate_limited, a position the
      // gateway refused): reconnect, which resumes after the back-off.
      if (this.current === t) t.close({ code: 1006, reason: `resubscribe failed: ${e.code}`, reconnect: true });
    } finally {
      if (sub.sending === t) sub.sending = null;
    }
  }

  /**
   * Stops a subscription.
   * @param {string | Subscription} filter
   */
  async unsubscribe(filter) {
    const f = typeof filter === 'string' ? filter : filter.filter;
    const sub = this.subs.get(f);
    if (!sub) return;
    this.subs.delete(f);
    // Forget positions no subscription covers any more: a later subscribe
    // starts fresh rather than "recovering" what it never asked for.
    for (const channel of [...this.positions.keys()]) {
      if (![...this.subs.values()].some((s) => s.accepts(channel))) this.positions.delete(channel);
    }
    if (this.state !== 'connected' || !this.current) return;
    if (this.current.resubscribe) return this.restream(null);
    try {
      await this.current.unsubscribe(f);
    } catch (e) {
      if (!(e instanceof SwitchboardError) || e.code !== 'not_subscribed') throw e;
    }
  }

  /**
   * One envelope from any transport. Each subscription that covers the
   * channel gets it unless it already had that position (its own dedupe);
   * the client-wide position (what SSE and poll cursors carry) keeps the
   * newest, and a hole in the `prev_serial` chain there is a `missed` gap.
   */
  deliver(m) {
    const subs = [...this.subs.values()].filter((s) => s.accepts(m.channel));
    // Nobody asked (a late delivery after an unsubscribe): no position kept.
    if (!subs.length) return;
    if (m.timestamp) this.observeServerTime(m.timestamp);
    const at = { epoch: m.epoch, serial: m.serial };
    const g = this.positions.get(m.channel);
    if (!g || g.epoch !== m.epoch || m.serial > g.serial) {
      if (g && g.epoch === m.epoch && m.prev_serial > g.serial) {
        this.gap({ channel: m.channel, from: g, to: { epoch: m.epoch, serial: m.prev_serial }, reason: 'missed' });
      }
      this.positions.set(m.channel, at);
    }
    const presenceEvent = m.kind && m.kind !== 'message';
    for (const sub of subs) {
      const p = sub.positions.get(m.channel);
      if (p && p.epoch === m.epoch && m.serial <= p.serial) continue;
      sub.positions.set(m.channel, at);
      sub.floors.delete(m.channel);
      const fn = presenceEvent && sub.options.onPresence ? sub.options.onPresence : sub.onMessage;
      try {
        fn(m);
      } catch (e) {
        setTimeout(() => {
          throw e;
        });
      }
    }
  }

  /** A gap: positions move to its `to`; the page hears of it. */
  gap(g) {
    const subs = [...this.subs.values()].filter((s) => s.accepts(g.channel));
    if (g.to && g.to.epoch) {
      const to = { epoch: g.to.epoch, serial: g.to.serial };
      const advance = (map) => {
        const pos = map.get(g.channel);
        if (!pos || pos.epoch !== to.epoch || pos.serial < to.serial) map.set(g.channel, to);
      };
      if (subs.length) advance(this.positions);
      for (const sub of subs) {
        advance(sub.positions);
        sub.floors.delete(g.channel);
      }
    }
    const gap = { channel: g.channel, from: g.from, to: g.to, reason: g.reason };
    this.emit('gap', gap);
    for (const sub of subs) sub.options.onGap?.(gap);
  }

  // --- publishing ---

  /**
   * Publishes; resolves with the gateway's acknowledgement. While
   * disconnected the publish waits in a bounded queue (`maxQueued`) and is
   * sent once connected; its id (yours, or a generated one) makes a resend
   * deliver once.
   * @param {string} channel
   * @param {any} data a string (`text`), bytes (`data_b64`), or a JSON value (`data`)
   * @param {{ id?: string, contentType?: string, headers?: Record<string, string>, retain?: boolean }} [options]
   * @returns {Promise<Ack>}
   */
  publish(channel, data, options = {}) {
    if (this.stopped) return Promise.reject(new SwitchboardError('closed', 'the client is closed'));
    let payload;
    try {
      payload = encodePayload(data);
    } catch (e) {
      return Promise.reject(e);
    }
    if (this.queue.length >= this.options.maxQueued) {
      return Promise.reject(new SwitchboardError('queue_full', `${this.queue.length} publishes are waiting already (maxQueued)`));
    }
    const d = deferred();
    this.queue.push({ channel, payload, options, id: options.id || randomId('p-'), sent: false, done: false, notBefore: 0, tries: 0, d });
    this.pump();
    return d.promise;
  }

  /**
   * Sends what is queued, in order, up to the transport's window. Each send
   * belongs to the transport generation (`sendEpoch`) it went out on: an
   * answer arriving after a reconnect or an upgrade settles the publish but
   * does not touch the new generation's window.
   */
  pump() {
    const t = this.current;
    if (!t || this.state !== 'connected') return;
    const now = Date.now();
    for (const p of this.queue) {
      if (this.inflight >= t.publishWindow) return;
      if (p.sent) continue;
      if (p.notBefore > now) {
        // Waiting out a refusal to store it: later publishes wait too (order).
        clearTimeout(this.pumpTimer);
        this.pumpTimer = setTimeout(() => this.pump(), p.notBefore - now);
        return;
      }
      p.sent = true;
      const epoch = this.sendEpoch;
      this.inflight++;
      let settled = false;
      const settle = () => {
        if (settled) return;
        settled = true;
        if (epoch === this.sendEpoch) this.inflight--;
      };
      t.publish(p).then(
        (ack) => {
          settle();
          if (!p.done) {
            p.done = true;
            const i = this.queue.indexOf(p);
            if (i >= 0) this.queue.splice(i, 1);
            p.d.resolve({ channel: ack.channel, epoch: ack.epoch, serial: ack.serial, duplicate: !!ack.duplicate });
          }
          this.pump();
        },
        (e) => {
          settle();
          // A failure on a generation this publish no longer waits on.
          if (p.done || epoch !== this.sendEpoch) return;
          const code = e instanceof SwitchboardError ? e.code : 'disconnected';
          if (code === 'not_connected' && t.resubscribe && this.current === t) {
            // The poll's session changed under the request: learn the
            // current one, then send again (same id: delivered once).
            p.sent = false;
            t.resubscribe().then(() => this.pump(), () => {});
            return;
          }
          if (code === 'unavailable' || code.startsWith('http_5')) {
            // The gateway could not store it: again after a pause.
            p.sent = false;
            p.notBefore = Date.now() + this.backoff(++p.tries);
            this.pump();
            return;
          }
          if (['disconnected', 'timeout'].includes(code)) {
            // Sent again after the reconnect (same id: delivered once).
            p.sent = false;
            if (this.current === t) t.close({ code: 1006, reason: `publish failed: ${e.message}`, reconnect: true });
            return;
          }
          p.done = true;
          const i = this.queue.indexOf(p);
          if (i >= 0) this.queue.splice(i, 1);
          p.d.reject(e);
          this.pump();
        },
      );
    }
  }

  // --- presence and history ---

  /** Presence on a channel, as this client (its client id). */
  get presence() {
    return {
      /** Enters (or updates the data of) this client's presence; kept across reconnects. */
      enter: (channel, data) => this.presenceOp('enter', channel, data),
      /** Changes the member data. */
      update: (channel, data) => this.presenceOp('update', channel, data),
      /** Leaves. */
      leave: (channel) => this.presenceOp('leave', channel),
      /** @returns {Promise<Member[]>} */
      members: (channel) => this.whenConnected((t) => t.members(channel)),
    };
  }

  async presenceOp(kind, channel, data) {
    const payload = data === undefined ? null : encodePayload(data);
    if (kind === 'leave') this.entered.delete(channel);
    else this.entered.set(channel, payload);
    return this.whenConnected(async (t) => {
      if (t.resubscribe && kind !== 'leave' && !t.connectionId) await this.restream(null);
      // Over REST an update is an enter with new data.
      const op = t.resubscribe && kind === 'update' ? 'enter' : kind;
      try {
        await t.presence(op, channel, payload);
      } catch (e) {
        if (!t.resubscribe || !(e instanceof SwitchboardError) || e.code !== 'not_connected') throw e;
        // The stream's session changed under the request (a poll on a new
        // connection): learn the current one and act for it.
        await t.resubscribe();
        await t.presence(op, channel, payload);
      }
    });
  }

  /** After a (re)connect or a new poll session: every held presence again. */
  reenterPresence() {
    const t = this.current;
    for (const [channel, payload] of this.entered) {
      t.presence('enter', channel, payload).catch((e) => this.emit('error', e));
    }
  }

  /**
   * A page of a channel's history (docs/protocol.md: `history`).
   * @param {string} channel
   * @param {{ since?: Position, limit?: number, reverse?: boolean }} [options]
   * @returns {Promise<HistoryPage>}
   */
  history(channel, options = {}) {
    return this.whenConnected(async (t) => {
      const h = await t.history(channel, options);
      return { channel: h.channel, epoch: h.epoch, serial: h.serial, messages: h.messages };
    });
  }

  /** Runs `fn` on the transport once connected (again after a reconnect, twice at most). */
  async whenConnected(fn) {
    for (let attempt = 0; ; attempt++) {
      if (this.stopped) throw new SwitchboardError('closed', 'the client is closed');
      if (this.state !== 'connected' || !this.current) {
        await new Promise((resolve) => {
          const offs = ['connected', 'closed', 'failed'].map((ev) =>
            this.on(ev, () => {
              offs.forEach((off) => off());
              resolve(undefined);
            }),
          );
        });
        continue;
      }
      const t = this.current;
      try {
        return await fn(t);
      } catch (e) {
        if (attempt >= 2 || !(e instanceof SwitchboardError) || e.code !== 'disconnected') throw e;
        // Wait for the transport to be replaced, then try on the new one.
        if (this.current === t) await Promise.race([t.closed, sleep(this.options.requestTimeout)]);
      }
    }
  }

  /** Closes for good: the transport closes cleanly, queued publishes fail. */
  close() {
    if (this.stopped) return;
    this.stopped = true;
    clearTimeout(this.refreshTimer);
    clearInterval(this.upgrader);
    if (typeof window !== 'undefined') {
      window.removeEventListener('online', this.onOnline);
      window.removeEventListener('offline', this.onOffline);
    }
    this.wakeup.abort();
    this.current?.close({ code: 1000, reason: 'closed by the page', reconnect: false });
    for (const p of this.queue.splice(0)) p.d.reject(new SwitchboardError('closed', 'the client closed before the publish was acknowledged'));
    this.setState('closed');
  }
}
