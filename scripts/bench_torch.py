"""The PyTorch yardstick: a full-weight COCONUT training step in PyTorch + transformers vs ours.

Both sides compute the loss and all weight gradients of the same GSM8k batch (formatted once by the
product: `data.format_record`, `data.collate`) at stage 0 (CoT) and stage 1 (c=1), alternating
ours / torch for --repeats rounds. Ours is `coconut.loss_fn` under `nn.value_and_grad`, compiled by
`training.Stepper` as training runs it. The torch side is `LlamaForCausalLM` on the same fp32 weights
(our converted model directory has Hugging Face names) with the official COCONUT multi-pass forward:
pass 0 up to the first latent column, then one pass per latent column reusing `past_key_values`,
the last hidden state of the previous column fed back as that column's input embedding, logits of
every pass concatenated, mean cross-entropy over labels != -100. `--threads` applies to the torch
side (`torch.set_num_threads`); MLX's CPU backend runs BLAS with the BLAS library's own threads.

torch is not a dependency of mlx-coconut: the torch side runs in a worker process started with
`--torch-python` (a Python that has torch and transformers; default: this one if it has them), so
the MLX side stays in the project's environment and each side keeps its own thread pools.

    python scripts/bench_torch.py \
        --torch-python /path/to/torchvenv/bin/python [--profile]
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

STAGES = {"stage 0": (0, 1), "stage 1 (c=1)": (1, 1)}
LOSS_RTOL = 1e-3  # fp32, different kernels and summation orders


# ---------------------------------------------------------------- torch side (worker process)

def torch_worker(model_dir: str, threads: int):
    """Serve JSON-line requests on stdin: setup, step, profile. Imports torch, never mlx."""
    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(threads)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.train()  # as the official training loop (Llama has no dropout by default)
    batches, latent_id, per_position, optimizer = {}, None, False, None
    reply = sys.stdout
    sys.stdout = sys.stderr  # nothing but replies on the pipe

    def step(name):
        input_ids, labels, attn, pos = batches[name]
        model.zero_grad(set_to_none=True)
        t = time.perf_counter()
        loss = coconut_loss_torch(model, input_ids, labels, attn, pos, latent_id, per_position)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        dt = time.perf_counter() - t
        gnorm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters()
                               if p.grad is not None)).item()
        return {"s": dt, "loss": loss.item(), "grad_norm": gnorm}

    for line in sys.stdin:
        req = json.loads(line)
        if req["cmd"] == "setup":
            latent_id, per_position = req["latent_id"], req["per_position"]
            if req.get("lr"):  # the official loop's torch.optim.AdamW, torch's defaults otherwise
                optimizer = torch.optim.AdamW(model.parameters(), lr=req["lr"], weight_decay=req["weight_decay"])
            emb = model.get_input_embeddings()
            if req["vocab_rows"] != emb.weight.shape[0]:
                model.resize_token_embeddings(req["vocab_rows"], mean_resizing=False)
            with torch.no_grad():  # the new tokens' rows, as the MLX side initialised them
                for i, row in req["rows"].items():
                    model.get_input_embeddings().weight[int(i)] = torch.tensor(row)
            for name, b in req["batches"].items():
                ids = torch.tensor(b["input_ids"])
                lp = torch.tensor(b["left_pad"])[:, None]
                col = torch.arange(ids.shape[1])[None]
                attn = (col >= lp).long()  # HF's mask: 0 on left padding
                pos = (col - lp).clamp(min=0)  # the official collator's position ids
                batches[name] = (ids, torch.tensor(b["labels"]).long(), attn, pos)
            out = {"torch": torch.__version__, "threads": torch.get_num_threads()}
        elif req["cmd"] == "step":
            out = step(req["name"])
        elif req["cmd"] == "profile":
            out = profile_torch(step, req["name"])
        else:
            out = {"error": f"unknown command {req['cmd']}"}
        reply.write(json.dumps(out) + "\n")
        reply.flush()


def coconut_loss_torch(model, input_ids, labels, attn, pos, latent_id, per_position=False):
    """The official COCONUT training forward (facebookresearch/coconut `Coconut.forward`), written
    with whole-column updates; `per_position` rebuilds the embeddings from a Python list of B x T
    row tensors after each pass, as the official code does (same values, more autograd nodes)."""
    import torch

    embeds = model.get_input_embeddings()(input_ids)
    latent = input_ids == latent_id
    T = input_ids.shape[1]
    cols = sorted(set(latent.nonzero()[:, 1].tolist()))
    bounds = [0] + cols + [T]
    logits, cache = [], None
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        out = model(inputs_embeds=embeds[:, lo:hi], attention_mask=attn[:, :hi],
                    position_ids=pos[:, lo:hi], past_key_values=cache, use_cache=True,
                    output_hidden_states=True)
        logits.append(out.logits)
        cache = out.past_key_values
        if hi >= T:
            continue
        h = out.hidden_states[-1][:, -1]  # column hi is latent: rows with a thought take h
        if per_position:
            rows = [[embeds[b, t] for t in range(T)] for b in range(len(embeds))]
            for b in range(len(embeds)):
                if latent[b, hi]:
                    rows[b][hi] = h[b]
            embeds = torch.stack([torch.stack(r) for r in rows])
        else:
            fed = torch.where(latent[:, hi, None], h, embeds[:, hi])
            embeds = torch.cat([embeds[:, :hi], fed[:, None], embeds[:, hi + 1:]], dim=1)
    logits = torch.cat(logits, dim=1)
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             labels[:, 1:].reshape(-1), ignore_index=-100)


TORCH_GROUPS = (  # (group, substrings of aten op names), first match wins
    ("attention", ("scaled_dot_product", "flash_attention", "_efficient_attention")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")),
    ("loss head softmax/CE", ("log_softmax", "nll_loss", "cross_entropy")),
    ("embedding", ("embedding",)),
)


def profile_torch(step, name):
    """One step under torch.profiler: self CPU time per op group, and the rest of the wall time
    (Python, autograd bookkeeping between ops)."""
    from torch.profiler import ProfilerActivity, profile

    step(name)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        r = step(name)
    groups, top = {}, []
    for ev in prof.key_averages():
        us = ev.self_cpu_time_total
        g = next((g for g, keys in TORCH_GROUPS if any(k in ev.key for k in keys)), "elementwise/other")
        groups[g] = groups.get(g, 0.0) + us / 1e6
        top.append((us / 1e6, ev.key, ev.count))
    top.sort(reverse=True)
    return {"wall": r["s"], "groups": groups, "top": top[:12]}


# ---------------------------------------------------------------- MLX side (this process)

class TorchSide:
    def __init__(self, python: str, model_dir: Path, threads: int):
        env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}  # torch brings its own BLAS
        self.proc = subprocess.Popen([python, __file__, "--worker", str(model_dir), "--threads",
                                      str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)

    def __call__(self, cmd, **kw):
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"error: the torch worker exited (code {self.proc.wait()}); see above")
        return json.loads(line)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def has_torch(python: str) -> bool:
    try:
        return subprocess.run([python, "-c", "import torch, transformers"],
                              capture_output=True).returncode == 0
    except OSError:  # no such interpreter
        return False


def gsm8k_batches(path, batch_size: int, skip: int = 0, stages=STAGES):
    """The fp32 model with the latent tokens added, its special ids, the new token ids, and the
    first `batch_size` GSM8k test records collated at each stage → (model, ids, new_ids, batches)."""
    import bench_common as bc
    from mlx_coconut.checkpoint import load_tokenizer
    from mlx_coconut.data import FormatConfig, add_latent_special_ids, collate, format_record
    from mlx_coconut.model import load_model
    from mlx_coconut.tokens import add_latent_tokens

    model, _ = load_model(path)
    tokenizer = load_tokenizer(path)
    new_ids = add_latent_tokens(model, tokenizer).ids
    ids = add_latent_special_ids(tokenizer)
    records = bc.read_gsm8k(skip + batch_size)[skip:]
    batches = {}
    for name, (stage, c) in stages.items():
        cfg = FormatConfig(mode="coconut" if stage else "cot", stage=stage, c_thought=c,
                           max_latent_stage=3)
        b = collate([format_record(r, tokenizer, cfg, ids) for r in records], ids.eos)
        b["latent_mask"] = b["input_ids"] == ids.latent
        batches[name] = b
    return model, ids, new_ids, batches


def train_update(model) -> tuple:
    """(AdamW with `train`'s defaults — lr 1e-4, weight decay 0.01 — and its update compiled as `train`
    compiles it): `update(grads, 1.0)` is one optimizer step."""
    from mlx_coconut.optimizer import make_optimizer
    from mlx_coconut.options import TrainConfig, with_defaults
    from mlx_coconut.trainer import make_update

    optimizer = make_optimizer(model, with_defaults(TrainConfig(), {}, "float32"))
    return optimizer, make_update(model, optimizer, use_compile=True)


def main(argv=None):
    import bench_common as bc

    p = bc.parser(__doc__.splitlines()[0], repeats=3)
    p.add_argument("--torch-python", default=None, metavar="PYTHON",
                   help="a Python with torch and transformers (default: this one, if it has them)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads of the torch side")
    p.add_argument("--batch-size", type=int, default=8, help="GSM8k records in the batch")
    p.add_argument("--skip", type=int, default=0, help="start at this GSM8k record")
    p.add_argument("--official-fill", action="store_true",
                   help="torch side: rebuild the embeddings per position after each pass, as the "
                   "official code does (default: one whole-column update)")
    p.add_argument("--profile", action="store_true",
                   help="also profile one torch step per stage (torch.profiler, per op group)")
    p.add_argument("--optimizer", action="store_true",
                   help="whole training steps: both sides also apply their AdamW update (lr 1e-4, weight decay "
                   "0.01; torch.optim.AdamW as the official loop, ours as `train`)")
    p.add_argument("--ours-only", type=int, default=0, metavar="N",
                   help="only run N steps of ours per stage, no torch (for perf record)")
    args = p.parse_args(argv)
    python = args.torch_python or sys.executable
    if not args.ours_only and not has_torch(python):
        print(f"error: --torch-python {python}: cannot import torch and transformers (install them "
              f"in a separate venv: pip install torch --index-url https://download.pytorch.org/whl/cpu "
              f"transformers)", file=sys.stderr)
        raise SystemExit(2)

    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_coconut.tokens import vocab_rows
    from mlx_coconut.training import Stepper

    path = bc.resolve_model(args.model)
    bc.header("bench_torch: full-weight COCONUT " + ("training step (with AdamW)" if args.optimizer else "fwd+bwd")
              + ", PyTorch (transformers) vs ours")
    model, ids, new_ids, batches = gsm8k_batches(path, args.batch_size, args.skip)
    for name, b in batches.items():
        print(f"{name}: batch {b['input_ids'].shape[0]} x {b['input_ids'].shape[1]}, "
              f"{int(b['latent_mask'].any(0).sum()) + 1} passes")

    stepper = Stepper(model, feedback=True, use_compile=True)
    optimizer, update = train_update(model) if args.optimizer else (None, None)

    def ours(name, norm=True):
        def f():
            t = time.perf_counter()
            loss, ntoks, grads = stepper(batches[name])
            if optimizer is None:
                mx.eval(loss, ntoks, grads)
            else:
                update(grads, 1.0)
                mx.eval(loss, ntoks, grads, model.parameters(), optimizer.state)
            dt = time.perf_counter() - t
            if not norm:
                return {"s": dt}
            gnorm = mx.sqrt(sum(mx.square(g.astype(mx.float32)).sum() for _, g in tree_flatten(grads)))
            return {"s": dt, "loss": loss.item(), "grad_norm": gnorm.item()}
        return f

    if args.ours_only:  # the window is CLOCK_MONOTONIC, as `perf record -k CLOCK_MONOTONIC` stamps
        for name in STAGES:
            ours(name, norm=False)()  # compile
            t0 = time.clock_gettime(time.CLOCK_MONOTONIC)
            ts = [ours(name, norm=False)()["s"] for _ in range(args.ours_only)]
            t1 = time.clock_gettime(time.CLOCK_MONOTONIC)
            print(f"ours {name}: {' '.join(f'{t:.2f}' for t in ts)} s/step; perf window "
                  f"--time {t0:.6f},{t1:.6f}")
        return {}

    torch_side = TorchSide(python, path, args.threads)
    emb = model.model.embed_tokens.weight
    lr = {"lr": optimizer.learning_rate.item(), "weight_decay": optimizer.weight_decay} if optimizer else {}
    info = torch_side("setup", latent_id=ids.latent, per_position=args.official_fill, **lr,
                      vocab_rows=vocab_rows(model),
                      rows={str(i): emb[i].tolist() for i in new_ids},
                      batches={n: {k: b[k].tolist() for k in ("input_ids", "labels", "left_pad")}
                               for n, b in batches.items()})
    fill = "per-position lists (official)" if args.official_fill else "whole-column update"
    print(f"torch side: torch {info['torch']}, {info['threads']} threads, fp32, latent fill: {fill}, "
          f"{python}")

    fns = {}
    for name in STAGES:
        fns[f"ours {name}"] = ours(name)
        fns[f"torch {name}"] = (lambda n: lambda: torch_side("step", name=n))(name)
    runs = bc.alternate(fns, args.repeats)

    result = {}
    what = "fwd+bwd+AdamW update" if args.optimizer else "fwd+bwd"
    print(f"{what} step, full weights (median of {args.repeats}, alternating):")
    for name in STAGES:
        o, t = runs[f"ours {name}"], runs[f"torch {name}"]
        ratio = bc.paired_ratio(t, o, "s")
        rel = abs(o[-1]["loss"] - t[-1]["loss"]) / abs(t[-1]["loss"])
        grel = abs(o[-1]["grad_norm"] - t[-1]["grad_norm"]) / t[-1]["grad_norm"]
        print(f"  {name:14s} ours {bc.median(o, 's'):6.2f} s (best {min(x['s'] for x in o):.2f}), "
              f"torch {bc.median(t, 's'):6.2f} s (best {min(x['s'] for x in t):.2f}); "
              f"loss ours {o[-1]['loss']:.5f} torch {t[-1]['loss']:.5f} (rel diff {rel:.1e}), "
              f"grad norm rel diff {grel:.1e}")
        print(f"RATIO {name}: torch/ours time = {ratio:.3f}")
        if rel > LOSS_RTOL:
            print(f"WARNING {name}: losses differ by {rel:.1e} > {LOSS_RTOL}")
        result[name] = {"ratio": ratio, "loss_rel": rel, "grad_rel": grel}

    if args.profile:
        for name in STAGES:
            prof = torch_side("profile", name=name)
            total = sum(prof["groups"].values())
            print(f"torch profile, one {name} step: wall {prof['wall']:.2f} s, ops' self time "
                  f"{total:.2f} s")
            for g, s in sorted(prof["groups"].items(), key=lambda kv: -kv[1]):
                print(f"  {g:22s} {s:6.2f} s  {100 * s / prof['wall']:5.1f}%")
            rest = prof["wall"] - total
            print(f"  {'outside ops (Python)':22s} {rest:6.2f} s  {100 * rest / prof['wall']:5.1f}%")
            print("  top ops by self time: " + "; ".join(f"{k} {s:.2f}s x{n}"
                                                         for s, k, n in prof["top"][:8]))
    torch_side.close()
    return result


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        torch_worker(sys.argv[2], int(sys.argv[4]) if len(sys.argv) > 4 else 2)
    else:
        main()
