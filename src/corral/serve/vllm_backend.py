"""The `vllm` backend: vLLM's `AsyncLLMEngine` (GPU only) behind corral's `Backend` interface.

    backend = VLLMBackend(ModelConfig(model_name_or_path="exports/sft"), max_concurrency=64)

vLLM schedules and batches the requests itself; this module only translates. Its engine runs
on an asyncio loop in a thread of its own; `submit` schedules one coroutine there per request,
which feeds the new token ids of each vLLM output (`RequestOutputKind.DELTA`) through the
same `TextTracker` as the other backends, so stop strings, held-back text and token counts
behave alike. Prompts are token ids rendered by corral's template layer (`TokensPrompt`).

Not run on a GPU: corral's tests drive this glue with a fake `vllm` module (they check every
sampling parameter and the delta / finish-reason handling), not with vLLM itself.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import uuid
from collections.abc import Callable
from typing import Any

from corral.config.fields import ModelConfig
from corral.infer.batching import (
    GREEDY_BELOW,
    Delta,
    Handle,
    SamplingParams,
    send_token,
    text_tracker,
)
from corral.serve.backends import Backend
from corral.utils.errors import CorralError


class VLLMBackend(Backend):
    """A base model folder (or hub id) served by vLLM; adapters must be merged first."""

    name = "vllm"

    def __init__(self, model_config: ModelConfig, max_concurrency: int):
        from corral.data.templates import get_template
        from corral.model.load import load_tokenizer
        from corral.utils.deps import require

        self.vllm = require("vllm")
        import torch

        if not torch.cuda.is_available():
            raise CorralError(
                "--backend vllm needs a CUDA GPU and none is visible; use --backend hf"
            )
        path = _model_path(model_config)
        tokenizer = load_tokenizer(model_config)
        super().__init__(
            tokenizer, get_template(model_config.template, tokenizer), model_config.default_system
        )
        args = self.vllm.AsyncEngineArgs(
            model=path,
            max_num_seqs=max_concurrency,
            trust_remote_code=model_config.trust_remote_code,
            dtype=model_config.dtype,
        )
        self.live: set[Handle] = set()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="corral-vllm", daemon=True
        )
        self._thread.start()
        self.engine = self._run(self._start(args)).result()
        self.context_len = self.engine.model_config.max_model_len

    async def _start(self, args: Any) -> Any:
        # built on its loop: the engine's client binds its sockets to the running loop
        return self.vllm.AsyncLLMEngine.from_engine_args(args)

    def _run(self, coroutine: Any) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: Callable) -> Handle:
        """Start generating on vLLM's loop; `sink` receives `Delta`s (or an exception)."""
        handle = _FutureHandle(prompt_ids, params, sink)
        self.live.add(handle)
        handle.future = self._run(self._generate(handle))
        return handle

    def load(self) -> int:
        """Requests submitted and not yet finished or cancelled."""
        return sum(not h.finished and not h.cancelled.is_set() for h in list(self.live))

    def close(self) -> None:
        """Cancel every request, shut the engine down and stop its loop."""
        for handle in list(self.live):
            handle.cancel()
        self.engine.shutdown()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    def sampling_params(self, params: SamplingParams) -> Any:
        """vLLM's `SamplingParams` for one request (one choice: the API submits n requests)."""
        from vllm.sampling_params import RequestOutputKind

        return self.vllm.SamplingParams(
            n=1,
            max_tokens=params.max_tokens,
            # below GREEDY_BELOW corral samples greedily; vLLM's greedy is temperature 0
            temperature=0.0 if params.temperature < GREEDY_BELOW else params.temperature,
            top_p=params.top_p,
            top_k=params.top_k or -1,  # "no top-k": corral's 0, vLLM's -1
            seed=params.seed,
            stop=[*self.stop_texts, *params.stop],
            stop_token_ids=list(self.stop_ids),
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
            output_kind=RequestOutputKind.DELTA,  # each output carries only the new token ids
        )

    async def _generate(self, handle: Handle) -> None:
        """Stream one request's deltas to its sink; cancelling this task aborts it in vLLM."""
        params = handle.params
        tracker = text_tracker(self.tokenizer, self.stop_ids, self.stop_texts, params)
        prompt = self.vllm.TokensPrompt(prompt_token_ids=handle.prompt_ids)
        stream = self.engine.generate(prompt, self.sampling_params(params), uuid.uuid4().hex)
        reason = "stop"
        try:
            async for output in stream:
                completion = output.outputs[0]
                for token in completion.token_ids:
                    if not send_token(handle, tracker, int(token)):
                        return
                reason = "length" if completion.finish_reason == "length" else "stop"
            # vLLM stopped where the tracker did not (e.g. on the model's own eos token)
            handle.send(Delta(tracker.end(reason), reason, tracker.count))
        except Exception as exc:  # reported to the request's client, not the loop
            handle.sink(exc)
        finally:
            await stream.aclose()  # a stream left early (stop string, cancel) aborts the request
            self.live.discard(handle)


class _FutureHandle(Handle):
    """A request running as a task on vLLM's loop: cancelling it cancels the task."""

    future: concurrent.futures.Future | None = None

    def cancel(self) -> None:
        super().cancel()
        if self.future is not None:
            self.future.cancel()


def _model_path(model_config: ModelConfig) -> str:
    """The folder or hub id vLLM loads for `model_config`."""
    from corral.model.default import default_model_dir
    from corral.model.load import resolve_model

    if model_config.adapter_name_or_path:
        raise CorralError(
            "--backend vllm serves a whole model, not adapters; merge them first with "
            "`corral export --adapter ... --output exports/merged` and serve that folder"
        )
    source = resolve_model(model_config.model_name_or_path)
    if source.kind == "gguf":
        raise CorralError("--backend vllm does not read .gguf files; use --backend llamacpp")
    return str(default_model_dir()) if source.kind == "default" else source.path
