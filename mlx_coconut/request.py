"""`serve`: parsing OpenAI-style request bodies: every field type-checked and in range, or ApiError (a 400
with an OpenAI-style JSON error). Bounded: the body size is checked before reading (serve.py), JSON
nesting by the parser's recursion limit, and NaN / Infinity / lone surrogates are refused here."""

import json
import math
from typing import Optional

MAX_BODY = 8 << 20     # bytes of JSON per request
MAX_PROMPTS = 64       # prompts per completion request


class ApiError(Exception):
    def __init__(self, message: str, status: int = 400, param: Optional[str] = None):
        super().__init__(message)
        self.status, self.param = status, param


def _get(body: dict, name: str, types, default=None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        want = " or ".join(t.__name__ for t in types)
        raise ApiError(f"'{name}' must be {want}, got {type(value).__name__}", param=name)
    return value


def _number(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    """A finite number in [lo, hi] (JSON allows 1e400 = inf and huge integers)."""
    try:
        value = float(_get(body, name, (int, float), default))
    except OverflowError:
        value = math.inf
    if not (math.isfinite(value) and lo <= value <= hi):
        raise ApiError(f"'{name}' must be a finite number in [{lo:g}, {hi:g}]", param=name)
    return value


def parse_options(body: dict) -> dict:
    """The sampling options of a completion or chat request, type-checked (→ ApiError 400)."""
    max_tokens = _get(body, "max_completion_tokens", (int,), None)
    max_tokens = _get(body, "max_tokens", (int,), max_tokens)
    if max_tokens is not None and max_tokens < 1:
        raise ApiError("'max_tokens' must be >= 1", param="max_tokens")
    temperature = _number(body, "temperature", 0.0, 0.0, 100.0)
    if 0 < temperature < 1e-3:  # logits / 1e-310 overflow to inf: say 0 for greedy
        raise ApiError("'temperature' must be 0 (greedy) or at least 0.001", param="temperature")
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
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
        texts = [p.get("text") for p in content if p.get("type") == "text"]
        if all(isinstance(t, str) for t in texts):
            return "".join(texts)
    raise ApiError("message 'content' must be a string or a list of text parts with string 'text'",
                   param="messages")


def chat_messages(body: dict) -> list:
    messages = body.get("messages")
    if not (isinstance(messages, list) and messages
            and all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages)):
        raise ApiError("'messages' must be a non-empty list of {role, content} objects", param="messages")
    return [{"role": m["role"], "content": _text(m.get("content", ""))} for m in messages]


def _no_constant(name):
    raise ValueError(f"{name} is not JSON")


def parse_body(raw: bytes) -> dict:
    """A JSON object, or ApiError: malformed, NaN/Infinity, nested too deeply, lone surrogates."""
    try:
        body = json.loads(raw, parse_constant=_no_constant)
        json.dumps(body, ensure_ascii=False).encode()  # a "\ud800" cannot reach the tokenizer
    except RecursionError:
        raise ApiError("malformed JSON body: nested too deeply") from None
    except UnicodeEncodeError:
        raise ApiError("malformed JSON body: a string holds a lone UTF-16 surrogate") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, NaN / Infinity
        raise ApiError(f"malformed JSON body: {e}") from None
    if not isinstance(body, dict):
        raise ApiError("the JSON body must be an object")
    return body
