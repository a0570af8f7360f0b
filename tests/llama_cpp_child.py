"""llama.cpp in a child process, so that a native crash there is one failed test with its
stderr, not a dead test run (a segfault takes its whole process down, pytest included).

    tokens = llama_cpp_call(gguf, "greedy", prompts=[ids, ...], n=32)  # in a test
    python tests/llama_cpp_child.py REQUEST.json RESPONSE.json          # what the call runs

Operations: "greedy" (n greedy tokens per prompt, EOS does not stop it), "logits" (every
position's logits for `tokens`, computed with an f32 KV cache, as llama.cpp's default f16 one
rounds), "tokenize" (each text's ids without BOS; special=true parses special tokens).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


def llama_cpp_call(gguf: Path, op: str, timeout: float = 900, **args: Any) -> Any:
    """Run `op` on `gguf` in a fresh Python process and return its JSON result.

    Raises:
        pytest.fail: the child died (a signal or an exception), with its stderr.
    """
    import pytest

    with tempfile.TemporaryDirectory() as tmp:
        request, response = Path(tmp) / "request.json", Path(tmp) / "response.json"
        request.write_text(json.dumps({"gguf": str(gguf), "op": op, **args}))
        command = [sys.executable, "-X", "faulthandler", __file__, str(request), str(response)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            how = f"signal {-done.returncode}" if done.returncode < 0 else f"exit {done.returncode}"
            pytest.fail(
                f"llama.cpp's child process died ({how}) running {op} on {gguf}:\n"
                f"{done.stderr[-6000:]}",
                pytrace=False,
            )
        return json.loads(response.read_text())


def _greedy(llm: Any, prompt_ids: list[int], n: int) -> list[int]:
    tokens = []
    for token in llm.generate(prompt_ids, temp=0.0, top_k=1, reset=True):
        tokens.append(int(token))
        if len(tokens) == n:
            break
    return tokens


def _run(request: dict) -> Any:
    import llama_cpp

    op = request["op"]
    options: dict[str, Any] = {"n_ctx": request.get("n_ctx", 512), "verbose": False}
    if op == "logits":
        f32 = llama_cpp.GGML_TYPE_F32
        options.update(logits_all=True, type_k=f32, type_v=f32)
    llm = llama_cpp.Llama(request["gguf"], n_threads=2, **options)
    try:
        if op == "greedy":
            return [_greedy(llm, ids, request["n"]) for ids in request["prompts"]]
        if op == "logits":
            llm.eval(request["tokens"])
            return llm.scores[: len(request["tokens"])].tolist()
        if op == "tokenize":
            special = request.get("special", False)  # parse special tokens written in the text
            return [
                llm.tokenize(text.encode(), add_bos=False, special=special)
                for text in request["texts"]
            ]
        raise ValueError(f"unknown operation {op!r}")
    finally:
        llm.close()


if __name__ == "__main__":
    request_file, response_file = sys.argv[1:3]
    result = _run(json.loads(Path(request_file).read_text()))
    Path(response_file).write_text(json.dumps(result))
