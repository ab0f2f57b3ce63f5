"""Named config lists: the reference study's configurations, verbatim, and their generalisations.

``reference_config(method, bits)`` gives the reference study's config list for ``method`` with
its bit width replaced (C0 = 8 bits, C1 = 4 bits).  ``layers="all"`` also quantizes fc4, which
the reference left in float for QAT and LSQ.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

__all__ = ["REFERENCE", "REFERENCE_LOSS", "REFERENCE_EPOCHS", "reference_loss", "reference_config", "resolve_config", "METHOD_QUANT_TYPES"]

#: The six config lists of SEED_STUDY.md, as the reference study wrote them.
REFERENCE: dict[tuple[str, str], list[dict]] = {
    ("qat", "C0"): [{"quant_types": ["input", "weight"], "quant_bits": {"input": 8, "weight": 8},
                     "op_names": ["fc1", "fc21", "fc22", "fc3"]}],
    ("qat", "C1"): [{"quant_types": ["input", "weight"], "quant_bits": {"input": 4, "weight": 4},
                     "op_names": ["fc1", "fc21", "fc22", "fc3"]}],
    ("dorefa", "C0"): [{"quant_types": ["weight"], "quant_bits": {"weight": 8}, "op_types": ["Linear"]}],
    ("dorefa", "C1"): [{"quant_types": ["weight"], "quant_bits": {"weight": 4}, "op_types": ["Linear"]}],
    ("lsq", "C0"): [{"quant_types": ["input", "weight"], "quant_bits": {"input": 8, "weight": 8},
                     "op_names": ["fc1", "fc21", "fc22", "fc3"]}],
    ("lsq", "C1"): [{"quant_types": ["input", "weight"], "quant_bits": {"input": 4, "weight": 4},
                     "op_names": ["fc1", "fc21", "fc22", "fc3"]}],
}

#: The reference study's published test losses (nats per image, MNIST), before and after
#: quantized fine-tuning, as SEED_STUDY.md reports them (NNI 2.x, one run each, no seed given).
#: Quoted for comparison in the report; lowbit never uses them to compute anything.
REFERENCE_LOSS: dict[tuple[str, str], tuple[float, float]] = {
    ("qat", "C0"): (105.47, 103.92),
    ("qat", "C1"): (105.61, 111.31),
    ("dorefa", "C0"): (105.59, 105.73),
    ("dorefa", "C1"): (105.62, 106.02),
    ("lsq", "C0"): (105.75, 104.58),
    ("lsq", "C1"): (105.33, 108.04),
}


#: the reference protocol's training: 10 fp32 epochs, then 10 with the quantizers
REFERENCE_EPOCHS = (10, 10)


def reference_loss(method: str | None, config_list: list | None, dataset: str = "mnist",
                   epochs: tuple[int, int] = REFERENCE_EPOCHS) -> float | None:
    """The reference study's loss after fine-tuning for this exact config list (one of its six,
    on MNIST) after as many epochs (``(fp32, fine-tuning)``), or None: a run trained otherwise is
    not comparable with it (a ``--quick`` study's 1 + 1 epochs lie nats above it)."""
    if dataset != "mnist" or method is None or tuple(epochs) != REFERENCE_EPOCHS:
        return None
    for (m, c), cfg in REFERENCE.items():
        if m == method and cfg == config_list:
            return REFERENCE_LOSS[(m, c)][1]
    return None


#: What each method quantizes in the reference protocol (PTQ follows QAT/LSQ).
METHOD_QUANT_TYPES = {"qat": ("input", "weight"), "lsq": ("input", "weight"), "ptq": ("input", "weight"),
                      "dorefa": ("weight",)}

VAE_LAYERS = ["fc1", "fc21", "fc22", "fc3", "fc4"]


def reference_config(method: str, bits: int, layers: str = "reference", granularity: str | None = None,
                     **extra) -> list[dict]:
    """The reference config list for ``method`` at ``bits`` bits.

    Args:
        layers: ``"reference"`` (as in the study: fc1-fc3 for QAT/LSQ/PTQ, every Linear for DoReFa)
            or ``"all"`` (every Linear layer, fc4 included).
        granularity: ``"per_tensor"`` / ``"per_channel"`` for weights, or None for the method's default.
        extra: more keys for the entry (e.g. ``weight_range="reduced"``).
    """
    if method not in METHOD_QUANT_TYPES:
        raise ValueError(f"no reference config for method {method!r}; known: {', '.join(METHOD_QUANT_TYPES)}")
    if layers not in ("reference", "all"):
        raise ValueError(f"layers must be 'reference' or 'all', got {layers!r}")
    types = list(METHOD_QUANT_TYPES[method])
    entry: dict = {"quant_types": types, "quant_bits": {t: bits for t in types}}
    if method == "dorefa" or layers == "all":
        entry["op_types"] = ["Linear"]
    else:
        entry["op_names"] = VAE_LAYERS[:4]
    if granularity:  # (the weights': activations are per-tensor in every method)
        entry["granularity"] = {"weight": granularity}
    entry.update(extra)
    return [entry]


def resolve_config(method: str, config: str | list | None) -> list[dict]:
    """A config list from a preset name (``C0``, ``C1``), a JSON file, a JSON string or a list."""
    if config is None:
        config = "C0"
    if isinstance(config, list):
        return copy.deepcopy(config)
    key = (method, config.upper())
    if key in REFERENCE:
        return copy.deepcopy(REFERENCE[key])
    if method == "ptq" and config.upper() in ("C0", "C1"):
        return reference_config("ptq", 8 if config.upper() == "C0" else 4)
    path = Path(config)
    text = path.read_text() if path.is_file() else config
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise ValueError(
            f"--config {config!r} is neither a preset (C0, C1), an existing JSON file, nor a JSON config list"
        ) from None
    if not isinstance(value, list):
        raise ValueError("a config list must be a JSON list of objects (NNI's config_list format)")
    return value
