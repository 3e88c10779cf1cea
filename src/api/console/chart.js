// Stacked bar charts drawn as SVG: one bar per time bucket, one colour per code.
// The SVG namespace, as the HTML parser gives it to an <svg> element.
const SVG = (() => {
  const holder = document.createElement('div');
  holder.innerHTML = '<svg></svg>';
  return holder.firstChild.namespaceURI;
})();

const PALETTE = ['#c0392b', '#d35400', '#8e44ad', '#2c3e50', '#b7950b', '#16a085', '#7f8c8d', '#e84393', '#2980b9', '#6c3483'];

// Each code iotfwd logs has its own colour (200 green, failures warm or dark), the same on
// every chart; any other key (a service type, a rule) gets one from the palette.
const CODE_COLOURS = {
  200: '#2e8b57', 1903: '#7f8c8d', 9203: '#16a085', 9307: '#8e44ad', 9320: '#b7950b',
  9321: '#d4ac0d', 9324: '#d35400', 9325: '#c0392b', 9326: '#f39c12', 9331: '#922b21',
  9332: '#6c3483', 9333: '#34495e', 9399: '#111111', 9600: '#1abc9c', 9601: '#2980b9',
  9602: '#5dade2', 9650: '#e84393', 9651: '#f1948a', 9652: '#a93226',
};

export function colour(key) {
  if (CODE_COLOURS[key]) return CODE_COLOURS[key];
  let h = 0;
  for (const c of String(key)) h = (h * 31 + c.charCodeAt(0)) >>> 0;
  return PALETTE[h % PALETTE.length];
}

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

function label(iso, bucketSeconds) {
  const d = new Date(iso);
  const p = (n) => String(n).padStart(2, '0');
  if (bucketSeconds >= 86400) return `${d.getMonth() + 1}/${d.getDate()}`;
  return `${p(d.getHours())}:${p(d.getMinutes())}`;
}

// The chart of a GET /api/v1/stats answer; `title` names it for screen readers.
export function stackedBars(stats, title) {
  const W = 720;
  const H = 200;
  const left = 44;
  const bottom = 22;
  const top = 8;
  const keys = stats.groups.map((g) => g.key);
  if (stats.other) keys.push('other');
  const totals = stats.buckets.map((b) => Object.values(b.counts).reduce((a, n) => a + n, 0));
  const max = Math.max(1, ...totals);
  const n = stats.buckets.length || 1;
  const slot = (W - left - 4) / n;
  const barW = Math.max(1, slot * 0.8);
  const y = (v) => top + (H - top - bottom) * (1 - v / max);
  const titleId = `chart-title-${Math.random().toString(36).slice(2)}`;
  const descId = `${titleId}-desc`;
  const root = svg('svg', { viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-labelledby': `${titleId} ${descId}`, class: 'chart' });
  root.append(svg('title', { id: titleId }, title));
  const described = stats.groups.map((g) => `${g.key}: ${g.total}`).join(', ');
  root.append(svg('desc', { id: descId }, stats.total ? `${stats.total} records; ${described}` : 'no records in this window'));
  // Grid and the y axis: 0, half, max.
  for (const v of [0, max / 2, max]) {
    root.append(svg('line', { x1: left, x2: W, y1: y(v), y2: y(v), class: 'grid' }));
    root.append(svg('text', { x: left - 6, y: y(v) + 4, 'text-anchor': 'end', class: 'axis' }, Number.isInteger(v) ? v : v.toFixed(1)));
  }
  const every = Math.max(1, Math.ceil(n / 8));
  stats.buckets.forEach((b, i) => {
    const x = left + i * slot + (slot - barW) / 2;
    const g = svg('g', { class: 'bar' });
    let base = 0;
    for (const key of keys) {
      const v = b.counts[key] || 0;
      if (!v) continue;
      g.append(svg('rect', { x, y: y(base + v), width: barW, height: Math.max(0.5, y(base) - y(base + v)), fill: colour(key), 'data-key': key }));
      base += v;
    }
    const parts = keys.filter((k) => b.counts[k]).map((k) => `${k}: ${b.counts[k]}`);
    g.append(svg('title', {}, `${label(b.time, stats.bucketSeconds)}  ${parts.length ? parts.join(', ') : 'no records'}`));
    root.append(g);
    if (i % every === 0) {
      root.append(svg('text', { x: x + barW / 2, y: H - 6, 'text-anchor': 'middle', class: 'axis' }, label(b.time, stats.bucketSeconds)));
    }
  });
  return root;
}
