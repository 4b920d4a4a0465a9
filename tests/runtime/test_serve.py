"""The completions server: concurrent requests keep their own state; limits answer clear 4xx JSON errors.

Loopback only (127.0.0.1, an ephemeral port), a bounded number of requests, each with a timeout.
"""
import http.client
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from onnx_helpers import random_prompt, text
from pyshrink.runtime import Limits, OnnxLM, make_server


@pytest.fixture(scope="module")
def server(tiny_onnx):
    lm = OnnxLM(tiny_onnx("llama"))
    srv = make_server(lm, "127.0.0.1", 0, limits=Limits(max_body_bytes=4096, max_prompt_tokens=40, max_tokens=32,
                                                          max_concurrency=3))
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield lm, srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def _request(port, method, path, body=None, raw: bytes | None = None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    payload = r.read()
    conn.close()
    return r.status, payload


def _post(port, body):
    status, payload = _request(port, "POST", "/v1/completions", body)
    return status, json.loads(payload)


def test_health(server):
    lm, port = server
    status, payload = _request(port, "GET", "/health")
    assert status == 200 and json.loads(payload) == {"status": "ok", "model": lm.name}


def test_concurrent_requests_match_single_request_greedy(server):
    lm, port = server
    prompts = [text(random_prompt(4 + i, seed=10 + i)) for i in range(6)]
    expected = [lm.generate(p, max_new_tokens=10).text for p in prompts]  # one at a time
    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(lambda p: _post(port, {"model": lm.name, "prompt": p, "max_tokens": 10,
                                                       "temperature": 0}), prompts))
    for (status, body), want in zip(results, expected):
        assert status == 200, body
        assert body["object"] == "text_completion"
        assert body["choices"][0]["text"] == want
        assert body["choices"][0]["finish_reason"] in ("stop", "length")
        assert body["usage"]["completion_tokens"] <= 10


def test_seeded_sampling_is_reproducible_over_http(server):
    _, port = server
    req = {"prompt": "w5 w9 w13", "max_tokens": 8, "temperature": 1.0, "top_p": 0.9, "seed": 7}
    assert _post(port, req)[1]["choices"][0]["text"] == _post(port, req)[1]["choices"][0]["text"]


def test_streaming_gives_the_same_text(server):
    lm, port = server
    prompt = text(random_prompt(5, seed=3))
    status, payload = _request(port, "POST", "/v1/completions", {"prompt": prompt, "max_tokens": 8,
                                                                 "temperature": 0, "stream": True})
    assert status == 200
    chunks = _events(payload)
    assert "".join(c["choices"][0]["text"] for c in chunks) == lm.generate(prompt, 8).text
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def _events(payload: bytes) -> list:
    events = [ln[len("data: "):] for ln in payload.decode().split("\n\n") if ln.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


@pytest.mark.parametrize("as_list", [False, True])
def test_a_stop_sequence_ends_the_text_before_it(server, as_list):
    """`stop` was ignored: the whole max_tokens came back with finish_reason "length"."""
    lm, port = server
    prompt = text(random_prompt(5, seed=4))
    full = lm.generate(prompt, 20).text
    words = full.split()
    stop = " " + words[4]  # the text up to the fifth word's first appearance
    want = full[:full.find(stop)]
    req = {"prompt": prompt, "max_tokens": 20, "temperature": 0, "stop": ["w127 w127", stop] if as_list else stop}
    status, body = _post(port, req)
    assert status == 200, body
    assert body["choices"][0]["text"] == want and body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] < 20
    status, payload = _request(port, "POST", "/v1/completions", {**req, "stream": True})
    chunks = _events(payload)
    assert status == 200 and "".join(c["choices"][0]["text"] for c in chunks) == want
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert not any(stop in c["choices"][0]["text"] for c in chunks)  # (the joined text says no more was sent)


def test_the_stop_text_helper_holds_back_what_may_begin_a_stop_sequence():
    from pyshrink.runtime.server import StopText

    stops = StopText(["END", "xy"])
    assert stops.find("abcENDdef") == 3 and stops.find("abc") is None and stops.find("a xy END") == 2
    assert stops.safe_length("abcEN") == 3 and stops.safe_length("abcx") == 3 and stops.safe_length("abc") == 3
    assert stops.cut("abcxyEND") == "abc" and stops.cut("abc") == "abc"


@pytest.mark.parametrize("field, value", [("n", 3), ("n", True), ("best_of", 2), ("echo", True), ("logprobs", 5),
                                          ("logprobs", 0), ("suffix", "x"), ("presence_penalty", 0.5),
                                          ("logit_bias", {"5": 100})])
def test_fields_the_server_does_not_implement_are_refused_when_they_ask_for_something(server, field, value):
    """They were ignored: n=3 got one choice, logprobs=5 got none, with a 200."""
    _, port = server
    status, body = _post(port, {"prompt": "w5 w6", "max_tokens": 2, field: value})
    assert status == 400 and body["error"]["param"] == field and "not supported" in body["error"]["message"]


def test_fields_at_their_neutral_values_are_accepted(server):
    _, port = server
    status, body = _post(port, {"prompt": "w5 w6", "max_tokens": 2, "temperature": 0, "n": 1, "best_of": 1,
                                "echo": False, "logprobs": None, "suffix": None, "presence_penalty": 0,
                                "frequency_penalty": 0.0, "logit_bias": {}, "user": "someone", "stop": None})
    assert status == 200, body


@pytest.mark.parametrize("body, status, param", [
    ({"prompt": "w5", "max_tokens": 33}, 400, "max_tokens"),  # above the server's limit
    ({"prompt": "w5", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": " ".join(["w5"] * 41)}, 400, "prompt"),  # 41 prompt tokens > 40
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": "w5", "temperature": -1}, 400, "temperature"),
    ({"prompt": "w5", "top_p": 0}, 400, "top_p"),
    ({"prompt": "w5", "model": "other"}, 404, "model"),
    ({"max_tokens": 4}, 400, "prompt"),
    ({"prompt": "w5", "stream": "false"}, 400, "stream"),  # a string is not a switch (bool("false") is True)
    ({"prompt": "w5", "model": 123}, 400, "model"),
    ({"prompt": "w5", "stop": ""}, 400, "stop"),
    ({"prompt": "w5", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),  # OpenAI's limit is 4
    ({"prompt": "w5", "stop": [5]}, 400, "stop"),
])
def test_invalid_requests_are_4xx_json(server, body, status, param):
    _, port = server
    got, payload = _post(port, body)
    assert got == status
    assert payload["error"]["param"] == param and payload["error"]["message"]


def test_body_limits_and_routes(server):
    _, port = server
    status, payload = _request(port, "POST", "/v1/completions", raw=b"x" * 5000)
    assert status == 413 and "exceeds" in json.loads(payload)["error"]["message"]
    status, payload = _request(port, "POST", "/v1/completions", raw=b"{not json")
    assert status == 400 and "JSON" in json.loads(payload)["error"]["message"]
    assert _request(port, "GET", "/nope")[0] == 404
    assert _request(port, "POST", "/v1/chat/nope", {"prompt": "w5"})[0] == 404
    # the server still answers after the errors
    assert _post(port, {"prompt": "w5 w6", "max_tokens": 2, "temperature": 0})[0] == 200


def test_an_unread_body_does_not_poison_a_kept_alive_connection(server):
    _, port = server
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/chat/completions", body=json.dumps({"prompt": "w5"}).encode(),
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 404 and json.loads(r.read())["error"]["message"].startswith("no route")
    # the server closed the connection instead of reading the unread body as the next request line
    assert r.getheader("Connection", "").lower() == "close" or r.will_close
    conn.close()
    status, payload = _request(port, "POST", "/v1/completions", raw=b'[' * 2040 + b']' * 2040)  # under the 4 KiB limit
    assert status == 400 and "nested too deeply" in json.loads(payload)["error"]["message"]


def test_an_oversized_body_is_answered_413_not_reset(server):
    _, port = server
    # 8 MiB is far more than the socket buffers hold: the client is still sending when the server answers
    status, payload = _request(port, "POST", "/v1/completions", raw=b"x" * (8 << 20))
    assert status == 413 and "8388608 bytes exceeds the limit of 4096" in json.loads(payload)["error"]["message"]
    assert _post(port, {"prompt": "w5 w6", "max_tokens": 2, "temperature": 0})[0] == 200


def test_a_client_that_expects_100_continue_hears_413_before_sending_an_oversized_body(server):
    import socket

    _, port = server
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 5000000\r\nExpect: 100-continue\r\n\r\n")
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413") and b"Connection: close" in head
    assert "5000000 bytes exceeds the limit of 4096" in json.loads(body)["error"]["message"]


def test_a_client_gone_mid_stream_leaves_the_server_serving(server, capsys):
    import socket

    _, port = server
    body = json.dumps({"prompt": "w5 w6", "max_tokens": 32, "temperature": 0, "stream": True}).encode()
    capsys.readouterr()
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    assert s.recv(12).startswith(b"HTTP/1.1 200")
    s.close()  # gone after the first bytes
    assert _post(port, {"prompt": "w5 w6", "max_tokens": 2, "temperature": 0})[0] == 200
    # the stream's next writes failed: quietly (no second response written into it, no traceback)
    assert "Traceback" not in capsys.readouterr().err


def test_a_port_in_use_is_a_one_line_error(server):
    from pyshrink.errors import PyshrinkError

    lm, port = server
    with pytest.raises(PyshrinkError, match=f"cannot listen on 127.0.0.1:{port}: Address already in use"):
        make_server(lm, "127.0.0.1", port)



def test_serve_cli_refuses_a_bad_thread_count(tmp_path, capsys):
    from pyshrink.cli import main

    assert main(["serve", str(tmp_path), "--threads", "-1"]) == 2
    assert "--threads must be in 1..1024, got -1" in capsys.readouterr().err


def test_a_client_that_sends_the_body_despite_the_413_still_reads_it(server):
    import socket

    _, port = server
    body = b"x" * (4 << 20)
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n".encode())
        s.sendall(body)  # without waiting for "100 Continue": the server drains it instead of resetting
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 413") and b"exceeds the limit of 4096" in reply
