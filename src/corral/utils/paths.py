"""Where corral keeps its caches."""

from __future__ import annotations

import os
from pathlib import Path


def corral_home() -> Path:
    """The cache root: `$CORRAL_HOME`, else `~/.cache/corral`."""
    return Path(os.environ.get("CORRAL_HOME") or Path.home() / ".cache" / "corral").expanduser()
