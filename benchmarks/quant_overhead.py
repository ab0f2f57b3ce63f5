"""Training-time overhead of simulated quantization: one VAE training epoch per method, divided
by the fp32 epoch, measured side by side in one process.

    python benchmarks/quant_overhead.py            # full epochs (60k MNIST images), 3 repetitions
    python benchmarks/quant_overhead.py --images 12800 --reps 5   # quicker
    python benchmarks/quant_overhead.py --device cuda              # on a GPU (threads do not apply)
    python benchmarks/quant_overhead.py --device cuda --cuda-graph # each step replayed as one CUDA graph
    python benchmarks/quant_overhead.py --device cuda --compile    # models through torch.compile

Variants: fp32, then W8A8 (weight and input quantized to 8 bits) with each method on the study's
layers (fc1, fc21, fc22, fc3) and on all five Linear layers, each with its own Adam optimizer
(quantizer parameters added as :func:`lowbit.quantize` does).  An epoch is the study's: shuffled
batches of 128 with ``index_select``, the VAE loss, ``zero_grad(set_to_none=True)``, backward,
step.  Every epoch is cut into ``--chunks`` consecutive slices and the variants take turns slice
by slice (alternating order), so drifting load on a shared machine hits all of them alike; an
epoch's time is the sum of its slices.  The figure is the median epoch time over ``--reps``
epochs, divided by fp32's median; "paired" is the median over all slices of the slice's time
divided by fp32's time for the same slice (adjacent in time, so slow drifts of a shared machine's
load cancel), with its interquartile range and a 95% bootstrap interval for that median (the
slices resampled, a fixed seed).  A variant is flagged "> 1.15" when the whole interval lies
above the target and "~ 1.15" when it straddles it (this run cannot tell which side it is on);
slices of one run share the machine's state of those minutes, so runs on other days spread more
than the interval.  Run at 1 thread and at 2 threads.  Target: <= 1.15 for every method.

The row ``lsq 4L, fc1 unfused`` is LSQ without its fused first layer (its quantizers called one by
one, then ``F.linear``: the input step's gradient through the dense ``dL/dx_hat``), to show what
that fusion saves; ``lsq 4L, fc1 step
frozen`` is the same model with fc1's input step not learned at all, to show what learning it
costs (not a method: LSQ learns every step).  One more fp32 row,
``fp32 + fc1 input grad``, computes the gradient with respect to the model's
input (the images), which fp32 training never needs: it is the floor for any method that learns
fc1's input quantizer (LSQ's input step needs ``dL/dx_hat`` of fc1's input, one GEMM as large as
fc1's forward pass).  Needs MNIST in ``LOWBIT_DATA_DIR`` (else uniform random images).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

import lowbit
from lowbit.models.vae import VAE

STUDY_LAYERS = ["fc1", "fc21", "fc22", "fc3"]
ALL_LAYERS = ["fc1", "fc21", "fc22", "fc3", "fc4"]
METHODS = ["qat", "dorefa", "lsq", "ptq"]


def load_images(n: int) -> torch.Tensor:
    try:
        from lowbit.data import load_dataset

        images = load_dataset("mnist", "train", download=False, progress=False).images
    except Exception as e:  # no data here: the timing does not depend on pixel values much
        print(f"(MNIST not available: {e.__class__.__name__}; timing on uniform random images)", file=sys.stderr)
        images = torch.rand(60_000, 1, 28, 28)
    return images[:n].contiguous()


class InputGrad(torch.nn.Module):
    """The model, with a gradient taken with respect to its input."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, *rest):
        return self.model(x.detach().requires_grad_(), *rest)


def make_variants(seed: int = 0, device: str = "cpu", capturable: bool = False) -> dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]]:
    from lowbit.train import make_optimizer

    if capturable:  # Adam whose step count lives on the GPU, so a CUDA graph can replay its steps
        def make_optimizer(model):  # noqa: F811
            return torch.optim.Adam(model.parameters(), 1e-3, capturable=True)

    variants = {}
    torch.manual_seed(seed)
    base = VAE()

    def fresh() -> VAE:  # a new model on the device (quantized there, as a GPU user would), base's weights
        m = VAE().to(device)
        m.load_state_dict(base.state_dict())
        return m

    def quantized(method: str, layers: list[str]) -> tuple[VAE, torch.optim.Optimizer]:  # W8A8
        m = fresh()
        opt = make_optimizer(m)
        lowbit.quantize(m, [{"quant_types": ["weight", "input"], "quant_bits": 8, "op_names": layers}], method,
                        optimizer=opt)
        return m, opt

    fp32 = fresh()
    variants["fp32"] = (fp32, make_optimizer(fp32))
    floor = fresh()
    variants["fp32 + fc1 input grad"] = (InputGrad(floor), make_optimizer(floor))
    for layers, tag in ((STUDY_LAYERS, "4 layers"), (ALL_LAYERS, "5 layers")):
        for method in METHODS:
            variants[f"{method} W8A8 {tag}"] = quantized(method, layers)
    # the same LSQ model with fc1's quantizers and matmul unfused (dense dL/dx_hat for the input
    # step, as before lowbit 0.3.1): what the fused first layer saves, measured side by side
    m, opt = variants["lsq 4L, fc1 unfused"] = quantized("lsq", STUDY_LAYERS)
    m.fc1.input_quantizer.linear_input = lambda x, w, b, weight_args=None, round_bias=False: None  # (the wrapper then quantizes, then F.linear)
    # the same LSQ model with fc1's input step frozen (not learned: no dL/dstep for the images at
    # all) — not a method lowbit offers, a measure of what learning that one step costs
    m, opt = variants["lsq 4L, fc1 step frozen"] = quantized("lsq", STUDY_LAYERS)
    m.fc1.input_quantizer.scale.requires_grad_(False)
    return variants


def median_interval(values: list[float], level: float = 0.95, draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """A percentile bootstrap interval for the median of ``values`` (resampled with a fixed seed)."""
    if len(values) < 2:
        return values[0], values[0]
    gen = torch.Generator().manual_seed(seed)
    v = torch.tensor(values, dtype=torch.float64)
    meds = v[torch.randint(0, len(values), (draws, len(values)), generator=gen)].median(dim=1).values
    tail = (1 - level) / 2
    lo, hi = torch.quantile(meds, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return lo, hi


def eager_step(model, opt, batch) -> torch.Tensor:
    from lowbit.train import vae_batch_loss

    loss = vae_batch_loss(model, batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


def graph_step(model, opt, first: torch.Tensor):
    """The training step captured once as a CUDA graph by :func:`lowbit.capture_step` (after three
    warm-up steps, which also initialise the quantizers); the VAE draws its noise inside the
    graph.  Returns ``step(batch)``."""
    from lowbit.train import vae_batch_loss

    return lowbit.capture_step(model, opt, vae_batch_loss, first)


def run(
    threads: int,
    images: torch.Tensor,
    reps: int,
    chunks: int,
    batch_size: int = 128,
    device: str = "cpu",
    cuda_graph: bool = False,
    compile: bool = False,
    only: list[str] | None = None,
    compile_mode: str | None = None,
) -> dict[str, float]:
    """Time every variant's epochs, interleaved slice by slice; print and return epoch / fp32.
    ``cuda_graph``: every variant's step is captured as a CUDA graph first (all graphs alive at
    once), then replayed (whole batches only: a graph replays fixed shapes).  ``compile``: every
    model's forward pass (quantizers included) goes through ``torch.compile`` (its backward too);
    the loss and Adam stay eager; ``compile_mode`` is torch.compile's ``mode`` (``reduce-overhead``:
inductor replays the compiled forward and backward as CUDA graphs).  ``only``: the variants whose names contain one of these
    strings (fp32 is always timed)."""
    torch.set_num_threads(threads)
    variants = make_variants(device=device, capturable=cuda_graph)
    if only:
        variants = {k: v for k, v in variants.items() if k == "fp32" or any(o in k for o in only)}
    if compile:  # every variant is another model structure: one compilation of VAE.forward each
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * len(variants))
    if cuda_graph:
        images = images[: images.shape[0] // batch_size * batch_size]
    images = images.to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    n = images.shape[0]
    steps = (n + batch_size - 1) // batch_size
    cuts = [round(i * steps / chunks) for i in range(chunks + 1)]
    for name, (model, opt) in variants.items():
        model.train()
        if compile:  # the first batch initialises ranges and steps (host reads): eagerly, then compile
            for i in range(2):
                eager_step(model, opt, images[i * batch_size : (i + 1) * batch_size])
            model.compile(mode=compile_mode)
        if cuda_graph:
            variants[name] = (model, graph_step(model, opt, images[:batch_size]))
        else:
            variants[name] = (model, lambda batch, m=model, o=opt: eager_step(m, o, batch))

    def slice_seconds(model, step_fn, perm, lo, hi):
        sync()
        start = time.perf_counter()
        for step in range(lo, hi):
            step_fn(images.index_select(0, perm[step * batch_size : (step + 1) * batch_size]))
        sync()
        return time.perf_counter() - start

    warm = torch.randperm(n).to(device)
    for model, step_fn in variants.values():  # warm-up, and the first-batch initialisation
        slice_seconds(model, step_fn, warm, 0, min(10, steps))
    times: dict[str, list[float]] = {k: [0.0] * reps for k in variants}
    slices: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for r in range(reps):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(r)).to(device)
        for c in range(chunks):
            for name in names if (r * chunks + c) % 2 == 0 else reversed(names):
                model, step_fn = variants[name]
                t = slice_seconds(model, step_fn, perm, cuts[c], cuts[c + 1])
                times[name][r] += t
                slices[name].append(t)
    base = statistics.median(times["fp32"])
    where = torch.cuda.get_device_name(device) if device.startswith("cuda") else f"{threads} thread(s)"
    if compile:
        where += f", models compiled (torch.compile{', mode=' + compile_mode if compile_mode else ''})"
    if cuda_graph:
        where += ", each step one CUDA graph replay"
    print(f"\n{where}, {n} images per epoch, median of {reps} epochs (interleaved in {chunks} slices)")
    print(f"{'variant':<24} {'epoch s':>9} {'/ fp32':>8} {'paired':>8} {'IQR':>13} {'95% interval':>13}")
    ratios = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        ratios[name] = med / base
        # the same slice of the same epoch, run minutes apart at most: drift of the machine's load
        # cancels in these ratios; their median and interquartile range
        paired = [a / b for a, b in zip(slices[name], slices["fp32"])]
        q = statistics.quantiles(paired, n=4) if len(paired) > 1 else [paired[0]] * 3
        lo, hi = median_interval(paired)
        flag = "" if name.startswith("fp32") or hi <= 1.15 else "  > 1.15" if lo > 1.15 else "  ~ 1.15"
        print(f"{name:<24} {med:9.3f} {med / base:8.3f} {statistics.median(paired):8.3f} "
              f"{q[0]:6.3f}-{q[2]:.3f} {lo:6.3f}-{hi:.3f}{flag}")
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=60_000, help="images per epoch (default: all 60,000)")
    parser.add_argument("--reps", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--chunks", type=int, default=10, help="slices per epoch for interleaving (default 10)")
    parser.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="with --device cuda: capture each variant's training step as a CUDA graph and replay it")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile every model (on the CPU, inside lowbit.fake_quant.tensor_path(), "
                             "the path torch.compile traces without graph breaks)")
    parser.add_argument("--compile-mode", default=None,
                        help="with --compile: torch.compile's mode, e.g. reduce-overhead (CUDA graphs by inductor)")
    parser.add_argument("--variants", nargs="*", default=None,
                        help="time only the variants whose names contain one of these (fp32 always), "
                             "e.g. --variants '4 layers'")
    args = parser.parse_args()
    if args.compile_mode and not args.compile:
        parser.error("--compile-mode needs --compile")
    if args.cuda_graph and not args.device.startswith("cuda"):
        parser.error("--cuda-graph needs --device cuda")
    images = load_images(args.images)
    from lowbit import kernels

    state = "on" if kernels.available() else "off (LOWBIT_KERNELS=0 or no compiler): the PyTorch code"
    if args.compile or args.device != "cpu":
        state = "not used (the tensor path: " + ("a GPU" if args.device != "cpu" else "--compile") + ")"
    print(f"torch {torch.__version__}, lowbit {lowbit.__version__}, {os.cpu_count()} CPUs, fused kernels {state}")
    if args.device != "cpu":
        print(f"device {args.device}: {torch.cuda.get_device_name(args.device)}")
        run(torch.get_num_threads(), images, args.reps, args.chunks, device=args.device, cuda_graph=args.cuda_graph,
            compile=args.compile, only=args.variants, compile_mode=args.compile_mode)
        return
    from contextlib import nullcontext

    from lowbit.fake_quant import tensor_path

    with tensor_path() if args.compile else nullcontext():  # (the host path's .item() would break the graph)
        for t in args.threads:
            run(t, images, args.reps, args.chunks, compile=args.compile, only=args.variants,
                compile_mode=args.compile_mode)


if __name__ == "__main__":
    main()
