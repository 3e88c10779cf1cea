// Small DOM helpers. Every value from the API goes onto the page as text (never as markup).

// el('a', { href: '/x', class: 'y' }, 'text', child): an element with attributes and children;
// strings become text nodes. Attributes starting with "on" are listeners.
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith('on') && typeof value === 'function') {
      node.addEventListener(key.slice(2), value);
    } else if (key === 'class') {
      node.className = value;
    } else if (key === 'text') {
      node.textContent = value;
    } else if (value === true) {
      node.setAttribute(key, '');
    } else {
      node.setAttribute(key, String(value));
    }
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const child of children) {
    if (child === undefined || child === null || child === false) continue;
    if (Array.isArray(child)) append(node, child);
    else if (child instanceof Node) node.appendChild(child);
    else node.appendChild(document.createTextNode(String(child)));
  }
}

// A unique id for label/input pairs.
let next = 0;
export function uid(prefix) {
  next += 1;
  return `${prefix}-${next}`;
}

// A labelled form control: label text, the control element (gets an id when it has none).
export function field(labelText, control, hint) {
  if (!control.id) control.id = uid('f');
  const parts = [el('label', { for: control.id }, labelText), control];
  if (hint) {
    const hintId = uid('hint');
    control.setAttribute('aria-describedby', hintId);
    parts.push(el('span', { class: 'hint', id: hintId }, hint));
  }
  return el('div', { class: 'field' }, ...parts);
}

// "2026-11-27 14:03:49.104" in the browser's time zone, from RFC 3339.
export function localTime(iso) {
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return iso;
  const p = (n, w = 2) => String(n).padStart(w, '0');
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}.${p(d.getMilliseconds(), 3)}`;
}

// "+12 ms", "+1.5 s", "+3 min" between two RFC 3339 times.
export function since(previousIso, iso) {
  const ms = new Date(iso).getTime() - new Date(previousIso).getTime();
  if (!Number.isFinite(ms)) return '';
  if (ms < 1000) return `+${ms} ms`;
  if (ms < 60000) return `+${(ms / 1000).toFixed(ms < 10000 ? 2 : 1)} s`;
  if (ms < 3600000) return `+${(ms / 60000).toFixed(1)} min`;
  return `+${(ms / 3600000).toFixed(1)} h`;
}

// The text pretty-printed when it is JSON, else as it is.
export function pretty(text) {
  if (typeof text !== 'string') return JSON.stringify(text, null, 2);
  const t = text.trim();
  if (!(t.startsWith('{') || t.startsWith('['))) return text;
  try {
    return JSON.stringify(JSON.parse(t), null, 2);
  } catch {
    return text;
  }
}

// Control characters shown as escapes (\n, \t, \u0001), so they are visible in a cell.
export function visible(text) {
  return String(text).replace(/[\u0000-\u001f\u007f]/g, (c) => {
    const named = { '\n': '\\n', '\r': '\\r', '\t': '\\t' }[c];
    return named || `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`;
  });
}

// The reverse of `visible` for what a user types with "escapes" on: \n \r \t \\ \uXXXX.
export function unescape(text) {
  return text.replace(/\\(u[0-9a-fA-F]{4}|[nrt\\])/g, (_, e) => {
    if (e === 'n') return '\n';
    if (e === 'r') return '\r';
    if (e === 't') return '\t';
    if (e === '\\') return '\\';
    return String.fromCharCode(parseInt(e.slice(1), 16));
  });
}

// `text` with every backslash doubled and control characters escaped: what `unescape` reads back.
export function escapeForInput(text) {
  return visible(String(text).replace(/\\/g, '\\\\'));
}

// A status code's badge: 200 green, anything else red, with the code's meaning as its text.
export function codeClass(code) {
  return code === 200 ? 'ok' : 'fail';
}

// A message box (role alert for errors, status otherwise).
export function notice(kind, ...children) {
  return el('div', { class: `notice ${kind}`, role: kind === 'error' ? 'alert' : 'status' }, ...children);
}

export function heading(text) {
  return el('h1', {}, text);
}
