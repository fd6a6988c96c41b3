from django.core.management.base import BaseCommand

from gpus.models import alive_cutoff
from models_app.formatting import format_duration
from models_app.models import GpuInstance

COLUMNS = ["ID", "MODEL", "HOST", "GPUS", "PORT", "STATUS", "UPTIME", "MEMORY", "OWNER"]


def memory(instance: GpuInstance) -> str:
    percent = instance.memory_percent
    if percent is None:
        return "N/A"
    return f"{instance.memory_used_mb} MiB / {instance.memory_total_mb} MiB ({percent}%)"


def host_cell(host, cutoff) -> str:
    up = host.last_seen is not None and host.last_seen >= cutoff
    return host.name if up else f"{host.name} (down)"


class Command(BaseCommand):
    help = (
        "The loaded models, like `ollama ps`: ID, MODEL, HOST, GPUS, PORT, STATUS, UPTIME, MEMORY, OWNER. "
        'A down host shows as "box-2 (down)"; its instances are `unknown` and keep their last figures.'
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--all", action="store_true", help="Include stopped, crashed and failed instances."
        )

    def handle(self, all, **options):
        instances = GpuInstance.objects.select_related("host", "owner").order_by(
            "host__name", "gpu_ids", "-pk"
        )
        if not all:
            instances = instances.filter(status__in=GpuInstance.ACTIVE_STATUSES)
        cutoff = alive_cutoff()
        rows = [
            [
                str(i.pk),
                i.model_id,
                host_cell(i.host, cutoff),
                i.gpu_ids,
                str(i.port or "-"),
                i.status,
                format_duration(i.uptime_seconds),
                memory(i),
                i.owner.get_username() if i.owner else "system",
            ]
            for i in instances
        ]
        widths = [max(len(row[n]) for row in [COLUMNS, *rows]) for n in range(len(COLUMNS))]
        for row in [COLUMNS, *rows]:
            self.stdout.write(
                "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
            )
