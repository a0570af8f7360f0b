"""Continuous token streams for many requests at once: the batched, step-wise decoder.

`ChatEngine.stream` answers one conversation with `model.generate`. A server answers many: the
`BatchScheduler` collects waiting requests (up to `max_batch`), prefills them together (left
padding, attention mask, position ids) and then decodes one token per step for every row from
the shared KV cache, so eight requests cost little more than one. Each row has its own sampling
settings and seeded `torch.Generator`, its own stop ids, stop strings and token budget, and
sends its text to its own sink as it is generated.

    scheduler = BatchScheduler(functools.partial(decode_batch, engine), max_batch=8)
    handle = scheduler.submit(engine.prompt_ids(messages), SamplingParams(max_tokens=64), print)
    handle.cancel()  # e.g. the client went away: the row is dropped at the next step

Greedy rows give the same tokens as `ChatEngine.chat(..., temperature=0)` (a test checks it).
Batches are static: requests that arrive while a batch decodes wait for the next one.
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
        self.sent = 0
        self.finish_reason: str | None = None

    def add(self, token_id: int) -> str:
        """Take one generated id; return the text that can be shown now."""
        self.count += 1
        if token_id in self.stop_ids:
            return self._finish("stop", self.decode(self.ids))
        self.ids.append(token_id)
        text = self.decode(self.ids)
        cut = self._stop_index(text)
        if cut is not None:
            return self._finish("stop", text[:cut])
        if self.count >= self.max_tokens:
            return self._finish("length", text)
        if text.endswith("\ufffd"):
            return ""
        safe = len(text) - self._held_back(text)
        delta = text[self.sent : max(safe, self.sent)]
        self.sent += len(delta)
        return delta

    def _finish(self, reason: str, text: str) -> str:
        self.finish_reason = reason
        delta = text[self.sent :]
        self.sent += len(delta)
        return delta

    def _stop_index(self, text: str) -> int | None:
        start = max(0, self.sent - max((len(s) for s in self.stop_texts), default=0))
        hits = [i for i in (text.find(s, start) for s in self.stop_texts) if i >= 0]
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
    """A thread that decodes waiting requests together, `max_batch` at a time.

    Args:
        decode: runs one batch of handles to the end, sending each its deltas (e.g.
            `functools.partial(decode_batch, engine)`; a backend without batching passes its
            own function and `max_batch=1`).
        max_batch: most requests decoded together.
    """

    def __init__(self, decode: Callable[[list[Handle]], None], max_batch: int = 8):
        self.decode = decode
        self.max_batch = max_batch
        self.waiting: queue.Queue[Handle | None] = queue.Queue()
        self.running: list[Handle] = []
        self._thread = threading.Thread(target=self._loop, name="corral-batcher", daemon=True)
        self._thread.start()

    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: Callable) -> Handle:
        """Queue a request; `sink(Delta)` is called from the scheduler thread as text arrives."""
        handle = Handle(prompt_ids, params, sink)
        self.waiting.put(handle)
        return handle

    def close(self, timeout: float = 10) -> None:
        """Cancel every request (waiting or decoding) and wait for the thread to stop."""
        for handle in self.running:
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
        return self.waiting.qsize() + sum(not h.cancelled.is_set() for h in self.running)

    def _loop(self) -> None:
        while True:
            first = self.waiting.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self.max_batch and not self.waiting.empty():
                item = self.waiting.get_nowait()
                if item is None:
                    self.waiting.put(None)
                    break
                batch.append(item)
            batch = [h for h in batch if not h.cancelled.is_set()]
            if not batch:
                continue
            self.running = batch
            try:
                self.decode(batch)
            except Exception as exc:  # one bad batch must not kill the server
                get_logger().exception("generation failed")
                for handle in batch:
                    handle.sink(exc)
            finally:
                self.running = []


def decode_batch(engine: Any, handles: list[Handle]) -> None:
    """Prefill `handles`' prompts together, then decode one token per step for every live row.

    Rows that finish or are cancelled leave the batch (and the KV cache) at once, so the
    remaining rows run at the speed of a smaller batch.
    """
    import torch

    model, device = engine.model, engine.model.device
    trackers = [_tracker(engine, h.params) for h in handles]
    generators = [_generator(h.params.seed, device) for h in handles]
    ids, mask, positions = _left_padded([h.prompt_ids for h in handles], engine.pad_id(), device)
    active = list(range(len(handles)))  # batch row -> index into handles
    cache: Any = None
    with torch.inference_mode():
        while True:
            out = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
            )
            cache, logits = out.past_key_values, out.logits[:, -1, :]
            chosen = {}
            for row, index in enumerate(active):
                token = _step(handles[index], trackers[index], generators[index], logits[row])
                if token is not None:
                    chosen[row] = token
            if not chosen:
                return
            if len(chosen) < len(active):
                keep = torch.tensor(sorted(chosen), device=device)
                cache.reorder_cache(keep)  # drop finished rows from the KV cache
                mask, positions = mask[keep], positions[keep]
            active = [active[row] for row in sorted(chosen)]
            ids = torch.tensor([chosen[row] for row in sorted(chosen)], device=device)[:, None]
            mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=-1)
            positions = positions[:, -1:] + 1


def _left_padded(prompts: list[list[int]], pad: int, device: Any) -> tuple[Any, Any, Any]:
    """(input_ids, attention_mask, position_ids) for prompts padded on the left to one width."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    # positions count real tokens only, so a padded row sees the positions it would see alone
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


def _step(handle: Handle, tracker: TextTracker, generator: Any, logits: Any) -> int | None:
    """Pick and send one row's next token; None when the row is done or cancelled."""
    if handle.cancelled.is_set():
        return None
    token = pick_token(logits, handle.params, generator, tracker.ids)
    text = tracker.add(token)
    if tracker.finish_reason or text:
        handle.send(Delta(text, tracker.finish_reason, tracker.count))
    return None if tracker.finish_reason else token


def _tracker(engine: Any, params: SamplingParams) -> TextTracker:
    return text_tracker(engine.tokenizer, engine.stop_ids, engine.stop_texts, params)


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
