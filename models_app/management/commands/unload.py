from django.core.management.base import BaseCommand, CommandError

from models_app.errors import Refused
from models_app.models import GpuInstance
from models_app.services import request_unload, request_unload_gpus

from ._lifecycle import actor_from, add_common_arguments, describe, refused, wait_for


class Command(BaseCommand):
    help = "Unload an instance by id, or whatever runs on GPUs: `unload ID` or `unload --gpu 0 [--host]`."

    def add_arguments(self, parser):
        parser.add_argument("id", nargs="?", type=int, help="Instance id (see `ps`).")
        add_common_arguments(parser, gpu_required=False)

    def handle(self, id, gpu, host, user, wait, **options):
        if (id is None) == (gpu is None):
            raise CommandError("give either an instance ID or --gpu")
        actor = actor_from(user)
        try:
            if id is not None:
                instance = GpuInstance.objects.select_related("host").filter(pk=id).first()
                if instance is None:
                    raise CommandError(f"no instance #{id}")
                instances = [request_unload(instance=instance, actor=actor)]
            else:
                instances = request_unload_gpus(gpu_spec=gpu, actor=actor, host_name=host)
        except Refused as exc:
            raise refused(exc) from None
        for instance in instances:
            if wait:
                instance = wait_for(instance, (GpuInstance.Status.STOPPED,))
                self.stdout.write(describe(instance))
            else:
                self.stdout.write(f"unload requested: {describe(instance)}")
