"""Model directories: `convert` (HF / GGUF → MLX), `latent-tokens` (the three tokens, checked), `fuse`
(a run → a standalone model) and `info` (versions, device, BLAS)."""

import sys

import click

from ..errors import UserError
from .common import friendly_errors


@click.command()
@click.option("--hf-path", required=True, metavar="SRC",
              help="Hub id (meta-llama/Llama-3.1-8B-Instruct), local HF directory, or a .gguf file.")
@click.option("--mlx-path", required=True, metavar="DIR", help="Output directory, e.g. weights/NAME.")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default=None,
              help="Weight dtype [default: the checkpoint's; GGUF: bfloat16 on Mac, float32 on Linux].")
@click.option("-q", "--quantize", is_flag=True, help="Quantize matrices (affine, like mlx_lm.convert -q).")
@click.option("--q-bits", type=click.Choice(["4", "8"]), default="4", show_default=True)
@click.option("--q-group-size", type=click.Choice(["32", "64", "128"]), default="64", show_default=True)
@click.option("--force", is_flag=True, help="Overwrite an existing --mlx-path.")
@friendly_errors
def convert(hf_path, mlx_path, dtype, quantize, q_bits, q_group_size, force):
    """Convert HF safetensors or a llama.cpp GGUF (Q4_0/Q4_1/Q8_0/F16/F32) to an MLX directory."""
    from mlx_coconut.convert import convert as run

    run(hf_path, mlx_path, dtype=dtype, quantize=quantize, q_bits=int(q_bits),
        q_group_size=int(q_group_size), force=force, log=click.echo)


@click.command(name="latent-tokens")
@click.option("--model", "model_path", required=True, metavar="DIR", help="A converted model directory.")
@click.option("--prompt", default="The capital of France is", show_default=True)
@click.option("--max-tokens", default=12, show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Cast the weights (default: as stored; use float32 on a Linux CPU, where a bf16 "
                   "4-bit model computes ~10x slower).")
@friendly_errors
def latent_tokens(model_path, prompt, max_tokens, dtype):
    """Add <|start-latent|> <|latent|> <|end-latent|> in memory; show ids and a greedy check."""
    import mlx.core as mx

    from ..checkpoint import load_tokenizer
    from ..model import load_model
    from ..tokens import add_latent_tokens, vocab_rows

    if not prompt.strip():
        raise UserError("--prompt is empty")
    if max_tokens < 1:
        raise UserError(f"--max-tokens must be >= 1 (got {max_tokens})")
    model, _ = load_model(model_path, dtype=getattr(mx, dtype) if dtype else None)
    tokenizer = load_tokenizer(model_path)

    def greedy():
        ids = tokenizer.encode(prompt)
        n = len(ids)
        for _ in range(max_tokens):  # full recompute: a dozen tokens, no cache needed
            ids.append(model(mx.array([ids]))[0, -1].argmax().item())
        return tokenizer.decode(ids[n:])

    before = (len(tokenizer._tokenizer), vocab_rows(model))
    text_before = greedy()
    ids = add_latent_tokens(model, tokenizer)
    after = (len(tokenizer._tokenizer), vocab_rows(model))
    text_after = greedy()
    click.echo(f"tokenizer vocab {before[0]} -> {after[0]}, embedding rows {before[1]} -> {after[1]}")
    click.echo(f"ids: <|start-latent|>={ids.start} <|latent|>={ids.latent} <|end-latent|>={ids.end} "
               f"(rows initialised from '<<')")
    click.echo(f"greedy before: {prompt}{text_before!r}")
    click.echo(f"greedy after:  {prompt}{text_after!r} ({'unchanged' if text_after == text_before else 'CHANGED'})")


@click.command()
@click.argument("run_dir", metavar="RUN")
@click.option("--out", required=True, metavar="DIR", help="Output model directory.")
@click.option("--dequantize", is_flag=True, help="Write full-precision weights (QLoRA / quantized bases).")
@click.option("--upload-repo", default=None, metavar="ORG/NAME", help="Also upload to the Hugging Face Hub.")
@click.option("--force", is_flag=True, help="Overwrite an existing --out.")
@friendly_errors
def fuse(run_dir, out, dequantize, upload_repo, force):
    """A standalone model directory from a run: LoRA merged, latent tokens, settings, model card."""
    from .. import fuse as fuse_lib

    if upload_repo:
        fuse_lib.check_repo_id(upload_repo)
    path = fuse_lib.fuse(run_dir, out, dequantize=dequantize, force=force, log=click.echo)
    if upload_repo:
        fuse_lib.upload(path, upload_repo, log=click.echo)


@click.command()
def info():
    """Versions, the device MLX computes on, which BLAS it uses with its speed, and the malloc setting (Linux)."""
    import platform
    from importlib.metadata import version

    import mlx.core as mx

    from .. import blas, malloc

    click.echo(f"mlx-coconut {version('mlx-coconut')}, mlx {version('mlx')}, mlx-lm {version('mlx-lm')}, "
               f"python {platform.python_version()}, {platform.system()} {platform.machine()}")
    click.echo(f"device: {mx.default_device()}")
    if sys.platform == "linux":
        click.echo(f"BLAS: {blas.describe()}")
        click.echo(f"fp32 1024x1024x1024 matmul: {blas.matmul_gflops():.1f} GFLOP/s")
        click.echo(f"malloc: {malloc.describe()}")
