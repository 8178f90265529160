// ksmtrace web page: polls the daemon's JSON API and draws it. Read-only.
//
// The API (ksmtrace/views/api.py) gives the rows every dashboard shares
// (ksmtrace/views/dash.py): /api/state (machine row, process rows, decision
// counts, mode), /api/history (points: wall, machine row, the top processes'
// rates), /api/decisions (recent decisions). History is asked for with
// ?since=WALL so that a poll carries only new points; a server that ignores
// the parameter still works, the points already held are skipped here.
//
// What each chart drew (series labels, maxima, last values, read back from
// the uPlot instance after drawing) is put on its container as data-*
// attributes and in window.ksmtrace.charts: the system test reads them.
"use strict";

(function () {
  const POLL_MS = 1500;
  const TIMEOUT_MS = 5000;
  const KEEP_POINTS = 600; // ten minutes at the daemon's one sample a second
  const MAX_SERIES = 8; // per-process series per chart: the largest, the rest left out
  const TABLE_ROWS = 200;
  const DECISION_ROWS = 100;
  const RMAP_FLAG = 64;
  const PALETTE = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
    "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f",
  ];

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
  const colours = new Map(); // pid -> palette slot, kept while the pid is drawn
  const plots = {}; // chart id -> {u, key}

  // ---- formatting -------------------------------------------------------

  function bytes(v) {
    if (v === null || v === undefined) return "–";
    const neg = v < 0;
    let x = Math.abs(v);
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (x >= 1024 && i < units.length - 1) {
      x /= 1024;
      i++;
    }
    const s = i === 0 ? String(Math.round(x)) : x.toFixed(x < 10 ? 2 : x < 100 ? 1 : 0);
    return (neg ? "-" : "") + s + " " + units[i];
  }

  function rate(v) {
    if (v === null || v === undefined) return "–";
    if (v === 0) return "0";
    const a = Math.abs(v);
    if (a >= 1e6) return (v / 1e6).toFixed(1) + "M";
    if (a >= 1e4) return (v / 1e3).toFixed(1) + "k";
    if (a >= 100) return v.toFixed(0);
    if (a >= 10) return v.toFixed(1);
    return v.toFixed(2);
  }

  function count(v) {
    if (v === null || v === undefined) return "–";
    if (Math.abs(v) >= 1e6) return (v / 1e6).toFixed(1) + "M";
    if (Math.abs(v) >= 1e4) return (v / 1e3).toFixed(1) + "k";
    return String(v);
  }

  function pct(v) {
    return v === null || v === undefined ? "–" : v.toFixed(v < 10 ? 2 : 1) + "%";
  }

  function clock(t) {
    const d = new Date(t * 1000);
    return d.toTimeString().slice(0, 8);
  }

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

  // ---- DOM helpers (text only: comm and reasons come from processes) -----

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function cell(tr, text, cls, title) {
    const td = el("td", cls, text);
    if (title) td.title = title;
    tr.appendChild(td);
    return td;
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

  // ---- charts ---------------------------------------------------------------

  function colourOf(pid, inUse) {
    if (colours.has(pid)) return PALETTE[colours.get(pid)];
    const taken = new Set([...inUse].map((p) => colours.get(p)).filter((s) => s !== undefined));
    let slot = 0;
    while (taken.has(slot) && slot < PALETTE.length - 1) slot++;
    colours.set(pid, slot);
    return PALETTE[slot];
  }

  // One chart's x values and series from the points held.
  function perProcess(metric, totalOf, totalLabel) {
    const xs = points.map((p) => p.wall);
    const peak = new Map(); // pid -> [max, comm]
    for (const p of points) {
      for (const r of p.procs) {
        const v = r[metric] || 0;
        const seen = peak.get(r.pid);
        // Keep a known name: an exiting process's last rows may say "?".
        const comm = r.comm && r.comm !== "?" ? r.comm : seen ? seen[1] : r.comm;
        if (!seen || v > seen[0]) peak.set(r.pid, [v, comm]);
        else seen[1] = comm;
      }
    }
    const chosen = [...peak.entries()]
      .filter(([, [max]]) => max > 0)
      .sort((a, b) => b[1][0] - a[1][0] || a[0] - b[0])
      .slice(0, MAX_SERIES)
      .map(([pid, [, comm]]) => ({ pid, comm }));
    for (const pid of [...colours.keys()]) {
      if (!peak.has(pid)) colours.delete(pid);
    }
    const inUse = new Set(chosen.map((c) => c.pid));
    const series = [
      { label: totalLabel, stroke: "#444", dash: [4, 4], width: 1.5, total: true },
      ...chosen.map((c) => ({ label: c.comm + " " + c.pid, pid: c.pid, stroke: colourOf(c.pid, inUse), width: 2 })),
    ];
    const data = [xs, points.map((p) => totalOf(p.machine))];
    for (const c of chosen) {
      data.push(
        points.map((p) => {
          const r = p.procs.find((q) => q.pid === c.pid);
          return r ? r[metric] : null; // not among that interval's top processes: a gap
        }),
      );
    }
    return { series, data };
  }

  function machineSeries(specs) {
    const xs = points.map((p) => p.wall);
    const data = [xs];
    const series = [];
    for (const s of specs) {
      series.push({ label: s.label, stroke: s.stroke, width: 2, fill: s.fill });
      data.push(points.map((p) => (p.machine ? s.get(p.machine) : null)));
    }
    return { series, data };
  }

  const CHARTS = {
    cow: {
      fmt: rate,
      build: () => perProcess("ksm_cow_per_s", (m) => (m ? m.cow_ksm_per_s : null), "all (cow_ksm)"),
    },
    merges: {
      fmt: rate,
      build: () => perProcess("merges_per_s", (m) => (m ? m.merges_per_s : null), "all (ksmd)"),
    },
    saved: {
      fmt: bytes,
      build: () =>
        machineSeries([
          { label: "saved", stroke: "#2ca02c", fill: "rgba(44,160,44,0.12)", get: (m) => m.saved_bytes },
          { label: "general_profit", stroke: "#1f77b4", get: (m) => m.general_profit_bytes },
        ]),
    },
    cpu: {
      fmt: pct,
      build: () =>
        machineSeries([
          { label: "ksmd CPU", stroke: "#d62728", fill: "rgba(214,39,40,0.10)", get: (m) => m.ksmd_cpu_pct },
        ]),
    },
  };

  function lastOf(ys) {
    for (let i = (ys || []).length - 1; i >= 0; i--) if (ys[i] !== null && ys[i] !== undefined) return ys[i];
    return null;
  }

  function plotSize(box) {
    return { width: Math.max(240, box.clientWidth), height: 220 };
  }

  function drawChart(id) {
    const spec = CHARTS[id];
    const fig = document.getElementById("chart-" + id);
    const box = fig.querySelector(".plot");
    const { series, data } = spec.build();
    const key = series.map((s) => s.label + "|" + s.stroke).join(",");
    let entry = plots[id];
    if (entry && entry.key !== key) {
      entry.u.destroy();
      entry = null;
    }
    if (!entry) {
      const size = plotSize(box);
      const opts = {
        width: size.width,
        height: size.height,
        scales: { x: { time: true }, y: { range: (u, min, max) => [0, max > 0 ? max * 1.1 : 1] } },
        series: [
          { value: (u, v) => (v === null ? "–" : clock(v)) },
          ...series.map((s) => ({
            label: s.label,
            stroke: s.stroke,
            width: s.width,
            dash: s.dash,
            fill: s.fill,
            spanGaps: false,
            points: { show: false },
            // Under the cursor: that moment's value; elsewhere the latest one.
            value: (u, v, si, di) => {
              if (di === null || di === undefined) v = lastOf(u.data[si]);
              return v === null || v === undefined ? "–" : spec.fmt(v);
            },
          })),
        ],
        axes: [{}, { size: 70, values: (u, splits) => splits.map((v) => spec.fmt(v)) }],
        legend: { live: true },
      };
      entry = { u: new uPlot(opts, data, box), key };
      plots[id] = entry;
    } else {
      entry.u.setData(data);
    }
    expose(id, fig, entry.u, series);
  }

  // What the chart holds now, read back from uPlot, for people and for tests.
  function expose(id, fig, u, series) {
    const out = [];
    for (let i = 1; i < u.series.length; i++) {
      const ys = (u.data[i] || []).filter((v) => v !== null && v !== undefined);
      out.push({
        label: u.series[i].label,
        pid: series[i - 1].pid === undefined ? null : series[i - 1].pid,
        total: !!series[i - 1].total,
        max: ys.length ? Math.max(...ys) : null,
        last: ys.length ? ys[ys.length - 1] : null,
        n: ys.length,
      });
    }
    const drawn = { points: u.data[0].length, series: out };
    fig.dataset.points = String(drawn.points);
    fig.dataset.series = JSON.stringify(out);
    ks.charts[id] = drawn;
  }

  function drawCharts() {
    for (const id of Object.keys(CHARTS)) drawChart(id);
  }

  window.addEventListener("resize", () => {
    for (const id of Object.keys(plots)) {
      const box = document.getElementById("chart-" + id).querySelector(".plot");
      plots[id].u.setSize(plotSize(box));
    }
  });

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
      drawCharts();
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
