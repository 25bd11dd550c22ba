"""The HTTP reward endpoint and its client: scores, bad requests, and an endpoint that is down;
the shared token (401), the request-size limit (413/411/400), and the refusal to serve a
non-loopback address without a token."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

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
