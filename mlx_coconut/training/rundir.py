"""The run directory one training process owns, and everything written into it: the lock,
metrics.jsonl, the checkpoints, the best one and eval.json. Rank 0 writes; every rank waits until
each checkpoint is committed. Nothing else in training writes into the run directory."""

import contextlib
import json
import os
from pathlib import Path
from typing import Optional

from .. import checkpoint as ckpt
from ..errors import UserError
from ..files import RunLock, append_jsonl, remove_stale_temps, truncate_jsonl, write_json_atomic


class RunDir:
    """The run directory one training process owns: its lock, metrics.jsonl, the checkpoints and
    the best one. Rank 0 writes; every rank waits until each checkpoint is committed."""

    def __init__(self, path: Path, dist):
        self.path, self.dist = Path(path), dist
        self.record = None      # coconut.json minus "checkpoint" (set once the model is set up)
        self.last_saved = None  # the latest committed checkpoint directory

    def open(self, held: contextlib.ExitStack, resume_step: Optional[int]):
        """Take the lock and clean up after a killed process (rank 0 only)."""
        if not self.dist.main:
            return
        check_writable(self.path)
        held.enter_context(RunLock(self.path))
        remove_stale_temps(self.path)  # of a process killed mid-write (we hold the lock)
        # a resumed run trains the steps after its checkpoint again; a new run drops the lines of
        # one that failed before its first checkpoint
        truncate_jsonl(self.path / "metrics.jsonl", -1 if resume_step is None else resume_step)

    def log_metrics(self, record: dict):
        if self.dist.main:
            append_jsonl(self.path / "metrics.jsonl", record)

    def save(self, model, tokenizer, optimizer, state: dict) -> Path:
        """Checkpoint `state` (refusing non-finite weights, naming the last good checkpoint)."""
        if not ckpt.all_finite(model.trainable_parameters()):  # never write or point at bad weights
            raise UserError(f"the weights are not finite (NaN/inf) at step {state['step']} (stage "
                            f"{state['stage']}, epoch {state['epoch'] + 1}): training diverged, "
                            f"stopped; {self.last_good()}; try a lower --learning-rate")
        if self.dist.main:  # the other ranks hold the same weights
            self.last_saved = self.dist.checkpoint = ckpt.save_checkpoint(
                self.path, self.record, model, tokenizer, optimizer, state)
        # no rank leaves before the checkpoint is committed (`mlx.launch` kills the other ranks as
        # soon as one exits with an error code, e.g. 130 after Ctrl-C)
        self.dist.barrier(f"the checkpoint at step {state['step']}")
        return self.last_saved

    def last_good(self) -> str:
        return f"the last good checkpoint is {self.last_saved}" if self.last_saved else \
            "no checkpoint was saved"

    def mark_best(self, accuracy: float, epoch: int, step: int) -> bool:
        return self.dist.main and ckpt.mark_best(self.path, accuracy, epoch, step)

    def record_eval(self, entry: dict):
        """The epoch's validation entry into eval.json (replacing an earlier one of the same epoch,
        from a run resumed mid-epoch)."""
        if not self.dist.main:
            return
        evals_file = self.path / "eval.json"
        evals = json.loads(evals_file.read_text()) if evals_file.exists() else []
        evals = [e for e in evals if e.get("epoch") != entry["epoch"]] + [entry]
        write_json_atomic(evals_file, evals)


def check_writable(out: Path):
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--out {out}: not writable ({e.strerror or e})") from None
