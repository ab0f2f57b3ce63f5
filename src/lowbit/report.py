"""Tables (terminal and markdown), figures and the study's generated summary."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = ["print_run_table", "fmt"]


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
