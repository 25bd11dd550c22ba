"""The HTTP reward endpoint and its client: scores, bad requests, and an endpoint that is down;
the shared token (401), the request-size limit (413/411/400), and the refusal to serve a
non-loopback address without a token; where the client sends the token (https or loopback only,
never after a redirect, never through a proxy to loopback); the bound on requests at once (503)."""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import rlhf_ray.reward_server as rs
from rlhf_ray.reward_server import TOKEN_ENV, check_exposure, is_loopback, main, make_server, post_scores
from rlhf_ray.rewards import digit_fraction

TOKEN = "s3cret-token-0123"


@pytest.fixture()
def server():
    def fn(prompts, responses):
        if "boom" in responses:
            raise ValueError("cannot score boom")
        return digit_fraction(prompts, responses)

    srv = make_server(fn, "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/score"
    srv.shutdown()
    srv.server_close()


def test_binds_loopback_by_default():
    srv = make_server(digit_fraction, port=0)
    try:
        assert srv.server_address[0] == "127.0.0.1"
    finally:
        srv.server_close()


def test_scores_round_trip(server):
    assert post_scores(server, ["p", "q"], ["12", "a1"]) == [1.0, 0.5]


def test_function_error_is_reported_not_retried(server):
    t0 = time.time()
    with pytest.raises(ValueError, match=r"rejected the request \(400\).*cannot score boom"):
        post_scores(server, ["p"], ["boom"], retries=3, backoff_s=1.0)
    assert time.time() - t0 < 1.0


def test_endpoint_down_is_retried_with_backoff_then_explained():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    t0 = time.time()
    with pytest.raises(ConnectionError, match=r"unreachable after 3 attempts.*rlhf_ray.reward_server"):
        post_scores(f"http://127.0.0.1:{port}/score", ["p"], ["1"], timeout_s=2, retries=2, backoff_s=0.2)
    assert time.time() - t0 >= 0.2 + 0.4  # two backoff sleeps: 0.2 s, then 0.4 s


# --------------------------------------------------------------------------- token and size limit


@contextlib.contextmanager
def serving(**kwargs):
    """A server on a free loopback port; yields (url, calls): ``calls`` counts function calls."""
    calls = []

    def fn(prompts, responses):
        calls.append(len(responses))
        return digit_fraction(prompts, responses)

    srv = make_server(fn, "127.0.0.1", 0, **kwargs)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/score", calls
    finally:
        srv.shutdown()
        srv.server_close()


def raw_post(url: str, headers: list[str], body: bytes = b"") -> tuple[int, dict, dict]:
    """Send a hand-made request head (and ``body``); returns (status, headers, JSON body). The
    answer is read by its Content-Length, so nothing waits for the server to close."""
    port = int(url.split(":")[2].split("/")[0])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        head = "POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n"
        sock.sendall(head.encode() + body)
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        return resp.status, dict(resp.getheaders()), json.loads(resp.read())


def urllib_post(url: str, authorization: str | None) -> tuple[int, dict]:
    body = json.dumps({"prompts": ["p"], "responses": ["12"]}).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": authorization} if authorization else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body, headers=headers), timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_with_a_token_only_the_matching_bearer_header_is_served():
    with serving(token=TOKEN) as (url, calls):
        for auth in (None, "Bearer wrong", f"Bearer {TOKEN}x", f"Basic {TOKEN}", TOKEN, "Bearer"):
            code, body = urllib_post(url, auth)
            assert code == 401 and TOKEN_ENV in body["error"] and "Bearer" in body["error"], auth
        assert calls == []  # the function never ran for them
        assert urllib_post(url, f"Bearer {TOKEN}") == (200, {"scores": [1.0]})
        assert urllib_post(url, f"bearer {TOKEN}")[0] == 200  # the scheme is case-insensitive (RFC 7235)
        assert urllib_post(url + "?api_key=x", f"Bearer {TOKEN}")[0] == 200  # a query string is not the route
        status, headers, _ = raw_post(url, ["Content-Length: 2"], b"{}")
        assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
        with urllib.request.urlopen(url.replace("/score", "/health"), timeout=5) as resp:
            assert resp.read() == b"ok"  # health checks need no token


def test_a_large_content_length_gets_413_before_the_body_is_read():
    with serving(token=TOKEN) as (url, calls):
        t0 = time.time()
        status, headers, body = raw_post(url, [f"Authorization: Bearer {TOKEN}", "Content-Length: 1000000000"])
        assert status == 413 and "1000000000 bytes" in body["error"] and str(16 * 2**20) in body["error"]
        assert headers["Connection"] == "close"
        assert time.time() - t0 < 1.0  # answered from the header: not one body byte was sent
        # Without the token it is 401, also before any of the body is read.
        status, _, _ = raw_post(url, ["Content-Length: 1000000000"])
        assert status == 401 and calls == []


def test_missing_or_invalid_content_length():
    with serving() as (url, _):
        assert raw_post(url, [])[0] == 411
        assert raw_post(url, ["Transfer-Encoding: chunked"], b"0\r\n\r\n")[0] == 411
        for bad in (["Content-Length: abc"], ["Content-Length: -5"], ["Content-Length: 2", "Content-Length: 3"]):
            status, _, body = raw_post(url, bad)
            assert status == 400 and "Content-Length" in body["error"], bad


def test_the_size_limit_is_a_server_option():
    payload = json.dumps({"prompts": ["p"], "responses": ["1"]}).encode()
    with serving(max_request_bytes=len(payload)) as (url, _):
        assert raw_post(url, [f"Content-Length: {len(payload)}"], payload)[0] == 200
        assert raw_post(url, [f"Content-Length: {len(payload) + 1}"], payload + b" ")[0] == 413
    with pytest.raises(ValueError, match="must be positive"):
        make_server(digit_fraction, "127.0.0.1", 0, max_request_bytes=0)


def test_client_sends_the_token_from_the_environment(monkeypatch):
    with serving(token=TOKEN) as (url, _):
        monkeypatch.setenv(TOKEN_ENV, TOKEN)
        assert post_scores(url, ["p", "q"], ["12", "a1"]) == [1.0, 0.5]


def test_client_without_the_token_is_told_where_to_set_it(monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with serving(token=TOKEN) as (url, _):
        t0 = time.time()
        with pytest.raises(ValueError, match=rf"requires a token \(401\) and this process has no {TOKEN_ENV}: "
                                             rf"export the server's token as {TOKEN_ENV}.*launcher.*ray start"):
            post_scores(url, ["p"], ["1"], retries=3, backoff_s=1.0)
        assert time.time() - t0 < 1.0  # not retried


def test_client_with_a_wrong_token_is_told_to_use_the_same_one(monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "not-the-token")
    with serving(token=TOKEN) as (url, _):
        with pytest.raises(ValueError, match=rf"rejected this process's {TOKEN_ENV} \(401.*set the same {TOKEN_ENV} "
                                             "for the launcher as for the server"):
            post_scores(url, ["p"], ["1"], retries=0)


def test_client_explains_a_request_over_the_limit(monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    responses = ["1" * 1000] * 4000  # ~4 MB: still being sent when the server answers 413
    with serving(max_request_bytes=4096) as (url, calls):
        with pytest.raises(ValueError, match=r"refused a request of \d+ bytes \(4000 samples\) as too large \(413.*"
                                             r"fewer samples per call.*--rollout.prompts_per_iteration.*"
                                             r"--max-request-mb"):
            post_scores(url, ["p"] * len(responses), responses, retries=0)
        assert calls == []


def test_client_errors_mask_secrets_in_the_url(monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "not-the-token")
    with serving(token=TOKEN) as (url, _):
        with pytest.raises(ValueError) as err:
            post_scores(url + "?api_key=hunter2", ["p"], ["1"], retries=0)
    assert "hunter2" not in str(err.value) and "api_key=***" in str(err.value)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConnectionError) as err:
        post_scores(f"http://127.0.0.1:{port}/score?token=hunter2", ["p"], ["1"], retries=0)
    assert "hunter2" not in str(err.value) and "token=***" in str(err.value)


def test_a_non_loopback_host_needs_a_token_or_a_deliberate_flag(monkeypatch, capsys):
    for host in ("0.0.0.0", "", "10.1.2.3", "::", "reward.example.com"):
        assert not is_loopback(host)
        with pytest.raises(ValueError, match=f"without a token.*{TOKEN_ENV}.*--allow-no-token"):
            make_server(digit_fraction, host, 0)  # refused before anything is bound
        check_exposure(host, TOKEN)
        check_exposure(host, None, allow_no_token=True)
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert is_loopback(host)
        check_exposure(host, None)
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(SystemExit) as exit_:
        main(["--function", "rlhf_ray.rewards:digit_fraction", "--host", "0.0.0.0", "--port", "0"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "refusing to serve --host '0.0.0.0' without a token" in err and "Traceback" not in err
    monkeypatch.setenv(TOKEN_ENV, "has spaces")
    with pytest.raises(SystemExit):
        main(["--function", "rlhf_ray.rewards:digit_fraction", "--port", "0"])
    assert "printable ASCII" in capsys.readouterr().err


# --------------------------------------------------------------------------- where the token may go


@contextlib.contextmanager
def answering(answer):
    """A loopback server whose every GET/POST is answered by ``answer(handler) -> (code, headers,
    body)``; yields (base URL, the requests seen as (method, path, headers))."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def _any(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            seen.append((self.command, self.path, dict(self.headers)))
            code, headers, body = answer(self)
            self.send_response(code)
            for name, value in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _any

        def log_message(self, *args):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", seen
    finally:
        srv.shutdown()
        srv.server_close()


def test_the_token_travels_only_over_https_or_to_loopback(monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    t0 = time.time()
    with pytest.raises(ValueError, match=rf"refusing to send {TOKEN_ENV} to http://10\.255\.255\.1:9/score\?"
                                         r"api_key=\*\*\*: over plain http"):
        post_scores("http://10.255.255.1:9/score?api_key=hunter2", ["p"], ["1"], timeout_s=0.5, retries=0)
    assert time.time() - t0 < 0.4  # refused before any connection attempt
    for url in ("https://reward.example.com/score", "https://10.1.2.3:8443/score", "http://127.0.0.1:8000/score",
                "http://127.0.0.2/score", "http://localhost:8000/score", "http://[::1]:8000/score"):
        rs.check_token_transport(url, TOKEN)
    for url in ("http://10.1.2.3:8000/score", "http://reward.example.com/score", "http://127.0.0.1.example.com/s",
                "http://localhost.example.com/score", "ftp://127.0.0.1/score", "http://0.0.0.0:8000/score"):
        rs.check_token_transport(url, None)  # without a token any URL may be used
        with pytest.raises(ValueError, match=rf"refusing to send {TOKEN_ENV} to .*https://.*ssh -N -L"):
            rs.check_token_transport(url, TOKEN)


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_a_redirect_is_refused_and_the_token_never_follows_it(code, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    with answering(lambda h: (200, {"Content-Type": "application/json"}, b'{"scores": [1.0]}')) as (target, seen):
        elsewhere = f"{target}/score?api_key=hunter2"
        with answering(lambda h: (code, {"Location": elsewhere}, b"")) as (redirector, first):
            with pytest.raises(ValueError, match=rf"redirect \({code}\) to {re.escape(target)}/score\?api_key=\*\*\*;"
                                                 r" redirects are not followed.*--reward.url") as err:
                post_scores(redirector + "/score", ["p"], ["1"], retries=3, backoff_s=1.0)
        assert len(first) == 1 and first[0][2]["Authorization"] == f"Bearer {TOKEN}"  # the configured URL got it
        assert seen == []  # the redirect's target got nothing, token or samples
    assert "hunter2" not in str(err.value)


def test_a_loopback_url_is_never_sent_through_a_proxy(monkeypatch):
    """A proxy from the environment would get the token in clear text, and answer for its own
    machine's loopback."""
    with answering(lambda h: (502, {}, b"proxy")) as (proxy, through_proxy):
        for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
            monkeypatch.setenv(name, proxy)
        for name in ("no_proxy", "NO_PROXY"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv(TOKEN_ENV, TOKEN)
        with serving(token=TOKEN) as (url, calls):
            assert post_scores(url, ["p"], ["12"], retries=0) == [1.0] and calls == [1]
        assert through_proxy == []


# --------------------------------------------------------------------------- concurrency


def _handler_threads() -> int:
    return sum("process_request_thread" in t.name for t in threading.enumerate())


def _until(cond, timeout_s: float = 10.0) -> bool:
    deadline = time.time() + timeout_s
    while not cond() and time.time() < deadline:
        time.sleep(0.05)
    return cond()


def test_the_server_runs_a_bounded_number_of_requests_at_once_and_queues_the_rest():
    gate, entered = threading.Event(), []

    def slow(prompts, responses):
        entered.append(1)
        gate.wait(30)
        return digit_fraction(prompts, responses)

    srv = make_server(slow, "127.0.0.1", 0, max_connections=2)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/score"
    before, results = _handler_threads(), []
    clients = [threading.Thread(target=lambda: results.append(post_scores(url, ["p"], ["12"], retries=0)))
               for _ in range(5)]
    try:
        for c in clients:
            c.start()
        assert _until(lambda: len(entered) == 2)
        time.sleep(0.5)
        assert len(entered) == 2 and _handler_threads() - before == 2  # the other three wait, without a thread
        assert all(c.is_alive() for c in clients)
    finally:
        gate.set()
        for c in clients:
            c.join(30)
    assert results == [[1.0]] * 5 and len(entered) == 5  # each served once a thread was free
    srv.shutdown()
    srv.server_close()
    with pytest.raises(ValueError, match="--max-connections must be at least 1"):
        make_server(digit_fraction, "127.0.0.1", 0, max_connections=0)


def test_shutdown_does_not_wait_for_a_free_thread():
    gate = threading.Event()
    srv = make_server(lambda p, r: gate.wait(30) and digit_fraction(p, r), "127.0.0.1", 0, max_connections=1)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/score"
    outcomes: list = []

    def client():
        try:
            outcomes.append(post_scores(url, ["p"], ["12"], retries=0))
        except ConnectionError as exc:
            outcomes.append(exc)

    clients = [threading.Thread(target=client, daemon=True) for _ in range(2)]
    for c in clients:
        c.start()
    assert _until(lambda: _handler_threads() == 1)
    time.sleep(0.5)  # the second is accepted and waits for the busy thread
    t0 = time.time()
    srv.shutdown()
    assert time.time() - t0 < 2.0
    gate.set()
    srv.server_close()
    for c in clients:
        c.join(10)
    assert len(outcomes) == 2 and [1.0] in outcomes  # the one being served finished; the waiting one was closed
