"""Environment helpers that fail loudly: a bad value is an error naming the variable, never a default."""

import os

from django.core.exceptions import ImproperlyConfigured

TRUE_WORDS = {"1", "true", "on"}
FALSE_WORDS = {"0", "false", "off"}


def envstr(name: str, default: str) -> str:
    return os.environ.get(name, default)


def envbool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    word = raw.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ImproperlyConfigured(f"{name}={raw!r} is not a boolean: use one of 1/0, true/false, on/off")


def envint(name: str, default: int, *, minimum: int | None = None, maximum: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r} is not an integer") from None
    if minimum is not None and value < minimum:
        raise ImproperlyConfigured(f"{name}={value} is below the minimum of {minimum}")
    if maximum is not None and value > maximum:
        raise ImproperlyConfigured(f"{name}={value} is above the maximum of {maximum}")
    return value


def envlist(name: str, default: list[str], *, separator: str = ",") -> list[str]:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    return [item.strip() for item in raw.split(separator) if item.strip()]


def envchoice(name: str, default: str, choices: list[str]) -> str:
    value = os.environ.get(name) or default
    if value not in choices:
        raise ImproperlyConfigured(f"{name}={value!r} is not one of {', '.join(choices)}")
    return value


def envrange(name: str, default: tuple[int, int]) -> tuple[int, int]:
    """A port range written "8081-8180"."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    parts = raw.strip().split("-")
    try:
        low, high = (int(p) for p in parts)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r} is not a port range like 8081-8180") from None
    if not (1024 <= low <= high <= 65535):
        raise ImproperlyConfigured(f"{name}={raw!r}: need 1024 <= first port <= last port <= 65535")
    return low, high
