"""Records -> formatted examples: the one data path for training, evaluation, generation and stats.

A record is the official COCONUT schema `{"question": str, "steps": [str], "answer": str}` (extra keys,
e.g. ProsQA's graph, are kept in `Record.extra`). Readers accept three formats, detected from the file:

- `icot`:  Internalize-CoT text, one `question||<<a>> <<b>> #### answer` per line
- `json`:  the official JSON list of records (GSM8k from the official preprocessing, ProsQA, ...)
- `gsm8k`: the original GSM8k jsonl `{"question", "answer"}` whose answer holds `<<...>>` calculator
           annotations (taken in order as the steps) and ends with `#### answer`. A jsonl whose lines
           already carry `steps` is read as official records.

Two deliberate normalisations (same for every reader, documented in docs/data.md):

- Step-less records: the official preprocessing turns an empty iCoT step field into `steps == [""]`,
  which trains a blank line after the question. We drop empty/whitespace-only steps, so such a record
  has `steps == []` and is rendered `question\\n### answer`. (18 lines of the GSM8k iCoT test split.)
- Answers with thousands separators (`1,000`, 14 lines of the iCoT test split) become `1000`: GSM8k
  answers are numbers and the official evaluation compares `answer.replace(",", "")` anyway, so the
  model is trained on the form it is scored against. Only answers that look like a comma-grouped number
  are touched; ProsQA sentence answers are left alone.

The formatter (`format_record`) follows the official `dataset.py` (`get_dataset`,
`get_cot_latent_dataset`, `get_question_latent_dataset`, `MyCollator`) token for token.
"""

import json
import random
import re
import statistics
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import UserError
from .tokens import LATENT_TOKENS, add_tokens_to_tokenizer

FORMATS = ("icot", "json", "gsm8k")

# iCoT GSM8k splits at the commit the official COCONUT preprocessing pins.
ICOT_COMMIT = "e06a32ee5e4cd117171daeb4755d2a97ece62761"
GSM8K_URLS = {
    "train": f"https://media.githubusercontent.com/media/da03/Internalize_CoT_Step_by_Step/{ICOT_COMMIT}/data/gsm8k/train.txt",
    "valid": f"https://raw.githubusercontent.com/da03/Internalize_CoT_Step_by_Step/{ICOT_COMMIT}/data/gsm8k/valid.txt",
    "test": f"https://raw.githubusercontent.com/da03/Internalize_CoT_Step_by_Step/{ICOT_COMMIT}/data/gsm8k/test.txt",
}

# ProsQA: the official COCONUT repository's data/ at the commit its README and args/ are read at.
COCONUT_COMMIT = "27273cb8cca4bb763c041a63b036d0c3b7cbbb48"
PROSQA_URLS = {split: f"https://raw.githubusercontent.com/facebookresearch/coconut/{COCONUT_COMMIT}/data/prosqa_{split}.json"
               for split in ("train", "valid", "test")}
# ProntoQA is generated, not hosted: the official README runs the ProntoQA repository at this commit
# (below) and converts the 5hop_0shot_random.json it writes with preprocessing/prontoqa.py.
PRONTOQA_COMMIT = "f0145b867b3c106285ec9ea1941a3f6eb7c6162d"
PRONTOQA_REPO = f"https://github.com/asaparov/prontoqa/tree/{PRONTOQA_COMMIT}"
PRONTOQA_GENERATE = ("python run_experiment.py --model-name json --model-size dummy --ordering random "
                     "--num-trials 10000 --few-shot-examples 0 --ontology fictional --min-hops 5 "
                     "--max-hops 5 --hops-skip 1")
PRONTOQA_SPLITS = {"train": (0, 9000), "valid": (9000, 9200), "test": (9200, None)}  # official cut

_COMMA_NUMBER = re.compile(r"^[-+]?\d{1,3}(,\d{3})+(\.\d+)?$")
_ANNOTATION = re.compile(r"<<(.*?)>>")


# ---------------------------------------------------------------- records


@dataclass
class Record:
    question: str
    steps: list
    answer: str
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        """The official schema (extra keys after the three core ones)."""
        return {"question": self.question, "steps": list(self.steps), "answer": self.answer, **self.extra}


def normalize_answer(answer: str) -> str:
    """Strip whitespace; `1,000` -> `1000` (only for comma-grouped numbers)."""
    answer = answer.strip()
    if _COMMA_NUMBER.match(answer):
        answer = answer.replace(",", "")
    return answer


def _clean_steps(steps) -> list:
    # Official preprocessing yields [""] for a step-less line; we keep no empty steps.
    return [s.strip() for s in steps if s.strip()]


def parse_icot_line(line: str, where: str) -> Record:
    """`question||<<a>> <<b>> #### answer` -> Record. `where` is `file:line` for errors."""
    if "||" not in line:
        raise UserError(f"{where}: expected 'question||steps #### answer' but found no '||'")
    question, rest = line.rsplit("||", 1)
    if "####" not in rest:
        raise UserError(f"{where}: expected '#### answer' after the steps but found no '####'")
    steps_text, answer = rest.split("####", 1)
    if not question.strip():
        raise UserError(f"{where}: empty question")
    answer = normalize_answer(answer)
    if not answer:
        raise UserError(f"{where}: empty answer after '####'")
    return Record(question.strip(), _clean_steps(steps_text.split()), answer)


def parse_gsm8k_answer(text: str, where: str) -> tuple:
    """Original GSM8k answer -> (steps, answer): `<<...>>` annotations in order, text after `####`."""
    if "####" not in text:
        raise UserError(f"{where}: GSM8k answer has no '#### answer' line")
    body, answer = text.rsplit("####", 1)
    steps = [f"<<{a}>>" for a in _ANNOTATION.findall(body)]
    answer = normalize_answer(answer)
    if not answer:
        raise UserError(f"{where}: empty answer after '####'")
    return _clean_steps(steps), answer


def _record_from_dict(d, where: str, gsm8k_ok: bool) -> Record:
    if not isinstance(d, dict):
        raise UserError(f"{where}: expected a JSON object with question/steps/answer, got {type(d).__name__}")
    for key in ("question", "answer"):
        if key not in d:
            raise UserError(f"{where}: record is missing the key '{key}'")
    question, answer = d["question"], d["answer"]
    if not isinstance(question, str) or not question.strip():
        raise UserError(f"{where}: 'question' must be a non-empty string")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str):
        raise UserError(f"{where}: 'answer' must be a string")
    extra = {k: v for k, v in d.items() if k not in ("question", "steps", "answer")}
    if "steps" not in d:
        if not gsm8k_ok:
            raise UserError(f"{where}: record is missing the key 'steps'")
        steps, answer = parse_gsm8k_answer(answer, where)
        return Record(question.strip(), steps, answer, extra)
    steps = d["steps"]
    if not isinstance(steps, list) or not all(isinstance(s, str) for s in steps):
        raise UserError(f"{where}: 'steps' must be a list of strings")
    answer = normalize_answer(answer)
    if not answer:
        raise UserError(f"{where}: empty answer")
    return Record(question.strip(), _clean_steps(steps), answer, extra)


def detect_format(path, text: str) -> str:
    """`json` for a list, `gsm8k` for one object per line, `icot` for `||` text."""
    head = text.lstrip()[:1]
    if head == "[":
        return "json"
    if head == "{":
        return "gsm8k"
    first = next((l for l in text.splitlines() if l.strip()), "")
    if "||" in first:
        return "icot"
    raise UserError(
        f"{path}:1: cannot detect the format (not a JSON list, not jsonl, no '||' on the first line); "
        f"use --format {{{','.join(FORMATS)}}}"
    )


def _read_text(path) -> str:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, expected a data file")
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not valid UTF-8 text")


def _load_json_list(path, text: str) -> list:
    """Parse a top-level JSON list element by element so errors can name the line of the record."""
    dec = json.JSONDecoder()
    records = []
    pos = text.index("[") + 1
    line, counted = 1, 0

    def line_at(i):
        nonlocal line, counted
        line += text.count("\n", counted, i)
        counted = i
        return line

    def skip_ws(i):
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    pos = skip_ws(pos)
    if pos < len(text) and text[pos] == "]":
        return records
    while True:
        pos = skip_ws(pos)
        where = f"{path}:{line_at(pos)}"
        try:
            obj, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg})")
        records.append(_record_from_dict(obj, f"{where} (record {len(records) + 1})", gsm8k_ok=False))
        pos = skip_ws(pos)
        if pos < len(text) and text[pos] == ",":
            pos += 1
            continue
        if pos < len(text) and text[pos] == "]":
            if text[pos + 1 :].strip():
                raise UserError(f"{path}:{line_at(pos)}: unexpected text after the closing ']'")
            return records
        raise UserError(f"{path}:{line_at(min(pos, len(text)))}: invalid JSON list (expected ',' or ']')")


def load_records(path, format: Optional[str] = None) -> list:
    """Read a data file into a list of `Record`s (format auto-detected unless given).

    Raises `UserError` naming the file and line for malformed input or an empty file.
    """
    text = _read_text(path)
    if not text.strip():
        raise UserError(f"{path}:1: empty file, no records")
    if format is None:
        format = detect_format(path, text)
    if format not in FORMATS:
        raise UserError(f"unknown format '{format}' (choose from {', '.join(FORMATS)})")
    records = []
    if format == "json":
        if text.lstrip()[:1] != "[":
            raise UserError(f"{path}:1: expected a JSON list of records")
        records = _load_json_list(path, text)
    else:
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path}:{i}"
            if format == "icot":
                records.append(parse_icot_line(line, where))
            else:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{where}: invalid JSON ({e.msg})")
                records.append(_record_from_dict(obj, where, gsm8k_ok=True))
    if not records:
        raise UserError(f"{path}:1: no records found")
    return records


def save_records(records, path) -> None:
    """Write the official JSON list, one record per line (so errors can name a line)."""
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    body = ",\n".join(json.dumps(r.to_json(), ensure_ascii=False) for r in records)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text("[\n" + body + "\n]\n", encoding="utf-8")
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves neither a temp file nor a torn output
        raise


def step_distribution(records) -> dict:
    """{n_steps: count}, sorted by n_steps (0 = step-less records)."""
    return dict(sorted(Counter(len(r.steps) for r in records).items()))


# ---------------------------------------------------------------- download


def fetch(url, dest: Path, progress=None, timeout=30.0, hint: str = "") -> Path:
    """Download `url` to `dest` (removed again on failure). Any network failure is a one-line
    `UserError` naming the URL (+ `hint`: what to do with the file once fetched another way).

    `progress(label, total_bytes)` must return a context manager with `.update(n)` (click.progressbar
    fits); without a Content-Length there is no bar."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(dest, "wb") as f:
            total = resp.headers.get("Content-Length") if getattr(resp, "headers", None) else None
            total = int(total) if total else None
            ctx = progress(url.rsplit("/", 1)[-1], total) if progress and total else None
            bar = ctx.__enter__() if ctx else None
            try:
                while chunk := resp.read(1 << 16):
                    f.write(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
            finally:
                if ctx:
                    ctx.__exit__(None, None, None)
    except (urllib.error.URLError, OSError, ValueError) as e:
        Path(dest).unlink(missing_ok=True)
        reason = getattr(e, "reason", None) or e
        raise UserError(f"could not download {url} ({reason}){'; ' + hint if hint else ''}")
    return Path(dest)


def _download_splits(urls: dict, out_dir, splits, fmt: str, progress, timeout) -> dict:
    """Fetch each split's file, read it with our reader (validates it), write `{split}.json`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in splits:
        url = urls[split]
        raw = out_dir / f"{split}.{fmt}.part"
        fetch(url, raw, progress, timeout, hint=f"fetch that file another way and run `mlx-coconut data "
              f"convert {url.rsplit('/', 1)[-1]} --out {out_dir / (split + '.json')}`")
        try:
            records = load_records(raw, format="icot" if fmt == "txt" else "json")
        finally:
            raw.unlink(missing_ok=True)
        save_records(records, out_dir / f"{split}.json")
        counts[split] = len(records)
    return counts


def download_gsm8k(out_dir, splits=("train", "valid", "test"), progress=None, timeout=30.0) -> dict:
    """Download the pinned iCoT GSM8k splits and write `{split}.json`. Returns {split: n_records}."""
    return _download_splits(GSM8K_URLS, out_dir, splits, "txt", progress, timeout)


def download_prosqa(out_dir, splits=("train", "valid", "test"), progress=None, timeout=30.0) -> dict:
    """Download ProsQA from the official repository's data/ at COCONUT_COMMIT → `{split}.json`
    (the graph keys idx_to_symbol, edges, root, target, neg_target are kept)."""
    return _download_splits(PROSQA_URLS, out_dir, splits, "json", progress, timeout)


def prontoqa_records(source: dict, where: str = "ProntoQA source") -> list:
    """The official preprocessing/prontoqa.py: each entry's `test_example` becomes a record whose
    question is `question + " " + query`, whose steps are the chain of thought joined in pairs
    (`Fae is a zumpus. Zumpuses are rompuses.`: a fact and the rule applied to it) and whose answer
    is the label (`True` / `False`). Entries are kept in file order."""
    if not isinstance(source, dict) or not source:
        raise UserError(f"{where}: expected a JSON object of examples (run_experiment.py --model-name json)")
    records = []
    for key, entry in source.items():
        ex = entry.get("test_example") if isinstance(entry, dict) else None
        if not isinstance(ex, dict):
            raise UserError(f"{where}: entry {key!r} has no 'test_example' object")
        missing = [k for k in ("question", "query", "chain_of_thought", "answer") if k not in ex]
        if missing:
            raise UserError(f"{where}: entry {key!r}: test_example is missing {', '.join(missing)}")
        cot = ex["chain_of_thought"]
        if not isinstance(cot, list) or not all(isinstance(c, str) for c in cot):
            raise UserError(f"{where}: entry {key!r}: chain_of_thought must be a list of strings")
        steps = [" ".join(cot[i:i + 2]) for i in range(0, len(cot), 2)]
        records.append(_record_from_dict({"question": ex["question"] + " " + ex["query"],
                                          "steps": steps, "answer": ex["answer"]},
                                         f"{where}: entry {key!r}", gsm8k_ok=False))
    return records


def download_prontoqa(out_dir, source=None, splits=("train", "valid", "test"), progress=None,
                      timeout=30.0) -> dict:
    """ProntoQA as the official recipe builds it: the generated `5hop_0shot_random.json` (a file or
    an http(s) URL) → records (`prontoqa_records`) → the official cut 9000 / 200 / rest →
    `{split}.json`. Returns {split: n_records}."""
    if not source:
        raise UserError(f"ProntoQA is generated, not hosted: clone {PRONTOQA_REPO}, run `{PRONTOQA_GENERATE}`"
                        f" there, then pass the 5hop_0shot_random.json it writes with --source")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    src, tmp = str(source), None
    if src.startswith(("http://", "https://")):
        tmp = fetch(src, out_dir / "5hop_0shot_random.json.part", progress, timeout,
                    hint="fetch it another way and pass the file with --source")
        src = tmp
    try:
        text = _read_text(src)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{source}:{e.lineno}: invalid JSON ({e.msg})") from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    records = prontoqa_records(data, str(source))
    counts = {}
    for split in splits:
        lo, hi = PRONTOQA_SPLITS[split]
        part = records[lo:hi]
        if not part:
            raise UserError(f"{source}: {len(records)} examples leave the {split} split empty "
                            f"(official cut: train 0-8999, valid 9000-9199, test 9200-)")
        save_records(part, out_dir / f"{split}.json")
        counts[split] = len(part)
    return counts


# ---------------------------------------------------------------- the one formatter

MODES = ("cot", "no-cot", "coconut", "pause", "no-thought")


MAX_C_THOUGHT = 64  # thoughts per replaced step (the paper uses 1-2); bounds prompt length


@dataclass(frozen=True)
class FormatConfig:
    """How a record becomes model input.

    mode: `cot` (question, all steps, answer; no markers), `no-cot` (question, answer), `coconut`
    (question, <|start-latent|>, latents, <|end-latent|>, remaining steps, answer; hidden states are
    fed back), `pause` (same tokens as coconut, but the latents stay ordinary learned tokens: the
    paper's "pause as thought"), `no-thought` (curriculum removes steps but adds no latents and no
    markers: the paper's "w/o thought").
    """

    mode: str = "cot"
    stage: int = 0
    c_thought: int = 1
    max_latent_stage: int = 3
    pad_latent_to_max: bool = True  # as every official config
    uniform_prob: float = 0.0

    def __post_init__(self):
        if self.mode not in MODES:
            raise UserError(f"unknown mode '{self.mode}' (choose from {', '.join(MODES)})")
        if self.stage < 0 or self.c_thought < 0 or self.max_latent_stage < 0:
            raise UserError("stage, c_thought and max_latent_stage must be >= 0")
        if self.c_thought > MAX_C_THOUGHT:
            raise UserError(f"c_thought {self.c_thought}: at most {MAX_C_THOUGHT} thoughts per step")
        if not 0.0 <= self.uniform_prob <= 1.0:
            raise UserError("uniform_prob must be in [0, 1]")


@dataclass(frozen=True)
class SpecialIds:
    start_latent: int
    latent: int
    end_latent: int
    eos: int


@dataclass
class Example:
    input_ids: list
    labels: list          # -100 on question, markers and latents
    prompt_ids: list      # question + markers + latents: what generation/eval starts from
    n_latents: int
    stage: int            # the stage actually used (differs from config.stage under uniform_prob)
    latent_start: int = -1  # index of the first latent in input_ids (and prompt_ids), -1 if none


@dataclass
class TokenizedRecord:
    question: list  # question + "\n", with special tokens (BOS for Llama 3)
    steps: list     # [step + "\n"], no special tokens
    answer: list    # "### " + answer, no special tokens, then EOS


def special_ids(tokenizer, eos_id: Optional[int] = None) -> SpecialIds:
    """Ids of the three latent tokens (added to the tokenizer if missing) plus EOS.

    Tokenizer only (`tokens.add_latent_tokens` also grows the model; both add tokens the same way).
    Works on transformers tokenizers and mlx-lm's TokenizerWrapper.
    """
    tokens, _ = add_tokens_to_tokenizer(tokenizer)
    start, latent, end = tokens.ids
    eos = eos_id if eos_id is not None else tokenizer.eos_token_id
    if eos is None:
        raise UserError("the tokenizer defines no EOS token; pass eos_id explicitly")
    return SpecialIds(start, latent, end, int(eos))


def tokenize_record(record: Record, tokenizer, eos_id: int) -> TokenizedRecord:
    """Tokenize the parts separately, exactly like the official `get_dataset`."""
    return TokenizedRecord(
        question=list(tokenizer.encode(record.question + "\n", add_special_tokens=True)),
        steps=[list(tokenizer.encode(s + "\n", add_special_tokens=False)) for s in record.steps],
        answer=list(tokenizer.encode("### " + record.answer, add_special_tokens=False)) + [eos_id],
    )


def latent_counts(n_steps: int, stage: int, config: FormatConfig) -> tuple:
    """(steps skipped, latents in training input, latents in eval prompt) for a latent-mode stage.

    Mirrors the official code, including its asymmetry: in training (`get_cot_latent_dataset`) a
    stage k <= max_latent_stage always gets k*c latents, even if the record has fewer than k steps;
    the eval prompt (`get_question_latent_dataset`) caps at the number of steps (unless
    pad_latent_to_max). Past max_latent_stage both remove every step and use
    max_latent_stage (pad) or min(n_steps, max_latent_stage) thoughts.
    """
    c, m = config.c_thought, config.max_latent_stage
    if stage > m:
        skip = n_steps
        train = m if config.pad_latent_to_max else min(n_steps, m)
    else:
        skip = min(stage, n_steps)
        train = stage
    cap = m if config.pad_latent_to_max else min(m, n_steps)
    prompt = min(cap, stage)
    return skip, train * c, prompt * c


def format_tokenized(tok: TokenizedRecord, config: FormatConfig, ids: SpecialIds,
                     rng: Optional[random.Random] = None) -> Example:
    """Assemble input_ids / labels / prompt_ids from pre-tokenized parts (see `format_record`)."""
    n_steps = len(tok.steps)
    markers = config.mode in ("coconut", "pause")
    if config.mode == "cot":
        stage, skip, n_lat, n_prompt_lat = 0, 0, 0, 0
    elif config.mode == "no-cot":
        stage, skip, n_lat, n_prompt_lat = 0, n_steps, 0, 0
    else:
        stage = config.stage
        if config.uniform_prob > 0:
            if rng is None:
                raise ValueError("uniform_prob > 0 needs a seeded random.Random as rng")
            if rng.random() < config.uniform_prob:  # official: uniform over 0..len(steps)
                stage = rng.randrange(n_steps + 1)
        skip, n_lat, n_prompt_lat = latent_counts(n_steps, stage, config)
        if config.mode == "no-thought":
            n_lat = n_prompt_lat = 0

    def head(n):
        if not markers:
            return list(tok.question)
        return list(tok.question) + [ids.start_latent] + [ids.latent] * n + [ids.end_latent]

    prefix = head(n_lat)
    rest = [t for s in tok.steps[skip:] for t in s] + list(tok.answer)
    input_ids = prefix + rest
    labels = [-100] * len(prefix) + rest
    latent_start = len(tok.question) + 1 if markers and n_lat > 0 else -1
    return Example(input_ids, labels, head(n_prompt_lat), n_lat, stage, latent_start)


def format_record(record: Record, tokenizer, config: FormatConfig, ids: SpecialIds,
                  rng: Optional[random.Random] = None) -> Example:
    """The one formatter: a record -> token ids for training, evaluation and generation.

    Tokens: `question + "\\n"` (with special tokens, i.e. BOS for Llama 3), then for latent modes
    `<|start-latent|>`, n x `<|latent|>`, `<|end-latent|>`, then each remaining `step + "\\n"`, then
    `"### " + answer`, then EOS. There is no newline after `<|end-latent|>` (as official). Labels are
    -100 on the question, the markers and the latents. `rng` (random.Random) is required when
    `config.uniform_prob > 0`; evaluation should use uniform_prob=0 (as official).
    """
    return format_tokenized(tokenize_record(record, tokenizer, ids.eos), config, ids, rng)


def decode(tokenizer, ids) -> str:
    """Render token ids as text, special tokens included (what `data stats` shows)."""
    return tokenizer.decode(list(ids))


def check_tokenization_invariant(record: Record, tokenizer) -> tuple:
    """Official sanity check: parts tokenized separately == the whole text tokenized at once.

    Returns (ok, detail); never raises on a mismatch (BPE merges across a part boundary would make
    the formatted input differ from what the model sees in plain text).
    """
    whole = record.question + "\n" + "".join(s + "\n" for s in record.steps) + "### " + record.answer
    whole_ids = list(tokenizer.encode(whole, add_special_tokens=True))
    parts = (list(tokenizer.encode(record.question + "\n", add_special_tokens=True))
             + [t for s in record.steps for t in tokenizer.encode(s + "\n", add_special_tokens=False)]
             + list(tokenizer.encode("### " + record.answer, add_special_tokens=False)))
    if parts == whole_ids:
        return True, f"ok ({len(parts)} tokens)"
    i = next((i for i, (a, b) in enumerate(zip(parts, whole_ids)) if a != b), min(len(parts), len(whole_ids)))
    return False, (f"parts differ from whole text at token {i}: "
                   f"parts {parts[i:i + 4]} vs whole {whole_ids[i:i + 4]} "
                   f"(around {tokenizer.decode(whole_ids[max(0, i - 2):i + 2])!r})")


# ---------------------------------------------------------------- batching


def collate(examples, pad_id: int) -> dict:
    """Pad a training batch like the official `MyCollator`.

    Rows with latents are left-padded so that their FIRST latent sits in the same column (keeps the
    latent loop's per-step columns aligned across the batch); rows without latents are not
    left-padded. Then everything is right-padded to the longest row. Pads get label -100.
    Returns numpy int32 arrays: input_ids, labels (B, T); left_pad, lengths (B,). The model uses
    positions = column - left_pad and masks key columns < left_pad.
    """
    starts = [e.latent_start for e in examples if e.latent_start >= 0]
    target = max(starts) if starts else 0
    left = [target - e.latent_start if e.latent_start >= 0 else 0 for e in examples]
    width = max(l + len(e.input_ids) for l, e in zip(left, examples))
    input_ids = np.full((len(examples), width), pad_id, dtype=np.int32)
    labels = np.full((len(examples), width), -100, dtype=np.int32)
    for i, (l, e) in enumerate(zip(left, examples)):
        input_ids[i, l : l + len(e.input_ids)] = e.input_ids
        labels[i, l : l + len(e.labels)] = e.labels
    return {
        "input_ids": input_ids,
        "labels": labels,
        "left_pad": np.array(left, dtype=np.int32),
        "lengths": np.array([len(e.input_ids) for e in examples], dtype=np.int32),
    }


def collate_prompts(prompts, pad_id: int) -> dict:
    """Left-pad prompts (Examples or id lists) so they all END in the same column, for generation.

    Returns numpy int32 arrays: input_ids (B, T), left_pad (B,), lengths (B,).
    """
    rows = [p.prompt_ids if isinstance(p, Example) else list(p) for p in prompts]
    width = max(len(r) for r in rows)
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int32)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r) :] = r
    return {
        "input_ids": input_ids,
        "left_pad": np.array([width - len(r) for r in rows], dtype=np.int32),
        "lengths": np.array([len(r) for r in rows], dtype=np.int32),
    }


# ---------------------------------------------------------------- stats


class TextTokenizer:
    """A character tokenizer so `data stats` can render through `format_record` without a model.

    Each latent marker / `<eos>` is one token, every other character is one token.
    """

    EOS = "<eos>"

    def __init__(self):
        self.vocab = {t: i for i, t in enumerate((self.EOS,) + LATENT_TOKENS)}
        self.inv = {i: t for t, i in self.vocab.items()}
        self.eos_token_id = 0
        self._special = re.compile("(" + "|".join(re.escape(t) for t in self.vocab) + ")")

    def encode(self, text, add_special_tokens=False):
        out = []
        for piece in self._special.split(text):
            if piece in (self.EOS,) + LATENT_TOKENS:
                out.append(self.vocab[piece])
                continue
            for ch in piece:
                if ch not in self.vocab:
                    self.vocab[ch] = len(self.vocab)
                    self.inv[self.vocab[ch]] = ch
                out.append(self.vocab[ch])
        return out

    def decode(self, ids):
        return "".join(self.inv[i] for i in ids)

    def get_vocab(self):
        return dict(self.vocab)

    def add_tokens(self, tokens, special_tokens=False):
        for t in tokens:
            t = getattr(t, "content", t)
            self.vocab.setdefault(t, len(self.vocab))
            self.inv[self.vocab[t]] = t

    def convert_tokens_to_ids(self, t):
        return self.vocab[t]


def load_tokenizer(model_dir):
    """The tokenizer of a converted model directory (checkpoint.load_tokenizer: no remote code)."""
    from .checkpoint import load_tokenizer as load
    return load(model_dir)


def _summary(values) -> str:
    v = sorted(values)
    p95 = v[min(len(v) - 1, int(0.95 * len(v)))]
    return f"min {v[0]}  mean {statistics.fmean(v):.1f}  median {statistics.median(v):g}  p95 {p95}  max {v[-1]}"


def stats_report(records, tokenizer=None, c_thought: int = 2, index: int = 0,
                 max_tokenized: int = 5000) -> str:
    """The Milestone-1 report: count, step distribution, a raw record and its renderings.

    Renderings go through `format_record` + decode (with a character tokenizer when none is given).
    """
    lines = [f"records: {len(records)}"]
    dist = step_distribution(records)
    with_steps = sum(n for k, n in dist.items() if k > 0)
    lines.append(f"records with steps: {with_steps}  (step-less: {dist.get(0, 0)})")
    lines.append("steps per record: " + "  ".join(f"{k}:{n}" for k, n in dist.items()))
    if not 0 <= index < len(records):
        raise UserError(f"--index {index} is out of range (0..{len(records) - 1})")
    rec = records[index]
    core = {"question": rec.question, "steps": rec.steps, "answer": rec.answer}
    lines += ["", f"raw record [{index}]:", json.dumps(core, ensure_ascii=False, indent=2)]
    if rec.extra:
        lines.append("extra keys (kept): " + ", ".join(rec.extra))
    tok = tokenizer if tokenizer is not None else TextTokenizer()
    ids = special_ids(tok)
    views = [("stage 0 (CoT)", FormatConfig("cot")),
             ("stage 1, c=1", FormatConfig("coconut", stage=1, c_thought=1)),
             (f"stage 1, c={c_thought}", FormatConfig("coconut", stage=1, c_thought=c_thought))]
    if c_thought == 1:
        views = views[:2]
    for title, cfg in views:
        ex = format_record(rec, tok, cfg, ids)
        lines += ["", f"--- {title}: {len(ex.input_ids)} tokens, {len(ex.input_ids) - ex.labels.count(-100)} with loss ---",
                  decode(tok, ex.input_ids)]
    if tokenizer is not None:
        ok, detail = check_tokenization_invariant(rec, tokenizer)
        lines += ["", f"tokenization invariant (parts == whole) on record {index}: {detail}"]
        sample = records
        note = ""
        if len(records) > max_tokenized:
            sample = random.Random(0).sample(records, max_tokenized)
            note = f" (random sample of {max_tokenized})"
        q, cot, nocot, bad = [], [], [], 0
        for r in sample:
            t = tokenize_record(r, tokenizer, ids.eos)
            q.append(len(t.question))
            cot.append(len(t.question) + sum(map(len, t.steps)) + len(t.answer))
            nocot.append(len(t.question) + len(t.answer))
        for r in sample[:200]:
            bad += not check_tokenization_invariant(r, tokenizer)[0]
        lines += ["", f"token lengths{note}:",
                  f"  question        {_summary(q)}",
                  f"  CoT (stage 0)   {_summary(cot)}",
                  f"  no-CoT          {_summary(nocot)}",
                  f"  invariant mismatches in the first {min(200, len(sample))} records: {bad}"]
    return "\n".join(lines)


# Synthetic data lives in its own module; re-exported here because it is "data".
from .synth import synth_records  # noqa: E402
