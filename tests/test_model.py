"""Our Llama (model.py) against mlx-lm's Llama, and the KV cache against full recomputation."""

import mlx.core as mx
import mlx_lm.models.llama as mlx_lm_llama
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache

from mlx_coconut.errors import UserError
from mlx_coconut.model import Model, ModelArgs, load_model
from helpers import LLAMA31_TINY
from tolerance import RTOL, rel_diff

SMOL_TINY = dict(LLAMA31_TINY, rope_scaling=None, tie_word_embeddings=True, rope_theta=100000.0,
                 num_attention_heads=6, num_key_value_heads=2, hidden_size=48)


def twin_models(config, seed=0):
    mx.random.seed(seed)
    ours = Model(ModelArgs.from_dict(config))
    theirs = mlx_lm_llama.Model(mlx_lm_llama.ModelArgs.from_dict(config))
    theirs.load_weights(tree_flatten(ours.parameters()))
    return ours, theirs


def max_diff(a, b):
    return float(mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max())


@pytest.mark.parametrize("config", [LLAMA31_TINY, SMOL_TINY], ids=["llama31-shape", "smollm2-shape"])
def test_matches_mlx_lm_prompt_and_cached_decode(config):
    ours, theirs = twin_models(config)
    ids = mx.random.randint(0, config["vocab_size"], (2, 40))
    assert rel_diff(ours(ids), theirs(ids)) < RTOL
    cache, their_cache = ours.make_cache(), make_prompt_cache(theirs)
    assert rel_diff(ours(ids[:, :30], cache), theirs(ids[:, :30], their_cache)) < RTOL
    for t in range(30, 40):
        assert rel_diff(ours(ids[:, t:t + 1], cache), theirs(ids[:, t:t + 1], their_cache)) < RTOL


def test_llama3_rope_scaling_is_applied():
    # The same weights with and without rope scaling must give different logits at long range,
    # otherwise the parity test above would not be checking the scaling at all.
    ours, _ = twin_models(LLAMA31_TINY)
    plain = Model(ModelArgs.from_dict(dict(LLAMA31_TINY, rope_scaling=None)))
    plain.load_weights(tree_flatten(ours.parameters()))
    ids = mx.random.randint(0, 101, (1, 200))
    assert max_diff(ours(ids), plain(ids)) > 1e-3


def test_cached_incremental_equals_full_recompute():
    ours, _ = twin_models(LLAMA31_TINY, seed=1)
    ids = mx.random.randint(0, 101, (3, 300))  # crosses the 256-column growth step
    full = ours(ids)
    cache = ours.make_cache()
    chunks = [ours(ids[:, s:e], cache) for s, e in [(0, 5), (5, 6), (6, 250), (250, 257), (257, 300)]]
    assert rel_diff(mx.concatenate(chunks, axis=1), full) < RTOL
    assert cache.offset == 300


def test_left_padded_batch_equals_each_row_alone():
    ours, _ = twin_models(LLAMA31_TINY, seed=2)
    lengths = [9, 14, 11]
    rows = [mx.random.randint(1, 101, (n,)) for n in lengths]
    width = max(lengths)
    left_pad = mx.array([width - n for n in lengths])
    batch = mx.stack([mx.concatenate([mx.zeros((width - n,), mx.int32), r]) for r, n in zip(rows, lengths)])
    # Uncached, and cached in two chunks followed by a decode step.
    out = ours(batch, left_pad=left_pad)
    cache = ours.make_cache(left_pad=left_pad)
    chunked = mx.concatenate([ours(batch[:, :7], cache), ours(batch[:, 7:], cache)], axis=1)
    nxt = mx.array([[5], [6], [7]])
    step = ours(nxt, cache)
    for b, (row, n) in enumerate(zip(rows, lengths)):
        alone = ours(row[None])
        assert rel_diff(out[b, width - n:], alone[0]) < RTOL
        assert rel_diff(chunked[b, width - n:], alone[0]) < RTOL
        alone_next = ours(mx.concatenate([row, nxt[b]])[None])
        assert rel_diff(step[b, 0], alone_next[0, -1]) < RTOL


def test_input_embeddings_path_equals_token_path():
    ours, _ = twin_models(SMOL_TINY, seed=3)
    ids = mx.random.randint(0, 101, (2, 10))
    h_tokens = ours.hidden_states(ids)
    h_embeds = ours.hidden_states(input_embeddings=ours.embed(ids))
    assert max_diff(h_tokens, h_embeds) == 0.0
    assert max_diff(ours.logits(h_tokens), ours(ids)) == 0.0


def test_gradients_flow_through_cache():
    ours, _ = twin_models(SMOL_TINY, seed=4)
    ids = mx.random.randint(0, 101, (2, 12))

    def loss_full(emb):
        return ours(input_embeddings=emb).sum()

    def loss_cached(emb):
        cache = ours.make_cache()
        a = ours(input_embeddings=emb[:, :5], cache=cache)
        b = ours(input_embeddings=emb[:, 5:], cache=cache)
        return a.sum() + b.sum()

    emb = ours.embed(ids)
    g_full, g_cached = mx.grad(loss_full)(emb), mx.grad(loss_cached)(emb)
    assert float(mx.abs(g_full).max()) > 0
    assert rel_diff(g_cached, g_full) < RTOL


def test_config_errors(tmp_path):
    with pytest.raises(UserError, match="unsupported model_type 'gpt2'"):
        ModelArgs.from_dict(dict(LLAMA31_TINY, model_type="gpt2"))
    with pytest.raises(UserError, match="unsupported rope_scaling type 'yarn'"):
        Model(ModelArgs.from_dict(dict(LLAMA31_TINY, rope_scaling={"rope_type": "yarn", "factor": 2})))
    with pytest.raises(UserError, match="model directory not found"):
        load_model(tmp_path / "nope")
    with pytest.raises(UserError, match="no config.json"):
        load_model(tmp_path)


@pytest.mark.slow
def test_smollm2_matches_mlx_lm_and_loads_there(smollm2_dir):
    """The real converted SmolLM2-135M: our logits equal mlx-lm's, prompt and cached decode."""
    import mlx_lm

    ours, _ = load_model(smollm2_dir, dtype=mx.float32)
    theirs, _ = mlx_lm.load(str(smollm2_dir))
    ids = mx.array([[504, 3575, 282, 4649, 314, 3067, 30, 378, 12139]])  # arbitrary real ids
    cache, their_cache = ours.make_cache(), make_prompt_cache(theirs)
    assert rel_diff(ours(ids, cache), theirs(ids, cache=their_cache)) < RTOL
    token = mx.array([[42]])
    for _ in range(4):
        a, b = ours(token, cache), theirs(token, cache=their_cache)
        assert rel_diff(a, b) < RTOL
        token = mx.argmax(a[:, -1:], axis=-1)
