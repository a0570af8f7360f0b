"""Multiple choice on the shipped sample benchmark: the exact few-shot layout, a model rigged
to answer a known letter, the cached few-shot prefix, and errors naming file:line."""

from __future__ import annotations

import csv
import shutil

import pytest
import torch

from corral.config.fields import ModelConfig
from corral.data.templates import get_template, render
from corral.eval.mc import (
    CHOICES,
    SAMPLE_DIR,
    build_messages,
    choose_letters,
    evaluate_mc,
    load_subjects,
    prompt_ids,
    read_questions,
)
from corral.infer.engine import ChatEngine
from corral.utils.errors import DataError

SUBJECTS = ["chinese_history", "chinese_primary_math", "elementary_mathematics", "world_geography"]


def _answers(subject: str, split: str = "test") -> list[str]:
    """The answer column read straight from the sample CSV (header rows skipped)."""
    with open(SAMPLE_DIR / split / f"{subject}_{split}.csv", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    return [row[-1] for row in rows if row[-1] != "answer"]


@pytest.fixture
def engine(tiny_llama, tiny_llama_dir):
    model, tokenizer = tiny_llama
    config = ModelConfig(model_name_or_path=str(tiny_llama_dir), template="chatml", device="cpu")
    return ChatEngine(config, model=model, tokenizer=tokenizer)


def test_sample_task_dir_has_english_and_chinese_subjects_in_both_layouts():
    subjects = load_subjects(SAMPLE_DIR, "test", None)
    assert [s.name for s in subjects] == SUBJECTS
    for s in subjects:
        assert len(s.dev) == 5 and len(s.questions) == 8
        assert [q.answer for q in s.questions] == _answers(s.name)
    history = subjects[0]
    assert history.title == "中国历史" and history.category == "Humanities"
    assert history.questions[0].where.endswith("chinese_history_test.csv:2")  # after the header
    assert len(load_subjects(SAMPLE_DIR, "val", ["world_geography"])[0].questions) == 4


def test_few_shot_prompt_layout_is_exact(smol_tokenizer):
    [subject] = load_subjects(SAMPLE_DIR, "test", ["elementary_mathematics"])
    messages = build_messages(subject, subject.questions[0], n_shot=2, lang="en")
    assert messages == [
        {
            "role": "user",
            "content": "The following are multiple choice questions (with answers) about "
            "elementary mathematics.\n\nWhat is 7 + 5?\nA. 10\nB. 11\nC. 12\nD. 13\nAnswer:",
        },
        {"role": "assistant", "content": "C"},
        {"role": "user", "content": "What is 9 × 3?\nA. 27\nB. 21\nC. 24\nD. 18\nAnswer:"},
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": "What is 15 + 27?\nA. 32\nB. 42\nC. 41\nD. 52\nAnswer:"},
    ]
    text = render(
        get_template("chatml", smol_tokenizer),
        smol_tokenizer,
        messages[-1:],
        add_generation_prompt=True,
    )
    assert text == (
        "<|im_start|>user\nWhat is 15 + 27?\nA. 32\nB. 42\nC. 41\nD. 52\nAnswer:<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_chinese_subjects_use_the_chinese_wording():
    [subject] = load_subjects(SAMPLE_DIR, "val", ["chinese_history"])
    messages = build_messages(subject, subject.questions[0], n_shot=0, lang="zh")
    assert messages == [
        {
            "role": "user",
            "content": "以下是中国关于中国历史考试的单项选择题，请选出其中的正确答案。\n\n"
            "《史记》的作者是谁？\nA. 班固\nB. 司马迁\nC. 司马光\nD. 左丘明\n答案：",
        }
    ]


def test_model_rigged_to_answer_b_gets_the_share_of_b_answers(engine):
    # A bias on the LM head makes "B" the top next token whatever the prompt.
    model = engine.model
    head = model.lm_head
    rigged = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        rigged.weight.copy_(head.weight)
        rigged.bias.zero_()
        rigged.bias[engine.tokenizer.encode("B", add_special_tokens=False)[-1]] = 1e4
    model.lm_head = rigged
    subjects = load_subjects(SAMPLE_DIR, "test", None)
    run = evaluate_mc(engine, subjects, n_shot=5)

    expected = {s: 100 * _answers(s).count("B") / 8 for s in SUBJECTS}
    for subject, accuracy in expected.items():
        assert run.metrics[f"accuracy/{subject}"] == pytest.approx(accuracy)
    all_answers = [a for s in SUBJECTS for a in _answers(s)]
    assert run.metrics["accuracy"] == pytest.approx(100 * all_answers.count("B") / 32)
    stem = _answers("chinese_primary_math") + _answers("elementary_mathematics")
    assert run.metrics["accuracy/STEM"] == pytest.approx(100 * stem.count("B") / 16)
    assert {row["prediction"] for row in run.predictions} == {"B"}
    assert 0 < run.metrics["accuracy"] < 100


def test_cached_few_shot_prefix_gives_the_letters_of_full_forward_passes(engine):
    [subject] = load_subjects(SAMPLE_DIR, "test", ["world_geography"])
    prompts = [prompt_ids(engine, subject, q, 3, "en") for q in subject.questions[:4]]
    letter_ids = [engine.tokenizer.encode(c, add_special_tokens=False)[-1] for c in CHOICES]
    expected = []
    for prompt in prompts:
        with torch.no_grad():
            logits = engine.model(input_ids=torch.tensor([prompt])).logits[0, -1]
        expected.append(CHOICES[int(logits[letter_ids].argmax())])
    assert choose_letters(engine, prompts) == expected


def test_missing_task_dir_and_split_explain_where_to_get_data(tmp_path):
    with pytest.raises(DataError, match=r"does not exist\. corral does not download.*MMLU"):
        load_subjects(tmp_path / "mmlu", "test", None)
    copy = tmp_path / "task"
    shutil.copytree(SAMPLE_DIR, copy)
    shutil.rmtree(copy / "val")
    with pytest.raises(DataError, match=r"has no 'val' split folder \(it has: dev, test\)"):
        load_subjects(copy, "val", None)


def test_unknown_subject_names_the_closest(tmp_path):
    with pytest.raises(DataError, match=r"unknown subject 'world_geografy'.*world_geography"):
        load_subjects(SAMPLE_DIR, "test", ["world_geografy"])


def test_malformed_rows_name_file_and_line(tmp_path):
    path = tmp_path / "physics_test.csv"
    path.write_text("What is g?,9.8,1,0,3,A\nWhat is c?,3e8,1\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"physics_test\.csv:2: expected 6 columns .* got 3"):
        read_questions(path)
    path.write_text("id,question,A,B,C,D,answer\n1,What is g?,9.8,1,0,3,\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"physics_test\.csv:2: answer must be one of .*C-Eval"):
        read_questions(path)


def test_empty_and_undecodable_files_are_named(tmp_path):
    path = tmp_path / "physics_test.csv"
    for text in ("", "\n \n", "question,A,B,C,D,answer\n"):
        path.write_text(text, encoding="utf-8")
        with pytest.raises(DataError, match=r"physics_test\.csv: no questions in this file"):
            read_questions(path)
    path.write_bytes("What is g?,9.8,1,0,3,A\n".encode("utf-16"))
    with pytest.raises(DataError, match=r"physics_test\.csv: not UTF-8 text"):
        read_questions(path)


def test_header_layouts_of_ceval_and_cmmlu(tmp_path):
    ceval = tmp_path / "law_val.csv"
    ceval.write_text(
        "id,question,A,B,C,D,answer,explanation\n0,Q?,a,b,c,d,d,because\n", encoding="utf-8"
    )
    [q] = read_questions(ceval)
    assert (q.question, q.choices, q.answer) == ("Q?", ("a", "b", "c", "d"), "D")
    cmmlu = tmp_path / "task"
    for split in ("dev", "test"):
        (cmmlu / split).mkdir(parents=True)
        (cmmlu / split / "law.csv").write_text(",Question,A,B,C,D,Answer\n0,Q?,a,b,c,d,B\n")
    [subject] = load_subjects(cmmlu, "test", None)
    assert (subject.name, subject.category, subject.questions[0].answer) == ("law", "Other", "B")
