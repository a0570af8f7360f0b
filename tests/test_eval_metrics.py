"""BLEU-4, ROUGE and exact match against values worked out by hand and by the reference
libraries, in English and Chinese."""

from __future__ import annotations

import math

import pytest

from corral.infer.metrics import (
    bleu4,
    detect_lang,
    exact_match,
    example_scores,
    rouge,
    score_predictions,
)
from corral.utils.errors import CorralError


@pytest.mark.parametrize(
    ("text", "lang"),
    [("the cat sat on the mat", "en"), ("我爱北京天安门，天安门上太阳升。", "zh")],
)
def test_identical_texts_score_100(text, lang):
    scores = example_scores(text, text)
    assert scores["lang"] == lang
    for metric in ("bleu-4", "rouge-1", "rouge-2", "rouge-l", "exact_match"):
        assert scores[metric] == pytest.approx(100.0), metric


@pytest.mark.parametrize(
    ("prediction", "reference"),
    [("a quick brown fox", "the lazy dog sleeps"), ("今天下雨", "我们吃饭")],
)
def test_disjoint_texts_score_0(prediction, reference):
    scores = example_scores(prediction, reference)
    for metric in ("bleu-4", "rouge-1", "rouge-2", "rouge-l", "exact_match"):
        assert scores[metric] == 0.0, metric


def test_english_partial_overlap_by_hand():
    prediction, reference = "the cat is on the mat", "the cat sat on the mat"
    # n-gram precisions: 5/6, 3/5, 1/4, and no 4-gram match: sacreBLEU's "exp" smoothing
    # counts it as 1 / (2 * 3 four-grams). Equal lengths: no brevity penalty.
    expected_bleu = 100 * math.exp(sum(map(math.log, (5 / 6, 3 / 5, 1 / 4, 1 / 6))) / 4)
    assert bleu4(prediction, reference, "en") == pytest.approx(expected_bleu)
    # 5 of 6 words shared, 3 of 5 bigrams, longest common subsequence 5 words.
    assert rouge(prediction, reference, "en") == pytest.approx(
        {"rouge-1": 500 / 6, "rouge-2": 60.0, "rouge-l": 500 / 6}
    )


def test_chinese_partial_overlap_by_hand():
    prediction, reference = "我爱北京", "我爱上海"
    # BLEU is character-level: 2/4 unigrams, 1/3 bigrams, then smoothed 1/(2*2) and 1/(4*1).
    expected_bleu = 100 * (1 / 2 * 1 / 3 * 1 / 4 * 1 / 4) ** 0.25
    assert bleu4(prediction, reference, "zh") == pytest.approx(expected_bleu)
    # ROUGE is on jieba words: 我 / 爱 / 北京 against 我 / 爱 / 上海.
    assert rouge(prediction, reference, "zh") == pytest.approx(
        {"rouge-1": 200 / 3, "rouge-2": 50.0, "rouge-l": 200 / 3}
    )


def test_english_matches_the_reference_libraries():
    import sacrebleu
    from rouge_score import rouge_scorer

    prediction = "I am Corral, an assistant made by the corral team."
    reference = "I'm Corral, an AI assistant built by the corral team to help you."
    expected = sacrebleu.sentence_bleu(prediction, [reference]).score
    assert bleu4(prediction, reference, "en") == pytest.approx(expected)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    ref = scorer.score(reference, prediction)
    assert rouge(prediction, reference, "en") == pytest.approx(
        {
            "rouge-1": 100 * ref["rouge1"].fmeasure,
            "rouge-2": 100 * ref["rouge2"].fmeasure,
            "rouge-l": 100 * ref["rougeL"].fmeasure,
        }
    )


def test_chinese_bleu_is_sacrebleu_zh_and_rouge_scores_jieba_words():
    import jieba
    import sacrebleu
    from rouge_score import rouge_scorer, tokenizers

    prediction, reference = (
        "我是一个人工智能助手，由团队开发。",
        "我是人工智能助手，由Corral团队开发的。",
    )
    expected = sacrebleu.sentence_bleu(prediction, [reference], tokenize="zh").score
    assert bleu4(prediction, reference, "zh") == pytest.approx(expected)

    class Words(tokenizers.Tokenizer):
        def tokenize(self, text):
            return [w for w in jieba.cut(text.lower()) if w.strip()]

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=Words())
    assert rouge(prediction, reference, "zh")["rouge-l"] == pytest.approx(
        100 * scorer.score(reference, prediction)["rougeL"].fmeasure
    )
    assert 0 < rouge(prediction, reference, "zh")["rouge-l"] < 100


def test_language_detection():
    assert detect_lang("Who are you?") == "en"
    assert detect_lang("你是谁？") == "zh"
    assert detect_lang("用 Python 写一个排序函数") == "zh"  # 8 ideographs, 1 Latin word
    assert detect_lang("My name is 李雷 and I like tea") == "en"


def test_exact_match_ignores_surrounding_and_repeated_whitespace():
    assert exact_match("  I am  Corral.\n", "I am Corral.") == 100.0
    assert exact_match("I am Corral", "I am Corral.") == 0.0


def test_score_predictions_averages_examples_and_forced_language():
    scores = score_predictions(["same text", "nothing alike"], ["same text", "other words"])
    assert scores.means["exact_match"] == 50.0
    assert scores.means["rouge-1"] == pytest.approx(50.0)
    forced = score_predictions(["abc"], ["abc"], lang="zh")
    assert forced.per_example[0]["lang"] == "zh"


def test_score_predictions_errors():
    with pytest.raises(CorralError, match="2 predictions for 1 references"):
        score_predictions(["a", "b"], ["a"])
    with pytest.raises(CorralError, match="no predictions"):
        score_predictions([], [])
    with pytest.raises(CorralError, match="lang 'fr' is not one of"):
        example_scores("a", "a", "fr")
