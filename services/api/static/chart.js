// A small line chart on <canvas>: a few named series over a shared x axis, auto-scaled,
// with min/max labels, a legend and optional vertical markers (stage boundaries).
// The number of x positions drawn is kept in the canvas's data-points attribute.
"use strict";

class LineChart {
  constructor(canvas, series, opts = {}) {
    this.canvas = canvas;
    this.series = series; // [{key, label, color}]
    this.opts = opts; // {yMin, yMax, format}
    this.reset();
  }

  reset() {
    this.xs = [];
    this.ys = Object.fromEntries(this.series.map((s) => [s.key, []]));
    this.markers = [];
    this.changed();
  }

  // Add one x position; `values` maps series keys to numbers (missing keys leave a gap).
  add(x, values) {
    let any = false;
    for (const s of this.series) {
      const v = values[s.key];
      const ok = typeof v === "number" && Number.isFinite(v);
      any = any || ok;
      this.ys[s.key].push(ok ? v : null);
    }
    if (!any) {
      for (const s of this.series) this.ys[s.key].pop();
      return false;
    }
    this.xs.push(x);
    this.changed();
    return true;
  }

  mark(x, label) {
    this.markers.push({ x, label });
    this.changed();
  }

  changed() {
    this.canvas.dataset.points = String(this.xs.length);
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => {
      this.pending = false;
      this.draw();
    });
  }

  draw() {
    const c = this.canvas;
    const dpr = window.devicePixelRatio || 1;
    const w = c.clientWidth || 300;
    const h = c.clientHeight || 150;
    if (c.width !== Math.round(w * dpr) || c.height !== Math.round(h * dpr)) {
      c.width = Math.round(w * dpr);
      c.height = Math.round(h * dpr);
    }
    const g = c.getContext("2d");
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.clearRect(0, 0, w, h);
    g.font = "11px system-ui, sans-serif";
    const pad = { l: 46, r: 8, t: 18, b: 18 };
    const pw = w - pad.l - pad.r;
    const ph = h - pad.t - pad.b;
    g.strokeStyle = "#c8ccd4";
    g.strokeRect(pad.l, pad.t, pw, ph);
    if (!this.xs.length) {
      g.fillStyle = "#889";
      g.fillText("no data yet", pad.l + 8, pad.t + ph / 2);
      return;
    }
    const vals = this.series.flatMap((s) => this.ys[s.key].filter((v) => v !== null));
    let lo = this.opts.yMin ?? Math.min(...vals);
    let hi = this.opts.yMax ?? Math.max(...vals);
    if (hi - lo < 1e-12) { lo -= 0.5; hi += 0.5; }
    const x0 = this.xs[0];
    const x1 = this.xs[this.xs.length - 1];
    const sx = (x) => pad.l + (x1 === x0 ? pw / 2 : ((x - x0) / (x1 - x0)) * pw);
    const sy = (y) => pad.t + ph - ((y - lo) / (hi - lo)) * ph;
    const fmt = this.opts.format || ((v) => (Math.abs(v) >= 1000 ? v.toFixed(0) : v.toPrecision(3)));

    g.fillStyle = "#556";
    g.textAlign = "right";
    g.fillText(fmt(hi), pad.l - 4, pad.t + 9);
    g.fillText(fmt(lo), pad.l - 4, pad.t + ph);
    g.textAlign = "left";
    g.fillText(String(x0), pad.l, h - 4);
    g.textAlign = "right";
    g.fillText(String(x1), pad.l + pw, h - 4);

    g.setLineDash([3, 3]);
    g.strokeStyle = "#aab";
    g.textAlign = "left";
    for (const m of this.markers) {
      if (m.x < x0 || m.x > x1) continue;
      g.beginPath();
      g.moveTo(sx(m.x), pad.t);
      g.lineTo(sx(m.x), pad.t + ph);
      g.stroke();
      g.fillText(m.label, sx(m.x) + 3, pad.t + 10);
    }
    g.setLineDash([]);

    let lx = pad.l;
    for (const s of this.series) {
      const ys = this.ys[s.key];
      g.strokeStyle = g.fillStyle = s.color;
      g.lineWidth = 1.5;
      g.beginPath();
      let pen = false;
      let single = null;
      ys.forEach((y, i) => {
        if (y === null) { pen = false; return; }
        const px = sx(this.xs[i]);
        const py = sy(y);
        if (pen) g.lineTo(px, py); else { g.moveTo(px, py); single = [px, py]; }
        pen = true;
      });
      g.stroke();
      if (ys.filter((y) => y !== null).length === 1 && single) {
        g.beginPath();
        g.arc(single[0], single[1], 2.5, 0, 2 * Math.PI);
        g.fill();
      }
      const last = ys.filter((y) => y !== null).pop();
      const text = `${s.label}${last === undefined ? "" : " " + fmt(last)}`;
      g.fillRect(lx, 5, 10, 3);
      g.textAlign = "left";
      g.fillText(text, lx + 13, 11);
      lx += g.measureText(text).width + 26;
    }
  }
}

window.LineChart = LineChart;
