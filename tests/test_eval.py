"""`mlx-coconut eval` and `plot`: counts, accuracy arithmetic, answer extraction, report/JSON content.

Two tiny model directories (random 2-layer Llamas with SmolLM2's real tokenizer + the latent tokens):
a stage-0 CoT model and a stage-1 COCONUT model (settings in coconut.json). Generation is replaced by
a fake that returns known texts per question, so every number below is computed by hand.
"""

import json
import struct

import pytest
from click.testing import CliRunner

from mlx_coconut import coconut
from mlx_coconut.cli import main
from mlx_coconut.data import Record, save_records
from mlx_coconut.evaluate import extract_answer
from helpers import model_dir_with_tokenizer

RECORDS = [
    Record("Tom has 10 boxes of 100 coins. How many coins?", ["<<10*100=1000>>"], "1,000"),
    Record("What is six times seven?", [], "42"),
    Record("Ann has 3 pens and buys 4. How many pens?", ["<<3+4=7>>"], "7"),
    Record("Bo has 3 bags of 4 eggs. How many eggs?", ["<<3*4=12>>"], "12"),
]
# generated text per question: (stage 0 CoT model, stage 1 COCONUT model)
OUTPUTS = {
    RECORDS[0].question: ("<<10*100=1000>>\n### 1,000", "### 1000"),    # comma dropped: both right
    RECORDS[1].question: ("42", "### 42"),        # no '#': the whole text is the prediction -> wrong
    RECORDS[2].question: ("<<3+4=7>>\n### 8", "### 7"),    # right steps, wrong answer (CoT match)
    RECORDS[3].question: ("<<3*4=12>>\n### 12", "### 13"),
}
# hand-computed
STAGE0_CORRECT = [True, False, False, True]        # 2/4 = 50.00%
STAGE1_CORRECT = [True, True, True, False]         # 3/4 = 75.00%
STAGE0_PRED = ["1000", RECORDS[1].question + "\n42", "8", "12"]
STAGE0_COT = [True, False, True, True]             # 3/4 = 75.00%
STAGE1_THOUGHTS = [1, 0, 1, 1]                      # eval prompt caps thoughts at the record's steps


@pytest.fixture(scope="module")
def models(smollm2_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_models")
    s0 = model_dir_with_tokenizer(root / "stage0", smollm2_dir, {"mode": "cot", "stage": 0})
    s1 = model_dir_with_tokenizer(root / "stage1", smollm2_dir, {"mode": "coconut", "stage": 1, "c_thought": 1,
                                                        "pad_latent_to_max": False})  # capped prompts
    return s0, s1


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "test.json"
    save_records(RECORDS, path)
    return path


@pytest.fixture
def fake_generate(monkeypatch):
    """Replace the latent loop's generation: known texts per question; records the prompts seen."""
    seen = []

    def fake(model, prompts, latent_id, eos_ids, max_tokens=64, pad_id=0, sampler=None, feedback=True,
             **kw):
        tok = fake.tokenizer
        tokens = []
        for p in prompts:
            seen.append((list(p), latent_id))
            question = tok.decode([t for t in p if t != latent_id], skip_special_tokens=True).strip()
            coconut_prompt = tok.convert_tokens_to_ids("<|start-latent|>") in p  # markers: stage 1
            text = OUTPUTS[question][1 if coconut_prompt else 0]
            tokens.append(tok.encode(text, add_special_tokens=False)[:max_tokens])
        return coconut.Generation(tokens=tokens, finished=[True] * len(prompts),
                                  timings={"latent": 0.0, "text": 0.0})

    from mlx_lm.tokenizer_utils import load as load_tok
    from mlx_coconut import evaluate as ev

    monkeypatch.setattr(ev.coconut, "generate", fake)
    fake.seen = seen
    fake.tokenizer = None

    def set_tokenizer(path):
        fake.tokenizer = load_tok(path)

    fake.set_tokenizer = set_tokenizer
    return fake


def test_extract_answer_official():
    assert extract_answer("<<2*3=6>>\n### 1,000") == "1000"
    assert extract_answer("no hash at all 42 ") == "no hash at all 42"   # whole text when no '#'
    assert extract_answer("a # b ### 7\n") == "7"                       # after the last '#'
    assert extract_answer("###") == ""


def _run(args):
    result = CliRunner().invoke(main, args)
    return result


def test_eval_two_models_side_by_side(models, data_file, fake_generate, tmp_path):
    s0, s1 = models
    fake_generate.set_tokenizer(s0)
    report, js = tmp_path / "r" / "report.md", tmp_path / "results.json"
    r = _run(["eval", "--model", str(s0), "--model", str(s1), "--data", str(data_file),
              "--batch-size", "3", "--report", str(report), "--json", str(js)])
    assert r.exit_code == 0, r.output
    tok = fake_generate.tokenizer
    n_text0 = [len(tok.encode(OUTPUTS[q.question][0], add_special_tokens=False)) for q in RECORDS]
    n_text1 = [len(tok.encode(OUTPUTS[q.question][1], add_special_tokens=False)) for q in RECORDS]
    avg0 = sum(n_text0) / 4
    avg1 = (sum(n_text1) + sum(STAGE1_THOUGHTS)) / 4      # paper-style: text tokens + thoughts

    out = r.stdout.splitlines()   # the progress bars go to stderr
    block = [l for l in out if l.startswith("Stage ")]
    assert block[0].startswith(f"Stage 0 (CoT):      Accuracy = 50.00%  Avg tokens = {avg0:.1f}  Time = ")
    assert block[1].startswith(f"Stage 1 (COCONUT):  Accuracy = 75.00%  Avg tokens = {avg1:.1f}  Time = ")
    gain = 100 * (avg0 - avg1) / avg0
    assert f"Efficiency gain: {gain:.0f}% fewer tokens" in out
    assert "Quality: +25.00% accuracy change" in out
    # stage 1 writes no steps: only the step-less record's (empty) CoT matches -> 1/4
    assert "CoT exact match: Stage 0 (CoT) 75.00%  Stage 1 (COCONUT) 25.00%" in out
    assert "Example 1:" in out and "  Ground truth: 1000" in out
    assert "  Stage 0 (CoT) answer: 1000 (correct)" in out
    assert "  Stage 1 (COCONUT) answer: 1000 (correct)" in out

    # each model got its own prompt form: CoT prompts have no latents, stage 1 one per step (capped)
    lat = fake_generate.seen[0][1]
    n_lat = sorted(sum(t == lat for t in p) for p, _ in fake_generate.seen)
    assert n_lat == sorted([0, 0, 0, 0] + STAGE1_THOUGHTS)

    data = json.loads(js.read_text())
    assert data["n"] == 4 and data["max_tokens"] == 64
    m0, m1 = data["models"]
    assert (m0["label"], m1["label"]) == ("Stage 0 (CoT)", "Stage 1 (COCONUT)")
    assert [e["correct"] for e in m0["examples"]] == STAGE0_CORRECT
    assert [e["correct"] for e in m1["examples"]] == STAGE1_CORRECT
    assert [e["prediction"] for e in m0["examples"]] == STAGE0_PRED
    assert [e["answer"] for e in m0["examples"]] == ["1000", "42", "7", "12"]
    assert [e["cot_match"] for e in m0["examples"]] == STAGE0_COT
    assert [e["n_latents"] for e in m1["examples"]] == STAGE1_THOUGHTS
    assert (m0["correct"], m1["correct"]) == (2, 3)
    assert m0["accuracy"] == 0.5 and m1["accuracy"] == 0.75 and m0["cot_match"] == 0.75
    assert m0["mean_generated_tokens"] == avg0 and m1["mean_tokens"] == pytest.approx(avg1)
    assert m1["mean_thoughts"] == 0.75
    [c] = data["comparisons"]
    assert c["accuracy_change_pct"] == pytest.approx(25.0)
    assert c["efficiency_gain_pct"] == pytest.approx(gain)

    md = report.read_text()
    assert "| Stage 0 (CoT) |" in md and "| 50.00% | 2/4 | 75.00% |" in md
    assert "| 75.00% | 3/4 | 25.00% |" in md
    assert "+25.00% accuracy" in md and "Ground truth: 1000" in md


def test_eval_one_model_and_samples(models, data_file, fake_generate, tmp_path):
    s0, _ = models
    fake_generate.set_tokenizer(s0)
    r = _run(["eval", "--model", str(s0), "--data", str(data_file), "--samples", "3",
              "--json", str(tmp_path / "one.json")])
    assert r.exit_code == 0, r.output
    assert "Accuracy = 33.33%" in r.stdout            # 1 of the first 3
    assert "Efficiency gain" not in r.output and "Quality" not in r.output
    data = json.loads((tmp_path / "one.json").read_text())
    assert data["n"] == 3 and data["models"][0]["correct"] == 1 and data["comparisons"] == []


def test_eval_results_joins_earlier_evaluations(models, data_file, fake_generate, tmp_path):
    """Two models evaluated apart (`--json` each) and joined with `--results` give the table, report
    and JSON of evaluating them side by side (times aside); a third evaluated alongside comes last."""
    s0, s1 = models
    fake_generate.set_tokenizer(s0)
    together = tmp_path / "together"
    assert _run(["eval", "--model", str(s0), "--model", str(s1), "--data", str(data_file), "--json",
                 str(together / "r.json"), "--report", str(together / "r.md")]).exit_code == 0
    for name, m in (("s0", s0), ("s1", s1)):
        assert _run(["eval", "--model", str(m), "--data", str(data_file), "--json",
                     str(tmp_path / f"{name}.json")]).exit_code == 0
    joined = tmp_path / "joined"
    r = _run(["eval", "--results", str(tmp_path / "s0.json"), "--results", str(tmp_path / "s1.json"),
              "--json", str(joined / "r.json"), "--report", str(joined / "r.md")])
    assert r.exit_code == 0, r.output
    assert "Quality: +25.00% accuracy change" in r.stdout

    def without_times(doc):
        for m in doc["models"]:
            m.pop("seconds")
        return doc
    assert without_times(json.loads((joined / "r.json").read_text())) == \
        without_times(json.loads((together / "r.json").read_text()))

    def report_without_times(path):
        return [line.rsplit("|", 2)[0] if line.startswith("| Stage") else line
                for line in path.read_text().splitlines()]
    assert report_without_times(joined / "r.md") == report_without_times(together / "r.md")
    # evaluated now beside earlier ones: after them, on the same data
    r = _run(["eval", "--results", str(tmp_path / "s1.json"), "--model", str(s0), "--data", str(data_file),
              "--json", str(tmp_path / "mixed.json")])
    assert r.exit_code == 0, r.output
    mixed = json.loads((tmp_path / "mixed.json").read_text())
    assert [m["label"] for m in mixed["models"]] == ["Stage 1 (COCONUT)", "Stage 0 (CoT)"]


def test_eval_results_errors_are_one_line(models, data_file, fake_generate, tmp_path):
    s0, _ = models
    fake_generate.set_tokenizer(s0)
    assert _run(["eval", "--model", str(s0), "--data", str(data_file), "--json",
                 str(tmp_path / "s0.json")]).exit_code == 0
    other = tmp_path / "other.json"
    save_records(RECORDS[:3], other)
    bad = tmp_path / "bad.json"
    bad.write_text("{\"models\": 3}")
    for argv, says in (
            (["eval"], "give --model"),
            (["eval", "--model", str(s0)], "--data: needed"),
            (["eval", "--results", str(tmp_path / "none.json")], "none.json: cannot read"),
            (["eval", "--results", str(bad)], "bad.json: not an `eval --json` file"),
            (["eval", "--results", str(tmp_path / "s0.json"), "--model", str(s0), "--data", str(other)],
             f"scored on {data_file}, not {other}"),
            (["eval", "--results", str(tmp_path / "s0.json"), "--max-tokens", "8"],
             "generated at most 64 tokens, not 8")):
        r = _run(argv)
        assert r.exit_code == 2 and says in r.output and len(r.output.strip().splitlines()) == 1, (argv, r.output)


def test_eval_errors_are_one_line(models, data_file, tmp_path):
    s0, _ = models
    r = _run(["eval", "--model", str(tmp_path / "nope"), "--data", str(data_file)])
    assert r.exit_code == 2 and r.output.strip() == f"error: --model {tmp_path / 'nope'}: no such directory"
    r = _run(["eval", "--model", str(tmp_path), "--data", str(data_file)])
    assert r.exit_code == 2 and "not a model directory" in r.output and len(r.output.strip().splitlines()) == 1
    r = _run(["eval", "--model", str(s0), "--data", str(tmp_path / "missing.json")])
    assert r.exit_code == 2 and "missing.json" in r.output and len(r.output.strip().splitlines()) == 1
    bad = tmp_path / "bad.json"
    bad.write_text("[\n{\"question\": \"q\"}\n]\n")
    r = _run(["eval", "--model", str(s0), "--data", str(bad)])
    assert r.exit_code == 2 and "bad.json" in r.output and len(r.output.strip().splitlines()) == 1


# ---------------------------------------------------------------- plot


def _fake_run(path, stage, n_steps, loss0):
    path.mkdir(parents=True)
    with open(path / "metrics.jsonl", "w") as f:
        for s in range(1, n_steps + 1):
            f.write(json.dumps({"step": s, "stage": stage, "epoch": 1 + (s > n_steps // 2),
                                "loss": loss0 / s ** 0.5}) + "\n")
    evals = [{"epoch": e, "step": e * n_steps // 2, "stage": stage, "valid_loss": loss0 / (e + 1),
              "accuracy": 0.1 * e + 0.1 * stage} for e in (1, 2)]
    (path / "eval.json").write_text(json.dumps(evals))
    return path


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    from mlx_coconut.report import read_curves

    a = _fake_run(tmp_path / "stage0", 0, 20, 2.0)
    b = _fake_run(tmp_path / "stage1", 1, 10, 1.5)
    assert read_curves(b)["stage"] == 1 and len(read_curves(a)["loss"]) == 20
    out = tmp_path / "curves.png"
    r = _run(["plot", str(a), str(b), "--out", str(out)])
    assert r.exit_code == 0, r.output
    head = out.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", head[16:24])
    assert width > 800 and height > 300


def test_plot_with_results_adds_the_tradeoff_panel(tmp_path):
    """--results: a third panel, test accuracy against tokens per question, one point per model."""
    pytest.importorskip("matplotlib")
    from mlx_coconut.report import read_points

    a = _fake_run(tmp_path / "stage0", 0, 20, 2.0)
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"models": [
        {"label": "Stage 0 (CoT)", "mean_tokens": 22.4, "accuracy": 0.5},
        {"label": "Stage 1 (COCONUT)", "mean_tokens": 14.0, "accuracy": 0.45}]}))
    assert read_points(results) == [("Stage 0 (CoT)", 22.4, 50.0), ("Stage 1 (COCONUT)", 14.0, 45.0)]
    two, three = tmp_path / "two.png", tmp_path / "three.png"
    assert _run(["plot", str(a), "--out", str(two)]).exit_code == 0
    r = _run(["plot", str(a), "--results", str(results), "--out", str(three)])
    assert r.exit_code == 0, r.output
    width = lambda p: struct.unpack(">I", p.read_bytes()[16:20])[0]  # noqa: E731
    assert width(three) > 1.4 * width(two)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"n": 3}))
    r = _run(["plot", str(a), "--results", str(bad), "--out", str(three)])
    assert r.exit_code == 2 and "not an `mlx-coconut eval --json` document" in r.output


def test_plot_errors(tmp_path, monkeypatch):
    r = _run(["plot", str(tmp_path / "nope"), "--out", str(tmp_path / "c.png")])
    assert r.exit_code == 2 and "no such run directory" in r.output
    (tmp_path / "empty").mkdir()
    r = _run(["plot", str(tmp_path / "empty"), "--out", str(tmp_path / "c.png")])
    assert r.exit_code == 2 and "no metrics.jsonl" in r.output
    import builtins
    real_import = builtins.__import__

    def no_matplotlib(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    r = _run(["plot", str(_fake_run(tmp_path / "s0", 0, 4, 1.0)), "--out", str(tmp_path / "c.png")])
    assert r.exit_code == 2
    assert r.output.strip() == "error: plot needs matplotlib: pip install 'mlx-coconut[plot]' (or pip install matplotlib)"


def test_the_tradeoff_panel_names_every_point_in_its_legend():
    """Rows close together (COCONUT beside CoT, pause beside the whole curriculum) must stay readable:
    each model is a legend entry in its own colour, with no labels drawn over the points."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlx_coconut.report import _plot_tradeoff

    points = [("Stage 0 (CoT)", 22.5, 42.5), ("Stage 1 (COCONUT, c=2)", 15.4, 40.5),
              ("Stage 1 (w/o thought, c=2)", 13.4, 41.0)]
    fig, ax = plt.subplots()
    try:
        _plot_tradeoff(ax, points)
        assert [t.get_text() for t in ax.get_legend().get_texts()] == [p[0] for p in points]
        assert len(ax.texts) == 0
    finally:
        plt.close(fig)
