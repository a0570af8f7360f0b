"""The batched step-wise decoder: greedy rows equal single-request generation, stops, sampling."""

from __future__ import annotations

import functools

import pytest

from corral.config.fields import GenerationConfig, ModelConfig
from corral.infer.batching import (
    BatchScheduler,
    Delta,
    Handle,
    RunningBatch,
    SamplingParams,
    TextTracker,
    decode_batch,
)
from corral.infer.engine import ChatEngine

QUESTIONS = ["Hello there", "What is the capital of France?", "Count to five.", "Hi"]


@pytest.fixture
def engine(tiny_llama):
    model, tokenizer = tiny_llama
    return ChatEngine(ModelConfig(), GenerationConfig(), model=model, tokenizer=tokenizer)


def _run(engine, prompts, params):
    outputs = [[] for _ in prompts]
    handles = [Handle(p, params, outputs[i].append) for i, p in enumerate(prompts)]
    decode_batch(engine, handles)
    return ["".join(d.text for d in out) for out in outputs], [out[-1] for out in outputs]


def test_batched_greedy_rows_equal_generate_one_at_a_time(engine):
    conversations = [[{"role": "user", "content": q}] for q in QUESTIONS]
    prompts = [engine.prompt_ids(c) for c in conversations]
    texts, last = _run(engine, prompts, SamplingParams(max_tokens=12, temperature=0))
    for conversation, text, final in zip(conversations, texts, last, strict=True):
        reply = engine.chat(conversation, temperature=0, max_new_tokens=12)
        assert text == reply.text
        assert final.finish_reason == reply.finish_reason
        assert final.completion_tokens == reply.completion_tokens


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(engine):
    prompt = engine.prompt_ids([{"role": "user", "content": "Tell me a story"}])
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    alone, _ = _run(engine, [prompt], params)
    together, _ = _run(engine, [prompt, prompt[:5], prompt], params)
    assert alone[0] == together[0] == together[2]


def test_text_tracker_holds_back_and_cuts_stop_strings():
    pieces = ["Hel", "lo", " EN", "D", " more"]
    tracker = TextTracker(lambda ids: "".join(pieces[i] for i in ids), [99], ["END"], 10)
    shown = [tracker.add(i) for i in range(4)]
    assert shown == ["Hel", "lo", " ", ""]
    assert tracker.finish_reason == "stop"


def test_text_tracker_budget_and_stop_id():
    tracker = TextTracker(lambda ids: "x" * len(ids), [99], [], 3)
    assert [tracker.add(1), tracker.add(1), tracker.add(1)] == ["x", "x", "x"]
    assert tracker.finish_reason == "length"
    tracker = TextTracker(lambda ids: "x" * len(ids), [99], [], 3)
    assert tracker.add(99) == "" and tracker.finish_reason == "stop" and tracker.count == 1


def test_scheduler_cancelled_request_frees_its_row(engine):
    import threading

    scheduler = BatchScheduler(functools.partial(RunningBatch, engine), max_batch=4)
    done = threading.Event()
    got: list[Delta] = []

    def sink(delta):
        got.append(delta)
        if isinstance(delta, Delta) and delta.finish_reason:
            done.set()

    prompt = engine.prompt_ids([{"role": "user", "content": "Hi"}])
    slow = scheduler.submit(
        prompt, SamplingParams(max_tokens=400, temperature=1.0, seed=1), got.append
    )
    slow.cancel()
    scheduler.submit(prompt, SamplingParams(max_tokens=5, temperature=0), sink)
    assert done.wait(30)
    scheduler.close()


def test_rows_leave_the_batch_when_they_finish(engine):
    """Budgets of 1, 5 and 12 tokens in one batch: each row equals its single-request reply."""
    conversations = [[{"role": "user", "content": q}] for q in QUESTIONS[:3]]
    prompts = [engine.prompt_ids(c) for c in conversations]
    outputs = [[] for _ in prompts]
    budgets = [1, 5, 12]
    handles = [
        Handle(p, SamplingParams(max_tokens=b, temperature=0), outputs[i].append)
        for i, (p, b) in enumerate(zip(prompts, budgets, strict=True))
    ]
    decode_batch(engine, handles)
    for conversation, budget, out in zip(conversations, budgets, outputs, strict=True):
        reply = engine.chat(conversation, temperature=0, max_new_tokens=budget)
        assert "".join(d.text for d in out) == reply.text
        assert out[-1].completion_tokens == reply.completion_tokens


@pytest.mark.parametrize("temperature", [5e-324, 1e-30, 1e-6])
def test_a_tiny_temperature_samples_the_best_token(temperature):
    import torch

    from corral.infer.batching import pick_token

    logits = torch.tensor([1.0, 30.0, -5.0, float("-inf"), 29.9])
    generator = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=1, temperature=temperature, top_p=0.9)
    assert pick_token(logits, params, generator, history=[]) == 1


def _greedy(engine, conversation, budget):
    return engine.chat(conversation, temperature=0, max_new_tokens=budget)


def test_requests_joining_mid_decode_equal_their_single_request_replies(engine):
    """A joins alone; B (a longer prompt than A's cache) joins after 3 steps, so A's cache rows
    are left-padded; C (short) joins after B left. Each reply equals its single-request one,
    and once B has left the cache is trimmed back to the rows' own width."""
    long_question = "Please explain, step by step and with examples, " * 4 + "what a cache is."
    conversations = {
        "A": [{"role": "user", "content": "Hello there"}],
        "B": [{"role": "user", "content": long_question}],
        "C": [{"role": "user", "content": "Hi"}],
    }
    budgets = {"A": 40, "B": 6, "C": 12}
    outputs = {name: [] for name in conversations}
    handles = {
        name: Handle(
            engine.prompt_ids(conversation),
            SamplingParams(max_tokens=budgets[name], temperature=0),
            outputs[name].append,
        )
        for name, conversation in conversations.items()
    }
    assert len(handles["B"].prompt_ids) > len(handles["A"].prompt_ids) + 3
    batch = RunningBatch(engine)
    batch.admit([handles["A"]])
    for _ in range(3):
        batch.step()
    batch.admit([handles["B"]])
    assert batch.cache.get_seq_length() == len(handles["B"].prompt_ids)
    while handles["B"] in batch.handles:
        batch.step()
    a_fed = len(handles["A"].prompt_ids) + outputs["A"][-1].completion_tokens - 1
    assert batch.cache.get_seq_length() == batch.mask.shape[-1] - 1 == a_fed, "not trimmed"
    batch.admit([handles["C"]])
    while batch.handles:
        batch.step()
    for name, conversation in conversations.items():
        reply = _greedy(engine, conversation, budgets[name])
        assert "".join(d.text for d in outputs[name]) == reply.text, name
        assert outputs[name][-1].finish_reason == reply.finish_reason, name
        assert outputs[name][-1].completion_tokens == reply.completion_tokens, name


def test_a_newcomer_streams_before_a_long_request_finishes(engine):
    """Continuous batching: a short request sent while a long one decodes gets its first token
    (and its whole reply) before the long one ends, and both equal their greedy replies."""
    import threading

    scheduler = BatchScheduler(functools.partial(RunningBatch, engine), max_batch=4)
    long_chat = [{"role": "user", "content": "Hello there"}]
    short_chat = [{"role": "user", "content": "Count to five."}]
    long_out: list[Delta] = []
    short_out: list[Delta] = []
    long_started, short_done = threading.Event(), threading.Event()
    long_finished_at_first_short_token: list[bool] = []

    def long_sink(delta):
        long_out.append(delta)
        long_started.set()

    def short_sink(delta):
        if not short_out:
            long_finished_at_first_short_token.append(long_handle.finished)
        short_out.append(delta)
        if delta.finish_reason:
            short_done.set()

    greedy = functools.partial(SamplingParams, temperature=0)
    long_handle = scheduler.submit(engine.prompt_ids(long_chat), greedy(max_tokens=300), long_sink)
    assert long_started.wait(30)
    scheduler.submit(engine.prompt_ids(short_chat), greedy(max_tokens=8), short_sink)
    assert short_done.wait(60)
    assert long_finished_at_first_short_token == [False]
    assert not long_handle.finished, "the short reply waited for the long one"
    long_handle.cancel()
    scheduler.close()
    assert "".join(d.text for d in short_out) == _greedy(engine, short_chat, 8).text
    long_text = "".join(d.text for d in long_out)
    assert _greedy(engine, long_chat, 300).text.startswith(long_text)


MIXED_TEXT = (
    "Grüße aus Köln! 你好，世界。今天的天气很好，我们去公园散步吧。"
    " Emoji: 🙂🚀👩‍💻 — naïve café, 日本語のテキスト, Ελληνικά, עברית.\n"
)


def test_text_tracker_decodes_a_window_and_equals_a_one_shot_decode(smol_tokenizer):
    """A long multilingual reply (many multi-byte characters split across byte tokens) streams
    to exactly its one-shot decode, and no step decodes more than a few ids."""
    from corral.infer.batching import text_tracker

    ids = smol_tokenizer(MIXED_TEXT * 40, add_special_tokens=False)["input_ids"]
    assert len(ids) > 1000
    windows: list[int] = []

    class CountingTokenizer:
        def decode(self, window, skip_special_tokens):
            windows.append(len(window))
            return smol_tokenizer.decode(window, skip_special_tokens=skip_special_tokens)

    params = SamplingParams(max_tokens=len(ids))
    tracker = text_tracker(CountingTokenizer(), [], [], params)
    deltas = [tracker.add(token) for token in ids]
    assert "".join(deltas) == smol_tokenizer.decode(ids) == MIXED_TEXT * 40
    assert tracker.finish_reason == "length"
    assert any(d == "" for d in deltas[:-1]), "incomplete characters should be held back"
    assert not any("\ufffd" in d for d in deltas)
    assert max(windows) <= 8, f"a step decoded {max(windows)} ids"


def test_text_tracker_cuts_a_multibyte_stop_string(smol_tokenizer):
    from corral.infer.batching import text_tracker

    ids = smol_tokenizer(MIXED_TEXT * 3, add_special_tokens=False)["input_ids"]
    params = SamplingParams(max_tokens=len(ids), stop=("天气",))
    tracker = text_tracker(smol_tokenizer, [], [], params)
    shown = ""
    for token in ids:
        shown += tracker.add(token)
        if tracker.finish_reason:
            break
    assert shown == MIXED_TEXT[: MIXED_TEXT.index("天气")]
    assert tracker.finish_reason == "stop"
