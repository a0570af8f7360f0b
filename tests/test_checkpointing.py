"""Gradient checkpointing with corral's fused ops: the same losses and gradients, and fewer
activations kept for backward (measured as the bytes autograd saves, not as time)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from corral.config import load_config
from corral.config.fields import ModelConfig
from corral.model.adapters import apply_method
from corral.model.checkpointing import enable_checkpointing, is_checkpointing
from corral.model.fused import fuse_for_training
from corral.model.load import load_model
from corral.train import callbacks
from corral.train.loss import causal_lm_loss
from corral.train.workflow import run_training


class SavedBytes:
    """Bytes of the tensors autograd keeps for backward (parameters excluded), while active.

    Checkpointed layers save through their own hooks, which take precedence: what they drop
    and recompute in backward is not counted, which is the memory checkpointing saves.
    """

    def __init__(self, model=None):
        self.skip = {p.untyped_storage().data_ptr() for p in model.parameters()} if model else set()
        self.storages: dict[int, int] = {}

    def _pack(self, tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.skip and not isinstance(tensor, torch.nn.Parameter):
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    def __enter__(self):
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.storages.values())


@pytest.mark.parametrize("method", ["lora", "full"])
def test_checkpointing_gives_the_same_gradients_with_fewer_saved_activations(
    tiny_llama_dir, method
):
    model, _ = load_model(
        ModelConfig(model_name_or_path=str(tiny_llama_dir), device="cpu"), for_training=True
    )
    model = apply_method(model, load_config(None, [f"finetuning_type={method}"]).method)
    counts = fuse_for_training(model)
    assert counts["mlp"] == 2 and counts["norm"] == 5  # the fused ops are on
    model.train()
    ids = torch.randint(0, 1000, (2, 128), generator=torch.Generator().manual_seed(0))

    def step():
        model.zero_grad()
        with SavedBytes(model) as saved:  # the decoder's activations (what checkpointing drops)
            hidden = model.get_decoder()(input_ids=ids).last_hidden_state
        loss = causal_lm_loss(hidden, ids, model.get_output_embeddings())
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        return loss.detach(), grads, saved.total

    loss, grads, plain_bytes = step()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the deprecated names are not used
        assert not is_checkpointing(model)
        enable_checkpointing(model)
        assert is_checkpointing(model)
    loss_ckpt, grads_ckpt, ckpt_bytes = step()
    assert torch.allclose(loss, loss_ckpt, rtol=1e-6)
    for a, b in zip(grads, grads_ckpt, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    print(
        f"{method}: saved activations {plain_bytes / 2**20:.2f} MiB -> {ckpt_bytes / 2**20:.2f} MiB"
    )
    assert ckpt_bytes < 0.5 * plain_bytes


@pytest.mark.slow
def test_training_with_checkpointing_logs_the_same_losses(tiny_llama_dir, tmp_path):
    data = tmp_path / "qa.json"
    rows = [
        {"instruction": f"Question {i}?", "input": "", "output": f"Answer {i}."} for i in range(8)
    ]
    data.write_text(json.dumps(rows))

    def train(out, *extra):
        config = load_config(
            None,
            [
                f"model_name_or_path={tiny_llama_dir}",
                f"dataset={data}",
                f"output_dir={out}",
                "template=chatml",
                "cutoff_len=64",
                "per_device_train_batch_size=4",
                "learning_rate=1e-2",
                "max_steps=4",
                "logging_steps=1",
                "stop_check_samples=0",
                "device=cpu",
                *extra,
            ],
        )
        assert config.train.fused_ops
        with SavedBytes() as saved:
            run_training(config)
        lines = (out / callbacks.LOG_FILE).read_text().splitlines()
        return [json.loads(line)["loss"] for line in lines if '"loss"' in line], saved.total

    losses, plain_bytes = train(tmp_path / "plain")
    # LLaMA-Factory's spelling of gradient_checkpointing=true
    losses_ckpt, ckpt_bytes = train(tmp_path / "ckpt", "disable_gradient_checkpointing=false")
    assert len(losses) == 4
    assert losses_ckpt == pytest.approx(losses, rel=1e-5)
    assert ckpt_bytes < plain_bytes
