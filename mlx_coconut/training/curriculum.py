"""The entry point: one stage, or a curriculum of stages each in its own run directory `OUT/stageK`
(official schedule: each from the previous one's weights, a fresh optimizer per stage). A stage is
wired here: its `Stage`, its `RunDir`, its callbacks around the generic loop of `trainer.py`."""

import contextlib
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import mlx.core as mx

from .. import distributed
from ..errors import UserError
from ..options import TrainConfig
from ..run import Run
from ..trainer import train_loop
from .callbacks import StageCallbacks
from .config import parse_stages, start
from .progress import Interrupt, Progress, StartClock
from .rundir import RunDir
from .stage import Stage
from .step import all_sum_reducer, check_ranks


def run(config: TrainConfig, log=print, started: Optional[float] = None) -> dict:
    """Train one stage, or a curriculum of stages (`config.stages`). Returns a summary dict.
    `started`: the `time.perf_counter()` of the process start (the CLI's), so that the first
    stage's "first step done" line counts the imports; None counts from the stage's start."""
    if not distributed.setup().main:
        log = quiet  # under `mlx.launch` rank 0 alone prints
    if config.stages:
        return run_curriculum(config, log, started)
    return train_stage(config, log, started)


def run_curriculum(config: TrainConfig, log=print, started: Optional[float] = None) -> dict:
    """Official schedule: stage s for `epochs_per_stage` epochs, optimizer reset at each stage.
    With both `epochs_per_stage` and `epochs` (the official `num_epochs`: the whole schedule), the
    last stage runs the remaining epochs, as the official loop keeps going at its final stage."""
    stages = parse_stages(config.stages)
    if not config.out:
        raise UserError("--out is required (the run directory)")
    per_stage = [config.epochs_per_stage or config.epochs] * len(stages)
    if config.epochs_per_stage and config.epochs:
        per_stage[-1] = config.epochs - config.epochs_per_stage * (len(stages) - 1)
        if per_stage[-1] < 1:
            raise UserError(f"--epochs {config.epochs} leaves no epoch for stage {stages[-1]} after "
                            f"{len(stages) - 1} stages of --epochs-per-stage {config.epochs_per_stage}")
    root = Path(config.out)
    prev, results = None, {}
    for s, epochs in zip(stages, per_stage):
        out = root / f"stage{s}"
        cfg = TrainConfig(**{**asdict(config), "stages": None, "stage": s, "out": str(out),
                             "epochs": epochs})
        if s != stages[0]:
            cfg.model, cfg.init = None, f"{prev}:latest"  # one continuous run, as official
            cfg.mode = None if config.mode in (None, "cot") else config.mode
        state = _latest_state(out)
        if state and state.get("complete"):
            log(f"stage {s}: already complete in {out}")
        else:
            cfg.resume = bool(state) and config.resume
            log(f"=== stage {s} -> {out}")
            results[s] = train_stage(cfg, log, started)
            started = None  # later stages count from their own start
        prev = out
    return {"stages": results, "out": str(root)}


def _latest_state(out: Path) -> Optional[dict]:
    """state.json of the stage's latest checkpoint, None when it has none (or an unreadable one)."""
    try:
        run = Run.read(out)
        return run.state("latest") if run else None
    except (UserError, OSError):
        return None


def train_stage(config: TrainConfig, log=print, started: Optional[float] = None) -> dict:
    """Train one stage: its config is resolved here, once (config.py), into the `Stage` value; from
    there on the stage, not `config`, is what is passed down."""
    clock = StartClock(started)
    dist = distributed.setup()  # size 1 unless started by `mlx.launch`
    if not dist.main:
        log = quiet  # rank 0 prints; errors still reach every rank as UserError
    cfg, init_run, resumed, state = start(config)
    stage = Stage(cfg, dist, log, init_run, resumed, state)
    # the run-directory lock (taken inside `train`) is released however we leave
    with contextlib.ExitStack() as held:
        return train(stage, held, clock)


def train(stage: Stage, held: contextlib.ExitStack, clock) -> dict:
    """The stage's run directory, set-up and loop (`clock`: the start clock, to the first step)."""
    log, dist = stage.log, stage.dist
    cfg, out, (step, start_epoch, start_batch) = stage.cfg, stage.out, stage.position
    if stage.complete:
        log(f"{out}: already complete ({step} steps)")
        return {"out": str(out), "steps": step, "complete": True}
    run = RunDir(out, dist)
    run.open(held, step if stage.resumed else None)
    mx.random.seed(cfg.seed)
    clock.lap("other")
    stage.load_data()
    clock.lap("data")
    stage.load_model()
    clock.lap("load")
    run.record = stage.record
    optimizer = stage.optimizer()
    if stage.resumed:
        log(f"resuming {out} at step {step} (epoch {start_epoch + 1}, batch {start_batch})")
        run.last_saved = stage.resumed.checkpoint()
    if dist.enabled:
        check_ranks(dist, stage.model, stage.records, stage.valid, step, cfg, log)
    stage.log_start()

    clock.lap("other")
    epochs = stage.epochs()
    step_fn = stage.step_fn()
    clock.lap("data")
    with Interrupt() as interrupt:
        callbacks = StageCallbacks(stage, run, interrupt, Progress(stage.total_steps, "", done=step),
                                   clock=clock, stepper=step_fn.stepper)
        done = train_loop(stage.model, optimizer, epochs, step_fn, callbacks, cfg.grad_accumulation_steps,
                          all_sum_reducer(dist) if dist.enabled else None, start_step=step,
                          compile_update=cfg.compile)
    result = {"out": str(out), "steps": done["step"], "losses": done["losses"],
              "interrupted": done["interrupted"]}
    if not done["interrupted"] and cfg.epochs > start_epoch:
        result["eval"] = callbacks.summary
    return result


def quiet(*_, **__):
    pass
