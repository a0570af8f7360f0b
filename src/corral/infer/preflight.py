"""Fail fast: check what a command names (model, adapters, template, datasets) before loading.

Loading a model takes seconds to minutes; a typo in a dataset name or a template should not
wait for it. Every command calls `check_inputs` right after building its config:

    config = config_from_args(args)
    check_inputs(config.model, data=config.data)   # a CorralError in milliseconds, or nothing

Only cheap checks live here (paths, names, registry entries); nothing is read beyond small
JSON files, and nothing heavy is imported.
"""

from __future__ import annotations

from corral.config.fields import DataConfig, ModelConfig
from corral.data.registry import resolve_datasets
from corral.data.templates.choose import check_template_name
from corral.model.load import pick_device, resolve_base_for_adapters, resolve_model


def check_inputs(model: ModelConfig, data: DataConfig | None = None) -> None:
    """Raise the CorralError a later load would raise, without loading anything heavy.

    Args:
        model: the model, adapters and template the command will load.
        data: the datasets it will read (None: the command reads none).

    Raises:
        CorralError: a missing model or adapter folder, an unknown template or device, or a
            dataset name
            that is not registered, not a file, or not usable.
    """
    model = resolve_base_for_adapters(model)  # adapters exist; the base they recorded
    resolve_model(model.model_name_or_path)
    check_template_name(model.template)
    pick_device(model.device)
    if data is not None:
        resolve_datasets(data.dataset or [], data.dataset_dir)
        resolve_datasets(data.eval_dataset or [], data.dataset_dir)
