"""The README's first command: `mlx-coconut quickstart` (its CI form, --budget small), the paragraph it
prints and the recorded command lines."""

import json

import pytest
from click.testing import CliRunner

from mlx_coconut import quickstart
from mlx_coconut.cli import main


@pytest.mark.slow
def test_quickstart_small(smollm2_gguf_path, tmp_path):
    """--budget small runs every row of the long table end to end (a few steps each), two training
    runs at a time as child processes."""
    out = tmp_path / "qs"
    r = CliRunner().invoke(main, ["quickstart", "--budget", "small", "--jobs", "2", "--out", str(out)])
    assert r.exit_code == 0, r.output
    stdout = r.stdout
    # the eval block with every row, and a generate --show-latents of the COCONUT run
    for line in ("Stage 0 (CoT):", "Stage 0 (no-CoT):", "Stage 1 (COCONUT, c=2):",
                 "Stage 1 (pause as thought, c=2):", "Stage 1 (w/o thought, c=2):",
                 "Stage 2 (COCONUT, c=2) [coconut-2]:", "Stage 2 (pause as thought, c=2):",
                 "Stage 2 (w/o thought, c=2):", "Stage 2 (COCONUT, c=2) [no-curriculum]:"):
        assert line in stdout
    assert "<|start-latent|>" in stdout and "  thought 1  norm " in stdout
    assert "quickstart finished in" in stdout

    results = json.loads(quickstart.output(out, "small", "results.json").read_text())
    assert quickstart.output(out, "small", "results.json").name == "results-small.json"
    assert results["n"] == 4
    assert [m["settings"]["mode"] for m in results["models"]] == [
        "cot", "no-cot", "coconut", "pause", "no-thought", "coconut", "pause", "no-thought", "coconut"]
    assert [m["settings"]["stage"] for m in results["models"]] == [0, 0, 1, 1, 1, 2, 2, 2, 2]
    runs = {key: out / "runs" / key for key in quickstart.BUDGETS["small"].rows}
    # the printed table and paragraph are the ones computed from results.json
    swapped = json.loads(quickstart.output(out, "small", "swapped.json").read_text())
    assert swapped["models"][0]["settings"]["thoughts"] == "swapped"
    paragraph = stdout.split("== what this shows\n")[1].split("\n")[0]
    assert paragraph == quickstart.interpret(results, runs, swapped)
    assert "Fed another question's continuous thoughts" in paragraph
    printed = stdout.split("== the table in miniature\n")[1].split("\n\n")[0]
    assert printed == quickstart.table(results, runs, swapped)
    assert printed.splitlines()[-1].startswith(quickstart.SWAPPED_NAME)
    report = quickstart.output(out, "small", "report.md").read_text()
    assert "| Stage 0 (no-CoT) |" in report and paragraph in report and "w/o curriculum" in report
    # the whole curriculum starts from the stage-1 run; w/o curriculum straight from CoT
    assert json.loads((out / "runs" / "coconut-2" / "coconut.json").read_text())["init"].endswith("coconut")
    assert json.loads((out / "runs" / "no-curriculum" / "coconut.json").read_text())["init"].endswith("cot")
    assert json.loads((out / "runs" / "pause-2" / "coconut.json").read_text())["init"].endswith("pause")
    assert json.loads((out / "runs" / "no-thought-2" / "coconut.json").read_text())["init"].endswith("no-thought")

    # quickstart.json: every step as a command line; rerunning one by hand gives the same file
    record = json.loads(quickstart.output(out, "small", "quickstart.json").read_text())
    assert record["jobs"] == 2
    trained = [s for s in record["steps"] if s["label"].startswith("train ")]
    assert all(s["blas_threads"] >= 1 and s["started"] >= 0 for s in trained)
    assert "train --init" in (out / "logs" / "coconut-2.log").read_text()  # each run's own output
    labels = [s["label"] for s in record["steps"]]
    assert labels[:6] == ["convert", "data train", "data valid", "data test", "train cot",
                          "train no-cot"] and "train no-curriculum" in labels
    # each run evaluated apart, as a child on spare cores; then one table of them all, here
    evals = [s for s in record["steps"] if s["label"].startswith("eval ")]
    assert [s["label"] for s in evals] == [f"eval {k}" for k in runs] + ["eval swapped"]
    assert all(s["started"] >= 0 for s in evals) and labels[-2:] == ["results", "plot"]
    assert (out / "logs" / "eval-swapped.log").exists()
    assert {g["goal"] for g in record["goals"]} >= set(quickstart.GOALS) | {quickstart.LAST_STAGE_GOAL}
    test_cmd = next(s["command"] for s in record["steps"] if s["label"] == "data test")
    argv = test_cmd.split()[1:]
    again = tmp_path / "again.json"
    argv[argv.index("--out") + 1] = str(again)
    assert CliRunner().invoke(main, argv).exit_code == 0
    assert again.read_text() == (out / "data" / "test.json").read_text()

    # held-out test questions never appear in training
    train = {r["question"] for r in json.loads((out / "data" / "train.json").read_text())}
    test = [r["question"] for r in json.loads((out / "data" / "test.json").read_text())]
    assert len(test) == 4 and not train & set(test)
    s1 = json.loads((out / "runs" / "coconut" / "coconut.json").read_text())
    assert s1["settings"]["stage"] == 1 and s1["init"].endswith("cot")

    # a second run continues: every run complete, nothing retrained
    r = CliRunner().invoke(main, ["quickstart", "--budget", "small", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert r.output.count("already complete") == len(runs)
    # another seed in the same --out is refused in one line, nothing retrained or overwritten
    r = CliRunner().invoke(main, ["quickstart", "--budget", "small", "--seed", "1", "--out", str(out)])
    assert r.exit_code == 2 and "trained with --seed 0, this quickstart needs 1" in r.output
    assert (out / "data" / "test.json").read_text() == again.read_text()


def _argv_by_label(plan):
    return {s.label: [str(a) for a in s.argv] for s in plan.steps}


def test_seed_changes_the_splits_and_the_order_and_nothing_else(tmp_path):
    """--seed N: new `data synth` seeds for the three splits and a new `train --seed`; every other
    flag (the task, the budget) is the same."""
    gguf = tmp_path / "m.gguf"
    for budget in quickstart.BUDGETS:
        a = _argv_by_label(quickstart.make_plan(tmp_path, budget, gguf, seed=0))
        b = _argv_by_label(quickstart.make_plan(tmp_path, budget, gguf, seed=2))
        assert a.keys() == b.keys()
        for label in a:
            diff = [i for i, (x, y) in enumerate(zip(a[label], b[label])) if x != y]
            flags = {a[label][i - 1] for i in diff}
            if label.startswith("data"):
                assert flags == {"--seed"}, label
            elif label.startswith("train") and "--model" in a[label]:
                assert flags == {"--seed"} and b[label][b[label].index("--seed") + 1] == "2"
            else:  # --init runs inherit the seed; eval and plot are the same commands
                assert diff == [], label
    seeds = [quickstart.split_seeds(n) for n in range(4)]
    assert len({v for s in seeds for v in s.values()}) == 12  # disjoint across splits and seeds
    assert quickstart.split_seeds(0) == {"train": 0, "valid": 1, "test": 2}  # seed 0: as before


def test_a_run_of_another_seed_is_refused_before_any_step(tmp_path):
    """The same --out with another --seed: one line, and no step runs (the data stay as trained)."""
    from mlx_coconut.errors import UserError

    plan = quickstart.make_plan(tmp_path, "default", tmp_path / "m.gguf", seed=1)
    cot = plan.runs["cot"]
    cot.mkdir(parents=True)
    (cot / "coconut.json").write_text(json.dumps({"checkpoint": "ckpt-0000050",
                                                  "config": {"seed": 0, "epochs": 1, "mode": "cot"}}))
    calls = []
    with pytest.raises(UserError, match="trained with --seed 0, this quickstart needs 1"):
        quickstart.execute(plan, calls.append, log=lambda *a: None)
    assert calls == []
    same = quickstart.make_plan(tmp_path, "default", tmp_path / "m.gguf", seed=0)
    quickstart.execute(same, calls.append, log=lambda *a: None)  # seed 0: resumed, not retrained
    assert ["train", "--resume", "--out", str(cot)] in calls


def test_a_full_weight_run_is_refused_where_the_quickstart_trains_lora(tmp_path):
    """An --out from an older quickstart (full fine-tuning): one line naming --lora, no step runs."""
    from mlx_coconut.errors import UserError

    plan = quickstart.make_plan(tmp_path, "default", tmp_path / "m.gguf", seed=0)
    coco = plan.runs["coconut"]
    coco.mkdir(parents=True)
    latent = quickstart.BUDGETS["default"].latent_flags
    config = {"seed": 0, "epochs": int(latent[latent.index("--epochs") + 1]), "mode": "coconut",
              "stage": 1, "c_thought": 2, "lora": False}
    (coco / "coconut.json").write_text(json.dumps({"checkpoint": "ckpt-0000250", "config": config}))
    calls = []
    with pytest.raises(UserError, match="trained with --no-lora, this quickstart needs --lora"):
        quickstart.execute(plan, calls.append, log=lambda *a: None)
    assert calls == []
    config["lora"] = True
    (coco / "coconut.json").write_text(json.dumps({"checkpoint": "ckpt-0000250", "config": config}))
    quickstart.execute(plan, calls.append, log=lambda *a: None)
    assert ["train", "--resume", "--out", str(coco)] in calls


def test_seed_draws_other_questions(tmp_path):
    from mlx_coconut.data import synth_records

    task = dict(min_steps=2, max_steps=2, ops=("add", "sub"), max_value=20)
    q0 = {r.question for r in synth_records(50, quickstart.split_seeds(0)["test"], **task)}
    q1 = {r.question for r in synth_records(50, quickstart.split_seeds(1)["test"], **task)}
    assert len(q0 & q1) < 10


def _results(**rows):
    """An eval --json document with per-question records: {key: (correct flags, tokens, thoughts)}."""
    models = []
    for key, (rows_, thoughts) in rows.items():
        row = quickstart.ROWS[key]
        models.append({"path": f"/r/{key}", "label": f"Stage {row.stage} ({row.name})",
                       "settings": {"mode": row.flags[1]},
                       "examples": [{"correct": c, "n_generated": g, "n_latents": thoughts,
                                     "prediction": "right" if c else "wrong"} for c, g in rows_]})
    return {"models": models}, {key: f"/r/{key}" for key in rows}


def _swapped(correct: list, tokens: int, thoughts: int, predictions: list) -> dict:
    """The swapped-thoughts eval of /r/coconut: per question correct, tokens, prediction."""
    return {"models": [{"path": "/r/coconut", "label": "Stage 1 (COCONUT), thoughts swapped",
                        "examples": [{"correct": c, "n_generated": tokens, "n_latents": thoughts,
                                      "prediction": p} for c, p in zip(correct, predictions)]}]}


def test_interpretation_recounts_the_records():
    res, runs = _results(cot=([(True, 20)] * 5 + [(False, 20)] * 5, 0),      # 50%, 20 tokens
                         **{"no-cot": ([(True, 4)] * 2 + [(False, 4)] * 8, 0)},   # 20%
                         coconut=([(True, 11)] * 4 + [(False, 11)] * 6, 1))       # 40%, 11 + 1 thought
    text = quickstart.interpret(res, runs)
    assert "answered 40.0% correctly, 80% of CoT's 50.0%, with 40% fewer tokens" in text
    assert "(12.0 vs 20.0" in text and "reached 20.0%, so COCONUT is 20.0 points above it" in text
    assert "No training control ran" in text  # the three-row default says what it cannot show
    assert text.endswith("All 5 goals are met.")
    # the same COCONUT fed other questions' thoughts: 2 of its 4 right answers lost, 3 answers changed
    own = ["right"] * 4 + ["wrong"] * 6
    sw = _swapped([True] * 2 + [False] * 8, 11, 1, ["right"] * 2 + ["x"] * 2 + ["wrong"] * 5 + ["y"])
    text = quickstart.interpret(res, runs, sw)
    assert ("Fed another question's continuous thoughts in place of its own, COCONUT answered 20.0% "
            "(-20.0 points; 30.0% of its answers changed): its answers depend on") in text
    assert text.endswith("All 5 goals are met.")  # an eval-only row, not one of the five goals
    last = quickstart.table(res, runs, sw).splitlines()[-1]
    assert last.startswith(quickstart.SWAPPED_NAME) and last.split()[-3:] == ["1", "20.0%", "12.0"]
    sw = _swapped([True] * 4 + [False] * 6, 11, 1, own[:9] + ["z"])  # one wrong answer changed
    text = quickstart.interpret(res, runs, sw)
    assert "answered 40.0% (+0.0 points; 10.0% of its answers changed): its answers hardly depend" in text
    res, runs = _results(cot=([(True, 20)] * 3 + [(False, 20)] * 7, 0),
                         **{"no-cot": ([(True, 4)] * 3 + [(False, 4)] * 7, 0)},
                         coconut=([(True, 30)] * 2 + [(False, 30)] * 8, 1))
    text = quickstart.interpret(res, runs)
    assert "55% more tokens" in text and "10.0 points below it" in text
    assert "0 of 5 goals are met" in text and "CoT accuracy >= 40%" in text


def test_interpretation_covers_every_row_of_the_long_table():
    ten = lambda k, g: [(True, g)] * k + [(False, g)] * (10 - k)  # noqa: E731
    res, runs = _results(cot=(ten(5, 20), 0), **{"no-cot": (ten(1, 4), 0)}, coconut=(ten(4, 11), 1),
                         pause=(ten(3, 11), 1), **{"no-thought": (ten(1, 11), 0),
                                                   "coconut-2": (ten(3, 3), 2), "pause-2": (ten(2, 3), 4),
                                                   "no-thought-2": (ten(2, 3), 0),
                                                   "no-curriculum": (ten(1, 3), 2)})
    text = quickstart.interpret(res, runs)
    assert "pause as thought 30.0% (+10.0 points for COCONUT)" in text
    assert "w/o thought 10.0% (+30.0 points for COCONUT)" in text
    assert "pause as thought, whole curriculum 20.0% (+10.0 points for COCONUT, whole curriculum)" in text
    assert "w/o thought, whole curriculum 20.0% (+10.0 points for COCONUT, whole curriculum)" in text
    assert "w/o curriculum 10.0% (+20.0 points for COCONUT, whole curriculum)" in text
    assert "COCONUT answered 30.0% with 5.0 tokens per question" in text
    assert "No training control ran" not in text
    # pause is exactly 10 points below: met; 5.0 tokens and +20 over no-CoT: the last stage's goal met
    assert text.endswith("All 11 goals are met.")
    res["models"][5]["examples"] = [dict(e, n_generated=5) for e in res["models"][5]["examples"]]
    text = quickstart.interpret(res, runs)
    assert text.endswith(f"10 of 11 goals are met; missed: {quickstart.LAST_STAGE_GOAL}.")
    table = quickstart.table(res, runs).splitlines()
    assert len(table) == 10 and table[7].split()[-3:] == ["2", "20.0%", "7.0"]
    assert table[8].split()[-3:] == ["2", "20.0%", "3.0"] and table[9].split()[-3:] == ["2", "10.0%", "5.0"]


def test_seed_table_reads_each_seeds_record(tmp_path, capsys):
    """scripts/seed_table.py: one line a seed, mean ± sd of every row, COCONUT minus each control."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import seed_table

    ten = lambda k: [(True, 3)] * k + [(False, 3)] * (10 - k)  # noqa: E731
    dirs = []
    for seed, (coco, pause) in enumerate(((6, 3), (4, 3), (5, 5))):
        res, runs = _results(cot=(ten(5), 0), **{"no-cot": (ten(1), 0)}, coconut=(ten(coco), 2),
                             pause=(ten(pause), 2))
        d = tmp_path / f"s{seed}"
        d.mkdir()
        record = {"seed": seed, "seconds": 60.0 * (10 + seed), "rows": quickstart.summarize(res, runs)}
        quickstart.output(d, "long", "quickstart.json").write_text(json.dumps(record))
        dirs.append(str(d))
    text = seed_table.main(dirs + ["--budget", "long"])
    lines = text.splitlines()
    assert lines[0].startswith("| seed | CoT | no-CoT | COCONUT | pause as thought |")
    assert lines[2].startswith("| 0 | 50.0% (3.0) | 10.0% (3.0) | 60.0% (5.0) | 30.0% (5.0) |")
    assert lines[5] == ("| mean ± sd | 50.0 ± 0.0% (3.0) | 10.0 ± 0.0% (3.0) | 50.0 ± 10.0% (5.0) | "
                        "36.7 ± 11.5% (5.0) | 11.0 ± 1.0 |")
    assert "| COCONUT − pause as thought | +30.0 | +10.0 | +0.0 | 13.3 ± 15.3 |" in lines
    # with the swapped-thoughts row (one right answer fewer on every seed): a column and a difference
    records = seed_table.read_records(dirs, "long")
    for r, coco in zip(records, (6, 4, 5)):
        own = ["right"] * coco + ["wrong"] * (10 - coco)
        sw = _swapped([True] * (coco - 1) + [False] * (11 - coco), 3, 2, own[:coco - 1] + ["wrong"] * (11 - coco))
        res, runs = _results(cot=(ten(5), 0), **{"no-cot": (ten(1), 0)}, coconut=(ten(coco), 2))
        r["rows"][quickstart.SWAPPED] = quickstart.summarize(res, runs, sw)[quickstart.SWAPPED]
    lines = seed_table.tables(records).splitlines()
    assert lines[0].endswith(f"| {quickstart.SWAPPED_NAME} | minutes (this command) |")
    assert f"| COCONUT − {quickstart.SWAPPED_NAME} | +10.0 | +10.0 | +10.0 | 10.0 ± 0.0 |" in lines
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # a seed that has not run: one line naming its file
        seed_table.main(dirs + [str(tmp_path / "missing"), "--budget", "long"])
    assert "missing/quickstart-long.json: cannot read" in str(e.value) and "\n" not in str(e.value)
