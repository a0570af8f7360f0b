"""The one trainer every stage shares: Hugging Face's Trainer with corral's loss and meters.

Optimizer, scheduler, sampler, checkpointing, resume and distributed launch are the Trainer's;
corral adds the label-only fused LM loss, real-token accounting, its callbacks, and
checkpoints that appear only when complete (written in a staging folder, then renamed).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices

from corral.config import CorralConfig
from corral.model.load import pick_device
from corral.model.prompt_learning import decoder_runs_alone
from corral.train.loss import causal_lm_loss
from corral.utils.deps import require
from corral.utils.disk import disk_full_error
from corral.utils.errors import CorralError

# A checkpoint being written: `.tmp-checkpoint-N/checkpoint-N`, renamed to `checkpoint-N` when
# complete. transformers' resume (`get_last_checkpoint`) never matches the staging name.
STAGING_PREFIX = ".tmp-"


@dataclass
class TokenMeter:
    """Counts what the model actually processed, for tokens/s that ignore padding.

    In a multi-process run each process counts its own batches; `CorralTrainer.log` sums the
    counts over the processes (`all_ranks`), so the log and train_results.json report the run.
    """

    real_tokens: int = 0  # non-padding tokens this process's model attended over
    trained_tokens: int = 0  # tokens with a label (what the loss is computed on)
    started: float = field(default_factory=time.perf_counter)
    stopped: float | None = None  # set when training ends, so saving is not counted
    # (real, trained) summed over every process at the last log, and when; None in one process
    all_ranks: tuple[int, int] | None = None
    summed_at: float = 0.0

    def seconds(self) -> float:
        return (self.stopped or time.perf_counter()) - self.started

    def totals(self) -> tuple[int, int]:
        """(real, trained) tokens of the whole run: every process's, as of the last log."""
        return self.all_ranks or (self.real_tokens, self.trained_tokens)

    def tokens_per_second(self) -> float:
        if self.all_ranks is None:
            return self.real_tokens / max(self.seconds(), 1e-9)
        return self.all_ranks[0] / max(self.summed_at - self.started, 1e-9)


def training_arguments(
    config: CorralConfig, *, has_eval: bool, weights_dtype: torch.dtype = torch.float32
) -> TrainingArguments:
    """Translate corral's config into the Trainer's arguments (the only place that does).

    Args:
        config: the resolved config.
        has_eval: whether there is a validation set.
        weights_dtype: the dtype the model was loaded in; half precision (GPUs) means mixed
            precision training in it, unless bf16/fp16 is set explicitly.
    """
    train, out = config.train, config.output
    bf16, fp16 = train.bf16, train.fp16
    if not (bf16 or fp16):
        bf16, fp16 = weights_dtype == torch.bfloat16, weights_dtype == torch.float16
    warmup = train.warmup_steps if train.warmup_steps > 0 else train.warmup_ratio
    eval_steps = train.eval_steps or out.logging_steps * 10
    on_cpu = pick_device(config.model.device).type == "cpu"
    return TrainingArguments(
        output_dir=out.output_dir,
        per_device_train_batch_size=train.per_device_train_batch_size,
        per_device_eval_batch_size=train.per_device_eval_batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        learning_rate=train.learning_rate,
        num_train_epochs=train.num_train_epochs,
        max_steps=train.max_steps,
        lr_scheduler_type=train.lr_scheduler_type,
        warmup_steps=warmup,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        optim=train.optim,
        **_checkpointing_arguments(train.gradient_checkpointing),
        seed=train.seed,
        data_seed=train.seed,
        bf16=bf16,
        fp16=fp16,
        logging_steps=out.logging_steps,
        save_steps=out.save_steps,
        save_total_limit=out.save_total_limit,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=eval_steps if has_eval else None,
        report_to=[] if out.report_to == ["none"] else out.report_to,
        dataloader_num_workers=train.dataloader_num_workers,
        # Unpacked rows of similar length share a batch, so little compute goes to padding.
        train_sampling_strategy="random" if config.data.packing else "group_by_length",
        remove_unused_columns=False,
        prediction_loss_only=True,  # validation needs the loss only, never full logits
        disable_tqdm=True,  # corral's own progress display replaces tqdm
        use_cpu=on_cpu,
        dataloader_pin_memory=not on_cpu,  # pinning needs an accelerator
        **_sharding_arguments(config, on_cpu=on_cpu),
    )


def _sharding_arguments(config: CorralConfig, *, on_cpu: bool) -> dict[str, Any]:
    """DeepSpeed's config file, or FSDP's options, as the Trainer takes them."""
    train = config.train
    if train.deepspeed:
        require("deepspeed")
        if "WORLD_SIZE" not in os.environ:  # DeepSpeed would look for MPI instead
            raise CorralError(
                f"deepspeed: '{train.deepspeed}' needs a launcher, even for one process: "
                "torchrun --nproc_per_node N -m corral train … (or corral train --nproc-per-node N)"
            )
        return {"deepspeed": train.deepspeed}
    if not train.fsdp:
        return {}
    if on_cpu:
        # FSDP2 would fall back to plain DDP without a word, FSDP1 fails to find a device
        raise CorralError(
            f"fsdp: '{train.fsdp}' needs GPUs: the Trainer's FSDP does not run on the CPU. "
            "Remove fsdp (torchrun alone trains with DDP) or use deepspeed, which does"
        )
    return {"fsdp": train.fsdp, "fsdp_config": train.fsdp_config}


def _checkpointing_arguments(enabled: bool) -> dict:
    """Activation checkpointing under the name this transformers release uses (renamed in v5)."""
    from transformers import TrainingArguments

    fields = TrainingArguments.__dataclass_fields__
    name = (
        "activation_checkpointing"
        if "activation_checkpointing" in fields
        else "gradient_checkpointing"
    )
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False} if enabled else None}


class SeededLengthGroupedSampler(torch.utils.data.Sampler):
    """Length-grouped order drawn from (seed, epoch), not from the global RNG.

    transformers' sampler draws each epoch's order from the global RNG when the epoch starts;
    a resumed run restores that RNG as it was mid-epoch, so it saw a different order than the
    uninterrupted run. Seeding per epoch makes resume exact (tests/test_train.py checks it).

    With N processes the groups are drawn for the global batch (N x the per-device batch, as
    the processes take consecutive per-device batches in turn), so N processes see the same
    order as one process with N times the batch.
    """

    def __init__(self, base: LengthGroupedSampler, seed: int, processes: int = 1):
        self.lengths, self.batch_size, self.seed, self.epoch = (
            base.lengths,
            base.batch_size * processes,
            seed,
            0,
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


class WholeCheckpoints:
    """Trainer mixin: a `checkpoint-N` folder exists only once it is complete.

    The Trainer writes checkpoint-N file by file in place: a kill or a full disk halfway leaves
    a folder that resume would pick and then fail on. Writing it under a staging name and
    renaming it when complete means every checkpoint-N folder is whole, for corral's resume and
    for anyone else's `get_last_checkpoint`; a full disk is reported naming the folder.
    """

    def _run_epoch(self, *args: Any, **kwargs: Any) -> None:  # noqa: D102
        # A run killed while writing its final outputs left a checkpoint at max_steps: resuming
        # it must only write them, but transformers' loop trains a batch before it checks
        # max_steps (a step max_steps + 1). Stop before any step instead.
        if 0 < self.state.max_steps <= self.state.global_step:
            self.control.should_training_stop = True
            return
        super()._run_epoch(*args, **kwargs)

    def _save_checkpoint(self, model, trial):  # noqa: D102
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging, final = Path(run_dir) / f"{STAGING_PREFIX}{name}", Path(run_dir) / name
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)  # left by a run killed while saving
        self.accelerator.wait_for_everyone()
        self._staging = str(staging)
        try:
            super()._save_checkpoint(model, trial)  # into staging/checkpoint-N
        except Exception as error:
            advice = (
                f"the earlier checkpoints in '{run_dir}' are intact; rerun with "
                "resume_from_checkpoint=true to continue from the last of them"
            )
            full = disk_full_error(error, final, "saving", advice)  # before freeing
            shutil.rmtree(staging, ignore_errors=True)
            if full is not None:
                raise full from error
            raise
        finally:
            self._staging = None
        self.accelerator.wait_for_everyone()  # every process has written its part
        if self.args.should_save:
            _sync(staging / name)  # on disk before the rename makes it the one to resume
            _rename_into_place(staging / name, final)
            shutil.rmtree(staging, ignore_errors=True)
            rotate_checkpoints(run_dir, self.args.save_total_limit, use_mtime=True)

    def _get_output_dir(self, trial):  # noqa: D102
        return getattr(self, "_staging", None) or super()._get_output_dir(trial)


class CorralTrainer(WholeCheckpoints, Trainer):
    """`Trainer` whose loss runs the LM head only on labelled positions, or the stage's own.

    Args:
        meter: counts real and trained tokens.
        stage_loss: the stage's loss hook, (model, batch) -> (loss, metrics), whose metrics
            are averaged over the steps between two logs and logged with the loss (eval_
            prefixed in validation). None: the LM loss.
        loraplus: LoRA+ as (loraplus_lr_ratio, loraplus_lr_embedding): LoRA B matrices
            train at learning_rate x ratio, LoRA embedding matrices at the second value, the
            rest at learning_rate (peft's `create_loraplus_optimizer`). None: one lr for all.
        pissa_start: the folder of the PiSSA adapter as initialised (`save_initial_adapter`):
            every save (checkpoints too) is converted to a plain LoRA for the original base.
    """

    def __init__(
        self,
        *args: Any,
        meter: TokenMeter,
        stage_loss: Callable[..., tuple[torch.Tensor, dict[str, float]]] | None = None,
        loraplus: tuple[float, float] | None = None,
        pissa_start: str | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.meter = meter
        self.loraplus = loraplus
        self.pissa_start = pissa_start
        self.stage_loss = stage_loss
        self._stage_metrics: dict[str, dict[str, list[float]]] = {"train": {}, "eval": {}}
        # Our loss divides by the labelled tokens of the whole accumulated batch (the Trainer's
        # num_items_in_batch), so the Trainer must neither skip counting nor divide by GA again.
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True

    def create_optimizer(self, model=None):  # noqa: D102
        if self.loraplus is None or self.optimizer is not None:
            return super().create_optimizer(model)
        from peft.optimizers import create_loraplus_optimizer

        # the optimizer class and its arguments (betas, eps...) that `optim` names
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
        optimizer_kwargs.pop("lr")
        ratio, embedding_lr = self.loraplus
        self.optimizer = create_loraplus_optimizer(
            model or self.model,
            optimizer_cls,
            lr=self.args.learning_rate,
            loraplus_lr_ratio=ratio,
            loraplus_lr_embedding=embedding_lr,
            loraplus_weight_decay=self.args.weight_decay,
            **optimizer_kwargs,
        )
        return self.optimizer

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:  # noqa: D102
        if self.pissa_start is None:
            return super().save_model(output_dir, _internal_call)
        # an unconverted PiSSA adapter gives another model on the original base: never write one
        output_dir = output_dir or self.args.output_dir
        if self.args.should_save:
            self.model.save_pretrained(
                output_dir, path_initial_model_for_weight_conversion=self.pissa_start
            )
            self.processing_class.save_pretrained(output_dir)

    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        if isinstance(sampler, LengthGroupedSampler):
            seed = self.args.data_seed or self.args.seed
            return SeededLengthGroupedSampler(sampler, seed, processes=self.args.world_size)
        return sampler

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: D102
        if self.stage_loss is not None:
            loss = self._compute_stage_loss(model, inputs)
            return (loss, {"loss": loss}) if return_outputs else loss
        inputs = dict(inputs)
        real_tokens = inputs.pop("num_real_tokens", None)
        inputs.pop("length", None)
        labels = inputs["labels"]
        if "position_ids" not in inputs:
            # Unpacked rows are padded on the right, so under causal attention no real token
            # can see padding: the padding mask changes nothing we train on. Without it sdpa
            # runs its causal kernel (no mask tensor per layer, grouped-query heads not copied).
            inputs.pop("attention_mask", None)
        # A DeepSpeed engine (and an FSDP2 model) still has get_decoder, but the forward must
        # start at the top: it gathers the sharded weights (the LM head's too).
        sharded = self.is_deepspeed_enabled or self.is_fsdp_enabled
        if decoder_runs_alone(model) and not sharded:
            loss = self._lm_loss(model, inputs, num_items_in_batch)
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel) and decoder_runs_alone(
            model.module
        ):
            loss = _forward_through(
                model,
                lambda **batch: self._lm_loss(model.module, batch, num_items_in_batch),
                inputs,
            )
        else:
            # Sharded engines (DeepSpeed, FSDP) gather weights in their modules' own forward,
            # which the fused head bypasses, and prompt adapters add their virtual tokens in
            # peft's forward: use the model's own loss.
            loss = super().compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        if model.training:
            self.meter.trained_tokens += int((labels[:, 1:] != -100).sum())
            self.meter.real_tokens += (
                int(real_tokens) if real_tokens is not None else labels.numel()
            )
        return (loss, {"loss": loss}) if return_outputs else loss

    def _lm_loss(self, model, inputs: dict, num_items_in_batch) -> torch.Tensor:
        """The fused LM loss on labelled positions, normalised like the Trainer's own loss."""
        labels = inputs.pop("labels")
        # the Trainer's bf16/fp16 autocast wraps model.forward, which this path skips
        with self.accelerator.autocast():
            hidden = model.get_decoder()(**inputs, use_cache=False).last_hidden_state
        loss = causal_lm_loss(hidden, labels, model.get_output_embeddings(), num_items_in_batch)
        if (
            num_items_in_batch is not None
            and self.args.average_tokens_across_devices
            and self.args.world_size > 1
        ):
            # num_items_in_batch counts every process's labels, and the processes' gradients
            # (and eval losses) are averaged: times N gives one big batch's (as Trainer does)
            loss = loss * self.accelerator.num_processes
        return loss

    def _compute_stage_loss(self, model, inputs) -> torch.Tensor:
        inputs = dict(inputs)
        real_tokens = inputs.pop("num_real_tokens", None)
        with self.accelerator.autocast():
            loss, metrics = self.stage_loss(model, inputs)
        split = "train" if model.training else "eval"
        for key, value in metrics.items():
            self._stage_metrics[split].setdefault(key, []).append(value)
        if model.training:
            labels = inputs["labels"]
            self.meter.trained_tokens += int((labels[:, 1:] != -100).sum())
            self.meter.real_tokens += (
                int(real_tokens) if real_tokens is not None else labels.numel()
            )
            # A stage's loss is a mean over its micro-batch; the Trainer leaves GA scaling to us.
            loss = loss / self.current_gradient_accumulation_steps
        return loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:  # noqa: D102
        # every process logs at the same steps (the Trainer gathers the loss there too)
        if self.args.world_size > 1:
            self._sum_meter_over_processes()
        split = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        prefix = "eval_" if split == "eval" else ""
        for key, values in self._stage_metrics[split].items():
            logs[prefix + key] = round(sum(values) / len(values), 6)
        self._stage_metrics[split] = {}
        super().log(logs, *args, **kwargs)

    def _sum_meter_over_processes(self) -> None:
        local = torch.tensor(
            [self.meter.real_tokens, self.meter.trained_tokens], device=self.args.device
        )
        real, trained = self.accelerator.reduce(local, reduction="sum").tolist()
        self.meter.all_ranks, self.meter.summed_at = (real, trained), time.perf_counter()


def _sync(folder: Path) -> None:
    """fsync every file under `folder`, so a power cut after the rename finds them written."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def _rename_into_place(complete: Path, final: Path) -> None:
    """Replace `final` (a checkpoint of a run resumed from before it) by `complete`."""
    old = final.with_name(f"{STAGING_PREFIX}old-{final.name}")
    if final.exists():
        os.replace(final, old)
    os.replace(complete, final)
    shutil.rmtree(old, ignore_errors=True)


def out_of_memory_message(config: CorralConfig, step: int) -> str:
    """What to change when training ran out of (GPU or host) memory at `step`."""
    train, data = config.train, config.data
    knobs = [
        f"lower per_device_train_batch_size (now {train.per_device_train_batch_size}) and "
        "raise gradient_accumulation_steps to keep the same batch",
        f"lower cutoff_len (now {data.cutoff_len})",
    ]
    if not train.gradient_checkpointing:
        knobs.append("set gradient_checkpointing: true")
    if config.method.finetuning_type != "lora":
        knobs.append(
            f"train LoRA (finetuning_type: lora) instead of {config.method.finetuning_type}"
        )
    return (
        f"out of memory at step {step + 1}: " + "; ".join(knobs) + ". Checkpoints already in "
        f"'{config.output.output_dir}' are whole: resume_from_checkpoint=true continues from "
        "the last of them"
    )


def _forward_through(wrapper: Any, loss_fn: Callable[..., torch.Tensor], inputs: dict) -> Any:
    """`loss_fn(**inputs)` run as the wrapped module's forward, called through `wrapper`.

    DDP synchronises gradients for what its own forward ran (it readies its reducer there), so
    corral's loss, which runs the decoder and the fused head rather than the model's forward,
    stands in for the module's forward during this one call.
    """
    inner = wrapper.module
    previous = inner.__dict__.get("forward")  # accelerate's autocast puts one there
    inner.forward = loss_fn
    try:
        return wrapper(**inputs)
    finally:
        if previous is None:
            del inner.forward
        else:
            inner.forward = previous


def peak_memory() -> dict[str, float]:
    """Peak resident memory of this process (and of the GPU), in MB."""
    import resource

    peak = {"peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        peak["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return peak
