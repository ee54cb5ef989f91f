// kvviz step view: draws any recorded step of one run in the browser.
//
// The server sends the whole run once per change (kvviz/figures/step.py builds it): K and V as
// shared blocks, the attention rows in order, and per step q′ k′ v′, top-k, overviews and the
// arithmetic. Play and the slider move through recorded steps here, one Plotly.react per chart per
// frame, with no server round trip. The server is asked only for what it alone can do:
//   {do: "next"}  a live model step (only when the newest recorded step is on screen),
//   {do: "play"}  compute every remaining step once, then animate them here,
//   {do: "reset"}, {do: "tab"} (the arithmetic is shipped only while its tab is open),
//   {do: "view"}  after scrubbing or playing, so a reload or a shared link shows the same step.
// Used twice: as a Streamlit component (default export) and in the standalone HTML export
// (window.kvvizStepView), where there is no server and the run is complete.

const PLOTLY_URL = "/app/static/plotly.min.js";
// Material Symbols paths (Apache 2.0): the fonts on a visitor's machine may lack ⏭ ⏸ ⟲
const svg = (d) => `<svg viewBox="0 0 24 24" width="18" height="18" aria-hidden="true"><path fill="currentColor" d="${d}"/></svg>`;
const ICONS = {
  next: svg("M6 18l8.5-6L6 6v12zM16 6v12h2V6h-2z"),
  play: svg("M8 5v14l11-7z"),
  pause: svg("M6 19h4V5H6v14zm8-14v14h4V5h-4z"),
  reset: svg("M12 5V1L7 6l5 5V7c3.31 0 6 2.69 6 6s-2.69 6-6 6-6-2.69-6-6H4c0 4.42 3.58 8 8 8s8-3.58 8-8-3.58-8-8-8z"),
};
const SPEEDS = [["4 / s", 4], ["10 / s", 10], ["20 / s", 20]];
const STRIDE = 16;  // a long run's frame moves this many positions at a time (see frame())
const CHART_CONFIG = { displaylogo: false, responsive: true, modeBarButtonsToRemove: ["select2d", "lasso2d"] };

let plotlyPromise = null;
function loadPlotly(url) {
  if (window.Plotly) return Promise.resolve(window.Plotly);
  if (!plotlyPromise) {
    plotlyPromise = new Promise((resolve, reject) => {
      const s = document.createElement("script");
      s.src = url;
      s.onload = () => resolve(window.Plotly);
      s.onerror = () => { plotlyPromise = null; reject(new Error("could not load " + url)); };
      document.head.appendChild(s);
    });
  }
  return plotlyPromise;
}

// -- decoding -----------------------------------------------------------------------------------
function f32(b64) {
  if (!b64) return new Float32Array(0);
  const bin = atob(b64);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  return new Float32Array(bytes.buffer);
}
function ragged(r) {  // {data, offsets, shapes} -> get(i) = {shape, a: Float32Array view}
  const data = f32(r.data);
  return { count: r.offsets.length, get(i) {
    const shape = r.shapes[i], n = shape.reduce((x, y) => x * y, 1);
    return { shape, a: data.subarray(r.offsets[i], r.offsets[i] + n) };
  } };
}
function stacked(b64, width) {  // (rows, width) -> row(i)
  const a = f32(b64);
  return (i) => a.subarray(i * width, (i + 1) * width);
}
function decode(d) {
  const hd = d.head_dim;
  const run = {
    d, hd, steps: d.steps, n: d.steps.length,
    K: ragged(d.kv.K), V: ragged(d.kv.V), ref: d.kv.ref,
    q: stacked(d.q, hd), k: stacked(d.k_new, hd), v: stacked(d.v_new, hd),
    att: ragged(d.attention), heads: ragged(d.heads_rows), layers: ragged(d.layers_rows),
    arith: null,
  };
  // the first attention row of each step: prefill gives n_prompt rows, each decode step one
  run.rowStart = [];
  let r = 0;
  for (const s of d.steps) { run.rowStart.push(r); r += s.q_len; }
  run.rows = r;
  // colour bounds over the whole run, so a frame's colours mean the same as the next frame's
  run.kBound = absMax(d.kv.K && run.K.get(run.K.count - 1).a);
  run.vBound = absMax(run.V.get(run.V.count - 1).a);
  run.qBound = absMax(f32(d.q)); run.knBound = absMax(f32(d.k_new)); run.vnBound = absMax(f32(d.v_new));
  run.maxKv = Math.max(...d.steps.map((s) => s.kv_len));
  run.hdIndex = [...Array(hd).keys()];
  run.valueLut = lut(d.look.value_scale);
  run.weightLut = lut(d.look.weight_scale);
  run.greyLut = lut([[0, "rgb(235,235,235)"], [1, "rgb(40,40,40)"]]);
  run.barLut = lut([[0, d.look.prompt], [0.5, d.look.generated], [1, d.look.highlight]], true);
  run.positions = [...Array(run.maxKv).keys()];
  // room for the longest "12 ␣token" label, so no chart needs Plotly's slower automargin pass
  run.labelPx = Math.min(160, 22 + 6.2 * Math.max(4, ...d.tokens.map((x, i) => String(i).length + 1 + x.length)));
  if (d.arithmetic) run.arith = decodeArith(d.arithmetic, hd);
  return run;
}
function decodeArith(a, hd) {
  const h = a.hidden, half = a.pairs.length;
  return {
    a, x: stacked(a.x, h), q: stacked(a.q, hd), k: stacked(a.k, hd), v: stacked(a.v, hd),
    qr: stacked(a.q_rot, hd), kr: stacked(a.k_rot, hd), out: stacked(a.output, hd), o: stacked(a.o_part, h),
    angles: a.angles ? stacked(a.angles, half) : null,
    dots: ragged(a.dots), scores: ragged(a.scores), weights: ragged(a.weights),
  };
}
function rgb(c) {  // "#rrggbb" or "rgb(r,g,b)" -> [r, g, b]
  if (c[0] === "#") return [1, 3, 5].map((i) => parseInt(c.slice(i, i + 2), 16));
  return c.replace(/[^\d,.]/g, "").split(",").slice(0, 3).map(Number);
}
function lut(stops, steps = false) {  // a colour scale as 256 RGB triplets (steps: nearest stop, no blending)
  const out = new Uint8ClampedArray(256 * 3), cs = stops.map(([t, c]) => [Number(t), rgb(c)]);
  for (let i = 0; i < 256; i++) {
    const f = i / 255;
    let k = 0;
    while (k < cs.length - 2 && f > cs[k + 1][0]) k++;
    const [t0, c0] = cs[k], [t1, c1] = cs[k + 1];
    const u = steps ? (f - t0 < t1 - f ? 0 : 1) : Math.max(0, Math.min(1, (f - t0) / (t1 - t0 || 1)));
    for (let j = 0; j < 3; j++) out[3 * i + j] = c0[j] + (c1[j] - c0[j]) * u;
  }
  return out;
}
function absMax(a) { let m = 0; if (a) for (const x of a) if (Number.isFinite(x) && Math.abs(x) > m) m = Math.abs(x); return m || 1; }
function rowsOf(a, rows, cols, start = 0, end = rows, c0 = 0) {  // Float32Array (rows*cols) -> nested arrays
  const out = [];
  for (let i = start; i < end; i++) out.push(Array.from(a.subarray(i * cols + c0, (i + 1) * cols)));
  return out;
}
function median(xs) {
  const v = xs.filter((x) => x != null).sort((p, q) => p - q);
  if (!v.length) return null;
  const m = v.length >> 1;
  return v.length % 2 ? v[m] : (v[m - 1] + v[m]) / 2;
}
const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
function human(bytes) {
  const u = ["B", "KiB", "MiB", "GiB"]; let i = 0, b = bytes;
  while (b >= 1024 && i < u.length - 1) { b /= 1024; i++; }
  return i ? `${b.toFixed(1)} ${u[i]}` : `${b} B`;
}
const fmt = (x, d = 3) => (x == null || !Number.isFinite(x) ? "–" : Number(x).toFixed(d));
const sub = (n) => String(n).replace(/\d/g, (c) => "₀₁₂₃₄₅₆₇₈₉"[c]);

// -- the view -----------------------------------------------------------------------------------
const HTML = `
<div class="kvsv-bar" role="toolbar" aria-label="step controls">
  <button class="kvsv-btn kvsv-primary" data-act="next" title="Feed the last chosen token: one decode step (the next recorded step first, when you scrubbed back)">${ICONS.next}<span>Next step</span></button>
  <button class="kvsv-btn" data-act="play" title="Compute the remaining steps once, then animate them here">${ICONS.play}<span>Play</span></button>
  <select class="kvsv-speed" title="Steps per second while playing">${SPEEDS.map(([l, v]) => `<option value="${v}"${v === 10 ? " selected" : ""}>${l}</option>`).join("")}</select>
  <button class="kvsv-btn" data-act="reset" title="Start again from prefill with the same settings">${ICONS.reset}<span>Reset</span></button>
  <label class="kvsv-scrub"><span class="kvsv-stepno">step 0</span><input type="range" min="0" max="0" value="0" aria-label="shown step (0 = prefill)"></label>
</div>
<div class="kvsv-status" aria-live="polite"></div>
<div class="kvsv-metrics"></div>
<div class="kvsv-strip"></div>
<div class="kvsv-sentence"></div>
<div class="kvsv-tabs" role="tablist">
  <button class="kvsv-tab" data-tab="main" role="tab">Cache and attention</button>
  <button class="kvsv-tab" data-tab="arith" role="tab">The arithmetic of this step</button>
  <button class="kvsv-tab" data-tab="over" role="tab">All heads · all layers · cache size</button>
</div>
<div class="kvsv-pane" data-pane="main">
  <div class="kvsv-row">
    <div class="kvsv-story"></div>
    <div class="kvsv-kvcol">
      <div class="kvsv-kv"><div class="kvsv-chart" data-chart="K"></div><div class="kvsv-chart" data-chart="V"></div></div>
      <div class="kvsv-chart kvsv-mini" data-chart="mini"></div>
      <div class="kvsv-caption">K ← [K; k′], V ← [V; v′]: a row per cached position (labelled by its token), a column per head_dim index; the newest rows outlined. Earlier rows never change; empty rows are positions this step has not cached yet.</div>
    </div>
  </div>
  <div class="kvsv-chart" data-chart="qkv"></div>
  <div class="kvsv-caption">The newest token's q′, k′, v′, each on its own colour scale (the ± is its largest magnitude in this run). k′ and v′ are the outlined rows of K and V.</div>
  <div class="kvsv-row kvsv-att-row">
    <div class="kvsv-att-col">
      <div class="kvsv-att-opts">colour <label><input type="radio" name="kvsv-norm" value="row" checked> per row</label><label><input type="radio" name="kvsv-norm" value="global"> one scale</label></div>
      <div class="kvsv-chart" data-chart="att"></div>
      <div class="kvsv-legend"></div>
    </div>
    <div class="kvsv-top-col"><div class="kvsv-top" data-chart="top"></div><div class="kvsv-caption">The top next tokens (temperature 1); the chosen one, in red, is fed in at the next step.</div></div>
  </div>
</div>
<div class="kvsv-pane" data-pane="arith"><div class="kvsv-arith"></div></div>
<div class="kvsv-pane" data-pane="over">
  <div class="kvsv-chart" data-chart="heads"></div>
  <div class="kvsv-caption">Each query head's newest query in this layer; dotted lines group the heads that share a KV head.</div>
  <div class="kvsv-chart" data-chart="layers"></div>
  <div class="kvsv-caption">Each layer's newest query, averaged over its heads.</div>
  <div class="kvsv-chart" data-chart="size"></div>
</div>`;

class StepView {
  constructor(root, standalone) {
    this.root = root;
    this.standalone = standalone;
    root.classList.add("kvsv");
    root.innerHTML = HTML;
    this.q = (sel) => root.querySelector(sel);
    this.chart = (name) => root.querySelector(`[data-chart="${name}"]`);
    this.view = 0; this.tab = "main"; this.norm = "row";
    this.playing = false; this.frames = 0; this.inflight = null; this.queued = 0; this.seq = 0;
    this.nonce = null; this.runId = null; this.autoplayNonce = null; this.syncTimer = null; this.layouts = {}; this.charts = {};
    this.sent = 0; this.send = () => {};
    this.bindControls();
    this.resizeObserver = new ResizeObserver(() => this.onResize());
    this.resizeObserver.observe(root);
    this.width = root.clientWidth;
  }

  bindControls() {
    this.q('[data-act="next"]').addEventListener("click", () => this.onNext());
    this.q('[data-act="play"]').addEventListener("click", () => this.onPlay());
    this.q('[data-act="reset"]').addEventListener("click", () => this.request({ do: "reset" }));
    const slider = this.q(".kvsv-scrub input");
    slider.addEventListener("input", () => { this.pause(false); this.show(Number(slider.value)); });
    slider.addEventListener("change", () => this.scheduleSync());
    for (const b of this.root.querySelectorAll(".kvsv-tab")) b.addEventListener("click", () => this.setTab(b.dataset.tab));
    for (const r of this.root.querySelectorAll('input[name="kvsv-norm"]')) {
      r.addEventListener("change", () => { this.norm = r.value; this.render(); });
    }
  }

  // -- data from the server ---------------------------------------------------------------------
  update(d) {
    const first = this.runId === null;
    const runChanged = d.run !== this.runId;
    this.run = decode(d);
    this.d = d;
    this.layouts = {};  // axes are rebuilt once per server update (tokens, bounds, lengths may have changed)
    this.root.dataset.runs = d.runs;
    if (this.inflight !== null && d.ack >= this.inflight) this.inflight = null;
    if (first && d.tab) this.tab = d.tab;
    if (runChanged) { this.runId = d.run; this.pause(false); this.queued = 0; }
    if (runChanged || d.nonce !== this.nonce) { this.nonce = d.nonce; this.view = d.view; }
    this.view = Math.max(0, Math.min(this.view, this.run.n - 1));
    this.renderTabs();
    if (d.autoplay != null && d.autoplay !== this.autoplayNonce) {
      this.autoplayNonce = d.autoplay;
      if (!first) this.play();  // a reload must not start playing on its own
    }
    if (this.queued > 0 && this.inflight === null && this.atNewest() && !d.done) {
      const n = this.queued;
      this.queued = 0;
      this.request({ do: "next", n });
    }
    this.render();
  }

  atNewest() { return this.view >= this.run.n - 1; }

  request(action) {
    if (this.standalone) return;
    this.seq += 1;
    this.inflight = this.seq;
    this.sent += 1;
    this.root.dataset.sent = this.sent;
    this.send("action", { ...action, view: this.view, id: this.seq });
    this.renderStatus();
  }

  // -- controls ---------------------------------------------------------------------------------
  onNext() {
    this.pause(false);
    if (!this.atNewest()) {  // the next recorded step: already here, no model step
      this.show(this.view + 1);
      this.scheduleSync();
      return;
    }
    if (this.d.done || this.standalone) return;
    if (this.inflight !== null) { this.queued += 1; this.renderStatus(); return; }  // every click counts
    this.request({ do: "next", n: 1 });
  }

  onPlay() {
    if (this.playing) { this.pause(true); return; }
    const complete = this.d.done || this.standalone;
    if (complete) {
      if (this.atNewest()) this.show(0);
      this.play();
    } else {
      this.request({ do: "play" });  // the server computes the rest once; the frames play here
    }
  }

  play() {
    // One recorded step per frame, at most `rate` a second: every step is seen; a slow machine
    // plays slower rather than skipping. data-frames / data-play-ms let a test measure the rate.
    this.playing = true;
    this.frames = 0;
    this.root.dataset.playing = "1";
    this.root.dataset.playFrom = this.view;
    const rate = Number(this.q(".kvsv-speed").value) || 10;
    let last = -Infinity, first = null;
    const tick = (now) => {
      if (!this.playing) return;
      if (now - last >= 1000 / rate - 4) {
        if (this.view >= this.run.n - 1) { this.pause(true); return; }
        last = now;
        if (first === null) first = now;
        this.show(this.view + 1);
        this.frames += 1;
        this.root.dataset.frames = this.frames;
        this.root.dataset.playMs = Math.round(performance.now() - first);
      }
      this.raf = requestAnimationFrame(tick);
    };
    this.renderStatus();
    this.raf = requestAnimationFrame(tick);
  }

  pause(sync) {
    if (!this.playing) return;
    this.playing = false;
    this.root.dataset.playing = "0";
    cancelAnimationFrame(this.raf);
    this.renderStatus();
    if (sync) this.scheduleSync();
  }

  scheduleSync() {  // tell the server the shown step once the user stops moving (URL, reload)
    if (this.standalone) return;
    clearTimeout(this.syncTimer);
    this.syncTimer = setTimeout(() => {
      if (this.playing || this.inflight !== null || this.view === this.d.view) return;
      this.send("action", { do: "view", view: this.view, id: ++this.seq });
    }, 400);
  }

  setTab(tab) {
    this.tab = tab;
    this.renderTabs();
    const shipped = this.d.arithmetic !== null || this.d.arithmetic_note !== null;
    if (!this.standalone && (tab === "arith") !== shipped) {  // the arithmetic travels only while its tab is open
      this.send("action", { do: "tab", tab, view: this.view, id: ++this.seq });
    }
    this.render();
  }

  show(t) {
    this.view = Math.max(0, Math.min(t, this.run.n - 1));
    this.render();
  }

  onResize() {
    const w = this.root.clientWidth;
    if (Math.abs(w - this.width) < 8) return;
    this.width = w;
    if (this.run) this.render(true);
  }

  // -- drawing ----------------------------------------------------------------------------------
  render() {
    if (!this.run) return;
    const d = this.run.d, t = this.view;
    this.renderBar();
    this.renderMetrics();
    this.renderStrip();
    this.q(".kvsv-sentence").innerHTML = `<div class="kvsv-looks">${esc(this.run.steps[t].sentence)}</div>` +
      `<div class="kvsv-share">Layer ${d.layer}: ${esc(d.sharing)}. The K and V below are KV head ${d.kv_head}'s.</div>`;
    this.q(".kvsv-story").innerHTML = this.run.steps[t].story;  // escaped HTML built by kvviz.figures.step
    this.root.dataset.view = t;
    if (!this.P) {  // plotly.js loads once; then every frame draws synchronously
      loadPlotly(this.plotlyUrl || PLOTLY_URL).then((P) => { this.P = P; this.render(); }, (e) => {
        this.q(".kvsv-status").textContent = `plotly.js could not be loaded (${e.message}): start the app with ` +
          "`streamlit run app.py` from the kvviz folder, whose .streamlit/config.toml serves it.";
      });
      return;
    }
    if (this.tab === "main") {
      this.drawKV(t);  // K first: what a click waits for
      this.drawQKV(t);
      this.drawAttention(t);
      this.drawTop(t);
    } else if (this.tab === "arith") {
      this.drawArith(t);
    } else {
      this.drawOverviews(t);
    }
  }

  renderBar() {
    const n = this.run.n, t = this.view;
    const slider = this.q(".kvsv-scrub input");
    slider.max = String(n - 1);
    slider.value = String(t);
    slider.disabled = n < 2;
    this.q(".kvsv-stepno").textContent = `step ${t} of ${n - 1}`;
    const next = this.q('[data-act="next"]');
    const over = this.d.done && this.atNewest();
    next.disabled = over || (this.standalone && this.atNewest());
    const play = this.q('[data-act="play"]');
    play.innerHTML = this.playing ? `${ICONS.pause}<span>Pause</span>` : `${ICONS.play}<span>Play</span>`;
    this.q('[data-act="play"]').disabled = n < 2 && (this.d.done || this.standalone);
    this.q('[data-act="reset"]').style.display = this.standalone ? "none" : "";
    this.renderStatus();
  }

  renderStatus() {
    const el = this.q(".kvsv-status");
    if (!this.d) return;
    const parts = [];
    if (this.inflight !== null) parts.push(this.queued ? `running a step… (${this.queued} more queued)` : "running a step…");
    if (this.playing) parts.push("playing in the browser (no server round trip per frame)");
    if (this.d.done && this.atNewest() && !this.playing) parts.push(`Generation is over: ${this.d.stopped || "done"}. Reset or change the settings to run again.`);
    el.textContent = parts.join(" · ");
    for (const n of this.d.notices || []) {
      const p = document.createElement("div");
      p.className = `kvsv-notice kvsv-${n.kind}`;
      p.textContent = n.text;
      el.appendChild(p);
    }
    const next = this.q('[data-act="next"]');
    next.querySelector("span").textContent = this.queued ? `Next step (+${this.queued})` : "Next step";
    next.classList.toggle("kvsv-busy", this.inflight !== null);
  }

  renderTabs() {
    for (const b of this.root.querySelectorAll(".kvsv-tab")) b.setAttribute("aria-selected", b.dataset.tab === this.tab ? "true" : "false");
    for (const p of this.root.querySelectorAll(".kvsv-pane")) p.style.display = p.dataset.pane === this.tab ? "" : "none";
  }

  renderMetrics() {
    const { steps, d } = this.run, t = this.view, s = steps[t];
    const grew = s.cache_len - (t ? steps[t - 1].cache_len : 0);
    const decode = steps.slice(1, t + 1);
    const cached = median((t ? decode : [s]).map((x) => x.ms));
    const recompute = median((t ? decode : [s]).map((x) => x.recompute_ms));
    const parity = s.parity;
    const ok = parity != null && parity < 1e-4;
    const box = (label, value, sub, cls = "", title = "") =>
      `<div class="kvsv-metric ${cls}" title="${esc(title)}"><div class="kvsv-mlabel">${label}</div><div class="kvsv-mvalue">${value}</div><div class="kvsv-msub">${sub}</div></div>`;
    this.q(".kvsv-metrics").innerHTML = [
      box("Step", t === 0 ? "prefill" : `decode ${t}`, `${steps.length} recorded`, "", "Step 0 is prefill; each later step is one decode step."),
      box("Cache length", s.cache_len, `+${grew} position${grew === 1 ? "" : "s"}`, "", "Cached positions per layer and KV head after this step."),
      box("Cache bytes", human(d.bytes_per_token * s.cache_len), `${d.bytes_per_token.toLocaleString("en")} B per token`, "",
        `2 (K and V) × ${d.num_layers} layers × KV heads × ${d.head_dim} (head_dim) × bytes per number (${d.dtype}), × cache length`),
      parity == null ? box("Parity", "off", "not checked")
        : box("Parity |Δlogit|", parity.toExponential(1), ok ? "cache exact" : "cache differs", ok ? "kvsv-ok" : "kvsv-bad",
          "Largest |cached − full-recompute| next-token logit. Float32 noise is ~1e-6; green under 1e-4."),
      box("Step time", cached == null ? "–" : `${cached.toFixed(1)} ms`,
        recompute == null ? "cached forward" : `recompute ${recompute.toFixed(1)} ms`, "",
        t ? `Median over decode steps 1…${t}: the cached forward (capture included) beside a full recompute of the sequence.` : "Prefill: the whole prompt in one forward."),
    ].join("");
  }

  renderStrip() {
    const { d } = this.run, t = this.view, np = d.n_prompt;
    const fed0 = t === 0 ? 0 : np + t - 1, fed1 = t === 0 ? np : np + t;
    const chosen = np + t;
    const chips = d.tokens.map((tok, pos) => {
      const cls = ["kvsv-tok", pos < np ? "kvsv-prompt" : "kvsv-gen"];
      let role = "";
      if (pos >= fed0 && pos < fed1) { cls.push("kvsv-fed"); role = " · fed in at this step"; }
      else if (pos === chosen) { cls.push("kvsv-next"); role = " · chosen at this step (fed in next)"; }
      else if (pos > chosen) { cls.push("kvsv-future"); role = " · recorded later"; }
      const merged = d.merged[pos] ? ` · part of “${d.merged[pos]}”` : "";
      const title = `position ${pos} · id ${d.ids[pos]} · ${pos < np ? "prompt" : "generated"}${merged}${role}`;
      return `<span class="${cls.join(" ")}" title="${esc(title)}">${esc(tok)}</span>`;
    });
    this.q(".kvsv-strip").innerHTML = `<div class="kvsv-chips">${chips.join("")}</div>` +
      '<div class="kvsv-strip-legend"><span class="kvsv-tok kvsv-prompt">prompt</span><span class="kvsv-tok kvsv-gen">generated</span>' +
      '<span class="kvsv-tok kvsv-fed">fed in</span><span class="kvsv-tok kvsv-next">chosen next</span>' +
      "<span>Positions count from 0. ␣ = space · ⏎ = newline · &lt;0xE4&gt; = one byte of a character split across tokens (hover: the character)</span></div>";
  }

  theme() {
    const cs = getComputedStyle(this.root);
    const v = (name, fallback) => (cs.getPropertyValue(name) || "").trim() || fallback;
    return { text: v("--st-text-color", "#31333f"), font: v("--st-font", "Inter, Segoe UI, Helvetica, Arial, sans-serif") };
  }

  layout(height, extra = {}) {
    const th = this.theme();
    for (const [k, ax] of Object.entries(extra)) {
      // "allow": skips Plotly's per-label overflow measuring on every redraw
      if (/^[xy]axis\d*$/.test(k)) ax.ticklabeloverflow = "allow";
    }
    return {
      title: { text: "", x: 0, xanchor: "left", font: { size: 13 } }, height,
      margin: { l: 8, r: 8, t: 34, b: 10 }, paper_bgcolor: "rgba(0,0,0,0)", plot_bgcolor: "rgba(0,0,0,0)",
      font: { family: th.font, size: 11, color: th.text }, hoverlabel: { font: { size: 12 } }, showlegend: false, ...extra,
    };
  }

  // A layout whose axes are rebuilt only when `key` changes, so Plotly sees the same axis objects.
  cachedLayout(name, key, build) {
    const c = this.layouts[name];
    if (c && c.key === key) return c.layout;
    const layout = build();
    this.layouts[name] = { key, layout };
    return layout;
  }

  // Draw one chart. Every frame changes only the layout: the heatmaps arrive as images (painted on
  // a canvas here), the outline as a shape, the title. Plotly redraws those alone, while new trace
  // data would make it redraw the whole chart (axes, tick labels) - too slow for 10 frames a second.
  // The traces (what hover reads) follow once the view rests: `traces` is called then.
  paint(name, { base, title, images = [], shapes = [], traces, rows }) {
    const el = this.chart(name);
    if (!el || el.offsetParent === null) return;  // a hidden tab is drawn when shown
    const c = this.charts[name] || (this.charts[name] = {});
    c.layout = { ...base, title: { ...base.title, text: title }, images, shapes };
    c.pending = traces;
    if (!c.data) { c.data = traces(); c.pending = null; }
    this.P.react(el, c.data, c.layout, CHART_CONFIG);
    if (rows !== undefined) el.dataset.rows = rows;
    this.scheduleHover();
  }

  scheduleHover() {
    clearTimeout(this.hoverTimer);
    if (this.playing) return;
    this.hoverTimer = setTimeout(() => {
      for (const [name, c] of Object.entries(this.charts)) {
        const el = this.chart(name);
        if (!c.pending || !el || el.offsetParent === null) continue;
        c.data = c.pending();
        c.pending = null;
        this.P.react(el, c.data, c.layout, CHART_CONFIG);
      }
    }, 120);
  }

  // (rows, cols) cells -> a PNG data URL, one pixel per cell; null cells transparent
  heatImage(rows, cols, value, lut, zmin, zmax) {
    const canvas = this.canvas || (this.canvas = document.createElement("canvas"));
    canvas.width = Math.max(1, cols);
    canvas.height = Math.max(1, rows);
    const ctx = canvas.getContext("2d");
    const img = ctx.createImageData(canvas.width, canvas.height);
    const span = zmax - zmin || 1;
    for (let i = 0; i < rows; i++) {
      for (let j = 0; j < cols; j++) {
        const v = value(i, j), o = 4 * (i * cols + j);
        if (v == null || !Number.isFinite(v)) continue;
        const k = 3 * Math.max(0, Math.min(255, Math.round(((v - zmin) / span) * 255)));
        img.data[o] = lut[k]; img.data[o + 1] = lut[k + 1]; img.data[o + 2] = lut[k + 2]; img.data[o + 3] = 255;
      }
    }
    ctx.putImageData(img, 0, 0);
    return canvas.toDataURL();
  }

  // a layout image covering cells x0..x0+cols-1, y0..y0+rows-1 (data coordinates, centres)
  image(source, x0, y0, cols, rows, xref = "x", yref = "y", reversed = true) {
    return { source, xref, yref, x: x0 - 0.5, y: reversed ? y0 - 0.5 : y0 + rows - 0.5, sizex: cols, sizey: rows,
      sizing: "stretch", xanchor: "left", yanchor: "top", layer: "above" };
  }

  frame(t) {
    // The positions drawn at step t: the newest `crop`, in a frame that moves in strides, so the
    // axes (ticks, ranges) stay put across neighbouring steps and a frame of Play changes only the
    // numbers. Rows after step t inside the frame are empty: the future.
    const run = this.run, s = run.steps[t], n = s.kv_len, crop = run.d.look.crop;
    let end = run.maxKv <= crop ? run.maxKv : Math.min(run.maxKv, Math.max(crop, Math.ceil(n / STRIDE) * STRIDE));
    end = Math.max(end, n);
    const start = Math.max(0, end - crop);
    return { n, start, end, newFrom: Math.max(n - s.q_len, start) };
  }

  tickLabels(start, end, maxLabels) {
    const toks = this.run.d.tokens, vals = [], text = [];
    const every = Math.max(1, Math.ceil((end - start) / Math.max(1, maxLabels)));
    for (let p = start; p < end; p++) {
      if ((end - 1 - p) % every === 0) { vals.push(p); text.push(`${p} ${toks[p] ?? ""}`); }
    }
    return { vals, text };
  }

  outline(x0, x1, y0, y1, xref = "x", yref = "y") {
    return { type: "rect", xref, yref, x0: x0 - 0.5, x1: x1 + 0.5, y0: y0 - 0.5, y1: y1 + 0.5,
      line: { color: this.run.d.look.highlight, width: 2 }, fillcolor: "rgba(0,0,0,0)" };
  }

  drawKV(t) {
    const run = this.run, look = run.d.look, hd = run.hd;
    const [block, rows] = run.ref[t];
    const { n, start, end, newFrom } = this.frame(t);
    const height = Math.max(240, Math.min(720, 15 * (end - start) + 90));
    const crop = start ? ` · last ${Math.min(look.crop, n)} of ${n}` : "";
    for (const [name, blocks, bound] of [["K", run.K, run.kBound], ["V", run.V, run.vBound]]) {
      const a = blocks.get(block).a;
      const cell = (i, j) => (start + i < rows ? a[(start + i) * hd + j] : null);
      const base = this.cachedLayout(name, `${start}:${end}:${this.width}`, () => {
        const ticks = this.tickLabels(start, end, Math.floor((height - 90) / 12));
        return this.layout(height, {
          margin: { l: run.labelPx, r: 8, t: 34, b: 44 },
          xaxis: { range: [-0.5, hd - 0.5], title: { text: `${name} · head_dim index`, font: { size: 11 } }, showgrid: false, zeroline: false },
          yaxis: { range: [end - 0.5, start - 0.5], tickmode: "array", tickvals: ticks.vals, ticktext: ticks.text,
            showgrid: false, zeroline: false, tickfont: { size: 10 } },
        });
      });
      this.paint(name, {
        base, rows: Math.min(n, end) - start,
        title: `${name} · KV head ${run.d.kv_head} · ${n} rows${crop} · colour ±${fmt(bound, 2)}`,
        images: [this.image(this.heatImage(end - start, hd, cell, run.valueLut, -bound, bound), 0, start, hd, end - start)],
        shapes: [this.outline(0, hd - 1, newFrom, n - 1)],
        traces: () => {
          const z = [], y = [];
          for (let p = start; p < Math.min(rows, end); p++) { z.push(Array.from(a.subarray(p * hd, (p + 1) * hd))); y.push(p); }
          return [{ type: "heatmap", name, z, x: run.hdIndex, y, colorscale: look.value_scale, zmid: 0, zmin: -bound, zmax: bound,
            showscale: false, opacity: 0, hovertemplate: `${name}[%{y}][%{x}] = %{z:.4f}<extra></extra>` }];
        },
      });
    }
    this.drawMinimap(block, rows, start, Math.min(n, end));
  }

  drawMinimap(block, rows, start, end) {
    const mini = this.chart("mini"), run = this.run;
    if (run.maxKv <= run.d.look.crop) { mini.style.display = "none"; return; }
    mini.style.display = "";
    const hd = run.hd, a = run.K.get(block).a;
    // the whole cache, one column per position: mean |k| over head_dim (a (1, n) strip is all a minimap needs)
    const strip = [];
    for (let p = 0; p < run.maxKv; p++) {
      let sum = 0;
      if (p < rows) for (let j = 0; j < hd; j++) sum += Math.abs(a[p * hd + j]);
      strip.push(p < rows ? sum / hd : null);
    }
    const top = Math.max(...strip.filter((x) => x != null), 1e-9);
    const base = this.cachedLayout("mini", `${run.maxKv}:${this.width}`, () => this.layout(96, {
      margin: { l: run.labelPx, r: 8, t: 28, b: 22 },
      xaxis: { range: [-0.5, run.maxKv - 0.5], showgrid: false, zeroline: false, tickfont: { size: 9 } },
      yaxis: { range: [0.5, -0.5], showticklabels: false, showgrid: false, zeroline: false },
    }));
    this.paint("mini", {
      base, title: `the whole cache: ${rows} positions; the charts above show the outlined ${end - start}`,
      images: [this.image(this.heatImage(1, run.maxKv, (i, j) => strip[j], run.greyLut, 0, top), 0, 0, run.maxKv, 1)],
      shapes: [this.outline(start, end - 1, 0, 0)],
      traces: () => [{ type: "heatmap", name: "minimap", z: [strip], x: run.positions, y: [0], colorscale: "Greys", showscale: false, opacity: 0,
        hoverongaps: false, hovertemplate: "position %{x}: mean |k| %{z:.3f}<extra></extra>" }],
    });
  }

  drawQKV(t) {
    const run = this.run, hd = run.hd, s = run.steps[t], look = run.d.look;
    const rows = [["q′", run.q(t), run.qBound, `q′ head ${run.d.head}`], ["k′", run.k(t), run.knBound, `k′ KV head ${run.d.kv_head}`],
      ["v′", run.v(t), run.vnBound, `v′ KV head ${run.d.kv_head}`]];
    const base = this.cachedLayout("qkv", `${this.width}:${run.qBound}:${run.knBound}:${run.vnBound}`, () => {
      const axes = {};
      rows.forEach(([, , bound, label], i) => {
        axes[i ? `yaxis${i + 1}` : "yaxis"] = { domain: [1 - (i + 1) / 3 + 0.04, 1 - i / 3 - 0.04], range: [0.5, -0.5], tickmode: "array",
          tickvals: [0], ticktext: [`${label} · ±${fmt(bound, 2)}`], showgrid: false, zeroline: false, tickfont: { size: 10 } };
        if (i) axes[`yaxis${i + 1}`].anchor = "x";
      });
      return this.layout(200, { ...axes, margin: { l: 150, r: 8, t: 34, b: 40 },
        xaxis: { anchor: "y3", range: [-0.5, hd - 0.5], title: { text: "head_dim index", font: { size: 11 } }, showgrid: false, zeroline: false } });
    });
    const tok = run.d.tokens[s.position] ?? "";
    this.paint("qkv", {
      base, title: `q′ k′ v′ of ${s.position} ${tok}: each on its own colour scale`,
      images: rows.map(([, vec, bound], i) => this.image(this.heatImage(1, hd, (r, j) => vec[j], run.valueLut, -bound, bound), 0, 0, hd, 1,
        "x", i ? `y${i + 1}` : "y")),
      traces: () => rows.map(([name, vec, bound], i) => ({
        type: "heatmap", name: i ? name : "qkv", z: [Array.from(vec)], x: run.hdIndex, y: [0], yaxis: i ? `y${i + 1}` : "y",
        colorscale: look.value_scale, zmid: 0, zmin: -bound, zmax: bound, showscale: false, opacity: 0,
        hovertemplate: `${name}[%{x}] = %{z:.4f}<extra></extra>` })),
    });
  }

  drawAttention(t) {
    const run = this.run, look = run.d.look, s = run.steps[t];
    const { n, start, end } = this.frame(t);
    const last = run.rowStart[t] + s.q_len;  // query rows recorded up to step t
    const shift = n - last;  // row r is the query at position r + shift (0 unless a cache started non-empty)
    const cols = end - start, raw = [], norm = this.norm === "row";
    let gmax = 0;
    for (let p = start; p < end; p++) {
      const r = p - shift, rawRow = new Array(cols).fill(null);
      const a = r >= 0 && r < last ? run.att.get(r).a : null;
      if (a) for (let c = start; c <= Math.min(p, end - 1); c++) if (c < a.length) rawRow[c - start] = a[c];
      let mx = 0;
      for (const w of rawRow) if (w != null && w > mx) mx = w;
      rawRow.max = mx;
      if (mx > gmax) gmax = mx;
      raw.push(rawRow);
    }
    const newest = raw[n - 1 - start] || [];
    const zmax = norm ? 1 : gmax || 1;
    const value = (i, j) => { const w = raw[i][j]; return w == null ? null : norm ? (raw[i].max > 0 ? w / raw[i].max : 0) : w; };
    const barH = 60;  // the bars as a (barH, cols) image: a column of cells per key, filled up to its weight
    const barLevel = (i, j) => { const w = newest[j]; return w != null && (barH - i) / barH <= w + 1e-9 ? j : null; };
    const colors = [];
    for (let c = start; c < end; c++) colors.push(c === n - 1 ? 2 : c < run.d.n_prompt ? 0 : 1);
    const base = this.cachedLayout("att", `${start}:${end}:${this.width}`, () => {
      const width = this.chart("att").clientWidth || 600;
      const xt = this.tickLabels(start, end, Math.floor((width - run.labelPx - 40) / 12));
      const yt = this.tickLabels(start, end, 34);
      const height = Math.max(400, Math.min(780, 12 * cols + 190 + run.labelPx));
      return this.layout(height, {
        margin: { l: run.labelPx, r: 8, t: 34, b: run.labelPx + 26 },
        xaxis: { anchor: "y2", range: [start - 0.5, end - 0.5], tickmode: "array", tickvals: xt.vals, ticktext: xt.text,
          tickangle: -90, tickfont: { size: 10 }, showgrid: false, zeroline: false,
          title: { text: "key: a cached position and its token", font: { size: 11 } } },
        yaxis: { domain: [0.3, 1], range: [end - 0.5, start - 0.5], tickmode: "array", tickvals: yt.vals, ticktext: yt.text,
          showgrid: false, zeroline: false, tickfont: { size: 10 } },
        yaxis2: { domain: [0, 0.24], range: [0, 1], title: { text: "q′ weight", font: { size: 11 } }, fixedrange: true,
          showgrid: false, zeroline: false },
      });
    });
    const crop = start ? ` · last ${Math.min(look.crop, n)} of ${n}` : "";
    this.paint("att", {
      base, rows: Math.min(n, end) - start,
      title: `attention · layer ${run.d.layer} head ${run.d.head}: ${n} query rows${crop}`,
      images: [
        this.image(this.heatImage(cols, cols, value, run.weightLut, 0, zmax), start, start, cols, cols),
        { ...this.image(this.heatImage(barH, cols, (i, j) => (barLevel(i, j) == null ? null : colors[j]), run.barLut, 0, 2),
          start, 0, cols, 1, "x", "y2", false), y: 1, sizey: 1 },
      ],
      shapes: [this.outline(start, Math.min(n, end) - 1, Math.max(n - s.q_len, start), n - 1)],
      traces: () => {
        const ys = [], z = [];
        for (let p = start; p < Math.min(n, end); p++) { ys.push(p); z.push(raw[p - start].map((w, j) => value(p - start, j))); }
        const xs = [];
        for (let c = start; c < end; c++) xs.push(c);
        return [
          { type: "heatmap", name: "attention", z, x: xs, y: ys, customdata: raw.slice(0, ys.length), colorscale: look.weight_scale,
            zmin: 0, zmax, showscale: false, hoverongaps: false, opacity: 0,
            hovertemplate: "query %{y} → key %{x}: weight %{customdata:.3f}<extra></extra>" },
          { type: "bar", name: "q′ weights", x: xs, y: xs.map((c, j) => newest[j] ?? 0), yaxis: "y2", opacity: 0,
            hovertemplate: "q′ → key %{x}: %{y:.3f}<extra></extra>" },
        ];
      },
    });
    this.q(".kvsv-legend").innerHTML =
      `<span class="kvsv-sw" style="background:${look.prompt}"></span>prompt <span class="kvsv-sw" style="background:${look.generated}"></span>generated ` +
      `<span class="kvsv-sw" style="background:${look.highlight}"></span>the new token itself. Bars: q′'s softmax(q′Kᵀ/√d) over every cached key (they sum to 1). ` +
      (norm ? "Colour: each row divided by its own largest weight, so every row's pattern shows (hover: the real weight)."
        : `Colour: one scale for the whole matrix, 0 to ${fmt(gmax, 2)}.`);
  }

  drawTop(t) {  // HTML bars: the tokens change every step, and a Plotly category axis would relayout each time
    const run = this.run, s = run.steps[t];
    const items = s.top.map(([tok, p, id]) => [tok, p, id]);
    if (!items.some(([, , id]) => id === s.token_id)) items.push([s.token, s.prob, s.token_id]);
    const top = Math.max(...items.map(([, p]) => p)) || 1;
    this.q(".kvsv-top").innerHTML = `<div class="kvsv-top-title">next token: ${esc(s.token)} (p = ${(s.prob * 100).toFixed(1)}%)</div>` +
      items.map(([tok, p, id]) => `<div class="kvsv-top-row${id === s.token_id ? " kvsv-chosen" : ""}" title="id ${id}: p = ${p.toFixed(4)}">` +
        `<span class="kvsv-top-tok">${esc(tok)} <small>·${id}</small></span><span class="kvsv-top-bar"><span style="width:${(100 * p / top).toFixed(1)}%"></span></span>` +
        `<span class="kvsv-top-p">${(p * 100).toFixed(1)}%</span></div>`).join("");
  }

  drawOverviews(t) {
    const run = this.run, d = run.d, look = d.look, s = run.steps[t];
    const h = run.heads.get(t), l = run.layers.get(t);
    const [nh, cols] = h.shape, nl = l.shape[0];
    const x0 = s.kv_len - cols;
    const xs = [];
    for (let i = 0; i < cols; i++) xs.push(x0 + i);
    const xaxis = () => {
      const ticks = this.tickLabels(x0, x0 + cols, Math.floor(((this.chart("heads").clientWidth || 600) - run.labelPx - 40) / 12));
      return { range: [x0 - 0.5, x0 + cols - 0.5], tickmode: "array", tickvals: ticks.vals, ticktext: ticks.text, tickangle: -90,
        tickfont: { size: 9 }, showgrid: false, zeroline: false };
    };
    const hmax = Math.max(...h.a, 1e-9), lmax = Math.max(...l.a, 1e-9);
    const sep = [];
    for (let i = 1; i < nh; i++) if (d.kv_head_of[i] !== d.kv_head_of[i - 1]) {
      sep.push({ type: "line", xref: "paper", x0: 0, x1: 1, y0: i - 0.5, y1: i - 0.5, line: { color: "rgba(128,128,128,.9)", width: 1, dash: "dot" } });
    }
    const baseH = this.cachedLayout("heads", `${x0}:${cols}:${this.width}`, () => this.layout(Math.max(220, 24 * nh + 90 + run.labelPx), {
      margin: { l: 80, r: 8, t: 34, b: run.labelPx }, xaxis: xaxis(),
      yaxis: { range: [nh - 0.5, -0.5], tickmode: "array", tickvals: [...Array(nh).keys()],
        ticktext: [...Array(nh).keys()].map((i) => `q${i} → kv${d.kv_head_of[i]}`), showgrid: false, zeroline: false } }));
    this.paint("heads", {
      base: baseH, title: `newest query of every head · layer ${d.layer} (colour 0 to ${fmt(hmax, 2)})`,
      images: [this.image(this.heatImage(nh, cols, (i, j) => h.a[i * cols + j], run.weightLut, 0, hmax), x0, 0, cols, nh)],
      shapes: [...sep, this.outline(x0, x0 + cols - 1, d.head, d.head)],
      traces: () => [{ type: "heatmap", name: "heads", z: rowsOf(h.a, nh, cols), x: xs, y: [...Array(nh).keys()], colorscale: look.weight_scale,
        zmin: 0, zmax: hmax, showscale: false, opacity: 0, hovertemplate: "head %{y} → key %{x}: %{z:.3f}<extra></extra>" }],
    });
    const baseL = this.cachedLayout("layers", `${x0}:${cols}:${this.width}`, () => this.layout(Math.max(200, 26 * nl + 90 + run.labelPx), {
      margin: { l: 80, r: 8, t: 34, b: run.labelPx }, xaxis: xaxis(),
      yaxis: { range: [nl - 0.5, -0.5], tickmode: "array", tickvals: [...Array(nl).keys()],
        ticktext: [...Array(nl).keys()].map((i) => `layer ${i}`), showgrid: false, zeroline: false } }));
    this.paint("layers", {
      base: baseL, title: `newest query of every layer, mean over its heads (colour 0 to ${fmt(lmax, 2)})`,
      images: [this.image(this.heatImage(nl, cols, (i, j) => l.a[i * cols + j], run.weightLut, 0, lmax), x0, 0, cols, nl)],
      shapes: [this.outline(x0, x0 + cols - 1, d.layer, d.layer)],
      traces: () => [{ type: "heatmap", name: "layers", z: rowsOf(l.a, nl, cols), x: xs, y: [...Array(nl).keys()], colorscale: look.weight_scale,
        zmin: 0, zmax: lmax, showscale: false, opacity: 0, hovertemplate: "layer %{y} → key %{x}: %{z:.3f} (mean over heads)<extra></extra>" }],
    });
    const lens = run.steps.map((x) => x.cache_len), bpt = d.bytes_per_token;
    const baseS = this.cachedLayout("size", `${lens.length}:${this.width}`, () => this.layout(260, {
      margin: { l: 60, r: 8, t: 34, b: 44 },
      xaxis: { range: [-0.5, lens.length - 0.5], title: { text: "step (0 = prefill)" } },
      yaxis: { range: [0, Math.max(...lens) * 1.1 + 1], title: { text: "cached positions" } } }));
    this.paint("size", {
      base: baseS, title: `cache size: ${human(lens[t] * bpt)} at step ${t} (${bpt.toLocaleString("en")} B per position)`,
      shapes: [{ type: "circle", xref: "x", yref: "y", x0: t - 0.25, x1: t + 0.25, y0: lens[t] - Math.max(...lens) * 0.03,
        y1: lens[t] + Math.max(...lens) * 0.03, fillcolor: look.highlight, line: { width: 0 } }],
      traces: () => [{ type: "scatter", mode: "lines+markers", name: "cache length", x: lens.map((_, i) => i), y: lens,
        line: { color: look.generated }, customdata: lens.map((c) => human(c * bpt)),
        hovertemplate: "step %{x}: %{y} positions · %{customdata}<extra></extra>" }],
    });
  }

  drawArith(t) {
    const box = this.q(".kvsv-arith");
    const run = this.run, d = run.d, A = run.arith;
    if (!A) {
      box.dataset.built = "";
      box.innerHTML = `<p class="kvsv-note">${esc(d.arithmetic_note || "Computing the arithmetic of this layer and head…")}</p>`;
      return;
    }
    const a = A.a, hd = run.hd;
    const pos = a.position[t], scaling = a.scaling[t];
    const w = A.weights.get(t).a, dots = A.dots.get(t).a, sc = A.scores.get(t).a;
    let top = 0;
    for (let j = 1; j < w.length; j++) if (w[j] > w[top]) top = j;
    const tk = (p) => esc(d.tokens[p] ?? "");
    const check = a.check[t];
    const order = [...w.keys()].sort((i, j) => w[j] - w[i]).slice(0, 3);
    const mix = order.map((j) => `${fmt(w[j], 2)}·v${sub(j)}`).join(" + ");
    if (!box.dataset.built) {
      box.innerHTML = [0, 1, 2, 3, 4].map((i) => `<p class="kvsv-eq kvsv-a${i}"></p><div class="kvsv-chart" data-chart="a${i}"></div>`).join("") +
        '<p class="kvsv-eq kvsv-a5"></p>';
      box.dataset.built = "1";
      for (const k of Object.keys(this.charts)) if (/^a\d$/.test(k)) delete this.charts[k];
    }
    const set = (i, html) => { box.querySelector(`.kvsv-a${i}`).innerHTML = html; };
    const angles = a.rope ? A.angles(t) : null;
    set(0, `<b>1 · the input x</b> of layer ${d.layer} at position ${pos} (“${tk(pos)}”), after the layer's norm: ${a.hidden} numbers, what the step fed this layer.`);
    set(1, `<b>2 · project</b>: q = x·W<sub>q</sub>, k = x·W<sub>k</sub>, v = x·W<sub>v</sub>, with query head ${d.head}'s rows of q_proj and KV head ${d.kv_head}'s rows of k_proj and v_proj: ${hd} numbers each, before RoPE.`);
    set(2, a.rope
      ? `<b>3 · rotate (RoPE)</b>: each pair (i, i + ${hd / 2}) of q and of k turns by position × θ<sub>i</sub> (θ<sub>i</sub> = base<sup>−2i/${hd}</sup>): at position ${pos}, pair 0 by ${fmt(angles[0], 2)} rad, pair ${a.pairs.length - 1} by ${fmt(angles[a.pairs.length - 1], 4)} rad. Lengths stay; what changes is the angle between q′ and each k′, which now depends on how far apart they are. Before (q, k) and after (q′, k′):`
      : "<b>3 · position</b>: this model adds a learned position embedding to x before the first layer, so nothing turns here: q′ = q, k′ = k.");
    const masked = [...sc].some((x) => !Number.isFinite(x));
    set(3, `<b>4 · score every cached key</b>: score<sub>j</sub> = q′·k<sub>j</sub> × ${fmt(scaling, 4)} (1/√${hd}). The largest: q′·k${sub(top)} = ${fmt(dots[top], 2)} → ${fmt(sc[top], 2)}, at “${tk(top)}” (pos ${top}). ` +
      (masked ? "Masked keys (the future) get −∞. " : "No key is masked: nothing cached is in the future. ") +
      `<b>5 · softmax</b> turns the scores into weights that sum to 1: ${fmt(w[top], 3)} for pos ${top}.`);
    set(4, `<b>6 · mix</b>: output = Σ weight<sub>j</sub> · v<sub>j</sub> = ${mix} + …: head ${d.head}'s output (${hd} numbers). <b>7 · o_proj</b>: W<sub>o</sub>'s ${hd} columns for this head map it back to ${a.hidden} numbers:`);
    set(5, `The layer's attention output is the sum of every head's part (plus o_proj's bias), added to the residual stream.` +
      (check == null ? "" : ` <span class="kvsv-check">Recomputed from the model's weights; each piece matches what the forward recorded to within ${check.toExponential(0)}.</span>`));
    const strips = (name, vecs, labels) => {
      const base = this.cachedLayout(name, `${labels.join()}:${vecs[0].length}:${this.width}`, () => {
        const axes = {};
        labels.forEach((lab, i) => {
          axes[i ? `yaxis${i + 1}` : "yaxis"] = { domain: [1 - (i + 1) / labels.length + 0.03, 1 - i / labels.length - 0.03], range: [0.5, -0.5],
            tickmode: "array", tickvals: [0], ticktext: [lab], showgrid: false, zeroline: false, tickfont: { size: 10 }, anchor: "x" };
        });
        return this.layout(34 * labels.length + 44, { ...axes, margin: { l: 130, r: 8, t: 6, b: 26 },
          xaxis: { anchor: labels.length > 1 ? `y${labels.length}` : "y", range: [-0.5, vecs[0].length - 0.5], showgrid: false, zeroline: false,
            tickfont: { size: 9 } } });
      });
      this.paint(name, {
        base, title: "",
        images: vecs.map((vec, i) => { const b = absMax(vec); return this.image(this.heatImage(1, vec.length, (r, j) => vec[j], run.valueLut, -b, b), 0, 0,
          vec.length, 1, "x", i ? `y${i + 1}` : "y"); }),
        traces: () => vecs.map((vec, i) => { const b = absMax(vec); return { type: "heatmap", name: labels[i], z: [Array.from(vec)],
          x: [...Array(vec.length).keys()], y: [0], yaxis: i ? `y${i + 1}` : "y", colorscale: d.look.value_scale, zmid: 0, zmin: -b, zmax: b,
          showscale: false, opacity: 0, hovertemplate: `${labels[i]}[%{x}] = %{z:.4f}<extra></extra>` }; }),
      });
    };
    const lab = (name, vec) => `${name} ±${fmt(absMax(vec), 2)}`;
    strips("a0", [A.x(t)], [lab("x", A.x(t))]);
    strips("a1", [A.q(t), A.k(t), A.v(t)], [lab("q", A.q(t)), lab("k", A.k(t)), lab("v", A.v(t))]);
    strips("a2", a.rope ? [A.q(t), A.qr(t), A.k(t), A.kr(t)] : [A.qr(t), A.kr(t)],
      a.rope ? [lab("q", A.q(t)), lab("q′ = RoPE(q)", A.qr(t)), lab("k", A.k(t)), lab("k′ = RoPE(k)", A.kr(t))] : [lab("q′", A.qr(t)), lab("k′", A.kr(t))]);
    const xs = [...w.keys()];
    const baseS = this.cachedLayout("a3", `${w.length}:${this.width}`, () => {
      const ticks = this.tickLabels(0, w.length, Math.floor(((this.chart("a3").clientWidth || 600) - 80) / 12));
      return this.layout(300 + run.labelPx, { margin: { l: 60, r: 8, t: 6, b: run.labelPx },
        xaxis: { anchor: "y2", range: [-0.5, w.length - 0.5], tickmode: "array", tickvals: ticks.vals, ticktext: ticks.text, tickangle: -90, tickfont: { size: 9 } },
        yaxis: { domain: [0.56, 1], title: { text: "score", font: { size: 10 } } },
        yaxis2: { domain: [0, 0.44], range: [0, 1.05], title: { text: "weight", font: { size: 10 } } } });
    });
    this.charts.a3 = null;  // scores change scale every step: plain traces (this tab is not the animation's hot path)
    this.paint("a3", { base: baseS, title: "", traces: () => [
      { type: "bar", name: "score", x: xs, y: Array.from(sc).map((x) => (Number.isFinite(x) ? x : null)), marker: { color: d.look.generated },
        hovertemplate: "q′·k%{x} × scaling = %{y:.3f}<extra></extra>", yaxis: "y" },
      { type: "bar", name: "weight", x: xs, y: Array.from(w), marker: { color: xs.map((j) => (j === top ? d.look.highlight : d.look.prompt)) },
        hovertemplate: "softmax → %{y:.4f}<extra></extra>", yaxis: "y2" },
    ] });
    strips("a4", [A.out(t), A.o(t)], [lab(`output (head ${d.head})`, A.out(t)), lab("o_proj part", A.o(t))]);
  }

  stop() { this.pause(false); this.resizeObserver.disconnect(); clearTimeout(this.syncTimer); }
}

export default function (component) {
  const { data, parentElement, setTriggerValue } = component;
  const root = parentElement.querySelector(".kvsv-root") || parentElement;
  let view = root.__kvsv;
  if (!view) view = root.__kvsv = new StepView(root, false);
  view.send = setTriggerValue;
  if (data) view.update(data);
  return () => {};  // kept across reruns: Streamlit calls this again with new data on the same element
}

// the standalone HTML export (no Streamlit, a complete run): window.kvvizStepView(root, data)
window.kvvizStepView = (root, data, plotlyUrl) => {
  const view = root.__kvsv = new StepView(root, true);
  view.plotlyUrl = plotlyUrl;
  view.update(data);
  return view;
};
