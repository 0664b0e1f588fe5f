"""Progress output for long work: one updating line on a terminal, periodic lines in logs."""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


class Progress:
    def __init__(self, label: str, total: int, unit: str = "items", stream: Optional[TextIO] = None, every_s: float = 5.0):
        self.label, self.total, self.unit = label, max(total, 0), unit
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.every_s = 0.2 if self.tty else every_s
        self.done = 0
        self.start = time.perf_counter()
        self._last = self.start

    def update(self, n: int = 1, note: str = "") -> None:
        self.done += n
        now = time.perf_counter()
        if now - self._last >= self.every_s:
            self._last = now
            self._print(note)

    def _print(self, note: str = "", final: bool = False) -> None:
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        eta = f", eta {(self.total - self.done) / rate:.0f}s" if rate > 0 and self.done < self.total else ""
        line = f"{self.label}: {self.done}/{self.total} {self.unit}{pct}, {rate:.1f} {self.unit}/s{eta}"
        if note:
            line += f" - {note}"
        if self.tty and not final:
            self.stream.write("\r" + line.ljust(100))
        else:
            self.stream.write(("\r" if self.tty else "") + line + "\n")
        self.stream.flush()

    def close(self, note: str = "") -> float:
        self._print(note, final=True)
        return time.perf_counter() - self.start

    @property
    def rate(self) -> float:
        elapsed = time.perf_counter() - self.start
        return self.done / elapsed if elapsed > 0 else 0.0
