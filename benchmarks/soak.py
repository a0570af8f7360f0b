"""Soak `corral serve`: many clients, mixed and hostile requests, then check nothing leaked.

    python benchmarks/soak.py --model MODEL_DIR                      # 2000 requests, 16 clients
    python benchmarks/soak.py --model MODEL_DIR --requests 300 --json   # what the test runs

Starts `corral serve` (hf backend) on 127.0.0.1, warms it up, notes its memory (RSS), then
sends `--requests` requests from `--clients` threads, at most `--max-seconds` long: streaming
and whole replies, n>1, stop strings, raw completions, clients that disconnect mid-stream, slow
readers, oversize bodies, malformed JSON and wrong types. Every request is classified:

    ok            a complete reply: every choice has a finish reason (a stream ends in [DONE])
    rejected      a clean OpenAI error the request deserved (413, 422) or backpressure (429)
    disconnected  the client went away on purpose mid-stream
    failed        anything else: a 5xx, a stream cut short, a reply without its choices

Afterwards the server must be idle (no request still running), answer a request, and hold
its RSS within `--rss-tolerance` of the warm-up figure. Exit status 1 when any of that fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

SRC = Path(__file__).resolve().parents[1] / "src"
KINDS = (
    "chat",
    "chat_stream",
    "chat_n",
    "chat_stop",
    "completion",
    "completion_stream",
    "disconnect",
    "slow_reader",
    "oversize",
    "malformed",
    "wrong_type",
)
EXPECTED_ERRORS = {"oversize": 413, "malformed": 422, "wrong_type": 422}
WORDS = [
    "the",
    "a",
    "dragon",
    "cook",
    "story",
    "river",
    "stone",
    "light",
    "night",
    "tea",
    "song",
    "road",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="Model folder for `corral serve --model`.")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-seconds", type=float, default=300.0)
    parser.add_argument("--max-tokens", type=int, default=16, help="Most tokens per reply.")
    parser.add_argument("--max-concurrency", type=int, default=8)
    parser.add_argument("--max-queue", type=int, default=32)
    parser.add_argument("--request-timeout", type=float, default=120.0)
    parser.add_argument("--warmup", type=int, default=48, help="Requests before the first RSS.")
    parser.add_argument("--rss-tolerance", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="Print the summary as JSON.")
    args = parser.parse_args()
    summary = soak(args)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(markdown(summary))
    return 0 if summary["passed"] else 1


def soak(args: argparse.Namespace) -> dict:
    """Run the soak against a fresh server; return the summary (see `markdown`)."""
    server, url = start_server(args)
    try:
        # the client waits longer than the server's timeout, so a slow reply is the server's 504
        with httpx.Client(base_url=url, timeout=args.request_timeout + 30) as client:
            run_all(client, args.warmup, args, random.Random(args.seed + 1), time.monotonic() + 600)
            wait_idle(client)
            warm_rss = rss_kib(server.pid)
            started = time.monotonic()
            results = run_all(
                client, args.requests, args, random.Random(args.seed), started + args.max_seconds
            )
            elapsed = time.monotonic() - started
            idle = wait_idle(client)
            after_rss = rss_kib(server.pid)
            still_answers = one_reply(client)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    return summarize(results, elapsed, warm_rss, after_rss, idle, still_answers, args)


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    """`corral serve` on a free port, its output in a temporary file; returns once healthy."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    environ = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    command = [sys.executable, "-m", "corral", "serve", "--model", args.model, "--port", str(port)]
    command += ["--max-concurrency", str(args.max_concurrency), "--max-queue", str(args.max_queue)]
    command += ["--request-timeout", str(args.request_timeout)]
    log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - lives as long as the server
    server = subprocess.Popen(command, env=environ, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600  # a loaded machine loads slowly
    while time.monotonic() < deadline:
        if server.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"corral serve exited: {log.read()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return server, url
        time.sleep(0.2)
    server.kill()
    raise RuntimeError("corral serve did not become healthy in 600 s")


def run_all(client: httpx.Client, count: int, args, rng: random.Random, deadline: float) -> list:
    """`count` requests of every kind in turn, from `args.clients` threads, until `deadline`."""
    plans = [(KINDS[i % len(KINDS)], random.Random(rng.random())) for i in range(count)]
    lock = threading.Lock()

    def one(plan: tuple) -> dict | None:
        if time.monotonic() > deadline:
            return None
        kind, own_rng = plan
        started = time.monotonic()
        try:
            outcome, status = send(client, kind, own_rng, args.max_tokens)
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            outcome, status = f"failed: {type(exc).__name__}: {exc}", None
        with lock:
            return {
                "kind": kind,
                "outcome": outcome,
                "status": status,
                "seconds": time.monotonic() - started,
            }

    with ThreadPoolExecutor(args.clients) as pool:
        return [r for r in pool.map(one, plans) if r is not None]


def send(client: httpx.Client, kind: str, rng: random.Random, max_tokens: int) -> tuple:
    """Send one request of `kind`; return (outcome, HTTP status)."""
    if kind in EXPECTED_ERRORS:
        response = client.post("/v1/chat/completions", content=bad_body(kind, rng), headers=JSON)
        return clean_error(response, EXPECTED_ERRORS[kind]), response.status_code
    path = "/v1/completions" if kind.startswith("completion") else "/v1/chat/completions"
    body = request_body(kind, rng, max_tokens)
    if not body.get("stream"):
        response = client.post(path, json=body)
        if response.status_code != 200:
            return clean_error(response, 429), response.status_code
        return whole_reply(response.json(), body.get("n", 1)), 200
    with client.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            response.read()
            return clean_error(response, 429), response.status_code
        return read_stream(response, kind, rng, body.get("n", 1)), 200


JSON = {"content-type": "application/json"}


def request_body(kind: str, rng: random.Random, max_tokens: int) -> dict:
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40)))
    body = {"max_tokens": rng.randint(1, max_tokens), "temperature": rng.choice([0, 0.7, 1.0])}
    if kind.startswith("completion"):
        body["prompt"] = text
    else:
        body["messages"] = [{"role": "user", "content": text}]
    if kind == "chat_n":
        body["n"] = rng.randint(2, 4)
    if kind == "chat_stop":
        body["stop"] = rng.sample(WORDS, 2)
    body["stream"] = kind in ("chat_stream", "completion_stream", "disconnect", "slow_reader")
    if kind in ("disconnect", "slow_reader"):
        body["max_tokens"] = max_tokens
    return body


def bad_body(kind: str, rng: random.Random) -> bytes:
    if kind == "oversize":
        return json.dumps({"messages": [{"role": "user", "content": "x" * (1 << 21)}]}).encode()
    if kind == "malformed":
        good = json.dumps({"messages": [{"role": "user", "content": "hi"}]})
        return good[: rng.randint(1, len(good) - 1)].encode()  # cut anywhere: never valid JSON
    return json.dumps({"messages": "hi", "n": "many", "temperature": [1]}).encode()


def clean_error(response: httpx.Response, expected: int) -> str:
    """'rejected' for the expected status with OpenAI's error JSON, else 'failed: ...'."""
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return f"failed: {response.status_code} without an error object"
    if response.status_code == 429 and not response.headers.get("retry-after"):
        return "failed: 429 without Retry-After"
    if response.status_code in (expected, 429) and error.get("message"):
        return "rejected"
    return f"failed: {response.status_code} {error.get('message', '')[:80]}"


def whole_reply(reply: dict, n: int) -> str:
    choices = reply.get("choices") or []
    finished = [c for c in choices if c.get("finish_reason") in ("stop", "length")]
    if len(choices) != n or len(finished) != n:
        return f"failed: {len(finished)} of {n} choices finished"
    return "ok"


def read_stream(response: httpx.Response, kind: str, rng: random.Random, n: int) -> str:
    """Read server-sent events; a 'disconnect' client leaves after a few, a slow one dawdles."""
    finished: set[int] = set()
    leave_after = rng.randint(1, 3) if kind == "disconnect" else None
    for count, line in enumerate(response.iter_lines()):
        if leave_after is not None and count >= leave_after:
            return "disconnected"  # leaving the `with` closes the connection mid-stream
        if kind == "slow_reader":
            time.sleep(0.02)
        if not line.startswith("data: "):
            continue
        data = line.removeprefix("data: ")
        if data == "[DONE]":
            return "ok" if len(finished) == n else f"failed: {len(finished)} of {n} finished"
        event = json.loads(data)
        if "error" in event:
            return f"failed: error event {event['error'].get('message', '')[:80]}"
        finished |= {c["index"] for c in event["choices"] if c.get("finish_reason")}
    return "disconnected" if leave_after is not None else "failed: stream ended without [DONE]"


def wait_idle(client: httpx.Client, seconds: float = 60) -> bool:
    """Whether /health reports no request running within `seconds` (cancelled ones drain)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if client.get("/health").json()["running"] == 0:
            return True
        time.sleep(0.2)
    return False


def one_reply(client: httpx.Client) -> bool:
    body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, "temperature": 0}
    response = client.post("/v1/chat/completions", json=body)
    return response.status_code == 200 and whole_reply(response.json(), 1) == "ok"


def rss_kib(pid: int) -> int:
    """The process's resident memory in KiB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summarize(results, elapsed, warm_rss, after_rss, idle, still_answers, args) -> dict:
    outcomes = Counter(r["outcome"].split(":")[0] for r in results)
    statuses = Counter(str(r["status"]) for r in results)
    replies = [r["seconds"] for r in results if r["outcome"] == "ok"]
    growth = (after_rss - warm_rss) / warm_rss
    failures = [f"{r['kind']}: {r['outcome']}" for r in results if r["outcome"].startswith("fail")]
    server_errors = sum(n for status, n in statuses.items() if status.startswith("5"))
    summary = {
        "requests": len(results),
        "clients": args.clients,
        "seconds": round(elapsed, 1),
        "outcomes": dict(outcomes),
        "statuses": dict(statuses),
        "server_errors": server_errors,
        "rejected_429": statuses.get("429", 0),
        "p50_s": percentile(replies, 0.5),
        "p99_s": percentile(replies, 0.99),
        "rss_warm_mib": round(warm_rss / 1024, 1),
        "rss_after_mib": round(after_rss / 1024, 1),
        "rss_growth": round(growth, 4),
        "idle_after": idle,
        "still_answers": still_answers,
        "failures": failures[:20],
    }
    summary["passed"] = (
        not failures
        and server_errors == 0
        and idle
        and still_answers
        and growth <= args.rss_tolerance
        and len(results) > 0
    )
    return summary


def markdown(summary: dict) -> str:
    p50 = summary["p50_s"] or 0
    p99 = summary["p99_s"] or 0
    return (
        "| requests | clients | seconds | ok | rejected (429s) | disconnected | failed | 5xx "
        "| p50 | p99 | RSS warm → after |\n|---|---|---|---|---|---|---|---|---|---|---|\n"
        f"| {summary['requests']} | {summary['clients']} | {summary['seconds']} "
        f"| {summary['outcomes'].get('ok', 0)} "
        f"| {summary['outcomes'].get('rejected', 0)} ({summary['rejected_429']}) "
        f"| {summary['outcomes'].get('disconnected', 0)} | {summary['outcomes'].get('failed', 0)} "
        f"| {summary['server_errors']} | {p50:.2f} s | {p99:.2f} s "
        f"| {summary['rss_warm_mib']} → {summary['rss_after_mib']} MiB "
        f"({summary['rss_growth']:+.1%}) |\n"
        f"passed: {summary['passed']}"
        + "".join(f"\n  {failure}" for failure in summary["failures"])
    )


if __name__ == "__main__":
    raise SystemExit(main())
