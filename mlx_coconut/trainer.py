"""The training loop, in mlx-lm's shape (`tuner/trainer.py`): micro-batches → token-weighted
gradient accumulation → one optimizer update → a report to `Callbacks`, with a NaN guard. What a
step computes (`step_fn`), how ranks combine (`reduce`) and what is written, printed, saved or
evaluated (the callbacks) are the caller's: see `training/`."""

import math
import time
from dataclasses import dataclass

import mlx.core as mx
from mlx.utils import tree_map

from .errors import UserError


@dataclass
class StepReport:
    """One optimizer step, as `train_loop` reports it."""
    step: int
    epoch: int
    next_batch: int       # the epoch's first micro-batch not yet in a step: where a resume starts
    n_batches: int
    loss: float
    tokens: int
    tokens_per_sec: float
    optimizer: object


class Callbacks:
    """What `train_loop` reports to; every hook is a no-op here."""

    def begin_epoch(self, epoch: int, first: int, optimizer):
        """Called before the epoch's first micro-batch; returns the optimizer to train it with."""
        return optimizer

    def stop_requested(self) -> bool:
        return False

    def after_step(self, report: StepReport, stop: bool) -> bool:
        """Called after every optimizer step (`stop`: a stop was requested); True ends the run."""
        return stop

    def diverged(self, report: StepReport):
        """Called on a non-finite loss; should raise a UserError saying what to do."""

    def end_epoch(self, epoch: int, step: int, optimizer):
        pass


class _Accumulator:
    """Micro-batches of one optimizer step, weighted by their supervised tokens: the summed gradient
    divided by the token count is the gradient of the whole batch, not a mean of per-batch means.
    The sum is kept as `grads * weight`, so a step of one micro-batch does no arithmetic on it; a sum
    of several is fp32 (bf16 gradients of a bf16 model would lose the smaller micro-batches' bits)."""

    def __init__(self):
        self.grads, self.weight, self.loss, self.n, self.supervised, self.tokens = None, 0, 0.0, 0, 0, 0
        self.t0 = time.perf_counter()

    def add(self, loss, grads, supervised: int, tokens: int):
        if self.grads is None:
            self.grads, self.weight = grads, supervised
        else:
            w = self.weight
            f32 = mx.float32
            self.grads = tree_map(lambda a, b: a.astype(f32) * w + b.astype(f32) * supervised,
                                  self.grads, grads)
            self.weight = 1
        loss = loss * supervised
        mx.eval(loss, self.grads)
        self.loss += loss
        self.n += 1
        self.supervised += supervised
        self.tokens += tokens

    def scale(self) -> float:
        """What the sum as kept is multiplied by to give the token-weighted mean gradient."""
        return self.weight / max(self.supervised, 1)


def make_update(model, optimizer, use_compile: bool):
    """`update(grads, scale)`: one optimizer step on `grads * scale`, compiled with the model's and the
    optimizer's state as mlx-lm's trainer compiles its step (the optimizer's elementwise math fused).
    The optimizer (optimizer.py) keeps each weight's dtype: an fp32 scale may promote the gradients."""
    def update(grads, scale):
        optimizer.update(model, tree_map(lambda g: g * scale, grads))

    if not use_compile:
        return lambda grads, scale: optimizer.update(model, grads) if scale == 1.0 else update(grads, scale)
    state = [model.state, optimizer.state]
    compiled = mx.compile(update, inputs=state, outputs=state)
    return lambda grads, scale: compiled(grads, mx.array(scale, mx.float32))


def train_loop(model, optimizer, epochs, step_fn, callbacks: Callbacks, accum: int = 1, reduce=None,
               start_step: int = 0, compile_update: bool = False) -> dict:
    """mlx-lm's trainer shape. For each (epoch, micro-batches, first index) of `epochs`: run
    `step_fn(examples, epoch, index)` → (loss, grads, supervised tokens, tokens) on each micro-batch,
    sum `accum` of them, `reduce(grads, loss, stop, step)` the sums across ranks (None: one process),
    update on the token-weighted mean gradient, and report the step to `callbacks`.
    Returns {"step", "losses", "interrupted"}."""
    step, losses = start_step, []
    for epoch, batches, first in epochs:
        optimizer = callbacks.begin_epoch(epoch, first, optimizer)
        update = make_update(model, optimizer, compile_update)  # a new optimizer: a new compiled update
        acc = _Accumulator()
        for bi in range(first, len(batches)):
            acc.add(*step_fn(batches[bi], epoch, bi))
            if acc.n < accum and bi + 1 < len(batches):
                continue
            grads, loss, stop = acc.grads, acc.loss, callbacks.stop_requested()
            if reduce is not None:
                grads, loss, stop = reduce(grads, loss, stop, step + 1)
            update(grads, acc.scale())
            mx.eval(model.trainable_parameters(), optimizer.state)
            step += 1
            report = StepReport(step, epoch, bi + 1, len(batches), (loss / max(acc.supervised, 1)).item(),
                                acc.tokens, acc.tokens / max(time.perf_counter() - acc.t0, 1e-9), optimizer)
            if not math.isfinite(report.loss):
                callbacks.diverged(report)
                raise UserError(f"loss is {report.loss} at step {step}: training diverged")
            losses.append(report.loss)
            if callbacks.after_step(report, stop):
                return {"step": step, "losses": losses, "interrupted": True}
            acc = _Accumulator()
        callbacks.end_epoch(epoch, step, optimizer)
    return {"step": step, "losses": losses, "interrupted": False}
