"""Continuous token streams for many requests at once: the batched, step-wise decoder.

`ChatEngine.stream` answers one conversation with `model.generate`. A server answers many: the
`BatchScheduler` thread keeps a `RunningBatch` of up to `max_batch` requests and decodes one
token per step for every row from the shared KV cache, so eight requests cost little more than
one. Between steps it admits waiting requests: they are prefilled together (left padding,
attention mask, position ids) and their cache rows join the running ones (continuous
batching), so a newcomer does not wait for a long reply to finish. Each row has its own
sampling settings and seeded `torch.Generator`, its own stop ids, stop strings and token
budget, and sends its text to its own sink as it is generated.

    scheduler = BatchScheduler(functools.partial(RunningBatch, engine), max_batch=8)
    handle = scheduler.submit(engine.prompt_ids(messages), SamplingParams(max_tokens=64), print)
    handle.cancel()  # e.g. the client went away: the row is dropped at the next step

Greedy rows give the same tokens as `ChatEngine.chat(..., temperature=0)` (tests check it,
for requests that start together and for one that joins mid-decode).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from corral.utils.log import get_logger


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings (OpenAI's names; temperature 0 is greedy)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


@dataclass(frozen=True)
class Delta:
    """New text of one request; the last one has `finish_reason` set ("stop" or "length")."""

    text: str
    finish_reason: str | None = None
    completion_tokens: int = 0


class TextTracker:
    """Turns generated ids into text deltas, stopping on stop ids, stop strings or the budget.

    Text that could be the start of a stop string is held back until it is known not to be one,
    so a stop string never reaches the client. Incomplete UTF-8 is held back the same way.

    Each step decodes only a short window of ids (the prefix-offset technique of vLLM and
    TGI), so a step costs the same at token 10 and at token 10,000.

    Args:
        decode: ids -> text (special tokens skipped).
        stop_ids: ids that end the reply (they are counted but not shown).
        stop_texts: strings that end the reply (cut before them).
        max_tokens: the token budget; reaching it finishes with "length".
    """

    def __init__(
        self,
        decode: Callable[[list[int]], str],
        stop_ids: Iterable[int],
        stop_texts: Iterable[str],
        max_tokens: int,
    ):
        self.decode = decode
        self.stop_ids = set(stop_ids)
        self.stop_texts = [s for s in stop_texts if s]
        self.max_tokens = max_tokens
        self.ids: list[int] = []
        self.count = 0
        self.unsent = ""  # decoded text not shown yet (a possible stop string's start)
        # ids[prefix:read] were decoded already and give the context (e.g. a leading space)
        # that ids[read:] are decoded in
        self.prefix = self.read = 0
        self.finish_reason: str | None = None

    def add(self, token_id: int) -> str:
        """Take one generated id; return the text that can be shown now."""
        self.count += 1
        if token_id in self.stop_ids:
            return self.end("stop")
        self.ids.append(token_id)
        self.unsent += self._decode_new(final=False)
        cut = self._stop_index(self.unsent)
        if cut is not None:
            self.unsent = self.unsent[:cut]
            return self.end("stop", flush=False)
        if self.count >= self.max_tokens:
            return self.end("length")
        safe = len(self.unsent) - self._held_back(self.unsent)
        delta, self.unsent = self.unsent[:safe], self.unsent[safe:]
        return delta

    def _decode_new(self, final: bool) -> str:
        """The text `ids[read:]` add after `ids[prefix:read]`; "" while it ends in an incomplete
        UTF-8 character (U+FFFD), unless `final`."""
        before = self.decode(self.ids[self.prefix : self.read])
        after = self.decode(self.ids[self.prefix :])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before) :]

    def end(self, reason: str, flush: bool = True) -> str:
        """Finish with `reason`; return the text not shown yet (held-back text included, and
        with `flush` the rest of the ids, incomplete characters and all)."""
        text = self.unsent + (self._decode_new(final=True) if flush else "")
        self.finish_reason, self.unsent = reason, ""
        return text

    def _stop_index(self, text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in self.stop_texts) if i >= 0]
        return min(hits) if hits else None

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of `text` that starts some stop string."""
        longest = 0
        for stop in self.stop_texts:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if stop.startswith(text[-size:]):
                    longest = size
                    break
        return longest


GREEDY_BELOW = 1e-5


def pick_token(logits: Any, params: SamplingParams, generator: Any, history: list[int]) -> int:
    """Choose the next id from one row's logits (penalties, temperature, top-k, top-p).

    Args:
        logits: float tensor of shape (vocab,).
        params: the row's sampling settings.
        generator: the row's torch.Generator (seeded when the request gave a seed).
        history: ids generated so far (for presence/frequency penalties).
    """
    import torch

    logits = logits.float()
    if history and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(history), minlength=logits.shape[-1]).to(logits)
        logits = logits - params.presence_penalty * (counts > 0) - params.frequency_penalty * counts
    # below 1e-5 (as vLLM does) sampling is greedy: dividing by a tiny temperature such as
    # 5e-324 (valid JSON, 0 in float32) would overflow the logits and make softmax NaN
    if params.temperature < GREEDY_BELOW:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1])).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        ordered, order = torch.sort(logits, descending=True)
        mass = torch.softmax(ordered, -1).cumsum(-1)
        drop = mass - torch.softmax(ordered, -1) > params.top_p  # keep the token crossing top_p
        logits = logits.index_put((order[drop],), torch.tensor(float("-inf")))
    probs = torch.softmax(logits, -1)
    return int(torch.multinomial(probs, 1, generator=generator))


class Handle:
    """One submitted request: `cancel()` drops it from its batch at the next step."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, sink: Callable):
        self.prompt_ids = prompt_ids
        self.params = params
        self.sink = sink
        self.cancelled = threading.Event()
        self.finished = False

    def send(self, delta: Delta) -> None:
        """Pass `delta` to the sink; the one with a finish reason marks the request finished."""
        self.finished = delta.finish_reason is not None
        self.sink(delta)

    def cancel(self) -> None:
        """Stop generating for this request (its sink gets nothing more)."""
        self.cancelled.set()


class BatchScheduler:
    """A thread that keeps up to `max_batch` requests decoding, admitting newcomers between steps.

    Args:
        new_batch: makes an empty running batch: an object with `handles`, `can_admit()`,
            `admit(handles)` and `step()`, e.g. `functools.partial(RunningBatch, engine)` (a
            backend without batching passes its own, with `max_batch=1`).
        max_batch: most requests decoded together.
    """

    def __init__(self, new_batch: Callable[[], Any], max_batch: int = 8):
        self.new_batch = new_batch
        self.max_batch = max_batch
        self.waiting: queue.Queue[Handle | None] = queue.Queue()
        self.batch = new_batch()
        self.admitting: list[Handle] = []
        self._thread = threading.Thread(target=self._loop, name="corral-batcher", daemon=True)
        self._thread.start()

    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: Callable) -> Handle:
        """Queue a request; `sink(Delta)` is called from the scheduler thread as text arrives."""
        handle = Handle(prompt_ids, params, sink)
        self.waiting.put(handle)
        return handle

    def close(self, timeout: float = 10) -> None:
        """Cancel every request (waiting or decoding) and wait for the thread to stop."""
        for handle in [*self.batch.handles, *self.admitting]:
            handle.cancel()
        while not self.waiting.empty():
            item = self.waiting.get_nowait()
            if item is not None:
                item.cancel()
        self.waiting.put(None)
        # joined, not left to die at exit: a daemon thread inside torch at exit can abort
        self._thread.join(timeout)

    def load(self) -> int:
        """Requests waiting or being decoded."""
        live = [*self.batch.handles, *self.admitting]
        return self.waiting.qsize() + sum(not h.cancelled.is_set() for h in live)

    def _loop(self) -> None:
        while True:
            live = len(self.batch.handles)
            room = self.max_batch - live if self.batch.can_admit() else 0
            newcomers = self._take(room, wait=live == 0)
            if newcomers is None:
                return
            self.admitting = newcomers
            try:
                if newcomers:
                    self.batch.admit(newcomers)
                self.admitting = []
                if self.batch.handles:
                    self.batch.step()
            except Exception as exc:  # one bad batch must not kill the server
                get_logger().exception("generation failed")
                for handle in {*self.batch.handles, *self.admitting}:
                    handle.sink(exc)
                self.batch, self.admitting = self.new_batch(), []

    def _take(self, room: int, wait: bool) -> list[Handle] | None:
        """Up to `room` waiting requests (blocking for the first when `wait`); None on close."""
        taken: list[Handle | None] = [self.waiting.get()] if wait else []
        while len(taken) < room and not self.waiting.empty():
            taken.append(self.waiting.get_nowait())
        if None in taken:
            return None
        return [h for h in taken if h is not None and not h.cancelled.is_set()]


@dataclass
class _Row:
    """One request in a running batch: where its text goes and how it samples."""

    handle: Handle
    tracker: TextTracker
    generator: Any


class RunningBatch:
    """The requests decoding together, with their shared KV cache.

    Between forward passes the state is: `cache` (width W), `mask` (rows, W + 1: the cached
    columns plus the token about to be fed), `positions` (rows, 1) and `ids` (rows, 1), the
    token each row feeds next. Rows keep their own positions, so a row sees exactly the
    positions it would see alone, however much left padding the batch gives it.

    Greedy rows give the same tokens as `ChatEngine.chat(..., temperature=0)`.

    Args:
        engine: a `ChatEngine` (its model, tokenizer and stops).
    """

    def __init__(self, engine: Any):
        self.engine = engine
        self.rows: list[_Row] = []
        self.cache: Any = None
        self.ids = self.mask = self.positions = None

    @property
    def handles(self) -> list[Handle]:
        """The requests still decoding."""
        return [row.handle for row in self.rows]

    def admit(self, handles: list[Handle]) -> None:
        """Prefill `handles` together (each gets its first token), then join them to the batch.

        Call it only when `can_admit()`.
        """
        newcomers = RunningBatch(self.engine)
        newcomers.rows = [_new_row(self.engine, h) for h in handles]
        device = self.engine.model.device
        prompts = [h.prompt_ids for h in handles]
        newcomers.ids, newcomers.mask, newcomers.positions = _left_padded(
            prompts, self.engine.pad_id(), device
        )
        newcomers.step()
        self._join(newcomers)

    def can_admit(self) -> bool:
        """Whether newcomers may join now: a cache with sliding-window layers cannot be joined,
        so such a model admits newcomers only once the running rows are done."""
        return not self.rows or _joinable(self.cache)

    def step(self) -> None:
        """Feed every row its next token and pick the one after (rows that finish leave)."""
        import torch

        with torch.inference_mode():
            out = self.engine.model(
                input_ids=self.ids,
                attention_mask=self.mask,
                position_ids=self.positions,
                past_key_values=self.cache,
                use_cache=True,
            )
        self.cache = out.past_key_values
        self._advance(out.logits[:, -1, :])

    def _advance(self, logits: Any) -> None:
        """Pick each row's next token; drop finished or cancelled rows from every tensor."""
        import torch

        chosen = {}
        for index, row in enumerate(self.rows):
            token = _pick_and_send(row, logits[index])
            if token is not None:
                chosen[index] = token
        if not chosen:
            self.rows, self.cache = [], None
            self.ids = self.mask = self.positions = None
            return
        keep = sorted(chosen)
        if len(keep) < len(self.rows):
            index = torch.tensor(keep, device=self.mask.device)
            self.cache.reorder_cache(index)  # drop finished rows from the KV cache
            self.mask, self.positions = self.mask[index], self.positions[index]
            self.rows = [self.rows[i] for i in keep]
        self.ids = torch.tensor([chosen[i] for i in keep], device=self.mask.device)[:, None]
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(keep), 1))], dim=-1)
        self.positions = self.positions[:, -1:] + 1
        self._trim_padding()

    def _join(self, other: RunningBatch) -> None:
        """Append `other`'s rows (same state: fed up to their next token) to this batch."""
        import torch

        if not other.rows:
            return
        if not self.rows:
            self.rows, self.cache = other.rows, other.cache
            self.ids, self.mask, self.positions = other.ids, other.mask, other.positions
            return
        join_caches(self.cache, other.cache)
        width = max(self.mask.shape[-1], other.mask.shape[-1])
        self.mask = torch.cat([_left_pad(self.mask, width), _left_pad(other.mask, width)])
        self.ids = torch.cat([self.ids, other.ids])
        self.positions = torch.cat([self.positions, other.positions])
        self.rows = self.rows + other.rows

    def _trim_padding(self) -> None:
        """Drop leading cache columns that are padding in every row (the cache stays bounded
        by the longest live row, not by the longest row that ever joined)."""
        if not _joinable(self.cache):
            return
        shared = int(self.mask.any(dim=0).int().argmax())  # first column some row attends to
        if shared:
            self.mask = self.mask[:, shared:]
            for layer in self.cache.layers:
                layer.keys = layer.keys[:, :, shared:]
                layer.values = layer.values[:, :, shared:]


def join_caches(cache: Any, other: Any) -> None:
    """Append `other`'s rows to `cache` (both `DynamicCache`s), in place.

    The narrower cache is left-padded with zeros along the sequence axis so both have one
    width; the padding is masked out by the attention mask (zero there), so it changes no
    output. transformers (>= 4.56) keeps each layer's tensors in `cache.layers[i].keys` and
    `.values`, shaped (batch, kv_heads, seq, head_dim).
    """
    import torch

    width = max(cache.get_seq_length(), other.get_seq_length())
    for mine, theirs in zip(cache.layers, other.layers, strict=True):
        mine.keys = torch.cat([_left_pad(mine.keys, width, -2), _left_pad(theirs.keys, width, -2)])
        mine.values = torch.cat(
            [_left_pad(mine.values, width, -2), _left_pad(theirs.values, width, -2)]
        )


def _joinable(cache: Any) -> bool:
    """Whether `cache`'s layers are plain growing layers (a sliding window keeps its own count
    of seen tokens, which joining or trimming would break)."""
    layers = getattr(cache, "layers", None)
    return layers is not None and not any(getattr(layer, "is_sliding", False) for layer in layers)


def _left_pad(tensor: Any, width: int, dim: int = -1) -> Any:
    """`tensor` with zeros prepended along `dim` up to `width`."""
    import torch

    missing = width - tensor.shape[dim]
    if not missing:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def decode_batch(engine: Any, handles: list[Handle]) -> None:
    """Decode `handles` together to the end (no newcomers): what a static batch does."""
    batch = RunningBatch(engine)
    batch.admit(handles)
    while batch.rows:
        batch.step()


def _left_padded(prompts: list[list[int]], pad: int, device: Any) -> tuple[Any, Any, Any]:
    """(input_ids, attention_mask, position_ids) for prompts padded on the left to one width."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    # positions count real tokens only, so a padded row sees the positions it would see alone
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


def _pick_and_send(row: _Row, logits: Any) -> int | None:
    """Pick and send one row's next token; None when the row is done or cancelled."""
    if row.handle.cancelled.is_set():
        return None
    token = pick_token(logits, row.handle.params, row.generator, row.tracker.ids)
    return token if send_token(row.handle, row.tracker, token) else None


def send_token(handle: Handle, tracker: TextTracker, token: int) -> bool:
    """Add `token` to the request's text and send what can be shown; False once it finished."""
    text = tracker.add(token)
    if tracker.finish_reason or text:
        handle.send(Delta(text, tracker.finish_reason, tracker.count))
    return tracker.finish_reason is None


def _new_row(engine: Any, handle: Handle) -> _Row:
    params = handle.params
    tracker = text_tracker(engine.tokenizer, engine.stop_ids, engine.stop_texts, params)
    return _Row(handle, tracker, _generator(params.seed, engine.model.device))


def text_tracker(
    tokenizer: Any, stop_ids: list[int], stop_texts: list[str], params: SamplingParams
) -> TextTracker:
    """A `TextTracker` decoding with a Hugging Face tokenizer, the request's stops added."""

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    return TextTracker(decode, stop_ids, [*stop_texts, *params.stop], params.max_tokens)


def _generator(seed: int | None, device: Any) -> Any:
    import torch

    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator
