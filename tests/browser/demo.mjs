// The demo page (`/`) in headless Chromium: it loads with nothing beyond
// the gateway (every request the page makes is recorded and must go to the
// gateway's own origin), every pane connects on its transport (WebTransport,
// WebSocket, SSE, long polling, and the automatic one), `switchboard pub`
// publishes one message, and every pane must show it at the same position.
// A screenshot of the page is written to SCREENSHOT.
//
//   node tests/browser/demo.mjs HTTP_BASE SWITCHBOARD_BIN TEXT SCREENSHOT [PAGE_BASE]
//
// PAGE_BASE (default HTTP_BASE) is where the page is loaded from, e.g. the
// HTTPS listener (`https://127.0.0.1:PORT`, dev's self-signed certificate
// accepted); `switchboard pub` always publishes to HTTP_BASE.
//
// It starts no gateway (gateway/tests/browser_client.rs does). One JSON
// result line on stdout; exit 0 on success. Bounded by OVERALL_MS.

import { execFile } from 'node:child_process';

import { run } from './harness.mjs';

const OVERALL_MS = 60_000;
const STEP_MS = 20_000;
const PANES = ['webtransport', 'websocket', 'sse', 'poll', 'auto'];

const [httpBase, bin, text, screenshot, pageArg] = process.argv.slice(2);
const pageBase = pageArg || httpBase;
if (!httpBase || !bin || !text || !screenshot) {
  console.log(JSON.stringify({ ok: false, reason: 'usage: demo.mjs HTTP_BASE SWITCHBOARD_BIN TEXT SCREENSHOT' }));
  process.exit(2);
}

run(OVERALL_MS, STEP_MS, async ({ page, step, finish }) => {
  const foreign = [];
  page.on('request', (req) => {
    const url = req.url();
    if (!url.startsWith(`${pageBase}/`) && !url.startsWith('data:')) foreign.push(url);
  });
  const consoleErrors = [];
  page.on('pageerror', (e) => consoleErrors.push(String(e)));
  await page.setViewportSize({ width: 1280, height: 900 });
  await step('load the demo page', () => page.goto(`${pageBase}/`));
  await step('every pane connects', () =>
    page.waitForFunction((panes) => panes.every((p) => window.demo && window.demo.panes[p] && window.demo.panes[p].client.state === 'connected'), PANES),
  );
  const transports = await page.evaluate((panes) => Object.fromEntries(panes.map((p) => [p, window.demo.panes[p].client.transport])), PANES);
  await step('every pane is subscribed', () =>
    page.waitForFunction((panes) => panes.every((p) => [...window.demo.panes[p].client.subs.values()].every((s) => s.established)), PANES),
  );
  const published = await step('switchboard pub', () =>
    new Promise((resolve, reject) => {
      execFile(bin, ['pub', 'demo', text, '--url', httpBase], { timeout: STEP_MS }, (err, stdout, stderr) =>
        err ? reject(new Error(`switchboard pub: ${err.message} ${stderr}`)) : resolve(stdout.trim()),
      );
    }),
  );
  await step('every pane shows it', () =>
    page.waitForFunction(([panes, t]) => panes.every((p) => window.demo.panes[p].messages.some((m) => m.text === t)), [PANES, text]),
  );
  const positions = await page.evaluate(
    ([panes, t]) => Object.fromEntries(panes.map((p) => [p, window.demo.panes[p].messages.find((m) => m.text === t)])),
    [PANES, text],
  );
  const shown = await page.evaluate((t) => [...document.querySelectorAll('[data-pane] li')].filter((li) => li.textContent.endsWith(t)).length, text);
  await step('presence lists this page', () => page.waitForFunction(() => document.querySelectorAll('#members li').length > 0));
  const commands = await page.evaluate(() => [...document.querySelectorAll('#commands pre')].map((p) => p.textContent));
  await page.screenshot({ path: screenshot, fullPage: true });
  finish(0, { ok: true, page: pageBase, transports, positions, shown, published, commands, foreign, page_errors: consoleErrors });
}, { ignoreHTTPSErrors: pageBase.startsWith('https:') });
