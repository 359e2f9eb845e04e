"""The quickstart over seeds: one line per seed and the mean ± sd of every row, from the
`quickstart.json` (or `quickstart-long.json`) each `mlx-coconut quickstart --seed N --out DIR` wrote.

    python scripts/seed_table.py quickstart quickstart-seed1 quickstart-seed2 [--budget long]

A learning result is a distribution: one draw of the same recipe moves by several points, so compare
configurations by these means and spreads, never by one run. The second table gives, for each control,
COCONUT minus the control at the same stage, seed by seed (the long budget's goals ask for +10), and
COCONUT minus itself fed another question's thoughts (quickstarts since session 15).
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

from mlx_coconut import quickstart
from mlx_coconut.errors import UserError


def read_records(dirs, budget: str) -> list:
    """Each directory's quickstart record, in the order given; one line naming the file when one is
    missing or unreadable."""
    records = []
    for d in dirs:
        path = quickstart.output(Path(d), budget, "quickstart.json")
        try:
            records.append(json.loads(path.read_text()))
        except OSError as e:
            raise UserError(f"{path}: cannot read ({e.strerror or e}): run `mlx-coconut quickstart"
                            f"{'' if budget == 'default' else ' --budget ' + budget} --out {d}` first")
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: not JSON ({e.msg})")
        if not isinstance(records[-1], dict) or not isinstance(records[-1].get("rows"), dict):
            raise UserError(f"{path}: no 'rows' (not a quickstart record)")
    return records


def mean_sd(xs: list) -> str:
    """'m ± sd' (sample sd), or the one value when there is one."""
    if len(xs) == 1:
        return f"{xs[0]:.1f}"
    return f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs):.1f}"


def tables(records: list) -> str:
    """The seed table (accuracy %, tokens per question, minutes) and the control differences."""
    keys = [k for k in (*quickstart.ROWS, quickstart.SWAPPED) if all(k in r["rows"] for r in records)]
    name = {k: records[0]["rows"][k]["name"] for k in keys}
    names = [name[k] for k in keys]
    lines = ["| seed | " + " | ".join(names) + " | minutes (this command) |", "|---" * (len(keys) + 2) + "|"]
    for r in records:
        cells = [f"{100 * r['rows'][k]['accuracy']:.1f}% ({r['rows'][k]['tokens']:.1f})" for k in keys]
        lines.append(f"| {r.get('seed', '?')} | " + " | ".join(cells) + f" | {r['seconds'] / 60:.1f} |")
    acc = {k: [100 * r["rows"][k]["accuracy"] for r in records] for k in keys}
    tok = {k: [r["rows"][k]["tokens"] for r in records] for k in keys}
    lines.append("| mean ± sd | " + " | ".join(f"{mean_sd(acc[k])}% ({statistics.mean(tok[k]):.1f})"
                                                for k in keys)
                 + f" | {mean_sd([r['seconds'] / 60 for r in records])} |")
    pairs = [(c, ref) for c, ref, _ in quickstart.CONTROL_GOALS] + [(quickstart.SWAPPED, "coconut")]
    controls = [(c, ref) for c, ref in pairs if c in keys and ref in keys]
    if controls:
        lines += ["", "| COCONUT − control (points, same stage) | "
                  + " | ".join(str(r.get("seed", "?")) for r in records) + " | mean ± sd |",
                  "|---" * (len(records) + 2) + "|"]
        for c, ref in controls:
            d = [a - b for a, b in zip(acc[ref], acc[c])]
            lines.append(f"| {name[ref]} − {name[c]} | "
                         + " | ".join(f"{x:+.1f}" for x in d) + f" | {mean_sd(d)} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dirs", nargs="+", help="quickstart --out directories, one per seed")
    p.add_argument("--budget", default="default", choices=tuple(quickstart.BUDGETS))
    args = p.parse_args(argv)
    try:
        text = tables(read_records(args.dirs, args.budget))
    except UserError as e:
        sys.exit(f"error: {e}")
    print(text)
    return text


if __name__ == "__main__":
    main()
