"""stage: grpo on tiny random Llamas: reward_funcs loading and its errors, config checks, the
GRPOConfig corral builds, and a LoRA run that raises a reward on held-out prompts while
generating from corral's own prompt tokens."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from corral.config import load_config
from corral.config.fields import ModelConfig
from corral.data.templates import encode_prompt, get_template
from corral.utils.errors import ConfigError

TOPICS = [
    "rivers", "volcanoes", "bread", "chess", "owls", "tides", "glass", "maps", "bees", "clocks",
    "snow", "ships", "paper", "bridges", "salt", "kites", "comets", "honey", "wolves", "ink",
]  # fmt: skip
# The test's reward: the share of reply tokens from the lower half of the vocabulary. A random
# tiny model samples either half about equally, so the replies of one prompt differ in reward
# and GRPO has a signal from the first step.
REWARDS = """
CALLS = []
NOT_A_FUNCTION = 3


def lower_half(completions, completion_ids, **kwargs):
    CALLS.append({k: kwargs[k] for k in ("prompts", "reference", "prompt_ids") if k in kwargs})
    return [sum(t < HALF for t in ids) / max(len(ids), 1) for ids in completion_ids]
"""


@pytest.fixture
def rewards_module(tmp_path, monkeypatch, smol_tokenizer):
    """A reward module written to a fresh current directory, as a user's rewards.py would be."""
    name = f"grpo_rewards_{tmp_path.name}"
    half = len(smol_tokenizer) // 2
    (tmp_path / f"{name}.py").write_text(REWARDS.replace("HALF", str(half)))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # load_reward_funcs adds the cwd
    yield name
    sys.modules.pop(name, None)


def test_reward_funcs_import_from_the_current_directory(rewards_module):
    from corral.train.grpo import load_reward_funcs

    [func] = load_reward_funcs([f"{rewards_module}:lower_half"])
    assert func(completions=["a", "b"], completion_ids=[[1, 2], [49000]]) == [1.0, 0.0]


def test_bad_reward_funcs_are_one_error_naming_key_and_value(rewards_module):
    from corral.train.grpo import load_reward_funcs

    specs = [
        "no_such_module_xyz:score",
        f"{rewards_module}:missing",
        f"{rewards_module}:NOT_A_FUNCTION",
        "just_a_name",
        f"{rewards_module}:lower_half",  # fine: only the bad ones are reported
    ]
    with pytest.raises(ConfigError) as err:
        load_reward_funcs(specs)
    message = str(err.value)
    assert "reward_funcs: 'no_such_module_xyz:score': cannot import module" in message
    assert "ModuleNotFoundError" in message
    assert f"reward_funcs: '{rewards_module}:missing': module '{rewards_module}' has no" in message
    assert "'NOT_A_FUNCTION' is a int, not a function" in message
    assert "reward_funcs: 'just_a_name' is not 'module:function'" in message
    assert "lower_half" not in message


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["stage=grpo"], "stage grpo needs a reward: set reward_funcs"),
        (["stage=grpo", "reward_funcs=m:f", "temperature=0"], "temperature: 0 means greedy"),
        (["stage=grpo", "reward_funcs=m:f", "ref_model=/m"], "ref_model: grpo's reference"),
        (["stage=grpo", "reward_funcs=m:f", "packing=true"], "packing: true does not apply"),
        (
            ["stage=grpo", "reward_funcs=m:f", "grpo_beta=0.1", "finetuning_type=full"]
            + ["adapter_name_or_path=/sft"],
            "the KL reference would be the base without the adapter",
        ),
        (["stage=grpo", "reward_funcs=m:f", "grpo_beta=-1"], "grpo_beta: must be >= 0"),
        (["stage=grpo", "reward_funcs=m:f", "num_generations=1"], "num_generations: must be >= 2"),
    ],
)
def test_bad_grpo_configs_are_named(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


def test_grpo_keys_on_another_stage_are_ignored_with_a_note():
    config = load_config(None, ["stage=sft", "grpo_beta=0.04"])
    assert config.notes == [
        "ignoring grpo_beta: stage sft does not read them (they belong to grpo)"
    ]


def test_grpo_config_maps_corral_settings_once():
    from corral.train.grpo import grpo_arguments
    from corral.train.trainer import training_arguments

    config = load_config(
        None,
        [
            "stage=grpo",
            "reward_funcs=m:f",
            "device=cpu",
            "per_device_train_batch_size=3",
            "gradient_accumulation_steps=2",
            "num_generations=5",
            "learning_rate=3e-5",
            "max_steps=7",
            "logging_steps=2",
            "save_steps=50",
            "max_new_tokens=33",
            "temperature=0.9",
            "top_p=0.8",
            "top_k=7",
            "grpo_beta=0.04",
        ],
    )
    args = grpo_arguments(config, training_arguments(config, has_eval=False))
    # TRL's own defaults are bf16 and activation checkpointing, which fail on CPU
    assert not args.bf16 and not args.fp16 and not args.gradient_checkpointing
    assert (args.per_device_train_batch_size, args.num_generations) == (15, 5)  # 3 prompts x 5
    assert args.generation_batch_size == 30 and args.gradient_accumulation_steps == 2
    assert (args.learning_rate, args.max_steps, args.logging_steps, args.save_steps) == (
        3e-5,
        7,
        2,
        50,
    )
    assert (args.max_completion_length, args.temperature, args.top_p, args.top_k) == (
        33,
        0.9,
        0.8,
        7,
    )
    assert args.beta == 0.04 and args.use_cpu and args.output_dir == "saves/grpo-lora"


def _prompt_records(folder, topics) -> None:
    rows = [
        {"instruction": f"Tell me about {t}.", "input": "", "output": f"{t.title()} are fun."}
        for t in topics
    ]
    (folder / "prompts.json").write_text(json.dumps(rows))


def _sampled_reward(model, tokenizer, prompts, *, seed: int) -> float:
    """Mean test reward of 8 replies sampled per prompt as training samples (top_k 10)."""
    template = get_template("chatml", tokenizer)
    half, scores = len(tokenizer) // 2, []
    torch.manual_seed(seed)
    for prompt in prompts:
        ids = torch.tensor(
            [encode_prompt(template, tokenizer, [{"role": "user", "content": prompt}])]
        )
        out = model.generate(
            ids,
            do_sample=True,
            top_k=10,
            top_p=1.0,
            temperature=1.0,
            max_new_tokens=8,
            num_return_sequences=8,
            pad_token_id=tokenizer.pad_token_id,
        )
        scores += [sum(t < half for t in row) / len(row) for row in out[:, ids.shape[1] :].tolist()]
    return sum(scores) / len(scores)


def test_grpo_lora_raises_a_held_out_reward(
    tiny_llama_dir, smol_tokenizer, tmp_path, rewards_module, monkeypatch
):
    from transformers.generation.utils import GenerationMixin

    from corral.model.load import load_model
    from corral.train.callbacks import LOG_FILE
    from corral.train.workflow import run_training

    generated_from, stopped_on, generate = [], [], GenerationMixin.generate

    def spy(self, *args, **kwargs):  # what TRL really generates from, padding removed
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        generated_from.extend(row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True))
        stopped_on.append(list(kwargs["generation_config"].eos_token_id))
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", spy)
    _prompt_records(tmp_path, TOPICS[:12])
    out = tmp_path / "out"
    config = load_config(
        None,
        [
            f"model_name_or_path={tiny_llama_dir}",
            "dataset=prompts.json",
            f"output_dir={out}",
            "stage=grpo",
            "template=chatml",
            "cutoff_len=64",
            f"reward_funcs={rewards_module}:lower_half",
            "num_generations=4",
            "per_device_train_batch_size=2",
            "max_new_tokens=8",
            "temperature=1.0",
            "top_p=1.0",
            "top_k=10",
            "grpo_beta=0.01",
            "learning_rate=2e-2",
            "lr_scheduler_type=constant",
            "max_steps=16",
            "logging_steps=1",
            "save_steps=8",
            "seed=0",
            "device=cpu",
        ],
    )
    metrics = run_training(config)
    monkeypatch.setattr(GenerationMixin, "generate", generate)

    # TRL generated from corral's prompt tokens, exactly, and stopped on the template's stops
    template = get_template("chatml", smol_tokenizer)
    expected = {
        tuple(
            encode_prompt(
                template, smol_tokenizer, [{"role": "user", "content": f"Tell me about {t}."}]
            )
        )
        for t in TOPICS[:12]
    }
    stops = [smol_tokenizer.convert_tokens_to_ids("<|im_end|>")]
    prompts = [tuple(ids) for ids in generated_from]
    assert prompts and set(prompts) <= expected and all(s == stops for s in stopped_on)
    # ... and reward functions got the dataset's reply as `reference`
    calls = sys.modules[rewards_module].CALLS
    first = calls[0]
    assert len(first["reference"]) == 8 and len(set(map(tuple, first["prompt_ids"]))) == 2
    topic = first["prompts"][0].split("Tell me about ")[1].split(".")[0]
    assert first["reference"][0] == f"{topic.title()} are fun."

    logs = [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]
    rewards = [entry["reward"] for entry in logs if "reward" in entry]
    kls = [entry["kl"] for entry in logs if "kl" in entry]
    print(f"logged reward {rewards[0]:.2f} -> {rewards[-1]:.2f}; kl up to {max(kls):.3f}")
    assert len(rewards) == 16 and sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.2, rewards
    assert max(kls) < 5.0  # the KL penalty keeps the policy near the reference
    assert metrics["last_reward"] == rewards[-1] and metrics["real_tokens"] > 0

    # a normal adapter folder: LoRA weights only, no TRL "ref" adapter, in checkpoints neither
    from safetensors.torch import load_file

    saved = load_file(out / "adapter_model.safetensors")
    assert saved and all("lora" in name and ".ref." not in name for name in saved)
    assert (out / "checkpoint-8").is_dir() and not (out / "checkpoint-8" / "ref").exists()
    assert not (out / "ref").exists()
    tuned, _ = load_model(ModelConfig(adapter_name_or_path=[str(out)], device="cpu"))
    base, _ = load_model(ModelConfig(model_name_or_path=str(tiny_llama_dir), device="cpu"))
    held_out = [f"Tell me about {t}." for t in TOPICS[12:]]
    before = _sampled_reward(base, smol_tokenizer, held_out, seed=1)
    after = _sampled_reward(tuned, smol_tokenizer, held_out, seed=1)
    print(f"held-out sampled reward {before:.2f} -> {after:.2f}")
    assert after > before + 0.15


def test_a_reward_model_folder_scores_grpo_replies_as_it_was_trained(
    reward_folder, tiny_llama_dir, smol_tokenizer, tmp_path, monkeypatch
):
    """reward_model (an rm output folder) is a grpo reward: it scores corral's prompt ids plus
    each reply finished as rm training rendered it (ChatML: "<|im_end|>" then "\\n")."""
    from corral.train import rewards
    from corral.train.callbacks import LOG_FILE
    from corral.train.workflow import run_training

    scored, real = [], rewards.load_reward

    def spy(config, tokenizer, template=None):
        reward = real(config, tokenizer, template)

        def recorded(prompts, replies):
            scores = reward(prompts, replies)
            scored.append((prompts, replies, scores))
            return scores

        return recorded

    monkeypatch.setattr("corral.train.grpo.load_reward", spy)
    _prompt_records(tmp_path, TOPICS[:4])
    out = tmp_path / "out"
    keys = [
        f"model_name_or_path={tiny_llama_dir}",
        f"dataset={tmp_path / 'prompts.json'}",
        f"output_dir={out}",
        "stage=grpo",
        "template=chatml",
        "cutoff_len=64",
        f"reward_model={reward_folder}",
        "num_generations=2",
        "per_device_train_batch_size=2",
        "max_new_tokens=6",
        "temperature=1.0",
        "max_steps=2",
        "logging_steps=1",
        "save_steps=1000",
        "seed=0",
        "device=cpu",
    ]
    run_training(load_config(None, keys))
    assert scored and len(scored[0][1]) == 4  # 2 prompts x 2 replies per step
    logs = [json.loads(line) for line in (out / LOG_FILE).read_text().splitlines()]
    assert any("rewards/reward_model/mean" in entry for entry in logs)
    # the score is the rm's own score of the finished conversation
    from corral.model.reward import load_reward_model

    rm = load_reward_model(str(reward_folder), device="cpu")
    end = smol_tokenizer.convert_tokens_to_ids("<|im_end|>")
    newline = smol_tokenizer("\n", add_special_tokens=False)["input_ids"]
    prompts, replies, scores = scored[0]
    finished = [r[: r.index(end) + 1] + newline if end in r else r for r in replies]
    expected = rm.score([p + r for p, r in zip(prompts, finished, strict=True)])
    assert torch.allclose(scores, expected, atol=1e-5)
