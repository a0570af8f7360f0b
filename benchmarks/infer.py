"""Benchmark corral's inference against the libraries underneath it, in one run, as ratios.

    python benchmarks/infer.py                       # default model, greedy, 128 new tokens, 3 rounds
    python benchmarks/infer.py --with-llamafactory   # also LLaMA-Factory's API (its benchmark venv)
    python benchmarks/infer.py --model DIR --max-tokens 8 --rounds 1 --clients 1,2   # quick check

Systems, each measured once per round, rounds interleaved (A B C ... A B C ...), medians shown:

- generate: transformers `model.generate` called directly (the raw backend), batch 1;
- engine: `ChatEngine.stream`, what `corral chat` runs, batch 1;
- serve-hf cN: `corral serve` (hf) over HTTP with the openai client, N concurrent clients;
- llamacpp: `llama_cpp.Llama` on the model's GGUF (exported with `corral export`), batch 1;
- serve-llamacpp cN: `corral serve --backend llamacpp` on the same file;
- llamafactory cN: `llamafactory-cli api` (with --with-llamafactory);
- eval bB / eval b1: `corral eval generate`'s path (`evaluate_generation`) on the same prompts
  in left-padded batches of B and one at a time.

Time to first token (TTFT) is when the first text reaches the caller; decode tok/s counts the
tokens after the first over the time after it; aggregate tok/s is every client's completion
tokens over the wall time of the round. Every system answers the same prompt greedily with the
same stop ids, so they generate the same tokens (the tokens column shows it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
sys.path.insert(0, str(SRC))
LF_VENV = ROOT / "benchmarks" / ".llamafactory-venv"
PROMPT = "Write a long story about a dragon who learns to cook."
MESSAGES = [{"role": "user", "content": PROMPT}]


def main() -> None:
    args = _parse()
    if args.threads:  # before torch is imported here, and inherited by every server
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    threads = f"{args.threads} torch threads" if args.threads else "torch's default threads"
    print(f"# {_machine()}; model {args.model}, greedy, {args.max_tokens} new tokens, {threads}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers too
    systems, cleanup = build_systems(args)
    try:
        samples = run_rounds(systems, args.rounds, args.max_tokens)
    finally:
        for close in cleanup:
            close()
    medians = {name: _medians(runs) for name, runs in samples.items()}
    print(table(medians))
    print(ratios(medians, args))
    if args.json:
        Path(args.json).write_text(
            json.dumps({"args": vars(args), "medians": medians}, indent=1, default=str)
        )


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default", help="model_name_or_path (default model)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", default="1,4,8", help="serve-hf concurrencies")
    parser.add_argument("--llamacpp-clients", default="1,8")
    parser.add_argument("--gguf", help="GGUF for llama.cpp (default: corral export --quant q8_0)")
    parser.add_argument("--no-llamacpp", action="store_true")
    parser.add_argument("--eval-prompts", type=int, default=8, help="alpaca_en_demo prompts")
    parser.add_argument("--eval-batch", type=int, default=8)
    parser.add_argument("--with-llamafactory", action="store_true")
    parser.add_argument("--llamafactory-venv", type=Path, default=LF_VENV)
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads in every process (OMP_NUM_THREADS); default: torch's own choice",
    )
    parser.add_argument("--json", help="also write the medians to this file")
    return parser.parse_args()


def _machine() -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{os.cpu_count()} CPUs, load average {load}, {time.strftime('%Y-%m-%d %H:%M UTC')}"


# --- the systems: each is a name and a callable (max new tokens -> one round's measurements) ---


def build_systems(args) -> tuple[dict[str, Callable[[int], dict]], list[Callable]]:
    """Load every system once (models, servers), warm each up, and return them with closers."""
    servers: dict[str, Server] = {}
    gguf = None if args.no_llamacpp else args.gguf or export_gguf(args.model)
    # the servers load while this process loads its own model
    servers["serve-hf"] = Server(
        ["--model", args.model, "--max-concurrency", str(_max(args.clients))]
    )
    if gguf:
        servers["serve-llamacpp"] = Server(["--backend", "llamacpp", "--model", gguf])
    if args.with_llamafactory:
        lf = llamafactory_server(args.llamafactory_venv, args.model, _max(args.clients))
        if lf is not None:
            servers["llamafactory"] = lf
    cleanup = [server.close for server in servers.values()]
    if gguf and not args.gguf:  # the exported file goes with the run
        cleanup.append(lambda: shutil.rmtree(Path(gguf).parent, ignore_errors=True))
    try:
        return _load_systems(args, servers, gguf), cleanup
    except BaseException:
        for close in cleanup:
            close()
        raise


def _load_systems(args, servers: dict, gguf: str | None) -> dict[str, Callable[[int], dict]]:
    from corral.config.fields import GenerationConfig, ModelConfig
    from corral.infer.engine import ChatEngine

    tokens = args.max_tokens
    engine = ChatEngine(
        ModelConfig(model_name_or_path=args.model),
        GenerationConfig(max_new_tokens=tokens, temperature=0.0),
    )
    systems: dict[str, Callable[[int], dict]] = {
        "generate": lambda n: raw_generate(engine, n),
        "engine": lambda n: engine_stream(engine, n),
    }
    if gguf:
        systems["llamacpp"] = llamacpp_direct(gguf, engine.prompt_ids(MESSAGES))
    concurrencies = {
        "serve-hf": _ints(args.clients),
        "serve-llamacpp": _ints(args.llamacpp_clients),
        "llamafactory": [c for c in _ints(args.clients) if c != 4],
    }
    for name, server in servers.items():
        server.wait_ready()
        for clients in concurrencies[name]:
            systems[f"{name} c{clients}"] = _bind(server.round, clients)
    records = eval_records(args.eval_prompts)
    systems[f"eval b{args.eval_batch}"] = lambda n: eval_generate(
        engine, records, args.eval_batch, n
    )
    systems["eval b1"] = lambda n: eval_generate(engine, records, 1, n)
    for run in systems.values():  # warm-up: first calls pay for lazy imports and allocations
        run(min(tokens, 8))
    return systems


def _bind(method, *args) -> Callable[[int], dict]:
    return lambda tokens: method(*args, tokens)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _max(text: str) -> int:
    return max(_ints(text))


class _FirstTokenTimer:
    """A transformers streamer that only notes when tokens arrive (the first `put` is the
    prompt): what any streaming caller of `generate` needs, and nothing more."""

    def __init__(self):
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value) -> None:
        if self.prompt_seen:
            self.times.append(time.perf_counter())
        self.prompt_seen = True

    def end(self) -> None:
        """Nothing to flush: a token's time is taken when it arrives."""


def raw_generate(engine, max_tokens: int) -> dict:
    """`model.generate` on the engine's model and prompt ids, greedy, the same stop ids."""
    import torch

    ids = torch.tensor([engine.prompt_ids(MESSAGES)])
    timer = _FirstTokenTimer()
    start = time.perf_counter()
    with torch.inference_mode():
        out = engine.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_tokens,
            do_sample=False,
            eos_token_id=engine.stop_ids,
            pad_token_id=engine.pad_id(),
            streamer=timer,
        )
    end = time.perf_counter()
    return _one_stream(start, timer.times[0], end, out.shape[1] - ids.shape[1])


def engine_stream(engine, max_tokens: int) -> dict:
    """`ChatEngine.stream` (what `corral chat` prints from), greedy."""
    start, first = time.perf_counter(), None
    stream = engine.stream(MESSAGES, temperature=0.0, max_new_tokens=max_tokens)
    while True:
        try:
            piece = next(stream)
        except StopIteration as stop:
            reply = stop.value
            break
        if piece and first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return _one_stream(start, first or end, end, reply.completion_tokens)


def _one_stream(start: float, first: float, end: float, tokens: int) -> dict:
    return {
        "ttft": first - start,
        "decode": (tokens - 1) / (end - first) if end > first else 0.0,
        "aggregate": tokens / (end - start),
        "tokens": tokens,
    }


def export_gguf(model: str) -> str:
    """The model exported by `corral export` to a q8_0 GGUF (in a temporary folder)."""
    out = Path(tempfile.mkdtemp(prefix="corral-bench-")) / "model.q8_0.gguf"
    command = [sys.executable, "-m", "corral", "export", "--model", model, "--output", str(out)]
    subprocess.run([*command, "--quant", "q8_0"], env=_env(), check=True, capture_output=True)
    return str(out)


def llamacpp_direct(gguf: str, prompt_ids: list[int]) -> Callable[[int], dict]:
    """`llama_cpp.Llama` streaming a completion of the chat prompt's ids, greedy."""
    import llama_cpp

    llm = llama_cpp.Llama(gguf, n_ctx=0, verbose=False)

    def run(max_tokens: int) -> dict:
        start, first, tokens = time.perf_counter(), None, 0
        llm.reset()  # a full prefill, as the server does
        for chunk in llm.create_completion(
            prompt_ids, max_tokens=max_tokens, temperature=0, stream=True
        ):
            first = first or (chunk["choices"][0]["text"] and time.perf_counter())
            tokens += chunk["choices"][0]["finish_reason"] is None  # the last chunk only ends
        end = time.perf_counter()
        return _one_stream(start, first or end, end, tokens)

    return run


class Server:
    """`corral serve` (or any OpenAI-compatible server) in a subprocess, driven by the openai
    client from `clients` threads at once."""

    def __init__(self, args: list[str], command: list[str] | None = None, env: dict | None = None):
        self.port = _free_port()
        self.command = command or [
            sys.executable,
            "-m",
            "corral",
            "serve",
            "--port",
            str(self.port),
        ]
        self.process = subprocess.Popen(
            [*self.command, *args], env={**_env(), "API_PORT": str(self.port), **(env or {})}
        )
        self.client = None
        self.stream_usage = True

    def wait_ready(self) -> None:
        """Block until the server answers (servers start side by side, then each is waited for)."""
        import httpx
        import openai

        url = f"http://127.0.0.1:{self.port}"
        for _ in range(1500):
            if self.process.poll() is not None:
                raise SystemExit(f"{self.command[0]} exited with code {self.process.returncode}")
            try:
                if httpx.get(f"{url}/v1/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            self.close()
            raise SystemExit(f"the server {self.command} did not start")
        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=600)

    def round(self, clients: int, max_tokens: int) -> dict:
        results: list[dict] = []
        threads = [
            threading.Thread(target=lambda: results.append(self.one(max_tokens)))
            for _ in range(clients)
        ]
        began = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - began
        if len(results) != clients:
            raise SystemExit("a request failed (see above)")
        tokens = sum(r["tokens"] for r in results)
        timings = {
            key: statistics.median(r[key] for r in results)
            for key in ("ttft", "decode")
            if key in results[0]
        }
        return {**timings, "aggregate": tokens / wall, "tokens": tokens / clients}

    def one(self, max_tokens: int) -> dict:
        if not self.stream_usage:
            return self._whole(max_tokens)
        start, first, tokens = time.perf_counter(), None, 0
        stream = self.client.chat.completions.create(
            model="m",
            messages=MESSAGES,
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        end = time.perf_counter()
        return _one_stream(start, first or end, end, tokens)

    def _whole(self, max_tokens: int) -> dict:
        """A request without streaming, for a server whose stream reports no token usage (its
        chunks are words, not tokens): no TTFT, only tokens over time."""
        start = time.perf_counter()
        reply = self.client.chat.completions.create(
            model="m", messages=MESSAGES, max_tokens=max_tokens, temperature=0
        )
        tokens = reply.usage.completion_tokens
        return {"aggregate": tokens / (time.perf_counter() - start), "tokens": tokens}

    def close(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def llamafactory_server(venv: Path, model: str, concurrency: int) -> Server | None:
    """`llamafactory-cli api` on the same model folder (hf engine), `MAX_CONCURRENT` requests
    at once; None (and a note) when its benchmark venv is missing."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from train import _llamafactory_ready  # creates the venv as the training benchmark does

    from corral.model.load import resolve_model

    if not _llamafactory_ready(venv):
        print(f"llamafactory: skipped ({venv} could not be created)")
        return None
    args = ["api", "--model_name_or_path", resolve_model(model).path]
    args += ["--template", "smollm2", "--infer_backend", "huggingface"]
    env = {"MAX_CONCURRENT": str(concurrency), "API_HOST": "127.0.0.1"}
    server = Server(args, command=[str(venv / "bin" / "llamafactory-cli")], env=env)
    server.stream_usage = False  # its stream reports no usage: whole replies are timed
    return server


def eval_records(count: int) -> list:
    """The first `count` alpaca_en_demo examples as conversations with a reference reply."""
    from corral.data.records import Record

    rows = json.loads((ROOT / "data" / "alpaca_en_demo.json").read_text())[:count]
    return [
        Record(
            messages=[
                {
                    "role": "user",
                    "content": "\n".join(filter(None, [r["instruction"], r["input"]])),
                },
                {"role": "assistant", "content": r["output"]},
            ],
            source=f"alpaca_en_demo:{i}",
        )
        for i, r in enumerate(rows)
    ]


def eval_generate(engine, records: list, batch_size: int, max_tokens: int) -> dict:
    """`corral eval generate`'s generation and scoring on `records`, `batch_size` at a time."""
    from corral.infer.evaluate import evaluate_generation

    engine.generation = replace(engine.generation, max_new_tokens=max_tokens)
    metrics = evaluate_generation(engine, records, batch_size=batch_size).metrics
    return {
        "examples_s": metrics["examples_per_second"],
        "aggregate": metrics["tokens_per_second"],
        "tokens": metrics["predict_tokens_mean"],
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict:
    path = os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


# --- rounds and the report ---


def run_rounds(
    systems: dict[str, Callable[[int], dict]], rounds: int, tokens: int
) -> dict[str, list[dict]]:
    samples: dict[str, list[dict]] = {name: [] for name in systems}
    for number in range(rounds):
        for name, run in systems.items():
            samples[name].append(run(tokens))
        print(f"# round {number + 1}/{rounds} done", flush=True)
    return samples


def _medians(runs: list[dict]) -> dict:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


COLUMNS = (("ttft", "TTFT s", 3), ("decode", "decode tok/s", 1))
COLUMNS += (("aggregate", "aggregate tok/s", 1), ("examples_s", "examples/s", 2))
COLUMNS += (("tokens", "tokens", 1),)


def table(medians: dict[str, dict]) -> str:
    head = "| system | " + " | ".join(label for _, label, _ in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    for name, values in medians.items():
        cells = [
            f"{values[key]:.{digits}f}" if key in values else "-" for key, _, digits in COLUMNS
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ratios(medians: dict[str, dict], args) -> str:
    """Each target of issue #20 as `value = ratio (target)`."""

    def ratio(a: str, b: str, key: str, target: str) -> str:
        if a not in medians or b not in medians:
            return ""
        x, y = medians[a][key], medians[b][key]
        value = x / y if y else float("nan")
        return f"{a} / {b} {key}: {value:.2f}x (target {target})"

    clients = _ints(args.clients)
    top = f"serve-hf c{max(clients)}"
    lines = [
        ratio("engine", "generate", "ttft", "<= 1.10x"),
        ratio("engine", "generate", "decode", ">= 0.90x"),
        ratio(top, "serve-hf c1", "aggregate", ">= 2.5x"),
        ratio("serve-hf c1", "generate", "aggregate", "-"),
        ratio("serve-llamacpp c1", "llamacpp", "aggregate", ">= 0.90x"),
        ratio("serve-llamacpp c1", "llamacpp", "ttft", "<= 1.10x"),
        ratio(top, f"llamafactory c{max(clients)}", "aggregate", ">= 3x"),
        ratio(f"eval b{args.eval_batch}", "eval b1", "examples_s", "-"),
    ]
    return "\n".join(line for line in lines if line)


if __name__ == "__main__":
    main()
