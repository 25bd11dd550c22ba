"""The HTTP reward endpoint and its client: scores, bad requests, and an endpoint that is down."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from rlhf_ray.reward_server import make_server, post_scores
from rlhf_ray.rewards import digit_fraction


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
