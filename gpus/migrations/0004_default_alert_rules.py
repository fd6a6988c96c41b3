"""Sensible alert rules after install; admins change or disable them in the admin or the API."""

from django.db import migrations

DEFAULT_RULES = [
    # name, kind, severity, threshold, hysteresis, for_minutes, window_minutes, clear_minutes
    ("GPU memory above 90 %", "gpu_used_pct", "warning", 90, 5, 5, 60, 1),
    ("GPU memory almost full (under 1 GiB free)", "gpu_headroom", "critical", 1024, 512, 1, 60, 1),
    ("Instance memory leak (growing 512 MiB/h or more)", "instance_leak", "warning", 512, 256, 0, 60, 5),
    ("GPU telemetry failing for 2 minutes", "telemetry_failing", "critical", 0, 0, 2, 60, 1),
    ("Foreign process on a GPU serving a model", "foreign_process", "warning", 0, 0, 0, 60, 2),
    ("Instance crashed", "instance_crashed", "critical", 0, 0, 0, 60, 0),
]


def create_rules(apps, schema_editor):
    AlertRule = apps.get_model("gpus", "AlertRule")
    for name, kind, severity, threshold, hysteresis, for_minutes, window, clear in DEFAULT_RULES:
        AlertRule.objects.get_or_create(
            name=name,
            defaults={
                "kind": kind, "severity": severity, "threshold": threshold, "hysteresis": hysteresis,
                "for_minutes": for_minutes, "window_minutes": window, "clear_minutes": clear,
            },
        )  # fmt: skip


def remove_rules(apps, schema_editor):
    apps.get_model("gpus", "AlertRule").objects.filter(name__in=[r[0] for r in DEFAULT_RULES]).delete()


class Migration(migrations.Migration):
    dependencies = [("gpus", "0003_alerts")]

    operations = [migrations.RunPython(create_rules, remove_rules)]
