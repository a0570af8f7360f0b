"""Console output. Everything user-facing goes to stderr so `--prompt` stdout stays clean."""

from __future__ import annotations

import logging
import sys

from corral.utils.distributed import is_main_process

_logger = logging.getLogger("corral")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (a caller may redirect it), not the one
    that existed when the logger was first made."""

    @property
    def stream(self):  # noqa: D102
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def get_logger() -> logging.Logger:
    """The corral logger, writing `corral: message` lines to stderr; in a multi-process run,
    rank 0 alone logs below errors (every process would print the same)."""
    if not _logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[corral] %(message)s"))
        _logger.addHandler(handler)
        _logger.setLevel(logging.INFO if is_main_process() else logging.ERROR)
        _logger.propagate = False
    return _logger


def quiet_libraries() -> None:
    """Silence the progress bars and chatter of transformers/datasets that users did not ask for."""
    import os
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # peft still reads transformers' deprecated alias; the warning is about peft, not the user.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    # bitsandbytes (imported by peft too): on CPUs with AVX512-BF16 it looks for an optional Hub
    # kernel package and falls back to its own kernels; its 8-bit matmul says on every forward
    # that it computes in float16 (the README says so once).
    for name in ("bitsandbytes.backends.cpu.ops", "bitsandbytes.autograd._functions"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        import datasets

        datasets.utils.logging.set_verbosity_error()
        datasets.disable_progress_bars()
    except ImportError:
        pass
