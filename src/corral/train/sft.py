"""Supervised fine-tuning on conversations: only assistant turns are trained.

After training, `stop_rate` checks the thing users hit most: does the tuned model end its
replies with the template's end-of-turn token, or ramble until max_new_tokens?
"""

from __future__ import annotations

from typing import Any

from corral.infer.engine import ChatEngine
from corral.train.stages import Stage
from corral.utils.log import get_logger

STOP_RATE_WARNING = 0.9


def stop_rate(engine: ChatEngine, records: list, samples: int, cutoff_len: int) -> dict[str, Any]:
    """Greedy replies to the first `samples` prompts; the fraction that end on a stop token.

    A reply may be up to twice its reference's length (at most cutoff_len tokens): one that
    has not stopped by then is counted as not stopping; the model's context caps it too.
    """
    chosen = [r for r in records if r.messages and r.messages[-1]["role"] == "assistant"][:samples]
    if not chosen:
        return {}
    prompts = [engine.prompt_ids(r.to_messages()[:-1]) for r in chosen]
    longest = max(len(engine.tokenizer(r.messages[-1]["content"])["input_ids"]) for r in chosen)
    budget = min(cutoff_len, 2 * longest + 16)
    if engine.context_len:  # no reply can run past the model's positions
        budget = min(budget, engine.context_len - max(len(ids) for ids in prompts))
        if budget < 1:
            return {}
    replies = engine.generate_ids(prompts, temperature=0.0, max_new_tokens=budget)
    rate = sum(reply.finish_reason == "stop" for reply in replies) / len(replies)
    log = get_logger()
    log.info(
        f"stop rate: {rate:.0%} of {len(replies)} greedy replies ended with an end-of-turn token"
    )
    if rate < STOP_RATE_WARNING:
        log.warning(
            "the tuned model often does not stop: check that the template's end-of-turn token is "
            "trained and is a stop token, or train longer"
        )
    return {"stop_rate": rate, "stop_rate_samples": len(replies)}


def _after_training(context: Any) -> dict[str, Any]:
    samples = context.config.train.stop_check_samples
    if samples == 0:
        return {}
    engine = ChatEngine(
        context.config.model,
        context.config.generation,
        model=context.model,
        tokenizer=context.tokenizer,
    )
    records = context.eval_records or context.train_records
    return stop_rate(engine, records, samples, context.config.data.cutoff_len)


STAGE = Stage(name="sft", dataset_kind="conversation", after_training=_after_training)
