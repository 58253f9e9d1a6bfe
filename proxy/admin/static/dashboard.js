// Weir dashboard. Plain browser JavaScript, no build step, nothing loaded from elsewhere.
//
// Every second it reads /api/status (what is configured and decided) and /api/history (the
// per-version samples for the charts; after the first read only the newer ones), and updates
// the page in place. Buttons call the admin API with the token typed into the header.
//
// Text from the server (names, hosts, reasons) only ever reaches the page through textContent
// or createTextNode, never as HTML.
'use strict';

(() => {
  const POLL_MS = 1000;
  const TOKEN_KEY = 'weir.admin-token';
  const CONFIRM_MS = 4000;
  const DECISIONS_SHOWN = 6;
  const MIN_SPAN = 30;  // seconds: the narrowest time window a chart shows
  // Distinct on dark and light backgrounds; one per version, in the config's order.
  const PALETTE = ['#4ea1ff', '#f5a524', '#3ddc97', '#ff6b8b', '#b48cff', '#2ec5d3',
                   '#e8d44d', '#ff8f5a'];
  const CHARTS = [
    {key: 'rps', title: 'requests / s', floor: 1, scale: 1, format: (v) => compact(v)},
    {key: 'error_rate', title: 'errors (5xx) %', floor: 1, scale: 100,
     format: (v) => `${trim(v)}%`},
    {key: 'p99', title: 'p99 latency', floor: 10, scale: 1, format: (v) => ms(v)},
  ];
  const HISTORY_FIELDS = ['t', 'rps', 'error_rate', 'p99', 'weight', 'inflight'];

  const $ = (id) => document.getElementById(id);

  // --- small helpers ------------------------------------------------------------------------

  // An element with attributes and children; strings become text nodes, never markup.
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === 'class') el.className = value;
      else if (key === 'text') el.textContent = value;
      else if (key.startsWith('on')) el.addEventListener(key.slice(2), value);
      else el.setAttribute(key, value === true ? '' : String(value));
    }
    append(el, children);
    return el;
  }

  function append(el, children) {
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
  }

  function setChildren(el, ...children) {
    el.replaceChildren();
    append(el, children);
  }

  function trim(v) {
    if (v === 0) return '0';
    const a = Math.abs(v);
    const digits = a >= 100 ? 0 : a >= 10 ? 1 : a >= 1 ? 2 : 3;
    return String(Number(v.toFixed(digits)));
  }

  function compact(v) {
    if (Math.abs(v) >= 1e6) return `${trim(v / 1e6)}M`;
    if (Math.abs(v) >= 1e4) return `${trim(v / 1e3)}k`;
    return trim(v);
  }

  function ms(v) {
    if (v === null || v === undefined) return '–';
    return v >= 1000 ? `${trim(v / 1000)} s` : `${trim(v)} ms`;
  }

  function pct(fraction) {
    if (fraction === null || fraction === undefined) return '–';
    return `${trim(fraction * 100)}%`;
  }

  function rate(v) {
    return v === null || v === undefined ? '–' : trim(v);
  }

  function duration(seconds) {
    if (seconds < 1) return `${Math.round(seconds * 1000)}ms`;
    const parts = [];
    let rest = Math.round(seconds);
    for (const [unit, size] of [['h', 3600], ['m', 60], ['s', 1]]) {
      if (rest >= size) {
        parts.push(`${Math.floor(rest / size)}${unit}`);
        rest %= size;
      }
    }
    return parts.join('');
  }

  function ago(seconds) {
    return seconds >= 120 ? `−${trim(seconds / 60)}m` : `−${Math.round(seconds)}s`;
  }

  function clock(t) {
    return new Date(t * 1000).toLocaleTimeString([], {hour12: false});
  }

  function last(list) {
    return list.length ? list[list.length - 1] : null;
  }

  // --- messages and the token -----------------------------------------------------------------

  let messageTimer = null;

  function showMessage(kind, text) {
    const box = $('message');
    box.className = `banner ${kind}`;
    $('message-text').textContent = text;
    box.hidden = false;
    clearTimeout(messageTimer);
    if (kind === 'ok') messageTimer = setTimeout(() => { box.hidden = true; }, 6000);
  }

  let token = sessionStorage.getItem(TOKEN_KEY) || '';

  function tokenState(kind) {
    const state = $('token-state');
    const words = {
      none: ['no token: read-only', ''],
      set: ['token set', ''],
      accepted: ['token accepted', 'ok'],
      rejected: ['token rejected (401)', 'bad'],
      // A known token whose role is too small for the button: it stays usable for the
      // buttons its role allows.
      limited: ['role too small (403)', 'bad'],
    };
    const [text, cls] = words[kind];
    $('token').placeholder = kind === 'none' ? 'needed for the buttons' : 'type to replace';
    state.textContent = text;
    state.className = `token-state ${cls}`;
    state.dataset.state = kind;
  }

  function setupToken() {
    tokenState(token ? 'set' : 'none');
    $('token-form').addEventListener('submit', (event) => {
      event.preventDefault();
      const input = $('token');
      token = input.value.trim();
      input.value = '';
      if (token) sessionStorage.setItem(TOKEN_KEY, token);
      else sessionStorage.removeItem(TOKEN_KEY);
      tokenState(token ? 'set' : 'none');
    });
    $('token-forget').addEventListener('click', () => {
      token = '';
      sessionStorage.removeItem(TOKEN_KEY);
      tokenState('none');
    });
    $('message-close').addEventListener('click', () => { $('message').hidden = true; });
  }

  // --- actions --------------------------------------------------------------------------------

  async function act(service, path, body, label) {
    const what = `${service}: ${label}`;
    if (!token) {
      showMessage('bad', `${what}: enter the admin token (top right) first.`);
      $('token').focus();
      return;
    }
    let response;
    let data = {};
    try {
      response = await fetch(`/api/services/${encodeURIComponent(service)}/${path}`, {
        method: 'POST',
        headers: {'Authorization': `Bearer ${token}`, 'Content-Type': 'application/json'},
        body: JSON.stringify(body || {}),
        cache: 'no-store',
      });
      data = await response.json().catch(() => ({}));
    } catch (error) {
      showMessage('bad', `${what}: the admin API did not answer (${error.message}).`);
      return;
    }
    if (response.status === 401) {
      tokenState('rejected');
      showMessage('bad', `${what}: 401 Unauthorized: ${data.error || 'wrong token'}. ` +
                         'Enter the right admin token.');
      return;
    }
    if (response.status === 403) {
      tokenState('limited');
      const why = data.error || 'the token\'s role is too small for this';
      showMessage('bad', `${what}: 403 Forbidden: ${why}.`);
      return;
    }
    if (!response.ok) {
      showMessage('bad', `${what}: ${response.status}: ${data.error || response.statusText}`);
      return;
    }
    tokenState('accepted');
    showMessage('ok', `${what}: done.`);
    refreshSoon();
  }

  // A button; with `confirm`, the first click arms it and only a second one within a few
  // seconds acts (for what is hard to undo at 3 a.m.).
  function actionButton(action, label, cls, confirm, run) {
    const button = h('button', {type: 'button', class: cls, 'data-action': action}, label);
    let armed = null;
    const disarm = () => {
      clearTimeout(armed);
      armed = null;
      button.textContent = label;
      button.classList.remove('armed');
    };
    button.addEventListener('click', () => {
      if (confirm && armed === null) {
        button.textContent = confirm;
        button.classList.add('armed');
        armed = setTimeout(disarm, CONFIRM_MS);
        return;
      }
      disarm();
      run();
    });
    return button;
  }

  // --- history --------------------------------------------------------------------------------

  const history = new Map();  // service → Map(version → {t: [], rps: [], ...})
  let historyAfter = 0;       // the newest t held; the next read asks only for later ones
  let historyMeta = {interval: 1, keep_seconds: 300, now: Date.now() / 1000};

  function mergeHistory(data) {
    historyMeta = data;
    const cutoff = data.now - data.keep_seconds;
    for (const name of history.keys()) {
      if (!(name in data.services)) history.delete(name);
    }
    for (const [name, service] of Object.entries(data.services)) {
      if (!history.has(name)) history.set(name, new Map());
      const versions = history.get(name);
      for (const version of versions.keys()) {
        if (!(version in service.versions)) versions.delete(version);
      }
      for (const [version, columns] of Object.entries(service.versions)) {
        if (!versions.has(version)) {
          versions.set(version, Object.fromEntries(HISTORY_FIELDS.map((f) => [f, []])));
        }
        const held = versions.get(version);
        const newest = last(held.t) ?? -Infinity;
        columns.t.forEach((t, i) => {
          if (t <= newest) return;
          for (const field of HISTORY_FIELDS) held[field].push(columns[field][i]);
          historyAfter = Math.max(historyAfter, t);
        });
        let old = 0;
        while (old < held.t.length && held.t[old] < cutoff) old += 1;
        if (old) for (const field of HISTORY_FIELDS) held[field].splice(0, old);
      }
    }
  }

  // --- charts ---------------------------------------------------------------------------------

  function niceCeiling(v) {
    const power = 10 ** Math.floor(Math.log10(v));
    for (const step of [1, 2, 2.5, 5, 10]) {
      if (v <= step * power) return step * power;
    }
    return 10 * power;
  }

  function themeColours() {
    const style = getComputedStyle(document.documentElement);
    const read = (name) => style.getPropertyValue(name).trim();
    return {grid: read('--grid'), muted: read('--muted')};
  }

  // One small time chart: every version's line over the kept window, y from 0 to a round
  // number above the highest value. Samples further apart than a few intervals are not joined,
  // and a version with no value (no requests) leaves a gap rather than drawing a zero.
  function drawChart(canvas, spec, lines) {
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth || 300;
    const height = canvas.clientHeight || 120;
    if (canvas.width !== Math.round(width * ratio)) canvas.width = Math.round(width * ratio);
    if (canvas.height !== Math.round(height * ratio)) canvas.height = Math.round(height * ratio);
    const ctx = canvas.getContext('2d');
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);

    // The window is the history there is (at least MIN_SPAN, at most what the server keeps),
    // so that a freshly started Weir's first minute is not a sliver at the right edge.
    const end = historyMeta.now;
    let earliest = end;
    for (const line of lines) if (line.t.length) earliest = Math.min(earliest, line.t[0]);
    const span = Math.min(historyMeta.keep_seconds, Math.max(MIN_SPAN, end - earliest));
    const start = end - span;
    const gap = historyMeta.interval * 3.5;
    const pad = {left: 52, right: 10, top: 8, bottom: 18};
    const w = width - pad.left - pad.right;
    const hgt = height - pad.top - pad.bottom;
    let highest = 0;
    for (const line of lines) {
      line.values.forEach((v, i) => {
        if (v !== null && line.t[i] >= start) highest = Math.max(highest, v * spec.scale);
      });
    }
    const top = niceCeiling(Math.max(highest, spec.floor));
    const x = (t) => pad.left + ((t - start) / (end - start)) * w;
    const y = (v) => pad.top + hgt * (1 - v / top);

    const theme = themeColours();
    ctx.lineWidth = 1;
    ctx.font = '11px system-ui, sans-serif';
    ctx.fillStyle = theme.muted;
    ctx.strokeStyle = theme.grid;
    ctx.textBaseline = 'middle';
    ctx.textAlign = 'right';
    for (const share of [0, 0.5, 1]) {
      const at = Math.round(y(top * share)) + 0.5;
      ctx.beginPath();
      ctx.moveTo(pad.left, at);
      ctx.lineTo(pad.left + w, at);
      ctx.stroke();
      ctx.fillText(spec.format(top * share), pad.left - 6, at);
    }
    ctx.textBaseline = 'alphabetic';
    ctx.textAlign = 'left';
    ctx.fillText(ago(span), pad.left, height - 4);
    ctx.textAlign = 'center';
    ctx.fillText(ago(span / 2), pad.left + w / 2, height - 4);
    ctx.textAlign = 'right';
    ctx.fillText('now', pad.left + w, height - 4);

    const drawn = {};
    ctx.lineWidth = 2;
    ctx.lineJoin = 'round';
    for (const line of lines) {
      ctx.strokeStyle = line.colour;
      ctx.fillStyle = line.colour;
      ctx.beginPath();
      let previous = null;
      let count = 0;
      let newest = null;
      line.values.forEach((v, i) => {
        const t = line.t[i];
        if (v === null || t < start) {
          previous = null;
          return;
        }
        const px = x(t);
        const py = y(v * spec.scale);
        if (previous === null || t - previous > gap) ctx.moveTo(px, py);
        else ctx.lineTo(px, py);
        previous = t;
        count += 1;
        newest = [px, py];
      });
      ctx.stroke();
      if (newest) {  // the latest value as a dot: also makes a lone sample visible
        ctx.beginPath();
        ctx.arc(newest[0], newest[1], 2.5, 0, 2 * Math.PI);
        ctx.fill();
      }
      drawn[line.name] = count;
    }
    // What was drawn, per version: handy when debugging and read by the browser test.
    canvas.dataset.points = JSON.stringify(drawn);
  }

  // --- rendering ------------------------------------------------------------------------------

  const cards = new Map();  // service name → {key, el, refs}

  function stepText(step) {
    if (step.set_weight !== undefined) return `set canary weight to ${step.set_weight}%`;
    if (step.pause !== undefined) {
      if (step.pause.duration) return `pause ${duration(step.pause.duration)}`;
      return 'pause until promoted' +
             (step.pause.timeout ? ` (abort after ${duration(step.pause.timeout)})` : '');
    }
    if (step.gate !== undefined) {
      return `gate: wait for a 2xx from ${step.gate.url}` +
             (step.gate.timeout ? ` (abort after ${duration(step.gate.timeout)})` : '');
    }
    if (step.webhook !== undefined) return `webhook check: ${step.webhook.url}`;
    if (step.mirror !== undefined) {
      return `mirror ${step.mirror.percent}% of requests to the canary for ` +
             `${duration(step.mirror.duration)}, no user on it`;
    }
    if (step.analysis !== undefined) {
      return `analysis over ${duration(step.analysis.interval)} ` +
             `(at least ${step.analysis.min_requests} requests)`;
    }
    return JSON.stringify(step);
  }

  // Where a gate or webhook step stands: its checks so far and the last answer.
  function stepState(state) {
    if (!state) return '';
    if (state.kind === 'gate') {
      const last = state.last_status === undefined ? ''
        : `, last answered ${state.last_status || 'nothing'}`;
      return ` — ${state.checks} check(s)${last}`;
    }
    if (state.kind === 'mirror') return ` — copies since ${clock(state.since)}`;
    if (state.kind === 'webhook') {
      return state.status === undefined ? ' — waiting for its answer'
                                        : ` — answered ${state.status || 'nothing'}`;
    }
    return '';
  }

  function rolloutSteps(rollout) {
    if (rollout.strategy === 'blue_green') {
      return ['pre-promotion checks on the preview colour', 'wait for promotion',
              'switched: post-promotion analysis'];
    }
    return rollout.steps.map(stepText);
  }

  function buildCard(service) {
    const name = service.name;
    const versions = Object.keys(service.versions);
    const refs = {rows: new Map(), canvases: [], versions};

    const select = h('select', {'aria-label': `version to switch ${name} to`,
                                'data-role': 'switch-to'},
                     versions.map((v) => h('option', {value: v}, v)));
    const switchButton = actionButton('switch', 'Switch', 'danger',
      'Confirm switch', () => act(name, 'switch', {to: select.value},
                                  `switch all traffic to ${select.value}`));
    refs.select = select;

    const head = h('div', {class: 'service-head'},
      h('h2', {}, name),
      refs.match = h('span', {class: 'muted'}),
      refs.source = h('span', {class: 'muted'}),
      h('span', {class: 'switch'}, h('span', {class: 'muted'}, 'all traffic to'), select,
        switchButton));

    const tbody = h('tbody');
    versions.forEach((version, index) => {
      const colour = PALETTE[index % PALETTE.length];
      const swatch = h('span', {class: 'swatch'});
      swatch.style.background = colour;
      const fill = h('span');
      fill.style.background = colour;
      const row = {
        tags: h('span'),
        fill,
        weight: h('span', {class: 'num'}),
        rps: h('td', {class: 'num'}),
        errors: h('td', {class: 'num'}),
        p99: h('td', {class: 'num'}),
        inflight: h('td', {class: 'num'}),
        health: h('div', {class: 'chips'}),
      };
      refs.rows.set(version, row);
      tbody.append(h('tr', {'data-version': version},
        h('td', {}, swatch, version, row.tags),
        h('td', {}, h('div', {class: 'weight'}, h('div', {class: 'bar'}, fill), row.weight)),
        row.rps, row.errors, row.p99, row.inflight,
        h('td', {}, row.health)));
    });
    const table = h('table', {class: 'versions'},
      h('thead', {}, h('tr', {},
        h('th', {}, 'version'), h('th', {}, 'weight'), h('th', {class: 'num'}, 'req/s'),
        h('th', {class: 'num'}, 'errors'), h('th', {class: 'num'}, 'p99'),
        h('th', {class: 'num'}, 'in flight'), h('th', {}, 'upstreams'))),
      tbody);

    const charts = h('div', {class: 'charts'});
    for (const spec of CHARTS) {
      const canvas = h('canvas', {'data-metric': spec.key,
                                  'aria-label': `${spec.title} per version of ${name}`});
      refs.canvases.push([canvas, spec]);
      charts.append(h('figure', {class: 'chart'}, h('figcaption', {}, spec.title), canvas));
    }

    refs.shadows = h('ul', {class: 'shadows muted'});
    const parts = [head, table, refs.shadows, charts];
    if (service.rollout) parts.push(buildRollout(service, refs));
    const el = h('section', {class: 'service', 'data-service': name}, parts);
    return {el, refs};
  }

  function buildRollout(service, refs) {
    const name = service.name;
    const run = (action, label, body) => () => act(name, `rollout/${action}`, body, label);
    refs.buttons = {
      promote: actionButton('promote', 'Promote', 'primary', null,
                            run('promote', 'promote', {})),
      promote_full: actionButton('promote-full', 'Promote fully', 'primary', 'Confirm full',
                                 run('promote', 'promote fully', {full: true})),
      pause: actionButton('pause', 'Pause', '', null, run('pause', 'pause')),
      resume: actionButton('resume', 'Resume', '', null, run('resume', 'resume')),
      abort: actionButton('abort', 'Abort', 'danger', 'Confirm abort',
                          run('abort', 'abort and roll back')),
    };
    refs.phase = h('span', {class: 'phase', 'data-role': 'phase'});
    refs.strategy = h('span', {class: 'muted'});
    refs.reason = h('div', {class: 'reason'});
    refs.steps = h('ol', {class: 'steps'});
    refs.decisions = h('tbody');
    refs.noDecisions = h('p', {class: 'muted'}, 'No analysis yet.');
    return h('div', {class: 'rollout'},
      h('div', {},
        h('h3', {}, 'Rollout'),
        h('div', {}, refs.phase, ' ', refs.strategy),
        refs.reason,
        refs.steps,
        h('div', {class: 'actions'}, Object.values(refs.buttons))),
      h('div', {},
        h('h3', {}, 'Last decisions'),
        h('table', {class: 'decisions'},
          h('thead', {}, h('tr', {}, h('th', {}, 'time'), h('th', {}, 'kind'),
                               h('th', {}, 'outcome'), h('th', {}, 'measured vs limit'),
                               h('th', {class: 'num'}, 'samples'))),
          refs.decisions),
        refs.noDecisions));
  }

  function healthChips(version) {
    return Object.entries(version.upstream_health || {}).map(([upstream, health]) => {
      let kind = 'ok';
      let word = 'healthy';
      if (health.ejected) {
        kind = 'bad';
        word = health.ejected_until
          ? `ejected ${duration(Math.max(0, health.ejected_until - Date.now() / 1000))}`
          : 'ejected';
      } else if (!health.healthy) {
        kind = 'bad';
        word = 'unhealthy';
      } else if (health.drained) {
        kind = 'drained';
        word = health.inflight ? `${health.inflight} in flight` : '';
      } else if (!health.available) {
        kind = 'warn';
        word = 'at limit';
      }
      // Drained by an operator (weir drain): a badge next to the upstream, whatever its health.
      const badge = health.drained
        ? h('span', {class: 'badge drained', title: 'out of rotation (weir drain); ' +
                                                    'weir undrain puts it back'}, 'drained')
        : null;
      return h('span', {class: `chip ${kind}`, title: upstream, 'data-upstream': upstream,
                        'data-drained': health.drained ? 'true' : 'false'},
               upstream, badge, word ? ` ${word}` : '');
    });
  }

  // Per shadow: the share of the selected copies delivered, why others were dropped, and how
  // its answers differ from the users' once the noise is set aside.
  function shadowLine(m) {
    const parts = [`shadow ${m.version}`];
    if (m.delivered_share !== null && m.delivered_share !== undefined) {
      parts.push(`delivered ${pct(m.delivered_share)}`);
      const reasons = Object.entries(m.dropped_by_reason || {}).filter(([, n]) => n > 0)
        .map(([reason, n]) => `${reason} ${n}`);
      if (reasons.length) parts.push(`dropped ${pct(m.dropped_share)} (${reasons.join(', ')})`);
    }
    const diff = m.diff;
    if (diff && diff.mismatch_rate !== null) {
      const fields = (diff.fields || []).slice(0, 3)
        .map((f) => `${f.field} ${pct(f.rate)}`).join(', ');
      parts.push(`differs in ${pct(diff.mismatch_rate)}${fields ? ` (${fields})` : ''}`);
      if (diff.noise && diff.noise.length) {
        parts.push(`noise: ${diff.noise.map((f) => f.field).join(', ')}`);
      }
    }
    return h('li', {'data-shadow': m.version}, parts.join(' · '));
  }

  function updateCard(card, service) {
    const {refs} = card;
    setChildren(refs.shadows, (service.mirror || []).map(shadowLine));
    const match = service.match || {};
    refs.match.textContent = `${match.hosts && match.hosts.length ? match.hosts.join(', ')
                                                                  : 'any host'}` +
                             `${match.path_prefix && match.path_prefix !== '/'
                               ? ` ${match.path_prefix}` : ''}`;
    refs.source.textContent = `weights from ${service.weights_source}`;
    const total = Object.values(service.weights).reduce((a, b) => a + b, 0) || 1;
    const samples = history.get(service.name) || new Map();
    const mirrors = new Map((service.mirror || []).map((m) => [m.version, m.percent]));
    const rollout = service.rollout;
    for (const [version, row] of refs.rows) {
      const info = service.versions[version];
      const weight = info.weight;
      row.fill.style.width = `${(100 * weight) / total}%`;
      row.weight.textContent = `${trim((100 * weight) / total)}%`;
      row.weight.title = `weight ${weight} of ${total}`;
      const tags = [];
      if (rollout && rollout.versions) {
        const canary = rollout.strategy === 'canary';
        if (rollout.versions.old === version) tags.push(canary ? 'stable' : 'active');
        if (rollout.versions.new === version) tags.push(canary ? 'canary' : 'preview');
      }
      if (mirrors.has(version)) tags.push(`mirror ${mirrors.get(version)}%`);
      if (info.draining) tags.push(`${info.draining} draining`);
      setChildren(row.tags, tags.map((tag) => h('span', {class: 'tag'}, tag)));
      const series = samples.get(version);
      const latest = (field) => (series && series.t.length ? last(series[field]) : null);
      row.rps.textContent = rate(latest('rps'));
      const errors = latest('error_rate');
      row.errors.textContent = pct(errors);
      row.errors.className = `num ${errors ? 'bad-text' : ''}`;
      row.p99.textContent = ms(latest('p99'));
      row.inflight.textContent = String(info.inflight);
      setChildren(row.health, healthChips(info));
    }
    for (const [canvas, spec] of refs.canvases) {
      const lines = refs.versions.map((version, index) => {
        const series = samples.get(version) || {t: [], [spec.key]: []};
        return {name: version, colour: PALETTE[index % PALETTE.length], t: series.t,
                values: series[spec.key]};
      });
      drawChart(canvas, spec, lines);
    }
    if (rollout) updateRollout(refs, rollout);
  }

  function updateRollout(refs, rollout) {
    const phase = rollout.phase;
    refs.phase.textContent = phase;
    refs.phase.className = `phase ${phase}`;
    refs.phase.dataset.phase = phase;
    const by = rollout.paused_by ? ` (paused by ${rollout.paused_by === 'step'
                                                  ? 'a step' : rollout.paused_by})` : '';
    const active = phase === 'progressing' || phase === 'paused';
    const steps = rolloutSteps(rollout);
    const where = active && rollout.step < steps.length
      ? ` · step ${rollout.step + 1} of ${steps.length}` : '';
    refs.strategy.textContent = `${rollout.strategy === 'canary' ? 'canary' : 'blue/green'}` +
                                `${by}${where}` +
                                `${rollout.failures ? ` · ${rollout.failures} failed` : ''}`;
    refs.reason.textContent = rollout.reason || '';
    refs.reason.className = `reason ${phase === 'aborted' ? 'bad-text' : 'muted'}`;

    setChildren(refs.steps, steps.map((text, index) => {
      let cls = '';
      let mark = '';
      if (index < rollout.step || phase === 'completed') {
        cls = 'done';
        mark = '✓';
      } else if (index === rollout.step && (active || phase === 'aborted')) {
        cls = phase === 'aborted' ? 'current stopped' : 'current';
        mark = phase === 'aborted' ? '✕' : phase === 'paused' ? '‖' : '▶';
      }
      const state = index === rollout.step && active ? stepState(rollout.step_state) : '';
      return h('li', {class: cls, 'data-step': index,
                      'aria-current': cls.startsWith('current') ? 'step' : null},
               h('span', {class: 'mark'}, mark), `${index + 1}. ${text}${state}`);
    }));

    const buttons = refs.buttons;
    buttons.promote.disabled = !active;
    buttons.promote_full.disabled = !active;
    buttons.abort.disabled = !active;
    buttons.pause.disabled = phase !== 'progressing';
    buttons.resume.disabled = phase !== 'paused';
    for (const button of Object.values(buttons)) {
      button.title = button.disabled ? `not while the rollout is ${phase}` : '';
    }

    const decisions = (rollout.analyses || []).slice(-DECISIONS_SHOWN).reverse();
    refs.noDecisions.hidden = decisions.length > 0;
    setChildren(refs.decisions, decisions.map(decisionRow));
  }

  // One analysis: each configured check with the measured value, its limit, and whether it
  // failed; and the sample counts it was judged on.
  function decisionRow(d) {
    const checks = [];
    const values = d.values || {};
    const limits = d.thresholds || {};
    const failed = new Set(d.failed_checks || []);
    const dry = new Set(d.dry_run_failed || []);
    const check = (key, label, value, format) => {
      if (limits[key] === undefined) return;
      const shown = value === undefined ? '–' : format(value);
      const over = failed.has(key) || dry.has(key);
      checks.push(h('span', {class: `check ${failed.has(key) ? 'failed' : ''}`},
                    `${label} ${shown} ${over ? '>' : '≤'} ${format(limits[key])}` +
                    `${dry.has(key) ? ' (dry run)' : ''}`));
    };
    check('max_error_rate', 'error rate', values.canary_error_rate, pct);
    check('max_error_rate_increase', 'error increase', values.error_rate_increase, pct);
    check('max_p99', 'p99', values.canary_p99, (s) => ms(s * 1000));
    check('max_p99_ratio', 'p99 ratio', values.p99_ratio, (r) => `×${trim(r)}`);
    check('max_p95', 'p95', values.canary_p95, (s) => ms(s * 1000));
    check('max_p50', 'p50', values.canary_p50, (s) => ms(s * 1000));
    // Checks on the operator's own metrics: the canary's value, and why one failed.
    for (const [name, c] of Object.entries(d.custom || {})) {
      const value = c.canary === undefined ? '–' : trim(c.canary);
      const text = c.outcome === 'failure' ? `${name} ${c.why}` : `${name} ${value}`;
      checks.push(h('span', {class: `check ${c.outcome === 'failure' && !c.dry_run
                                             ? 'failed' : ''}`},
                    text + (c.dry_run ? ' (dry run)' : '')));
    }
    if (d.why) checks.push(h('span', {class: 'check'}, d.why));
    if (d.failures && d.failures.length) {
      for (const failure of d.failures) checks.push(h('span', {class: 'check failed'}, failure));
    }
    let samples = '';
    if (values.canary_requests !== undefined) {
      samples = `${values.canary_requests} new`;
      if (values.stable_requests !== undefined) samples += ` / ${values.stable_requests} old`;
      if (d.min_requests !== undefined) samples += ` (min ${d.min_requests})`;
    }
    return h('tr', {},
      h('td', {}, clock(d.at)),
      h('td', {}, `${d.kind || ''}${d.step !== undefined ? `, step ${d.step + 1}` : ''}`),
      h('td', {}, h('span', {class: `outcome ${d.outcome}`}, d.outcome)),
      h('td', {}, h('div', {class: 'checks'}, checks.length ? checks : '–')),
      h('td', {class: 'num'}, samples));
  }

  function cardKey(service) {
    // Rebuilt only when its shape changes, so that a half-done confirm or an open select
    // survives the updates in between.
    const rollout = service.rollout;
    return JSON.stringify([Object.keys(service.versions),
                           rollout ? [rollout.strategy, rollout.steps] : null]);
  }

  function render(status) {
    const reload = status.last_reload || {};
    setChildren($('summary'),
      `config generation ${status.generation}`,
      reload.at ? ` · last reload ${reload.outcome} (${reload.trigger}) at ${clock(reload.at)}`
                : '',
      status.ready ? '' : h('span', {class: 'bad-text'}, ' · draining for shutdown'),
      status.draining && status.draining.length
        ? ` · ${status.draining.length} upstream(s) draining` : '',
      status.drained && status.drained.length
        ? h('span', {class: 'warn-text', id: 'drained-summary',
                     title: status.drained.map((d) => d.upstream).join(', ')},
            ` · ${status.drained.length} upstream(s) drained`) : '');
    const banner = $('reload-error');
    if (reload.outcome === 'failure') {
      banner.textContent = 'The last config reload failed; still serving generation ' +
                           `${status.generation}:\n${(reload.errors || []).join('\n')}`;
      banner.hidden = false;
    } else {
      banner.hidden = true;
    }
    // Changes in force here that the state file or store does not have yet.
    const unsaved = status.state_unsaved;
    const unsavedBanner = $('state-unsaved');
    if (unsaved) {
      unsavedBanner.textContent = `Runtime changes are in force but not saved since ` +
        `${clock(unsaved.since)}: could not write ${unsaved.store} (${unsaved.error}); ` +
        `retrying (${unsaved.attempts} attempt(s) so far).`;
      unsavedBanner.hidden = false;
    } else {
      unsavedBanner.hidden = true;
    }

    const main = $('services');
    const seen = new Set();
    status.services.forEach((service, index) => {
      seen.add(service.name);
      const key = cardKey(service);
      let card = cards.get(service.name);
      if (!card || card.key !== key) {
        const built = buildCard(service);
        const chosen = card && card.refs.select.value;
        if (card) card.el.replaceWith(built.el);
        card = {key, ...built};
        if (chosen && Object.keys(service.versions).includes(chosen)) {
          card.refs.select.value = chosen;
        }
        cards.set(service.name, card);
      }
      if (main.children[index] !== card.el) main.insertBefore(card.el, main.children[index]);
      updateCard(card, service);
    });
    for (const [name, card] of cards) {
      if (!seen.has(name)) cards.delete(name);
    }
    const current = new Set([...cards.values()].map((card) => card.el));
    for (const child of [...main.children]) {
      if (!current.has(child)) child.remove();
    }
    if (!status.services.length) main.append(h('p', {class: 'muted'}, 'No services.'));
  }

  // --- polling --------------------------------------------------------------------------------

  let timer = null;
  let busy = false;
  let again = false;
  let lastStatus = null;

  async function getJSON(url) {
    const response = await fetch(url, {cache: 'no-store'});
    if (!response.ok) throw new Error(`${url}: ${response.status}`);
    return response.json();
  }

  async function poll() {
    clearTimeout(timer);
    if (busy) {
      again = true;
      return;
    }
    busy = true;
    const conn = $('conn');
    try {
      const [status, samples] = await Promise.all([
        getJSON('/api/status'), getJSON(`/api/history?since=${historyAfter}`)]);
      mergeHistory(samples);
      lastStatus = status;
      render(status);
      conn.textContent = `live · ${clock(samples.now)}`;
      conn.className = 'conn live';
      document.body.dataset.ready = 'true';
    } catch (error) {
      conn.textContent = `connection lost: ${error.message}; retrying`;
      conn.className = 'conn lost';
    } finally {
      busy = false;
      if (again) {
        again = false;
        timer = setTimeout(poll, 0);
      } else {
        timer = setTimeout(poll, POLL_MS);
      }
    }
  }

  function refreshSoon() {
    poll();
  }

  window.addEventListener('resize', () => { if (lastStatus) render(lastStatus); });
  setupToken();
  poll();
})();
