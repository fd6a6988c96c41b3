// Small glue around htmx: keep the load form's choices across card refreshes, and say so when a
// refresh fails instead of silently showing stale cards.
(function () {
  "use strict";
  let saved = null;

  document.addEventListener("htmx:beforeSwap", function (event) {
    const form = document.getElementById("load-form");
    if (!form || event.detail.target.id !== "dashboard-content") return;
    // A refresh replaces the form; a submitted form starts afresh.
    const submitted = event.detail.requestConfig && event.detail.requestConfig.elt === form;
    saved = submitted ? null : {
      model: form.querySelector("select[name=model_id]")?.value,
      gpus: Array.from(form.querySelectorAll("input[name=gpu]:checked")).map((box) => box.value),
    };
  });

  // The load form's estimate: asked for when the form appears (page load, card refresh) and on every change;
  // with no GPU chosen the answer carries the placement's suggestion, which is preselected.
  function askEstimate() {
    const form = document.getElementById("load-form");
    if (form && window.htmx) htmx.trigger(form, "change");
  }
  document.addEventListener("DOMContentLoaded", askEstimate);
  document.addEventListener("htmx:afterSettle", function (event) {
    const target = event.detail.target;
    const box = target && target.id === "load-estimate" ? target.querySelector("[data-suggest]") : null;
    if (!box) return;
    const form = document.getElementById("load-form");
    if (!form || form.querySelector("input[name=gpu]:checked")) return;
    const wanted = box.dataset.suggest.split(",");
    form.querySelectorAll("input[name=gpu]").forEach((toggle) => {
      if (!toggle.disabled && wanted.includes(toggle.value)) toggle.checked = true;
    });
  });

  document.addEventListener("htmx:afterSettle", function (event) {
    if (!event.detail.target || event.detail.target.id !== "dashboard-content") return;
    const form = document.getElementById("load-form");
    if (form && saved) {
      const select = form.querySelector("select[name=model_id]");
      if (select && saved.model && select.querySelector(`option[value="${CSS.escape(saved.model)}"]`)) {
        select.value = saved.model;
      }
      form.querySelectorAll("input[name=gpu]").forEach((box) => {
        if (!box.disabled && saved.gpus.includes(box.value)) box.checked = true;
      });
    }
    saved = null;
    askEstimate();
  });

  function connectionAlert(show) {
    const alert = document.getElementById("connection-alert");
    if (alert) alert.hidden = !show;
  }
  document.addEventListener("htmx:sendError", () => connectionAlert(true));
  document.addEventListener("htmx:afterRequest", function (event) {
    const xhr = event.detail.xhr;
    // 4xx/503 answers carry their own message in the cards; only transport or server failures show here.
    connectionAlert(!xhr || xhr.status === 0 || (xhr.status >= 500 && xhr.status !== 503));
  });
})();
