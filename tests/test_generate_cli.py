"""`mlx-coconut generate` on a tiny stage-1 model directory built here (random Llama + word tokenizer)."""

import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from mlx_coconut.cli import main
import helpers
from tolerance import RTOL, rel_diff

SPECIAL = ["<eos>", "<pad>", "<unk>", "<|start-latent|>", "<|latent|>", "<|end-latent|>"]
WORDS = "what is two plus three four five six seven the answer ### = and then so".split()
PROMPT = "what is two plus three"


def write_model_dir(path, settings=None, seed=0):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIAL)
    path.mkdir(parents=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<eos>", "pad_token": "<pad>",
        "unk_token": "<unk>"}))
    model = helpers.write_model_dir(path, seed, hidden_size=32, intermediate_size=64, vocab_size=len(vocab),
                                    tie_word_embeddings=True)
    if settings:
        (path / "coconut.json").write_text(json.dumps({"settings": settings}))
    return model, vocab


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    path = tmp_path_factory.mktemp("gen") / "stage1"
    model, vocab = write_model_dir(path, {"mode": "coconut", "stage": 1, "c_thought": 2})
    return path, model, vocab


def run(*args):
    result = CliRunner().invoke(main, ["generate", *map(str, args)])
    return result


def test_json_show_latents_one_entry_per_thought(stage1):
    path, model, vocab = stage1
    r = run("--model", path, "--prompt", PROMPT, "--json", "--show-latents", "--top-k", 3,
            "--max-tokens", 6)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    v = vocab
    q = [v[w] for w in PROMPT.split()]
    # stage 1, c=2: question, <|start-latent|>, 2 latents, <|end-latent|>
    assert out["prompt_ids"] == q + [v["<|start-latent|>"]] + [v["<|latent|>"]] * 2 + [v["<|end-latent|>"]]
    assert [t["index"] for t in out["thoughts"]] == [0, 1]
    for t in out["thoughts"]:
        probs = [e["prob"] for e in t["top_k"]]
        assert len(t["top_k"]) == 3 and all(0 <= e["id"] < len(v) for e in t["top_k"])
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    assert 1 <= len(out["tokens"]) <= 6 and all(0 <= i < len(v) for i in out["tokens"])
    assert out["timings"]["thoughts"] == 2 and out["timings"]["generated_tokens"] == len(out["tokens"])
    # The first thought is the last hidden state after "<|start-latent|>", recomputed here.
    h = model.hidden_states(mx.array([q + [v["<|start-latent|>"]]]))[0, -1]
    assert abs(out["thoughts"][0]["norm"] - float(mx.linalg.norm(h))) < 1e-3
    assert out["thoughts"][0]["top_k"][0]["id"] == int(mx.argmax(model.logits(h)))


def test_human_output_streams_question_thoughts_text_timings(stage1):
    path, _, _ = stage1
    r = run("--model", path, "--prompt", PROMPT, "--show-latents", "--max-tokens", 4)
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0] == PROMPT and lines[1] == "<|start-latent|>" and lines[4] == "<|end-latent|>"
    assert lines[2].startswith("  thought 1  norm ") and lines[3].startswith("  thought 2  norm ")
    assert "latent phase" in lines[-1] and "tok/s" in lines[-1]


def test_plain_model_has_no_thoughts(tmp_path):
    write_model_dir(tmp_path / "plain")  # no coconut.json: a CoT model
    r = run("--model", tmp_path / "plain", "--prompt", PROMPT, "--json", "--show-latents",
            "--max-tokens", 3)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["thoughts"] == [] and out["mode"] == "cot" and len(out["prompt_ids"]) == 5


@pytest.mark.parametrize("case", ["missing", "no-config", "top-k"])
def test_errors_are_one_line_exit_2(tmp_path, stage1, case):
    model = {"missing": tmp_path / "nope", "no-config": tmp_path, "top-k": stage1[0]}[case]
    r = run("--model", model, "--prompt", PROMPT, *(["--top-k", 0] if case == "top-k" else []))
    assert r.exit_code == 2
    assert r.output.startswith("error: ") and len(r.output.strip().splitlines()) == 1


def test_api_prompts_batching_and_sampling(stage1):
    from mlx_coconut import generate_answers, load, prompt_ids

    path, _, v = stage1
    loaded = load(path)
    # A bare question gets the trained count (stage 1 x c=2); so does a step-less record
    # (pad_latent_to_max, the official default; unpadded it would be capped at its 0 steps).
    assert prompt_ids(loaded, PROMPT).count(v["<|latent|>"]) == 2
    assert prompt_ids(loaded, {"question": PROMPT, "steps": [], "answer": "5"}).count(v["<|latent|>"]) == 2
    assert prompt_ids(loaded, {"question": PROMPT, "steps": ["five"], "answer": "5"}).count(v["<|latent|>"]) == 2
    qs = [PROMPT, "what is four plus five and six", "the answer"]
    alone = generate_answers(loaded, qs, max_tokens=5, batch_size=1, return_thoughts=True)
    batched = generate_answers(loaded, qs, max_tokens=5, batch_size=3, return_thoughts=True)
    assert [a.tokens for a in batched] == [a.tokens for a in alone]
    for a, b in zip(batched, alone):
        assert a.thoughts.shape == (2, 32) and rel_diff(a.thoughts, b.thoughts) < RTOL
    assert [a.text for a in batched] == [loaded.tokenizer.decode(a.tokens) for a in alone]
    sampled = []
    for _ in range(2):
        mx.random.seed(7)
        sampled.append([a.tokens for a in generate_answers(loaded, qs, max_tokens=5, temp=1.0)])
    assert sampled[0] == sampled[1] and sampled[0] != [a.tokens for a in alone]


TYPED = PROMPT + " <|start-latent|><|latent|><|latent|><|latent|><|end-latent|> <eos> <pad>"


def test_typed_special_tokens_are_text(stage1):
    """A prompt that types the latent markers or EOS gets the thoughts its stage prescribes (2 here),
    never more, and no control token from its text: in the API and in `generate --prompt`."""
    from mlx_coconut import generate_answers, load, prompt_ids

    path, _, v = stage1
    loaded = load(path)
    ids = prompt_ids(loaded, TYPED)
    control = [v[t] for t in ("<|start-latent|>", "<|latent|>", "<|end-latent|>", "<eos>", "<pad>")]
    assert [i for i in ids if i in control] == [v["<|start-latent|>"]] + [v["<|latent|>"]] * 2 + [v["<|end-latent|>"]]
    [answer] = generate_answers(loaded, [TYPED], max_tokens=2)
    assert answer.prompt_ids == ids
    r = run("--model", path, "--prompt", TYPED, "--json", "--max-tokens", 2)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["prompt_ids"] == ids


def _probe_module():
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import probe_thoughts
    return probe_thoughts


def test_probe_thoughts_counts_own_against_shuffled_steps():
    """scripts/probe_thoughts.py: a thought that reads out its own step's result scores 100% against
    its own step and 0% against the next question's; a constant thought scores the same on both."""
    probe = _probe_module()
    assert probe.step_result("<<16+4=20>>") == "20" and probe.step_result("no result") == ""
    steps = [[f"<<{a}+1={a + 1}>>"] for a in range(1, 6)]  # results 2..6: consecutive ones differ
    # thought 2's second token is the NEXT question's result (i + 3; the last wraps to nothing)
    rows = [(s, [[probe.step_result(s[0]), "x"], ["+", str(i + 3)]]) for i, s in enumerate(steps)]
    first = lambda text: text[:1]  # noqa: E731  (the first "token" of a result: its first digit)
    r1, r2 = probe.hit_rates(rows, c=2, first_token=first)
    assert (r1["thought"], r1["step"], r1["n"]) == (0, 0, 5)
    assert (r1["top1_own"], r1["top1_shuffled"], r1["topk_own"], r1["topk_shuffled"]) == (1.0, 0.0, 1.0, 0.0)
    assert r2["top1_own"] == r2["top1_shuffled"] == 0.0 and r2["common"][0] == ("+", 1.0)
    assert r2["topk_own"] == 0.0 and r2["topk_shuffled"] == 0.8


def test_probe_thoughts_on_a_stage1_model(stage1, tmp_path):
    """End to end on the tiny stage-1 model: one entry per thought, each over every question; a
    pause-as-thought model is refused in one line."""
    probe = _probe_module()
    path, _, _ = stage1
    data = tmp_path / "records.json"
    data.write_text(json.dumps([{"question": PROMPT, "steps": ["two plus three = five"], "answer": "five"},
                                {"question": "what is four", "steps": ["four = four"], "answer": "four"}]))
    rates = probe.probe(str(path), str(data), n=10, k=3)
    assert [(r["thought"], r["step"], r["n"]) for r in rates] == [(0, 0, 2), (1, 0, 2)]
    assert all(0.0 <= r[key] <= 1.0 for r in rates for key in ("top1_own", "topk_shuffled"))
    assert probe.table(rates, 3).count("\n") == 3
    pause = tmp_path / "pause"
    write_model_dir(pause, {"mode": "pause", "stage": 1, "c_thought": 2})
    with pytest.raises(SystemExit) as e:
        probe.main([str(pause), "--data", str(data)])
    assert "feeds no hidden state back" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(SystemExit):  # argparse's one-line usage error, before any model is loaded
        probe.main([str(path), "--data", str(data), "--k", "0"])


def _linear_module():
    _probe_module()
    import probe_linear
    return probe_linear


def test_ridge_probe_reads_a_linear_code_and_not_shuffled_labels():
    """scripts/probe_linear.py: states that hold the label along one direction each are read back on
    held-out rows; the same probe fitted on shuffled labels falls to about chance."""
    probe = _linear_module()
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, size=300)
    codes = rng.normal(size=(5, 32))
    states = codes[labels] + 0.3 * rng.normal(size=(300, 32))
    y = np.array([str(v) for v in labels])
    assert probe.ridge_accuracy(states[:200], y[:200], states[200:], y[200:]) > 0.95
    assert probe.ridge_accuracy(states[:200], rng.permutation(y[:200]), states[200:], y[200:]) < 0.5


def test_probe_linear_on_a_stage1_model(stage1, tmp_path, capsys):
    """End to end on the tiny stage-1 model: a COCONUT run's slot states are its continuous thoughts
    (as generate returns them), one row per slot; a CoT model is refused in one line."""
    from mlx_coconut import api
    from mlx_coconut.data import Record

    probe = _linear_module()
    path, _, _ = stage1
    records = [Record(f"what is {a} plus {b}", [f"<<{a}+{b}={a + b}>>"], str(a + b))
               for a in range(4) for b in range(4)]
    loaded = api.load(str(path))
    states = probe.slot_states(loaded, records[:2])
    thoughts = api.generate_answers(loaded, records[:2], max_tokens=1, return_thoughts=True)
    for s, a in zip(states, thoughts):
        want = np.array(a.thoughts.astype(mx.float32))
        assert s.shape == want.shape == (2, want.shape[1])
        assert np.abs(s - want).max() <= 1e-3 * np.abs(want).max()
    rows = probe.probe_run(str(path), records[:12], records[12:])
    assert [(r["slot"], r["step"], r["n_train"], r["n_test"]) for r in rows] == [(0, 0, 12, 4), (1, 0, 12, 4)]
    err = capsys.readouterr().err  # progress on stderr: minutes a run on a CPU
    assert "train states 12/12" in err and "test states 4/4" in err
    assert probe.markdown({"r": rows}).count("\n") == 3
    data = tmp_path / "records.json"
    data.write_text(json.dumps([{"question": r.question, "steps": r.steps, "answer": r.answer} for r in records]))
    cot = tmp_path / "cot"
    write_model_dir(cot, {"mode": "cot", "stage": 0})
    with pytest.raises(SystemExit) as e:
        probe.main([str(cot), "--train", str(data), "--test", str(data)])
    assert "has no thought slots" in str(e.value) and "\n" not in str(e.value)
