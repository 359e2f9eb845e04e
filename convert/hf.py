"""Hugging Face checkpoints (a hub id or a local directory) -> weights with HF names + config."""

import glob
import json
from pathlib import Path

import mlx.core as mx

from mlx_coconut.checkpoint import load_safetensors, refuse_remote_code
from mlx_coconut.errors import UserError

# What mlx-coconut's Llama (and mlx-lm's models/llama.py) can run: Mistral is the same block.
LLAMA_MODEL_TYPES = {"llama", "mistral"}
LLAMA_ARCHITECTURES = {"LlamaForCausalLM", "MistralForCausalLM"}
# Files copied next to the weights so mlx_lm / transformers find the tokenizer and chat template.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "generation_config.json", "chat_template.jinja",
                   "chat_template.json", "added_tokens.json")
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]


def download(repo_id: str) -> Path:
    """snapshot_download with the two failures users actually hit turned into one line each."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)

    try:
        # only the top level: Meta repos also carry original/consolidated.*.pth (another 16 GB)
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS,
                                      ignore_patterns=["original/*"]))
    except GatedRepoError:
        raise UserError(
            f"{repo_id} is a gated repository: accept the licence on https://huggingface.co/{repo_id} "
            f"(Meta's Llama licence for meta-llama/*), then run `huggingface-cli login` "
            f"(or set HF_TOKEN) and retry") from None
    except RepositoryNotFoundError:
        raise UserError(f"{repo_id}: no such local directory or Hugging Face repository "
                        f"(private repos need `huggingface-cli login`)") from None
    except LocalEntryNotFoundError:
        raise UserError(f"{repo_id}: cannot reach huggingface.co and the model is not in the local "
                        f"HF cache; check your network, or pass a local directory / .gguf file") from None


def resolve(src: str) -> Path:
    """A local directory, or `owner/name` downloaded from the hub."""
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{src}: not a directory (expected an HF model directory or a .gguf file)")
        return path
    if src.count("/") == 1 and not src.startswith((".", "/", "~")):
        return download(src)
    raise UserError(f"{src}: no such directory")


def check_architecture(config: dict, where: str):
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    if model_type not in LLAMA_MODEL_TYPES or (archs and not set(archs) & LLAMA_ARCHITECTURES):
        raise UserError(
            f"{where}: unsupported architecture (model_type={model_type!r}, "
            f"architectures={archs}); only Llama-architecture models (LlamaForCausalLM) are supported")


def load_hf(path: Path):
    """(weights with HF names, config dict) from a local HF directory; arrays stay lazy."""
    config_path = path / "config.json"
    if not config_path.is_file():
        raise UserError(f"{path}: no config.json (is this a Hugging Face model directory?)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{config_path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(config, dict):
        raise UserError(f"{config_path}: expected a JSON object")
    check_architecture(config, str(config_path))
    refuse_remote_code(path)
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        raise UserError(f"{path}: no tokenizer (tokenizer.json or tokenizer.model); a converted model "
                        f"needs one")
    files = sorted(glob.glob(str(path / "*.safetensors")))
    if not files:
        raise UserError(f"{path}: no *.safetensors files (PyTorch .bin checkpoints are not supported)")
    weights = {}
    for f in files:
        weights.update(load_safetensors(f))
    # rotary inv_freq buffers are recomputed from the config; tied models reuse the embedding
    weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
    if config.get("tie_word_embeddings", False):
        weights.pop("lm_head.weight", None)
    if "model.embed_tokens.weight" not in weights:
        raise UserError(f"{path}: no model.embed_tokens.weight in the safetensors files")
    return weights, config


def expected_shapes(config: dict) -> dict:
    """{HF tensor name: shape} of a Llama with this config (unquantized, no biases)."""
    try:
        D, L, I, V = (int(config["hidden_size"]), int(config["num_hidden_layers"]),
                      int(config["intermediate_size"]), int(config["vocab_size"]))
        H = int(config["num_attention_heads"])
        KV = int(config.get("num_key_value_heads") or H)
        hd = int(config.get("head_dim") or D // H)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        raise UserError(f"config.json: missing or invalid {e}") from None
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (V, D)
    for i in range(L):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (H * hd, D), p + "self_attn.k_proj.weight": (KV * hd, D),
            p + "self_attn.v_proj.weight": (KV * hd, D), p + "self_attn.o_proj.weight": (D, H * hd),
            p + "mlp.gate_proj.weight": (I, D), p + "mlp.up_proj.weight": (I, D),
            p + "mlp.down_proj.weight": (D, I), p + "input_layernorm.weight": (D,),
            p + "post_attention_layernorm.weight": (D,)})
        if config.get("attention_bias"):
            shapes.update({p + "self_attn.q_proj.bias": (H * hd,), p + "self_attn.k_proj.bias": (KV * hd,),
                           p + "self_attn.v_proj.bias": (KV * hd,), p + "self_attn.o_proj.bias": (D,)})
        if config.get("mlp_bias"):
            shapes.update({p + "mlp.gate_proj.bias": (I,), p + "mlp.up_proj.bias": (I,),
                           p + "mlp.down_proj.bias": (D,)})
    return shapes


def check_shapes(weights: dict, config: dict, where: str):
    """The weights must be exactly the tensors config.json describes: a mismatch found at convert
    time, not as a broadcast error at the first forward pass."""
    expected = expected_shapes(config)
    for name, shape in expected.items():
        if name not in weights:
            raise UserError(f"{where}: tensor {name} is missing from the weights")
        if tuple(weights[name].shape) != shape:
            raise UserError(f"{where}: tensor {name} has shape {list(weights[name].shape)} but config.json "
                            f"implies {list(shape)} (hidden_size {config['hidden_size']}, "
                            f"vocab_size {config['vocab_size']}, ...)")
    extra = sorted(set(weights) - set(expected))
    if extra:
        raise UserError(f"{where}: unexpected tensor {extra[0]} ({len(extra)} not in a Llama with this "
                        f"config.json)")
