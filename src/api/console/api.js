// The console's only way to the daemon: the JSON API, with a token when the API asks for one.
// A 401 opens the token dialog; the token is kept for this tab only (sessionStorage).

const TOKEN_KEY = 'iotfwd.apiToken';

export class ApiError extends Error {
  constructor(status, message, body) {
    super(message);
    this.status = status;
    this.body = body;
  }
}

let pendingToken = null;

// Asks for a token once, however many requests are waiting for one.
function askToken(rejected) {
  if (pendingToken) return pendingToken;
  const dialog = document.getElementById('token-dialog');
  const form = document.getElementById('token-form');
  const input = document.getElementById('token-input');
  const why = document.getElementById('token-why');
  why.textContent = rejected
    ? 'The API refused the token (401). Enter another token with the read scope.'
    : 'The API answered 401: it needs a token with the read scope.';
  input.value = '';
  pendingToken = new Promise((resolve) => {
    const done = (value) => {
      form.removeEventListener('submit', onSubmit);
      cancel.removeEventListener('click', onCancel);
      dialog.removeEventListener('cancel', onCancel);
      if (dialog.open) dialog.close();
      pendingToken = null;
      resolve(value);
    };
    const onSubmit = (e) => {
      e.preventDefault();
      const token = input.value.trim();
      if (token) done(token);
    };
    const onCancel = (e) => {
      e.preventDefault();
      done(null);
    };
    const cancel = document.getElementById('token-cancel');
    form.addEventListener('submit', onSubmit);
    cancel.addEventListener('click', onCancel);
    dialog.addEventListener('cancel', onCancel);
    dialog.showModal();
    input.focus();
  });
  return pendingToken;
}

// The daemon runs at most store.max_concurrent_queries (default 4) record-store reads at once
// and answers 429 beyond that, so the page keeps fewer requests than that in flight; a 429
// that still comes (other clients) is tried again after a pause.
const MAX_IN_FLIGHT = 2;
let inFlight = 0;
const waiting = [];

async function slot() {
  if (inFlight < MAX_IN_FLIGHT) {
    inFlight += 1;
    return;
  }
  await new Promise((resolve) => waiting.push(resolve));
}

function release() {
  const next = waiting.shift();
  if (next) next();
  else inFlight -= 1;
}

async function limitedFetch(path, init) {
  for (let attempt = 0; ; attempt += 1) {
    await slot();
    let res;
    try {
      res = await fetch(path, init);
    } finally {
      release();
    }
    if (res.status !== 429 || attempt >= 4) return res;
    await new Promise((resolve) => setTimeout(resolve, 200 * 2 ** attempt));
  }
}

// GETs or POSTs `path` (absolute, e.g. '/api/v1/logs?device=d1'). Resolves to
// { status, body } (body parsed as JSON when it is JSON); throws ApiError for any status not
// 2xx unless listed in `options.accept`.
export async function api(path, options = {}) {
  const { accept = [], ...init } = options;
  let rejected = false;
  for (;;) {
    const headers = new Headers(init.headers || {});
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers.set('Authorization', `Bearer ${token}`);
    let res;
    try {
      res = await limitedFetch(path, { ...init, headers });
    } catch (e) {
      throw new ApiError(0, `the daemon did not answer (${e.message})`);
    }
    if (res.status === 401) {
      const fresh = await askToken(rejected || Boolean(token));
      if (!fresh) throw new ApiError(401, 'the API needs a token (401); no token was given');
      sessionStorage.setItem(TOKEN_KEY, fresh);
      rejected = true;
      continue;
    }
    const text = await res.text();
    let body = text;
    try {
      body = JSON.parse(text);
    } catch {
      // not JSON: keep the text
    }
    if (!res.ok && !accept.includes(res.status)) {
      const message = body && typeof body === 'object' && body.error ? body.error : text;
      throw new ApiError(res.status, `${res.status}: ${message}`, body);
    }
    return { status: res.status, body };
  }
}

export function postJson(path, value, options = {}) {
  return api(path, {
    ...options,
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify(value),
  });
}

// The code catalog (GET /api/v1/codes), fetched once: Map code -> entry.
let catalog = null;
export function codes() {
  if (!catalog) {
    catalog = api('/api/v1/codes').then(({ body }) => new Map(body.codes.map((c) => [c.code, c])));
    catalog.catch(() => {
      catalog = null;
    });
  }
  return catalog;
}
