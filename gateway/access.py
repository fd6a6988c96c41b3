"""Who is asking, for which model, and which running instance answers. Synchronous (the ORM); the views
call these on the gateway's database threads (db.py), one hop per request where they can.
Load on demand, idle timers and in-flight counts are `models_app.ondemand`'s."""

from dataclasses import dataclass

from django.contrib.auth.models import AnonymousUser
from django.db import connections
from django.middleware.csrf import CsrfViewMiddleware

from accounts import tokens
from accounts.models import ApiToken
from accounts.roles import can_read
from models_app import ondemand
from models_app.models import GpuInstance, ModelConfig

from .errors import GatewayError
from .translate import model_id_of

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
    """A caller and the model they may use (None until it is looked up)."""

    caller: Caller
    model: ModelConfig | None


# --- authentication ---------------------------------------------------------------------------------------


class _CsrfCheck(CsrfViewMiddleware):
    def _reject(self, request, reason):
        return reason


def authenticate(request) -> Caller:
    """`Authorization: Bearer lc_...` (checked like the REST API's tokens) or the session. A bad token is
    401 even where anonymous use would be allowed; a session must pass the CSRF check on writes, as in the
    REST API, since the gateway's views take no CSRF token of their own."""
    header = request.headers.get("Authorization", "")
    if header.strip():
        parts = header.split()
        if parts[0].lower() != "bearer" or len(parts) != 2:
            raise GatewayError(401, "the Authorization header must be 'Bearer <token>'", code="invalid_token")
        try:
            token = tokens.check(parts[1])
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


def running_instances(model_id: str) -> list[GpuInstance]:
    """The model's running instances (each with its model read in the same query), the one with the fewest
    requests in flight first."""
    return list(
        GpuInstance.objects.filter(model_id=model_id, status=Status.RUNNING)
        .exclude(port=None)
        .select_related("model")
        .order_by("in_flight", "-loaded_at")
    )


def resolve(request, name) -> Target:
    """Who asks, and the model they may use."""
    caller = authenticate(request)
    return Target(caller=caller, model=find_model(caller, name))


def ensure_running(target: Target, keep_alive: int | None) -> GpuInstance:
    """Slow path (a worker thread, not the shared one): load on demand and wait, or wait for a load under
    way (models_app.ondemand). Its refusals become the gateway's answers."""
    try:
        return ondemand.ensure_running(target.model, target.caller.user, keep_alive_seconds=keep_alive)
    except ondemand.GatewayRefusal as exc:
        raise _refusal(exc) from None
    finally:
        connections.close_all()  # a pool thread that may not run Django code again soon


def _refusal(exc) -> GatewayError:
    code = {401: "unauthorized", 403: "forbidden"}.get(exc.status, exc.__class__.__name__.lower())
    return GatewayError(exc.status, exc.message, code=code, retry_after=exc.retry_after)


def request_started(instance: GpuInstance, keep_alive: int | None) -> bool:
    """False when the instance stopped running meanwhile (an idle unload won the race)."""
    return ondemand.request_started(instance.pk, keep_alive_seconds=keep_alive)


def request_finished(instance_id: int) -> None:
    ondemand.request_finished(instance_id)


def expires_at(instance: GpuInstance):
    return ondemand.expires_at(instance)


def unload(caller: Caller, model: ModelConfig) -> None:
    """keep_alive 0 with an empty prompt: unload the model now, by the rules of an unload (operators their
    own instances, admins any)."""
    try:
        ondemand.unload_now(model, caller.user)
    except ondemand.GatewayRefusal as exc:
        raise _refusal(exc) from None
