"""Run directories: weights as safetensors, everything else as JSON, every file written atomically.

A run directory holds ``model.safetensors`` (the state dict, quantizer state included) and
``meta.json`` (how to rebuild the model: its registered name and kwargs, and the quantization
method, config list, options and the method's option defaults at save time).  :func:`load_model`
rebuilds the model from those alone: no pickle, no code from the files is executed.  Because the
defaults are saved, a run keeps its meaning when a later lowbit changes a default.

The two files vouch for each other (since 0.3.5): ``meta.json`` keeps the SHA-256 of the weights
file (``weights_sha256``), and the weights file's header keeps the digest of the meta's
``model`` and ``quant`` entries (``lowbit.rebuild_sha256``).  Loading checks both, so weights
damaged on disk, weights copied from another run, or a ``meta.json`` edited to other bits are
refused instead of being evaluated as something they are not.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from .config import ConfigError
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
    "weights_digest",
    "optimizer_digest",
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


def ensure_dir(path: str | os.PathLike, option: str = "--out") -> Path:
    """Create ``path`` (and parents) if needed and check that it is a writable folder; errors
    suggest choosing another ``option`` (the command-line flag that named it)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise CheckpointError(f"output path {p} exists and is not a folder; choose another {option}")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create output folder {p}: {e.strerror or e}; choose another {option}") from e
    if not p.is_dir():
        raise CheckpointError(f"output path {p} exists and is not a folder; choose another {option}")
    if not os.access(p, os.W_OK | os.X_OK):
        raise CheckpointError(f"output folder {p} is not writable; fix its permissions or choose another {option}")
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
    given = str(path)
    path = Path(path)
    if not given or not path.name or path.is_dir():
        raise CheckpointError(f"{given!r} is {'a folder' if given and path.is_dir() else 'no file name'}; give a file name")
    folder = ensure_dir(path.parent if str(path.parent) else ".")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):  # (a folder that says it is writable and is not: /proc, a read-only
            # mount; a full disk; a file system that refuses the name)
            raise CheckpointError(f"cannot write {path}: {e.strerror or e}; choose another folder") from e
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
    if quant:
        from .methods import get_method

        quant = {**quant, "method_defaults": get_method(quant["method"]).option_defaults()}
    blob = save(state, metadata={REBUILD_KEY: _rebuild_digest(model_spec, quant),
                                 VERSION_KEY: _rebuild_digest(model_spec, quant, __version__)})
    meta = {"model": model_spec, "quant": quant, "lowbit": __version__,
            "weights_sha256": hashlib.sha256(blob).hexdigest(), **(extra or {})}
    atomic_write_bytes(run_dir / WEIGHTS, blob)
    write_json(run_dir / META, meta)
    return run_dir


#: the safetensors header key holding :func:`_rebuild_digest` of the run's meta
REBUILD_KEY = "lowbit.rebuild_sha256"
#: the same with the saving version (which says what its config meant, see :func:`_legacy_config`):
#: runs saved after 0.3.8
VERSION_KEY = "lowbit.rebuild_version_sha256"


def _rebuild_digest(model_spec: Any, quant: Any, *version: Any) -> str:
    """Digest of what rebuilds the model (its spec and quantization, and the version that saved
    them where given), as JSON."""
    return hashlib.sha256(json.dumps([model_spec, quant, *version], sort_keys=True).encode()).hexdigest()


def weights_digest(run_dir: str | os.PathLike) -> str | None:
    """SHA-256 of the run's weights file, or None when it has none."""
    return file_digest(Path(run_dir) / WEIGHTS)


def optimizer_digest(run_dir: str | os.PathLike) -> str | None:
    """SHA-256 of the run's optimizer state file, or None when it has none."""
    return file_digest(Path(run_dir) / OPTIMIZER)


def file_digest(path: Path) -> str | None:
    """SHA-256 of the file at ``path``, or None when there is none."""
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_state(run_dir: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """The state dict and meta of a run directory, checked against each other (see the module
    docstring; runs saved before 0.3.5 carry no digests and are read unchecked)."""
    from safetensors import safe_open

    run_dir = Path(run_dir)
    weights = run_dir / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{run_dir} holds no {WEIGHTS}: not a lowbit run directory (train one with `lowbit train --out {run_dir}`)")
    meta = read_json(run_dir / META)
    if not isinstance(meta, dict):
        raise CheckpointError(f"{run_dir / META} is not a JSON object (found a {type(meta).__name__}); restore it or retrain the run")
    _check_meta_fields(meta, run_dir / META)
    want = meta.get("weights_sha256")
    if want is not None and weights_digest(run_dir) != want:
        raise CheckpointError(f"{weights} is not the file this run saved (its SHA-256 differs from {META}'s "
                              "weights_sha256: damaged on disk or copied from another run); retrain or restore it")
    try:
        state = load_file(str(weights))
        with safe_open(str(weights), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{weights} is unreadable or truncated ({e}); retrain or restore it") from e
    saved_for = header.get(REBUILD_KEY)
    if saved_for is not None and saved_for != _rebuild_digest(meta.get("model"), meta.get("quant")):
        raise CheckpointError(f"{run_dir / META} does not describe the model in {WEIGHTS} (its model or quant "
                              "entry was edited, or the files come from different runs); restore it or retrain the run")
    saved_by = header.get(VERSION_KEY)
    if saved_by is not None and saved_by != _rebuild_digest(meta.get("model"), meta.get("quant"), meta.get("lowbit")):
        raise CheckpointError(f"{run_dir / META}'s lowbit version {meta.get('lowbit')!r} is not the one that saved "
                              f"{WEIGHTS} (it says what the run's config meant); restore it or retrain the run")
    return state, meta


def _check_meta_fields(meta: dict, path: Path) -> None:
    """The shape of the meta entries that rebuild the model (a run saved before 0.3.5 has no
    digest to catch an edit): ``model`` ``{"name": str, "kwargs": dict}``, ``quant`` null or
    ``{"method": str, "config_list": list, "options": dict, "method_defaults": dict}``."""
    fix = "restore it or retrain the run"
    model, quant = meta.get("model"), meta.get("quant")
    if model is not None and not (isinstance(model, dict) and isinstance(model.get("name", ""), str)
                                  and isinstance(model.get("kwargs", {}), dict)):
        raise CheckpointError(f"{path}: 'model' must be {{\"name\": ..., \"kwargs\": {{...}}}}, found {model!r}; {fix}")
    if quant is None or quant == {}:
        return
    if not isinstance(quant, dict) or not isinstance(quant.get("method"), str) or not isinstance(quant.get("config_list"), list):
        raise CheckpointError(f"{path}: 'quant' must be null or {{\"method\": ..., \"config_list\": [...], ...}}, "
                              f"found {quant!r}; {fix}")
    for key in ("options", "method_defaults"):
        if not isinstance(quant.get(key, {}), dict):
            raise CheckpointError(f"{path}: 'quant'.{key} must be an object, found {quant[key]!r}; {fix}")


def _version(v: Any) -> tuple[int, ...]:
    """``"0.3.7"`` -> ``(0, 3, 7)`` (``"0.3.9rc1"``, ``"0.4.0+cu121"``: their leading numbers);
    ``(0,)`` for a run that recorded none (the oldest); a version without numbers (``"dev"``)
    counts as this one."""
    if v is None:
        return (0,)
    m = re.match(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?", str(v))
    if m is None:
        from . import __version__

        return tuple(int(p) for p in __version__.split(".")[:3])
    return tuple(int(p) for p in m.groups() if p is not None)


def _legacy_config(config_list: list, method: str, version: tuple[int, ...]) -> list:
    """A run's config_list as this lowbit reads it to mean what the saving version did: before
    0.3.8, ``exclude: False`` quantized (now refused as ambiguous), and QAT/PTQ symmetric
    activations without ``quant_dtype`` were unsigned (now signed)."""
    if version >= (0, 3, 8):
        return config_list
    out = []
    for e in config_list:
        if isinstance(e, dict):
            e = {k: v for k, v in e.items() if not (k == "exclude" and v is False)}
            if method in ("qat", "ptq"):
                e = _unsigned_symmetric_activations(e)
        out.append(e)
    return out


def _unsigned_symmetric_activations(entry: dict) -> dict:
    """``entry`` with ``quant_dtype: uint`` for its symmetric activation types that had no dtype."""
    scheme, dtype = entry.get("quant_scheme"), entry.get("quant_dtype")
    if scheme is None or isinstance(dtype, str):
        return entry
    unsigned = {}
    for t in ("input", "output"):
        s_t = scheme.get(t) if isinstance(scheme, dict) else scheme
        given = isinstance(dtype, dict) and dtype.get(t) is not None  # (null: not given)
        if t in (entry.get("quant_types") or []) and isinstance(s_t, str) and "symmetric" in s_t and not given:
            unsigned[t] = "uint"
    return {**entry, "quant_dtype": {**(dtype or {}), **unsigned}} if unsigned else entry


def load_model(run_dir: str | os.PathLike) -> torch.nn.Module:
    """Rebuild the model saved in ``run_dir`` (quantized if it was) with its trained state."""
    run_dir = Path(run_dir)
    state, meta = load_state(run_dir)
    spec = meta.get("model") or {}
    try:
        model = build_model(spec.get("name", "vae"), **spec.get("kwargs", {}))
    except TypeError as e:
        raise CheckpointError(f"{run_dir / META}: its model kwargs do not build the model ({e})") from e
    quant = meta.get("quant")
    if quant:
        from .quantize import quantize

        defaults = quant.get("method_defaults")
        if defaults is None:  # saved by lowbit < 0.2.0
            defaults = _LEGACY_DEFAULTS.get(quant["method"], {})
        version = _version(meta.get("lowbit"))
        if version < (0, 3, 9):  # (its layers added their float bias: bias_quant came in 0.3.9)
            defaults = {"bias_quant": "float", **defaults}
        try:
            config = _legacy_config(quant["config_list"], quant["method"], version)
            quantize(model, config, method=quant["method"], **{**defaults, **quant.get("options", {})})
        except ConfigError as e:  # a config an older lowbit accepted and this one refuses
            raise CheckpointError(f"{run_dir / META}: this lowbit refuses the run's quantization config ({e}); "
                                  "retrain the run with a config this version accepts") from e
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes that do not fit
        raise CheckpointError(f"{run_dir}: the saved state does not fit the rebuilt model ({e})") from e
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

    # (no "start afresh": a run continues its starting run's Adam, as the reference protocol does)
    fix = "retrain the run it belongs to"
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{path} is unreadable or truncated ({e}); {fix}") from e
    if "scalars" not in header or "param_groups" not in header:
        raise CheckpointError(f"{path} holds no lowbit optimizer state (its header lacks scalars/param_groups); {fix}")
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
