"""The tokenised-dataset cache: Arrow files under `corral_home()/datasets/<key>/`.

    key = cache_key(data_config, tokenizer, template, kind="conversation", seed=42)
    cached = load_cached(key)            # (train, eval, stats) or None
    save_cached(key, train, eval, stats) # atomic: a temp folder renamed into place

The key is a sha256 over everything that changes the result: each data file's bytes, the
resolved dataset specs, the data settings (cutoff_len, packing, train_on_prompt, mask_history,
max_samples, val_size, mixing, ...), the tokenizer (vocabulary and merges, special tokens,
chat template), the chat template, the seed, the dataset kind, corral's version and
`CACHE_VERSION`. Hashing a big data file takes a while, so each file's hash is remembered by
(path, size, mtime) in `file_hashes.json`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from corral.config.fields import DataConfig
from corral.data.processors import DataStats
from corral.data.readers import list_data_files
from corral.data.registry import resolve_datasets
from corral.data.templates import Template
from corral.utils.disk import disk_full_error
from corral.utils.paths import corral_home

# Bump when processors, packing or the stored layout change what a key's files hold.
CACHE_VERSION = 2
# Settings that change how fast the cache is built, not what it holds.
_NOT_IN_KEY = ("preprocessing_num_workers", "overwrite_cache")
STATS_FILE = "stats.json"
_FILE_HASHES = "file_hashes.json"


def cache_root() -> Path:
    """The folder holding one sub-folder per cached dataset."""
    return corral_home() / "datasets"


def cache_key(data: DataConfig, tokenizer: Any, template: Template, *, kind: str, seed: int) -> str:
    """The sha256 naming the cached result of these inputs (see the module docstring)."""
    from corral import __version__

    settings = {k: v for k, v in dataclasses.asdict(data).items() if k not in _NOT_IN_KEY}
    parts = {
        "cache_version": CACHE_VERSION,
        "corral": __version__,
        "kind": kind,
        "seed": seed,
        "settings": settings,
        "datasets": _dataset_fingerprints(data.dataset or [], data.dataset_dir),
        "eval_datasets": _dataset_fingerprints(data.eval_dataset or [], data.dataset_dir),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "template": dataclasses.asdict(template),
    }
    return _sha256(json.dumps(parts, sort_keys=True, default=str).encode())


def _dataset_fingerprints(names: list[str], dataset_dir: str) -> list[dict[str, Any]]:
    specs = resolve_datasets(names, dataset_dir)
    hashes = _FileHashes()
    out = []
    for spec in specs:
        entry = {k: str(v) for k, v in dataclasses.asdict(spec).items() if k != "origin"}
        entry["files"] = [hashes.get(path) for path in list_data_files(spec.path)]
        out.append(entry)
    hashes.save()
    return out


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of what decides the tokenizer's ids: its model, special tokens, chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        vocab = backend.to_str()
    else:  # a slow tokenizer: its vocabulary is what we can see
        vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    described = {
        "class": type(tokenizer).__name__,
        "special": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
        "added": sorted(str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values()),
        "add_bos": getattr(tokenizer, "add_bos_token", None),
        "add_eos": getattr(tokenizer, "add_eos_token", None),
        "chat_template": getattr(tokenizer, "chat_template", None),
        "vocab": _sha256(vocab.encode()),
    }
    return _sha256(json.dumps(described, sort_keys=True, default=str).encode())


class _FileHashes:
    """sha256 of data files, remembered by (path, size, mtime) so big files are read once."""

    def __init__(self) -> None:
        self.path = cache_root() / _FILE_HASHES
        try:
            self.known: dict[str, list] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.known = {}
        self.changed = False

    def get(self, file: Path) -> str:
        stat = file.stat()
        name = str(file.resolve())
        seen = [stat.st_size, stat.st_mtime_ns]
        if self.known.get(name, [None, None, None])[:2] != seen:
            digest = hashlib.sha256()
            with open(file, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
            self.known[name] = [*seen, digest.hexdigest()]
            self.changed = True
        return self.known[name][2]

    def save(self) -> None:
        if self.changed:
            # only a memo: when it cannot be written (a full disk), files are hashed again
            with contextlib.suppress(OSError):
                _write_atomically(self.path, json.dumps(self.known, indent=0))


def cache_dir(key: str) -> Path:
    """Where the dataset with this key is (or would be) cached."""
    return cache_root() / key


def load_cached(key: str) -> tuple[Any, Any | None, DataStats] | None:
    """The cached (train, eval or None, stats) for `key`, or None when not cached."""
    folder = cache_dir(key)
    if not (folder / STATS_FILE).is_file():
        return None
    import datasets

    train = datasets.load_from_disk(str(folder / "train"))
    evaluation = (
        datasets.load_from_disk(str(folder / "eval")) if (folder / "eval").is_dir() else None
    )
    stats = DataStats.from_json((folder / STATS_FILE).read_text())
    return train, evaluation, stats


def save_cached(
    key: str, train: Any, evaluation: Any | None, stats: DataStats, *, replace: bool = False
) -> Path:
    """Write the datasets and stats under `cache_dir(key)`.

    The files are written into a temporary folder that is renamed into place, so a reader never
    sees a half-written cache. When another process has cached the same key meanwhile (e.g.
    several ranks of one distributed run), its copy is kept unless `replace` is set
    (overwrite_cache).
    """
    folder = cache_dir(key)
    folder.parent.mkdir(parents=True, exist_ok=True)
    temp = folder.parent / f".tmp-{key[:16]}-{uuid.uuid4().hex}"
    try:
        train.save_to_disk(str(temp / "train"))
        if evaluation is not None:
            evaluation.save_to_disk(str(temp / "eval"))
        (temp / STATS_FILE).write_text(stats.to_json())
    except Exception as error:
        advice = "or point CORRAL_HOME at a disk with room for the tokenised dataset"
        full = disk_full_error(error, folder, "caching the tokenised dataset in", advice)
        shutil.rmtree(temp, ignore_errors=True)
        if full is not None:
            raise full from error
        raise
    old = None
    if folder.exists() and replace:
        old = folder.parent / f".old-{key[:16]}-{uuid.uuid4().hex}"
        os.replace(folder, old)
    try:
        os.replace(temp, folder)
    except OSError:  # another process put its copy there first; it holds the same result
        shutil.rmtree(temp, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    try:
        temp.write_text(text)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)  # gone after the rename; a failed write's leftover


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
