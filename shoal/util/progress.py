"""A progress bar for long work, drawn on stderr only when it is a terminal."""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import TextIO

from shoal.util.sizes import format_size


class Progress:
    """``with Progress("import", total) as bar: bar.advance(n)``.

    Silent when ``stream`` is not a TTY (logs, CI), so output stays parseable.
    """

    def __init__(self, label: str, total: int, *, stream: TextIO | None = None, unit: str = "bytes"):
        self.label = label
        self.total = max(total, 1)
        self.done = 0
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty()
        self._started = time.monotonic()
        self._last_draw = 0.0

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and now - self._last_draw >= 0.1:
            self._last_draw = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        frac = min(self.done / self.total, 1.0)
        filled = int(frac * 30)
        elapsed = max(now - self._started, 1e-6)
        if self.unit == "bytes":
            rate = f"{format_size(int(self.done / elapsed))}/s"
        else:
            rate = f"{self.done / elapsed:.0f} {self.unit}/s"
        bar = "#" * filled + "-" * (30 - filled)
        self.stream.write(f"\r{self.label} [{bar}] {frac * 100:5.1f}% {rate}   ")
        self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.enabled:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()
