"""Benchmark `corral kb`: indexing throughput (chunks/s) and query latency, SQLite store.

    python benchmarks/kb.py                           # the repository's data/wiki_demo.txt
    python benchmarks/kb.py --paths ~/docs --queries 50

Indexes the files into a fresh knowledge base in a temporary $CORRAL_HOME (reading, chunking,
embedding and writing: the embedding model is loaded before the clock starts), then times
`search` on questions made from the indexed passages (their first words): retrieval only,
embedding the question included, the answer model not involved. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paths", nargs="+", default=[str(REPO / "data" / "wiki_demo.txt")])
    parser.add_argument("--queries", type=int, default=30)
    args = parser.parse_args()
    os.environ["CORRAL_HOME"] = tempfile.mkdtemp(prefix="kb-bench-")
    from corral.config.parse import load_config
    from corral.kb.answer import KnowledgeBase
    from corral.kb.embed import Embedder, default_embedding_model
    from corral.kb.index import add_files, collect_files
    from corral.kb.store import SqliteStore

    config = load_config()
    embedder = Embedder(default_embedding_model())
    store = SqliteStore("bench").connect()
    summary = add_files(
        store, collect_files(args.paths), embedder, config.kb.chunk_size, config.kb.chunk_overlap
    )
    print(f"indexed: {summary.lines()[0]}")
    kb = KnowledgeBase(store, embedder, config.kb)
    texts = [p.text for p in kb.store.passages(list(range(1, args.queries + 1))).values()]
    questions = [" ".join(t.split()[:8]) for t in texts]
    kb.search(questions[0])  # the first query pays for one-time set-up (loading vectors)
    times = []
    for question in questions:
        start = time.perf_counter()
        kb.search(question)
        times.append((time.perf_counter() - start) * 1000)
    count, _ = store.stats()
    print(
        f"query latency over {len(times)} queries, {count} chunks: median "
        f"{statistics.median(times):.1f} ms, max {max(times):.1f} ms"
    )


if __name__ == "__main__":
    main()
