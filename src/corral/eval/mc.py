"""Multiple-choice benchmarks in the MMLU / C-Eval / CMMLU layout, scored from next-token logits.

    corral eval mc --task-dir src/corral/resources/mc_sample --n-shot 5

A task folder holds one CSV file per subject and split (corral downloads nothing):

    TASK_DIR/dev/SUBJECT_dev.csv     solved examples shown before each question (few-shot)
    TASK_DIR/val/SUBJECT_val.csv     a split to score
    TASK_DIR/test/SUBJECT_test.csv   a split to score
    TASK_DIR/mapping.json            optional: {"SUBJECT": {"name": "...", "category": "STEM"}}

Rows are question, A, B, C, D, answer (a letter). MMLU's files have no header; C-Eval's and
CMMLU's have one (with extra columns such as id or explanation, which are ignored); CMMLU's
files may also be named SUBJECT.csv. mapping.json is LLaMA-Factory's file of the same name.

The prompt follows LLaMA-Factory's evaluator: each solved dev question is a user turn
(question, the lettered choices, "Answer:") answered by an assistant turn holding the letter,
the instruction line ("The following are multiple choice questions ...") opens the first user
turn, and the whole conversation goes through the model's chat template. The predicted choice
is the letter whose token has the highest next-token logit after the prompt.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral.infer.evaluate import EvalRun, format_value
from corral.infer.metrics import detect_lang
from corral.utils.errors import DataError
from corral.utils.log import get_logger
from corral.utils.suggest import did_you_mean

CHOICES = ("A", "B", "C", "D")
SPLITS = ("dev", "val", "test")
SAMPLE_DIR = Path(__file__).resolve().parents[1] / "resources" / "mc_sample"
WORDING = {
    "en": (
        "The following are multiple choice questions (with answers) about {subject}.\n\n",
        "\nAnswer:",
    ),
    "zh": ("以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n", "\n答案："),
}
WHERE_TO_GET = (
    "corral does not download benchmarks. Get MMLU (https://github.com/hendrycks/test), C-Eval "
    "(https://huggingface.co/datasets/ceval/ceval-exam) or CMMLU "
    "(https://huggingface.co/datasets/haonan-li/cmmlu) and lay it out as TASK_DIR/dev/"
    "SUBJECT_dev.csv, TASK_DIR/val/SUBJECT_val.csv and TASK_DIR/test/SUBJECT_test.csv, rows of "
    f"question,A,B,C,D,answer (a header row is optional); a small example: {SAMPLE_DIR}"
)


@dataclass(frozen=True)
class Question:
    """One question; `where` is "file:line" for messages."""

    question: str
    choices: tuple[str, str, str, str]
    answer: str
    where: str


@dataclass
class Subject:
    """A subject's few-shot examples and the questions to score."""

    name: str  # the file name's subject, e.g. "high_school_physics"
    title: str  # how the prompt names it, e.g. "high school physics"
    category: str
    dev: list[Question]
    questions: list[Question]


def read_questions(path: Path) -> list[Question]:
    """Read one subject CSV file (with or without a header row).

    Raises:
        DataError: naming file:line for a row without 6 usable columns or without an answer
            letter, and for a file without rows.
    """
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            rows = [(reader.line_num, row) for row in reader if any(c.strip() for c in row)]
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    if not rows:
        raise DataError(f"{path}: no questions in this file")
    columns = _header_columns(rows[0][1], f"{path}:{rows[0][0]}")
    if columns is not None:
        rows = rows[1:]
    if not rows:
        raise DataError(f"{path}: no questions in this file, only a header row")
    return [_question(row, columns, f"{path}:{line}") for line, row in rows]


def _header_columns(row: list[str], where: str) -> list[int] | None:
    """Indexes of question, A, B, C, D, answer when `row` is a header row, else None."""
    names = [cell.strip().lower() for cell in row]
    if "question" not in names or "answer" not in names:
        return None
    wanted = ("question", "a", "b", "c", "d", "answer")
    missing = [w for w in wanted if w not in names]
    if missing:
        raise DataError(f"{where}: the header row lacks the column(s) {', '.join(missing)}")
    return [names.index(w) for w in wanted]


def _question(row: list[str], columns: list[int] | None, where: str) -> Question:
    if columns is None:
        if len(row) != 6:
            raise DataError(
                f"{where}: expected 6 columns (question, A, B, C, D, answer), got {len(row)}"
            )
        columns = list(range(6))
    if max(columns) >= len(row):
        raise DataError(f"{where}: the row has {len(row)} columns, fewer than the header")
    question, a, b, c, d, answer = (row[i].strip() for i in columns)
    if answer.upper() not in CHOICES:
        hint = " (C-Eval publishes no test answers: score --split val)" if not answer else ""
        raise DataError(f"{where}: answer must be one of A, B, C, D, got '{answer}'{hint}")
    if not question:
        raise DataError(f"{where}: the question is empty")
    return Question(question, (a, b, c, d), answer.upper(), where)


def find_files(task_dir: Path, split: str) -> dict[str, Path]:
    """Subject name -> CSV file of one split (SUBJECT_split.csv or SUBJECT.csv).

    Raises:
        DataError: when task_dir or the split's folder is missing (saying where to get data).
    """
    if not task_dir.is_dir():
        raise DataError(f"task_dir '{task_dir}' does not exist. {WHERE_TO_GET}")
    folder = task_dir / split
    if not folder.is_dir():
        found = sorted(p.name for p in task_dir.iterdir() if p.is_dir())
        raise DataError(
            f"task_dir '{task_dir}' has no '{split}' split folder (it has: "
            f"{', '.join(found) or 'no folders'}). {WHERE_TO_GET}"
        )
    files = {p.stem.removesuffix(f"_{split}"): p for p in sorted(folder.glob("*.csv"))}
    if not files:
        raise DataError(f"{folder} holds no .csv files. {WHERE_TO_GET}")
    return files


def load_subjects(task_dir: str | Path, split: str, subjects: list[str] | None) -> list[Subject]:
    """The subjects to score, with their dev examples and the questions of `split`.

    Raises:
        DataError: for a missing folder or file, an unknown subject (with the closest name),
            or a malformed row (file:line).
    """
    task_dir = Path(task_dir)
    dev_files, split_files = find_files(task_dir, "dev"), find_files(task_dir, split)
    names = subjects or sorted(split_files)
    for name in names:
        if name not in split_files:
            known = sorted(split_files)
            raise DataError(
                f"unknown subject '{name}'{did_you_mean(name, known)}; {task_dir / split} has: "
                f"{', '.join(known)}"
            )
        if name not in dev_files:
            raise DataError(f"subject '{name}' has no few-shot file in {task_dir / 'dev'}")
    mapping = _read_mapping(task_dir / "mapping.json")
    result = []
    for name in names:
        info = mapping.get(name, {})
        result.append(
            Subject(
                name=name,
                title=info.get("name", name.replace("_", " ")),
                category=info.get("category", "Other"),
                dev=read_questions(dev_files[name]),
                questions=read_questions(split_files[name]),
            )
        )
    return result


def _read_mapping(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(mapping, dict) or not all(isinstance(v, dict) for v in mapping.values()):
        raise DataError(f'{path}: expected {{"SUBJECT": {{"name": ..., "category": ...}}}}')
    return mapping


def subject_lang(subject: Subject, lang: str) -> str:
    """`lang`, or for "auto" the language most of the subject's questions are written in."""
    if lang != "auto":
        return lang
    return detect_lang(" ".join(q.question for q in subject.dev + subject.questions))


def format_question(question: Question, lang: str) -> str:
    """The question, its lettered choices and the answer cue: 'Q\\nA. x\\nB. y ...\\nAnswer:'."""
    lines = [question.question] + [
        f"{letter}. {text}" for letter, text in zip(CHOICES, question.choices, strict=True)
    ]
    return "\n".join(lines) + WORDING[lang][1]


def build_messages(subject: Subject, question: Question, n_shot: int, lang: str) -> list[dict]:
    """The few-shot conversation for one question: n_shot solved dev questions, then it."""
    messages = []
    for shot in subject.dev[:n_shot]:
        messages.append({"role": "user", "content": format_question(shot, lang)})
        messages.append({"role": "assistant", "content": shot.answer})
    messages.append({"role": "user", "content": format_question(question, lang)})
    header = WORDING[lang][0].format(subject=subject.title)
    messages[0]["content"] = header + messages[0]["content"]
    return messages


def prompt_ids(engine: Any, subject: Subject, question: Question, n_shot: int, lang: str) -> list:
    """Token ids of the prompt, with fewer shots when it would exceed the model's context."""
    limit = engine.context_len or 2048
    for shots in range(min(n_shot, len(subject.dev)), -1, -1):
        ids = engine.prompt_ids(build_messages(subject, question, shots, lang))
        if len(ids) <= limit:
            return ids
    raise DataError(f"{question.where}: the question alone is longer than the model's context")


def choose_letters(engine: Any, prompts: list[list[int]]) -> list[str]:
    """The letter with the highest next-token logit after each prompt.

    A subject's prompts share their few-shot part, so it is run once and its key/value cache
    reused: each question then costs only its own tokens (about 5x less work at 5 shots).
    """
    import copy

    import torch

    model = engine.model
    letter_ids = [engine.tokenizer.encode(c, add_special_tokens=False)[-1] for c in CHOICES]
    shared = _common_prefix(prompts)
    letters = []
    with torch.inference_mode():
        cache = None
        if shared:
            prefix = torch.tensor([prompts[0][:shared]], device=model.device)
            cache = model(input_ids=prefix, use_cache=True).past_key_values
        for prompt in prompts:
            ids = torch.tensor([prompt[shared:]], device=model.device)
            # A copy, so the question's tokens do not stay in the shared prefix cache.
            past = copy.deepcopy(cache) if cache is not None else None
            out = model(input_ids=ids, past_key_values=past, use_cache=True, logits_to_keep=1)
            letters.append(CHOICES[int(out.logits[0, -1, letter_ids].argmax())])
    return letters


def _common_prefix(prompts: list[list[int]]) -> int:
    """Length of the ids all prompts start with, leaving each at least one token of its own."""
    shortest = min(len(p) for p in prompts)
    n = 0
    while n < shortest - 1 and all(p[n] == prompts[0][n] for p in prompts):
        n += 1
    return n


def evaluate_mc(
    engine: Any,
    subjects: list[Subject],
    *,
    n_shot: int,
    lang: str = "auto",
    about: dict[str, Any] | None = None,
) -> EvalRun:
    """Score every subject's questions; accuracy per subject, per category and overall (%)."""
    rows = []
    for subject in subjects:
        language = subject_lang(subject, lang)
        if n_shot > len(subject.dev):
            get_logger().warning(
                f"subject '{subject.name}' has {len(subject.dev)} dev questions, fewer than "
                f"n_shot={n_shot}: using them all"
            )
        prompts = [prompt_ids(engine, subject, q, n_shot, language) for q in subject.questions]
        chosen = choose_letters(engine, prompts)
        for question, letter in zip(subject.questions, chosen, strict=True):
            rows.append(
                {
                    "subject": subject.name,
                    "category": subject.category,
                    "prompt": question.question,
                    "reference": question.answer,
                    "prediction": letter,
                    "correct": letter == question.answer,
                    "source": question.where,
                }
            )
        get_logger().info(f"{subject.name}: {_accuracy(rows, 'subject', subject.name):.1f}%")
    return _mc_run(rows, subjects, {**(about or {}), "n_shot": n_shot, "lang": lang})


def _accuracy(rows: list[dict], key: str | None = None, value: str | None = None) -> float:
    chosen = [r for r in rows if key is None or r[key] == value]
    return 100.0 * sum(r["correct"] for r in chosen) / len(chosen)


def _mc_run(rows: list[dict], subjects: list[Subject], about: dict[str, Any]) -> EvalRun:
    categories = sorted({s.category for s in subjects})
    metrics: dict[str, float] = {"accuracy": _accuracy(rows), "questions": len(rows)}
    metrics.update({f"accuracy/{c}": _accuracy(rows, "category", c) for c in categories})
    metrics.update({f"accuracy/{s.name}": _accuracy(rows, "subject", s.name) for s in subjects})
    table = ["| subject | category | questions | accuracy |", "|---|---|---|---|"]
    for s in subjects:
        score = format_value(metrics[f"accuracy/{s.name}"])
        table.append(f"| {s.name} | {s.category} | {len(s.questions)} | {score} |")
    return EvalRun("mc", about, metrics, rows, {"Subjects": "\n".join(table)})
