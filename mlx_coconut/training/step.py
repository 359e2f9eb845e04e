"""The step: loss and gradients of one micro-batch (`Stepper`, mx.compile'd per batch layout; this
rank's share under data parallelism), the optimizer a stage starts with, and gradient
checkpointing (a hook on one model instance, `LlamaModel.run_block`)."""

import math
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map

from .. import checkpoint as ckpt
from ..coconut import loss_fn, supervised_rows
from ..data import SpecialIds, make_batch
from ..optimizer import make_optimizer, without_masters
from ..options import TrainConfig


def trace_key(batch: dict, feedback: bool = True, rows=None) -> tuple:
    """What a compiled step depends on besides the weights: the batch shape, the number of labelled
    positions the head runs on (`rows` from `supervised_rows`) and the latent layout (latent columns,
    and which rows hold a thought there)."""
    latent = batch["latent_mask"] if feedback else np.zeros_like(batch["latent_mask"])
    cols = np.flatnonzero(latent.any(axis=0))
    rows = supervised_rows(batch["labels"]) if rows is None else rows
    return batch["input_ids"].shape, rows.shape, tuple(cols.tolist()), latent[:, cols].tobytes()


class Stepper:
    """Loss + gradients for one micro-batch, mx.compile'd per key.

    The latent loop reads the latent columns on the host and bakes them into the graph as Python
    slices (and which rows hold a thought as constants), so a compiled trace is only valid for one
    latent layout: the cache key is (shape, number of labelled positions, latent columns, rows with
    thoughts). `make_batch` buckets T and the first latent column, `supervised_rows` the labelled
    positions, so the keys repeat; past `max_traces` keys batches run eagerly
    (mx.compile keeps every trace)."""

    MAX_TRACES = 256  # a GSM8k epoch at a latent stage uses ~150 keys; each trace compiles in ~1 s

    def __init__(self, model, feedback: bool, use_compile: bool, max_traces: int = MAX_TRACES):
        self.model, self.feedback, self.use_compile = model, feedback, use_compile
        self.value_and_grad = nn.value_and_grad(model, loss_fn)
        self.traces, self.max_traces = {}, max_traces
        self.layouts = set()  # keys seen since the caller last cleared it (traces used per epoch)
        self.state = [model.state, mx.random.state]

    def _compile(self, latent):
        model, vg, fb = self.model, self.value_and_grad, self.feedback

        @partial(mx.compile, inputs=self.state, outputs=self.state)  # value_and_grad re-binds params
        def step(x, y, left_pad, rows):
            (loss, ntoks), grads = vg(model, x, y, latent, left_pad, fb, rows=rows)
            return loss, ntoks, grads

        @partial(mx.compile, inputs=self.state, outputs=self.state)
        def plain(x, y, rows):  # no left padding: the fused causal mask
            (loss, ntoks), grads = vg(model, x, y, latent, None, fb, rows=rows)
            return loss, ntoks, grads

        return step, plain

    def __call__(self, batch):
        x, y = mx.array(batch["input_ids"]), mx.array(batch["labels"])
        latent, lp = batch["latent_mask"], batch["left_pad"]
        if not self.feedback:
            latent = np.zeros_like(latent)
        left_pad = mx.array(lp) if lp.any() else None
        rows = supervised_rows(batch["labels"])
        key = trace_key(batch, self.feedback, rows)
        self.layouts.add(key)
        if self.use_compile:
            fns = self.traces.get(key)
            if fns is None and len(self.traces) < self.max_traces:
                fns = self.traces[key] = self._compile(latent.copy())
            if fns is not None:
                return fns[0](x, y, left_pad, rows) if left_pad is not None else fns[1](x, y, rows)
        (loss, ntoks), grads = self.value_and_grad(self.model, x, y, latent, left_pad, self.feedback,
                                                   rows=rows)
        return loss, ntoks, grads

def make_step_fn(model, special: SpecialIds, cfg: TrainConfig, dist):
    """The loop's step function: loss and gradients of one micro-batch (this rank's share of it
    under data parallelism), with gradient checkpointing if the stage asks for it."""
    if cfg.grad_checkpoint:
        enable_grad_checkpoint(model)
    stepper = Stepper(model, cfg.mode != "pause", cfg.compile)

    def step_fn(examples, epoch: int, bi: int) -> tuple:
        # RNG (LoRA dropout) keyed by position in the run, so a resumed run draws the same
        mx.random.seed(cfg.seed * 1_000_003 + epoch * 100_003 + bi)
        if dist.enabled:  # this rank's share, its gradient weighted by its share of tokens
            loss, grads, tokens = shard_step(stepper, model, examples, special, cfg, dist)
        else:
            batch = make_batch(examples, special.eos, special.latent, cfg.bucket)
            loss, _, grads = stepper(batch)
            tokens = batch["ntokens"]
        return loss, grads, supervised_tokens(examples), tokens
    step_fn.stepper = stepper  # its trace keys per epoch are reported
    return step_fn


def supervised_tokens(examples) -> int:
    """Tokens the loss is averaged over (labels != -100; the first position never is one), counted
    on the formatted examples."""
    return sum(sum(1 for t in e.labels[1:] if t != -100) for e in examples)


def shard_step(stepper, model, examples, special, cfg, dist) -> tuple:
    """This rank's contiguous share of a global batch → (loss, grads, real tokens of the whole batch),
    loss and grads scaled by n_rank / n_batch (supervised tokens) so that their all_sum over the ranks
    is the loss and gradient of one process on the whole batch. Every rank collates every share (cheap,
    host-side) to know all the n_r; a rank with no rows (batch smaller than the ranks) adds zeros."""
    shards = [make_batch(s, special.eos, special.latent, cfg.bucket) if s else None
              for s in dist.split(examples)]
    counts = [batch_supervised_tokens(b) if b is not None else 0 for b in shards]
    ntokens = sum(int(b["ntokens"]) for b in shards if b is not None)
    mine, total = shards[dist.rank], max(sum(counts), 1)
    if mine is None or counts[dist.rank] == 0:
        zeros = tree_map(mx.zeros_like, model.trainable_parameters())
        return mx.array(0.0), zeros, ntokens
    loss, _, g = stepper(mine)
    w = counts[dist.rank] / total
    return loss * w, tree_map(lambda v: v * w, g), ntokens


def batch_supervised_tokens(batch: dict) -> int:
    """What `coconut.loss_fn` counts, on a collated batch: shifted labels != -100."""
    return int((batch["labels"][:, 1:] != -100).sum())


def all_sum_reducer(dist):
    """One all_sum per optimizer step: gradients, loss and the stop flag (every rank stops at the
    same step)."""
    def reduce(grads, loss, stop: bool, step: int) -> tuple:
        grads, loss, hit = dist.all_sum((grads, loss, mx.array(float(stop))), f"step {step}")
        return grads, loss, hit.item() > 0
    return reduce


def check_ranks(dist, model, records, valid, step, cfg, log):
    """Same data, same start, same weights on every rank (else a clear error, not silent drift)."""
    total = sum(mx.abs(v.astype(mx.float32)).sum() for _, v in tree_flatten(model.trainable_parameters()))
    dist.check_same({"records": len(records), "valid": len(valid), "step": step,
                     "batch_size": cfg.batch_size, "seed": cfg.seed, "stage": cfg.stage,
                     "weights_checksum": round(float(total.item()), 3)})
    log(f"data parallel: {dist.size} ranks, global batch {cfg.batch_size} "
        f"(≤ {math.ceil(cfg.batch_size / dist.size)} per rank), gradients all-summed each step")


def optimizer_for(model, cfg: TrainConfig, reset: str, init_run=None, resumed=None):
    """A fresh optimizer, with the saved state of a resumed run (`resumed`: its Run), or the moments
    of the --init run (`init_run`) when the cadence (`reset`) is `never`: what is saved is read
    once (the latest checkpoint's), then the optimizer is built with it."""
    carried = resumed if resumed is not None else init_run if reset == "never" else None
    saved = ckpt.optimizer_state(carried) if carried is not None else None
    if saved is not None and resumed is None:
        # the --init run's moments, not its masters: they are its latest weights, and --init may
        # have loaded RUN:best
        saved = without_masters(saved)
    return make_optimizer(model, cfg, saved=saved)


# ---------------------------------------------------------------- gradient checkpointing


def enable_grad_checkpoint(model):
    """Recompute each whole transformer block (attention and MLP) in the backward pass instead of
    storing its activations, for this model only (a hook on its instance, not on the class). The
    latent loop writes the KV cache pass by pass, so the layer's key / value buffers go in and out
    of the checkpointed function explicitly: the recompute (which runs after later passes) writes at
    its own pass's offset into its own pass's buffers, and gradients still reach the keys/values of
    earlier passes."""
    model.model.run_block = checkpointed_block


def disable_grad_checkpoint(model):
    model.model.run_block = None


def checkpointed_block(block, x, mask, positions, cache, layer):
    if cache is None:
        def inner(params, x):
            block.update(params)
            return block(x, mask, positions, cache, layer)
        return mx.checkpoint(inner)(block.trainable_parameters(), x)
    off = cache.offset
    if cache.keys[layer] is None:  # allocate the buffers outside, so they can be inputs
        at = block.self_attn
        empty = mx.zeros((x.shape[0], at.n_kv_heads, 0, at.head_dim), x.dtype)
        cache._grow(layer, empty, empty, off + x.shape[1])

    def inner(params, x, k_buf, v_buf):
        block.update(params)
        cache.keys[layer], cache.values[layer] = k_buf, v_buf
        saved, cache.offset = cache.offset, off
        out = block(x, mask, positions, cache, layer)
        cache.offset = saved
        return out, cache.keys[layer], cache.values[layer]

    out, cache.keys[layer], cache.values[layer] = mx.checkpoint(inner)(
        block.trainable_parameters(), x, cache.keys[layer], cache.values[layer])
    return out
