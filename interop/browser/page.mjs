#!/usr/bin/env node
// Loads one page in Debian's headless Chromium, driven by playwright-core (pinned in
// package.json; no Playwright browser download), for weir's tests (weir_testkit::peers::browser).
//
//   node page.mjs <url> [--screenshot <png>] [--wait-for <css selector>] [--wait-js <expression>]
//                       [--eval <expression>] [--timeout-ms N] [--viewport 1280x900]
//
// Opens <url>, waits for the selector to be in the document and for the JS expression to be
// truthy (polled every 100 ms), evaluates --eval in the page (a promise is awaited), saves a
// full-page screenshot, and prints one line of JSON on stdout:
//   {"result": <--eval's value, null without it>, "console_errors": [...],
//    "external_requests": [...], "failed_requests": [...]}
// console_errors: console.error calls, errors Chromium logs (a resource that failed to load),
//   uncaught exceptions.
// external_requests: "<METHOD> <url>" of every request to an origin other than <url>'s; they are
//   blocked (never sent: a test must not depend on the network) and listed only here.
// failed_requests: "<METHOD> <url>: <reason or HTTP status>" of own-origin requests that failed
//   or were answered with a status >= 400.
// --timeout-ms (default 30000) bounds the whole load. Exit status: 0 done, 1 error (bad usage,
// navigation or --eval failed), 2 timed out (the message has an excerpt of the page's text;
// the screenshot is still saved), 3 something to install is missing (the message says what).
// The browser is $WEIR_CHROMIUM, else /usr/bin/chromium.

import { existsSync } from 'node:fs';

const USAGE =
  'usage: node page.mjs <url> [--screenshot <png>] [--wait-for <css selector>] ' +
  '[--wait-js <expression>] [--eval <expression>] [--timeout-ms N] [--viewport WxH]';

function fail(code, message) {
  process.stderr.write(`page.mjs: ${message}\n`);
  process.exit(code);
}

function parseArgs(argv) {
  const opts = { timeoutMs: 30000, viewport: { width: 1280, height: 900 } };
  const takesValue = new Set([
    '--screenshot', '--wait-for', '--wait-js', '--eval', '--timeout-ms', '--viewport',
  ]);
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '-h' || a === '--help') {
      process.stdout.write(USAGE + '\n');
      process.exit(0);
    }
    if (takesValue.has(a)) {
      if (i + 1 >= argv.length) fail(1, `${a} needs a value\n${USAGE}`);
      const v = argv[++i];
      switch (a) {
        case '--screenshot': opts.screenshot = v; break;
        case '--wait-for': opts.waitFor = v; break;
        case '--wait-js': opts.waitJs = v; break;
        case '--eval': opts.eval = v; break;
        case '--timeout-ms':
          if (!/^[0-9]+$/.test(v) || Number(v) <= 0) fail(1, `--timeout-ms ${v}: not a positive integer`);
          opts.timeoutMs = Number(v);
          break;
        case '--viewport': {
          const m = /^([0-9]+)x([0-9]+)$/.exec(v);
          if (!m) fail(1, `--viewport ${v}: expected WIDTHxHEIGHT, e.g. 1280x900`);
          opts.viewport = { width: Number(m[1]), height: Number(m[2]) };
          break;
        }
      }
    } else if (a.startsWith('--')) {
      fail(1, `unknown option ${a}\n${USAGE}`);
    } else if (opts.url === undefined) {
      opts.url = a;
    } else {
      fail(1, `one URL only (got ${opts.url} and ${a})\n${USAGE}`);
    }
  }
  if (opts.url === undefined) fail(1, `no URL given\n${USAGE}`);
  try {
    opts.origin = new URL(opts.url).origin;
  } catch {
    fail(1, `${opts.url}: not a URL`);
  }
  return opts;
}

const opts = parseArgs(process.argv.slice(2));
const executablePath = process.env.WEIR_CHROMIUM || '/usr/bin/chromium';
if (!existsSync(executablePath)) {
  fail(3, `no Chromium at ${executablePath}: install Debian's chromium: apt-get install chromium ` +
    '(or set WEIR_CHROMIUM to a Chromium binary)');
}
let chromium;
try {
  ({ chromium } = await import('playwright-core'));
} catch (e) {
  fail(3, `cannot load playwright-core (${e.message.split('\n')[0]}): run interop/browser/install ` +
    '(npm ci in interop/browser, Node.js >= 20)');
}

const deadline = Date.now() + opts.timeoutMs;
const left = () => Math.max(1, deadline - Date.now());
const report = { result: null, console_errors: [], external_requests: [], failed_requests: [] };
const blocked = new Set();
const blockedUrls = new Set();
// Requests that never go over the network, whatever their origin.
const local = (u) => /^(data|blob|about|chrome|chrome-error|devtools):/.test(u);

let browser;
let page;
let step = 'launching Chromium';
try {
  const root = typeof process.getuid === 'function' && process.getuid() === 0;
  browser = await chromium.launch({
    executablePath,
    headless: true,
    timeout: left(),
    // Root cannot use Chromium's sandbox; /dev/shm is small in containers.
    args: [...(root ? ['--no-sandbox'] : []), '--disable-dev-shm-usage'],
  });
  const context = await browser.newContext({ viewport: opts.viewport });
  await context.route('**/*', (route) => {
    const req = route.request();
    const url = req.url();
    if (!local(url) && new URL(url).origin !== opts.origin) {
      blocked.add(req);
      blockedUrls.add(url);
      report.external_requests.push(`${req.method()} ${url}`);
      return route.abort('blockedbyclient');
    }
    return route.continue();
  });
  page = await context.newPage();
  page.on('console', (msg) => {
    if (msg.type() === 'error') {
      const loc = msg.location();
      // Chromium's "Failed to load resource: net::ERR_BLOCKED_BY_CLIENT" for a request blocked
      // above: it is in external_requests already.
      if (loc && blockedUrls.has(loc.url) && msg.text().includes('ERR_BLOCKED_BY_CLIENT')) return;
      const at = loc && loc.url ? ` (${loc.url}:${loc.lineNumber})` : '';
      report.console_errors.push(`${msg.text()}${at}`);
    }
  });
  page.on('pageerror', (err) => report.console_errors.push(`uncaught: ${err.message}`));
  page.on('requestfailed', (req) => {
    if (blocked.has(req)) return;
    const why = req.failure() ? req.failure().errorText : 'failed';
    report.failed_requests.push(`${req.method()} ${req.url()}: ${why}`);
  });
  page.on('response', (resp) => {
    if (resp.status() >= 400) {
      const req = resp.request();
      report.failed_requests.push(`${req.method()} ${resp.url()}: HTTP ${resp.status()}`);
    }
  });

  step = `loading ${opts.url}`;
  await page.goto(opts.url, { waitUntil: 'load', timeout: left() });
  if (opts.waitFor !== undefined) {
    step = `waiting for the selector ${JSON.stringify(opts.waitFor)}`;
    await page.waitForSelector(opts.waitFor, { state: 'attached', timeout: left() });
  }
  if (opts.waitJs !== undefined) {
    step = `waiting for ${JSON.stringify(opts.waitJs)} to be truthy`;
    await page.waitForFunction(opts.waitJs, undefined, { polling: 100, timeout: left() });
  }
  if (opts.eval !== undefined) {
    step = `evaluating ${JSON.stringify(opts.eval)}`;
    const value = await withDeadline(page.evaluate(opts.eval));
    report.result = value === undefined ? null : value;
  }
  if (opts.screenshot !== undefined) {
    step = `saving the screenshot ${opts.screenshot}`;
    await page.screenshot({ path: opts.screenshot, fullPage: true, timeout: left() });
  }
  process.stdout.write(JSON.stringify(report) + '\n');
  await browser.close();
  process.exit(0);
} catch (e) {
  const timedOut = e && (e.name === 'TimeoutError' || Date.now() >= deadline);
  let msg = `${timedOut ? `timed out after ${opts.timeoutMs} ms` : 'failed'} ${step}: ` +
    `${String(e && e.message).split('\n')[0]}`;
  if (page) {
    const text = await page
      .evaluate(() => (document.body ? document.body.innerText : document.documentElement.outerHTML))
      .catch((err) => `(the page's text could not be read: ${err.message.split('\n')[0]})`);
    const t = String(text).replace(/\s+/g, ' ').trim();
    msg += `\nthe page's text (${opts.url}): ${t.length > 1500 ? t.slice(0, 1500) + ' …' : t || '(empty)'}`;
    if (opts.screenshot !== undefined) {
      const saved = await page
        .screenshot({ path: opts.screenshot, fullPage: true, timeout: 5000 })
        .then(() => true, () => false);
      if (saved) msg += `\nits screenshot: ${opts.screenshot}`;
    }
  } else if (!timedOut && step === 'launching Chromium') {
    msg += `\n(${executablePath} did not start: is Debian's chromium package complete? ` +
      'apt-get install --reinstall chromium)\n' + String(e && e.message);
  }
  msg += `\nso far: ${JSON.stringify(report)}`;
  if (browser) await browser.close().catch(() => {});
  fail(timedOut ? 2 : 1, msg);
}

// page.evaluate has no timeout of its own: a promise that never settles would hang.
function withDeadline(promise) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => {
      const e = new Error('the expression did not settle');
      e.name = 'TimeoutError';
      reject(e);
    }, left());
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}
