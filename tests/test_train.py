"""Training (issue 5): stage 0 / stage k, LoRA / QLoRA, resume, atomic saves, bad input.

A tiny random Llama with a small BPE tokenizer trained on the data memorises 16 synthetic records in
seconds on a CPU; one end-to-end test runs the real
SmolLM2-135M (marked slow)."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten, tree_map

from mlx_coconut import adapters, checkpoint as ckpt
from mlx_coconut import training as train
from mlx_coconut.cli import main
from mlx_coconut.coconut import collated_loss
from mlx_coconut.data import load_records, make_batch
from mlx_coconut.training import memory, step
from mlx_coconut.errors import UserError
from mlx_coconut.evaluate import evaluate
from helpers import cfg, quiet
from tolerance import RTOL, rel_diff, tree_rel_diff

def accuracy(run_dir, records) -> tuple:
    loaded = ckpt.load(run_dir)
    res = evaluate(loaded.model, loaded.tokenizer, loaded.settings, records, batch_size=16,
                   max_tokens=40)
    return res, loaded


@pytest.fixture(scope="module")
def stage0(tiny):
    out = tiny["root"] / "stage0"
    result = train.run(cfg(tiny, out, epochs=30), log=quiet)
    return out, result


# ---------------------------------------------------------------- 1. stage 0 learns


def test_stage0_loss_falls_and_memorises(stage0, tiny):
    out, result = stage0
    losses = result["losses"]
    assert losses[0] > 3.0
    assert np.mean(losses[-4:]) <= 0.5 * losses[0]
    res, loaded = accuracy(out, load_records(tiny["data"]))
    assert loaded.settings.mode == "cot" and loaded.settings.stage == 0
    assert all(e["n_latents"] == 0 for e in res.examples)
    assert res.accuracy >= 0.9, [(e["answer"], e["prediction"]) for e in res.examples]
    # the run directory: metrics, resolved config, checkpoint state
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == result["steps"] and {"loss", "tokens_per_sec", "peak_memory_gb", "lr"} <= set(lines[0])
    run = ckpt.read_run(out)
    assert run["weights"] == "full" and run["settings"]["latent_ids"]["latent"] == loaded.settings.latent_ids["latent"]
    assert loaded.state["complete"] and loaded.state["step"] == result["steps"]


# ---------------------------------------------------------------- 2. stage 1 from stage 0


def test_stage1_from_stage0_resets_optimizer_and_uses_latents(stage0, tiny):
    prev, _ = stage0
    out = tiny["root"] / "stage1"
    result = train.run(train.TrainConfig(init=str(prev), out=str(out), stage=1, c_thought=1,
                                         epochs=15), log=quiet)
    run = ckpt.read_run(out)
    assert run["config"]["train"] == str(tiny["data"])          # data inherited from --init
    assert run["config"]["learning_rate"] == 2e-3
    opt, state = ckpt.load_optimizer_state(out)
    # official reset_optimizer: a fresh AdamW every epoch (2 steps each); a carried-over one would
    # count stage 0's steps too
    assert result["steps"] == state["step"] == 30 and int(opt["step"].item()) == 2
    res, loaded = accuracy(out, load_records(tiny["data"]))
    assert loaded.settings.mode == "coconut" and loaded.settings.stage == 1
    assert all(e["n_latents"] == 1 for e in res.examples)       # prompts carry one thought
    again = evaluate(loaded, load_records(tiny["data"])[:4], batch_size=2, max_tokens=40)
    assert [e["prediction"] for e in again.examples] == [e["prediction"] for e in res.examples[:4]]
    assert res.accuracy >= 0.8, [(e["answer"], e["prediction"]) for e in res.examples]


# ---------------------------------------------------------------- 3. LoRA / QLoRA


def test_lora_freezes_base_and_trains_adapters_and_new_rows(tiny):
    out = tiny["root"] / "lora"
    result = train.run(cfg(tiny, out, stage=1, epochs=2, lora=True, lora_rank=4,
                           learning_rate=1e-3), log=quiet)
    assert result["steps"] == 4
    loaded = ckpt.load(out)
    run = ckpt.read_run(out)
    assert run["weights"] == "lora" and Path(run["base_model"]) == tiny["model"].resolve()
    ckpt_dir = ckpt.checkpoint_dir(out)
    assert not (ckpt_dir / "model.safetensors").exists()
    base = mx.load(str(tiny["model"] / "model.safetensors"))
    params = dict(tree_flatten(loaded.model.parameters()))
    # frozen base: bitwise identical
    q = "model.layers.0.self_attn.q_proj"
    assert mx.array_equal(params[f"{q}.linear.weight"], base[f"{q}.weight"]).item()
    V = base["model.embed_tokens.weight"].shape[0]
    assert mx.array_equal(params["model.embed_tokens.base.weight"][:V], base["model.embed_tokens.weight"]).item()
    assert mx.array_equal(params["lm_head.base.weight"][:V], base["lm_head.weight"]).item()
    # adapters moved (lora_b starts at zero) and the new-token rows moved away from `<<`'s row
    assert mx.abs(params[f"{q}.lora_b"]).max().item() > 0
    lt = loaded.tokenizer.get_vocab()["<<"]
    ids = loaded.settings.latent_ids
    emb, head = params["model.embed_tokens.extra"], params["lm_head.extra"]
    assert not mx.allclose(emb[0], base["model.embed_tokens.weight"][lt]).item()   # start marker
    assert not mx.allclose(head[1], base["lm_head.weight"][lt]).item()             # latent logit row
    # only adapters + 3 rows are saved
    saved = mx.load(str(ckpt_dir / "adapters.safetensors"))
    assert all("lora_" in k or k.endswith(".extra") for k in saved)
    assert saved["model.embed_tokens.extra"].shape[0] == 3 and ids["latent"] >= V


def test_lora_stage1_from_lora_run_and_lora_on_full_run(tiny, stage0):
    lora0 = tiny["root"] / "lora"  # written by the test above
    if not ckpt.is_run_dir(lora0):
        train.run(cfg(tiny, lora0, stage=1, epochs=1, lora=True, lora_rank=4), log=quiet)
    out = tiny["root"] / "lora-stage2"
    train.run(train.TrainConfig(init=str(lora0), out=str(out), stage=2, epochs=1, lora=True), log=quiet)
    run = ckpt.read_run(out)
    assert run["weights"] == "lora" and run["base_model"] == ckpt.read_run(lora0)["base_model"]
    assert ckpt.load(out).settings.stage == 2
    # LoRA on top of a full-weight run: the base is that run's checkpoint directory
    out = tiny["root"] / "lora-on-full"
    train.run(train.TrainConfig(init=str(stage0[0]), out=str(out), stage=1, epochs=1, lora=True),
              log=quiet)
    assert Path(ckpt.read_run(out)["base_model"]).parent == stage0[0].resolve()
    assert ckpt.load(out).settings.stage == 1


def test_curriculum_runs_consecutive_stages_with_fresh_optimizers(tiny):
    out = tiny["root"] / "curriculum"
    result = train.run(cfg(tiny, out, stages="0-2", epochs_per_stage=1), log=quiet)
    assert sorted(result["stages"]) == [0, 1, 2]
    for s in (0, 1, 2):
        run = ckpt.read_run(out / f"stage{s}")
        assert run["settings"]["stage"] == s
        assert run["settings"]["mode"] == ("cot" if s == 0 else "coconut")
        opt, state = ckpt.load_optimizer_state(out / f"stage{s}")
        assert int(opt["step"].item()) == state["step"] == 2   # reset at each stage
    assert ckpt.read_run(out / "stage2")["init"] == str((out / "stage1").resolve())


def test_qlora_on_4bit_base_trains(tiny):
    out = tiny["root"] / "qlora"
    result = train.run(cfg(tiny, out, epochs=10, lora=True, q_bits=4, lora_rank=8,
                           learning_rate=1e-2), log=quiet)
    losses = result["losses"]
    # a random frozen output head bounds how far LoRA alone can go; a clear fall is what matters
    assert np.mean(losses[-2:]) < 0.9 * losses[0], losses
    loaded = ckpt.load(out)
    assert adapters.is_quantized(loaded.model)
    assert ckpt.read_run(out)["lora"]["quantization"] == {"bits": 4, "group_size": 64}


def test_lora_on_a_quantized_converted_model_uses_it_as_is(tiny):
    import mlx.nn as nn
    from mlx_coconut.model import load_model

    qdir = tiny["root"] / "model-q4"
    qdir.mkdir()
    model, config = load_model(tiny["model"])
    nn.quantize(model, group_size=64, bits=4)
    mx.save_safetensors(str(qdir / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (qdir / "config.json").write_text(json.dumps({**config, "quantization": {"group_size": 64, "bits": 4}}))
    for f in tiny["model"].glob("tokenizer*"):
        (qdir / f.name).write_bytes(f.read_bytes())
    out = tiny["root"] / "lora-q4"
    result = train.run(cfg(tiny, out, model=str(qdir), epochs=1, lora=True), log=quiet)
    assert all(math.isfinite(l) for l in result["losses"])
    run = ckpt.read_run(out)
    assert run["lora"]["quantization"] is None and Path(run["base_model"]) == qdir.resolve()
    assert adapters.is_quantized(ckpt.load(out).model)
    # full fine-tuning of quantized weights is refused in one line
    r = _cli(["--model", str(qdir), "--train", str(tiny["data"]), "--out", str(tiny["root"] / "q-full")])
    assert r.exit_code == 2 and "add --lora" in r.stderr


def test_grad_accumulation_steps(tiny):
    out = tiny["root"] / "accum"
    result = train.run(cfg(tiny, out, epochs=1, batch_size=4, grad_accumulation_steps=2), log=quiet)
    assert result["steps"] == 2                      # 4 micro-batches -> 2 optimizer steps
    big = tiny["root"] / "accum-ref"
    ref = train.run(cfg(tiny, big, epochs=1, batch_size=8), log=quiet)
    tokens = [[json.loads(l)["tokens"] for l in (d / "metrics.jsonl").read_text().splitlines()]
              for d in (out, big)]
    assert tokens[0] == tokens[1]                    # same examples per optimizer step
    np.testing.assert_allclose(result["losses"], ref["losses"], rtol=0.05)


# ---------------------------------------------------------------- 4. resume


def test_resume_reproduces_uninterrupted_losses(tiny):
    common = dict(epochs=2, batch_size=4, learning_rate=2e-3, uniform_prob=0.0)
    full = train.run(cfg(tiny, tiny["root"] / "full", **common), log=quiet)
    part = train.run(cfg(tiny, tiny["root"] / "part", stop_after_steps=3, **common), log=quiet)
    assert part["interrupted"] and part["steps"] == 3
    state = ckpt.read_run(tiny["root"] / "part")
    assert state["checkpoint"] == "ckpt-0000003"
    rest = train.run(train.TrainConfig(out=str(tiny["root"] / "part"), resume=True), log=quiet)
    assert rest["steps"] == full["steps"] == 8
    np.testing.assert_allclose(part["losses"] + rest["losses"], full["losses"], rtol=1e-6)


def test_resume_lora_run(tiny):
    common = dict(epochs=1, batch_size=4, stage=1, lora=True, lora_rank=4, learning_rate=1e-3)
    full = train.run(cfg(tiny, tiny["root"] / "lfull", **common), log=quiet)
    part = train.run(cfg(tiny, tiny["root"] / "lpart", stop_after_steps=2, **common), log=quiet)
    rest = train.run(train.TrainConfig(out=str(tiny["root"] / "lpart"), resume=True), log=quiet)
    np.testing.assert_allclose(part["losses"] + rest["losses"], full["losses"], rtol=1e-5)


def test_no_rng_state_is_saved_and_a_resumed_dropout_run_draws_the_same(tiny):
    """No RNG state is saved: each step seeds its draws (LoRA dropout) from (seed, epoch, batch), so
    a resumed run draws what the uninterrupted one drew without one."""
    common = dict(epochs=1, batch_size=4, lora=True, lora_rank=4, lora_dropout=0.3, learning_rate=1e-3)
    full = train.run(cfg(tiny, tiny["root"] / "dfull", **common), log=quiet)
    part = train.run(cfg(tiny, tiny["root"] / "dpart", stop_after_steps=1, **common), log=quiet)
    latest = ckpt.checkpoint_dir(tiny["root"] / "dpart", "latest")
    assert not any("random" in k for k in mx.load(str(latest / "optimizer.safetensors")))
    _, state = ckpt.load_optimizer_state(tiny["root"] / "dpart")
    assert not any("random" in k for k in state)
    rest = train.run(train.TrainConfig(out=str(tiny["root"] / "dpart"), resume=True), log=quiet)
    np.testing.assert_allclose(part["losses"] + rest["losses"], full["losses"], rtol=1e-5)


# ---------------------------------------------------------------- 5. crash while saving


def test_crash_while_saving_keeps_previous_checkpoint(tiny, monkeypatch):
    out = tiny["root"] / "crash"
    calls = {"n": 0}
    real = ckpt._write_optimizer

    def flaky(file, flat):
        calls["n"] += 1
        if calls["n"] == 2:  # second checkpoint dies half-way (weights written, optimizer not)
            Path(file).write_bytes(b"partial")
            raise OSError(28, "No space left on device")
        return real(file, flat)

    monkeypatch.setattr(ckpt, "_write_optimizer", flaky)
    with pytest.raises(OSError):
        train.run(cfg(tiny, out, epochs=1, batch_size=4, save_every=2), log=quiet)
    run = ckpt.read_run(out)
    assert run["checkpoint"] == "ckpt-0000002"
    loaded = ckpt.load(out)                      # previous checkpoint still loads
    assert loaded.state["step"] == 2
    assert not list(out.glob(".ckpt-*"))         # the half-written temp dir is gone
    monkeypatch.setattr(ckpt, "_write_optimizer", real)
    rest = train.run(train.TrainConfig(out=str(out), resume=True), log=quiet)
    assert rest["steps"] == 4


def _start_cli(tiny, out, *extra):
    import os
    import subprocess
    import sys
    cmd = [sys.executable, "-m", "mlx_coconut.cli", "train", "--model", str(tiny["model"]),
           "--train", str(tiny["data"]), "--out", str(out), "--epochs", "1000", "--eval-samples", "0",
           "--batch-size", "4", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})


def _wait_for_steps(proc, out, n, timeout=120):
    import time
    start = time.time()
    while time.time() - start < timeout:
        m = out / "metrics.jsonl"
        if m.exists() and len(m.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(proc.communicate())
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("training did not start")


def test_sigkill_during_frequent_saves_leaves_a_loadable_run(tiny):
    import signal
    out = tiny["root"] / "killed"
    proc = _start_cli(tiny, out, "--save-every", "1")
    _wait_for_steps(proc, out, 6)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    loaded = ckpt.load(out)                          # whatever moment the kill hit
    assert loaded.state["step"] >= 1
    rest = train.run(train.TrainConfig(out=str(out), resume=True, epochs=loaded.state["epoch"] + 1),
                     log=quiet)
    assert rest["steps"] > loaded.state["step"]


def test_ctrl_c_saves_and_exits(tiny):
    import signal
    out = tiny["root"] / "ctrl-c"
    proc = _start_cli(tiny, out)
    _wait_for_steps(proc, out, 3)
    proc.send_signal(signal.SIGINT)
    stdout, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted: saved" in stdout and "--resume" in stdout
    state = ckpt.load(out).state
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert state["step"] == len(lines) and not state["complete"]


# ---------------------------------------------------------------- 6. bad input → one line, exit 2


def _cli(args):
    result = CliRunner().invoke(main, ["train", *args])
    return result


@pytest.mark.parametrize("case", ["init-missing", "init-not-run", "c-zero", "bad-data", "bad-out",
                                  "bad-yaml"])
def test_bad_input_one_line_exit_2(tiny, tmp_path, case):
    m = str(tiny["model"])
    if case == "init-missing":
        args = ["--init", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]
        expect = "no such directory"
    elif case == "init-not-run":
        args = ["--init", m, "--stage", "1", "--out", str(tmp_path / "o")]
        expect = "not a run directory"
    elif case == "c-zero":
        args = ["--model", m, "--stage", "1", "--c-thought", "0", "--out", str(tmp_path / "o")]
        expect = "--c-thought 0"
    elif case == "bad-data":
        bad = tmp_path / "bad.json"
        bad.write_text('[\n{"question": "q", "steps": [], "answer": "1"},\n{"question": oops}\n]\n')
        args = ["--model", m, "--train", str(bad), "--out", str(tmp_path / "o")]
        expect = "bad.json:3"
    elif case == "bad-out":
        blocker = tmp_path / "file"
        blocker.write_text("x")
        args = ["--model", m, "--train", str(tiny["data"]), "--out", str(blocker / "run")]
        expect = "not writable"
    else:
        y = tmp_path / "c.yaml"
        y.write_text("epochs: 1\nlearnign_rate: 0.1\n")
        args = ["-c", str(y), "--model", m, "--out", str(tmp_path / "o")]
        expect = "learnign_rate"
    r = _cli(args)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and expect in lines[0], r.stderr
    assert "Traceback" not in r.output


def test_cli_yaml_config_runs(tiny, tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text(f"model: {tiny['model']}\ntrain: {tiny['data']}\nepochs: 1\nbatch-size: 8\n"
                 f"eval_samples: 2\nmax_new_tokens: 4\nlearning_rate: 1.0e-3\n")
    r = _cli(["-c", str(y), "--out", str(tmp_path / "run"), "--samples", "8"])
    assert r.exit_code == 0, r.output
    run = ckpt.read_run(tmp_path / "run")
    assert run["config"]["epochs"] == 1 and run["config"]["samples"] == 8
    assert run["config"]["learning_rate"] == 1e-3
    evals = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert evals[0]["n"] == 2 and "valid_loss" in evals[0] and len(evals[0]["samples"]) == 2
    # an existing run is not silently overwritten
    r = _cli(["-c", str(y), "--out", str(tmp_path / "run")])
    assert r.exit_code == 2 and "--resume" in r.stderr


@pytest.mark.parametrize("val_batches, expect", [(-1, [2, 2]), (1, [2]), (0, None)])
def test_val_batches_limits_the_validation_loss(tiny, tmp_path, monkeypatch, val_batches, expect):
    """--val-batches N: the loss on the first N validation batches (-1: all, 0: none); the accuracy
    is still on every --eval-samples question."""
    from mlx_coconut.training import evaluation
    seen, real = [], evaluation.validation_loss

    def spy(model, batches, *args, **kw):
        seen.append([len(b) for b in batches])
        return real(model, batches, *args, **kw)
    monkeypatch.setattr(evaluation, "validation_loss", spy)
    out = tmp_path / "run"
    train.run(cfg(tiny, out, epochs=1, samples=8, batch_size=2, eval_samples=4, max_new_tokens=2,
                  val_batches=val_batches), log=quiet)
    entry = json.loads((out / "eval.json").read_text())[0]
    assert entry["n"] == 4
    if expect is None:
        assert seen == [] and "valid_loss" not in entry
    else:
        assert seen == [expect] and math.isfinite(entry["valid_loss"])


# ---------------------------------------------------------------- the step itself


def test_compiled_step_equals_eager_for_every_latent_layout(tiny):
    """One compiled Stepper sees stage 0, 1 and 2 batches of the SAME shape: a trace keyed by shape
    alone would reuse the wrong latent columns and give a different loss."""
    loaded = ckpt.load(tiny["model"])
    from mlx_coconut.data import FormatConfig, SpecialIds, format_record
    from mlx_coconut.tokens import add_latent_tokens

    ids = add_latent_tokens(loaded.model, loaded.tokenizer)
    special = SpecialIds(ids.start, ids.latent, ids.end, 0)
    recs = load_records(tiny["data"])[:4]
    compiled_stepper = train.Stepper(loaded.model, True, use_compile=True)
    eager_stepper = train.Stepper(loaded.model, True, use_compile=False)
    seen = set()
    for fc in (FormatConfig("cot"), FormatConfig("coconut", stage=1), FormatConfig("coconut", stage=2),
               FormatConfig("coconut", stage=1, c_thought=2)):
        ex = [format_record(r, loaded.tokenizer, fc, special) for r in recs]
        batch = make_batch(ex, 0, special.latent, 128)
        assert batch["input_ids"].shape[1] == 128
        cols = np.flatnonzero(batch["latent_mask"].any(0))
        assert len(cols) == 0 or cols[0] % 8 == 0                 # first latent column bucketed
        seen.add(tuple(cols))
        eager = eager_stepper(batch)
        compiled = compiled_stepper(batch)
        train.enable_grad_checkpoint(loaded.model)  # whole blocks recomputed, KV cache threaded
        try:
            recomputed = train.Stepper(loaded.model, True, use_compile=False)(batch)
            recomputed_compiled = train.Stepper(loaded.model, True, use_compile=True)(batch)
        finally:
            train.disable_grad_checkpoint(loaded.model)
        ge = dict(tree_flatten(eager[2]))
        for other in (compiled, recomputed, recomputed_compiled):
            assert rel_diff(eager[0], other[0]) < RTOL
            assert tree_rel_diff(ge, dict(tree_flatten(other[2]))) < RTOL
        # extra left/right padding (bucketing) does not change the loss
        plain = make_batch(ex, 0, special.latent, 1, latent_align=1)
        assert plain["input_ids"].shape[1] < 128
        unpadded = collated_loss(loaded.model, plain, True)
        assert rel_diff(unpadded[0], eager[0]) < RTOL
    assert len(seen) == 3 and len(compiled_stepper.traces) == 3   # stage 2 and c=2 share a layout


def test_grad_checkpoint_hooks_one_model_only(tiny):
    """Gradient checkpointing is a hook on one model instance: another model in the process (the
    class they share) is untouched."""
    a, b = ckpt.load(tiny["model"]).model, ckpt.load(tiny["model"]).model
    train.enable_grad_checkpoint(a)
    try:
        assert a.model.run_block is not None and b.model.run_block is None
        assert type(a.model).run_block is None
    finally:
        train.disable_grad_checkpoint(a)
    assert a.model.run_block is None


def test_nan_loss_stops_with_clear_message(tiny, monkeypatch):
    real = step.loss_fn

    def nan_loss(*a, **k):
        loss, n = real(*a, **k)
        return loss * mx.array(float("nan")), n

    monkeypatch.setattr(step, "loss_fn", nan_loss)
    with pytest.raises(UserError, match="diverged"):
        train.run(cfg(tiny, tiny["root"] / "nan", epochs=1, compile=False), log=quiet)
    assert not ckpt.is_run_dir(tiny["root"] / "nan")


def test_memory_estimate_for_llama_8b(tmp_path, monkeypatch):
    config = {"hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 14336,
              "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
              "tie_word_embeddings": False}
    assert abs(train.count_params(config) / 1e9 - 8.03) < 0.01
    full = train.TrainConfig(dtype="bfloat16", lora=False)
    params, need = train.memory_estimate(config, full)
    assert 125e9 < need < 131e9                   # 2 + 2 + 4 (fp32 master) + 8 bytes per parameter
    assert train.memory_estimate(config, train.TrainConfig(dtype="float32", lora=False))[1] == need
    lora = train.TrainConfig(dtype="bfloat16", lora=True)
    qlora = train.TrainConfig(dtype="bfloat16", lora=True, q_bits=4)
    # the bf16 base + fp32 adapters (rank 8: 21M parameters x 16 bytes)
    assert 16.0e9 + 0.3e9 < train.memory_estimate(config, lora)[1] < 16.1e9 + 0.4e9
    assert 4.5e9 < train.memory_estimate(config, qlora)[1] < 5e9   # 4 bits + a bf16 scale and bias per 64
    (tmp_path / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(memory, "available_memory", lambda: 64 * 2**30)
    msgs = []
    train.warn_memory(tmp_path, full, msgs.append)
    assert len(msgs) == 1 and "8.03B" in msgs[0] and "--lora" in msgs[0] and "-q 4" in msgs[0]
    for ok in (lora, qlora):                      # 16 GB / 4 GB fit in 64 GB: no warning
        msgs.clear()
        train.warn_memory(tmp_path, ok, msgs.append)
        assert msgs == []


# ---------------------------------------------------------------- real model end to end


@pytest.mark.slow
def test_smollm2_lora_end_to_end(smollm2_dir, tmp_path):
    out = tmp_path / "run"
    result = train.run(train.TrainConfig(model=str(smollm2_dir), out=str(out), synth_samples=4,
                                         epochs=1, batch_size=2, lora=True, lora_layers=2,
                                         eval_samples=2, max_new_tokens=8, learning_rate=1e-4),
                       log=quiet)
    assert result["steps"] == 2 and all(math.isfinite(l) for l in result["losses"])
    loaded = ckpt.load(out)
    assert loaded.settings.latent_ids is not None
    assert json.loads((out / "eval.json").read_text())[0]["n"] == 2


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_compiled_optimizer_update_equals_eager(tiny, scale):
    """trainer.make_update compiled (model + optimizer state as mlx-lm compiles its step) moves the
    weights and the moments exactly as the eager update, over several steps of a fresh optimizer."""
    from mlx_coconut.trainer import make_update

    def run(use_compile):
        loaded = ckpt.load(tiny["model"])
        model = loaded.model
        model.train()
        rc, _ = train.resolve(cfg(tiny, tiny["root"] / "unused-update"))
        optimizer = train.make_optimizer(model, rc)
        update = make_update(model, optimizer, use_compile)
        rng = np.random.default_rng(0)
        for _ in range(3):
            grads = tree_map(lambda p: mx.array(rng.standard_normal(p.shape).astype(np.float32)),
                                   model.trainable_parameters())
            update(grads, scale)
            mx.eval(model.parameters(), optimizer.state)
        return dict(tree_flatten(model.trainable_parameters())), dict(tree_flatten(optimizer.state))

    (p_eager, s_eager), (p_comp, s_comp) = run(False), run(True)
    assert tree_rel_diff(p_eager, p_comp) < RTOL
    assert tree_rel_diff(s_eager, s_comp) < RTOL
    before = dict(tree_flatten(ckpt.load(tiny["model"]).model.trainable_parameters()))
    assert tree_rel_diff(before, p_comp) > 100 * RTOL   # the weights did move


# ---------------------------------------------------------------- time to first step, traces


def test_first_step_line_and_traces_per_epoch(tiny):
    """One "first step done" line with phases that add up to its total, recorded in metrics.jsonl;
    each epoch's last metrics line counts the compiled traces the epoch used, which equal the
    distinct (shape, latent layout) batches of that epoch computed here from the same pieces."""
    import re
    import time

    from mlx_coconut.data import FormatConfig, SpecialIds, make_batch

    out, logs = tiny["root"] / "first-step", []
    started = time.perf_counter() - 0.5  # as if the process had started 0.5 s ago (the CLI passes it)
    train.run(cfg(tiny, out, stage=1, c_thought=1, epochs=2, batch_size=4, bucket=8), log=logs.append,
              started=started)
    wall = time.perf_counter() - started
    first = [l for l in logs if l.startswith("first step done")]
    assert len(first) == 1, logs
    m = re.fullmatch(r"first step done ([\d.]+) s after start \((.*)\)", first[0])
    phases = {k: float(v) for k, v in re.findall(r"([a-z+]+) ([\d.]+) s", m[2])}
    assert list(phases) == ["imports", "load", "data", "other", "trace+compile+step"], first[0]
    assert phases["imports"] >= 0.5 and abs(sum(phases.values()) - float(m[1])) <= 0.3
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    rec = lines[0]["first_step_s"]  # the same to the ms
    assert abs(sum(v for k, v in rec.items() if k != "total") - rec["total"]) < 0.01
    assert abs(rec["total"] - float(m[1])) < 0.06 and rec["imports"] >= 0.5 and rec["step"] > 0
    assert rec["total"] <= wall
    assert all("first_step_s" not in l for l in lines[1:])

    run = ckpt.read_run(out)
    rc = train.TrainConfig(**run["config"])
    tokenizer = ckpt.load(out).tokenizer
    lid = run["settings"]["latent_ids"]
    special = SpecialIds(lid["start"], lid["latent"], lid["end"], run["eos_id"])
    records, _ = train.load_data(rc, quiet)
    fcfg = FormatConfig.from_settings(rc, uniform_prob=rc.uniform_prob)
    for epoch in (1, 2):
        batches = [make_batch(b, special.eos, special.latent, rc.bucket)
                   for b in train.epoch_batches(records, tokenizer, fcfg, special, rc, epoch - 1)]
        layouts = {(b["input_ids"].shape, int((b["labels"][:, 1:] != -100).sum() + 63) // 64,
                    b["latent_mask"].tobytes()) for b in batches}
        ends = [l for l in lines if l["epoch"] == epoch and "traces" in l]
        assert len(ends) == 1 and ends[0] is [l for l in lines if l["epoch"] == epoch][-1]
        assert ends[0]["traces"] == len(layouts) > 1
        assert f"epoch {epoch}: {len(layouts)} compiled traces (distinct batch shapes and latent layouts)" in logs


def test_trace_report_names_layouts_past_the_compile_cap():
    class FakeStepper:  # 3 layouts this epoch, 2 of them compiled (the Stepper's cap was reached)
        layouts, traces = {"a", "b", "c"}, {"a": None, "b": None, "z": None}

    def report(compile):
        cfg = train.TrainConfig(mode="cot", compile=compile)
        return train.StageCallbacks(SimpleNamespace(cfg=cfg), None, None, None, stepper=FakeStepper())._traces()

    assert report(True) == ("3 shape buckets (distinct batch shapes and latent layouts): 2 compiled "
                            "traces, 1 ran eagerly")
    assert report(False) == "3 shape buckets (distinct batch shapes and latent layouts; compile off)"


def test_only_the_first_train_of_a_process_counts_the_imports(tiny, tmp_path, monkeypatch):
    """The quickstart runs several `train` commands in one process: the first one's set-up counts from
    the process start (imports included), later ones from their own start, not the process's."""
    import time

    from mlx_coconut.commands import common
    monkeypatch.setattr(common, "_STARTED", [time.perf_counter() - 100.0])
    lines = []
    for name in ("first", "second"):
        r = _cli(["--model", str(tiny["model"]), "--train", str(tiny["data"]), "--epochs", "1",
                  "--samples", "8", "--eval-samples", "0", "--out", str(tmp_path / name)])
        assert r.exit_code == 0, r.output
        lines += [l for l in r.output.splitlines() if l.startswith("first step done")]
    assert len(lines) == 2, lines
    assert " after start (imports 10" in lines[0]
    assert " after the stage started (" in lines[1] and "imports" not in lines[1]
