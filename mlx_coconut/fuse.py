"""`mlx-coconut fuse`: a training run → one standalone, shareable model directory.

The output is an ordinary mlx-lm model directory (config.json, model*.safetensors, tokenizer files)
with LoRA merged into the base weights (mlx-lm's `LoRALinear.fuse`) and the trained rows of the three
latent tokens written into the embedding (and untied head), so `mlx_lm.load` opens it as a plain LM.
Next to it, `coconut.json` records the COCONUT settings (mode, stage, c, max_latent_stage, token
ids) without a "checkpoint" key: `checkpoint.load` reads it as a model directory and generates with
the latent phase as trained. `README.md` is a model card built from the run's `eval.json`.
"""

import json
import re
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from . import checkpoint as ckpt
from .adapters import ExtraRows, model_config
from .errors import UserError
from .files import atomic_dir
from .run import RUN_FILE, RUN_FORMAT, Run, settings_dict

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
QUANTIZED = (nn.QuantizedLinear, nn.QuantizedEmbedding)


def merge_rows(layer: ExtraRows) -> nn.Module:
    """The base Embedding / Linear with the trained new-token rows written in (quantized like the
    base's other rows when the base is quantized)."""
    base = layer.base
    idx = mx.array(layer.ids)
    if isinstance(base, QUANTIZED):
        mode = getattr(base, "mode", "affine")
        parts = mx.quantize(layer.extra.astype(base.scales.dtype), base.group_size, base.bits, mode=mode)
        names = ["weight", "scales"] + (["biases"] if getattr(base, "biases", None) is not None else [])
        for name, rows in zip(names, parts):
            full = mx.array(getattr(base, name))
            full[idx] = rows.astype(full.dtype)
            setattr(base, name, full)
    else:
        base.weight = layer.merged_weight()
    base.unfreeze()
    return base


def fuse_model(model, dequantize: bool = False):
    """In place: LoRA layers → plain (or re-quantized) Linear layers, ExtraRows → merged base rows."""
    from mlx_lm.utils import dequantize_model

    fused = [(name, m.fuse(dequantize=dequantize)) for name, m in model.named_modules()
             if hasattr(m, "fuse")]  # mlx-lm's LoRALinear
    if fused:
        model.update_modules(tree_unflatten(fused))
    if dequantize:  # before the rows are merged, so the trained rows are written exactly
        dequantize_model(model)
    if isinstance(model.model.embed_tokens, ExtraRows):
        model.model.embed_tokens = merge_rows(model.model.embed_tokens)
    if isinstance(getattr(model, "lm_head", None), ExtraRows):
        model.lm_head = merge_rows(model.lm_head)
    model.unfreeze()
    mx.eval(model.parameters())
    return model


def quantization_config(model) -> Optional[dict]:
    """{"group_size", "bits"} of the quantized layers (mlx-lm's config key), None if there are none."""
    kinds = {(m.group_size, m.bits, getattr(m, "mode", "affine"))
             for _, m in model.named_modules() if isinstance(m, QUANTIZED)}
    if not kinds:
        return None
    if len(kinds) > 1:
        raise UserError(f"the model mixes quantizations {sorted(kinds)}; pass --dequantize")
    group_size, bits, mode = kinds.pop()
    return {"group_size": group_size, "bits": bits, **({} if mode == "affine" else {"mode": mode})}


def base_model_of(run: dict) -> str:
    """The model directory a run (or the chain of --init runs before it) started from."""
    seen = set()
    source = run.get("base_model") or run.get("source") or "unknown"
    while source not in seen and (prev := Run.read(source)) is not None:
        seen.add(source)
        source = prev.record.get("base_model") or prev.record.get("source") or source
    return str(source)


def eval_entry(run_dir: Path, step: Optional[int]) -> Optional[dict]:
    """The eval.json entry of the checkpoint's step (else the last one with an accuracy)."""
    file = run_dir / "eval.json"
    if not file.is_file():
        return None
    try:
        entries = [e for e in json.loads(file.read_text()) if "accuracy" in e]
    except (json.JSONDecodeError, TypeError):
        return None
    same = [e for e in entries if e.get("step") == step]
    return (same or entries or [None])[-1]


def card_rows(selected: Run, state: Optional[dict], dequantize: bool) -> tuple:
    """The model card's table rows (what was trained, from what, how well) and its thoughts count."""
    run = selected.record
    s, cfg, lora = run.get("settings", {}), selected.config, run.get("lora")
    base = base_model_of(run)
    thoughts = min(s.get("stage", 0), s.get("max_latent_stage", 3)) * s.get("c_thought", 1) \
        if s.get("mode") in ("coconut", "pause") else 0
    if cfg.get("train"):
        data = f"`{Path(cfg['train']).name}`" + (f" (first {cfg['samples']} records after a seeded "
                                                  f"shuffle)" if cfg.get("samples") else "")
    else:
        data = f"synthetic word problems ({cfg.get('synth_samples', '?')} records, seed {cfg.get('seed', 0)})"
    if lora:
        q = lora.get("quantization")
        weights = (f"LoRA rank {lora['rank']} (scale {lora['scale']}) merged into the base"
                   + (f", QLoRA {q['bits']}-bit base" if q else "")
                   + (", dequantized" if dequantize else ""))
    else:
        weights = "full fine-tune"
    ev = eval_entry(selected.path, (state or {}).get("step"))
    if ev:
        acc = (f"{ev['accuracy']:.3f} on {ev.get('n', '?')} validation questions "
               f"(epoch {ev.get('epoch', '?')}, step {ev.get('step', '?')}, greedy, exact match "
               f"after `#`)")
    else:
        acc = "not measured (the run has no eval.json entry with an accuracy)"
    rows = [("base model", f"`{Path(base).name}`"), ("weights", weights), ("training data", data),
            ("mode", s.get("mode", "?")), ("stage", s.get("stage", "?")),
            ("c (thoughts per step)", s.get("c_thought", "?")),
            ("max_latent_stage", s.get("max_latent_stage", "?")),
            ("continuous thoughts per question", thoughts),
            ("latent token ids", json.dumps(s.get("latent_ids"))),
            ("training steps", (state or {}).get("step", "?")), ("validation accuracy", acc)]
    return rows, thoughts


def model_card(name: str, selected: Run, state: Optional[dict], dequantize: bool) -> str:
    rows, thoughts = card_rows(selected, state, dequantize)
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"""---
library_name: mlx
pipeline_tag: text-generation
tags:
- mlx
- coconut
- latent-reasoning
---

# {name}

A COCONUT (Chain of Continuous Thought) model trained with mlx-coconut: the question is followed
by `<|start-latent|>`, {thoughts} continuous thought(s) (last hidden states fed back as input
embeddings) and `<|end-latent|>`, then the model writes the answer after `###`.

| | |
|---|---|
{table}

## Use

With the latent phase, as trained (`coconut.json` holds the settings):

```bash
# with mlx-coconut installed (pip install -e . in its checkout)
mlx-coconut generate --model {name} --prompt "Tom has 3 apples and buys 5 more. How many apples?"
mlx-coconut serve --model {name}     # OpenAI-compatible: /v1/completions, /v1/chat/completions
```

As a plain language model (no latent phase; the three tokens are ordinary tokens there):

```python
from mlx_lm import load, generate
model, tokenizer = load("{name}")
```

From the Hub, download it first: `hf download ORG/NAME --local-dir {name}`.
"""


def fuse(run_path, out, dequantize: bool = False, force: bool = False, log=print) -> Path:
    """Write the standalone model directory `out` from run directory `run_path` (atomically)."""
    from mlx_lm.utils import save_config, save_model

    out = Path(out).expanduser()
    selected = Run.read(run_path)
    if selected is None:
        raise UserError(f"{run_path}: not a run directory (no {RUN_FILE} with a checkpoint); "
                        f"fuse takes the --out of `mlx-coconut train`")
    run_dir, run = selected.path, selected.record
    if out.exists() and not force:
        raise UserError(f"--out {out} already exists (pass --force to overwrite)")
    protected = {run_dir.resolve(), *(Path(p).resolve() for p in (run.get("base_model"), run.get("source")) if p)}
    if out.resolve() in protected or run_dir.resolve().is_relative_to(out.resolve()):
        raise UserError(f"--out {out} would overwrite the run or its base model")

    loaded = ckpt.load(selected)
    model = fuse_model(loaded.model, dequantize)
    config = model_config(model)
    for key in ("quantization", "quantization_config"):
        config.pop(key, None)
    if (q := quantization_config(model)) is not None:
        config["quantization"] = q
    settings = settings_dict(loaded.settings)
    record = {"format": RUN_FORMAT, "settings": settings, "fused_from": str(run_dir.resolve()),
              "step": (loaded.state or {}).get("step"), "weights": run.get("weights"),
              "lora": run.get("lora"), "dequantized": dequantize, "eos_id": run.get("eos_id")}

    with atomic_dir(out) as tmp:
        save_model(tmp, model)
        save_config(config, config_path=tmp / "config.json")
        getattr(loaded.tokenizer, "_tokenizer", loaded.tokenizer).save_pretrained(str(tmp))
        (tmp / RUN_FILE).write_text(json.dumps(record, indent=2))
        (tmp / "README.md").write_text(model_card(out.name, selected, loaded.state, dequantize))
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    log(f"wrote {out} ({size / 1e6:.1f} MB): {run.get('weights')} weights, mode {settings['mode']}, "
        f"stage {settings['stage']}, c={settings['c_thought']}")
    return out


def check_repo_id(repo: str):
    if not REPO_ID.match(repo):
        raise UserError(f"--upload-repo {repo!r}: expected ORG/NAME")


def upload(out: Path, repo: str, log=print) -> str:
    """huggingface_hub.upload_folder; any failure (offline, no login, no rights) is one line and
    the local directory stays."""
    from huggingface_hub import HfApi, get_token

    kept = f"the model is kept in {out}"
    if not get_token():
        raise UserError(f"--upload-repo {repo}: not logged in to the Hugging Face Hub (run "
                        f"`hf auth login` or set HF_TOKEN); {kept}")
    try:
        api = HfApi()
        api.create_repo(repo, repo_type="model", exist_ok=True)
        api.upload_folder(folder_path=str(out), repo_id=repo, repo_type="model",
                          commit_message="Upload COCONUT model fused with mlx-coconut")
    except Exception as e:  # network, auth, permissions: huggingface_hub raises many types
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"--upload-repo {repo}: upload failed ({type(e).__name__}: {reason}); {kept}") from None
    url = f"https://huggingface.co/{repo}"
    log(f"uploaded {out} to {url}")
    return url
