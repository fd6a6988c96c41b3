from django import forms

from llamacontroller_site.query import AsciiIntegerField


class TokenCreateForm(forms.Form):
    name = forms.CharField(max_length=100)
    expires_in_days = AsciiIntegerField(
        min_value=1, max_value=3650, required=False, help_text="Empty: the token does not expire."
    )
