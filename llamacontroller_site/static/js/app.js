// Small glue around htmx: keep the load form's choices across card refreshes, fetch a new form when the live
// cards say the GPUs it offers changed, keep open snippets open across live updates, copy buttons, and say so
// when a refresh fails instead of silently showing stale cards.
(function () {
  "use strict";
  let saved = null;
  let refreshedFor = null;  // the suggestion that last made the page fetch a new load form

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
    // The suggestion is newer than the form: a GPU it names may have become free since. Fetch a new form.
    // Once per suggestion: if the new form still disables it, the form's rule is the one that counts.
    const stale = Array.from(form.querySelectorAll("input[name=gpu]:disabled")).some((t) => wanted.includes(t.value));
    if (stale && refreshedFor !== box.dataset.suggest) {
      refreshedFor = box.dataset.suggest;
      return refreshAll();
    }
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

  function refreshAll() {
    if (window.htmx && document.getElementById("dashboard-content")) {
      htmx.ajax("GET", window.location.pathname, { target: "#dashboard-content", swap: "outerHTML" });
    }
  }

  // The live cards (partials/dashboard_live.html) replace themselves every few seconds: not while a select in
  // them is open (a switch form), and with the snippets that were open still open.
  let openDetails = [];
  document.addEventListener("htmx:beforeSwap", function (event) {
    const target = event.detail.target;
    if (!target || target.id !== "dashboard-live") return;
    const active = document.activeElement;
    if (active && active.tagName === "SELECT" && target.contains(active)) {
      event.detail.shouldSwap = false;
      return;
    }
    openDetails = Array.from(target.querySelectorAll("details[open][id]")).map((d) => d.id);
  });
  document.addEventListener("htmx:afterSettle", function (event) {
    const live = document.getElementById("dashboard-live");
    if (!live || !event.detail.target || event.detail.target.id !== "dashboard-live") return;
    openDetails.forEach((id) => { const d = document.getElementById(id); if (d) d.open = true; });
    openDetails = [];
    const form = document.getElementById("load-form");
    if (form && form.dataset.formSignature !== live.dataset.formSignature) refreshAll();
  });

  // Copy buttons: data-copy names the element whose text is copied.
  document.addEventListener("click", function (event) {
    const button = event.target.closest("[data-copy]");
    if (!button) return;
    const source = document.querySelector(button.dataset.copy);
    if (!source) return;
    const text = source.innerText.trim();
    const done = () => { button.textContent = "Copied"; setTimeout(() => { button.textContent = "Copy"; }, 1500); };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(done, () => fallbackCopy(text, done));
    } else {
      fallbackCopy(text, done);  // plain http on another host: no Clipboard API there
    }
  });
  function fallbackCopy(text, done) {
    const area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.style.position = "fixed";
    area.style.opacity = "0";
    document.body.appendChild(area);
    area.select();
    try { if (document.execCommand("copy")) done(); } finally { area.remove(); }
  }

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
