// product-gateway browser client: a plain ES module, no build step, no
// dependency.
//
//   import { GatewayClient } from '/gateway-client.js';
//   const client = new GatewayClient({ topics: ['product.price.42', 'product.stock.42'] });
//   client.addEventListener('state', e => render(e.detail.products));
//   client.addEventListener('status', e => showStatus(e.detail.status));
//
// It connects over WebSocket and falls back to SSE when WebSockets do not
// get through, takes a snapshot, applies updates into a store keyed by
// product (a value replaces the one held only when its version is newer),
// resumes from the last offset after any drop, and takes a new snapshot
// after a `reset`.
//
// Recovery, all by itself (no call needed from the page):
//   - WebSocket: an error `busy` (no snapshot turn free in time),
//     `unavailable` (the catalog could not be read, or the snapshot was cut
//     short: the patterns stay subscribed, the snapshot is incomplete) or
//     `rate_limited` that answers the subscribe it has outstanding makes it
//     send that subscribe again after a back-off, with the snapshot when
//     none has completed yet, else `since` the last offset. Until the
//     service confirms it (`subscribed`) the status is `subscribing`.
//   - WebSocket close 4002 (slow consumer: it fell too far behind), 1013
//     (instance full), 1001 (shutdown), 4001 (token expired: an `error`
//     event `token_expired` first; call setToken) or any drop: it reconnects
//     after a back-off and resumes from the last offset (a snapshot again
//     when none had completed).
//   - SSE: an `error` event (`busy`, `unavailable`, `slow_consumer`,
//     `token_expired`) precedes the service ending the stream; it closes the
//     EventSource itself and reconnects after a back-off, with
//     `snapshot=true` when no snapshot has completed yet, else
//     `since=<last offset>`. A dropped stream is reconnected the same way.
//   Back-off: with n tries failed in a row and d = min(maxDelayMs,
//   minDelayMs × 2^(n−1)), the delay is max(retry_ms, d/2) + random × d/2:
//   doubling, jittered so that clients refused together do not come back
//   together, and never sooner than the `retry_ms` the service asked for.
//   n goes back to 0 once a subscription is complete (its `snapshot_end`,
//   or its confirmation when no snapshot was asked; on SSE without a
//   snapshot, an update or five seconds open).
//
// Events (all CustomEvent, data in `detail`):
//   update  {product_id, kind, version, offset, data}  one applied update
//   state   {products: Map<id, product>, offset}        after a snapshot or updates
//   status  {status, transport, attempt}                connecting | subscribing | open | reconnecting | closed
//           subscribing: connected, the subscription (or its snapshot) not
//           yet confirmed, maybe waiting to ask again after a refusal;
//           open: subscribed (on SSE with a snapshot: its first part came)
//   error   {code, message, retry_ms?}                  an error frame or event; close 4002 gives
//                                                       `slow_consumer`, 4001 `token_expired`

const DEFAULTS = {
  base: '',                 // '' = this page's origin; or 'https://gateway.example'
  topics: [],
  transport: 'auto',        // 'auto' (WebSocket, SSE fallback) | 'ws' | 'sse'
  token: null,              // subscriber token (JWT), see the README
  snapshot: true,           // start from the current state
  minDelayMs: 500,          // back-off: first delay, doubled per failed attempt
  maxDelayMs: 15000,
  wsFailuresBeforeSse: 2,   // WebSocket attempts that never open before SSE is tried
};

/** Error codes that refuse a subscribe for now: ask again later. */
const RETRY_SUBSCRIBE = new Set(['busy', 'unavailable', 'rate_limited']);

/** An SSE stream open this long without an error has recovered. */
const SSE_STABLE_MS = 5000;

export class GatewayClient extends EventTarget {
  constructor(options = {}) {
    super();
    this.options = { ...DEFAULTS, ...options };
    if (!this.options.topics.length) throw new Error('GatewayClient: topics must name at least one pattern');
    /** @type {Map<number, object>} product id → {product_id, name?, price_cents, stock, price_version, stock_version} */
    this.products = new Map();
    this.offset = null;          // last stream offset received; resumes from here
    this.transport = null;
    this.status = 'connecting';
    this._needSnapshot = this.options.snapshot;
    this._parts = null;          // snapshot parts being gathered
    this._attempt = 0;           // tries failed in a row (connects and subscribes)
    this._wsFailures = 0;
    this._useSse = this.options.transport === 'sse' ||
      (this.options.transport === 'auto' && typeof WebSocket === 'undefined');
    this._closed = false;
    this._timer = null;          // the next reconnect
    this._subTimer = null;       // the next subscribe (WebSocket, after a refusal)
    this._stableTimer = null;    // SSE without a snapshot: recovered once it stays open
    // WebSocket subscription: null (none asked on this socket), 'asked'
    // (no answer yet), 'snapshot' (confirmed, its snapshot coming), 'done',
    // or 'waiting' (refused; asked again when _subTimer fires).
    this._sub = null;
    this._subSnapshot = false;   // whether the outstanding subscribe asked for a snapshot
    this._conn = null;
    this._connect();
  }

  /** Replaces the token: sent in place over WebSocket, a reconnect on SSE. */
  setToken(token) {
    this.options.token = token;
    if (this.transport === 'ws' && this._conn && this._conn.readyState === 1) {
      this._conn.send(JSON.stringify({ op: 'auth', token }));
    } else if (this.transport === 'sse') {
      this._drop();
      this._connect();
    }
  }

  close() {
    this._closed = true;
    clearTimeout(this._timer);
    this._drop();
    this._setStatus('closed');
  }

  // ---------------------------------------------------------------- wiring

  _connect() {
    if (this._closed) return;
    this._setStatus(this._attempt === 0 ? 'connecting' : 'reconnecting');
    if (this._useSse) this._openSse(); else this._openWs();
  }

  /** Drops the connection and connects again after the back-off, never
   *  sooner than `floorMs` (the `retry_ms` the service asked for). */
  _retry(floorMs) {
    if (this._closed) return;
    this._drop();
    this._attempt += 1;
    const delay = this._delay(floorMs);
    this._setStatus('reconnecting');
    clearTimeout(this._timer);
    this._timer = setTimeout(() => this._connect(), delay);
  }

  /** Back-off for the current attempt: doubling, capped, jittered, at least `floorMs`. */
  _delay(floorMs) {
    const { minDelayMs, maxDelayMs } = this.options;
    const cap = Math.min(maxDelayMs, minDelayMs * 2 ** Math.min(Math.max(this._attempt - 1, 0), 16));
    const floor = Number.isFinite(floorMs) && floorMs > 0 ? floorMs : 0;
    // Jitter on top of the floor too: clients refused together spread out.
    return Math.max(floor, cap / 2) + Math.random() * cap / 2;
  }

  /** The subscription is whole again: the next failure starts the back-off over. */
  _settled() {
    this._attempt = 0;
    clearTimeout(this._stableTimer);
    this._stableTimer = null;
  }

  _drop() {
    const conn = this._conn;
    this._conn = null;
    this._parts = null;
    this._sub = null;
    clearTimeout(this._subTimer);
    clearTimeout(this._stableTimer);
    this._subTimer = this._stableTimer = null;
    if (!conn) return;
    conn.onopen = conn.onmessage = conn.onerror = conn.onclose = null;
    try { conn.close(); } catch (_) { /* already closed */ }
  }

  _url(path) {
    const base = this.options.base || location.origin;
    return new URL(path, base);
  }

  // ------------------------------------------------------------- WebSocket

  _openWs() {
    const url = this._url('/ws');
    url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
    if (this.options.token) url.searchParams.set('token', this.options.token);
    let opened = false;
    const ws = new WebSocket(url);
    this._conn = ws;
    ws.onopen = () => {
      opened = true;
      this._wsFailures = 0;
      this.transport = 'ws';
      this._subscribeWs(ws);
    };
    ws.onmessage = (m) => {
      if (this._conn !== ws) return;
      let frame;
      try { frame = JSON.parse(m.data); } catch (_) { return; }
      this._frame(frame, frame.offset);
      switch (frame.type) {
        case 'subscribed':
          if (this._sub === 'asked') {
            this._sub = this._subSnapshot ? 'snapshot' : 'done';
            if (!this._subSnapshot) this._settled();
            this._setStatus('open');
          }
          break;
        case 'snapshot_end':
          if (this._sub === 'snapshot') this._sub = 'done';
          this._settled();
          break;
        case 'reset':
          this._subscribeWs(ws);
          break;
        case 'error':
          // Our subscribe refused (nothing new subscribed), or its snapshot
          // cut short (the patterns stay, the snapshot is to be asked again).
          if ((this._sub === 'asked' || this._sub === 'snapshot') && RETRY_SUBSCRIBE.has(frame.code)) {
            this._subscribeLater(ws, frame.retry_ms);
          }
          break;
        default:
          break;
      }
    };
    ws.onclose = (e) => {
      if (this._conn !== ws) return;
      if (e.code === 4001) this._emit('error', { code: 'token_expired', message: 'the token has expired' });
      if (e.code === 4002) {
        this._emit('error', { code: 'slow_consumer', message: 'fell too far behind; resuming from the last offset' });
      }
      if (!opened && this.options.transport === 'auto' && ++this._wsFailures >= this.options.wsFailuresBeforeSse) {
        this._useSse = true;   // WebSockets do not get through: SSE from now on
      }
      this._retry();
    };
  }

  _subscribeWs(ws) {
    clearTimeout(this._subTimer);
    this._subTimer = null;
    this._parts = null;
    const frame = { op: 'subscribe', topics: this.options.topics };
    if (this._needSnapshot) frame.snapshot = true;
    else if (this.offset !== null) frame.since = this.offset;
    this._sub = 'asked';
    this._subSnapshot = !!frame.snapshot;
    this._setStatus('subscribing');
    ws.send(JSON.stringify(frame));
  }

  /** Asks again on the same socket after the back-off (at least `floorMs`). */
  _subscribeLater(ws, floorMs) {
    this._attempt += 1;
    this._parts = null;
    this._sub = 'waiting';
    this._setStatus('subscribing');
    clearTimeout(this._subTimer);
    this._subTimer = setTimeout(() => {
      this._subTimer = null;
      if (this._conn === ws && ws.readyState === 1) this._subscribeWs(ws);
    }, this._delay(floorMs));
  }

  // ------------------------------------------------------------------- SSE

  _openSse() {
    const url = this._url('/events');
    url.searchParams.set('topics', this.options.topics.join(','));
    const snapshot = this._needSnapshot;
    if (snapshot) url.searchParams.set('snapshot', 'true');
    else if (this.offset !== null) url.searchParams.set('since', String(this.offset));
    if (this.options.token) url.searchParams.set('token', this.options.token);
    const es = new EventSource(url);
    this._conn = es;
    es.onopen = () => {
      if (this._conn !== es) return;
      this.transport = 'sse';
      // A refusal also comes as a stream (an `error` event, then its end):
      // with a snapshot asked, open once its first part is here.
      this._setStatus(snapshot ? 'subscribing' : 'open');
      if (!snapshot) {
        clearTimeout(this._stableTimer);
        this._stableTimer = setTimeout(() => this._settled(), SSE_STABLE_MS);
      }
    };
    const on = (name, handler) => es.addEventListener(name, (m) => {
      if (this._conn !== es) return;
      let data;
      try { data = JSON.parse(m.data); } catch (_) { return; }
      handler(data, m.lastEventId);
    });
    for (const kind of ['price', 'stock']) {
      on(kind, (data, id) => {
        this._settled();
        this._frame({ type: 'update', data }, Number(id));
      });
    }
    on('snapshot', (data) => {
      if (this.status !== 'open') this._setStatus('open');
      this._frame(data);
    });
    on('snapshot_end', (data) => {
      if (this.status !== 'open') this._setStatus('open');
      this._settled();
      this._frame(data);
    });
    on('reset', (data) => {
      this._frame(data);
      // A fresh stream with a snapshot makes the state whole again.
      this._drop();
      this._connect();
    });
    // The service's `error` event (busy, unavailable, slow_consumer,
    // token_expired) comes last: the stream ends after it. Reconnect on our
    // own terms (back-off, retry_ms, snapshot or since) rather than let
    // EventSource do it with the last event id.
    on('error', (data) => {
      this._frame(data);
      this._retry(data.retry_ms);
    });
    // EventSource would reconnect by itself, but without our back-off and
    // with the id of the last event, which a snapshot may have moved past.
    es.onerror = () => { if (this._conn === es) this._retry(); };
  }

  // ----------------------------------------------------------------- state

  _frame(frame, offset) {
    switch (frame.type) {
      case 'snapshot':
        (this._parts ||= []).push(...frame.products);
        break;
      case 'snapshot_end': {
        for (const p of this._parts || []) this._merge(p);
        this._parts = null;
        this._needSnapshot = false;
        if (frame.offset !== null && frame.offset !== undefined) this.offset = frame.offset;
        this._emitState();
        break;
      }
      case 'update': {
        const d = frame.data;
        if (Number.isFinite(offset)) this.offset = offset;
        const changed = this._merge({
          product_id: d.product_id,
          ...(d.kind === 'price' ? { price_cents: d.price_cents, price_version: d.version }
                                 : { stock: d.stock, stock_version: d.version }),
        });
        if (changed) {
          this._emit('update', { product_id: d.product_id, kind: d.kind, version: d.version, offset: this.offset, data: d });
          this._emitState();
        }
        break;
      }
      case 'reset':
        // What came before `offset` may be missing: resume there with a snapshot.
        this.offset = frame.offset;
        this._needSnapshot = true;
        this._emit('error', { code: 'reset', message: frame.message, reason: frame.reason });
        break;
      case 'error': {
        const detail = { code: frame.code, message: frame.message };
        if (Number.isFinite(frame.retry_ms)) detail.retry_ms = frame.retry_ms;
        this._emit('error', detail);
        break;
      }
      default:
        break;
    }
  }

  /** Takes each attribute whose version is newer than the one held; true when any was. */
  _merge(p) {
    // -1: a snapshot value at version 0 (never changed since seeding) is taken too.
    const held = this.products.get(p.product_id) || { product_id: p.product_id, price_version: -1, stock_version: -1 };
    let changed = false;
    if (p.price_version !== undefined && p.price_version > held.price_version) {
      held.price_cents = p.price_cents;
      held.price_version = p.price_version;
      changed = true;
    }
    if (p.stock_version !== undefined && p.stock_version > held.stock_version) {
      held.stock = p.stock;
      held.stock_version = p.stock_version;
      changed = true;
    }
    if (p.name !== undefined) held.name = p.name;
    this.products.set(p.product_id, held);
    return changed;
  }

  _emitState() {
    this._emit('state', { products: this.products, offset: this.offset });
  }

  _setStatus(status) {
    this.status = status;
    this._emit('status', { status, transport: this._useSse ? 'sse' : 'ws', attempt: this._attempt });
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}
