"""Reservations as plain Python (no Django): time windows on a host's GPUs (or an amount of its memory), their
conflicts, and the sentences that explain a blocked load or a drain.

A window holds [start, end). From `start - notice` on, only its holders may load onto its GPUs (a model
loaded by someone else during the notice would be drained at the start anyway); others' models already there
are told at `start - notice` and unloaded at `start`. A memory reservation holds its MiB of the host back from
others' new loads during the same span and drains nothing (holders make room through the usual eviction).
Two windows conflict when they overlap in time and share a GPU, or when at some moment the windows on a host
would hold more memory than the host has (a reserved GPU holds its whole memory)."""

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from .reasons import PolicyRefusal, mib


def when(moment: datetime) -> str:
    """How sentences write a time: "Mon 07 Dec 14:00" (callers pass local time)."""
    return moment.strftime("%a %d %b %H:%M")


@dataclass(frozen=True)
class Window:
    """One reservation on one host. `gpu_indices` empty: a memory reservation of `memory_mib`.
    `holders`: who it is for, in words ("team-nlp, alice")."""

    reservation_id: int | None
    host: str
    start: datetime
    end: datetime
    gpu_indices: frozenset = frozenset()
    memory_mib: int | None = None
    purpose: str = ""
    holders: str = ""
    notice: timedelta = timedelta(0)

    @property
    def fences_from(self) -> datetime:
        """From when others' loads are refused (the notice period before the start)."""
        return self.start - self.notice

    def fences(self, at: datetime) -> bool:
        return self.fences_from <= at < self.end

    def reserved_mib(self, gpu_total_mib: dict) -> int:
        if self.gpu_indices:
            return sum(gpu_total_mib.get(i, 0) for i in self.gpu_indices)
        return self.memory_mib or 0

    def where(self) -> str:
        if self.gpu_indices:
            indices = ",".join(str(i) for i in sorted(self.gpu_indices))
            return f"GPU {indices} of {self.host}"
        return f"{mib(self.memory_mib or 0)} of {self.host}"

    def label(self) -> str:
        number = f" #{self.reservation_id}" if self.reservation_id else ""
        return f'reservation{number} "{self.purpose}" for {self.holders or "nobody"}'


def overlaps(a: Window, b: Window) -> bool:
    return a.start < b.end and b.start < a.end


def conflict(new: Window, existing: Iterable[Window], gpu_total_mib: dict, host_total_mib: int) -> str | None:
    """Why `new` cannot be created beside the host's `existing` windows, or None. `gpu_total_mib`: each GPU
    index of the host -> its memory; `host_total_mib`: their sum."""
    if new.reserved_mib(gpu_total_mib) > host_total_mib:
        return f"{new.where()} is more than {new.host} has ({mib(host_total_mib)})"
    during = [w for w in existing if w.reservation_id != new.reservation_id and overlaps(w, new)]
    for other in sorted(during, key=lambda w: (w.start, w.reservation_id or 0)):
        shared = new.gpu_indices & other.gpu_indices
        if shared:
            return (
                f"GPU {','.join(str(i) for i in sorted(shared))} of {new.host} is already held from "
                f"{when(other.start)} to {when(other.end)} by {other.label()}"
            )
    # the memory held at each moment a window begins inside the new one (the peaks are at starts)
    moments = sorted({new.start, *(w.start for w in during if w.start > new.start)})
    for moment in moments:
        holding = [w for w in (*during, new) if w.start <= moment < w.end]
        held = sum(w.reserved_mib(gpu_total_mib) for w in holding)
        if held > host_total_mib:
            return (
                f"at {when(moment)} the reservations on {new.host} would hold {mib(held)}, more than its "
                f"{mib(host_total_mib)} ({'; '.join(w.label() for w in holding if w is not new)})"
            )
    return None


def blocked(window: Window, model_id: str, until_end_seconds: int) -> PolicyRefusal:
    """The refusal for someone who does not hold `window` and asks to load `model_id` on its GPUs."""
    return PolicyRefusal(
        "reservation",
        f"{window.where()} is reserved from {when(window.start)} to {when(window.end)} for {window.holders} "
        f'("{window.purpose}"); {model_id} cannot load there before {when(window.end)}',
        retry_after=max(1, until_end_seconds),
    )


def drain_notice(window: Window, model_id: str, instance_id: int) -> str:
    """What the owner of an instance on reserved GPUs is told (at the notice, and again at the unload)."""
    return (
        f"reservation: {model_id} (#{instance_id}) on {window.where()} will be unloaded at {when(window.start)} "
        f"for {window.label()} (until {when(window.end)}); load it elsewhere or after the window"
    )
