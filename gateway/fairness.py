"""Per-user rate limits of the gateway: requests and tokens (prompt + completion) per minute, each off at 0.

Counted per web worker, in fixed one-minute windows that open with a user's first request: a shared store
would cost a round-trip per request, so with N web workers a user may reach up to N times the limit. A
request over a limit is refused with 429 naming the limit and, in Retry-After, the seconds until its window
ends. Tokens are known only when a request ends: they count from then on, so the request that crosses the
token limit is answered and the next ones are refused until the window ends."""

import math
import time
from dataclasses import dataclass

from django.conf import settings

from .errors import GatewayError

WINDOW_SECONDS = 60.0
# Past this many users' windows, the ended ones are forgotten (a plain dict, cleaned as it grows).
_REMEMBERED_USERS = 10000


@dataclass
class Window:
    opened: float
    requests: int = 0
    tokens: int = 0


_windows: dict[str, Window] = {}


def user_key(caller) -> str:
    """Whom the limits count: the user (a token counts for its owner), or "anonymous" for everyone unnamed."""
    return "anonymous" if caller is None or caller.anonymous else f"user:{caller.user.pk}"


def _window(user: str, now: float) -> Window:
    window = _windows.get(user)
    if window is None or now - window.opened >= WINDOW_SECONDS:
        if len(_windows) >= _REMEMBERED_USERS:
            for name in [name for name, held in _windows.items() if now - held.opened >= WINDOW_SECONDS]:
                del _windows[name]
        window = _windows[user] = Window(opened=now)
    return window


def admit(user: str, now: float | None = None) -> None:
    """Count one request of `user`, or raise the 429 of the limit it would pass."""
    requests_limit = settings.GATEWAY_USER_REQUESTS_PER_MINUTE
    tokens_limit = settings.GATEWAY_USER_TOKENS_PER_MINUTE
    if not requests_limit and not tokens_limit:
        return
    now = time.monotonic() if now is None else now
    window = _window(user, now)
    if requests_limit and window.requests >= requests_limit:
        _refuse(f"{requests_limit} requests per minute", "requests_per_minute", window, now)
    if tokens_limit and window.tokens >= tokens_limit:
        _refuse(f"{tokens_limit} tokens per minute", "tokens_per_minute", window, now)
    window.requests += 1


def spend(user: str, tokens: int, now: float | None = None) -> None:
    """Count the tokens of a request that ended (nothing when the token limit is off)."""
    if not settings.GATEWAY_USER_TOKENS_PER_MINUTE or tokens <= 0:
        return
    _window(user, time.monotonic() if now is None else now).tokens += tokens


def _refuse(limit: str, reason: str, window: Window, now: float) -> None:
    resets = max(1, math.ceil(window.opened + WINDOW_SECONDS - now))
    raise GatewayError(
        429,
        f"rate limit reached: {limit} for each user; it resets in {resets}s",
        code="rate_limit_exceeded",
        retry_after=resets,
        throttled=reason,
    )


def reset() -> None:
    """Forget every window (tests)."""
    _windows.clear()
