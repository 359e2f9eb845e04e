"""The COCONUT latent loop: one multi-pass forward for training, and latent-then-text generation.

A continuous thought is the final-norm hidden state at column t-1 used as the input embedding at a
`<|latent|>` column t. Columns are processed pass by pass with the KV cache reused: pass 0 runs up to
the first latent column, each later pass starts at a latent column (now holding the fed-back state)
and runs up to the next one, and the last pass covers the rest. Which columns are latent is known on
the host before the loop (it comes from the token ids), so the loop itself has no host syncs.
"""

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import mlx.core as mx
import numpy as np

from .data import collate_prompts
from .fastexp import exp
from .model import KVCache, Model

IGNORE = -100


def continuous_forward(model: Model, input_ids, latent_mask: np.ndarray, left_pad=None,
                       cache: Optional[KVCache] = None, feedback: bool = True,
                       thoughts: Optional[list] = None, given: Optional[list] = None) -> mx.array:
    """Final-norm hidden states [B, T, D] of a batch whose `latent_mask[b, t]` columns are thoughts.

    `feedback=False` is "pause as thought": latent tokens stay ordinary (learned) embeddings.
    If `thoughts` is a list, the fed-back states [B, D] are appended to it (one per latent column).
    `given` (one [B, D] per latent column) is fed at the thought columns instead of the states this
    batch computes: another question's thoughts, to test whether the answer depends on them."""
    embeds = model.embed(mx.array(input_ids))  # numpy batches (data.collate) welcome
    T = embeds.shape[1]
    latent_cols = np.flatnonzero(latent_mask.any(axis=0)).tolist() if feedback else []
    left_pad = None if left_pad is None else mx.array(left_pad)
    if cache is None and not latent_cols:  # one pass: attention over its own keys, no cache to fill
        return model.hidden_states(input_embeddings=embeds, left_pad=left_pad)
    if cache is None:
        cache = model.make_cache(left_pad, step=T)
    bounds = [0] + latent_cols + [T]
    hidden, fed = [], None
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        x = embeds[:, lo:hi] if fed is None else mx.concatenate([fed[:, None], embeds[:, lo + 1:hi]], 1)
        h = model.hidden_states(input_embeddings=x, cache=cache)
        hidden.append(h)
        if hi < T:  # hi is a latent column: rows with a thought there take h[t-1], others keep their token
            is_thought = mx.array(latent_mask[:, hi])[:, None]
            state = h[:, -1] if given is None else given[len(hidden) - 1].astype(h.dtype)
            fed = mx.where(is_thought, state, embeds[:, hi])
            if thoughts is not None:
                thoughts.append(fed)
    return mx.concatenate(hidden, axis=1) if len(hidden) > 1 else hidden[0]


@mx.custom_function
def cross_entropy(logits, targets):
    """Per-row cross-entropy of [N, V] logits against [N] targets, and the softmax (not meant to be
    differentiated): one exp pass serves the loss and its gradient, where the generic logsumexp
    forward and softmax backward exponentiate the vocabulary twice."""
    m = mx.stop_gradient(logits.max(axis=-1, keepdims=True))
    e = exp(logits - m)
    s = e.sum(axis=-1, keepdims=True)
    picked = mx.take_along_axis(logits, targets[:, None], axis=-1)
    return (m + mx.log(s) - picked)[:, 0], e / s


@cross_entropy.vjp
def _cross_entropy_vjp(primals, cotangents, outputs):
    logits, targets = primals
    probs, g = outputs[1], cotangents[0]
    onehot = mx.arange(logits.shape[-1]) == targets[:, None]
    return (probs - onehot) * g[:, None], mx.zeros_like(targets)


LOGITS_BUDGET = 512 * 2**20  # bytes of fp32 logits the loss head may hold at once
LOSS_CHUNK = 512  # positions (of the flattened B x T) per recomputed logits chunk beyond that budget


def head_chunk(positions: int, vocab: int) -> int:
    """Positions per loss-head chunk: all of them when their fp32 logits fit LOGITS_BUDGET (no
    recomputation), else LOSS_CHUNK."""
    return positions if positions * vocab * 4 <= LOGITS_BUDGET else LOSS_CHUNK


def loss_fn(model: Model, input_ids, labels, latent_mask: np.ndarray, left_pad=None,
            feedback: bool = True, chunk: Optional[int] = None, rows=None):
    """Mean cross-entropy over shifted labels != -100 → (loss, number of supervised tokens).

    `rows` (from `supervised_rows`) restricts the output head to the positions that carry a label:
    the same loss and gradients for a fraction of the head's work (the question, the thoughts and
    the padding are most of a batch).

    When the [B, T, V] fp32 logits would pass LOGITS_BUDGET (at a 128k vocabulary they take ~0.5 MB
    per token, three times over with the softmax and its gradient), the output head runs `chunk`
    positions at a time, each chunk under `mx.checkpoint` (its logits recomputed in the backward pass),
    so they never exist at once. `chunk` defaults to `head_chunk`."""
    hidden = continuous_forward(model, input_ids, latent_mask, left_pad, feedback=feedback)
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = mx.array(labels)[:, 1:].reshape(-1)
    if rows is not None:  # the head (matmul and softmax over the vocabulary) only where it counts
        hidden, targets = hidden[rows], targets[rows]
    valid = targets != IGNORE
    targets = mx.where(valid, targets, 0)
    ntoks = valid.sum()
    n = hidden.shape[0]
    chunk = chunk or head_chunk(n, model.args.vocab_size)

    def ce(h, t, v):
        return (cross_entropy(model.logits(h).astype(mx.float32), t)[0] * v).sum()

    if chunk >= n:
        return ce(hidden, targets, valid) / mx.maximum(ntoks, 1), ntoks
    head = model.model.embed_tokens if model.args.tie_word_embeddings else model.lm_head

    def chunk_ce(lo):  # the head's parameters are inputs, so their gradients flow; labels constant
        t, v = targets[lo:lo + chunk], valid[lo:lo + chunk]

        def checkpointed(params, h):
            head.update(params)
            return ce(h, t, v)
        return mx.checkpoint(checkpointed)(head.trainable_parameters(), hidden[lo:lo + chunk])

    total = sum(chunk_ce(lo) for lo in range(0, n, chunk))
    return total / mx.maximum(ntoks, 1), ntoks


ROWS_BUCKET = 64  # supervised_rows pads its count to a multiple of this (fewer compiled shapes)


def supervised_rows(labels: np.ndarray, bucket: int = ROWS_BUCKET) -> mx.array:
    """Indices into loss_fn's flattened B x (T-1) shifted positions of those with a label, padded to
    a multiple of `bucket` with an unlabelled position (it adds nothing to the loss) when there is one."""
    shifted = np.asarray(labels)[:, 1:].reshape(-1)
    rows, free = np.flatnonzero(shifted != IGNORE), np.flatnonzero(shifted == IGNORE)
    if free.size:
        rows = np.concatenate([rows, np.full(-len(rows) % bucket, free[0])])
    return mx.array(rows.astype(np.int32))


def collated_loss(model: Model, batch: dict, feedback: bool = True):
    """`loss_fn` of a `data.make_batch` dict (numpy arrays) → (loss, number of supervised tokens)."""
    lp = batch["left_pad"]
    return loss_fn(model, mx.array(batch["input_ids"]), mx.array(batch["labels"]), batch["latent_mask"],
                   mx.array(lp) if lp.any() else None, feedback, rows=supervised_rows(batch["labels"]))


@dataclass
class Generation:
    tokens: list                      # per row: generated ids (EOS excluded)
    finished: list                    # per row: stopped at EOS (else hit max_tokens)
    thoughts: Optional[mx.array] = None   # [B, n_latent_columns, D] fed-back states, if asked
    thought_mask: Optional[np.ndarray] = None  # [B, n_latent_columns]: which of those are real thoughts
    timings: dict = field(default_factory=dict)  # seconds: prefill+latent phase, text phase


class DecodeBatch:
    """Rows decoding together over one KV cache. Rows join between steps (`add` runs their prompts
    through the latent phase in a cache of their own, then splices it in, left-padding whichever side
    is shorter) and leave between steps (`keep`), so a server need not wait for a batch's longest row.

    `logits` [B, V] hold each row's next-token scores; `step(sampler)` samples them, feeds the tokens
    back and returns them (the next logits are computed asynchronously)."""

    def __init__(self, model: Model, feedback: bool = True):
        self.model, self.feedback = model, feedback
        self.cache: Optional[KVCache] = None
        self.logits: Optional[mx.array] = None

    @property
    def size(self) -> int:
        return 0 if self.logits is None else self.logits.shape[0]

    def add(self, prompts: list, latent_id: int, pad_id: int, max_tokens: int,
            return_thoughts: bool = False, given: Optional[list] = None) -> tuple:
        """Prefill `prompts` (question + markers + latents) as new rows at the end of the batch
        → (thoughts [b, n, D] or None, thought_mask [b, n] or None) of the new rows. `given`: the
        thoughts to feed instead of the computed ones (`continuous_forward`)."""
        batch = collate_prompts(prompts, pad_id)  # left-padded: every prompt ends in the last column
        ids, left_pad = batch["input_ids"], batch["left_pad"]
        latent_mask = ids == latent_id
        # No padded row (bs=1, equal lengths): no mask and scalar positions, i.e. mlx-lm's decode path.
        cache = self.model.make_cache(mx.array(left_pad) if left_pad.any() else None,
                                      step=ids.shape[1] + max_tokens)
        thoughts = [] if return_thoughts else None
        hidden = continuous_forward(self.model, mx.array(ids), latent_mask, cache=cache,
                                    feedback=self.feedback, thoughts=thoughts, given=given)
        logits = self.model.logits(hidden[:, -1])
        if self.size:
            cache, logits = _join(self.cache, cache), mx.concatenate([self.logits, logits])
        self.cache, self.logits = cache, logits
        thought_mask = latent_mask[:, latent_mask.any(axis=0)] if return_thoughts else None
        return (mx.stack(thoughts, axis=1) if thoughts else None), thought_mask

    def keep(self, rows: list):
        """Keep only `rows` (indices, in order) and drop the leading columns that are padding in
        every row left, so a long-lived batch does not grow without bound."""
        if not rows:
            self.cache = self.logits = None
            return
        c, idx = self.cache, mx.array(rows)
        trim = 0 if c.left_pad is None else int(c.left_pad[idx].min().item())
        for layer in range(len(c.keys)):
            c.keys[layer] = c.keys[layer][idx, :, trim:c.offset]
            c.values[layer] = c.values[layer][idx, :, trim:c.offset]
        c.offset -= trim
        c.left_pad = None if c.left_pad is None else c.left_pad[idx] - trim
        self.logits = self.logits[idx]

    def logprobs(self) -> mx.array:
        return self.logits - mx.logsumexp(self.logits, axis=-1, keepdims=True)

    def step(self, sampler: Callable) -> mx.array:
        """Sample one token per row and feed it back."""
        token = sampler(self.logprobs())
        self.feed(token)
        return token

    def feed(self, token: mx.array, *also):
        self.logits = self.model.logits(self.model.hidden_states(token[:, None], self.cache)[:, -1])
        mx.async_eval(self.logits, token, *also)  # the next step computes while the caller reads this one


def _join(a: KVCache, b: KVCache) -> KVCache:
    """One cache holding a's rows then b's: the one with fewer columns gets left padding (masked)."""
    width = max(a.offset, b.offset)

    def left_pad(c):
        rows = c.keys[0].shape[0]
        pad = mx.zeros((rows,), mx.int32) if c.left_pad is None else c.left_pad.astype(mx.int32)
        return pad + (width - c.offset)

    def padded(x, c):
        x = x[:, :, :c.offset]
        return mx.pad(x, [(0, 0), (0, 0), (width - c.offset, 0), (0, 0)]) if c.offset < width else x

    out = KVCache(len(a.keys), mx.concatenate([left_pad(a), left_pad(b)]), step=a.step)
    out.keys = [mx.concatenate([padded(x, a), padded(y, b)]) for x, y in zip(a.keys, b.keys)]
    out.values = [mx.concatenate([padded(x, a), padded(y, b)]) for x, y in zip(a.values, b.values)]
    out.offset = width
    return out


def generate(model: Model, prompts: list, latent_id: int, eos_ids, max_tokens: int = 64,
             pad_id: int = 0, sampler: Optional[Callable] = None, feedback: bool = True,
             return_thoughts: bool = False, on_token: Optional[Callable] = None,
             on_thoughts: Optional[Callable] = None, given_thoughts: Optional[list] = None) -> Generation:
    """Batched latent-then-text generation with the KV cache (one `DecodeBatch`, all rows at once).

    Prompts are token-id lists (question + markers + latents, or plain questions for CoT); each row
    stops at its first EOS. `sampler(logprobs) -> ids` defaults to greedy; `on_token(step, ids)` is
    called with the [B] ids of each decoded step (for streaming); `on_thoughts(thoughts, mask)` once
    between the latent and the text phase (needs return_thoughts; not timed). `given_thoughts` (one
    [B, D] per latent column) replaces the fed-back states (`continuous_forward`)."""
    sampler = sampler or (lambda logprobs: mx.argmax(logprobs, axis=-1))
    B = len(prompts)
    batch = DecodeBatch(model, feedback)
    start = time.perf_counter()
    thoughts, thought_mask = batch.add(prompts, latent_id, pad_id, max_tokens, return_thoughts,
                                       given_thoughts)
    mx.eval(batch.logits)
    latent_time = time.perf_counter() - start
    if on_thoughts is not None:
        on_thoughts(thoughts, thought_mask)

    eos = mx.array(sorted(set(eos_ids)))
    out, done = [], mx.zeros((B,), dtype=mx.bool_)
    start = time.perf_counter()
    for step in range(max_tokens):
        token = sampler(batch.logprobs())
        token = mx.where(done, eos[0], token)         # finished rows keep emitting EOS
        done = done | (token[:, None] == eos[None]).any(axis=1)
        batch.feed(token, done)
        out.append(token)
        if on_token is not None:
            on_token(step, np.array(token))
        if done.all().item():
            break
    text_time = time.perf_counter() - start

    steps = np.array(mx.stack(out, axis=1)) if out else np.zeros((B, 0), np.int32)
    eos_set = set(int(e) for e in eos_ids)
    tokens, finished = [], []
    for row in steps.tolist():
        cut = next((i for i, t in enumerate(row) if t in eos_set), None)
        tokens.append(row if cut is None else row[:cut])
        finished.append(cut is not None)
    return Generation(
        tokens=tokens, finished=finished,
        thoughts=thoughts, thought_mask=thought_mask,
        timings={"latent": latent_time, "text": text_time,
                 "generated_tokens": int(sum(len(t) for t in tokens))},
    )
