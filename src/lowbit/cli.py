"""``lowbit`` command line: argument parsing only; every command calls the library."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__

EXAMPLES = """\
examples:
  lowbit train --epochs 10 --seed 0 --out runs/fp32
  lowbit train --init runs/fp32 --method lsq --config C1 --epochs 10 --out runs/lsq-c1
  lowbit study --out runs/study                 # the reference study, done honestly
  lowbit study --quick --out /tmp/smoke         # 1 epoch each, a smoke test
  lowbit export runs/lsq-c1 --format onnx-int8 --out lsq.onnx
  lowbit bench runs/lsq-c1

data: MNIST is read from --data-dir, else $LOWBIT_DATA_DIR, else the per-user cache
(~/.cache/lowbit), downloading it there when online.
"""


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 8,4,3,2, got {text!r}") from None
    if not values or any(not 1 <= v <= 16 for v in values):
        raise argparse.ArgumentTypeError(f"bit widths must lie in 1..16, got {text!r}")
    return list(dict.fromkeys(values))  # (a width named twice is studied once)


def _option(text: str) -> tuple[str, object]:
    """``KEY=VALUE``; the value is read as JSON when it parses (numbers, true/false, null, lists),
    else kept as a string: ``dorefa_variant=paper``, ``quant_start_step=200``, ``lsq_plus=true``."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. dorefa_variant=paper), got {text!r}")
    python_literals = {"True": True, "False": False, "None": None}  # lsq_plus=True as in Python
    if raw.strip() in python_literals:
        return key.strip(), python_literals[raw.strip()]
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def _add_option_arg(p: argparse.ArgumentParser, where: str) -> None:
    p.add_argument("--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                   help=f"a method option {where}, repeatable (e.g. dorefa_variant=paper, quant_start_step=200, "
                        "lsq_plus=true, weight_range=reduced; see docs/QUANTIZERS.md)")


def _add_data_args(p: argparse.ArgumentParser, threads: str = "torch's choice") -> None:
    p.add_argument("--dataset", default="mnist", choices=["mnist", "fashion-mnist"], help="data set (default mnist)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="folder with the four IDX files, the only one searched when given (default: $LOWBIT_DATA_DIR, "
                        "then the user cache)")
    p.add_argument("--threads", type=_positive_int, default=None, help=f"torch threads (default: {threads})")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu",
                   help="where runs train and evaluate: cpu (default), cuda or cuda:N (results differ from the CPU's "
                        "in the last bits; a study's finished runs are only reused on the same device)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lowbit",
        description="Quantization-aware training (QAT, DoReFa, LSQ, PTQ) with a real integer export.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"lowbit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    t = sub.add_parser("train", help="train (or quantize and fine-tune) the VAE, evaluate, save a run",
                       description="Train the VAE (optionally starting from a run and quantized), evaluate "
                       "it on the test set, print a table and save checkpoint + metrics.json in --out.")
    t.add_argument("--epochs", type=_positive_int, default=10, help="training epochs (default 10)")
    t.add_argument("--batch-size", type=_positive_int, default=128, help="batch size (default 128)")
    t.add_argument("--lr", type=_positive_float, default=1e-3, help="Adam learning rate (default 1e-3)")
    t.add_argument("--seed", type=int, default=0, help="seed for shuffling and noise (default 0)")
    t.add_argument("--out", type=Path, default=Path("runs/fp32"), help="run folder to write (default runs/fp32)")
    t.add_argument("--iwae-k", type=_nonneg_int, default=64, help="samples for the IWAE bound, 0 to skip (default 64)")
    t.add_argument("--init", type=Path, default=None, help="start from this run folder (weights and Adam state)")
    t.add_argument("--method", default=None, help="quantize with this method: qat, dorefa, lsq, ptq")
    t.add_argument("--config", default=None,
                   help="config list: a preset (C0 = 8 bit, C1 = 4 bit, as in the reference study), "
                        "a JSON file or a JSON string (default C0)")
    _add_option_arg(t, "for every config entry")
    _add_data_args(t)
    _add_device_arg(t)

    s = sub.add_parser("study", help="run the reference study (and more) and write a report",
                       description="Run the reference study: an fp32 baseline per seed, each method x bit "
                       "width fine-tuned from it, an equal-budget fp32 control and PTQ; resumable; writes "
                       "one JSON per run and report.md with figures in --out.")
    s.add_argument("--out", type=Path, default=Path("runs/study"), help="study folder (default runs/study)")
    s.add_argument("--methods", default="qat,dorefa,lsq", help="methods, comma-separated (default qat,dorefa,lsq)")
    s.add_argument("--bits", type=_int_list, default=None, help="bit widths, e.g. 8,4,3,2 (default 8,4)")
    s.add_argument("--layers", choices=["reference", "all"], default="reference",
                   help="reference: as the study (fc4 float for QAT/LSQ); all: every Linear")
    s.add_argument("--granularity", choices=["per_tensor", "per_channel"], default=None,
                   help="weight granularity (default: each method's own)")
    s.add_argument("--seeds", type=_positive_int, default=1, help="seeds per cell (default 1)")
    s.add_argument("--epochs", type=_positive_int, default=None, help="fp32 baseline epochs (default 10)")
    s.add_argument("--finetune-epochs", type=_positive_int, default=None,
                   help="quantized fine-tuning epochs (default 10)")
    s.add_argument("--preset", choices=["default", "reference"], default="default",
                   help="reference: a fresh baseline per run, exactly as the reference protocol")
    s.add_argument("--quick", action="store_true", help="1 epoch each, for smoke tests")
    s.add_argument("--no-ptq", action="store_true", help="skip the PTQ runs")
    s.add_argument("--no-control", action="store_true", help="skip the equal-budget fp32 control")
    s.add_argument("--no-deploy", action="store_true", help="skip the real-deployment (ONNX) table")
    s.add_argument("--iwae-k", type=_nonneg_int, default=None, help="IWAE samples (default 64; --quick 8)")
    _add_option_arg(s, "(each goes to the methods that accept it)")
    _add_data_args(s)
    _add_device_arg(s)

    e = sub.add_parser("export", help="export a quantized run to ONNX with real integer weights",
                       description="Write a QDQ ONNX model (int8, or packed int4 weights) that ONNX Runtime "
                       "runs with integer kernels.")
    e.add_argument("run_dir", type=Path, help="a run folder written by lowbit train/study")
    e.add_argument("--format", choices=["onnx-int8", "onnx-int4", "onnx-fp32"], default="onnx-int8")
    e.add_argument("--out", type=Path, required=True, help="the .onnx file to write")

    b = sub.add_parser("bench", help="deployment benchmark: torch fp32 vs ONNX Runtime fp32/int8/int4",
                       description="Side by side on the 10,000 test images: test loss, throughput at batch "
                       "10,000, latency at batch 1, file size.")
    b.add_argument("run_dir", type=Path, help="a run folder written by lowbit train/study")
    b.add_argument("--int4-run", type=Path, default=None,
                   help="a run quantized to <= 4-bit weights for the int4 row (default: RUN_DIR itself if it is)")
    b.add_argument("--repeats", type=_positive_int, default=5, help="interleaved repetitions (default 5)")
    b.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    _add_data_args(b, threads="1, for every row alike")
    return parser


def _setup(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def cmd_train(args: argparse.Namespace) -> None:
    from .data import load_dataset
    from .experiment import RunSpec, run_experiment
    from .presets import resolve_config
    from .report import print_run_table

    if args.method:
        from .methods import get_method

        get_method(args.method)  # an unknown method is named as such, before its config is looked up
    config = resolve_config(args.method, args.config) if args.method else None
    if args.config and not args.method:
        raise ValueError("--config needs --method (qat, dorefa, lsq or ptq)")
    if args.option and not args.method:
        raise ValueError("--option needs --method (qat, dorefa, lsq or ptq)")
    spec = RunSpec(name=args.out.name, epochs=args.epochs, method=args.method, config_list=config,
                   options=dict(args.option), seed=args.seed, batch_size=args.batch_size, lr=args.lr,
                   iwae_k=args.iwae_k, dataset=args.dataset, device=args.device)
    from .checkpoint import ensure_dir

    created = not args.out.exists()
    ensure_dir(args.out)  # an unusable --out fails now, not after training
    try:
        train = load_dataset(args.dataset, "train", args.data_dir, progress=not args.no_progress)
        test = load_dataset(args.dataset, "test", args.data_dir, progress=not args.no_progress)
        record = run_experiment(spec, train.images, test.images, args.out, init=args.init,
                                progress=not args.no_progress)
    except BaseException:
        if created and not any(args.out.iterdir()):
            args.out.rmdir()  # a run that failed before writing anything leaves no empty folder
        raise
    from .checkpoint import write_json

    write_json(args.out / "metrics.json", {"before": record["before"], "after": record["after"],
                                            "train": record["train"]})
    print_run_table(record)


def cmd_study(args: argparse.Namespace) -> None:
    from .study import StudyConfig, run_study

    run_study(StudyConfig.from_args(args))


def cmd_export(args: argparse.Namespace) -> None:
    from .export import export_run

    path = export_run(args.run_dir, args.out, args.format)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.3f} MB)")


def cmd_bench(args: argparse.Namespace) -> None:
    from .bench import bench_cli

    bench_cli(args)


COMMANDS = {"train": cmd_train, "study": cmd_study, "export": cmd_export, "bench": cmd_bench}

#: Errors that are the user's to fix: printed as one clear line, exit status 2.
USER_ERRORS = ("DataError", "ConfigError", "CheckpointError", "ExportError", "NotCalibratedError")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup(args)
    try:
        COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted; finished runs are kept, the same command resumes", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, PermissionError) as e:
        print(f"lowbit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - only our own error types are shown as user errors
        if type(e).__name__ in USER_ERRORS:
            print(f"lowbit {args.command}: error: {e}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
