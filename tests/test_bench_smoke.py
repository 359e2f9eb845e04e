"""Smoke test: every scripts/bench_*.py runs end to end on a tiny random model (not a timing test)."""

import importlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from helpers import write_model_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_dir):
    """A 2-layer, 32-wide random Llama with SmolLM2's tokenizer."""
    out = tmp_path_factory.mktemp("tiny_bench_model")
    write_model_dir(out, hidden_size=32, intermediate_size=64, head_dim=8, vocab_size=49152,
                    tie_word_embeddings=True)
    for f in smollm2_dir.iterdir():
        if f.is_file() and not f.name.startswith("model") and f.name != "config.json":
            shutil.copy(f, out / f.name)
    return out


def run(name, *argv):
    mod = importlib.import_module(name)
    return mod.main([str(a) for a in argv])


def test_bench_generate(tiny_dir, capsys):
    r = run("bench_generate", "--model", tiny_dir, "--repeats", 1, "--max-tokens", 3,
            "--bandwidth-mb", 8, "--prompt", "Hello there")
    assert r["ratio"] > 0 and r["efficiency"] > 0
    assert "RATIO ours/mlx-lm" in capsys.readouterr().out


def test_bench_eval(tiny_dir, shared_data):
    r = run("bench_eval", "--model", tiny_dir, "--n", 2, "--single-n", 1, "--batch-size", 2,
            "--max-tokens", 2, "--stage", 1, "--c-thought", 1)
    assert r["ratio"] > 0


def test_bench_latent(tiny_dir, shared_data):
    r = run("bench_latent", "--model", tiny_dir, "--repeats", 1, "--batch-size", 2)
    assert r["ratio"] > 0 and r["thought_token"] > 0


def test_bench_train(tiny_dir, shared_data):
    r = run("bench_train", "--model", tiny_dir, "--repeats", 1, "--batch-size", 2, "--steps", 1)
    assert r["ratio"] > 0


def test_bench_memory(capsys):
    shape = json.dumps(dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, vocab_size=259))
    r = run("bench_memory", "--layers", 1, "--batch", 1, "--seq", 8, "--base", "bf16,qlora",
            "--shape", shape)
    assert r["bf16"] > 0 and r["qlora"] > 0
    assert "RESULT QLoRA" in capsys.readouterr().out


def test_bench_exp(tiny_dir, shared_data):
    """Both sides compute the same step: the CPU exp moves the loss and gradients by rounding only."""
    r = run("bench_exp", "--model", tiny_dir, "--repeats", 1, "--batch-size", 2)
    assert set(r) == {"stage 0", "stage 1 (c=1)"}
    assert all(v["loss_rel"] < 1e-5 and v["gradient_diff"] < 1e-3 and v["ratio"] > 0 for v in r.values())


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc settings: Linux only")
def test_bench_malloc(tiny_dir, shared_data):
    """Each side in a child of its own, with its setting; both compute the same steps."""
    r = run("bench_malloc", "--model", tiny_dir, "--repeats", 1, "--steps", 1, "--batch-size", 2)
    assert {"stage 0", "stage 1 (c=1)"} <= set(r)
    assert all(r[k]["loss_rel"] < 1e-6 and r[k]["ratio"] > 0 for k in ("stage 0", "stage 1 (c=1)"))


def test_bench_torch_ours_side(tiny_dir, shared_data, capsys):
    """The MLX half alone (no torch needed): the steps `perf record` profiles."""
    run("bench_torch", "--model", tiny_dir, "--batch-size", 2, "--ours-only", 1)
    assert "perf window --time" in capsys.readouterr().out


@pytest.mark.parametrize("fill", [[], ["--official-fill"], ["--optimizer"]],
                         ids=["column", "per-position", "with-adamw"])
def test_bench_torch(tiny_dir, shared_data, fill):
    """Both sides, with a Python that has torch + transformers (MLX_COCONUT_TORCH_PYTHON, else this
    one); skipped when there is none (torch is not a dependency; CI has none)."""
    import bench_torch
    python = os.environ.get("MLX_COCONUT_TORCH_PYTHON", sys.executable)
    if not bench_torch.has_torch(python):
        pytest.skip(f"{python} cannot import torch and transformers")
    r = run("bench_torch", "--model", tiny_dir, "--repeats", 1, "--batch-size", 2,
            "--torch-python", python, "--profile", *fill)
    for stage in bench_torch.STAGES:  # same loss and gradients on both sides, fp32
        assert r[stage]["ratio"] > 0
        assert r[stage]["loss_rel"] < bench_torch.LOSS_RTOL and r[stage]["grad_rel"] < 1e-3


def test_bench_blas(tiny_dir, shared_data):
    from mlx_coconut import blas
    shape = "x@W.T  1280x576x576"
    fast = next(iter(blas.candidates()), None)  # a name: the worker loads it as the product does
    libs = ["--lib", "reference="] + (["--lib", f"fast={fast}"] if fast else [])
    r = run("bench_blas", "--model", tiny_dir, "--repeats", 1, "--batch-size", 2, "--shapes", shape,
            "--reference-shapes", shape, *libs)
    assert r["reference"][shape] > 0
    if fast:
        assert r["fast"][shape] > r["reference"][shape] and r["fast"]["step"] > 0


def test_bench_epochs(tiny_dir, shared_data, capsys):
    r = run("bench_epochs", "--model", tiny_dir, "--repeats", 1, "--records", 4, "--batch-size", 2,
            "--data", shared_data / "gsm8k" / "icot_valid.txt", "--count-layouts")
    assert set(r["ratios"]) == {1, 2} and all(v > 0 for v in r["ratios"].values())
    out = capsys.readouterr().out
    assert "RATIO stage 1/stage 0 per supervised token" in out and "stage 2: " in out


def test_bench_first_step(tiny_dir, shared_data, capsys):
    r = run("bench_first_step", "--model", tiny_dir, "--repeats", 1, "--batch-size", 2, "--lora-rank", 4)
    assert r["ours_s"] > 0 and r["mlx_lm_s"] > 0 and r["ratio"] > 0
    out = capsys.readouterr().out
    assert "RATIO ours/mlx-lm time to first step" in out and "own trace+compile+step" in out


def test_check_8b_tiny(tmp_path, llama3_tokenizer_path):
    """scripts/check_8b.py's first steps on its tiny config: a sharded HF checkpoint (the real
    vocabulary, llama3 rope scaling) + index + the real tokenizer, converted with -q."""
    results = run("check_8b", "--work", tmp_path, "--tiny", "--steps", "build,convert", "--shard-gb", 0.01)
    assert [r["status"] for r in results] == ["ok", "ok"] and all(r["peak_rss_gb"] > 0 for r in results)
    hf = tmp_path / "hf"
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    shards = sorted(hf.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == {f.name for f in shards}
    config = json.loads((hf / "config.json").read_text())
    assert config["vocab_size"] == 128256 and config["rope_scaling"]["rope_type"] == "llama3"
    tok = json.loads((hf / "tokenizer.json").read_text())
    assert max(t["id"] for t in tok["added_tokens"]) == 128255  # exactly Llama 3.1's 128,256 ids
    assert json.loads((tmp_path / "q4" / "config.json").read_text())["quantization"]["bits"] == 4
