"""Template helpers for the dashboard partials: the open-alerts banner and an instance's memory per GPU and
per process (from the process lists copied onto its GPUs' rows). Database reads only."""

from django import template

from gpus.alerts import open_alerts

register = template.Library()

BANNER_LIMIT = 5


@register.simple_tag
def open_alerts_banner() -> dict:
    alerts = list(open_alerts()[: BANNER_LIMIT + 1])
    count = len(alerts) if len(alerts) <= BANNER_LIMIT else open_alerts().count()
    return {"alerts": alerts[:BANNER_LIMIT], "count": count}


@register.simple_tag
def instance_breakdown(instance) -> dict:
    """{"gpus": [{"index", "mib", "gib"}], "processes": [{"pid", "name", "used_mib", "gpu_index"}]} for an
    instance whose `gpu_links` (with their GPUs) are loaded, or given as a list in `links` (the dashboard);
    empty without per-process figures."""
    gpus, processes = [], []
    links = getattr(instance, "links", None)
    for link in instance.gpu_links.all() if links is None else links:
        mine = [p for p in link.gpu.processes or [] if p.get("instance_id") == instance.pk]
        known = [p for p in mine if p.get("used_mib") is not None]
        if not known:
            continue
        mib = sum(p["used_mib"] for p in known)
        gpus.append({"index": link.gpu.index, "mib": mib, "gib": f"{mib / 1024:.1f}"})
        processes += [{**p, "gpu_index": link.gpu.index} for p in known]
    return {"gpus": gpus, "processes": processes}
