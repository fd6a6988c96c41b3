from datetime import timedelta

from django.contrib import messages
from django.contrib.auth import views as auth_views
from django.db import transaction
from django.http import Http404
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_POST

from . import audit, roles, tokens
from .decorators import role_required
from .forms import ThrottledPasswordChangeForm, TokenCreateForm
from .models import ApiToken


class LoginView(auth_views.LoginView):
    # Throttled by django-axes (see throttle.py): its backend refuses a locked (username, address) pair.
    template_name = "registration/login.html"
    redirect_authenticated_user = True


class ThrottledPasswordChange:
    """The current password is counted like logins (throttle.check_current_password): while the change is
    locked the form says why, with status 429."""

    form_class = ThrottledPasswordChangeForm

    def get_form_kwargs(self):
        return {**super().get_form_kwargs(), "request": self.request}

    def form_invalid(self, form):
        response = super().form_invalid(form)
        if form.locked:
            response.status_code = 429
        return response


class AdminPasswordChangeView(ThrottledPasswordChange, auth_views.PasswordChangeView):
    """The admin's own "Change password" page (admin.py)."""


class PasswordChangeView(ThrottledPasswordChange, auth_views.PasswordChangeView):
    """Change your own password: the current one is asked for (and throttled), the session stays logged
    in, and the change is an event."""

    template_name = "registration/password_change_form.html"
    success_url = "/"

    def form_valid(self, form):
        with transaction.atomic():
            response = super().form_valid(form)
            audit.emit(
                audit.USER_CHANGED,
                actor=self.request.user,
                detail=f"user {self.request.user.get_username()!r}: password set (own, current password given)",
            )
        messages.success(self.request, "Your password was changed.")
        return response


@never_cache
@role_required(roles.can_read)
def token_list(request):
    """List the user's own tokens; a POST creates one and shows it this once (never stored, never cached)."""
    issued = None
    if request.method == "POST":
        form = TokenCreateForm(request.POST)
        if form.is_valid():
            days = form.cleaned_data["expires_in_days"]
            expires_at = timezone.now() + timedelta(days=days) if days else None
            _, issued = tokens.issue(user=request.user, name=form.cleaned_data["name"], expires_at=expires_at)
            form = TokenCreateForm()
    else:
        form = TokenCreateForm()
    context = {
        "form": form,
        "issued": issued,
        "tokens": ApiToken.objects.filter(user=request.user),
    }
    return render(request, "accounts/tokens.html", context, status=400 if form.errors else 200)


@require_POST
@role_required(roles.can_read)
def token_revoke(request, pk: int):
    token = get_object_or_404(ApiToken, pk=pk)
    if token.user_id != request.user.pk and not roles.can_administer(request.user):
        raise Http404("No such token.")
    if tokens.revoke(token=token, actor=request.user):
        messages.success(request, f"Token {token.name!r} revoked.")
    return redirect("tokens")
