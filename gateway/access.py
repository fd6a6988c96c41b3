"""Who is asking, for which model, and which running instance answers. Mostly synchronous (the ORM): the
views call these on the gateway's database threads (db.py), one hop per request where they can, none where
the caches below already know the answer. Load on demand is `models_app.ondemand`'s, idle timers
and in-flight counts `models_app.keepalive`'s.

Two short per-process caches keep the database off the way to the first token:

- API tokens (GATEWAY_TOKEN_CACHE_SECONDS, default 5 s): a token that passed `accounts.tokens.check`, with its
  user and role, is believed for that long. So a revoked token, a deactivated user or a changed role takes
  effect within that time, not at once (an expiry date is checked on every request). `last_used_at` is
  written when the token is checked against the database (to the minute, as before).
- A model's running instances (GATEWAY_INSTANCE_CACHE_SECONDS, default 10 s). Never trusted blindly: a
  request is counted on an instance by one UPDATE that matches only while the row is still running with the
  port and key in the cache (`keepalive.request_started`), before anything is sent to it. No match drops the
  entry and the database is read again (or the model loads on demand): a stale entry never sends a request
  to a stopped or restarted instance. A failure to reach the instance drops the entry too. Registry changes
  to a model with a running instance (e.g. its anonymous use) reach the gateway within this time.

An entry in use is read again in the background once half its time has passed (refresh ahead), so steady
traffic does not wait for the database when an entry would have expired; the bound holds all the same (no
entry outlives its time after the database read that made it).
"""

import contextlib
import threading
import time
from dataclasses import dataclass

from django.conf import settings
from django.contrib.auth.models import AnonymousUser
from django.db import connections
from django.middleware.csrf import CsrfViewMiddleware
from django.utils import timezone

from accounts import tokens
from accounts.models import ApiToken, hash_token
from accounts.roles import can_read, role_of
from models_app import keepalive, ondemand
from models_app.errors import Refused
from models_app.models import GpuInstance, ModelConfig

from .db import submit
from .errors import GatewayError
from .model_facts import model_id_of

Status = GpuInstance.Status

TOKEN_REJECTED = {
    "unknown": "invalid API token",
    "revoked": "the API token is revoked",
    "expired": "the API token has expired",
    "inactive": "the token's user is inactive",
}


@dataclass
class Caller:
    user: object
    token: ApiToken | None = None

    @property
    def anonymous(self) -> bool:
        return not self.user.is_authenticated

    @property
    def user_id(self):
        return None if self.anonymous else self.user.pk


@dataclass
class Target:
    """A caller and the model they may use (None until it is looked up); whether the request's keep_alive
    was ignored (it would have shortened the timer of an instance the caller may not unload)."""

    caller: Caller
    model: ModelConfig | None
    keep_alive_ignored: bool = False


# --- authentication ---------------------------------------------------------------------------------------


class _CsrfCheck(CsrfViewMiddleware):
    def _reject(self, request, reason):
        return reason


class _Expiring:
    """A small map whose entries expire (monotonic clock), shared by the event loop and the database threads
    of one web worker. Bounded: when full, expired entries go, then everything. Past half its time an entry
    is due for a refresh: `get` says so to one caller, which re-reads it in the background, so that steady
    use finds it fresh without waiting for the database, and no entry is believed longer than its time after
    the read that made it."""

    def __init__(self, size: int = 4096):
        self.size = size
        self.entries: dict = {}  # key -> [expires, due, value, refreshing]
        self.lock = threading.Lock()

    def get(self, key) -> tuple[object, bool]:
        """(the value or None, whether the caller should refresh it now)."""
        entry = self.entries.get(key)
        if entry is None:
            return None, False
        now = time.monotonic()
        if entry[0] <= now:
            self.entries.pop(key, None)
            return None, False
        due = entry[1] <= now and not entry[3]
        if due:
            entry[3] = True
        return entry[2], due

    def put(self, key, value, seconds: float) -> None:
        if seconds <= 0:
            return
        now = time.monotonic()
        with self.lock:
            if len(self.entries) >= self.size:
                for stale in [k for k, entry in list(self.entries.items()) if entry[0] <= now]:
                    self.entries.pop(stale, None)
                if len(self.entries) >= self.size:
                    self.entries.clear()
            self.entries[key] = [now + seconds, now + seconds / 2, value, False]

    def drop(self, key) -> None:
        self.entries.pop(key, None)

    def clear(self) -> None:
        self.entries.clear()


# token hash -> ApiToken (its user loaded, the user's role read); model id -> running instances (their models
# and hosts loaded), least busy first when read.
_tokens = _Expiring()
_instances = _Expiring()


def clear_caches() -> None:
    _tokens.clear()
    _instances.clear()


def _bearer(request) -> str | None:
    """The token of the Authorization header; None without one; 401 for another kind of header."""
    header = request.META.get("HTTP_AUTHORIZATION", "")  # what request.headers reads, without building it
    if not header.strip():
        return None
    parts = header.split()
    if parts[0].lower() != "bearer" or len(parts) != 2:
        raise GatewayError(401, "the Authorization header must be 'Bearer <token>'", code="invalid_token")
    return parts[1]


def _cached_token(raw: str, key: str) -> ApiToken | None:
    token, due = _tokens.get(key)
    if token is not None and token.expires_at is not None and token.expires_at <= timezone.now():
        _tokens.drop(key)  # expired meanwhile: the database check says so
        return None
    if due:
        submit(_refresh_token, raw, key)
    return token


def _refresh_token(raw: str, key: str) -> None:
    with contextlib.suppress(tokens.TokenRejected):  # the entry is gone: the next request is refused
        _check_token(raw, key)


def _check_token(raw: str, key: str) -> ApiToken:
    """The database's check (TokenRejected, and the entry goes), the user's role read, the entry renewed."""
    try:
        token = tokens.check(raw)
    except tokens.TokenRejected:
        _tokens.drop(key)
        raise
    role_of(token.user)  # kept on the user object, and so in the cache
    _tokens.put(key, token, settings.GATEWAY_TOKEN_CACHE_SECONDS)
    return token


def cached_caller(request) -> Caller | None:
    """No database (the event loop may call it): the caller of an API token checked within the cache's time;
    None when the token is not in the cache, or when no token was sent (the session needs the database)."""
    raw = _bearer(request)
    token = _cached_token(raw, hash_token(raw)) if raw is not None else None
    return Caller(user=token.user, token=token) if token is not None else None


def authenticate(request) -> Caller:
    """`Authorization: Bearer lc_...` (checked like the REST API's tokens, then cached a few seconds: see the
    module's docstring) or the session. A bad token is 401 even where anonymous use would be allowed; a
    session must pass the CSRF check on writes, as in the REST API, since the gateway's views take no CSRF
    token of their own."""
    raw = _bearer(request)
    if raw is not None:
        key = hash_token(raw)
        token = _cached_token(raw, key)
        if token is None:
            try:
                token = _check_token(raw, key)
            except tokens.TokenRejected as exc:
                raise GatewayError(401, TOKEN_REJECTED[exc.reason], code="invalid_token") from None
        return Caller(user=token.user, token=token)
    user = getattr(request, "user", None) or AnonymousUser()
    if user.is_authenticated and request.method not in ("GET", "HEAD", "OPTIONS"):
        check = _CsrfCheck(lambda r: None)
        check.process_request(request)
        reason = check.process_view(request, None, (), {})
        if reason:
            raise GatewayError(403, f"CSRF check failed ({reason}): send an API token instead", code="csrf")
    return Caller(user=user if user.is_authenticated else AnonymousUser())


def may_list(caller: Caller) -> bool:
    return can_read(caller.user)


def listable_models(caller: Caller):
    """Every registered model for a role holder; for anyone else the models an admin opened to anonymous
    use (401 when there are none: a client without a token should learn it needs one)."""
    models = ModelConfig.objects.order_by("id")
    if can_read(caller.user):
        return models
    opened = models.filter(allow_anonymous=True)
    if not opened.exists():
        raise _unauthorized(caller)
    return opened


def _unauthorized(caller: Caller) -> GatewayError:
    if caller.anonymous:
        return GatewayError(
            401, "authentication required: send 'Authorization: Bearer <API token>'", code="unauthorized"
        )
    return GatewayError(403, "you need the viewer role (or higher) to use models", code="forbidden")


# --- the model and its instance ---------------------------------------------------------------------------


def find_model(caller: Caller, name, *, known: ModelConfig | None = None) -> ModelConfig:
    """The registry entry for `name` (with or without :latest) that the caller may use (`known`: already
    read, e.g. with its running instances)."""
    if not isinstance(name, str) or not name.strip():
        raise GatewayError(400, "model is required", code="missing_model")
    model = known or ModelConfig.objects.filter(pk=model_id_of(name.strip())).first()
    allowed = can_read(caller.user) or (model is not None and model.allow_anonymous)
    if not allowed:
        # Anonymous callers learn nothing about which models exist.
        raise _unauthorized(caller)
    if model is None:
        raise GatewayError(404, f"model '{name}' not found", code="model_not_found")
    return model


def running_instances(model_id: str) -> tuple[list[GpuInstance], bool]:
    """The model's running instances (each with its model and host read in the same query), the one with the
    fewest requests in flight first; and whether they came from the cache (`request_started` checks each
    against its row either way)."""
    cached = cached_instances(model_id)
    if cached is not None:
        return cached, True
    return _read_instances(model_id), False


def _read_instances(model_id: str) -> list[GpuInstance]:
    rows = list(
        GpuInstance.objects.filter(model_id=model_id, status=Status.RUNNING)
        .exclude(port=None)
        .select_related("model", "host")
        .order_by("in_flight", "-loaded_at")
    )
    if rows:
        _instances.put(model_id, rows, settings.GATEWAY_INSTANCE_CACHE_SECONDS)
    else:  # none: the slow path loads or waits, and the next request looks again
        _instances.drop(model_id)
    return rows


def cached_instances(model_id: str) -> list[GpuInstance] | None:
    """No database: the model's running instances as the cache has them (None: not cached)."""
    cached, due = _instances.get(model_id)
    if due:
        submit(_read_instances, model_id)
    return list(cached) if cached is not None else None


def forget_instances(model_id: str) -> None:
    """The cached instances of the model are out of date (a count did not match, an instance could not be
    reached): the next request reads the database."""
    _instances.drop(model_id)


def start_request(
    target: Target, model_id: str, instances: list[GpuInstance], cached: bool, keep_alive: int | None
) -> GpuInstance | None:
    """Count the request on the first of `instances` that still runs as read; when they came from the cache
    and none does, read the database once more. None: no running instance (load on demand, or wait)."""
    for instance in instances:
        if request_started(target, instance, keep_alive):
            return instance
    forget_instances(model_id)
    if cached:
        return start_request(target, model_id, running_instances(model_id)[0], False, keep_alive)
    return None


def resolve(request, name) -> Target:
    """Who asks, and the model they may use."""
    caller = authenticate(request)
    return Target(caller=caller, model=find_model(caller, name))


def ensure_running(target: Target) -> GpuInstance:
    """Slow path (a worker thread, not the shared one): load on demand and wait, or wait for a load under
    way (models_app.ondemand). Its refusals become the gateway's answers. The request's keep_alive is kept
    when the request is counted on the instance (`request_started`)."""
    try:
        instance = ondemand.ensure_running(target.model, target.caller.user)
        # Read here what the event loop reads later (upstream.base_url, slots): a wait for the load refreshed
        # the row, which drops its related objects, and the event loop may not query.
        instance.host, instance.model  # noqa: B018
        return instance
    except Refused as exc:
        raise _refusal(exc) from None
    finally:
        connections.close_all()  # a pool thread that may not run Django code again soon


# A refusal's answer here, by its code: (HTTP status, OpenAI's `code`). Ollama and OpenAI clients retry a
# 503, so no GPU with room (busy: 409 in the REST API) is a 503 with Retry-After; the words in `code` are
# those the gateway has always sent.
GATEWAY_ANSWERS = {
    "unauthorized": (401, "unauthorized"),
    "forbidden": (403, "forbidden"),
    "busy": (503, "nocapacity"),
    "load_failed": (503, "loadfailed"),
    "unavailable": (503, "loadfailed"),
    "timeout": (503, "timeout"),
}


def _refusal(exc: Refused) -> GatewayError:
    """The gateway's one translation of a refusal from load on demand or unload."""
    status, code = GATEWAY_ANSWERS.get(exc.code, (exc.status, exc.code))
    return GatewayError(status, exc.message, code=code, retry_after=exc.retry_after)


def request_started(target: Target, instance: GpuInstance, keep_alive: int | None) -> bool:
    """False when the instance stopped running meanwhile (an idle unload won the race) or is no longer the
    start that `instance` describes (restarted, on another port with another key). The request's keep_alive
    shortens the instance's idle timer only if the caller may unload it (`keepalive.apply_keep_alive`)."""
    counted, ignored = keepalive.request_started_by(instance, target.caller.user, keep_alive)
    target.keep_alive_ignored = target.keep_alive_ignored or ignored
    return counted


def request_finished(instance_id: int) -> None:
    keepalive.request_finished(instance_id)


def expires_at(instance: GpuInstance):
    return keepalive.expires_at(instance)


def unload(caller: Caller, model: ModelConfig) -> None:
    """keep_alive 0 with an empty prompt: unload the model now, by the rules of an unload (operators their
    own instances, admins any)."""
    try:
        ondemand.unload_now(model, caller.user)
    except Refused as exc:
        raise _refusal(exc) from None
