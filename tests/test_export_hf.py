"""`corral export` to a Hugging Face folder: merged logits equal base + adapter, the folder
reloads with plain transformers, describes itself, and bad inputs fail before anything is left."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from corral.cli import main
from corral.config.fields import ModelConfig
from corral.export import merge
from corral.export.export import export
from corral.utils.errors import ExportError, ModelError
from export_helpers import train_adapter


@pytest.fixture(scope="module")
def lora_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    return train_adapter(tiny_llama_dir, tmp_path_factory.mktemp("lora") / "run")


@pytest.fixture(scope="module")
def dora_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    return train_adapter(tiny_llama_dir, tmp_path_factory.mktemp("dora") / "run", "use_dora=true")


def _unmerged_logits(base_dir, adapter, ids):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter)
    with torch.no_grad():
        return model.eval()(ids).logits


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_exported_folder_equals_base_plus_adapter_without_corral(
    request, tiny_llama_dir, tmp_path, kind
):
    adapter = request.getfixturevalue(f"{kind}_dir")
    out = export(ModelConfig(adapter_name_or_path=[str(adapter)], device="cpu"), tmp_path / "m")
    files = {p.name for p in out.iterdir()}
    expected = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"}
    assert expected | {"tokenizer_config.json", "README.md", "corral_run.json"} <= files
    # A fresh interpreter with transformers only: corral is never imported.
    code = (
        "import sys, json, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()\n"
        f"t = AutoTokenizer.from_pretrained({str(out)!r})\n"
        "ids = t.apply_chat_template([{'role': 'user', 'content': 'What colour is the sky?'}],"
        " add_generation_prompt=True, return_tensors='pt', return_dict=True)['input_ids']\n"
        "with torch.no_grad(): logits = m(ids).logits\n"
        "assert not any(name.startswith('corral') for name in sys.modules)\n"
        "print(json.dumps({'ids': ids.tolist(), 'logits': logits.tolist()}))\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(run.stdout.strip().splitlines()[-1])
    ids = torch.tensor(result["ids"])
    expected_logits = _unmerged_logits(tiny_llama_dir, adapter, ids)
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)(ids).logits
    assert (expected_logits - plain).abs().max() > 1e-3, "the adapter does not change the model"
    assert (torch.tensor(result["logits"]) - expected_logits).abs().max() <= 1e-4


def test_model_card_and_run_info_describe_the_export(lora_dir, tiny_llama_dir, tmp_path):
    out = export(ModelConfig(adapter_name_or_path=[str(lora_dir)], device="cpu"), tmp_path / "m")
    card = (out / "README.md").read_text()
    assert str(tiny_llama_dir) in card and str(lora_dir) in card
    assert "qa.json" in card and "chatml" in card and "learning_rate: 0.01" in card
    info = json.loads((out / "corral_run.json").read_text())
    assert info["template"] == "chatml" and info["exported_from"]["adapters"] == [str(lora_dir)]
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>" and "<|im_start|>" in config["chat_template"]


def test_max_shard_size_splits_the_weights(lora_dir, tmp_path):
    out = export(
        ModelConfig(adapter_name_or_path=[str(lora_dir)], device="cpu"),
        tmp_path / "m",
        max_shard_size="5MB",
    )
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1, shards
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)


def test_adapter_of_another_base_names_both_models(lora_dir, tmp_path, smol_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other-base"
    config = LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=len(smol_tokenizer),
    )
    LlamaForCausalLM(config).save_pretrained(other)
    smol_tokenizer.save_pretrained(other)
    with pytest.raises(ModelError) as err:
        export(
            ModelConfig(model_name_or_path=str(other), adapter_name_or_path=[str(lora_dir)]),
            tmp_path / "out",
        )
    message = str(err.value)
    assert "other-base" in message and "tiny-llama" in message and "size mismatch" in message
    assert not (tmp_path / "out").exists()


def test_failed_merge_check_stops_the_export(lora_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(merge, "MERGE_TOLERANCE", -1.0)  # any difference at all now fails
    with pytest.raises(ExportError, match="changed the model's logits"):
        export(ModelConfig(adapter_name_or_path=[str(lora_dir)], device="cpu"), tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused_and_partial_output_removed(
    lora_dir, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code = main(["export", "--adapter", str(lora_dir), "--output", str(out)])
    assert code == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"

    from corral.export import hf_folder

    def fail_halfway(merged, folder, **kwargs):
        (folder / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(hf_folder, "write_hf_folder", fail_halfway)
    with pytest.raises(RuntimeError, match="disk full"):
        export(ModelConfig(adapter_name_or_path=[str(lora_dir)]), out, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp folder left
    assert (out / "keep.txt").read_text() == "mine"  # the old output survives a failure


def test_llamafactory_export_yaml_runs_with_corral_export(lora_dir, tmp_path, capsys, caplog):
    """LLaMA-Factory's merge YAML (export_dir, export_size, export_device) drives `corral
    export`; its harmless keys are listed in the one warning, a refused one is an error."""
    out = tmp_path / "merged"
    yaml_file = tmp_path / "merge_lora.yaml"
    yaml_file.write_text(
        f"adapter_name_or_path: {lora_dir}\nfinetuning_type: lora\nexport_dir: {out}\n"
        "export_size: 1\nexport_device: cpu\nexport_legacy_format: false\n"
        "export_hub_model_id: me/model\n"
    )
    assert main(["export", str(yaml_file)]) == 0
    assert (out / "model.safetensors").exists() and (out / "config.json").exists()
    warned = caplog.text
    assert "ignoring keys that do not change what corral trains or writes:" in warned
    assert "export_hub_model_id" in warned
    yaml_file.write_text(yaml_file.read_text() + "export_quantization_bit: 4\n")
    assert main(["export", str(yaml_file), "--overwrite"]) == 1
    assert "export_quantization_bit: 4 would change what is trained or produced" in (
        capsys.readouterr().err
    )
    assert main(["export", f"adapter_name_or_path={lora_dir}"]) == 1
    assert "corral export needs --output (or export_dir in the config)" in capsys.readouterr().err
