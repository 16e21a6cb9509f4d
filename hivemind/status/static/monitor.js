// Monitor page of hivemind-worker: polls the status API and draws what it gets.
// No library, no network beyond this worker; every value goes in through textContent, never HTML.
"use strict";

(function () {
  const POLL_MS = 2000;
  const HISTORY = 150;                // points kept per chart (5 min at 2 s)
  const ACTIVE = new Set(["accepted", "preparing", "running"]);
  const history = { cpu: [], mem: [] };
  const $ = (id) => document.getElementById(id);

  // The token may come once in the URL fragment (never sent to the server), then lives in this tab.
  function takeTokenFromHash() {
    const m = /(?:^#|&)token=([^&]+)/.exec(location.hash);
    if (m) {
      sessionStorage.setItem("hivemind-token", decodeURIComponent(m[1]));
      history_replace();
    }
  }
  function history_replace() {
    window.history.replaceState(null, "", location.pathname + location.search);
  }
  const token = () => sessionStorage.getItem("hivemind-token") || "";

  async function api(path, method) {
    const headers = { Accept: "application/json" };
    if (token()) headers.Authorization = "Bearer " + token();
    const resp = await fetch(path, { method: method || "GET", headers, cache: "no-store" });
    if (resp.status === 401) throw new AuthNeeded();
    const body = await resp.json().catch(() => ({}));
    if (!resp.ok) throw new Error(body.detail || body.error || ("HTTP " + resp.status));
    return body;
  }
  class AuthNeeded extends Error {}

  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }
  function fillDl(dl, pairs) {
    dl.replaceChildren();
    for (const [k, v, cls] of pairs) {
      dl.append(el("dt", k), el("dd", v, cls));
    }
  }
  const gib = (b) => (b / 1073741824).toFixed(b >= 10 * 1073741824 ? 0 : 1) + " GiB";
  const cores = (c) => (Math.round(c * 100) / 100) + (c === 1 ? " core" : " cores");
  function ago(ts) {
    if (ts === null || ts === undefined) return "never";
    const s = Math.max(0, Date.now() / 1000 - ts);
    return s < 90 ? Math.round(s) + " s ago" : Math.round(s / 60) + " min ago";
  }
  function dur(s) {
    if (s === null || s === undefined) return "";
    s = Math.max(0, Math.round(s));
    return s < 120 ? s + " s" : s < 7200 ? Math.round(s / 60) + " min" : (s / 3600).toFixed(1) + " h";
  }
  const clock = (ts) => ts ? new Date(ts * 1000).toLocaleTimeString() : "";

  function renderStatus(st) {
    $("node-id").textContent = st.node_id + " · v" + st.version;
    const p = st.pool;
    fillDl($("pool"), [
      ["address", p.address],
      ["protocol", p.protocol + ((p.protocol_limitations || []).length ? " (" + p.protocol_limitations.join("; ") + ")" : "")],
      ["state", p.state, p.state === "registered" ? "" : "bad-text"],
      ["reported", p.reported_status],
      ["last heartbeat", ago(p.last_heartbeat), p.heartbeat_failures ? "bad-text" : ""],
      ["failures", p.heartbeat_failures],
    ]);
    const ex = st.executor, enf = ex.enforces || {};
    const limits = ["memory", "cpu", "pids", "network_isolated", "readonly_root"]
      .filter((k) => enf[k]).join(", ") || "none";
    const sec = st.security;
    fillDl($("executor"), [
      ["executor", (ex.name || "none") + (ex.isolation ? " (" + ex.isolation + ")" : ""),
        ex.usable ? "" : "bad-text"],
      ["enforces", limits, limits === "none" ? "bad-text" : ""],
      ["gRPC auth", sec.grpc_auth_mode + (sec.insecure ? " · INSECURE" : ""), sec.insecure ? "bad-text" : ""],
      ["metrics", st.metrics_backend],
    ]);
    const r = st.resources;
    fillDl($("capacity"), [
      ["slots", st.slots.used + " / " + st.slots.total + " used"],
      ["CPU free", cores(r.cpu.free) + " of " + cores(r.cpu.total)],
      ["memory free", gib(r.memory.free_bytes) + " of " + gib(r.memory.total_bytes)],
      ["GPUs", r.gpus],
      ["draining", st.draining ? "yes" : "no", st.draining ? "bad-text" : ""],
    ]);
    const conn = $("conn");
    conn.textContent = st.draining ? "draining" : p.state;
    conn.className = "pill " + (st.draining ? "warn" : p.state === "registered" ? "ok" : "bad");

    const memPct = r.memory.total_bytes ? 100 * r.memory.used_bytes / r.memory.total_bytes : 0;
    push(history.cpu, r.cpu.usage_percent);
    push(history.mem, memPct);
    $("cpu-now").textContent = r.cpu.usage_percent.toFixed(0) + " %";
    $("mem-now").textContent = gib(r.memory.used_bytes) + " (" + memPct.toFixed(0) + " %)";
    drawChart($("cpu-chart"), history.cpu, "#2563eb");
    drawChart($("mem-chart"), history.mem, "#7c3aed");

    const ul = $("warnings");
    ul.replaceChildren();
    const ws = (st.warnings || []).slice(-20).reverse();
    if (!ws.length) ul.append(el("li", "none", "muted"));
    for (const w of ws) ul.append(el("li", clock(w.ts) + "  " + w.message, w.level));
  }

  function push(arr, v) {
    arr.push(Number.isFinite(v) ? v : 0);
    if (arr.length > HISTORY) arr.shift();
  }

  // A percent line chart (0..100) with a light grid; sets data-drawn/data-points for tests.
  function drawChart(canvas, series, color) {
    const dpr = window.devicePixelRatio || 1;
    const w = canvas.clientWidth || canvas.width, h = canvas.clientHeight || canvas.height;
    if (canvas.width !== Math.round(w * dpr)) { canvas.width = Math.round(w * dpr); canvas.height = Math.round(h * dpr); }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    const left = 34, top = 6, pw = w - left - 6, ph = h - top - 18;
    ctx.font = "11px system-ui, sans-serif";
    ctx.fillStyle = "#6b7280";
    ctx.strokeStyle = "#e3e6eb";
    ctx.lineWidth = 1;
    for (const pct of [0, 25, 50, 75, 100]) {
      const y = top + ph - ph * pct / 100;
      ctx.beginPath(); ctx.moveTo(left, y + 0.5); ctx.lineTo(left + pw, y + 0.5); ctx.stroke();
      ctx.fillText(pct + "%", 2, y + 4);
    }
    ctx.fillText("last " + Math.round(HISTORY * POLL_MS / 60000) + " min", left, h - 3);
    const n = series.length;
    if (n) {
      const x = (i) => left + pw - (n - 1 - i) * pw / (HISTORY - 1);
      const y = (v) => top + ph - ph * Math.min(100, Math.max(0, v)) / 100;
      ctx.beginPath();
      series.forEach((v, i) => (i ? ctx.lineTo(x(i), y(v)) : ctx.moveTo(x(i), y(v))));
      ctx.strokeStyle = color; ctx.lineWidth = 2; ctx.stroke();
      ctx.lineTo(x(n - 1), top + ph); ctx.lineTo(x(0), top + ph); ctx.closePath();
      ctx.globalAlpha = 0.15; ctx.fillStyle = color; ctx.fill(); ctx.globalAlpha = 1;
      if (n === 1) { ctx.fillStyle = color; ctx.fillRect(x(0) - 2, y(series[0]) - 2, 4, 4); }
    }
    canvas.dataset.points = String(n);
    canvas.dataset.last = n ? series[n - 1].toFixed(1) : "";
    canvas.dataset.drawn = "1";
  }

  // Live: CPU and memory against the grant (what TaskUsage sends the pool); finished: totals.
  function usageText(t) {
    const u = t.usage;
    if (!u) return "";
    const pct = (v) => (v === undefined || v === null) ? "" : " (" + v.toFixed(0) + " %)";
    if (ACTIVE.has(t.state)) {
      return cores(u.cpu_cores) + " of " + cores(t.requested.cpus) + pct(u.cpu_percent) + " · " +
        gib(u.memory_bytes) + " of " + gib(t.requested.memory_bytes) + pct(u.memory_percent) +
        (u.pids ? " · " + u.pids + " procs" : "");
    }
    const parts = [];
    if (u.cpu_seconds !== undefined && u.cpu_seconds !== null) parts.push(u.cpu_seconds.toFixed(1) + " s CPU");
    if (u.peak_memory_bytes) parts.push("peak " + gib(u.peak_memory_bytes));
    if (u.max_pids) parts.push(u.max_pids + " procs");
    return parts.join(" · ");
  }

  // Which limits the kernel really enforces for this task; the title says how it was read.
  function limitsText(limits) {
    if (!limits) return { text: "", cls: "" };
    const names = { memory_bytes: "memory", cpus: "cpu", pids: "pids" };
    const on = [], off = [];
    for (const [k, v] of Object.entries(limits)) {
      if (v.requested === null) continue;
      (v.applied === null ? off : on).push(names[k] || k);
    }
    const text = (on.length ? on.join(", ") : "none") + (off.length ? " · not: " + off.join(", ") : "");
    return { text: text, cls: off.length ? "bad-text" : "" };
  }

  function renderTasks(list) {
    const tb = $("task-rows");
    tb.replaceChildren();
    $("task-count").textContent = "(" + list.length + ")";
    if (!list.length) {
      const tr = el("tr"); const td = el("td", "no tasks", "muted"); td.colSpan = 9;
      tr.append(td); tb.append(tr);
    }
    const now = Date.now() / 1000;
    for (const t of list) {
      const tr = el("tr");
      tr.dataset.taskId = t.task_id;
      tr.dataset.state = t.state;
      const state = el("td"); state.append(el("span", t.state, "state state-" + t.state));
      const run = t.started_at ? (t.finished_at || now) - t.started_at : null;
      const req = t.requested;
      const use = usageText(t);
      const lim = limitsText(t.limits);
      const limCell = el("td", lim.text, lim.cls);
      limCell.classList.add("limits");
      if (t.limits) limCell.title = Object.entries(t.limits).map(([k, v]) => k + ": " + v.how).join("\n");
      const exit = t.exit_reason ? t.exit_reason + (t.exit_code !== null ? " (" + t.exit_code + ")" : "") : "";
      const act = el("td");
      if (ACTIVE.has(t.state)) {
        const b = el("button", "Stop");
        b.type = "button";
        b.addEventListener("click", () => act_on("/api/v1/tasks/" + encodeURIComponent(t.task_id) + "/stop",
          "Stop task " + t.task_id + "?"));
        act.append(b);
      }
      tr.append(el("td", t.task_id, "id"), state, el("td", clock(t.created_at)), el("td", dur(run)),
        el("td", cores(req.cpus) + " · " + gib(req.memory_bytes) + (req.gpus ? " · " + req.gpus + " GPU" : "")),
        el("td", use, "usage"), limCell, el("td", exit, t.state === "failed" ? "bad-text" : ""), act);
      if (t.message) tr.title = t.message;
      tb.append(tr);
    }
  }

  async function act_on(path, question) {
    if (!window.confirm(question)) return;
    if (!token()) { wantToken = true; askToken(); return; }
    try { await api(path, "POST"); poll(); }
    catch (e) {
      if (e instanceof AuthNeeded) { wantToken = true; askToken(); } else window.alert(e.message);
    }
  }

  function askToken() {
    $("auth").hidden = false;
    document.body.dataset.state = "unauthorized";
    $("conn").textContent = "token needed";
    $("conn").className = "pill bad";
  }

  let timer = null;
  let wantToken = false;              // the form stays up until used, even while reads work
  async function poll() {
    clearTimeout(timer);
    try {
      // The node's status is open on loopback; the task list always needs the token, so draw
      // the status first and ask for the token (once per tab) when the list is refused.
      renderStatus(await api("/api/v1/status"));
      const tasks = await api("/api/v1/tasks");
      $("auth").hidden = !wantToken;
      renderTasks(tasks.tasks);
      document.body.dataset.state = "ok";
      document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
    } catch (e) {
      if (e instanceof AuthNeeded) { askToken(); return; }  // wait for the form
      document.body.dataset.state = "error";
      $("conn").textContent = "unreachable";
      $("conn").className = "pill bad";
    }
    timer = setTimeout(poll, POLL_MS);
  }

  document.addEventListener("DOMContentLoaded", () => {
    takeTokenFromHash();
    $("auth-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      sessionStorage.setItem("hivemind-token", $("auth-token").value.trim());
      $("auth-token").value = "";
      wantToken = false;
      poll();
    });
    $("drain-btn").addEventListener("click", () => act_on("/api/v1/drain", "Drain this worker? It takes no new tasks."));
    poll();
  });
})();
