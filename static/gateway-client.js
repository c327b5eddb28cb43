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
// resumes from the last offset after any drop (exponential back-off with
// jitter), and takes a new snapshot after a `reset`.
//
// Events (all CustomEvent, data in `detail`):
//   update  {product_id, kind, version, offset, data}  one applied update
//   state   {products: Map<id, product>, offset}        after a snapshot or updates
//   status  {status, transport, attempt}                connecting | open | reconnecting | closed
//   error   {code, message}                              an error frame or event

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
    this._attempt = 0;
    this._wsFailures = 0;
    this._useSse = this.options.transport === 'sse' ||
      (this.options.transport === 'auto' && typeof WebSocket === 'undefined');
    this._closed = false;
    this._timer = null;
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

  _retry() {
    if (this._closed) return;
    this._drop();
    this._attempt += 1;
    const cap = Math.min(this.options.maxDelayMs, this.options.minDelayMs * 2 ** Math.min(this._attempt - 1, 16));
    const delay = cap / 2 + Math.random() * cap / 2;   // jitter: spread reconnects out
    this._setStatus('reconnecting');
    clearTimeout(this._timer);
    this._timer = setTimeout(() => this._connect(), delay);
  }

  _drop() {
    const conn = this._conn;
    this._conn = null;
    this._parts = null;
    if (!conn) return;
    conn.onopen = conn.onmessage = conn.onerror = conn.onclose = null;
    try { conn.close(); } catch (_) { /* already closed */ }
  }

  _opened(transport) {
    this.transport = transport;
    this._attempt = 0;
    this._setStatus('open');
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
      this._opened('ws');
      this._subscribeWs(ws);
    };
    ws.onmessage = (m) => {
      let frame;
      try { frame = JSON.parse(m.data); } catch (_) { return; }
      this._frame(frame, frame.offset);
      if (frame.type === 'reset') this._subscribeWs(ws);
    };
    ws.onclose = (e) => {
      if (this._conn !== ws) return;
      if (e.code === 4001) this._emit('error', { code: 'token_expired', message: 'the token has expired' });
      if (!opened && this.options.transport === 'auto' && ++this._wsFailures >= this.options.wsFailuresBeforeSse) {
        this._useSse = true;   // WebSockets do not get through: SSE from now on
      }
      this._retry();
    };
  }

  _subscribeWs(ws) {
    const frame = { op: 'subscribe', topics: this.options.topics };
    if (this._needSnapshot) frame.snapshot = true;
    else if (this.offset !== null) frame.since = this.offset;
    ws.send(JSON.stringify(frame));
  }

  // ------------------------------------------------------------------- SSE

  _openSse() {
    const url = this._url('/events');
    url.searchParams.set('topics', this.options.topics.join(','));
    if (this._needSnapshot) url.searchParams.set('snapshot', 'true');
    else if (this.offset !== null) url.searchParams.set('since', String(this.offset));
    if (this.options.token) url.searchParams.set('token', this.options.token);
    const es = new EventSource(url);
    this._conn = es;
    es.onopen = () => this._opened('sse');
    const on = (name, handler) => es.addEventListener(name, (m) => {
      if (this._conn !== es) return;
      let data;
      try { data = JSON.parse(m.data); } catch (_) { return; }
      handler(data, m.lastEventId);
    });
    for (const kind of ['price', 'stock']) {
      on(kind, (data, id) => this._frame({ type: 'update', data }, Number(id)));
    }
    on('snapshot', (data) => this._frame(data));
    on('snapshot_end', (data) => this._frame(data));
    on('reset', (data) => {
      this._frame(data);
      // A fresh stream with a snapshot makes the state whole again.
      this._drop();
      this._connect();
    });
    on('error', (data) => this._frame(data));
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
      case 'error':
        this._emit('error', { code: frame.code, message: frame.message });
        break;
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
