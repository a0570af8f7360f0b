"""The Train tab's fields, derived from the config's field metadata (never a second list).

The page promises the keys in `SECTIONS` up front; every other key of `TRAIN_GROUPS` sits in the
"advanced" fold, so keys added to `corral.config.fields` appear on the page by themselves.
Values travel as the text a user would type after `key=` on the command line.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from corral.config.fields import GROUPS, all_fields
from corral.config.parse import build_config, parse_overrides

# The keys people change most, by section; the rest of TRAIN_GROUPS is "advanced".
SECTIONS = {
    "model": ("model_name_or_path", "adapter_name_or_path", "template"),
    "method": (
        "stage",
        "finetuning_type",
        "lora_rank",
        "lora_alpha",
        "lora_dropout",
        "lora_target",
        "pref_loss",
        "pref_beta",
        "reward_model",
        "reward_funcs",
    ),
    "data": ("dataset_dir", "dataset", "cutoff_len", "max_samples", "val_size"),
    "hyper": (
        "learning_rate",
        "num_train_epochs",
        "max_steps",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "lr_scheduler_type",
        "warmup_ratio",
        "logging_steps",
        "save_steps",
        "output_dir",
    ),
}
# Groups a training run reads (export's keys belong to the Export tab).
TRAIN_GROUPS = ("model", "data", "method", "train", "output", "generation", "eval")
# Keys the page sets itself (a resumed run gets resume_from_checkpoint=true).
MANAGED = ("resume_from_checkpoint",)


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """One config key as the page shows it."""

    key: str
    kind: str  # "choice", "bool", "optional_bool" or "text"
    default: Any  # the text (or bool) the widget starts with
    choices: tuple[str, ...] | None
    help: str


def promised_keys() -> list[str]:
    """The keys shown outside the advanced fold."""
    return [key for keys in SECTIONS.values() for key in keys]


def advanced_keys() -> list[str]:
    """Every other key of the groups a training run reads, in the config's order."""
    shown = set(promised_keys()) | set(MANAGED)
    return [
        f.name
        for group in TRAIN_GROUPS
        for f in dataclasses.fields(GROUPS[group])
        if f.name not in shown
    ]


def field_spec(key: str) -> FieldSpec:
    """The widget for `key`: its kind, starting value, allowed values and help text."""
    _, f = all_fields()[key]
    type_text = str(f.type).replace(" ", "")
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    choices = f.metadata["choices"]
    if type_text == "bool":
        return FieldSpec(key, "bool", bool(default), None, f.metadata["help"])
    if type_text == "bool|None":
        return FieldSpec(key, "optional_bool", "", ("", "true", "false"), f.metadata["help"])
    if choices:
        options = ("", *choices) if "|None" in type_text else tuple(choices)
        return FieldSpec(key, "choice", to_text(default), options, f.metadata["help"])
    return FieldSpec(key, "text", to_text(default), None, f.metadata["help"])


def to_text(value: Any) -> str:
    """A value as typed after `key=`: lists comma-separated, None empty."""
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def overrides_from(values: dict[str, Any]) -> dict[str, Any]:
    """The keys whose widget differs from the config default, parsed as `key=value` would be.

    Raises:
        ConfigError: a value the CLI would refuse for the same override.
    """
    changed = {}
    for key, value in values.items():
        spec = field_spec(key)
        text = to_text(value) if not isinstance(value, str) else value.strip()
        if spec.kind == "bool":
            if bool(value) != spec.default:
                changed[key] = bool(value)
        elif text != spec.default:
            changed[key] = parse_overrides([f"{key}={text}"])[key]
    build_config(changed)  # the same validation (and the same message) as `corral train`
    return changed


def values_from_config(raw: dict[str, Any]) -> dict[str, Any]:
    """Widget values for a loaded YAML mapping (keys the page does not show are dropped)."""
    config = build_config(raw).to_dict()
    return {
        key: (config[key] if field_spec(key).kind == "bool" else to_text(config[key]))
        for key in promised_keys() + advanced_keys()
    }
