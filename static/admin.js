// The operator console (/admin/). Polls the service's own /metrics (public)
// once a second for the charts; the generator and dead-letter calls carry
// the admin token, kept for this tab only (sessionStorage). Every call that
// fails is shown in the page: the HTTP status and the error body's `message`,
// or the network error.
const $ = (id) => document.getElementById(id);
const WINDOW = 120;                       // points kept per chart (seconds)
const state = { token: sessionStorage.getItem('admin-token') || '', prev: null };
$('token').value = state.token;

// ------------------------------------------------------------------ calls

/** A call the service refused or could not be reached for, worded for the operator. */
class CallError extends Error {}

/**
 * `fetch`, with any failure turned into a CallError: "<method> <path>: 401
 * Unauthorized: <message>", or "<method> <path>: network error (<why>)".
 */
async function request(method, path, init = {}) {
  let res;
  try {
    res = await fetch(path, { method, ...init });
  } catch (err) {
    throw new CallError(`${method} ${path}: network error (${err.message || err})`);
  }
  if (!res.ok) {
    const body = await res.json().catch(() => ({}));
    const status = `${res.status}${res.statusText ? ` ${res.statusText}` : ''}`;
    throw new CallError(`${method} ${path}: ${status}${body && body.message ? `: ${body.message}` : ''}`);
  }
  return res;
}

/** The status line in the header: `signed in`, or the last call that failed. */
function showStatus(text, bad = false) {
  $('status').textContent = text;
  $('status').className = bad ? 'bad' : 'muted';
}

/** Runs a button's work; whatever fails is shown in the status line, never left unhandled. */
function action(work) {
  return () => work().catch((err) => {
    showStatus(err instanceof CallError ? err.message : `error: ${err.message || err}`, true);
  });
}

// ------------------------------------------------------------ /metrics text

/** Samples of the classic text format: [{name, labels, value}]. */
function parseMetrics(text) {
  const out = [];
  for (const line of text.split('\n')) {
    if (!line || line.startsWith('#')) continue;
    const m = line.match(/^([a-zA-Z_:][\w:]*)(\{([^}]*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels = {};
    for (const pair of (m[3] || '').matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[pair[1]] = pair[2];
    out.push({ name: m[1], labels, value: Number(m[4]) });
  }
  return out;
}
const sum = (samples, name, filter = () => true) =>
  samples.filter((s) => s.name === name && filter(s.labels)).reduce((a, s) => a + s.value, 0);

/** Cumulative bucket counts of a histogram, by upper bound. */
function buckets(samples, name) {
  const by = new Map();
  for (const s of samples) {
    if (s.name !== `${name}_bucket`) continue;
    const le = s.labels.le === '+Inf' ? Infinity : Number(s.labels.le);
    by.set(le, (by.get(le) || 0) + s.value);
  }
  return [...by.entries()].sort((a, b) => a[0] - b[0]);
}

/** Prometheus's histogram_quantile over the counts added between two polls. */
function quantile(q, now, before) {
  const delta = now.map(([le, c], i) => [le, c - (before?.[i]?.[1] || 0)]);
  const total = delta.length ? delta[delta.length - 1][1] : 0;
  if (total <= 0) return null;
  const rank = q * total;
  let [prevLe, prevCount] = [0, 0];
  for (const [le, count] of delta) {
    if (count >= rank) {
      if (le === Infinity) return prevLe;
      return prevLe + (le - prevLe) * ((rank - prevCount) / Math.max(count - prevCount, 1e-9));
    }
    [prevLe, prevCount] = [le, count];
  }
  return prevLe;
}

// ------------------------------------------------------------------ charts

function chart(el, series) {
  const data = [[], ...series.map(() => [])];
  const plot = new uPlot({
    width: Math.max(360, el.clientWidth || 480), height: 180,
    series: [{}, ...series.map(([label, stroke]) => ({ label, stroke, width: 2, spanGaps: true }))],
    axes: [{}, { size: 60 }],
    legend: { live: false },
  }, data, el);
  return { plot, data };
}
const charts = {
  rates: chart($('c-rates'), [['published', '#2563eb'], ['applied', '#059669'], ['delivered', '#d97706']]),
  latency: chart($('c-latency'), [['p50', '#2563eb'], ['p99', '#dc2626']]),
  lag: chart($('c-lag'), [['apply lag', '#7c3aed']]),
  clients: chart($('c-clients'), [['ws', '#2563eb'], ['sse', '#059669']]),
};
function push(c, t, values) {
  c.data[0].push(t);
  values.forEach((v, i) => c.data[i + 1].push(v));
  if (c.data[0].length > WINDOW) c.data.forEach((s) => s.shift());
  c.plot.setData(c.data);
}
const fmt = (v, digits = 1) => (v === null || v === undefined || Number.isNaN(v)) ? '–' : v.toFixed(digits);

async function pollMetrics() {
  const res = await request('GET', '/metrics', { headers: { Accept: 'text/plain' } });
  const samples = parseMetrics(await res.text());
  const now = {
    t: Date.now() / 1000,
    published: sum(samples, 'gateway_events_published_total'),
    applied: sum(samples, 'gateway_events_applied_total'),
    delivered: sum(samples, 'gateway_updates_delivered_total'),
    dead: sum(samples, 'gateway_events_dead_lettered_total'),
    lag: sum(samples, 'gateway_consumer_lag_messages'),
    ws: sum(samples, 'gateway_clients_connected', (l) => l.transport === 'ws'),
    sse: sum(samples, 'gateway_clients_connected', (l) => l.transport === 'sse'),
    latency: buckets(samples, 'gateway_e2e_latency_seconds'),
    asked: sum(samples, 'gateway_generator_asked_rate'),
    achieved: sum(samples, 'gateway_generator_achieved_rate'),
  };
  const prev = state.prev;
  state.prev = now;
  if (!prev) return;
  const dt = Math.max(now.t - prev.t, 0.001);
  const rate = (k) => Math.max(0, (now[k] - prev[k]) / dt);
  const p50 = quantile(0.5, now.latency, prev.latency);
  const p99 = quantile(0.99, now.latency, prev.latency);
  const ms = (v) => (v === null ? null : v * 1000);
  $('t-published').textContent = fmt(rate('published'));
  $('t-applied').textContent = fmt(rate('applied'));
  $('t-delivered').textContent = fmt(rate('delivered'));
  $('t-lag').textContent = fmt(now.lag, 0);
  $('t-p50').textContent = fmt(ms(p50));
  $('t-p99').textContent = fmt(ms(p99));
  $('t-clients').textContent = fmt(now.ws + now.sse, 0);
  $('t-dead').textContent = fmt(now.dead, 0);
  showHeld(now.asked, now.achieved);
  push(charts.rates, now.t, [rate('published'), rate('applied'), rate('delivered')]);
  push(charts.latency, now.t, [ms(p50), ms(p99)]);
  push(charts.lag, now.t, [now.lag]);
  push(charts.clients, now.t, [now.ws, now.sse]);
}

/** One poll; a failure is shown above the tiles until a poll succeeds again. */
async function poll() {
  try {
    await pollMetrics();
    $('metrics-error').hidden = true;
  } catch (err) {
    $('metrics-error').textContent = err instanceof CallError ? err.message : `metrics: ${err.message || err}`;
    $('metrics-error').hidden = false;
  }
}

// ------------------------------------------------------------- admin calls

async function admin(method, path, body) {
  const res = await request(method, path, {
    headers: { Authorization: `Bearer ${state.token}`, ...(body ? { 'Content-Type': 'application/json' } : {}) },
    body: body ? JSON.stringify(body) : undefined,
  });
  const json = await res.json().catch(() => ({}));
  showStatus('signed in');
  return json;
}

/** What the generator holds here against what it is asked (both 0 where another instance runs it). */
function showHeld(asked, achieved) {
  const short = asked > 0 && achieved < 0.9 * asked;
  $('gen-held').textContent = asked > 0 ? `holding ${fmt(achieved, 0)} of ${fmt(asked, 0)} events/s` : '';
  $('gen-held').classList.toggle('warn', short);
  $('gen-held').title = short ? 'the broker or the database is slower than the rate asked' : '';
}

function showGenerator(g) {
  $('gen-state').textContent = `${g.running ? 'running' : 'stopped'} at ${g.rate} events/s` +
    (g.active_here ? ' (publishing from this instance)' : ' (another instance publishes)');
  $('gen-state').dataset.running = String(g.running);
}

async function refreshDeadLetters() {
  const { dead_letters: letters } = await admin('GET', '/admin/dead-letters?limit=100');
  $('dl-count').textContent = `(${letters.length}${letters.length === 100 ? '+' : ''})`;
  const rows = $('dl-rows');
  rows.replaceChildren();
  if (!letters.length) {
    rows.innerHTML = '<tr><td colspan="4" class="muted">none</td></tr>';
    return;
  }
  for (const d of letters) {
    const tr = document.createElement('tr');
    for (const text of [d.reason, d.detail || '', d.routing_key, d.body]) {
      const td = document.createElement('td');
      const code = document.createElement('code');
      code.textContent = text;   // bodies are untrusted: text, never HTML
      td.append(code);
      tr.append(td);
    }
    rows.append(tr);
  }
}

async function signIn() {
  state.token = $('token').value.trim();
  sessionStorage.setItem('admin-token', state.token);
  showStatus('signing in…');
  showGenerator(await admin('GET', '/admin/generator'));
  await refreshDeadLetters();
}

$('sign-in').onclick = action(signIn);
$('gen-start').onclick = action(async () =>
  showGenerator(await admin('POST', '/admin/generator', { running: true, rate: Number($('gen-rate').value) })));
$('gen-stop').onclick = action(async () => showGenerator(await admin('POST', '/admin/generator', { running: false })));
$('dl-refresh').onclick = action(refreshDeadLetters);
$('dl-replay').onclick = action(async () => {
  const r = await admin('POST', '/admin/dead-letters/replay?limit=1000');
  $('dl-result').textContent = `replayed ${r.replayed}, ${r.remaining} left`;
  await refreshDeadLetters();
});
$('dl-purge').onclick = action(async () => {
  if (!confirm('Purge every dead letter?')) return;
  await admin('DELETE', '/admin/dead-letters');
  $('dl-result').textContent = 'purged';
  await refreshDeadLetters();
});

setInterval(poll, 1000);
poll();
if (state.token) action(signIn)();
