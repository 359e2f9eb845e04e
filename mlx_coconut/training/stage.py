"""One stage as a value: built from its resolved config (`config.start`: a new run, or the run being
resumed), it resolves once what the layers below it are handed (the optimizer's reset cadence, the
data order a checkpoint records); `load_data` and `load_model` set it up (the model, and the run record
that describes it); then it answers what the loop needs — its epochs' batches, the optimizer it starts
with, its step function. curriculum.py trains it; scripts/bench_epochs.py times its epochs through
the same calls."""

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from mlx.utils import tree_flatten

from .. import distributed
from ..data import FormatConfig, SpecialIds
from ..errors import UserError
from ..options import TrainConfig, reset_cadence
from ..run import Run, Settings
from .config import data_order, start
from .setup import epoch_batches, load_data, stage_model
from .step import make_step_fn, optimizer_for


@dataclass
class Stage:
    """A stage's state: its resolved config, its ranks (`dist`), where it prints (`log`), the --init
    run and the run being resumed (read once), then its records and its model."""
    cfg: TrainConfig
    dist: object
    log: Callable
    init_run: Optional[Run] = None
    resumed: Optional[Run] = None        # --resume: the run, at its latest checkpoint
    resume_state: Optional[dict] = None  # --resume: that checkpoint's state.json
    records: list = field(default_factory=list)
    valid: list = field(default_factory=list)
    model: object = None
    tokenizer: object = None
    special: Optional[SpecialIds] = None
    settings: Optional[Settings] = None  # how the model is prompted (coconut.json's "settings")
    record: Optional[dict] = None        # coconut.json minus "checkpoint", once the model is set up
    # resolved once from the config, for the callbacks and the optimizer
    reset: str = field(init=False)       # when the optimizer is re-created: epoch | stage | never
    data_order: dict = field(init=False)  # what a checkpoint's position in the data depends on

    def __post_init__(self):
        self.reset, self.data_order = reset_cadence(self.cfg), data_order(self.cfg)

    @classmethod
    def start(cls, config: TrainConfig, log=print, dist=None) -> "Stage":
        cfg, init_run, resumed, state = start(config)
        return cls(cfg, dist or distributed.setup(), log, init_run, resumed, state)

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    @property
    def complete(self) -> bool:
        """A resumed run that has already trained all its epochs."""
        s = self.resume_state
        return bool(s and s.get("complete") and s["epoch"] >= self.cfg.epochs)

    @property
    def position(self) -> tuple:
        """(step, epoch, batch in epoch) the loop starts at."""
        s = self.resume_state
        return (s["step"], s["epoch"], s["batch"]) if s else (0, 0, 0)

    def load_data(self):
        self.records, self.valid = load_data(self.cfg, self.log)

    def load_model(self):
        """The weights: the resumed run's latest checkpoint, else set up from --model / --init; and
        the run record that describes them."""
        self.model, self.tokenizer, self.special, self.settings, self.record = stage_model(
            self.cfg, self.init_run, self.resumed, self.log)

    def optimizer(self):
        return optimizer_for(self.model, self.cfg, self.reset, self.init_run, self.resumed)

    def step_fn(self):
        return make_step_fn(self.model, self.special, self.cfg, self.dist)

    def epoch_batches(self, epoch: int) -> list:
        return epoch_batches(self.records, self.tokenizer, self.format_config(), self.special,
                             self.cfg, epoch)

    def format_config(self) -> FormatConfig:
        """How the stage formats its training records (with its uniform-stage mixing)."""
        return FormatConfig.from_settings(self.cfg, uniform_prob=self.cfg.uniform_prob)

    def epochs(self):
        """(epoch, batches, first batch) for the loop, from the start position; the first epoch is
        formatted now, to refuse a run with nothing to train on before any step."""
        cfg, (_, start_epoch, start_batch) = self.cfg, self.position
        first = self.epoch_batches(start_epoch)
        if not first:
            raise UserError(f"nothing to train on: all {len(self.records)} records are longer than "
                            f"--max-seq-length {cfg.max_seq_length} tokens at stage {cfg.stage}"
                            if self.records else "nothing to train on: no training records")
        return ((e, first if e == start_epoch else self.epoch_batches(e),
                 start_batch if e == start_epoch else 0) for e in range(start_epoch, cfg.epochs))

    @property
    def total_steps(self) -> int:
        cfg = self.cfg
        per_epoch = math.ceil(math.ceil(len(self.records) / cfg.batch_size) / cfg.grad_accumulation_steps)
        return per_epoch * cfg.epochs

    def log_start(self):
        cfg, record = self.cfg, self.record
        n_params = sum(v.size for _, v in tree_flatten(self.model.trainable_parameters()))
        qlora = " (QLoRA)" if record.get("lora") and record["lora"].get("quantization") else ""
        dtypes = record["dtypes"]
        masters = " (fp32 masters)" if dtypes["trainable"] != "float32" else ""
        self.log(f"training stage {cfg.stage} ({cfg.mode}, c={cfg.c_thought}) on {len(self.records)} records, "
                 f"{record['weights']}{qlora} fine-tune, {n_params / 1e6:.2f}M trainable parameters "
                 f"({dtypes['trainable']}{masters}), {cfg.dtype} weights -> {self.out}")
