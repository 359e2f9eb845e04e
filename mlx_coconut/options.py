"""The options of `mlx-coconut train`, declared once, and the one pipeline that turns them into a
run's config: `TrainConfig` fields carry each option's default, help text, whether an --init run
passes it on, its click flags and its constraint. `from_flags` merges a -c YAML file and the flags,
`with_defaults` what an --init run passes on and the defaults, `check_declared` the constraints
(training/config.py adds what needs the file system: --init, --resume). `commands/train.py` builds
the flags from the fields; YAML configs (-c) use the same names.

Light on imports on purpose (no mlx): the CLI reads it while building its commands, before any
error handler runs."""

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, Optional

from .errors import UserError

MODES = ("cot", "no-cot", "coconut", "pause", "no-thought")
MAX_C_THOUGHT = 64  # thoughts per replaced step (the paper uses 1-2); bounds prompt length
# how a record is formatted unless told otherwise: data.FormatConfig's defaults
FORMAT_DEFAULTS = {"c_thought": 1, "max_latent_stage": 3, "pad_latent_to_max": True,  # as every official config
                   "uniform_prob": 0.0}
RESET_CHOICES = ("epoch", "stage", "never")
DTYPE_NAMES = ("float32", "float16", "bfloat16")
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


# constraints: each returns what is wrong with a value (the message after the flag), or None


def at_least(least) -> Callable:
    return lambda v: None if v >= least else f"must be >= {least} (got {v})"


def finite(above: Optional[float] = None, least: Optional[float] = None) -> Callable:
    bound = f"> {above:g}" if above is not None else f">= {least:g}"
    return lambda v: None if math.isfinite(v) and (v > above if above is not None else v >= least) else \
        f"must be a finite number {bound} (got {v})"


def within(low, high, closed: bool = True) -> Callable:
    return lambda v: None if low <= v <= high and (closed or v < high) else \
        f"must be in [{low}, {high}{']' if closed else ')'}" + ("" if closed else f" (got {v})")


def one_of(*values) -> Callable:
    return lambda v: None if v in values else f"{v}: choose from {', '.join(map(str, values))}"


def thoughts_per_step(v) -> Optional[str]:
    if v > MAX_C_THOUGHT:
        return f"{v}: at most {MAX_C_THOUGHT} thoughts per step"
    return at_least(0)(v)


def option(help: str, default=None, inherit: bool = False, shown: Optional[str] = None,
           flags: tuple = (), choices: Optional[tuple] = None, cli: bool = True, initial=None,
           check: Optional[Callable] = None):
    """One `train` option, declared once: a TrainConfig field (None until `with_defaults` fills it:
    from the flags or a -c YAML file, from the --init run when `inherit`, else `default`), its help
    text (ending in "[default]", or `[shown]`), its click flags (`flags`: extra names) and its
    constraint (`choices`, or `check(value)` -> what is wrong, or None)."""
    return field(default=initial, metadata=dict(help=help, default=default, inherit=inherit, shown=shown,
                                                flags=flags, choices=choices, cli=cli, check=check))


@dataclass
class TrainConfig:
    """Every option of `mlx-coconut train` (and its -c YAML keys); `commands/train.py` builds the
    flags from it."""
    # what to train from / where to write
    model: Optional[str] = option("Model directory (or run directory) to start from.")
    init: Optional[str] = option("Previous run (RUN = its best checkpoint if validated, else latest; "
                                 "RUN:best, RUN:latest): weights carried over (optimizer: see "
                                 "--reset-optimizer).")
    out: Optional[str] = option("Run directory to write.")
    resume: bool = option("Continue the run in --out (same data order).", initial=False)
    # data (None = inherit from --init's run, else the defaults)
    train: Optional[str] = option("Training data (JSON/jsonl/iCoT); default: synthetic.", inherit=True)
    valid: Optional[str] = option("Validation data (default: synthetic / a training subset).", inherit=True)
    samples: Optional[int] = option("Train on the first N records after a seeded shuffle.", inherit=True,
                                   check=at_least(1))
    eval_samples: Optional[int] = option("Validation questions for loss + accuracy each epoch.", 32,
                                         inherit=True, check=at_least(0))
    val_batches: Optional[int] = option("Validation-loss batches (of --batch-size) each epoch; -1: all "
                                        "--eval-samples questions, 0: no loss (accuracy only).", -1,
                                        inherit=True, check=at_least(-1))
    # COCONUT
    stage: int = option("Curriculum stage: 0 = CoT, k = first k steps -> k*c thoughts.", shown="0",
                        initial=0, check=at_least(0))
    stages: Optional[str] = option("Run consecutive stages, e.g. 0-3 (one run dir per stage under --out).")
    epochs_per_stage: Optional[int] = option(
        "Epochs per stage with --stages; with --epochs too, --epochs is the whole schedule and the "
        "last stage runs the rest.", shown="--epochs")
    mode: Optional[str] = option("Training mode.", choices=MODES, shown="cot at stage 0, coconut after")
    c_thought: Optional[int] = option("Continuous thoughts per replaced step.", FORMAT_DEFAULTS["c_thought"],
                                      inherit=True, check=thoughts_per_step)
    max_latent_stage: Optional[int] = option("Stages past this remove all steps.",
                                             FORMAT_DEFAULTS["max_latent_stage"], inherit=True,
                                             check=at_least(0))
    pad_latent_to_max: Optional[bool] = option(
        "Official pad_latent_to_max: past max-latent-stage every record gets max_latent_stage*c "
        "thoughts.", FORMAT_DEFAULTS["pad_latent_to_max"], inherit=True)
    uniform_prob: Optional[float] = option("Probability of a uniformly random stage per example.",
                                           FORMAT_DEFAULTS["uniform_prob"], inherit=True,
                                           check=within(0, 1))
    # optimisation
    reset_optimizer: Optional[str] = option(
        "Re-create AdamW every epoch, once per run, or never (continue --init's).", choices=RESET_CHOICES,
        shown="epoch for latent modes, as the official code; stage for cot/no-cot")
    epochs: Optional[int] = option("Epochs.", 3, inherit=True, check=at_least(1))
    batch_size: Optional[int] = option("Batch size.", 8, inherit=True, check=at_least(1))
    learning_rate: Optional[float] = option("AdamW learning rate (bias-corrected, as torch).", 1e-4,
                                            inherit=True, flags=("--lr",), check=finite(above=0))
    weight_decay: Optional[float] = option("AdamW weight decay.", 0.01, inherit=True,
                                           check=finite(least=0))
    grad_accumulation_steps: Optional[int] = option("Micro-batches per optimizer step.", 1, inherit=True,
                                                    check=at_least(1))
    grad_checkpoint: Optional[bool] = option("Recompute whole blocks in the backward pass.", False,
                                             inherit=True)
    max_seq_length: Optional[int] = option("Drop longer examples.", 1024, inherit=True, check=at_least(1))
    seed: Optional[int] = option("Seed for data order, sampling and init.", 0, inherit=True)
    dtype: Optional[str] = option("Training dtype.", inherit=True, choices=DTYPE_NAMES,
                                  shown="float32 on CPU, bfloat16 on Metal")
    # LoRA / QLoRA
    lora: Optional[bool] = option("LoRA on attention/MLP projections (+ new-token rows).", False,
                                  inherit=True)
    lora_rank: Optional[int] = option("LoRA rank.", 8, inherit=True, check=at_least(1))
    lora_scale: Optional[float] = option("LoRA scale (mlx-lm convention).", 20.0, inherit=True,
                                         check=finite(above=0))
    lora_layers: Optional[int] = option("LoRA on the last N blocks.", 0, inherit=True, shown="all",
                                       check=at_least(0))
    lora_dropout: Optional[float] = option("LoRA dropout.", 0.0, inherit=True,
                                           check=within(0, 1, closed=False))
    q_bits: Optional[int] = option("QLoRA: quantize the frozen base to this many bits (with --lora).",
                                   inherit=True, flags=("-q",), check=one_of(2, 3, 4, 5, 6, 8))
    q_group_size: Optional[int] = option("QLoRA quantization group size.", 64, inherit=True,
                                         check=at_least(1))
    # bookkeeping
    save_every: Optional[int] = option("Checkpoint every N optimizer steps (0: only at epoch ends, "
                                       "where it always saves).", 500,
                                       check=at_least(0))
    max_new_tokens: Optional[int] = option("Generation budget for the per-epoch accuracy.", 64, inherit=True,
                                           check=at_least(1))
    synth_samples: Optional[int] = option("Synthetic records when no --train.", 1000, inherit=True,
                                          check=at_least(1))
    compile: Optional[bool] = option("mx.compile the training step (one trace per shape and latent "
                                     "layout).", True)
    bucket: Optional[int] = option("Pad batch lengths up to a multiple of this: fewer compiled shapes "
                                   "vs less padding.", 32, inherit=True,
                                   check=at_least(1))
    # behave like Ctrl-C after this global step (tests)
    stop_after_steps: Optional[int] = option("", cli=False)


DEFAULTS = {f.name: f.metadata["default"] for f in fields(TrainConfig) if f.metadata["default"] is not None}
# carried over from an --init run unless given again (data, hyper-parameters, LoRA)
INHERITED = tuple(f.name for f in fields(TrainConfig) if f.metadata["inherit"])


def help_text(f) -> str:
    """An option's help ending in its default: "[on]", "[0.0001]", or what `shown` says."""
    m, default = f.metadata, f.metadata["default"]
    shown = m["shown"] or ("on" if default is True else None if default is None or default is False
                           else f"{default:g}" if isinstance(default, float) else str(default))
    if not shown:
        return m["help"]
    text = m["help"].rstrip(".")
    return f"{text} [{shown}]" + ("." if text != m["help"] else "")


def config_from_dict(d: dict, where: str = "config") -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    d = {k.replace("-", "_"): v for k, v in d.items()}
    unknown = sorted(set(d) - names)
    if unknown:
        raise UserError(f"{where}: unknown option(s) {', '.join(unknown)}")
    return TrainConfig(**d)


# ---------------------------------------------------------------- the pipeline


def from_flags(flags: dict, config_file: Optional[str] = None) -> TrainConfig:
    """The `train` command's config: a -c YAML file's options, then the flags given (None: not
    given) over them."""
    values = read_yaml(config_file) if config_file else {}
    values.update({k: v for k, v in flags.items() if v is not None})
    values.setdefault("stage", 0)
    values["resume"] = bool(values.get("resume"))
    return config_from_dict(values, f"-c {config_file}" if config_file else "train")


def read_yaml(config_file: str) -> dict:
    import yaml
    try:
        with open(config_file) as f:
            loaded = yaml.safe_load(f) or {}
    except OSError as e:
        raise UserError(f"-c {config_file}: cannot read ({e.strerror})")
    except yaml.YAMLError as e:
        raise UserError(f"-c {config_file}: invalid YAML ({str(e).splitlines()[0]})")
    if not isinstance(loaded, dict):
        raise UserError(f"-c {config_file}: expected a mapping of option: value")
    return loaded


def with_defaults(config: TrainConfig, inherited: dict, device_dtype: str) -> TrainConfig:
    """Unset options filled from what an --init run recorded (`inherited`: its config, for the
    INHERITED options), then the declared defaults, the mode's and the device's
    (`device_dtype`)."""
    values = asdict(config)
    for k in INHERITED:
        if values[k] is None and k in inherited:
            values[k] = inherited[k]
    for k, v in DEFAULTS.items():
        if values[k] is None:
            values[k] = v
    cfg = TrainConfig(**values)
    if cfg.mode is None:
        cfg.mode = "cot" if cfg.stage == 0 else "coconut"
    cfg.reset_optimizer = reset_cadence(cfg)
    if cfg.dtype is None:
        cfg.dtype = device_dtype
    return cfg


def reset_cadence(cfg: TrainConfig) -> str:
    """When the optimizer is re-created: every `epoch` (official latent stages), once per `stage` (a
    fresh optimizer for each run), or `never` (a run started with --init continues its optimizer)."""
    if cfg.reset_optimizer is not None:
        return cfg.reset_optimizer
    return "stage" if cfg.mode in ("cot", "no-cot") else "epoch"


def check_declared(cfg: TrainConfig):
    """The constraints between options, then each option's own (declared with its field)."""
    if cfg.mode in ("cot", "no-cot") and cfg.stage != 0:
        raise UserError(f"--mode {cfg.mode} has no stages (use --stage 0 or --mode coconut)")
    if cfg.mode in ("coconut", "pause") and cfg.stage > 0 and cfg.c_thought < 1:
        raise UserError(f"--stage {cfg.stage} with --c-thought {cfg.c_thought}: a COCONUT stage needs "
                        f"at least one thought per step (use --mode no-thought to drop steps without thoughts)")
    if cfg.q_bits is not None and not cfg.lora:
        raise UserError("-q/--q-bits quantizes the frozen base for QLoRA: add --lora")
    if cfg.q_bits is not None and cfg.q_group_size not in (32, 64, 128):
        raise UserError(f"--q-group-size {cfg.q_group_size}: choose from 32, 64, 128")
    check_fields(cfg)


def check_fields(values, names: Optional[tuple] = None, flag: Callable = None):
    """Each option's own constraint (its `choices` or `check`) on `values`: a TrainConfig, or
    anything with some of its fields (`names`), e.g. a data.FormatConfig; `flag(name)` names an
    option in the message (default: its flag, --name)."""
    flag = flag or (lambda name: "--" + name.replace("_", "-"))
    for f in fields(TrainConfig):
        if names is not None and f.name not in names:
            continue
        value, m = getattr(values, f.name), f.metadata
        if value is None:
            continue
        if m["choices"] and value not in m["choices"]:
            raise UserError(f"{flag(f.name)} {value}: choose from {', '.join(m['choices'])}")
        wrong = m["check"](value) if m["check"] else None
        if wrong:
            raise UserError(f"{flag(f.name)} {wrong}")

