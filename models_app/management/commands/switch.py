from django.core.management.base import BaseCommand

from models_app.services import request_switch

from ._lifecycle import add_common_arguments, add_force_argument, request_and_report


class Command(BaseCommand):
    help = "Unload what runs on the GPUs and load MODEL there: `switch MODEL --gpu 0 [--host] [--wait]`."

    def add_arguments(self, parser):
        parser.add_argument("model", help="Model id from the registry.")
        add_common_arguments(parser)
        add_force_argument(parser)

    def handle(self, model, gpu, host, user, wait, force, **options):
        request_and_report(
            self, request_switch, model=model, gpu=gpu, host=host, user=user, wait=wait, force=force
        )
