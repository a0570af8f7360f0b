"""DeepSpeed ZeRO and FSDP: the `deepspeed`, `fsdp` and `fsdp_config` keys.

ZeRO-2, ZeRO-3 and ZeRO-3 with CPU offload run for real on 2 CPU processes (gloo), launched as a
user launches them (`torchrun -m corral train`): the per-step losses equal one process with the
same global batch, and the gathered save loads with corral's loader and gives the logits of the
single-process model. The Trainer's FSDP needs GPUs, so its translation into TrainingArguments
is checked here and CPU runs are refused.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from corral.config import load_config
from corral.config.fields import ModelConfig
from corral.model.load import load_model
from corral.train.trainer import _sharding_arguments, training_arguments
from corral.train.workflow import run_training
from corral.utils.errors import ConfigError, CorralError

ROOT = Path(__file__).resolve().parents[1]
DS_DIR = ROOT / "examples" / "deepspeed"
STEPS = 3


def _overrides(model: Path, data_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"model_name_or_path={model}",
        "dataset=alpaca_en_demo",
        f"dataset_dir={data_dir}",
        "max_samples=16",
        "cutoff_len=64",
        f"max_steps={STEPS}",
        "logging_steps=1",
        "save_steps=100",
        "stop_check_samples=0",
        "device=cpu",
        f"output_dir={out}",
        *extra,
    ]


def _losses(out: Path) -> list[float]:
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    return [entry["loss"] for entry in log if "loss" in entry]


def _logits(model_config: ModelConfig) -> torch.Tensor:
    model, tokenizer = load_model(model_config)
    ids = tokenizer("The quick brown fox jumps over the lazy dog", return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits


def _load_config(folder: Path, base: Path, finetuning_type: str) -> ModelConfig:
    if finetuning_type == "lora":
        return ModelConfig(
            model_name_or_path=str(base), adapter_name_or_path=[str(folder)], device="cpu"
        )
    return ModelConfig(model_name_or_path=str(folder), device="cpu")


# LoRA runs use LoRA+ too: its parameter groups must reach DeepSpeed's optimizer.
METHODS = {
    "lora": ["finetuning_type=lora", "loraplus_lr_ratio=16"],
    "full": ["finetuning_type=full"],
}


@pytest.fixture(scope="module")
def single_process(tiny_llama_dir, demo_dir, tmp_path_factory) -> dict[str, Path]:
    """One process, batch 4: the global batch of 2 processes x batch 2 (also fills the
    tokenised-dataset cache the ranks then read)."""
    runs = {}
    for method, extra in METHODS.items():
        out = tmp_path_factory.mktemp(f"single-{method}")
        overrides = _overrides(
            tiny_llama_dir, demo_dir, out, *extra, "per_device_train_batch_size=4"
        )
        run_training(load_config(None, overrides + ["overwrite_output_dir=true"]))
        runs[method] = out
    return runs


@pytest.mark.slow
@pytest.mark.parametrize(
    ("ds_config", "method"),
    [
        ("ds_z2_config.json", "lora"),
        ("ds_z3_config.json", "lora"),
        ("ds_z3_offload_config.json", "full"),
    ],
)
def test_zero_on_two_processes_equals_one_process(
    ds_config, method, single_process, tiny_llama_dir, demo_dir, tmp_path
):
    out = tmp_path / "out"
    overrides = _overrides(
        tiny_llama_dir,
        demo_dir,
        out,
        *METHODS[method],
        "per_device_train_batch_size=2",
        f"deepspeed={DS_DIR / ds_config}",
    )
    if "z3" in ds_config:
        overrides.append("fused_ops=false")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    run = subprocess.run(
        [*launch, "-m", "corral", "train", *overrides],
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    reference = single_process[method]
    assert len(_losses(out)) == STEPS
    assert _losses(out) == pytest.approx(_losses(reference), abs=1e-4)
    # the save gathered every shard into a normal folder (adapter) that corral loads
    saved = _logits(_load_config(out, tiny_llama_dir, method))
    expected = _logits(_load_config(reference, tiny_llama_dir, method))
    untrained = _logits(ModelConfig(model_name_or_path=str(tiny_llama_dir), device="cpu"))
    assert (expected - untrained).abs().max() > 1e-3  # training moved the logits
    torch.testing.assert_close(saved, expected, atol=1e-4, rtol=0)


# --- the config keys, checked before anything loads ------------------------------------------


def _ds_file(tmp_path: Path, **changes) -> Path:
    """The shipped ZeRO-2 config with `changes` merged in (None removes a key)."""
    config = json.loads((DS_DIR / "ds_z2_config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    return path


def _problems(*overrides: str) -> list[str]:
    with pytest.raises(ConfigError) as err:
        load_config(None, list(overrides))
    return err.value.problems


def test_deepspeed_file_that_does_not_exist(tmp_path):
    missing = tmp_path / "nope.json"
    assert _problems(f"deepspeed={missing}") == [
        f"deepspeed: config file '{missing}' does not exist"
    ]


def test_deepspeed_file_that_is_not_json(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text('{"zero_optimization": {"stage": 2,}}')
    (problem,) = _problems(f"deepspeed={bad}")
    assert problem.startswith(f"deepspeed: '{bad}' is not valid JSON: ") and "line 1" in problem


@pytest.mark.parametrize(
    ("changes", "overrides", "named"),
    [
        (
            {"train_micro_batch_size_per_gpu": 8},
            ["per_device_train_batch_size=2"],
            "sets train_micro_batch_size_per_gpu: 8 but per_device_train_batch_size is 2",
        ),
        (
            {"gradient_accumulation_steps": 4},
            [],
            "sets gradient_accumulation_steps: 4 but gradient_accumulation_steps is 1",
        ),
        ({"gradient_clipping": 0.5}, [], "sets gradient_clipping: 0.5 but max_grad_norm is 1.0"),
        ({"train_batch_size": 64}, [], 'sets train_batch_size: 64; set it to "auto"'),
        ({"bf16": {"enabled": True}}, [], "sets bf16.enabled: true but bf16 is false"),
        ({"fp16": {"enabled": False}}, ["fp16=true"], "sets fp16.enabled: false but fp16 is true"),
        ({"scheduler": {"type": "WarmupLR"}}, [], "has a scheduler block"),
        (
            {"optimizer": {"type": "AdamW", "params": {"lr": 3e-5}}},
            [],
            "optimizer block must be type AdamW with every param \"auto\" (got type 'AdamW', "
            "fixed lr)",
        ),
        (
            {"optimizer": {"type": "AdamW", "params": {"lr": "auto"}}},
            ["loraplus_lr_ratio=16"],
            "LoRA+ (loraplus_lr_ratio) needs its own groups",
        ),
        (
            {"zero_optimization": {"stage": 3}},
            [],
            "is ZeRO-3 without stage3_gather_16bit_weights_on_model_save: true",
        ),
        (
            {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
            [],
            "offloads the optimizer to the CPU, which needs DeepSpeed's CPU Adam",
        ),
    ],
)
def test_zero_config_that_conflicts_with_the_training_keys(tmp_path, changes, overrides, named):
    path = _ds_file(tmp_path, **changes)
    (problem,) = _problems(f"deepspeed={path}", *overrides)
    assert problem.startswith(f"deepspeed: '{path}' ") and named in problem


def test_deepspeed_with_fsdp_or_another_stage_is_refused(tmp_path):
    path = DS_DIR / "ds_z2_config.json"
    assert _problems(f"deepspeed={path}", "fsdp=full_shard") == [
        "deepspeed and fsdp are two ways to shard one model: set only one of them"
    ]
    assert _problems(f"deepspeed={path}", "stage=dpo") == [
        "deepspeed is available for stages pt, sft, not dpo; remove deepspeed (multi-process "
        "DDP still works)"
    ]
    assert _problems("fsdp_config={}") == [
        "fsdp_config needs fsdp (e.g. fsdp: full_shard auto_wrap)"
    ]
    z3 = f"deepspeed={DS_DIR / 'ds_z3_config.json'}"
    assert _problems(z3, "do_eval=true", "val_size=0.1", "output_dir=saves/z3") == [
        "do_eval with ZeRO-3: the weights are sharded across the processes; evaluate the saved "
        "model afterwards (corral eval ppl --model/--adapter saves/z3) instead"
    ]
    pissa = _problems(z3, "pissa_init=true")
    assert pissa == [
        "pissa_init with ZeRO-3: converting the adapter needs the whole base weights, which "
        "ZeRO-3 shards; use a ZeRO-2 config or remove pissa_init"
    ]


def test_zero3_turns_fused_ops_and_the_stop_check_off_and_says_so():
    config = load_config(None, [f"deepspeed={DS_DIR / 'ds_z3_config.json'}"])
    assert config.train.fused_ops is False
    assert config.train.stop_check_samples == 0
    assert [note.split(" (")[0] for note in config.notes] == [
        "fused_ops: off under ZeRO-3",
        "stop_check_samples: 0 under ZeRO-3",
    ]
    config = load_config(None, [f"deepspeed={DS_DIR / 'ds_z2_config.json'}"])
    assert config.train.fused_ops is True and config.notes == []


@pytest.mark.parametrize("path", sorted(DS_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_deepspeed_examples_are_valid_and_fully_supported(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the examples name their DeepSpeed file from the repository root
    config = load_config(path)
    assert config.notes == []
    assert Path(config.train.deepspeed).is_file()


def test_deepspeed_reaches_the_trainer_under_a_launcher(tmp_path, monkeypatch):
    """The config file is handed to the Trainer as it is; its "auto" values are the Trainer's
    to fill from corral's keys."""
    path = DS_DIR / "ds_z3_config.json"
    config = load_config(None, [f"deepspeed={path}", f"output_dir={tmp_path}", "device=cpu"])
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(CorralError, match="needs a launcher, even for one process: torchrun"):
        _sharding_arguments(config, on_cpu=True)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert _sharding_arguments(config, on_cpu=True) == {"deepspeed": str(path)}


# --- FSDP: GPUs only; the translation is checked here ----------------------------------------


def test_fsdp_on_cpu_is_one_clear_error(tmp_path):
    config = load_config(
        None, ["fsdp=full_shard auto_wrap", f"output_dir={tmp_path}", "device=cpu"]
    )
    with pytest.raises(CorralError, match="fsdp: 'full_shard auto_wrap' needs GPUs: the Trainer"):
        training_arguments(config, has_eval=False)


def test_fsdp_keys_become_the_trainers_fsdp_settings(tmp_path, monkeypatch):
    import corral.train.trainer as trainer_module

    # as on a GPU machine: TrainingArguments only records the settings until training starts
    monkeypatch.setattr(trainer_module, "pick_device", lambda _: torch.device("cuda"))
    fsdp_file = tmp_path / "fsdp.json"
    fsdp_file.write_text(json.dumps({"transformer_layer_cls_to_wrap": "LlamaDecoderLayer"}))
    config = load_config(
        None,
        [
            "fsdp=full_shard offload auto_wrap",
            f"fsdp_config={fsdp_file}",
            f"output_dir={tmp_path}",
        ],
    )
    args = training_arguments(config, has_eval=False)
    assert args.fsdp is True and args.deepspeed is None
    plugin = args.fsdp_plugin_args
    assert plugin["fsdp_version"] == 2 and plugin["cpu_offload"] is True
    assert plugin["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert plugin["transformer_cls_names_to_wrap"] == "LlamaDecoderLayer"
    assert plugin["state_dict_type"] == "FULL_STATE_DICT"  # the final save is one folder
    assert config.train.fused_ops is False
    assert _problems("fsdp=full_shard", "pissa_init=true") == [
        "pissa_init with FSDP: converting the adapter needs the whole base weights, which FSDP "
        "shards; remove fsdp or pissa_init"
    ]


def test_fsdp_config_as_a_mapping_in_yaml(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(
        "fsdp: full_shard auto_wrap\nfsdp_config:\n  transformer_layer_cls_to_wrap: "
        "LlamaDecoderLayer\n  version: 2\n"
    )
    config = load_config(yaml_file)
    assert config.train.fsdp_config == {
        "transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
        "version": 2,
    }
