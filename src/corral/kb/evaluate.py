"""`corral kb eval`: how well a knowledge base finds and answers, to tune chunk size and k.

QUESTIONS.jsonl holds one object per line: `question`, `source` (the file that holds the
answer: a name or a path ending, or a list of them) and optionally `answer` (the fact the reply
must contain). Retrieval is scored by hit@k (a gold file among the k passages) and MRR (1 / rank
of the first gold passage, 0 when none); answers by fact match (the fact appears in the reply,
case and spacing ignored) and ROUGE-L F1 against the fact.
"""

from __future__ import annotations

import json
from pathlib import Path

from corral.utils.errors import DataError


def read_questions(path: str) -> list[dict]:
    """The questions of `path`, each with `question` and `sources` (a list).

    Raises:
        DataError: a missing file, a line that is not JSON, or a missing key, naming the line.
    """
    file = Path(path)
    if not file.is_file():
        raise DataError(f"questions file '{path}' does not exist")
    questions = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise DataError(f"{path}:{number}: not JSON ({exc})") from None
        if not isinstance(record, dict) or "question" not in record or "source" not in record:
            raise DataError(f'{path}:{number}: expected {{"question": ..., "source": ...}}')
        sources = record["source"] if isinstance(record["source"], list) else [record["source"]]
        questions.append({**record, "sources": [str(s) for s in sources]})
    if not questions:
        raise DataError(f"questions file '{path}' has no questions")
    return questions


def evaluate(kb, questions: list[dict], engine=None) -> dict:
    """Scores per question and their means; answers are generated only when `engine` is given."""
    from corral.infer.metrics import detect_lang, rouge

    rows = []
    for item in questions:
        hits = kb.search(item["question"])
        ranks = [n for n, h in enumerate(hits, 1) if _is_gold(h.passage.path, item["sources"])]
        row = {
            "question": item["question"],
            "retrieved": [h.passage.path for h in hits],
            "hit@k": float(bool(ranks)),
            "mrr": 1.0 / ranks[0] if ranks else 0.0,
        }
        if engine is not None and "answer" in item:
            pieces, _ = kb.answer(lambda: engine, [{"role": "user", "content": item["question"]}])
            reply = "".join(pieces).strip()
            fact = str(item["answer"])
            row["reply"] = reply
            row["fact_match"] = float(
                " ".join(fact.lower().split()) in " ".join(reply.lower().split())
            )
            row["rouge-l"] = rouge(reply, fact, detect_lang(fact))["rouge-l"] / 100
        rows.append(row)
    keys = [k for k in ("hit@k", "mrr", "fact_match", "rouge-l") if any(k in r for r in rows)]
    metrics = {k: sum(r[k] for r in rows if k in r) / sum(k in r for r in rows) for k in keys}
    return {"k": kb.settings.kb_top_k, "metrics": metrics, "questions": rows}


def _is_gold(path: str, sources: list[str]) -> bool:
    """True when `path` ends with one of `sources` (whole path components)."""
    parts = Path(path).parts
    return any(parts[-len(Path(s).parts) :] == Path(s).parts for s in sources)
