"""`run_training`: the one training workflow every stage goes through.

load model -> template -> dataset (cached) -> method (full/freeze/lora) -> Trainer
-> train (resumable, Ctrl-C safe) -> save model + tokenizer + template + run info
-> the stage's after-training checks -> do_eval / do_predict -> train_results.json, loss plot
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import set_seed

from corral.config import CorralConfig
from corral.config.fields import ADAPTER_METHODS
from corral.data.collator import Collator
from corral.data.dataset import build_dataset
from corral.data.processors import format_summary
from corral.data.templates import encode_turns, get_template, prefix_every_piece
from corral.infer.engine import ChatEngine
from corral.infer.evaluate import evaluate_generation, evaluate_perplexity, write_run
from corral.model.adapters import adapters_to_merge, apply_method, save_initial_adapter
from corral.model.fused import fuse_for_training
from corral.model.load import load_model, resolve_base_for_adapters
from corral.model.reward import use_pooling_pad
from corral.train.callbacks import InterruptCallback, JsonlLogCallback, ProgressCallback
from corral.train.outputs import CONFIG_FILE, checkpoint_step, prepare_output_dir, save_final
from corral.train.plot import plot_loss
from corral.train.stages import get_stage
from corral.train.trainer import (
    CorralTrainer,
    TokenMeter,
    out_of_memory_message,
    peak_memory,
    training_arguments,
)
from corral.utils.allocator import describe as describe_allocator
from corral.utils.distributed import end_process_group, is_main_process, world_size
from corral.utils.errors import CorralError
from corral.utils.log import get_logger, quiet_libraries


@dataclass
class RunContext:
    """What a stage's after-training checks may look at."""

    config: CorralConfig
    model: Any
    tokenizer: Any
    train_records: list
    eval_records: list
    log_history: list[dict[str, Any]] = dataclasses.field(default_factory=list)


PISSA_START = "pissa_init"  # the initial PiSSA adapter, in output_dir while training runs


def run_training(config: CorralConfig) -> dict[str, Any]:
    """Train according to `config`; returns the metrics written to train_results.json."""
    log = get_logger()
    quiet_libraries()
    stage = get_stage(config.method.stage)
    resume = prepare_output_dir(config)
    for note in config.notes:
        log.warning(note)
    log.info("resolved config:\n" + config.to_yaml().rstrip())
    log.info(f"memory allocator: {describe_allocator()}")
    if is_main_process():
        config.save(Path(config.output.output_dir) / CONFIG_FILE)

    model_config, model, tokenizer, template = _model_and_template(config, stage)
    started = time.perf_counter()
    data = build_dataset(
        config.data, tokenizer, template, kind=stage.dataset_kind, seed=config.train.seed
    )
    preprocessing_seconds = time.perf_counter() - started
    log.info("dataset summary:\n" + format_summary(data.stats))
    set_seed(config.train.seed)  # LoRA's random init must not depend on what ran before
    weights_dtype = model.dtype  # trainable weights become fp32 master copies below
    # before apply_method: a reference copy must be of the model as loaded
    stage_loss = stage.make_loss(config, model) if stage.make_loss is not None else None
    model, pissa_start = _trainable(config, model, model_config)

    meter = TokenMeter()
    interrupt = InterruptCallback()
    # Under torchrun, Ctrl-C reaches every process and the launcher, which then stops them:
    # save_steps checkpoints are what a multi-process run resumes from.
    callbacks = [ProgressCallback(meter), JsonlLogCallback()]
    if world_size() == 1:
        callbacks.append(interrupt)
    make_trainer = stage.make_trainer or CorralTrainer
    extra = {"config": config, "template": template} if stage.make_trainer else {}
    trainer = make_trainer(
        **extra,
        model=model,
        args=training_arguments(
            config, has_eval=data.eval is not None, weights_dtype=weights_dtype
        ),
        train_dataset=data.train,
        eval_dataset=data.eval,
        data_collator=_collator(stage, config, tokenizer),
        processing_class=tokenizer,
        callbacks=callbacks,
        meter=meter,
        stage_loss=stage_loss,
        loraplus=_loraplus(config.method),
        pissa_start=pissa_start,
    )
    _remove_tqdm_callbacks(trainer)
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    except (MemoryError, torch.OutOfMemoryError) as error:  # checkpoints saved are whole
        raise CorralError(out_of_memory_message(config, trainer.state.global_step)) from error
    if interrupt.interrupted:
        log.warning(
            f"stopped at step {trainer.state.global_step}; checkpoint saved in "
            f"{config.output.output_dir}. Resume with resume_from_checkpoint=true"
        )
        raise KeyboardInterrupt
    if resume is not None and trainer.state.global_step == checkpoint_step(resume):
        result.metrics.pop("train_loss", None)  # no step ran: transformers' mean would say 0.0
    result.metrics["preprocessing_seconds"] = round(preprocessing_seconds, 3)
    # saved in the dtype it was loaded in (DeepSpeed and FSDP keep sharded weights in theirs)
    sharded = trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled
    if config.method.finetuning_type not in ADAPTER_METHODS and not sharded:
        trainer.model.to(weights_dtype)
    metrics = _finish(config, trainer, result, meter, stage, model_config, template, data)
    if pissa_start is not None and is_main_process():  # the saved adapter is converted
        shutil.rmtree(pissa_start)
    end_process_group()
    return metrics


def _model_and_template(config: CorralConfig, stage: Any) -> tuple[Any, Any, Any, Any]:
    """The model to train (adapters it continues resolved), its tokenizer, and the template
    training renders with, set on the tokenizer so every checkpoint serves what was trained."""
    model_config = resolve_base_for_adapters(config.model)
    model, tokenizer = load_model(
        model_config,
        for_training=True,
        value_head=stage.needs_value_head,
        context_len=config.data.cutoff_len,
    )
    template = get_template(model_config.template, tokenizer, tool_format=model_config.tool_format)
    if model_config.default_system is not None:  # trained with, so chat and serve use it too
        template = dataclasses.replace(template, default_system=model_config.default_system)
    tokenizer.chat_template = template.jinja  # saved with every checkpoint: serve what we trained
    prefix_every_piece(tokenizer)  # ... and tokenize its text as training does
    if stage.needs_value_head:  # last-token pooling must not take a reply's end for padding
        use_pooling_pad(model, tokenizer, _reply_end_id(template, tokenizer))
    return model_config, model, tokenizer, template


def _trainable(config: CorralConfig, model: Any, model_config: Any) -> tuple[Any, str | None]:
    """The model with the fine-tuning method applied, and where PiSSA's starting adapter was
    saved (None without PiSSA)."""
    model = apply_method(
        model,
        config.method,
        model_config.adapter_name_or_path,
        train_embeddings=bool(model_config.new_special_tokens) or model_config.resize_vocab,
    )
    pissa_start = None
    if config.method.pissa_init:  # removed after the final save, which is converted from it
        pissa_start = str(Path(config.output.output_dir) / PISSA_START)
        if is_main_process():  # every process starts alike; rank 0 saves and converts
            save_initial_adapter(model, pissa_start)
    if config.train.fused_ops:
        fuse_for_training(model)
    # A KV cache is useless in training, and its presence stops transformers from deriving the
    # block-diagonal mask of packed rows from their position_ids.
    model.config.use_cache = False
    return model, pissa_start


def _loraplus(method) -> tuple[float, float] | None:
    if method.loraplus_lr_ratio is None:
        return None
    return (method.loraplus_lr_ratio, method.loraplus_lr_embedding)


def _finish(config, trainer, result, meter, stage, model_config, template, data) -> dict[str, Any]:
    save_final(
        trainer,
        config,
        model_config.model_name_or_path,
        None if template.name == "tokenizer" else template.name,
        model_config.default_system,
        base_adapters=_merged_adapters(config, model_config.adapter_name_or_path or [], stage),
    )
    metrics = dict(result.metrics)
    real_tokens, trained_tokens = meter.totals()  # every process's
    metrics.update(
        real_tokens_per_second=round(meter.tokens_per_second(), 2),
        training_seconds=round(meter.seconds(), 3),
        real_tokens=real_tokens,
        trained_tokens=trained_tokens,
        **peak_memory(),
    )
    if not is_main_process():  # the checks, evaluation and reports are rank 0's
        return metrics
    if stage.after_training is not None:
        trainer.model.eval()
        context = RunContext(
            config,
            trainer.model,
            trainer.processing_class,
            data.train_records,
            data.eval_records,
            trainer.state.log_history,
        )
        metrics.update(stage.after_training(context))
    if config.eval.do_eval or config.eval.do_predict:
        metrics.update(evaluate_after_training(config, trainer, template, data.eval_records))
    if (
        config.output.plot_loss
        and plot_loss(trainer.state.log_history, config.output.output_dir, stage.plot_metrics)
        is None
    ):
        get_logger().warning(
            "plot_loss: no loss was logged (logging_steps is above the step count)"
        )
    # last: its presence says the run finished (resume_from_checkpoint: auto refuses to rerun)
    trainer.save_metrics("train", metrics, combined=False)
    get_logger().info(
        f"done: {config.output.output_dir} — train_loss {metrics.get('train_loss', float('nan')):.4f}, "
        f"{metrics['real_tokens_per_second']:.0f} real tokens/s, peak {metrics['peak_memory_mb']:.0f} MB"
    )
    return metrics


def _merged_adapters(config: CorralConfig, adapters: list[str], stage: Any) -> list[str]:
    """The adapters `apply_method` merged into the base under a trained adapter (a full or
    freeze model holds them in its weights)."""
    if config.method.finetuning_type not in ADAPTER_METHODS or not adapters:
        return []
    merged, _ = adapters_to_merge(config.method, adapters, value_head=stage.needs_value_head)
    return [str(Path(a).expanduser().resolve()) for a in merged]


def evaluate_after_training(config, trainer, template, records) -> dict[str, Any]:
    """do_eval: perplexity into output_dir/eval/; do_predict: generation metrics into
    output_dir/predict/ (greedy, as `corral eval generate`). Returns the headline numbers."""
    model, tokenizer = trainer.model.eval(), trainer.processing_class
    out, batch = Path(config.output.output_dir), config.train.per_device_eval_batch_size
    about = {"model": config.output.output_dir, "dataset": ", ".join(config.data.dataset or [])}
    results = {}
    if config.eval.do_eval:
        run = evaluate_perplexity(
            model, tokenizer, template, records, config.data, batch_size=batch, about=about
        )
        write_run(out / "eval", run)
        results["eval_perplexity"] = run.metrics["perplexity"]
    if config.eval.do_predict:
        greedy = dataclasses.replace(config.generation, temperature=0.0)
        engine = ChatEngine(config.model, greedy, model=model, tokenizer=tokenizer)
        run = evaluate_generation(
            engine, records, batch_size=batch, lang=config.eval.lang, about=about
        )
        write_run(out / "predict", run)
        results.update({f"predict_{k}": run.metrics[k] for k in ("bleu-4", "rouge-l")})
    return results


def _collator(stage: Any, config: CorralConfig, tokenizer: Any) -> Any:
    if stage.make_collator is not None:
        return stage.make_collator(_pad_id(tokenizer))
    return Collator(
        pad_token_id=_pad_id(tokenizer),
        # flash-attention detects packed documents only within a single row
        flatten_packed=config.model.flash_attn == "fa2",
    )


def _pad_id(tokenizer: Any) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id


def _reply_end_id(template: Any, tokenizer: Any) -> int:
    """The last token of a reply as the template renders it (its end-of-turn token, say)."""
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    return encode_turns(template, tokenizer, probe)[-1][1][-1]


def _remove_tqdm_callbacks(trainer: CorralTrainer) -> None:
    from transformers.trainer_callback import PrinterCallback
    from transformers.trainer_callback import ProgressCallback as HFProgress

    for callback in (HFProgress, PrinterCallback):
        trainer.remove_callback(callback)
