from django.core.management.base import BaseCommand, CommandError

from gpus.models import Host
from models_app.hosts import clear_host

from ._lifecycle import actor_from


class Command(BaseCommand):
    help = (
        "Clear the 'not heard from' mark from a lost host's GPUs (the host is back, or its GPUs are known to "
        "be free): `clear_host NAME [--user NAME]`. Recorded as an event."
    )

    def add_arguments(self, parser):
        parser.add_argument("host", help="Host name.")
        parser.add_argument("--user", help="Recorded as the actor; default: the system.")

    def handle(self, host, user, **options):
        found = Host.objects.filter(name=host).first()
        if found is None:
            raise CommandError(f"unknown host {host!r}")
        count = clear_host(found, actor=actor_from(user))
        self.stdout.write(f"{found.name}: {count} GPU(s) cleared")
