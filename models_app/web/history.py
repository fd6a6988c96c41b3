"""Memory history pages (a uPlot chart over the same data as the history API, with a table for pages
without JavaScript) and the alerts page with acknowledge. Views read the database only."""

from datetime import UTC, datetime

from django.db.models import Q
from django.http import Http404
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_POST

from accounts import roles
from accounts.decorators import role_required
from gpus import alerts, history
from gpus.models import Alert, Gpu
from models_app.api.history import instance_marks, weights_estimate_mib
from models_app.models import GpuInstance, InstanceGpu


def _span(request):
    window = request.GET.get("window") or "24h"
    try:
        return history.parse_span(window, None)
    except history.HistoryError:
        raise Http404("no such window") from None


def _when(epoch: int) -> str:
    return timezone.localtime(datetime.fromtimestamp(epoch, UTC)).strftime("%Y-%m-%d %H:%M:%S")


def _render(request, *, title, subject_url, span, points, marks, total, kind, back, estimate=None):
    marks.sort(key=lambda m: m["t"])
    rows = [{**p, "when": _when(p["t"])} for p in points]
    listed = [{**m, "when": _when(m["t"])} for m in marks]
    data = {
        "points": points,
        "events": marks,
        "total_mib": total,
        "estimate_mib": estimate,
        "window": span.window,
    }
    return render(
        request,
        "history.html",
        {
            "title": title, "points": rows, "events": listed, "total_mib": total, "span": span,
            "summary": history.summary(points), "windows": history.window_choices(), "chart_data": data,
            "subject_url": subject_url, "kind": kind, "back": back, "estimate_mib": estimate,
        },
    )  # fmt: skip


@role_required(roles.can_read)
def gpu_history(request, pk: int):
    gpu = get_object_or_404(Gpu.objects.select_related("host"), pk=pk)
    span = _span(request)
    served = InstanceGpu.objects.filter(gpu=gpu).filter(
        Q(instance__stopped_at__isnull=True) | Q(instance__stopped_at__gte=span.start)
    )
    marks = instance_marks(served.values_list("instance_id", flat=True), span)
    marks += history.alert_events(Q(gpu=gpu), span)
    title = f"GPU {gpu.index} @ {gpu.host.name} · {gpu.name}"
    return _render(
        request, title=title, subject_url=request.path, span=span, points=history.gpu_series(gpu.pk, span),
        marks=marks, total=gpu.memory_total_mib, kind="gpu", back=f"#gpu-{gpu.pk}",
    )  # fmt: skip


@role_required(roles.can_read)
def instance_history(request, pk: int):
    instance = get_object_or_404(GpuInstance.objects.select_related("model", "host"), pk=pk)
    span = _span(request)
    marks = instance_marks([instance.pk], span) + history.alert_events(Q(instance_id=instance.pk), span)
    title = f"#{instance.pk} {instance.model.name} · GPU {instance.gpu_ids} @ {instance.host.name}"
    return _render(
        request, title=title, subject_url=request.path, span=span,
        points=history.instance_series(instance.pk, span), marks=marks, total=instance.memory_total_mb,
        kind="instance", back=f"#instance-{instance.pk}", estimate=weights_estimate_mib(instance),
    )  # fmt: skip


@role_required(roles.can_read)
def alert_list(request):
    live = list(alerts.open_alerts()[:100])
    recent = list(
        Alert.objects.filter(status=Alert.Status.RESOLVED)
        .select_related("rule")
        .order_by("-resolved_at")[:50]
    )
    return render(
        request,
        "alerts.html",
        {"open_alerts": live, "recent": recent, "can_acknowledge": roles.can_load(request.user)},
    )


@require_POST
@role_required(roles.can_load)
def acknowledge(request, pk: int):
    alerts.acknowledge(get_object_or_404(Alert, pk=pk), request.user.get_username())
    target = request.POST.get("next") or ""
    safe = url_has_allowed_host_and_scheme(target, allowed_hosts={request.get_host()}, require_https=False)
    return redirect(target if target and safe else "alerts")
