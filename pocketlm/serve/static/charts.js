// Tiny canvas line charts for per-step series (no library, no build step).
"use strict";

class LineChart {
  constructor(canvas, color) {
    this.canvas = canvas;
    this.color = color;
    this.values = [];
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
    const { canvas, values } = this;
    const ctx = canvas.getContext("2d");
    const w = canvas.width, h = canvas.height, pad = 28;
    ctx.clearRect(0, 0, w, h);
    ctx.strokeStyle = "#ccc";
    ctx.strokeRect(pad, 4, w - pad - 4, h - pad);
    if (!values.length) return;
    const max = Math.max(...values) * 1.1 || 1;
    ctx.fillStyle = "#666";
    ctx.font = "10px sans-serif";
    ctx.fillText(max.toFixed(max < 10 ? 1 : 0), 2, 12);
    ctx.fillText("0", 2, h - pad + 4);
    ctx.fillText(`step ${values.length - 1}`, w - 60, h - 8);
    ctx.strokeStyle = this.color;
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    const dx = (w - pad - 6) / Math.max(values.length - 1, 1);
    values.forEach((v, i) => {
      const x = pad + 1 + i * dx, y = 4 + (h - pad) * (1 - v / max);
      if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
    });
    ctx.stroke();
  }
}
