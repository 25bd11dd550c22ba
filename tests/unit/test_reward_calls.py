"""Slow rewards: a batch scored in calls of a reward function or requests to an endpoint, at most
reward.concurrency at once (threads, or an event loop for ``async def``), each call within
reward.function_timeout_s; HTTP retries with backoff on 429 and 5xx. The fakes count the calls
in flight; a barrier that only opens when N calls wait together proves N ran at once without
timing anything."""

from __future__ import annotations

import asyncio
import contextlib
import json
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

import rlhf_ray.reward_server as rs
from rlhf_ray.batch import Generation, pack_generation
from rlhf_ray.reward_calls import call_plan, score_in_calls, with_named_errors
from rlhf_ray.reward_server import make_server, post_scores


class InFlight:
    """Counts calls running at once (``peak``); ``gate``: a barrier of that many calls, which only
    lets them through together (a bound lower than ``gate`` would leave it broken after 5 s)."""

    def __init__(self, gate: int = 0) -> None:
        self.now = self.peak = self.calls = 0
        self.lock = threading.Lock()
        self.barrier = threading.Barrier(gate, timeout=5) if gate else None

    def enter(self) -> None:
        with self.lock:
            self.now += 1
            self.calls += 1
            self.peak = max(self.peak, self.now)

    def leave(self) -> None:
        with self.lock:
            self.now -= 1

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        self.enter()
        try:
            if self.barrier is not None:
                self.barrier.wait()
            return [float(len(r)) for r in responses]
        finally:
            self.leave()


RESPONSES = ["x" * n for n in range(16)]
PROMPTS = [f"p{n}" for n in range(16)]


# ---- how a batch is cut into calls ------------------------------------------------------------


def test_call_plan_hand_examples():
    assert call_plan(5, 2, 1) == [[0, 1], [2, 3], [4]]
    assert call_plan(5, 0, 2) == [[0, 1, 2], [3, 4]]
    assert call_plan(5, 0, 8) == [[0], [1], [2], [3], [4]]
    assert call_plan(5, 0, 1) == [[0, 1, 2, 3, 4]]  # the default: the whole batch in one call
    assert call_plan(0, 1, 4) == []
    with pytest.raises(ValueError, match="concurrency >= 1"):
        call_plan(3, 0, 0)


def test_at_the_defaults_the_function_gets_everything_in_one_call_in_the_callers_thread():
    seen = []

    def fn(prompts, responses):
        seen.append((threading.get_ident(), len(responses)))
        return [1.0] * len(responses)

    assert score_in_calls(fn, PROMPTS, RESPONSES) == [1.0] * 16
    assert seen == [(threading.get_ident(), 16)]


# ---- bounded concurrency ----------------------------------------------------------------------


def test_a_plain_function_runs_concurrency_calls_at_once_and_no_more():
    fake = InFlight(gate=4)  # 16 calls of one sample, 4 at a time: four rounds through the barrier
    scores = score_in_calls(fake.score, PROMPTS, RESPONSES, samples_per_call=1, concurrency=4)
    assert scores == [float(n) for n in range(16)]  # in the samples' order
    assert (fake.calls, fake.peak) == (16, 4)


def test_samples_per_call_zero_cuts_the_batch_into_concurrency_calls():
    fake = InFlight(gate=4)
    assert score_in_calls(fake.score, PROMPTS, RESPONSES, concurrency=4) == [float(n) for n in range(16)]
    assert (fake.calls, fake.peak) == (4, 4)


def test_an_async_function_is_awaited_concurrency_at_a_time():
    fake = InFlight()

    async def judge(prompts, responses):
        fake.enter()
        await asyncio.sleep(0.01)  # every started call waits here, so all allowed ones overlap
        fake.leave()
        return [float(len(r)) for r in responses]

    scores = score_in_calls(judge, PROMPTS, RESPONSES, samples_per_call=1, concurrency=8)
    assert scores == [float(n) for n in range(16)]
    assert (fake.calls, fake.peak) == (16, 8)
    fake = InFlight()
    score_in_calls(judge, PROMPTS, RESPONSES, samples_per_call=1, concurrency=1)
    assert fake.peak == 1


def test_an_async_function_also_runs_where_an_event_loop_is_already_running():
    async def judge(prompts, responses):
        await asyncio.sleep(0)
        return [2.0] * len(responses)

    async def caller():
        return score_in_calls(judge, PROMPTS[:3], RESPONSES[:3], concurrency=2)

    assert asyncio.run(caller()) == [2.0, 2.0, 2.0]


# ---- timeouts, wrong counts, errors ------------------------------------------------------------


def test_a_call_over_the_timeout_stops_the_scoring_with_the_flag_to_change():
    release = threading.Event()

    def stuck(prompts, responses):
        if "x" * 3 in responses:
            release.wait(30)  # the thread cannot be stopped: freed at the end of the test
        return [0.0] * len(responses)

    try:
        with pytest.raises(TimeoutError, match=r"reward function f: call 4 of 16 \(1 samples\) ran longer than "
                                               r"--reward.function_timeout_s 0.2 s"):
            score_in_calls(stuck, PROMPTS, RESPONSES, samples_per_call=1, concurrency=4, timeout_s=0.2,
                           what="reward function f")
    finally:
        release.set()

    async def slow(prompts, responses):
        await asyncio.sleep(30)  # cancelled
        return [0.0] * len(responses)

    with pytest.raises(TimeoutError, match="call 1 of 2 .* --reward.function_timeout_s 0.1 s"):
        score_in_calls(slow, PROMPTS[:2], RESPONSES[:2], samples_per_call=1, concurrency=2, timeout_s=0.1)


def test_each_call_must_return_one_score_per_sample():
    def short(prompts, responses):
        return [0.0] * (len(responses) - 1)

    with pytest.raises(ValueError, match="reward function g returned 3 scores for 4 responses"):
        score_in_calls(short, PROMPTS[:8], RESPONSES[:8], concurrency=2, what="reward function g")
    with pytest.raises(TypeError, match="reward function g returned float, not a list of scores"):
        score_in_calls(lambda p, r: 1.0, PROMPTS[:2], RESPONSES[:2], what="reward function g")


def test_a_functions_own_error_is_named_plain_or_async():
    def bad(prompts, responses):
        raise KeyError("label")

    async def bad_async(prompts, responses):
        raise KeyError("label")

    for fn in (bad, bad_async):
        with pytest.raises(RuntimeError, match="reward function m:f raised KeyError: 'label'") as info:
            score_in_calls(with_named_errors(fn, "reward function m:f"), PROMPTS[:4], RESPONSES[:4], concurrency=2)
        assert isinstance(info.value.__cause__, KeyError)


def test_the_probe_before_ray_awaits_an_async_reward_function(tmp_path):
    from rlhf_ray.coordinator.preflight import probe_reward_function

    path = tmp_path / "judge.py"
    path.write_text(textwrap.dedent("""
        import asyncio

        async def judge(prompts, responses):
            await asyncio.sleep(0)
            return [float(len(r)) for r in responses]

        async def short(prompts, responses):
            return [1.0]
        """))
    probe_reward_function(f"{path}:judge", ["a prompt"], timeout_s=30)  # used to raise: a coroutine is no list
    with pytest.raises(ValueError, match="returned 1 scores for 2 responses on a probe call"):
        probe_reward_function(f"{path}:short", ["a prompt"], timeout_s=30)


# ---- the reward role's own calls (RewardScorer), function and endpoint -----------------------


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    from rlhf_ray.tiny_models import build_tokenizer

    path = tmp_path_factory.mktemp("policy")
    build_tokenizer(seed=0, vocab_size=300).save_pretrained(path)
    return str(path)


def _scorer(policy: str, **reward):
    from rlhf_ray.config import config_from_dict
    from rlhf_ray.workers.frozen import RewardScorer, RewardSpec

    cfg = config_from_dict({"model": {"path": policy}, "reward": reward})
    return RewardScorer(RewardSpec.from_config(cfg))


def _text_batch(n: int):
    """``n`` samples whose responses decode to n distinct lengths (1..n bytes of "7")."""
    seven = 3 + ord("7")  # byte-level ids: 4 specials first
    gen = Generation([[5 + ord("q")]] * n, [[seven] * (i + 1) for i in range(n)],
                     [[0.0] * (i + 1) for i in range(n)], ["stop"] * n, list(range(n)))
    return pack_generation(gen, 0, [2])


def test_the_reward_role_awaits_an_async_function_concurrency_at_a_time(policy_dir, tmp_path):
    path = tmp_path / "judge.py"
    path.write_text(textwrap.dedent("""
        import asyncio

        RUNNING = [0, 0]  # now, peak

        async def judge(prompts, responses):
            RUNNING[0] += 1
            RUNNING[1] = max(RUNNING)
            await asyncio.sleep(0.01)
            RUNNING[0] -= 1
            return [float(len(r)) for r in responses]
        """))
    scorer = _scorer(policy_dir, function=f"{path}:judge", concurrency=4, samples_per_call=1)
    batch = _text_batch(10)
    prompts, responses = scorer.decode(batch)
    assert [len(r) for r in responses] == list(range(1, 11))
    torch.testing.assert_close(scorer.score(batch), torch.arange(1.0, 11.0), rtol=0, atol=0)
    assert scorer.fn.__globals__["RUNNING"] == [0, 4]


@contextlib.contextmanager
def judge_server(fake: InFlight):
    """The repository's reward server on a free loopback port, scoring with ``fake``."""
    srv = make_server(fake.score, "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/score"
    finally:
        srv.shutdown()
        srv.server_close()


def test_the_reward_role_sends_concurrency_requests_at_once(policy_dir):
    fake = InFlight(gate=4)
    with judge_server(fake) as url:
        scorer = _scorer(policy_dir, kind="http", url=url, function=None, concurrency=4, samples_per_call=2)
        torch.testing.assert_close(scorer.score(_text_batch(16)), torch.arange(1.0, 17.0), rtol=0, atol=0)
    assert (fake.calls, fake.peak) == (8, 4)  # 8 requests of 2 samples, four at a time


def test_an_async_function_can_be_served_over_http():
    async def judge(prompts, responses):
        await asyncio.sleep(0)
        return [float(len(r)) for r in responses]

    srv = make_server(judge, "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        assert post_scores(f"http://127.0.0.1:{srv.server_address[1]}/score", ["p", "q"], ["ab", ""]) == [2.0, 0.0]
    finally:
        srv.shutdown()
        srv.server_close()


# ---- HTTP retries with backoff ----------------------------------------------------------------


@contextlib.contextmanager
def answering(codes: list[int]):
    """A loopback server answering each POST with the next of ``codes`` (200: scores of 1.0)."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            code = codes[min(len(seen), len(codes) - 1)]
            seen.append(code)
            data = json.dumps({"scores": [1.0] * len(body["responses"])} if code == 200 else {"error": "busy"})
            self.send_response(code)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data.encode())

        def log_message(self, *args):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/score", seen
    finally:
        srv.shutdown()
        srv.server_close()


def test_too_many_requests_and_server_errors_are_retried_with_doubling_backoff(monkeypatch):
    waits = []
    monkeypatch.setattr(rs.time, "sleep", waits.append)
    with answering([429, 503, 200]) as (url, seen):
        assert post_scores(url, ["p", "q"], ["1", "2"], retries=3, backoff_s=0.25) == [1.0, 1.0]
    assert seen == [429, 503, 200] and waits == [0.25, 0.5]
    waits.clear()
    with answering([429]) as (url, seen):
        with pytest.raises(ConnectionError, match=r"answered 429 \(Too Many Requests\) to each of 3 attempts.*"
                                                  r"--reward.concurrency"):
            post_scores(url, ["p"], ["1"], retries=2, backoff_s=0.1)
    assert seen == [429, 429, 429] and waits == [0.1, 0.2]
    with answering([400]) as (url, seen):  # other 4xx: not retried
        with pytest.raises(ValueError, match=r"rejected the request \(400\)"):
            post_scores(url, ["p"], ["1"], retries=2, backoff_s=0.1)
    assert seen == [400]


def test_the_reward_role_retries_with_the_configured_backoff(policy_dir, monkeypatch):
    waits = []
    monkeypatch.setattr(rs.time, "sleep", waits.append)
    with answering([503, 503, 200]) as (url, seen):
        scorer = _scorer(policy_dir, kind="http", url=url, function=None, http_retries=2, http_backoff_s=0.05)
        torch.testing.assert_close(scorer.score(_text_batch(3)), torch.ones(3), rtol=0, atol=0)
    assert seen == [503, 503, 200] and waits == [0.05, 0.1]
