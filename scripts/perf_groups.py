"""Group a `perf record` CPU profile of an MLX process by kind of work (MLX has no CPU op profiler).

    perf record -e cpu-clock -F 999 -g -k CLOCK_MONOTONIC -o perf.data -- \
        python scripts/bench_torch.py --ours-only 3
    python scripts/perf_groups.py perf.data --time T0,T1 [--top 25]   # T0,T1: the printed window

Reads `perf report --no-children --sort dso,sym` and sums the samples into: BLAS (the preloaded
library's sgemm kernels), MLX kernels by name (elementwise, reductions/softmax, copies/gathers, rope,
compiled fused kernels, ...), Python, the kernel (page faults, scheduling) and libc (memcpy/memset).
Shares are of all samples of all threads (2 cores: up to 2 samples per tick).
"""

import argparse
import re
import subprocess
import sys
from collections import defaultdict

GROUPS = (  # (group, dso regex, symbol regex), first match wins
    ("BLAS sgemm (OpenBLAS/MKL/BLIS/reference)", r"openblas|mkl|blis|libblas|libiomp|libgomp", r""),
    ("MLX matmul glue", r"libmlx", r"(?i)matmul|gemm|blas"),
    ("MLX softmax / reductions", r"libmlx", r"(?i)softmax|reduce|logsumexp|arg_?max|sum"),
    ("MLX rope", r"libmlx", r"(?i)rope"),
    ("MLX copy / gather / scatter / slice", r"libmlx", r"(?i)copy|gather|scatter|slice|concat|pad|transpose"),
    ("MLX elementwise (binary/unary/ternary)", r"libmlx", r"(?i)binary|unary|ternary|select|where|"
                                                          r"vectorize|simd|_op|operator|erf|exp|sigmoid"),
    ("MLX compiled (fused) kernels", r"compiled|\.so$", r"(?i)compiled|fused"),
    ("MLX other (scheduler, graph, allocator)", r"libmlx|core\.cpython", r""),
    ("Python interpreter", r"python|libpython", r""),
    ("kernel (page faults, scheduling)", r"kernel|\[k", r""),
    ("libc / libstdc++ (memcpy, memset, malloc)", r"libc|libstdc\+\+|libm\.", r""),
)


def rows(perf_data: str, window=None):
    """(percent, dso, symbol) per line of perf report."""
    out = subprocess.run(["perf", "report", "-i", perf_data, "--no-children", "--sort", "dso,sym",
                          "--stdio", "-g", "none", "--percent-limit", "0"]
                         + (["--time", window] if window else []),
                         capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(\S+)\s+\[.\]\s+(.*)", line)
        if m:
            yield float(m.group(1)), m.group(2), m.group(3).strip()


def group_of(dso: str, sym: str) -> str:
    for name, dso_re, sym_re in GROUPS:
        if re.search(dso_re, dso) and (not sym_re or re.search(sym_re, sym)):
            return name
    return "other: " + dso


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("perf_data")
    p.add_argument("--time", default=None, metavar="T0,T1",
                   help="only samples in this window (seconds, as printed by --ours-only)")
    p.add_argument("--top", type=int, default=20, help="also list this many top symbols")
    args = p.parse_args(argv)
    try:
        data = list(rows(args.perf_data, args.time))
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"error: perf report -i {args.perf_data} failed: {e}", file=sys.stderr)
        raise SystemExit(2)
    groups = defaultdict(float)
    for pct, dso, sym in data:
        groups[group_of(dso, sym)] += pct
    print(f"{'group':45s} share of samples")
    for g, pct in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  {g:43s} {pct:6.1f}%")
    print(f"top {args.top} symbols:")
    for pct, dso, sym in sorted(data, reverse=True)[:args.top]:
        print(f"  {pct:5.1f}%  {dso:24s} {sym[:110]}")
    return dict(groups)


if __name__ == "__main__":
    main()
