// ksmtrace web page: the charts (uPlot), drawn from the history points app.js holds.
//
// Per-process charts draw the processes with the largest values over the
// points held (MAX_SERIES of them) and a dashed machine-wide total; a
// process missing from an interval's top processes is a gap, not a zero.
// What each chart drew (series labels, pids, maxima, last values), read back
// from the uPlot instance after drawing, is put on its container as data-*
// attributes and in window.ksmtrace.charts: the system test reads them.
"use strict";

(function () {
  const MAX_SERIES = 8;
  const PALETTE = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
    "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f",
  ];
  const { bytes, rate, pct, clock } = window.ksmtraceParts.fmt;

  let points = [];
  const colours = new Map(); // pid -> palette slot, kept while the pid is drawn
  const plots = {}; // chart id -> {u, key}


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
      signed: true,
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
        scales: {
          x: { time: true },
          // From zero, with headroom above the largest value; only memory may go below zero
          // (general_profit): a rate below zero is a counter that went back, not a rate.
          y: {
            range: (u, min, max) => [spec.signed ? Math.min(0, min * 1.1) : 0, max > 0 ? max * 1.1 : 1],
          },
        },
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
        axes: [
          // Wall-clock times only: the page shows the last minutes, the date would only crowd them.
          { space: 70, values: (u, splits) => splits.map((v) => clock(v)) },
          { size: 70, values: (u, splits) => splits.map((v) => spec.fmt(v)) },
        ],
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
    window.ksmtrace.charts[id] = drawn;
  }

  // Draw every chart from the history points held (oldest first).
  function draw(held) {
    points = held;
    for (const id of Object.keys(CHARTS)) drawChart(id);
  }

  window.addEventListener("resize", () => {
    for (const id of Object.keys(plots)) {
      const box = document.getElementById("chart-" + id).querySelector(".plot");
      plots[id].u.setSize(plotSize(box));
    }
  });

  window.ksmtraceParts.charts = { draw };
})();
