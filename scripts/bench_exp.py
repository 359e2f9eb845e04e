"""The CPU exp (mlx_coconut.fastexp) vs MLX's own exp / sigmoid: the ops alone, then whole training
steps (stage 0 and stage 1 on GSM8k, as bench_torch.py builds them), alternating in one process.

The "MLX ops" side is the same model and Stepper with `fastexp.on_cpu` answering False while its
steps are traced, so its compiled graphs use mx.exp / nn.silu, as the product did before fastexp.
The "no flush" side traces ours with `fastexp.FLUSH_BELOW` at -inf (e^x never 0: masked attention
scores give ~1e-38, as fastexp did before the flush); with it, sgemm on denormal operands alone.
Prints each ratio (their time / ours) and how far the losses and gradients moved.

    python scripts/bench_exp.py [--model DIR] [--repeats 3]
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def time_op(f, x, n: int = 20) -> float:
    import mlx.core as mx

    t = time.perf_counter()
    for _ in range(n):
        mx.eval(f(x))
    return (time.perf_counter() - t) / n


def ops(repeats: int):
    """exp and SiLU over one MLP activation's worth of elements (8 x 150 positions x 1536)."""
    import mlx.core as mx
    import mlx.nn as nn

    from mlx_coconut import fastexp

    x = mx.random.normal((1200, 1536)) * 3
    mx.eval(x)
    fns = {"exp ours": mx.compile(fastexp.cephes_exp), "exp mlx": mx.compile(mx.exp),
           "silu ours": mx.compile(fastexp.silu), "silu mlx": mx.compile(nn.silu)}
    import bench_common as bc

    runs = bc.alternate({k: (lambda f: lambda: time_op(f, x))(f) for k, f in fns.items()}, repeats,
                        log=False)
    for op in ("exp", "silu"):
        ratio = bc.paired_ratio(runs[f"{op} mlx"], runs[f"{op} ours"])
        print(f"  {op:5s} over {x.size / 1e6:.2f}M elements: ours {bc.median(runs[f'{op} ours']) * 1e3:.2f} ms, "
              f"MLX {bc.median(runs[f'{op} mlx']) * 1e3:.2f} ms")
        print(f"RATIO {op}: mlx/ours time = {ratio:.3f}")


def denormal_sgemm(repeats: int):
    """The CPU's price for denormal floats: one MLP matmul with a normal operand and with the same
    operand scaled into the denormal range (zero on some CPUs, two orders of magnitude on others)."""
    import mlx.core as mx

    import bench_common as bc

    a, b = mx.random.normal((1200, 576)), mx.random.normal((576, 1536))
    tiny = a * 1e-40
    mx.eval(a, b, tiny)
    runs = bc.alternate({"normal": lambda: time_op(lambda x: x @ b, a, 3),
                         "denormal": lambda: time_op(lambda x: x @ b, tiny, 3)}, repeats, log=False)
    flops = 2 * 1200 * 576 * 1536
    print(f"  sgemm 1200x576x1536: {flops / bc.median(runs['normal']) / 1e9:.1f} GFLOP/s, with a denormal "
          f"operand {flops / bc.median(runs['denormal']) / 1e9:.1f}")
    print(f"RATIO sgemm: denormal/normal time = {bc.paired_ratio(runs['denormal'], runs['normal']):.3f}")


def steps(model_path, repeats: int, batch_size: int):
    import mlx.core as mx
    from mlx.utils import tree_flatten

    import bench_common as bc
    from bench_torch import gsm8k_batches
    from mlx_coconut import fastexp
    from mlx_coconut.training import Stepper

    model, _, _, batches = gsm8k_batches(model_path, batch_size)
    steppers = {side: Stepper(model, feedback=True, use_compile=True) for side in ("ours", "mlx", "no flush")}
    native, flush = fastexp.on_cpu, fastexp.FLUSH_BELOW

    def run(side, name):
        # both are read while tracing
        fastexp.on_cpu = (lambda: False) if side == "mlx" else native
        fastexp.FLUSH_BELOW = -float("inf") if side == "no flush" else flush
        try:
            t = time.perf_counter()
            loss, _, grads = steppers[side](batches[name])
            mx.eval(loss, grads)
            dt = time.perf_counter() - t
        finally:
            fastexp.on_cpu, fastexp.FLUSH_BELOW = native, flush
        flat = [g.astype(mx.float32) for _, g in tree_flatten(grads)]
        return {"s": dt, "loss": loss.item(), "grads": flat}

    fns = {f"{side} {name}": (lambda s, n: lambda: run(s, n))(side, name)
           for name in batches for side in steppers}
    runs = bc.alternate(fns, repeats, log=False)
    result = {}
    for name, b in batches.items():
        o, m, nf = runs[f"ours {name}"], runs[f"mlx {name}"], runs[f"no flush {name}"]
        loss_rel = abs(o[-1]["loss"] - m[-1]["loss"]) / abs(m[-1]["loss"])
        gdiff = max(mx.abs(a - c).max().item() / max(mx.abs(c).max().item(), 1e-30)
                    for a, c in zip(o[-1]["grads"], m[-1]["grads"]))
        print(f"  {name} ({b['input_ids'].shape[0]} x {b['input_ids'].shape[1]}): ours "
              f"{bc.median(o, 's'):.2f} s/step (best {min(x['s'] for x in o):.2f}), MLX ops "
              f"{bc.median(m, 's'):.2f} s (best {min(x['s'] for x in m):.2f}); loss rel diff "
              f"{loss_rel:.1e}, largest gradient "
              f"diff / its tensor's max {gdiff:.1e}")
        ratio = bc.paired_ratio(m, o, "s")
        print(f"RATIO {name}: mlx/ours time = {ratio:.3f}")
        flush_ratio = bc.paired_ratio(nf, o, "s")
        print(f"  {name} without the flush: {bc.median(nf, 's'):.2f} s/step")
        print(f"RATIO {name}: no-flush/ours time = {flush_ratio:.3f}")
        result[name] = {"ratio": ratio, "gradient_diff": gdiff, "loss_rel": loss_rel, "flush_ratio": flush_ratio}
    return result


def main(argv=None):
    import bench_common as bc

    p = bc.parser(__doc__.splitlines()[0], repeats=3)
    p.add_argument("--batch-size", type=int, default=8, help="GSM8k records in the batch")
    args = p.parse_args(argv)
    bc.header("bench_exp: our CPU exp / SiLU vs MLX's, ops and training steps")
    ops(args.repeats * 2)
    denormal_sgemm(args.repeats)
    return steps(bc.resolve_model(args.model), args.repeats, args.batch_size)


if __name__ == "__main__":
    main()
