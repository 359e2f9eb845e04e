"""The CPU exp and SiLU (mlx_coconut.fastexp): the same values and gradients as float64 references,
compiled or not; other dtypes and devices keep MLX's own ops."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_coconut import fastexp


def _rel(a, b):
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-30)))


@pytest.mark.parametrize("compiled", [False, True])
def test_exp_matches_float64(compiled):
    x = np.concatenate([np.linspace(fastexp.FLUSH_BELOW, 88, 200_001), [0.0, -1e-8, 1e-8, 0.5 * np.log(2)]])
    f = mx.compile(fastexp.cephes_exp) if compiled else fastexp.cephes_exp
    got = np.array(f(mx.array(x, dtype=mx.float32))).astype(np.float64)
    want = np.exp(np.array(x, dtype=np.float32).astype(np.float64))  # of the fp32 inputs
    assert _rel(got, want) < 1e-6  # fp32 rounding is 6e-8


def test_exp_extremes_stay_finite():
    got = np.array(fastexp.cephes_exp(mx.array([-1e4, -200.0, 200.0, 1e4])))
    assert np.all(np.isfinite(got)) and got[0] == 0 and got[1] == 0 and got[2] > 1e38


def _denormals(a) -> int:
    a = np.abs(np.array(a, dtype=np.float32))
    return int(((a > 0) & (a < np.finfo(np.float32).tiny)).sum())


def test_no_denormals_from_masks_or_far_tails():
    """Masked attention scores and far logit tails give exact zeros, never denormal floats (which
    Intel CPUs multiply far slower inside sgemm); x just below the flush gives 0, just above e^x."""
    below, above = fastexp.FLUSH_BELOW - 1e-3, fastexp.FLUSH_BELOW + 1e-3
    got = np.array(fastexp.cephes_exp(mx.array([below, above, -86.0, -87.2, -88.0])))
    assert got[0] == 0 and got[2:].tolist() == [0, 0, 0] and abs(got[1] / np.exp(np.float64(above)) - 1) < 1e-6
    rng = np.random.default_rng(4)
    B, n_q, L, D = 2, 3, 40, 8
    q, k, v = (mx.array(rng.normal(0, 1, (B, n_q, L, D)), dtype=mx.float32) for _ in range(3))
    out = fastexp.attention(q, k, v, D ** -0.5, "causal")
    grads = mx.grad(lambda q, k, v: fastexp.attention(q, k, v, D ** -0.5, "causal").sum(),
                    argnums=(0, 1, 2))(q, k, v)
    scores = mx.where(mx.tril(mx.ones((L, L))) > 0, mx.array(rng.normal(0, 1, (L, L)), dtype=mx.float32),
                      mx.finfo(mx.float32).min)
    probs = fastexp.softmax(scores)
    assert (probs * (mx.tril(mx.ones((L, L))) == 0)).abs().max().item() == 0  # masked: exactly 0
    # logits spread over 90 nats: the tails' probabilities, and their gradients at a loss scale of 2.5e-4
    from mlx_coconut.coconut import cross_entropy
    logits = mx.array(np.linspace(-90, 0, 1000)[None].repeat(4, 0), dtype=mx.float32)
    loss, ce_probs = cross_entropy(logits, mx.array([999, 998, 500, 0]))
    ce_grad = mx.grad(lambda x: cross_entropy(x, mx.array([999, 998, 500, 0]))[0].mean() * 1e-3)(logits)
    for a in (out, *grads, probs, ce_probs, ce_grad):
        assert _denormals(a) == 0


@pytest.mark.parametrize("compiled", [False, True])
def test_silu_and_gradient_match_float64(compiled):
    x64 = np.random.default_rng(0).normal(0, 4, 50_000)
    x64 = np.concatenate([x64, [-90.0, -30.0, 0.0, 30.0, 90.0]])
    x = mx.array(x64, dtype=mx.float32)
    x64 = np.array(x).astype(np.float64)
    s = 1 / (1 + np.exp(-x64))
    want, want_grad = x64 * s, s * (1 + x64 * (1 - s))
    silu = mx.compile(fastexp.silu) if compiled else fastexp.silu
    grad = mx.grad(lambda v: (fastexp.silu(v) * mx.arange(v.size)).sum())
    grad = mx.compile(grad) if compiled else grad
    got = np.array(silu(x)).astype(np.float64)
    assert np.max(np.abs(got - want)) <= 1e-6 * np.max(np.abs(want))
    got_grad = np.array(grad(x)).astype(np.float64)
    scale = np.arange(x64.size)
    assert np.max(np.abs(got_grad - want_grad * scale)) <= 1e-6 * np.max(np.abs(want_grad * scale))


def test_other_dtypes_and_devices_use_mlx_ops(monkeypatch):
    x = mx.array(np.linspace(-6, 6, 101), dtype=mx.bfloat16)
    assert mx.array_equal(fastexp.silu(x), nn.silu(x)) and mx.array_equal(fastexp.exp(x), mx.exp(x))
    monkeypatch.setattr(fastexp, "on_cpu", lambda: False)  # what a GPU run takes
    x = mx.array(np.linspace(-6, 6, 101), dtype=mx.float32)
    assert mx.array_equal(fastexp.silu(x), nn.silu(x)) and mx.array_equal(fastexp.exp(x), mx.exp(x))


@pytest.mark.parametrize("layout", ["causal", "cached", "left-pad", "none"])
def test_attention_matches_mlx_kernel(layout):
    from mlx_coconut.model import attention_mask

    rng = np.random.default_rng(1)
    B, n_q, n_kv, L, D = 2, 6, 2, 5, 16
    offset = 0 if layout in ("causal", "left-pad") else 3
    q = mx.array(rng.normal(0, 2, (B, n_q, L, D)), dtype=mx.float32)
    k, v = (mx.array(rng.normal(0, 2, (B, n_kv, offset + L, D)), dtype=mx.float32) for _ in range(2))
    left_pad = mx.array([0, 2]) if layout == "left-pad" else None
    mask = None if layout == "none" else attention_mask(L, offset, left_pad)
    scale = D ** -0.5
    cot = mx.array(rng.normal(0, 1, (B, n_q, L, D)), dtype=mx.float32)

    def loss(fn):
        return lambda q, k, v: (fn(q, k, v) * cot).sum()
    ours = lambda q, k, v: fastexp.attention(q, k, v, scale, mask)  # noqa: E731
    ref = lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)  # noqa: E731
    for a, b in [(ours(q, k, v), ref(q, k, v))] + list(zip(
            mx.grad(loss(ours), argnums=(0, 1, 2))(q, k, v), mx.grad(loss(ref), argnums=(0, 1, 2))(q, k, v))):
        assert (mx.abs(a - b).max() / mx.abs(b).max()).item() < 1e-5


def test_softmax_and_its_gradient():
    x = mx.array(np.random.default_rng(2).normal(0, 5, (7, 300)), dtype=mx.float32)
    g = mx.array(np.random.default_rng(3).normal(0, 1, (7, 300)), dtype=mx.float32)
    for f in (fastexp.softmax, mx.compile(fastexp.softmax)):
        a, b = f(x), mx.softmax(x, axis=-1, precise=True)
        assert (mx.abs(a - b).max() / mx.abs(b).max()).item() < 1e-6
        ga = mx.grad(lambda x: (f(x) * g).sum())(x)
        gb = mx.grad(lambda x: (mx.softmax(x, axis=-1, precise=True) * g).sum())(x)
        assert (mx.abs(ga - gb).max() / mx.abs(gb).max()).item() < 1e-5
