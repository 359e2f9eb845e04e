"""Hugging Face checkpoints (a hub id or a local directory) -> weights with HF names + config."""

import glob
import json
from pathlib import Path

import mlx.core as mx

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
    config = json.loads(config_path.read_text())
    check_architecture(config, str(config_path))
    files = sorted(glob.glob(str(path / "*.safetensors")))
    if not files:
        raise UserError(f"{path}: no *.safetensors files (PyTorch .bin checkpoints are not supported)")
    weights = {}
    for f in files:
        weights.update(mx.load(f))
    # rotary inv_freq buffers are recomputed from the config; tied models reuse the embedding
    weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
    if config.get("tie_word_embeddings", False):
        weights.pop("lm_head.weight", None)
    if "model.embed_tokens.weight" not in weights:
        raise UserError(f"{path}: no model.embed_tokens.weight in the safetensors files")
    return weights, config
