"""Hybrid retrieval: dense cosine similarity and BM25, fused by reciprocal rank fusion.

Dense vectors find paraphrases but miss exact names and numbers; BM25 finds those but not
paraphrases; RRF (Cormack et al. 2009: score = sum over rankings of 1 / (60 + rank)) fuses the
two rankings without calibrating their scores. A question in a language the embedding model
does not read (`embedding_languages`) is ranked by BM25 alone.

Each hit also carries a *relevance* in [0, 1] — the larger of its cosine similarity and the
IDF-weighted share of the question's words it contains — which `kb_score_threshold` compares
to decide that nothing relevant was found.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from corral.kb.embed import Embedder, words
from corral.kb.store import Passage, SqlStore

RRF_K = 60  # the constant of Cormack et al.; it damps the weight of the very first ranks
CANDIDATES = 50  # passages each ranking contributes to the fusion
BM25_K1, BM25_B = 1.2, 0.75


@dataclass
class Hit:
    passage: Passage
    score: float  # the fused RRF score the hits are ranked by
    relevance: float  # max(cosine, matched share of the question's words)

    def to_json(self) -> dict:
        return {
            "file": self.passage.path,
            **self.passage.chunk().location(),
            "headings": self.passage.headings,
            "score": round(self.score, 6),
            "relevance": round(self.relevance, 4),
            "text": self.passage.text,
        }


def search(store: SqlStore, embedder: Embedder | None, query: str, k: int) -> list[Hit]:
    """The `k` best passages for `query`; `embedder` None ranks by BM25 alone."""
    terms = words(query)
    bm25, coverage = _bm25(store, terms)
    rankings = [sorted(bm25, key=lambda i: (-bm25[i], i))[:CANDIDATES]]
    cosine: dict[int, float] = {}
    if embedder is not None:
        cosine = dict(store.dense(embedder.embed([query])[0], CANDIDATES))
        rankings.append(list(cosine))
    fused: dict[int, float] = defaultdict(float)
    for ranking in rankings:
        for rank, chunk_id in enumerate(ranking, 1):
            fused[chunk_id] += 1.0 / (RRF_K + rank)
    best = sorted(fused, key=lambda i: (-fused[i], i))[:k]
    passages = store.passages(best)
    return [Hit(passages[i], fused[i], max(cosine.get(i, 0.0), coverage.get(i, 0.0))) for i in best]


def _bm25(store: SqlStore, terms: list[str]) -> tuple[dict[int, float], dict[int, float]]:
    """Okapi BM25 of every passage holding a query term, and the IDF-weighted share of the
    query's terms each contains (a term found nowhere weighs as much as the rarest possible)."""
    count, mean_length = store.stats()
    if not terms or not count:
        return {}, {}
    postings = store.postings(sorted(set(terms)))
    frequency: dict[str, int] = defaultdict(int)
    for term, *_ in postings:
        frequency[term] += 1
    query = {t: terms.count(t) for t in set(terms)}
    idf = {t: math.log(1 + (count - frequency[t] + 0.5) / (frequency[t] + 0.5)) for t in query}
    total_idf = sum(idf[t] * n for t, n in query.items())
    scores: dict[int, float] = defaultdict(float)
    matched: dict[int, float] = defaultdict(float)
    for term, chunk_id, tf, length in postings:
        norm = tf + BM25_K1 * (1 - BM25_B + BM25_B * length / (mean_length or 1))
        scores[chunk_id] += query[term] * idf[term] * tf * (BM25_K1 + 1) / norm
        matched[chunk_id] += idf[term] * query[term]
    return dict(scores), {i: m / total_idf for i, m in matched.items()}
