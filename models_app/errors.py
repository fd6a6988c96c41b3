"""The one refusal: a request that is not carried out, with a reason code and its HTTP status. Raised by the
services, placement and load on demand alike; each edge turns it into an answer once (REST:
api/errors.py, web: the views' messages, the gateway: gateway/access.py in its dialect, the CLI: a
CommandError). Imports nothing of ours, so every layer may raise it."""

# The reason codes and their HTTP status. "busy" covers a GPU or object held by something else, a host down
# and no GPU with room for a model (the gateway answers that 503 with Retry-After, as its clients expect).
STATUS = {
    "invalid": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "busy": 409,
    "quota": 429,
    "load_failed": 503,
    "timeout": 503,
    "unavailable": 503,
}


class Refused(Exception):
    """`message` for people; `code` a key of STATUS (its HTTP status is `status`); `field` names the bad
    input; `retry_after` (seconds) where asking again later may help; `freeing`: what blocks the request is
    being unloaded (worth waiting for); `reason`: which rule decided, where one did (no_evictable_model,
    gpu_unavailable, the team policy's quota_*, reservation, pinned_no_room)."""

    def __init__(
        self,
        message: str,
        *,
        code: str = "invalid",
        field: str | None = None,
        retry_after: int | None = None,
        freeing: bool = False,
        reason: str = "",
    ):
        if code not in STATUS:
            raise ValueError(f"unknown refusal code {code!r}")
        super().__init__(message)
        self.message = message
        self.code = code
        self.field = field
        self.retry_after = retry_after
        self.freeing = freeing
        self.reason = reason

    @property
    def status(self) -> int:
        return STATUS[self.code]
