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
