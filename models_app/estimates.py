"""Memory predictions for the registry's models on the inventory's GPUs: the plain-Python estimate
(models_app/estimator/) with the model's flags resolved through its llama-server's catalogue, corrected by
what earlier loads of the model on that kind of GPU with that llama.cpp version measured, and compared with
the GPUs' free memory (other people's processes and our instances count, as telemetry last saw them).

Reads the database and the GGUF header (cached by path, size and mtime); never runs a process, so it may be
called inside a request."""

from dataclasses import dataclass, field
from statistics import median

from gpus.models import Gpu
from utilities.dbutil import select

from . import estimator
from .binaries import parsed_catalogue, without_catalogue
from .formatting import format_mib
from .models import GpuInstance, LlamaBinary

MIB = estimator.MIB
CALIBRATION_LOADS = 5  # the recent loads whose measured/estimated ratio corrects the next estimate
# A ratio outside this range is a measurement gone wrong (a process that died, a GPU query that failed).
RATIO_RANGE = (0.05, 20.0)


@dataclass
class Prediction:
    """One model on one set of GPUs: the estimate per GPU (MiB, corrected), the free memory after it and
    whether it fits, with the reasons in words."""

    model_id: str
    gpus: list[Gpu]
    estimate: estimator.Estimate | None
    raw_mib: list[int] = field(default_factory=list)  # the formula's figure per GPU
    per_gpu_mib: list[int] = field(default_factory=list)  # corrected by calibration
    factor: float = 1.0
    loads: int = 0  # how many loads the factor comes from
    free_mib: list[int | None] = field(default_factory=list)  # before the load
    error: str = ""  # why there is no estimate
    llama_version: str = ""
    gpu_name: str = ""
    context_note: str = ""  # the context was lowered to fit, as llama-server's --fit will
    no_gpu: str = ""  # set when the placement found no GPU that fits: why (the estimate is then host-only)

    @property
    def total_mib(self) -> int:
        return sum(self.per_gpu_mib)

    @property
    def free_after_mib(self) -> list[int | None]:
        return [None if f is None else f - e for f, e in zip(self.free_mib, self.per_gpu_mib, strict=False)]

    @property
    def fits(self) -> bool | None:
        """True or False; None when there is no estimate or no free-memory figure."""
        if self.no_gpu:
            return False
        if self.estimate is None or any(f is None for f in self.free_mib):
            return None
        return all(after >= 0 for after in self.free_after_mib)

    def gpu_label(self) -> str:
        return ",".join(str(g.index) for g in self.gpus)

    def summary(self) -> str:
        """ "≈ 6.1 GiB on GPU 0: fits, 74.0 GiB free" / "does not fit: 5.2 GiB free after train.py"."""
        if self.no_gpu:
            return f"no GPU fits: {self.no_gpu}"
        if self.estimate is None:
            return f"no estimate: {self.error}"
        where = f"GPU {self.gpu_label()}"
        learned = f" (corrected ×{self.factor:.2f} from {self.loads} loads)" if self.loads else ""
        head = f"≈ {gib(self.total_mib)} on {where}{learned}"
        if self.context_note:
            head += f" ({self.context_note})"
        if self.fits is None:
            return f"{head}: free memory unknown"
        free = sum(f or 0 for f in self.free_mib)
        if self.fits:
            return f"{head}: fits, {gib(free)} free"
        short = [
            f"GPU {g.index} needs {gib(need)}, {gib(f)} free{_after_others(g)}"
            for g, need, f, after in zip(
                self.gpus, self.per_gpu_mib, self.free_mib, self.free_after_mib, strict=False
            )
            if after is not None and after < 0
        ]
        return f"{head}: does not fit: " + "; ".join(short)

    def as_dict(self) -> dict:
        data = {
            "model": self.model_id,
            "gpu_ids": self.gpu_label(),
            "host": self.gpus[0].host.name if self.gpus else None,
            "estimated_mib": self.total_mib if self.estimate else None,
            "per_gpu": [
                {
                    "gpu_id": g.index,
                    "name": g.name,
                    "estimated_mib": need,
                    "formula_mib": raw,
                    "free_mib": free,
                    "free_after_mib": after,
                }
                for g, need, raw, free, after in zip(
                    self.gpus,
                    self.per_gpu_mib,
                    self.raw_mib,
                    self.free_mib,
                    self.free_after_mib,
                    strict=False,
                )
            ]
            if self.estimate
            else [],
            "fits": self.fits,
            "correction": {"factor": round(self.factor, 3), "loads": self.loads},
            "llama_version": self.llama_version,
            "summary": self.summary(),
            "context_note": self.context_note,
            "breakdown": self.estimate.as_dict() if self.estimate else None,
            "error": self.error,
        }
        return data

    def stored(self) -> dict:
        """What an instance keeps of the estimate it was loaded with."""
        data = self.as_dict()
        data["gpu_name"] = self.gpu_name
        data["formula_mib"] = sum(self.raw_mib)
        return data


def suggested(model, choices, unavailable: list[str], overrides: dict | None = None) -> Prediction:
    """The prediction on the placement's first choice that fits (`choices`, `unavailable`: placement.rank);
    when none fits, a host-only estimate that says so, and why, instead of "fits" on no GPU."""
    fitting = [c for c in choices if c.fits]
    if fitting:
        return predict(model, fitting[0].gpus, overrides)
    prediction = predict(model, [], overrides)
    if choices:
        why = "; ".join(c.explain() for c in choices[:3])
    elif unavailable:
        why = "every GPU is taken or unavailable: " + "; ".join(unavailable[:3])
    else:
        why = "no live host has reported a GPU"
    prediction.no_gpu = why
    return prediction


def gib(mib: int | float | None) -> str:
    """ "6.1 GiB", or "302 MiB" below 1 GiB: the product's one size rule (models_app/formatting.py); "?" when
    unknown."""
    return "?" if mib is None else format_mib(mib)


def _after_others(gpu: Gpu) -> str:
    names = sorted({p.get("name") or "?" for p in gpu.processes or [] if p.get("owner") != "instance"})
    held = [p for p in gpu.processes or [] if p.get("owner") == "instance"]
    parts = names[:3] + (["our instances"] if held else [])
    return f" after {', '.join(parts)}" if parts else ""


def binary_for(model, host) -> LlamaBinary | None:
    """The binary a load on `host` would run (pinned, else the host's default) as the inventory knows it,
    without running anything; None when the host has not reported one."""
    if model.binary_id:
        if type(model).binary.is_cached(model):  # handed in (the Add a model page's probes: one row for all)
            return model.binary
        return without_catalogue().filter(pk=model.binary_id).first()
    where = {"is_default": True, "error": ""} | ({"host_id": host.pk} if host is not None else {})
    found = select(LlamaBinary, where, exclude=("catalogue",), order_by=("-discovered_at",), limit=1)
    return found[0] if found else None


def options_for(model, binary: LlamaBinary | None, overrides: dict | None = None) -> dict:
    """The memory-relevant flags of the model (cli_params, then the overrides) under canonical names."""
    catalogue = parsed_catalogue(binary) if binary is not None else None
    params = dict(model.cli_params or {})
    options = estimator.memory_options(params, catalogue)
    options.update(overrides or {})
    return options


def calibration(model_id: str, gpu_name: str, version: str) -> tuple[float, int]:
    """The median measured/estimated ratio of the recent loads of this model on this kind of GPU with this
    llama.cpp version, and how many loads it comes from ((1.0, 0) when none)."""
    rows = select(
        GpuInstance,
        {"model_id": model_id, "memory_measured_mb__isnull": False, "memory_estimated_mb__isnull": False},
        columns=("memory_measured_mb", "memory_estimate"),
        order_by=("-requested_at",),
        limit=50,
    )
    ratios = []
    for row in rows:
        measured, stored = row.memory_measured_mb, row.memory_estimate or {}
        if stored.get("gpu_name") != gpu_name or stored.get("llama_version", "") != version:
            continue
        formula = stored.get("formula_mib")
        if not formula:
            continue
        ratio = measured / formula
        if RATIO_RANGE[0] <= ratio <= RATIO_RANGE[1]:
            ratios.append(ratio)
        if len(ratios) >= CALIBRATION_LOADS:
            break
    if not ratios:
        return 1.0, 0
    return median(ratios), len(ratios)


def predict(
    model,
    gpus: list[Gpu],
    overrides: dict | None = None,
    *,
    freed_mib: dict[int, int] | None = None,
    facts: estimator.GgufFacts | None = None,
) -> Prediction:
    """The prediction of `model` on `gpus` (one host). `overrides`: canonical option names (ctx-size, ...)
    that replace the model's flags. `freed_mib`: memory per GPU pk that the load frees first (a switch).
    `facts`: the header as a host's worker reported it (a file the web node cannot read), else read here."""
    host = gpus[0].host if gpus else None
    binary = binary_for(model, host)
    version = binary.version if binary is not None else ""
    gpu_name = gpus[0].name if gpus else ""
    prediction = Prediction(
        model_id=model.pk, gpus=gpus, estimate=None, llama_version=version, gpu_name=gpu_name
    )
    freed_mib = freed_mib or {}
    prediction.free_mib = [
        None
        if not g.memory_total_mib or g.memory_used_mib is None or g.state == Gpu.State.UNAVAILABLE
        else g.memory_total_mib - g.memory_used_mib + freed_mib.get(g.pk, 0)
        for g in gpus
    ]
    try:
        facts = facts or estimator.gguf_facts(model.path)
        options = options_for(model, binary, overrides)
        if "tensor-split" not in options and len(gpus) > 1 and all(f for f in prediction.free_mib):
            # llama.cpp's default split: in proportion to each device's free memory.
            options["tensor-split"] = ",".join(str(f) for f in prediction.free_mib)
        result = estimator.estimate(facts, options, gpus=len(gpus))
    except (OSError, estimator.EstimateError) as exc:
        prediction.error = str(exc)
        return prediction
    if model.pk:  # an unsaved probe (a file not registered yet) has no loads to learn from
        prediction.factor, prediction.loads = calibration(model.pk, gpu_name, version)
    _use(prediction, result)
    fit_on = str(options.get("fit", "on")).lower() not in ("off", "0", "false")
    if prediction.fits is False and fit_on and "ctx-size" not in options:
        _lower_context(prediction, facts, options)
    return prediction


def _use(prediction: Prediction, result) -> None:
    prediction.estimate = result
    prediction.raw_mib = [-(-d.total // MIB) for d in result.devices]
    prediction.per_gpu_mib = [round(raw * prediction.factor) for raw in prediction.raw_mib]


def _lower_context(prediction: Prediction, facts, options: dict) -> None:
    """The model sets no context, so llama-server (with its default `--fit on`) lowers the trained context
    until the load fits, down to `--fit-ctx` (4096): predict the largest context that fits, in steps of 256."""
    trained = prediction.estimate.settings.n_ctx
    try:
        floor = min(trained, int(options.get("fit-ctx") or 4096))
    except ValueError:
        return
    gpus = len(prediction.gpus)

    def fits_at(n_ctx):
        trial = Prediction(prediction.model_id, prediction.gpus, None, factor=prediction.factor)
        trial.free_mib = prediction.free_mib
        _use(trial, estimator.estimate(facts, {**options, "ctx-size": n_ctx}, gpus=gpus))
        return trial

    low = fits_at(floor)
    if low.fits is False:
        return  # not even the smallest context llama-server would try
    best, lo, hi = low, floor // 256, trained // 256
    while lo < hi:  # the largest multiple of 256 that fits
        mid = (lo + hi + 1) // 2
        trial = fits_at(mid * 256)
        if trial.fits is False:
            hi = mid - 1
        else:
            best, lo = trial, mid
    _use(prediction, best.estimate)
    prediction.context_note = f"context {best.estimate.settings.n_ctx} tokens: llama-server's --fit lowers the trained {trained} to fit"


# The flags an estimate may override (query parameters, the CLI), in llama-server's short spellings: every
# memory flag the README lists. Switches take 1/true/on or 0/false/off.
OVERRIDES = {
    "c": "ctx-size", "ngl": "gpu-layers", "ctk": "cache-type-k", "ctv": "cache-type-v", "fa": "flash-attn",
    "np": "parallel", "b": "batch-size", "ub": "ubatch-size", "sm": "split-mode", "ts": "tensor-split",
    "nkvo": "no-kv-offload", "swa-full": "swa-full", "kvu": "kv-unified",
}  # fmt: skip
WHOLE_OPTIONS = ("ctx-size", "gpu-layers", "parallel", "batch-size", "ubatch-size")
SWITCHES = {"1": True, "true": True, "on": True, "0": False, "false": False, "off": False}


def parse_overrides(raw: dict) -> dict:
    """Query parameters (`c`, `ngl`, `ctk`, `nkvo`, ..., in llama-server's short names) as canonical options;
    EstimateError names a bad one (a name that is not an override included)."""
    options = {}
    for name, value in raw.items():
        canonical = OVERRIDES.get(name)
        if canonical is None:
            raise estimator.EstimateError(f"{name}: not a flag an estimate takes ({', '.join(OVERRIDES)})")
        if value in (None, ""):
            continue
        if canonical in WHOLE_OPTIONS:
            number = estimator.whole_number(name, value)
            if number < (-1 if canonical in ("gpu-layers", "parallel") else 0) or number > 10_000_000:
                raise estimator.EstimateError(f"{name}: {number} is out of range")
            value = number
        elif canonical in ("no-kv-offload", "swa-full", "kv-unified"):
            on = SWITCHES.get(str(value).strip().lower())
            if on is None:
                raise estimator.EstimateError(f"{name}: {value!r} is not 1/true/on or 0/false/off")
            if canonical == "kv-unified":  # one shared cache, or one per slot: either replaces the model's
                options["no-kv-unified"] = not on
            value = on
        options[canonical] = value
    # Check the rest (cache types, flash attention, the split) the way the estimator will.
    estimator.settings_for(
        estimator.GgufFacts(path="", architecture="x", metadata={"x.block_count": 1}, tensors={}), options
    )
    return options
