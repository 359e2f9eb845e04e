"""What a stage shows while it runs, and how it is stopped: the progress bar, the start clock (where
the time to the first step goes) and Ctrl-C / SIGTERM (save, then stop)."""

import signal
import sys
import time
from typing import Optional

from .. import distributed


class Progress:
    def __init__(self, total: int, desc: str, done: int = 0, stream=sys.stderr):
        self.total, self.desc, self.stream, self.first = total, desc, stream, done
        self.start, self.tty = time.perf_counter(), stream.isatty()
        self.last, self.printed = 0.0, None

    def update(self, done: int, loss: float, tps: float, peak_gb: float, force=False):
        now = time.perf_counter()
        if not self.tty and (done == self.printed or (not force and now - self.last < 10)):
            return
        self.last, self.printed = now, done
        elapsed = now - self.start
        eta = elapsed / max(done - self.first, 1) * (self.total - done)  # this session's pace
        width = 24
        fill = int(width * done / max(self.total, 1))
        line = (f"{self.desc} [{'#' * fill}{'.' * (width - fill)}] {done}/{self.total} "
                f"loss {loss:.4f} | {tps:,.0f} tok/s | ETA {_hms(eta)} | peak {peak_gb:.2f} GB")
        self.stream.write(("\r" + line) if self.tty else (line + "\n"))
        self.stream.flush()

    def close(self):
        if self.tty:
            self.stream.write("\n")


def _hms(s):
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class StartClock:
    """Where the time to the first optimizer step goes, for the "first step done" line: phases
    timed between laps from `started` (the process start, given by the CLI: the imports count) or
    from the stage's start."""

    NAMES = {"imports": "imports", "load": "load", "data": "data", "other": "other",
             "step": "trace+compile+step"}

    def __init__(self, started: Optional[float] = None):
        now = time.perf_counter()
        self.start = started if started is not None else now
        self.phases = {"imports": now - started} if started is not None else {}
        self.last = now

    def lap(self, phase: str):
        now = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self.last
        self.last = now

    def total(self) -> float:
        return self.last - self.start

    def rounded(self) -> dict:
        return {"total": round(self.total(), 3), **{k: round(v, 3) for k, v in self.phases.items()}}

    def line(self) -> str:
        parts = ", ".join(f"{self.NAMES[k]} {self.phases[k]:.1f} s" for k in self.NAMES if k in self.phases)
        start = "start" if "imports" in self.phases else "the stage started"
        return f"first step done {self.total():.1f} s after {start} ({parts})"


class Interrupt:
    """Ctrl-C (or SIGTERM) sets a flag checked between optimizer steps: the run saves and stops. A
    second one aborts immediately. Under `mlx.launch` SIGTERM keeps the launcher's handler."""

    def __init__(self):
        self.hit = False

    def __enter__(self):
        self.prev = signal.getsignal(signal.SIGINT)
        self.prev_term = signal.getsignal(signal.SIGTERM)
        try:
            signal.signal(signal.SIGINT, self._handle)
            if not distributed.setup().enabled:
                signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self.prev = None
        return self

    def _handle(self, *_):
        if self.hit:
            raise KeyboardInterrupt
        self.hit = True

    def __exit__(self, *exc):
        if self.prev is not None:
            signal.signal(signal.SIGINT, self.prev)
            signal.signal(signal.SIGTERM, self.prev_term)
