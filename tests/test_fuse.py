"""`mlx-coconut fuse`: LoRA / QLoRA / full runs → a standalone model directory that both mlx-lm and
mlx-coconut load, with a model card; atomic, refuses to overwrite; Hub upload fails in one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from mlx_coconut import adapters, api, checkpoint as ckpt, training as train
from mlx_coconut.cli import main
from mlx_coconut.coconut import continuous_forward
from mlx_coconut.data import load_records, save_records, synth_records
from mlx_coconut.tokens import base_rows
from helpers import make_tiny_model

QUESTION_INDEX = 3


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Stage-1 runs of a tiny untied model: full weights, LoRA, QLoRA; and LoRA on a tied one."""
    root = tmp_path_factory.mktemp("fuse")
    records = synth_records(16, seed=0, min_steps=1, max_steps=2)
    save_records(records, root / "train.json")
    model = make_tiny_model(root / "model", records)
    common = dict(model=str(model), train=str(root / "train.json"), eval_samples=4, max_new_tokens=12,
                  batch_size=8, learning_rate=2e-3, save_every=0, seed=0, stage=1, c_thought=2)
    tied = make_tiny_model(root / "model-tied", records, tie=True)
    out = {"root": root, "model": model, "records": records}
    for name, kw in {"full": dict(epochs=3), "lora": dict(epochs=4, lora=True, lora_rank=4),
                     "lora-tied": dict(epochs=2, lora=True, lora_rank=4, model=str(tied)),
                     "qlora": dict(epochs=2, lora=True, lora_rank=4, q_bits=4)}.items():
        out[name] = root / name
        train.run(train.TrainConfig(out=str(out[name]), **{**common, **kw}), log=lambda *_: None)
    return out


def fuse(*args):
    return CliRunner().invoke(main, ["fuse", *map(str, args)])


def latent_logits(loaded, question):
    """Logits over the whole latent prompt (question, markers, fed-back thoughts), fp32."""
    ids = api.prompt_ids(loaded, question)
    mask = np.array([ids]) == loaded.settings.latent_ids["latent"]
    h = continuous_forward(loaded.model, np.array([ids]), mask)
    return ids, loaded.model.logits(h).astype(mx.float32)


def assert_close(a, b, rel):
    err = float(mx.abs(a - b).max())
    scale = float(mx.abs(b).max())
    assert err <= rel * scale, (err, scale)


@pytest.mark.parametrize("kind", ["full", "lora", "lora-tied"])
def test_fused_dir_matches_run_and_opens_in_mlx_lm(runs, kind, tmp_path):
    out = tmp_path / f"fused-{kind}"
    r = fuse(runs[kind], "--out", out)
    assert r.exit_code == 0, r.output
    assert f"wrote {out}" in r.output
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp dir left
    # a model directory, not a run: coconut.json carries the settings but no checkpoint
    record = json.loads((out / "coconut.json").read_text())
    assert "checkpoint" not in record and not ckpt.is_run_dir(out)
    assert not (out / "adapters.safetensors").exists()
    run, fused = ckpt.load(runs[kind]), ckpt.load(out)
    assert fused.settings == run.settings and fused.settings.stage == 1 and fused.settings.c_thought == 2
    assert fused.run is None and not any(isinstance(m, adapters.ExtraRows) for _, m in fused.model.named_modules())
    q = runs["records"][QUESTION_INDEX].question
    ids_run, logits_run = latent_logits(run, q)
    ids_fused, logits_fused = latent_logits(fused, q)
    assert ids_run == ids_fused and ids_run.count(run.settings.latent_ids["latent"]) == 2
    assert_close(logits_fused, logits_run, 1e-4)
    [a], [b] = (api.generate_answers(x, [q], max_tokens=12) for x in (run, fused))
    assert a.tokens == b.tokens
    # mlx-lm opens it as a plain LM: same logits on plain token ids as our model
    from mlx_lm import load as mlx_lm_load

    model, tokenizer = mlx_lm_load(str(out))
    plain = tokenizer.encode(q + "\n")
    assert plain == fused.tokenizer.encode(q + "\n")
    assert tokenizer.convert_tokens_to_ids("<|latent|>") == fused.settings.latent_ids["latent"]
    assert_close(model(mx.array([plain])).astype(mx.float32), fused.model(mx.array([plain])).astype(mx.float32), 1e-4)
    # the model card
    card = (out / "README.md").read_text()
    ev = [e for e in json.loads((runs[kind] / "eval.json").read_text()) if "accuracy" in e][-1]
    assert card.startswith("---\nlibrary_name: mlx") and "| stage | 1 |" in card
    assert "| c (thoughts per step) | 2 |" in card and "| continuous thoughts per question | 2 |" in card
    assert f"{ev['accuracy']:.3f} on {ev['n']} validation questions" in card
    assert f"`{Path(ckpt.read_run(runs[kind])['source']).name}`" in card and "`train.json`" in card
    assert ("LoRA rank 4" in card) == kind.startswith("lora")


def test_qlora_fuse_keeps_4bit_or_dequantizes(runs, tmp_path):
    run = ckpt.load(runs["qlora"])
    q = runs["records"][QUESTION_INDEX].question
    _, logits_run = latent_logits(run, q)
    r = fuse(runs["qlora"], "--out", tmp_path / "q4")
    assert r.exit_code == 0, r.output
    config = json.loads((tmp_path / "q4" / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": 4}
    q4 = ckpt.load(tmp_path / "q4")
    assert adapters.is_quantized(q4.model)
    # the trained latent rows, quantized like the other rows: within 4-bit error of the trained ones
    lat = run.settings.latent_ids["latent"]
    trained = run.model.model.embed_tokens.extra[1]
    stored = base_rows(q4.model.model.embed_tokens, [lat])[0]
    assert_close(stored, trained, 0.2)
    from mlx_lm import load as mlx_lm_load
    mlx_lm_load(str(tmp_path / "q4"))  # loads (strict) with the quantization config

    r = fuse(runs["qlora"], "--out", tmp_path / "fp", "--dequantize")
    assert r.exit_code == 0, r.output
    assert "quantization" not in json.loads((tmp_path / "fp" / "config.json").read_text())
    fp = ckpt.load(tmp_path / "fp")
    assert not adapters.is_quantized(fp.model)
    _, logits_fp = latent_logits(fp, q)
    assert_close(logits_fp, logits_run, 1e-4)  # dequantize(W) + LoRA delta = the run's forward
    assert "QLoRA 4-bit base, dequantized" in (tmp_path / "fp" / "README.md").read_text()


def test_refuses_existing_out_and_bad_input(runs, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    cases = [
        ([runs["full"], "--out", out], f"--out {out} already exists (pass --force to overwrite)"),
        ([runs["model"], "--out", tmp_path / "x"], "not a run directory"),
        ([runs["full"], "--out", runs["full"], "--force"], "would overwrite the run"),
        ([runs["full"], "--out", runs["root"], "--force"], "would overwrite the run"),
        ([runs["full"], "--out", tmp_path / "y", "--upload-repo", "no-slash"], "expected ORG/NAME"),
    ]
    for args, message in cases:
        r = fuse(*args)
        assert r.exit_code == 2, r.output
        lines = r.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.output
    assert (out / "keep.txt").read_text() == "mine"
    assert ckpt.is_run_dir(runs["full"]) and not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    r = fuse(runs["full"], "--out", out, "--force")
    assert r.exit_code == 0, r.output
    assert not (out / "keep.txt").exists() and (out / "coconut.json").exists()


def test_upload_offline_is_one_line_and_keeps_the_dir(runs, tmp_path):
    """No login, then a token but an unreachable Hub (a closed loopback port): one line, exit 2."""
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=f"http://127.0.0.1:{port}",
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_ETAG_TIMEOUT="2", HF_HUB_DOWNLOAD_TIMEOUT="2")
    for extra, message in [({}, "not logged in"), ({"HF_TOKEN": "hf_dummy"}, "upload failed")]:
        out = tmp_path / f"up-{len(extra)}"
        p = subprocess.run([sys.executable, "-m", "mlx_coconut.cli", "fuse", str(runs["full"]), "--out",
                            str(out), "--upload-repo", "someone/coconut-test"],
                           env={**env, **extra}, capture_output=True, text=True, timeout=300)
        assert p.returncode == 2, p.stderr
        err = p.stderr.strip().splitlines()
        assert len(err) == 1 and message in err[0] and f"the model is kept in {out}" in err[0], p.stderr
        assert "Traceback" not in p.stderr
        assert ckpt.load(out).settings.stage == 1
