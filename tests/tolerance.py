"""Float comparisons relative to the magnitudes compared.

Two fp32 computations of the same quantity in a different order (chunked vs whole, cached vs full,
two BLAS kernels) differ by a few ulps of the values summed, so an absolute bound such as 1e-6 passes
on one CPU and fails on another. Here the error is measured against the size of what is compared:
max |a - b| / max(|a|, |b|). RTOL is ~100x fp32 epsilon: loose enough for any summation order on
x86-64/arm64 BLAS, tight enough that a real bug (a wrong mask, a missing term) is orders above it.
"""

import mlx.core as mx
import numpy as np

RTOL = 1e-5


def _np(x):
    if isinstance(x, mx.array):
        x = x.astype(mx.float32) if x.dtype != mx.float32 else x
    return np.asarray(x, dtype=np.float64)


def rel_diff(a, b) -> float:
    """max |a - b| relative to the largest magnitude in a or b (0 when both are all zeros)."""
    a, b = _np(a), _np(b)
    scale = max(np.abs(a).max(initial=0.0), np.abs(b).max(initial=0.0))
    diff = np.abs(a - b).max(initial=0.0)
    return float(diff / scale) if scale > 0 else float(diff)


def tree_rel_diff(a: dict, b: dict) -> float:
    """The worst rel_diff over a gradient tree (flat dicts with the same keys). Each tensor is judged
    against its own magnitude, floored at 1e-3 of the tree's largest, so that a parameter whose
    gradient is ~0 is not judged on rounding noise alone."""
    assert a.keys() == b.keys()
    mags = {k: max(np.abs(_np(a[k])).max(initial=0.0), np.abs(_np(b[k])).max(initial=0.0)) for k in a}
    floor = 1e-3 * max(mags.values(), default=0.0)
    worst = 0.0
    for k in a:
        diff = np.abs(_np(a[k]) - _np(b[k])).max(initial=0.0)
        scale = max(mags[k], floor)
        worst = max(worst, float(diff / scale) if scale > 0 else float(diff))
    return worst


def close(a, b, rtol: float = RTOL) -> bool:
    return rel_diff(a, b) <= rtol
