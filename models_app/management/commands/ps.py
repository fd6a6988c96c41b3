from django.core.management.base import BaseCommand

from models_app.formatting import format_duration
from models_app.models import GpuInstance

COLUMNS = ["ID", "MODEL", "GPUS", "PORT", "STATUS", "UPTIME", "MEMORY", "OWNER"]


def memory(instance: GpuInstance) -> str:
    percent = instance.memory_percent
    if percent is None:
        return "N/A"
    return f"{instance.memory_used_mb} MiB / {instance.memory_total_mb} MiB ({percent}%)"


class Command(BaseCommand):
    help = "The loaded models, like `ollama ps`: ID, MODEL, GPUS, PORT, STATUS, UPTIME, MEMORY, OWNER."

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
        several_hosts = len({i.host_id for i in instances}) > 1
        rows = [
            [
                str(i.pk),
                i.model_id,
                f"{i.host.name}:{i.gpu_ids}" if several_hosts else i.gpu_ids,
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
