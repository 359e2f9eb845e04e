"""Training: stage 0 (CoT) and stage k (COCONUT), full fine-tune, LoRA or QLoRA, resumable runs.

One stage = the official `run.py` inner loop for a fixed scheduled stage: the records are formatted
for that stage (k·c thoughts replace the first k steps), shuffled per epoch with a seeded order,
collated with the official left padding, and trained with AdamW on `coconut.loss_fn` (the one latent
loop). A curriculum (`stages="0-3"`) runs consecutive stages, each from the previous one's weights with
a fresh optimizer (official `reset_optimizer`), each in its own run directory `OUT/stageK`.

One module per concern (docs/layout.md): config (resolve, validate, resume checks), setup (data,
model), memory (the estimate before loading), step (the compiled Stepper, the optimizer, gradient
checkpointing), progress (bar, start clock, Ctrl-C), rundir (everything written into a run
directory), evaluation (validation at epoch end), callbacks (what the loop reports to), stage (one
stage's state as a value) and curriculum (the entry point: `run`). The loop itself is `trainer.py`.
"""

from ..options import TrainConfig, config_from_dict  # noqa: F401 (the entry point's argument)
from ..optimizer import make_optimizer  # noqa: F401
from .callbacks import StageCallbacks  # noqa: F401
from .config import parse_stages, resolve  # noqa: F401
from .curriculum import run, run_curriculum, train_stage  # noqa: F401
from .evaluation import loss_warnings, validation_loss, vocab_size  # noqa: F401
from .memory import count_params, memory_estimate, warn_memory  # noqa: F401
from .setup import epoch_batches, load_data, setup_model  # noqa: F401
from .stage import Stage  # noqa: F401
from .step import (Stepper, disable_grad_checkpoint, enable_grad_checkpoint, make_step_fn,  # noqa: F401
                   shard_step, supervised_tokens, trace_key)
