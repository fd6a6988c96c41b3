from django.core.management.base import BaseCommand

from models_app.services import AUTO, request_load, request_load_auto

from ._lifecycle import add_common_arguments, add_force_argument, request_and_report


def load(*, gpu_spec: str, **request):
    """`--gpu auto`: the controller chooses the host (or, with --host, that host's GPUs) and the GPUs."""
    if gpu_spec.strip().lower() == AUTO:
        return request_load_auto(**request)
    return request_load(gpu_spec=gpu_spec, **request)


class Command(BaseCommand):
    help = (
        "Load a model onto GPUs of one host: `load MODEL --gpu 0,1 [--host NAME] [--wait] [--user NAME] "
        "[--force] [--evict]`; `--gpu auto` lets the controller choose the host and GPUs."
    )

    def add_arguments(self, parser):
        parser.add_argument("model", help="Model id from the registry.")
        add_common_arguments(parser)
        add_force_argument(parser)
        parser.add_argument(
            "--evict",
            action="store_true",
            help="Where the model does not fit, unload idle models to make room (each one an event).",
        )

    def handle(self, model, gpu, host, user, wait, force, evict, **options):
        request_and_report(
            self, load, model=model, gpu=gpu, host=host, user=user, wait=wait, force=force, evict=evict
        )
