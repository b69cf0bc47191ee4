// talkscope browser page: publishes the camera by WHIP (RFC 9725) and draws the engine's
// events (face tracks, audio-video sync, active speaker, stats) over the video.
//
// Query parameters:
//   token=T        bearer token for /whip and /events
//   stream=ID      watch that stream's events instead of publishing
//   autopublish=1  start publishing on load
//
// Test hooks: window.talkscope = { publish, stop, state } (see the end of this file).

const params = new URLSearchParams(location.search);
const TOKEN = params.get('token') || '';
const WATCH_STREAM = params.get('stream') || null;
const AUTOPUBLISH = params.get('autopublish') === '1';

const TIMELINE_MS = 30_000;       // the who-spoke-when strip shows the last 30 s
const ICE_WAIT_MS = 2_000;        // give up waiting for ICE gathering after this
const WS_MAX_DELAY_MS = 10_000;   // reconnect backoff: 1 s, 2 s, 4 s, 8 s, 10 s, ...
const SPEAKING_COLOUR = '#3ddc84';
const OFFSCREEN_COLOUR = '#f0b429';

const $ = (id) => document.getElementById(id);
const els = {
  status: $('status'), publish: $('publish'), stop: $('stop'), select: $('stream-select'),
  video: $('video'), overlay: $('overlay'), banner: $('banner'), timeline: $('timeline'),
  stats: $('stats'), counters: $('counters'), log: $('log'),
};

// Plain object kept current for the automated test (read with Runtime.evaluate).
// speaker / sync / tracks describe the stream on show (see currentViewId()).
const state = {
  streamId: null,      // stream id of our WHIP publication (the last one, after Stop)
  connection: 'idle',  // pc.connectionState, or 'idle'
  whip: 'idle',        // 'idle' | 'publishing' | 'published' | 'error: ...'
  events: 0,           // pipeline events received (notices not counted)
  speaker: null,       // latest speaker event or null
  sync: {},            // {track_id: latest sync event}
  tracks: {},          // {track_id: box} of live tracks
  identity: {},        // {track_id: latest identity event}
  wsOpen: false,
  dropped: 0,          // events the server dropped for us (sum of `dropped` counts)
  droppedNotices: 0,   // number of `dropped` notices
};

// ---------------------------------------------------------------------------------------------
// Per-stream views: everything we know about one stream's events.

const views = new Map();   // stream_id -> view
let engineStats = null;    // latest stats event with stream_id null
let publishedId = null;    // our stream id while a WHIP session is live
let selectedId = null;     // the selector's choice (watch-all mode)
let autoId = null;         // fallback: the stream that first sent events

function newView(id) {
  return {
    id,
    tracks: new Map(),     // track_id -> box [x0, y0, x1, y1] in source pixels
    ended: new Set(),      // track ids that ended (late sync events must not revive them)
    sync: {},              // track_id -> latest sync event
    identity: {},          // track_id -> latest identity event
    speaker: null,         // latest speaker event
    segments: [],          // timeline: {key: track_id | 'off', start, end | null} (ms, local clock)
    stats: null,           // latest stats event
    streamState: null,     // latest stream event
    extent: [640, 480],    // source size guess when there is no local video
  };
}

function viewFor(id) {
  let view = views.get(id);
  if (!view) views.set(id, (view = newView(id)));
  return view;
}

/** The stream shown: ours while publishing, else ?stream=, else the selector, else auto. */
function currentViewId() {
  return publishedId ?? WATCH_STREAM ?? selectedId ?? autoId;
}

/** The server-side filter we want: our stream, the ?stream= one, or null (all streams). */
function wantedStreams() {
  const id = publishedId ?? WATCH_STREAM;
  return id ? [id] : null;
}

/** Copy the shown view into the plain `state` object and the body's data-speaking. */
function updateState() {
  const view = views.get(currentViewId());
  state.tracks = view ? Object.fromEntries(view.tracks) : {};
  state.sync = view ? view.sync : {};
  state.identity = view ? view.identity : {};
  state.speaker = view ? view.speaker : null;
  const sp = state.speaker;
  document.body.dataset.speaking =
    sp && sp.state === 'speaking' && sp.track_id != null ? String(sp.track_id) : '';
  renderStatus();
}

// ---------------------------------------------------------------------------------------------
// Events over WebSocket.

let ws = null;
let wsDelay = 1000;

function connectEvents() {
  const url = new URL('/events', location.href);
  url.protocol = location.protocol === 'https:' ? 'wss:' : 'ws:';
  if (TOKEN) url.searchParams.set('token', TOKEN);
  const sock = (ws = new WebSocket(url));
  sock.addEventListener('open', () => {
    state.wsOpen = true;
    wsDelay = 1000;
    renderStatus();
  });
  sock.addEventListener('message', (msg) => {
    let ev;
    try { ev = JSON.parse(msg.data); } catch { return; }
    if (ev && typeof ev === 'object') handleEvent(ev);
  });
  sock.addEventListener('close', (e) => {
    if (ws !== sock) return;
    ws = null;
    state.wsOpen = false;
    renderStatus();
    log(`events: closed (${e.code}), retry in ${wsDelay / 1000} s`, true);
    setTimeout(connectEvents, wsDelay);
    wsDelay = Math.min(wsDelay * 2, WS_MAX_DELAY_MS);
  });
}

/** Send our filter (events: null = every type). */
function sendSubscription() {
  if (ws?.readyState !== WebSocket.OPEN) return;
  ws.send(JSON.stringify({ type: 'subscribe', streams: wantedStreams(), events: null }));
}

function handleEvent(ev) {
  // Notices first: they carry no stream.
  switch (ev.type) {
    case 'hello':
      (ev.streams || []).forEach(noteStream);
      log(`events: hello from ${ev.server}, ${(ev.streams || []).length} stream(s)`);
      if (wantedStreams()) sendSubscription();  // the default filter is "all"
      return;
    case 'subscribed':
      log(`events: subscribed to ${ev.streams ? ev.streams.join(', ') : 'all streams'}`);
      return;
    case 'dropped':
      state.dropped += ev.count || 0;
      state.droppedNotices += 1;
      return;
    case 'error':
      log(`events: server refused a message (${ev.code}): ${ev.message}`, true);
      return;
    case 'pong':
      return;
  }

  state.events += 1;
  if (ev.stream_id == null) {
    if (ev.type === 'stats') engineStats = ev;
    return;
  }
  noteStream(ev.stream_id);
  const view = viewFor(ev.stream_id);
  applyEvent(view, ev);
  if (autoId === null || views.get(autoId)?.streamState?.state === 'ended') autoId = view.id;
  if (view.id === currentViewId()) updateState();
}

function applyEvent(view, ev) {
  const id = ev.track_id;
  switch (ev.type) {
    case 'stream':
      view.streamState = ev;
      log(`${view.id}: ${ev.state}${ev.message ? ' - ' + ev.message : ''}`, ev.state === 'error');
      if (ev.state === 'ended' || ev.state === 'error') {
        view.tracks.clear();
        view.speaker = null;
        recordSpeaker(view, null);
      }
      break;
    case 'track_start':
      view.ended.delete(id);
      setBox(view, id, ev.box);
      log(`${view.id}: track #${id} started`);
      break;
    case 'track_end':
      view.tracks.delete(id);
      view.ended.add(id);
      delete view.sync[id];
      log(`${view.id}: track #${id} ended after ${ev.frames} frames`);
      break;
    case 'sync':
      if (view.ended.has(id)) break;
      view.sync[id] = ev;
      setBox(view, id, ev.box);
      break;
    case 'speaker':
      view.speaker = ev;
      if (id != null) setBox(view, id, ev.box);
      recordSpeaker(view, ev);
      break;
    case 'stats':
      view.stats = ev;
      break;
    case 'identity':
      if (id != null) view.identity[id] = ev;
      break;
  }
}

/** Update a live track's box (a track seen only through sync/speaker events counts as live). */
function setBox(view, id, box) {
  if (id == null || view.ended.has(id) || !Array.isArray(box) || box.length !== 4) return;
  view.tracks.set(id, box);
  view.extent = [Math.max(view.extent[0], box[2]), Math.max(view.extent[1], box[3])];
}

/** Timeline bookkeeping: open a segment when the active speaker changes (local receive time). */
function recordSpeaker(view, ev) {
  const now = Date.now();
  let key = null;
  if (ev?.state === 'speaking' && ev.track_id != null) key = ev.track_id;
  else if (ev?.state === 'offscreen') key = 'off';
  const last = view.segments.at(-1);
  if (last && last.end === null) {
    if (last.key === key) return;
    last.end = now;
  }
  if (key !== null) view.segments.push({ key, start: now, end: null });
  while (view.segments.length && view.segments[0].end !== null &&
         view.segments[0].end < now - TIMELINE_MS) {
    view.segments.shift();
  }
}

/** Add a stream id to the selector (once). */
function noteStream(id) {
  if (!id || [...els.select.options].some((o) => o.value === id)) return;
  els.select.add(new Option(id, id));
}

// ---------------------------------------------------------------------------------------------
// WHIP publishing.

let session = null;  // {pc, media, location, aborted, deleted} while publishing

function authHeaders(extra = {}) {
  return TOKEN ? { ...extra, Authorization: `Bearer ${TOKEN}` } : extra;
}

/** Publish camera and microphone; resolves with the stream id once the answer is applied. */
async function publish() {
  if (session) {
    if (state.whip === 'published') return state.streamId;
    throw new Error('already publishing');
  }
  const s = (session = { pc: null, media: null, location: null, aborted: false, deleted: false });
  const check = () => { if (s.aborted) throw new Error('publish stopped'); };
  setWhip('publishing');
  try {
    if (!navigator.mediaDevices?.getUserMedia) {
      throw new Error('getUserMedia is unavailable (the page needs https or localhost)');
    }
    s.media = await navigator.mediaDevices.getUserMedia({
      audio: true,
      video: { width: 640, height: 480, frameRate: 25 },
    });
    check();
    els.video.srcObject = s.media;

    const pc = (s.pc = new RTCPeerConnection({ iceServers: [] }));
    pc.addEventListener('connectionstatechange', () => {
      if (session !== s) return;
      state.connection = pc.connectionState;
      if (pc.connectionState === 'failed') log('WebRTC connection failed', true);
      renderStatus();
    });
    for (const track of s.media.getTracks()) {
      const transceiver = pc.addTransceiver(track, { direction: 'sendonly', streams: [s.media] });
      if (track.kind === 'video') await preferResolution(transceiver.sender);
    }
    state.connection = pc.connectionState;

    // Non-trickle WHIP: the offer goes out with all the candidates gathered so far.
    await pc.setLocalDescription(await pc.createOffer());
    await iceGatheringDone(pc, ICE_WAIT_MS);
    check();

    const res = await fetch('/whip', {
      method: 'POST',
      headers: authHeaders({ 'Content-Type': 'application/sdp' }),
      body: pc.localDescription.sdp,
    });
    const text = await res.text();
    if (res.status !== 201) {
      throw new Error(`WHIP HTTP ${res.status} ${res.statusText}: ${text.trim() || '(no body)'}`);
    }
    const loc = res.headers.get('Location');
    s.location = loc ? new URL(loc, res.url || location.href).href : null;
    check();
    const id = res.headers.get('X-Talkscope-Stream-Id') ||
      (loc ? loc.split('/').filter(Boolean).pop() : null);
    if (!id) throw new Error('WHIP answer without a stream id');

    await pc.setRemoteDescription({ type: 'answer', sdp: text });
    check();

    // A reused id whose last session ended starts afresh.
    if (views.get(id)?.streamState?.state === 'ended') views.delete(id);
    publishedId = state.streamId = autoId = id;
    setWhip('published');
    log(`published as ${id}`);
    sendSubscription();
    updateState();
    return id;
  } catch (err) {
    const error = err instanceof Error ? err : new Error(String(err));
    if (session === s) session = null;
    await teardown(s);
    if (!s.aborted) {  // after Stop, stop() has already reset the state
      state.connection = 'idle';
      setWhip(`error: ${error.name && error.name !== 'Error' ? error.name + ': ' : ''}${error.message}`);
      log(error.message, true);
    }
    throw error;
  }
}

/** Stop publishing: DELETE the WHIP resource, close the connection, stop the camera. */
async function stop() {
  const s = session;
  if (!s) return;
  session = null;
  s.aborted = true;
  publishedId = null;
  state.connection = 'idle';
  setWhip('idle');
  await teardown(s);
  sendSubscription();  // back to ?stream= or all streams
  updateState();
}

/** Free what a session holds; safe to call twice. */
async function teardown(s) {
  s.pc?.close();
  s.media?.getTracks().forEach((t) => t.stop());
  if (s.media && els.video.srcObject === s.media) els.video.srcObject = null;
  if (s.location && !s.deleted) {
    s.deleted = true;
    try {
      const res = await fetch(s.location, { method: 'DELETE', headers: authHeaders() });
      if (!res.ok && res.status !== 404) log(`WHIP DELETE: HTTP ${res.status}`, true);
    } catch (err) {
      log(`WHIP DELETE failed: ${err.message}`, true);
    }
  }
}

/** Ask the encoder to keep 640x480 and drop frame rate instead when bandwidth is short. */
async function preferResolution(sender) {
  try {
    const p = sender.getParameters();
    if (!p.encodings || p.encodings.length === 0) p.encodings = [{}];
    p.degradationPreference = 'maintain-resolution';
    await sender.setParameters(p);
  } catch (err) {
    console.warn('talkscope: degradationPreference not applied:', err);
  }
}

/** Resolve when ICE gathering completes, or after timeoutMs (then we send what we have). */
function iceGatheringDone(pc, timeoutMs) {
  return new Promise((resolve) => {
    if (pc.iceGatheringState === 'complete') return resolve();
    const done = () => {
      clearTimeout(timer);
      pc.removeEventListener('icegatheringstatechange', onChange);
      resolve();
    };
    const onChange = () => { if (pc.iceGatheringState === 'complete') done(); };
    const timer = setTimeout(done, timeoutMs);
    pc.addEventListener('icegatheringstatechange', onChange);
  });
}

function setWhip(value) {
  state.whip = value;
  renderStatus();
}

// ---------------------------------------------------------------------------------------------
// Drawing: overlay boxes, banner, timeline, stats.

// Track colours avoid green, which marks the active speaker.
const PALETTE = ['#4dabf7', '#f783ac', '#b197fc', '#66d9e8', '#ff8787', '#91a7ff', '#e599f7', '#ced4da'];
const trackColour = (id) => PALETTE[Math.abs(Number(id)) % PALETTE.length];
const fmt = (n, digits = 1) => (n == null || !Number.isFinite(n) ? '-' : n.toFixed(digits));
const signed = (n) => (n >= 0 ? `+${n}` : `${n}`);
const esc = (s) => String(s).replace(/[&<>"]/g, (c) => `&#${c.charCodeAt(0)};`);

/** Size a canvas's backing store to its CSS box; returns its 2D context in CSS pixels. */
function fitCanvas(canvas) {
  const dpr = window.devicePixelRatio || 1;
  const w = Math.round(canvas.clientWidth * dpr);
  const h = Math.round(canvas.clientHeight * dpr);
  if (canvas.width !== w || canvas.height !== h) { canvas.width = w; canvas.height = h; }
  const ctx = canvas.getContext('2d');
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, canvas.clientWidth, canvas.clientHeight);
  return ctx;
}

function syncLabel(s) {
  if (!s) return 'sync: waiting';
  if (s.state !== 'ok' || s.offset_frames == null) return `sync: ${s.reason || 'unknown'}`;
  const ms = s.offset_ms == null ? '' : ` (${signed(Math.round(s.offset_ms))} ms)`;
  return `offset ${signed(s.offset_frames)} fr${ms} conf ${fmt(s.confidence)}`;
}

function identityLabel(ev) {
  if (!ev) return '';
  const who = ev.name || (ev.identity_id != null ? `id ${ev.identity_id}` : '');
  // voice_match: P(the current speech is this face's voice); low while it talks = not its voice
  const voice = ev.voice_match == null ? '' : ` · voice ${fmt(ev.voice_match, 2)}`;
  return who + voice;
}

function drawOverlay() {
  const canvas = els.overlay;
  const ctx = fitCanvas(canvas);
  const cw = canvas.clientWidth;
  const ch = canvas.clientHeight;
  const view = views.get(currentViewId());
  const video = els.video;
  const hasVideo = Boolean(video.srcObject) && video.videoWidth > 0;
  // Source size: the local video's, else a 640x480 area grown to the largest box seen.
  const [sw, sh] = hasVideo ? [video.videoWidth, video.videoHeight] : (view?.extent ?? [640, 480]);
  // Same letterboxing as object-fit: contain.
  const scale = Math.min(cw / sw, ch / sh);
  const ox = (cw - sw * scale) / 2;
  const oy = (ch - sh * scale) / 2;

  if (!hasVideo) {
    ctx.fillStyle = '#15191f';
    ctx.fillRect(ox, oy, sw * scale, sh * scale);
    ctx.fillStyle = '#5d6773';
    ctx.font = '13px system-ui, sans-serif';
    ctx.textBaseline = 'top';
    ctx.fillText(view ? `watching ${view.id} (no video here)` : 'no stream: press Publish',
                 ox + 10, oy + 10);
    ctx.textBaseline = 'alphabetic';
  }
  if (!view) return;

  const sp = view.speaker;
  const activeId = sp?.state === 'speaking' ? sp.track_id : null;
  // Draw the active speaker last so that it sits on top.
  const ids = [...view.tracks.keys()].sort((a, b) => (a === activeId) - (b === activeId) || a - b);
  for (const id of ids) {
    const [x0, y0, x1, y1] = view.tracks.get(id);
    const rect = [ox + x0 * scale, oy + y0 * scale, (x1 - x0) * scale, (y1 - y0) * scale];
    const active = id === activeId;
    const colour = active ? SPEAKING_COLOUR : trackColour(id);
    if (active) {  // a dark halo keeps the thick green box visible on any picture
      ctx.strokeStyle = 'rgba(0, 0, 0, 0.6)';
      ctx.lineWidth = 7;
      ctx.strokeRect(...rect);
    }
    ctx.strokeStyle = colour;
    ctx.lineWidth = active ? 4 : 1.5;
    ctx.strokeRect(...rect);

    const head = [`#${id}`, identityLabel(view.identity[id])];
    if (active) head.push(`speaking ${fmt(sp.score, 2)}`);
    const lines = [head.filter(Boolean).join('  '), syncLabel(view.sync[id])];
    drawLabel(ctx, lines, rect, colour, active, cw, ch);
  }
}

/** A label block above the box, or below it when there is no room above; kept on the canvas. */
function drawLabel(ctx, lines, [x0, y, w, h], colour, active, canvasW, canvasH) {
  ctx.font = `${active ? 'bold ' : ''}12px system-ui, sans-serif`;
  const lineH = 15;
  const blockH = lines.length * lineH + 4;
  const blockW = Math.max(...lines.map((l) => ctx.measureText(l).width)) + 10;
  const x = Math.max(0, Math.min(x0, canvasW - blockW));
  let top = y - blockH - 3;
  if (top < 0) top = Math.min(y + h + 3, canvasH - blockH);
  ctx.fillStyle = 'rgba(10, 12, 16, 0.72)';
  ctx.fillRect(x, top, blockW, blockH);
  ctx.fillStyle = colour;
  ctx.fillRect(x, top, 3, blockH);
  ctx.fillStyle = active ? SPEAKING_COLOUR : '#e6ebf0';
  ctx.textBaseline = 'top';
  lines.forEach((line, i) => ctx.fillText(line, x + 6, top + 3 + i * lineH));
  ctx.textBaseline = 'alphabetic';
}

function renderBanner() {
  const view = views.get(currentViewId());
  const sp = view?.speaker;
  let text = view ? `${view.id}: waiting for speaker events` : 'waiting for events';
  let cls = '';
  if (view?.streamState && view.streamState.state !== 'started') {
    text = `${view.id}: stream ${view.streamState.state}`;
  } else if (sp) {
    cls = sp.state;
    const held = sp.pts_ns != null && sp.since_pts_ns != null
      ? ` for ${fmt((sp.pts_ns - sp.since_pts_ns) / 1e9)} s` : '';
    if (sp.state === 'speaking') {
      text = `#${sp.track_id} speaking${held} (score ${fmt(sp.score, 2)})`;
    } else if (sp.state === 'offscreen') {
      text = `off-screen voice: speech with no matching face${held} (score ${fmt(sp.score, 2)})`;
    } else {
      text = `silent: nobody is speaking${held}`;
    }
  }
  if (els.banner.textContent !== text) els.banner.textContent = text;
  if (els.banner.className !== `banner ${cls}`.trim()) els.banner.className = `banner ${cls}`.trim();
}

function drawTimeline() {
  const canvas = els.timeline;
  const ctx = fitCanvas(canvas);
  const w = canvas.clientWidth;
  const h = canvas.clientHeight;
  const view = views.get(currentViewId());
  const now = Date.now();
  const t0 = now - TIMELINE_MS;
  const labelW = 72;
  const axisH = 14;
  const plotW = w - labelW;
  const xOf = (t) => labelW + ((Math.max(t, t0) - t0) / TIMELINE_MS) * plotW;

  // Rows: live tracks and tracks that spoke in the window, then "off-screen".
  const segments = (view?.segments ?? []).filter((s) => s.end === null || s.end > t0);
  const ids = new Set(view ? view.tracks.keys() : []);
  segments.forEach((s) => { if (s.key !== 'off') ids.add(s.key); });
  const rows = [...[...ids].sort((a, b) => a - b), 'off'];
  const rowH = Math.min(20, (h - axisH) / rows.length);

  ctx.font = '11px system-ui, sans-serif';
  ctx.textBaseline = 'middle';
  // Grid: a line every 5 s, labelled in seconds before now.
  for (let s = 0; s <= TIMELINE_MS / 1000; s += 5) {
    const x = labelW + plotW * (1 - s / (TIMELINE_MS / 1000));
    ctx.fillStyle = '#2c323b';
    ctx.fillRect(Math.min(x, w - 1), 0, 1, h - axisH);
    ctx.fillStyle = '#8b95a3';
    ctx.textAlign = s === 0 ? 'right' : 'center';
    ctx.fillText(s === 0 ? 'now' : `-${s} s`, Math.min(x, w - 1), h - axisH / 2);
  }
  ctx.textAlign = 'left';
  rows.forEach((key, i) => {
    const y = i * rowH;
    ctx.fillStyle = i % 2 ? '#1d2229' : '#20262e';
    ctx.fillRect(labelW, y, plotW, rowH - 1);
    if (rowH >= 9) {
      ctx.fillStyle = key === 'off' ? OFFSCREEN_COLOUR : trackColour(key);
      ctx.fillText(key === 'off' ? 'off-screen' : `#${key}`, 4, y + rowH / 2);
    }
    ctx.fillStyle = key === 'off' ? OFFSCREEN_COLOUR : trackColour(key);
    for (const seg of segments) {
      if (seg.key !== key) continue;
      const x0 = xOf(seg.start);
      ctx.fillRect(x0, y + 2, Math.max(2, xOf(seg.end ?? now) - x0), rowH - 5);
    }
  });
  ctx.textBaseline = 'alphabetic';
}

function statsBlock(stats) {
  const lat = stats.latency_ms || {};
  const stages = Object.entries(stats.stages || {})
    .map(([name, p]) => `<tr><td>${esc(name)}</td><td>${fmt(p.p50_ms)}</td>` +
                        `<td>${fmt(p.p95_ms)}</td><td>${fmt(p.p99_ms)}</td></tr>`).join('');
  const kv = (obj) => Object.entries(obj || {})
    .map(([k, v]) => `${esc(k)} <b>${esc(v)}</b>`).join(', ') || 'none';
  return `
    <div class="kv">end-to-end latency (ms)</div>
    <div class="big">p50 ${fmt(lat.p50, 0)} / p95 ${fmt(lat.p95, 0)} / p99 ${fmt(lat.p99, 0)}</div>
    ${stages ? `<table><tr><th>stage (ms)</th><th>p50</th><th>p95</th><th>p99</th></tr>${stages}</table>` : ''}
    <div class="kv">drops: ${kv(stats.drops)}</div>
    <div class="kv">queues: ${kv(stats.queues)}</div>`;
}

let lastPanelHtml = '';

function renderPanel() {
  const view = views.get(currentViewId());
  let html = view ? `<div class="kv">stream <b>${esc(view.id)}</b>` +
    `${view.streamState ? `, ${esc(view.streamState.state)}` : ''}, ` +
    `${view.tracks.size} live track(s)</div>` : '<div class="kv">no stream yet</div>';
  html += view?.stats ? statsBlock(view.stats) : '<div class="kv">no stats yet</div>';
  if (engineStats) html += `<h2>Engine</h2>${statsBlock(engineStats)}`;
  if (html !== lastPanelHtml) { els.stats.innerHTML = html; lastPanelHtml = html; }

  const counters = `<div class="kv">received <b>${state.events}</b> events, ` +
    `<b>${state.droppedNotices}</b> dropped notice(s) (<b>${state.dropped}</b> events lost)</div>` +
    `<div class="kv">streams seen <b>${views.size}</b></div>`;
  if (els.counters.innerHTML !== counters) els.counters.innerHTML = counters;
}

function renderStatus() {
  const whip = state.whip;
  const parts = [
    `publish: ${whip}${state.streamId && whip === 'published' ? ` (${state.streamId})` : ''}`,
    `webrtc: ${state.connection}`,
    `events: ${state.wsOpen ? 'connected' : 'disconnected'}`,
  ];
  if (!publishedId && currentViewId()) parts.push(`showing: ${currentViewId()}`);
  els.status.textContent = parts.join('  |  ');
  els.status.title = els.status.textContent;
  els.status.classList.toggle('error', whip.startsWith('error') || state.connection === 'failed');
  els.status.classList.toggle('live', whip === 'published' && state.connection === 'connected');
  els.publish.disabled = session !== null;
  els.stop.disabled = session === null;
  els.select.disabled = Boolean(publishedId ?? WATCH_STREAM);
  // Pinned (publishing or ?stream=): show that id; otherwise the user's choice or "auto".
  const shown = els.select.disabled ? currentViewId() : selectedId;
  if (shown) noteStream(shown);
  els.select.value = shown ?? '';
}

/** Keep the last few notable things in the side panel. */
function log(text, isError = false) {
  const li = document.createElement('li');
  li.textContent = `${new Date().toLocaleTimeString()} ${text}`;
  li.title = text;
  if (isError) li.className = 'error';
  els.log.prepend(li);
  while (els.log.children.length > 14) els.log.lastElementChild.remove();
  (isError ? console.warn : console.log)('talkscope:', text);
}

let lastPanelMs = 0;

function frame(t) {
  drawOverlay();
  drawTimeline();
  renderBanner();
  if (t - lastPanelMs > 250) { renderPanel(); lastPanelMs = t; }
  requestAnimationFrame(frame);
}

// ---------------------------------------------------------------------------------------------
// Wiring.

els.publish.addEventListener('click', () => { publish().catch(() => {}); });
els.stop.addEventListener('click', () => { stop(); });
els.select.addEventListener('change', () => {
  selectedId = els.select.value || null;
  updateState();
});
// Leaving the page: free the server's WHIP slot (keepalive lets the request outlive the page).
window.addEventListener('pagehide', () => {
  if (session?.location && !session.deleted) {
    session.deleted = true;
    fetch(session.location, { method: 'DELETE', headers: authHeaders(), keepalive: true })
      .catch(() => {});
  }
});

window.talkscope = { publish, stop, state };

if (WATCH_STREAM) log(`watching stream ${WATCH_STREAM}`);
connectEvents();
renderStatus();
requestAnimationFrame(frame);
if (AUTOPUBLISH) publish().catch(() => {});
