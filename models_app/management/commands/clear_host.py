from django.core.management.base import BaseCommand, CommandError

from gpus.models import Host
from models_app.hosts import clear_host, retire_host

from ._lifecycle import actor_from


class Command(BaseCommand):
    help = (
        "Clear the 'not heard from' mark from a lost host's GPUs (the host is back, or its GPUs are known to "
        "be free): `clear_host NAME [--user NAME]`. With --retire, a down host that will not come back: its "
        "unknown instances fail and release their GPUs. Recorded as an event."
    )

    def add_arguments(self, parser):
        parser.add_argument("host", help="Host name.")
        parser.add_argument("--user", help="Recorded as the actor; default: the system.")
        parser.add_argument(
            "--retire", action="store_true", help="Write off the unknown instances of a down host."
        )

    def handle(self, host, user, retire, **options):
        found = Host.objects.filter(name=host).first()
        if found is None:
            raise CommandError(f"unknown host {host!r}")
        if retire:
            try:
                written_off = retire_host(found, actor=actor_from(user))
            except ValueError as exc:
                raise CommandError(f"not retired: {exc}") from None
            self.stdout.write(f"{found.name}: {written_off} unknown instance(s) written off")
        count = clear_host(found, actor=actor_from(user))
        self.stdout.write(f"{found.name}: {count} GPU(s) cleared")
