"""New pieces for a SentencePiece tokenizer (LLaMA 1/2), merged as Chinese-LLaMA-Alpaca did.

A BPE SentencePiece model is trained on the corpus; its pieces the old model lacks are appended
to the old model's proto: old pieces keep their ids and scores, byte-fallback pieces stay, and
each new piece scores below every old one, so old merges win wherever they apply and old text
tokenises as before unless a new piece fits.
"""

from __future__ import annotations

import io
from pathlib import Path

from corral.model.tokens import NewTokens
from corral.utils.errors import DataError

SPM_FILE = "tokenizer.model"


def is_sentencepiece(path: Path) -> bool:
    """True when `path` is a SentencePiece model file."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception:  # noqa: BLE001 - protobuf raises its own DecodeError
        return False
    return len(proto.pieces) > 0


def extend_sentencepiece(old_model: Path, texts: list[str], add: int, out: Path) -> NewTokens:
    """Write `out` (a tokenizer.model) = the old model plus up to `add` pieces from `texts`.

    Raises:
        DataError: SentencePiece cannot learn that many pieces from the corpus.
    """
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    old = sentencepiece_model_pb2.ModelProto()
    old.ParseFromString(old_model.read_bytes())
    learned = sentencepiece_model_pb2.ModelProto()
    learned.ParseFromString(_train(texts, add))
    processor = spm.SentencePieceProcessor(model_proto=old.SerializeToString())
    known = {p.piece for p in old.pieces}
    lowest = min(p.score for p in old.pieces)
    new = NewTokens([], [], [])
    for piece in (p.piece for p in learned.pieces if p.type == p.NORMAL):
        if piece in known:
            continue
        # a piece is reachable only from pieces: characters the old model covered by byte
        # fallback join first
        chars = [c for c in dict.fromkeys(piece) if c not in known and c != piece]
        if len(new.tokens) + len(chars) + 1 > add:
            continue
        for text in [*chars, piece]:
            added = old.pieces.add(piece=text, score=lowest - 1 - len(new.tokens))
            added.type = added.NORMAL
            new.tokens.append(text)
            new.ids.append(len(old.pieces) - 1)
            new.parts.append(_old_ids(processor, text))
            known.add(text)
    out.write_bytes(old.SerializeToString())
    return new


def _train(texts: list[str], add: int) -> bytes:
    """A BPE SentencePiece model of the corpus, serialised; `add` pieces beyond its characters
    (SentencePiece needs room for every character it covers)."""
    import sentencepiece as spm

    buffer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=buffer,
            model_type="bpe",
            vocab_size=add + len(set("".join(texts))) + 3,
            hard_vocab_limit=False,  # a small corpus gives what it has
            character_coverage=0.9995,
            split_digits=True,
            max_sentence_length=1 << 16,
            minloglevel=2,
        )
    except RuntimeError as err:
        raise DataError(f"--corpus: SentencePiece could not learn {add} pieces ({err})") from err
    return buffer.getvalue()


def _old_ids(processor, piece: str) -> list[int]:
    """The old ids of a piece's text (its word-start '▁' kept, no extra one added)."""
    text = piece.replace("\u2581", " ")
    ids = processor.encode(text.lstrip(" ") if piece.startswith("\u2581") else text)
    space = processor.piece_to_id("\u2581")
    if not piece.startswith("\u2581") and ids and ids[0] == space:
        ids = ids[1:]  # the dummy prefix SentencePiece puts before any text
    return ids
