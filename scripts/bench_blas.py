"""BLAS choice for MLX on a Linux CPU: fp32 matmul GFLOP/s and a full training step per library.

The Linux MLX wheel calls `cblas_sgemm`, resolved to its bundled reference BLAS unless another
library is loaded first (`mlx_coconut/blas.py`). One worker process per library, with
`MLX_COCONUT_BLAS` set to its path or name (or `reference`) plus thread settings, imports
mlx_coconut, which loads it as every entry point does. All are started first, then asked in turn
(A B C, C B A, ...) for the GFLOP/s of the matmul shapes of a SmolLM2 training step (the Linear
forward `x @ W.T`, its input gradient `dy @ W` and weight gradient `dy.T @ x`, and the chunked
output head) and for one full-weight stage-0 fwd+bwd step of 8 GSM8k records (`training.Stepper`,
compiled, as in bench_torch.py). Results are checked against the first library's (matmul checksum,
loss). Default libraries: the reference BLAS and whatever of the system's OpenBLAS, OpenBLAS from
PyPI (`ngsolve-openblas`), MKL (the `mkl` wheel) and BLIS is found (`mlx_coconut.blas.candidates`).

    python scripts/bench_blas.py --repeats 3
    python scripts/bench_blas.py --lib openblas-1t=/usr/lib/x86_64-linux-gnu/libopenblas.so.0,OPENBLAS_NUM_THREADS=1
    python scripts/bench_blas.py --no-step --lib reference= --lib pypi=openblas-pypi --lib system=$OB
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# (M, N, K) of C[M, N] = A[M, K] @ B[K, N]; T = 8 x 160 training positions, SmolLM2's 576 / 1536
T, D, F = 1280, 576, 1536
SHAPES = {
    "x@W.T  1280x1536x576": (T, F, D, "nt"),   # gate/up projection forward
    "dy@W   1280x576x1536": (T, D, F, "nn"),   # its input gradient
    "dy.T@x 1536x576x1280": (F, D, T, "tn"),   # its weight gradient
    "x@W.T  1280x576x576": (T, D, D, "nt"),    # q / o projection
    "head   512x49155x576": (512, 49155, D, "nt"),  # one loss chunk of the tied head
    "square 2048^3": (2048, 2048, 2048, "nn"),
}


def operands(m, n, k, layout):
    import mlx.core as mx
    a = mx.random.normal((k, m) if layout[0] == "t" else (m, k), key=mx.random.key(1)) / 8
    b = mx.random.normal((n, k) if layout[1] == "t" else (k, n), key=mx.random.key(2)) / 8
    mx.eval(a, b)
    return (a.T if layout[0] == "t" else a), (b.T if layout[1] == "t" else b)


def gemm_rates(shapes, min_time=0.2):
    """GFLOP/s of each shape: repeat until min_time seconds, after one warm-up; plus a checksum."""
    import mlx.core as mx
    out = {}
    for name, (m, n, k, layout) in shapes.items():
        a, b = operands(m, n, k, layout)
        c = a @ b
        mx.eval(c)
        reps, t0 = 0, time.perf_counter()
        while True:
            mx.eval(a @ b)
            reps += 1
            dt = time.perf_counter() - t0
            if dt >= min_time:
                break
        out[name] = {"gflops": 2 * m * n * k * reps / dt / 1e9, "sum": float(mx.abs(c).sum().item())}
    return out


def worker(model_dir, batch_size, with_step):
    """Serve JSON-line requests ("gemm", "step") in a process whose MLX_COCONUT_BLAS picks the BLAS."""
    from mlx_coconut import blas  # before mlx.core: loads the library
    import mlx.core as mx

    if blas.STATE["warning"]:
        raise SystemExit(1)  # the library did not load (the line above says why)
    reply, sys.stdout = sys.stdout, sys.stderr
    step = None
    if with_step:
        from bench_torch import gsm8k_batches
        from mlx_coconut.training import Stepper
        model, _, _, batches = gsm8k_batches(Path(model_dir), batch_size, stages={"stage 0": (0, 1)})
        stepper, batch = Stepper(model, feedback=True, use_compile=True), batches["stage 0"]

        def step():
            t = time.perf_counter()
            loss, ntoks, grads = stepper(batch)
            mx.eval(loss, ntoks, grads)
            return {"s": time.perf_counter() - t, "loss": loss.item()}
        step()  # compile
    for line in sys.stdin:
        req = json.loads(line)
        if req["cmd"] == "gemm":
            out = gemm_rates({k: SHAPES[k] for k in req["shapes"]})
        else:
            out = step() if step else {}
        reply.write(json.dumps(out) + "\n")
        reply.flush()


def default_libs():
    from mlx_coconut import blas
    libs = {"reference": ("", {})}
    for name, path in blas.candidates().items():
        libs[name] = (path, {})
    return libs


def parse_lib(spec):
    """NAME=PATH[,VAR=VALUE...] → (name, (path, env)); PATH may be a name from blas.candidates()."""
    name, _, rest = spec.partition("=")
    path, *envs = rest.split(",")
    from mlx_coconut import blas
    if not name or (path and not os.path.exists(path) and path not in blas.candidates()):
        print(f"error: --lib {spec}: expected NAME=PATH[,VAR=VALUE...] with an existing PATH or the "
              f"name of an installed library ({', '.join(blas.candidates()) or 'none'})",
              file=sys.stderr)
        raise SystemExit(2)
    return name, (path, dict(e.split("=", 1) for e in envs))


class Worker:
    def __init__(self, path, env, model_dir, batch_size, with_step):
        env = {**{k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}, **env,
               "MLX_COCONUT_BLAS": path or "reference"}
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", str(model_dir), str(batch_size), str(int(with_step))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def __call__(self, cmd, **kw):
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"error: a BLAS worker exited (code {self.proc.wait()}); see above")
        return json.loads(line)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def main(argv=None):
    import bench_common as bc

    p = bc.parser(__doc__.splitlines()[0], repeats=3)
    p.add_argument("--lib", action="append", default=None, metavar="NAME=PATH[,VAR=VAL...]",
                   help="a library to load (empty PATH: the bundled reference BLAS), with extra "
                   "environment variables; repeatable [default: every library found]")
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated names from: "
                   + ", ".join(SHAPES))
    p.add_argument("--batch-size", type=int, default=8, help="GSM8k records in the step's batch")
    p.add_argument("--no-step", action="store_true", help="matmuls only")
    p.add_argument("--reference-shapes", default="x@W.T  1280x576x576",
                   help="the only shapes (comma-separated) timed on the slow reference BLAS, which "
                   "also skips the training step")
    args = p.parse_args(argv)
    libs = dict(parse_lib(s) for s in args.lib) if args.lib else default_libs()
    shapes = [s.strip() for s in args.shapes.split(",")]
    ref_shapes = [s.strip() for s in args.reference_shapes.split(",")]
    for s in shapes + ref_shapes:
        if s not in SHAPES:
            print(f"error: --shapes: unknown shape {s!r} (known: {', '.join(SHAPES)})", file=sys.stderr)
            raise SystemExit(2)

    bc.header("bench_blas: MLX fp32 matmuls and a training step per BLAS library")
    model_dir = bc.resolve_model(args.model)
    for name, (path, env) in libs.items():
        extra = " ".join(f"{k}={v}" for k, v in env.items())
        print(f"  {name}: {path or '(bundled reference BLAS)'} {extra}")
    workers = {name: Worker(path, env, model_dir, args.batch_size, bool(path) and not args.no_step)
               for name, (path, env) in libs.items()}
    own = {name: (ref_shapes if not path else shapes) for name, (path, _) in libs.items()}

    fns = {}
    for name, w in workers.items():
        def f(w=w, name=name):
            r = w("gemm", shapes=own[name])
            if libs[name][0] and not args.no_step:
                r["step"] = w("step")
            return r
        fns[name] = f
    runs = bc.alternate(fns, args.repeats, warmup=False, log=False)
    for w in workers.values():
        w.close()

    names = list(libs)
    ref = next((n for n in names if libs[n][0]), names[0])
    print(f"GFLOP/s (median of {args.repeats} alternating rounds; sums vs {ref}):")
    print("  " + f"{'shape':22s}" + "".join(f"{n:>14s}" for n in names))
    result = {}
    for s in shapes:
        row = []
        for n in names:
            if s not in runs[n][0]:
                row.append(f"{'-':>14s}")
                continue
            g = bc.median([r[s]["gflops"] for r in runs[n]])
            result.setdefault(n, {})[s] = g
            base = runs[ref][0].get(s, {}).get("sum")
            rel = abs(runs[n][0][s]["sum"] - base) / base if base else 0.0
            row.append(f"{g:10.1f}{'' if rel < 1e-4 else ' (!)':>4s}")
        print("  " + f"{s:22s}" + "".join(row))
    if not args.no_step:
        print(f"training step, stage 0, full weights, {args.batch_size} GSM8k records "
              f"(median s; loss):")
        base = runs[ref][0].get("step")
        for n in names:
            if "step" not in runs[n][0]:
                continue
            s = bc.median([r["step"]["s"] for r in runs[n]])
            loss = runs[n][-1]["step"]["loss"]
            rel = abs(loss - base["loss"]) / abs(base["loss"])
            ratio = bc.paired_ratio([r["step"] for r in runs[n]], [r["step"] for r in runs[ref]], "s")
            print(f"  {n:14s} {s:7.2f} s  x{ratio:.3f} vs {ref}  loss {loss:.5f} (rel diff {rel:.1e})")
            result.setdefault(n, {})["step"] = s
    return result


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1")
    else:
        main()
