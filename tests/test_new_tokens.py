"""new_special_tokens and resize_vocab: tokens added as special tokens, embedding rows grown
from the tokens' pieces and trained, and the trained folder loading back with them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from corral.config import load_config
from corral.config.fields import MethodConfig, ModelConfig
from corral.config.parse import build_config
from corral.model.adapters import apply_method
from corral.model.load import load_model
from corral.utils.errors import ConfigError, ModelError
from llama_cpp_child import llama_cpp_call

THINK = ["<think>", "</think>"]


@pytest.fixture(scope="module")
def think_file(tmp_path_factory):
    """Replies that reason between <think> and </think> (and never say 'zebra')."""
    rows = [
        {"instruction": f"What is {i} plus {i}?", "output": f"<think>{i} and {i}</think>{2 * i}"}
        for i in range(16)
    ]
    path = tmp_path_factory.mktemp("think") / "think.json"
    path.write_text(json.dumps(rows))
    return path


def _corral(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "corral", *args], capture_output=True, text=True, timeout=300
    )


def _start_rows(base_dir, token: str) -> torch.Tensor:
    """A new token's starting row: the mean of the base rows of the pieces it spells."""
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    embed = load_file(base_dir / "model.safetensors")["model.embed_tokens.weight"]
    return embed[tokenizer.encode(token, add_special_tokens=False)].mean(0)


@pytest.mark.slow
def test_lora_trains_the_new_rows_and_the_output_exports_and_loads(
    tiny_llama_dir, think_file, tmp_path, capsys
):
    out, exported = tmp_path / "lora", tmp_path / "merged"
    train = _corral(
        "train",
        f"model_name_or_path={tiny_llama_dir}",
        f"dataset={think_file}",
        "template=chatml",
        "finetuning_type=lora",
        "new_special_tokens=<think>,</think>",
        f"output_dir={out}",
        "max_steps=3",
        "per_device_train_batch_size=4",
        "learning_rate=1e-2",
        "cutoff_len=64",
        "save_steps=1000",
        "device=cpu",
    )
    assert train.returncode == 0, train.stderr[-3000:]
    assert "training embed_tokens, lm_head in full next to LoRA" in train.stderr
    old = len(AutoTokenizer.from_pretrained(tiny_llama_dir))
    saved_tokenizer = AutoTokenizer.from_pretrained(out)
    assert saved_tokenizer.encode("a<think>b</think>", add_special_tokens=False)[1::2] == [
        old,
        old + 1,
    ]

    # the adapter holds the trained embedding: <think>'s row (an input of every example)
    # moved from its start, a row the data never uses did not (weight decay is 0)
    adapter = load_file(out / "adapter_model.safetensors")
    embed = adapter["base_model.model.model.embed_tokens.weight"]
    assert embed.shape[0] == old + 2
    assert (embed[old] - _start_rows(tiny_llama_dir, "<think>")).abs().max() > 1e-3
    base_embed = load_file(tiny_llama_dir / "model.safetensors")["model.embed_tokens.weight"]
    (unused,) = saved_tokenizer.encode(" zebra", add_special_tokens=False)[:1]
    assert torch.equal(embed[unused], base_embed[unused])

    export = _corral("export", "--adapter", str(out), "--output", str(exported), "device=cpu")
    assert export.returncode == 0, export.stderr[-3000:]
    merged = AutoModelForCausalLM.from_pretrained(exported)
    assert torch.equal(merged.get_input_embeddings().weight[old:], embed[old:])
    assert AutoTokenizer.from_pretrained(exported).encode("<think>", add_special_tokens=False) == [
        old
    ]

    gguf = tmp_path / "merged.gguf"
    to_gguf = _corral("export", "--model", str(exported), "--format", "gguf", "--output", str(gguf))
    assert to_gguf.returncode == 0, to_gguf.stderr[-3000:]
    [ids] = llama_cpp_call(gguf, "tokenize", texts=["a<think>b</think>"], special=True)
    assert ids[1::2] == [old, old + 1]

    # chat and serve's loader: the base grows before the adapter attaches
    capsys.readouterr()
    model, tokenizer = load_model(ModelConfig(adapter_name_or_path=[str(out)], device="cpu"))
    ids = torch.tensor([tokenizer.encode("2 plus 2<think>4</think>", add_special_tokens=False)])
    assert old in ids and old + 1 in ids
    assert "embeddings resized from 49,152 to 49,154 rows" in capsys.readouterr().err
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, merged(ids).logits)


def test_new_rows_start_at_their_pieces_mean_and_freeze_trains_them(tiny_llama_dir):
    config = ModelConfig(
        model_name_or_path=str(tiny_llama_dir), device="cpu", new_special_tokens=THINK
    )
    model, tokenizer = load_model(config, for_training=True)
    old = len(AutoTokenizer.from_pretrained(tiny_llama_dir))
    assert tokenizer.convert_tokens_to_ids(THINK) == [old, old + 1]
    embed = model.get_input_embeddings().weight
    torch.testing.assert_close(embed[old], _start_rows(tiny_llama_dir, "<think>"))
    torch.testing.assert_close(embed[old + 1], _start_rows(tiny_llama_dir, "</think>"))
    assert model.get_output_embeddings().weight.shape[0] == old + 2

    # freeze trains the embedding and LM head with its layers; full trains everything
    frozen = apply_method(
        model,
        MethodConfig(finetuning_type="freeze", freeze_trainable_layers=1),
        train_embeddings=True,
    )
    trainable = {n for n, p in frozen.named_parameters() if p.requires_grad}
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= trainable
    assert "model.layers.0.self_attn.q_proj.weight" not in trainable


def test_a_tied_model_trains_one_shared_copy_under_lora(smol_tokenizer):
    config = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=len(smol_tokenizer),
        tie_word_embeddings=True,
    )
    from corral.model.tokens import add_new_special_tokens, fit_embeddings

    tokenizer = AutoTokenizer.from_pretrained(smol_tokenizer.name_or_path)
    model = LlamaForCausalLM(config)
    assert add_new_special_tokens(tokenizer, [*THINK, "<|im_start|>"]) == THINK
    fit_embeddings(model, tokenizer)
    method = MethodConfig(finetuning_type="lora", lora_alpha=16)
    peft_model = apply_method(model, method, train_embeddings=True)
    embed = peft_model.get_input_embeddings().modules_to_save["default"].weight
    head = peft_model.get_output_embeddings().modules_to_save["default"].weight
    assert embed is head and embed.requires_grad and embed.shape[0] == len(tokenizer)


def test_quantised_base_takes_new_tokens(tiny_llama_dir):
    config = ModelConfig(
        model_name_or_path=str(tiny_llama_dir),
        device="cpu",
        quantization_bit=4,
        new_special_tokens=THINK,
    )
    model, tokenizer = load_model(config, for_training=True)
    method = MethodConfig(finetuning_type="lora", lora_alpha=16)
    peft_model = apply_method(model, method, train_embeddings=True)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("embed_tokens.modules_to_save" in n for n in trainable)
    assert any("lm_head.modules_to_save" in n for n in trainable)
    ids = torch.tensor([tokenizer.encode("1<think>2", add_special_tokens=False)])
    with torch.no_grad():
        assert torch.isfinite(peft_model(input_ids=ids).logits).all()


def test_resize_vocab_grows_to_a_longer_tokenizer(tiny_llama_dir, tmp_path, capsys):
    folder = tmp_path / "longer"
    shutil.copytree(tiny_llama_dir, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    old = len(tokenizer)
    tokenizer.add_special_tokens(
        {"extra_special_tokens": ["<think>"]}, replace_extra_special_tokens=False
    )
    tokenizer.save_pretrained(folder)

    plain, _ = load_model(ModelConfig(model_name_or_path=str(folder), device="cpu"))
    assert plain.get_input_embeddings().weight.shape[0] == old  # LLaMA-Factory's default
    config = ModelConfig(model_name_or_path=str(folder), device="cpu", resize_vocab=True)
    grown, _ = load_model(config)
    torch.testing.assert_close(
        grown.get_input_embeddings().weight[old], _start_rows(tiny_llama_dir, "<think>")
    )
    capsys.readouterr()
    load_model(ModelConfig(model_name_or_path=str(tiny_llama_dir), resize_vocab=True))
    assert "resize_vocab: the model has 49,152 embedding rows" in capsys.readouterr().err


def test_tokens_already_there_are_not_added_twice(tiny_llama_dir, capsys):
    config = ModelConfig(
        model_name_or_path=str(tiny_llama_dir), device="cpu", new_special_tokens=["<|im_end|>"]
    )
    model, tokenizer = load_model(config)
    assert len(tokenizer) == model.get_input_embeddings().weight.shape[0] == 49152
    assert "already in the vocabulary, not added: <|im_end|>" in capsys.readouterr().err


def test_config_forms_and_aliases():
    assert (
        build_config({"new_special_tokens": "<think>, </think>"}).model.new_special_tokens == THINK
    )
    assert build_config({"new_special_tokens": THINK}).model.new_special_tokens == THINK
    # LLaMA-Factory 0.9.4's name for it
    assert build_config({"add_special_tokens": "<think>"}).model.new_special_tokens == ["<think>"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["new_special_tokens=<a>,,<b>"], "new_special_tokens: '<a>,,<b>' has an empty token"),
        (["new_special_tokens=[<a>, ' ']"], "new_special_tokens: .* has an empty token"),
        (["new_special_tokens=<a>,<a>"], "new_special_tokens: <a> listed more than once"),
        (
            ["new_special_tokens=<a>", "finetuning_type=prefix"],
            "new_special_tokens with finetuning_type: prefix: virtual tokens",
        ),
        (
            ["resize_vocab=true", "finetuning_type=prompt"],
            "resize_vocab with finetuning_type: prompt",
        ),
        (
            ["new_special_tokens=<a>", "model_name_or_path=models/m.gguf"],
            "new_special_tokens: 'models/m.gguf' is a GGUF file",
        ),
        (["add_tokens=<a>"], "add_tokens.*special tokens only"),
        (["split_special_tokens=true"], "split_special_tokens"),
    ],
)
def test_bad_input_is_one_clear_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_a_vocabulary_beyond_the_limit_is_refused(tiny_llama_dir, monkeypatch):
    import corral.model.tokens

    monkeypatch.setattr(corral.model.tokens, "MAX_VOCAB", 49153)
    config = ModelConfig(model_name_or_path=str(tiny_llama_dir), new_special_tokens=THINK)
    with pytest.raises(ModelError, match="new_special_tokens: 2 new tokens would make 49,154"):
        load_model(config)
