"""One run of the VAE experiment: (load a baseline) -> (quantize) -> train -> evaluate -> save.

``lowbit train`` runs one; ``lowbit study`` plans and runs many.  A run's record is a plain
JSON-serialisable dict with everything the reference study reported and more (see
:func:`run_experiment`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__, kernels
from .checkpoint import (OPTIMIZER, CheckpointError, load_optimizer, load_state, optimizer_digest, save_optimizer, save_run,
                         weights_digest, write_json)
from .models import build_model
from .train import EvalResult, evaluate, fit, make_optimizer, time_eval

__all__ = ["RunSpec", "run_experiment", "machine_info", "model_size", "RECORD"]

RECORD = "result.json"
#: RunSpec fields that only decide how a trained model is evaluated (not part of its key)
EVAL_FIELDS = ("iwae_k",)


@dataclass(frozen=True)
class RunSpec:
    """What one run does.  ``method=None`` trains in float (a baseline or the fp32 control)."""

    name: str
    epochs: int
    method: str | None = None
    config_list: list | None = None
    options: dict = field(default_factory=dict)
    seed: int = 0
    batch_size: int = 128
    lr: float = 1e-3
    iwae_k: int = 64
    calib_batches: int = 8  # PTQ: batches of training data used to calibrate
    model: dict = field(default_factory=lambda: {"name": "vae", "kwargs": {}})
    dataset: str = "mnist"
    device: str = "cpu"  # where the run trains and evaluates ("cuda", "cuda:1", ...)

    def __post_init__(self) -> None:
        check_device(self.device)
        if self.method is None and self.config_list:
            raise ValueError(f"run {self.name}: a config list needs a method")
        if self.method is not None and not self.config_list:
            raise ValueError(f"run {self.name}: method {self.method!r} needs a config list")
        if self.method != "ptq" and (not isinstance(self.epochs, int) or self.epochs <= 0):
            raise ValueError(f"run {self.name}: epochs must be a positive integer, got {self.epochs!r}")

    def key(self, init_key: str | None = None) -> str:
        """A digest of everything that decides this run's trained model (and of its starting point),
        so a changed configuration is never mistaken for a finished run.  The method's option
        defaults are part of it: a lowbit whose default changed does not reuse runs made with the
        old one.  Evaluation settings (:data:`EVAL_FIELDS`) are not: a finished run evaluated with
        others is re-evaluated (:func:`reevaluate`), not retrained."""
        defaults = None
        if self.method is not None:
            from .methods import get_method

            defaults = get_method(self.method).option_defaults()
        trains = {k: v for k, v in asdict(self).items() if k not in EVAL_FIELDS}
        blob = json.dumps(
            {"spec": trains, "init": init_key, "version": __version__, "method_defaults": defaults},
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def machine_info() -> dict[str, Any]:
    """Python/torch/lowbit versions and the machine (CPU model, threads, GPU if any)."""
    cpu = platform.processor() or platform.machine()
    flags: list[str] = []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and cpu in ("", platform.machine()):
                    cpu = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    flags = sorted(have & {"avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"})
                    break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "lowbit": __version__,
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_flags": flags,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "gpu": gpu,
        # whether lowbit's fused CPU kernels ran (None: no quantizer asked) or its PyTorch code
        # (same values; step gradients summed in another order)
        "fused_kernels": kernels.in_use(),
    }


def model_size(model: nn.Module) -> dict[str, int]:
    """Parameter count, float32 bytes, and bytes with each quantized weight packed at its grid's
    code width (``ceil(log2(levels))``: 5 bits for DoReFa's paper variant at 4 bits, whose codes
    are odd up to +-15; what a file can store is the export's business: int8 / int4)."""
    params = sum(p.numel() for p in model.parameters())
    fp32 = sum(p.numel() * p.element_size() for p in model.parameters())
    packed = 0
    seen: set[int] = set()
    for module in model.modules():
        wq = getattr(module, "weight_quantizer", None)
        inner = getattr(module, "module", None)
        if wq is not None and inner is not None:
            w = inner.weight
            qmin, qmax = wq._codes()
            packed += (w.numel() * max(1, math.ceil(math.log2(qmax - qmin + 1))) + 7) // 8
            seen.add(id(w))
    packed += sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in seen)
    return {"parameters": params, "bytes_fp32": fp32, "bytes_quantized": packed}


def _measure(model: nn.Module, test_images: torch.Tensor, spec: RunSpec) -> dict[str, Any]:
    """The test metrics of a record (``before`` / ``after``): evaluation with ``spec``'s settings
    (seed 0) and the timed evaluation pass."""
    return _metrics(evaluate(model, test_images, iwae_k=spec.iwae_k, seed=0), time_eval(model, test_images))


def _metrics(result: EvalResult, seconds: float) -> dict[str, Any]:
    return {**result.to_dict(), "eval_seconds_median3": seconds}


def check_device(device: str) -> str:
    """``device`` if runs can use it; else a ValueError that says why and what to use instead."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a torch device ({e}); use 'cpu' or 'cuda'") from None
    if dev.type == "cpu":
        return device
    if dev.type != "cuda":
        raise ValueError(f"device {device!r}: lowbit trains on 'cpu' or 'cuda' devices")
    if not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: this torch sees no CUDA device (torch.cuda.is_available() is False, "
                         f"torch {torch.__version__}); use --device cpu")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here (cuda:0 .. "
                         f"cuda:{torch.cuda.device_count() - 1})")
    return device


def run_experiment(
    spec: RunSpec,
    train_images: torch.Tensor,
    test_images: torch.Tensor,
    out_dir: str | os.PathLike,
    *,
    init: str | os.PathLike | None = None,
    init_key: str | None = None,
    before: dict[str, Any] | None = None,
    progress: Any = True,
) -> dict[str, Any]:
    """Run ``spec`` and save its model, optimizer state and record (``result.json``) in ``out_dir``.

    Args:
        init: a run directory to start from (its weights and its Adam state: the reference
            protocol keeps the same optimizer across quantization).  None starts from scratch.
        init_key: the starting run's key, folded into this run's key.
        before: the starting run's test metrics, when known (saves evaluating it again).
        progress: True, False, or a rich ``Progress`` to add the training bar to.

    Returns:
        the record written to ``out_dir/result.json``.
    """
    out_dir = Path(out_dir)
    # a record left by an earlier run in this folder goes first: once this run starts overwriting
    # the folder's files, that record no longer describes them (a resumed study would reuse them)
    (out_dir / RECORD).unlink(missing_ok=True)
    device = torch.device(check_device(spec.device))
    train_images, test_images = train_images.to(device), test_images.to(device)
    torch.manual_seed(spec.seed)  # the model's initialisation is part of the run's seed (drawn on the CPU)
    model = build_model(spec.model["name"], **spec.model.get("kwargs", {}))
    if init is not None:
        state, init_meta = load_state(init)
        if init_meta.get("quant"):
            raise CheckpointError(f"{init} is a quantized run ({init_meta['quant'].get('method')}); start from a "
                                  "float run (lowbit train without --method), then quantize with --method")
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise CheckpointError(f"{init}: its weights do not fit this run's model ({e})") from e
    model.to(device)  # before quantizing: the quantizers' state is made on the model's device
    optimizer = make_optimizer(model, spec.lr)
    if init is not None:
        if not load_optimizer(init, optimizer):
            raise CheckpointError(
                f"{init} has no optimizer state ({OPTIMIZER}): a run started from it continues its Adam state, as "
                "the reference protocol does (a fresh optimizer would be another experiment); retrain that run")
        if before is None:
            before = _measure(model, test_images, spec)
    printout_before = str(model)
    size_before = model_size(model)

    calib: dict | None = None
    if spec.method is not None:
        from .quantize import quantize

        quantize(model, spec.config_list, method=spec.method, optimizer=optimizer, **spec.options)
        kernels.get()  # build the fused kernels now (once per machine), not inside the first timed epoch
    train = None
    if spec.method == "ptq":
        _calibrate(model, train_images, spec)
    else:
        train = fit(model, train_images, epochs=spec.epochs, batch_size=spec.batch_size, optimizer=optimizer,
                    seed=spec.seed + (1000 if init is not None else 0), progress=progress,
                    description=spec.name)
    after = _measure(model, test_images, spec)
    if spec.method is not None:
        from .quantize import calibration_config

        calib = calibration_config(model)

    quant = {"method": spec.method, "config_list": spec.config_list, "options": spec.options} if spec.method else None
    record = {
        "name": spec.name,
        "key": spec.key(init_key),
        "spec": asdict(spec),
        "init": str(init) if init is not None else None,
        "printout_before": printout_before,
        "printout_after": str(model),
        "calibration_config": calib,
        "train": train.to_dict() if train is not None else None,
        "before": before,
        "after": after,
        "size_before": size_before,
        "size_after": model_size(model),
        "environment": machine_info(),
    }
    save_run(out_dir, model, model_spec=spec.model, quant=quant, extra={"key": record["key"], "seed": spec.seed})
    save_optimizer(out_dir, optimizer)
    record["weights_sha256"] = weights_digest(out_dir)  # a resumed study checks the weights are these
    record["optimizer_sha256"] = optimizer_digest(out_dir)  # (and the state a later run continues)
    write_json(out_dir / RECORD, record)  # written last: its presence marks the run finished
    return record


def reevaluate(spec: RunSpec, record: dict[str, Any], test_images: torch.Tensor, out_dir: str | os.PathLike,
               before: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate the finished run in ``out_dir`` again with ``spec``'s evaluation settings (its
    trained model is the same: ``spec.key`` leaves them out) and rewrite its record.

    ``before``: the starting run's metrics under the same settings (None: keep the record's).
    """
    from .checkpoint import load_model

    out_dir = Path(out_dir)
    device = torch.device(check_device(spec.device))
    model = load_model(out_dir).to(device)
    test_images = test_images.to(device)
    record = {**record, "spec": {**record["spec"], **{k: getattr(spec, k) for k in EVAL_FIELDS}}}
    record["after"] = _measure(model, test_images, spec)
    if before is not None:
        record["before"] = before
    write_json(out_dir / RECORD, record)
    return record


def _calibrate(model: nn.Module, images: torch.Tensor, spec: RunSpec) -> None:
    """PTQ: show the quantizers ``calib_batches`` seeded batches (no weight update)."""
    from .quantize import calibrate

    g = torch.Generator().manual_seed(spec.seed)
    idx = torch.randperm(images.shape[0], generator=g)[: spec.calib_batches * spec.batch_size].to(images.device)
    calibrate(model, (images.index_select(0, idx[i : i + spec.batch_size]) for i in range(0, idx.numel(), spec.batch_size)))
    model.eval()
