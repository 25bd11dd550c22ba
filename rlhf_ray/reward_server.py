"""Serve a reward function over HTTP, for `reward.kind: http` (a reward computed elsewhere: a
sandbox that runs code, a judge model on other hardware).

    python -m rlhf_ray.reward_server --function rlhf_ray.rewards:digit_fraction --port 8000

Binds to 127.0.0.1 unless ``--host`` says otherwise. Protocol: ``POST /score`` with JSON
``{"prompts": [...], "responses": [...]}`` answers ``{"scores": [...]}``; ``GET /health``
answers ``ok``. A client for it is ``post_scores`` below (retries with backoff).
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from rlhf_ray.rewards import RewardFn, load_reward_function


def make_server(fn: RewardFn, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def _reply(self, code: int, body: dict | str) -> None:
            data = (json.dumps(body) if isinstance(body, dict) else body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json" if isinstance(body, dict) else "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802
            self._reply(200, "ok") if self.path == "/health" else self._reply(404, {"error": "not found"})

        def do_POST(self) -> None:  # noqa: N802
            if self.path != "/score":
                return self._reply(404, {"error": "POST /score"})
            try:
                req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                scores = [float(x) for x in fn(list(req["prompts"]), list(req["responses"]))]
            except Exception as exc:  # the client gets the reason, the server keeps serving
                return self._reply(400, {"error": f"{type(exc).__name__}: {exc}"})
            self._reply(200, {"scores": scores})

        def log_message(self, *args) -> None:  # quiet: one line per request is too much at PPO rates
            pass

    return ThreadingHTTPServer((host, port), Handler)


def post_scores(url: str, prompts: list[str], responses: list[str], timeout_s: float = 30.0,
                retries: int = 3, backoff_s: float = 0.5) -> list[float]:
    """Scores from a reward endpoint; connection failures and 5xx are retried with exponential
    backoff, then raise ConnectionError saying what was tried. A 4xx (bad request, the function
    raised) is not retried."""
    body = json.dumps({"prompts": prompts, "responses": responses}).encode()
    last: Exception | None = None
    for attempt in range(retries + 1):
        try:
            req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                scores = json.loads(resp.read())["scores"]
            if len(scores) != len(responses):
                raise ValueError(f"reward endpoint {url} returned {len(scores)} scores for {len(responses)} responses")
            return [float(s) for s in scores]
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                detail = exc.read().decode(errors="replace")
                raise ValueError(f"reward endpoint {url} rejected the request ({exc.code}): {detail}") from None
            last = exc
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            last = exc
        if attempt < retries:
            time.sleep(backoff_s * 2 ** attempt)
    raise ConnectionError(f"reward endpoint {url} unreachable after {retries + 1} attempts ({last}); start it "
                          "(python -m rlhf_ray.reward_server ...) or fix --reward.url.")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rlhf_ray.reward_server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--function", required=True, help="path/to/file.py:name or module:name")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    server = make_server(load_reward_function(args.function), args.host, args.port)
    print(f"serving {args.function} on http://{args.host}:{server.server_address[1]}/score", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
