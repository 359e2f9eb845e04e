"""`mlx-coconut data stats`: counts, step distribution, and a record rendered through the one
formatter (with a character tokenizer when no model is given)."""

import json
import random
import re
import statistics
from collections import Counter

from ..errors import UserError
from ..tokens import LATENT_TOKENS
from .format import FormatConfig, check_tokenization_invariant, decode, format_record, add_latent_special_ids, tokenize_record


def step_distribution(records) -> dict:
    """{n_steps: count}, sorted by n_steps (0 = step-less records)."""
    return dict(sorted(Counter(len(r.steps) for r in records).items()))


class TextTokenizer:
    """A character tokenizer so `data stats` can render through `format_record` without a model.

    Each latent marker / `<eos>` is one token, every other character is one token (with
    `split_special_tokens`, as `encode_text` asks, markers in the text are characters too).
    """

    EOS = "<eos>"

    def __init__(self):
        self.vocab = {t: i for i, t in enumerate((self.EOS,) + LATENT_TOKENS)}
        self.inv = {i: t for t, i in self.vocab.items()}
        self.eos_token_id = 0
        self._special = re.compile("(" + "|".join(re.escape(t) for t in self.vocab) + ")")

    def encode(self, text, add_special_tokens=False, split_special_tokens=False):
        out = []
        for piece in [text] if split_special_tokens else self._special.split(text):
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


def _summary(values) -> str:
    v = sorted(values)
    p95 = v[min(len(v) - 1, int(0.95 * len(v)))]
    return f"min {v[0]}  mean {statistics.fmean(v):.1f}  median {statistics.median(v):g}  p95 {p95}  max {v[-1]}"


def stats_report(records, tokenizer=None, c_thought: int = 2, index: int = 0,
                 max_tokenized: int = 5000) -> str:
    """The `data stats` report: count, step distribution, a raw record and its renderings.

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
    ids = add_latent_special_ids(tok)
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
