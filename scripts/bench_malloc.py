"""Freed memory kept for reuse (mlx_coconut/malloc.py) vs glibc's defaults: whole training steps.

Each side runs in a child process of its own (malloc settings are per process), the two alternating:
"kept" as `import mlx_coconut` sets it up, "system" with MLX_COCONUT_MALLOC=system. A child times
full optimizer steps — loss, gradients and the AdamW update, as `mlx-coconut train` runs them — on
the GSM8k batches bench_torch.py builds (stage 0 and stage 1), and counts the minor page faults of the
timed steps. Prints per-step times, faults and peak RSS, and the ratio system / kept.

    python scripts/bench_malloc.py [--model DIR] [--repeats 3] [--steps 6]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SIDES = {"kept": {}, "system": {"MLX_COCONUT_MALLOC": "system"}}


def child(model_path, batch_size: int, steps: int):
    """Time `steps` full training steps per stage after one warm-up step; print one JSON line."""
    import mlx.core as mx

    from bench_torch import gsm8k_batches, train_update
    from mlx_coconut import malloc
    from mlx_coconut.training import Stepper

    model, _, _, batches = gsm8k_batches(model_path, batch_size)
    optimizer, update = train_update(model)
    stepper = Stepper(model, feedback=True, use_compile=True)
    out = {"kept": malloc.STATE["kept"]}
    for name, batch in batches.items():
        times, faults = [], 0
        for i in range(steps + 1):
            f0, t = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            loss, _, grads = stepper(batch)
            update(grads, 1.0)
            mx.eval(loss, model.parameters(), optimizer.state)
            if i:  # the first step traces and compiles
                times.append(time.perf_counter() - t)
                faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
        out[name] = {"s": sorted(times)[len(times) // 2], "faults_per_step": faults / steps, "loss": loss.item()}
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print("RESULT " + json.dumps(out))


def run_side(side: str, args) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "MLX_COCONUT_MALLOC"}
    cmd = [sys.executable, __file__, "--child", "--model", str(args.model), "--batch-size", str(args.batch_size),
           "--steps", str(args.steps)]
    out = subprocess.run(cmd, env={**env, **SIDES[side]}, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"bench_malloc: the {side} child failed:\n{out.stderr[-2000:]}")
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main(argv=None):
    import bench_common as bc

    p = bc.parser(__doc__.splitlines()[0], repeats=3)
    p.add_argument("--batch-size", type=int, default=8, help="GSM8k records in the batch")
    p.add_argument("--steps", type=int, default=6, help="timed steps per stage in each child")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.model = bc.resolve_model(args.model)
    if args.child:
        return child(args.model, args.batch_size, args.steps)
    bc.header("bench_malloc: freed memory kept for reuse vs glibc's defaults, whole training steps", args)
    runs = bc.alternate({side: (lambda s: lambda: run_side(s, args))(side) for side in SIDES}, args.repeats,
                        warmup=False, log=False)
    if not runs["kept"][0]["kept"] or runs["system"][0]["kept"]:
        raise SystemExit("bench_malloc: the two sides did not get the two settings (is this Linux with glibc?)")
    result = {"peak_rss_gb": {side: max(r["peak_rss_gb"] for r in runs[side]) for side in SIDES}}
    stages = [k for k in runs["kept"][0] if isinstance(runs["kept"][0][k], dict)]
    for name in stages:
        kept, system = ([r[name] for r in runs[side]] for side in SIDES)
        ratio = bc.paired_ratio(system, kept, "s")
        print(f"  {name}: kept {bc.median(kept, 's'):.3f} s/step, {bc.median(kept, 'faults_per_step'):.0f} "
              f"page faults/step; system {bc.median(system, 's'):.3f} s/step, "
              f"{bc.median(system, 'faults_per_step'):.0f} faults/step; loss {kept[-1]['loss']:.6f} vs "
              f"{system[-1]['loss']:.6f}")
        print(f"RATIO {name}: system/kept time = {ratio:.3f}")
        result[name] = {"ratio": ratio, "loss_rel": abs(kept[-1]["loss"] - system[-1]["loss"]) / abs(system[-1]["loss"]),
                        "faults": {"kept": bc.median(kept, "faults_per_step"),
                                   "system": bc.median(system, "faults_per_step")}}
    print(f"  peak RSS: kept {result['peak_rss_gb']['kept']:.2f} GB, system {result['peak_rss_gb']['system']:.2f} GB")
    return result


if __name__ == "__main__":
    main()
