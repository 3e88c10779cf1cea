// Trace: one message's whole path under its trace id, oldest first, as a timeline, with the
// verdict of `iotfwd logs trace` (computed by the daemon, GET /api/v1/trace/{id}).
import { api, codes } from './api.js';
import { navigate } from './app.js';
import { el, field, heading, localTime, notice, pretty, since, visible } from './util.js';

const VERDICT_LABELS = {
  delivered: 'Delivered',
  failed: 'Failed',
  not_forwarded: 'Not forwarded',
  unknown: 'Unknown',
};

// What kind of step a record is.
function stepKind(r) {
  if (r.bizCode === 'uplink') return 'Uplink';
  if (r.bizCode === 'ruleengine') return r.operation.includes('/') ? 'Action' : 'Rule';
  if (r.bizCode === 'ServerSubscribe') return 'Consumer-group delivery';
  return r.bizCode;
}

export async function renderTrace(view, { args }) {
  const id = args.join('/');
  view.append(heading('Trace'));
  const input = el('input', { type: 'text', name: 'id', value: id, autocomplete: 'off', spellcheck: 'false', required: true });
  const form = el('form', { class: 'trace-form', role: 'search', 'aria-label': 'Open a trace' },
    field('MessageID or TraceId', input),
    el('div', { class: 'buttons' }, el('button', { type: 'submit', class: 'primary' }, 'Open trace')));
  form.addEventListener('submit', (e) => {
    e.preventDefault();
    const v = input.value.trim();
    if (v) navigate(`/console/trace/${encodeURIComponent(v)}`);
  });
  view.append(form);
  if (!id) {
    view.append(el('p', { class: 'hint' }, 'Give a message id or a trace id (from the Logs page, or from the ingest API\'s answer) to see every step of that message.'));
    return;
  }
  const section = el('section', { class: 'trace', 'aria-label': 'Trace' });
  view.append(section);
  let catalog = new Map();
  let body;
  try {
    [catalog, { body }] = await Promise.all([
      codes().catch(() => new Map()),
      api(`/api/v1/trace/${encodeURIComponent(id)}`, { accept: [404] }),
    ]);
  } catch (e) {
    section.append(notice('error', `The trace did not load: ${e.message}`));
    return;
  }
  const v = body.verdict;
  section.append(el('div', { class: `verdict verdict-${v.status}`, role: 'status' },
    el('strong', {}, `Verdict: ${VERDICT_LABELS[v.status] || v.status}`),
    el('span', {}, ` — ${v.summary}`)));
  const records = body.records || [];
  if (records.length === 0) return;
  const messages = [...new Set(records.map((r) => r.messageId).filter(Boolean))];
  const traces = [...new Set(records.map((r) => r.traceId))];
  const first = records[0];
  section.append(el('dl', { class: 'facts' },
    el('dt', {}, 'MessageID'), el('dd', {}, messages.join(', ') || '—'),
    el('dt', {}, 'TraceId'), el('dd', {}, traces.join(', ')),
    el('dt', {}, 'Device'), el('dd', {}, `${visible(first.productKey)}/${visible(first.deviceName)}`),
    el('dt', {}, 'Steps'), el('dd', {}, `${records.length}, ${v.failedSteps} failed${body.truncated ? ' (only the first ones are shown)' : ''}`)));
  const list = el('ol', { class: 'timeline', 'aria-label': 'Steps, oldest first' });
  records.forEach((r, i) => list.append(step(r, i === 0 ? null : records[i - 1], catalog)));
  section.append(list);
}

function step(r, previous, catalog) {
  const info = catalog.get(r.code);
  const ok = r.code === 200;
  const item = el('li', { class: `step ${ok ? 'ok' : 'fail'}` },
    el('div', { class: 'when' },
      el('time', { datetime: r.time, title: r.time }, localTime(r.time)),
      previous ? el('span', { class: 'delta', title: 'since the previous step' }, since(previous.time, r.time)) : el('span', { class: 'delta' }, 'first step')),
    el('div', { class: 'what' },
      el('span', { class: 'kind' }, stepKind(r)),
      el('span', { class: 'biz' }, r.bizCode),
      el('span', { class: 'op' }, visible(r.operation))),
    el('div', { class: 'result' },
      el('span', { class: `code ${ok ? 'ok' : 'fail'}` }, String(r.code)),
      info ? el('span', { class: 'meaning' }, `${info.name}: ${info.meaning}`) : ''));
  if (r.reason) item.append(el('p', { class: 'reason' }, el('strong', {}, 'Reason: '), visible(r.reason)));
  if (r.content) {
    item.append(el('details', { class: 'content', open: true },
      el('summary', {}, 'Content'),
      el('pre', {}, pretty(r.content))));
  }
  if (!ok && info) {
    item.append(el('details', { class: 'help' },
      el('summary', {}, `Troubleshooting ${r.code}`),
      el('dl', {},
        el('dt', {}, 'Cause'), el('dd', {}, info.cause),
        el('dt', {}, 'Troubleshooting'), el('dd', {}, info.troubleshooting))));
  }
  return item;
}
