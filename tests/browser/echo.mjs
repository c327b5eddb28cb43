#!/usr/bin/env node
// Headless check of the echo page served by product-gateway.
//
//   node tests/browser/echo.mjs <base_url> <screenshot_path>
//
// Opens <base_url> in Debian's Chromium (CHROMIUM overrides the path), waits
// at most 30 s until both the WebSocket and the SSE column are `open` and have
// received at least MIN_UPDATES updates each, checks the page logged `[ws]` and
// `[sse]` lines to the console, saves a full-page screenshot and prints a
// one-line JSON summary. Exit 0 on success, 1 on any failure. The browser is
// always closed and a hard timer makes sure the process ends by itself.

import { chromium } from 'playwright-core';
import { CHROMIUM_ARGS, EXECUTABLE } from './chromium.mjs';
import { mkdtemp, rm, mkdir } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';

const TOTAL_MS = 30_000;
const MIN_UPDATES = 3;
const HARD_KILL_MS = TOTAL_MS + 30_000; // launch + screenshot + close on top of the wait

const [baseUrl, screenshotArg] = process.argv.slice(2);
if (!baseUrl || !screenshotArg) {
  console.error('usage: node tests/browser/echo.mjs <base_url> <screenshot_path>');
  process.exit(2);
}
const screenshotPath = resolve(screenshotArg);

const consoleWs = [];
const consoleSse = [];
const otherLogs = [];   // errors, warnings, page errors, failed requests
let lastSeen = null;    // last snapshot of the page state while waiting
let photoRevalidation = null;   // status of the photo asked again with If-None-Match

// Whatever happens (a hung browser, a stuck close), stop by ourselves.
const hardKill = setTimeout(() => {
  console.error(`echo: hard timeout after ${HARD_KILL_MS} ms`);
  report(false, 'hard timeout');
  process.exit(1);
}, HARD_KILL_MS);
hardKill.unref();

function report(ok, reason) {
  const summary = {
    ws: lastSeen?.wsCount ?? 0,
    sse: lastSeen?.sseCount ?? 0,
    console_ws: consoleWs.length,
    console_sse: consoleSse.length,
    photo_revalidation: photoRevalidation,
  };
  if (ok) {
    console.log(JSON.stringify(summary));
    return;
  }
  console.log(JSON.stringify({ ...summary, ok: false, reason }));
  console.error(`echo: FAILED: ${reason}`);
  console.error(`echo: last page state: ${JSON.stringify(lastSeen)}`);
  console.error(`echo: first [ws] lines: ${JSON.stringify(consoleWs.slice(0, 3))}`);
  console.error(`echo: first [sse] lines: ${JSON.stringify(consoleSse.slice(0, 3))}`);
  if (otherLogs.length) {
    console.error('echo: other console / page messages:');
    for (const l of otherLogs.slice(0, 30)) console.error(`  ${l}`);
  }
}

async function readState(page) {
  return page.evaluate(() => {
    const text = (id) => {
      const el = document.getElementById(id);
      return el ? el.textContent.trim() : null;
    };
    const int = (id) => {
      const t = text(id);
      return t !== null && /^\d+$/.test(t) ? Number(t) : null;
    };
    return {
      wsState: text('ws-state'),
      sseState: text('sse-state'),
      wsCount: int('ws-count'),
      sseCount: int('sse-count'),
      rows: document.querySelectorAll('.update[data-offset]').length,
      wsInfo: text('ws-info'),
      sseInfo: text('sse-info'),
    };
  });
}

function done(s) {
  return s.wsState === 'open' && s.sseState === 'open'
    && s.wsCount >= MIN_UPDATES && s.sseCount >= MIN_UPDATES;
}

let context = null;
let page = null;
let userDataDir = null;
let ok = false;
let reason = '';

try {
  const deadline = Date.now() + TOTAL_MS;
  userDataDir = await mkdtemp(join(tmpdir(), 'echo-chromium-'));
  context = await chromium.launchPersistentContext(userDataDir, {
    // A profile of its own in a temporary folder; the browser and flags
    // are chromium.mjs's.
    executablePath: EXECUTABLE,
    headless: true,
    args: CHROMIUM_ARGS,
    viewport: { width: 1400, height: 1000 },
    timeout: TOTAL_MS,
  });
  page = context.pages()[0] ?? await context.newPage();

  page.on('console', (msg) => {
    const t = msg.text();
    if (t.startsWith('[ws]')) consoleWs.push(t);
    else if (t.startsWith('[sse]')) consoleSse.push(t);
    else if (msg.type() === 'error' || msg.type() === 'warning') otherLogs.push(`console.${msg.type()}: ${t}`);
  });
  page.on('pageerror', (err) => otherLogs.push(`pageerror: ${err.message}`));
  page.on('requestfailed', (req) => otherLogs.push(`requestfailed: ${req.url()} ${req.failure()?.errorText ?? ''}`));

  await page.goto(baseUrl, { waitUntil: 'domcontentloaded', timeout: Math.max(1000, deadline - Date.now()) });

  for (;;) {
    lastSeen = await readState(page);
    if (done(lastSeen)) break;
    if (Date.now() >= deadline) throw new Error(`timed out after ${TOTAL_MS} ms waiting for both columns open with >= ${MIN_UPDATES} updates`);
    await page.waitForTimeout(Math.min(250, Math.max(0, deadline - Date.now())));
  }

  // Console events are delivered asynchronously; give the last ones a moment.
  if (!consoleWs.length || !consoleSse.length) await page.waitForTimeout(1500);
  // Photos: shown in the state table, and revalidated by ETag (304) when
  // the browser asks again.
  await page.waitForFunction(() => [...document.querySelectorAll('#state-body img')].some((i) => i.complete && i.naturalWidth > 0),
    null, { timeout: Math.max(1000, deadline - Date.now()) });
  const firstPhoto = await page.evaluate(() => new URL([...document.querySelectorAll('#state-body img')]
    .find((i) => i.complete && i.naturalWidth > 0).src).pathname);
  // The status on the wire, as DevTools sees it (the page itself is handed
  // the cached copy, as 200).
  const cdp = await page.context().newCDPSession(page);
  await cdp.send('Network.enable');
  const onWire = new Promise((resolve) => {
    // Chromium may send a request's ExtraInfo before its requestWillBeSent,
    // so both sides are kept and matched whichever comes first.
    const ids = new Set();
    const statuses = new Map();
    const settle = (id) => { if (ids.has(id) && statuses.has(id)) resolve(statuses.get(id)); };
    cdp.on('Network.requestWillBeSent', (e) => {
      if (e.request.url.endsWith(firstPhoto)) { ids.add(e.requestId); settle(e.requestId); }
    });
    // The raw answer, before the cache turns a 304 into its stored 200.
    cdp.on('Network.responseReceivedExtraInfo', (e) => { statuses.set(e.requestId, e.statusCode); settle(e.requestId); });
  });
  await page.evaluate((path) => fetch(path, { cache: 'no-cache' }), firstPhoto);
  photoRevalidation = await Promise.race([onWire, new Promise((r) => setTimeout(() => r('no response'), 10_000))]);
  if (photoRevalidation !== 304) throw new Error(`photo revalidation answered ${photoRevalidation}, not 304`);
  if (!consoleWs.length) throw new Error('no console line starting with [ws]');
  if (!consoleSse.length) throw new Error('no console line starting with [sse]');

  lastSeen = await readState(page);
  await mkdir(dirname(screenshotPath), { recursive: true });
  await page.screenshot({ path: screenshotPath, fullPage: true, timeout: 15_000 });
  ok = true;
} catch (err) {
  reason = err && err.message ? err.message.split('\n')[0] : String(err);
  if (page) {
    // Best effort: a picture of what the page showed helps with the failure.
    try {
      lastSeen = await readState(page);
      await mkdir(dirname(screenshotPath), { recursive: true });
      await page.screenshot({ path: screenshotPath, fullPage: true, timeout: 5_000 });
      console.error(`echo: screenshot of the failing page saved to ${screenshotPath}`);
    } catch { /* the page may be gone */ }
  }
} finally {
  if (context) {
    await Promise.race([
      context.close().catch(() => {}),
      new Promise((r) => setTimeout(r, 10_000).unref()),
    ]);
  }
  if (userDataDir) await rm(userDataDir, { recursive: true, force: true }).catch(() => {});
}

report(ok, reason);
clearTimeout(hardKill);
process.exit(ok ? 0 : 1);
