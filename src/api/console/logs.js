// Logs: the platform console's log search. The criteria are the URL's query parameters, named
// as GET /api/v1/logs names them, so the page's URL is the query (paste it into a ticket).
import { api, codes } from './api.js';
import { navigate } from './app.js';
import { el, field, heading, localTime, notice, visible, unescape, escapeForInput } from './util.js';

const QUICK = [
  ['15m', 'Last 15 minutes'],
  ['1h', 'Last hour'],
  ['24h', 'Last 24 hours'],
  ['7d', 'Last 7 days'],
];

const TEXT_FIELDS = [
  ['product', 'Product (productKey)', 'exact'],
  ['device', 'DeviceName', 'exact'],
  ['traceId', 'TraceId', 'exact'],
  ['messageId', 'MessageID', 'exact'],
];

export function traceHref(id) {
  return `/console/trace/${encodeURIComponent(id)}`;
}

// The datetime-local value ("2026-11-27T14:03:05") of an RFC 3339 time, in local time.
function toLocalInput(iso) {
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return '';
  const p = (n) => String(n).padStart(2, '0');
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())}T${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
}

export async function renderLogs(view, { params }) {
  // A search always has a time range in its URL.
  if (!params.has('since') && !params.has('from') && !params.has('to')) {
    params.set('since', '1h');
    history.replaceState(null, '', `/console/logs?${params}`);
  }
  view.append(heading('Logs'));
  let catalog = new Map();
  try {
    catalog = await codes();
  } catch (e) {
    view.append(notice('error', `The code catalog did not load: ${e.message}`));
  }
  const form = searchForm(params, catalog);
  view.append(form);
  const results = el('section', { class: 'results', 'aria-labelledby': 'results-title' });
  view.append(results);
  await showResults(results, params, catalog);
}

function searchForm(params, catalog) {
  const controls = {};
  const textFields = TEXT_FIELDS.map(([name, label, hint]) => {
    controls[name] = el('input', { name, type: 'text', value: params.get(name) || '', autocomplete: 'off', spellcheck: 'false' });
    return field(label, controls[name], hint);
  });

  // The keyword: any character works. Characters an input cannot hold (line breaks) are
  // shown as escapes, with "escapes" on.
  const keyword = params.get('keyword') || '';
  const needsEscapes = /[\u0000-\u001f\u007f]/.test(keyword);
  controls.escapes = el('input', { type: 'checkbox', name: 'escapes', checked: needsEscapes });
  controls.keyword = el('input', {
    name: 'keyword',
    type: 'text',
    autocomplete: 'off',
    spellcheck: 'false',
    value: needsEscapes ? escapeForInput(keyword) : keyword,
  });
  const keywordField = field('Content keyword', controls.keyword, 'literal, case-sensitive; any character works');
  const escapesField = el('div', { class: 'field check' },
    controls.escapes,
    el('label', { for: (controls.escapes.id = 'kw-escapes') }, 'Read \\n \\r \\t \\\\ \\uXXXX in the keyword as escapes'));

  controls.status = el('select', { name: 'status' },
    el('option', { value: '' }, 'All statuses'),
    el('option', { value: 'success' }, 'Success (200)'),
    el('option', { value: 'failed' }, 'Failed (any other code)'),
    el('optgroup', { label: 'One code' },
      [...catalog.values()].filter((c) => c.code !== 200).map((c) => el('option', { value: String(c.code) }, `${c.code} ${c.name}`))));
  controls.status.value = params.get('status') || '';
  if (controls.status.value !== (params.get('status') || '')) {
    // A code the catalog has not loaded: keep it selectable.
    controls.status.append(el('option', { value: params.get('status') }, params.get('status')));
    controls.status.value = params.get('status');
  }

  controls.serviceType = el('select', { name: 'serviceType' },
    el('option', { value: '' }, 'All service types'),
    el('option', { value: 'uplink' }, 'uplink (message received)'),
    el('option', { value: 'ruleengine' }, 'ruleengine (data forwarding)'),
    el('option', { value: 'ServerSubscribe' }, 'ServerSubscribe (consumer groups)'));
  controls.serviceType.value = params.get('serviceType') || '';

  // Time range: quick picks, or from/to.
  const custom = params.has('from') || params.has('to');
  const since = params.get('since') || '1h';
  const picks = [...QUICK, ['custom', 'From … to …']].map(([value, label]) => {
    const radio = el('input', { type: 'radio', name: 'range', value, id: `range-${value}`,
      checked: custom ? value === 'custom' : value === since });
    return el('span', { class: 'pick' }, radio, el('label', { for: radio.id }, label));
  });
  controls.from = el('input', { type: 'datetime-local', name: 'from', step: '1', value: params.get('from') ? toLocalInput(params.get('from')) : '' });
  controls.to = el('input', { type: 'datetime-local', name: 'to', step: '1', value: params.get('to') ? toLocalInput(params.get('to')) : '' });
  const range = el('fieldset', { class: 'range' },
    el('legend', {}, 'Time range'),
    el('div', { class: 'picks' }, picks),
    el('div', { class: 'fromto' }, field('From', controls.from), field('To', controls.to)));
  const syncRange = () => {
    const isCustom = range.querySelector('input[name=range]:checked')?.value === 'custom';
    controls.from.disabled = !isCustom;
    controls.to.disabled = !isCustom;
  };
  range.addEventListener('change', syncRange);
  syncRange();

  controls.limit = el('select', { name: 'limit' }, ['20', '50', '100', '200'].map((n) => el('option', { value: n }, n)));
  controls.limit.value = params.get('limit') || '50';

  const form = el('form', { class: 'search', role: 'search', 'aria-label': 'Search the logs' },
    el('div', { class: 'grid' },
      textFields,
      keywordField,
      field('Status', controls.status),
      field('Service type', controls.serviceType),
      field('Rows per page', controls.limit)),
    escapesField,
    range,
    el('div', { class: 'buttons' },
      el('button', { type: 'submit', class: 'primary' }, 'Search'),
      el('a', { href: '/console/logs', class: 'button' }, 'Reset')));

  form.addEventListener('submit', (e) => {
    e.preventDefault();
    const q = new URLSearchParams();
    for (const [name] of TEXT_FIELDS) {
      const v = controls[name].value.trim();
      if (v) q.set(name, v);
    }
    // The keyword is not trimmed: a space may be part of it.
    const kw = controls.escapes.checked ? unescape(controls.keyword.value) : controls.keyword.value;
    if (kw) q.set('keyword', kw);
    if (controls.status.value) q.set('status', controls.status.value);
    if (controls.serviceType.value) q.set('serviceType', controls.serviceType.value);
    const pick = form.querySelector('input[name=range]:checked')?.value || '1h';
    if (pick === 'custom') {
      if (controls.from.value) q.set('from', new Date(controls.from.value).toISOString());
      if (controls.to.value) q.set('to', new Date(controls.to.value).toISOString());
      if (!controls.from.value && !controls.to.value) q.set('since', '1h');
    } else {
      q.set('since', pick);
    }
    if (controls.limit.value !== '50') q.set('limit', controls.limit.value);
    navigate(`/console/logs?${q}`);
    document.getElementById('results-title')?.focus();
  });
  return form;
}

async function showResults(section, params, catalog) {
  const title = el('h2', { id: 'results-title', tabindex: '-1' }, 'Results');
  const status = el('p', { class: 'summary', role: 'status', 'aria-live': 'polite' }, 'Searching…');
  section.append(title, status);
  let page;
  try {
    ({ body: page } = await api(`/api/v1/logs?${params}`));
  } catch (e) {
    status.remove();
    section.append(notice('error', `The search failed: ${e.message}`));
    return;
  }
  if (page.count === 0) {
    status.textContent = 'No records match.';
    return;
  }
  status.textContent = `${page.count} record${page.count === 1 ? '' : 's'}, newest first${page.nextCursor ? '; more on the next page' : ''}.`;
  const table = el('table', { class: 'logs' },
    el('caption', { class: 'sr-only' }, 'Log records, newest first'),
    el('thead', {}, el('tr', {},
      ['Time', 'TraceId', 'MessageID', 'DeviceName', 'Service type', 'Action', 'Content', 'Status']
        .map((h) => el('th', { scope: 'col' }, h)))),
    el('tbody', {}, page.records.map((r) => row(r, catalog))));
  section.append(el('div', { class: 'table-wrap' }, table));
  const pager = el('nav', { class: 'pager', 'aria-label': 'Pages' });
  if (params.has('cursor')) {
    const first = new URLSearchParams(params);
    first.delete('cursor');
    pager.append(el('a', { href: `/console/logs?${first}`, class: 'button' }, 'First page'));
  }
  if (page.nextCursor) {
    const next = new URLSearchParams(params);
    next.set('cursor', page.nextCursor);
    pager.append(el('a', { href: `/console/logs?${next}`, class: 'button', rel: 'next' }, 'Next page'));
  }
  if (pager.childElementCount) section.append(pager);
}

function row(r, catalog) {
  const info = catalog.get(r.code);
  const statusCell = el('td', { class: 'status' },
    el('span', { class: `code ${r.code === 200 ? 'ok' : 'fail'}` }, String(r.code)));
  if (r.code !== 200) {
    if (info) statusCell.append(el('span', { class: 'meaning' }, info.meaning));
    if (r.reason) statusCell.append(el('span', { class: 'reason' }, visible(r.reason)));
    if (info) {
      statusCell.append(el('details', { class: 'help' },
        el('summary', {}, `Troubleshooting ${r.code}`),
        el('dl', {},
          el('dt', {}, 'Cause'), el('dd', {}, info.cause),
          el('dt', {}, 'Troubleshooting'), el('dd', {}, info.troubleshooting))));
    }
  }
  const content = visible(r.content);
  return el('tr', { class: r.code === 200 ? '' : 'failed' },
    el('td', { class: 'time' }, el('time', { datetime: r.time, title: r.time }, localTime(r.time))),
    el('td', { class: 'id' }, r.traceId ? el('a', { href: traceHref(r.traceId), title: 'Open this trace' }, r.traceId) : ''),
    el('td', { class: 'id' }, r.messageId ? el('a', { href: traceHref(r.messageId), title: "Open this message's trace" }, r.messageId) : ''),
    el('td', {}, visible(r.deviceName), r.productKey ? el('span', { class: 'sub' }, visible(r.productKey)) : ''),
    el('td', {}, r.bizCode),
    el('td', { class: 'op' }, visible(r.operation)),
    el('td', { class: 'content' }, el('code', { title: content.length > 240 ? content : null }, content.length > 240 ? `${content.slice(0, 240)}…` : content)),
    statusCell);
}
