"""Build one `CorralConfig` from a YAML file, `key=value` overrides and command-line flags.

Order of precedence (last wins): YAML file, `key=value` overrides, explicit command flags.
Unknown keys are errors with the closest valid name; LLaMA-Factory keys corral does not
support yet produce one warning listing them; every other problem is collected and reported
together in one `ConfigError`.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import yaml

from corral.config.checks import check_config
from corral.config.fields import GROUPS, STAGE_SHORTHANDS, all_fields
from corral.config.lf_keys import classify, refusal_message
from corral.utils.errors import ConfigError
from corral.utils.suggest import did_you_mean

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


@dataclasses.dataclass
class CorralConfig:
    """The whole configuration, one attribute per concern (see `corral.config.fields`)."""

    model: Any
    data: Any
    method: Any
    train: Any
    output: Any
    generation: Any
    eval: Any
    export: Any
    kb: Any
    # Warnings found while parsing (unsupported LLaMA-Factory keys); not part of the config.
    notes: list[str] = dataclasses.field(default_factory=list, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The resolved configuration as one flat mapping, in the key names users write."""
        flat: dict[str, Any] = {}
        for group in GROUPS:
            flat.update(dataclasses.asdict(getattr(self, group)))
        return flat

    def to_yaml(self) -> str:
        """The resolved configuration as YAML that `corral train` accepts back."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def save(self, path: str | Path) -> None:
        """Write the resolved configuration (what every output folder carries)."""
        Path(path).write_text(self.to_yaml(), encoding="utf-8")

    def replace(self, **overrides: Any) -> CorralConfig:
        """A validated copy with some flat keys changed."""
        return build_config({**self.to_dict(), **overrides})


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    flags: dict[str, Any] | None = None,
) -> CorralConfig:
    """Read, merge and validate a configuration.

    Args:
        path: a YAML file of flat `key: value` pairs, or None.
        overrides: `key=value` strings from the command line (values parsed as YAML scalars).
        flags: values of explicit command flags, already keyed by config name; None values
            are ignored (the flag was not given).

    Returns:
        The validated configuration.

    Raises:
        ConfigError: every problem found, with the key and value as the user wrote them.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        raw.update(read_yaml(path))
    raw.update(parse_overrides(overrides or []))
    raw.update({k: v for k, v in (flags or {}).items() if v is not None})
    return build_config(raw)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Load a flat YAML mapping, with errors that name the file (and line)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config file '{path}' does not exist"])
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError([f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: expected a mapping of key: value, got {type(data).__name__}"])
    return data


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ['lr=1e-4', 'dataset=a,b'] into a dict; values are parsed as YAML scalars."""
    parsed: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError([f"override '{item}' is not of the form key=value"])
        parsed[key.strip()] = _override_value(value)
    return parsed


def _override_value(value: str) -> Any:
    """A YAML scalar or list; text YAML cannot parse (`default_system=Note: be brief`) is kept
    as the string typed, for the field's own type check to judge."""
    if not value.strip():
        return None
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


# LLaMA-Factory spells some of corral's options differently; translate them so its YAML runs.
_ALIASES = {
    "disable_gradient_checkpointing": lambda v: {"gradient_checkpointing": not _to_bool_loose(v)},
    "infer_dtype": lambda v: {"dtype": v},
    "do_sample": lambda v: {} if _to_bool_loose(v) else {"temperature": 0.0},
    # corral's packing always keeps examples from attending to each other (LLaMA-Factory's
    # neat_packing); neat_packing asks for packing, as it does in LLaMA-Factory
    "neat_packing": lambda v: {"packing": True} if _to_bool_loose(v) else {},
    # Liger's fused kernels and corral's fused ops compute the same maths with less memory (its
    # default, false, leaves corral's default on: a speed choice, not a different result)
    "enable_liger_kernel": lambda v: {"fused_ops": True} if _to_bool_loose(v) else {},
    "use_liger_kernel": lambda v: {"fused_ops": True} if _to_bool_loose(v) else {},
    "use_cpu": lambda v: {"device": "cpu"} if _to_bool_loose(v) else {},
    "activation_checkpointing": lambda v: {"gradient_checkpointing": v},
    # LLaMA-Factory 0.9.4 renamed new_special_tokens to add_special_tokens
    "add_special_tokens": lambda v: {"new_special_tokens": v},
    # stage: orpo / simpo are dpo with that reference-free loss
    "stage": lambda v: {"stage": "dpo", "pref_loss": v} if v in STAGE_SHORTHANDS else {"stage": v},
}


def build_config(raw: dict[str, Any]) -> CorralConfig:
    """Validate a flat mapping of keys into a `CorralConfig` (see `load_config`)."""
    table = all_fields()
    values: dict[str, dict[str, Any]] = {group: {} for group in GROUPS}
    problems: list[str] = []
    unsupported: list[str] = []
    for key, value in _apply_aliases(raw).items():
        if key in table:
            group, f = table[key]
            converted = _convert(key, value, f, problems)
            if converted is not _INVALID:
                values[group][key] = converted
        elif (kind := classify(key, value)) == "harmless":
            unsupported.append(key)
        elif kind == "refused":
            problems.append(refusal_message(key, value))
        else:
            problems.append(f"unknown key '{key}'{did_you_mean(key, table)}")
    if problems:
        raise ConfigError(problems)
    config = CorralConfig(**{g: GROUPS[g](**values[g]) for g in GROUPS})
    if unsupported:
        config.notes.append(
            "ignoring keys that do not change what corral trains or writes: "
            + ", ".join(sorted(unsupported))
        )
    check_config(config)
    return config


def _apply_aliases(raw: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in raw.items():
        key = str(key)
        result.update(_ALIASES[key](value) if key in _ALIASES else {key: value})
    return result


_INVALID = object()


def _convert(key: str, value: Any, f: dataclasses.Field, problems: list[str]) -> Any:
    """Coerce `value` to the field's type and check its range; record a problem if it fails."""
    type_text = str(f.type).replace(" ", "")
    optional = "|None" in type_text
    base = type_text.replace("|None", "")
    if value is None or (isinstance(value, str) and value.strip() == "" and optional):
        if optional:
            return None
        problems.append(f"{key}: a value is required ({f.metadata['help']})")
        return _INVALID
    if key in _NO_EMPTY_ITEMS and _has_empty_item(value):
        problems.append(f"{key}: {value!r} has an empty token; separate tokens with one comma")
        return _INVALID
    try:
        converted = _coerce(base, value)
    except (TypeError, ValueError):
        problems.append(f"{key}: expected {_describe(base)}, got {value!r}")
        return _INVALID
    problem = _check_range(key, converted, f.metadata)
    if problem:
        problems.append(problem)
        return _INVALID
    return converted


# Lists where an empty item ('a,,b') is a typo, not a trailing comma to ignore.
_NO_EMPTY_ITEMS = ("new_special_tokens",)


def _has_empty_item(value: Any) -> bool:
    items = value.split(",") if isinstance(value, str) else value
    items = items if isinstance(items, list | tuple) else [items]
    return any(isinstance(x, str) and not x.strip() for x in items)


def _coerce(base: str, value: Any) -> Any:
    if base == "dict[str,Any]|str":  # a mapping written in YAML, or a file holding one
        return value if isinstance(value, dict) else _coerce("str", value)
    if base == "str":
        if isinstance(value, dict | list):
            raise TypeError
        return str(value)
    if base == "bool":
        return _to_bool(value)
    if base == "int":
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        return int(value)
    if base == "float":
        if isinstance(value, bool) or not math.isfinite(number := float(value)):
            raise ValueError  # inf and nan pass every range check, then break training
        return number
    if base.startswith("list["):
        item = base[5:-1]
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            items = [items]
        return [_coerce(item, x.strip() if isinstance(x, str) else x) for x in items if x != ""]
    raise TypeError(f"unsupported field type {base}")


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError


def _to_bool_loose(value: Any) -> bool:
    try:
        return _to_bool(value)
    except ValueError:
        return bool(value)


def _describe(base: str) -> str:
    return {
        "str": "a string",
        "bool": "true or false",
        "int": "an integer",
        "float": "a finite number",
        "list[str]": "a comma-separated list of names",
        "list[float]": "a comma-separated list of numbers",
        "dict[str,Any]|str": "a mapping or a file path",
    }.get(base, base)


def _check_range(key: str, value: Any, meta: dict[str, Any]) -> str | None:
    values = value if isinstance(value, list) else [value]
    for v in values:
        if meta["choices"] and v not in meta["choices"]:
            allowed = ", ".join(meta["choices"])
            return f"{key}: '{v}' is not one of: {allowed}{did_you_mean(str(v), meta['choices'])}"
        for bound, ok, word in (
            ("ge", lambda x, b: x >= b, ">="),
            ("gt", lambda x, b: x > b, ">"),
            ("le", lambda x, b: x <= b, "<="),
            ("lt", lambda x, b: x < b, "<"),
        ):
            if meta[bound] is not None and isinstance(v, int | float) and not ok(v, meta[bound]):
                return f"{key}: must be {word} {meta[bound]}, got {v}"
    return None
