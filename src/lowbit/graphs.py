"""A whole training step — forward with its quantizers, backward, optimizer step — captured once as
a CUDA graph and replayed: one launch per step instead of hundreds of small kernels.

A quantized model's step on a GPU is bound by kernel launches, not by arithmetic (each quantizer
adds a dozen elementwise kernels over small tensors); replaying the step as one graph removes that
cost (``docs/QUANTIZERS.md`` has the figures).  :func:`capture_step` does the parts that are easy to
get wrong:

* warm-up steps on a side stream before capture (they also initialise ranges and LSQ steps,
  which read values back to the host and cannot be captured);
* checks first, with errors that say what to change: a non-capturable optimizer, a quantizer that
  has seen no data, or one whose state counts in Python (QAT's ``quant_start_step`` before it
  has passed, PTQ's percentile averaging) and so would not advance inside a replay;
* the references a graph does not hold: it reads and writes the model's parameters, gradients
  and the optimizer's state by address, so the returned step keeps model and optimizer alive
  (dropping the optimizer would free its state under the graph: NaN or an illegal memory access).

Replays have fixed shapes: every batch must have the example's shape (drop the last partial batch).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["CaptureError", "CapturedStep", "capture_step", "capture_problems"]

Inputs = Tensor | Sequence[Tensor]


class CaptureError(ValueError):
    """The model, optimizer or inputs cannot be captured as a CUDA graph (the message says why)."""


def _as_tuple(inputs: Inputs) -> tuple[Tensor, ...]:
    return (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)


def capture_problems(model: nn.Module, optimizer: torch.optim.Optimizer, steps_ahead: int = 0) -> list[str]:
    """What stands in the way of capturing ``model``'s training step with ``optimizer`` after
    ``steps_ahead`` more eager training steps (empty when nothing does): one line each, naming the
    layer or parameter group and the fix."""
    from .quantize import quantized_layers

    problems = []
    for i, group in enumerate(optimizer.param_groups):
        if group.get("capturable") is False:
            problems.append(
                f"the optimizer's parameter group {i} is not capturable: create the optimizer with "
                f"capturable=True, e.g. torch.optim.{type(optimizer).__name__}(params, lr, capturable=True)"
            )
    for name, layer in quantized_layers(model).items():
        for kind, quantizer in layer.quantizers().items():
            reason = quantizer.replay_problem(steps_ahead)
            if reason:
                problems.append(f"{name}'s {kind} quantizer {reason}")
    return problems


class CapturedStep:
    """One training step as a CUDA graph: ``step(*batch)`` copies the batch into the graph's input
    buffers, replays forward, backward and the optimizer step, and returns the loss — a tensor on
    the device, overwritten by the next replay (``.item()`` it, or ``.clone()`` it to keep it)."""

    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: tuple[Tensor, ...], loss: Tensor,
                 model: nn.Module, optimizer: torch.optim.Optimizer, warmup_losses: list[float]) -> None:
        self.graph = graph
        self.inputs = inputs
        self.loss = loss
        #: the losses of the eager warm-up steps, in order
        self.warmup_losses = warmup_losses
        # a graph holds no references to the tensors it reads and writes: keep what it updates
        self.model = model
        self.optimizer = optimizer

    def __call__(self, *batch: Tensor) -> Tensor:
        if len(batch) != len(self.inputs):
            raise CaptureError(f"this step was captured with {len(self.inputs)} input(s), got {len(batch)}")
        for i, (static, x) in enumerate(zip(self.inputs, batch)):
            if x.shape != static.shape or x.dtype != static.dtype:
                raise CaptureError(
                    f"input {i} has shape {list(x.shape)} ({x.dtype}); the step was captured with "
                    f"{list(static.shape)} ({static.dtype}): a CUDA graph replays fixed shapes — "
                    "drop the last partial batch (drop_last=True) or capture another step for it"
                )
            static.copy_(x)
        self.graph.replay()
        return self.loss


def capture_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[..., Tensor],
    example: Inputs,
    *,
    warmup: int | Iterable[Inputs] = 3,
) -> CapturedStep:
    """Capture ``loss_fn(model, *batch).backward(); optimizer.step()`` as a CUDA graph.

    ``example`` (a tensor or a tuple of tensors on the GPU) fixes the shapes of every later batch.
    ``warmup``: eager training steps run first (on a side stream, as CUDA graphs need; they
    initialise the quantizers): a number of steps on ``example``, or the batches to train on
    (e.g. the epoch's first ones; their losses are in ``warmup_losses``).  These are real
    training steps.  Random numbers drawn inside ``loss_fn`` (``torch.randn``) are fresh at every
    replay.  Raises :class:`CaptureError` before anything runs if the step cannot be captured
    (and again after the warm-up, should the quantizers still not be ready).
    """
    static = tuple(x.detach().clone() for x in _as_tuple(example))
    if isinstance(warmup, int):
        if warmup < 0:
            raise CaptureError(f"warmup must be >= 0 steps, got {warmup}")
        batches: list[tuple[Tensor, ...]] = [static] * warmup
    else:
        batches = [_as_tuple(b) for b in warmup]
    params = list(model.parameters())
    if not torch.cuda.is_available() or not params or any(p.device.type != "cuda" for p in params) \
            or any(x.device.type != "cuda" for x in static):
        raise CaptureError("capture_step needs the model and the example on a CUDA device (a CUDA graph); "
                           "on the CPU, train eagerly")
    _raise_problems(capture_problems(model, optimizer, len(batches)))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    losses = []
    with torch.cuda.stream(side):
        for batch in batches:
            losses.append(_eager_step(model, optimizer, loss_fn, batch))
    torch.cuda.current_stream().wait_stream(side)
    _raise_problems(capture_problems(model, optimizer))  # (e.g. a model in eval mode initialised nothing)
    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)  # the backward allocates the gradients in the graph's pool
    with torch.cuda.graph(graph):
        static_loss = loss_fn(model, *static)
        static_loss.backward()
        optimizer.step()
    return CapturedStep(graph, static, static_loss.detach(), model, optimizer, [float(x) for x in losses])


def _eager_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable[..., Tensor],
                batch: tuple[Tensor, ...]) -> Tensor:
    loss = loss_fn(model, *batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()  # (not the loss: its autograd graph would keep the step's buffers alive)


def _raise_problems(problems: list[str]) -> None:
    if problems:
        raise CaptureError("this training step cannot be replayed as a CUDA graph:\n  " + "\n  ".join(problems))
