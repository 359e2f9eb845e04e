"""Whether a run's thought slots hold the result of the step they replaced, read by a linear probe.

    python scripts/probe_linear.py RUN [RUN ...] --train train.json --test test.json

For each run with thought slots (COCONUT, pause as thought) and each slot j, the final-norm hidden state
at the position before the slot is computed for every question of --train and --test, through the
eval prompt and the run's own latent loop: for COCONUT it is the continuous thought itself, for pause
as thought the state at the same position, which is not fed back. A ridge classifier fitted on the
training questions (its penalty chosen by 5-fold cross-validation) predicts the result of the step the
slot replaced (step j // c; `<<16+4=20>>` → 20). The table gives its accuracy on the test questions
beside two floors: the same probe fitted on shuffled training labels, and always guessing the most
common training result. A probe says what a state holds, not that the model uses it.
"""

import argparse
import sys

import numpy as np

from mlx_coconut.errors import UserError
from probe_thoughts import step_result

PENALTIES = (0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0)


def slot_states(loaded, records, progress=None) -> list:
    """Per record, the [n_slots, D] final-norm hidden states at the positions before its thought slots
    (float32 numpy), with the run's feedback (a pause run's slots keep their embedding);
    `progress(done, total)` every 50 records."""
    import mlx.core as mx

    from mlx_coconut import api, coconut

    latent = api.special_ids(loaded).latent
    feedback = loaded.settings.mode != "pause"
    out = []
    for record in records:
        ids = np.array([api.prompt_ids(loaded, record)])
        mask = ids == latent
        hidden = coconut.continuous_forward(loaded.model, ids, mask, feedback=feedback)
        before = np.flatnonzero(mask[0]) - 1
        states = hidden[0][mx.array(before)].astype(mx.float32) if len(before) else mx.zeros((0, 1))
        out.append(np.array(states))
        if progress and (len(out) % 50 == 0 or len(out) == len(records)):
            progress(len(out), len(records))
    return out


def _fit(x, y, classes, penalty):
    mean, scale = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / scale
    targets = (y[:, None] == classes[None]).astype(np.float64)
    w = np.linalg.solve(z.T @ z + penalty * np.eye(z.shape[1]), z.T @ targets)
    return lambda q: classes[np.argmax(((q - mean) / scale) @ w, axis=1)]


def ridge_accuracy(x_train, y_train, x_test, y_test, folds: int = 5) -> float:
    """Test accuracy of a one-vs-all ridge classifier on standardised features, the penalty chosen by
    `folds`-fold cross-validation on the training rows."""
    x_train, x_test = np.asarray(x_train, np.float64), np.asarray(x_test, np.float64)
    y_train, y_test = np.asarray(y_train), np.asarray(y_test)
    classes = np.unique(y_train)
    parts = np.arange(len(y_train)) % folds

    def cv(penalty):
        return np.mean([np.mean(_fit(x_train[parts != f], y_train[parts != f], classes, penalty)(
            x_train[parts == f]) == y_train[parts == f]) for f in range(folds)])

    best = max(PENALTIES, key=cv)
    return float(np.mean(_fit(x_train, y_train, classes, best)(x_test) == y_test))


def probe_run(run: str, train, test, seed: int = 0) -> list:
    """[{"slot", "step", "n_train", "n_test", "probe", "shuffled", "majority"}] for one run."""
    from mlx_coconut import api

    loaded = api.load(run)
    mode, c = loaded.settings.mode, loaded.settings.c_thought
    if mode not in ("coconut", "pause"):
        raise UserError(f"{run}: a {mode} run has no thought slots to probe")
    def progress(name):  # minutes a run on a CPU: say where it is
        return lambda done, total: print(f"{run}: {name} states {done}/{total}", file=sys.stderr, flush=True)

    states = {name: slot_states(loaded, records, progress(name))
              for name, records in (("train", train), ("test", test))}
    rng = np.random.default_rng(seed)
    rows = []
    for j in range(max(len(s) for s in states["train"] + states["test"])):
        s = j // c

        def table(name, records):
            keep = [i for i, r in enumerate(records) if len(states[name][i]) > j and len(r.steps) > s]
            return (np.stack([states[name][i][j] for i in keep]) if keep else None,
                    np.array([step_result(records[i].steps[s]) for i in keep]))

        (xa, ya), (xb, yb) = table("train", train), table("test", test)
        if xa is None or xb is None:
            continue
        values, counts = np.unique(ya, return_counts=True)
        rows.append({"slot": j, "step": s, "n_train": len(ya), "n_test": len(yb),
                     "probe": ridge_accuracy(xa, ya, xb, yb),
                     "shuffled": ridge_accuracy(xa, rng.permutation(ya), xb, yb),
                     "majority": float(np.mean(yb == values[np.argmax(counts)]))})
    return rows


def markdown(results: dict) -> str:
    lines = ["| run | slot | replaces step | train / test | probe | shuffled labels | most common |",
             "|---|---|---|---|---|---|---|"]
    for run, rows in results.items():
        for r in rows:
            lines.append(f"| {run} | {r['slot'] + 1} | {r['step'] + 1} | {r['n_train']} / {r['n_test']} | "
                         f"{100 * r['probe']:.1f}% | {100 * r['shuffled']:.1f}% | {100 * r['majority']:.1f}% |")
    return "\n".join(lines)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", metavar="RUN", help="COCONUT or pause-as-thought run directories")
    p.add_argument("--train", required=True, help="records the probe is fitted on (JSON/jsonl/iCoT)")
    p.add_argument("--test", required=True, help="records it is scored on")
    p.add_argument("--n", type=int, default=None, help="the first N records of each file [all]")
    args = p.parse_args(argv)
    if args.n is not None and args.n < 10:
        p.error(f"--n must be >= 10 for 5-fold cross-validation (got {args.n})")
    try:
        from mlx_coconut.data import load_records

        train, test = (load_records(f)[:args.n] for f in (args.train, args.test))
        text = markdown({run: probe_run(run, train, test) for run in args.runs})
    except UserError as e:
        sys.exit(f"error: {e}")
    print(text)
    return text


if __name__ == "__main__":
    main()
