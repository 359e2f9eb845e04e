"""`mlx-coconut quickstart`: the paper's table in miniature, on an embedded default, on a laptop CPU.

SmolLM2-135M-Instruct (the GGUF inside a PyPI wheel, converted by our converter) + synthetic word
problems from `data synth` (disjoint seeds, held-out questions never seen in training) → three runs
from the same model with the same budget: CoT (stage 0), no-CoT, and COCONUT (stage k from the CoT
run) → all three evaluated side by side on the held-out questions, and COCONUT once more fed another
question's thoughts (do its answers depend on them?) → learning curves → a paragraph that reads the
numbers.

Every step is an ordinary `mlx-coconut` command line, run in-process through `invoke` and written to
`OUT/quickstart.json`, so any step can be re-run by hand with the same result. Nothing here reaches
into the library past those commands. Re-running continues where it stopped (complete runs are kept).
"""

import json
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from .errors import UserError
from .processes import command_line


# Chosen from the sweeps in docs/quickstart.md (config -> accuracy, tokens, minutes): 2-step add/sub
# problems with numbers up to 20 are the hardest a 135M model learns to write in ~7 minutes; the terse
# wording leaves more training steps a minute for the latent stage.
TASK = ("--min-steps", "2", "--max-steps", "2", "--ops", "add,sub", "--max-value", "20", "--style", "terse")


@dataclass(frozen=True)
class Row:
    """One line of the table: a run trained from the model (`init` None) or from another row's run."""
    key: str
    name: str          # as printed in the table
    flags: tuple       # the run's own `train` flags
    init: str = None   # key of the row whose run it starts from
    stage: int = 0


# The paper's Table 1 rows, in its order. COCONUT's controls run the same schedule at the same stage.
ROWS = {r.key: r for r in (
    Row("cot", "CoT", ("--mode", "cot")),
    Row("no-cot", "no-CoT", ("--mode", "no-cot")),
    Row("coconut", "COCONUT", ("--mode", "coconut", "--stage", "1"), init="cot", stage=1),
    Row("pause", "pause as thought", ("--mode", "pause", "--stage", "1"), init="cot", stage=1),
    Row("no-thought", "w/o thought", ("--mode", "no-thought", "--stage", "1"), init="cot", stage=1),
    Row("coconut-2", "COCONUT, whole curriculum", ("--mode", "coconut", "--stage", "2"),
        init="coconut", stage=2),
    # the paper's "pause as thought" row is at its last stage: the same curriculum, pause slots throughout
    Row("pause-2", "pause as thought, whole curriculum", ("--mode", "pause", "--stage", "2"),
        init="pause", stage=2),
    # the paper's "w/o thought" row is at its last stage too: the curriculum drops both steps, no slots
    Row("no-thought-2", "w/o thought, whole curriculum", ("--mode", "no-thought", "--stage", "2"),
        init="no-thought", stage=2),
    Row("no-curriculum", "w/o curriculum", ("--mode", "coconut", "--stage", "2"), init="cot", stage=2),
)}


@dataclass(frozen=True)
class Budget:
    """One size of the quickstart: data, the training flags, and which rows run."""
    train: int
    valid: int
    test: int
    rows: tuple
    synth: tuple = TASK          # extra `data synth` flags (difficulty)
    # flags of every run from the model (CoT, no-CoT); the validation loss on 4 batches (the
    # accuracy on every validation question)
    train_flags: tuple = ("--epochs", "1", "--batch-size", "8", "--lr", "1e-4", "--bucket", "8",
                          "--val-batches", "4")
    # flags of every latent-stage run (started with --init): LoRA on the fully fine-tuned CoT run,
    # cheaper steps that learn the latent stage as well (measured in docs/quickstart.md)
    latent_flags: tuple = ("--c-thought", "2", "--epochs", "4", "--lora")
    max_tokens: int = 24         # new tokens per answer at eval
    note: str = ""


DEFAULT_ROWS = ("cot", "no-cot", "coconut")
BUDGETS = {
    "default": Budget(train=400, valid=100, test=200, rows=DEFAULT_ROWS,
                      note="~17 minutes on a 2-core x86 CPU"),
    # the same data and runs as default, plus the controls and the whole curriculum
    "long": Budget(train=400, valid=100, test=200, rows=tuple(ROWS),
                   note="the default plus six 4-epoch LoRA runs, ~50 minutes on a 2-core x86 CPU"),
    "small": Budget(train=8, valid=2, test=4, rows=tuple(ROWS), synth=("--min-steps", "1", "--max-steps", "2"),
                    latent_flags=("--c-thought", "2", "--epochs", "1", "--lora"), max_tokens=12,
                    note="CI smoke test of every row: a few steps each, ~2-4 minutes"),
}
SPLITS = ("train", "valid", "test")


def split_seeds(seed: int) -> dict:
    """Disjoint `data synth` seeds for the three splits of quickstart seed N: 3N, 3N+1, 3N+2."""
    return {split: 3 * seed + i for i, split in enumerate(SPLITS)}


@dataclass
class Step:
    label: str
    argv: list
    seconds: float = 0.0
    skipped: bool = False
    started: float = None       # run side by side (--jobs): seconds after the first of them started
    blas_threads: int = None    # ... with this many BLAS threads

    @property
    def command(self) -> str:
        return command_line(self.argv)


@dataclass
class Plan:
    out: Path
    budget_name: str
    budget: Budget
    seed: int
    model: Path
    data: dict = field(default_factory=dict)
    runs: dict = field(default_factory=dict)   # row key -> run directory
    steps: list = field(default_factory=list)


def output(out: Path, budget_name: str, name: str) -> Path:
    """OUT/results.json for the default budget, OUT/results-long.json for --budget long, ..."""
    if budget_name == "default":
        return out / name
    stem, ext = name.rsplit(".", 1)
    return out / f"{stem}-{budget_name}.{ext}"


def make_plan(out: Path, budget_name: str, gguf: Path, seed: int = 0) -> Plan:
    """Every step of the quickstart as an `mlx-coconut` command line. `seed` changes every random
    choice (the three splits' questions, data order, initialisation), never the task."""
    from .convert.save import default_dtype

    b = BUDGETS[budget_name]
    dtype = default_dtype()
    plan = Plan(out, budget_name, b, seed, out / "weights" / f"smollm2-135m-instruct-{dtype}")
    plan.steps.append(Step("convert", ["convert", "--hf-path", gguf, "--mlx-path", plan.model,
                                       "--dtype", dtype]))
    plan.data = {split: out / "data" / f"{split}.json" for split in SPLITS}
    seeds = split_seeds(seed)
    for split, n in zip(SPLITS, (b.train, b.valid, b.test)):
        exclude = [] if split == "train" else ["--exclude", plan.data["train"]]  # held out
        plan.steps.append(Step(f"data {split}", ["data", "synth", "--n", n, "--seed", seeds[split],
                                                 *b.synth, *exclude, "--out", plan.data[split]]))
    plan.runs = {key: out / "runs" / key for key in b.rows}
    common = ["--train", plan.data["train"], "--valid", plan.data["valid"], "--eval-samples", b.valid,
              "--max-new-tokens", b.max_tokens, "--save-every", 0, "--seed", seed]
    for key in b.rows:
        row = ROWS[key]
        start = (["--model", plan.model, *common, *b.train_flags] if row.init is None else
                 ["--init", plan.runs[row.init], *b.latent_flags])
        plan.steps.append(Step(f"train {key}", ["train", *start, *row.flags, "--out", plan.runs[key]]))
    # each run on its own (it can start as soon as the run is trained), then one table of them all
    test = ["--data", plan.data["test"], "--max-tokens", b.max_tokens]
    for key in b.rows:
        plan.steps.append(Step(f"eval {key}", ["eval", "--model", plan.runs[key], *test, "--json",
                                               out / "evals" / f"{key}.json"]))
    # the same COCONUT model fed another question's thoughts: do its answers depend on them?
    plan.steps.append(Step("eval swapped", ["eval", "--model", plan.runs["coconut"], "--thoughts", "swapped",
                                            *test, "--json", output(out, budget_name, "swapped.json")]))
    earlier = [a for key in b.rows for a in ("--results", out / "evals" / f"{key}.json")]
    plan.steps.append(Step("results", ["eval", *earlier, "--report", output(out, budget_name, "report.md"),
                                       "--json", output(out, budget_name, "results.json")]))
    plan.steps.append(Step("plot", ["plot", *plan.runs.values(), "--results",
                                    output(out, budget_name, "results.json"),
                                    "--out", output(out, budget_name, "curves.png")]))
    return plan


# the flags a finished run must have been trained with for the quickstart to reuse it
CHECKED = {"--seed": "seed", "--epochs": "epochs", "--stage": "stage", "--mode": "mode",
           "--c-thought": "c_thought", "--batch-size": "batch_size", "--lr": "learning_rate"}
SWITCHES = {"--lora": "lora"}  # checked too: on when the flag is in the command


def _existing_run(run: Path, argv: list):
    """The run (a `Run`, read once) when `run` holds one trained with `argv`'s flags; None when there
    is none; a one-line error when it was trained otherwise (another seed or budget in the same --out)."""
    from .run import Run

    try:
        existing = Run.read(run)
    except (UserError, OSError, ValueError):
        return None
    if existing is None:
        return None
    config = existing.config
    argv = [str(a) for a in argv]
    for flag, name in CHECKED.items():
        if flag in argv and name in config:
            want = argv[argv.index(flag) + 1]
            have = config[name]
            if (float(want) != float(have)) if isinstance(have, (int, float)) else str(want) != str(have):
                raise UserError(f"{run}: trained with {flag} {have}, this quickstart needs {want} "
                                f"(another --seed or an older quickstart in the same --out): use "
                                f"another --out, or --force to retrain")
    for flag, name in SWITCHES.items():
        if name in config and bool(config[name]) != (flag in argv):
            have, want = (flag, "--no-" + flag[2:]) if config[name] else ("--no-" + flag[2:], flag)
            raise UserError(f"{run}: trained with {have}, this quickstart needs {want} (an older "
                            f"quickstart in the same --out): use another --out, or --force to retrain")
    return existing


def execute(plan: Plan, invoke: Callable, log=print, jobs: int = 1, spawn: Callable = None) -> None:
    """Run the plan's steps. Existing runs are continued with `train --resume` (which returns at once
    when complete); the recorded command stays the plain one. Runs trained otherwise (another seed)
    are refused before any step rewrites the data they were trained on. With `jobs` > 1 the runs
    still to train and the evaluations go as child processes, `jobs` at a time, each after the run it
    needs; an evaluation only takes cores no run is using."""
    existing = {step.label: _existing_run(plan.runs[_row(step)], step.argv)
                for step in plan.steps if step.label.startswith("train ")}
    side_by_side = [step for step in plan.steps if jobs > 1 and (
        _is_eval(step) or (step.label in existing and not _complete(existing[step.label])))]
    if len(side_by_side) < 2:
        side_by_side = []  # one step: in this process, its output on the terminal
    for step in plan.steps:
        argv = [str(a) for a in step.argv]
        if step.label == "convert" and (plan.model / "config.json").exists():
            step.skipped = True
            log(f"\n== {step.label}: {plan.model} already converted")
            continue
        if step.label == "plot" and not _has_matplotlib():
            step.skipped = True
            log("\n== plot: skipped (pip install matplotlib to get curves.png)")
            continue
        if any(step is s for s in side_by_side):
            if step is side_by_side[0]:
                _side_by_side(plan, side_by_side, existing, jobs, spawn, log)
            continue
        if existing.get(step.label):
            argv = ["train", "--resume", "--out", str(plan.runs[_row(step)])]
        log(f"\n== {step.label}: {step.command}")
        start = time.perf_counter()
        invoke(argv)
        step.seconds = time.perf_counter() - start


def _row(step: Step) -> str:
    """The row a `train ROW` / `eval ROW` step is about (`eval swapped`: the COCONUT run)."""
    row = step.label.split(" ", 1)[1]
    return "coconut" if row == "swapped" else row


def _is_eval(step: Step) -> bool:
    return step.label.startswith("eval ")


def _complete(run) -> bool:
    try:
        return bool(run and (run.state() or {}).get("complete"))
    except (UserError, OSError, ValueError):
        return False


def _side_by_side(plan: Plan, steps: list, existing: dict, jobs: int, spawn, log) -> None:
    """The training runs and evaluations of `steps` as child processes, `jobs` at a time
    (processes.py): a run after the run it starts from, an evaluation after its run, on spare cores."""
    from . import processes

    labels = {step.label for step in steps}
    tasks = []
    for step in steps:
        key = _row(step)
        if _is_eval(step):
            after = (f"train {key}",) if f"train {key}" in labels else ()
            name = step.label.replace(" ", "-")
            tasks.append(processes.Task(step.label, tuple(step.argv), plan.out / "logs" / f"{name}.log", after,
                                        spare_cores_only=True))
            continue
        argv = (["train", "--resume", "--out", plan.runs[key]] if existing[step.label] else step.argv)
        init = ROWS[key].init
        after = (f"train {init}",) if init and f"train {init}" in labels else ()
        tasks.append(processes.Task(step.label, tuple(argv), plan.out / "logs" / f"{key}.log", after))
    runs = sum(not _is_eval(step) for step in steps)
    log(f"\n== {runs} training runs and {len(tasks) - runs} evaluations, {jobs} at a time as child processes "
        f"(--jobs {jobs}), each after the run it needs; their output: {plan.out / 'logs'}")
    done = processes.run_tasks(tasks, jobs, spawn=spawn or processes.start_process, log=log)
    for step in steps:
        step.seconds, step.started, step.blas_threads = (done[step.label].seconds, done[step.label].started,
                                                         done[step.label].threads)


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


# ---------------------------------------------------------------- reading the results


GOALS = ("CoT accuracy >= 40%", "no-CoT >= 10 points below CoT",
         "COCONUT >= 80% of CoT's accuracy", "COCONUT >= no-CoT + 5 points",
         "COCONUT >= 30% fewer tokens than CoT")
# the long table's goals: COCONUT against each control at the same stage, and the last stage
CONTROL_GOALS = (("pause", "coconut", "COCONUT >= pause as thought + 10 points"),
                 ("no-thought", "coconut", "COCONUT >= w/o thought + 10 points"),
                 ("pause-2", "coconut-2", "whole curriculum >= pause as thought (whole curriculum) + 10 points"),
                 ("no-thought-2", "coconut-2", "whole curriculum >= w/o thought (whole curriculum) + 10 points"),
                 ("no-curriculum", "coconut-2", "whole curriculum >= w/o curriculum + 10 points"))
LAST_STAGE_GOAL = "whole curriculum >= no-CoT + 10 points with <= 6 tokens per question"
# the eval-only row: the COCONUT run fed another question's thoughts (`eval --thoughts swapped`)
SWAPPED = "coconut-swapped"
SWAPPED_NAME = "COCONUT, another question's thoughts"
DEPENDS = 0.05  # accuracy COCONUT must lose with another question's thoughts to "depend" on its own


def summarize(results: dict, runs: dict, swapped: dict = None) -> dict:
    """{row key: {name, label, n, accuracy, tokens, stage}} from an `eval --json` document,
    recounted from its per-question records; `runs` maps row keys to run directories. `swapped` (the
    swapped-thoughts eval of the COCONUT run) adds the SWAPPED row, with the share of questions
    whose answer changed."""
    by_path = {str(Path(m["path"])): m for m in results["models"]}
    rows = {}
    for key, run in runs.items():
        m = by_path.get(str(Path(run)))
        if m is None:
            raise UserError(f"results have no {key} model ({run})")
        rows[key] = _row_numbers(m, ROWS[key].name, ROWS[key].stage)
    if swapped is not None:
        m = swapped["models"][0]
        own = by_path[str(Path(runs["coconut"]))]["examples"]
        rows[SWAPPED] = _row_numbers(m, SWAPPED_NAME, ROWS["coconut"].stage)
        rows[SWAPPED]["changed"] = sum(a["prediction"] != b["prediction"]
                                       for a, b in zip(own, m["examples"])) / max(len(own), 1)
    return rows


def _row_numbers(model: dict, name: str, stage: int) -> dict:
    ex = model["examples"]
    n = max(len(ex), 1)
    return {"name": name, "label": model["label"], "n": len(ex), "stage": stage,
            "accuracy": sum(e["correct"] for e in ex) / n,
            "tokens": sum(e["n_generated"] + e["n_latents"] for e in ex) / n}


def goals(s: dict) -> list:
    """[(goal, met)] for the rows present: the five of the demonstration, then the long table's."""
    cot, nocot, coco = s["cot"], s["no-cot"], s["coconut"]
    saved = 1 - coco["tokens"] / cot["tokens"] if cot["tokens"] else 0.0
    met = list(zip(GOALS, (
        _at_least(cot["accuracy"], 0.40),
        _at_least(cot["accuracy"], nocot["accuracy"] + 0.10),
        _at_least(coco["accuracy"], 0.8 * cot["accuracy"]),
        _at_least(coco["accuracy"], nocot["accuracy"] + 0.05),
        _at_least(saved, 0.30))))
    for control, ref, goal in CONTROL_GOALS:
        if control in s and ref in s:
            met.append((goal, _at_least(s[ref]["accuracy"], s[control]["accuracy"] + 0.10)))
    if "coconut-2" in s:
        last = s["coconut-2"]
        met.append((LAST_STAGE_GOAL, _at_least(last["accuracy"], nocot["accuracy"] + 0.10)
                    and last["tokens"] <= 6))
    return met


def _at_least(x: float, bound: float) -> bool:
    """x >= bound for fractions of questions: 0.3 vs 0.2 + 0.1 is a tie, not a float miss."""
    return x >= bound - 1e-9


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def interpret(results: dict, runs: dict, swapped: dict = None) -> str:
    """One paragraph that reads the numbers of an `eval --json` document (and the swapped-thoughts
    eval), every row that ran."""
    s = summarize(results, runs, swapped)
    cot, nocot, coco = s["cot"], s["no-cot"], s["coconut"]
    kept = coco["accuracy"] / cot["accuracy"] if cot["accuracy"] else 0.0
    saved = 1 - coco["tokens"] / cot["tokens"] if cot["tokens"] else 0.0
    gap = coco["accuracy"] - nocot["accuracy"]
    text = (f"On {cot['n']} held-out questions, COCONUT ({coco['label']}) answered "
            f"{_pct(coco['accuracy'])} correctly, {100 * kept:.0f}% of CoT's {_pct(cot['accuracy'])}, "
            f"with {100 * abs(saved):.0f}% {'fewer' if saved >= 0 else 'more'} tokens per question "
            f"({coco['tokens']:.1f} vs {cot['tokens']:.1f}, continuous thoughts counted as tokens). "
            f"No-CoT, trained with the same budget to answer at once, reached "
            f"{_pct(nocot['accuracy'])}, so COCONUT is {100 * abs(gap):.1f} points "
            f"{'above' if gap >= 0 else 'below'} it. ")
    controls = [(s[c], s[r]) for c, r, _ in CONTROL_GOALS if c in s and r in s]
    if controls:
        text += "Controls at the same stage and schedule: " + "; ".join(
            f"{c['name']} {_pct(c['accuracy'])} ({_points(r['accuracy'] - c['accuracy'])} for "
            f"{r['name']})" for c, r in controls) + ". "
    else:
        text += ("No training control ran, so nothing here separates the thought slots from the extra "
                 "positions and epochs they come with: --budget long adds pause as thought and w/o "
                 "thought at the same stage and schedule. ")
    if SWAPPED in s:
        sw = s[SWAPPED]
        depends = coco["accuracy"] - sw["accuracy"] >= DEPENDS - 1e-9
        text += (f"Fed another question's continuous thoughts in place of its own, COCONUT answered "
                 f"{_pct(sw['accuracy'])} ({_points(sw['accuracy'] - coco['accuracy'])}; "
                 f"{100 * sw['changed']:.1f}% of its answers changed): "
                 + ("its answers depend on what its thoughts carry. " if depends else
                    "its answers hardly depend on what its thoughts carry, so what COCONUT gains here "
                    "does not come from the thoughts' content. "))
    if "coconut-2" in s:
        last = s["coconut-2"]
        text += (f"With both steps as continuous thoughts (stage 2), COCONUT answered "
                 f"{_pct(last['accuracy'])} with {last['tokens']:.1f} tokens per question, writing no "
                 f"step. ")
    met = goals(s)
    missed = [g for g, ok in met if not ok]
    text += (f"All {len(met)} goals are met." if not missed else
             f"{len(met) - len(missed)} of {len(met)} goals are met; missed: {'; '.join(missed)}.")
    return text


def _points(d: float) -> str:
    return f"{100 * d:+.1f} points"


def table(results: dict, runs: dict, swapped: dict = None) -> str:
    """The paper's Table 1 in miniature: one line per row, accuracy and tokens."""
    s = summarize(results, runs, swapped)
    width = max(len(r["name"]) for r in s.values()) + 2
    lines = [f"{'method'.ljust(width)}stage  accuracy  tokens/question"]
    for r in s.values():
        lines.append(f"{r['name'].ljust(width)}{r['stage']:>5}  {_pct(r['accuracy']):>8}  {r['tokens']:>15.1f}")
    return "\n".join(lines)


# ---------------------------------------------------------------- entry point


def default_out(seed: int) -> str:
    return "quickstart" if seed == 0 else f"quickstart-seed{seed}"


def run(out_dir, budget: str = "default", seed: int = 0, force: bool = False, invoke: Callable = None,
        log=print, jobs: int = None, spawn: Callable = None) -> dict:
    """The whole quickstart → {"plan", "results", "interpretation", "table", "seconds", "coconut", ...}."""
    from . import assets

    if budget not in BUDGETS:
        raise UserError(f"--budget {budget}: choose from {', '.join(BUDGETS)}")
    if seed < 0:
        raise UserError(f"--seed must be >= 0 (got {seed})")
    if jobs is not None and jobs < 1:
        raise UserError(f"--jobs must be >= 1 (got {jobs})")
    start = time.perf_counter()
    out = Path(out_dir if out_dir is not None else default_out(seed))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create ({e.strerror or e})") from None
    plan = make_plan(out, budget, assets.smollm2_gguf(), seed)
    if force:
        for d in plan.runs.values():
            shutil.rmtree(d, ignore_errors=True)
    b = plan.budget
    log(f"quickstart ({budget}, seed {seed}: {b.note}): SmolLM2-135M-Instruct, {b.train} synthetic "
        f"training problems, {b.test} held-out test questions; runs: "
        f"{', '.join(ROWS[k].name for k in b.rows)} -> {out}")
    if jobs is None:
        from .processes import default_jobs
        jobs = default_jobs()
    execute(plan, invoke, log, jobs=jobs, spawn=spawn)
    results = json.loads(output(out, budget, "results.json").read_text())
    swapped = json.loads(output(out, budget, "swapped.json").read_text())
    text, rows = interpret(results, plan.runs, swapped), table(results, plan.runs, swapped)
    summary = summarize(results, plan.runs, swapped)
    seconds = time.perf_counter() - start
    record = {"budget": budget, "seed": seed, "budget_flags": asdict(b), "jobs": jobs, "seconds": round(seconds, 1),
              "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores",
              "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
              "steps": [_step_record(s) for s in plan.steps],
              "rows": summary, "goals": [{"goal": g, "met": ok} for g, ok in goals(summary)],
              "interpretation": text}
    output(out, budget, "quickstart.json").write_text(json.dumps(record, indent=2))
    _append_to_report(output(out, budget, "report.md"), rows, text, output(out, budget, "curves.png"))
    return {"plan": plan, "results": results, "interpretation": text, "table": rows, "seconds": seconds,
            "coconut": str(plan.runs["coconut"]), "report": str(output(out, budget, "report.md")),
            "record": str(output(out, budget, "quickstart.json")),
            "question": results["models"][0]["examples"][0]["question"]}


def _step_record(step: Step) -> dict:
    record = {"label": step.label, "command": step.command, "seconds": round(step.seconds, 1),
              "skipped": step.skipped}
    if step.started is not None:  # beside other runs: its seconds overlap theirs
        record.update(started=round(step.started, 1), blas_threads=step.blas_threads)
    return record


def _append_to_report(report: Path, rows: str, text: str, picture: Path) -> None:
    """The eval's report.md, then the table, the paragraph and the picture (when it was drawn)."""
    lines = ["", "## The table in miniature", "", "```", rows, "```", "", "## What this shows", "", text, ""]
    if picture.exists():
        lines += [f"![learning curves and accuracy against tokens per question]({picture.name})", ""]
    with report.open("a") as f:
        f.write("\n".join(lines))
