"""Model surgery for training: LoRA, trainable new-token rows, QLoRA quantization (as mlx-lm's
`tuner/utils.py`).

`apply_lora` freezes a model, adds mlx-lm LoRA layers and wraps the embedding (and untied head) in
`ExtraRows`, so only the rows of the three latent tokens train beside the adapters; `model_weights`
merges those rows back for a full-weight checkpoint. The tokens themselves are added by `tokens.py`.
"""

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .model import Model
from .tokens import base_rows


class ExtraRows(nn.Module):
    """An Embedding / Linear (or their quantized forms) whose rows `ids` are replaced by a small
    trainable matrix: the big base matrix stays frozen, only len(ids) rows train (the COCONUT tokens).

    Works both as the embedding (`__call__` on ids, `as_linear` for tied heads) and as an untied
    output head (`__call__` on hidden states when `head=True`)."""

    def __init__(self, base: nn.Module, ids, head: bool = False):
        super().__init__()
        self.base = base
        self.base.freeze()
        self._ids = [int(i) for i in ids]
        self._head = head
        # fp32 whatever the base's dtype, like mlx-lm's LoRA adapters: the rows are trained, and
        # AdamW's updates are lost on a bf16 weight (docs/cli.md, "Precision")
        self.extra = base_rows(base, self._ids).astype(mx.float32)
        # The new tokens are appended in order, so their ids are normally one contiguous run [a, b):
        # then the head writes only those n logit columns (a slice update, no full-vocab work beyond
        # the frozen base matmul) and the embedding picks rows with one gather + one where.
        a = min(self._ids)
        self._span = (a, a + len(self._ids)) if self._ids == list(range(a, a + len(self._ids))) else None

    def _embed(self, ids):
        h = self.base(ids)
        if self._span is not None:
            a, b = self._span
            rows = self.extra[mx.clip(ids - a, 0, b - a - 1)].astype(h.dtype)
            return mx.where(((ids >= a) & (ids < b))[..., None], rows, h)
        for k, i in enumerate(self._ids):
            h = mx.where((ids == i)[..., None], self.extra[k].astype(h.dtype), h)
        return h

    def _project(self, x):
        logits = self.base.as_linear(x) if not self._head else self.base(x)
        new = (x @ self.extra.astype(x.dtype).T).astype(logits.dtype)  # [..., n]: the new columns
        if self._span is not None:
            a, b = self._span
            logits[..., a:b] = new
        else:
            for k, i in enumerate(self._ids):
                logits[..., i:i + 1] = new[..., k:k + 1]
        return logits

    @property
    def ids(self) -> list:
        """The token ids whose rows train."""
        return self._ids

    def __call__(self, x):
        return self._project(x) if self._head else self._embed(x)

    def as_linear(self, x):
        return self._project(x)

    def merged_weight(self):
        """The base matrix with the trained rows written back (unquantized bases only)."""
        return _set_rows(self.base.weight, self._ids, self.extra)


def _set_rows(w, ids, rows):
    w = mx.array(w)
    w[mx.array(ids)] = rows.astype(w.dtype)
    return w


def apply_lora(model: Model, lora: dict, new_ids) -> Model:
    """Freeze `model`, add mlx-lm LoRA layers to the last `lora["layers"]` blocks (attention + MLP
    projections) and make the new-token rows of the embedding (and untied head) trainable. Every
    trainable parameter is fp32 (mlx-lm creates the adapters so); the frozen base keeps its dtype."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model.freeze()
    n = lora.get("layers") or len(model.layers)
    linear_to_lora_layers(model, n, {"rank": lora["rank"], "scale": lora["scale"],
                                     "dropout": lora.get("dropout", 0.0)})
    model.model.embed_tokens = ExtraRows(model.model.embed_tokens, new_ids)
    if not model.args.tie_word_embeddings:
        model.lm_head = ExtraRows(model.lm_head, new_ids, head=True)
    return model


def quantize_base(model: Model, bits: int, group_size: int = 64):
    """QLoRA: quantize the frozen base in place (every Linear and the embedding that divide evenly)."""
    nn.quantize(model, group_size=group_size, bits=bits,
                class_predicate=lambda p, m: isinstance(m, (nn.Linear, nn.Embedding))
                and m.weight.shape[-1] % group_size == 0)


def is_quantized(model) -> bool:
    return any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())


def model_weights(model: Model) -> dict:
    """Full weights with HF names (ExtraRows merged back) for a full-weight run."""
    flat = dict(tree_flatten(model.parameters()))
    for name, m in model.named_modules():
        if isinstance(m, ExtraRows):
            for k in [k for k in flat if k.startswith(name + ".")]:
                del flat[k]
            flat[name + ".weight"] = m.merged_weight()
    return flat


def model_config(model: Model) -> dict:
    """The model's config.json, with the vocabulary grown by the latent tokens."""
    config = model.args.to_dict()
    config["vocab_size"] = model.model.embed_tokens.weight.shape[0]
    return config
