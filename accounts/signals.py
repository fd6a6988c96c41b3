"""Failed and successful logins, wherever they happen (login page, admin login), feed the lockout."""

from django.contrib.auth.signals import user_logged_in, user_login_failed
from django.dispatch import receiver

from . import lockout


@receiver(user_login_failed)
def count_failed_login(sender, credentials, request=None, **kwargs):
    lockout.record_failure(credentials.get("username", ""), lockout.client_ip(request))


@receiver(user_logged_in)
def forget_failed_logins(sender, request, user, **kwargs):
    lockout.clear_failures(user.get_username())
