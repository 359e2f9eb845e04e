"""Group a `perf record` CPU profile of an MLX process by kind of work (MLX has no CPU op profiler).

    perf record -e cpu-clock -F 999 -g -k CLOCK_MONOTONIC -o perf.data -- \
        python scripts/bench_torch.py --ours-only 3
    python scripts/perf_groups.py perf.data --time T0,T1 [--top 25]   # T0,T1: the printed window

Reads `perf report --no-children --sort dso,sym` and sums the samples into: BLAS (the preloaded
library's sgemm kernels), MLX kernels by name (elementwise, reductions/softmax, copies/gathers, rope,
compiled fused kernels, ...), Python, the kernel (page faults, scheduling) and libc (memcpy/memset).
Shares are of the samples of the thread that runs MLX's ops (the critical path: BLAS helper threads
only help inside sgemm, and spin or sleep otherwise).
"""

import argparse
import re
import subprocess
import sys
from collections import defaultdict

GROUPS = (  # (group, dso regex, symbol regex), first match wins
    ("BLAS sgemm (OpenBLAS/MKL/BLIS/reference)", r"openblas|mkl|blis|libblas|libiomp|libgomp", r""),
    ("MLX matmul glue", r"libmlx", r"(?i)matmul|gemm|blas"),
    ("MLX exp / sigmoid (scalar simd<float, 1>)", r"libmlx", r"(?i)simd::exp|sigmoid|simd::log"),
    ("MLX softmax / reductions", r"libmlx", r"(?i)softmax|reduce|logsumexp|arg_?max|sum"),
    ("MLX rope", r"libmlx", r"(?i)rope"),
    ("MLX copy / gather / scatter / slice", r"libmlx", r"(?i)copy|gather|scatter|slice|concat|pad|transpose"),
    ("MLX elementwise (binary/unary/ternary)", r"libmlx", r"(?i)binary|unary|ternary|select|where|"
                                                          r"vectorize|simd|_op|operator|erf|exp|sigmoid"),
    ("MLX compiled (fused) kernels", r"_(strided|contiguous)(_\d+)?\.so$", r""),
    ("MLX other (scheduler, graph, allocator)", r"libmlx|core\.cpython", r""),
    ("Python interpreter", r"python|libpython", r""),
    ("kernel (page faults, scheduling)", r"kernel|\[k", r""),
    ("libm scalar math (fmaf, powf, expf, logf)", r"libm\.", r""),
    ("libc / libstdc++ (memcpy, memset, malloc)", r"libc|libstdc\+\+", r""),
)


def rows(perf_data: str, window=None):
    """(samples, thread id, dso, symbol) per line of perf report."""
    out = subprocess.run(["perf", "report", "-i", perf_data, "--no-children", "--sort", "pid,dso,sym",
                          "-n", "--stdio", "-g", "none", "--percent-limit", "0"]
                         + (["--time", window] if window else []),
                         capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        m = re.match(r"\s*[\d.]+%\s+(\d+)\s+(\d+):\S*\s+(\S+)\s+\[.\]\s+(.*)", line)
        if m:
            yield int(m.group(1)), int(m.group(2)), m.group(3), m.group(4).strip()


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
    per_thread = defaultdict(int)
    mlx = defaultdict(int)
    for n, tid, dso, sym in data:
        per_thread[tid] += n
        if "libmlx" in dso:
            mlx[tid] += n
    # MLX runs every op of a stream on one thread: its samples are the step's critical path
    op_tid = max(mlx, key=mlx.get)
    total = per_thread[op_tid]
    print(f"threads (samples): " + ", ".join(f"{t}: {n}{' (MLX op thread)' if t == op_tid else ''}"
                                              for t, n in sorted(per_thread.items(), key=lambda kv: -kv[1])))
    groups = defaultdict(int)
    for n, tid, dso, sym in data:
        if tid == op_tid:
            groups[group_of(dso, sym)] += n
    print(f"MLX op thread, {total} samples = the step's wall time:")
    for g, n in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  {g:45s} {100 * n / total:5.1f}%")
    print(f"top {args.top} symbols of the MLX op thread:")
    top = sorted((x for x in data if x[1] == op_tid), reverse=True)[:args.top]
    for n, _, dso, sym in top:
        print(f"  {100 * n / total:5.1f}%  {dso[:40]:40s} {sym[:100]}")
    return {g: n / total for g, n in groups.items()}


if __name__ == "__main__":
    main()
