"""The official recipe: best checkpoint beside the latest, RUN / RUN:best / RUN:latest, the other
training modes (pause, no-cot, no-thought), uniform stage mixing (and its --resume), gradient
accumulation = the full-batch gradient, the curriculum's final stage, and the configs/ presets.

Uses the tiny random Llama + BPE tokenizer of tests/helpers.py (16 synthetic records, seconds per run)."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from mlx.utils import tree_flatten

from mlx_coconut import checkpoint as ckpt
from mlx_coconut import optimizer, training as train
from mlx_coconut.training import evaluation
from mlx_coconut.cli import main
from mlx_coconut.data import FormatConfig, load_records, make_batch
from mlx_coconut.evaluate import EvalResults
from mlx_coconut.options import check_declared

from helpers import cfg, quiet

ROOT = Path(__file__).resolve().parents[1]


def _cli(args):
    return CliRunner().invoke(main, args)


def _weights(path):
    loaded = ckpt.load(path)
    return dict(tree_flatten(loaded.model.parameters())), loaded


# ---------------------------------------------------------------- best checkpoint


@pytest.fixture
def scripted_accuracy(monkeypatch):
    """Per-epoch validation accuracies replaced by a script (the bookkeeping is under test, not
    what a 2-layer model learns); the validation loss still runs for real."""
    script = []

    def fake(*a, **k):
        return EvalResults(examples=[], accuracy=script.pop(0), cot_match=0.0,
                           mean_generated_tokens=0.0, seconds=0.0)

    monkeypatch.setattr(evaluation, "evaluate", fake)
    return script


def test_best_checkpoint_kept_beside_latest(tiny, scripted_accuracy):
    out = tiny["root"] / "best"
    scripted_accuracy += [0.25, 0.75, 0.5, 0.75]    # best at epoch 2; a tie later does not replace it
    result = train.run(cfg(tiny, out, epochs=4, eval_samples=2), log=quiet)
    assert result["steps"] == 8                      # 2 steps per epoch
    run = ckpt.read_run(out)
    assert run["checkpoint"] == "ckpt-0000008"
    assert run["best"] == {"checkpoint": "ckpt-0000004", "accuracy": 0.75, "epoch": 2, "step": 4}
    assert sorted(p.name for p in out.glob("ckpt-*")) == ["ckpt-0000004", "ckpt-0000008"]

    best, lb = _weights(out)                          # RUN = best: the run has validation accuracy
    explicit, le = _weights(f"{out}:best")
    latest, ll = _weights(f"{out}:latest")
    assert (lb.checkpoint, le.checkpoint, ll.checkpoint) == ("ckpt-0000004", "ckpt-0000004", "ckpt-0000008")
    assert lb.state["step"] == 4 and ll.state["step"] == 8
    assert all(mx.array_equal(best[k], explicit[k]).item() for k in best)
    assert any(not mx.array_equal(best[k], latest[k]).item() for k in best)

    # --init RUN starts from the best checkpoint, RUN:latest from the latest; the run records which
    s1 = train.run(train.TrainConfig(init=str(out), out=str(tiny["root"] / "best-s1"), stage=1,
                                     epochs=1, eval_samples=0), log=quiet)
    assert s1["steps"] == 2
    rec = ckpt.read_run(tiny["root"] / "best-s1")
    assert rec["init"] == str(out.resolve()) and rec["init_checkpoint"] == "ckpt-0000004"
    train.run(train.TrainConfig(init=f"{out}:latest", out=str(tiny["root"] / "best-s1l"), stage=1,
                                epochs=1, eval_samples=0), log=quiet)
    assert ckpt.read_run(tiny["root"] / "best-s1l")["init_checkpoint"] == "ckpt-0000008"

    # eval and generate accept the selectors
    data = tiny["root"] / "few.json"
    data.write_text(json.dumps([r.to_json() for r in load_records(tiny["data"])[:2]]))
    for ref in (str(out), f"{out}:best", f"{out}:latest"):
        r = _cli(["eval", "--model", ref, "--data", str(data), "--max-tokens", "4"])
        assert r.exit_code == 0, r.output
    r = _cli(["generate", "--model", f"{out}:latest", "--prompt", "q", "--max-tokens", "3", "--json"])
    assert r.exit_code == 0, r.output


def test_best_survives_resume_and_is_replaced_atomically(tiny, scripted_accuracy):
    out = tiny["root"] / "best-resume"
    scripted_accuracy += [0.5, 0.25]
    part = train.run(cfg(tiny, out, epochs=3, eval_samples=2, stop_after_steps=5), log=quiet)
    assert part["interrupted"] and ckpt.read_run(out)["best"]["checkpoint"] == "ckpt-0000002"
    # the interrupted checkpoint (step 5) and the best (step 2) are both on disk
    assert sorted(p.name for p in out.glob("ckpt-*")) == ["ckpt-0000002", "ckpt-0000005"]
    scripted_accuracy += [0.75]
    rest = train.run(train.TrainConfig(out=str(out), resume=True), log=quiet)
    assert rest["steps"] == 6
    run = ckpt.read_run(out)
    assert run["best"]["checkpoint"] == "ckpt-0000006" == run["checkpoint"]
    assert [p.name for p in out.glob("ckpt-*")] == ["ckpt-0000006"]   # the old best went last


def test_without_validation_run_means_latest(tiny, tmp_path):
    out = tiny["root"] / "noval"
    train.run(cfg(tiny, out, epochs=1, eval_samples=0), log=quiet)
    assert "best" not in ckpt.read_run(out)
    assert ckpt.load(out).checkpoint == ckpt.read_run(out)["checkpoint"]
    r = _cli(["generate", "--model", f"{out}:best", "--prompt", "q"])
    assert r.exit_code == 2 and f"{out}:latest" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = _cli(["generate", "--model", f"{tiny['model']}:best", "--prompt", "q"])
    assert r.exit_code == 2 and "is not one (no coconut.json" in r.stderr


# ---------------------------------------------------------------- other modes


def test_pause_no_cot_and_no_thought_modes_train(tiny):
    records = load_records(tiny["data"])
    runs = {}
    for mode, stage in (("pause", 2), ("no-cot", 0), ("no-thought", 1)):
        out = tiny["root"] / f"mode-{mode}"
        result = train.run(cfg(tiny, out, mode=mode, stage=stage, epochs=8), log=quiet)
        assert np.mean(result["losses"][-2:]) < 0.7 * result["losses"][0], (mode, result["losses"])
        loaded = ckpt.load(out)
        assert (loaded.settings.mode, loaded.settings.stage) == (mode, stage)
        runs[mode] = loaded
    from mlx_coconut.data import format_record
    from mlx_coconut.api import special_ids
    r = next(r for r in records if len(r.steps) == 2)
    seen = {}
    for mode, loaded in runs.items():
        ex = format_record(r, loaded.tokenizer, loaded.settings.format_config(), special_ids(loaded))
        seen[mode] = (ex.n_latents, loaded.tokenizer.decode([t for t, l in zip(ex.input_ids, ex.labels) if l != -100]))
    # pause: the latent tokens are in the input (2 thoughts for stage 2, c=1), nothing fed back
    assert seen["pause"][0] == 2 and "<<" not in seen["pause"][1] and r.answer in seen["pause"][1]
    # no-cot: only the answer is supervised; no-thought: the first step is gone, no latents
    assert seen["no-cot"][0] == 0 and "<<" not in seen["no-cot"][1]
    assert seen["no-thought"][0] == 0 and r.steps[0] not in seen["no-thought"][1] and r.steps[1] in seen["no-thought"][1]


def test_pause_mode_feeds_nothing_back(tiny):
    """pause = the latent tokens stay ordinary (learned) embeddings: on the same first batch from the
    same weights its loss differs from COCONUT's, which feeds hidden states back."""
    a = train.run(cfg(tiny, tiny["root"] / "p1", mode="pause", stage=1, epochs=1, stop_after_steps=1), log=quiet)
    b = train.run(cfg(tiny, tiny["root"] / "c1", mode="coconut", stage=1, epochs=1, stop_after_steps=1), log=quiet)
    assert abs(a["losses"][0] - b["losses"][0]) > 1e-4 * abs(b["losses"][0])


# ---------------------------------------------------------------- uniform_prob


def test_uniform_prob_draws_stages_and_resume_reproduces_them(tiny):
    c = train.resolve(cfg(tiny, tiny["root"] / "u-unused", stage=2, uniform_prob=0.5))[0]
    model_records = load_records(tiny["data"])
    loaded = ckpt.load(tiny["model"])
    from mlx_coconut.data import SpecialIds
    from mlx_coconut.tokens import add_latent_tokens
    ids = add_latent_tokens(loaded.model, loaded.tokenizer)
    special = SpecialIds(ids.start, ids.latent, ids.end, 0)

    def stages(epoch):
        batches = train.epoch_batches(model_records, loaded.tokenizer, FormatConfig.from_settings(c, uniform_prob=c.uniform_prob), special, c, epoch)
        return [e.stage for b in batches for e in b]

    s0 = stages(0)
    assert len(set(s0)) > 1 and 2 in s0                  # some examples drawn at another stage
    assert stages(0) == s0                                # a function of (seed, epoch)
    assert stages(1) != s0
    common = dict(stage=2, uniform_prob=0.5, epochs=2, batch_size=4)
    full = train.run(cfg(tiny, tiny["root"] / "u-full", **common), log=quiet)
    part = train.run(cfg(tiny, tiny["root"] / "u-part", stop_after_steps=3, **common), log=quiet)
    rest = train.run(train.TrainConfig(out=str(tiny["root"] / "u-part"), resume=True), log=quiet)
    np.testing.assert_allclose(part["losses"] + rest["losses"], full["losses"], rtol=1e-6)
    # and the mixing changed the losses (the draws are really used)
    plain = train.run(cfg(tiny, tiny["root"] / "u-none", **{**common, "uniform_prob": 0.0}), log=quiet)
    assert not np.allclose(plain["losses"], full["losses"], rtol=1e-3)


# ---------------------------------------------------------------- gradient accumulation


class _Recorder(optimizer.AdamW):
    grads = []

    def update(self, model, gradients):
        _Recorder.grads.append(gradients)
        super().update(model, gradients)


@pytest.mark.parametrize("stage", [0, 1])
def test_accumulated_gradient_equals_full_batch_gradient(tiny, monkeypatch, stage):
    """2 micro-batches of 4 (different numbers of supervised tokens) give the gradient of the 8-example
    batch: what the optimizer receives is compared with the full-batch gradient computed directly."""
    _Recorder.grads = []
    monkeypatch.setattr(optimizer, "AdamW", _Recorder)
    c = cfg(tiny, tiny["root"] / f"acc-{stage}", stage=stage, batch_size=4, grad_accumulation_steps=2,
            epochs=1, stop_after_steps=1, compile=False, seed=1)
    train.run(c, log=quiet)
    got = dict(tree_flatten(_Recorder.grads[0]))

    rc, _ = train.resolve(cfg(tiny, tiny["root"] / "unused", stage=stage, batch_size=4,
                              grad_accumulation_steps=2, seed=1))  # seed: micro-batches of unequal size
    model, tok, special, _ = train.setup_model(rc, None, quiet)
    records, _ = train.load_data(rc, quiet)
    micro = train.epoch_batches(records, tok, FormatConfig.from_settings(rc, uniform_prob=rc.uniform_prob), special, rc, 0)[:2]
    counts = [train.supervised_tokens(m) for m in micro]
    assert counts[0] != counts[1]                     # a mean of the two means would differ
    stepper = train.Stepper(model, True, False)
    _, _, full = stepper(make_batch(micro[0] + micro[1], special.eos, special.latent, rc.bucket))
    full = dict(tree_flatten(full))
    parts = [dict(tree_flatten(stepper(make_batch(m, special.eos, special.latent, rc.bucket))[2]))
             for m in micro]
    scale = max(float(mx.abs(v).max()) for v in full.values())
    for k in full:
        assert float(mx.abs(got[k] - full[k]).max()) <= 1e-5 * scale, k
    # the test can fail: the unweighted mean of the micro-batch gradients is measurably different
    off = max(float(mx.abs((parts[0][k] + parts[1][k]) / 2 - full[k]).max()) for k in full)
    assert off > 1e-3 * scale


# ---------------------------------------------------------------- curriculum: the final stage


def test_curriculum_last_stage_runs_the_remaining_epochs(tiny):
    out = tiny["root"] / "sched"
    result = train.run(cfg(tiny, out, stages="0-2", epochs_per_stage=1, epochs=4, max_latent_stage=1,
                           batch_size=8), log=quiet)
    epochs = {s: ckpt.read_run(out / f"stage{s}")["config"]["epochs"] for s in (0, 1, 2)}
    assert epochs == {0: 1, 1: 1, 2: 2}
    assert result["stages"][2]["steps"] == 4
    # the stages are one continuous run: each starts from the previous stage's latest checkpoint
    assert ckpt.read_run(out / "stage2")["init_checkpoint"] == ckpt.read_run(out / "stage1")["checkpoint"]
    r = CliRunner().invoke(main, ["train", "--stages", "0-2", "--epochs-per-stage", "2", "--epochs", "4",
                                  "--model", str(tiny["model"]), "--out", str(tiny["root"] / "sched-bad")])
    assert r.exit_code == 2 and "leaves no epoch for stage 2" in r.stderr


# ---------------------------------------------------------------- configs/


PRESETS = sorted((ROOT / "configs").glob("*.yaml"))
OFFICIAL = {  # facebookresearch/coconut @ 27273cb args/*.yaml
    "gsm8k-cot.yaml": dict(mode="cot", stage=0, epochs=25, learning_rate=1e-4, weight_decay=0.01),
    "gsm8k-coconut.yaml": dict(mode="coconut", c_thought=2, epochs_per_stage=3, max_latent_stage=3,
                               pad_latent_to_max=True, stages="1-4", epochs=22, uniform_prob=0.0),
    "prosqa-coconut.yaml": dict(mode="coconut", c_thought=1, epochs_per_stage=5, max_latent_stage=6,
                                pad_latent_to_max=True, stages="0-7", epochs=50, max_new_tokens=128),
    "prontoqa-coconut.yaml": dict(mode="coconut", c_thought=1, epochs_per_stage=5, max_latent_stage=6,
                                  pad_latent_to_max=True, stages="0-7", epochs=50, max_new_tokens=128),
    "mac-llama3.1-8b-lora.yaml": dict(lora=True, lora_rank=16, batch_size=8, grad_accumulation_steps=4),
}


def test_presets_exist():
    assert sorted(p.name for p in PRESETS) == sorted(OFFICIAL)


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_preset_loads_and_validates(preset, tiny, monkeypatch, tmp_path):
    values = yaml.safe_load(preset.read_text())
    config = train.config_from_dict(values, str(preset))
    for k, v in OFFICIAL[preset.name].items():
        assert getattr(config, k) == v, k
    if config.mode in ("coconut", "cot"):
        official_batch = (config.batch_size or 8) * (config.grad_accumulation_steps or 1)
        assert official_batch in (32, 128)          # per GPU, or the 4-GPU total of the official runs
    # through the CLI, as `mlx-coconut train -c FILE` with the run paths overridden: the resolved
    # config validates (no training)
    seen = {}
    monkeypatch.setattr(train, "run", lambda c, **_: seen.setdefault("config", c) and {})
    args = ["train", "-c", str(preset), "--out", str(tmp_path / "run"), "--train", str(tiny["data"]),
            "--valid", str(tiny["data"])]
    args += ["--model", str(tiny["model"])] if not values.get("init") else []
    r = _cli(args)
    assert r.exit_code == 0, r.output
    c = seen["config"]
    assert c.out == str(tmp_path / "run")
    if c.init:  # a COCONUT preset continues the CoT run: resolve it against a real run directory
        c.init = str(_a_run(tiny, train.train_stage))
    if c.stages:
        stages = train.parse_stages(c.stages)
        c.stage, c.stages = stages[-1], None
        c.mode = None if c.mode == "cot" else c.mode
    resolved, _ = train.resolve(c)
    check_declared(resolved)


def _a_run(tiny, train_stage) -> Path:
    out = tiny["root"] / "preset-init"
    if not ckpt.is_run_dir(out):
        train_stage(cfg(tiny, out, epochs=1, eval_samples=0), log=quiet)
    return out
