"""Write an mlx-lm-compatible model directory; `convert()` ties the converters together."""

import json
import os
import shutil
import time
from pathlib import Path

import mlx.core as mx
from mlx_lm.utils import make_shards, save_config

from mlx_coconut.files import atomic_dir, disk_space_for, remove_stale_temps
from mlx_coconut.errors import UserError

from . import gguf, hf

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def default_dtype() -> str:
    """bf16 on Apple silicon (the GPU wants it, half the disk); fp32 elsewhere, because the Linux CPU
    backend only sends fp32 matmuls through BLAS (bf16 is ~25x slower there)."""
    return "bfloat16" if mx.metal.is_available() else "float32"


def quantize_weights(weights: dict, group_size: int, bits: int) -> dict:
    """Affine-quantize every matrix (Linear and Embedding weights; norms are 1-D and stay) the way
    nn.quantize lays them out: name.weight (packed uint32), name.scales, name.biases."""
    out = {}
    for k, w in weights.items():
        if k.endswith(".weight") and w.ndim == 2 and w.shape[-1] % group_size == 0:
            base = k[: -len(".weight")]
            out[k], out[base + ".scales"], out[base + ".biases"] = mx.quantize(w, group_size, bits)
        else:
            out[k] = w
    return out


def save_weights(path: Path, weights: dict):
    """model.safetensors, or model-0000i-of-0000N.safetensors shards of <= 5 GB + an index, like
    mlx_lm.utils.save_model (which wants an nn.Module; we only have a dict).

    Consumes `weights` (the dict is emptied): arrays are lazy (mx.load maps the source), so each shard
    is read, cast and written on its own and freed before the next — peak memory is about one shard,
    not the whole model (16 GB for Llama 3.1 8B)."""
    shards = make_shards(weights)
    fmt = "model-{:05d}-of-{:05d}.safetensors" if len(shards) > 1 else "model.safetensors"
    index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values())}, "weight_map": {}}
    weights.clear()
    for i, shard in enumerate(shards):
        name = fmt.format(i + 1, len(shards))
        mx.save_safetensors(str(path / name), shard, metadata={"format": "mlx"})
        index["weight_map"].update({k: name for k in shard})
        shards[i] = None  # free the shard's arrays before evaluating the next one
    index["weight_map"] = dict(sorted(index["weight_map"].items()))
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))


def load_source(src: str, log=print):
    """(weights, config, tokenizer-or-source-dir) from a .gguf file, a local HF dir or a hub id."""
    if str(src).endswith(".gguf"):
        path = Path(src).expanduser()
        if not path.is_file():
            raise UserError(f"{src}: no such GGUF file")
        log(f"reading GGUF {path} ({path.stat().st_size / 1e9:.2f} GB)")
        return gguf.load_gguf(path)
    path = hf.resolve(src)
    log(f"reading Hugging Face checkpoint {path}")
    weights, config = hf.load_hf(path)
    return weights, config, path


def check_writable(out: Path):
    """Before the long work: the output's parent can be created and written (read-only / full disk
    is one line now, not a traceback after dequantizing everything)."""
    probe = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
    except OSError as e:
        raise UserError(f"--mlx-path {out}: cannot write there ({e.strerror or e})") from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass


def convert(src: str, mlx_path, dtype: str = None, quantize: bool = False, q_bits: int = 4,
            q_group_size: int = 64, force: bool = False, log=print) -> Path:
    """Convert `src` (.gguf file, HF directory, or hub id) into an mlx-lm directory at `mlx_path`.

    Everything is written into a sibling temp directory which is renamed at the end, so an interrupted
    run never leaves a half-written model behind."""
    t0 = time.perf_counter()
    out = Path(mlx_path).expanduser()
    if out.exists() and not force:
        raise UserError(f"{out} already exists (pass --force to overwrite)")
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"unknown --dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    if quantize and (q_bits not in (2, 3, 4, 5, 6, 8) or q_group_size not in (32, 64, 128)):
        raise UserError(f"unsupported quantization: bits={q_bits} group size={q_group_size} "
                        f"(bits 2/3/4/5/6/8, group size 32/64/128)")

    check_writable(out)
    remove_stale_temps(out.parent, out.name)  # of a convert killed earlier (kill -9, power loss)
    weights, config, tokenizer = load_source(src, log)
    hf.check_shapes(weights, config, str(src))
    if dtype is None:
        # HF: keep what the checkpoint says (bf16 for Llama 3.1); GGUF: dequantized, pick per platform
        # (transformers >= 4.56 writes "dtype", older versions "torch_dtype")
        src_dtype = config.get("dtype") or config.get("torch_dtype")
        dtype = src_dtype if isinstance(tokenizer, Path) else None
        dtype = dtype if dtype in DTYPES else default_dtype()
    n_params = sum(v.size for v in weights.values())
    log(f"{config['num_hidden_layers']} layers, hidden {config['hidden_size']}, vocab "
        f"{config['vocab_size']}, {n_params / 1e6:.1f}M parameters -> {dtype}")
    weights = {k: v.astype(DTYPES[dtype]) for k, v in weights.items()}
    config["torch_dtype"] = dtype
    config.pop("dtype", None)
    config.pop("quantization", None)
    config.pop("quantization_config", None)
    if quantize:
        log(f"quantizing to {q_bits} bits, group size {q_group_size}")
        weights = quantize_weights(weights, q_group_size, q_bits)
        config["quantization"] = {"group_size": q_group_size, "bits": q_bits}

    need = sum(v.nbytes for v in weights.values())  # lazy arrays: known before any is computed
    if isinstance(tokenizer, Path):
        need += sum((tokenizer / n).stat().st_size for n in hf.TOKENIZER_FILES if (tokenizer / n).is_file())
    log(f"writing {out}")
    with disk_space_for(out, need), atomic_dir(out) as tmp:
        save_weights(tmp, weights)
        save_config(config, config_path=tmp / "config.json")
        if isinstance(tokenizer, Path):  # HF source: copy its tokenizer files untouched
            for name in hf.TOKENIZER_FILES:
                if (tokenizer / name).is_file():
                    shutil.copy(tokenizer / name, tmp / name)
        else:
            gguf.save_tokenizer(tokenizer, tmp)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    log(f"done in {time.perf_counter() - t0:.1f} s: {out} ({size / 1e9:.2f} GB)")
    return out
