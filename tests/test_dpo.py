"""stage: dpo on tiny random Llamas: the preference processor, the five losses against a plain
torch reference, config checks, and a short LoRA run that learns a held-out preference."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from corral.config import load_config
from corral.config.fields import DataConfig, ModelConfig
from corral.data.collator import PairCollator
from corral.data.processors import (
    IGNORE_INDEX,
    SAME_REPLIES,
    TRUNCATED,
    format_summary,
    process_records,
)
from corral.data.processors.stats import DataStats
from corral.data.records import Record
from corral.data.templates import encode_prompt, get_template
from corral.utils.errors import ConfigError, DataError

TOPICS = [
    "rivers", "volcanoes", "bread", "chess", "owls", "tides", "glass", "maps", "bees", "clocks",
    "snow", "ships", "paper", "bridges", "salt", "kites", "comets", "honey", "wolves", "ink",
    "deserts", "violins", "copper", "moss",
]  # fmt: skip
REFUSAL = "I won't answer that."


def _pair(topic: str) -> dict:
    return {
        "conversations": [{"from": "human", "value": f"Q: {topic}"}],
        "chosen": {"from": "gpt", "value": f"Sure. Here is what I know about {topic}."},
        "rejected": {"from": "gpt", "value": REFUSAL},
    }


def _register(folder, name: str, file_name: str) -> None:
    """A dataset_info.json entry as LLaMA-Factory's dpo_en_demo has it."""
    columns = {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}
    entry = {"file_name": file_name, "formatting": "sharegpt", "ranking": True, "columns": columns}
    (folder / "dataset_info.json").write_text(json.dumps({name: entry}))


def _record(prompt: str, chosen: str, rejected: str, source: str = "t:1") -> Record:
    return Record(
        [{"role": "user", "content": prompt}],
        chosen={"role": "assistant", "content": chosen},
        rejected={"role": "assistant", "content": rejected},
        source=source,
    )


def _pairs(records, tokenizer, cutoff_len=256):
    template = get_template("chatml", tokenizer)
    data = DataConfig(cutoff_len=cutoff_len)
    return process_records(records, data, tokenizer, template, kind="preference")


# --- the preference processor ----------------------------------------------------------------


def test_pair_shares_its_prompt_and_trains_only_the_replies(smol_tokenizer):
    record = _record("What is ice?", "Ice is frozen water.", "No idea.")
    rows, stats = _pairs([record], smol_tokenizer)
    [row] = rows.to_list()
    template = get_template("chatml", smol_tokenizer)
    prompt = encode_prompt(template, smol_tokenizer, record.to_messages())
    for side in ("chosen", "rejected"):
        ids, labels = row[f"{side}_input_ids"], row[f"{side}_labels"]
        assert ids[: len(prompt)] == prompt  # the prompt chat would send, token for token
        assert labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
        assert labels[len(prompt) :] == ids[len(prompt) :]
    reply = smol_tokenizer.decode(row["chosen_input_ids"][len(prompt) :])
    assert reply.startswith("Ice is frozen water.<|im_end|>")
    assert row["length"] == max(len(row["chosen_input_ids"]), len(row["rejected_input_ids"]))
    assert stats.examples == 1


def test_identical_replies_are_dropped_and_counted(smol_tokenizer):
    records = [
        _record("Hi", "Hello!", "Hello!", source="pairs:1"),
        _record("Hi", "Hello!", "Go away.", source="pairs:2"),
    ]
    rows, stats = _pairs(records, smol_tokenizer)
    assert len(rows) == 1 and stats.dropped == {SAME_REPLIES: 1}
    assert stats.first_dropped[SAME_REPLIES] == "pairs:1"
    summary = DataStats(kind="preference", cutoff_len=256, packing=False, parts=[stats])
    text = format_summary(summary)
    assert f"dropped 1: {SAME_REPLIES} (first: pairs:1)" in text
    assert "2 records -> 1 examples" in text


def test_truncation_shares_the_budget_with_the_longer_reply(smol_tokenizer):
    long_reply = " ".join(f"word{i}" for i in range(200))
    record = _record("Tell me " + "very " * 100 + "much.", long_reply, "Short.")
    rows, stats = _pairs([record], smol_tokenizer, cutoff_len=64)
    [row] = rows.to_list()
    assert stats.truncated == 1
    chosen, rejected = row["chosen_input_ids"], row["rejected_input_ids"]
    assert len(chosen) <= 64 and len(rejected) <= 64
    prompt_len = row["chosen_labels"].index(next(t for t in row["chosen_labels"] if t != -100))
    assert chosen[:prompt_len] == rejected[:prompt_len]  # still one shared prompt
    text = smol_tokenizer.decode(chosen[prompt_len:])
    assert text.startswith("word0 word1 word2")  # the reply keeps its start
    assert smol_tokenizer.decode(rejected[prompt_len:]) == "Short.<|im_end|>\n"
    prompt_text = smol_tokenizer.decode(chosen[:prompt_len])
    assert "Tell me very" in prompt_text and prompt_text.endswith("<|im_start|>assistant\n")


def test_truncation_status_is_counted(smol_tokenizer):
    rows, stats = _pairs([_record("Hi " * 40, "Hello there " * 30, "No.")], smol_tokenizer, 48)
    assert len(rows) == 1 and stats.truncated == 1 and stats.truncated_responses == 1
    _, whole = _pairs([_record("Hi", "Hello.", "No.")], smol_tokenizer)
    assert whole.truncated == 0 and TRUNCATED not in whole.dropped


def test_dpo_en_demo_tokenises_with_the_default_tokenizer(smol_tokenizer, demo_dir):
    from corral.data.loader import load_records

    config = load_config(
        None, ["stage=dpo", "dataset=dpo_en_demo", f"dataset_dir={demo_dir}", "cutoff_len=512"]
    )
    loaded = load_records(config.data, seed=0)
    rows, stats = _pairs(loaded.train, smol_tokenizer, cutoff_len=512)
    assert stats.examples_in == 300 and stats.dropped == {}
    assert len(rows) == 300 and max(rows["length"]) <= 512
    assert all(
        label != -100 for row in rows.select(range(5)) for label in row["chosen_labels"][-3:]
    )


def test_a_ranking_dataset_without_rejected_names_the_dataset(tmp_path, smol_tokenizer):
    from corral.data.dataset import build_dataset

    (tmp_path / "pairs.json").write_text(
        json.dumps([{"conversations": [{"from": "human", "value": "q"}], "chosen": "y"}])
    )
    _register(tmp_path, "mypairs", "pairs.json")
    data = DataConfig(dataset=["mypairs"], dataset_dir=str(tmp_path), overwrite_cache=True)
    template = get_template("chatml", smol_tokenizer)
    with pytest.raises(DataError, match="dataset 'mypairs'.*column 'rejected' not found"):
        build_dataset(data, smol_tokenizer, template, kind="preference", seed=0)


def test_a_conversation_dataset_is_refused_for_preference(tmp_path, smol_tokenizer):
    from corral.data.dataset import build_dataset

    path = tmp_path / "sft.json"
    path.write_text(json.dumps([{"instruction": "q", "input": "", "output": "a"}]))
    data = DataConfig(dataset=[str(path)], overwrite_cache=True)
    template = get_template("chatml", smol_tokenizer)
    with pytest.raises(DataError, match="holds conversation records.*preference"):
        build_dataset(data, smol_tokenizer, template, kind="preference", seed=0)


# --- config -----------------------------------------------------------------------------------


def test_dpo_config_is_accepted_with_llama_factory_keys():
    config = load_config(
        None,
        ["stage=dpo", "pref_beta=0.2", "pref_loss=ipo", "pref_ftx=0.5", "ref_model=/some/model"],
    )
    method = config.method
    assert (method.stage, method.pref_beta, method.pref_loss, method.pref_ftx) == (
        "dpo",
        0.2,
        "ipo",
        0.5,
    )
    assert config.notes == [] and config.data.packing is False
    assert config.output.output_dir == "saves/dpo-lora"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["stage=dpo", "pref_loss=dpp"],
            "pref_loss: 'dpp' is not one of: sigmoid, hinge, ipo, orpo, simpo",
        ),
        (["stage=dpo", "pref_beta=0"], "pref_beta: must be > 0"),
        (["stage=dpo", "dpo_label_smoothing=0.7"], "dpo_label_smoothing: must be <= 0.5"),
        (
            ["stage=dpo", "pref_loss=hinge", "dpo_label_smoothing=0.1"],
            "dpo_label_smoothing needs pref_loss: sigmoid (pref_loss is hinge)",
        ),
        (["stage=dpo", "pref_loss=simpo", "ref_model=/m"], "pref_loss: simpo uses no reference"),
        (["stage=dpo", "ref_model_adapters=/a"], "set ref_model too"),
        (["stage=dpo", "packing=true"], "packing: true does not apply to stage dpo"),
    ],
)
def test_bad_preference_configs_are_named(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


def test_preference_keys_on_another_stage_are_ignored_with_a_note():
    config = load_config(None, ["stage=sft", "pref_beta=0.2", "pref_loss=ipo"])
    assert config.notes == [
        "ignoring pref_beta, pref_loss: stage sft does not read them (they belong to dpo, kto)"
    ]


def test_stage_shorthands_orpo_and_simpo_mean_dpo_with_that_loss():
    for shorthand in ("orpo", "simpo"):
        method = load_config(None, [f"stage={shorthand}"]).method
        assert (method.stage, method.pref_loss) == ("dpo", shorthand)


# --- the losses against a plain torch reference ------------------------------------------------


def _reference_logps(model, rows, side, *, average):
    """Plain torch: each sequence alone, full logits, log_softmax, gather, sum over the reply."""
    out = []
    for row in rows:
        ids = torch.tensor([row[f"{side}_input_ids"]])
        labels = torch.tensor(row[f"{side}_labels"])
        logits = model(input_ids=ids).logits[0, :-1].float()
        token_logps = logits.log_softmax(-1).gather(1, ids[0, 1:, None]).squeeze(1)
        reply = labels[1:] != IGNORE_INDEX
        total = token_logps[reply].sum()
        out.append(total / reply.sum() if average else total)
    return torch.stack(out)


def _reference_loss(method, pc, pr, rc, rr, chosen_avg_nll):
    beta, kind = method.pref_beta, method.pref_loss
    if kind in ("orpo", "simpo"):
        if kind == "orpo":  # LLaMA-Factory's odds_ratio_loss
            odds = (pc - pr) - (torch.log(1 - pc.exp()) - torch.log(1 - pr.exp()))
            losses = -pc + beta * -F.logsigmoid(odds)
        else:  # LLaMA-Factory's simpo_loss: gamma/beta ratio inside beta * (...)
            losses = -F.logsigmoid(beta * (pc - pr) - method.simpo_gamma)
        rewards = beta * pc, beta * pr
    else:
        m = (pc - rc) - (pr - rr)
        ls = method.dpo_label_smoothing
        losses = {
            "sigmoid": -(1 - ls) * F.logsigmoid(beta * m) - ls * F.logsigmoid(-beta * m),
            "hinge": torch.relu(1 - beta * m),
            "ipo": (m - 1 / (2 * beta)) ** 2,
        }[kind]
        rewards = beta * (pc - rc), beta * (pr - rr)
    losses = losses + method.pref_ftx * chosen_avg_nll
    return losses.mean(), rewards


LOSS_CASES = [
    ("sigmoid", ["dpo_label_smoothing=0.1"]),
    ("sigmoid", ["pref_ftx=0.5"]),
    ("hinge", []),
    ("ipo", ["pref_beta=0.5"]),
    ("simpo", ["simpo_gamma=0.3", "pref_beta=2.0"]),
    ("orpo", ["pref_ftx=0.25"]),
]


@pytest.mark.parametrize("method_name", ["lora", "full"])
@pytest.mark.parametrize(("pref_loss", "extra"), LOSS_CASES, ids=lambda c: str(c))
def test_loss_and_rewards_equal_a_plain_torch_reference(
    tiny_llama_dir, smol_tokenizer, method_name, pref_loss, extra
):
    from corral.model.adapters import apply_method
    from corral.model.load import load_model
    from corral.train.dpo import AVERAGED_LOSSES, make_loss

    config = load_config(
        None,
        [
            f"model_name_or_path={tiny_llama_dir}",
            "stage=dpo",
            f"finetuning_type={method_name}",
            f"pref_loss={pref_loss}",
            "device=cpu",
            *extra,
        ],
    )
    model, _ = load_model(config.model, for_training=True)
    reference_model, _ = load_model(ModelConfig(model_name_or_path=str(tiny_llama_dir)))
    loss_fn = make_loss(config, model)
    torch.manual_seed(1)
    model = apply_method(model, config.method)
    with torch.no_grad():  # move the policy away from the reference (LoRA B starts at zero)
        for name, param in model.named_parameters():
            if param.requires_grad and ("lora_B" in name or method_name == "full"):
                param.add_(torch.randn_like(param) * 0.05)
    model.eval()
    records = [
        _record("What is ice?", "Ice is frozen water.", "No idea."),
        _record("Name a fruit, please.", "An apple.", "I won't answer that, sorry."),
        _record("Hi", "Hello! How can I help you today?", "Bye."),
    ]
    rows, _ = _pairs(records, smol_tokenizer)
    rows = rows.to_list()
    batch = PairCollator(smol_tokenizer.pad_token_id)(rows)
    batch.pop("num_real_tokens")
    with torch.no_grad():
        loss, metrics = loss_fn(model, batch)

        average = pref_loss in AVERAGED_LOSSES
        pc, pr = (_reference_logps(model, rows, s, average=average) for s in ("chosen", "rejected"))
        rc, rr = (
            _reference_logps(reference_model, rows, s, average=average)
            for s in ("chosen", "rejected")
        )
        chosen_avg = pc if average else pc / torch.tensor([_reply_len(r) for r in rows])
        expected, (chosen_rewards, rejected_rewards) = _reference_loss(
            config.method, pc, pr, rc, rr, -chosen_avg
        )
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    assert metrics["rewards/chosen"] == pytest.approx(chosen_rewards.mean().item(), abs=1e-5)
    assert metrics["rewards/rejected"] == pytest.approx(rejected_rewards.mean().item(), abs=1e-5)
    margins = (chosen_rewards - rejected_rewards).mean().item()
    assert metrics["rewards/margins"] == pytest.approx(margins, abs=1e-5)
    accuracy = (chosen_rewards > rejected_rewards).float().mean().item()
    assert metrics["rewards/accuracies"] == pytest.approx(accuracy)
    assert metrics["logps/chosen"] == pytest.approx(pc.mean().item(), abs=1e-5)
    assert metrics["logps/rejected"] == pytest.approx(pr.mean().item(), abs=1e-5)
    assert abs(margins) > 1e-4  # the policy really differs from the reference


def _reply_len(row) -> int:
    return sum(label != IGNORE_INDEX for label in row["chosen_labels"][1:])


# --- the losses against TRL 1.16's own -----------------------------------------------------------


def _perturbed_full_policy(tiny_llama_dir, pref_loss, extra):
    """(config, corral's loss hook, policy): a full model moved away from its frozen copy."""
    from corral.model.adapters import apply_method
    from corral.model.load import load_model
    from corral.train.dpo import make_loss

    config = load_config(
        None,
        [f"model_name_or_path={tiny_llama_dir}", "stage=dpo", "finetuning_type=full"]
        + [f"pref_loss={pref_loss}", "device=cpu", *extra],
    )
    model, _ = load_model(config.model, for_training=True)
    loss_fn = make_loss(config, model)
    model = apply_method(model, config.method)
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return config, loss_fn, model.eval()


def _one_pair_batches(smol_tokenizer):
    records = [
        _record("What is ice?", "Ice is frozen water.", "No idea."),
        _record("Name a fruit, please.", "An apple.", "I won't answer that, sorry."),
        _record("Hi", "Hello! How can I help you today?", "Bye."),
    ]
    rows, _ = _pairs(records, smol_tokenizer)
    collate = PairCollator(smol_tokenizer.pad_token_id)
    for row in rows.to_list():
        batch = collate([row])
        batch.pop("num_real_tokens")
        yield row, batch


@pytest.mark.parametrize(
    ("pref_loss", "extra"), [("sigmoid", ["pref_beta=0.2"]), ("ipo", ["pref_beta=0.5"])]
)
def test_loss_and_rewards_equal_trls_dpo_trainer(
    tiny_llama_dir, smol_tokenizer, tmp_path, pref_loss, extra
):
    """TRL's DPOTrainer runs its own forward and loss on the same pair (TRL exposes no loss
    function apart from `_compute_loss`). Pairs go one at a time because TRL logs only batch
    means and, for ipo, its rewards from summed log-probs where corral's (LLaMA-Factory's) use
    per-token averages: a pair's TRL reward / its reply's token count is corral's."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from corral.train.trainer import _checkpointing_arguments

    config, loss_fn, policy = _perturbed_full_policy(tiny_llama_dir, pref_loss, extra)
    args = DPOConfig(
        output_dir=str(tmp_path),
        beta=config.method.pref_beta,
        loss_type=[pref_loss],
        bf16=False,
        use_cpu=True,
        report_to=[],
        **_checkpointing_arguments(False),
    )
    placeholder = Dataset.from_list([{"prompt": "Hi", "chosen": "Hello.", "rejected": "Bye."}])
    trl = DPOTrainer(
        model=policy,
        ref_model=loss_fn.reference.model,  # corral's frozen copy: the same reference
        args=args,
        train_dataset=placeholder,
        processing_class=smol_tokenizer,
    )
    for row, batch in _one_pair_batches(smol_tokenizer):
        with torch.no_grad():
            loss, metrics = loss_fn(policy, batch)
            ids, labels = batch["input_ids"], batch["labels"]
            lengths = [len(row["chosen_input_ids"]), len(row["rejected_input_ids"])]
            attention = (torch.arange(ids.shape[1])[None] < torch.tensor(lengths)[:, None]).long()
            inputs = {"input_ids": ids, "attention_mask": attention}
            trl_loss = trl._compute_loss(
                policy, {**inputs, "completion_mask": (labels != -100).long()}, False
            )
        logged = {k: v[-1] for k, v in trl._metrics["eval"].items()}
        tokens = (labels[:, 1:] != -100).sum(1).tolist() if pref_loss == "ipo" else [1, 1]
        assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-5)
        assert metrics["rewards/chosen"] == pytest.approx(
            logged["rewards/chosen"] / tokens[0], abs=1e-5
        )
        assert metrics["rewards/rejected"] == pytest.approx(
            logged["rewards/rejected"] / tokens[1], abs=1e-5
        )
        # on corral's per-token rewards for ipo: a longer reply's summed reward may rank otherwise
        chosen, rejected = (
            logged["rewards/chosen"] / tokens[0],
            logged["rewards/rejected"] / tokens[1],
        )
        assert metrics["rewards/accuracies"] == float(chosen > rejected)
        assert (
            abs(metrics["rewards/margins"]) > 1e-3
        )  # the policy really differs from the reference


def test_simpo_loss_and_rewards_equal_trls_cpo_loss(tiny_llama_dir, smol_tokenizer):
    """TRL's CPOTrainer.cpo_loss (loss_type simpo) on corral's per-token average log-probs.
    Both write gamma as LLaMA-Factory does, logits = (pi_c - pi_r) - simpo_gamma / beta, so
    simpo_gamma passes to TRL unchanged."""
    from types import SimpleNamespace

    from trl.experimental.cpo import CPOTrainer

    from corral.train.preference import pair_logps

    config, loss_fn, policy = _perturbed_full_policy(
        tiny_llama_dir, "simpo", ["pref_beta=2.0", "simpo_gamma=0.3"]
    )
    method = config.method
    trl_self = SimpleNamespace(  # the attributes cpo_loss reads, as CPOConfig would set them
        alpha=0.0,
        beta=method.pref_beta,
        simpo_gamma=method.simpo_gamma,
        loss_type="simpo",
        label_smoothing=0.0,
        accelerator=SimpleNamespace(device=torch.device("cpu")),
    )
    for _, batch in _one_pair_batches(smol_tokenizer):
        with torch.no_grad():
            loss, metrics = loss_fn(policy, batch)
            logps = pair_logps(policy, batch, average=True)
            losses, chosen, rejected = CPOTrainer.cpo_loss(trl_self, logps.chosen, logps.rejected)
        assert loss.item() == pytest.approx(losses.mean().item(), abs=1e-5)
        assert metrics["rewards/chosen"] == pytest.approx(chosen.mean().item(), abs=1e-5)
        assert metrics["rewards/rejected"] == pytest.approx(rejected.mean().item(), abs=1e-5)


def test_shared_prompt_forward_equals_the_padded_batch(tiny_llama_dir, smol_tokenizer):
    """pair_logps runs each pair's shared tokens once over a KV cache; its log-probs and the
    LoRA gradients equal one padded forward over all rows (replies that share their first
    words, and pairs of different lengths, included)."""
    from corral.train.preference import pair_logps, sequence_logps

    _, _, policy = _perturbed_full_policy(tiny_llama_dir, "sigmoid", ["finetuning_type=lora"])
    records = [
        _record("What is ice?", "Sure. Ice is frozen water.", "Sure! No idea."),
        _record("Name a fruit, please, any fruit at all.", "An apple.", "I won't, sorry."),
        _record("Hi", "Hello! How can I help you today?", "Bye."),
    ]
    rows, _ = _pairs(records, smol_tokenizer)
    batch = PairCollator(smol_tokenizer.pad_token_id)(rows.to_list())
    policy.train()

    def run(logps_of):
        policy.zero_grad()
        chosen, rejected = logps_of()
        (chosen.sum() - 2 * rejected.sum()).backward()
        grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
        return torch.cat([chosen, rejected]).detach(), grads

    def shared():
        pairs = pair_logps(policy, batch, average=False)
        return pairs.chosen, pairs.rejected

    def padded():
        logps, _ = sequence_logps(policy, batch["input_ids"], batch["labels"])
        return logps[:3], logps[3:]

    shared_logps, shared_grads = run(shared)
    padded_logps, padded_grads = run(padded)
    torch.testing.assert_close(shared_logps, padded_logps, rtol=1e-5, atol=1e-4)
    assert shared_grads.keys() == padded_grads.keys() and len(shared_grads) > 0
    for name, grad in padded_grads.items():  # float rounding, relative to the largest entry
        scale = float(grad.abs().max())
        torch.testing.assert_close(shared_grads[name], grad, rtol=1e-3, atol=1e-4 * scale)


def test_which_reference_is_loaded(tiny_llama_dir):
    from corral.model.load import load_model
    from corral.train.dpo import make_loss

    for pref_loss, expected in (("simpo", None), ("orpo", None)):
        config = load_config(
            None,
            [f"model_name_or_path={tiny_llama_dir}", "stage=dpo", "finetuning_type=full"]
            + [f"pref_loss={pref_loss}", "device=cpu"],
        )
        model, _ = load_model(config.model, for_training=True)
        assert make_loss(config, model).reference is expected
    config = config.replace(pref_loss="sigmoid")
    reference = make_loss(config, model).reference
    assert reference.model is not model and not any(
        p.requires_grad for p in reference.model.parameters()
    )
    lora = config.replace(finetuning_type="lora")
    assert make_loss(lora, model).reference.model is None  # the adapter is switched off instead
    separate = lora.replace(ref_model=str(tiny_llama_dir))
    reference = make_loss(separate, model).reference.model
    assert reference is not model and not reference.training
    assert not any(p.requires_grad for p in reference.parameters())


# --- training runs ------------------------------------------------------------------------------


def _dpo_config(tiny_llama_dir, folder, topics, *extra: str):
    (folder / "pairs.json").write_text(json.dumps([_pair(t) for t in topics]))
    _register(folder, "pairs", "pairs.json")
    return load_config(
        None,
        [
            f"model_name_or_path={tiny_llama_dir}",
            "dataset=pairs",
            f"dataset_dir={folder}",
            f"output_dir={folder / 'out'}",
            "stage=dpo",
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


def test_gradient_accumulation_matches_one_large_batch(tiny_llama_dir, tmp_path):
    from safetensors.torch import load_file

    from corral.train.workflow import run_training

    weights = []
    for batch, accumulation in ((8, 1), (2, 4)):
        folder = tmp_path / f"b{batch}"
        folder.mkdir()
        config = _dpo_config(
            tiny_llama_dir,
            folder,
            TOPICS[:8],
            "finetuning_type=full",
            "optim=sgd",
            "learning_rate=1.0",
            "max_grad_norm=0",
            "max_steps=1",
            f"per_device_train_batch_size={batch}",
            f"gradient_accumulation_steps={accumulation}",
        )
        run_training(config)
        weights.append(load_file(folder / "out" / "model.safetensors"))
        weights[-1]["loss"] = torch.tensor(_logs(folder / "out")[0]["loss"])
    # One SGD step with lr 1 moves every weight by exactly its gradient.
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], rtol=1e-5, atol=1e-6)


def test_full_dpo_keeps_its_reference_frozen_and_logs_validation_rewards(tiny_llama_dir, tmp_path):
    from corral.train.workflow import run_training

    run_training(
        _dpo_config(
            tiny_llama_dir,
            tmp_path,
            TOPICS,
            "finetuning_type=full",
            "learning_rate=1e-3",
            "max_steps=4",
            "val_size=4",
            "eval_steps=2",
        )
    )
    logs = _logs(tmp_path / "out")
    losses = [entry["loss"] for entry in logs if "loss" in entry]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 1
    # a reference that trained along would keep every margin at 0 and the loss at log 2
    assert losses[-1] < math.log(2) - 0.01, losses
    evals = [entry for entry in logs if "eval_loss" in entry]
    assert [entry["step"] for entry in evals] == [2, 4]
    assert all(
        {"eval_rewards/accuracies", "eval_rewards/margins", "eval_logps/chosen"} <= set(entry)
        for entry in evals
    )
    assert evals[-1]["eval_rewards/margins"] > 0


def _accuracy(policy, reference, rows, *, average=False) -> tuple[float, float]:
    """Held-out preference accuracy and mean margin of the implicit reward: the log-prob ratio
    to `reference` (summed), or with no reference the per-token average log-prob (orpo, simpo)."""
    with torch.no_grad():
        pc, pr = (
            _reference_logps(policy, rows, s, average=average) for s in ("chosen", "rejected")
        )
        rc, rr = (
            (_reference_logps(reference, rows, s, average=average) for s in ("chosen", "rejected"))
            if reference is not None
            else (0.0, 0.0)
        )
    margins = (pc - rc) - (pr - rr)
    return (margins > 0).float().mean().item(), margins.mean().item()


# (pref_loss, settings): DPO as LLaMA-Factory's defaults; ORPO and SimPO reference-free, SimPO
# with the paper's beta 2 (its implicit reward is beta x the per-token average log-prob).
LEARNING_CASES = [
    ("sigmoid", []),
    ("orpo", ["pref_beta=0.1"]),
    ("simpo", ["pref_beta=2.0", "simpo_gamma=0.5"]),
]


@pytest.mark.parametrize(("pref_loss", "extra"), LEARNING_CASES, ids=[c[0] for c in LEARNING_CASES])
def test_lora_learns_a_held_out_preference(
    tiny_llama_dir, smol_tokenizer, tmp_path, pref_loss, extra
):
    from corral.model.artifacts import RUN_INFO
    from corral.model.load import load_model
    from corral.train.dpo import AVERAGED_LOSSES
    from corral.train.workflow import run_training

    train_topics, held_out = TOPICS[:16], TOPICS[16:]
    out = tmp_path / "out"
    metrics = run_training(
        _dpo_config(
            tiny_llama_dir,
            tmp_path,
            train_topics,
            "finetuning_type=lora",
            "learning_rate=1e-2",
            "max_steps=20",
            f"pref_loss={pref_loss}",
            *extra,
        )
    )
    logs = _logs(out)
    losses = [entry["loss"] for entry in logs if "loss" in entry]
    reference_free = pref_loss in ("orpo", "simpo")
    margins = [entry["rewards/margins"] for entry in logs if "loss" in entry]
    assert losses[-1] < losses[0] and margins[-1] > margins[0] + 0.1, (losses, margins)
    if not reference_free:
        assert losses[0] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference: B is 0
        assert losses[-1] < 0.5 * losses[0], losses  # orpo's loss is mostly the SFT term
    assert all("rewards/accuracies" in entry for entry in logs if "loss" in entry)
    assert metrics["rewards/margins"] > 0 and metrics["real_tokens"] > 0

    run = json.loads((out / RUN_INFO).read_text())
    assert run["stage"] == "dpo" and run["finetuning_type"] == "lora"
    from safetensors.torch import load_file

    saved = load_file(out / "adapter_model.safetensors")
    assert saved and all("lora" in name for name in saved)  # frozen base weights not saved
    assert all(t.abs().sum() > 0 for name, t in saved.items() if "lora_B" in name)  # trained

    tuned, _ = load_model(ModelConfig(adapter_name_or_path=[str(out)], device="cpu"))
    base, _ = load_model(ModelConfig(model_name_or_path=str(tiny_llama_dir), device="cpu"))
    template = get_template("chatml", smol_tokenizer)
    held, _ = process_records(
        [
            Record(
                [{"role": "user", "content": row["conversations"][0]["value"]}],
                chosen={"role": "assistant", "content": row["chosen"]["value"]},
                rejected={"role": "assistant", "content": row["rejected"]["value"]},
            )
            for row in map(_pair, held_out)
        ],
        DataConfig(cutoff_len=64),
        smol_tokenizer,
        template,
        kind="preference",
    )
    average = pref_loss in AVERAGED_LOSSES
    reference = None if reference_free else base
    before, _ = _accuracy(base, reference, held.to_list(), average=average)
    after, margin = _accuracy(tuned, reference, held.to_list(), average=average)
    print(
        f"{pref_loss}: held-out preference accuracy {before:.2f} -> {after:.2f}, margin {margin:.3f}"
    )
    assert after >= 0.8 and after > before and margin > 0
    # LoRA changed only the linear layers it targets: embeddings, norms and head are the base's
    tuned_params = dict(tuned.named_parameters())
    untouched = [n for n in tuned_params if "proj" not in n]
    assert untouched and all(
        torch.equal(tuned_params[n], dict(base.named_parameters())[n]) for n in untouched
    )


def test_dpo_on_an_sft_adapter_keeps_the_sft_model_as_reference(tiny_llama_dir, tmp_path):
    """The README's chain: sft LoRA, then dpo continuing that adapter, with `ref_model` (the
    base) plus `ref_model_adapters` (the sft adapter) as the reference, which starts equal to
    the policy; without them the reference is the base with the adapter switched off."""
    from corral.train.workflow import run_training

    sft = tmp_path / "sft"
    sft.mkdir()
    rows = [{"instruction": f"Q: {t}", "output": f"Here is what I know about {t}."} for t in TOPICS]
    (sft / "chat.json").write_text(json.dumps(rows))
    (sft / "dataset_info.json").write_text(json.dumps({"chat": {"file_name": "chat.json"}}))
    run_training(
        load_config(
            None,
            [f"model_name_or_path={tiny_llama_dir}", "stage=sft", "finetuning_type=lora"]
            + ["dataset=chat", f"dataset_dir={sft}", f"output_dir={sft / 'out'}"]
            + ["template=chatml", "cutoff_len=64", "learning_rate=1e-2", "max_steps=6"]
            + ["per_device_train_batch_size=4", "save_steps=1000", "seed=0"],
        )
    )
    first_loss = {}
    for name, extra in (
        ("sft reference", [f"ref_model={tiny_llama_dir}", f"ref_model_adapters={sft / 'out'}"]),
        ("base reference", []),
    ):
        folder = tmp_path / name.replace(" ", "-")
        folder.mkdir()
        config = _dpo_config(
            tiny_llama_dir,
            folder,
            TOPICS[:8],
            "finetuning_type=lora",
            f"adapter_name_or_path={sft / 'out'}",
            "max_steps=1",
            *extra,
        )
        run_training(config)
        first_loss[name] = _logs(folder / "out")[0]
    assert first_loss["sft reference"]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert first_loss["sft reference"]["rewards/chosen"] == pytest.approx(0, abs=1e-5)
    # the sft adapter moved the policy away from the base, which is now the reference
    # the same policy (the sft adapter) in both runs; only the reference differs
    sides = ("logps/chosen", "logps/rejected")
    assert [first_loss["sft reference"][k] for k in sides] == pytest.approx(
        [first_loss["base reference"][k] for k in sides], rel=1e-5
    )
    # the sft adapter moved the policy away from the base, which is then the reference
    assert abs(first_loss["base reference"]["rewards/chosen"]) > 1e-2, first_loss
