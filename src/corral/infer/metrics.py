"""Scores of generated text against references: BLEU-4, ROUGE-1/2/L F1 and exact match.

    scores = score_predictions(["I am Corral."], ["I am Corral, an AI assistant."])
    scores.means["bleu-4"], scores.per_example[0]["rouge-l"], scores.per_example[0]["lang"]

Every score is in [0, 100], computed per example and averaged over the examples (as
LLaMA-Factory's `ComputeSimilarity` does), so a report can point at the examples that score low.

- BLEU-4 is sacreBLEU's sentence BLEU with its default sentence settings: exponential smoothing
  (`smooth_method="exp"`) and effective order, so short replies are not scored 0 for lacking
  4-grams. English text is tokenised with sacreBLEU's standard "13a" tokenizer; Chinese with its
  "zh" tokenizer, which splits every CJK ideograph into its own token (character-level BLEU).
  Characters, not jieba words, because that is sacreBLEU's convention for Chinese (the WMT
  one): it needs no segmentation dictionary, so the score does not change with jieba's version
  or a user dictionary, and it is comparable with published Chinese BLEU.
- ROUGE is `rouge-score`'s F1 without stemming. English uses its tokenizer (lower-cased
  alphanumeric words); Chinese is first cut into words with `jieba` and the words are scored,
  as `rouge-chinese` does (rouge-score's own tokenizer would drop every Chinese character).
- Exact match is 100 when prediction and reference are equal after trimming and collapsing
  whitespace, else 0.

The language is detected per example from the reference (`detect_lang`) unless it is given.

Replies whose reference is a tool call are also scored as calls (`score_tool_calls`), as
fractions of those examples: `tool_call_parse_rate` (the template read a well-formed call in the
reply), `tool_name_accuracy` (the same functions, in order) and `tool_arguments_exact` (the same
functions with JSON-equal arguments: `{"a": 1, "b": 2}` equals `{"b":2,"a":1}`).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from typing import Any

from corral.utils.errors import CorralError, MissingDependencyError

METRICS = ("bleu-4", "rouge-1", "rouge-2", "rouge-l", "exact_match")
LANGS = ("auto", "en", "zh")
# tool-call metric (a fraction of the tool-call examples) -> the per-example flag it averages
TOOL_METRICS = {
    "tool_call_parse_rate": "tool_call_parsed",
    "tool_name_accuracy": "tool_name_match",
    "tool_arguments_exact": "tool_arguments_exact",
}

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff]")
_LATIN_WORD = re.compile(r"[A-Za-z]+")


@dataclass
class Scores:
    """Per-example scores and their means.

    Attributes:
        means: metric name -> mean over the examples (0 to 100).
        per_example: one dict per example: each metric, and "lang" ("en" or "zh").
    """

    means: dict[str, float] = field(default_factory=dict)
    per_example: list[dict] = field(default_factory=list)


def detect_lang(text: str) -> str:
    """'zh' when CJK ideographs outnumber Latin words in `text`, else 'en'.

    A Chinese character carries about as much as an English word, so comparing the two counts
    classifies mixed text ("用 Python 写一个函数") by what most of it is.
    """
    return "zh" if len(_CJK.findall(text)) > len(_LATIN_WORD.findall(text)) else "en"


def bleu4(prediction: str, reference: str, lang: str) -> float:
    """Smoothed sentence BLEU-4 in [0, 100] (see the module docstring for the settings)."""
    if not prediction.strip() or not reference.strip():
        return 100.0 if prediction.strip() == reference.strip() else 0.0
    return _bleu(lang).sentence_score(prediction, [reference]).score


def rouge(prediction: str, reference: str, lang: str) -> dict[str, float]:
    """ROUGE-1, ROUGE-2 and ROUGE-L F1 in [0, 100], keyed "rouge-1", "rouge-2", "rouge-l"."""
    scores = _rouge_scorer(lang).score(reference, prediction)
    return {
        "rouge-1": scores["rouge1"].fmeasure * 100,
        "rouge-2": scores["rouge2"].fmeasure * 100,
        "rouge-l": scores["rougeL"].fmeasure * 100,
    }


def exact_match(prediction: str, reference: str) -> float:
    """100.0 when the texts are equal up to surrounding and repeated whitespace, else 0.0."""
    return 100.0 if prediction.split() == reference.split() else 0.0


def example_scores(prediction: str, reference: str, lang: str = "auto") -> dict:
    """Every metric for one example, and the language it was scored as."""
    if lang not in LANGS:
        raise CorralError(f"lang '{lang}' is not one of: {', '.join(LANGS)}")
    if lang == "auto":
        lang = detect_lang(reference or prediction)
    return {
        "bleu-4": bleu4(prediction, reference, lang),
        **rouge(prediction, reference, lang),
        "exact_match": exact_match(prediction, reference),
        "lang": lang,
    }


def score_predictions(predictions: list[str], references: list[str], lang: str = "auto") -> Scores:
    """Score predictions against references, example by example, and average.

    Args:
        predictions: generated texts.
        references: the expected texts, in the same order.
        lang: "auto" (detect per example), "en" or "zh".

    Raises:
        CorralError: when the lists differ in length or are empty.
    """
    if len(predictions) != len(references):
        raise CorralError(
            f"{len(predictions)} predictions for {len(references)} references; they must pair up"
        )
    if not predictions:
        raise CorralError("no predictions to score")
    per_example = [example_scores(p, r, lang) for p, r in zip(predictions, references, strict=True)]
    means = {m: sum(e[m] for e in per_example) / len(per_example) for m in METRICS}
    return Scores(means, per_example)


def score_tool_calls(predicted: list[list], expected: list[list[dict]]) -> Scores:
    """Score the calls read in replies against the reference calls, example by example.

    Args:
        predicted: per example, the calls the template read in the reply (objects with `name`
            and `arguments`, the JSON text of an object); [] when it read none.
        expected: per example, the reference calls as `{"name", "arguments"}` dicts, arguments
            an object or its JSON text.

    Returns:
        Scores whose per-example dicts hold `tool_call_parsed`, `tool_name_match` and
        `tool_arguments_exact` (booleans) and whose means are the `TOOL_METRICS` (fractions).
    """
    per_example = []
    for calls, reference in zip(predicted, expected, strict=True):
        names = [call.name for call in calls] == [ref["name"] for ref in reference]
        arguments = names and all(
            _json_value(call.arguments) == _json_value(ref["arguments"])
            for call, ref in zip(calls, reference, strict=True)
        )
        per_example.append(
            {
                "tool_call_parsed": bool(calls),
                "tool_name_match": names,
                "tool_arguments_exact": arguments,
            }
        )
    count = max(len(per_example), 1)
    means = {name: sum(e[flag] for e in per_example) / count for name, flag in TOOL_METRICS.items()}
    return Scores(means, per_example)


def _json_value(arguments: Any) -> Any:
    """Arguments as a JSON value: text is parsed (and kept as text when it is not JSON)."""
    if not isinstance(arguments, str):
        return arguments
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments


def _require(module: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(
            f"'{package}' is not installed; it is needed to score generated text. Install it "
            "with: pip install 'corral[eval]'"
        ) from None


@functools.cache
def _bleu(lang: str):
    bleu = _require("sacrebleu.metrics", "sacrebleu")
    return bleu.BLEU(
        tokenize="zh" if lang == "zh" else "13a", smooth_method="exp", effective_order=True
    )


class _JiebaTokenizer:
    """rouge-score tokenizer interface over jieba's word segmentation."""

    def tokenize(self, text: str) -> list[str]:
        jieba = _jieba()
        return [word for word in jieba.cut(text.lower()) if word.strip()]


@functools.cache
def _jieba():
    import logging

    jieba = _require("jieba", "jieba")
    jieba.setLogLevel(logging.WARNING)  # it logs dictionary loading on first use
    return jieba


@functools.cache
def _rouge_scorer(lang: str):
    scorer = _require("rouge_score.rouge_scorer", "rouge-score")
    tokenizer = _JiebaTokenizer() if lang == "zh" else None
    return scorer.RougeScorer(
        ["rouge1", "rouge2", "rougeL"], use_stemmer=False, tokenizer=tokenizer
    )
