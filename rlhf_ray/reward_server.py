"""Serve a reward function over HTTP, for `reward.kind: http` (a reward computed elsewhere: a
sandbox that runs code, a judge model on other hardware).

    python -m rlhf_ray.reward_server --function rlhf_ray.rewards:digit_fraction --port 8000
    export RLHF_REWARD_TOKEN=$(openssl rand -hex 32)   # same value where the launcher runs
    python -m rlhf_ray.reward_server --function rlhf_ray.rewards:digit_fraction --host 0.0.0.0

Binds to 127.0.0.1 unless ``--host`` says otherwise. Protocol: ``POST /score`` with JSON
``{"prompts": [...], "responses": [...]}`` answers ``{"scores": [...]}``; ``GET /health``
answers ``ok`` (no token needed). A client for it is ``post_scores`` below (retries with backoff).
When the prompt records have fields besides the prompt (an expected answer), the body also holds
``"fields": {"answer": [...], ...}``, one value per response, and the function gets those it
takes as keyword arguments (``rlhf_ray.rewards.FieldParameters``); no ``fields``, none.

Access: when the environment variable ``RLHF_REWARD_TOKEN`` is set, ``POST /score`` needs
``Authorization: Bearer <token>`` (else 401), compared in constant time; ``post_scores`` sends
it from the same variable, and only where nobody on the way can read it: to an ``https://`` URL,
or to an ``http://`` URL of a loopback address (directly, never through a proxy); any other URL
is refused before anything is sent. Redirects are never followed (a 3xx answer is an error
naming the address it pointed to), so the token and the samples go only to the configured URL.
The token is never a flag or a config field: those end up in shell histories, process lists and
saved configs. Without a token the server refuses a non-loopback ``--host`` unless
``--allow-no-token`` says so. A body over ``--max-request-mb`` (16 MiB) is refused with 413 from
its Content-Length, before it is read; no Content-Length gets 411.

Concurrency: one thread per connection, at most ``--max-connections`` (16) at once; further
connections wait, up to 64 in the listen queue (the OS turns away more), until a thread is free
or the client's timeout ends the wait (``post_scores`` then retries with backoff). A client that
stops sending holds its thread for at most 60 s.

What it leaves out: TLS (put a TLS-terminating proxy in front when it leaves the machine),
per-client tokens, rate limits per client.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import ipaddress
import json
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from rlhf_ray.config import redact_url
from rlhf_ray.rewards import RewardFn, call_once, field_parameters, load_reward_function

TOKEN_ENV = "RLHF_REWARD_TOKEN"
DEFAULT_MAX_REQUEST_BYTES = 16 * 2**20
# After an early refusal (401, 413) the body the client is still sending is read and dropped for
# at most this long, so that it reads the answer instead of a connection reset (the "lingering
# close" of web servers: closing a socket with unread data sends RST, which discards the reply).
LINGER_S = 2.0
IDLE_TIMEOUT_S = 60.0  # a client that stops sending mid-request frees its thread after this
# Handler threads at once. A reward call is one batch of samples, so a trainer needs one or a few at
# a time; the bound keeps a flood of connections from starting a thread (and a stack) each.
DEFAULT_MAX_CONNECTIONS = 16


def read_token() -> str | None:
    """The shared token from ``RLHF_REWARD_TOKEN`` (surrounding whitespace dropped), or None
    when it is unset or empty."""
    token = os.environ.get(TOKEN_ENV, "").strip()
    if token and not (token.isascii() and token.isprintable() and " " not in token):
        raise ValueError(f"{TOKEN_ENV} must be printable ASCII without spaces (e.g. openssl rand -hex 32).")
    return token or None


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1); any other name counts
    as reachable from elsewhere."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, token: str | None, allow_no_token: bool = False) -> None:
    """Refuse to serve a non-loopback address without a token, unless deliberately allowed."""
    if token or allow_no_token or is_loopback(host):
        return
    raise ValueError(f"refusing to serve --host {host!r} without a token: anyone who can reach it could call the "
                     f"reward function. Set {TOKEN_ENV} here and where the launcher runs (export {TOKEN_ENV}="
                     "$(openssl rand -hex 32)), bind to 127.0.0.1, or pass --allow-no-token on a trusted network.")


def _content_length(headers) -> int | None:
    """The declared body size; None when missing, -1 when invalid (not digits, or conflicting)."""
    values = headers.get_all("Content-Length") or []
    if not values:
        return None
    if len(set(values)) != 1 or not (values[0].isascii() and values[0].strip().isdigit()):
        return -1
    return int(values[0])


class BoundedHTTPServer(ThreadingHTTPServer):
    """A thread per connection, at most ``max_connections`` at once. While all are busy the
    accepting loop waits for one to finish, so further connections wait in the listen queue
    (``request_queue_size``; the OS turns away more, and a waiting client's own timeout ends its
    wait, which ``post_scores`` retries with backoff)."""

    request_queue_size = 64

    def __init__(self, address, handler, max_connections: int = DEFAULT_MAX_CONNECTIONS) -> None:
        self.max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        self._stopping = threading.Event()
        super().__init__(address, handler)

    def process_request(self, request, client_address) -> None:
        while not self._slots.acquire(timeout=0.2):
            if self._stopping.is_set():  # shutdown() must not wait for a slot
                self.shutdown_request(request)
                return
        try:
            super().process_request(request, client_address)  # starts the thread that releases the slot
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def shutdown(self) -> None:
        self._stopping.set()
        super().shutdown()


def make_server(fn: RewardFn, host: str = "127.0.0.1", port: int = 8000, *, token: str | None = None,
                max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, allow_no_token: bool = False,
                max_connections: int = DEFAULT_MAX_CONNECTIONS) -> BoundedHTTPServer:
    """A server (not yet serving) for ``fn``. ``token``: required as ``Authorization: Bearer``
    on ``POST /score`` (None: no check, allowed on loopback or with ``allow_no_token``).
    ``max_connections``: requests served at once; more wait (see the module docstring)."""
    check_exposure(host, token, allow_no_token)
    if max_request_bytes <= 0:
        raise ValueError(f"the request size limit must be positive, got {max_request_bytes} bytes.")
    if max_connections < 1:
        raise ValueError(f"--max-connections must be at least 1, got {max_connections}.")
    # Digests of equal length, so compare_digest's time tells nothing about the token's length either.
    expected = hashlib.sha256(token.encode()).digest() if token else None
    takes = field_parameters(fn)

    class Handler(BaseHTTPRequestHandler):
        timeout = IDLE_TIMEOUT_S

        def _reply(self, code: int, body: dict | str, headers: dict[str, str] | None = None) -> None:
            data = (json.dumps(body) if isinstance(body, dict) else body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json" if isinstance(body, dict) else "text/plain")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def _refuse(self, code: int, error: str, length: int | None, headers: dict[str, str] | None = None) -> None:
            """Answer without reading the body, then drop what the client still sends (LINGER_S)."""
            self.close_connection = True
            self._reply(code, {"error": error}, {"Connection": "close", **(headers or {})})
            deadline = time.monotonic() + LINGER_S
            left = length if length and length > 0 else 0
            while left > 0 and time.monotonic() < deadline:
                try:
                    self.connection.settimeout(max(deadline - time.monotonic(), 0.01))
                    chunk = self.rfile.read1(min(left, 1 << 16))
                except OSError:
                    break
                if not chunk:
                    break
                left -= len(chunk)

        def _route(self) -> str:
            return urllib.parse.urlsplit(self.path).path  # a query string (for a proxy in front) is ignored

        def _authorized(self) -> bool:
            if expected is None:
                return True
            scheme, _, given = self.headers.get("Authorization", "").partition(" ")
            same = hmac.compare_digest(hashlib.sha256(given.strip().encode("latin-1", "replace")).digest(), expected)
            return same and scheme.lower() == "bearer"

        def do_GET(self) -> None:  # noqa: N802
            self._reply(200, "ok") if self._route() == "/health" else self._reply(404, {"error": "not found"})

        def do_POST(self) -> None:  # noqa: N802
            length = _content_length(self.headers)
            if self._route() != "/score":
                return self._refuse(404, "POST /score", length)
            if not self._authorized():
                return self._refuse(401, f"missing or wrong token: send Authorization: Bearer <token>, the token "
                                         f"being the server's {TOKEN_ENV}", length, {"WWW-Authenticate": "Bearer"})
            if length is None:
                return self._refuse(411, "Content-Length required", None)
            if length < 0:
                return self._refuse(400, "invalid Content-Length", None)
            if length > max_request_bytes:
                return self._refuse(413, f"request body of {length} bytes is over the server's limit of "
                                         f"{max_request_bytes} bytes (--max-request-mb)", length)
            try:
                req = json.loads(self.rfile.read(length))
                responses, fields = list(req["responses"]), takes.pick(req.get("fields"))
                for name, values in fields.items():
                    if not isinstance(values, list) or len(values) != len(responses):
                        raise ValueError(f"field {name!r} must be a list of one value per response ({len(responses)})")
                scores = [float(x) for x in call_once(fn, list(req["prompts"]), responses, fields)]
            except Exception as exc:  # the client gets the reason, the server keeps serving
                return self._reply(400, {"error": f"{type(exc).__name__}: {exc}"})
            self._reply(200, {"scores": scores})

        def log_message(self, *args) -> None:  # quiet: one line per request is too much at PPO rates
            pass

    return BoundedHTTPServer((host, port), Handler, max_connections)


def check_token_transport(url: str, token: str | None) -> None:
    """Refuse a URL the token would travel to in clear text: only ``https://`` and ``http://``
    to a loopback address (127.0.0.0/8, ::1, localhost) may carry it."""
    if token is None:
        return
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https" or (parts.scheme == "http" and is_loopback(parts.hostname or "")):
        return
    raise ValueError(f"refusing to send {TOKEN_ENV} to {redact_url(url)}: over plain {parts.scheme or 'http'} to "
                     "another machine the token (and the samples) can be read by anyone on the network path. Use an "
                     "https:// URL (a TLS-terminating proxy in front of the reward server), or a tunnel to this "
                     "machine's loopback (ssh -N -L 8000:127.0.0.1:8000 <server host>, then --reward.url "
                     "http://127.0.0.1:8000/score).")


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A 3xx answer stays an HTTPError: urllib would re-send the request headers (the token
    among them) to wherever ``Location`` points, another host included."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ARG002
        return None


def _opener(url: str) -> urllib.request.OpenerDirector:
    """No redirects; no proxy for a loopback URL (a proxy from the environment would receive the
    request, token included, in clear text and answer for another machine's loopback)."""
    local = is_loopback(urllib.parse.urlsplit(url).hostname or "")
    return urllib.request.build_opener(_NoRedirects, *([urllib.request.ProxyHandler({})] if local else []))


def _rejection(url: str, code: int, detail: str, sent_token: bool, nbytes: int, n: int) -> str:
    """What a 3xx or 4xx answer means for the caller, and what to change."""
    if 300 <= code < 400:
        return (f"reward endpoint {url} answered with a redirect ({code}) to {redact_url(detail) or 'nowhere'}; "
                "redirects are not followed (the request carries the samples and the token): set --reward.url to "
                "the address that answers itself.")
    if code == 401 and sent_token:
        return (f"reward endpoint {url} rejected this process's {TOKEN_ENV} (401: it is not the server's); set "
                f"the same {TOKEN_ENV} for the launcher as for the server.")
    if code == 401:
        return (f"reward endpoint {url} requires a token (401) and this process has no {TOKEN_ENV}: export the "
                f"server's token as {TOKEN_ENV} before starting the launcher (on an existing Ray cluster also "
                "before `ray start` on its nodes: the reward actor inherits the node's environment).")
    if code == 413:
        return (f"reward endpoint {url} refused a request of {nbytes} bytes ({n} samples) as too large (413: "
                f"{detail}); score fewer samples per call (lower --rollout.prompts_per_iteration, "
                "--rollout.samples_per_prompt or --rollout.max_new_tokens) or raise the server's limit "
                "(python -m rlhf_ray.reward_server --max-request-mb ...).")
    return f"reward endpoint {url} rejected the request ({code}): {detail}"


def post_scores(url: str, prompts: list[str], responses: list[str], timeout_s: float = 30.0,
                retries: int = 3, backoff_s: float = 0.5, fields: dict[str, list] | None = None) -> list[float]:
    """Scores from a reward endpoint; connection failures, timeouts (``timeout_s`` per attempt), 5xx
    and 429 (too many requests: a judge's rate limit) are retried after ``backoff_s``, doubling each
    time, then raise ConnectionError saying what was tried. Any other 4xx (bad request, the function
    raised, a missing or wrong token, a request over the size limit) is not retried: ValueError
    saying what to fix. Sends ``Authorization: Bearer $RLHF_REWARD_TOKEN`` when that is set,
    only over https or to loopback (else ValueError, before anything is sent); never follows a
    redirect (ValueError naming its target). Errors show the URL with its secrets masked.
    ``fields``: the prompt records' fields, one value per response, sent as ``"fields"`` (left
    out when there are none, so a server that predates them reads the same body)."""
    body = json.dumps({"prompts": prompts, "responses": responses, **({"fields": fields} if fields else {})}).encode()
    token = read_token()
    check_token_transport(url, token)
    opener = _opener(url)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    shown = redact_url(url)
    last: Exception | None = None
    for attempt in range(retries + 1):
        try:
            req = urllib.request.Request(url, data=body, headers=headers)
            with opener.open(req, timeout=timeout_s) as resp:
                scores = json.loads(resp.read())["scores"]
            if len(scores) != len(responses):
                raise ValueError(f"reward endpoint {shown} returned {len(scores)} scores for {len(responses)} "
                                 "responses")
            return [float(s) for s in scores]
        except urllib.error.HTTPError as exc:
            if exc.code < 500 and exc.code != 429:
                redirect = 300 <= exc.code < 400
                detail = exc.headers.get("Location", "") if redirect else exc.read().decode(errors="replace")
                raise ValueError(_rejection(shown, exc.code, detail, token is not None, len(body),
                                            len(responses))) from None
            last = exc
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            last = exc
        if attempt < retries:
            time.sleep(backoff_s * 2 ** attempt)
    if isinstance(last, urllib.error.HTTPError):
        raise ConnectionError(f"reward endpoint {shown} answered {last.code} ({last.reason}) to each of {retries + 1} "
                              "attempts; check the server's log, or give it more time between attempts "
                              "(--reward.http_retries, --reward.http_backoff_s) or fewer requests at once "
                              "(--reward.concurrency).")
    raise ConnectionError(f"reward endpoint {shown} unreachable after {retries + 1} attempts ({last}); start it "
                          "(python -m rlhf_ray.reward_server ...) or fix --reward.url.")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rlhf_ray.reward_server", description=__doc__.split("\n\n")[0],
                                     epilog=f"Token: the environment variable {TOKEN_ENV} (never a flag).")
    parser.add_argument("--function", required=True, help="path/to/file.py:name or module:name")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-request-mb", type=float, default=DEFAULT_MAX_REQUEST_BYTES / 2**20,
                        help="largest request body in MiB; a larger one gets 413 before it is read (default 16)")
    parser.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
                        help="requests served at once, a thread each; more wait in the listen queue (default "
                             f"{DEFAULT_MAX_CONNECTIONS})")
    parser.add_argument("--allow-no-token", action="store_true",
                        help=f"serve a non-loopback --host without {TOKEN_ENV}: anyone who reaches it may call it")
    args = parser.parse_args(argv)
    try:
        token = read_token()
        check_exposure(args.host, token, args.allow_no_token)  # before loading what may be a large model
        limit = int(args.max_request_mb * 2**20)
        server = make_server(load_reward_function(args.function), args.host, args.port, token=token,
                             max_request_bytes=limit, allow_no_token=args.allow_no_token,
                             max_connections=args.max_connections)
    except ValueError as exc:
        parser.exit(2, f"error: {exc}\n")
    print(f"serving {args.function} on http://{args.host}:{server.server_address[1]}/score (token "
          f"{'required' if token else 'not required'}; requests up to {limit} bytes, {args.max_connections} at "
          "once)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
