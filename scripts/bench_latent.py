"""Latent-loop overhead: training-step time of stage 1 (c=1) and stage 3 (c=2) vs stage 0.

Same GSM8k records, formatted by the product (`data.format_record`, `data.collate`) at stage 0 (CoT),
stage 1 with c=1 (one thought) and stage 3 with c=2 (six thoughts); one fwd+bwd step each
(`nn.value_and_grad` over `coconut.loss_fn` with the product's `supervised_rows`, full-weight
gradients, evaluated), alternating the three
for --repeats rounds. Time is compared per supervised token (the latent stages supervise fewer tokens:
the removed steps). Also: the inference cost of one continuous thought (a cached forward of one
fed-back column, no output head) vs one decoded token (a cached forward + head + argmax), at bs=1
and batched (--gen-batch), as thoughts/s vs decode tokens/s.
Note: stage 1 drops the first reasoning step from the labels, so "per supervised token" also counts
the curriculum's smaller supervision; "per input token" (non-pad columns, thoughts included) isolates
the cost of the latent loop itself. Both are printed. `--pool N` also counts computed columns over N
records batched as `training.epoch_batches` does (latent stages grouped by latent start) vs plain shuffled
batches, and estimates per supervised token from the measured per-column ratio.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 python scripts/bench_latent.py
"""

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc  # noqa: E402  (first: it loads the fast BLAS)
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

GOAL = 1.15
STAGES = {"stage 0": (0, 1), "stage 1 (c=1)": (1, 1), "stage 3 (c=2)": (3, 2)}


def thought_vs_token(model, prompts, n=16, repeats=5):
    """Median ms of one thought column and one decoded token column for a batch of prompts,
    left-padded and KV-cached as `coconut.generate` runs them (no mask when no row is padded)."""
    from mlx_coconut.data import collate_prompts

    batch = collate_prompts(prompts, 0)
    x, lp = mx.array(batch["input_ids"]), batch["left_pad"]

    def fresh():
        cache = model.make_cache(mx.array(lp) if lp.any() else None, step=x.shape[1] + n + 8)
        h = model.hidden_states(x, cache)
        mx.eval(h)
        return cache, h

    def thoughts():
        cache, h = fresh()
        t = time.perf_counter()
        for _ in range(n):  # as in generate(): the thoughts are one lazy graph, evaluated at the end
            h = model.hidden_states(input_embeddings=h[:, -1:], cache=cache)
        mx.eval(h)
        return (time.perf_counter() - t) / n

    def tokens():
        cache, h = fresh()
        tok = mx.argmax(model.logits(h[:, -1]), axis=-1)
        mx.eval(tok)
        t = time.perf_counter()
        for _ in range(n):  # as in generate(): each step's tokens are needed on the host (EOS check)
            tok = mx.argmax(model.logits(model.hidden_states(tok[:, None], cache)[:, -1]), axis=-1)
            tok.tolist()
        return (time.perf_counter() - t) / n

    runs = bc.alternate({"thought": thoughts, "token": tokens}, repeats, log=False)
    return {k: statistics.median(v) * 1e3 for k, v in runs.items()}, bc.paired_ratio(
        runs["thought"], runs["token"])


def main(argv=None):
    p = bc.parser(__doc__.splitlines()[0], repeats=3)
    p.add_argument("--batch-size", type=int, default=8, help="records in the (one) training batch")
    p.add_argument("--skip", type=int, default=0, help="start at this GSM8k record")
    p.add_argument("--lora", type=int, default=0, metavar="RANK",
                   help="LoRA of this rank on every projection (the product's adapters.apply_lora) "
                   "instead of full-weight gradients")
    p.add_argument("--gen-batch", type=int, default=8, metavar="B",
                   help="batch size of the thoughts-vs-decode comparison (also run at bs=1)")
    p.add_argument("--pool", type=int, default=128, metavar="N",
                   help="also count computed columns over N records batched as training does "
                   "(stage 1 grouped by latent start) vs a plain shuffled split (0: skip)")
    args = p.parse_args(argv)

    from mlx_coconut.checkpoint import load_tokenizer
    from mlx_coconut.coconut import loss_fn, supervised_rows
    from mlx_coconut.data import FormatConfig, collate, format_record, add_latent_special_ids
    from mlx_coconut.model import load_model
    from mlx_coconut.tokens import add_latent_tokens

    path = bc.resolve_model(args.model)
    bc.header("bench_latent: training step of latent stages vs stage 0, per supervised token")
    model, _ = load_model(path)
    tokenizer = load_tokenizer(path)
    new_ids = add_latent_tokens(model, tokenizer).ids
    ids = add_latent_special_ids(tokenizer)
    if args.lora:
        from mlx_coconut.adapters import apply_lora
        apply_lora(model, {"rank": args.lora, "scale": 20.0, "dropout": 0.0, "layers": 0}, new_ids)
        mx.eval(model.parameters())
    print(f"gradients: {'LoRA rank %d' % args.lora if args.lora else 'full weights'}")
    records = bc.read_gsm8k(args.skip + args.batch_size)[args.skip:]

    batches = {}
    for name, (stage, c) in STAGES.items():
        cfg = FormatConfig(mode="coconut" if stage else "cot", stage=stage, c_thought=c,
                           max_latent_stage=3)
        b = collate([format_record(r, tokenizer, cfg, ids) for r in records], ids.eos)
        latent = b["input_ids"] == ids.latent
        lp = b["left_pad"]
        batches[name] = (mx.array(b["input_ids"]), mx.array(b["labels"]), latent,
                         mx.array(lp) if lp.any() else None, int(b["lengths"].sum()),
                         supervised_rows(b["labels"]))
        n_sup = int((b["labels"][:, 1:] != -100).sum())
        print(f"{name}: batch {b['input_ids'].shape[0]} x {b['input_ids'].shape[1]} columns, "
              f"{int(latent.sum())} thoughts in {int(latent.any(0).sum())} latent columns "
              f"({int(latent.any(0).sum()) + 1} passes), {n_sup} supervised tokens")

    pool = pool_columns(records_n=args.pool, bs=args.batch_size, tokenizer=tokenizer, ids=ids) \
        if args.pool else None
    value_and_grad = nn.value_and_grad(model, loss_fn)

    def step(name):
        x, y, latent, left_pad, n_real, rows = batches[name]

        def f():
            t = time.perf_counter()
            (loss, ntoks), grads = value_and_grad(model, x, y, latent, left_pad, True, rows=rows)
            mx.eval(loss, ntoks, grads)
            dt = time.perf_counter() - t
            return {"s": dt, "ms_per_tok": dt * 1e3 / ntoks.item(), "ms_per_col": dt * 1e3 / n_real,
                    "ms_per_padcol": dt * 1e3 / x.size, "loss": loss.item()}
        return f

    runs = bc.alternate({name: step(name) for name in STAGES}, args.repeats)
    base = "stage 0"
    print(f"fwd+bwd step (median of {args.repeats}, alternating):")
    for name in STAGES:
        s, per = bc.median(runs[name], "s"), bc.median(runs[name], "ms_per_tok")
        r = bc.paired_ratio(runs[name], runs[base], "ms_per_tok")
        rs = bc.paired_ratio(runs[name], runs[base], "s")
        rc = bc.paired_ratio(runs[name], runs[base], "ms_per_col")
        print(f"  {name:14s} {s:7.2f} s/step  {per:7.2f} ms/supervised token; vs stage 0: "
              f"x{r:.3f} per supervised token, x{rc:.3f} per input token (non-pad, thoughts "
              f"included), x{rs:.3f} per step   (loss {runs[name][-1]['loss']:.3f})")
    r1 = bc.paired_ratio(runs["stage 1 (c=1)"], runs[base], "ms_per_tok")
    r1c = bc.paired_ratio(runs["stage 1 (c=1)"], runs[base], "ms_per_col")

    cot = FormatConfig(mode="cot")
    gen_records = bc.read_gsm8k(args.gen_batch, split="test")
    ratios = {}
    for bs in sorted({1, args.gen_batch}):
        prompts = [format_record(r, tokenizer, cot, ids).prompt_ids for r in gen_records[:bs]]
        ms, tr = thought_vs_token(model, prompts)
        ratios[bs] = tr
        print(f"inference, bs={bs}, KV cache: one thought column {ms['thought']:.2f} ms, one decoded "
              f"token column {ms['token']:.2f} ms -> thoughts/s {bs * 1e3 / ms['thought']:.1f} vs "
              f"decode tokens/s {bs * 1e3 / ms['token']:.1f}: RATIO thoughts/decode per second = "
              f"{1 / tr:.2f} (goal >= 1.0: {bc.verdict(tr <= 1.0)})")
    tr = ratios[args.gen_batch]
    print(f"RATIO stage-1/stage-0 time per supervised token = {r1:.3f} (goal <= {GOAL}: "
          f"{bc.verdict(r1 <= GOAL)}); per input token {r1c:.3f}")
    r1col = bc.paired_ratio(runs["stage 1 (c=1)"], runs[base], "ms_per_padcol")
    print(f"  per computed column (padding included) stage-1/stage-0 = {r1col:.3f}")
    if pool:
        g, r = pool["grouped"], pool["shuffled"]
        print(f"  pool estimate, training batching: per computed column {r1col:.3f} x columns "
              f"{g['cols']:.3f} x supervised-token drop {g['sup']:.3f} = "
              f"{r1col * g['cols'] * g['sup']:.3f} per supervised token (plain shuffled batches: "
              f"{r1col * r['cols'] * r['sup']:.3f})")
    return {"ratio": r1, "ratio_per_input_token": r1c, "thought_token": tr}


def pool_columns(records_n, bs, tokenizer, ids):
    """Computed columns (sum of batch x width after the official collate) and supervised tokens of
    stage 1 over stage 0, on the first `records_n` records split into batches of `bs` by
    `training.epoch_batches` (stage 1: grouped by latent start) and by a plain shuffled split."""
    from types import SimpleNamespace

    import numpy as np

    from mlx_coconut.data import FormatConfig, collate, format_record
    from mlx_coconut.training import epoch_batches

    records = bc.read_gsm8k(records_n)
    cfg = SimpleNamespace(seed=0, batch_size=bs, max_seq_length=10**9, grad_accumulation_steps=1)
    out = {}
    for how in ("shuffled", "grouped"):
        tot = {}
        for stage in (0, 1):
            fcfg = FormatConfig(mode="coconut" if stage else "cot", stage=stage, c_thought=1,
                                max_latent_stage=3)
            if how == "grouped":
                batches = epoch_batches(records, tokenizer, fcfg, ids, cfg, 0)
            else:
                order = np.random.default_rng([0, 0]).permutation(len(records))
                ex = [format_record(records[i], tokenizer, fcfg, ids) for i in order]
                batches = [ex[i:i + bs] for i in range(0, len(ex), bs)]
            cols = sup = 0
            for b in batches:
                c = collate(b, ids.eos)
                cols += c["input_ids"].size
                sup += int((c["labels"][:, 1:] != -100).sum())
            tot[stage] = (cols, sup)
        out[how] = {"cols": tot[1][0] / tot[0][0], "sup": tot[0][1] / tot[1][1]}
        print(f"pool of {len(records)} records, {how} batches of {bs}: computed columns stage 0 "
              f"{tot[0][0]}, stage 1 {tot[1][0]} (x{out[how]['cols']:.3f}); supervised tokens "
              f"{tot[0][1]} -> {tot[1][1]} (/{out[how]['sup']:.3f})")
    return out


if __name__ == "__main__":
    main()
