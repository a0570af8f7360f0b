"""Write a merged model as a Hugging Face folder that plain transformers loads.

out/  config.json  generation_config.json  model(-0000N-of-0000M).safetensors
      tokenizer.json  tokenizer_config.json (chat template inside)  README.md
      corral_run.json
"""

from __future__ import annotations

import json
from pathlib import Path

from corral.export.merge import MergedModel
from corral.export.model_card import model_card
from corral.export.tokenizer_files import end_of_turn_ids, save_tokenizer
from corral.model.artifacts import write_run_info
from corral.utils.errors import ExportError

DTYPES = ("auto", "float32", "bfloat16", "float16")


def write_hf_folder(
    merged: MergedModel, out: Path, *, max_shard_size: str = "2GB", dtype: str = "auto"
) -> None:
    """Save `merged` into the (empty) folder `out`.

    Args:
        merged: from `load_merged`.
        out: the folder to fill.
        max_shard_size: largest safetensors shard, e.g. "2GB" or "500MB".
        dtype: weights dtype; 'auto' keeps the base model's saved dtype.

    Raises:
        ExportError: for a dtype or shard size that is not understood.
    """
    import torch

    name = saved_dtype(merged) if dtype == "auto" else dtype
    if name not in DTYPES[1:]:
        raise ExportError(f"--dtype '{dtype}' is not one of: {', '.join(DTYPES)}")
    model = merged.model.to(getattr(torch, name))
    stops = end_of_turn_ids(merged)
    if stops and getattr(model, "generation_config", None) is not None:  # rm: no generation
        model.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
        model.config.eos_token_id = stops[0]
    try:
        model.save_pretrained(out, max_shard_size=max_shard_size)
    except ValueError as err:
        raise ExportError(f"--max-shard-size '{max_shard_size}': {err}") from err
    save_tokenizer(merged, out)
    (out / "README.md").write_text(model_card(merged, out.name), encoding="utf-8")
    last = merged.run_infos[-1] if merged.run_infos else {}
    write_run_info(
        out,
        base_model=merged.base_model,
        template=merged.template.name
        if merged.template and merged.template.name != "tokenizer"
        else None,
        stage=last.get("stage"),
        finetuning_type=last.get("finetuning_type"),
        datasets=sorted({d for i in merged.run_infos for d in i.get("datasets") or []}) or None,
        extra={"exported_from": {"adapters": merged.adapters, "dtype": name}},
    )
    for path in out.iterdir():  # transformers writes shards 0600, unreadable to other users
        path.chmod(0o644)


def saved_dtype(merged: MergedModel) -> str:
    """The dtype the base model's config.json records, else float32."""
    config = Path(merged.model.name_or_path or "") / "config.json"
    if config.is_file():
        data = json.loads(config.read_text(encoding="utf-8"))
        recorded = data.get("dtype") or data.get("torch_dtype")
        if recorded in DTYPES[1:]:
            return recorded
    return "float32"
