"""`corral convert meta`: tiny random checkpoints in Meta's own format (1 and 2 model-parallel
shards, with and without GQA, with ffn_dim_multiplier) give, once converted, the logits of an
independent re-implementation of Meta's reference forward pass; the tokenizer round-trips."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from corral.cli import main

# --- Meta's reference model (llama/model.py), written out here as the oracle ----------------


def _rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rotary(x, freqs_cis):
    # Meta: view consecutive pairs as complex numbers and multiply by e^(i * pos * theta).
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs_cis).flatten(3)


def meta_forward(weights: dict, params: dict, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of Meta's Transformer.forward (fp32, no KV cache) on one sequence."""
    dim, n_heads = params["dim"], params["n_heads"]
    n_kv = params.get("n_kv_heads") or n_heads
    head_dim, seq = dim // n_heads, tokens.shape[1]
    theta = params.get("rope_theta", 10000.0)
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2).float() / head_dim))
    if params.get("use_scaled_rope"):
        freqs = _meta_apply_scaling(freqs)
    freqs_cis = torch.polar(
        torch.ones(seq, head_dim // 2), torch.outer(torch.arange(seq).float(), freqs)
    )
    freqs_cis = freqs_cis.view(1, seq, 1, head_dim // 2)
    mask = torch.triu(torch.full((seq, seq), float("-inf")), diagonal=1)
    h = weights["tok_embeddings.weight"][tokens]
    for i in range(params["n_layers"]):
        w = {
            k.split(f"layers.{i}.", 1)[1]: v
            for k, v in weights.items()
            if k.startswith(f"layers.{i}.")
        }
        x = _rms_norm(h, w["attention_norm.weight"], params["norm_eps"])
        q = (x @ w["attention.wq.weight"].T).view(1, seq, n_heads, head_dim)
        k = (x @ w["attention.wk.weight"].T).view(1, seq, n_kv, head_dim)
        v = (x @ w["attention.wv.weight"].T).view(1, seq, n_kv, head_dim)
        q, k = _rotary(q, freqs_cis), _rotary(k, freqs_cis)
        k = k.repeat_interleave(n_heads // n_kv, dim=2)  # Meta's repeat_kv
        v = v.repeat_interleave(n_heads // n_kv, dim=2)
        scores = q.transpose(1, 2) @ k.transpose(1, 2).transpose(2, 3) / head_dim**0.5
        attention = torch.softmax(scores + mask, dim=-1) @ v.transpose(1, 2)
        h = h + attention.transpose(1, 2).reshape(1, seq, dim) @ w["attention.wo.weight"].T
        x = _rms_norm(h, w["ffn_norm.weight"], params["norm_eps"])
        gate = torch.nn.functional.silu(x @ w["feed_forward.w1.weight"].T)
        h = h + (gate * (x @ w["feed_forward.w3.weight"].T)) @ w["feed_forward.w2.weight"].T
    return _rms_norm(h, weights["norm.weight"], params["norm_eps"]) @ weights["output.weight"].T


def _meta_apply_scaling(freqs: torch.Tensor) -> torch.Tensor:
    """Llama 3.1's `apply_scaling` from Meta's reference model.py (its constants)."""
    import math

    scale_factor, low_freq_factor, high_freq_factor, old_context_len = 8, 1, 4, 8192
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    new_freqs = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            new_freqs.append(freq)
        elif wavelen > low_freq_wavelen:
            new_freqs.append(freq / scale_factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (
                high_freq_factor - low_freq_factor
            )
            new_freqs.append((1 - smooth) * freq / scale_factor + smooth * freq)
    return torch.tensor(new_freqs, dtype=freqs.dtype)


# --- Tiny checkpoints in Meta's format -----------------------------------------------------

# Meta's model-parallel split: ColumnParallelLinear shards dim 0, RowParallelLinear dim 1,
# ParallelEmbedding (LLaMA 1/2) dim 1; norms are replicated on every rank.
_SPLIT_DIM = {
    "wq": 0,
    "wk": 0,
    "wv": 0,
    "w1": 0,
    "w3": 0,
    "output": 0,
    "wo": 1,
    "w2": 1,
    "tok_embeddings": 1,
}


def _random_weights(params: dict, vocab: int) -> dict:
    from corral.export.meta import ffn_hidden_size

    dim, n_heads = params["dim"], params["n_heads"]
    kv_dim = (params.get("n_kv_heads") or n_heads) * (dim // n_heads)
    ffn = ffn_hidden_size(params)
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    weights = {"tok_embeddings.weight": rand(vocab, dim, scale=1.0), "norm.weight": 1 + rand(dim)}
    weights["output.weight"] = rand(vocab, dim)
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        weights.update(
            {
                p + "attention.wq.weight": rand(dim, dim),
                p + "attention.wk.weight": rand(kv_dim, dim),
                p + "attention.wv.weight": rand(kv_dim, dim),
                p + "attention.wo.weight": rand(dim, dim),
                p + "feed_forward.w1.weight": rand(ffn, dim),
                p + "feed_forward.w2.weight": rand(dim, ffn),
                p + "feed_forward.w3.weight": rand(ffn, dim),
                p + "attention_norm.weight": 1 + rand(dim),
                p + "ffn_norm.weight": 1 + rand(dim),
            }
        )
    return weights


def write_meta_checkpoint(folder: Path, params: dict, weights: dict, shards: int, spm: Path):
    folder.mkdir(parents=True)
    (folder / "params.json").write_text(json.dumps(params))
    shutil.copyfile(spm, folder / "tokenizer.model")
    for rank in range(shards):
        shard = {}
        for name, tensor in weights.items():
            kind = name.split(".")[-2] if name.startswith("layers.") else name.split(".")[0]
            if kind in _SPLIT_DIM and shards > 1:
                tensor = tensor.chunk(shards, dim=_SPLIT_DIM[kind])[rank]
            shard[name] = tensor.clone()
        shard["rope.freqs"] = torch.zeros(params["dim"] // params["n_heads"] // 2)
        torch.save(shard, folder / f"consolidated.{rank:02d}.pth")


CASES = {
    "1 shard, MHA": ({"n_heads": 4}, 1),
    "2 shards, GQA, ffn_dim_multiplier": (
        {"n_heads": 4, "n_kv_heads": 2, "ffn_dim_multiplier": 1.3, "rope_theta": 500000.0},
        2,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_converted_model_matches_meta_reference(case, tmp_path, spm_tokenizer_model):
    import sentencepiece
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra, shards = CASES[case]
    params = {
        "dim": 64,
        "n_layers": 2,
        "multiple_of": 32,
        "norm_eps": 1e-5,
        "vocab_size": -1,
        **extra,
    }
    vocab = sentencepiece.SentencePieceProcessor(model_file=str(spm_tokenizer_model)).vocab_size()
    weights = _random_weights(params, vocab)
    write_meta_checkpoint(tmp_path / "meta", params, weights, shards, spm_tokenizer_model)

    assert (
        main(
            ["convert", "meta", "--input", str(tmp_path / "meta"), "--output", str(tmp_path / "hf")]
        )
        == 0
    )
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert model.config.num_key_value_heads == extra.get("n_kv_heads", 4)
    tokens = torch.tensor([[1, 5, 9, 200, 17, 3, 42, 7, 99, 11, 250, 13]])
    with torch.no_grad():
        ours = model(tokens).logits
    reference = meta_forward(weights, params, tokens)
    assert (ours - reference).abs().max() <= 1e-4

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_tokenizer_model))
    for text in ("The quick brown fox.", "Paris and Rome, 1234!"):
        ids = tokenizer(text)["input_ids"]
        assert ids == [sp.bos_id(), *sp.encode(text)]  # Meta: BOS, then SentencePiece ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_convert_refuses_existing_output_and_wrong_input(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    assert (
        main(["convert", "meta", "--input", str(tmp_path), "--output", str(tmp_path / "o2")]) == 1
    )
    assert "has no params.json" in capsys.readouterr().err
    (tmp_path / "params.json").write_text(
        json.dumps({"dim": 8, "n_layers": 1, "n_heads": 1, "norm_eps": 1e-5})
    )
    assert (
        main(["convert", "meta", "--input", str(tmp_path), "--output", str(tmp_path / "out")]) == 1
    )
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    (tmp_path / "params.json").write_text('{"dim": 8,')
    assert (
        main(["convert", "meta", "--input", str(tmp_path), "--output", str(tmp_path / "o3")]) == 1
    )
    assert "params.json' is not valid JSON" in capsys.readouterr().err


class _Pickled:
    """Not a tensor: torch.load(weights_only=True) must refuse to unpickle it."""


def test_shards_holding_pickled_code_are_refused(tmp_path):
    from corral.export.meta import load_shards
    from corral.utils.errors import ExportError

    torch.save({"tok_embeddings.weight": _Pickled()}, tmp_path / "consolidated.00.pth")
    with pytest.raises(ExportError, match=r"consolidated\.00\.pth' is not a checkpoint of plain"):
        load_shards(tmp_path)
    (tmp_path / "consolidated.00.pth").write_bytes(b"PK\x03\x04truncated")
    with pytest.raises(ExportError, match="is not a checkpoint of plain tensors"):
        load_shards(tmp_path)


@pytest.mark.slow
def test_convert_train_export_gguf(tmp_path, spm_tokenizer_model):
    """The converted folder trains with corral train and exports with corral export."""
    import gguf
    import sentencepiece

    from export_helpers import train_adapter

    params = {
        "dim": 64,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "multiple_of": 32,
        "norm_eps": 1e-5,
    }
    vocab = sentencepiece.SentencePieceProcessor(model_file=str(spm_tokenizer_model)).vocab_size()
    write_meta_checkpoint(
        tmp_path / "meta", params, _random_weights(params, vocab), 2, spm_tokenizer_model
    )
    assert (
        main(
            ["convert", "meta", "--input", str(tmp_path / "meta"), "--output", str(tmp_path / "hf")]
        )
        == 0
    )
    adapter = train_adapter(tmp_path / "hf", tmp_path / "run", "max_steps=5", template="llama2")
    out = tmp_path / "tuned.gguf"
    assert main(["export", "--adapter", str(adapter), "--output", str(out), "--quant", "q8_0"]) == 0
    reader = gguf.GGUFReader(out)
    assert reader.fields["tokenizer.ggml.model"].contents() == "llama"
    assert "[INST]" in reader.fields["tokenizer.chat_template"].contents()
    assert len(reader.tensors) == 2 + 2 * 9 + 1  # embeddings, norm, output + 9 per layer


# --- Llama 3: a tiktoken BPE file instead of SentencePiece ---------------------------------

_MERGED = [
    b"he",
    b"ll",
    b"llo",
    b"hello",
    b" w",
    b"or",
    b"ld",
    b" wor",
    b" world",
    b"in",
    b"ing",
    b"xy",
]


@pytest.fixture
def tiktoken_file(tmp_path) -> Path:
    """A tiny file in Llama 3's tokenizer.model format: `base64(bytes) rank` per line."""
    import base64

    pieces = [bytes([i]) for i in range(256)] + _MERGED
    path = tmp_path / "llama3-tokenizer.model"
    path.write_text(
        "".join(f"{base64.b64encode(p).decode()} {rank}\n" for rank, p in enumerate(pieces))
    )
    return path


def test_llama3_checkpoint_converts_with_its_tiktoken_tokenizer(tmp_path, tiktoken_file):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from corral.export.meta import LLAMA3_PATTERN, llama3_special_tokens

    n_base = 256 + len(_MERGED)
    specials = {name: n_base + i for i, name in enumerate(llama3_special_tokens())}
    params = {
        "dim": 64,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "multiple_of": 32,
        "ffn_dim_multiplier": 1.3,
        "norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "vocab_size": n_base + len(specials),
    }
    weights = _random_weights(params, params["vocab_size"])
    write_meta_checkpoint(tmp_path / "meta", params, weights, 2, tiktoken_file)
    argv = ["convert", "meta", "--input", str(tmp_path / "meta"), "--output", str(tmp_path / "hf")]
    assert main(argv) == 0

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    tokens = torch.tensor([[n_base, 5, 9, 200, 17, 3, 42, 7, 99, 11, 250, n_base + 9]])
    with torch.no_grad():
        assert (model(tokens).logits - meta_forward(weights, params, tokens)).abs().max() <= 1e-4

    # Meta's tokenizer.py is tiktoken with this pattern and these special ids, BOS prepended.
    reference = tiktoken.Encoding(
        "llama3-tiny",
        pat_str=LLAMA3_PATTERN,
        mergeable_ranks=load_tiktoken_bpe(str(tiktoken_file)),
        special_tokens=specials,
    )
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tokenizer.bos_token_id == specials["<|begin_of_text|>"]
    for text in ("hello world", "Hello, world!  123456 singing\n\nin 你好", "hi<|eot_id|>"):
        ids = tokenizer(text)["input_ids"]
        assert ids == [
            specials["<|begin_of_text|>"],
            *reference.encode(text, allowed_special="all"),
        ]
        assert tokenizer.decode(ids[1:]) == text
    assert "<|start_header_id|>" in tokenizer.chat_template  # Meta's Llama 3 chat format


@pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama-cpp-python is not installed (pip install 'corral[llamacpp]'; make test does)",
)
def test_llama3_1_converts_and_exports_a_gguf_llama_cpp_reads_alike(tmp_path, tiktoken_file):
    """Llama 3.1: scaled rope and the tiktoken tokenizer survive convert -> export -> llama.cpp."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llama_cpp_child import llama_cpp_call

    n_base = 256 + len(_MERGED)
    params = {
        "dim": 64,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "multiple_of": 32,
        "norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "use_scaled_rope": True,
        "vocab_size": n_base + 256,
    }
    weights = _random_weights(params, params["vocab_size"])
    write_meta_checkpoint(tmp_path / "meta", params, weights, 1, tiktoken_file)
    hf, gguf_file = tmp_path / "hf", tmp_path / "llama31.gguf"
    assert main(["convert", "meta", "--input", str(tmp_path / "meta"), "--output", str(hf)]) == 0
    assert main(["export", "--model", str(hf), "--output", str(gguf_file), "--quant", "f32"]) == 0

    # 256 positions: far enough for the scaled low frequencies to change the logits
    tokens = torch.randint(0, n_base, (1, 256), generator=torch.Generator().manual_seed(1))
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    with torch.no_grad():
        ours = model(tokens).logits[0]
    assert (ours - meta_forward(weights, params, tokens)[0]).abs().max() <= 1e-4
    unscaled = meta_forward(weights, {**params, "use_scaled_rope": False}, tokens)[0]
    assert (ours - unscaled).abs().max() > 1e-2  # so the comparisons below test the scaling

    # llama.cpp runs in a child process (a native crash fails this test, not the test run),
    # with an f32 KV cache: its default f16 one rounds.
    logits = llama_cpp_call(gguf_file, "logits", tokens=tokens[0].tolist())
    assert (torch.tensor(logits) - ours).abs().max() <= 1e-3  # measured: 5e-5
    tokenizer = AutoTokenizer.from_pretrained(hf)
    texts = ["hello world", "Hello, world!  123456 singing\n\nin 你好"]
    theirs = llama_cpp_call(gguf_file, "tokenize", texts=texts)
    for text, ids in zip(texts, theirs, strict=True):
        assert ids == tokenizer(text, add_special_tokens=False)["input_ids"], text
