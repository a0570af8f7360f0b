"""The training path's savings change no maths: the fused MLP and dropping the padding mask give
the losses and gradients of the plain modules, while holding less activation memory."""

from __future__ import annotations

import pytest
import torch

from corral.config.parse import load_config
from corral.model.adapters import apply_method
from corral.model.fused import fuse_for_training, unfuse
from corral.train.loss import causal_lm_loss


def _batch(vocab: int, lengths=(12, 7, 3), seed: int = 0) -> dict:
    """Right-padded rows (as the Collator makes them) with labels on every real token."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), width), generator=generator)
    mask = (torch.arange(width) < torch.tensor(lengths)[:, None]).long()
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _loss_and_grads(model, batch: dict) -> tuple[float, dict]:
    model.zero_grad(set_to_none=True)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = model.get_decoder()(**inputs, use_cache=False).last_hidden_state
    loss = causal_lm_loss(hidden, batch["labels"], model.get_output_embeddings())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads


def _trainable(tiny_llama, *overrides: str):
    method = load_config(None, list(overrides)).method  # as `corral train` resolves it
    model, tokenizer = tiny_llama
    torch.manual_seed(0)
    model = apply_method(model, method)
    if method.finetuning_type == "lora":  # B starts at zero: make the adapter do something
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(std=0.02)
    return model.train(), tokenizer


def _assert_same(reference: tuple, other: tuple) -> None:
    assert other[0] == pytest.approx(reference[0], abs=1e-5)
    assert reference[1].keys() == other[1].keys() and reference[1]
    for name, grad in reference[1].items():
        torch.testing.assert_close(other[1][name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("finetuning_type", ["lora", "full"])
def test_fused_ops_gives_the_same_loss_and_gradients(tiny_llama, finetuning_type):
    model, tokenizer = _trainable(
        tiny_llama, f"finetuning_type={finetuning_type}", "lora_target=all", "lora_rank=4"
    )
    batch = _batch(len(tokenizer))
    plain = _loss_and_grads(model, batch)
    layers = model.config.num_hidden_layers
    lora = 7 * layers if finetuning_type == "lora" else 0  # q k v o gate up down
    norms = 2 * layers + 1  # two per block, and the final norm
    assert fuse_for_training(model) == {"mlp": layers, "lora": lora, "norm": norms}
    _assert_same(plain, _loss_and_grads(model, batch))
    unfuse(model)
    _assert_same(plain, _loss_and_grads(model, batch))


@pytest.mark.parametrize("variant", ["use_dora=true", "lora_dropout=0.1"])
def test_fused_ops_leaves_dora_and_dropout_alone(tiny_llama, variant):
    model, _ = _trainable(tiny_llama, "finetuning_type=lora", "lora_target=all", variant)
    counts = fuse_for_training(model)
    assert (counts["mlp"], counts["lora"]) == (0, 0)  # the norms do not depend on LoRA


def test_fused_ops_is_not_used_without_gradients(tiny_llama):
    model, tokenizer = _trainable(tiny_llama, "finetuning_type=lora", "lora_target=all")
    batch = _batch(len(tokenizer))
    with torch.no_grad():
        before = model(input_ids=batch["input_ids"]).logits
        fuse_for_training(model)
        after = model(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(after, before, atol=0, rtol=0)


def test_right_padding_needs_no_mask_under_causal_attention(tiny_llama):
    model, tokenizer = _trainable(tiny_llama, "finetuning_type=full")
    batch = _batch(len(tokenizer), lengths=(16, 9, 2, 5))
    masked = _loss_and_grads(model, batch)
    unmasked = _loss_and_grads(model, {k: v for k, v in batch.items() if k != "attention_mask"})
    _assert_same(masked, unmasked)


def _saved_bytes(model, batch: dict) -> int:
    storages: dict[int, int] = {}

    def keep(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        hidden = model.get_decoder()(**inputs, use_cache=False).last_hidden_state
        causal_lm_loss(hidden, batch["labels"], model.get_output_embeddings())
    return sum(size for ptr, size in storages.items() if ptr not in params)


def test_fused_ops_and_no_mask_save_activation_memory(tiny_llama):
    model, tokenizer = _trainable(tiny_llama, "finetuning_type=lora", "lora_target=all")
    batch = _batch(len(tokenizer), lengths=(64, 60, 50, 64))
    plain = _saved_bytes(model, batch)
    fuse_for_training(model)
    lean = _saved_bytes(model, {k: v for k, v in batch.items() if k != "attention_mask"})
    print(f"\nactivation bytes saved for backward: {plain} plain, {lean} lean")
    assert lean < 0.8 * plain


def test_fused_ops_follow_peft_with_fp32_adapters_on_a_bf16_model(tiny_llama):
    model, tokenizer = tiny_llama
    tiny_llama = (model.to(torch.bfloat16), tokenizer)
    model, tokenizer = _trainable(tiny_llama, "finetuning_type=lora", "lora_target=all")
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    batch = _batch(len(tokenizer))
    plain_loss, plain_grads = _loss_and_grads(model, batch)
    fuse_for_training(model)
    fused_loss, fused_grads = _loss_and_grads(model, batch)
    assert fused_loss == pytest.approx(plain_loss, rel=1e-2)
    for name, grad in plain_grads.items():
        assert fused_grads[name].dtype == grad.dtype
        torch.testing.assert_close(fused_grads[name], grad, atol=2e-2, rtol=5e-2, msg=name)


@pytest.mark.parametrize("finetuning_type", ["full", "freeze", "lora"])
def test_half_precision_models_train_fp32_master_weights(tiny_llama, finetuning_type):
    model, tokenizer = tiny_llama
    model, _ = _trainable(
        (model.to(torch.bfloat16), tokenizer),
        f"finetuning_type={finetuning_type}",
        "freeze_trainable_layers=1",
    )
    dtypes = {p.requires_grad: set() for p in model.parameters()}
    for param in model.parameters():
        dtypes[param.requires_grad].add(param.dtype)
    assert dtypes[True] == {torch.float32}  # what AdamW updates
    assert dtypes.get(False, {torch.bfloat16}) == {torch.bfloat16}  # frozen: as loaded


def test_fused_loss_under_autocast_computes_in_half_precision(tiny_llama):
    """fp32 master weights under bf16 autocast: the LM head matmuls run in bf16, as the plain
    head's would, and the weight's gradient comes back in fp32."""
    model, tokenizer = tiny_llama
    head = model.get_output_embeddings()
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 9, head.in_features, generator=generator, requires_grad=True)
    labels = torch.randint(0, len(tokenizer), (2, 9), generator=generator)
    labels[0, :4] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = causal_lm_loss(hidden, labels, head)
        logits = head(hidden[:, :-1]).float()  # bf16 under autocast
    plain = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
    )
    assert fused.item() == pytest.approx(plain.item(), rel=1e-3)  # the same bf16 logits
    fused.backward()
    assert head.weight.grad.dtype == torch.float32 and hidden.grad.dtype == torch.float32
    exact = causal_lm_loss(hidden.detach(), labels, head)  # fp32 logits differ from bf16 ones
    assert fused.item() != exact.item()


def test_bf16_weights_train_in_mixed_precision_and_save_as_loaded(tiny_llama_dir, tmp_path):
    import json

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from corral.train.trainer import training_arguments
    from corral.train.workflow import run_training

    data = tmp_path / "qa.json"
    data.write_text(json.dumps([{"instruction": "Hi?", "output": "Hello there."}] * 8))
    overrides = [
        f"model_name_or_path={tiny_llama_dir}",
        f"dataset={data}",
        f"output_dir={tmp_path / 'out'}",
        "template=chatml",
        "dtype=bfloat16",
        "finetuning_type=full",
        "max_steps=2",
        "learning_rate=1e-3",
        "stop_check_samples=0",
    ]
    config = load_config(None, overrides)
    assert training_arguments(config, has_eval=False, weights_dtype=torch.bfloat16).bf16
    assert not training_arguments(config, has_eval=False).bf16
    run_training(config)
    saved = load_file(tmp_path / "out" / "model.safetensors")
    before = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16)
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(saved[name], before.state_dict()[name])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_frozen_head_log_probs_and_gradients_equal_autograds(temperature):
    """token_logps on a frozen head computes each token's gradient in the forward pass (no
    logits kept); the log-probs and d/d hidden under unequal per-token weights equal plain
    autograd's, and more chunks than one are crossed."""
    from corral.train.loss import CHUNK_TOKENS, token_logps

    generator = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 300, bias=False).requires_grad_(False)
    count = CHUNK_TOKENS + 37
    hidden = torch.randn(count, 16, generator=generator, requires_grad=True)
    targets = torch.randint(0, 300, (count,), generator=generator)
    weights = torch.randn(count, generator=generator)  # as a loss weighs each token

    fused = token_logps(hidden, targets, head, temperature)
    (fused_grad,) = torch.autograd.grad((fused * weights).sum(), hidden)
    logits = head(hidden) / temperature
    plain = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)
    (plain_grad,) = torch.autograd.grad((plain * weights).sum(), hidden)
    torch.testing.assert_close(fused, plain)
    torch.testing.assert_close(fused_grad, plain_grad)
    with torch.no_grad():  # the reference's path: no gradient buffer
        torch.testing.assert_close(token_logps(hidden, targets, head, temperature), plain)
