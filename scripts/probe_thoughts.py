"""What the continuous thoughts of a COCONUT run decode to, against the steps they replaced.

    python scripts/probe_thoughts.py RUN --data test.json [--n 200] [--k 5]

For each question, the thoughts are read through the output head as `generate --show-latents` shows
them (`api.describe_thoughts`); thought j stands for replaced step j // c. The probe counts how often a
thought's top-1 token (and its top-k) is the first token of that step's result (`<<16+4=20>>` → `2`),
for the question's own step and, as the chance level, for the next question's step: the same results'
distribution paired with the wrong question. A thought that carries its step's result beats the
shuffled pairing; one that decodes to the same token whatever the question does not.
"""

import argparse
import collections
import sys

from mlx_coconut.errors import UserError


def step_result(step: str) -> str:
    """The result a written step ends with: `<<16+4=20>>` → `20` (text after the last `=`)."""
    return step.rsplit("=", 1)[-1].strip().strip("<>").strip() if "=" in step else ""


def hit_rates(rows: list, c: int, first_token) -> list:
    """rows: [(steps, [[top-k tokens] per thought])] → per thought position j: {"thought", "step",
    "n", "top1_own", "top1_shuffled", "topk_own", "topk_shuffled", "common"} (rates in [0, 1]), where
    "shuffled" pairs row i's thoughts with row i+1's step (wrapping round)."""
    out = []
    n_thoughts = max((len(t) for _, t in rows), default=0)
    for j in range(n_thoughts):
        s = j // c
        have = [i for i, (steps, t) in enumerate(rows) if len(t) > j and len(steps) > s]
        if not have:
            continue
        target = {i: first_token(step_result(rows[i][0][s])) for i in have}
        counts = collections.Counter()
        for a, i in enumerate(have):
            top, other = [x.strip() for x in rows[i][1][j]], target[have[(a + 1) % len(have)]]
            counts["top1_own"] += top[0] == target[i]
            counts["top1_shuffled"] += top[0] == other
            counts["topk_own"] += target[i] in top
            counts["topk_shuffled"] += other in top
        common = collections.Counter(rows[i][1][j][0] for i in have).most_common(3)
        out.append({"thought": j, "step": s, "n": len(have),
                    **{k: counts[k] / len(have) for k in ("top1_own", "top1_shuffled", "topk_own",
                                                         "topk_shuffled")},
                    "common": [(tok, cnt / len(have)) for tok, cnt in common]})
    return out


def probe(run: str, data: str, n: int, k: int) -> list:
    from mlx_coconut import api
    from mlx_coconut.data import load_records

    loaded = api.load(run)
    if loaded.settings.mode != "coconut":
        raise UserError(f"{run}: a {loaded.settings.mode} run feeds no hidden state back: no "
                        f"continuous thoughts to probe")
    records = load_records(data)[:n]
    answers = api.generate_answers(loaded, records, max_tokens=1, batch_size=32, return_thoughts=True)
    tok = loaded.tokenizer

    def first_token(text: str) -> str:
        ids = tok.encode(text, add_special_tokens=False)
        return tok.decode(ids[:1]).strip() if ids else ""

    rows = [(r.steps, [[t["token"] for t in d["top_k"]] for d in api.describe_thoughts(loaded, a.thoughts, k)])
            for r, a in zip(records, answers)]
    return hit_rates(rows, loaded.settings.c_thought, first_token)


def table(rates: list, k: int) -> str:
    lines = [f"| thought | replaces step | questions | top-1 = its step's result | top-1 = the next "
             f"question's | in top-{k}: its own | in top-{k}: next question's | most common top-1 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rates:
        common = ", ".join(f"{t!r} {100 * p:.0f}%" for t, p in r["common"])
        lines.append(f"| {r['thought'] + 1} | {r['step'] + 1} | {r['n']} | {100 * r['top1_own']:.1f}% | "
                     f"{100 * r['top1_shuffled']:.1f}% | {100 * r['topk_own']:.1f}% | "
                     f"{100 * r['topk_shuffled']:.1f}% | {common} |")
    return "\n".join(lines)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a COCONUT run directory (its best checkpoint) or model directory")
    p.add_argument("--data", required=True, help="records with written steps (JSON/jsonl/iCoT)")
    p.add_argument("--n", type=int, default=200, help="the first N records [200]")
    p.add_argument("--k", type=int, default=5, help="nearest tokens per thought [5]")
    args = p.parse_args(argv)
    for flag, value in (("--n", args.n), ("--k", args.k)):
        if value < 1:
            p.error(f"{flag} must be >= 1 (got {value})")
    try:
        text = table(probe(args.run, args.data, args.n, args.k), args.k)
    except UserError as e:
        sys.exit(f"error: {e}")
    print(text)
    return text


if __name__ == "__main__":
    main()
