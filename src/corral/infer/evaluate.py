"""Evaluate a loaded model on records: generation metrics and perplexity, written as files.

`corral eval generate` / `corral eval ppl` and evaluation at the end of training
(`do_predict` / `do_eval`) share these functions. They live in the inference layer because
train and eval are sibling packages that may not import each other.

    run = evaluate_generation(engine, records, batch_size=8)
    run = evaluate_perplexity(model, tokenizer, template, records, data_config)
    write_run("saves/eval/base", run)   # predictions.jsonl, metrics.json, report.md

Generation is greedy unless the engine's generation settings say otherwise; prompts are
rendered through the model's chat template exactly as in training (`ChatEngine.prompt_ids`),
with each record's tool definitions. A record whose reference reply is a tool call (a
`function_call` turn, as glaive-style sharegpt data holds them) is also scored as a call: the
template parses the reply and `tool_call_parse_rate`, `tool_name_accuracy` and
`tool_arguments_exact` are averaged over those records.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.config.fields import DataConfig
from corral.data.processors import PROCESSORS
from corral.data.records import Record
from corral.data.templates import Template
from corral.infer.engine import ChatEngine
from corral.infer.metrics import score_predictions, score_tool_calls
from corral.infer.perplexity import perplexity
from corral.utils.errors import CorralError, DataError
from corral.utils.log import get_logger

PREDICTIONS_FILE = "predictions.jsonl"
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"


@dataclass
class EvalRun:
    """One evaluation: what was measured, the numbers, and (for generation) every prediction.

    Attributes:
        kind: "generate", "ppl", "mc" or "pref".
        about: what was evaluated (model, adapter, dataset, split, settings), for the report.
        metrics: metric name -> value (flat, so runs compare key by key).
        predictions: one dict per example (generate: prompt, reference, prediction, scores;
            pref: the pair, both rewards, the margin).
        tables: extra Markdown sections for the report: title -> table.
    """

    kind: str
    about: dict[str, Any]
    metrics: dict[str, float]
    predictions: list[dict] = field(default_factory=list)
    tables: dict[str, str] = field(default_factory=dict)


def conversation_prompts(records: list[Record]) -> tuple[list[list[dict]], list[str]]:
    """The prompt turns and reference reply of each record (its last assistant message, or
    the JSON text of the tool call it ends with).

    Raises:
        DataError: for an empty list, or a record that is not a conversation ending in a reply.
    """
    if not records:
        raise DataError("the dataset has no examples to evaluate")
    prompts, references = [], []
    for record in records:
        if record.kind != "conversation" or not record.messages:
            raise DataError(
                f"{record.source}: generation needs conversations (prompt and reply), but this "
                f"example holds {record.kind} data; measure documents with `corral eval ppl`"
            )
        messages = record.to_messages()
        if messages[-1]["role"] not in ("assistant", "function_call"):
            raise DataError(
                f"{record.source}: the conversation does not end with a reply or a tool call"
            )
        prompts.append(messages[:-1])
        references.append(messages[-1]["content"])
    return prompts, references


def evaluate_generation(
    engine: ChatEngine,
    records: list[Record],
    *,
    batch_size: int,
    lang: str = "auto",
    about: dict[str, Any] | None = None,
) -> EvalRun:
    """Answer every record's prompt in batches and score the answers against its reply.

    Args:
        engine: the model, template and generation settings.
        records: conversations; the last assistant message is the reference.
        batch_size: prompts generated together (left-padded).
        lang: "auto", "en" or "zh" (see `corral.infer.metrics`).
        about: facts for the report (model, dataset, ...).
    """
    prompts, references = conversation_prompts(records)
    expected = [reference_calls(record) for record in records]
    started = time.perf_counter()
    prompt_ids = [engine.prompt_ids(p, r.tools) for p, r in zip(prompts, records, strict=True)]
    replies = _generate_sorted(engine, prompt_ids, batch_size)
    seconds = time.perf_counter() - started
    scores = score_predictions([r.text for r in replies], references, lang)
    call_metrics, call_rows = _score_calls(engine.template, replies, expected)
    predictions = [
        {
            "prompt": turns[-1]["content"] if turns else "",
            "messages": turns,  # the whole conversation the model answered (system, history)
            "reference": reference,
            "prediction": reply.text,
            "source": record.source,
            "finish_reason": reply.finish_reason,
            "completion_tokens": reply.completion_tokens,
            **{k: round(v, 4) if isinstance(v, float) else v for k, v in example.items()},
            **calls,
        }
        for record, turns, reference, reply, example, calls in zip(
            records, prompts, references, replies, scores.per_example, call_rows, strict=True
        )
    ]
    tokens = sum(r.completion_tokens for r in replies)
    metrics = {
        **scores.means,
        **call_metrics,
        "predict_tokens_mean": tokens / len(replies),
        "predict_chars_mean": sum(len(r.text) for r in replies) / len(replies),
        "stop_rate": sum(r.finish_reason == "stop" for r in replies) / len(replies),
        "examples": len(replies),
        "seconds": seconds,
        "examples_per_second": len(replies) / seconds,
        "tokens_per_second": tokens / seconds,
    }
    settings = dataclasses.asdict(engine.generation)
    about = {
        **(about or {}),
        "template": engine.template.name,
        "batch_size": batch_size,
        **settings,
    }
    return EvalRun("generate", about, metrics, predictions)


def reference_calls(record: Record) -> list[dict] | None:
    """The calls (`{"name", "arguments"}`) a record's final turn makes; None for a text reply.

    Raises:
        DataError: the final turn is a `function_call` that is not a well-formed call.
    """
    from corral.data.templates import chat_messages

    last = record.messages[-1]
    if last["role"] != "function_call":
        return None
    try:
        (turn,) = chat_messages([last])
    except CorralError as exc:
        raise DataError(f"{record.source}: {exc}") from exc
    return [call["function"] for call in turn["tool_calls"]]


def _score_calls(
    template: Template, replies: list, expected: list[list[dict] | None]
) -> tuple[dict[str, float], list[dict]]:
    """Tool-call metrics over the records whose reference is a call ({} when none is), and
    per record what the prediction called and how it scored ({} for text references)."""
    from corral.data.templates import parse_reply

    rows: list[dict] = [{} for _ in replies]
    tool_rows = [i for i, calls in enumerate(expected) if calls is not None]
    if not tool_rows:
        return {}, rows
    predicted = [parse_reply(template, replies[i].text)[1] for i in tool_rows]
    scores = score_tool_calls(predicted, [expected[i] for i in tool_rows])
    for i, calls, example in zip(tool_rows, predicted, scores.per_example, strict=True):
        called = [{"name": c.name, "arguments": c.arguments} for c in calls]
        rows[i] = {"reference_calls": expected[i], "predicted_calls": called, **example}
    return {**scores.means, "tool_call_examples": len(tool_rows)}, rows


def _generate_sorted(engine: ChatEngine, prompts: list[list[int]], batch_size: int) -> list:
    """Replies in input order, generated in batches of similar prompt length (less padding)."""
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    replies: list[Any] = [None] * len(prompts)
    log = get_logger()
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        for index, reply in zip(
            chunk, engine.generate_ids([prompts[i] for i in chunk]), strict=True
        ):
            replies[index] = reply
        log.info(f"generated {min(start + batch_size, len(order))}/{len(order)}")
    return replies


def evaluate_perplexity(
    model: Any,
    tokenizer: Any,
    template: Template,
    records: list[Record],
    data: DataConfig,
    *,
    batch_size: int = 4,
    about: dict[str, Any] | None = None,
) -> EvalRun:
    """Perplexity with the training masking: every token of documents, replies of conversations.

    Records are encoded by the training processor for their kind without truncation (the
    sliding window replaces it); the window is cutoff_len, at most the model's context.

    Raises:
        DataError: for no records, documents mixed with conversations, or nothing to score.
    """
    if not records:
        raise DataError("the dataset has no examples to evaluate")
    kinds = {r.kind for r in records}
    if not kinds <= {"text", "conversation"} or len(kinds) > 1:
        raise DataError(
            f"perplexity needs documents (pt) or conversations (sft), one kind at a time; the "
            f"records hold {', '.join(sorted(kinds))}"
        )
    kind = "lm" if kinds == {"text"} else "conversation"
    uncut = dataclasses.replace(data, cutoff_len=10**9, packing=False)
    encoded = PROCESSORS[kind].encode(records, tokenizer, template, uncut)
    sequences = [
        (ids, labels) for e in encoded for ids, labels in zip(e.input_ids, e.labels, strict=True)
    ]
    if not sequences:
        reasons = sorted({e.status for e in encoded})
        raise DataError(f"no example could be scored ({'; '.join(reasons)})")
    context = getattr(model.config, "max_position_embeddings", None) or data.cutoff_len
    window = min(data.cutoff_len, context)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    result = perplexity(model, sequences, window=window, pad_id=pad, batch_size=batch_size)
    metrics = {
        "perplexity": result.perplexity,
        "nll_mean": result.nll_sum / result.tokens,
        "scored_tokens": result.tokens,
        "examples": len(sequences),
        "skipped_examples": len(records) - sum(1 for e in encoded if e.input_ids),
        "seconds": result.seconds,
        "tokens_per_second": result.tokens / result.seconds,
    }
    scored = "every token" if kind == "lm" else "assistant replies only"
    about = {**(about or {}), "scored": scored, "window": window, "stride": max(window // 2, 1)}
    return EvalRun("ppl", about, metrics)


def write_run(folder: str | Path, run: EvalRun) -> Path:
    """Write metrics.json, report.md and (generation) predictions.jsonl into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if run.predictions:
        with open(folder / PREDICTIONS_FILE, "w", encoding="utf-8") as f:
            for row in run.predictions:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    content = {"kind": run.kind, "about": run.about, "metrics": run.metrics}
    (folder / METRICS_FILE).write_text(
        json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (folder / REPORT_FILE).write_text(report_markdown(run), encoding="utf-8")
    return folder


def report_markdown(run: EvalRun, *, examples: bool = True) -> str:
    """The human-readable report: what was evaluated, the metrics, extra tables and (with
    `examples`) the generated replies that scored lowest."""
    titles = {
        "generate": "Generation",
        "ppl": "Perplexity",
        "mc": "Multiple choice",
        "pref": "Preference",
    }
    lines = [f"# {titles.get(run.kind, run.kind)} evaluation", "", "| setting | value |"]
    lines += ["|---|---|"] + [f"| {k} | {_cell(v)} |" for k, v in run.about.items()]
    lines += ["", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {format_value(v)} |" for k, v in run.metrics.items()]
    for title, table in run.tables.items():
        lines += ["", f"## {title}", "", table]
    if examples and run.kind == "generate" and run.predictions:
        lines += ["", "## Lowest-scoring examples (ROUGE-L)", ""]
        worst = sorted(run.predictions, key=lambda p: p["rouge-l"])[:5]
        for p in worst:
            lines += [
                f"- **{p['source']}** (ROUGE-L {p['rouge-l']:.1f})",
                f"  - prompt: {_cell(p['prompt'])}",
                f"  - reference: {_cell(p['reference'])}",
                f"  - prediction: {_cell(p['prediction'])}",
            ]
    return "\n".join(lines) + "\n"


def format_value(value: Any) -> str:
    """Numbers as a table shows them: integers plain, floats with 2 to 4 decimals."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return _cell(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4f}" if abs(value) < 1 else f"{value:.2f}"


def _cell(value: Any) -> str:
    text = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")
