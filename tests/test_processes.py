"""Runs side by side as child processes (`quickstart --jobs N`): the order, the limit, the BLAS threads
each gets, a failure and a Ctrl-C; and the quickstart's use of it."""

import json
import subprocess
import sys

import pytest

from mlx_coconut import processes, quickstart
from mlx_coconut.errors import UserError


class FakeProcess:
    """Done after `polls` polls with `code`; records terminate()."""

    def __init__(self, polls, code=0):
        self.polls, self.code, self.terminated = polls, code, False

    def poll(self):
        self.polls -= 1
        return self.code if self.polls <= 0 or self.terminated else None

    def terminate(self):
        self.terminated = True

    def wait(self, timeout=None):
        return self.code

    def kill(self):
        self.terminated = True


class Spawner:
    """A spawn callback: FakeProcesses that take polls[name] polls; a log of what ran when."""

    def __init__(self, polls, codes=None):
        self.polls, self.codes, self.events, self.running = polls, codes or {}, [], {}

    def __call__(self, argv, log, threads):
        name = argv[0]
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"progress of {name}\nerror: {name} went wrong\n" if name in self.codes else f"{name} ok\n")
        p = FakeProcess(self.polls[name], self.codes.get(name, 0))
        self.running[name] = p
        self.events.append(("start", name, threads, sorted(n for n, q in self.running.items() if q.polls > 0),
                            {n for n, q in self.running.items() if q.polls <= 0}))
        return p


def _tasks(tmp_path, after):
    return [processes.Task(name, (name,), tmp_path / f"{name}.log", tuple(deps)) for name, deps in after.items()]


def _quiet(*a):
    pass


def test_tasks_start_after_theirs_at_most_jobs_at_once_longest_chain_first(tmp_path):
    after = {"a": [], "b": [], "c": ["a"], "d": ["a"], "e": ["c"], "f": ["b"]}
    polls = {"a": 3, "b": 1, "c": 2, "d": 5, "e": 2, "f": 1}
    spawn = Spawner(polls)
    done = processes.run_tasks(_tasks(tmp_path, after), jobs=2, spawn=spawn, log=_quiet, cores=4,
                               sleep=lambda s: None)
    assert set(done) == set(after)
    started = [e[1] for e in spawn.events]
    finished_before = {e[1]: e[4] for e in spawn.events}
    for name, deps in after.items():  # each once the ones it waits for have finished
        assert set(deps) <= finished_before[name], name
    assert all(len(e[3]) <= 2 for e in spawn.events)  # never more than --jobs at once
    assert started[0] == "a"  # the longest chain (a -> c -> e) first
    # each started beside another: half the cores each
    assert {e[1]: e[2] for e in spawn.events} == dict.fromkeys(after, 2)


def test_a_run_started_alone_gets_every_core(tmp_path):
    spawn = Spawner({"a": 1, "b": 1})
    processes.run_tasks(_tasks(tmp_path, {"a": [], "b": ["a"]}), jobs=2, spawn=spawn, log=_quiet, cores=4,
                        sleep=lambda s: None)
    assert [(e[1], e[2]) for e in spawn.events] == [("a", 4), ("b", 4)]


def test_among_equal_chains_the_one_ready_longest_goes_first(tmp_path):
    """y is given before x, but x's run finished first: x has waited longer and starts first."""
    spawn = Spawner({"b": 1, "a": 1, "y": 1, "x": 1})
    ticks = iter(range(10 ** 6))
    processes.run_tasks(_tasks(tmp_path, {"b": [], "a": [], "y": ["a"], "x": ["b"]}), jobs=1, spawn=spawn,
                        log=_quiet, cores=2, sleep=lambda s: None, clock=lambda: float(next(ticks)))
    assert [e[1] for e in spawn.events] == ["b", "a", "x", "y"]


def test_an_evaluation_takes_only_spare_cores(tmp_path):
    """A spare-cores-only task starts on the core a finished run left idle beside a run still going;
    it never starts beside a run starting at the same moment (that run would keep half the threads for
    good), and with nothing else left it gets the idle cores."""
    spawn = Spawner({"a": 2, "b": 6, "c": 8, "e-a": 1, "e-c": 1})
    tasks = _tasks(tmp_path, {"a": [], "b": [], "c": ["a"]})
    tasks += [processes.Task(f"e-{x}", (f"e-{x}",), tmp_path / f"e-{x}.log", (x,), spare_cores_only=True)
              for x in "ac"]
    processes.run_tasks(tasks, jobs=2, spawn=spawn, log=_quiet, cores=2, sleep=lambda s: None)
    starts = [(e[1], e[2], e[3]) for e in spawn.events]
    # a done: c (a run) takes the freed core at once and the evaluation of a waits
    assert starts[:3] == [("a", 1, ["a"]), ("b", 1, ["a", "b"]), ("c", 1, ["b", "c"])]
    # b done: a's evaluation takes the core it leaves; c's after c, on the cores left idle
    assert starts[3] == ("e-a", 1, ["c", "e-a"])
    assert starts[4][:2] == ("e-c", 2) and starts[4][2] == ["e-c"]
    # a run and an evaluation ready at once with every core idle: the run alone, on every core
    spawn = Spawner({"a": 1, "c": 3, "e-a": 1})
    tasks = _tasks(tmp_path, {"a": [], "c": ["a"]})
    tasks.append(processes.Task("e-a", ("e-a",), tmp_path / "e-a.log", ("a",), spare_cores_only=True))
    processes.run_tasks(tasks, jobs=2, spawn=spawn, log=_quiet, cores=2, sleep=lambda s: None)
    assert [(e[1], e[2], e[3]) for e in spawn.events] == [("a", 2, ["a"]), ("c", 2, ["c"]), ("e-a", 2, ["e-a"])]
    # a run ready while an evaluation is still going takes every core all the same
    spawn = Spawner({"a": 1, "b": 4, "c": 6, "e-a": 8})
    tasks = _tasks(tmp_path, {"a": [], "b": [], "c": ["b"]})
    tasks.append(processes.Task("e-a", ("e-a",), tmp_path / "e-a.log", ("a",), spare_cores_only=True))
    processes.run_tasks(tasks, jobs=2, spawn=spawn, log=_quiet, cores=2, sleep=lambda s: None)
    assert [(e[1], e[2], e[3]) for e in spawn.events] == [
        ("a", 1, ["a"]), ("b", 1, ["a", "b"]), ("e-a", 1, ["b", "e-a"]), ("c", 2, ["c", "e-a"])]
    # ... and while the two share the cores (more threads than cores), no other evaluation starts
    spawn = Spawner({"a": 1, "b": 4, "c": 6, "e-a": 8, "e-b": 1, "e-x": 1})
    tasks = _tasks(tmp_path, {"a": [], "b": [], "c": ["b"]})
    tasks += [processes.Task(f"e-{x}", (f"e-{x}",), tmp_path / f"e-{x}.log", (y,), spare_cores_only=True)
              for x, y in (("a", "a"), ("b", "b"), ("x", "b"))]
    processes.run_tasks(tasks, jobs=3, spawn=spawn, log=_quiet, cores=2, sleep=lambda s: None)
    events = [(e[1], e[2], e[3]) for e in spawn.events]
    assert ("c", 2, ["c", "e-a"]) in events and all(threads >= 1 for _, threads, _ in events)
    assert not any(name in ("e-b", "e-x") and {"c", "e-a"} <= set(beside) for name, _, beside in events)


def test_one_job_at_a_time_gets_every_core(tmp_path):
    spawn = Spawner({"a": 2, "b": 2})
    processes.run_tasks(_tasks(tmp_path, {"a": [], "b": []}), jobs=1, spawn=spawn, log=_quiet, cores=2,
                        sleep=lambda s: None)
    assert [(e[1], e[2], e[3]) for e in spawn.events] == [("a", 2, ["a"]), ("b", 2, ["b"])]


def test_a_failed_run_stops_the_others_and_says_so_in_one_line(tmp_path):
    spawn = Spawner({"a": 1, "b": 50, "c": 1}, codes={"a": 2})
    tasks = _tasks(tmp_path, {"a": [], "b": [], "c": ["a"]})
    with pytest.raises(UserError) as e:
        processes.run_tasks(tasks, jobs=2, spawn=spawn, log=_quiet, cores=2, sleep=lambda s: None)
    message = str(e.value)
    assert "\n" not in message and "`mlx-coconut a` failed (exit 2)" in message
    assert "error: a went wrong" in message and str(tmp_path / "a.log") in message
    assert spawn.running["b"].terminated  # stopped: it saves and stops
    assert "c" not in spawn.running       # never started


def test_ctrl_c_sends_each_child_one_sigterm_and_waits_for_it(tmp_path):
    """Real children in their own session: a Ctrl-C in the parent reaches them as one SIGTERM each,
    which they handle (as `train` does: save, exit 130) before the parent re-raises."""
    child = ("import pathlib, signal, sys, time\n"
             "def stop(*_):\n"
             "    pathlib.Path(sys.argv[1]).write_text('saved'); sys.exit(130)\n"
             "signal.signal(signal.SIGTERM, stop)\n"
             "pathlib.Path(sys.argv[1] + '.up').write_text('up')\n"
             "time.sleep(60)\n")

    def spawn(argv, log, threads):
        return subprocess.Popen([sys.executable, "-c", child, str(tmp_path / argv[0])], start_new_session=True)

    def sleep(_):  # the Ctrl-C arrives once both children are up
        import time
        for _ in range(200):
            if all((tmp_path / f"{n}.up").exists() for n in "ab"):
                raise KeyboardInterrupt
            time.sleep(0.05)
        raise AssertionError("children did not start")

    with pytest.raises(KeyboardInterrupt):
        processes.run_tasks(_tasks(tmp_path, {"a": [], "b": []}), jobs=2, spawn=spawn, log=_quiet,
                            sleep=sleep)
    assert (tmp_path / "a").read_text() == "saved" and (tmp_path / "b").read_text() == "saved"


def test_a_child_gets_its_blas_threads_and_its_log(tmp_path, monkeypatch):
    seen = {}

    class Popen:
        def __init__(self, argv, **kw):
            seen.update(argv=argv, **kw)

    monkeypatch.setattr(processes.subprocess, "Popen", Popen)
    monkeypatch.setattr(processes, "cpu_cores", lambda: 4)
    for v in processes.THREAD_VARIABLES:
        monkeypatch.delenv(v, raising=False)
    processes.start_process(("train", "--out", "r"), tmp_path / "logs" / "r.log", threads=3)
    assert seen["argv"][1:] == ["-m", "mlx_coconut", "train", "--out", "r"]
    assert all(seen["env"][v] == "3" for v in processes.THREAD_VARIABLES)
    assert seen["start_new_session"]
    processes.start_process(("train",), tmp_path / "logs" / "r.log", threads=4)  # every core: as typed
    assert not any(v in seen["env"] for v in processes.THREAD_VARIABLES)
    assert (tmp_path / "logs" / "r.log").read_text().startswith("== ")  # the command, then its output


def test_python_m_mlx_coconut_is_the_command_line(tmp_path):
    log = tmp_path / "v.log"
    p = processes.start_process(("--version",), log, threads=1)
    assert p.wait(timeout=120) == 0
    assert "mlx-coconut, version" in processes.last_line(log)


def test_the_quickstart_trains_the_runs_still_to_train_side_by_side(tmp_path):
    """--jobs 2: complete runs are resumed in-process (they return at once), the others go to the
    scheduler, each after the run it starts from; interrupted ones with `train --resume`. Every run's
    evaluation goes there too, on spare cores, after its run; the table of them all is made here."""
    plan = quickstart.make_plan(tmp_path, "long", tmp_path / "m.gguf", seed=0)
    (plan.model).mkdir(parents=True)
    (plan.model / "config.json").write_text("{}")
    for key, complete in (("cot", True), ("pause", False)):
        run = plan.runs[key]
        (run / "ckpt-0000001").mkdir(parents=True)
        (run / "ckpt-0000001" / "state.json").write_text(json.dumps({"complete": complete}))
        config = {"seed": 0, "mode": key, "lora": key != "cot"}
        (run / "coconut.json").write_text(json.dumps({"checkpoint": "ckpt-0000001", "config": config}))
    calls, spawned, evaluated = [], {}, []

    def spawn(argv, log, threads):
        argv = list(map(str, argv))
        if argv[0] == "eval":
            evaluated.append(argv[argv.index("--json") + 1])
        else:
            spawned[argv[argv.index("--out") + 1]] = argv
        return FakeProcess(1)

    quickstart.execute(plan, calls.append, log=_quiet, jobs=2, spawn=spawn)
    trained_here = [c for c in calls if c[0] == "train"]
    assert trained_here == [["train", "--resume", "--out", str(plan.runs["cot"])]]
    assert set(spawned) == {str(plan.runs[k]) for k in plan.runs if k != "cot"}
    assert spawned[str(plan.runs["pause"])] == ["train", "--resume", "--out", str(plan.runs["pause"])]
    assert "--init" in spawned[str(plan.runs["coconut"])]
    steps = {s.label: s for s in plan.steps}
    assert steps["train coconut"].blas_threads == 1 and steps["train cot"].blas_threads is None
    assert [c[0] for c in calls if c[0] != "train"][:4] == ["data", "data", "data", "eval"]
    assert sorted(evaluated) == sorted([str(tmp_path / "evals" / f"{k}.json") for k in plan.runs]
                                       + [str(quickstart.output(tmp_path, "long", "swapped.json"))])
    table = next(c for c in calls if c[0] == "eval")  # one table of every row, from their files
    assert "--model" not in table and table.count("--results") == len(plan.runs)
    assert steps["eval cot"].started >= 0 and steps["eval coconut"].started >= steps["train coconut"].started + steps["train coconut"].seconds
