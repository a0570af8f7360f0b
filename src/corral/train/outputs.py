"""The output folder: refuse to clobber work, find checkpoints to resume, save what describes a run."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from corral.config import CorralConfig
from corral.model.artifacts import BASE_ADAPTERS, write_run_info
from corral.model.quantize import RUN_INFO_KEY as QUANT_KEY
from corral.model.quantize import quantization_record
from corral.model.rope import RUN_INFO_KEY as ROPE_KEY
from corral.model.rope import rope_record
from corral.utils.errors import CorralError

CONFIG_FILE = "corral_config.yaml"


def prepare_output_dir(config: CorralConfig) -> str | None:
    """Create output_dir, refusing a non-empty one unless overwriting or resuming.

    Returns:
        The checkpoint folder to resume from, or None for a fresh run.
    """
    out = Path(config.output.output_dir)
    resume = config.train.resume_from_checkpoint
    if resume is not None:
        return _checkpoint_to_resume(out, resume)
    # A folder holding only the config is a run that failed before training (a missing model,
    # a dataset typo): its rerun must not need overwrite_output_dir.
    written = [p.name for p in out.iterdir()] if out.is_dir() else []
    if written and written != [CONFIG_FILE]:
        if not config.output.overwrite_output_dir:
            raise CorralError(
                f"output_dir '{out}' is not empty; set overwrite_output_dir=true to replace it, "
                "resume_from_checkpoint=true to continue it, or choose another output_dir"
            )
        if (out / CONFIG_FILE).is_file():  # only ever delete what corral itself wrote
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return None


def _checkpoint_to_resume(out: Path, resume: str) -> str:
    from transformers.trainer_utils import get_last_checkpoint

    if resume == "true":
        last = get_last_checkpoint(str(out)) if out.is_dir() else None
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
    trainer.save_model(out)  # safetensors + tokenizer (whose chat_template is the trained one)
    trainer.save_state()
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
