from django import forms
from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth.forms import AuthenticationForm
from django.utils import timezone

from . import lockout


class LockoutMixin:
    """Refuse a locked username before the password is even checked."""

    error_messages = {
        **AuthenticationForm.error_messages,
        "locked": "This account is locked after too many failed logins. Try again in %(minutes)s minute(s).",
    }

    def clean(self):
        username = self.cleaned_data.get("username")
        until = lockout.locked_until(username)
        if until is not None:
            minutes = max(1, -(-int((until - timezone.now()).total_seconds()) // 60))
            raise forms.ValidationError(
                self.error_messages["locked"], code="locked", params={"minutes": minutes}
            )
        return super().clean()


class LockoutAuthenticationForm(LockoutMixin, AuthenticationForm):
    pass


class LockoutAdminAuthenticationForm(LockoutMixin, AdminAuthenticationForm):
    error_messages = {**AdminAuthenticationForm.error_messages, **LockoutMixin.error_messages}


class TokenCreateForm(forms.Form):
    name = forms.CharField(max_length=100)
    expires_in_days = forms.IntegerField(
        min_value=1, max_value=3650, required=False, help_text="Empty: the token does not expire."
    )
