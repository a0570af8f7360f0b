"""Outputs written atomically: built beside their final place, renamed in when complete.

with atomic_output(Path("out/model.gguf"), overwrite=False) as tmp:
    write_file(tmp)          # a failure here removes tmp; out/model.gguf is untouched
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from corral.utils.disk import disk_full_error
from corral.utils.errors import ExportError


@contextlib.contextmanager
def atomic_output(target: Path, *, overwrite: bool, folder: bool) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it replaces `target`.

    Args:
        target: the final file or folder.
        overwrite: replace an existing `target`; otherwise an existing one is an error.
        folder: the output is a folder (the temporary path is created) rather than a file.

    Raises:
        ExportError: `target` exists and `overwrite` is false, before anything is written.
    """
    if target.exists() and not overwrite:
        raise ExportError(
            f"output '{target}' already exists; pass --overwrite to replace it or choose "
            "another --output"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}.tmp-"
    if folder:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
        tmp.chmod(0o755)
    else:
        handle, name = tempfile.mkstemp(prefix=prefix, dir=target.parent)
        os.close(handle)
        tmp = Path(name)
        tmp.chmod(0o644)  # mkstemp's 0600 would hide the file from other users
    try:
        yield tmp
        _replace(tmp, target)
    except Exception as error:
        full = disk_full_error(error, target, "writing", "nothing was replaced")
        if full is not None:
            raise ExportError(str(full)) from error
        raise
    finally:
        _remove(tmp)  # gone already after a successful rename


def _replace(tmp: Path, target: Path) -> None:
    if target.is_dir():
        shutil.rmtree(target)
    elif target.exists():
        target.unlink()
    os.rename(tmp, target)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()
