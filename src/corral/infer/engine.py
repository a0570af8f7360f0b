"""The chat engine: a loaded model plus its template, generating replies to conversations.

Every consumer (terminal chat, the API server, evaluation, the stop-rate check after training)
renders conversations through `corral.data.templates`, so a model is always prompted with the
exact token ids it was trained on, and stops on the end-of-turn token it was trained to emit.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from corral.config.fields import GenerationConfig, ModelConfig
from corral.data.templates import (
    Template,
    encode_prompt,
    get_template,
    stop_strings,
    stop_token_ids,
)
from corral.infer.batching import GREEDY_BELOW
from corral.model.load import load_model, resolve_base_for_adapters
from corral.model.reward import check_generator
from corral.utils.errors import CorralError


@dataclass
class Reply:
    """A finished (or interrupted) reply and its token accounting."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end-of-turn), "length" (max_new_tokens) or "interrupted"
    token_ids: list[int] = field(default_factory=list, repr=False)


class ChatEngine:
    """A model, its tokenizer and its chat template, loaded once.

    Args:
        model_config: which model/adapters/template to load; a bare adapter folder brings its
            recorded base model and template.
        generation: default sampling settings; each call may override them.
        model, tokenizer: an already loaded pair (e.g. the model a training run just tuned).
    """

    def __init__(
        self,
        model_config: ModelConfig,
        generation: GenerationConfig | None = None,
        *,
        model: Any = None,
        tokenizer: Any = None,
    ):
        self.model_config = resolve_base_for_adapters(model_config)
        if model is None:
            check_generator(self.model_config)
            model, tokenizer = load_model(self.model_config)
        self.model, self.tokenizer = model, tokenizer
        self.template: Template = get_template(self.model_config.template, tokenizer)
        if self.model_config.default_system is not None:  # for ppl and mc too, not just chat
            self.template = replace(self.template, default_system=self.model_config.default_system)
        self.generation = generation or GenerationConfig()
        self.stop_ids = stop_token_ids(self.template, tokenizer)
        self.stop_texts = stop_strings(self.template, tokenizer)
        self.context_len = getattr(model.config, "max_position_embeddings", None)

    def prompt_ids(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """The ids the model is fed to answer `messages` (system prompt applied), with the
        OpenAI tool definitions `tools` written in by the template."""
        return encode_prompt(
            self.template,
            self.tokenizer,
            messages,
            tools=tools,
            system=self.model_config.default_system,
        )

    def chat(
        self, messages: list[dict], *, tools: list[dict] | None = None, **overrides: Any
    ) -> Reply:
        """Generate a whole reply (see `stream` for the arguments)."""
        pieces = []
        stream = self.stream(messages, tools=tools, **overrides)
        while True:
            try:
                pieces.append(next(stream))
            except StopIteration as stop:
                return stop.value

    def stream(
        self,
        messages: list[dict],
        *,
        tools: list[dict] | None = None,
        stop_event: threading.Event | None = None,
        **overrides: Any,
    ) -> Iterator[str]:
        """Yield the reply's text as it is generated; the generator returns the final `Reply`.

        Args:
            messages: OpenAI-style turns ending with a user (or tool) turn.
            tools: OpenAI tool definitions the model may call (see `parse_reply` for reading
                a call back from the reply).
            stop_event: set it (e.g. on Ctrl-C) to end the reply early.
            **overrides: GenerationConfig fields for this call only.
        """
        import torch
        from transformers import TextIteratorStreamer

        settings = self._settings(overrides)
        prompt = self.prompt_ids(messages, tools)
        self._check_length(len(prompt), settings.max_new_tokens)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop_event = stop_event or threading.Event()
        result: dict[str, Any] = {}
        kwargs = self._generate_kwargs(settings, streamer, stop_event)
        kwargs["input_ids"] = torch.tensor([prompt], device=self.model.device)
        kwargs["attention_mask"] = torch.ones_like(kwargs["input_ids"])

        def work() -> None:
            try:
                with torch.inference_mode():
                    result["ids"] = self.model.generate(**kwargs)[0, len(prompt) :].tolist()
            except BaseException as exc:  # surfaced in the caller's thread below
                result["error"] = exc
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        text, finished = "", False
        try:
            for piece in streamer:
                text += piece
                yield piece
            finished = True
        finally:
            # A consumer that stops early (Ctrl-C, a closed client) must not leave the model
            # running in the thread: an interpreter exiting under it aborts the process.
            if not finished:
                stop_event.set()
            thread.join()
        if "error" in result:
            raise result["error"]
        return self._reply(text, prompt, result["ids"], settings, stop_event.is_set())

    def generate_batch(self, conversations: list[list[dict]], **overrides: Any) -> list[Reply]:
        """Answer several conversations at once (left padding), e.g. for evaluation.

        Args:
            conversations: each a list of OpenAI-style turns ending with a user turn.
            **overrides: GenerationConfig fields for this call only.
        """
        return self.generate_ids(
            [self.prompt_ids(messages) for messages in conversations], **overrides
        )

    def generate_ids(self, prompts: list[list[int]], **overrides: Any) -> list[Reply]:
        """Answer already rendered prompts (e.g. a dataset's, for rollouts) at once.

        Args:
            prompts: token ids, each ending with the template's generation prompt.
            **overrides: GenerationConfig fields for this call only.

        Returns:
            One `Reply` per prompt; its token_ids end with the stop token when it stopped.
        """
        import torch

        settings = self._settings(overrides)
        width = max(len(p) for p in prompts)
        self._check_length(width, settings.max_new_tokens)
        pad = self.pad_id()
        input_ids = torch.tensor(
            [[pad] * (width - len(p)) + p for p in prompts], device=self.model.device
        )
        mask = torch.tensor(
            [[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.model.device
        )
        kwargs = self._generate_kwargs(settings, None, threading.Event())
        kwargs["use_cache"] = True  # a model being trained has its config's cache turned off
        with torch.inference_mode():
            out = self.model.generate(input_ids=input_ids, attention_mask=mask, **kwargs)
        replies = []
        for prompt, row in zip(prompts, out[:, width:].tolist(), strict=True):
            ids = _cut_at_stop(row, self.stop_ids)
            # a row that ended on a stop string is padded after it, not cut by a stop id
            while ids and ids[-1] == pad and pad not in self.stop_ids:
                ids = ids[:-1]
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            replies.append(self._reply(text, prompt, ids, settings, interrupted=False))
        return replies

    def pad_id(self) -> int:
        """The id left padding uses (the tokenizer's pad token, else the first stop id)."""
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.stop_ids[0]

    def _settings(self, overrides: dict[str, Any]) -> GenerationConfig:
        unknown = set(overrides) - set(GenerationConfig.__dataclass_fields__)
        if unknown:
            raise CorralError(f"unknown generation options: {', '.join(sorted(unknown))}")
        values = {
            **self.generation.__dict__,
            **{k: v for k, v in overrides.items() if v is not None},
        }
        return GenerationConfig(**values)

    def _check_length(self, prompt_len: int, max_new_tokens: int) -> None:
        if self.context_len and prompt_len + max_new_tokens > self.context_len:
            raise CorralError(
                f"the conversation is {prompt_len} tokens and max_new_tokens is {max_new_tokens}, "
                f"more than the model's context of {self.context_len} tokens; start a new "
                "conversation or lower max_new_tokens"
            )

    def _generate_kwargs(
        self, settings: GenerationConfig, streamer: Any, stop_event: threading.Event
    ) -> dict:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        class _StopOnEvent(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):  # noqa: ARG002 - transformers API
                return torch.full((input_ids.shape[0],), stop_event.is_set(), dtype=torch.bool)

        kwargs: dict[str, Any] = {
            "max_new_tokens": settings.max_new_tokens,
            "eos_token_id": self.stop_ids,
            "pad_token_id": self.pad_id(),
            "streamer": streamer,
            "stopping_criteria": StoppingCriteriaList([_StopOnEvent()]),
            "repetition_penalty": settings.repetition_penalty,
        }
        if self.stop_texts:
            kwargs.update(stop_strings=self.stop_texts, tokenizer=self.tokenizer)
        if settings.temperature < GREEDY_BELOW:  # as the server samples
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(
                do_sample=True,
                temperature=settings.temperature,
                top_p=settings.top_p,
                top_k=settings.top_k,
            )
            if settings.generation_seed is not None:
                torch.manual_seed(settings.generation_seed)
        return kwargs

    def _reply(
        self,
        text: str,
        prompt: list[int],
        ids: list[int],
        settings: GenerationConfig,
        interrupted: bool,
    ) -> Reply:
        if interrupted:
            reason = "interrupted"
        elif ids and ids[-1] in self.stop_ids:
            reason = "stop"
        elif any(text.endswith(s) for s in self.stop_texts):
            reason = "stop"
            text = text[: -len(next(s for s in self.stop_texts if text.endswith(s)))]
        elif len(ids) >= settings.max_new_tokens:
            reason = "length"
        else:
            reason = "stop"
        return Reply(text, len(prompt), len(ids), reason, ids)


def _cut_at_stop(ids: list[int], stop_ids: list[int]) -> list[int]:
    """Generated ids up to and including the first stop token (batch rows are padded after it)."""
    for index, token in enumerate(ids):
        if token in stop_ids:
            return ids[: index + 1]
    return ids
