"""GGUF (llama.cpp / ollama) -> Hugging Face-named fp32 weights, config.json and tokenizer.

`mx.load` reads GGUF natively: Q4_0/Q4_1/Q8_0 come back as MLX quantized triples (weight, scales,
biases; group size 32, the bit width differs per tensor), F16/F32 as plain arrays. What is left to do
here: dequantize, rename to HF names, undo llama.cpp's q/k row permutation, and rebuild config.json
and tokenizer.json from the metadata.
"""

import json
import math
import os
import struct
from pathlib import Path

import mlx.core as mx

from mlx_coconut.errors import UserError

# ggml tensor type ids (ggml.h); the ones we dequantize, by name for messages.
GGML_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
    17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS",
    24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16",
}
SUPPORTED_TYPES = {"F32", "F16", "Q4_0", "Q4_1", "Q8_0"}
# (elements per block, bytes per block) of the types whose data size we check against the file
BLOCK_BYTES = {"F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "Q4_0": (32, 18), "Q4_1": (32, 20),
               "Q8_0": (32, 34)}
GGML_MAX_DIMS = 4

# GGUF tensor names -> HF (mlx-lm models/llama.py) names.
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}

# tokenizer.ggml.pre -> the pre-tokenizer in front of the byte-level BPE (llama.cpp llama-vocab.cpp).
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = ("default", "gpt2", "gpt-2", "smollm", "llama-bpe", "llama3")


# ---------------------------------------------------------------- header (tensor types)
def _remaining(f) -> int:
    return os.fstat(f.fileno()).st_size - f.tell()


def _need(f, n, what):
    """A count read from the header must fit in what is left of the file (a corrupt 2^40 would
    otherwise allocate or loop for ever)."""
    if n > _remaining(f):
        raise UserError(f"{f.name}: corrupt or truncated GGUF header ({what} of {n} bytes past the "
                        f"end of the file)")


def _read_str(f):
    (n,) = struct.unpack("<Q", f.read(8))
    _need(f, n, "a string")
    return f.read(n)


_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _skip_value(f, vtype):
    if vtype in _SCALAR:
        f.read(struct.calcsize("<" + _SCALAR[vtype]))
    elif vtype == 8:
        _read_str(f)
    elif vtype == 9:
        itype, n = struct.unpack("<IQ", f.read(12))
        if itype in _SCALAR:
            _need(f, n * struct.calcsize("<" + _SCALAR[itype]), "an array")
            f.read(n * struct.calcsize("<" + _SCALAR[itype]))
        else:
            _need(f, n * 8, "an array")  # every element is at least a length
            for _ in range(n):
                _skip_value(f, itype)
    else:
        raise UserError(f"{f.name}: corrupt GGUF metadata (value type {vtype})")


def read_header(path):
    """(general.architecture, {tensor name: ggml type name}) from the GGUF header, before loading.

    mx.load silently dequantizes some types we do not test (K-quants) and would only fail deep inside
    for others; reading the header lets us refuse precisely, naming the tensor and its type. Every
    count, shape and data offset is checked against the file size, so a truncated or corrupt file
    is one line naming what is wrong, not a crash inside the loader."""
    try:
        return _read_header(path)
    except (struct.error, UnicodeDecodeError):
        raise UserError(f"{path}: truncated or corrupt GGUF header") from None


def _read_header(path):
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise UserError(f"{path}: not a GGUF file (bad magic)")
        version, n_tensors, n_kv = struct.unpack("<IQQ", f.read(20))
        if version < 2:
            raise UserError(f"{path}: GGUF version {version} is too old (need 2 or 3)")
        _need(f, n_kv * 13, f"{n_kv} metadata entries")      # key length + type + 1 byte at least
        _need(f, n_tensors * 24, f"{n_tensors} tensor entries")  # name length + dims + type + offset
        arch, alignment = None, 32
        for _ in range(n_kv):
            key = _read_str(f)
            (vtype,) = struct.unpack("<I", f.read(4))
            if key == b"general.architecture" and vtype == 8:
                arch = _read_str(f).decode()
            elif key == b"general.alignment" and vtype == 4:
                (alignment,) = struct.unpack("<I", f.read(4))
            else:
                _skip_value(f, vtype)
        types, extents = {}, []
        for _ in range(n_tensors):
            name = _read_str(f).decode()
            (n_dims,) = struct.unpack("<I", f.read(4))
            if not 1 <= n_dims <= GGML_MAX_DIMS:
                raise UserError(f"{path}: tensor {name} has {n_dims} dimensions (corrupt GGUF)")
            dims = struct.unpack(f"<{n_dims}Q", f.read(8 * n_dims))
            ttype, offset = struct.unpack("<IQ", f.read(12))
            types[name] = GGML_TYPES.get(ttype, f"type {ttype}")
            extents.append((name, types[name], dims, offset))
        data_start = -(-f.tell() // max(alignment, 1)) * max(alignment, 1)
        size = os.fstat(f.fileno()).st_size
    for name, t, dims, offset in extents:
        if t not in BLOCK_BYTES:
            continue  # refused by type later
        per_block, nbytes = BLOCK_BYTES[t]
        n = math.prod(dims)
        if n % per_block:
            raise UserError(f"{path}: tensor {name} ({t}) has {n} elements, not a multiple of {per_block}")
        end = data_start + offset + n // per_block * nbytes
        if end > size:
            raise UserError(f"{path}: tensor {name} ({t}, shape {list(dims)}) ends at byte {end}, past "
                            f"the end of the file ({size} bytes): truncated or corrupt GGUF")
    return arch, types


def check_architecture(arch):
    if arch != "llama":
        raise UserError(f"unsupported GGUF architecture {arch!r} (only 'llama' models are supported)")


# ---------------------------------------------------------------- weights
def _scalar(md, key, default=None):
    v = md.get(key, default)
    return v.item() if isinstance(v, mx.array) else v


def unpermute(w: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's q/k row order. HF keeps each head's rotary halves [x_0..x_{d/2} | x_{d/2}..];
    llama.cpp interleaves them into pairs (x_0, x_{d/2}), (x_1, x_{d/2+1}), ... for its rope kernel.
    Per head: rows (d/2, 2) -> (2, d/2)."""
    out, inp = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def hf_name(name: str) -> str:
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    parts = name.split(".")  # blk.N.attn_q.weight
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{BLOCK_NAMES[parts[2]]}.{parts[3]}"
    raise UserError(f"unexpected GGUF tensor {name!r} for a Llama model")


def check_finite(raw: dict, path: Path):
    """Corrupt data dequantizes to NaN/inf without any error. A quantized value is an integer times a
    finite scale plus a finite bias, so checking the scales and biases (and the float tensors) is
    enough, and nothing is dequantized twice or kept in memory."""
    for name, w in raw.items():
        if mx.issubdtype(w.dtype, mx.floating) and not mx.all(mx.isfinite(w)).item():
            tensor = name.rsplit(".", 1)[0] + ".weight" if name.endswith((".scales", ".biases")) else name
            raise UserError(f"{path.name}: tensor {tensor} holds non-finite values (NaN/inf): corrupt "
                            f"GGUF data")


def dequantized(raw: dict) -> dict:
    """Merge mx.load's (weight, scales, biases) triples into fp32 matrices."""
    out = {}
    for name, w in raw.items():
        if name.endswith((".scales", ".biases")):
            continue
        base = name[: -len(".weight")]
        scales = raw.get(base + ".scales")
        if scales is not None:
            # packed uint32 columns / groups = bits, with a group size of 32 (one GGUF block)
            bits = w.shape[-1] // scales.shape[-1]
            w = mx.dequantize(w, scales.astype(mx.float32), raw[base + ".biases"].astype(mx.float32),
                              group_size=32, bits=bits)
        out[name] = w.astype(mx.float32)
    return out


def llama3_rope_scaling(factors: mx.array, head_dim: int, theta: float):
    """llama.cpp stores Llama 3.1's rope scaling as a `rope_freqs` tensor of per-frequency divisors.
    Recover the HF `rope_scaling` dict: factor = the largest divisor; the other constants are the ones
    every Llama 3.x release uses — checked by recomputing the tensor, refused when it differs."""
    factors = factors.astype(mx.float32).tolist()
    factor = max(factors)
    cfg = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192}
    low_wl = cfg["original_max_position_embeddings"] / cfg["low_freq_factor"]
    high_wl = cfg["original_max_position_embeddings"] / cfg["high_freq_factor"]
    expect = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < high_wl:
            expect.append(1.0)
        elif wavelen > low_wl:
            expect.append(factor)
        else:
            smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
            expect.append(1 / ((1 - smooth) / factor + smooth))
    if len(expect) != len(factors) or max(abs(a - b) for a, b in zip(expect, factors)) > 1e-3 * factor:
        raise UserError("GGUF rope_freqs tensor does not match Llama 3 rope scaling; "
                        "convert the original Hugging Face checkpoint instead")
    return cfg


def gguf_config(md: dict, weights: dict) -> dict:
    check_architecture(md.get("general.architecture"))
    g = lambda k, d=None: _scalar(md, f"llama.{k}", d)  # noqa: E731
    hidden, heads = g("embedding_length"), g("attention.head_count")
    head_dim = g("attention.key_length") or g("rope.dimension_count") or hidden // heads
    theta = float(g("rope.freq_base", 10000.0))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": g("block_count"),
        "intermediate_size": g("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": g("attention.head_count_kv", heads),
        "head_dim": head_dim,
        # metadata stores fp32 (9.999999747e-06): round back to the value the HF config had
        "rms_norm_eps": float(f"{g('attention.layer_norm_rms_epsilon', 1e-5):.6g}"),
        "rope_theta": float(f"{theta:.6g}"),
        "max_position_embeddings": g("context_length", 4096),
        "vocab_size": weights["model.embed_tokens.weight"].shape[0],
        "tie_word_embeddings": "lm_head.weight" not in weights,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    }
    if md.get("llama.rope.scaling.type") == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": float(g("rope.scaling.factor"))}
    for key, hf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
        if f"tokenizer.ggml.{key}" in md:
            config[hf_key] = _scalar(md, f"tokenizer.ggml.{key}")
    return config


def load_gguf(path, unpermute_qk: bool = True):
    """Read a Llama GGUF: returns (fp32 weights with HF names, config dict, HF fast tokenizer).

    `unpermute_qk=False` exists only so a test can show what the un-permute buys."""
    path = Path(path)
    arch, types = read_header(path)
    check_architecture(arch)
    bad = {n: t for n, t in types.items() if t not in SUPPORTED_TYPES}
    if bad:
        name, t = next(iter(bad.items()))
        kinds = sorted(set(bad.values()))
        raise UserError(
            f"{path.name}: tensor {name} has GGUF type {t} ({len(bad)} tensors of type "
            f"{', '.join(kinds)}); supported: {', '.join(sorted(SUPPORTED_TYPES))} — use a Q8_0/Q4_0/F16 "
            f"file or the original Hugging Face checkpoint")
    try:
        raw, md = mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"{path}: cannot read ({str(e).splitlines()[0]})") from None
    check_finite(raw, path)
    raw = dequantized(raw)
    rope_freqs = raw.pop("rope_freqs.weight", None)
    weights = {hf_name(k): v for k, v in raw.items()}
    config = gguf_config(md, weights)
    if rope_freqs is not None:
        config["rope_scaling"] = llama3_rope_scaling(rope_freqs, config["head_dim"], config["rope_theta"])
    if unpermute_qk:
        for k in weights:
            if k.endswith("self_attn.q_proj.weight"):
                weights[k] = unpermute(weights[k], config["num_attention_heads"])
            elif k.endswith("self_attn.k_proj.weight"):
                weights[k] = unpermute(weights[k], config["num_key_value_heads"])
    return weights, config, gguf_tokenizer(md, path)


# ---------------------------------------------------------------- tokenizer
def gguf_tokenizer(md: dict, path: Path = Path("model.gguf")):
    """Rebuild a byte-level BPE tokenizer (tokenizer.json) from tokenizer.ggml.* metadata."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    kind = md.get("tokenizer.ggml.model")
    pre = md.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise UserError(f"{path.name}: unsupported GGUF tokenizer model {kind!r} (only byte-level BPE "
                        f"'gpt2' tokenizers, e.g. Llama 3 / SmolLM2); convert the HF checkpoint instead")
    if pre not in PRE_TOKENIZERS:
        raise UserError(f"{path.name}: unsupported GGUF pre-tokenizer {pre!r} "
                        f"(supported: {', '.join(PRE_TOKENIZERS)})")
    tokens = md["tokenizer.ggml.tokens"]
    types = md["tokenizer.ggml.token_type"].tolist() if "tokenizer.ggml.token_type" in md else []
    merges = [tuple(m.split(" ", 1)) for m in md.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False,
                               byte_fallback=False))
    if pre in ("llama-bpe", "llama3"):
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre == "smollm":  # StarCoder-style: every digit is its own piece, then GPT-2's regex
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # token_type 3 = control (special), 4 = user-defined: both must match whole, never merged by BPE
    added = [AddedToken(tokens[i], special=(t == 3), normalized=False)
             for i, t in enumerate(types) if t in (3, 4)]
    tok.add_tokens(added)

    name = lambda key: tokens[_scalar(md, key)] if key in md else None  # noqa: E731
    bos, eos = name("tokenizer.ggml.bos_token_id"), name("tokenizer.ggml.eos_token_id")
    add_bos = bool(_scalar(md, "tokenizer.ggml.add_bos_token", False))
    if add_bos and bos is not None:
        bos_id = _scalar(md, "tokenizer.ggml.bos_token_id")
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                          special_tokens=[(bos, bos_id)])])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos,
        unk_token=name("tokenizer.ggml.unknown_token_id"),
        pad_token=name("tokenizer.ggml.padding_token_id"),
        chat_template=md.get("tokenizer.chat_template"),
        model_max_length=_scalar(md, "llama.context_length", 4096),
        add_bos_token=add_bos,  # recorded in tokenizer_config.json
    )


def save_tokenizer(tokenizer, path: Path):
    """tokenizer.json + tokenizer_config.json + special_tokens_map.json, readable by transformers 4
    and 5 and by mlx_lm.tokenizer_utils.load_tokenizer."""
    tokenizer.save_pretrained(str(path))
    cfg_path = Path(path) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    # transformers 5 writes its new class name "TokenizersBackend", unknown to transformers 4
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["add_bos_token"] = bool(getattr(tokenizer, "add_bos_token", False))
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    specials = {k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if cfg.get(k)}
    (Path(path) / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
