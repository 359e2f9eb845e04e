"""Model directories and training-run directories: load either, save runs atomically.

A converted model directory holds `config.json`, `model*.safetensors` and tokenizer files. A run
directory (`mlx-coconut train --out runs/NAME`) is accepted wherever a model directory is:

    runs/NAME/
      coconut.json          resolved config: settings, token ids, base model, LoRA config,
                            "checkpoint": the latest checkpoint sub-directory (the commit point) and
                            "best": {checkpoint, accuracy, epoch, step} of the best validation accuracy
      ckpt-0000120/         the checkpoint: full weights (config.json + model.safetensors) or
                            adapters.safetensors (LoRA + the new-token rows; base from coconut.json),
                            tokenizer files (with the latent tokens), optimizer.safetensors,
                            state.json (step, epoch, batch in epoch, RNG)
      metrics.jsonl         one line per optimizer step
      eval.json             per-epoch validation loss / accuracy (a list, one entry per epoch)

Saving writes a temp directory, renames it to `ckpt-<step>`, then replaces `coconut.json` (os.replace)
to point at it, and only then deletes the older checkpoint: a process that dies anywhere in between
leaves the previous checkpoint loadable. Non-finite weights are never written. A training process
holds an exclusive lock on `.lock` in the run directory for its lifetime (released by the OS when the
process ends, however it ends). The best checkpoint is kept beside the latest (often it is the same
directory) and is only deleted once coconut.json names a better one.

`RUN` selects the best checkpoint when the run recorded one (the official recipe picks checkpoints
by validation accuracy), else the latest; `RUN:best` and `RUN:latest` choose explicitly.
"""

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from .adapters import apply_lora, is_quantized, model_config, model_weights, quantize_base
from .data import FormatConfig, SpecialIds
from .errors import MLX_WRITE_ERROR, UserError
from .tokens import LATENT_TOKENS
from .model import Model, load_model

RUN_FILE = "coconut.json"
RUN_FORMAT = 1
SELECTORS = ("best", "latest")


@dataclass
class Settings:
    """How the model was trained, hence how to prompt it (question only, or + k·c thoughts)."""
    mode: str = "cot"               # cot | coconut | no-cot | pause
    stage: int = 0
    c_thought: int = FormatConfig.c_thought
    max_latent_stage: int = FormatConfig.max_latent_stage
    pad_latent_to_max: bool = FormatConfig.pad_latent_to_max
    latent_ids: Optional[dict] = None  # {"start": id, "latent": id, "end": id} when the tokens exist
    extra: dict = field(default_factory=dict)

    def format_config(self, stage: Optional[int] = None) -> FormatConfig:
        """The prompt form a model trained with these settings expects (no uniform mixing at eval,
        as official). `stage` overrides the trained stage."""
        self.check_latent_tokens()
        return FormatConfig.from_settings(self, stage)

    def check_latent_tokens(self, where: str = ""):
        if self.mode in ("coconut", "pause") and not self.latent_ids:
            raise UserError(f"{where}trained in '{self.mode}' mode but the tokenizer has no latent tokens")

    def special_ids(self, tokenizer) -> SpecialIds:
        """Latent-token ids (-1 when the model has none, e.g. a plain converted model) and EOS."""
        lat = self.latent_ids or {}
        eos = tokenizer.eos_token_id
        eos = eos if eos is not None else eos_ids(tokenizer)[0]
        return SpecialIds(lat.get("start", -1), lat.get("latent", -1), lat.get("end", -1), int(eos))


def eos_ids(tokenizer) -> list:
    """Every id that ends generation (mlx-lm's wrapper may list several, e.g. Llama 3 instruct)."""
    ids = set(getattr(tokenizer, "eos_token_ids", None) or [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if not ids:
        raise UserError("the tokenizer defines no EOS token")
    return sorted(ids)


@dataclass
class Loaded:
    model: Model
    tokenizer: object               # mlx-lm TokenizerWrapper (encode/decode, eos_token_ids)
    settings: Settings
    path: Path
    run: Optional[dict] = None      # coconut.json of a run directory
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


def _read_json(file: Path) -> dict:
    try:
        return json.loads(Path(file).read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{file}: invalid JSON at line {e.lineno}: {e.msg}") from None


def split_ref(ref) -> tuple:
    """`RUN`, `RUN:best` or `RUN:latest` -> (Path(RUN), "best" | "latest" | None)."""
    head, sep, tail = str(ref).rpartition(":")
    if sep and head and tail in SELECTORS:
        return Path(head), tail
    return Path(ref), None


def read_run(path) -> Optional[dict]:
    """coconut.json of a run directory (one with a checkpoint), else None."""
    run_file = split_ref(path)[0] / RUN_FILE
    if not run_file.is_file():
        return None
    run = _read_json(run_file)
    return run if run.get("checkpoint") else None


def is_run_dir(path) -> bool:
    return read_run(path) is not None


def _settings(data: dict) -> Settings:
    known = {k: v for k, v in data.get("settings", {}).items() if k in Settings.__dataclass_fields__}
    return Settings(**known)


def read_settings(path: Path) -> Settings:
    run_file = Path(path) / RUN_FILE
    if not run_file.exists():
        return Settings()
    return _settings(_read_json(run_file))


CKPT_NAME = re.compile(r"ckpt-\d+")


def select_checkpoint(run: dict, ref, which: Optional[str] = None) -> str:
    """The checkpoint sub-directory `ref` names: `which` (or the ref's `:best` / `:latest`), else the
    best one when the run recorded a validation accuracy, else the latest."""
    which = which or split_ref(ref)[1]
    best = run.get("best")
    if which == "best" and not best:
        raise UserError(f"{ref}: no best checkpoint recorded (the run has no validation accuracy); "
                        f"use {split_ref(ref)[0]}:latest")
    if which == "latest" or not best:
        return run["checkpoint"]
    return best["checkpoint"]


def checkpoint_dir(path, which: Optional[str] = None) -> Path:
    run = read_run(path)
    if run is None:
        raise UserError(f"{path}: not a run directory (no {RUN_FILE} with a checkpoint)")
    name = select_checkpoint(run, path, which)
    # only a sub-directory of this run: an edited coconut.json must not load weights from elsewhere
    if not isinstance(name, str) or not CKPT_NAME.fullmatch(name):
        raise UserError(f"{split_ref(path)[0] / RUN_FILE}: \"checkpoint\": {json.dumps(name)} is not a "
                        f"checkpoint of this run directory (expected a name like ckpt-0000120)")
    ckpt = split_ref(path)[0] / name
    if ckpt.is_symlink() or not ckpt.is_dir():
        raise UserError(f"{path}: {RUN_FILE} points at {name}, which does not exist")
    return ckpt


# ---------------------------------------------------------------- load


def load(path, dtype: Optional[mx.Dtype] = None) -> Loaded:
    """Load a converted model directory or a run directory (full weights or LoRA adapters).
    A run is `RUN` (best checkpoint if recorded, else latest), `RUN:best` or `RUN:latest`."""
    ref = path
    path, which = split_ref(path)
    run = read_run(path)
    if run is None:
        if which:
            raise UserError(f"{ref}: ':{which}' selects a checkpoint of a run directory, and {path} "
                            f"is not one (no {RUN_FILE} with a checkpoint)")
        model, _ = load_model(path, dtype=dtype)
        tokenizer = load_tokenizer(path)
        settings = read_settings(path)
        if settings.latent_ids is None:
            settings.latent_ids = latent_token_ids(tokenizer)
        settings.check_latent_tokens(f"{path}: ")  # a mode the model cannot run fails now
        return Loaded(model, tokenizer, settings, path)

    ckpt = checkpoint_dir(ref)
    tokenizer = load_tokenizer(ckpt)
    if run.get("weights") == "lora":
        model = _load_lora(run, ckpt, tokenizer, dtype)
    else:
        model, _ = load_model(ckpt, dtype=dtype)
    settings = _settings(run)
    if settings.latent_ids is None:
        settings.latent_ids = latent_token_ids(tokenizer)
    settings.check_latent_tokens(f"{path}: ")
    state = _read_json(ckpt / "state.json") if (ckpt / "state.json").exists() else None
    return Loaded(model, tokenizer, settings, path, run, state, ckpt.name)


def _load_lora(run: dict, ckpt: Path, tokenizer, dtype) -> Model:
    from .tokens import add_latent_tokens

    base = Path(run["base_model"])
    if not base.is_dir():
        raise UserError(f"{ckpt.parent}: its base model {base} is missing (LoRA runs store adapters only)")
    check_base_fingerprint(run, base, ckpt.parent)
    model, _ = load_model(base, dtype=dtype)
    ids = add_latent_tokens(model, tokenizer).ids  # same ids: the tokenizer already has them
    lora = run["lora"]
    if (q := lora.get("quantization")) and not is_quantized(model):
        quantize_base(model, q["bits"], q["group_size"])
    apply_lora(model, lora, ids)
    # the adapters and new-token rows train (and are saved) in fp32 whatever `dtype` is: a resumed
    # run keeps them so (their forward casts to the base's dtype)
    adapters = load_safetensors(ckpt / "adapters.safetensors")
    adapters = {k: v.astype(mx.float32) for k, v in adapters.items()}
    model.load_weights(list(adapters.items()), strict=False)
    mx.eval(model.parameters())
    model.eval()
    return model


def load_optimizer_state(path) -> tuple:
    """(optimizer state tree, state.json dict) of a run directory's latest checkpoint."""
    ckpt = checkpoint_dir(path, "latest")
    flat = load_safetensors(ckpt / "optimizer.safetensors")
    rng = flat.pop("__mx_random_state__", None)
    state = _read_json(ckpt / "state.json")
    state["mx_random_state"] = rng
    return tree_unflatten(list(flat.items())), state


# ---------------------------------------------------------------- save


def load_safetensors(file) -> dict:
    """mx.load with a truncated / corrupt file reported as one line naming it."""
    try:
        return mx.load(str(file))
    except (RuntimeError, ValueError) as e:
        raise UserError(f"{file}: cannot read ({str(e).splitlines()[0]}); the file is truncated or "
                        f"corrupt") from None


def size_text(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def free_space(path) -> int:
    """Free bytes on the filesystem that holds `path` (or would: its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def check_free_space(target, need: int):
    free = free_space(target)
    if need > free:
        raise UserError(f"{target}: not enough disk space: needs {size_text(need)}, {size_text(free)} "
                        f"free; nothing was written (free some space or choose another location)")


@contextlib.contextmanager
def disk_space_for(target, need: int):
    """Around writing `need` bytes for `target`: one line before anything is written when the disk
    has less free, and one line when it fills up meanwhile — MLX then raises RuntimeError "[write]
    Unable to write N bytes to file.", not an OSError. The caller removes what was partly written."""
    check_free_space(target, need)
    try:
        yield
    except RuntimeError as e:
        if not str(e).startswith(MLX_WRITE_ERROR):
            raise
        raise UserError(f"{target}: the disk filled up while writing it (needs {size_text(need)}, "
                        f"{size_text(free_space(target))} free now); nothing was kept (free some space "
                        f"and retry)") from None


def base_fingerprint(model_dir) -> dict:
    """What a LoRA run's adapters depend on: the base's config (shapes) and every tensor's name,
    shape and dtype (read from the safetensors headers, no weights loaded)."""
    model_dir = Path(model_dir)
    config = _read_json(model_dir / "config.json")
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
    "lora". `state` (json-able) gets the current mx.random state added."""
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
    opt["__mx_random_state__"] = mx.random.state[0]
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
    best = (read_run(run_dir) or {}).get("best")  # kept across saves (and --resume)
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
    run = read_run(run_dir)
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


def json_safe(data):
    """NaN / inf become null: JSON has no such numbers (Python would write invalid `NaN`)."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {k: json_safe(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [json_safe(v) for v in data]
    return data


def write_json_atomic(file, data):
    file = Path(file)
    tmp = file.with_name(f".{file.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(json_safe(data), indent=2, allow_nan=False))
        os.replace(tmp, file)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half-written temp file
        raise


@contextlib.contextmanager
def atomic_dir(out: Path):
    """A temp directory beside `out` to fill; once the block succeeds it becomes `out` (an existing
    `out` is swapped out, then deleted), and on any failure it is removed: `out` is never half-written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():  # --force: swap in the new directory, then delete the old one
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def append_jsonl(file, record: dict):
    with open(file, "a") as f:
        f.write(json.dumps(json_safe(record), allow_nan=False) + "\n")


def truncate_jsonl(file, max_step: int):
    """Keep the lines up to `max_step` (a resumed run rewrites the steps after its checkpoint)."""
    file = Path(file)
    if not file.exists():
        return
    keep = []
    for line in file.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= max_step:
                keep.append(line)
        except (ValueError, AttributeError):
            break  # a torn last line (killed mid-write): drop it and what follows
    tmp = file.with_name(f".{file.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, file)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class RunLock:
    """Exclusive lock on RUN_DIR/.lock (fcntl.flock: Linux and macOS) for one training process. The
    OS releases it when the process exits, even on kill -9, so a stale lock cannot block a rerun."""

    def __init__(self, run_dir):
        self.file = Path(run_dir) / ".lock"
        self.fd = None

    def __enter__(self):
        self.fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip()
            os.close(self.fd)
            self.fd = None
            raise UserError(f"--out {self.file.parent}: another training process"
                            f"{f' (pid {holder})' if holder else ''} is using this run directory; "
                            f"wait for it or choose another --out") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # closing releases the lock
            self.fd = None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(directory, name: Optional[str] = None) -> list:
    """Delete `.<name>.tmp-PID` / `.<name>.old-PID` entries (any name if None) left behind by dead
    processes (kill -9, power loss)."""
    removed = []
    pattern = re.compile(r"\." + (re.escape(name) if name else r".+") + r"\.(tmp|old)-(\d+)")
    for p in Path(directory).glob(f".{name or ''}*"):
        m = pattern.fullmatch(p.name)
        if m and int(m.group(2)) != os.getpid() and not pid_alive(int(m.group(2))):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def settings_dict(settings: Settings) -> dict:
    return asdict(settings)
