"""stage: rm on tiny random Llamas: a reward model learns a held-out preference (LoRA, full,
freeze), its folder and export load with plain transformers and score as corral does,
`corral eval pref` scores reward models and dpo policies, and bad input is one clear error."""

from __future__ import annotations

import json
import math

import pytest
import torch

from corral.config import load_config
from corral.config.fields import DataConfig
from corral.data.processors import process_records
from corral.data.templates import get_template
from corral.utils.errors import ConfigError, DataError, ModelError

TOPICS = [
    "rivers", "volcanoes", "bread", "chess", "owls", "tides", "glass", "maps", "bees", "clocks",
    "snow", "ships", "paper", "bridges", "salt", "kites", "comets", "honey", "wolves", "ink",
    "deserts", "violins", "copper", "moss", "lanterns", "coral", "trains", "tea", "gardens",
    "rockets", "marbles", "caves",
]  # fmt: skip
HELPFUL = [
    "Sure. Here is what I know about {t}.",
    "Happy to help: {t} are a fascinating subject, so let me explain the basics.",
    "Good question about {t}; here is a short and clear overview.",
]
DISMISSIVE = ["I won't answer that.", "Not interested in {t}.", "Ask someone else, I don't care."]
TRAIN, HELD_OUT = TOPICS[:24], TOPICS[24:]


def _pair(index: int, topic: str) -> dict:
    """A helpful reply against a dismissive one, phrasings varying with the index."""
    return {
        "conversations": [{"from": "human", "value": f"Tell me about {topic}."}],
        "chosen": {"from": "gpt", "value": HELPFUL[index % 3].format(t=topic)},
        "rejected": {"from": "gpt", "value": DISMISSIVE[(index // 3) % 3].format(t=topic)},
    }


def _write_pairs(folder, name: str, topics, offset: int = 0) -> None:
    rows = [_pair(i + offset, t) for i, t in enumerate(topics)]
    (folder / f"{name}.json").write_text(json.dumps(rows))
    info_file = folder / "dataset_info.json"
    info = json.loads(info_file.read_text()) if info_file.exists() else {}
    columns = {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}
    info[name] = {
        "file_name": f"{name}.json",
        "formatting": "sharegpt",
        "ranking": True,
        "columns": columns,
    }
    info_file.write_text(json.dumps(info))


def _rm_config(tiny_llama_dir, folder, method: str, *extra: str):
    _write_pairs(folder, "pairs", TRAIN * 2)  # each topic twice, with other phrasings
    _write_pairs(folder, "heldout", HELD_OUT, offset=1)
    return load_config(
        None,
        [
            f"model_name_or_path={tiny_llama_dir}",
            "dataset=pairs",
            f"dataset_dir={folder}",
            f"output_dir={folder / method}",
            "stage=rm",
            f"finetuning_type={method}",
            "template=chatml",
            "cutoff_len=64",
            "per_device_train_batch_size=8",
            "lr_scheduler_type=constant",
            "logging_steps=1",
            "save_steps=1000",
            "seed=0",
            "device=cpu",
            *extra,
        ],
    )


def _logs(out) -> list[dict]:
    from corral.train import callbacks

    return [json.loads(line) for line in (out / callbacks.LOG_FILE).read_text().splitlines()]


def _held_out_rows(tokenizer, template_name: str = "chatml") -> list[dict]:
    from corral.data.records import Record

    records = [
        Record(
            [{"role": "user", "content": row["conversations"][0]["value"]}],
            chosen={"role": "assistant", "content": row["chosen"]["value"]},
            rejected={"role": "assistant", "content": row["rejected"]["value"]},
        )
        for row in (_pair(i + 1, t) for i, t in enumerate(HELD_OUT))
    ]
    template = get_template(template_name, tokenizer)
    rows, _ = process_records(
        records, DataConfig(cutoff_len=64), tokenizer, template, kind="preference"
    )
    return rows.to_list()


def _accuracy(reward, rows) -> float:
    chosen = reward.score([r["chosen_input_ids"] for r in rows])
    rejected = reward.score([r["rejected_input_ids"] for r in rows])
    return float((chosen > rejected).float().mean())


def _hf_scores(folder, sequences) -> torch.Tensor:
    """Plain transformers, no corral: the tokenizer pads, the model pools by its pad id."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id
    batch = tokenizer.pad({"input_ids": sequences}, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits[:, 0]


@pytest.fixture(scope="module")
def lora_rm(tiny_llama_dir, tmp_path_factory):
    """A LoRA reward model trained on 48 pairs (24 topics); returns (folder, run metrics)."""
    from corral.train.workflow import run_training

    folder = tmp_path_factory.mktemp("rm")
    config = _rm_config(
        tiny_llama_dir, folder, "lora", "learning_rate=1e-2", "max_steps=24", "val_size=8"
    )
    return folder / "lora", run_training(config)


# --- training ----------------------------------------------------------------------------------


def test_lora_rm_learns_a_held_out_preference(lora_rm, tiny_llama_dir, smol_tokenizer):
    from safetensors.torch import load_file

    from corral.model.reward import load_reward_model

    out, metrics = lora_rm
    logs = _logs(out)
    train_logs = [entry for entry in logs if "loss" in entry]
    assert train_logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # zero head: ties
    assert train_logs[0]["accuracy"] == 0.0  # a tie is not a win
    assert all({"accuracy", "margin", "scores/chosen"} <= set(entry) for entry in train_logs)
    assert train_logs[-1]["loss"] < 0.3, [e["loss"] for e in train_logs]
    evals = [entry for entry in logs if "eval_loss" in entry]
    assert evals and {"eval_accuracy", "eval_margin"} <= set(evals[-1])
    assert metrics["eval_accuracy"] == evals[-1]["eval_accuracy"] and metrics["margin"] > 0

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "score" in config["modules_to_save"]
    saved = load_file(out / "adapter_model.safetensors")
    head = [name for name in saved if "score" in name]
    assert head and all(saved[name].abs().sum() > 0 for name in head)  # trained, not zero
    assert not any("embed_tokens" in n or "norm" in n for n in saved)  # frozen base not saved

    reward = load_reward_model(str(out), device="cpu")
    base = load_reward_model(str(out), device="cpu")
    base.model.score.weight.data.zero_()
    rows = _held_out_rows(smol_tokenizer)
    accuracy = _accuracy(reward, rows)
    print(f"held-out pairwise accuracy {_accuracy(base, rows):.2f} -> {accuracy:.2f}")
    assert accuracy > 0.8


def test_every_method_trains_the_head_and_what_the_method_allows(
    tiny_llama_dir, smol_tokenizer, tmp_path
):
    from safetensors.torch import load_file

    from corral.model.reward import load_reward_model
    from corral.train.workflow import run_training

    initial = load_file(tiny_llama_dir / "model.safetensors")
    for method, extra in (
        ("full", ["learning_rate=1e-3"]),
        ("freeze", ["learning_rate=1e-2", "freeze_trainable_layers=1"]),
        ("lora", ["learning_rate=1e-2", "use_dora=true", "use_rslora=true"]),
    ):
        run_training(_rm_config(tiny_llama_dir, tmp_path, method, "max_steps=12", *extra))
        reward = load_reward_model(str(tmp_path / method))
        accuracy = _accuracy(reward, _held_out_rows(smol_tokenizer))
        print(f"{method} {' '.join(extra[1:])}: held-out accuracy {accuracy:.2f}")
        assert accuracy > 0.8
        if method == "lora":
            saved = load_file(tmp_path / method / "adapter_model.safetensors")
            assert any("lora_magnitude_vector" in n for n in saved)  # DoRA
            assert any("score" in n and saved[n].abs().sum() > 0 for n in saved)
            continue
        saved = load_file(tmp_path / method / "model.safetensors")
        assert saved["score.weight"].abs().sum() > 0 and "lm_head.weight" not in saved
        changed = {
            n for n in saved.keys() & initial.keys() if not torch.equal(initial[n], saved[n])
        }
        if method == "full":
            assert "model.embed_tokens.weight" in changed
        else:  # freeze: the last layer and the head, nothing else
            assert changed and all(n.startswith("model.layers.1.") for n in changed)


# --- the folder and its export load with plain transformers --------------------------------------


def test_rm_folder_and_export_score_as_corral_does(lora_rm, smol_tokenizer, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from corral.config.fields import ModelConfig
    from corral.export.export import export
    from corral.model.reward import load_reward_model

    out, _ = lora_rm
    rows = _held_out_rows(smol_tokenizer)[:4]
    sequences = [r["chosen_input_ids"] for r in rows] + [r["rejected_input_ids"] for r in rows]
    expected = load_reward_model(str(out), device="cpu").score(sequences)
    assert len({len(s) for s in sequences}) > 1  # padding is exercised

    exported = export(ModelConfig(adapter_name_or_path=[str(out)], device="cpu"), tmp_path / "m")
    torch.testing.assert_close(_hf_scores(exported, sequences), expected, atol=1e-5, rtol=0)
    # a conversation as the saved chat template renders it: the ids corral trained and scored
    from transformers import AutoTokenizer

    row = _pair(1, HELD_OUT[0])
    messages = [
        {"role": "user", "content": row["conversations"][0]["value"]},
        {"role": "assistant", "content": row["chosen"]["value"]},
    ]
    rendered = AutoTokenizer.from_pretrained(exported).apply_chat_template(
        messages, return_tensors="pt", return_dict=True
    )
    assert rendered["input_ids"][0].tolist() == sequences[0]
    card = (exported / "README.md").read_text()
    assert "AutoModelForSequenceClassification.from_pretrained" in card

    # the adapter folder itself: its base with a one-label head, then peft (no corral)
    config = json.loads((out / "adapter_config.json").read_text())
    base = AutoModelForSequenceClassification.from_pretrained(
        config["base_model_name_or_path"], num_labels=1, pad_token_id=smol_tokenizer.pad_token_id
    )
    model = PeftModel.from_pretrained(base, out).eval()
    batch = smol_tokenizer.pad({"input_ids": sequences}, return_tensors="pt")
    with torch.no_grad():
        scores = model(**batch).logits[:, 0]
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0)


def test_full_rm_folder_loads_with_transformers(tiny_llama_dir, smol_tokenizer, tmp_path):
    """alpaca ends a reply with eos, SmolLM2's pad token: training picks another pad token, so
    transformers' pooling (the rightmost token that is not padding) still finds the reply's end."""
    from transformers import AutoTokenizer

    from corral.model.reward import load_reward_model
    from corral.train.workflow import run_training

    config = _rm_config(tiny_llama_dir, tmp_path, "full", "max_steps=2", "learning_rate=1e-3")
    run_training(config.replace(template="alpaca"))
    rows = _held_out_rows(smol_tokenizer, "alpaca")[:3]
    assert rows[0]["chosen_input_ids"][-1] == smol_tokenizer.pad_token_id
    saved = AutoTokenizer.from_pretrained(tmp_path / "full")
    assert saved.pad_token_id not in (smol_tokenizer.pad_token_id, None)
    sequences = [r["chosen_input_ids"] for r in rows] + [r["rejected_input_ids"] for r in rows]
    expected = load_reward_model(str(tmp_path / "full")).score(sequences)
    assert expected.abs().max() > 0
    # eval pref of the whole folder (--model) scores the same numbers, with its recorded template
    result = _eval_pref(tmp_path, tmp_path, "--model", str(tmp_path / "full"))  # its template
    first = result["predictions"][0]
    assert [first["chosen_reward"], first["rejected_reward"]] == pytest.approx(
        [float(expected[0]), float(expected[3])], abs=1e-5
    )
    torch.testing.assert_close(
        _hf_scores(tmp_path / "full", sequences), expected, atol=1e-5, rtol=0
    )


# --- corral eval pref ---------------------------------------------------------------------------


def _eval_pref(tmp_path, folder, *flags: str) -> dict:
    from corral.cli import main

    save = tmp_path / "eval"
    code = main(
        [
            "eval", "pref", "--dataset", "heldout", "--dataset-dir", str(folder),
            "--output", str(save), "--cutoff-len", "64", "device=cpu", *flags,
        ]
    )  # fmt: skip
    assert code == 0
    metrics = json.loads((save / "metrics.json").read_text())
    predictions = [
        json.loads(line) for line in (save / "predictions.jsonl").read_text().splitlines()
    ]
    assert (save / "report.md").read_text().startswith("# Preference evaluation")
    return metrics | {"predictions": predictions}


def test_eval_pref_of_a_reward_model(lora_rm, smol_tokenizer, tmp_path):
    from corral.model.reward import load_reward_model

    out, _ = lora_rm
    result = _eval_pref(tmp_path, out.parent, "--adapter", str(out))
    metrics, predictions = result["metrics"], result["predictions"]
    reward = load_reward_model(str(out), device="cpu")
    rows = _held_out_rows(smol_tokenizer)
    chosen = reward.score([r["chosen_input_ids"] for r in rows])
    rejected = reward.score([r["rejected_input_ids"] for r in rows])
    assert metrics["pairs"] == len(HELD_OUT) == len(predictions)
    assert metrics["accuracy"] == pytest.approx(float((chosen > rejected).float().mean()))
    assert metrics["margin"] == pytest.approx(float((chosen - rejected).mean()), abs=1e-5)
    assert [p["chosen_reward"] for p in predictions] == pytest.approx(chosen.tolist(), abs=1e-5)
    assert result["about"]["scored_by"] == "reward model score"


def test_eval_pref_of_a_dpo_policy(tiny_llama_dir, smol_tokenizer, tmp_path):
    from corral.config.fields import ModelConfig
    from corral.model.load import load_model
    from corral.train.workflow import run_training

    config = _rm_config(tiny_llama_dir, tmp_path, "lora", "max_steps=6", "learning_rate=1e-2")
    run_training(config.replace(stage="dpo", output_dir=str(tmp_path / "dpo")))
    result = _eval_pref(tmp_path, tmp_path, "--adapter", str(tmp_path / "dpo"))
    metrics, predictions = result["metrics"], result["predictions"]

    # beta x (log pi - log ref), each sequence alone, full logits
    policy, _ = load_model(ModelConfig(adapter_name_or_path=[str(tmp_path / "dpo")], device="cpu"))
    reference, _ = load_model(ModelConfig(model_name_or_path=str(tiny_llama_dir), device="cpu"))
    rows = _held_out_rows(smol_tokenizer)

    def logp(model, row, side):
        ids, labels = torch.tensor([row[f"{side}_input_ids"]]), torch.tensor(row[f"{side}_labels"])
        with torch.no_grad():
            token = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
        picked = token.gather(1, ids[0, 1:, None])[:, 0]
        return float(picked[labels[1:] != -100].sum())

    margins = [
        0.1 * ((logp(policy, r, "chosen") - logp(reference, r, "chosen"))
               - (logp(policy, r, "rejected") - logp(reference, r, "rejected")))
        for r in rows
    ]  # fmt: skip
    assert [p["margin"] for p in predictions] == pytest.approx(margins, abs=1e-4)
    assert metrics["accuracy"] == pytest.approx(sum(m > 0 for m in margins) / len(margins))
    assert metrics["accuracy"] > 0.5 and "ref = the model without" in result["about"]["scored_by"]


# --- bad input -----------------------------------------------------------------------------------


def test_a_folder_that_is_not_a_reward_model_is_one_clear_error(tiny_llama_dir, tmp_path):
    from corral.model.reward import load_reward_model

    with pytest.raises(
        ModelError,
        match=r"'.*tiny-llama.*' is not a reward model: its config.json describes LlamaForCausalLM.*stage: rm",
    ):
        load_reward_model(str(tiny_llama_dir))
    with pytest.raises(
        ModelError, match=r"'.*nowhere' is not a reward model: it does not exist.*stage: rm"
    ):
        load_reward_model(str(tmp_path / "nowhere"))


def test_ranking_data_missing_is_one_clear_error(tiny_llama_dir, tmp_path):
    from corral.train.workflow import run_training

    (tmp_path / "sft.json").write_text(
        json.dumps([{"instruction": "q", "input": "", "output": "a"}])
    )
    config = _rm_config(tiny_llama_dir, tmp_path, "lora", f"dataset={tmp_path / 'sft.json'}")
    with pytest.raises(DataError, match="holds conversation records.*preference"):
        run_training(config)
    from corral.eval.run import run_pref

    with pytest.raises(DataError, match="eval pref needs preference pairs.*holds conversation"):
        run_pref(config)


def test_rm_config_checks():
    assert load_config(None, ["stage=rm"]).output.output_dir == "saves/rm-lora"
    for overrides, message in (
        (["stage=rm", "packing=true"], "packing: true does not apply to stage rm"),
        (["stage=rm", "do_eval=true", "val_size=0.1"], "with stage rm set val_size"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config(None, overrides)


def test_chat_refuses_a_reward_model(lora_rm):
    from corral.config.fields import ModelConfig
    from corral.infer.engine import ChatEngine

    out, _ = lora_rm
    with pytest.raises(ModelError, match="is a reward model.*cannot generate.*corral eval pref"):
        ChatEngine(ModelConfig(adapter_name_or_path=[str(out)], device="cpu"))
