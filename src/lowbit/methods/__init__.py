"""Quantization methods, by name: ``qat``, ``dorefa``, ``lsq``, ``ptq``.

Adding a method touches only this folder: subclass :class:`~lowbit.methods.base.Method`,
decorate it with :func:`~lowbit.methods.base.register_method`, import it here.
"""

from __future__ import annotations

from .base import METHODS, Method, NotCalibratedError, Option, Quantizer, RangeQuantizer, get_method, register_method
from .dorefa import DoReFa
from .lsq import LSQ
from .ptq import PTQ
from .qat import QAT

__all__ = [
    "METHODS",
    "Method",
    "Option",
    "Quantizer",
    "RangeQuantizer",
    "NotCalibratedError",
    "get_method",
    "register_method",
    "QAT",
    "DoReFa",
    "LSQ",
    "PTQ",
]
