"""The README's first command in its reduced form: real SmolLM2, stage 0 -> stage 1 -> eval -> generate."""

import json

import pytest
from click.testing import CliRunner

from mlx_coconut.cli import main


@pytest.mark.slow
def test_quickstart_small(smollm2_gguf_path, tmp_path):
    out = tmp_path / "qs"
    r = CliRunner().invoke(main, ["quickstart", "--small", "--out", str(out)])
    assert r.exit_code == 0, r.output
    stdout = r.stdout
    # the eval block, both stages, and a generate --show-latents of the stage-1 run
    assert "Stage 0 (CoT):      Accuracy = " in stdout
    assert "Stage 1 (COCONUT):  Accuracy = " in stdout
    assert "Efficiency gain: " in stdout and "Quality: " in stdout
    assert "<|start-latent|>" in stdout and "  thought 1  norm " in stdout
    assert "quickstart finished in" in stdout

    report = (out / "report.md").read_text()
    assert "| Stage 0 (CoT) |" in report and "| Stage 1 (COCONUT) |" in report
    results = json.loads((out / "results.json").read_text())
    assert results["n"] == 4 and [m["label"] for m in results["models"]] == ["Stage 0 (CoT)",
                                                                            "Stage 1 (COCONUT)"]
    m0, m1 = results["models"]
    assert m0["mean_thoughts"] == 0 and m1["mean_thoughts"] == 1   # c=1, every synthetic record has steps
    assert 0 <= m0["accuracy"] <= 1 and m0["correct"] == sum(e["correct"] for e in m0["examples"])

    try:
        import matplotlib  # noqa: F401
        assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    except ImportError:
        pass

    # held-out test questions never appear in training
    train = {r["question"] for r in json.loads((out / "data" / "train.json").read_text())}
    test = [r["question"] for r in json.loads((out / "data" / "test.json").read_text())]
    assert len(test) == 4 and not train & set(test)

    # both runs are complete run directories; stage 1 was initialised from stage 0
    s1 = json.loads((out / "runs" / "stage1" / "coconut.json").read_text())
    assert s1["settings"]["stage"] == 1 and s1["settings"]["c_thought"] == 1
    assert s1["init"].endswith("stage0")


def test_quickstart_warns_without_openblas(monkeypatch):
    from mlx_coconut import quickstart

    monkeypatch.setattr(quickstart.sys, "platform", "linux")
    monkeypatch.setenv("LD_PRELOAD", "")
    assert "LD_PRELOAD" in quickstart.blas_warning() and "OpenBLAS" in quickstart.blas_warning()
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libopenblas.so.0")
    assert quickstart.blas_warning() == ""
