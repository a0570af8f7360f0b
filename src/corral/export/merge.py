"""Load a base model with its adapters merged into the weights, and check the merge.

Each adapter is attached unmerged, its logits on a few prompts are taken, then it is merged
and the logits are taken again: they must agree to `MERGE_TOLERANCE`, else the export stops.
The merge and the check run in float64 (twice the fp32 memory while merging), and the merged
weights are then rounded to fp32. A QLoRA adapter merges the same way, into the full-precision
base (not the quantised one it was trained on). The template the model was trained with comes along, for the tokenizer and the GGUF.

    merged = load_merged(ModelConfig(adapter_name_or_path=["saves/sft"]))
    merged.model, merged.tokenizer, merged.template.name     # ..., ..., 'chatml'
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from corral.config.fields import ModelConfig
from corral.data.templates import Template, encode_prompt, get_template
from corral.model.artifacts import find_run_info
from corral.model.load import (
    ModelSource,
    attach_adapter,
    check_adapter_folders,
    load_model,
    load_tokenizer,
    resolve_base_for_adapters,
    resolve_model,
    unmergeable_prompt_adapter,
)
from corral.model.prompt_learning import is_prompt_adapter
from corral.model.quantize import RUN_INFO_KEY as QUANTIZATION_KEY
from corral.model.quantize import describe
from corral.model.reward import wants_value_head
from corral.model.tokens import fit_embeddings
from corral.utils.errors import CorralError, ExportError
from corral.utils.log import get_logger

MERGE_TOLERANCE = 1e-4  # max abs logit difference, merged vs base + adapter
PROBES = (
    [{"role": "user", "content": "Hello! Who are you?"}],
    [{"role": "user", "content": "List three prime numbers and explain why they are prime."}],
    [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
    ],
)


@dataclass
class MergedModel:
    """A model with its adapters merged, and what describes it.

    Attributes:
        model: the merged transformers model (fp32, eval mode).
        tokenizer: its tokenizer (the last adapter's, when training saved one).
        template: the chat template it was trained with; None for a model without one.
        source: the base model.
        base_model: the base model as recorded (what the user or the adapter named).
        adapters: the adapter folders merged, in order.
        run_infos: `corral_run.json` of the base folder and of each adapter, where present.
        max_merge_diff: the largest logit difference the merge check saw (0 without adapters).
    """

    model: Any
    tokenizer: Any
    template: Template | None
    source: ModelSource
    base_model: str
    adapters: list[str] = field(default_factory=list)
    run_infos: list[dict] = field(default_factory=list)
    max_merge_diff: float = 0.0

    def tokenizer_folders(self) -> list[Path]:
        """Folders that may hold the original tokenizer files, most specific first."""
        folders = [Path(a).expanduser() for a in reversed(self.adapters)]
        if self.source.kind in ("folder", "default"):
            folders.append(Path(self.model.name_or_path or self.source.path))
        return folders


def load_merged(model_config: ModelConfig) -> MergedModel:
    """Load `model_config`'s base model in fp32 and merge its adapters, checking each merge.

    Raises:
        ModelError: a model or adapter cannot be found, or an adapter does not fit the base.
        ExportError: merging changed the logits by more than `MERGE_TOLERANCE`.
    """
    if model_config.quantization_bit is not None:
        raise ExportError(
            f"quantization_bit: {model_config.quantization_bit}: export merges adapters into the "
            "full-precision base (a QLoRA adapter too); remove quantization_bit"
        )
    config = resolve_base_for_adapters(replace(model_config, dtype="float32"))
    adapters = list(config.adapter_name_or_path or [])
    check_adapter_folders(adapters)
    for adapter in filter(is_prompt_adapter, adapters):
        raise ExportError(f"corral export: {unmergeable_prompt_adapter(adapter)}")
    source = resolve_model(config.model_name_or_path)
    # a reward model's base gets its score head before the (rm) adapter is attached
    model, tokenizer = load_model(
        replace(config, adapter_name_or_path=None),
        for_training=True,
        value_head=wants_value_head(config),
    )
    if adapters:  # the tokenizer saved beside the adapter (with its trained template) wins
        tokenizer = load_tokenizer(config)
        fit_embeddings(model, tokenizer)  # rows for the tokens an adapter trained with added
    template = _template(config.template, tokenizer)
    probes = probe_ids(tokenizer, template)
    worst = 0.0
    if adapters:
        # Merge and check in float64: fp32 rounding alone moves a 135M model's logits (of size
        # ~25) by ~1e-4, which would hide a small merge error or fail a correct merge.
        model = model.double()
    for adapter in adapters:
        _note_quantized_base(adapter)
        attached = attach_adapter(model, adapter, source)
        expected = _logits(attached, probes)
        model = attached.merge_and_unload()
        worst = max(worst, _check_merge(expected, _logits(model, probes), adapter))
        get_logger().info(f"merged adapter {adapter} (max logit difference {worst:.2e})")
    model = model.float()
    infos = [find_run_info(p) for p in (source.path, *adapters) if Path(p).exists()]
    return MergedModel(
        model.eval(),
        tokenizer,
        template,
        source,
        config.model_name_or_path,
        adapters,
        [i for i in infos if i],
        worst,
    )


def _note_quantized_base(adapter: str) -> None:
    record = (find_run_info(adapter) or {}).get(QUANTIZATION_KEY)
    if record:
        get_logger().info(
            f"adapter {adapter} was trained on a {describe(record)} quantised base (QLoRA): "
            "merging it into the full-precision base"
        )


def _template(name: str | None, tokenizer: Any) -> Template | None:
    try:
        return get_template(name, tokenizer)
    except CorralError:
        if name is not None:
            raise
        get_logger().warning("the model has no chat template: exporting it without one")
        return None


def probe_ids(tokenizer: Any, template: Template | None) -> list[list[int]]:
    """A few prompts' token ids, rendered with the model's template when it has one."""
    if template is not None:
        return [encode_prompt(template, tokenizer, messages) for messages in PROBES]
    texts = [" ".join(m["content"] for m in messages) for messages in PROBES]
    return [tokenizer(text)["input_ids"] for text in texts]


def _logits(model: Any, probes: list[list[int]]) -> list[Any]:
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        return [model(torch.tensor([ids], device=device)).logits[0] for ids in probes]


def _check_merge(expected: list[Any], merged: list[Any], adapter: str) -> float:
    worst = max(float((a - b).abs().max()) for a, b in zip(expected, merged, strict=True))
    if not worst <= MERGE_TOLERANCE:  # also catches NaN
        raise ExportError(
            f"merging adapter '{adapter}' changed the model's logits by up to {worst:.3g} "
            f"(allowed: {MERGE_TOLERANCE:g}, computed in float64); the merged weights are not the base model "
            "plus this adapter, so nothing was exported"
        )
    return worst
