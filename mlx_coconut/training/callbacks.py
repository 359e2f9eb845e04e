"""What the loop reports to, for one stage (`trainer.Callbacks`): metrics.jsonl, the progress bar,
checkpoints (--save-every, Ctrl-C / --stop-after-steps, every epoch end), the optimizer reset
cadence, the epoch's validation and the best checkpoint — all written through the `RunDir`."""

import time
from pathlib import Path

import mlx.core as mx

from ..errors import UserError
from ..optimizer import make_optimizer
from ..trainer import Callbacks, StepReport
from . import evaluation


class StageCallbacks(Callbacks):
    """One stage's reporting. `stage`: the Stage (config, model, tokenizer, validation records, log);
    `run`: its RunDir; `interrupt`: the Ctrl-C flag; `bar`: the progress bar; `clock`: the start
    clock, until the first step is reported; `stepper`: its `layouts` (trace keys seen) are cleared
    at each epoch start and reported at its end."""

    def __init__(self, stage, run, interrupt, bar, clock=None, stepper=None):
        self.stage, self.run, self.interrupt, self.bar = stage, run, interrupt, bar
        self.losses, self.tps, self.summary = [], 0.0, None
        self.clock, self.stepper = clock, stepper

    @property
    def cfg(self):
        return self.stage.cfg

    @property
    def model(self):
        return self.stage.model

    def _state(self, step, epoch, batch, complete=False) -> dict:
        cfg = self.cfg
        return {"step": step, "epoch": epoch, "batch": batch, "stage": cfg.stage, "seed": cfg.seed,
                "complete": complete, "data_order": self.stage.data_order}

    def _traces(self) -> str:
        """The epoch's shape buckets: one compiled trace each (the Stepper compiles a bounded number;
        later new keys run eagerly)."""
        used = self.stepper.layouts
        what = "distinct batch shapes and latent layouts"
        if not self.cfg.compile:
            return f"{len(used)} shape buckets ({what}; compile off)"
        eager = len(used - self.stepper.traces.keys())
        return (f"{len(used)} compiled traces ({what})" if not eager else
                f"{len(used)} shape buckets ({what}): {len(used) - eager} compiled traces, {eager} ran eagerly")

    def _save(self, optimizer, step, epoch, batch, complete=False) -> Path:
        return self.run.save(self.model, self.stage.tokenizer, optimizer,
                             self._state(step, epoch, batch, complete))

    def begin_epoch(self, epoch, first, optimizer):
        if self.stage.reset == "epoch" and epoch > 0 and first == 0:  # official reset_optimizer: every epoch
            optimizer = make_optimizer(self.model, self.cfg, previous=optimizer)  # keeps the masters
        self.bar.desc = f"stage {self.cfg.stage} epoch {epoch + 1}/{self.cfg.epochs}"
        mx.reset_peak_memory()
        if self.stepper is not None:
            self.stepper.layouts.clear()
        return optimizer

    def stop_requested(self) -> bool:
        return self.interrupt.hit

    def diverged(self, r: StepReport):
        raise UserError(f"loss is {r.loss} at step {r.step} (stage {self.cfg.stage}, epoch {r.epoch + 1}): "
                        f"training diverged, stopped; {self.run.last_good()}; try a lower --learning-rate")

    def after_step(self, r: StepReport, stop: bool) -> bool:
        cfg, dist, log = self.cfg, self.run.dist, self.stage.log
        self.losses.append(r.loss)
        self.tps, peak = r.tokens_per_sec, mx.get_peak_memory() / 1e9
        extra = {}
        if self.clock is not None:  # before the progress bar draws: a line of its own on a terminal
            self.clock.lap("step")
            log(self.clock.line())
            extra["first_step_s"], self.clock = self.clock.rounded(), None
        if self.stepper is not None and r.next_batch == r.n_batches:  # the epoch's last step
            extra["traces"] = len(self.stepper.layouts)
        self.run.log_metrics({
            "step": r.step, "stage": cfg.stage, "epoch": r.epoch + 1, "loss": round(r.loss, 6),
            "lr": float(r.optimizer.learning_rate.item()), "tokens": r.tokens,
            "tokens_per_sec": round(r.tokens_per_sec, 1), "peak_memory_gb": round(peak, 3),
            "time": round(time.time(), 3), **extra,
            **({"ranks": dist.size, "all_sum_s": round(dist.wait_s, 3)} if dist.enabled else {})})
        if dist.main:
            self.bar.update(r.step, r.loss, r.tokens_per_sec, peak)
        if stop or (cfg.stop_after_steps is not None and r.step >= cfg.stop_after_steps):
            if dist.main:
                self.bar.close()
            path = self._save(r.optimizer, r.step, r.epoch, r.next_batch)
            log(f"interrupted: saved {path} (step {r.step}); continue with "
                f"`mlx-coconut train --resume --out {self.run.path}`")
            dist.barrier("stopping")  # rank 0 has said so before any rank exits
            return True
        if cfg.save_every and r.step % cfg.save_every == 0 and r.next_batch < r.n_batches:
            self._save(r.optimizer, r.step, r.epoch, r.next_batch)
        return False

    def end_epoch(self, epoch, step, optimizer):
        """Save, warn about a loss that learned nothing, evaluate, record the best checkpoint."""
        dist, log = self.run.dist, self.stage.log
        if dist.main:
            self.bar.update(step, self.losses[-1] if self.losses else float("nan"),
                            self.tps if self.losses else 0.0, mx.get_peak_memory() / 1e9, force=True)
            self.bar.close()
        if self.stepper is not None:
            log(f"epoch {epoch + 1}: {self._traces()}")
        self._save(optimizer, step, epoch + 1, 0, complete=epoch + 1 >= self.cfg.epochs)
        warnings = evaluation.loss_warnings(self.losses, evaluation.vocab_size(self.model))
        for w in warnings:
            log(f"warning: {w}")
        summary = evaluation.epoch_entry(self.stage, epoch, step, warnings)
        self.run.record_eval(summary)
        if "accuracy" in summary and self.run.mark_best(summary["accuracy"], epoch + 1, step):
            log(f"best validation accuracy so far: {self.run.last_saved.name} is {self.run.path}:best")
        self.model.train()
        self.summary = summary
