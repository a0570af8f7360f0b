"""Answering from a knowledge base: retrieve, and either say "I don't know" (nothing relevant
enough) or let the chat engine answer from the passages, put before the question with the
prompt of the question's language (`kb_prompt_en` / `kb_prompt_zh`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from corral.infer.metrics import detect_lang
from corral.kb.embed import Embedder
from corral.kb.retrieve import Hit, search
from corral.kb.store import SqlStore


@dataclass
class KnowledgeBase:
    """A connected store, its embedder and the kb settings (`KbConfig`)."""

    store: SqlStore
    embedder: Embedder
    settings: object

    def search(self, query: str, k: int | None = None) -> list[Hit]:
        lang = detect_lang(query)
        dense = self.embedder if lang in self.settings.embedding_languages else None
        return search(self.store, dense, query, k or self.settings.kb_top_k)

    def relevant(self, hits: list[Hit]) -> list[Hit]:
        """The hits at or above kb_score_threshold: the model sees and cites only these, and
        with none it is not asked at all."""
        return [h for h in hits if h.relevance >= self.settings.kb_score_threshold]

    def prompt(self, question: str, hits: list[Hit]) -> str:
        lang = detect_lang(question)
        passages = "\n\n".join(f"[{n}] {h.passage.text}" for n, h in enumerate(hits, 1))
        template = self.settings.kb_prompt_zh if lang == "zh" else self.settings.kb_prompt_en
        return template.format(passages=passages, question=question)

    def no_answer(self, question: str) -> str:
        zh = detect_lang(question) == "zh"
        return self.settings.kb_no_answer_zh if zh else self.settings.kb_no_answer_en

    def answer(
        self, engine: Callable[[], Any], messages: list[dict], **overrides: Any
    ) -> tuple[Iterator[str], list[Hit]]:
        """The reply to the conversation `messages` (its last turn is the question), streamed,
        and the passages it was given (empty: the reply is kb_no_answer, and `engine`, which
        returns the ChatEngine, is not called)."""
        grounded, hits = self.ground(messages)
        if not hits:
            return iter([self.no_answer(messages[-1]["content"])]), []
        return engine().stream(grounded, **overrides), hits

    def ground(self, messages: list[dict]) -> tuple[list[dict], list[Hit]]:
        """`messages` with its last turn (the question) replaced by the prompt that puts the
        relevant passages before it, and those passages; with none, `messages` unchanged and
        no hits (the caller answers kb_no_answer without asking the model)."""
        question = messages[-1]["content"]
        hits = self.relevant(self.search(question))
        if not hits:
            return messages, []
        turn = {**messages[-1], "content": self.prompt(question, hits)}
        return [*messages[:-1], turn], hits


def open_kb(name: str, settings) -> KnowledgeBase:
    """The knowledge base `name`, connected, with the embedder it was built with (`settings`:
    the config's `KbConfig`).

    Raises:
        CorralError: no such knowledge base, or its store cannot be reached.
    """
    from corral.kb.store import open_store

    store = open_store(name, settings.kb_store).connect()
    return KnowledgeBase(store, Embedder(store.meta()["embedding_model"]), settings)


def source_lines(hits: list[Hit]) -> list[str]:
    """`[1] file:lines 3-5 (score 0.0328)`, one per source."""
    lines = []
    for number, hit in enumerate(hits, 1):
        where = hit.passage.chunk().location()
        at = f" page {where['page']}" if "page" in where else ""
        at = f" lines {where['lines']}" if "lines" in where else at
        heading = f" § {hit.passage.headings}" if hit.passage.headings else ""
        lines.append(
            f"[{number}] {hit.passage.path}{at}{heading} (score {hit.score:.4f}, "
            f"relevance {hit.relevance:.2f})"
        )
    return lines
