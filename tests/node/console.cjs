// Drives the web console in headless Chromium (puppeteer-core, Debian's chromium) for
// tests/tests/console.rs, and prints what it saw as JSON lines.
//
// Environment: CONSOLE_URL (the console's base URL), CONSOLE_MODE (`live` or `denied`),
// CONSOLE_RELEASE (the release's id), CONSOLE_TOKEN (optional: sent as the person's
// bearer token), SCREENSHOTS (directory for the PNGs), CHROMIUM (default /usr/bin/chromium).
//
// live:   opens the inventory and waits for the live stream; prints {"phase":"loaded"};
//         waits for a line on stdin (the test has reported a placement of checkout 1.0.0 in
//         prod); prints {"phase":"placed"} as soon as the matrix shows that version; rolls
//         back that deployment, still in flight, from the inventory ({"phase":"rolled-back"});
//         then
//         screenshots the visibility and release views, clicks the kill switch (accepting
//         the confirmation), waits for the release to show `paused` and prints
//         {"phase":"killed"}; after a line on stdin clicks Resume and prints
//         {"phase":"resumed"} once the release shows `released`; then waits for the audit feed to list the PauseRelease and for
//         the calendar to show stage's freeze window.
// denied: opens the release page, clicks the kill switch (confirmation accepted) and
//         prints {"phase":"denied","text":...} with the error the page shows.
// Both end with {"phase":"done","errors":[...]}: the console errors seen (denied: before
// the click, since the refusal itself is logged by the browser as a failed request).
'use strict';

const puppeteer = require('puppeteer-core');
const readline = require('readline');

const base = process.env.CONSOLE_URL;
const mode = process.env.CONSOLE_MODE || 'live';
const release = process.env.CONSOLE_RELEASE;
const shots = process.env.SCREENSHOTS;
const out = (o) => process.stdout.write(JSON.stringify(o) + '\n');
const stdinLines = readline.createInterface({ input: process.stdin })[Symbol.asyncIterator]();

async function shot(page, name) {
  await page.screenshot({ path: `${shots}/${name}.png`, fullPage: true });
}

async function live(page) {
  await page.goto(`${base}/`, { waitUntil: 'load' });
  await page.waitForSelector('#live.on', { timeout: 10000 });
  out({ phase: 'loaded' });
  await stdinLines.next();
  await page.waitForFunction(
    () => [...document.querySelectorAll('td[data-artifact="checkout"][data-environment="prod"] .version .label')]
      .some((e) => e.textContent.trim() === '1.0.0'),
    { timeout: 5000, polling: 'mutation' },
  );
  out({ phase: 'placed' });
  await shot(page, 'inventory');
  // Roll back the deployment still in flight (one of its two targets placed).
  page.once('dialog', (d) => d.accept());
  await page.click('button[hx-post$="/rollback"]');
  await page.waitForSelector('#flash .done', { timeout: 5000 });
  out({ phase: 'rolled-back' });
  await page.goto(`${base}/visibility`, { waitUntil: 'load' });
  await page.waitForSelector('td.cell[data-feature="new-cart"][data-environment="prod"].static');
  // Released to everyone in its only environment: listed as a stale flag.
  await page.waitForSelector('ul.stale li[data-feature="new-cart"]');
  await shot(page, 'visibility');
  // At 100% in prod (for 0 days or more): listed by ListStaleFeatures.
  await page.goto(`${base}/stale?days=0`, { waitUntil: 'load' });
  await page.waitForSelector('table.stale tr[data-feature="new-cart"] .chip.static', { timeout: 5000 });
  await shot(page, 'stale');
  await page.goto(`${base}/releases/${release}`, { waitUntil: 'load' });
  await page.waitForSelector('#live.on', { timeout: 10000 });
  await shot(page, 'release');
  page.once('dialog', (d) => d.accept());
  await page.click('#pause');
  await page.waitForSelector('#flash .done', { timeout: 5000 });
  await page.waitForSelector('.state.paused', { timeout: 5000 });
  await shot(page, 'release-paused');
  out({ phase: 'killed' });
  // The test has seen Evaluate hide the feature: resume, confirmed in the page.
  await stdinLines.next();
  page.once('dialog', (d) => d.accept());
  await page.click('#resume');
  await page.waitForSelector('.state.released', { timeout: 5000 });
  out({ phase: 'resumed' });
  await page.goto(`${base}/audit`, { waitUntil: 'load' });
  await page.waitForFunction(
    () => [...document.querySelectorAll('table.audit strong')].some((e) => e.textContent.includes('PauseRelease')),
    { timeout: 5000 },
  );
  await shot(page, 'audit');
  // Seven pages so far: each one's live stream was closed when it was left (a browser
  // keeps six connections per host).
  await page.goto(`${base}/`, { waitUntil: 'load' });
  await page.waitForSelector('#live.on', { timeout: 10000 });
  await page.goto(`${base}/calendar`, { waitUntil: 'load' });
  await page.waitForSelector('td.day.frozen[title="launch"]', { timeout: 5000 });
  await shot(page, 'calendar');
}

async function denied(page, errors) {
  await page.goto(`${base}/releases/${release}`, { waitUntil: 'load' });
  await page.waitForSelector('#live.on', { timeout: 10000 });
  const before = errors.length;
  page.once('dialog', (d) => d.accept());
  await page.click('#pause');
  await page.waitForSelector('#flash .failure', { timeout: 5000 });
  const text = await page.$eval('#flash .failure', (e) => e.textContent.replace(/\s+/g, ' ').trim());
  await shot(page, 'denied');
  errors.splice(before);
  out({ phase: 'denied', text });
}

(async () => {
  const browser = await puppeteer.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'],
  });
  const errors = [];
  let page;
  try {
    page = await browser.newPage();
    await page.setViewport({ width: 1000, height: 360 });
    page.on('console', (m) => { if (m.type() === 'error') errors.push(m.text()); });
    page.on('pageerror', (e) => errors.push(String(e)));
    if (process.env.CONSOLE_TOKEN) {
      await page.setExtraHTTPHeaders({ Authorization: `Bearer ${process.env.CONSOLE_TOKEN}` });
    }
    if (mode === 'denied') {
      await denied(page, errors);
    } else {
      await live(page);
    }
    out({ phase: 'done', errors });
  } catch (e) {
    const shown = page ? await page.$eval('body', (b) => b.innerText).catch(() => '') : '';
    out({ phase: 'failed', error: String(e), errors, shown });
    process.exitCode = 1;
  } finally {
    await browser.close();
    process.exit();
  }
})();
