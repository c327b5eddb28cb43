// The browser client module (static/gateway-client.js) in Debian's Chromium:
// one client per transport subscribes to every price and stock topic, the
// test cuts the network under them and restores it, then asks for their
// state.
//
//   node client.mjs <base_url> <screenshot_path>
//
// Prints `READY` once both clients hold a snapshot and updates; then reads
// commands on stdin, one per line:
//   WAIT <offset>   answers `CAUGHT UP` once both clients are at <offset>
//   RESET <offset>  gives the WebSocket client a reset at <offset>, as the
//                   service sends one, through the client's frame handler
//   DUMP            prints one JSON line: each client's products, the
//                   offsets it received, its statuses and errors; then exits
import { launch } from './chromium.mjs';
import readline from 'node:readline';

const [base, shot] = process.argv.slice(2);
if (!base || !shot) {
  console.error('usage: node client.mjs <base_url> <screenshot_path>');
  process.exit(2);
}

const browser = await launch();
const deadline = setTimeout(() => { console.error('client.mjs: no command in time'); process.exit(3); }, 120_000);
try {
  const page = await browser.newPage();
  page.on('console', (m) => { if (m.type() === 'error') console.error('page:', m.text()); });
  await page.goto(new URL('/healthz', base).href);
  await page.evaluate(async () => {
    const { GatewayClient } = await import('/gateway-client.js');
    const topics = ['product.price.*', 'product.stock.*'];
    window.runs = {};
    for (const transport of ['ws', 'sse']) {
      const run = { offsets: [], statuses: [], errors: [], states: 0, snapshots: 0 };
      const client = new GatewayClient({ topics, transport, minDelayMs: 200, maxDelayMs: 2000 });
      client.addEventListener('update', (e) => run.offsets.push(e.detail.offset));
      client.addEventListener('state', () => { run.states += 1; });
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
  for await (const line of lines) {
    const [command, arg] = line.trim().split(' ');
    if (command === 'WAIT') {
      // Until both clients hold every update up to <id>.
      await page.waitForFunction((id) => Object.values(window.runs).every((r) => r.client.offset >= id),
        Number(arg), { timeout: 30_000 });
      console.log('CAUGHT UP');
    } else if (command === 'RESET') {
      // The frame the service sends when a catch-up cannot complete.
      // Delivered through the socket's own message handler, as a frame from
      // the service arrives; the snapshot that follows is the service's.
      await page.evaluate((offset) => {
        for (const run of Object.values(window.runs)) run.beforeReset = run.offsets.length;
        const ws = window.runs.ws.client._conn;
        const frame = { type: 'reset', offset, reason: 'catch_up_failed', message: 'resumed with a gap' };
        ws.onmessage({ data: JSON.stringify(frame) });
      }, Number(arg));
      await page.waitForFunction(() => !window.runs.ws.client._needSnapshot, null, { timeout: 20_000 });
      console.log('RESET DONE');
    } else if (command === 'DUMP') {
      await page.setContent(`<pre id="out"></pre>`);
      const dump = await page.evaluate(() => {
        const out = {};
        for (const [name, run] of Object.entries(window.runs)) {
          out[name] = {
            products: [...run.client.products.values()],
            offsets: run.offsets,
            statuses: run.statuses,
            errors: run.errors,
            offset: run.client.offset,
            before_reset: run.beforeReset ?? run.offsets.length,
          };
          run.client.close();
        }
        document.getElementById('out').textContent = JSON.stringify(
          Object.fromEntries(Object.entries(out).map(([k, v]) => [k, { products: v.products.length, updates: v.offsets.length, statuses: v.statuses }])),
          null, 2);
        return out;
      });
      await page.screenshot({ path: shot, fullPage: true });
      console.log(JSON.stringify(dump));
      break;
    }
  }
} finally {
  clearTimeout(deadline);
  await browser.close();
}
// stdin stays open on the test's side: leave without waiting for it.
process.exit(0);
