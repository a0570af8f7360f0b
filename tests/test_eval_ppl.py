"""Perplexity: exp(mean token NLL) computed independently here, response-only masking for
conversations, every token for documents, and the sliding window for long documents."""

from __future__ import annotations

import math

import pytest
import torch

from corral.config.fields import DataConfig
from corral.data.records import Record
from corral.data.templates import encode_turns, get_template
from corral.infer.evaluate import evaluate_perplexity
from corral.infer.perplexity import IGNORE_INDEX, windows
from corral.utils.errors import CorralError, DataError

DOCS = [
    "The sky is blue because air scatters blue light more than red light.",
    "Cows eat grass, and a cow has four stomachs to digest it.",
]
QA = [
    ("What colour is the sky?", "The sky is blue."),
    ("What is two plus two?", "Two plus two is four."),
    ("Name a fruit.", "An apple is a fruit."),
]


def _conversation(question: str, answer: str) -> Record:
    turns = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return Record(messages=turns, source=f"qa:{question}")


def _nll(model, ids: list[int], labels: list[int]) -> tuple[float, int]:
    """Summed NLL of the labelled tokens, from one plain forward pass over the whole sequence."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logprobs = torch.log_softmax(logits, -1)
    total, count = 0.0, 0
    for t in range(1, len(ids)):
        if labels[t] != IGNORE_INDEX:
            total -= float(logprobs[t - 1, ids[t]])
            count += 1
    return total, count


def test_document_perplexity_is_exp_mean_nll_over_every_token(tiny_llama):
    model, tokenizer = tiny_llama
    template = get_template("chatml", tokenizer)
    records = [Record(messages=[], text=doc, source=f"docs:{i}") for i, doc in enumerate(DOCS)]
    run = evaluate_perplexity(model, tokenizer, template, records, DataConfig(cutoff_len=256))

    total, count = 0.0, 0
    for doc in DOCS:
        ids = tokenizer(doc)["input_ids"] + [tokenizer.eos_token_id]
        nll, n = _nll(model, ids, [IGNORE_INDEX, *ids[1:]])
        total, count = total + nll, count + n
    assert (
        run.metrics["scored_tokens"] == count == sum(len(tokenizer(d)["input_ids"]) for d in DOCS)
    )
    assert run.metrics["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)
    assert run.about["scored"] == "every token"


def test_conversation_perplexity_scores_replies_only(tiny_llama):
    model, tokenizer = tiny_llama
    template = get_template("chatml", tokenizer)
    records = [_conversation(q, a) for q, a in QA]
    run = evaluate_perplexity(model, tokenizer, template, records, DataConfig(cutoff_len=256))

    total, count, reply_tokens = 0.0, 0, 0
    for record in records:
        [(prompt, response)] = encode_turns(template, tokenizer, record.to_messages())
        labels = [IGNORE_INDEX] * len(prompt) + response
        nll, n = _nll(model, prompt + response, labels)
        total, count, reply_tokens = total + nll, count + n, reply_tokens + len(response)
    assert run.metrics["scored_tokens"] == count == reply_tokens
    assert run.metrics["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)

    # train_on_prompt (as in training) scores the prompts too: more tokens, another value.
    with_prompt = DataConfig(cutoff_len=256, train_on_prompt=True)
    run_all = evaluate_perplexity(model, tokenizer, template, records, with_prompt)
    assert run_all.metrics["scored_tokens"] > count


def test_sliding_window_scores_each_token_once_with_the_expected_context(tiny_llama):
    model, tokenizer = tiny_llama
    template = get_template("chatml", tokenizer)
    text = " ".join(DOCS)
    ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    window, stride = 8, 4
    assert len(ids) > 3 * window
    records = [Record(messages=[], text=text)]
    run = evaluate_perplexity(model, tokenizer, template, records, DataConfig(cutoff_len=window))

    # Token t is scored in the first window that holds it: windows start every `stride`.
    total = 0.0
    for t in range(1, len(ids)):
        begin = 0 if t < window else math.ceil((t + 1 - window) / stride) * stride
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids[begin : t + 1]])).logits[0, -2].double()
        total -= float(torch.log_softmax(logits, -1)[ids[t]])
    assert run.metrics["scored_tokens"] == len(ids) - 1
    assert run.metrics["perplexity"] == pytest.approx(math.exp(total / (len(ids) - 1)), rel=1e-4)


def test_windows_cover_every_labelled_token_exactly_once():
    ids = list(range(100, 137))
    labels = [IGNORE_INDEX, *ids[1:10], *[IGNORE_INDEX] * 5, *ids[15:]]
    pieces = windows(ids, labels, window=10, stride=3)
    assert all(len(piece_ids) <= 10 for piece_ids, _ in pieces)
    scored = [label for _, piece in pieces for label in piece[1:] if label != IGNORE_INDEX]
    assert sorted(scored) == [label for label in labels if label != IGNORE_INDEX]
    assert all(piece[0] == IGNORE_INDEX for _, piece in pieces)  # nothing to predict it from
    with pytest.raises(CorralError, match="stride must be in"):
        windows(ids, labels, window=10, stride=10)


def test_perplexity_errors(tiny_llama):
    model, tokenizer = tiny_llama
    template = get_template("chatml", tokenizer)
    data = DataConfig(cutoff_len=64)
    with pytest.raises(DataError, match="no examples to evaluate"):
        evaluate_perplexity(model, tokenizer, template, [], data)
    mixed = [Record(messages=[], text="a document"), _conversation(*QA[0])]
    with pytest.raises(DataError, match="one kind at a time"):
        evaluate_perplexity(model, tokenizer, template, mixed, data)
    with pytest.raises(DataError, match="no example could be scored"):
        evaluate_perplexity(model, tokenizer, template, [Record(messages=[], text="  ")], data)
