// granule dashboard. Starts from the data the server put in the page (#boot: the
// snapshot and the default job's fragments, so the first render needs no request),
// then reads /api/status (pushed by /api/events, polled when the stream fails) and
// /api/fragments for the selected job. Every region is rebuilt as one
// string and set with a single innerHTML; every API string goes through esc().
'use strict';

const $ = (id) => document.getElementById(id);
const ESC = { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' };
const esc = (s) => String(s ?? '').replace(/[&<>"']/g, (c) => ESC[c]);
const cls = (s) => (/^[a-z]+$/.test(s) ? s : 'other'); // enum word as a CSS class

// When this script began to run: what the browser took before is its own loading.
const SCRIPT_START = performance.now();
const PALETTE = ['#4e79a7', '#59a14f', '#b07aa1', '#76b7b2', '#edc948', '#9c755f', '#ff9da7', '#f28e2b', '#86bcb6', '#bab0ac'];
const WINDOW_MS = 5 * 60e3;      // timeline: the last 5 minutes at most
const ERR_WINDOW_MS = 10 * 60e3; // predictor error chart
const RATE_WINDOW_MS = 10e3;     // rate: change of `done` over this long
const FRAG_LIMIT = 5000;
const MAX_FINISHED = 20;         // finished jobs shown (newest first)
const MAX_EXITED = 20;           // exited workers shown

const S = {
  status: null, skew: 0, updated: 0,
  sse: false, polling: false, pollOk: null,
  selected: null,                    // job picked by the user; null: the default
  frags: null, fragsJob: null, fragsReq: undefined, fragsErr: null, win: null,
  rates: new Map(),                  // "job/stage" -> [{t, done}]
  errs: new Map(),                   // "job/stage" -> [[t, percent]]
  rendered: false, booting: false,
};
const now = () => Date.now() + S.skew; // the server's clock

// ---- formatting -------------------------------------------------------------
function fmtDur(ms) {
  if (ms == null || !isFinite(ms)) return '—';
  let s = Math.max(0, Math.round(ms / 1000));
  if (s < 60) return s + 's';
  const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
  s %= 60;
  return d ? `${d}d ${h}h` : h ? `${h}h ${m}m` : `${m}m ${s}s`;
}
// By hand, not Intl: loading the locale data costs a busy machine 100 ms per page load.
const pad2 = (n) => String(n).padStart(2, '0');
const fmtTime = (ms) => {
  const d = new Date(ms);
  return `${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}`;
};
const fmtInt = (n) => String(Math.round(Number(n))).replace(/\B(?=(\d{3})+(?!\d))/g, ',');
const cmp = (a, b) => (a < b ? -1 : a > b ? 1 : 0); // ids and class names: plain order

// Chart widths come from a ResizeObserver, so drawing never forces a layout. Before
// the first layout, a guess from the window's outer width (innerWidth would force a
// layout) less a scrollbar and the page's and the card's padding; if the guess was
// wrong, the observer's first report redraws the chart before the first paint.
const widths = { laid: {}, drawn: {} };
function drawnAt(id) {
  return (widths.drawn[id] = Math.max(400, widths.laid[id] || (outerWidth || 1000) - 85));
}
const fmtRate = (r) => (r >= 100 ? fmtInt(Math.round(r)) : r.toFixed(r >= 10 ? 1 : 2));
// table helpers: a header from names (">" first: right-aligned), a numeric cell
const thead = (cols) => '<thead><tr>' + cols.map((c) => (c[0] === '>' ? `<th class="r">${c.slice(1)}</th>` : `<th>${c}</th>`)).join('') + '</tr></thead>';
const num = (v) => `<td class="r num">${v}</td>`;
const fmtUs = (us) => (us >= 1000 ? fmtInt(Math.round(us)) : us.toFixed(us >= 10 ? 1 : 2));

// ---- jobs -------------------------------------------------------------------
const finished = (j) => j.state !== 'running';
const sortedJobs = (jobs) => [...jobs].sort((a, b) => finished(a) - finished(b) || b.created_ms - a.created_ms);
function selectedJob() {
  const jobs = S.status?.jobs || [];
  return jobs.find((j) => j.name === S.selected) || sortedJobs(jobs)[0] || null;
}
function stageColor(job, stage) {
  const i = job.stages.findIndex((s) => s.name === stage);
  if (i >= 0) return PALETTE[i % PALETTE.length];
  let h = 0; // a stage the status does not list: a stable colour from its name
  for (const c of stage) h = (h * 31 + c.charCodeAt(0)) >>> 0;
  return PALETTE[h % PALETTE.length];
}

// Samples for rates and the error chart, keyed "job/stage", in server time.
function record(st) {
  const t = st.now_ms;
  for (const j of st.jobs) for (const s of j.stages) {
    const k = j.name + '/' + s.name;
    let r = S.rates.get(k);
    if (!r) S.rates.set(k, (r = []));
    if (r.length && s.done < r[r.length - 1].done) r.length = 0; // counters went back: start over
    if (!r.length || t > r[r.length - 1].t) r.push({ t, done: s.done });
    while (r.length > 2 && r[1].t <= t - RATE_WINDOW_MS) r.shift();
    if (s.prediction_error_median != null) {
      let e = S.errs.get(k);
      if (!e) S.errs.set(k, (e = []));
      if (!e.length || t > e[e.length - 1][0]) e.push([t, s.prediction_error_median]);
    }
  }
  for (const [k, r] of S.rates) if (r[r.length - 1].t < t - 60e3) S.rates.delete(k); // gone jobs
  for (const [k, e] of S.errs) {
    while (e.length && e[0][0] < t - ERR_WINDOW_MS) e.shift();
    if (!e.length) S.errs.delete(k);
  }
}
function rateOf(k, s) {
  const r = S.rates.get(k);
  // the server's own rate (its last 30 s of snapshots) until this page has its own
  if ((!r || r.length < 2 || r[r.length - 1].t - r[0].t < 1500) && s?.rate_per_s != null) return s.rate_per_s;
  if (!r || r.length < 2) return null;
  const a = r[0], b = r[r.length - 1], dt = b.t - a.t;
  return dt >= 1500 ? ((b.done - a.done) * 1000) / dt : null;
}

function renderJobs() {
  const st = S.status, sel = selectedJob();
  const jobs = sortedJobs(st.jobs);
  const live = jobs.filter((j) => !finished(j)), old = jobs.filter(finished);
  let h = live.concat(old.slice(0, MAX_FINISHED)).map((j) => jobHtml(j, j === sel, st)).join('');
  if (old.length > MAX_FINISHED) h += `<p class="muted">${old.length - MAX_FINISHED} older finished jobs not shown</p>`;
  $('jobs').innerHTML = h || '<section class="card muted">No jobs yet.</section>';
  // the selector: rebuilt only when the list of jobs changes (keeps it usable)
  const sel$ = $('job-select'), key = jobs.map((j) => j.name).join('\n');
  if (sel$.dataset.key !== key) {
    sel$.innerHTML = jobs.map((j) => `<option value="${esc(j.name)}">${esc(j.name)}</option>`).join('');
    sel$.dataset.key = key;
  }
  if (sel) sel$.value = sel.name;
}
function jobHtml(j, sel, st) {
  const rows = j.stages.map((s) => stageRow(j, s, st)).join('');
  return `<section class="card job${sel ? ' sel' : ''}">
<h2><a href="#" class="jobname" data-job="${esc(j.name)}" title="show its fragments">${esc(j.name)}</a>
<span class="badge ${cls(j.state)}">${esc(j.state)}</span>
<span class="muted small">submitted ${fmtTime(j.created_ms)}${sel ? ' · in the timeline' : ''}</span></h2>
${j.error ? `<div class="error">${esc(j.error)}</div>` : ''}
${rows ? `<table>${thead(['stage', 'state', 'progress', '>done / items', '>rate', '>ETA', '>fragment size', '>µs/item', 'deadline'])}<tbody>${rows}</tbody></table>` : ''}</section>`;
}
function stageRow(j, s, st) {
  const k = j.name + '/' + s.name, n = s.items || 0;
  const left = Math.max(0, n - s.done - s.quarantined), r = rateOf(k, s);
  const eta = s.state === 'done' ? 'done' : s.state === 'skipped' ? 'skipped' : r > 0 ? fmtDur((left / r) * 1000) : '—';
  const pct = (x) => (n ? Math.min(100, (100 * x) / n) : 0);
  const d = pct(s.done), q = pct(s.quarantined), ru = pct(s.running);
  // an SVG bar: widths are attributes, so no inline styles are needed
  const bar = `<svg class="bar" viewBox="0 0 100 10" preserveAspectRatio="none"><title>${fmtInt(s.done)} done, ${fmtInt(s.quarantined)} quarantined, ${fmtInt(s.running)} running, ${fmtInt(s.pending)} pending</title>
<rect class="b-done" width="${d}" height="10"/><rect class="b-q" x="${d}" width="${q}" height="10"/><rect class="b-run" x="${d + q}" width="${ru}" height="10"/></svg>`;
  let verdict = st.verdicts?.[k];
  if (!verdict && s.needs?.deadline_ms != null) verdict = `deadline ${fmtDur(s.needs.deadline_ms)} after submission`;
  return `<tr><td>${esc(s.name)}</td><td><span class="badge ${cls(s.state)}">${esc(s.state)}</span></td>
<td class="barcol">${bar}</td>
${num(`${fmtInt(s.done)} / ${fmtInt(n)}${s.quarantined ? ` <span class="q">(${fmtInt(s.quarantined)} quarantined)</span>` : ''}`)}
${num(r == null || s.state === 'done' || s.state === 'skipped' ? '—' : r ? fmtRate(r) + '/s' : '0/s')}${num(eta)}
${num(s.fragment_size ? `last fragment ${fmtInt(s.fragment_size)} item${s.fragment_size === 1 ? '' : 's'}` : '—')}${num(s.item_cost_us ? fmtUs(s.item_cost_us) : '—')}
<td class="verdict">${verdict ? esc(verdict) : ''}</td></tr>`;
}

// ---- timeline -----------------------------------------------------------------
// Tick times for an axis from t0 to t1 with at most n ticks.
function ticks(t0, t1, n) {
  const steps = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600].map((s) => s * 1000);
  const step = steps.find((s) => (t1 - t0) / s <= n) || 86400e3;
  const out = [];
  for (let t = Math.ceil(t0 / step) * step; t <= t1; t += step) out.push(t);
  return out;
}
const r1 = (v) => v.toFixed(1);
const shortId = (id) => (id.length > 26 ? id.slice(0, 15) + '…' + id.slice(-9) : id);

function renderTimeline() {
  const box = $('timeline-box'), job = selectedJob();
  const W = drawnAt('timeline-box');
  if (!job || !S.frags || S.fragsJob !== job.name) {
    const msg = !job ? 'no job yet' : S.fragsErr ? 'fragments unavailable: ' + S.fragsErr : 'loading…';
    // one fragment a line: the DOM dump stays greppable (grep -c 'class="frag')
  box.innerHTML = `<svg id="timeline" width="${W}" height="30"><text x="8" y="19">${esc(msg)}</text></svg>`;
    $('tl-info').textContent = '';
    $('tl-legend').innerHTML = '';
    return;
  }
  const [t0, t1] = S.win, frags = S.frags;
  // one lane per worker: live workers, and any worker with a fragment in the window
  const lanes = new Map();
  const lane = (id, c) => lanes.get(id) || lanes.set(id, { id, c, ends: [], items: [] }).get(id);
  for (const w of S.status.workers) if (w.state !== 'exited') lane(w.id, w.class);
  frags.forEach((f, i) => {
    const end = f.finished_ms ?? t1;
    if (end < t0) return;
    const L = lane(f.worker, f.class);
    // a worker runs several slots: stack overlapping fragments in sub-rows
    let row = L.ends.findIndex((e) => e <= f.claimed_ms);
    if (row < 0) row = L.ends.push(0) - 1;
    L.ends[row] = Math.max(end, f.claimed_ms + 1);
    L.items.push([i, row, Math.max(f.claimed_ms, t0), end]);
  });
  const order = [...lanes.values()].sort((a, b) => cmp(a.c, b.c) || cmp(a.id, b.id));

  const LBL = 210, R = 14, AX = 22, plotW = W - LBL - R;
  const x = (t) => LBL + ((t - t0) / (t1 - t0)) * plotW;
  const out = [], marks = [];
  let y = 0;
  order.forEach((L, li) => {
    const rows = Math.max(1, L.ends.length), rh = rows <= 2 ? 12 : rows <= 4 ? 10 : rows <= 8 ? 7 : Math.max(3, Math.floor(56 / rows));
    const h = Math.max(22, rows * rh + 6), top = y + (h - rows * rh) / 2;
    out.push(`<rect class="lane${li % 2 ? ' odd' : ''}" x="0" y="${y}" width="${W}" height="${h}"/>`,
      `<text x="6" y="${y + h / 2 + 4}"><title>${esc(L.id)}</title>${esc(shortId(L.id))} <tspan class="cls">${esc(L.c)}</tspan></text>`);
    for (const [i, row, a, b] of L.items) {
      const f = frags[i], xa = x(a), w = Math.max(1, x(b) - xa), ry = top + row * rh, xb = r1(xa + w), cy = ry + rh / 2;
      const geo = `x="${r1(xa)}" y="${r1(ry)}" width="${r1(w)}" height="${rh - 1}"`;
      out.push(`<rect class="frag ${cls(f.state)}" data-i="${i}" ${geo} fill="${stageColor(job, f.stage)}"/>`);
      if (f.state === 'lost') marks.push(`<rect class="hatch" ${geo}/>`);
      if (f.state === 'failed') marks.push(`<text class="mk-fail" x="${xb}" y="${r1(cy + 3.5)}" text-anchor="middle">✕</text>`);
      if (f.splits > 0) marks.push(`<path class="mk-split" d="M${xb} ${r1(cy - 4)}l5 3.5l-5 3.5z"/>`);
    }
    y += h;
  });
  const H = y + AX, grid = [];
  for (const t of ticks(t0, t1, Math.max(2, Math.floor(plotW / 90)))) {
    grid.push(`<line class="grid" x1="${x(t)}" x2="${x(t)}" y1="0" y2="${y}"/>`);
    if (x(t) < W - 26) grid.push(`<text x="${x(t)}" y="${y + 15}" text-anchor="middle">${fmtTime(t)}</text>`);
  }
  // one fragment a line: the DOM dump stays greppable (grep -c 'class="frag')
  box.innerHTML = `<svg id="timeline" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}">
<defs><pattern id="hatch" width="5" height="5" patternUnits="userSpaceOnUse" patternTransform="rotate(45)"><rect width="2" height="5" fill="#333" fill-opacity=".6"/></pattern></defs>
${out.join('\n')}${grid.join('')}<line class="axis" x1="${LBL}" x2="${W - R}" y1="${y}" y2="${y}"/>
<line class="now" x1="${x(t1)}" x2="${x(t1)}" y1="0" y2="${y}"/>${marks.join('')}</svg>`;

  const more = frags.length >= FRAG_LIMIT ? ` (the newest ${FRAG_LIMIT} only)` : '';
  $('tl-info').textContent = `${fmtInt(frags.length)} fragments of ${job.name} since ${fmtTime(t0)}${more}`;
  // legend: stage colours, then outcome marks drawn as the timeline draws them
  const box1 = (c, fill, w = 20) => `<rect class="${c}" x="1" y="1" width="${w}" height="10" fill="${fill}"/>`;
  const stages = [...new Set(job.stages.map((s) => s.name).concat(frags.map((f) => f.stage)))];
  $('tl-legend').innerHTML = [...stages.map((s) => [esc(s), box1('', stageColor(job, s))]),
    ['running (pale)', box1('frag running', '#888')],
    ['failed', box1('frag failed', '#ccc') + '<text class="mk-fail" x="21" y="10" text-anchor="middle">✕</text>'],
    ['yielded', box1('frag yielded', '#ccc')],
    ['split (gave its tail away)', box1('frag', '#ccc', 16) + '<path class="mk-split" d="M17 2.5l5 3.5l-5 3.5z"/>'],
    ['lost', box1('frag lost', '#ccc') + box1('hatch', '')],
    ['cancelled / reverted', box1('frag cancelled', '#888')],
  ].map(([t, s]) => `<span><svg viewBox="0 0 22 12">${s}</svg>${t}</span>`).join('');
}

// Hover over a fragment: details in a floating tip (no per-rect <title> nodes).
function onTip(e) {
  const tip = $('tip'), i = e.target.dataset?.i, f = i != null && S.frags?.[i];
  if (!f) { tip.hidden = true; return; }
  const ms = (v) => (v == null ? '—' : fmtDur(v) + (v < 60e3 ? ` (${Math.round(v)} ms)` : ''));
  tip.textContent = `#${f.id} ${f.stage}  items ${f.start_idx}–${f.end_idx} (${f.items}, ${f.acked} acked)\n` +
    `${f.worker} (${f.class})\n${f.state}${f.cause ? ': ' + f.cause : ''}${f.splits ? `, split ${f.splits}×` : ''}\n` +
    `claimed ${fmtTime(f.claimed_ms)}, predicted ${ms(f.predicted_ms)}, observed ${ms(f.observed_ms)}`;
  tip.hidden = false;
  tip.style.left = Math.min(e.clientX + 14, innerWidth - tip.offsetWidth - 8) + 'px';
  tip.style.top = e.clientY + 14 + 'px';
}

// ---- predictor error chart ------------------------------------------------------
function renderErrors() {
  const box = $('errors-box'), job = selectedJob();
  const W = drawnAt('errors-box'), H = 160, L = 44, R = 150, T = 10, B = 22;
  const t1 = S.status.now_ms, t0 = t1 - ERR_WINDOW_MS;
  const series = (job?.stages || []).map((s) => ({ s: s.name, c: stageColor(job, s.name), p: S.errs.get(job.name + '/' + s.name) || [] })).filter((x) => x.p.length);
  if (!series.length) {
    box.innerHTML = `<svg id="errors" width="${W}" height="30"><text x="8" y="19">no prediction error yet (a stage shows one after its first 20 finished fragments)</text></svg>`;
    return;
  }
  let max = 10;
  for (const x of series) for (const [, v] of x.p) max = Math.max(max, v);
  const step = [5, 10, 20, 25, 50, 100, 200, 500, 1000].find((s) => max / s <= 4) || Math.ceil(max / 4);
  max = Math.ceil(max / step) * step;
  const px = (t) => L + ((t - t0) / (t1 - t0)) * (W - L - R), py = (v) => T + (1 - v / max) * (H - T - B);
  const g = [];
  for (let v = 0; v <= max; v += step) g.push(`<line class="grid" x1="${L}" x2="${W - R}" y1="${py(v)}" y2="${py(v)}"/><text x="${L - 4}" y="${py(v) + 4}" text-anchor="end">${v}%</text>`);
  for (const t of ticks(t0, t1, Math.floor((W - L - R) / 90))) g.push(`<text x="${px(t)}" y="${H - 6}" text-anchor="middle">${fmtTime(t)}</text>`);
  series.forEach((x, k) => {
    const pts = x.p.map(([t, v]) => `${px(t).toFixed(1)},${py(v).toFixed(1)}`), [lt, lv] = x.p[x.p.length - 1];
    g.push(`<polyline points="${pts.join(' ')}" fill="none" stroke="${x.c}" stroke-width="1.8"/>`,
      `<circle cx="${px(lt)}" cy="${py(lv)}" r="2.5" fill="${x.c}"/>`,
      `<text x="${W - R + 8}" y="${T + 10 + k * 15}"><tspan fill="${x.c}">■</tspan> ${esc(x.s)} ${lv.toFixed(1)}%</text>`);
  });
  box.innerHTML = `<svg id="errors" width="${W}" height="${H}">${g.join('')}<line class="axis" x1="${L}" x2="${W - R}" y1="${H - B}" y2="${H - B}"/></svg>`;
}

// ---- workers and pools ------------------------------------------------------------
function renderWorkers() {
  const st = S.status;
  const ws = [...st.workers].sort((a, b) => (a.state === 'exited') - (b.state === 'exited') || cmp(a.class, b.class) || cmp(a.id, b.id));
  const gone = ws.filter((w) => w.state === 'exited').length, shown = ws.slice(0, ws.length - gone + Math.min(gone, MAX_EXITED));
  const life = (v) => (v == null ? '—' : v < 0 ? 'ended' : fmtDur(v));
  let h = shown.length ? `<table>${thead(['worker', 'class', 'state', '>busy / slots', '>lifespan left', '>last heard', '>fragments done', '>cost/h', 'spot', 'allocation'])}<tbody>` +
    shown.map((w) => `<tr><td>${esc(w.id)}</td><td>${esc(w.class)}</td><td><span class="badge ${cls(w.state)}">${esc(w.state)}</span></td>
${num(`${+w.busy} / ${+w.slots}`)}${num(life(w.lifespan_left_ms))}
<td class="r num${w.state !== 'exited' && w.heartbeat_age_ms > 30e3 ? ' stale' : ''}">${fmtDur(w.heartbeat_age_ms)} ago</td>
${num(fmtInt(w.fragments_done))}${num(w.cost_per_hour ? w.cost_per_hour.toFixed(2) : '—')}
<td>${w.spot ? 'spot' : '—'}</td><td>${w.allocation ? esc(w.allocation) : '—'}</td></tr>`).join('') + '</tbody></table>'
    : '<p class="muted">No workers.</p>';
  if (gone > MAX_EXITED) h += `<p class="muted small">${gone - MAX_EXITED} more exited workers not shown</p>`;
  if (st.pool?.length) h += '<p class="muted small">Forecast (10 min ahead): ' + st.pool.map((p) =>
    `${esc(p.class)}${p.spot ? ' (spot)' : ''} ${p.slots_now.toFixed(0)} → ${p.slots_ahead.toFixed(1)} slots, ${p.losses_per_hour.toFixed(2)} lost/h`).join(' · ') + '</p>';
  $('workers').innerHTML = h;

  const pools = st.pools || [];
  $('pools-card').hidden = !pools.length;
  if (pools.length) $('pools').innerHTML = `<table>${thead(['pool', 'provider', 'class', '>wanted', '>pending', '>running', '>draining', '>started', 'last error'])}<tbody>` +
    pools.map((p) => `<tr><td>${esc(p.name)}</td><td>${esc(p.provider)}</td><td>${esc(p.class)}</td>${[p.wanted, p.pending, p.running, p.draining].map((v) => num(+v)).join('')}${num(fmtInt(p.launched))}
<td>${p.last_error ? `<span class="q">${esc(p.last_error[0])}</span> <span class="muted small">${fmtDur(st.now_ms - p.last_error[1])} ago</span>` : '—'}</td></tr>`).join('') + '</tbody></table>';
}

// ---- data flow ------------------------------------------------------------------
function renderHeader() {
  const mode = S.sse ? 'connected' : S.pollOk === false ? 'disconnected' : S.polling ? 'polling' : 'connecting';
  $('live').className = 'live ' + mode;
  $('live-text').textContent = mode;
  $('updated').textContent = S.updated ? 'updated ' + fmtTime(S.updated) : '';
}
function onStatus(st) {
  if (S.status && st.now_ms < S.status.now_ms) return; // a late, older answer
  S.status = st; S.skew = st.now_ms - Date.now(); S.updated = Date.now();
  record(st);
  renderHeader(); renderJobs(); renderErrors(); renderWorkers();
  const job = selectedJob();
  if (S.fragsReq === undefined || (job?.name ?? null) !== S.fragsReq) pollFragments(); // first status, or another default job
  maybeRendered();
}
async function fetchStatus() {
  try {
    const r = await fetch('api/status', { cache: 'no-store' });
    if (!r.ok) throw new Error('HTTP ' + r.status);
    const st = await r.json();
    S.pollOk = true;
    onStatus(st);
  } catch (e) {
    S.pollOk = false;
    renderHeader();
  }
}
let pollTimer = null;
function startPolling() {
  S.sse = false;
  if (!pollTimer) pollTimer = setInterval(fetchStatus, 2000);
  S.polling = true;
  renderHeader();
}
// The stream when it works; on an error, poll every 2 s and try the stream again in 30 s.
function openStream() {
  const es = new EventSource('api/events');
  es.onopen = () => {
    S.sse = true; S.polling = false;
    clearInterval(pollTimer); pollTimer = null;
    renderHeader();
  };
  es.addEventListener('status', (e) => {
    try { onStatus(JSON.parse(e.data)); } catch (err) { console.error('bad status event', err); }
  });
  es.onerror = () => { es.close(); startPolling(); setTimeout(openStream, 30e3); };
}
// `?poll=1` polls instead of streaming: for proxies that buffer event streams, and
// for headless browsers, whose virtual clock stands still while a stream is open.
function connect() {
  if (!boot()) fetchStatus(); // first paint without waiting for the stream
  const poll = new URLSearchParams(location.search).has('poll');
  if (window.EventSource && !poll) openStream(); else startPolling();
}

let fragTimer = null, fragSeq = 0;
// The timeline's window: a running job's is [t0, now]; an ended job's its whole
// life, from its first claim to its last end.
function setFrags(name, running, t0, t1, frags) {
  let win = [t0, t1];
  if (!running && frags.length) {
    const first = Math.min(...frags.map((f) => f.claimed_ms));
    const last = Math.max(...frags.map((f) => f.finished_ms ?? f.claimed_ms));
    win = [first, Math.max(last, first + 1000)];
  }
  Object.assign(S, { frags, fragsJob: name, fragsReq: name, win, fragsErr: null });
}
async function pollFragments() {
  clearTimeout(fragTimer);
  const job = selectedJob(), seq = ++fragSeq;
  S.fragsReq = job?.name ?? null;
  if (job) {
    // running: the last 5 minutes or since the job started, whichever is shorter
    // (10 s at least); ended: its whole life (as the server's default_timeline)
    const running = job.state === 'running';
    const t1 = now(), t0 = running
      ? Math.floor(Math.min(Math.max(t1 - WINDOW_MS, job.created_ms), t1 - 10e3))
      : job.created_ms;
    try {
      const r = await fetch(`api/fragments?job=${encodeURIComponent(job.name)}&since_ms=${t0}&limit=${FRAG_LIMIT}`, { cache: 'no-store' });
      if (!r.ok) throw new Error('HTTP ' + r.status);
      const data = await r.json();
      if (seq !== fragSeq) return; // superseded (another job was picked meanwhile)
      setFrags(job.name, running, t0, t1, data.fragments || []);
    } catch (e) {
      if (seq !== fragSeq) return;
      S.fragsErr = e.message || String(e);
    }
  }
  renderTimeline();
  maybeRendered();
  fragTimer = setTimeout(pollFragments, 2000);
}
// The first render from the data in the page; false when there is none (a page
// saved or served without it), and the first render waits for the API.
function boot() {
  let b;
  try { b = JSON.parse($('boot')?.textContent || 'null'); } catch (e) { return false; }
  if (!b?.status?.jobs) return false;
  S.booting = true; // one render mark, after the timeline too
  const f = b.fragments;
  if (f) setFrags(f.job, f.running, f.since_ms, b.status.now_ms, f.rows || []);
  S.pollOk = true;
  onStatus(b.status); // asks for fragments only if the default job is not f.job
  S.booting = false;
  if (f && S.fragsJob === f.job) {
    renderTimeline();
    fragTimer = setTimeout(pollFragments, 2000);
  }
  maybeRendered();
  return true;
}
function maybeRendered() {
  if (S.rendered || S.booting || !S.status) return;
  if (selectedJob() && S.fragsJob == null && !S.fragsErr) return; // wait for the fragments
  S.rendered = true;
  // Timed at the paint that shows it: the next frame, and what runs right after it.
  const mark = () => {
    const now = performance.now();
    $('render-ms').textContent = `rendered in ${Math.round(now)} ms (${Math.round(now - SCRIPT_START)} ms after the script started)`;
    document.body.dataset.rendered = '1';
  };
  if (document.hidden) mark(); // no frames in a hidden tab
  else requestAnimationFrame(() => setTimeout(mark, 0));
}
function select(name) {
  if (!name || name === selectedJob()?.name) return;
  S.selected = name;
  renderJobs(); renderErrors(); renderTimeline(); // shows "loading…" until its fragments come
  pollFragments();
}

// Job names select the job (pointerdown too: the list is rebuilt every second,
// which can swallow a click whose press and release land on different nodes).
for (const ev of ['pointerdown', 'click']) {
  $('jobs').addEventListener(ev, (e) => {
    const a = e.target.closest('[data-job]');
    if (a && (ev === 'click' || e.button === 0)) { e.preventDefault(); select(a.dataset.job); }
  });
}
$('job-select').addEventListener('change', (e) => select(e.target.value));
$('timeline-box').addEventListener('mousemove', onTip);
$('timeline-box').addEventListener('mouseleave', () => { $('tip').hidden = true; });
// A chart is redrawn when its box's laid-out width differs from the one it was drawn at.
if (window.ResizeObserver) {
  const ro = new ResizeObserver((entries) => {
    for (const e of entries) {
      const id = e.target.id, w = Math.round(e.contentRect.width);
      if (!w || w === widths.laid[id]) continue;
      widths.laid[id] = w;
      if (S.status && Math.max(400, w) !== widths.drawn[id]) (id === 'timeline-box' ? renderTimeline : renderErrors)();
    }
  });
  for (const id of ['timeline-box', 'errors-box']) ro.observe($(id));
}
connect();
