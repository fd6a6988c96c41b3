"""The dashboard's GPU and instance cards, written in Python rather than as included templates.

At 50 hosts (400 GPU cards, 200 instance cards) the template engine took about 0.35 s per refresh for the cards
alone (docs/benchmarks.md, "The cluster at scale"): some 25 variable lookups, filters and number formats per
card. The same markup from f-strings takes a few hundredths of that. Every value comes from dashboard_context
(models_app/web/dashboard.py), which computes what the cards show; everything from the database or a person is
escaped here. Tags: `{% gpu_card gpu %}` and `{% instance_card instance %}` (they read `is_admin`, `models`,
`multi_host`, `gateway_base_url` and the CSRF token from the page's context)."""

import html
from functools import cache

from django import template
from django.middleware.csrf import get_token
from django.template.defaultfilters import floatformat, pluralize
from django.urls import get_script_prefix, reverse
from django.utils import timezone
from django.utils.dateformat import format as date_format
from django.utils.safestring import mark_safe

from gpus.models import Gpu
from gpus.templatetags.gpu_alerts import instance_breakdown
from models_app.formatting import format_mib
from models_app.models import GpuInstance

register = template.Library()
# get_FOO_display() hashes its choices on every call; these are looked up once.
GPU_STATES = dict(Gpu.State.choices)
STATUSES = dict(GpuInstance.Status.choices)
SOURCES = dict(GpuInstance.MemorySource.choices)


def _when(moment, fmt: str) -> str:
    """As the |date and |time filters write it: in the current time zone."""
    return date_format(timezone.localtime(moment), fmt)


def _csrf_input(context) -> str:
    """What {% csrf_token %} writes."""
    token = context.get("csrf_token")
    if token is None and context.get("request") is not None:
        token = get_token(context["request"])
    if not token or str(token) == "NOTPROVIDED":
        return ""
    return f'<input type="hidden" name="csrfmiddlewaretoken" value="{escape(token)}">'


def escape(value) -> str:
    """As django.utils.html.escape (the same five characters), without its lazy-string check: a third of
    the cards' time went there."""
    return html.escape(str(value))


_SLOT = 918273645  # stands for each argument in a reversed URL


@cache
def _url_pattern(name: str, count: int, prefix: str) -> str:
    return reverse(name, args=[_SLOT] * count)


def _url(name: str, *args) -> str:
    """reverse(name, args) from a pattern reversed once per process: 1,200 reverse() calls were a tenth of
    the page's time. Arguments are whole numbers (pks, pids)."""
    url = _url_pattern(name, len(args), get_script_prefix())
    for arg in args:
        url = url.replace(str(_SLOT), str(int(arg)), 1)
    return escape(url)


def _number(value) -> str:
    """A number as the page writes it (no localisation: the partial renders with localize off)."""
    return "" if value is None else str(value)


def _memory_bar(gpu) -> str:
    """The stacked bar (one segment per model, the other processes, free) and its legend with the figures, which
    a phone reads without hovering."""
    if not gpu.segments:
        return ""
    bar, legend = [], []
    for seg in gpu.segments:
        attrs = (
            f'class="seg seg-{seg.kind}" data-kind="{seg.kind}" data-mib="{seg.mib}"'
            + ("" if seg.instance_id is None else f' data-instance="{seg.instance_id}"')
            + f' title="{escape(seg.title)}"'
        )
        bar.append(f'<span {attrs} style="width: {seg.percent:.2f}%"></span>')
        legend.append(
            f'<li {attrs}><i aria-hidden="true"></i>{escape(seg.label)} <span class="seg-figure">'
            f"{format_mib(seg.mib)}</span></li>"
        )
    summary = "; ".join(seg.title for seg in gpu.segments)
    return (
        f'  <div class="membar" role="img" aria-label="{escape(summary)}">{"".join(bar)}</div>\n'
        f'  <ul class="membar-legend small">{"".join(legend)}</ul>\n'
    )


def _hardware_line(gpu) -> str:
    if gpu.memory_used_mib is None:
        memory = f"Used memory unknown · {format_mib(gpu.memory_total_mib)} total"
    else:
        memory = (
            f'<span class="gpu-used">{format_mib(gpu.memory_used_mib)}</span> / {format_mib(gpu.memory_total_mib)} '
            "used (whole GPU)"
        )

    def figure(value, unit: str) -> str:
        return "—" if value is None else f"{value} {unit}"

    sensors = (
        f'<span class="nowrap">utilisation <span class="gpu-util">{figure(gpu.utilization_pct, "%")}</span></span> · '
        f'<span class="nowrap gpu-temperature">{figure(gpu.temperature_c, "°C")}</span> · '
        f'<span class="nowrap gpu-power">{figure(gpu.power_w, "W")}</span>'
    )
    return f'  <p class="hw-memory small">{memory}<br>{sensors}</p>\n'


@register.simple_tag(takes_context=True)
def gpu_card(context, gpu) -> str:
    state, index = escape(gpu.state), escape(_number(gpu.index))
    shown = escape(gpu.shown_state)
    out = [
        f'<article class="card gpu-card state-{state}" id="gpu-{gpu.pk}" data-state="{state}" data-index="{index}">\n'
        f'  <header class="card-head">\n    <h3>GPU {index}</h3>\n'
        f'    <span class="badge badge-{shown} gpu-state">{escape(gpu.shown_label)}</span>\n  </header>\n'
        f'  <p class="gpu-name">{escape(gpu.name)}'
        + (' <span class="badge badge-sim">simulated</span>' if gpu.simulated else "")
        + "</p>\n"
        + _memory_bar(gpu)
        + _hardware_line(gpu)
    ]
    if gpu.holders:
        serving = ", ".join(
            f'<a href="#instance-{h.pk}">{escape(h.model.name)}</a> (#{h.pk})' for h in gpu.holders
        )
        out.append(f'  <p class="small">Serving {serving}</p>\n')
    if gpu.state_reason:
        out.append(f'  <p class="muted small">{escape(gpu.state_reason)}</p>\n')
    if gpu.other_processes:
        out.append('  <ul class="procs small">\n')
        for proc in gpu.other_processes:
            pid = escape(_number(proc.get("pid")))
            used = proc.get("used_mib")
            out.append(
                f'    <li>\n      <span>{escape(proc.get("name") or "?")} <span class="muted">pid {pid}</span></span>\n'
                f"      <span>{'' if used is None else format_mib(used)}\n"
            )
            if proc.get("owner") == "foreign":
                out.append('        <span class="badge badge-foreign">foreign</span>')
            if proc.get("owner") == "orphan":
                out.append('<span class="badge badge-orphan">orphan</span>')
                if context.get("is_admin"):
                    kill = _url("orphan-kill", gpu.pk, proc.get("pid"))
                    out.append(
                        f'\n          <form method="post" action="{kill}" class="inline" hx-post="{kill}" '
                        f'hx-target="#dashboard-content" hx-swap="outerHTML" '
                        f'hx-confirm="Kill orphan process {pid}?">{_csrf_input(context)}\n'
                        '            <button type="submit" class="btn btn-danger btn-small">Kill</button>\n'
                        "          </form>\n"
                    )
            out.append("</span>\n    </li>\n")
        out.append("  </ul>\n")
    # Our own processes on this GPU (the list above has the foreign and orphan ones).
    ours = [p for p in gpu.processes or [] if p.get("owner") == "instance"]
    if ours:
        out.append('<ul class="procs small ours">\n  ')
        for proc in ours:
            used = proc.get("used_mib")
            out.append(
                f'<li><span>{escape(proc.get("name") or "?")} <span class="muted">pid '
                f"{escape(_number(proc.get('pid')))}</span></span><span>"
                f'{"" if used is None else format_mib(used)} <span class="badge badge-model_loaded">ours '
                f"#{escape(_number(proc.get('instance_id')))}</span></span></li>"
            )
        out.append("\n</ul>\n")
    out.append(
        f'<a class="btn btn-small history-link" href="{_url("gpu-history-page", gpu.pk)}">History</a>\n</article>\n'
    )
    return mark_safe("".join(out))  # noqa: S308 - every value above is escaped


def _memory_line(instance) -> str:
    percent = instance.memory_percent
    if percent is None:
        title, figure, source = "No memory figure for this instance yet", "Memory: N/A", ""
    else:
        title = escape(SOURCES.get(instance.memory_source, instance.memory_source))
        if instance.memory_updated_at:
            title += f" at {_when(instance.memory_updated_at, 'Y-m-d H:i:s T')}"
        figure = (
            f"Memory: {instance.memory_used_mb} MiB / {instance.memory_total_mb} MiB "
            f"({floatformat(percent, 1)}%)"
        )
        source = "per process" if instance.memory_source == "process" else "whole GPU"
        if instance.memory_updated_at:
            source += f" · {_when(instance.memory_updated_at, 'H:i:s')}"
        source = f'<span class="memory-source">{source}</span>'
    return (
        f'  <p class="instance-memory"\n     title="{title}">\n'
        f'    <span class="memory-figure">{figure}</span>\n    {source}\n  </p>\n'
    )


def _estimate_line(instance) -> str:
    if not instance.memory_estimated_mb:
        return ""
    correction = (instance.memory_estimate or {}).get("correction")
    loads = correction.get("loads") if isinstance(correction, dict) else None
    title = "Predicted when the load was asked for"
    if loads:
        title += f", corrected from {escape(loads)} earlier load{pluralize(loads)}"
    text = f"Estimated {format_mib(instance.memory_estimated_mb)}"
    if instance.memory_estimate_error_pct is not None:
        text += (
            f" · measured {format_mib(instance.memory_measured_mb)} "
            f"({floatformat(instance.memory_estimate_error_pct, 1)} %)"
        )
    return f'  <p class="instance-estimate small muted"\n     title="{title}">{text}</p>\n'


def _breakdown(instance) -> str:
    breakdown = instance_breakdown(instance)
    out = []
    if breakdown["gpus"]:
        out.append('<div class="memory-breakdown small">\n')
        if len(breakdown["gpus"]) > 1:
            items = ", ".join(
                f'<span class="per-gpu-item">GPU {row["index"]}: {format_mib(row["mib"])}</span>'
                for row in breakdown["gpus"]
            )
            out.append(f'  <p class="per-gpu">{items}</p>\n')
        if len(breakdown["processes"]) > 1 or len(breakdown["gpus"]) > 1:
            rows = "".join(
                f'<li><span>{escape(p.get("name") or "?")} <span class="muted">pid {escape(_number(p.get("pid")))} · '
                f"GPU {p['gpu_index']}</span></span><span>{format_mib(p['used_mib'])}</span></li>"
                for p in breakdown["processes"]
            )
            out.append(f'  <ul class="procs per-process">\n    {rows}\n  </ul>\n')
        out.append("</div>\n")
    out.append(
        f'<a class="btn btn-small history-link" href="{_url("instance-history-page", instance.pk)}">History</a>\n'
    )
    return "".join(out)


def _copyable(block_id: str, text: str, css: str = "") -> str:
    """A code block with a Copy button (static/js/app.js copies the block's text)."""
    return (
        f'    <div class="copyable"><pre id="{block_id}" class="{css}">{text}</pre>'
        f'<button type="button" class="btn btn-small copy-button" data-copy="#{block_id}">Copy</button></div>\n'
    )


def _gateway_block(instance, base: str) -> str:
    """How to use the model: through the gateway with an API token, as curl and as Python (openai, ollama), each
    with a Copy button, and the browser playground. `base` is escaped; the model id is escaped here."""
    model, pk = escape(instance.model_id), instance.pk
    message = '[{"role": "user", "content": "Hello"}]'
    curl = (
        f"curl {base}v1/chat/completions \\\n"
        '  -H "Authorization: Bearer $LC_TOKEN" \\\n'
        '  -H "Content-Type: application/json" \\\n'
        f'  -d \'{{"model": "{model}", "messages": {escape(message)}}}\''
    )
    openai = (
        "import os\nfrom openai import OpenAI\n\n"
        f'client = OpenAI(base_url="{base}v1", api_key=os.environ["LC_TOKEN"])\n'
        f'answer = client.chat.completions.create(model="{model}", messages={escape(message)})\n'
        "print(answer.choices[0].message.content)"
    )
    ollama = (
        "import os\nfrom ollama import Client\n\n"
        f'client = Client(host="{base.rstrip("/")}", headers={{"Authorization": "Bearer " + os.environ["LC_TOKEN"]}})\n'
        f'answer = client.chat(model="{model}", messages={escape(message)})\n'
        'print(answer["message"]["content"])'
    )
    return (
        '  <div class="gateway-use small">\n    <dl class="facts">\n'
        f'      <dt>OpenAI</dt><dd><code class="gateway-base">{base}v1</code></dd>\n'
        f"      <dt>Ollama</dt><dd><code>{base}</code></dd>\n"
        f'      <dt>Model</dt><dd><code class="gateway-model">{model}</code></dd>\n    </dl>\n'
        + _copyable(f"curl-{pk}", curl, "gateway-curl")
        + f'    <details class="snippets" id="snippets-{pk}"><summary>Python (openai, ollama)</summary>\n'
        + _copyable(f"openai-{pk}", openai)
        + _copyable(f"ollama-{pk}", ollama)
        + "    </details>\n"
        f'    <span class="muted">$LC_TOKEN: a token from <a href="{_url("tokens")}">API tokens</a>.</span>\n'
        "  </div>\n"
    )


@register.simple_tag(takes_context=True)
def gateway_snippets(context, instance) -> str:
    """The instance card's "use it through the gateway" block, for the playground page."""
    return mark_safe(_gateway_block(instance, escape(context.get("gateway_base_url", "/"))))  # noqa: S308 - escaped


def _actions(context, instance) -> str:
    out = [
        f'  <div class="actions">\n    <a class="btn btn-small" href="{_url("instance-log", instance.pk)}">Log</a>\n'
    ]
    if instance.status == "running":
        out.append(
            f'    <a class="btn btn-small btn-primary playground-link" href="{_url("playground", instance.pk)}">'
            "Playground</a>\n"
        )
    if instance.can_manage and instance.status != "stopping":
        name, gpu_ids = escape(instance.model.name), escape(instance.gpu_ids)
        down = f' disabled title="{escape(instance.host.reason)}"' if instance.host_down else ""
        unload = _url("instance-unload", instance.pk)
        out.append(
            f'    <form method="post" action="{unload}" class="inline"\n'
            f'          hx-post="{unload}" hx-target="#dashboard-content" hx-swap="outerHTML"\n'
            f'          hx-confirm="Unload {name} from GPU {gpu_ids}?">{_csrf_input(context)}\n'
            f'      <button type="submit" class="btn btn-danger btn-small unload-button"{down}>Unload</button>\n'
            "    </form>\n"
        )
        models = context.get("models") or []
        if len(models) > 1:
            switch = _url("instance-switch", instance.pk)
            options = "".join(
                f'<option value="{escape(m.pk)}">{escape(m.name)}</option>'
                for m in models
                if m.pk != instance.model_id
            )
            out.append(
                f'    <form method="post" action="{switch}" class="inline switch-form"\n'
                f'          hx-post="{switch}" hx-target="#dashboard-content" hx-swap="outerHTML">'
                f"{_csrf_input(context)}\n"
                f'      <label class="visually-hidden" for="switch-{instance.pk}">Switch to model</label>\n'
                f'      <select name="model_id" id="switch-{instance.pk}">\n        {options}\n      </select>\n'
                f'      <button type="submit" class="btn btn-small"{down}>Switch</button>\n    </form>\n'
            )
    out.append("  </div>\n")
    return "".join(out)


@register.simple_tag(takes_context=True)
def instance_card(context, instance) -> str:
    status = escape(instance.status)
    status_display = escape(STATUSES.get(instance.status, instance.status))
    host = f" @ {escape(instance.host.name)}" if context.get("multi_host") else ""
    owner = escape(instance.owner.get_username()) if instance.owner else "system"  # as `manage.py ps` says
    out = [
        f'<article class="card instance-card status-{status}" id="instance-{instance.pk}"\n'
        f'         data-status="{status}" style="--span: {instance.gpu_count or 1}">\n'
        f'  <header class="card-head">\n    <h3>{escape(instance.model.name)}</h3>\n'
        f'    <span class="badge badge-{status} instance-status">{status_display}</span>\n'
        + "".join(
            f'    <span class="badge badge-{kind} policy-mark" title="{escape(title)}">{label}</span>\n'
            for kind, label, title in instance.policy_marks
        )
        + "  </header>\n"
    ]
    if instance.unknown_note:
        out.append(
            f'  <p class="alert alert-warning small unknown-note" title="{escape(instance.host.reason)}">'
            f"{escape(instance.unknown_note)}</p>\n"
        )
    out.append(
        '  <dl class="facts small">\n'
        f"    <dt>GPU{pluralize(instance.gpu_count)}</dt>"
        f'<dd class="instance-gpus">{escape(instance.gpu_ids)}{host}</dd>\n'
        f"    <dt>Uptime</dt><dd>{escape(instance.uptime_display or '—')}</dd>\n"
        f"    <dt>Owner</dt><dd>{owner}</dd>\n  </dl>\n"
    )
    if instance.idle_note:
        expires = ""
        if instance.status == "running" and instance.expires_at:
            in_flight = (
                f", {instance.in_flight} request{pluralize(instance.in_flight)} in flight"
                if instance.in_flight
                else ""
            )
            expires = (
                f' <span class="expires" title="{_when(instance.expires_at, "Y-m-d H:i:s T")}">'
                f"(at {_when(instance.expires_at, 'H:i')}{in_flight})</span>"
            )
        out.append(f'  <p class="idle-unload small">{escape(instance.idle_note)}{expires}</p>\n')
    if instance.in_transition:
        progress = instance.progress or 0
        elapsed = f" for {escape(instance.elapsed_display)}" if instance.elapsed_display else ""
        elapsed += (
            f" ({escape(instance.waiting_for)})"
            if instance.status == "pending" and instance.waiting_for
            else ""
        )
        out.append(
            '  <div class="progress-row small">\n'
            f'    <progress max="100" value="{progress}">{progress}%</progress>\n'
            f'    <span class="elapsed">{status_display}{elapsed}…</span>\n  </div>\n'
        )
    # The model's own memory (its processes), distinct from the whole-GPU figure on the hardware cards.
    out.append(_memory_line(instance))
    out.append(_estimate_line(instance))
    out.append(_breakdown(instance))
    if instance.status == "running":
        # How to use it: through the gateway, with an API token; its internal port is not for people.
        out.append(_gateway_block(instance, escape(context.get("gateway_base_url", "/"))))
    out.append(_actions(context, instance))
    out.append("</article>\n")
    return mark_safe("".join(out))  # noqa: S308 - every value above is escaped
