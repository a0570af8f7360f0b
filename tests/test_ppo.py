"""stage: ppo: the prompt processor, GAE and the clipped losses against plain loops, the KL
controller, config checks, and a short LoRA run on a tiny Llama that raises the reward of its
greedy replies to held-out prompts against a reward the test controls."""

from __future__ import annotations

import json

import pytest
import torch

from corral.config import load_config
from corral.config.fields import DataConfig, ModelConfig
from corral.data.processors import IGNORE_INDEX, PROMPT_TOO_LONG, process_records, split_prompt
from corral.data.records import Record
from corral.data.templates import encode_prompt, get_template
from corral.train import ppo_math
from corral.utils.errors import ConfigError

TOPICS = [
    "rivers", "volcanoes", "bread", "chess", "owls", "tides", "glass", "maps", "bees", "clocks",
    "snow", "ships", "paper", "bridges", "salt", "kites", "comets", "honey", "wolves", "ink",
    "deserts", "violins", "copper", "moss",
]  # fmt: skip


def _prompts(records, tokenizer, cutoff_len=256):
    template = get_template("chatml", tokenizer)
    return process_records(
        records, DataConfig(cutoff_len=cutoff_len), tokenizer, template, kind="prompt"
    )


# --- the prompt processor ----------------------------------------------------------------------


def test_prompt_is_what_chat_sends_and_the_reply_is_labelled(smol_tokenizer):
    template = get_template("chatml", smol_tokenizer)
    question = [{"role": "user", "content": "What is ice?"}]
    sft = Record(
        [
            {"role": "system", "content": "Be brief."},
            *question,
            {"role": "assistant", "content": "Frozen water."},
        ]
    )
    pair = Record(
        question,
        chosen={"role": "assistant", "content": "Frozen water."},
        rejected={"role": "assistant", "content": "No idea."},
    )
    bare = Record(question)  # a prompt alone: nothing to compare with, still a prompt
    rows, stats = _prompts([sft, pair, bare], smol_tokenizer)
    assert stats.dropped == {} and len(rows) == 3
    conversations = (sft.to_messages()[:-1], question, question)
    for row, messages, reference in zip(
        rows.to_list(), conversations, ("Frozen water.", "Frozen water.", ""), strict=True
    ):
        prompt, reply = split_prompt(row["input_ids"], row["labels"])
        assert prompt == encode_prompt(template, smol_tokenizer, messages)
        assert row["labels"][: len(prompt)] == [IGNORE_INDEX] * len(prompt)
        assert smol_tokenizer.decode(reply) == reference  # the chosen reply, never rejected


def test_a_prompt_that_fills_cutoff_len_is_dropped_and_counted(smol_tokenizer):
    records = [
        Record([{"role": "user", "content": "Tell me " + "very " * 80 + "much."}], source="p:1"),
        Record(
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello " * 40}]
        ),
    ]
    rows, stats = _prompts(records, smol_tokenizer, cutoff_len=32)
    assert stats.dropped == {PROMPT_TOO_LONG: 1} and stats.first_dropped[PROMPT_TOO_LONG] == "p:1"
    [row] = rows.to_list()
    assert len(row["input_ids"]) == 32  # the reference reply is cut to the room left


# --- the arithmetic against plain loops ----------------------------------------------------------


def _random_batch(seed=0, rows=3, width=5):
    generator = torch.Generator().manual_seed(seed)
    lengths = [5, 2, 4][:rows]
    mask = torch.tensor([[1.0] * n + [0.0] * (width - n) for n in lengths])
    draw = lambda: torch.randn(rows, width, generator=generator) * mask  # noqa: E731
    return mask, lengths, draw


def test_gae_equals_a_plain_loop():
    mask, lengths, draw = _random_batch()
    rewards, values = draw(), draw()
    advantages, returns = ppo_math.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    for row, n in enumerate(lengths):
        expected, following = [0.0] * n, 0.0
        for t in reversed(range(n)):
            next_value = values[row, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[row, t].item() + 0.9 * next_value - values[row, t].item()
            following = delta + 0.9 * 0.8 * following
            expected[t] = following
        assert advantages[row, :n].tolist() == pytest.approx(expected, abs=1e-6)
        assert returns[row, :n].tolist() == pytest.approx(
            [a + v for a, v in zip(expected, values[row, :n].tolist(), strict=True)], abs=1e-6
        )
        assert advantages[row, n:].abs().sum() == 0 and returns[row, n:].abs().sum() == 0


def test_token_rewards_put_the_score_on_the_last_reply_token():
    mask, lengths, draw = _random_batch()
    kl, scores = draw(), torch.tensor([1.0, -2.0, 3.0])
    rewards = ppo_math.token_rewards(scores, kl, mask, kl_coef=0.5)
    for row, n in enumerate(lengths):
        expected = [-0.5 * kl[row, t].item() for t in range(n)]
        expected[-1] += scores[row].item()
        assert rewards[row, :n].tolist() == pytest.approx(expected, abs=1e-6)


def test_clipped_losses_equal_a_plain_loop():
    mask, lengths, draw = _random_batch(seed=1)
    logps, old_logps, advantages = draw(), draw(), draw()
    values, old_values, returns = draw(), draw(), draw()
    parts = ppo_math.ppo_loss(logps, old_logps, advantages, values, old_values, returns, mask)
    policy, value, clipped, tokens = 0.0, 0.0, 0, 0
    for row, n in enumerate(lengths):
        for t in range(n):
            ratio = float(torch.exp(logps[row, t] - old_logps[row, t]))
            adv = advantages[row, t].item()
            bounded = min(max(ratio, 0.8), 1.2)
            policy += max(-adv * ratio, -adv * bounded)
            clipped += -adv * bounded > -adv * ratio
            v, old, ret = values[row, t].item(), old_values[row, t].item(), returns[row, t].item()
            v_clipped = old + min(max(v - old, -0.2), 0.2)
            value += 0.5 * max((v - ret) ** 2, (v_clipped - ret) ** 2)
            tokens += 1
    assert parts.policy_loss.item() == pytest.approx(policy / tokens, abs=1e-5)
    assert parts.value_loss.item() == pytest.approx(value / tokens, abs=1e-5)
    assert parts.loss.item() == pytest.approx((policy + 0.1 * value) / tokens, abs=1e-5)
    assert parts.clip_fraction.item() == pytest.approx(clipped / tokens)
    assert 0 < clipped < tokens  # both branches taken, so both are checked


def test_whitening_and_running_moments():
    mask, _, draw = _random_batch(seed=2)
    values = draw() + 3
    white = ppo_math.masked_whiten(values, mask)
    picked = white[mask.bool()]
    assert picked.mean().item() == pytest.approx(0, abs=1e-5)
    assert picked.var(unbiased=False).item() == pytest.approx(1, abs=1e-4)
    kept = ppo_math.masked_whiten(values, mask, shift_mean=False)[mask.bool()]
    assert kept.mean().item() == pytest.approx(values[mask.bool()].mean().item(), abs=1e-5)
    moments, scores = ppo_math.RunningMoments(), torch.randn(10) * 3 + 1
    for chunk in scores.split([4, 1, 5]):
        moments.update(chunk)
    assert moments.mean == pytest.approx(scores.mean().item(), abs=1e-5)
    assert moments.var == pytest.approx(scores.var(unbiased=False).item(), abs=1e-4)


def test_adaptive_kl_moves_towards_its_target_within_its_clip():
    control = ppo_math.AdaptiveKL(target=6.0, value=0.2, horizon=100)
    control.update(12.0, rollouts=10)  # twice the target: error clipped to +0.2
    assert control.value == pytest.approx(0.2 * (1 + 0.2 * 10 / 100))
    before = control.value
    control.update(3.0, rollouts=10)  # half the target: -0.2
    assert control.value == pytest.approx(before * (1 - 0.2 * 10 / 100))
    control.update(6.0, rollouts=10)  # on target: unchanged
    assert control.value == pytest.approx(before * (1 - 0.2 * 10 / 100))


# --- config ------------------------------------------------------------------------------------


def _ppo_keys(*extra: str) -> list[str]:
    return ["model_name_or_path=m", "dataset=d", "stage=ppo", "reward_model=saves/rm", *extra]


def test_ppo_config_takes_llama_factory_keys():
    config = load_config(
        None,
        _ppo_keys(
            "reward_model_type=full",
            "ppo_buffer_size=2",
            "ppo_epochs=2",
            "ppo_score_norm=true",
            "ppo_whiten_rewards=true",
            "ppo_target=3",
            "max_new_tokens=32",
            "top_k=0",
        ),
    )
    method = config.method
    assert (method.ppo_buffer_size, method.ppo_epochs, method.ppo_target) == (2, 2, 3.0)
    assert method.ppo_score_norm and method.ppo_whiten_rewards and config.notes == []
    [note] = load_config(None, _ppo_keys("val_size=0.1")).notes
    assert "stage ppo does not validate" in note


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (["model_name_or_path=m", "dataset=d", "stage=ppo"], "stage: ppo needs reward_model"),
        (_ppo_keys("resume_from_checkpoint=true"), "stage ppo cannot resume"),
        (_ppo_keys("packing=true"), "packing: true does not apply to stage ppo"),
    ],
)
def test_bad_ppo_configs_are_named(keys, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, keys)


# --- a training run ------------------------------------------------------------------------------


class _DirectionReward:
    """The reward the test controls: the share of reply tokens on the positive side of a fixed
    random direction of the base model's LM head (the tokens whose head row r has r . d > 0).

    A tiny random model's next-token distribution is nearly uniform, so no single token is
    sampled often enough to be learnt; this reward is reachable by turning the last hidden
    state towards d, which a LoRA policy can learn, and greedy replies show it.
    """

    def __init__(self, head_weight: torch.Tensor):
        direction = torch.randn(head_weight.shape[1], generator=torch.Generator().manual_seed(0))
        self.positive = (head_weight.float() @ direction > 0).float()

    def __call__(self, prompts, replies) -> torch.Tensor:
        del prompts
        return torch.stack([self.positive[torch.tensor(r)].mean() for r in replies])


def _greedy_reward(engine, topics, reward) -> float:
    conversations = [[{"role": "user", "content": f"Q: {t}"}] for t in topics]
    replies = engine.generate_batch(conversations, temperature=0.0, max_new_tokens=8)
    return reward(None, [r.token_ids for r in replies]).mean().item()


def _run(tiny_llama_dir, folder, reward, monkeypatch, *extra: str) -> dict:
    """A ppo run on 16 prompts; `reward` replaces reward_model's (None: reward_model is read)."""
    from corral.train import ppo
    from corral.train.workflow import run_training

    if reward is not None:
        monkeypatch.setattr(ppo, "load_reward", lambda config, tokenizer, template=None: reward)
    rows = [{"instruction": f"Q: {t}", "input": "", "output": "Fine."} for t in TOPICS[:16]]
    (folder / "prompts.json").write_text(json.dumps(rows))
    info = {"prompts": {"file_name": "prompts.json"}}
    (folder / "dataset_info.json").write_text(json.dumps(info))
    keys = [
        f"model_name_or_path={tiny_llama_dir}",
        "dataset=prompts",
        f"dataset_dir={folder}",
        f"output_dir={folder / 'out'}",
        "stage=ppo",
        "reward_model=unused-the-test-scores",
        "template=chatml",
        "cutoff_len=64",
        "per_device_train_batch_size=4",
        "gradient_accumulation_steps=2",
        "ppo_epochs=2",
        "max_new_tokens=8",
        "temperature=1.0",
        "top_p=1.0",
        "top_k=10",  # among a near-uniform vocabulary, so replies can reach the reward
        "lr_scheduler_type=constant",
        "logging_steps=1",
        "seed=0",
        *extra,
    ]
    return run_training(load_config(None, keys))


def _steps(out) -> list[dict]:
    logs = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    return [entry for entry in logs if "reward" in entry]


def test_ppo_lora_raises_the_reward_of_greedy_replies_to_held_out_prompts(
    tiny_llama_dir, tmp_path, monkeypatch
):
    from safetensors.torch import load_file

    from corral.infer.engine import ChatEngine
    from corral.model.load import load_model
    from corral.train.ppo import VALUE_HEAD_FILE

    base, tokenizer = load_model(ModelConfig(model_name_or_path=str(tiny_llama_dir), device="cpu"))
    reward = _DirectionReward(base.get_output_embeddings().weight.detach())
    out = tmp_path / "out"
    metrics = _run(
        tiny_llama_dir,
        tmp_path,
        reward,
        monkeypatch,
        "learning_rate=1e-3",
        "max_steps=14",
        "save_steps=1000",
        "plot_loss=true",
    )
    steps = _steps(out)
    rewards, kls = [e["reward"] for e in steps], [e["kl"] for e in steps]
    print("rewards", [round(r, 2) for r in rewards], "kl", [round(k, 2) for k in kls])
    assert len(steps) == 14
    assert all({"policy_loss", "value_loss", "kl_coef", "loss"} <= set(e) for e in steps)
    assert kls[0] == pytest.approx(0, abs=1e-4)  # LoRA B starts at 0: policy == reference
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.15  # the sampled replies improved
    assert max(kls) < 6.0  # bounded (ppo_target is 6 nats per reply)
    assert metrics["ppo_reward"] == rewards[-1]

    # the folder chats as any adapter does (its base and template recorded), and its greedy
    # replies to prompts it never trained on score higher than the base model's
    tuned = ChatEngine(ModelConfig(adapter_name_or_path=[str(out)], device="cpu"))
    before = _greedy_reward(
        ChatEngine(ModelConfig(template="chatml"), model=base, tokenizer=tokenizer),
        TOPICS[16:],
        reward,
    )
    after = _greedy_reward(tuned, TOPICS[16:], reward)
    print(f"held-out greedy reward {before:.3f} -> {after:.3f}")
    assert after > before + 0.15
    assert tuned.chat([{"role": "user", "content": "Q: moss"}], max_new_tokens=4).token_ids
    saved = load_file(out / "adapter_model.safetensors")
    assert saved and all("lora" in name for name in saved)  # the base stays as it was
    assert load_file(out / VALUE_HEAD_FILE)["weight"].abs().sum() > 0  # trained from zero
    assert (out / "training_loss.png").is_file() and (out / "training_reward.png").is_file()


@pytest.mark.parametrize("method", ["full", "freeze"])
def test_full_and_freeze_ppo_keep_the_reference_frozen_and_checkpoint_the_value_head(
    method, tiny_llama_dir, tmp_path, monkeypatch
):
    from corral.train.ppo import VALUE_HEAD_FILE

    def reward(prompts, replies):  # the share of even token ids: varies from reply to reply
        return torch.tensor([sum(t % 2 == 0 for t in r) / len(r) for r in replies])

    _run(
        tiny_llama_dir,
        tmp_path,
        reward,
        monkeypatch,
        f"finetuning_type={method}",
        "learning_rate=1e-4",
        "lr_scheduler_type=linear",
        "max_steps=3",
        "save_steps=2",
        "ppo_buffer_size=2",
        "ppo_score_norm=true",
        "ppo_whiten_rewards=true",
    )
    steps = _steps(tmp_path / "out")
    kls = [e["kl"] for e in steps]
    # the schedule steps once per PPO step (not per minibatch): 3 steps of linear decay
    assert [e["learning_rate"] for e in steps] == pytest.approx([1e-4, 2e-4 / 3, 1e-4 / 3])
    assert steps[-1]["epoch"] == pytest.approx(3 * 4 / 4)  # 4 micro-batches a step, 4 an epoch
    # a reference that trained along would keep the KL at 0
    assert kls[0] == pytest.approx(0, abs=1e-4) and abs(kls[-1]) > 1e-4, kls
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert (checkpoint / VALUE_HEAD_FILE).is_file() and (checkpoint / "model.safetensors").is_file()


# --- the reward from an rm output folder --------------------------------------------------------


def test_a_reward_model_folder_drives_ppo(tiny_llama_dir, reward_folder, tmp_path, monkeypatch):
    from corral.train import ppo

    calls, real = [], ppo.load_reward
    from corral.model.reward import load_reward_model  # stage rm's loader

    def spy(config, tokenizer, template=None):  # the real reward, recording what it scored
        reward = real(config, tokenizer, template)

        def scored(prompts, replies):
            calls.append((prompts, replies, reward(prompts, replies)))
            return calls[-1][2]

        return scored

    monkeypatch.setattr(ppo, "load_reward", spy)
    _run(
        tiny_llama_dir,
        tmp_path,
        None,
        monkeypatch,
        f"reward_model={reward_folder}",
        "reward_model_type=lora",
        "learning_rate=1e-3",
        "max_steps=2",
        "save_steps=1000",
    )
    scorer = load_reward_model(str(reward_folder), device="cpu")
    assert len(calls) == 4  # 2 steps x gradient_accumulation_steps 2
    for prompts, replies, scores in calls:
        expected = scorer.score([p + r for p, r in zip(prompts, replies, strict=True)])
        torch.testing.assert_close(scores, expected)
    first = torch.cat([calls[0][2], calls[1][2]]).mean().item()
    assert _steps(tmp_path / "out")[0]["reward"] == pytest.approx(first, abs=1e-5)
    assert len({round(float(s), 6) for _, _, scores in calls for s in scores}) > 1  # it varies


def test_a_wrong_reward_model_is_one_clear_error(tiny_llama_dir, reward_folder, smol_tokenizer):
    from corral.train import ppo
    from corral.utils.errors import CorralError

    def config(*keys):
        return load_config(None, [f"model_name_or_path={tiny_llama_dir}", "dataset=d", *keys])

    wrong_type = config("stage=ppo", f"reward_model={reward_folder}", "reward_model_type=full")
    with pytest.raises(CorralError, match="is an adapter but reward_model_type is full"):
        ppo.load_reward(wrong_type, smol_tokenizer)
    policy_folder = config("stage=ppo", f"reward_model={tiny_llama_dir}", "reward_model_type=full")
    with pytest.raises(CorralError, match="is not a reward model"):
        ppo.load_reward(policy_folder, smol_tokenizer)
