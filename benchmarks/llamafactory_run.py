"""Run LLaMA-Factory's training and count the real tokens it processed (its venv runs this).

    .llamafactory-venv/bin/python benchmarks/llamafactory_run.py CONFIG.yaml COUNTS.json

`llamafactory-cli train CONFIG.yaml`, plus an exact count of the non-padding tokens of every
batch a training step consumed: LLaMA-Factory's collator sees each row unpadded (a packed row
is several examples already joined), so the count is taken there and travels with its batch
(the dataloader prefetches, so a count taken at collation alone would be one batch ahead).
The count is taken in the collator both stages share (sft's rows; dpo's chosen and rejected rows,
which its pairwise collator hands over unpadded, concatenated).
The Trainer's own `include_num_input_tokens_seen` cannot do it: "all" counts padding, and
with neat_packing the attention mask holds segment ids, then a 4-D mask.
"""

from __future__ import annotations

import json
import sys

import torch
import transformers
import yaml
from llamafactory.data import collator
from llamafactory.train.tuner import run_exp

KEY = "corral_bench_real_tokens"
seen = {"real_tokens": 0, "steps": 0}


def _counting(call):
    def counted(self, features):
        real = sum(len(feature["input_ids"]) for feature in features)
        batch = call(self, features)
        batch[KEY] = torch.tensor(real)
        return batch

    return counted


def _popping(step):
    def training_step(self, model, inputs, *args, **kwargs):
        seen["real_tokens"] += int(inputs.pop(KEY))
        seen["steps"] += 1
        return step(self, model, inputs, *args, **kwargs)

    return training_step


if __name__ == "__main__":
    config, counts = sys.argv[1], sys.argv[2]
    lf_collator = collator.MultiModalDataCollatorForSeq2Seq
    lf_collator.__call__ = _counting(lf_collator.__call__)
    transformers.Trainer.training_step = _popping(transformers.Trainer.training_step)
    with open(config, encoding="utf-8") as f:
        run_exp(yaml.safe_load(f))
    with open(counts, "w", encoding="utf-8") as f:
        json.dump(seen, f)
