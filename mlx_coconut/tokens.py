"""The three COCONUT tokens: <|start-latent|> <|latent|> <|end-latent|>.

They are added as special tokens (never split, never merged) and get embedding rows (and output-head
rows when untied) copied from the token `<<` — the official COCONUT code initialises them from an
existing token instead of random rows, so the model starts from a sensible input and the new logits are
not wildly off. Works on mlx-lm's and mlx-coconut's Llama (same attribute names).
"""

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .errors import UserError

START_LATENT, LATENT, END_LATENT = "<|start-latent|>", "<|latent|>", "<|end-latent|>"
# Added in this order, so ids are start, latent, end (the official code adds start, end, latent;
# only the numbering differs).
LATENT_TOKENS = (START_LATENT, LATENT, END_LATENT)
INIT_TOKEN = "<<"


@dataclass(frozen=True)
class LatentTokens:
    start: int
    latent: int
    end: int

    @property
    def ids(self):
        return (self.start, self.latent, self.end)


def _hf(tokenizer):
    """The transformers tokenizer behind mlx-lm's TokenizerWrapper (or the tokenizer itself)."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    return tokenizer._tokenizer if isinstance(tokenizer, TokenizerWrapper) else tokenizer


def init_token_id(tokenizer) -> int:
    ids = _hf(tokenizer).encode(INIT_TOKEN, add_special_tokens=False)
    if len(ids) != 1:
        raise UserError(f"{INIT_TOKEN!r} is not a single token in this tokenizer (it encodes to {ids}); "
                        f"cannot initialise the latent tokens from it")
    return ids[0]


def vocab_rows(model) -> int:
    return model.model.embed_tokens.weight.shape[0]


def _row_arrays(layer) -> list:
    """Names of the per-row arrays of an Embedding / Linear (quantized: packed weight, scales, biases)."""
    if isinstance(layer, (nn.QuantizedEmbedding, nn.QuantizedLinear)):
        return ["weight", "scales"] + (["biases"] if layer.biases is not None else [])
    return ["weight"]


def _grow(layer, ids, src_id):
    """Rows `ids` of an Embedding / Linear / their quantized forms := row `src_id`, growing as needed.
    Quantized rows are copied as stored (same bits and group size), so old rows stay bit-identical and
    each new row equals the `<<` row exactly."""
    rows = layer.weight.shape[0]
    n = max(rows, max(ids) + 1)
    for name in _row_arrays(layer):
        p = getattr(layer, name)
        setattr(layer, name, mx.concatenate([p, mx.zeros((n - rows, *p.shape[1:]), p.dtype)]))
    _copy_row(layer, ids, src_id)
    if hasattr(layer, "num_embeddings"):
        layer.num_embeddings = n
    return n


def add_tokens_to_tokenizer(tokenizer) -> tuple:
    """Add the three tokens to the tokenizer only (special, never split or normalized) → (ids, new ids).
    Idempotent: tokens already present keep their ids."""
    from tokenizers import AddedToken

    hf = _hf(tokenizer)
    vocab = hf.get_vocab()
    missing = [t for t in LATENT_TOKENS if t not in vocab]
    if missing:
        hf.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing],
                      special_tokens=True)
        vocab = hf.get_vocab()
    return LatentTokens(*(vocab[t] for t in LATENT_TOKENS)), [vocab[t] for t in missing]


def add_latent_tokens(model, tokenizer) -> LatentTokens:
    """Add the three tokens to `tokenizer` (mlx-lm TokenizerWrapper or transformers tokenizer) and to
    `model`; idempotent: tokens already present keep their ids and rows."""
    src = init_token_id(tokenizer)
    tokens, new_ids = add_tokens_to_tokenizer(tokenizer)
    rows = vocab_rows(model)
    # rows to (re)initialise: tokens just added, or present in the tokenizer but not yet in the model
    init = sorted(set(new_ids) | {i for i in tokens.ids if i >= rows})
    if init:
        n = _grow(model.model.embed_tokens, init, src)
        head = getattr(model, "lm_head", None)  # only untied models have one
        if head is not None:
            _grow(head, init, src)
        for holder in (getattr(model, "args", None), model.model):
            if holder is not None and hasattr(holder, "vocab_size"):
                holder.vocab_size = n
        mx.eval(model.parameters())
    return tokens


def base_rows(layer, ids) -> mx.array:
    """Rows `ids` of an Embedding/Linear weight, dequantized if needed."""
    idx = mx.array(ids)
    if isinstance(layer, (nn.QuantizedEmbedding, nn.QuantizedLinear)):
        b = layer.biases[idx] if layer.biases is not None else None
        return mx.dequantize(layer.weight[idx], layer.scales[idx], b, layer.group_size, layer.bits)
    return layer.weight[idx]


def _copy_row(layer, ids, src_id):
    """Rows `ids` := row `src_id` of an Embedding/Linear, or of the trainable rows of a LoRA model's
    ExtraRows (whose frozen base holds the source row)."""
    if hasattr(layer, "extra"):  # adapters.ExtraRows: the new rows train apart from the frozen base
        src = base_rows(layer.base, [src_id]).astype(layer.extra.dtype)
        layer.extra = mx.broadcast_to(src, layer.extra.shape)
        return
    idx = mx.array(ids)
    for name in _row_arrays(layer):
        p = mx.array(getattr(layer, name))
        p[idx] = mx.broadcast_to(p[src_id], (len(ids), *p.shape[1:]))
        setattr(layer, name, p)


def reset_latent_rows(model, tokenizer, tokens: LatentTokens):
    """Re-initialise the three tokens' input (and untied output) rows from the model's current `<<`
    row. The official CoT run has no latent tokens: they are created from `<<` when the first latent
    stage loads it. Ours exist from stage 0 on, where the tied head pushes their logits down as
    never-target classes, so a latent stage starting from a CoT run resets them to match."""
    src = init_token_id(tokenizer)
    _copy_row(model.model.embed_tokens, list(tokens.ids), src)
    head = getattr(model, "lm_head", None)
    if head is not None:
        _copy_row(head, list(tokens.ids), src)
    mx.eval(model.parameters())


def eos_ids(tokenizer) -> list:
    """Every id that ends generation (mlx-lm's wrapper may list several, e.g. Llama 3 instruct)."""
    ids = set(getattr(tokenizer, "eos_token_ids", None) or [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if not ids:
        raise UserError("the tokenizer defines no EOS token")
    return sorted(ids)
