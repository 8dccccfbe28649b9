// Tiny canvas line charts for per-step series (no library, no build step), with labelled axes.
"use strict";

class LineChart {
  // labels: {y: "ms per step", x: "step"}; `limit`, when set, is drawn as a dashed line (e.g. the context).
  constructor(canvas, color, labels) {
    this.canvas = canvas;
    this.color = color;
    this.labels = labels;
    this.limit = null;
    this.values = [];
    this.draw();
  }

  reset() {
    this.values = [];
    this.draw();
  }

  push(v) {
    this.values.push(v);
    this.draw();
  }

  draw() {
    const { canvas, values, labels } = this;
    const ctx = canvas.getContext("2d");
    const w = canvas.width, h = canvas.height;
    const left = 44, right = 8, top = 8, bottom = 30; // room for tick labels and axis titles
    const pw = w - left - right, ph = h - top - bottom;
    ctx.clearRect(0, 0, w, h);
    ctx.strokeStyle = "#ccc";
    ctx.lineWidth = 1;
    ctx.strokeRect(left, top, pw, ph);
    ctx.fillStyle = "#555";
    ctx.font = "10px sans-serif";
    // Axis titles.
    ctx.textAlign = "center";
    ctx.fillText(labels.x, left + pw / 2, h - 4);
    ctx.save();
    ctx.translate(10, top + ph / 2);
    ctx.rotate(-Math.PI / 2);
    ctx.fillText(labels.y, 0, 0);
    ctx.restore();
    const peak = Math.max(...values, this.limit ?? 0, 0);
    const max = peak * 1.1 || 1;
    const n = Math.max(values.length - 1, 1);
    const x = (i) => left + (i / n) * pw, y = (v) => top + ph * (1 - v / max);
    // Ticks: 0, half and the top on y; first, middle and last step on x.
    ctx.textAlign = "right";
    for (const v of [0, max / 2, max]) {
      ctx.fillText(v.toFixed(max < 10 ? 1 : 0), left - 4, y(v) + 3);
      ctx.strokeStyle = "#eee";
      ctx.beginPath(); ctx.moveTo(left, y(v)); ctx.lineTo(left + pw, y(v)); ctx.stroke();
    }
    ctx.textAlign = "center";
    const last = Math.max(values.length - 1, 0);
    for (const i of [...new Set([0, Math.round(last / 2), last])]) ctx.fillText(String(i), x(i), top + ph + 12);
    if (this.limit) {
      ctx.strokeStyle = "#999";
      ctx.setLineDash([4, 3]);
      ctx.beginPath(); ctx.moveTo(left, y(this.limit)); ctx.lineTo(left + pw, y(this.limit)); ctx.stroke();
      ctx.setLineDash([]);
      ctx.textAlign = "left";
      ctx.fillText(`context ${this.limit}`, left + 4, y(this.limit) + 11);
    }
    if (!values.length) return;
    ctx.strokeStyle = this.color;
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    values.forEach((v, i) => (i === 0 ? ctx.moveTo(x(i), y(v)) : ctx.lineTo(x(i), y(v))));
    ctx.stroke();
  }
}
