// ksmtrace web page: polls the daemon's JSON API and draws it. Read-only.
//
// The API (ksmtrace/views/api.py) gives the rows every dashboard shares
// (ksmtrace/views/dash.py): /api/state (machine row, process rows, decision
// counts, mode), /api/history (points: wall, machine row, the top processes'
// rates), /api/decisions (recent decisions). History is asked for with
// ?since=WALL so that a poll carries only new points; a server that ignores
// the parameter still works, the points already held are skipped here.
// Charts: charts.js; formatting: fmt.js. window.ksmtrace is what the page
// shows the outside (what the charts drew, updates, the last error): the
// system test reads it.
"use strict";

(function () {
  const POLL_MS = 1500;
  const TIMEOUT_MS = 5000;
  const KEEP_POINTS = 600; // ten minutes at the daemon's one sample a second
  const TABLE_ROWS = 200;
  const DECISION_ROWS = 100;
  const RMAP_FLAG = 64;
  const { bytes, rate, count, pct, clock, el, cell } = window.ksmtraceParts.fmt;
  const charts = window.ksmtraceParts.charts;

  const ks = {
    charts: {},
    updates: 0,
    lastError: null,
    lastOk: null,
    points: 0,
  };
  window.ksmtrace = ks;

  let points = []; // history points, oldest first, procs as arrays
  let lastWall = -Infinity;
  let procRows = [];
  let sortKey = "ksm_cow_per_s";
  let sortDesc = true;
  let filterText = "";

  // ---- API shapes ---------------------------------------------------------

  // A point's processes as [{pid, comm, ...}]: codec.encode writes a dict of
  // pids as {"__items__": [[pid, row], ...]}, json.dumps as {"pid": row}.
  function procList(procs) {
    if (!procs) return [];
    if (Array.isArray(procs)) return procs;
    if (Array.isArray(procs.__items__)) {
      return procs.__items__.map(([pid, row]) => Object.assign({ pid: Number(pid) }, row));
    }
    return Object.keys(procs).map((pid) => Object.assign({ pid: Number(pid) }, procs[pid]));
  }

  // A list that is the body itself or under the first of ``keys`` that holds one.
  function listOf(body, ...keys) {
    if (Array.isArray(body)) return body;
    for (const k of keys) if (body && Array.isArray(body[k])) return body[k];
    return [];
  }

  async function get(path) {
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), TIMEOUT_MS);
    try {
      const r = await fetch(path, { cache: "no-store", signal: ctl.signal });
      if (!r.ok) throw new Error(path + ": HTTP " + r.status);
      return await r.json();
    } finally {
      clearTimeout(timer);
    }
  }

  // ---- machine cards --------------------------------------------------------

  function renderMachine(m) {
    const box = document.getElementById("machine");
    box.replaceChildren();
    if (!m) {
      box.appendChild(el("div", "muted", "no sample yet"));
      return;
    }
    const runState = { 0: "stopped", 1: "running", 2: "unmerging" }[m.run] || String(m.run);
    const cards = [
      ["saved", bytes(m.saved_bytes), "pages_sharing x page size"],
      ["general_profit", bytes(m.general_profit_bytes), "the kernel's net saving (less rmap cost)"],
      ["ksmd CPU", pct(m.ksmd_cpu_pct), "of one CPU, last interval"],
      ["scan rate", rate(m.pages_scanned_per_s) + " pages/s", "pages ksmd visited per second"],
      ["full scans/min", rate(m.full_scans_per_min), "full scans: " + m.full_scans_total],
      ["KSM COW/s", rate(m.ksm_cow_per_s), "copy-on-write faults on merged pages (fault probe)"],
      ["cow_ksm/s", rate(m.cow_ksm_per_s), "/proc/vmstat cow_ksm, the kernel's own count"],
      ["merges/s", rate(m.merges_per_s), "ksm tracepoints"],
      ["unmerges/s", rate(m.unmerges_per_s), "ksm tracepoints"],
      ["ksmd", runState, "pages_to_scan " + m.pages_to_scan + ", sleep " + m.sleep_millisecs + " ms"],
      ["advisor", m.advisor === null || m.advisor === undefined ? "–" : m.advisor, "advisor_mode"],
      ["processes", String(m.processes), "mergeable processes"],
    ];
    for (const [label, value, title] of cards) {
      const c = el("div", "card");
      c.title = title;
      c.appendChild(el("div", "card-label", label));
      c.appendChild(el("div", "card-value", value));
      box.appendChild(c);
    }
  }

  // ---- process table ----------------------------------------------------------

  function sortValue(r, key) {
    const v = r[key];
    return v === null || v === undefined ? -Infinity : v;
  }

  function renderProcs() {
    const rows = procRows.filter(
      (r) => !filterText || r.comm.includes(filterText) || String(r.pid).includes(filterText),
    );
    rows.sort((a, b) => {
      const x = sortValue(a, sortKey);
      const y = sortValue(b, sortKey);
      const c = typeof x === "string" || typeof y === "string" ? String(x).localeCompare(String(y)) : x - y;
      return (sortDesc ? -c : c) || a.pid - b.pid;
    });
    const body = document.querySelector("#procs tbody");
    const frag = document.createDocumentFragment();
    for (const r of rows.slice(0, TABLE_ROWS)) {
      const tr = el("tr");
      tr.dataset.pid = String(r.pid);
      if (r.ksm_cow_per_s > 0) tr.className = "hot";
      cell(tr, String(r.pid), "num");
      cell(tr, r.comm);
      cell(tr, r.how || "–");
      cell(tr, count(r.merging_pages), "num");
      cell(tr, bytes(r.profit_bytes), "num" + (r.profit_bytes < 0 ? " neg" : ""));
      cell(tr, rate(r.ksm_cow_per_s), "num");
      cell(tr, rate(r.merges_per_s), "num");
      cell(tr, rate(r.unmerges_per_s), "num");
      const ratio = r.rmap_ratio === null || r.rmap_ratio === undefined ? "–" : r.rmap_ratio.toFixed(1);
      const flagged = r.rmap_flag || (r.rmap_ratio !== null && r.rmap_ratio > RMAP_FLAG);
      cell(
        tr,
        flagged ? ratio + " !" : ratio,
        "num" + (flagged ? " flag" : ""),
        flagged ? "above " + RMAP_FLAG + " rmap items per merged page: ksmd's bookkeeping costs more than merging saves" : "",
      );
      frag.appendChild(tr);
    }
    if (!rows.length) {
      const tr = el("tr");
      cell(tr, procRows.length ? "no process matches the filter" : "no mergeable process", "muted").colSpan = 9;
      frag.appendChild(tr);
    }
    body.replaceChildren(frag);
    const more = rows.length - Math.min(rows.length, TABLE_ROWS);
    document.getElementById("proc-count").textContent =
      rows.length + " of " + procRows.length + " processes" + (more > 0 ? " (" + more + " not shown: filter)" : "");
    for (const th of document.querySelectorAll("#procs th")) {
      th.classList.toggle("sorted", th.dataset.key === sortKey);
      th.classList.toggle("asc", th.dataset.key === sortKey && !sortDesc);
    }
  }

  for (const th of document.querySelectorAll("#procs th")) {
    th.addEventListener("click", () => {
      const key = th.dataset.key;
      if (key === sortKey) sortDesc = !sortDesc;
      else {
        sortKey = key;
        sortDesc = key !== "comm" && key !== "how" && key !== "pid";
      }
      renderProcs();
    });
  }
  document.getElementById("filter").addEventListener("input", (e) => {
    filterText = e.target.value.trim();
    renderProcs();
  });

  // ---- decisions ----------------------------------------------------------------

  function renderDecisionCounts(counts, applied) {
    const box = document.getElementById("decision-counts");
    box.replaceChildren();
    const names = Object.keys(counts || {}).sort();
    if (!names.length) box.appendChild(el("span", "muted", "none yet"));
    for (const a of names) {
      const done = (applied || {})[a] || 0;
      const chip = el("span", "chip action-" + a, a + " " + counts[a]);
      chip.title = done + " carried out";
      box.appendChild(chip);
    }
  }

  function hexRange(d) {
    if (d.start === null || d.start === undefined) return "";
    const h = (v) => (typeof v === "number" ? "0x" + v.toString(16) : String(v));
    return h(d.start) + "-" + h(d.end);
  }

  function renderDecisions(list) {
    const body = document.querySelector("#decisions tbody");
    const frag = document.createDocumentFragment();
    const recent = list
      .slice()
      .sort((a, b) => b.t - a.t) // newest first, whatever order the API gave
      .slice(0, DECISION_ROWS);
    for (const d of recent) {
      const tr = el("tr", "action-" + d.action);
      cell(tr, clock(d.t));
      cell(tr, d.action);
      cell(tr, d.applied ? "yes" : "no", d.applied ? "" : "muted", d.applied ? "" : "not carried out (observe mode, or failed)");
      cell(tr, d.pid === null || d.pid === undefined ? "" : String(d.pid), "num");
      cell(tr, d.comm || "");
      cell(tr, hexRange(d), "mono");
      cell(tr, d.reason, "reason");
      frag.appendChild(tr);
    }
    if (!recent.length) {
      const tr = el("tr");
      const td = cell(tr, "no decisions yet", "muted");
      td.colSpan = 7;
      frag.appendChild(tr);
    }
    body.replaceChildren(frag);
  }

  // ---- polling ------------------------------------------------------------------

  function addPoints(list) {
    for (const p of list) {
      if (typeof p.wall !== "number" || p.wall <= lastWall) continue;
      points.push({ wall: p.wall, machine: p.machine || null, procs: procList(p.procs) });
      lastWall = p.wall;
    }
    if (points.length > KEEP_POINTS) points = points.slice(points.length - KEEP_POINTS);
    ks.points = points.length;
  }

  function setStatus(text, bad) {
    const s = document.getElementById("status");
    s.textContent = text;
    s.classList.toggle("bad", !!bad);
  }

  async function poll() {
    try {
      const since = Number.isFinite(lastWall) ? "?since=" + lastWall : "";
      const [state, history, decisions] = await Promise.all([
        get("api/state"),
        get("api/history" + since),
        get("api/decisions"),
      ]);
      addPoints(listOf(history, "points"));
      procRows = listOf(state, "processes");
      document.getElementById("mode").textContent = state.mode || "live";
      const notes = document.getElementById("notes");
      notes.hidden = !(state.notes && state.notes.length);
      notes.textContent = (state.notes || []).join(" · ");
      renderMachine(state.machine);
      renderProcs();
      renderDecisionCounts(state.decisions, state.applied);
      renderDecisions(listOf(decisions, "recent", "decisions"));
      charts.draw(points);
      ks.updates++;
      ks.lastOk = Date.now() / 1000;
      ks.lastError = null;
      const at = state.machine ? clock(state.machine.wall) : "no sample yet";
      setStatus("updated " + at);
    } catch (err) {
      ks.lastError = String(err);
      setStatus("daemon not answering: " + err.message + (ks.lastOk ? " (showing data of " + clock(ks.lastOk) + ")" : ""), true);
    } finally {
      document.body.dataset.updates = String(ks.updates);
      setTimeout(poll, POLL_MS);
    }
  }

  poll();
})();
