"""Model directories and training-run directories: load either, save a run's checkpoints atomically.

A converted model directory holds `config.json`, `model*.safetensors` and tokenizer files. A run
directory (`mlx-coconut train --out runs/NAME`) is accepted wherever a model directory is:

    runs/NAME/
      coconut.json          resolved config: settings, token ids, base model, LoRA config,
                            "checkpoint": the latest checkpoint sub-directory (the commit point) and
                            "best": {checkpoint, accuracy, epoch, step} of the best validation accuracy
      ckpt-0000120/         the checkpoint: full weights (config.json + model.safetensors) or
                            adapters.safetensors (LoRA + the new-token rows; base from coconut.json),
                            tokenizer files (with the latent tokens), optimizer.safetensors (moments
                            and fp32 masters), state.json (step, epoch, batch in epoch, stage, seed,
                            the data-order options)
      metrics.jsonl         one line per optimizer step
      eval.json             per-epoch validation loss / accuracy (a list, one entry per epoch)

No RNG state is saved: training draws its randomness (data order, uniform stages, LoRA dropout) from
seeds keyed by (seed, epoch, batch), so a resumed run draws the same without one.

Saving writes a temp directory, renames it to `ckpt-<step>`, then replaces `coconut.json` (os.replace)
to point at it, and only then deletes the older checkpoint: a process that dies anywhere in between
leaves the previous checkpoint loadable. Non-finite weights are never written. A training process
holds an exclusive lock on `.lock` in the run directory for its lifetime (files.RunLock). The best
checkpoint is kept beside the latest (often it is the same directory) and is only deleted once
coconut.json names a better one. Reading a run directory: run.py (`Run`).
"""

import json
import os
import shutil
import struct
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from .adapters import apply_lora, is_quantized, model_config, model_weights, quantize_base
from .errors import UserError
from .files import disk_space_for, read_json, write_json_atomic
from .model import Model, load_model
from .run import (RUN_FILE, RUN_FORMAT, Run, Settings, checkpoint_dir, is_run_dir,  # noqa: F401 (re-exported)
                  read_run, read_settings, settings_dict, split_ref)
from .tokens import LATENT_TOKENS


@dataclass
class Loaded:
    model: Model
    tokenizer: object               # mlx-lm TokenizerWrapper (encode/decode, eos_token_ids)
    settings: Settings
    path: Path
    run: Optional[Run] = None       # the run directory, read once (None: a model directory)
    state: Optional[dict] = None    # the checkpoint's state.json (step, epoch, ...)
    checkpoint: Optional[str] = None  # which checkpoint of the run was loaded (ckpt-NNNNNNN)



def refuse_remote_code(path: Path):
    """A model directory may name its own Python classes (`auto_map`); transformers would import them
    (after a [y/N] prompt). mlx-coconut never runs code from a model directory: refuse up front."""
    for name in ("tokenizer_config.json", "config.json"):
        file = Path(path) / name
        if not file.is_file():
            continue
        try:
            data = json.loads(file.read_text())
        except (ValueError, OSError):
            continue  # reported by whoever reads it for real
        if isinstance(data, dict) and data.get("auto_map"):
            raise UserError(f"{file}: asks for custom code (auto_map {json.dumps(data['auto_map'])}); "
                            f"mlx-coconut never runs code from a model directory")


def load_tokenizer(path: Path):
    """The one tokenizer loader: mlx-lm's wrapper, never with remote code."""
    from mlx_lm.tokenizer_utils import load as mlx_lm_load_tokenizer
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: not a model directory")
    refuse_remote_code(path)
    try:
        return mlx_lm_load_tokenizer(path, tokenizer_config_extra={"trust_remote_code": False})
    except Exception as e:  # transformers raises many types for a missing / broken tokenizer
        msg = str(e).splitlines()[0] if str(e) else ""
        raise UserError(f"{path}: could not load the tokenizer ({type(e).__name__}: {msg})") from None


def latent_token_ids(tokenizer) -> Optional[dict]:
    """Ids of the three COCONUT tokens if the tokenizer has them, else None."""
    vocab = tokenizer.get_vocab()
    if all(t in vocab for t in LATENT_TOKENS):
        return dict(zip(("start", "latent", "end"), (vocab[t] for t in LATENT_TOKENS)))
    return None



# ---------------------------------------------------------------- load


def load(ref, dtype: Optional[mx.Dtype] = None) -> Loaded:
    """Load a converted model directory or a run directory (full weights or LoRA adapters).
    A run is `RUN` (best checkpoint if recorded, else latest), `RUN:best` or `RUN:latest`, or a
    `Run` already read. What to load is resolved first (the weights' directory: the model, the
    checkpoint, or a LoRA run's base), then the weights are loaded once, in `dtype`."""
    run = ref if isinstance(ref, Run) else Run.read(ref)
    if run is None:
        path, which = split_ref(ref)
        if which:
            raise UserError(f"{ref}: ':{which}' selects a checkpoint of a run directory, and {path} "
                            f"is not one (no {RUN_FILE} with a checkpoint)")
        files = weights = path
    else:
        files = run.checkpoint()
        weights = _lora_base(run, files) if run.lora else files
    model, _ = load_model(weights, dtype=dtype)
    tokenizer = load_tokenizer(files)
    if run is not None and run.lora:
        _add_adapters(model, run.record["lora"], files, tokenizer)
    settings = run.settings if run is not None else read_settings(path)
    if settings.latent_ids is None:
        settings.latent_ids = latent_token_ids(tokenizer)
    settings.check_latent_tokens(f"{run.path if run is not None else path}: ")  # a mode it cannot run
    if run is None:
        return Loaded(model, tokenizer, settings, path)
    state = read_json(files / "state.json") if (files / "state.json").exists() else None
    return Loaded(model, tokenizer, settings, run.path, run, state, files.name)


def _lora_base(run: Run, ckpt: Path) -> Path:
    """A LoRA run's base model directory, checked against the fingerprint the run recorded."""
    base = Path(run.record["base_model"])
    if not base.is_dir():
        raise UserError(f"{ckpt.parent}: its base model {base} is missing (LoRA runs store adapters only)")
    check_base_fingerprint(run.record, base, ckpt.parent)
    return base


def _add_adapters(model: Model, lora: dict, ckpt: Path, tokenizer):
    """A LoRA checkpoint's adapters and new-token rows onto its base model (loaded)."""
    from .tokens import add_latent_tokens

    ids = add_latent_tokens(model, tokenizer).ids  # same ids: the tokenizer already has them
    if (q := lora.get("quantization")) and not is_quantized(model):
        quantize_base(model, q["bits"], q["group_size"])
    apply_lora(model, lora, ids)
    # the adapters and new-token rows train (and are saved) in fp32 whatever the base's dtype is: a
    # resumed run keeps them so (their forward casts to the base's dtype)
    adapters = load_safetensors(ckpt / "adapters.safetensors")
    adapters = {k: v.astype(mx.float32) for k, v in adapters.items()}
    model.load_weights(list(adapters.items()), strict=False)
    mx.eval(model.parameters())
    model.eval()


def optimizer_state(run: Run) -> dict:
    """The optimizer state of a run's latest checkpoint, flat (dotted names; masters included)."""
    flat = load_safetensors(run.checkpoint("latest") / "optimizer.safetensors")
    flat.pop("__mx_random_state__", None)  # written by earlier versions, never used
    return flat


def load_optimizer_state(run) -> tuple:
    """(optimizer state tree, state.json dict) of a run's latest checkpoint (`run`: a Run or its
    path)."""
    run = run if isinstance(run, Run) else Run.open(run)
    state = read_json(run.checkpoint("latest") / "state.json")
    return tree_unflatten(list(optimizer_state(run).items())), state


def load_safetensors(file) -> dict:
    """mx.load with a truncated / corrupt file reported as one line naming it."""
    try:
        return mx.load(str(file))
    except (RuntimeError, ValueError) as e:
        raise UserError(f"{file}: cannot read ({str(e).splitlines()[0]}); the file is truncated or "
                        f"corrupt") from None



def base_fingerprint(model_dir) -> dict:
    """What a LoRA run's adapters depend on: the base's config (shapes) and every tensor's name,
    shape and dtype (read from the safetensors headers, no weights loaded)."""
    model_dir = Path(model_dir)
    config = read_json(model_dir / "config.json")
    keys = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
            "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings", "quantization")
    digest = hashlib.sha1()
    for f in sorted(model_dir.glob("model*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n)) if 0 < n < 1 << 30 else {}
        for name in sorted(k for k in header if k != "__metadata__"):
            digest.update(f"{name}{header[name].get('shape')}{header[name].get('dtype')};".encode())
    return {"config": {k: config.get(k) for k in keys}, "tensors": digest.hexdigest()}


def check_base_fingerprint(run: dict, base: Path, run_dir: Path):
    saved = run.get("base_fingerprint")
    if not saved:
        return
    try:
        now = base_fingerprint(base)
    except (OSError, ValueError, struct.error) as e:
        raise UserError(f"{run_dir}: cannot read its base model {base} ({e})") from None
    diff = [f"{k} {saved['config'].get(k)} -> {now['config'].get(k)}" for k in saved["config"]
            if saved["config"].get(k) != now["config"].get(k)]
    if diff or saved["tensors"] != now["tensors"]:
        what = ", ".join(diff) if diff else "its tensor names/shapes/dtypes differ"
        raise UserError(f"{run_dir}: its base model {base} is not the one the adapters were trained on "
                        f"({what}); restore that base model")


def all_finite(tree) -> bool:
    """Every floating-point leaf finite (one reduction per tensor, evaluated once)."""
    checks = [mx.all(mx.isfinite(v)) for _, v in tree_flatten(tree)
              if isinstance(v, mx.array) and mx.issubdtype(v.dtype, mx.floating)]
    return bool(mx.all(mx.array(checks)).item()) if checks else True


def save_checkpoint(run_dir, run: dict, model: Model, tokenizer, optimizer, state: dict,
                    keep_previous: bool = False) -> Path:
    """Write checkpoint `ckpt-<step>` into `run_dir` atomically and point coconut.json at it.

    `run` is the resolved config (coconut.json minus "checkpoint"); `run["weights"]` is "full" or
    "lora". `state` (json-able) is written as state.json."""
    run_dir = Path(run_dir)
    if not all_finite(model.trainable_parameters()):
        raise UserError(f"{run_dir}: the weights at step {state['step']} are not finite (NaN/inf): "
                        f"not saved")
    run_dir.mkdir(parents=True, exist_ok=True)
    name = f"ckpt-{state['step']:07d}"
    final = run_dir / name
    tmp = run_dir / f".{name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    lora = run["weights"] == "lora"
    weights = dict(tree_flatten(model.trainable_parameters())) if lora else model_weights(model)
    opt = dict(tree_flatten(optimizer.state)) if optimizer is not None else {}
    need = sum(v.nbytes for v in (*weights.values(), *opt.values()))  # + small tokenizer / json files
    try:
        with disk_space_for(final, need):  # the previous checkpoint stays until this one is written
            tmp.mkdir()
            if lora:
                mx.save_safetensors(str(tmp / "adapters.safetensors"), weights)
            else:
                mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
                (tmp / "config.json").write_text(json.dumps(model_config(model), indent=2))
            hf = getattr(tokenizer, "_tokenizer", tokenizer)
            hf.save_pretrained(str(tmp))
            _write_optimizer(tmp / "optimizer.safetensors", opt)
            (tmp / "state.json").write_text(json.dumps(state, indent=2))
        if final.exists():  # the same step saved again (e.g. epoch end right after --save-every)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    previous = Run.read(run_dir)
    best = previous.record.get("best") if previous else None  # kept across saves (and --resume)
    write_json_atomic(run_dir / RUN_FILE, {**run, "format": RUN_FORMAT, "checkpoint": name,
                                           **({"best": best} if best else {})})
    if not keep_previous:
        _remove_checkpoints(run_dir, keep={name, best and best["checkpoint"]})
    return final


def mark_best(run_dir, accuracy: float, epoch: int, step: int) -> bool:
    """Record the latest checkpoint as the best one if its validation accuracy beats the recorded
    best (strictly, as the official `cur_acc > best_acc`; the first accuracy always counts).
    Atomic: coconut.json names the new best before the old best directory is deleted."""
    run_dir = Path(run_dir)
    run = dict(Run.open(run_dir).record)
    best = run.get("best")
    if best is not None and accuracy <= best["accuracy"]:
        return False
    run["best"] = {"checkpoint": run["checkpoint"], "accuracy": accuracy, "epoch": epoch, "step": step}
    write_json_atomic(run_dir / RUN_FILE, run)
    _remove_checkpoints(run_dir, keep={run["checkpoint"]})
    return True


def _remove_checkpoints(run_dir: Path, keep: set):
    for old in run_dir.glob("ckpt-*"):
        if old.name not in keep and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)


def _write_optimizer(file: Path, flat: dict):
    # a separate function so tests can make it fail mid-save
    mx.save_safetensors(str(file), flat)

