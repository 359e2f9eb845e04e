"""Our own Llama transformer for MLX, with an explicit KV cache.

COCONUT feeds the model's final-norm hidden state at one position back in as the input embedding of
the next position, so we need a forward that (a) accepts embeddings instead of token ids, (b) returns
the final-norm hidden states separately from the logits and (c) appends to a KV cache column range by
column range, for left-padded batches. Weight names are Hugging Face's (the same as mlx-lm's
`models/llama.py`), so HF, mlx-lm and mlx-community (quantized) directories all load.
"""

import glob
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .errors import UserError
from .fastexp import attention, silu

LLAMA_LIKE = {"llama", "mistral"}  # same block; mistral only differs by defaults we read from config


@dataclass
class ModelArgs:
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    attention_bias: bool = False
    mlp_bias: bool = False
    model_type: str = "llama"
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, config: dict) -> "ModelArgs":
        model_type = config.get("model_type", "llama")
        if model_type not in LLAMA_LIKE:
            raise UserError(f"unsupported model_type '{model_type}' (supported: {sorted(LLAMA_LIKE)})")
        names = {f.name for f in fields(cls)} - {"extra"}
        known = {k: v for k, v in config.items() if k in names}
        try:
            args = cls(**known)
        except TypeError as e:  # a required key is missing
            raise UserError(f"config.json is missing a required key: {e}") from None
        args.extra = {k: v for k, v in config.items() if k not in names}
        return args

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**self.extra, **d}


def rope_frequencies(args: ModelArgs) -> Optional[mx.array]:
    """Per-dimension rope frequencies, or None for plain rope with `base=rope_theta`.

    Llama 3.1's `llama3` scaling stretches the low frequencies by `factor` and interpolates the
    middle band; the formula is Meta's reference (also mlx-lm's `Llama3RoPE`)."""
    scaling = args.rope_scaling
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    dims, base = args.head_dim, args.rope_theta
    freqs = base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)  # wavelength / 2π
    if kind == "linear":
        return freqs * scaling["factor"]
    if kind == "default":
        return None
    if kind != "llama3":
        raise UserError(f"unsupported rope_scaling type '{kind}' (supported: llama3, linear)")
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_len = scaling.get("original_max_position_embeddings", 8192)
    wavelens = 2 * math.pi * freqs
    freqs = mx.where(wavelens > old_len / low, freqs * factor, freqs)
    is_medium = (wavelens > old_len / high) & (wavelens < old_len / low)
    smooth = (old_len / wavelens - low) / (high - low)
    return mx.where(is_medium, freqs / ((1 - smooth) / factor + smooth), freqs)


class KVCache:
    """Keys and values of every layer for one batch, preallocated and grown in `step` columns.

    `offset` is the number of columns already written (the same for every row). `left_pad[b]` is
    how many leading columns of row b are padding: positions are `column - left_pad` and padding
    keys are masked, which matches HF's attention_mask + position_ids for left-padded batches."""

    def __init__(self, num_layers: int, left_pad: Optional[mx.array] = None, step: int = 256):
        self.keys: list = [None] * num_layers
        self.values: list = [None] * num_layers
        self.offset = 0
        self.left_pad = left_pad
        self.step = step

    def update(self, layer: int, keys: mx.array, values: mx.array):
        """Write this layer's new keys/values at [offset, offset + L); return all so far."""
        L = keys.shape[2]
        end = self.offset + L
        if self.keys[layer] is None or end > self.keys[layer].shape[2]:
            self._grow(layer, keys, values, end)
        self.keys[layer][..., self.offset:end, :] = keys
        self.values[layer][..., self.offset:end, :] = values
        return self.keys[layer][..., :end, :], self.values[layer][..., :end, :]

    def _grow(self, layer, keys, values, end):
        B, H, _, D = keys.shape
        capacity = ((end + self.step - 1) // self.step) * self.step
        new_k = mx.zeros((B, H, capacity, D), keys.dtype)
        new_v = mx.zeros((B, H, capacity, values.shape[3]), values.dtype)
        if self.keys[layer] is not None:
            new_k[..., : self.offset, :] = self.keys[layer][..., : self.offset, :]
            new_v[..., : self.offset, :] = self.values[layer][..., : self.offset, :]
        self.keys[layer], self.values[layer] = new_k, new_v

    def advance(self, n: int):
        self.offset += n


def attention_mask(L: int, offset: int, left_pad: Optional[mx.array]):
    """Boolean [B, 1, L, offset+L] mask (True = attend), "causal", or None.

    Padding queries may attend to themselves only, so no softmax row is empty (their outputs are
    never read: labels there are -100 and real tokens never attend to them)."""
    if left_pad is None:
        return "causal" if L > 1 and offset == 0 else (None if L == 1 else _causal(L, offset))
    q = mx.arange(offset, offset + L)[:, None]
    k = mx.arange(offset + L)[None, :]
    causal = k <= q
    not_pad = k[None] >= left_pad[:, None, None]
    return ((causal[None] & not_pad) | (k == q)[None])[:, None]


def _causal(L, offset):
    q = mx.arange(offset, offset + L)[:, None]
    return mx.arange(offset + L)[None, :] <= q


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (
            args.num_attention_heads, args.num_key_value_heads, args.head_dim)
        self.scale = self.head_dim ** -0.5
        dim, bias = args.hidden_size, args.attention_bias
        self.q_proj = nn.Linear(dim, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, dim, bias=bias)
        self.rope_base = args.rope_theta
        self._freqs = rope_frequencies(args)  # leading underscore: not a parameter

    def rope(self, x, positions):
        if self._freqs is None:
            return mx.fast.rope(x, self.head_dim, traditional=False, base=self.rope_base,
                                scale=1.0, offset=positions)
        return mx.fast.rope(x, self.head_dim, traditional=False, base=None, scale=1.0,
                            offset=positions, freqs=self._freqs)

    def __call__(self, x, mask, positions, cache: Optional[KVCache], layer: int):
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        q, k = self.rope(q, positions), self.rope(k, positions)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        out = attention(q, k, v, self.scale, mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, hidden, bias = args.hidden_size, args.intermediate_size, args.mlp_bias
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def __call__(self, x):
        return self.down_proj(silu(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x, mask, positions, cache, layer):
        h = x + self.self_attn(self.input_layernorm(x), mask, positions, cache, layer)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    # a per-instance hook: `run_block(block, x, mask, positions, cache, layer)` runs each block in
    # place of `block(x, ...)` (training's gradient checkpointing); None on the class
    run_block = None

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [TransformerBlock(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, inputs=None, cache: Optional[KVCache] = None, input_embeddings=None,
                 left_pad: Optional[mx.array] = None):
        """Final-norm hidden states [B, L, D] for new columns (token ids or embeddings)."""
        h = self.embed_tokens(inputs) if input_embeddings is None else input_embeddings
        L = h.shape[1]
        offset = 0
        if cache is not None:
            offset, left_pad = cache.offset, cache.left_pad
        positions = offset if left_pad is None else offset - left_pad
        mask = attention_mask(L, offset, left_pad)
        run = self.run_block
        for i, layer in enumerate(self.layers):
            h = layer(h, mask, positions, cache, i) if run is None else run(layer, h, mask, positions, cache, i)
        if cache is not None:
            cache.advance(L)
        return self.norm(h)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = LlamaModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    @property
    def layers(self):
        return self.model.layers

    def embed(self, ids: mx.array) -> mx.array:
        return self.model.embed_tokens(ids)

    def hidden_states(self, inputs=None, cache=None, input_embeddings=None, left_pad=None):
        """Final-norm hidden states: what COCONUT feeds back (HF's `hidden_states[-1]`)."""
        return self.model(inputs, cache, input_embeddings, left_pad)

    def logits(self, hidden: mx.array) -> mx.array:
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(hidden)
        return self.lm_head(hidden)

    def __call__(self, inputs=None, cache=None, input_embeddings=None, left_pad=None):
        return self.logits(self.hidden_states(inputs, cache, input_embeddings, left_pad))

    def make_cache(self, left_pad: Optional[mx.array] = None, step: int = 256) -> KVCache:
        return KVCache(len(self.model.layers), left_pad, step)

    def sanitize(self, weights: dict) -> dict:
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        return weights


def load_config(path: Path) -> dict:
    config_file = Path(path) / "config.json"
    if not Path(path).is_dir():
        raise UserError(f"model directory not found: {path}")
    if not config_file.exists():
        raise UserError(f"no config.json in {path} (is it a converted model directory?)")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{config_file}: invalid JSON at line {e.lineno}: {e.msg}") from None


def load_model(path, dtype: Optional[mx.Dtype] = None, lazy: bool = False):
    """Load a model directory (HF, mlx-lm or mlx-community quantized layout) → (Model, config dict).

    `dtype` casts floating-point weights (e.g. mx.float32 on a CPU); quantized weights stay packed."""
    path = Path(path)
    config = load_config(path)
    model = Model(ModelArgs.from_dict(config))
    files = sorted(glob.glob(str(path / "model*.safetensors")))
    if not files:
        raise UserError(f"no model*.safetensors in {path}")
    weights = {}
    for f in files:
        weights.update(mx.load(f))
    weights = model.sanitize(weights)
    if quant := config.get("quantization"):
        # Quantize exactly the layers that were stored quantized (those with .scales).
        nn.quantize(model, group_size=quant["group_size"], bits=quant["bits"],
                    class_predicate=lambda p, m: f"{p}.scales" in weights)
    if dtype is not None:
        weights = {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) and not k.endswith(
            (".scales", ".biases")) else v for k, v in weights.items()}
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise UserError(f"{path}: weights do not match config.json ({e})") from None
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    return model, config
