"""What the person running the demo sees: numbered steps, a live spend bar, notable events.

On a terminal the bar redraws in place; elsewhere (CI, a pipe, ``--plain``) each update is
one line, so a log reads like the story.
"""

from __future__ import annotations

import sys
import time
from decimal import Decimal
from typing import TextIO

BAR_WIDTH = 30


class Display:
    def __init__(self, total_steps: int, *, interactive: bool, out: TextIO = sys.stdout) -> None:
        self.total = total_steps
        self.step_number = 0
        self.interactive = interactive
        self.out = out
        self._bar_open = False
        self._last_plain = ""
        self._started = time.monotonic()

    def step(self, text: str) -> None:
        self._close_bar()
        self.step_number += 1
        self._print(f"[{self.step_number}/{self.total}] {text}")

    def note(self, text: str) -> None:
        self._close_bar()
        self._print(f"      → {text}")

    def detail(self, text: str) -> None:
        self._close_bar()
        for line in text.rstrip().splitlines():
            self._print(f"      {line}")

    def spend(self, spent: Decimal, cap: Decimal, phase: str, model: str, calls: int) -> None:
        ratio = min(spent / cap, Decimal(1)) if cap else Decimal(1)
        filled = int(ratio * BAR_WIDTH)
        bar = "█" * filled + "░" * (BAR_WIDTH - filled)
        line = (
            f"      spend {bar} ${spent:.4f} / ${cap:.2f} {int(ratio * 100):3d}%  "
            f"{phase:<11} calls {calls:<4} model {model}"
        )
        if self.interactive:
            self.out.write("\r" + line)
            self.out.flush()
            self._bar_open = True
        elif line.split("calls")[0] != self._last_plain:  # one line per visible change
            self._last_plain = line.split("calls")[0]
            self._print(line)

    def elapsed(self) -> float:
        return time.monotonic() - self._started

    def _close_bar(self) -> None:
        if self._bar_open:
            self.out.write("\n")
            self._bar_open = False

    def _print(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()
