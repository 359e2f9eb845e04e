"""Data pipeline: readers, the one formatter, collators, synth, and the `data` CLI."""

import json
import random
import re
import urllib.error
import urllib.request

import numpy as np
import pytest

from helpers import FakeResponse, assert_one_line_error, run_cli
from click.testing import CliRunner

from mlx_coconut import data as D
from mlx_coconut.cli import main
from mlx_coconut.data import FormatConfig, Record, SpecialIds, format_record
from mlx_coconut.errors import UserError

# The seed's example (first record of the iCoT GSM8k train split) and its renderings, verbatim.
SEED = Record(
    "Out of 600 employees in a company, 30% got promoted while 10% received bonus. "
    "How many employees did not get either a promotion or a bonus?",
    ["<<600*30/100=180>>", "<<600*10/100=60>>", "<<180+60=240>>", "<<600-240=360>>"],
    "360",
)
Q = SEED.question
SEED_STAGE0 = f"{Q}\n<<600*30/100=180>>\n<<600*10/100=60>>\n<<180+60=240>>\n<<600-240=360>>\n### 360"
SEED_STAGE1_C1 = (f"{Q}\n<|start-latent|><|latent|><|end-latent|>\n"
                  "<<600*10/100=60>>\n<<180+60=240>>\n<<600-240=360>>\n### 360")
SEED_STAGE1_C2 = (f"{Q}\n<|start-latent|><|latent|><|latent|><|end-latent|>\n"
                  "<<600*10/100=60>>\n<<180+60=240>>\n<<600-240=360>>\n### 360")


def official_tokens(seed_text):
    # The seed draws a line break after <|end-latent|> for readability; the official token stream
    # (question+"\n", markers, then step tokens) has none. That is the only difference.
    return seed_text.replace("<|end-latent|>\n", "<|end-latent|>")


LLAMA3_EOS = 128001  # <|end_of_text|>, the base Llama 3 EOS


@pytest.fixture(scope="module")
def llama3(llama3_tokenizer_path):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(llama3_tokenizer_path))
    return tok, D.add_latent_special_ids(tok, eos_id=LLAMA3_EOS)


@pytest.fixture
def text_tok():
    tok = D.TextTokenizer()
    return tok, D.add_latent_special_ids(tok)


# ---------------------------------------------------------------- the seed example


@pytest.mark.parametrize("cfg,seed_text", [
    (FormatConfig("cot"), SEED_STAGE0),
    (FormatConfig("coconut", stage=1, c_thought=1), SEED_STAGE1_C1),
    (FormatConfig("coconut", stage=1, c_thought=2), SEED_STAGE1_C2),
])
def test_seed_example_renderings(text_tok, cfg, seed_text):
    tok, ids = text_tok
    ex = format_record(SEED, tok, cfg, ids)
    assert tok.decode(ex.input_ids) == official_tokens(seed_text) + "<eos>"
    # labels mask exactly question + markers + latents, and equal input_ids after that
    masked = tok.decode(ex.input_ids[: ex.labels.count(-100)])
    assert masked == official_tokens(seed_text).split("<<600*10/100=60>>" if cfg.stage else "<<600*30")[0]
    first = ex.labels.count(-100)
    assert all(l == -100 for l in ex.labels[:first])
    assert ex.labels[first:] == ex.input_ids[first:]
    assert tok.decode(ex.prompt_ids) == masked


def test_seed_example_llama3_ids(llama3):
    tok, ids = llama3
    assert (ids.start_latent, ids.latent, ids.end_latent) == (128257, 128258, 128259)  # 128256 = <|image|>
    ex = format_record(SEED, tok, FormatConfig("coconut", stage=1, c_thought=2), ids)
    q = tok.encode(Q + "\n", add_special_tokens=True)
    assert q[0] == 128000 and q[-1] == 5380  # BOS ... "?\n" merged into one token
    assert len(q) == 35
    assert ex.input_ids[35:] == [
        128257, 128258, 128258, 128259,
        2501, 5067, 9, 605, 14, 1041, 28, 1399, 40171,  # <<600*10/100=60>>\n
        2501, 5245, 10, 1399, 28, 8273, 40171,          # <<180+60=240>>\n
        2501, 5067, 12, 8273, 28, 6843, 40171,          # <<600-240=360>>\n
        14711, 220, 6843, LLAMA3_EOS,                   # ### 360 EOS
    ]
    assert ex.labels == [-100] * 39 + ex.input_ids[39:]
    assert ex.prompt_ids == q + [128257, 128258, 128258, 128259]
    assert ex.latent_start == 36 and ex.n_latents == 2
    assert tok.decode(ex.input_ids) == "<|begin_of_text|>" + official_tokens(SEED_STAGE1_C2) + "<|end_of_text|>"
    stage0 = format_record(SEED, tok, FormatConfig("cot"), ids)
    assert stage0.input_ids[35:44] == [2501, 5067, 9, 966, 14, 1041, 28, 5245, 40171]  # <<600*30/100=180>>\n
    assert tok.decode(stage0.input_ids) == "<|begin_of_text|>" + SEED_STAGE0 + "<|end_of_text|>"
    ok, detail = D.check_tokenization_invariant(SEED, tok)
    assert ok, detail


def test_invariant_reports_mismatch():
    class Merging(D.TextTokenizer):  # merges "\n<" into one token: parts != whole
        def encode(self, text, **kw):
            return super().encode(text.replace("\n<", "\x00"), **kw)

    ok, detail = D.check_tokenization_invariant(SEED, Merging())
    assert not ok and "differ" in detail


# ---------------------------------------------------------------- formatter modes and stages


def _mk(n_steps):
    return Record("q?", [f"<<{i}+1={i + 1}>>" for i in range(n_steps)], "7")


def _count(ex, ids):
    return ex.input_ids.count(ids.latent), ex.input_ids.count(ids.start_latent)


def test_modes(text_tok):
    tok, ids = text_tok
    r = _mk(3)
    nocot = format_record(r, tok, FormatConfig("no-cot"), ids)
    assert tok.decode(nocot.input_ids) == "q?\n### 7<eos>" and nocot.prompt_ids == tok.encode("q?\n")
    cot = format_record(r, tok, FormatConfig("cot", stage=2), ids)  # stage ignored in cot
    assert tok.decode(cot.input_ids) == "q?\n<<0+1=1>>\n<<1+1=2>>\n<<2+1=3>>\n### 7<eos>"
    coco0 = format_record(r, tok, FormatConfig("coconut", stage=0), ids)  # markers even at stage 0
    assert tok.decode(coco0.input_ids).startswith("q?\n<|start-latent|><|end-latent|><<0+1=1>>")
    pause = format_record(r, tok, FormatConfig("pause", stage=2, c_thought=2), ids)
    coco = format_record(r, tok, FormatConfig("coconut", stage=2, c_thought=2), ids)
    assert pause.input_ids == coco.input_ids and pause.labels == coco.labels
    assert tok.decode(coco.input_ids) == ("q?\n<|start-latent|>" + "<|latent|>" * 4
                                          + "<|end-latent|><<2+1=3>>\n### 7<eos>")
    nothought = format_record(r, tok, FormatConfig("no-thought", stage=2), ids)
    assert tok.decode(nothought.input_ids) == "q?\n<<2+1=3>>\n### 7<eos>"


def test_data_file_text_is_text(text_tok):
    """A question, step or answer from a data file that contains the markers or <eos> is encoded as
    those characters: the only control tokens are the ones the stage inserts (by id)."""
    tok, ids = text_tok
    typed = Record("q <|latent|><|start-latent|>?", ["<|end-latent|>1<eos>"], "7<eos>")
    ex = format_record(typed, tok, FormatConfig("coconut", stage=1, c_thought=2), ids)
    control = [i for i in ex.input_ids if i in (ids.start_latent, ids.latent, ids.end_latent, ids.eos)]
    assert control == [ids.start_latent, ids.latent, ids.latent, ids.end_latent, ids.eos]
    assert tok.decode(ex.prompt_ids).startswith("q <|latent|><|start-latent|>?\n<|start-latent|>")


def test_past_max_stage_and_asymmetry(text_tok):
    tok, ids = text_tok
    two = _mk(2)
    # past max_latent_stage: every step removed; latents min(n_steps, max) * c unless padded
    ex = format_record(two, tok, FormatConfig("coconut", stage=4, c_thought=2, max_latent_stage=3,
                                              pad_latent_to_max=False), ids)
    assert ex.n_latents == 4 and "<<" not in tok.decode(ex.input_ids)
    ex = format_record(two, tok, FormatConfig("coconut", stage=4, c_thought=2, max_latent_stage=3), ids)
    assert ex.n_latents == 6 and ex.prompt_ids.count(ids.latent) == 6  # padded: the default
    # official asymmetry: at stage k <= max, training uses k*c latents even with fewer steps,
    # the eval prompt caps at n_steps*c (unless pad_latent_to_max)
    unpadded = FormatConfig("coconut", stage=3, c_thought=1, pad_latent_to_max=False)
    ex = format_record(_mk(1), tok, unpadded, ids)
    assert ex.n_latents == 3 and ex.prompt_ids.count(ids.latent) == 1
    ex = format_record(_mk(1), tok, FormatConfig("coconut", stage=3, c_thought=1), ids)
    assert ex.n_latents == 3 and ex.prompt_ids.count(ids.latent) == 3
    # a step-less record at stage 1: one latent in training, none in the unpadded prompt
    ex = format_record(_mk(0), tok, FormatConfig("coconut", stage=1, pad_latent_to_max=False), ids)
    assert ex.n_latents == 1 and ex.prompt_ids.count(ids.latent) == 0
    ex = format_record(_mk(0), tok, FormatConfig("coconut", stage=1), ids)
    assert ex.n_latents == 1 and ex.prompt_ids.count(ids.latent) == 1


def test_uniform_prob_is_seeded(text_tok):
    tok, ids = text_tok
    recs = [_mk(4)] * 50
    cfg = FormatConfig("coconut", stage=1, uniform_prob=0.5)
    a = [format_record(r, tok, cfg, ids, random.Random(i)).stage for i, r in enumerate(recs)]
    b = [format_record(r, tok, cfg, ids, random.Random(i)).stage for i, r in enumerate(recs)]
    assert a == b and set(a) - {1} and all(0 <= s <= 4 for s in a)
    with pytest.raises(ValueError):
        format_record(recs[0], tok, cfg, ids)  # no rng


# ---------------------------------------------------------------- collators


def test_collate_aligns_first_latent(text_tok):
    tok, ids = text_tok
    cfg = FormatConfig("coconut", stage=1, c_thought=2)
    recs = [Record("short?", ["<<1+1=2>>", "<<2+2=4>>"], "4"),
            Record("a much longer question?", ["<<3*3=9>>"], "9"),
            Record("mid question?", ["<<5-1=4>>", "<<4*2=8>>"], "8")]
    exs = [format_record(r, tok, cfg, ids) for r in recs]
    exs.append(format_record(recs[0], tok, FormatConfig("cot"), ids))  # a row without latents
    b = D.collate(exs, pad_id=99)
    cols = [row.tolist().index(ids.latent) for row in b["input_ids"][:3]]
    assert len(set(cols)) == 1
    assert b["left_pad"].tolist()[3] == 0 and b["left_pad"].tolist()[1] == 0  # longest question
    for i, e in enumerate(exs):
        l, n = int(b["left_pad"][i]), int(b["lengths"][i])
        assert b["input_ids"][i, l : l + n].tolist() == e.input_ids
        assert b["labels"][i, l : l + n].tolist() == e.labels
        assert (b["labels"][i, :l] == -100).all() and (b["labels"][i, l + n :] == -100).all()
        assert (b["input_ids"][i, :l] == 99).all() and (b["input_ids"][i, l + n :] == 99).all()
    assert b["input_ids"].shape[1] == max(int(l) + len(e.input_ids) for l, e in zip(b["left_pad"], exs))
    p = D.collate_prompts(exs[:3], pad_id=99)
    assert (p["left_pad"] + p["lengths"] == p["input_ids"].shape[1]).all()
    for i, e in enumerate(exs[:3]):
        assert p["input_ids"][i, p["left_pad"][i]:].tolist() == e.prompt_ids


# ---------------------------------------------------------------- readers


def test_icot_test_split(shared_data):
    recs = D.load_records(shared_data / "gsm8k" / "icot_test.txt")
    assert len(recs) == 1319
    dist = D.step_distribution(recs)
    assert dist.pop(0) == 18  # step-less lines -> steps == []
    assert dist == {1: 65, 2: 357, 3: 364, 4: 290, 5: 138, 6: 57, 7: 21, 8: 9}
    assert sum(dist.values()) == 1301
    assert all("," not in r.answer for r in recs)  # "1,000" -> "1000"
    raw = (shared_data / "gsm8k" / "icot_test.txt").read_text().splitlines()
    comma = [i for i, l in enumerate(raw) if "," in l.split("####")[-1]]
    assert len(comma) == 14 and all(recs[i].answer.isdigit() for i in comma)


def test_gsm8k_jsonl_agrees_with_icot(shared_data):
    icot = D.load_records(shared_data / "gsm8k" / "icot_test.txt")
    orig = D.load_records(shared_data / "gsm8k" / "gsm8k_test.jsonl")
    assert len(orig) == len(icot) == 1319
    for a, b in zip(orig, icot):
        assert a.question == b.question
        if a.steps:
            assert a.steps == b.steps
        assert a.answer.replace(",", "") == b.answer.replace(",", "")
    train = D.load_records(shared_data / "gsm8k" / "gsm8k_train.jsonl")
    assert len(train) == 7473
    assert train[0].steps == ["<<48/2=24>>", "<<48+24=72>>"] and train[0].answer == "72"


def test_prosqa_and_roundtrip(shared_data, tmp_path):
    recs = D.load_records(shared_data / "prosqa" / "prosqa_valid.json")
    assert len(recs) == 300 and "edges" in recs[0].extra and recs[0].answer.endswith(".")
    D.save_records(recs[:5], tmp_path / "p.json")
    again = D.load_records(tmp_path / "p.json")
    assert [r.to_json() for r in again] == [r.to_json() for r in recs[:5]]


def test_official_empty_step_becomes_no_steps(tmp_path):
    p = tmp_path / "x.json"
    p.write_text(json.dumps([{"question": "q", "steps": [""], "answer": "1,234"}]))
    (r,) = D.load_records(p)
    assert r.steps == [] and r.answer == "1234"
    p.write_text("q1||<<1+1=2>> <<2*3=6>> #### 6\nq2|| #### 5\n")
    a, b = D.load_records(p)
    assert a.steps == ["<<1+1=2>>", "<<2*3=6>>"] and b.steps == [] and b.answer == "5"


# ---------------------------------------------------------------- synth


@pytest.mark.parametrize("style", ["story", "terse"])
def test_synth_steps_verified_and_deterministic(style):
    recs = D.synth_records(300, seed=3, style=style)
    assert [r.to_json() for r in recs] == [r.to_json() for r in D.synth_records(300, seed=3, style=style)]
    assert [r.to_json() for r in recs] != [r.to_json() for r in D.synth_records(300, seed=4, style=style)]
    assert set(D.step_distribution(recs)) == {1, 2, 3, 4, 5}
    for r in recs:
        prev = []
        for s in r.steps:
            m = re.fullmatch(r"<<([0-9+\-*/]+)=(\d+)>>", s)
            assert m, s
            expr, res = m.groups()
            assert eval(expr) == int(res), s  # every step evaluates to its stated result
            if prev:  # each step builds on the previous result
                assert expr.startswith(prev[-1] + "") and re.match(r"\d+", expr).group() == prev[-1]
            prev.append(res)
        assert prev[-1] == r.answer and 0 < int(r.answer) <= 999
    assert len({r.question for r in recs}) > 290
    few = D.synth_records(50, seed=0, min_steps=2, max_steps=2, style=style)
    assert all(len(r.steps) == 2 for r in few)


def test_synth_terse_states_the_same_problem_in_fewer_words():
    """Every operand a step takes from the text is in the question, in both wordings; terse questions
    are much shorter; an unknown style is a one-line error naming the flag."""
    task = dict(min_steps=2, max_steps=2, ops=("add", "sub"), max_value=20)
    lengths = {}
    for style in ("story", "terse"):
        recs = D.synth_records(200, seed=5, style=style, **task)
        for r in recs:
            (a, b), (_, c) = [re.findall(r"\d+", s)[:2] for s in r.steps]
            numbers = re.findall(r"\d+", r.question)
            assert numbers == [a, b, c], (style, r.question, r.steps)
        lengths[style] = sum(len(r.question) for r in recs)
    assert lengths["terse"] < 0.7 * lengths["story"], lengths
    with pytest.raises(UserError, match="--style"):
        D.synth_records(5, style="haiku")


def test_synth_difficulty_knobs_and_exclude():
    easy = D.synth_records(200, seed=1, min_steps=3, max_steps=3, ops=("add", "sub"), max_value=99)
    for r in easy:
        values = [int(v) for s in r.steps for v in re.findall(r"\d+", s)]
        assert all(("*" not in s and "/" not in s) for s in r.steps) and max(values) <= 99
        assert "as many" not in r.question                    # no "ref" steps
    muls = D.synth_records(50, seed=1, min_steps=2, max_steps=2, ops=("mul",), max_value=500)
    assert all("*" in s for r in muls for s in r.steps)      # terminates even with one kind
    train = D.synth_records(100, seed=0, min_steps=1, max_steps=1, ops=("add",), max_value=50)
    held = D.synth_records(100, seed=2, min_steps=1, max_steps=1, ops=("add",), max_value=50,
                           exclude={r.question for r in train})
    assert len(held) == 100 and not {r.question for r in held} & {r.question for r in train}
    with pytest.raises(UserError, match="--ops"):
        D.synth_records(5, ops=("pow",))
    with pytest.raises(UserError, match="--max-value"):
        D.synth_records(5, max_value=5)



def _parse_links(question):
    links = question.split(": ", 1)[1].split(". From ")[0]
    return dict(link.split(" to ") for link in links.split(", "))


@pytest.mark.parametrize("hops,nodes", [(1, 4), (3, 6), (5, 8)])
def test_chain_steps_follow_the_links_and_nothing_else_gives_the_answer(hops, nodes):
    recs = D.chain_records(200, seed=7, min_hops=hops, max_hops=hops, nodes=nodes)
    assert [r.to_json() for r in recs] == [r.to_json() for r in D.chain_records(200, 7, hops, hops, nodes)]
    assert [r.question for r in recs] != [r.question for r in D.chain_records(200, 8, hops, hops, nodes)]
    answers, first_listed = [], 0
    for r in recs:
        succ = _parse_links(r.question)
        # one cycle through every node: one link out and one in each, so no node stands out
        assert len(succ) == nodes and sorted(succ.values()) == sorted(succ)
        node = start = r.question.split("From ")[1].split(",")[0]
        seen = {start}
        for _ in range(nodes - 1):
            node = succ[node]
            seen.add(node)
        assert len(seen) == nodes
        node = start
        for step in r.steps:
            a, b = step.split(" to ")
            assert a == node and succ[a] == b
            node = b
        assert len(r.steps) == hops and r.answer == node != start
        answers.append(r.answer)
        first_listed += r.question.startswith(f"Links: {start} to ")
    # the answer is spread over many words, and the start's link is not always listed first
    assert len(set(answers)) > 10 and first_listed < len(recs) / 2


def test_chain_exclude_and_bad_flags():
    train = D.chain_records(100, seed=0, min_hops=2, max_hops=2, nodes=5)
    held = D.chain_records(100, seed=1, min_hops=2, max_hops=2, nodes=5,
                           exclude={r.question for r in train})
    assert not {r.question for r in held} & {r.question for r in train}
    for kwargs, needle in [(dict(nodes=3, max_hops=3), "--nodes"), (dict(nodes=40), "--nodes"),
                           (dict(min_hops=0), "--min-steps"), (dict(min_hops=4, max_hops=2), "--min-steps")]:
        with pytest.raises(UserError, match=needle):
            D.chain_records(5, **kwargs)


# ---------------------------------------------------------------- CLI


_run, _one_line_error = run_cli, assert_one_line_error


@pytest.mark.parametrize("content,needle", [
    ("what is 1+1? <<1+1=2>> #### 2\n", ":1:"),           # no ||
    ("ok||<<1+1=2>> #### 2\nbad||<<1+1=2>> 2\n", ":2:"),   # no ####
    ("", ":1: empty file"),
    ('[\n{"question": "q", "steps": [], "answer": "1"},\n{"question": "q", "answer": "1"}\n]', ":3"),
    ('{"question": "q", "answer": "no hashes"}\n', ":1:"),
    ('[{"question": "q", "steps": [], "answer": "1"},', "invalid JSON"),
])
def test_cli_bad_input(tmp_path, content, needle):
    p = tmp_path / "bad.txt"
    p.write_text(content)
    _one_line_error(_run(["data", "convert", str(p), "--out", str(tmp_path / "o.json")]), str(p), needle)
    _one_line_error(_run(["data", "stats", str(p)]), needle)


def test_cli_bad_paths_and_flags(tmp_path):
    _one_line_error(_run(["data", "stats", str(tmp_path / "missing.txt")]), "missing.txt")
    _one_line_error(_run(["data", "stats", str(tmp_path)]), "directory")
    _one_line_error(_run(["data", "synth", "--n", "0", "--out", str(tmp_path / "s.json")]), "--n")


def test_cli_synth_convert_stats(tmp_path):
    out = tmp_path / "s.json"
    res = _run(["data", "synth", "--n", "20", "--seed", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert len(json.loads(out.read_text())) == 20
    terse = tmp_path / "t.json"
    assert _run(["data", "synth", "--n", "20", "--seed", "1", "--style", "terse", "--out", str(terse)]).exit_code == 0
    assert [r["question"] for r in json.loads(terse.read_text())] == \
        [r.question for r in D.synth_records(20, seed=1, style="terse")]
    res = _run(["data", "stats", str(out), "--c-thought", "2"])
    assert res.exit_code == 0, res.output
    assert "records: 20" in res.output and "stage 1, c=2" in res.output
    assert "<|start-latent|><|latent|><|latent|><|end-latent|>" in res.output
    chain = tmp_path / "chain.json"
    res = _run(["data", "synth", "--task", "chain", "--n", "20", "--min-steps", "3", "--max-steps", "3",
                "--nodes", "6", "--out", str(chain)])
    assert res.exit_code == 0 and "steps 3:20" in res.output, res.output
    assert [r["answer"] for r in json.loads(chain.read_text())] == \
        [r.answer for r in D.chain_records(20, 0, 3, 3, 6)]
    _one_line_error(_run(["data", "synth", "--task", "chain", "--n", "5", "--max-steps", "6", "--nodes", "6",
                          "--out", str(tmp_path / "x.json")]), "--nodes")
    src = tmp_path / "in.txt"
    src.write_text("q1||<<1+1=2>> #### 2\nq2||<<2*3=6>> <<6-1=5>> #### 5\n")
    res = _run(["data", "convert", str(src), "--out", str(tmp_path / "c.json")])
    assert res.exit_code == 0 and "2 records" in res.output
    assert json.loads((tmp_path / "c.json").read_text())[1]["steps"] == ["<<2*3=6>>", "<<6-1=5>>"]


def test_download_offline_and_online(tmp_path, monkeypatch):
    def offline(url, timeout=None):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    res = _run(["data", "download", "gsm8k", "--out", str(tmp_path / "d")])
    _one_line_error(res, D.GSM8K_URLS["train"], "mlx-coconut data convert")

    Resp = FakeResponse

    monkeypatch.setattr(urllib.request, "urlopen",
                        lambda url, timeout=None: Resp(b"q||<<2*3=6>> #### 6\nr||#### 1,000\n"))
    res = _run(["data", "download", "gsm8k", "--out", str(tmp_path / "d")])
    assert res.exit_code == 0, res.output
    for split in ("train", "valid", "test"):
        recs = json.loads((tmp_path / "d" / f"{split}.json").read_text())
        assert recs == [{"question": "q", "steps": ["<<2*3=6>>"], "answer": "6"},
                        {"question": "r", "steps": [], "answer": "1000"}]


def test_cli_stats_with_model_tokenizer(llama3_tokenizer_path, tmp_path):
    # A "model directory" holding only a tokenizer is enough for stats (no converter needed).
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(llama3_tokenizer_path),
                                  bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    tok.save_pretrained(tmp_path / "model")
    src = tmp_path / "seed.json"
    D.save_records([SEED] + D.synth_records(10, seed=0), src)
    res = _run(["data", "stats", str(src), "--model", str(tmp_path / "model"), "--c-thought", "2"])
    assert res.exit_code == 0, res.output
    assert "<|begin_of_text|>" + official_tokens(SEED_STAGE1_C2) + "<|end_of_text|>" in res.output
    assert "invariant (parts == whole) on record 0: ok" in res.output
    assert "CoT (stage 0)   min" in res.output and "mismatches in the first 11 records: 0" in res.output
    _one_line_error(_run(["data", "stats", str(src), "--model", str(tmp_path / "nope")]), "nope")
