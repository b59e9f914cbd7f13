"""Progress for long data jobs: tqdm bars on a terminal, plain periodic lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import IO, Optional


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


class Bar:
    """``update(n)`` counts progress in ``unit``s (shown divided by ``scale``)."""

    def __init__(self, desc: str, total: Optional[float], unit: str, scale: float, stream: IO[str],
                 tty: bool, quiet: bool, interval: float, position: int = 0):
        self.desc, self.total, self.unit, self.scale = desc, total, unit, scale
        self.stream, self.quiet, self.interval = stream, quiet, interval
        self.n = 0.0
        self.t0 = self.last = time.perf_counter()
        self._tqdm = None
        if tty and not quiet:
            from tqdm import tqdm

            self._tqdm = tqdm(total=None if total is None else total / scale, desc=desc, unit=unit,
                              file=stream, dynamic_ncols=True, leave=True, position=position,
                              bar_format=None if total else "{desc}: {n:.1f}{unit} [{elapsed}, {rate_fmt}]")

    def update(self, n: float) -> None:
        self.n += n
        if self._tqdm is not None:
            self._tqdm.update(n / self.scale)
            return
        now = time.perf_counter()
        if not self.quiet and now - self.last >= self.interval:
            self.last = now
            self._line()

    def tick(self) -> None:
        """Refresh elapsed time for work without a measurable amount (tokenizer training)."""
        if self._tqdm is not None:
            self._tqdm.refresh()
        elif not self.quiet and time.perf_counter() - self.last >= self.interval:
            self.last = time.perf_counter()
            self._line()

    def _line(self) -> None:
        dt = time.perf_counter() - self.t0
        done = self.n / self.scale
        rate = done / dt if dt > 0 else 0.0
        if self.total:
            total = self.total / self.scale
            eta = (total - done) / rate if rate > 0 else 0.0
            msg = f"{done:.1f}/{total:.1f} {self.unit} ({100 * done / total:.0f}%), {rate:.2f} {self.unit}/s, eta {_fmt_eta(eta)}"
        elif self.n:
            msg = f"{done:.1f} {self.unit}, {rate:.2f} {self.unit}/s, {dt:.0f}s elapsed"
        else:
            msg = f"{dt:.1f}s elapsed"
        print(f"[prepare] {self.desc}: {msg}", file=self.stream, flush=True)

    def close(self) -> None:
        if self._tqdm is not None:
            if self.total:
                self._tqdm.n = self.n / self.scale
            self._tqdm.close()
        elif not self.quiet:
            self._line()

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Reporter:
    """Makes bars and log lines; ``quiet`` keeps everything silent (tests)."""

    def __init__(self, quiet: bool = False, stream: Optional[IO[str]] = None, interval: float = 10.0):
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.interval = interval
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def bar(self, desc: str, total: Optional[float] = None, unit: str = "MB", scale: float = 1e6,
            position: int = 0) -> Bar:
        return Bar(desc, total, unit, scale, self.stream, self.tty, self.quiet, self.interval, position)

    def log(self, msg: str) -> None:
        if not self.quiet:
            print(f"[prepare] {msg}", file=self.stream, flush=True)
