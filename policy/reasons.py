"""The policy's reason codes, their HTTP status, and the refusal that carries one with its sentence.

Each reason maps to exactly one code of the project's refusal type (models_app/errors.py `Refused`: "quota"
→ 429, "busy" → 409, "unavailable" → 503), so an edge that knows `Refused` turns a PolicyRefusal into one
without a table of its own: `Refused(refusal.message, code=refusal.code, retry_after=refusal.retry_after)`.

- `quota_gpu_memory`, `quota_gpus`, `quota_models`, `quota_model_not_allowed` (429): the user's limit, not the
  GPUs' capacity. Asking again helps only once the user unloads something (or an admin raises the quota).
- `reservation` (409): the GPUs are held for someone else for a known time, like a GPU another instance holds
  (409 today); `retry_after` is the seconds until the window ends. Placement skips reserved GPUs, so a load on
  demand meets a reservation only as part of "no room" (503).
- `pinned_no_room` (503): only unloading a pinned model would make room, and pins are never broken: a
  capacity refusal, like `no_evictable_model`.

Imports nothing of ours: the rules (plain Python) and every layer above may use it."""

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


class PolicyRefusal(Exception):
    """A load the policy refuses: `reason` (a key of REASONS), `sentence` (the numbers, for people),
    `retry_after` (seconds) where asking again later may help. `message` is "<reason>: <sentence>"."""

    def __init__(self, reason: str, sentence: str, *, retry_after: int | None = None):
        if reason not in REASONS:
            raise ValueError(f"unknown policy reason {reason!r}")
        self.reason = reason
        self.sentence = sentence
        self.retry_after = retry_after
        self.message = f"{reason}: {sentence}"
        super().__init__(self.message)

    @property
    def status(self) -> int:
        return REASONS[self.reason][0]

    @property
    def code(self) -> str:
        """The code of models_app/errors.py's Refused with the same HTTP status."""
        return REASONS[self.reason][1]

    def body(self) -> dict:
        """The API's answer: `{"detail", "code", "reason"}` (code as every refusal has it; reason: which rule)."""
        return {"detail": self.message, "code": self.code, "reason": self.reason}
