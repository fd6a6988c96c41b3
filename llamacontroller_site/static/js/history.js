// The memory history chart: uPlot (vendored) over the data the page embeds (the history API's shape).
// Without JavaScript the page shows its figures, events and table instead.
(function () {
  "use strict";
  const holder = document.getElementById("history-chart");
  const source = document.getElementById("history-data");
  if (!holder || !source || typeof uPlot === "undefined") return;
  const data = JSON.parse(source.textContent);
  if (!data.points.length) return;

  const times = data.points.map((p) => p.t);
  const series = [
    times,
    data.points.map((p) => p.max_mib),
    data.points.map((p) => p.mean_mib),
  ];
  const opts = {
    width: Math.max(320, holder.clientWidth || 800),
    height: 320,
    scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(max, data.total_mib || 0, data.estimate_mib || 0) * 1.05 || 1] } },
    series: [
      {},
      { label: "max MiB", stroke: "#dc2626", width: 1.5 },
      { label: "mean MiB", stroke: "#2563eb", width: 1.5, fill: "rgba(37,99,235,0.08)" },
    ],
    axes: [{}, { label: "MiB", size: 70 }],
    hooks: {
      draw: [
        (u) => {
          const ctx = u.ctx;
          ctx.save();
          // The GPU's total memory, dashed.
          if (data.total_mib) {
            const y = u.valToPos(data.total_mib, "y", true);
            ctx.strokeStyle = "#6b7280";
            ctx.setLineDash([6, 4]);
            ctx.beginPath();
            ctx.moveTo(u.bbox.left, y);
            ctx.lineTo(u.bbox.left + u.bbox.width, y);
            ctx.stroke();
          }
          // The estimate (instances), dotted.
          if (data.estimate_mib) {
            const y = u.valToPos(data.estimate_mib, "y", true);
            ctx.strokeStyle = "#9333ea";
            ctx.setLineDash([1, 3]);
            ctx.beginPath();
            ctx.moveTo(u.bbox.left, y);
            ctx.lineTo(u.bbox.left + u.bbox.width, y);
            ctx.stroke();
          }
          // Events on the time axis: loads green, unloads grey, crashes and alerts red.
          ctx.setLineDash([2, 3]);
          for (const e of data.events) {
            if (e.t < times[0] || e.t > times[times.length - 1] + 3600) continue;
            const x = u.valToPos(e.t, "x", true);
            ctx.strokeStyle = /crash|fail|killed|alert_fired/.test(e.kind) ? "#dc2626"
              : e.kind === "loaded" || e.kind === "adopted" ? "#16a34a" : "#6b7280";
            ctx.beginPath();
            ctx.moveTo(x, u.bbox.top);
            ctx.lineTo(x, u.bbox.top + u.bbox.height);
            ctx.stroke();
          }
          ctx.restore();
        },
      ],
    },
  };
  const chart = new uPlot(opts, series, holder);
  holder.dataset.ready = "1";
  window.addEventListener("resize", () => chart.setSize({ width: Math.max(320, holder.clientWidth), height: 320 }));
})();
