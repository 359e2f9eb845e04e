"""`mlx-coconut` commands side by side as child processes, each with its share of the BLAS threads.

On a CPU one training process keeps only part of the cores busy (MLX runs its elementwise work on
one thread; only sgemm uses them all), so two runs at once with half the BLAS threads each get more
steps a minute than the same runs one after the other (docs/performance.md). On a GPU they would
only queue for it: `default_jobs()` is 1 there.

A child gets its own session, so a Ctrl-C in the terminal reaches only the parent, which then sends
each child one SIGTERM: the child saves a checkpoint and stops, and the next run resumes it.
"""

import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import UserError

THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS", "OMP_NUM_THREADS")
STOP_SECONDS = 120  # a stopped child saves its checkpoint first; killed past this


@dataclass(frozen=True)
class Task:
    """One command line (`mlx-coconut` arguments), started once every task in `after` has finished.
    A `spare_cores_only` task (a short one: an evaluation) starts only on cores no running task uses
    and never beside a task starting at the same moment; a task starting while one runs does not
    count it when taking its share of the cores (it would keep the smaller share for good)."""
    name: str
    argv: tuple
    log: Path            # the child's stdout and stderr
    after: tuple = ()
    spare_cores_only: bool = False

    @property
    def command(self) -> str:
        return command_line(self.argv)


def command_line(argv) -> str:
    """ARGV as the `mlx-coconut` command a user would type."""
    return "mlx-coconut " + " ".join(shlex.quote(str(a)) for a in argv)


@dataclass(frozen=True)
class Finished:
    started: float       # seconds after run_tasks began
    seconds: float
    threads: int         # BLAS threads it was given


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_jobs() -> int:
    """Two runs at once on a CPU with two or more cores, one on a GPU."""
    import mlx.core as mx

    return 1 if mx.default_device() != mx.cpu else min(2, cpu_cores())


def start_process(argv, log: Path, threads: int):
    """`python -m mlx_coconut ARGV` with `threads` BLAS threads (with every core: the environment as
    it is, as the command typed by hand), its output appended to `log`."""
    share = {name: str(threads) for name in THREAD_VARIABLES} if threads < cpu_cores() else {}
    env = {**os.environ, **share, "PYTHONUNBUFFERED": "1"}
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        out.write(f"== {time.strftime('%Y-%m-%d %H:%M:%S')} {threads} BLAS thread(s): {command_line(argv)}\n")
        out.flush()
        return subprocess.Popen([sys.executable, "-m", "mlx_coconut", *map(str, argv)], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)


def last_line(log: Path) -> str:
    """The last non-empty line of a log (a progress bar's latest state), '' when there is none."""
    try:
        with log.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [x.strip() for x in tail.replace("\r", "\n").split("\n") if x.strip()]
    return lines[-1] if lines else ""


def chain_lengths(tasks) -> dict:
    """{name: the number of tasks on the longest chain that starts with it}: the longest go first."""
    children = {t.name: [c.name for c in tasks if t.name in c.after] for t in tasks}
    length = {}

    def walk(name):
        if name not in length:
            length[name] = 1 + max((walk(c) for c in children[name]), default=0)
        return length[name]

    for t in tasks:
        walk(t.name)
    return length


def run_tasks(tasks, jobs: int, spawn: Callable = start_process, log=print, cores: int = None,
              poll_seconds: float = 0.5, status_seconds: float = 60.0, clock=time.perf_counter,
              sleep=time.sleep) -> dict:
    """Run `tasks` at most `jobs` at a time, each once its `after` tasks are done, the longest chain
    first, then the one ready longest, then in the given order; a task started beside k-1 others gets
    cores // k BLAS threads. → {name: Finished}.
    A task that fails stops the others (each saves and stops) and raises a one-line UserError."""
    names = {t.name for t in tasks}
    unknown = {a for t in tasks for a in t.after} - names
    if unknown:
        raise ValueError(f"tasks wait for tasks that are not given: {sorted(unknown)}")
    cores = cores or cpu_cores()
    length = chain_lengths(tasks)
    pending = list(tasks)
    running, finished = {}, {}
    start = last_status = clock()

    def waited_since(t):  # when its last `after` task finished
        return max((finished[a].started + finished[a].seconds for a in t.after), default=0.0)

    try:
        while pending or running:
            # the longest chain first; among equal ones the one ready the longest (a task left for
            # last beside nothing else runs on part of the cores)
            ready = sorted((t for t in pending if all(a in finished for a in t.after)),
                           key=lambda t: (-length[t.name], waited_since(t)))
            for t, threads in _launches(ready, running, jobs, cores):
                log(f"\n== {t.name} started ({threads} BLAS thread{'s' * (threads > 1)}; "
                    f"output: {t.log}): {t.command}")
                running[t.name] = (t, spawn(t.argv, t.log, threads), clock(), threads)
                pending.remove(t)
            if not running:
                raise ValueError("no task can start: their `after` tasks form a cycle")
            sleep(poll_seconds)
            for name, (t, process, started, threads) in list(running.items()):
                code = process.poll()
                if code is None:
                    continue
                del running[name]
                if code != 0:
                    raise UserError(f"`{t.command}` failed (exit {code}): {last_line(t.log) or 'no output'} "
                                    f"(its whole output: {t.log})")
                finished[name] = Finished(started - start, clock() - started, threads)
                log(f"== {name} done in {_minutes(clock() - started)}")
            if running and clock() - last_status >= status_seconds:
                last_status = clock()
                for t, _, started, _ in running.values():
                    log(f"   {t.name} ({_minutes(clock() - started)}): {last_line(t.log)}")
    except BaseException:
        _stop([(t, p) for t, p, _, _ in running.values()], log)
        raise
    return finished


def _launches(ready, running: dict, jobs: int, cores: int) -> list:
    """[(task, BLAS threads)] to start now: the ready tasks up to `jobs`, each with its share of the
    cores beside the other long ones (a short one still running shares the cores for a while, rather
    than the long one keeping fewer threads for good); spare-cores-only tasks only when none of the
    others starts and cores are idle."""
    slots = max(0, jobs - len(running))
    launch = [t for t in ready if not t.spare_cores_only][:slots]
    if launch:
        long_running = sum(not t.spare_cores_only for t, *_ in running.values())
        threads = max(1, cores // (long_running + len(launch)))
        return [(t, threads) for t in launch]
    idle = cores - sum(threads for *_, threads in running.values())  # < 0 while a run shares an evaluation's
    launch = [t for t in ready if t.spare_cores_only][:max(0, min(slots, idle))]
    return [(t, idle // len(launch)) for t in launch]


def _stop(children, log) -> None:
    """One SIGTERM each (a run saves a checkpoint and stops), then wait; kill past STOP_SECONDS or at a
    second Ctrl-C."""
    if not children:
        return
    log(f"stopping {', '.join(t.name for t, _ in children)} (a run saves a checkpoint first; the next "
        f"quickstart resumes it)")
    for _, p in children:
        p.terminate()
    try:
        for _, p in children:
            p.wait(timeout=STOP_SECONDS)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        for _, p in children:
            if p.poll() is None:
                p.kill()
                p.wait()


def _minutes(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 60}:{s % 60:02d}"
