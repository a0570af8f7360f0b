"""The output folder: refuse to clobber work, find checkpoints to resume, save what describes a run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from corral.config import CorralConfig
from corral.model.artifacts import BASE_ADAPTERS, write_run_info
from corral.model.quantize import RUN_INFO_KEY as QUANT_KEY
from corral.model.quantize import quantization_record
from corral.model.rope import RUN_INFO_KEY as ROPE_KEY
from corral.model.rope import rope_record
from corral.train.callbacks import LOG_FILE, truncate_log
from corral.train.trainer import STAGING_PREFIX
from corral.utils.distributed import is_main_process
from corral.utils.errors import CorralError

CONFIG_FILE = "corral_config.yaml"
FINISHED_FILE = "train_results.json"  # written last, by a run that finished


def prepare_output_dir(config: CorralConfig) -> str | None:
    """Create output_dir, refusing a non-empty one unless overwriting or resuming.

    In a multi-process run only rank 0 checks and creates the folder; the others write in it
    only once training has started, after the collectives that follow. Resuming cuts
    trainer_log.jsonl back to the checkpoint's step, so the steps run again are logged once.

    Returns:
        The checkpoint folder to resume from, or None for a fresh run.
    """
    out = Path(config.output.output_dir)
    resume = config.train.resume_from_checkpoint
    if resume == "auto":  # resume an interrupted run, else start
        if (out / FINISHED_FILE).is_file():
            raise CorralError(
                f"output_dir '{out}' holds a finished run ({FINISHED_FILE}), so "
                "resume_from_checkpoint: auto has nothing to resume; set "
                "overwrite_output_dir=true to train it again, or choose another output_dir"
            )
        resume = "true" if _last_checkpoint(out) else None
    if resume is not None:
        checkpoint = _checkpoint_to_resume(out, resume)
        if is_main_process():
            truncate_log(out, checkpoint_step(checkpoint))
        return checkpoint
    if not is_main_process():
        return None
    written = [p.name for p in out.iterdir()] if out.is_dir() else []
    if written and not all(_unsaved_leftover(name) for name in written):
        if not config.output.overwrite_output_dir:
            raise CorralError(_not_empty_message(out))
        if (out / CONFIG_FILE).is_file():  # only ever delete what corral itself wrote
            shutil.rmtree(out)
    # What is left is a run that failed or was killed before its first checkpoint: its rerun
    # starts afresh without overwrite_output_dir, and must not append to its log.
    truncate_log(out, 0)
    out.mkdir(parents=True, exist_ok=True)
    return None


def _unsaved_leftover(name: str) -> bool:
    """Whether a file in output_dir is one a run writes before it has saved anything."""
    return name in (CONFIG_FILE, LOG_FILE) or name.startswith(STAGING_PREFIX)


def _not_empty_message(out: Path) -> str:
    last = _last_checkpoint(out)
    if last is not None and not (out / FINISHED_FILE).is_file():
        return (
            f"output_dir '{out}' holds an interrupted run (last complete checkpoint: "
            f"{Path(last).name}); rerun with resume_from_checkpoint=true to continue it (or set "
            "resume_from_checkpoint: auto, which resumes whenever there is a checkpoint), "
            "overwrite_output_dir=true to start over, or choose another output_dir"
        )
    return (
        f"output_dir '{out}' is not empty; set overwrite_output_dir=true to replace it, "
        "resume_from_checkpoint=true to continue it, or choose another output_dir"
    )


def _last_checkpoint(out: Path) -> str | None:
    """The highest checkpoint-N folder; corral writes one only once complete (`WholeCheckpoints`)."""
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(out)) if out.is_dir() else None


def checkpoint_step(checkpoint: str | Path) -> int:
    """The global step a checkpoint folder was saved at (its trainer_state.json)."""
    from transformers.trainer import TRAINER_STATE_NAME

    state = Path(checkpoint) / TRAINER_STATE_NAME
    try:
        return int(json.loads(state.read_text())["global_step"])
    except (OSError, ValueError, KeyError) as error:
        raise CorralError(
            f"resume_from_checkpoint: '{checkpoint}' is not a complete checkpoint "
            f"(cannot read {state.name}: {error})"
        ) from error


def _checkpoint_to_resume(out: Path, resume: str) -> str:
    if resume == "true":
        last = _last_checkpoint(out)
        if last is None:
            raise CorralError(
                f"resume_from_checkpoint=true but '{out}' holds no checkpoint-N folder"
            )
        return last
    if not Path(resume).is_dir():
        raise CorralError(f"resume_from_checkpoint: checkpoint folder '{resume}' does not exist")
    return resume


def save_final(
    trainer: Any,
    config: CorralConfig,
    base_model: str,
    template_name: str | None,
    default_system: str | None = None,
    *,
    base_adapters: list[str] | None = None,
) -> None:
    """Save the model or adapter with its tokenizer, template, config and run info.

    `base_adapters`: adapters merged into the base before a LoRA adapter was trained on it,
    recorded so that loading the adapter loads them first (`with_base_adapters`).
    Scaled RoPE settings are recorded too, so an adapter's base is loaded with them again, and
    a quantised (QLoRA) base's quantisation, so export can say what it merges into.
    """
    out = config.output.output_dir
    # every process: under sharded engines saving gathers the weights; rank 0 writes them
    trainer.save_model(out)  # safetensors + tokenizer (whose chat_template is the trained one)
    trainer.save_state()
    if not is_main_process():
        return
    config.save(Path(out) / CONFIG_FILE)
    write_run_info(
        out,
        base_model=base_model,
        template=template_name,
        stage=config.method.stage,
        finetuning_type=config.method.finetuning_type,
        datasets=config.data.dataset,
        extra={
            **({"default_system": default_system} if default_system is not None else {}),
            **({BASE_ADAPTERS: base_adapters} if base_adapters else {}),
            **({ROPE_KEY: rope} if (rope := rope_record(trainer.model.config)) else {}),
            **({QUANT_KEY: q} if (q := quantization_record(config.model)) else {}),
        }
        or None,
    )
