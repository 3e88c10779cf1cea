// Rules: the rules running now (SQL, actions, what each did over the last hour), the last
// reload, and a rule tester that runs one message through a rule with the daemon's engine
// (POST /api/v1/rules/test; it never writes a rule file).
import { api, codes, postJson } from './api.js';
import { el, field, heading, localTime, notice, visible } from './util.js';

function actionText(a) {
  if (!a) return '';
  if (a.to === 'amqp') return `amqp: exchange ${a.exchange}${a.routing_key ? `, routing key ${a.routing_key}` : ''}`;
  if (a.to === 'group') return `group: ${a.group}`;
  return JSON.stringify(a);
}

function codeBadges(byCode, catalog) {
  const entries = Object.entries(byCode || {});
  if (entries.length === 0) return '0';
  return entries.map(([code, n]) => el('span', {
    class: `code ${code === '200' ? 'ok' : 'fail'}`,
    title: catalog.get(Number(code))?.meaning || '',
  }, `${code}×${n}`));
}

// An example topic for a FROM filter: + and # filled in.
function exampleTopic(filter) {
  return filter.split('/').map((level) => (level === '+' ? 'device1' : level === '#' ? 'post' : level)).join('/');
}

export async function renderRules(view) {
  view.append(heading('Rules'));
  let rules;
  let health;
  let catalog = new Map();
  try {
    [{ body: rules }, { body: health }, catalog] = await Promise.all([
      api('/api/v1/rules'),
      api('/api/v1/health'),
      codes().catch(() => new Map()),
    ]);
  } catch (e) {
    view.append(notice('error', `The rules did not load: ${e.message}`));
    return;
  }
  view.append(reloadSection(health, rules, catalog));
  view.append(runningSection(rules, catalog));
  view.append(testerSection(rules.rules, catalog));
}

function reloadSection(health, rules, catalog) {
  const last = health.lastReload;
  const section = el('section', { 'aria-labelledby': 'reload-title' }, el('h2', { id: 'reload-title' }, 'Last reload'));
  if (last) {
    section.append(el('p', { class: `reload ${last.result === 'success' ? 'ok' : 'fail'}` },
      el('span', { class: `code ${last.result === 'success' ? 'ok' : 'fail'}` }, last.result),
      ` ${localTime(last.time)} (${last.cause}): ${last.loaded} rule(s) running`,
      last.added.length ? `; added ${last.added.join(', ')}` : '',
      last.changed.length ? `; changed ${last.changed.join(', ')}` : '',
      last.removed.length ? `; removed ${last.removed.join(', ')}` : '',
      last.failed.length ? `; failed ${last.failed.join(', ')}` : ''));
  }
  const failedFiles = health.rules ? health.rules.failed : [];
  if (failedFiles.length) {
    section.append(el('table', { class: 'failed-files' },
      el('caption', {}, 'Rule files that do not load'),
      el('thead', {}, el('tr', {}, ['File', 'Rule', 'Code', 'Error', 'Since'].map((h) => el('th', { scope: 'col' }, h)))),
      el('tbody', {}, failedFiles.map((f) => el('tr', {},
        el('td', {}, f.file),
        el('td', {}, f.rule || '—'),
        el('td', {}, el('span', { class: 'code fail', title: catalog.get(f.code)?.meaning || '' }, String(f.code))),
        el('td', {}, el('pre', { class: 'error' }, f.reason), f.previousRunning ? el('span', { class: 'sub' }, 'the previous version keeps running') : ''),
        el('td', {}, localTime(f.time)))))));
  } else {
    section.append(el('p', {}, 'Every rule file loads.'));
  }
  return section;
}

function runningSection(rules, catalog) {
  const section = el('section', { 'aria-labelledby': 'running-title' },
    el('h2', { id: 'running-title' }, `Running now (${rules.rules.length})`),
    el('p', { class: 'hint' }, `Counts since ${localTime(rules.countsSince)} (the last hour, or since the daemon started).`));
  for (const r of rules.rules) {
    const c = r.lastHour;
    section.append(el('article', { class: 'rule', 'aria-labelledby': `rule-${r.name}` },
      el('h3', { id: `rule-${r.name}` }, r.name, r.enabled ? '' : el('span', { class: 'sub' }, ' (disabled)')),
      r.description ? el('p', {}, r.description) : '',
      el('pre', { class: 'sql', 'aria-label': `SQL of ${r.name}` }, r.sql.trim()),
      el('dl', { class: 'facts' },
        el('dt', {}, 'Actions'), el('dd', {}, r.actions.length ? el('ul', {}, r.actions.map((a) => el('li', {}, actionText(a)))) : 'none: the output is the record'),
        el('dt', {}, 'Error action'), el('dd', {}, r.error_action ? actionText(r.error_action) : 'none'),
        el('dt', {}, 'Matched'), el('dd', { 'data-count': 'matched' }, String(c.matched)),
        el('dt', {}, 'Passed'), el('dd', { 'data-count': 'passed' }, String(c.passed)),
        el('dt', {}, 'No result'), el('dd', { 'data-count': 'noResult' }, String(c.noResult)),
        el('dt', {}, 'Failed'), el('dd', { 'data-count': 'failed' }, codeBadges(c.failed, catalog)),
        Object.keys(c.actions).length ? [
          el('dt', {}, 'Action outcomes'),
          el('dd', {}, el('ul', {}, Object.entries(c.actions).map(([dest, byCode]) => el('li', {}, `${dest}: `, codeBadges(byCode, catalog))))),
        ] : '')));
  }
  return section;
}

function testerSection(rules, catalog) {
  const pick = el('select', { name: 'rule' },
    rules.map((r) => el('option', { value: r.name }, r.name)),
    el('option', { value: '' }, 'New rule (SQL only)'));
  const sql = el('textarea', { name: 'sql', rows: '6', spellcheck: 'false', class: 'code-input' });
  const topic = el('input', { type: 'text', name: 'topic', autocomplete: 'off', spellcheck: 'false', required: true });
  const payload = el('textarea', { name: 'payload', rows: '5', spellcheck: 'false', class: 'code-input' });
  const output = el('div', { class: 'test-output', role: 'status', 'aria-live': 'polite' });
  const fill = () => {
    const rule = rules.find((r) => r.name === pick.value);
    if (rule) {
      sql.value = rule.sql.trim();
      topic.value = exampleTopic(rule.from);
    } else {
      sql.value = 'SELECT deviceName() AS device, * FROM "/+/+/user/update"';
      topic.value = '/product1/device1/user/update';
    }
    if (!payload.value) payload.value = '{"temperature": 40.5}';
  };
  pick.addEventListener('change', fill);
  fill();
  const form = el('form', { class: 'tester', 'aria-labelledby': 'tester-title' },
    field('Rule', pick, 'a running rule (its actions are checked too), or SQL alone'),
    field('SQL', sql),
    field('Topic', topic),
    field('Payload', payload, 'as the device sends it: JSON, or any text'),
    el('div', { class: 'buttons' }, el('button', { type: 'submit', class: 'primary' }, 'Run test')));
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    output.replaceChildren(el('p', {}, 'Running…'));
    const request = { sql: sql.value, topic: topic.value, payload: payload.value };
    if (pick.value) request.rule = pick.value;
    try {
      const { body } = await postJson('/api/v1/rules/test', request, { accept: [400, 404] });
      output.replaceChildren(...testResult(body, catalog));
    } catch (err) {
      output.replaceChildren(notice('error', `The test did not run: ${err.message}`));
    }
  });
  return el('section', { 'aria-labelledby': 'tester-title' },
    el('h2', { id: 'tester-title' }, 'Rule tester'),
    el('p', { class: 'hint' }, 'Runs one message through one rule with the daemon\'s own engine, as iotfwd rules test does. Nothing is saved.'),
    form, output);
}

function testResult(body, catalog) {
  if (body.error) return [notice('error', body.error)];
  const out = [];
  if (body.result === 'passed') {
    out.push(el('p', { class: 'result-line' }, el('span', { class: 'code ok' }, '200'), ' Passed: the rule produces this output.'));
    out.push(el('pre', { class: 'output', 'aria-label': 'Rule output' }, JSON.stringify(body.output, null, 2)));
  } else if (body.result === 'no_match' || body.result === 'no_result') {
    out.push(el('p', { class: 'result-line' }, el('span', { class: 'code none' }, body.result === 'no_match' ? 'no match' : 'no result'), ' ', body.reason));
  } else {
    const info = catalog.get(body.code);
    out.push(el('p', { class: 'result-line' },
      el('span', { class: 'code fail' }, String(body.code)),
      ` ${body.name}: ${body.meaning}`));
    if (body.errors) {
      out.push(el('ul', { class: 'errors' }, body.errors.map((e) => el('li', {},
        e.line ? `line ${e.line}${e.column ? `, column ${e.column}` : ''}: ` : '',
        el('span', { class: 'code fail' }, String(e.code)), ' ', visible(e.message)))));
    } else if (body.reason) {
      out.push(el('p', { class: 'reason' }, el('strong', {}, 'Reason: '), visible(body.reason)));
    }
    if (info) {
      out.push(el('details', { class: 'help' }, el('summary', {}, `Troubleshooting ${body.code}`),
        el('dl', {}, el('dt', {}, 'Cause'), el('dd', {}, info.cause), el('dt', {}, 'Troubleshooting'), el('dd', {}, info.troubleshooting))));
    }
  }
  return out;
}
