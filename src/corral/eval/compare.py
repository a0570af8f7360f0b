"""`corral eval compare RUN_DIR...`: the metrics of several evaluation folders in one table.

    corral eval compare saves/eval/base saves/eval/tuned

Each folder is one `corral eval` output (or a training run's eval/ or predict/ folder) holding
metrics.json. Rows are metrics, columns are runs, and with two or more runs a last column gives
the change from the first run to the last (base -> tuned).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from corral.infer.evaluate import METRICS_FILE, format_value
from corral.utils.errors import CorralError

# Facts shown above the metrics, when a run records them.
ABOUT_ROWS = ("kind", "model", "adapter", "dataset", "task_dir", "split")


def load_run(folder: str | Path) -> dict[str, Any]:
    """The metrics.json of one evaluation folder.

    Raises:
        CorralError: when the folder or its metrics.json is missing or unreadable.
    """
    path = Path(folder) / METRICS_FILE
    if not path.is_file():
        inside = sorted(p.parent.name for p in Path(folder).glob(f"*/{METRICS_FILE}"))
        hint = f"; its subfolders {', '.join(inside)} have one" if inside else ""
        raise CorralError(
            f"'{folder}' holds no {METRICS_FILE}, so it is not a corral eval output{hint}"
        )
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CorralError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(content, dict) or not isinstance(content.get("metrics"), dict):
        raise CorralError(f'{path}: expected {{"kind": ..., "about": ..., "metrics": {{...}}}}')
    return content


def compare(folders: list[str]) -> dict[str, Any]:
    """One table as data: {"runs": [...], "rows": {name: [value per run]}}."""
    runs = [load_run(folder) for folder in folders]
    rows: dict[str, list[Any]] = {}
    for key in ABOUT_ROWS:
        values = [run.get(key) if key == "kind" else run.get("about", {}).get(key) for run in runs]
        if any(v is not None for v in values):
            rows[key] = values
    for run in runs:
        for key in run["metrics"]:
            rows.setdefault(key, [r["metrics"].get(key) for r in runs])
    return {"runs": list(folders), "rows": rows}


def to_markdown(table: dict[str, Any]) -> str:
    """The table as Markdown; a change column (last run minus first) when there are 2+ runs."""
    runs = table["runs"]
    delta = len(runs) > 1
    header = ["metric", *runs] + (["change"] if delta else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, values in table["rows"].items():
        cells = [key] + ["—" if v is None else format_value(v) for v in values]
        if delta:
            first, last = values[0], values[-1]
            numeric = all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in (first, last)
            )
            change = last - first if numeric and key not in ABOUT_ROWS else None
            cells.append("" if change is None else f"{change:+.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
