"""GSM8k evaluation speed: batched KV-cached generation vs bs=1 cached vs bs=1 "official" loop.

Three ways to answer the same GSM8k test questions greedily (prompts = the product's formatter,
`data.format_record`, COCONUT mode: question, <|start-latent|>, k*c thoughts, <|end-latent|>):

- batched:  our `coconut.generate` on --batch-size prompts at once (sorted by prompt length, as
            `mlx_coconut.evaluate` does), KV cache, one column per step;
- bs1-cached: the same `generate`, one question at a time;
- official: the reference loop of the official COCONUT code (`Coconut.generate`, bs=1): the latent
            passes once, then every new token re-runs the WHOLE sequence (question + thoughts + tokens
            so far) through the model without a cache. Written here as the baseline.

Reported per question (seconds / question). The bs=1 modes are slow, so they run on the first
--single-n questions only and are compared per question (the script prints tokens generated per
question for each mode so the subsets can be compared). Modes alternate within each repeat.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 python scripts/bench_eval.py
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc  # noqa: E402  (first: it loads the fast BLAS)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

GOAL = 6.0


def official_generate(model, prompt_ids, latent_id, eos_ids, max_tokens):
    """The official COCONUT generation loop (bs=1): one latent forward, then full recomputation of the
    whole embedded sequence for every new token (no KV cache). Returns the generated ids (EOS cut)."""
    from mlx_coconut.coconut import continuous_forward

    ids = mx.array([prompt_ids])
    latent_mask = np.array([prompt_ids]) == latent_id
    thoughts = []
    hidden = continuous_forward(model, ids, latent_mask, thoughts=thoughts)
    embeds = model.embed(ids)
    cols = np.flatnonzero(latent_mask[0]).tolist()
    if cols:  # the sequence as the model saw it: latent columns hold the fed-back states
        parts, prev = [], 0
        for col, th in zip(cols, thoughts):
            parts += [embeds[:, prev:col], th[:, None]]
            prev = col + 1
        parts.append(embeds[:, prev:])
        embeds = mx.concatenate(parts, axis=1)
    token = int(mx.argmax(model.logits(hidden[:, -1]), axis=-1).item())
    out = []
    eos = set(eos_ids)
    for _ in range(max_tokens):
        if token in eos:
            break
        out.append(token)
        embeds = mx.concatenate([embeds, model.embed(mx.array([[token]]))], axis=1)
        h = model.hidden_states(input_embeddings=embeds)  # no cache: everything recomputed
        token = int(mx.argmax(model.logits(h[:, -1]), axis=-1).item())
    return out


def main(argv=None):
    p = bc.parser(__doc__.splitlines()[0], repeats=1)
    p.add_argument("--n", type=int, default=256, help="GSM8k test questions for the batched mode")
    p.add_argument("--single-n", type=int, default=4,
                   help="questions for the two bs=1 modes (the first of the --n)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per question (official: 64)")
    p.add_argument("--stage", type=int, default=3, help="curriculum stage of the prompts")
    p.add_argument("--c-thought", type=int, default=2, help="thoughts per stage (GSM8k: 2)")
    p.add_argument("--mode", default="coconut", choices=["coconut", "cot"],
                   help="coconut: prompts with k*c thoughts; cot: question only")
    args = p.parse_args(argv)

    from mlx_coconut.checkpoint import load_tokenizer
    from mlx_coconut.coconut import generate
    from mlx_coconut.data import FormatConfig, format_record, add_latent_special_ids
    from mlx_coconut.model import load_model
    from mlx_coconut.tokens import add_latent_tokens

    path = bc.resolve_model(args.model)
    bc.header("bench_eval: GSM8k generation, batched cached vs bs=1 cached vs bs=1 official loop")
    model, _ = load_model(path)
    tokenizer = load_tokenizer(path)
    add_latent_tokens(model, tokenizer)  # no-op for a COCONUT run directory
    ids = add_latent_special_ids(tokenizer)
    eos = sorted(set(getattr(tokenizer, "eos_token_ids", None) or [ids.eos]))
    cfg = FormatConfig(mode=args.mode, stage=args.stage if args.mode == "coconut" else 0,
                       c_thought=args.c_thought)
    records = bc.read_gsm8k(args.n)
    prompts = [format_record(r, tokenizer, cfg, ids).prompt_ids for r in records]
    single = prompts[:args.single_n]
    n_lat = [sum(t == ids.latent for t in q) for q in prompts]
    print(f"model: {path}; {len(prompts)} GSM8k test questions ({args.mode}, stage {cfg.stage}, "
          f"c={args.c_thought}: mean {np.mean(n_lat):.1f} thoughts, mean prompt "
          f"{np.mean([len(q) for q in prompts]):.1f} tokens); max {args.max_tokens} new tokens; "
          f"batched bs={args.batch_size}; bs=1 modes on the first {len(single)}; "
          f"{args.repeats} repeat(s)")

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers = {}

    def batched():
        t = time.perf_counter()
        toks = [None] * len(prompts)
        for b in range(0, len(order), args.batch_size):
            idx = order[b:b + args.batch_size]
            g = generate(model, [prompts[i] for i in idx], latent_id=ids.latent, eos_ids=eos,
                         max_tokens=args.max_tokens, pad_id=ids.eos)
            for j, i in enumerate(idx):
                toks[i] = g.tokens[j]
        dt = time.perf_counter() - t
        answers["batched"] = toks
        return {"s_per_q": dt / len(prompts), "tok_per_q": sum(map(len, toks)) / len(prompts)}

    def bs1_cached():
        t = time.perf_counter()
        toks = [generate(model, [q], latent_id=ids.latent, eos_ids=eos, max_tokens=args.max_tokens,
                         pad_id=ids.eos).tokens[0] for q in single]
        dt = time.perf_counter() - t
        answers["bs1-cached"] = toks
        return {"s_per_q": dt / len(single), "tok_per_q": sum(map(len, toks)) / len(single)}

    def official():
        t = time.perf_counter()
        toks = [official_generate(model, q, ids.latent, eos, args.max_tokens) for q in single]
        dt = time.perf_counter() - t
        answers["official"] = toks
        return {"s_per_q": dt / len(single), "tok_per_q": sum(map(len, toks)) / len(single)}

    runs = bc.alternate({"batched": batched, "bs1-cached": bs1_cached, "official": official},
                        args.repeats, warmup=False)
    med = {k: bc.median(v, "s_per_q") for k, v in runs.items()}
    toks = {k: bc.median(v, "tok_per_q") for k, v in runs.items()}
    same_cached = sum(a == b for a, b in zip(answers["bs1-cached"], answers["official"]))
    same_batched = sum(a == b for a, b in zip(answers["batched"][:len(single)], answers["bs1-cached"]))
    for k in med:
        print(f"{k:11s} {med[k]:8.3f} s/question  ({toks[k]:.1f} generated tokens/question; "
              f"{toks[k] / med[k]:.1f} tok/s)")
    print(f"identical outputs: bs1-cached vs official {same_cached}/{len(single)}, batched vs bs1-cached "
          f"{same_batched}/{len(single)} (batched left-padding may flip near-ties in fp32)")
    r_off = med["official"] / med["batched"]
    print(f"speed-up of bs1-cached over official: {med['official'] / med['bs1-cached']:.2f}x; "
          f"batched over bs1-cached: {med['bs1-cached'] / med['batched']:.2f}x")
    print(f"RATIO batched vs official loop = {r_off:.2f}x per question (goal >= {GOAL}x: "
          f"{bc.verdict(r_off >= GOAL)})")
    return {"ratio": r_off, **med}


if __name__ == "__main__":
    main()
