// Overview: forwarding outcomes per code over the last hour and day (GET /api/v1/stats),
// throttling per tenant and instance, destinations and consumer groups with their health
// (GET /api/v1/health), and readiness (GET /readyz). Refreshes every 30 s.
import { api, codes } from './api.js';
import { onLeave } from './app.js';
import { colour, stackedBars } from './chart.js';
import { el, heading, localTime, notice } from './util.js';

const WINDOWS = [
  ['1h', 'Last hour'],
  ['24h', 'Last 24 hours'],
];

export async function renderOverview(view) {
  view.append(heading('Overview'));
  const body = el('div', { class: 'overview-body' });
  view.append(body);
  let timer = null;
  const refresh = async () => {
    const next = await build();
    body.replaceChildren(...next);
    timer = setTimeout(refresh, 30000);
  };
  onLeave(() => clearTimeout(timer));
  body.append(el('p', { role: 'status' }, 'Loading…'));
  await refresh();
}

async function build() {
  const out = [];
  let catalog = new Map();
  const get = (path, accept) => api(path, { accept }).then((r) => r, (e) => ({ error: e }));
  const [cat, ready, health, ...stats] = await Promise.all([
    codes().catch(() => new Map()),
    get('/readyz', [503]),
    get('/api/v1/health'),
    ...WINDOWS.map(([since]) => get(`/api/v1/stats?since=${since}&by=code`, [404])),
    get('/api/v1/stats?since=1h&by=tenant&status=9324', [404]),
    get('/api/v1/stats?since=1h&by=instance&status=9326', [404]),
    get('/api/v1/stats?since=24h&by=tenant&status=9324', [404]),
    get('/api/v1/stats?since=24h&by=instance&status=9326', [404]),
  ]);
  catalog = cat;
  out.push(statusLine(ready, health));

  // Outcomes per code.
  const charts = el('section', { 'aria-labelledby': 'outcomes-title' }, el('h2', { id: 'outcomes-title' }, 'Outcomes per code'));
  const perCode = stats.slice(0, WINDOWS.length);
  if (perCode[0].error || perCode[0].status === 404) {
    charts.append(notice('error', perCode[0].error ? `The counts did not load: ${perCode[0].error.message}` : perCode[0].body.error));
  } else {
    const row = el('div', { class: 'charts' });
    WINDOWS.forEach(([, label], i) => {
      const s = perCode[i].body;
      row.append(el('figure', { class: 'chart-box', 'data-window': WINDOWS[i][0] },
        el('figcaption', {}, `${label}: ${s.total} record${s.total === 1 ? '' : 's'}, per ${bucketLabel(s.bucketSeconds)}`),
        stackedBars(s, `Outcomes per code, ${label.toLowerCase()}`)));
    });
    charts.append(row);
    charts.append(codeTable(perCode.map((r) => r.body), catalog));
  }
  out.push(charts);

  // Throttling.
  const [t1, i1, t24, i24] = stats.slice(WINDOWS.length);
  out.push(throttleSection(t1, i1, t24, i24));

  // Destinations and consumer groups.
  if (health.error) {
    out.push(notice('error', `Health did not load: ${health.error.message}`));
  } else {
    out.push(destinationsSection(health.body, catalog));
    out.push(groupsSection(health.body));
  }
  out.push(el('p', { class: 'hint' }, `Updated ${localTime(new Date().toISOString())}; refreshes every 30 s.`));
  return out;
}

function bucketLabel(seconds) {
  if (seconds >= 3600) return `${seconds / 3600} h`;
  if (seconds >= 60) return `${seconds / 60} min`;
  return `${seconds} s`;
}

function statusLine(ready, health) {
  const isReady = !ready.error && ready.status === 200;
  const h = health.body || {};
  return el('section', { class: 'status-line', 'aria-label': 'Status' },
    el('span', { class: `pill ${isReady ? 'ok' : 'fail'}` }, isReady ? 'Ready' : 'Not ready'),
    el('span', { class: `pill ${h.status === 'ok' ? 'ok' : 'fail'}` }, `Health: ${h.status || 'unknown'}`),
    el('span', { class: 'pill' }, h.broker ? (h.broker.configured ? `Broker: ${h.broker.connected ? 'connected' : 'disconnected'}` : 'Broker: none configured') : 'Broker: ?'),
    h.rules ? el('span', { class: `pill ${h.rules.failed.length ? 'fail' : 'ok'}` }, `Rules: ${h.rules.loaded} running, ${h.rules.failed.length} failed`) : '');
}

// The counts of both windows by code, with each code's meaning: the charts' legend and their
// text alternative.
function codeTable(windows, catalog) {
  const keys = new Map();
  windows.forEach((s, i) => {
    for (const g of s.groups) {
      if (!keys.has(g.key)) keys.set(g.key, windows.map(() => 0));
      keys.get(g.key)[i] = g.total;
    }
  });
  const rows = [...keys.entries()].sort((a, b) => Number(a[0]) - Number(b[0]));
  return el('table', { class: 'legend' },
    el('caption', {}, 'Records per code'),
    el('thead', {}, el('tr', {},
      el('th', { scope: 'col' }, 'Code'),
      el('th', { scope: 'col' }, 'Meaning'),
      WINDOWS.map(([, label]) => el('th', { scope: 'col', class: 'num' }, label)))),
    el('tbody', {}, rows.length ? rows.map(([key, counts]) => {
      const info = catalog.get(Number(key));
      const logs = new URLSearchParams({ status: key, since: '24h' });
      return el('tr', {},
        el('td', {}, swatch(key), el('a', { href: `/console/logs?${logs}`, 'aria-label': `Logs with code ${key}, last 24 hours` }, key)),
        el('td', {}, info ? `${info.name}: ${info.meaning}` : ''),
        counts.map((n) => el('td', { class: 'num' }, String(n))));
    }) : el('tr', {}, el('td', { colspan: String(2 + WINDOWS.length) }, 'No records yet.'))));
}

// The chart colour of a key (set through the style object: the page allows no inline styles).
function swatch(key) {
  const s = el('span', { class: 'swatch', 'aria-hidden': 'true' });
  s.style.backgroundColor = colour(key);
  return s;
}

function throttleSection(t1, i1, t24, i24) {
  const section = el('section', { 'aria-labelledby': 'throttle-title' },
    el('h2', { id: 'throttle-title' }, 'Throttling'),
    el('p', { class: 'hint' }, '9324: a tenant or device over its forwarding quota; 9326: an instance over its specification.'));
  const table = (caption, code, hour, day, what) => {
    if (hour.error || day.error || hour.status === 404) {
      return notice('error', `${caption} did not load`);
    }
    const keys = new Map();
    for (const g of hour.body.groups) keys.set(g.key, [g.total, 0]);
    for (const g of day.body.groups) keys.set(g.key, [keys.get(g.key)?.[0] || 0, g.total]);
    return el('table', { class: 'throttle' },
      el('caption', {}, caption),
      el('thead', {}, el('tr', {}, el('th', { scope: 'col' }, what), el('th', { scope: 'col', class: 'num' }, `${code}, last hour`), el('th', { scope: 'col', class: 'num' }, `${code}, last 24 hours`))),
      el('tbody', {}, keys.size ? [...keys.entries()].map(([k, [h, d]]) => el('tr', {},
        el('td', {}, k || '(none)'), el('td', { class: 'num' }, String(h)), el('td', { class: 'num' }, String(d))))
        : el('tr', {}, el('td', { colspan: '3' }, 'Nothing throttled.'))));
  };
  section.append(el('div', { class: 'two' },
    table('Per tenant', 9324, t1, t24, 'Tenant'),
    table('Per instance', 9326, i1, i24, 'Instance')));
  return section;
}

function destinationsSection(health, catalog) {
  const section = el('section', { 'aria-labelledby': 'dest-title' }, el('h2', { id: 'dest-title' }, 'Destinations'));
  if (!health.destinations.length) {
    section.append(el('p', {}, 'No destination has been used yet.'));
    return section;
  }
  section.append(el('table', { class: 'destinations' },
    el('caption', { class: 'sr-only' }, 'Destinations and their health'),
    el('thead', {}, el('tr', {}, ['Destination', 'State', 'Last success', 'Last error', 'Failing since'].map((h) => el('th', { scope: 'col' }, h)))),
    el('tbody', {}, health.destinations.map((d) => el('tr', {},
      el('td', {}, d.destination),
      el('td', {}, el('span', { class: `pill ${d.state === 'healthy' ? 'ok' : 'fail'}` }, d.state)),
      el('td', {}, d.lastSuccess ? localTime(d.lastSuccess) : '—'),
      el('td', {}, d.lastError ? [el('span', { class: 'code fail', title: catalog.get(d.lastError.code)?.meaning || '' }, String(d.lastError.code)), ` ${d.lastError.reason} (${localTime(d.lastError.time)})`] : '—'),
      el('td', {}, d.failingSince ? localTime(d.failingSince) : '—'))))));
  return section;
}

function groupsSection(health) {
  const section = el('section', { 'aria-labelledby': 'groups-title' }, el('h2', { id: 'groups-title' }, 'Consumer groups'));
  if (!health.groups.length) {
    section.append(el('p', {}, 'No consumer group is configured.'));
    return section;
  }
  section.append(el('table', { class: 'groups' },
    el('caption', { class: 'sr-only' }, 'Consumer groups and their health'),
    el('thead', {}, el('tr', {}, ['Group', 'State', 'Connections', 'Waiting', 'Unsettled', 'Backlog', 'Clients'].map((h) => el('th', { scope: 'col' }, h)))),
    el('tbody', {}, health.groups.map((g) => el('tr', {},
      el('td', {}, g.group),
      el('td', {}, el('span', { class: `pill ${g.state === 'healthy' ? 'ok' : 'fail'}` }, g.state)),
      el('td', { class: 'num' }, String(g.connections ?? '')),
      el('td', { class: 'num' }, String(g.waiting ?? '')),
      el('td', { class: 'num' }, String(g.unsettled ?? '')),
      el('td', {}, String(g.backlog ?? '')),
      el('td', {}, (g.clients || []).join(', ') || '—'))))));
  return section;
}
