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

from . import coconut
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


def evaluate(model, tokenizer=None, settings=None, records=None, batch_size: int = BATCH_SIZE,
             max_tokens: int = 64, stage: Optional[int] = None, sampler: Optional[Callable] = None,
             progress: Optional[Callable] = None) -> EvalResults:
    """Greedy batched generation on `records` → per-example predictions and exact-match accuracy.

    `evaluate(model, tokenizer, settings, records)` or `evaluate(loaded, records)` with a
    `checkpoint.Loaded`. `stage` overrides the trained stage (e.g. evaluate a stage-2 model with
    stage-1 prompts). `progress(n_done)` is called after each batch."""
    if isinstance(tokenizer, (list, tuple)):  # evaluate(loaded, records, ...)
        tokenizer, records = None, tokenizer
    if hasattr(model, "settings") and hasattr(model, "model"):  # a checkpoint.Loaded
        tokenizer = tokenizer or model.tokenizer
        settings = settings or model.settings
        model = model.model
    ids = settings.special_ids(tokenizer)
    config = settings.format_config(stage)
    feedback = settings.mode != "pause"
    eos = eos_ids(tokenizer)
    examples = [format_record(r, tokenizer, config, ids) for r in records]
    order = sorted(range(len(records)), key=lambda i: len(examples[i].prompt_ids))  # less padding
    out = [None] * len(records)
    start = time.perf_counter()
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        gen = coconut.generate(model, [examples[i].prompt_ids for i in idx], latent_id=ids.latent,
                               eos_ids=eos, max_tokens=max_tokens, pad_id=ids.eos,
                               sampler=sampler, feedback=feedback)
        for j, i in enumerate(idx):
            rec, ex, toks = records[i], examples[i], gen.tokens[j]
            text = tokenizer.decode(list(ex.prompt_ids) + list(toks), skip_special_tokens=True)
            pred, ref = extract_answer(text), reference_answer(rec.answer)
            out[i] = {"index": i, "question": rec.question, "answer": ref, "prediction": pred,
                      "correct": pred == ref, "cot_match": extract_cot(text) == "\n".join(rec.steps),
                      "generated": tokenizer.decode(list(toks)), "n_generated": len(toks),
                      "n_latents": sum(t == ids.latent for t in ex.prompt_ids),
                      "finished": gen.finished[j]}
        if progress is not None:
            progress(min(b + batch_size, len(order)))
    settings = {"mode": config.mode, "stage": config.stage, "c_thought": config.c_thought}
    return summarize(out, time.perf_counter() - start, settings)


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
