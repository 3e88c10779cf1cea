// The console in a real browser: Debian's headless Chromium driven by playwright-core.
// Run by tests/it/console.rs against a daemon it filled with messages; it passes:
//   CONSOLE_URL    the daemon, e.g. http://127.0.0.1:41234
//   CONSOLE_FACTS  JSON: what the daemon was given (message ids, the special payload, ...)
//   SCREENSHOTS    where each step saves a PNG
//   CHROMIUM       the browser (default /usr/bin/chromium)
//   PROFILE_DIR    a fresh, empty --user-data-dir
// Prints one line per step and ends with "N passed, N failed"; exits 1 when a step failed.
import assert from 'node:assert/strict';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

const base = process.env.CONSOLE_URL;
const facts = JSON.parse(process.env.CONSOLE_FACTS || '{}');
const shots = process.env.SCREENSHOTS || tmpdir();
const profile = process.env.PROFILE_DIR || mkdtempSync(path.join(tmpdir(), 'iotfwd-console-'));
assert.ok(base, 'CONSOLE_URL is not set');

const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: [
    '--headless',
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
  ],
  viewport: { width: 1360, height: 900 },
  timezoneId: 'UTC',
  locale: 'en-US',
  colorScheme: 'light',
});
context.setDefaultTimeout(15000);
const page = context.pages()[0] || (await context.newPage());
const pageErrors = [];
page.on('pageerror', (e) => pageErrors.push(e.message));
page.on('response', (r) => {
  if (r.status() >= 400 && !r.url().includes('/api/v1/')) console.log(`  (${r.status()} ${r.url()} ${JSON.stringify(r.headers())})`);
});
page.on('console', (m) => {
  if (m.type() === 'error' && !/status of 40[14]/.test(m.text())) pageErrors.push(m.text());
});

let passed = 0;
let failed = 0;

async function step(name, fn) {
  const started = Date.now();
  try {
    await fn();
    passed += 1;
    console.log(`ok   ${name} (${Date.now() - started} ms)`);
  } catch (e) {
    failed += 1;
    console.log(`FAIL ${name}: ${e.stack || e}`);
    await page.screenshot({ path: path.join(shots, `failed-${name.replace(/\W+/g, '-')}.png`), fullPage: true }).catch(() => {});
  }
}

async function shot(name) {
  await page.screenshot({ path: path.join(shots, `console-${name}.png`), fullPage: true });
}

// GET an API path from the test (not the page): what the page must show.
async function apiJson(p) {
  const res = await fetch(`${base}${p}`);
  return res.json();
}

// Waits for the results of the current search, then returns the rows as objects.
async function results() {
  await page.waitForFunction(() => {
    const s = document.querySelector('.results .summary');
    return s && s.textContent !== 'Searching…';
  });
  return page.$$eval('table.logs tbody tr', (trs) => trs.map((tr) => {
    const td = [...tr.querySelectorAll('td')];
    return {
      time: td[0].querySelector('time').getAttribute('datetime'),
      traceId: td[1].textContent,
      messageId: td[2].textContent,
      device: td[3].firstChild ? td[3].firstChild.textContent : '',
      product: td[3].querySelector('.sub')?.textContent || '',
      bizCode: td[4].textContent,
      operation: td[5].textContent,
      content: td[6].textContent,
      code: Number(td[7].querySelector('.code').textContent),
      status: td[7].textContent,
    };
  }));
}

// The API's answer for the page's current URL: the page must show exactly these records.
async function apiForPage() {
  const url = new URL(page.url());
  return apiJson(`/api/v1/logs?${url.searchParams}`);
}

async function expectPageMatchesApi(rows) {
  const api = await apiForPage();
  assert.equal(rows.length, api.count, `the page shows ${rows.length} rows, the API ${api.count}`);
  assert.deepEqual(rows.map((r) => r.messageId), api.records.map((r) => r.messageId));
  return api;
}

// Every form control has an accessible name, and the page has one h1 and a main landmark.
async function checkLabels(where) {
  const unnamed = await page.$$eval('input, select, textarea, button', (els) => els
    .filter((e) => e.type !== 'hidden' && !e.closest('dialog:not([open])'))
    .filter((e) => {
      const labelled = (e.labels && [...e.labels].some((l) => l.textContent.trim()))
        || (e.getAttribute('aria-label') || '').trim()
        || (e.getAttribute('aria-labelledby') || '').split(/\s+/).some((id) => document.getElementById(id)?.textContent.trim())
        || (e.tagName === 'BUTTON' && e.textContent.trim());
      return !labelled;
    })
    .map((e) => e.outerHTML.slice(0, 120)));
  assert.deepEqual(unnamed, [], `${where}: controls without an accessible name`);
  assert.equal(await page.locator('h1').count(), 1, `${where}: one h1`);
  assert.equal(await page.getByRole('main').count(), 1, `${where}: a main landmark`);
}

async function search(fill) {
  await fill();
  await page.getByRole('button', { name: 'Search', exact: true }).click();
  return results();
}

async function openLogs(query = '') {
  await page.goto(`${base}/console/logs${query}`);
  return results();
}

// The daemon serves the console before the browser is asked to.
{
  const res = await fetch(`${base}/console/overview`);
  console.log(`  (node fetch /console/overview: ${res.status})`);
}

// ---------------------------------------------------------------------------------------------

await step('overview shows the chart with data, health and readiness', async () => {
  await page.goto(`${base}/console/overview`);
  await page.locator('figure.chart-box svg rect').first().waitFor();
  const hour = await apiJson('/api/v1/stats?since=1h&by=code');
  assert.ok(hour.total > 0);
  const bars = await page.locator('figure.chart-box[data-window="1h"] svg rect').count();
  assert.ok(bars > 0, 'bars in the hour chart');
  const drawn = await page.$$eval('figure.chart-box[data-window="1h"] svg rect', (rs) => [...new Set(rs.map((r) => r.dataset.key))].sort());
  assert.deepEqual(drawn, hour.groups.map((g) => g.key).sort(), 'one colour per code');
  const caption = await page.locator('figure.chart-box[data-window="1h"] figcaption').textContent();
  assert.ok(caption.includes(`${hour.total} records`), caption);
  const legend = await page.locator('table.legend tbody').textContent();
  for (const code of ['200', '9325', '9320', '9203', '1903']) assert.ok(legend.includes(code), `legend has ${code}`);
  assert.ok(legend.includes('The data forwarding service is unavailable'), 'meanings in the legend');
  await page.getByRole('heading', { name: 'Destinations' }).waitFor();
  assert.ok((await page.locator('table.destinations').textContent()).includes('amqp:alerts'));
  assert.ok((await page.locator('table.groups').textContent()).includes('ops'));
  assert.equal(await page.locator('.status-line .pill').first().textContent(), 'Ready');
  await page.getByRole('heading', { name: 'Throttling' }).waitFor();
  await checkLabels('overview');
  await shot('overview');
});

await step('keyboard: skip link, then a DeviceName search without the mouse', async () => {
  await page.goto(`${base}/console/logs`);
  await results();
  await page.keyboard.press('Tab');
  assert.equal(await page.evaluate(() => document.activeElement.textContent), 'Skip to content');
  await page.keyboard.press('Enter');
  assert.equal(await page.evaluate(() => document.activeElement.id), 'main');
  let found = false;
  for (let i = 0; i < 30 && !found; i += 1) {
    await page.keyboard.press('Tab');
    found = await page.evaluate(() => document.activeElement.labels?.[0]?.textContent === 'DeviceName');
  }
  assert.ok(found, 'DeviceName is reachable with Tab');
  await page.keyboard.type(facts.hot.device);
  await page.keyboard.press('Enter');
  await page.waitForURL(/device=dev2/);
  const rows = await results();
  assert.ok(rows.length > 0);
  assert.ok(rows.every((r) => r.device === facts.hot.device), JSON.stringify(rows));
  await expectPageMatchesApi(rows);
  await checkLabels('logs');
});

await step('search by product, DeviceName, TraceId and MessageID', async () => {
  await openLogs();
  let rows = await search(() => page.getByLabel('Product (productKey)').fill('p2'));
  assert.ok(rows.length > 0 && rows.every((r) => r.product === 'p2'), 'product');
  await expectPageMatchesApi(rows);

  await openLogs();
  rows = await search(() => page.getByRole('textbox', { name: 'DeviceName' }).fill('dev3'));
  assert.ok(rows.length === 3 && rows.every((r) => r.device === 'dev3'), `device: ${rows.length}`);

  await openLogs();
  rows = await search(() => page.getByRole('textbox', { name: 'TraceId' }).fill(facts.hot.traceId));
  // Its uplink, its rule's 9325, that rule's dead-letter step and the other rule's output.
  assert.ok(rows.length === 4 && rows.every((r) => r.traceId === facts.hot.traceId), `traceId: ${rows.length}`);

  await openLogs();
  rows = await search(() => page.getByRole('textbox', { name: 'MessageID' }).fill('c-ok'));
  assert.ok(rows.length === 2 && rows.every((r) => r.messageId === 'c-ok'), 'messageId');
  await expectPageMatchesApi(rows);
});

await step('search by status (all, success, failed, one code) and service type', async () => {
  await openLogs();
  const all = await search(() => page.getByLabel('Status').selectOption(''));
  await expectPageMatchesApi(all);
  let rows = await search(() => page.getByLabel('Status').selectOption('success'));
  assert.ok(rows.length > 0 && rows.every((r) => r.code === 200), 'success');
  rows = await search(() => page.getByLabel('Status').selectOption('failed'));
  assert.ok(rows.length > 0 && rows.every((r) => r.code !== 200), 'failed');
  rows = await search(() => page.getByLabel('Status').selectOption('9325'));
  assert.ok(rows.length === 1 && rows[0].code === 9325, 'one code');
  assert.ok(page.url().includes('status=9325'));
  rows = await search(async () => {
    await page.getByLabel('Status').selectOption('');
    await page.getByLabel('Service type').selectOption('ServerSubscribe');
  });
  assert.ok(rows.length > 0 && rows.every((r) => r.bizCode === 'ServerSubscribe'), 'service type');
  await expectPageMatchesApi(rows);
});

await step('a failure shows its meaning inline and troubleshooting on demand', async () => {
  await openLogs('?since=1h&status=9325');
  const cell = page.locator('table.logs td.status').first();
  const codes = await apiJson('/api/v1/codes');
  const info = codes.codes.find((c) => c.code === 9325);
  assert.ok((await cell.locator('.meaning').textContent()).includes(info.meaning));
  assert.ok((await cell.locator('.reason').textContent()).includes('broker'));
  const details = cell.locator('details.help');
  assert.equal(await details.evaluate((d) => d.open), false);
  await cell.getByText('Troubleshooting 9325').click();
  assert.equal(await details.evaluate((d) => d.open), true);
  assert.ok((await details.textContent()).includes(info.troubleshooting.slice(0, 40)));
  await shot('logs-failure');
});

await step('time range: quick picks and from/to', async () => {
  for (const [label, since] of [['Last 15 minutes', '15m'], ['Last hour', '1h'], ['Last 24 hours', '24h'], ['Last 7 days', '7d']]) {
    await openLogs();
    const rows = await search(() => page.getByLabel(label).check());
    assert.ok(page.url().includes(`since=${since}`), page.url());
    assert.ok(rows.length > 0, label);
    await expectPageMatchesApi(rows);
  }
  await openLogs();
  const local = (d) => {
    const p = (n) => String(n).padStart(2, '0');
    return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())}T${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
  };
  const now = Date.now();
  let rows = await search(async () => {
    await page.getByLabel('From … to …').check();
    await page.getByLabel('From', { exact: true }).fill(local(new Date(now - 3600e3)));
    await page.getByLabel('To', { exact: true }).fill(local(new Date(now + 60e3)));
  });
  assert.ok(page.url().includes('from=') && page.url().includes('to='), page.url());
  assert.ok(rows.length > 0, 'from/to around now');
  await expectPageMatchesApi(rows);
  rows = await search(async () => {
    await page.getByLabel('From', { exact: true }).fill(local(new Date(now - 3 * 86400e3)));
    await page.getByLabel('To', { exact: true }).fill(local(new Date(now - 2 * 86400e3)));
  });
  assert.equal(rows.length, 0, 'nothing two days ago');
  assert.equal(await page.locator('.results .summary').textContent(), 'No records match.');
});

await step('a keyword of every special character, typed', async () => {
  await openLogs();
  const rows = await search(() => page.getByLabel('Content keyword').pressSequentially(facts.punctuation));
  const url = new URL(page.url());
  assert.equal(url.searchParams.get('keyword'), facts.punctuation, 'the URL holds the keyword exactly');
  assert.ok(rows.length > 0, 'found');
  assert.ok(rows.every((r) => r.messageId === facts.special_message), JSON.stringify(rows.map((r) => r.messageId)));
  await expectPageMatchesApi(rows);
  // The payload's markup is text on the page, never elements.
  const uplink = page.locator('table.logs tbody tr', { hasText: 'uplink' }).first();
  assert.equal(await uplink.locator('td.content b').count(), 0);
  assert.ok((await uplink.locator('td.content').textContent()).includes('<b>bold</b>'));
  // Reloading the URL gives the same search.
  await page.reload();
  assert.equal(await page.getByLabel('Content keyword').inputValue(), facts.punctuation);
  assert.equal((await results()).length, rows.length);
  await shot('logs-keyword');
});

await step('a keyword with a tab and a line break, through escapes', async () => {
  await openLogs();
  const rows = await search(async () => {
    await page.getByLabel('Read \\n \\r \\t \\\\ \\uXXXX in the keyword as escapes').check();
    await page.getByLabel('Content keyword').fill(facts.controls.replace('\t', '\\t').replace('\n', '\\n'));
  });
  assert.equal(new URL(page.url()).searchParams.get('keyword'), facts.controls);
  assert.ok(rows.length > 0 && rows.every((r) => r.messageId === facts.special_message), 'found');
  await expectPageMatchesApi(rows);
  // Opened from its URL, the keyword shows escaped, with escapes on.
  await page.reload();
  assert.equal(await page.getByLabel('Content keyword').inputValue(), 'tab\\there\\nnext');
  assert.ok(await page.getByLabel('Read \\n \\r \\t \\\\ \\uXXXX in the keyword as escapes').isChecked());
});

await step('a keyword with a double quote, as the device sent it', async () => {
  // The device sent {"msg":"say \"hi\""}: the keyword as typed finds it, although the stored
  // payload has the quote JSON-escaped.
  await openLogs();
  const rows = await search(() => page.getByLabel('Content keyword').fill(facts.quoteKeyword));
  assert.equal(new URL(page.url()).searchParams.get('keyword'), facts.quoteKeyword);
  const api = await expectPageMatchesApi(rows);
  assert.ok(
    api.records.some((r) => r.messageId === facts.quote_message),
    `keyword ${JSON.stringify(facts.quoteKeyword)} finds ${facts.quote_message}`,
  );
});

await step('pages follow nextCursor', async () => {
  await openLogs('?since=1h&limit=20');
  const first = await results();
  assert.equal(first.length, 20);
  await page.getByRole('link', { name: 'Next page' }).click();
  await page.waitForURL(/cursor=/);
  const second = await results();
  assert.ok(second.length > 0);
  const seen = new Set(first.map((r) => `${r.time}|${r.messageId}|${r.operation}|${r.code}`));
  assert.ok(second.every((r) => !seen.has(`${r.time}|${r.messageId}|${r.operation}|${r.code}`)), 'no repeats');
  await expectPageMatchesApi(second);
  await page.getByRole('link', { name: 'First page' }).click();
  await page.waitForURL((u) => !u.searchParams.has('cursor'));
  assert.equal((await results()).length, 20);
});

await step('clicking a message opens its trace: timeline and verdict', async () => {
  await openLogs(`?since=1h&messageId=${facts.hot.messageId}`);
  await shot('logs');
  await page.getByRole('link', { name: facts.hot.messageId }).first().click();
  await page.waitForURL(new RegExp(`/console/trace/${facts.hot.messageId}$`));
  const api = await apiJson(`/api/v1/trace/${facts.hot.messageId}`);
  const verdict = page.locator('.verdict');
  await verdict.waitFor();
  assert.ok((await verdict.textContent()).includes(api.verdict.summary), await verdict.textContent());
  const steps = page.locator('ol.timeline > li');
  assert.equal(await steps.count(), api.records.length);
  assert.equal(await steps.first().locator('.kind').textContent(), 'Uplink');
  const times = await steps.locator('time').evaluateAll((ts) => ts.map((t) => t.getAttribute('datetime')));
  assert.deepEqual(times, api.records.map((r) => r.time), 'oldest first');
  const fail = page.locator('ol.timeline > li.fail');
  assert.equal(await fail.count(), 1);
  assert.ok((await fail.textContent()).includes('DestinationUnavailable'));
  assert.ok((await fail.locator('.reason').textContent()).includes('broker'));
  assert.match(await fail.locator('.delta').textContent(), /^\+/);
  // Content is pretty-printed JSON.
  const pre = await fail.locator('details.content pre').textContent();
  assert.ok(pre.includes('\n  "attempts"'), pre);
  await fail.getByText('Troubleshooting 9325').click();
  await checkLabels('trace');
  await shot('trace');
});

await step('a trace by trace id, and an id with no records', async () => {
  await page.goto(`${base}/console/trace`);
  await page.getByLabel('MessageID or TraceId').fill(facts.hot.traceId);
  await page.getByLabel('MessageID or TraceId').press('Enter');
  await page.waitForURL(/\/console\/trace\/trace-hot$/);
  await page.locator('ol.timeline > li').first().waitFor();
  await page.goto(`${base}/console/trace/${encodeURIComponent('no such/id?')}`);
  const verdict = await page.locator('.verdict').textContent();
  assert.ok(verdict.includes('Unknown'), verdict);
});

await step('rules: SQL, actions, counts, and the tester on a good and a bad rule', async () => {
  await page.goto(`${base}/console/rules`);
  await page.getByRole('heading', { name: 'Rule tester' }).waitFor();
  const api = await apiJson('/api/v1/rules');
  for (const r of api.rules) {
    const article = page.locator('article.rule', { has: page.getByRole('heading', { name: r.name, exact: true }) });
    assert.equal((await article.locator('pre.sql').textContent()).trim(), r.sql.trim());
    assert.equal(await article.locator('[data-count="matched"]').textContent(), String(r.lastHour.matched));
  }
  const failing = page.locator('article.rule', { has: page.getByRole('heading', { name: 'failing', exact: true }) });
  assert.ok((await failing.textContent()).includes('amqp:alerts: 9325×1'));
  const reload = await page.locator('section', { hasText: 'Last reload' }).textContent();
  assert.ok(reload.includes('failure') && reload.includes('failed broken'), reload);
  const brokenRow = page.locator('table.failed-files tbody tr', { hasText: 'broken' });
  assert.equal(await brokenRow.locator('.code').textContent(), '9307');
  assert.ok((await brokenRow.textContent()).includes('FROM must be a quoted topic filter'));

  // A good rule.
  await page.getByLabel('Rule', { exact: true }).selectOption('failing');
  await page.getByLabel('Topic').fill('/p1/dev9/user/update');
  await page.getByLabel('Payload').fill('{"t": 45}');
  await page.getByRole('button', { name: 'Run test' }).click();
  const output = page.locator('.test-output');
  await output.locator('pre.output').waitFor();
  assert.deepEqual(JSON.parse(await output.locator('pre.output').textContent()), { device: 'dev9', temperature: 45 });
  await checkLabels('rules');
  await shot('rules');

  // A bad rule: SQL that does not parse.
  await page.getByLabel('SQL', { exact: true }).fill('SELECT deviceName() AS device,\nFROM WHERE "/p1/+/user/update"');
  await page.getByRole('button', { name: 'Run test' }).click();
  await output.getByText('9307', { exact: true }).first().waitFor();
  const text = await output.textContent();
  assert.ok(text.includes('SqlError'), text);
  assert.ok(text.includes('SQL statement parsing failed'), text);
  await output.getByText('Troubleshooting 9307').click();
  await shot('rules-tester-error');
});

await step('a 401 asks for a token, kept for the tab only', async () => {
  const token = 'console-test-token';
  const seen = [];
  await page.route('**/api/v1/**', (route) => {
    const auth = route.request().headers().authorization || '';
    seen.push(auth);
    if (auth !== `Bearer ${token}`) {
      return route.fulfill({ status: 401, contentType: 'application/json', body: '{"error":"a token is needed"}' });
    }
    return route.continue();
  });
  await page.goto(`${base}/console/logs?since=1h`);
  const dialog = page.getByRole('dialog', { name: 'API token' });
  await dialog.waitFor();
  await checkLabels('token dialog');
  await page.getByLabel('Token', { exact: true }).fill(token);
  await page.keyboard.press('Enter');
  const rows = await results();
  assert.ok(rows.length > 0);
  assert.equal(await page.evaluate(() => sessionStorage.getItem('iotfwd.apiToken')), token);
  assert.equal(await page.evaluate(() => localStorage.length), 0, 'nothing in localStorage');
  assert.ok(seen.includes(`Bearer ${token}`));
  await page.unroute('**/api/v1/**');
  await page.evaluate(() => sessionStorage.clear());
});

await step('no errors in the page', async () => {
  assert.deepEqual(pageErrors.filter((e) => !e.includes('401')), []);
});

await context.close();
console.log(`console: ${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
