"""`mlx-coconut serve`: an OpenAI-compatible HTTP endpoint for a COCONUT model (stdlib http.server).

    POST /v1/completions       {"prompt": "question" | ["q1", "q2"], "max_tokens", "temperature",
                                "top_p", "stop", "stream", "thought_top_k"}
    POST /v1/chat/completions  {"messages": [...], same options}
    GET  /v1/models, GET /health

Here: limits, checks (Host, Origin, API key) and replies; request bodies are parsed in `request.py`,
the model runs in `engine.Engine` (continuous batching, cancellation). Every prompt goes through the one
formatter (`api.prompt_ids`; typed special tokens are text) and the one latent loop. Responses add a
`coconut` object (mode, stage, c, number of continuous thoughts) and, with `"thought_top_k": k`, each
thought's top-k tokens through the output head. Limits and the threat model: docs/serve.md.
"""

import hmac
import ipaddress
import json
import queue
import re
import select
import socket
import threading
import time
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import quote

from .engine import Engine
from .errors import UserError
from .request import MAX_BODY, ApiError, chat_messages, completion_prompts, parse_body, parse_options

BACKLOG = 128          # listen queue: a burst of clients waits for accept() instead of being reset
MAX_CONNECTIONS = 64   # handler threads; past it a connection gets 503 + Retry-After
TIMEOUT = 30.0         # seconds a socket read/write may stall (headers, body, idle keep-alive)
POLL = 0.05            # seconds between checks that a waiting client is still connected (a select)
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "[::1]"}


class ClientGone(ConnectionError):
    pass


# ---------------------------------------------------------------- HTTP


def _host_name(header: str) -> str:
    """'Example.com:8080' → 'example.com', '[::1]:80' → '[::1]'."""
    h = header.strip().lower().rstrip(".")
    return h[:h.find("]") + 1] if h.startswith("[") else h.rsplit(":", 1)[0]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "mlx-coconut"
    timeout = TIMEOUT                   # applied to the socket by StreamRequestHandler.setup
    engine: Engine = None
    model_id: str = ""
    quiet: bool = False
    hosts: Optional[set] = None         # allowed Host names; None: any (bound to a wildcard address)
    origins: frozenset = frozenset()    # allowed Origin values ("*": any)
    api_key: Optional[str] = None

    def log_message(self, fmt, *args):
        if not self.quiet:
            super().log_message(fmt, *args)

    # -- replies
    def send_response(self, code, message=None):
        self.replied = True
        super().send_response(code, message)

    def end_headers(self):
        self.send_header("X-Content-Type-Options", "nosniff")
        origin = self.headers.get("Origin") if getattr(self, "headers", None) else None
        if origin and self._origin_allowed(origin):
            self.send_header("Access-Control-Allow-Origin", origin)
            self.send_header("Vary", "Origin")
        super().end_headers()

    def _send_json(self, status: int, obj: dict, *headers):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, e: ApiError):
        self.close_connection = True  # the body may be unread (411, 413): start afresh
        kind = "invalid_request_error" if e.status < 500 else "server_error"
        auth = [("WWW-Authenticate", "Bearer")] if e.status == 401 else []
        self._send_json(e.status, {"error": {"message": str(e), "type": kind, "param": e.param,
                                             "code": None}}, *auth)

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (bad request line, header too long, unknown method) as JSON."""
        self._error(ApiError(message or HTTPStatus(code).phrase, code))

    # -- checks, and one wrapper so every request gets a reply
    def _origin_allowed(self, origin: str) -> bool:
        return "*" in self.origins or origin in self.origins

    def _check(self, route: str):
        host = self.headers.get("Host")
        if self.hosts is not None and host is not None and _host_name(host) not in self.hosts:
            raise ApiError("Host not allowed (a DNS-rebinding page?); use the bound address", 403)
        origin = self.headers.get("Origin")
        if origin is not None and not self._origin_allowed(origin):
            raise ApiError("Origin not allowed; start the server with --allow-origin", 403)
        if self.api_key and route != "/health" and self.command != "OPTIONS":
            given = self.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                raise ApiError("missing or wrong API key (Authorization: Bearer KEY)", 401)

    def _handle(self, route_fn):
        self.replied = False
        route = self.path.split("?", 1)[0].rstrip("/")
        try:
            self._check(route)
            route_fn(route)
        except ApiError as e:
            if not self.replied:
                self._error(e)
            self.close_connection = True
        except (ConnectionError, TimeoutError):
            self.close_connection = True  # the client went away or stalled
        except Exception as e:  # a bug must still answer, and not with a traceback
            self.log_error("internal error: %s: %s", type(e).__name__, e)
            if not self.replied:
                self._error(ApiError(f"internal error: {type(e).__name__}", 500))
            self.close_connection = True

    def _no_route(self):
        raise ApiError(f"no route {self.command} {quote(self.path[:200], safe='/')}", 404)

    def do_GET(self):
        self._handle(self._get)

    def do_POST(self):
        self._handle(self._post)

    def do_OPTIONS(self):  # a CORS preflight; _check has refused origins not allowed
        self._handle(self._preflight)

    def _preflight(self, route: str):
        self.send_response(204)
        self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
        self.send_header("Access-Control-Allow-Headers", "Authorization, Content-Type")
        self.send_header("Access-Control-Max-Age", "600")
        self.end_headers()

    def _get(self, route: str):
        if route == "/health":
            return self._send_json(200, {"status": "ok"})
        if route == "/v1/models":
            return self._send_json(200, {"object": "list", "data": [
                {"id": self.model_id, "object": "model", "created": 0, "owned_by": "mlx-coconut"}]})
        self._no_route()

    def _post(self, route: str):
        if route not in ("/v1/completions", "/v1/chat/completions"):
            self._no_route()
        body = parse_body(self._read_body())
        chat = route == "/v1/chat/completions"
        opts = parse_options(body)
        try:
            questions = [self.engine.chat_question(chat_messages(body))] if chat else completion_prompts(body)
        except UserError as e:
            raise ApiError(str(e), param="messages") from None
        try:
            jobs = self.engine.make_jobs(questions, opts)
        except UserError as e:
            raise ApiError(str(e), param="prompt") from None
        self.engine.submit(jobs)
        meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                "model": self.model_id}
        try:
            (self._stream if opts["stream"] else self._complete)(jobs, chat, meta)
        finally:  # a client that left (or a write that failed) frees its rows at the next step
            self.engine.cancel([j for j in jobs if not j.done])

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding"):
            raise ApiError("Transfer-Encoding is not supported: send a Content-Length", 411)
        length = self.headers.get("Content-Length")
        if length is None:
            raise ApiError("a Content-Length header is required", 411)
        if not re.fullmatch(r"[0-9]{1,12}", length.strip()):  # int() would take "-1", "+5", "1_0"
            raise ApiError(f"invalid Content-Length {length[:40]!r}")
        if int(length) > MAX_BODY:
            raise ApiError(f"request body over {MAX_BODY} bytes", 413)
        raw = self.rfile.read(int(length))  # the socket timeout bounds a stalled body
        if len(raw) < int(length):
            raise ClientGone("body shorter than its Content-Length")
        return raw

    def _client_gone(self) -> bool:
        """The peer closed its end (a readable socket with nothing to read)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _coconut(self, jobs: list) -> dict:
        s = self.engine.loaded.settings
        return {"mode": s.mode, "stage": s.stage, "c_thought": s.c_thought,
                "num_thoughts": jobs[0].prompt_ids.count(self.engine.ids.latent)}

    def _events(self, jobs: list):
        """Yield worker events until every choice is done; a worker error ends as ApiError(500), a
        client that disconnects while waiting as ClientGone."""
        pending = len(jobs)
        while pending:
            try:
                event = jobs[0].events.get(timeout=POLL)
            except queue.Empty:
                if self._client_gone():
                    raise ClientGone("the client disconnected") from None
                continue
            if event[0] == "error":
                raise ApiError(f"generation failed: {event[2]}", 500)
            pending -= event[0] == "done"
            yield event

    def _complete(self, jobs: list, chat: bool, meta: dict):
        choices = [{"index": j.index, "finish_reason": None} for j in jobs]
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


class Server(ThreadingHTTPServer):
    """ThreadingHTTPServer with a deep listen backlog and at most `max_connections` handler threads;
    a connection past that gets 503 + Retry-After at once (from the accepting thread)."""
    request_queue_size = BACKLOG
    daemon_threads = True

    def __init__(self, address, handler, max_connections: int = MAX_CONNECTIONS):
        self.slots = threading.BoundedSemaphore(max_connections)
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        if self.slots.acquire(blocking=False):
            return super().process_request(request, client_address)
        body = json.dumps({"error": {"message": "server busy: too many connections, retry later",
                                     "type": "server_error", "param": None, "code": None}}).encode()
        try:
            request.settimeout(0.2)
            request.recv(1 << 16)  # read the request first: closing over unread data resets the reply
            request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nConnection: close\r\n"
                            b"Content-Type: application/json\r\nX-Content-Type-Options: nosniff\r\n"
                            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        except OSError:
            pass
        self.shutdown_request(request)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def _is_wildcard(host: str) -> bool:
    return host in ("", "0.0.0.0", "::")


def exposure_warning(host: str, api_key: Optional[str]) -> Optional[str]:
    """A warning when binding beyond loopback without --api-key, else None."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if loopback or api_key:
        return None
    return (f"warning: serving on {host or '*'} without --api-key: anyone who can reach this address "
            f"can use the model")


def make_server(loaded, host: str = "127.0.0.1", port: int = 8080, max_batch: int = 8,
                max_tokens: int = 256, chat_template: bool = False, model_id: Optional[str] = None,
                quiet: bool = False, api_key: Optional[str] = None, allow_origins=(),
                max_connections: int = MAX_CONNECTIONS, timeout: float = TIMEOUT) -> Server:
    """A ready server (not yet serving): `server.serve_forever()`, then `close_server(server)`.
    port=0 picks a free port (`server.server_address[1]`)."""
    bound = f"[{host}]" if ":" in host else host
    engine = Engine(loaded, max_batch, max_tokens, chat_template)
    handler = type("CoconutHandler", (Handler,), {
        "engine": engine, "model_id": model_id or loaded.path.name, "quiet": quiet,
        "hosts": None if _is_wildcard(host) else LOOPBACK_NAMES | {bound.lower()},
        "origins": frozenset(allow_origins), "api_key": api_key or None, "timeout": timeout})
    try:
        server = Server((host, port), handler, max_connections)
    except OSError as e:
        engine.stop()
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror})") from None
    server.engine = engine
    return server


def close_server(server: Server):
    server.shutdown()
    server.server_close()
    server.engine.stop()
