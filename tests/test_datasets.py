"""ProsQA and ProntoQA: download / conversion as the official recipe does it, and evaluation on their
sentence answers (official extraction, 128 new tokens).

The ProntoQA fixture is written here in the format `run_experiment.py --model-name json` of the
ProntoQA repository produces: {"example1": {"test_example": {question, query, chain_of_thought,
answer}, ...}, ...}."""

import json
import urllib.error
import urllib.request

import pytest
from click.testing import CliRunner

from mlx_coconut import coconut
from mlx_coconut import data as D
from mlx_coconut.cli import main
from mlx_coconut.evaluate import default_max_tokens

from helpers import FakeResponse, assert_one_line_error, run_cli, model_dir_with_tokenizer


_run, _one_line_error = run_cli, assert_one_line_error


def _pronto_example(i: int) -> dict:
    """One 5-hop example in the ProntoQA source format (fictional ontology, random order)."""
    name = ["Fae", "Rex", "Sally", "Max", "Wren"][i % 5]
    chain = ["wumpus", "yumpus", "zumpus", "dumpus", "rompus", "numpus"]
    negated = i % 2 == 1
    context = " ".join(f"Every {a} is a {b}." for a, b in zip(chain, chain[1:]))
    context += f" Every numpus is {'not ' if negated else ''}bright. {name} is a wumpus."
    cot = [f"{name} is a wumpus."]
    for a, b in zip(chain, chain[1:]):
        cot += [f"Every {a} is a {b}.", f"{name} is a {b}."]
    cot += [f"Every numpus is {'not ' if negated else ''}bright.", f"{name} is {'not ' if negated else ''}bright."]
    return {"test_example": {"question": context, "query": f"True or false: {name} is bright.",
                             "chain_of_thought": cot, "answer": "False" if negated else "True"}}


def _pronto_source(n: int) -> dict:
    return {f"example{i + 1}": _pronto_example(i) for i in range(n)}


# ---------------------------------------------------------------- ProntoQA conversion


def test_prontoqa_records_follow_the_official_preprocessing():
    recs = D.prontoqa_records(_pronto_source(3))
    r = recs[0]
    ex = _pronto_example(0)["test_example"]
    assert r.question == ex["question"] + " True or false: Fae is bright."
    cot = ex["chain_of_thought"]
    assert len(cot) == 13 and len(r.steps) == 7                     # pairs; the odd last one alone
    assert r.steps[0] == "Fae is a wumpus. Every wumpus is a yumpus."
    assert r.steps[1] == "Fae is a yumpus. Every yumpus is a zumpus."
    assert r.steps[-1] == "Fae is bright."
    assert r.answer == "True" and recs[1].answer == "False"
    assert [x.question.split("True or false: ")[1] for x in recs] == [
        "Fae is bright.", "Rex is bright.", "Sally is bright."]      # file order kept


def test_prontoqa_download_splits_like_the_official_cut(tmp_path):
    src = tmp_path / "5hop_0shot_random.json"
    src.write_text(json.dumps(_pronto_source(9203)))
    res = _run(["data", "download", "prontoqa", "--source", str(src), "--out", str(tmp_path / "p")])
    assert res.exit_code == 0, res.output
    splits = {s: json.loads((tmp_path / "p" / f"{s}.json").read_text()) for s in ("train", "valid", "test")}
    assert [len(splits[s]) for s in ("train", "valid", "test")] == [9000, 200, 3]
    # record 9000 of the source is the first validation record, 9200 the first test record
    assert splits["valid"][0]["question"].endswith(f"True or false: {['Fae', 'Rex', 'Sally', 'Max', 'Wren'][9000 % 5]} is bright.")
    assert splits["test"][0]["answer"] == _pronto_example(9200)["test_example"]["answer"]
    assert D.load_records(tmp_path / "p" / "test.json")[2].steps[0].endswith("Every wumpus is a yumpus.")


def test_prontoqa_bad_source_and_no_source_are_one_line(tmp_path):
    _one_line_error(_run(["data", "download", "prontoqa", "--out", str(tmp_path / "p")]),
                    D.PRONTOQA_REPO, "--source", "--min-hops 5")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"example1": {"test_example": {"question": "q", "query": "r"}}}))
    _one_line_error(_run(["data", "download", "prontoqa", "--source", str(bad), "--out", str(tmp_path / "p")]),
                    "example1", "chain_of_thought")
    bad.write_text("[1, 2]")
    _one_line_error(_run(["data", "download", "prontoqa", "--source", str(bad), "--out", str(tmp_path / "p")]),
                    "expected a JSON object")
    small = tmp_path / "small.json"
    small.write_text(json.dumps(_pronto_source(5)))
    _one_line_error(_run(["data", "download", "prontoqa", "--source", str(small), "--out", str(tmp_path / "p")]),
                    "valid split empty")
    _one_line_error(_run(["data", "download", "gsm8k", "--source", str(small), "--out", str(tmp_path / "p")]),
                    "--source is for prontoqa")


# ---------------------------------------------------------------- downloads (network replaced)


_Resp = FakeResponse


def _offline(url, timeout=None):
    raise urllib.error.URLError("Name or service not known")


def test_prosqa_download_offline_names_the_url_and_online_keeps_the_graph(tmp_path, monkeypatch, shared_data):
    monkeypatch.setattr(urllib.request, "urlopen", _offline)
    res = _run(["data", "download", "prosqa", "--out", str(tmp_path / "d")])
    _one_line_error(res, D.PROSQA_URLS["train"], "mlx-coconut data convert prosqa_train.json")
    assert "27273cb8cca4bb763c041a63b036d0c3b7cbbb48/data/prosqa_train.json" in D.PROSQA_URLS["train"]
    assert not list((tmp_path / "d").glob("*.part"))

    valid = (shared_data / "prosqa" / "prosqa_valid.json").read_bytes()
    urls = []
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: urls.append(url) or _Resp(valid))
    res = _run(["data", "download", "prosqa", "--split", "valid", "--out", str(tmp_path / "d")])
    assert res.exit_code == 0, res.output
    assert urls == [D.PROSQA_URLS["valid"]] and "valid: 300 records" in res.output
    ours = json.loads((tmp_path / "d" / "valid.json").read_text())
    theirs = json.loads(valid)
    assert ours == theirs                                   # same records, graph keys included


def test_prontoqa_source_url_offline_names_it(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", _offline)
    url = "https://example.org/5hop_0shot_random.json"
    _one_line_error(_run(["data", "download", "prontoqa", "--source", url, "--out", str(tmp_path / "p")]),
                    url, "--source")


# ---------------------------------------------------------------- eval on sentence answers


def test_default_generation_budget_is_the_official_one(shared_data):
    prosqa = D.load_records(shared_data / "prosqa" / "prosqa_valid.json")
    assert default_max_tokens(prosqa) == 128
    assert default_max_tokens(D.prontoqa_records(_pronto_source(2))) == 128
    assert default_max_tokens(D.synth_records(5, seed=0)) == 64
    assert default_max_tokens([D.Record("q", [], "1,000")]) == 64


@pytest.fixture
def prosqa_model(smollm2_dir, tmp_path):
    return model_dir_with_tokenizer(tmp_path / "prosqa-model", smollm2_dir,
                           {"mode": "coconut", "stage": 7, "c_thought": 1, "max_latent_stage": 6,
                            "pad_latent_to_max": True})


def test_eval_scores_prosqa_sentence_answers(prosqa_model, shared_data, tmp_path, monkeypatch):
    """The official extraction on ProsQA: the text after the last '#', stripped, equals the sentence.
    Generation is replaced by the reference answer for even records and a wrong sentence for odd ones."""
    from mlx_lm.tokenizer_utils import load as load_tok
    from mlx_coconut import evaluate as ev

    records = D.load_records(shared_data / "prosqa" / "prosqa_test.json")[:6]
    tok = load_tok(prosqa_model)
    latent = tok.convert_tokens_to_ids("<|latent|>")
    budgets, thoughts = [], []

    def fake(model, prompts, latent_id, eos_ids, max_tokens=64, pad_id=0, sampler=None, feedback=True, **kw):
        budgets.append(max_tokens)
        out = []
        for p in prompts:
            thoughts.append(sum(t == latent_id for t in p))
            q = tok.decode([t for t in p if t != latent_id], skip_special_tokens=True).strip()
            i = next(k for k, r in enumerate(records) if r.question == q)
            wrong = records[i].answer.replace(" is a ", " is not a ")
            out.append(tok.encode(f"### {records[i].answer if i % 2 == 0 else wrong}", add_special_tokens=False))
        return coconut.Generation(tokens=out, finished=[True] * len(prompts), timings={"latent": 0.0, "text": 0.0})

    monkeypatch.setattr(ev.coconut, "generate", fake)
    data = tmp_path / "prosqa_test.json"
    D.save_records(records, data)
    js = tmp_path / "r.json"
    r = _run(["eval", "--model", str(prosqa_model), "--data", str(data), "--json", str(js)])
    assert r.exit_code == 0, r.output
    assert "Accuracy = 50.00%" in r.stdout
    assert set(budgets) == {128}
    assert latent > 0 and set(thoughts) == {6}            # final stage: max_latent_stage * c, padded
    ex = json.loads(js.read_text())["models"][0]["examples"]
    assert ex[0]["prediction"] == records[0].answer and ex[0]["correct"]
    assert records[0].answer.endswith(".") and " " in records[0].answer
    assert not ex[1]["correct"] and ex[1]["prediction"] != records[1].answer
