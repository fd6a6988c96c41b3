"""The policy's reason codes, their HTTP status, and the refusal that carries one with its sentence.

A PolicyRefusal is the project's one refusal type (models_app/errors.py `Refused`), its code the one with the
reason's status ("quota" → 429, "busy" → 409, "unavailable" → 503): every edge that answers a Refused (REST,
web, gateway, CLI) answers it, with "<reason>: <sentence>" as its message.

- `quota_gpu_memory`, `quota_gpus`, `quota_models`, `quota_model_not_allowed` (429): the user's limit, not the
  GPUs' capacity. Asking again helps only once the user unloads something (or an admin raises the quota).
- `reservation` (409): the GPUs are held for someone else for a known time, like a GPU another instance holds
  (409 today); `retry_after` is the seconds until the window ends. Placement skips reserved GPUs, so a load on
  demand meets a reservation only as part of "no room" (503).
- `pinned_no_room` (503): only unloading a pinned model would make room, and pins are never broken: a
  capacity refusal, like `no_evictable_model`.

Imports only models_app/errors.py (which imports nothing of ours and no Django): the rules stay plain Python."""

from models_app.errors import Refused

# reason -> (HTTP status, the refusal code of models_app/errors.py that has that status)
REASONS = {
    "quota_gpu_memory": (429, "quota"),
    "quota_gpus": (429, "quota"),
    "quota_models": (429, "quota"),
    "quota_model_not_allowed": (429, "quota"),
    "reservation": (409, "busy"),
    "pinned_no_room": (503, "unavailable"),
}


def mib(value: int) -> str:
    """61440 -> "61 440 MiB" (a space between thousands, as the dashboard writes memory)."""
    return f"{int(value):,} MiB".replace(",", " ")


class PolicyRefusal(Refused):
    """A load the policy refuses: `reason` (a key of REASONS), `sentence` (the numbers, for people),
    `retry_after` (seconds) where asking again later may help. `message` is "<reason>: <sentence>"; `code` and
    `status` those of Refused for the reason."""

    def __init__(self, reason: str, sentence: str, *, retry_after: int | None = None):
        if reason not in REASONS:
            raise ValueError(f"unknown policy reason {reason!r}")
        self.sentence = sentence
        super().__init__(
            f"{reason}: {sentence}", code=REASONS[reason][1], retry_after=retry_after, reason=reason
        )

    def body(self) -> dict:
        """The API's answer: `{"detail", "code", "reason"}` (code as every refusal has it; reason: which rule)."""
        return {"detail": self.message, "code": self.code, "reason": self.reason}
