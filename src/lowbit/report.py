"""Tables (terminal and markdown), figures and the study's generated summary."""

from __future__ import annotations

import math
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from .presets import REFERENCE_EPOCHS, reference_loss

__all__ = ["print_run_table", "fmt"]


def _signed(v: float) -> str:
    """``v`` with its sign to 2 decimals; a value that rounds to zero is ``0.00`` (not ``-0.00``)."""
    text = f"{v:+.2f}"
    return "0.00" if float(text) == 0 else text


def fmt(value: Any, digits: int = 2) -> str:
    """A number for a table; ``—`` for missing values."""
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def print_run_table(record: dict, console: Console | None = None) -> None:
    """The small table ``lowbit train`` ends with: test loss, BCE, KL, IWAE, train s, eval s."""
    console = console or Console()
    table = Table(title=f"run {record['name']}")
    for col in ("", "test loss", "BCE", "KL", "IWAE NLL", "train s", "eval s"):
        table.add_column(col, justify="right")
    train_s = record["train"]["seconds"] if record.get("train") else None
    for label, m, ts in (("before", record.get("before"), None), ("after", record.get("after"), train_s)):
        if m is None:
            continue
        table.add_row(label, fmt(m["loss"]), fmt(m["bce"]), fmt(m["kl"]), fmt(m["iwae"]), fmt(ts),
                      fmt(m["eval_seconds_median3"], 3))
    console.print(table)


# --------------------------------------------------------------------------------------------
# The study's summary, report and figures
# --------------------------------------------------------------------------------------------

#: two-sided 95% quantiles of Student's t by degrees of freedom (normal beyond the table)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
        10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def t95(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (conservative between rows)."""
    if df <= 0:
        return float("nan")
    for d in sorted(_T95):
        if df <= d:
            return _T95[d] if df == d else _T95[max(k for k in _T95 if k <= df)]
    return 1.96


def paired_stats(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation and 95% t-interval of ``values`` (paired differences)."""
    n = len(values)
    mean = sum(values) / n
    if not all(math.isfinite(v) for v in values):  # a diverged run: no interval, no verdict
        return {"n": n, "mean": float("nan"), "std": None, "ci95": None, "significant": None, "non_finite": True}
    if n < 2:
        return {"n": n, "mean": mean, "std": None, "ci95": None, "significant": None}
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    std = var**0.5
    half = t95(n - 1) * std / n**0.5
    return {"n": n, "mean": mean, "std": std, "ci95": [mean - half, mean + half],
            "significant": bool(mean - half > 0 or mean + half < 0)}


def summarize(cfg, plan, records: dict[str, dict]) -> dict[str, Any]:
    """Cells (method x bits) with per-seed losses, mean ± std, differences to the fp32 control."""
    # the study's seeds are its seedN folders (preset reference trains each run's own baseline with a
    # seed of its own, which is no study seed: counted as one, an interval over 2 was said to be over 7)
    seeds = {r.folder.split("/", 1)[0] for r in plan}
    by_cell: dict[str, dict[str, Any]] = {}
    for run in plan:
        rec = records.get(run.folder)
        if rec is None:
            continue
        cell_name = run.folder.split("/", 1)[1]
        if run.kind == "baseline" and cfg.preset == "reference":
            cell_name = "fp32-baseline"
        cell = by_cell.setdefault(cell_name, {"name": cell_name, "kind": run.kind, "method": run.spec.method,
                                              "bits": run.bits, "runs": {}, "seeds": set()})
        cell["runs"].setdefault(run.spec.seed if run.kind != "baseline" else len(cell["runs"]), rec)
        cell["seeds"].add(run.folder.split("/", 1)[0])
    control = by_cell.get("fp32-control")
    baseline = by_cell.get("fp32-baseline")
    cells = []
    for cell in by_cell.values():
        runs = list(cell["runs"].items())
        after = [rec["after"]["loss"] for _, rec in runs]
        iwae = [rec["after"]["iwae"] for _, rec in runs if rec["after"]["iwae"] is not None]
        row = {k: cell[k] for k in ("name", "kind", "method", "bits")}
        row["n"] = len(after)
        row["seeds"] = len(cell["seeds"])  # (preset reference: several baselines a seed, one per run)
        row["loss"] = paired_stats(after)
        row["iwae"] = paired_stats(iwae) if iwae else None
        row["before"] = paired_stats([rec["before"]["loss"] for _, rec in runs]) if runs[0][1]["before"] else None
        row["train_seconds"] = paired_stats([rec["train"]["seconds"] for _, rec in runs]) if runs[0][1]["train"] else None
        row["eval_seconds"] = paired_stats([rec["after"]["eval_seconds_median3"] for _, rec in runs])
        row["size"] = runs[0][1]["size_after"]
        row["quantizes"] = _quantizes(runs[0][1])
        spec = runs[0][1]["spec"]
        row["reference"] = reference_loss(spec.get("method"), spec.get("config_list"), spec.get("dataset", "mnist"),
                                          (cfg.epochs, cfg.finetune_epochs))
        if runs[0][1]["before"] is not None:  # after - the fp32 model it started from, per seed
            row["vs_start"] = paired_stats([rec["after"]["loss"] - rec["before"]["loss"] for _, rec in runs])
        if control and cell is not control and cell["kind"] == "quantized":
            diffs = [rec["after"]["loss"] - control["runs"][s]["after"]["loss"]
                     for s, rec in runs if s in control["runs"]]
            row["vs_control"] = paired_stats(diffs) if diffs else None
        cells.append(row)
    summary = {"seeds": len(seeds), "cells": cells, "best": _best_per_bits(cells, by_cell)}
    summary["text"] = _summary_text(summary, control is not None, baseline is not None)
    return summary


def _quantizes(record: dict) -> str | None:
    """What a run quantizes, e.g. ``"weights and inputs of fc1, fc21, fc22, fc3"`` (None for fp32)."""
    calib = record.get("calibration_config")
    if not calib:
        return None
    types = json_types(record["spec"]["config_list"])
    what = " and ".join(t + "s" for t in ("weight", "input", "output") if t in types)
    return f"{what} of {', '.join(calib)}"


def _best_per_bits(cells: list[dict], by_cell: dict) -> list[dict]:
    best = []
    for bits in sorted({c["bits"] for c in cells if c["bits"]}, reverse=True):
        # a cell with a non-finite loss (a diverged run) is never ranked best
        ranked = sorted((c for c in cells if c["bits"] == bits and math.isfinite(c["loss"]["mean"])),
                        key=lambda c: c["loss"]["mean"])
        if not ranked:
            continue
        entry: dict[str, Any] = {"bits": bits, "best": ranked[0]["name"], "loss": ranked[0]["loss"]["mean"]}
        if len(ranked) > 1:
            a, b = by_cell[ranked[0]["name"]]["runs"], by_cell[ranked[1]["name"]]["runs"]
            diffs = [b[s]["after"]["loss"] - a[s]["after"]["loss"] for s in a if s in b]
            entry.update(runner_up=ranked[1]["name"], margin=paired_stats(diffs))
            if ranked[0].get("quantizes") != ranked[1].get("quantizes"):
                entry["differs"] = {c["name"]: c.get("quantizes") for c in ranked[:2]}
        best.append(entry)
    return best


def _summary_text(summary: dict, has_control: bool, has_baseline: bool) -> list[str]:
    lines = []
    n = summary["seeds"]
    for entry in summary["best"]:
        text = f"At {entry['bits']} bits, **{entry['best']}** is best ({entry['loss']:.2f} nats)"
        margin = entry.get("margin")
        if margin:
            text += f", {margin['mean']:.2f} nats ahead of {entry['runner_up']}"
            if margin["ci95"] is not None:
                lo, hi = margin["ci95"]
                sure = "larger than the seed-to-seed noise" if margin["significant"] else "within the seed-to-seed noise"
                text += f" (95% CI {lo:.2f} to {hi:.2f} over {n} seeds: {sure})"
            else:
                text += " (one seed: no error bar; run with --seeds 3 or more to know how sure this is)"
        if entry.get("differs"):
            text += ". Mind that the two quantize different tensors (" + "; ".join(
                f"{name}: {what}" for name, what in entry["differs"].items()) + "), as the reference configs do"
        lines.append(text + ".")
    for c in summary["cells"]:
        if c["loss"].get("non_finite"):
            lines.append(f"**{c['name']}** has a non-finite test loss in some seed (it diverged): it is left "
                         "out of the ranking.")
    control = next((c for c in summary["cells"] if c["name"] == "fp32-control"), None)
    if has_control and control:
        for bits in sorted({c["bits"] for c in summary["cells"] if c["bits"]}, reverse=True):
            diffs = [(c["vs_control"]["mean"], c["name"]) for c in summary["cells"]
                     if c["bits"] == bits and c.get("vs_control") and math.isfinite(c["vs_control"]["mean"])]
            if diffs:
                lo, hi = min(diffs), max(diffs)
                head = f"Against the equal-budget fp32 control ({control['loss']['mean']:.2f} nats), the fine-tuned"
                lines.append(f"{head} {bits}-bit run ({lo[1]}) differs by {_signed(lo[0])} nats." if len(diffs) == 1 else
                             f"{head} {bits}-bit runs differ by {_signed(lo[0])} ({lo[1]}) to {_signed(hi[0])} ({hi[1]}) nats.")
    for c in summary["cells"]:
        if c["kind"] == "ptq" and c.get("vs_start"):
            lines.append(f"PTQ at {c['bits']} bits (no training) costs {_signed(c['vs_start']['mean'])} nats against the "
                         f"fp32 model it quantizes.")
    return lines


def _pm(stats: dict | None, digits: int = 2) -> str:
    if stats is None:
        return "—"
    if stats["std"] is None:
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def _diff(stats: dict | None) -> str:
    if stats is None:
        return "—"
    text = _signed(stats['mean'])
    if stats["ci95"] is not None:
        text += f" [{_signed(stats['ci95'][0])}, {_signed(stats['ci95'][1])}]" + (" *" if stats["significant"] else "")
    return text


def print_summary_table(summary: dict, console: Console | None = None) -> None:
    """The terminal's closing table: each cell's loss, IWAE and difference to the fp32 control."""
    console = console or Console()
    table = Table(title=f"lowbit study ({summary['seeds']} seed{'s' if summary['seeds'] > 1 else ''})",
                  box=box.SIMPLE_HEAD)
    # the run names are kept whole (an 80-column log would cut them); the headers wrap instead
    table.add_column("run", no_wrap=True)
    for col in ("bits", "test loss", "IWAE NLL", "Δ vs fp32 control", "Δ vs its fp32 start", "NNI study"):
        table.add_column(col, justify="right")
    for c in summary["cells"]:
        table.add_row(c["name"], fmt(c["bits"]), _pm(c["loss"]), _pm(c["iwae"]), _diff(c.get("vs_control")),
                      _diff(c.get("vs_start")), fmt(c.get("reference")))
    console.print(table)
    for line in summary["text"]:
        console.print(line.replace("**", ""))


# ---- figures -------------------------------------------------------------------------------

def first_seed_runs(plan, records) -> list:
    """The first seed's finished runs, with one baseline (preset reference trains one per run, with
    seeds of their own: selecting by the run's seed left the fp32 model out of the figures and tables)."""
    first = plan[0].folder.split("/", 1)[0]
    runs, baseline_shown = [], False
    for r in plan:
        if r.folder.split("/", 1)[0] != first or r.folder not in records or (r.kind == "baseline" and baseline_shown):
            continue
        baseline_shown = baseline_shown or r.kind == "baseline"
        runs.append(r)
    return runs


def _figure_models(out, plan, records) -> list[tuple[str, Any]]:
    """(label, model) for the first seed's baseline and each of its quantized runs."""
    from .checkpoint import load_model

    chosen = []
    for run in first_seed_runs(plan, records):
        if run.kind == "control":
            continue
        label = "fp32" if run.kind == "baseline" else run.folder.split("/", 1)[1]
        chosen.append((label, load_model(out / run.folder)))
    return chosen


def write_figures(out, plan, records, summary, test_images) -> dict[str, str]:
    """Reconstructions, prior samples and loss-vs-bits figures (PNG) in ``out``; returns their names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    figures: dict[str, str] = {}
    models = _figure_models(out, plan, records)
    if models:
        x = test_images[:10]
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            recons = [(label, torch.sigmoid(m(x, torch.zeros(x.shape[0], m.latent))[0])) for label, m in models]
            z = torch.randn(10, models[0][1].latent, generator=g)
            samples = [(label, m.decode(z)) for label, m in models]
        for name, rows, first in (("reconstructions.png", recons, ("test images", x)),
                                  ("samples.png", samples, None)):
            rows = ([first] if first else []) + rows
            fig, axes = plt.subplots(len(rows), 10, figsize=(10, 1.05 * len(rows) + 0.3), squeeze=False)
            for r, (label, imgs) in enumerate(rows):
                for c in range(10):
                    ax = axes[r][c]
                    ax.imshow(imgs[c].reshape(28, 28).numpy(), cmap="gray", vmin=0, vmax=1)
                    ax.set_xticks([])
                    ax.set_yticks([])
                axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
            fig.suptitle("test images and reconstructions (z = mu)" if first else "samples from the prior, same z for every model",
                         fontsize=9)
            fig.tight_layout()
            fig.savefig(out / name, dpi=80)
            plt.close(fig)
            figures[name] = name

    cells = [c for c in summary["cells"] if c["bits"]]
    if cells:
        fig, ax = plt.subplots(figsize=(6, 4))
        for method in sorted({c["method"] for c in cells}):
            pts = sorted((c["bits"], c["loss"]["mean"], c["loss"]["std"] or 0.0) for c in cells if c["method"] == method)
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3,
                        label=method)
        for name, style in (("fp32-control", "--"), ("fp32-baseline", ":")):
            ref = next((c for c in summary["cells"] if c["name"] == name), None)
            if ref:
                ax.axhline(ref["loss"]["mean"], linestyle=style, color="gray", label=name)
        ax.set_xlabel("bits")
        ax.set_xticks(sorted({c["bits"] for c in cells}))  # only the widths studied, no 7.5-bit ticks
        ax.set_ylabel("test loss (nats per image)")
        ax.invert_xaxis()
        ax.legend(fontsize=8)
        ax.set_title("test loss against bit width (mean ± std over seeds)")
        fig.tight_layout()
        fig.savefig(out / "loss_vs_bits.png", dpi=90)
        plt.close(fig)
        figures["loss_vs_bits.png"] = "loss_vs_bits.png"
    return figures


# ---- markdown ------------------------------------------------------------------------------

def _md_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) if not isinstance(v, str) else v for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(out, cfg, plan, records, test_images, deployment: dict | None = None) -> dict:
    """Write ``report.md``, its figures and ``summary.json`` (losses, no timings) into ``out``."""
    import json

    from .checkpoint import atomic_write_bytes, write_json

    if not records:
        raise ValueError(f"no finished run to report in {out}: run the study first")
    summary = summarize(cfg, plan, records)
    figures = write_figures(out, plan, records, summary, test_images)
    runs0 = first_seed_runs(plan, records)
    env = next(iter(records.values()))["environment"] if records else {}

    md = ["# lowbit study report", ""]
    md.append(f"Data set **{cfg.dataset}**, {cfg.seeds} seed(s), baseline {cfg.epochs} epochs, "
              f"fine-tuning {cfg.finetune_epochs} epochs, layers `{cfg.layers}`, preset `{cfg.preset}`. "
              f"Machine: {env.get('cpu')} ({env.get('threads')} torch threads, flags {', '.join(env.get('cpu_flags', []))}), "
              f"GPU: {env.get('gpu') or 'none'}; Python {env.get('python')}, torch {env.get('torch')}, lowbit {env.get('lowbit')}.")
    md.append("")
    md.append("Rerun with the same command to reproduce it (finished runs are reused; delete the folder to redo them).")
    md += ["", "## Summary", ""] + [f"- {line}" for line in summary["text"]] + [""]

    md += ["## Test loss (the reference study's table, with our numbers)", "",
           "Loss = BCE + KL in nats per test image, fixed evaluation noise; *before* = the fp32 model the run "
           "starts from. Timings are this machine's (train s = all fine-tuning epochs; eval s = median of 3 passes "
           "over the 10,000 test images). *reference after*: the reference study's own figure for the same "
           "config list (NNI, SEED_STUDY.md), and our loss minus it (negative = lowbit lower)"
           + ("." if (cfg.epochs, cfg.finetune_epochs) == REFERENCE_EPOCHS else
              f" — left out here: this study trained {cfg.epochs} + {cfg.finetune_epochs} epochs, the reference "
              f"{REFERENCE_EPOCHS[0]} + {REFERENCE_EPOCHS[1]}, so their losses are not comparable."), ""]
    rows = []
    for run in runs0:
        if run.kind == "baseline":
            continue
        rec = records[run.folder]
        base = records.get(run.init) if run.init else None
        rows.append([run.spec.method or "fp32 (control)", _config_label(run),
                     fmt(base["train"]["seconds"]) if base and base.get("train") else "—",
                     fmt(rec["before"]["eval_seconds_median3"], 3) if rec["before"] else "—",
                     fmt(rec["train"]["seconds"]) if rec.get("train") else "— (no training)",
                     fmt(rec["after"]["eval_seconds_median3"], 3),
                     fmt(rec["before"]["loss"]) if rec["before"] else "—", fmt(rec["after"]["loss"]),
                     fmt(rec["after"]["iwae"])])
        ref = reference_loss(run.spec.method, run.spec.config_list, run.spec.dataset, (cfg.epochs, cfg.finetune_epochs))
        rows[-1] += [fmt(ref), _signed(rec['after']['loss'] - ref)] if ref is not None else ["—", "—"]
    md.append(_md_table(["method", "config", "train s (baseline)", "eval s", "train s after", "eval s after",
                         "test loss", "loss after", "IWAE NLL after", "reference after", "Δ vs reference"], rows))

    md += ["", "## Against the equal-budget fp32 control, over seeds", "",
           "The reference compared 20 epochs of training (10 fp32 + 10 quantized) against 10 fp32 epochs. "
           + ("Here every run is also compared with an fp32 model trained the same extra epochs from the same "
              "baseline." if cfg.preset != "reference" else
              "Here every run is also compared with an fp32 model trained the same extra epochs, each from a "
              "baseline of its own (preset `reference`: every run starts from its own fp32 model, as in the "
              "reference study), so Δ pairs runs by seed, not by starting model.")
           + " Δ = loss − control loss per seed; with 2+ seeds, [95% CI] and * when the interval "
           "excludes 0 (the difference is larger than the seed-to-seed noise).", ""]
    rows = [[c["name"], fmt(c["bits"]), _pm(c["loss"]), _pm(c["iwae"]), _diff(c.get("vs_control")),
             _diff(c.get("vs_start")), str(c["seeds"]) + (f" ({c['n']} runs)" if c["n"] != c["seeds"] else "")]
            for c in summary["cells"]]
    md.append(_md_table(["run", "bits", "test loss (mean ± std)", "IWAE NLL", "Δ vs control",
                         "Δ vs its fp32 start", "seeds"], rows))

    if summary["best"]:
        md += ["", "## Best method per bit width", ""]
        rows = [[str(b["bits"]), b["best"], fmt(b["loss"]), b.get("runner_up", "—"), _diff(b.get("margin"))]
                for b in summary["best"]]
        md.append(_md_table(["bits", "best", "loss", "runner-up", "runner-up − best"], rows))

    if deployment:
        md += ["", "## Real deployment (ONNX Runtime, integer kernels)", "", deployment.get("markdown", "")]

    md += ["", "## Figures", ""]
    for name, caption in (("reconstructions.png", "Test images and their reconstructions by each model"),
                          ("samples.png", "Samples from the prior decoded by each model"),
                          ("loss_vs_bits.png", "Test loss against bits per method")):
        if name in figures:
            md += [f"![{caption}]({name})", ""]

    md += ["## Model size", ""]
    rows = [[r.folder.split("/", 1)[1], str(records[r.folder]["size_after"]["parameters"]),
             str(records[r.folder]["size_after"]["bytes_fp32"]), str(records[r.folder]["size_after"]["bytes_quantized"])]
            for r in runs0]
    md.append(_md_table(["run", "parameters", "bytes (fp32)", "bytes (weights packed at their code width)"], rows))

    md += ["", "## Model printout before and after quantization", ""]
    shown = set()
    for run in runs0:
        if run.kind in ("quantized", "ptq") and run.spec.method not in shown:
            shown.add(run.spec.method)
            rec = records[run.folder]
            md += [f"<details><summary>{run.folder}</summary>", "", "Before:", "", "```",
                   rec["printout_before"], "```", "", "After:", "", "```", rec["printout_after"], "```", "",
                   "</details>", ""]

    md += ["## Calibration configs (NNI export format)", ""]
    for run in runs0:
        rec = records[run.folder]
        if rec.get("calibration_config"):
            md += [f"<details><summary>{run.folder}</summary>", "", "```json",
                   json.dumps(rec["calibration_config"], indent=1), "```", "", "</details>", ""]

    md += ["## Configurations", ""]
    for run in runs0:
        if run.spec.config_list:
            md.append(f"- `{run.folder}` ({run.spec.method}): `{json.dumps(run.spec.config_list)}`")
    md.append("")

    atomic_write_bytes(out / "report.md", "\n".join(md).encode())
    write_json(out / "summary.json", _strict_json(summary))  # NaN/inf as null: strict parsers reject NaN
    return summary


def _strict_json(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict_json(v) for v in obj]
    return obj


def _config_label(run) -> str:
    if run.spec.method is None:
        return "+epochs"
    return f"W{run.bits}" + ("A" + str(run.bits) if "input" in json_types(run.spec.config_list) else "")


def json_types(config_list) -> set:
    types: set = set()
    for entry in config_list or []:
        types.update(entry.get("quant_types", []))
    return types
