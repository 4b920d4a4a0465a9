"""An OpenAI-compatible completions server over an exported decoder (stdlib HTTP, numpy, onnxruntime).

``POST /v1/completions`` ({model, prompt, max_tokens, temperature, top_p, seed, stream}) and
``GET /health``. Each request generates with its own KV state over the one shared InferenceSession, so
concurrent requests cannot see each other's cache; at most ``max_concurrency`` generate at once (the rest
wait their turn). Limits on the body size, the prompt length and ``max_tokens`` answer 4xx with a JSON
error in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.
"""
from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ..errors import PyshrinkError
from .generate import OnnxLM, Sampling


# An error answered before the request's body was read (unknown route, no or oversized Content-Length): closing the
# socket with that body unread makes the kernel reset the connection, and a client still sending it then sees the
# reset instead of the answer. So the server half-closes and drains what follows, within these bounds.
LINGER_BYTES = 64 << 20
LINGER_SECONDS = 5.0


@dataclass
class Limits:
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int | None = None  # None: the model's maximum length - 1
    max_tokens: int = 512
    max_concurrency: int = 4


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def _number(body, key, default, lo, hi, integer=False):
    v = body.get(key, default)
    if v is None:
        v = default
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or not (lo <= v <= hi):
        kind = "an integer" if integer else "a number"
        raise ApiError(400, f"'{key}' must be {kind} in [{lo}, {hi}], got {v!r}", key, "invalid_value")
    return v


MAX_STOPS = 4  # OpenAI's limit on stop sequences

# OpenAI fields this server does not implement, with the value that asks for nothing (absent and null do too):
# another value is refused, as a client that asked for 3 choices or log-probabilities must not get one plain choice
UNSUPPORTED = {"n": 1, "best_of": 1, "echo": False, "logprobs": None, "suffix": "", "presence_penalty": 0,
               "frequency_penalty": 0, "logit_bias": {}}


def _unsupported(body: dict) -> None:
    for key, neutral in UNSUPPORTED.items():
        v = body.get(key)
        if isinstance(neutral, bool) or isinstance(v, bool):  # True == 1: "n": true is not n = 1
            nothing = v is None or v is neutral
        else:
            nothing = v is None or v == neutral
        if not nothing:
            raise ApiError(400, f"'{key}' is not supported by this server (leave it out, or {neutral!r}), got {v!r}",
                           key, "unsupported_value")


class StopText:
    """Stop sequences: where the first one starts in a text, and how much of a text can be sent on while a stop
    sequence may still be completing at its end."""

    def __init__(self, stops):
        self.stops = tuple(stops)

    def find(self, text: str) -> int | None:
        at = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return min(at) if at else None

    def safe_length(self, text: str) -> int:
        """``len(text)`` less its longest ending that begins a stop sequence (held back until it resolves)."""
        held = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return len(text) - held

    def cut(self, text: str) -> str:
        at = self.find(text)
        return text if at is None else text[:at]


def _stops(body: dict) -> StopText:
    stop = body.get("stop")
    if stop is None:
        return StopText(())
    stops = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or not 1 <= len(stops) <= MAX_STOPS
            or not all(isinstance(s, str) and s for s in stops)):
        raise ApiError(400, f"'stop' must be a non-empty string or a list of 1 to {MAX_STOPS} of them, got {stop!r}",
                       "stop", "invalid_value")
    return StopText(stops)


@dataclass
class Request:
    """A checked completion request."""
    ids: list
    max_tokens: int
    sampling: Sampling
    stream: bool
    stops: StopText


class CompletionService:
    """Request validation and generation, independent of HTTP (so it is testable without sockets)."""

    def __init__(self, lm: OnnxLM, limits: Limits | None = None, model_name: str | None = None):
        self.lm = lm
        self.limits = limits or Limits()
        self.model_name = model_name or lm.name
        self._slots = threading.BoundedSemaphore(self.limits.max_concurrency)

    def parse(self, body: dict):
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "'prompt' must be a non-empty string (one prompt per request)", "prompt", "invalid_value")
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise ApiError(400, f"'model' must be a string, got {model!r}", "model", "invalid_value")
        if model is not None and model not in (self.model_name, ""):
            raise ApiError(404, f"model {model!r} is not served here; this server serves {self.model_name!r}",
                           "model", "model_not_found")
        max_tokens = _number(body, "max_tokens", 16, 1, self.limits.max_tokens, integer=True)
        temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
        top_p = _number(body, "top_p", 1.0, 1e-6, 1.0)
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ApiError(400, f"'seed' must be a non-negative integer, got {seed!r}", "seed", "invalid_value")
        ids = self.lm.encode(prompt)
        limit = self.limits.max_prompt_tokens or (self.lm.max_length - 1)
        limit = min(limit, self.lm.max_length - 1)
        if not ids:
            raise ApiError(400, "the prompt encodes to no tokens", "prompt", "invalid_value")
        vocab = self.lm.meta.get("vocab_size")
        if vocab and max(ids) >= vocab:  # a token added to the tokenizer after the model (e.g. a pad token)
            raise ApiError(400, f"the prompt has token id {max(ids)}, which the model does not know (it takes ids "
                           f"0..{vocab - 1}): a token added to the tokenizer after the model?", "prompt",
                           "invalid_value")
        if len(ids) > limit:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; the limit is {limit}", "prompt",
                           "context_length_exceeded")
        stream = body.get("stream", False)
        if stream is not None and not isinstance(stream, bool):  # bool("false") is True
            raise ApiError(400, f"'stream' must be true or false, got {stream!r}", "stream", "invalid_value")
        _unsupported(body)
        return Request(ids, max_tokens, Sampling(float(temperature), float(top_p), seed), bool(stream), _stops(body))

    def complete(self, req: "Request", on_text=None):
        """``(new ids, finish_reason)``; ``on_text(completion text so far)`` after each token; generation ends where
        the text reaches a stop sequence ("stop"). The text is decoded once per token for both."""
        toks, text = [], [""]

        def on_token(tok):
            toks.append(tok)
            text[0] = self.lm.decode(toks)
            if on_text is not None:
                on_text(text[0])

        watch = on_text is not None or req.stops.stops
        stop_when = (lambda _: req.stops.find(text[0]) is not None) if req.stops.stops else None
        with self._slots:
            return self.lm.generate_ids(req.ids, req.max_tokens, req.sampling, on_token=on_token if watch else None,
                                        stop_when=stop_when)

    def response(self, req: "Request", new, reason) -> dict:
        ids = req.ids
        return {
            "id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
            "model": self.model_name,
            "choices": [{"text": req.stops.cut(self.lm.decode(new)), "index": 0, "logprobs": None,
                         "finish_reason": reason}],
            "usage": {"prompt_tokens": len(ids), "completion_tokens": len(new), "total_tokens": len(ids) + len(new)},
        }


def make_handler(service: CompletionService):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "pyshrink"

        def log_message(self, fmt, *args):  # quiet by default; the CLI prints one line per request instead
            if getattr(self.server, "verbose", False):
                super().log_message(fmt, *args)

        def _json(self, status: int, obj: dict):
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if self.close_connection:  # tell the client not to send its next request on this connection
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path.rstrip("/") == "/health":
                return self._json(200, {"status": "ok", "model": service.model_name})
            if self.path.rstrip("/") == "/v1/models":
                return self._json(200, {"object": "list", "data": [{"id": service.model_name, "object": "model"}]})
            self._json(404, ApiError(404, f"no route GET {self.path}").body())

        def _refuse_body(self, error: ApiError, length: int | None = None) -> ApiError:
            """For an error found before the body (of ``length`` bytes, None: unknown) is read: it must not be taken
            for the next request."""
            self.close_connection = True
            self.body_unread, self.body_length = True, length
            return error

        def _too_large(self, n: int) -> ApiError:
            return ApiError(413, f"request body of {n} bytes exceeds the limit of {service.limits.max_body_bytes}")

        def handle_expect_100(self):
            # A client that asks before sending its body (curl does above 1 MiB) hears the 413 instead of
            # "100 Continue", and never sends the body.
            length = self.headers.get("Content-Length", "")
            if self.command == "POST" and length.isdigit() and int(length) > service.limits.max_body_bytes:
                error = self._refuse_body(self._too_large(int(length)), int(length))
                self._json(error.status, error.body())
                self._linger()  # a client that sends the body anyway must still read the answer
                return False
            return super().handle_expect_100()

        def _linger(self):
            """Half-close after the answer and drain the unread body (bounded), so the client reads the answer."""
            try:
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_WR)
                known = getattr(self, "body_length", None)  # the body's size where the request said it
                left = LINGER_BYTES if known is None else min(LINGER_BYTES, known)
                deadline = time.monotonic() + LINGER_SECONDS
                while left > 0 and (wait := deadline - time.monotonic()) > 0:
                    self.connection.settimeout(wait)
                    chunk = self.connection.recv(min(left, 1 << 16))
                    if not chunk:
                        break
                    left -= len(chunk)
            except OSError:  # timed out or reset: the answer was sent; nothing more to do
                pass

        def do_POST(self):
            self.streaming = self.body_unread = False
            length = self.headers.get("Content-Length")
            try:
                if self.path.rstrip("/") != "/v1/completions":
                    known = int(length) if length is not None and length.isdigit() else None
                    raise self._refuse_body(ApiError(404, f"no route POST {self.path}"), known)
                if length is None:  # a chunked body would follow
                    raise self._refuse_body(ApiError(411, "a Content-Length header is required"))
                try:
                    n = int(length)
                except ValueError:
                    raise self._refuse_body(ApiError(400, f"bad Content-Length {length!r}")) from None
                if n < 0:
                    raise self._refuse_body(ApiError(400, f"bad Content-Length {length!r}"))
                if n > service.limits.max_body_bytes:
                    raise self._refuse_body(self._too_large(n), n)
                try:
                    body = json.loads(self.rfile.read(n) or b"null")
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise ApiError(400, f"the body is not valid JSON: {exc}") from None
                except RecursionError:
                    raise ApiError(400, "the body is not valid JSON: nested too deeply") from None
                req = service.parse(body)
                if req.stream:
                    return self._stream(req)
                new, reason = service.complete(req)
                self._json(200, service.response(req, new, reason))
            except (BrokenPipeError, ConnectionResetError):  # the client went away: nobody to answer
                self.close_connection = True
            except Exception as exc:  # noqa: BLE001  (a server answers; it does not die)
                error = exc if isinstance(exc, ApiError) else ApiError(500, f"{type(exc).__name__}: {exc}")
                try:
                    if self.streaming:  # the 200 and its event stream are under way: end the stream with the error
                        self._event(error.body())
                    else:
                        self._json(error.status, error.body())
                        if self.body_unread:
                            self._linger()
                except (BrokenPipeError, ConnectionResetError):  # the client has gone: nobody to tell
                    self.close_connection = True

        def _event(self, obj: dict):
            self.wfile.write(f"data: {json.dumps(obj)}\n\n".encode())
            self.wfile.flush()

        def _stream(self, req):
            """Server-sent events, one per token (text deltas by decoding the whole completion so far; text that may
            be the start of a stop sequence is held back until it is known not to be one)."""
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            self.streaming = True
            cid, created, sent, last = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time()), [""], [""]

            def event(text, reason):
                self._event({"id": cid, "object": "text_completion", "created": created, "model": service.model_name,
                             "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": reason}]})

            def on_text(text):
                last[0] = text
                if text.endswith("\ufffd") or req.stops.find(text) is not None:  # a partial character; the end
                    return
                text = text[:req.stops.safe_length(text)]
                if len(text) > len(sent[0]):
                    event(text[len(sent[0]):], None)
                    sent[0] = text

            _, reason = service.complete(req, on_text=on_text)
            event(req.stops.cut(last[0])[len(sent[0]):], reason)
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()

    return Handler


def make_server(folder_or_lm, host: str = "127.0.0.1", port: int = 8000, *, limits: Limits | None = None,
                threads: int | None = None, verbose: bool = False) -> ThreadingHTTPServer:
    """A ready (not yet serving) server; ``port=0`` picks a free port (``server.server_address[1]``)."""
    lm = folder_or_lm if isinstance(folder_or_lm, OnnxLM) else OnnxLM(folder_or_lm, threads=threads)
    try:
        server = ThreadingHTTPServer((host, port), make_handler(CompletionService(lm, limits)))
    except OSError as exc:  # port taken, no permission, unknown host: the user's to fix, so one line, not a traceback
        raise PyshrinkError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    server.daemon_threads = True
    server.verbose = verbose
    return server


def serve(folder, host: str = "127.0.0.1", port: int = 8000, **kw):
    server = make_server(folder, host, port, **kw)
    try:
        server.serve_forever()
    finally:
        server.server_close()
