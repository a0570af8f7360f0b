"""stage: kto on tiny random Llamas: the unpaired processor (sft's encoding, KL rows, labels,
truncation, the missing-tag error), the loss against a plain torch reference, config checks,
and short runs that learn a held-out preference and keep the reference frozen."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from corral.config import load_config
from corral.config.fields import DataConfig, ModelConfig
from corral.data.collator import UnpairedCollator
from corral.data.processors import (
    IGNORE_INDEX,
    encode_conversations,
    process_records,
)
from corral.data.records import Record
from corral.data.templates import encode_turns, get_template
from corral.utils.errors import ConfigError, DataError

TOPICS = [
    "rivers", "volcanoes", "bread", "chess", "owls", "tides", "glass", "maps", "bees", "clocks",
    "snow", "ships", "paper", "bridges", "salt", "kites", "comets", "honey", "wolves", "ink",
    "deserts", "violins", "copper", "moss",
]  # fmt: skip
REFUSAL = "I won't answer that."


def _helpful(topic: str) -> str:
    return f"Sure. Here is what I know about {topic}."


def _record(turns: list[str], label: bool | None, source: str = "t:1") -> Record:
    roles = ["user", "assistant"] * len(turns)
    messages = [{"role": r, "content": c} for r, c in zip(roles, turns, strict=False)]
    return Record(messages, label=label, source=source)


def _rows(records, tokenizer, cutoff_len=256):
    template = get_template("chatml", tokenizer)
    data = DataConfig(cutoff_len=cutoff_len)
    return process_records(records, data, tokenizer, template, kind="unpaired_preference")


def _prompt_len(labels: list[int]) -> int:
    return next(k for k, label in enumerate(labels) if label != IGNORE_INDEX)


# --- the unpaired processor --------------------------------------------------------------------


def test_an_example_is_sfts_last_exchange_with_its_label(smol_tokenizer):
    records = [
        _record(["What is ice?", "Frozen water.", "And steam?", "Hot water vapour."], True),
        _record(["Name a fruit.", "No."], False),
    ]
    rows, stats = _rows(records, smol_tokenizer)
    assert stats.examples == 2 and rows["kto_label"] == [True, False]
    template = get_template("chatml", smol_tokenizer)
    # sft with mask_history trains exactly the last reply: the same ids and labels
    sft = encode_conversations(records, smol_tokenizer, template, DataConfig(mask_history=True))
    for row, expected in zip(rows.to_list(), sft, strict=True):
        assert row["input_ids"] == expected.input_ids[0]
        assert row["labels"] == expected.labels[0]
        assert row["length"] == max(len(row["input_ids"]), len(row["kl_input_ids"]))
    first = rows[0]
    reply = smol_tokenizer.decode(first["input_ids"][_prompt_len(first["labels"]) :])
    assert reply == "Hot water vapour.<|im_end|>\n"
    prompt = smol_tokenizer.decode(first["input_ids"][: _prompt_len(first["labels"])])
    assert "Frozen water." in prompt and prompt.endswith("<|im_start|>assistant\n")


def test_kl_rows_pair_each_prompt_with_the_previous_records_reply(smol_tokenizer):
    records = [
        _record(["Q one", "Answer one."], True),
        _record(["Q two", "Answer two, longer."], False),
        _record(["Q three", "Answer three."], True),
    ]
    rows, _ = _rows(records, smol_tokenizer)
    template = get_template("chatml", smol_tokenizer)
    for k, row in enumerate(rows.to_list()):
        other = records[k - 1].messages[-1]  # the first record takes the last one's reply
        mismatched = records[k].to_messages()[:-1] + [other]
        turns = encode_turns(template, smol_tokenizer, mismatched)
        # spliced ids are what the template renders for the mismatched conversation
        assert row["kl_input_ids"] == turns[0][0] + turns[0][1]
        prompt = len(turns[0][0])
        assert row["kl_labels"] == [IGNORE_INDEX] * prompt + turns[0][1]
        assert row["kl_input_ids"][:prompt] == row["input_ids"][:prompt]


def test_dropped_records_keep_labels_aligned(smol_tokenizer):
    tool = Record(
        [{"role": "user", "content": "q"}, {"role": "function_call", "content": "{}"}],
        label=True,
        source="t:2",
    )
    records = [_record(["a", "A."], False), tool, _record(["b", "B."], True)]
    rows, stats = _rows(records, smol_tokenizer)
    [reason] = stats.dropped  # a call without a name
    assert reason.startswith("a tool call must be JSON") and stats.first_dropped[reason] == "t:2"
    assert rows["kto_label"] == [False, True]
    replies = [smol_tokenizer.decode(r["input_ids"][_prompt_len(r["labels"]) :]) for r in rows]
    assert replies == ["A.<|im_end|>\n", "B.<|im_end|>\n"]


def test_truncation_keeps_the_reply_and_fits_the_kl_row(smol_tokenizer):
    long_reply = " ".join(f"word{i}" for i in range(200))
    records = [
        _record(["Tell me " + "very " * 100 + "much.", long_reply], True),
        _record(["Short?", "Short. " * 60], False),
    ]
    rows, stats = _rows(records, smol_tokenizer, cutoff_len=64)
    assert stats.truncated == 2 and stats.truncated_responses == 2
    row = rows[0]
    assert len(row["input_ids"]) <= 64 and len(row["kl_input_ids"]) <= 64
    start = _prompt_len(row["labels"])
    assert smol_tokenizer.decode(row["input_ids"][start:]).startswith("word0 word1 word2")
    prompt_text = smol_tokenizer.decode(row["input_ids"][:start])
    assert "Tell me very" in prompt_text and prompt_text.endswith("<|im_start|>assistant\n")
    assert smol_tokenizer.decode(row["kl_input_ids"][start:]).startswith("Short. Short.")


def test_the_collator_pads_examples_and_kl_rows_to_one_width(smol_tokenizer):
    records = [_record(["Hi", "Hello there, friend."], True), _record(["Why?", "No."], False)]
    rows, _ = _rows(records, smol_tokenizer)
    batch = UnpairedCollator(smol_tokenizer.pad_token_id)(rows.to_list())
    assert batch["input_ids"].shape == batch["kl_input_ids"].shape
    assert batch["kto_label"].tolist() == [True, False]
    lengths = [len(r[k]) for r in rows for k in ("input_ids", "kl_input_ids")]
    assert int(batch["num_real_tokens"]) == sum(lengths)  # the model runs over both
    for prefix in ("", "kl_"):
        for k, row in enumerate(rows):
            n = len(row[f"{prefix}input_ids"])
            assert batch[f"{prefix}input_ids"][k, :n].tolist() == row[f"{prefix}input_ids"]
            assert batch[f"{prefix}labels"][k, :n].tolist() == row[f"{prefix}labels"]
            assert (batch[f"{prefix}labels"][k, n:] == IGNORE_INDEX).all()


def test_kto_en_demo_tokenises_with_the_default_tokenizer(smol_tokenizer, demo_dir):
    from corral.data.loader import load_records

    config = load_config(
        None, ["stage=kto", "dataset=kto_en_demo", f"dataset_dir={demo_dir}", "cutoff_len=512"]
    )
    loaded = load_records(config.data, seed=0)
    rows, stats = _rows(loaded.train, smol_tokenizer, cutoff_len=512)
    assert stats.examples_in == 300 and stats.dropped == {}
    assert len(rows) == 300 and sum(rows["kto_label"]) == 150
    assert max(rows["length"]) <= 512
    assert all(row["labels"][-1] != IGNORE_INDEX for row in rows.select(range(5)))
    assert all(row["kl_labels"][-1] != IGNORE_INDEX for row in rows.select(range(5)))


def test_a_kto_dataset_without_its_tag_names_the_dataset_and_kto_tag(tmp_path, smol_tokenizer):
    from corral.data.dataset import build_dataset

    (tmp_path / "kto.json").write_text(
        json.dumps(
            [
                {
                    "messages": [
                        {"role": "user", "content": "q"},
                        {"role": "assistant", "content": "a"},
                    ]
                }
            ]
        )
    )
    columns = {"messages": "messages"}  # the kto_tag column is not mapped
    entry = {"file_name": "kto.json", "formatting": "sharegpt", "columns": columns}
    entry["tags"] = {"role_tag": "role", "content_tag": "content", "user_tag": "user"}
    entry["tags"]["assistant_tag"] = "assistant"
    (tmp_path / "dataset_info.json").write_text(json.dumps({"mykto": entry}))
    data = DataConfig(dataset=["mykto"], dataset_dir=str(tmp_path), overwrite_cache=True)
    template = get_template("chatml", smol_tokenizer)
    with pytest.raises(DataError, match="dataset 'mykto' holds conversation records.*kto_tag"):
        build_dataset(data, smol_tokenizer, template, kind="unpaired_preference", seed=0)


# --- config -----------------------------------------------------------------------------------


def test_kto_config_is_accepted_with_llama_factory_keys():
    config = load_config(
        None,
        ["stage=kto", "pref_beta=0.2", "pref_ftx=0.1", "kto_chosen_weight=1.5"]
        + ["kto_rejected_weight=0.5", "ref_model=/some/model"],
    )
    method = config.method
    assert (method.stage, method.pref_beta, method.kto_chosen_weight) == ("kto", 0.2, 1.5)
    assert config.notes == [] and config.data.packing is False
    assert config.output.output_dir == "saves/kto-lora"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["stage=kto", "packing=true"], "packing: true does not apply to stage kto"),
        (["stage=kto", "ref_model_adapters=/a"], "set ref_model too"),
        (["stage=kto", "kto_chosen_weight=0"], "kto_chosen_weight: must be > 0"),
        (["stage=kto", "do_eval=true", "val_size=0.1"], "with stage kto set val_size"),
    ],
)
def test_bad_kto_configs_are_named(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


def test_kto_keys_on_dpo_are_ignored_with_a_note():
    config = load_config(None, ["stage=dpo", "kto_chosen_weight=2"])
    assert config.notes == [
        "ignoring kto_chosen_weight: stage dpo does not read them (they belong to kto)"
    ]


# --- the loss against a plain torch reference --------------------------------------------------


def _logps(model, rows, prefix=""):
    """Plain torch: each sequence alone, full logits, log_softmax, gather, sum over the reply."""
    out, counts = [], []
    for row in rows:
        ids = torch.tensor([row[f"{prefix}input_ids"]])
        labels = torch.tensor(row[f"{prefix}labels"])
        logits = model(input_ids=ids).logits[0, :-1].float()
        token_logps = logits.log_softmax(-1).gather(1, ids[0, 1:, None]).squeeze(1)
        reply = labels[1:] != IGNORE_INDEX
        out.append(token_logps[reply].sum())
        counts.append(reply.sum())
    return torch.stack(out), torch.stack(counts)


def _reference_loss(method, policy, reference, kl_policy, kl_reference, desirable, counts):
    """TRL 1.16's KTOTrainer loss, LLaMA-Factory 0.9.5's pref_ftx term, written out plainly."""
    beta = method.pref_beta
    kl = max((kl_policy - kl_reference).mean().item(), 0.0)
    losses = []
    for pi, ref, liked in zip(policy, reference, desirable, strict=True):
        if liked:
            losses.append(method.kto_chosen_weight * (1 - torch.sigmoid(beta * (pi - ref - kl))))
        else:
            losses.append(method.kto_rejected_weight * (1 - torch.sigmoid(beta * (kl - pi + ref))))
    loss = torch.stack(losses).mean()
    liked = torch.tensor(desirable)
    if method.pref_ftx > 0:
        nll = (-policy / counts)[liked].mean()
        loss = loss + method.pref_ftx * nll * len(desirable) / int(liked.sum())
    rewards = beta * (policy - reference)
    return loss, rewards[liked], rewards[~liked], kl


def _perturb(model, only_lora: bool) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and ("lora_B" in name or not only_lora):
                param.add_(torch.randn_like(param) * 0.05)


WEIGHTS = ["pref_beta=0.5", "kto_chosen_weight=1.5", "kto_rejected_weight=0.7"]
# (finetuning_type, reference, extra keys): the reference is the disabled adapter, a frozen
# copy, or a ref_model folder that scores the replies worse than the policy does, so the KL
# estimate is positive and really subtracted.
LOSS_CASES = [
    ("lora", "adapter", []),
    ("lora", "adapter", WEIGHTS),
    ("full", "copy", ["pref_ftx=0.3"]),
    ("freeze", "copy", []),
    ("lora", "ref_model", []),
    ("lora", "ref_model", [*WEIGHTS, "pref_ftx=0.3"]),
]


@pytest.mark.parametrize(("method_name", "reference_kind", "extra"), LOSS_CASES, ids=str)
def test_loss_and_metrics_equal_a_plain_torch_reference(
    tiny_llama_dir, smol_tokenizer, tmp_path, method_name, reference_kind, extra
):
    from corral.model.adapters import apply_method
    from corral.model.load import load_model
    from corral.train.kto import make_loss

    reference_dir = tiny_llama_dir
    if reference_kind == "ref_model":
        reference_dir = tmp_path / "reference"
        shutil.copytree(tiny_llama_dir, reference_dir)  # the tokenizer too
        worse, _ = load_model(ModelConfig(model_name_or_path=str(tiny_llama_dir)))
        _perturb(worse.requires_grad_(True), only_lora=False)
        worse.save_pretrained(reference_dir)
        extra = [*extra, f"ref_model={reference_dir}"]
    config = load_config(
        None,
        [f"model_name_or_path={tiny_llama_dir}", "stage=kto"]
        + [f"finetuning_type={method_name}", "device=cpu", *extra],
    )
    model, _ = load_model(config.model, for_training=True)
    reference_model, _ = load_model(ModelConfig(model_name_or_path=str(reference_dir)))
    loss_fn = make_loss(config, model)
    model = apply_method(model, config.method)
    if reference_kind != "ref_model":  # move the policy away from the reference
        _perturb(model, only_lora=method_name == "lora")  # LoRA B starts at zero
    model.eval()
    desirable = [True, False, True, False]
    records = [
        _record(["What is ice?", "Ice is frozen water."], True),
        _record(["Name a fruit, please.", "I won't answer that, sorry."], False),
        _record(["Hi", "Hello! How can I help you today?"], True),
        _record(["Count to three.", "No."], False),
    ]
    rows, _ = _rows(records, smol_tokenizer)
    rows = rows.to_list()
    batch = UnpairedCollator(smol_tokenizer.pad_token_id)(rows)
    batch.pop("num_real_tokens")
    with torch.no_grad():
        loss, metrics = loss_fn(model, batch)
        policy, counts = _logps(model, rows)
        reference, _ = _logps(reference_model, rows)
        kl_policy, _ = _logps(model, rows, "kl_")
        kl_reference, _ = _logps(reference_model, rows, "kl_")
    expected, chosen, rejected, kl = _reference_loss(
        config.method, policy, reference, kl_policy, kl_reference, desirable, counts
    )
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    assert metrics["kl"] == pytest.approx(kl, abs=1e-5)
    assert metrics["rewards/chosen"] == pytest.approx(chosen.mean().item(), abs=1e-5)
    assert metrics["rewards/rejected"] == pytest.approx(rejected.mean().item(), abs=1e-5)
    margin = (chosen.mean() - rejected.mean()).item()
    assert metrics["rewards/margins"] == pytest.approx(margin, abs=1e-5)
    liked = torch.tensor(desirable)
    assert metrics["logps/chosen"] == pytest.approx(policy[liked].mean().item(), abs=1e-5)
    assert metrics["logps/rejected"] == pytest.approx(policy[~liked].mean().item(), abs=1e-5)
    assert abs(chosen).max() > 1e-4  # the policy really differs from the reference
    if reference_kind == "ref_model":
        assert kl > 0.01  # the estimate is subtracted, not clamped away


def test_kl_is_clamped_detached_and_a_missing_side_logs_nothing():
    from corral.config.fields import MethodConfig
    from corral.train.kto import _metrics, kto_losses

    method = MethodConfig(pref_beta=1.0)
    policy = torch.tensor([-1.0, -2.0], requires_grad=True)
    kl_policy = torch.tensor([-5.0, -5.0], requires_grad=True)
    desirable = torch.tensor([True, True])
    losses, rewards, kl = kto_losses(
        policy, torch.zeros(2), kl_policy, torch.zeros(2), desirable, method
    )
    assert kl.item() == 0.0 and not kl.requires_grad  # a negative estimate is clamped at 0
    expected = 1 - torch.sigmoid(torch.tensor([-1.0, -2.0]))
    torch.testing.assert_close(losses.detach(), expected)
    losses.sum().backward()
    assert kl_policy.grad is None  # no gradient flows through the KL rows
    metrics = _metrics(rewards, policy.detach(), desirable, kl)
    assert set(metrics) == {"kl", "rewards/chosen", "logps/chosen"}


# --- training runs ------------------------------------------------------------------------------


def _examples(topics: list[str]) -> list[dict]:
    """For every topic a liked helpful reply and a disliked dismissive one, as kto_en_demo."""
    rows = []
    for topic in topics:
        for reply, label in ((_helpful(topic), True), (REFUSAL, False)):
            messages = [
                {"role": "user", "content": f"Q: {topic}"},
                {"role": "assistant", "content": reply},
            ]
            rows.append({"messages": messages, "label": label})
    return rows


def _kto_config(tiny_llama_dir, folder, topics, *extra: str):
    (folder / "kto.json").write_text(json.dumps(_examples(topics)))
    entry = {
        "file_name": "kto.json",
        "formatting": "sharegpt",
        "columns": {"messages": "messages", "kto_tag": "label"},
        "tags": {
            "role_tag": "role",
            "content_tag": "content",
            "user_tag": "user",
            "assistant_tag": "assistant",
        },
    }
    (folder / "dataset_info.json").write_text(json.dumps({"mykto": entry}))
    return load_config(
        None,
        [
            f"model_name_or_path={tiny_llama_dir}",
            "dataset=mykto",
            f"dataset_dir={folder}",
            f"output_dir={folder / 'out'}",
            "stage=kto",
            "template=chatml",
            "cutoff_len=64",
            "per_device_train_batch_size=4",
            "lr_scheduler_type=constant",
            "logging_steps=1",
            "save_steps=1000",
            "seed=0",
            *extra,
        ],
    )


def _logs(out) -> list[dict]:
    from corral.train import callbacks

    return [json.loads(line) for line in (out / callbacks.LOG_FILE).read_text().splitlines()]


def test_full_kto_keeps_its_reference_frozen_and_logs_validation_rewards(tiny_llama_dir, tmp_path):
    from corral.train.workflow import run_training

    metrics = run_training(
        _kto_config(
            tiny_llama_dir,
            tmp_path,
            TOPICS[:12],
            "finetuning_type=full",
            "learning_rate=1e-3",
            "max_steps=4",
            "val_size=4",
            "eval_steps=2",
        )
    )
    logs = _logs(tmp_path / "out")
    losses = [entry["loss"] for entry in logs if "loss" in entry]
    assert losses[0] == pytest.approx(0.5, abs=1e-4)  # policy == reference: 1 - sigmoid(0)
    # a reference that trained along would keep every log-ratio at 0 and the loss at 0.5
    assert losses[-1] < 0.5 - 0.01, losses
    train_logs = [entry for entry in logs if "loss" in entry]
    assert all("kl" in entry for entry in train_logs)
    evals = [entry for entry in logs if "eval_loss" in entry]
    assert [entry["step"] for entry in evals] == [2, 4]
    assert all({"eval_kl", "eval_rewards/chosen"} <= set(entry) for entry in evals)
    assert {"kl", "rewards/chosen", "rewards/rejected", "logps/chosen"} <= set(metrics)


def _rewards(policy, reference, rows) -> torch.Tensor:
    with torch.no_grad():
        return _logps(policy, rows)[0] - _logps(reference, rows)[0]


def test_kto_lora_learns_a_held_out_preference(tiny_llama_dir, smol_tokenizer, tmp_path):
    from safetensors.torch import load_file

    from corral.model.load import load_model
    from corral.train.workflow import run_training

    train_topics, held_out = TOPICS[:16], TOPICS[16:]
    out = tmp_path / "out"
    metrics = run_training(
        _kto_config(
            tiny_llama_dir,
            tmp_path,
            train_topics,
            "finetuning_type=lora",
            "learning_rate=1e-2",
            "max_steps=20",
        )
    )
    losses = [entry["loss"] for entry in _logs(out) if "loss" in entry]
    assert losses[0] == pytest.approx(0.5, abs=1e-4)  # LoRA B is 0: policy == reference
    assert losses[-1] < 0.5 * losses[0], losses
    assert metrics["rewards/chosen"] > metrics["rewards/rejected"]
    saved = load_file(out / "adapter_model.safetensors")
    assert saved and all("lora" in name for name in saved)  # frozen base weights not saved

    tuned, _ = load_model(ModelConfig(adapter_name_or_path=[str(out)], device="cpu"))
    base, _ = load_model(ModelConfig(model_name_or_path=str(tiny_llama_dir), device="cpu"))
    records = [
        _record([f"Q: {t}", reply], label)
        for t in held_out
        for reply, label in ((_helpful(t), True), (REFUSAL, False))
    ]
    held, _ = _rows(records, smol_tokenizer, cutoff_len=64)
    held = held.to_list()
    before = _rewards(base, base, held).view(-1, 2)  # (helpful, dismissive) per prompt
    after = _rewards(tuned, base, held).view(-1, 2)
    margins = after[:, 0] - after[:, 1]
    accuracy = (margins > 0).float().mean().item()
    print(f"held-out preference accuracy {accuracy:.2f}, mean margin {margins.mean():.3f}")
    assert before.abs().max() == 0 and accuracy >= 0.8 and margins.mean() > 0
