"""Stages side by side (`mlx-coconut eval`) and training curves (`mlx-coconut plot`).

`compare` loads each model (model or run directory) in turn and scores it with `evaluate.evaluate`
(its own prompt form from its settings, batched cached greedy generation, official answer extraction).
The renderers turn the results into the seed's text block, a markdown report and a JSON document.

Token counts follow the paper's "# tokens": generated text tokens plus continuous thoughts (each thought
is one forward pass, as a generated token is); the report also gives both parts separately.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from .errors import UserError


@dataclass
class ModelResult:
    path: str
    label: str          # "Stage 0 (CoT)", "Stage 1 (COCONUT)", ...
    results: object     # evaluate.EvalResults

    @property
    def text_tokens(self) -> float:
        return self.results.mean_generated_tokens

    @property
    def thoughts(self) -> float:
        ex = self.results.examples
        return sum(e["n_latents"] for e in ex) / max(len(ex), 1)

    @property
    def tokens(self) -> float:
        """Paper-style token count: text tokens + continuous thoughts."""
        return self.text_tokens + self.thoughts


MODE_NAMES = {"cot": "CoT", "coconut": "COCONUT", "no-cot": "no-CoT", "pause": "pause as thought",
              "no-thought": "w/o thought"}


def stage_label(settings) -> str:
    if settings.mode in ("cot", "no-cot"):
        return f"Stage 0 ({MODE_NAMES[settings.mode]})"
    c = f", c={settings.c_thought}" if settings.c_thought != 1 else ""
    return f"Stage {settings.stage} ({MODE_NAMES.get(settings.mode, settings.mode)}{c})"


def model_source(path):
    """What `--model path` names, read once: its `Run` (a run directory with a checkpoint), else the
    path, checked to be a model directory."""
    from .run import Run

    run = Run.read(path)
    if run is None:
        check_model_dir(path)
    return path if run is None else run


def check_model_dir(path) -> Path:
    from .run import split_ref

    p = split_ref(path)[0]  # RUN:best / RUN:latest name a directory too
    if not p.is_dir():
        raise UserError(f"--model {path}: no such directory")
    if not (p / "config.json").exists() and not (p / "coconut.json").exists():
        raise UserError(f"--model {path}: not a model directory (no config.json) or run directory "
                        f"(no coconut.json)")
    return p


def compare(models, records, batch_size: int = 32, max_tokens: int = 64, dtype=None,
            progress: Optional[Callable] = None, thoughts: str = "own") -> list:
    """Evaluate each model on `records` → [ModelResult]. Models are loaded one at a time (only one in
    memory). `progress(label, total)` returns a context manager with `.update(n)` (click.progressbar).
    `thoughts` (evaluate.THOUGHTS) other than "own" needs every model to be a COCONUT one."""
    from .checkpoint import load
    from .evaluate import evaluate

    sources = [model_source(m) for m in models]  # fail before spending minutes on the first model
    out = []
    for m, source in zip(models, sources):
        loaded = load(source, dtype=dtype)
        if thoughts != "own" and loaded.settings.mode != "coconut":
            raise UserError(f"--thoughts {thoughts}: --model {m} is a {loaded.settings.mode} model; "
                            f"only a COCONUT model feeds thoughts back")
        label = stage_label(loaded.settings) + ("" if thoughts == "own" else f", thoughts {thoughts}")
        if progress is None:
            res = evaluate(loaded, None, None, records, batch_size=batch_size, max_tokens=max_tokens,
                           thoughts=thoughts)
        else:
            with progress(label, len(records)) as bar:
                done = [0]

                def step(n):
                    bar.update(n - done[0])
                    done[0] = n

                res = evaluate(loaded, None, None, records, batch_size=batch_size,
                               max_tokens=max_tokens, progress=step, thoughts=thoughts)
        out.append(ModelResult(str(m), label, res))
        del loaded
    disambiguate(out)
    return out


def disambiguate(results):
    """Two runs with the same settings get their paths appended so the lines stay distinguishable."""
    labels = [r.label for r in results]
    for r in results:
        if labels.count(r.label) > 1:
            r.label = f"{r.label} [{Path(r.path).name}]"


# ---------------------------------------------------------------- numbers


def efficiency(base: ModelResult, other: ModelResult) -> float:
    """% fewer tokens of `other` than `base` (negative = more)."""
    return 100.0 * (base.tokens - other.tokens) / base.tokens if base.tokens > 0 else 0.0


def quality(base: ModelResult, other: ModelResult) -> float:
    """Accuracy change in percentage points."""
    return 100.0 * (other.results.accuracy - base.results.accuracy)


def _gain_text(e: float) -> str:
    return f"{e:.0f}% fewer tokens" if e >= 0 else f"{-e:.0f}% more tokens"


def _short(text: str, n: int = 80) -> str:
    text = text.replace("\n", "⏎ ")
    return text if len(text) <= n else text[: n - 1] + "…"


def _answer(r: ModelResult, i: int) -> str:
    e = r.results.examples[i]
    pred = _short(e["prediction"]) if e["prediction"] else "(empty)"
    return f"{pred} ({'correct' if e['correct'] else 'wrong'})"


def _comparisons(results):
    base = results[0]
    return [(base, o) for o in results[1:]]


# ---------------------------------------------------------------- renderers


def render_text(results, n_examples: int = 3) -> str:
    """The seed's block: one line per model, efficiency and quality vs the first model, examples."""
    width = max(len(r.label) for r in results) + 3
    lines = []
    for r in results:
        res = r.results
        lines.append(f"{(r.label + ':').ljust(width)}Accuracy = {100 * res.accuracy:.2f}%  "
                     f"Avg tokens = {r.tokens:.1f}  Time = {res.seconds:.1f}s")
    for base, o in _comparisons(results):
        tag = "" if len(results) == 2 else f" ({o.label} vs {base.label})"
        lines.append(f"Efficiency gain{tag}: {_gain_text(efficiency(base, o))}")
        lines.append(f"Quality{tag}: {quality(base, o):+.2f}% accuracy change")
    lines.append("CoT exact match: " + "  ".join(
        f"{r.label} {100 * r.results.cot_match:.2f}%" for r in results))
    lines.append(f"(n = {results[0].results.n} questions; Avg tokens = generated text tokens + "
                 f"continuous thoughts, as in the paper)")
    n = results[0].results.n
    for k, i in enumerate(range(min(n_examples, n)), 1):
        e0 = results[0].results.examples[i]
        lines.append(f"Example {k}:")
        lines.append(f"  Question: {e0['question']}")
        for r in results:
            lines.append(f"  {r.label} answer: {_answer(r, i)}")
        lines.append(f"  Ground truth: {e0['answer']}")
    return "\n".join(lines)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "⏎ ")


def render_markdown(results, data: str = "", max_tokens: Optional[int] = None,
                    n_examples: int = 5) -> str:
    n = results[0].results.n
    out = ["# mlx-coconut eval", ""]
    out.append(f"Data: `{data}` — {n} questions; greedy decoding"
               + (f", at most {max_tokens} new tokens" if max_tokens else "") + ".")
    out += ["", "| model | path | accuracy | correct | CoT exact match | avg tokens (text + thoughts) "
            "| text tokens | thoughts | time (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        res = r.results
        correct = sum(e["correct"] for e in res.examples)
        out.append(f"| {r.label} | `{r.path}` | {100 * res.accuracy:.2f}% | {correct}/{res.n} | "
                   f"{100 * res.cot_match:.2f}% | {r.tokens:.1f} | {r.text_tokens:.1f} | "
                   f"{r.thoughts:.1f} | {res.seconds:.1f} |")
    if len(results) > 1:
        out += ["", "| vs " + results[0].label + " | efficiency gain | quality |", "|---|---|---|"]
        for base, o in _comparisons(results):
            out.append(f"| {o.label} | {_gain_text(efficiency(base, o))} | "
                       f"{quality(base, o):+.2f}% accuracy |")
    out += ["", "## Examples", ""]
    for k in range(min(n_examples, n)):
        e0 = results[0].results.examples[k]
        out += [f"**Example {k + 1}.** {_md_escape(e0['question'])}", "",
                "| model | answer | | generated |", "|---|---|---|---|"]
        for r in results:
            e = r.results.examples[k]
            out.append(f"| {r.label} | {_md_escape(e['prediction']) or '(empty)'} | "
                       f"{'correct' if e['correct'] else 'wrong'} | `{_md_escape(e['generated'])}` |")
        out += ["", f"Ground truth: {e0['answer']}", ""]
    return "\n".join(out) + "\n"


def to_json(results, data: str = "", max_tokens: Optional[int] = None) -> dict:
    models = []
    for r in results:
        models.append({"path": r.path, "label": r.label, "settings": r.results.settings,
                       **r.results.summary(), "correct": sum(e["correct"] for e in r.results.examples),
                       "mean_thoughts": r.thoughts, "mean_tokens": r.tokens,
                       "examples": r.results.examples})
    comps = [{"model": o.label, "baseline": b.label, "efficiency_gain_pct": efficiency(b, o),
              "accuracy_change_pct": quality(b, o)} for b, o in _comparisons(results)]
    return {"data": data, "n": results[0].results.n, "max_tokens": max_tokens, "models": models,
            "comparisons": comps}


def read_results(path) -> tuple:
    """An `eval --json` file read back → ([ModelResult], data, max_tokens), to compare its models with
    others without evaluating them again (`eval --results`)."""
    from .evaluate import EvalResults

    try:
        doc = json.loads(Path(path).read_text())
        results = [ModelResult(m["path"], m["label"], EvalResults(
            m["examples"], m["accuracy"], m["cot_match"], m["mean_generated_tokens"], m["seconds"],
            m.get("settings", {}))) for m in doc["models"]]
        return results, doc["data"], doc["max_tokens"]
    except OSError as e:
        raise UserError(f"--results {path}: cannot read ({e.strerror or e})") from None
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"--results {path}: not an `eval --json` file ({type(e).__name__}: {e})") from None


def write_outputs(results, report: Optional[str], json_path: Optional[str], data: str,
                  max_tokens: int):
    for path, text in ((report, lambda: render_markdown(results, data, max_tokens)),
                       (json_path, lambda: json.dumps(to_json(results, data, max_tokens), indent=2))):
        if not path:
            continue
        p = Path(path)
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text())
        except OSError as e:
            raise UserError(f"{path}: cannot write ({e.strerror or e})") from None


# ---------------------------------------------------------------- curves


def read_curves(run) -> dict:
    """{"stage", "steps", "loss", "eval": [{step, accuracy, valid_loss}]} of one run directory."""
    run = Path(run)
    metrics = run / "metrics.jsonl"
    if not run.is_dir():
        raise UserError(f"{run}: no such run directory")
    if not metrics.exists():
        raise UserError(f"{run}: no metrics.jsonl (not a training run directory?)")
    steps, loss, stage = [], [], None
    for i, line in enumerate(metrics.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            m = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{metrics}:{i}: invalid JSON") from None
        steps.append(m["step"])
        loss.append(m["loss"])
        stage = m.get("stage", stage)
    evals = []
    if (run / "eval.json").exists():
        try:
            evals = [e for e in json.loads((run / "eval.json").read_text()) if "step" in e]
        except json.JSONDecodeError:
            raise UserError(f"{run / 'eval.json'}: invalid JSON") from None
    if stage is None and evals:
        stage = evals[0].get("stage")
    return {"run": str(run), "stage": stage, "steps": steps, "loss": loss, "eval": evals}


def read_points(results_json) -> list:
    """[(label, tokens per question, accuracy %)] of an `eval --json` document."""
    path = Path(results_json)
    try:
        models = json.loads(path.read_text())["models"]
        return [(m["label"], m["mean_tokens"], 100 * m["accuracy"]) for m in models]
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{path}: not an `mlx-coconut eval --json` document") from None


def _plot_tradeoff(ax, points):
    """The paper's trade-off: accuracy against tokens per question, one point per model, named in
    the legend (labels written beside the points overlap where rows land close together)."""
    for i, (label, tokens, accuracy) in enumerate(points):
        ax.scatter([tokens], [accuracy], s=50, color=f"C{i}", zorder=3, label=label)
    ax.set(xlabel="tokens per question (text + continuous thoughts)", ylabel="test accuracy (%)",
           title="accuracy vs tokens (held-out test)", ylim=(-2, 102))
    ax.set_xlim(left=0, right=max(t for _, t, _ in points) * 1.1 + 1)
    ax.legend(fontsize=7, loc="best")  # where it covers fewest points


def _plot_curves(ax_loss, ax_acc, curves):
    """Training loss (raw and smoothed), validation loss and accuracy of each run, laid end to end."""
    offset = 0
    for i, c in enumerate(curves):
        color = f"C{i}"
        name = f"stage {c['stage']}" if c["stage"] is not None else Path(c["run"]).name
        name += f" ({Path(c['run']).name})"
        xs = [offset + s for s in c["steps"]]
        ax_loss.plot(xs, c["loss"], color=color, alpha=0.35, lw=1)
        if len(c["loss"]) >= 5:  # a moving average makes the trend readable through the noise
            k = max(len(c["loss"]) // 20, 3)
            sm = [sum(c["loss"][max(0, j - k + 1):j + 1]) / len(c["loss"][max(0, j - k + 1):j + 1])
                  for j in range(len(c["loss"]))]
            ax_loss.plot(xs, sm, color=color, lw=2, label=f"{name} train")
        else:
            ax_loss.plot(xs, c["loss"], color=color, lw=2, label=f"{name} train")
        ev = [e for e in c["eval"] if e.get("valid_loss") is not None and math.isfinite(e["valid_loss"])]
        if ev:
            ax_loss.plot([offset + e["step"] for e in ev], [e["valid_loss"] for e in ev], "o--",
                         color=color, label=f"{name} valid")
        acc = [e for e in c["eval"] if e.get("accuracy") is not None]
        if acc:
            ax_acc.plot([offset + e["step"] for e in acc], [100 * e["accuracy"] for e in acc], "o-",
                        color=color, label=name)
        if i:
            ax_loss.axvline(offset, color="grey", lw=0.8, ls=":")
            ax_acc.axvline(offset, color="grey", lw=0.8, ls=":")
        offset += max(c["steps"], default=0)
    ax_loss.set(xlabel="optimizer step", ylabel="loss (per label token)", title="loss")
    ax_acc.set(xlabel="optimizer step", ylabel="accuracy (%)", title="validation accuracy (greedy)",
               ylim=(-2, 102))


def plot_runs(runs, out, results_json=None) -> Path:
    """Loss (and validation loss) and validation accuracy over optimizer steps, one colour per run.
    Runs are laid end to end (stage 1 starts where stage 0 ended), as the curriculum runs them. With
    `results_json` (an `eval --json` document) a third panel: accuracy against tokens per question."""
    curves = [read_curves(r) for r in runs]  # bad run directories are reported before a missing extra
    points = read_points(results_json) if results_json else None
    try:
        import matplotlib
    except ImportError:
        raise UserError("plot needs matplotlib: pip install 'mlx-coconut[plot]' "
                        "(or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3 if points else 2, figsize=(17 if points else 11, 4))
    ax_loss, ax_acc = axes[:2]
    if points:
        _plot_tradeoff(axes[2], points)
    _plot_curves(ax_loss, ax_acc, curves)
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=110)
    except OSError as e:
        raise UserError(f"--out {out}: cannot write ({e.strerror or e})") from None
    finally:
        plt.close(fig)
    return out
