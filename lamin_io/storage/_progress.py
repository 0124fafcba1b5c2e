"""Progress bars for long transfers: an fsspec ``Callback`` rendered with rich.

Bars appear only on a terminal, only for transfers above ``threshold`` bytes, and never when
``mute=True``; elsewhere the callback is a silent no-op.
"""

from __future__ import annotations

import sys
from typing import Any

from fsspec.callbacks import Callback

__all__ = ["DEFAULT_THRESHOLD", "ProgressCallback"]

DEFAULT_THRESHOLD = 64 * 2**20


class ProgressCallback(Callback):
    """Report bytes transferred to a rich progress bar.

    Parameters
    ----------
    description
        Text shown left of the bar, e.g. ``"uploading pbmc.h5ad"``.
    mute
        Never show a bar.
    threshold
        Smallest total size, in bytes, that gets a bar.
    unit
        ``"bytes"`` (sizes and speed) or ``"rows"`` (a count: ``12,000/100,000``).
    """

    def __init__(self, description: str, *, mute: bool = False,
                 threshold: int = DEFAULT_THRESHOLD, unit: str = "bytes",
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.description = description
        self.enabled = not mute and sys.stderr.isatty()
        self.threshold = threshold
        self.unit = unit
        self._progress: Any = None
        self._task: Any = None

    def _start(self) -> None:
        if self._progress is not None or not self.enabled or (self.size or 0) < self.threshold:
            return
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            MofNCompleteColumn,
            Progress,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        amount = (MofNCompleteColumn(),) if self.unit == "rows" else (
            DownloadColumn(), TransferSpeedColumn())
        self._progress = Progress(
            "[progress.description]{task.description}", BarColumn(), *amount,
            TimeRemainingColumn(), transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task(self.description, total=self.size)

    def set_size(self, size: int) -> None:
        """Set the total number of bytes and open the bar if it is large enough."""
        self.size = size
        self._start()

    def call(self, *args: Any, **kwargs: Any) -> None:
        """Advance the bar to the current ``value``."""
        if self._progress is not None:
            self._progress.update(self._task, completed=self.value)

    def close(self) -> None:
        """Stop the bar (idempotent)."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __enter__(self) -> ProgressCallback:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
