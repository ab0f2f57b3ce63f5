"""lowbit's fused CPU kernels: one pass per quantizer each way, autograd in C++.

The per-tensor float32 quantizers on the CPU (QAT/PTQ weights and activations, LSQ's learned
steps, DoReFa's tanh and learned clip) run as a few elementwise PyTorch passes plus a Python
autograd function per call; ``csrc/fused_quant.cpp`` does each in one vectorised pass forward and
one backward, with the same values (tested) — see ``docs/QUANTIZERS.md`` for the measured gain.
``lsq_linear`` and ``clipped_linear`` run a quantized Linear layer (the input's LSQ or fixed-grid
quantization, the weight's LSQ — on tanh for DoReFa — or fixed grid, and the layer) as one call and
one autograd node, and learn a first layer's input step without the dense gradient with respect to
the images; ``range_grid`` is ``range_quant``'s observation alone, for them.

The extension is compiled on first use with PyTorch's JIT builder (a C++ compiler, the Python
headers and ninja are needed; about 40 s once) and cached in ``~/.cache/lowbit/kernels`` (or
``$LOWBIT_KERNELS_DIR``).  ``LOWBIT_KERNELS`` selects:

* ``auto`` (default) — use the kernels if they build, else warn once and use the PyTorch code;
* ``0`` — never (the PyTorch code everywhere);
* ``1`` — required: an error if they do not build (CI uses this, so a broken build is loud).

Every caller goes through :func:`get`, which returns the module or ``None``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["get", "available", "in_use", "disabled", "KernelBuildError", "mode"]

_SOURCE = Path(__file__).with_name("csrc") / "fused_quant.cpp"
_UNSET = object()
_module: object = _UNSET


class KernelBuildError(RuntimeError):
    """The fused kernels were required (``LOWBIT_KERNELS=1``) and could not be built."""


def mode() -> str:
    """``"auto"``, ``"0"`` or ``"1"`` from ``$LOWBIT_KERNELS`` (anything else is an error)."""
    raw = os.environ.get("LOWBIT_KERNELS", "auto").strip().lower()
    aliases = {"": "auto", "auto": "auto", "0": "0", "off": "0", "false": "0", "1": "1", "on": "1", "true": "1"}
    if raw not in aliases:
        raise ValueError(f"LOWBIT_KERNELS must be auto, 0 or 1, got {raw!r}")
    return aliases[raw]


def _flags() -> list[str]:
    # -ffp-contract=off: no fused multiply-add, so the range arithmetic rounds as lowbit's Python does
    flags = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off", "-fopenmp"]
    # vector width from what torch itself dispatches to on this CPU (no -march=native: a cache
    # directory may be shared by machines of different CPUs; the tag below includes this)
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    return flags


def _build_dir(name: str) -> Path:
    root = os.environ.get("LOWBIT_KERNELS_DIR") or Path.home() / ".cache" / "lowbit" / "kernels"
    path = Path(root) / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def _ninja_on_path() -> None:
    """PyTorch's builder runs ``ninja`` from PATH; the ``ninja`` wheel puts it beside the venv's
    python, which is not on PATH when the venv is not activated."""
    if shutil.which("ninja"):
        return
    candidates = [Path(sys.executable).parent]
    try:
        import ninja  # type: ignore[import-not-found]

        candidates.insert(0, Path(ninja.BIN_DIR))
    except Exception:
        pass
    for d in candidates:
        if (d / "ninja").exists():
            os.environ["PATH"] = f"{d}{os.pathsep}{os.environ.get('PATH', '')}"
            return


def _extension_name(flags: list[str]) -> str:
    """A name per source, flags, torch and Python: a change of any of them builds anew."""
    key = hashlib.sha256()
    key.update(_SOURCE.read_bytes())
    key.update(" ".join(flags).encode())
    key.update(torch.__version__.encode())
    key.update(sys.version.encode())
    return f"lowbit_fused_{key.hexdigest()[:12]}"


#: a build lock older than this is left over from a killed build (a build takes about 40 s)
STALE_LOCK_SECONDS = 300


def _clear_stale_lock(build: Path) -> None:
    """PyTorch's builder waits as long as its lock file exists; a build killed hard (SIGKILL, power
    loss) leaves it behind, and every later process would wait forever."""
    lock = build / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_SECONDS:
        print(f"lowbit: removing a stale build lock ({lock}, {age:.0f} s old)", file=sys.stderr)
        lock.unlink(missing_ok=True)


def _load() -> ModuleType:
    from torch.utils import cpp_extension

    flags = _flags()
    name = _extension_name(flags)
    build = _build_dir(name)
    _clear_stale_lock(build)
    # compile a copy kept in the build folder: the build rules name the source's path, so building
    # from each checkout's own file would rebuild whenever another checkout (or venv) loads it
    source = build / "fused_quant.cpp"
    text = _SOURCE.read_bytes()
    if not source.exists() or source.read_bytes() != text:
        tmp = source.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(text)
        os.replace(tmp, source)
    if not any(build.glob(f"{name}*.so")):
        print("lowbit: compiling the fused CPU quantization kernels (once, about 40 s)...", file=sys.stderr, flush=True)
    _ninja_on_path()
    return cpp_extension.load(
        name=name,
        sources=[str(source)],
        extra_cflags=flags,
        extra_ldflags=["-fopenmp"],
        build_directory=str(build),
        verbose=False,
    )


def get() -> ModuleType | None:
    """The compiled kernels, or ``None`` when disabled or (in ``auto`` mode) not buildable here."""
    global _module
    if _module is _UNSET:
        m = mode()
        if m == "0":
            _module = None
        else:
            try:
                _module = _load()
            except Exception as e:  # compiler, headers, ninja missing; a compile error
                if m == "1":
                    raise KernelBuildError(f"LOWBIT_KERNELS=1 but the fused kernels did not build: {e}") from e
                warnings.warn(
                    "lowbit: the fused CPU kernels could not be built "
                    f"({e.__class__.__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}); "
                    "using the slower PyTorch code (same values). Set LOWBIT_KERNELS=0 to silence this.",
                    RuntimeWarning,
                    stacklevel=2,
                )
                _module = None
    return _module  # type: ignore[return-value]


def in_use() -> bool | None:
    """Whether the kernels have run in this process: ``True`` (loaded), ``False`` (off or not
    buildable), ``None`` (no quantizer has asked yet) — without building them."""
    return None if _module is _UNSET else _module is not None


def available() -> bool:
    """Whether :func:`get` returns the kernels."""
    return get() is not None


@contextmanager
def disabled() -> Iterator[None]:
    """Within this block :func:`get` returns ``None``: the PyTorch code runs (tests compare both)."""
    global _module
    saved = _module
    _module = None
    try:
        yield
    finally:
        _module = saved
