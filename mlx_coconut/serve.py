"""`mlx-coconut serve`: an OpenAI-compatible HTTP endpoint for a COCONUT model (stdlib http.server).

    POST /v1/completions       {"prompt": "question" | ["q1", "q2"], "max_tokens", "temperature",
                                "top_p", "stop", "stream", "thought_top_k"}
    POST /v1/chat/completions  {"messages": [...], same options}
    GET  /v1/models, GET /health

Every prompt goes through the one formatter (`api.prompt_ids`), so the latent phase runs as trained,
and through the one latent loop (`coconut.generate`). A single worker thread owns the model: it takes
every prompt waiting (up to `max_batch`) and runs them as one left-padded batch; requests arriving
while a batch runs wait for the next one (no joining mid-generation). HTTP handler threads only parse, tokenize and
write responses. Responses add a `coconut` object (mode, stage, c, number of continuous thoughts) and,
with `"thought_top_k": k`, each thought's top-k tokens through the output head.
"""

import json
import queue
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

import mlx.core as mx
import numpy as np

from . import api, coconut
from .errors import UserError

MAX_BODY = 8 << 20  # bytes of JSON per request
MAX_PROMPTS = 64    # prompts per completion request


class ApiError(Exception):
    def __init__(self, message: str, status: int = 400, param: Optional[str] = None):
        super().__init__(message)
        self.status, self.param = status, param


@dataclass
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


# ---------------------------------------------------------------- request parsing


def _get(body: dict, name: str, types, default=None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        want = " or ".join(t.__name__ for t in types)
        raise ApiError(f"'{name}' must be {want}, got {type(value).__name__}", param=name)
    return value


def parse_options(body: dict) -> dict:
    """The sampling options of a completion or chat request, type-checked (→ ApiError 400)."""
    max_tokens = _get(body, "max_completion_tokens", (int,), None)
    max_tokens = _get(body, "max_tokens", (int,), max_tokens)
    if max_tokens is not None and max_tokens < 1:
        raise ApiError("'max_tokens' must be >= 1", param="max_tokens")
    temperature = float(_get(body, "temperature", (int, float), 0.0))
    if temperature < 0:
        raise ApiError("'temperature' must be >= 0", param="temperature")
    top_p = float(_get(body, "top_p", (int, float), 1.0))
    if not 0 < top_p <= 1:
        raise ApiError("'top_p' must be in (0, 1]", param="top_p")
    stop = _get(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError("'stop' must be a non-empty string or a list of up to 4 of them", param="stop")
    if _get(body, "n", (int,), 1) != 1:
        raise ApiError("only n = 1 is supported", param="n")
    k = _get(body, "thought_top_k", (int,), 0)
    if not 0 <= k <= 100:
        raise ApiError("'thought_top_k' must be in [0, 100]", param="thought_top_k")
    return {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "stop": stop,
            "thought_top_k": k, "stream": _get(body, "stream", (bool,), False)}


def completion_prompts(body: dict) -> list:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and 0 < len(prompt) <= MAX_PROMPTS and all(isinstance(p, str) for p in prompt):
        return prompt
    raise ApiError(f"'prompt' must be a string or a list of 1 to {MAX_PROMPTS} strings", param="prompt")


def _text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):  # [{"type": "text", ...}]
        return "".join(p.get("text", "") for p in content if p.get("type") == "text")
    raise ApiError("message 'content' must be a string or a list of text parts", param="messages")


def chat_messages(body: dict) -> list:
    messages = body.get("messages")
    if not (isinstance(messages, list) and messages
            and all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages)):
        raise ApiError("'messages' must be a non-empty list of {role, content} objects", param="messages")
    return [{"role": m["role"], "content": _text(m.get("content", ""))} for m in messages]


# ---------------------------------------------------------------- the worker


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


class Engine:
    """The model, the tokenizer lock and the worker thread that batches queued jobs."""

    def __init__(self, loaded, max_batch: int = 8, default_max_tokens: int = 256,
                 chat_template: bool = False):
        self.loaded, self.max_batch = loaded, max_batch
        self.default_max_tokens, self.chat_template = default_max_tokens, chat_template
        self.ids = api.special_ids(loaded)
        self.eos = set(api.eos_ids(loaded.tokenizer))
        self.context = loaded.model.args.max_position_embeddings
        self.tok_lock = threading.Lock()  # the Rust tokenizer is shared by handler threads and the worker
        self.pending: deque = deque()   # jobs waiting for the worker
        self.cond = threading.Condition()
        self.stopping = False
        self.batch_sizes: list = []     # prompts per batch run, for tests and measurements
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
                raise ApiError(f"prompt {i}: {len(ids)} prompt tokens + max_tokens {max_tokens} exceed "
                               f"the context length {self.context}", param="prompt")
            jobs.append(Job(i, ids, max_tokens, opts["temperature"], opts["top_p"], opts["stop"],
                            opts["thought_top_k"], events))
        return jobs

    def chat_question(self, messages: list) -> str:
        """The question the formatter gets: the last user message (the form the model was trained
        on), or the whole conversation rendered by the tokenizer's chat template (--chat-template)."""
        tok = self.loaded.tokenizer
        if self.chat_template and getattr(tok, "chat_template", None):
            with self.tok_lock:
                text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
                adds_bos = tok.bos_token and tok.encode("x")[:1] == [tok.bos_token_id]
            # the formatter encodes with special tokens: drop a BOS it would add a second time
            return text[len(tok.bos_token):] if adds_bos and text.startswith(tok.bos_token) else text
        users = [m["content"] for m in messages if m["role"] == "user"]
        if not users:
            raise ApiError("'messages' has no user message", param="messages")
        return users[-1]

    def submit(self, jobs: list):
        with self.cond:  # all prompts of one request at once, so they share a batch
            self.pending.extend(jobs)
            self.cond.notify()

    def stop(self):
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(timeout=60)

    # -- the worker thread
    def _loop(self):
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.pending or self.stopping)
                if self.stopping:
                    return
                batch = [self.pending.popleft() for _ in range(min(self.max_batch, len(self.pending)))]
            self.batch_sizes.append(len(batch))
            try:
                self._run(batch)
            except Exception as e:  # keep serving; the batch's clients get a 500 with the reason
                for j in batch:
                    if not j.done:
                        j.done = True
                        j.events.put(("error", j.index, f"{type(e).__name__}: {e}"))

    def _run(self, jobs: list):
        loaded, tok = self.loaded, self.loaded.tokenizer

        def on_thoughts(thoughts, mask):
            for b, j in enumerate(jobs):
                if j.thought_top_k and thoughts is not None:
                    rows = thoughts[b][mx.array(np.flatnonzero(mask[b]))]
                    j.events.put(("thoughts", j.index, api.describe_thoughts(loaded, rows, j.thought_top_k)))

        def on_token(step, ids):
            for j, t in zip(jobs, ids.tolist()):
                self._advance(j, t)

        pad = tok.pad_token_id if tok.pad_token_id is not None else self.ids.eos
        want_thoughts = any(j.thought_top_k for j in jobs)
        coconut.generate(loaded.model, [j.prompt_ids for j in jobs], self.ids.latent, sorted(self.eos),
                         max(j.max_tokens for j in jobs), pad, batch_sampler(jobs),
                         feedback=loaded.settings.mode != "pause", return_thoughts=want_thoughts,
                         on_token=on_token, on_thoughts=on_thoughts if want_thoughts else None)
        for j in jobs:
            if not j.done:
                self._finish(j, self._decode(j), "length")

    def _decode(self, job) -> str:
        with self.tok_lock:
            return self.loaded.tokenizer.decode(job.tokens)

    def _advance(self, job: Job, token: int):
        """Add one generated token: send the text that is final, stop at EOS / a stop string /
        max_tokens. Text that might still become a stop string or a multi-byte character is held."""
        if job.done:
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


# ---------------------------------------------------------------- HTTP


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "mlx-coconut"
    engine: Engine = None
    model_id: str = ""
    quiet: bool = False

    def log_message(self, fmt, *args):
        if not self.quiet:
            super().log_message(fmt, *args)

    def _send_json(self, status: int, obj: dict):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, e: ApiError):
        self.close_connection = True  # the body may be unread (411, 413): start afresh
        kind = "invalid_request_error" if e.status < 500 else "server_error"
        self._send_json(e.status, {"error": {"message": str(e), "type": kind, "param": e.param,
                                             "code": None}})

    def do_GET(self):
        if self.path.rstrip("/") == "/health":
            return self._send_json(200, {"status": "ok"})
        if self.path.rstrip("/") == "/v1/models":
            return self._send_json(200, {"object": "list", "data": [
                {"id": self.model_id, "object": "model", "created": 0, "owned_by": "mlx-coconut"}]})
        self._error(ApiError(f"no route GET {self.path}", 404))

    def do_POST(self):
        route = self.path.rstrip("/")
        try:
            if route not in ("/v1/completions", "/v1/chat/completions"):
                raise ApiError(f"no route POST {self.path}", 404)
            body = self._read_json()
            chat = route == "/v1/chat/completions"
            opts = parse_options(body)
            questions = [self.engine.chat_question(chat_messages(body))] if chat else completion_prompts(body)
            try:
                jobs = self.engine.make_jobs(questions, opts)
            except UserError as e:
                raise ApiError(str(e)) from None
        except ApiError as e:
            return self._error(e)
        self.engine.submit(jobs)
        meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                "model": self.model_id}
        try:
            (self._stream if opts["stream"] else self._complete)(jobs, chat, meta)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away; the worker finishes the batch regardless

    def _read_json(self) -> dict:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise ApiError("a Content-Length header is required", 411) from None
        if length > MAX_BODY:
            raise ApiError(f"request body over {MAX_BODY} bytes", 413)
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(f"malformed JSON body: {e}") from None
        if not isinstance(body, dict):
            raise ApiError("the JSON body must be an object")
        return body

    def _coconut(self, jobs: list) -> dict:
        s = self.engine.loaded.settings
        return {"mode": s.mode, "stage": s.stage, "c_thought": s.c_thought,
                "num_thoughts": jobs[0].prompt_ids.count(self.engine.ids.latent)}

    def _events(self, jobs: list):
        """Yield worker events until every choice is done; a worker error ends as ApiError(500)."""
        pending = len(jobs)
        while pending:
            event = jobs[0].events.get()
            if event[0] == "error":
                raise ApiError(f"generation failed: {event[2]}", 500)
            pending -= event[0] == "done"
            yield event

    def _complete(self, jobs: list, chat: bool, meta: dict):
        choices = [{"index": j.index, "finish_reason": None} for j in jobs]
        try:
            for kind, index, *rest in self._events(jobs):
                if kind == "thoughts":
                    choices[index]["thoughts"] = rest[0]
                elif kind == "done":
                    reason, _, text = rest
                    choices[index]["finish_reason"] = reason
                    if chat:
                        choices[index]["message"] = {"role": "assistant", "content": text}
                    else:
                        choices[index].update(text=text, logprobs=None)
        except ApiError as e:
            return self._error(e)
        prompt = sum(len(j.prompt_ids) for j in jobs)
        completion = sum(len(j.tokens) for j in jobs)
        self._send_json(200, {**meta, "object": "chat.completion" if chat else "text_completion",
                              "choices": choices, "coconut": self._coconut(jobs), "usage": {
                                  "prompt_tokens": prompt, "completion_tokens": completion,
                                  "total_tokens": prompt + completion}})

    def _stream(self, jobs: list, chat: bool, meta: dict):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        obj = "chat.completion.chunk" if chat else "text_completion"

        def send(choice: dict, **extra):
            if chat:
                choice.setdefault("delta", {})
            else:
                choice.setdefault("text", "")
            data = {**meta, "object": obj, "choices": [{"finish_reason": None, **choice}], **extra}
            self.wfile.write(f"data: {json.dumps(data)}\n\n".encode())
            self.wfile.flush()

        for j in jobs:  # first chunk per choice: the role (chat) and the thought count
            send({"index": j.index, **({"delta": {"role": "assistant", "content": ""}} if chat else {})},
                 coconut=self._coconut(jobs))
        try:
            for kind, index, *rest in self._events(jobs):
                if kind == "thoughts":
                    send({"index": index, "thoughts": rest[0]})
                elif kind == "text":
                    send({"index": index, **({"delta": {"content": rest[0]}} if chat else {"text": rest[0]})})
                else:
                    send({"index": index, "finish_reason": rest[0]})
        except ApiError as e:
            self.wfile.write(f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error'}})}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


def make_server(loaded, host: str = "127.0.0.1", port: int = 8080, max_batch: int = 8,
                max_tokens: int = 256, chat_template: bool = False, model_id: Optional[str] = None,
                quiet: bool = False) -> ThreadingHTTPServer:
    """A ready server (not yet serving): `server.serve_forever()`, then `close_server(server)`.
    port=0 picks a free port (`server.server_address[1]`)."""
    engine = Engine(loaded, max_batch, max_tokens, chat_template)
    handler = type("CoconutHandler", (Handler,), {
        "engine": engine, "model_id": model_id or loaded.path.name, "quiet": quiet})
    try:
        server = ThreadingHTTPServer((host, port), handler)
    except OSError as e:
        engine.stop()
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror})") from None
    server.daemon_threads = True
    server.engine = engine
    return server


def close_server(server: ThreadingHTTPServer):
    server.shutdown()
    server.server_close()
    server.engine.stop()
