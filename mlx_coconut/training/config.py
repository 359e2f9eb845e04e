"""A stage's config, resolved and checked: `resolve` for a new run (what --init passes on, the
defaults, the constraints options.py declares), `resume` for a run continued with --resume (its
recorded config, the flags that may change, the data order its checkpoint was at)."""

from dataclasses import asdict
from pathlib import Path

import mlx.core as mx

from ..errors import UserError
from ..options import TrainConfig, check_declared, config_from_dict, with_defaults
from ..files import read_json
from ..run import RUN_FILE, Run, split_ref

# may change on --resume (the number of epochs; speed only: recompute, compile); the rest is the
# run's recorded config (data order, optimisation, LoRA)
RESUME_FLAGS = ("out", "resume", "epochs", "stop_after_steps", "stage", "grad_checkpoint", "compile")
# what the data order of a checkpoint depends on (state.json records it; an edited coconut.json
# cannot silently resume on different batches)
ORDER_KEYS = ("train", "samples", "synth_samples", "seed", "stage", "mode", "c_thought",
              "max_latent_stage", "pad_latent_to_max", "uniform_prob", "batch_size",
              "grad_accumulation_steps", "max_seq_length")


def device_dtype() -> str:
    return "bfloat16" if mx.default_device() == mx.gpu else "float32"


def resolve(config: TrainConfig) -> tuple:
    """Fill unset fields from the --init run, then defaults; validate. → (config, init Run or None)."""
    if not config.out:
        raise UserError("--out is required (the run directory)")
    init_run = None
    if config.init:
        p = split_ref(config.init)[0]
        if not p.is_dir():
            raise UserError(f"--init {config.init}: no such directory")
        init_run = Run.read(config.init)
        if init_run is None:
            raise UserError(f"--init {config.init}: not a run directory (no {RUN_FILE} with a "
                            f"checkpoint); use --model for a plain model directory")
        if config.model:
            raise UserError("give either --model or --init, not both")
    elif not config.model:
        raise UserError("give --model (a model directory) or --init (a previous run directory)")
    cfg = with_defaults(config, init_run.config if init_run else {}, device_dtype())
    if init_run and init_run.lora and cfg.lora:
        _check_lora_init(cfg, init_run.record["lora"], config.init)
    check_declared(cfg)
    return cfg, init_run


def _check_lora_init(cfg: TrainConfig, lora: dict, init: str):
    """An --init LoRA run's adapters keep training as they are: a different shape is refused
    (rather than recorded but not used)."""
    q = lora.get("quantization") or {}
    used = {"lora_rank": lora["rank"], "lora_scale": lora["scale"], "lora_layers": lora.get("layers", 0),
            "lora_dropout": lora.get("dropout", 0.0)}
    if q:
        used.update(q_bits=q["bits"], q_group_size=q["group_size"])
    for name, value in used.items():
        if getattr(cfg, name) != value:
            raise UserError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: --init {init} is a LoRA run "
                            f"whose adapters keep training with {name.replace('_', '-')} {value}; drop "
                            f"the flag (or start LoRA from a full-weight run / model)")


def start(config: TrainConfig) -> tuple:
    """(resolved config, --init Run, the Run being resumed at its latest checkpoint, that
    checkpoint's state.json) of a new or a resumed run; the last two are None for a new run."""
    if not config.resume:
        cfg, init_run = resolve(config)
        if Run.read(cfg.out) is not None:
            raise UserError(f"--out {Path(cfg.out)} already holds a run: pass --resume to continue it, "
                            f"or choose another --out")
        return cfg, init_run, None, None
    out = Path(config.out) if config.out else None
    resumed = Run.read(out) if out is not None else None
    if resumed is None:
        raise UserError(f"--resume: {out} is not a run directory with a checkpoint")
    _check_resume_flags(config, resumed.config, out)
    cfg = config_from_dict(resumed.config, f"{out}/{RUN_FILE}")
    for name in ("epochs", "grad_checkpoint", "compile"):  # what may change on resume
        if getattr(config, name) is not None:
            setattr(cfg, name, getattr(config, name))
    cfg.stop_after_steps, cfg.resume = config.stop_after_steps, True
    init_run = Run.read(cfg.init) if cfg.init else None
    resumed = resumed.selected("latest")
    state = read_json(resumed.checkpoint() / "state.json")
    check_order(state, cfg, out)
    return cfg, init_run, resumed, state


def _check_resume_flags(config: TrainConfig, saved: dict, out: Path):
    """--resume continues the recorded run; a flag that would silently not apply is refused."""
    if config.stage not in (0, saved.get("stage")):  # 0 is also the CLI's default
        raise UserError(f"--resume: --stage {config.stage} differs from the run's stage "
                        f"{saved.get('stage')} in {out}; drop --stage")
    for name, value in asdict(config).items():
        if name in RESUME_FLAGS or value is None:
            continue
        recorded = saved.get(name)
        if name in ("model", "init", "train", "valid") and recorded is not None:
            same = Path(value).resolve() == Path(recorded).resolve()
        else:
            same = value == recorded
        if not same:
            raise UserError(f"--resume: --{name.replace('_', '-')} {value} differs from the run's "
                            f"recorded {recorded!r} ({out}/{RUN_FILE}); a resumed run keeps its "
                            f"settings (only --epochs may change): drop the flag, or start a new --out")


def check_order(state: dict, cfg: TrainConfig, out: Path):
    """A resumed checkpoint's position in the data holds only for the data order it was saved with."""
    recorded = state.get("data_order")
    if not recorded:
        return
    now = data_order(cfg)
    diff = [f"{k} {recorded.get(k)!r} -> {now[k]!r}" for k in ORDER_KEYS if recorded.get(k) != now[k]]
    if diff:
        raise UserError(f"--resume: {out}/{RUN_FILE} was edited since its checkpoint "
                        f"({', '.join(diff)}); the checkpoint's position in the data would be wrong: "
                        f"restore it or start a new --out")


def data_order(cfg: TrainConfig) -> dict:
    return {k: getattr(cfg, k) for k in ORDER_KEYS}


def parse_stages(text: str) -> list:
    try:
        if "-" in text:
            a, b = text.split("-", 1)
            stages = list(range(int(a), int(b) + 1))
        else:
            stages = [int(s) for s in text.split(",")]
    except ValueError:
        raise UserError(f"--stages {text!r}: expected a range like 0-3 or a list like 0,1,2") from None
    if not stages or min(stages) < 0:
        raise UserError(f"--stages {text!r}: expected non-negative stages")
    return stages
