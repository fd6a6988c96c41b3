// The memory history chart: uPlot (vendored) over the data the page embeds (the history API's shape).
// The y-axis fits the series shown (a 340 MiB model is not a flat line on zero); "Scale to the GPU's total"
// shows it against the whole GPU. Events are labelled on the chart. Without JavaScript the page shows its
// figures, events and table instead.
(function () {
  "use strict";
  const holder = document.getElementById("history-chart");
  const source = document.getElementById("history-data");
  if (!holder || !source || typeof uPlot === "undefined") return;
  const data = JSON.parse(source.textContent);
  if (!data.points.length) return;
  const toggle = document.getElementById("history-total");

  const times = data.points.map((p) => p.t);
  const series = [times, data.points.map((p) => p.max_mib), data.points.map((p) => p.mean_mib)];
  const peak = Math.max(0, ...series[1].filter((v) => v != null), ...series[2].filter((v) => v != null));
  const span = times[times.length - 1] - times[0];
  const pad = (n) => String(n).padStart(2, "0");
  // One size rule (models_app/formatting.py): MiB below 1 GiB, GiB with one decimal above.
  const size = (v) => (v >= 1024 ? `${(v / 1024).toFixed(1)} GiB` : `${Math.round(v)} MiB`);
  // One time format: 24-hour clock; the date only where the window spans days.
  const clock = (t) => {
    const d = new Date(t * 1000);
    const hm = `${pad(d.getHours())}:${pad(d.getMinutes())}`;
    return span > 86400 ? `${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${hm}` : hm;
  };
  const SHORT = { loaded: "loaded", adopted: "adopted", unloaded: "unloaded", crashed: "crashed", failed: "failed",
    killed: "killed", alert_fired: "alert", alert_resolved: "alert cleared", load_requested: "load",
    unload_requested: "unload", idle_unload: "idle unload", healthy: "healthy" };

  function yRange() {
    const top = toggle && toggle.checked ? Math.max(peak, data.total_mib || 0) : Math.max(peak, data.estimate_mib || 0);
    return [0, top * 1.1 || 1];
  }

  function line(u, value, color, dash) {
    if (!value || value > u.scales.y.max) return;  // off the chart at this scale
    const y = u.valToPos(value, "y", true);
    const ctx = u.ctx;
    ctx.strokeStyle = color;
    ctx.setLineDash(dash);
    ctx.beginPath();
    ctx.moveTo(u.bbox.left, y);
    ctx.lineTo(u.bbox.left + u.bbox.width, y);
    ctx.stroke();
  }

  function draw(u) {
    holder.dataset.yMax = String(Math.round(u.scales.y.max));  // the scale drawn (the browser test reads it)
    const ctx = u.ctx;
    ctx.save();
    line(u, data.total_mib, "#6b7280", [6, 4]);  // the GPU's total memory, dashed
    line(u, data.estimate_mib, "#9333ea", [1, 3]);  // the estimate (instances), dotted
    // Events on the time axis, labelled: loads green, unloads grey, crashes and alerts red. Labels take turns
    // on three rows so that close events stay readable.
    const font = Math.round(11 * devicePixelRatio);
    ctx.font = `${font}px system-ui, sans-serif`;
    let row = 0;
    for (const e of data.events) {
      if (e.t < times[0] || e.t > times[times.length - 1] + 3600) continue;
      const x = u.valToPos(e.t, "x", true);
      const color = /crash|fail|killed|alert_fired/.test(e.kind) ? "#dc2626"
        : e.kind === "loaded" || e.kind === "adopted" ? "#16a34a" : "#6b7280";
      ctx.strokeStyle = color;
      ctx.setLineDash([2, 3]);
      ctx.beginPath();
      ctx.moveTo(x, u.bbox.top);
      ctx.lineTo(x, u.bbox.top + u.bbox.height);
      ctx.stroke();
      ctx.fillStyle = color;
      const label = SHORT[e.kind] || e.kind.replace(/_/g, " ");
      const width = ctx.measureText(label).width;
      const left = Math.min(x + 3, u.bbox.left + u.bbox.width - width - 2);
      ctx.fillText(label, left, u.bbox.top + font * (1.1 + (row % 3) * 1.2));
      row += 1;
    }
    ctx.restore();
  }

  function options(width) {
    const narrow = width < 500;
    return {
      width,
      height: narrow ? 240 : 320,
      scales: { x: { time: true }, y: { range: yRange } },
      series: [
        { value: (u, t) => (t == null ? "—" : clock(t)) },
        { label: "max", stroke: "#dc2626", width: 1.5, value: (u, v) => (v == null ? "—" : size(v)) },
        { label: "mean", stroke: "#2563eb", width: 1.5, fill: "rgba(37,99,235,0.08)",
          value: (u, v) => (v == null ? "—" : size(v)) },
      ],
      axes: [
        { space: narrow ? 70 : 60, values: (u, splits) => splits.map(clock) },
        { size: narrow ? 68 : 74, values: (u, splits) => splits.map(size) },
      ],
      hooks: { draw: [draw] },
    };
  }

  let chart = null;
  function build() {
    if (chart) chart.destroy();
    chart = new uPlot(options(Math.max(300, holder.clientWidth || 800)), series, holder);
    holder.dataset.ready = "1";
  }
  build();
  if (toggle) toggle.addEventListener("change", build);
  let pending = null;
  window.addEventListener("resize", () => {
    clearTimeout(pending);
    pending = setTimeout(build, 150);
  });
})();
