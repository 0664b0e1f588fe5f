"""Progress output for long work, in one style: a tqdm bar on a terminal; nothing while it runs
when the output is a log or a pipe, and one summary line at the end either way."""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


class Progress:
    def __init__(self, label: str, total: int, unit: str = "items", stream: Optional[TextIO] = None, every_s: float = 0.2):
        from tqdm import tqdm

        self.label, self.total, self.unit = label, max(total, 0), unit
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.done = 0
        self.start = time.perf_counter()
        self.bar = tqdm(total=self.total or None, desc=label, unit=f" {unit}", file=self.stream, disable=not self.tty,
                        mininterval=every_s, dynamic_ncols=True, leave=False)

    def update(self, n: int = 1, note: str = "") -> None:
        self.done += n
        if note:
            self.bar.set_postfix_str(note, refresh=False)
        self.bar.update(n)

    def close(self, note: str = "") -> float:
        self.bar.close()
        elapsed = time.perf_counter() - self.start
        line = f"{self.label}: {self.done}/{self.total} {self.unit} in {elapsed:.1f} s, {self.rate:.1f} {self.unit}/s"
        self.stream.write(line + (f" - {note}" if note else "") + "\n")
        self.stream.flush()
        return elapsed

    @property
    def rate(self) -> float:
        elapsed = time.perf_counter() - self.start
        return self.done / elapsed if elapsed > 0 else 0.0
