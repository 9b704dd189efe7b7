// What every browser script here shares: headless Chromium (the Debian
// binary, no download; every name but 127.0.0.1 and localhost unresolvable,
// so nothing leaves the machine), one page whose every wait is bounded by
// `stepMs`, steps named for the failure report, the whole run bounded by
// `overallMs`, one JSON result line on stdout (exit 0 on success, 1 on
// failure) and the browser always closed.
//
//   run(OVERALL_MS, STEP_MS, async ({ browser, page, step, finish }) => { ... }, contextOptions);
//
// `contextOptions` go to playwright's `browser.newContext` (e.g.
// `{ ignoreHTTPSErrors: true }` for a page served with dev's self-signed
// certificate).

import { chromium } from 'playwright-core';

export function run(overallMs, stepMs, main, contextOptions = {}) {
  let browser;
  let finished = false;
  let currentStep = 'start';

  async function finish(code, result) {
    if (finished) return;
    finished = true;
    console.log(JSON.stringify(result));
    try {
      if (browser) await browser.close();
    } catch {
      // The browser is already gone; nothing left to close.
    }
    process.exit(code);
  }

  const overall = setTimeout(
    () => finish(1, { ok: false, reason: `timed out after ${overallMs} ms`, step: currentStep }),
    overallMs,
  );
  overall.unref();

  async function step(name, fn) {
    currentStep = name;
    return fn();
  }

  (async () => {
    browser = await chromium.launch({
      executablePath: '/usr/bin/chromium',
      headless: true,
      args: [
        '--no-sandbox',
        '--disable-gpu',
        '--no-first-run',
        '--disable-background-networking',
        '--disable-component-update',
        '--disable-sync',
        '--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost',
      ],
    });
    const context = await browser.newContext(contextOptions);
    const page = await context.newPage();
    page.setDefaultTimeout(stepMs);
    return main({ browser, page, step, finish });
  })().catch((e) => finish(1, { ok: false, reason: String(e && e.message ? e.message : e), step: currentStep }));
}
