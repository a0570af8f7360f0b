"""Find datasets by name: dataset_info.json entries, corral's built-in datasets, or file paths.

The registry format is LLaMA-Factory's `dataset_info.json`, so its data folders work as is:

    "alpaca_en_demo": {"file_name": "alpaca_en_demo.json"},
    "kto_en_demo": {"file_name": "kto_en_demo.json", "formatting": "sharegpt",
                    "columns": {"messages": "messages", "kto_tag": "label"},
                    "tags": {"role_tag": "role", "content_tag": "content",
                             "user_tag": "user", "assistant_tag": "assistant"}},
    "c4_demo": {"file_name": "c4_demo.jsonl", "columns": {"prompt": "text"}}

A name is looked up in `dataset_dir/dataset_info.json`, then in corral's built-in registry
(`identity`), then tried as a file or folder path. corral reads local files only: entries that
point at a hub (hf_hub_url, ms_hub_url, ...) are reported with how to download them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from corral.data.formats import FORMATTINGS, guess_format
from corral.data.readers import list_data_files, read_rows
from corral.utils.errors import DataError
from corral.utils.suggest import did_you_mean

BUILTIN_DIR = Path(__file__).resolve().parents[1] / "resources" / "data"
REGISTRY_FILE = "dataset_info.json"

_HUB_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
_ENTRY_KEYS = (
    "file_name",
    *_HUB_KEYS,
    "formatting",
    "ranking",
    "subset",
    "split",
    "folder",
    "num_samples",
    "columns",
    "tags",
    "file_sha1",  # older LLaMA-Factory registries carry it; nothing to check it against here
)
COLUMN_KEYS = (
    "prompt",
    "query",
    "response",
    "history",
    "messages",
    "system",
    "tools",
    "chosen",
    "rejected",
    "kto_tag",
    "images",
    "videos",
    "audios",
)
TAG_KEYS = (
    "role_tag",
    "content_tag",
    "user_tag",
    "assistant_tag",
    "observation_tag",
    "function_tag",
    "system_tag",
)
_MEDIA_COLUMNS = ("images", "videos", "audios")


@dataclass
class DatasetSpec:
    """One dataset to read, resolved from a registry entry or a file path.

    Attributes:
        name: The name the user wrote.
        path: The data file or folder; None for hub-only entries.
        formatting: alpaca, sharegpt, openai (sharegpt with role/content defaults) or text.
        columns: Column mapping as written in the entry (defaults live in `formats`).
        tags: ShareGPT role/content tags as written in the entry.
        ranking: Paired preference data (chosen/rejected).
        split: The split to read; local files have only "train".
        num_samples: Sample this many examples (seeded; repeats when larger than the data).
        hub_url: Where a hub-only entry lives, e.g. "hf: llamafactory/alpaca_en".
        origin: Where the entry came from, for error messages.
    """

    name: str
    path: Path | None = None
    formatting: str = "alpaca"
    columns: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    ranking: bool = False
    split: str = "train"
    num_samples: int | None = None
    hub_url: str | None = None
    origin: str = ""


def resolve_datasets(names: list[str], dataset_dir: str | Path) -> list[DatasetSpec]:
    """Resolve dataset names to readable local datasets, failing early on any problem.

    Args:
        names: Registry names or file/folder paths, as the user wrote them.
        dataset_dir: The folder holding dataset_info.json; relative file_name entries and
            relative paths are looked up in it.

    Raises:
        DataError: an unknown name (with the registered names), a hub-only entry, a missing
            file, a split other than train, an invalid entry, or media columns.
    """
    dataset_dir = Path(dataset_dir)
    local = _read_registry(dataset_dir / REGISTRY_FILE)
    builtin = _read_registry(BUILTIN_DIR / REGISTRY_FILE)
    specs = []
    for name in (n.strip() for n in names):
        if name in local:
            spec = spec_from_entry(name, local[name], dataset_dir, str(dataset_dir / REGISTRY_FILE))
        elif name in builtin:
            spec = spec_from_entry(name, builtin[name], BUILTIN_DIR, "corral's built-in registry")
        elif (path := _as_path(name, dataset_dir)) is not None:
            spec = _spec_from_path(name, path)
        else:
            raise _unknown(name, dataset_dir, registered_names(dataset_dir))
        _check_usable(spec)
        specs.append(spec)
    return specs


def registered_names(dataset_dir: str | Path) -> list[str]:
    """The dataset names `dataset_dir/dataset_info.json` and the built-in registry define."""
    local = _read_registry(Path(dataset_dir) / REGISTRY_FILE)
    builtin = _read_registry(BUILTIN_DIR / REGISTRY_FILE)
    return list(local) + [name for name in builtin if name not in local]


def spec_from_entry(name: str, entry: object, base_dir: Path, origin: str) -> DatasetSpec:
    """Build a spec from one dataset_info.json entry (not yet checked for readability).

    Raises:
        DataError: an entry that is not an object, unknown keys, or values of the wrong type.
    """
    where = f"{origin}, entry '{name}'"
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected an object, got {type(entry).__name__}")
    _check_keys(where, entry, _ENTRY_KEYS, "key")
    columns = _string_map(where, entry, "columns", COLUMN_KEYS)
    tags = _string_map(where, entry, "tags", TAG_KEYS)
    formatting = entry.get("formatting", "alpaca")
    if formatting not in FORMATTINGS:
        raise DataError(
            f"{where}: formatting '{formatting}' is not one of {', '.join(FORMATTINGS)}"
            f"{did_you_mean(str(formatting), FORMATTINGS)}"
        )
    ranking = entry.get("ranking", False)
    num_samples = entry.get("num_samples")
    if not isinstance(ranking, bool):
        raise DataError(f"{where}: ranking must be true or false, got {ranking!r}")
    if num_samples is not None and (type(num_samples) is not int or num_samples < 1):
        raise DataError(
            f"{where}: num_samples must be a positive whole number, got {num_samples!r}"
        )
    file_name = entry.get("file_name")
    path = base_dir / file_name if file_name else None
    # LLaMA-Factory's pre-training entries are alpaca entries that map only `prompt`.
    if formatting == "alpaca" and (set(columns) == {"prompt"} or _is_txt(path)):
        formatting = "text"
    hub = next(
        (f"{key.removesuffix('_url')}: {entry[key]}" for key in _HUB_KEYS if key in entry), None
    )
    return DatasetSpec(
        name=name,
        path=path,
        formatting=formatting,
        columns=columns,
        tags=tags,
        ranking=ranking,
        split=str(entry.get("split", "train")),
        num_samples=num_samples,
        hub_url=None if file_name else hub,
        origin=origin,
    )


def _read_registry(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        registry = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from None
    if not isinstance(registry, dict):
        raise DataError(f"{path}: expected an object mapping dataset names to entries")
    return registry


def _check_keys(where: str, mapping: dict, allowed: tuple[str, ...], what: str) -> None:
    for key in mapping:
        if key not in allowed:
            raise DataError(
                f"{where}: unknown {what} '{key}'{did_you_mean(key, allowed)}; "
                f"allowed: {', '.join(allowed)}"
            )


def _string_map(where: str, entry: dict, key: str, allowed: tuple[str, ...]) -> dict[str, str]:
    mapping = entry.get(key) or {}
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise DataError(f'{where}: "{key}" must map names to strings, got {mapping!r}')
    _check_keys(f'{where}, "{key}"', mapping, allowed, key.rstrip("s"))
    return dict(mapping)


def _is_txt(path: Path | None) -> bool:
    return path is not None and path.suffix.lower() == ".txt"


def _as_path(name: str, dataset_dir: Path) -> Path | None:
    for candidate in (Path(name).expanduser(), dataset_dir / name):
        if candidate.exists():
            return candidate
    return None


def _spec_from_path(name: str, path: Path) -> DatasetSpec:
    first_file = list_data_files(path)[0]
    first_row = next(iter(read_rows(first_file)), (0, None))[1]
    if first_row is None:
        raise DataError(f"dataset '{name}': {first_file} holds no rows")
    formatting, columns, ranking = guess_format(first_file, first_row)
    return DatasetSpec(
        name=name,
        path=path,
        formatting=formatting,
        columns=columns,
        ranking=ranking,
        origin="a file path (format guessed from its first row)",
    )


def _check_usable(spec: DatasetSpec) -> None:
    if spec.path is None:
        _raise_not_local(spec)
    media = [key for key in _MEDIA_COLUMNS if key in spec.columns]
    if media:
        raise DataError(
            f"dataset '{spec.name}' ({spec.origin}) maps {', '.join(media)}: corral trains on "
            "text only; use a text dataset"
        )
    if spec.split != "train":
        raise DataError(
            f"dataset '{spec.name}' ({spec.origin}) asks for split '{spec.split}', but a local "
            "file has only a 'train' split; point file_name at the file holding that split and "
            'drop "split"'
        )
    if not spec.path.exists():
        raise DataError(
            f"dataset '{spec.name}': file_name points at {spec.path}, which does not exist "
            f"(entry in {spec.origin})"
        )


def _raise_not_local(spec: DatasetSpec) -> None:
    where = f"dataset '{spec.name}' ({spec.origin})"
    if spec.hub_url is None:
        raise DataError(f'{where} has no file_name: add "file_name" pointing at a local file')
    hub, _, repo = spec.hub_url.partition(": ")
    how = (
        f"e.g. `huggingface-cli download --repo-type dataset {repo} --local-dir {spec.name}`"
        if hub == "hf_hub"
        else f"from {hub.replace('_', ' ')} '{repo}'"
    )
    raise DataError(
        f"{where} lives on a hub ({spec.hub_url}); corral reads local files only and does not "
        f"download datasets. Download it ({how}) into the dataset folder and add "
        f'"file_name": "{spec.name}" to its entry'
    )


def _unknown(name: str, dataset_dir: Path, known: list[str]) -> DataError:
    registry = dataset_dir / REGISTRY_FILE
    where = f"not in {registry}" if registry.is_file() else f"there is no {registry}"
    return DataError(
        f"dataset '{name}' not found{did_you_mean(name, known)}: {where}, it is not built into "
        f"corral, and it is not a file or folder. Registered datasets: {', '.join(known)}"
    )
