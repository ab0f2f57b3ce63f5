"""``lowbit study``: the reference study in one command, with an equal-budget control, PTQ and seeds.

The study is a plan of runs (:func:`plan_runs`), each a :class:`~lowbit.experiment.RunSpec` with
a run folder and, for fine-tuning runs, the baseline it starts from.  Each finished run leaves
``result.json`` (written last, atomically) whose ``key`` digests the run's whole configuration
and its baseline's key: re-running the same command skips runs whose record matches, so a killed
study resumes where it stopped and a changed configuration is redone, never mistaken for done.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint import (META, CheckpointError, ensure_dir, load_state, optimizer_digest, read_json, weights_digest,
                         write_json)
from .experiment import EVAL_FIELDS, RECORD, RunSpec, check_device, machine_info, reevaluate, run_experiment
from .methods import get_method
from .presets import REFERENCE, reference_config

__all__ = ["StudyConfig", "PlannedRun", "plan_runs", "run_study", "load_records"]

METHODS = ("qat", "dorefa", "lsq", "ptq")


@dataclass(frozen=True)
class StudyConfig:
    """Everything ``lowbit study`` needs; validated once in ``__post_init__``."""

    out: Path = Path("runs/study")
    methods: tuple[str, ...] = ("qat", "dorefa", "lsq")
    bits: tuple[int, ...] = (8, 4)
    layers: str = "reference"
    granularity: str | None = None
    seeds: int = 1
    epochs: int = 10
    finetune_epochs: int = 10
    preset: str = "default"
    ptq: bool = True
    control: bool = True
    deploy: bool = True
    iwae_k: int = 64
    dataset: str = "mnist"
    data_dir: Path | None = None
    progress: bool = True
    extra_options: dict = field(default_factory=dict)
    device: str = "cpu"

    def __post_init__(self) -> None:
        check_device(self.device)
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"unknown method(s) {', '.join(bad)}; choose from {', '.join(METHODS)}")
        if not self.methods and not self.ptq and not self.control:
            raise ValueError("nothing to study: give at least one method (--methods qat,dorefa,lsq)")
        if any(not 1 <= b <= 16 for b in self.bits) or not self.bits:
            raise ValueError(f"bit widths must lie in 1..16, got {self.bits}")
        for name in ("seeds", "epochs", "finetune_epochs"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.preset not in ("default", "reference"):
            raise ValueError(f"preset must be 'default' or 'reference', got {self.preset!r}")
        if self.iwae_k < 0:
            raise ValueError(f"iwae_k must be >= 0, got {self.iwae_k}")
        if self.granularity == "per_channel" and "dorefa" in self.methods:
            raise ValueError("DoReFa's weight grid is per layer (per-tensor only): study it without --granularity "
                             "per_channel, or leave dorefa out of --methods")
        studied = list(self.methods) + (["ptq"] if self.ptq else [])
        for key in self.extra_options:
            if not any(key in get_method(m).options for m in studied):
                known = sorted({k for m in studied for k in get_method(m).options})
                raise ValueError(f"option {key!r} belongs to none of the studied methods ({', '.join(studied)}); "
                                 f"their options: {', '.join(known)}")
            opt = next(get_method(m).options[key] for m in studied if key in get_method(m).options)
            if not opt.check(self.extra_options[key]):
                raise ValueError(f"option {key}={self.extra_options[key]!r}: expected {opt.expected}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "StudyConfig":
        # (a method named twice is studied once: dict keeps the first of each, in order)
        methods = tuple(dict.fromkeys(m.strip().lower() for m in args.methods.split(",") if m.strip()))
        if not methods:
            raise ValueError(f"--methods {args.methods!r} names no method; give e.g. --methods qat,dorefa,lsq (or ptq)")
        ptq = not args.no_ptq
        if "ptq" in methods:  # asked for explicitly: it is planned once per bit width either way
            methods = tuple(m for m in methods if m != "ptq")
            ptq = True
        quick = args.quick
        return cls(
            out=args.out,
            methods=methods,
            bits=tuple(args.bits or (8, 4)),
            layers=args.layers,
            granularity=args.granularity,
            seeds=args.seeds,
            epochs=args.epochs or (1 if quick else 10),
            finetune_epochs=args.finetune_epochs or (1 if quick else 10),
            preset=args.preset,
            ptq=ptq,
            control=not args.no_control,
            deploy=not args.no_deploy,
            iwae_k=args.iwae_k if args.iwae_k is not None else (8 if quick else 64),
            dataset=args.dataset,
            data_dir=args.data_dir,
            progress=not args.no_progress,
            extra_options=dict(getattr(args, "option", None) or []),
            device=getattr(args, "device", None) or "cpu",
        )


@dataclass(frozen=True)
class PlannedRun:
    """One run of the plan: its spec, folder (relative to the study's), and baseline (a run name)."""

    spec: RunSpec
    folder: str
    init: str | None = None
    kind: str = "quantized"  # baseline | control | quantized | ptq
    bits: int | None = None


def _config_for(method: str, bits: int, cfg: StudyConfig) -> list[dict]:
    """The reference config list verbatim at 8/4 bits (C0/C1), its generalisation otherwise."""
    if cfg.layers == "reference" and cfg.granularity is None and bits in (8, 4) and method != "ptq":
        return REFERENCE[(method, "C0" if bits == 8 else "C1")]
    return reference_config(method, bits, cfg.layers, cfg.granularity)


def _options_for(method: str, cfg: StudyConfig) -> dict:
    """The study's ``--option`` values that ``method`` accepts (an option of DoReFa's does not
    reach QAT)."""
    accepted = get_method(method).options
    return {k: v for k, v in cfg.extra_options.items() if k in accepted}


def plan_runs(cfg: StudyConfig) -> list[PlannedRun]:
    """The study's runs in execution order (each baseline before the runs that start from it)."""
    plan: list[PlannedRun] = []
    common = dict(iwae_k=cfg.iwae_k, dataset=cfg.dataset, device=cfg.device)
    for seed in range(cfg.seeds):
        prefix = f"seed{seed}"

        def baseline(name: str, run_seed: int) -> str:
            folder = f"{prefix}/{name}"
            plan.append(PlannedRun(RunSpec(name=folder, epochs=cfg.epochs, seed=run_seed, **common), folder,
                                   kind="baseline"))
            return folder

        shared = baseline("fp32-baseline", seed) if cfg.preset == "default" else None
        cells = [(m, b) for m in cfg.methods for b in cfg.bits] + ([("ptq", b) for b in cfg.bits] if cfg.ptq else [])
        if cfg.control:
            cells = [(None, None)] + cells
        for i, (method, bits) in enumerate(cells):
            name = "fp32-control" if method is None else f"{method}-w{bits}"
            init = shared or baseline(f"{name}-baseline", seed * 1000 + i + 1)
            folder = f"{prefix}/{name}"
            if method is None:
                spec = RunSpec(name=folder, epochs=cfg.finetune_epochs, seed=seed, **common)
                plan.append(PlannedRun(spec, folder, init, kind="control"))
                continue
            spec = RunSpec(name=folder, epochs=cfg.finetune_epochs, method=method,
                           config_list=_config_for(method, bits, cfg), options=_options_for(method, cfg),
                           seed=seed, **common)
            plan.append(PlannedRun(spec, folder, init, kind="ptq" if method == "ptq" else "quantized", bits=bits))
    return plan


def check_plan(plan: list[PlannedRun]) -> None:
    """Parse every planned run's config list against its model before anything trains (a config
    the methods refuse used to stop the study after the baseline's training)."""
    from .config import ConfigError, parse_config
    from .models import build_model

    for run in plan:
        if run.spec.method is None:
            continue
        try:
            parse_config(run.spec.config_list, build_model(run.spec.model["name"], **run.spec.model.get("kwargs", {})),
                         run.spec.method, run.spec.options)
        except ConfigError as e:
            raise ConfigError(f"{run.folder}: {e}") from e


def _finished(folder: Path, key: str) -> dict | None:
    """The run's record if it finished with this exact configuration and its weights and optimizer
    state (which the runs started from it continue) are the ones it saved, else None (records
    before 0.3.5 hold no digest: their weights must exist; before 0.3.7, none of the optimizer's)."""
    path = folder / RECORD
    if not path.is_file():
        return None
    try:
        record = read_json(path)
    except CheckpointError:
        return None
    if not isinstance(record, dict) or record.get("key") != key or "after" not in record:
        return None
    digest = weights_digest(folder)
    damaged = None
    if digest is None or record.get("weights_sha256", digest) != digest:
        damaged = "weights are missing or not the ones"
    elif "optimizer_sha256" in record and optimizer_digest(folder) != record["optimizer_sha256"]:
        damaged = "optimizer state is missing or not the one"
    else:
        try:  # (its meta.json rebuilds the model the weights belong to: the report and the next runs read it)
            load_state(folder)
        except (CheckpointError, OSError, ValueError):  # (not JSON, not UTF-8, a folder, ...)
            damaged = f"{META} is missing or not the one"
    if damaged is not None:
        from .progress import console

        console.print(f"[yellow]{folder}: its {damaged} its record was made with; redoing that run[/yellow]")
        return None
    return record


def load_records(out: Path, plan: list[PlannedRun]) -> dict[str, dict]:
    """The finished records of a plan, by folder."""
    records: dict[str, dict] = {}
    keys: dict[str, str] = {}
    for run in plan:
        key = run.spec.key(keys.get(run.init) if run.init else None)
        keys[run.folder] = key
        record = _finished(out / run.folder, key)
        if record is not None:
            records[run.folder] = record
    return records


def run_study(cfg: StudyConfig) -> dict[str, Any]:
    """Run (or resume) the study and write ``report.md``, its figures and ``summary.json`` in ``cfg.out``.

    Returns the summary (the same as ``summary.json``).
    """
    from .data import load_dataset
    from .progress import console, make_progress
    from .report import print_summary_table, write_report

    out = ensure_dir(cfg.out)
    plan = plan_runs(cfg)
    check_plan(plan)
    train = load_dataset(cfg.dataset, "train", cfg.data_dir, progress=cfg.progress)
    test = load_dataset(cfg.dataset, "test", cfg.data_dir, progress=cfg.progress)
    write_json(out / "study.json", {"config": _jsonable(cfg), "runs": [r.folder for r in plan],
                                    "environment": machine_info()})

    keys: dict[str, str] = {}
    records: dict[str, dict] = {}
    skipped = reevaluated = 0
    with make_progress(disable=not cfg.progress) as progress:
        overall = progress.add_task("study", total=len(plan), info="")
        for run in plan:
            init_key = keys.get(run.init) if run.init else None
            key = run.spec.key(init_key)
            keys[run.folder] = key
            record = _finished(out / run.folder, key)
            before = records[run.init]["after"] if run.init else None
            if record is None:
                progress.update(overall, info=run.folder)
                record = run_experiment(run.spec, train.images, test.images, out / run.folder,
                                        init=out / run.init if run.init else None, init_key=init_key,
                                        before=before, progress=progress if cfg.progress else False)
            elif any(record["spec"].get(k) != getattr(run.spec, k) for k in EVAL_FIELDS):
                progress.update(overall, info=f"{run.folder} (evaluating)")
                record = reevaluate(run.spec, record, test.images, out / run.folder, before=before)
                reevaluated += 1
            else:
                skipped += 1
            records[run.folder] = record
            progress.advance(overall)
    if skipped or reevaluated:
        again = f", {reevaluated} re-evaluated with the new evaluation settings (not retrained)" if reevaluated else ""
        console.print(f"[dim]resumed: {skipped} finished run(s) reused{again} from {out}[/dim]")

    deployment = None
    if cfg.deploy:
        deployment = _deployment(cfg, plan, records, out, test)
    summary = write_report(out, cfg, plan, records, test.images, deployment=deployment)
    print_summary_table(summary)
    console.print(f"report: {out / 'report.md'}")
    return summary


def _deployment(cfg: StudyConfig, plan: list[PlannedRun], records: dict, out: Path, test) -> dict | None:
    """The real-deployment table: export one 8-bit run to ONNX and benchmark it (None if unavailable)."""
    try:
        from .bench import study_deployment
    except ImportError:
        return None
    return study_deployment(cfg, plan, records, out, test)


def _jsonable(cfg: StudyConfig) -> dict:
    d = {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}
    d["out"] = str(cfg.out)
    d["data_dir"] = str(cfg.data_dir) if cfg.data_dir else None
    d["methods"] = list(cfg.methods)
    d["bits"] = list(cfg.bits)
    return d
