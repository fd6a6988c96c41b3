"""Role checks for the web pages. Anonymous users go to the login page; an htmx request (a card refresh
after the session expired) gets an `HX-Redirect`, so the whole browser goes there instead of a login form
being swapped into a card. Users without the needed role get 403."""

from functools import wraps

from django.conf import settings
from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied
from django.shortcuts import resolve_url
from django_htmx.http import HttpResponseClientRedirect

from . import roles


def role_required(check=roles.can_read):
    def decorator(view):
        @wraps(view)
        def wrapper(request, *args, **kwargs):
            if not request.user.is_authenticated:
                if getattr(request, "htmx", False):
                    # Back to the page the card lives on, not to the partial's URL.
                    current = request.htmx.current_url_abs_path or resolve_url(settings.LOGIN_REDIRECT_URL)
                    login = resolve_url(settings.LOGIN_URL)
                    return HttpResponseClientRedirect(f"{login}?next={current}")
                return redirect_to_login(request.get_full_path())
            if not check(request.user):
                raise PermissionDenied("Your account does not have the role this page needs.")
            return view(request, *args, **kwargs)

        return wrapper

    return decorator
