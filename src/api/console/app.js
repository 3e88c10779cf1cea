// The console's router: one page per path under /console, its state in the URL (so a link
// can be pasted into a ticket), rendered by the page's module.
import { api } from './api.js';
import { renderLogs } from './logs.js';
import { renderTrace } from './trace.js';
import { renderRules } from './rules.js';
import { renderOverview } from './overview.js';

const PAGES = {
  overview: { title: 'Overview', render: renderOverview },
  logs: { title: 'Logs', render: renderLogs },
  trace: { title: 'Trace', render: renderTrace },
  rules: { title: 'Rules', render: renderRules },
};

// Things the current page set up (timers) and that end with it.
let cleanups = [];

export function onLeave(fn) {
  cleanups.push(fn);
}

export function navigate(url, { replace = false } = {}) {
  if (replace) history.replaceState(null, '', url);
  else history.pushState(null, '', url);
  route();
}

function route() {
  for (const fn of cleanups) fn();
  cleanups = [];
  const rest = location.pathname.replace(/^\/console\/?/, '').split('/');
  const name = PAGES[rest[0]] ? rest[0] : 'overview';
  const page = PAGES[name];
  for (const a of document.querySelectorAll('nav a[data-page]')) {
    if (a.dataset.page === name) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  document.title = `${page.title} · iotfwd console`;
  const main = document.getElementById('main');
  const view = document.createElement('div');
  view.className = `page page-${name}`;
  main.replaceChildren(view);
  const args = rest.slice(1).map((s) => {
    try {
      return decodeURIComponent(s);
    } catch {
      return s;
    }
  });
  page.render(view, { args, params: new URLSearchParams(location.search) });
  readiness();
}

// The header's readiness: GET /readyz (200 ready, 503 not ready).
async function readiness() {
  const badge = document.getElementById('readiness');
  try {
    const { status } = await api('/readyz', { accept: [503] });
    badge.textContent = status === 200 ? 'ready' : 'not ready';
    badge.className = `readiness ${status === 200 ? 'ok' : 'fail'}`;
  } catch (e) {
    badge.textContent = `not answering (${e.message})`;
    badge.className = 'readiness fail';
  }
}

// Links inside the console change the page without reloading it.
document.addEventListener('click', (e) => {
  const a = e.target.closest && e.target.closest('a[href]');
  if (!a || a.target || e.defaultPrevented || e.button !== 0) return;
  if (a.getAttribute('href').startsWith('#')) return;
  if (e.metaKey || e.ctrlKey || e.shiftKey || e.altKey) return;
  const url = new URL(a.href, location.href);
  if (url.origin !== location.origin || !url.pathname.startsWith('/console')) return;
  if (url.pathname.startsWith('/console/assets/')) return;
  e.preventDefault();
  navigate(url.pathname + url.search);
  document.getElementById('main').focus();
});

window.addEventListener('popstate', route);
setInterval(readiness, 15000);
route();
