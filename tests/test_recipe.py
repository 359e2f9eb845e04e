"""The official training recipe: torch's AdamW (bias-corrected), the optimizer reset cadence, the
latent-token rows re-created from `<<` at the first latent stage, pad_latent_to_max on by default."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_coconut import checkpoint as ckpt
from mlx_coconut import training as train
from mlx_coconut.data import FormatConfig, Record, TextTokenizer, format_record, add_latent_special_ids
from mlx_coconut.errors import UserError
from helpers import cfg, quiet, tiny_setup


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(tmp_path_factory.mktemp("recipe"), seed=3, tied=True)


@pytest.fixture(scope="module")
def cot_run(tiny):
    out = tiny["root"] / "cot"
    result = train.run(cfg(tiny, out, epochs=3), log=quiet)
    return out, result


def test_adamw_update_is_torch_adamw():
    """One and two updates against torch.optim.AdamW's formula written out in numpy."""
    lr, wd, b1, b2, eps = 1e-2, 0.1, 0.9, 0.999, 1e-8
    layer = nn.Linear(4, 3, bias=False)
    w0 = np.array(layer.weight)
    opt = train.make_optimizer(layer, train.TrainConfig(learning_rate=lr, weight_decay=wd))
    rng = np.random.default_rng(0)
    w, m, v = w0.astype(np.float64), 0.0, 0.0
    for t in (1, 2):
        g = rng.normal(size=w0.shape).astype(np.float32)
        opt.update(layer, {"weight": mx.array(g)})
        mx.eval(layer.parameters())
        w = w * (1 - lr * wd)                      # decoupled weight decay first
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g.astype(np.float64) ** 2
        m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
        w = w - lr * m_hat / (np.sqrt(v_hat) + eps)
        got = np.array(layer.weight)
        np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-6 * np.abs(w).max())
    # the first step moves every weight by ~lr (uncorrected Adam would move it by ~3.16 lr)
    step1 = np.abs(w0 * (1 - lr * wd) - w0)  # (decay only, for scale)
    assert np.abs(np.array(layer.weight) - w0).max() < 2.5 * lr + step1.max()


def _opt_step(out) -> int:
    opt, _ = ckpt.load_optimizer_state(out)
    return int(opt["step"].item())


def test_reset_optimizer_cadence(tiny, cot_run):
    prev, prev_result = cot_run
    steps_per_epoch = 2  # 16 records, batch 8
    # CoT default: one optimizer for the whole run
    assert ckpt.read_run(prev)["config"]["reset_optimizer"] == "stage"
    assert _opt_step(prev) == prev_result["steps"] == 3 * steps_per_epoch
    # latent stage default (official reset_optimizer: True): a fresh AdamW every epoch
    out = tiny["root"] / "s1-epoch"
    r = train.run(train.TrainConfig(init=str(prev), out=str(out), stage=1, epochs=3), log=quiet)
    assert ckpt.read_run(out)["config"]["reset_optimizer"] == "epoch"
    assert r["steps"] == 6 and _opt_step(out) == steps_per_epoch
    out = tiny["root"] / "s1-stage"
    train.run(train.TrainConfig(init=str(prev), out=str(out), stage=1, epochs=3,
                                reset_optimizer="stage"), log=quiet)
    assert _opt_step(out) == 6
    # never: the --init run's moments and step count carry on
    out = tiny["root"] / "s1-never"
    train.run(train.TrainConfig(init=str(prev), out=str(out), stage=1, epochs=1,
                                reset_optimizer="never"), log=quiet)
    assert _opt_step(out) == prev_result["steps"] + steps_per_epoch
    with pytest.raises(UserError, match="--reset-optimizer"):
        train.run(train.TrainConfig(init=str(prev), out=str(tiny["root"] / "bad"), stage=1,
                                    reset_optimizer="sometimes"), log=quiet)


def test_reset_every_epoch_resumes_like_an_uninterrupted_run(tiny, cot_run):
    prev, _ = cot_run
    whole = tiny["root"] / "s1-whole"
    train.run(train.TrainConfig(init=str(prev), out=str(whole), stage=1, epochs=2), log=quiet)
    split = tiny["root"] / "s1-split"
    train.run(train.TrainConfig(init=str(prev), out=str(split), stage=1, epochs=2,
                                stop_after_steps=3), log=quiet)  # stops in epoch 2
    train.run(train.TrainConfig(out=str(split), resume=True), log=quiet)
    a = dict(tree_flatten(ckpt.load(whole).model.parameters()))
    b = dict(tree_flatten(ckpt.load(split).model.parameters()))
    for k in a:
        scale = max(float(mx.abs(a[k]).max().item()), 1e-3)
        assert float(mx.abs(a[k] - b[k]).max().item()) <= 1e-5 * scale, k


def _rows(model, ids):
    emb = np.array(model.model.embed_tokens.weight)[ids]
    head = getattr(model, "lm_head", None)
    return emb, (np.array(head.weight)[ids] if head is not None else None)


@pytest.mark.parametrize("tied", [False, True])
def test_first_latent_stage_recreates_latent_rows_from_init_token(tiny, tied):
    src = tiny["tied" if tied else "model"]
    prev = tiny["root"] / f"cot-rows-{tied}"
    train.run(cfg(tiny, prev, model=str(src), epochs=2, learning_rate=5e-3), log=quiet)
    loaded = ckpt.load(prev)
    lt = loaded.tokenizer.get_vocab()["<<"]
    ids = [loaded.settings.latent_ids[k] for k in ("start", "latent", "end")]
    emb, head = _rows(loaded.model, ids + [lt])
    assert np.abs(emb[:3] - emb[3]).max() > 1e-4  # stage 0 moved them (never-target rows of the head)
    # the stage-1 model as training starts: input and output rows = the CoT model's `<<` rows
    config, init_run = train.resolve(train.TrainConfig(init=str(prev), out=str(tiny["root"] / "x"),
                                                       stage=1))
    model, _, special, _ = train.setup_model(config, init_run, quiet)
    emb1, head1 = _rows(model, ids)
    np.testing.assert_array_equal(emb1, np.broadcast_to(emb[3], emb1.shape))
    if not tied:
        np.testing.assert_array_equal(head1, np.broadcast_to(head[3], head1.shape))
    # the other rows are untouched
    np.testing.assert_array_equal(np.array(model.model.embed_tokens.weight)[:lt + 1],
                                  np.array(loaded.model.model.embed_tokens.weight)[:lt + 1])
    # a latent run continuing a latent run keeps its trained rows
    s1 = tiny["root"] / f"s1-rows-{tied}"
    train.run(train.TrainConfig(init=str(prev), out=str(s1), stage=1, epochs=1, learning_rate=5e-3),
              log=quiet)
    trained, _ = _rows(ckpt.load(s1).model, ids)
    config, init_run = train.resolve(train.TrainConfig(init=str(s1), out=str(tiny["root"] / "y"),
                                                       stage=2))
    model, _, _, _ = train.setup_model(config, init_run, quiet)
    np.testing.assert_array_equal(_rows(model, ids)[0], trained)


def test_lora_first_latent_stage_recreates_trainable_rows(tiny):
    prev = tiny["root"] / "cot-lora"
    train.run(cfg(tiny, prev, epochs=2, lora=True, lora_rank=4, learning_rate=5e-3), log=quiet)
    loaded = ckpt.load(prev)
    lt = loaded.tokenizer.get_vocab()["<<"]
    extra = np.array(loaded.model.model.embed_tokens.extra)
    base_row = np.array(loaded.model.model.embed_tokens.base.weight)[lt]
    assert np.abs(extra - base_row).max() > 0  # weight decay only: never an input at stage 0
    head_row = np.array(loaded.model.lm_head.base.weight)[lt]
    assert np.abs(np.array(loaded.model.lm_head.extra) - head_row).max() > 1e-4  # pushed down
    config, init_run = train.resolve(train.TrainConfig(init=str(prev), out=str(tiny["root"] / "z"),
                                                       stage=1, lora=True))
    model, _, _, _ = train.setup_model(config, init_run, quiet)
    np.testing.assert_array_equal(np.array(model.model.embed_tokens.extra),
                                  np.broadcast_to(base_row, extra.shape))
    np.testing.assert_array_equal(np.array(model.lm_head.extra), np.broadcast_to(head_row, extra.shape))


def test_pad_latent_to_max_is_the_default():
    assert FormatConfig().pad_latent_to_max is True
    config, _ = train.resolve(train.TrainConfig(model=".", out="unused", stage=1))
    assert config.pad_latent_to_max is True
    tok = TextTokenizer()
    ids = add_latent_special_ids(tok, eos_id=0)
    one_step = Record("Q?", ["<<1+1=2>>"], "2")
    # stage 3, c=2: the eval prompt of a 1-step record gets the full 3*2 thoughts (official), not 1*2
    ex = format_record(one_step, tok, FormatConfig(mode="coconut", stage=3, c_thought=2), ids)
    assert ex.prompt_ids.count(ids.latent) == 6
    ex = format_record(one_step, tok, FormatConfig(mode="coconut", stage=3, c_thought=2,
                                                   pad_latent_to_max=False), ids)
    assert ex.prompt_ids.count(ids.latent) == 2
