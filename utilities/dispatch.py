"""Queue a Celery task by the name it declares (`@shared_task(name=...)`): the one sender that every app's
dispatch module goes through (models_app/dispatch.py, gpus/dispatch.py), so no module imports a tasks.py to
queue work. Imports no app of ours. Tests replace `publish` to capture what would reach the broker."""

from collections.abc import Callable

from celery import current_app
from django.db import transaction


def publish(name: str, args: list, options: dict) -> None:
    """Hand one message to the broker now. Every task of ours ignores its result: no result subscription."""
    current_app.send_task(name, args=args, ignore_result=True, **options)


def send(
    name: str,
    args: list,
    *,
    at_once: bool,
    on_error: Callable[[Exception], None] | None = None,
    robust: bool = False,
    **options,
) -> None:
    """Queue task `name` with `args` and Celery's options (queue, expires, countdown, retry, …): now
    (`at_once`), or when the current transaction commits. A broker error goes to `on_error` where given;
    otherwise it is raised to the caller (at once) or from the commit (on commit; only logged by Django
    where `robust`)."""
    args = list(args)

    def go() -> None:
        try:
            publish(name, args, options)
        except Exception as exc:
            if on_error is None:
                raise
            on_error(exc)

    if at_once:
        go()
    else:
        transaction.on_commit(go, robust=robust)
