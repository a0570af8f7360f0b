"""Every output folder corral writes describes itself in `corral_run.json`.

The file records what the folder was trained from (base model, chat template, stage, method,
datasets), so `chat`, `serve`, `export` and `eval` can load an adapter folder alone:

    write_run_info("saves/sft", base_model="default", template="chatml", stage="sft")
    read_run_info("saves/sft")["base_model"]        # 'default'
    find_run_info("saves/sft/checkpoint-200")       # the run folder's info
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from corral import __version__
from corral.utils.errors import ModelError

RUN_INFO = "corral_run.json"
# Adapters merged into the base before a LoRA adapter was trained (it only works on top of them).
BASE_ADAPTERS = "base_adapters"
_CORE_KEYS = (
    "corral_version",
    "created",
    "base_model",
    "template",
    "stage",
    "finetuning_type",
    "datasets",
)


def write_run_info(
    folder: str | os.PathLike,
    *,
    base_model: str,
    template: str | None,
    stage: str | None = None,
    finetuning_type: str | None = None,
    datasets: list[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write `corral_run.json` into `folder` (atomically: a reader never sees half a file).

    Args:
        folder: the output folder (created if missing).
        base_model: the base model as the user named it: 'default', a hub id or a local path.
            Local paths are stored absolute so the record still works from another directory.
        template: the chat template the model was trained with.
        stage: training stage (pt, sft, ...).
        finetuning_type: full, freeze or lora.
        datasets: the dataset names or files trained on.
        extra: more JSON-serialisable facts; they may not reuse the core keys.

    Returns:
        The path of the written file.

    Raises:
        ValueError: when `extra` repeats a core key.
    """
    clash = sorted(set(extra or {}) & set(_CORE_KEYS))
    if clash:
        raise ValueError(f"write_run_info: extra may not set the core keys {clash}")
    info = {
        "corral_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "base_model": _portable_base(base_model),
        "template": template,
        "stage": stage,
        "finetuning_type": finetuning_type,
        "datasets": list(datasets) if datasets else None,
        **(extra or {}),
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / RUN_INFO
    tmp = path.with_name(f".{RUN_INFO}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_run_info(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The run info in `folder`, or None when the folder has none.

    Raises:
        ModelError: when the file exists but is not a JSON object.
    """
    path = Path(folder).expanduser() / RUN_INFO
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ModelError(
            f"'{path}' is not valid JSON (line {err.lineno}, column {err.colno}): {err.msg}; "
            "fix or delete it"
        ) from err
    if not isinstance(info, dict):
        raise ModelError(f"'{path}' should hold a JSON object, found {type(info).__name__}")
    return info


def find_run_info(folder_or_checkpoint: str | os.PathLike) -> dict[str, Any] | None:
    """The run info of a run folder or of one of its `checkpoint-N` folders.

    Checkpoints are saved inside the run folder, which holds the run info, so the folder itself
    is searched first, then its parent.
    """
    folder = Path(folder_or_checkpoint).expanduser()
    info = read_run_info(folder)
    if info is None:
        info = read_run_info(folder.resolve().parent)
    return info


def _portable_base(base_model: str) -> str:
    # A relative path only means something from the directory training ran in.
    path = Path(base_model).expanduser()
    if base_model not in ("", "default") and path.exists():
        return str(path.resolve())
    return base_model
