"""Recognising a full disk behind the many ways libraries report a failed write.

try:
    write(folder)
except Exception as error:
    if (full := disk_full_error(error, folder, "saving")) is not None:
        raise full from error
    raise
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from corral.utils.errors import CorralError

_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_WORDS = ("no space left", "os error 28", "disk quota exceeded")
# torch.save reports a failed write only as "unexpected pos ..." or "file write failed"; below
# this much free space such an error is taken for a full disk.
_NEARLY_FULL_BYTES = 64 * 2**20


def is_disk_full(error: BaseException, path: str | Path) -> bool:
    """Whether `error`, raised while writing under `path`, means that its disk is full."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _FULL_ERRNOS:
            return True
        if any(words in str(seen).lower() for words in _FULL_WORDS):
            return True
        seen = seen.__cause__ or seen.__context__
    return isinstance(error, RuntimeError) and _free_bytes(path) < _NEARLY_FULL_BYTES


def disk_full_error(
    error: BaseException, path: str | Path, doing: str, advice: str = ""
) -> CorralError | None:
    """A CorralError naming `path` when `error` means its disk is full, else None.

    Args:
        error: what the write raised.
        path: the file or folder being written.
        doing: what was being done, for the message ("saving", "writing").
        advice: what is intact and how to go on, appended to the message.
    """
    if not is_disk_full(error, path):
        return None
    free = _free_bytes(path) / 2**20
    message = f"disk full while {doing} '{path}' ({free:.0f} MiB free there): free some space"
    return CorralError(f"{message}{'; ' + advice if advice else ''}")


def _free_bytes(path: str | Path) -> int:
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return _NEARLY_FULL_BYTES
