"""The latent loop (coconut.py) against references written here: plain model, naive recompute, bs=1.

The naive reference is the official algorithm at its most literal: for every latent, recompute the
whole prefix from scratch (no cache, batch size 1) and write h[t-1] into column t.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_coconut.coconut import (IGNORE, continuous_forward, cross_entropy, generate, loss_fn,
                                 supervised_rows)
from mlx_coconut.data import Example, collate as data_collate
from mlx_coconut.model import load_model
from helpers import LLAMA31_TINY, random_model
from tolerance import RTOL, rel_diff, tree_rel_diff

PAD, START, LATENT, END, EOS = 0, 97, 98, 99, 100


def tiny_model(seed=0, **overrides):
    return random_model(seed, **dict(LLAMA31_TINY, **overrides))


def make_example(q_len, n_latents, rest_len, rng, ids=(START, LATENT, END, EOS)):
    """(input_ids, labels, prompt_ids) shaped like data.format_record's coconut output."""
    start, latent, end, eos = ids
    question = rng.integers(1, 90, q_len).tolist()
    rest = rng.integers(1, 90, rest_len).tolist() + [eos]
    prompt = question + [start] + [latent] * n_latents + [end]
    return prompt + rest, [IGNORE] * len(prompt) + rest, prompt


def collate(rows, pad_id=PAD):
    """data.collate (the official MyCollator rule: first latents share a column) on (ids, labels) rows."""
    exs = [Example(ids, labels, [], 0, 0, ids.index(LATENT) if LATENT in ids else -1) for ids, labels in rows]
    b = data_collate(exs, pad_id)
    return b["input_ids"], b["labels"], b["left_pad"]


# ---------------------------------------------------------------- references written in the test

def naive_hidden(model, ids, latent_id=LATENT, stop_grad=False, perturb=None):
    """Batch size 1, no cache: for each latent column t, recompute everything and set e[t] = h[t-1]."""
    embeds = model.embed(mx.array(ids)[None])
    for t in [i for i, x in enumerate(ids) if x == latent_id]:
        h = model.hidden_states(input_embeddings=embeds[:, :t])[:, -1]
        h = mx.stop_gradient(h) if stop_grad else h
        embeds = mx.concatenate([embeds[:, :t], h[:, None], embeds[:, t + 1:]], axis=1)
    return model.hidden_states(input_embeddings=embeds)


def ce_loss(logits, labels):
    """Mean cross-entropy of logits[t] against labels[t+1] where labels != -100."""
    logits, labels = logits[:, :-1], mx.array(labels)[:, 1:]
    valid = labels != IGNORE
    ce = nn.losses.cross_entropy(logits, mx.where(valid, labels, 0)) * valid
    return ce.sum() / valid.sum()


def max_diff(a, b):
    return float(mx.abs(a - b).max())


# ---------------------------------------------------------------- 1. zero latents

def test_zero_latents_equals_plain_model_loss():
    model = tiny_model(seed=1)
    rng = np.random.default_rng(1)
    ids = rng.integers(1, 90, (2, 17)).astype(np.int32)
    labels = ids.copy()
    labels[:, :6] = IGNORE
    ours, ntoks = loss_fn(model, mx.array(ids), mx.array(labels), np.zeros(ids.shape, bool))
    plain = ce_loss(model(mx.array(ids)), labels)
    assert int(ntoks) == 2 * 11
    assert rel_diff(ours, plain) < RTOL


# ---------------------------------------------------------------- 2. naive reference

def _check_against_naive(model, ids, labels, latent_id=LATENT, tol=RTOL):
    latent_mask = (np.array(ids) == latent_id)[None]
    hidden = continuous_forward(model, mx.array(ids)[None], latent_mask)
    ref = naive_hidden(model, ids, latent_id)
    assert rel_diff(model.logits(hidden), model.logits(ref)) < tol
    loss, _ = loss_fn(model, mx.array(ids)[None], mx.array(labels)[None], latent_mask)
    ref_loss = ce_loss(model.logits(ref), [labels])
    assert rel_diff(loss, ref_loss) < tol
    return latent_mask


def test_matches_naive_reference_loss_logits_and_gradients():
    model = tiny_model(seed=2)
    ids, labels, _ = make_example(7, 3, 9, np.random.default_rng(2))
    latent_mask = _check_against_naive(model, ids, labels)

    def ours(m):
        return loss_fn(m, mx.array(ids)[None], mx.array(labels)[None], latent_mask)[0]

    def naive(m, stop_grad=False):
        return ce_loss(m.logits(naive_hidden(m, ids, stop_grad=stop_grad)), [labels])

    _, g_ours = nn.value_and_grad(model, ours)(model)
    _, g_naive = nn.value_and_grad(model, naive)(model)
    _, g_stopped = nn.value_and_grad(model, lambda m: naive(m, True))(model)
    g_ours, g_naive, g_stopped = (dict(tree_flatten(g)) for g in (g_ours, g_naive, g_stopped))
    assert g_ours.keys() == g_naive.keys()
    worst = tree_rel_diff(g_ours, g_naive)
    assert worst < RTOL, worst
    # The thoughts are differentiable: stopping the gradient at the fed state changes the gradients
    # (of the layers that produced it), by far more than our numerical error.
    key = "model.layers.0.mlp.down_proj.weight"
    assert rel_diff(g_naive[key], g_stopped[key]) > 100 * max(worst, 1e-7)


@pytest.fixture(scope="module")
def smollm2(request):
    try:
        path = request.getfixturevalue("smollm2_dir")
    except pytest.FixtureLookupError:
        pytest.skip("smollm2_dir fixture not available")
    return load_model(path, mx.float32)[0]


SMOL_LATENT = 33691  # `<<` stands in for <|latent|>: the loop only needs to know which columns are thoughts


def _head_case(variant, seed):
    """A tiny model (untied, tied or LoRA'd head) and a two-row left-padded batch with thoughts."""
    from mlx_coconut import adapters
    model = tiny_model(seed=seed, tie_word_embeddings=variant == "tied")
    if variant == "lora":
        adapters.apply_lora(model, {"rank": 4, "scale": 20.0, "dropout": 0.0, "layers": 0,
                                "quantization": None}, (START, LATENT, END))
        mx.eval(model.parameters())
    rng = np.random.default_rng(seed)
    ids, labels, left_pad = collate([make_example(5, 2, 7, rng)[:2], make_example(9, 2, 4, rng)[:2]])
    return model, ids, labels, left_pad, ids == LATENT


@pytest.mark.parametrize("variant", ["untied", "tied", "lora"])
def test_chunked_loss_equals_unchunked(variant):
    """loss_fn's checkpointed per-chunk head (chunks of 5 positions, across rows) = one big chunk,
    loss and every gradient (head, LoRA and new-token rows included)."""
    model, ids, labels, left_pad, latent_mask = _head_case(variant, seed=5)

    def loss(m, chunk):
        return loss_fn(m, mx.array(ids), mx.array(labels), latent_mask, left_pad, chunk=chunk)[0]

    l_big, g_big = nn.value_and_grad(model, lambda m: loss(m, 10 ** 9))(model)
    l_small, g_small = nn.value_and_grad(model, lambda m: loss(m, 5))(model)
    g_big, g_small = dict(tree_flatten(g_big)), dict(tree_flatten(g_small))
    assert ids.size > 3 * 5 and g_big.keys() == g_small.keys()
    assert rel_diff(l_big, l_small) < RTOL
    assert tree_rel_diff(g_big, g_small) < RTOL
    head = "model.embed_tokens" if variant == "tied" else "lm_head"
    assert any(k.startswith(head) and float(mx.abs(g).max()) > 0 for k, g in g_small.items())


@pytest.mark.parametrize("compiled", [False, True])
def test_one_pass_cross_entropy_equals_mlx_cross_entropy(compiled):
    """coconut.cross_entropy (softmax kept for its gradient) = nn.losses.cross_entropy, value and
    gradient, including large logits (the max is subtracted before exp)."""
    rng = np.random.default_rng(8)
    logits = mx.array((rng.standard_normal((6, 50)) * np.array([[1], [5], [30], [1], [80], [2]]))
                      .astype(np.float32))
    targets = mx.array(rng.integers(0, 50, 6).astype(np.int32))
    weights = mx.array(rng.random(6).astype(np.float32))  # a weighted sum, as loss_fn's valid mask

    def ours(x):
        return (cross_entropy(x, targets)[0] * weights).sum()

    def reference(x):
        return (nn.losses.cross_entropy(x, targets) * weights).sum()

    f_ours, f_ref = mx.value_and_grad(ours), mx.value_and_grad(reference)
    if compiled:
        f_ours = mx.compile(f_ours)
    (v_ours, g_ours), (v_ref, g_ref) = f_ours(logits), f_ref(logits)
    assert np.isfinite(float(v_ours))
    assert rel_diff(v_ours, v_ref) < RTOL
    assert rel_diff(g_ours, g_ref) < RTOL
    assert float(mx.abs(g_ref).max()) > 0.1   # a gradient worth comparing


@pytest.mark.parametrize("variant", ["untied", "tied", "lora"])
def test_head_on_labelled_rows_only_equals_full_head(variant):
    """loss_fn with `rows` (the head only where a label is, padded with an unlabelled position) gives
    the loss and every gradient of the head over all positions."""
    model, ids, labels, left_pad, latent_mask = _head_case(variant, seed=6)
    rows = supervised_rows(labels, bucket=16)
    n_labelled = int((labels[:, 1:] != IGNORE).sum())
    assert rows.size == 16 and n_labelled < 16 < labels[:, 1:].size   # padded, and fewer than all

    def loss(m, rows):
        return loss_fn(m, mx.array(ids), mx.array(labels), latent_mask, left_pad, rows=rows)

    (l_all, n_all), g_all = nn.value_and_grad(model, lambda m: loss(m, None))(model)
    (l_rows, n_rows), g_rows = nn.value_and_grad(model, lambda m: loss(m, rows))(model)
    g_all, g_rows = dict(tree_flatten(g_all)), dict(tree_flatten(g_rows))
    assert int(n_all) == int(n_rows) == n_labelled
    assert rel_diff(l_all, l_rows) < RTOL
    assert tree_rel_diff(g_all, g_rows) < RTOL
    # the test can fail: dropping one labelled row changes the loss
    (l_short, _), _ = nn.value_and_grad(model, lambda m: loss(m, rows[1:]))(model)
    assert rel_diff(l_short, l_all) > 100 * RTOL


def test_one_pass_without_cache_equals_cached_pass():
    """A batch without thoughts runs one pass with no KV cache; left padding is still masked and
    positions still start at each row's first real token."""
    model = tiny_model(seed=7)
    rng = np.random.default_rng(7)
    left_pad = np.array([4, 0])
    ids = rng.integers(1, 90, (2, 12)).astype(np.int32)
    ids[0, :4] = PAD
    no_latents = np.zeros(ids.shape, bool)
    uncached = continuous_forward(model, mx.array(ids), no_latents, mx.array(left_pad))
    cached = continuous_forward(model, mx.array(ids), no_latents, mx.array(left_pad),
                                cache=model.make_cache(mx.array(left_pad)))
    real = mx.array(np.arange(ids.shape[1])[None] >= left_pad[:, None])[..., None]
    assert rel_diff(mx.where(real, uncached, 0), mx.where(real, cached, 0)) < RTOL


def test_matches_naive_reference_on_smollm2(smollm2):
    ids, labels, _ = make_example(6, 2, 4, np.random.default_rng(3), ids=(1, SMOL_LATENT, 2, 2))
    _check_against_naive(smollm2, ids, labels, latent_id=SMOL_LATENT)


def test_smollm2_batched_generation_equals_bs1(smollm2):
    rng = np.random.default_rng(6)
    prompts = [make_example(q, n, 1, rng, ids=(1, SMOL_LATENT, 2, 2))[2] for q, n in [(5, 1), (9, 2)]]
    alone = [generate(smollm2, [p], SMOL_LATENT, [2], 4).tokens[0] for p in prompts]
    assert generate(smollm2, prompts, SMOL_LATENT, [2], 4).tokens == alone


# ---------------------------------------------------------------- 3. mixed batch == each alone

def test_mixed_batch_equals_each_example_alone():
    model = tiny_model(seed=3)
    rng = np.random.default_rng(3)
    rows = [make_example(q, n, r, rng)[:2] for q, n, r in [(5, 1, 8), (11, 3, 3), (8, 2, 6)]]
    input_ids, labels, left_pad = collate(rows)
    # The official collator aligns the first latents; the three rows must have different left pads.
    assert len(set(left_pad.tolist())) == 3
    assert len(set(np.argmax(input_ids == LATENT, axis=1).tolist())) == 1
    mask = input_ids == LATENT
    hidden = continuous_forward(model, mx.array(input_ids), mask, mx.array(left_pad))
    losses, counts = [], []
    for b, (ids, lab) in enumerate(rows):
        alone = continuous_forward(model, mx.array(ids)[None], (np.array(ids) == LATENT)[None])
        lo = int(left_pad[b])
        assert rel_diff(model.logits(hidden[b, lo:lo + len(ids)]), model.logits(alone[0])) < RTOL
        loss, n = loss_fn(model, mx.array(ids)[None], mx.array(lab)[None], (np.array(ids) == LATENT)[None])
        losses.append(float(loss) * int(n))
        counts.append(int(n))
    batch_loss, ntoks = loss_fn(model, mx.array(input_ids), mx.array(labels), mask, mx.array(left_pad))
    assert int(ntoks) == sum(counts)
    assert rel_diff(batch_loss, sum(losses) / sum(counts)) < RTOL


# ---------------------------------------------------------------- 4. the feedback is used

class PerturbFedState:
    """Wraps a Model; adds `delta` to the last hidden column of pass `at` (the state fed back next)."""

    def __init__(self, model, at, delta):
        self.model, self.at, self.delta, self.calls = model, at, delta, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def hidden_states(self, *args, **kwargs):
        h = self.model.hidden_states(*args, **kwargs)
        if self.calls == self.at:
            h = mx.concatenate([h[:, :-1], h[:, -1:] + self.delta], axis=1)
        self.calls += 1
        return h


def test_fed_back_state_is_used():
    model = tiny_model(seed=4)
    ids, _, _ = make_example(6, 3, 5, np.random.default_rng(4))
    mask = (np.array(ids) == LATENT)[None]
    first, second = [i for i, x in enumerate(ids) if x == LATENT][:2]
    base = model.logits(continuous_forward(model, mx.array(ids)[None], mask))
    # Perturb what pass 1 hands to the second latent: logits before it are untouched, after it change.
    bumped = PerturbFedState(model, at=1, delta=0.5 * mx.random.normal((LLAMA31_TINY["hidden_size"],)))
    out = model.logits(continuous_forward(bumped, mx.array(ids)[None], mask))
    assert max_diff(out[:, :second - 1], base[:, :second - 1]) == 0.0
    assert float(mx.abs(out[0, second:] - base[0, second:]).max(axis=-1).min()) > 1e-3
    # Pause mode (latents stay token embeddings) agrees before the first latent, differs from it on.
    pause = model.logits(continuous_forward(model, mx.array(ids)[None], mask, feedback=False))
    assert rel_diff(pause[:, :first], base[:, :first]) < RTOL
    assert float(mx.abs(pause[0, first:] - base[0, first:]).max(axis=-1).min()) > 1e-3
    assert rel_diff(pause, model(mx.array(ids)[None])) < RTOL


# ---------------------------------------------------------------- 5. generation

def naive_generate(model, prompt, eos_ids, max_tokens):
    """The official generate: bs=1, no cache, the whole sequence recomputed for every new token."""
    embeds = naive_hidden_embeds(model, prompt)
    out = []
    for _ in range(max_tokens):
        token = int(mx.argmax(model.logits(model.hidden_states(input_embeddings=embeds)[0, -1])))
        if token in eos_ids:
            return out, True
        out.append(token)
        embeds = mx.concatenate([embeds, model.embed(mx.array([[token]]))], axis=1)
    return out, False


def naive_hidden_embeds(model, ids):
    embeds = model.embed(mx.array(ids)[None])
    for t in [i for i, x in enumerate(ids) if x == LATENT]:
        h = model.hidden_states(input_embeddings=embeds[:, :t])[:, -1:]
        embeds = mx.concatenate([embeds[:, :t], h, embeds[:, t + 1:]], axis=1)
    return embeds


def test_batched_cached_generation_matches_bs1_and_no_cache_reference():
    model = tiny_model(seed=5)
    rng = np.random.default_rng(5)
    prompts = [make_example(q, n, 1, rng)[2] for q, n in [(4, 1), (9, 3), (6, 0), (7, 2)]]
    max_tokens = 8
    never = [EOS]  # the random model does not produce it in 8 steps (checked below)
    alone = [generate(model, [p], LATENT, never, max_tokens, pad_id=PAD) for p in prompts]
    for p, g in zip(prompts, alone):
        assert (g.tokens[0], g.finished[0]) == naive_generate(model, p, never, max_tokens)
        assert len(g.tokens[0]) == max_tokens
    batch = generate(model, prompts, LATENT, never, max_tokens, pad_id=PAD, return_thoughts=True)
    assert batch.tokens == [g.tokens[0] for g in alone]
    assert batch.thought_mask.sum(axis=1).tolist() == [1, 3, 0, 2]

    # EOS per row: pick a token some row first emits at step >= 2 while another row never emits it.
    seqs = batch.tokens
    eos, row = next((t, r) for r, s in enumerate(seqs) for t in s[2:max_tokens - 1]
                    if any(t not in o for o in seqs))
    stopped = generate(model, prompts, LATENT, [eos], max_tokens, pad_id=PAD)
    for s, toks, fin, p in zip(seqs, stopped.tokens, stopped.finished, prompts):
        expect = s[:s.index(eos)] if eos in s else s
        assert toks == expect and fin == (eos in s)
        assert (toks, fin) == naive_generate(model, p, [eos], max_tokens)
    assert stopped.finished[row] and not all(stopped.finished)
