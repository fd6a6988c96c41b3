from django.core.management.base import BaseCommand, CommandError

from models_app.models import GpuInstance
from models_app.services import LoadRefused, request_switch

from ._lifecycle import actor_from, add_common_arguments, describe, refused, wait_for


class Command(BaseCommand):
    help = "Unload what runs on the GPUs and load MODEL there: `switch MODEL --gpu 0 [--host] [--wait]`."

    def add_arguments(self, parser):
        parser.add_argument("model", help="Model id from the registry.")
        add_common_arguments(parser)

    def handle(self, model, gpu, host, user, wait, **options):
        try:
            instance = request_switch(model_id=model, gpu_spec=gpu, actor=actor_from(user), host_name=host)
        except LoadRefused as exc:
            raise refused(exc) from None
        if not wait:
            self.stdout.write(f"requested: {describe(instance)}")
            return
        instance = wait_for(instance, (GpuInstance.Status.RUNNING,))
        if instance.status != GpuInstance.Status.RUNNING:
            raise CommandError(describe(instance))
        self.stdout.write(describe(instance))
