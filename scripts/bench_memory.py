"""Peak memory of one stage-1 LoRA step on a Llama-3.1-8B-shaped model (random weights).

Shape: 32 layers, hidden 4096, MLP 14336, 32 query / 8 kv heads (head_dim 128), vocab 128259 (128256
+ the 3 COCONUT tokens), llama3 rope scaling, untied head. Random weights, built lazily and
materialised one array at a time directly in the target format (bf16, or 4-bit QLoRA with bf16
scales), so no fp32 copy of the model ever exists. The step is the product's: `tokens`-style new rows
+ `adapters.apply_lora` (LoRA rank --rank on every projection, trainable latent-token rows),
`adapters.quantize_base` for QLoRA, `training.enable_grad_checkpoint` (whole blocks recomputed),
`training.Stepper` (loss+grad over `coconut.loss_fn`, its head in checkpointed chunks of --loss-chunk
positions; one latent column = 2 passes) and an AdamW update.
Peak = `mx.get_peak_memory()` over the step, weights included (reset after the weights are built).

Each measurement runs in a fresh subprocess. `--layers 2,4` builds shallower copies and extrapolates
linearly per layer to --full-layers (32); `--measure-tokens a,b` runs batch 1 with a and b tokens and
extrapolates linearly per token to --batch x --seq (for machines where the full step is too slow:
a CPU does ~5 GFLOP/s in bf16 and ~0.3 GFLOP/s in 4-bit). With both, peak is fitted as
a + b*layers + c*tokens + d*layers*tokens on the 2x2 grid. Every extrapolation is printed as such.

    # Mac (64 GB): the real thing
    python scripts/bench_memory.py --layers 32
    # this 24 GB / 2-core Linux box: shallow + short, extrapolated; 4-bit weights measured, its
    # activations taken from the bf16 step
    python scripts/bench_memory.py --layers 2,4 --measure-tokens 64,128 --qlora-from-bf16
"""

import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc  # noqa: E402

GOALS = {"qlora": 12.0, "bf16": 40.0}  # GB: 16 GB Mac, 64 GB Mac
LLAMA31_8B = {
    "model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 14336,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128259,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "tie_word_embeddings": False,
}


def build(layers: int, base: str, rank: int, shape: dict, q_bits: int = 4, group_size: int = 64):
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    from mlx_coconut import adapters
    from mlx_coconut.model import Model, ModelArgs

    args = ModelArgs.from_dict({**shape, "num_hidden_layers": layers})
    model = Model(args)  # lazy: nothing is allocated yet
    # Values do not matter for memory; a cheap deterministic pattern instead of the (slow on CPU)
    # random initialisation, created directly in bf16. Norm weights stay ones.
    fill = {k: (((mx.arange(v.size, dtype=mx.int32) * 7919) % 2003).astype(mx.bfloat16) * 1e-5
                - 0.01).reshape(v.shape) if v.ndim == 2 else mx.ones(v.shape, mx.bfloat16)
            for k, v in tree_flatten(model.parameters())}
    model.update(tree_unflatten(list(fill.items())))
    if base == "qlora":
        adapters.quantize_base(model, q_bits, group_size)
    for _, v in tree_flatten(model.parameters()):  # one array at a time: no fp32 model copy
        mx.eval(v)
    V = args.vocab_size
    new_ids = (V - 3, V - 2, V - 1)  # the 3 COCONUT tokens are the last rows
    lora = {"rank": rank, "scale": 20.0, "dropout": 0.0, "layers": 0,
            "quantization": {"bits": q_bits, "group_size": group_size} if base == "qlora" else None}
    adapters.apply_lora(model, lora, new_ids)
    mx.eval(model.parameters())
    return model, new_ids


def stage1_batch(batch: int, seq: int, new_ids, seed: int = 0):
    """Stage 1, c=1: question, <start>, one <latent>, <end>, then supervised text (random ids)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    q = max(1, seq // 4)
    ids = rng.integers(0, new_ids[0], size=(batch, seq)).astype(np.int32)
    ids[:, q:q + 3] = new_ids
    labels = ids.copy()
    labels[:, :q + 3] = -100
    return {"input_ids": ids, "labels": labels, "left_pad": np.zeros(batch, np.int32),
            "latent_mask": ids == new_ids[1], "ntokens": batch * seq}


def worker(a):
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten

    from mlx_coconut import coconut
    from mlx_coconut.training import Stepper, enable_grad_checkpoint

    t0 = time.perf_counter()
    model, new_ids = build(a.layers, a.base, a.rank, {**LLAMA31_8B, **json.loads(a.shape)})
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    ckpt_impl = a.checkpoint
    if a.weights_only:
        print(json.dumps({"layers": a.layers, "base": a.base, "weights_bytes": weights,
                          "trainable": trainable, "peak_bytes": mx.get_peak_memory()}))
        return
    # The target shape (8 x 256 positions at a 128k vocabulary) is past the product's LOGITS_BUDGET,
    # so its head runs in chunks; the small measured shapes are chunked the same way.
    coconut.LOGITS_BUDGET, coconut.LOSS_CHUNK = 0, a.loss_chunk
    if a.checkpoint == "product":
        enable_grad_checkpoint(model)  # the product's: whole blocks recomputed
    model.train()
    opt = optim.AdamW(learning_rate=1e-4, weight_decay=0.01)
    batch = stage1_batch(a.batch, a.seq, new_ids)
    stepper = Stepper(model, feedback=True, use_compile=False)
    mx.clear_cache()
    mx.reset_peak_memory()
    t1 = time.perf_counter()
    loss, ntoks, grads = stepper(batch)
    opt.update(model, grads)
    mx.eval(loss, model.trainable_parameters(), opt.state)
    peak = mx.get_peak_memory()
    print(json.dumps({"layers": a.layers, "base": a.base, "batch": a.batch, "seq": a.seq,
                      "weights_bytes": weights, "checkpoint": ckpt_impl, "trainable": trainable, "peak_bytes": peak,
                      "active_bytes": mx.get_active_memory(), "loss": loss.item(),
                      "build_s": t1 - t0, "step_s": time.perf_counter() - t1}))


def run_worker(layers, base, batch, seq, a, weights_only=False):
    cmd = [sys.executable, __file__, "--worker", "--layers", str(layers), "--base", base,
           "--batch", str(batch), "--seq", str(seq), "--rank", str(a.rank)]
    cmd += ["--checkpoint", a.checkpoint, "--shape", a.shape, "--loss-chunk", str(a.loss_chunk)]
    if weights_only:
        cmd.append("--weights-only")
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"worker failed ({' '.join(cmd)}):\n{r.stderr[-3000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    if weights_only:
        print(f"  measured: {base:5s} layers={layers:2d}: weights {res['weights_bytes'] / 1e9:.3f} GB "
              f"(built only, no step)", flush=True)
        return res
    print(f"  measured: {base:5s} layers={layers:2d} batch={batch} x seq={seq:4d}: peak "
          f"{res['peak_bytes'] / 1e9:7.3f} GB (weights {res['weights_bytes'] / 1e9:.3f} GB, "
          f"{res['trainable'] / 1e6:.1f}M trainable; step {res['step_s']:.0f} s; grad checkpoint: "
          f"{res['checkpoint']})", flush=True)
    return res


def main(argv=None):
    p = bc.parser(__doc__.splitlines()[0], repeats=1)
    p.add_argument("--base", default="qlora,bf16", help="comma list of qlora, bf16")
    p.add_argument("--layers", default="2,4", help="one depth (measured as is) or two (extrapolated)")
    p.add_argument("--full-layers", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--measure-tokens", default=None,
                   help="two token counts 'a,b' measured at batch 1 and extrapolated to batch*seq")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--checkpoint", default="product", choices=["product", "none"],
                   help="gradient checkpointing: product = training.enable_grad_checkpoint (whole "
                   "blocks recomputed), none")
    p.add_argument("--loss-chunk", type=int, default=None,
                   help="positions per checkpointed head chunk in coconut.loss_fn, chunked at every "
                   "measured shape as at the target one (default: the product's LOSS_CHUNK); a per-token extrapolation is only valid from token counts "
                   "of at least one chunk (below, the whole head is one chunk and grows per token)")
    p.add_argument("--qlora-from-bf16", action="store_true",
                   help="QLoRA: build the 4-bit model (weights measured) but take activations and "
                   "temporaries from the bf16 step instead of running the 4-bit step (CPU: 4-bit "
                   "matmuls run at ~0.3 GFLOP/s); needs bf16 in --base")
    p.add_argument("--shape", default="{}", help="JSON overriding config keys of the Llama-3.1-8B "
                   "shape (tests use a tiny one)")
    p.add_argument("--worker", action="store_true", help=argparse_hidden())
    p.add_argument("--weights-only", action="store_true", help=argparse_hidden())
    a = p.parse_args(argv)
    if a.loss_chunk is None:
        from mlx_coconut.coconut import LOSS_CHUNK
        a.loss_chunk = LOSS_CHUNK
    if a.worker:
        a.layers = int(a.layers)
        return worker(a)

    bc.header("bench_memory: Llama-3.1-8B shape, one stage-1 LoRA step, peak memory")
    if json.loads(a.shape):
        print(f"shape overridden: {a.shape}")
    depths = [int(x) for x in a.layers.split(",")]
    tokens = [int(x) for x in a.measure_tokens.split(",")] if a.measure_tokens else None
    target_tokens = a.batch * a.seq
    print(f"target: {a.full_layers} layers, batch {a.batch} x {a.seq} tokens, LoRA rank {a.rank}, "
          f"gradient checkpointing: {a.checkpoint}, head chunks of {a.loss_chunk} positions, "
          f"bf16 activations")
    results, weights = {}, {}
    bases = a.base.split(",")
    if a.qlora_from_bf16 and "qlora" in bases:
        if "bf16" not in bases:
            raise SystemExit("--qlora-from-bf16 needs bf16 in --base")
        bases = ["bf16"] + [b for b in bases if b != "bf16"]

    def per_layer(vals: dict) -> float:  # {layers: value} -> value at full depth (linear)
        Ls = sorted(vals)
        if len(Ls) == 1:
            return vals[Ls[0]]
        l1, l2 = Ls
        return vals[l2] + (vals[l2] - vals[l1]) / (l2 - l1) * (a.full_layers - l2)

    for base in bases:
        if base == "qlora" and a.qlora_from_bf16:
            wq = {L: run_worker(L, base, 1, 8, a, weights_only=True)["weights_bytes"] / 1e9
                  for L in depths}
            est = results["bf16"] - weights["bf16"] + per_layer(wq)
            results[base] = est
            print(f"RESULT QLoRA (4-bit base): peak {est:.2f} GB for {a.full_layers} layers, {a.batch} x "
                  f"{a.seq} = ESTIMATED as the bf16 peak - bf16 weights ({weights['bf16']:.2f} GB) + "
                  f"4-bit weights ({per_layer(wq):.2f} GB, measured at {depths} layers, extrapolated "
                  f"per layer); the 4-bit step itself was not run; goal <= {GOALS[base]:g} GB: "
                  f"{bc.verdict(est <= GOALS[base])}")
            continue
        pts, wts = {}, {}
        for L in depths:
            for n in (tokens or [None]):
                b, s = (1, n) if n else (a.batch, a.seq)
                res = run_worker(L, base, b, s, a)
                pts[(L, b * s)] = res["peak_bytes"] / 1e9
                wts[L] = res["weights_bytes"] / 1e9
        weights[base] = per_layer(wts)
        Ns = sorted({k[1] for k in pts})
        how = []
        if len(depths) == 2:
            how.append(f"per layer from {depths[0]} and {depths[1]} layers to {a.full_layers}")
        if len(Ns) == 1:
            est = per_layer({L: pts[(L, Ns[0])] for L in depths})
        else:
            n1, n2 = Ns
            e1 = per_layer({L: pts[(L, n1)] for L in depths})
            e2 = per_layer({L: pts[(L, n2)] for L in depths})
            est = e2 + (e2 - e1) / (n2 - n1) * (target_tokens - n2)
            how.append(f"per token from {n1} and {n2} tokens (batch 1) to {target_tokens} "
                       f"({a.batch} x {a.seq})")
        results[base] = est
        goal = GOALS[base]
        label = "QLoRA (4-bit base)" if base == "qlora" else "LoRA (bf16 base)"
        how_s = f"EXTRAPOLATED linearly {' and '.join(how)}" if how else "measured directly"
        print(f"RESULT {label}: peak {est:.2f} GB for {a.full_layers} layers, {a.batch} x {a.seq} "
              f"(weights {weights[base]:.2f} GB; {how_s}); goal <= {goal:g} GB: "
              f"{bc.verdict(est <= goal)}")
    return results


def argparse_hidden():
    import argparse
    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
