"""Run directories: weights as safetensors, everything else as JSON, every file written atomically.

A run directory holds ``model.safetensors`` (the state dict, quantizer state included) and
``meta.json`` (how to rebuild the model: its registered name and kwargs, and the quantization
method, config list, options and the method's option defaults at save time).  :func:`load_model`
rebuilds the model from those alone: no pickle, no code from the files is executed.  Because the
defaults are saved, a run keeps its meaning when a later lowbit changes a default.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from .models import build_model

__all__ = [
    "CheckpointError",
    "atomic_write_bytes",
    "write_json",
    "read_json",
    "ensure_dir",
    "save_run",
    "load_state",
    "load_model",
    "save_optimizer",
    "load_optimizer",
    "WEIGHTS",
    "META",
]

WEIGHTS = "model.safetensors"
META = "meta.json"
OPTIMIZER = "optimizer.safetensors"

#: Option defaults of lowbit versions that did not save them (before 0.2.0), where they differ
#: from today's: DoReFa's weights were max-scaled then.
_LEGACY_DEFAULTS: dict[str, dict[str, Any]] = {"dorefa": {"dorefa_variant": "scaled"}}


class CheckpointError(ValueError):
    """A run directory or output path that cannot be written or read; the message says why."""


def ensure_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` (and parents) if needed and check that it is a writable folder."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise CheckpointError(f"output path {p} exists and is not a folder; choose another --out")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create output folder {p}: {e.strerror or e}; choose another --out") from e
    if not p.is_dir():
        raise CheckpointError(f"output path {p} exists and is not a folder; choose another --out")
    if not os.access(p, os.W_OK | os.X_OK):
        raise CheckpointError(f"output folder {p} is not writable; fix its permissions or choose another --out")
    return p


def _umask() -> int:
    """The process umask, read without changing it (Linux); 0o022 where it cannot be read."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``:
    readers see the old file or the new one, never half of one.  The file gets the usual
    permissions (0666 less the umask), not the temporary file's private 0600."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; give a file name")
    folder = ensure_dir(path.parent if str(path.parent) else ".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); delete it to redo that run") from e


def save_run(
    run_dir: str | os.PathLike,
    model: torch.nn.Module,
    *,
    model_spec: dict,
    quant: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """Save ``model``'s state and how to rebuild it into ``run_dir``.

    Args:
        model_spec: ``{"name": registered model name, "kwargs": {...}}``.
        quant: ``{"method", "config_list", "options"}`` given to :func:`lowbit.quantize`, or None.
        extra: more JSON-serialisable facts to keep in ``meta.json``.
    """
    from . import __version__

    run_dir = ensure_dir(run_dir)
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(run_dir / WEIGHTS, save(state))
    if quant:
        from .methods import get_method

        quant = {**quant, "method_defaults": get_method(quant["method"]).option_defaults()}
    meta = {"model": model_spec, "quant": quant, "lowbit": __version__, **(extra or {})}
    write_json(run_dir / META, meta)
    return run_dir


def load_state(run_dir: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """The state dict and meta of a run directory."""
    run_dir = Path(run_dir)
    weights = run_dir / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{run_dir} holds no {WEIGHTS}: not a lowbit run directory (train one with `lowbit train --out {run_dir}`)")
    meta = read_json(run_dir / META)
    try:
        state = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{weights} is unreadable or truncated ({e}); retrain or restore it") from e
    return state, meta


def load_model(run_dir: str | os.PathLike) -> torch.nn.Module:
    """Rebuild the model saved in ``run_dir`` (quantized if it was) with its trained state."""
    state, meta = load_state(run_dir)
    spec = meta.get("model") or {}
    model = build_model(spec.get("name", "vae"), **spec.get("kwargs", {}))
    quant = meta.get("quant")
    if quant:
        from .quantize import quantize

        defaults = quant.get("method_defaults")
        if defaults is None:  # saved by lowbit < 0.2.0
            defaults = _LEGACY_DEFAULTS.get(quant["method"], {})
        quantize(model, quant["config_list"], method=quant["method"], **{**defaults, **quant.get("options", {})})
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{run_dir}: the saved state does not fit the rebuilt model (missing {missing}, unexpected {unexpected})"
        )
    model.eval()
    return model


def save_optimizer(run_dir: str | os.PathLike, optimizer: torch.optim.Optimizer) -> Path:
    """Save an optimizer's state (tensors as safetensors, hyper-parameters as JSON metadata) so a
    later run can continue with the *same* optimizer, as the reference protocol does."""
    sd = optimizer.state_dict()
    tensors = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for name, value in st.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value.detach().to("cpu", copy=True).contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    header = {"param_groups": json.dumps(sd["param_groups"]), "scalars": json.dumps(scalars)}
    return atomic_write_bytes(Path(run_dir) / OPTIMIZER, save(tensors, metadata=header))


def load_optimizer(run_dir: str | os.PathLike, optimizer: torch.optim.Optimizer) -> bool:
    """Load the state saved by :func:`save_optimizer` into ``optimizer`` (built over the same
    parameters in the same order).  Returns False when the run has no optimizer state."""
    path = Path(run_dir) / OPTIMIZER
    if not path.is_file():
        return False
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for idx, values in json.loads(header["scalars"]).items():
        state.setdefault(int(idx), {}).update(values)
    groups = json.loads(header["param_groups"])
    current = optimizer.state_dict()["param_groups"]
    if len(groups) != len(current) or any(len(a["params"]) != len(b["params"]) for a, b in zip(groups, current)):
        raise CheckpointError(f"{path} was saved for different parameters than this model's optimizer")
    for g, c in zip(groups, current):
        g["params"] = c["params"]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    return True
