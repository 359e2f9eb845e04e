"""Whether a COCONUT run's answers depend on its continuous thoughts: feed each question another
question's thoughts and see what it answers.

    python scripts/probe_swap.py RUN [RUN ...] --data test.json [--n N] [--max-tokens 24]

Each question is answered three ways, greedily, with the run's own eval prompt (`eval --thoughts`):
  own       its own continuous thoughts (the ordinary eval);
  swapped   the thoughts another question produced (its donor, a random derangement of the questions),
            fed at the same thought columns in place of the question's own;
  none      no thought at all: the slots keep the `<|latent|>` embedding (pause as thought at eval).
Beside accuracy, "follows the donor" counts the answers that are the question's own last step
worked from the donor's first-step result (`<<20-8=12>>` with the donor's 9 in place of 20 → 1), over
the pairs whose first-step results differ; under `own` the same count is the chance level. "Answers
changed" counts the questions whose answer under `swapped` is not the one under `own`. Thoughts
that carry the first step make `swapped` follow the donor; thoughts the model ignores change nothing.
Records need two or more steps `<<a op b=c>>` whose last one starts from the first one's result.
"""

import argparse
import re
import sys

import numpy as np

from mlx_coconut.errors import UserError
from probe_thoughts import step_result

STEP = re.compile(r"^<<\s*(-?\d+)\s*([-+*])\s*(-?\d+)\s*=\s*(-?\d+)\s*>>$")
BATCH = 32


def donor_answer(steps: list, donor_first: str) -> str:
    """The question's last step `<<a op b=c>>` worked from `donor_first` in place of a ("" when the
    last step does not have that form or does not start from the first step's result)."""
    m = STEP.match(steps[-1].strip()) if len(steps) >= 2 else None
    if not m or m.group(1) != step_result(steps[0]) or not donor_first.lstrip("-").isdigit():
        return ""
    a, op, b = int(donor_first), m.group(2), int(m.group(3))
    return str(a + b if op == "+" else a - b if op == "-" else a * b)


def first_result(record) -> str:
    return step_result(record.steps[0]) if record.steps else ""


def probe_run(run: str, records: list, max_tokens: int) -> dict:
    """{"n", "thoughts", "pairs", "changed", "own" | "swapped" | "none": {"accuracy", "follows_donor"}}
    of one run; a line on stderr after each of its three evaluations (minutes each on a CPU)."""
    from mlx_coconut import api
    from mlx_coconut.evaluate import evaluate

    loaded = api.load(run)
    if loaded.settings.mode != "coconut":
        raise UserError(f"{run}: a {loaded.settings.mode} run feeds no hidden state back: no thoughts to swap")
    latent = api.special_ids(loaded).latent
    if not any(latent in api.prompt_ids(loaded, r) for r in records):
        raise UserError(f"{run}: its prompts have no thoughts (stage {loaded.settings.stage})")
    results = {}
    for t in ("own", "swapped", "none"):
        res = evaluate(loaded, records, max_tokens=max_tokens, batch_size=BATCH, thoughts=t)
        results[t] = res.examples
        print(f"{run}: thoughts {t}: {100 * res.accuracy:.1f}% ({res.seconds:.0f} s)", file=sys.stderr)
    swapped = results["swapped"]
    counts = {e["n_latents"] for e in swapped}
    donors = [e["donor"] for e in swapped]
    follow = [donor_answer(r.steps, first_result(records[d])) for r, d in zip(records, donors)]
    pairs = [i for i, (r, d) in enumerate(zip(records, donors))
             if follow[i] and d != i and first_result(r) != first_result(records[d])
             and follow[i] != swapped[i]["answer"]]
    out = {"n": len(records), "thoughts": "/".join(str(c) for c in sorted(counts)), "pairs": len(pairs),
           "changed": float(np.mean([a["prediction"] != b["prediction"] for a, b in zip(results["own"], swapped)]))}
    for name, examples in results.items():
        out[name] = {"accuracy": float(np.mean([e["correct"] for e in examples])),
                     "follows_donor": float(np.mean([examples[i]["prediction"] == follow[i] for i in pairs]))
                     if pairs else 0.0}
    return out


def markdown(results: dict) -> str:
    lines = ["| run | thoughts | accuracy: own | swapped | none (`<|latent|>`) | answers changed by the swap | "
             "follows the donor: own (chance) | swapped | none | pairs |", "|---|---|---|---|---|---|---|---|---|---|"]
    for run, r in results.items():
        pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
        lines.append(f"| {run} | {r['thoughts']} | {pct(r['own']['accuracy'])} | {pct(r['swapped']['accuracy'])} | "
                     f"{pct(r['none']['accuracy'])} | {pct(r['changed'])} | {pct(r['own']['follows_donor'])} | "
                     f"{pct(r['swapped']['follows_donor'])} | {pct(r['none']['follows_donor'])} | {r['pairs']} |")
    return "\n".join(lines)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", metavar="RUN", help="COCONUT run directories (stage >= 1)")
    p.add_argument("--data", required=True, help="the questions (JSON/jsonl/iCoT)")
    p.add_argument("--n", type=int, default=None, help="the first N records [all]")
    p.add_argument("--max-tokens", type=int, default=24, help="new tokens per answer [24]")
    args = p.parse_args(argv)
    if args.n is not None and args.n < 2:
        p.error(f"--n must be >= 2: a question needs another one to take thoughts from (got {args.n})")
    if args.max_tokens < 1:
        p.error(f"--max-tokens must be >= 1 (got {args.max_tokens})")
    try:
        from mlx_coconut.data import load_records

        records = load_records(args.data)[:args.n]
        if len(records) < 2:
            raise UserError(f"{args.data}: {len(records)} record(s); swapping needs two or more")
        text = markdown({run: probe_run(run, records, args.max_tokens) for run in args.runs})
    except UserError as e:
        sys.exit(f"error: {e}")
    print(text)
    return text


if __name__ == "__main__":
    main()
