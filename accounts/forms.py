from django import forms
from django.contrib.auth.forms import PasswordChangeForm

from utilities.query import AsciiIntegerField

from . import throttle


class TokenCreateForm(forms.Form):
    name = forms.CharField(max_length=100)
    expires_in_days = AsciiIntegerField(
        min_value=1, max_value=3650, required=False, help_text="Empty: the token does not expire."
    )


class ThrottledPasswordChangeForm(PasswordChangeForm):
    """Django's form, with the current password counted like logins (throttle.check_current_password):
    `locked` says the change was refused for too many wrong ones."""

    def __init__(self, user, *args, request=None, **kwargs):
        super().__init__(user, *args, **kwargs)
        self.request = request
        self.locked = False

    def clean_old_password(self):
        old_password = self.cleaned_data["old_password"]
        try:
            right = throttle.check_current_password(self.user, old_password, self.request, "web form")
        except throttle.PasswordCheckLocked as exc:
            self.locked = True
            raise forms.ValidationError(exc.message, code="locked") from None
        if not right:
            raise forms.ValidationError(self.error_messages["password_incorrect"], code="password_incorrect")
        return old_password
