"""The config: YAML + key=value overrides, strict keys, types, ranges, cross-field checks."""

from __future__ import annotations

import pytest

from corral.config import build_config, load_config
from corral.config.cli_args import split_config_args
from corral.config.fields import all_fields
from corral.utils.errors import ConfigError

LLAMAFACTORY_YAML = """\
### model
model_name_or_path: meta-llama/Meta-Llama-3-8B-Instruct
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all

### dataset
dataset: identity,alpaca_en_demo
template: llama3
cutoff_len: 2048
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16
dataloader_num_workers: 4

### output
output_dir: saves/llama3-8b/lora/sft
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
resume_from_checkpoint: null
"""


def test_llamafactory_yaml_runs_unchanged(tmp_path):
    path = tmp_path / "llama3_lora_sft.yaml"
    path.write_text(LLAMAFACTORY_YAML)
    config = load_config(path)
    assert config.model.model_name_or_path == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert config.data.dataset == ["identity", "alpaca_en_demo"]
    assert config.method.lora_target == ["all"]
    assert config.train.learning_rate == 1e-4
    assert config.train.gradient_accumulation_steps == 8
    assert config.output.report_to == ["none"]
    assert config.train.bf16 is True
    # Keys that cannot change the result give one warning that lists them all.
    assert config.notes == [
        "ignoring keys that do not change what corral trains or writes: ddp_timeout, do_train, "
        "save_only_model"
    ]


def test_overrides_win_over_yaml_and_flags_win_over_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lora_rank: 8\nlearning_rate: 1e-3\n")
    config = load_config(
        path, ["lora_rank=16", "learning_rate=5e-5"], {"lora_rank": 32, "seed": None}
    )
    assert config.method.lora_rank == 32
    assert config.train.learning_rate == 5e-5
    assert config.train.seed == 42  # None flags are "not given"


def test_string_values_are_coerced_to_field_types():
    config = load_config(
        None, ["packing=yes", "val_size=0.1", "max_steps=20", "lora_target=q_proj, v_proj"]
    )
    assert config.data.packing is True
    assert config.data.val_size == 0.1
    assert config.train.max_steps == 20
    assert config.method.lora_target == ["q_proj", "v_proj"]


def test_unknown_key_suggests_the_closest_name():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["lora_rnak=4"])
    assert "unknown key 'lora_rnak' (did you mean 'lora_rank'?)" in str(err.value)


def test_unknown_key_far_from_anything_has_no_suggestion():
    with pytest.raises(ConfigError, match=r"unknown key 'zzzz'$"):
        load_config(None, ["zzzz=1"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("cutoff_len=0", "cutoff_len: must be >= 1, got 0"),
        ("lora_dropout=1.5", "lora_dropout: must be < 1, got 1.5"),
        ("learning_rate=-1", "learning_rate: must be > 0, got -1"),
        ("bf16=maybe", "bf16: expected true or false, got 'maybe'"),
        ("lora_rank=eight", "lora_rank: expected an integer, got 'eight'"),
        ("lora_rank=2.5", "lora_rank: expected an integer, got 2.5"),
        (
            "finetuning_type=lorra",
            "finetuning_type: 'lorra' is not one of: full, freeze, lora, prefix, prompt (did you mean 'lora'?)",
        ),
        ("lr_scheduler_type=cosin", "'cosin' is not one of"),
        ("dataset=", None),
    ],
)
def test_each_invalid_value_is_named(override, message):
    if message is None:  # an empty optional value is simply "unset"
        assert load_config(None, [override]).data.dataset is None
        return
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_a_planned_stage_is_refused_by_name(monkeypatch):
    from corral.config import checks

    # the mechanism, whichever stages this version has built
    monkeypatch.setattr(checks, "IMPLEMENTED_STAGES", ("pt", "sft"))
    with pytest.raises(ConfigError, match="stage: 'dpo' is planned but not available"):
        load_config(None, ["stage=dpo"])


def test_all_problems_are_reported_together():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["cutoff_len=0", "lora_rank=x", "foo=1"])
    assert len(err.value.problems) == 3


def test_mutually_exclusive_and_cross_field_checks():
    with pytest.raises(ConfigError, match="bf16 and fp16 are mutually exclusive"):
        load_config(None, ["bf16=true", "fp16=true"])
    with pytest.raises(ConfigError, match="interleave_probs has 1 values for 2 datasets"):
        load_config(None, ["dataset=a,b", "mix_strategy=interleave_under", "interleave_probs=1.0"])
    with pytest.raises(ConfigError, match="val_size: 2.5 is neither"):
        load_config(None, ["val_size=2.5"])
    with pytest.raises(ConfigError, match="use_dora needs finetuning_type: lora"):
        load_config(None, ["use_dora=true", "finetuning_type=full"])
    with pytest.raises(ConfigError, match="additional_target needs finetuning_type: lora"):
        load_config(None, ["additional_target=embed_tokens", "finetuning_type=freeze"])


def test_derived_defaults():
    assert load_config(None, ["stage=pt"]).data.packing is True
    assert load_config(None, ["stage=sft"]).data.packing is False
    config = load_config(None, ["lora_rank=4"])
    assert config.method.lora_alpha == 8.0
    assert config.output.output_dir == "saves/sft-lora"
    assert load_config(None, ["resume_from_checkpoint=true"]).train.resume_from_checkpoint == "true"


def test_llamafactory_aliases_are_translated():
    config = load_config(None, ["disable_gradient_checkpointing=false", "do_sample=false"])
    assert config.train.gradient_checkpointing is True
    assert config.generation.temperature == 0.0


def test_yaml_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("stage: sft\nlora_rank: [1,\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+: not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "latin1.yaml").write_bytes("default_system: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.yaml: not UTF-8 text"):
        load_config(tmp_path / "latin1.yaml")


def test_override_text_that_is_not_yaml_is_kept_as_typed():
    config = load_config(None, ["default_system=Note: be brief: always", "dataset=[a"])
    assert config.model.default_system == "Note: be brief: always"
    assert config.data.dataset == ["[a"]
    with pytest.raises(ConfigError, match="lora_rank"):
        load_config(None, ["lora_rank=[1,"])


def test_saved_config_round_trips(tmp_path):
    config = load_config(None, ["lora_rank=4", "dataset=identity", "template=chatml"])
    config.save(tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again.to_dict() == config.to_dict()


def test_every_field_has_help_text():
    missing = [key for key, (_, f) in all_fields().items() if not f.metadata["help"]]
    assert missing == []


def test_config_args_split():
    assert split_config_args(["a.yaml", "x=1"]) == ("a.yaml", ["x=1"])
    with pytest.raises(ConfigError, match="neither a .yaml config file"):
        split_config_args(["oops"])


def test_replace_revalidates():
    config = build_config({"lora_rank": 4})
    assert config.replace(lora_rank=8).method.lora_rank == 8
    with pytest.raises(ConfigError):
        config.replace(lora_rank=0)


# --- LLaMA-Factory keys corral does not implement: harmless ones warn, the rest are errors ----


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("ref_model_quantization_bit=4", "quantised reference"),
        ("add_tokens=<a>,<b>", "special tokens only"),
        ("use_galore=true", "AdamW"),
        ("galore_rank=16", "AdamW"),
        ("adam_beta2=0.95", "AdamW"),
        ("label_smoothing_factor=0.1", "label smoothing"),
        ("load_best_model_at_end=true", "saves the last model"),
        ("dataloader_drop_last=true", "last partial batch"),
        ("num_beams=4", "greedily or by sampling"),
        ("export_quantization_bit=4", "GPTQ"),
        ("auto_find_batch_size=true", "per_device_train_batch_size"),
    ],
)
def test_keys_that_would_change_the_result_are_errors(override, named):
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    message = str(err.value)
    assert message.count("would change what is trained or produced") == 1
    assert f"  - {key}: " in message and named in message


def test_refused_keys_at_their_off_value_change_nothing_and_pass():
    config = load_config(
        None,
        [
            "ref_model_quantization_bit=",  # null in YAML
            "use_unsloth=false",
            "num_beams=1",
            "adam_beta1=0.9",
            "infer_backend=huggingface",
        ],
    )
    assert config.notes == [
        "ignoring keys that do not change what corral trains or writes: adam_beta1, "
        "infer_backend, num_beams, ref_model_quantization_bit, use_unsloth"
    ]


def test_every_refused_key_reaches_an_error_and_harmless_keys_only_warn():
    from corral.config.lf_keys import HARMLESS_KEYS, REFUSED_KEYS

    for key in REFUSED_KEYS:
        with pytest.raises(ConfigError, match=f"{key}: 'xyz' would change"):
            load_config(None, [f"{key}=xyz"])
    harmless = sorted(HARMLESS_KEYS)[:40]
    config = load_config(None, [f"{key}=x" for key in harmless if key != "do_train"])
    assert config.notes and all(key in config.notes[0] for key in harmless if key != "do_train")


def test_implemented_llamafactory_keys_map_onto_corral_settings():
    config = load_config(
        None,
        [
            "neat_packing=true",
            "enable_liger_kernel=true",
            "use_cpu=true",
            "create_new_adapter=true",
            "export_dir=out",
            "export_size=5",
            "loraplus_lr_ratio=16",
            "pissa_init=true",
            "pissa_iter=-1",
            "pissa_convert=true",
            "rope_scaling=yarn",
        ],
    )
    assert config.data.packing is True and config.train.fused_ops is True
    assert config.model.device == "cpu" and config.method.create_new_adapter is True
    assert (config.export.export_dir, config.export.export_size) == ("out", 5)
    assert config.method.loraplus_lr_ratio == 16 and config.method.loraplus_lr_embedding == 1e-6
    assert config.method.pissa_init is True and config.method.pissa_iter == -1
    assert config.model.rope_scaling == "yarn"
    assert config.notes == []
    # their LLaMA-Factory defaults leave corral's defaults alone
    defaults = load_config(None, ["neat_packing=false", "enable_liger_kernel=false"])
    assert defaults.data.packing is False and defaults.train.fused_ops is True


def test_an_unknown_training_argument_is_refused_by_default():
    with pytest.raises(ConfigError, match="TrainingArguments option corral does not pass"):
        load_config(None, ["liger_kernel_config=x"])


def test_tool_format_is_llama_factorys_key_and_names_what_is_built():
    """The template decides the format; the key may name it (checked against the template when
    the tokenizer is loaded) and glm4, which corral does not write, is an error naming the rest."""
    assert load_config(None, ["template=chatml", "tool_format=qwen"]).model.tool_format == "qwen"
    with pytest.raises(ConfigError, match="tool_format: 'glm4' is not one of: default, llama3"):
        load_config(None, ["tool_format=glm4"])
