"""exp, SiLU, softmax and attention for MLX's CPU backend, written as plain elementwise ops that
mx.compile fuses into one vectorised loop.

The Linux CPU wheel evaluates `mx.exp` / `mx.sigmoid` / the softmax one element at a time (a scalar
polynomial calling libm's `fmaf`), a large share of a training step (docs/performance.md). The Cephes
`expf` range reduction and polynomial below, built from multiply-adds and one bit shift, compiles to
a loop the C++ compiler vectorises and is more accurate than the wheel's exp. On a GPU the native ops
are used: there they are already fast, and the bit trick assumes fp32."""

import mlx.core as mx
import mlx.nn as nn

LOG2E = 1.4426950408889634
LN2_HI, LN2_LO = 0.693359375, -2.12194440e-4  # ln 2 split so that n * LN2_HI is exact
# e^x is 0 below this (4e-31): divided by a softmax's sum or scaled by a loss gradient it would become
# a denormal float, which Intel CPUs multiply two orders of magnitude slower inside sgemm (masked
# attention scores alone filled half of every attention matrix with them)
FLUSH_BELOW = -70.0
EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
            5.0000001201e-1)  # Cephes expf: e^r ≈ 1 + r + r² · P(r) for |r| ≤ ln2 / 2


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu


def _takes(x: mx.array) -> bool:
    """Whether x gets the CPU versions below (fp32 on the CPU; MLX's own ops otherwise)."""
    return on_cpu() and x.dtype == mx.float32


def cephes_exp(x: mx.array) -> mx.array:
    """e^x in fp32: x = n ln2 + r, e^r by the polynomial, 2^n written into the exponent bits. Inputs
    are clipped to [-87.3, 88.3] so 2^n stays a normal number, and x < FLUSH_BELOW gives exactly 0
    (no sum, softmax or gradient in fp32 training can tell e^-70 from 0)."""
    c = mx.clip(x, -87.3, 88.3)
    n = mx.floor(c * LOG2E + 0.5)
    r = c - n * LN2_HI - n * LN2_LO
    p = EXP_POLY[0]
    for coefficient in EXP_POLY[1:]:
        p = p * r + coefficient
    two_n = mx.left_shift(n.astype(mx.int32) + 127, 23).view(mx.float32)
    return mx.where(x < FLUSH_BELOW, 0.0, (p * (r * r) + r + 1.0) * two_n)


def exp(x: mx.array) -> mx.array:
    return cephes_exp(x) if _takes(x) else mx.exp(x)


def _sigmoid(x):
    return 1.0 / (1.0 + cephes_exp(-x))


@mx.custom_function
def _cpu_silu(x):
    return x * _sigmoid(x)


@_cpu_silu.vjp
def _cpu_silu_vjp(primals, cotangent, output):
    x = primals[0] if isinstance(primals, (list, tuple)) else primals
    s = _sigmoid(x)
    return (cotangent * s * (1.0 + x * (1.0 - s)),)


_fused_cpu_silu = mx.compile(_cpu_silu)  # one kernel when called eagerly too (decoding)


def silu(x: mx.array) -> mx.array:
    return _fused_cpu_silu(x) if _takes(x) else nn.silu(x)


@mx.custom_function
def _cpu_softmax(x):
    e = cephes_exp(x - mx.stop_gradient(x.max(axis=-1, keepdims=True)))
    return e / e.sum(axis=-1, keepdims=True)


@_cpu_softmax.vjp
def _cpu_softmax_vjp(primals, cotangent, output):
    return (output * (cotangent - (cotangent * output).sum(axis=-1, keepdims=True)),)


def softmax(x: mx.array) -> mx.array:
    """Softmax over the last axis (fp32 in, fp32 out on the CPU)."""
    return _cpu_softmax(x) if _takes(x) else mx.softmax(x, axis=-1, precise=True)


def attention(q, k, v, scale: float, mask):
    """mx.fast.scaled_dot_product_attention (GQA: fewer kv heads, not repeated; mask None, "causal"
    or boolean, True = attend), with the softmax above on the CPU, where MLX's own attention is the
    same matmuls around a scalar-exp softmax. Single-query steps (decoding) keep MLX's kernel: their
    softmax is tiny and their shapes change every token."""
    B, n_q, L, D = q.shape
    if L == 1 or not _takes(q):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    n_kv, S = k.shape[1], k.shape[2]
    q = (q * scale).reshape(B, n_kv, n_q // n_kv, L, D)
    scores = q @ k[:, :, None].swapaxes(-1, -2)  # [B, n_kv, n_q / n_kv, L, S]
    if isinstance(mask, str):  # "causal": the last L of S positions are the queries
        mask = mx.arange(S - L, S)[:, None] >= mx.arange(S)[None]
    if mask is not None:
        mask = mask[:, :, None] if mask.ndim == 4 else mask  # [B, 1, L, S] -> per kv head group
        scores = mx.where(mask, scores, mx.finfo(mx.float32).min)
    return (softmax(scores) @ v[:, :, None]).reshape(B, n_q, L, D)
