"""Feeding a COCONUT model other thoughts: `continuous_forward(given=...)`, `eval --thoughts
swapped|none` and scripts/probe_swap.py, on tiny random models built here."""

import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import helpers
from test_generate_cli import write_model_dir
from tolerance import rel_diff

from mlx_coconut import api, coconut
from mlx_coconut.data import Record, collate_prompts
from mlx_coconut.evaluate import evaluate, swapped_thoughts, thought_columns


@pytest.fixture(scope="module")
def stage2(tmp_path_factory):
    """A stage-2 c=1 model: a record with one step gets one thought, with two steps two."""
    path = tmp_path_factory.mktemp("swap") / "stage2"
    write_model_dir(path, {"mode": "coconut", "stage": 2, "c_thought": 1, "pad_latent_to_max": False},
                    seed=3)
    return api.load(str(path))


def records():
    words = "two three four five six seven".split()
    return [Record(f"what is {a} plus {b}", [f"{a} plus {b}"] * (1 + (i % 3 > 0)), "five")
            for i, (a, b) in enumerate((a, b) for a in words for b in words[:2])]


def thoughts_of(loaded, prompts):
    latent = api.special_ids(loaded).latent
    gen = coconut.generate(loaded.model, prompts, latent, [0], max_tokens=0, return_thoughts=True)
    return [gen.thoughts[b][mx.array(np.flatnonzero(gen.thought_mask[b]))] for b in range(len(prompts))]


def test_given_thoughts_go_to_their_rows_and_columns(stage2):
    """Rows of different lengths and thought counts in one left-padded batch: feeding each row its own
    thoughts reproduces the ordinary pass; feeding row 0 row 2's thoughts gives row 0 exactly what a
    batch of row 0 alone gets with them, and changes its states."""
    loaded = stage2
    latent = api.special_ids(loaded).latent
    prompts = [api.prompt_ids(loaded, r) for r in records()[:3]]  # 1, 2, 2 thoughts
    assert [sum(t == latent for t in p) for p in prompts] == [1, 2, 2]
    own = thoughts_of(loaded, prompts)
    batch = collate_prompts(prompts, 0)
    ids, mask = batch["input_ids"], batch["input_ids"] == latent
    pad = mx.array(batch["left_pad"])

    def forward(given, ids=ids, mask=mask, pad=pad):
        cache = loaded.model.make_cache(pad, step=ids.shape[1])
        return coconut.continuous_forward(loaded.model, mx.array(ids), mask, cache=cache, given=given)

    plain = forward(None)
    same = forward(thought_columns(own, prompts, latent))
    assert rel_diff(same, plain) <= 1e-5
    # row 0 (one thought) and row 2 (two): row 0 takes row 2's last thought, row 2 takes row 1's
    donor = [own[2][1:], own[1], own[1]]
    swapped = forward(thought_columns(donor, prompts, latent))
    alone = collate_prompts(prompts[:1], 0)["input_ids"]
    one = forward(thought_columns(donor[:1], prompts[:1], latent), alone, alone == latent, None)
    n = len(prompts[0])
    assert rel_diff(swapped[0, -n:], one[0]) <= 1e-4
    assert rel_diff(swapped[0, -1], plain[0, -1]) > 1e-3  # the swap changed what row 0 computes


def test_eval_swapped_matches_each_question_alone_with_its_donors_thoughts(stage2):
    """`evaluate(thoughts="swapped")`: donors move every question with a thought count shared by
    another, never across counts; each question's generation is the one it gets alone, fed its
    donor's own thoughts. `none` is generation without feedback."""
    loaded = stage2
    latent = api.special_ids(loaded).latent
    recs = records()
    prompts = [api.prompt_ids(loaded, r) for r in recs]
    counts = [sum(t == latent for t in p) for p in prompts]
    res = evaluate(loaded, recs, max_tokens=4, batch_size=5, thoughts="swapped")
    donors = [e["donor"] for e in res.examples]
    assert all(d != i and counts[d] == counts[i] for i, d in enumerate(donors))
    assert res.settings["thoughts"] == "swapped"
    own = thoughts_of(loaded, prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    again, given = swapped_thoughts(loaded.model, prompts, api.special_ids(loaded), order, 5)
    assert again == donors  # the same seeded derangement, so these are the thoughts eval fed
    for i, d in enumerate(donors):
        assert given[i].shape == own[d].shape and rel_diff(given[i], own[d]) <= 1e-5
    eos = api.eos_ids(loaded.tokenizer)
    for i in (0, 1, 5):
        gen = coconut.generate(loaded.model, [prompts[i]], latent, eos, max_tokens=4,
                               given_thoughts=thought_columns([own[donors[i]]], [prompts[i]], latent))
        assert loaded.tokenizer.decode(gen.tokens[0]) == res.examples[i]["generated"]
    plain = coconut.generate(loaded.model, prompts[:2], latent, eos, max_tokens=4, feedback=False)
    none = evaluate(loaded, recs[:2], max_tokens=4, thoughts="none")
    assert [loaded.tokenizer.decode(t) for t in plain.tokens] == [e["generated"] for e in none.examples]
    with pytest.raises(Exception, match="choose from"):
        evaluate(loaded, recs[:2], max_tokens=4, thoughts="other")


def test_a_question_alone_with_its_thought_count_keeps_its_own(stage2):
    recs = records()[:2]  # one with one thought, one with two: nobody to swap with
    res = evaluate(stage2, recs, max_tokens=2, thoughts="swapped")
    own = evaluate(stage2, recs, max_tokens=2)
    assert [e["donor"] for e in res.examples] == [0, 1]
    assert [e["generated"] for e in res.examples] == [e["generated"] for e in own.examples]


def test_eval_cli_thoughts_flag(tmp_path):
    cot = tmp_path / "cot"
    write_model_dir(cot, {"mode": "cot", "stage": 0})
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"question": r.question, "steps": r.steps, "answer": r.answer}
                                for r in records()[:6]]))
    res = helpers.run_cli(["eval", "--model", str(cot), "--data", str(data), "--thoughts", "swapped"])
    helpers.assert_one_line_error(res, "--thoughts swapped", "cot model")
    out = tmp_path / "r.json"
    path = Path(tmp_path / "s2")
    write_model_dir(path, {"mode": "coconut", "stage": 2, "c_thought": 1, "pad_latent_to_max": False},
                    seed=3)
    res = helpers.run_cli(["eval", "--model", str(path), "--data", str(data), "--thoughts", "swapped",
                           "--max-tokens", "3", "--json", str(out)])
    assert res.exit_code == 0, res.output
    m = json.loads(out.read_text())["models"][0]
    assert m["settings"]["thoughts"] == "swapped" and m["label"].endswith("thoughts swapped")
    assert all(e["donor"] != e["index"] for e in m["examples"])


def _probe_swap():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import probe_swap
    return probe_swap


def test_donor_answer_works_the_last_step_from_the_donors_first_result():
    probe = _probe_swap()
    assert probe.donor_answer(["<<16+4=20>>", "<<20-8=12>>"], "9") == "1"
    assert probe.donor_answer(["<<3+4=7>>", "<<7+5=12>>"], "10") == "15"
    assert probe.donor_answer(["<<3+4=7>>", "<<8+5=13>>"], "10") == ""  # does not start from step 1
    assert probe.donor_answer(["<<3+4=7>>"], "10") == "" and probe.donor_answer([], "10") == ""
    assert probe.donor_answer(["<<3+4=7>>", "<<7+5=12>>"], "") == ""  # a donor with no steps


def test_probe_swap_on_a_stage1_model(tmp_path, capsys):
    """End to end: one row per run with the three accuracies; a pause run is refused in one line."""
    probe = _probe_swap()
    run = tmp_path / "s1"
    write_model_dir(run, {"mode": "coconut", "stage": 1, "c_thought": 2}, seed=1)
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"question": f"what is {a} plus {b}", "steps": [f"<<{a}+{b}={a + b}>>",
                                 f"<<{a + b}-1={a + b - 1}>>"], "answer": str(a + b - 1)}
                                for a in range(1, 4) for b in range(1, 4)]))
    text = probe.main([str(run), "--data", str(data), "--max-tokens", "3"])
    assert text.count("\n") == 2 and "| 2 |" in text
    err = capsys.readouterr().err  # a line per evaluation: minutes each on a CPU
    assert [line.split(": ")[1] for line in err.splitlines()] == ["thoughts own", "thoughts swapped", "thoughts none"]
    pause = tmp_path / "pause"
    write_model_dir(pause, {"mode": "pause", "stage": 1, "c_thought": 2})
    with pytest.raises(SystemExit) as e:
        probe.main([str(pause), "--data", str(data)])
    assert "feeds no hidden state back" in str(e.value) and "\n" not in str(e.value)
    stage0 = tmp_path / "stage0"
    write_model_dir(stage0, {"mode": "coconut", "stage": 0, "c_thought": 2})
    with pytest.raises(SystemExit) as e:
        probe.main([str(stage0), "--data", str(data)])
    assert "no thoughts (stage 0)" in str(e.value) and "\n" not in str(e.value)
