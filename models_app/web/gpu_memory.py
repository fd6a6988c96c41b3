"""A GPU's memory as the dashboard's stacked bar shows it: one segment per model instance (the memory of its own
processes on this GPU), one for everything else that uses memory (other people's processes, orphans, the driver),
and the free rest. Plain computation over the GPU row's copied process list; no query."""

from dataclasses import dataclass

from models_app.formatting import format_mib


@dataclass(frozen=True)
class Segment:
    """One part of the bar: `kind` is "model", "others" or "free"; `instance_id` for a model's."""

    kind: str
    label: str
    mib: int
    percent: float
    instance_id: int | None = None

    @property
    def title(self) -> str:
        """What hovering or tapping the segment tells: "tiny (#12): 340 MiB (1.4%)"."""
        return f"{self.label}: {format_mib(self.mib)} ({self.percent:.1f}%)"


def memory_segments(gpu, names: dict[int, str]) -> list[Segment]:
    """The segments of `gpu` (memory_total_mib, memory_used_mib, processes), models first in instance order.
    `names`: instance id -> what to call it (an instance not in it is "instance #id"). Empty when the GPU's total
    is unknown. Models' segments add up to their processes' figures; "others" is the rest of the used memory
    (never below the other processes' own figures); free is what is left of the total."""
    total = gpu.memory_total_mib or 0
    if total <= 0:
        return []
    per_instance: dict[int, int] = {}
    others = 0
    for proc in gpu.processes or []:
        used = proc.get("used_mib") or 0
        if proc.get("owner") == "instance" and proc.get("instance_id") is not None:
            per_instance[proc["instance_id"]] = per_instance.get(proc["instance_id"], 0) + used
        else:
            others += used
    models = sum(per_instance.values())
    if gpu.memory_used_mib is not None:
        others = max(others, gpu.memory_used_mib - models)
    free = max(0, total - models - others)

    def percent(mib: int) -> float:
        return mib * 100 / total

    segments = [
        Segment("model", f"{names.get(pk, f'instance #{pk}')} (#{pk})", mib, percent(mib), pk)
        for pk, mib in sorted(per_instance.items())
    ]
    if others:
        segments.append(Segment("others", "Other processes", others, percent(others)))
    segments.append(Segment("free", "Free", free, percent(free)))
    return segments
