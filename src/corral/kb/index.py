"""`corral kb add`: files into passages, vectors and postings, written in one transaction.

Every file is read, chunked and embedded first; only then does one transaction replace the
changed files' passages. An unchanged file (same SHA-256) is skipped; a file that cannot be
used is counted with its reason; an interrupted add changes nothing.
"""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from corral.kb.chunking import chunk_blocks
from corral.kb.embed import Embedder, default_embedding_model, term_counts
from corral.kb.readers import Skip, read_blocks
from corral.kb.store import FileUpdate, SqlStore
from corral.utils.errors import CorralError


@dataclass
class AddSummary:
    added: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # path -> why
    chunks: int = 0
    seconds: float = 0.0

    def lines(self) -> list[str]:
        rate = (
            f" ({self.chunks / self.seconds:.1f} chunks/s)" if self.seconds and self.chunks else ""
        )
        out = [
            f"{len(self.added)} file(s) indexed, {self.chunks} chunks in {self.seconds:.1f} s"
            f"{rate}; {len(self.unchanged)} unchanged; {len(self.skipped)} skipped"
        ]
        out += [f"  skipped {path}: {why}" for path, why in self.skipped.items()]
        return out


def collect_files(paths: list[str]) -> list[Path]:
    """The files named, folders expanded recursively (hidden files and folders left out).

    Raises:
        CorralError: a path that does not exist.
    """
    files: list[Path] = []
    for item in paths:
        path = Path(item).expanduser()
        if not path.exists():
            raise CorralError(f"'{item}' does not exist")
        if path.is_dir():
            files += sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
        else:
            files.append(path)
    return [f.resolve() for f in files]


def embedding_folder(store: SqlStore, configured: str | None) -> str:
    """The embedding model of the knowledge base (recorded at its first add), checked against
    the configured one."""
    recorded = store.meta().get("embedding_model")
    wanted = configured or recorded or default_embedding_model()
    if recorded and configured and str(Path(configured).resolve()) != recorded:
        raise CorralError(
            f"knowledge base '{store.name}' was built with embedding_model {recorded}; "
            f"add with that model, or `corral kb rm {store.name}` and add again"
        )
    return recorded or str(Path(wanted).resolve())


def add_files(
    store: SqlStore, files: list[Path], embedder: Embedder, chunk_size: int, overlap: int
) -> AddSummary:
    """Index `files` into `store` (connected); see the module docstring."""
    from tqdm import tqdm

    start = time.perf_counter()
    summary = AddSummary()
    known = store.files()
    updates: list[FileUpdate] = []
    for path in tqdm(files, desc="reading", unit="file", file=sys.stderr, disable=None):
        try:
            data = path.read_bytes()
        except OSError as exc:
            summary.skipped[str(path)] = f"unreadable ({exc.strerror})"
            continue
        digest = hashlib.sha256(data).hexdigest()
        if known.get(str(path), ("",))[0] == digest:
            summary.unchanged.append(str(path))
            continue
        try:
            chunks = chunk_blocks(read_blocks(path, data), chunk_size, overlap)
        except Skip as why:
            summary.skipped[str(path)] = str(why)
            continue
        updates.append(FileUpdate(str(path), digest, chunks, None, []))
    texts = [_indexed_text(c) for u in updates for c in u.chunks]
    vectors = _embed(embedder, texts)
    offset = 0
    for update in updates:
        n = len(update.chunks)
        update.vectors = vectors[offset : offset + n]
        update.terms = [term_counts(t) for t in texts[offset : offset + n]]
        offset += n
        summary.added.append(update.path)
    meta = {"embedding_model": embedder.folder, "dim": str(embedder.dim)}
    store.update(meta, updates, removed=[])
    summary.chunks = len(texts)
    summary.seconds = time.perf_counter() - start
    return summary


def _indexed_text(chunk) -> str:
    """What is embedded and counted for BM25: the heading path, then the passage."""
    return "\n".join([" > ".join(chunk.headings), chunk.text]) if chunk.headings else chunk.text


def _embed(embedder: Embedder, texts: list[str]):
    import numpy as np
    from tqdm import tqdm

    batches = [texts[i : i + 64] for i in range(0, len(texts), 64)]
    parts = [
        embedder.embed(batch)
        for batch in tqdm(batches, desc="embedding", unit="batch", file=sys.stderr, disable=None)
    ]
    return np.concatenate(parts) if parts else np.zeros((0, embedder.dim), dtype="float32")
