"""Generation accuracy: the official answer extraction and a batched evaluation loop.

`evaluate` prompts the model exactly as it was trained (the formatter's `prompt_ids`: question, and for
COCONUT stages `<|start-latent|>` + k·c latents + `<|end-latent|>`), generates greedily with the one
latent loop (`coconut.generate`), and scores like the official `run.py`: decode prompt + generation
without special tokens, take the text after the last `#`, drop commas, strip, compare exactly with the
reference answer (commas dropped, stripped).
"""

import re
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import mlx.core as mx
import numpy as np

from . import coconut
from .errors import UserError
from .tokens import eos_ids
from .data import format_record


def extract_answer(text: str) -> str:
    """Official: `text.split("#")[-1].replace(",", "").strip()` (the whole text if there is no `#`)."""
    return text.split("#")[-1].replace(",", "").strip()


def extract_cot(text: str) -> str:
    """Official CoT match: lines after the first (the question), up to the first `#`, stripped."""
    return "\n".join(text.split("\n")[1:]).split("#")[0].strip()


def reference_answer(answer: str) -> str:
    return answer.replace(",", "").strip()


_NUMBER = re.compile(r"^[-+]?\d+(\.\d+)?$")


def default_max_tokens(records) -> int:
    """The official generation budget: 64 new tokens for GSM8k, 128 for the others (ProsQA,
    ProntoQA, whose answers are sentences / labels). Told apart by the answers: all numbers = GSM8k."""
    return 64 if all(_NUMBER.match(reference_answer(r.answer)) for r in records) else 128


@dataclass
class EvalResults:
    examples: list             # per record: question, answer, prediction, correct, text, ...
    accuracy: float
    cot_match: float           # generated steps == reference steps (official `cor_cot`)
    mean_generated_tokens: float
    seconds: float
    settings: dict = field(default_factory=dict)

    @property
    def n(self):
        return len(self.examples)

    def summary(self) -> dict:
        return {"n": self.n, "accuracy": self.accuracy, "cot_match": self.cot_match,
                "mean_generated_tokens": self.mean_generated_tokens, "seconds": self.seconds}


BATCH_SIZE = 32  # questions generated at once: decoding is cheaper per row in bigger batches
# What a COCONUT model is fed at its thought columns: its own continuous thoughts (the method), those
# of another question with as many thoughts ("swapped": do the answers depend on the thoughts' content?),
# or no thought at all (the slots keep the `<|latent|>` embedding, as in pause as thought)
THOUGHTS = ("own", "swapped", "none")


def evaluate(model, tokenizer=None, settings=None, records=None, batch_size: int = BATCH_SIZE,
             max_tokens: int = 64, stage: Optional[int] = None, sampler: Optional[Callable] = None,
             progress: Optional[Callable] = None, thoughts: str = "own") -> EvalResults:
    """Greedy batched generation on `records` → per-example predictions and exact-match accuracy.

    `evaluate(model, tokenizer, settings, records)` or `evaluate(loaded, records)` with a
    `checkpoint.Loaded`. `stage` overrides the trained stage (e.g. evaluate a stage-2 model with
    stage-1 prompts). `progress(n_done)` is called after each batch. `thoughts` (THOUGHTS) is what a
    COCONUT model is fed at its thought columns; with "swapped" each example records its `donor`."""
    if isinstance(tokenizer, (list, tuple)):  # evaluate(loaded, records, ...)
        tokenizer, records = None, tokenizer
    if hasattr(model, "settings") and hasattr(model, "model"):  # a checkpoint.Loaded
        tokenizer = tokenizer or model.tokenizer
        settings = settings or model.settings
        model = model.model
    if thoughts not in THOUGHTS:
        raise UserError(f"thoughts={thoughts!r}: choose from {', '.join(THOUGHTS)}")
    if thoughts != "own" and settings.mode != "coconut":
        raise UserError(f"a {settings.mode} model feeds no hidden state back: its thoughts cannot be "
                        f"{thoughts} (only a COCONUT model's)")
    ids = settings.special_ids(tokenizer)
    config = settings.format_config(stage)
    feedback = settings.mode != "pause" and thoughts != "none"
    eos = eos_ids(tokenizer)
    examples = [format_record(r, tokenizer, config, ids) for r in records]
    order = sorted(range(len(records)), key=lambda i: len(examples[i].prompt_ids))  # less padding
    out = [None] * len(records)
    start = time.perf_counter()
    donors, given = None, None
    if thoughts == "swapped":
        donors, given = swapped_thoughts(model, [e.prompt_ids for e in examples], ids, order, batch_size)
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        prompts = [examples[i].prompt_ids for i in idx]
        gen = coconut.generate(model, prompts, latent_id=ids.latent, eos_ids=eos, max_tokens=max_tokens,
                               pad_id=ids.eos, sampler=sampler, feedback=feedback,
                               given_thoughts=None if given is None else
                               thought_columns([given[i] for i in idx], prompts, ids.latent))
        for j, i in enumerate(idx):
            rec, ex, toks = records[i], examples[i], gen.tokens[j]
            text = tokenizer.decode(list(ex.prompt_ids) + list(toks), skip_special_tokens=True)
            pred, ref = extract_answer(text), reference_answer(rec.answer)
            out[i] = {"index": i, "question": rec.question, "answer": ref, "prediction": pred,
                      "correct": pred == ref, "cot_match": extract_cot(text) == "\n".join(rec.steps),
                      "generated": tokenizer.decode(list(toks)), "n_generated": len(toks),
                      "n_latents": sum(t == ids.latent for t in ex.prompt_ids),
                      "finished": gen.finished[j]}
            if donors is not None:
                out[i]["donor"] = donors[i]
        if progress is not None:
            progress(min(b + batch_size, len(order)))
    settings = {"mode": config.mode, "stage": config.stage, "c_thought": config.c_thought}
    if thoughts != "own":
        settings["thoughts"] = thoughts
    return summarize(out, time.perf_counter() - start, settings)


def swapped_thoughts(model, prompts: list, ids, order: list, batch_size: int, seed: int = 0) -> tuple:
    """(donors, given): each question's donor (another question with as many thoughts, a random
    derangement within each such group; a question alone in its group keeps its own) and the donor's
    continuous thoughts [n, D] (computed in a prefill-only pass, as `generate` feeds them)."""
    own = [None] * len(prompts)
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        gen = coconut.generate(model, [prompts[i] for i in idx], latent_id=ids.latent, eos_ids=[ids.eos],
                               max_tokens=0, pad_id=ids.eos, return_thoughts=True)
        for j, i in enumerate(idx):
            own[i] = (gen.thoughts[j][mx.array(np.flatnonzero(gen.thought_mask[j]))]
                      if gen.thoughts is not None and gen.thought_mask[j].any() else None)
    donors = list(range(len(prompts)))
    groups = {}
    for i, p in enumerate(prompts):
        groups.setdefault(sum(t == ids.latent for t in p), []).append(i)
    rng = np.random.default_rng(seed)
    for k, members in sorted(groups.items()):
        if k and len(members) > 1:
            for i, d in zip(members, derangement(len(members), rng)):
                donors[i] = members[d]
    return donors, [own[d] for d in donors]


def derangement(n: int, rng) -> list:
    """A random permutation of range(n) (n >= 2) that moves every element."""
    while True:  # about e tries on average
        p = rng.permutation(n)
        if not (p == np.arange(n)).any():
            return p.tolist()


def thought_columns(thoughts: list, prompts: list, latent_id: int) -> list:
    """Per-row thoughts ([k_b, D] or None) → one [B, D] per latent column of the left-padded batch
    of `prompts` (every prompt ends in the last column, so a row's k_b thoughts are its last k_b
    latent columns); rows without a thought at a column get zeros there (not fed)."""
    width = max(len(p) for p in prompts)
    # each row's latent columns in the padded batch, in order: its thought j sits at positions[b][j]
    positions = [[width - len(p) + i for i, x in enumerate(p) if x == latent_id] for p in prompts]
    cols = sorted({c for pos in positions for c in pos})
    if not cols or all(t is None for t in thoughts):
        return None
    zero = mx.zeros((next(t.shape[-1] for t in thoughts if t is not None),), mx.float32)
    slot = [{c: j for j, c in enumerate(pos)} for pos in positions]
    return [mx.stack([t[slot[b][c]].astype(mx.float32) if t is not None and c in slot[b] else zero
                      for b, t in enumerate(thoughts)]) for c in cols]


def summarize(examples: list, seconds: float, settings: dict) -> EvalResults:
    """Accuracy, CoT match and mean generated tokens over per-record results."""
    n = max(len(examples), 1)
    return EvalResults(
        examples=examples,
        accuracy=sum(e["correct"] for e in examples) / n,
        cot_match=sum(e["cot_match"] for e in examples) / n,
        mean_generated_tokens=sum(e["n_generated"] for e in examples) / n,
        seconds=seconds,
        settings=settings,
    )


def evaluate_sharded(dist, model, tokenizer, settings, records, **kwargs) -> EvalResults:
    """`evaluate` with the records split across the ranks of `dist` (a `distributed.Dist`): each rank
    generates for its contiguous share, the per-record results are gathered, so every rank returns the
    same EvalResults over all records, in their order (seconds: the slowest rank)."""
    sizes = [len(s) for s in dist.split(records)]
    start = sum(sizes[:dist.rank])
    part = evaluate(model, tokenizer, settings, dist.shard(records), **kwargs)
    for e in part.examples:
        e["index"] += start
    parts = dist.gather_json({"examples": part.examples, "seconds": part.seconds}, "the evaluation")
    out = [e for p in parts for e in p["examples"]]
    return summarize(out, max(p["seconds"] for p in parts), part.settings)
