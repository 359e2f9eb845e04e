"""The options of `mlx-coconut train`, declared once: `TrainConfig` fields carry each option's
default, help text, whether an --init run passes it on, and its click flags. `cli.py` builds the
flags from them and `train.resolve` the defaults; YAML configs (-c) use the same names.

Light on imports on purpose: the CLI reads it while building its commands, before any error
handler runs."""

from dataclasses import dataclass, field, fields
from typing import Optional

import mlx.core as mx

from .data.format import MODES, FormatConfig
from .errors import UserError

RESET_CHOICES = ("epoch", "stage", "never")
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def option(help: str, default=None, inherit: bool = False, shown: Optional[str] = None,
           flags: tuple = (), choices: Optional[tuple] = None, cli: bool = True, initial=None):
    """One `train` option, declared once: a TrainConfig field (None until `resolve` fills it: from
    the flags or a -c YAML file, from the --init run when `inherit`, else `default`), its help text
    (ending in "[default]", or `[shown]`) and its click flags (`flags`: extra names)."""
    return field(default=initial, metadata=dict(help=help, default=default, inherit=inherit, shown=shown,
                                                flags=flags, choices=choices, cli=cli))


@dataclass
class TrainConfig:
    """Every option of `mlx-coconut train` (and its -c YAML keys); `cli.py` builds the flags from it."""
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
    samples: Optional[int] = option("Train on the first N records after a seeded shuffle.", inherit=True)
    eval_samples: Optional[int] = option("Validation questions for loss + accuracy each epoch.", 32,
                                         inherit=True)
    # COCONUT
    stage: int = option("Curriculum stage: 0 = CoT, k = first k steps -> k*c thoughts.", shown="0",
                        initial=0)
    stages: Optional[str] = option("Run consecutive stages, e.g. 0-3 (one run dir per stage under --out).")
    epochs_per_stage: Optional[int] = option(
        "Epochs per stage with --stages; with --epochs too, --epochs is the whole schedule and the "
        "last stage runs the rest.", shown="--epochs")
    mode: Optional[str] = option("Training mode.", choices=MODES, shown="cot at stage 0, coconut after")
    c_thought: Optional[int] = option("Continuous thoughts per replaced step.", FormatConfig.c_thought,
                                      inherit=True)
    max_latent_stage: Optional[int] = option("Stages past this remove all steps.",
                                             FormatConfig.max_latent_stage, inherit=True)
    pad_latent_to_max: Optional[bool] = option(
        "Official pad_latent_to_max: past max-latent-stage every record gets max_latent_stage*c "
        "thoughts.", FormatConfig.pad_latent_to_max, inherit=True)
    uniform_prob: Optional[float] = option("Probability of a uniformly random stage per example.",
                                           FormatConfig.uniform_prob, inherit=True)
    # optimisation
    reset_optimizer: Optional[str] = option(
        "Re-create AdamW every epoch, once per run, or never (continue --init's).", choices=RESET_CHOICES,
        shown="epoch for latent modes, as the official code; stage for cot/no-cot")
    epochs: Optional[int] = option("Epochs.", 3, inherit=True)
    batch_size: Optional[int] = option("Batch size.", 8, inherit=True)
    learning_rate: Optional[float] = option("AdamW learning rate (bias-corrected, as torch).", 1e-4,
                                            inherit=True, flags=("--lr",))
    weight_decay: Optional[float] = option("AdamW weight decay.", 0.01, inherit=True)
    grad_accumulation_steps: Optional[int] = option("Micro-batches per optimizer step.", 1, inherit=True)
    grad_checkpoint: Optional[bool] = option("Recompute whole blocks in the backward pass.", False,
                                             inherit=True)
    max_seq_length: Optional[int] = option("Drop longer examples.", 1024, inherit=True)
    seed: Optional[int] = option("Seed for data order, sampling and init.", 0, inherit=True)
    dtype: Optional[str] = option("Training dtype.", inherit=True, choices=tuple(DTYPES),
                                  shown="float32 on CPU, bfloat16 on Metal")
    # LoRA / QLoRA
    lora: Optional[bool] = option("LoRA on attention/MLP projections (+ new-token rows).", False,
                                  inherit=True)
    lora_rank: Optional[int] = option("LoRA rank.", 8, inherit=True)
    lora_scale: Optional[float] = option("LoRA scale (mlx-lm convention).", 20.0, inherit=True)
    lora_layers: Optional[int] = option("LoRA on the last N blocks.", 0, inherit=True, shown="all")
    lora_dropout: Optional[float] = option("LoRA dropout.", 0.0, inherit=True)
    q_bits: Optional[int] = option("QLoRA: quantize the frozen base to this many bits (with --lora).",
                                   inherit=True, flags=("-q",))
    q_group_size: Optional[int] = option("QLoRA quantization group size.", 64, inherit=True)
    # bookkeeping
    save_every: Optional[int] = option("Checkpoint every N optimizer steps (0: only at epoch ends, "
                                       "where it always saves).", 500)
    max_new_tokens: Optional[int] = option("Generation budget for the per-epoch accuracy.", 64, inherit=True)
    synth_samples: Optional[int] = option("Synthetic records when no --train.", 1000, inherit=True)
    compile: Optional[bool] = option("mx.compile the training step (one trace per shape and latent "
                                     "layout).", True)
    bucket: Optional[int] = option("Pad batch lengths up to a multiple of this: fewer compiled shapes "
                                   "vs less padding.", 32, inherit=True)
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
