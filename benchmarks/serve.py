"""Benchmark `corral serve` against its raw backends, in one run, printed as ratios.

    python benchmarks/serve.py                       # hf, plus llamacpp when installed
    python benchmarks/serve.py --max-tokens 64 --backends hf

For each backend: time to first token (TTFT) and decode tokens/s of one request, then total
tokens/s of 8 concurrent requests. The raw baseline is the backend called directly in this
process (`model.generate`, `llama_cpp.Llama`), serving 8 requests one after another as a
server without batching would. Goal: the server costs at most 10% over raw at concurrency 1,
and beats it at concurrency 8 through batching. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))
PROMPT = "Write a long story about a dragon who learns to cook."
MESSAGES = [{"role": "user", "content": PROMPT}]


def _prompt_ids() -> list[int]:
    """The chat prompt's ids through corral's template layer (what the server feeds the model)."""
    from corral.data.templates import encode_prompt, get_template
    from corral.model.load import load_tokenizer

    tokenizer = load_tokenizer("default")
    return encode_prompt(get_template(None, tokenizer), tokenizer, MESSAGES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--backends", default="hf,llamacpp")
    args = parser.parse_args()
    for backend in args.backends.split(","):
        if backend not in RAW:
            parser.error(f"unknown backend '{backend}'; this benchmark runs {', '.join(RAW)}")
        if backend == "llamacpp" and not _has_llama_cpp():
            print("llamacpp: skipped (llama-cpp-python is not installed)")
            continue
        raw = RAW[backend](args.max_tokens, args.concurrency)
        served = served_numbers(backend, args.max_tokens, args.concurrency)
        report(backend, raw, served, args.concurrency)


def _has_llama_cpp() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except Exception:
        return False
    return True


def _default_gguf() -> str:
    from corral.model.default import default_gguf_path

    return str(default_gguf_path())


def raw_hf(max_tokens: int, concurrency: int) -> dict:
    """`model.generate` on the default model: TTFT, decode tok/s, serial tok/s."""
    import torch

    from corral.config.fields import ModelConfig
    from corral.infer.engine import ChatEngine

    engine = ChatEngine(ModelConfig())
    ids = torch.tensor([engine.prompt_ids(MESSAGES)])

    def generate(tokens: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            engine.model.generate(
                ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False
            )
        return time.perf_counter() - start

    generate(max_tokens)  # warm-up
    ttft = generate(1)  # prefill and the first token
    total = generate(max_tokens)
    serial = sum(generate(max_tokens) for _ in range(concurrency))
    return {
        "ttft": ttft,
        "decode": (max_tokens - 1) / (total - ttft),
        "concurrent": concurrency * max_tokens / serial,
    }


def raw_llamacpp(max_tokens: int, concurrency: int) -> dict:
    """`llama_cpp.Llama` on the default model's GGUF, same measurements."""
    import llama_cpp

    llm = llama_cpp.Llama(_default_gguf(), n_ctx=0, verbose=False)
    ids = _prompt_ids()

    def one() -> tuple[float, float, int]:
        start, first, count = time.perf_counter(), None, 0
        llm.reset()
        for _ in llm.create_completion(ids, max_tokens=max_tokens, temperature=0, stream=True):
            first = first or time.perf_counter()
            count += 1
        return start, first, count

    return _raw_numbers(one, concurrency)


def _raw_numbers(one, concurrency: int) -> dict:
    one()  # warm-up
    start, first, count = one()
    end = time.perf_counter()
    serial_start = time.perf_counter()
    total = sum(one()[2] for _ in range(concurrency))
    return {
        "ttft": first - start,
        "decode": (count - 1) / (end - first),
        "concurrent": total / (time.perf_counter() - serial_start),
    }


RAW = {"hf": raw_hf, "llamacpp": raw_llamacpp}


def served_numbers(backend: str, max_tokens: int, concurrency: int) -> dict:
    """The same measurements through `corral serve` and the openai client."""
    import openai

    model = [] if backend == "hf" else ["--model", _default_gguf()]
    process, url = _start(["--backend", backend, *model, "--max-concurrency", str(concurrency)])
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        _stream(client, max_tokens)  # warm-up
        start, first, end, count = _stream(client, max_tokens)
        results: list[tuple] = []
        threads = [
            threading.Thread(target=lambda: results.append(_stream(client, max_tokens)))
            for _ in range(concurrency)
        ]
        began = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - began
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
    return {
        "ttft": first - start,
        "decode": (count - 1) / (end - first),
        "concurrent": sum(r[3] for r in results) / wall,
    }


def _stream(client, max_tokens: int) -> tuple[float, float, float, int]:
    start, first = time.perf_counter(), None
    count = 0
    stream = client.chat.completions.create(
        model="m",
        messages=MESSAGES,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter()
        if chunk.usage:
            count = chunk.usage.completion_tokens
    return start, first or time.perf_counter(), time.perf_counter(), count


def _start(args: list[str]) -> tuple[subprocess.Popen, str]:
    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    command = [sys.executable, "-m", "corral", "serve", "--port", str(port), *args]
    process = subprocess.Popen(command, env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if process.poll() is not None:
            raise SystemExit(f"corral serve exited with code {process.returncode} (see above)")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("corral serve did not start")


def report(backend: str, raw: dict, served: dict, concurrency: int) -> None:
    print(f"\n{backend}: served / raw")
    rows = [
        ("time to first token (s)", "ttft"),
        ("decode tok/s, 1 request", "decode"),
        (f"total tok/s, {concurrency} requests", "concurrent"),
    ]
    for label, key in rows:
        ratio = served[key] / raw[key] if raw[key] else float("nan")
        print(f"  {label:<32} {served[key]:8.3f} / {raw[key]:8.3f} = {ratio:5.2f}x")


if __name__ == "__main__":
    main()
