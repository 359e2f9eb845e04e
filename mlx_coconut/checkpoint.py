"""Load a model directory or a training-run directory: (model, tokenizer, COCONUT settings).

A converted model directory holds `config.json`, `model*.safetensors` and tokenizer files. A run
directory is such a directory (or adapters + a base reference) plus `coconut.json`, which records the
COCONUT settings the run was trained with. Either is accepted wherever a model is expected.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import mlx.core as mx

from .errors import UserError
from .model import Model, load_model

LATENT_TOKENS = ("<|start-latent|>", "<|latent|>", "<|end-latent|>")
RUN_FILE = "coconut.json"


@dataclass
class Settings:
    """How the model was trained, hence how to prompt it (question only, or + k·c thoughts)."""
    mode: str = "cot"               # cot | coconut | no-cot | pause
    stage: int = 0
    c_thought: int = 1
    max_latent_stage: int = 3
    pad_latent_to_max: bool = False
    latent_ids: Optional[dict] = None  # {"start": id, "latent": id, "end": id} when the tokens exist
    extra: dict = field(default_factory=dict)


@dataclass
class Loaded:
    model: Model
    tokenizer: object               # mlx-lm TokenizerWrapper (encode/decode, eos_token_ids)
    settings: Settings
    path: Path


def load_tokenizer(path: Path):
    from mlx_lm.tokenizer_utils import load_tokenizer as mlx_lm_load_tokenizer
    try:
        return mlx_lm_load_tokenizer(Path(path))
    except Exception as e:  # transformers raises many types for a missing / broken tokenizer
        raise UserError(f"{path}: could not load the tokenizer ({type(e).__name__}: {e})") from None


def latent_token_ids(tokenizer) -> Optional[dict]:
    """Ids of the three COCONUT tokens if the tokenizer has them, else None."""
    vocab = tokenizer.get_vocab()
    if all(t in vocab for t in LATENT_TOKENS):
        return dict(zip(("start", "latent", "end"), (vocab[t] for t in LATENT_TOKENS)))
    return None


def read_settings(path: Path) -> Settings:
    run_file = Path(path) / RUN_FILE
    if not run_file.exists():
        return Settings()
    try:
        data = json.loads(run_file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{run_file}: invalid JSON at line {e.lineno}: {e.msg}") from None
    known = {k: v for k, v in data.get("settings", {}).items() if k in Settings.__dataclass_fields__}
    return Settings(**known)


def load(path, dtype: Optional[mx.Dtype] = None) -> Loaded:
    """Load a converted model directory or a run directory (full weights)."""
    path = Path(path)
    model, _ = load_model(path, dtype=dtype)
    tokenizer = load_tokenizer(path)
    settings = read_settings(path)
    if settings.latent_ids is None:
        settings.latent_ids = latent_token_ids(tokenizer)
    return Loaded(model, tokenizer, settings, path)
