"""The `corral eval` workflows: config in, an evaluation folder out.

    run = run_generate(config)    # predictions.jsonl, metrics.json, report.md in save_dir
    run = run_ppl(config)
    run = run_mc(config)
    run = run_pref(config)        # preference accuracy: a reward model's or a policy's

Each reads its data first (so a typo fails before the model loads), then loads the model once
through the chat engine, so prompts use the template the model or adapter was trained with.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from corral.config import CorralConfig
from corral.data.loader import load_records
from corral.data.records import Record
from corral.infer.evaluate import EvalRun, evaluate_generation, evaluate_perplexity, write_run
from corral.utils.errors import CorralError, DataError
from corral.utils.log import get_logger


def split_records(config: CorralConfig) -> list[Record]:
    """The records of `eval_split`: validation, test or all (see the field's help).

    Raises:
        DataError: when the split's datasets are not configured, or a dataset is empty.
    """
    data, split, seed = config.data, config.eval.eval_split, config.train.seed
    if split == "test":
        if not data.eval_dataset:
            raise DataError(
                "split 'test' scores eval_dataset, which is not set: pass eval_dataset=NAME "
                "(a dataset held out from training), or use --split all or validation"
            )
        return load_records(dataclasses.replace(data, dataset=None, val_size=0.0), seed=seed).eval
    if not data.dataset:
        raise DataError("no dataset given: pass --dataset NAME (a dataset_info.json name or file)")
    if split == "validation":
        if not data.val_size:
            raise DataError(
                "split 'validation' is the val_size hold-out of the dataset, but val_size is not "
                "set: pass val_size=0.1 (the value training used, with the same seed, picks the "
                "same examples), or use --split all"
            )
        return load_records(dataclasses.replace(data, eval_dataset=None), seed=seed).eval
    no_split = dataclasses.replace(data, eval_dataset=None, val_size=0.0)
    return load_records(no_split, seed=seed).train


def describe(config: CorralConfig, **facts: Any) -> dict[str, Any]:
    """What was evaluated, for metrics.json and the report."""
    model = config.model
    return {
        "model": model.model_name_or_path,
        "adapter": ", ".join(model.adapter_name_or_path or []) or "none",
        **facts,
    }


def run_generate(config: CorralConfig) -> EvalRun:
    """Generate replies to the split's prompts, score them and write the folder."""
    from corral.infer.engine import ChatEngine

    _require_save_dir(config)
    records = split_records(config)
    engine = ChatEngine(config.model, config.generation)
    get_logger().info(f"generating replies to {len(records)} prompts")
    about = describe(
        config, dataset=", ".join(config.data.dataset or config.data.eval_dataset or [])
    )
    about["split"] = config.eval.eval_split
    run = evaluate_generation(
        engine,
        records,
        batch_size=config.train.per_device_eval_batch_size,
        lang=config.eval.lang,
        about=about,
    )
    write_run(config.eval.save_dir, run)
    return run


def run_ppl(config: CorralConfig) -> EvalRun:
    """Perplexity of the split with the training masking; writes the folder when save_dir is set."""
    from corral.infer.engine import ChatEngine

    records = split_records(config)
    engine = ChatEngine(config.model, config.generation)
    about = describe(
        config, dataset=", ".join(config.data.dataset or config.data.eval_dataset or [])
    )
    about.update(split=config.eval.eval_split, cutoff_len=config.data.cutoff_len)
    run = evaluate_perplexity(
        engine.model,
        engine.tokenizer,
        engine.template,
        records,
        config.data,
        batch_size=config.train.per_device_eval_batch_size,
        about=about,
    )
    if config.eval.save_dir:
        write_run(config.eval.save_dir, run)
    return run


def run_mc(config: CorralConfig) -> EvalRun:
    """Score a multiple-choice benchmark; writes the folder when save_dir is set."""
    from corral.eval.mc import SAMPLE_DIR, evaluate_mc, load_subjects
    from corral.infer.engine import ChatEngine

    ev = config.eval
    if ev.task_dir is None:
        raise DataError(f"no benchmark given: pass --task-dir DIR (e.g. {SAMPLE_DIR})")
    subjects = load_subjects(ev.task_dir, ev.task_split, ev.subjects)
    engine = ChatEngine(config.model, config.generation)
    about = describe(config, task_dir=ev.task_dir, split=ev.task_split)
    run = evaluate_mc(
        engine,
        subjects,
        n_shot=ev.n_shot,
        lang=ev.lang,
        about=about,
    )
    if ev.save_dir:
        write_run(ev.save_dir, run)
    return run


def run_pref(config: CorralConfig) -> EvalRun:
    """Preference accuracy and margin on the split's pairs; writes the folder when save_dir is
    set (predictions.jsonl has one line per pair)."""
    from corral.eval.pref import evaluate_pref

    records = split_records(config)
    about = describe(
        config, dataset=", ".join(config.data.dataset or config.data.eval_dataset or [])
    )
    about["split"] = config.eval.eval_split
    run = evaluate_pref(config, records, about)
    if config.eval.save_dir:
        write_run(config.eval.save_dir, run)
    return run


def _require_save_dir(config: CorralConfig) -> None:
    if not config.eval.save_dir:
        raise CorralError(
            "pass --output DIR: where predictions.jsonl, metrics.json and report.md go"
        )
