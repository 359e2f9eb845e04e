"""The small public Python API (the CLI is built on it).

    from mlx_coconut import load, generate_answers
    loaded = load("runs/stage1")                       # model dir or run dir
    [answer] = generate_answers(loaded, ["Natalia sold clips to 48 of her friends..."])
    print(answer.text, answer.tokens)

Prompts come from the one formatter (`data.format_record`) with the settings the model was trained
with, and generation is `coconut.generate` (batched, KV-cached); nothing here re-implements either.
"""

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

import mlx.core as mx
import numpy as np

from . import coconut
from .checkpoint import Loaded, load  # noqa: F401  (re-exported)
from .tokens import eos_ids  # noqa: F401  (re-exported)
from .data import Record, SpecialIds, Templated, format_record, make_batch
from .errors import UserError


@dataclass
class Answer:
    question: str
    prompt_ids: list                  # question + <|start-latent|> + latents + <|end-latent|> (or CoT)
    tokens: list                      # generated ids, EOS excluded
    text: str
    finished: bool                    # stopped at EOS (else ran out of max_tokens)
    thoughts: Optional[mx.array]      # [n_thoughts, D] continuous thoughts (return_thoughts=True)
    timings: dict                     # of the batch this question ran in (seconds, tokens)


def special_ids(loaded: Loaded) -> SpecialIds:
    return loaded.settings.special_ids(loaded.tokenizer)


def prompt_ids(loaded: Loaded, question) -> list:
    """The eval prompt for a question (a string, or a chat template's `Templated` rendering) or a
    record ({question, steps, answer} / Record). Special-token strings in the text are encoded as
    text (`data.encode_text`): a typed `<|latent|>` is characters, not a thought.

    The official eval prompt caps the thoughts at the record's number of steps. A bare question has
    no known steps, so it gets the count the stage was trained with: min(stage, max_latent_stage)·c."""
    config = loaded.settings.format_config()
    if isinstance(question, (str, Templated)):
        record = Record(question, [], "")
        config = dataclasses.replace(config, pad_latent_to_max=True, uniform_prob=0.0)
    else:
        record = question if isinstance(question, Record) else Record(
            question["question"], list(question.get("steps", [])), str(question.get("answer", "")))
    return format_record(record, loaded.tokenizer, config, special_ids(loaded)).prompt_ids


def generate_answers(loaded: Loaded, questions, max_tokens: int = 64, temp: float = 0.0,
                     top_p: float = 1.0, batch_size: int = 16, return_thoughts: bool = False,
                     on_token: Optional[Callable] = None,
                     on_thoughts: Optional[Callable] = None) -> list:
    """Latent-then-text answers for a list of questions (strings or records), `batch_size` at a time.

    Greedy at temp=0, else mlx-lm's temperature / top-p sampler (seed with mx.random.seed).
    `on_token(step, ids)` / `on_thoughts(thoughts, mask)` are passed to `coconut.generate` per batch."""
    from mlx_lm.sample_utils import make_sampler

    tok, ids = loaded.tokenizer, special_ids(loaded)
    sampler = make_sampler(temp, top_p) if temp > 0 else None
    pad = tok.pad_token_id if tok.pad_token_id is not None else ids.eos
    answers = []
    for i in range(0, len(questions), batch_size):
        batch = questions[i:i + batch_size]
        prompts = [prompt_ids(loaded, q) for q in batch]
        limit = loaded.model.args.max_position_embeddings
        for n, p in enumerate(prompts):
            if len(p) > limit:  # refuse at once rather than prefill for minutes into garbage
                raise UserError(f"question {i + n + 1}: the prompt is {len(p)} tokens, past the model's "
                                f"max_position_embeddings {limit}")
        gen = coconut.generate(loaded.model, prompts, ids.latent, eos_ids(tok), max_tokens, pad,
                               sampler, feedback=loaded.settings.mode != "pause",
                               return_thoughts=return_thoughts, on_token=on_token,
                               on_thoughts=on_thoughts)
        for b, (q, p) in enumerate(zip(batch, prompts)):
            thoughts = None
            if return_thoughts and gen.thoughts is not None:
                thoughts = gen.thoughts[b][mx.array(np.flatnonzero(gen.thought_mask[b]))]
            text = q if isinstance(q, str) else q.question if isinstance(q, Record) else q["question"]
            answers.append(Answer(text, p, gen.tokens[b], tok.decode(gen.tokens[b]), gen.finished[b],
                                  thoughts, gen.timings))
    return answers


def describe_thoughts(loaded: Loaded, thoughts: mx.array, k: int = 5) -> list:
    """Per thought [n, D]: its L2 norm and top-k nearest tokens through the output head
    (softmax(model.logits(thought))) → [{"index", "norm", "top_k": [{"id", "token", "prob"}]}]."""
    if thoughts is None or thoughts.shape[0] == 0:
        return []
    probs = mx.softmax(loaded.model.logits(thoughts).astype(mx.float32), axis=-1)
    top = mx.argsort(-probs, axis=-1)[:, :k]
    top_p = mx.take_along_axis(probs, top, axis=-1)
    norms = mx.linalg.norm(thoughts.astype(mx.float32), axis=-1)
    out = []
    for i, (ids, ps, n) in enumerate(zip(top.tolist(), top_p.tolist(), norms.tolist())):
        out.append({"index": i, "norm": n, "top_k": [
            {"id": t, "token": loaded.tokenizer.decode([t]), "prob": p} for t, p in zip(ids, ps)]})
    return out


def batch_loss(loaded: Loaded, records, feedback: Optional[bool] = None):
    """Loss of records formatted with the loaded settings (training form), as one padded batch."""
    config, ids = loaded.settings.format_config(), special_ids(loaded)
    examples = [format_record(r if isinstance(r, Record) else Record(
        r["question"], list(r["steps"]), str(r["answer"])), loaded.tokenizer, config, ids)
        for r in records]
    tok = loaded.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else ids.eos
    batch = make_batch(examples, pad, ids.latent, bucket=1, latent_align=1)  # plain official padding
    feedback = loaded.settings.mode != "pause" if feedback is None else feedback
    return coconut.collated_loss(loaded.model, batch, feedback)
