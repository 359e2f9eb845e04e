"""The optimizer: torch's AdamW, with every update applied in fp32 whatever the weights' dtype.

MLX's AdamW does its arithmetic in the parameter's dtype: on a bf16 weight an update of lr 1e-4 is
below half a bf16 spacing and rounds away (ten steps left [0.05, 1.0, -0.3, 2.0] bit-identical), and a
gradient scaled by an fp32 number promotes the weight to fp32 behind the run's back. Here the moments
are fp32, and a trainable parameter held in a lower precision gets an fp32 master copy in the
optimizer's state: the update is applied to the master and the model receives it rounded to its own
dtype (the classic mixed-precision recipe). fp32 parameters — the whole model on a CPU, LoRA adapters
and the new-token rows always — are updated directly and have no master.

Masters are weights, not moments: they are saved with the optimizer state (so --resume continues
exactly) and carried over when the official cadence re-creates the optimizer every epoch.
"""

from typing import Optional

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten

MASTER = "master"


class AdamW(optim.AdamW):
    """torch's AdamW (bias-corrected moments, decoupled weight decay) computed in fp32."""

    def init_single(self, parameter, state):
        super().init_single(parameter.astype(mx.float32), state)  # fp32 moments
        if parameter.dtype != mx.float32:
            state[MASTER] = parameter.astype(mx.float32)

    def apply_single(self, gradient, parameter, state):
        master = state.get(MASTER, parameter)
        new = super().apply_single(gradient.astype(mx.float32), master.astype(mx.float32), state)
        if MASTER in state:
            state[MASTER] = new
        return new.astype(parameter.dtype)


def make_optimizer(model, cfg, previous=None, saved: Optional[dict] = None) -> AdamW:
    """A fresh AdamW on the model's trainable parameters (MLX's default is uncorrected, which makes
    the first updates after every reset ~3x larger). `previous`: the optimizer it replaces, whose
    fp32 masters carry over (its moments do not). `saved`: a state read from a checkpoint (flat,
    dotted names), copied in."""
    optimizer = AdamW(learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay,
                      bias_correction=True)
    optimizer.init(model.trainable_parameters())  # from the parameters: masters copy the weights
    if previous is not None:
        set_optimizer_state(optimizer, {k: v for k, v in tree_flatten(previous.state)
                                        if k.endswith("." + MASTER)})
    if saved is not None:
        set_optimizer_state(optimizer, saved)
    return optimizer


def without_masters(state: dict) -> dict:
    """An optimizer state (flat) minus the masters: for carrying moments to other weights (--init
    RUN:best with --reset-optimizer never), whose masters would overwrite those weights."""
    return {k: v for k, v in state.items() if not k.endswith("." + MASTER)}


def set_optimizer_state(optimizer, saved: dict):
    """Copy saved leaves (a tree, or a flat dict of dotted names) into the freshly initialised state,
    in place: the state keeps its exact tree structure and the optimizer stays initialised."""
    flat = dict(tree_flatten(saved))

    def fill(node, prefix):
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for k, v in list(items):
            key = f"{prefix}{k}"
            if isinstance(v, (dict, list)):
                fill(v, key + ".")
            elif key in flat:
                node[k] = flat[key]

    fill(optimizer.state, "")
