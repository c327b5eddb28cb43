// Recovery from a refused snapshot in Debian's Chromium: while the test
// holds the service's only snapshot turn, a page asks for a snapshot and is
// refused (`busy`); once the test lets go of the turn, the page must get its
// snapshot by itself, with no action of its own.
//
//   node recovery.mjs <base_url> eventsource|module
//
//   eventsource  a plain `new EventSource('/events?…&snapshot=true')`, with
//                nothing but listeners: the browser's own reconnect must do it
//   module       static/gateway-client.js, one client over WebSocket and one
//                over SSE, each until a `state` event carrying the snapshot
//
// Prints `REFUSED` once every connection of the page was refused at least
// once (an `error` event, or a reconnect), then waits for `RELEASE` on
// stdin, marks that moment in the page's log and answers `MARKED` (the test
// gives the turn back only then, so whatever the log has before the mark
// happened while the turn was held), then waits at most RECOVER_MS for the
// snapshot(s), and prints one JSON line: what the page saw, in order. Exit
// 0 when that line was printed, whatever it says (the test judges it); 1 on
// a failure of the script itself. A hard timer ends the process in any case.
//
// GATEWAY_CLIENT_JS=<file> serves that file as /gateway-client.js instead of
// the service's, to check that an older module fails this test.
import { launch } from './chromium.mjs';
import { readFile } from 'node:fs/promises';
import readline from 'node:readline';

const REFUSED_MS = 30_000;
const RELEASE_MS = 30_000;
const RECOVER_MS = 30_000;
const HARD_KILL_MS = REFUSED_MS + RELEASE_MS + RECOVER_MS + 30_000;

// The topics of the page: three named products, a snapshot of one part.
const TOPICS = ['product.*.1', 'product.*.2', 'product.*.3'];

const [base, mode] = process.argv.slice(2);
if (!base || !['eventsource', 'module'].includes(mode)) {
  console.error('usage: node recovery.mjs <base_url> eventsource|module');
  process.exit(2);
}

const hardKill = setTimeout(() => {
  console.error(`recovery.mjs: hard timeout after ${HARD_KILL_MS} ms`);
  process.exit(3);
}, HARD_KILL_MS);
hardKill.unref();

const pageLog = [];
const browser = await launch();
let code = 1;
let page = null;
try {
  page = await browser.newPage();
  page.on('console', (m) => pageLog.push(`console.${m.type()}: ${m.text()}`));
  page.on('pageerror', (e) => pageLog.push(`pageerror: ${e.message}`));
  if (process.env.GATEWAY_CLIENT_JS) {
    const body = await readFile(process.env.GATEWAY_CLIENT_JS, 'utf8');
    await page.route('**/gateway-client.js', (route) => route.fulfill({ contentType: 'text/javascript', body }));
  }
  // Any page of the service's origin: not `/`, whose echo page would take
  // snapshots of its own.
  await page.goto(new URL('/healthz', base).href);

  if (mode === 'eventsource') {
    await page.evaluate((topics) => {
      const t0 = performance.now();
      const run = { log: [], snapshotEnds: 0, busy: 0, refusals: 0, opens: 0, released: null };
      const at = () => Math.round(performance.now() - t0);
      window.run = run;
      const es = new EventSource(`/events?topics=${topics.join(',')}&snapshot=true`);
      run.es = es;
      es.addEventListener('open', () => { run.opens += 1; run.log.push([at(), 'open']); });
      // Both the service's `event: error` (a MessageEvent with data) and
      // the browser's own connection error come as `error`.
      es.addEventListener('error', (e) => {
        run.refusals += 1;
        if (typeof e.data === 'string') {
          let data = {};
          try { data = JSON.parse(e.data); } catch (_) { /* kept as is */ }
          if (data.code === 'busy') run.busy += 1;
          run.log.push([at(), 'error event', data.code, data.retry_ms]);
        } else {
          run.log.push([at(), 'connection error', ['connecting', 'open', 'closed'][es.readyState]]);
        }
      });
      es.addEventListener('snapshot', (e) => run.log.push([at(), 'snapshot', JSON.parse(e.data).products.length]));
      es.addEventListener('snapshot_end', (e) => {
        run.snapshotEnds += 1;
        run.log.push([at(), 'snapshot_end', JSON.parse(e.data).products, e.lastEventId]);
      });
      run.mark = () => { run.released = at(); run.log.push([run.released, 'RELEASE']); };
    }, TOPICS);
    await page.waitForFunction(() => window.run.refusals >= 1, null, { timeout: REFUSED_MS });
  } else {
    await page.evaluate(async (topics) => {
      const { GatewayClient } = await import('/gateway-client.js');
      const t0 = performance.now();
      const at = () => Math.round(performance.now() - t0);
      // Every frame the page sends over a WebSocket: the subscribes asked.
      window.sent = [];
      const send = WebSocket.prototype.send;
      WebSocket.prototype.send = function (data) { window.sent.push(data); return send.call(this, data); };
      window.runs = {};
      for (const transport of ['ws', 'sse']) {
        const run = { log: [], refused: false, states: 0, released: null };
        const client = new GatewayClient({ topics, transport, minDelayMs: 200, maxDelayMs: 2000 });
        client.addEventListener('status', (e) => {
          run.log.push([at(), 'status', e.detail.status]);
          if (e.detail.status === 'reconnecting') run.refused = true;
        });
        client.addEventListener('error', (e) => {
          run.log.push([at(), 'error', e.detail.code, e.detail.retry_ms]);
          run.refused = true;
        });
        client.addEventListener('state', (e) => {
          run.states += 1;
          run.log.push([at(), 'state', e.detail.products.size, e.detail.offset]);
        });
        run.client = client;
        run.mark = () => { run.released = at(); run.log.push([run.released, 'RELEASE']); };
        window.runs[transport] = run;
      }
    }, TOPICS);
    await page.waitForFunction(() => Object.values(window.runs).every((r) => r.refused), null, { timeout: REFUSED_MS });
  }
  console.log('REFUSED');

  // The test gives the turn back once the page has marked the moment.
  const lines = readline.createInterface({ input: process.stdin });
  const release = await Promise.race([
    (async () => { for await (const line of lines) if (line.trim() === 'RELEASE') return true; return false; })(),
    new Promise((r) => setTimeout(() => r(false), RELEASE_MS)),
  ]);
  if (!release) throw new Error('no RELEASE from the test');
  await page.evaluate(() => {
    if (window.run) window.run.mark();
    for (const run of Object.values(window.runs || {})) run.mark();
  });
  console.log('MARKED');

  // Recovered, or the time is up: the test judges which.
  const recovered = mode === 'eventsource'
    ? () => window.run.snapshotEnds >= 1
    : () => Object.values(window.runs).every((r) => r.client.status === 'open' && r.log.some((l) => l[1] === 'state' && l[2] > 0));
  await page.waitForFunction(recovered, null, { timeout: RECOVER_MS }).catch(() => {});
  // A moment more: what comes right after (a second snapshot, an error) shows too.
  await page.waitForTimeout(500);

  const summary = await page.evaluate((m) => {
    if (m === 'eventsource') {
      const { es, mark, ...run } = window.run;
      const out = { ...run, ready_state: es.readyState };
      es.close();
      return out;
    }
    const out = { subscribes: window.sent.filter((s) => JSON.parse(s).op === 'subscribe') };
    for (const [name, { client, mark, ...run }] of Object.entries(window.runs)) {
      out[name] = { ...run, status: client.status, products: [...client.products.values()], offset: client.offset };
      client.close();
    }
    return out;
  }, mode);
  summary.page_log = pageLog.slice(0, 30);
  console.log(JSON.stringify(summary));
  code = 0;
} catch (err) {
  console.error(`recovery.mjs: ${err && err.message ? err.message.split('\n')[0] : err}`);
  for (const l of pageLog.slice(0, 30)) console.error(`  ${l}`);
  // What the page saw until then.
  const seen = await page?.evaluate(() => JSON.stringify(window.run?.log
    ?? Object.fromEntries(Object.entries(window.runs || {}).map(([k, v]) => [k, v.log])))).catch(() => null);
  if (seen) console.error(`recovery.mjs: the page saw ${seen}`);
} finally {
  await Promise.race([browser.close().catch(() => {}), new Promise((r) => setTimeout(r, 10_000).unref())]);
}
// stdin stays open on the test's side: leave without waiting for it.
process.exit(code);
