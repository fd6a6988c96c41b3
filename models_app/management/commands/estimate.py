import json
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from models_app import checks, estimates, estimator, placement
from models_app.binaries import resolve_llama_server
from models_app.errors import Refused
from models_app.models import ModelConfig


class Command(BaseCommand):
    help = (
        "Predict a model's memory: `estimate MODEL [--gpu 0,1] [--host NAME] [-c N] [--json] [--fit-params]`. "
        "Without --gpu: the placement ranking and the suggested GPUs."
    )

    def add_arguments(self, parser):
        parser.add_argument("model", help="Model id from the registry.")
        parser.add_argument("--gpu", help='GPU indexes: "0" or "0,1".')
        parser.add_argument("--host", help="Host name; default: the only host with those GPUs.")
        parser.add_argument("-c", "--ctx-size", dest="ctx", help="Context size (default: the model's flags).")
        parser.add_argument("--json", dest="as_json", action="store_true", help="Print the estimate as JSON.")
        parser.add_argument(
            "--fit-params",
            action="store_true",
            help="Also ask this machine's llama-fit-params (llama.cpp's own estimate), where the build has it.",
        )

    def handle(self, model, gpu, host, ctx, as_json, fit_params, **options):
        entry = ModelConfig.objects.filter(pk=model).first()
        if entry is None:
            raise CommandError(f"unknown model {model!r}")
        ranking = None
        try:
            overrides = estimates.parse_overrides({"c": ctx} if ctx is not None else {})
            if gpu is not None:
                _, gpus = checks.resolve_gpus(checks.parse_gpu_spec(gpu), host)
                prediction = estimates.predict(entry, gpus, overrides)
            else:
                host_row = checks.host_named(host) if host else None
                choices, out = placement.rank(entry, host=host_row, overrides=overrides)
                prediction = estimates.suggested(entry, choices, out, overrides)
                ranking = {"ranking": [c.as_dict() for c in choices], "unavailable": out}
        except (Refused, estimator.EstimateError) as exc:
            raise CommandError(getattr(exc, "message", str(exc))) from None
        if as_json:  # JSON only: the estimate, and without --gpu the ranking it was chosen from
            data = {**prediction.as_dict(), **(ranking or {})}
            self.stdout.write(json.dumps(data, indent=2, ensure_ascii=False, allow_nan=False))
        else:
            if ranking is not None:
                for line in [c["explanation"] for c in ranking["ranking"]] + ranking["unavailable"]:
                    self.stdout.write(f"  {line}")
                if prediction.gpus:
                    self.stdout.write(
                        f"suggestion: GPU {prediction.gpu_label()} on {prediction.gpus[0].host.name}"
                    )
            self.stdout.write(prediction.summary())
            if prediction.estimate is not None:
                for label, part in self._parts(prediction):
                    self.stdout.write(
                        f"  {label:>8}: weights {part['weights_mib']:.1f} MiB, KV {part['kv_mib']:.1f} MiB, "
                        f"compute {part['compute_mib']:.1f} MiB, CUDA context {part['overhead_mib']:.0f} MiB, "
                        f"total {part['total_mib']:.1f} MiB ({part['layers']} layers"
                        + (" + output" if part["output_layer"] else "")
                        + ")"
                    )
                for note in prediction.estimate.notes:
                    self.stdout.write(f"  note: {note}")
        if fit_params:
            self._fit_params(entry, prediction)

    def _parts(self, prediction):
        data = prediction.estimate.as_dict()
        for gpu, part in zip(prediction.gpus, data["gpus"], strict=False):
            yield f"GPU {gpu.index}", part
        yield "host", data["host"]

    def _fit_params(self, entry, prediction):
        binary = resolve_llama_server()
        if not binary.ok:
            self.stdout.write(f"llama-fit-params: no llama-server here ({binary.error})")
            return
        s = prediction.estimate.settings if prediction.estimate else None
        args = []
        if s is not None:  # the same settings (llama-fit-params has no --kv-unified: it plans one slot then)
            args = ["-c", str(s.n_ctx), "-ub", str(s.n_ubatch), "-b", str(s.n_batch)]
            args += [] if s.kv_unified else ["-np", str(s.n_seq)]
            args += ["-ctk", s.cache_k, "-ctv", s.cache_v, "-fa", "on" if s.flash_attn else "off"]
        opinion = estimator.fit_params(str(Path(binary.path).parent), entry.path, args)
        if opinion is None:
            self.stdout.write("llama-fit-params: not in this llama.cpp build (or it failed)")
            return
        for device in opinion:
            self.stdout.write(
                f"llama-fit-params {device['device']}: model {device['model_mib']:.0f} MiB, "
                f"context {device['context_mib']:.0f} MiB, compute {device['compute_mib']:.0f} MiB"
            )
