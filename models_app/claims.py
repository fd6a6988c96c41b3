"""Claims: how much of a GPU each active instance holds, and whether a load fits beside them. Plain Python over
plain data (no Django, no database), so admission, placement, the API, /metrics, eviction and
bench/packing.py's simulation all count the same way.

An active instance claims, on each GPU it uses:
- while it loads (pending, starting): its estimate there (corrected by what past loads measured);
- then the larger of that estimate and the memory its own processes use there (per-process telemetry);
- plus the headroom (LLAMACONTROLLER_GPU_HEADROOM_MIB: CUDA context growth, allocator fragmentation, the
  larger compute buffers of a first long request).
An instance without an estimate (its GGUF could not be read) claims the whole GPU: a model whose size is not
known is never packed beside others, and nothing joins it. Memory that no instance of ours explains (other
people's processes, orphans, the driver's own) counts as foreign, with its measured size.

A load is admitted on a GPU only where claims + foreign + the new claim <= the GPU's memory."""

from dataclasses import dataclass

LOADING = ("pending", "starting")


@dataclass(frozen=True)
class Holder:
    """An active instance as one of its GPUs sees it. `estimate_mib`: its estimate on this GPU (None: no
    estimate was made); `measured_mib`: its own processes' memory on this GPU (None: not measured yet)."""

    instance_id: int
    model_id: str
    status: str
    estimate_mib: int | None
    measured_mib: int | None = None
    exclusive: bool = False

    @property
    def whole_gpu(self) -> bool:
        return self.estimate_mib is None


def new_claim_mib(estimate_mib: int | None, headroom_mib: int) -> int | None:
    """What a load about to start claims on one GPU: its estimate plus the headroom; None (the whole GPU)
    without an estimate."""
    return None if estimate_mib is None else estimate_mib + headroom_mib


@dataclass(frozen=True)
class GpuClaims:
    """One GPU: its memory, the foreign memory on it and the instances that hold it."""

    gpu_id: int
    index: int
    total_mib: int
    foreign_mib: int
    holders: tuple = ()
    headroom_mib: int = 0
    # False while the GPU's used memory is not reported: then only the rules about who may share it apply
    memory_known: bool = True

    def claim_of(self, holder: Holder) -> int:
        """The holder's claim here, in MiB (the whole GPU: all that foreign memory leaves)."""
        if holder.whole_gpu:
            return max(0, self.total_mib - self.foreign_mib)
        held = holder.estimate_mib
        if holder.status not in LOADING and holder.measured_mib is not None:
            held = max(held, holder.measured_mib)
        return held + self.headroom_mib

    @property
    def claimed_mib(self) -> int:
        return sum(self.claim_of(h) for h in self.holders)

    @property
    def free_mib(self) -> int:
        """What is left for a new claim (negative where a forced load went over)."""
        return self.total_mib - self.foreign_mib - self.claimed_mib

    def fits(self, claim_mib: int | None) -> bool:
        """Whether a new claim (None: the whole GPU) is admitted beside the holders."""
        if claim_mib is None:
            return not self.holders
        if any(h.whole_gpu for h in self.holders):
            return False
        if not self.memory_known:
            return True
        return self.claimed_mib + self.foreign_mib + claim_mib <= self.total_mib

    def left_after_mib(self, claim_mib: int | None) -> int:
        """Memory left after a new claim (0 for a whole-GPU claim)."""
        return 0 if claim_mib is None else self.free_mib - claim_mib

    def conflict(self, model_id: str, *, exclusive: bool, sharing: bool) -> tuple[str, Holder] | None:
        """Why a load of `model_id` may not join this GPU whatever the memory, or None: ("same", holder) the
        model runs here already; ("sharing_off", holder) one model per GPU; ("exclusive", holder) the new model
        or the holder wants the GPU to itself."""
        for holder in self.holders:
            if holder.model_id == model_id:
                return "same", holder
        if not self.holders:
            return None
        first = self.holders[0]
        if not sharing:
            return "sharing_off", first
        if exclusive:
            return "exclusive", first
        for holder in self.holders:
            if holder.exclusive:
                return "exclusive", holder
        return None


def foreign_mib(memory_used_mib: int | None, processes: list[dict]) -> int:
    """Memory on a GPU that no instance of ours explains: the GPU's used memory less our instances' processes,
    and at least what the other processes listed use (a GPU without a figure: just those)."""
    ours = sum(int(p.get("used_mib") or 0) for p in processes if p.get("owner") == "instance")
    others = sum(int(p.get("used_mib") or 0) for p in processes if p.get("owner") != "instance")
    if memory_used_mib is None:
        return others
    return max(others, memory_used_mib - ours, 0)


def measured_mib(processes: list[dict], instance_id: int) -> int | None:
    """The memory an instance's own processes use on a GPU (its rows in the GPU's process list), or None
    when none is listed with a figure."""
    used = [
        int(p["used_mib"])
        for p in processes
        if p.get("owner") == "instance"
        and p.get("instance_id") == instance_id
        and p.get("used_mib") is not None
    ]
    return sum(used) if used else None
