"""The gateway's routes in the API schema (/api/schema/) and its docs page (/api/docs/): drf-spectacular documents
DRF views only, and the gateway's views are plain async Django views (gateway/views_*.py), so this postprocessing
hook (SPECTACULAR_SETTINGS["POSTPROCESSING_HOOKS"]) adds them, in two tags: the Ollama shape and the OpenAI shape.
The bodies are described by their main fields, as the gateway reads them; everything else is passed on to
llama-server. Authentication: an API token (`Authorization: Bearer lc_…`) or the session with its CSRF header."""

OLLAMA, OPENAI = "Gateway: Ollama API", "Gateway: OpenAI API"
STREAM_NOTE = (
    "Streamed by default (`stream: true`): newline-delimited JSON objects, the last with `done: true`."
)
SSE_NOTE = "With `stream: true`: server-sent events (`data: {…}` lines, then `data: [DONE]`)."


def _obj(properties: dict, required: list[str] | None = None, extra: bool = True) -> dict:
    schema = {"type": "object", "properties": properties, "additionalProperties": extra}
    if required:
        schema["required"] = required
    return schema


STRING, BOOL, INT = {"type": "string"}, {"type": "boolean"}, {"type": "integer"}
ANY_OBJECT = {"type": "object", "additionalProperties": True}
MESSAGES = {
    "type": "array",
    "items": _obj(
        {"role": {"type": "string", "enum": ["system", "user", "assistant", "tool"]}, "content": STRING}
    ),
}
KEEP_ALIVE = {
    "description": 'How long the model stays loaded after this request: "5m", seconds, 0 to unload, -1 forever.',
    "oneOf": [STRING, {"type": "number"}],
}
ERRORS = {
    "400": "Bad body (not JSON, a missing model or prompt).",
    "401": "No or a bad API token.",
    "403": "Your role may not use this model.",
    "404": "No such model.",
    "409": "The model cannot be loaded now (no GPU fits, the host is down).",
    "503": "The model is starting or the service is unavailable; `Retry-After` says when to try again.",
}
ERROR_BODY = _obj({"error": {"oneOf": [STRING, ANY_OBJECT]}})


def _operation(tag: str, summary: str, body: dict | None, answer: dict, *, stream: str = "") -> dict:
    operation = {
        "tags": [tag],
        "summary": summary,
        "operationId": "gateway_" + summary.lower().replace(" ", "_").replace(",", "").replace("'", ""),
        "security": [{"bearerAuth": []}, {"cookieAuth": []}, {}],
        "responses": {
            "200": {
                "description": stream or "The answer.",
                "content": {"application/json": {"schema": answer}},
            },
            **{
                code: {"description": text, "content": {"application/json": {"schema": ERROR_BODY}}}
                for code, text in ERRORS.items()
            },
        },  # fmt: skip
    }
    if stream:
        operation["description"] = stream
    if body is not None:
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    return operation


def _routes() -> dict[str, dict]:
    chat_body = _obj(
        {
            "model": STRING,
            "messages": MESSAGES,
            "stream": BOOL,
            "options": ANY_OBJECT,
            "keep_alive": KEEP_ALIVE,
        },
        ["model"],
    )
    generate_body = _obj(
        {"model": STRING, "prompt": STRING, "stream": BOOL, "options": ANY_OBJECT, "keep_alive": KEEP_ALIVE},
        ["model"],
    )
    embed_body = _obj(
        {"model": STRING, "input": {"oneOf": [STRING, {"type": "array", "items": STRING}]}}, ["model"]
    )
    openai_chat = _obj(
        {
            "model": STRING,
            "messages": MESSAGES,
            "stream": BOOL,
            "max_tokens": INT,
            "temperature": {"type": "number"},
        },
        ["model", "messages"],
    )
    openai_completion = _obj(
        {"model": STRING, "prompt": STRING, "stream": BOOL, "max_tokens": INT}, ["model"]
    )
    return {
        "/api/version": {"get": _operation(OLLAMA, "Ollama version", None, _obj({"version": STRING}))},
        "/api/tags": {"get": _operation(OLLAMA, "Ollama models", None, _obj({"models": {"type": "array"}}))},
        "/api/ps": {
            "get": _operation(OLLAMA, "Ollama running models", None, _obj({"models": {"type": "array"}}))
        },
        "/api/show": {
            "post": _operation(OLLAMA, "Ollama show a model", _obj({"model": STRING}, ["model"]), ANY_OBJECT)
        },
        "/api/chat": {"post": _operation(OLLAMA, "Ollama chat", chat_body, ANY_OBJECT, stream=STREAM_NOTE)},
        "/api/generate": {
            "post": _operation(OLLAMA, "Ollama generate", generate_body, ANY_OBJECT, stream=STREAM_NOTE)
        },
        "/api/embed": {"post": _operation(OLLAMA, "Ollama embed", embed_body, ANY_OBJECT)},
        "/api/embeddings": {
            "post": _operation(
                OLLAMA,
                "Ollama embeddings (legacy)",
                _obj({"model": STRING, "prompt": STRING}, ["model"]),
                ANY_OBJECT,
            )
        },
        "/v1/models": {"get": _operation(OPENAI, "OpenAI models", None, _obj({"data": {"type": "array"}}))},
        "/v1/chat/completions": {
            "post": _operation(OPENAI, "OpenAI chat completions", openai_chat, ANY_OBJECT, stream=SSE_NOTE)
        },
        "/v1/completions": {
            "post": _operation(OPENAI, "OpenAI completions", openai_completion, ANY_OBJECT, stream=SSE_NOTE)
        },
        "/v1/embeddings": {"post": _operation(OPENAI, "OpenAI embeddings", embed_body, ANY_OBJECT)},
    }


def add_gateway_routes(result, generator, request, public):
    """drf-spectacular postprocessing hook: the gateway's routes, their tags and the session's cookie scheme."""
    result.setdefault("paths", {}).update(_routes())
    result.setdefault("tags", [])
    result["tags"] += [
        {
            "name": OLLAMA,
            "description": "Ollama-compatible routes (`ollama` clients: set the host to this server).",
        },
        {
            "name": OPENAI,
            "description": "OpenAI-compatible routes (`openai` clients: base_url = this server + /v1).",
        },
    ]
    schemes = result.setdefault("components", {}).setdefault("securitySchemes", {})
    schemes.setdefault("cookieAuth", {"type": "apiKey", "in": "cookie", "name": "sessionid"})
    return result
