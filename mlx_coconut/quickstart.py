"""`mlx-coconut quickstart`: the paper's table in miniature, on an embedded default, on a laptop CPU.

SmolLM2-135M-Instruct (the GGUF inside a PyPI wheel, converted by our converter) + synthetic word
problems from `data synth` (disjoint seeds, held-out questions never seen in training) → three runs
from the same model with the same budget: CoT (stage 0), no-CoT, and COCONUT (stage k from the CoT
run) → all three evaluated side by side on the held-out questions → learning curves → a paragraph
that reads the numbers.

Every step is an ordinary `mlx-coconut` command line, run in-process through `invoke` and written to
`OUT/quickstart.json`, so any step can be re-run by hand with the same result. Nothing here reaches
into the library past those commands. Re-running continues where it stopped (complete runs are kept).
"""

import json
import os
import platform
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from .errors import UserError


# Chosen from the sweep in docs/quickstart.md (config -> accuracy, tokens, minutes): 2-step add/sub
# problems with numbers up to 20 are the hardest a 135M model learns to write in ~7 minutes.
TASK = ("--min-steps", "2", "--max-steps", "2", "--ops", "add,sub", "--max-value", "20")


@dataclass(frozen=True)
class Budget:
    """One size of the quickstart: data, and the flags of the three training runs and the eval."""
    train: int
    valid: int
    test: int
    synth: tuple = TASK          # extra `data synth` flags (difficulty)
    # flags shared by the CoT and no-CoT runs
    train_flags: tuple = ("--epochs", "1", "--batch-size", "8", "--lr", "1e-4", "--bucket", "8")
    # flags of the COCONUT run (started with --init from the CoT run)
    latent_flags: tuple = ("--stage", "1", "--c-thought", "1", "--epochs", "1")
    max_tokens: int = 24         # new tokens per answer at eval
    coconut_run: str = "coconut"  # its own name, so budgets that differ only here share the rest
    note: str = ""


BUDGETS = {
    "default": Budget(train=400, valid=16, test=200, note="~12 minutes on a 2-core x86 CPU"),
    # the same data, CoT and no-CoT runs; three epochs at stage 1 (official: 3 epochs per stage)
    "long": Budget(train=400, valid=16, test=200, coconut_run="coconut-3ep",
                   latent_flags=("--stage", "1", "--c-thought", "1", "--epochs", "3"),
                   note="~19 minutes on a 2-core x86 CPU; ~13 after a default run in the same --out"),
    "small": Budget(train=8, valid=2, test=4, synth=("--min-steps", "1", "--max-steps", "2"),
                    max_tokens=12, note="CI smoke test: a few steps, ~1-3 minutes"),
}
SEEDS = {"train": 0, "valid": 1, "test": 2}  # disjoint generators for the three splits
RUNS = ("cot", "no-cot", "coconut")


@dataclass
class Step:
    label: str
    argv: list
    seconds: float = 0.0
    skipped: bool = False

    @property
    def command(self) -> str:
        return "mlx-coconut " + " ".join(shlex.quote(str(a)) for a in self.argv)


@dataclass
class Plan:
    out: Path
    budget_name: str
    budget: Budget
    model: Path
    data: dict = field(default_factory=dict)
    runs: dict = field(default_factory=dict)
    steps: list = field(default_factory=list)


def output(out: Path, budget_name: str, name: str) -> Path:
    """OUT/results.json for the default budget, OUT/results-long.json for --budget long, ..."""
    if budget_name == "default":
        return out / name
    stem, ext = name.rsplit(".", 1)
    return out / f"{stem}-{budget_name}.{ext}"


def make_plan(out: Path, budget_name: str, gguf: Path) -> Plan:
    """Every step of the quickstart as an `mlx-coconut` command line."""
    from .convert.save import default_dtype

    b = BUDGETS[budget_name]
    dtype = default_dtype()
    plan = Plan(out, budget_name, b, out / "weights" / f"smollm2-135m-instruct-{dtype}")
    plan.steps.append(Step("convert", ["convert", "--hf-path", gguf, "--mlx-path", plan.model,
                                       "--dtype", dtype]))
    plan.data = {split: out / "data" / f"{split}.json" for split in ("train", "valid", "test")}
    for split, n in (("train", b.train), ("valid", b.valid), ("test", b.test)):
        exclude = [] if split == "train" else ["--exclude", plan.data["train"]]  # held out
        plan.steps.append(Step(f"data {split}", ["data", "synth", "--n", n, "--seed", SEEDS[split],
                                                 *b.synth, *exclude, "--out", plan.data[split]]))
    plan.runs = {name: out / "runs" / (b.coconut_run if name == "coconut" else name) for name in RUNS}
    common = ["--train", plan.data["train"], "--valid", plan.data["valid"], "--eval-samples", b.valid,
              "--max-new-tokens", b.max_tokens, "--save-every", 0, "--seed", 0]
    plan.steps.append(Step("train cot", ["train", "--model", plan.model, "--mode", "cot",
                                         *common, *b.train_flags, "--out", plan.runs["cot"]]))
    plan.steps.append(Step("train no-cot", ["train", "--model", plan.model, "--mode", "no-cot",
                                            *common, *b.train_flags, "--out", plan.runs["no-cot"]]))
    plan.steps.append(Step("train coconut", ["train", "--init", plan.runs["cot"], "--mode", "coconut",
                                             *b.latent_flags, "--out", plan.runs["coconut"]]))
    models = [a for name in RUNS for a in ("--model", plan.runs[name])]
    plan.steps.append(Step("eval", ["eval", *models, "--data", plan.data["test"], "--max-tokens",
                                    b.max_tokens, "--report", output(out, budget_name, "report.md"),
                                    "--json", output(out, budget_name, "results.json")]))
    plan.steps.append(Step("plot", ["plot", *[plan.runs[n] for n in RUNS],
                                    "--out", output(out, budget_name, "curves.png")]))
    return plan


def _run_state(run: Path):
    from .checkpoint import read_run

    try:
        return read_run(run)
    except (UserError, OSError, ValueError):
        return None


def execute(plan: Plan, invoke: Callable, log=print) -> None:
    """Run the plan's steps. Existing runs are continued with `train --resume` (which returns at once
    when complete); the recorded command stays the plain one."""
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
        if step.label.startswith("train"):
            run = Path(argv[argv.index("--out") + 1])
            if _run_state(run) is not None:
                argv = ["train", "--resume", "--out", str(run)]
        log(f"\n== {step.label}: {step.command}")
        start = time.perf_counter()
        invoke(argv)
        step.seconds = time.perf_counter() - start


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


def summarize(results: dict) -> dict:
    """CoT / no-CoT / COCONUT accuracy and tokens from an `eval --json` document, recounted from its
    per-question records."""
    by_mode = {}
    for m in results["models"]:
        ex = m["examples"]
        n = max(len(ex), 1)
        by_mode[m["settings"]["mode"]] = {
            "label": m["label"], "n": len(ex),
            "accuracy": sum(e["correct"] for e in ex) / n,
            "tokens": sum(e["n_generated"] + e["n_latents"] for e in ex) / n}
    missing = [k for k in ("cot", "no-cot", "coconut") if k not in by_mode]
    if missing:
        raise UserError(f"results have no {', '.join(missing)} model")
    return by_mode


def goals(s: dict) -> list:
    """[(goal, met)] for the five goals of the demonstration."""
    cot, nocot, coco = s["cot"], s["no-cot"], s["coconut"]
    saved = 1 - coco["tokens"] / cot["tokens"] if cot["tokens"] else 0.0
    return list(zip(GOALS, (
        cot["accuracy"] >= 0.40,
        nocot["accuracy"] <= cot["accuracy"] - 0.10,
        coco["accuracy"] >= 0.8 * cot["accuracy"],
        coco["accuracy"] >= nocot["accuracy"] + 0.05,
        saved >= 0.30)))


def interpret(results: dict) -> str:
    """One paragraph that reads the numbers of an `eval --json` document."""
    s = summarize(results)
    cot, nocot, coco = s["cot"], s["no-cot"], s["coconut"]
    kept = coco["accuracy"] / cot["accuracy"] if cot["accuracy"] else 0.0
    saved = 1 - coco["tokens"] / cot["tokens"] if cot["tokens"] else 0.0
    gap = coco["accuracy"] - nocot["accuracy"]
    text = (f"On {cot['n']} held-out questions, COCONUT ({coco['label']}) answered "
            f"{100 * coco['accuracy']:.1f}% correctly, {100 * kept:.0f}% of CoT's "
            f"{100 * cot['accuracy']:.1f}%, with {100 * abs(saved):.0f}% "
            f"{'fewer' if saved >= 0 else 'more'} tokens per question "
            f"({coco['tokens']:.1f} vs {cot['tokens']:.1f}, continuous thoughts counted as tokens). "
            f"No-CoT, trained with the same budget to answer at once, reached "
            f"{100 * nocot['accuracy']:.1f}%, so COCONUT is {100 * abs(gap):.1f} points "
            f"{'above' if gap >= 0 else 'below'} it. ")
    met = goals(s)
    missed = [g for g, ok in met if not ok]
    text += ("All five goals are met." if not missed else
             f"{len(met) - len(missed)} of {len(met)} goals are met; missed: {'; '.join(missed)}.")
    return text


# ---------------------------------------------------------------- entry point


def run(out_dir, budget: str = "default", force: bool = False, invoke: Callable = None,
        log=print) -> dict:
    """The whole quickstart → {"plan", "results", "interpretation", "seconds", "coconut"}."""
    from . import assets

    if budget not in BUDGETS:
        raise UserError(f"--budget {budget}: choose from {', '.join(BUDGETS)}")
    start = time.perf_counter()
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create ({e.strerror or e})") from None
    plan = make_plan(out, budget, assets.smollm2_gguf())
    if force:
        for d in plan.runs.values():
            shutil.rmtree(d, ignore_errors=True)
    b = plan.budget
    log(f"quickstart ({budget}: {b.note}): SmolLM2-135M-Instruct, {b.train} synthetic training "
        f"problems, {b.test} held-out test questions; CoT, no-CoT and COCONUT runs -> {out}")
    execute(plan, invoke, log)
    results = json.loads(output(out, budget, "results.json").read_text())
    text = interpret(results)
    seconds = time.perf_counter() - start
    record = {"budget": budget, "budget_flags": asdict(b), "seconds": round(seconds, 1),
              "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores",
              "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
              "steps": [{"label": s.label, "command": s.command, "seconds": round(s.seconds, 1),
                         "skipped": s.skipped} for s in plan.steps],
              "interpretation": text}
    output(out, budget, "quickstart.json").write_text(json.dumps(record, indent=2))
    return {"plan": plan, "results": results, "interpretation": text, "seconds": seconds,
            "coconut": str(plan.runs["coconut"]), "report": str(output(out, budget, "report.md")),
            "record": str(output(out, budget, "quickstart.json")),
            "question": results["models"][0]["examples"][0]["question"]}
