// The client module (static/gateway-client.js) cut off as a slow consumer,
// in Debian's Chromium: one client per transport follows every price and
// stock topic; on the test's word each is told what the service tells a
// client it cuts off (WebSocket: close code 4002; SSE: an `error` event
// `slow_consumer` with its retry_ms), through the connection's own
// handlers, and must resume from its last offset with no snapshot.
//
//   node cutoff.mjs <base_url>
//
// Prints `READY` once both clients hold a snapshot and updates; then reads
// commands on stdin, one per line:
//   CUT    cuts both off; answers `RESUMED` once both are open again and
//          have applied updates after the cut
//   DUMP   prints one JSON line (each client's products, offsets received,
//          statuses, errors, offset at the cut, and what it asked the
//          service for after the cut), then exits
// A hard timer ends the process in any case.
import { launch } from './chromium.mjs';
import readline from 'node:readline';

const [base] = process.argv.slice(2);
if (!base) {
  console.error('usage: node cutoff.mjs <base_url>');
  process.exit(2);
}
const hardKill = setTimeout(() => { console.error('cutoff.mjs: hard timeout'); process.exit(3); }, 150_000);
hardKill.unref();

const browser = await launch();
let code = 1;
try {
  const page = await browser.newPage();
  page.on('console', (m) => { if (m.type() === 'error') console.error('page:', m.text()); });
  // Every /events request the page makes, for what the SSE client asked.
  const requests = [];
  page.on('request', (r) => { if (new URL(r.url()).pathname === '/events') requests.push(r.url()); });
  await page.goto(new URL('/healthz', base).href);
  await page.evaluate(async () => {
    const { GatewayClient } = await import('/gateway-client.js');
    window.sent = [];
    const send = WebSocket.prototype.send;
    WebSocket.prototype.send = function (data) { window.sent.push(data); return send.call(this, data); };
    window.runs = {};
    for (const transport of ['ws', 'sse']) {
      const run = { offsets: [], statuses: [], errors: [], cutAt: null, afterCut: 0 };
      const client = new GatewayClient({ topics: ['product.price.*', 'product.stock.*'], transport, minDelayMs: 200, maxDelayMs: 2000 });
      client.addEventListener('update', (e) => {
        run.offsets.push(e.detail.offset);
        if (run.cutAt !== null) run.afterCut += 1;
      });
      client.addEventListener('status', (e) => run.statuses.push(e.detail.status));
      client.addEventListener('error', (e) => run.errors.push(e.detail.code));
      run.client = client;
      window.runs[transport] = run;
    }
  });
  await page.waitForFunction(
    () => Object.values(window.runs).every((r) => r.client.products.size > 0 && r.offsets.length >= 5),
    null, { timeout: 30_000 });
  console.log('READY');

  const lines = readline.createInterface({ input: process.stdin });
  let requestsAtCut = 0;
  for await (const line of lines) {
    const command = line.trim();
    if (command === 'CUT') {
      requestsAtCut = requests.length;
      await page.evaluate(() => {
        window.sentAtCut = window.sent.length;
        for (const run of Object.values(window.runs)) {
          run.cutAt = run.client.offset;
          run.statusesAtCut = run.statuses.length;
        }
        // WebSocket: the close the service sends a slow consumer.
        window.runs.ws.client._conn.onclose({ code: 4002, reason: 'slow consumer', wasClean: true });
        // SSE: the last event of a stream the service cuts off.
        const data = { type: 'error', code: 'slow_consumer', message: 'this client fell too far behind; reconnect to resume', retry_ms: 300 };
        window.runs.sse.client._conn.dispatchEvent(new MessageEvent('error', { data: JSON.stringify(data) }));
      });
      await page.waitForFunction(
        () => Object.values(window.runs).every((r) => r.client.status === 'open' && r.afterCut >= 3),
        null, { timeout: 30_000 });
      console.log('RESUMED');
    } else if (command === 'DUMP') {
      const dump = await page.evaluate(() => {
        const out = { subscribes_after_cut: window.sent.slice(window.sentAtCut ?? 0).map((s) => JSON.parse(s)) };
        for (const [name, run] of Object.entries(window.runs)) {
          out[name] = {
            products: [...run.client.products.values()],
            offsets: run.offsets,
            statuses: run.statuses,
            statuses_after_cut: run.statuses.slice(run.statusesAtCut ?? 0),
            errors: run.errors,
            cut_at: run.cutAt,
            offset: run.client.offset,
          };
          run.client.close();
        }
        return out;
      });
      dump.events_requests_after_cut = requests.slice(requestsAtCut);
      console.log(JSON.stringify(dump));
      code = 0;
      break;
    }
  }
} catch (err) {
  console.error(`cutoff.mjs: ${err && err.message ? err.message.split('\n')[0] : err}`);
} finally {
  await Promise.race([browser.close().catch(() => {}), new Promise((r) => setTimeout(r, 10_000).unref())]);
}
// stdin stays open on the test's side: leave without waiting for it.
process.exit(code);
