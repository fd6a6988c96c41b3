"""The gateway's refusals, shaped for the client that asked: Ollama's `{"error": "..."}` or OpenAI's
`{"error": {"message", "type", "code"}}`."""

import json

from django.http import HttpResponse

from utilities.query import unstorable

OLLAMA = "ollama"
OPENAI = "openai"

# OpenAI's error types per status (what its clients expect to read).
_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",
    503: "unavailable_error",
    504: "timeout_error",
}


class GatewayError(Exception):
    """A request the gateway answers with an error. `code` is a short word for OpenAI's `code` field;
    `throttled` says why a request was held back by fair use (recorded with its usage), "" otherwise."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str = "",
        retry_after: int | None = None,
        throttled: str = "",
    ):
        super().__init__(message)
        self.throttled = throttled
        self.status = status
        self.message = message
        self.code = code or _OPENAI_TYPES.get(status, "error")
        self.retry_after = retry_after


def model_name_problem(name) -> GatewayError | None:
    """The 400 for a model name that is no name (missing, empty, not a string) or that the database cannot
    take (a NUL character: PostgreSQL refuses it; a lone surrogate: not UTF-8), or None. Every model name a
    client sends is checked with this before it is looked up or recorded; the message never repeats it."""
    if not isinstance(name, str) or not name.strip():
        return GatewayError(400, "model is required", code="missing_model")
    problem = unstorable(name)
    if problem:
        return GatewayError(400, f"model {problem}", code="invalid_model")
    return None


def ollama_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def openai_body(status: int, message: str, code: str = "") -> bytes:
    kind = _OPENAI_TYPES.get(status, "error")
    return json.dumps({"error": {"message": message, "type": kind, "code": code or kind}}).encode()


def error_response(dialect: str, error: GatewayError) -> HttpResponse:
    if dialect == OPENAI:
        body = openai_body(error.status, error.message, error.code)
    else:
        body = ollama_body(error.message)
    response = HttpResponse(body, status=error.status, content_type="application/json")
    if error.retry_after is not None:
        response["Retry-After"] = str(error.retry_after)
    if error.status == 401:
        response["WWW-Authenticate"] = "Bearer"
    return response
