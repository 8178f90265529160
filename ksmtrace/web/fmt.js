// ksmtrace web page: formatting and DOM helpers shared by charts.js and app.js.
"use strict";

window.ksmtraceParts = {};

(function () {
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

  window.ksmtraceParts.fmt = { bytes, rate, count, pct, clock, el, cell };
})();
