"""Checks for what a request sends (query parameters, form fields, a gateway request's model name), shared by
the REST API, the web pages and the gateway, so that a value the database cannot take or a number written
with other digits is a 400 or a form error, never a 500:

- text the database cannot store: NUL characters (PostgreSQL refuses them in text; `?user=a%00b` was a 500
  there while SQLite answered 200) and lone surrogates (`"\\ud800"` in JSON is not UTF-8: no database takes
  it, a 500 on both);
- whole numbers in ASCII digits only: Python's `int()` also reads other scripts' digits (`int("١٠٠")` is 100)
  and `"²".isdigit()` is true although `int("²")` raises.

llamacontroller_site.input_guard refuses NUL in any query parameter or form field before a view runs; the
functions here are for the views, which know which parameter is a number."""

import re

from django import forms
from rest_framework.exceptions import ValidationError

_WHOLE_NUMBER = re.compile(r"[0-9]+", re.ASCII)
_SIGNED_WHOLE_NUMBER = re.compile(r"\s*[-+]?[0-9]+\s*", re.ASCII)
NUL_MESSAGE = "must not contain NUL characters"


class BadParameter(ValueError):
    """A query parameter or form field that cannot be used; `name` says which."""

    def __init__(self, name: str, message: str):
        super().__init__(f"{name}: {message}")
        self.name = name
        self.message = message


def unstorable(text: str) -> str:
    """Why the database cannot store `text`, or "" when it can."""
    if "\x00" in text:
        return NUL_MESSAGE
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:
            return "must be valid Unicode (it contains a lone surrogate)"
    return ""


def whole_number(text: str, name: str, low: int, high: int) -> int:
    """`text` as a whole number from `low` to `high`, in ASCII digits; BadParameter naming `name` otherwise.
    The length is checked first: int() refuses strings of more than 4300 digits."""
    if len(text) > len(str(high)) or not _WHOLE_NUMBER.fullmatch(text) or not low <= int(text) <= high:
        raise BadParameter(name, f"must be a whole number from {low} to {high}")
    return int(text)


class AsciiIntegerField(forms.IntegerField):
    """A form's IntegerField that reads ASCII digits only (Django's reads "١٠" as 10)."""

    def to_python(self, value):
        if value not in self.empty_values and not _SIGNED_WHOLE_NUMBER.fullmatch(str(value)):
            raise forms.ValidationError(self.error_messages["invalid"], code="invalid")
        return super().to_python(value)


class RefuseNulCharacters:
    """A DRF filter backend, the default for every API view: query parameters with NUL characters answer 400
    naming the parameter (input_guard's check, in the API's shape, where a view runs without the site's
    middleware)."""

    def filter_queryset(self, request, queryset, view):
        bad = sorted({name for name, value in request.query_params.items() if "\x00" in name + value})
        if bad:
            raise ValidationError({name: [NUL_MESSAGE] for name in bad})
        return queryset

    def get_schema_operation_parameters(self, view):
        return []
