// The operator console (/admin) in Debian's Chromium: sign in with the admin
// token, start the generator from the page, wait for its rates to rise
// above zero, find the dead letter the test published, replay it.
//
//   node console.mjs <base_url> <admin_token> <screenshot_path>
//
// Prints one JSON line with what the console showed.
import { launch } from './chromium.mjs';

const [base, token, shot] = process.argv.slice(2);
if (!base || !token || !shot) {
  console.error('usage: node console.mjs <base_url> <admin_token> <screenshot_path>');
  process.exit(2);
}
const browser = await launch();
let code = 0;
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 1100 } });
  page.on('console', (m) => { if (m.type() === 'error') console.error('page:', m.text()); });
  page.on('dialog', (d) => d.accept());
  await page.goto(new URL('/admin/', base).href);
  await page.fill('#token', token);
  await page.click('#sign-in');
  await page.waitForFunction(() => document.querySelector('#status').textContent === 'signed in', null, { timeout: 10_000 });

  await page.fill('#gen-rate', '40');
  await page.click('#gen-start');
  await page.waitForFunction(() => document.querySelector('#gen-state').dataset.running === 'true', null, { timeout: 10_000 });
  const positive = (id) => `Number(document.querySelector('#${id}').textContent) > 0`;
  await page.waitForFunction(`${positive('t-published')} && ${positive('t-applied')} && ${positive('t-delivered')}`,
    null, { timeout: 20_000 });
  const shown = await page.evaluate(() => Object.fromEntries(
    ['published', 'applied', 'delivered', 'lag', 'p50', 'p99', 'clients', 'dead']
      .map((k) => [k, document.querySelector(`#t-${k}`).textContent])));

  // A few seconds of points on the charts before the screenshot.
  await page.waitForTimeout(5000);
  await page.click('#dl-refresh');
  await page.waitForSelector('#dl-rows tr td code', { timeout: 10_000 });
  const letters = await page.$$eval('#dl-rows tr', (rows) =>
    rows.map((r) => [...r.querySelectorAll('td')].map((td) => td.textContent)));
  await page.screenshot({ path: shot, fullPage: true });
  await page.click('#dl-replay');
  await page.waitForFunction(() => /replayed \d+/.test(document.querySelector('#dl-result').textContent), null, { timeout: 10_000 });
  const replay = await page.textContent('#dl-result');
  await page.click('#gen-stop');
  console.log(JSON.stringify({ shown, letters, replay }));
} catch (e) {
  console.error('console.mjs:', e.message);
  code = 1;
} finally {
  await browser.close();
}
process.exit(code);
