"""Shared fixtures: the default model's tokenizer and tiny random Llama models (no network).

The default model is converted once into `$CORRAL_HOME` (set here to `<repo>/.corral_home`
unless the environment names another), so a test session pays for it at most once and later
sessions on the same machine not at all.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_DIR = REPO / "data"  # LLaMA-Factory's demo datasets and registry, shipped in the repository
LLAMA2_TOKENIZER = Path(__file__).parent / "data" / "llama2-tokenizer"  # Meta's tokenizer.model
# Llama 3's tokenizer.json pre-tokenizer pattern (tiktoken's cl100k split).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHAT_TEMPLATES = Path(__file__).parent / "data" / "chat_templates"  # published, see its README
os.environ.setdefault("CORRAL_HOME", str(REPO / ".corral_home"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# CI installs every extra and runs on Linux without a GPU, where no test has a reason to skip:
# there a skip (a missing extra, a broken install) is a failure, never a quiet pass.
SKIPS_FAIL = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _skip_as_failure(report) -> None:
    if SKIPS_FAIL and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, where every test must run: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    _skip_as_failure((yield).get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    _skip_as_failure((yield).get_result())


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    """The repository's `data/` folder: LLaMA-Factory's demo datasets and `dataset_info.json`."""
    return DEMO_DIR


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The default model as a Hugging Face folder (converted into $CORRAL_HOME on first use)."""
    from corral.model.default import default_model_dir as convert_or_find

    return convert_or_find()


@pytest.fixture(scope="session")
def smol_tokenizer(default_model_dir):
    """The default model's tokenizer (SmolLM2, BPE, ChatML template), from the converted folder."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.fixture(scope="session")
def llama3_style_tokenizer(default_model_dir):
    """SmolLM2's tokenizer with Llama 3's special tokens, BOS and end of turn, and Llama 3's
    pre-tokenizer split (newlines stay together before a word: "\n\n" + "Rome")."""
    from tokenizers import Regex, pre_tokenizers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    split = pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated")
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.add_special_tokens(
        {
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|eot_id|>",
            "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>"],
        }
    )
    return tok


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smol_tokenizer) -> Path:
    """A tiny random Llama (2 layers, hidden 64) with the SmolLM2 tokenizer, saved once."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=len(smol_tokenizer),
        max_position_embeddings=512,
        bos_token_id=smol_tokenizer.bos_token_id,
        eos_token_id=smol_tokenizer.eos_token_id,
        pad_token_id=smol_tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_llama(tiny_llama_dir):
    """(model, tokenizer) freshly loaded from `tiny_llama_dir` on CPU in fp32, eval mode."""
    from corral.config.fields import ModelConfig
    from corral.model.load import load_model

    return load_model(ModelConfig(model_name_or_path=str(tiny_llama_dir), device="cpu"))


@pytest.fixture(scope="session")
def learnable_tiny_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    """The tiny model with a 20x larger output head.

    With the default 0.02 init, the frozen random head caps the logits near 1, so methods that
    keep it frozen (LoRA, freeze) cannot lower the loss much however well they train.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    path = tmp_path_factory.mktemp("learnable-tiny")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def spm_tokenizer_model() -> Path:
    """Llama 2's SentencePiece `tokenizer.model` (shipped in tests/data)."""
    return LLAMA2_TOKENIZER / "tokenizer.model"


@pytest.fixture(scope="session")
def reward_folder(tiny_llama_dir, tmp_path_factory) -> Path:
    """A LoRA reward model on the tiny Llama (stage: rm, 3 steps on helpful vs dismissive
    replies to 24 topics), the output folder that ppo's and grpo's reward_model name."""
    import json

    from corral.config import load_config
    from corral.train.workflow import run_training

    folder = tmp_path_factory.mktemp("rm")
    topics = [f"topic {k}" for k in range(24)]
    pairs = [
        {
            "conversations": [{"from": "human", "value": f"Q: {t}"}],
            "chosen": {"from": "gpt", "value": f"Sure, here is what I know about {t}."},
            "rejected": {"from": "gpt", "value": "No."},
        }
        for t in topics
    ]
    (folder / "pairs.json").write_text(json.dumps(pairs))
    columns = {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}
    entry = {"file_name": "pairs.json", "formatting": "sharegpt", "ranking": True}
    (folder / "dataset_info.json").write_text(json.dumps({"pairs": {**entry, "columns": columns}}))
    keys = [
        f"model_name_or_path={tiny_llama_dir}",
        "dataset=pairs",
        f"dataset_dir={folder}",
        f"output_dir={folder / 'rm'}",
        "stage=rm",
        "template=chatml",
        "cutoff_len=64",
        "per_device_train_batch_size=8",
        "learning_rate=1e-2",
        "max_steps=3",
        "save_steps=1000",
        "seed=0",
    ]
    run_training(load_config(None, keys))
    return folder / "rm"


@pytest.fixture(scope="session")
def tool_llama_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    """The tiny Llama trained to call get_weather and answer with its result (`tool_helpers`)."""
    from tool_helpers import train_on_exchange

    folder = tmp_path_factory.mktemp("tool-llama")
    train_on_exchange(tiny_llama_dir, folder)
    return folder
