"""The batching engine behind `serve`: one worker thread owns the model and decodes every running
prompt together, one step at a time (continuous batching over `coconut.DecodeBatch`).

Between two steps the worker admits waiting prompts (their latent phase runs through the one latent
loop, `coconut.continuous_forward`, then their rows join the batch) and drops rows that are finished
or whose client went away (`Engine.cancel`). So a short request does not wait for a long one, and a
dropped stream stops costing compute at the next step. HTTP handler threads only parse, tokenize
(`api.prompt_ids`, the one formatter) and write; they talk to the worker through `Job.events`.
"""

import queue
import threading
from collections import deque
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from . import api, coconut
from .data import Templated
from .errors import UserError


@dataclass(eq=False)  # compared by identity
class Job:
    """One prompt (one choice of one HTTP request) on its way through the worker."""
    index: int
    prompt_ids: list
    max_tokens: int
    temperature: float
    top_p: float
    stop: list
    thought_top_k: int
    events: queue.Queue                 # shared by the choices of one HTTP request
    tokens: list = field(default_factory=list)
    sent: int = 0                       # characters of the text already sent
    done: bool = False
    cancelled: bool = False             # set by the handler when its client is gone


def batch_sampler(jobs: list):
    """One sampler for a batch whose rows may ask for different temperature / top_p: mlx-lm's
    sampler per distinct setting, rows picked with a mask. None (greedy) when every row is greedy."""
    from mlx_lm.sample_utils import make_sampler

    groups = {}
    for b, j in enumerate(jobs):
        groups.setdefault((j.temperature, j.top_p) if j.temperature > 0 else (0.0, 1.0), []).append(b)
    samplers = [(make_sampler(t, p), rows) for (t, p), rows in groups.items()]
    if len(samplers) == 1:
        return None if (0.0, 1.0) in groups else samplers[0][0]

    def sample(logprobs):
        out = None
        for s, rows in samplers:
            token = s(logprobs)
            mask = mx.array(np.isin(np.arange(len(jobs)), rows))
            out = token if out is None else mx.where(mask, token, out)
        return out
    return sample


def greedy(logprobs):
    return mx.argmax(logprobs, axis=-1)


class Engine:
    """The model, the tokenizer lock and the worker thread that decodes the running jobs."""

    def __init__(self, loaded, max_batch: int = 8, default_max_tokens: int = 256,
                 chat_template: bool = False):
        self.loaded, self.max_batch = loaded, max_batch
        self.default_max_tokens, self.chat_template = default_max_tokens, chat_template
        self.ids = api.special_ids(loaded)
        self.eos = set(api.eos_ids(loaded.tokenizer))
        tok = loaded.tokenizer
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else self.ids.eos
        self.context = loaded.model.args.max_position_embeddings
        self.tok_lock = threading.Lock()  # the Rust tokenizer is shared by handler threads and the worker
        self.pending: deque = deque()   # jobs waiting for a free row
        self.cond = threading.Condition()
        self.stopping = False
        self.idle = threading.Event()   # set while nothing runs or waits (tests, measurements)
        self.idle.set()
        self.batch_sizes: list = []     # prompts per admission, for tests and measurements
        self.steps = 0                  # decode steps run, for tests and measurements
        self.thread = threading.Thread(target=self._loop, name="coconut-worker", daemon=True)
        self.thread.start()

    # -- called from handler threads
    def make_jobs(self, questions: list, opts: dict) -> list:
        events: queue.Queue = queue.Queue()
        jobs = []
        for i, q in enumerate(questions):
            with self.tok_lock:
                ids = api.prompt_ids(self.loaded, q)
            max_tokens = opts["max_tokens"] or min(self.default_max_tokens, max(self.context - len(ids), 1))
            if len(ids) + max_tokens > self.context:
                raise UserError(f"prompt {i}: {len(ids)} prompt tokens + max_tokens {max_tokens} exceed "
                                f"the context length {self.context}")
            jobs.append(Job(i, ids, max_tokens, opts["temperature"], opts["top_p"], opts["stop"],
                            opts["thought_top_k"], events))
        return jobs

    def chat_question(self, messages: list):
        """The question the formatter gets: the last user message (the form the model was trained
        on), or the whole conversation rendered by the tokenizer's chat template (--chat-template)."""
        tok = self.loaded.tokenizer
        if self.chat_template and getattr(tok, "chat_template", None):
            with self.tok_lock:
                return render_chat(tok, messages)
        users = [m["content"] for m in messages if m["role"] == "user"]
        if not users:
            raise UserError("'messages' has no user message")
        return users[-1]

    def submit(self, jobs: list):
        with self.cond:  # all prompts of one request at once, so they are admitted together
            self.idle.clear()
            self.pending.extend(jobs)
            self.cond.notify()

    def cancel(self, jobs: list):
        """The client is gone: the worker drops these rows before its next step."""
        for j in jobs:
            j.cancelled = True
        with self.cond:
            self.cond.notify()

    def stop(self):
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(timeout=60)

    # -- the worker thread
    def _loop(self):
        batch, active = coconut.DecodeBatch(self.loaded.model, self.loaded.settings.mode != "pause"), []
        while True:
            with self.cond:
                if not active and not self.pending:
                    self.idle.set()
                self.cond.wait_for(lambda: active or self.pending or self.stopping)
                if self.stopping:
                    return
                new = self._take(self.max_batch - len(active))
            try:
                if new:
                    self._admit(batch, new)
                    active += new
                if active:
                    active = self._step(batch, active)
            except Exception as e:  # keep serving; the batch's clients get a 500 with the reason
                for j in active + [j for j in new if j not in active]:
                    if not j.done:
                        j.done = True
                        j.events.put(("error", j.index, f"{type(e).__name__}: {e}"))
                batch.keep([])
                active = []

    def _take(self, n: int) -> list:
        taken = []
        while self.pending and len(taken) < n:
            j = self.pending.popleft()
            if not j.cancelled:
                taken.append(j)
        return taken

    def _admit(self, batch, jobs: list):
        """The latent phase of new jobs; their rows join the batch."""
        want = any(j.thought_top_k for j in jobs)
        thoughts, mask = batch.add([j.prompt_ids for j in jobs], self.ids.latent, self.pad,
                                   max(j.max_tokens for j in jobs), return_thoughts=want)
        self.batch_sizes.append(len(jobs))
        for b, j in enumerate(jobs):
            if j.thought_top_k and thoughts is not None:
                rows = thoughts[b][mx.array(np.flatnonzero(mask[b]))]
                j.events.put(("thoughts", j.index, api.describe_thoughts(self.loaded, rows, j.thought_top_k)))

    def _step(self, batch, active: list) -> list:
        """One token for every running row; returns the rows still running."""
        token = batch.step(batch_sampler(active) or greedy)
        self.steps += 1
        for j, t in zip(active, np.array(token).tolist()):
            self._advance(j, t)
        keep = [b for b, j in enumerate(active) if not (j.done or j.cancelled)]
        if len(keep) < len(active):
            batch.keep(keep)
        return [active[b] for b in keep]

    def _decode(self, job) -> str:
        with self.tok_lock:
            return self.loaded.tokenizer.decode(job.tokens)

    def _advance(self, job: Job, token: int):
        """Add one generated token: send the text that is final, stop at EOS / a stop string /
        max_tokens. Text that might still become a stop string or a multi-byte character is held."""
        if job.done or job.cancelled:
            return
        if token in self.eos:
            return self._finish(job, self._decode(job), "stop")
        job.tokens.append(token)
        text = self._decode(job)
        hits = [i for i in (text.find(s, max(0, job.sent - len(s) + 1)) for s in job.stop) if i >= 0]
        if hits:
            return self._finish(job, text[:min(hits)], "stop")
        if len(job.tokens) >= job.max_tokens:
            return self._finish(job, text, "length")
        safe = len(text.rstrip("\ufffd"))
        for s in job.stop:  # hold back a tail that is the start of a stop string
            for n in range(min(len(s) - 1, safe - job.sent), 0, -1):
                if text[safe - n:safe] == s[:n]:
                    safe -= n
                    break
        if safe > job.sent:
            job.events.put(("text", job.index, text[job.sent:safe]))
            job.sent = safe

    def _finish(self, job: Job, text: str, reason: str):
        if len(text) > job.sent:
            job.events.put(("text", job.index, text[job.sent:]))
        job.done = True
        job.events.put(("done", job.index, reason, len(job.tokens), text))


def render_chat(tok, messages: list) -> Templated:
    """The conversation through the tokenizer's chat template, as a `Templated` question: the
    template's text keeps its special tokens, each message's content stays text (a typed
    `<|im_end|>` cannot close a turn). The template is rendered with a placeholder per message,
    which is then found again in its output."""
    marks = [f"\ue000{i}\ue001" for i in range(len(messages))]  # private-use characters
    text = tok.apply_chat_template([{**m, "content": mark} for m, mark in zip(messages, marks)],
                                   add_generation_prompt=True, tokenize=False)
    if tok.bos_token and text.startswith(tok.bos_token) and tok.bos_token_id in tok.encode(""):
        text = text[len(tok.bos_token):]  # the formatter adds the tokenizer's BOS itself
    parts = []
    for m, mark in zip(messages, marks):
        before, found, text = text.partition(mark)
        if not found:
            raise UserError("the chat template drops or rewrites a message; use the server without "
                            "--chat-template")
        parts += [(before, True), (m["content"], False)]
    return Templated(tuple(parts + [(text, True)]))
