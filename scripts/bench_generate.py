"""Greedy decode speed: our `coconut.generate` vs `mlx_lm.stream_generate`, same model, prompt, length.

Both sides share the very same weight arrays (mlx-lm's Llama is loaded lazily and given our arrays),
decode the same prompt greedily for --max-tokens tokens with EOS disabled, and are timed the same way:
wall time between the first and the last generated token (so prefill is excluded), alternating
ours / mlx-lm for --repeats rounds. Also measures the machine's memory bandwidth and the decode
efficiency = bytes of weights read per token x tok/s / bandwidth, and profiles one decode step of ours
(Python graph building, transformer body, output head, one layer's attention and MLP).

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 python scripts/bench_generate.py
"""

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc  # noqa: E402  (first: it loads the fast BLAS)
import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

GOAL_RATIO, GOAL_EFFICIENCY = 1.0, 0.6
FALLBACK_PROMPT = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many "
                   "clips in May. How many clips did Natalia sell altogether in April and May?\n")


def load_both(path: Path, dtype):
    """Our model and mlx-lm's, sharing weight arrays; plus the tokenizer."""
    from mlx_lm.utils import load_model as lm_load_model

    from mlx_coconut.checkpoint import load_tokenizer
    from mlx_coconut.model import load_model

    ours, _ = load_model(path, dtype=dtype)
    peer, _ = lm_load_model(path, lazy=True)
    peer.load_weights(tree_flatten(ours.parameters()), strict=True)  # same arrays, no copy
    mx.eval(peer.parameters())
    peer.eval()
    return ours, peer, load_tokenizer(path)


def decode_bytes(model) -> int:
    """Bytes of weights a decode step reads: everything, except an untied input-embedding table
    (only one row of it is gathered per token)."""
    params = dict(tree_flatten(model.parameters()))
    total = sum(v.nbytes for v in params.values())
    if not model.args.tie_word_embeddings:
        total -= sum(v.nbytes for k, v in params.items() if k.startswith("model.embed_tokens."))
    return total


def run_ours(model, prompt_ids, n):
    from mlx_coconut.coconut import generate

    stamps = []
    t0 = time.perf_counter()
    g = generate(model, [prompt_ids], latent_id=-1, eos_ids=[-1], max_tokens=n,
                 on_token=lambda step, ids: stamps.append(time.perf_counter()))
    total = time.perf_counter() - t0
    return g.tokens[0], stamps, total


def run_peer(model, tokenizer, prompt_ids, n):
    from mlx_lm import stream_generate

    stamps, tokens = [], []
    t0 = time.perf_counter()
    for r in stream_generate(model, tokenizer, prompt_ids, max_tokens=n):
        stamps.append(time.perf_counter())
        tokens.append(r.token)
    total = time.perf_counter() - t0
    return tokens, stamps, total


def rate(stamps):
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def profile_step(model, prompt_ids, repeats=15):
    """Median ms of: one full decode step (evaluated), graph building alone (Python), the transformer
    body without the head, the output head alone, one layer's attention and MLP (x n_layers)."""
    cache = model.make_cache(mx.array([0]), step=len(prompt_ids) + 64)
    mx.eval(model.hidden_states(mx.array([prompt_ids]), cache))
    tok = mx.array([[int(prompt_ids[-1])]])
    layer = model.layers[0]
    x = mx.random.normal((1, 1, model.args.hidden_size)).astype(layer.input_layernorm.weight.dtype)
    hid = x[:, 0]
    mx.eval(x, hid)

    def rewind(f):
        def g():
            r = f()
            cache.offset -= 1
            return r
        return g

    pos = cache.offset - cache.left_pad
    parts = {
        "full step": rewind(lambda: mx.eval(model.logits(model.hidden_states(tok, cache)[:, -1]))),
        "graph build (Python)": rewind(lambda: model.logits(model.hidden_states(tok, cache)[:, -1])),
        "body (no head)": rewind(lambda: mx.eval(model.hidden_states(tok, cache))),
        "output head": lambda: mx.eval(model.logits(hid)),
        "attention x L": lambda: mx.eval(layer.self_attn(layer.input_layernorm(x), None, pos, cache, 0)),
        "MLP x L": lambda: mx.eval(layer.mlp(layer.post_attention_layernorm(x))),
    }
    L = len(model.layers)
    out, share = {}, {}
    nb = lambda m: sum(v.nbytes for _, v in tree_flatten(m.parameters()))  # noqa: E731
    head = model.lm_head if not model.args.tie_word_embeddings else model.model.embed_tokens
    total = decode_bytes(model)
    share = {"output head": nb(head) / total, "attention x L": L * nb(layer.self_attn) / total,
             "MLP x L": L * nb(layer.mlp) / total}
    for name, f in parts.items():
        f()
        ts = []
        for _ in range(repeats):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
        out[name] = statistics.median(ts) * 1e3 * (L if name.endswith("x L") else 1)
    return out, share


def main(argv=None):
    p = bc.parser(__doc__.splitlines()[0], repeats=3)
    p.add_argument("--max-tokens", type=int, default=64, help="tokens decoded per run")
    p.add_argument("--prompt", default=None, help="prompt text (default: the first GSM8k test "
                   "question, if ../shared/data is present)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="cast weights (default: as stored)")
    p.add_argument("--bandwidth-mb", type=int, default=1024, help="buffer size of the bandwidth test")
    p.add_argument("--no-profile", action="store_true")
    args = p.parse_args(argv)
    path = bc.resolve_model(args.model)
    bc.header("bench_generate: greedy decode, ours vs mlx-lm")
    dtype = getattr(mx, args.dtype) if args.dtype else None
    ours, peer, tokenizer = load_both(path, dtype)
    tokenizer.eos_token_ids = []  # decode exactly --max-tokens tokens on both sides

    if args.prompt is None:
        try:
            rec = bc.read_gsm8k(1)[0]
            args.prompt = rec.question + "\n"
        except SystemExit:
            args.prompt = FALLBACK_PROMPT
    prompt_ids = list(tokenizer.encode(args.prompt))
    n = args.max_tokens
    print(f"model: {path} ({sum(v.size for _, v in tree_flatten(ours.parameters())) / 1e6:.1f}M "
          f"params, {len(ours.layers)} layers); prompt {len(prompt_ids)} tokens; decode {n} tokens; "
          f"{args.repeats} alternating repeats")

    results = {}

    def ours_fn():
        toks, stamps, total = run_ours(ours, prompt_ids, n)
        results["ours"] = toks
        return {"decode_tps": rate(stamps), "total_s": total}

    def peer_fn():
        toks, stamps, total = run_peer(peer, tokenizer, prompt_ids, n)
        results["mlx-lm"] = toks
        return {"decode_tps": rate(stamps), "total_s": total}

    runs = bc.alternate({"ours": ours_fn, "mlx-lm": peer_fn}, args.repeats)
    ours_tps, peer_tps = bc.median(runs["ours"], "decode_tps"), bc.median(runs["mlx-lm"], "decode_tps")
    same = sum(a == b for a, b in zip(results["ours"], results["mlx-lm"]))
    ratio = bc.paired_ratio(runs["ours"], runs["mlx-lm"], "decode_tps")

    bw = bc.memory_bandwidth(args.bandwidth_mb)
    nbytes = decode_bytes(ours)
    eff = nbytes * ours_tps / (bw["best"] * 1e9)
    eff_peer = nbytes * peer_tps / (bw["best"] * 1e9)

    print(f"decode tok/s (median of {args.repeats}): ours {ours_tps:.2f}, mlx-lm {peer_tps:.2f}; "
          f"all runs ours {[round(r['decode_tps'], 2) for r in runs['ours']]}, "
          f"mlx-lm {[round(r['decode_tps'], 2) for r in runs['mlx-lm']]}")
    print(f"end-to-end s (prefill + {n} tokens): ours {bc.median(runs['ours'], 'total_s'):.3f}, "
          f"mlx-lm {bc.median(runs['mlx-lm'], 'total_s'):.3f}")
    print(f"greedy tokens identical: {same}/{min(len(results['ours']), len(results['mlx-lm']))}")
    print(f"memory bandwidth ({args.bandwidth_mb} MB buffers, GB/s): "
          + ", ".join(f"{k} {v:.2f}" for k, v in bw.items()))
    print(f"weights read per token: {nbytes / 1e6:.1f} MB -> decode efficiency ours {eff:.2f}, "
          f"mlx-lm {eff_peer:.2f} (goal >= {GOAL_EFFICIENCY}: {bc.verdict(eff >= GOAL_EFFICIENCY)})")
    print(f"RATIO ours/mlx-lm decode tok/s = {ratio:.3f} (median of per-round ratios; ratio of "
          f"medians {ours_tps / peer_tps:.3f}) (goal >= {GOAL_RATIO}: "
          f"{bc.verdict(ratio >= GOAL_RATIO)})")

    if not args.no_profile:
        prof, share = profile_step(ours, prompt_ids)
        full = prof["full step"]
        print("profile of one decode step of ours (median ms; 'x L' = one layer timed alone x "
              f"{len(ours.layers)} layers; bytes = share of the weights read per token):")
        for k, v in prof.items():
            b = f", {100 * share[k]:5.1f}% of the bytes" if k in share else ""
            print(f"  {k:22s} {v:8.2f} ms  ({100 * v / full:5.1f}% of a full step{b})")
    return {"ratio": ratio, "ours_tps": ours_tps, "peer_tps": peer_tps, "efficiency": eff}


if __name__ == "__main__":
    main()
