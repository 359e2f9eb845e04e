"""The README's first command: `mlx-coconut quickstart` (its CI form, --budget small), the paragraph it
prints and the recorded command lines."""

import json

import pytest
from click.testing import CliRunner

from mlx_coconut import quickstart
from mlx_coconut.cli import main


@pytest.mark.slow
def test_quickstart_small(smollm2_gguf_path, tmp_path):
    out = tmp_path / "qs"
    r = CliRunner().invoke(main, ["quickstart", "--budget", "small", "--out", str(out)])
    assert r.exit_code == 0, r.output
    stdout = r.stdout
    # the eval block with the three runs, and a generate --show-latents of the COCONUT run
    for line in ("Stage 0 (CoT):      Accuracy = ", "Stage 0 (no-CoT):   Accuracy = ",
                 "Stage 1 (COCONUT):  Accuracy = "):
        assert line in stdout
    assert "<|start-latent|>" in stdout and "  thought 1  norm " in stdout
    assert "quickstart finished in" in stdout

    results = json.loads(quickstart.output(out, "small", "results.json").read_text())
    assert quickstart.output(out, "small", "results.json").name == "results-small.json"
    assert results["n"] == 4
    assert [m["settings"]["mode"] for m in results["models"]] == ["cot", "no-cot", "coconut"]
    # the printed paragraph is the one computed from results.json
    paragraph = stdout.split("== what this shows\n")[1].split("\n")[0]
    assert paragraph == quickstart.interpret(results)
    assert "| Stage 0 (no-CoT) |" in quickstart.output(out, "small", "report.md").read_text()

    # quickstart.json: every step as a command line; rerunning one by hand gives the same file
    record = json.loads(quickstart.output(out, "small", "quickstart.json").read_text())
    labels = [s["label"] for s in record["steps"]]
    assert labels[:7] == ["convert", "data train", "data valid", "data test", "train cot",
                          "train no-cot", "train coconut"] and "eval" in labels
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
    assert r.output.count("already complete") == 3


def _results(cot, nocot, coco, coco_thoughts=1):
    """An eval --json document with per-question records: (correct flags, generated tokens)."""
    def model(mode, label, rows, thoughts):
        return {"label": label, "settings": {"mode": mode},
                "examples": [{"correct": c, "n_generated": g, "n_latents": thoughts} for c, g in rows]}
    return {"models": [model("cot", "Stage 0 (CoT)", cot, 0), model("no-cot", "Stage 0 (no-CoT)", nocot, 0),
                       model("coconut", "Stage 1 (COCONUT)", coco, coco_thoughts)]}


def test_interpretation_recounts_the_records():
    res = _results(cot=[(True, 20)] * 5 + [(False, 20)] * 5,      # 50%, 20 tokens
                   nocot=[(True, 4)] * 2 + [(False, 4)] * 8,      # 20%
                   coco=[(True, 11)] * 4 + [(False, 11)] * 6)     # 40%, 11 + 1 thought
    text = quickstart.interpret(res)
    assert "answered 40.0% correctly, 80% of CoT's 50.0%, with 40% fewer tokens" in text
    assert "(12.0 vs 20.0" in text and "reached 20.0%, so COCONUT is 20.0 points above it" in text
    assert text.endswith("All five goals are met.")
    res = _results(cot=[(True, 20)] * 3 + [(False, 20)] * 7, nocot=[(True, 4)] * 3 + [(False, 4)] * 7,
                   coco=[(True, 30)] * 2 + [(False, 30)] * 8)
    text = quickstart.interpret(res)
    assert "55% more tokens" in text and "10.0 points below it" in text
    assert "0 of 5 goals are met" in text and "CoT accuracy >= 40%" in text
