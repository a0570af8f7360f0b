"""Where a knowledge base's passages, vectors and BM25 postings live.

Two stores behind one interface, chosen by the `kb_store` key:

* **SQLite (the default, no server)**: one file, `$CORRAL_HOME/kb/NAME/index.sqlite`. We chose
  it over faiss, LanceDB or sqlite-vec because a knowledge base is edited file by file: SQLite
  replaces or deletes one file's passages, their metadata (file, lines, page, headings) and
  their postings in a single ACID transaction, so an add that is interrupted (Ctrl-C, a crash,
  a full disk) rolls back and leaves the previous index whole — a faiss index beside a metadata
  file cannot promise that. Vectors are float32 blobs searched exactly by one matrix product
  (about 15 ms for 100,000 passages of 384 numbers), so there is no approximate index to
  rebuild after deletes; it ships with Python, so the default needs nothing installed.
* **PostgreSQL + pgvector** (`kb_store: postgresql://…`) for a knowledge base shared between
  servers or larger than one machine's memory: the same tables in the schema `kb_NAME`, the
  vectors in a pgvector column with an HNSW index, the same single-transaction updates. We
  chose it over Milvus because a team that shares data usually already runs PostgreSQL,
  backups and access control included, and pgvector keeps passages, metadata and vectors in
  one transactional database as SQLite does here.

BM25 is computed by corral from the postings table (term, passage, count) that both stores
keep, so the two rank lexically alike and need no full-text engine of their own.
"""

from __future__ import annotations

import re
import sqlite3
from collections import Counter
from dataclasses import dataclass
from typing import Any

from corral.kb.chunking import Chunk
from corral.utils.deps import require
from corral.utils.errors import CorralError
from corral.utils.paths import corral_home

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,49}$")


@dataclass
class FileUpdate:
    """One file's new passages, their unit vectors (float32 rows) and BM25 term counts."""

    path: str
    sha256: str
    chunks: list[Chunk]
    vectors: Any
    terms: list[Counter]


@dataclass
class Passage:
    id: int
    path: str
    text: str
    headings: str
    line_start: int | None
    line_end: int | None
    page: int | None

    def chunk(self) -> Chunk:
        headings = tuple(self.headings.split(" > ")) if self.headings else ()
        return Chunk(self.text, headings, self.line_start, self.line_end, self.page)


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise CorralError(
            f"knowledge base name '{name}': use letters, digits, '-' and '_' (at most 50, "
            "starting with a letter or digit)"
        )
    return name


def open_store(name: str, uri: str | None, *, create: bool = False) -> SqlStore:
    """The store of knowledge base `name` (`uri`: kb_store; empty for SQLite).

    Raises:
        CorralError: a bad name, a knowledge base that does not exist (unless `create`), or a
            database that cannot be reached.
    """
    check_name(name)
    store = PostgresStore(name, uri) if uri else SqliteStore(name)
    if not create and not store.exists():
        known = list_names(uri)
        raise CorralError(
            f"no knowledge base '{name}' (existing: {', '.join(known) or 'none'}); create it "
            f"with: corral kb add {name} PATH"
        )
    return store


def list_names(uri: str | None) -> list[str]:
    """The knowledge bases in the store `uri` (empty: the SQLite folder)."""
    if uri:
        return PostgresStore.names(uri)
    root = corral_home() / "kb"
    return sorted(p.parent.name for p in root.glob("*/index.sqlite")) if root.is_dir() else []


class SqlStore:
    """The tables and queries both stores share; subclasses connect and know their dialect."""

    placeholder = "?"
    id_column = "INTEGER PRIMARY KEY AUTOINCREMENT"
    vector_column = "BLOB"

    def __init__(self) -> None:
        self.conn: Any = None
        self._matrix: tuple | None = None

    def _sql(self, statement: str) -> str:
        return statement.replace("?", self.placeholder)

    def _rows(self, statement: str, params: tuple | list = ()) -> list[tuple]:
        return list(self.conn.execute(self._sql(statement), params).fetchall())

    def _schema(self, dim: int) -> list[str]:
        vector = self.vector_column.format(dim=dim)
        return [
            "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
            "CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, sha256 TEXT NOT NULL, "
            "chunks INTEGER NOT NULL)",
            f"CREATE TABLE IF NOT EXISTS chunks (id {self.id_column}, path TEXT NOT NULL, "
            "text TEXT NOT NULL, headings TEXT NOT NULL, line_start INTEGER, line_end INTEGER, "
            f"page INTEGER, length INTEGER NOT NULL, vector {vector} NOT NULL)",
            "CREATE INDEX IF NOT EXISTS chunks_path ON chunks (path)",
            "CREATE TABLE IF NOT EXISTS terms (term TEXT NOT NULL, chunk_id INTEGER NOT NULL, "
            "tf INTEGER NOT NULL)",
            "CREATE INDEX IF NOT EXISTS terms_term ON terms (term)",
            "CREATE INDEX IF NOT EXISTS terms_chunk ON terms (chunk_id)",
        ]

    def meta(self) -> dict[str, str]:
        """What the first add recorded (embedding model, dimension); empty before it."""
        if not self._has_tables():
            return {}
        return dict(self._rows("SELECT key, value FROM meta"))

    def files(self) -> dict[str, tuple[str, int]]:
        """path -> (sha256, number of passages)."""
        if not self._has_tables():
            return {}
        return {p: (s, n) for p, s, n in self._rows("SELECT path, sha256, chunks FROM files")}

    def update(self, meta: dict[str, str], updates: list[FileUpdate], removed: list[str]) -> None:
        """Replace the passages of every file in `updates` and delete those of `removed`, all
        in one transaction: on any error (or interruption) nothing has changed."""
        dim = next((u.vectors.shape[1] for u in updates if len(u.chunks)), 0)
        with self._transaction():
            for statement in self._schema(int(meta.get("dim", dim))):
                self.conn.execute(statement)
            for key, value in meta.items():
                self._upsert_meta(key, value)
            for path in [*removed, *(u.path for u in updates)]:
                self._delete(path)
            for update in updates:
                self._insert(update)
        self._matrix = None

    def _delete(self, path: str) -> None:
        ids = "SELECT id FROM chunks WHERE path = ?"
        self.conn.execute(self._sql(f"DELETE FROM terms WHERE chunk_id IN ({ids})"), (path,))
        self.conn.execute(self._sql("DELETE FROM chunks WHERE path = ?"), (path,))
        self.conn.execute(self._sql("DELETE FROM files WHERE path = ?"), (path,))

    def _insert(self, update: FileUpdate) -> None:
        insert = self._sql(
            "INSERT INTO chunks (path, text, headings, line_start, line_end, page, length, vector)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id"
        )
        for chunk, vector, terms in zip(update.chunks, update.vectors, update.terms, strict=True):
            row = (update.path, chunk.text, " > ".join(chunk.headings), chunk.line_start)
            row += (chunk.line_end, chunk.page, sum(terms.values()), self._vector(vector))
            chunk_id = self.conn.execute(insert, row).fetchone()[0]
            postings = [(term, chunk_id, count) for term, count in terms.items()]
            self._executemany("INSERT INTO terms (term, chunk_id, tf) VALUES (?, ?, ?)", postings)
        self.conn.execute(
            self._sql("INSERT INTO files (path, sha256, chunks) VALUES (?, ?, ?)"),
            (update.path, update.sha256, len(update.chunks)),
        )

    def stats(self) -> tuple[int, float]:
        """(number of passages, their mean length in terms)."""
        count, mean = self._rows("SELECT COUNT(*), AVG(length) FROM chunks")[0]
        return int(count), float(mean or 0.0)

    def postings(self, terms: list[str]) -> list[tuple[str, int, int, int]]:
        """(term, passage id, count in the passage, passage length) for each of `terms`."""
        if not terms:
            return []
        marks = ", ".join("?" * len(terms))
        return self._rows(
            "SELECT t.term, t.chunk_id, t.tf, c.length FROM terms t JOIN chunks c "
            f"ON c.id = t.chunk_id WHERE t.term IN ({marks})",
            terms,
        )

    def passages(self, ids: list[int]) -> dict[int, Passage]:
        if not ids:
            return {}
        marks = ", ".join("?" * len(ids))
        rows = self._rows(
            "SELECT id, path, text, headings, line_start, line_end, page FROM chunks "
            f"WHERE id IN ({marks})",
            ids,
        )
        return {row[0]: Passage(*row) for row in rows}


class SqliteStore(SqlStore):
    """The embedded default (see the module docstring)."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.folder = corral_home() / "kb" / name
        self.path = self.folder / "index.sqlite"

    def describe(self) -> str:
        return str(self.path)

    def exists(self) -> bool:
        if not self.path.is_file():
            return False
        with sqlite3.connect(self.path) as conn:  # a first add that failed left no tables
            return bool(conn.execute(_SQLITE_HAS_META).fetchone())

    def _has_tables(self) -> bool:
        return bool(self.conn.execute(_SQLITE_HAS_META).fetchone())

    def connect(self) -> SqliteStore:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(self.path, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")  # readers never see a half-written add
        return self

    def _transaction(self):
        return _SqliteTransaction(self.conn)

    def _upsert_meta(self, key: str, value: str) -> None:
        self.conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def _executemany(self, statement: str, rows: list[tuple]) -> None:
        self.conn.executemany(statement, rows)

    @staticmethod
    def _vector(vector) -> bytes:
        return vector.astype("float32").tobytes()

    def dense(self, query, k: int) -> list[tuple[int, float]]:
        """The `k` passages whose vectors are most similar to `query` (exact cosine)."""
        import numpy as np

        if self._matrix is None:
            rows = self._rows("SELECT id, vector FROM chunks ORDER BY id")
            ids = [r[0] for r in rows]
            vectors = np.frombuffer(b"".join(r[1] for r in rows), dtype="float32")
            self._matrix = (ids, vectors.reshape(len(ids), -1) if ids else vectors)
        ids, matrix = self._matrix
        if not ids:
            return []
        scores = matrix @ query.astype("float32")
        top = np.argsort(-scores, kind="stable")[:k]
        return [(ids[i], float(scores[i])) for i in top]

    def drop(self) -> None:
        import shutil

        if self.conn is not None:
            self.conn.close()
        shutil.rmtree(self.folder)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


_SQLITE_HAS_META = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"


class _SqliteTransaction:
    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")  # one writer at a time; a second add waits

    def __exit__(self, kind, value, traceback) -> None:
        self.conn.execute("COMMIT" if kind is None else "ROLLBACK")


class PostgresStore(SqlStore):
    """PostgreSQL with pgvector (see the module docstring): schema `kb_NAME`."""

    placeholder = "%s"
    id_column = "BIGSERIAL PRIMARY KEY"
    vector_column = "vector({dim})"

    def __init__(self, name: str, uri: str):
        super().__init__()
        self.name, self.uri, self.schema = name, uri, f"kb_{name}"

    def describe(self) -> str:
        return f"{_without_password(self.uri)} (schema {self.schema})"

    @staticmethod
    def _connect(uri: str):
        psycopg = require("psycopg")
        try:
            return psycopg.connect(uri, autocommit=True, connect_timeout=10)
        except psycopg.OperationalError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CorralError(
                f"cannot connect to kb_store {_without_password(uri)}: {first}"
            ) from None

    @classmethod
    def names(cls, uri: str) -> list[str]:
        with cls._connect(uri) as conn:
            rows = conn.execute(
                "SELECT substr(table_schema, 4) FROM information_schema.tables "
                "WHERE table_name = 'meta' AND table_schema LIKE 'kb\\_%' ORDER BY 1"
            ).fetchall()
        return [r[0] for r in rows]

    def exists(self) -> bool:
        return self.name in self.names(self.uri)

    def _has_tables(self) -> bool:
        return self.conn.execute("SELECT to_regclass('meta')").fetchone()[0] is not None

    def connect(self) -> PostgresStore:
        from psycopg import sql

        self.conn = self._connect(self.uri)
        try:
            self.conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        except Exception as exc:  # the server has no pgvector, or the user may not add it
            raise CorralError(
                f"kb_store {_without_password(self.uri)}: cannot enable pgvector ({exc}); "
                "install pgvector on the server or ask its administrator to run "
                "CREATE EXTENSION vector"
            ) from None
        self.conn.execute(
            sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema))
        )
        self.conn.execute(
            sql.SQL("SET search_path TO {}, public").format(sql.Identifier(self.schema))
        )
        return self

    def _schema(self, dim: int) -> list[str]:
        return [
            *super()._schema(dim),
            "CREATE INDEX IF NOT EXISTS chunks_vector ON chunks "
            "USING hnsw (vector vector_cosine_ops)",
        ]

    def _transaction(self):
        return self.conn.transaction()

    def _upsert_meta(self, key: str, value: str) -> None:
        self.conn.execute(
            "INSERT INTO meta (key, value) VALUES (%s, %s) "
            "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            (key, value),
        )

    def _executemany(self, statement: str, rows: list[tuple]) -> None:
        with self.conn.cursor() as cursor:
            cursor.executemany(self._sql(statement), rows)

    @staticmethod
    def _vector(vector) -> str:
        return "[" + ",".join(repr(float(x)) for x in vector) + "]"

    def _sql(self, statement: str) -> str:
        statement = super()._sql(statement)
        return statement.replace("VALUES (%s, %s, %s, %s, %s, %s, %s, %s)", _VECTOR_VALUES)

    def dense(self, query, k: int) -> list[tuple[int, float]]:
        vector = self._vector(query)
        rows = self._rows(
            "SELECT id, 1 - (vector <=> ?::vector) FROM chunks ORDER BY vector <=> ?::vector, id "
            "LIMIT ?",
            (vector, vector, k),
        )
        return [(int(i), float(s)) for i, s in rows]

    def drop(self) -> None:
        from psycopg import sql

        self.conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(self.schema)))
        self.conn.close()

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


_VECTOR_VALUES = "VALUES (%s, %s, %s, %s, %s, %s, %s, %s::vector)"


def _without_password(uri: str) -> str:
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", uri)
