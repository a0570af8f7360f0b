"""`corral eval pref`: how often a model prefers the chosen reply of a preference pair.

    corral eval pref --adapter saves/rm-lora --dataset dpo_en_demo --output saves/eval/rm
    corral eval pref --adapter saves/dpo-lora --dataset dpo_en_demo --output saves/eval/dpo

A reward model (an `stage: rm` folder or adapter) ranks a pair by its scores. A policy (an sft
or dpo adapter, or a model) ranks it by DPO's implicit reward, beta x (log pi(reply) - log
ref(reply)) summed over the reply's tokens (beta is pref_beta), where the reference is the
model without its last adapter (with the adapter switched off, so one copy is loaded). Without
an adapter there is nothing to compare with: the reward is beta x log pi(reply) alone, and the
report says so. Pairs are encoded as training encodes them (the template, cutoff_len and its
truncation), so the numbers are those `stage: rm` / `stage: dpo` validation would log.

Metrics: accuracy (chosen rewarded strictly higher; a tie is wrong), margin (mean chosen -
rejected), the mean chosen and rejected rewards, pairs scored and skipped; predictions.jsonl
has one line per pair.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from corral.config import CorralConfig
from corral.data.processors import PROCESSORS
from corral.data.records import Record
from corral.data.templates import get_template
from corral.infer.evaluate import EvalRun
from corral.model.load import attach_adapter, load_model, load_tokenizer, resolve_base_for_adapters
from corral.model.reward import load_reward_model, wants_value_head
from corral.utils.errors import DataError
from corral.utils.log import get_logger


def evaluate_pref(config: CorralConfig, records: list[Record], about: dict[str, Any]) -> EvalRun:
    """Score every pair of `records` with the model `config` names (see the module docstring).

    Raises:
        DataError: when the records are not preference pairs, or no pair could be encoded.
        ModelError: when the model or an adapter cannot be loaded.
    """
    kinds = sorted({r.kind for r in records} - {"preference"})
    if kinds or not records:
        raise DataError(
            "eval pref needs preference pairs (a dataset_info.json entry with ranking: true and "
            f"chosen/rejected columns, e.g. dpo_en_demo); the dataset holds {', '.join(kinds) or 'no'} "
            "records"
        )
    model_config = resolve_base_for_adapters(config.model)
    batch = config.train.per_device_eval_batch_size
    if wants_value_head(model_config):
        score, tokenizer, template_name, scorer = _reward_scorer(model_config, batch)
    else:
        score, tokenizer, template_name, scorer = _policy_scorer(config, model_config, batch)
    template = get_template(template_name, tokenizer)
    encoded = PROCESSORS["preference"].encode(records, tokenizer, template, config.data)
    kept = [(r, e) for r, e in zip(records, encoded, strict=True) if e.input_ids]
    if not kept:
        reasons = sorted({e.status for e in encoded})
        raise DataError(f"no pair could be scored ({'; '.join(reasons)})")
    get_logger().info(f"scoring {len(kept)} pairs ({scorer})")
    rows = [
        (ids, labels) for _, e in kept for ids, labels in zip(e.input_ids, e.labels, strict=True)
    ]
    rewards = score(rows)
    chosen, rejected = rewards[0::2], rewards[1::2]
    predictions = [
        _prediction(record, float(c), float(r))
        for (record, _), c, r in zip(kept, chosen, rejected, strict=True)
    ]
    margins = chosen - rejected
    metrics = {
        "accuracy": float((margins > 0).float().mean()),
        "margin": float(margins.mean()),
        "chosen_reward": float(chosen.mean()),
        "rejected_reward": float(rejected.mean()),
        "pairs": len(kept),
        "skipped_pairs": len(records) - len(kept),
    }
    about = {**about, "scored_by": scorer, "cutoff_len": config.data.cutoff_len}
    return EvalRun("pref", about, metrics, predictions)


def _prediction(record: Record, chosen: float, rejected: float) -> dict[str, Any]:
    prompt = record.messages[-1]["content"] if record.messages else ""
    return {
        "source": record.source,
        "prompt": prompt,
        "chosen": record.chosen["content"],
        "rejected": record.rejected["content"],
        "chosen_reward": chosen,
        "rejected_reward": rejected,
        "margin": chosen - rejected,
        "correct": chosen > rejected,
    }


def _reward_scorer(model_config: Any, batch: int) -> tuple:
    """A reward model's scores of whole sequences."""
    adapters = model_config.adapter_name_or_path or []
    if adapters:
        reward = load_reward_model(
            adapters[-1],
            adapters=adapters[:-1],
            base=model_config.model_name_or_path,
            device=model_config.device,
            dtype=model_config.dtype,
        )
    else:
        reward = load_reward_model(
            model_config.model_name_or_path, device=model_config.device, dtype=model_config.dtype
        )
    template = model_config.template or reward.template

    def score(rows: list[tuple[list[int], list[int]]]) -> Any:
        return reward.score([ids for ids, _ in rows], batch_size=batch)

    return score, reward.tokenizer, template, "reward model score"


def _policy_scorer(config: CorralConfig, model_config: Any, batch: int) -> tuple:
    """DPO's implicit reward against the model without its last adapter (or none)."""
    adapters = model_config.adapter_name_or_path or []
    base_config = replace(model_config, adapter_name_or_path=adapters[:-1] or None)
    model, _ = load_model(base_config, value_head=False)
    tokenizer = load_tokenizer(model_config)
    beta = config.method.pref_beta
    if adapters:
        model = attach_adapter(model, adapters[-1]).eval()
        scorer = (
            f"implicit reward {beta:g} x (log pi - log ref), ref = the model without {adapters[-1]}"
        )
    else:
        scorer = f"{beta:g} x log pi (no adapter, so no reference model)"
        get_logger().warning(
            "eval pref: no adapter, so no reference: rewards are beta x the model's own "
            "log-probs of each reply"
        )

    def score(rows: list[tuple[list[int], list[int]]]) -> Any:
        logps = _reply_logps(model, rows, batch)
        if adapters:
            with model.disable_adapter():
                logps = logps - _reply_logps(model, rows, batch)
        return beta * logps

    return score, tokenizer, model_config.template, scorer


def _reply_logps(model: Any, rows: list[tuple[list[int], list[int]]], batch: int) -> Any:
    """Summed log-probs of each row's labelled (reply) tokens, a float32 CPU tensor."""
    import torch

    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for start in range(0, len(rows), batch):
            chunk = rows[start : start + batch]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)
            for i, (row_ids, row_labels) in enumerate(chunk):
                ids[i, : len(row_ids)] = torch.tensor(row_ids)
                labels[i, : len(row_labels)] = torch.tensor(row_labels)
            ids, labels = ids.to(device), labels.to(device)
            # right padding under causal attention: real tokens never see the padding
            hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
            targets, mask = labels[:, 1:], labels[:, 1:] != -100
            logits = model.get_output_embeddings()(hidden[:, :-1][mask]).float()
            picked = logits.gather(1, targets[mask][:, None])[:, 0] - logits.logsumexp(-1)
            rows_of = torch.arange(len(chunk), device=device)[:, None].expand_as(targets)[mask]
            sums = picked.new_zeros(len(chunk)).index_add(0, rows_of, picked)
            out.append(sums.cpu())
    return torch.cat(out)
