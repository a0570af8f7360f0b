"""The README.md model card of an exported folder: what it was made from, and how to load it."""

from __future__ import annotations

import json
from pathlib import Path

from corral import __version__
from corral.export.merge import MergedModel
from corral.model.reward import has_value_head

CONFIG_FILE = "corral_config.yaml"  # the resolved config corral train saves beside its output


def model_card(merged: MergedModel, name: str) -> str:
    """Markdown with YAML front matter: base model, adapters, template, datasets, training facts."""
    datasets = sorted({d for info in merged.run_infos for d in info.get("datasets") or []})
    template = merged.template.name if merged.template else "none"
    # a reward model (stage: rm) is a one-label sequence classifier: its score head, no LM head
    reward = has_value_head(merged.model)
    auto = "AutoModelForSequenceClassification" if reward else "AutoModelForCausalLM"
    pipeline = "text-classification" if reward else "text-generation"
    front = ["---", "library_name: transformers", f"pipeline_tag: {pipeline}"]
    if merged.base_model not in ("", "default"):
        front.append(f"base_model: {json.dumps(merged.base_model)}")
    front += ["tags:", "  - corral", "  - llama", "---", ""]
    lines = [
        f"# {name}",
        "",
        f"Exported by corral {__version__} with `corral export`: the base model with its "
        "adapters merged into the weights. It loads with plain transformers:",
        "",
        "```python",
        f"from transformers import {auto}, AutoTokenizer",
        f'model = {auto}.from_pretrained("{name}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
        "```",
        "",
        "| | |",
        "|---|---|",
        f"| base model | {merged.source.name} |",
        f"| adapters | {', '.join(merged.adapters) or 'none'} |",
        f"| chat template | {template} (in tokenizer_config.json) |",
        f"| datasets | {', '.join(datasets) or 'unknown'} |",
        f"| merge check | max logit difference {merged.max_merge_diff:.2e} (fp32) |",
    ]
    for info in merged.run_infos:
        if info.get("stage"):
            lines.append(f"| training | stage {info['stage']}, {info.get('finetuning_type')} |")
    lines += _training_configs(merged)
    return "\n".join(front + lines) + "\n"


def _training_configs(merged: MergedModel) -> list[str]:
    lines = []
    for folder in merged.adapters:
        path = Path(folder).expanduser() / CONFIG_FILE
        if path.is_file():
            text = path.read_text(encoding="utf-8").rstrip()
            lines += ["", f"## Training config of `{folder}`", "", "```yaml", text, "```"]
    return lines
