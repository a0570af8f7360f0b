"""The server's backends behind one small interface: `hf` (default), `llamacpp`, `vllm`.

A backend turns a conversation or a raw prompt into token ids (through corral's template
layer, so a tuned model is served with the template it was trained with), and streams
`Delta`s for submitted requests to a sink, from its own thread:

    backend = load_backend("hf", model_config, max_concurrency=8)
    ids = backend.chat_ids([{"role": "user", "content": "Hi"}])
    handle = backend.submit(ids, SamplingParams(max_tokens=32, temperature=0), sink)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from corral.config.fields import ModelConfig
from corral.infer.batching import (
    BatchScheduler,
    Handle,
    RunningBatch,
    SamplingParams,
    send_token,
    text_tracker,
)
from corral.model.reward import check_generator
from corral.utils.errors import CorralError

BACKENDS = ("hf", "llamacpp", "vllm")


class Backend:
    """What the API needs from a backend.

    Attributes:
        name: "hf", "llamacpp" or "vllm".
        context_len: the model's context in tokens (None when unknown).
        supports_penalties: whether presence/frequency penalties are applied.
    """

    name = "backend"
    context_len: int | None = None
    supports_penalties = True

    def __init__(self, tokenizer: Any, template: Any, system: str | None):
        from corral.data.templates import stop_strings, stop_token_ids

        self.tokenizer, self.template, self.system = tokenizer, template, system
        self.stop_ids = stop_token_ids(template, tokenizer)
        self.stop_texts = stop_strings(template, tokenizer)

    def chat_ids(
        self, messages: list[dict], tools: list[dict] | None = None, prefill: str = ""
    ) -> list[int]:
        """The prompt ids for a conversation, rendered by corral's template layer.

        Args:
            messages: OpenAI-shaped turns (tool calls and tool results included).
            tools: OpenAI tool definitions the template writes into the prompt.
            prefill: text the reply is made to start with (e.g. a forced tool call's opening);
                tokenized with the prompt, as training tokenizes a whole conversation.

        Raises:
            CorralError: the template cannot render the conversation or the tools.
        """
        from corral.data.templates import render, tokenize

        text = render(
            self.template,
            self.tokenizer,
            messages,
            add_generation_prompt=True,
            tools=tools,
            system=self.system,
        )
        return tokenize(self.tokenizer, text + prefill)[0]

    def text_ids(self, prompt: str) -> list[int]:
        """The ids of a raw completion prompt (the tokenizer's usual special tokens added)."""
        return self.tokenizer(prompt)["input_ids"]

    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: Callable) -> Handle:
        """Start generating; `sink` receives `Delta`s (or an exception) from another thread."""
        return self.scheduler.submit(prompt_ids, params, sink)

    def load(self) -> int:
        """Requests waiting or being generated."""
        return self.scheduler.load()

    def close(self) -> None:
        """Cancel waiting requests and stop the worker thread."""
        self.scheduler.close()


class HFBackend(Backend):
    """transformers: `ChatEngine`'s model, decoded by `BatchScheduler` (continuous batching)."""

    name = "hf"

    def __init__(self, model_config: ModelConfig, max_concurrency: int):
        from corral.infer.engine import ChatEngine

        self.engine = ChatEngine(model_config)
        super().__init__(
            self.engine.tokenizer, self.engine.template, self.engine.model_config.default_system
        )
        self.context_len = self.engine.context_len
        self.scheduler = BatchScheduler(
            functools.partial(RunningBatch, self.engine), max_batch=max_concurrency
        )


class LlamaCppBackend(Backend):
    """A GGUF file through llama-cpp-python (one request at a time: llama.cpp's CPU path)."""

    name = "llamacpp"

    def __init__(self, model_config: ModelConfig, max_concurrency: int):  # noqa: ARG002
        from corral.data.templates import get_template
        from corral.utils.deps import require

        if model_config.adapter_name_or_path:
            raise CorralError(
                "--backend llamacpp serves one .gguf file and cannot add adapters: merge them "
                "first (corral export --adapter A --output model.gguf), then --model model.gguf"
            )
        path = Path(model_config.model_name_or_path)
        if path.suffix != ".gguf" or not path.is_file():
            raise CorralError(
                f"--backend llamacpp needs a .gguf file as --model; got "
                f"'{model_config.model_name_or_path}' (export one with corral export --format gguf)"
            )
        llama_cpp = require("llama_cpp")
        tokenizer = _gguf_tokenizer(path)
        template = get_template(model_config.template, tokenizer)
        super().__init__(tokenizer, template, model_config.default_system)
        self.llm = llama_cpp.Llama(str(path), n_ctx=0, verbose=False, logits_all=False)
        self.context_len = self.llm.n_ctx()
        self.scheduler = BatchScheduler(functools.partial(_LlamaCppRun, self), max_batch=1)


class _LlamaCppRun:
    """The scheduler's running batch for llama.cpp: one request, one token per `step()`."""

    def __init__(self, backend: LlamaCppBackend):
        self.backend = backend
        self.handles: list[Handle] = []
        self.tracker: Any = None
        self.tokens: Any = None

    def can_admit(self) -> bool:
        return not self.handles

    def admit(self, handles: list[Handle]) -> None:
        (handle,) = handles
        backend, params = self.backend, handle.params
        self.tracker = text_tracker(backend.tokenizer, backend.stop_ids, backend.stop_texts, params)
        if params.seed is not None:
            backend.llm.set_seed(params.seed)
        # a full prefill every time: reusing a cached prefix changes the numerics, and so
        # greedy replies would depend on the previous request
        backend.llm.reset()
        self.tokens = backend.llm.generate(
            handle.prompt_ids,
            top_k=params.top_k,
            top_p=params.top_p,
            min_p=0.0,
            temp=params.temperature,
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
        )
        self.handles = [handle]

    def step(self) -> None:
        handle = self.handles[0]
        going = not handle.cancelled.is_set() and send_token(
            handle, self.tracker, int(next(self.tokens))
        )
        if not going:
            self.handles, self.tokens = [], None


def _gguf_tokenizer(path: Path) -> Any:
    """The Hugging Face tokenizer stored in a GGUF file (same ids as llama.cpp's)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _vllm_backend(model_config: ModelConfig, max_concurrency: int) -> Backend:
    from corral.serve.vllm_backend import VLLMBackend  # imports vllm only when chosen

    return VLLMBackend(model_config, max_concurrency)


def load_backend(name: str, model_config: ModelConfig, max_concurrency: int) -> Backend:
    """Build the backend called `name` for `model_config`.

    Raises:
        CorralError: unknown backend, missing optional dependency, or an unusable model.
    """
    factories = {"hf": HFBackend, "llamacpp": LlamaCppBackend, "vllm": _vllm_backend}
    if name not in factories:
        raise CorralError(f"unknown backend '{name}'; choose one of: {', '.join(BACKENDS)}")
    check_generator(model_config)  # before any backend loads it: a reward model cannot chat
    return factories[name](model_config, max_concurrency)
