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

  document.addEventListener("htmx:afterSettle", function () {
    const form = document.getElementById("load-form");
    if (!form || !saved) return;
    const select = form.querySelector("select[name=model_id]");
    if (select && saved.model && select.querySelector(`option[value="${CSS.escape(saved.model)}"]`)) {
      select.value = saved.model;
    }
    form.querySelectorAll("input[name=gpu]").forEach((box) => {
      if (!box.disabled && saved.gpus.includes(box.value)) box.checked = true;
    });
    saved = null;
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
