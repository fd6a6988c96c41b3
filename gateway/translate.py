"""Ollama <-> llama-server's OpenAI-compatible API: requests, keep_alive, stream chunks, timings. Plain
functions on dicts (no Django, no I/O), so every shape is unit-tested. (Model names and the listings' model
facts: model_facts.py.)"""

import json
import math
import re
from datetime import UTC, datetime

# What /api/version answers: Open WebUI and others parse it as dotted integers and gate features on it.
OLLAMA_VERSION = "0.12.0"

# Ollama `options` that llama-server's OpenAI routes take under the same or another name.
_OPTION_NAMES = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "typical_p": "typical_p",
    "seed": "seed",
    "stop": "stop",
    "num_predict": "max_tokens",
    "repeat_penalty": "repeat_penalty",
    "repeat_last_n": "repeat_last_n",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "mirostat": "mirostat",
    "mirostat_tau": "mirostat_tau",
    "mirostat_eta": "mirostat_eta",
    "num_keep": "n_keep",
}


class BadRequest(ValueError):
    """The request's JSON has a field of the wrong shape (HTTP 400)."""


# --- keep_alive -----------------------------------------------------------------------------------------

# Ollama's rules: a number of seconds, or a Go duration ("5m", "1h30m", "-1s"; here also seconds as text).
# ASCII digits only (Python's float() also reads "1_000", "inf", "nan" and other scripts' digits).
_SECONDS_TEXT = re.compile(r"[-+]?[0-9]+(?:\.[0-9]+)?")
_DURATION = re.compile(r"[-+]?(?:[0-9]+(?:\.[0-9]+)?(?:ns|us|µs|ms|s|m|h))+")
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
FOREVER = -1  # a negative keep_alive: as long as the admin's limit allows
_LONGEST = 10**9  # seconds; models_app.keepalive clamps further, to the admin's limit
_KEEP_ALIVE_SHAPE = 'keep_alive must be a duration such as "5m" or a number of seconds'


def keep_alive_seconds(value) -> int | None:
    """Ollama's keep_alive (seconds as a number, or a Go duration "5m", "1h30m", "-1") in whole seconds;
    None when absent; FOREVER (-1) when negative; at most 10**9. BadRequest for anything else (inf, nan,
    1e999: Go's JSON refuses them too). models_app.keepalive clamps it to the admin's limit."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise BadRequest(_KEEP_ALIVE_SHAPE)
    if isinstance(value, int):  # exact, however long (float() of a 400-digit integer overflows)
        return FOREVER if value < 0 else min(value, _LONGEST)
    if isinstance(value, float):
        seconds = value
    elif isinstance(value, str):
        text = value.strip()
        if _SECONDS_TEXT.fullmatch(text):
            seconds = float(text)
        elif _DURATION.fullmatch(text):
            seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(text))
            if text.startswith("-"):
                seconds = -seconds
        else:
            raise BadRequest(f'keep_alive {value[:50]!r} is not a duration such as "5m"')
    else:
        raise BadRequest(_KEEP_ALIVE_SHAPE)
    if not math.isfinite(seconds):
        raise BadRequest("keep_alive must be a finite duration or number of seconds")
    if seconds < 0:
        return FOREVER
    return min(math.ceil(seconds), _LONGEST)


# --- requests -------------------------------------------------------------------------------------------


def _options(body: dict) -> dict:
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise BadRequest("options must be an object")
    out = {}
    for name, value in options.items():
        target = _OPTION_NAMES.get(name)
        if target is None:
            continue  # num_ctx, num_gpu, ...: the instance's own settings decide
        if target == "max_tokens" and isinstance(value, int) and value < 0:
            continue  # -1: until the context is full (llama-server's default)
        out[target] = value
    return out


def _format(body: dict) -> dict:
    fmt = body.get("format")
    if fmt in (None, ""):
        return {}
    if fmt == "json":
        return {"response_format": {"type": "json_object"}}
    if isinstance(fmt, dict):
        return {"response_format": {"type": "json_schema", "json_schema": {"name": "format", "schema": fmt}}}
    raise BadRequest('format must be "json" or a JSON schema')


def _think(body: dict) -> dict:
    think = body.get("think")
    if think is None:
        return {}
    return {"chat_template_kwargs": {"enable_thinking": bool(think)}}


def _message(message) -> dict:
    if not isinstance(message, dict):
        raise BadRequest("each message must be an object with role and content")
    role = message.get("role")
    if not isinstance(role, str) or not role:
        raise BadRequest("each message needs a role")
    content = message.get("content") or ""
    if not isinstance(content, str):
        raise BadRequest("a message's content must be a string")
    out: dict = {"role": role, "content": content}
    images = message.get("images") or []
    if images:
        if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
            raise BadRequest("images must be a list of base64 strings")
        out["content"] = [{"type": "text", "text": content}] + [
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}} for image in images
        ]
    calls = message.get("tool_calls")
    if calls:
        if not isinstance(calls, list):  # `"tool_calls": 1` was a 500 (found by the gateway's fuzz test)
            raise BadRequest("a message's tool_calls must be a list")
        out["tool_calls"] = [_tool_call(n, call) for n, call in enumerate(calls) if isinstance(call, dict)]
    if role == "tool" and message.get("tool_name"):
        out["name"] = message["tool_name"]
    return out


def _tool_call(n: int, call: dict) -> dict:
    function = call.get("function") or {}
    if not isinstance(function, dict):
        raise BadRequest("a tool call's function must be an object with name and arguments")
    return {
        "id": call.get("id") or f"call_{n}",
        "type": "function",
        "function": {
            "name": function.get("name", ""),
            "arguments": json.dumps(function.get("arguments") or {}),
        },
    }


def chat_request(body: dict) -> dict:
    """/api/chat -> llama-server's /v1/chat/completions, always streamed (a non-stream answer is assembled
    from the stream, so both share one translation)."""
    messages = body.get("messages") or []
    if not isinstance(messages, list):
        raise BadRequest("messages must be a list")
    out = {"model": body["model"], "messages": [_message(m) for m in messages], "stream": True}
    if body.get("tools"):
        if not isinstance(body["tools"], list):
            raise BadRequest("tools must be a list")
        out["tools"] = body["tools"]
    out.update(_options(body), **_format(body), **_think(body))
    return out


def generate_request(body: dict) -> tuple[str, dict]:
    """/api/generate -> (route, body): the prompt as a user message through the model's chat template, or
    with `raw` the prompt as it is to /v1/completions."""
    prompt = body.get("prompt") or ""
    system = body.get("system") or ""
    if not isinstance(prompt, str) or not isinstance(system, str):
        raise BadRequest("prompt and system must be strings")
    extra = {**_options(body), **_format(body)}
    if body.get("raw"):
        return "/v1/completions", {"model": body["model"], "prompt": prompt, "stream": True, **extra}
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]
    images = body.get("images")
    if images:
        messages[-1] = _message({"role": "user", "content": prompt, "images": images})
    out = {"model": body["model"], "messages": messages, "stream": True, **extra, **_think(body)}
    return "/v1/chat/completions", out


def embed_inputs(body: dict, field: str = "input") -> list[str]:
    value = body.get(field)
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    raise BadRequest(f"{field} must be a string or a non-empty list of strings")


def truncate_embedding(vector: list[float], dimensions) -> list[float]:
    """Ollama's `dimensions`: keep the first n values, normalised again."""
    if dimensions in (None, 0):
        return vector
    if not isinstance(dimensions, int) or isinstance(dimensions, bool) or dimensions < 0:
        raise BadRequest("dimensions must be a positive integer")
    cut = vector[:dimensions]
    norm = math.sqrt(sum(v * v for v in cut))
    return [v / norm for v in cut] if norm else cut


# --- answers --------------------------------------------------------------------------------------------


def now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def timing_fields(timings: dict | None, usage: dict | None, *, total_ns: int, load_ns: int) -> dict:
    """The final chunk's counts and nanosecond durations, from llama-server's `timings` (Ollama's own
    mapping: prompt_eval_count = cache_n + prompt_n), else from OpenAI `usage`."""
    fields = {"total_duration": int(total_ns), "load_duration": int(load_ns)}
    if timings:
        fields["prompt_eval_count"] = int(timings.get("cache_n") or 0) + int(timings.get("prompt_n") or 0)
        fields["prompt_eval_duration"] = int(float(timings.get("prompt_ms") or 0) * 1e6)
        fields["eval_count"] = int(timings.get("predicted_n") or 0)
        fields["eval_duration"] = int(float(timings.get("predicted_ms") or 0) * 1e6)
    elif usage:
        fields["prompt_eval_count"] = int(usage.get("prompt_tokens") or 0)
        fields["prompt_eval_duration"] = 0
        fields["eval_count"] = int(usage.get("completion_tokens") or 0)
        fields["eval_duration"] = 0
    return fields


def done_reason(finish_reason: str | None) -> str:
    return "length" if finish_reason == "length" else "stop"


class StreamState:
    """Reads llama-server's OpenAI stream (one decoded `data:` JSON at a time) and yields Ollama chunks.
    Tool-call fragments are collected and sent whole, as Ollama does."""

    def __init__(self, model_name: str, kind: str):
        self.model_name = model_name
        self.kind = kind  # "chat" or "generate"
        self.finish_reason: str | None = None
        self.timings: dict | None = None
        self.usage: dict | None = None
        self.tool_calls: dict[int, dict] = {}
        self.first_token_seen = False

    def _chunk(self, **fields) -> dict:
        return {"model": self.model_name, "created_at": now_iso(), **fields}

    def _message(self, content: str = "", thinking: str = "", tool_calls=None) -> dict:
        message = {"role": "assistant", "content": content}
        if thinking:
            message["thinking"] = thinking
        if tool_calls:
            message["tool_calls"] = tool_calls
        return message

    def feed(self, event: dict) -> list[dict]:
        """Ollama chunks for one upstream event (often one, sometimes none)."""
        if event.get("timings"):
            self.timings = event["timings"]
        if event.get("usage"):
            self.usage = event["usage"]
        out = []
        for choice in event.get("choices") or []:
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
            if self.kind == "generate" and "text" in choice:
                text = choice.get("text") or ""
                if text:
                    self.first_token_seen = True
                    out.append(self._chunk(response=text, done=False))
                continue
            delta = choice.get("delta") or choice.get("message") or {}
            content = delta.get("content") or ""
            thinking = delta.get("reasoning_content") or ""
            for call in delta.get("tool_calls") or []:
                self._collect_tool_call(call)
            if content or thinking:
                self.first_token_seen = True
                if self.kind == "chat":
                    out.append(self._chunk(message=self._message(content, thinking), done=False))
                else:
                    chunk = self._chunk(response=content, done=False)
                    if thinking:
                        chunk["thinking"] = thinking
                    out.append(chunk)
        return out

    def _collect_tool_call(self, call: dict) -> None:
        index = call.get("index", len(self.tool_calls))
        slot = self.tool_calls.setdefault(index, {"name": "", "arguments": ""})
        function = call.get("function") or {}
        slot["name"] += function.get("name") or ""
        slot["arguments"] += function.get("arguments") or ""

    def _tool_calls(self) -> list[dict]:
        calls = []
        for index in sorted(self.tool_calls):
            slot = self.tool_calls[index]
            try:
                arguments = json.loads(slot["arguments"]) if slot["arguments"] else {}
            except json.JSONDecodeError:
                arguments = {"_raw": slot["arguments"]}
            calls.append({"function": {"index": index, "name": slot["name"], "arguments": arguments}})
        return calls

    def final(self, *, total_ns: int, load_ns: int) -> list[dict]:
        """The closing chunks: collected tool calls (if any), then the `done` chunk with the figures."""
        out = []
        if self.tool_calls and self.kind == "chat":
            out.append(self._chunk(message=self._message(tool_calls=self._tool_calls()), done=False))
        done = self._chunk(done=True, done_reason=done_reason(self.finish_reason))
        if self.kind == "chat":
            done["message"] = self._message()
        else:
            done["response"] = ""
        done.update(timing_fields(self.timings, self.usage, total_ns=total_ns, load_ns=load_ns))
        return out + [done]

    @property
    def prompt_tokens(self) -> int | None:
        if self.timings:
            return int(self.timings.get("cache_n") or 0) + int(self.timings.get("prompt_n") or 0)
        return (self.usage or {}).get("prompt_tokens")

    @property
    def completion_tokens(self) -> int | None:
        if self.timings:
            return int(self.timings.get("predicted_n") or 0)
        return (self.usage or {}).get("completion_tokens")


def merge_chunks(chunks: list[dict], kind: str) -> dict:
    """A `stream: false` answer: the final chunk carrying the whole text (and thinking, tool calls)."""
    final = dict(chunks[-1])
    if kind == "chat":
        content = "".join(c.get("message", {}).get("content", "") for c in chunks)
        thinking = "".join(c.get("message", {}).get("thinking", "") for c in chunks)
        calls = [call for c in chunks for call in c.get("message", {}).get("tool_calls", [])]
        message = {"role": "assistant", "content": content}
        if thinking:
            message["thinking"] = thinking
        if calls:
            message["tool_calls"] = calls
        final["message"] = message
    else:
        final["response"] = "".join(c.get("response", "") for c in chunks)
        thinking = "".join(c.get("thinking", "") for c in chunks)
        if thinking:
            final["thinking"] = thinking
    return final
