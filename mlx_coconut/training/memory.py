"""What training will hold in memory, from a model's config.json alone: a warning before loading
when full fine-tuning (or LoRA) of the model cannot fit."""

import json
from pathlib import Path
from typing import Optional

import mlx.core as mx

from ..options import DEFAULTS, DTYPE_BYTES, TrainConfig


def count_params(config: dict) -> int:
    """Parameter count of a Llama from its config.json (no weights needed)."""
    D, L, I, V = (config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"],
                  config["vocab_size"])
    H = config["num_attention_heads"]
    KV = config.get("num_key_value_heads") or H
    hd = config.get("head_dim") or D // H
    per_layer = 2 * D * H * hd + 2 * D * KV * hd + 3 * D * I + 2 * D
    return L * per_layer + V * D * (1 if config.get("tie_word_embeddings") else 2) + D


def available_memory() -> Optional[int]:
    try:
        if mx.metal.is_available():
            return int(mx.device_info()["max_recommended_working_set_size"])
    except Exception:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def lora_params(config: dict, cfg: TrainConfig) -> int:
    """Trainable parameters of a LoRA run: rank-r A and B on the 7 projections of each LoRA block,
    and the three new-token rows of the embedding (and untied head)."""
    D, I, L = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    H = config["num_attention_heads"]
    KV = config.get("num_key_value_heads") or H
    hd = config.get("head_dim") or D // H
    per_rank = 2 * (D + H * hd) + 2 * (D + KV * hd) + 3 * (D + I)  # q, o; k, v; gate, up, down
    blocks = min(_given(cfg, "lora_layers") or L, L)
    rows = 3 * D * (1 if config.get("tie_word_embeddings") else 2)
    return _given(cfg, "lora_rank") * per_rank * blocks + rows


def _given(cfg: TrainConfig, name: str):
    value = getattr(cfg, name)
    return DEFAULTS[name] if value is None else value


def memory_estimate(config: dict, cfg: TrainConfig) -> tuple:
    """(params, bytes before activations) of what training holds. Full: weights and gradients in
    --dtype (summed over accumulated micro-batches in fp32), two fp32 AdamW moments, and fp32 masters
    when --dtype is not fp32. LoRA: the frozen base (quantized: the bits plus a scale and a bias per
    group) and the fp32 adapters and new-token rows with their gradients and moments."""
    p = count_params(config)
    w = DTYPE_BYTES[cfg.dtype]
    if not cfg.lora:
        grads = 4 if _given(cfg, "grad_accumulation_steps") > 1 else w
        return p, p * (w + grads + 8 + (4 if w < 4 else 0))
    quant = config.get("quantization") or {}
    bits = cfg.q_bits or quant.get("bits")
    group = (_given(cfg, "q_group_size") if cfg.q_bits else quant.get("group_size")) or 64
    base = p * (bits / 8 + 2 * w / group) if bits else p * w
    return p, int(base + lora_params(config, cfg) * (4 + 4 + 8))


def warn_memory(model_dir: Path, cfg: TrainConfig, log):
    cfg_file = model_dir / "config.json"
    if not cfg_file.exists():
        return
    try:
        config = json.loads(cfg_file.read_text())
        params, need = memory_estimate(config, cfg)
    except (KeyError, ValueError, TypeError):
        return
    avail = available_memory()
    if avail is not None and need > avail:
        what = "LoRA on the frozen base" if cfg.lora else \
            "full fine-tuning (weights + grads + 2 fp32 Adam moments + fp32 masters below fp32)"
        log(f"warning: {what} of this {params / 1e9:.2f}B-parameter model needs ~{need / 1e9:.1f} GB "
            f"before activations, but only {avail / 1e9:.1f} GB is available; "
            + ("use --lora (LoRA) or --lora -q 4 (QLoRA)" if not cfg.lora else "use -q 4 (QLoRA)"))
