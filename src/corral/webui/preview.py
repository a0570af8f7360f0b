"""Preview a training config's first examples: rendered through the template, with the tokens
training learns from told apart from the masked ones (label -100)."""

from __future__ import annotations

from typing import Any

from corral.config.parse import CorralConfig

IGNORE = -100


def preview_examples(config: CorralConfig, count: int = 3) -> list[tuple[str, str | None]]:
    """(text, "trained" | "masked") pieces of the first `count` tokenised examples.

    Raises:
        CorralError: a model, template or dataset the training run would refuse.
    """
    from corral.data.dataset import build_dataset
    from corral.data.templates import get_template
    from corral.model.load import load_tokenizer, resolve_base_for_adapters
    from corral.train.stages import get_stage

    model_config = resolve_base_for_adapters(config.model)
    tokenizer = load_tokenizer(model_config)
    template = get_template(model_config.template, tokenizer, tool_format=model_config.tool_format)
    stage = get_stage(config.method.stage)
    data = config.data
    small = type(data)(**{**data.__dict__, "max_samples": min(data.max_samples or count, count)})
    built = build_dataset(
        small, tokenizer, template, kind=stage.dataset_kind, seed=config.train.seed
    )
    pieces: list[tuple[str, str | None]] = []
    for row in built.train.select(range(min(count, len(built.train)))):
        for ids_key in [k for k in row if k.endswith("input_ids")]:
            labels = row.get(ids_key.replace("input_ids", "labels"))
            pieces += _spans(tokenizer, row[ids_key], labels)
            pieces.append(("\n\n", None))
    return pieces


def _spans(tokenizer: Any, ids: list[int], labels: list[int] | None) -> list[tuple[str, str]]:
    """Consecutive tokens with the same role, decoded together."""
    roles = ["masked" if labels is None or x == IGNORE else "trained" for x in labels or ids]
    spans, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or roles[i] != roles[start]:
            spans.append((tokenizer.decode(ids[start:i]), roles[start]))
            start = i
    return spans
