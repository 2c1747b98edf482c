// Load a web page in headless Chromium and report what a test needs to know about it.
//
//   node inspect_page.mjs SPEC.json
//
// SPEC.json: {"width": 1200, "height": 900, "pages": [PAGE, ...]}, one browser for every page; PAGE:
//            {"url": "http://127.0.0.1:PORT/report.html",
//             "waitFor": "JS expression awaited in the page (optional)",
//             "screenshot": "full-page PNG path (optional)",
//             "elements": {"selector": "canvas", "dir": "folder for one PNG per match"} (optional),
//             "rows": "tr[data-run]" (optional: report the data-run order of these rows),
//             "clicks": ["CSS selector", ...] (optional: click each, then report the rows again)}
// Prints one JSON line per page: waitError (if waitFor failed), problems (console errors and page errors), failed (requests that failed
// or answered >= 400), requests (every URL asked for), element PNG paths, row orders, and the
// src/href of every element with one (as the page resolved them).
// Chromium comes from @sparticuz/chromium, as in render_glb.mjs; WebGL runs on SwiftShader.

import fs from 'node:fs';
import path from 'node:path';
import chromium from '@sparticuz/chromium';
import puppeteer from 'puppeteer-core';

async function inspect(browser, job) {
  const page = await browser.newPage();
  const problems = [], failed = [], requests = [];
  page.on('pageerror', (error) => problems.push('pageerror: ' + String(error)));
  page.on('console', (message) => {
    if (message.type() === 'error') problems.push('console: ' + message.text());
  });
  page.on('requestfailed', (request) => failed.push(`${request.url()} (${request.failure()?.errorText})`));
  page.on('response', (response) => {
    requests.push(response.url());
    if (response.status() >= 400) failed.push(`${response.url()} (HTTP ${response.status()})`);
  });
  await page.goto(job.url, {waitUntil: 'networkidle0', timeout: job.timeout ?? 120000});
  const result = {problems, failed, requests};
  if (job.waitFor) {  // module scripts may still be evaluating after the network went idle: poll, then await
    try {
      await page.waitForFunction(job.waitFor, {timeout: job.timeout ?? 120000, polling: 100});
      await page.evaluate(`(async () => { await (${job.waitFor}); })()`);
    } catch (error) {
      result.waitError = String(error);  // reported with everything else, so the caller sees why
    }
  }
  const rows = async () => job.rows ? page.$$eval(job.rows, (els) => els.map((e) => e.dataset.run)) : null;
  result.references = await page.$$eval('[src], [href], [poster], [data-glb]', (els) => els.flatMap((e) =>
    ['src', 'href', 'poster', 'data-glb'].filter((name) => e.hasAttribute(name)).map((name) => ({
      tag: e.tagName.toLowerCase(), attribute: name, value: e.getAttribute(name),
      url: new URL(e.getAttribute(name), document.baseURI).href,
    }))));
  result.states = await page.$$eval('[data-state]', (els) => els.map((e) => e.dataset.state));
  result.rows = [await rows()];
  for (const selector of job.clicks ?? []) {
    await page.click(selector);
    result.rows.push(await rows());
  }
  if (job.elements) {
    fs.mkdirSync(job.elements.dir, {recursive: true});
    result.elements = [];
    for (const [index, handle] of (await page.$$(job.elements.selector)).entries()) {
      const file = path.join(job.elements.dir, `${index}.png`);
      await handle.screenshot({path: file});
      result.elements.push(file);
    }
  }
  if (job.screenshot) await page.screenshot({path: job.screenshot, fullPage: true});
  console.log(JSON.stringify(result));
  await page.close();
}

async function main() {
  const spec = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
  const browser = await puppeteer.launch({
    executablePath: await chromium.executablePath(),
    args: chromium.args,
    headless: 'shell',
    defaultViewport: {width: spec.width ?? 1200, height: spec.height ?? 900},
  });
  try {
    for (const job of spec.pages) await inspect(browser, job);
  } finally {
    await browser.close();
  }
}

main().catch((error) => {
  console.error(error && error.stack ? error.stack : String(error));
  process.exit(2);
});
