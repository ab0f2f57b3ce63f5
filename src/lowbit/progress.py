"""Rich progress bars for training and for the study (one place for their look)."""

from __future__ import annotations

import time
from contextlib import AbstractContextManager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

__all__ = ["make_progress", "TrainProgress", "console"]

console = Console(stderr=True)


def make_progress(transient: bool = False, disable: bool = False) -> Progress:
    """A progress display with description, bar, count, elapsed/remaining and a free-text field
    (``disable``: draws nothing, e.g. for ``--no-progress``)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=transient,
        disable=disable,
    )


class TrainProgress(AbstractContextManager):
    """One bar over all training steps, with the running loss per image and images/s.

    Refreshes at most ~8 times a second so that it costs nothing measurable per step.  Pass
    ``progress`` to add the bar to an existing display (the study's), else it owns one.
    """

    def __init__(self, description: str, epochs: int, steps: int, *, enabled: bool = True,
                 progress: Progress | None = None) -> None:
        self.enabled = enabled
        self.epochs, self.steps = epochs, steps
        self._own = progress is None
        self._progress = progress
        self._description = description
        self._epoch = 0
        self._last = 0.0
        self._epoch_start = 0.0

    def __enter__(self) -> "TrainProgress":
        if self.enabled:
            if self._own:
                self._progress = make_progress(transient=True)
                self._progress.start()
            self._task = self._progress.add_task(self._description, total=self.epochs * self.steps, info="")
        self._epoch_start = time.perf_counter()
        return self

    def step(self, step: int, loss_sum, images: int) -> None:
        """Report that ``step`` steps of the current epoch are done, ``loss_sum`` over ``images``."""
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self._last < 0.125 and step != self.steps:
            return
        self._last = now
        rate = images / max(now - self._epoch_start, 1e-9)
        info = f"epoch {self._epoch + 1}/{self.epochs}  loss {float(loss_sum) / images:8.3f}  {rate:8.0f} img/s"
        self._progress.update(self._task, completed=self._epoch * self.steps + step, info=info)

    def end_epoch(self, loss: float, seconds: float) -> None:
        self._epoch += 1
        self._epoch_start = time.perf_counter()

    def __exit__(self, *exc) -> None:
        if self.enabled:
            if self._own:
                self._progress.stop()
            else:
                self._progress.remove_task(self._task)
        return None
