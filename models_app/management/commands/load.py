from django.core.management.base import BaseCommand

from models_app.services import request_load

from ._lifecycle import add_common_arguments, add_force_argument, request_and_report


class Command(BaseCommand):
    help = "Load a model onto GPUs of one host: `load MODEL --gpu 0,1 [--host NAME] [--wait] [--user NAME] [--force]`."

    def add_arguments(self, parser):
        parser.add_argument("model", help="Model id from the registry.")
        add_common_arguments(parser)
        add_force_argument(parser)

    def handle(self, model, gpu, host, user, wait, force, **options):
        request_and_report(
            self, request_load, model=model, gpu=gpu, host=host, user=user, wait=wait, force=force
        )
