"""`corral vocab extend`: new tokens from a Chinese corpus for byte-level BPE (SmolLM2's) and
SentencePiece (Llama 2's) tokenizers; old ids unchanged, new rows the mean of their parts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from corral.utils.errors import ConfigError, DataError
from corral.vocab.extend import extend_vocabulary
from llama_cpp_child import llama_cpp_call

DEMO = Path(__file__).resolve().parents[1] / "data"
needs_llama_cpp = pytest.mark.skipif(
    not __import__("importlib").util.find_spec("llama_cpp"),
    reason="llama-cpp-python is not installed (pip install 'corral[llamacpp]'; make test does)",
)


@pytest.fixture(scope="module")
def zh_split(tmp_path_factory) -> tuple[Path, list[str]]:
    """250 records of alpaca_zh_demo to learn from, and 40 held-out texts."""
    records = json.loads((DEMO / "alpaca_zh_demo.json").read_text())
    path = tmp_path_factory.mktemp("zh") / "zh.json"
    path.write_text(json.dumps(records[:250], ensure_ascii=False))
    return path, [r["output"] for r in records[-40:]]


@pytest.fixture(scope="module")
def llama2_tiny_dir(tmp_path_factory, spm_tokenizer_model) -> Path:
    """A tiny random Llama with Llama 2's SentencePiece tokenizer (BOS added, byte fallback)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from corral.export.meta import convert_tokenizer

    out = tmp_path_factory.mktemp("llama2-tiny")
    convert_tokenizer(spm_tokenizer_model.parent, out)
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        vocab_size=32000,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def _tokens(tokenizer, texts: list[str]) -> int:
    return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny_llama_dir", "llama2_tiny_dir"])
def test_extended_tokenizer_is_shorter_and_keeps_old_ids(model, zh_split, tmp_path, request):
    folder = request.getfixturevalue(model)
    corpus, held_out = zh_split
    out = tmp_path / "extended"
    report = extend_vocabulary(str(folder), [str(corpus)], 300, str(out))
    old, new = AutoTokenizer.from_pretrained(folder), AutoTokenizer.from_pretrained(out)
    assert 0 < report.added <= 300 and len(new) == len(old) + report.added
    assert report.first_id == len(old)
    old_vocab, new_vocab = old.get_vocab(), new.get_vocab()
    assert all(new_vocab[token] == i for token, i in old_vocab.items())  # old ids never change
    # fewer tokens on held-out Chinese text, which decodes to the same string
    assert _tokens(new, held_out) < 0.9 * _tokens(old, held_out)
    for text in held_out:
        assert new.decode(new(text)["input_ids"], skip_special_tokens=True) == old.decode(
            old(text)["input_ids"], skip_special_tokens=True
        )
    # English text tokenises as before wherever no new token applies
    english = [r["output"] for r in json.loads((DEMO / "alpaca_en_demo.json").read_text())[:50]]
    for text in english:
        ids = new(text)["input_ids"]
        assert ids == old(text)["input_ids"] or max(ids) >= len(old), text
    # new rows are the mean of the old rows of the tokens each one joins
    weights = load_file(out / "model.safetensors")
    before = load_file(folder / "model.safetensors")
    first = report.first_id
    token = new.convert_ids_to_tokens(first)
    parts = old(new.convert_tokens_to_string([token]), add_special_tokens=False)["input_ids"]
    if parts[0] == old.convert_tokens_to_ids("\u2581") and not token.startswith("\u2581"):
        parts = parts[1:]  # SentencePiece's word-start marker, which the new piece lacks
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name not in weights:  # tied to the embeddings
            continue
        torch.testing.assert_close(weights[name][:first], before[name])
        torch.testing.assert_close(weights[name][first], before[name][parts].mean(0))


def test_cli_extends_and_each_bad_input_is_one_clear_error(tiny_llama_dir, zh_split, tmp_path):
    corpus, _ = zh_split
    run = [sys.executable, "-m", "corral", "vocab", "extend", "--model", str(tiny_llama_dir)]
    done = subprocess.run(
        [*run, "--corpus", str(corpus), "--add", "50", "--output", str(tmp_path / "ok")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "50 new tokens (ids 49152-49201)" in done.stdout, done.stdout
    gbk = tmp_path / "gbk.txt"
    gbk.write_bytes("中文语料".encode("gbk"))
    done = subprocess.run(
        [*run, "--corpus", str(gbk), "--add", "10", "--output", str(tmp_path / "gbk")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    assert "not UTF-8 text (byte 0" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("corpus_text", "add", "error", "message"),
    [
        ("", 10, DataError, "holds no text"),
        ("短短的一句话。", 500, DataError, "fewer than --add 500"),
        ("中文语料。" * 50, 0, ConfigError, "at least 1"),
        ("中文语料。" * 50, 10**6, ConfigError, "corral extends a vocabulary up to 262,144"),
    ],
)
def test_bad_corpus_or_count(tiny_llama_dir, tmp_path, corpus_text, add, error, message):
    corpus = tmp_path / "c.txt"
    corpus.write_text(corpus_text)
    with pytest.raises(error, match=message):
        extend_vocabulary(str(tiny_llama_dir), [str(corpus)], add, str(tmp_path / "out"))


def test_a_tokenizer_that_is_neither_kind_is_refused(tiny_llama_dir, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    words = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(["a", "b", "c", "d"])}}
    backend = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = tmp_path / "wordlevel"
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(folder)
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir).save_pretrained(folder)
    corpus = tmp_path / "c.txt"
    corpus.write_text("a b c d " * 50)
    with pytest.raises(ConfigError, match="its tokenizer is WordLevel"):
        extend_vocabulary(str(folder), [str(corpus)], 2, str(tmp_path / "out"))


@pytest.mark.slow
@needs_llama_cpp
@pytest.mark.parametrize("model", ["tiny_llama_dir", "llama2_tiny_dir"])
def test_extended_folder_exports_to_gguf_with_the_same_ids(model, zh_split, tmp_path, request):
    """llama.cpp tokenises Chinese text to the ids the extended tokenizer gives."""
    corpus, held_out = zh_split
    out = tmp_path / "extended"
    folder = request.getfixturevalue(model)
    extend_vocabulary(str(folder), [str(corpus)], 200, str(out))
    gguf = tmp_path / "extended.gguf"
    done = subprocess.run(
        [sys.executable, "-m", "corral", "export", "--model", str(out), "--output", str(gguf)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    tokenizer = AutoTokenizer.from_pretrained(out)
    texts = held_out[:8]
    expected = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert any(max(ids) >= len(AutoTokenizer.from_pretrained(folder)) for ids in expected)
    assert llama_cpp_call(gguf, "tokenize", texts=texts) == expected


@pytest.mark.slow
def test_extended_folder_trains_its_new_rows_then_chats_and_serves(
    zh_split, tiny_llama_dir, tmp_path
):
    """pt with LoRA and additional_target trains the new rows; chat and serve (the openai
    client) load the trained adapter with the extended tokenizer."""
    import openai

    from test_serve import start_server, stop_server

    corpus, held_out = zh_split
    extended = tmp_path / "extended"
    report = extend_vocabulary(str(tiny_llama_dir), [str(corpus)], 100, str(extended))
    records = json.loads(corpus.read_text())[:16]
    data = tmp_path / "data"
    data.mkdir()
    (data / "zh.jsonl").write_text(
        "".join(json.dumps({"text": r["output"]}, ensure_ascii=False) + "\n" for r in records)
    )
    info = {"zh": {"file_name": "zh.jsonl", "columns": {"prompt": "text"}}}
    (data / "dataset_info.json").write_text(json.dumps(info))
    adapter = tmp_path / "pt-lora"
    keys = [
        "stage=pt",
        f"model_name_or_path={extended}",
        "finetuning_type=lora",
        "additional_target=embed_tokens,lm_head",
        "dataset=zh",
        f"dataset_dir={data}",
        "cutoff_len=128",
        "max_steps=3",
        "learning_rate=1e-2",
        f"output_dir={adapter}",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "corral", "train", *keys],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    # the new rows moved away from their mean-of-parts start, in the embeddings and the head
    start = load_file(extended / "model.safetensors")
    trained = load_file(adapter / "adapter_model.safetensors")
    new_rows = slice(report.first_id, report.first_id + report.added)
    for module in ("embed_tokens", "lm_head"):
        (name,) = [n for n in trained if n.endswith(f"{module}.weight")]  # modules_to_save
        (old,) = [n for n in start if module in n]
        assert trained[name].shape == start[old].shape
        assert not torch.allclose(trained[name][new_rows], start[old][new_rows])

    prompt = held_out[0][:40]
    tokenizer = AutoTokenizer.from_pretrained(extended)
    chat = subprocess.run(
        [
            sys.executable,
            "-m",
            "corral",
            "chat",
            "--adapter",
            str(adapter),
            "--prompt",
            prompt,
            "--temperature",
            "0",
            "--max-new-tokens",
            "8",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert chat.returncode == 0 and chat.stdout.strip(), chat.stderr
    process, url = start_server("--adapter", str(adapter), "--served-model-name", "zh")
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        reply = client.completions.create(model="zh", prompt=prompt, max_tokens=8, temperature=0)
    finally:
        stop_server(process)
    # the server counts the prompt in the extended tokenizer's ids
    assert reply.usage.prompt_tokens == len(tokenizer(prompt)["input_ids"])
    assert reply.usage.prompt_tokens < len(
        AutoTokenizer.from_pretrained(tiny_llama_dir)(prompt)["input_ids"]
    )
